//! Does this frame count? Only what the host itself would accept on the interface it arrived
//! on: a unicast frame for this host's link-layer address, not inside a foreign VLAN tag,
//! addressed to one of that interface's own IP addresses, with correct checksums. A packet
//! sniffer sees much more (frames for other hosts on a shared segment, other VLANs, packets
//! the kernel forwards or drops); acting on those would let a bystander's or a forger's
//! frame open the door. [`judge`] is a pure function; [`HostAddresses::read`] is the only I/O.

use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::checksum;
use super::frame::{self, Frame};
use super::stats::DropReason;
use crate::net::Proto;

/// `sll_pkttype` values (linux/if_packet.h).
pub const PACKET_HOST: u8 = 0;
pub const PACKET_BROADCAST: u8 = 1;
pub const PACKET_MULTICAST: u8 = 2;
pub const PACKET_OTHERHOST: u8 = 3;
pub const PACKET_OUTGOING: u8 = 4;

/// `tp_status` bits of a ring slot (linux/if_packet.h).
/// The checksum is not filled in yet: the packet came from this host's own stack (or a
/// namespace peer over veth) with checksum offload; the host's stack trusts it.
pub const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
/// The tag in `tp_vlan_tci` is valid.
pub const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
/// The driver or the kernel has already verified the checksum.
pub const TP_STATUS_CSUM_VALID: u32 = 1 << 7;

/// What the kernel reports about one frame besides its bytes (the ring slot's
/// `tpacket2_hdr` and `sockaddr_ll`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub ifindex: u32,
    pub pkttype: u8,
    /// `tp_status` of the slot.
    pub status: u32,
    /// `tp_vlan_tci`: the VLAN tag the kernel stripped, if any.
    pub vlan_tci: u16,
    /// The frame was longer than a ring slot.
    pub truncated: bool,
}

/// This host's IP addresses per interface index, as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddresses {
    by_interface: Vec<(u32, Vec<IpAddr>)>,
    loopback: Vec<u32>,
}

impl HostAddresses {
    /// Builds the table from `(interface index, address)` pairs; frames on a `loopback`
    /// interface may be for any of the host's addresses (local traffic is routed over it).
    pub fn new(addresses: impl IntoIterator<Item = (u32, IpAddr)>, loopback: &[u32]) -> Self {
        let mut by_interface: Vec<(u32, Vec<IpAddr>)> = Vec::new();
        for (index, address) in addresses {
            match by_interface.iter_mut().find(|(i, _)| *i == index) {
                Some((_, list)) if !list.contains(&address) => list.push(address),
                Some(_) => {}
                None => by_interface.push((index, vec![address])),
            }
        }
        Self {
            by_interface,
            loopback: loopback.to_vec(),
        }
    }

    /// Reads the addresses of every interface in this network namespace (`getifaddrs`).
    pub fn read() -> io::Result<Self> {
        let mut names: Vec<(String, u32)> = Vec::new();
        let mut pairs = Vec::new();
        let mut loopback = Vec::new();
        for entry in nix::ifaddrs::getifaddrs()? {
            let Some(storage) = entry.address else {
                continue;
            };
            let address = if let Some(v4) = storage.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = storage.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let index = match names.iter().find(|(n, _)| *n == entry.interface_name) {
                Some((_, index)) => *index,
                None => {
                    // An interface that vanished between the two calls has no addresses.
                    let Ok(index) = nix::net::if_::if_nametoindex(entry.interface_name.as_str())
                    else {
                        continue;
                    };
                    names.push((entry.interface_name.clone(), index));
                    index
                }
            };
            if entry
                .flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
                && !loopback.contains(&index)
            {
                loopback.push(index);
            }
            pairs.push((index, address));
        }
        Ok(Self::new(pairs, &loopback))
    }

    /// Whether `address` is one of `ifindex`'s own addresses (any of the host's, on loopback).
    pub fn owns(&self, ifindex: u32, address: IpAddr) -> bool {
        if self.loopback.contains(&ifindex) {
            return address.is_loopback()
                || self.by_interface.iter().any(|(_, l)| l.contains(&address));
        }
        self.by_interface
            .iter()
            .find(|(i, _)| *i == ifindex)
            .is_some_and(|(_, list)| list.contains(&address))
    }
}

/// What the capture does about its address table at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upkeep {
    Nothing,
    /// Look for address events (one non-blocking `recv`); re-read the table only if any.
    CheckEvents,
    /// Re-read the table.
    Read,
}

/// When to re-read the host's address table (a netlink dump whose cost grows with the number
/// of addresses: 30-200 µs here with 1-256, see `foreign_stream_cost`). A pure schedule: the
/// time is passed in.
///
/// With address events ([`addr_events`](super::addr_events)) the table is re-read when the
/// kernel announces a change: looked for on every tick and, at most every [`Self::ON_MISS`],
/// when a frame names an address not in the table (so an address added a moment ago works
/// before the next tick); plus a safety re-read every [`Self::SAFETY`] while frames arrive,
/// in case an event is ever lost silently. A stream of frames for foreign addresses (a router
/// forwarding traffic to a knock port, or a hostile sender) costs one non-blocking `recv` per
/// [`Self::ON_MISS`], not a re-read.
///
/// Without them (route netlink unavailable) it is re-read on a timer, every [`Self::TIMER`]
/// while frames arrive, and at most every [`Self::ON_MISS`] on a miss.
#[derive(Debug, Clone)]
pub struct RefreshSchedule {
    events: bool,
    checked: Instant,
    read: Instant,
    /// Frames arrived since the last re-read.
    active: bool,
}

impl RefreshSchedule {
    /// A miss looks (or, without events, re-reads) at most this often.
    pub const ON_MISS: Duration = Duration::from_millis(100);
    /// Without events: the timer.
    pub const TIMER: Duration = Duration::from_secs(1);
    /// With events: the safety re-read.
    pub const SAFETY: Duration = Duration::from_secs(60);

    /// A schedule for a table just read at `now`.
    pub fn new(events: bool, now: Instant) -> Self {
        Self {
            events,
            checked: now,
            read: now,
            active: false,
        }
    }

    /// Whether it follows address events (else the timer).
    pub fn follows_events(&self) -> bool {
        self.events
    }

    /// A frame arrived.
    pub fn frame(&mut self) {
        self.active = true;
    }

    /// A frame named an address the table does not have.
    pub fn on_miss(&mut self, now: Instant) -> Upkeep {
        if self.events {
            if now.saturating_duration_since(self.checked) < Self::ON_MISS {
                return Upkeep::Nothing;
            }
            self.checked = now;
            Upkeep::CheckEvents
        } else if now.saturating_duration_since(self.read) >= Self::ON_MISS {
            Upkeep::Read
        } else {
            Upkeep::Nothing
        }
    }

    /// The event loop's tick.
    pub fn on_tick(&mut self, now: Instant) -> Upkeep {
        let every = if self.events {
            Self::SAFETY
        } else {
            Self::TIMER
        };
        if self.active && now.saturating_duration_since(self.read) >= every {
            Upkeep::Read
        } else if self.events {
            self.checked = now;
            Upkeep::CheckEvents
        } else {
            Upkeep::Nothing
        }
    }

    /// The table was re-read at `now`.
    pub fn read_done(&mut self, now: Instant) {
        self.read = now;
        self.checked = now;
        self.active = false;
    }
}

/// Decides whether the host would accept this frame, parsing it on the way. `packet` starts
/// at the IP header (the socket is `SOCK_DGRAM`).
pub fn judge<'a>(
    meta: &Meta,
    packet: &'a [u8],
    hosts: &HostAddresses,
) -> Result<Frame<'a>, DropReason> {
    match meta.pkttype {
        PACKET_HOST => {}
        PACKET_OTHERHOST => return Err(DropReason::OtherHost),
        _ => return Err(DropReason::NotUnicast),
    }
    if meta.truncated {
        return Err(DropReason::Truncated);
    }
    // The kernel strips the tag before the tap. A tagged frame reaches the host's stack only
    // through a VLAN interface of that ID, where the capture sees it again untagged; priority
    // tags (VLAN ID 0) are accepted on the interface itself, as the kernel does.
    if meta.vlan_tci & 0x0fff != 0 {
        return Err(DropReason::ForeignVlan);
    }
    let frame = frame::parse(packet).ok_or(DropReason::Malformed)?;
    if !hosts.owns(meta.ifindex, frame.destination) {
        return Err(DropReason::NotOurAddress);
    }
    if packet[0] >> 4 == 4
        && !checksum::ipv4_header_ok(&packet[..usize::from(packet[0] & 0x0f) * 4])
    {
        return Err(DropReason::BadChecksum);
    }
    let trusted = meta.status & (TP_STATUS_CSUM_VALID | TP_STATUS_CSUMNOTREADY) != 0;
    if !trusted
        && !checksum::transport_ok(
            frame.source,
            frame.destination,
            match frame.proto {
                Proto::Tcp => 6,
                Proto::Udp => 17,
            },
            frame.segment,
        )
    {
        return Err(DropReason::BadChecksum);
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::frame::build;

    const ETH0: u32 = 2;
    const ETH1: u32 = 3;
    const LO: u32 = 1;

    fn hosts() -> HostAddresses {
        HostAddresses::new(
            [
                (LO, "127.0.0.1".parse().unwrap()),
                (ETH0, "203.0.113.1".parse().unwrap()),
                (ETH0, "2001:db8:1::1".parse().unwrap()),
                (ETH1, "192.168.1.1".parse().unwrap()),
            ],
            &[LO],
        )
    }

    fn on_eth0() -> Meta {
        Meta {
            ifindex: ETH0,
            ..Meta::default()
        }
    }

    fn spa(to: &str) -> Vec<u8> {
        let from: IpAddr = if to.contains(':') {
            "2001:db8:1::10".parse().unwrap()
        } else {
            "203.0.113.10".parse().unwrap()
        };
        build::udp(from, to.parse().unwrap(), 40000, 62201, &[7u8; 136])
    }

    #[test]
    fn a_unicast_packet_for_this_interface_with_good_checksums_counts() {
        for to in ["203.0.113.1", "2001:db8:1::1"] {
            let packet = spa(to);
            let frame = judge(&on_eth0(), &packet, &hosts()).unwrap();
            assert_eq!(frame.payload, &[7u8; 136]);
        }
    }

    #[test]
    fn frames_the_host_would_drop_are_dropped_with_their_reason() {
        let h = hosts();
        let good = spa("203.0.113.1");
        let with = |f: fn(&mut Meta)| {
            let mut m = on_eth0();
            f(&mut m);
            judge(&m, &good, &h).map(|_| ())
        };
        assert_eq!(
            with(|m| m.pkttype = PACKET_OTHERHOST),
            Err(DropReason::OtherHost)
        );
        assert_eq!(
            with(|m| m.pkttype = PACKET_BROADCAST),
            Err(DropReason::NotUnicast)
        );
        assert_eq!(
            with(|m| m.pkttype = PACKET_MULTICAST),
            Err(DropReason::NotUnicast)
        );
        assert_eq!(with(|m| m.truncated = true), Err(DropReason::Truncated));
        assert_eq!(
            with(|m| {
                m.status = TP_STATUS_VLAN_VALID;
                m.vlan_tci = 42;
            }),
            Err(DropReason::ForeignVlan)
        );
        assert_eq!(
            with(|m| {
                m.status = TP_STATUS_VLAN_VALID;
                m.vlan_tci = 0x6000; // priority 3, VLAN 0: a priority tag
            }),
            Ok(())
        );
        assert_eq!(
            with(|m| m.ifindex = ETH1),
            Err(DropReason::NotOurAddress),
            "another interface's address"
        );
        let elsewhere = spa("192.0.2.99");
        assert_eq!(
            judge(&on_eth0(), &elsewhere, &h).map(|_| ()),
            Err(DropReason::NotOurAddress)
        );
        assert_eq!(
            judge(&on_eth0(), &good[..30], &h).map(|_| ()),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn checksums_are_verified_unless_the_kernel_vouches_for_them() {
        let h = hosts();
        for to in ["203.0.113.1", "2001:db8:1::1"] {
            let mut bad = spa(to);
            let last = bad.len() - 1;
            bad[last] ^= 0x40;
            assert_eq!(
                judge(&on_eth0(), &bad, &h).map(|_| ()),
                Err(DropReason::BadChecksum)
            );
            for status in [TP_STATUS_CSUM_VALID, TP_STATUS_CSUMNOTREADY] {
                let meta = Meta {
                    status,
                    ..on_eth0()
                };
                assert!(judge(&meta, &bad, &h).is_ok(), "status {status:#x}");
            }
        }
        // IPv4 header checksum.
        let mut bad_header = spa("203.0.113.1");
        bad_header[8] = 1; // TTL changed without fixing the checksum
        assert_eq!(
            judge(&on_eth0(), &bad_header, &h).map(|_| ()),
            Err(DropReason::BadChecksum)
        );
        // IPv6 UDP with a zero checksum is refused; IPv4 accepts "no checksum".
        for (to, want) in [
            ("203.0.113.1", Ok(())),
            ("2001:db8:1::1", Err(DropReason::BadChecksum)),
        ] {
            let mut zero = spa(to);
            let at = if to.contains(':') { 46 } else { 26 };
            zero[at..at + 2].copy_from_slice(&[0, 0]);
            assert_eq!(judge(&on_eth0(), &zero, &h).map(|_| ()), want, "{to}");
        }
        // TCP SYN knocks too.
        let from: IpAddr = "203.0.113.10".parse().unwrap();
        let mut syn = build::tcp(from, "203.0.113.1".parse().unwrap(), 1, 7000, 0x02);
        assert!(judge(&on_eth0(), &syn, &h).is_ok());
        syn[24] ^= 1; // sequence number
        assert_eq!(
            judge(&on_eth0(), &syn, &h).map(|_| ()),
            Err(DropReason::BadChecksum)
        );
    }

    #[test]
    fn ipv6_extension_headers_before_udp_still_count() {
        let packet = build::with_extension(&spa("2001:db8:1::1"), 60, &[1, 4, 0, 0, 0, 0]);
        assert!(judge(&on_eth0(), &packet, &hosts()).is_ok());
    }

    #[test]
    fn loopback_carries_traffic_for_any_local_address() {
        let h = hosts();
        let meta = Meta {
            ifindex: LO,
            ..Meta::default()
        };
        assert!(judge(&meta, &spa("203.0.113.1"), &h).is_ok());
        assert!(judge(&meta, &spa("127.0.0.1"), &h).is_ok());
        assert_eq!(
            judge(&meta, &spa("192.0.2.99"), &h).map(|_| ()),
            Err(DropReason::NotOurAddress)
        );
    }

    #[test]
    fn with_events_a_stream_of_misses_only_looks_for_events_every_100_ms() {
        let start = Instant::now();
        let mut s = RefreshSchedule::new(true, start);
        let mut looks = 0;
        // Ten seconds of frames for a foreign address, one every millisecond.
        for ms in 1..=10_000u64 {
            let now = start + Duration::from_millis(ms);
            s.frame();
            match s.on_miss(now) {
                Upkeep::Nothing => {}
                Upkeep::CheckEvents => looks += 1,
                Upkeep::Read => panic!("a miss never re-reads by itself (at {ms} ms)"),
            }
        }
        assert_eq!(looks, 100);
    }

    #[test]
    fn with_events_the_tick_looks_and_re_reads_only_for_safety() {
        let start = Instant::now();
        let mut s = RefreshSchedule::new(true, start);
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(s.on_tick(at(200)), Upkeep::CheckEvents, "idle: look");
        s.frame();
        assert_eq!(
            s.on_tick(at(400)),
            Upkeep::CheckEvents,
            "frames: still look"
        );
        // A tick's look counts as the miss's look.
        assert_eq!(s.on_miss(at(450)), Upkeep::Nothing);
        assert_eq!(s.on_miss(at(500)), Upkeep::CheckEvents);
        let safety = RefreshSchedule::SAFETY.as_millis() as u64;
        assert_eq!(s.on_tick(at(safety)), Upkeep::Read, "the safety re-read");
        s.read_done(at(safety));
        assert_eq!(
            s.on_tick(at(safety * 3)),
            Upkeep::CheckEvents,
            "no frames since: no safety re-read"
        );
        s.frame();
        assert_eq!(s.on_tick(at(safety * 3)), Upkeep::Read);
    }

    #[test]
    fn without_events_the_old_timer_and_refresh_on_miss_remain() {
        let start = Instant::now();
        let mut s = RefreshSchedule::new(false, start);
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(s.on_miss(at(50)), Upkeep::Nothing, "too soon");
        assert_eq!(s.on_miss(at(100)), Upkeep::Read);
        s.read_done(at(100));
        assert_eq!(s.on_miss(at(150)), Upkeep::Nothing);
        assert_eq!(s.on_tick(at(2000)), Upkeep::Nothing, "idle: no re-read");
        s.frame();
        assert_eq!(s.on_tick(at(1000)), Upkeep::Nothing, "not a second yet");
        assert_eq!(s.on_tick(at(1100)), Upkeep::Read);
        // Ten seconds of misses re-read ten times a second: the cost events remove.
        let mut reads = 0;
        for ms in 1101..=11_100u64 {
            if s.on_miss(at(ms)) == Upkeep::Read {
                reads += 1;
                s.read_done(at(ms));
            }
        }
        assert_eq!(reads, 100);
    }

    #[test]
    fn the_host_table_reads_this_namespace() {
        // Every namespace has a loopback interface with 127.0.0.1 once it is up; the read
        // must at least succeed and list nothing twice.
        let table = HostAddresses::read().unwrap();
        for (_, list) in &table.by_interface {
            let mut sorted = list.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), list.len());
        }
    }
}
