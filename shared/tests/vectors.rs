//! Protocol v1 test vectors. The same hex is printed in docs/protocol.md; this test checks the
//! code against the constants and the document against the code, so neither can drift.
#![allow(clippy::unwrap_used)]

use spa_shared::keys::PrivateKey;
use spa_shared::packet::{seal_with_ephemeral, Server};
use spa_shared::payload::{Kind, Request};
use spa_shared::totp::{code_at_step, derive_ports, Params, PortRule, Secret};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn vector() -> (PrivateKey, PrivateKey, PrivateKey, Request) {
    let server = PrivateKey::from_bytes(core::array::from_fn(|i| 0x40 + i as u8));
    let client = PrivateKey::from_bytes(core::array::from_fn(|i| 0x80 + i as u8));
    let ephemeral = PrivateKey::from_bytes(core::array::from_fn(|i| 0xc0 + i as u8));
    let request = Request {
        kind: Kind::Open,
        timestamp: 1_763_726_400_000_000,
        nonce: core::array::from_fn(|i| i as u8),
        duration_secs: 30,
        address: None,
        services: vec!["ssh".into()],
    };
    (server, client, ephemeral, request)
}

/// Every `name: hex` line of the vector section, computed.
fn computed() -> Vec<(&'static str, String)> {
    let (server, client, ephemeral, request) = vector();
    let packet = seal_with_ephemeral(&ephemeral, &client, &server.public_key(), &request).unwrap();
    let secret = Secret::from_bytes(b"12345678901234567890".to_vec());
    let code = code_at_step(&secret, &Params::default(), 1_763_726_400 / 30);
    let rule = PortRule {
        low: 20000,
        high: 29999,
        count: 2,
        excluded: vec![62201],
    };
    let ports: Vec<String> = derive_ports(40001, &code, &rule)
        .unwrap()
        .iter()
        .map(u16::to_string)
        .collect();
    vec![
        ("server-public", hex(server.public_key().as_bytes())),
        ("client-public", hex(client.public_key().as_bytes())),
        ("ephemeral-public", hex(ephemeral.public_key().as_bytes())),
        ("payload", hex(&request.encode().unwrap())),
        ("mac1-key", hex_key(&server)),
        ("packet", hex(&packet)),
        ("totp-code", code),
        ("totp-ports", ports.join(",")),
    ]
}

fn hex_key(server: &PrivateKey) -> String {
    use blake2::{Blake2s256, Digest};
    let mut h = Blake2s256::new();
    h.update(spa_shared::mac::LABEL_V1);
    h.update(server.public_key().as_bytes());
    hex(&h.finalize())
}

#[test]
fn vector_packet_opens_to_the_vector_request() {
    let (server, client, ephemeral, request) = vector();
    let packet = seal_with_ephemeral(&ephemeral, &client, &server.public_key(), &request).unwrap();
    assert_eq!(packet.len(), 176);
    let opened = Server::new(server).open(&packet).unwrap();
    assert_eq!(opened.client, client.public_key());
    assert_eq!(opened.request, request);
}

#[test]
fn docs_protocol_md_carries_the_computed_vectors() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .unwrap();
    let mut missing = Vec::new();
    for (name, value) in computed() {
        // Long hex is wrapped in the document; compare with whitespace removed.
        let section = doc.split(&format!("\n{name}:\n")).nth(1).map(|rest| {
            rest.split("\n\n")
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect::<String>()
        });
        if section.as_deref() != Some(value.as_str()) {
            missing.push(format!("{name}: {value}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/protocol.md vectors differ from the code; expected:\n{}",
        missing.join("\n")
    );
}
