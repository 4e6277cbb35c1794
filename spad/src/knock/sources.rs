//! Per-source knock state with a hard cap: rate limit, failure count, blacklist, progress.
//!
//! Every knock touches exactly one entry, found by address in O(1). The table never holds
//! more than `cap` sources: a new source evicts the oldest *untrusted* one (a source is
//! trusted once it matched two ports of some sequence, which a spoofed flood cannot do without
//! knowing the sequence), and only when none is left the oldest trusted one. So a flood from
//! spoofed addresses costs a bounded amount of memory and never wipes a legitimate user's
//! progress wholesale: there is no global clear. The blacklist has its own cap, oldest first.
//!
//! Both queues are FIFO with lazy deletion: an entry names (address, stamp) and is stale once
//! the source was removed or re-created; stale entries are skipped on eviction and dropped when
//! the queue outgrows the cap by a quarter.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use spa_shared::Micros;

use super::sequence::{Progress, SeqKey};

/// Knocks counted in the current second.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rate {
    second: u64,
    count: u32,
}

/// What the rate limiter says about one more knock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateVerdict {
    Within,
    /// The first knock over the limit this second: log it and count a failure.
    Tripped,
    /// Still over the limit: ignore silently.
    Over,
}

impl Rate {
    pub fn count(&mut self, now: Micros, max_per_second: u32) -> RateVerdict {
        let second = now / 1_000_000;
        if self.second != second {
            self.second = second;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        match self.count.checked_sub(max_per_second) {
            None | Some(0) => RateVerdict::Within,
            Some(1) => RateVerdict::Tripped,
            Some(_) => RateVerdict::Over,
        }
    }

    fn live(&self, now: Micros) -> bool {
        self.second == now / 1_000_000
    }
}

/// Failures within the blacklist window.
#[derive(Debug, Default, Clone, Copy)]
pub struct Failures {
    count: u32,
    first: Micros,
}

impl Failures {
    /// Counts one failure; true when it reaches `limit` within `window` (then it starts over).
    pub fn add(&mut self, now: Micros, window: Micros, limit: u32) -> bool {
        if self.count == 0 || now.saturating_sub(self.first) > window {
            self.count = 0;
            self.first = now;
        }
        self.count += 1;
        if self.count >= limit {
            self.count = 0;
            return true;
        }
        false
    }

    fn live(&self, now: Micros, window: Micros) -> bool {
        self.count > 0 && now.saturating_sub(self.first) <= window
    }
}

/// One source's state.
#[derive(Debug, Default, Clone)]
pub struct Source {
    stamp: u64,
    trusted: bool,
    pub rate: Rate,
    pub failures: Failures,
    /// Progress per sequence; a handful of entries at most (bounded by the doors).
    pub progress: Vec<(SeqKey, Progress)>,
}

/// The bounded table of sources and the bounded blacklist.
#[derive(Debug)]
pub struct Sources {
    map: HashMap<IpAddr, Source>,
    untrusted: VecDeque<(IpAddr, u64)>,
    trusted: VecDeque<(IpAddr, u64)>,
    stamp: u64,
    cap: usize,
    blacklist: HashMap<IpAddr, Micros>,
    blacklist_order: VecDeque<(IpAddr, Micros)>,
    evicted: u64,
}

impl Sources {
    /// A table for at most `cap` sources. Its memory is reserved up front (pages are touched
    /// only as sources arrive) and never regrown or shrunk, so a flood reaches a fixed ceiling
    /// instead of leaving freed tables behind in the allocator.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            map: HashMap::with_capacity(cap),
            untrusted: VecDeque::with_capacity(cap),
            trusted: VecDeque::new(),
            stamp: 0,
            cap,
            blacklist: HashMap::new(),
            blacklist_order: VecDeque::new(),
            evicted: 0,
        }
    }

    /// Changes the cap (on reload); takes effect as sources come and go.
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        self.map.reserve(self.cap.saturating_sub(self.map.len()));
        while self.map.len() > self.cap && self.evict_one() {}
        while self.blacklist.len() > self.cap && self.unblacklist_oldest() {}
    }

    /// Whether `address` is blacklisted at `now`.
    pub fn is_blacklisted(&self, address: IpAddr, now: Micros) -> bool {
        self.blacklist
            .get(&address)
            .is_some_and(|until| *until > now)
    }

    /// Blacklists `address` until `until` and forgets its progress.
    pub fn blacklist(&mut self, address: IpAddr, until: Micros) {
        if let Some(source) = self.map.get_mut(&address) {
            source.progress = Vec::new();
        }
        if self.blacklist.insert(address, until).is_none() {
            self.blacklist_order.push_back((address, until));
            while self.blacklist.len() > self.cap && self.unblacklist_oldest() {}
        } else {
            self.blacklist_order.push_back((address, until));
        }
        if self.blacklist_order.len() > 2 * self.cap + 16 {
            let live = &self.blacklist;
            self.blacklist_order
                .retain(|(a, u)| live.get(a).is_some_and(|until| until == u));
        }
    }

    fn unblacklist_oldest(&mut self) -> bool {
        while let Some((address, until)) = self.blacklist_order.pop_front() {
            if self.blacklist.get(&address) == Some(&until) {
                self.blacklist.remove(&address);
                return true;
            }
        }
        false
    }

    /// The entry for `address`, created (evicting the oldest untrusted source if full).
    pub fn entry(&mut self, address: IpAddr) -> &mut Source {
        if !self.map.contains_key(&address) {
            while self.map.len() >= self.cap && self.evict_one() {}
            self.stamp += 1;
            self.untrusted.push_back((address, self.stamp));
            let source = Source {
                stamp: self.stamp,
                ..Source::default()
            };
            self.map.insert(address, source);
            self.compact();
        }
        // Present now: `or_default` never inserts here.
        self.map.entry(address).or_default()
    }

    /// Protects `address` from eviction by untrusted newcomers (it matched real progress).
    pub fn trust(&mut self, address: IpAddr) {
        let Some(source) = self.map.get_mut(&address) else {
            return;
        };
        if source.trusted {
            return;
        }
        source.trusted = true;
        self.trusted.push_back((address, source.stamp));
        self.compact();
    }

    fn evict_one(&mut self) -> bool {
        for trusted in [false, true] {
            loop {
                let queue = if trusted {
                    &mut self.trusted
                } else {
                    &mut self.untrusted
                };
                let Some((address, stamp)) = queue.pop_front() else {
                    break;
                };
                // One lookup: remove, and put back in the rare case the entry is not the one
                // queued (re-created since, or moved to the other queue).
                if let Some(source) = self.map.remove(&address) {
                    if source.stamp == stamp && source.trusted == trusted {
                        self.evicted += 1;
                        return true;
                    }
                    self.map.insert(address, source);
                }
            }
        }
        false
    }

    /// Drops stale queue entries once a queue outgrows the cap by a quarter.
    fn compact(&mut self) {
        // Each queue holds at most one live entry per source, so past this many at least a
        // fifth are stale: dropping them costs O(1) per push, amortized.
        let limit = self.cap + self.cap / 4 + 16;
        let map = &self.map;
        for (queue, trusted) in [(&mut self.untrusted, false), (&mut self.trusted, true)] {
            if queue.len() > limit {
                queue.retain(|(a, stamp)| {
                    map.get(a)
                        .is_some_and(|s| s.stamp == *stamp && s.trusted == trusted)
                });
            }
        }
    }

    /// Forgets what no longer matters at `now`: progress older than `horizon`, failures
    /// outside `window`, expired blacklist entries (the source table keeps its reserved size;
    /// the blacklist gives memory back).
    pub fn purge(&mut self, now: Micros, horizon: Micros, window: Micros) {
        self.map.retain(|_, s| {
            s.progress.retain(|(_, p)| p.started >= horizon);
            !s.progress.is_empty() || s.failures.live(now, window) || s.rate.live(now)
        });
        self.blacklist.retain(|_, until| *until > now);
        let (map, blacklist) = (&self.map, &self.blacklist);
        self.untrusted
            .retain(|(a, st)| map.get(a).is_some_and(|s| s.stamp == *st && !s.trusted));
        self.trusted
            .retain(|(a, st)| map.get(a).is_some_and(|s| s.stamp == *st && s.trusted));
        self.blacklist_order
            .retain(|(a, u)| blacklist.get(a) == Some(u));
        if self.blacklist.capacity() > 4 * self.blacklist.len() + 1024 {
            self.blacklist.shrink_to_fit();
            self.blacklist_order.shrink_to_fit();
        }
    }

    /// Forgets every source's progress (after a reconfiguration renumbers the doors).
    pub fn forget_progress(&mut self) {
        for source in self.map.values_mut() {
            source.progress = Vec::new();
        }
    }

    pub fn get_mut(&mut self, address: IpAddr) -> Option<&mut Source> {
        self.map.get_mut(&address)
    }

    /// Sources tracked now (at most the cap).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Progress records over all sources.
    pub fn progress_entries(&self) -> usize {
        self.map.values().map(|s| s.progress.len()).sum()
    }

    /// Sources evicted so far to respect the cap.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Blacklist entries held now.
    pub fn blacklisted(&self) -> usize {
        self.blacklist.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn the_cap_evicts_oldest_untrusted_first() {
        let mut t = Sources::new(4);
        t.entry(v4(0));
        t.trust(v4(0));
        for n in 1..100 {
            t.entry(v4(n));
            assert!(t.len() <= 4);
        }
        assert!(t.get_mut(v4(0)).is_some(), "trusted survives the flood");
        assert!(t.get_mut(v4(99)).is_some(), "newest is kept");
        assert!(t.get_mut(v4(1)).is_none(), "oldest untrusted evicted");
        assert!(t.untrusted.len() <= 4 + 1 + 16);
        // With only trusted sources left, the oldest trusted goes.
        let mut t = Sources::new(2);
        for n in 0..3 {
            t.entry(v4(n));
            t.trust(v4(n));
        }
        assert!(t.get_mut(v4(0)).is_none() && t.get_mut(v4(2)).is_some());
    }

    #[test]
    fn rate_failures_and_blacklist() {
        let mut r = Rate::default();
        let verdicts: Vec<_> = (0..4).map(|i| r.count(5_000_000 + i, 2)).collect();
        assert_eq!(
            verdicts,
            [
                RateVerdict::Within,
                RateVerdict::Within,
                RateVerdict::Tripped,
                RateVerdict::Over
            ]
        );
        assert_eq!(r.count(6_000_000, 2), RateVerdict::Within);
        let mut f = Failures::default();
        assert!(!f.add(0, 10, 2));
        assert!(!f.add(20, 10, 2), "outside the window: counting restarts");
        assert!(f.add(25, 10, 2));
        let mut t = Sources::new(2);
        for n in 0..5 {
            t.blacklist(v4(n), 100);
        }
        assert_eq!(t.blacklisted(), 2);
        assert!(t.is_blacklisted(v4(4), 99) && !t.is_blacklisted(v4(4), 100));
        assert!(!t.is_blacklisted(v4(0), 0), "oldest dropped at the cap");
        t.purge(100, 0, 10);
        assert_eq!(t.blacklisted(), 0);
    }

    proptest::proptest! {
        /// Whatever the sequence of operations, the table and the blacklist stay within the
        /// cap, the queues within cap + 1/4, and a trusted source is only evicted when every
        /// other source is trusted too.
        #[test]
        fn bounded_under_any_operations(
            cap in 1usize..16,
            ops in proptest::collection::vec((0u8..5, 0u32..64), 0..400),
        ) {
            let mut t = Sources::new(cap);
            let mut now = 0;
            for (op, n) in ops {
                now += 1;
                match op {
                    0 | 1 => {
                        let trusted: Vec<IpAddr> =
                            t.map.iter().filter(|(_, s)| s.trusted).map(|(a, _)| *a).collect();
                        let any_untrusted = t.map.values().any(|s| !s.trusted);
                        t.entry(v4(n));
                        if any_untrusted {
                            for a in trusted {
                                proptest::prop_assert!(t.map.contains_key(&a), "trusted {a} evicted");
                            }
                        }
                    }
                    2 => t.trust(v4(n)),
                    3 => t.blacklist(v4(n), now + u64::from(n)),
                    _ => t.purge(now, now.saturating_sub(8), 16),
                }
                proptest::prop_assert!(t.len() <= cap);
                proptest::prop_assert!(t.blacklisted() <= cap);
                proptest::prop_assert!(t.untrusted.len() <= cap + cap / 4 + 16 + 1);
                proptest::prop_assert!(t.trusted.len() <= cap + cap / 4 + 16 + 1);
                let trusted = t.map.values().filter(|s| s.trusted).count();
                let untrusted_live = t.untrusted.iter().filter(|(a, st)| {
                    t.map.get(a).is_some_and(|s| s.stamp == *st && !s.trusted)
                }).count();
                proptest::prop_assert_eq!(untrusted_live + trusted, t.len());
            }
        }
    }
}
