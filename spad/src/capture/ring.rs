//! A `PACKET_RX_RING` (TPACKET_V2) receive ring shared with the kernel: the kernel copies
//! each frame that passes the BPF filter into the next free slot and flips the slot's status
//! to "user"; we read the frame in place and flip it back. No system call and no copy per
//! frame. TPACKET_V2 rather than V3: each slot is handed over as soon as it is written, so
//! there is no block-retire timeout (the ~100 ms a pcap-based daemon waits per grant).
//!
//! The unsafe parts are here: mapping and unmapping the ring, the atomic status word of a
//! slot, and the byte view of a slot the kernel has handed over. Everything read from a slot
//! is bounds-checked against the slot before use.

use std::ffi::c_void;
use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use socket2::Socket;

use super::host::Meta;
use super::socket::set_option;

/// `TPACKET_V2` in `enum tpacket_versions`.
const TPACKET_V2: libc::c_int = 1;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
/// `sizeof(struct tpacket2_hdr)`, and where `struct sockaddr_ll` follows it
/// (`TPACKET_ALIGN(sizeof(struct tpacket2_hdr))`).
const HEADER: usize = 32;
const SOCKADDR_LL: usize = 20;

/// Where the network-layer bytes start in a slot of a `SOCK_DGRAM` TPACKET_V2 ring: the
/// kernel puts them at `TPACKET_ALIGN(TPACKET2_HDRLEN) + 16` (the 32-byte `tpacket2_hdr` and
/// the 20-byte `sockaddr_ll`, aligned to 64, plus 16 bytes it keeps for a link header). A
/// `SOCK_DGRAM` socket gets no link-layer header (the kernel strips Ethernet and moves a VLAN
/// tag to `tp_vlan_tci`), so the rest of the slot is all for the IP packet.
pub const NET_OFFSET: usize = 80;
const BLOCK_SIZE: usize = 128 << 10;
/// Slots per ring: this many frames wait for the daemon before the kernel drops any
/// (counted: `PACKET_STATISTICS`).
pub const FRAMES: usize = 4096;

/// How big a ring slot is, chosen from the config: the ring is mapped into the daemon and
/// counted whole in its RSS (the kernel inserts every page at `mmap`), so its size is
/// `FRAMES` times this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotSize {
    /// 1 KiB slots (a 4 MiB ring): IP packets up to 944 bytes. An SPA packet (at most
    /// [`spa_shared::packet::MAX_LEN`] bytes of UDP payload) fits with any IPv4 options or
    /// 384 bytes of IPv6 extension headers; a knock is a bare SYN or a tiny datagram.
    Small,
    /// 2 KiB slots (an 8 MiB ring): IP packets up to 1,968 bytes, a whole 1,500-byte frame.
    /// Needed for fwknop 2.x packets, which can be as long as the link allows.
    Large,
}

impl SlotSize {
    /// The slot size for a daemon that must (or need not) receive fwknop packets.
    pub fn for_fwknop(fwknop: bool) -> Self {
        if fwknop {
            Self::Large
        } else {
            Self::Small
        }
    }

    /// Bytes per slot.
    pub const fn bytes(self) -> usize {
        match self {
            Self::Small => 1024,
            Self::Large => 2048,
        }
    }

    /// The longest IP packet a slot holds whole; longer ones are dropped as truncated.
    pub const fn max_packet(self) -> usize {
        self.bytes() - NET_OFFSET
    }

    /// Bytes of the whole ring.
    pub const fn ring_bytes(self) -> usize {
        self.bytes() * FRAMES
    }
}

/// One mapped receive ring, owned with its socket.
#[derive(Debug)]
pub struct Ring {
    socket: Socket,
    map: NonNull<c_void>,
    slot: SlotSize,
    head: usize,
}

impl Ring {
    /// Sets up the ring on an unbound capture socket and maps it. The socket must not be
    /// bound yet: frames queued before the ring exists would never be read.
    pub fn new(socket: Socket, slot: SlotSize) -> io::Result<Self> {
        set_option(&socket, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V2)?;
        let request = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: (slot.ring_bytes() / BLOCK_SIZE) as u32,
            tp_frame_size: slot.bytes() as u32,
            tp_frame_nr: FRAMES as u32,
        };
        set_option(&socket, libc::SOL_PACKET, libc::PACKET_RX_RING, &request)?;
        // No MAP_LOCKED: the ring's pages are the kernel's own, never swapped, and all of
        // them are inserted into our page table by the mmap itself (so they count in RSS
        // from the start either way); the kernel ignores VM_LOCKED on such a mapping, and
        // asking for it only spends RLIMIT_MEMLOCK.
        let map = map_ring(&socket, slot)?;
        Ok(Self {
            socket,
            map,
            slot,
            head: 0,
        })
    }

    /// The size of this ring's slots.
    pub fn slot_size(&self) -> SlotSize {
        self.slot
    }

    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// The status word of slot `index`, shared with the kernel.
    fn status(&self, index: usize) -> &AtomicU32 {
        // SAFETY: `index < FRAMES`, so the slot lies inside the mapping, which lives as long
        // as `self`; slots start on slot-size (1 or 2 KiB) boundaries of a page-aligned
        // mapping, so the u32 at its start is aligned. The kernel writes it concurrently, hence the
        // atomic view (the kernel's side uses barriers around it).
        unsafe {
            &*self
                .map
                .as_ptr()
                .cast::<u8>()
                .add(index * self.slot.bytes())
                .cast::<AtomicU32>()
        }
    }

    /// Whether at least `frames` frames wait, the head included (`frames` ≤ [`FRAMES`]):
    /// the kernel fills slots in order, so the slot `frames - 1` after the head tells.
    pub fn backlog_at_least(&self, frames: usize) -> bool {
        let index = (self.head + frames.clamp(1, FRAMES) - 1) % FRAMES;
        self.status(index).load(Ordering::Acquire) & TP_STATUS_USER != 0
    }

    /// Whether the kernel has handed over the head slot.
    pub fn ready(&self) -> bool {
        self.status(self.head).load(Ordering::Acquire) & TP_STATUS_USER != 0
    }

    /// The frame at the head of the ring, if the kernel has handed it over: what the
    /// kernel reports about it, and its network-layer bytes. It stays ours (and the slice
    /// valid) until [`Ring::release`].
    pub fn peek(&self) -> Option<(Meta, &[u8])> {
        let status = self.status(self.head).load(Ordering::Acquire);
        if status & TP_STATUS_USER == 0 {
            return None;
        }
        // SAFETY: the slot lies inside the mapping (see `status`), and its status says the
        // kernel has finished writing it and will not touch it until we hand it back in
        // `release`, which needs `&mut self` and so ends this borrow first.
        let slot = unsafe {
            std::slice::from_raw_parts(
                self.map
                    .as_ptr()
                    .cast::<u8>()
                    .add(self.head * self.slot.bytes()),
                self.slot.bytes(),
            )
        };
        Some(read_slot(status, slot))
    }

    /// Hands the head slot back to the kernel and moves on.
    pub fn release(&mut self) {
        self.status(self.head)
            .store(TP_STATUS_KERNEL, Ordering::Release);
        self.head = (self.head + 1) % FRAMES;
    }
}

/// Maps the ring the kernel allocated for `socket`.
fn map_ring(socket: &Socket, slot: SlotSize) -> nix::Result<NonNull<c_void>> {
    let length = NonZeroUsize::new(slot.ring_bytes()).unwrap_or(NonZeroUsize::MIN);
    // SAFETY: a fresh shared mapping of the ring the kernel has just allocated for this
    // socket, at offset 0 with exactly its size; nothing else in this process aliases it.
    // The caller keeps it in a `Ring`, which unmaps it in Drop, and no slot outlives that
    // (slots borrow the `Ring`).
    unsafe {
        mmap(
            None,
            length,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            socket,
            0,
        )
    }
}

// SAFETY: a `Ring` owns its mapping exclusively (the raw pointer is never shared or copied
// out), and the kernel's side does not care which thread reads or releases slots; moving it
// to another thread (e.g. an async runtime's worker) is as safe as moving a `Vec`.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, with its size; no slice into it outlives `self`.
        let _ = unsafe { munmap(self.map, self.slot.ring_bytes()) };
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_ne_bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// Reads a handed-over slot (`struct tpacket2_hdr`, then `struct sockaddr_ll`, then the
/// frame at `tp_net`). Offsets come from the kernel but are checked against the slot; a
/// frame that does not fit is reported as truncated with no bytes.
pub fn read_slot(status: u32, slot: &[u8]) -> (Meta, &[u8]) {
    let length = u32_at(slot, 4) as usize;
    let snap = u32_at(slot, 8) as usize;
    let net = usize::from(u16_at(slot, 14));
    let address = HEADER;
    let meta = Meta {
        ifindex: u32_at(slot, address + 4),
        pkttype: slot.get(address + 10).copied().unwrap_or(u8::MAX),
        status,
        vlan_tci: u16_at(slot, 24),
        truncated: snap < length,
    };
    match slot.get(net..net.saturating_add(snap)) {
        Some(bytes) if net >= HEADER + SOCKADDR_LL => (meta, bytes),
        _ => (
            Meta {
                truncated: true,
                ..meta
            },
            &[],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_layout_matches_the_kernel_headers() {
        assert_eq!(std::mem::size_of::<libc::tpacket2_hdr>(), HEADER);
        assert_eq!(std::mem::size_of::<libc::sockaddr_ll>(), SOCKADDR_LL);
        // TPACKET_ALIGN (16) of TPACKET2_HDRLEN, plus the 16 bytes kept for a link header.
        assert_eq!((HEADER + SOCKADDR_LL).next_multiple_of(16) + 16, NET_OFFSET);
        assert_eq!(BLOCK_SIZE % 4096, 0);
        for size in [SlotSize::Small, SlotSize::Large] {
            assert_eq!(
                BLOCK_SIZE % size.bytes(),
                0,
                "{size:?}: whole slots per block"
            );
            assert_eq!(size.ring_bytes() % BLOCK_SIZE, 0, "{size:?}: whole blocks");
        }
        assert_eq!(SlotSize::Small.ring_bytes(), 4 << 20);
        assert_eq!(SlotSize::Large.ring_bytes(), 8 << 20);
    }

    /// The small slot must hold the longest SPA packet the protocol allows, over IPv4 with
    /// the longest header (60 bytes of options) and over IPv6 with extension headers; the
    /// large one a whole 1,500-byte frame (fwknop). [`SlotSize::for_fwknop`] picks large only
    /// when fwknop packets must be received.
    #[test]
    fn a_maximum_size_spa_packet_fits_a_small_slot() {
        let spa = 8 + spa_shared::packet::MAX_LEN;
        assert!(SlotSize::Small.max_packet() >= 60 + spa);
        assert!(SlotSize::Small.max_packet() >= 40 + 384 + spa);
        assert!(SlotSize::Large.max_packet() >= 1500);
        assert_eq!(SlotSize::for_fwknop(false), SlotSize::Small);
        assert_eq!(SlotSize::for_fwknop(true), SlotSize::Large);
        // A slot as the kernel fills it: a 60-byte IPv4 header, UDP and a maximum packet.
        let mut s = vec![0u8; SlotSize::Small.bytes()];
        let length = (60 + spa) as u32;
        s[4..8].copy_from_slice(&length.to_ne_bytes());
        s[8..12].copy_from_slice(&length.to_ne_bytes());
        s[14..16].copy_from_slice(&(NET_OFFSET as u16).to_ne_bytes());
        let (meta, bytes) = read_slot(TP_STATUS_USER, &s);
        assert!(!meta.truncated);
        assert_eq!(bytes.len(), 60 + spa);
    }

    fn slot(len: u32, snap: u32, net: u16, pkttype: u8, tci: u16) -> Vec<u8> {
        let mut s = vec![0u8; SlotSize::Large.bytes()];
        s[0..4].copy_from_slice(&TP_STATUS_USER.to_ne_bytes());
        s[4..8].copy_from_slice(&len.to_ne_bytes());
        s[8..12].copy_from_slice(&snap.to_ne_bytes());
        s[12..14].copy_from_slice(&net.to_ne_bytes());
        s[14..16].copy_from_slice(&net.to_ne_bytes());
        s[24..26].copy_from_slice(&tci.to_ne_bytes());
        s[HEADER + 4..HEADER + 8].copy_from_slice(&7i32.to_ne_bytes());
        s[HEADER + 10] = pkttype;
        for (i, b) in s[usize::from(net)..].iter_mut().enumerate() {
            *b = i as u8;
        }
        s
    }

    #[test]
    fn slots_are_read_with_offsets_checked() {
        let s = slot(100, 100, 80, 3, 42);
        let (meta, bytes) = read_slot(TP_STATUS_USER, &s);
        assert_eq!((meta.ifindex, meta.pkttype, meta.vlan_tci), (7, 3, 42));
        assert!(!meta.truncated);
        assert_eq!(bytes.len(), 100);
        assert_eq!(bytes[..3], [0, 1, 2]);
        // Snapped short of the frame: truncated.
        assert!(
            read_slot(TP_STATUS_USER, &slot(2000, 900, 80, 0, 0))
                .0
                .truncated
        );
        // Offsets pointing outside the slot or into the header: no bytes, never a panic.
        for (snap, net) in [(2000u32, 80u16), (10, 4000), (10, 8), (u32::MAX, 80)] {
            let mut s = slot(10, 10, 80, 0, 0);
            s[8..12].copy_from_slice(&snap.to_ne_bytes());
            s[14..16].copy_from_slice(&net.to_ne_bytes());
            let (meta, bytes) = read_slot(TP_STATUS_USER, &s);
            assert!(meta.truncated && bytes.is_empty(), "snap {snap} net {net}");
        }
    }

    /// Needs CAP_NET_RAW: skipped (with a line saying so) when not root. The ring maps in
    /// both slot sizes, starts empty (the filter passes nothing) and wraps.
    #[test]
    fn a_new_ring_maps_and_is_empty() {
        for size in [SlotSize::Small, SlotSize::Large] {
            let program = crate::capture::bpf::program(&[], false).unwrap();
            let socket = match crate::capture::socket::create(&program) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    eprintln!("skipped: opening an AF_PACKET socket needs CAP_NET_RAW");
                    return;
                }
                Err(e) => panic!("{e}"),
            };
            let mut ring = Ring::new(socket, size).unwrap();
            assert_eq!(ring.slot_size(), size);
            crate::capture::socket::bind(ring.socket(), 0).unwrap();
            for _ in 0..3 {
                assert!(ring.peek().is_none());
            }
            // Releasing walks the ring and wraps.
            for _ in 0..FRAMES + 1 {
                ring.release();
            }
            assert_eq!(ring.head, 1);
            assert!(ring.peek().is_none());
        }
    }
}
