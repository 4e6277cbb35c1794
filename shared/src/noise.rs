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

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Mac, SimpleHmac};
use zeroize::{Zeroize, Zeroizing};

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
        let key = self.key.as_ref().ok_or(NoiseError::Decrypt)?;
        let split = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(NoiseError::Truncated)?;
        let (body, tag) = ciphertext.split_at(split);
        let mut plain = Zeroizing::new(body.to_vec());
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        cipher
            .decrypt_in_place_detached(
                &self.nonce_bytes(),
                &self.handshake_hash,
                &mut plain,
                tag.into(),
            )
            .map_err(|_| NoiseError::Decrypt)?;
        self.mix_hash(ciphertext);
        self.nonce += 1;
        Ok(plain)
    }
}

fn dh(private: &PrivateKey, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, NoiseError> {
    let shared = private
        .secret()
        .diffie_hellman(&x25519_dalek::PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(NoiseError::LowOrderPoint);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
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

/// Reads the single handshake message as the responder. Costs two X25519 operations.
pub fn read_message(
    prologue: &[u8],
    responder: &PrivateKey,
    message: &[u8],
) -> Result<Opened, NoiseError> {
    if message.len() < OVERHEAD {
        return Err(NoiseError::Truncated);
    }
    let mut state = SymmetricState::new(prologue, &responder.public_key());
    let (ephemeral, rest) = message.split_at(EPHEMERAL_LEN);
    let (encrypted_static, encrypted_payload) = rest.split_at(ENCRYPTED_STATIC_LEN);
    let mut ephemeral_bytes = [0u8; 32];
    ephemeral_bytes.copy_from_slice(ephemeral);
    state.mix_hash(&ephemeral_bytes);
    state.mix_key(&*dh(responder, &ephemeral_bytes)?);
    let static_plain = state.decrypt_and_hash(encrypted_static)?;
    let mut initiator = [0u8; 32];
    initiator.copy_from_slice(&static_plain);
    state.mix_key(&*dh(responder, &initiator)?);
    let payload = state.decrypt_and_hash(encrypted_payload)?;
    ephemeral_bytes.zeroize();
    Ok(Opened {
        initiator: PublicKey(initiator),
        payload,
    })
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
}
