//! Parses the network-layer bytes a capture delivers (IPv4/IPv6 + UDP/TCP) into a [`Frame`].
//! Untrusted input: every length is checked; anything odd is `None`, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::net::Proto;

/// What the daemon needs to know about one captured packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub proto: Proto,
    pub source_port: u16,
    pub port: u16,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// UDP payload (empty for TCP).
    pub payload: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses an IP packet starting at its IP header.
pub fn parse(packet: &[u8]) -> Option<Frame<'_>> {
    match packet.first()? >> 4 {
        4 => parse_v4(packet),
        6 => parse_v6(packet),
        _ => None,
    }
}

fn parse_v4(p: &[u8]) -> Option<Frame<'_>> {
    let header_len = usize::from(p.first()? & 0x0f) * 4;
    let total = usize::from(be16(p, 2)?);
    if header_len < 20 || total < header_len || total > p.len() {
        return None;
    }
    // Fragments other than the first carry no transport header; the first may be incomplete.
    let fragment = be16(p, 6)?;
    if fragment & 0x3fff != 0 {
        return None;
    }
    let source = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
    let destination = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
    transport(p[9], &p[header_len..total], source, destination)
}

fn parse_v6(p: &[u8]) -> Option<Frame<'_>> {
    if p.len() < 40 {
        return None;
    }
    let payload_len = usize::from(be16(p, 4)?);
    if 40 + payload_len > p.len() {
        return None;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&p[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&p[24..40]);
    // Extension headers are not followed: a knock or SPA packet never needs them.
    transport(
        p[6],
        &p[40..40 + payload_len],
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
    )
}

fn transport(next: u8, t: &[u8], source: IpAddr, destination: IpAddr) -> Option<Frame<'_>> {
    match next {
        17 => {
            let len = usize::from(be16(t, 4)?);
            if len < 8 || len > t.len() {
                return None;
            }
            Some(Frame {
                source,
                destination,
                proto: Proto::Udp,
                source_port: be16(t, 0)?,
                port: be16(t, 2)?,
                tcp_flags: 0,
                payload: &t[8..len],
            })
        }
        6 => {
            if t.len() < 20 {
                return None;
            }
            Some(Frame {
                source,
                destination,
                proto: Proto::Tcp,
                source_port: be16(t, 0)?,
                port: be16(t, 2)?,
                tcp_flags: t[13] & 0x3f,
                payload: &[],
            })
        }
        _ => None,
    }
}

/// Test helpers that build packets; also used by the fuzz target and the BPF tests.
pub mod build {
    use std::net::IpAddr;

    /// An IP packet with a UDP datagram (checksums zero; nothing here checks them).
    pub fn udp(
        source: IpAddr,
        destination: IpAddr,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(payload);
        ip(source, destination, 17, &t)
    }

    /// An IP packet with a bare TCP header carrying `flags`.
    pub fn tcp(source: IpAddr, destination: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        ip(source, destination, 6, &t)
    }

    fn ip(source: IpAddr, destination: IpAddr, proto: u8, t: &[u8]) -> Vec<u8> {
        match (source, destination) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
                p[2..4].copy_from_slice(&((20 + t.len()) as u16).to_be_bytes());
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(t);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = vec![0x60, 0, 0, 0];
                p.extend_from_slice(&(t.len() as u16).to_be_bytes());
                p.push(proto);
                p.push(64);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(t);
                p
            }
            _ => panic!("mixed address families"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_both_families_and_protocols() {
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "203.0.113.1".parse().unwrap();
        let f = parse(&build::udp(a, b, 5555, 62201, b"hi"))
            .map(|f| (f.source, f.port, f.payload.to_vec()));
        assert_eq!(f, Some((a, 62201, b"hi".to_vec())));
        let a6: IpAddr = "2001:db8::7".parse().unwrap();
        let b6: IpAddr = "2001:db8::1".parse().unwrap();
        let packet = build::tcp(a6, b6, 5555, 7000, 0x02);
        let f = parse(&packet).unwrap();
        assert_eq!((f.proto, f.port, f.tcp_flags), (Proto::Tcp, 7000, 0x02));
    }

    #[test]
    fn fragments_and_truncation_are_refused() {
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let mut p = build::udp(a, a, 1, 2, b"x");
        p[6] = 0x20; // more fragments
        assert!(parse(&p).is_none());
        let p = build::udp(a, a, 1, 2, b"xyz");
        assert!(parse(&p[..p.len() - 1]).is_none());
    }

    proptest! {
        #[test]
        fn never_panics(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse(&bytes);
        }
    }
}
