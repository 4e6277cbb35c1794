//! Captured IPv4/IPv6 + UDP/TCP parsing (extension-header walk included), and the host
//! acceptance check on top of it: the first 8 bytes choose what the kernel reported
//! (interface, packet type, auxdata status, VLAN tag), the rest is the packet. Never panics;
//! whatever is accepted parses to a frame addressed to one of the host's addresses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spad::capture::host::{judge, HostAddresses, Meta};

fuzz_target!(|data: &[u8]| {
    let _ = spad::capture::frame::parse(data);
    let Some((head, packet)) = data.split_first_chunk::<8>() else {
        return;
    };
    let hosts = HostAddresses::new(
        [
            (2, "203.0.113.1".parse().unwrap()),
            (2, "2001:db8:1::1".parse().unwrap()),
        ],
        &[1],
    );
    let meta = Meta {
        ifindex: u32::from(head[0] % 4),
        pkttype: head[1] % 6,
        status: u32::from_le_bytes([head[2], head[3], 0, 0]),
        vlan_tci: u16::from_le_bytes([head[4], head[5]]),
        truncated: head[6] & 1 == 1,
    };
    if let Ok(frame) = judge(&meta, packet, &hosts) {
        assert!(hosts.owns(meta.ifindex, frame.destination));
        assert_eq!(meta.vlan_tci & 0x0fff, 0);
    }
});
