//! The `[server]` section: key, port, capture, interfaces, state, firewall backend, time window.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::limits::MAX_WINDOW;
use super::span::{at, resolve, Located, Seconds};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawServer {
    private_key: Spanned<String>,
    #[serde(default = "default_port")]
    port: Spanned<u16>,
    #[serde(default)]
    capture: CaptureMode,
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    #[serde(default = "default_state_dir")]
    state_dir: String,
    #[serde(default)]
    backend: BackendChoice,
    #[serde(default = "default_table")]
    table: Spanned<String>,
    #[serde(default = "default_max_age")]
    max_age: Spanned<Seconds>,
    #[serde(default = "default_max_future")]
    max_future: Spanned<Seconds>,
    #[serde(default)]
    flush_on_exit: bool,
    #[serde(default)]
    conceal: Conceal,
    #[serde(default = "default_handshake_rate")]
    handshake_rate: Spanned<u32>,
    #[serde(default = "default_handshake_burst")]
    handshake_burst: Spanned<u32>,
    #[serde(default = "default_packet_rate")]
    packet_rate: Spanned<u32>,
    #[serde(default = "default_packet_burst")]
    packet_burst: Spanned<u32>,
    metrics: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
}

fn default_handshake_rate() -> Spanned<u32> {
    Spanned::new(0..0, 100)
}
fn default_handshake_burst() -> Spanned<u32> {
    Spanned::new(0..0, 200)
}
fn default_packet_rate() -> Spanned<u32> {
    Spanned::new(0..0, 20_000)
}
fn default_packet_burst() -> Spanned<u32> {
    Spanned::new(0..0, 1_000)
}
fn default_port() -> Spanned<u16> {
    Spanned::new(0..0, 62201)
}
fn default_state_dir() -> String {
    "/var/lib/spad".into()
}
fn default_table() -> Spanned<String> {
    Spanned::new(0..0, "spad".into())
}
fn default_max_age() -> Spanned<Seconds> {
    Spanned::new(0..0, Seconds(Duration::from_secs(60)))
}
fn default_max_future() -> Spanned<Seconds> {
    Spanned::new(0..0, Seconds(Duration::from_secs(30)))
}

/// How SPA packets (and knocks) are heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureMode {
    /// Sniff with AF_PACKET and a kernel BPF prefilter; the port stays closed (filtered).
    #[default]
    AfPacket,
    /// A plain UDP socket on the port (no knocks; the port is open but never answers).
    Udp,
}

/// How protected, knock and watched ports answer a stranger (see docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Conceal {
    /// No answer at all, like a host whose firewall drops unsolicited traffic.
    #[default]
    Drop,
    /// Answer like a closed port of this host: TCP RST, ICMP port unreachable.
    Closed,
}

/// Which firewall to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    #[default]
    Auto,
    Nftables,
    Iptables,
}

/// The daemon-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub private_key: PathBuf,
    pub port: u16,
    pub capture: CaptureMode,
    pub interfaces: Vec<String>,
    pub state_dir: PathBuf,
    pub backend: BackendChoice,
    pub table: String,
    pub max_age: Duration,
    pub max_future: Duration,
    pub flush_on_exit: bool,
    pub conceal: Conceal,
    /// Public-key handshakes per second per source address (IPv6: per /64).
    pub handshake_rate: u32,
    /// Handshakes a source may make at once before `handshake_rate` applies.
    pub handshake_burst: u32,
    /// Packets per second per source address (IPv6: per /64) the kernel passes to the
    /// AF_PACKET capture; 0 = no kernel budget.
    pub packet_rate: u32,
    /// Packets a source may send at once before `packet_rate` applies.
    pub packet_burst: u32,
    /// Where the Prometheus endpoint listens (opt-in).
    pub metrics: Option<std::net::SocketAddr>,
    /// The unprivileged user `spad run` becomes after opening its sockets.
    pub user: Option<String>,
}

/// The highest `packet-rate` and `packet-burst`.
pub const MAX_PACKET_RATE: u32 = 1_000_000;

impl Server {
    /// The per-source packet budget the kernel enforces for the AF_PACKET capture, if any.
    pub fn packet_budget(&self) -> Option<crate::capture::ebpf::SourceBudget> {
        (self.packet_rate > 0).then_some(crate::capture::ebpf::SourceBudget {
            rate: self.packet_rate,
            burst: self.packet_burst,
        })
    }
}

/// Checks interface names against the host's interfaces (when they can be listed).
pub(super) struct Interfaces {
    present: Option<BTreeSet<String>>,
}

impl Interfaces {
    /// The interfaces present on this host now.
    pub(super) fn of_host() -> Self {
        Self {
            present: crate::net::interface_names(),
        }
    }

    /// The name, if it is a valid name of a present interface.
    pub(super) fn check(&self, name: &Spanned<String>) -> Result<String, Located> {
        let value = name.get_ref();
        if value.is_empty() || value.len() > 15 || value.contains(['/', ' ']) {
            return Err(at(name, format!("`{value}` is not an interface name")));
        }
        if let Some(present) = &self.present {
            if !present.contains(value) {
                let list = present.iter().cloned().collect::<Vec<_>>().join(", ");
                return Err(at(
                    name,
                    format!("no interface `{value}` on this host; present: {list}"),
                ));
            }
        }
        Ok(value.clone())
    }
}

/// Validates `[server]`; relative paths are taken against `base`.
/// `packet-rate` and `packet-burst`, checked.
fn packet_budget(raw: &RawServer) -> Result<(u32, u32), Located> {
    let (packet_rate, packet_burst) = (*raw.packet_rate.get_ref(), *raw.packet_burst.get_ref());
    if packet_rate > MAX_PACKET_RATE {
        return Err(at(
            &raw.packet_rate,
            format!("packet-rate is at most {MAX_PACKET_RATE}; write e.g. 20000, or 0 for no kernel budget"),
        ));
    }
    if packet_rate > 0 && !(1..=MAX_PACKET_RATE).contains(&packet_burst) {
        return Err(at(
            &raw.packet_burst,
            format!("packet-burst is 1-{MAX_PACKET_RATE} packets; write e.g. 1000"),
        ));
    }
    Ok((packet_rate, packet_burst))
}

pub(super) fn build(
    raw: &RawServer,
    base: &Path,
    interfaces: &Interfaces,
) -> Result<Server, Located> {
    let table = raw.table.get_ref();
    if table.is_empty()
        || table.len() > 32
        || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(at(
            &raw.table,
            "table names are 1-32 of [A-Za-z0-9_]; write e.g. \"spad\"",
        ));
    }
    for (value, key) in [
        (&raw.handshake_rate, "handshake-rate"),
        (&raw.handshake_burst, "handshake-burst"),
    ] {
        if *value.get_ref() == 0 {
            return Err(at(
                value,
                format!("{key} = 0 would refuse every SPA packet; write a number of handshakes, e.g. 100"),
            ));
        }
    }
    let (packet_rate, packet_burst) = packet_budget(raw)?;
    if *raw.port.get_ref() == 0 {
        return Err(at(&raw.port, "port 0 is not a port; the default is 62201"));
    }
    Ok(Server {
        private_key: resolve(base, raw.private_key.get_ref()),
        port: *raw.port.get_ref(),
        capture: raw.capture,
        interfaces: raw
            .interfaces
            .iter()
            .map(|name| interfaces.check(name))
            .collect::<Result<_, _>>()?,
        state_dir: resolve(base, &raw.state_dir),
        backend: raw.backend,
        table: table.clone(),
        max_age: window_side(&raw.max_age, "max-age", Duration::from_secs(1))?,
        max_future: window_side(&raw.max_future, "max-future", Duration::ZERO)?,
        flush_on_exit: raw.flush_on_exit,
        conceal: raw.conceal,
        handshake_rate: *raw.handshake_rate.get_ref(),
        handshake_burst: *raw.handshake_burst.get_ref(),
        packet_rate,
        packet_burst,
        metrics: match &raw.metrics {
            Some(m) => Some(m.get_ref().parse().map_err(|_| {
                at(
                    m,
                    format!(
                        "`{}` is not an address and port; write e.g. \"127.0.0.1:9712\"",
                        m.get_ref()
                    ),
                )
            })?),
            None => None,
        },
        user: match &raw.user {
            Some(u) if u.get_ref().is_empty() || u.get_ref().contains([':', '/', ' ']) => {
                return Err(at(u, "not a user name; write e.g. \"spad\""))
            }
            Some(u) => Some(u.get_ref().clone()),
            None => None,
        },
    })
}

/// `max-age` or `max-future`: at least `min`, at most [`MAX_WINDOW`].
fn window_side(value: &Spanned<Seconds>, key: &str, min: Duration) -> Result<Duration, Located> {
    let duration = value.get_ref().0;
    if duration < min {
        return Err(at(
            value,
            format!("{key} = 0 refuses every packet; write a few seconds or minutes, e.g. {key} = \"60s\""),
        ));
    }
    if duration > MAX_WINDOW {
        return Err(at(
            value,
            format!("{key} of {} lets a withheld packet be used that long; write at most \"1h\" (the default is {})",
                spa_shared::duration::format(duration),
                if key == "max-age" { "\"60s\"" } else { "\"30s\"" }),
        ));
    }
    Ok(duration)
}
