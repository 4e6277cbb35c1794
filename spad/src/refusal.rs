//! Why a packet was dropped, as a closed set with stable names: every drop is counted under
//! exactly one of these, so a metrics endpoint can export `spad_refused_total{reason="…"}`.

use spa_shared::packet::OpenError;
use spa_shared::replay::ReplayError;

use crate::state::ReplayRefusal;

macro_rules! refusals {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// One reason for dropping an SPA packet. The snake_case names are stable.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Refusal {
            $( $(#[$doc])* $variant, )*
        }

        impl Refusal {
            /// Every reason, in a fixed order (the order of [`RefusalCounts::iter`]).
            pub const ALL: &'static [Refusal] = &[$(Refusal::$variant,)*];

            /// The stable snake_case name (for metrics labels and logs).
            pub fn name(self) -> &'static str {
                match self {
                    $( Refusal::$variant => $name, )*
                }
            }
        }
    };
}

refusals! {
    /// Not the size of an SPA packet.
    Size = "size",
    /// mac1 wrong: not made with this server's public key.
    Mac1 = "mac1",
    /// The same packet was authenticated recently: dropped before any public-key work.
    RecentPacket = "recent_packet",
    /// The source spent its public-key budget (`handshake-rate`, `handshake-burst`).
    RateLimited = "rate_limited",
    /// The Noise handshake failed (wrong or unknown key, tampered packet).
    Handshake = "handshake",
    /// The decrypted payload did not decode.
    Payload = "payload",
    /// A client key that is not configured (refused by the handshake after its first X25519).
    UnknownClient = "unknown_client",
    /// Timestamp before the window.
    Stale = "stale",
    /// Timestamp after the window.
    Future = "future",
    /// This request was accepted before.
    Replayed = "replayed",
    /// At or below the client's replay floor.
    BelowFloor = "below_floor",
    /// This packet digest was accepted before (protocols without timestamps).
    DigestReplayed = "digest_replayed",
    /// Too many packet digests remembered.
    DigestFull = "digest_full",
    /// The replay record was damaged at start: everything is refused for one window.
    FailClosed = "fail_closed",
    /// The replay record could not be made durable.
    Persist = "persist",
    /// The policy refused the request (service not allowed, address override, ...).
    Policy = "policy",
    /// An fwknop 2.x packet refused (no client's HMAC, decryption, digest replay, policy; the
    /// log line, tagged `protocol=fwknop`, says which).
    Fwknop = "fwknop",
    /// Any other reason (code paths that do not name one yet).
    Other = "other",
}

impl From<&OpenError> for Refusal {
    fn from(e: &OpenError) -> Self {
        match e {
            OpenError::Size(_) => Refusal::Size,
            OpenError::Precheck => Refusal::Mac1,
            OpenError::Handshake(_) => Refusal::Handshake,
            OpenError::UnknownClient(_) => Refusal::UnknownClient,
            OpenError::Payload(_) => Refusal::Payload,
        }
    }
}

impl From<&ReplayRefusal> for Refusal {
    fn from(e: &ReplayRefusal) -> Self {
        match e {
            ReplayRefusal::Rule(ReplayError::Stale(_)) => Refusal::Stale,
            ReplayRefusal::Rule(ReplayError::Future(_)) => Refusal::Future,
            ReplayRefusal::Rule(ReplayError::Replayed) => Refusal::Replayed,
            ReplayRefusal::Rule(ReplayError::BelowFloor) => Refusal::BelowFloor,
            ReplayRefusal::FailClosed(_) => Refusal::FailClosed,
            ReplayRefusal::Persist(_) => Refusal::Persist,
            ReplayRefusal::DigestReplayed => Refusal::DigestReplayed,
            ReplayRefusal::Full(_) => Refusal::DigestFull,
        }
    }
}

/// A counter per [`Refusal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalCounts([u64; Refusal::ALL.len()]);

impl Default for RefusalCounts {
    fn default() -> Self {
        Self([0; Refusal::ALL.len()])
    }
}

impl RefusalCounts {
    pub fn add(&mut self, reason: Refusal) {
        self.0[reason as usize] += 1;
    }

    pub fn get(&self, reason: Refusal) -> u64 {
        self.0[reason as usize]
    }

    /// Every reason with its count, in [`Refusal::ALL`] order (zeros included).
    pub fn iter(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL.iter().map(|&r| (r, self.get(r)))
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl std::fmt::Display for RefusalCounts {
    /// `name=count` for every non-zero reason, space-separated.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (reason, n) in self.iter().filter(|(_, n)| *n > 0) {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{}={n}", reason.name())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case_and_indexes_match() {
        let mut names: Vec<_> = Refusal::ALL.iter().map(|r| r.name()).collect();
        assert!(names.iter().all(|n| n
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')));
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Refusal::ALL.len());
    }

    #[test]
    fn an_unknown_client_key_keeps_its_reason_whether_refused_before_or_after_ss() {
        let key = spa_shared::keys::PublicKey([7; 32]);
        assert_eq!(
            Refusal::from(&OpenError::UnknownClient(key)),
            Refusal::UnknownClient
        );
    }

    #[test]
    fn counts_and_display() {
        let mut counts = RefusalCounts::default();
        counts.add(Refusal::Mac1);
        counts.add(Refusal::Mac1);
        counts.add(Refusal::RecentPacket);
        assert_eq!(counts.get(Refusal::Mac1), 2);
        assert_eq!(counts.total(), 3);
        assert_eq!(counts.to_string(), "mac1=2 recent_packet=1");
    }
}
