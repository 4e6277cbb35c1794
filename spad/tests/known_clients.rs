//! The pipeline's server knows the configured client keys: a key that is not configured is
//! refused as `unknown_client` (after one X25519), its replays are dropped before any
//! public-key work, and a reload that adds or removes a client changes who gets in.
#![allow(clippy::unwrap_used)]

use spa_shared::keys::PrivateKey;
use spa_shared::packet::Server;
use spa_shared::payload::{Kind, Request};
use spad::capture::Received;
use spad::clock::ManualClock;
use spad::config::Config;
use spad::daemon::Pipeline;
use spad::firewall::memory::Memory;
use spad::refusal::Refusal;

const NOW: u64 = 1_763_726_400_000_000;
const SERVER: [u8; 32] = [2; 32];

fn config(dir: &std::path::Path, clients: &[(&str, &PrivateKey)]) -> Config {
    let mut text = format!(
        "[server]\nprivate-key = \"k\"\nstate-dir = \"{}\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n",
        dir.display()
    );
    for (name, key) in clients {
        text.push_str(&format!(
            "[clients.{name}]\npublic-key = \"{}\"\nservices = [\"ssh\"]\n",
            key.public_key()
        ));
    }
    Config::parse(&dir.join("spad.toml"), &text).unwrap()
}

fn packet(client: &PrivateKey, timestamp: u64) -> Vec<u8> {
    let request = Request {
        kind: Kind::Open,
        timestamp,
        nonce: [7; 16],
        duration_secs: 0,
        address: None,
        services: vec!["ssh".into()],
    };
    let server = PrivateKey::from_bytes(SERVER).public_key();
    spa_shared::packet::seal(&mut rand_core::OsRng, client, &server, &request).unwrap()
}

fn udp<'a>(payload: &'a [u8], source: &str) -> Received<'a> {
    Received::Udp {
        source: source.parse().unwrap(),
        source_port: 40000,
        port: 62201,
        payload,
    }
}

#[test]
fn unknown_keys_are_refused_by_reason_and_a_reload_changes_who_is_known() {
    let dir = std::env::temp_dir().join(format!("spad-known-clients-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let clock = ManualClock::new(NOW);
    let alice = PrivateKey::from_bytes([1; 32]);
    let bob = PrivateKey::from_bytes([3; 32]);
    let mut p = Pipeline::new(
        config(&dir, &[("alice", &alice)]),
        Server::new(PrivateKey::from_bytes(SERVER)),
        Box::new(Memory::default()),
        &clock,
    )
    .unwrap();
    p.log.refusals_per_second = 0;
    assert_eq!(
        p.server().known_clients(),
        Some(1),
        "the server precomputed the one client's secret"
    );

    let from_bob = packet(&bob, NOW);
    p.handle(&udp(&from_bob, "198.51.100.7"));
    assert_eq!(p.stats.refusals.get(Refusal::UnknownClient), 1);
    assert_eq!(p.stats.refusals.get(Refusal::Handshake), 0);
    p.handle(&udp(&from_bob, "198.51.100.8"));
    assert_eq!(
        p.stats.refusals.get(Refusal::RecentPacket),
        1,
        "its replay is dropped before the handshake"
    );
    p.handle(&udp(&packet(&alice, NOW), "198.51.100.9"));
    assert_eq!(p.stats.granted, 1);

    // Reload: bob added, alice removed, same server key.
    p.reload(
        config(&dir, &[("bob", &bob)]),
        Server::new(PrivateKey::from_bytes(SERVER)),
    )
    .unwrap();
    assert_eq!(p.server().known_clients(), Some(1));
    p.handle(&udp(&packet(&bob, NOW + 1), "198.51.100.10"));
    assert_eq!(p.stats.granted, 2, "bob is known after the reload");
    p.handle(&udp(&packet(&alice, NOW + 2), "198.51.100.11"));
    assert_eq!(
        p.stats.refusals.get(Refusal::UnknownClient),
        2,
        "alice is not"
    );

    // Reload with a new server key: packets sealed for the old key are refused by mac1, and
    // bob's packets to the new key open (the old key's secrets were not reused).
    let new_key = PrivateKey::from_bytes([4; 32]);
    p.reload(config(&dir, &[("bob", &bob)]), Server::new(new_key.clone()))
        .unwrap();
    p.handle(&udp(&packet(&bob, NOW + 3), "198.51.100.12"));
    assert_eq!(p.stats.refusals.get(Refusal::Mac1), 1);
    let request = Request {
        kind: Kind::Open,
        timestamp: NOW + 4,
        nonce: [8; 16],
        duration_secs: 0,
        address: None,
        services: vec!["ssh".into()],
    };
    let to_new =
        spa_shared::packet::seal(&mut rand_core::OsRng, &bob, &new_key.public_key(), &request)
            .unwrap();
    p.handle(&udp(&to_new, "198.51.100.13"));
    assert_eq!(p.stats.granted, 3, "bob opens with the new server key");
    assert_eq!(p.stats.refused, p.stats.refusals.total());
    drop(p);
    std::fs::remove_dir_all(dir).unwrap();
}
