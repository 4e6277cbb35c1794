//! What `spad status`, `spad list` and `spad revoke` report, as text for people and as JSON with
//! stable field names for scripts (documented in docs/operations.md). Pure data and rendering:
//! the daemon fills these in ([`crate::control`]), or the CLI does from the kernel when no
//! daemon answers.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use spa_shared::Micros;

use crate::config::{CaptureMode, Config, ServiceKind};
use crate::firewall::LiveGrant;

/// The config file's name for a service kind.
pub fn kind_name(kind: ServiceKind) -> &'static str {
    match kind {
        ServiceKind::Management => "management",
        ServiceKind::Vpn => "vpn",
        ServiceKind::Nat => "nat",
    }
}

/// The config file's name for a capture mode.
pub fn capture_name(mode: CaptureMode) -> &'static str {
    match mode {
        CaptureMode::AfPacket => "af-packet",
        CaptureMode::Udp => "udp",
    }
}

/// Facts about the running daemon that the pipeline does not hold.
#[derive(Debug, Clone)]
pub struct Info {
    pub pid: u32,
    pub started: Micros,
    pub config_path: PathBuf,
    pub config_loaded: Micros,
}

/// `spad status --json`. Field names are stable.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Whether a daemon answered on the control socket.
    pub running: bool,
    /// The control socket asked.
    pub socket: String,
    pub pid: Option<u32>,
    /// Start time, RFC 3339 UTC.
    pub started: Option<String>,
    pub uptime_seconds: Option<u64>,
    /// The configuration file the daemon runs on, and when it was (re)loaded.
    pub config: Option<String>,
    pub config_loaded: Option<String>,
    pub backend: Option<String>,
    pub table: Option<String>,
    /// `af-packet` or `udp`.
    pub capture: Option<String>,
    /// Captured interfaces; empty means all.
    pub interfaces: Vec<String>,
    pub port: Option<u16>,
    /// Counter name → value (see `Stats::counters`); empty when not running.
    pub counters: Vec<Counter>,
    /// Grants live in the kernel now (read from the kernel when not running, if possible).
    pub live_grants: Option<usize>,
    pub blacklisted: Option<usize>,
    /// The kernel's per-source packet budget now: `off` (none configured, or not loaded:
    /// see the log's warning), `released` (loaded, not enforced) or `engaged` (spad fell
    /// behind: enforced). `None` when not running.
    #[serde(default)]
    pub kernel_budget: Option<String>,
}

/// The word [`Status::kernel_budget`] uses for a capture's state.
pub fn kernel_budget_state(capture: &crate::capture::CaptureStats) -> &'static str {
    match (capture.kernel_budget, capture.budget_engaged) {
        (false, _) => "off",
        (true, false) => "released",
        (true, true) => "engaged",
    }
}

/// One counter of [`Status::counters`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counter {
    pub name: String,
    pub value: u64,
}

impl Status {
    /// The running daemon's status.
    pub fn running(
        info: &Info,
        config: &Config,
        backend: &str,
        counters: Vec<(String, u64)>,
        now: Micros,
        kernel: Option<(usize, usize)>,
    ) -> Self {
        Self {
            running: true,
            socket: crate::control::socket_path(&config.server.state_dir)
                .display()
                .to_string(),
            pid: Some(info.pid),
            started: Some(crate::log::timestamp(info.started)),
            uptime_seconds: Some(now.saturating_sub(info.started) / 1_000_000),
            config: Some(info.config_path.display().to_string()),
            config_loaded: Some(crate::log::timestamp(info.config_loaded)),
            backend: Some(backend.to_string()),
            table: Some(config.server.table.clone()),
            capture: Some(capture_name(config.server.capture).to_string()),
            interfaces: config.server.interfaces.clone(),
            port: Some(config.server.port),
            counters: counters
                .into_iter()
                .map(|(name, value)| Counter { name, value })
                .collect(),
            live_grants: kernel.map(|k| k.0),
            blacklisted: kernel.map(|k| k.1),
            kernel_budget: None,
        }
    }

    /// Human-readable rendering.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if !self.running {
            let _ = writeln!(
                out,
                "spad is not running (nothing answers on {})",
                self.socket
            );
            if let (Some(table), Some(grants), Some(black)) =
                (&self.table, self.live_grants, self.blacklisted)
            {
                let _ = writeln!(
                    out,
                    "kernel:     table {table}: {grants} live grants, {black} blacklisted sources"
                );
            }
            return out;
        }
        let _ = writeln!(
            out,
            "spad is running (pid {}, up {})",
            self.pid.unwrap_or_default(),
            spa_shared::duration::format(std::time::Duration::from_secs(
                self.uptime_seconds.unwrap_or_default()
            ))
        );
        let _ = writeln!(
            out,
            "config:     {} (loaded {})",
            self.config.as_deref().unwrap_or("?"),
            self.config_loaded.as_deref().unwrap_or("?")
        );
        let _ = writeln!(
            out,
            "firewall:   {}, table {}",
            self.backend.as_deref().unwrap_or("?"),
            self.table.as_deref().unwrap_or("?")
        );
        let interfaces = if self.interfaces.is_empty() {
            "all interfaces".to_string()
        } else {
            self.interfaces.join(",")
        };
        let _ = writeln!(
            out,
            "capture:    {} on {interfaces}, port {}/udp",
            self.capture.as_deref().unwrap_or("?"),
            self.port.unwrap_or_default()
        );
        if let Some(budget) = &self.kernel_budget {
            let _ = writeln!(out, "budget:     per-source packet budget {budget}");
        }
        let show = |n: Option<usize>| n.map_or("?".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "grants:     {} live, {} blacklisted sources",
            show(self.live_grants),
            show(self.blacklisted)
        );
        let _ = writeln!(out, "counters:");
        let width = self
            .counters
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0);
        for c in &self.counters {
            let _ = writeln!(out, "  {:<width$}  {}", c.name, c.value);
        }
        out
    }
}

/// One grant in `list --json` and `revoke --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    pub address: IpAddr,
    pub service: String,
    pub owner: String,
    pub remaining_seconds: u64,
}

impl From<&LiveGrant> for Grant {
    fn from(g: &LiveGrant) -> Self {
        Self {
            address: g.address,
            service: g.service.clone(),
            owner: g.owner.clone(),
            remaining_seconds: g.remaining.as_secs(),
        }
    }
}

/// One blacklisted source in `list --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Blacklisted {
    pub address: IpAddr,
    pub remaining_seconds: u64,
}

/// `spad list --json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Listing {
    /// `daemon` (answered by the running spad) or `kernel` (read directly, no daemon).
    pub source: String,
    pub grants: Vec<Grant>,
    pub blacklist: Vec<Blacklisted>,
}

impl Listing {
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.grants.is_empty() {
            out.push_str("no live grants\n");
        }
        for g in &self.grants {
            let _ = writeln!(
                out,
                "{:<39} {:<16} {:>8} left  owner={}",
                g.address,
                g.service,
                spa_shared::duration::format(std::time::Duration::from_secs(g.remaining_seconds)),
                g.owner
            );
        }
        for b in &self.blacklist {
            let _ = writeln!(
                out,
                "{:<39} {:<16} {:>8} left",
                b.address,
                "(blacklisted)",
                spa_shared::duration::format(std::time::Duration::from_secs(b.remaining_seconds))
            );
        }
        out
    }
}

/// `spad revoke --json` and `spad flush --json`: what was actually removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revoked {
    /// `daemon` or `kernel`, as in [`Listing::source`].
    pub source: String,
    pub revoked: Vec<Grant>,
}

impl Revoked {
    pub fn text(&self) -> String {
        if self.revoked.is_empty() {
            return "nothing to revoke\n".into();
        }
        let mut out = String::new();
        let mut by_address: Vec<(IpAddr, Vec<&str>)> = Vec::new();
        for g in &self.revoked {
            match by_address.iter_mut().find(|(a, _)| *a == g.address) {
                Some((_, services)) => services.push(&g.service),
                None => by_address.push((g.address, vec![&g.service])),
            }
        }
        for (address, services) in by_address {
            let _ = writeln!(out, "revoked {address}: {}", services.join(","));
        }
        out
    }
}

/// `spad check --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checked {
    pub config: String,
    pub ok: bool,
    pub server_public_key: String,
    pub services: Vec<CheckedService>,
    pub clients: Vec<CheckedClient>,
    pub doors: Vec<CheckedDoor>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckedService {
    pub name: String,
    pub kind: String,
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckedClient {
    pub name: String,
    pub services: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckedDoor {
    pub name: String,
    /// `sequence` (knockd-style) or `totp` (DrayTek-style).
    pub kind: String,
    pub services: Vec<String>,
}

impl Checked {
    pub fn new(config: &Config, server_public_key: String) -> Self {
        Self {
            config: config.path.display().to_string(),
            ok: true,
            server_public_key,
            services: config
                .services
                .values()
                .map(|s| CheckedService {
                    name: s.name.clone(),
                    kind: kind_name(s.kind).into(),
                    ports: s.ports.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            clients: config
                .clients
                .values()
                .map(|c| CheckedClient {
                    name: c.name.clone(),
                    services: c.services.clone(),
                })
                .collect(),
            doors: config
                .doors
                .doors
                .iter()
                .map(|d| CheckedDoor {
                    name: d.name.clone(),
                    kind: "sequence".into(),
                    services: d.services.clone(),
                })
                .chain(config.doors.totp.iter().map(|d| CheckedDoor {
                    name: d.name.clone(),
                    kind: "totp".into(),
                    services: d.services.clone(),
                }))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_text_groups_by_address_and_says_when_nothing_was_removed() {
        let grant = |a: &str, s: &str| Grant {
            address: a.parse().unwrap(),
            service: s.into(),
            owner: "alice".into(),
            remaining_seconds: 5,
        };
        let r = Revoked {
            source: "daemon".into(),
            revoked: vec![
                grant("198.51.100.7", "ssh"),
                grant("198.51.100.7", "vpn"),
                grant("2001:db8::7", "ssh"),
            ],
        };
        assert_eq!(
            r.text(),
            "revoked 198.51.100.7: ssh,vpn\nrevoked 2001:db8::7: ssh\n"
        );
        assert_eq!(Revoked::default().text(), "nothing to revoke\n");
    }

    #[test]
    fn json_field_names_are_the_documented_ones() {
        let s = Status {
            running: true,
            counters: vec![Counter {
                name: "packets".into(),
                value: 3,
            }],
            ..Status::default()
        };
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        for field in [
            "running",
            "socket",
            "pid",
            "started",
            "uptime_seconds",
            "config",
            "config_loaded",
            "backend",
            "table",
            "capture",
            "interfaces",
            "port",
            "counters",
            "live_grants",
            "blacklisted",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["counters"][0]["name"], "packets");
    }
}
