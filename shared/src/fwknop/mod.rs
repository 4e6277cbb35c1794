//! fwknop 2.x compatibility: the wire format of unmodified `fwknop` clients (Rijndael + HMAC).
//!
//! A fwknop SPA datagram is base64 text: the AES-256-CBC ciphertext in OpenSSL's salted format
//! (`Salted__` + 8-byte salt + ciphertext) with the constant `U2FsdGVkX1` base64 prefix and all
//! `=` padding stripped, followed directly by the base64 HMAC of that ciphertext text (prefix
//! restored). Inside is a colon-separated message (see [`message`]). This module only decodes:
//! [`wire`] checks shape, HMAC (constant time, **before** any decryption) and decrypts;
//! [`message`] parses and checks the inner digest. [`seal`] builds packets the same way the real
//! client does, for tests and property tests. No I/O, no clock: time is a parameter.
//!
//! The byte-level description, with what is refused and why, is in `docs/protocol.md`.

pub mod message;
pub mod wire;

pub use message::{Access, Message, MessageType, NatTarget, Proto};
pub use wire::{seal, HmacDigest, Keys, SealParams};

/// Why a datagram is not an acceptable fwknop packet. Each variant is one log reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwknopError {
    #[error("not fwknop data: {0}")]
    NotFwknop(&'static str),
    #[error("no configured fwknop client's HMAC matches (wrong HMAC key, altered packet, or a packet without HMAC)")]
    NoHmacMatch,
    #[error("packet has no HMAC; configure the client with --use-hmac and an HMAC key")]
    NoHmac,
    #[error("GPG-encrypted fwknop packets are not supported; move the client to Rijndael + HMAC keys (fwknop --key-gen)")]
    Gpg,
    #[error("decryption failed (wrong encryption key for this HMAC key, or legacy IV mode)")]
    Decrypt,
    #[error("malformed fwknop message: {0}")]
    Malformed(&'static str),
    #[error("inner digest mismatch")]
    Digest,
    #[error("command messages are never run (fwknop --server-cmd); spad only opens ports")]
    Command,
    #[error("server-auth field is not supported")]
    ServerAuth,
    #[error("unsupported protocol `{0}` in the access request; only tcp and udp can be opened")]
    Protocol(String),
    #[error("stale packet: timestamp {timestamp} is {age_secs}s from now, more than max-age {max_age_secs}s")]
    Stale {
        timestamp: u64,
        age_secs: u64,
        max_age_secs: u64,
    },
}

/// fwknop's timestamp rule: the packet's time (seconds) must be within `max_age_secs` of now,
/// in either direction (the client's clock may be ahead).
pub fn check_age(timestamp: u64, now_secs: u64, max_age_secs: u64) -> Result<(), FwknopError> {
    let age = now_secs.abs_diff(timestamp);
    if age > max_age_secs {
        return Err(FwknopError::Stale {
            timestamp,
            age_secs: age,
            max_age_secs,
        });
    }
    Ok(())
}

/// The replay identity of a datagram: SHA-256 of exactly the bytes received. The HMAC covers the
/// whole text and is compared as text, so no other byte string carries the same authenticated
/// packet.
pub fn replay_digest(datagram: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(datagram).into()
}

#[cfg(test)]
mod fixtures;
