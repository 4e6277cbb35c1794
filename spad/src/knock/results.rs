//! What each knock came to, counted: the "knocks by stage" of `spad status` and the metrics.
//!
//! The engine classifies every knock it is given into one [`KnockResult`] from what it already
//! decided (no log text is parsed), and keeps a [`KnockResults`] tally the daemon copies into its
//! counters.

/// The one thing a knock did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnockResult {
    /// On a port the doors ignore (`ignore-ports`).
    Ignored,
    /// From a blacklisted source: not looked at.
    Blacklisted,
    /// Over the per-source rate limit (the knock that trips it included).
    RateLimited,
    /// On a decoy port: progress reset, a failure counted.
    Decoy,
    /// Moved no sequence on and broke none.
    Unmatched,
    /// Moved a sequence on to a further stage.
    Progress,
    /// Completed a door's open sequence.
    Open,
    /// Completed a door's close sequence.
    Close,
    /// Broke a source's progress and moved nothing on: a failure.
    Reset,
    /// Completed a TOTP sequence whose time step was already used: a failure.
    Replay,
}

impl KnockResult {
    pub const ALL: [KnockResult; 10] = [
        KnockResult::Ignored,
        KnockResult::Blacklisted,
        KnockResult::RateLimited,
        KnockResult::Decoy,
        KnockResult::Unmatched,
        KnockResult::Progress,
        KnockResult::Open,
        KnockResult::Close,
        KnockResult::Reset,
        KnockResult::Replay,
    ];

    /// The stable name (the `result` label of `knock_results`).
    pub fn name(self) -> &'static str {
        match self {
            KnockResult::Ignored => "ignored",
            KnockResult::Blacklisted => "blacklisted",
            KnockResult::RateLimited => "rate_limited",
            KnockResult::Decoy => "decoy",
            KnockResult::Unmatched => "unmatched",
            KnockResult::Progress => "progress",
            KnockResult::Open => "open",
            KnockResult::Close => "close",
            KnockResult::Reset => "reset",
            KnockResult::Replay => "replay",
        }
    }
}

/// Knocks seen, by result.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnockResults([u64; KnockResult::ALL.len()]);

impl KnockResults {
    pub fn count(&mut self, result: KnockResult) {
        self.0[result as usize] += 1;
    }

    pub fn get(&self, result: KnockResult) -> u64 {
        self.0[result as usize]
    }

    /// (result, count) for every result, in [`KnockResult::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (KnockResult, u64)> + '_ {
        KnockResult::ALL.into_iter().map(|r| (r, self.get(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_has_its_own_slot_and_name() {
        let mut results = KnockResults::default();
        for (i, r) in KnockResult::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i);
            for _ in 0..=i {
                results.count(r);
            }
        }
        let names: std::collections::BTreeSet<_> =
            KnockResult::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), KnockResult::ALL.len());
        assert!(results.iter().all(|(r, n)| n == r as u64 + 1));
    }
}
