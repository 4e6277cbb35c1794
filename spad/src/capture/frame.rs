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
    /// The whole transport segment (header and data), for the checksum.
    pub segment: &'a [u8],
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
    let end = 40 + payload_len;
    if end > p.len() {
        return None;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&p[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&p[24..40]);
    let (next, at) = walk_extensions(&p[..end], p[6])?;
    transport(
        next,
        &p[at..end],
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
    )
}

/// Longest chain of IPv6 extension headers followed before the transport header.
pub const MAX_EXTENSIONS: usize = 8;

/// Follows IPv6 extension headers (hop-by-hop, routing, fragment, destination options) from
/// the fixed header to the transport header, the way the host's stack does for a datagram
/// addressed to it. Returns the transport protocol and its offset, or `None` when the host
/// would not deliver the datagram locally: hop-by-hop anywhere but first, a routing header
/// with segments left (the packet is for a later hop), a non-first fragment, or a chain that
/// is truncated or longer than [`MAX_EXTENSIONS`].
fn walk_extensions(p: &[u8], first: u8) -> Option<(u8, usize)> {
    let (mut next, mut at) = (first, 40usize);
    for position in 0..=MAX_EXTENSIONS {
        let length = match next {
            0 if position == 0 => (usize::from(*p.get(at + 1)?) + 1) * 8,
            60 => (usize::from(*p.get(at + 1)?) + 1) * 8,
            43 if *p.get(at + 3)? == 0 => (usize::from(*p.get(at + 1)?) + 1) * 8,
            44 if be16(p, at + 2)? & 0xfff8 == 0 => 8,
            0 | 43 | 44 => return None,
            _ => return Some((next, at)),
        };
        next = *p.get(at)?;
        at += length;
        if at > p.len() {
            return None;
        }
    }
    None
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
                segment: &t[..len],
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
                segment: t,
            })
        }
        _ => None,
    }
}

/// Packet builders with correct checksums; used by the unit tests, the benchmark, the fuzz
/// targets and the BPF tests.
pub mod build {
    use std::net::IpAddr;

    use crate::capture::checksum;

    /// An IP packet with a UDP datagram.
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
        let sum = checksum::transport_value(source, destination, 17, &t);
        t[6..8].copy_from_slice(&sum.to_be_bytes());
        ip(source, destination, 17, &t)
    }

    /// An IP packet with a bare TCP header carrying `flags`.
    pub fn tcp(source: IpAddr, destination: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        let sum = checksum::transport_value(source, destination, 6, &t);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        ip(source, destination, 6, &t)
    }

    /// Inserts an IPv6 extension header of type `kind` right after the fixed header of an
    /// IPv6 packet. `body` follows the next-header and length bytes and is padded with zeros
    /// to a multiple of 8 (a fragment header is always 8 bytes).
    pub fn with_extension(packet: &[u8], kind: u8, body: &[u8]) -> Vec<u8> {
        let mut header = vec![packet[6], 0];
        header.extend_from_slice(body);
        header.resize(header.len().div_ceil(8) * 8, 0);
        if kind != 44 {
            header[1] = (header.len() / 8 - 1) as u8;
        }
        let mut out = packet[..40].to_vec();
        out[6] = kind;
        let payload = (packet.len() - 40 + header.len()) as u16;
        out[4..6].copy_from_slice(&payload.to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&packet[40..]);
        out
    }

    fn ip(source: IpAddr, destination: IpAddr, proto: u8, t: &[u8]) -> Vec<u8> {
        match (source, destination) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
                p[2..4].copy_from_slice(&((20 + t.len()) as u16).to_be_bytes());
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                let sum = checksum::ipv4_header_value(&p);
                p[10..12].copy_from_slice(&sum.to_be_bytes());
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
            _ => Vec::new(),
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

    #[test]
    fn ipv6_extension_headers_are_walked_like_the_host_does() {
        let a: IpAddr = "2001:db8::7".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let plain = build::udp(a, b, 5555, 62201, b"spa");
        let port = |p: &[u8]| parse(p).map(|f| (f.port, f.payload.to_vec()));
        let want = Some((62201, b"spa".to_vec()));
        let dest_opts = build::with_extension(&plain, 60, &[1, 4, 0, 0, 0, 0]);
        assert_eq!(port(&dest_opts), want, "destination options");
        let hop = build::with_extension(&dest_opts, 0, &[]);
        assert_eq!(port(&hop), want, "hop-by-hop then destination options");
        assert_eq!(
            port(&build::with_extension(&hop, 60, &[])),
            None,
            "hop-by-hop not first"
        );
        let routed_here = build::with_extension(&plain, 43, &[0, 0]);
        assert_eq!(port(&routed_here), want, "routing header, no segments left");
        let onward = build::with_extension(&plain, 43, &[0, 1]);
        assert_eq!(port(&onward), None, "routing header with segments left");
        let atomic = build::with_extension(&plain, 44, &[0, 0, 0, 0, 0, 1]);
        assert_eq!(port(&atomic), want, "atomic fragment");
        let later = build::with_extension(&plain, 44, &[0, 8, 0, 0, 0, 1]);
        assert_eq!(port(&later), None, "non-first fragment");
        let syn = build::with_extension(&build::tcp(a, b, 1, 7000, 0x02), 60, &[]);
        assert_eq!(
            parse(&syn).map(|f| (f.proto, f.port)),
            Some((Proto::Tcp, 7000))
        );
        let mut chain = plain.clone();
        for _ in 0..=MAX_EXTENSIONS {
            chain = build::with_extension(&chain, 60, &[]);
        }
        assert_eq!(port(&chain), None, "chain too long");
        let truncated = build::with_extension(&plain, 60, &[]);
        assert_eq!(parse(&truncated[..45]).map(|f| f.port), None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse(&bytes);
        }
    }
}
