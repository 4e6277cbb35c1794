//! The replay journal's on-disk format: an append-only log of checksummed entries behind one
//! snapshot, and the rules for reading it back after any crash. No I/O here: the daemon's store
//! writes the bytes this module produces and hands back what it reads.
//!
//! ```text
//! file    = MAGIC ("SPAJRNL1") snapshot entry* zero*
//! record  = len: u32 BE | kind: u8 | body (len bytes) | check: BLAKE2s-256(len|kind|body)[..16]
//! kind 1  Accept   client key 32 | timestamp 8 | clock reading when accepted 8
//! kind 2  Digest   digest 32 | keep-until 8
//! kind 3  Snapshot closed-until 8 | clients 4 | (key 32 | floor 8 | n 4 | n × timestamp 8)* |
//!                  digests 4 | (digest 32 | keep-until 8)*        (only right after MAGIC)
//! ```
//!
//! The file may end in zeros: room the writer preallocated, so that an append changes no file
//! size and its `fdatasync` flushes data only. Zeros after the last record are *padding*, not
//! damage. A batch of entries is written with one write and made durable with one `fdatasync`
//! before any grant of that batch is installed. After a crash the unsynced tail of the file may be cut
//! short or hold garbage: a bad record with no valid record anywhere after it is such a *torn
//! tail* and is ignored (nothing in it was acted on). A bad record followed by a valid one is
//! damage in the middle of the history: [`decode`] refuses the whole file, and the daemon fails
//! closed for one window. Compaction rewrites the file as one snapshot (atomically, by rename).

use std::collections::HashMap;

use blake2::{Blake2s256, Digest};

use super::{ClientHistory, RecordError, ReplayRecord, Window, PER_CLIENT};
use crate::keys::PublicKey;
use crate::reader::Reader;
use crate::Micros;

/// First bytes of every journal file.
pub const MAGIC: &[u8; 8] = b"SPAJRNL1";
/// Magic of the legacy whole-file record ([`ReplayRecord::encode`]), read once to migrate.
pub const LEGACY_MAGIC: &[u8; 8] = b"SPAREPL1";
const CHECK_LEN: usize = 16;
const HEADER_LEN: usize = 5;
const KIND_ACCEPT: u8 = 1;
const KIND_DIGEST: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const ACCEPT_BODY: usize = 32 + 8 + 8;
const DIGEST_BODY: usize = 32 + 8;
/// Digests remembered at most (fwknop packets); beyond this, new ones are refused.
pub const MAX_DIGESTS: usize = 1 << 20;

/// One durable fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// `client`'s request stamped `timestamp` was accepted when the clock read `now`.
    Accept {
        client: PublicKey,
        timestamp: Micros,
        now: Micros,
    },
    /// A packet with this digest was accepted; refuse it again until `keep_until`.
    Digest {
        digest: [u8; 32],
        keep_until: Micros,
    },
}

/// Digests of accepted packets (protocols without per-client timestamps, e.g. fwknop).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Digests {
    keep_until: HashMap<[u8; 32], Micros>,
}

impl Digests {
    /// Whether `digest` is still remembered at `now`.
    pub fn contains(&self, digest: &[u8; 32], now: Micros) -> bool {
        self.keep_until
            .get(digest)
            .is_some_and(|&until| until > now)
    }

    /// Remembers `digest` until `keep_until` (the later of two deadlines wins).
    pub fn insert(&mut self, digest: [u8; 32], keep_until: Micros) {
        let until = self.keep_until.entry(digest).or_insert(keep_until);
        *until = (*until).max(keep_until);
    }

    /// Forgets digests whose time is over.
    pub fn prune(&mut self, now: Micros) {
        self.keep_until.retain(|_, until| *until > now);
    }

    pub fn len(&self) -> usize {
        self.keep_until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keep_until.is_empty()
    }
}

/// Everything the journal remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub record: ReplayRecord,
    pub digests: Digests,
    /// Refuse everything until then (set when a damaged journal was found at start).
    pub closed_until: Option<Micros>,
}

impl State {
    /// Applies one entry (live, or replayed from the file).
    pub fn apply(&mut self, window: Window, entry: &Entry) {
        match *entry {
            Entry::Accept {
                client,
                timestamp,
                now,
            } => self
                .record
                .record_unchecked(window, &client, timestamp, now),
            Entry::Digest { digest, keep_until } => self.digests.insert(digest, keep_until),
        }
    }
}

fn check(header_and_body: &[u8]) -> [u8; CHECK_LEN] {
    let digest = Blake2s256::digest(header_and_body);
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&digest[..CHECK_LEN]);
    out
}

fn push_record(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    body(out);
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4] = kind;
    let sum = check(&out[start..]);
    out.extend_from_slice(&sum);
}

impl Entry {
    /// Appends this entry as one record.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Entry::Accept {
                client,
                timestamp,
                now,
            } => push_record(out, KIND_ACCEPT, |b| {
                b.extend_from_slice(client.as_bytes());
                b.extend_from_slice(&timestamp.to_be_bytes());
                b.extend_from_slice(&now.to_be_bytes());
            }),
            Entry::Digest { digest, keep_until } => push_record(out, KIND_DIGEST, |b| {
                b.extend_from_slice(digest);
                b.extend_from_slice(&keep_until.to_be_bytes());
            }),
        }
    }
}

/// A whole journal file holding only a snapshot of `state`: what compaction writes.
pub fn encode_snapshot(state: &State) -> Vec<u8> {
    let clients = &state.record.clients;
    let mut out = Vec::with_capacity(
        MAGIC.len()
            + HEADER_LEN
            + 16
            + clients.len() * 44
            + state.record.len() * 8
            + state.digests.len() * 40
            + CHECK_LEN,
    );
    out.extend_from_slice(MAGIC);
    push_record(&mut out, KIND_SNAPSHOT, |b| {
        b.extend_from_slice(&state.closed_until.unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&(clients.len() as u32).to_be_bytes());
        for (key, history) in clients {
            b.extend_from_slice(key.as_bytes());
            b.extend_from_slice(&history.floor.to_be_bytes());
            b.extend_from_slice(&(history.seen.len() as u32).to_be_bytes());
            for t in &history.seen {
                b.extend_from_slice(&t.to_be_bytes());
            }
        }
        b.extend_from_slice(&(state.digests.len() as u32).to_be_bytes());
        let mut digests: Vec<_> = state.digests.keep_until.iter().collect();
        digests.sort();
        for (digest, until) in digests {
            b.extend_from_slice(digest);
            b.extend_from_slice(&until.to_be_bytes());
        }
    });
    out
}

/// What [`decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub state: State,
    /// Entries replayed after the snapshot.
    pub entries: usize,
    /// Bytes of a torn tail that were ignored (0 if the file ended cleanly).
    pub torn_bytes: usize,
    /// Zero bytes at the end: room preallocated for entries not yet written (not torn).
    pub padding: usize,
    /// The file was in the legacy whole-file format (rewrite it as a journal).
    pub legacy: bool,
}

/// One record at `at`, if it is complete and its checksum holds.
fn record_at(bytes: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let header = bytes.get(at..at.checked_add(HEADER_LEN)?)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let body_end = at.checked_add(HEADER_LEN)?.checked_add(len)?;
    let end = body_end.checked_add(CHECK_LEN)?;
    let stored = bytes.get(body_end..end)?;
    if check(&bytes[at..body_end]) != stored {
        return None;
    }
    Some((header[4], &bytes[at + HEADER_LEN..body_end], end))
}

/// Whether any valid appended entry starts after `from` (damage in the middle, not a torn tail).
fn valid_entry_after(bytes: &[u8], from: usize) -> bool {
    (from..bytes.len()).any(|at| {
        // Cheap rejection first: only exact entry sizes are worth a checksum.
        let Some(header) = bytes.get(at..at + HEADER_LEN) else {
            return false;
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let plausible = matches!(
            (header[4], len),
            (KIND_ACCEPT, ACCEPT_BODY) | (KIND_DIGEST, DIGEST_BODY)
        );
        plausible && record_at(bytes, at).is_some()
    })
}

fn decode_snapshot(body: &[u8]) -> Option<State> {
    let mut reader = Reader::new(body);
    let closed_until = match reader.be64()? {
        0 => None,
        until => Some(until),
    };
    let count = reader.be32()?;
    let mut record = ReplayRecord::new();
    for _ in 0..count {
        let key = PublicKey(reader.array()?);
        let floor = reader.be64()?;
        let n = reader.be32()? as usize;
        if n > PER_CLIENT {
            return None;
        }
        let mut seen = Vec::with_capacity(n);
        for _ in 0..n {
            seen.push(reader.be64()?);
        }
        if seen.windows(2).any(|w| w[0] >= w[1]) || record.clients.contains_key(&key) {
            return None;
        }
        record.clients.insert(key, ClientHistory { floor, seen });
    }
    let count = reader.be32()? as usize;
    let mut digests = Digests::default();
    for _ in 0..count {
        let digest = reader.array()?;
        let until = reader.be64()?;
        digests.insert(digest, until);
    }
    reader.rest().is_empty().then_some(State {
        record,
        digests,
        closed_until,
    })
}

fn decode_entry(kind: u8, body: &[u8]) -> Option<Entry> {
    let mut reader = Reader::new(body);
    let entry = match kind {
        KIND_ACCEPT if body.len() == ACCEPT_BODY => Entry::Accept {
            client: PublicKey(reader.array()?),
            timestamp: reader.be64()?,
            now: reader.be64()?,
        },
        KIND_DIGEST if body.len() == DIGEST_BODY => Entry::Digest {
            digest: reader.array()?,
            keep_until: reader.be64()?,
        },
        _ => return None,
    };
    Some(entry)
}

/// Reads a journal file (or a legacy record). Torn tails are ignored; any other damage is an
/// error, never a panic.
pub fn decode(bytes: &[u8], window: Window) -> Result<Loaded, RecordError> {
    let mut loaded = Loaded {
        state: State::default(),
        entries: 0,
        torn_bytes: 0,
        padding: 0,
        legacy: false,
    };
    if bytes.is_empty() {
        return Ok(loaded);
    }
    if bytes.starts_with(LEGACY_MAGIC) {
        loaded.state.record = ReplayRecord::decode(bytes)?;
        loaded.legacy = true;
        return Ok(loaded);
    }
    if !bytes.starts_with(MAGIC) {
        return Err(RecordError::Damaged);
    }
    let mut at = MAGIC.len();
    while at < bytes.len() {
        let Some((kind, body, next)) = record_at(bytes, at) else {
            let rest = &bytes[at..];
            // Zeros to the end: the preallocated room the next entries go into.
            let written = rest
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |last| last + 1);
            if written == 0 {
                loaded.padding = rest.len();
                break;
            }
            if valid_entry_after(bytes, at + 1) {
                return Err(RecordError::Damaged);
            }
            loaded.torn_bytes = written;
            loaded.padding = rest.len() - written;
            break;
        };
        if kind == KIND_SNAPSHOT && at == MAGIC.len() {
            loaded.state = decode_snapshot(body).ok_or(RecordError::Damaged)?;
        } else {
            let entry = decode_entry(kind, body).ok_or(RecordError::Damaged)?;
            loaded.state.apply(window, &entry);
            loaded.entries += 1;
        }
        at = next;
    }
    Ok(loaded)
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

    /// A journal: a snapshot of `base` followed by `entries`, with the state they lead to.
    fn journal(base: &State, entries: &[Entry]) -> (Vec<u8>, State) {
        let w = Window::default();
        let mut bytes = encode_snapshot(base);
        let mut state = base.clone();
        for e in entries {
            e.encode_into(&mut bytes);
            state.apply(w, e);
        }
        (bytes, state)
    }

    fn accept(client: u8, t: u64) -> Entry {
        Entry::Accept {
            client: key(client),
            timestamp: NOW + t,
            now: NOW + t,
        }
    }

    fn some_state() -> State {
        let mut state = State::default();
        let w = Window::default();
        state.apply(w, &accept(1, 0));
        state.apply(w, &accept(2, 5));
        state.digests.insert([9; 32], NOW + 90 * S);
        state
    }

    #[test]
    fn snapshot_and_entries_round_trip() {
        let entries = [
            accept(1, S),
            accept(3, 2 * S),
            Entry::Digest {
                digest: [7; 32],
                keep_until: NOW + 60 * S,
            },
        ];
        let (bytes, state) = journal(&some_state(), &entries);
        let loaded = decode(&bytes, Window::default()).unwrap();
        assert_eq!(loaded.state, state);
        assert_eq!((loaded.entries, loaded.torn_bytes), (3, 0));
        assert!(loaded.state.digests.contains(&[7; 32], NOW));
        assert!(!loaded.state.digests.contains(&[7; 32], NOW + 60 * S));
        // Compaction keeps exactly the same state.
        let compacted = decode(&encode_snapshot(&state), Window::default()).unwrap();
        assert_eq!(compacted.state, state);
    }

    #[test]
    fn closed_until_survives_compaction() {
        let state = State {
            closed_until: Some(NOW + 90 * S),
            ..State::default()
        };
        let loaded = decode(&encode_snapshot(&state), Window::default()).unwrap();
        assert_eq!(loaded.state.closed_until, Some(NOW + 90 * S));
    }

    /// A crash before `fdatasync` may leave any prefix of the last batch: every cut is read
    /// back as the entries that were complete, and the rest is ignored.
    #[test]
    fn a_torn_tail_is_ignored_at_every_cut() {
        let entries = [accept(1, S), accept(1, 2 * S), accept(2, 3 * S)];
        let (full, _) = journal(&some_state(), &entries);
        let (durable, durable_state) = journal(&some_state(), &entries[..1]);
        let entry_len = bytes_of(&entries[..1]);
        for cut in durable.len()..full.len() {
            let loaded = decode(&full[..cut], Window::default()).unwrap();
            let complete = (cut - durable.len()) / entry_len + 1;
            assert_eq!(loaded.entries, complete, "cut {cut}");
            assert_eq!(loaded.state, journal(&some_state(), &entries[..complete]).1);
            // A cut that ends in zero bytes reads as room left for entries (`padding`).
            assert_eq!(
                loaded.torn_bytes + loaded.padding,
                (cut - durable.len()) % entry_len
            );
        }
        // Zeros where the unsynced data should be (a file extended but not written).
        let mut zeroed = durable.clone();
        zeroed.extend_from_slice(&[0; 200]);
        let loaded = decode(&zeroed, Window::default()).unwrap();
        assert_eq!(
            (loaded.state, loaded.torn_bytes, loaded.padding),
            (durable_state.clone(), 0, 200)
        );
        // Half an entry followed by zeros (a torn write into preallocated room).
        let mut half = full[..durable.len() + 30].to_vec();
        half.extend_from_slice(&[0; 100]);
        let loaded = decode(&half, Window::default()).unwrap();
        assert_eq!(
            (loaded.state, loaded.torn_bytes, loaded.padding),
            (durable_state, 30, 100)
        );
    }

    fn bytes_of(entries: &[Entry]) -> usize {
        let mut out = Vec::new();
        for e in entries {
            e.encode_into(&mut out);
        }
        out.len()
    }

    /// Damage before a valid entry is not a torn write: the whole file is refused.
    #[test]
    fn a_damaged_middle_fails() {
        let entries = [accept(1, S), accept(1, 2 * S), accept(2, 3 * S)];
        let (bytes, _) = journal(&some_state(), &entries);
        let entry_len = bytes_of(&entries[..1]);
        let first_entry = bytes.len() - 3 * entry_len;
        // Any flipped bit in the snapshot or in an entry that has a valid one after it.
        for i in 0..bytes.len() - entry_len {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert_eq!(
                decode(&bad, Window::default()),
                Err(RecordError::Damaged),
                "byte {i}"
            );
        }
        // An entry cut out of the middle.
        let mut spliced = bytes[..first_entry + 10].to_vec();
        spliced.extend_from_slice(&bytes[first_entry + entry_len..]);
        assert_eq!(
            decode(&spliced, Window::default()),
            Err(RecordError::Damaged)
        );
        assert_eq!(
            decode(b"SPAJRNL", Window::default()),
            Err(RecordError::Damaged)
        );
        assert_eq!(
            decode(b"garbage!", Window::default()),
            Err(RecordError::Damaged)
        );
    }

    #[test]
    fn a_second_snapshot_or_unknown_kind_fails() {
        let (mut bytes, _) = journal(&some_state(), &[]);
        let again = encode_snapshot(&some_state());
        bytes.extend_from_slice(&again[MAGIC.len()..]);
        bytes.extend_from_slice(&{
            let mut e = Vec::new();
            accept(1, S).encode_into(&mut e);
            e
        });
        assert_eq!(decode(&bytes, Window::default()), Err(RecordError::Damaged));
        let mut unknown = encode_snapshot(&State::default());
        push_record(&mut unknown, 9, |b| b.extend_from_slice(&[0; ACCEPT_BODY]));
        assert_eq!(
            decode(&unknown, Window::default()),
            Err(RecordError::Damaged)
        );
    }

    #[test]
    fn legacy_record_is_migrated() {
        let mut record = ReplayRecord::new();
        record.accept(Window::default(), &key(1), NOW, NOW).unwrap();
        let loaded = decode(&record.encode(), Window::default()).unwrap();
        assert!(loaded.legacy);
        assert_eq!(loaded.state.record, record);
    }

    proptest! {
        /// Zeroed room after any journal (what the writer preallocates) changes nothing it
        /// reads, and is never taken for a torn tail.
        #[test]
        fn zeroed_room_after_the_records_is_padding(
            stamps in prop::collection::vec((0u8..4, 0u64..200), 0..20),
            room in 0usize..300,
        ) {
            let entries: Vec<Entry> = stamps.iter().map(|&(c, t)| accept(c, t * S)).collect();
            let (mut bytes, state) = journal(&State::default(), &entries);
            let loaded = decode(&bytes, Window::default()).unwrap();
            bytes.resize(bytes.len() + room, 0);
            let padded = decode(&bytes, Window::default()).unwrap();
            prop_assert_eq!(&padded.state, &state);
            prop_assert_eq!((padded.entries, padded.torn_bytes, padded.padding), (loaded.entries, 0, room));
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes, Window::default());
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed, Window::default());
        }

        /// Replaying the journal rebuilds exactly the live state, and so does compaction.
        #[test]
        fn journal_replay_equals_live_state(stamps in prop::collection::vec((0u8..4, 0u64..2000, 0u64..2000), 0..200)) {
            let w = Window::default();
            let mut live = State::default();
            let mut bytes = encode_snapshot(&State::default());
            for (client, t, now) in stamps {
                let (t, now) = (NOW + t * S / 10, NOW + now * S / 10);
                if live.record.accept(w, &key(client), t, now).is_ok() {
                    Entry::Accept { client: key(client), timestamp: t, now }.encode_into(&mut bytes);
                }
            }
            let loaded = decode(&bytes, w).unwrap();
            prop_assert_eq!(&loaded.state, &live);
            prop_assert_eq!(decode(&encode_snapshot(&live), w).unwrap().state, live);
        }
    }
}
