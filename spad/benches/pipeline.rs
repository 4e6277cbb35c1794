//! What the daemon spends per packet that it refuses, end to end through the pipeline (the
//! firewall is the in-memory one; the replay journal is a real file in a temporary directory):
//! a replay of a valid packet (dropped after mac1 by the memory of recent packets, before any
//! public-key work), garbage (dropped by mac1), and for scale a valid packet's handshake.
//! `cargo bench -p spad --bench pipeline`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use spa_shared::keys::PrivateKey;
use spa_shared::packet::{Server, MIN_LEN};
use spa_shared::payload::{Kind, Request};
use spad::capture::Received;
use spad::clock::{Clock, SystemClock};
use spad::config::Config;
use spad::daemon::Pipeline;
use spad::firewall::memory::Memory;

fn udp(payload: &[u8]) -> Received<'_> {
    Received::Udp {
        source: "198.51.100.7".parse().unwrap(),
        source_port: 40000,
        port: 62201,
        payload,
    }
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("spad-bench-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let client = PrivateKey::from_bytes([1; 32]);
    let text = format!(
        "[server]\nprivate-key = \"k\"\nstate-dir = \"{}\"\nhandshake-rate = 1000000000\nhandshake-burst = 1000000000\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n[clients.alice]\npublic-key = \"{}\"\nservices = [\"ssh\"]\n",
        dir.display(),
        client.public_key()
    );
    let config = Config::parse(&dir.join("spad.toml"), &text).unwrap();
    let server_key = PrivateKey::from_bytes([2; 32]);
    let server_public = server_key.public_key();
    let mut pipeline = Pipeline::new(
        config,
        Server::new(server_key),
        Box::new(Memory::default()),
        SystemClock,
    )
    .unwrap();
    pipeline.log.refusals_per_second = 0;
    let request = Request {
        kind: Kind::Open,
        timestamp: SystemClock.now(),
        nonce: [0; 16],
        duration_secs: 0,
        address: None,
        services: vec!["ssh".into()],
    };
    let valid =
        spa_shared::packet::seal(&mut rand_core::OsRng, &client, &server_public, &request).unwrap();
    pipeline.handle(&udp(&valid));
    assert_eq!(pipeline.stats.granted, 1);
    c.bench_function("pipeline/replayed valid packet (dropped before DH)", |b| {
        b.iter(|| pipeline.handle(std::hint::black_box(&udp(&valid))))
    });
    let garbage = vec![0x5au8; MIN_LEN];
    // Reference on the same machine at the same moment: the mac1 check alone.
    let reference = Server::new(PrivateKey::from_bytes([2; 32]));
    c.bench_function("reference/mac1 check alone", |b| {
        b.iter(|| {
            reference
                .precheck(std::hint::black_box(&garbage))
                .unwrap_err()
        })
    });
    c.bench_function("pipeline/garbage (dropped by mac1)", |b| {
        b.iter(|| pipeline.handle(std::hint::black_box(&udp(&garbage))))
    });
    // A fresh ephemeral key with a valid mac1 but no client key behind it: the handshake runs
    // its first X25519 (`es`) and fails to decrypt the client key.
    let mut forged = vec![7u8; MIN_LEN - spa_shared::mac::MAC_LEN];
    forged[..32].copy_from_slice(PrivateKey::from_bytes([9; 32]).public_key().as_bytes());
    let tag = spa_shared::mac::PrecheckKey::new(&server_public).tag(&forged);
    forged.extend_from_slice(&tag);
    c.bench_function("pipeline/valid mac1, failed handshake (1 DH)", |b| {
        b.iter(|| pipeline.handle(std::hint::black_box(&udp(&forged))))
    });
    // A real packet from a key that is not configured: refused after `es`, before `ss`. Each
    // iteration seals a fresh one (a replay would be dropped before the handshake), so the
    // figure includes the client's sealing: subtract `seal (client)` of `--bench packet`.
    let stranger = PrivateKey::from_bytes([5; 32]);
    c.bench_function("pipeline/unknown client key (1 DH) + sealing it", |b| {
        b.iter(|| {
            let packet = spa_shared::packet::seal(
                &mut rand_core::OsRng,
                &stranger,
                &server_public,
                &request,
            )
            .unwrap();
            pipeline.handle(std::hint::black_box(&udp(&packet)))
        })
    });
    assert!(
        pipeline
            .stats
            .refusals
            .get(spad::refusal::Refusal::RecentPacket)
            > 0
    );
    assert!(
        pipeline
            .stats
            .refusals
            .get(spad::refusal::Refusal::UnknownClient)
            > 0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
