//! The daemon's only source of time, injectable so replay, expiry and knock timeouts are
//! unit-testable.

use std::cell::Cell;

use std::time::Duration;

use spa_shared::Micros;

/// `duration` in microseconds, saturating instead of truncating (a `u128` cast to `u64`
/// would wrap an absurd duration into a short one).
pub fn micros(duration: Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
}

/// The instant `duration` after `now`, saturating at the end of time instead of wrapping.
pub fn after(now: Micros, duration: Duration) -> Micros {
    now.saturating_add(micros(duration))
}

/// Wall-clock time in microseconds since the UNIX epoch.
pub trait Clock {
    fn now(&self) -> Micros;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, micros)
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(pub Cell<Micros>);

impl ManualClock {
    pub fn new(now: Micros) -> Self {
        Self(Cell::new(now))
    }
    pub fn advance(&self, micros: Micros) {
        self.0.set(self.0.get() + micros);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.0.get()
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Micros {
        (**self).now()
    }
}
