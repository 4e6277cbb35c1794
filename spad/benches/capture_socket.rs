//! Capture throughput on real sockets: garbage UDP datagrams of the SPA packet's size, sent
//! over a veth pair between two private network namespaces, read by the AF_PACKET source
//! (BPF prefilter, receive ring, host acceptance) and parsed as the daemon does.
//! Reports packets per second of the capture thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`),
//! the kernel's drop count and the capture counters. Needs root; touches nothing outside the
//! two namespaces it creates and deletes: `sudo cargo bench -p spad --bench capture_socket`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use nix::time::{clock_gettime, ClockId};
use spad::capture::bpf::Watch;
use spad::capture::{frame, AfPacket, Received, SlotSize, Source};
use spad::net::Proto;

const PACKETS: u64 = 400_000; // 100 bursts
const PAYLOAD: usize = 176;
/// Frames per burst: inside the ring (4,096 slots), so the kernel drops none.
const BURST: u64 = 4_000;

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {}", args.join(" "));
}

fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
}

fn thread_cpu() -> Duration {
    Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap())
}

struct Namespaces(String, String);
impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.1]).status();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and `cargo test --benches` probe harness=false benches
    }
    let id = std::process::id();
    let (gw, client) = (format!("capbg{id}"), format!("capbc{id}"));
    let _cleanup = Namespaces(gw.clone(), client.clone());
    for ns in [&gw, &client] {
        let made = Command::new("ip").args(["netns", "add", ns]).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("capture_socket: skipped (needs root to create network namespaces)");
            return;
        }
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    let (a, b) = (format!("cb{id}a"), format!("cb{id}b"));
    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    ip(&["link", "set", &a, "netns", &gw]);
    ip(&["link", "set", &b, "netns", &client]);
    ip(&["-n", &gw, "link", "set", &a, "name", "eth0"]);
    ip(&["-n", &client, "link", "set", &b, "name", "eth0"]);
    ip(&["-n", &gw, "addr", "add", "10.201.0.1/24", "dev", "eth0"]);
    ip(&["-n", &client, "addr", "add", "10.201.0.2/24", "dev", "eth0"]);
    ip(&["-n", &gw, "link", "set", "eth0", "up"]);
    ip(&["-n", &client, "link", "set", "eth0", "up"]);

    // Bursts: the sender fills the socket's queue while the capture waits, then the capture
    // drains it. So the ring is full of waiting frames, as under a flood, and the figure is
    // the capture's capacity, not the sender's speed.
    let (to_receiver, bursts_in) = mpsc::channel::<u64>();
    let (to_sender, drained) = mpsc::channel::<()>();
    let receiver = {
        let gw = gw.clone();
        std::thread::spawn(move || {
            enter(&gw);
            let watches = [Watch {
                proto: Proto::Udp,
                low: 62201,
                high: 62201,
            }];
            let mut source = AfPacket::open(
                &["eth0".to_string()],
                &watches,
                true,
                SlotSize::Small,
                spad::capture::afpacket::Prefilter::Classic,
            )
            .unwrap();
            to_sender.send(()).unwrap();
            let (mut parsed, mut cpu) = (0u64, Duration::ZERO);
            while bursts_in.recv().is_ok() {
                let start = thread_cpu();
                // Drained when the ring stays empty for 20 ms (a frame the sender's side
                // dropped never arrives; waiting for an exact count would stall).
                while let Some(received) = source.recv(Duration::from_millis(20)).unwrap() {
                    if let Received::Ip(packet) = received {
                        std::hint::black_box(frame::parse(packet).unwrap().payload.len());
                        parsed += 1;
                    }
                }
                cpu += thread_cpu() - start;
                to_sender.send(()).unwrap();
            }
            (parsed, cpu, source.stats())
        })
    };
    drained.recv().unwrap();
    let sender = {
        let client = client.clone();
        std::thread::spawn(move || {
            enter(&client);
            let socket = UdpSocket::bind("10.201.0.2:0").unwrap();
            socket.connect("10.201.0.1:62201").unwrap();
            let mut payload = [0u8; PAYLOAD];
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..PACKETS / BURST {
                for _ in 0..BURST {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    payload[..8].copy_from_slice(&seed.to_le_bytes());
                    let _ = socket.send(&payload);
                }
                to_receiver.send(BURST).unwrap();
                drained.recv().unwrap();
            }
        })
    };
    sender.join().unwrap();
    let (parsed, cpu, stats) = receiver.join().unwrap();
    let per_cpu_second = parsed as f64 / cpu.as_secs_f64();
    println!(
        "capture_socket: {parsed} of {PACKETS} garbage datagrams ({PAYLOAD}-byte payloads) captured, judged and parsed in {:.3} s of the capture thread's CPU: {:.0} packets per core-second ({:.0} ns each)",
        cpu.as_secs_f64(),
        per_cpu_second,
        1e9 / per_cpu_second,
    );
    println!("capture_socket: {stats}");
}
