//! The AF_PACKET source: one capture socket per interface, read in batches (`recvmmsg`, up
//! to [`BATCH`] frames per system call, no ring timeout), served in turn so a flood on one
//! interface cannot starve the others, and judged by [`host::judge`] so only frames the host
//! itself would accept reach the daemon. Every frame dropped here is counted by reason.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmmsg, ControlMessageOwned, LinkAddr, MsgFlags, MultiHeaders, RecvMsg};
use socket2::Socket;

use super::host::{self, HostAddresses, Meta, PACKET_OUTGOING};
use super::stats::{CaptureStats, DropReason};
use super::{bpf, socket, Received, Source};
use crate::net::Proto;

/// Frames read per system call, and per turn of one interface.
pub const BATCH: usize = 64;
/// Bytes kept of each frame: an SPA packet or a knock is far smaller; longer frames are
/// dropped as truncated.
pub const SNAP: usize = 2048;
/// How often the host's addresses are re-read.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// A frame for an unknown address re-reads them at most this often (an address just added).
const REFRESH_ON_MISS: Duration = Duration::from_millis(100);

/// Sniffs with AF_PACKET (`SOCK_DGRAM`, all protocols) and a BPF prefilter.
#[derive(Debug)]
pub struct AfPacket {
    sockets: Vec<Socket>,
    turn: Turn,
    headers: MultiHeaders<LinkAddr>,
    buf: Box<[u8]>,
    batch: [(Meta, usize); BATCH],
    batch_len: usize,
    batch_at: usize,
    hosts: HostAddresses,
    refreshed: Instant,
    stats: CaptureStats,
}

/// Round-robin over the sockets that poll reported ready: each gets one batch per turn.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Turn {
    ready: Vec<bool>,
    next: usize,
}

impl Turn {
    pub fn new(sockets: usize) -> Self {
        Self {
            ready: vec![false; sockets],
            next: 0,
        }
    }

    /// Marks the sockets poll reported readable.
    pub fn set_ready(&mut self, ready: impl IntoIterator<Item = bool>) {
        for (slot, r) in self.ready.iter_mut().zip(ready) {
            *slot = r;
        }
    }

    /// The next ready socket after the one served last, or `None` when all were served.
    pub fn take(&mut self) -> Option<usize> {
        let n = self.ready.len();
        let index = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| self.ready[i])?;
        self.ready[index] = false;
        self.next = (index + 1) % n;
        Some(index)
    }
}

/// Reads `PACKET_AUXDATA` (`struct tpacket_auxdata`) from a control message's bytes.
fn auxdata(bytes: &[u8]) -> Option<(u32, u16)> {
    let status = u32::from_ne_bytes(bytes.get(0..4)?.try_into().ok()?);
    let tci = u16::from_ne_bytes(bytes.get(16..18)?.try_into().ok()?);
    Some((status, tci))
}

/// What the kernel said about one received frame; `None` without `PACKET_AUXDATA` (the
/// VLAN tag and checksum state are then unknown).
fn meta_of(message: &RecvMsg<'_, '_, LinkAddr>) -> Option<Meta> {
    let address = message.address?;
    let mut aux = None;
    for cmsg in message.cmsgs().ok()? {
        if let ControlMessageOwned::Unknown(u) = cmsg {
            if u.cmsg_header.cmsg_level == libc::SOL_PACKET
                && u.cmsg_header.cmsg_type == libc::PACKET_AUXDATA
            {
                aux = auxdata(&u.data_bytes);
            }
        }
    }
    let (status, vlan_tci) = aux?;
    Some(Meta {
        ifindex: u32::try_from(address.ifindex()).unwrap_or(0),
        pkttype: address.pkttype(),
        status,
        vlan_tci,
        truncated: message.flags.contains(MsgFlags::MSG_TRUNC),
    })
}

/// A frame without auxdata: dropped, since its VLAN tag is unknown.
const NO_AUXDATA: Meta = Meta {
    ifindex: 0,
    pkttype: u8::MAX,
    status: 0,
    vlan_tci: 0,
    truncated: false,
};

impl AfPacket {
    /// Opens one socket per interface (or one for all when `interfaces` is empty). The filter
    /// is attached before the socket is bound, so no unfiltered packet is ever queued.
    pub fn open(
        interfaces: &[String],
        watches: &[bpf::Watch],
        syn_only: bool,
    ) -> anyhow::Result<Self> {
        let program = match bpf::program(watches, syn_only) {
            Ok(p) => p,
            Err(_) => {
                // Too many ranges: one range per protocol (userspace still filters exactly).
                let mut wide = Vec::new();
                for proto in [Proto::Tcp, Proto::Udp] {
                    let of: Vec<_> = watches.iter().filter(|w| w.proto == proto).collect();
                    if let (Some(lo), Some(hi)) = (
                        of.iter().map(|w| w.low).min(),
                        of.iter().map(|w| w.high).max(),
                    ) {
                        wide.push(bpf::Watch {
                            proto,
                            low: lo,
                            high: hi,
                        });
                    }
                }
                bpf::program(&wide, syn_only)?
            }
        };
        let indexes: Vec<u32> = if interfaces.is_empty() {
            vec![0]
        } else {
            interfaces
                .iter()
                .map(|name| {
                    nix::net::if_::if_nametoindex(name.as_str())
                        .map_err(|_| anyhow::anyhow!("no interface `{name}`"))
                })
                .collect::<anyhow::Result<_>>()?
        };
        let mut sockets = Vec::new();
        for index in indexes {
            sockets.push(
                socket::open(index, &program)
                    .map_err(|e| anyhow::anyhow!("AF_PACKET socket: {e} (needs CAP_NET_RAW)"))?,
            );
        }
        let hosts = HostAddresses::read()
            .map_err(|e| anyhow::anyhow!("reading this host's addresses: {e}"))?;
        Ok(Self {
            turn: Turn::new(sockets.len()),
            sockets,
            headers: MultiHeaders::preallocate(
                BATCH,
                Some(nix::cmsg_space!(libc::tpacket_auxdata)),
            ),
            buf: vec![0u8; BATCH * SNAP].into_boxed_slice(),
            batch: [(Meta::default(), 0); BATCH],
            batch_len: 0,
            batch_at: 0,
            hosts,
            refreshed: Instant::now(),
            stats: CaptureStats::default(),
        })
    }

    /// Re-reads the host's addresses; on failure the last table stays.
    fn refresh(&mut self) {
        if let Ok(hosts) = HostAddresses::read() {
            self.hosts = hosts;
        }
        self.refreshed = Instant::now();
    }

    /// The next frame of the current batch that the host would accept, as (offset, length)
    /// in `buf`; every other frame is counted by reason.
    fn next_accepted(&mut self) -> Option<(usize, usize)> {
        while self.batch_at < self.batch_len {
            let slot = self.batch_at;
            self.batch_at += 1;
            let (meta, length) = self.batch[slot];
            if meta.pkttype == PACKET_OUTGOING {
                continue; // our own frames: not received
            }
            self.stats.received += 1;
            if meta == NO_AUXDATA {
                self.stats.count(DropReason::NoAuxdata);
                continue;
            }
            let start = slot * SNAP;
            let packet = &self.buf[start..start + length];
            let mut verdict = host::judge(&meta, packet, &self.hosts).map(|_| ());
            if verdict == Err(DropReason::NotOurAddress)
                && self.refreshed.elapsed() >= REFRESH_ON_MISS
            {
                if let Ok(hosts) = HostAddresses::read() {
                    self.hosts = hosts;
                }
                self.refreshed = Instant::now();
                verdict = host::judge(&meta, packet, &self.hosts).map(|_| ());
            }
            match verdict {
                Ok(()) => {
                    self.stats.delivered += 1;
                    return Some((start, length));
                }
                Err(reason) => self.stats.count(reason),
            }
        }
        None
    }

    /// Reads up to [`BATCH`] frames from socket `index` without waiting.
    fn fill(&mut self, index: usize) -> io::Result<()> {
        self.batch_len = 0;
        self.batch_at = 0;
        let fd = self.sockets[index].as_raw_fd();
        let mut chunks = self.buf.chunks_exact_mut(SNAP);
        let mut slices: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let messages = match recvmmsg(
            fd,
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(m) => m,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut received = 0;
        for (slot, message) in messages.enumerate() {
            let length = message.bytes.min(SNAP);
            self.batch[slot] = (meta_of(&message).unwrap_or(NO_AUXDATA), length);
            received = slot + 1;
        }
        self.batch_len = received;
        Ok(())
    }

    /// Waits up to `timeout` for any socket to become readable.
    fn poll(&mut self, timeout: Duration) -> io::Result<()> {
        let mut fds: Vec<PollFd<'_>> = self
            .sockets
            .iter()
            .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        self.turn.set_ready(ready);
        Ok(())
    }
}

impl Source for AfPacket {
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received<'_>>> {
        if self.refreshed.elapsed() >= REFRESH_EVERY {
            self.refresh();
        }
        let mut polled = false;
        let found = loop {
            if let Some(found) = self.next_accepted() {
                break Some(found);
            }
            if let Some(index) = self.turn.take() {
                self.fill(index)?;
                continue;
            }
            // Every ready socket had its turn: wait once, then give the loop back.
            if polled {
                break None;
            }
            self.poll(timeout)?;
            polled = true;
        };
        Ok(found.map(|(start, length)| Received::Ip(&self.buf[start..start + length])))
    }

    fn stats(&mut self) -> super::CaptureStats {
        for socket in &self.sockets {
            if let Ok((packets, drops)) = socket::take_statistics(socket) {
                self.stats.kernel_packets += u64::from(packets);
                self.stats.kernel_drops += u64::from(drops);
            }
        }
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ready_socket_gets_a_turn_before_any_gets_a_second() {
        let mut turn = Turn::new(3);
        turn.set_ready([true, true, true]);
        assert_eq!(
            (turn.take(), turn.take(), turn.take(), turn.take()),
            (Some(0), Some(1), Some(2), None)
        );
        // Socket 0 is flooded and always ready; 2 becomes ready too: 2 is not starved, and
        // the rotation resumes after the last served socket rather than at 0.
        turn.set_ready([true, false, true]);
        assert_eq!(
            (turn.take(), turn.take(), turn.take()),
            (Some(0), Some(2), None)
        );
        turn.set_ready([true, true, false]);
        assert_eq!(
            (turn.take(), turn.take(), turn.take()),
            (Some(0), Some(1), None)
        );
        turn.set_ready([true, true, true]);
        assert_eq!(turn.take(), Some(2), "resumes after socket 1");
    }

    #[test]
    fn auxdata_fields_are_read_at_their_offsets() {
        let mut bytes = [0u8; 20];
        bytes[0..4].copy_from_slice(&(host::TP_STATUS_VLAN_VALID | 1).to_ne_bytes());
        bytes[16..18].copy_from_slice(&42u16.to_ne_bytes());
        assert_eq!(auxdata(&bytes), Some((host::TP_STATUS_VLAN_VALID | 1, 42)));
        assert_eq!(auxdata(&bytes[..10]), None);
        assert_eq!(std::mem::size_of::<libc::tpacket_auxdata>(), 20);
    }
}
