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
use std::time::{Duration, Instant};

use anyhow::Context;

use super::established::Observed;
use super::netlink::{
    attributes, Message, Socket, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST,
};
use super::plan::{Family, Plan, PortMatch, Rule, SetId, SetRole, Source, Verdict};
use super::remembered::{Mailbox, Remembered, Seen};
use super::{still_allowed, Access, Firewall, KernelReader, KernelView, LiveGrant};
use crate::config::Config;
use crate::net::Proto;

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
    let family = if v6 { Family::V6 } else { Family::V4 };
    if idle {
        SetId::idle(service, family).nft_name()
    } else {
        SetId::grant(service, family).nft_name()
    }
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

/// An element as read from the kernel: its set, address, timeout, time left and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub set: String,
    pub address: IpAddr,
    pub timeout: Duration,
    pub remaining: Duration,
    pub owner: String,
}

/// Milliseconds as nft text: never rounded up, so a reinstall never extends a grant.
fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

fn ip(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// `tcp dport { 22, 7000-9000 }`.
fn ports(m: &PortMatch) -> String {
    format!("{} dport {{ {} }}", m.proto.name(), m.texts("-").join(", "))
}

fn iif(iif: &Option<String>) -> Option<String> {
    iif.as_ref().map(|i| format!("iifname \"{i}\""))
}

fn source(source: &Source, family: Option<Family>) -> Option<String> {
    let ip = ip(family.unwrap_or(Family::V4));
    match source {
        Source::Any => None,
        Source::Nets(nets) => {
            let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
            Some(format!("{ip} saddr {{ {} }}", list.join(", ")))
        }
        Source::Granted { grant, idle } => {
            let mut m = format!("{ip} saddr @{}", grant.nft_name());
            if let Some(idle) = idle {
                let _ = write!(m, " {ip} saddr @{}", idle.nft_name());
            }
            Some(m)
        }
    }
}

fn verdict(verdict: Verdict, proto: Proto) -> String {
    match verdict {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Conceal(conceal) => super::conceal_verdict(conceal, proto, true).into(),
        Verdict::Dnat(target) => format!("dnat {} to {target}", ip(Family::of(target.ip()))),
    }
}

/// One plan rule as an nft rule line.
pub fn render_rule(rule: &Rule) -> String {
    match rule {
        Rule::Established => "ct state established,related accept".into(),
        Rule::Flow(f) => format!(
            "{ip} saddr {} tcp sport {} {ip} daddr {} tcp dport {} accept",
            f.remote.ip(),
            f.remote.port(),
            f.local.ip(),
            f.local.port(),
            ip = ip(Family::of(f.remote.ip()))
        ),
        Rule::Ports {
            family,
            iif: interface,
            ports: m,
            source: from,
            verdict: v,
        } => [
            iif(interface),
            Some(ports(m)),
            source(from, *family),
            Some(verdict(*v, m.proto)),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" "),
        Rule::Refresh {
            family,
            iif: interface,
            ports: m,
            set,
            timeout,
        } => {
            let (ip, set) = (ip(*family), set.nft_name());
            let head = [iif(interface), Some(ports(m))]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            format!(
                "{head} {ip} saddr @{set} update @{set} {{ {ip} saddr timeout {} }}",
                ms(*timeout)
            )
        }
        Rule::ToTarget {
            target,
            proto,
            dnat_from,
            verdict: v,
        } => {
            let mut line = format!(
                "{} daddr {} {} dport {}",
                ip(Family::of(target.ip())),
                target.ip(),
                proto.name(),
                target.port()
            );
            if let Some(public) = dnat_from {
                let _ = write!(line, " ct status dnat ct original proto-dst {public}");
            }
            let _ = write!(line, " {}", verdict(*v, *proto));
            line
        }
    }
}

/// The plan's sets as (name, `type ...; flags ...;`).
fn sets(plan: &Plan) -> Vec<(String, String)> {
    plan.sets
        .iter()
        .map(|s| {
            let family = match s.id.family {
                Family::V4 => "ipv4_addr",
                Family::V6 => "ipv6_addr",
            };
            let flags = if s.dynamic {
                "dynamic,timeout"
            } else {
                "timeout"
            };
            (s.id.nft_name(), format!("type {family}; flags {flags};"))
        })
        .collect()
}

/// One chain of the table: name, `type ... hook ...;` header and rules.
#[derive(Debug)]
struct Chain {
    name: &'static str,
    header: &'static str,
    rules: Vec<String>,
}

const NAT_CHAINS: [(&str, &str); 2] = [
    (
        "nat_prerouting",
        "type nat hook prerouting priority dstnat - 5; policy accept;",
    ),
    (
        "forward",
        "type filter hook forward priority filter - 5; policy accept;",
    ),
];

/// Every chain of the plan, with its rules rendered.
fn chains(plan: &Plan) -> Vec<Chain> {
    let lines = |rules: &[Rule]| rules.iter().map(render_rule).collect::<Vec<_>>();
    let mut out = vec![
        Chain {
            name: "refresh",
            header: "type filter hook prerouting priority -160; policy accept;",
            rules: lines(&plan.refresh),
        },
        Chain {
            name: "input",
            header: "type filter hook input priority filter - 5; policy accept;",
            rules: lines(&plan.input),
        },
    ];
    if plan.has_nat() {
        let [(nat_name, nat_header), (fwd_name, fwd_header)] = NAT_CHAINS;
        out.push(Chain {
            name: nat_name,
            header: nat_header,
            rules: lines(&plan.nat),
        });
        out.push(Chain {
            name: fwd_name,
            header: fwd_header,
            rules: lines(&plan.forward),
        });
    }
    out
}

fn write_chains(t: &mut String, table: &str, chains: &[Chain]) {
    let _ = writeln!(t, "table inet {table} {{");
    for chain in chains {
        let _ = writeln!(t, "  chain {} {{\n    {}", chain.name, chain.header);
        for rule in &chain.rules {
            let _ = writeln!(t, "    {rule}");
        }
        let _ = writeln!(t, "  }}");
    }
    let _ = writeln!(t, "}}");
}

/// The whole table as `nft -f` text, replacing any previous version atomically, with
/// `carried` elements re-added with the time they have left (in milliseconds, never more).
pub fn ruleset(config: &Config, table: &str, carried: &[Carried]) -> String {
    full_ruleset(&Plan::build(config, &Observed::default()), table, carried)
}

/// [`ruleset`] for a built plan.
pub fn full_ruleset(plan: &Plan, table: &str, carried: &[Carried]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{"
    );
    for (name, body) in sets(plan) {
        let list: Vec<String> = carried
            .iter()
            .filter(|c| c.set == name && !c.remaining.is_zero())
            .map(|c| {
                format!(
                    "{} timeout {} expires {} comment \"{}\"",
                    c.address,
                    ms(c.timeout.max(c.remaining)),
                    ms(c.remaining),
                    c.owner.replace('"', "")
                )
            })
            .collect();
        let elements = if list.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", list.join(", "))
        };
        let _ = writeln!(t, "  set {name} {{ {body}{elements} }}");
    }
    let _ = writeln!(t, "}}");
    write_chains(&mut t, table, &chains(plan));
    t
}

/// An in-place update of an existing table, as one `nft -f` transaction: sets `config` needs
/// are added if missing (existing ones keep their elements untouched, so a reload never
/// changes a grant's expiry), spad's chains are flushed and refilled, chains and sets
/// `config` no longer needs are deleted, and `prune` elements are removed.
pub fn update_ruleset(plan: &Plan, table: &str, existing: &Existing, prune: &[Carried]) -> String {
    let wanted_sets = sets(plan);
    let wanted_chains = chains(plan);
    let mut t = String::new();
    let _ = writeln!(t, "table inet {table} {{");
    for (name, body) in &wanted_sets {
        let _ = writeln!(t, "  set {name} {{ {body} }}");
    }
    let mut declared: Vec<(&str, &str)> =
        wanted_chains.iter().map(|c| (c.name, c.header)).collect();
    for (name, header) in NAT_CHAINS {
        if existing.chains.iter().any(|c| c == name) && !declared.iter().any(|d| d.0 == name) {
            declared.push((name, header));
        }
    }
    for (name, header) in &declared {
        let _ = writeln!(t, "  chain {name} {{ {header} }}");
    }
    let _ = writeln!(t, "}}");
    for (name, _) in &declared {
        let _ = writeln!(t, "flush chain inet {table} {name}");
    }
    for (name, _) in &declared {
        if !wanted_chains.iter().any(|c| c.name == *name) {
            let _ = writeln!(t, "delete chain inet {table} {name}");
        }
    }
    for set in &existing.sets {
        if !wanted_sets.iter().any(|(name, _)| name == set) {
            let _ = writeln!(t, "delete set inet {table} {set}");
        }
    }
    for c in prune {
        if wanted_sets.iter().any(|(name, _)| *name == c.set) {
            // add-then-delete: succeeds even if the element expired meanwhile.
            let _ = writeln!(
                t,
                "add element inet {table} {set} {{ {a} timeout 1s }}\ndelete element inet {table} {set} {{ {a} }}",
                set = c.set,
                a = c.address
            );
        }
    }
    write_chains(&mut t, table, &wanted_chains);
    t
}

/// What the kernel holds of a table: chain and set names, and every set element.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub elements: Vec<Carried>,
}

/// Grant elements that are live as the kernel enforces them: in the grant set and, where the
/// service has an idle set in the table, in the idle set too (an idle timer that lapsed ends
/// access although the grant element still counts down).
///
/// Linear in the number of elements: the idle elements are indexed first (this runs for every
/// `spad status`, list and metrics scrape, and before a repair, with any number of grants).
pub fn live_grants(existing: &Existing) -> Vec<(&Carried, SetId)> {
    let idle: std::collections::HashSet<(&str, IpAddr)> = existing
        .elements
        .iter()
        .map(|e| (e.set.as_str(), e.address))
        .collect();
    let sets: std::collections::HashSet<&str> = existing.sets.iter().map(String::as_str).collect();
    existing
        .elements
        .iter()
        .filter_map(|c| {
            let id = SetId::parse_nft(&c.set)?;
            (id.role == SetRole::Grant).then_some((c, id))
        })
        .filter(|(c, id)| {
            let idle_set = SetId::idle(&id.service, id.family).nft_name();
            !sets.contains(idle_set.as_str()) || idle.contains(&(idle_set.as_str(), c.address))
        })
        .collect()
}

/// Runs `nft` with `args`, feeding `input` on stdin; returns stdout.
fn nft(args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    super::run_tool("nft", args, input, "nftables")
}

const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
/// Attribute 1 names the table in table, chain, rule and set messages alike.
const NFTA_ANY_TABLE: u16 = 1;
/// `NFTA_SET_COUNT` (Linux 6.x): a set's current number of elements.
const NFTA_SET_COUNT: u16 = 20;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// Names (attribute `name_attr`) of the objects in a GETCHAIN/GETSET dump that belong to
/// `table` (attribute `table_attr`).
pub fn parse_names(
    bodies: &[Vec<u8>],
    table: &str,
    table_attr: u16,
    name_attr: u16,
) -> Vec<String> {
    bodies
        .iter()
        .filter_map(|body| {
            let attrs = attributes(body.get(4..)?);
            let of = |kind| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| text(v));
            (of(table_attr)? == table).then_some(())?;
            of(name_attr)
        })
        .collect()
}

/// Parses the bodies of a GETSETELEM dump of `set` into elements (times in milliseconds, as
/// the kernel keeps them). Elements that do not parse are skipped.
pub fn parse_element_dump(set: &str, bodies: &[Vec<u8>]) -> Vec<Carried> {
    let mut out = Vec::new();
    for body in bodies {
        let Some(attrs) = body.get(4..).map(attributes) else {
            continue;
        };
        for (_, list) in attrs
            .iter()
            .filter(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
        {
            for (_, elem) in attributes(list)
                .iter()
                .filter(|(k, _)| *k == NFTA_LIST_ELEM)
            {
                let fields = attributes(elem);
                let get = |kind| fields.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
                let address = get(NFTA_SET_ELEM_KEY)
                    .and_then(|key| {
                        attributes(key)
                            .into_iter()
                            .find(|(k, _)| *k == NFTA_DATA_VALUE)
                    })
                    .and_then(|(_, value)| match value.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
                        _ => None,
                    });
                let Some(address) = address else { continue };
                let millis = |kind| Duration::from_millis(get(kind).and_then(be_u64).unwrap_or(0));
                // udata: TLV of (type u8, len u8, value); the comment is NUL-terminated.
                let owner = get(NFTA_SET_ELEM_USERDATA)
                    .and_then(|u| {
                        let (kind, len) = (*u.first()?, usize::from(*u.get(1)?));
                        if kind != NFTNL_UDATA_SET_ELEM_COMMENT {
                            return None;
                        }
                        Some(text(u.get(2..2 + len)?))
                    })
                    .unwrap_or_default();
                out.push(Carried {
                    set: set.to_string(),
                    address,
                    timeout: millis(NFTA_SET_ELEM_TIMEOUT),
                    remaining: millis(NFTA_SET_ELEM_EXPIRATION),
                    owner,
                });
            }
        }
    }
    out
}

/// One netlink dump request on `socket` (an absent table or set reads as empty).
fn dump(socket: &mut Socket, kind: u16, attrs: &[(u16, &str)]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut m = Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        NLM_F_REQUEST | NLM_F_DUMP,
        NFPROTO_INET,
        0,
    );
    for (attr, value) in attrs {
        m.attr_str(*attr, value);
    }
    match socket.dump(m) {
        Ok(bodies) => Ok(bodies),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(e).context("reading the nftables table over netlink"),
    }
}

/// Chains, sets and elements of `table`, read over netlink.
fn read_table(socket: &mut Socket, table: &str) -> anyhow::Result<Existing> {
    Ok(read_table_once(socket, table)?.0)
}

/// Reads of a table made while others change it: a dump is not one snapshot.
const CONSISTENT_READ_TRIES: usize = 3;

/// Like [`read_table`], and whether the read is one snapshot: every message of it carries
/// the ruleset generation it was made in (`nfgenmsg.res_id`, its low 16 bits), and a
/// transaction committed meanwhile changes it. An element the dump met twice (a set being
/// resized under it) is kept once.
fn read_table_once(socket: &mut Socket, table: &str) -> anyhow::Result<(Existing, bool)> {
    let mut generations = std::collections::BTreeSet::new();
    let mut seen = |bodies: &[Vec<u8>]| {
        for body in bodies {
            if let Some(g) = body.get(2..4) {
                generations.insert([g[0], g[1]]);
            }
        }
    };
    let chain_bodies = dump(socket, NFT_MSG_GETCHAIN, &[])?;
    seen(&chain_bodies);
    let chains = parse_names(&chain_bodies, table, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME);
    let set_bodies = dump(socket, NFT_MSG_GETSET, &[(NFTA_SET_TABLE, table)])?;
    seen(&set_bodies);
    let sets = parse_names(&set_bodies, table, NFTA_SET_TABLE, NFTA_SET_NAME);
    let mut elements = Vec::new();
    for set in &sets {
        let bodies = dump(
            socket,
            NFT_MSG_GETSETELEM,
            &[
                (NFTA_SET_ELEM_LIST_TABLE, table),
                (NFTA_SET_ELEM_LIST_SET, set),
            ],
        )?;
        seen(&bodies);
        let mut met = std::collections::HashSet::new();
        elements.extend(
            parse_element_dump(set, &bodies)
                .into_iter()
                .filter(|c| met.insert(c.address)),
        );
    }
    let consistent = generations.len() <= 1;
    Ok((
        Existing {
            chains,
            sets,
            elements,
        },
        consistent,
    ))
}

/// The live grants and the blacklist of a table's view.
fn view_of(existing: &Existing) -> KernelView {
    KernelView {
        grants: live_grants(existing)
            .into_iter()
            .map(|(c, id)| LiveGrant {
                address: c.address,
                service: id.service,
                remaining: c.remaining,
                owner: c.owner.clone(),
            })
            .collect(),
        blacklisted: existing
            .elements
            .iter()
            .filter(|c| SetId::parse_nft(&c.set).is_some_and(|id| id.role == SetRole::Blacklist))
            .map(|c| (c.address, c.remaining))
            .collect(),
    }
}

/// Reads spad's table on a netlink socket of its own (see [`KernelReader`]).
#[derive(Debug)]
struct TableReader {
    table: String,
    /// Where the idle timers it saw go, for the backend's memory (see [`Seen`]).
    seen: Mailbox,
}

impl KernelReader for TableReader {
    /// Reads again (a few times at most) while grants land during the read; under a steady
    /// stream of grants the last read is used, each element once, and may miss or include
    /// the grants made while it ran.
    fn read(&mut self) -> anyhow::Result<KernelView> {
        let mut socket = Socket::open()
            .context("cannot open a netfilter netlink socket (needs CAP_NET_ADMIN)")?;
        let mut last = None;
        for _ in 0..CONSISTENT_READ_TRIES {
            let started = Instant::now();
            let (existing, consistent) = read_table_once(&mut socket, &self.table)?;
            last = Some((existing, started));
            if consistent {
                break;
            }
        }
        let Some((existing, started)) = last else {
            return Ok(KernelView::default());
        };
        // Even a read that was not one snapshot shows each idle timer it met at a moment
        // after `started`, with the time it had left then: a lower bound of its lapse.
        let seen = Seen::of(&existing, started);
        if !seen.is_empty() {
            self.seen.leave(seen);
        }
        Ok(view_of(&existing))
    }
}

/// The nftables backend.
#[derive(Debug)]
pub struct Nftables {
    table: String,
    socket: Socket,
    /// Services with an idle set, from the installed config.
    idle_services: Vec<String>,
    remembered: Remembered,
    /// What readers on other threads saw, for `remembered`.
    seen: Mailbox,
}

impl Nftables {
    pub fn open(table: &str) -> anyhow::Result<Self> {
        let socket = Socket::open()
            .context("cannot open a netfilter netlink socket (needs CAP_NET_ADMIN)")?;
        Ok(Self {
            table: table.to_string(),
            socket,
            idle_services: Vec::new(),
            remembered: Remembered::default(),
            seen: Mailbox::default(),
        })
    }

    fn dump(&mut self, kind: u16, attrs: &[(u16, &str)]) -> anyhow::Result<Vec<Vec<u8>>> {
        dump(&mut self.socket, kind, attrs)
    }

    /// Chains, sets and elements of spad's table, read over netlink (milliseconds exact).
    pub fn existing(&mut self) -> anyhow::Result<Existing> {
        let started = Instant::now();
        let existing = read_table(&mut self.socket, &self.table)?;
        // A missing table keeps the memory: it is what a repair restores from.
        if !existing.sets.is_empty() {
            self.remembered.replace_from(&existing, started);
        }
        Ok(existing)
    }

    /// Takes in what a reader on another thread saw since the last time.
    fn learn_seen(&mut self) {
        if let Some(seen) = self.seen.take() {
            self.remembered.learn(&seen);
        }
    }

    /// Elements of `existing` that `config` no longer allows, or whose idle timer lapsed.
    fn prune(config: &Config, existing: &Existing) -> Vec<Carried> {
        // Indexed by (set, address): a repair with many grants stays linear.
        let live: std::collections::HashSet<(&str, IpAddr)> = live_grants(existing)
            .into_iter()
            .map(|(c, _)| (c.set.as_str(), c.address))
            .collect();
        existing
            .elements
            .iter()
            .filter(|c| match SetId::parse_nft(&c.set) {
                Some(SetId {
                    role: SetRole::Grant,
                    service,
                    ..
                }) => {
                    !live.contains(&(c.set.as_str(), c.address))
                        || !still_allowed(
                            config,
                            &LiveGrant {
                                address: c.address,
                                service,
                                remaining: c.remaining,
                                owner: c.owner.clone(),
                            },
                        )
                }
                Some(SetId {
                    role: SetRole::Idle,
                    service,
                    ..
                }) => config
                    .services
                    .get(&service)
                    .is_none_or(|s| s.idle_timeout.is_none()),
                Some(SetId {
                    role: SetRole::Blacklist,
                    ..
                })
                | None => false,
            })
            .cloned()
            .collect()
    }

    fn learn(&mut self, config: &Config) {
        self.idle_services = config
            .services
            .values()
            .filter(|s| s.idle_timeout.is_some())
            .map(|s| s.name.clone())
            .collect();
    }

    fn kept(existing: &Existing, prune: &[Carried]) -> usize {
        live_grants(existing)
            .into_iter()
            .filter(|(c, _)| !prune.contains(c))
            .count()
    }
}

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn attach(&mut self, config: &Config) {
        self.learn(config);
    }

    fn install(&mut self, config: &Config) -> anyhow::Result<usize> {
        let existing = self.existing()?;
        let prune = Self::prune(config, &existing);
        let plan = Plan::build(config, &Observed::read(config));
        let text = update_ruleset(&plan, &self.table, &existing, &prune);
        if nft(&["-f", "-"], Some(&text)).is_err() {
            // The table holds something an in-place update cannot reconcile (a set or chain
            // of another shape): replace it whole, carrying the grants.
            return self.repair(config);
        }
        self.learn(config);
        Ok(Self::kept(&existing, &prune))
    }

    fn repair(&mut self, config: &Config) -> anyhow::Result<usize> {
        let read_at = Instant::now();
        let mut existing = self.existing()?;
        if existing.sets.is_empty() {
            // The whole table was deleted: restore what this daemon can show is still due
            // (an idle timer only until it lapses as last seen: see `super::remembered`).
            self.learn_seen();
            existing = self.remembered.alive(read_at);
        }
        let prune = Self::prune(config, &existing);
        let plan = Plan::build(config, &Observed::read(config));
        // Time passes between reading and loading: take it off, so nothing is extended.
        let elapsed = read_at.elapsed();
        let carried: Vec<Carried> = existing
            .elements
            .iter()
            .filter(|c| !prune.contains(c) && c.remaining > elapsed)
            .map(|c| Carried {
                remaining: c.remaining - elapsed,
                ..c.clone()
            })
            .collect();
        let text = full_ruleset(&plan, &self.table, &carried);
        nft(&["-f", "-"], Some(&text)).context("loading the ruleset")?;
        self.learn(config);
        Ok(Self::kept(&existing, &prune))
    }

    fn grant(&mut self, grants: &[Access]) -> anyhow::Result<()> {
        let now = Instant::now();
        self.remembered.forget_expired(now);
        for g in grants {
            let family = if g.address.is_ipv6() {
                Family::V6
            } else {
                Family::V4
            };
            let element = |set: SetId, timeout| Carried {
                set: set.nft_name(),
                address: g.address,
                timeout,
                remaining: timeout,
                owner: g.owner.clone(),
            };
            let grant = element(SetId::grant(&g.service, family), g.timeout);
            self.remembered.add(grant, now + g.timeout, now);
            if let Some(idle) = g.idle {
                // Lapses one idle period from now at the earliest (never past the grant).
                let timer = element(SetId::idle(&g.service, family), idle);
                self.remembered.add_idle(timer, now + idle, now);
            }
        }
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
                self.remembered.remove(&set, address);
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
        Ok(self.view()?.grants)
    }

    fn view(&mut self) -> anyhow::Result<KernelView> {
        Ok(view_of(&self.existing()?))
    }

    fn reader(&self) -> Option<Box<dyn KernelReader>> {
        Some(Box::new(TableReader {
            table: self.table.clone(),
            seen: self.seen.clone(),
        }))
    }

    fn blacklist(&mut self, address: IpAddr, duration: Duration) -> anyhow::Result<()> {
        let set = if address.is_ipv6() {
            "blacklist6"
        } else {
            "blacklist4"
        };
        let now = Instant::now();
        self.remembered.add(
            Carried {
                set: set.to_string(),
                address,
                timeout: duration,
                remaining: duration,
                owner: "blacklist".into(),
            },
            now + duration,
            now,
        );
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
        Ok(self.view()?.blacklisted)
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        // Read first: the read refills the memory, which must keep only the blacklist.
        let existing = self.existing()?;
        self.remembered
            .retain(|c| SetId::parse_nft(&c.set).is_some_and(|id| id.role == SetRole::Blacklist));
        let mut text = String::new();
        for set in &existing.sets {
            if SetId::parse_nft(set).is_some_and(|id| id.role != SetRole::Blacklist) {
                let _ = writeln!(text, "flush set inet {} {set}", self.table);
            }
        }
        if text.is_empty() {
            return Ok(());
        }
        nft(&["-f", "-"], Some(&text)).context("flushing the grant sets")?;
        Ok(())
    }

    fn observe_element(&mut self, added: bool, element: &Carried) {
        if !added {
            self.remembered.remove(&element.set, element.address);
            return;
        }
        let now = Instant::now();
        let left = if element.remaining.is_zero() {
            element.timeout
        } else {
            element.remaining
        };
        // The event is read a moment after the kernel committed it: `now + left` is late by
        // that moment (the loop drains the monitor on every turn).
        match SetId::parse_nft(&element.set) {
            Some(id) if id.role == SetRole::Idle => {
                self.remembered.add_idle(element.clone(), now + left, now);
            }
            Some(_) => self.remembered.add(element.clone(), now + left, now),
            None => {}
        }
    }

    /// The table, its chains, rules and sets as the kernel dumps them over netlink, without
    /// a single set element: grants come and go, the protection must not. Each message's
    /// attributes are kept byte for byte, except a set's element count (and the header, whose
    /// generation number changes with every grant). A millisecond or two however many grants are live; `nft -t list table`,
    /// which this replaced, reads every element (0.5 s with 40,000 grants, on the loop).
    fn protection(&mut self) -> anyhow::Result<String> {
        use std::fmt::Write as _;
        let table = self.table.clone();
        let mut out = String::new();
        for (kind, filtered) in [
            (NFT_MSG_GETTABLE, false),
            (NFT_MSG_GETCHAIN, false),
            (NFT_MSG_GETRULE, true),
            (NFT_MSG_GETSET, true),
        ] {
            let filter = [(NFTA_ANY_TABLE, table.as_str())];
            let bodies = self.dump(kind, if filtered { &filter } else { &[] })?;
            for body in bodies {
                let attributes = body.get(4..).unwrap_or_default();
                let ours = super::netlink::attributes(attributes)
                    .into_iter()
                    .any(|(k, v)| k == NFTA_ANY_TABLE && text(v) == table);
                if !ours {
                    continue;
                }
                let _ = write!(out, "{kind}:");
                for (attribute, value) in super::netlink::attributes(attributes) {
                    if kind == NFT_MSG_GETSET && attribute == NFTA_SET_COUNT {
                        continue; // how many elements: grants, not protection
                    }
                    let _ = write!(out, " {attribute}=");
                    for byte in value {
                        let _ = write!(out, "{byte:02x}");
                    }
                }
                out.push('\n');
            }
        }
        Ok(out)
    }

    fn resync_grants(&mut self) -> anyhow::Result<()> {
        self.existing().map(|_| ())
    }

    fn remove(&mut self) -> anyhow::Result<()> {
        nft(&["delete", "table", "inet", &self.table], None).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            std::path::Path::new("t.toml"),
            &format!("[server]\nprivate-key = \"k\"\n{extra}[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n[services.vpn]\nkind = \"vpn\"\nports = [\"51820/udp\"]\ntimeout = \"1h\"\nidle-timeout = \"4s\"\n"),
        )
        .unwrap()
    }

    /// The guard's fingerprint, against the real kernel in a network namespace of this test's
    /// own (needs root; says so and passes without it): a thousand grants, an expiry and a
    /// revoke leave it unchanged; a rule added, a chain flushed or the table deleted change it.
    #[test]
    fn the_fingerprint_ignores_grants_and_sees_every_tamper() {
        with_own_table("spadfp", |table, config, fw| {
            let clean = fw.protection()?;
            assert!(!clean.is_empty());
            let grants: Vec<Access> = (0..1000u32)
                .map(|i| Access {
                    address: std::net::Ipv4Addr::from(0x0ac9_0000 + i).into(),
                    service: if i % 2 == 0 { "ssh" } else { "vpn" }.into(),
                    timeout: Duration::from_secs(if i < 10 { 1 } else { 600 }),
                    idle: None,
                    owner: "alice".into(),
                })
                .collect();
            for chunk in grants.chunks(100) {
                fw.grant(chunk)?;
            }
            fw.revoke("10.201.0.20".parse()?, &["ssh".into()])?;
            // Ten of them expire in the kernel: polled, bounded.
            let short: Vec<IpAddr> = grants[..10].iter().map(|g| g.address).collect();
            let left = |fw: &mut Nftables| -> anyhow::Result<usize> {
                let existing = fw.existing()?;
                Ok(existing
                    .elements
                    .iter()
                    .filter(|e| short.contains(&e.address))
                    .count())
            };
            assert!(left(fw)? > 0);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while left(fw)? > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(left(fw)?, 0, "the 1 s grants expired");
            assert_eq!(fw.protection()?, clean, "grants are not protection");
            let nft_in_ns = |args: &[&str]| nft(args, None).map(|_| ());
            nft_in_ns(&[
                "add", "rule", "inet", table, "input", "tcp", "dport", "23", "accept",
            ])?;
            let added = fw.protection()?;
            assert_ne!(added, clean, "a rule added");
            fw.install(config)?;
            assert_eq!(fw.protection()?.len(), clean.len(), "reinstalled");
            let reinstalled = fw.protection()?;
            nft_in_ns(&["flush", "chain", "inet", table, "input"])?;
            assert_ne!(fw.protection()?, reinstalled, "a chain flushed");
            nft_in_ns(&["delete", "table", "inet", table])?;
            assert_eq!(fw.protection()?, "", "the table deleted");
            Ok(())
        });
    }

    /// Runs `test` in a network namespace of its own, on a thread of its own (`unshare` moves
    /// only the calling thread; threads it starts share the namespace), with `table`
    /// installed; skipped (and said so) without root and `nft`.
    fn with_own_table(
        table: &'static str,
        test: impl FnOnce(&'static str, &Config, &mut Nftables) -> anyhow::Result<()> + Send + 'static,
    ) {
        with_own_config(table, "", test);
    }

    /// [`with_own_table`] with `extra` config text (tables) after `[server]`.
    fn with_own_config(
        table: &'static str,
        extra: &'static str,
        test: impl FnOnce(&'static str, &Config, &mut Nftables) -> anyhow::Result<()> + Send + 'static,
    ) {
        if !rustix::process::geteuid().is_root() || !available() {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let run = move || -> anyhow::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            let config = config(&format!("table = \"{table}\"\n{extra}"));
            let mut fw = Nftables::open(table)?;
            fw.install(&config)?;
            test(table, &config, &mut fw)
        };
        std::thread::spawn(run).join().unwrap().unwrap();
    }

    /// The off-loop reader against the real kernel in a namespace of the test's own: a quiet
    /// table reads as one snapshot with every grant once; while another socket keeps
    /// granting, the read says it is not one snapshot and still lists each element once.
    #[test]
    fn the_kernel_reader_lists_each_grant_once_and_knows_a_moving_table() {
        with_own_table("spadrd", |table, _, fw| {
            let access = |i: u32| Access {
                address: std::net::Ipv4Addr::from(0x0ac9_0000 + i).into(),
                service: "ssh".into(),
                timeout: Duration::from_secs(600),
                idle: None,
                owner: "alice".into(),
            };
            let grants: Vec<Access> = (0..3000).map(access).collect();
            for chunk in grants.chunks(100) {
                fw.grant(chunk)?;
            }
            fw.blacklist("192.0.2.66".parse()?, Duration::from_secs(60))?;
            let mut reader = fw.reader().expect("nftables has a reader");
            let view = reader.read()?;
            assert_eq!(view.grants.len(), 3000);
            assert_eq!(view.blacklisted.len(), 1);
            let mut socket = Socket::open()?;
            assert!(
                read_table_once(&mut socket, table)?.1,
                "a quiet table: one snapshot"
            );
            // Another thread grants without pause while this one reads.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || -> anyhow::Result<u32> {
                    let mut fw = Nftables::open(table)?;
                    let mut n = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200_000 {
                        fw.grant(&[access(100_000 + n)])?;
                        n += 1;
                    }
                    Ok(n)
                })
            };
            let mut moving = false;
            for _ in 0..20 {
                let (existing, consistent) = read_table_once(&mut socket, table)?;
                let mut addresses: Vec<(String, IpAddr)> = existing
                    .elements
                    .iter()
                    .map(|c| (c.set.clone(), c.address))
                    .collect();
                let all = addresses.len();
                addresses.sort();
                addresses.dedup();
                assert_eq!(addresses.len(), all, "an element listed twice");
                moving |= !consistent;
                if moving {
                    break;
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let granted = writer.join().expect("writer")?;
            assert!(granted > 0);
            assert!(
                moving,
                "grants landed during the reads, and no read noticed"
            );
            Ok(())
        });
    }

    /// After the whole table was deleted, the repair restores an idle timer only while spad
    /// can show it has not lapsed (real kernel, own namespace): one lapsed since spad's own
    /// grant stays out, one re-armed behind spad's back and seen by an off-loop read comes
    /// back, and so does one granted after that read.
    #[test]
    fn a_repair_restores_only_idle_timers_known_to_be_alive() {
        const DOOR: &str =
            "[doors.ops]\nsequence = [\"7000/tcp\", \"8000/udp\"]\nservices = [\"vpn\"]\n";
        with_own_config("spadidle", DOOR, |table, config, fw| {
            let address = |last: u8| IpAddr::from([198, 51, 100, last]);
            let access = |last: u8, idle_ms: u64| Access {
                address: address(last),
                service: "vpn".into(),
                timeout: Duration::from_secs(3600),
                idle: Some(Duration::from_millis(idle_ms)),
                owner: "door:ops".into(),
            };
            let (lapsing, rearmed, late) = (1, 2, 3);
            fw.grant(&[access(lapsing, 300), access(rearmed, 300)])?;
            // Re-armed behind this backend's back (as traffic would), then seen by a reader.
            Nftables::open(table)?.grant(&[access(rearmed, 60_000)])?;
            let view = fw.reader().expect("nftables has a reader").read()?;
            assert_eq!(view.grants.len(), 2);
            fw.grant(&[access(late, 60_000)])?;
            // Watched through another backend: a read by `fw` would teach it the truth.
            let mut watcher = Nftables::open(table)?;
            let mut in_idle_set = |last: u8| -> anyhow::Result<bool> {
                Ok(watcher
                    .existing()?
                    .elements
                    .iter()
                    .any(|c| c.set == "i4_vpn" && c.address == address(last)))
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while in_idle_set(lapsing)? && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(!in_idle_set(lapsing)?, "the 300 ms idle timer lapsed");
            nft(&["delete", "table", "inet", table], None)?;
            fw.repair(config)?;
            let existing = fw.existing()?;
            let mut idle: Vec<IpAddr> = existing
                .elements
                .iter()
                .filter(|c| c.set == "i4_vpn")
                .map(|c| c.address)
                .collect();
            idle.sort();
            assert_eq!(idle, vec![address(rearmed), address(late)]);
            let mut granted: Vec<IpAddr> = existing
                .elements
                .iter()
                .filter(|c| c.set == "a4_vpn")
                .map(|c| c.address)
                .collect();
            granted.sort();
            assert_eq!(idle, granted, "a grant without its idle timer is not live");
            Ok(())
        });
    }

    fn element(set: &str, address: &str, remaining_ms: u64) -> Carried {
        Carried {
            set: set.into(),
            address: address.parse().unwrap(),
            timeout: Duration::from_secs(3),
            remaining: Duration::from_millis(remaining_ms),
            owner: "alice".into(),
        }
    }

    #[test]
    fn a_comment_is_bounded_in_bytes_and_its_length_byte_is_right() {
        let udata = comment_udata(&"\u{1F600}".repeat(100));
        assert_eq!(usize::from(udata[1]), udata.len() - 2);
        assert!(udata.len() - 2 <= MAX_COMMENT, "{}", udata.len());
        assert_eq!(udata.last(), Some(&0));
    }

    #[test]
    fn carried_time_is_milliseconds_never_rounded_up() {
        let text = ruleset(
            &config(""),
            "spad",
            &[
                element("a4_ssh", "198.51.100.7", 999),
                element("a4_ssh", "198.51.100.8", 0),
            ],
        );
        assert!(
            text.contains("198.51.100.7 timeout 3000ms expires 999ms comment \"alice\""),
            "{text}"
        );
        assert!(
            !text.contains("198.51.100.8"),
            "an expired element is not re-added"
        );
    }

    #[test]
    fn an_update_keeps_sets_flushes_chains_and_prunes() {
        let existing = Existing {
            chains: vec!["input".into(), "refresh".into(), "nat_prerouting".into()],
            sets: vec!["a4_ssh".into(), "a4_old".into()],
            elements: vec![element("a4_ssh", "198.51.100.7", 500)],
        };
        let prune = [element("a4_ssh", "198.51.100.7", 500)];
        let text = update_ruleset(
            &Plan::build(&config(""), &Observed::default()),
            "spad",
            &existing,
            &prune,
        );
        assert!(!text.contains("delete table"), "{text}");
        assert!(text.contains("  set a4_ssh { type ipv4_addr; flags timeout; }"));
        assert!(text.contains("flush chain inet spad input"));
        assert!(
            text.contains("delete chain inet spad nat_prerouting"),
            "{text}"
        );
        assert!(text.contains("delete set inet spad a4_old"));
        assert!(text.contains("delete element inet spad a4_ssh { 198.51.100.7 }"));
    }

    #[test]
    fn conceal_and_established_flows_render() {
        let observed = Observed {
            flows: vec![super::super::established::Flow {
                local: "203.0.113.1:22".parse().unwrap(),
                remote: "203.0.113.10:40000".parse().unwrap(),
            }],
            listening: Vec::new(),
        };
        let closed = full_ruleset(
            &Plan::build(&config("conceal = \"closed\"\n"), &observed),
            "spad",
            &[],
        );
        assert!(closed.contains(
            "ip saddr 203.0.113.10 tcp sport 40000 ip daddr 203.0.113.1 tcp dport 22 accept"
        ));
        assert!(
            closed.contains("tcp dport { 22 } reject with tcp reset"),
            "{closed}"
        );
        assert!(closed.contains("udp dport { 51820 } reject"), "{closed}");
        let dropped = ruleset(&config(""), "spad", &[]);
        assert!(dropped.contains("tcp dport { 22 } drop") && !dropped.contains("reject"));
    }

    #[test]
    fn idle_lapsed_grants_are_not_live() {
        let existing = Existing {
            chains: Vec::new(),
            sets: vec!["a4_vpn".into(), "i4_vpn".into(), "a4_ssh".into()],
            elements: vec![
                element("a4_vpn", "198.51.100.7", 3_000_000),
                element("a4_vpn", "198.51.100.8", 3_000_000),
                element("i4_vpn", "198.51.100.8", 2_000),
                element("a4_ssh", "198.51.100.7", 2_000),
            ],
        };
        let live: Vec<String> = live_grants(&existing)
            .iter()
            .map(|(c, id)| format!("{} {}", id.service, c.address))
            .collect();
        assert_eq!(live, vec!["vpn 198.51.100.8", "ssh 198.51.100.7"]);
    }

    #[test]
    fn element_dump_parses_and_garbage_is_skipped() {
        // A NEWSETELEM body has the same layout as a dump answer: reuse the message builder.
        let m = element_message(
            "spad",
            "a4_ssh",
            "198.51.100.7".parse().unwrap(),
            Some((Duration::from_millis(30_500), "alice")),
        );
        let bytes = m.finish(1);
        let elements = parse_element_dump("a4_ssh", &[bytes[16..].to_vec()]);
        assert_eq!(elements.len(), 1);
        assert_eq!(elements[0].timeout, Duration::from_millis(30_500));
        assert_eq!(elements[0].owner, "alice");
        assert!(parse_element_dump("a4_ssh", &[vec![1, 2, 3], bytes[16..40].to_vec()]).is_empty());
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
