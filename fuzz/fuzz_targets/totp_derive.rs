//! TOTP port derivation never panics and keeps its promises for any code and range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spa_shared::totp::{derive_ports, PortRule};

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let low = u16::from_be_bytes([data[0], data[1]]);
    let high = u16::from_be_bytes([data[2], data[3]]);
    let count = usize::from(data[4] % 8) + 1;
    let code = String::from_utf8_lossy(&data[5..]);
    let rule = PortRule { low, high, count, excluded: vec![62201] };
    if let Ok(ports) = derive_ports(40001, &code, &rule) {
        assert_eq!(ports.len(), count + 1);
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len());
        assert!(!ports.contains(&62201));
    }
});
