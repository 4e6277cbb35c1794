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
