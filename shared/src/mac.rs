//! The cheap keyed pre-check (WireGuard's `mac1` idea).
//!
//! The last 16 bytes of every packet are a keyed BLAKE2s-128 over everything before them, keyed
//! by `BLAKE2s(LABEL || server public key)`. Anyone who does not know the server's public key
//! cannot produce it, so the daemon drops scans, garbage and floods for the cost of one hash and
//! never does X25519 work for them. The label carries the protocol version: a future version
//! picks a new label, and the two can be told apart without any clear-text version byte.

use blake2::digest::consts::U16;
use blake2::digest::core_api::{Block, Buffer, UpdateCore, VariableOutputCore};
use blake2::digest::Mac;
use blake2::{Blake2s256, Blake2sMac, Blake2sVarCore, Digest};
use subtle::ConstantTimeEq;

use crate::keys::PublicKey;

/// Length of the trailing MAC.
pub const MAC_LEN: usize = 16;
/// Domain-separation label of protocol version 1.
pub const LABEL_V1: &[u8] = b"spa-gateway mac1 v1";

/// The pre-check key a server (and its clients) derive from the server's public key.
///
/// It keeps the BLAKE2s state after the key block: every packet has a body, so the key block
/// is never the last one, and its compression (one of four for a 176-byte packet) is done
/// once here instead of once per packet. The tag is the standard keyed BLAKE2s-128.
#[derive(Clone)]
pub struct PrecheckKey {
    key: [u8; 32],
    keyed: Blake2sVarCore,
}

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
        let key: [u8; 32] = hasher.finalize().into();
        let mut keyed = Blake2sVarCore::new_with_params(&[], &[], key.len(), MAC_LEN);
        let mut key_block = Block::<Blake2sVarCore>::default();
        key_block[..key.len()].copy_from_slice(&key);
        keyed.update_blocks(&[key_block]);
        Self { key, keyed }
    }

    /// Keyed BLAKE2s-128 the library's way (the key block compressed per call).
    fn reference(&self, body: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(&self.key)
            .expect("32-byte key");
        Mac::update(&mut mac, body);
        mac.finalize().into_bytes().into()
    }

    /// The tag over `body`.
    pub fn tag(&self, body: &[u8]) -> [u8; MAC_LEN] {
        if body.is_empty() {
            // Then the key block is the last block: nothing to reuse.
            return self.reference(body);
        }
        let mut core = self.keyed.clone();
        let mut buffer = Buffer::<Blake2sVarCore>::default();
        buffer.digest_blocks(body, |blocks| core.update_blocks(blocks));
        let mut full = Default::default();
        core.finalize_variable_core(&mut buffer, &mut full);
        let mut tag = [0u8; MAC_LEN];
        tag.copy_from_slice(&full[..MAC_LEN]);
        tag
    }

    /// Checks `packet = body || tag` in constant time. Returns the body if the tag matches.
    pub fn verify<'a>(&self, packet: &'a [u8]) -> Option<&'a [u8]> {
        let split = packet.len().checked_sub(MAC_LEN)?;
        let (body, tag) = packet.split_at(split);
        bool::from(self.tag(body).ct_eq(tag)).then_some(body)
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

    proptest::proptest! {
        #[test]
        fn the_reused_key_state_gives_the_standard_keyed_blake2s(
            server in proptest::array::uniform32(proptest::prelude::any::<u8>()),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        ) {
            let key = PrecheckKey::new(&PublicKey(server));
            proptest::prop_assert_eq!(key.tag(&body), key.reference(&body));
        }
    }
}
