//! The replay journal's disk work off the daemon's loop: one thread that writes a batch's
//! records at their place in the file and waits for `fdatasync`, while the loop goes on
//! capturing and deciding. At most one write is in flight; the loop is woken when it is done.
//!
//! The thread never decides anything: what a finished sync means (grants may now be
//! installed, or refused) is the store's and the pipeline's business. The write itself is a
//! [`WriteAt`] so tests can hold a sync back or make it fail at a chosen moment.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// The signature of a [`WriteAt`].
pub type WriteFn = dyn Fn(&File, &[u8], u64) -> io::Result<()> + Send + Sync;

/// Writes `bytes` at `offset` of `file` and makes them durable.
#[derive(Clone)]
pub struct WriteAt(pub Arc<WriteFn>);

impl std::fmt::Debug for WriteAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteAt")
    }
}

impl WriteAt {
    pub fn call(&self, file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
        (self.0)(file, bytes, offset)
    }
}

/// Called on the sync thread when a write finished (wakes the daemon's loop).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// The real write: positional write, then `fdatasync`.
pub fn write_and_sync() -> WriteAt {
    WriteAt(Arc::new(|file: &File, bytes: &[u8], offset: u64| {
        file.write_all_at(bytes, offset)?;
        file.sync_data()
    }))
}

struct Job {
    file: Arc<File>,
    bytes: Vec<u8>,
    offset: u64,
}

/// A finished write: its result, how long the write and its sync took, and the buffer back
/// for reuse.
#[derive(Debug)]
pub struct Done {
    pub result: io::Result<()>,
    pub took: Duration,
    pub bytes: Vec<u8>,
}

/// The sync thread and its two channels. Dropping it closes the job channel, which ends the
/// thread once its write in flight (if any) is done. The thread is not joined (its handle is
/// not kept): one stuck in `fdatasync` on a hung disk must not keep the daemon from exiting;
/// `Pipeline::settle` has already refused the grants that waited for it.
pub struct Syncer {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer").finish_non_exhaustive()
    }
}

impl Syncer {
    /// Starts the thread. `wake` runs on it after each write.
    pub fn start(write: WriteAt, wake: Wake) -> io::Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel::<Done>();
        std::thread::Builder::new()
            .name("spad-journal".into())
            .spawn(move || {
                while let Ok(job) = inbox.recv() {
                    let started = std::time::Instant::now();
                    let result = write.call(&job.file, &job.bytes, job.offset);
                    if outbox
                        .send(Done {
                            result,
                            took: started.elapsed(),
                            bytes: job.bytes,
                        })
                        .is_err()
                    {
                        break;
                    }
                    wake();
                }
            })?;
        Ok(Self { jobs, done })
    }

    /// Hands a write to the thread; gives the buffer back if the thread is gone.
    pub fn send(&self, file: Arc<File>, bytes: Vec<u8>, offset: u64) -> Result<(), Vec<u8>> {
        self.jobs
            .send(Job {
                file,
                bytes,
                offset,
            })
            .map_err(|e| e.0.bytes)
    }

    /// The finished write, if it is done (never blocks).
    pub fn try_done(&self) -> Option<Done> {
        match self.done.try_recv() {
            Ok(done) => Some(done),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(gone()),
        }
    }

    /// Waits up to `limit` for the write in flight.
    pub fn wait_done(&self, limit: Duration) -> Option<Done> {
        match self.done.recv_timeout(limit) {
            Ok(done) => Some(done),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(gone()),
        }
    }
}

/// What a write in flight became when its thread died: a failure (nothing is granted on it).
fn gone() -> Done {
    Done {
        result: Err(io::Error::other("the journal's sync thread is gone")),
        took: Duration::ZERO,
        bytes: Vec::new(),
    }
}

/// For tests: writes that wait for a word from the test (`true`: write and sync, `false`:
/// fail as a full disk would). A dropped sender lets every later write through.
#[cfg(test)]
pub(crate) fn gated_writes() -> (WriteAt, mpsc::Sender<bool>) {
    let (gate, words) = mpsc::channel::<bool>();
    let words = std::sync::Mutex::new(words);
    let write = WriteAt(Arc::new(move |file: &File, bytes: &[u8], offset: u64| {
        let go = words
            .lock()
            .map(|w| w.recv().unwrap_or(true))
            .unwrap_or(true);
        if !go {
            return Err(io::Error::other("No space left on device (test)"));
        }
        file.write_all_at(bytes, offset)?;
        file.sync_data()
    }));
    (write, gate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_write_is_done_in_the_background_and_wakes_the_caller() {
        let path = std::env::temp_dir().join(format!("spad-sync-{}", std::process::id()));
        let file = Arc::new(File::create(&path).expect("create"));
        let woken = Arc::new(AtomicUsize::new(0));
        let (hold, release) = mpsc::channel::<()>();
        let release = std::sync::Mutex::new(release);
        let write = WriteAt(Arc::new(move |file: &File, bytes: &[u8], offset: u64| {
            let _ = release.lock().map(|r| r.recv());
            file.write_all_at(bytes, offset)?;
            file.sync_data()
        }));
        let counter = Arc::clone(&woken);
        let syncer = Syncer::start(
            write,
            Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .expect("thread");
        syncer
            .send(Arc::clone(&file), b"hello".to_vec(), 3)
            .expect("sent");
        assert!(syncer.try_done().is_none(), "held back");
        assert!(syncer.wait_done(Duration::from_millis(50)).is_none());
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        hold.send(()).expect("release");
        let done = syncer.wait_done(Duration::from_secs(10)).expect("done");
        assert!(done.result.is_ok());
        assert_eq!(done.bytes, b"hello", "the buffer comes back");
        assert_eq!(std::fs::read(&path).expect("read"), b"\0\0\0hello");
        // The wake runs after the result is sent: poll until it has run.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while woken.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        drop(hold);
        drop(syncer);
        let _ = std::fs::remove_file(path);
    }
}
