//! When the kernel's per-source budget ([`ebpf`](super::ebpf)) is in force: only while the
//! capture is under pressure.
//!
//! A budget per source address is the one defence against a flood from one source that
//! costs nothing per packet, but it has a price: anyone who can spoof a client's address can
//! spend that client's budget. So the kernel program enforces it only while a flag is set,
//! and this module decides the flag, without a system call: it is engaged when spad is
//! falling behind (a quarter of a ring waiting, or frames lost because a ring was full), and
//! released [`HOLD`] after the last such sign. What the budget itself cuts never keeps it
//! engaged: a flood spoofing a client's address would otherwise keep it engaged for as long
//! as it lasts, even when spad could keep up with all of it. A flood that spad keeps up with
//! is never cut, whatever address it spoofs; one that would fill the ring is cut per source,
//! and if it still would once released, the next backlog engages the budget again at once.

use std::time::{Duration, Instant};

/// How long the budget stays engaged after the last sign of pressure.
pub const HOLD: Duration = Duration::from_secs(2);

/// The engage/release state machine. Time comes in as arguments (an injectable clock).
#[derive(Debug, Clone, Default)]
pub struct Pressure {
    engaged_until: Option<Instant>,
    engagements: u64,
}

impl Pressure {
    pub fn new() -> Self {
        Self::default()
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
    /// until [`HOLD`] from now. Returns whether the state changed.
    pub fn behind(&mut self, now: Instant) -> bool {
        let was = self.engaged();
        self.engaged_until = Some(now + HOLD);
        if !was {
            self.engagements += 1;
        }
        !was
    }

    /// The periodic look: releases the budget [`HOLD`] after the last sign of pressure.
    /// Returns whether the state changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        match self.engaged_until {
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
        for i in 1..20u64 {
            assert!(!p.tick(start + Duration::from_millis(200 * i)));
        }
        assert!(!p.engaged());
        assert!(p.behind(start + Duration::from_secs(4)));
        assert!(p.engaged());
        assert_eq!(p.engagements(), 1);
        // Behind again while engaged: no change, no new engagement, a longer hold.
        assert!(!p.behind(start + Duration::from_secs(5)));
        assert_eq!(p.engagements(), 1);
        assert!(!p.tick(start + Duration::from_millis(6_900)));
        assert!(p.tick(start + Duration::from_secs(7)));
    }

    /// Only signs of pressure keep it engaged: ticks alone (whatever the kernel is cutting
    /// meanwhile, which the state machine is not even told) release it after the hold.
    #[test]
    fn released_hold_after_the_last_sign_of_pressure() {
        let start = Instant::now();
        let mut p = Pressure::new();
        p.behind(start);
        let mut now = start;
        let mut released_at = None;
        for _ in 0..30 {
            now += Duration::from_millis(200);
            if p.tick(now) {
                assert!(released_at.is_none(), "released twice");
                released_at = Some(now);
            }
        }
        let released_at = released_at.expect("released");
        assert!(released_at - start >= HOLD);
        assert!(released_at - start <= HOLD + Duration::from_millis(200));
        // A new backlog engages it again at once, and counts.
        assert!(p.behind(now));
        assert_eq!(p.engagements(), 2);
    }
}
