//! I/O-free protocol core of the SPA gateway.
//!
//! Everything here is pure computation over bytes and an explicit clock value: the wire format
//! ([`packet`]), the one-way Noise `X` handshake it rides on ([`noise`]), the cheap keyed
//! pre-check ([`mac`]), the request payload ([`payload`]), key encoding ([`keys`]), the replay
//! rules and their persistent record ([`replay`]), RFC 6238 TOTP with knock-port derivation
//! ([`totp`]), the `spa://` enrollment URI ([`invite`]) and the decoder for unmodified fwknop
//! 2.x clients ([`fwknop`]). No sockets, files, threads or global clocks: the daemon and the
//! client drive it.
#![forbid(unsafe_code)]

pub mod duration;
pub mod fwknop;
pub mod invite;
pub mod keys;
pub mod mac;
pub mod noise;
pub mod packet;
pub mod payload;
mod reader;
pub mod replay;
pub mod totp;

/// Microseconds since the UNIX epoch: the only notion of time this crate knows.
pub type Micros = u64;
