//! What an fwknop client costs the gateway: base64 garbage refused by one client's HMAC, and a
//! valid packet authenticated, decrypted and parsed.
#![allow(clippy::unwrap_used)]
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion};
use spa_shared::fwknop::{wire, Access, HmacDigest, Keys, Message, Proto, SealParams};

fn bench(c: &mut Criterion) {
    let keys = Keys::new(vec![7; 32], vec![8; 64], HmacDigest::Sha256).unwrap();
    let message = Message::access(
        1_795_978_329,
        Ipv4Addr::new(203, 0, 113, 10),
        vec![Access {
            proto: Proto::Tcp,
            port: 22,
        }],
    );
    let valid = wire::seal(
        &message,
        &keys,
        SealParams {
            salt: [1; 8],
            hmac: true,
        },
    );
    let garbage = "A".repeat(valid.len());
    c.bench_function("fwknop/garbage (one client's HMAC)", |b| {
        b.iter(|| wire::open(std::hint::black_box(garbage.as_bytes()), &keys).unwrap_err())
    });
    c.bench_function("fwknop/valid (HMAC + AES-CBC + parse)", |b| {
        b.iter(|| wire::open(std::hint::black_box(valid.as_bytes()), &keys).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
