//! One daemon per state directory and per firewall table: exclusive `flock`s on
//! `STATE_DIR/spad.lock` and on `/run/lock/spad-table-TABLE-NETNS.lock` (NETNS: the network
//! namespace's inode, since a table exists once per namespace), held for the daemon's
//! lifetime, with the holder's PID written inside so a refusal can name it.
//!
//! The locks guard everything a daemon owns: the replay record, knock state and the firewall
//! table it (re)installs. The kernel drops a lock when the process dies, even by `kill -9`,
//! so a stale file never blocks a restart.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// File name of the lock inside the state directory.
pub const LOCK_FILE: &str = "spad.lock";

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another spad (pid {pid}) is running on {what}: stop it first (only one daemon may own a state directory and a firewall table)")]
    Held { pid: String, what: String },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process exits).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock on `state_dir` (which must exist) and writes our PID into it.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        Self::lock(
            &state_dir.join(LOCK_FILE),
            format!("state directory {}", state_dir.display()),
        )
    }

    /// Takes the lock on firewall table `table` of this network namespace.
    pub fn acquire_table(table: &str) -> Result<Self, LockError> {
        use std::os::unix::fs::MetadataExt;
        let netns = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
        let run = Path::new("/run/lock");
        let dir = if run.is_dir() {
            run.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        Self::lock(
            &dir.join(format!("spad-table-{table}-{netns}.lock")),
            format!("firewall table {table} of this network namespace"),
        )
    }

    fn lock(path: &Path, what: String) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Opened without truncation: the holder's PID must stay readable until we own the lock.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own; LOCK_NB makes it return at once.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io(e));
            }
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::Held {
                pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
                what,
            });
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }

    /// The PID of a daemon holding `state_dir` or `table`, if one does.
    pub fn holder(state_dir: &Path, table: &str) -> Option<String> {
        [Self::acquire(state_dir), Self::acquire_table(table)]
            .into_iter()
            .find_map(|attempt| match attempt {
                Err(LockError::Held { pid, .. }) => Some(pid),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_pid_and_drop_releases() {
        let dir = std::env::temp_dir().join(format!("spad-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = StateLock::acquire(&dir).unwrap();
        // flock locks belong to the open file description: a second open conflicts even in
        // the same process, as a second daemon would.
        let err = StateLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert_eq!(
            StateLock::holder(&dir, "spad-lock-test"),
            Some(std::process::id().to_string())
        );
        drop(first);
        assert!(StateLock::acquire(&dir).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
