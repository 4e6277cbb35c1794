//! Load benchmark: spad under an offered-rate ladder and under floods, measured from outside.
//!
//! Two throwaway namespaces joined by a veth pair: a gateway running `spad` (AF_PACKET
//! capture, nftables backend, 10,000 configured clients) and a client namespace that sends
//! pre-built SPA packets through one raw socket, each from its own spoofed source address in
//! 10.201.0.0/16 (routed back to the client namespace; rp_filter off on the gateway). A grant
//! is counted when the kernel announces the new set element: a `NEWSETELEM` event on the
//! gateway's `NFNLGRP_NFTABLES` netlink multicast group. Packet → grant latency is from just
//! after `sendto` to that event, on the same monotonic clock.
//!
//! Per step it prints sent / granted / lost and latency p50 / p99 of the sustained rate: each
//! step first sends for 0.5 s at its rate from sources of its own, and only the packets after
//! that count (the first 100 of that warm-up, which follow an idle gap, are reported on their
//! own line). Then three scenarios, each with 40 legitimate knocks sent 20 ms apart during a
//! flood: a max-rate replay of one captured valid packet from one source, max-rate garbage
//! of the real packet size from one source (both mostly cut in the kernel by spad's
//! per-source `packet-rate`), and the same garbage from 16,000 spoofed sources (each under
//! that budget, so all of it reaches spad's keyed pre-check). Timing lives here, in a
//! benchmark, never in tests. Needs root. `scripts/bench.sh` builds and runs it:
//! `target/release/loadbench [--rates 1000,2000,...] [--seconds 2] [--packet-rate N] [--no-fwknopd]
//! [--fwknopd-pcap]`.
//!
//! When `fwknopd` and `fwknop` are on PATH, the same ladder is then sent to fwknopd in the
//! same namespaces (see `fwknopd.rs`) and one table prints both daemons and the ratios.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spa_e2e::{in_ns, run, wait_until};
use spa_shared::keys::{PrivateKey, PublicKey};
use spa_shared::payload::{Kind, Request};

#[path = "loadbench/fwknopd.rs"]
mod fwknopd;

const CLIENTS: usize = 10_000;
const GW: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const PORT: u16 = 62201;
const TABLE: &str = "spadlb";
/// spad's metrics endpoint, on the gateway namespace's loopback.
const METRICS: &str = "127.0.0.1:9109";
const NFNLGRP_NFTABLES: u32 = 7;
const NFT_MSG_NEWSETELEM: u16 = (10 << 8) | 12;
/// Upper bound on waiting for one step's grants (fwknopd drains a backlog at ~100/s).
const COLLECT_AT_MOST: Duration = Duration::from_secs(60);
/// How long each step sends at its rate before the packets it counts.
const WARM_UP: Duration = Duration::from_millis(500);
/// The first packets of a warm-up, reported on their own (after the idle gap between steps).
const COLD_PACKETS: usize = 100;
/// Legitimate packets sent during each flood, this far apart.
const LEGIT_DURING_FLOOD: usize = 40;
const LEGIT_EVERY: Duration = Duration::from_millis(20);

/// The two namespaces and spad; everything is removed on drop.
struct Bench {
    gw: String,
    client: String,
    dir: PathBuf,
    spad: Option<Child>,
    spad_path: Option<String>,
    config_path: Option<String>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(mut child) = self.spad.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.gw, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // LOADBENCH_KEEP_LOG=FILE keeps spad's log (its grant lines carry spad's own times).
        if let Some(keep) = std::env::var_os("LOADBENCH_KEEP_LOG") {
            let _ = std::fs::copy(self.dir.join("spad.log"), keep);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    fn new() -> Bench {
        let id = std::process::id() % 100_000;
        let bench = Bench {
            gw: format!("lbgw{id}"),
            client: format!("lbcl{id}"),
            dir: std::env::temp_dir().join(format!("spa-loadbench-{id}")),
            spad: None,
            spad_path: None,
            config_path: None,
        };
        let _ = std::fs::remove_dir_all(&bench.dir);
        std::fs::create_dir_all(bench.dir.join("state")).unwrap();
        for ns in [&bench.gw, &bench.client] {
            run("ip", &["netns", "add", ns]);
            bench.ip(ns, &["link", "set", "lo", "up"]);
        }
        let (g, c) = (format!("lbg{id}"), format!("lbc{id}"));
        run(
            "ip",
            &["link", "add", &g, "type", "veth", "peer", "name", &c],
        );
        run("ip", &["link", "set", &g, "netns", &bench.gw]);
        run("ip", &["link", "set", &c, "netns", &bench.client]);
        bench.ip(&bench.gw, &["link", "set", &g, "name", "eth0"]);
        bench.ip(&bench.client, &["link", "set", &c, "name", "eth0"]);
        bench.ip(&bench.gw, &["addr", "add", "10.200.0.1/24", "dev", "eth0"]);
        bench.ip(
            &bench.client,
            &["addr", "add", "10.200.0.2/24", "dev", "eth0"],
        );
        for ns in [&bench.gw, &bench.client] {
            bench.ip(ns, &["link", "set", "eth0", "up"]);
        }
        bench.ip(
            &bench.client,
            &["route", "add", "default", "via", "10.200.0.1"],
        );
        // Spoofed sources are routed back to the client namespace, and not filtered by
        // reverse-path checks on the gateway.
        bench.ip(
            &bench.gw,
            &["route", "add", "10.201.0.0/16", "via", "10.200.0.2"],
        );
        for key in ["all", "default", "eth0"] {
            let setting = format!("net.ipv4.conf.{key}.rp_filter=0");
            run(
                "ip",
                &["netns", "exec", &bench.gw, "sysctl", "-qw", &setting],
            );
        }
        bench
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// `spad status --json` of the running spad (null if it does not answer).
    fn status(&self) -> serde_json::Value {
        let (Some(spad), Some(config)) = (&self.spad_path, &self.config_path) else {
            return serde_json::Value::Null;
        };
        spad_status(&self.gw, spad, config)
    }

    /// Counters of the running spad, from `spad status --json` (empty if it does not answer).
    fn counters(&self) -> HashMap<String, u64> {
        let json = self.status();
        json["counters"]
            .as_array()
            .map(|all| {
                all.iter()
                    .filter_map(|c| Some((c["name"].as_str()?.to_string(), c["value"].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn start_spad(&mut self, spad: &str, config: &str) {
        self.spad_path = Some(spad.to_string());
        self.config_path = Some(config.to_string());
        let log = std::fs::File::create(self.dir.join("spad.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.gw, spad, "run", "-c", config])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.spad = Some(child);
        assert!(
            wait_until(Duration::from_secs(60), || self
                .log()
                .contains("listening port=")),
            "spad did not start:\n{}",
            self.log()
        );
    }

    fn stop_spad(&mut self) {
        if let Some(mut child) = self.spad.take() {
            // SAFETY: signalling our own child (`ip netns exec` execs spad).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// CPU time spad has used so far (user + system), from /proc.
    fn cpu(&self) -> Duration {
        let Some(child) = &self.spad else {
            return Duration::ZERO;
        };
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime is the 12th, stime 13th.
        let rest = stat.rsplit(") ").next().unwrap_or("");
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("spad.log")).unwrap_or_default()
    }

    fn flush_grants(&self) {
        if std::env::var_os("LOADBENCH_NO_FLUSH").is_some() {
            return;
        }
        run(
            "ip",
            &[
                "netns", "exec", &self.gw, "nft", "flush", "set", "inet", TABLE, "a4_ssh",
            ],
        );
        // spad hears of every element the flush removed (its guard follows them): a step
        // starts once that is done, not on top of it.
        self.wait_idle();
    }

    /// Waits (3 s at most) until spad used under 2 ms of CPU in 100 ms.
    fn wait_idle(&self) {
        let mut before = self.cpu();
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.cpu();
            if now.saturating_sub(before) < Duration::from_millis(2) {
                return;
            }
            before = now;
        }
    }
}

/// `spad status --json` of the spad running in namespace `gw` (null if it does not answer).
fn spad_status(gw: &str, spad: &str, config: &str) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["netns", "exec", gw, spad, "status", "-c", config, "--json"])
        .output();
    let Ok(out) = out else {
        return serde_json::Value::Null;
    };
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The spoofed source of packet `i` of a step.
/// Sources of the spoofed-source flood: `source(49_000..65_000)`, inside 10.201.0.0/16.
const SPOOFED_SOURCES: usize = 16_000;

fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 201, 0, 0)) + 1 + i as u32)
}

fn client_key(i: usize) -> PrivateKey {
    let mut bytes = [0x42u8; 32];
    bytes[8..16].copy_from_slice(&(i as u64).to_le_bytes()); // clear of the clamped bits
    PrivateKey::from_bytes(bytes)
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Seals `count` packets, packet `i` with client key `i % CLIENTS`, on two threads.
fn seal_packets(keys: &[PrivateKey], server: &PublicKey, count: usize, salt: u64) -> Vec<Vec<u8>> {
    let base = now_micros();
    let seal = |i: usize| {
        let request = Request {
            kind: Kind::Open,
            timestamp: base + salt * 1_000 + i as u64,
            nonce: [0; 16],
            duration_secs: 0,
            address: None,
            services: vec!["ssh".into()],
        };
        spa_shared::packet::seal(
            &mut rand_core::OsRng,
            &keys[i % keys.len()],
            server,
            &request,
        )
        .unwrap()
    };
    let half = count / 2;
    std::thread::scope(|s| {
        let first = s.spawn(|| (0..half).map(seal).collect::<Vec<_>>());
        let second: Vec<_> = (half..count).map(seal).collect();
        let mut all = first.join().unwrap();
        all.extend(second);
        all
    })
}

/// An IPv4 + UDP datagram from `from` to the gateway's SPA port (checksums: the kernel fills
/// the IP one; a zero UDP checksum means "none" in IPv4).
fn datagram(from: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&GW.octets());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&PORT.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A raw IPv4 socket created inside namespace `ns`.
fn raw_socket(ns: &str) -> OwnedFd {
    in_ns(ns, || {
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is fresh and owned from here on.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
}

fn send(fd: &OwnedFd, packet: &[u8]) -> bool {
    // SAFETY: a zeroed sockaddr_in is valid; fields set below.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as u16;
    to.sin_addr.s_addr = u32::from(GW).to_be();
    // SAFETY: packet and `to` are valid for the given lengths.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    n == packet.len() as isize
}

/// Listens for new set elements in the gateway namespace; sends (IPv4 source, when) for each.
fn grant_listener(
    ns: &str,
    stop: Arc<AtomicBool>,
) -> (mpsc::Receiver<(u32, Instant)>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let fd = in_ns(ns, || {
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 12) };
        assert!(fd >= 0);
        // SAFETY: fd is fresh and owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid (pid 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        let size = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        // SAFETY: addr is a valid sockaddr_nl.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                size,
            )
        };
        assert_eq!(rc, 0);
        let group = NFNLGRP_NFTABLES;
        let buffer: libc::c_int = 256 << 20;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        for (level, name, value, len) in [
            (270, 1, (&group as *const u32).cast::<libc::c_void>(), 4), // NETLINK_ADD_MEMBERSHIP
            (
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&buffer as *const libc::c_int).cast(),
                4,
            ),
            (
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ),
        ] {
            // SAFETY: each value points to a live local of the given length.
            let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value, len) };
            assert_eq!(
                rc,
                0,
                "setsockopt {name}: {}",
                std::io::Error::last_os_error()
            );
        }
        fd
    });
    let handle = std::thread::spawn(move || {
        measuring_thread();
        let mut buf = vec![0u8; 1 << 20];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let at = Instant::now();
            if n <= 0 {
                if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                    eprintln!("loadbench: netlink events lost (ENOBUFS)");
                }
                continue;
            }
            for address in new_elements(&buf[..n as usize]) {
                let _ = tx.send((address, at));
            }
        }
    });
    (rx, handle)
}

/// Makes the calling thread a real-time (`SCHED_FIFO`) one, so the moment it reads a kernel
/// event is the moment the event arrived, not the moment the scheduler got round to a
/// thread competing with the flood generator and spad: the bench measures spad, not its own
/// wake-up. The thread only sleeps in `recv` and stamps; it cannot starve anything.
/// Best effort: without the privilege the thread stays as it is (said once on stderr).
fn measuring_thread() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: `param` is a live local; 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        eprintln!(
            "loadbench: the event listener stays a normal thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn attrs(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let body = &bytes[4..len];
        bytes = &bytes[((len + 3) & !3).min(bytes.len())..];
        Some((kind, body))
    })
}

/// IPv4 keys of the elements in every NEWSETELEM message of a netlink datagram, and the
/// 4-byte `cmp` values of every NEWRULE message (fwknopd's iptables-nft rules).
fn new_elements(mut bytes: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    while bytes.len() >= 16 {
        let len = u32::from_ne_bytes(bytes[..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        if len < 16 || len > bytes.len() {
            break;
        }
        if kind == fwknopd::NFT_MSG_NEWRULE && len >= 20 {
            out.extend(fwknopd::rule_addresses(&bytes[20..len]));
        }
        if kind == NFT_MSG_NEWSETELEM && len >= 20 {
            // nfgenmsg (4 bytes), then ELEM_LIST attributes; ELEMENTS (3) → ELEM (1) → KEY (1)
            // → DATA_VALUE (1).
            for (_, elements) in attrs(&bytes[20..len]).filter(|a| a.0 == 3) {
                for (_, element) in attrs(elements).filter(|a| a.0 == 1) {
                    for (_, key) in attrs(element).filter(|a| a.0 == 1) {
                        for (_, value) in attrs(key).filter(|a| a.0 == 1) {
                            if value.len() >= 4 {
                                out.push(u32::from_be_bytes(value[..4].try_into().unwrap()));
                            }
                        }
                    }
                }
            }
        }
        bytes = &bytes[((len + 3) & !3).min(bytes.len())..];
    }
    out
}

/// The disk's part of a durable grant: what one small write plus `fdatasync` costs in the
/// state directory, at about 1,000 per second, appended (the file grows) and in place (over
/// preallocated room, as spad's journal writes). No grant can be faster than this on the
/// machine; it is measured before the ladder so the two can be read side by side.
fn disk_floor(dir: &std::path::Path) -> String {
    use std::os::unix::fs::FileExt;
    const SYNCS: usize = 500;
    let path = dir.join("fsync-floor.bin");
    let mut line = format!(
        "disk floor ({}): one 61-byte write + fdatasync",
        dir.display()
    );
    for in_place in [false, true] {
        let _ = std::fs::remove_file(&path);
        let file = std::fs::File::create(&path).unwrap();
        if in_place {
            file.write_all_at(&vec![0; 1 << 20], 0).unwrap();
            file.sync_all().unwrap();
        }
        let mut took = Vec::with_capacity(SYNCS);
        for i in 0..SYNCS {
            let start = Instant::now();
            file.write_all_at(&[0x5a; 61], i as u64 * 61).unwrap();
            file.sync_data().unwrap();
            took.push(start.elapsed());
            std::thread::sleep(Duration::from_micros(900));
        }
        took.sort();
        line.push_str(&format!(
            "; {} p50 {} / p99 {} ms",
            if in_place { "in place" } else { "appended" },
            ms(percentile(&took, 50)),
            ms(percentile(&took, 99))
        ));
    }
    // The first sync after the disk was idle for a while costs more on some disks (virtual
    // ones especially): what the first grant after a quiet spell waits for.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut after_idle = Vec::new();
    for i in 0..5u64 {
        std::thread::sleep(Duration::from_millis(500));
        let start = Instant::now();
        file.write_all_at(&[0x5a; 61], i * 61).unwrap();
        file.sync_data().unwrap();
        after_idle.push(start.elapsed());
    }
    after_idle.sort();
    line.push_str(&format!(
        "; after 0.5 s idle median {} / max {} ms",
        ms(after_idle[2]),
        ms(after_idle[4])
    ));
    let _ = std::fs::remove_file(&path);
    line
}

/// The best any daemon that makes each packet durable before its grant can do on this disk
/// at `rate` packets per second: arrivals at that pace, and one thread that does nothing
/// but group commit (everything that arrived during a sync goes into the next one, written
/// in place like spad's journal). Reported as arrival → durable; no capture, crypto or
/// firewall work at all.
fn group_commit_floor(dir: &std::path::Path, rate: u64, seconds: u64) -> String {
    use std::os::unix::fs::FileExt;
    const ROOM: u64 = 1 << 20;
    let path = dir.join("group-commit-floor.bin");
    let file = std::fs::File::create(&path).unwrap();
    file.write_all_at(&vec![0; ROOM as usize], 0).unwrap();
    file.sync_all().unwrap();
    let (arrive, arrivals) = mpsc::channel::<Instant>();
    let syncer = std::thread::spawn(move || {
        let mut took = Vec::new();
        let mut offset = 0u64;
        while let Ok(first) = arrivals.recv() {
            let mut batch = vec![first];
            batch.extend(arrivals.try_iter());
            let bytes = vec![0x5a; 61 * batch.len()];
            if offset + bytes.len() as u64 > ROOM {
                offset = 0;
            }
            file.write_all_at(&bytes, offset).unwrap();
            file.sync_data().unwrap();
            offset += bytes.len() as u64;
            let durable = Instant::now();
            took.extend(
                batch
                    .iter()
                    .map(|at| durable.saturating_duration_since(*at)),
            );
        }
        took
    });
    let start = Instant::now();
    let count = rate * seconds;
    for n in 0..count {
        let due = start + Duration::from_nanos(n * 1_000_000_000 / rate);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        arrive.send(Instant::now()).unwrap();
    }
    drop(arrive);
    let mut took = syncer.join().unwrap();
    let _ = std::fs::remove_file(&path);
    took.sort();
    format!(
        "ideal group commit at {rate}/s for {seconds} s (arrival -> durable, nothing else done): p50 {} / p99 {} / max {} ms",
        ms(percentile(&took, 50)),
        ms(percentile(&took, 99)),
        ms(took.last().copied().unwrap_or_default())
    )
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Collects grant events until every source in `sent` is granted, `settle` passes without
/// news, or `COLLECT_AT_MOST` has passed.
fn collect(
    events: &mpsc::Receiver<(u32, Instant)>,
    sent: &[(u32, Instant)],
    settle: Duration,
) -> HashMap<u32, Instant> {
    let wanted: std::collections::HashSet<u32> = sent.iter().map(|s| s.0).collect();
    let mut granted = HashMap::new();
    let deadline = Instant::now() + COLLECT_AT_MOST;
    while granted.len() < wanted.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match events.recv_timeout(settle.min(left)) {
            Ok((address, at)) if wanted.contains(&address) => {
                granted.entry(address).or_insert(at);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    granted
}

/// Sends `packets` at `rate` per second, packet `i` from `source(offset + i)`; returns send
/// times. `before(i)` runs just before packet `i` is sent.
fn paced(
    fd: &OwnedFd,
    packets: &[Vec<u8>],
    rate: u64,
    offset: usize,
    mut before: impl FnMut(usize),
) -> Vec<(u32, Instant)> {
    let frames: Vec<Vec<u8>> = packets
        .iter()
        .enumerate()
        .map(|(i, p)| datagram(source(offset + i), p))
        .collect();
    let start = Instant::now();
    let mut sent = Vec::with_capacity(frames.len());
    // Sends whatever is due, then sleeps until the next packet is due: no busy wait and no
    // wake-up without work, so the sender steals as little as possible of spad's two cores.
    let due = |n: usize| start + Duration::from_nanos(n as u64 * 1_000_000_000 / rate);
    let mut next = 0;
    while next < frames.len() {
        let now = Instant::now();
        while next < frames.len() && due(next) <= now {
            before(next);
            if send(fd, &frames[next]) {
                sent.push((u32::from(source(offset + next)), Instant::now()));
            }
            next += 1;
        }
        if next < frames.len() {
            std::thread::sleep(due(next).saturating_duration_since(Instant::now()));
        }
    }
    sent
}

struct Outcome {
    sent: usize,
    granted: usize,
    p50: Duration,
    p99: Duration,
    wall: Duration,
}

/// One histogram family of a Prometheus scrape: cumulative counts by upper bound (µs).
#[derive(Debug, Default, Clone)]
struct Buckets(Vec<(u64, u64)>);

impl Buckets {
    /// `family`'s finite buckets in `text` (spad's `/metrics`).
    fn parse(text: &str, family: &str) -> Buckets {
        let prefix = format!("{family}_bucket{{le=\"");
        Buckets(
            text.lines()
                .filter_map(|line| {
                    let rest = line.strip_prefix(&prefix)?;
                    let (le, count) = rest.split_once("\"} ")?;
                    // `+Inf` is left out: the percentiles name finite bounds.
                    let seconds: f64 = le.parse().ok().filter(|s: &f64| s.is_finite())?;
                    Some(((seconds * 1e6).round() as u64, count.trim().parse().ok()?))
                })
                .collect(),
        )
    }

    /// What was observed between `before` and `self`.
    fn since(&self, before: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|&(le, n)| {
                    let was = before.0.iter().find(|(b, _)| *b == le).map_or(0, |b| b.1);
                    (le, n.saturating_sub(was))
                })
                .collect(),
        )
    }

    fn count(&self) -> u64 {
        self.0.last().map_or(0, |b| b.1)
    }

    /// The bucket bound the `q`-th percentile falls under ("≤ X ms"), or `>` the last.
    fn percentile(&self, q: u64) -> String {
        let want = (self.count() * q).div_ceil(100).max(1);
        match self.0.iter().find(|(_, n)| *n >= want) {
            Some((le, _)) => format!("≤{}", *le as f64 / 1e3),
            None => format!(">{}", self.0.last().map_or(0.0, |b| b.0 as f64 / 1e3)),
        }
    }
}

/// spad's own view of a step, from two scrapes of its metrics: how long its journal syncs
/// took (the disk, in the same seconds as the grants), how long its firewall transactions
/// took (the kernel), and its heard → granted latency (both, plus spad's own work).
fn spad_view(before: &str, after: &str) -> String {
    if before.is_empty() || after.is_empty() {
        return format!("spad's metrics did not answer ({METRICS})");
    }
    let part = |family: &str| {
        let b = Buckets::parse(after, family).since(&Buckets::parse(before, family));
        format!(
            "{} p50 {} p99 {} ms",
            b.count(),
            b.percentile(50),
            b.percentile(99)
        )
    };
    format!(
        "spad's journal syncs {}; firewall applies {}; heard -> granted {}",
        part("spad_journal_sync_seconds"),
        part("spad_firewall_apply_seconds"),
        part("spad_grant_latency_seconds")
    )
}

/// spad's `/metrics` text (empty if it does not answer).
fn scrape(gw: &str) -> String {
    in_ns(gw, || {
        use std::io::Read;
        let Ok(mut stream) =
            std::net::TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(2))
        else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    })
}

fn outcome(
    sent: &[(u32, Instant)],
    granted: &HashMap<u32, Instant>,
    wall: Duration,
    traced: bool,
) -> Outcome {
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(a, at)| granted.get(a).map(|g| g.saturating_duration_since(*at)))
        .collect();
    // LOADBENCH_TRACE=FILE appends each packet's send offset and latency (µs), to see where
    // in a step the slow ones are.
    if let (true, Ok(path), Some(first)) = (traced, std::env::var("LOADBENCH_TRACE"), sent.first())
    {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            for (a, at) in sent {
                let took = granted.get(a).map(|g| g.saturating_duration_since(*at));
                let _ = writeln!(
                    file,
                    "{} {} {}",
                    sent.len(),
                    at.saturating_duration_since(first.1).as_micros(),
                    took.map_or(-1, |t| t.as_micros() as i64)
                );
            }
        }
    }
    latencies.sort();
    Outcome {
        sent: sent.len(),
        granted: latencies.len(),
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
        wall,
    }
}

/// What spad did with a flood: frames its capture delivered to the pipeline, frames the
/// kernel dropped because the ring was full, and the CPU it used meanwhile.
struct Handled {
    delivered: u64,
    kernel_drops: u64,
    /// Cut by the kernel's per-source budget (`packet-rate`) before the ring.
    kernel_limited: u64,
    cpu: Duration,
}

impl std::fmt::Display for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.cpu.as_secs_f64().max(1e-6);
        write!(
            f,
            "kernel cut {} over packet-rate; spad handled {} with {:.0} ms CPU = {:.0} per core-second; ring full dropped {}",
            self.kernel_limited,
            self.delivered,
            self.cpu.as_secs_f64() * 1e3,
            self.delivered as f64 / seconds,
            self.kernel_drops
        )
    }
}

/// Floods from one thread at full speed while [`LEGIT_DURING_FLOOD`] legitimate knocks go out
/// [`LEGIT_EVERY`] apart.
fn flood_scenario(
    bench: &Bench,
    fd: &Arc<OwnedFd>,
    events: &mpsc::Receiver<(u32, Instant)>,
    flood: Vec<Vec<u8>>,
    legit: &[Vec<u8>],
    offset: usize,
) -> (Outcome, u64, Handled) {
    bench.flush_grants();
    while events.try_recv().is_ok() {}
    let cpu_before = bench.cpu();
    let counted_before = bench.counters();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let (fd, stop) = (Arc::clone(fd), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut count = 0u64;
            for frame in flood.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if send(&fd, frame) {
                    count += 1;
                }
            }
            count
        })
    };
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let frames: Vec<_> = legit
        .iter()
        .enumerate()
        .map(|(i, p)| (source(offset + i), datagram(source(offset + i), p)))
        .collect();
    let mut sent = Vec::new();
    for (address, frame) in &frames {
        if send(fd, frame) {
            sent.push((u32::from(*address), Instant::now()));
        }
        std::thread::sleep(LEGIT_EVERY);
    }
    let granted = collect(events, &sent, Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let flooded = flooder.join().unwrap();
    let wall = started.elapsed();
    let cpu = bench.cpu().saturating_sub(cpu_before);
    let counted = bench.counters();
    let delta = |name: &str| {
        counted
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(counted_before.get(name).copied().unwrap_or(0))
    };
    let handled = Handled {
        delivered: delta("capture_delivered"),
        kernel_drops: delta("capture_kernel_drops"),
        kernel_limited: delta("capture_kernel_source_limited"),
        cpu,
    };
    (outcome(&sent, &granted, wall, false), flooded, handled)
}

/// One flood scenario's line: `what: sent in … s (rate/s; what spad did); legit knocks …`.
fn report_flood(what: &str, sent_text: &str, sent: u64, outcome: &Outcome, handled: &Handled) {
    let seconds = outcome.wall.as_secs_f64();
    println!(
        "{what}: {sent_text} in {seconds:.1} s ({:.0}/s; {handled}); legit knocks granted {}/{} p50 {} ms p99 {} ms",
        sent as f64 / seconds,
        outcome.granted,
        outcome.sent,
        ms(outcome.p50),
        ms(outcome.p99)
    );
}

fn main() {
    assert!(
        spa_e2e::can_run(),
        "run as root (it creates network namespaces)"
    );
    let mut rates: Vec<u64> = vec![1_000, 2_000, 5_000, 10_000, 15_000, 20_000];
    let mut seconds = 2u64;
    let mut spad = spa_e2e::workspace()
        .join("target/release/spad")
        .display()
        .to_string();
    let mut with_fwknopd = true;
    let mut packet_rate: Option<u32> = None;
    let mut fwknopd_udp = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rates" => {
                rates = args
                    .next()
                    .expect("--rates 1000,2000")
                    .split(',')
                    .map(|r| r.parse().expect("a rate"))
                    .collect();
            }
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            "--spad" => spad = args.next().expect("--spad PATH"),
            "--no-fwknopd" => with_fwknopd = false,
            "--packet-rate" => {
                packet_rate = Some(
                    args.next()
                        .and_then(|s| s.parse::<u32>().ok())
                        .expect("--packet-rate N (spad's packet-rate; 0 = no kernel budget)"),
                )
            }
            "--fwknopd-pcap" => fwknopd_udp = false,
            other => {
                eprintln!("loadbench: unknown argument {other}; use --rates, --seconds, --spad, --packet-rate, --no-fwknopd, --fwknopd-pcap");
                std::process::exit(2);
            }
        }
    }

    let mut bench = Bench::new();
    eprintln!("loadbench: generating {CLIENTS} client keys");
    let server = PrivateKey::from_bytes([0x77; 32]);
    let server_public = server.public_key();
    let keys: Vec<PrivateKey> = (0..CLIENTS).map(client_key).collect();
    let budget = packet_rate.map_or(String::new(), |rate| format!("packet-rate = {rate}\n"));
    let mut config = format!(
        "[server]\nprivate-key = \"server.key\"\nport = {PORT}\ncapture = \"af-packet\"\ninterfaces = [\"eth0\"]\nstate-dir = \"state\"\nbackend = \"nftables\"\ntable = \"{TABLE}\"\nmetrics = \"{METRICS}\"\n{budget}\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"10m\"\n"
    );
    for (i, key) in keys.iter().enumerate() {
        config.push_str(&format!(
            "\n[clients.c{i:05}]\npublic-key = \"{}\"\nservices = [\"ssh\"]\n",
            key.public_key()
        ));
    }
    let config_path = bench.dir.join("spad.toml");
    std::fs::write(&config_path, config).unwrap();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(bench.dir.join("server.key"))
            .unwrap();
        writeln!(file, "{}", server.to_base64().as_str()).unwrap();
    }
    bench.start_spad(&spad, config_path.to_str().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (events, listener) = grant_listener(&bench.gw, Arc::clone(&stop));
    let fd = Arc::new(raw_socket(&bench.client));

    println!("spad load benchmark: {CLIENTS} client keys, one spoofed source per packet, grant = kernel NEWSETELEM event");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    println!("{}", disk_floor(&bench.dir.join("state")));
    println!("{}", group_commit_floor(&bench.dir.join("state"), 1_000, 4));
    println!(
        "{:>8} {:>8} {:>8} {:>6} {:>10} {:>9} {:>9} {:>14}",
        "offered/s", "sent", "granted", "lost", "granted/s", "p50 ms", "p99 ms", "spad CPU/grant"
    );
    let mut spad_steps = Vec::new();
    let mut cold = Vec::new();
    let mut views = Vec::new();
    for (step, &rate) in rates.iter().enumerate() {
        let count = (rate * seconds) as usize;
        // Each step opens with WARM_UP of sending at its rate, from sources of its own, not
        // counted: the table reports the sustained rate. What the first packets after the
        // idle gap between steps cost is reported on its own line below the table.
        let warm = (rate as u128 * WARM_UP.as_millis() / 1000) as usize;
        assert!(
            warm + count < 60_000,
            "at most 60,000 packets per step (distinct sources)"
        );
        let packets = seal_packets(&keys, &server_public, warm + count, step as u64 + 1);
        bench.flush_grants();
        while events.try_recv().is_ok() {}
        let scraped = scrape(&bench.gw);
        let mut cpu_before = bench.cpu();
        let mut started = Instant::now();
        let measured_from = u32::from(source(warm));
        let mut sent = paced(&fd, &packets, rate, 0, |n| {
            if n == warm {
                cpu_before = bench.cpu();
                started = Instant::now();
            }
        });
        let granted = collect(&events, &sent, Duration::from_secs(2));
        let warming: Vec<(u32, Instant)> = sent
            .iter()
            .copied()
            .filter(|(a, _)| *a < measured_from)
            .take(COLD_PACKETS)
            .collect();
        let c = outcome(&warming, &granted, Duration::ZERO, false);
        cold.push((rate, c));
        sent.retain(|(a, _)| *a >= measured_from);
        let last = granted.values().max().copied().unwrap_or(started);
        let o = outcome(
            &sent,
            &granted,
            last.saturating_duration_since(started),
            true,
        );
        let cpu = bench.cpu().saturating_sub(cpu_before);
        views.push((rate, spad_view(&scraped, &scrape(&bench.gw))));
        println!(
            "{:>9} {:>8} {:>8} {:>6} {:>10.0} {:>9} {:>9} {:>11.0} µs",
            rate,
            o.sent,
            o.granted,
            o.sent - o.granted,
            o.granted as f64 / o.wall.as_secs_f64().max(1e-9),
            ms(o.p50),
            ms(o.p99),
            cpu.as_secs_f64() * 1e6 / o.granted.max(1) as f64
        );
        spad_steps.push((rate, o));
    }
    for (rate, view) in &views {
        println!("   {rate}/s step, warm-up included: {view}");
    }
    for (rate, c) in &cold {
        println!(
            "   first {} packets of the {rate}/s step's warm-up, after ~1 s idle: granted {}/{} p50 {} ms p99 {} ms",
            c.sent,
            c.granted,
            c.sent,
            ms(c.p50),
            ms(c.p99)
        );
    }

    // What an operator's reads cost the packets: `spad status` every 250 ms (a dashboard, or
    // a Prometheus scrape: both read every live grant) while 1,000/s arrive, with the last
    // step's grants still live. Sources from the top of the range, clear of the ladder's.
    {
        let live = bench.status()["live_grants"].as_u64().unwrap_or(0);
        let rate = 1_000u64;
        let warm = (rate as u128 * WARM_UP.as_millis() / 1000) as usize;
        let count = 2 * rate as usize;
        let offset = 65_000 - warm - count;
        let packets = seal_packets(&keys, &server_public, warm + count, 80);
        while events.try_recv().is_ok() {}
        let reading = Arc::new(AtomicBool::new(true));
        let reader = {
            let reading = Arc::clone(&reading);
            let (gw, spad, config) = (
                bench.gw.clone(),
                bench.spad_path.clone().unwrap_or_default(),
                bench.config_path.clone().unwrap_or_default(),
            );
            std::thread::spawn(move || {
                let mut took = Vec::new();
                while reading.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    spad_status(&gw, &spad, &config);
                    took.push(start.elapsed());
                    std::thread::sleep(Duration::from_millis(250).saturating_sub(start.elapsed()));
                }
                took
            })
        };
        let measured_from = u32::from(source(offset + warm));
        let mut sent = paced(&fd, &packets, rate, offset, |_| {});
        let granted = collect(&events, &sent, Duration::from_secs(2));
        reading.store(false, Ordering::Relaxed);
        let mut took = reader.join().unwrap();
        took.sort();
        sent.retain(|(a, _)| *a >= measured_from);
        let o = outcome(&sent, &granted, Duration::ZERO, false);
        println!(
            "status every 250 ms at {rate}/s with {live} grants live: granted {}/{} p50 {} ms p99 {} ms; {} status calls took p50 {} / max {} ms",
            o.granted,
            o.sent,
            ms(o.p50),
            ms(o.p99),
            took.len(),
            ms(percentile(&took, 50)),
            ms(took.last().copied().unwrap_or_default())
        );
    }

    // A captured valid packet, granted once, then replayed at full speed from its source.
    let captured = seal_packets(&keys, &server_public, 1, 90);
    let legit = seal_packets(&keys[1..], &server_public, LEGIT_DURING_FLOOD, 91);
    let (replay_outcome, replays, replay_cpu) = flood_scenario(
        &bench,
        &fd,
        &events,
        vec![datagram(source(50_000), &captured[0])],
        &legit,
        100,
    );
    report_flood(
        "replay flood",
        &format!("{replays} copies of one valid packet"),
        replays,
        &replay_outcome,
        &replay_cpu,
    );
    let mut garbage = vec![0u8; captured[0].len()];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut garbage);
    let legit = seal_packets(&keys[2..], &server_public, LEGIT_DURING_FLOOD, 92);
    let (garbage_outcome, junk, junk_cpu) = flood_scenario(
        &bench,
        &fd,
        &events,
        vec![datagram(source(50_001), &garbage)],
        &legit,
        200,
    );
    report_flood(
        "garbage flood",
        &format!("{junk} packets of {} bytes", garbage.len()),
        junk,
        &garbage_outcome,
        &junk_cpu,
    );
    // The same garbage from 16,000 spoofed sources, a few dozen packets per second each: under
    // any per-source budget, so every packet reaches spad's keyed pre-check.
    let legit = seal_packets(&keys[3..], &server_public, LEGIT_DURING_FLOOD, 93);
    let spoofed: Vec<Vec<u8>> = (0..SPOOFED_SOURCES)
        .map(|i| datagram(source(49_000 + i), &garbage))
        .collect();
    let (spoofed_outcome, spoofed_junk, spoofed_cpu) =
        flood_scenario(&bench, &fd, &events, spoofed, &legit, 300);
    report_flood(
        &format!("garbage flood from {SPOOFED_SOURCES} sources"),
        &format!("{spoofed_junk} packets"),
        spoofed_junk,
        &spoofed_outcome,
        &spoofed_cpu,
    );
    bench.stop_spad();
    let log = bench.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("error")).collect();
    for line in errors.iter().take(3) {
        println!("spad error ({} in all): {line}", errors.len());
    }
    if let Some(line) = log.lines().find(|l| l.contains("stopping:")) {
        println!("spad: {}", line.split("spad: ").nth(1).unwrap_or(line));
    }

    if !with_fwknopd {
        println!("fwknopd: skipped (--no-fwknopd)");
    } else if !fwknopd::installed() {
        println!(
            "fwknopd: not installed (Debian: fwknop-server fwknop-client), comparison skipped"
        );
    } else {
        match fwknopd_ladder(&bench, &fd, &events, &rates, seconds, fwknopd_udp) {
            Ok(steps) => comparison(&spad_steps, &steps),
            Err(e) => println!("fwknopd: comparison not run: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    listener.join().unwrap();
}

/// The same offered rates sent to fwknopd (UDP-server mode); at most
/// `fwknopd::MAX_PER_STEP` packets per step, so a step may be shorter than `seconds`.
fn fwknopd_ladder(
    bench: &Bench,
    fd: &OwnedFd,
    events: &mpsc::Receiver<(u32, Instant)>,
    rates: &[u64],
    seconds: u64,
    udp_server: bool,
) -> Result<Vec<(u64, Outcome)>, String> {
    // spad's table outlives it (fail closed) and drops the SPA port: remove it first.
    run(
        "ip",
        &[
            "netns", "exec", &bench.gw, "nft", "delete", "table", "inet", TABLE,
        ],
    );
    let mut daemon = fwknopd::Fwknopd::start(&bench.gw, &bench.dir, PORT, udp_server)?;
    println!(
        "fwknopd ({} mode, iptables-nft), grant = kernel NEWRULE event; at most {} packets per step",
        if udp_server { "UDP-server" } else { "pcap" },
        fwknopd::MAX_PER_STEP
    );
    println!(
        "{:>9} {:>8} {:>8} {:>6} {:>10} {:>9} {:>9}",
        "offered/s", "sent", "granted", "lost", "granted/s", "p50 ms", "p99 ms"
    );
    let mut steps = Vec::new();
    for &rate in rates {
        let count = ((rate * seconds) as usize).min(fwknopd::MAX_PER_STEP);
        let sources: Vec<Ipv4Addr> = (0..count).map(source).collect();
        let packets = daemon.packets(&sources, GW)?;
        daemon.flush();
        while events.try_recv().is_ok() {}
        let started = Instant::now();
        // No warm-up here: a step is capped at MAX_PER_STEP packets, and fwknopd's latency is
        // its capture loop's, not a cold cache's.
        let sent = paced(fd, &packets, rate, 0, |_| {});
        let granted = collect(events, &sent, Duration::from_secs(3));
        let last = granted.values().max().copied().unwrap_or(started);
        let o = outcome(
            &sent,
            &granted,
            last.saturating_duration_since(started),
            true,
        );
        println!(
            "{:>9} {:>8} {:>8} {:>6} {:>10.0} {:>9} {:>9}",
            rate,
            o.sent,
            o.granted,
            o.sent - o.granted,
            o.granted as f64 / o.wall.as_secs_f64().max(1e-9),
            ms(o.p50),
            ms(o.p99)
        );
        steps.push((rate, o));
    }
    daemon.stop();
    let log = daemon.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("error"))
        .collect();
    for line in errors.iter().take(3) {
        println!("fwknopd error ({} in all): {line}", errors.len());
    }
    if steps.iter().all(|(_, o)| o.granted == 0) {
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        return Err(format!(
            "fwknopd granted nothing; the end of its log:\n{tail}"
        ));
    }
    Ok(steps)
}

/// One table, both daemons per offered rate, and the ratios spad ÷ fwknopd.
fn comparison(spad: &[(u64, Outcome)], fwknopd: &[(u64, Outcome)]) {
    let rate_of = |o: &Outcome| o.granted as f64 / o.wall.as_secs_f64().max(1e-9);
    // Below 1/2 as "1/N", so a small ratio keeps its digits.
    let ratio = |a: f64, b: f64| {
        if b <= 0.0 || a <= 0.0 {
            "-".to_string()
        } else if a >= b {
            format!("{:.1}", a / b)
        } else if 2.0 * a >= b {
            format!("{:.2}", a / b)
        } else {
            format!("1/{:.0}", b / a)
        }
    };
    println!("comparison (ratios are spad ÷ fwknopd)");
    println!(
        "{:>9} | {:>22} {:>17} | {:>22} {:>17} | {:>9} {:>7} {:>7}",
        "offered/s",
        "spad sent/granted/lost",
        "p50/p99 ms",
        "fwknopd sent/gr./lost",
        "p50/p99 ms",
        "granted/s",
        "p50",
        "p99"
    );
    for ((rate, s), (_, f)) in spad.iter().zip(fwknopd) {
        println!(
            "{:>9} | {:>22} {:>17} | {:>22} {:>17} | {:>9} {:>7} {:>7}",
            rate,
            format!("{}/{}/{}", s.sent, s.granted, s.sent - s.granted),
            format!("{}/{}", ms(s.p50), ms(s.p99)),
            format!("{}/{}/{}", f.sent, f.granted, f.sent - f.granted),
            format!("{}/{}", ms(f.p50), ms(f.p99)),
            ratio(rate_of(s), rate_of(f)),
            ratio(s.p50.as_secs_f64(), f.p50.as_secs_f64()),
            ratio(s.p99.as_secs_f64(), f.p99.as_secs_f64())
        );
    }
}
