//! Knock-state flood benchmark: spad's memory and a legitimate user's door opens while spoofed
//! sources flood the knock ports.
//!
//! In a namespace lab (`conf/knockd.toml`, door `openssh` = 7000, 8000, 9000/tcp, decoys 6999
//! and 9001), client namespace `a` sends TCP SYNs at the door's ports and decoys, each from a
//! new spoofed source (10.0.0.0/8 and 2001:db8:ff00::/40) through raw sockets, as fast as it
//! can (or `--pps`), for `--seconds`. Meanwhile client `b` opens the door with the real `knock`
//! client, alternating IPv4 and IPv6, `--legit` times per family, and each open is counted when
//! spad logs it. Reported: spad's RSS before, at its peak, right after and after `--settle`
//! seconds, where it is right after (capture ring, anonymous memory such as the knock table,
//! code, the rest: from /proc/PID/smaps), packets sent, and legit opens per family. Needs
//! root.
//!
//! `cargo build --workspace --bins && target/debug/knockflood [--seconds 20] [--legit 5]
//!  [--pps N] [--settle 10] [--backend nftables|iptables]`; with `SPA_E2E_PROFILE=release` it
//! runs `target/release/spad` (build it with `cargo build --release -p spad -p spa-client`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Seek};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use spa_e2e::*;

#[derive(Debug)]
struct Options {
    seconds: u64,
    legit: u32,
    pps: Option<u64>,
    settle: u64,
    backend: Backend,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        seconds: 20,
        legit: 5,
        pps: None,
        settle: 10,
        backend: Backend::Nftables,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => o.seconds = value()?.parse()?,
            "--legit" => o.legit = value()?.parse()?,
            "--pps" => o.pps = Some(value()?.parse()?),
            "--settle" => o.settle = value()?.parse()?,
            "--backend" => {
                o.backend = match value()?.as_str() {
                    "nftables" => Backend::Nftables,
                    "iptables" => Backend::Iptables,
                    other => bail!("unknown backend {other}; use nftables or iptables"),
                }
            }
            other => bail!("unknown option {other}; see the header of knockflood.rs"),
        }
    }
    if o.seconds == 0 || o.seconds > 600 || o.legit == 0 || o.legit > 100 {
        bail!("--seconds is 1-600 and --legit 1-100");
    }
    Ok(o)
}

/// The one's-complement sum used by IP checksums.
fn sum16(mut acc: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        acc += u32::from(word);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// A 20-byte TCP SYN with its checksum over the pseudo-header of `source` → `dest`.
fn tcp_syn(source: IpAddr, dest: IpAddr, sport: u16, dport: u16, seq: u32) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut acc = match (source, dest) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum16(sum16(0, &s.octets()), &d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum16(sum16(0, &s.octets()), &d.octets()),
        _ => unreachable!("one family per packet"),
    };
    acc += 6 + 20; // protocol and TCP length
    let check = fold(sum16(acc, &tcp));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    tcp
}

/// A whole IPv4 or IPv6 packet carrying a SYN from `source` to `dest:dport`.
fn packet(source: IpAddr, dest: IpAddr, dport: u16, n: u64, out: &mut Vec<u8>) {
    out.clear();
    let tcp = tcp_syn(source, dest, 40_000 + (n % 20_000) as u16, dport, n as u32);
    match (source, dest) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // Version/IHL, TOS, total length, id, flags, TTL 64, TCP; the kernel fills the
            // header checksum of a raw IPPROTO_RAW packet.
            out.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => unreachable!("one family per packet"),
    }
    out.extend_from_slice(&tcp);
}

/// Knock ports of `conf/knockd.toml`'s door and decoys, first port most often.
const PORTS: [u16; 8] = [7000, 7000, 7000, 8000, 7500, 8500, 6999, 9001];

/// Floods from namespace `ns` until `stop`; returns packets sent.
fn flood(ns: &str, v6: bool, pps: Option<u64>, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    in_ns(ns, move || {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        // IPPROTO_RAW: we write the IP header ourselves, spoofed source included.
        let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
            .expect("raw socket (run as root)");
        let dest: IpAddr = if v6 {
            GW6.parse().unwrap()
        } else {
            GW4.parse().unwrap()
        };
        let to = SockAddr::from(SocketAddr::new(dest, 0));
        let mut buf = Vec::with_capacity(60);
        let started = Instant::now();
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let source = if v6 {
                IpAddr::V6(Ipv6Addr::from(
                    0x2001_0db8_ff00_0000_0000_0000_0000_0000u128 + u128::from(n),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + (n as u32 & 0x00ff_ffff)))
            };
            let port = PORTS[(n.wrapping_mul(2_654_435_761) >> 7) as usize % PORTS.len()];
            packet(source, dest, port, n, &mut buf);
            // A full socket buffer (ENOBUFS) just means the flood is at line rate.
            if socket.send_to(&buf, &to).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
            if let Some(pps) = pps {
                if n.is_multiple_of(256) {
                    let due = Duration::from_secs_f64(n as f64 / pps.max(1) as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        }
    });
}

/// Counts lines containing `needles` in a growing log, reading only what is new.
struct LogTail {
    file: std::fs::File,
    partial: Vec<u8>,
    counts: Vec<u64>,
    needles: Vec<String>,
}

impl LogTail {
    fn new(path: &std::path::Path, needles: &[String]) -> LogTail {
        LogTail {
            file: std::fs::File::open(path).unwrap(),
            partial: Vec::new(),
            counts: vec![0; needles.len()],
            needles: needles.to_vec(),
        }
    }

    fn poll(&mut self) -> &[u64] {
        let mut chunk = Vec::new();
        self.file.read_to_end(&mut chunk).unwrap();
        self.partial.extend_from_slice(&chunk);
        if let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') {
            let text = String::from_utf8_lossy(&self.partial[..end]).into_owned();
            for line in text.lines() {
                for (i, needle) in self.needles.iter().enumerate() {
                    if line.contains(needle.as_str()) {
                        self.counts[i] += 1;
                    }
                }
            }
            self.partial.drain(..=end);
        }
        let _ = self.file.stream_position();
        &self.counts
    }
}

/// spad's resident and peak resident set size in kB.
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds spad has used (user + system), from /proc/PID/stat.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Where spad's resident memory is, from /proc/PID/smaps: the capture rings (mappings of
/// `socket:[…]`), anonymous memory (heap, knock table), spad's code and the rest, in kB.
fn rss_by_mapping(pid: u32) -> [(&'static str, u64); 4] {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut sums = [
        ("ring", 0),
        ("anonymous", 0),
        ("spad code", 0),
        ("other", 0),
    ];
    let mut which = 3;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = fields.nth(4).unwrap_or("");
            which = if name.starts_with("socket:") {
                0
            } else if name.is_empty() || name == "[heap]" {
                1
            } else if name.ends_with("/spad") {
                2
            } else {
                3
            };
        } else if first == "Rss:" {
            sums[which].1 += fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    sums
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    if !can_run() {
        bail!("knockflood creates network namespaces: run it as root");
    }
    let mut lab = Lab::new("knockd.toml");
    std::fs::write(lab.path("onetime.txt"), "7100,7200,7300\n")?;
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse()?);
    let index = lab.start_spad("knockd.toml", o.backend);
    let pid = lab.spad_pid(index);
    let (before, _) = rss_kb(pid);
    let cpu_before = cpu_secs(pid);
    let needles = [
        "203.0.113.20: door openssh: OPEN".to_string(),
        "2001:db8:1::20: door openssh: OPEN".to_string(),
    ];
    let mut tail = LogTail::new(&lab.path("spad.log"), &needles);
    tail.poll();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let floods: Vec<_> = [false, true]
        .into_iter()
        .map(|v6| {
            let (ns, stop, sent) = (lab.a.clone(), stop.clone(), sent.clone());
            let pps = o.pps.map(|p| p / 2);
            std::thread::spawn(move || flood(&ns, v6, pps, stop, sent))
        })
        .collect();

    // Legit opens spread over the flood, alternating families.
    let start = Instant::now();
    let attempts = 2 * o.legit;
    let interval = Duration::from_secs(o.seconds) / attempts;
    let mut opened = [0u32; 2];
    for attempt in 0..attempts {
        let at = interval * attempt + interval / 2;
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let family = (attempt % 2) as usize;
        let seen = tail.poll()[family];
        let (flag, host) = if family == 0 {
            ("-4", GW4)
        } else {
            ("-6", GW6)
        };
        let _ = lab.try_exec(&lab.b, "knock", &[flag, host, "7000", "8000", "9000"]);
        let deadline = interval.min(Duration::from_secs(3));
        if wait_until(deadline, || tail.poll()[family] > seen) {
            opened[family] += 1;
        }
    }
    if let Some(rest) = Duration::from_secs(o.seconds).checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.join().expect("flood thread");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu_before;
    let (after, peak) = rss_kb(pid);
    let by_mapping = rss_by_mapping(pid);
    std::thread::sleep(Duration::from_secs(o.settle));
    let (settled, _) = rss_kb(pid);
    let packets = sent.load(Ordering::Relaxed);
    lab.stop_spad(index, false);
    let log = lab.log();
    // spad's own count of knock packets it handled, from its exit line.
    let handled = log
        .lines()
        .rev()
        .find_map(|l| l.split(" knocks=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    println!(
        "knockflood: {} s spoofed SYN flood at the knock ports, backend {}, {} spad",
        o.seconds,
        o.backend.name(),
        std::env::var("SPA_E2E_PROFILE").unwrap_or_else(|_| "debug".into())
    );
    println!(
        "  flood packets sent      {packets} ({:.0}/s, each from a new source)",
        packets as f64 / elapsed
    );
    println!(
        "  knocks spad handled     {handled} ({:.0}%; the rest dropped before it, in the socket)",
        100.0 * handled as f64 / packets.max(1) as f64
    );
    println!(
        "  spad CPU during flood   {:.0}% of one core (load average {})",
        100.0 * cpu / elapsed,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    println!("  spad RSS before         {}", mb(before));
    println!("  spad RSS peak           {}", mb(peak));
    println!("  spad RSS after flood    {}", mb(after));
    println!("  spad RSS after {:>2} s     {}", o.settle, mb(settled));
    let parts: Vec<String> = by_mapping
        .iter()
        .map(|(name, kb)| format!("{name} {}", mb(*kb)))
        .collect();
    println!("  RSS after, by mapping   {}", parts.join(", "));
    println!("  legit opens IPv4        {}/{}", opened[0], o.legit);
    println!("  legit opens IPv6        {}/{}", opened[1], o.legit);
    println!("  spad log                {} lines", log.lines().count());
    if opened.iter().any(|n| *n < o.legit) {
        println!("  the legit client's log lines:");
        for line in log
            .lines()
            .filter(|l| l.contains("203.0.113.20") || l.contains("2001:db8:1::20"))
        {
            println!("    {line}");
        }
    }
    Ok(())
}
