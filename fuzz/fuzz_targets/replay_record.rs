//! The persisted replay record decoders: the legacy whole-file record and the journal.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spa_shared::replay::{journal, ReplayRecord, Window};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = ReplayRecord::decode(data) {
        assert_eq!(ReplayRecord::decode(&record.encode()).expect("round trip"), record);
    }
    for bytes in [data.to_vec(), [journal::MAGIC.as_slice(), data].concat()] {
        if let Ok(loaded) = journal::decode(&bytes, Window::default()) {
            // Compaction keeps exactly what was read.
            let again = journal::decode(&journal::encode_snapshot(&loaded.state), Window::default())
                .expect("a snapshot reads back");
            assert_eq!(again.state, loaded.state);
        }
    }
});
