//! Route netlink datagrams as the capture's address-event socket receives them: never
//! panics, and a datagram that starts with an address or link message always announces a
//! change, whatever follows it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spad::capture::addr_events::{announces_change, RTM_DELADDR, RTM_NEWADDR};

fuzz_target!(|data: &[u8]| {
    let changed = announces_change(data);
    if data.len() >= 16 {
        let length = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if (16..=data.len()).contains(&length) && matches!(kind, RTM_NEWADDR | RTM_DELADDR) {
            assert!(changed);
        }
    }
});
