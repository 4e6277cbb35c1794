//! The cheap keyed pre-check (WireGuard's `mac1` idea).
//!
//! The last 16 bytes of every packet are a keyed BLAKE2s-128 over everything before them, keyed
//! by `BLAKE2s(LABEL || server public key)`. Anyone who does not know the server's public key
//! cannot produce it, so the daemon drops scans, garbage and floods for the cost of one hash and
//! never does X25519 work for them. The label carries the protocol version: a future version
//! picks a new label, and the two can be told apart without any clear-text version byte.

use blake2::digest::consts::U16;
use blake2::digest::Mac;
use blake2::{Blake2s256, Blake2sMac, Digest};

use crate::keys::PublicKey;

/// Length of the trailing MAC.
pub const MAC_LEN: usize = 16;
/// Domain-separation label of protocol version 1.
pub const LABEL_V1: &[u8] = b"spa-gateway mac1 v1";

/// The pre-check key a server (and its clients) derive from the server's public key.
#[derive(Clone)]
pub struct PrecheckKey([u8; 32]);

impl std::fmt::Debug for PrecheckKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrecheckKey(..)")
    }
}

impl PrecheckKey {
    /// Derives the key for protocol v1 from the server's public key.
    pub fn new(server: &PublicKey) -> Self {
        let mut hasher = Blake2s256::new();
        hasher.update(LABEL_V1);
        hasher.update(server.as_bytes());
        Self(hasher.finalize().into())
    }

    fn mac(&self) -> Blake2sMac<U16> {
        <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(&self.0).expect("32-byte key")
    }

    /// The tag over `body`.
    pub fn tag(&self, body: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.mac();
        Mac::update(&mut mac, body);
        mac.finalize().into_bytes().into()
    }

    /// Checks `packet = body || tag` in constant time. Returns the body if the tag matches.
    pub fn verify<'a>(&self, packet: &'a [u8]) -> Option<&'a [u8]> {
        let split = packet.len().checked_sub(MAC_LEN)?;
        let (body, tag) = packet.split_at(split);
        let mut mac = self.mac();
        Mac::update(&mut mac, body);
        mac.verify_slice(tag).ok().map(|()| body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_verifies_and_any_change_is_refused() {
        let key = PrecheckKey::new(&PublicKey([5u8; 32]));
        let mut packet = b"some body".to_vec();
        packet.extend_from_slice(&key.tag(b"some body"));
        assert_eq!(key.verify(&packet), Some(&b"some body"[..]));
        for i in 0..packet.len() {
            let mut bad = packet.clone();
            bad[i] ^= 0x80;
            assert_eq!(key.verify(&bad), None);
        }
        let other = PrecheckKey::new(&PublicKey([6u8; 32]));
        assert_eq!(other.verify(&packet), None);
        assert_eq!(key.verify(&[1, 2, 3]), None);
    }
}
