//! The `[doors.*]`, `[totp-doors.*]` and `[knocking]` sections: legacy port-sequence knocks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spa_shared::totp::{Algorithm, Params, PortRule, Secret};
use toml::Spanned;

// Only the configuration's leaf helpers (spans, paths, durations): the knock side takes what it
// needs of the rest as plain values, so this module does not depend on the main config.
use crate::config::{at, resolve, Located, Seconds};
use crate::net::{PortProto, Proto};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawDoor {
    #[serde(default)]
    sequence: Vec<Spanned<String>>,
    #[serde(default = "default_seq_timeout")]
    seq_timeout: Seconds,
    #[serde(default)]
    tcp_flags: Option<Spanned<String>>,
    services: Vec<Spanned<String>>,
    #[serde(default)]
    close_sequence: Vec<Spanned<String>>,
    one_time_sequences: Option<Spanned<String>>,
    #[serde(default)]
    start_command: Vec<String>,
    #[serde(default)]
    stop_command: Vec<String>,
    #[serde(default)]
    command_capabilities: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawTotpDoor {
    first_port: Spanned<u16>,
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    services: Vec<Spanned<String>>,
    #[serde(default = "default_range")]
    port_range: Spanned<String>,
    #[serde(default = "default_count")]
    derived_ports: usize,
    #[serde(default = "default_proto")]
    protocol: Spanned<String>,
    #[serde(default = "default_skew")]
    skew_steps: u64,
    #[serde(default = "default_seq_timeout")]
    seq_timeout: Seconds,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default = "default_true")]
    require_enrollment: bool,
}

fn default_true() -> bool {
    true
}

/// Global knock settings (scanner defence).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawKnocking {
    #[serde(default)]
    decoy_ports: Vec<Spanned<String>>,
    #[serde(default = "default_failures")]
    blacklist_after: u32,
    #[serde(default = "default_blacklist_for")]
    blacklist_for: Seconds,
    #[serde(default = "default_rate")]
    max_knocks_per_second: u32,
    #[serde(default = "default_max_sources")]
    max_sources: Spanned<usize>,
}

impl Default for RawKnocking {
    fn default() -> Self {
        Self {
            decoy_ports: Vec::new(),
            blacklist_after: default_failures(),
            blacklist_for: default_blacklist_for(),
            max_knocks_per_second: default_rate(),
            max_sources: default_max_sources(),
        }
    }
}

fn default_seq_timeout() -> Seconds {
    Seconds(Duration::from_secs(15))
}
fn default_range() -> Spanned<String> {
    Spanned::new(0..0, "20000-29999".into())
}
fn default_count() -> usize {
    2
}
fn default_proto() -> Spanned<String> {
    Spanned::new(0..0, "tcp".into())
}
fn default_skew() -> u64 {
    1
}
fn default_failures() -> u32 {
    3
}
fn default_blacklist_for() -> Seconds {
    Seconds(Duration::from_secs(600))
}
fn default_rate() -> u32 {
    20
}
/// Sources whose knock state is kept at once (about 200 bytes each).
pub const DEFAULT_MAX_SOURCES: usize = 16_384;
/// The largest `max-sources` accepted (about 200 MB of state).
pub const MAX_MAX_SOURCES: usize = 1_000_000;
fn default_max_sources() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_MAX_SOURCES)
}

/// TCP flag requirements (knockd's `tcpflags = syn,!ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFlags {
    pub set: u8,
    pub clear: u8,
}

impl TcpFlags {
    /// The default: SYN set, ACK clear (a connection attempt).
    pub const SYN: TcpFlags = TcpFlags {
        set: 0x02,
        clear: 0x10,
    };

    pub fn matches(&self, flags: u8) -> bool {
        flags & self.set == self.set && flags & self.clear == 0
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut flags = TcpFlags { set: 0, clear: 0 };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (negated, name) = match part.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, part),
            };
            let bit = match name.to_ascii_lowercase().as_str() {
                "fin" => 0x01,
                "syn" => 0x02,
                "rst" => 0x04,
                "psh" => 0x08,
                "ack" => 0x10,
                "urg" => 0x20,
                _ => return Err(format!("unknown TCP flag `{name}`; use fin, syn, rst, psh, ack, urg, each optionally with `!`")),
            };
            if negated {
                flags.clear |= bit;
            } else {
                flags.set |= bit;
            }
        }
        if flags.set & flags.clear != 0 || flags.set == 0 {
            return Err(format!("`{text}` must require at least one flag and not both set and clear one; e.g. \"syn,!ack\""));
        }
        Ok(flags)
    }
}

/// A static (knockd-style) door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticDoor {
    pub name: String,
    pub sequence: Vec<PortProto>,
    pub close_sequence: Vec<PortProto>,
    pub seq_timeout: Duration,
    pub tcp_flags: TcpFlags,
    pub services: Vec<String>,
    pub one_time_file: Option<PathBuf>,
    pub start_command: Vec<String>,
    pub stop_command: Vec<String>,
    /// Start/stop commands keep spad's capabilities (default: they run with none).
    pub command_capabilities: bool,
}

/// A TOTP door: first port fixed per user, the rest derived from the current code.
#[derive(Debug, Clone, PartialEq)]
pub struct TotpDoor {
    pub name: String,
    pub first_port: u16,
    pub secret: Secret,
    pub params: Params,
    pub rule: PortRule,
    pub proto: Proto,
    pub skew_steps: u64,
    pub seq_timeout: Duration,
    pub services: Vec<String>,
    /// Not disabled in config (`enabled = false`).
    pub enabled: bool,
    /// Only active once `spad totp enroll` verified a code (the default).
    pub require_enrollment: bool,
}

impl Eq for TotpDoor {}

/// All knock configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Doors {
    pub doors: Vec<StaticDoor>,
    pub totp: Vec<TotpDoor>,
    pub decoys: BTreeSet<PortProto>,
    pub blacklist_after: u32,
    pub blacklist_for: Duration,
    pub max_knocks_per_second: u32,
    /// Most sources whose knock state is kept at once; the oldest untrusted is evicted first.
    pub max_sources: usize,
}

impl Doors {
    pub fn is_empty(&self) -> bool {
        self.doors.is_empty() && self.totp.iter().all(|d| !d.enabled)
    }
}

fn ports(list: &[Spanned<String>]) -> Result<Vec<PortProto>, Located> {
    list.iter()
        .map(|t| t.get_ref().parse::<PortProto>().map_err(|e| at(t, e)))
        .collect()
}

fn service_list(
    list: &[Spanned<String>],
    services: &BTreeMap<String, Vec<PortProto>>,
) -> Result<Vec<String>, Located> {
    if list.is_empty() {
        return Err(Located {
            span: 0..0,
            message: "a door needs services = [\"...\"]".into(),
        });
    }
    list.iter()
        .map(|s| {
            if services.contains_key(s.get_ref()) {
                Ok(s.get_ref().clone())
            } else {
                let known = services.keys().cloned().collect::<Vec<_>>().join(", ");
                Err(at(
                    s,
                    format!(
                        "unknown service `{}`; defined services: {known}",
                        s.get_ref()
                    ),
                ))
            }
        })
        .collect()
}

/// Builds the doors. `services` maps each service name to its ports; `spa_port` is the UDP
/// port of SPA packets; relative paths are resolved against `base`.
///
/// Checks run in a fixed order (static doors, decoys, TOTP doors, `max-sources`) and the first
/// refusal is returned.
pub(crate) fn build(
    raw_doors: &BTreeMap<String, Spanned<RawDoor>>,
    raw_totp: &BTreeMap<String, Spanned<RawTotpDoor>>,
    knocking: &RawKnocking,
    services: &BTreeMap<String, Vec<PortProto>>,
    spa_port: u16,
    base: &Path,
    _text: &str,
) -> Result<Doors, Located> {
    let mut claims = PortClaims::new(spa_port, services);
    let doors = raw_doors
        .iter()
        .map(|(name, spanned)| static_door(name, spanned, services, &mut claims, base))
        .collect::<Result<Vec<_>, _>>()?;
    let decoys = decoys(&knocking.decoy_ports, &mut claims)?;
    let totp = totp_doors(raw_totp, services, &mut claims, base)?;
    Ok(Doors {
        doors,
        totp,
        decoys,
        blacklist_after: knocking.blacklist_after.max(1),
        blacklist_for: knocking.blacklist_for.0,
        max_knocks_per_second: knocking.max_knocks_per_second.max(1),
        max_sources: max_sources(&knocking.max_sources)?,
    })
}

/// Every port some door or decoy listens on, with its owner: a knock port must not be the SPA
/// port or a protected service port, and doors must not share ports.
struct PortClaims {
    spa_port: PortProto,
    service_ports: BTreeSet<PortProto>,
    owners: BTreeMap<PortProto, String>,
}

impl PortClaims {
    fn new(spa_port: u16, services: &BTreeMap<String, Vec<PortProto>>) -> Self {
        Self {
            spa_port: PortProto {
                port: spa_port,
                proto: Proto::Udp,
            },
            service_ports: services.values().flatten().copied().collect(),
            owners: BTreeMap::new(),
        }
    }

    /// Records `port` as `owner`'s; refuses it (at `span`) if it is taken.
    fn claim(
        &mut self,
        port: PortProto,
        owner: &str,
        span: &Spanned<String>,
    ) -> Result<(), Located> {
        if port == self.spa_port {
            return Err(at(
                span,
                format!("{port} is the SPA port; knock ports must differ"),
            ));
        }
        if self.service_ports.contains(&port) {
            return Err(at(
                span,
                format!("{port} is a protected service port; knock ports must differ"),
            ));
        }
        if let Some(other) = self.owners.get(&port).filter(|other| *other != owner) {
            return Err(at(
                span,
                format!("{port} is already used by `{other}`; doors must not share ports"),
            ));
        }
        self.owners.insert(port, owner.to_string());
        Ok(())
    }

    /// The port numbers TOTP derivation must avoid: the SPA port, every service port, every
    /// claimed port (static doors, decoys, TOTP first ports) and `first_ports`, sorted.
    fn excluded_numbers(&self, first_ports: &BTreeMap<u16, String>) -> Vec<u16> {
        let mut excluded: BTreeSet<u16> = self.owners.keys().map(|p| p.port).collect();
        excluded.insert(self.spa_port.port);
        excluded.extend(self.service_ports.iter().map(|p| p.port));
        excluded.extend(first_ports.keys().copied());
        excluded.into_iter().collect()
    }
}

/// One `[doors.NAME]`, its ports claimed.
fn static_door(
    name: &str,
    spanned: &Spanned<RawDoor>,
    services: &BTreeMap<String, Vec<PortProto>>,
    claims: &mut PortClaims,
    base: &Path,
) -> Result<StaticDoor, Located> {
    let raw = spanned.get_ref();
    let sequence = open_sequence(name, spanned, claims)?;
    let close_sequence = ports(&raw.close_sequence)?;
    for (i, p) in close_sequence.iter().enumerate() {
        claims.claim(*p, name, &raw.close_sequence[i])?;
    }
    let tcp_flags = match &raw.tcp_flags {
        Some(t) => TcpFlags::parse(t.get_ref()).map_err(|e| at(t, e))?,
        None => TcpFlags::SYN,
    };
    let services = service_list(&raw.services, services).map_err(|mut e| {
        if e.span == (0..0) {
            e.span = spanned.span();
        }
        e
    })?;
    Ok(StaticDoor {
        name: name.to_string(),
        sequence,
        close_sequence,
        seq_timeout: raw.seq_timeout.0,
        tcp_flags,
        services,
        one_time_file: raw
            .one_time_sequences
            .as_ref()
            .map(|p| resolve(base, p.get_ref())),
        start_command: raw.start_command.clone(),
        stop_command: raw.stop_command.clone(),
        command_capabilities: raw.command_capabilities,
    })
}

/// A static door's `sequence`: at least two distinct ports (unless it has one-time sequences),
/// each claimed for the door.
fn open_sequence(
    name: &str,
    spanned: &Spanned<RawDoor>,
    claims: &mut PortClaims,
) -> Result<Vec<PortProto>, Located> {
    let raw = spanned.get_ref();
    let sequence = ports(&raw.sequence)?;
    if sequence.len() < 2 && raw.one_time_sequences.is_none() {
        return Err(Located { span: spanned.span(), message: format!("door `{name}` needs sequence = [\"7000/tcp\", \"8000/udp\", ...] (at least 2 ports) or one-time-sequences = \"FILE\"") });
    }
    for (i, p) in sequence.iter().enumerate() {
        if sequence[..i].contains(p) {
            return Err(at(
                &raw.sequence[i],
                format!("{p} appears twice in the sequence; every knock port must be distinct"),
            ));
        }
        claims.claim(*p, name, &raw.sequence[i])?;
    }
    Ok(sequence)
}

/// `[knocking] decoy-ports`, each claimed.
fn decoys(
    list: &[Spanned<String>],
    claims: &mut PortClaims,
) -> Result<BTreeSet<PortProto>, Located> {
    let mut decoys = BTreeSet::new();
    for d in list {
        let p: PortProto = d.get_ref().parse().map_err(|e: String| at(d, e))?;
        claims.claim(p, "(decoy)", d)?;
        decoys.insert(p);
    }
    Ok(decoys)
}

/// Every `[totp-doors.NAME]`. A first pass validates each door and claims its first port, so
/// the derived ranges can then be checked against all first ports and every other knock port.
fn totp_doors(
    raw_totp: &BTreeMap<String, Spanned<RawTotpDoor>>,
    services: &BTreeMap<String, Vec<PortProto>>,
    claims: &mut PortClaims,
    base: &Path,
) -> Result<Vec<TotpDoor>, Located> {
    let mut first_ports: BTreeMap<u16, String> = BTreeMap::new();
    let mut totp = Vec::new();
    for (name, spanned) in raw_totp {
        let door = totp_door(name, spanned, services, (claims, &mut first_ports), base)?;
        totp.push((spanned.span(), door));
    }
    // Derived ports avoid the SPA port, every service port, every static door port and decoy,
    // and every TOTP first port.
    let excluded = claims.excluded_numbers(&first_ports);
    totp.into_iter()
        .map(|(span, mut door)| {
            door.rule.excluded = excluded.clone();
            check_derived_range(span, &door)?;
            Ok(door)
        })
        .collect()
}

/// One `[totp-doors.NAME]`, its first port claimed; its derived range is not checked yet.
fn totp_door(
    name: &str,
    spanned: &Spanned<RawTotpDoor>,
    services: &BTreeMap<String, Vec<PortProto>>,
    (claims, first_ports): (&mut PortClaims, &mut BTreeMap<u16, String>),
    base: &Path,
) -> Result<TotpDoor, Located> {
    let raw = spanned.get_ref();
    let proto = totp_protocol(&raw.protocol)?;
    let first = first_port(name, raw, proto, claims, first_ports)?;
    let secret = totp_secret(name, spanned, base)?;
    let (low, high) = port_range(&raw.port_range)?;
    if !(1..=8).contains(&raw.derived_ports) {
        return Err(Located {
            span: spanned.span(),
            message: "derived-ports must be 1-8".into(),
        });
    }
    let services = service_list(&raw.services, services)?;
    Ok(TotpDoor {
        name: name.to_string(),
        first_port: first,
        secret,
        params: Params {
            algorithm: Algorithm::Sha1,
            period_secs: 30,
            digits: 6,
        },
        rule: PortRule {
            low,
            high,
            count: raw.derived_ports,
            excluded: Vec::new(),
        },
        proto,
        skew_steps: raw.skew_steps.min(3),
        seq_timeout: raw.seq_timeout.0,
        services,
        enabled: raw.enabled.unwrap_or(true),
        require_enrollment: raw.require_enrollment,
    })
}

fn totp_protocol(protocol: &Spanned<String>) -> Result<Proto, Located> {
    match protocol.get_ref().as_str() {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        _ => Err(at(protocol, "protocol is \"tcp\" or \"udp\"")),
    }
}

/// A TOTP door's `first-port`: non-zero, unique among TOTP doors, and claimed.
fn first_port(
    name: &str,
    raw: &RawTotpDoor,
    proto: Proto,
    claims: &mut PortClaims,
    first_ports: &mut BTreeMap<u16, String>,
) -> Result<u16, Located> {
    let first = *raw.first_port.get_ref();
    if first == 0 {
        return Err(at(&raw.first_port, "first-port must be 1-65535"));
    }
    if let Some(other) = first_ports.insert(first, name.to_string()) {
        return Err(at(&raw.first_port, format!("first port {first} is already the first port of `{other}`; each user needs a unique first port")));
    }
    let first_spanned = Spanned::new(raw.first_port.span(), first.to_string());
    claims.claim(PortProto { port: first, proto }, name, &first_spanned)?;
    Ok(first)
}

/// The TOTP secret, from exactly one of `secret` or `secret-file`.
fn totp_secret(name: &str, spanned: &Spanned<RawTotpDoor>, base: &Path) -> Result<Secret, Located> {
    let raw = spanned.get_ref();
    match (&raw.secret, &raw.secret_file) {
        (Some(s), None) => Secret::from_base32(s.get_ref()).map_err(|e| at(s, format!("secret {e}"))),
        (None, Some(f)) => {
            let path = resolve(base, f.get_ref());
            let text = crate::keyfile::read_secret_text(&path).map_err(|e| at(f, e.to_string()))?;
            Secret::from_base32(&text).map_err(|e| at(f, format!("{}: {e}", path.display())))
        }
        _ => Err(Located { span: spanned.span(), message: format!("TOTP door `{name}` needs exactly one of secret = \"BASE32\" or secret-file = \"…\"") }),
    }
}

/// `port-range = "LOW-HIGH"` with 1 <= LOW < HIGH.
fn port_range(range: &Spanned<String>) -> Result<(u16, u16), Located> {
    range
        .get_ref()
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
        .filter(|(a, b)| *a >= 1 && a < b)
        .ok_or_else(|| at(range, "port-range is \"LOW-HIGH\", e.g. \"20000-29999\""))
}

/// Clients derive without knowing the exclusions, so none may fall inside the range: then
/// gateway and client always compute the same sequence. The range must also be wide enough.
fn check_derived_range(span: std::ops::Range<usize>, door: &TotpDoor) -> Result<(), Located> {
    if let Some(clash) = door
        .rule
        .excluded
        .iter()
        .find(|p| (door.rule.low..=door.rule.high).contains(p))
    {
        return Err(Located {
            span,
            message: format!(
                "TOTP door `{}`: port-range {}-{} contains port {clash}, which is the SPA port, a service, door or decoy port, or a TOTP first port; move the range or that port",
                door.name, door.rule.low, door.rule.high
            ),
        });
    }
    if let Err(e) = spa_shared::totp::derive_ports(door.first_port, "000000", &door.rule) {
        return Err(Located {
            span,
            message: format!("TOTP door `{}`: {e}; widen port-range", door.name),
        });
    }
    Ok(())
}

/// `[knocking] max-sources`, bounded.
fn max_sources(max_sources: &Spanned<usize>) -> Result<usize, Located> {
    let value = *max_sources.get_ref();
    if !(1..=MAX_MAX_SOURCES).contains(&value) {
        return Err(at(
            max_sources,
            format!(
                "max-sources must be 1-{MAX_MAX_SOURCES}; the default is {DEFAULT_MAX_SOURCES}"
            ),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const BASE: &str = "[server]\nprivate-key = \"k\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n[knocking]\n";

    #[test]
    fn max_sources_is_bounded_and_located() {
        let parse = |extra: &str| Config::parse(Path::new("spad.toml"), &format!("{BASE}{extra}"));
        assert_eq!(parse("").unwrap().doors.max_sources, 16_384);
        assert_eq!(parse("max-sources = 100\n").unwrap().doors.max_sources, 100);
        for bad in ["max-sources = 0\n", "max-sources = 5000000\n"] {
            let err = parse(bad).unwrap_err();
            assert_eq!((err.line, err.column), (8, 15), "{err:?}");
            assert!(
                err.message.contains("max-sources must be 1-1000000"),
                "{err:?}"
            );
        }
    }
}
