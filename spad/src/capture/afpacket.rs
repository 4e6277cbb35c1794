//! The AF_PACKET source: one capture socket per interface, each with a receive ring the
//! kernel fills ([`ring`](super::ring): no system call, no copy and no timeout per frame),
//! served in turn, at most [`BATCH`] frames per ring per turn, so a flood on one interface
//! cannot starve the others; and judged by [`host::judge`], so only frames the host itself
//! would accept reach the daemon. Every frame dropped here is counted by reason. The
//! host's address table is re-read when the kernel announces a change
//! ([`addr_events`](super::addr_events), [`RefreshSchedule`]), not per frame.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::addr_events::AddressEvents;
use super::ebpf::{Limiter, Ports, SourceBudget};
use super::host::{self, HostAddresses, RefreshSchedule, Upkeep, PACKET_OUTGOING};
use super::pressure::Pressure;
use super::ring::{Ring, SlotSize};
use super::stats::{CaptureStats, DropReason};
use super::{bpf, socket, Received, Source};
use crate::net::Proto;

/// Frames taken from one ring before the next ring gets its turn.
pub const BATCH: usize = 64;

/// Sniffs with AF_PACKET (`SOCK_DGRAM`, all protocols), a BPF prefilter and receive rings.
#[derive(Debug)]
pub struct AfPacket {
    rings: Vec<Ring>,
    rotation: Rotation,
    /// The ring whose head frame was handed out by the last `recv` (released by the next).
    held: Option<usize>,
    hosts: HostAddresses,
    /// The kernel's address events; `None` where they cannot be subscribed to (the table is
    /// then re-read on a timer).
    events: Option<AddressEvents>,
    schedule: RefreshSchedule,
    /// The last re-read failed: the next look re-reads even without a new event.
    read_failed: bool,
    stats: CaptureStats,
    /// The kernel's per-source budget, when it could be loaded (see [`ebpf`](super::ebpf)):
    /// the daemon's one program ([`program`](super::program)), shared with the captures
    /// opened before and after this one.
    limiter: Option<Arc<Limiter>>,
    /// Why the budget asked for is not in force, when it is not.
    limiter_refused: Option<String>,
    /// Whether a budget is configured (a reload can turn it off without a new program).
    budget_on: bool,
    /// When the budget is enforced: only while spad is falling behind.
    pressure: Pressure,
    /// Frames taken since the backlog was last looked at.
    since_backlog_look: usize,
    /// Ring drops already taken as a sign of pressure.
    drops_seen: u64,
    /// The program could not be attached to every ring (those have the classic filter).
    attach_failed: bool,
}

/// A ring with this many frames waiting means spad is falling behind: the per-source budget
/// is engaged ([`Pressure`]). A quarter of the ring: the rest still holds several
/// milliseconds of any flood while the budget takes hold.
pub const BACKLOG: usize = super::ring::FRAMES / 4;
/// Which kernel prefilter a capture gets.
#[derive(Debug, Clone)]
pub enum Prefilter {
    /// The classic program only: no eBPF, no budget.
    Classic,
    /// The eBPF program (the daemon's one, [`OneProgram`](super::program::OneProgram)), or
    /// why the kernel refused it (the capture then gets the classic one), with this budget.
    /// `None`: attached without a budget, so a reload can add one, or move ports, in place.
    /// The capture writes its ports, its budget and a released flag into the program's
    /// control map as it opens: from then on it owns them.
    Ebpf(Result<Arc<Limiter>, String>, Option<SourceBudget>),
}

impl Prefilter {
    /// The eBPF prefilter with a program of its own, loaded now (tests).
    #[cfg(test)]
    pub(crate) fn own_ebpf(budget: Option<SourceBudget>) -> Self {
        let program = super::program::OneProgram::default()
            .get()
            .map_err(|e| e.to_string());
        Self::Ebpf(program, budget)
    }
}

/// Frames taken between two looks at the backlog (one atomic load each).
const BACKLOG_LOOK_EVERY: usize = 64;

/// Fair service across rings: up to [`BATCH`] frames from the current ring, then the next
/// ring that has a frame waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    rings: usize,
    current: usize,
    served: usize,
}

impl Rotation {
    pub fn new(rings: usize) -> Self {
        Self {
            rings,
            current: 0,
            served: 0,
        }
    }

    /// The ring to take the next frame from, given which rings have one waiting.
    pub fn pick(&mut self, waiting: impl Fn(usize) -> bool) -> Option<usize> {
        if self.rings == 0 {
            return None;
        }
        for _ in 0..=self.rings {
            if self.served < BATCH && waiting(self.current) {
                self.served += 1;
                return Some(self.current);
            }
            self.current = (self.current + 1) % self.rings;
            self.served = 0;
        }
        None
    }
}

impl AfPacket {
    /// Opens one socket per interface (or one for all when `interfaces` is empty), each with
    /// a ring of `slot`-sized slots. The filter and the ring are set up before the socket is
    /// bound, so no unfiltered packet is ever queued and none lands outside the ring.
    pub fn open(
        interfaces: &[String],
        watches: &[bpf::Watch],
        syn_only: bool,
        slot: SlotSize,
        prefilter: Prefilter,
    ) -> anyhow::Result<Self> {
        // Subscribed before the table is first read, so no change in between goes unseen.
        Self::open_with(
            interfaces,
            watches,
            syn_only,
            slot,
            prefilter,
            AddressEvents::open().ok(),
        )
    }

    /// [`open`](Self::open) with the address events given (`None`: the timer).
    fn open_with(
        interfaces: &[String],
        watches: &[bpf::Watch],
        syn_only: bool,
        slot: SlotSize,
        prefilter: Prefilter,
        events: Option<AddressEvents>,
    ) -> anyhow::Result<Self> {
        let (ebpf, budget) = match prefilter {
            Prefilter::Classic => (None, None),
            Prefilter::Ebpf(ebpf, budget) => (Some(ebpf), budget),
        };
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
                    nix::net::if_::if_nametoindex(name.as_str())
                        .map_err(|_| anyhow::anyhow!("no interface `{name}`"))
                })
                .collect::<anyhow::Result<_>>()?
        };
        // Attached even with `packet-rate = 0` (the budget then stays off): a reload that
        // turns a budget on later, or changes ports, is then a memory write, also after the
        // privilege drop. Only a refusal of a budget asked for is reported.
        let (mut limiter, mut limiter_refused) = match ebpf {
            None => (None, None),
            Some(Ok(limiter)) => (Some(limiter), None),
            Some(Err(e)) => (None, budget.map(|_| e)),
        };
        // This capture's ports and budget, before any socket can pass a frame through the
        // program. The program is shared, so a capture still running (the one a reload
        // replaces) sees them too from here on: a reload opens the new capture with the
        // union of the old and the new ports, and narrows them once it took effect
        // ([`retire`](super::retire)). The engaged flag stays the running capture's until
        // then (a flood being cut goes on being cut); the program starts released.
        if let Some(l) = &limiter {
            l.set_ports(&Ports::new(watches, syn_only));
            if let Some(budget) = budget {
                l.set_budget(budget);
            }
        }
        let mut rings = Vec::new();
        let mut attach_failed = false;
        for index in indexes {
            let ring = socket::create(&program)
                .inspect(|socket| {
                    // Replaces the classic filter before the socket is bound. A refusal
                    // here (on the first socket) falls back to the classic filter, which
                    // the socket still has.
                    if let Some(l) = &limiter {
                        if let Err(e) = l.attach(socket) {
                            attach_failed = true;
                            if budget.is_some() {
                                limiter_refused = Some(format!("attaching the program: {e}"));
                            }
                            if rings.is_empty() {
                                limiter = None;
                            }
                        }
                    }
                })
                .and_then(|socket| Ring::new(socket, slot))
                .and_then(|ring| socket::bind(ring.socket(), index).map(|()| ring))
                .map_err(|e| anyhow::anyhow!("AF_PACKET socket: {e} (needs CAP_NET_RAW)"))?;
            rings.push(ring);
        }
        let hosts = HostAddresses::read()
            .map_err(|e| anyhow::anyhow!("reading this host's addresses: {e}"))?;
        let mut stats = CaptureStats::default();
        stats.address_reads = 1;
        stats.address_timer = events.is_none();
        Ok(Self {
            limiter,
            limiter_refused,
            budget_on: budget.is_some(),
            pressure: Pressure::new(),
            since_backlog_look: 0,
            drops_seen: 0,
            attach_failed,
            rotation: Rotation::new(rings.len()),
            rings,
            held: None,
            hosts,
            schedule: RefreshSchedule::new(events.is_some(), Instant::now()),
            stats,
            events,
            read_failed: false,
        })
    }

    /// Whether the address table follows the kernel's address events (else a timer).
    pub fn follows_address_events(&self) -> bool {
        self.schedule.follows_events()
    }

    /// Does what the schedule asks; returns whether the table was re-read.
    fn upkeep(&mut self, what: Upkeep) -> bool {
        let read = match what {
            Upkeep::Nothing => false,
            Upkeep::CheckEvents => {
                // Drained even after a failed read, so old events do not linger.
                let changed = self.events.as_mut().is_some_and(|e| e.changed());
                changed || self.read_failed
            }
            Upkeep::Read => {
                // What is queued now is covered by this read.
                if let Some(events) = &mut self.events {
                    events.changed();
                }
                true
            }
        };
        if read {
            self.stats.address_reads += 1;
            match HostAddresses::read() {
                Ok(hosts) => {
                    self.hosts = hosts;
                    self.read_failed = false;
                }
                // The old table stays; the next look tries again.
                Err(_) => self.read_failed = true,
            }
            self.schedule.read_done(Instant::now());
        }
        read
    }

    /// Waits up to `timeout` for any ring to have a frame.
    fn poll(&mut self, timeout: Duration) -> io::Result<()> {
        let mut fds: Vec<PollFd<'_>> = self
            .rings
            .iter()
            .map(|r| PollFd::new(r.socket().as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// spad is falling behind: the budget is engaged (when one is configured and loaded).
    fn behind(&mut self) {
        if self.budget_on && self.limiter.is_some() {
            self.pressure.behind(Instant::now());
            self.sync_flag();
        }
    }

    /// Writes the kernel's flag from the one state it follows: a budget configured, and
    /// engaged. A memory write; done on every change and every tick, so the kernel's flag
    /// and spad's state cannot disagree for longer than a tick.
    fn sync_flag(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.set_engaged(self.budget_on && self.pressure.engaged());
        }
    }

    /// Finds the next frame the host would accept, releasing and counting the others.
    /// Returns the ring it is in (its head frame), or `None` when no ring has one.
    fn next_accepted(&mut self) -> Option<usize> {
        loop {
            let rings = &self.rings;
            let index = self.rotation.pick(|i| rings[i].ready())?;
            self.since_backlog_look += 1;
            if self.since_backlog_look >= BACKLOG_LOOK_EVERY {
                self.since_backlog_look = 0;
                if self.rings[index].backlog_at_least(BACKLOG) {
                    self.behind();
                }
            }
            let Some((meta, packet)) = self.rings[index].peek() else {
                continue;
            };
            if meta.pkttype == PACKET_OUTGOING {
                self.rings[index].release(); // our own frames: not received
                continue;
            }
            self.stats.received += 1;
            self.schedule.frame();

            let mut verdict = host::judge(&meta, packet, &self.hosts).map(|_| ());
            if verdict == Err(DropReason::NotOurAddress) {
                // An address added a moment ago works before the next tick. With events this
                // is a non-blocking look at most every 100 ms; the re-read only follows a change.
                let what = self.schedule.on_miss(Instant::now());
                if self.upkeep(what) {
                    let (meta, packet) = match self.rings[index].peek() {
                        Some(frame) => frame,
                        None => continue,
                    };
                    verdict = host::judge(&meta, packet, &self.hosts).map(|_| ());
                }
            }
            match verdict {
                Ok(()) => {
                    self.stats.delivered += 1;
                    return Some(index);
                }
                Err(reason) => {
                    self.stats.count(reason);
                    self.rings[index].release();
                }
            }
        }
    }
}

impl Source for AfPacket {
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received<'_>>> {
        if let Some(index) = self.held.take() {
            self.rings[index].release();
        }
        self.held = match self.next_accepted() {
            Some(index) => Some(index),
            // Nothing waiting in any ring and no time to wait: a poll(2) could only say so
            // again (the event loop reads with a zero timeout after epoll woke it).
            None if timeout.is_zero() => None,
            None => {
                // Nothing waiting: wait once, then give the loop back.
                self.housekeeping();
                self.poll(timeout)?;
                self.next_accepted()
            }
        };
        Ok(self
            .held
            .and_then(|index| self.rings[index].peek())
            .map(|(_, packet)| Received::Ip(packet)))
    }

    /// Re-reads the host's addresses when the kernel announced a change (or, without
    /// events, once a second while frames arrive): on the loop's tick, not on a packet's path
    /// (a netlink dump whose cost grows with the number of addresses).
    fn housekeeping(&mut self) {
        let now = Instant::now();
        let what = self.schedule.on_tick(now);
        self.upkeep(what);
        self.pressure.tick(now);
        self.sync_flag();
    }

    fn set_watches(&mut self, watches: &[bpf::Watch], syn_only: bool) -> bool {
        match &self.limiter {
            Some(limiter) => {
                // Written even when some ring has the classic filter: the rings with the
                // program read them (and a failed reload puts this capture's ports back
                // this way).
                limiter.set_ports(&Ports::new(watches, syn_only));
                // A ring the program could not be attached to has the classic filter, with
                // the old ports built in: only a new capture updates it.
                !self.attach_failed
            }
            // The classic program has its ports built in: a new capture attaches a new one.
            None => false,
        }
    }

    fn set_budget(&mut self, budget: Option<SourceBudget>) -> bool {
        let applied = match (&self.limiter, budget) {
            (Some(limiter), Some(budget)) => {
                limiter.set_budget(budget);
                self.budget_on = true;
                true
            }
            (Some(_), None) => {
                self.budget_on = false;
                true
            }
            (None, None) => true,
            // No program loaded: only a new capture can try to load one.
            (None, Some(_)) => false,
        };
        self.sync_flag();
        applied
    }

    fn budget_refused(&self) -> Option<String> {
        self.limiter_refused.clone()
    }

    fn wake_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.rings.iter().map(|r| r.socket().as_fd()).collect()
    }

    fn stats(&mut self) -> CaptureStats {
        self.read_counters(true)
    }

    fn last_stats(&mut self) -> CaptureStats {
        self.read_counters(false)
    }
}

impl AfPacket {
    /// The kernel's counters added to ours. With `react`, new ring drops are a sign that
    /// spad fell behind (the budget engages); without, they are only counted.
    fn read_counters(&mut self, react: bool) -> CaptureStats {
        for ring in &self.rings {
            if let Ok((packets, drops)) = socket::take_statistics(ring.socket()) {
                self.stats.kernel_packets += u64::from(packets);
                self.stats.kernel_drops += u64::from(drops);
            }
        }
        if self.stats.kernel_drops > self.drops_seen {
            self.drops_seen = self.stats.kernel_drops;
            if react {
                // Frames lost to a full ring: spad fell behind.
                self.behind();
            }
        }
        if let Some(limiter) = &self.limiter {
            self.stats.kernel_source_limited = limiter.limited();
        }
        self.stats.kernel_budget = self.limiter.is_some() && self.budget_on;
        self.stats.budget_engaged = self.budget_on && self.pressure.engaged();
        self.stats.budget_engagements = self.pressure.engagements();
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooded_ring_cannot_starve_the_others() {
        // Ring 0 always has frames (a flood); ring 1 has three; ring 2 none.
        let mut rotation = Rotation::new(3);
        let pending = std::cell::Cell::new(3);
        let mut order = Vec::new();
        for _ in 0..(BATCH * 3) {
            let i = rotation
                .pick(|i| i == 0 || (i == 1 && pending.get() > 0))
                .unwrap();
            if i == 1 {
                pending.set(pending.get() - 1);
            }
            order.push(i);
        }
        let first_of_1 = order.iter().position(|&i| i == 1).unwrap();
        assert_eq!(
            first_of_1, BATCH,
            "ring 1 is served right after one batch of ring 0"
        );
        assert_eq!(
            order.iter().filter(|&&i| i == 1).count(),
            3,
            "all of ring 1 served"
        );
        assert!(
            order[BATCH + 3..].iter().all(|&i| i == 0),
            "then ring 0 again"
        );
    }

    /// Needs CAP_NET_RAW (skipped otherwise). Loopback only: a datagram to 127.0.0.1 comes
    /// out of the ring once (its outgoing copy is skipped), parsed, with the payload intact;
    /// a datagram to an unwatched port never reaches userspace.
    #[test]
    fn a_loopback_datagram_comes_out_of_the_ring_once() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = receiver.local_addr().unwrap().port();
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let watches = [bpf::Watch {
            proto: Proto::Udp,
            low: port,
            high: port,
        }];
        let mut source = match AfPacket::open(
            &["lo".to_string()],
            &watches,
            true,
            SlotSize::Large,
            Prefilter::Classic,
        ) {
            Ok(s) => s,
            Err(e) if e.to_string().contains("CAP_NET_RAW") => {
                eprintln!("skipped: opening an AF_PACKET socket needs CAP_NET_RAW ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .send_to(b"unwatched", other.local_addr().unwrap())
            .unwrap();
        sender.send_to(b"knock knock", ("127.0.0.1", port)).unwrap();
        let mut payloads = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while payloads.is_empty() && Instant::now() < deadline {
            if let Some(Received::Ip(packet)) = source.recv(Duration::from_millis(100)).unwrap() {
                let f = crate::capture::frame::parse(packet).unwrap();
                if f.port == port {
                    payloads.push(f.payload.to_vec());
                }
            }
        }
        // Anything else queued is drained: other test traffic on lo may pass the filter only
        // if it goes to our port, which nobody else uses.
        while let Some(received) = source.recv(Duration::from_millis(50)).unwrap() {
            if let Received::Ip(packet) = received {
                let f = crate::capture::frame::parse(packet).unwrap();
                assert_eq!(f.port, port, "only the watched port passes the filter");
                payloads.push(f.payload.to_vec());
            }
        }
        assert_eq!(payloads, vec![b"knock knock".to_vec()]);
        let stats = source.stats();
        assert_eq!((stats.received, stats.delivered), (1, 1), "{stats}");
        assert_eq!(
            stats.kernel_packets, 2,
            "both copies passed the filter: {stats}"
        );
    }

    /// Needs CAP_NET_RAW (skipped otherwise). Loopback only. Small slots deliver an SPA
    /// packet of the maximum size whole over IPv4 and IPv6, and the longest datagram that
    /// fits ([`SlotSize::max_packet`], which checks where the kernel really puts the packet
    /// in a slot); one byte more is dropped and counted as truncated. Large slots (fwknop)
    /// deliver a datagram of a whole 1,500-byte frame.
    #[test]
    fn slot_sizes_hold_what_they_promise_and_count_the_rest_as_truncated() {
        let max = spa_shared::packet::MAX_LEN;
        let small = SlotSize::Small.max_packet();
        for (slot, families) in [
            (
                SlotSize::Small,
                [
                    ("127.0.0.1", vec![max, small - 28, small - 27]),
                    ("::1", vec![max, small - 48, small - 47]),
                ],
            ),
            (
                SlotSize::Large,
                [
                    (
                        "127.0.0.1",
                        vec![1500 - 28, SlotSize::Large.max_packet() - 28],
                    ),
                    ("::1", vec![1500 - 48]),
                ],
            ),
        ] {
            for (host, sizes) in families {
                let Ok(receiver) = std::net::UdpSocket::bind((host, 0)) else {
                    eprintln!("skipped {host}: cannot bind on loopback");
                    continue;
                };
                let port = receiver.local_addr().unwrap().port();
                let watches = [bpf::Watch {
                    proto: Proto::Udp,
                    low: port,
                    high: port,
                }];
                let mut source = match AfPacket::open(
                    &["lo".to_string()],
                    &watches,
                    true,
                    slot,
                    Prefilter::Classic,
                ) {
                    Ok(s) => s,
                    Err(e) if e.to_string().contains("CAP_NET_RAW") => {
                        eprintln!("skipped: opening an AF_PACKET socket needs CAP_NET_RAW ({e})");
                        return;
                    }
                    Err(e) => panic!("{e}"),
                };
                let sender = std::net::UdpSocket::bind((host, 0)).unwrap();
                for &size in &sizes {
                    let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
                    sender.send_to(&payload, (host, port)).unwrap();
                }
                let fit = slot.max_packet() - if host == "::1" { 48 } else { 28 };
                let expect: Vec<usize> = sizes.iter().copied().filter(|&n| n <= fit).collect();
                let too_long = (sizes.len() - expect.len()) as u64;
                let mut delivered = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline
                    && (delivered.len() < expect.len()
                        || source.stats().dropped(DropReason::Truncated) < too_long)
                {
                    if let Some(Received::Ip(packet)) =
                        source.recv(Duration::from_millis(100)).unwrap()
                    {
                        let f = crate::capture::frame::parse(packet).unwrap();
                        assert_eq!(f.port, port);
                        assert!(f.payload.iter().enumerate().all(|(i, b)| *b == i as u8));
                        delivered.push(f.payload.len());
                    }
                }
                assert_eq!(delivered, expect, "{slot:?} over {host}");
                let stats = source.stats();
                assert_eq!(
                    stats.dropped(DropReason::Truncated),
                    too_long,
                    "{slot:?} over {host}: {stats}"
                );
            }
        }
    }

    /// A throwaway network namespace for one thread: `unshare` moves only the calling thread,
    /// and the namespace (its veth pair and addresses with it) is gone when the thread ends.
    /// Inside: `va` and `vb`, a veth pair with fixed MACs, no IPv6 link-local addresses (whose
    /// duplicate address detection would send address events at unpredictable moments) and
    /// 10.9.0.2/24 on `vb`, both ends up. `None` (skipped) without root or iproute2.
    fn in_throwaway_namespace<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        std::thread::spawn(move || {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("skipped: creating a network namespace needs root ({e})");
                return None;
            }
            if !std::process::Command::new("ip")
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
            {
                eprintln!("skipped: needs iproute2 (`ip`)");
                return None;
            }
            // Processes started from this thread are in its namespace.
            for args in [
                "link set lo up",
                "link add va address 02:00:00:00:00:0a type veth peer name vb address 02:00:00:00:00:0b",
                "link set va addrgenmode none",
                "link set vb addrgenmode none",
                "addr add 10.9.0.2/24 dev vb",
                "link set va up",
                "link set vb up",
            ] {
                ip(args);
            }
            // Both ends' carrier is up (its link event is sent before the capture opens).
            assert!(
                poll_until(Duration::from_secs(5), || {
                    ["va", "vb"].iter().all(|dev| {
                        let out = ip(&format!("-br link show {dev}"));
                        out.split_whitespace().nth(1) == Some("UP")
                    })
                }),
                "the veth pair never came up"
            );
            Some(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Runs `ip ARGS` in the calling thread's namespace; panics on failure.
    fn ip(args: &str) -> String {
        let out = std::process::Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `condition` every 10 ms until it holds or `limit` passes.
    fn poll_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if condition() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    const KNOCK_PORT: u16 = 62201;

    /// Sends Ethernet frames from `va` to `vb`'s MAC: they arrive on `vb` as `PACKET_HOST`,
    /// whatever their IP destination (as forwarded traffic reaches a router).
    struct Sender(socket2::Socket);

    impl Sender {
        fn new() -> Self {
            let tx =
                socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, None).unwrap();
            socket::bind(&tx, nix::net::if_::if_nametoindex("va").unwrap()).unwrap();
            Self(tx)
        }

        /// One UDP datagram to `destination`:62201 from 10.9.0.1.
        fn udp_to(&self, destination: &str) {
            let mut frame = vec![2, 0, 0, 0, 0, 0x0b, 2, 0, 0, 0, 0, 0x0a, 0x08, 0x00];
            frame.extend(crate::capture::frame::build::udp(
                "10.9.0.1".parse().unwrap(),
                destination.parse().unwrap(),
                40000,
                KNOCK_PORT,
                b"knock",
            ));
            assert_eq!(self.0.send(&frame).unwrap(), frame.len());
        }
    }

    impl Sender {
        /// One IP packet (IPv4 or IPv6) in an Ethernet frame to `vb`.
        fn ip_packet(&self, packet: &[u8]) {
            let ethertype: [u8; 2] = if packet[0] >> 4 == 6 {
                [0x86, 0xdd]
            } else {
                [0x08, 0x00]
            };
            let mut frame = vec![2, 0, 0, 0, 0, 0x0b, 2, 0, 0, 0, 0, 0x0a];
            frame.extend(ethertype);
            frame.extend(packet);
            assert_eq!(self.0.send(&frame).unwrap(), frame.len());
        }
    }

    /// A capture on `vb`: the eBPF prefilter with `budget`, or (`None`) the classic one.
    fn open_on_vb(budget: Option<SourceBudget>, watches: &[bpf::Watch]) -> AfPacket {
        let prefilter = match budget {
            Some(budget) => Prefilter::own_ebpf(Some(budget)),
            None => Prefilter::Classic,
        };
        AfPacket::open_with(
            &["vb".to_string()],
            watches,
            true,
            SlotSize::Small,
            prefilter,
            None,
        )
        .unwrap()
    }

    /// [`open_on_vb`] with the eBPF prefilter and `budget`; `None` (the test is skipped,
    /// said on stderr) where the kernel refuses the program.
    fn ebpf_on_vb(budget: SourceBudget, watches: &[bpf::Watch]) -> Option<AfPacket> {
        let source = open_on_vb(Some(budget), watches);
        if let Some(why) = source.budget_refused() {
            eprintln!("skipped: the kernel refused the eBPF prefilter: {why}");
            return None;
        }
        Some(source)
    }

    /// Reads until the kernel's count for the socket stops at `passed` (the prefilter's
    /// verdicts all in), within 5 s; returns the stats.
    fn drained(source: &mut AfPacket, passed: u64) -> CaptureStats {
        let mut stats = source.stats();
        poll_until(Duration::from_secs(5), || {
            while source.recv(Duration::ZERO).unwrap().is_some() {}
            stats = source.stats();
            stats.kernel_packets >= passed
        });
        stats
    }

    /// Needs root (skipped otherwise). The budget in three acts: released, a flood spad keeps
    /// up with is not cut at all; a backlog of a quarter ring engages it; engaged, one source
    /// over its budget is cut in the kernel and counted, while another source is untouched.
    #[test]
    fn a_backlog_engages_the_budget_which_then_cuts_only_the_flooding_source() {
        let (watches, _) = udp_watches(&[KNOCK_PORT]);
        let Some(acts) = in_throwaway_namespace(move || {
            let tx = Sender::new();
            let budget = SourceBudget { rate: 1, burst: 50 };
            let mut source = ebpf_on_vb(budget, &watches)?;
            let (vb, flooder, other) = (
                "10.9.0.2".parse().unwrap(),
                "10.9.0.1".parse().unwrap(),
                "10.9.0.3".parse().unwrap(),
            );
            let send = |from, count, port| {
                for _ in 0..count {
                    tx.ip_packet(&crate::capture::frame::build::udp(
                        from, vb, 40000, port, b"flood",
                    ));
                }
            };
            // 1: released. Read as they come (1,000 frames never make a backlog of 1,024).
            send(flooder, 1000, KNOCK_PORT);
            send(other, 10, KNOCK_PORT);
            send(other, 1, 5555); // not watched: dropped by the classic part, uncounted
            let released = drained(&mut source, 1010);
            // 2: 1,500 frames wait before spad reads: a backlog.
            send(flooder, 1500, KNOCK_PORT);
            let backlog = drained(&mut source, 2510);
            // 3: engaged.
            send(flooder, 1000, KNOCK_PORT);
            send(other, 10, KNOCK_PORT);
            let engaged = drained(&mut source, 2570);
            std::thread::sleep(Duration::from_millis(50)); // nothing more may come
            Some((released, backlog, engaged, drained(&mut source, 2570)))
        })
        .flatten() else {
            return;
        };
        let (released, backlog, engaged, late) = acts;
        assert_eq!(released.kernel_packets, 1010, "{released}");
        assert_eq!(released.kernel_source_limited, 0, "{released}");
        assert!(
            !released.budget_engaged && released.kernel_budget,
            "{released}"
        );
        assert_eq!(backlog.kernel_packets, 2510, "{backlog}");
        assert!(backlog.budget_engaged, "{backlog}");
        assert_eq!(backlog.budget_engagements, 1, "{backlog}");
        assert_eq!(late, engaged, "frames trickled in after the count settled");
        // 50 at once from the flooder, at most one more earned meanwhile, and the other 10.
        let passed = engaged.kernel_packets - backlog.kernel_packets;
        assert!((60..=61).contains(&passed), "passed {passed}: {engaged}");
        assert_eq!(engaged.kernel_source_limited + passed, 1010, "{engaged}");
        assert_eq!(engaged.delivered, engaged.kernel_packets, "{engaged}");
    }

    /// Needs root (skipped otherwise). The kernel's flag follows spad's state through a
    /// reload: `packet-rate = 0` while engaged stops the cuts at once, and a budget again,
    /// while still engaged, resumes them.
    #[test]
    fn the_kernel_flag_follows_the_budget_through_reloads() {
        let (watches, _) = udp_watches(&[KNOCK_PORT]);
        let Some(counts) = in_throwaway_namespace(move || {
            let tx = Sender::new();
            let budget = SourceBudget { rate: 1, burst: 10 };
            let mut source = ebpf_on_vb(budget, &watches)?;
            let (vb, flooder) = ("10.9.0.2".parse().unwrap(), "10.9.0.1".parse().unwrap());
            let send = |count| {
                for _ in 0..count {
                    tx.ip_packet(&crate::capture::frame::build::udp(
                        flooder, vb, 40000, KNOCK_PORT, b"flood",
                    ));
                }
            };
            // Reads until every frame offered so far is either passed or cut.
            let settle = |source: &mut AfPacket, offered: u64| {
                let mut stats = source.stats();
                poll_until(Duration::from_secs(5), || {
                    while source.recv(Duration::ZERO).unwrap().is_some() {}
                    stats = source.stats();
                    stats.kernel_packets + stats.kernel_source_limited >= offered
                });
                stats
            };
            source.behind();
            send(100);
            let engaged = settle(&mut source, 100).kernel_packets;
            assert!(source.set_budget(None));
            send(100);
            let off = settle(&mut source, 200).kernel_packets - engaged;
            assert!(source.set_budget(Some(budget)));
            send(100);
            let stats = settle(&mut source, 300);
            Some((engaged, off, stats.kernel_packets - engaged - off, stats))
        })
        .flatten() else {
            return;
        };
        let (engaged, off, again, stats) = counts;
        assert!(
            (10..=11).contains(&engaged),
            "engaged passed {engaged}: {stats}"
        );
        assert_eq!(off, 100, "with packet-rate = 0 nothing is cut: {stats}");
        assert!(
            again <= 1,
            "engaged again, the spent budget cuts: {again}, {stats}"
        );
    }

    /// UDP `ports`, as the event loop hands them to a capture (SYN-only TCP).
    fn udp_watches(ports: &[u16]) -> (Vec<bpf::Watch>, bool) {
        let watches = ports
            .iter()
            .map(|&port| bpf::Watch {
                proto: Proto::Udp,
                low: port,
                high: port,
            })
            .collect();
        (watches, true)
    }

    /// Waits (at most 5 s) until `count` packet sockets are bound to `vb` in this thread's
    /// namespace. A dropped capture's socket can outlive its `close` for a moment: a process
    /// that another test thread is spawning holds a copy of every descriptor until it execs,
    /// and meanwhile the socket still receives (and its program still judges) frames.
    fn wait_for_sockets_on_vb(count: usize) -> bool {
        let vb = nix::net::if_::if_nametoindex("vb").unwrap().to_string();
        poll_until(Duration::from_secs(5), || {
            std::fs::read_to_string("/proc/thread-self/net/packet")
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter(|line| line.split_whitespace().nth(4) == Some(vb.as_str()))
                .count()
                == count
        })
    }

    /// A capture on `vb` watching UDP `ports`, with `program` (shared) and `budget`.
    fn shared_on_vb(program: &Arc<Limiter>, ports: &[u16], budget: SourceBudget) -> AfPacket {
        let (watches, _) = udp_watches(ports);
        let prefilter = Prefilter::Ebpf(Ok(Arc::clone(program)), Some(budget));
        AfPacket::open_with(
            &["vb".to_string()],
            &watches,
            true,
            SlotSize::Small,
            prefilter,
            None,
        )
        .unwrap()
    }

    /// The daemon's program, loaded now; `None` (skipped, said on stderr) where the kernel
    /// refuses it.
    fn one_program() -> Option<Arc<Limiter>> {
        super::super::program::OneProgram::default()
            .get()
            .inspect_err(|e| eprintln!("skipped: the kernel refused the eBPF prefilter: {e}"))
            .ok()
    }

    /// The destination ports of the frames `source` delivers, read until one to `last`
    /// arrives (within 5 s). Frames on one veth reach the socket in order, so every frame
    /// sent before that one has been judged by then.
    fn ports_until(source: &mut AfPacket, last: u16) -> Vec<u16> {
        let mut ports = Vec::new();
        poll_until(Duration::from_secs(5), || {
            while let Some(Received::Ip(packet)) = source.recv(Duration::ZERO).unwrap() {
                ports.push(crate::capture::frame::parse(packet).unwrap().port);
            }
            ports.last() == Some(&last)
        });
        ports
    }

    /// Needs root (skipped otherwise). A reload's new capture attaches the running one's
    /// program (no new one is loaded, so none is refused after the privilege drop) and writes
    /// its ports (both configs' while the reload is pending) and budget into the control map
    /// they share, leaving the engaged flag alone: the running capture's sockets follow them
    /// at once, and drop no knock of either config. When the reload then fails, the new
    /// capture is dropped and [`restore_prefilter`](crate::capture::restore_prefilter) gives
    /// the running capture its ports, its budget and its engaged flag back.
    #[test]
    fn a_failed_reload_after_a_new_capture_gives_the_running_one_its_prefilter_back() {
        const NEW_PORT: u16 = KNOCK_PORT + 1;
        let (old_budget, new_budget) = (
            SourceBudget { rate: 1, burst: 50 },
            // Room for the second's worth the old budget charged the test's one source: the
            // flag stays engaged while the reload is pending.
            SourceBudget {
                rate: 1000,
                burst: 5000,
            },
        );
        let Some(seen) = in_throwaway_namespace(move || {
            let program = one_program()?;
            let tx = Sender::new();
            let send = |port| {
                tx.ip_packet(&crate::capture::frame::build::udp(
                    "10.9.0.1".parse().unwrap(),
                    "10.9.0.2".parse().unwrap(),
                    40000,
                    port,
                    b"knock",
                ))
            };
            let mut running = shared_on_vb(&program, &[KNOCK_PORT], old_budget);
            running.behind();
            let engaged_before = program.engaged();
            send(NEW_PORT);
            send(KNOCK_PORT);
            let before = ports_until(&mut running, KNOCK_PORT);

            // Opened as the event loop does while the reload is pending: both configs' ports.
            let pending = crate::capture::pending_watches(
                &udp_watches(&[KNOCK_PORT]),
                &udp_watches(&[NEW_PORT]),
            );
            assert_eq!(pending, udp_watches(&[KNOCK_PORT, NEW_PORT]));
            let new = shared_on_vb(&program, &[KNOCK_PORT, NEW_PORT], new_budget);
            assert!(new.budget_refused().is_none());
            let during = (program.engaged(), program.budget_ns());
            send(KNOCK_PORT);
            send(NEW_PORT);
            let passed_during = ports_until(&mut running, NEW_PORT);

            // `pipeline.reload` failed: the new capture goes, the running one takes over.
            drop(new);
            let (watches, _) = udp_watches(&[KNOCK_PORT]);
            crate::capture::restore_prefilter(&mut running, &watches, true, Some(old_budget));
            let after = (program.engaged(), program.budget_ns());
            send(NEW_PORT);
            send(KNOCK_PORT);
            let passed_after = ports_until(&mut running, KNOCK_PORT);
            Some((
                engaged_before,
                before,
                during,
                passed_during,
                after,
                passed_after,
            ))
        })
        .flatten() else {
            return;
        };
        let (engaged_before, before, during, passed_during, after, passed_after) = seen;
        let ns = |b: SourceBudget| (b.cost_ns(), b.slack_ns());
        assert!(engaged_before);
        assert_eq!(before, vec![KNOCK_PORT]);
        assert_eq!(
            during,
            (true, ns(new_budget)),
            "the new capture's budget; the running capture's flag (a flood is still cut)"
        );
        assert_eq!(
            passed_during,
            vec![KNOCK_PORT, NEW_PORT],
            "the running capture's sockets read the shared ports: both configs' knocks pass"
        );
        assert_eq!(
            after,
            (true, ns(old_budget)),
            "the running capture's budget and flag are back"
        );
        assert_eq!(passed_after, vec![KNOCK_PORT], "and its ports");
    }

    /// Needs root (skipped otherwise). Through a reload that replaces the capture: the
    /// engaged flag follows the new capture only (the old one's state goes with it), and the
    /// program's one counter of cut frames, read by both captures, is counted once in the
    /// daemon's totals (the retired capture's stats added to the new one's, as `event_loop`
    /// does). The spent budget of the flooding source is kept: the sources map is the
    /// program's, not the capture's.
    #[test]
    fn a_reload_that_replaces_the_capture_counts_the_shared_cuts_once() {
        let budget = SourceBudget { rate: 1, burst: 10 };
        let Some(seen) = in_throwaway_namespace(move || {
            let program = one_program()?;
            let tx = Sender::new();
            let send = |count| {
                for _ in 0..count {
                    tx.ip_packet(&crate::capture::frame::build::udp(
                        "10.9.0.1".parse().unwrap(),
                        "10.9.0.2".parse().unwrap(),
                        40000,
                        KNOCK_PORT,
                        b"flood",
                    ));
                }
            };
            let total = |retired: &CaptureStats, source: &mut AfPacket| {
                let mut all = retired.clone();
                all.add(&source.stats());
                all
            };
            // Reads until every frame offered so far is either passed or cut.
            let settle = |retired: &CaptureStats, source: &mut AfPacket, offered: u64| {
                let mut all = total(retired, source);
                poll_until(Duration::from_secs(5), || {
                    while source.recv(Duration::ZERO).unwrap().is_some() {}
                    all = total(retired, source);
                    all.kernel_packets + all.kernel_source_limited >= offered
                });
                all
            };
            let mut old = shared_on_vb(&program, &[KNOCK_PORT], budget);
            old.behind();
            send(30);
            let first = settle(&CaptureStats::default(), &mut old, 30);

            let mut new = shared_on_vb(&program, &[KNOCK_PORT], budget);
            let flag_while_pending = program.engaged();
            let mut retired = CaptureStats::default();
            retired.add(&crate::capture::retire(
                Box::new(old),
                &mut new,
                &udp_watches(&[KNOCK_PORT]),
                Some(budget),
            ));
            let flag_after_swap = program.engaged();
            // The retired capture's socket gone, so only the new one judges what follows.
            assert!(
                wait_for_sockets_on_vb(1),
                "the retired capture's socket lingers"
            );
            new.housekeeping();
            let flag_after_tick = program.engaged();
            new.behind();
            let flag_engaged = program.engaged();
            send(30);
            let second = settle(&retired, &mut new, 60);
            Some((
                first,
                second,
                program.limited(),
                (
                    flag_while_pending,
                    flag_after_swap,
                    flag_after_tick,
                    flag_engaged,
                ),
            ))
        })
        .flatten() else {
            return;
        };
        let (first, second, limited, flags) = seen;
        assert!((19..=20).contains(&first.kernel_source_limited), "{first}");
        assert_eq!(
            flags,
            (true, false, false, true),
            "the running capture's flag until the swap, then the new capture's"
        );
        assert_eq!(second.kernel_source_limited, limited, "{second}");
        assert_eq!(
            second.kernel_source_limited + second.kernel_packets,
            60,
            "each frame passed or cut once: {second}"
        );
        assert!(
            second.kernel_packets - first.kernel_packets <= 1,
            "the spent budget was kept: {second}"
        );
    }

    /// Needs root (skipped otherwise). The replaced capture's last reading sees its ring's
    /// drops (a flood it was not read during); [`retire`](crate::capture::retire) keeps those
    /// counts without reacting to them: no engagement is counted, and the flag of the
    /// program it shares with the capture that replaced it follows the live capture.
    #[test]
    fn a_retired_captures_last_reading_leaves_the_flag_to_the_live_one() {
        let generous = SourceBudget {
            rate: 1_000_000,
            burst: 1_000_000,
        };
        let (watches, _) = udp_watches(&[KNOCK_PORT]);
        let Some(seen) = in_throwaway_namespace(move || {
            let program = one_program()?;
            let tx = Sender::new();
            let old = shared_on_vb(&program, &[KNOCK_PORT], generous);
            // A classic capture sees the same frames: once it has counted them all, so has
            // the old capture's socket (each frame reaches both in one pass), whose counters
            // are not read before `retire`.
            let mut observer = open_on_vb(None, &watches);
            // More than a ring holds, never read: the kernel drops the rest.
            let frames = (super::super::ring::FRAMES + 1000) as u64;
            let packet = crate::capture::frame::build::udp(
                "10.9.0.1".parse().unwrap(),
                "10.9.0.2".parse().unwrap(),
                40000,
                KNOCK_PORT,
                b"flood",
            );
            for _ in 0..frames {
                tx.ip_packet(&packet);
            }
            assert!(poll_until(Duration::from_secs(5), || {
                let seen = observer.stats();
                seen.kernel_packets >= frames // tp_packets counts the drops too
            }));
            let mut live = shared_on_vb(&program, &[KNOCK_PORT], generous);
            let flag_at_open = program.engaged();
            let retired = crate::capture::retire(
                Box::new(old),
                &mut live,
                &udp_watches(&[KNOCK_PORT]),
                Some(generous),
            );
            Some((flag_at_open, retired, program.engaged()))
        })
        .flatten() else {
            return;
        };
        let (flag_at_open, retired, flag_after) = seen;
        assert!(!flag_at_open);
        assert!(retired.kernel_drops > 0, "{retired}");
        assert!(
            !retired.budget_engaged,
            "the old capture reacted: {retired}"
        );
        assert_eq!(
            retired.budget_engagements, 0,
            "a phantom engagement: {retired}"
        );
        assert!(!flag_after, "the live capture is not behind");
    }

    /// Needs root (skipped otherwise). IPv6 sources share one budget per /64: two addresses of
    /// one /64 spend it together (100 sent, 50 at once pass); another /64 has its own. The same
    /// two interface identifiers in IPv4 terms (two addresses) would have two budgets.
    #[test]
    fn the_kernel_budget_of_ipv6_sources_is_per_64() {
        let (watches, _) = udp_watches(&[KNOCK_PORT]);
        let Some(stats) = in_throwaway_namespace(move || {
            let tx = Sender::new();
            let mut source = ebpf_on_vb(SourceBudget { rate: 1, burst: 50 }, &watches)?;
            source.behind(); // as if spad had fallen behind: the budget is enforced
            let to: std::net::IpAddr = "fd00::2".parse().unwrap();
            let send = |from: &str, count: usize| {
                let from: std::net::IpAddr = from.parse().unwrap();
                for _ in 0..count {
                    tx.ip_packet(&crate::capture::frame::build::udp(
                        from, to, 40000, KNOCK_PORT, b"flood",
                    ));
                }
            };
            send("fd00::1", 50);
            send("fd00::ffff:1:2:3", 50); // the same /64: its budget is spent
            send("fd00:0:0:1::1", 10); // the next /64
            Some(drained(&mut source, 60))
        })
        .flatten() else {
            return;
        };
        // 50 at once, at most one more earned while they went out, and the other /64's 10.
        assert!((60..=61).contains(&stats.kernel_packets), "passed: {stats}");
        assert_eq!(
            stats.kernel_source_limited + stats.kernel_packets,
            110,
            "{stats}"
        );
    }

    /// Needs root (skipped otherwise). With a budget no packet exceeds, the eBPF program
    /// passes what the classic one passes (frames under 16 bytes aside, see `prefilter`): two captures on one interface, one of each,
    /// see the same packets of every kind the prefilter distinguishes.
    #[test]
    fn the_ebpf_prefilter_passes_what_the_classic_one_passes() {
        let watches = [
            bpf::Watch {
                proto: Proto::Udp,
                low: KNOCK_PORT,
                high: KNOCK_PORT,
            },
            bpf::Watch {
                proto: Proto::Tcp,
                low: 7000,
                high: 7010,
            },
        ];
        let Some((classic, ebpf, expected)) = in_throwaway_namespace(move || {
            let tx = Sender::new();
            let generous = SourceBudget {
                rate: 1_000_000,
                burst: 1_000_000,
            };
            let mut ebpf = ebpf_on_vb(generous, &watches)?;
            let mut classic = open_on_vb(None, &watches);
            let build = |p: &[u8]| p.to_vec();
            let (a4, b4): (std::net::IpAddr, std::net::IpAddr) =
                ("10.9.0.1".parse().unwrap(), "10.9.0.2".parse().unwrap());
            let (a6, b6): (std::net::IpAddr, std::net::IpAddr) =
                ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
            use crate::capture::frame::build::{tcp, udp, with_extension};
            let mut fragment = udp(a4, b4, 1, KNOCK_PORT, b"x");
            fragment[6] |= 0x20; // more fragments
            let cases: Vec<(Vec<u8>, bool)> = vec![
                (udp(a4, b4, 1, KNOCK_PORT, b"x"), true),
                (udp(a4, b4, 1, KNOCK_PORT + 1, b"x"), false),
                (tcp(a4, b4, 1, 7005, 0x02), true),
                (tcp(a4, b4, 1, 7011, 0x02), false),
                (tcp(a4, b4, 1, 7005, 0x12), false), // SYN-ACK
                (tcp(a4, b4, 1, 7000, 0x10), false), // ACK
                (build(&fragment), false),
                (udp(a6, b6, 1, KNOCK_PORT, b"x"), true),
                (udp(a6, b6, 1, 53, b"x"), false),
                (tcp(a6, b6, 1, 7010, 0x02), true),
                (tcp(a6, b6, 1, 6999, 0x02), false),
                (
                    with_extension(&udp(a6, b6, 1, 53, b"x"), 60, &[0; 6]),
                    true, // extension headers: userspace walks them
                ),
            ];
            let expected = cases.iter().filter(|(_, pass)| *pass).count() as u64;
            for (packet, _) in &cases {
                tx.ip_packet(packet);
            }
            let classic = drained(&mut classic, expected);
            let ebpf = drained(&mut ebpf, expected);
            Some((classic, ebpf, expected))
        })
        .flatten() else {
            return;
        };
        assert_eq!(classic.kernel_packets, expected, "classic: {classic}");
        assert_eq!(ebpf.kernel_packets, expected, "ebpf: {ebpf}");
        assert_eq!(ebpf.kernel_source_limited, 0);
        assert_eq!(ebpf.delivered, classic.delivered);
    }

    fn capture_on_vb(events: bool) -> AfPacket {
        let (watches, _) = udp_watches(&[KNOCK_PORT]);
        let events = if events {
            Some(AddressEvents::open().unwrap())
        } else {
            None
        };
        AfPacket::open_with(
            &["vb".to_string()],
            &watches,
            true,
            SlotSize::Small,
            Prefilter::Classic,
            events,
        )
        .unwrap()
    }

    /// Reads (zero timeout: no tick) until `count` frames were received in all, within 5 s.
    /// Returns how many were delivered.
    fn handle(source: &mut AfPacket, count: u64) -> u64 {
        let mut delivered = 0;
        let done = poll_until(Duration::from_secs(5), || {
            while source.recv(Duration::ZERO).unwrap().is_some() {
                delivered += 1;
            }
            source.stats().received >= count
        });
        assert!(done, "only {} of {count} frames arrived", source.stats());
        delivered
    }

    /// `frames` datagrams for an address that is not this host's, one about every 2 ms (a
    /// stream of forwarded traffic, as a router sees it), each handled as it arrives.
    fn foreign_stream(source: &mut AfPacket, tx: &Sender, frames: u64) {
        let before = source.stats().received;
        for i in 1..=frames {
            tx.udp_to("198.51.100.7");
            assert_eq!(handle(source, before + i), 0);
            std::thread::sleep(Duration::from_millis(2)); // pacing, not synchronisation
        }
        assert_eq!(
            source.stats().dropped(DropReason::NotOurAddress),
            frames,
            "{}",
            source.stats()
        );
    }

    /// Needs root (skipped otherwise). The decisive one for a router: a steady stream of
    /// frames for a foreign destination does not re-read the address table; with the timer
    /// (no address events, the old behaviour) the same stream re-reads it again and again.
    #[test]
    fn a_stream_of_frames_for_foreign_addresses_does_not_re_read_the_table() {
        let Some((with_events, with_timer)) = in_throwaway_namespace(|| {
            let tx = Sender::new();
            let mut source = capture_on_vb(true);
            assert!(source.follows_address_events());
            let initial = source.stats().address_reads;
            foreign_stream(&mut source, &tx, 500);
            // Ticks in between look for events and find none.
            source.housekeeping();
            let with_events = (initial, source.stats().address_reads);
            drop(source);

            let mut source = capture_on_vb(false);
            assert!(!source.follows_address_events());
            let initial = source.stats().address_reads;
            foreign_stream(&mut source, &tx, 500);
            (with_events, (initial, source.stats().address_reads))
        }) else {
            return;
        };
        assert_eq!(
            with_events,
            (1, 1),
            "with events: re-reads (initial, after)"
        );
        assert!(
            with_timer.1 > with_timer.0 + 3,
            "the timer re-reads on misses: (initial, after) = {with_timer:?}"
        );
    }

    /// Needs root (skipped otherwise). An address added after the capture opened works for
    /// the first frame sent to it (a miss looks for events before the next tick); once it is
    /// removed, frames to it are dropped as not ours within a bounded time (the tick).
    #[test]
    fn an_address_added_works_at_once_and_a_removed_one_stops_working() {
        let Some(()) = in_throwaway_namespace(|| {
            let tx = Sender::new();
            let mut source = capture_on_vb(true);
            // The owned address works; a foreign one does not.
            tx.udp_to("10.9.0.2");
            assert_eq!(handle(&mut source, 1), 1);
            tx.udp_to("10.9.0.77");
            assert_eq!(handle(&mut source, 2), 0);
            assert_eq!(source.stats().address_reads, 1, "no event: no re-read");

            ip("addr add 10.9.0.77/32 dev vb");
            // A miss looks for events at most every 100 ms: that much has passed.
            std::thread::sleep(RefreshSchedule::ON_MISS);
            tx.udp_to("10.9.0.77");
            assert_eq!(handle(&mut source, 3), 1, "the first frame to it");
            assert_eq!(source.stats().address_reads, 2, "{}", source.stats());

            ip("addr del 10.9.0.77/32 dev vb");
            let dropped = source.stats().dropped(DropReason::NotOurAddress);
            let mut sent = 3;
            // The event loop ticks every 200 ms; here every 10 ms, with a frame after each.
            let refused = poll_until(Duration::from_secs(5), || {
                source.housekeeping();
                tx.udp_to("10.9.0.77");
                sent += 1;
                handle(&mut source, sent);
                source.stats().dropped(DropReason::NotOurAddress) > dropped
            });
            assert!(refused, "still accepted after removal: {}", source.stats());
            tx.udp_to("10.9.0.2");
            assert_eq!(
                handle(&mut source, sent + 1),
                1,
                "the owned address still works"
            );
        }) else {
            return;
        };
    }

    /// Needs root (skipped otherwise). The subscription leaves out link events: an interface
    /// that goes away (its only address IPv4, no link-local) is still announced, by the
    /// removal of its address.
    #[test]
    fn an_interface_removed_is_announced_by_its_addresses() {
        let Some(()) = in_throwaway_namespace(|| {
            ip("link add vc type veth peer name vd");
            ip("link set vc addrgenmode none");
            ip("link set vd addrgenmode none");
            ip("addr add 10.9.1.2/24 dev vd");
            ip("link set vd up");
            ip("link set vc up");
            // Subscribed after the address came: what follows can only be its removal.
            let mut events = AddressEvents::open().unwrap();
            assert!(!events.changed(), "nothing happened since the subscription");
            ip("link del vc");
            assert!(
                poll_until(Duration::from_secs(5), || events.changed()),
                "deleting an interface with an address sent no address event"
            );
        }) else {
            return;
        };
    }

    /// The cost of a stream of frames for a foreign address, with the address table following
    /// events and with the timer (the old behaviour): table re-reads per second and the time
    /// the capture spends per frame. Needs root. `cargo test -p spad --release --lib
    /// foreign_stream_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement: prints figures, asserts nothing about them"]
    fn foreign_stream_cost() {
        let t = Instant::now();
        for _ in 0..20 {
            HostAddresses::read().unwrap();
        }
        println!(
            "this host's namespace: one re-read of the table: {:.0} µs",
            t.elapsed().as_secs_f64() * 1e6 / 20.0
        );
        in_throwaway_namespace(|| {
            let tx = Sender::new();
            for addresses in [1, 256] {
                if addresses > 1 {
                    // A router's worth of addresses: each re-read dumps them all.
                    let batch: String = (1..addresses)
                        .map(|i| format!("addr add 10.10.{}.{}/32 dev vb\n", i / 250, i % 250 + 1))
                        .collect();
                    let mut child = std::process::Command::new("ip")
                        .args(["-batch", "-"])
                        .stdin(std::process::Stdio::piped())
                        .spawn()
                        .unwrap();
                    use std::io::Write;
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(batch.as_bytes())
                        .unwrap();
                    assert!(child.wait().unwrap().success());
                }
                let t = Instant::now();
                for _ in 0..20 {
                    HostAddresses::read().unwrap();
                }
                println!(
                    "addresses={addresses:<4} one re-read of the table: {:.0} µs",
                    t.elapsed().as_secs_f64() * 1e6 / 20.0
                );
                for events in [false, true] {
                    let mut source = capture_on_vb(events);
                    source.housekeeping(); // the events of the addresses just added
                    let reads = source.stats().address_reads;
                    let mut busy = Duration::ZERO;
                    let start = Instant::now();
                    let mut sent = 0u64;
                    while start.elapsed() < Duration::from_secs(3) {
                        for _ in 0..256 {
                            tx.udp_to("198.51.100.7");
                        }
                        sent += 256;
                        let t = Instant::now();
                        while source.stats().received < sent && t.elapsed() < Duration::from_secs(1)
                        {
                            assert!(source.recv(Duration::ZERO).unwrap().is_none());
                        }
                        busy += t.elapsed();
                    }
                    let wall = start.elapsed().as_secs_f64();
                    let stats = source.stats();
                    let reads = stats.address_reads - reads;
                    println!(
                        "addresses={addresses:<4} table={:<6} frames={} ({:.0}/s offered) \
                         re-reads={reads} ({:.1}/s) capture time per frame={:.2} µs \
                         (capacity about {:.0} frames/s)",
                        if events { "events" } else { "timer" },
                        stats.received,
                        stats.received as f64 / wall,
                        reads as f64 / wall,
                        busy.as_secs_f64() * 1e6 / stats.received as f64,
                        stats.received as f64 / busy.as_secs_f64(),
                    );
                }
            }
        });
    }

    #[test]
    fn rotation_with_nothing_waiting_or_no_rings() {
        assert_eq!(Rotation::new(2).pick(|_| false), None);
        assert_eq!(Rotation::new(0).pick(|_| true), None);
        let mut one = Rotation::new(1);
        for _ in 0..BATCH * 2 + 1 {
            assert_eq!(one.pick(|_| true), Some(0), "a single ring is never paused");
        }
    }
}
