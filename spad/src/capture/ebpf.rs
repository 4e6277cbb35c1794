//! The kernel prefilter with a per-source packet budget: what the classic program of
//! [`bpf`](super::bpf) passes, as eBPF that reads the watched ports from a map (so a reload
//! that changes ports needs no new program and no privilege), with a budget check on every
//! frame it would pass.
//!
//! While the budget is engaged, a flood from one source (a replayed packet, garbage at the
//! SPA port, a knock storm) is dropped inside the kernel, before it takes a slot of the
//! capture ring or a moment of the daemon's time, and the drops are counted in a kernel
//! counter the daemon maps and reads (`capture_kernel_source_limited`). The budget is a GCRA
//! per source address (IPv6: per /64) in an LRU hash map. It is engaged only while the daemon
//! falls behind ([`pressure`](super::pressure)), through a flag in a control map the daemon
//! maps and writes: a flood spoofing a client's address spends that client's budget only
//! then.
//!
//! Loading needs `CAP_BPF` (or `CAP_SYS_ADMIN`): the daemon does it once, before it gives the
//! privilege up, and every capture it opens later attaches the same program
//! ([`program`](super::program)), which needs no privilege. When the kernel refuses (old
//! kernel, no privilege), the capture falls back to the classic program and says so; the
//! per-source handshake budget in userspace still applies. The unsafe parts are the
//! `bpf(2)` calls and the mappings of the counter and the control; each is commented where
//! it is made.

use std::ffi::c_void;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use socket2::Socket;

use super::bpf;

/// How many packets per second one source (IPv6: one /64) may send to the watched ports,
/// and how many at once, before the kernel drops the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceBudget {
    pub rate: u32,
    pub burst: u32,
}

impl SourceBudget {
    /// Nanoseconds of budget one packet costs.
    pub(crate) fn cost_ns(self) -> u64 {
        1_000_000_000 / u64::from(self.rate.max(1))
    }

    /// How far a source's theoretical arrival time may run ahead of now: the burst.
    pub(crate) fn slack_ns(self) -> u64 {
        u64::from(self.burst.max(1) - 1) * self.cost_ns()
    }
}

/// Sources the kernel keeps a budget for; the least recently seen is forgotten first.
pub const SOURCES: u32 = 16_384;

/// A loaded program with its maps, attached to any number of capture sockets.
#[derive(Debug)]
pub struct Limiter {
    program: OwnedFd,
    /// The budgets per source: only the program uses it, but it lives as long as we do.
    _buckets: OwnedFd,
    _counter_map: OwnedFd,
    _control_map: OwnedFd,
    /// Read-only view of the counter of frames cut.
    counter: Mapping,
    /// Read-write view of [`Control`]: the program reads it on every frame it would pass.
    control: Mapping,
}

/// The one value of the control map, as the program reads it (little-endian, at these
/// offsets): whether the budget is enforced now, the budget itself, and the watched ports in
/// two banks.
pub(crate) mod control {
    pub const ENGAGED: usize = 0;
    pub const COST_NS: usize = 8;
    pub const SLACK_NS: usize = 16;
    /// Which bank of watched ports the program reads (u64, 0 or 1), once per frame.
    /// Userspace rewrites the other bank, then flips this word: a frame sees the old table
    /// or the new one, never a mix ([`Ports::rewrite`](super::Ports::rewrite)).
    pub const BANK: usize = 24;
    /// Bank 0 starts here, bank 1 [`bank::SIZE`] bytes later.
    pub const BANKS: usize = 32;
    /// Port ranges per protocol in a bank.
    pub const RANGES: usize = 64;
    pub const SIZE: u32 = (BANKS + 2 * bank::SIZE) as u32;

    /// Where bank `index` (0 or 1) starts in the control value.
    pub fn bank_start(index: u64) -> usize {
        BANKS + (index as usize & 1) * bank::SIZE
    }

    /// One bank's fields, at these offsets from its start.
    pub mod bank {
        use super::RANGES;
        /// TCP passes only as SYN-without-ACK (u64, 0 or 1).
        pub const SYN_ONLY: usize = 0;
        /// How many of the range slots below are in use, per protocol (u64 each).
        pub const UDP_COUNT: usize = 8;
        pub const TCP_COUNT: usize = 16;
        /// Port ranges per protocol: [`RANGES`] pairs of (low u32, high u32), the first
        /// `*_COUNT` in use; an unused pair is (1, 0), which no port matches either.
        pub const UDP: usize = 24;
        pub const TCP: usize = UDP + 8 * RANGES;
        pub const SIZE: usize = TCP + 8 * RANGES;
    }
}

/// A value userspace stores into the control value: the width of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Word {
    U32(u32),
    U64(u64),
}

/// The watched ports as the program reads them from the control value: merged ranges per
/// protocol, at most [`control::RANGES`] each (more collapse into one range from the lowest
/// to the highest: userspace still filters exactly, as with the classic program).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    pub syn_only: bool,
    pub udp: Vec<(u16, u16)>,
    pub tcp: Vec<(u16, u16)>,
}

impl Ports {
    pub fn new(watches: &[bpf::Watch], syn_only: bool) -> Self {
        let fit = |mut ranges: Vec<(u16, u16)>| {
            if ranges.len() > control::RANGES {
                let low = ranges.iter().map(|r| r.0).min().unwrap_or(0);
                let high = ranges.iter().map(|r| r.1).max().unwrap_or(0);
                ranges = vec![(low, high)];
            }
            ranges
        };
        Self {
            syn_only,
            udp: fit(bpf::merge(watches, crate::net::Proto::Udp)),
            tcp: fit(bpf::merge(watches, crate::net::Proto::Tcp)),
        }
    }

    /// A bank's range slots as (offset in the bank, u32 value) pairs, every slot written
    /// (the counts are written separately, see [`counts`](Self::counts)).
    pub(crate) fn words(&self) -> Vec<(usize, u32)> {
        let mut out = Vec::with_capacity(4 * control::RANGES);
        for (base, ranges) in [
            (control::bank::UDP, &self.udp),
            (control::bank::TCP, &self.tcp),
        ] {
            for i in 0..control::RANGES {
                let (low, high) = ranges
                    .get(i)
                    .map_or((1, 0), |&(l, h)| (u32::from(l), u32::from(h)));
                out.push((base + 8 * i, low));
                out.push((base + 8 * i + 4, high));
            }
        }
        out
    }

    /// The slots in use per protocol, as (offset in the bank, count).
    pub(crate) fn counts(&self) -> [(usize, u64); 2] {
        [
            (control::bank::UDP_COUNT, self.udp.len() as u64),
            (control::bank::TCP_COUNT, self.tcp.len() as u64),
        ]
    }

    /// The stores, in order, that put these ports in force when bank `active` is the one
    /// in use: the whole other bank, then the flip of [`control::BANK`] to it. A frame reads
    /// the bank index once, so one rewrite cannot mix into any frame's table. (A frame
    /// whose evaluation spans two rewrites could see the second one's stores in its bank:
    /// an evaluation takes well under a microsecond, and rewrites are reloads apart.)
    pub(crate) fn rewrite(&self, active: u64) -> Vec<(usize, Word)> {
        let next = (active & 1) ^ 1;
        let base = control::bank_start(next);
        let mut out = Vec::with_capacity(4 * control::RANGES + 4);
        out.push((
            base + control::bank::SYN_ONLY,
            Word::U64(u64::from(self.syn_only)),
        ));
        for (offset, count) in self.counts() {
            out.push((base + offset, Word::U64(count)));
        }
        for (offset, value) in self.words() {
            out.push((base + offset, Word::U32(value)));
        }
        out.push((control::BANK, Word::U64(next)));
        out
    }
}

/// A shared mapping of an array map's values (`BPF_F_MMAPABLE`): the value of index 0
/// starts at offset 0. The length is one page as the kernel sees it (whatever its size).
#[derive(Debug)]
struct Mapping {
    at: NonNull<c_void>,
    len: NonZeroUsize,
}

impl Mapping {
    fn new(map: &OwnedFd, writable: bool) -> io::Result<Self> {
        let len = NonZeroUsize::new(page_size()).expect("a page is not empty");
        let protection = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the map's value area; the kernel checks that
        // the map is mmapable and that `len` does not exceed it (its values are at most a
        // page here), and the mapping is unmapped only in `drop`.
        let at = unsafe { mmap(None, len, protection, MapFlags::MAP_SHARED, map, 0) }
            .map_err(io::Error::from)?;
        Ok(Self { at, len })
    }

    /// The u64 at `offset` (a multiple of 8 inside the first value).
    fn word(&self, offset: usize) -> &AtomicU64 {
        self.field(offset)
    }

    /// The u32 at `offset` (a multiple of 4 inside the first value).
    fn word32(&self, offset: usize) -> &AtomicU32 {
        self.field(offset)
    }

    /// The atomic at `offset`: `T` is `AtomicU32` or `AtomicU64`, whose alignment is their
    /// size.
    fn field<T>(&self, offset: usize) -> &T {
        let size = std::mem::size_of::<T>();
        assert!(offset % size == 0 && offset + size <= self.len.get());
        // SAFETY: in bounds and aligned to its size (checked above; the mapping is
        // page-aligned), and live as long as `self`; `T` is an atomic integer, and the kernel
        // changes the value only with atomic operations or whole aligned stores, so atomic
        // access from here is sound.
        unsafe { &*self.at.as_ptr().cast::<u8>().add(offset).cast::<T>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `at`/`len` are exactly what `mmap` returned and took; no reference from
        // `word` outlives `self`.
        let _ = unsafe { munmap(self.at, self.len.get()) };
    }
}

// SAFETY: a `Mapping` is owned memory shared only with the kernel, accessed only through
// atomics; nothing in it is tied to the thread that made it.
unsafe impl Send for Mapping {}
// SAFETY: shared references give access only through atomics (`field`), which any number of
// threads may use at once; the daemon's one program is shared by its captures (`Arc`).
unsafe impl Sync for Mapping {}

fn page_size() -> usize {
    rustix::param::page_size()
}

/// Why loading failed, with the step that failed (so "Operation not permitted" at map
/// creation on an old kernel reads as the memlock limit it usually is there).
fn step(what: &'static str) -> impl FnOnce(io::Error) -> io::Error {
    move |e| {
        let hint = match (what, e.raw_os_error()) {
            ("creating the budget map", Some(libc::EPERM)) => {
                " (needs CAP_BPF; before Linux 5.11 also a RLIMIT_MEMLOCK of a few MiB, e.g. LimitMEMLOCK=8M)"
            }
            ("loading the program", Some(libc::EPERM)) => " (needs CAP_BPF)",
            _ => "",
        };
        io::Error::new(e.kind(), format!("{what}: {e}{hint}"))
    }
}

impl Limiter {
    /// Loads the prefilter for `ports` with `budget`, released (see
    /// [`set_engaged`](Self::set_engaged)).
    pub fn load(ports: &Ports, budget: SourceBudget) -> io::Result<Self> {
        let buckets = create_map(MAP_LRU_HASH, 16, 8, SOURCES, 0, b"spad_sources")
            .map_err(step("creating the budget map"))?;
        let counter_map = create_map(MAP_ARRAY, 4, 8, 1, F_MMAPABLE, b"spad_limited")
            .map_err(step("creating the counter map"))?;
        let control_map = create_map(MAP_ARRAY, 4, control::SIZE, 1, F_MMAPABLE, b"spad_control")
            .map_err(step("creating the control map"))?;
        let counter = Mapping::new(&counter_map, false).map_err(step("mapping the counter"))?;
        let control = Mapping::new(&control_map, true).map_err(step("mapping the control"))?;
        let insns = prefilter(
            buckets.as_raw_fd(),
            counter_map.as_raw_fd(),
            control_map.as_raw_fd(),
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let program = load_program(&insns).map_err(step("loading the program"))?;
        let limiter = Self {
            program,
            _buckets: buckets,
            _counter_map: counter_map,
            _control_map: control_map,
            counter,
            control,
        };
        limiter.set_ports(ports);
        limiter.set_budget(budget);
        Ok(limiter)
    }

    /// Attaches the program to `socket` in place of any filter it has.
    pub fn attach(&self, socket: &Socket) -> io::Result<()> {
        let fd: libc::c_int = self.program.as_raw_fd();
        super::socket::set_option(socket, libc::SOL_SOCKET, libc::SO_ATTACH_BPF, &fd)
    }

    /// Frames dropped because their source was over budget, since the program was loaded.
    pub fn limited(&self) -> u64 {
        self.counter.word(0).load(Ordering::Relaxed)
    }

    /// A new budget, in force from the next frame: a memory write, no system call, so it
    /// works after the privilege drop too.
    pub fn set_budget(&self, budget: SourceBudget) {
        self.control
            .word(control::COST_NS)
            .store(budget.cost_ns(), Ordering::Relaxed);
        self.control
            .word(control::SLACK_NS)
            .store(budget.slack_ns(), Ordering::Relaxed);
    }

    /// New watched ports, in force from the next frame: memory writes, so a reload that
    /// changes ports needs no new program (and no privilege). They go into the bank the
    /// program does not read, then one store flips it over ([`Ports::rewrite`]): a frame
    /// sees the old table or the new one, never a mix.
    pub fn set_ports(&self, ports: &Ports) {
        // Only this process writes the index (one thread at a time: the event loop).
        let active = self.control.word(control::BANK).load(Ordering::Relaxed);
        for (offset, word) in ports.rewrite(active) {
            // Release: the flip, last, is seen only after every store to the bank before it.
            match word {
                Word::U32(value) => self.control.word32(offset).store(value, Ordering::Release),
                Word::U64(value) => self.control.word(offset).store(value, Ordering::Release),
            }
        }
    }

    /// Enforces the budget (`true`) or passes every source (`false`, the state after load).
    pub fn set_engaged(&self, engaged: bool) {
        self.control
            .word(control::ENGAGED)
            .store(u64::from(engaged), Ordering::Relaxed);
    }
}

#[cfg(test)]
impl Limiter {
    /// Whether the budget is enforced now, as the program reads it.
    pub(crate) fn engaged(&self) -> bool {
        self.control.word(control::ENGAGED).load(Ordering::Relaxed) != 0
    }

    /// The budget's (cost, slack) in nanoseconds, as the program reads them.
    pub(crate) fn budget_ns(&self) -> (u64, u64) {
        let read = |offset| self.control.word(offset).load(Ordering::Relaxed);
        (read(control::COST_NS), read(control::SLACK_NS))
    }
}

// ---- bpf(2) ----

const CMD_MAP_CREATE: libc::c_long = 0;
const CMD_PROG_LOAD: libc::c_long = 5;
const MAP_ARRAY: u32 = 2;
const MAP_LRU_HASH: u32 = 9;
const F_MMAPABLE: u32 = 1 << 10;
const PROG_SOCKET_FILTER: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, fully initialised `#[repr(C)]` prefix of `union bpf_attr`
    // for `cmd`, and its size is passed with it; the kernel reads at most that many bytes
    // (and writes back nothing we rely on).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success both commands return a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

fn name16(name: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name[..n]);
    out
}

fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: &[u8],
) -> io::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
        map_name: name16(name),
        ..MapCreate::default()
    };
    bpf(CMD_MAP_CREATE, &mut attr)
}

fn load_program(insns: &[EInsn]) -> io::Result<OwnedFd> {
    static LICENSE: &[u8] = b"MIT\0";
    let attempt = |log: Option<&mut Vec<u8>>| {
        let mut attr = ProgLoad {
            prog_type: PROG_SOCKET_FILTER,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            prog_name: name16(b"spad_prefilter"),
            ..ProgLoad::default()
        };
        if let Some(log) = log {
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
        }
        bpf(CMD_PROG_LOAD, &mut attr)
    };
    attempt(None).or_else(|first| {
        // Once more with the verifier's log, so the error says why.
        let mut log = vec![0u8; 1 << 16];
        attempt(Some(&mut log)).map_err(|_| {
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let tail: String = text.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
            io::Error::new(first.kind(), format!("{first}; verifier: {tail}"))
        })
    })
}

// ---- the program ----

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct EInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

#[cfg(test)]
impl EInsn {
    /// The raw fields as the kernel reads them (code, dst | src << 4, off, imm), for the
    /// interpreter in [`ebpf_interp`](super::ebpf_interp).
    pub(crate) fn fields(&self) -> (u8, u8, i16, i32) {
        (self.code, self.regs, self.off, self.imm)
    }

    /// An instruction from raw fields, for the interpreter's own tests.
    pub(crate) fn from_fields(code: u8, regs: u8, off: i16, imm: i32) -> Self {
        Self {
            code,
            regs,
            off,
            imm,
        }
    }
}

// Registers: r0 = loads and the return value, r1-r5 helper arguments (clobbered by calls and
// LD_ABS/LD_IND), r6 = the skb (needed by LD_ABS/LD_IND), r7 = the IPv4 header length (later:
// now), r8 = the control value (later: scratch), r9 = the length to accept, r10 = frame
// pointer.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;

const LD_ABS_W: u8 = 0x20;
const LD_ABS_H: u8 = 0x28;
const LD_ABS_B: u8 = 0x30;
const LD_IND_H: u8 = 0x48;
const LD_IND_B: u8 = 0x50;
const LD_IMM64: u8 = 0x18;
const LDX_W: u8 = 0x61;
const LDX_DW: u8 = 0x79;
const STX_DW: u8 = 0x7b;
const ST_W: u8 = 0x62;
const ST_DW: u8 = 0x7a;
const ATOMIC_DW: u8 = 0xdb;
const MOV64_K: u8 = 0xb7;
const MOV64_X: u8 = 0xbf;
const ADD64_K: u8 = 0x07;
const ADD64_X: u8 = 0x0f;
const SUB64_X: u8 = 0x1f;
const MUL64_K: u8 = 0x27;
const OR64_X: u8 = 0x4f;
const AND64_K: u8 = 0x57;
const LSH64_K: u8 = 0x67;
const AND32_K: u8 = 0x54;
const TO_BE: u8 = 0xdc;
const JA: u8 = 0x05;
const JEQ_K: u8 = 0x15;
const JSET_K: u8 = 0x45;
const JGT_X: u8 = 0x2d;
const JGE_X: u8 = 0x3d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const PSEUDO_MAP_FD: u8 = 1;
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_UPDATE: i32 = 2;
const HELPER_KTIME_GET_NS: i32 = 5;
/// `offsetof(struct __sk_buff, protocol)`.
const SKB_PROTOCOL: i16 = 16;
/// `offsetof(struct __sk_buff, pkt_type)`.
const SKB_PKT_TYPE: i16 = 4;
/// `PACKET_OUTGOING`: a frame this host sends.
const PACKET_OUTGOING: i32 = 4;

/// Why the program could not be assembled (a bug here, never the config's fault).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssembleError {
    #[error("a jump leaves the program")]
    Jump,
}

/// An instruction with its jump target still a label.
struct Emitter {
    insns: Vec<(EInsn, Option<usize>)>,
    labels: Vec<Option<usize>>,
}

impl Emitter {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn place(&mut self, label: usize) {
        self.labels[label] = Some(self.insns.len());
    }
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push((
            EInsn {
                code,
                regs: dst | (src << 4),
                off,
                imm,
            },
            None,
        ));
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: usize) {
        self.insns.push((
            EInsn {
                code,
                regs: dst | (src << 4),
                off: 0,
                imm,
            },
            Some(to),
        ));
    }
    fn imm64(&mut self, dst: u8, src: u8, value: u64) {
        self.raw(LD_IMM64, dst, src, 0, value as u32 as i32);
        self.raw(0, 0, 0, 0, (value >> 32) as u32 as i32);
    }
    /// `r0 = bpf_map_lookup_elem(map, r10 + key_at)`, jumping to `if_none` when there is no
    /// such element (r1-r5 are clobbered).
    fn lookup(&mut self, map_fd: i32, key_at: i16, if_none: usize) {
        self.imm64(R1, PSEUDO_MAP_FD, map_fd as u32 as u64);
        self.raw(MOV64_X, R2, R10, 0, 0);
        self.raw(ADD64_K, R2, 0, 0, i32::from(key_at));
        self.raw(CALL, 0, 0, 0, HELPER_MAP_LOOKUP);
        self.jump(JEQ_K, R0, 0, 0, if_none);
    }
    fn finish(self) -> Result<Vec<EInsn>, AssembleError> {
        self.insns
            .iter()
            .enumerate()
            .map(|(at, (insn, to))| {
                let mut insn = *insn;
                if let Some(label) = to {
                    let target = self.labels[*label].ok_or(AssembleError::Jump)?;
                    insn.off = i16::try_from(target as isize - at as isize - 1)
                        .map_err(|_| AssembleError::Jump)?;
                }
                Ok(insn)
            })
            .collect()
    }
}

/// The length a passed frame is accepted with (the classic program's `RET`).
const ACCEPT: i32 = 0x0004_0000;

/// The eBPF prefilter: what the classic program of [`bpf::program`] passes, with the watched
/// ports read from the control value ([`Ports`]) instead of built in, so a reload that
/// changes ports is a memory write; then the budget check on the way out of every pass. It
/// passes exactly what the classic program for the same watches passes (checked against both
/// interpreters in `ebpf_interp`'s property test, and against the real kernel in
/// `afpacket`'s tests), except frames shorter than 16 bytes, which the key's address load
/// drops: no IP packet is that short, and userspace would drop it as malformed anyway. The
/// read-check-store of a source's budget is not atomic across CPUs, so one source hitting
/// several CPUs at once may get about one extra packet per CPU through.
pub fn prefilter(
    buckets_fd: i32,
    counter_fd: i32,
    control_fd: i32,
) -> Result<Vec<EInsn>, AssembleError> {
    let mut e = Emitter {
        insns: Vec::new(),
        labels: Vec::new(),
    };
    let (check, reject) = (e.label(), e.label());
    let [v4, v6, udp4, tcp4, tcp4_port, udp6, tcp6, tcp6_port, udp_ports, tcp_ports] =
        [(); 10].map(|()| e.label());
    e.raw(MOV64_X, R6, R1, 0, 0);
    // The control value, in r8 until a port has matched (LD_ABS and LD_IND keep r6-r9).
    e.raw(ST_W, R10, 0, -32, 0);
    e.lookup(control_fd, -32, reject);
    e.raw(MOV64_X, R8, R0, 0, 0);
    // r8 = the bank of watched ports in use, chosen once per frame: userspace rewrites the
    // other bank before it flips the index, so this frame's table cannot change under it.
    // The bank's address is computed from the index (no branch): every later load from the
    // bank depends on the index's load by its address, which orders them after it on every
    // CPU (arm64 too), as userspace's release stores order the bank before the flip.
    e.raw(LDX_DW, R1, R8, control::BANK as i16, 0);
    e.raw(AND64_K, R1, 0, 0, 1);
    e.raw(MUL64_K, R1, 0, 0, control::bank::SIZE as i32);
    e.raw(ADD64_K, R8, 0, 0, control::BANKS as i32);
    e.raw(ADD64_X, R8, R1, 0, 0);
    e.raw(MOV64_K, R9, 0, 0, ACCEPT);
    // IPv4 or IPv6 (`skb->protocol`, big-endian).
    e.raw(LDX_W, R0, R6, SKB_PROTOCOL, 0);
    e.raw(TO_BE, R0, 0, 0, 16);
    e.jump(JEQ_K, R0, 0, 0x0800, v4);
    e.jump(JEQ_K, R0, 0, 0x86dd, v6);
    e.jump(JA, 0, 0, 0, reject);

    e.place(v4);
    e.raw(LD_ABS_H, 0, 0, 0, 6);
    e.jump(JSET_K, R0, 0, 0x3fff, reject); // fragments
    e.raw(LD_ABS_B, 0, 0, 0, 9);
    e.jump(JEQ_K, R0, 0, 17, udp4);
    e.jump(JEQ_K, R0, 0, 6, tcp4);
    e.jump(JA, 0, 0, 0, reject);

    e.place(v6);
    e.raw(LD_ABS_B, 0, 0, 0, 6);
    e.jump(JEQ_K, R0, 0, 17, udp6);
    e.jump(JEQ_K, R0, 0, 6, tcp6);
    // Extension headers before the transport header (hop-by-hop, routing, fragment,
    // destination options) pass whole: userspace walks the chain.
    for next_header in [0, 43, 44, 60] {
        e.jump(JEQ_K, R0, 0, next_header, check);
    }
    e.jump(JA, 0, 0, 0, reject);

    // r7 = the IPv4 header's length.
    let header_length = |e: &mut Emitter| {
        e.raw(LD_ABS_B, 0, 0, 0, 0);
        e.raw(MOV64_X, R7, R0, 0, 0);
        e.raw(AND64_K, R7, 0, 0, 0xf);
        e.raw(LSH64_K, R7, 0, 0, 2);
    };
    // With SYN-only on, a segment other than SYN-without-ACK is rejected; `flags` loads
    // the TCP flags byte into r0.
    let syn_only = |e: &mut Emitter, flags: &dyn Fn(&mut Emitter), then: usize| {
        e.raw(LDX_DW, R1, R8, control::bank::SYN_ONLY as i16, 0);
        e.jump(JEQ_K, R1, 0, 0, then);
        flags(e);
        e.raw(AND32_K, R0, 0, 0, 0x12);
        e.jump(JEQ_K, R0, 0, 0x02, then);
        e.jump(JA, 0, 0, 0, reject);
    };

    e.place(udp4);
    header_length(&mut e);
    e.raw(LD_IND_H, 0, R7, 0, 2);
    e.jump(JA, 0, 0, 0, udp_ports);

    e.place(tcp4);
    header_length(&mut e);
    syn_only(&mut e, &|e| e.raw(LD_IND_B, 0, R7, 0, 13), tcp4_port);
    e.place(tcp4_port);
    e.raw(LD_IND_H, 0, R7, 0, 2);
    e.jump(JA, 0, 0, 0, tcp_ports);

    e.place(udp6);
    e.raw(LD_ABS_H, 0, 0, 0, 42);
    e.jump(JA, 0, 0, 0, udp_ports);

    e.place(tcp6);
    syn_only(&mut e, &|e| e.raw(LD_ABS_B, 0, 0, 0, 53), tcp6_port);
    e.place(tcp6_port);
    e.raw(LD_ABS_H, 0, 0, 0, 42);
    e.jump(JA, 0, 0, 0, tcp_ports);

    // r0 = the destination port: passes when one of the ranges in use holds it (r3 = how
    // many are; the walk stops there).
    for (label, base, count) in [
        (udp_ports, control::bank::UDP, control::bank::UDP_COUNT),
        (tcp_ports, control::bank::TCP, control::bank::TCP_COUNT),
    ] {
        e.place(label);
        e.raw(LDX_DW, R3, R8, count as i16, 0);
        for i in 0..control::RANGES {
            let next = e.label();
            let at = (base + 8 * i) as i16;
            e.jump(JEQ_K, R3, 0, i as i32, reject);
            e.raw(LDX_W, R1, R8, at, 0);
            e.jump(JGT_X, R1, R0, 0, next);
            e.raw(LDX_W, R2, R8, at + 4, 0);
            e.jump(JGE_X, R2, R0, 0, check);
            e.place(next);
        }
        e.jump(JA, 0, 0, 0, reject);
    }

    // The budget. Stack: the key (16 bytes at fp-16: the family, then the IPv4 address or
    // the IPv6 /64), a new source's value at fp-24, the counter's key at fp-28, the
    // control's key at fp-32, the cost and slack read from the control at fp-40 and fp-48.
    let (v6_key, lookup, new_source, have, pass, over) = (
        e.label(),
        e.label(),
        e.label(),
        e.label(),
        e.label(),
        e.label(),
    );
    e.place(check);
    // The host's own outgoing frames are never charged (userspace skips them anyway).
    e.raw(LDX_W, R0, R6, SKB_PKT_TYPE, 0);
    e.jump(JEQ_K, R0, 0, PACKET_OUTGOING, pass);
    // Released (no pressure) or no control: every source passes.
    e.raw(ST_W, R10, 0, -32, 0);
    e.lookup(control_fd, -32, pass);
    e.raw(LDX_DW, R1, R0, control::ENGAGED as i16, 0);
    e.jump(JEQ_K, R1, 0, 0, pass);
    e.raw(LDX_DW, R1, R0, control::COST_NS as i16, 0);
    e.raw(STX_DW, R10, R1, -40, 0);
    e.raw(LDX_DW, R1, R0, control::SLACK_NS as i16, 0);
    e.raw(STX_DW, R10, R1, -48, 0);
    e.raw(LDX_W, R0, R6, SKB_PROTOCOL, 0);
    e.raw(TO_BE, R0, 0, 0, 16);
    e.jump(JEQ_K, R0, 0, 0x86dd, v6_key);
    e.raw(LD_ABS_W, 0, 0, 0, 12);
    e.raw(STX_DW, R10, R0, -8, 0);
    e.raw(ST_DW, R10, 0, -16, 4);
    e.jump(JA, 0, 0, 0, lookup);
    e.place(v6_key);
    e.raw(LD_ABS_W, 0, 0, 0, 8);
    e.raw(MOV64_X, R8, R0, 0, 0);
    e.raw(LSH64_K, R8, 0, 0, 32);
    e.raw(LD_ABS_W, 0, 0, 0, 12);
    e.raw(OR64_X, R8, R0, 0, 0);
    e.raw(STX_DW, R10, R8, -8, 0);
    e.raw(ST_DW, R10, 0, -16, 6);
    e.place(lookup);
    e.raw(CALL, 0, 0, 0, HELPER_KTIME_GET_NS);
    e.raw(MOV64_X, R7, R0, 0, 0);
    e.lookup(buckets_fd, -16, new_source);
    // GCRA: tat = max(tat, now); over budget when tat - now > slack; else tat += cost.
    e.raw(LDX_DW, R1, R0, 0, 0);
    e.jump(JGE_X, R1, R7, 0, have);
    e.raw(MOV64_X, R1, R7, 0, 0);
    e.place(have);
    e.raw(MOV64_X, R2, R1, 0, 0);
    e.raw(SUB64_X, R2, R7, 0, 0);
    e.raw(LDX_DW, R3, R10, -48, 0);
    e.jump(JGT_X, R2, R3, 0, over);
    e.raw(LDX_DW, R3, R10, -40, 0);
    e.raw(ADD64_X, R1, R3, 0, 0);
    e.raw(STX_DW, R0, R1, 0, 0);
    e.jump(JA, 0, 0, 0, pass);
    e.place(new_source);
    e.raw(LDX_DW, R3, R10, -40, 0);
    e.raw(MOV64_X, R1, R7, 0, 0);
    e.raw(ADD64_X, R1, R3, 0, 0);
    e.raw(STX_DW, R10, R1, -24, 0);
    e.imm64(R1, PSEUDO_MAP_FD, buckets_fd as u32 as u64);
    e.raw(MOV64_X, R2, R10, 0, 0);
    e.raw(ADD64_K, R2, 0, 0, -16);
    e.raw(MOV64_X, R3, R10, 0, 0);
    e.raw(ADD64_K, R3, 0, 0, -24);
    e.raw(MOV64_K, R4, 0, 0, 0);
    e.raw(CALL, 0, 0, 0, HELPER_MAP_UPDATE);
    e.place(pass);
    e.raw(MOV64_X, R0, R9, 0, 0);
    e.raw(EXIT, 0, 0, 0, 0);
    e.place(over);
    e.raw(ST_W, R10, 0, -28, 0);
    e.lookup(counter_fd, -28, reject);
    e.raw(MOV64_K, R1, 0, 0, 1);
    e.raw(ATOMIC_DW, R0, R1, 0, 0);
    e.place(reject);
    e.raw(MOV64_K, R0, 0, 0, 0);
    e.raw(EXIT, 0, 0, 0, 0);
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::bpf::Watch;
    use crate::net::Proto;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let insns = prefilter(3, 4, 5).unwrap();
        for (at, insn) in insns.iter().enumerate() {
            let class = insn.code & 0x07;
            if class == 0x05 && insn.code != CALL && insn.code != EXIT {
                let to = at as isize + 1 + isize::from(insn.off);
                assert!(
                    (0..insns.len() as isize).contains(&to),
                    "insn {at} jumps to {to}"
                );
            }
        }
        assert_eq!(insns.last().unwrap().code, EXIT);
    }

    /// The bank's address comes from the index by arithmetic alone: no jump between the
    /// index's load and the end of the address, so the bank's loads depend on the index by
    /// address (ordered after it on arm64 too), not by a branch (which arm64 may speculate).
    #[test]
    fn the_bank_is_chosen_by_address_not_by_a_branch() {
        let insns = prefilter(3, 4, 5).unwrap();
        let is_r8 = |i: &EInsn| i.regs & 0x0f == R8;
        let index = insns
            .iter()
            .position(|i| i.code == LDX_DW && i.off == control::BANK as i16)
            .expect("the program loads the bank index");
        let chosen = index
            + insns[index..]
                .iter()
                .position(|i| i.code == ADD64_X && is_r8(i) && i.regs >> 4 == R1)
                .expect("r8 += the index's offset");
        assert!(
            insns[index..chosen]
                .iter()
                .all(|i| i.code & 0x07 != 0x05 && i.code & 0x07 != 0x06),
            "a jump between the index and the bank's address"
        );
        // Nothing reads through r8 before it points at the bank.
        assert!(insns[index + 1..chosen]
            .iter()
            .all(|i| !(i.code & 0x07 == 0x01 && i.regs >> 4 == R8)));
    }

    #[test]
    fn budget_arithmetic() {
        let budget = SourceBudget {
            rate: 100,
            burst: 20,
        };
        assert_eq!(budget.cost_ns(), 10_000_000);
        assert_eq!(budget.slack_ns(), 19 * 10_000_000);
        let one = SourceBudget { rate: 1, burst: 1 };
        assert_eq!(one.slack_ns(), 0);
    }

    #[test]
    fn ports_fill_every_slot_and_collapse_beyond_the_slots() {
        let watch = |proto, low, high| Watch { proto, low, high };
        let ports = Ports::new(
            &[
                watch(Proto::Udp, 62201, 62201),
                watch(Proto::Tcp, 7000, 7005),
                watch(Proto::Tcp, 7006, 7010),
            ],
            true,
        );
        assert_eq!(ports.udp, vec![(62201, 62201)]);
        assert_eq!(ports.tcp, vec![(7000, 7010)]);
        let words = ports.words();
        assert_eq!(words.len(), 4 * control::RANGES);
        use control::bank;
        assert!(words.contains(&(bank::UDP, 62201)));
        assert!(words.contains(&(bank::UDP + 4, 62201)));
        assert!(words.contains(&(bank::UDP + 8, 1)), "unused: (1, 0)");
        assert!(words.contains(&(bank::UDP + 12, 0)));
        assert!(words.contains(&(bank::TCP + 4, 7010)));
        // A rewrite fills the other bank, then flips to it, last.
        for active in [0, 1] {
            let stores = ports.rewrite(active);
            let other = control::bank_start(active ^ 1);
            assert_eq!(stores.last(), Some(&(control::BANK, Word::U64(active ^ 1))));
            assert!(stores[..stores.len() - 1]
                .iter()
                .all(|(at, _)| (other..other + bank::SIZE).contains(at)));
            assert!(stores.contains(&(other + bank::TCP + 4, Word::U32(7010))));
        }
        let many: Vec<Watch> = (0..=control::RANGES as u16)
            .map(|i| watch(Proto::Udp, 1000 + 10 * i, 1000 + 10 * i))
            .collect();
        let ports = Ports::new(&many, false);
        assert_eq!(ports.udp, vec![(1000, 1000 + 10 * control::RANGES as u16)]);
        assert!(ports.tcp.is_empty());
    }
}
