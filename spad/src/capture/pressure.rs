//! When the kernel's per-source budget ([`ebpf`](super::ebpf)) is in force: only while the
//! capture is under pressure.
//!
//! A budget per source address is the one defence against a flood from one source that
//! costs nothing per packet, but it has a price: anyone who can spoof a client's address can
//! spend that client's budget. So the kernel program enforces it only while a flag is set,
//! and this module decides the flag, without a system call: it is engaged when spad is
//! falling behind (a quarter of a ring waiting, or frames lost because a ring was full), and
//! stays engaged while the kernel keeps cutting at least [`STAY_CUT_PER_SECOND`] frames a
//! second; it is released [`HOLD`] after the last of those. A flood that spad keeps up with
//! is never cut, whatever address it spoofs; one that would fill the ring is cut per source.

use std::time::{Duration, Instant};

/// How long the budget stays engaged after the last sign of pressure.
pub const HOLD: Duration = Duration::from_secs(2);
/// Frames per second the kernel must still be cutting for the budget to stay engaged.
pub const STAY_CUT_PER_SECOND: u64 = 5_000;

/// The engage/release state machine. Time comes in as arguments (an injectable clock).
#[derive(Debug, Clone)]
pub struct Pressure {
    engaged_until: Option<Instant>,
    last_tick: Option<(Instant, u64)>,
    engagements: u64,
}

impl Default for Pressure {
    fn default() -> Self {
        Self::new()
    }
}

impl Pressure {
    pub fn new() -> Self {
        Self {
            engaged_until: None,
            last_tick: None,
            engagements: 0,
        }
    }

    /// Whether the budget is to be enforced now.
    pub fn engaged(&self) -> bool {
        self.engaged_until.is_some()
    }

    /// Times the budget was engaged from released.
    pub fn engagements(&self) -> u64 {
        self.engagements
    }

    /// spad is falling behind (a backlog in a ring, or frames lost to a full ring): engaged
    /// for at least [`HOLD`]. Returns whether the state changed.
    pub fn behind(&mut self, now: Instant) -> bool {
        let was = self.engaged();
        self.engaged_until = Some(now + HOLD);
        if !was {
            self.engagements += 1;
        }
        !was
    }

    /// The periodic look: `cut` is the kernel's running count of frames cut by the budget.
    /// Extends the engagement while the kernel cuts fast enough, and releases it after
    /// [`HOLD`] without. Returns whether the state changed.
    pub fn tick(&mut self, now: Instant, cut: u64) -> bool {
        let fast = match self.last_tick {
            Some((then, before)) if now > then => {
                let per_second = cut.saturating_sub(before) as f64 / (now - then).as_secs_f64();
                per_second >= STAY_CUT_PER_SECOND as f64
            }
            _ => false,
        };
        self.last_tick = Some((now, cut));
        match self.engaged_until {
            Some(_) if fast => {
                self.engaged_until = Some(now + HOLD);
                false
            }
            Some(until) if now >= until => {
                self.engaged_until = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_until_spad_falls_behind() {
        let start = Instant::now();
        let mut p = Pressure::new();
        assert!(!p.engaged());
        // Ticks alone never engage, however much is cut (nothing is, while released).
        for i in 1..20u64 {
            assert!(!p.tick(start + Duration::from_millis(200 * i), 0));
        }
        assert!(!p.engaged());
        assert!(p.behind(start + Duration::from_secs(4)));
        assert!(p.engaged());
        assert_eq!(p.engagements(), 1);
        // Behind again while engaged: no change, no new engagement.
        assert!(!p.behind(start + Duration::from_secs(5)));
        assert_eq!(p.engagements(), 1);
    }

    #[test]
    fn stays_engaged_while_the_kernel_cuts_and_lets_go_after_the_hold() {
        let start = Instant::now();
        let mut p = Pressure::new();
        p.tick(start, 0);
        p.behind(start);
        // A flood the kernel cuts at 100,000/s, for 10 s: engaged throughout.
        let mut cut = 0;
        let mut now = start;
        for _ in 0..50 {
            now += Duration::from_millis(200);
            cut += 20_000;
            assert!(!p.tick(now, cut));
            assert!(p.engaged());
        }
        // The flood stops: still engaged for HOLD, then released, once.
        let stopped = now;
        let mut released_at = None;
        for _ in 0..20 {
            now += Duration::from_millis(200);
            if p.tick(now, cut) {
                assert!(released_at.is_none());
                released_at = Some(now);
            }
        }
        let released_at = released_at.expect("released");
        assert!(released_at - stopped >= HOLD, "{:?}", released_at - stopped);
        assert!(released_at - stopped <= HOLD + Duration::from_millis(200));
        assert!(!p.engaged());
    }

    #[test]
    fn a_trickle_of_cuts_does_not_keep_it_engaged() {
        let start = Instant::now();
        let mut p = Pressure::new();
        p.tick(start, 0);
        p.behind(start);
        let mut now = start;
        let mut cut = 0;
        // 1,000 cut per 200 ms = 5,000/s keeps it; 999 does not.
        for _ in 0..5 {
            now += Duration::from_millis(200);
            cut += 1_000;
            p.tick(now, cut);
        }
        assert!(p.engaged());
        let trickle_from = now;
        let mut released = false;
        for _ in 0..15 {
            now += Duration::from_millis(200);
            cut += 999;
            released |= p.tick(now, cut);
        }
        assert!(released && !p.engaged(), "{:?}", now - trickle_from);
    }
}
