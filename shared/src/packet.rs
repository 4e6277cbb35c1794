//! The whole SPA datagram: `noise message || mac1`, and the two operations on it.
//!
//! ```text
//! 0    32  ephemeral X25519 public key (clear)
//! 32   48  client static public key, encrypted (+16 tag)
//! 80   n   request payload (see [`crate::payload`]), encrypted (+16 tag)
//! 96+n 16  mac1 = BLAKE2s-128 keyed by BLAKE2s(label || server public key)
//! ```
//!
//! [`Server::open`] checks the length, then mac1 (one hash), and only then does the X25519
//! work of the handshake; then it decodes the payload. Replay rules live in [`crate::replay`]
//! because they need state the caller owns.

use rand_core::{CryptoRng, RngCore};

use crate::keys::{PrivateKey, PublicKey};
use crate::mac::{PrecheckKey, MAC_LEN};
use crate::noise::{self, NoiseError, OVERHEAD};
use crate::payload::{PayloadError, Request};

/// Noise prologue of protocol v1: binds every handshake to this protocol and version.
pub const PROLOGUE_V1: &[u8] = b"spa-gateway v1";
/// Smallest possible valid packet: the shortest payload pads to 64 bytes, so 176 bytes.
pub const MIN_LEN: usize = OVERHEAD + 64 + MAC_LEN;
/// Largest packet the daemon will look at; anything bigger is garbage by definition.
pub const MAX_LEN: usize = 512;

/// Why a packet was dropped. Each is logged (and counted) with its own reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("wrong size ({0} bytes) for an SPA packet")]
    Size(usize),
    #[error("pre-check failed (not made with this server's public key)")]
    Precheck,
    #[error("handshake failed: {0}")]
    Handshake(#[from] NoiseError),
    #[error("bad payload: {0}")]
    Payload(#[from] PayloadError),
}

/// A request that passed every cryptographic check, with the client's static key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub client: PublicKey,
    pub request: Request,
}

/// The server side: owns its private key and the derived pre-check key.
#[derive(Debug)]
pub struct Server {
    private: PrivateKey,
    precheck: PrecheckKey,
}

impl Server {
    pub fn new(private: PrivateKey) -> Self {
        let precheck = PrecheckKey::new(&private.public_key());
        Self { private, precheck }
    }

    pub fn public_key(&self) -> PublicKey {
        self.private.public_key()
    }

    /// Only the cheap part: size and mac1. Useful for benchmarks and the capture fast path.
    pub fn precheck<'a>(&self, packet: &'a [u8]) -> Result<&'a [u8], OpenError> {
        if !(MIN_LEN..=MAX_LEN).contains(&packet.len()) {
            return Err(OpenError::Size(packet.len()));
        }
        self.precheck.verify(packet).ok_or(OpenError::Precheck)
    }

    /// Full check: size, mac1, handshake, payload decoding. Never panics on any input.
    pub fn open(&self, packet: &[u8]) -> Result<Authenticated, OpenError> {
        let body = self.precheck(packet)?;
        let opened = noise::read_message(PROLOGUE_V1, &self.private, body)?;
        let request = Request::decode(&opened.payload)?;
        Ok(Authenticated {
            client: opened.initiator,
            request,
        })
    }
}

/// Seals one request as a client. `rng` supplies the ephemeral key.
pub fn seal<R: RngCore + CryptoRng>(
    rng: &mut R,
    client: &PrivateKey,
    server: &PublicKey,
    request: &Request,
) -> Result<Vec<u8>, PayloadError> {
    let ephemeral = PrivateKey::generate(rng);
    seal_with_ephemeral(&ephemeral, client, server, request)
}

/// [`seal`] with a caller-chosen ephemeral key: for test vectors only.
pub fn seal_with_ephemeral(
    ephemeral: &PrivateKey,
    client: &PrivateKey,
    server: &PublicKey,
    request: &Request,
) -> Result<Vec<u8>, PayloadError> {
    let payload = zeroize::Zeroizing::new(request.encode()?);
    let mut packet = Vec::with_capacity(OVERHEAD + payload.len() + MAC_LEN);
    noise::write_message(
        PROLOGUE_V1,
        client,
        ephemeral,
        server,
        &payload,
        &mut packet,
    )
    .map_err(|_| PayloadError::Truncated)?;
    let tag = PrecheckKey::new(server).tag(&packet);
    packet.extend_from_slice(&tag);
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Kind;
    use proptest::prelude::*;

    fn request() -> Request {
        Request {
            kind: Kind::Open,
            timestamp: 1_763_700_000_000_000,
            nonce: [0x11; 16],
            duration_secs: 0,
            address: None,
            services: vec!["ssh".into()],
        }
    }

    #[test]
    fn seal_open_round_trip_and_size() {
        let client = PrivateKey::from_bytes([1; 32]);
        let server = Server::new(PrivateKey::from_bytes([2; 32]));
        let packet = seal(
            &mut rand_core::OsRng,
            &client,
            &server.public_key(),
            &request(),
        )
        .unwrap();
        assert_eq!(packet.len(), MIN_LEN);
        assert!(packet.len() < 512);
        let opened = server.open(&packet).unwrap();
        assert_eq!(opened.client, client.public_key());
        assert_eq!(opened.request, request());
    }

    #[test]
    fn refusal_reasons_are_distinct() {
        let client = PrivateKey::from_bytes([1; 32]);
        let server = Server::new(PrivateKey::from_bytes([2; 32]));
        let wrong_server = PrivateKey::from_bytes([3; 32]).public_key();
        assert_eq!(server.open(&[0u8; 10]).unwrap_err(), OpenError::Size(10));
        let packet = seal(&mut rand_core::OsRng, &client, &wrong_server, &request()).unwrap();
        assert_eq!(server.open(&packet).unwrap_err(), OpenError::Precheck);
        // A packet whose mac1 is right but whose handshake is not (someone who knows the public
        // key but not a client key): decryption fails after the DH work.
        let mut forged = vec![0x42u8; MIN_LEN - MAC_LEN];
        forged[..32].copy_from_slice(PrivateKey::from_bytes([8; 32]).public_key().as_bytes());
        let tag = PrecheckKey::new(&server.public_key()).tag(&forged);
        forged.extend_from_slice(&tag);
        assert_eq!(
            server.open(&forged).unwrap_err(),
            OpenError::Handshake(NoiseError::Decrypt)
        );
    }

    proptest! {
        #[test]
        fn open_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
            let server = Server::new(PrivateKey::from_bytes([2; 32]));
            let _ = server.open(&bytes);
        }
    }
}
