//! Netlink acknowledgement parsing (kernel replies).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spad::firewall::netlink::parse_replies(data);
});
