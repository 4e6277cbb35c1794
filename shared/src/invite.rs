//! Enrollment invitations: the `spa://` URI that `spad invite` prints (and shows as a QR code)
//! and `spa enroll` reads. It carries what a client needs to reach the gateway and nothing
//! secret:
//!
//! ```text
//! spa://HOST[:PORT]/NAME?key=SERVER_PUBLIC_KEY&services=ssh,vpn[&probe=22]
//! ```
//!
//! `HOST` is a DNS name, an IPv4 address or a bracketed IPv6 address; `PORT` defaults to 62201;
//! `NAME` is the profile name on the device; `key` is the gateway's X25519 public key in
//! unpadded base64url (no percent-encoding needed); `probe` is a TCP port that `spa knock
//! --wait` may connect to after knocking. Unknown parameters are refused rather than ignored,
//! so a newer invite never enrolls a device half-configured.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::keys::PublicKey;
use crate::payload::valid_service_name;

/// The SPA port when an invite names none.
pub const DEFAULT_PORT: u16 = 62201;
/// Longest accepted URI (a QR code of this length is still easy to scan).
pub const MAX_URI_LEN: usize = 1024;

/// What an enrollment URI carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// Gateway host name or address (IPv6 without brackets).
    pub server: String,
    pub port: u16,
    pub server_key: PublicKey,
    pub services: Vec<String>,
    /// Profile name on the device.
    pub name: String,
    /// A TCP port of the granted services that answers once the grant is in place.
    pub probe_port: Option<u16>,
}

/// Why a URI is not an invitation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    #[error("an enrollment URI starts with spa://")]
    Scheme,
    #[error("the URI is longer than {MAX_URI_LEN} characters")]
    TooLong,
    #[error("`{0}` is not a host name, an IPv4 address or a bracketed IPv6 address")]
    Host(String),
    #[error("`{0}` is not a port (1-65535)")]
    Port(String),
    #[error("profile name `{0}` must be 1-64 of [A-Za-z0-9._-], not starting with . or -")]
    Name(String),
    #[error("`{0}` is not a valid gateway public key")]
    Key(String),
    #[error("service name `{0}` must be 1-32 of [a-z0-9_-]")]
    Service(String),
    #[error("the URI has no {0}")]
    Missing(&'static str),
    #[error("parameter `{0}` is given twice")]
    Duplicate(String),
    #[error("unknown parameter `{0}` (is this client older than the gateway?)")]
    Unknown(String),
}

/// Whether `name` is usable as a profile (and file) name.
pub fn valid_profile_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_host_name(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Invite {
    /// The `spa://` text form.
    pub fn to_uri(&self) -> String {
        let host = if self.server.contains(':') {
            format!("[{}]", self.server)
        } else {
            self.server.clone()
        };
        let mut uri = format!(
            "spa://{host}:{}/{}?key={}&services={}",
            self.port,
            self.name,
            URL_SAFE_NO_PAD.encode(self.server_key.as_bytes()),
            self.services.join(",")
        );
        if let Some(port) = self.probe_port {
            uri.push_str(&format!("&probe={port}"));
        }
        uri
    }

    /// Parses and validates a `spa://` URI (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, InviteError> {
        let text = text.trim();
        if text.len() > MAX_URI_LEN {
            return Err(InviteError::TooLong);
        }
        let rest = text
            .strip_prefix("spa://")
            .or_else(|| text.strip_prefix("SPA://"))
            .ok_or(InviteError::Scheme)?;
        let (authority, rest) = rest.split_once('/').ok_or(InviteError::Missing("name"))?;
        let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (server, port) = parse_authority(authority)?;
        if !valid_profile_name(name) {
            return Err(InviteError::Name(name.into()));
        }
        let (mut key, mut services, mut probe) = (None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match k {
                "key" => &mut key,
                "services" => &mut services,
                "probe" => &mut probe,
                other => return Err(InviteError::Unknown(other.chars().take(32).collect())),
            };
            if slot.replace(v).is_some() {
                return Err(InviteError::Duplicate(k.into()));
            }
        }
        let key = key.ok_or(InviteError::Missing("key"))?;
        let server_key = URL_SAFE_NO_PAD
            .decode(key)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(PublicKey)
            .ok_or_else(|| InviteError::Key(key.chars().take(64).collect()))?;
        let mut list: Vec<String> = Vec::new();
        for s in services.ok_or(InviteError::Missing("services"))?.split(',') {
            if !valid_service_name(s) || list.iter().any(|x| x == s) {
                return Err(InviteError::Service(s.chars().take(32).collect()));
            }
            list.push(s.to_string());
        }
        let probe_port = probe.map(parse_port).transpose()?;
        Ok(Invite {
            server,
            port,
            server_key,
            services: list,
            name: name.to_string(),
            probe_port,
        })
    }
}

fn parse_port(text: &str) -> Result<u16, InviteError> {
    match text.parse::<u16>() {
        Ok(p) if p != 0 && !text.starts_with('+') => Ok(p),
        _ => Err(InviteError::Port(text.chars().take(16).collect())),
    }
}

fn parse_authority(authority: &str) -> Result<(String, u16), InviteError> {
    let bad_host = || InviteError::Host(authority.chars().take(64).collect());
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(bad_host)?;
        let v6: std::net::Ipv6Addr = inside.parse().map_err(|_| bad_host())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad_host)?),
        };
        (v6.to_string(), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if !valid_host_name(host) {
            return Err(bad_host());
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = port.map(parse_port).transpose()?.unwrap_or(DEFAULT_PORT);
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Invite {
        Invite {
            server: "gw.example.net".into(),
            port: 62201,
            server_key: PublicKey([7; 32]),
            services: vec!["ssh".into(), "vpn".into()],
            name: "alice-phone".into(),
            probe_port: Some(22),
        }
    }

    #[test]
    fn round_trip_and_text_form() {
        let uri = sample().to_uri();
        assert_eq!(
            uri,
            "spa://gw.example.net:62201/alice-phone?key=BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc&services=ssh,vpn&probe=22"
        );
        assert_eq!(Invite::parse(&uri).unwrap(), sample());
    }

    #[test]
    fn ipv6_hosts_are_bracketed_and_port_defaults() {
        let mut v6 = sample();
        v6.server = "2001:db8::1".into();
        assert!(v6.to_uri().starts_with("spa://[2001:db8::1]:62201/"));
        assert_eq!(Invite::parse(&v6.to_uri()).unwrap(), v6);
        let no_port =
            "spa://203.0.113.1/x?key=BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc&services=ssh";
        let parsed = Invite::parse(no_port).unwrap();
        assert_eq!((parsed.port, parsed.probe_port), (DEFAULT_PORT, None));
    }

    #[test]
    fn bad_invites_say_what_is_wrong() {
        let ok = sample().to_uri();
        let cases = [
            (ok.replace("spa://", "http://"), InviteError::Scheme),
            (
                ok.replace("alice-phone", "../etc"),
                InviteError::Name("../etc".into()),
            ),
            (ok.replace(":62201", ":0"), InviteError::Port("0".into())),
            (
                ok.replace("&probe=22", "&probe=22&probe=23"),
                InviteError::Duplicate("probe".into()),
            ),
            (
                ok.replace("&probe=22", "&secret=x"),
                InviteError::Unknown("secret".into()),
            ),
            (
                ok.replace("ssh,vpn", "ssh,ssh"),
                InviteError::Service("ssh".into()),
            ),
            (
                ok.replace("gw.example.net", "gw_x"),
                InviteError::Host("gw_x:62201".into()),
            ),
            (
                ok.replace("&services=ssh,vpn", ""),
                InviteError::Missing("services"),
            ),
        ];
        for (uri, want) in cases {
            assert_eq!(Invite::parse(&uri), Err(want), "{uri}");
        }
        assert!(matches!(
            Invite::parse(&ok.replace("key=B", "key=")),
            Err(InviteError::Key(_))
        ));
    }

    proptest! {
        #[test]
        fn parsing_any_text_never_panics(text in ".{0,300}") {
            let _ = Invite::parse(&text);
        }

        #[test]
        fn every_valid_invite_round_trips(
            name in "[a-z0-9][a-z0-9._-]{0,20}",
            port in 1u16..,
            key in any::<[u8; 32]>(),
            probe in proptest::option::of(1u16..),
            v6 in any::<bool>(),
        ) {
            let invite = Invite {
                server: if v6 { "fd00::1".into() } else { "gw.example.net".into() },
                port,
                server_key: PublicKey(key),
                services: vec!["ssh".into()],
                name,
                probe_port: probe,
            };
            prop_assert_eq!(Invite::parse(&invite.to_uri()).unwrap(), invite);
        }
    }
}
