//! `spad.toml`: parsing, validation and the typed configuration the daemon runs on.
//!
//! Every error names `file:line:col` and says what to write instead. Paths in the file are
//! relative to the file's own directory. See `docs/configuration.md` for the reference.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spa_shared::keys::PublicKey;
use spa_shared::payload::valid_service_name;
use toml::Spanned;

use crate::knock::config::{Doors, RawDoor, RawTotpDoor};
use crate::net::{Cidr, PortProto, Proto};
use spa_shared::duration;

/// A configuration error with its location.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Where in the source text an error is, plus the message; turned into [`ConfigError`].
pub(crate) struct Located {
    pub span: std::ops::Range<usize>,
    pub message: String,
}

pub(crate) fn at<T>(spanned: &Spanned<T>, message: impl Into<String>) -> Located {
    Located {
        span: spanned.span(),
        message: message.into(),
    }
}

/// A duration in config: `"30s"`, `"1h"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Seconds(Duration::from_secs(n))),
            Raw::Text(t) => duration::parse(&t).map(Seconds).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a duration; write e.g. \"30s\", \"15m\", \"1h30m\" or a number of seconds"
                ))
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    services: BTreeMap<String, Spanned<RawService>>,
    #[serde(default)]
    clients: BTreeMap<String, Spanned<RawClient>>,
    #[serde(default)]
    doors: BTreeMap<String, Spanned<RawDoor>>,
    #[serde(default)]
    totp_doors: BTreeMap<String, Spanned<RawTotpDoor>>,
    #[serde(default)]
    knocking: crate::knock::config::RawKnocking,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawServer {
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
    max_age: Seconds,
    #[serde(default = "default_max_future")]
    max_future: Seconds,
    #[serde(default)]
    flush_on_exit: bool,
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
fn default_max_age() -> Seconds {
    Seconds(Duration::from_secs(60))
}
fn default_max_future() -> Seconds {
    Seconds(Duration::from_secs(30))
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

/// Which firewall to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    #[default]
    Auto,
    Nftables,
    Iptables,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawService {
    kind: ServiceKind,
    ports: Vec<Spanned<String>>,
    timeout: Seconds,
    max_timeout: Option<Seconds>,
    idle_timeout: Option<Seconds>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    interface: Option<Spanned<String>>,
    forward_to: Option<Spanned<String>>,
    forward_to_v6: Option<Spanned<String>>,
}

/// What a service protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceKind {
    /// Ports of the gateway itself (SSH, web admin): the INPUT path.
    Management,
    /// Several VPN protocols and ports under one grant: the INPUT path.
    Vpn,
    /// A public port forwarded (DNAT) to an internal server, per client address.
    Nat,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawClient {
    public_key: Option<Spanned<String>>,
    public_key_file: Option<Spanned<String>>,
    services: Vec<Spanned<String>>,
    max_duration: Option<Seconds>,
    #[serde(default)]
    allow_address_override: bool,
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
}

/// Where a NAT service forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
}

/// One protected service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub kind: ServiceKind,
    pub ports: Vec<PortProto>,
    pub timeout: Duration,
    pub max_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub allow: Vec<Cidr>,
    pub interface: Option<String>,
    pub forward: Option<Forward>,
}

/// One SPA client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    pub public_key: PublicKey,
    pub services: Vec<String>,
    pub max_duration: Option<Duration>,
    pub allow_address_override: bool,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub server: Server,
    pub services: BTreeMap<String, Service>,
    pub clients: BTreeMap<String, Client>,
    pub doors: Doors,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let locate = |located: Located| {
            let (line, column) = line_column(text, located.span.start);
            ConfigError {
                file: path.display().to_string(),
                line,
                column,
                message: located.message,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            locate(Located {
                span,
                message: e.message().trim().to_string(),
            })
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        build(raw, path, &base, text).map_err(locate)
    }

    /// Every port the SPA daemon protects, with the services that own it.
    pub fn protected_ports(&self) -> BTreeSet<PortProto> {
        self.services
            .values()
            .flat_map(|s| s.ports.iter().copied())
            .collect()
    }
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// `path` made absolute against the config file's directory.
pub(crate) fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn build(raw: RawConfig, path: &Path, base: &Path, text: &str) -> Result<Config, Located> {
    let interfaces_present = crate::net::interface_names();
    let check_interface = |name: &Spanned<String>| -> Result<String, Located> {
        let value = name.get_ref();
        if value.is_empty() || value.len() > 15 || value.contains(['/', ' ']) {
            return Err(at(name, format!("`{value}` is not an interface name")));
        }
        if let Some(present) = &interfaces_present {
            if !present.contains(value) {
                let list = present.iter().cloned().collect::<Vec<_>>().join(", ");
                return Err(at(
                    name,
                    format!("no interface `{value}` on this host; present: {list}"),
                ));
            }
        }
        Ok(value.clone())
    };

    let table = raw.server.table.get_ref();
    if table.is_empty()
        || table.len() > 32
        || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(at(
            &raw.server.table,
            "table names are 1-32 of [A-Za-z0-9_]; write e.g. \"spad\"",
        ));
    }
    if *raw.server.port.get_ref() == 0 {
        return Err(at(
            &raw.server.port,
            "port 0 is not a port; the default is 62201",
        ));
    }
    let server = Server {
        private_key: resolve(base, raw.server.private_key.get_ref()),
        port: *raw.server.port.get_ref(),
        capture: raw.server.capture,
        interfaces: raw
            .server
            .interfaces
            .iter()
            .map(check_interface)
            .collect::<Result<_, _>>()?,
        state_dir: resolve(base, &raw.server.state_dir),
        backend: raw.server.backend,
        table: table.clone(),
        max_age: raw.server.max_age.0,
        max_future: raw.server.max_future.0,
        flush_on_exit: raw.server.flush_on_exit,
    };

    let mut services = BTreeMap::new();
    let mut nat_public: BTreeMap<PortProto, String> = BTreeMap::new();
    let mut local_ports: BTreeMap<PortProto, String> = BTreeMap::new();
    for (name, spanned) in &raw.services {
        let key_span = Located {
            span: spanned.span(),
            message: String::new(),
        };
        if !valid_service_name(name) {
            return Err(Located {
                message: format!("service name `{name}` must be 1-32 of [a-z0-9_-]"),
                ..key_span
            });
        }
        let service = spanned.get_ref();
        if service.ports.is_empty() {
            return Err(Located {
                message: format!("service `{name}` has no ports; write ports = [\"22/tcp\"]"),
                ..key_span
            });
        }
        let mut ports = Vec::new();
        for text in &service.ports {
            let port: PortProto = text.get_ref().parse().map_err(|e: String| at(text, e))?;
            if port.port == server.port && port.proto == Proto::Udp {
                return Err(at(
                    text,
                    format!("{port} is the SPA port itself; pick another port"),
                ));
            }
            if ports.contains(&port) {
                return Err(at(text, format!("{port} is listed twice in this service")));
            }
            if service.kind == ServiceKind::Nat {
                if let Some(other) = nat_public.insert(port, name.clone()) {
                    return Err(at(
                        text,
                        format!("public port {port} is already forwarded by service `{other}`; NAT public ports must not overlap"),
                    ));
                }
                if let Some(other) = local_ports.get(&port) {
                    return Err(at(text, format!("public port {port} is a local port of service `{other}`; a port is either local or forwarded")));
                }
            } else {
                if let Some(other) = nat_public.get(&port) {
                    return Err(at(text, format!("{port} is forwarded by NAT service `{other}`; a port is either local or forwarded")));
                }
                local_ports.insert(port, name.clone());
            }
            ports.push(port);
        }
        let mut allow = Vec::new();
        for entry in &service.allow {
            allow.push(entry.get_ref().parse::<Cidr>().map_err(|e| at(entry, e))?);
        }
        let interface = service
            .interface
            .as_ref()
            .map(check_interface)
            .transpose()?;
        let forward = match service.kind {
            ServiceKind::Nat => {
                let parse_target = |t: &Spanned<String>,
                                    want_v6: bool|
                 -> Result<SocketAddr, Located> {
                    let addr: SocketAddr = t.get_ref().parse().map_err(|_| {
                        at(t, format!("`{}` is not an address:port; write e.g. \"192.168.1.12:3389\" or \"[fd00::12]:3389\"", t.get_ref()))
                    })?;
                    if addr.is_ipv6() != want_v6 {
                        let which = if want_v6 {
                            "forward-to-v6 takes an IPv6 [addr]:port"
                        } else {
                            "forward-to takes an IPv4 addr:port (use forward-to-v6 for IPv6)"
                        };
                        return Err(at(t, which));
                    }
                    if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 {
                        return Err(at(
                            t,
                            "the forward target must be a unicast address with a non-zero port",
                        ));
                    }
                    Ok(addr)
                };
                let v4 = service
                    .forward_to
                    .as_ref()
                    .map(|t| parse_target(t, false))
                    .transpose()?;
                let v6 = service
                    .forward_to_v6
                    .as_ref()
                    .map(|t| parse_target(t, true))
                    .transpose()?;
                if v4.is_none() && v6.is_none() {
                    return Err(Located {
                        message: format!("NAT service `{name}` needs forward-to = \"192.168.1.12:3389\" (and/or forward-to-v6)"),
                        ..key_span
                    });
                }
                if service.ports.len() != 1 {
                    return Err(at(&service.ports[0], "a NAT service forwards exactly one public port; make one service per forward"));
                }
                Some(Forward { v4, v6 })
            }
            _ => {
                if let Some(t) = service
                    .forward_to
                    .as_ref()
                    .or(service.forward_to_v6.as_ref())
                {
                    return Err(at(t, "forward-to only applies to kind = \"nat\""));
                }
                None
            }
        };
        let max_timeout = service.max_timeout.map_or(service.timeout.0, |m| m.0);
        if service.timeout.0.is_zero() || max_timeout < service.timeout.0 {
            return Err(Located {
                message: format!(
                    "service `{name}`: timeout must be > 0 and max-timeout at least timeout"
                ),
                ..key_span
            });
        }
        if service.idle_timeout.is_some_and(|i| i.0.is_zero()) {
            return Err(Located {
                message: format!(
                    "service `{name}`: idle-timeout must be > 0 (leave it out for none)"
                ),
                ..key_span
            });
        }
        services.insert(
            name.clone(),
            Service {
                name: name.clone(),
                kind: service.kind,
                ports,
                timeout: service.timeout.0,
                max_timeout,
                idle_timeout: service.idle_timeout.map(|i| i.0),
                allow,
                interface,
                forward,
            },
        );
    }

    let mut clients = BTreeMap::new();
    let mut seen_keys: BTreeMap<PublicKey, String> = BTreeMap::new();
    for (name, spanned) in &raw.clients {
        let client = spanned.get_ref();
        let public_key = match (&client.public_key, &client.public_key_file) {
            (Some(text), None) => PublicKey::from_base64(text.get_ref())
                .map_err(|e| at(text, format!("public-key {e}")))?,
            (None, Some(file)) => {
                let full = resolve(base, file.get_ref());
                let content = std::fs::read_to_string(&full).map_err(|e| {
                    at(file, format!("cannot read {}: {e}; create it with `spa pubkey < KEY > {}`", full.display(), full.display()))
                })?;
                PublicKey::from_base64(&content)
                    .map_err(|e| at(file, format!("{} {e}", full.display())))?
            }
            _ => {
                return Err(Located {
                    span: spanned.span(),
                    message: format!("client `{name}` needs exactly one of public-key = \"…\" or public-key-file = \"…\""),
                })
            }
        };
        if let Some(other) = seen_keys.insert(public_key, name.clone()) {
            return Err(Located {
                span: spanned.span(),
                message: format!("client `{name}` has the same public key as `{other}`; give each client its own key"),
            });
        }
        let mut wanted = Vec::new();
        for service in &client.services {
            if !services.contains_key(service.get_ref()) {
                let known = services.keys().cloned().collect::<Vec<_>>().join(", ");
                return Err(at(
                    service,
                    format!(
                        "unknown service `{}`; defined services: {known}",
                        service.get_ref()
                    ),
                ));
            }
            wanted.push(service.get_ref().clone());
        }
        clients.insert(
            name.clone(),
            Client {
                name: name.clone(),
                public_key,
                services: wanted,
                max_duration: client.max_duration.map(|d| d.0),
                allow_address_override: client.allow_address_override,
            },
        );
    }

    let service_ports = services
        .iter()
        .map(|(name, s)| (name.clone(), s.ports.clone()))
        .collect();
    let doors = crate::knock::config::build(
        &raw.doors,
        &raw.totp_doors,
        &raw.knocking,
        &service_ports,
        server.port,
        base,
        text,
    )?;

    Ok(Config {
        path: path.to_path_buf(),
        server,
        services,
        clients,
        doors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/spad/spad.toml"), text)
    }

    const KEY: &str = "aGVsbG8gd29ybGQgdGhpcyBpcyAzMiBieXRlcyEhISE=";

    fn base() -> String {
        format!(
            r#"
[server]
private-key = "server.key"

[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "30s"

[clients.alice]
public-key = "{KEY}"
services = ["ssh"]
"#
        )
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let config = parse(&base()).unwrap();
        assert_eq!(config.server.port, 62201);
        assert_eq!(config.server.private_key, Path::new("/etc/spad/server.key"));
        assert_eq!(config.services["ssh"].timeout, Duration::from_secs(30));
        assert_eq!(config.clients["alice"].services, vec!["ssh"]);
    }

    #[test]
    fn errors_carry_file_line_and_a_hint() {
        let text = base().replace("services = [\"ssh\"]", "services = [\"sshh\"]");
        let err = parse(&text).unwrap_err();
        assert_eq!((err.line, err.file.as_str()), (12, "/etc/spad/spad.toml"));
        assert!(
            err.message
                .contains("unknown service `sshh`; defined services: ssh"),
            "{err}"
        );

        let err =
            parse(&base().replace("timeout = \"30s\"", "timeout = \"30 parsecs\"")).unwrap_err();
        assert_eq!(err.line, 8);
        assert!(err.message.contains("write e.g."), "{err}");

        let err =
            parse(&base().replace("kind = \"management\"", "kind = \"management\"\ncolour = 1"))
                .unwrap_err();
        assert!(err.message.contains("unknown field `colour`"), "{err}");

        let err = parse(&base().replace("22/tcp", "70000/tcp")).unwrap_err();
        assert_eq!(err.line, 7);

        let err = parse(&base().replace(KEY, "short")).unwrap_err();
        assert!(err.message.contains("public-key"), "{err}");
    }

    #[test]
    fn nat_rules() {
        let nat = |public: &str, target: &str| {
            format!(
                "{}\n[services.rdp]\nkind = \"nat\"\nports = [\"{public}\"]\ntimeout = \"1h\"\nforward-to = \"{target}\"\n",
                base()
            )
        };
        let config = parse(&nat("3389/tcp", "192.168.1.12:3389")).unwrap();
        assert_eq!(
            config.services["rdp"]
                .forward
                .as_ref()
                .unwrap()
                .v4
                .unwrap()
                .port(),
            3389
        );
        assert!(parse(&nat("3389/tcp", "not-an-address"))
            .unwrap_err()
            .message
            .contains("address:port"));
        assert!(parse(&nat("22/tcp", "192.168.1.12:22"))
            .unwrap_err()
            .message
            .contains("either local or forwarded"));
        let twice = format!(
            "{}\n[services.rdp2]\nkind = \"nat\"\nports = [\"3389/tcp\"]\ntimeout = \"1h\"\nforward-to = \"192.168.1.13:3389\"\n",
            nat("3389/tcp", "192.168.1.12:3389")
        );
        let err = parse(&twice).unwrap_err();
        assert!(err.message.contains("must not overlap"), "{err}");
    }

    #[test]
    fn allow_list_and_interface_are_checked() {
        let text = base().replace(
            "timeout = \"30s\"",
            "timeout = \"30s\"\nallow = [\"10.0.0.0/33\"]",
        );
        assert!(parse(&text).unwrap_err().message.contains("CIDR"));
        let text = base().replace(
            "timeout = \"30s\"",
            "timeout = \"30s\"\ninterface = \"nosuchif0\"",
        );
        assert!(parse(&text)
            .unwrap_err()
            .message
            .contains("no interface `nosuchif0`"));
    }

    #[test]
    fn door_bad_input_is_refused_with_its_line() {
        let door = |seq: &str| {
            format!(
                "{}\n[doors.d]\nsequence = [{seq}]\nservices = [\"ssh\"]\n",
                base()
            )
        };
        let err = parse(&door("\"7000/tcp\", \"70000/tcp\"")).unwrap_err();
        assert_eq!(err.line, 15);
        assert!(err.message.contains("out of range"), "{err}");
        let err = parse(&door("\"7000/tcp\", \"7000/tcp\"")).unwrap_err();
        assert!(err.message.contains("appears twice"), "{err}");
        let err = parse(&door("\"7000/tcp\", \"62201/udp\"")).unwrap_err();
        assert!(err.message.contains("SPA port"), "{err}");
        let err = parse(&door("\"7000/tcp\", \"22/tcp\"")).unwrap_err();
        assert!(err.message.contains("protected service port"), "{err}");
        let err = parse(&door("\"7000/tcp\"")).unwrap_err();
        assert!(err.message.contains("at least 2 ports"), "{err}");

        let totp = |name: &str, port: u16, secret: &str| {
            format!("[totp-doors.{name}]\nfirst-port = {port}\nsecret = \"{secret}\"\nservices = [\"ssh\"]\n")
        };
        let good = "JBSWY3DPEHPK3PXPJBSWY3DP";
        let text = format!(
            "{}\n{}{}",
            base(),
            totp("a", 40001, good),
            totp("b", 40001, good)
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, 19);
        assert!(err.message.contains("unique first port"), "{err}");
        let err = parse(&format!("{}\n{}", base(), totp("a", 40001, "not base32!"))).unwrap_err();
        assert_eq!(err.line, 16);
        assert!(err.message.contains("base32"), "{err}");
        let text = format!(
            "{}\n{}port-range = \"20000-20002\"\n",
            base(),
            totp("a", 40001, good)
        );
        assert!(parse(&text)
            .unwrap_err()
            .message
            .contains("widen port-range"));
    }

    #[test]
    fn line_column_counts_from_one() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
