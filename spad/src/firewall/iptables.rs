//! iptables + ipset backend, for hosts without nftables (older distributions, OpenWrt fw3).
//!
//! Same model as nftables: per service an ipset `hash:ip` with per-entry timeouts holds the
//! granted addresses (plus an idle set re-armed by the `SET --exist --timeout` target in a
//! mangle chain), and spad owns its chains (`SPAD-INPUT`, `SPAD-FORWARD`, `SPAD-REFRESH`,
//! `SPAD-NAT`), reached by one jump from each built-in chain. The chains are replaced with
//! `iptables-restore --noflush` after `--test` passes for both families; sets persist across
//! restarts, so live grants survive. Grants go over ipset netlink (no process per grant).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;

use super::established::Observed;
use super::netlink::{Message, Socket, NLA_F_NET_BYTEORDER, NLM_F_ACK, NLM_F_REQUEST};
use super::plan::{Family, Plan, PortMatch, Rule, SetId, SetRole, Source, Verdict};
use super::{still_allowed, Access, Firewall, KernelReader, KernelView, LiveGrant};
use crate::config::Config;
use crate::net::Proto;

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_ADD: u16 = 9;
const IPSET_CMD_DEL: u16 = 10;
const IPSET_PROTOCOL: u8 = 6;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;
const IPSET_ATTR_TIMEOUT: u16 = 6;
const IPSET_ATTR_LINENO: u16 = 9;
const IPSET_ATTR_COMMENT: u16 = 26;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// An ipset message adding (with timeout and comment; refreshing if present) or deleting.
pub fn ipset_message(set: &str, address: IpAddr, add: Option<(Duration, &str)>) -> Message {
    let kind = if add.is_some() {
        IPSET_CMD_ADD
    } else {
        IPSET_CMD_DEL
    };
    let family = if address.is_ipv6() { AF_INET6 } else { AF_INET };
    // No NLM_F_EXCL: the kernel then sets IPSET_FLAG_EXIST, so an add refreshes an existing
    // entry's timeout and a delete of a missing entry is not an error.
    let mut m = Message::new(
        (NFNL_SUBSYS_IPSET << 8) | kind,
        NLM_F_REQUEST | NLM_F_ACK,
        family,
        0,
    );
    m.attr(IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL])
        .attr_str(IPSET_ATTR_SETNAME, set)
        .nest_start(IPSET_ATTR_DATA)
        .nest_start(IPSET_ATTR_IP);
    match address {
        IpAddr::V4(v4) => m.attr(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &v4.octets()),
        IpAddr::V6(v6) => m.attr(IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, &v6.octets()),
    };
    m.nest_end();
    if let Some((timeout, owner)) = add {
        // 2147483 s is the largest timeout ipset accepts; config refuses longer ones.
        let secs = u32::try_from(timeout.as_secs().clamp(1, 2_147_483)).unwrap_or(2_147_483);
        m.attr(
            IPSET_ATTR_TIMEOUT | NLA_F_NET_BYTEORDER,
            &secs.to_be_bytes(),
        );
        // ipset refuses comments over 255 bytes; bound in bytes, not characters.
        let mut comment = String::new();
        for c in owner.chars().filter(|c| !c.is_control() && *c != '"') {
            if comment.len() + c.len_utf8() > 200 {
                break;
            }
            comment.push(c);
        }
        m.attr_str(IPSET_ATTR_COMMENT, &comment);
    }
    m.attr(IPSET_ATTR_LINENO | NLA_F_NET_BYTEORDER, &0u32.to_be_bytes());
    m.nest_end();
    m
}

/// Set name for a service (ipset names are at most 31 bytes).
pub fn set_name(table: &str, service: &str, idle: bool, v6: bool) -> String {
    let family = if v6 { Family::V6 } else { Family::V4 };
    let id = if idle {
        SetId::idle(service, family)
    } else {
        SetId::grant(service, family)
    };
    id.ipset_name(table)
}

fn blacklist_set(table: &str, v6: bool) -> String {
    SetId::blacklist(if v6 { Family::V6 } else { Family::V4 }).ipset_name(table)
}

fn chain(table: &str, role: &str) -> String {
    format!("{}-{role}", table.to_uppercase())
}

/// `-p tcp -m multiport --dports ...` fragments, at most 7 entries each (multiport's limit is
/// 15 slots and a range takes two).
fn multiport(m: &PortMatch) -> Vec<String> {
    m.texts(":")
        .chunks(7)
        .map(|chunk| {
            format!(
                "-p {} -m multiport --dports {}",
                m.proto.name(),
                chunk.join(",")
            )
        })
        .collect()
}

fn iif(iif: &Option<String>) -> Option<String> {
    iif.as_ref().map(|i| format!("-i {i}"))
}

fn sources(table: &str, source: &Source) -> Vec<Option<String>> {
    match source {
        Source::Any => vec![None],
        Source::Nets(nets) => nets.iter().map(|c| Some(format!("-s {c}"))).collect(),
        Source::Granted { grant, idle } => {
            let mut m = format!("-m set --match-set {} src", grant.ipset_name(table));
            if let Some(idle) = idle {
                let _ = write!(m, " -m set --match-set {} src", idle.ipset_name(table));
            }
            vec![Some(m)]
        }
    }
}

fn target(verdict: Verdict, proto: Proto) -> String {
    match verdict {
        Verdict::Accept => "-j ACCEPT".into(),
        Verdict::Drop => "-j DROP".into(),
        Verdict::Conceal(conceal) => super::conceal_verdict(conceal, proto, false).into(),
        Verdict::Dnat(to) => format!("-j DNAT --to-destination {to}"),
    }
}

fn join(parts: impl IntoIterator<Item = Option<String>>) -> String {
    parts.into_iter().flatten().collect::<Vec<_>>().join(" ")
}

/// One plan rule as iptables rule specifications (without `-A CHAIN`); a rule may need
/// several (one per allowed prefix, one per multiport chunk).
pub fn render_rule(table: &str, rule: &Rule) -> Vec<String> {
    match rule {
        Rule::Established => vec!["-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT".into()],
        Rule::Flow(f) => vec![format!(
            "-s {} -d {} -p tcp --sport {} --dport {} -j ACCEPT",
            f.remote.ip(),
            f.local.ip(),
            f.remote.port(),
            f.local.port()
        )],
        Rule::Ports {
            iif: interface,
            ports,
            source,
            verdict,
            ..
        } => {
            let mut out = Vec::new();
            for from in sources(table, source) {
                for m in multiport(ports) {
                    out.push(join([
                        iif(interface),
                        Some(m),
                        from.clone(),
                        Some(target(*verdict, ports.proto)),
                    ]));
                }
            }
            out
        }
        Rule::Refresh {
            iif: interface,
            ports,
            set,
            timeout,
            ..
        } => {
            let set = set.ipset_name(table);
            multiport(ports)
                .into_iter()
                .map(|m| {
                    join([
                        iif(interface),
                        Some(m),
                        Some(format!(
                            "-m set --match-set {set} src -j SET --add-set {set} src --exist --timeout {}",
                            timeout.as_secs().max(1)
                        )),
                    ])
                })
                .collect()
        }
        Rule::ToTarget {
            target: to,
            proto,
            dnat_from,
            verdict,
        } => {
            let mut line = format!("-d {} -p {} --dport {}", to.ip(), proto.name(), to.port());
            if let Some(public) = dnat_from {
                let _ = write!(
                    line,
                    " -m conntrack --ctstate DNAT --ctorigdstport {public}"
                );
            }
            let _ = write!(line, " {}", target(*verdict, *proto));
            vec![line]
        }
    }
}

/// The `iptables-restore --noflush` input for one family of `plan`.
pub fn rules(plan: &Plan, table: &str, family: Family) -> String {
    let mut t = String::new();
    let chain_rules = |t: &mut String, chain: &str, rules: &[Rule]| {
        for rule in rules.iter().filter(|r| r.in_family(family)) {
            for spec in render_rule(table, rule) {
                let _ = writeln!(t, "-A {chain} {spec}");
            }
        }
    };
    let (input, forward, refresh, nat) = (
        chain(table, "INPUT"),
        chain(table, "FORWARD"),
        chain(table, "REFRESH"),
        chain(table, "NAT"),
    );
    let _ = writeln!(t, "*filter\n:{input} - [0:0]\n:{forward} - [0:0]");
    chain_rules(&mut t, &input, &plan.input);
    chain_rules(&mut t, &forward, &plan.forward);
    let _ = writeln!(t, "COMMIT\n*mangle\n:{refresh} - [0:0]");
    chain_rules(&mut t, &refresh, &plan.refresh);
    let _ = writeln!(t, "COMMIT\n*nat\n:{nat} - [0:0]");
    chain_rules(&mut t, &nat, &plan.nat);
    let _ = writeln!(t, "COMMIT");
    t
}

fn tool(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let package = if program == "ipset" {
        "ipset"
    } else {
        "iptables"
    };
    super::run_tool(program, args, input, package)
}

/// One entry from `ipset save`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub set: String,
    pub address: IpAddr,
    pub remaining: Duration,
    pub owner: String,
}

/// Grant entries that are live as the kernel enforces them: in a grant set of a known
/// service and, where that service has an idle set, in the idle set too. Linear: the idle
/// entries are indexed first (one scan of them per grant made `spad status` quadratic).
fn live_entries<'a>(
    sets: &'a [(String, SetId)],
    entries: &'a [Entry],
) -> Vec<(&'a Entry, &'a SetId)> {
    let by_name: std::collections::HashMap<&str, &SetId> =
        sets.iter().map(|(n, id)| (n.as_str(), id)).collect();
    let idle_sets: std::collections::HashSet<&SetId> = sets
        .iter()
        .map(|(_, id)| id)
        .filter(|id| id.role == SetRole::Idle)
        .collect();
    let in_idle: std::collections::HashSet<(IpAddr, &SetId)> = entries
        .iter()
        .filter_map(|x| {
            let id = by_name.get(x.set.as_str())?;
            (id.role == SetRole::Idle).then_some((x.address, *id))
        })
        .collect();
    entries
        .iter()
        .filter_map(|e| {
            let id = by_name
                .get(e.set.as_str())
                .copied()
                .filter(|id| id.role == SetRole::Grant)?;
            let idle = SetId::idle(&id.service, id.family);
            let active = !idle_sets.contains(&idle) || in_idle.contains(&(e.address, &idle));
            active.then_some((e, id))
        })
        .collect()
}

/// Whether ipset `set` belongs to `table` (`TABLE-...`).
fn ours(table: &str, set: &str) -> bool {
    set.strip_prefix(table)
        .is_some_and(|rest| rest.starts_with('-'))
}

/// `ipset save`, kept to `table`'s sets.
fn saved(table: &str) -> anyhow::Result<(Vec<String>, Vec<Entry>)> {
    let (sets, entries) = parse_save(&tool("ipset", &["save"], None)?);
    Ok((
        sets.into_iter().filter(|s| ours(table, s)).collect(),
        entries
            .into_iter()
            .filter(|e| ours(table, &e.set))
            .collect(),
    ))
}

/// The live grants and the blacklist among `entries`.
fn view_of(table: &str, sets: &[(String, SetId)], entries: &[Entry]) -> KernelView {
    let prefix = format!("{table}-bl");
    KernelView {
        grants: live_entries(sets, entries)
            .into_iter()
            .map(|(e, id)| LiveGrant {
                address: e.address,
                service: id.service.clone(),
                remaining: e.remaining,
                owner: e.owner.clone(),
            })
            .collect(),
        blacklisted: entries
            .iter()
            .filter(|e| e.set.starts_with(&prefix))
            .map(|e| (e.address, e.remaining))
            .collect(),
    }
}

/// Reads the ipsets from another thread (see [`KernelReader`]): `ipset save` is a process
/// spawn and a full listing, milliseconds even with few grants.
#[derive(Debug)]
struct SetsReader {
    table: String,
    sets: Vec<(String, SetId)>,
}

impl KernelReader for SetsReader {
    fn read(&mut self) -> anyhow::Result<KernelView> {
        let (_, entries) = saved(&self.table)?;
        Ok(view_of(&self.table, &self.sets, &entries))
    }
}

/// Parses `ipset save` output: set names and `add SET ADDR timeout N comment "X"` lines.
pub fn parse_save(text: &str) -> (Vec<String>, Vec<Entry>) {
    let mut sets = Vec::new();
    let mut entries = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("create") => sets.extend(words.next().map(str::to_string)),
            Some("add") => {
                let (Some(set), Some(Ok(address))) =
                    (words.next(), words.next().map(str::parse::<IpAddr>))
                else {
                    continue;
                };
                let rest: Vec<&str> = words.collect();
                let remaining = rest
                    .iter()
                    .position(|w| *w == "timeout")
                    .and_then(|i| rest.get(i + 1)?.parse().ok())
                    .unwrap_or(0);
                let owner = line
                    .split_once("comment \"")
                    .and_then(|(_, c)| c.split_once('"'))
                    .map_or("", |(c, _)| c);
                entries.push(Entry {
                    set: set.to_string(),
                    address,
                    remaining: Duration::from_secs(remaining),
                    owner: owner.to_string(),
                });
            }
            _ => {}
        }
    }
    (sets, entries)
}

/// The iptables backend.
#[derive(Debug)]
pub struct Iptables {
    table: String,
    socket: Socket,
    /// The installed plan's sets by ipset name, to map entries back to services.
    sets: Vec<(String, SetId)>,
}

impl Iptables {
    pub fn open(table: &str) -> anyhow::Result<Self> {
        let socket = Socket::open()
            .context("cannot open a netfilter netlink socket (needs CAP_NET_ADMIN)")?;
        Ok(Self {
            table: table.to_string(),
            socket,
            sets: Vec::new(),
        })
    }

    fn known_sets(&self, plan: &Plan) -> Vec<(String, SetId)> {
        plan.sets
            .iter()
            .map(|s| (s.id.ipset_name(&self.table), s.id.clone()))
            .collect()
    }

    fn set_of(&self, name: &str) -> Option<&SetId> {
        self.sets.iter().find(|(n, _)| n == name).map(|(_, id)| id)
    }

    /// Grant entries that are live as the kernel enforces them (see [`live_entries`]).
    fn live<'a>(&'a self, entries: &'a [Entry]) -> Vec<(&'a Entry, &'a SetId)> {
        live_entries(&self.sets, entries)
    }

    fn saved(&self) -> anyhow::Result<(Vec<String>, Vec<Entry>)> {
        saved(&self.table)
    }

    fn jump(&self, program: &str, table: &str, builtin: &str, target: &str) -> anyhow::Result<()> {
        let rule = ["-t", table, "-C", builtin, "-j", target];
        if tool(program, &rule, None).is_err() {
            tool(
                program,
                &["-t", table, "-I", builtin, "1", "-j", target],
                None,
            )?;
        }
        Ok(())
    }

    fn unjump(&self, program: &str, table: &str, builtin: &str, target: &str) {
        while tool(program, &["-t", table, "-D", builtin, "-j", target], None).is_ok() {}
    }

    fn hooks(&self) -> [(&'static str, &'static str, String); 4] {
        [
            ("filter", "INPUT", chain(&self.table, "INPUT")),
            ("filter", "FORWARD", chain(&self.table, "FORWARD")),
            ("mangle", "PREROUTING", chain(&self.table, "REFRESH")),
            ("nat", "PREROUTING", chain(&self.table, "NAT")),
        ]
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn attach(&mut self, config: &Config) {
        self.sets = self.known_sets(&Plan::build(config, &Observed::default()));
    }

    fn install(&mut self, config: &Config) -> anyhow::Result<usize> {
        let plan = Plan::build(config, &Observed::read(config));
        let known = self.known_sets(&plan);
        // Sets first (rules reference them); `-exist` keeps existing sets and their entries.
        let mut create = String::new();
        for (name, id) in &known {
            let family = match id.family {
                Family::V4 => "inet",
                Family::V6 => "inet6",
            };
            let _ = writeln!(
                create,
                "create {name} hash:ip family {family} timeout 0 comment"
            );
        }
        tool("ipset", &["restore", "-exist"], Some(&create)).context("creating ipsets")?;
        let (v4, v6) = (
            rules(&plan, &self.table, Family::V4),
            rules(&plan, &self.table, Family::V6),
        );
        tool("iptables-restore", &["--test", "--noflush"], Some(&v4))
            .context("checking IPv4 rules")?;
        tool("ip6tables-restore", &["--test", "--noflush"], Some(&v6))
            .context("checking IPv6 rules")?;
        tool("iptables-restore", &["--noflush"], Some(&v4)).context("loading IPv4 rules")?;
        tool("ip6tables-restore", &["--noflush"], Some(&v6)).context("loading IPv6 rules")?;
        for program in ["iptables", "ip6tables"] {
            for (table, builtin, target) in self.hooks() {
                self.jump(program, table, builtin, &target)?;
            }
        }
        self.sets = known;
        // Prune: entries the new config no longer allows, grants whose idle timer lapsed,
        // and sets the config no longer uses.
        let (sets, entries) = self.saved()?;
        let live: Vec<Entry> = self
            .live(&entries)
            .into_iter()
            .map(|(e, _)| e.clone())
            .collect();
        let mut kept = 0;
        for e in &entries {
            let set = self.set_of(&e.set);
            if set.is_some_and(|id| id.role == SetRole::Blacklist) {
                continue;
            }
            let allowed = set.is_some_and(|id| {
                still_allowed(
                    config,
                    &LiveGrant {
                        address: e.address,
                        service: id.service.clone(),
                        remaining: e.remaining,
                        owner: e.owner.clone(),
                    },
                )
            });
            let grant = set.is_some_and(|id| id.role == SetRole::Grant);
            if allowed && (!grant || live.contains(e)) {
                kept += usize::from(grant);
            } else {
                self.socket
                    .transact(vec![ipset_message(&e.set, e.address, None)], None)?;
            }
        }
        for set in sets {
            if self.set_of(&set).is_none() {
                let _ = tool("ipset", &["destroy", &set], None);
            }
        }
        Ok(kept)
    }

    fn grant(&mut self, grants: &[Access]) -> anyhow::Result<()> {
        let mut messages = Vec::new();
        for g in grants {
            let v6 = g.address.is_ipv6();
            messages.push(ipset_message(
                &set_name(&self.table, &g.service, false, v6),
                g.address,
                Some((g.timeout, &g.owner)),
            ));
            if let Some(idle) = g.idle {
                messages.push(ipset_message(
                    &set_name(&self.table, &g.service, true, v6),
                    g.address,
                    Some((idle, &g.owner)),
                ));
            }
        }
        // ipset has no transactions; the messages still go in one datagram.
        self.socket
            .transact(messages, None)
            .context("adding ipset entries over netlink")
    }

    fn revoke(&mut self, address: IpAddr, services: &[String]) -> anyhow::Result<()> {
        let v6 = address.is_ipv6();
        let mut messages = Vec::new();
        for service in services {
            messages.push(ipset_message(
                &set_name(&self.table, service, false, v6),
                address,
                None,
            ));
            let idle = set_name(&self.table, service, true, v6);
            if self.set_of(&idle).is_some() {
                messages.push(ipset_message(&idle, address, None));
            }
        }
        match self.socket.transact(messages, None) {
            // A set that does not exist (no idle set for this service) is not an error here.
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            other => other.context("removing ipset entries over netlink"),
        }
    }

    fn list(&mut self) -> anyhow::Result<Vec<LiveGrant>> {
        Ok(self.view()?.grants)
    }

    fn view(&mut self) -> anyhow::Result<KernelView> {
        let (_, entries) = self.saved()?;
        Ok(view_of(&self.table, &self.sets, &entries))
    }

    fn reader(&self) -> Option<Box<dyn KernelReader>> {
        Some(Box::new(SetsReader {
            table: self.table.clone(),
            sets: self.sets.clone(),
        }))
    }

    fn blacklist(&mut self, address: IpAddr, duration: Duration) -> anyhow::Result<()> {
        let set = blacklist_set(&self.table, address.is_ipv6());
        self.socket
            .transact(
                vec![ipset_message(&set, address, Some((duration, "blacklist")))],
                None,
            )
            .context("blacklisting over netlink")
    }

    fn blacklisted(&mut self) -> anyhow::Result<Vec<(IpAddr, Duration)>> {
        Ok(self.view()?.blacklisted)
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        let blacklists = [false, true].map(|v6| blacklist_set(&self.table, v6));
        for set in self.saved()?.0 {
            if !blacklists.contains(&set) {
                tool("ipset", &["flush", &set], None)?;
            }
        }
        Ok(())
    }

    fn protection(&mut self) -> anyhow::Result<String> {
        // Our chains, their rules and the jumps into them, in both families, and our sets.
        let prefix = chain(&self.table, "");
        let mut out = String::new();
        for program in ["iptables-save", "ip6tables-save"] {
            for table in ["filter", "mangle", "nat"] {
                let text = tool(program, &["-t", table], None)?;
                for line in text.lines().filter(|l| l.contains(&prefix)) {
                    let _ = writeln!(out, "{program} {table} {line}");
                }
            }
        }
        let names = tool("ipset", &["list", "-n"], None)?;
        for name in names.lines().filter(|n| ours(&self.table, n)) {
            let _ = writeln!(out, "ipset {name}");
        }
        Ok(out)
    }

    fn remove(&mut self) -> anyhow::Result<()> {
        for program in ["iptables", "ip6tables"] {
            for (table, builtin, target) in self.hooks() {
                self.unjump(program, table, builtin, &target);
                let _ = tool(program, &["-t", table, "-F", &target], None);
                let _ = tool(program, &["-t", table, "-X", &target], None);
            }
        }
        for set in self.saved()?.0 {
            let _ = tool("ipset", &["destroy", &set], None);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grant of a service with an idle timer counts only while its idle entry lives; a
    /// service without one needs none; entries of unknown sets never count. Also at scale:
    /// 20,000 grants with their idle entries are read in one linear pass.
    #[test]
    fn live_grants_need_their_idle_entry_where_the_service_has_one() {
        let sets: Vec<(String, SetId)> = [
            SetId::grant("vpn", Family::V4),
            SetId::idle("vpn", Family::V4),
            SetId::grant("ssh", Family::V4),
        ]
        .into_iter()
        .map(|id| (id.ipset_name("t"), id))
        .collect();
        let entry = |set: &SetId, address: &str| Entry {
            set: set.ipset_name("t"),
            address: address.parse().unwrap(),
            remaining: Duration::from_secs(30),
            owner: "alice".into(),
        };
        let (vpn, vpn_idle, ssh) = (&sets[0].1, &sets[1].1, &sets[2].1);
        let entries = vec![
            entry(vpn, "192.0.2.1"),
            entry(vpn_idle, "192.0.2.1"),
            entry(vpn, "192.0.2.2"), // its idle timer lapsed
            entry(ssh, "192.0.2.3"),
            Entry {
                set: "t-other".into(),
                ..entry(ssh, "192.0.2.4")
            },
        ];
        let live: Vec<String> = live_entries(&sets, &entries)
            .into_iter()
            .map(|(e, id)| format!("{} {}", id.service, e.address))
            .collect();
        assert_eq!(live, ["vpn 192.0.2.1", "ssh 192.0.2.3"]);

        let many: Vec<Entry> = (0..20_000u32)
            .flat_map(|n| {
                let address = std::net::Ipv4Addr::from(0x0a00_0000 + n).to_string();
                [entry(vpn, &address), entry(vpn_idle, &address)]
            })
            .collect();
        assert_eq!(live_entries(&sets, &many).len(), 20_000);
    }

    /// Golden bytes: the ADD message `ipset add t4 203.0.113.10 timeout 30 comment "alice"`
    /// sends (from strace on this kernel), minus the protocol version byte we pin to 6.
    #[test]
    fn add_message_matches_ipset() {
        let m = ipset_message(
            "t4",
            "203.0.113.10".parse().unwrap(),
            Some((Duration::from_secs(30), "alice")),
        );
        let bytes = m.finish(1);
        let data: &[u8] = &[
            0x0c, 0x00, 0x01, 0x80, 0x08, 0x00, 0x01, 0x40, 0xcb, 0x00, 0x71, 0x0a, 0x08, 0x00,
            0x06, 0x40, 0x00, 0x00, 0x00, 0x1e, 0x0a, 0x00, 0x1a, 0x00, 0x61, 0x6c, 0x69, 0x63,
            0x65, 0x00, 0x00, 0x00, 0x08, 0x00, 0x09, 0x40, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(bytes.len(), 80);
        assert_eq!(&bytes[bytes.len() - data.len()..], data);
        assert_eq!(&bytes[16..20], &[2, 0, 0, 0]);
    }

    #[test]
    fn names_fit_and_save_parses() {
        assert_eq!(set_name("spad", "ssh", false, false), "spad-a4-ssh");
        let long = set_name("spad", "a-very-long-service-name-of-32ch", true, true);
        assert!(long.len() <= 31, "{long}");
        let (sets, entries) = parse_save("create spad-a4-ssh hash:ip family inet\nadd spad-a4-ssh 203.0.113.10 timeout 29 comment \"alice\"\nadd x garbage\n");
        assert_eq!(sets, vec!["spad-a4-ssh"]);
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0].remaining.as_secs(), entries[0].owner.as_str()),
            (29, "alice")
        );
    }
}
