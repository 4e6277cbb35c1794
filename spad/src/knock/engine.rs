//! Follows knocks per (source address, door, sequence) and decides.
//!
//! Differences from knockd, each deliberate and tested:
//! * progress is per source and door: one source completing never touches another's;
//! * a repeat of the port just accepted (a retransmitted SYN) is ignored, not a reset;
//! * the engine sees every port between a door's lowest and highest knock port, so a hit on an
//!   in-between port resets that source's progress: an ascending port scan never opens a door;
//! * decoy hits, resets and replays count as failures; too many and the source is blacklisted;
//! * an exhausted one-time list just disables that door;
//! * a TOTP sequence opens at most once per (door, time step), remembered across restarts.
//!
//! The engine does no network I/O. It persists TOTP use and one-time consumption itself, before
//! returning the event that opens the door.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spa_shared::totp;
use spa_shared::Micros;

use super::config::{StaticDoor, TotpDoor};
use crate::capture::bpf::Watch;
use crate::config::Config;
use crate::net::{PortProto, Proto};

/// What the daemon must do after a knock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Log(String),
    Open {
        door: String,
        address: IpAddr,
        services: Vec<String>,
    },
    Close {
        door: String,
        address: IpAddr,
        services: Vec<String>,
    },
    Blacklist {
        address: IpAddr,
        duration: Duration,
    },
    /// A knockd-style start/stop command: argv with `%IP%` replaced, plus environment.
    Command {
        argv: Vec<String>,
        env: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Which {
    Open,
    Close,
    OneTime,
    Totp(u64),
}

/// One observed knock.
#[derive(Debug, Clone, Copy)]
struct Hit {
    port: PortProto,
    now: Micros,
}

/// What one hit did to one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Not this sequence's port (or a duplicate of the port just accepted).
    Untouched,
    /// Moved on, started or started over, without completing.
    Advanced,
    Completed,
    /// Broke progress of at least one stage; the text says how, for the log.
    Broken(String),
}

/// What one hit did across all sequences of its source.
#[derive(Debug, Default)]
struct Verdict {
    /// Some sequence moved on or completed: the knock is a real user's.
    progressed: bool,
    /// Sequences this hit broke, as log lines; a failure only if nothing progressed.
    broken: Vec<String>,
    /// A completed TOTP sequence whose step was already used: always a failure.
    replayed: bool,
}

impl Verdict {
    fn note(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Untouched => {}
            Outcome::Advanced | Outcome::Completed => self.progressed = true,
            Outcome::Broken(line) => self.broken.push(line),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    matched: usize,
    started: Micros,
}

#[derive(Debug, Default, Clone)]
struct SourceState {
    failures: u32,
    first_failure: Micros,
    blacklisted_until: Micros,
    rate_second: u64,
    rate_count: u32,
}

#[derive(Debug, Clone)]
struct OneTimeList {
    path: PathBuf,
    /// (line index in the file, sequence) of unused lines, in order.
    unused: OneTimeLines,
}

/// Most (source, door, sequence) progress entries kept at once.
const MAX_PROGRESS: usize = 100_000;

/// The knock state machine.
#[derive(Debug)]
pub struct Engine {
    doors: Vec<StaticDoor>,
    totp: Vec<TotpDoor>,
    decoys: BTreeSet<PortProto>,
    ignored: BTreeSet<PortProto>,
    blacklist_after: u32,
    blacklist_for: Duration,
    max_rate: u32,
    service_timeouts: HashMap<String, Duration>,
    one_time: Vec<Option<OneTimeList>>,
    hulls: Vec<Vec<Watch>>,
    progress: HashMap<(IpAddr, usize, Which), Progress>,
    sources: HashMap<IpAddr, SourceState>,
    totp_used: BTreeSet<(String, u64)>,
    totp_path: PathBuf,
    state_dir: PathBuf,
    totp_cache: HashMap<(usize, u64), Vec<u16>>,
    timers: Vec<(Micros, usize, IpAddr)>,
    last_purge: Micros,
    warning: Option<String>,
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
        .all(|d| d.tcp_flags == super::config::TcpFlags::SYN)
}

fn hull(ports: &[PortProto]) -> Vec<Watch> {
    let mut out = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        let of: Vec<u16> = ports
            .iter()
            .filter(|p| p.proto == proto)
            .map(|p| p.port)
            .collect();
        if let (Some(lo), Some(hi)) = (of.iter().min(), of.iter().max()) {
            out.push(Watch {
                proto,
                low: *lo,
                high: *hi,
            });
        }
    }
    out
}

/// Unused lines of a one-time sequence file: (line index, sequence).
pub type OneTimeLines = Vec<(usize, Vec<PortProto>)>;

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

/// Parses one-time sequence text; returns the unused sequences and the 1-based numbers of
/// lines that do not parse. Never panics.
pub fn parse_one_time(text: &str) -> (OneTimeLines, Vec<usize>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let seq: Result<Vec<PortProto>, _> = line
            .split([',', ' ', '\t'])
            .filter(|p| !p.is_empty())
            .map(str::parse)
            .collect();
        match seq {
            Ok(seq) if seq.len() >= 2 => out.push((i, seq)),
            _ => bad.push(i + 1),
        }
    }
    (out, bad)
}

/// Marks line `index` of a one-time file as used by prefixing `#` (as knockd does), atomically.
fn mark_used(path: &Path, index: usize) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if let Some(line) = lines.get_mut(index) {
        line.insert(0, '#');
    }
    let mut out = lines.join("\n");
    out.push('\n');
    crate::state::write_atomic(path, out.as_bytes())
}

impl Engine {
    pub fn new(config: &Config, state_dir: &Path, now: Micros) -> Self {
        let mut engine = Self {
            doors: Vec::new(),
            totp: Vec::new(),
            decoys: BTreeSet::new(),
            ignored: BTreeSet::new(),
            blacklist_after: 3,
            blacklist_for: Duration::from_secs(600),
            max_rate: 20,
            service_timeouts: HashMap::new(),
            one_time: Vec::new(),
            hulls: Vec::new(),
            progress: HashMap::new(),
            sources: HashMap::new(),
            totp_used: BTreeSet::new(),
            totp_path: state_dir.join("totp-used"),
            state_dir: state_dir.to_path_buf(),
            totp_cache: HashMap::new(),
            timers: Vec::new(),
            last_purge: now,
            warning: None,
        };
        engine.load_totp_used();
        engine.reconfigure(config, now);
        engine
    }

    /// A start-up warning to log (unreadable files), once.
    pub fn take_warning(&mut self) -> Option<String> {
        self.warning.take()
    }

    fn load_totp_used(&mut self) {
        match std::fs::read_to_string(&self.totp_path) {
            Ok(text) => {
                for line in text.lines() {
                    if let Some((door, step)) = line.rsplit_once(' ') {
                        if let Ok(step) = step.parse() {
                            self.totp_used.insert((door.to_string(), step));
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => self.warning = Some(format!("cannot read {}: {e}", self.totp_path.display())),
        }
    }

    /// Applies a new configuration; progress on doors that still exist is kept.
    pub fn reconfigure(&mut self, config: &Config, now: Micros) {
        let d = &config.doors;
        self.doors = d.doors.clone();
        self.totp = Vec::new();
        for door in d.totp.iter().filter(|t| t.enabled) {
            if door.require_enrollment && !crate::enroll::is_enrolled(&self.state_dir, door) {
                self.warning = Some(format!(
                    "TOTP door {} is not enrolled yet; run `spad totp enroll --door {}`",
                    door.name, door.name
                ));
                continue;
            }
            self.totp.push(door.clone());
        }
        self.decoys = d.decoys.clone();
        self.blacklist_after = d.blacklist_after;
        self.blacklist_for = d.blacklist_for;
        self.max_rate = d.max_knocks_per_second;
        self.ignored = config.protected_ports();
        self.ignored.insert(PortProto {
            port: config.server.port,
            proto: Proto::Udp,
        });
        self.service_timeouts = config
            .services
            .values()
            .map(|s| (s.name.clone(), s.timeout))
            .collect();
        let mut warnings = Vec::new();
        self.one_time = self
            .doors
            .iter()
            .map(|door| {
                let path = door.one_time_file.clone()?;
                match read_one_time(&path) {
                    Ok((unused, warning)) => {
                        warnings.extend(warning);
                        Some(OneTimeList { path, unused })
                    }
                    Err(e) => {
                        warnings.push(format!(
                            "door {}: cannot read {}: {e}; the door stays shut",
                            door.name,
                            path.display()
                        ));
                        Some(OneTimeList {
                            path,
                            unused: Vec::new(),
                        })
                    }
                }
            })
            .collect();
        self.hulls = self
            .doors
            .iter()
            .enumerate()
            .map(|(i, door)| {
                let mut ports: Vec<PortProto> = door
                    .sequence
                    .iter()
                    .chain(&door.close_sequence)
                    .copied()
                    .collect();
                if let Some(list) = &self.one_time[i] {
                    ports.extend(list.unused.iter().flat_map(|(_, s)| s.iter().copied()));
                }
                hull(&ports)
            })
            .collect();
        self.progress.clear();
        self.totp_cache.clear();
        self.timers.retain(|(_, door, _)| *door < self.doors.len());
        warnings.extend(self.warning.take());
        if !warnings.is_empty() {
            self.warning = Some(warnings.join("; "));
        }
        let _ = now;
    }

    /// Re-applies a blacklist entry found in the kernel after a restart.
    pub fn restore_blacklist(&mut self, address: IpAddr, until: Micros) {
        self.sources.entry(address).or_default().blacklisted_until = until;
    }

    fn fail(&mut self, address: IpAddr, now: Micros, events: &mut Vec<Event>) {
        let window = self.blacklist_for.as_micros() as Micros;
        let state = self.sources.entry(address).or_default();
        if state.failures == 0 || now.saturating_sub(state.first_failure) > window {
            state.failures = 0;
            state.first_failure = now;
        }
        state.failures += 1;
        if state.failures >= self.blacklist_after {
            state.blacklisted_until = now + window;
            state.failures = 0;
            self.progress.retain(|(a, _, _), _| *a != address);
            events.push(Event::Log(format!(
                "{address}: blacklisted for {} (repeated knock failures)",
                spa_shared::duration::format(self.blacklist_for)
            )));
            events.push(Event::Blacklist {
                address,
                duration: self.blacklist_for,
            });
        }
    }

    fn totp_sequence(&mut self, index: usize, step: u64) -> Option<Vec<PortProto>> {
        let door = &self.totp[index];
        let proto = door.proto;
        let ports = match self.totp_cache.entry((index, step)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let code = totp::code_at_step(&door.secret, &door.params, step);
                e.insert(totp::derive_ports(door.first_port, &code, &door.rule).ok()?)
            }
        };
        Some(
            ports
                .iter()
                .map(|p| PortProto { port: *p, proto })
                .collect(),
        )
    }

    /// One observed knock. Returns what to do.
    pub fn knock(
        &mut self,
        address: IpAddr,
        port: PortProto,
        tcp_flags: u8,
        now: Micros,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        if self.ignored.contains(&port) {
            return events;
        }
        let second = now / 1_000_000;
        let state = self.sources.entry(address).or_default();
        if state.blacklisted_until > now {
            return events;
        }
        if state.rate_second != second {
            state.rate_second = second;
            state.rate_count = 0;
        }
        state.rate_count += 1;
        if state.rate_count > self.max_rate {
            if state.rate_count == self.max_rate + 1 {
                events.push(Event::Log(format!(
                    "{address}: more than {} knocks per second; ignoring",
                    self.max_rate
                )));
                self.fail(address, now, &mut events);
            }
            return events;
        }
        if self.decoys.contains(&port) {
            events.push(Event::Log(format!(
                "{address}: decoy port {port} hit; progress reset"
            )));
            self.progress.retain(|(a, _, _), _| *a != address);
            self.fail(address, now, &mut events);
            return events;
        }
        let mut verdict = Verdict::default();
        for index in 0..self.doors.len() {
            self.static_door(
                index,
                address,
                (port, tcp_flags, now),
                &mut events,
                &mut verdict,
            );
        }
        for index in 0..self.totp.len() {
            self.totp_door(
                index,
                address,
                (port, tcp_flags, now),
                &mut events,
                &mut verdict,
            );
        }
        // A knock that moved any sequence on is a legitimate knock, whatever other sequences it
        // broke (a TOTP step it did not match, a close sequence that shares a port with the open
        // one): only a knock that broke real progress and moved nothing is a guess.
        if verdict.replayed || (!verdict.progressed && !verdict.broken.is_empty()) {
            if !verdict.replayed {
                events.extend(verdict.broken.into_iter().map(Event::Log));
            }
            self.fail(address, now, &mut events);
        }
        if self.progress.len() > MAX_PROGRESS {
            self.purge(now, true);
        }
        events
    }

    /// Advances one sequence by one hit.
    fn advance(
        &mut self,
        key: (IpAddr, usize, Which),
        seq: &[PortProto],
        hit: Hit,
        timeout: Duration,
        label: &str,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let Hit { port, now } = hit;
        let mut p = self.progress.get(&key).copied().unwrap_or(Progress {
            matched: 0,
            started: now,
        });
        if p.matched > 0 && now.saturating_sub(p.started) > timeout.as_micros() as Micros {
            events.push(Event::Log(format!(
                "{}: {label}: timed out at stage {}/{}",
                key.0,
                p.matched,
                seq.len()
            )));
            p.matched = 0;
        }
        if p.matched < seq.len() && seq[p.matched] == port {
            if p.matched == 0 {
                p.started = now;
            }
            p.matched += 1;
            if p.matched == seq.len() {
                self.progress.remove(&key);
                return Outcome::Completed;
            }
            events.push(Event::Log(format!(
                "{}: {label}: stage {}/{}",
                key.0,
                p.matched,
                seq.len()
            )));
        } else if p.matched > 0 && seq[p.matched - 1] == port {
            // A retransmitted or duplicated knock of the port just accepted.
            return Outcome::Untouched;
        } else if seq[0] == port {
            // Starting over is what a user does after a typo; it reveals nothing to a guesser.
            let restarted = p.matched > 0;
            p = Progress {
                matched: 1,
                started: now,
            };
            events.push(Event::Log(format!(
                "{}: {label}: stage 1/{}{}",
                key.0,
                seq.len(),
                if restarted { " (started over)" } else { "" }
            )));
        } else if p.matched > 0 {
            self.progress.remove(&key);
            return Outcome::Broken(format!("{}: {label}: reset (wrong port {port})", key.0));
        } else {
            return Outcome::Untouched;
        }
        self.progress.insert(key, p);
        Outcome::Advanced
    }

    fn static_door(
        &mut self,
        index: usize,
        address: IpAddr,
        (port, flags, now): (PortProto, u8, Micros),
        events: &mut Vec<Event>,
        verdict: &mut Verdict,
    ) {
        if !self.hulls[index]
            .iter()
            .any(|w| w.proto == port.proto && (w.low..=w.high).contains(&port.port))
        {
            return;
        }
        let door = self.doors[index].clone();
        if port.proto == Proto::Tcp && !door.tcp_flags.matches(flags) {
            return;
        }
        let label = format!("door {}", door.name);
        // The open sequence: the configured one, or the current one-time sequence.
        let (which, seq, line) = match &self.one_time[index] {
            Some(list) => match list.unused.first() {
                Some((line, seq)) => (Which::OneTime, seq.clone(), Some(*line)),
                None => (Which::OneTime, Vec::new(), None),
            },
            None => (Which::Open, door.sequence.clone(), None),
        };
        if !seq.is_empty() {
            match self.advance(
                (address, index, which),
                &seq,
                Hit { port, now },
                door.seq_timeout,
                &label,
                events,
            ) {
                Outcome::Completed => {
                    verdict.progressed = true;
                    if let (Some(line), Some(list)) = (line, self.one_time[index].as_mut()) {
                        if let Err(e) = mark_used(&list.path, line) {
                            events.push(Event::Log(format!("error: door {}: cannot mark one-time sequence used in {}: {e}; not opening", door.name, list.path.display())));
                            return;
                        }
                        list.unused.remove(0);
                        let left = list.unused.len();
                        events.push(Event::Log(format!(
                            "door {}: one-time sequence used, {left} left",
                            door.name
                        )));
                    }
                    events.push(Event::Log(format!("{address}: {label}: OPEN")));
                    events.push(Event::Open {
                        door: door.name.clone(),
                        address,
                        services: door.services.clone(),
                    });
                    if !door.start_command.is_empty() {
                        events.push(command(&door.start_command, &door.name, address, "start"));
                    }
                    if !door.stop_command.is_empty() {
                        let longest = door
                            .services
                            .iter()
                            .filter_map(|s| self.service_timeouts.get(s))
                            .max()
                            .copied()
                            .unwrap_or_default();
                        self.timers
                            .retain(|(_, d, a)| !(*d == index && *a == address));
                        self.timers
                            .push((now + longest.as_micros() as Micros, index, address));
                    }
                }
                other => verdict.note(other),
            }
        }
        if !door.close_sequence.is_empty() {
            match self.advance(
                (address, index, Which::Close),
                &door.close_sequence,
                Hit { port, now },
                door.seq_timeout,
                &format!("door {} close", door.name),
                events,
            ) {
                Outcome::Completed => {
                    verdict.progressed = true;
                    events.push(Event::Log(format!("{address}: {label}: CLOSE")));
                    events.push(Event::Close {
                        door: door.name.clone(),
                        address,
                        services: door.services.clone(),
                    });
                    if !door.stop_command.is_empty() {
                        self.timers
                            .retain(|(_, d, a)| !(*d == index && *a == address));
                        events.push(command(&door.stop_command, &door.name, address, "stop"));
                    }
                }
                other => verdict.note(other),
            }
        }
    }

    fn totp_door(
        &mut self,
        index: usize,
        address: IpAddr,
        (port, flags, now): (PortProto, u8, Micros),
        events: &mut Vec<Event>,
        verdict: &mut Verdict,
    ) {
        if port.proto != self.totp[index].proto
            || !(port.port == self.totp[index].first_port
                || (self.totp[index].rule.low..=self.totp[index].rule.high).contains(&port.port))
        {
            return;
        }
        let door = self.totp[index].clone();
        if port.proto == Proto::Tcp && !super::config::TcpFlags::SYN.matches(flags) {
            return;
        }
        let current = door.params.step(now / 1_000_000);
        let label = format!("totp door {}", door.name);
        for step in current.saturating_sub(door.skew_steps)..=current + door.skew_steps {
            let Some(seq) = self.totp_sequence(index, step) else {
                continue;
            };
            match self.advance(
                (address, index, Which::Totp(step)),
                &seq,
                Hit { port, now },
                door.seq_timeout,
                &label,
                events,
            ) {
                Outcome::Completed => {
                    let key = (door.name.clone(), step);
                    if self.totp_used.contains(&key) {
                        events.push(Event::Log(format!("{address}: {label}: refused: the sequence of step {step} was already used (replay)")));
                        verdict.replayed = true;
                        continue;
                    }
                    verdict.progressed = true;
                    self.totp_used.insert(key);
                    let oldest = current.saturating_sub(door.skew_steps + 2);
                    self.totp_used.retain(|(_, s)| *s >= oldest);
                    let text: String = self
                        .totp_used
                        .iter()
                        .map(|(d, s)| format!("{d} {s}\n"))
                        .collect();
                    if let Err(e) = crate::state::write_atomic(&self.totp_path, text.as_bytes()) {
                        events.push(Event::Log(format!(
                            "error: cannot persist TOTP use to {}: {e}; not opening",
                            self.totp_path.display()
                        )));
                        continue;
                    }
                    // Other candidate steps' progress for this source is moot now.
                    self.progress.retain(|(a, d, w), _| {
                        !(*a == address && *d == index && matches!(w, Which::Totp(_)))
                    });
                    events.push(Event::Log(format!(
                        "{address}: {label}: OPEN (step {step})"
                    )));
                    events.push(Event::Open {
                        door: door.name.clone(),
                        address,
                        services: door.services.clone(),
                    });
                    return;
                }
                other => verdict.note(other),
            }
        }
    }

    fn purge(&mut self, now: Micros, force: bool) {
        let longest = self
            .doors
            .iter()
            .map(|d| d.seq_timeout)
            .chain(self.totp.iter().map(|d| d.seq_timeout))
            .max()
            .unwrap_or_default();
        let horizon = now.saturating_sub(longest.as_micros() as Micros);
        self.progress.retain(|_, p| p.started >= horizon);
        if force && self.progress.len() > MAX_PROGRESS {
            self.progress.clear();
        }
        let window = self.blacklist_for.as_micros() as Micros;
        self.sources.retain(|_, s| {
            s.blacklisted_until > now
                || (s.failures > 0 && now.saturating_sub(s.first_failure) <= window)
                || s.rate_second == now / 1_000_000
        });
        let current_steps: Vec<u64> = self
            .totp
            .iter()
            .map(|d| d.params.step(now / 1_000_000))
            .collect();
        self.totp_cache
            .retain(|(i, step), _| current_steps.get(*i).is_some_and(|c| step + 3 >= *c));
    }

    /// Timers: stop commands due, and periodic purging of stale state.
    pub fn tick(&mut self, now: Micros) -> Vec<Event> {
        let mut events = Vec::new();
        let due: Vec<(Micros, usize, IpAddr)> = self
            .timers
            .iter()
            .filter(|(t, _, _)| *t <= now)
            .copied()
            .collect();
        self.timers.retain(|(t, _, _)| *t > now);
        for (_, index, address) in due {
            let door = &self.doors[index];
            events.push(command(&door.stop_command, &door.name, address, "stop"));
        }
        if now.saturating_sub(self.last_purge) > 5_000_000 {
            self.last_purge = now;
            self.purge(now, false);
        }
        events
    }

    /// Number of live progress entries (bounded memory, for tests).
    pub fn progress_entries(&self) -> usize {
        self.progress.len()
    }
}

fn command(argv: &[String], door: &str, address: IpAddr, action: &str) -> Event {
    Event::Command {
        argv: argv
            .iter()
            .map(|a| a.replace("%IP%", &address.to_string()))
            .collect(),
        env: vec![
            ("SPAD_IP".into(), address.to_string()),
            ("SPAD_DOOR".into(), door.to_string()),
            ("SPAD_ACTION".into(), action.to_string()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const NOW: Micros = 1_763_726_400_000_000;
    const S: Micros = 1_000_000;

    fn config(dir: &Path, extra: &str) -> Config {
        let text = format!(
            "[server]\nprivate-key = \"k\"\nstate-dir = \"{}\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n\
             [doors.d]\nsequence = [\"7000/tcp\", \"8000/udp\", \"9000/tcp\"]\nseq-timeout = \"5s\"\nservices = [\"ssh\"]\n\
             [knocking]\ndecoy-ports = [\"1234/tcp\"]\nblacklist-after = 2\nblacklist-for = \"60s\"\nmax-knocks-per-second = 5\n{extra}",
            dir.display()
        );
        Config::parse(&dir.join("spad.toml"), &text).unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("spad-engine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn tcp(port: u16) -> PortProto {
        PortProto {
            port,
            proto: Proto::Tcp,
        }
    }
    fn udp(port: u16) -> PortProto {
        PortProto {
            port,
            proto: Proto::Udp,
        }
    }
    fn opened(events: &[Event]) -> bool {
        events.iter().any(|e| matches!(e, Event::Open { .. }))
    }

    #[test]
    fn sequence_duplicates_timeouts_and_sources() {
        let d = dir("seq");
        let mut e = Engine::new(&config(&d, ""), &d, NOW);
        let (a, b): (IpAddr, IpAddr) = (
            "198.51.100.1".parse().unwrap(),
            "198.51.100.2".parse().unwrap(),
        );
        assert!(!opened(&e.knock(a, tcp(7000), 0x02, NOW)));
        assert!(
            !opened(&e.knock(a, tcp(7000), 0x02, NOW + 1)),
            "duplicate ignored"
        );
        assert!(!opened(&e.knock(b, tcp(7000), 0x02, NOW + 2)));
        assert!(!opened(&e.knock(b, udp(8000), 0, NOW + 3)));
        assert!(opened(&e.knock(b, tcp(9000), 0x02, NOW + 4)), "b completes");
        assert!(!opened(&e.knock(a, udp(8000), 0, NOW + 5)));
        assert!(
            opened(&e.knock(a, tcp(9000), 0x02, NOW + 6)),
            "a unaffected by b"
        );
        // SYN-ACK or ACK segments are not knocks.
        e.knock(a, tcp(7000), 0x12, NOW + 7);
        assert_eq!(e.progress_entries(), 0);
        // Too slow: the sequence times out.
        e.knock(a, tcp(7000), 0x02, NOW + 10 * S);
        e.knock(a, udp(8000), 0, NOW + 11 * S);
        assert!(!opened(&e.knock(a, tcp(9000), 0x02, NOW + 16 * S)));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn in_between_ports_reset_and_failures_blacklist() {
        let d = dir("bl");
        let mut e = Engine::new(&config(&d, ""), &d, NOW);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        e.knock(a, tcp(7000), 0x02, NOW);
        let events = e.knock(a, tcp(7001), 0x02, NOW + 1);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Log(l) if l.contains("reset (wrong port 7001/tcp)"))),
            "{events:?}"
        );
        let events = e.knock(a, tcp(1234), 0x02, NOW + 2);
        assert!(
            events.iter().any(|e| matches!(e, Event::Blacklist { .. })),
            "{events:?}"
        );
        e.knock(a, tcp(7000), 0x02, NOW + 3);
        e.knock(a, udp(8000), 0, NOW + 4);
        assert!(
            !opened(&e.knock(a, tcp(9000), 0x02, NOW + 5)),
            "blacklisted sources are ignored"
        );
        assert!(
            opened(&{
                e.knock(a, tcp(7000), 0x02, NOW + 61 * S);
                e.knock(a, udp(8000), 0, NOW + 61 * S + 1);
                e.knock(a, tcp(9000), 0x02, NOW + 61 * S + 2)
            }),
            "the blacklist expires"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn rate_limit_and_bounded_memory() {
        let d = dir("rate");
        let mut e = Engine::new(&config(&d, ""), &d, NOW);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let mut logged = false;
        for i in 0..10u64 {
            let events = e.knock(a, tcp(7000), 0x02, NOW + i);
            logged |= events
                .iter()
                .any(|e| matches!(e, Event::Log(l) if l.contains("knocks per second")));
        }
        assert!(logged);
        // Many sources each leave progress; it is purged once their sequences time out.
        for i in 0..1000u32 {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            e.knock(source, tcp(7000), 0x02, NOW + 2 * S);
        }
        assert!(e.progress_entries() >= 1000);
        e.tick(NOW + 20 * S);
        assert_eq!(e.progress_entries(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn totp_opens_once_per_step_and_persists_use() {
        let d = dir("totp");
        let secret = "JBSWY3DPEHPK3PXPJBSWY3DP";
        let extra = format!("[totp-doors.carol]\nfirst-port = 40001\nsecret = \"{secret}\"\nservices = [\"ssh\"]\nrequire-enrollment = false\n");
        let config = config(&d, &extra);
        let door = config.doors.totp[0].clone();
        let mut e = Engine::new(&config, &d, NOW);
        let step = door.params.step(NOW / S);
        let code = totp::code_at_step(&door.secret, &door.params, step);
        let ports = totp::derive_ports(40001, &code, &door.rule).unwrap();
        let knock_all = |e: &mut Engine, who: &str, at: Micros| {
            let source: IpAddr = who.parse().unwrap();
            ports
                .iter()
                .enumerate()
                .map(|(i, p)| e.knock(source, tcp(*p), 0x02, at + i as u64))
                .any(|ev| opened(&ev))
        };
        assert!(knock_all(&mut e, "198.51.100.1", NOW));
        assert!(
            !knock_all(&mut e, "198.51.100.2", NOW + 10),
            "replay in the same step refused"
        );
        // A restarted engine remembers the used step.
        let mut again = Engine::new(&config, &d, NOW + 20);
        assert!(!knock_all(&mut again, "198.51.100.3", NOW + 20));
        // Two steps later the old sequence no longer opens (skew is one step).
        assert!(!knock_all(&mut again, "198.51.100.4", NOW + 60 * S));
        std::fs::remove_dir_all(d).unwrap();
    }

    fn logs(events: &[Event]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Log(l) => Some(format!("{l}\n")),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reknocking_a_door_whose_close_sequence_starts_with_its_last_port_is_no_failure() {
        let d = dir("reknock");
        let extra = "[doors.k]\nsequence = [\"10000/tcp\", \"10002/tcp\", \"10004/tcp\"]\n\
                     close-sequence = [\"10004/tcp\", \"10002/tcp\", \"10000/tcp\"]\n\
                     seq-timeout = \"5s\"\nservices = [\"ssh\"]\n";
        let mut e = Engine::new(&config(&d, extra), &d, NOW);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let mut all = Vec::new();
        for round in 0..5u64 {
            let at = NOW + round * S;
            e.knock(a, tcp(10000), 0x02, at);
            e.knock(a, tcp(10002), 0x02, at + 1);
            let events = e.knock(a, tcp(10004), 0x02, at + 2);
            assert!(opened(&events), "open {round}: {events:?}");
            all.extend(events);
        }
        assert!(!all.iter().any(|e| matches!(e, Event::Blacklist { .. })));
        assert!(!logs(&all).contains("reset"), "{}", logs(&all));
        // The close sequence still closes, and a guess after real progress still counts.
        e.knock(a, tcp(10004), 0x02, NOW + 6 * S);
        e.knock(a, tcp(10002), 0x02, NOW + 6 * S + 1);
        let events = e.knock(a, tcp(10000), 0x02, NOW + 6 * S + 2);
        assert!(events.iter().any(|e| matches!(e, Event::Close { .. })));
        e.knock(a, tcp(10000), 0x02, NOW + 8 * S);
        let events = e.knock(a, tcp(10003), 0x02, NOW + 8 * S + 1);
        assert!(
            logs(&events).contains("reset (wrong port 10003/tcp)"),
            "{events:?}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn valid_totp_knocks_on_every_skew_step_are_no_failures() {
        let d = dir("totp-skew");
        let secret = "JBSWY3DPEHPK3PXPJBSWY3DP";
        let extra = format!("[totp-doors.carol]\nfirst-port = 40001\nsecret = \"{secret}\"\nservices = [\"ssh\"]\nrequire-enrollment = false\n");
        let config = config(&d, &extra);
        let door = config.doors.totp[0].clone();
        let mut e = Engine::new(&config, &d, NOW);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let step = door.params.step(NOW / S);
        let mut all = Vec::new();
        // Codes of the previous, current and next step: each a valid knock, none a replay
        // (blacklist-after is 2 here).
        for (i, knocked) in [step - 1, step, step + 1].into_iter().enumerate() {
            let code = totp::code_at_step(&door.secret, &door.params, knocked);
            let ports = totp::derive_ports(40001, &code, &door.rule).unwrap();
            let at = NOW + i as u64 * S;
            let mut open = false;
            for (j, p) in ports.iter().enumerate() {
                let events = e.knock(a, tcp(*p), 0x02, at + j as u64);
                open |= opened(&events);
                all.extend(events);
            }
            assert!(open, "knock with step {knocked}: {}", logs(&all));
        }
        assert!(!all.iter().any(|e| matches!(e, Event::Blacklist { .. })));
        assert!(!logs(&all).contains("reset"), "{}", logs(&all));
        // A replay of a used step is still a failure, and a wrong port after the first is too.
        let code = totp::code_at_step(&door.secret, &door.params, step);
        let ports = totp::derive_ports(40001, &code, &door.rule).unwrap();
        let mut events = Vec::new();
        for (j, p) in ports.iter().enumerate() {
            events.extend(e.knock(a, tcp(*p), 0x02, NOW + 3 * S + j as u64));
        }
        assert!(logs(&events).contains("(replay)"), "{events:?}");
        e.knock(a, tcp(40001), 0x02, NOW + 4 * S);
        let wrong = (20000..30000).find(|p| !ports.contains(p)).unwrap();
        let events = e.knock(a, tcp(wrong), 0x02, NOW + 4 * S + 1);
        assert!(
            events.iter().any(|e| matches!(e, Event::Blacklist { .. })),
            "{events:?}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
