//! Static (knockd-style) doors for the engine: the open sequence (or the current one-time
//! sequence), the close sequence, start/stop commands and their timers.

use std::net::IpAddr;

use spa_shared::Micros;

use super::config::StaticDoor;
use super::engine::{micros, Engine, Event, Verdict};
use super::one_time::OneTimeList;
use super::sequence::{advance, Outcome, Progress, SeqKey, Step};
use crate::capture::bpf::Watch;
use crate::net::{PortProto, Proto};

/// A static door with its one-time list and watched hull.
#[derive(Debug)]
pub(super) struct Door {
    pub(super) door: StaticDoor,
    pub(super) one_time: Option<OneTimeList>,
    pub(super) hull: Vec<Watch>,
}

/// The hull of each protocol's ports: every port in between is watched.
pub(crate) fn hull(ports: &[PortProto]) -> Vec<Watch> {
    let mut out = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        let of = ports.iter().filter(|p| p.proto == proto).map(|p| p.port);
        if let (Some(lo), Some(hi)) = (of.clone().min(), of.max()) {
            out.push(Watch {
                proto,
                low: lo,
                high: hi,
            });
        }
    }
    out
}

impl Door {
    /// Whether `port` lies in the hull of this door's ports (every port in between counts).
    fn watches(&self, port: PortProto) -> bool {
        self.hull
            .iter()
            .any(|w| w.proto == port.proto && (w.low..=w.high).contains(&port.port))
    }

    /// Moves the source's open sequence on: the configured one, or the current one-time
    /// sequence (`None` once the one-time list is used up). `number` is the door's index.
    fn open_step(
        &self,
        number: u16,
        (port, now): (PortProto, Micros),
        progress: &mut Vec<(SeqKey, Progress)>,
    ) -> Option<Step> {
        let door = &self.door;
        match &self.one_time {
            Some(list) => list.current().map(|seq| {
                advance(
                    progress,
                    SeqKey::OneTime(number),
                    seq,
                    port,
                    now,
                    door.seq_timeout,
                )
            }),
            None => Some(advance(
                progress,
                SeqKey::Open(number),
                &door.sequence,
                port,
                now,
                door.seq_timeout,
            )),
        }
    }

    /// Moves the source's close sequence on, if the door has one.
    fn close_step(
        &self,
        number: u16,
        (port, now): (PortProto, Micros),
        progress: &mut Vec<(SeqKey, Progress)>,
    ) -> Option<Step> {
        let door = &self.door;
        (!door.close_sequence.is_empty()).then(|| {
            advance(
                progress,
                SeqKey::Close(number),
                &door.close_sequence,
                port,
                now,
                door.seq_timeout,
            )
        })
    }
}

impl Engine {
    pub(super) fn static_door(
        &mut self,
        index: usize,
        address: IpAddr,
        (port, flags, now): (PortProto, u8, Micros),
        progress: &mut Vec<(SeqKey, Progress)>,
        events: &mut Vec<Event>,
        verdict: &mut Verdict,
    ) {
        let state = &self.doors[index];
        if !state.watches(port) {
            return;
        }
        if port.proto == Proto::Tcp && !state.door.tcp_flags.matches(flags) {
            return;
        }
        let number = index as u16;
        let open = state.open_step(number, (port, now), progress);
        let close = state.close_step(number, (port, now), progress);
        let label = format!("door {}", state.door.name);
        if let Some(step) = open {
            Self::note(
                step,
                address,
                &label,
                port,
                (events, &mut self.budget),
                verdict,
            );
            if step.outcome == Outcome::Completed {
                self.open_static(index, address, now, events);
            }
        }
        if let Some(step) = close {
            Self::note(
                step,
                address,
                &format!("{label} close"),
                port,
                (events, &mut self.budget),
                verdict,
            );
            if step.outcome == Outcome::Completed {
                self.close_static(index, address, events);
            }
        }
    }

    fn open_static(&mut self, index: usize, address: IpAddr, now: Micros, events: &mut Vec<Event>) {
        let state = &mut self.doors[index];
        let door = &state.door;
        if let Some(list) = state.one_time.as_mut() {
            if let Some(sequence) = list.consume() {
                self.one_time_used
                    .entry(door.name.clone())
                    .or_default()
                    .insert(sequence.clone());
                events.push(Event::OneTimeUsed {
                    door: door.name.clone(),
                    sequence,
                });
                events.push(Event::Log(format!(
                    "door {}: one-time sequence used, {} left",
                    door.name,
                    list.left()
                )));
            }
        }
        events.push(Event::Log(format!("{address}: door {}: OPEN", door.name)));
        events.push(Event::Open {
            door: door.name.clone(),
            address,
            services: door.services.clone(),
        });
        if !door.start_command.is_empty() {
            events.push(command(
                &door.start_command,
                &door.name,
                address,
                "start",
                door.command_capabilities,
            ));
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
                .push((now.saturating_add(micros(longest)), index, address));
        }
    }

    fn close_static(&mut self, index: usize, address: IpAddr, events: &mut Vec<Event>) {
        let door = &self.doors[index].door;
        events.push(Event::Log(format!("{address}: door {}: CLOSE", door.name)));
        events.push(Event::Close {
            door: door.name.clone(),
            address,
            services: door.services.clone(),
        });
        if !door.stop_command.is_empty() {
            self.timers
                .retain(|(_, d, a)| !(*d == index && *a == address));
            events.push(command(
                &door.stop_command,
                &door.name,
                address,
                "stop",
                door.command_capabilities,
            ));
        }
    }
}

pub(super) fn command(
    argv: &[String],
    door: &str,
    address: IpAddr,
    action: &str,
    keep_capabilities: bool,
) -> Event {
    Event::Command {
        keep_capabilities,
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
