//! How much the pre-check saves: garbage refused by mac1 versus a valid packet opened in full,
//! by a server that computes `ss` per packet and by one built with its clients' `ss` cached.
#![allow(clippy::unwrap_used)]
use criterion::{criterion_group, criterion_main, Criterion};
use spa_shared::keys::PrivateKey;
use spa_shared::packet::{seal, Server, MIN_LEN};
use spa_shared::payload::{Kind, Request};

fn bench(c: &mut Criterion) {
    let server = Server::new(PrivateKey::from_bytes([2; 32]));
    let client = PrivateKey::from_bytes([1; 32]);
    let request = Request {
        kind: Kind::Open,
        timestamp: 1,
        nonce: [0; 16],
        duration_secs: 0,
        address: None,
        services: vec!["ssh".into()],
    };
    let valid = seal(
        &mut rand_core::OsRng,
        &client,
        &server.public_key(),
        &request,
    )
    .unwrap();
    let garbage = vec![0x5au8; MIN_LEN];
    c.bench_function("open/garbage (refused by mac1)", |b| {
        b.iter(|| server.open(std::hint::black_box(&garbage)).unwrap_err())
    });
    c.bench_function("open/valid (mac1 + 2 DH + AEAD)", |b| {
        b.iter(|| server.open(std::hint::black_box(&valid)).unwrap())
    });
    // The daemon's server: 10,000 configured clients, `ss` precomputed for each.
    let clients = (0u16..10_000).map(|i| {
        let mut bytes = [3u8; 32];
        bytes[..2].copy_from_slice(&i.to_le_bytes());
        PrivateKey::from_bytes(bytes).public_key()
    });
    let cached = Server::with_clients(
        PrivateKey::from_bytes([2; 32]),
        clients.chain([client.public_key()]),
    );
    c.bench_function("open/valid, 10k clients cached (mac1 + 1 DH + AEAD)", |b| {
        b.iter(|| cached.open(std::hint::black_box(&valid)).unwrap())
    });
    let stranger = seal(
        &mut rand_core::OsRng,
        &PrivateKey::from_bytes([9; 32]),
        &server.public_key(),
        &request,
    )
    .unwrap();
    c.bench_function("open/unknown client, cached (refused after 1 DH)", |b| {
        b.iter(|| cached.open(std::hint::black_box(&stranger)).unwrap_err())
    });
    c.bench_function("seal (client)", |b| {
        b.iter(|| {
            seal(
                &mut rand_core::OsRng,
                &client,
                &server.public_key(),
                &request,
            )
            .unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
