//! Legacy port-sequence knocks: knockd-style static doors and TOTP doors.
//!
//! The rooms: [`config`] parses and validates the doors; [`sequence`] matches one knock against
//! one sequence; [`sources`] holds the bounded per-source state (rate limit, failures,
//! blacklist, progress); `static_doors` opens and closes knockd-style doors; [`one_time`] follows one-time sequence lists; [`totp_doors`] derives
//! each TOTP door's sequence per time step and refuses a second use of a step; [`engine`] ties
//! them together, I/O-free, returns events and counts each knock's [`results`]; [`driver`] is the I/O around it (reading
//! files, persisting uses in the state directory) and is what the daemon holds.

pub mod config;
pub mod driver;
pub mod engine;
mod log_budget;
pub mod one_time;
pub mod results;
pub mod sequence;
pub mod sources;
mod static_doors;
pub mod totp_doors;

pub use driver::{syn_only, watched_ranges, Knocks};
