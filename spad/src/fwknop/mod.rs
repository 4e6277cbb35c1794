//! Unmodified fwknop 2.x clients on the SPA port: which configured client sent a datagram,
//! whether it is fresh, and what it may open. The wire format itself is decoded in
//! [`spa_shared::fwknop`]; the daemon drives this from `Pipeline::handle_spa` when a datagram
//! fails the spa v1 pre-check and fwknop clients are configured.
//!
//! [`config`] parses `[fwknop-clients.NAME]`, [`policy`] decides, [`import`] turns fwknopd's
//! `access.conf` into that section.

pub mod config;
pub mod import;
pub mod policy;

use std::collections::BTreeMap;

use spa_shared::fwknop::{self as wire_format, wire, FwknopError, Message};
use spa_shared::Micros;

pub use config::FwknopClient;

/// An authenticated, fresh fwknop request.
#[derive(Debug)]
pub struct Opened<'a> {
    pub client: &'a FwknopClient,
    pub message: Message,
    /// The replay identity of the datagram (SHA-256 of the bytes received).
    pub digest: [u8; 32],
    /// Until when the digest must be remembered: the packet's time plus max-age.
    pub keep_until: Micros,
}

/// Why a datagram was refused before policy; names the client once its HMAC matched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenRefusal {
    /// No client could be identified: garbage, an unknown key, or a packet we cannot read.
    #[error("{0}")]
    Unauthenticated(FwknopError),
    #[error("client={client} {error}")]
    Client { client: String, error: FwknopError },
}

impl OpenRefusal {
    /// Refusals that cost no more than the cheap pre-check (counted as pre-check drops).
    pub fn is_precheck(&self) -> bool {
        matches!(
            self,
            OpenRefusal::Unauthenticated(FwknopError::NotFwknop(_) | FwknopError::NoHmacMatch)
        )
    }
}

/// Whether a datagram is worth trying as fwknop at all: base64 text of a plausible length.
/// Costs one pass over the bytes and no key.
pub fn looks_like(datagram: &[u8]) -> bool {
    wire::precheck(datagram).is_ok()
}

/// Whether `len` characters could be a packet without HMAC (salted header plus whole AES
/// blocks, base64 with the 10-character prefix removed). Keeps the diagnosis below rare.
fn plausible_without_hmac(len: usize) -> bool {
    let full = len + wire::SALTED_PREFIX.len();
    let bytes = full * 3 / 4;
    bytes >= 32 && (bytes - 16) % 16 == 0 && (4 * bytes).div_ceil(3) == full
}

/// Finds the client whose HMAC matches (one HMAC per client, nothing decrypted before), then
/// decrypts, parses and checks the timestamp against that client's max-age.
pub fn open<'a>(
    clients: &'a BTreeMap<String, FwknopClient>,
    datagram: &[u8],
    now: Micros,
) -> Result<Opened<'a>, OpenRefusal> {
    wire::precheck(datagram).map_err(OpenRefusal::Unauthenticated)?;
    let Some((client, ciphertext)) = clients
        .values()
        .find_map(|c| wire::authenticate(datagram, &c.keys).ok().map(|t| (c, t)))
    else {
        return Err(OpenRefusal::Unauthenticated(diagnose(clients, datagram)));
    };
    let refuse = |error| OpenRefusal::Client {
        client: client.name.clone(),
        error,
    };
    let plain = wire::decrypt(ciphertext, &client.keys).map_err(refuse)?;
    let message = wire_format::message::parse(&plain).map_err(refuse)?;
    let max_age = client.max_age.as_secs();
    wire_format::check_age(message.timestamp, now / 1_000_000, max_age).map_err(refuse)?;
    let keep_until = message
        .timestamp
        .saturating_add(max_age + 1)
        .saturating_mul(1_000_000);
    Ok(Opened {
        client,
        message,
        digest: wire_format::replay_digest(datagram),
        keep_until,
    })
}

/// Names the likely reason when no HMAC matched, for the log only.
fn diagnose(clients: &BTreeMap<String, FwknopClient>, datagram: &[u8]) -> FwknopError {
    if datagram.len() >= wire::GPG_MIN_TEXT {
        return FwknopError::Gpg;
    }
    if plausible_without_hmac(datagram.len())
        && clients
            .values()
            .any(|c| wire::is_without_hmac(datagram, &c.keys))
    {
        return FwknopError::NoHmac;
    }
    FwknopError::NoHmacMatch
}

#[cfg(test)]
mod tests;
