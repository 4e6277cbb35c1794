//! The client's DNS answer parser (devices without /etc/resolv.conf): errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spa_client::dns::{parse_response, QueryType};

fuzz_target!(|data: &[u8]| {
    let id = u16::from_be_bytes([
        data.first().copied().unwrap_or(0),
        data.get(1).copied().unwrap_or(0),
    ]);
    for qtype in [QueryType::A, QueryType::Aaaa] {
        if let Ok(addrs) = parse_response(data, id, qtype) {
            assert!(!addrs.is_empty());
        }
    }
});
