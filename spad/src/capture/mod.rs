//! Where packets come from: AF_PACKET sockets with the BPF prefilter (the default; ports
//! stay closed), or a plain UDP socket. Both hand the daemon borrowed packet bytes with a
//! bounded wait, so the loop can notice signals and timers, and count what they drop.
//!
//! Rooms: [`bpf`] (the kernel prefilter), [`ebpf`] (the same with a per-source budget), [`program`] (the daemon's one eBPF program), [`socket`] (opening a capture socket),
//! [`ring`] (the receive ring shared with the kernel), [`afpacket`] (fair reading), [`host`] (does the host accept this frame?),
//! [`frame`] (IP/UDP/TCP parsing), [`checksum`], [`stats`] (drop counters).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use crate::net::canonical;

pub mod addr_events;
pub mod afpacket;
pub mod bpf;
pub mod checksum;
pub mod ebpf;
#[cfg(test)]
mod ebpf_interp;
pub mod frame;
pub mod host;
pub mod pressure;
pub mod program;
pub mod ring;
pub mod socket;
pub mod stats;

pub use afpacket::AfPacket;
pub use ring::SlotSize;
pub use stats::{CaptureStats, DropReason};

/// The ring slot size `config` needs: large (2 KiB) only when fwknop clients are configured,
/// whose packets can fill a whole frame; small (1 KiB) otherwise, which halves the ring and
/// spad's resident memory with it. A reload that changes this re-opens the capture.
pub fn slot_size(config: &crate::config::Config) -> SlotSize {
    SlotSize::for_fwknop(!config.fwknop_clients.is_empty())
}

/// After a failed reload: the running capture's ports, budget and engaged flag back in its
/// prefilter. What the reload wrote there goes back out: the new ports and budget of an
/// in-place change, or everything a new capture wrote into the control map of the eBPF
/// program it shares with the running one ([`program`]). Memory writes only.
pub fn restore_prefilter(
    source: &mut dyn Source,
    watches: &[bpf::Watch],
    syn_only: bool,
    budget: Option<ebpf::SourceBudget>,
) {
    source.set_watches(watches, syn_only);
    source.set_budget(budget);
}

/// The ports a prefilter passes while a reload is pending: those of the running config and
/// those of the new one, so neither config's knocks are dropped in the kernel before the
/// reload has taken effect or been refused. TCP segments other than SYN pass when either
/// config needs them. More ranges than the program holds collapse to one per protocol (a
/// superset: userspace filters exactly).
pub fn pending_watches(
    running: &(Vec<bpf::Watch>, bool),
    new: &(Vec<bpf::Watch>, bool),
) -> (Vec<bpf::Watch>, bool) {
    let mut all: Vec<bpf::Watch> = running.0.iter().chain(&new.0).copied().collect();
    all.sort_by_key(|w| (w.proto, w.low, w.high));
    all.dedup();
    (all, running.1 && new.1)
}

/// After a reload replaced `old` with `live`: the old source's last counters (for the
/// daemon's totals), read before it is closed without reacting to them
/// ([`Source::last_stats`]: its ring's drops engage no budget and count no engagement); then
/// the live source's exact ports (it was opened with [`pending_watches`]) and its budget are
/// applied again, which writes the engaged flag of the eBPF program both share from the live
/// source's state alone.
pub fn retire(
    mut old: Box<dyn Source>,
    live: &mut dyn Source,
    watches: &(Vec<bpf::Watch>, bool),
    budget: Option<ebpf::SourceBudget>,
) -> CaptureStats {
    let stats = old.last_stats();
    drop(old);
    // A ring that kept the classic filter keeps the pending ports built in (a superset).
    live.set_watches(&watches.0, watches.1);
    live.set_budget(budget);
    stats
}

/// One received packet, borrowed from the source's buffer (no copy per packet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received<'a> {
    /// Network-layer bytes (IP header first) from AF_PACKET.
    Ip(&'a [u8]),
    /// A UDP payload from the plain listener, with its source.
    Udp {
        source: IpAddr,
        source_port: u16,
        port: u16,
        payload: &'a [u8],
    },
}

/// A packet source.
pub trait Source {
    /// Waits at most `timeout` for one packet. A zero timeout never blocks: the event loop
    /// reads that way once [`Source::wake_fds`] said a packet may be waiting.
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received<'_>>>;

    /// The sockets that become readable when a packet may be waiting (the event loop
    /// watches duplicates of them).
    fn wake_fds(&self) -> Vec<BorrowedFd<'_>>;

    /// Periodic upkeep, called from the event loop's tick (never on a packet's path).
    fn housekeeping(&mut self) {}

    /// Why the per-source packet budget asked for is not enforced in the kernel (`None`:
    /// it is, or this source has none).
    fn budget_refused(&self) -> Option<String> {
        None
    }

    /// Watches new ports without re-opening the capture (`false`: it cannot; the caller
    /// re-opens it). Only a loaded eBPF prefilter can: its ports are in a map.
    fn set_watches(&mut self, _watches: &[bpf::Watch], _syn_only: bool) -> bool {
        false
    }

    /// Applies a new per-source packet budget without re-opening the capture. `false`: it
    /// cannot (no program is loaded to take it); the caller re-opens the capture.
    fn set_budget(&mut self, budget: Option<ebpf::SourceBudget>) -> bool {
        budget.is_none()
    }

    /// Counters since the source was opened: frames read and delivered, userspace drops
    /// by reason, and the kernel's own counts where the source has them.
    fn stats(&mut self) -> CaptureStats {
        CaptureStats::default()
    }

    /// The same counters, read once more before the source is closed, without reacting to
    /// them: drops found now cannot mean that this source is falling behind (it is being
    /// replaced), so they engage no budget and count no engagement.
    fn last_stats(&mut self) -> CaptureStats {
        self.stats()
    }
}

/// A plain UDP listener on the SPA port (dual-stack). It never sends anything.
#[derive(Debug)]
pub struct UdpListener {
    socket: UdpSocket,
    port: u16,
    buf: Vec<u8>,
    stats: CaptureStats,
}

impl UdpListener {
    pub fn open(port: u16) -> io::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))
            .or_else(|_| {
                UdpSocket::bind(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)))
            })?;
        // Never blocks: `recv` waits in poll(2) when asked to wait, the event loop in epoll.
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            port,
            buf: vec![0u8; 2048],
            stats: CaptureStats::default(),
        })
    }
}

impl UdpListener {
    /// The bound address (port 0 in `open` picks a free one: tests).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

impl Source for UdpListener {
    fn set_budget(&mut self, _budget: Option<ebpf::SourceBudget>) -> bool {
        true // no kernel budget with a UDP listener: nothing to re-open for
    }

    fn set_watches(&mut self, _watches: &[bpf::Watch], _syn_only: bool) -> bool {
        true // knocks are not heard by a UDP listener; a new SPA port is a new capture
    }

    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received<'_>>> {
        // A zero timeout only reads what is there (the event loop drains a batch that way).
        if !timeout.is_zero() {
            use nix::poll::{PollFd, PollFlags, PollTimeout};
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, from)) => {
                self.stats.received += 1;
                self.stats.delivered += 1;
                Ok(Some(Received::Udp {
                    source: canonical(from.ip()),
                    source_port: from.port(),
                    port: self.port,
                    payload: &self.buf[..n],
                }))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.socket.as_fd()]
    }

    fn stats(&mut self) -> CaptureStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn watch(proto: crate::net::Proto, low: u16, high: u16) -> bpf::Watch {
        bpf::Watch { proto, low, high }
    }

    /// While a reload is pending both configs' ports pass, each range once, and TCP
    /// segments other than SYN pass if either config needs them.
    #[test]
    fn a_pending_reload_passes_both_configs_ports() {
        use crate::net::Proto;
        let running = (
            vec![
                watch(Proto::Udp, 62201, 62201),
                watch(Proto::Tcp, 7000, 7000),
            ],
            true,
        );
        let new = (
            vec![
                watch(Proto::Tcp, 7000, 7000),
                watch(Proto::Tcp, 41000, 41002),
            ],
            false,
        );
        assert_eq!(
            pending_watches(&running, &new),
            (
                vec![
                    watch(Proto::Tcp, 7000, 7000),
                    watch(Proto::Tcp, 41000, 41002),
                    watch(Proto::Udp, 62201, 62201),
                ],
                false
            )
        );
        assert!(pending_watches(&running, &running).1, "SYN-only stays");
        assert_eq!(pending_watches(&running, &running).0.len(), 2);
    }

    const SPA_ONLY: &str = r#"[server]
private-key = "k"
state-dir = "/nonexistent/state"

[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "30s"
"#;

    const FWKNOP_CLIENT: &str = r#"
[fwknop-clients.bob]
key-base64 = "xcsrgDBeUqPBrTEMD2FgWJelzKvSfKCPjJdxgeMV0d8="
hmac-key-base64 = "DAhvL9Rel3gK9ZviITalrjsL9ef++tbV9M14qKq4z+4LJKa3Ll5j7uH8kjch8PBt5It9nTUpYKFkfx6HF+mT3Q=="
services = ["ssh"]
"#;

    #[test]
    fn the_slot_size_follows_whether_fwknop_clients_are_configured() {
        let parse = |text: &str| Config::parse(std::path::Path::new("spad.toml"), text).unwrap();
        assert_eq!(slot_size(&parse(SPA_ONLY)), SlotSize::Small);
        let with_fwknop = parse(&format!("{SPA_ONLY}{FWKNOP_CLIENT}"));
        assert_eq!(slot_size(&with_fwknop), SlotSize::Large);
    }
}
