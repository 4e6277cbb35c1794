//! Knock-to-open latency in the lab, as a user sees it: from starting `spa knock` to the first
//! successful TCP connection to the hidden port (polled every millisecond). Needs root.
//! `sudo target/release/latency [nftables|iptables]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::time::{Duration, Instant};

use spa_e2e::*;

fn main() {
    assert!(can_run(), "run as root");
    let backend = match std::env::args().nth(1).as_deref() {
        Some("iptables") => Backend::Iptables,
        _ => Backend::Nftables,
    };
    let mut lab = Lab::new("demo.toml");
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    lab.start_spad("demo.toml", backend);
    let mut samples = Vec::new();
    let mut spawns = Vec::new();
    for _ in 0..40 {
        // Make sure the previous grant is gone first.
        let conf = lab.path("demo.toml").display().to_string();
        lab.exec(
            &lab.gw,
            binary("spad").to_str().unwrap(),
            &["revoke", "-c", &conf, "--address", "203.0.113.10"],
        );
        let args = lab.knock_args("alice", false);
        let start = Instant::now();
        let mut full: Vec<String> = vec!["knock".into()];
        full.extend(args);
        full.extend(["-s".into(), "ssh".into()]);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        lab.spa_in(&lab.a, &refs);
        let sent = start.elapsed();
        let opened = in_ns(&lab.a, move || {
            let deadline = start + Duration::from_secs(2);
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&Lab::gw4(22), Duration::from_millis(1)).is_ok() {
                    return Some(start.elapsed());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        });
        let opened = opened.expect("did not open");
        samples.push(opened);
        spawns.push(sent);
        // After the client exited: how much longer until the port answered.
    }
    samples.sort();
    spawns.sort();
    println!(
        "{}: knock-to-open (spa start to first connect), {} runs: p50 {:.1?}, p90 {:.1?}, max {:.1?}",
        backend.name(),
        samples.len(),
        samples[samples.len() / 2],
        samples[samples.len() * 9 / 10],
        samples[samples.len() - 1]
    );
    println!(
        "{}: of which running `ip netns exec spa knock` until it exits: p50 {:.1?} (process start-up, not spad)",
        backend.name(),
        spawns[spawns.len() / 2]
    );
}
