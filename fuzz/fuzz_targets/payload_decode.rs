//! The decrypted request payload decoder; anything that decodes must re-encode identically.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spa_shared::payload::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = Request::decode(data) {
        let again = Request::decode(&request.encode().expect("decoded requests re-encode")).expect("round trip");
        assert_eq!(again, request);
    }
});
