//! The kernel prefilter: a classic BPF program, attached to the capture socket, that passes
//! only IPv4/IPv6 UDP and TCP packets to watched port ranges (TCP optionally only SYN-without-
//! ACK) and drops everything else in the kernel. IPv6 packets with extension headers pass
//! whole: userspace walks the chain. Userspace re-parses whatever it passes.
//!
//! The socket is `SOCK_DGRAM`, so offsets count from the IP header and the ethertype comes
//! from the `skb->protocol` ancillary load. A small interpreter lets the unit tests run the
//! generated program on real packet bytes without privileges.

use crate::net::Proto;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

pub(crate) const LD_H_ABS: u16 = 0x28;
pub(crate) const LD_B_ABS: u16 = 0x30;
pub(crate) const LD_H_IND: u16 = 0x48;
pub(crate) const LD_B_IND: u16 = 0x50;
pub(crate) const LDX_B_MSH: u16 = 0xb1;
pub(crate) const ALU_AND_K: u16 = 0x54;
pub(crate) const JMP_JEQ_K: u16 = 0x15;
pub(crate) const JMP_JGE_K: u16 = 0x35;
pub(crate) const JMP_JGT_K: u16 = 0x25;
pub(crate) const JMP_JSET_K: u16 = 0x45;
pub(crate) const RET_K: u16 = 0x06;
pub(crate) const SKF_AD_PROTOCOL: u32 = (-0x1000i32) as u32;

/// A port range to pass for one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    pub proto: Proto,
    pub low: u16,
    pub high: u16,
}

/// Why a program could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BpfError {
    #[error("too many port ranges for one filter")]
    TooLarge,
}

enum Target {
    Next,
    Accept,
    Reject,
    Label(usize),
}

struct Asm {
    insns: Vec<(u16, Target, Target, u32)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn place(&mut self, label: usize) {
        self.labels[label] = Some(self.insns.len());
    }
    fn op(&mut self, code: u16, k: u32) {
        self.insns.push((code, Target::Next, Target::Next, k));
    }
    fn jump(&mut self, code: u16, k: u32, jt: Target, jf: Target) {
        self.insns.push((code, jt, jf, k));
    }
    fn finish(self) -> Result<Vec<Insn>, BpfError> {
        let accept = self.insns.len();
        let reject = accept + 1;
        let mut out = Vec::with_capacity(self.insns.len() + 2);
        for (i, (code, jt, jf, k)) in self.insns.iter().enumerate() {
            let resolve = |t: &Target| -> Result<u8, BpfError> {
                let to = match t {
                    Target::Next => i + 1,
                    Target::Accept => accept,
                    Target::Reject => reject,
                    Target::Label(l) => self.labels[*l].ok_or(BpfError::TooLarge)?,
                };
                u8::try_from(to - i - 1).map_err(|_| BpfError::TooLarge)
            };
            out.push(Insn {
                code: *code,
                jt: resolve(jt)?,
                jf: resolve(jf)?,
                k: *k,
            });
        }
        out.push(Insn {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: 0x0004_0000,
        });
        out.push(Insn {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: 0,
        });
        Ok(out)
    }
}

/// Merges overlapping or adjacent ranges per protocol.
pub(crate) fn merge(watches: &[Watch], proto: Proto) -> Vec<(u16, u16)> {
    let mut ranges: Vec<(u16, u16)> = watches
        .iter()
        .filter(|w| w.proto == proto)
        .map(|w| (w.low, w.high))
        .collect();
    ranges.sort();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Builds the program. `syn_only` limits TCP to SYN-without-ACK segments.
pub fn program(watches: &[Watch], syn_only: bool) -> Result<Vec<Insn>, BpfError> {
    let mut a = Asm {
        insns: Vec::new(),
        labels: Vec::new(),
    };
    let (v4, v6) = (a.label(), a.label());
    let (udp4, tcp4, udp6, tcp6) = (a.label(), a.label(), a.label(), a.label());
    a.op(LD_H_ABS, SKF_AD_PROTOCOL);
    a.jump(JMP_JEQ_K, 0x0800, Target::Label(v4), Target::Next);
    a.jump(JMP_JEQ_K, 0x86dd, Target::Label(v6), Target::Reject);

    a.place(v4);
    a.op(LD_H_ABS, 6);
    a.jump(JMP_JSET_K, 0x3fff, Target::Reject, Target::Next); // fragments
    a.op(LD_B_ABS, 9);
    a.jump(JMP_JEQ_K, 17, Target::Label(udp4), Target::Next);
    a.jump(JMP_JEQ_K, 6, Target::Label(tcp4), Target::Reject);

    a.place(v6);
    a.op(LD_B_ABS, 6);
    a.jump(JMP_JEQ_K, 17, Target::Label(udp6), Target::Next);
    a.jump(JMP_JEQ_K, 6, Target::Label(tcp6), Target::Next);
    // Extension headers before the transport header (hop-by-hop, routing, fragment,
    // destination options): classic BPF cannot walk the chain, so userspace does.
    a.jump(JMP_JEQ_K, 0, Target::Accept, Target::Next);
    a.jump(JMP_JEQ_K, 43, Target::Accept, Target::Next);
    a.jump(JMP_JEQ_K, 44, Target::Accept, Target::Next);
    a.jump(JMP_JEQ_K, 60, Target::Accept, Target::Reject);

    let udp = merge(watches, Proto::Udp);
    let tcp = merge(watches, Proto::Tcp);
    let ranges = |a: &mut Asm, list: &[(u16, u16)]| {
        for (lo, hi) in list {
            let next = a.label();
            a.jump(JMP_JGE_K, u32::from(*lo), Target::Next, Target::Label(next));
            a.jump(
                JMP_JGT_K,
                u32::from(*hi),
                Target::Label(next),
                Target::Accept,
            );
            a.place(next);
        }
        a.jump(JMP_JEQ_K, 0, Target::Reject, Target::Reject);
    };

    a.place(udp4);
    a.op(LDX_B_MSH, 0);
    a.op(LD_H_IND, 2);
    ranges(&mut a, &udp);

    a.place(tcp4);
    a.op(LDX_B_MSH, 0);
    if syn_only {
        a.op(LD_B_IND, 13);
        a.op(ALU_AND_K, 0x12);
        a.jump(JMP_JEQ_K, 0x02, Target::Next, Target::Reject);
    }
    a.op(LD_H_IND, 2);
    ranges(&mut a, &tcp);

    a.place(udp6);
    a.op(LD_H_ABS, 42);
    ranges(&mut a, &udp);

    a.place(tcp6);
    if syn_only {
        a.op(LD_B_ABS, 53);
        a.op(ALU_AND_K, 0x12);
        a.jump(JMP_JEQ_K, 0x02, Target::Next, Target::Reject);
    }
    a.op(LD_H_ABS, 42);
    ranges(&mut a, &tcp);
    a.finish()
}

/// Runs a program on `packet` (network header first) with `protocol` as `skb->protocol`.
/// Returns the accepted length (0 = dropped). Mirrors the kernel for the opcodes used above.
pub fn run(program: &[Insn], protocol: u16, packet: &[u8]) -> u32 {
    let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
    let load = |at: usize, n: usize| -> Option<u32> {
        let bytes = packet.get(at..at + n)?;
        Some(bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
    };
    for _ in 0..4096 {
        let Some(insn) = program.get(pc) else {
            return 0;
        };
        pc += 1;
        let k = insn.k as usize;
        match insn.code {
            LD_H_ABS if insn.k == SKF_AD_PROTOCOL => a = u32::from(protocol),
            LD_H_ABS => match load(k, 2) {
                Some(v) => a = v,
                None => return 0,
            },
            LD_B_ABS => match load(k, 1) {
                Some(v) => a = v,
                None => return 0,
            },
            LD_H_IND => match load(x as usize + k, 2) {
                Some(v) => a = v,
                None => return 0,
            },
            LD_B_IND => match load(x as usize + k, 1) {
                Some(v) => a = v,
                None => return 0,
            },
            LDX_B_MSH => match load(k, 1) {
                Some(v) => x = (v & 0xf) * 4,
                None => return 0,
            },
            ALU_AND_K => a &= insn.k,
            RET_K => return insn.k,
            JMP_JEQ_K | JMP_JGE_K | JMP_JGT_K | JMP_JSET_K => {
                let taken = match insn.code {
                    JMP_JEQ_K => a == insn.k,
                    JMP_JGE_K => a >= insn.k,
                    JMP_JGT_K => a > insn.k,
                    _ => a & insn.k != 0,
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            _ => return 0,
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::frame::build;
    use std::net::IpAddr;

    fn v4() -> (IpAddr, IpAddr) {
        (
            "198.51.100.7".parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
        )
    }
    fn v6() -> (IpAddr, IpAddr) {
        (
            "2001:db8::7".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        )
    }

    #[test]
    fn passes_only_watched_ports_and_syns() {
        let watches = [
            Watch {
                proto: Proto::Udp,
                low: 62201,
                high: 62201,
            },
            Watch {
                proto: Proto::Tcp,
                low: 7000,
                high: 7000,
            },
            Watch {
                proto: Proto::Udp,
                low: 8000,
                high: 8000,
            },
            Watch {
                proto: Proto::Tcp,
                low: 20000,
                high: 29999,
            },
        ];
        let prog = program(&watches, true).unwrap();
        for ((s, d), eth) in [(v4(), 0x0800u16), (v6(), 0x86dd)] {
            assert!(run(&prog, eth, &build::udp(s, d, 1, 62201, b"x")) > 0);
            assert_eq!(run(&prog, eth, &build::udp(s, d, 1, 62202, b"x")), 0);
            assert!(run(&prog, eth, &build::udp(s, d, 1, 8000, b"")) > 0);
            assert!(run(&prog, eth, &build::tcp(s, d, 1, 7000, 0x02)) > 0);
            assert_eq!(
                run(&prog, eth, &build::tcp(s, d, 1, 7000, 0x12)),
                0,
                "SYN-ACK"
            );
            assert_eq!(run(&prog, eth, &build::tcp(s, d, 1, 7000, 0x10)), 0, "ACK");
            assert_eq!(
                run(&prog, eth, &build::tcp(s, d, 1, 62201, 0x02)),
                0,
                "wrong proto"
            );
            assert!(run(&prog, eth, &build::tcp(s, d, 1, 25000, 0x02)) > 0);
            assert_eq!(run(&prog, eth, &build::tcp(s, d, 1, 30000, 0x02)), 0);
            assert_eq!(
                run(&prog, eth, &build::udp(s, d, 1, 7000, b"")),
                0,
                "tcp port over udp"
            );
        }
        assert_eq!(run(&prog, 0x0806, &[0u8; 40]), 0, "ARP");
        let (s6, d6) = v6();
        let plain = build::udp(s6, d6, 1, 62201, b"x");
        for kind in [0u8, 43, 44, 60] {
            let ext = build::with_extension(&plain, kind, &[0; 6]);
            assert!(
                run(&prog, 0x86dd, &ext) > 0,
                "extension header {kind} passes"
            );
        }
        let mut icmp6 = plain.clone();
        icmp6[6] = 58;
        assert_eq!(run(&prog, 0x86dd, &icmp6), 0, "ICMPv6");
        let (s, d) = v4();
        let mut frag = build::udp(s, d, 1, 62201, b"x");
        frag[7] = 5;
        assert_eq!(run(&prog, 0x0800, &frag), 0, "non-first fragment");
        let any_tcp = program(&watches, false).unwrap();
        assert!(run(&any_tcp, 0x0800, &build::tcp(s, d, 1, 7000, 0x01)) > 0);
    }

    #[test]
    fn ranges_merge() {
        let w = |low, high| Watch {
            proto: Proto::Tcp,
            low,
            high,
        };
        assert_eq!(
            merge(&[w(5, 9), w(1, 3), w(4, 4), w(20, 20)], Proto::Tcp),
            vec![(1, 9), (20, 20)]
        );
        let many: Vec<Watch> = (0..200).map(|i| w(i * 3, i * 3)).collect();
        assert_eq!(program(&many, true).unwrap_err(), BpfError::TooLarge);
    }
}
