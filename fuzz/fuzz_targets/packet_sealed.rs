//! The packet path past the AEAD layer: the fuzzer's bytes are the *plaintext* of a packet
//! (a mode byte, optionally 32 bytes of claimed static key, then the request payload), sealed
//! here exactly as a client would with a fixed test server key and a fixed ephemeral, then
//! given a valid mac1.
//! So every stage after decryption (the `ss` Diffie-Hellman with a hostile static key, the
//! payload decryption, and request decoding) sees the fuzzer's bytes.
//!
//! The sealing is the Noise `X` initiator written against the primitives, with everything
//! that depends only on the fixed keys computed once. Knowing the server's private key (a
//! test key) lets it compute `ss` for any claimed static key. A self-test at start-up checks
//! that a real request sealed this way opens, so the target cannot silently stop at the AEAD.
//!
//! Every packet is also opened by a server built with the client list (the daemon's, with
//! `ss` precomputed): for the configured key it must give exactly the same result, for any
//! other key `UnknownClient` with that key.
#![no_main]
use std::sync::OnceLock;

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Mac, SimpleHmac};
use libfuzzer_sys::fuzz_target;
use spa_shared::keys::PrivateKey;
use spa_shared::mac::PrecheckKey;
use spa_shared::noise::PROTOCOL_NAME;
use spa_shared::packet::{OpenError, Server, PROLOGUE_V1};
use spa_shared::payload::{Kind, Request};

const SERVER_KEY: [u8; 32] = [2; 32];
const EPHEMERAL_KEY: [u8; 32] = [7; 32];
const CLIENT_KEY: [u8; 32] = [1; 32];

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Blake2s256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <SimpleHmac<Blake2s256> as Mac>::new_from_slice(key).expect("any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn hkdf2(chaining_key: &[u8; 32], ikm: &[u8]) -> ([u8; 32], [u8; 32]) {
    let temp = hmac(chaining_key, &[ikm]);
    let first = hmac(&temp, &[&[1u8]]);
    let second = hmac(&temp, &[&first, &[2u8]]);
    (first, second)
}

/// `plaintext || tag` under `key` with nonce 0 and `ad`, appended to `out`.
fn seal(key: &[u8; 32], ad: &[u8; 32], plaintext: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag = ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt_in_place_detached(&Nonce::default(), ad, &mut out[start..])
        .expect("small plaintext");
    out.extend_from_slice(&tag);
}

/// The fixed part of every message: the state after `e, es`.
struct Sealer {
    server: Server,
    /// The same key, knowing only the configured client (one X25519 per packet).
    cached: Server,
    server_private: x25519_dalek::StaticSecret,
    mac1: PrecheckKey,
    ephemeral_public: [u8; 32],
    client_public: [u8; 32],
    client_ss: [u8; 32],
    chaining_key: [u8; 32],
    key: [u8; 32],
    hash: [u8; 32],
}

impl Sealer {
    fn new() -> Self {
        let server = Server::new(PrivateKey::from_bytes(SERVER_KEY));
        let server_public = *server.public_key().as_bytes();
        let server_private = x25519_dalek::StaticSecret::from(SERVER_KEY);
        let ephemeral = x25519_dalek::StaticSecret::from(EPHEMERAL_KEY);
        let ephemeral_public = x25519_dalek::PublicKey::from(&ephemeral).to_bytes();
        let mut h = hash(&[PROTOCOL_NAME, PROLOGUE_V1]);
        h = hash(&[&h, &server_public]);
        h = hash(&[&h, &ephemeral_public]);
        let es = ephemeral
            .diffie_hellman(&x25519_dalek::PublicKey::from(server_public))
            .to_bytes();
        let (chaining_key, key) = hkdf2(PROTOCOL_NAME, &es);
        let client_public = *PrivateKey::from_bytes(CLIENT_KEY).public_key().as_bytes();
        let client_ss = server_private
            .diffie_hellman(&x25519_dalek::PublicKey::from(client_public))
            .to_bytes();
        let cached = Server::with_clients(
            PrivateKey::from_bytes(SERVER_KEY),
            [PrivateKey::from_bytes(CLIENT_KEY).public_key()],
        );
        Self {
            cached,
            client_public,
            client_ss,
            mac1: PrecheckKey::new(&server.public_key()),
            server,
            server_private,
            ephemeral_public,
            chaining_key,
            key,
            hash: h,
        }
    }

    /// The whole datagram for a claimed static key and a payload.
    fn packet(&self, static_key: &[u8; 32], payload: &[u8]) -> Vec<u8> {
        // ss, computed from the server's side: DH(server private, claimed static).
        let ss = self
            .server_private
            .diffie_hellman(&x25519_dalek::PublicKey::from(*static_key))
            .to_bytes();
        self.packet_with_ss(static_key, &ss, payload)
    }

    /// [`Self::packet`] for the configured client key, whose `ss` is known in advance.
    fn packet_from_client(&self, payload: &[u8]) -> Vec<u8> {
        self.packet_with_ss(&self.client_public, &self.client_ss, payload)
    }

    fn packet_with_ss(&self, static_key: &[u8; 32], ss: &[u8; 32], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 48 + payload.len() + 32);
        out.extend_from_slice(&self.ephemeral_public);
        seal(&self.key, &self.hash, static_key, &mut out);
        let h = hash(&[&self.hash, &out[32..80]]);
        let (_, key) = hkdf2(&self.chaining_key, ss);
        seal(&key, &h, payload, &mut out);
        let tag = self.mac1.tag(&out);
        out.extend_from_slice(&tag);
        out
    }
}

fn sealer() -> &'static Sealer {
    static SEALER: OnceLock<Sealer> = OnceLock::new();
    SEALER.get_or_init(|| {
        let sealer = Sealer::new();
        // Self-test: a real request sealed this way opens to itself.
        let request = Request {
            kind: Kind::Open,
            timestamp: 1_763_700_000_000_000,
            nonce: [0x11; 16],
            duration_secs: 0,
            address: None,
            services: vec!["ssh".into()],
        };
        let client = PrivateKey::from_bytes(CLIENT_KEY).public_key();
        let payload = request.encode().unwrap();
        for packet in [
            sealer.packet(client.as_bytes(), &payload),
            sealer.packet_from_client(&payload),
        ] {
            let opened = sealer
                .server
                .open(&packet)
                .expect("the harness seals like a client");
            assert_eq!((&opened.client, &opened.request), (&client, &request));
        }
        sealer
    })
}

fuzz_target!(|data: &[u8]| {
    // First byte even: the configured client's key (its `ss` is precomputed, so the run is
    // cheaper) and the rest is the payload. Odd: the next 32 bytes are the claimed static key.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sealer = sealer();
    let (packet, claimed) = if mode & 1 == 0 {
        (sealer.packet_from_client(rest), sealer.client_public)
    } else {
        let Some((static_key, payload)) = rest.split_first_chunk::<32>() else {
            return;
        };
        (sealer.packet(static_key, payload), *static_key)
    };
    let plain = sealer.server.open(&packet);
    let cached = sealer.cached.open(&packet);
    if claimed == sealer.client_public || matches!(plain, Err(OpenError::Size(_))) {
        assert_eq!(plain, cached, "cached and computed ss disagree");
    } else {
        // Past the size check the harness's static key always decrypts (`es` is right).
        assert_eq!(
            cached,
            Err(OpenError::UnknownClient(spa_shared::keys::PublicKey(claimed)))
        );
    }
});
