//! Per-source knock state with a hard cap: rate limit, failure count, blacklist, progress.
//!
//! Every knock touches exactly one entry, found by address in O(1). The table never holds
//! more than `cap` sources: a new source evicts the oldest *untrusted* one (a source is
//! trusted once it matched two ports of some sequence, which a spoofed flood cannot do without
//! knowing the sequence), and only when none is left the oldest trusted one. So a flood from
//! spoofed addresses costs a bounded amount of memory and never wipes a legitimate user's
//! progress wholesale: there is no global clear. The blacklist has its own cap, oldest first.
//!
//! Both queues are FIFO with lazy deletion: an entry names (slot, stamp) and is stale once
//! the source was removed or re-created; stale entries are skipped on eviction and dropped when
//! the queue outgrows the cap by a quarter.
//!
//! A flood fills the table to its cap, so what matters for memory is the size of one entry,
//! about 190 bytes all told: 72 in the slab (a 48-byte [`Source`] and its address, progress
//! kept inline while there is one record, which is all a spoofed source leaves: one SYN,
//! stage 1 of one sequence at most; on the heap only beyond that), two 25-byte index buckets,
//! 4 bytes of free list and 10 of eviction queue.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use spa_shared::Micros;

use super::sequence::{Progress, SeqKey};

/// Knocks counted in the current second.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rate {
    /// Seconds of the clock, wrapping at `u32` (only equality with the current second
    /// matters, so a wrap every 136 years does no harm).
    second: u32,
    count: u32,
}

/// The second of `now`, as [`Rate`] keeps it (wrapping).
fn second_of(now: Micros) -> u32 {
    (now / 1_000_000) as u32
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
        let second = second_of(now);
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
        self.second == second_of(now)
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
    /// Which queue entry is this one's ([`Sources`]' insertion counter, wrapping: a stale
    /// entry never lives long enough to meet its stamp again, `purge` drops them all).
    stamp: u32,
    /// Whether this slab slot holds a source (free slots are kept for reuse).
    live: bool,
    trusted: bool,
    pub rate: Rate,
    pub failures: Failures,
    /// Progress per sequence; a handful of entries at most (bounded by the doors).
    progress: ProgressList,
}

impl Source {
    /// Puts this source's progress records into `into` (emptied first), for the sequence
    /// matcher to work on; [`Source::set_progress`] stores them back.
    pub fn progress_into(&self, into: &mut Vec<(SeqKey, Progress)>) {
        into.clear();
        match &self.progress {
            ProgressList::Empty => {}
            ProgressList::One(packed) => into.push(packed.unpack()),
            ProgressList::Many(many) => into.extend_from_slice(&many.0),
        }
    }

    /// Replaces this source's progress records.
    pub fn set_progress(&mut self, records: &[(SeqKey, Progress)]) {
        let one = match records {
            [(key, progress)] => Packed::new(*key, *progress),
            _ => None,
        };
        self.progress = match (records, one) {
            ([], _) => ProgressList::Empty,
            (_, Some(packed)) => ProgressList::One(packed),
            _ => match std::mem::take(&mut self.progress) {
                // Reuse the allocation a source with several records already has.
                ProgressList::Many(mut many) => {
                    many.0.clear();
                    many.0.extend_from_slice(records);
                    ProgressList::Many(many)
                }
                _ => ProgressList::Many(Box::new(Many(records.to_vec()))),
            },
        };
    }

    /// Forgets this source's progress.
    pub fn clear_progress(&mut self) {
        self.progress = ProgressList::Empty;
    }

    /// Progress records held.
    pub fn progress_len(&self) -> usize {
        match &self.progress {
            ProgressList::Empty => 0,
            ProgressList::One(_) => 1,
            ProgressList::Many(many) => many.0.len(),
        }
    }

    /// Drops progress started before `horizon`.
    fn forget_progress_before(&mut self, horizon: Micros) {
        match &mut self.progress {
            ProgressList::Empty => {}
            ProgressList::One(packed) => {
                if packed.started < horizon {
                    self.progress = ProgressList::Empty;
                }
            }
            ProgressList::Many(many) => {
                many.0.retain(|(_, p)| p.started >= horizon);
                if many.0.is_empty() {
                    self.progress = ProgressList::Empty;
                }
            }
        }
    }
}

/// A source's progress records: none, one packed inline, or several on the heap. 16 bytes.
#[derive(Debug, Default, Clone)]
enum ProgressList {
    #[default]
    Empty,
    One(Packed),
    Many(Box<Many>),
}

/// Several progress records (a thin pointer keeps [`ProgressList`] at 16 bytes).
#[derive(Debug, Clone)]
struct Many(Vec<(SeqKey, Progress)>);

/// Which kind of sequence a [`Packed`] record is for ([`SeqKey`]'s variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Open,
    Close,
    OneTime,
    Totp,
}

/// One `(SeqKey, Progress)` in 16 bytes instead of 32: the TOTP step as `u32` (steps of a
/// second or longer fit until 2106; a record whose step does not fit is kept unpacked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed {
    started: Micros,
    step: u32,
    door: u16,
    kind: Kind,
    matched: u8,
}

impl Packed {
    fn new(key: SeqKey, progress: Progress) -> Option<Self> {
        let (kind, door, step) = match key {
            SeqKey::Open(door) => (Kind::Open, door, 0),
            SeqKey::Close(door) => (Kind::Close, door, 0),
            SeqKey::OneTime(door) => (Kind::OneTime, door, 0),
            SeqKey::Totp(door, step) => (Kind::Totp, door, u32::try_from(step).ok()?),
        };
        Some(Self {
            started: progress.started,
            step,
            door,
            kind,
            matched: progress.matched,
        })
    }

    fn unpack(self) -> (SeqKey, Progress) {
        let key = match self.kind {
            Kind::Open => SeqKey::Open(self.door),
            Kind::Close => SeqKey::Close(self.door),
            Kind::OneTime => SeqKey::OneTime(self.door),
            Kind::Totp => SeqKey::Totp(self.door, u64::from(self.step)),
        };
        let progress = Progress {
            matched: self.matched,
            started: self.started,
        };
        (key, progress)
    }
}

/// The bounded table of sources and the bounded blacklist.
///
/// Sources live in a slab whose slots never move (a removed source's slot is listed in `free`
/// and reused), found through a small index (address → slot). The eviction queues name
/// (slot, stamp), so checking and evicting their oldest entry needs no hashing but the one
/// removal from the index. The index has twice as many buckets as it ever holds entries,
/// which is what keeps a hash table from regrowing under churn: removals leave tombstones,
/// and the table only rehashes in place (instead of doubling) while it is at most half full.
#[derive(Debug)]
pub struct Sources {
    index: HashMap<IpAddr, u32>,
    slots: Vec<(IpAddr, Source)>,
    free: Vec<u32>,
    untrusted: VecDeque<(u32, u32)>,
    trusted: VecDeque<(u32, u32)>,
    stamp: u32,
    cap: usize,
    blacklist: HashMap<IpAddr, Micros>,
    blacklist_order: VecDeque<(IpAddr, Micros)>,
    evicted: u64,
}

/// Whether the queue entry `(slot, stamp)` of the queue for `trusted` sources is live: the
/// slot holds the very source it was queued for (a source re-created in a reused slot has
/// another stamp), still in that queue.
fn queued(slots: &[(IpAddr, Source)], (slot, stamp): (u32, u32), trusted: bool) -> bool {
    slots
        .get(slot as usize)
        .is_some_and(|(_, s)| s.live && s.stamp == stamp && s.trusted == trusted)
}

impl Sources {
    /// A table for at most `cap` sources. Its memory (index, slab, free list and the queue
    /// of untrusted sources, at their largest) is reserved up front, but only the index's
    /// control bytes are written (64 KiB at the default cap): pages become resident as
    /// sources arrive. It is never regrown or shrunk, so a flood reaches a fixed ceiling
    /// instead of leaving freed tables behind in the allocator or holding two during a
    /// rehash.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            index: HashMap::with_capacity(2 * cap),
            slots: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            untrusted: VecDeque::with_capacity(queue_limit(cap) + 1),
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
        self.index
            .reserve((2 * self.cap).saturating_sub(self.index.len()));
        self.slots
            .reserve(self.cap.saturating_sub(self.slots.len()));
        self.free.reserve(self.cap.saturating_sub(self.free.len()));
        let queue = queue_limit(self.cap) + 1;
        self.untrusted
            .reserve(queue.saturating_sub(self.untrusted.len()));
        while self.len() > self.cap && self.evict_one() {}
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
        if let Some(source) = self.get_mut(address) {
            source.clear_progress();
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
        let slot = match self.index.get(&address) {
            Some(slot) => *slot,
            None => {
                while self.len() >= self.cap && self.evict_one() {}
                self.stamp = self.stamp.wrapping_add(1);
                let source = Source {
                    stamp: self.stamp,
                    live: true,
                    ..Source::default()
                };
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.slots[slot as usize] = (address, source);
                        slot
                    }
                    None => {
                        self.slots.push((address, source));
                        // At most `cap` slots, and the config caps that far below u32::MAX.
                        (self.slots.len() - 1) as u32
                    }
                };
                self.index.insert(address, slot);
                self.untrusted.push_back((slot, self.stamp));
                self.compact();
                slot
            }
        };
        &mut self.slots[slot as usize].1
    }

    /// Removes the source in `slot` (which must be live) and frees the slot.
    fn remove_slot(&mut self, slot: u32) {
        let (address, source) = &mut self.slots[slot as usize];
        self.index.remove(address);
        *source = Source::default();
        self.free.push(slot);
    }

    /// Protects `address` from eviction by untrusted newcomers (it matched real progress).
    pub fn trust(&mut self, address: IpAddr) {
        let Some(&slot) = self.index.get(&address) else {
            return;
        };
        let source = &mut self.slots[slot as usize].1;
        if source.trusted {
            return;
        }
        source.trusted = true;
        self.trusted.push_back((slot, source.stamp));
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
                let Some(entry) = queue.pop_front() else {
                    break;
                };
                // Skip entries that are not the one queued (removed or re-created since, or
                // moved to the other queue).
                if queued(&self.slots, entry, trusted) {
                    self.remove_slot(entry.0);
                    self.evicted += 1;
                    return true;
                }
            }
        }
        false
    }

    /// Drops stale queue entries once a queue outgrows the cap by a quarter.
    fn compact(&mut self) {
        let limit = queue_limit(self.cap);
        let slots = &self.slots;
        for (queue, trusted) in [(&mut self.untrusted, false), (&mut self.trusted, true)] {
            if queue.len() > limit {
                queue.retain(|entry| queued(slots, *entry, trusted));
            }
        }
    }

    /// Forgets what no longer matters at `now`: progress older than `horizon`, failures
    /// outside `window`, expired blacklist entries (the source table keeps its reserved size;
    /// the blacklist gives memory back).
    pub fn purge(&mut self, now: Micros, horizon: Micros, window: Micros) {
        for slot in 0..self.slots.len() {
            let source = &mut self.slots[slot].1;
            if !source.live {
                continue;
            }
            source.forget_progress_before(horizon);
            if source.progress_len() == 0
                && !source.failures.live(now, window)
                && !source.rate.live(now)
            {
                self.remove_slot(slot as u32);
            }
        }
        self.blacklist.retain(|_, until| *until > now);
        let (slots, blacklist) = (&self.slots, &self.blacklist);
        self.untrusted.retain(|entry| queued(slots, *entry, false));
        self.trusted.retain(|entry| queued(slots, *entry, true));
        self.blacklist_order
            .retain(|(a, u)| blacklist.get(a) == Some(u));
        if self.blacklist.capacity() > 4 * self.blacklist.len() + 1024 {
            self.blacklist.shrink_to_fit();
            self.blacklist_order.shrink_to_fit();
        }
    }

    /// Forgets every source's progress (after a reconfiguration renumbers the doors).
    pub fn forget_progress(&mut self) {
        for (_, source) in &mut self.slots {
            source.clear_progress();
        }
    }

    pub fn get_mut(&mut self, address: IpAddr) -> Option<&mut Source> {
        let slot = *self.index.get(&address)? as usize;
        self.slots.get_mut(slot).map(|(_, source)| source)
    }

    /// The live sources, with their addresses.
    fn live(&self) -> impl Iterator<Item = &(IpAddr, Source)> {
        self.slots.iter().filter(|(_, s)| s.live)
    }

    /// Sources tracked now (at most the cap).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Progress records over all sources.
    pub fn progress_entries(&self) -> usize {
        self.live().map(|(_, s)| s.progress_len()).sum()
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

/// How long a queue may grow before its stale entries are dropped. Each queue holds at most
/// one live entry per source, so past this many at least a fifth are stale: dropping them
/// costs O(1) per push, amortized.
fn queue_limit(cap: usize) -> usize {
    cap + cap / 4 + 16
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

    /// A flood fills the table to the cap, so the size of one entry is the memory bound
    /// (`max-sources` × this, twice over for the hash table's spare buckets): keep it small.
    #[test]
    fn a_source_entry_is_small() {
        assert_eq!(std::mem::size_of::<Packed>(), 16);
        assert_eq!(std::mem::size_of::<ProgressList>(), 16);
        assert!(std::mem::size_of::<Source>() <= 48);
        assert!(std::mem::size_of::<(IpAddr, Source)>() <= 72);
        assert!(std::mem::size_of::<(u32, u32)>() <= 8);
    }

    /// A flood's worth of new sources reaching stage 1 never regrows the table or the
    /// queue (no second copy during a rehash, nothing freed left behind) and keeps the
    /// newest within the cap.
    #[test]
    fn a_flood_fills_the_reserved_table_without_regrowing_it() {
        let cap = 1000;
        let mut t = Sources::new(cap);
        let capacities = |t: &Sources| {
            (
                t.index.capacity(),
                t.slots.capacity(),
                t.free.capacity(),
                t.untrusted.capacity(),
            )
        };
        let reserved = capacities(&t);
        let record = [(
            SeqKey::Open(0),
            Progress {
                matched: 1,
                started: 7,
            },
        )];
        for n in 0..20 * cap as u32 {
            t.entry(v4(n)).set_progress(&record);
            assert!(t.len() <= cap);
            // The index's reported capacity is items + room left: deleted entries leave
            // tombstones that lower it until an in-place rehash (no allocation) clears them,
            // so it may dip, but it must never grow past what was reserved.
            let now = capacities(&t);
            assert!(
                now.0 <= reserved.0 && now.0 >= cap,
                "{now:?} vs {reserved:?}"
            );
        }
        let after = capacities(&t);
        assert_eq!(
            (after.1, after.2, after.3),
            (reserved.1, reserved.2, reserved.3)
        );
        assert_eq!(t.len(), cap);
        assert_eq!(t.progress_entries(), cap);
        assert_eq!(t.evicted(), 19 * cap as u64);
    }

    fn key() -> impl proptest::strategy::Strategy<Value = SeqKey> {
        use proptest::prelude::*;
        prop_oneof![
            any::<u16>().prop_map(SeqKey::Open),
            any::<u16>().prop_map(SeqKey::Close),
            any::<u16>().prop_map(SeqKey::OneTime),
            (
                any::<u16>(),
                prop_oneof![any::<u64>(), 0..=u64::from(u32::MAX)]
            )
                .prop_map(|(d, s)| SeqKey::Totp(d, s)),
        ]
    }

    proptest::proptest! {
        /// Progress stored in a source comes back exactly as it went in (keys, stages, start
        /// times and order), however many records and whatever the TOTP step, also when a
        /// source's list grows and shrinks again.
        #[test]
        fn progress_round_trips(
            lists in proptest::collection::vec(
                proptest::collection::vec((key(), 1u8..=255, proptest::prelude::any::<u64>()), 0..5),
                1..6,
            ),
        ) {
            let mut source = Source::default();
            let mut back = Vec::new();
            for list in lists {
                let records: Vec<(SeqKey, Progress)> = list
                    .into_iter()
                    .map(|(k, matched, started)| (k, Progress { matched, started }))
                    .collect();
                source.set_progress(&records);
                source.progress_into(&mut back);
                proptest::prop_assert_eq!(&back, &records);
                proptest::prop_assert_eq!(source.progress_len(), records.len());
            }
            source.clear_progress();
            source.progress_into(&mut back);
            proptest::prop_assert!(back.is_empty());
        }

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
                            t.live().filter(|(_, s)| s.trusted).map(|(a, _)| *a).collect();
                        let any_untrusted = t.live().any(|(_, s)| !s.trusted);
                        t.entry(v4(n));
                        if any_untrusted {
                            for a in trusted {
                                proptest::prop_assert!(t.index.contains_key(&a), "trusted {a} evicted");
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
                let trusted = t.live().filter(|(_, s)| s.trusted).count();
                let untrusted_live = t.untrusted.iter()
                    .filter(|entry| queued(&t.slots, **entry, false))
                    .count();
                proptest::prop_assert_eq!(untrusted_live + trusted, t.len());
                // The index, the slab and the free list agree; the slab never outgrows the cap.
                proptest::prop_assert!(t.slots.len() <= cap);
                proptest::prop_assert_eq!(t.live().count(), t.len());
                proptest::prop_assert_eq!(t.len() + t.free.len(), t.slots.len());
                for (slot, (address, source)) in t.slots.iter().enumerate() {
                    if source.live {
                        proptest::prop_assert_eq!(t.index.get(address), Some(&(slot as u32)));
                    } else {
                        proptest::prop_assert!(t.free.contains(&(slot as u32)));
                    }
                }
            }
        }
    }
}
