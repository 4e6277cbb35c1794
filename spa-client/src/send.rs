//! Putting packets on the wire: one SPA datagram, or a knock sequence (TCP SYN by a
//! non-blocking connect that is abandoned at once, as knockd's `knock` does; one UDP datagram
//! per UDP port). Unprivileged throughout.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::Context;

/// Address family preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    #[default]
    Any,
    V4,
    V6,
}

/// Resolves `host` to one address of the wanted family.
pub fn resolve(host: &str, port: u16, family: Family) -> anyhow::Result<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    addrs
        .into_iter()
        .find(|a| match family {
            Family::Any => true,
            Family::V4 => a.is_ipv4(),
            Family::V6 => a.is_ipv6(),
        })
        .with_context(|| format!("{host} has no address of the requested family"))
}

/// Sends one UDP datagram from an ephemeral port.
pub fn datagram(to: SocketAddr, payload: &[u8]) -> anyhow::Result<()> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("opening a UDP socket")?;
    socket
        .send_to(payload, to)
        .with_context(|| format!("sending to {to}"))?;
    Ok(())
}

/// Sends one TCP SYN to `to` without waiting for an answer.
pub fn syn(to: SocketAddr) -> anyhow::Result<()> {
    let domain = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); checked below and owned afterwards.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a TCP socket");
    }
    // SAFETY: fd is fresh and owned; dropping it closes the half-open attempt.
    let _owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = sockaddr(to);
    // SAFETY: storage holds a valid sockaddr of length len.
    let rc = unsafe { libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e).with_context(|| format!("knocking {to}"));
        }
    }
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            (storage, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            (storage, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
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
