//! The packet path past the pre-check: the fuzzer's bytes are the body of a packet and get a
//! valid mac1, so the handshake (ephemeral point, low-order check, static-key decryption) is
//! fuzzed with hostile input instead of stopping at mac1.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spa_shared::keys::PrivateKey;
use spa_shared::mac::PrecheckKey;
use spa_shared::packet::Server;

static SERVER: OnceLock<(Server, PrecheckKey)> = OnceLock::new();

fuzz_target!(|body: &[u8]| {
    let (server, mac1) = SERVER.get_or_init(|| {
        let server = Server::new(PrivateKey::from_bytes([2; 32]));
        let mac1 = PrecheckKey::new(&server.public_key());
        (server, mac1)
    });
    let mut packet = body.to_vec();
    packet.extend_from_slice(&mac1.tag(body));
    let _ = server.open(&packet);
});
