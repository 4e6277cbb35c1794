//! Small network value types shared by config, policy and firewalls: protocols, `port/proto`,
//! CIDR prefixes, and the host's interface names.

use std::collections::BTreeSet;
use std::net::IpAddr;

/// Transport protocol of a protected port or a knock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// A port with its protocol, written `22/tcp` (a bare number means TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortProto {
    pub port: u16,
    pub proto: Proto,
}

impl std::fmt::Display for PortProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.proto.name())
    }
}

impl std::str::FromStr for PortProto {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let hint =
            || format!("`{text}` is not a port; write \"22/tcp\", \"51820/udp\" or \"7000:udp\"");
        let (port, proto) = match text.split_once(['/', ':']) {
            Some((p, proto)) => (p, proto),
            None => (text, "tcp"),
        };
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(hint()),
        };
        let port: u32 = port.trim().parse().map_err(|_| hint())?;
        if !(1..=65535).contains(&port) {
            return Err(format!("port {port} is out of range; ports are 1-65535"));
        }
        Ok(Self {
            port: port as u16,
            proto,
        })
    }
}

/// An address prefix such as `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let hint = || {
            format!(
                "`{text}` is not a CIDR prefix; write e.g. \"203.0.113.0/24\" or \"2001:db8::/48\""
            )
        };
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| hint())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.trim().parse::<u8>().map_err(|_| hint())?,
            None => max,
        };
        if len > max {
            return Err(hint());
        }
        let cidr = Self { addr, len };
        if cidr.network() != addr {
            return Err(format!(
                "`{text}` has host bits set; write \"{}\"",
                Cidr {
                    addr: cidr.network(),
                    len
                }
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn mask(len: u8, bits: u32) -> u128 {
        if len == 0 {
            0
        } else {
            (!0u128 << (bits - u32::from(len))) & (!0u128 >> (128 - bits))
        }
    }

    /// The prefix with host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(v4) => {
                let m = Self::mask(self.len, 32) as u32;
                IpAddr::V4((u32::from(v4) & m).into())
            }
            IpAddr::V6(v6) => {
                let m = Self::mask(self.len, 128);
                IpAddr::V6((u128::from(v6) & m).into())
            }
        }
    }

    /// Whether `ip` lies in the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = Self::mask(self.len, 32) as u32;
                u32::from(net) & m == u32::from(ip) & m
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = Self::mask(self.len, 128);
                u128::from(net) & m == u128::from(ip) & m
            }
            _ => false,
        }
    }
}

/// Maps an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) back to IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Names of the interfaces in this network namespace, or `None` if they cannot be listed.
pub fn interface_names() -> Option<BTreeSet<String>> {
    let entries = std::fs::read_dir("/sys/class/net").ok()?;
    Some(
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forms() {
        assert_eq!(
            "22/tcp".parse::<PortProto>().unwrap(),
            PortProto {
                port: 22,
                proto: Proto::Tcp
            }
        );
        assert_eq!("8000:udp".parse::<PortProto>().unwrap().proto, Proto::Udp);
        assert_eq!("443".parse::<PortProto>().unwrap().proto, Proto::Tcp);
        assert!("0/tcp".parse::<PortProto>().is_err());
        assert!("22/sctp".parse::<PortProto>().is_err());
        assert!("x".parse::<PortProto>().is_err());
    }

    #[test]
    fn cidrs() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!("10.1.0.1/16"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("10.1.0.0/16"));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().len, 0);
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().len, 32);
    }
}
