//! `spad.toml`: parsing, validation and the typed configuration the daemon runs on.
//!
//! Every error names `file:line:col` and says what to write instead. Paths in the file are
//! relative to the file's own directory. See `docs/configuration.md` for the reference.
//!
//! One module per section: [`server`], [`services`], [`clients`]; the knock sections
//! (`[doors.*]`, `[totp-doors.*]`, `[knocking]`) are parsed by `crate::knock::config`.
//! [`span`] is the leaf every section uses for locations and durations.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::knock::config::{Doors, RawDoor, RawKnocking, RawTotpDoor};
use crate::net::PortProto;

pub mod clients;
mod knocking;
pub mod limits;
pub mod server;
pub mod services;
pub mod span;

pub use clients::Client;
pub use server::{BackendChoice, CaptureMode, Conceal, Server};
pub use services::{Forward, Service, ServiceKind};
// `crate::config::{at, resolve, Located}` keep working for code written before the split.
pub use span::Seconds;
#[allow(unused_imports)]
pub(crate) use span::{at, line_column, resolve, Located};

/// A configuration error with its location (`line` 0: the file as a whole).
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ConfigError {
    /// `file:line:col: message`, or `file: message` when no line applies.
    fn render(&self) -> String {
        if self.line == 0 {
            format!("{}: {}", self.file, self.message)
        } else {
            format!(
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    server: server::RawServer,
    #[serde(default)]
    services: BTreeMap<String, Spanned<services::RawService>>,
    #[serde(default)]
    clients: BTreeMap<String, Spanned<clients::RawClient>>,
    #[serde(default)]
    doors: BTreeMap<String, Spanned<RawDoor>>,
    #[serde(default)]
    totp_doors: BTreeMap<String, Spanned<RawTotpDoor>>,
    #[serde(default)]
    knocking: RawKnocking,
    #[serde(default)]
    fwknop_clients: BTreeMap<String, Spanned<crate::fwknop::config::RawFwknopClient>>,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub server: Server,
    pub services: BTreeMap<String, Service>,
    pub clients: BTreeMap<String, Client>,
    pub doors: Doors,
    /// `[fwknop-clients.NAME]`: unmodified fwknop 2.x clients (see `crate::fwknop`).
    pub fwknop_clients: BTreeMap<String, crate::fwknop::FwknopClient>,
}

impl Config {
    /// Reads and validates a file. A file that cannot be read is reported as such (with no
    /// line); one that is not UTF-8 at the line and column of its first bad byte.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            message: match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "missing: no such file; start from conf/spad.toml (README, First use) or pass -c FILE"
                        .to_string()
                }
                _ => format!("cannot read: {e}"),
            },
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            // The valid prefix is text, so line and column count characters as elsewhere.
            let prefix = String::from_utf8_lossy(valid);
            let (line, column) = line_column(&prefix, prefix.len());
            ConfigError {
                file: file.clone(),
                line,
                column,
                message: format!(
                    "not UTF-8 (byte 0x{:02x}); save the file as UTF-8",
                    e.as_bytes()[valid.len()]
                ),
            }
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

/// Validates each section in dependency order: server, services, clients, then the doors.
fn build(raw: RawConfig, path: &Path, base: &Path, text: &str) -> Result<Config, Located> {
    let interfaces = server::Interfaces::of_host();
    let server = server::build(&raw.server, base, &interfaces)?;
    let services = services::build(&raw.services, &server, &interfaces)?;
    let clients = clients::build(&raw.clients, &services, base)?;
    knocking::check(text)?;
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
    let fwknop_clients = crate::fwknop::config::build(&raw.fwknop_clients, &services, base)?;
    Ok(Config {
        path: path.to_path_buf(),
        server,
        services,
        clients,
        doors,
        fwknop_clients,
    })
}

#[cfg(test)]
mod tests;
