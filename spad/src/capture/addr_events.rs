//! Tells the capture when this host's IP addresses may have changed, so the address table
//! ([`HostAddresses`](super::host::HostAddresses)) is re-read only then instead of on a timer
//! and on every frame for a foreign address. A `NETLINK_ROUTE` socket subscribed to the
//! kernel's IPv4 and IPv6 address groups receives one message per change; [`AddressEvents::changed`]
//! drains it without blocking and answers one question: did anything happen since the last
//! call? It never says "no" when it cannot be sure: lost events (`ENOBUFS`), any socket error
//! and any message it cannot parse count as a change. [`announces_change`] is the pure part.
//!
//! A message that is not from the kernel (another process may be allowed to send to these
//! groups) can only cause an extra re-read, never hide a change.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

/// `nlmsghdr` is 16 bytes: length (u32), type (u16), flags (u16), sequence, port id.
const HEADER: usize = 16;

/// Message types (linux/netlink.h, linux/rtnetlink.h).
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;

/// Multicast groups (linux/rtnetlink.h): an IPv4 or an IPv6 address is added or removed.
///
/// The link group (`RTNLGRP_LINK`) is left out on purpose: the table is keyed by interface
/// index, and an index never changes while an interface lives; an interface that goes away
/// takes its addresses with it and the kernel sends an `RTM_DELADDR` for each (checked on
/// 6.18 with `ip monitor address` and `ip link del`), and a new one's addresses arrive as
/// `RTM_NEWADDR`. Link events (carrier changes, wireless notices) would only add re-reads.
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
/// The legacy bitmask of the groups subscribed to (`RTMGRP_*` = 1 << (`RTNLGRP_*` - 1)).
const GROUPS: u32 = group_bit(RTNLGRP_IPV4_IFADDR) | group_bit(RTNLGRP_IPV6_IFADDR);

const fn group_bit(group: u32) -> u32 {
    1 << (group - 1)
}

/// Receive buffer asked for: hundreds of events (each is accounted as about 1 KiB) between
/// two looks. When it overflows anyway the kernel says so (`ENOBUFS`): a change, re-read.
const BUFFER: usize = 1 << 20;
/// Most datagrams one [`AddressEvents::changed`] reads: bounded work per call.
const DRAIN: usize = 1024;

/// A subscription to this network namespace's address events.
#[derive(Debug)]
pub struct AddressEvents {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl AddressEvents {
    /// Subscribes. Fails where route netlink is not available (a restricted sandbox); the
    /// caller then re-reads on a timer instead. Open it *before* the first read of the table,
    /// so no change between that read and the subscription goes unseen.
    pub fn open() -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )?;
        // Binding with the groups also gives the socket a port id, without which the kernel
        // delivers no multicast to it.
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, GROUPS))?;
        // The forced size needs CAP_NET_ADMIN (which spad keeps); otherwise the plain one,
        // capped by net.core.rmem_max. Either way an overflow is reported, never silent.
        if socket::setsockopt(&fd, sockopt::RcvBufForce, &BUFFER).is_err() {
            let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &BUFFER);
        }
        Ok(Self {
            fd,
            buf: vec![0u8; 16 << 10],
        })
    }

    /// Whether an address event (or a lost event, or a socket error) arrived since the last
    /// call. Never blocks: one `recv` that finds nothing when nothing happened.
    pub fn changed(&mut self) -> bool {
        let mut changed = false;
        for _ in 0..DRAIN {
            match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => changed |= announces_change(&self.buf[..n]),
                Err(Errno::EAGAIN) => return changed,
                Err(Errno::EINTR) => {}
                // The kernel dropped events because the buffer was full: unknown changes.
                // What is still queued is read on, so the next call does not re-read again.
                Err(Errno::ENOBUFS) => changed = true,
                // Anything else: the socket cannot be trusted to have told us everything.
                Err(_) => return true,
            }
        }
        // More may be waiting: assume the worst, the rest is read next time.
        true
    }
}

/// Whether one datagram from the socket announces a change of this host's addresses (a link
/// message, should one arrive, counts too). Anything malformed (a truncated header, a length past the end, trailing
/// bytes) counts as a change: never a panic, never a missed change.
pub fn announces_change(mut datagram: &[u8]) -> bool {
    if datagram.is_empty() {
        return true;
    }
    let mut changed = false;
    while !datagram.is_empty() {
        let Some(header) = datagram.get(..HEADER) else {
            return true;
        };
        let length = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        if length < HEADER || length > datagram.len() {
            return true;
        }
        changed |= match kind {
            RTM_NEWADDR | RTM_DELADDR | RTM_NEWLINK | RTM_DELLINK => true,
            // An error or overrun report from the kernel: something may have been lost.
            NLMSG_ERROR | NLMSG_OVERRUN => true,
            NLMSG_NOOP | NLMSG_DONE => false,
            // Route, neighbour and other messages of groups not subscribed to.
            _ => false,
        };
        // Messages are padded to 4 bytes; the last one may end without padding.
        let advance = length.div_ceil(4) * 4;
        datagram = datagram.get(advance..).unwrap_or(&[]);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTM_NEWROUTE: u16 = 24;
    const RTM_NEWNEIGH: u16 = 28;

    /// One message of `kind` with `body` (an `ifaddrmsg` and attributes in real life).
    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((HEADER + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(m.len().div_ceil(4) * 4, 0);
        m
    }

    /// An `ifaddrmsg` for 192.0.2.1/24 on interface 3 with its IFA_ADDRESS attribute.
    fn ifaddr() -> Vec<u8> {
        let mut b = vec![2, 24, 0, 0];
        b.extend_from_slice(&3u32.to_ne_bytes());
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes());
        b.extend_from_slice(&[192, 0, 2, 1]);
        b
    }

    #[test]
    fn the_group_mask_is_the_kernels_rtmgrp_bits() {
        // RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR (linux/rtnetlink.h).
        assert_eq!(GROUPS, 0x10 | 0x100);
    }

    #[test]
    fn address_and_link_messages_are_changes() {
        for kind in [RTM_NEWADDR, RTM_DELADDR, RTM_NEWLINK, RTM_DELLINK] {
            assert!(announces_change(&message(kind, &ifaddr())), "type {kind}");
        }
    }

    #[test]
    fn unrelated_messages_are_not() {
        for kind in [NLMSG_NOOP, NLMSG_DONE, RTM_NEWROUTE, RTM_NEWNEIGH, 0x7fff] {
            assert!(!announces_change(&message(kind, &[1, 2, 3])), "type {kind}");
        }
        let mut two = message(RTM_NEWROUTE, &[0; 12]);
        two.extend(message(NLMSG_DONE, &[]));
        assert!(!announces_change(&two));
    }

    #[test]
    fn kernel_error_and_overrun_reports_are_changes() {
        assert!(announces_change(&message(NLMSG_ERROR, &[0; 4])));
        assert!(announces_change(&message(NLMSG_OVERRUN, &[])));
    }

    #[test]
    fn one_change_among_several_messages_is_seen() {
        let mut datagram = message(RTM_NEWROUTE, &[0; 12]);
        datagram.extend(message(RTM_DELADDR, &ifaddr()));
        datagram.extend(message(RTM_NEWNEIGH, &[0; 5]));
        assert!(announces_change(&datagram));
    }

    #[test]
    fn truncated_or_garbage_bytes_count_as_a_change() {
        let good = message(RTM_NEWROUTE, &[0; 12]);
        assert!(!announces_change(&good));
        assert!(announces_change(&[]), "empty");
        for cut in 1..good.len() {
            assert!(announces_change(&good[..cut]), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[1, 2, 3]);
        assert!(announces_change(&trailing), "trailing bytes");
        let mut too_long = good.clone();
        too_long[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(announces_change(&too_long), "length past the end");
        let mut too_short = good.clone();
        too_short[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(announces_change(&too_short), "length below a header");
        assert!(announces_change(&[0xff; 64]), "garbage");
        let mut huge = good;
        huge[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(announces_change(&huge), "length u32::MAX");
    }

    #[test]
    fn the_last_message_may_end_without_padding() {
        let mut m = message(RTM_NEWROUTE, &[0; 5]);
        m.truncate(HEADER + 5);
        assert!(!announces_change(&m));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = announces_change(&bytes);
        }

        #[test]
        fn a_change_is_never_hidden_by_what_follows(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let mut datagram = message(RTM_NEWADDR, &ifaddr());
            datagram.extend(tail);
            proptest::prop_assert!(announces_change(&datagram));
        }
    }

    /// Opening needs nothing special (any process may listen to these groups), and with
    /// nothing happening the first look says "no change" without blocking.
    #[test]
    fn a_fresh_subscription_opens_and_does_not_block() {
        let mut events = AddressEvents::open().unwrap();
        let start = std::time::Instant::now();
        let _ = events.changed();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
