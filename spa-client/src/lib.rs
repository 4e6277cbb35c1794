//! The `spa` client as a library: profiles, enrollment, name resolution, building requests,
//! and sending them (one SPA datagram, or a port-knock sequence). No root needed for anything
//! here.

pub mod cli;
pub mod dns;
pub mod enroll;
pub mod probe;
pub mod profile;
pub mod relay;
pub mod request;
pub mod resolve;
pub mod send;
