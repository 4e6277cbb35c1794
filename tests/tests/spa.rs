//! End to end: one SPA packet opens a hidden port for that source address only, until
//! the grant expires in the kernel; replays and forgeries are refused and never answered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use spa_e2e::*;

const CONF: &str = "demo.toml";
const T: Duration = Duration::from_millis(700);

/// A lab whose gateway runs a dual-stack echo service on the SSH port.
fn lab_with_ssh(backend: Backend) -> (Lab, Echo) {
    let mut lab = Lab::new(CONF);
    let echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    lab.start_spad(CONF, backend);
    (lab, echo)
}

fn send_raw(ns: &str, to: SocketAddr, bytes: Vec<u8>) {
    in_ns(ns, move || {
        let s =
            std::net::UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.send_to(&bytes, to).unwrap();
    });
}

pub fn hidden_port_opens_for_the_knocker_only_and_expires(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    let ssh = Lab::gw4(22);
    assert_eq!(
        tcp_probe(&lab.a, ssh, T),
        Connect::TimedOut,
        "filtered before the knock"
    );
    assert_eq!(tcp_probe(&lab.b, ssh, T), Connect::TimedOut);

    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "3s"], false);
    assert!(
        lab.wait_log(
            "granted owner=alice address=203.0.113.10 services=ssh(3s)",
            1
        ),
        "{}",
        lab.log()
    );
    assert_eq!(
        tcp_probe(&lab.a, ssh, T),
        Connect::Open,
        "open for the knocker"
    );
    assert_eq!(
        tcp_probe(&lab.b, ssh, T),
        Connect::TimedOut,
        "still filtered for others"
    );

    // A connection opened before expiry survives it; new ones are refused after it.
    let mut held = Held::open(&lab.a, ssh).unwrap();
    assert!(held.echo());
    assert!(
        wait_until(Duration::from_secs(8), || tcp_probe(
            &lab.a,
            ssh,
            Duration::from_millis(300)
        ) == Connect::TimedOut),
        "grant did not expire"
    );
    assert!(
        held.echo(),
        "established connection must survive expiry\n{}",
        lab.snapshot()
    );
    assert!(!lab.nft_list().contains("203.0.113.10") || backend == Backend::Iptables);
}

pub fn replay_is_refused_from_another_ip_and_after_restarts(backend: Backend) {
    let (mut lab, _echo) = lab_with_ssh(backend);
    let saved = lab.path("packet.bin");
    lab.knock(
        &lab.a,
        "alice",
        &["ssh"],
        &["--save-packet", saved.to_str().unwrap()],
        false,
    );
    assert!(lab.wait_log("granted owner=alice", 1));
    let packet = std::fs::read(&saved).unwrap();

    send_raw(&lab.b, Lab::gw4(62201), packet.clone());
    // While spad runs, a replay is recognised before the handshake.
    assert!(
        lab.wait_log("reason=\"replayed: this exact packet was seen before", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);

    // Clean restart, then kill -9: the journal survives both.
    let first = 0;
    lab.stop_spad(first, false);
    let second = lab.start_spad(CONF, backend);
    send_raw(&lab.b, Lab::gw4(62201), packet.clone());
    assert!(
        lab.wait_log("reason=\"client=alice replayed", 1),
        "{}",
        lab.log()
    );
    lab.stop_spad(second, true);
    lab.start_spad(CONF, backend);
    send_raw(&lab.b, Lab::gw4(62201), packet);
    assert!(
        lab.wait_log("reason=\"client=alice replayed", 2),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);
    // The grant made before the restarts is still live in the kernel for A.
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
}

/// Packets sealed with alice's key, each asking for a different duration (so the log tells
/// them apart), with distinct timestamps.
fn alice_packets(lab: &Lab, count: u32) -> Vec<Vec<u8>> {
    use spa_shared::keys::{PrivateKey, PublicKey};
    use spa_shared::payload::{Kind, Request};
    let read = |rel: &str| std::fs::read_to_string(lab.path(rel)).unwrap();
    let alice = PrivateKey::from_base64(read("keys/alice.key").trim()).unwrap();
    let server = PublicKey::from_base64(&lab.server_public_key()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    (0..count)
        .map(|i| {
            let request = Request {
                kind: Kind::Open,
                timestamp: now + u64::from(i),
                nonce: [i as u8; 16],
                duration_secs: 100 + i,
                address: None,
                services: vec!["ssh".into()],
            };
            spa_shared::packet::seal(&mut rand_core::OsRng, &alice, &server, &request).unwrap()
        })
        .collect()
}

/// `kill -9` while a stream of packets is being granted, then every packet sent again: no
/// packet is ever granted twice, whatever instant the kill hit (after the journal commit and
/// before the grant, in the middle of a batch, ...).
pub fn no_packet_is_granted_twice_across_a_kill_9_mid_stream(backend: Backend) {
    const N: u32 = 400;
    let (mut lab, _echo) = lab_with_ssh(backend);
    let packets = alice_packets(&lab, N);
    let sender = {
        let packets = packets.clone();
        let ns = lab.a.clone();
        std::thread::spawn(move || {
            in_ns(&ns, move || {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                for p in &packets {
                    s.send_to(p, Lab::gw4(62201)).unwrap();
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        })
    };
    assert!(lab.wait_log("granted owner=alice", 5), "{}", lab.log());
    lab.stop_spad(0, true);
    sender.join().unwrap();
    let before = lab.log().matches("granted owner=alice").count();
    assert!(
        before < N as usize,
        "the kill came too late to test anything"
    );
    lab.start_spad(CONF, backend);
    in_ns(&lab.a.clone(), move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for p in &packets {
            s.send_to(p, Lab::gw4(62201)).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    // The packets not granted before the kill are granted now (waited for, not assumed)...
    let granted_after_restart = || {
        let log = lab.log();
        log[log.rfind("listening port=").unwrap()..].contains("granted owner=alice")
    };
    wait_until(Duration::from_secs(15), granted_after_restart);
    // ...then wait until spad has gone quiet (refusal lines are rate-limited, so they cannot
    // be counted one by one).
    let mut previous = String::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let log = lab.log();
            let quiet = log == previous;
            previous = log;
            quiet
        }),
        "{}",
        lab.log()
    );
    let log = lab.log();
    let after_restart = &log[log.rfind("listening port=").unwrap()..];
    assert!(
        after_restart.contains("granted owner=alice"),
        "packets sent while spad was down are granted after the restart:\n{log}"
    );
    let mut granted: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("granted owner=alice ").nth(1))
        .filter_map(|l| l.split("services=").nth(1))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let total = granted.len();
    granted.sort_unstable();
    granted.dedup();
    assert_eq!(granted.len(), total, "a packet was granted twice:\n{log}");
    assert!(total <= N as usize);
}

/// A captured valid packet replayed thousands of times from another address costs no
/// public-key work (with spad behind, each copy is cut in the kernel over the source's `packet-rate`, or
/// counted `recent_packet`; none reaches the handshake), and a legitimate knock sent after
/// the flood is still granted.
pub fn a_replay_flood_is_dropped_before_the_handshake(backend: Backend) {
    const COPIES: usize = 3000;
    let (mut lab, _echo) = lab_with_ssh(backend);
    let packets = alice_packets(&lab, 10);
    send_raw(&lab.a, Lab::gw4(62201), packets[0].clone());
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    // spad falls behind, which engages the kernel's per-source budget (for 2 s, and as long
    // as it keeps cutting a flood).
    assert!(
        lab.make_spad_fall_behind(0, CONF, &lab.b.clone(), Lab::gw4(62201)),
        "{}",
        lab.log()
    );
    let captured = packets[0].clone();
    in_ns(&lab.b.clone(), move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..COPIES {
            s.send_to(&captured, Lab::gw4(62201)).unwrap();
        }
    });
    // Copies still queued when the flood ends may crowd out a knock in the capture queue
    // (the kernel drops it, which the capture counts); a knock is granted once they drain.
    let granted = packets[1..].iter().any(|p| {
        send_raw(&lab.b, Lab::gw4(62201), p.clone());
        wait_until(Duration::from_millis(500), || {
            lab.log().matches("granted owner=alice").count() >= 2
        })
    });
    assert!(granted, "{}", lab.log());
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::Open);
    lab.stop_spad(0, false);
    let log = lab.log();
    let stop = log.lines().find(|l| l.contains("stopping:")).unwrap();
    let count = |reason: &str| -> usize {
        stop.split(&format!(" refusals{{reason=\"{reason}\"}}="))
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    // Some copies may be lost in the capture queue; those seen were all dropped before DH.
    assert!(count("recent_packet") > 0, "{stop}");
    assert_eq!(count("replayed") + count("handshake"), 0, "{stop}");
    // Engaged, the default packet-rate (20,000/s, 1,000 at once) cut the rest of the 3,000
    // in the kernel, before the capture ring; every copy is accounted for by one counter or
    // another.
    let counter = |name: &str| -> usize {
        stop.split(&format!(" {name}="))
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    let limited = counter("capture_kernel_source_limited");
    assert!(limited > 0, "{stop}");
    assert!(
        limited + count("recent_packet") + counter("capture_kernel_drops") >= COPIES,
        "{stop}"
    );
}

pub fn forgeries_are_refused_each_with_its_reason_and_nothing_is_sent_back(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    let capture = lab.path("gw-replies.pcap");
    let tcpdump = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.a, "tcpdump", "-i", "eth0", "-n", "-U", "-w", capture.to_str().unwrap()])
        .arg(format!("ip src {GW4} or (ip6 src {GW6} and not (icmp6 and (ip6[40] == 135 or ip6[40] == 136)))"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500)); // tcpdump has no readiness signal

    // Unknown client key.
    lab.knock(&lab.a, "mallory", &["ssh"], &[], false);
    assert!(lab.wait_log("unknown client key", 1), "{}", lab.log());
    // Wrong server key: the pre-check drops it before any public-key work.
    let mut args: Vec<String> = vec!["knock".into()];
    args.extend(lab.knock_args("alice", false));
    args[4] = "Q6cy0vxiWws8pL+3ItHDN7v2vQq8ylWFJnhcyIdH+3I=".into();
    args.extend(["-s".into(), "ssh".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(lab.spa_in(&lab.a, &refs).status.success());
    assert!(lab.wait_log("pre-check failed", 1), "{}", lab.log());
    // A flipped bit in the encrypted part, with a valid-looking mac1 impossible to forge.
    let saved = lab.path("p.bin");
    lab.knock(
        &lab.a,
        "bob",
        &["ssh"],
        &["--save-packet", saved.to_str().unwrap()],
        false,
    );
    assert!(lab.wait_log("granted owner=bob", 1));
    let mut flipped = std::fs::read(&saved).unwrap();
    flipped[40] ^= 1;
    send_raw(&lab.a, Lab::gw4(62201), flipped);
    assert!(lab.wait_log("pre-check failed", 2), "{}", lab.log());
    // Stale and future timestamps.
    lab.knock(&lab.a, "alice", &["ssh"], &["--time-offset", "-120"], false);
    assert!(
        lab.wait_log("reason=\"client=alice stale", 1),
        "{}",
        lab.log()
    );
    lab.knock(&lab.a, "alice", &["ssh"], &["--time-offset", "3600"], false);
    assert!(
        lab.wait_log("reason=\"client=alice from the future", 1),
        "{}",
        lab.log()
    );
    // Garbage and a service the client may not use.
    send_raw(&lab.a, Lab::gw4(62201), vec![0x41; 200]);
    assert!(lab.wait_log("pre-check failed", 3), "{}", lab.log());
    lab.knock(&lab.a, "bob", &["vpn"], &[], false);
    assert!(
        lab.wait_log("client `bob` may not open service `vpn`", 1),
        "{}",
        lab.log()
    );

    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let out = tcpdump.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0 packets captured"),
        "the gateway answered something: {stderr}"
    );
    // Alice was never granted.
    assert!(!lab.log().contains("granted owner=alice"));
}

pub fn ipv6_knock_opens_for_that_v6_address(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    let ssh6 = Lab::gw6(22);
    assert_eq!(tcp_probe(&lab.a, ssh6, T), Connect::TimedOut);
    lab.knock(&lab.a, "alice", &["ssh"], &[], true);
    assert!(
        lab.wait_log("granted owner=alice address=2001:db8:1::10", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, ssh6, T), Connect::Open);
    assert_eq!(tcp_probe(&lab.b, ssh6, T), Connect::TimedOut);
    // v4 stays closed: the grant is for the observed source address only.
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
}

pub fn unprivileged_client_with_a_profile(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    // The client needs no privileges: run it as `nobody`, with a profile and a key it owns.
    let home = lab.path("nobody");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::copy(lab.path("keys/alice.key"), home.join("alice.key")).unwrap();
    let profile = format!(
        "server = \"{GW4}\"\nserver-public-key = \"{}\"\nprivate-key = \"alice.key\"\nservices = [\"ssh\"]\nduration = \"30s\"\n",
        lab.server_public_key()
    );
    std::fs::write(home.join("gw.toml"), profile).unwrap();
    for p in ["", "/alice.key", "/gw.toml"] {
        run(
            "chown",
            &["nobody:nogroup", &format!("{}{p}", home.display())],
        );
    }
    let spa = binary("spa").display().to_string();
    let out = lab.try_exec(
        &lab.a,
        "setpriv",
        &[
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            &spa,
            "knock",
            "-p",
            &format!("{}/gw.toml", home.display()),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lab.wait_log(
            "granted owner=alice address=203.0.113.10 services=ssh(30s)",
            1
        ),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    // A key file others can read is refused by the client too.
    run("chmod", &["644", &format!("{}/alice.key", home.display())]);
    let out = lab.try_exec(
        &lab.a,
        "setpriv",
        &[
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            &spa,
            "knock",
            "-p",
            &format!("{}/gw.toml", home.display()),
        ],
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

pub fn udp_listener_mode_and_interface_selection(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    // Knocks arriving on an interface spad does not capture are not seen.
    lab.start_spad(CONF, backend);
    let spa = binary("spa").display().to_string();
    let mut args: Vec<String> = vec!["knock".into()];
    args.extend(lab.knock_args("alice", false));
    args[2] = "192.168.1.1".into();
    args.extend(["-s".into(), "ssh".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut full = vec![spa.as_str()];
    full.extend(refs);
    lab.exec(&lab.lan, full[0], &full[1..]);
    lab.knock(&lab.a, "bob", &["ssh"], &[], false);
    assert!(lab.wait_log("granted owner=bob", 1), "{}", lab.log());
    assert!(
        !lab.log().contains("owner=alice"),
        "a packet on eth1 was captured: {}",
        lab.log()
    );
    lab.stop_spad(0, false);

    // capture = "udp": a plain socket instead of AF_PACKET.
    let conf = lab.path(CONF);
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("capture = \"af-packet\"", "capture = \"udp\"");
    std::fs::write(&conf, text).unwrap();
    lab.start_spad(CONF, backend);
    assert!(lab.log().contains("capture=udp listener"));
    lab.knock(&lab.a, "alice", &["ssh"], &[], false);
    assert!(
        lab.wait_log("granted owner=alice address=203.0.113.10", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
}

pub fn a_loose_server_key_is_refused_and_nothing_is_installed(backend: Backend) {
    let lab = Lab::new(CONF);
    run(
        "chmod",
        &["640", lab.path("keys/server.key").to_str().unwrap()],
    );
    let out = lab.try_exec(
        &lab.gw,
        binary("spad").to_str().unwrap(),
        &["run", "-c", lab.path(CONF).to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("mode 0640") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!lab.nft_list().contains("spad"));
    run("rm", &[lab.path("keys/server.key").to_str().unwrap()]);
    let out = lab.try_exec(
        &lab.gw,
        binary("spad").to_str().unwrap(),
        &["run", "-c", lab.path(CONF).to_str().unwrap()],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = backend;
}

pub fn ssh_proxy_command_knocks_then_relays(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    // `ssh -o ProxyCommand='spa knock ... --connect %h:%p'`: knock, connect, relay stdio.
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        lab.a.clone(),
        binary("spa").display().to_string(),
        "knock".into(),
    ];
    args.extend(lab.knock_args("alice", false));
    args.extend([
        "-s".into(),
        "ssh".into(),
        "--connect".into(),
        format!("{GW4}:22"),
    ]);
    let mut child = std::process::Command::new("ip")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SSH-2.0-test\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SSH-2.0-test\n",
        "relayed through the opened port"
    );
}

pub fn the_static_client_knocks(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    let spa = workspace().join("target/x86_64-unknown-linux-musl/client/spa");
    assert!(
        spa.exists(),
        "build it: cargo build --profile client -p spa-client --target x86_64-unknown-linux-musl"
    );
    // Static: no ELF interpreter (PT_INTERP) in the program headers.
    let elf = std::fs::read(&spa).unwrap();
    let (phoff, phentsize, phnum) = (
        u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize,
        u16::from_le_bytes(elf[54..56].try_into().unwrap()) as usize,
        u16::from_le_bytes(elf[56..58].try_into().unwrap()) as usize,
    );
    let interp = (0..phnum)
        .any(|i| u32::from_le_bytes(elf[phoff + i * phentsize..][..4].try_into().unwrap()) == 3);
    assert!(!interp, "the client must be a static binary");
    assert!(
        elf.len() < 2 << 20,
        "the client stays small: {} bytes",
        elf.len()
    );
    let mut args: Vec<String> = vec!["knock".into()];
    args.extend(lab.knock_args("alice", false));
    args.extend(["-s".into(), "ssh".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.try_exec(&lab.a, spa.to_str().unwrap(), &refs);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
}

both_backends!(
    hidden_port_opens_for_the_knocker_only_and_expires,
    replay_is_refused_from_another_ip_and_after_restarts,
    no_packet_is_granted_twice_across_a_kill_9_mid_stream,
    a_replay_flood_is_dropped_before_the_handshake,
    forgeries_are_refused_each_with_its_reason_and_nothing_is_sent_back,
    ipv6_knock_opens_for_that_v6_address,
    unprivileged_client_with_a_profile,
    udp_listener_mode_and_interface_selection,
    a_loose_server_key_is_refused_and_nothing_is_installed,
    ssh_proxy_command_knocks_then_relays,
    the_static_client_knocks,
);
