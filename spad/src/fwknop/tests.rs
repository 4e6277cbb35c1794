//! The fwknop path through the real pipeline (in-memory firewall, manual clock), fed with
//! packets made by Debian's real `fwknop` client (`shared/src/fwknop/fixtures`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spa_shared::fwknop::{wire, Access, HmacDigest, Keys, Message, NatTarget, Proto, SealParams};
use spa_shared::keys::PrivateKey;
use spa_shared::packet::Server;
use spa_shared::Micros;

use crate::capture::Received;
use crate::clock::ManualClock;
use crate::config::Config;
use crate::daemon::Pipeline;
use crate::firewall::memory::Memory;

const FIXTURES: &str = include_str!("../../../shared/src/fwknop/fixtures/fixtures.txt");
const KEY: &str = "xcsrgDBeUqPBrTEMD2FgWJelzKvSfKCPjJdxgeMV0d8=";
const HMAC_KEY: &str =
    "DAhvL9Rel3gK9ZviITalrjsL9ef++tbV9M14qKq4z+4LJKa3Ll5j7uH8kjch8PBt5It9nTUpYKFkfx6HF+mT3Q==";

fn fixture(name: &str) -> (&'static str, Micros) {
    let line = FIXTURES
        .lines()
        .find(|l| l.split('\t').next() == Some(name))
        .unwrap();
    let wire = line.split('\t').nth(2).unwrap();
    let encoded = line.split('\t').nth(3).unwrap();
    let ts: u64 = encoded.split(':').nth(2).unwrap().parse().unwrap();
    (wire, ts * 1_000_000)
}

fn dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "spad-fwknop-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config_text(dir: &Path, client_extra: &str) -> String {
    format!(
        r#"[server]
private-key = "k"
state-dir = "{}"

[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "30s"
max-timeout = "1h"

[services.dns]
kind = "management"
ports = ["53/udp"]
timeout = "30s"

[services.rdp]
kind = "nat"
ports = ["3389/tcp"]
timeout = "1m"
forward-to = "192.168.1.12:3389"

[fwknop-clients.alice]
key-base64 = "{KEY}"
hmac-key-base64 = "{HMAC_KEY}"
services = ["ssh", "rdp"]
{client_extra}
"#,
        dir.display()
    )
}

fn pipeline<'c>(
    clock: &'c ManualClock,
    dir: &Path,
    client_extra: &str,
) -> Pipeline<&'c ManualClock> {
    let config = Config::parse(&dir.join("spad.toml"), &config_text(dir, client_extra)).unwrap();
    let server = Server::new(PrivateKey::from_bytes([2; 32]));
    Pipeline::new(config, server, Box::new(Memory::default()), clock).unwrap()
}

fn udp<'a>(payload: &'a [u8], source: &str) -> Received<'a> {
    Received::Udp {
        source: source.parse().unwrap(),
        source_port: 40000,
        port: 62201,
        payload,
    }
}

fn keys() -> Keys {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    Keys::new(
        b64.decode(KEY).unwrap(),
        b64.decode(HMAC_KEY).unwrap(),
        HmacDigest::Sha256,
    )
    .unwrap()
}

fn sealed(message: &Message, salt: u8) -> String {
    wire::seal(
        message,
        &keys(),
        SealParams {
            salt: [salt; 8],
            hmac: true,
        },
    )
}

fn tcp(port: u16) -> Access {
    Access {
        proto: Proto::Tcp,
        port,
    }
}

#[test]
fn a_real_client_packet_opens_ssh_for_its_address_once() {
    let (packet, ts) = fixture("access");
    let clock = ManualClock::new(ts + 2_000_000);
    let dir = dir("open");
    let mut p = pipeline(&clock, &dir, "");
    p.handle(&udp(packet.as_bytes(), "10.0.0.2"));
    let grants = p.firewall.list().unwrap();
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(
        (
            grants[0].address.to_string().as_str(),
            grants[0].service.as_str(),
            grants[0].owner.as_str()
        ),
        ("10.0.0.2", "ssh", "fwknop:alice")
    );
    assert_eq!(grants[0].remaining, Duration::from_secs(30));
    // The same bytes again, from anywhere, and after a restart on the same state dir.
    p.firewall
        .revoke("10.0.0.2".parse().unwrap(), &["ssh".into()])
        .unwrap();
    p.handle(&udp(packet.as_bytes(), "10.0.0.2"));
    p.handle(&udp(packet.as_bytes(), "10.0.0.9"));
    // Bytes that would give another digest for the same packet are not fwknop data at all.
    p.handle(&udp(format!("{packet}\n").as_bytes(), "10.0.0.9"));
    p.handle(&udp(format!("{packet}=").as_bytes(), "10.0.0.9"));
    assert_eq!((p.stats.granted, p.stats.refused), (1, 4));
    assert_eq!((p.stats.fwknop_granted, p.stats.fwknop_refused), (1, 2));
    drop(p);
    let mut again = pipeline(&clock, &dir, "");
    again.handle(&udp(packet.as_bytes(), "10.0.0.2"));
    assert_eq!((again.stats.granted, again.stats.refused), (0, 1));
    assert!(again.firewall.list().unwrap().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn stale_command_no_hmac_and_garbage_are_refused() {
    let (packet, ts) = fixture("access");
    let clock = ManualClock::new(ts + 121_000_000);
    let dir = dir("refuse");
    let mut p = pipeline(&clock, &dir, "");
    p.handle(&udp(packet.as_bytes(), "10.0.0.2"));
    let (command, ts) = fixture("command");
    clock.0.set(ts);
    p.handle(&udp(command.as_bytes(), "10.0.0.2"));
    let (no_hmac, _) = fixture("no-hmac");
    p.handle(&udp(no_hmac.as_bytes(), "10.0.0.2"));
    p.handle(&udp(&b"QUFBQUFB".repeat(30), "10.0.0.2"));
    p.handle(&udp(&[0xffu8; 200], "10.0.0.2"));
    assert!(p.firewall.list().unwrap().is_empty());
    assert_eq!((p.stats.granted, p.stats.refused), (0, 5));
    assert_eq!(p.stats.precheck_dropped, 2, "garbage and binary");
    // Reasons, tested on the open step directly.
    let clients = &p.config.fwknop_clients;
    let reason = |bytes: &[u8], now| super::open(clients, bytes, now).unwrap_err().to_string();
    assert!(reason(packet.as_bytes(), ts + 200_000_000).contains("stale packet"));
    assert!(reason(command.as_bytes(), ts).contains("command messages are never run"));
    assert!(reason(no_hmac.as_bytes(), ts).contains("no HMAC"));
    assert!(reason(&b"QUFBQUFB".repeat(30), ts).contains("HMAC matches"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ports_outside_the_services_and_foreign_nat_targets_are_refused() {
    let (_, ts) = fixture("access");
    let clock = ManualClock::new(ts);
    let dir = dir("policy");
    let mut p = pipeline(&clock, &dir, "");
    let a = Ipv4Addr::new(10, 0, 0, 2);
    let now = ts / 1_000_000;
    // dns is defined but not this client's.
    let dns = Message::access(
        now,
        a,
        vec![Access {
            proto: Proto::Udp,
            port: 53,
        }],
    );
    p.handle(&udp(sealed(&dns, 1).as_bytes(), "10.0.0.2"));
    // One allowed, one not: all refused.
    let mixed = Message::access(now, a, vec![tcp(22), tcp(23)]);
    p.handle(&udp(sealed(&mixed, 2).as_bytes(), "10.0.0.2"));
    // NAT to another host, and NAT of a public port that does not forward there.
    let nat = |ip: [u8; 4], port, public| {
        Message::access(now, a, vec![tcp(public)]).with(
            Some(NatTarget {
                address: Ipv4Addr::from(ip),
                port,
            }),
            false,
            None,
        )
    };
    p.handle(&udp(
        sealed(&nat([192, 168, 1, 13], 3389, 3389), 3).as_bytes(),
        "10.0.0.2",
    ));
    p.handle(&udp(
        sealed(&nat([192, 168, 1, 12], 22, 22), 4).as_bytes(),
        "10.0.0.2",
    ));
    assert!(p.firewall.list().unwrap().is_empty());
    assert_eq!(p.stats.refused, 4);
    // The configured NAT target through its public port works.
    p.handle(&udp(
        sealed(&nat([192, 168, 1, 12], 3389, 3389), 5).as_bytes(),
        "10.0.0.2",
    ));
    let grants = p.firewall.list().unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].service, "rdp");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn client_timeout_is_honoured_and_capped() {
    let (_, ts) = fixture("access");
    let clock = ManualClock::new(ts);
    let dir = dir("timeout");
    let mut p = pipeline(&clock, &dir, "max-timeout = \"10m\"");
    let now = ts / 1_000_000;
    let a = Ipv4Addr::new(10, 0, 0, 2);
    let five = Message::access(now, a, vec![tcp(22)]).with(None, false, Some(5));
    p.handle(&udp(sealed(&five, 1).as_bytes(), "10.0.0.2"));
    assert_eq!(
        p.firewall.list().unwrap()[0].remaining,
        Duration::from_secs(5)
    );
    let day = Message::access(now, a, vec![tcp(22)]).with(None, false, Some(86_400));
    p.handle(&udp(sealed(&day, 2).as_bytes(), "10.0.0.2"));
    assert_eq!(
        p.firewall.list().unwrap()[0].remaining,
        Duration::from_secs(600),
        "capped by the client's max-timeout"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn source_address_rules() {
    let (_, ts) = fixture("access");
    let clock = ManualClock::new(ts);
    let now = ts / 1_000_000;
    let msg = |ip: [u8; 4]| Message::access(now, Ipv4Addr::from(ip), vec![tcp(22)]);
    // Default (require-source-address = true): -a must be the source, -s is refused.
    let dir1 = dir("src-strict");
    let mut p = pipeline(&clock, &dir1, "");
    p.handle(&udp(sealed(&msg([10, 0, 0, 3]), 1).as_bytes(), "10.0.0.2"));
    p.handle(&udp(sealed(&msg([0, 0, 0, 0]), 2).as_bytes(), "10.0.0.2"));
    assert_eq!((p.stats.granted, p.stats.refused), (0, 2));
    // -R behind NAT: the resolved address is the source the gateway sees.
    p.handle(&udp(
        sealed(&msg([198, 51, 100, 7]), 3).as_bytes(),
        "198.51.100.7",
    ));
    assert_eq!(p.stats.granted, 1);
    // Relaxed: -s opens for the source, -a for the named address.
    let dir2 = dir("src-loose");
    let mut p = pipeline(&clock, &dir2, "require-source-address = false");
    p.handle(&udp(sealed(&msg([0, 0, 0, 0]), 4).as_bytes(), "10.0.0.2"));
    p.handle(&udp(sealed(&msg([10, 0, 0, 3]), 5).as_bytes(), "10.0.0.2"));
    let mut who: Vec<String> = p
        .firewall
        .list()
        .unwrap()
        .iter()
        .map(|g| g.address.to_string())
        .collect();
    who.sort();
    assert_eq!(who, ["10.0.0.2", "10.0.0.3"]);
    std::fs::remove_dir_all(dir1).unwrap();
    std::fs::remove_dir_all(dir2).unwrap();
}

#[test]
fn config_errors_name_the_line_and_the_fix() {
    let dir = dir("config");
    let parse = |extra: &str, replace: (&str, &str)| {
        let text = config_text(&dir, extra).replace(replace.0, replace.1);
        Config::parse(&dir.join("spad.toml"), &text).unwrap_err()
    };
    let e = parse(
        "",
        (
            "services = [\"ssh\", \"rdp\"]",
            "services = [\"ssh\", \"rpd\"]",
        ),
    );
    assert_eq!(e.line, 25);
    assert!(e.message.contains("unknown service `rpd`"), "{e}");
    let e = parse("hmac-digest = \"sha3\"", ("", ""));
    assert_eq!(e.line, 26);
    assert!(e.message.contains("\"sha256\""), "{e}");
    let e = parse("", (KEY, "not base64!"));
    assert_eq!(e.line, 23);
    assert!(e.message.contains("KEY_BASE64"), "{e}");
    let e = parse("key-file = \"k\"", ("", ""));
    assert!(e.message.contains("exactly one of key-base64"), "{e}");
    let e = parse("max-age = \"1h\"", ("", ""));
    assert!(e.message.contains("between 1s and 10m"), "{e}");
    let e = parse("colour = 1", ("", ""));
    assert!(e.message.contains("unknown field `colour`"), "{e}");
    let twin = format!(
        "[fwknop-clients.bob]\nkey-base64 = \"{KEY}\"\nhmac-key-base64 = \"{HMAC_KEY}\"\nservices = [\"ssh\"]\n"
    );
    let e = parse(&twin, ("", ""));
    assert!(e.message.contains("same HMAC key"), "{e}");
    // Key files must be private.
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(dir.join("alice.key"), KEY).unwrap();
    std::fs::set_permissions(
        dir.join("alice.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = parse(
        "",
        (
            &format!("key-base64 = \"{KEY}\""),
            "key-file = \"alice.key\"",
        ),
    );
    assert!(e.message.contains("chmod 600"), "{e}");
    std::fs::set_permissions(
        dir.join("alice.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let text = config_text(&dir, "").replace(
        &format!("key-base64 = \"{KEY}\""),
        "key-file = \"alice.key\"",
    );
    let config = Config::parse(&dir.join("spad.toml"), &text).unwrap();
    assert_eq!(config.fwknop_clients["alice"].keys, keys());
    assert_eq!(
        config.fwknop_clients["alice"].max_age,
        Duration::from_secs(120)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn live_fwknop_grants_survive_a_reload_only_while_still_allowed() {
    use crate::firewall::{still_allowed, LiveGrant};
    let dir = dir("reload");
    let config = Config::parse(&dir.join("spad.toml"), &config_text(&dir, "")).unwrap();
    let grant = |owner: &str, service: &str| LiveGrant {
        address: "10.0.0.2".parse().unwrap(),
        service: service.into(),
        remaining: Duration::from_secs(10),
        owner: owner.into(),
    };
    assert!(still_allowed(&config, &grant("fwknop:alice", "ssh")));
    assert!(!still_allowed(&config, &grant("fwknop:alice", "dns")));
    assert!(!still_allowed(&config, &grant("fwknop:bob", "ssh")));
    // A spa client of the same name is another owner.
    assert!(!still_allowed(&config, &grant("alice", "ssh")));
    std::fs::remove_dir_all(dir).unwrap();
}
