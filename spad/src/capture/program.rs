//! The daemon's one eBPF prefilter ([`Limiter`]): loaded once, at the first capture that asks
//! for it (while spad still holds `CAP_BPF`), and attached to the sockets of every capture the
//! daemon opens after that, those a reload opens after the privilege drop included.
//! Attaching a loaded program to a socket (`SO_ATTACH_BPF`) needs no privilege; loading one
//! does. Without this, a reload that needs a new capture (other interfaces, another slot
//! size) would fall back to the classic prefilter and lose the per-source budget until a
//! restart.
//!
//! Lifetime: the program, its per-source budget map (LRU, [`SOURCES`](super::ebpf::SOURCES)
//! entries), its counter and its control map live as long as the daemon holds this, or any
//! capture or socket still holds the program: one set for the daemon's life, whatever the
//! number of reloads. Every capture that shares it writes the watched ports, the budget and
//! the engaged flag of the one control map: the capture opened last owns them, and a failed
//! reload writes the running capture's back (`event_loop`'s `try_reload`).

use std::io;
use std::sync::Arc;

use super::ebpf::{Limiter, Ports, SourceBudget};

/// The daemon's prefilter program, once loaded.
#[derive(Debug, Default)]
pub struct OneProgram {
    loaded: Option<Arc<Limiter>>,
}

impl OneProgram {
    /// The program loaded before, or (the first time, or after a refusal) loaded now,
    /// released, with no port watched: the capture that takes it writes its own. A refusal
    /// (no `CAP_BPF`, an old kernel) is returned, and the next call tries again.
    pub fn get(&mut self) -> io::Result<Arc<Limiter>> {
        if let Some(limiter) = &self.loaded {
            return Ok(Arc::clone(limiter));
        }
        let limiter = Arc::new(Limiter::load(
            &Ports::new(&[], false),
            SourceBudget { rate: 1, burst: 1 },
        )?);
        self.loaded = Some(Arc::clone(&limiter));
        Ok(limiter)
    }

    /// The program, if one is loaded.
    pub fn loaded(&self) -> Option<&Arc<Limiter>> {
        self.loaded.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs CAP_BPF (skipped otherwise): loaded once, then the same program every time. As
    /// root the kernel must accept it: the other root tests skip where it is refused, so a
    /// program the verifier rejects fails here, not only in the end-to-end tests.
    #[test]
    fn the_program_is_loaded_once_and_shared() {
        let mut one = OneProgram::default();
        assert!(one.loaded().is_none());
        let first = match one.get() {
            Ok(limiter) => limiter,
            Err(e) if rustix::process::geteuid().is_root() => {
                panic!("the kernel refused the eBPF prefilter to root: {e}")
            }
            Err(e) => {
                eprintln!("skipped: the kernel refused the eBPF prefilter: {e}");
                return;
            }
        };
        let again = one.get().unwrap();
        assert!(Arc::ptr_eq(&first, &again), "a second program was loaded");
        assert!(Arc::ptr_eq(&first, one.loaded().unwrap()));
    }
}
