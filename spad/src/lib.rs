//! `spad`: the SPA gateway daemon as a library, so every stage is testable.
//!
//! Pipeline: [`capture`] (AF_PACKET + BPF, or UDP) → [`daemon::Pipeline`] (pre-check,
//! pre-handshake defences in [`flood`], handshakes of a batch in [`verify`], replay via
//! [`state`] (its disk syncs on a thread of their own, [`journal_sync`]), [`policy`], legacy [`knock`]s) → [`firewall`] (nftables or iptables, grants as
//! kernel set elements with timeouts over netlink). [`event_loop`] drives it: one tokio thread
//! waiting on the capture sockets, signals, timers and the operator tasks ([`control`],
//! [`metrics`], [`notify`]). `docs/architecture.md` walks the packet path step by step.

pub mod capture;
pub mod cli;
pub mod client_admin;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod enroll;
pub mod event_loop;
pub mod firewall;
pub mod flood;
pub mod fwknop;
pub mod invite;
pub mod journal_sync;
pub mod keyfile;
pub mod knock;
pub mod log;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod policy;
pub mod privilege;
pub mod refusal;
pub mod state;
pub mod status;
pub mod verify;
