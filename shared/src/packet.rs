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
//!
//! A server built [`with_clients`](Server::with_clients) holds the static-static secret of
//! each configured client (see [`noise::StaticSecrets`]): a valid packet costs one X25519, and
//! one from a key that is not configured is refused with [`OpenError::UnknownClient`] after
//! that one X25519, before the second.

use rand_core::{CryptoRng, RngCore};

use crate::keys::{PrivateKey, PublicKey};
use crate::mac::{PrecheckKey, MAC_LEN};
use crate::noise::{self, NoiseError, Responder, OVERHEAD};
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
    Handshake(NoiseError),
    /// The client key decrypted, but the server was built with a client list and this key is
    /// not on it (one X25519 spent, not two). The text is the one logged since before the
    /// list existed.
    #[error("unknown client key {0}")]
    UnknownClient(PublicKey),
    #[error("bad payload: {0}")]
    Payload(#[from] PayloadError),
}

impl From<NoiseError> for OpenError {
    fn from(e: NoiseError) -> Self {
        match e {
            NoiseError::UnknownInitiator(key) => OpenError::UnknownClient(key),
            other => OpenError::Handshake(other),
        }
    }
}

/// A request that passed every cryptographic check, with the client's static key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub client: PublicKey,
    pub request: Request,
}

/// The server side: owns its private key (inside the Noise responder), the derived pre-check
/// key and, when built with a client list, each client's precomputed static-static secret.
#[derive(Debug)]
pub struct Server {
    responder: Responder,
    precheck: PrecheckKey,
}

impl Server {
    /// A server that opens packets from any client key (two X25519 per packet).
    pub fn new(private: PrivateKey) -> Self {
        let responder = Responder::new(PROLOGUE_V1, private);
        let precheck = PrecheckKey::new(&responder.public_key());
        Self {
            responder,
            precheck,
        }
    }

    /// A server that opens packets only from `clients`, one X25519 per packet; costs one
    /// X25519 per client now.
    pub fn with_clients(private: PrivateKey, clients: impl IntoIterator<Item = PublicKey>) -> Self {
        Self::new(private).restricted_to(clients, None)
    }

    /// This server restricted to `clients` (replacing any earlier list). Secrets `previous`
    /// already holds are reused when it has the same private key, so reloading a config of
    /// 10,000 clients with one client added costs one X25519, not 10,000.
    pub fn restricted_to(
        self,
        clients: impl IntoIterator<Item = PublicKey>,
        previous: Option<&Server>,
    ) -> Self {
        Self {
            responder: self
                .responder
                .with_initiators(clients, previous.map(|p| &p.responder)),
            precheck: self.precheck,
        }
    }

    /// How many client keys this server knows (`None`: built without a list, opens any key).
    pub fn known_clients(&self) -> Option<usize> {
        self.responder.known().map(|k| k.len())
    }

    pub fn public_key(&self) -> PublicKey {
        self.responder.public_key()
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
        let opened = self.responder.read(body)?;
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

    /// Bytes no client sealed, with a valid mac1: they get past the pre-check only.
    fn behind_a_valid_mac1(server: &Server) -> Vec<u8> {
        let mut forged = vec![0x42u8; MIN_LEN - MAC_LEN];
        forged[..32].copy_from_slice(PrivateKey::from_bytes([8; 32]).public_key().as_bytes());
        let tag = PrecheckKey::new(&server.public_key()).tag(&forged);
        forged.extend_from_slice(&tag);
        forged
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
        let forged = behind_a_valid_mac1(&server);
        assert_eq!(
            server.open(&forged).unwrap_err(),
            OpenError::Handshake(NoiseError::Decrypt)
        );
    }

    #[test]
    fn unknown_client_is_refused_with_its_own_reason() {
        let known = PrivateKey::from_bytes([1; 32]);
        let stranger = PrivateKey::from_bytes([7; 32]);
        let server = Server::with_clients(PrivateKey::from_bytes([2; 32]), [known.public_key()]);
        assert_eq!(server.known_clients(), Some(1));
        let packet = seal(
            &mut rand_core::OsRng,
            &stranger,
            &server.public_key(),
            &request(),
        )
        .unwrap();
        assert_eq!(
            server.open(&packet).unwrap_err(),
            OpenError::UnknownClient(stranger.public_key())
        );
        assert_eq!(
            server.open(&packet).unwrap_err().to_string(),
            format!("unknown client key {}", stranger.public_key())
        );
        // Without a list the same packet opens (today's behaviour for `Server::new`).
        let any = Server::new(PrivateKey::from_bytes([2; 32]));
        assert_eq!(any.known_clients(), None);
        assert_eq!(any.open(&packet).unwrap().client, stranger.public_key());
        // Forged bytes behind a valid mac1 still fail as a handshake, not as an unknown key.
        let forged = behind_a_valid_mac1(&server);
        assert_eq!(
            server.open(&forged).unwrap_err(),
            OpenError::Handshake(NoiseError::Decrypt)
        );
    }

    #[test]
    fn restricting_again_replaces_the_list() {
        let a = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([3; 32]);
        let first = Server::with_clients(PrivateKey::from_bytes([2; 32]), [a.public_key()]);
        let second = Server::new(PrivateKey::from_bytes([2; 32]))
            .restricted_to([b.public_key()], Some(&first));
        let from_a = seal(&mut rand_core::OsRng, &a, &second.public_key(), &request()).unwrap();
        let from_b = seal(&mut rand_core::OsRng, &b, &second.public_key(), &request()).unwrap();
        assert!(matches!(
            second.open(&from_a),
            Err(OpenError::UnknownClient(_))
        ));
        assert_eq!(second.open(&from_b).unwrap().client, b.public_key());
    }

    /// Re-tags `body` with a valid mac1 so a mutation reaches the handshake.
    fn with_mac1(server: &PublicKey, mut body: Vec<u8>) -> Vec<u8> {
        let tag = PrecheckKey::new(server).tag(&body);
        body.extend_from_slice(&tag);
        body
    }

    proptest! {
        #[test]
        fn open_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
            let server = Server::new(PrivateKey::from_bytes([2; 32]));
            let _ = server.open(&bytes);
            let cached = Server::with_clients(
                PrivateKey::from_bytes([2; 32]),
                [PrivateKey::from_bytes([1; 32]).public_key()],
            );
            let _ = cached.open(&bytes);
        }

        /// Cached and uncached open give the same result for any packet from a configured
        /// client, mutated or not (mac1 recomputed so the mutation reaches the handshake).
        #[test]
        fn cached_and_uncached_open_agree(
            client_index in 0usize..4,
            timestamp in any::<u64>(),
            nonce in any::<[u8; 16]>(),
            flip in prop::option::of((0usize..MIN_LEN - MAC_LEN, 0u8..8)),
        ) {
            let clients: Vec<PrivateKey> =
                (1u8..5).map(|i| PrivateKey::from_bytes([i * 16; 32])).collect();
            let key = PrivateKey::from_bytes([2; 32]);
            let plain = Server::new(key.clone());
            let cached = Server::with_clients(key, clients.iter().map(|c| c.public_key()));
            let request = Request { timestamp, nonce, ..request() };
            let mut packet = seal(
                &mut rand_core::OsRng,
                &clients[client_index],
                &plain.public_key(),
                &request,
            )
            .unwrap();
            if let Some((byte, bit)) = flip {
                packet.truncate(packet.len() - MAC_LEN);
                packet[byte] ^= 1 << bit;
                packet = with_mac1(&plain.public_key(), packet);
            }
            let a = plain.open(&packet);
            let b = cached.open(&packet);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.is_ok(), flip.is_none());
        }
    }
}
