//! Turning the gateway's name into an address, in a fixed and documented order:
//!
//! 1. an address literal (`203.0.113.1`, `2001:db8::1`, `[2001:db8::1]`) is used as is;
//! 2. resolvers named with `--resolver` or `resolver = [...]` in the profile are asked in turn
//!    (the built-in stub in [`crate::dns`]);
//! 3. when `/etc/resolv.conf` exists, the system resolver (which also reads `/etc/hosts`);
//! 4. the `nameserver` lines of `$PREFIX/etc/resolv.conf` (Termux keeps its resolver there);
//! 5. otherwise an error that says to add `resolver = ["…"]`.
//!
//! A static musl binary on Android has no `/etc/resolv.conf`, and musl would then ask
//! 127.0.0.1, where nothing answers: steps 2 and 4 exist for it.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::dns::{self, QueryType};

/// Address family preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    #[default]
    Any,
    V4,
    V6,
}

impl Family {
    fn accepts(self, addr: &IpAddr) -> bool {
        match self {
            Family::Any => true,
            Family::V4 => addr.is_ipv4(),
            Family::V6 => addr.is_ipv6(),
        }
    }
}

/// How a host was resolved (for `-v`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    Literal,
    Resolver(SocketAddr),
    System,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Literal => f.write_str("an address literal"),
            Via::Resolver(server) => write!(f, "DNS server {server}"),
            Via::System => f.write_str("the system resolver"),
        }
    }
}

/// A DNS server as written by the user: `192.0.2.53`, `192.0.2.53:5353`, `2001:db8::53`
/// or `[2001:db8::53]:53`.
pub fn parse_server(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip: IpAddr = text
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .with_context(|| {
            format!("resolver `{text}` is not an address; write e.g. \"192.0.2.53\" or \"[2001:db8::53]:53\"")
        })?;
    Ok(SocketAddr::new(ip, 53))
}

/// The resolver that answers where no `/etc/resolv.conf` exists.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    /// Servers from `--resolver` or the profile, asked first.
    pub servers: Vec<SocketAddr>,
    /// The system configuration file (a parameter so tests can point it elsewhere).
    pub system_conf: Option<std::path::PathBuf>,
}

impl Resolver {
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers,
            system_conf: Some("/etc/resolv.conf".into()),
        }
    }

    /// Resolves `host` to one address of `family` with `port`.
    pub fn resolve(&self, host: &str, port: u16, family: Family) -> anyhow::Result<SocketAddr> {
        self.resolve_via(host, port, family).map(|(a, _)| a)
    }

    /// As [`Resolver::resolve`], also saying how.
    pub fn resolve_via(
        &self,
        host: &str,
        port: u16,
        family: Family,
    ) -> anyhow::Result<(SocketAddr, Via)> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            if !family.accepts(&ip) {
                bail!("{ip} is not of the requested address family");
            }
            return Ok((SocketAddr::new(ip, port), Via::Literal));
        }
        if !self.servers.is_empty() {
            return ask(&self.servers, bare, port, family);
        }
        if self.system_conf.as_deref().is_some_and(Path::exists) {
            let found = (bare, port)
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve {bare}"))?
                .find(|a| family.accepts(&a.ip()))
                .with_context(|| format!("{bare} has no address of the requested family"))?;
            return Ok((found, Via::System));
        }
        let termux = std::env::var_os("PREFIX")
            .map(|p| Path::new(&p).join("etc/resolv.conf"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|text| nameservers(&text))
            .unwrap_or_default();
        if !termux.is_empty() {
            return ask(&termux, bare, port, family);
        }
        bail!(
            "cannot resolve {bare}: this device has no /etc/resolv.conf; add resolver = [\"192.0.2.53\"] \
             (your DNS server) to the profile or pass --resolver ADDRESS, or use the gateway's address"
        )
    }
}

/// The `nameserver` addresses of a resolv.conf text.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn ask(
    servers: &[SocketAddr],
    host: &str,
    port: u16,
    family: Family,
) -> anyhow::Result<(SocketAddr, Via)> {
    let types: &[QueryType] = match family {
        Family::V4 => &[QueryType::A],
        Family::V6 => &[QueryType::Aaaa],
        Family::Any => &[QueryType::A, QueryType::Aaaa],
    };
    let mut errors = Vec::new();
    for server in servers {
        for qtype in types {
            match dns::lookup(*server, host, *qtype, Duration::from_secs(2)) {
                Ok(addrs) => {
                    if let Some(ip) = addrs.into_iter().next() {
                        return Ok((SocketAddr::new(ip, port), Via::Resolver(*server)));
                    }
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    bail!("cannot resolve {host}: {}", errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_need_no_resolver_and_respect_the_family() {
        let r = Resolver::default();
        let (a, via) = r.resolve_via("[2001:db8::1]", 62201, Family::Any).unwrap();
        assert_eq!(
            (a.to_string().as_str(), via),
            ("[2001:db8::1]:62201", Via::Literal)
        );
        assert!(r.resolve("203.0.113.1", 1, Family::V6).is_err());
    }

    #[test]
    fn without_resolv_conf_the_error_says_what_to_add() {
        let r = Resolver {
            servers: Vec::new(),
            system_conf: Some("/nonexistent/resolv.conf".into()),
        };
        std::env::remove_var("PREFIX");
        let err = r.resolve("gw.example.net", 1, Family::Any).unwrap_err();
        assert!(err.to_string().contains("resolver = ["), "{err}");
    }

    #[test]
    fn servers_and_resolv_conf_lines_parse() {
        assert_eq!(
            parse_server("192.0.2.53").unwrap().to_string(),
            "192.0.2.53:53"
        );
        assert_eq!(
            parse_server("[2001:db8::53]:5353").unwrap().to_string(),
            "[2001:db8::53]:5353"
        );
        assert!(parse_server("dns.example").is_err());
        let text = "# x\nnameserver 192.0.2.53\nnameserver fe80::1%wlan0\nsearch lan\n";
        assert_eq!(nameservers(text).len(), 2);
    }
}
