//! Exactly one Noise pattern, one-way `X`, over X25519, ChaCha20-Poly1305 and BLAKE2s:
//!
//! ```text
//! Noise_X_25519_ChaChaPoly_BLAKE2s
//!   <- s
//!   ...
//!   -> e, es, s, ss
//! ```
//!
//! The initiator (the `spa` client) knows the responder's (server's) static key in advance,
//! sends an ephemeral key, its own static key encrypted, and one encrypted payload. The result
//! authenticates the client to the server and hides the client's identity from observers. It is
//! written out here (a hundred lines) rather than pulled from a general framework so the whole
//! attack surface is visible; the tests prove it against the `snow` crate in both directions.
//!
//! The responder side is a [`Responder`]: everything that depends only on its own key is
//! computed once (its public key, the handshake state after the prologue and `rs`). Built
//! [`with_initiators`](Responder::with_initiators), it also holds the `ss` secret of every
//! initiator it knows, so opening a message costs one X25519 (`es`) instead of two, and a
//! message from a key it does not know is refused right after `es`, before any second DH.

use std::collections::HashMap;

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Mac, SimpleHmac};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::keys::{PrivateKey, PublicKey};

/// The Noise protocol name; exactly 32 bytes, so it is used as the initial hash unhashed.
pub const PROTOCOL_NAME: &[u8; 32] = b"Noise_X_25519_ChaChaPoly_BLAKE2s";
/// Bytes of an ephemeral public key, of the encrypted static key, and of an AEAD tag.
pub const EPHEMERAL_LEN: usize = 32;
pub const ENCRYPTED_STATIC_LEN: usize = 32 + TAG_LEN;
pub const TAG_LEN: usize = 16;
/// Handshake overhead on top of the payload.
pub const OVERHEAD: usize = EPHEMERAL_LEN + ENCRYPTED_STATIC_LEN + TAG_LEN;

/// Why a handshake message did not open. Deliberately coarse: an attacker learns nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum NoiseError {
    #[error("message too short for a handshake")]
    Truncated,
    #[error("a Diffie-Hellman result was all zero (low-order point)")]
    LowOrderPoint,
    #[error("decryption failed (wrong server key, tampered bytes, or not for us)")]
    Decrypt,
    /// The initiator's static key decrypted, but the responder was built with a list of known
    /// initiators and this key is not on it (refused after one DH, before `ss`).
    #[error("unknown initiator key {0}")]
    UnknownInitiator(PublicKey),
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Blake2s256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut mac = <SimpleHmac<Blake2s256> as Mac>::new_from_slice(key).expect("any key length");
    for part in parts {
        mac.update(part);
    }
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// Noise's HKDF with two outputs.
fn hkdf2(chaining_key: &[u8; 32], ikm: &[u8]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let temp = hmac(chaining_key, &[ikm]);
    let first = hmac(&temp, &[&[1u8]]);
    let second = hmac(&temp, &[first.as_slice(), &[2u8]]);
    (first, second)
}

/// The symmetric state of the Noise spec (chaining key, handshake hash, cipher key and nonce).
#[derive(Clone)]
struct SymmetricState {
    chaining_key: Zeroizing<[u8; 32]>,
    handshake_hash: [u8; 32],
    key: Option<Zeroizing<[u8; 32]>>,
    nonce: u64,
}

impl SymmetricState {
    fn new(prologue: &[u8], responder_static: &PublicKey) -> Self {
        let mut state = Self {
            chaining_key: Zeroizing::new(*PROTOCOL_NAME),
            handshake_hash: *PROTOCOL_NAME,
            key: None,
            nonce: 0,
        };
        state.mix_hash(prologue);
        state.mix_hash(responder_static.as_bytes());
        state
    }

    fn mix_hash(&mut self, data: &[u8]) {
        self.handshake_hash = hash(&[&self.handshake_hash, data]);
    }

    fn mix_key(&mut self, input: &[u8; 32]) {
        let (chaining_key, key) = hkdf2(&self.chaining_key, input);
        self.chaining_key = chaining_key;
        self.key = Some(key);
        self.nonce = 0;
    }

    fn nonce_bytes(&self) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.nonce.to_le_bytes());
        nonce.into()
    }

    /// Encrypts `plaintext` (appended to `out`) with the handshake hash as associated data.
    fn encrypt_and_hash(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        let key = self
            .key
            .as_ref()
            .expect("pattern X always has a key before encryption");
        let start = out.len();
        out.extend_from_slice(plaintext);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        let tag = cipher
            .encrypt_in_place_detached(&self.nonce_bytes(), &self.handshake_hash, &mut out[start..])
            .expect("payload is far below the AEAD limit");
        out.extend_from_slice(&tag);
        self.mix_hash(&out[start..]);
        self.nonce += 1;
    }

    /// Decrypts one ciphertext-with-tag into a fresh buffer.
    fn decrypt_and_hash(&mut self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, NoiseError> {
        let split = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(NoiseError::Truncated)?;
        let mut plain = Zeroizing::new(ciphertext[..split].to_vec());
        self.decrypt_and_hash_into(ciphertext, &mut plain)?;
        Ok(plain)
    }

    /// Decrypts one ciphertext-with-tag into `plain`, which must be exactly the body's length
    /// (no allocation: used for the 32-byte static key). On failure `plain` holds garbage.
    fn decrypt_and_hash_into(
        &mut self,
        ciphertext: &[u8],
        plain: &mut [u8],
    ) -> Result<(), NoiseError> {
        let key = self.key.as_ref().ok_or(NoiseError::Decrypt)?;
        let split = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(NoiseError::Truncated)?;
        let (body, tag) = ciphertext.split_at(split);
        if plain.len() != body.len() {
            return Err(NoiseError::Truncated);
        }
        plain.copy_from_slice(body);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        cipher
            .decrypt_in_place_detached(&self.nonce_bytes(), &self.handshake_hash, plain, tag.into())
            .map_err(|_| NoiseError::Decrypt)?;
        self.mix_hash(ciphertext);
        self.nonce += 1;
        Ok(())
    }
}

#[cfg(test)]
thread_local! {
    /// X25519 operations done by this thread: lets the tests prove how many DH an open costs.
    static DH_COUNT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn dh(private: &PrivateKey, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, NoiseError> {
    count_dh();
    let shared = private
        .secret()
        .diffie_hellman(&x25519_dalek::PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(NoiseError::LowOrderPoint);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn count_dh() {
    #[cfg(test)]
    DH_COUNT.with(|count| count.set(count.get() + 1));
}

/// The responder's static key for its per-message X25519: by aws-lc with the `aws-lc`
/// feature (the daemon), else by x25519-dalek. Both give the same bytes and refuse the same
/// low-order points (an all-zero result); the tests run the dalek one against it.
enum StaticKey {
    #[cfg(feature = "aws-lc")]
    Fast(aws_lc_rs::agreement::PrivateKey),
    /// Without the feature, or if aws-lc refused the key (it takes any 32 bytes; only an
    /// allocation failure inside it could): the same result, by x25519-dalek.
    Dalek(PrivateKey),
}

impl StaticKey {
    fn new(private: &PrivateKey) -> Self {
        #[cfg(feature = "aws-lc")]
        if let Ok(fast) = aws_lc_rs::agreement::PrivateKey::from_private_key(
            &aws_lc_rs::agreement::X25519,
            private.secret().as_bytes(),
        ) {
            return Self::Fast(fast);
        }
        Self::Dalek(private.clone())
    }

    fn dh(&self, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, NoiseError> {
        match self {
            #[cfg(feature = "aws-lc")]
            Self::Fast(fast) => {
                count_dh();
                let mut out = Zeroizing::new([0u8; 32]);
                aws_lc_rs::agreement::agree(
                    fast,
                    aws_lc_rs::agreement::UnparsedPublicKey::new(
                        &aws_lc_rs::agreement::X25519,
                        public,
                    ),
                    NoiseError::LowOrderPoint,
                    |shared| {
                        out.copy_from_slice(shared);
                        Ok(())
                    },
                )?;
                // aws-lc refuses an all-zero result itself; checked again, as dalek's path does.
                if bool::from(out.ct_eq(&[0u8; 32])) {
                    return Err(NoiseError::LowOrderPoint);
                }
                Ok(out)
            }
            Self::Dalek(private) => dh(private, public),
        }
    }
}

/// Writes the single handshake message `e, es, s, ss, payload` to `out`.
///
/// `ephemeral` must be a fresh key for every message (the client draws it from the OS RNG);
/// it is a parameter so test vectors are reproducible.
pub fn write_message(
    prologue: &[u8],
    initiator: &PrivateKey,
    ephemeral: &PrivateKey,
    responder: &PublicKey,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), NoiseError> {
    let mut state = SymmetricState::new(prologue, responder);
    let ephemeral_public = ephemeral.public_key();
    out.extend_from_slice(ephemeral_public.as_bytes());
    state.mix_hash(ephemeral_public.as_bytes());
    state.mix_key(&*dh(ephemeral, responder.as_bytes())?);
    state.encrypt_and_hash(initiator.public_key().as_bytes(), out);
    state.mix_key(&*dh(initiator, responder.as_bytes())?);
    state.encrypt_and_hash(payload, out);
    Ok(())
}

/// An opened handshake message: who sent it and what they said.
#[derive(Debug)]
pub struct Opened {
    pub initiator: PublicKey,
    pub payload: Zeroizing<Vec<u8>>,
}

/// The `ss` secret (`DH(responder static, initiator static)`) of every initiator a responder
/// knows, computed once. These are as secret as the responder's private key: with one of them
/// and a captured message, anyone can forge messages from that initiator to this responder. The
/// map is sized before it is filled (so it never reallocates and leaves stale copies behind)
/// and every secret is wiped when the map is dropped or [`zeroize`](Zeroize::zeroize)d.
#[derive(Default)]
pub struct StaticSecrets {
    /// `None` for an initiator key that is a low-order point: its messages are refused with
    /// [`NoiseError::LowOrderPoint`], exactly as without the cache.
    secrets: HashMap<PublicKey, Option<Zeroizing<[u8; 32]>>>,
}

impl StaticSecrets {
    /// Computes `ss` for each of `initiators`, taking it from `reuse` when that holds it (the
    /// caller guarantees `reuse` was computed with the same responder key).
    fn compute(
        responder: &PrivateKey,
        initiators: impl IntoIterator<Item = PublicKey>,
        reuse: Option<&StaticSecrets>,
    ) -> Self {
        let mut keys: Vec<PublicKey> = initiators.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut secrets = HashMap::with_capacity(keys.len());
        for key in keys {
            let secret = match reuse.and_then(|old| old.secrets.get(&key)) {
                Some(known) => known.clone(),
                None => dh(responder, key.as_bytes()).ok(),
            };
            secrets.insert(key, secret);
        }
        Self { secrets }
    }

    /// How many initiators are known.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

impl Zeroize for StaticSecrets {
    fn zeroize(&mut self) {
        for secret in self.secrets.values_mut().flatten() {
            secret.zeroize();
        }
        self.secrets.clear();
    }
}

impl Drop for StaticSecrets {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for StaticSecrets {}

impl std::fmt::Debug for StaticSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticSecrets({} initiators)", self.secrets.len())
    }
}

/// The responder's half of the handshake, with everything that depends only on its own key
/// computed once.
pub struct Responder {
    private: PrivateKey,
    /// The same key, for the per-message X25519 (see [`StaticKey`]).
    key: StaticKey,
    public: PublicKey,
    /// The symmetric state after the prologue and `rs` were mixed in: the same for every message.
    initial: SymmetricState,
    /// `None`: any initiator, `ss` computed per message (two DH). `Some`: only these, one DH.
    known: Option<StaticSecrets>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("public", &self.public)
            .field("known", &self.known)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// A responder that accepts any initiator and computes `ss` for each message (two DH).
    pub fn new(prologue: &[u8], private: PrivateKey) -> Self {
        let public = private.public_key();
        let initial = SymmetricState::new(prologue, &public);
        Self {
            key: StaticKey::new(&private),
            private,
            public,
            initial,
            known: None,
        }
    }

    /// The same responder, restricted to `initiators`, with their `ss` computed now (one DH
    /// each; reused from `previous` where it has them and was built with the same private key,
    /// so a reload of the same key set costs no DH). Messages then cost one DH, and one from
    /// any other key is refused with [`NoiseError::UnknownInitiator`] right after `es`.
    pub fn with_initiators(
        mut self,
        initiators: impl IntoIterator<Item = PublicKey>,
        previous: Option<&Responder>,
    ) -> Self {
        let reuse = previous
            .filter(|old| self.same_private_key(old))
            .and_then(|old| old.known.as_ref());
        self.known = Some(StaticSecrets::compute(&self.private, initiators, reuse));
        self
    }

    fn same_private_key(&self, other: &Responder) -> bool {
        bool::from(
            self.private
                .secret()
                .as_bytes()
                .ct_eq(other.private.secret().as_bytes()),
        )
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The precomputed secrets, if this responder was built with a list of initiators.
    pub fn known(&self) -> Option<&StaticSecrets> {
        self.known.as_ref()
    }

    /// Reads the single handshake message. Costs one X25519 when built with known
    /// initiators (and then refuses unknown ones after it), two otherwise.
    pub fn read(&self, message: &[u8]) -> Result<Opened, NoiseError> {
        if message.len() < OVERHEAD {
            return Err(NoiseError::Truncated);
        }
        let mut state = self.initial.clone();
        let (ephemeral, rest) = message.split_at(EPHEMERAL_LEN);
        let (encrypted_static, encrypted_payload) = rest.split_at(ENCRYPTED_STATIC_LEN);
        let mut ephemeral_bytes = [0u8; 32];
        ephemeral_bytes.copy_from_slice(ephemeral);
        state.mix_hash(&ephemeral_bytes);
        state.mix_key(&*self.key.dh(&ephemeral_bytes)?);
        let mut initiator = [0u8; 32];
        state.decrypt_and_hash_into(encrypted_static, &mut initiator)?;
        let initiator = PublicKey(initiator);
        match &self.known {
            None => state.mix_key(&*self.key.dh(initiator.as_bytes())?),
            Some(known) => match known.secrets.get(&initiator) {
                None => return Err(NoiseError::UnknownInitiator(initiator)),
                Some(None) => return Err(NoiseError::LowOrderPoint),
                Some(Some(ss)) => state.mix_key(ss),
            },
        }
        let payload = state.decrypt_and_hash(encrypted_payload)?;
        ephemeral_bytes.zeroize();
        Ok(Opened { initiator, payload })
    }
}

/// Reads the single handshake message as a responder that accepts any initiator (two X25519
/// operations). The daemon uses a [`Responder`] built once instead.
pub fn read_message(
    prologue: &[u8],
    responder: &PrivateKey,
    message: &[u8],
) -> Result<Opened, NoiseError> {
    Responder::new(prologue, responder.clone()).read(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROLOGUE: &[u8] = b"test prologue";

    fn keys() -> (PrivateKey, PrivateKey, PrivateKey) {
        (
            PrivateKey::from_bytes([1u8; 32]),
            PrivateKey::from_bytes([2u8; 32]),
            PrivateKey::from_bytes([3u8; 32]),
        )
    }

    #[test]
    fn round_trip() {
        let (client, server, ephemeral) = keys();
        let mut message = Vec::new();
        write_message(
            PROLOGUE,
            &client,
            &ephemeral,
            &server.public_key(),
            b"hello",
            &mut message,
        )
        .unwrap();
        assert_eq!(message.len(), OVERHEAD + 5);
        let opened = read_message(PROLOGUE, &server, &message).unwrap();
        assert_eq!(opened.initiator, client.public_key());
        assert_eq!(opened.payload.as_slice(), b"hello");
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let (client, server, ephemeral) = keys();
        let mut message = Vec::new();
        write_message(
            PROLOGUE,
            &client,
            &ephemeral,
            &server.public_key(),
            b"x",
            &mut message,
        )
        .unwrap();
        for bit in 0..message.len() * 8 {
            let mut bad = message.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(read_message(PROLOGUE, &server, &bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn wrong_server_or_prologue_is_refused() {
        let (client, server, ephemeral) = keys();
        let other = PrivateKey::from_bytes([4u8; 32]);
        let mut message = Vec::new();
        write_message(
            PROLOGUE,
            &client,
            &ephemeral,
            &other.public_key(),
            b"x",
            &mut message,
        )
        .unwrap();
        assert_eq!(
            read_message(PROLOGUE, &server, &message).unwrap_err(),
            NoiseError::Decrypt
        );
        let mut message = Vec::new();
        write_message(
            PROLOGUE,
            &client,
            &ephemeral,
            &server.public_key(),
            b"x",
            &mut message,
        )
        .unwrap();
        assert_eq!(
            read_message(b"other", &server, &message).unwrap_err(),
            NoiseError::Decrypt
        );
    }

    #[test]
    fn low_order_ephemeral_is_refused_before_decryption() {
        let (_, server, _) = keys();
        let message = vec![0u8; OVERHEAD + 4];
        assert_eq!(
            read_message(PROLOGUE, &server, &message).unwrap_err(),
            NoiseError::LowOrderPoint
        );
    }

    /// The points of small order on Curve25519 and their non-canonical encodings (the list
    /// libsodium and BoringSSL refuse): X25519 with any of them is all zero.
    const LOW_ORDER: [[u8; 32]; 7] = {
        let mut points = [[0u8; 32]; 7];
        points[1][0] = 1;
        points[2] = [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ];
        points[3] = [
            0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83,
            0xef, 0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd,
            0xd0, 0x9f, 0x11, 0x57,
        ];
        // p - 1, p, p + 1 (p = 2^255 - 19: little-endian ec/ed/ee, ff .. ff, 7f).
        let mut k = 0;
        while k < 3 {
            let mut near_p = [0xffu8; 32];
            near_p[0] = 0xec + k as u8;
            near_p[31] = 0x7f;
            points[4 + k] = near_p;
            k += 1;
        }
        points
    };

    proptest::proptest! {
        /// The responder's per-message X25519 (aws-lc in the daemon's build, dalek otherwise)
        /// gives x25519-dalek's bytes for any key and any peer, and refuses exactly what
        /// dalek refuses: every low-order point, with its high bit set or not.
        #[test]
        fn the_responders_dh_is_x25519_daleks(
            private in proptest::array::uniform32(proptest::num::u8::ANY),
            public in proptest::array::uniform32(proptest::num::u8::ANY),
            low in 0usize..7,
            high_bit in proptest::bool::ANY,
        ) {
            let private = PrivateKey::from_bytes(private);
            let key = StaticKey::new(&private);
            proptest::prop_assert_eq!(
                key.dh(&public).map(|k| *k),
                dh(&private, &public).map(|k| *k)
            );
            let mut point = LOW_ORDER[low];
            if high_bit {
                point[31] |= 0x80;
            }
            proptest::prop_assert_eq!(key.dh(&point).map(|k| *k), Err(NoiseError::LowOrderPoint));
            proptest::prop_assert_eq!(dh(&private, &point).map(|k| *k), Err(NoiseError::LowOrderPoint));
        }
    }

    /// Fixed points the random ones above never hit: the non-canonical encodings p + 2 to
    /// p + 18 (and the same with the high bit set) give dalek's result, and RFC 7748's
    /// test vector (section 5.2) comes out right.
    #[test]
    fn the_responders_dh_agrees_on_non_canonical_points_and_rfc_7748() {
        let private = PrivateKey::from_bytes([0x42; 32]);
        let key = StaticKey::new(&private);
        for offset in 2u8..=18 {
            // p = 2^255 - 19: little-endian 0xed, 0xff ... 0x7f; p + k adds to the low byte.
            let mut point = [0xffu8; 32];
            point[0] = 0xed + offset;
            point[31] = 0x7f;
            for high_bit in [false, true] {
                if high_bit {
                    point[31] |= 0x80;
                }
                assert_eq!(
                    key.dh(&point).map(|k| *k),
                    dh(&private, &point).map(|k| *k),
                    "p + {offset}, high bit {high_bit}"
                );
            }
        }
        let scalar: [u8; 32] = [
            0xa5, 0x46, 0xe3, 0x6b, 0xf0, 0x52, 0x7c, 0x9d, 0x3b, 0x16, 0x15, 0x4b, 0x82, 0x46,
            0x5e, 0xdd, 0x62, 0x14, 0x4c, 0x0a, 0xc1, 0xfc, 0x5a, 0x18, 0x50, 0x6a, 0x22, 0x44,
            0xba, 0x44, 0x9a, 0xc4,
        ];
        let u: [u8; 32] = [
            0xe6, 0xdb, 0x68, 0x67, 0x58, 0x30, 0x30, 0xdb, 0x35, 0x94, 0xc1, 0xa4, 0x24, 0xb1,
            0x5f, 0x7c, 0x72, 0x66, 0x24, 0xec, 0x26, 0xb3, 0x35, 0x3b, 0x10, 0xa9, 0x03, 0xa6,
            0xd0, 0xab, 0x1c, 0x4c,
        ];
        let rfc = StaticKey::new(&PrivateKey::from_bytes(scalar));
        assert_eq!(
            *rfc.dh(&u).unwrap(),
            [
                0xc3, 0xda, 0x55, 0x37, 0x9d, 0xe9, 0xc6, 0x90, 0x8e, 0x94, 0xea, 0x4d, 0xf2, 0x8d,
                0x08, 0x4f, 0x32, 0xec, 0xcf, 0x03, 0x49, 0x1c, 0x71, 0xf7, 0x54, 0xb4, 0x07, 0x55,
                0x77, 0xa2, 0x85, 0x52,
            ]
        );
    }

    /// The `snow` crate is the oracle: same pattern, same prologue, messages decrypt both ways.
    #[test]
    fn interoperates_with_snow_both_ways() {
        let (client, server, ephemeral) = keys();
        let params: snow::params::NoiseParams = "Noise_X_25519_ChaChaPoly_BLAKE2s".parse().unwrap();

        // snow writes, we read.
        let client_raw = [1u8; 32];
        let mut initiator = snow::Builder::new(params.clone())
            .local_private_key(&client_raw)
            .remote_public_key(server.public_key().as_bytes())
            .prologue(PROLOGUE)
            .build_initiator()
            .unwrap();
        let mut buf = [0u8; 256];
        let len = initiator.write_message(b"from snow", &mut buf).unwrap();
        let opened = read_message(PROLOGUE, &server, &buf[..len]).unwrap();
        assert_eq!(opened.payload.as_slice(), b"from snow");
        assert_eq!(opened.initiator, client.public_key());
        // And the responder with precomputed `ss` reads it the same.
        let cached =
            Responder::new(PROLOGUE, server.clone()).with_initiators([client.public_key()], None);
        let opened = cached.read(&buf[..len]).unwrap();
        assert_eq!(opened.payload.as_slice(), b"from snow");
        assert_eq!(opened.initiator, client.public_key());

        // We write, snow reads.
        let mut message = Vec::new();
        write_message(
            PROLOGUE,
            &client,
            &ephemeral,
            &server.public_key(),
            b"from us",
            &mut message,
        )
        .unwrap();
        let mut responder = snow::Builder::new(params)
            .local_private_key(&[2u8; 32])
            .prologue(PROLOGUE)
            .build_responder()
            .unwrap();
        let len = responder.read_message(&message, &mut buf).unwrap();
        assert_eq!(&buf[..len], b"from us");
        assert_eq!(
            responder.get_remote_static().unwrap(),
            client.public_key().as_bytes()
        );
    }

    fn dh_count() -> u64 {
        DH_COUNT.with(|count| count.get())
    }

    fn message_from(client: &PrivateKey, ephemeral: &PrivateKey, server: &PrivateKey) -> Vec<u8> {
        let mut message = Vec::new();
        write_message(
            PROLOGUE,
            client,
            ephemeral,
            &server.public_key(),
            b"payload",
            &mut message,
        )
        .unwrap();
        message
    }

    /// Runs `f` and returns its result with the number of X25519 operations it did.
    fn counting<T>(f: impl FnOnce() -> T) -> (T, u64) {
        let before = dh_count();
        let out = f();
        (out, dh_count() - before)
    }

    #[test]
    fn known_initiator_costs_one_dh_and_opens_the_same() {
        let (client, server, ephemeral) = keys();
        let message = message_from(&client, &ephemeral, &server);
        let plain = Responder::new(PROLOGUE, server.clone());
        let (uncached, uncached_dh) = counting(|| plain.read(&message).unwrap());
        assert_eq!(uncached_dh, 2);
        let cached = Responder::new(PROLOGUE, server).with_initiators([client.public_key()], None);
        let (opened, cached_dh) = counting(|| cached.read(&message).unwrap());
        assert_eq!(cached_dh, 1);
        assert_eq!(opened.initiator, uncached.initiator);
        assert_eq!(opened.payload, uncached.payload);
    }

    #[test]
    fn unknown_initiator_is_refused_after_one_dh() {
        let (client, server, ephemeral) = keys();
        let message = message_from(&client, &ephemeral, &server);
        let other = PrivateKey::from_bytes([5u8; 32]).public_key();
        let cached = Responder::new(PROLOGUE, server.clone()).with_initiators([other], None);
        let (result, spent) = counting(|| cached.read(&message));
        assert_eq!(
            result.unwrap_err(),
            NoiseError::UnknownInitiator(client.public_key())
        );
        assert_eq!(spent, 1);
        // An empty list is a list: nobody is known.
        let nobody = Responder::new(PROLOGUE, server).with_initiators([], None);
        assert_eq!(
            nobody.read(&message).unwrap_err(),
            NoiseError::UnknownInitiator(client.public_key())
        );
    }

    #[test]
    fn cached_and_uncached_agree_on_every_flipped_bit() {
        let (client, server, ephemeral) = keys();
        let message = message_from(&client, &ephemeral, &server);
        let plain = Responder::new(PROLOGUE, server.clone());
        let cached = Responder::new(PROLOGUE, server).with_initiators([client.public_key()], None);
        for bit in 0..message.len() * 8 {
            let mut bad = message.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let a = plain.read(&bad).map(|o| o.initiator);
            let b = cached.read(&bad).map(|o| o.initiator);
            assert!(b.is_err(), "bit {bit}");
            assert_eq!(a, b, "bit {bit}");
        }
    }

    #[test]
    fn low_order_initiator_key_is_refused_the_same_way_with_or_without_the_cache() {
        let (_, server, ephemeral) = keys();
        // A low-order point as the client static key (an order-8 point; all-zero is another).
        let low_order: [u8; 32] = [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ];
        // Hand-build `e, es, s` with that static key (write_message would need its private key).
        let mut state = SymmetricState::new(PROLOGUE, &server.public_key());
        let mut message = ephemeral.public_key().as_bytes().to_vec();
        state.mix_hash(ephemeral.public_key().as_bytes());
        state.mix_key(&dh(&ephemeral, server.public_key().as_bytes()).unwrap());
        state.encrypt_and_hash(&low_order, &mut message);
        message.extend_from_slice(&[0u8; TAG_LEN + 8]);
        let plain = Responder::new(PROLOGUE, server.clone());
        let cached = Responder::new(PROLOGUE, server).with_initiators([PublicKey(low_order)], None);
        assert_eq!(plain.read(&message).unwrap_err(), NoiseError::LowOrderPoint);
        assert_eq!(
            cached.read(&message).unwrap_err(),
            NoiseError::LowOrderPoint
        );
    }

    #[test]
    fn rebuilding_with_the_same_key_reuses_secrets_and_a_new_key_does_not() {
        let (client, server, ephemeral) = keys();
        let others: Vec<PublicKey> = (10u8..20)
            .map(|i| PrivateKey::from_bytes([i; 32]).public_key())
            .collect();
        let (old, spent) = counting(|| {
            Responder::new(PROLOGUE, server.clone())
                .with_initiators(others.iter().copied().chain([client.public_key()]), None)
        });
        assert_eq!(spent, 11);
        // Same key, one client added: one DH.
        let added = PrivateKey::from_bytes([30u8; 32]).public_key();
        let (new, spent) = counting(|| {
            Responder::new(PROLOGUE, server.clone()).with_initiators(
                others.iter().copied().chain([client.public_key(), added]),
                Some(&old),
            )
        });
        assert_eq!(spent, 1);
        assert_eq!(new.known().unwrap().len(), 12);
        let message = message_from(&client, &ephemeral, &server);
        assert_eq!(new.read(&message).unwrap().initiator, client.public_key());
        // A removed client is gone.
        let without =
            Responder::new(PROLOGUE, server).with_initiators(others.iter().copied(), Some(&new));
        assert!(matches!(
            without.read(&message),
            Err(NoiseError::UnknownInitiator(_))
        ));
        // A new server key: nothing is reused (the old secrets would be wrong).
        let rekeyed = PrivateKey::from_bytes([40u8; 32]);
        let (fresh, spent) = counting(|| {
            Responder::new(PROLOGUE, rekeyed.clone())
                .with_initiators([client.public_key()], Some(&new))
        });
        assert_eq!(spent, 1);
        let message = message_from(&client, &ephemeral, &rekeyed);
        assert_eq!(fresh.read(&message).unwrap().initiator, client.public_key());
    }

    #[test]
    fn the_secret_cache_is_wiped() {
        fn zeroized_on_drop<T: ZeroizeOnDrop>() {}
        zeroized_on_drop::<StaticSecrets>();
        let (client, server, _) = keys();
        let mut secrets = StaticSecrets::compute(&server, [client.public_key()], None);
        assert_eq!(secrets.len(), 1);
        secrets.zeroize();
        assert!(secrets.is_empty());
        // And the debug form never shows a secret.
        let secrets = StaticSecrets::compute(&server, [client.public_key()], None);
        assert_eq!(format!("{secrets:?}"), "StaticSecrets(1 initiators)");
    }
}
