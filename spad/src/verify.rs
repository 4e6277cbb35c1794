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
//! The helper threads are a small pool started with the daemon (or with the first batch that
//! needs them) and kept for the daemon's life: a batch costs two channel messages per helper, not a thread spawn
//! (which took 30-80 µs, and over a millisecond on a busy machine). Each helper gets a copy
//! of its share of the packets and a handle on the read-only server keys; nothing else is
//! shared. A small batch is opened on the loop's thread without involving any helper.

use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use spa_shared::packet::{Authenticated, OpenError, Server};
use spa_shared::Micros;

/// Fewest packets a thread is given: below this, handing work over costs more than it saves.
pub const PER_THREAD: usize = 2;
/// Most threads used, whatever the machine has.
pub const MAX_THREADS: usize = 4;

type Opened = Result<Authenticated, OpenError>;

/// One helper's share of a batch, sent to it and back with the results; its buffers are
/// reused from batch to batch.
#[derive(Default)]
struct Share {
    server: Option<Arc<Server>>,
    bytes: Vec<u8>,
    ranges: Vec<Range<usize>>,
    out: Vec<Opened>,
}

/// A pool thread: it opens each share it is sent and sends it back.
struct Helper {
    /// `None` once dropping: closing the channel ends the thread's loop.
    to: Option<mpsc::Sender<Share>>,
    from: mpsc::Receiver<Share>,
    spare: Share,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Helper {
    fn start(index: usize, live: &Arc<AtomicUsize>) -> std::io::Result<Self> {
        let (to, jobs) = mpsc::channel::<Share>();
        let (done, from) = mpsc::channel::<Share>();
        live.fetch_add(1, Ordering::SeqCst);
        let alive = Alive(Arc::clone(live));
        let thread = std::thread::Builder::new()
            .name(format!("spad-verify-{index}"))
            .spawn(move || {
                let _alive = alive;
                while let Ok(mut share) = jobs.recv() {
                    share.out.clear();
                    if let Some(server) = share.server.take() {
                        let Share {
                            bytes, ranges, out, ..
                        } = &mut share;
                        out.extend(ranges.iter().map(|r| server.open(&bytes[r.clone()])));
                    }
                    if done.send(share).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            to: Some(to),
            from,
            spare: Share::default(),
            thread: Some(thread),
        })
    }
}

/// Counts a pool thread as running until it ends (or until it could not be started).
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; wait for it, so no thread outlives
        // the verifier.
        self.to = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper").finish_non_exhaustive()
    }
}

/// Opens a batch's packets on the loop's thread and up to `threads - 1` pool threads.
#[derive(Debug)]
pub struct Verifier {
    threads: usize,
    helpers: Vec<Helper>,
    /// Pool threads started so far (they are started once, then reused).
    pub started: usize,
    /// Pool threads running now.
    live: Arc<AtomicUsize>,
}

impl Verifier {
    /// Up to `threads` threads (at least one: the caller's).
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            helpers: Vec::new(),
            started: 0,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// One thread per core, at most [`MAX_THREADS`].
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(cores.clamp(1, MAX_THREADS))
    }

    /// Everything on the caller's thread.
    pub fn single() -> Self {
        Self::new(1)
    }

    /// How many threads may open one batch.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Starts the whole pool now rather than with the first busy batch, so that batch does
    /// not wait for thread spawns (the daemon calls this once at start).
    pub fn start_pool(&mut self) {
        self.start_helpers(self.threads);
    }

    /// Starts helpers until `wanted` threads (the caller's included) can work at once.
    fn start_helpers(&mut self, wanted: usize) {
        while self.helpers.len() + 1 < wanted {
            match Helper::start(self.helpers.len(), &self.live) {
                Ok(helper) => {
                    self.helpers.push(helper);
                    self.started += 1;
                }
                // No thread to be had: the threads there are do the work.
                Err(_) => break,
            }
        }
    }

    /// Opens every packet; `out[i]` is the result for `packets[i]`.
    pub fn open_all(&mut self, server: &Arc<Server>, packets: &[&[u8]], out: &mut Vec<Opened>) {
        out.clear();
        let wanted = self.threads.min(packets.len() / PER_THREAD).max(1);
        self.start_helpers(wanted);
        let threads = wanted.min(self.helpers.len() + 1);
        if threads == 1 {
            out.extend(packets.iter().map(|p| server.open(p)));
            return;
        }
        let chunk = packets.len().div_ceil(threads);
        let mut chunks = packets.chunks(chunk);
        let mine = chunks.next().unwrap_or_default();
        let mut sent = Vec::with_capacity(threads - 1);
        for (helper, theirs) in self.helpers.iter_mut().zip(chunks) {
            let mut share = std::mem::take(&mut helper.spare);
            share.bytes.clear();
            share.ranges.clear();
            for p in theirs {
                let start = share.bytes.len();
                share.bytes.extend_from_slice(p);
                share.ranges.push(start..share.bytes.len());
            }
            share.server = Some(Arc::clone(server));
            sent.push(helper.to.as_ref().is_some_and(|to| to.send(share).is_ok()));
        }
        out.extend(mine.iter().map(|p| server.open(p)));
        let mut lost = false;
        for ((helper, theirs), ok) in self
            .helpers
            .iter_mut()
            .zip(packets.chunks(chunk).skip(1))
            .zip(sent)
        {
            match ok.then(|| helper.from.recv().ok()).flatten() {
                Some(mut share) => {
                    out.append(&mut share.out);
                    share.server = None;
                    helper.spare = share;
                }
                None => {
                    // The helper is gone (it cannot panic on any input: `open` is fuzzed and
                    // property-tested); its share is opened here and the pool restarts it.
                    out.extend(theirs.iter().map(|p| server.open(p)));
                    lost = true;
                }
            }
        }
        if lost {
            self.helpers.clear();
        }
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
        let server = Arc::new(server);
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
            Verifier::new(threads).open_all(&server, &slices, &mut got);
            assert_eq!(got, expected, "{threads} threads");
        }
    }

    /// The pool's threads are started once and reused by every later batch, and dropping
    /// the verifier ends them.
    #[test]
    fn pool_threads_are_started_once_and_reused() {
        let server = Arc::new(Server::new(PrivateKey::generate(&mut OsRng)));
        let client = PrivateKey::generate(&mut OsRng);
        let packets: Vec<Vec<u8>> = (0..12).map(|n| sealed(&client, &server, n)).collect();
        let slices: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut verifier = Verifier::new(3);
        let mut out = Vec::new();
        for round in 0..50 {
            // Batches of every size: small ones stay on the caller's thread.
            let batch = &slices[..1 + round % slices.len()];
            verifier.open_all(&server, batch, &mut out);
            assert_eq!(out.len(), batch.len());
            assert!(out.iter().all(Result::is_ok), "round {round}");
        }
        assert_eq!(verifier.started, 2, "two helpers, started once");
        let live = Arc::clone(&verifier.live);
        assert_eq!(
            live.load(Ordering::SeqCst),
            2,
            "both still running between batches"
        );
        drop(verifier);
        assert_eq!(
            live.load(Ordering::SeqCst),
            0,
            "dropping the verifier ends its threads"
        );
    }

    /// `start_pool` starts every helper at once; the batches after it start none.
    #[test]
    fn a_pool_started_up_front_serves_the_first_busy_batch() {
        let server = Arc::new(Server::new(PrivateKey::generate(&mut OsRng)));
        let client = PrivateKey::generate(&mut OsRng);
        let packets: Vec<Vec<u8>> = (0..12).map(|n| sealed(&client, &server, n)).collect();
        let slices: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut verifier = Verifier::new(3);
        verifier.start_pool();
        assert_eq!(verifier.started, 2);
        assert_eq!(verifier.live.load(Ordering::SeqCst), 2);
        let mut out = Vec::new();
        verifier.open_all(&server, &slices, &mut out);
        assert!(out.iter().all(Result::is_ok));
        assert_eq!(verifier.started, 2, "no thread started by the batch");
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
