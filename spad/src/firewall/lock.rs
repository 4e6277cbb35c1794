//! One daemon per state directory and per firewall table: an exclusive `flock` on
//! `STATE_DIR/spad.lock` (the holder's PID written inside), and, for the table, a listening
//! Unix socket with the abstract name `spad-table-TABLE`. Abstract names live in the network
//! namespace, exactly where a table does, need no writable directory (the daemon may run as
//! an unprivileged user) and leave no file behind; a second daemon learns the holder's PID
//! from the socket's peer credentials.
//!
//! The locks guard everything a daemon owns: the replay record, knock state and the firewall
//! table it (re)installs. The kernel drops both when the process dies, even by `kill -9`, so
//! nothing stale ever blocks a restart.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
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
    _file: Option<File>,
    _socket: Option<std::os::unix::net::UnixListener>,
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
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
        let name = format!("spad-table-{table}");
        let what = format!("firewall table {table} of this network namespace");
        let io = |source| LockError::Io {
            path: PathBuf::from(format!("@{name}")),
            source,
        };
        let address = SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?;
        match UnixListener::bind_addr(&address) {
            Ok(socket) => Ok(Self {
                _file: None,
                _socket: Some(socket),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let pid = UnixStream::connect_addr(&address)
                    .ok()
                    .and_then(|stream| {
                        nix::sys::socket::getsockopt(
                            &stream,
                            nix::sys::socket::sockopt::PeerCredentials,
                        )
                        .ok()
                    })
                    .map_or_else(|| "unknown".to_string(), |cred| cred.pid().to_string());
                Err(LockError::Held { pid, what })
            }
            Err(e) => Err(io(e)),
        }
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
        // Non-blocking: a held lock is reported at once, with the holder's PID.
        let locked = rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive);
        if let Err(e) = locked {
            if e != rustix::io::Errno::WOULDBLOCK {
                return Err(io(e.into()));
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
        Ok(Self {
            _file: Some(file),
            _socket: None,
        })
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
        let table = format!("locktest{}", std::process::id());
        let held = StateLock::acquire_table(&table).unwrap();
        let err = StateLock::acquire_table(&table).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        assert!(StateLock::acquire_table(&table).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
