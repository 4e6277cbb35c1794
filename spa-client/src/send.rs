//! Putting packets on the wire: one SPA datagram, or a knock sequence (TCP SYN by a
//! non-blocking connect that is abandoned at once, as knockd's `knock` does; one UDP datagram
//! per UDP port). Unprivileged throughout.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

pub use crate::resolve::Family;

/// Sends one UDP datagram from an ephemeral port.
pub fn datagram(to: SocketAddr, payload: &[u8]) -> anyhow::Result<()> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("opening a UDP socket")?;
    match socket.send_to(payload, to) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(e).with_context(|| {
            format!(
                "sending to {to}: a firewall on this machine refuses outgoing UDP to port {}",
                to.port()
            )
        }),
        Err(e) => Err(e).with_context(|| format!("sending to {to}")),
    }
}

/// Sends one TCP SYN to `to` without waiting for an answer: a non-blocking connect that is
/// abandoned (the socket closes when dropped).
pub fn syn(to: SocketAddr) -> anyhow::Result<()> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))
        .context("opening a TCP socket")?;
    socket
        .set_nonblocking(true)
        .context("making the TCP socket non-blocking")?;
    match socket.connect(&to.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("knocking {to}")),
    }
}

/// One knock: a port and whether it is UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knock {
    pub port: u16,
    pub udp: bool,
}

impl std::str::FromStr for Knock {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (port, proto) = text.split_once([':', '/']).unwrap_or((text, "tcp"));
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{text}` is not a port; write 7000, 7000:tcp or 8000:udp"))?;
        let udp = match proto {
            "tcp" => false,
            "udp" => true,
            _ => return Err(format!("`{text}`: protocol is tcp or udp")),
        };
        if port == 0 {
            return Err("port 0 is not a port".into());
        }
        Ok(Self { port, udp })
    }
}

/// Knocks each port in order with `delay` between knocks.
pub fn sequence(host: SocketAddr, knocks: &[Knock], delay: Duration) -> anyhow::Result<()> {
    for (i, knock) in knocks.iter().enumerate() {
        let to = SocketAddr::new(host.ip(), knock.port);
        if knock.udp {
            datagram(to, &[0u8])?;
        } else {
            syn(to)?;
        }
        if i + 1 < knocks.len() {
            std::thread::sleep(delay);
        }
    }
    Ok(())
}
