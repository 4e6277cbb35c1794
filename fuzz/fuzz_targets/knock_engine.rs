//! The knock state machine fed arbitrary (source, port, flags, time) events: a static door with
//! a close sequence, a TOTP door and decoys, with fewer `max-sources` than sources so eviction
//! runs. Never panics; the source table never exceeds its cap.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spad::knock::Knocks;
use spad::net::{PortProto, Proto};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join("spa-fuzz-knock");
    let _ = std::fs::create_dir_all(&dir);
    let text = "[server]\nprivate-key = \"k\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n\
        [doors.d]\nsequence = [\"7000/tcp\", \"7001/udp\", \"7003/tcp\"]\nclose-sequence = [\"7003/tcp\", \"7000/tcp\"]\nservices = [\"ssh\"]\n\
        [totp-doors.t]\nfirst-port = 7010\nsecret = \"JBSWY3DPEHPK3PXPJBSWY3DP\"\nservices = [\"ssh\"]\nport-range = \"7011-7030\"\nrequire-enrollment = false\n\
        [knocking]\ndecoy-ports = [\"7002/tcp\"]\nmax-sources = 3\nblacklist-after = 2\n";
    let config = spad::config::Config::parse(&dir.join("spad.toml"), text).expect("valid");
    let mut now = 1_763_726_400_000_000u64;
    let mut engine = Knocks::new(&config, &dir, now);
    for chunk in data.chunks(5) {
        if chunk.len() < 5 {
            break;
        }
        let source = std::net::IpAddr::from([198, 51, 100, chunk[0] % 8]);
        let port = PortProto {
            port: 7000 + u16::from(chunk[1] % 32),
            proto: if chunk[2] & 1 == 0 { Proto::Tcp } else { Proto::Udp },
        };
        now += u64::from(chunk[4]) * 50_000;
        let _ = engine.knock(source, port, chunk[3], now);
        let _ = engine.tick(now);
        assert!(engine.engine().tracked_sources() <= 3);
    }
});
