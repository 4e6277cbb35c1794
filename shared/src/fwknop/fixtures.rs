//! Packets made by Debian's real `fwknop` client 2.6.10 (`fixtures/make.sh`), decoded here.

use std::net::Ipv4Addr;

use base64::Engine;

use super::message::encode;
use super::wire::{authenticate, is_without_hmac, open, precheck, seal, Keys, SealParams};
use super::*;

const FIXTURES: &str = include_str!("fixtures/fixtures.txt");
const KEY: &str = "xcsrgDBeUqPBrTEMD2FgWJelzKvSfKCPjJdxgeMV0d8=";
const HMAC_KEY: &str =
    "DAhvL9Rel3gK9ZviITalrjsL9ef++tbV9M14qKq4z+4LJKa3Ll5j7uH8kjch8PBt5It9nTUpYKFkfx6HF+mT3Q==";

struct Fixture {
    name: &'static str,
    hmac: &'static str,
    wire: &'static str,
    encoded: &'static str,
}

fn fixtures() -> Vec<Fixture> {
    FIXTURES
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Fixture {
                name: f[0],
                hmac: f[1],
                wire: f[2],
                encoded: f[3],
            }
        })
        .collect()
}

fn fixture(name: &str) -> Fixture {
    fixtures().into_iter().find(|f| f.name == name).unwrap()
}

pub(crate) fn keys(digest: HmacDigest) -> Keys {
    let b64 = base64::engine::general_purpose::STANDARD;
    Keys::new(
        b64.decode(KEY).unwrap(),
        b64.decode(HMAC_KEY).unwrap(),
        digest,
    )
    .unwrap()
}

#[test]
fn every_access_fixture_decodes_to_what_the_client_encoded() {
    let mut checked = 0;
    for f in fixtures() {
        if matches!(f.name, "command" | "no-hmac") {
            continue;
        }
        let keys = keys(HmacDigest::parse(f.hmac).unwrap());
        precheck(f.wire.as_bytes()).unwrap();
        let m = open(f.wire.as_bytes(), &keys).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert_eq!(encode(&m), f.encoded, "{}", f.name);
        checked += 1;
    }
    assert_eq!(checked, 9);
}

#[test]
fn fields_of_the_real_client_packets() {
    let k = keys(HmacDigest::Sha256);
    let m = open(fixture("access").wire.as_bytes(), &k).unwrap();
    assert_eq!(m.kind, MessageType::Access);
    assert_eq!(m.allow_ip, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(
        m.access,
        vec![Access {
            proto: Proto::Tcp,
            port: 22
        }]
    );
    assert_eq!((m.user.as_str(), m.version.as_str()), ("root", "3.0.0"));
    let m = open(fixture("timeout").wire.as_bytes(), &k).unwrap();
    assert_eq!(
        (m.kind, m.client_timeout),
        (MessageType::ClientTimeoutAccess, Some(5))
    );
    let m = open(fixture("nat-timeout").wire.as_bytes(), &k).unwrap();
    assert_eq!(m.kind, MessageType::ClientTimeoutNatAccess);
    assert_eq!(
        m.nat,
        Some(NatTarget {
            address: Ipv4Addr::new(192, 168, 1, 12),
            port: 3389
        })
    );
    assert_eq!(m.client_timeout, Some(30));
    let m = open(fixture("local-nat").wire.as_bytes(), &k).unwrap();
    assert!(m.kind.is_local_nat());
    let m = open(fixture("source").wire.as_bytes(), &k).unwrap();
    assert_eq!(m.allow_ip, Ipv4Addr::UNSPECIFIED);
}

#[test]
fn command_messages_are_refused_after_authentication() {
    let k = keys(HmacDigest::Sha256);
    assert_eq!(
        open(fixture("command").wire.as_bytes(), &k),
        Err(FwknopError::Command)
    );
}

#[test]
fn a_packet_without_hmac_is_told_apart_from_a_wrong_key() {
    let k = keys(HmacDigest::Sha256);
    let wire = fixture("no-hmac").wire.as_bytes();
    assert_eq!(authenticate(wire, &k), Err(FwknopError::NoHmacMatch));
    assert!(is_without_hmac(wire, &k));
    assert!(!is_without_hmac(fixture("access").wire.as_bytes(), &k));
}

#[test]
fn wrong_keys_flipped_bits_and_prefix_are_refused() {
    let k = keys(HmacDigest::Sha256);
    let wire = fixture("access").wire;
    // Wrong HMAC key.
    let other = Keys::new(vec![1; 32], vec![2; 64], HmacDigest::Sha256).unwrap();
    assert_eq!(open(wire.as_bytes(), &other), Err(FwknopError::NoHmacMatch));
    // Right HMAC key, wrong encryption key: authenticated, but does not decrypt to a message.
    let b64 = base64::engine::general_purpose::STANDARD;
    let half = Keys::new(
        vec![9; 32],
        b64.decode(HMAC_KEY).unwrap(),
        HmacDigest::Sha256,
    )
    .unwrap();
    assert!(matches!(
        open(wire.as_bytes(), &half),
        Err(FwknopError::Decrypt | FwknopError::Malformed(_))
    ));
    // Wrong HMAC algorithm.
    assert_eq!(
        open(wire.as_bytes(), &keys(HmacDigest::Sha512)),
        Err(FwknopError::NoHmacMatch)
    );
    // Every single flipped character is refused by the HMAC.
    for i in 0..wire.len() {
        let mut bytes = wire.as_bytes().to_vec();
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        assert!(open(&bytes, &k).is_err(), "flip at {i}");
    }
    // The salted prefix an attacker could prepend to dodge a replay check.
    let prefixed = format!("U2FsdGVkX1{wire}");
    assert!(precheck(prefixed.as_bytes()).is_err());
    assert!(precheck(b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").is_err());
}

#[test]
fn seal_matches_the_client_and_refuses_what_it_cannot_open() {
    let k = keys(HmacDigest::Sha256);
    let m = Message::access(
        1_795_978_329,
        Ipv4Addr::new(10, 0, 0, 2),
        vec![Access {
            proto: Proto::Udp,
            port: 1194,
        }],
    )
    .with(None, false, Some(9));
    let wire = seal(
        &m,
        &k,
        SealParams {
            salt: [3; 8],
            hmac: true,
        },
    );
    precheck(wire.as_bytes()).unwrap();
    assert_eq!(open(wire.as_bytes(), &k).unwrap(), m);
}

#[test]
fn staleness_follows_fwknop_in_both_directions() {
    assert!(check_age(1000, 1120, 120).is_ok());
    assert!(check_age(1120, 1000, 120).is_ok());
    assert!(matches!(
        check_age(1000, 1121, 120),
        Err(FwknopError::Stale { age_secs: 121, .. })
    ));
    assert!(check_age(1121, 1000, 120).is_err());
}
