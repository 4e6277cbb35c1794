//! A minimal nfnetlink client: builds messages, sends a batch in one `sendmsg`, reads the
//! acknowledgements. This is the grant hot path: no process is spawned per grant.
//!
//! Message layout: `nlmsghdr (16) | nfgenmsg (4) | attributes (TLV, 4-byte aligned)`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SetSockOpt, SockFlag, SockProtocol,
    SockType,
};
use nix::sys::time::TimeVal;

/// A raw `NETLINK_NETFILTER` socket with these flags.
fn netfilter_socket(flags: SockFlag) -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        flags,
        SockProtocol::NetlinkNetFilter,
    )?)
}

/// Sets one socket option, as an `io::Error` on failure.
fn sockopt_set<O: SetSockOpt>(fd: &OwnedFd, option: O, value: &O::Val) -> io::Result<()> {
    Ok(socket::setsockopt(fd, option, value)?)
}
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub const NFNL_MSG_BATCH_END: u16 = 0x11;

/// A netlink error answer, with the errno the kernel reported.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("kernel refused message {index} of the batch: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { index: usize, errno: i32 },
    #[error("malformed netlink reply")]
    Malformed,
}

impl NetlinkError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Builds one netlink message with nested attributes.
#[derive(Debug)]
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    /// Header for `msg_type` with `flags`; `family` and `res_id` fill the nfgenmsg.
    pub fn new(msg_type: u16, flags: u16, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, patched when sent
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Self {
            buf,
            nests: Vec::new(),
        }
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    /// A NUL-terminated string attribute.
    pub fn attr_str(&mut self, kind: u16, text: &str) -> &mut Self {
        let mut data = Vec::with_capacity(text.len() + 1);
        data.extend_from_slice(text.as_bytes());
        data.push(0);
        self.attr(kind, &data)
    }

    pub fn nest_start(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn nest_end(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("nest_end without nest_start");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished bytes with `seq` filled in.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed nest");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }

    pub fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.buf[6], self.buf[7]])
    }
}

/// A long-lived `NETLINK_NETFILTER` socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    pub fn open() -> io::Result<Self> {
        let fd = netfilter_socket(SockFlag::SOCK_CLOEXEC)?;
        sockopt_set(&fd, sockopt::ReceiveTimeout, &TimeVal::new(2, 0))?;
        // Room for the kernel's acknowledgements of a whole batch of grants (one per message,
        // about 1 KiB each in the socket's accounting): with the default buffer, acks of a few
        // hundred grants overflow it, are dropped, and the transaction waits for its timeout.
        let bytes: usize = 8 << 20;
        if sockopt_set(&fd, sockopt::RcvBufForce, &bytes).is_err() {
            // Without CAP_NET_ADMIN the kernel caps the size at rmem_max: take what it gives.
            let _ = sockopt_set(&fd, sockopt::RcvBuf, &bytes);
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        Ok(Self {
            fd,
            seq: seed,
            buf: vec![0u8; 65536],
        })
    }

    /// Sends one datagram to the kernel.
    fn send(&self, datagram: &[u8]) -> io::Result<()> {
        // Port id 0 is the kernel.
        let kernel = NetlinkAddr::new(0, 0);
        socket::sendto(self.fd.as_raw_fd(), datagram, &kernel, MsgFlags::empty())?;
        Ok(())
    }

    /// Receives one datagram into the socket's buffer; returns its length.
    fn recv(&mut self) -> io::Result<usize> {
        Ok(socket::recv(
            self.fd.as_raw_fd(),
            &mut self.buf,
            MsgFlags::empty(),
        )?)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `messages` in one datagram, optionally wrapped in an nftables batch, and waits for
    /// one acknowledgement per message that asked for one. Any kernel error aborts.
    pub fn transact(
        &mut self,
        messages: Vec<Message>,
        batch_subsys: Option<u16>,
    ) -> Result<(), NetlinkError> {
        let mut datagram = Vec::with_capacity(256);
        let mut expected = Vec::new();
        if let Some(subsys) = batch_subsys {
            let seq = self.next_seq();
            datagram
                .extend(Message::new(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, subsys).finish(seq));
        }
        for message in messages {
            let seq = self.next_seq();
            if message.flags() & NLM_F_ACK != 0 {
                expected.push(seq);
            }
            datagram.extend(message.finish(seq));
        }
        if let Some(subsys) = batch_subsys {
            let seq = self.next_seq();
            datagram.extend(Message::new(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, subsys).finish(seq));
        }
        self.send(&datagram)?;
        let mut acked = 0usize;
        while acked < expected.len() {
            let n = self.recv()?;
            for reply in parse_replies(&self.buf[..n])? {
                let Some(index) = expected.iter().position(|s| *s == reply.seq) else {
                    continue;
                };
                if reply.errno != 0 {
                    return Err(NetlinkError::Kernel {
                        index,
                        errno: reply.errno,
                    });
                }
                acked += 1;
            }
        }
        Ok(())
    }
}

impl Socket {
    /// Sends one dump request and collects the bodies (after the 16-byte `nlmsghdr`) of every
    /// answer until `NLMSG_DONE`. A kernel error (e.g. `ENOENT` for a missing table) aborts.
    pub fn dump(&mut self, message: Message) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let seq = self.next_seq();
        let datagram = message.finish(seq);
        self.send(&datagram)?;
        let mut out = Vec::new();
        // Bounded: a dump of a few hundred thousand elements fits in far fewer datagrams.
        for _ in 0..1_000_000 {
            let n = self.recv()?;
            let mut bytes = &self.buf[..n];
            while bytes.len() >= 16 {
                let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                if len < 16 || len > bytes.len() {
                    return Err(NetlinkError::Malformed);
                }
                let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
                let reply_seq = u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
                if reply_seq == seq {
                    match kind {
                        NLMSG_DONE => return Ok(out),
                        NLMSG_ERROR => {
                            let reply = parse_replies(&bytes[..len])?;
                            match reply.first() {
                                Some(r) if r.errno != 0 => {
                                    return Err(NetlinkError::Kernel {
                                        index: 0,
                                        errno: r.errno,
                                    })
                                }
                                _ => return Ok(out),
                            }
                        }
                        _ => out.push(bytes[16..len].to_vec()),
                    }
                }
                let advance = len.div_ceil(4) * 4;
                bytes = &bytes[advance.min(bytes.len())..];
            }
        }
        Err(NetlinkError::Malformed)
    }
}

/// Receive buffer of the event monitor: the events of several full batches of grants.
const MONITOR_BUFFER: usize = 32 << 20;
/// Most datagrams one [`Monitor::drain`] reads.
const MONITOR_DRAIN: usize = 16_384;

/// A socket subscribed to a netfilter multicast group (e.g. `NFNLGRP_NFTABLES`): the kernel
/// sends it a copy of every committed ruleset change in this network namespace.
#[derive(Debug)]
pub struct Monitor {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Monitor {
    /// Subscribes to `group` (1-32).
    pub fn open(group: u32) -> io::Result<Self> {
        if !(1..=32).contains(&group) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let fd = netfilter_socket(SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)?;
        // Bound with the group in the legacy bitmask (groups 1-32): binding also gives the
        // socket a port id, without which the kernel delivers no multicast to it.
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1 << (group - 1)))?;
        // Room for the events of a whole batch of grants (each grant is three element events,
        // about 1 KiB each in the socket's accounting). With the default ~200 KiB, a batch of a
        // few hundred grants overflowed it: every turn of the loop then saw ENOBUFS and re-read
        // the whole ruleset (a dump of every live grant and an `nft` run) to be safe.
        let bytes: usize = MONITOR_BUFFER;
        if sockopt_set(&fd, sockopt::RcvBufForce, &bytes).is_err() {
            let _ = sockopt_set(&fd, sockopt::RcvBuf, &bytes);
        }
        Ok(Self {
            fd,
            buf: vec![0u8; 65536],
        })
    }

    /// The socket, for the event loop to watch.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Every message queued so far as `(nlmsg type, nlmsg_pid, body after the 16-byte
    /// header)`, without blocking. For nftables events `nlmsg_pid` is the netlink port of the
    /// socket that asked for the change (a process's first socket gets its process id, as seen
    /// in its own pid namespace). `ENOBUFS` means events were lost: the caller must assume
    /// anything changed.
    pub fn drain(&mut self) -> io::Result<Vec<(u16, u32, Vec<u8>)>> {
        let mut out = Vec::new();
        // Bounded: at most this many datagrams per call; the rest waits for the next one.
        // Enough for the events of a full batch of grants, so a busy loop does not fall behind.
        for _ in 0..MONITOR_DRAIN {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            };
            let mut bytes = &self.buf[..n];
            while bytes.len() >= 16 {
                let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                if len < 16 || len > bytes.len() {
                    break;
                }
                let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
                let sender = u32::from_ne_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
                out.push((kind, sender, bytes[16..len].to_vec()));
                let advance = len.div_ceil(4) * 4;
                bytes = &bytes[advance.min(bytes.len())..];
            }
        }
        Ok(out)
    }
}

/// Splits attribute bytes into `(type without flags, payload)` pairs; stops at the first
/// malformed header (a truncated tail is ignored, never read past).
pub fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
        if len < 4 || len > bytes.len() {
            break;
        }
        out.push((kind, &bytes[4..len]));
        let advance = len.div_ceil(4) * 4;
        bytes = &bytes[advance.min(bytes.len())..];
    }
    out
}

/// One acknowledgement or error from the kernel.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub seq: u32,
    pub errno: i32,
}

/// Parses the NLMSG_ERROR replies out of a datagram; other messages are skipped.
pub fn parse_replies(mut bytes: &[u8]) -> Result<Vec<Reply>, NetlinkError> {
    let mut out = Vec::new();
    while bytes.len() >= 16 {
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if len < 16 || len > bytes.len() {
            return Err(NetlinkError::Malformed);
        }
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        let seq = u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if kind == NLMSG_ERROR {
            if len < 20 {
                return Err(NetlinkError::Malformed);
            }
            let error = i32::from_ne_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
            // The kernel sends 0 (ack) or a negative errno; anything else is not a reply.
            let errno = error
                .checked_neg()
                .filter(|e| *e >= 0)
                .ok_or(NetlinkError::Malformed)?;
            out.push(Reply { seq, errno });
        } else if kind == NLMSG_DONE {
            out.push(Reply { seq, errno: 0 });
        }
        let advance = len.div_ceil(4) * 4;
        bytes = &bytes[advance.min(bytes.len())..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With CAP_NET_ADMIN (the daemon keeps it) the monitor gets its whole buffer, past
    /// `rmem_max`: the events of a batch of grants must fit. Without root there is nothing to
    /// check (the kernel caps the size), so the test says so and passes.
    #[test]
    fn the_monitor_has_room_for_a_batch_of_grants_events() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs CAP_NET_ADMIN");
            return;
        }
        let monitor = Monitor::open(7).unwrap();
        let size = socket::getsockopt(&monitor.fd, sockopt::RcvBuf).unwrap();
        // The kernel reports twice what was set (its bookkeeping overhead).
        assert!(size >= MONITOR_BUFFER, "{size}");
    }

    #[test]
    fn message_layout_and_nesting() {
        let mut m = Message::new(0x0a0c, NLM_F_REQUEST | NLM_F_ACK, 1, 0);
        m.attr_str(1, "spad")
            .nest_start(3)
            .attr(1, &[1, 2, 3, 4, 5])
            .nest_end();
        let bytes = m.finish(7);
        assert_eq!(bytes.len(), 16 + 4 + 12 + (4 + 12));
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 7);
        // nested attribute: header len 16 (4 + 8 padded child) with NLA_F_NESTED
        assert_eq!(
            u16::from_ne_bytes(bytes[32..34].try_into().unwrap()),
            4 + 12
        );
        assert_eq!(
            u16::from_ne_bytes(bytes[34..36].try_into().unwrap()),
            3 | NLA_F_NESTED
        );
    }

    #[test]
    fn attributes_round_trip_and_truncation_stops() {
        let mut m = Message::new(0, 0, 0, 0);
        m.attr_str(1, "spad")
            .nest_start(3)
            .attr(1, &[9; 5])
            .nest_end();
        let bytes = m.finish(1);
        let attrs = attributes(&bytes[20..]);
        assert_eq!(attrs[0], (1, &b"spad\0"[..]));
        assert_eq!(attrs[1].0, 3);
        assert_eq!(attributes(attrs[1].1), vec![(1, &[9u8; 5][..])]);
        assert_eq!(attributes(&bytes[20..bytes.len() - 3]).len(), 1);
        assert!(attributes(&[0xff, 0xff, 1, 0]).is_empty());
    }

    #[test]
    fn replies_parse_and_garbage_is_an_error() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-2i32).to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        assert_eq!(
            parse_replies(&ack).unwrap(),
            vec![Reply { seq: 5, errno: 2 }]
        );
        let mut bad = ack.clone();
        bad[0] = 200;
        assert!(parse_replies(&bad).is_err());
        assert!(parse_replies(&[1, 2, 3]).unwrap().is_empty());
        // Found by the netlink_replies fuzz target: i32::MIN in the error field overflowed.
        let mut odd = ack.clone();
        odd[16..20].copy_from_slice(&i32::MIN.to_ne_bytes());
        assert!(parse_replies(&odd).is_err());
        odd[16..20].copy_from_slice(&5i32.to_ne_bytes());
        assert!(parse_replies(&odd).is_err());
    }
}
