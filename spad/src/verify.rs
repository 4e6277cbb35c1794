//! The public-key work of a batch, spread over the machine's cores.
//!
//! The daemon's loop decides a batch of packets on one thread. The cheap checks (mac1, the
//! recently-seen record, the per-source budget) run as each packet arrives; the packets that
//! pass wait in a [`Batch`], and at the end of the batch their handshakes (X25519 and AEAD,
//! the only expensive step) run here, on up to [`Verifier::threads`] threads at once. The
//! results come back **in arrival order**, and everything after them (per-client replay
//! rules, policy, the journal, the firewall) runs on the loop's thread in that order, so the
//! replay order of a client is the same as with one thread.
//!
//! Threads are scoped to the batch: nothing outlives it, nothing is shared but read-only
//! keys, and a small batch is opened on the loop's thread without spawning anything.

use std::net::IpAddr;
use std::ops::Range;

use spa_shared::packet::{Authenticated, OpenError, Server};
use spa_shared::Micros;

/// Fewest packets a thread is given: below this, spawning costs more than it saves.
pub const PER_THREAD: usize = 2;
/// Most threads used, whatever the machine has.
pub const MAX_THREADS: usize = 4;

/// How many threads open a batch's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verifier {
    pub threads: usize,
}

impl Verifier {
    /// One thread per core, at most [`MAX_THREADS`].
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            threads: cores.clamp(1, MAX_THREADS),
        }
    }

    /// Everything on the caller's thread.
    pub fn single() -> Self {
        Self { threads: 1 }
    }

    /// Opens every packet; `out[i]` is the result for `packets[i]`.
    pub fn open_all(
        &self,
        server: &Server,
        packets: &[&[u8]],
        out: &mut Vec<Result<Authenticated, OpenError>>,
    ) {
        out.clear();
        let threads = self.threads.min(packets.len() / PER_THREAD).max(1);
        if threads == 1 {
            out.extend(packets.iter().map(|p| server.open(p)));
            return;
        }
        let chunk = packets.len().div_ceil(threads);
        let mut chunks = packets.chunks(chunk);
        let first = chunks.next().unwrap_or_default();
        std::thread::scope(|scope| {
            let spawned: Vec<_> = chunks
                .map(|mine| {
                    scope.spawn(move || mine.iter().map(|p| server.open(p)).collect::<Vec<_>>())
                })
                .collect();
            out.extend(first.iter().map(|p| server.open(p)));
            for handle in spawned {
                // `open` never panics on any input (proptest and fuzz targets); if it ever
                // did, the panic is re-raised here rather than losing packets silently.
                out.extend(
                    handle
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                );
            }
        });
    }
}

/// A packet that passed the cheap checks and waits for its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub source: IpAddr,
    /// When it was heard (for the grant latency).
    pub heard: Micros,
    pub ephemeral: [u8; 32],
    /// Where its bytes are in [`Batch::bytes`].
    at: Range<usize>,
    /// An identical packet earlier in the batch: its result is reused, no second handshake.
    pub copy_of: Option<usize>,
}

/// The packets of the current batch waiting for their handshakes, with their bytes copied
/// into one buffer that is reused from batch to batch (no allocation per packet).
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    waiting: Vec<Waiting>,
    /// Ephemeral key → index of the first packet in the batch that carries it.
    first: std::collections::HashMap<[u8; 32], usize>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Queues a packet. A byte-identical copy of an earlier one is marked as such.
    pub fn push(&mut self, source: IpAddr, heard: Micros, ephemeral: [u8; 32], packet: &[u8]) {
        let index = self.waiting.len();
        let copy_of = self
            .first
            .get(&ephemeral)
            .copied()
            .filter(|&i| self.packet(i) == packet);
        if copy_of.is_none() {
            self.first.entry(ephemeral).or_insert(index);
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(packet);
        self.waiting.push(Waiting {
            source,
            heard,
            ephemeral,
            at: start..self.bytes.len(),
            copy_of,
        });
    }

    fn packet(&self, index: usize) -> &[u8] {
        &self.bytes[self.waiting[index].at.clone()]
    }

    /// The packets that need a handshake of their own (not copies), in order.
    pub fn originals(&self) -> Vec<&[u8]> {
        (0..self.waiting.len())
            .filter(|&i| self.waiting[i].copy_of.is_none())
            .map(|i| self.packet(i))
            .collect()
    }

    /// The waiting packets, in arrival order, with their bytes.
    pub fn iter(&self) -> impl Iterator<Item = (&Waiting, &[u8])> {
        self.waiting.iter().map(|w| (w, &self.bytes[w.at.clone()]))
    }

    /// Empties the batch, keeping the buffers' capacity for the next one.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.first.clear();
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use spa_shared::keys::PrivateKey;
    use spa_shared::packet::seal;
    use spa_shared::payload::{Kind, Request};

    fn sealed(client: &PrivateKey, server: &Server, n: u64) -> Vec<u8> {
        let request = Request {
            kind: Kind::Open,
            timestamp: 1_700_000_000_000_000 + n,
            nonce: [7; 16],
            duration_secs: 30,
            address: None,
            services: vec!["ssh".into()],
        };
        seal(&mut OsRng, client, &server.public_key(), &request).expect("seal")
    }

    #[test]
    fn results_come_back_in_order_whatever_the_thread_count() {
        let server = Server::new(PrivateKey::generate(&mut OsRng));
        let clients: Vec<PrivateKey> = (0..5).map(|_| PrivateKey::generate(&mut OsRng)).collect();
        let mut packets: Vec<Vec<u8>> = (0..23)
            .map(|n| sealed(&clients[n % 5], &server, n as u64))
            .collect();
        // Garbage among them, at known places.
        packets[4][40] ^= 1;
        packets[17][100] ^= 1;
        let slices: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut expected = Vec::new();
        Verifier::single().open_all(&server, &slices, &mut expected);
        assert!(expected[4].is_err() && expected[17].is_err());
        for (n, ok) in expected.iter().enumerate() {
            if n != 4 && n != 17 {
                let a = ok.as_ref().expect("valid");
                assert_eq!(a.client, clients[n % 5].public_key());
                assert_eq!(a.request.timestamp, 1_700_000_000_000_000 + n as u64);
            }
        }
        for threads in [2, 3, 4, 8] {
            let mut got = Vec::new();
            Verifier { threads }.open_all(&server, &slices, &mut got);
            assert_eq!(got, expected, "{threads} threads");
        }
    }

    #[test]
    fn identical_copies_are_opened_once_and_the_buffers_are_reused() {
        let server = Server::new(PrivateKey::generate(&mut OsRng));
        let client = PrivateKey::generate(&mut OsRng);
        let a = sealed(&client, &server, 1);
        let b = sealed(&client, &server, 2);
        let mut forged = a.clone();
        forged[60] ^= 1; // same ephemeral key, other bytes: not a copy
        let source: IpAddr = "192.0.2.1".parse().expect("ip");
        let mut batch = Batch::default();
        let eph = |p: &[u8]| <[u8; 32]>::try_from(&p[..32]).expect("32");
        for p in [&a, &b, &a, &forged, &a] {
            batch.push(source, 0, eph(p), p);
        }
        assert_eq!(batch.len(), 5);
        assert_eq!(batch.originals().len(), 3, "a, b and the forgery");
        let copies: Vec<_> = batch.iter().map(|(w, _)| w.copy_of).collect();
        assert_eq!(copies, [None, None, Some(0), None, Some(0)]);
        batch.clear();
        assert!(batch.is_empty());
        let capacity = batch.bytes.capacity();
        batch.push(source, 0, eph(&b), &b);
        assert_eq!(batch.bytes.capacity(), capacity, "no new allocation");
        assert_eq!(
            batch.waiting[0].copy_of, None,
            "a new batch forgets the old one"
        );
    }
}
