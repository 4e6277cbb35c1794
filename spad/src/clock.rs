//! The daemon's only source of time, injectable so replay, expiry and knock timeouts are
//! unit-testable.

use std::cell::Cell;

use spa_shared::Micros;

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
            .map_or(0, |d| d.as_micros() as Micros)
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
