//! The bounds a value must keep so that the daemon neither breaks nor weakens at run time.
//!
//! `spad check` accepting a file must mean every grant it can make is accepted by the kernel
//! and every time sum the daemon computes stays in range. Each bound says why it exists.

use std::time::Duration;

/// The longest timeout any duration in the file may have: 2147483 s (24d20h31m23s), the
/// largest `timeout` ipset accepts (`IPSET_MAX_TIMEOUT`, checked with `ipset add … timeout
/// 2147484`: "out of range 0-2147483"). nftables accepts far more (the kernel refuses an
/// element timeout of 213504 days with ERANGE), so one bound keeps a file valid on both
/// backends. Every grant, idle timer and blacklist entry is a kernel set timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(2_147_483);

/// The widest replay window side (`max-age`, `max-future`): a packet withheld by an attacker
/// stays usable for `max-age`, so hours would turn a race into a stockpile.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// The longest owner comment a kernel set element carries: nft refuses comments over 128
/// bytes and spad writes at most 127 plus the NUL; grants by doors carry `door:NAME`. Names
/// longer than this would be cut in the kernel, and two cut names could no longer be told
/// apart by `spad list`, reload and restart.
pub const MAX_NAME_BYTES: usize = 100;

/// Why `duration` is not a usable timeout, if it is not one.
pub fn timeout_problem(duration: Duration) -> Option<String> {
    if duration > MAX_TIMEOUT {
        return Some(format!(
            "{} is longer than the longest kernel set timeout, {} (2147483 s, what ipset accepts); write at most \"24d\"",
            spa_shared::duration::format(duration),
            spa_shared::duration::format(MAX_TIMEOUT)
        ));
    }
    None
}

/// Why `name` (a client or door name, written into kernel comments and logs) is unusable.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a name must not be empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Some(format!(
            "name `{name}` is {} bytes of UTF-8; at most {MAX_NAME_BYTES} fit the kernel's element comment: shorten it",
            name.len()
        ));
    }
    if name.chars().any(|c| c.is_control() || c == '"') {
        return Some(format!(
            "name {name:?} contains a control character or a quote; use letters, digits, `-`, `_` or `.`"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_bound_is_ipsets_maximum() {
        assert!(timeout_problem(Duration::from_secs(2_147_483)).is_none());
        let problem = timeout_problem(Duration::from_secs(2_147_484)).unwrap();
        assert!(problem.contains("24d"), "{problem}");
    }

    #[test]
    fn names_are_bounded_in_bytes_not_characters() {
        assert!(name_problem(&"a".repeat(100)).is_none());
        // 26 four-byte characters: 104 bytes, though only 26 characters.
        let emoji = "\u{1F600}".repeat(26);
        assert!(name_problem(&emoji).unwrap().contains("104 bytes"));
        assert!(name_problem("al\"ice").is_some());
        assert!(name_problem("al\nice").is_some());
        assert!(name_problem("").is_some());
        assert!(name_problem("zoë").is_none());
    }
}
