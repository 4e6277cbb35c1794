//! Sequence matching: how one knock moves one source's progress through one port sequence.
//!
//! Pure functions over a progress record; no clock of their own, no I/O. The rules, each
//! deliberate and tested:
//! * a repeat of the port just accepted (a retransmitted SYN) is ignored, not a reset;
//! * progress older than the sequence timeout starts over silently;
//! * a hit on the sequence's first port starts (or starts over) at stage 1: that is what a
//!   user does after a typo, and it tells a guesser nothing;
//! * any other port breaks progress of one stage or more ([`Outcome::Broken`]); whether that
//!   counts as a failure is decided across all of a source's sequences by the engine.

use crate::net::PortProto;
use spa_shared::Micros;
use std::time::Duration;

/// Which sequence of which door a progress record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeqKey {
    /// A static door's open sequence.
    Open(u16),
    /// A static door's close sequence.
    Close(u16),
    /// A static door's current one-time sequence.
    OneTime(u16),
    /// A TOTP door's sequence for one time step.
    Totp(u16, u64),
}

/// How far a source got in one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Ports matched so far (at least 1 while the record exists).
    pub matched: u8,
    /// When the first port was matched.
    pub started: Micros,
}

/// What one hit did to one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not this sequence's port, or a duplicate of the port just accepted.
    Untouched,
    /// Moved to `stage` of `of`; `over` when it started over from the first port.
    Advanced { stage: usize, of: usize, over: bool },
    /// The last port: the sequence is complete (its record is gone).
    Completed,
    /// A wrong port after `stage` matched ports (its record is gone).
    Broken { stage: usize },
}

/// Result of [`advance`]: the outcome, and the stage a timed-out record had reached, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub outcome: Outcome,
    pub timed_out_at: Option<usize>,
}

/// Moves the record for `key` in `list` by one hit of `port` at `now`.
pub fn advance(
    list: &mut Vec<(SeqKey, Progress)>,
    key: SeqKey,
    seq: &[PortProto],
    port: PortProto,
    now: Micros,
    timeout: Duration,
) -> Step {
    let slot = list.iter().position(|(k, _)| *k == key);
    let mut current = slot.map(|i| list[i].1);
    let mut timed_out_at = None;
    if let Some(p) = current {
        if now.saturating_sub(p.started) > timeout.as_micros() as Micros {
            timed_out_at = Some(usize::from(p.matched));
            current = None;
        }
    }
    let matched = current.map_or(0, |p| usize::from(p.matched));
    let (next, outcome) = if matched < seq.len() && seq[matched] == port {
        let started = current.map_or(now, |p| p.started);
        if matched + 1 == seq.len() {
            (None, Outcome::Completed)
        } else {
            let stage = matched + 1;
            (
                Some(Progress {
                    matched: stage as u8,
                    started,
                }),
                Outcome::Advanced {
                    stage,
                    of: seq.len(),
                    over: false,
                },
            )
        }
    } else if matched > 0 && seq[matched - 1] == port {
        (current, Outcome::Untouched)
    } else if seq.first() == Some(&port) {
        (
            Some(Progress {
                matched: 1,
                started: now,
            }),
            Outcome::Advanced {
                stage: 1,
                of: seq.len(),
                over: matched > 0,
            },
        )
    } else if matched > 0 {
        (None, Outcome::Broken { stage: matched })
    } else {
        (None, Outcome::Untouched)
    };
    match (slot, next) {
        (Some(i), Some(p)) => list[i].1 = p,
        (Some(i), None) => {
            list.swap_remove(i);
        }
        (None, Some(p)) => list.push((key, p)),
        (None, None) => {}
    }
    Step {
        outcome,
        timed_out_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Proto;

    fn tcp(port: u16) -> PortProto {
        PortProto {
            port,
            proto: Proto::Tcp,
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn stages_duplicates_restarts_breaks_and_timeouts() {
        let seq = [tcp(1), tcp(2), tcp(3)];
        let key = SeqKey::Open(0);
        let mut list = Vec::new();
        let mut go = |port: u16, now: Micros| advance(&mut list, key, &seq, tcp(port), now, T);
        assert_eq!(go(9, 0).outcome, Outcome::Untouched);
        assert!(matches!(
            go(1, 0).outcome,
            Outcome::Advanced { stage: 1, .. }
        ));
        assert_eq!(go(1, 1).outcome, Outcome::Untouched, "duplicate");
        assert!(matches!(
            go(2, 2).outcome,
            Outcome::Advanced { stage: 2, .. }
        ));
        assert_eq!(go(9, 3).outcome, Outcome::Broken { stage: 2 });
        assert!(matches!(
            go(1, 4).outcome,
            Outcome::Advanced {
                stage: 1,
                over: false,
                ..
            }
        ));
        assert!(matches!(go(1, 4).outcome, Outcome::Untouched));
        go(2, 5);
        assert!(matches!(
            go(1, 6).outcome,
            Outcome::Advanced {
                stage: 1,
                over: true,
                ..
            }
        ));
        go(2, 7);
        assert_eq!(go(3, 8).outcome, Outcome::Completed);
        // Too slow: starts over silently.
        go(1, 10);
        let late = go(2, 10 + 6_000_000);
        assert_eq!(late.timed_out_at, Some(1));
        assert_eq!(late.outcome, Outcome::Untouched);
        assert!(list.is_empty());
    }
}
