//! Where packets come from: an AF_PACKET socket with the BPF prefilter (the default; ports
//! stay closed), or a plain UDP socket. Both hand the daemon owned packet bytes with a bounded
//! wait, so the loop can notice signals and timers.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::net::{canonical, Proto};

pub mod bpf;
pub mod frame;

/// One received packet, borrowed from the source's buffer (no copy per packet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received<'a> {
    /// Network-layer bytes (IP header first) from AF_PACKET.
    Ip(&'a [u8]),
    /// A UDP payload from the plain listener, with its source.
    Udp {
        source: IpAddr,
        source_port: u16,
        port: u16,
        payload: &'a [u8],
    },
}

/// A packet source.
pub trait Source {
    /// Waits at most `timeout` for one packet.
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received<'_>>>;
}

/// Sniffs with AF_PACKET (`SOCK_DGRAM`, all protocols) and a BPF prefilter.
#[derive(Debug)]
pub struct AfPacket {
    sockets: Vec<OwnedFd>,
    buf: Vec<u8>,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl AfPacket {
    /// Opens one socket per interface (or one for all when `interfaces` is empty). The filter
    /// is attached before the socket is bound, so no unfiltered packet is ever queued.
    pub fn open(
        interfaces: &[String],
        watches: &[bpf::Watch],
        syn_only: bool,
    ) -> anyhow::Result<Self> {
        let program = match bpf::program(watches, syn_only) {
            Ok(p) => p,
            Err(_) => {
                // Too many ranges: one range per protocol (userspace still filters exactly).
                let mut wide = Vec::new();
                for proto in [Proto::Tcp, Proto::Udp] {
                    let of: Vec<_> = watches.iter().filter(|w| w.proto == proto).collect();
                    if let (Some(lo), Some(hi)) = (
                        of.iter().map(|w| w.low).min(),
                        of.iter().map(|w| w.high).max(),
                    ) {
                        wide.push(bpf::Watch {
                            proto,
                            low: lo,
                            high: hi,
                        });
                    }
                }
                bpf::program(&wide, syn_only)?
            }
        };
        let indexes: Vec<u32> = if interfaces.is_empty() {
            vec![0]
        } else {
            interfaces
                .iter()
                .map(|name| {
                    let c = std::ffi::CString::new(name.as_str())?;
                    // SAFETY: c is a valid NUL-terminated string.
                    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
                    anyhow::ensure!(index != 0, "no interface `{name}`");
                    Ok(index)
                })
                .collect::<anyhow::Result<_>>()?
        };
        let mut sockets = Vec::new();
        for index in indexes {
            // SAFETY: plain socket(2); protocol 0 receives nothing until bind names one.
            let fd = check(unsafe {
                libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
            })
            .map_err(|e| anyhow::anyhow!("AF_PACKET socket: {e} (needs CAP_NET_RAW)"))?;
            // SAFETY: fd is fresh and owned from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let fprog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: Insn is layout-identical to sock_filter; the program outlives the call.
            check(unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    (&fprog as *const libc::sock_fprog).cast(),
                    std::mem::size_of::<libc::sock_fprog>() as u32,
                )
            })?;
            // SAFETY: zeroed sockaddr_ll is a valid value; fields set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = index as i32;
            // SAFETY: addr is a valid sockaddr_ll of the given size.
            check(unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            })?;
            sockets.push(fd);
        }
        Ok(Self {
            sockets,
            buf: vec![0u8; 2048],
        })
    }
}

impl Source for AfPacket {
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received<'_>>> {
        let mut fds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of pollfd for its length.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        for pfd in fds.iter().filter(|p| p.revents & libc::POLLIN != 0) {
            // SAFETY: zeroed sockaddr_ll is valid; recvfrom fills it.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buf and from are valid for writes of the given sizes.
            let n = unsafe {
                libc::recvfrom(
                    pfd.fd,
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                continue;
            }
            // Our own outgoing frames are not requests.
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(Received::Ip(&self.buf[..n as usize])));
        }
        Ok(None)
    }
}

/// A plain UDP listener on the SPA port (dual-stack). It never sends anything.
#[derive(Debug)]
pub struct UdpListener {
    socket: UdpSocket,
    port: u16,
    buf: Vec<u8>,
}

impl UdpListener {
    pub fn open(port: u16) -> io::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))
            .or_else(|_| {
                UdpSocket::bind(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)))
            })?;
        Ok(Self {
            socket,
            port,
            buf: vec![0u8; 2048],
        })
    }
}

impl Source for UdpListener {
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received<'_>>> {
        // A zero timeout polls (the daemon drains a batch that way): no 1 ms wait per batch.
        self.socket.set_nonblocking(timeout.is_zero())?;
        if !timeout.is_zero() {
            self.socket.set_read_timeout(Some(timeout))?;
        }
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, from)) => Ok(Some(Received::Udp {
                source: canonical(from.ip()),
                source_port: from.port(),
                port: self.port,
                payload: &self.buf[..n],
            })),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
