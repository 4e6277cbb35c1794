//! `spa://` enrollment URIs: errors, never panics; whatever parses round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spa_shared::invite::Invite;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(invite) = Invite::parse(text) {
            assert_eq!(Invite::parse(&invite.to_uri()).as_ref(), Ok(&invite));
        }
    }
});
