//! `scripts/demo.sh`: the main job in one minute. A gateway hides SSH; a client opens it with
//! one SPA packet; another client still sees nothing; the grant expires in the kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use spa_e2e::*;

fn say(text: &str) {
    println!("\n==> {text}");
}

fn show(probe: Connect) -> &'static str {
    match probe {
        Connect::Open => "OPEN (the echo service answered)",
        Connect::Refused => "CLOSED (reset)",
        Connect::TimedOut => "FILTERED (no answer at all)",
    }
}

fn main() {
    if !can_run() {
        eprintln!("the demo creates network namespaces: run it as root (sudo scripts/demo.sh)");
        std::process::exit(1);
    }
    let t = Duration::from_millis(800);
    let mut lab = Lab::new("demo.toml");
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    say(&format!(
        "lab {}: gateway {GW4} (namespace {}), clients 203.0.113.10 and 203.0.113.20",
        lab.id, lab.gw
    ));
    lab.start_spad("demo.toml", Backend::Nftables);
    say("spad is running with conf/demo.toml; a TCP service listens on the gateway's port 22");
    println!(
        "client A -> {GW4}:22  {}",
        show(tcp_probe(&lab.a, Lab::gw4(22), t))
    );
    println!(
        "client B -> {GW4}:22  {}",
        show(tcp_probe(&lab.b, Lab::gw4(22), t))
    );

    say("client A: spa knock -s ssh --duration 5s   (one UDP packet, 176 bytes, no answer)");
    let out = lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "5s"], false);
    print!("{}", String::from_utf8_lossy(&out.stderr));
    wait_until(Duration::from_secs(5), || {
        lab.log().contains("granted owner=alice")
    });
    let opened = Instant::now();
    for line in lab.log().lines().filter(|l| l.contains("granted")) {
        println!("spad: {line}");
    }
    println!(
        "client A -> {GW4}:22  {}",
        show(tcp_probe(&lab.a, Lab::gw4(22), t))
    );
    println!(
        "client B -> {GW4}:22  {}",
        show(tcp_probe(&lab.b, Lab::gw4(22), t))
    );
    let mut held = Held::open(&lab.a, Lab::gw4(22)).unwrap();
    println!("client A holds one connection open across the expiry");

    say("the grant is a kernel set element with a timeout:");
    for line in lab
        .nft_list()
        .lines()
        .filter(|l| l.contains("203.0.113.10"))
    {
        println!("   {}", line.trim());
    }

    say("waiting for the kernel to expire the grant...");
    let closed = wait_until(Duration::from_secs(15), || {
        tcp_probe(&lab.a, Lab::gw4(22), Duration::from_millis(300)) == Connect::TimedOut
    });
    println!(
        "client A -> {GW4}:22  {} after {:.1}s",
        show(tcp_probe(&lab.a, Lab::gw4(22), t)),
        opened.elapsed().as_secs_f64()
    );
    println!(
        "client A's established connection still works: {}",
        held.echo()
    );

    say("replaying client A's packet from client B is refused (see docs/protocol.md):");
    let saved = lab.path("a.bin");
    lab.knock(
        &lab.a,
        "alice",
        &["ssh"],
        &["--duration", "2s", "--save-packet", saved.to_str().unwrap()],
        false,
    );
    let bytes = std::fs::read(&saved).unwrap();
    in_ns(&lab.b, move || {
        std::net::UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .send_to(&bytes, Lab::gw4(62201))
            .unwrap()
    });
    wait_until(Duration::from_secs(5), || lab.log().contains("replayed"));
    for line in lab.log().lines().filter(|l| l.contains("replayed")) {
        println!("spad: {line}");
    }
    if !closed {
        eprintln!("demo failed: the grant did not expire");
        std::process::exit(1);
    }
    say("done; namespaces and processes are removed on exit");
}
