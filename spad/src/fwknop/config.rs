//! `[fwknop-clients.NAME]`: the shared keys and limits of each unmodified fwknop client.
//!
//! Errors carry `file:line:col` like the rest of `spad.toml` (see [`crate::config`]).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use spa_shared::fwknop::{HmacDigest, Keys};
use toml::Spanned;

use crate::config::{at, resolve, Located, Seconds, Service};

/// fwknopd's default `MAX_SPA_PACKET_AGE`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(120);
/// The longest max-age accepted: replay digests are kept this long at most.
pub const MAX_MAX_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawFwknopClient {
    key_base64: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    hmac_key_base64: Option<Spanned<String>>,
    hmac_key_file: Option<Spanned<String>>,
    hmac_digest: Option<Spanned<String>>,
    services: Vec<Spanned<String>>,
    require_source_address: Option<bool>,
    max_timeout: Option<Seconds>,
    max_age: Option<Spanned<Seconds>>,
}

/// One fwknop client, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwknopClient {
    pub name: String,
    pub keys: Keys,
    /// Services its `-A proto/port` (and `-N`) requests may open.
    pub services: Vec<String>,
    /// The address in the packet must be the packet's source; `-s` (0.0.0.0) is refused.
    pub require_source_address: bool,
    /// Caps `-f` (and the service's max-timeout still applies).
    pub max_timeout: Option<Duration>,
    /// How far the packet's timestamp may be from now, either way.
    pub max_age: Duration,
}

/// The client section being checked: its name, and the span of the whole section for the
/// refusals that belong to no single key.
struct Section<'a> {
    name: &'a str,
    whole: Range<usize>,
}

impl Section<'_> {
    fn refuse(&self, message: String) -> Located {
        Located {
            span: self.whole.clone(),
            message,
        }
    }
}

fn key_bytes(
    base: &Path,
    section: &Section,
    inline: &Option<Spanned<String>>,
    file: &Option<Spanned<String>>,
    what: &str,
) -> Result<Vec<u8>, Located> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (text, spanned) = match (inline, file) {
        (Some(text), None) => (zeroize::Zeroizing::new(text.get_ref().clone()), text),
        (None, Some(file)) => {
            let path = resolve(base, file.get_ref());
            let text =
                crate::keyfile::read_secret_text(&path).map_err(|e| at(file, e.to_string()))?;
            (text, file)
        }
        _ => {
            let name = section.name;
            return Err(section.refuse(format!("fwknop client `{name}` needs exactly one of {what}-base64 = \"…\" (as `fwknop --key-gen` prints it) or {what}-file = \"…\" (mode 0600)")));
        }
    };
    let bytes = b64.decode(text.trim()).map_err(|_| {
        at(
            spanned,
            format!(
                "{what} is not base64; paste the {} line of `fwknop --key-gen`",
                if what == "key" {
                    "KEY_BASE64"
                } else {
                    "HMAC_KEY_BASE64"
                }
            ),
        )
    })?;
    if bytes.is_empty() || bytes.len() > spa_shared::fwknop::wire::MAX_KEY_LEN {
        return Err(at(spanned, format!("{what} must decode to 1-128 bytes")));
    }
    Ok(bytes)
}

/// Validates every `[fwknop-clients.NAME]` against the defined services.
pub(crate) fn build(
    raw: &BTreeMap<String, Spanned<RawFwknopClient>>,
    services: &BTreeMap<String, Service>,
    base: &Path,
) -> Result<BTreeMap<String, FwknopClient>, Located> {
    let mut out = BTreeMap::new();
    let mut seen_hmac: Vec<(Vec<u8>, String)> = Vec::new();
    for (name, spanned) in raw {
        let client = fwknop_client(name, spanned, services, base, &mut seen_hmac)?;
        out.insert(name.clone(), client);
    }
    Ok(out)
}

/// One client; `seen_hmac` holds the HMAC keys of the clients before it (each must differ).
fn fwknop_client(
    name: &str,
    spanned: &Spanned<RawFwknopClient>,
    services: &BTreeMap<String, Service>,
    base: &Path,
    seen_hmac: &mut Vec<(Vec<u8>, String)>,
) -> Result<FwknopClient, Located> {
    let client = spanned.get_ref();
    let section = Section {
        name,
        whole: spanned.span(),
    };
    if !spa_shared::payload::valid_service_name(name) {
        return Err(section.refuse(format!(
            "fwknop client name `{name}` must be 1-32 of [a-z0-9_-]"
        )));
    }
    let key = key_bytes(base, &section, &client.key_base64, &client.key_file, "key")?;
    let hmac = key_bytes(
        base,
        &section,
        &client.hmac_key_base64,
        &client.hmac_key_file,
        "hmac-key",
    )?;
    let digest = hmac_digest(&client.hmac_digest)?;
    if let Some((_, other)) = seen_hmac.iter().find(|(k, _)| *k == hmac) {
        return Err(section.refuse(format!("fwknop client `{name}` has the same HMAC key as `{other}`; the HMAC key tells clients apart, give each its own (`fwknop --key-gen`)")));
    }
    seen_hmac.push((hmac.clone(), name.to_string()));
    if client.services.is_empty() {
        return Err(section.refuse(format!(
            "fwknop client `{name}` has no services; write services = [\"ssh\"]"
        )));
    }
    let wanted = crate::config::services::known(&client.services, services)?;
    let max_age = max_age(&client.max_age)?;
    if client.max_timeout.is_some_and(|m| m.0.is_zero()) {
        return Err(section.refuse(format!("fwknop client `{name}`: max-timeout must be > 0 (leave it out for the services' own limits)")));
    }
    let keys = Keys::new(key, hmac, digest)
        .map_err(|e| section.refuse(format!("fwknop client `{name}`: {e}")))?;
    Ok(FwknopClient {
        name: name.to_string(),
        keys,
        services: wanted,
        require_source_address: client.require_source_address.unwrap_or(true),
        max_timeout: client.max_timeout.map(|m| m.0),
        max_age,
    })
}

/// `hmac-digest`, fwknop's default (SHA-256) when absent.
fn hmac_digest(digest: &Option<Spanned<String>>) -> Result<HmacDigest, Located> {
    match digest {
        None => Ok(HmacDigest::default()),
        Some(d) => HmacDigest::parse(d.get_ref()).ok_or_else(|| {
            at(d, format!("unknown hmac-digest `{}`; write one of \"sha1\", \"sha256\" (fwknop's default), \"sha384\", \"sha512\"", d.get_ref()))
        }),
    }
}

/// `max-age`, between 1 s and [`MAX_MAX_AGE`]; [`DEFAULT_MAX_AGE`] when absent.
fn max_age(max_age: &Option<Spanned<Seconds>>) -> Result<Duration, Located> {
    let Some(m) = max_age else {
        return Ok(DEFAULT_MAX_AGE);
    };
    let value = m.get_ref().0;
    if value.is_zero() || value > MAX_MAX_AGE {
        return Err(at(
            m,
            "max-age must be between 1s and 10m; fwknop's default is \"120s\"",
        ));
    }
    Ok(value)
}
