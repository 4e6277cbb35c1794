//! A tiny DNS stub resolver: one A or AAAA question over UDP to a named server. It exists for
//! static musl builds on devices without `/etc/resolv.conf` (Android/Termux), where the C
//! library's resolver has nothing to ask. Only what a client needs: no TCP fallback, no
//! caching, no DNSSEC. The response parser is pure and never panics (fuzz target
//! `dns_response`); the exchange checks the id, the question and the source address, so an
//! off-path answer has to guess a random 16-bit id and port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

/// The record types asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryType {
    A,
    Aaaa,
}

impl QueryType {
    fn code(self) -> u16 {
        match self {
            QueryType::A => 1,
            QueryType::Aaaa => 28,
        }
    }
}

/// Why an answer gave no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The host name cannot be put in a question.
    BadName,
    /// Shorter than its header or records claim, a bad pointer, or not an answer to our question.
    Malformed(&'static str),
    /// The server answered with an error code (3 = no such name).
    Rcode(u8),
    /// The server answered, but with no address of the asked type.
    NoAddress,
}

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsError::BadName => f.write_str("not a host name"),
            DnsError::Malformed(why) => write!(f, "malformed DNS answer: {why}"),
            DnsError::Rcode(3) => f.write_str("no such name (NXDOMAIN)"),
            DnsError::Rcode(2) => f.write_str("the DNS server failed (SERVFAIL)"),
            DnsError::Rcode(5) => f.write_str("the DNS server refused the query"),
            DnsError::Rcode(code) => write!(f, "DNS error code {code}"),
            DnsError::NoAddress => f.write_str("no address of that family"),
        }
    }
}

impl std::error::Error for DnsError {}

/// Encodes a recursive query for `name`.
pub fn query(id: u16, name: &str, qtype: QueryType) -> Result<Vec<u8>, DnsError> {
    let name = name.trim_end_matches('.');
    if name.is_empty() || name.len() > 253 {
        return Err(DnsError::BadName);
    }
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(DnsError::BadName);
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.code().to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // class IN
    Ok(out)
}

fn u16_at(buf: &[u8], at: usize) -> Result<u16, DnsError> {
    buf.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(DnsError::Malformed("truncated"))
}

/// Skips a (possibly compressed) name starting at `at`; returns the offset after it.
fn skip_name(buf: &[u8], mut at: usize) -> Result<usize, DnsError> {
    // A name is at most 127 labels; a pointer ends it.
    for _ in 0..128 {
        let len = *buf.get(at).ok_or(DnsError::Malformed("truncated name"))?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xC0 == 0xC0 => {
                buf.get(at + 1)
                    .ok_or(DnsError::Malformed("truncated pointer"))?;
                return Ok(at + 2);
            }
            l if l & 0xC0 != 0 => return Err(DnsError::Malformed("reserved label type")),
            l => at += 1 + l as usize,
        }
    }
    Err(DnsError::Malformed("name too long"))
}

/// Parses the answer to `query(id, _, qtype)`: the addresses of type `qtype` in the answer
/// section (CNAME chains are followed by the server; their target records are taken as is).
pub fn parse_response(buf: &[u8], id: u16, qtype: QueryType) -> Result<Vec<IpAddr>, DnsError> {
    if buf.len() < 12 {
        return Err(DnsError::Malformed("shorter than a header"));
    }
    if u16_at(buf, 0)? != id {
        return Err(DnsError::Malformed("not our query id"));
    }
    let flags = u16_at(buf, 2)?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Malformed("a query, not a response"));
    }
    if flags & 0x0200 != 0 {
        return Err(DnsError::Malformed("truncated (TC) answer"));
    }
    let rcode = (flags & 0x000F) as u8;
    if rcode != 0 {
        return Err(DnsError::Rcode(rcode));
    }
    let (questions, answers) = (u16_at(buf, 4)?, u16_at(buf, 6)?);
    if questions != 1 {
        return Err(DnsError::Malformed("not one question"));
    }
    let mut at = skip_name(buf, 12)?;
    if u16_at(buf, at)? != qtype.code() || u16_at(buf, at + 2)? != 1 {
        return Err(DnsError::Malformed("answers another question"));
    }
    at += 4;
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(buf, at)?;
        let (rtype, class) = (u16_at(buf, at)?, u16_at(buf, at + 2)?);
        let len = u16_at(buf, at + 8)? as usize;
        let data = buf
            .get(at + 10..at + 10 + len)
            .ok_or(DnsError::Malformed("record runs past the end"))?;
        at += 10 + len;
        if class != 1 || rtype != qtype.code() {
            continue;
        }
        match (qtype, data.len()) {
            (QueryType::A, 4) => out.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            ))),
            (QueryType::Aaaa, 16) => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(data);
                out.push(IpAddr::V6(Ipv6Addr::from(octets)));
            }
            _ => return Err(DnsError::Malformed("address record of the wrong size")),
        }
    }
    if out.is_empty() {
        return Err(DnsError::NoAddress);
    }
    Ok(out)
}

/// Asks `server` for `name`; two tries of `timeout` each.
pub fn lookup(
    server: SocketAddr,
    name: &str,
    qtype: QueryType,
    timeout: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    let mut id = [0u8; 2];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
    let id = u16::from_be_bytes(id);
    let question = query(id, name, qtype).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    // connect(2) makes the kernel drop datagrams from any other address or port.
    socket.connect(server)?;
    socket.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 1500];
    let mut last = anyhow::anyhow!("no answer from {server}");
    for _ in 0..2 {
        socket.send(&question)?;
        // Read until our answer, a timeout, or a few stray datagrams.
        for _ in 0..4 {
            match socket.recv(&mut buf) {
                Ok(n) => match parse_response(&buf[..n], id, qtype) {
                    Err(DnsError::Malformed("not our query id")) => continue,
                    Ok(addrs) => return Ok(addrs),
                    Err(e) => return Err(anyhow::anyhow!("{server}: {e}")),
                },
                Err(e) => {
                    last = anyhow::anyhow!("no answer from {server}: {e}");
                    break;
                }
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as dnsmasq sends it: the question, a CNAME, then the address record with a
    /// compressed owner name.
    fn answer(id: u16, qtype: QueryType, rdata: &[u8]) -> Vec<u8> {
        let mut out = query(id, "gw.lab.test", qtype).unwrap();
        out[2] = 0x81;
        out[3] = 0x80;
        out[7] = 2; // two answers
        out.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xC0, 12]);
        out.extend_from_slice(&[0xC0, 12]);
        out.extend_from_slice(&qtype.code().to_be_bytes());
        out.extend_from_slice(&[0, 1, 0, 0, 0, 60, 0, rdata.len() as u8]);
        out.extend_from_slice(rdata);
        out
    }

    #[test]
    fn query_encodes_labels() {
        let q = query(0x1234, "gw.example.net.", QueryType::Aaaa).unwrap();
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], b"\x02gw\x07example\x03net\x00\x00\x1c\x00\x01");
        assert_eq!(query(1, "a..b", QueryType::A), Err(DnsError::BadName));
        assert_eq!(
            query(1, &"x".repeat(64), QueryType::A),
            Err(DnsError::BadName)
        );
    }

    #[test]
    fn answers_are_parsed_past_cnames() {
        let v4 = answer(7, QueryType::A, &[203, 0, 113, 1]);
        assert_eq!(
            parse_response(&v4, 7, QueryType::A).unwrap(),
            vec![IpAddr::from([203, 0, 113, 1])]
        );
        let six: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        let v6 = answer(9, QueryType::Aaaa, &six.octets());
        assert_eq!(
            parse_response(&v6, 9, QueryType::Aaaa).unwrap(),
            vec![IpAddr::V6(six)]
        );
    }

    #[test]
    fn wrong_or_broken_answers_are_refused() {
        let good = answer(7, QueryType::A, &[203, 0, 113, 1]);
        assert_eq!(
            parse_response(&good, 8, QueryType::A),
            Err(DnsError::Malformed("not our query id"))
        );
        assert_eq!(
            parse_response(&good, 7, QueryType::Aaaa),
            Err(DnsError::Malformed("answers another question"))
        );
        let mut nx = good.clone();
        nx[3] = 0x83;
        assert_eq!(
            parse_response(&nx, 7, QueryType::A),
            Err(DnsError::Rcode(3))
        );
        for cut in 0..good.len() {
            assert!(parse_response(&good[..cut], 7, QueryType::A).is_err());
        }
        let wrong_size = answer(7, QueryType::A, &[1, 2, 3]);
        assert!(parse_response(&wrong_size, 7, QueryType::A).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_an_error_or_addresses(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse_response(&bytes, u16::from_be_bytes([bytes.first().copied().unwrap_or(0), bytes.get(1).copied().unwrap_or(0)]), QueryType::A);
        }
    }
}
