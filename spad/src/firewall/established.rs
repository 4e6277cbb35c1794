//! What the host is doing when the ruleset is installed, read from `/proc/net/{tcp,udp}{,6}`:
//! connections that already exist (their exact flows are admitted) and ports with a listener
//! (never concealed merely for lying between a door's knock ports).
//!
//! Why: on a host where connection tracking was not yet active (the first netfilter rule that
//! needs conntrack turns it on), an SSH session opened before spad started is unknown to
//! conntrack, so its next packet is `ct state new` and would hit the protected port's drop.
//! Admitting each such flow by its exact 4-tuple (peer address and port, local address and
//! port) keeps the session alive until conntrack has picked it up, and does not make the port
//! answer a scan: a prober would have to guess a live peer's address and source port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{Config, ServiceKind};
use crate::net::{PortProto, Proto};

/// One established TCP connection to a protected local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// `st` value of an ESTABLISHED socket in `/proc/net/tcp`.
const TCP_ESTABLISHED: u8 = 0x01;
/// `st` of a listening TCP socket; an unconnected bound UDP socket shows TCP_CLOSE (7).
const TCP_LISTEN: u8 = 0x0a;
const UDP_UNCONNECTED: u8 = 0x07;
/// Most flows admitted at once (a bound on the ruleset size; far above any admin's sessions).
pub const MAX_FLOWS: usize = 4096;

fn parse_v4(hex: &str) -> Option<Ipv4Addr> {
    // The kernel prints the address as one 32-bit word in host (little-endian) order.
    let word = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(word.swap_bytes()))
}

fn parse_v6(hex: &str) -> Option<Ipv6Addr> {
    if hex.len() != 32 {
        return None;
    }
    let mut octets = [0u8; 16];
    for (i, chunk) in octets.chunks_mut(4).enumerate() {
        let word = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        chunk.copy_from_slice(&word.swap_bytes().to_be_bytes());
    }
    Some(Ipv6Addr::from(octets))
}

fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if addr.len() == 8 {
        IpAddr::V4(parse_v4(addr)?)
    } else {
        let v6 = parse_v6(addr)?;
        // Dual-stack sockets show IPv4 peers as ::ffff:a.b.c.d; the packets are IPv4.
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    };
    Some(SocketAddr::new(ip, port))
}

/// `(local, remote, state)` of every socket line of a `/proc/net/{tcp,udp}{,6}` text.
/// Lines that do not parse are skipped.
fn sockets(text: &str) -> impl Iterator<Item = (SocketAddr, SocketAddr, u8)> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let local = parse_endpoint(fields.next()?)?;
        let remote = parse_endpoint(fields.next()?)?;
        let state = u8::from_str_radix(fields.next()?, 16).ok()?;
        Some((local, remote, state))
    })
}

/// Parses `/proc/net/tcp` or `/proc/net/tcp6` text into the established connections.
pub fn parse_proc_tcp(text: &str) -> Vec<Flow> {
    sockets(text)
        .filter(|(_, _, state)| *state == TCP_ESTABLISHED)
        .map(|(local, remote, _)| Flow { local, remote })
        .collect()
}

/// Local ports with a listener: listening TCP sockets, or unconnected bound UDP sockets.
pub fn parse_proc_listeners(text: &str, proto: Proto) -> Vec<PortProto> {
    let wanted = match proto {
        Proto::Tcp => TCP_LISTEN,
        Proto::Udp => UDP_UNCONNECTED,
    };
    sockets(text)
        .filter(|(local, _, state)| *state == wanted && local.port() != 0)
        .map(|(local, _, _)| PortProto {
            port: local.port(),
            proto,
        })
        .collect()
}

/// What spad saw of the host when it built a ruleset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Established connections to protected local TCP ports.
    pub flows: Vec<Flow>,
    /// Ports something listens on.
    pub listening: Vec<PortProto>,
}

impl Observed {
    /// Reads this network namespace's sockets for `config`.
    pub fn read(config: &Config) -> Self {
        let mut listening: Vec<PortProto> = [
            ("/proc/net/tcp", Proto::Tcp),
            ("/proc/net/tcp6", Proto::Tcp),
            ("/proc/net/udp", Proto::Udp),
            ("/proc/net/udp6", Proto::Udp),
        ]
        .iter()
        .filter_map(|(path, proto)| Some((std::fs::read_to_string(path).ok()?, *proto)))
        .flat_map(|(text, proto)| parse_proc_listeners(&text, proto))
        .collect();
        listening.sort();
        listening.dedup();
        Self {
            flows: protected_flows(config),
            listening,
        }
    }
}

/// TCP ports of services on the gateway itself (NAT services are forwarded, not local).
pub fn local_tcp_ports(config: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = config
        .services
        .values()
        .filter(|s| s.kind != ServiceKind::Nat)
        .flat_map(|s| &s.ports)
        .filter(|p| p.proto == Proto::Tcp)
        .map(|p| p.port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Established connections to `config`'s local protected TCP ports, in this network namespace.
pub fn protected_flows(config: &Config) -> Vec<Flow> {
    let ports = local_tcp_ports(config);
    let mut flows: Vec<Flow> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|text| parse_proc_tcp(&text))
        .filter(|f| ports.contains(&f.local.port()) && !f.remote.ip().is_loopback())
        .collect();
    flows.sort();
    flows.dedup();
    flows.truncate(MAX_FLOWS);
    flows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_parse_both_families_and_only_established_count() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 017100CB:0016 0A7100CB:B5C2 01 00000000:00000000 00:00000000 00000000     0        0 1 1 0 20 4 30 10 -1\n   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2\n garbage line\n";
        let flows = parse_proc_tcp(v4);
        assert_eq!(
            flows,
            vec![Flow {
                local: "203.0.113.1:22".parse().unwrap(),
                remote: "203.0.113.10:46530".parse().unwrap(),
            }]
        );
        // 2001:db8:1::1 port 22 from 2001:db8:1::10, and a v4-mapped peer.
        let v6 = "header\n   0: B80D0120000001000000000001000000:0016 B80D0120000001000000000010000000:9C40 01 0 0 0\n   1: 0000000000000000FFFF00000100A8C0:0016 0000000000000000FFFF00000C01A8C0:9C41 01 0\n";
        let flows = parse_proc_tcp(v6);
        assert_eq!(flows[0].local, "[2001:db8:1::1]:22".parse().unwrap());
        assert_eq!(flows[0].remote, "[2001:db8:1::10]:40000".parse().unwrap());
        assert_eq!(flows[1].remote, "192.168.1.12:40001".parse().unwrap());
        assert_eq!(
            parse_proc_listeners(v4, Proto::Tcp),
            vec![PortProto {
                port: 22,
                proto: Proto::Tcp
            }]
        );
    }
}
