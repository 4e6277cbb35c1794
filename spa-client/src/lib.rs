//! The `spa` client as a library: profiles, building requests, and sending them (one SPA
//! datagram, or a port-knock sequence). No root needed for anything here.

pub mod cli;
pub mod profile;
pub mod send;
