//! End to end: Debian's real `fwknop` client (fwknop-client 2.6.10), unmodified, opens
//! services through spad on the same port as spa clients; replays, forgeries, commands and
//! requests outside the client's services are refused, each with its own reason, and nothing is
//! ever sent back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use spa_e2e::*;

const CONF: &str = "fwknop.toml";
const T: Duration = Duration::from_millis(700);
const A4: &str = "203.0.113.10";

/// One fwknop client's keys as `fwknop --key-gen` prints them.
struct FwKeys {
    key: String,
    hmac: String,
}

fn keygen() -> FwKeys {
    let out = run("fwknop", &["--key-gen", "--no-rc-file"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .to_string()
    };
    FwKeys {
        key: field("KEY_BASE64:"),
        hmac: field("HMAC_KEY_BASE64:"),
    }
}

/// A lab with fresh fwknop keys for `alice` and `roaming` written where conf/fwknop.toml
/// expects them, and spad started.
fn lab(backend: Backend) -> (Lab, FwKeys, FwKeys) {
    lab_with(backend, |text| text)
}

/// [`lab`], with the copied config edited first.
fn lab_with(backend: Backend, edit: impl FnOnce(String) -> String) -> (Lab, FwKeys, FwKeys) {
    let mut lab = Lab::new(CONF);
    let path = lab.path(CONF);
    std::fs::write(&path, edit(std::fs::read_to_string(&path).unwrap())).unwrap();
    let (alice, roaming) = (keygen(), keygen());
    for (name, keys) in [("alice", &alice), ("roaming", &roaming)] {
        for (ext, value) in [("key", &keys.key), ("hmac", &keys.hmac)] {
            let path = lab.path(&format!("keys/fwknop-{name}.{ext}"));
            std::fs::write(&path, value).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    lab.start_spad(CONF, backend);
    (lab, alice, roaming)
}

/// Runs the real client in `ns` against the gateway, with `pre` (e.g. faketime) in front.
fn fwknop_with(ns: &str, pre: &[&str], keys: &FwKeys, hmac: bool, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(pre).args([
        "fwknop",
        "--no-rc-file",
        "--no-save-args",
        "-D",
        GW4,
        "--key-base64-rijndael",
        &keys.key,
    ]);
    if hmac {
        cmd.args(["--use-hmac", "--key-base64-hmac", &keys.hmac]);
    }
    let out = cmd.args(args).stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "fwknop {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fwknop(ns: &str, keys: &FwKeys, args: &[&str]) -> Output {
    fwknop_with(ns, &[], keys, true, args)
}

fn send_raw(ns: &str, bytes: Vec<u8>) {
    in_ns(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(&bytes, Lab::gw4(62201)).unwrap();
    });
}

fn refused(lab: &Lab, reason: &str, count: usize) {
    assert!(
        lab.wait_log(reason, count),
        "expected {count}x `{reason}`:\n{}",
        lab.log()
    );
}

pub fn fwknop_client_opens_ssh_for_itself_only_and_it_expires(backend: Backend) {
    let (lab, alice, _) = lab(backend);
    let _ssh = Echo::tcp(&lab.gw, "0.0.0.0:22".parse().unwrap());
    let ssh = Lab::gw4(22);
    assert_eq!(
        tcp_probe(&lab.a, ssh, T),
        Connect::TimedOut,
        "filtered before"
    );

    fwknop(&lab.a, &alice, &["-A", "tcp/22", "-a", A4, "-f", "3"]);
    assert!(
        lab.wait_log(
            &format!("granted owner=fwknop:alice address={A4} services=ssh(3s)"),
            1
        ),
        "{}",
        lab.log()
    );
    assert_eq!(
        tcp_probe(&lab.a, ssh, T),
        Connect::Open,
        "open for the client"
    );
    // The kernel element carries the protocol in its owner.
    let conf = lab.path(CONF).display().to_string();
    let list = lab.exec(
        &lab.gw,
        binary("spad").to_str().unwrap(),
        &["list", "-c", &conf],
    );
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("owner=fwknop:alice"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    assert_eq!(
        tcp_probe(&lab.b, ssh, T),
        Connect::TimedOut,
        "not for others"
    );
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
        "an established session survives expiry\n{}",
        lab.snapshot()
    );

    // A spa client still works on the same port.
    let _web = Echo::tcp(&lab.gw, "0.0.0.0:8080".parse().unwrap());
    lab.knock(&lab.b, "alice", &["web"], &[], false);
    assert!(
        lab.wait_log("granted owner=alice address=203.0.113.20 services=web", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(8080), T), Connect::Open);
}

pub fn a_replayed_fwknop_packet_is_refused_from_anywhere_and_after_restarts(backend: Backend) {
    let (mut lab, alice, _) = lab(backend);
    let _ssh = Echo::tcp(&lab.gw, "0.0.0.0:22".parse().unwrap());
    let saved = lab.path("fwknop-packet.txt");
    fwknop(
        &lab.a,
        &alice,
        &["-A", "tcp/22", "-a", A4, "-B", saved.to_str().unwrap()],
    );
    assert!(
        lab.wait_log("granted owner=fwknop:alice", 1),
        "{}",
        lab.log()
    );
    // `-B` saves the datagram plus a newline; the newline was never on the wire.
    let packet = std::fs::read_to_string(&saved)
        .unwrap()
        .trim_end()
        .as_bytes()
        .to_vec();
    let replayed = "reason=\"client=alice replayed";

    send_raw(&lab.b, packet.clone());
    refused(&lab, replayed, 1);
    send_raw(&lab.a, packet.clone());
    refused(&lab, replayed, 2);
    lab.stop_spad(0, false);
    let second = lab.start_spad(CONF, backend);
    send_raw(&lab.b, packet.clone());
    refused(&lab, replayed, 3);
    lab.stop_spad(second, true);
    lab.start_spad(CONF, backend);
    send_raw(&lab.b, packet);
    refused(&lab, replayed, 4);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(lab.log().matches("granted owner=fwknop:alice").count(), 1);
    // The grant made before the restarts is still live for A.
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
}

pub fn fwknop_forgeries_are_refused_each_with_its_reason_and_nothing_is_sent_back(
    backend: Backend,
) {
    let (lab, alice, _) = lab(backend);
    let _ssh = Echo::tcp(&lab.gw, "0.0.0.0:22".parse().unwrap());
    let capture = lab.path("gw-replies.pcap");
    let tcpdump = Command::new("ip")
        .args([
            "netns", "exec", &lab.a, "tcpdump", "-i", "eth0", "-n", "-U", "-w",
        ])
        .arg(&capture)
        .arg(format!("ip src {GW4}"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500)); // tcpdump has no readiness signal
    let ssh = ["-A", "tcp/22", "-a", A4];

    // Wrong encryption key with the right HMAC key: authenticated, does not decrypt.
    let other = keygen();
    let wrong_key = FwKeys {
        key: other.key.clone(),
        hmac: alice.hmac.clone(),
    };
    fwknop(&lab.a, &wrong_key, &ssh);
    refused(&lab, "client=alice decryption failed", 1);
    // Wrong HMAC key.
    let wrong_hmac = FwKeys {
        key: alice.key.clone(),
        hmac: other.hmac.clone(),
    };
    fwknop(&lab.a, &wrong_hmac, &ssh);
    refused(&lab, "no configured fwknop client's HMAC matches", 1);
    // A genuine packet (never sent as is) with one character changed: the HMAC fails.
    let saved = lab.path("p.txt");
    fwknop(
        &lab.a,
        &alice,
        &[
            "-A",
            "tcp/22",
            "-a",
            A4,
            "-T",
            "-B",
            saved.to_str().unwrap(),
        ],
    );
    let mut flipped = std::fs::read_to_string(&saved)
        .unwrap()
        .trim_end()
        .as_bytes()
        .to_vec();
    // Flip a bit of the ciphertext: another base64 character, so it is still fwknop-shaped.
    flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
    send_raw(&lab.a, flipped);
    refused(&lab, "no configured fwknop client's HMAC matches", 2);
    // Stale: the client's clock five minutes behind.
    fwknop_with(&lab.a, &["faketime", "-f", "-300s"], &alice, true, &ssh);
    refused(&lab, "client=alice stale packet", 1);
    // A port outside the client's services (web is defined, but not for alice's fwknop key).
    fwknop(&lab.a, &alice, &["-A", "tcp/8080", "-a", A4]);
    refused(&lab, "requested 8080/tcp is not a port of any service", 1);
    // A command message.
    fwknop(
        &lab.a,
        &alice,
        &["-a", A4, "--server-cmd", "touch /tmp/spad-fwknop-pwned"],
    );
    refused(&lab, "command messages are never run", 1);
    // No HMAC at all.
    fwknop_with(&lab.a, &[], &alice, false, &ssh);
    refused(&lab, "packet has no HMAC", 1);

    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let out = tcpdump.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0 packets captured"),
        "the gateway answered something: {stderr}"
    );
    assert!(!lab.log().contains("granted"), "{}", lab.log());
    assert!(!std::path::Path::new("/tmp/spad-fwknop-pwned").exists());
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
}

pub fn client_timeout_is_capped_and_nat_goes_to_the_configured_target_only(backend: Backend) {
    let (lab, alice, _) = lab(backend);
    let _rdp = Echo::tcp(&lab.lan, "0.0.0.0:3389".parse().unwrap());
    let public = Lab::gw4(3389);
    // -f beyond the client's max-timeout is capped.
    fwknop(&lab.a, &alice, &["-A", "tcp/22", "-a", A4, "-f", "3600"]);
    assert!(
        lab.wait_log(
            "granted owner=fwknop:alice address=203.0.113.10 services=ssh(20s)",
            1
        ),
        "{}",
        lab.log()
    );
    // -N to the LAN host through the configured NAT service: for the knocker only.
    assert_eq!(tcp_probe(&lab.a, public, T), Connect::TimedOut);
    fwknop(
        &lab.a,
        &alice,
        &["-A", "tcp/3389", "-a", A4, "-N", &format!("{LAN4}:3389")],
    );
    assert!(
        lab.wait_log(
            "granted owner=fwknop:alice address=203.0.113.10 services=rdp(8s)",
            1
        ),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, public, T), Connect::Open, "forwarded");
    assert_eq!(
        tcp_probe(&lab.b, public, T),
        Connect::TimedOut,
        "not for others"
    );
    // -N anywhere else is refused.
    fwknop(
        &lab.b,
        &alice,
        &[
            "-A",
            "tcp/3389",
            "-a",
            "203.0.113.20",
            "-N",
            "192.168.1.13:3389",
        ],
    );
    refused(
        &lab,
        "NAT to 192.168.1.13:3389 for public 3389/tcp is not an allowed",
        1,
    );
    fwknop(
        &lab.b,
        &alice,
        &[
            "-A",
            "tcp/22",
            "-a",
            "203.0.113.20",
            "-N",
            &format!("{LAN4}:22"),
        ],
    );
    refused(
        &lab,
        "NAT to 192.168.1.12:22 for public 22/tcp is not an allowed",
        1,
    );
    assert_eq!(tcp_probe(&lab.b, public, T), Connect::TimedOut);
}

pub fn source_address_rules_behind_nat_and_with_dash_s(backend: Backend) {
    let (lab, alice, roaming) = lab(backend);
    let _ssh = Echo::tcp(&lab.gw, "0.0.0.0:22".parse().unwrap());
    // Put client a behind a masquerading router: its own address is private, the gateway
    // sees 203.0.113.10 (what `fwknop -R` would resolve).
    lab.ip(&lab.a, &["addr", "add", "198.18.0.10/32", "dev", "lo"]);
    lab.ip(
        &lab.a,
        &[
            "route",
            "replace",
            "203.0.113.0/24",
            "dev",
            "eth0",
            "src",
            "198.18.0.10",
        ],
    );
    lab.exec(&lab.a, "nft", &["add", "table", "ip", "masq"]);
    lab.exec(
        &lab.a,
        "nft",
        &["add chain ip masq post { type nat hook postrouting priority 100 ; }"],
    );
    lab.exec(
        &lab.a,
        "nft",
        &["add rule ip masq post oifname eth0 ip saddr 198.18.0.10 masquerade"],
    );
    // Its private address in the packet: refused (require-source-address = true).
    fwknop(&lab.a, &alice, &["-A", "tcp/22", "-a", "198.18.0.10"]);
    refused(
        &lab,
        "packet asks for 198.18.0.10 but came from 203.0.113.10",
        1,
    );
    // -s: refused for alice.
    fwknop(&lab.a, &alice, &["-A", "tcp/22", "-s"]);
    refused(&lab, "packet carries no address (fwknop -s)", 1);
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    // -R style: the public address, which is the observed source.
    fwknop(&lab.a, &alice, &["-A", "tcp/22", "-a", A4]);
    assert!(
        lab.wait_log("granted owner=fwknop:alice address=203.0.113.10", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    // A client allowed to use -s gets its source address opened.
    fwknop(&lab.b, &roaming, &["-A", "tcp/22", "-s"]);
    assert!(
        lab.wait_log("granted owner=fwknop:roaming address=203.0.113.20", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::Open);
}

pub fn fwknop_packets_are_heard_by_the_udp_listener_too(backend: Backend) {
    let (lab, alice, _) = lab_with(backend, |text| {
        text.replace("capture = \"af-packet\"", "capture = \"udp\"")
    });
    assert!(lab.log().contains("capture=udp listener"), "{}", lab.log());
    let _ssh = Echo::tcp(&lab.gw, "0.0.0.0:22".parse().unwrap());
    fwknop(&lab.a, &alice, &["-A", "tcp/22", "-a", A4]);
    assert!(
        lab.wait_log(
            "granted owner=fwknop:alice address=203.0.113.10 services=ssh",
            1
        ),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
}

pub fn an_imported_access_conf_serves_the_real_client(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let keys = keygen();
    let access = lab.path("access.conf");
    std::fs::write(
        &access,
        format!(
            "SOURCE ANY\nKEY_BASE64 {}\nHMAC_KEY_BASE64 {}\nOPEN_PORTS tcp/22\nFW_ACCESS_TIMEOUT 5\nREQUIRE_SOURCE_ADDRESS Y\nENABLE_CMD_EXEC Y\n",
            keys.key, keys.hmac
        ),
    )
    .unwrap();
    let fwknopd = lab.path("fwknopd.conf");
    std::fs::write(&fwknopd, "MAX_SPA_PACKET_AGE 60\n").unwrap();
    let out = lab.spad(&[
        "import-fwknop",
        "--access",
        access.to_str().unwrap(),
        "--fwknopd-conf",
        fwknopd.to_str().unwrap(),
    ]);
    let imported = String::from_utf8(out.stdout).unwrap();
    assert!(
        imported.contains("ENABLE_CMD_EXEC Y: NOT carried over"),
        "{imported}"
    );
    let config = format!(
        "[server]\nprivate-key = \"keys/server.key\"\ninterfaces = [\"eth0\"]\nstate-dir = \"state\"\n{imported}"
    );
    let path = lab.path("imported.toml");
    std::fs::write(&path, config).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    lab.start_spad("imported.toml", backend);
    let _ssh = Echo::tcp(&lab.gw, "0.0.0.0:22".parse().unwrap());
    fwknop(&lab.a, &keys, &["-A", "tcp/22", "-a", A4]);
    assert!(
        lab.wait_log(
            "granted owner=fwknop:stanza-1 address=203.0.113.10 services=fwknop-tcp22-5s(5s)",
            1
        ),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);
}

both_backends!(
    fwknop_client_opens_ssh_for_itself_only_and_it_expires,
    a_replayed_fwknop_packet_is_refused_from_anywhere_and_after_restarts,
    fwknop_forgeries_are_refused_each_with_its_reason_and_nothing_is_sent_back,
    client_timeout_is_capped_and_nat_goes_to_the_configured_target_only,
    source_address_rules_behind_nat_and_with_dash_s,
    fwknop_packets_are_heard_by_the_udp_listener_too,
    an_imported_access_conf_serves_the_real_client,
);
