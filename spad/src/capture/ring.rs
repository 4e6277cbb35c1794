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

/// Bytes per slot: header, address and a whole 1,500-byte frame (an SPA packet or a knock
/// is far smaller, but an fwknop packet can be long; longer frames are dropped as
/// truncated).
pub const FRAME_SIZE: usize = 2048;
const BLOCK_SIZE: usize = 128 << 10;
const BLOCKS: usize = 64;
/// Slots per ring: 4,096 frames (8 MiB, mapped into the daemon and counted in its RSS)
/// wait for the daemon before the kernel drops any.
pub const FRAMES: usize = BLOCK_SIZE / FRAME_SIZE * BLOCKS;

/// One mapped receive ring, owned with its socket.
#[derive(Debug)]
pub struct Ring {
    socket: Socket,
    map: NonNull<c_void>,
    head: usize,
}

impl Ring {
    /// Sets up the ring on an unbound capture socket and maps it. The socket must not be
    /// bound yet: frames queued before the ring exists would never be read.
    pub fn new(socket: Socket) -> io::Result<Self> {
        set_option(&socket, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V2)?;
        let request = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: BLOCKS as u32,
            tp_frame_size: FRAME_SIZE as u32,
            tp_frame_nr: FRAMES as u32,
        };
        set_option(&socket, libc::SOL_PACKET, libc::PACKET_RX_RING, &request)?;
        let shared = MapFlags::MAP_SHARED;
        // MAP_LOCKED keeps the ring in RAM; it needs RLIMIT_MEMLOCK room (or CAP_IPC_LOCK),
        // so without it the ring is mapped unlocked.
        let map = map_ring(&socket, shared | MapFlags::MAP_LOCKED)
            .or_else(|_| map_ring(&socket, shared))?;
        Ok(Self {
            socket,
            map,
            head: 0,
        })
    }

    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// The status word of slot `index`, shared with the kernel.
    fn status(&self, index: usize) -> &AtomicU32 {
        // SAFETY: `index < FRAMES`, so the slot lies inside the mapping, which lives as long
        // as `self`; slots start on FRAME_SIZE (2048) boundaries of a page-aligned mapping,
        // so the u32 at its start is aligned. The kernel writes it concurrently, hence the
        // atomic view (the kernel's side uses barriers around it).
        unsafe {
            &*self
                .map
                .as_ptr()
                .cast::<u8>()
                .add(index * FRAME_SIZE)
                .cast::<AtomicU32>()
        }
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
                self.map.as_ptr().cast::<u8>().add(self.head * FRAME_SIZE),
                FRAME_SIZE,
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
fn map_ring(socket: &Socket, flags: MapFlags) -> nix::Result<NonNull<c_void>> {
    let length = NonZeroUsize::new(FRAMES * FRAME_SIZE).unwrap_or(NonZeroUsize::MIN);
    // SAFETY: a fresh shared mapping of the ring the kernel has just allocated for this
    // socket, at offset 0 with exactly its size; nothing else in this process aliases it.
    // The caller keeps it in a `Ring`, which unmaps it in Drop, and no slot outlives that
    // (slots borrow the `Ring`).
    unsafe {
        mmap(
            None,
            length,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            flags,
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
        let _ = unsafe { munmap(self.map, FRAMES * FRAME_SIZE) };
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
        assert_eq!(BLOCK_SIZE % FRAME_SIZE, 0);
        assert_eq!(BLOCK_SIZE % 4096, 0);
    }

    fn slot(len: u32, snap: u32, net: u16, pkttype: u8, tci: u16) -> Vec<u8> {
        let mut s = vec![0u8; FRAME_SIZE];
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

    /// Needs CAP_NET_RAW: skipped (with a line saying so) when not root. The ring maps,
    /// starts empty (the filter passes nothing) and wraps.
    #[test]
    fn a_new_ring_maps_and_is_empty() {
        let program = crate::capture::bpf::program(&[], false).unwrap();
        let socket = match crate::capture::socket::create(&program) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: opening an AF_PACKET socket needs CAP_NET_RAW");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let mut ring = Ring::new(socket).unwrap();
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
