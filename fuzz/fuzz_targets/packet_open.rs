//! The whole server-side packet path: size, mac1, handshake, payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spa_shared::keys::PrivateKey;
use spa_shared::packet::Server;

fuzz_target!(|data: &[u8]| {
    let server = Server::new(PrivateKey::from_bytes([2; 32]));
    let _ = server.open(data);
});
