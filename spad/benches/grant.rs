//! Grant cost: one netlink batch per grant (what spad does) versus spawning `nft` / `ipset`
//! per grant (what fwknop and knockd setups do). Runs in a private network namespace, so it
//! needs root and touches nothing on the host: `sudo cargo bench -p spad --bench grant`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use spad::config::Config;
use spad::firewall::{iptables::Iptables, nftables::Nftables, Access, Firewall};

const CONFIG: &str = r#"
[server]
private-key = "unused"
[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "1h"
"#;

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn address(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn measure(name: &str, firewall: &mut dyn Firewall, config: &Config, n: u32) {
    firewall.install(config).unwrap();
    let mut samples = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        let grant = Access {
            address: address(i),
            service: "ssh".into(),
            timeout: Duration::from_secs(3600),
            idle: None,
            owner: "bench".into(),
        };
        let t = Instant::now();
        firewall.grant(std::slice::from_ref(&grant)).unwrap();
        samples.push(t.elapsed());
    }
    let total = start.elapsed();
    let (p50, p99) = percentiles(samples);
    println!(
        "{name:<34} p50 {:>8.1?}  p99 {:>8.1?}  {:>8.0} grants/s",
        p50,
        p99,
        f64::from(n) / total.as_secs_f64()
    );
    firewall.remove().unwrap();
}

fn spawn(name: &str, n: u32, args: impl Fn(u32) -> Vec<String>, program: &str) {
    let mut samples = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        let ok = Command::new(program)
            .args(args(i))
            .status()
            .unwrap()
            .success();
        samples.push(t.elapsed());
        assert!(ok, "{program} failed");
    }
    let (p50, p99) = percentiles(samples);
    println!(
        "{name:<34} p50 {:>8.1?}  p99 {:>8.1?}  {:>8.0} grants/s",
        p50,
        p99,
        1.0 / p50.as_secs_f64()
    );
}

fn main() {
    // SAFETY: geteuid/unshare have no memory-safety preconditions.
    if unsafe { libc::geteuid() } != 0 || unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        println!("grant bench skipped: needs root (it runs in a private network namespace)");
        return;
    }
    let config = Config::parse(Path::new("/nonexistent/spad.toml"), CONFIG).unwrap();
    let n = 20_000;
    println!("grant cost, one element per grant ({n} grants over netlink)");
    measure(
        "nftables: netlink batch (spad)",
        &mut Nftables::open("spad").unwrap(),
        &config,
        n,
    );
    measure(
        "ipset: netlink (spad, iptables)",
        &mut Iptables::open("spad").unwrap(),
        &config,
        n,
    );

    let mut nft = Nftables::open("spad").unwrap();
    nft.install(&config).unwrap();
    spawn(
        "nftables: spawn `nft add element`",
        300,
        |i| {
            vec![
                "add".into(),
                "element".into(),
                "inet".into(),
                "spad".into(),
                "a4_ssh".into(),
                format!("{{ {} timeout 1h }}", address(100_000 + i)),
            ]
        },
        "nft",
    );
    nft.remove().unwrap();
    let mut ipt = Iptables::open("spad").unwrap();
    ipt.install(&config).unwrap();
    spawn(
        "ipset: spawn `ipset add`",
        300,
        |i| {
            vec![
                "add".into(),
                "spad-a4-ssh".into(),
                address(100_000 + i).to_string(),
                "timeout".into(),
                "3600".into(),
            ]
        },
        "ipset",
    );
    ipt.remove().unwrap();
}
