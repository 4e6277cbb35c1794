//! Keeping public-key work for packets that deserve it: a bounded memory of recently
//! authenticated packets (a replay is dropped after mac1, before any Diffie-Hellman) and a
//! token bucket per source address in front of the handshake, so one source cannot starve the
//! others. Both are I/O-free and take the time as a parameter.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use spa_shared::Micros;

/// Authenticated packets remembered (by their Noise ephemeral key), oldest forgotten first.
pub const RECENT_PACKETS: usize = 1 << 16;
/// Sources with their own bucket; beyond this, sources without one share a single bucket.
pub const MAX_SOURCES: usize = 1 << 16;

/// The last [`RECENT_PACKETS`] authenticated packets, keyed by their ephemeral public key
/// (the first 32 bytes: fresh for every packet a client seals). Only packets that passed the
/// whole handshake, or whose encrypted client key opened but named no configured client, are
/// inserted: either takes the packet's ephemeral private key, so someone who merely sees a
/// packet in flight cannot poison the memory against it. A replay of a packet forgotten here still fails the replay journal;
/// it only costs the handshake again.
#[derive(Debug, Default)]
pub struct RecentPackets {
    known: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

impl RecentPackets {
    pub fn contains(&self, ephemeral: &[u8; 32]) -> bool {
        self.known.contains(ephemeral)
    }

    pub fn insert(&mut self, ephemeral: [u8; 32]) {
        if !self.known.insert(ephemeral) {
            return;
        }
        self.order.push_back(ephemeral);
        if self.order.len() > RECENT_PACKETS {
            if let Some(old) = self.order.pop_front() {
                self.known.remove(&old);
            }
        }
    }

    /// Forgets a packet refused for where it came from, not for what it is: the same bytes
    /// from the right address must still reach the handshake (a man-on-the-side who races a
    /// withheld packet from his own address must not lock its owner out).
    pub fn forget(&mut self, ephemeral: &[u8; 32]) {
        self.known.remove(ephemeral);
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Micros,
}

impl Bucket {
    fn refill(&mut self, now: Micros, per_micro: f64, burst: f64) {
        let elapsed = now.saturating_sub(self.at) as f64;
        self.tokens = (self.tokens + elapsed * per_micro).min(burst);
        self.at = self.at.max(now);
    }
}

/// A token bucket per source: `rate` handshakes per second, up to `burst` at once. IPv6
/// sources are grouped by /64 (one host usually owns a whole /64).
#[derive(Debug)]
pub struct SourceBuckets {
    per_micro: f64,
    burst: f64,
    buckets: HashMap<u128, Bucket>,
    overflow: Bucket,
    swept_at: Micros,
}

/// IPv4 as its mapped IPv6 form (low 64 bits never zero); IPv6 as its /64 (low 64 bits zero).
fn source_key(source: IpAddr) -> u128 {
    match source {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6) & !((1u128 << 64) - 1),
    }
}

impl SourceBuckets {
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_micro: f64::from(rate) / 1e6,
            burst,
            buckets: HashMap::new(),
            overflow: Bucket {
                tokens: burst,
                at: 0,
            },
            swept_at: 0,
        }
    }

    /// Takes one token for `source`; `false` means: no handshake for this packet.
    pub fn take(&mut self, source: IpAddr, now: Micros) -> bool {
        let key = source_key(source);
        let (per_micro, burst) = (self.per_micro, self.burst);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_SOURCES {
            self.sweep(now);
        }
        let bucket = if self.buckets.len() < MAX_SOURCES || self.buckets.contains_key(&key) {
            self.buckets.entry(key).or_insert(Bucket {
                tokens: burst,
                at: now,
            })
        } else {
            &mut self.overflow
        };
        bucket.refill(now, per_micro, burst);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets buckets that are full again (they behave like a new one); at most every 100 ms.
    fn sweep(&mut self, now: Micros) {
        if now.saturating_sub(self.swept_at) < 100_000 {
            return;
        }
        self.swept_at = now;
        let (per_micro, burst) = (self.per_micro, self.burst);
        self.buckets.retain(|_, b| {
            b.refill(now, per_micro, burst);
            b.tokens < burst
        });
    }

    pub fn sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Micros = 1_700_000_000_000_000;

    #[test]
    fn recent_packets_are_bounded_and_forget_the_oldest() {
        let mut recent = RecentPackets::default();
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k
        };
        recent.insert(key(0));
        recent.insert(key(0));
        assert!(recent.contains(&key(0)));
        assert_eq!(recent.len(), 1);
        for i in 1..=RECENT_PACKETS as u32 {
            recent.insert(key(i));
        }
        assert_eq!(recent.len(), RECENT_PACKETS);
        assert!(!recent.contains(&key(0)), "oldest forgotten");
        assert!(recent.contains(&key(1)) && recent.contains(&key(RECENT_PACKETS as u32)));
    }

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate_and_sources_are_independent() {
        let mut buckets = SourceBuckets::new(10, 3);
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "198.51.100.8".parse().unwrap();
        assert!((0..3).all(|_| buckets.take(a, NOW)));
        assert!(!buckets.take(a, NOW), "burst spent");
        assert!(buckets.take(b, NOW), "another source is not affected");
        assert!(!buckets.take(a, NOW + 99_000));
        assert!(
            buckets.take(a, NOW + 100_000),
            "one token per 100 ms at 10/s"
        );
        assert!(!buckets.take(a, NOW + 100_000));
        // Refill never exceeds the burst.
        assert!((0..3).all(|_| buckets.take(a, NOW + 60_000_000)));
        assert!(!buckets.take(a, NOW + 60_000_000));
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64() {
        let mut buckets = SourceBuckets::new(1, 1);
        assert!(buckets.take("2001:db8:1:2::1".parse().unwrap(), NOW));
        assert!(!buckets.take("2001:db8:1:2::ffff".parse().unwrap(), NOW));
        assert!(buckets.take("2001:db8:1:3::1".parse().unwrap(), NOW));
        // An IPv4 address never collides with an IPv6 /64.
        assert!(buckets.take("0.0.0.0".parse().unwrap(), NOW));
        assert!(buckets.take("::".parse().unwrap(), NOW));
    }

    #[test]
    fn the_table_of_sources_is_bounded_under_a_spoofed_flood() {
        let mut buckets = SourceBuckets::new(1, 1);
        for i in 0..(MAX_SOURCES as u32 + 1000) {
            buckets.take(IpAddr::V4(i.into()), NOW);
        }
        assert_eq!(buckets.sources(), MAX_SOURCES);
        // Later, the table is swept of refilled buckets and new sources get their own again.
        let later = NOW + 10_000_000;
        assert!(buckets.take("203.0.113.1".parse().unwrap(), later));
        assert!(buckets.sources() < 10);
    }
}
