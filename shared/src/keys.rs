//! X25519 key pairs and their WireGuard-style base64 text form (44 characters, one line).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand_core::{CryptoRng, RngCore};
use subtle::ConstantTimeEq;
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

/// Why a key text was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not valid base64 (expected 44 characters like `spad genkey` prints)")]
    Base64,
    #[error("decodes to {0} bytes, an X25519 key is 32")]
    Length(usize),
    #[error("is the all-zero key, which no key generator produces")]
    Zero,
}

fn decode32(text: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let bytes = Zeroizing::new(B64.decode(text.trim()).map_err(|_| KeyError::Base64)?);
    let mut out = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(KeyError::Length(bytes.len()));
    }
    out.copy_from_slice(&bytes);
    if bool::from(out.ct_eq(&[0u8; 32])) {
        return Err(KeyError::Zero);
    }
    Ok(out)
}

/// A static X25519 private key. Zeroized on drop; never printed by `Debug`.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(public={})", self.public_key())
    }
}

impl PrivateKey {
    /// A fresh key from a cryptographic RNG.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        Self(StaticSecret::from(*bytes))
    }

    /// A key from its raw 32 bytes (clamping happens inside X25519).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// Parses the base64 text form (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Ok(Self(StaticSecret::from(*decode32(text)?)))
    }

    /// The base64 text form, in a buffer that is wiped when dropped.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.0.as_bytes()))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.0
    }
}

/// An X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses the base64 text form (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Ok(Self(*decode32(text)?))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_public_derivation() {
        let key = PrivateKey::from_bytes([7u8; 32]);
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        let again = PrivateKey::from_base64(&format!("  {}\n", text.as_str())).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        let public = key.public_key();
        assert_eq!(PublicKey::from_base64(&public.to_string()).unwrap(), public);
    }

    #[test]
    fn bad_texts_are_typed_errors() {
        assert_eq!(
            PublicKey::from_base64("not base64!").unwrap_err(),
            KeyError::Base64
        );
        assert_eq!(
            PublicKey::from_base64("AAAA").unwrap_err(),
            KeyError::Length(3)
        );
        let zero = B64.encode([0u8; 32]);
        assert_eq!(PublicKey::from_base64(&zero).unwrap_err(), KeyError::Zero);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = PrivateKey::from_bytes([9u8; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(key.to_base64().as_str()));
    }
}
