//! The knock engine: one knock in, the events it causes out.
//!
//! It ties the rooms together: [`sequence`](super::sequence) matching,
//! [`sources`](super::sources) (bounded per-source state: rate limit, failures, blacklist,
//! progress), [`one_time`](super::one_time) lists and [`totp_doors`](super::totp_doors). It does
//! no I/O and reads no clock: it is given the doors it needs ([`Setup`]), what was used before
//! ([`Memory`]) and the time of each knock, and it returns [`Event`]s. A use that must survive a
//! restart ([`Event::TotpUsed`], [`Event::OneTimeUsed`]) comes right before the [`Event::Open`]
//! it allows; the driver makes it durable first (see [`super::driver`]).
//!
//! Differences from knockd, each deliberate and tested:
//! * progress is per source and door: one source completing never touches another's;
//! * a repeat of the port just accepted (a retransmitted SYN) is ignored, not a reset;
//! * the engine sees every port between a door's lowest and highest knock port, so a hit on an
//!   in-between port resets that source's progress: an ascending port scan never opens a door;
//! * only evidence of guessing is a failure (a wrong port that breaks real progress and moves no
//!   other sequence on, a decoy, a replayed TOTP sequence, a rate-limit trip); too many and the
//!   source is blacklisted. Valid knocks never count, whatever sequences they leave behind;
//! * an exhausted one-time list just disables that door;
//! * a TOTP sequence opens at most once per (door, time step);
//! * the state is bounded: at most `max-sources` sources, oldest untrusted evicted first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use spa_shared::Micros;

use super::config::{StaticDoor, TcpFlags, TotpDoor};
use super::log_budget::LogBudget;
use super::one_time::{OneTimeLines, OneTimeList};
use super::results::{KnockResult, KnockResults};
use super::sequence::{advance, Outcome, Progress, SeqKey, Step};
use super::sources::{RateVerdict, Sources};
use super::static_doors::{command, hull, Door};
use super::totp_doors::TotpDoors;
use crate::net::{PortProto, Proto};

// Kept at their old paths for callers outside the knock module.
pub use super::driver::{read_one_time, syn_only, watched_ranges};
pub use super::log_budget::KNOCK_LOG_LINES_PER_SECOND;
pub use super::one_time::parse_one_time;

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
        /// The door's `command-capabilities`: keep spad's capabilities (default: none).
        keep_capabilities: bool,
    },
    /// TOTP door `door` opened with the sequence of `step`: persist before opening.
    TotpUsed {
        door: String,
        step: u64,
    },
    /// Door `door` used its one-time sequence `sequence` (canonical text): persist before opening.
    OneTimeUsed {
        door: String,
        sequence: String,
    },
}

/// Everything the engine needs to know of the configuration.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    pub doors: Vec<StaticDoor>,
    /// The one-time list of each static door that has one (same order as `doors`).
    pub one_time: Vec<Option<OneTimeLines>>,
    /// TOTP doors in force (enabled and enrolled).
    pub totp: Vec<TotpDoor>,
    pub decoys: BTreeSet<PortProto>,
    /// Ports that are never knocks: protected services and the SPA port.
    pub ignored: BTreeSet<PortProto>,
    /// Each service's grant timeout, for stop-command timers.
    pub service_timeouts: HashMap<String, Duration>,
    pub blacklist_after: u32,
    pub blacklist_for: Duration,
    pub max_knocks_per_second: u32,
    pub max_sources: usize,
}

/// What was used before this engine started (from the state directory).
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// (TOTP door, step) whose sequence already opened.
    pub totp_used: BTreeSet<(String, u64)>,
    /// Door → canonical text of its used one-time sequences.
    pub one_time_used: BTreeMap<String, BTreeSet<String>>,
}

/// What one hit did across all sequences of its source.
#[derive(Debug, Default)]
pub(super) struct Verdict {
    /// Some sequence moved on or completed: the knock is a real user's.
    pub(super) progressed: bool,
    /// Sequences this hit broke, as log lines; a failure only if nothing progressed.
    broken: Vec<String>,
    /// A completed TOTP sequence whose step was already used: always a failure.
    replayed: bool,
}

/// Saturating micros of a duration.
pub(super) fn micros(d: Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}

/// The knock state machine.
#[derive(Debug)]
pub struct Engine {
    pub(super) doors: Vec<Door>,
    pub(super) totp: TotpDoors,
    pub(super) decoys: BTreeSet<PortProto>,
    pub(super) ignored: BTreeSet<PortProto>,
    pub(super) blacklist_after: u32,
    pub(super) blacklist_for: Duration,
    pub(super) max_rate: u32,
    pub(super) service_timeouts: HashMap<String, Duration>,
    pub(super) one_time_used: BTreeMap<String, BTreeSet<String>>,
    pub(super) sources: Sources,
    /// The knocking source's progress while a knock is judged (reused, never shrunk).
    progress: Vec<(SeqKey, Progress)>,
    pub(super) timers: Vec<(Micros, usize, IpAddr)>,
    pub(super) last_purge: Micros,
    pub(super) budget: LogBudget,
    /// Every knock given to [`Engine::knock`], by what it came to.
    results: KnockResults,
}

impl Engine {
    pub fn new(setup: Setup, memory: Memory, now: Micros) -> Self {
        let mut engine = Self {
            doors: Vec::new(),
            totp: TotpDoors::new(Vec::new(), memory.totp_used),
            decoys: BTreeSet::new(),
            ignored: BTreeSet::new(),
            blacklist_after: 3,
            blacklist_for: Duration::from_secs(600),
            max_rate: 20,
            service_timeouts: HashMap::new(),
            one_time_used: memory.one_time_used,
            sources: Sources::new(setup.max_sources),
            progress: Vec::new(),
            timers: Vec::new(),
            last_purge: now,
            budget: LogBudget::default(),
            results: KnockResults::default(),
        };
        engine.reconfigure(setup, now);
        engine
    }

    /// Applies a new configuration. Failures and blacklist entries are kept; progress is
    /// forgotten (door numbers may have changed).
    pub fn reconfigure(&mut self, setup: Setup, now: Micros) {
        let mut one_time = setup.one_time.into_iter();
        self.doors = setup
            .doors
            .into_iter()
            .map(|door| {
                let list = one_time.next().flatten().map(|lines| {
                    OneTimeList::new(
                        lines,
                        self.one_time_used
                            .get(&door.name)
                            .cloned()
                            .unwrap_or_default(),
                    )
                });
                let mut ports: Vec<PortProto> = door
                    .sequence
                    .iter()
                    .chain(&door.close_sequence)
                    .copied()
                    .collect();
                if let Some(list) = &list {
                    ports.extend(list.ports());
                }
                Door {
                    hull: hull(&ports),
                    one_time: list,
                    door,
                }
            })
            .collect();
        self.totp.set_doors(setup.totp);
        self.decoys = setup.decoys;
        self.ignored = setup.ignored;
        self.blacklist_after = setup.blacklist_after.max(1);
        self.blacklist_for = setup.blacklist_for;
        self.max_rate = setup.max_knocks_per_second.max(1);
        self.service_timeouts = setup.service_timeouts;
        self.sources.set_cap(setup.max_sources);
        self.sources.forget_progress();
        let doors = self.doors.len();
        self.timers.retain(|(_, door, _)| *door < doors);
        let _ = now;
    }

    /// Re-applies a blacklist entry found in the kernel after a restart.
    pub fn restore_blacklist(&mut self, address: IpAddr, until: Micros) {
        self.sources.blacklist(address, until);
    }

    fn fail(&mut self, address: IpAddr, now: Micros, events: &mut Vec<Event>) {
        let window = micros(self.blacklist_for);
        let source = self.sources.entry(address);
        if source.failures.add(now, window, self.blacklist_after) {
            self.sources.blacklist(address, now.saturating_add(window));
            let duration = self.blacklist_for;
            self.budget.say(events, || {
                format!(
                    "{address}: blacklisted for {} (repeated knock failures)",
                    spa_shared::duration::format(duration)
                )
            });
            events.push(Event::Blacklist {
                address,
                duration: self.blacklist_for,
            });
        }
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
        let result = self.judge(address, (port, tcp_flags, now), &mut events);
        self.results.count(result);
        events
    }

    /// Every knock so far, by result.
    pub fn results(&self) -> &KnockResults {
        &self.results
    }

    /// The work of [`Engine::knock`]: pushes the events, returns what the knock came to.
    fn judge(
        &mut self,
        address: IpAddr,
        (port, tcp_flags, now): (PortProto, u8, Micros),
        events: &mut Vec<Event>,
    ) -> KnockResult {
        if self.ignored.contains(&port) {
            return KnockResult::Ignored;
        }
        if self.sources.is_blacklisted(address, now) {
            return KnockResult::Blacklisted;
        }
        self.budget.clock(now, events);
        let source = self.sources.entry(address);
        match source.rate.count(now, self.max_rate) {
            RateVerdict::Within => {}
            RateVerdict::Tripped => {
                let max = self.max_rate;
                self.budget.say(events, || {
                    format!("{address}: more than {max} knocks per second; ignoring")
                });
                self.fail(address, now, events);
                return KnockResult::RateLimited;
            }
            RateVerdict::Over => return KnockResult::RateLimited,
        }
        if self.decoys.contains(&port) {
            source.clear_progress();
            self.budget.say(events, || {
                format!("{address}: decoy port {port} hit; progress reset")
            });
            self.fail(address, now, events);
            return KnockResult::Decoy;
        }
        // Worked on in a buffer the engine keeps, so a knock allocates nothing.
        let mut progress = std::mem::take(&mut self.progress);
        source.progress_into(&mut progress);
        let mut verdict = Verdict::default();
        let hit = (port, tcp_flags, now);
        for index in 0..self.doors.len() {
            self.static_door(index, address, hit, &mut progress, events, &mut verdict);
        }
        for index in 0..self.totp.doors().len() {
            self.totp_door(index, address, hit, &mut progress, events, &mut verdict);
        }
        let trusted = progress.iter().any(|(_, p)| p.matched >= 2);
        if let Some(source) = self.sources.get_mut(address) {
            source.set_progress(&progress);
        }
        self.progress = progress;
        if trusted {
            self.sources.trust(address);
        }
        // A knock that moved any sequence on is a legitimate knock, whatever other sequences it
        // broke (a TOTP step it did not match, a close sequence that shares a port with the open
        // one): only a knock that broke real progress and moved nothing is a guess.
        let failed = verdict.replayed || (!verdict.progressed && !verdict.broken.is_empty());
        let result = if events.iter().any(|e| matches!(e, Event::Open { .. })) {
            KnockResult::Open
        } else if events.iter().any(|e| matches!(e, Event::Close { .. })) {
            KnockResult::Close
        } else if verdict.replayed {
            KnockResult::Replay
        } else if failed {
            KnockResult::Reset
        } else if verdict.progressed {
            KnockResult::Progress
        } else {
            KnockResult::Unmatched
        };
        if failed {
            if !verdict.replayed {
                for line in verdict.broken {
                    self.budget.say(events, || line);
                }
            }
            self.fail(address, now, events);
        }
        result
    }

    /// Logs a step's timeout and stage; notes it in the verdict.
    pub(super) fn note(
        step: Step,
        address: IpAddr,
        label: &str,
        port: PortProto,
        (events, budget): (&mut Vec<Event>, &mut LogBudget),
        verdict: &mut Verdict,
    ) {
        if let Some(stage) = step.timed_out_at {
            budget.say(events, || {
                format!("{address}: {label}: timed out at stage {stage}")
            });
        }
        match step.outcome {
            Outcome::Untouched => {}
            Outcome::Completed => verdict.progressed = true,
            Outcome::Advanced { stage, of, over } => {
                verdict.progressed = true;
                budget.say(events, || {
                    format!(
                        "{address}: {label}: stage {stage}/{of}{}",
                        if over { " (started over)" } else { "" }
                    )
                });
            }
            Outcome::Broken { .. } => {
                let line = format!("{address}: {label}: reset (wrong port {port})");
                if !verdict.broken.contains(&line) {
                    verdict.broken.push(line);
                }
            }
        }
    }

    fn totp_door(
        &mut self,
        index: usize,
        address: IpAddr,
        (port, flags, now): (PortProto, u8, Micros),
        progress: &mut Vec<(SeqKey, Progress)>,
        events: &mut Vec<Event>,
        verdict: &mut Verdict,
    ) {
        if !self.totp.concerns(index, port)
            || (port.proto == Proto::Tcp && !TcpFlags::SYN.matches(flags))
        {
            return;
        }
        let label = format!("totp door {}", self.totp.doors()[index].name);
        // Candidate steps advance together on the first port: log the furthest stage once.
        let mut furthest = None;
        // Steps other than the furthest only matter for the verdict, not the log.
        let mut quiet = Vec::new();
        for step in self.totp.window(index, now) {
            let Some(result) = self.totp_step(index, step, (port, now), progress) else {
                continue;
            };
            match result.outcome {
                Outcome::Completed if self.totp.is_used(index, step) => {
                    events.push(Event::Log(format!("{address}: {label}: refused: the sequence of step {step} was already used (replay)")));
                    verdict.replayed = true;
                }
                Outcome::Completed => {
                    verdict.progressed = true;
                    self.open_totp(index, (step, now), address, progress, events);
                    return;
                }
                Outcome::Advanced { stage, .. } => {
                    if furthest.is_none_or(|(s, _)| s < stage) {
                        furthest = Some((stage, result));
                    }
                }
                _ => Self::note(
                    result,
                    address,
                    &label,
                    port,
                    (&mut quiet, &mut LogBudget::muted()),
                    verdict,
                ),
            }
        }
        if let Some((_, step)) = furthest {
            Self::note(
                step,
                address,
                &label,
                port,
                (events, &mut self.budget),
                verdict,
            );
        }
    }

    /// Moves the source's progress on door `index`'s sequence of time `step`; `None` if that
    /// step has no sequence.
    fn totp_step(
        &mut self,
        index: usize,
        step: u64,
        (port, now): (PortProto, Micros),
        progress: &mut Vec<(SeqKey, Progress)>,
    ) -> Option<Step> {
        let timeout = self.totp.doors()[index].seq_timeout;
        let seq = self.totp.sequence(index, step)?;
        let key = SeqKey::Totp(index as u16, step);
        Some(advance(progress, key, seq, port, now, timeout))
    }

    /// TOTP door `index` opens for `address` with the sequence of `step`: the use is recorded
    /// (and announced for persisting) before the open.
    fn open_totp(
        &mut self,
        index: usize,
        (step, now): (u64, Micros),
        address: IpAddr,
        progress: &mut Vec<(SeqKey, Progress)>,
        events: &mut Vec<Event>,
    ) {
        self.totp.mark_used(index, step, now);
        let number = index as u16;
        // Other candidate steps' progress for this source is moot now.
        progress.retain(|(k, _)| !matches!(k, SeqKey::Totp(d, _) if *d == number));
        let door = &self.totp.doors()[index];
        events.push(Event::TotpUsed {
            door: door.name.clone(),
            step,
        });
        events.push(Event::Log(format!(
            "{address}: totp door {}: OPEN (step {step})",
            door.name
        )));
        events.push(Event::Open {
            door: door.name.clone(),
            address,
            services: door.services.clone(),
        });
    }

    /// Timers: stop commands due, and periodic purging of stale state.
    pub fn tick(&mut self, now: Micros) -> Vec<Event> {
        let mut events = Vec::new();
        let mut due = Vec::new();
        self.timers.retain(|timer| {
            let keep = timer.0 > now;
            if !keep {
                due.push(*timer);
            }
            keep
        });
        for (_, index, address) in due {
            let door = &self.doors[index].door;
            events.push(command(
                &door.stop_command,
                &door.name,
                address,
                "stop",
                door.command_capabilities,
            ));
        }
        if now.saturating_sub(self.last_purge) > 5_000_000 {
            self.last_purge = now;
            self.purge(now);
        }
        events
    }

    fn purge(&mut self, now: Micros) {
        let longest = self
            .doors
            .iter()
            .map(|d| d.door.seq_timeout)
            .chain(self.totp.doors().iter().map(|d| d.seq_timeout))
            .max()
            .unwrap_or_default();
        let horizon = now.saturating_sub(micros(longest));
        self.sources.purge(now, horizon, micros(self.blacklist_for));
        self.totp.purge(now);
    }

    /// Number of live progress records (bounded memory, for tests).
    pub fn progress_entries(&self) -> usize {
        self.sources.progress_entries()
    }

    /// Sources tracked now (never more than `max-sources`).
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }

    /// Sources evicted to respect `max-sources` since start.
    pub fn evicted_sources(&self) -> u64 {
        self.sources.evicted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::knock::Knocks;
    use spa_shared::totp;
    use std::path::{Path, PathBuf};

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
        let mut e = Knocks::new(&config(&d, ""), &d, NOW);
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
        assert_eq!(e.engine().progress_entries(), 0);
        // Too slow: the sequence times out.
        e.knock(a, tcp(7000), 0x02, NOW + 10 * S);
        e.knock(a, udp(8000), 0, NOW + 11 * S);
        assert!(!opened(&e.knock(a, tcp(9000), 0x02, NOW + 16 * S)));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn every_knock_is_counted_by_what_it_came_to() {
        use crate::knock::results::KnockResult as R;
        let d = dir("results");
        let mut e = Knocks::new(&config(&d, ""), &d, NOW);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let steps = [
            (tcp(7000), 0x02, R::Progress),
            (tcp(7000), 0x02, R::Unmatched), // a retransmitted SYN
            (tcp(7000), 0x12, R::Unmatched), // a SYN-ACK is no knock
            (udp(8000), 0, R::Progress),
            (tcp(9000), 0x02, R::Open),
            (tcp(7000), 0x02, R::Progress),
            (tcp(7001), 0x02, R::Reset),
            (tcp(1234), 0x02, R::Decoy), // second failure: blacklisted
            (tcp(7000), 0x02, R::Blacklisted),
        ];
        for (i, (port, flags, want)) in steps.into_iter().enumerate() {
            let before = e.engine().results().get(want);
            e.knock(a, port, flags, NOW + i as Micros * S);
            assert_eq!(
                e.engine().results().get(want),
                before + 1,
                "step {i}: {want:?}"
            );
        }
        let total: u64 = e.engine().results().iter().map(|(_, n)| n).sum();
        assert_eq!(total, steps.len() as u64, "one result per knock");
        // Over the rate limit (5 per second), from a fresh source.
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        for i in 0..7 {
            e.knock(b, udp(8000), 0, NOW + 100 * S + i);
        }
        assert_eq!(e.engine().results().get(R::RateLimited), 2);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn in_between_ports_reset_and_failures_blacklist() {
        let d = dir("bl");
        let mut e = Knocks::new(&config(&d, ""), &d, NOW);
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
        let mut e = Knocks::new(&config(&d, ""), &d, NOW);
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
        assert!(e.engine().progress_entries() >= 1000);
        e.tick(NOW + 20 * S);
        assert_eq!(e.engine().progress_entries(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn totp_opens_once_per_step_and_persists_use() {
        let d = dir("totp");
        let secret = "JBSWY3DPEHPK3PXPJBSWY3DP";
        let extra = format!("[totp-doors.carol]\nfirst-port = 40001\nsecret = \"{secret}\"\nservices = [\"ssh\"]\nrequire-enrollment = false\n");
        let config = config(&d, &extra);
        let door = config.doors.totp[0].clone();
        let mut e = Knocks::new(&config, &d, NOW);
        let step = door.params.step(NOW / S);
        let code = totp::code_at_step(&door.secret, &door.params, step);
        let ports = totp::derive_ports(40001, &code, &door.rule).unwrap();
        let knock_all = |e: &mut Knocks, who: &str, at: Micros| {
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
        use crate::knock::results::KnockResult as R;
        assert_eq!(
            e.engine().results().get(R::Replay),
            1,
            "{:?}",
            e.engine().results()
        );
        assert_eq!(e.engine().results().get(R::Open), 1);
        // A restarted engine remembers the used step.
        let mut again = Knocks::new(&config, &d, NOW + 20);
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
        let mut e = Knocks::new(&config(&d, extra), &d, NOW);
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
        use crate::knock::results::KnockResult as R;
        assert_eq!(e.engine().results().get(R::Close), 1);
        assert_eq!(e.engine().results().get(R::Open), 5);
        assert_eq!(e.engine().results().get(R::Reset), 0);
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
        let mut e = Knocks::new(&config, &d, NOW);
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

    #[test]
    fn a_spoofed_flood_stays_within_the_cap_and_a_legit_source_still_opens() {
        let d = dir("flood");
        let mut e = Knocks::new(&config(&d, "max-sources = 1000\n"), &d, NOW);
        let legit: IpAddr = "2001:db8::7".parse().unwrap();
        let mut now = NOW;
        let mut spoofed = 0u32;
        let mut logged = 0usize;
        // 10 µs per spoofed SYN (100k packets/s), each from a new address, at knock ports.
        let mut flood = |e: &mut Knocks, now: &mut Micros, count: u32| {
            for _ in 0..count {
                spoofed += 1;
                let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + spoofed));
                let port = [7000, 7500, 8999, 9000][spoofed as usize % 4];
                *now += 10;
                logged += e
                    .knock(source, tcp(port), 0x02, *now)
                    .iter()
                    .filter(|e| matches!(e, Event::Log(_)))
                    .count();
                assert!(e.engine().tracked_sources() <= 1000);
            }
        };
        for round in 0..20 {
            flood(&mut e, &mut now, 5_000);
            e.knock(legit, tcp(7000), 0x02, now);
            flood(&mut e, &mut now, 100);
            e.knock(legit, udp(8000), 0, now);
            // Past stage 1 the legit source is trusted: a long flood does not evict it.
            flood(&mut e, &mut now, 5_000);
            let events = e.knock(legit, tcp(9000), 0x02, now);
            assert!(opened(&events), "round {round}: {events:?}");
            now += S;
            e.tick(now);
        }
        assert!(e.engine().evicted_sources() > 100_000);
        // 202,000 knocks over ~22 s: the log got a bounded ration, not a line per knock.
        assert!(
            logged <= 23 * (KNOCK_LOG_LINES_PER_SECOND as usize + 1),
            "{logged}"
        );
        // After the flood, purging gives the state back.
        e.tick(now + 60 * S);
        e.tick(now + 120 * S);
        assert_eq!(e.engine().tracked_sources(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn one_time_use_is_kept_in_the_state_directory_not_the_config() {
        let d = dir("onetime");
        let list = d.join("onetime.txt");
        std::fs::write(&list, "7100,7200,7300\n7400,7500\n").unwrap();
        let extra = format!(
            "[doors.e]\none-time-sequences = \"{}\"\nservices = [\"ssh\"]\n",
            list.display()
        );
        let config = config(&d, &extra);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let knock_all = |e: &mut Knocks, ports: &[u16], at: Micros| {
            ports
                .iter()
                .map(|p| e.knock(a, tcp(*p), 0x02, at + u64::from(*p)))
                .any(|ev| opened(&ev))
        };
        let mut e = Knocks::new(&config, &d, NOW);
        assert!(knock_all(&mut e, &[7100, 7200, 7300], NOW));
        assert!(!knock_all(&mut e, &[7100, 7200, 7300], NOW + S), "used");
        assert_eq!(
            std::fs::read_to_string(&list).unwrap(),
            "7100,7200,7300\n7400,7500\n",
            "the configured list is never written"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("one-time-used")).unwrap(),
            "e 7100/tcp,7200/tcp,7300/tcp\n"
        );
        // A restarted daemon remembers; the next line opens.
        let mut again = Knocks::new(&config, &d, NOW + 2 * S);
        assert!(!knock_all(&mut again, &[7100, 7200, 7300], NOW + 2 * S));
        assert!(knock_all(&mut again, &[7400, 7500], NOW + 3 * S));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_use_that_cannot_be_persisted_does_not_open() {
        let d = dir("nopersist");
        let list = d.join("onetime.txt");
        std::fs::write(&list, "7100,7200\n").unwrap();
        let extra = format!(
            "[doors.e]\none-time-sequences = \"{}\"\nservices = [\"ssh\"]\n",
            list.display()
        );
        let config = config(&d, &extra);
        // The state file's place is taken by a directory: the write fails.
        std::fs::create_dir_all(d.join("one-time-used")).unwrap();
        let mut e = Knocks::new(&config, &d, NOW);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        e.knock(a, tcp(7100), 0x02, NOW);
        let events = e.knock(a, tcp(7200), 0x02, NOW + 1);
        assert!(!opened(&events), "{events:?}");
        assert!(logs(&events).contains("cannot persist one-time sequence use"));
        std::fs::remove_dir_all(d).unwrap();
    }
}
