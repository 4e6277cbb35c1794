//! Capture counters: why each captured frame was dropped before the daemon saw it, and the
//! kernel's own counts for the capture sockets (`PACKET_STATISTICS`). Shown on exit and
//! whenever the kernel reports new drops.

use std::fmt;
use std::time::{Duration, Instant};

use super::Source;

/// Why the capture dropped a frame that passed the kernel prefilter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// `PACKET_OTHERHOST`: sent to another machine's link-layer address.
    OtherHost,
    /// Broadcast or multicast at the link layer: the SPA port and knocks are unicast.
    NotUnicast,
    /// Inside a VLAN tag: the host only accepts it on a VLAN interface of its own, where
    /// the capture sees it untagged.
    ForeignVlan,
    /// Longer than a ring slot (1 KiB, or 2 KiB with fwknop clients configured: no SPA
    /// packet, knock or fwknop packet is).
    Truncated,
    /// Not a well-formed IPv4/IPv6 UDP or TCP packet the host would deliver locally.
    Malformed,
    /// Addressed to an IP address that is not one of this interface's own.
    NotOurAddress,
    /// Wrong IPv4 header, UDP or TCP checksum (or a zero UDP checksum over IPv6).
    BadChecksum,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::OtherHost,
        DropReason::NotUnicast,
        DropReason::ForeignVlan,
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::NotOurAddress,
        DropReason::BadChecksum,
    ];

    /// The stable name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::OtherHost => "other-host",
            DropReason::NotUnicast => "not-unicast",
            DropReason::ForeignVlan => "foreign-vlan",
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::NotOurAddress => "not-our-address",
            DropReason::BadChecksum => "bad-checksum",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one packet source since it was opened.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CaptureStats {
    /// Frames read from the sockets (own outgoing frames excluded).
    pub received: u64,
    /// Frames handed to the daemon.
    pub delivered: u64,
    /// Frames dropped in userspace, by [`DropReason`] (indexed in [`DropReason::ALL`] order).
    dropped: [u64; DropReason::ALL.len()],
    /// Frames the kernel passed through the prefilter (`tp_packets`, summed over sockets).
    pub kernel_packets: u64,
    /// Frames the kernel dropped because the socket's receive queue was full (`tp_drops`).
    pub kernel_drops: u64,
    /// Frames the kernel's filter dropped because their source was over its packet budget
    /// (`packet-rate`, `packet-burst`; AF_PACKET with the eBPF prefilter only), since the
    /// program was loaded. The daemon loads one program for its life and every capture
    /// attaches it ([`program`](super::program)), so this is the program's running total, not
    /// one capture's: [`add`](Self::add) keeps the larger reading instead of summing.
    pub kernel_source_limited: u64,
    /// The per-source packet budget is loaded in the kernel (a state, not a count).
    pub kernel_budget: bool,
    /// The budget is being enforced now: spad fell behind (a state).
    pub budget_engaged: bool,
    /// Times the budget was engaged.
    pub budget_engagements: u64,
    /// Times the host's address table was read (AF_PACKET; the first read included).
    pub address_reads: u64,
    /// The address table is re-read on a timer because the kernel's address events could not
    /// be subscribed to (AF_PACKET; see [`host::RefreshSchedule`](super::host::RefreshSchedule)).
    pub address_timer: bool,
}

impl CaptureStats {
    pub fn count(&mut self, reason: DropReason) {
        self.dropped[reason.index()] += 1;
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    /// Adds `other`'s counts (a source replaced on reload keeps counting in the totals).
    pub fn add(&mut self, other: &CaptureStats) {
        self.received += other.received;
        self.delivered += other.delivered;
        self.kernel_packets += other.kernel_packets;
        self.kernel_drops += other.kernel_drops;
        // The one program's running total (see the field): the later reading holds the
        // earlier one; a capture without the program reads 0.
        self.kernel_source_limited = self.kernel_source_limited.max(other.kernel_source_limited);
        self.kernel_budget = other.kernel_budget;
        self.budget_engaged = other.budget_engaged;
        self.budget_engagements += other.budget_engagements;
        self.address_reads += other.address_reads;
        // A state, not a count: the source added last is the one running.
        self.address_timer = other.address_timer;
        for (mine, theirs) in self.dropped.iter_mut().zip(other.dropped) {
            *mine += theirs;
        }
    }

    /// All userspace drops.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

impl fmt::Display for CaptureStats {
    /// `received=… delivered=… kernel-drops=… other-host=… … address-reads=…` (one
    /// `key=value` per counter), then `address-events=unavailable` when the address table
    /// follows a timer instead of the kernel's events.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received={} delivered={} kernel-packets={} kernel-drops={}",
            self.received, self.delivered, self.kernel_packets, self.kernel_drops
        )?;
        if self.kernel_budget || self.kernel_source_limited > 0 {
            write!(
                f,
                " kernel-source-limited={} budget-engagements={}{}",
                self.kernel_source_limited,
                self.budget_engagements,
                if self.budget_engaged {
                    " budget=engaged"
                } else {
                    ""
                }
            )?;
        }
        for reason in DropReason::ALL {
            write!(f, " {}={}", reason.name(), self.dropped(reason))?;
        }
        write!(f, " address-reads={}", self.address_reads)?;
        if self.address_timer {
            write!(f, " address-events=unavailable")?;
        }
        Ok(())
    }
}

/// Watches a source's kernel drop counter from the daemon loop: at most once per
/// [`DropWatch::EVERY`], a warning line when the kernel dropped frames since the last look.
/// It also says, once, when the capture's address table follows a timer because the
/// kernel's address events could not be subscribed to.
#[derive(Debug, Default)]
pub struct DropWatch {
    last_check: Option<Instant>,
    kernel_drops: u64,
    said_address_timer: bool,
}

impl DropWatch {
    pub const EVERY: Duration = Duration::from_secs(10);

    /// Reads the counters if it is time; `Some(line)` when there are new kernel drops.
    pub fn check(&mut self, source: &mut dyn Source, now: Instant) -> Option<String> {
        if self
            .last_check
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            return None;
        }
        self.last_check = Some(now);
        let stats = source.stats();
        let new = stats.kernel_drops.checked_sub(self.kernel_drops);
        self.kernel_drops = stats.kernel_drops;
        match new {
            Some(0) | None if stats.address_timer && !self.said_address_timer => {
                self.said_address_timer = true;
                Some(
                    "warning: capture: the kernel's address events (route netlink) are \
                     unavailable: this host's addresses are re-read once a second while frames \
                     arrive and on a frame for an unknown address"
                        .to_string(),
                )
            }
            Some(0) | None => None,
            Some(n) => Some(format!(
                "warning: capture: the kernel dropped {n} frames (receive queue full); {stats}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_name() {
        let mut stats = CaptureStats::default();
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i);
            for _ in 0..=i {
                stats.count(reason);
            }
        }
        let text = stats.to_string();
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(stats.dropped(reason), i as u64 + 1);
            assert!(
                text.contains(&format!(" {}={}", reason.name(), i + 1)),
                "{text}"
            );
        }
        assert_eq!(stats.dropped_total(), 28);
        let mut total = stats.clone();
        total.add(&stats);
        assert_eq!(total.dropped(DropReason::BadChecksum), 14);
        assert_eq!(total.dropped_total(), 56);
    }

    /// A capture replaced on reload shares the one program, and its counter, with the
    /// capture that replaced it: the totals count each cut frame once.
    #[test]
    fn the_shared_programs_cuts_are_counted_once_across_a_reload() {
        let reading = |limited| CaptureStats {
            kernel_source_limited: limited,
            received: 10,
            ..CaptureStats::default()
        };
        // The retired capture saw 40 cut; 15 more were cut since, 55 read by the new capture.
        let mut total = CaptureStats::default();
        total.add(&reading(40));
        total.add(&reading(55));
        assert_eq!(total.kernel_source_limited, 55, "{total}");
        assert_eq!(total.received, 20, "the captures' own counts still add up");
        // A capture without the program (the classic prefilter) reads 0: nothing is lost.
        total.add(&reading(0));
        assert_eq!(total.kernel_source_limited, 55, "{total}");
    }

    struct Fake(u64, bool);
    impl Source for Fake {
        fn recv(&mut self, _: Duration) -> std::io::Result<Option<crate::capture::Received<'_>>> {
            Ok(None)
        }
        fn wake_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
            Vec::new()
        }
        fn stats(&mut self) -> CaptureStats {
            CaptureStats {
                kernel_drops: self.0,
                address_timer: self.1,
                ..CaptureStats::default()
            }
        }
    }

    #[test]
    fn an_address_table_on_the_timer_is_said_once() {
        let start = Instant::now();
        let mut watch = DropWatch::default();
        let mut source = Fake(0, true);
        let line = watch.check(&mut source, start).unwrap();
        assert!(line.starts_with("warning: capture:"), "{line}");
        assert!(line.contains("address events"), "{line}");
        source.0 = 3;
        let drops = watch.check(&mut source, start + DropWatch::EVERY).unwrap();
        assert!(drops.contains("dropped 3 frames"), "{drops}");
        assert_eq!(watch.check(&mut source, start + DropWatch::EVERY * 2), None);
        let mut events = Fake(0, false);
        assert_eq!(DropWatch::default().check(&mut events, start), None);
    }

    #[test]
    fn new_kernel_drops_are_reported_once_per_interval() {
        let start = Instant::now();
        let mut watch = DropWatch::default();
        let mut source = Fake(0, false);
        assert_eq!(watch.check(&mut source, start), None);
        source.0 = 5;
        assert_eq!(
            watch.check(&mut source, start + Duration::from_secs(1)),
            None,
            "too soon"
        );
        let line = watch.check(&mut source, start + DropWatch::EVERY).unwrap();
        assert!(line.contains("dropped 5 frames"), "{line}");
        assert_eq!(
            watch.check(&mut source, start + DropWatch::EVERY * 2),
            None,
            "no new drops"
        );
    }
}
