//! The Internet checksum (RFC 1071) over the IPv4/IPv6 pseudo-header and a transport segment,
//! and over an IPv4 header: what the host's own stack checks before a datagram counts.

use std::net::IpAddr;

/// One's-complement sum of 16-bit big-endian words (an odd last byte is padded with zero).
fn sum(bytes: &[u8], mut acc: u64) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Whether an IPv4 header (options included) sums to all ones, as `ip_rcv` requires.
pub fn ipv4_header_ok(header: &[u8]) -> bool {
    fold(sum(header, 0)) == 0xffff
}

/// The one's-complement sum of the pseudo-header and `segment` (checksum field included).
/// A correct segment folds to `0xffff`.
fn segment_sum(source: IpAddr, destination: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = u64::from(proto) + segment.len() as u64;
    acc = match (source, destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum(&d.octets(), sum(&s.octets(), acc)),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum(&d.octets(), sum(&s.octets(), acc)),
        _ => return 0,
    };
    fold(sum(segment, acc))
}

/// Whether a UDP or TCP segment's checksum is right. UDP over IPv4 may carry no checksum
/// (zero); over IPv6 a zero UDP checksum is invalid (RFC 8200 §8.1) and the host drops it.
pub fn transport_ok(source: IpAddr, destination: IpAddr, proto: u8, segment: &[u8]) -> bool {
    if proto == 17 && segment.len() >= 8 && segment[6..8] == [0, 0] {
        return source.is_ipv4();
    }
    segment_sum(source, destination, proto, segment) == 0xffff
}

/// The checksum value to write into a segment whose checksum field is zero (for tests,
/// benchmarks and the fuzz targets' packet builders).
pub fn transport_value(source: IpAddr, destination: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let value = !segment_sum(source, destination, proto, segment);
    // UDP sends an all-ones result as 0xffff, since 0 means "no checksum".
    if value == 0 && proto == 17 {
        0xffff
    } else {
        value
    }
}

/// The header checksum value for an IPv4 header whose checksum field is zero.
pub fn ipv4_header_value(header: &[u8]) -> u16 {
    !fold(sum(header, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example_and_a_known_ipv4_header() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        assert_eq!(
            fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)),
            0xddf2
        );
        // A real IPv4 header (captured): checksum b861 is right, any flip breaks it.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(ipv4_header_ok(&h));
        h[10] = 0;
        h[11] = 0;
        assert_eq!(ipv4_header_value(&h), 0xb861);
        h[11] = 0x62;
        assert!(!ipv4_header_ok(&h));
    }

    #[test]
    fn udp_zero_checksum_is_fine_on_v4_only() {
        let seg = [0x12, 0x34, 0xf2, 0xf9, 0x00, 0x09, 0x00, 0x00, b'x'];
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        assert!(transport_ok(v4, v4, 17, &seg));
        assert!(!transport_ok(v6, v6, 17, &seg));
        let mut good = seg;
        let c = transport_value(v6, v6, 17, &good).to_be_bytes();
        good[6..8].copy_from_slice(&c);
        assert!(transport_ok(v6, v6, 17, &good));
        good[8] ^= 1;
        assert!(!transport_ok(v6, v6, 17, &good));
    }
}
