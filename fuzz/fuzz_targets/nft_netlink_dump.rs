//! What spad reads back from the kernel over nftables netlink: set element dumps, chain and
//! set name dumps, and ruleset change events from the monitor group.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spad::firewall::{guard, nftables};

fuzz_target!(|data: &[u8]| {
    let bodies = [data.to_vec()];
    let _ = nftables::parse_element_dump("a4_ssh", &bodies);
    let _ = nftables::parse_names(&bodies, "spad", 1, 2);
    if let Some((kind, body)) = data.split_first_chunk::<2>() {
        let kind = u16::from_ne_bytes(*kind);
        let _ = guard::touches_table(kind, body, "spad");
        let _ = guard::element_changes(kind, body, "spad");
    }
});
