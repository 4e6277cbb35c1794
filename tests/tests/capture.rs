//! The capture acts only on packets the host itself would accept on that interface: a valid
//! SPA packet sent to an address the gateway does not own, to another machine's link-layer
//! address, inside a VLAN tag the gateway does not use, or with a bad UDP checksum opens
//! nothing and is counted as a drop by reason; an IPv6 knock behind a destination-options
//! header is walked and granted. Each hostile copy is a fresh, never-accepted packet, and
//! each is granted afterwards when sent plainly, so only the way it was sent was refused.
//! The ring's slots are 1 KiB until a reload adds fwknop clients, then 2 KiB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use spa_e2e::*;

const CONF: &str = "demo.toml";
const T: Duration = Duration::from_millis(700);

fn lab_with_ssh(backend: Backend) -> (Lab, Echo) {
    let mut lab = Lab::new(CONF);
    let echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    lab.start_spad(CONF, backend);
    (lab, echo)
}

/// Alice's SPA open request for ssh, sent from namespace `a` to `server`, saved to `save`.
/// With a loopback `server` the packet never leaves the client: a fresh packet to send later.
fn knock_to(lab: &Lab, server: &str, save: &Path) {
    let key = lab.path("keys/alice.key");
    let server_key = lab.server_public_key();
    let out = lab.spa_in(
        &lab.a,
        &[
            "knock",
            "--server",
            server,
            "--server-key",
            &server_key,
            "--key",
            key.to_str().unwrap(),
            "-s",
            "ssh",
            "--save-packet",
            save.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "spa knock: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn send_plain(ns: &str, to: SocketAddr, bytes: Vec<u8>) {
    in_ns(ns, move || {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.send_to(&bytes, to).unwrap();
    });
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet carrying `payload` as a UDP datagram from 203.0.113.10:40000 to the
/// gateway's SPA port, with the right UDP checksum or a wrong one.
fn ipv4_udp(payload: &[u8], right_checksum: bool) -> Vec<u8> {
    let (source, destination): ([u8; 4], [u8; 4]) = ([203, 0, 113, 10], [203, 0, 113, 1]);
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&62201u16.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&source);
    pseudo.extend_from_slice(&destination);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&udp);
    let right = checksum(&pseudo);
    let sent = if right_checksum {
        right
    } else {
        right ^ 0x0101
    };
    udp[6..8].copy_from_slice(&sent.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&source);
    ip.extend_from_slice(&destination);
    let header = checksum(&ip);
    ip[10..12].copy_from_slice(&header.to_be_bytes());
    ip.extend_from_slice(&udp);
    ip
}

/// Sends `payload` through a raw IP socket (we write the IP header: IPPROTO_RAW).
fn send_raw_udp(ns: &str, payload: Vec<u8>, right_checksum: bool) {
    let ip = ipv4_udp(&payload, right_checksum);
    in_ns(ns, move || {
        let s = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .unwrap();
        let to: SocketAddr = "203.0.113.1:0".parse().unwrap();
        s.send_to(&ip, &SockAddr::from(to)).unwrap();
    });
}

/// Sends `payload` in an Ethernet frame to MAC `to` on `ns`'s eth0, inside an 802.1Q tag
/// with VLAN ID `vlan` (written by hand: this kernel has no VLAN interfaces).
fn send_tagged(ns: &str, to: [u8; 6], vlan: u16, payload: Vec<u8>) {
    let mut frame = to.to_vec();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0a]);
    frame.extend_from_slice(&0x8100u16.to_be_bytes());
    frame.extend_from_slice(&vlan.to_be_bytes());
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ipv4_udp(&payload, true));
    in_ns(ns, move || {
        let index = ifindex("eth0");
        // SAFETY: (test) plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        let address = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: 0,
            sll_ifindex: index,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr: [to[0], to[1], to[2], to[3], to[4], to[5], 0, 0],
        };
        // SAFETY: (test) buffer and address are live and their lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        let error = std::io::Error::last_os_error();
        // SAFETY: (test) closing the fd opened above, once.
        unsafe { libc::close(fd) };
        assert_eq!(sent, frame.len() as isize, "{error}");
    });
}

/// The index of interface `name` in the calling thread's namespace.
fn ifindex(name: &str) -> i32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: (test) c is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(index != 0, "no interface {name}");
    index as i32
}

/// The value of counter `name` on the daemon's last `capture:` line.
fn counter(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains("capture: received="))
        .unwrap_or_else(|| panic!("no capture counters in the log:\n{log}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

fn mac_of(lab: &Lab, ns: &str, dev: &str) -> String {
    let out = lab.ip(ns, &["-br", "link", "show", dev]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string()
}

pub fn frames_the_host_would_not_accept_open_nothing_and_are_counted(backend: Backend) {
    let (mut lab, _echo) = lab_with_ssh(backend);
    let ssh = Lab::gw4(22);
    let saved: Vec<_> = (1..=4).map(|i| lab.path(&format!("p{i}.bin"))).collect();

    // 1. To an address the gateway does not own, routed through it.
    lab.ip(&lab.a, &["route", "add", "192.0.2.99/32", "via", GW4]);
    knock_to(&lab, "192.0.2.99", &saved[0]);

    // 2. To the gateway's address but another machine's MAC (PACKET_OTHERHOST).
    lab.ip(
        &lab.a,
        &[
            "neigh",
            "replace",
            GW4,
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    knock_to(&lab, GW4, &saved[1]);
    lab.ip(&lab.a, &["neigh", "del", GW4, "dev", "eth0"]);

    // 3. To the gateway's address and MAC, inside VLAN 42 (the gateway has no VLAN 42).
    knock_to(&lab, "127.0.0.1", &saved[2]);
    let gw_mac: Vec<u8> = mac_of(&lab, &lab.gw, "eth0")
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    send_tagged(
        &lab.a,
        gw_mac.try_into().unwrap(),
        42,
        std::fs::read(&saved[2]).unwrap(),
    );

    // 4. To the gateway with a wrong UDP checksum.
    knock_to(&lab, "127.0.0.1", &saved[3]);
    let fourth = std::fs::read(&saved[3]).unwrap();
    send_raw_udp(&lab.a, fourth.clone(), false);

    assert_eq!(
        tcp_probe(&lab.a, ssh, T),
        Connect::TimedOut,
        "nothing opened"
    );
    assert!(!lab.log().contains("granted"), "{}", lab.log());

    // The same packets, sent plainly in order, are each granted: they were valid and fresh.
    // (The capture reads in order, so the first grant also means the hostile copies were seen.)
    for (i, path) in saved.iter().enumerate().take(3) {
        send_plain(&lab.a, Lab::gw4(62201), std::fs::read(path).unwrap());
        assert!(lab.wait_log("granted owner=alice", i + 1), "{}", lab.log());
    }
    // The raw path itself is fine when the checksum is right.
    send_raw_udp(&lab.a, fourth, true);
    assert!(lab.wait_log("granted owner=alice", 4), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.a, ssh, T), Connect::Open);

    lab.stop_spad(0, false);
    let log = lab.log();
    assert_eq!(counter(&log, "not-our-address"), 1, "{log}");
    assert_eq!(counter(&log, "other-host"), 1, "{log}");
    assert_eq!(counter(&log, "foreign-vlan"), 1, "{log}");
    assert_eq!(counter(&log, "bad-checksum"), 1, "{log}");
    assert_eq!(counter(&log, "delivered"), 4, "{log}");
}

/// Sends `bytes` over UDP from namespace `ns` with a destination-options header (PadN).
fn send_with_destination_options(ns: &str, to: SocketAddr, bytes: Vec<u8>) {
    in_ns(ns, move || {
        let s = UdpSocket::bind("[::]:0").unwrap();
        // struct ip6_dest: next header (filled by the kernel), length 0 (8 bytes), PadN(4).
        let options: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        // SAFETY: (test) the pointer and length describe `options`, alive for the call.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_DSTOPTS,
                options.as_ptr().cast(),
                options.len() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
        s.send_to(&bytes, to).unwrap();
    });
}

pub fn an_ipv6_knock_behind_a_destination_options_header_is_granted(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    let ssh = Lab::gw6(22);
    let saved = lab.path("p6.bin");
    lab.ip(
        &lab.a,
        &["-6", "route", "add", "2001:db8:99::1/128", "via", GW6],
    );
    knock_to(&lab, "2001:db8:99::1", &saved);
    assert_eq!(tcp_probe(&lab.a, ssh, T), Connect::TimedOut);
    send_with_destination_options(&lab.a, Lab::gw6(62201), std::fs::read(&saved).unwrap());
    assert!(
        lab.wait_log("granted owner=alice address=2001:db8:1::10", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, ssh, T), Connect::Open);
    assert_eq!(
        tcp_probe(&lab.b, ssh, T),
        Connect::TimedOut,
        "for the knocker only"
    );
}

/// Counter `name` as `spad status --json` shows it now (0 if absent).
fn live_counter(lab: &Lab, name: &str) -> u64 {
    let out = lab.spad_gw(&["status", "--json"], CONF);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    status["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["value"].as_u64())
        .unwrap_or(0)
}

const FWKNOP_CLIENT: &str = r#"
[fwknop-clients.dave]
key-base64 = "xcsrgDBeUqPBrTEMD2FgWJelzKvSfKCPjJdxgeMV0d8="
hmac-key-base64 = "DAhvL9Rel3gK9ZviITalrjsL9ef++tbV9M14qKq4z+4LJKa3Ll5j7uH8kjch8PBt5It9nTUpYKFkfx6HF+mT3Q=="
services = ["ssh"]
"#;

pub fn the_ring_slots_grow_when_a_reload_adds_fwknop_clients(backend: Backend) {
    let (mut lab, _echo) = lab_with_ssh(backend);
    // 1,200 bytes of UDP payload: more than a 1 KiB slot holds (944 bytes of IP packet), as
    // long an fwknop packet may be. Without fwknop clients it is dropped in the capture.
    let long = vec![b'A'; 1200];
    let truncated = r#"capture_dropped{reason="truncated"}"#;
    send_plain(&lab.a, Lab::gw4(62201), long.clone());
    assert!(
        wait_until(Duration::from_secs(10), || live_counter(&lab, truncated)
            == 1),
        "{}",
        lab.log()
    );
    assert_eq!(live_counter(&lab, "capture_delivered"), 0);

    let path = lab.path(CONF);
    let text = std::fs::read_to_string(&path).unwrap() + FWKNOP_CLIENT;
    std::fs::write(&path, text).unwrap();
    lab.reload_spad(0);
    assert!(lab.wait_log("reloaded;", 1), "{}", lab.log());
    // Now it reaches the daemon whole (and is refused there: it is no fwknop packet).
    send_plain(&lab.a, Lab::gw4(62201), long);
    assert!(
        wait_until(Duration::from_secs(10), || live_counter(
            &lab,
            "capture_delivered"
        ) == 1),
        "{}",
        lab.log()
    );
    assert_eq!(live_counter(&lab, truncated), 1, "not truncated again");
}

both_backends!(
    frames_the_host_would_not_accept_open_nothing_and_are_counted,
    an_ipv6_knock_behind_a_destination_options_header_is_granted,
    the_ring_slots_grow_when_a_reload_adds_fwknop_clients,
);
