//! The `[clients.*]` sections: who may send SPA packets, with which key, for which services.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use spa_shared::keys::PublicKey;
use toml::Spanned;

use super::limits::name_problem;
use super::services::Service;
use super::span::{at, resolve, Located, Seconds};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawClient {
    public_key: Option<Spanned<String>>,
    public_key_file: Option<Spanned<String>>,
    services: Vec<Spanned<String>>,
    max_duration: Option<Spanned<Seconds>>,
    #[serde(default)]
    allow_address_override: bool,
    #[serde(default)]
    require_address: Option<Spanned<bool>>,
}

/// One SPA client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    pub public_key: PublicKey,
    pub services: Vec<String>,
    pub max_duration: Option<Duration>,
    pub allow_address_override: bool,
    /// Every packet must name the address it is for, and that must be its observed source
    /// (fwknop's `REQUIRE_SOURCE_ADDRESS`): a packet withheld and re-sent from elsewhere fails.
    pub require_address: bool,
}

/// Validates every `[clients.*]` section against the services; each key belongs to one client.
pub(super) fn build(
    raw: &BTreeMap<String, Spanned<RawClient>>,
    services: &BTreeMap<String, Service>,
    base: &Path,
) -> Result<BTreeMap<String, Client>, Located> {
    let mut clients = BTreeMap::new();
    let mut seen_keys: BTreeMap<PublicKey, String> = BTreeMap::new();
    for (name, spanned) in raw {
        let client = spanned.get_ref();
        if let Some(problem) = name_problem(name) {
            return Err(at(spanned, format!("client {problem}")));
        }
        if let Some(zero) = client
            .max_duration
            .as_ref()
            .filter(|d| d.get_ref().0.is_zero())
        {
            return Err(at(
                zero,
                "max-duration = 0 would cap every grant at nothing; leave it out for the services' own max-timeout, or write e.g. \"1h\"",
            ));
        }
        let require_address = client.require_address.as_ref();
        if let Some(both) =
            require_address.filter(|r| *r.get_ref() && client.allow_address_override)
        {
            return Err(at(
                both,
                "require-address (the packet's address must be its source) contradicts allow-address-override (it may name another); keep one",
            ));
        }
        let public_key = public_key(name, spanned, base)?;
        if let Some(other) = seen_keys.insert(public_key, name.clone()) {
            return Err(at(
                spanned,
                format!("client `{name}` has the same public key as `{other}`; give each client its own key"),
            ));
        }
        let wanted = super::services::known(&client.services, services)?;
        clients.insert(
            name.clone(),
            Client {
                name: name.clone(),
                public_key,
                services: wanted,
                max_duration: client.max_duration.as_ref().map(|d| d.get_ref().0),
                allow_address_override: client.allow_address_override,
                require_address: require_address.is_some_and(|r| *r.get_ref()),
            },
        );
    }
    Ok(clients)
}

/// The client's key, from `public-key` or `public-key-file` (exactly one of them).
fn public_key(name: &str, spanned: &Spanned<RawClient>, base: &Path) -> Result<PublicKey, Located> {
    let client = spanned.get_ref();
    match (&client.public_key, &client.public_key_file) {
        (Some(text), None) => PublicKey::from_base64(text.get_ref())
            .map_err(|e| at(text, format!("public-key {e}"))),
        (None, Some(file)) => {
            let full = resolve(base, file.get_ref());
            let content = std::fs::read_to_string(&full).map_err(|e| {
                at(file, format!("cannot read {}: {e}; create it with `spa pubkey < KEY > {}`", full.display(), full.display()))
            })?;
            PublicKey::from_base64(&content)
                .map_err(|e| at(file, format!("{} {e}", full.display())))
        }
        _ => Err(at(
            spanned,
            format!("client `{name}` needs exactly one of public-key = \"…\" or public-key-file = \"…\""),
        )),
    }
}
