//! Knock engine cost under a spoofed-source flood: knocks per second through the engine alone
//! (no capture, no kernel), each from a new source, at a door's first port, in-between ports
//! and decoys, with the default `max-sources` cap; a legit source opens the door meanwhile.
//! `cargo bench -p spad --bench knock`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use spad::config::Config;
use spad::knock::engine::Event;
use spad::knock::Knocks;
use spad::net::{PortProto, Proto};

const CONFIG: &str = r#"
[server]
private-key = "unused"
state-dir = "STATE"
[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "1h"
[doors.openssh]
sequence = ["7000/tcp", "8000/tcp", "9000/tcp"]
close-sequence = ["9000/tcp", "8000/tcp", "7000/tcp"]
seq-timeout = "5s"
services = ["ssh"]
[knocking]
decoy-ports = ["6999/tcp", "9001/tcp"]
"#;

fn tcp(port: u16) -> PortProto {
    PortProto {
        port,
        proto: Proto::Tcp,
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("spad-bench-knock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = CONFIG.replace("STATE", dir.to_str().unwrap());
    let config = Config::parse(&dir.join("spad.toml"), &text).unwrap();
    let mut now = 1_763_726_400_000_000u64;
    let mut knocks = Knocks::new(&config, &dir, now);
    let ports = [7000, 7000, 7000, 8000, 7500, 8500, 6999, 9001];
    let legit: IpAddr = "2001:db8::7".parse().unwrap();
    let total: u32 = 2_000_000;
    let (mut opens, mut tries) = (0, 0);
    let start = Instant::now();
    for n in 0..total {
        // 10 µs of virtual time per packet: a 100k packets/s flood.
        now += 10;
        let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
        let _ = knocks.knock(source, tcp(ports[n as usize % ports.len()]), 0x02, now);
        if n % 100_000 == 50_000 {
            tries += 1;
            for port in [7000, 8000, 9000] {
                let events = knocks.knock(legit, tcp(port), 0x02, now);
                opens += usize::from(events.iter().any(|e| matches!(e, Event::Open { .. })));
            }
        }
        if n % 100_000 == 0 {
            let _ = knocks.tick(now);
        }
    }
    let elapsed = start.elapsed();
    println!(
        "knock engine, spoofed flood: {:.0} knocks/s ({:.2} µs each); {} sources tracked (cap {}), {} evicted; legit opens {opens}/{tries}",
        f64::from(total) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / f64::from(total),
        knocks.engine().tracked_sources(),
        config.doors.max_sources,
        knocks.engine().evicted_sources(),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
