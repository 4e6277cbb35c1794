//! Firewall backends: what the daemon asks of a firewall, and the implementations.
//!
//! The static part (chains, rules, empty sets) is installed once at start and on reload,
//! atomically. Every grant is then a set element with its own timeout, added over netlink, so
//! expiry lives in the kernel and a crashed daemon leaves nothing open longer than granted.

use std::net::IpAddr;
use std::time::Duration;

use crate::config::{Conceal, Config};
use crate::net::{PortProto, Proto};

pub mod established;
pub mod guard;
pub mod iptables;
pub mod lock;
pub mod memory;
pub mod netlink;
pub mod nftables;
pub mod plan;
mod remembered;

/// One grant to install: `address` may reach `service` for `timeout` (and, for services with
/// an idle timeout, only while it keeps sending traffic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub address: IpAddr,
    pub service: String,
    pub timeout: Duration,
    pub idle: Option<Duration>,
    /// Who asked: a client name or `door:NAME`; stored as the element's comment.
    pub owner: String,
}

/// A grant as found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveGrant {
    pub address: IpAddr,
    pub service: String,
    pub remaining: Duration,
    pub owner: String,
}

/// What the kernel holds now: the live grants and the blacklist, read together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelView {
    pub grants: Vec<LiveGrant>,
    pub blacklisted: Vec<(IpAddr, Duration)>,
}

/// Reads the kernel's grants and blacklist on a thread other than the event loop's, through
/// sockets of its own: `spad status`, `spad list` and a metrics scrape dump every set element
/// (a tenth of a second with 20,000 grants), which must not stall the packets meanwhile. It
/// shares nothing with the backend it came from, and only reads.
pub trait KernelReader: Send {
    fn read(&mut self) -> anyhow::Result<KernelView>;
}

/// What a firewall backend does for the daemon.
pub trait Firewall {
    /// Short name for logs (`nftables`, `iptables`, `memory`).
    fn name(&self) -> &'static str;
    /// Learns `config`'s layout (set names, idle services) without touching the kernel: for
    /// command-line tools acting on a running daemon's firewall.
    fn attach(&mut self, config: &Config);
    /// Installs (or atomically replaces) the static ruleset for `config`, keeping live grants
    /// that `config` still allows and dropping the rest. Returns how many were kept.
    fn install(&mut self, config: &Config) -> anyhow::Result<usize>;
    /// Adds or refreshes grants, all in one kernel transaction.
    fn grant(&mut self, grants: &[Access]) -> anyhow::Result<()>;
    /// Removes any grant of `address` for `services` (absent grants are fine).
    fn revoke(&mut self, address: IpAddr, services: &[String]) -> anyhow::Result<()>;
    /// The grants currently live in the kernel.
    fn list(&mut self) -> anyhow::Result<Vec<LiveGrant>>;
    /// Puts a source on the knock blacklist for `duration` (kernel-side, survives restarts).
    fn blacklist(&mut self, address: IpAddr, duration: Duration) -> anyhow::Result<()>;
    /// Sources currently on the blacklist with their remaining time.
    fn blacklisted(&mut self) -> anyhow::Result<Vec<(IpAddr, Duration)>>;
    /// Removes every grant (not the blacklist); the protection stays in place.
    fn flush(&mut self) -> anyhow::Result<()>;
    /// A fingerprint of the protection as the kernel holds it now (tables, chains, rules, sets,
    /// jumps; never set elements): it changes when anyone alters or removes any of it.
    /// Empty when nothing is installed.
    fn protection(&mut self) -> anyhow::Result<String>;
    /// Rebuilds the protection from scratch after someone damaged it, keeping the grants that
    /// survived and `config` still allows. Returns how many were kept.
    fn repair(&mut self, config: &Config) -> anyhow::Result<usize> {
        self.install(config)
    }
    /// Learns of an element added or removed in the kernel by anyone (from the nftables
    /// monitor), so a repair restores what is really granted.
    fn observe_element(&mut self, _added: bool, _element: &nftables::Carried) {}
    /// Re-reads the live grants from the kernel into what a repair would restore: after the
    /// monitor lost events, so a grant revoked meanwhile is not brought back.
    fn resync_grants(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Removes everything this backend installed: protected ports become reachable by all.
    /// Only `spad uninstall` (and benchmarks) call this.
    fn remove(&mut self) -> anyhow::Result<()>;
    /// The live grants and the blacklist, in one read of the kernel where the backend can.
    fn view(&mut self) -> anyhow::Result<KernelView> {
        Ok(KernelView {
            grants: self.list()?,
            blacklisted: self.blacklisted()?,
        })
    }
    /// A reader for another thread (see [`KernelReader`]); `None` if this backend has none,
    /// and the caller reads through [`Firewall::view`] instead.
    fn reader(&self) -> Option<Box<dyn KernelReader>> {
        None
    }
}

/// Whether a live grant is still allowed by `config` (its service exists and its owner, if a
/// client, may still use it).
pub fn still_allowed(config: &Config, grant: &LiveGrant) -> bool {
    if !config.services.contains_key(&grant.service) {
        return false;
    }
    if let Some(door) = grant.owner.strip_prefix("door:") {
        return config
            .doors
            .doors
            .iter()
            .any(|d| d.name == door && d.services.contains(&grant.service))
            || config
                .doors
                .totp
                .iter()
                .any(|d| d.name == door && d.enabled && d.services.contains(&grant.service));
    }
    if let Some(name) = grant.owner.strip_prefix("fwknop:") {
        return config
            .fwknop_clients
            .get(name)
            .is_some_and(|c| c.services.contains(&grant.service));
    }
    config
        .clients
        .get(&grant.owner)
        .is_some_and(|c| c.services.contains(&grant.service))
}

/// Ports that must answer like the protected ones (see `conceal`) besides the services: the
/// SPA port (when sniffed), every static and one-time knock port, decoys, each TOTP door's
/// first port and port range, and every port between a door's lowest and highest knock port
/// (the capture watches those too: hits there reset progress). A scan then finds every
/// watched port answering alike. A port in such a range that something `listening` on is
/// left out (a public service there must not be locked out); named knock ports never are.
pub fn hidden_ports(
    config: &Config,
    listening: &[PortProto],
) -> (Vec<PortProto>, Vec<(Proto, u16, u16)>) {
    let mut ports = Vec::new();
    let mut ranges = Vec::new();
    if config.server.capture == crate::config::CaptureMode::AfPacket {
        ports.push(PortProto {
            port: config.server.port,
            proto: Proto::Udp,
        });
    }
    for door in &config.doors.doors {
        ports.extend(door.sequence.iter().chain(&door.close_sequence).copied());
        if let Some(Ok((lines, _))) = door
            .one_time_file
            .as_deref()
            .map(crate::knock::engine::read_one_time)
        {
            ports.extend(lines.into_iter().flat_map(|(_, seq)| seq));
        }
    }
    ports.extend(config.doors.decoys.iter().copied());
    for door in config.doors.totp.iter().filter(|d| d.enabled) {
        ports.push(PortProto {
            port: door.first_port,
            proto: door.proto,
        });
    }
    let mut pieces = Vec::new();
    for watch in crate::knock::engine::watched_ranges(config) {
        if watch.low == watch.high {
            continue; // single ports (decoys, TOTP first ports) are in `ports` already
        }
        let exempt = |port: u16| {
            let p = PortProto {
                port,
                proto: watch.proto,
            };
            listening.contains(&p) && !ports.contains(&p)
        };
        let mut low = u32::from(watch.low);
        for port in watch.low..=watch.high {
            if exempt(port) {
                if low < u32::from(port) {
                    pieces.push((watch.proto, low as u16, port - 1));
                }
                low = u32::from(port) + 1;
            }
        }
        if low <= u32::from(watch.high) {
            pieces.push((watch.proto, low as u16, watch.high));
        }
    }
    for (proto, low, high) in pieces {
        if low == high {
            ports.push(PortProto { port: low, proto });
        } else {
            ranges.push((proto, low, high));
        }
    }
    ports.sort();
    ports.dedup();
    ranges.sort();
    ranges.dedup();
    (ports, ranges)
}

/// Per protocol, the ports as text items (single ports, then `low{range_sep}high` ranges),
/// sorted and deduplicated; protocols with nothing are left out.
pub fn port_items(
    ports: &[PortProto],
    ranges: &[(Proto, u16, u16)],
    range_sep: &str,
) -> Vec<(Proto, Vec<String>)> {
    let mut out = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        let mut items: Vec<String> = ports
            .iter()
            .filter(|p| p.proto == proto)
            .map(|p| p.port.to_string())
            .collect();
        items.sort_by_key(|i| i.parse::<u32>().unwrap_or(0));
        items.dedup();
        items.extend(
            ranges
                .iter()
                .filter(|r| r.0 == proto)
                .map(|r| format!("{}{range_sep}{}", r.1, r.2)),
        );
        if !items.is_empty() {
            out.push((proto, items));
        }
    }
    out
}

/// The verdict text for a port that strangers must not reach, per `conceal` and protocol, in
/// nftables syntax (`drop`, `reject with tcp reset`, `reject`) or iptables target syntax.
pub fn conceal_verdict(conceal: Conceal, proto: Proto, nft: bool) -> &'static str {
    match (conceal, proto, nft) {
        (Conceal::Drop, _, true) => "drop",
        (Conceal::Drop, _, false) => "-j DROP",
        (Conceal::Closed, Proto::Tcp, true) => "reject with tcp reset",
        (Conceal::Closed, Proto::Tcp, false) => "-j REJECT --reject-with tcp-reset",
        // The default ICMP(v6) port unreachable: what the kernel sends for a closed UDP port,
        // under the same rate limit (icmp_send).
        (Conceal::Closed, Proto::Udp, true) => "reject",
        (Conceal::Closed, Proto::Udp, false) => "-j REJECT",
    }
}

/// Runs a firewall tool (`nft`, `iptables-restore`, `ipset`, ...) with `input` on stdin and
/// returns its stdout. Only for install, listing and removal: grants never spawn processes.
/// The tool processes this daemon started (`nft -f`, newest last, a bounded few): the guard
/// tells spad's own ruleset changes from anyone else's by the process the kernel names for
/// each committed transaction.
static OWN_TOOLS: std::sync::Mutex<std::collections::VecDeque<u32>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const OWN_TOOLS_KEPT: usize = 64;

/// Whether netlink port `port` is one of the tools this daemon started (a process's first
/// netlink socket gets its process id as port; spad itself changes the structure of its
/// table only through `nft`, so its own sockets need not be known). A port that another
/// process in the same network namespace happens to share (another pid namespace's `nft`)
/// counts as spad's: the guard then behaves as it did before it looked at ports.
pub(crate) fn changed_by_us(port: u32) -> bool {
    OWN_TOOLS
        .lock()
        .map(|tools| tools.contains(&port))
        .unwrap_or(false)
}

fn remember_tool(pid: u32) {
    if let Ok(mut tools) = OWN_TOOLS.lock() {
        if tools.len() == OWN_TOOLS_KEPT {
            tools.pop_front();
        }
        tools.push_back(pid);
    }
}

pub(crate) fn run_tool(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    package: &str,
) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{program}` (install the {package} package)"))?;
    remember_tool(child.id());
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `spad uninstall`: removes the protection for good, loudly. Refused while a daemon holds
/// the state directory, since it would (rightly) put the protection back at once.
pub fn uninstall(config: &Config) -> anyhow::Result<()> {
    if let Some(pid) = lock::StateLock::holder(&config.server.state_dir, &config.server.table) {
        anyhow::bail!(
            "spad (pid {pid}) is running on {} (table {}) and keeps the protection in place: stop it first",
            config.server.state_dir.display(),
            config.server.table
        );
    }
    open(config)?.remove()?;
    eprintln!(
        "spad: WARNING: removed spad's protection (table {}): every protected port is now reachable by everyone",
        config.server.table
    );
    Ok(())
}

/// Opens the backend `config` asks for (`auto`: nftables if the kernel speaks it, else iptables).
pub fn open(config: &Config) -> anyhow::Result<Box<dyn Firewall>> {
    use crate::config::BackendChoice;
    let table = config.server.table.clone();
    let nft = match config.server.backend {
        BackendChoice::Nftables => true,
        BackendChoice::Iptables => false,
        BackendChoice::Auto => nftables::available(),
    };
    let mut firewall: Box<dyn Firewall> = if nft {
        Box::new(nftables::Nftables::open(&table)?)
    } else {
        Box::new(iptables::Iptables::open(&table)?)
    };
    firewall.attach(config);
    Ok(firewall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_ranges_are_hidden_except_ports_with_a_listener() {
        let config = Config::parse(
            std::path::Path::new("t.toml"),
            "[server]\nprivate-key = \"k\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n[doors.ops]\nsequence = [\"7000/tcp\", \"8000/udp\", \"9000/tcp\"]\nservices = [\"ssh\"]\n",
        )
        .unwrap();
        let tcp = |port| PortProto {
            port,
            proto: Proto::Tcp,
        };
        let (ports, ranges) = hidden_ports(&config, &[]);
        assert!(ports.contains(&tcp(7000)) && ports.contains(&tcp(9000)));
        assert_eq!(ranges, vec![(Proto::Tcp, 7000, 9000)]);
        // A public service listening between the knock ports is not concealed; a knock port
        // with a listener still is.
        let (ports, ranges) = hidden_ports(&config, &[tcp(8080), tcp(7000), tcp(8999)]);
        assert_eq!(
            ranges,
            vec![(Proto::Tcp, 7000, 8079), (Proto::Tcp, 8081, 8998)]
        );
        assert!(ports.contains(&tcp(9000)) && !ports.contains(&tcp(8999)));
    }
}
