//! nftables backend: one `inet` table owned by spad (no other table is touched).
//!
//! * Static part: generated text loaded with one `nft -f -` at start and on reload. The file
//!   deletes and recreates the table in one transaction, carrying live grants over with their
//!   remaining time, so a reload is atomic and a restart keeps grants.
//! * Grants: netlink `NEWSETELEM` batches on a long-lived socket (see [`super::netlink`]).
//!
//! Per service `S` there are sets `a4_S`/`a6_S` (absolute timeout) and, with an idle timeout,
//! `i4_S`/`i6_S`, re-armed in the kernel by an `update` rule in a prerouting chain that runs
//! before the conntrack shortcut. Access needs membership of both.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::netlink::{Message, Socket, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};
use super::{still_allowed, Access, Firewall, LiveGrant};
use crate::config::{Config, Service, ServiceKind};
use crate::net::PortProto;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;
/// Longest comment nft accepts on an element.
const MAX_COMMENT: usize = 128;

/// Whether the kernel and the `nft` tool are usable here.
pub fn available() -> bool {
    Command::new("nft")
        .args(["list", "tables"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Name of the set holding grants of `service` for `address`'s family.
pub fn set_name(service: &str, idle: bool, v6: bool) -> String {
    format!(
        "{}{}_{service}",
        if idle { "i" } else { "a" },
        if v6 { 6 } else { 4 }
    )
}

fn addr_bytes(address: IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn comment_udata(owner: &str) -> Vec<u8> {
    // Bounded in bytes, not characters: the TLV length is one byte and nft refuses more than
    // MAX_COMMENT (config keeps names far below this; this is the last line of defence).
    let mut text = String::new();
    for c in owner.chars().filter(|c| !c.is_control() && *c != '"') {
        if text.len() + c.len_utf8() > MAX_COMMENT - 1 {
            break;
        }
        text.push(c);
    }
    let mut out = vec![NFTNL_UDATA_SET_ELEM_COMMENT, (text.len() + 1) as u8];
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    out
}

/// A `NEWSETELEM`/`DELSETELEM` for one element of one set.
pub fn element_message(
    table: &str,
    set: &str,
    address: IpAddr,
    add: Option<(Duration, &str)>,
) -> Message {
    let (kind, flags) = match add {
        Some(_) => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
        None => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
    };
    let mut m = Message::new((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, NFPROTO_INET, 0);
    m.attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        .attr_str(NFTA_SET_ELEM_LIST_SET, set)
        .nest_start(NFTA_SET_ELEM_LIST_ELEMENTS)
        .nest_start(NFTA_LIST_ELEM)
        .nest_start(NFTA_SET_ELEM_KEY)
        .attr(NFTA_DATA_VALUE, &addr_bytes(address))
        .nest_end();
    if let Some((timeout, owner)) = add {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        m.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
        m.attr(NFTA_SET_ELEM_USERDATA, &comment_udata(owner));
    }
    m.nest_end().nest_end();
    m
}

/// An element carried over a reload: its set, address, timeout, time left and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub set: String,
    pub address: IpAddr,
    pub timeout: Duration,
    pub remaining: Duration,
    pub owner: String,
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

fn port_matches(ports: &[PortProto]) -> Vec<String> {
    super::port_items(ports, &[], "-")
        .into_iter()
        .map(|(proto, items)| format!("{} dport {{ {} }}", proto.name(), items.join(", ")))
        .collect()
}

fn iif(service: &Service) -> String {
    service
        .interface
        .as_ref()
        .map_or(String::new(), |i| format!("iifname \"{i}\" "))
}

fn hidden_matches(config: &Config) -> Vec<String> {
    let (ports, ranges) = super::hidden_ports(config);
    super::port_items(&ports, &ranges, "-")
        .into_iter()
        .map(|(proto, items)| format!("{} dport {{ {} }}", proto.name(), items.join(", ")))
        .collect()
}

/// The whole table as `nft -f` text, replacing any previous version atomically.
pub fn ruleset(config: &Config, table: &str, carried: &[Carried]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{"
    );
    let elements_of = |set: &str| -> String {
        let list: Vec<String> = carried
            .iter()
            .filter(|c| c.set == set)
            .map(|c| {
                format!(
                    "{} timeout {} expires {} comment \"{}\"",
                    c.address,
                    secs(c.timeout),
                    secs(c.remaining.min(c.timeout)),
                    c.owner.replace('"', "")
                )
            })
            .collect();
        if list.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", list.join(", "))
        }
    };
    for service in config.services.values() {
        for v6 in [false, true] {
            let family = if v6 { "ipv6_addr" } else { "ipv4_addr" };
            let name = set_name(&service.name, false, v6);
            let _ = writeln!(
                t,
                "  set {name} {{ type {family}; flags timeout;{} }}",
                elements_of(&name)
            );
            if service.idle_timeout.is_some() {
                let name = set_name(&service.name, true, v6);
                let _ = writeln!(
                    t,
                    "  set {name} {{ type {family}; flags dynamic,timeout;{} }}",
                    elements_of(&name)
                );
            }
        }
    }
    for (v6, family) in [(false, "ipv4_addr"), (true, "ipv6_addr")] {
        let name = if v6 { "blacklist6" } else { "blacklist4" };
        let _ = writeln!(
            t,
            "  set {name} {{ type {family}; flags timeout;{} }}",
            elements_of(name)
        );
    }

    // Idle timers: refreshed by any packet of a granted source to the service's ports, before
    // the conntrack shortcut so established flows count as activity too.
    let _ = writeln!(
        t,
        "  chain refresh {{\n    type filter hook prerouting priority -160; policy accept;"
    );
    for service in config.services.values() {
        let Some(idle) = service.idle_timeout else {
            continue;
        };
        for ports in port_matches(&service.ports) {
            for (ip, v6) in [("ip", false), ("ip6", true)] {
                let set = set_name(&service.name, true, v6);
                let _ = writeln!(
                    t,
                    "    {}{ports} {ip} saddr @{set} update @{set} {{ {ip} saddr timeout {} }}",
                    iif(service),
                    secs(idle)
                );
            }
        }
    }
    let _ = writeln!(t, "  }}");

    let ip = |v6: bool| if v6 { "ip6" } else { "ip" };
    // `ip saddr @a4_S [ip saddr @i4_S]`: granted (and, with an idle timeout, still active).
    let access = |service: &Service, v6: bool| -> String {
        let mut m = format!("{} saddr @{}", ip(v6), set_name(&service.name, false, v6));
        if service.idle_timeout.is_some() {
            let _ = write!(
                m,
                " {} saddr @{}",
                ip(v6),
                set_name(&service.name, true, v6)
            );
        }
        m
    };
    // `ip saddr { prefixes }` for the service's allow list in one family, if it has any.
    let allow = |service: &Service, v6: bool| -> Option<String> {
        let list: Vec<String> = service
            .allow
            .iter()
            .filter(|c| c.addr.is_ipv6() == v6)
            .map(|c| c.to_string())
            .collect();
        (!list.is_empty()).then(|| format!("{} saddr {{ {} }}", ip(v6), list.join(", ")))
    };

    let _ = writeln!(
        t,
        "  chain input {{\n    type filter hook input priority filter - 5; policy accept;"
    );
    let _ = writeln!(t, "    ct state established,related accept");
    for hidden in hidden_matches(config) {
        let _ = writeln!(t, "    {hidden} drop");
    }
    for service in config
        .services
        .values()
        .filter(|s| s.kind != ServiceKind::Nat)
    {
        for ports in port_matches(&service.ports) {
            for v6 in [false, true] {
                for source in allow(service, v6).into_iter().chain([access(service, v6)]) {
                    let _ = writeln!(t, "    {}{ports} {source} accept", iif(service));
                }
            }
        }
    }
    // Everything protected, NAT public ports included, looks filtered to everyone else.
    for service in config.services.values() {
        for ports in port_matches(&service.ports) {
            let _ = writeln!(t, "    {}{ports} drop", iif(service));
        }
    }
    let _ = writeln!(t, "  }}");

    let nat: Vec<&Service> = config
        .services
        .values()
        .filter(|s| s.kind == ServiceKind::Nat)
        .collect();
    if !nat.is_empty() {
        let _ = writeln!(t, "  chain nat_prerouting {{\n    type nat hook prerouting priority dstnat - 5; policy accept;");
        for service in &nat {
            let forward = service
                .forward
                .as_ref()
                .expect("nat services have a target");
            for ports in port_matches(&service.ports) {
                for (target, v6) in [(forward.v4, false), (forward.v6, true)] {
                    let Some(target) = target else { continue };
                    for source in allow(service, v6).into_iter().chain([access(service, v6)]) {
                        let _ = writeln!(
                            t,
                            "    {}{ports} {source} dnat {} to {target}",
                            iif(service),
                            ip(v6)
                        );
                    }
                }
            }
        }
        let _ = writeln!(t, "  }}");
        let _ = writeln!(
            t,
            "  chain forward {{\n    type filter hook forward priority filter - 5; policy accept;"
        );
        let _ = writeln!(t, "    ct state established,related accept");
        for service in &nat {
            let forward = service
                .forward
                .as_ref()
                .expect("nat services have a target");
            let public = service.ports[0];
            for target in [forward.v4, forward.v6].into_iter().flatten() {
                let ip = if target.is_ipv6() { "ip6" } else { "ip" };
                let proto = public.proto.name();
                let m = format!("{ip} daddr {} {proto} dport {}", target.ip(), target.port());
                let _ = writeln!(
                    t,
                    "    {m} ct status dnat ct original proto-dst {} accept",
                    public.port
                );
                let _ = writeln!(t, "    {m} drop");
            }
        }
        let _ = writeln!(t, "  }}");
    }
    let _ = writeln!(t, "}}");
    t
}

/// Runs `nft` with `args`, feeding `input` on stdin; returns stdout.
fn nft(args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    super::run_tool("nft", args, input, "nftables")
}

/// Parses `nft -j list table` output into set elements. Unknown shapes are skipped.
pub fn parse_elements(json: &str) -> anyhow::Result<Vec<Carried>> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("nft -j output is not JSON")?;
    let mut out = Vec::new();
    let items = value
        .get("nftables")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    for item in items {
        let Some(set) = item.get("set") else { continue };
        let Some(name) = set.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let Some(elems) = set.get("elem").and_then(|e| e.as_array()) else {
            continue;
        };
        for elem in elems {
            let Some(inner) = elem.get("elem") else {
                continue;
            };
            let Some(address) = inner
                .get("val")
                .and_then(|v| v.as_str())
                .and_then(|v| v.parse().ok())
            else {
                continue;
            };
            let secs = |key: &str| {
                Duration::from_secs(inner.get(key).and_then(|v| v.as_u64()).unwrap_or(0))
            };
            out.push(Carried {
                set: name.to_string(),
                address,
                timeout: secs("timeout"),
                remaining: secs("expires"),
                owner: inner
                    .get("comment")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string(),
            });
        }
    }
    Ok(out)
}

/// The nftables backend.
#[derive(Debug)]
pub struct Nftables {
    table: String,
    socket: Socket,
    /// Services with an idle set, from the installed config.
    idle_services: Vec<String>,
}

impl Nftables {
    pub fn open(table: &str) -> anyhow::Result<Self> {
        let socket = Socket::open()
            .context("cannot open a netfilter netlink socket (needs CAP_NET_ADMIN)")?;
        Ok(Self {
            table: table.to_string(),
            socket,
            idle_services: Vec::new(),
        })
    }

    fn current(&self) -> anyhow::Result<Vec<Carried>> {
        match nft(&["-j", "list", "table", "inet", &self.table], None) {
            Ok(json) => parse_elements(&json),
            Err(e) if e.to_string().contains("No such file") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Owner-annotated view of the `a*` sets.
    fn grants_from(&self, carried: &[Carried]) -> Vec<LiveGrant> {
        carried
            .iter()
            .filter_map(|c| {
                let service = c
                    .set
                    .strip_prefix("a4_")
                    .or_else(|| c.set.strip_prefix("a6_"))?;
                Some(LiveGrant {
                    address: c.address,
                    service: service.to_string(),
                    remaining: c.remaining,
                    owner: c.owner.clone(),
                })
            })
            .collect()
    }
}

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn attach(&mut self, config: &Config) {
        self.idle_services = config
            .services
            .values()
            .filter(|s| s.idle_timeout.is_some())
            .map(|s| s.name.clone())
            .collect();
    }

    fn install(&mut self, config: &Config) -> anyhow::Result<usize> {
        let current = self.current()?;
        let kept: Vec<Carried> = current
            .into_iter()
            .filter(|c| {
                if c.set.starts_with("blacklist") {
                    return true;
                }
                let Some(service) = c.set.get(3..) else {
                    return false;
                };
                let idle_ok = !c.set.starts_with('i')
                    || config
                        .services
                        .get(service)
                        .is_some_and(|s| s.idle_timeout.is_some());
                idle_ok
                    && still_allowed(
                        config,
                        &LiveGrant {
                            address: c.address,
                            service: service.to_string(),
                            remaining: c.remaining,
                            owner: c.owner.clone(),
                        },
                    )
            })
            .collect();
        let text = ruleset(config, &self.table, &kept);
        nft(&["-f", "-"], Some(&text)).context("loading the ruleset")?;
        self.idle_services = config
            .services
            .values()
            .filter(|s| s.idle_timeout.is_some())
            .map(|s| s.name.clone())
            .collect();
        Ok(kept.iter().filter(|c| c.set.starts_with('a')).count())
    }

    fn grant(&mut self, grants: &[Access]) -> anyhow::Result<()> {
        let mut messages = Vec::with_capacity(grants.len() * 6);
        for g in grants {
            let v6 = g.address.is_ipv6();
            let mut sets = vec![(set_name(&g.service, false, v6), g.timeout)];
            if let Some(idle) = g.idle {
                sets.push((set_name(&g.service, true, v6), idle));
            }
            for (set, timeout) in sets {
                // add (creates if missing) + delete + add: refreshes the timeout on every kernel.
                messages.push(element_message(
                    &self.table,
                    &set,
                    g.address,
                    Some((timeout, &g.owner)),
                ));
                messages.push(element_message(&self.table, &set, g.address, None));
                messages.push(element_message(
                    &self.table,
                    &set,
                    g.address,
                    Some((timeout, &g.owner)),
                ));
            }
        }
        self.socket
            .transact(messages, Some(NFNL_SUBSYS_NFTABLES))
            .context("adding set elements over netlink")
    }

    fn revoke(&mut self, address: IpAddr, services: &[String]) -> anyhow::Result<()> {
        let v6 = address.is_ipv6();
        let mut messages = Vec::new();
        for service in services {
            let mut sets = vec![set_name(service, false, v6)];
            if self.idle_services.contains(service) {
                sets.push(set_name(service, true, v6));
            }
            for set in sets {
                // add-then-delete always succeeds, whether or not the element was there.
                messages.push(element_message(
                    &self.table,
                    &set,
                    address,
                    Some((Duration::from_secs(1), "revoked")),
                ));
                messages.push(element_message(&self.table, &set, address, None));
            }
        }
        if messages.is_empty() {
            return Ok(());
        }
        self.socket
            .transact(messages, Some(NFNL_SUBSYS_NFTABLES))
            .context("removing set elements over netlink")
    }

    fn list(&mut self) -> anyhow::Result<Vec<LiveGrant>> {
        let current = self.current()?;
        Ok(self.grants_from(&current))
    }

    fn blacklist(&mut self, address: IpAddr, duration: Duration) -> anyhow::Result<()> {
        let set = if address.is_ipv6() {
            "blacklist6"
        } else {
            "blacklist4"
        };
        let messages = vec![
            element_message(&self.table, set, address, Some((duration, "blacklist"))),
            element_message(&self.table, set, address, None),
            element_message(&self.table, set, address, Some((duration, "blacklist"))),
        ];
        self.socket
            .transact(messages, Some(NFNL_SUBSYS_NFTABLES))
            .context("blacklisting over netlink")
    }

    fn blacklisted(&mut self) -> anyhow::Result<Vec<(IpAddr, Duration)>> {
        Ok(self
            .current()?
            .into_iter()
            .filter(|c| c.set.starts_with("blacklist"))
            .map(|c| (c.address, c.remaining))
            .collect())
    }

    fn remove(&mut self) -> anyhow::Result<()> {
        nft(&["delete", "table", "inet", &self.table], None).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comment_is_bounded_in_bytes_and_its_length_byte_is_right() {
        let udata = comment_udata(&"\u{1F600}".repeat(100));
        assert_eq!(usize::from(udata[1]), udata.len() - 2);
        assert!(udata.len() - 2 <= MAX_COMMENT, "{}", udata.len());
        assert_eq!(udata.last(), Some(&0));
    }

    #[test]
    fn element_json_parses() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"set": {"family": "inet", "name": "a4_ssh", "table": "spad",
            "type": "ipv4_addr", "flags": ["timeout"], "elem": [{"elem": {"val": "198.51.100.7", "timeout": 30,
            "expires": 27, "comment": "alice"}}]}}, {"set": {"name": "a6_ssh", "elem": ["garbage"]}}]}"#;
        let elements = parse_elements(json).unwrap();
        assert_eq!(elements.len(), 1);
        assert_eq!(elements[0].owner, "alice");
        assert_eq!(elements[0].remaining, Duration::from_secs(27));
        assert!(parse_elements("not json").is_err());
    }

    #[test]
    fn new_element_message_golden_layout() {
        let m = element_message(
            "spad",
            "a4_ssh",
            "198.51.100.7".parse().unwrap(),
            Some((Duration::from_secs(30), "alice")),
        );
        let bytes = m.finish(1);
        // header(16) nfgen(4) table "spad\0"(4+5→12) set "a4_ssh\0"(4+7→12)
        assert_eq!(&bytes[20..24], &[9, 0, 1, 0]);
        assert_eq!(&bytes[24..29], b"spad\0");
        // the key's value attribute holds the address bytes
        let pos = bytes
            .windows(4)
            .position(|w| w == [198, 51, 100, 7])
            .unwrap();
        assert_eq!(&bytes[pos - 4..pos], &[8, 0, 1, 0]);
        // timeout attribute: 30000 ms big-endian
        let ms = 30_000u64.to_be_bytes();
        assert!(bytes.windows(8).any(|w| w == ms));
    }
}
