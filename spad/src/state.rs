//! Durable daemon state: atomic, fsynced file replacement, and the replay store built on it.

use std::io::Write;
use std::path::{Path, PathBuf};

use spa_shared::keys::PublicKey;
use spa_shared::replay::{ReplayError, ReplayRecord, Window};
use spa_shared::Micros;

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// write a temporary file, fsync it, rename it over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
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
}

/// The replay record plus where it lives on disk.
#[derive(Debug)]
pub struct ReplayStore {
    path: PathBuf,
    record: ReplayRecord,
    window: Window,
    closed_until: Option<Micros>,
}

impl ReplayStore {
    /// Loads the record. A damaged file means packets seen before the damage cannot be told
    /// from new ones, so everything is refused until one whole window has passed.
    pub fn load(path: PathBuf, window: Window, now: Micros) -> (Self, Option<String>) {
        let (record, closed_until, warning) = match std::fs::read(&path) {
            Ok(bytes) => match ReplayRecord::decode(&bytes) {
                Ok(record) => (record, None, None),
                Err(e) => {
                    let until = now
                        .saturating_add(window.max_age)
                        .saturating_add(window.max_future);
                    (
                        ReplayRecord::new(),
                        Some(until),
                        Some(format!(
                            "{}: {e}; failing closed until {}",
                            path.display(),
                            crate::log::timestamp(until)
                        )),
                    )
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (ReplayRecord::new(), None, None),
            Err(e) => {
                let until = now
                    .saturating_add(window.max_age)
                    .saturating_add(window.max_future);
                (
                    ReplayRecord::new(),
                    Some(until),
                    Some(format!(
                        "cannot read {}: {e}; failing closed",
                        path.display()
                    )),
                )
            }
        };
        (
            Self {
                path,
                record,
                window,
                closed_until,
            },
            warning,
        )
    }

    pub fn window(&self) -> Window {
        self.window
    }

    /// Checks without recording.
    pub fn check(
        &self,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal> {
        if let Some(until) = self.closed_until {
            if now < until {
                return Err(ReplayRefusal::FailClosed(crate::log::timestamp(until)));
            }
        }
        Ok(self.record.check(self.window, client, timestamp, now)?)
    }

    /// Records the timestamp durably; only then may the caller open the firewall.
    pub fn accept(
        &mut self,
        client: &PublicKey,
        timestamp: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal> {
        self.check(client, timestamp, now)?;
        let mut next = self.record.clone();
        next.accept(self.window, client, timestamp, now)?;
        write_atomic(&self.path, &next.encode())
            .map_err(|e| ReplayRefusal::Persist(e.to_string()))?;
        self.record = next;
        Ok(())
    }

    /// Drops clients that are no longer configured.
    pub fn retain_clients(&mut self, keep: impl Fn(&PublicKey) -> bool) {
        self.record.retain_clients(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reload_and_fails_closed_on_damage() {
        let dir = std::env::temp_dir().join(format!("spad-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("replay.bin");
        let _ = std::fs::remove_file(&path);
        let now = 1_700_000_000_000_000;
        let w = Window::default();
        let client = PublicKey([1; 32]);
        let (mut store, warning) = ReplayStore::load(path.clone(), w, now);
        assert!(warning.is_none());
        store.accept(&client, now, now).unwrap();
        let (store, _) = ReplayStore::load(path.clone(), w, now);
        assert_eq!(
            store.check(&client, now, now),
            Err(ReplayRefusal::Rule(ReplayError::Replayed))
        );
        std::fs::write(&path, b"damaged").unwrap();
        let (store, warning) = ReplayStore::load(path.clone(), w, now);
        assert!(warning.unwrap().contains("failing closed"));
        assert!(matches!(
            store.check(&client, now + 1, now),
            Err(ReplayRefusal::FailClosed(_))
        ));
        assert!(store
            .check(&client, now + 91_000_000, now + 91_000_000)
            .is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// fwknop replay digests (issue 10). One separate block on purpose: the replay journal provides
// the same two methods on its store, and this simple implementation gives way to it at merge.
// Digests live in `replay-fwknop.bin` beside the replay record: a magic line, then per digest
// 32 bytes of SHA-256 and 8 bytes (big endian) of "keep until" microseconds. Rewritten with
// `write_atomic` (fsynced) before the grant; a damaged file fails closed for
// `DIGEST_FAIL_CLOSED` after its last change.
// ---------------------------------------------------------------------------------------------

const DIGEST_MAGIC: &[u8] = b"spad fwknop digests v1\n";
/// How long a damaged digest file refuses fwknop packets after its last change: longer than
/// the largest max-age a fwknop client may have (10 minutes) plus its future tolerance.
const DIGEST_FAIL_CLOSED: Micros = 20 * 60 * 1_000_000;

impl ReplayStore {
    fn digest_path(&self) -> PathBuf {
        self.path.with_file_name("replay-fwknop.bin")
    }

    /// The live digests on disk, or the time until which to fail closed.
    fn read_digests(&self, now: Micros) -> Result<Vec<([u8; 32], Micros)>, ReplayRefusal> {
        if let Some(until) = self.closed_until {
            if now < until {
                return Err(ReplayRefusal::FailClosed(crate::log::timestamp(until)));
            }
        }
        let path = self.digest_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ReplayRefusal::Persist(format!("{}: {e}", path.display()))),
        };
        let entries = bytes
            .strip_prefix(DIGEST_MAGIC)
            .filter(|rest| rest.len() % 40 == 0);
        let Some(entries) = entries else {
            let changed = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(now, |d| d.as_micros() as Micros);
            let until = changed.saturating_add(DIGEST_FAIL_CLOSED);
            if now < until {
                return Err(ReplayRefusal::FailClosed(crate::log::timestamp(until)));
            }
            // Every digest it could have held has expired by now: start afresh.
            return Ok(Vec::new());
        };
        Ok(entries
            .chunks_exact(40)
            .map(|c| {
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&c[..32]);
                let keep = Micros::from_be_bytes(c[32..].try_into().expect("8 bytes"));
                (digest, keep)
            })
            .filter(|(_, keep)| *keep > now)
            .collect())
    }

    /// Refuses a digest already accepted and not yet expired.
    pub fn check_digest(&self, digest: &[u8; 32], now: Micros) -> Result<(), ReplayRefusal> {
        if self.read_digests(now)?.iter().any(|(d, _)| d == digest) {
            return Err(ReplayRefusal::Rule(ReplayError::Replayed));
        }
        Ok(())
    }

    /// Records the digest durably before the grant; kept until `keep_until`.
    pub fn accept_digest(
        &mut self,
        digest: [u8; 32],
        keep_until: Micros,
        now: Micros,
    ) -> Result<(), ReplayRefusal> {
        let mut live = self.read_digests(now)?;
        if live.iter().any(|(d, _)| *d == digest) {
            return Err(ReplayRefusal::Rule(ReplayError::Replayed));
        }
        live.push((digest, keep_until));
        let mut bytes = Vec::with_capacity(DIGEST_MAGIC.len() + 40 * live.len());
        bytes.extend_from_slice(DIGEST_MAGIC);
        for (d, keep) in &live {
            bytes.extend_from_slice(d);
            bytes.extend_from_slice(&keep.to_be_bytes());
        }
        write_atomic(&self.digest_path(), &bytes).map_err(|e| ReplayRefusal::Persist(e.to_string()))
    }
}

#[cfg(test)]
mod digest_tests {
    use super::*;

    #[test]
    fn digests_survive_a_restart_expire_and_fail_closed_on_damage() {
        let dir = std::env::temp_dir().join(format!("spad-digests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("replay.bin");
        let now: Micros = 1_700_000_000_000_000;
        let (mut store, _) = ReplayStore::load(path.clone(), Window::default(), now);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        store.check_digest(&a, now).unwrap();
        store.accept_digest(a, now + 120_000_000, now).unwrap();
        assert!(store.accept_digest(a, now + 120_000_000, now).is_err());
        let (mut store, _) = ReplayStore::load(path.clone(), Window::default(), now);
        assert_eq!(
            store.check_digest(&a, now + 1),
            Err(ReplayRefusal::Rule(ReplayError::Replayed))
        );
        store.check_digest(&b, now).unwrap();
        // Past its keep-until the digest is forgotten (the packet is stale by then anyway).
        store.check_digest(&a, now + 121_000_000).unwrap();
        store
            .accept_digest(b, now + 300_000_000, now + 121_000_000)
            .unwrap();
        let on_disk = std::fs::read(dir.join("replay-fwknop.bin")).unwrap();
        assert_eq!(
            on_disk.len(),
            DIGEST_MAGIC.len() + 40,
            "expired entry pruned"
        );
        std::fs::write(dir.join("replay-fwknop.bin"), b"damaged").unwrap();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as Micros;
        assert!(matches!(
            store.check_digest(&[3; 32], wall),
            Err(ReplayRefusal::FailClosed(_))
        ));
        store
            .check_digest(&[3; 32], wall + DIGEST_FAIL_CLOSED + 1_000_000)
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
