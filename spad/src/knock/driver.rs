//! The knock engine's driver: the I/O around the I/O-free [`Engine`].
//!
//! It builds the engine's [`Setup`] from the configuration (reading one-time sequence files and
//! TOTP enrollment proofs), loads what was used before from the state directory, and makes each
//! use durable before the door it allows is opened:
//! * `STATE_DIR/totp-used`: `DOOR STEP` per line, the TOTP steps whose sequence opened;
//! * `STATE_DIR/one-time-used`: `DOOR SEQUENCE` per line (`emergency 7100/tcp,7200/tcp`), the
//!   one-time sequences used. The configured one-time file is only read, never written.
//!
//! If a use cannot be written, the door stays shut (fail closed) and an error is logged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use spa_shared::Micros;

use super::config::TcpFlags;
use super::engine::{Engine, Event, Memory, Setup};
use super::one_time::{parse_one_time, OneTimeLines};
use super::static_doors::hull;
use crate::capture::bpf::Watch;
use crate::config::Config;
use crate::net::{PortProto, Proto};

const TOTP_USED: &str = "totp-used";
const ONE_TIME_USED: &str = "one-time-used";

/// Reads a knockd one-time sequence file: one sequence per line (`7000,8000:udp,9000` or
/// space separated); lines starting with `#` are used or comments. Returns unused lines and a
/// warning for lines that do not parse.
pub fn read_one_time(path: &Path) -> std::io::Result<(OneTimeLines, Option<String>)> {
    let text = std::fs::read_to_string(path)?;
    let (lines, bad) = parse_one_time(&text);
    let warning =
        (!bad.is_empty()).then(|| format!("{}: ignoring unparsable lines {bad:?}", path.display()));
    Ok((lines, warning))
}

/// Port ranges the capture must pass for `config`'s doors (the hull of each door per protocol,
/// so in-between hits are seen) and its decoys.
pub fn watched_ranges(config: &Config) -> Vec<Watch> {
    let mut out = Vec::new();
    for door in &config.doors.doors {
        let mut ports: Vec<PortProto> = door
            .sequence
            .iter()
            .chain(&door.close_sequence)
            .copied()
            .collect();
        if let Some(file) = &door.one_time_file {
            if let Ok((list, _)) = read_one_time(file) {
                ports.extend(list.into_iter().flat_map(|(_, s)| s));
            }
        }
        out.extend(hull(&ports));
    }
    for door in config.doors.totp.iter().filter(|d| d.enabled) {
        out.push(Watch {
            proto: door.proto,
            low: door.first_port,
            high: door.first_port,
        });
        out.push(Watch {
            proto: door.proto,
            low: door.rule.low,
            high: door.rule.high,
        });
    }
    out.extend(config.doors.decoys.iter().map(|p| Watch {
        proto: p.proto,
        low: p.port,
        high: p.port,
    }));
    out
}

/// Whether the capture may restrict TCP to SYN-without-ACK (true unless a door asks otherwise).
pub fn syn_only(config: &Config) -> bool {
    config
        .doors
        .doors
        .iter()
        .all(|d| d.tcp_flags == TcpFlags::SYN)
}

/// The engine's setup from `config`; problems reading files are returned as warnings.
pub fn setup(config: &Config, state_dir: &Path) -> (Setup, Vec<String>) {
    let mut warnings = Vec::new();
    let d = &config.doors;
    let one_time = d
        .doors
        .iter()
        .map(|door| {
            let path = door.one_time_file.as_ref()?;
            Some(match read_one_time(path) {
                Ok((lines, warning)) => {
                    warnings.extend(warning);
                    lines
                }
                Err(e) => {
                    warnings.push(format!(
                        "door {}: cannot read {}: {e}; the door stays shut",
                        door.name,
                        path.display()
                    ));
                    Vec::new()
                }
            })
        })
        .collect();
    let mut totp = Vec::new();
    for door in d.totp.iter().filter(|t| t.enabled) {
        if door.require_enrollment && !crate::enroll::is_enrolled(state_dir, door) {
            warnings.push(format!(
                "TOTP door {} is not enrolled yet; run `spad totp enroll --door {}`",
                door.name, door.name
            ));
            continue;
        }
        totp.push(door.clone());
    }
    let mut ignored = config.protected_ports();
    ignored.insert(PortProto {
        port: config.server.port,
        proto: Proto::Udp,
    });
    let setup = Setup {
        doors: d.doors.clone(),
        one_time,
        totp,
        decoys: d.decoys.clone(),
        ignored,
        service_timeouts: config
            .services
            .values()
            .map(|s| (s.name.clone(), s.timeout))
            .collect(),
        blacklist_after: d.blacklist_after,
        blacklist_for: d.blacklist_for,
        max_knocks_per_second: d.max_knocks_per_second,
        max_sources: d.max_sources,
    };
    (setup, warnings)
}

/// Reads `DOOR VALUE` lines; a missing file is empty, an unreadable one a warning.
fn read_pairs(path: &Path, warnings: &mut Vec<String>) -> Vec<(String, String)> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(d, v)| (d.to_string(), v.to_string()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warnings.push(format!("cannot read {}: {e}", path.display()));
            Vec::new()
        }
    }
}

/// The knock engine with its state directory: what the daemon holds.
#[derive(Debug)]
pub struct Knocks {
    engine: Engine,
    state_dir: PathBuf,
    totp_used: BTreeSet<(String, u64)>,
    one_time_used: BTreeSet<(String, String)>,
    warning: Option<String>,
}

impl Knocks {
    pub fn new(config: &Config, state_dir: &Path, now: Micros) -> Self {
        let (setup, mut warnings) = setup(config, state_dir);
        let totp_used: BTreeSet<(String, u64)> =
            read_pairs(&state_dir.join(TOTP_USED), &mut warnings)
                .into_iter()
                .filter_map(|(d, s)| Some((d, s.parse().ok()?)))
                .collect();
        let one_time_used: BTreeSet<(String, String)> =
            read_pairs(&state_dir.join(ONE_TIME_USED), &mut warnings)
                .into_iter()
                .collect();
        let mut by_door: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (door, seq) in &one_time_used {
            by_door.entry(door.clone()).or_default().insert(seq.clone());
        }
        let memory = Memory {
            totp_used: totp_used.clone(),
            one_time_used: by_door,
        };
        Self {
            engine: Engine::new(setup, memory, now),
            state_dir: state_dir.to_path_buf(),
            totp_used,
            one_time_used,
            warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
        }
    }

    /// A start-up or reload warning to log (unreadable files), once.
    pub fn take_warning(&mut self) -> Option<String> {
        self.warning.take()
    }

    /// Applies a new configuration; what was used stays used.
    pub fn reconfigure(&mut self, config: &Config, now: Micros) {
        let (setup, warnings) = setup(config, &self.state_dir);
        if !warnings.is_empty() {
            self.warning = Some(warnings.join("; "));
        }
        self.engine.reconfigure(setup, now);
    }

    /// Re-applies a blacklist entry found in the kernel after a restart.
    pub fn restore_blacklist(&mut self, address: IpAddr, until: Micros) {
        self.engine.restore_blacklist(address, until);
    }

    /// One observed knock: the engine's events, with uses made durable first.
    pub fn knock(
        &mut self,
        address: IpAddr,
        port: PortProto,
        tcp_flags: u8,
        now: Micros,
    ) -> Vec<Event> {
        let events = self.engine.knock(address, port, tcp_flags, now);
        self.persist(events)
    }

    /// Timers and purging.
    pub fn tick(&mut self, now: Micros) -> Vec<Event> {
        let events = self.engine.tick(now);
        self.persist(events)
    }

    /// The engine, for counters.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Writes the uses among `events` (one write per file per batch); if a write fails, drops
    /// every open and start command of the batch and says why.
    fn persist(&mut self, mut events: Vec<Event>) -> Vec<Event> {
        let (mut totp, mut one_time) = (false, false);
        for event in &events {
            match event {
                Event::TotpUsed { door, step } => {
                    self.totp_used.insert((door.clone(), *step));
                    // Steps more than 8 behind the newest use can never match again (skew ≤ 3).
                    let newest = *step;
                    self.totp_used
                        .retain(|(d, s)| d != door || s.saturating_add(8) >= newest);
                    totp = true;
                }
                Event::OneTimeUsed { door, sequence } => {
                    self.one_time_used.insert((door.clone(), sequence.clone()));
                    one_time = true;
                }
                _ => {}
            }
        }
        let mut failed = Vec::new();
        if totp {
            let text: String = self
                .totp_used
                .iter()
                .map(|(d, s)| format!("{d} {s}\n"))
                .collect();
            let path = self.state_dir.join(TOTP_USED);
            if let Err(e) = crate::state::write_atomic(&path, text.as_bytes()) {
                failed.push(format!(
                    "error: cannot persist TOTP use to {}: {e}; not opening",
                    path.display()
                ));
            }
        }
        if one_time {
            let text: String = self
                .one_time_used
                .iter()
                .map(|(d, s)| format!("{d} {s}\n"))
                .collect();
            let path = self.state_dir.join(ONE_TIME_USED);
            if let Err(e) = crate::state::write_atomic(&path, text.as_bytes()) {
                failed.push(format!(
                    "error: cannot persist one-time sequence use to {}: {e}; not opening",
                    path.display()
                ));
            }
        }
        if !failed.is_empty() {
            events.retain(|e| {
                !matches!(e, Event::Open { .. })
                    && !matches!(e, Event::Command { env, .. } if env.iter().any(|(k, v)| k == "SPAD_ACTION" && v == "start"))
            });
            events.extend(failed.into_iter().map(Event::Log));
        }
        events
    }
}
