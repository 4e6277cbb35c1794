//! A ration of routine knock log lines per second, so a flood cannot fill the disk or make the
//! daemon log-bound; what was left out is counted and reported once the second is over.

use spa_shared::Micros;

use super::engine::Event;

/// Most routine knock log lines (stages, resets, decoys, rate trips, blacklistings) per second;
/// opens, closes, one-time uses and refused replays are always logged. A spoofed flood must not
/// turn into a disk-filling log or a log-bound daemon.
pub const KNOCK_LOG_LINES_PER_SECOND: u32 = 50;

/// Rations routine log lines per second and says how many were left out.
#[derive(Debug, Default)]
pub(super) struct LogBudget {
    second: u64,
    used: u32,
    suppressed: u64,
    muted: bool,
}

impl LogBudget {
    pub(super) fn muted() -> Self {
        Self {
            muted: true,
            ..Self::default()
        }
    }

    /// Starts a knock at `now`: a new second refills the budget and reports what was left out.
    pub(super) fn clock(&mut self, now: Micros, events: &mut Vec<Event>) {
        let second = now / 1_000_000;
        if second != self.second {
            self.second = second;
            self.used = 0;
            if self.suppressed > 0 {
                events.push(Event::Log(format!(
                    "{} routine knock log lines suppressed (more than {KNOCK_LOG_LINES_PER_SECOND}/s: a flood or a scan)",
                    self.suppressed
                )));
                self.suppressed = 0;
            }
        }
    }

    /// Logs `line()` if this second's budget allows.
    pub(super) fn say(&mut self, events: &mut Vec<Event>, line: impl FnOnce() -> String) {
        if self.muted {
            return;
        }
        if self.used < KNOCK_LOG_LINES_PER_SECOND {
            self.used += 1;
            events.push(Event::Log(line()));
        } else {
            self.suppressed += 1;
        }
    }
}
