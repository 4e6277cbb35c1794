//! The persisted replay record decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spa_shared::replay::ReplayRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = ReplayRecord::decode(data) {
        assert_eq!(ReplayRecord::decode(&record.encode()).expect("round trip"), record);
    }
});
