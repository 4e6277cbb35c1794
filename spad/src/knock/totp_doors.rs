//! TOTP doors: the sequence each door expects in each time step, and the one-use-per-step rule.
//!
//! A door's sequence for step `s` is its first port followed by ports derived from the code of
//! step `s` (see `spa_shared::totp`). The engine tries the current step and `skew-steps` either
//! side. A step whose sequence opened once never opens again: the used steps are remembered here
//! and persisted by the daemon (the `totp-used` file) before the door opens.

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;

use spa_shared::totp;
use spa_shared::Micros;

use super::config::TotpDoor;
use crate::net::PortProto;

/// The TOTP doors in force and what they remember.
#[derive(Debug, Default)]
pub struct TotpDoors {
    doors: Vec<TotpDoor>,
    /// (door index, step) → the sequence; only steps near the current one are kept.
    cache: HashMap<(usize, u64), Option<Vec<PortProto>>>,
    /// (door name, step) sequences already used.
    used: BTreeSet<(String, u64)>,
}

impl TotpDoors {
    pub fn new(doors: Vec<TotpDoor>, used: BTreeSet<(String, u64)>) -> Self {
        Self {
            doors,
            cache: HashMap::new(),
            used,
        }
    }

    /// Replaces the doors (on reload); what was used stays used.
    pub fn set_doors(&mut self, doors: Vec<TotpDoor>) {
        self.doors = doors;
        self.cache.clear();
    }

    pub fn doors(&self) -> &[TotpDoor] {
        &self.doors
    }

    /// The steps a knock at `now` may match: the current one ± the door's skew.
    pub fn window(&self, index: usize, now: Micros) -> RangeInclusive<u64> {
        let door = &self.doors[index];
        let current = door.params.step(now / 1_000_000);
        current.saturating_sub(door.skew_steps)..=current.saturating_add(door.skew_steps)
    }

    /// Whether `port` can belong to door `index` at all (its first port or derived range).
    pub fn concerns(&self, index: usize, port: PortProto) -> bool {
        let door = &self.doors[index];
        port.proto == door.proto
            && (port.port == door.first_port
                || (door.rule.low..=door.rule.high).contains(&port.port))
    }

    /// The sequence of door `index` in `step` (computed once per step).
    pub fn sequence(&mut self, index: usize, step: u64) -> Option<&[PortProto]> {
        let door = &self.doors[index];
        self.cache
            .entry((index, step))
            .or_insert_with(|| {
                let code = totp::code_at_step(&door.secret, &door.params, step);
                let ports = totp::derive_ports(door.first_port, &code, &door.rule).ok()?;
                Some(
                    ports
                        .into_iter()
                        .map(|port| PortProto {
                            port,
                            proto: door.proto,
                        })
                        .collect(),
                )
            })
            .as_deref()
    }

    /// Whether `step`'s sequence of door `index` already opened once.
    pub fn is_used(&self, index: usize, step: u64) -> bool {
        self.used.contains(&(self.doors[index].name.clone(), step))
    }

    /// Records `step` of door `index` as used; forgets steps too old to match again.
    pub fn mark_used(&mut self, index: usize, step: u64, now: Micros) {
        let door = &self.doors[index];
        self.used.insert((door.name.clone(), step));
        let oldest = self.window(index, now).start().saturating_sub(2);
        let name = self.doors[index].name.clone();
        self.used.retain(|(d, s)| *d != name || *s >= oldest);
    }

    /// Forgets cached sequences of steps that can no longer match.
    pub fn purge(&mut self, now: Micros) {
        let windows: Vec<RangeInclusive<u64>> =
            (0..self.doors.len()).map(|i| self.window(i, now)).collect();
        self.cache.retain(|(i, step), _| {
            windows
                .get(*i)
                .is_some_and(|w| *step + 1 >= *w.start() && *step <= w.end() + 1)
        });
    }
}
