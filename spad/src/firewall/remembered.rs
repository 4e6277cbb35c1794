//! What the nftables backend knows of its grants, for a repair after someone deleted the whole
//! table (the kernel's copy is gone then): each grant and blacklist element with its end, and
//! each idle element with the instant by which the kernel would let it lapse as last shown.
//!
//! A repair restores only what is still due by that knowledge (fail closed). An idle timer is
//! re-armed in the kernel by traffic, unseen: spad knows a lower bound of when it lapses (its
//! own add + the idle timeout, or a read's start + the time left the kernel reported), never
//! the true instant. So an idle grant kept alive by traffic since spad last looked is not
//! restored; its established connections go on (conntrack), and new ones need a new knock.
//! Every kernel read raises the bound: the loop's own reads replace the memory, and an
//! off-loop read (`spad status`, `spad list`, a scrape) hands what it saw back as a [`Seen`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::nftables::{Carried, Existing};
use super::plan::{SetId, SetRole};

/// One remembered element.
#[derive(Debug, Clone)]
struct Entry {
    element: Carried,
    /// When it ends for good: a grant's or blacklist entry's end; an idle element's grant's.
    end: Instant,
    /// An idle element's lapse as last shown (never later than the kernel's): see the module.
    lapse: Option<Instant>,
    /// When spad last learned of it: a read that started before cannot tell more.
    known_at: Instant,
}

impl Entry {
    /// Until when a repair may restore it.
    fn due(&self) -> Instant {
        self.lapse.map_or(self.end, |lapse| lapse.min(self.end))
    }
}

/// Grants and blacklist entries this daemon knows of (see the module). Indexed by address
/// (an address has a handful of entries, one per set): every grant and every element event
/// the monitor sees updates it, so each update must cost the same with 10 or 100,000 grants
/// live (a list scanned per update made granting quadratic under load).
#[derive(Debug, Default)]
pub(crate) struct Remembered {
    by_address: HashMap<IpAddr, Vec<Entry>>,
    /// Addresses left after expired entries were last dropped (see [`Self::forget_expired`]).
    addresses_after_pruning: usize,
}

/// Addresses remembered before expired entries are looked for at all.
pub(crate) const REMEMBERED_PRUNE_FLOOR: usize = 4096;

/// The name of the grant set an idle element's access also needs.
fn grant_set_of(idle: &str) -> Option<String> {
    let id = SetId::parse_nft(idle).filter(|id| id.role == SetRole::Idle)?;
    Some(SetId::grant(&id.service, id.family).nft_name())
}

fn is_idle(set: &str) -> bool {
    SetId::parse_nft(set).is_some_and(|id| id.role == SetRole::Idle)
}

impl Remembered {
    /// Takes the kernel's view, read from `read_started` on: each element ends at the read's
    /// start plus the time left it reported (a lower bound: the read came later). An idle
    /// element is kept only with its grant.
    pub(crate) fn replace_from(&mut self, existing: &Existing, read_started: Instant) {
        let mut fresh = Remembered::default();
        for c in existing.elements.iter().filter(|c| !is_idle(&c.set)) {
            if SetId::parse_nft(&c.set).is_some() {
                fresh.add(c.clone(), read_started + c.remaining, read_started);
            }
        }
        for c in existing.elements.iter().filter(|c| is_idle(&c.set)) {
            fresh.add_idle(c.clone(), read_started + c.remaining, read_started);
        }
        fresh.addresses_after_pruning = fresh.by_address.len();
        *self = fresh;
    }

    /// When the entry of `set` for `address` ends for good, if there is one.
    pub(crate) fn end(&self, set: &str, address: IpAddr) -> Option<Instant> {
        self.entry(set, address).map(|e| e.end)
    }

    /// Until when a repair would restore the entry of `set` for `address`, if at all.
    #[cfg(test)]
    pub(crate) fn due(&self, set: &str, address: IpAddr) -> Option<Instant> {
        self.entry(set, address).map(Entry::due)
    }

    fn entry(&self, set: &str, address: IpAddr) -> Option<&Entry> {
        self.by_address
            .get(&address)?
            .iter()
            .find(|e| e.element.set == set)
    }

    fn put(&mut self, entry: Entry) {
        let entries = self.by_address.entry(entry.element.address).or_default();
        entries.retain(|e| e.element.set != entry.element.set);
        entries.push(entry);
    }

    /// A grant or blacklist element, learned at `now`, ending at `end`.
    pub(crate) fn add(&mut self, element: Carried, end: Instant, now: Instant) {
        self.put(Entry {
            element,
            end,
            lapse: None,
            known_at: now,
        });
    }

    /// An idle element, learned at `now`, that the kernel lets lapse at `lapse` at the
    /// earliest; kept only while its grant is remembered, and ends with it.
    pub(crate) fn add_idle(&mut self, element: Carried, lapse: Instant, now: Instant) {
        let Some(end) = grant_set_of(&element.set).and_then(|g| self.end(&g, element.address))
        else {
            return;
        };
        self.put(Entry {
            element,
            end,
            lapse: Some(lapse),
            known_at: now,
        });
    }

    pub(crate) fn remove(&mut self, set: &str, address: IpAddr) {
        if let Some(entries) = self.by_address.get_mut(&address) {
            entries.retain(|e| e.element.set != set);
            if entries.is_empty() {
                self.by_address.remove(&address);
            }
        }
    }

    /// Keeps only the entries `keep` says yes to.
    pub(crate) fn retain(&mut self, keep: impl Fn(&Carried) -> bool) {
        self.by_address.retain(|_, entries| {
            entries.retain(|e| keep(&e.element));
            !entries.is_empty()
        });
    }

    /// Drops entries that ended before `now` (the kernel may not announce an expiry), once the
    /// number of addresses has doubled since the last time: amortised O(1) per grant, and the
    /// memory stays within twice what is live. An idle entry stays until its grant ends: a
    /// later read may show it re-armed by traffic.
    pub(crate) fn forget_expired(&mut self, now: Instant) {
        if self.by_address.len() < REMEMBERED_PRUNE_FLOOR.max(2 * self.addresses_after_pruning) {
            return;
        }
        self.by_address.retain(|_, entries| {
            entries.retain(|e| e.end > now);
            !entries.is_empty()
        });
        self.addresses_after_pruning = self.by_address.len();
    }

    /// Raises the idle lapses with what a read made elsewhere saw. Only idle entries known
    /// before the read started are touched, and only moved later: an entry learned, removed
    /// or re-added during the read keeps what the loop knows (a grant made meanwhile is not
    /// forgotten, a revoked one not brought back), and nothing is added.
    pub(crate) fn learn(&mut self, seen: &Seen) {
        for (set, address, remaining) in &seen.idle {
            let Some(entries) = self.by_address.get_mut(address) else {
                continue;
            };
            let Some(entry) = entries.iter_mut().find(|e| e.element.set == *set) else {
                continue;
            };
            if entry.known_at > seen.started {
                continue;
            }
            let shown = seen.started + *remaining;
            entry.lapse = Some(entry.lapse.map_or(shown, |lapse| lapse.max(shown)));
        }
    }

    /// What a repair restores at `now`: what is still due, as a table's view with time left
    /// (at most each element's own timeout; an idle element's up to its lapse and never past
    /// its grant), ordered by set and address.
    pub(crate) fn alive(&self, now: Instant) -> Existing {
        let mut elements: Vec<Carried> = self
            .by_address
            .values()
            .flatten()
            .filter(|e| e.due() > now)
            .map(|e| Carried {
                remaining: (e.due() - now).min(e.element.timeout),
                ..e.element.clone()
            })
            .collect();
        elements.sort_by(|a, b| (&a.set, a.address).cmp(&(&b.set, b.address)));
        let mut sets: Vec<String> = elements.iter().map(|c| c.set.clone()).collect();
        sets.sort();
        sets.dedup();
        Existing {
            chains: Vec::new(),
            sets,
            elements,
        }
    }

    #[cfg(test)]
    pub(crate) fn addresses(&self) -> usize {
        self.by_address.len()
    }
}

/// The idle elements a read of the kernel made off the loop saw, and when it started.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    started: Instant,
    idle: Vec<(String, IpAddr, Duration)>,
}

impl Seen {
    pub(crate) fn of(existing: &Existing, started: Instant) -> Self {
        Self {
            started,
            idle: existing
                .elements
                .iter()
                .filter(|c| is_idle(&c.set))
                .map(|c| (c.set.clone(), c.address, c.remaining))
                .collect(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.idle.is_empty()
    }
}

/// Where off-loop readers leave their latest [`Seen`] for the backend on the loop (the newest
/// read wins; the loop takes it at its next grant or repair).
#[derive(Debug, Clone, Default)]
pub(crate) struct Mailbox(Arc<Mutex<Option<Seen>>>);

impl Mailbox {
    pub(crate) fn leave(&self, seen: Seen) {
        if let Ok(mut slot) = self.0.lock() {
            if slot.as_ref().is_none_or(|old| old.started <= seen.started) {
                *slot = Some(seen);
            }
        }
    }

    /// The read left since the last take (a reader holds the lock only to leave one).
    pub(crate) fn take(&self) -> Option<Seen> {
        self.0.lock().ok()?.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(set: &str, address: &str, timeout_ms: u64, remaining_ms: u64) -> Carried {
        Carried {
            set: set.into(),
            address: address.parse().unwrap(),
            timeout: Duration::from_millis(timeout_ms),
            remaining: Duration::from_millis(remaining_ms),
            owner: "alice".into(),
        }
    }

    fn left(memory: &Remembered, at: Instant) -> Vec<(String, u128)> {
        memory
            .alive(at)
            .elements
            .iter()
            .map(|c| (format!("{} {}", c.set, c.address), c.remaining.as_millis()))
            .collect()
    }

    fn pair(text: &str, ms: u128) -> (String, u128) {
        (text.to_string(), ms)
    }

    /// The kernel's reading: an idle element comes back only until it lapses as read (with
    /// that much time left, never more), never past its grant, never without its grant.
    #[test]
    fn an_idle_element_is_restored_only_until_it_lapses_as_last_read() {
        let now = Instant::now();
        let mut memory = Remembered::default();
        let existing = Existing {
            chains: Vec::new(),
            sets: vec!["a4_vpn".into(), "i4_vpn".into()],
            elements: vec![
                element("a4_vpn", "198.51.100.7", 3_600_000, 2_000),
                element("i4_vpn", "198.51.100.7", 4_000, 500),
                element("a4_vpn", "198.51.100.8", 3_600_000, 3_000_000),
                element("i4_vpn", "198.51.100.8", 4_000, 3_000),
                element("i4_vpn", "198.51.100.9", 4_000, 500),
            ],
        };
        memory.replace_from(&existing, now);
        assert_eq!(
            left(&memory, now + Duration::from_millis(400)),
            vec![
                pair("a4_vpn 198.51.100.7", 1_600),
                pair("a4_vpn 198.51.100.8", 2_999_600),
                pair("i4_vpn 198.51.100.7", 100),
                pair("i4_vpn 198.51.100.8", 2_600),
            ],
            "198.51.100.9 has no grant"
        );
        // Past its lapse an idle element is not restored although its grant is live.
        assert_eq!(
            left(&memory, now + Duration::from_millis(1_000)),
            vec![
                pair("a4_vpn 198.51.100.7", 1_000),
                pair("a4_vpn 198.51.100.8", 2_999_000),
                pair("i4_vpn 198.51.100.8", 2_000),
            ]
        );
        assert_eq!(
            left(&memory, now + Duration::from_millis(3_000)),
            vec![pair("a4_vpn 198.51.100.8", 2_997_000)]
        );
        memory.remove("a4_vpn", "198.51.100.8".parse().unwrap());
        memory.remove("i4_vpn", "198.51.100.8".parse().unwrap());
        assert!(memory.alive(now).elements.len() == 2);
    }

    /// spad's own grant: the idle element lapses one idle timeout after it, at the latest
    /// with the grant; an idle element whose grant spad does not know is not taken.
    #[test]
    fn an_own_idle_grant_lapses_after_its_idle_timeout() {
        let now = Instant::now();
        let mut memory = Remembered::default();
        let grant = element("a4_vpn", "198.51.100.7", 10_000, 10_000);
        let idle = element("i4_vpn", "198.51.100.7", 4_000, 4_000);
        memory.add_idle(idle.clone(), now + Duration::from_secs(4), now);
        assert_eq!(memory.due("i4_vpn", idle.address), None, "no grant yet");
        memory.add(grant.clone(), now + Duration::from_secs(10), now);
        memory.add_idle(idle.clone(), now + Duration::from_secs(4), now);
        assert_eq!(
            memory.due("i4_vpn", idle.address),
            Some(now + Duration::from_secs(4))
        );
        assert_eq!(
            memory.end("i4_vpn", idle.address),
            Some(now + Duration::from_secs(10))
        );
        assert_eq!(
            left(&memory, now + Duration::from_secs(5)),
            vec![pair("a4_vpn 198.51.100.7", 5_000)]
        );
        // An idle timeout longer than what is left of the grant ends with the grant.
        memory.add_idle(idle, now + Duration::from_secs(60), now);
        assert_eq!(
            memory.due("i4_vpn", grant.address),
            Some(now + Duration::from_secs(10))
        );
    }

    /// A read made off the loop moves a lapse later when it saw the element with more time
    /// left (traffic re-armed it); it never moves one earlier, never touches an entry learned
    /// during the read, and never brings back one removed meanwhile.
    #[test]
    fn a_read_elsewhere_only_raises_lapses_known_before_it_started() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut memory = Remembered::default();
        let address = |last: u8| IpAddr::from([198, 51, 100, last]);
        for last in 1..=4 {
            let grant = Carried {
                address: address(last),
                ..element("a4_vpn", "0.0.0.0", 3_600_000, 3_600_000)
            };
            memory.add(grant, t0 + s(3600), t0);
            let idle = Carried {
                address: address(last),
                ..element("i4_vpn", "0.0.0.0", 4_000, 4_000)
            };
            memory.add_idle(idle, t0 + s(4), t0);
        }
        // A read starts at t0 + 10 s. During it, .2 is granted again and .3 revoked.
        let started = t0 + s(10);
        let regranted = Carried {
            address: address(2),
            ..element("i4_vpn", "0.0.0.0", 4_000, 4_000)
        };
        memory.add_idle(regranted, started + s(5), started + s(1));
        memory.remove("a4_vpn", address(3));
        memory.remove("i4_vpn", address(3));
        let seen = Seen {
            started,
            idle: vec![
                ("i4_vpn".into(), address(1), s(3)),
                ("i4_vpn".into(), address(2), s(1)),
                ("i4_vpn".into(), address(3), s(3)),
                ("i4_vpn".into(), address(9), s(3)),
            ],
        };
        memory.learn(&seen);
        assert_eq!(memory.due("i4_vpn", address(1)), Some(started + s(3)));
        assert_eq!(
            memory.due("i4_vpn", address(2)),
            Some(started + s(5)),
            "a grant made during the read keeps its own lapse"
        );
        assert_eq!(
            memory.due("i4_vpn", address(3)),
            None,
            "revoked stays revoked"
        );
        assert_eq!(memory.due("i4_vpn", address(9)), None, "nothing is added");
        assert_eq!(
            memory.due("i4_vpn", address(4)),
            Some(t0 + s(4)),
            "not seen: unchanged"
        );
        // An older reading never lowers a lapse.
        let older = Seen {
            started,
            idle: vec![("i4_vpn".into(), address(1), s(1))],
        };
        memory.learn(&older);
        assert_eq!(memory.due("i4_vpn", address(1)), Some(started + s(3)));
    }

    #[test]
    fn the_mailbox_keeps_the_newest_read_and_hands_it_out_once() {
        let mailbox = Mailbox::default();
        let now = Instant::now();
        let seen = |started| Seen {
            started,
            idle: Vec::new(),
        };
        mailbox.leave(seen(now + Duration::from_secs(2)));
        mailbox.leave(seen(now));
        assert_eq!(
            mailbox.take().map(|s| s.started),
            Some(now + Duration::from_secs(2))
        );
        assert!(mailbox.take().is_none());
    }

    #[test]
    fn remembered_entries_are_per_set_and_address_and_expired_ones_are_forgotten() {
        let now = Instant::now();
        let mut memory = Remembered::default();
        let address = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let entry = |set: &str, i: u32| Carried {
            set: set.into(),
            address: address(i),
            timeout: Duration::from_secs(30),
            remaining: Duration::from_secs(30),
            owner: "alice".into(),
        };
        // Short-lived grants, enough to cross the pruning floor.
        for i in 0..REMEMBERED_PRUNE_FLOOR as u32 {
            memory.add(entry("a4_ssh", i), now + Duration::from_secs(1), now);
        }
        // A second set for one address, then the same set again (replaced, not duplicated).
        memory.add(entry("a4_vpn", 0), now + Duration::from_secs(60), now);
        memory.add(entry("a4_ssh", 0), now + Duration::from_secs(90), now);
        assert_eq!(
            memory.end("a4_ssh", address(0)),
            Some(now + Duration::from_secs(90))
        );
        assert_eq!(
            memory.end("a4_vpn", address(0)),
            Some(now + Duration::from_secs(60))
        );
        assert_eq!(memory.end("a4_vpn", address(1)), None);
        memory.remove("a4_vpn", address(0));
        assert_eq!(memory.end("a4_vpn", address(0)), None);
        assert!(memory.end("a4_ssh", address(0)).is_some());
        // Later, the short ones have ended: the next grant forgets them.
        memory.forget_expired(now + Duration::from_secs(2));
        assert_eq!(memory.addresses(), 1, "only the 90 s grant is left");
        assert_eq!(memory.alive(now + Duration::from_secs(2)).elements.len(), 1);
        // Below the floor nothing is scanned.
        memory.add(entry("a4_ssh", 7), now, now);
        memory.forget_expired(now + Duration::from_secs(2));
        assert_eq!(memory.addresses(), 2);
    }
}
