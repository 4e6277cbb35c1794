//! Durable daemon state: atomic, fsynced file replacement, and the replay store: a journal
//! appended in groups (one `fdatasync` per batch of packets) and compacted by atomic rewrite.
//!
//! The journal file is kept longer than its records: it ends in zeroed room (see
//! [`PREALLOCATE`]) that appends overwrite in place, so an append changes neither the file's
//! size nor its block map and its `fdatasync` flushes data only, without a filesystem journal
//! commit (ext4 on this project's test machine: p50 250 → 200 µs per sync). The room is also
//! space already won: grants go on for a while on a disk that has just filled up.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::journal_sync::{Syncer, Wake, WriteAt};

use spa_shared::keys::PublicKey;
use spa_shared::replay::{journal, ReplayError, Window};
use spa_shared::Micros;

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// write a temporary file, fsync it, rename it over, fsync the directory.
/// A temporary file that could not be written whole is removed (on a full disk it would
/// otherwise hold the very space the next attempt needs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Why the replay store refused a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayRefusal {
    #[error("{0}")]
    Rule(#[from] ReplayError),
    #[error("replay record was damaged at start; refusing all SPA packets until {0} (fail closed for one window)")]
    FailClosed(String),
    #[error("cannot persist the replay record: {0}")]
    Persist(String),
    #[error("replayed: this exact packet was accepted before")]
    DigestReplayed,
    #[error("too many packet digests remembered ({0}); refusing new ones until old ones expire")]
    Full(usize),
}

/// The seam between the daemon and where replay state lives: a journal file on this host
/// ([`ReplayStore`]) today; a store shared by a fleet of gateways can implement the same trait.
///
/// `accept*` take effect at once in memory (so a second copy in the same batch is refused) and
/// become durable at the next [`commit`](ReplayState::commit); the caller must not act on an
/// accepted request (open the firewall) before that commit returned `Ok`.
///
/// A store may also commit in the background ([`begin_commit`](ReplayState::begin_commit)
/// answers [`Commit::Started`]); the caller then acts on the batch only when
/// [`poll_commit`](ReplayState::poll_commit) hands back `Ok`. Entries accepted meanwhile wait
/// for the next commit. The defaults commit synchronously.
pub trait ReplayState: std::fmt::Debug {
    fn window(&self) -> Window;
    /// Checks a client's timestamp without recording it.
    fn check(
        &self,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal>;
    /// Checks and records a client's timestamp (durable at the next commit).
    fn accept(
        &mut self,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal>;
    /// Checks a packet digest (protocols without per-client timestamps) without recording it.
    fn check_digest(&self, digest: &[u8; 32], now: Micros) -> Result<(), ReplayRefusal>;
    /// Checks and records a packet digest until `keep_until` (durable at the next commit).
    fn accept_digest(
        &mut self,
        digest: [u8; 32],
        keep_until: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal>;
    /// Whether accepted entries wait for a commit.
    fn uncommitted(&self) -> bool;
    /// Makes every accepted entry durable (one write and one `fdatasync` for all of them).
    fn commit(&mut self, now: Micros) -> Result<(), ReplayRefusal>;
    /// Drops clients that are no longer configured.
    fn retain_clients(&mut self, keep: &dyn Fn(&PublicKey) -> bool);

    /// Starts making the accepted entries durable. Must not be called while a started commit
    /// has not been handed back by [`poll_commit`](ReplayState::poll_commit) or
    /// [`wait_commit`](ReplayState::wait_commit).
    fn begin_commit(&mut self, now: Micros) -> Commit {
        if self.uncommitted() {
            Commit::Done(self.commit(now))
        } else {
            Commit::Nothing
        }
    }
    /// The started commit's result once it is done (never blocks).
    fn poll_commit(&mut self) -> Option<Result<(), ReplayRefusal>> {
        None
    }
    /// Waits up to `limit` for the started commit (at shutdown).
    fn wait_commit(&mut self, _limit: Duration) -> Option<Result<(), ReplayRefusal>> {
        None
    }
    /// From now on, commit on a thread of its own; `wake` is called when one is done. Returns
    /// whether the store can (the default cannot, and stays synchronous).
    fn sync_in_background(&mut self, _wake: Wake) -> std::io::Result<bool> {
        Ok(false)
    }
    /// How long this store's writes took to be durable, if it writes a local file.
    fn sync_times(&self) -> Option<&crate::metrics::Histogram> {
        None
    }
}

fn micros_of(d: Duration) -> Micros {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What [`ReplayState::begin_commit`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Commit {
    /// Nothing was waiting to be made durable.
    Nothing,
    /// Done on the spot (compaction, or a store without a sync thread).
    Done(Result<(), ReplayRefusal>),
    /// Running in the background: its result comes from `poll_commit`.
    Started,
}

/// Compact once the entries appended since the last snapshot exceed this many bytes, or twice
/// the snapshot's size if that is larger (so compaction stays rare however many clients).
const COMPACT_AFTER: u64 = 4 << 20;

/// Zeroed room written after the journal's records, in bytes: about 17,000 accepted packets
/// go into it before the file has to grow again.
pub const PREALLOCATE: u64 = 1 << 20;

/// The replay journal in the state directory (see [`journal`] for the format).
#[derive(Debug)]
pub struct ReplayStore {
    path: PathBuf,
    window: Window,
    state: journal::State,
    /// Open for writing at [`end`](Self::end); `None` when the next commit must rewrite the
    /// whole file (at start, or after a failed write left the tail in an unknown state).
    file: Option<Arc<std::fs::File>>,
    pending: Vec<u8>,
    /// The sync thread, once [`ReplayState::sync_in_background`] started it.
    syncer: Option<Syncer>,
    /// Bytes of the write the sync thread has in flight.
    in_flight: Option<u64>,
    /// The buffer the last background write handed back (reused for the next batch).
    spare: Vec<u8>,
    /// How the sync thread writes (a test may hold it back or make it fail).
    pub write_at: WriteAt,
    /// Where the next record goes: the end of the records, before the zeroed room.
    end: u64,
    /// The file's length: records plus zeroed room.
    allocated: u64,
    appended: u64,
    snapshot_len: u64,
    /// Compaction threshold for appended bytes (see [`COMPACT_AFTER`]).
    pub compact_after: u64,
    /// Zeroed room kept after the records (see [`PREALLOCATE`]).
    pub preallocate: u64,
    /// Commits and compactions done, for tests and stats.
    pub commits: u64,
    pub compactions: u64,
    /// How long each append took to be durable (write and `fdatasync`; not compactions).
    pub syncs: crate::metrics::Histogram,
}

impl ReplayStore {
    /// Loads the journal and compacts it. A damaged file means packets seen before the damage
    /// cannot be told from new ones, so everything is refused until one whole window has passed
    /// (and that deadline is itself written to the new journal, so a restart cannot skip it);
    /// the damaged file is kept beside it as `*.damaged` for inspection. A torn tail (a crash
    /// before the last `fdatasync`) is ignored with a warning: nothing in it was acted on.
    pub fn load(path: PathBuf, window: Window, now: Micros) -> (Self, Option<String>) {
        let fail_closed_until = now
            .saturating_add(window.max_age)
            .saturating_add(window.max_future);
        let mut warnings = Vec::new();
        let mut readable = true;
        let state = match std::fs::read(&path) {
            Ok(bytes) => match journal::decode(&bytes, window) {
                Ok(loaded) => {
                    if loaded.torn_bytes > 0 {
                        warnings.push(format!(
                            "{}: ignored a torn tail of {} bytes (a crash before its sync; nothing in it was granted)",
                            path.display(),
                            loaded.torn_bytes
                        ));
                    }
                    loaded.state
                }
                Err(e) => {
                    let aside = path.with_extension("damaged");
                    let kept = match std::fs::rename(&path, &aside) {
                        Ok(()) => format!(" (kept as {})", aside.display()),
                        Err(_) => String::new(),
                    };
                    warnings.push(format!(
                        "{}: {e}{kept}; failing closed until {}",
                        path.display(),
                        crate::log::timestamp(fail_closed_until)
                    ));
                    journal::State {
                        closed_until: Some(fail_closed_until),
                        ..journal::State::default()
                    }
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => journal::State::default(),
            Err(e) => {
                readable = false;
                warnings.push(format!(
                    "cannot read {}: {e}; failing closed until {}",
                    path.display(),
                    crate::log::timestamp(fail_closed_until)
                ));
                journal::State {
                    closed_until: Some(fail_closed_until),
                    ..journal::State::default()
                }
            }
        };
        let mut store = Self {
            path,
            window,
            state,
            file: None,
            pending: Vec::new(),
            syncer: None,
            in_flight: None,
            spare: Vec::new(),
            write_at: crate::journal_sync::write_and_sync(),
            end: 0,
            allocated: 0,
            appended: 0,
            snapshot_len: 0,
            compact_after: COMPACT_AFTER,
            preallocate: PREALLOCATE,
            commits: 0,
            compactions: 0,
            syncs: crate::metrics::Histogram::with_bounds(crate::metrics::SYNC_BUCKETS_MICROS),
        };
        if store.state.closed_until.is_some_and(|until| until <= now) {
            store.state.closed_until = None;
        }
        // Compaction at start; a file we could not read is left alone (the next commit, after
        // the fail-closed window, rewrites it).
        if readable {
            if let Err(e) = store.compact(now) {
                warnings.push(format!(
                    "cannot rewrite {}: {e}; SPA grants are refused until it can be written",
                    store.path.display()
                ));
            }
        }
        let warning = (!warnings.is_empty()).then(|| warnings.join("; "));
        (store, warning)
    }

    fn closed(&self, now: Micros) -> Result<(), ReplayRefusal> {
        match self.state.closed_until {
            Some(until) if now < until => {
                Err(ReplayRefusal::FailClosed(crate::log::timestamp(until)))
            }
            _ => Ok(()),
        }
    }

    /// Rewrites the journal as one snapshot of the current state followed by zeroed room
    /// (atomic: temp file, fsync, rename, fsync of the directory), then appends after it. On
    /// a disk too full for the room, the snapshot is written alone (appends then grow it).
    fn compact(&mut self, now: Micros) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        self.file = None;
        self.state.digests.prune(now);
        let mut bytes = journal::encode_snapshot(&self.state);
        let records = bytes.len() as u64;
        bytes.resize(bytes.len() + self.preallocate as usize, 0);
        if write_atomic(&self.path, &bytes).is_err() {
            bytes.truncate(records as usize);
            write_atomic(&self.path, &bytes)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .mode(0o600)
            .open(&self.path)?;
        self.file = Some(Arc::new(file));
        self.pending.clear();
        self.end = records;
        self.allocated = bytes.len() as u64;
        self.appended = 0;
        self.snapshot_len = records;
        self.compactions += 1;
        Ok(())
    }

    /// Writes the pending records over the zeroed room and makes them durable. When they do
    /// not fit, the file first grows by another [`preallocate`](Self::preallocate) of zeros
    /// (that one `fdatasync` then also carries the new size).
    fn append(&mut self) -> std::io::Result<()> {
        let file = self.room_for_pending()?;
        let started = std::time::Instant::now();
        self.write_at.call(&file, &self.pending, self.end)?;
        self.syncs.observe(micros_of(started.elapsed()));
        let len = self.pending.len() as u64;
        self.end += len;
        self.appended += len;
        self.pending.clear();
        Ok(())
    }

    /// The open journal, grown by zeroed room first if the pending records do not fit (the
    /// sync of those records then also carries the new size).
    fn room_for_pending(&mut self) -> std::io::Result<Arc<std::fs::File>> {
        let Some(file) = self.file.clone() else {
            return Err(std::io::Error::other("journal not open"));
        };
        let len = self.pending.len() as u64;
        if self.end + len > self.allocated {
            let grown = self.end + len + self.preallocate;
            let zeros = vec![0u8; (grown - self.allocated) as usize];
            file.write_all_at(&zeros, self.allocated)?;
            self.allocated = grown;
        }
        Ok(file)
    }

    /// Whether the next commit must rewrite the whole file (first commit, after a failure,
    /// or when the appended entries have grown past the compaction threshold).
    fn must_compact(&self) -> bool {
        self.file.is_none()
            || self.appended + self.pending.len() as u64
                > self.compact_after.max(2 * self.snapshot_len)
    }

    /// After a failed write: the file's tail is unknown, so the next commit rewrites it
    /// whole. The entries stay in memory (refused as replays), so nothing is ever accepted
    /// twice, and the batch's grants are refused.
    fn failed(&mut self, e: &std::io::Error) -> ReplayRefusal {
        self.file = None;
        ReplayRefusal::Persist(e.to_string())
    }

    /// A background write whose caller gave up waiting (`wait_commit` timed out, so its
    /// grants were refused) is collected here once it finishes, so the store does not stay
    /// busy for good; its result only moves the file's end (or forces a rewrite).
    fn reap_abandoned(&mut self) {
        if self.in_flight.is_none() {
            return;
        }
        let done = self.syncer.as_ref().and_then(Syncer::try_done);
        if let Some(done) = done {
            let _ = self.finish(done);
        }
    }

    /// What the sync thread's finished write means for the store.
    fn finish(&mut self, done: crate::journal_sync::Done) -> Result<(), ReplayRefusal> {
        let len = self.in_flight.take().unwrap_or(0);
        if done.result.is_ok() {
            self.syncs.observe(micros_of(done.took));
        }
        self.spare = done.bytes;
        self.spare.clear();
        match done.result {
            Ok(()) => {
                self.end += len;
                self.appended += len;
                Ok(())
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Whether a packet digest (fwknop) may be accepted at `now`; records nothing.
    pub fn check_digest(&self, digest: &[u8; 32], now: Micros) -> Result<(), ReplayRefusal> {
        self.closed(now)?;
        if self.state.digests.contains(digest, now) {
            return Err(ReplayRefusal::DigestReplayed);
        }
        Ok(())
    }

    /// Records a packet digest until `keep_until` (durable at the next commit).
    pub fn accept_digest(
        &mut self,
        digest: [u8; 32],
        keep_until: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal> {
        self.check_digest(&digest, now)?;
        if self.state.digests.len() >= journal::MAX_DIGESTS {
            self.state.digests.prune(now);
            if self.state.digests.len() >= journal::MAX_DIGESTS {
                return Err(ReplayRefusal::Full(journal::MAX_DIGESTS));
            }
        }
        let entry = journal::Entry::Digest { digest, keep_until };
        self.state.apply(self.window, &entry);
        entry.encode_into(&mut self.pending);
        Ok(())
    }

    /// For tests: syncs in the background, each write held until the returned gate says
    /// `true` (write) or `false` (fail as a full disk would); see
    /// [`gated_writes`](crate::journal_sync::gated_writes).
    #[cfg(test)]
    pub(crate) fn gate_background_syncs(&mut self, wake: Wake) -> std::sync::mpsc::Sender<bool> {
        let (write, gate) = crate::journal_sync::gated_writes();
        self.write_at = write;
        assert!(self.sync_in_background(wake).expect("sync thread"));
        gate
    }

    /// Entries accepted but not yet durable, in bytes.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }
}

impl ReplayState for ReplayStore {
    fn window(&self) -> Window {
        self.window
    }

    fn check(
        &self,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal> {
        self.closed(now)?;
        Ok(self
            .state
            .record
            .check(self.window, client, timestamp, now)?)
    }

    fn accept(
        &mut self,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal> {
        ReplayState::check(self, client, timestamp, now)?;
        let entry = journal::Entry::Accept {
            client: *client,
            timestamp,
            now,
        };
        self.state.apply(self.window, &entry);
        entry.encode_into(&mut self.pending);
        Ok(())
    }

    fn check_digest(&self, digest: &[u8; 32], now: Micros) -> Result<(), ReplayRefusal> {
        ReplayStore::check_digest(self, digest, now)
    }

    fn accept_digest(
        &mut self,
        digest: [u8; 32],
        keep_until: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal> {
        ReplayStore::accept_digest(self, digest, keep_until, now)
    }

    fn uncommitted(&self) -> bool {
        !self.pending.is_empty()
    }

    fn commit(&mut self, now: Micros) -> Result<(), ReplayRefusal> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.reap_abandoned();
        if self.in_flight.is_some() {
            // Never two writers at once, and never a result lost: the caller must hand the
            // background commit back first. The batch is refused (fail closed); its entries
            // stay pending and go to disk with the next write, so a crash cannot forget them.
            return Err(ReplayRefusal::Persist("a commit is still in flight".into()));
        }
        let result = if self.must_compact() {
            // The snapshot already holds the pending entries: one durable step either way.
            self.compact(now)
        } else {
            self.append()
        };
        self.commits += 1;
        result.map_err(|e| {
            self.pending.clear();
            self.failed(&e)
        })
    }

    fn begin_commit(&mut self, now: Micros) -> Commit {
        if self.pending.is_empty() {
            return Commit::Nothing;
        }
        self.reap_abandoned();
        if self.syncer.is_none() || self.in_flight.is_some() || self.must_compact() {
            // (In flight: `commit` refuses the batch rather than run two writes at once.)
            // Compaction (rare: at most once per 4 MiB of entries) stays on the caller's thread.
            return Commit::Done(self.commit(now));
        }
        let file = match self.room_for_pending() {
            Ok(file) => file,
            Err(e) => {
                self.commits += 1;
                self.pending.clear();
                return Commit::Done(Err(self.failed(&e)));
            }
        };
        let len = self.pending.len() as u64;
        let bytes = std::mem::replace(&mut self.pending, std::mem::take(&mut self.spare));
        let Some(syncer) = &self.syncer else {
            return Commit::Done(Err(ReplayRefusal::Persist("no sync thread".into())));
        };
        match syncer.send(file, bytes, self.end) {
            Ok(()) => {
                self.in_flight = Some(len);
                self.commits += 1;
                Commit::Started
            }
            Err(bytes) => {
                // The thread is gone: commit here, as without one.
                self.syncer = None;
                self.pending = bytes;
                Commit::Done(self.commit(now))
            }
        }
    }

    fn poll_commit(&mut self) -> Option<Result<(), ReplayRefusal>> {
        self.in_flight?;
        let done = self.syncer.as_ref()?.try_done()?;
        Some(self.finish(done))
    }

    fn wait_commit(&mut self, limit: Duration) -> Option<Result<(), ReplayRefusal>> {
        self.in_flight?;
        let done = self.syncer.as_ref()?.wait_done(limit)?;
        Some(self.finish(done))
    }

    fn sync_in_background(&mut self, wake: Wake) -> std::io::Result<bool> {
        self.syncer = Some(Syncer::start(self.write_at.clone(), wake)?);
        Ok(true)
    }

    fn sync_times(&self) -> Option<&crate::metrics::Histogram> {
        Some(&self.syncs)
    }

    fn retain_clients(&mut self, keep: &dyn Fn(&PublicKey) -> bool) {
        self.state.record.retain_clients(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Histogram;

    const NOW: Micros = 1_700_000_000_000_000;
    const S: Micros = 1_000_000;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "spad-state-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn file(&self) -> PathBuf {
            self.0.join("replay.bin")
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn client(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    #[test]
    fn survives_reload_and_fails_closed_on_damage() {
        let dir = TempDir::new("damage");
        let path = dir.file();
        let w = Window::default();
        let (mut store, warning) = ReplayStore::load(path.clone(), w, NOW);
        assert!(warning.is_none());
        store.accept(&client(1), NOW, NOW).unwrap();
        store.commit(NOW).unwrap();
        let (store, _) = ReplayStore::load(path.clone(), w, NOW);
        assert_eq!(
            store.check(&client(1), NOW, NOW),
            Err(ReplayRefusal::Rule(ReplayError::Replayed))
        );
        std::fs::write(&path, b"damaged").unwrap();
        let (store, warning) = ReplayStore::load(path.clone(), w, NOW);
        assert!(warning.unwrap().contains("failing closed"));
        assert!(matches!(
            store.check(&client(1), NOW + 1, NOW),
            Err(ReplayRefusal::FailClosed(_))
        ));
        assert_eq!(
            std::fs::read(path.with_extension("damaged")).unwrap(),
            b"damaged"
        );
        // The deadline is in the new journal: a restart inside the window still fails closed.
        drop(store);
        let (store, _) = ReplayStore::load(path.clone(), w, NOW + 10 * S);
        assert!(matches!(
            store.check(&client(1), NOW + 10 * S, NOW + 10 * S),
            Err(ReplayRefusal::FailClosed(_))
        ));
        assert!(store.check(&client(1), NOW + 91 * S, NOW + 91 * S).is_ok());
    }

    /// Accepted entries are not on disk until the commit; after it they survive a restart
    /// (what `kill -9` leaves), and one commit covers a whole batch.
    #[test]
    fn one_commit_makes_a_batch_durable() {
        let dir = TempDir::new("batch");
        let w = Window::default();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW);
        let before = std::fs::metadata(dir.file()).unwrap().len();
        for n in 0..100 {
            store.accept(&client(n), NOW, NOW).unwrap();
        }
        // The same request twice in one batch: refused before any commit.
        assert_eq!(
            store.accept(&client(7), NOW, NOW),
            Err(ReplayRefusal::Rule(ReplayError::Replayed))
        );
        assert!(store.uncommitted());
        assert_eq!(std::fs::metadata(dir.file()).unwrap().len(), before);
        // What a restart would read now (loading a second store would compact the file).
        let on_disk = journal::decode(&std::fs::read(dir.file()).unwrap(), w).unwrap();
        assert!(on_disk.state.record.is_empty(), "nothing durable yet");
        store.commit(NOW).unwrap();
        assert_eq!((store.commits, store.uncommitted()), (1, false));
        let reloaded = ReplayStore::load(dir.file(), w, NOW).0;
        for n in 0..100 {
            assert_eq!(
                reloaded.check(&client(n), NOW, NOW),
                Err(ReplayRefusal::Rule(ReplayError::Replayed))
            );
        }
    }

    /// A crash in the middle of an append: the torn tail is ignored, what was committed stays.
    #[test]
    fn a_torn_tail_is_ignored_and_a_damaged_middle_fails_closed() {
        let dir = TempDir::new("torn");
        let w = Window::default();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW);
        store.accept(&client(1), NOW, NOW).unwrap();
        store.commit(NOW).unwrap();
        let committed = store.end as usize;
        store.accept(&client(2), NOW, NOW).unwrap();
        store.accept(&client(3), NOW, NOW).unwrap();
        store.commit(NOW).unwrap();
        let full = std::fs::read(dir.file()).unwrap();
        let records = store.end as usize;
        // Half of the second batch reached the disk; the rest of the room is still zeros.
        let mut torn = full.clone();
        torn[committed + (records - committed) / 2 + 20..].fill(0);
        std::fs::write(dir.file(), &torn).unwrap();
        let (store, warning) = ReplayStore::load(dir.file(), w, NOW);
        assert!(warning.unwrap().contains("torn tail"));
        assert_eq!(
            store.check(&client(1), NOW, NOW),
            Err(ReplayRefusal::Rule(ReplayError::Replayed))
        );
        assert!(
            store.check(&client(2), NOW + 1, NOW).is_ok(),
            "not failing closed"
        );
        // Compacted at start: the next load is clean.
        assert!(ReplayStore::load(dir.file(), w, NOW).1.is_none());

        // A flipped bit in the committed part, with valid entries after it.
        let mut damaged = full.clone();
        damaged[committed - 20] ^= 1;
        std::fs::write(dir.file(), &damaged).unwrap();
        let (store, warning) = ReplayStore::load(dir.file(), w, NOW);
        assert!(warning.unwrap().contains("failing closed"));
        assert!(matches!(
            store.check(&client(9), NOW, NOW),
            Err(ReplayRefusal::FailClosed(_))
        ));
    }

    #[test]
    fn digests_are_durable_and_expire() {
        let dir = TempDir::new("digest");
        let w = Window::default();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW);
        let digest = [5u8; 32];
        store.check_digest(&digest, NOW).unwrap();
        store.accept_digest(digest, NOW + 60 * S, NOW).unwrap();
        assert_eq!(
            store.accept_digest(digest, NOW + 60 * S, NOW),
            Err(ReplayRefusal::DigestReplayed)
        );
        store.commit(NOW).unwrap();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW + S);
        assert_eq!(
            store.check_digest(&digest, NOW + S),
            Err(ReplayRefusal::DigestReplayed)
        );
        assert!(store.check_digest(&digest, NOW + 60 * S).is_ok());
        store
            .accept_digest(digest, NOW + 120 * S, NOW + 60 * S)
            .unwrap();
    }

    #[test]
    fn the_journal_is_compacted_when_it_grows() {
        let dir = TempDir::new("compact");
        let w = Window::default();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW);
        store.compact_after = 4096;
        for i in 0..2000 {
            store
                .accept(&client((i % 10) as u8), NOW + i, NOW + i)
                .unwrap();
            store.commit(NOW + i).unwrap();
        }
        assert!(store.compactions > 10, "{}", store.compactions);
        let size = std::fs::metadata(dir.file()).unwrap().len() - store.preallocate;
        assert!(size < 4096 + 2 * (10 * 44 + 640 * 8 + 64), "{size}");
        let reloaded = ReplayStore::load(dir.file(), w, NOW + 2000).0;
        assert_eq!(reloaded.state, store.state);
    }

    /// Appends go into the zeroed room after the records: the file keeps its size, a restart
    /// reads every committed entry and no torn tail, and a batch bigger than the room grows the
    /// file by whole rooms.
    #[test]
    fn appends_fill_the_preallocated_room_then_grow_it() {
        let dir = TempDir::new("room");
        let w = Window::default();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW);
        let size = || std::fs::metadata(dir.file()).unwrap().len();
        let start = size();
        assert_eq!(start, store.end + PREALLOCATE);
        for n in 0..50 {
            store.accept(&client(n), NOW, NOW).unwrap();
            store.commit(NOW).unwrap();
        }
        assert_eq!(size(), start, "appends changed the file's size");
        let on_disk = journal::decode(&std::fs::read(dir.file()).unwrap(), w).unwrap();
        assert_eq!((on_disk.entries, on_disk.torn_bytes), (50, 0));
        assert_eq!(on_disk.padding as u64, start - store.end);
        assert_eq!(on_disk.state, store.state);

        // A room of 100 bytes: the second batch (2 entries, 122 bytes) does not fit.
        store.preallocate = 100;
        store.compact(NOW).unwrap();
        let records = store.end;
        assert_eq!(size(), records + 100);
        store.accept(&client(60), NOW, NOW).unwrap();
        store.commit(NOW).unwrap();
        assert_eq!(size(), records + 100, "61 bytes fit in the room");
        store.accept(&client(61), NOW, NOW).unwrap();
        store.accept(&client(62), NOW, NOW).unwrap();
        store.commit(NOW).unwrap();
        assert_eq!(size(), store.end + 100, "grown by a whole room");
        let (reloaded, warning) = ReplayStore::load(dir.file(), w, NOW);
        assert!(warning.is_none(), "{warning:?}");
        assert_eq!(reloaded.state, store.state);
    }

    /// Every successful append is timed, on the caller's thread and on the sync thread
    /// alike: a write that takes 30 ms shows as one sync of at least that long. Compactions
    /// are not appends, and failed writes are not syncs: neither is counted.
    #[test]
    fn each_append_is_timed_wherever_it_is_synced() {
        let dir = TempDir::new("timed");
        let w = Window::default();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW);
        assert_eq!(store.sync_times().map(Histogram::count), Some(0));
        store.accept(&client(1), NOW, NOW).unwrap();
        assert_eq!(store.begin_commit(NOW), Commit::Done(Ok(())));
        assert_eq!(store.syncs.count(), 1, "synchronous append");

        // A write that takes at least 30 ms inside the timed call (a slow disk), so the
        // measurement cannot come in under it however the threads are scheduled.
        store.write_at = WriteAt(Arc::new(|file: &std::fs::File, bytes: &[u8], offset| {
            std::thread::sleep(Duration::from_millis(30));
            file.write_all_at(bytes, offset)?;
            file.sync_data()
        }));
        assert!(store.sync_in_background(Arc::new(|| {})).expect("thread"));
        store.accept(&client(2), NOW, NOW).unwrap();
        assert_eq!(store.begin_commit(NOW), Commit::Started);
        assert_eq!(store.wait_commit(Duration::from_secs(10)), Some(Ok(())));
        let syncs = store.sync_times().expect("a local journal is timed");
        assert_eq!(syncs.count(), 2);
        assert!(
            syncs.sum_micros() >= 30_000,
            "the slow write counts its time: {syncs:?}"
        );
        // A failed write (a full disk) is not a sync.
        let gate = store.gate_background_syncs(Arc::new(|| {}));
        store.accept(&client(3), NOW, NOW).unwrap();
        assert_eq!(store.begin_commit(NOW), Commit::Started);
        gate.send(false).unwrap();
        assert!(matches!(
            store.wait_commit(Duration::from_secs(10)),
            Some(Err(ReplayRefusal::Persist(_)))
        ));
        assert_eq!(store.syncs.count(), 2);
    }

    /// In the background: a started commit is on disk only once it is handed back, entries
    /// accepted meanwhile wait for the next one, and a failed write refuses its batch and
    /// makes the next commit rewrite the whole file.
    #[test]
    fn a_background_commit_counts_only_once_handed_back() {
        let dir = TempDir::new("background");
        let w = Window::default();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW);
        let gate = store.gate_background_syncs(Arc::new(|| {}));
        let on_disk = || journal::decode(&std::fs::read(dir.file()).unwrap(), w).unwrap();

        store.accept(&client(1), NOW, NOW).unwrap();
        assert_eq!(store.begin_commit(NOW), Commit::Started);
        assert_eq!(store.poll_commit(), None, "held back");
        assert_eq!(on_disk().entries, 0);
        // Accepted while the first is in flight: refused as a replay at once, durable later.
        store.accept(&client(2), NOW, NOW).unwrap();
        assert!(store.accept(&client(1), NOW, NOW).is_err());
        gate.send(true).unwrap();
        assert_eq!(store.wait_commit(Duration::from_secs(10)), Some(Ok(())));
        assert_eq!(on_disk().entries, 1);
        assert_eq!(store.begin_commit(NOW), Commit::Started);
        gate.send(true).unwrap();
        assert_eq!(store.wait_commit(Duration::from_secs(10)), Some(Ok(())));
        assert_eq!(on_disk().entries, 2);

        // A failed write: its batch is refused; the next commit rewrites the file (on the
        // caller's thread) and holds everything accepted, the failed batch's entry too.
        store.accept(&client(3), NOW, NOW).unwrap();
        assert_eq!(store.begin_commit(NOW), Commit::Started);
        gate.send(false).unwrap();
        assert!(matches!(
            store.wait_commit(Duration::from_secs(10)),
            Some(Err(ReplayRefusal::Persist(_)))
        ));
        store.accept(&client(4), NOW, NOW).unwrap();
        assert_eq!(store.begin_commit(NOW), Commit::Done(Ok(())));
        // Read without loading (a load would compact the file under the open store).
        let state = on_disk().state;
        for n in 1..=4 {
            assert!(
                state.record.check(w, &client(n), NOW, NOW).is_err(),
                "client {n}"
            );
        }
        // Never two writes at once: a commit asked for while one is in flight is refused.
        store.accept(&client(5), NOW, NOW).unwrap();
        assert_eq!(store.begin_commit(NOW), Commit::Started);
        store.accept(&client(6), NOW, NOW).unwrap();
        assert!(matches!(
            store.begin_commit(NOW),
            Commit::Done(Err(ReplayRefusal::Persist(_)))
        ));
        drop(gate);
        assert_eq!(store.wait_commit(Duration::from_secs(10)), Some(Ok(())));

        // A caller that gave up waiting (its grants refused): once the write finishes, the
        // next commit collects it and goes ahead; the store is not stuck.
        let gate = store.gate_background_syncs(Arc::new(|| {}));
        store.accept(&client(7), NOW, NOW).unwrap();
        assert_eq!(store.begin_commit(NOW), Commit::Started);
        assert_eq!(
            store.wait_commit(Duration::from_millis(20)),
            None,
            "gave up"
        );
        store.accept(&client(8), NOW, NOW).unwrap();
        assert!(
            matches!(
                store.begin_commit(NOW),
                Commit::Done(Err(ReplayRefusal::Persist(_)))
            ),
            "still writing: refused, not run twice"
        );
        gate.send(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut started = false;
        let mut stamp = NOW;
        while !started && std::time::Instant::now() < deadline {
            stamp += 1;
            store.accept(&client(9), stamp, NOW).unwrap();
            started = store.begin_commit(NOW) == Commit::Started;
            if !started {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        assert!(started, "the abandoned write was collected");
        drop(gate);
        assert_eq!(store.wait_commit(Duration::from_secs(10)), Some(Ok(())));
        let state = on_disk().state;
        for n in [6, 7, 8] {
            assert!(
                state.record.check(w, &client(n), NOW, NOW).is_err(),
                "client {n}'s entry reached the disk"
            );
        }
    }

    /// A write that fails (full disk) refuses the batch and leaves nothing accepted twice.
    #[test]
    fn a_failed_commit_refuses_and_the_next_rewrites() {
        let dir = TempDir::new("fail");
        let w = Window::default();
        let (mut store, _) = ReplayStore::load(dir.file(), w, NOW);
        store.accept(&client(1), NOW, NOW).unwrap();
        store.file = Some(Arc::new(std::fs::File::open(dir.file()).unwrap())); // read-only: write fails
        assert!(matches!(store.commit(NOW), Err(ReplayRefusal::Persist(_))));
        assert_eq!(
            store.check(&client(1), NOW, NOW),
            Err(ReplayRefusal::Rule(ReplayError::Replayed))
        );
        store.accept(&client(2), NOW, NOW).unwrap();
        store.commit(NOW).unwrap();
        let reloaded = ReplayStore::load(dir.file(), w, NOW).0;
        assert!(reloaded.check(&client(1), NOW, NOW).is_err());
        assert!(reloaded.check(&client(2), NOW, NOW).is_err());
    }
}
