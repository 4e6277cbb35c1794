//! The fwknop decoder: the outer layer with fixed keys, and the inner message text directly.
//! A message that parses must survive encode → parse unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spa_shared::fwknop::{message, wire, HmacDigest, Keys};

fuzz_target!(|data: &[u8]| {
    let keys = Keys::new(vec![7; 32], vec![8; 64], HmacDigest::Sha256).expect("valid keys");
    let _ = wire::precheck(data);
    let _ = wire::open(data, &keys);
    let _ = wire::is_without_hmac(data, &keys);
    if let Ok(m) = message::parse(data) {
        let again = message::parse(message::encode_with_digest(&m).as_bytes()).expect("round trip");
        assert_eq!(again, m);
    }
});
