//! Replay rules and the record that makes them survive restarts.
//!
//! A request is accepted only if its timestamp lies in `[now - max_age, now + max_future]`, is
//! above the client's *floor*, and was not accepted before. Per client the record keeps the
//! timestamps accepted inside the window (at most [`PER_CLIENT`]; when full, the oldest is
//! dropped and becomes the new floor, so nothing at or below it is ever accepted again).
//! Timestamps that age out of the window also raise the floor, so a clock set backwards cannot
//! revive them. Memory is bounded by `clients × PER_CLIENT`.
//!
//! The record is keyed by the client's public key. On disk it is an append-only [`journal`] of
//! checksummed entries, made durable in groups (one `fdatasync` per batch of packets) before the
//! firewall opens, so not even `kill -9` between the two can let a packet through twice.
//! [`ReplayRecord::encode`] is the legacy whole-file format, still read once to migrate.

use std::collections::BTreeMap;

use blake2::{Blake2s256, Digest};

use crate::keys::PublicKey;
use crate::reader::Reader;
use crate::Micros;

pub mod journal;

/// Timestamps remembered per client.
pub const PER_CLIENT: usize = 64;
const MAGIC: &[u8; 8] = b"SPAREPL1";

/// The acceptance window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub max_age: Micros,
    pub max_future: Micros,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            max_age: 60_000_000,
            max_future: 30_000_000,
        }
    }
}

/// Why a timestamp was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum ReplayError {
    #[error("stale: sent {0} ms before the window opens (check the client's clock)")]
    Stale(u64),
    #[error("from the future: {0} ms ahead (check the client's clock)")]
    Future(u64),
    #[error("replayed: this exact packet was accepted before")]
    Replayed,
    #[error("at or below this client's replay floor (older than a newer accepted packet set)")]
    BelowFloor,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ClientHistory {
    floor: Micros,
    seen: Vec<Micros>, // sorted ascending
}

/// Why a stored record could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("replay record is damaged (bad magic, length or checksum)")]
    Damaged,
}

/// The replay record of all clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayRecord {
    clients: BTreeMap<PublicKey, ClientHistory>,
}

impl ReplayRecord {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks a timestamp without changing anything.
    pub fn check(
        &self,
        window: Window,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) -> Result<(), ReplayError> {
        let oldest = now.saturating_sub(window.max_age);
        if timestamp < oldest {
            return Err(ReplayError::Stale((oldest - timestamp) / 1000));
        }
        let newest = now.saturating_add(window.max_future);
        if timestamp > newest {
            return Err(ReplayError::Future((timestamp - now) / 1000));
        }
        if let Some(history) = self.clients.get(client) {
            if timestamp <= history.floor {
                return Err(ReplayError::BelowFloor);
            }
            if history.seen.binary_search(&timestamp).is_ok() {
                return Err(ReplayError::Replayed);
            }
        }
        Ok(())
    }

    /// Checks and, if accepted, records the timestamp. Persist the record before acting on it.
    pub fn accept(
        &mut self,
        window: Window,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) -> Result<(), ReplayError> {
        self.check(window, client, timestamp, now)?;
        self.record_unchecked(window, client, timestamp, now);
        Ok(())
    }

    /// Records a timestamp accepted earlier (a journal entry being replayed at start): the same
    /// bookkeeping as [`accept`](Self::accept) without the window check, so replaying the journal
    /// with the original clock readings rebuilds exactly the state the daemon had. A timestamp
    /// already known (or at or below the floor) changes nothing.
    pub(crate) fn record_unchecked(
        &mut self,
        window: Window,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) {
        let history = self.clients.entry(*client).or_default();
        if timestamp <= history.floor || history.seen.binary_search(&timestamp).is_ok() {
            return;
        }
        let oldest = now.saturating_sub(window.max_age);
        // Aged-out entries become the floor: they can never be accepted again anyway.
        let aged = history.seen.partition_point(|&t| t < oldest);
        if aged > 0 {
            history.floor = history.floor.max(history.seen[aged - 1]);
            history.seen.drain(..aged);
        }
        let at = history.seen.partition_point(|&t| t < timestamp);
        history.seen.insert(at, timestamp);
        if history.seen.len() > PER_CLIENT {
            let dropped = history.seen.remove(0);
            history.floor = history.floor.max(dropped);
        }
    }

    /// Forgets clients that are no longer configured (bounded memory after config changes).
    pub fn retain_clients(&mut self, keep: impl Fn(&PublicKey) -> bool) {
        self.clients.retain(|key, _| keep(key));
    }

    /// Number of timestamps remembered in total.
    pub fn len(&self) -> usize {
        self.clients.values().map(|h| h.seen.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Serialises: magic, client count, per client (key, floor, count, timestamps), BLAKE2s.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.clients.len() * (44 + 8 * PER_CLIENT) + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.clients.len() as u32).to_be_bytes());
        for (key, history) in &self.clients {
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&history.floor.to_be_bytes());
            out.extend_from_slice(&(history.seen.len() as u32).to_be_bytes());
            for t in &history.seen {
                out.extend_from_slice(&t.to_be_bytes());
            }
        }
        let digest = Blake2s256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Parses [`encode`](Self::encode)'s output; any damage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let split = bytes.len().checked_sub(32).ok_or(RecordError::Damaged)?;
        let (body, digest) = bytes.split_at(split);
        if Blake2s256::digest(body).as_slice() != digest || !body.starts_with(MAGIC) {
            return Err(RecordError::Damaged);
        }
        let damaged = || RecordError::Damaged;
        let mut reader = Reader::new(&body[MAGIC.len()..]);
        let count = reader.be32().ok_or_else(damaged)?;
        let mut clients = BTreeMap::new();
        for _ in 0..count {
            let key = PublicKey(reader.array().ok_or_else(damaged)?);
            let floor = reader.be64().ok_or_else(damaged)?;
            let n = reader.be32().ok_or_else(damaged)? as usize;
            if n > PER_CLIENT {
                return Err(RecordError::Damaged);
            }
            let mut seen = Vec::with_capacity(n);
            for _ in 0..n {
                seen.push(reader.be64().ok_or_else(damaged)?);
            }
            if seen.windows(2).any(|w| w[0] >= w[1]) {
                return Err(RecordError::Damaged);
            }
            clients.insert(key, ClientHistory { floor, seen });
        }
        if !reader.rest().is_empty() {
            return Err(RecordError::Damaged);
        }
        Ok(Self { clients })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000;
    const NOW: u64 = 1_700_000_000 * S;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    #[test]
    fn window_edges() {
        let record = ReplayRecord::new();
        let w = Window::default();
        assert!(record.check(w, &key(1), NOW - 60 * S, NOW).is_ok());
        assert_eq!(
            record.check(w, &key(1), NOW - 61 * S, NOW),
            Err(ReplayError::Stale(1000))
        );
        assert!(record.check(w, &key(1), NOW + 30 * S, NOW).is_ok());
        assert_eq!(
            record.check(w, &key(1), NOW + 31 * S, NOW),
            Err(ReplayError::Future(31_000))
        );
    }

    #[test]
    fn same_timestamp_twice_is_a_replay_but_other_clients_are_independent() {
        let mut record = ReplayRecord::new();
        let w = Window::default();
        record.accept(w, &key(1), NOW, NOW).unwrap();
        assert_eq!(
            record.accept(w, &key(1), NOW, NOW + S),
            Err(ReplayError::Replayed)
        );
        record.accept(w, &key(2), NOW, NOW).unwrap();
        // Out-of-order but fresh packets from the same client are fine.
        record.accept(w, &key(1), NOW - 5 * S, NOW).unwrap();
    }

    #[test]
    fn capacity_raises_the_floor_and_memory_stays_bounded() {
        let mut record = ReplayRecord::new();
        let w = Window::default();
        for i in 0..(PER_CLIENT as u64 + 10) {
            record.accept(w, &key(1), NOW + i, NOW).unwrap();
        }
        assert_eq!(record.len(), PER_CLIENT);
        assert_eq!(
            record.check(w, &key(1), NOW + 5, NOW),
            Err(ReplayError::BelowFloor)
        );
    }

    #[test]
    fn aged_out_entries_become_the_floor_even_if_the_clock_goes_back() {
        let mut record = ReplayRecord::new();
        let w = Window::default();
        record.accept(w, &key(1), NOW, NOW).unwrap();
        record
            .accept(w, &key(1), NOW + 100 * S, NOW + 100 * S)
            .unwrap();
        assert_eq!(record.len(), 1);
        // Clock set back: the old packet is inside the window again but under the floor.
        assert_eq!(
            record.check(w, &key(1), NOW, NOW),
            Err(ReplayError::BelowFloor)
        );
    }

    #[test]
    fn encode_decode_and_damage() {
        let mut record = ReplayRecord::new();
        let w = Window::default();
        record.accept(w, &key(1), NOW, NOW).unwrap();
        record.accept(w, &key(2), NOW + 1, NOW).unwrap();
        let bytes = record.encode();
        assert_eq!(ReplayRecord::decode(&bytes).unwrap(), record);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_eq!(ReplayRecord::decode(&bad), Err(RecordError::Damaged));
        }
        assert_eq!(
            ReplayRecord::decode(&bytes[..bytes.len() - 1]),
            Err(RecordError::Damaged)
        );
        assert_eq!(ReplayRecord::decode(&[]), Err(RecordError::Damaged));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = ReplayRecord::decode(&bytes);
        }

        #[test]
        fn record_round_trips(stamps in prop::collection::vec((0u8..4, 0u64..200), 0..300)) {
            let mut record = ReplayRecord::new();
            let w = Window::default();
            for (client, offset) in stamps {
                let _ = record.accept(w, &key(client), NOW + offset * S / 10, NOW + offset * S / 20);
            }
            prop_assert_eq!(ReplayRecord::decode(&record.encode()).unwrap(), record);
        }

        /// Whatever order packets arrive in, none is accepted twice.
        #[test]
        fn nothing_is_accepted_twice(stamps in prop::collection::vec(0u64..100, 1..400)) {
            let mut record = ReplayRecord::new();
            let w = Window::default();
            let mut accepted = std::collections::HashSet::new();
            for t in stamps {
                if record.accept(w, &key(1), NOW + t, NOW).is_ok() {
                    prop_assert!(accepted.insert(t));
                }
            }
        }
    }
}
