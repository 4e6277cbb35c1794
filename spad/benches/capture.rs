//! Capture cost per garbage packet in userspace: judging a batch of frames the way the
//! AF_PACKET source does (link type, VLAN, parse, own-address, checksums), then the daemon's
//! parse and the mac1 pre-check that drops garbage. `cargo bench -p spad --bench capture`.
//! Reading from the receive ring on real sockets is measured by the `capture_socket` bench.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spa_shared::keys::PrivateKey;
use spa_shared::packet::Server;
use spad::capture::frame::{self, build};
use spad::capture::host::{judge, HostAddresses, Meta};

const BATCH: usize = 64;

fn garbage_batch() -> Vec<Vec<u8>> {
    let to: IpAddr = "203.0.113.1".parse().unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    (0..BATCH)
        .map(|i| {
            let mut payload = [0u8; 176];
            for b in &mut payload {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            let from: IpAddr = format!("198.51.{}.{}", i / 250, i % 250 + 1)
                .parse()
                .unwrap();
            build::udp(from, to, 40000 + i as u16, 62201, &payload)
        })
        .collect()
}

fn capture(c: &mut Criterion) {
    let hosts = HostAddresses::new(
        [
            (2, "203.0.113.1".parse().unwrap()),
            (2, "2001:db8:1::1".parse().unwrap()),
        ],
        &[1],
    );
    let meta = Meta {
        ifindex: 2,
        ..Meta::default()
    };
    let batch = garbage_batch();
    let server = Server::new(PrivateKey::from_bytes([2; 32]));
    let mut group = c.benchmark_group("capture");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("judge_batch_of_64", |b| {
        b.iter(|| {
            for packet in &batch {
                black_box(judge(&meta, black_box(packet), &hosts).is_ok());
            }
        })
    });
    group.bench_function("judge_parse_precheck_batch_of_64", |b| {
        b.iter(|| {
            for packet in &batch {
                if judge(&meta, black_box(packet), &hosts).is_ok() {
                    let f = frame::parse(packet).unwrap();
                    black_box(server.precheck(f.payload).is_err());
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, capture);
criterion_main!(benches);
