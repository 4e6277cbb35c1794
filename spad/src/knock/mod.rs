//! Legacy port-sequence knocks: knockd-style static doors and TOTP doors.
//!
//! [`config`] parses and validates the doors; [`engine`] follows each source's progress and
//! says when a door opens, closes, or a source should be ignored.

pub mod config;
pub mod engine;
