//! systemd's notify protocol (`Type=notify`): READY, RELOADING, STOPPING, STATUS and WATCHDOG
//! datagrams to `$NOTIFY_SOCKET`, without libsystemd. Without that variable every call is a
//! no-op, so `spad run` behaves the same outside systemd.
//!
//! The variables are taken out of the environment when read, so commands spad starts (knockd-
//! style start/stop commands, `nft`) cannot talk to systemd in its name.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Talks to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` and removes them from the
    /// environment (call before any thread starts). A socket that cannot be used is logged
    /// by the caller through [`Notifier::problem`] and otherwise ignored.
    pub fn from_env() -> (Self, Option<String>) {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog_usec = std::env::var("WATCHDOG_USEC").ok();
        let watchdog_pid = std::env::var("WATCHDOG_PID").ok();
        for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(name);
        }
        let mut problem = None;
        let target = socket.and_then(|path| match connect(&path) {
            Ok(t) => Some(t),
            Err(e) => {
                problem = Some(format!(
                    "warning: NOTIFY_SOCKET={}: {e}; not notifying systemd",
                    path.to_string_lossy()
                ));
                None
            }
        });
        let ours = watchdog_pid
            .as_deref()
            .is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours && target.is_some())
            .map(Duration::from_micros);
        (Self { target, watchdog }, problem)
    }

    /// A notifier that sends nothing (tests, `spad` subcommands).
    pub fn none() -> Self {
        Self {
            target: None,
            watchdog: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one state message (newline-separated `KEY=value` lines).
    pub fn send(&self, state: &str) {
        if let Some((socket, address)) = &self.target {
            let _ = socket.send_to_addr(state.as_bytes(), address);
        }
    }

    /// `READY=1` with a status line: the ruleset is installed and packets are heard.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `RELOADING=1` with the monotonic time systemd needs to match it to `systemctl reload`.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            monotonic_usec()
        ));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// `WATCHDOG=1`: the daemon's loop is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// When systemd asked for a watchdog: a task of the running event loop that sends
    /// `WATCHDOG=1` every half interval. The loop is single-threaded, so the task only runs
    /// while the loop keeps yielding: a loop stuck in a system call stops the pings and
    /// systemd restarts the daemon.
    pub fn spawn_watchdog(&self) -> std::io::Result<()> {
        let (Some(interval), Some((socket, address))) = (self.watchdog, &self.target) else {
            return Ok(());
        };
        let pinger = Self {
            target: Some((socket.try_clone()?, address.clone())),
            watchdog: None,
        };
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval / 2);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                pinger.watchdog();
            }
        });
        Ok(())
    }
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

fn connect(path: &std::ffi::OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    let address = match bytes.first() {
        // Abstract socket: systemd writes a leading `@`.
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(path))?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract socket name",
            ))
        }
    };
    Ok((UnixDatagram::unbound()?, address))
}

/// CLOCK_MONOTONIC in microseconds, as systemd's `MONOTONIC_USEC` wants it.
pub fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(t.tv_nsec as u64 / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_listener_with_the_protocol_fields() {
        let dir = std::env::temp_dir().join(format!("spad-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let (socket, address) = connect(path.as_os_str()).unwrap();
        let n = Notifier {
            target: Some((socket, address)),
            watchdog: Some(Duration::ZERO),
        };
        let mut buf = [0u8; 512];
        let mut next = || {
            let len = listener.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..len]).into_owned()
        };
        n.ready("listening\non 62201");
        assert_eq!(next(), "READY=1\nSTATUS=listening on 62201");
        n.reloading();
        let msg = next();
        let usec: u64 = msg
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(msg.starts_with("RELOADING=1\n"));
        assert!(usec > 0 && usec <= monotonic_usec());
        n.watchdog();
        assert_eq!(next(), "WATCHDOG=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relative_socket_paths_are_refused() {
        assert!(connect(std::ffi::OsStr::new("notify")).is_err());
    }
}
