//! Captured IPv4/IPv6 + UDP/TCP parsing.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spad::capture::frame::parse(data);
});
