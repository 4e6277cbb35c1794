//! A model of the kernel running the eBPF prefilter, so the unit tests can prove the
//! program of [`ebpf`](super::ebpf) against the classic program of [`bpf`](super::bpf)
//! on any packet, without privileges or a kernel.
//!
//! It runs exactly the eBPF subset `prefilter` emits and refuses anything else: LD_ABS and
//! LD_IND (big-endian loads from the network header; out of bounds ends the program with 0,
//! as in the kernel), the `__sk_buff.protocol` load, the byte swap, the ALU ops, LD_IMM64
//! (with map references), stack and map-value loads and stores, the conditional jumps, the
//! three helpers (map lookup, map update, ktime) and the atomic add. Registers are typed the
//! way the verifier types them (uninitialised, scalar, context, stack pointer, map, map
//! value): reading a register a call or LD_ABS clobbered, reading uninitialised stack, or
//! using a pointer as a number is a fault, not a value. Opcodes are decoded from the eBPF
//! encoding itself, not from the constants of the assembler, so a wrong constant there
//! shows up here. The two maps live in memory and the clock is a field the test sets.

use std::collections::HashMap;

use super::ebpf::{EInsn, Word};

/// Instructions one run may execute before the model gives up (the program has no loops).
const MAX_STEPS: usize = 10_000;
/// The eBPF stack, in bytes below the frame pointer.
const STACK: usize = 512;
/// `offsetof(struct __sk_buff, protocol)`.
const SKB_PROTOCOL: i16 = 16;
/// `offsetof(struct __sk_buff, pkt_type)`.
const SKB_PKT_TYPE: i16 = 4;
/// Key and value sizes of the two maps, as `Limiter::load` creates them.
const BUCKET_KEY: usize = 16;
const COUNTER_KEY: usize = 4;

/// Which of the three maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Map {
    Buckets,
    Counter,
    Control,
}

/// What a register holds, typed as the verifier types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    Uninit,
    Scalar(u64),
    /// The `__sk_buff` (r1 at entry).
    Context,
    /// The frame pointer plus an offset.
    Stack(i64),
    /// A map, from LD_IMM64 with src = 1 (`BPF_PSEUDO_MAP_FD`).
    MapRef(Map),
    /// A (non-null) pointer to the value of a map entry.
    Bucket([u8; BUCKET_KEY]),
    CounterSlot,
    /// A pointer into the control map's one value (`ebpf::control`: engaged, cost, slack,
    /// the bank index, two banks of ports), plus a constant offset.
    ControlSlot(i64),
}

/// The kernel side: the two maps, the clock, and the fds the program refers to them by.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub buckets_fd: i32,
    pub counter_fd: i32,
    pub control_fd: i32,
    /// The control map's value as userspace writes it (little-endian fields).
    pub control: Vec<u8>,
    /// `__sk_buff.pkt_type` of the frames run (`PACKET_HOST` = 0 unless a test says).
    pub pkt_type: u32,
    /// The LRU hash map (no eviction modelled: the tests stay far below its size).
    pub buckets: HashMap<[u8; BUCKET_KEY], u64>,
    /// The one value of the counter array map.
    pub counter: u64,
    /// What `bpf_ktime_get_ns` returns.
    pub now_ns: u64,
    /// Stores userspace makes while the next run is under way: (step, offset, value), in
    /// order; each is made just before the program executes instruction number `step` of
    /// its run (those left when it exits stay here).
    pub during_next_run: std::collections::VecDeque<(usize, usize, Word)>,
}

type Fault = String;

struct Machine<'a> {
    kernel: &'a mut Kernel,
    regs: [Value; 11],
    stack: [Option<u8>; STACK],
    protocol: u16,
    packet: &'a [u8],
}

/// A load from the packet: the value, or the end of the program (out of bounds).
enum Load {
    Value(u64),
    OutOfBounds,
}

impl Kernel {
    /// Writes a u64 field of the control value, as userspace does.
    pub(crate) fn set_u64(&mut self, at: usize, value: u64) {
        self.control[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// Writes a u32 field of the control value.
    pub(crate) fn set_u32(&mut self, at: usize, value: u32) {
        self.control[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// A store of userspace into the control value.
    pub(crate) fn store(&mut self, at: usize, word: Word) {
        match word {
            Word::U32(value) => self.set_u32(at, value),
            Word::U64(value) => self.set_u64(at, value),
        }
    }

    /// The stores `Limiter::set_ports` makes, in its order.
    pub(crate) fn port_stores(&self, ports: &crate::capture::ebpf::Ports) -> Vec<(usize, Word)> {
        let at = crate::capture::ebpf::control::BANK;
        ports.rewrite(from_memory(&self.control[at..at + 8]))
    }

    /// What `Limiter::set_ports` writes.
    pub(crate) fn set_ports(&mut self, ports: &crate::capture::ebpf::Ports) {
        for (at, word) in self.port_stores(ports) {
            self.store(at, word);
        }
    }

    pub(crate) fn new(buckets_fd: i32, counter_fd: i32, control_fd: i32, now_ns: u64) -> Self {
        Self {
            buckets_fd,
            counter_fd,
            control_fd,
            control: vec![0; crate::capture::ebpf::control::SIZE as usize],
            pkt_type: 0,
            buckets: HashMap::new(),
            counter: 0,
            now_ns,
            during_next_run: std::collections::VecDeque::new(),
        }
    }

    /// Runs `program` on `packet` (network header first) with `protocol` as
    /// `skb->protocol`: the length to accept (0 = drop), or why the model refused it.
    pub(crate) fn run(
        &mut self,
        program: &[EInsn],
        protocol: u16,
        packet: &[u8],
    ) -> Result<u32, Fault> {
        let mut regs = [Value::Uninit; 11];
        regs[1] = Value::Context;
        regs[10] = Value::Stack(0);
        let mut machine = Machine {
            kernel: self,
            regs,
            stack: [None; STACK],
            protocol,
            packet,
        };
        machine.run(program)
    }
}

impl Machine<'_> {
    fn run(&mut self, program: &[EInsn]) -> Result<u32, Fault> {
        // The second halves of LD_IMM64 are not instructions: no jump may land there.
        let mut second_halves = vec![false; program.len()];
        let mut at = 0;
        while at < program.len() {
            if program[at].fields().0 == 0x18 {
                *second_halves.get_mut(at + 1).ok_or("LD_IMM64 at the end")? = true;
                at += 2;
            } else {
                at += 1;
            }
        }
        let mut pc = 0usize;
        for step in 0..MAX_STEPS {
            while let Some(&(_, at, word)) = self
                .kernel
                .during_next_run
                .front()
                .filter(|(when, _, _)| *when <= step)
            {
                self.kernel.store(at, word);
                self.kernel.during_next_run.pop_front();
            }
            let insn = program.get(pc).ok_or(format!("pc {pc} left the program"))?;
            if second_halves[pc] {
                return Err(format!("pc {pc} is the second half of LD_IMM64"));
            }
            let (code, regs, off, imm) = insn.fields();
            let (dst, src) = (usize::from(regs & 0x0f), usize::from(regs >> 4));
            if dst > 10 || src > 10 {
                return Err(format!("insn {pc}: register out of range"));
            }
            let fault = |what: &str| format!("insn {pc} ({code:#04x}): {what}");
            let class = code & 0x07;
            let mut next = pc + 1;
            match class {
                0x00 => match (code & 0xe0, code & 0x18) {
                    (0x00, 0x18) => {
                        let high = program
                            .get(pc + 1)
                            .ok_or_else(|| fault("LD_IMM64 without its second half"))?;
                        let (hcode, hregs, hoff, himm) = high.fields();
                        if (hcode, hregs, hoff) != (0, 0, 0) || dst == 10 || off != 0 {
                            return Err(fault("malformed LD_IMM64"));
                        }
                        let value = u64::from(imm as u32) | (u64::from(himm as u32) << 32);
                        self.regs[dst] = match src {
                            0 => Value::Scalar(value),
                            1 if value == self.kernel.buckets_fd as u32 as u64 => {
                                Value::MapRef(Map::Buckets)
                            }
                            1 if value == self.kernel.counter_fd as u32 as u64 => {
                                Value::MapRef(Map::Counter)
                            }
                            1 if value == self.kernel.control_fd as u32 as u64 => {
                                Value::MapRef(Map::Control)
                            }
                            _ => return Err(fault("LD_IMM64 of an unknown map or kind")),
                        };
                        next = pc + 2;
                    }
                    (mode @ (0x20 | 0x40), size) => {
                        if dst != 0 || off != 0 || (mode == 0x20 && src != 0) {
                            return Err(fault("LD_ABS/LD_IND uses reserved fields"));
                        }
                        if self.regs[6] != Value::Context {
                            return Err(fault("LD_ABS/LD_IND needs the skb in r6"));
                        }
                        let width = match size {
                            0x00 => 4,
                            0x08 => 2,
                            0x10 => 1,
                            _ => return Err(fault("LD_ABS/LD_IND of 8 bytes")),
                        };
                        // The kernel computes the offset in 32 bits (src + imm) and treats
                        // negative ones as ancillary loads, which the prefilter never emits.
                        let offset = if mode == 0x20 {
                            imm
                        } else {
                            let x = self.scalar(src).map_err(|e| fault(&e))?;
                            (x as u32).wrapping_add(imm as u32) as i32
                        };
                        let offset =
                            usize::try_from(offset).map_err(|_| fault("negative offset"))?;
                        let value = match self.load_packet(offset, width) {
                            Load::Value(v) => v,
                            Load::OutOfBounds => return Ok(0),
                        };
                        self.regs[0] = Value::Scalar(value);
                        self.clobber_arguments();
                    }
                    _ => return Err(fault("LD mode")),
                },
                0x01 => {
                    if code & 0xe0 != 0x60 || dst == 10 {
                        return Err(fault("LDX mode"));
                    }
                    let width = width_of(code);
                    self.regs[dst] = match self.regs[src] {
                        Value::Context if off == SKB_PROTOCOL && width == 4 => {
                            // `__sk_buff.protocol` is `skb->protocol` (big-endian in
                            // memory) widened to 32 bits: the host reads those two bytes.
                            let raw = u16::from_ne_bytes(self.protocol.to_be_bytes());
                            Value::Scalar(u64::from(raw))
                        }
                        Value::Context if off == SKB_PKT_TYPE && width == 4 => {
                            Value::Scalar(u64::from(self.kernel.pkt_type))
                        }
                        Value::Context => return Err(fault("context field not modelled")),
                        Value::Stack(base) => {
                            Value::Scalar(self.read_stack(base + i64::from(off), width)?)
                        }
                        Value::Bucket(key) if off == 0 && width == 8 => Value::Scalar(
                            *self
                                .kernel
                                .buckets
                                .get(&key)
                                .ok_or_else(|| fault("bucket vanished"))?,
                        ),
                        Value::CounterSlot if off == 0 && width == 8 => {
                            Value::Scalar(self.kernel.counter)
                        }
                        Value::ControlSlot(base)
                            if base + i64::from(off) >= 0
                                && (width == 8 || width == 4)
                                && (base + i64::from(off)) as usize % width == 0
                                && (base + i64::from(off)) as usize + width
                                    <= self.kernel.control.len() =>
                        {
                            let at = (base + i64::from(off)) as usize;
                            Value::Scalar(from_memory(&self.kernel.control[at..at + width]))
                        }
                        other => return Err(fault(&format!("load through {other:?}"))),
                    };
                }
                0x02 | 0x03 => {
                    let width = width_of(code);
                    match code & 0xe0 {
                        0x60 => {
                            let value = if class == 0x02 {
                                imm as i64 as u64
                            } else {
                                self.scalar(src).map_err(|e| fault(&e))?
                            };
                            self.store(dst, off, width, value).map_err(|e| fault(&e))?;
                        }
                        0xc0 if class == 0x03 && width == 8 && imm == 0 && off == 0 => {
                            // BPF_ATOMIC | BPF_ADD without BPF_FETCH.
                            let add = self.scalar(src).map_err(|e| fault(&e))?;
                            match self.regs[dst] {
                                Value::CounterSlot => {
                                    self.kernel.counter = self.kernel.counter.wrapping_add(add);
                                }
                                Value::Bucket(key) => {
                                    let v = self
                                        .kernel
                                        .buckets
                                        .get_mut(&key)
                                        .ok_or_else(|| fault("bucket vanished"))?;
                                    *v = v.wrapping_add(add);
                                }
                                other => return Err(fault(&format!("atomic add to {other:?}"))),
                            }
                        }
                        _ => return Err(fault("store mode")),
                    }
                }
                0x04 | 0x07 => self
                    .alu(class == 0x07, code, dst, src, imm)
                    .map_err(|e| fault(&e))?,
                0x05 => match code & 0xf0 {
                    0x00 if code == 0x05 => next = jump(pc, off, program.len())?,
                    0x80 if code == 0x85 && src == 0 && dst == 0 && off == 0 => {
                        self.call(imm).map_err(|e| fault(&e))?;
                    }
                    0x90 if code == 0x95 => {
                        return match self.regs[0] {
                            Value::Scalar(v) => Ok(v as u32),
                            other => Err(fault(&format!("exit with r0 = {other:?}"))),
                        };
                    }
                    op @ (0x10 | 0x20 | 0x30 | 0x40) => {
                        let right = if code & 0x08 == 0 {
                            imm as i64 as u64
                        } else {
                            self.scalar(src).map_err(|e| fault(&e))?
                        };
                        let left = match self.regs[dst] {
                            Value::Scalar(v) => v,
                            // The null check of a map lookup: a map value is never null.
                            Value::Bucket(_) | Value::CounterSlot | Value::ControlSlot(_)
                                if op == 0x10 && code & 0x08 == 0 && imm == 0 =>
                            {
                                u64::MAX
                            }
                            other => return Err(fault(&format!("compare {other:?}"))),
                        };
                        let taken = match op {
                            0x10 => left == right,
                            0x20 => left > right,
                            0x30 => left >= right,
                            _ => left & right != 0,
                        };
                        if taken {
                            next = jump(pc, off, program.len())?;
                        }
                    }
                    _ => return Err(fault("jump op")),
                },
                _ => return Err(fault("instruction class")),
            }
            pc = next;
        }
        Err(format!("no exit within {MAX_STEPS} instructions"))
    }

    fn scalar(&self, reg: usize) -> Result<u64, Fault> {
        match self.regs[reg] {
            Value::Scalar(v) => Ok(v),
            other => Err(format!("r{reg} is {other:?}, not a number")),
        }
    }

    /// Calls and LD_ABS/LD_IND leave r1-r5 unreadable.
    fn clobber_arguments(&mut self) {
        for reg in &mut self.regs[1..=5] {
            *reg = Value::Uninit;
        }
    }

    fn load_packet(&self, offset: usize, width: usize) -> Load {
        match offset
            .checked_add(width)
            .and_then(|end| self.packet.get(offset..end))
        {
            Some(bytes) => {
                Load::Value(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
            }
            None => Load::OutOfBounds,
        }
    }

    fn stack_range(at: i64, width: usize) -> Result<std::ops::Range<usize>, Fault> {
        let start = i64::try_from(STACK).map_err(|e| e.to_string())? + at;
        let start = usize::try_from(start).map_err(|_| format!("stack access at fp{at}"))?;
        if start + width > STACK {
            return Err(format!("stack access at fp{at} of {width} bytes"));
        }
        Ok(start..start + width)
    }

    fn read_stack(&self, at: i64, width: usize) -> Result<u64, Fault> {
        Ok(from_memory(&self.stack_bytes(at, width)?))
    }

    fn stack_bytes(&self, at: i64, width: usize) -> Result<Vec<u8>, Fault> {
        self.stack[Self::stack_range(at, width)?]
            .iter()
            .map(|b| b.ok_or_else(|| format!("read of uninitialised stack at fp{at}")))
            .collect()
    }

    fn store(&mut self, dst: usize, off: i16, width: usize, value: u64) -> Result<(), Fault> {
        match self.regs[dst] {
            Value::Stack(base) => {
                let range = Self::stack_range(base + i64::from(off), width)?;
                let bytes = to_memory(value, width);
                for (slot, b) in self.stack[range].iter_mut().zip(&bytes) {
                    *slot = Some(*b);
                }
                Ok(())
            }
            Value::Bucket(key) if off == 0 && width == 8 => {
                let slot = self.kernel.buckets.get_mut(&key).ok_or("bucket vanished")?;
                *slot = value;
                Ok(())
            }
            Value::CounterSlot if off == 0 && width == 8 => {
                self.kernel.counter = value;
                Ok(())
            }
            other => Err(format!("store through r{dst} = {other:?}")),
        }
    }

    fn alu(&mut self, wide: bool, code: u8, dst: usize, src: usize, imm: i32) -> Result<(), Fault> {
        if dst == 10 {
            return Err("r10 is read-only".into());
        }
        let op = code & 0xf0;
        let from_register = code & 0x08 != 0;
        if op == 0xd0 {
            // BPF_END: only in the 32-bit class; the source bit picks to-big-endian.
            if wide {
                return Err("BPF_END in ALU64".into());
            }
            let v = self.scalar(dst)?;
            let swapped = match (imm, from_register) {
                (16, true) => u64::from((v as u16).to_be()),
                (32, true) => u64::from((v as u32).to_be()),
                (64, true) => v.to_be(),
                (16, false) => u64::from((v as u16).to_le()),
                (32, false) => u64::from((v as u32).to_le()),
                (64, false) => v.to_le(),
                _ => return Err(format!("BPF_END width {imm}")),
            };
            self.regs[dst] = Value::Scalar(swapped);
            return Ok(());
        }
        if op == 0xb0 && from_register && wide {
            // MOV64_X copies pointers too.
            if self.regs[src] == Value::Uninit {
                return Err(format!("mov from uninitialised r{src}"));
            }
            self.regs[dst] = self.regs[src];
            return Ok(());
        }
        let operand = if from_register {
            self.scalar(src)?
        } else if wide {
            imm as i64 as u64
        } else {
            u64::from(imm as u32)
        };
        if op == 0xb0 {
            self.regs[dst] = Value::Scalar(if wide { operand } else { operand & 0xffff_ffff });
            return Ok(());
        }
        // Pointer arithmetic: a constant added to a stack pointer; a constant or a scalar
        // register added to a control value pointer.
        if let Value::Stack(base) = self.regs[dst] {
            if op == 0x00 && wide && !from_register {
                self.regs[dst] = Value::Stack(base + i64::from(imm));
                return Ok(());
            }
            return Err(format!("arithmetic {op:#x} on a stack pointer"));
        }
        if let Value::ControlSlot(base) = self.regs[dst] {
            // A constant, or a scalar register. The kernel's verifier takes a register only
            // with bounds it can prove; this interpreter sees values, not bounds, so that the
            // program's own pointer arithmetic passes the verifier is checked by loading it
            // (the root tests: `program::tests`). Each load through the pointer is checked
            // against the value's size here.
            if op == 0x00 && wide {
                let by = if from_register {
                    i64::try_from(operand).map_err(|_| "map value offset out of range")?
                } else {
                    i64::from(imm)
                };
                let at = base
                    .checked_add(by)
                    .ok_or("map value offset out of range")?;
                self.regs[dst] = Value::ControlSlot(at);
                return Ok(());
            }
            return Err(format!("arithmetic {op:#x} on a map value pointer"));
        }
        let left = self.scalar(dst)?;
        let bits = if wide { 64 } else { 32 };
        let result = match op {
            0x00 => left.wrapping_add(operand),
            0x10 => left.wrapping_sub(operand),
            0x20 => left.wrapping_mul(operand),
            0x40 => left | operand,
            0x50 => left & operand,
            0xa0 => left ^ operand,
            0x60 | 0x70 => {
                if operand >= bits {
                    return Err(format!("shift by {operand}"));
                }
                let (l, s) = if wide {
                    (left, operand)
                } else {
                    (left & 0xffff_ffff, operand)
                };
                if op == 0x60 {
                    l << s
                } else {
                    l >> s
                }
            }
            _ => return Err(format!("ALU op {op:#x}")),
        };
        self.regs[dst] = Value::Scalar(if wide { result } else { result & 0xffff_ffff });
        Ok(())
    }

    fn key(&self, map: Map, reg: usize) -> Result<Vec<u8>, Fault> {
        let Value::Stack(at) = self.regs[reg] else {
            return Err(format!("map key in r{reg} is not on the stack"));
        };
        let size = match map {
            Map::Buckets => BUCKET_KEY,
            Map::Counter | Map::Control => COUNTER_KEY,
        };
        self.stack_bytes(at, size)
    }

    fn call(&mut self, helper: i32) -> Result<(), Fault> {
        let result = match helper {
            // bpf_map_lookup_elem(map, key)
            1 => {
                let Value::MapRef(map) = self.regs[1] else {
                    return Err("lookup: r1 is not a map".into());
                };
                let key = self.key(map, 2)?;
                match map {
                    Map::Buckets => {
                        let key: [u8; BUCKET_KEY] = key.try_into().map_err(|_| "key size")?;
                        if self.kernel.buckets.contains_key(&key) {
                            Value::Bucket(key)
                        } else {
                            Value::Scalar(0)
                        }
                    }
                    Map::Counter | Map::Control => {
                        let index = u32::from_ne_bytes(key.try_into().map_err(|_| "key size")?);
                        match (index, map) {
                            (0, Map::Counter) => Value::CounterSlot,
                            (0, _) => Value::ControlSlot(0),
                            _ => Value::Scalar(0),
                        }
                    }
                }
            }
            // bpf_map_update_elem(map, key, value, flags)
            2 => {
                if self.regs[1] != Value::MapRef(Map::Buckets) {
                    return Err("update: r1 is not the buckets map".into());
                }
                let key: [u8; BUCKET_KEY] = self
                    .key(Map::Buckets, 2)?
                    .try_into()
                    .map_err(|_| "key size")?;
                let Value::Stack(at) = self.regs[3] else {
                    return Err("update: the value in r3 is not on the stack".into());
                };
                let value = self.read_stack(at, 8)?;
                let exists = self.kernel.buckets.contains_key(&key);
                // BPF_ANY, BPF_NOEXIST, BPF_EXIST.
                let ok = match self.scalar(4)? {
                    0 => true,
                    1 => !exists,
                    2 => exists,
                    flags => return Err(format!("update flags {flags}")),
                };
                if ok {
                    self.kernel.buckets.insert(key, value);
                    Value::Scalar(0)
                } else {
                    Value::Scalar((-17i64) as u64) // -EEXIST / -ENOENT alike: an error
                }
            }
            // bpf_ktime_get_ns()
            5 => Value::Scalar(self.kernel.now_ns),
            other => return Err(format!("helper {other} not modelled")),
        };
        self.clobber_arguments();
        self.regs[0] = result;
        Ok(())
    }
}

/// The size of a load or store.
fn width_of(code: u8) -> usize {
    match code & 0x18 {
        0x00 => 4,
        0x08 => 2,
        0x10 => 1,
        _ => 8,
    }
}

/// The `width` low bytes of `value` as the host stores them.
fn to_memory(value: u64, width: usize) -> Vec<u8> {
    let mut bytes = value.to_le_bytes()[..width].to_vec();
    if cfg!(target_endian = "big") {
        bytes.reverse();
    }
    bytes
}

/// A value read from memory the host wrote.
fn from_memory(bytes: &[u8]) -> u64 {
    let mut le = bytes.to_vec();
    if cfg!(target_endian = "big") {
        le.reverse();
    }
    le.iter()
        .rev()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Where a jump at `pc` with offset `off` lands, if inside the program.
fn jump(pc: usize, off: i16, len: usize) -> Result<usize, Fault> {
    let to = pc as i64 + 1 + i64::from(off);
    usize::try_from(to)
        .ok()
        .filter(|to| *to < len)
        .ok_or_else(|| format!("insn {pc} jumps to {to}, outside the program"))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;
    use crate::capture::bpf::{self, Watch};
    use crate::capture::ebpf::{control, prefilter, Ports, SourceBudget};
    use crate::capture::frame::build;
    use crate::net::Proto;

    const BUCKETS_FD: i32 = 7;
    const COUNTER_FD: i32 = 9;
    const CONTROL_FD: i32 = 11;

    /// The kernel side with `ports` and `budget` written to the control map by userspace,
    /// and the budget engaged (or not).
    fn kernel_for(ports: &Ports, budget: SourceBudget, engaged: bool, now: u64) -> Kernel {
        let mut kernel = Kernel::new(BUCKETS_FD, COUNTER_FD, CONTROL_FD, now);
        kernel.set_ports(ports);
        kernel.set_u64(control::ENGAGED, u64::from(engaged));
        kernel.set_u64(control::COST_NS, budget.cost_ns());
        kernel.set_u64(control::SLACK_NS, budget.slack_ns());
        kernel
    }

    /// [`kernel_for`] the SPA port alone, SYN-only.
    fn kernel_with(budget: SourceBudget, engaged: bool, now: u64) -> Kernel {
        let watch = Watch {
            proto: Proto::Udp,
            low: SPA_PORT,
            high: SPA_PORT,
        };
        kernel_for(&Ports::new(&[watch], true), budget, engaged, now)
    }
    const SPA_PORT: u16 = 62201;
    /// A budget no test of the classic part comes near.
    const ENDLESS: SourceBudget = SourceBudget {
        rate: 1_000_000,
        burst: 1_000_000,
    };
    /// The shortest packet the budget can key: it loads the source address at 12..16
    /// (IPv4) or the /64 at 8..16 (IPv6).
    const KEYED: usize = 16;

    /// How a structured packet is damaged after it is built.
    #[derive(Debug, Clone)]
    enum Damage {
        None,
        Truncate(Index),
        Flip(Index, u8),
    }

    /// A packet built with the frame builders.
    #[derive(Debug, Clone)]
    struct Shape {
        v6: bool,
        udp: bool,
        source: u128,
        destination: u128,
        sport: u16,
        /// A random port, or (when `near` is set) a bound of a watched range plus `delta`.
        port: u16,
        near: Option<(Index, i8)>,
        flags: u8,
        payload: Vec<u8>,
        extension: Option<(u8, Vec<u8>)>,
        damage: Damage,
    }

    fn address(v6: bool, bits: u128) -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::from(bits))
        } else {
            IpAddr::V4(Ipv4Addr::from(bits as u32))
        }
    }

    impl Shape {
        fn build(&self, watches: &[Watch]) -> Vec<u8> {
            let (s, d) = (
                address(self.v6, self.source),
                address(self.v6, self.destination),
            );
            let bounds: Vec<u16> = watches.iter().flat_map(|w| [w.low, w.high]).collect();
            let port = match self.near {
                Some((at, delta)) => {
                    bounds[at.index(bounds.len())].wrapping_add_signed(delta.into())
                }
                None => self.port,
            };
            let mut packet = if self.udp {
                build::udp(s, d, self.sport, port, &self.payload)
            } else {
                build::tcp(s, d, self.sport, port, self.flags)
            };
            if let (true, Some((kind, body))) = (self.v6, &self.extension) {
                packet = build::with_extension(&packet, *kind, body);
            }
            match &self.damage {
                Damage::None => {}
                Damage::Truncate(at) => packet.truncate(at.index(packet.len())),
                Damage::Flip(at, mask) => {
                    let i = at.index(packet.len());
                    packet[i] ^= *mask;
                }
            }
            packet
        }
    }

    fn shape() -> impl Strategy<Value = Shape> {
        (
            (any::<bool>(), any::<bool>(), any::<u128>(), any::<u128>()),
            (
                any::<u16>(),
                any::<u16>(),
                proptest::option::weighted(0.7, (any::<Index>(), -1i8..=1)),
            ),
            prop_oneof![Just(0x02u8), Just(0x12), Just(0x10), any::<u8>()],
            proptest::collection::vec(any::<u8>(), 0..24),
            proptest::option::of((
                prop_oneof![Just(0u8), Just(43), Just(44), Just(60), any::<u8>()],
                proptest::collection::vec(any::<u8>(), 0..20),
            )),
            prop_oneof![
                2 => Just(Damage::None),
                1 => any::<Index>().prop_map(Damage::Truncate),
                1 => (any::<Index>(), 1u8..=255).prop_map(|(at, mask)| Damage::Flip(at, mask)),
            ],
        )
            .prop_map(
                |(
                    (v6, udp, source, destination),
                    (sport, port, near),
                    flags,
                    payload,
                    extension,
                    damage,
                )| Shape {
                    v6,
                    udp,
                    source,
                    destination,
                    sport,
                    port,
                    near,
                    flags,
                    payload,
                    extension,
                    damage,
                },
            )
    }

    #[derive(Debug, Clone)]
    enum Packet {
        Random(Vec<u8>),
        Built(Shape),
    }

    fn watches() -> impl Strategy<Value = Vec<Watch>> {
        proptest::collection::vec(
            (any::<bool>(), any::<u16>(), any::<u16>()).prop_map(|(udp, a, b)| Watch {
                proto: if udp { Proto::Udp } else { Proto::Tcp },
                low: a.min(b),
                high: a.max(b),
            }),
            1..=6,
        )
    }

    fn other_ethertype() -> impl Strategy<Value = u16> {
        any::<u16>().prop_filter("not IP", |e| *e != 0x0800 && *e != 0x86dd)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// With a budget that never runs out, the eBPF program passes exactly what the
        /// classic program passes, and charges the budget only for what it passes. The one
        /// deliberate difference: a frame the classic program would pass but that is too
        /// short to hold a source address (under 16 bytes; userspace drops anything under
        /// 20) cannot be keyed, and the kernel's out-of-bounds load drops it.
        #[test]
        fn the_prefilter_passes_what_the_classic_program_passes(
            watches in watches(),
            syn_only in any::<bool>(),
            packet in prop_oneof![
                1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Packet::Random),
                3 => shape().prop_map(Packet::Built),
            ],
            other in other_ethertype(),
            now in any::<u64>().prop_map(|t| t >> 2),
        ) {
            let classic = bpf::program(&watches, syn_only).unwrap();
            let insns = prefilter(BUCKETS_FD, COUNTER_FD, CONTROL_FD).unwrap();
            let ports = Ports::new(&watches, syn_only);
            let packet = match packet {
                Packet::Random(bytes) => bytes,
                Packet::Built(shape) => shape.build(&watches),
            };
            for protocol in [0x0800, 0x86dd, other] {
                let expected = match bpf::run(&classic, protocol, &packet) {
                    _ if packet.len() < KEYED => 0,
                    passed => passed,
                };
                let mut kernel = kernel_for(&ports, ENDLESS, true, now);
                let got = kernel.run(&insns, protocol, &packet).map_err(TestCaseError::fail)?;
                prop_assert_eq!(got, expected, "protocol {:#06x}, packet {:02x?}", protocol, packet);
                prop_assert_eq!(kernel.buckets.len(), usize::from(got != 0), "budget charged");
                prop_assert_eq!(kernel.counter, 0);
            }
        }
    }

    /// How many stores a rewrite of the watched ports makes: a bank's SYN-only word and two
    /// counts, its range slots, and the flip.
    const REWRITE_STORES: usize = 3 + 4 * control::RANGES + 1;
    /// Steps of a run a rewrite's stores are spread over (the program runs a few dozen to a
    /// few hundred instructions per frame): stores before the run, during it and after it.
    const REWRITE_SPREAD: usize = 600;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// A rewrite of the watched ports (`Limiter::set_ports`'s stores, in its order) while
        /// a frame is evaluated, its stores falling at any points of the program's run: the
        /// frame gets the verdict of the old table or of the new one (as the classic program
        /// gives them for the old or the new watches), never one of a mix. Once the rewrite
        /// is done, frames get the new table's verdict.
        #[test]
        fn a_frame_during_a_rewrite_sees_the_old_or_the_new_table(
            old in watches(),
            new in watches(),
            (old_syn, new_syn) in (any::<bool>(), any::<bool>()),
            shape in shape(),
            steps in proptest::collection::vec(0..REWRITE_SPREAD, REWRITE_STORES),
            rewrites_before in 0usize..3,
        ) {
            let insns = prefilter(BUCKETS_FD, COUNTER_FD, CONTROL_FD).unwrap();
            let verdict = |watches: &[Watch], syn_only: bool, protocol: u16, packet: &[u8]| {
                match bpf::run(&bpf::program(watches, syn_only).unwrap(), protocol, packet) {
                    _ if packet.len() < KEYED => 0,
                    passed => passed,
                }
            };
            let both: Vec<Watch> = old.iter().chain(&new).copied().collect();
            let packet = shape.build(&both);
            let protocol = if shape.v6 { 0x86dd } else { 0x0800 };
            let (old_ports, new_ports) = (Ports::new(&old, old_syn), Ports::new(&new, new_syn));
            let mut kernel = kernel_for(&old_ports, ENDLESS, true, 1_000_000_000);
            // Either bank may be the one in use when the rewrite starts: each rewrite of the
            // old table flips the bank.
            for _ in 0..rewrites_before {
                kernel.set_ports(&old_ports);
            }
            let stores = kernel.port_stores(&new_ports);
            prop_assert_eq!(stores.len(), REWRITE_STORES);
            let mut steps = steps;
            steps.sort_unstable();
            kernel.during_next_run = steps
                .into_iter()
                .zip(stores)
                .map(|(step, (at, word))| (step, at, word))
                .collect();
            let got = kernel.run(&insns, protocol, &packet).map_err(TestCaseError::fail)?;
            let (before, after) = (
                verdict(&old, old_syn, protocol, &packet),
                verdict(&new, new_syn, protocol, &packet),
            );
            prop_assert!(
                got == before || got == after,
                "got {:#x}, old table {:#x}, new table {:#x}: packet {:02x?}",
                got, before, after, packet
            );
            // The stores left when the frame was done land before the next frame.
            while let Some((_, at, word)) = kernel.during_next_run.pop_front() {
                kernel.store(at, word);
            }
            let next = kernel.run(&insns, protocol, &packet).map_err(TestCaseError::fail)?;
            prop_assert_eq!(next, after);
        }
    }

    /// The accepting length of the classic program (`RET 0x40000`).
    const PASS: u32 = 0x0004_0000;

    fn spa_budget_program() -> Vec<EInsn> {
        prefilter(BUCKETS_FD, COUNTER_FD, CONTROL_FD).unwrap()
    }

    /// Sends `count` SPA-port datagrams from `source` at the kernel's current time: how many
    /// the program passed.
    fn send(
        kernel: &mut Kernel,
        program: &[EInsn],
        source: IpAddr,
        count: u32,
    ) -> Result<u32, TestCaseError> {
        let (destination, protocol): (IpAddr, u16) = match source {
            IpAddr::V4(_) => (Ipv4Addr::new(203, 0, 113, 1).into(), 0x0800),
            IpAddr::V6(_) => ("2001:db8::1".parse().unwrap(), 0x86dd),
        };
        let packet = build::udp(source, destination, 40000, SPA_PORT, b"spa");
        let mut passed = 0;
        for _ in 0..count {
            match kernel
                .run(program, protocol, &packet)
                .map_err(TestCaseError::fail)?
            {
                0 => {}
                PASS => passed += 1,
                other => return Err(TestCaseError::fail(format!("returned {other:#x}"))),
            }
        }
        Ok(passed)
    }

    fn budget() -> impl Strategy<Value = SourceBudget> {
        (1..=crate::config::server::MAX_PACKET_RATE, 1u32..=100)
            .prop_map(|(rate, burst)| SourceBudget { rate, burst })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// N packets at one instant from one source: the burst passes, the rest is dropped
        /// and counted.
        #[test]
        fn a_source_at_one_instant_gets_its_burst_and_the_rest_is_counted(
            budget in budget(),
            n in 0u32..=250,
            v6 in any::<bool>(),
            source in any::<u128>(),
            now in any::<u64>().prop_map(|t| t >> 2),
        ) {
            let program = spa_budget_program();
            let mut kernel = kernel_with(budget, true, now);
            let passed = send(&mut kernel, &program, address(v6, source), n)?;
            prop_assert_eq!(passed, n.min(budget.burst));
            prop_assert_eq!(kernel.counter, u64::from(n - n.min(budget.burst)));
            prop_assert_eq!(kernel.buckets.len(), usize::from(n > 0));
        }

        /// After the burst is spent, k/R seconds earn exactly k packets; a long pause earns
        /// the burst and no more.
        #[test]
        fn time_earns_rate_packets_a_second_up_to_the_burst(
            budget in budget(),
            k in any::<Index>(),
            v6 in any::<bool>(),
            source in any::<u128>(),
            start in any::<u64>().prop_map(|t| t >> 2),
        ) {
            let program = spa_budget_program();
            let (burst, rate) = (budget.burst, u64::from(budget.rate));
            let k = 1 + k.index(burst as usize) as u32;
            let source = address(v6, source);
            let mut kernel = kernel_with(budget, true, start);
            prop_assert_eq!(send(&mut kernel, &program, source, burst + 3)?, burst);
            kernel.now_ns += u64::from(k) * 1_000_000_000 / rate;
            prop_assert_eq!(send(&mut kernel, &program, source, burst + 3)?, k);
            prop_assert_eq!(kernel.counter, u64::from(3 + burst + 3 - k));
            kernel.now_ns += 1_000_000_000 * (2 * u64::from(burst) + 1) / rate + 1_000_000_000;
            prop_assert_eq!(send(&mut kernel, &program, source, burst + 3)?, burst);
        }

        /// Released (spad keeps up), the budget cuts nothing and is not even charged,
        /// whatever the flood: a spoofed source cannot spend anyone's budget then. Engaged
        /// again, every source starts with its whole burst.
        #[test]
        fn released_the_budget_cuts_nothing_and_charges_nothing(
            budget in budget(),
            n in 0u32..=250,
            v6 in any::<bool>(),
            source in any::<u128>(),
            now in any::<u64>().prop_map(|t| t >> 2),
        ) {
            let program = spa_budget_program();
            let mut kernel = kernel_with(budget, false, now);
            prop_assert_eq!(send(&mut kernel, &program, address(v6, source), n)?, n);
            prop_assert_eq!(kernel.counter, 0);
            prop_assert_eq!(kernel.buckets.len(), 0);
            kernel.set_u64(control::ENGAGED, 1);
            let again = send(&mut kernel, &program, address(v6, source), n)?;
            prop_assert_eq!(again, n.min(budget.burst));
        }

        /// The host's own outgoing frames (`PACKET_OUTGOING`) are never charged, engaged or
        /// not.
        #[test]
        fn outgoing_frames_are_never_charged(
            budget in budget(),
            n in 0u32..=250,
            v6 in any::<bool>(),
            source in any::<u128>(),
        ) {
            let program = spa_budget_program();
            let mut kernel = kernel_with(budget, true, 1_000_000_000);
            kernel.pkt_type = 4;
            prop_assert_eq!(send(&mut kernel, &program, address(v6, source), n)?, n);
            prop_assert_eq!(kernel.counter, 0);
            prop_assert_eq!(kernel.buckets.len(), 0);
        }

        /// An IPv4 source and an IPv6 source whose /64 carries the same bits have budgets of
        /// their own, as have two IPv4 sources one bit apart.
        #[test]
        fn ipv4_and_ipv6_sources_do_not_share_a_budget(
            budget in budget(),
            v4 in any::<u32>(),
            low in any::<u64>(),
            bit in 0u32..32,
            v6_first in any::<bool>(),
        ) {
            let program = spa_budget_program();
            let burst = budget.burst;
            let four = IpAddr::V4(Ipv4Addr::from(v4));
            let six = IpAddr::V6(Ipv6Addr::from((u128::from(v4) << 64) | u128::from(low)));
            let (first, second) = if v6_first { (six, four) } else { (four, six) };
            let mut kernel = kernel_with(budget, true, 1_000_000_000);
            prop_assert_eq!(send(&mut kernel, &program, first, burst + 1)?, burst);
            prop_assert_eq!(send(&mut kernel, &program, second, burst + 1)?, burst);
            let neighbour = IpAddr::V4(Ipv4Addr::from(v4 ^ (1 << bit)));
            prop_assert_eq!(send(&mut kernel, &program, neighbour, burst + 1)?, burst);
            prop_assert_eq!(kernel.counter, 3);
            prop_assert_eq!(kernel.buckets.len(), 3);
        }

        /// Two IPv6 sources in one /64 share a budget; a source one bit away in the /64
        /// has its own.
        #[test]
        fn an_ipv6_64_shares_one_budget(
            budget in budget(),
            base in any::<u128>(),
            interface in 1u64..,
            bit in 0u32..64,
        ) {
            let program = spa_budget_program();
            let burst = budget.burst;
            let mut kernel = kernel_with(budget, true, 1_000_000_000);
            let at = |bits: u128| IpAddr::V6(Ipv6Addr::from(bits));
            prop_assert_eq!(send(&mut kernel, &program, at(base), burst + 1)?, burst);
            let same_64 = at(base ^ u128::from(interface));
            prop_assert_eq!(send(&mut kernel, &program, same_64, 2)?, 0);
            let other_64 = at(base ^ (1u128 << (64 + bit)));
            prop_assert_eq!(send(&mut kernel, &program, other_64, burst + 1)?, burst);
            prop_assert_eq!(kernel.counter, 1 + 2 + 1);
            prop_assert_eq!(kernel.buckets.len(), 2);
        }
    }

    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> EInsn {
        EInsn::from_fields(code, dst | (src << 4), off, imm)
    }

    /// The model is as strict as the verifier where the program could go wrong, and
    /// gives up rather than loop: otherwise a passing comparison would prove little.
    #[test]
    fn the_model_refuses_what_the_kernel_would_refuse() {
        let mut kernel = Kernel::new(BUCKETS_FD, COUNTER_FD, CONTROL_FD, 0);
        let run = |kernel: &mut Kernel, program: &[EInsn]| kernel.run(program, 0x0800, &[0x45; 20]);
        let skb = insn(0xbf, 6, 1, 0, 0); // r6 = r1
        let exit = insn(0x95, 0, 0, 0, 0);
        // LD_ABS out of bounds ends the program with 0, even with r0 set to pass.
        let program = [skb, insn(0xb7, 0, 0, 0, 1), insn(0x28, 0, 0, 0, 19), exit];
        assert_eq!(run(&mut kernel, &program), Ok(0));
        let program = [skb, insn(0x30, 0, 0, 0, 19), exit];
        assert_eq!(run(&mut kernel, &program), Ok(0x45));
        // LD_ABS clobbers r1-r5.
        let program = [
            skb,
            insn(0xb7, 2, 0, 0, 1),
            insn(0x30, 0, 0, 0, 0),
            insn(0xbf, 0, 2, 0, 0),
            exit,
        ];
        assert!(run(&mut kernel, &program).is_err());
        // So does a call; r0 is uninitialised at entry; uninitialised stack is unreadable.
        let program = [
            insn(0xb7, 3, 0, 0, 1),
            insn(0x85, 0, 0, 0, 5),
            insn(0xbf, 0, 3, 0, 0),
            exit,
        ];
        assert!(run(&mut kernel, &program).is_err());
        assert!(run(&mut kernel, &[exit]).is_err());
        let program = [insn(0x79, 0, 10, -8, 0), exit];
        assert!(run(&mut kernel, &program).is_err());
        // LD_ABS without the skb in r6; a pointer returned as a length.
        assert!(run(&mut kernel, &[insn(0x30, 0, 0, 0, 0), exit]).is_err());
        assert!(run(&mut kernel, &[insn(0xbf, 0, 10, 0, 0), exit]).is_err());
        // A jump out of the program, a loop, an opcode outside the subset (DIV).
        assert!(run(&mut kernel, &[insn(0x05, 0, 0, 5, 0), exit]).is_err());
        let looped = run(&mut kernel, &[insn(0x05, 0, 0, -1, 0), exit]).unwrap_err();
        assert!(looped.contains("no exit within"), "{looped}");
        let program = [insn(0xb7, 0, 0, 0, 4), insn(0x37, 0, 0, 0, 2), exit];
        assert!(run(&mut kernel, &program).is_err());
        // The protocol load and the swap give the ethertype as a number.
        let program = [insn(0x61, 0, 1, 16, 0), insn(0xdc, 0, 0, 0, 16), exit];
        assert_eq!(run(&mut kernel, &program), Ok(0x0800));
    }
}
