//! Turns an authenticated request into firewall work: which services, for which address, for
//! how long. Pure: config and request in, grants or a refusal out.

use std::net::IpAddr;
use std::time::Duration;

use spa_shared::payload::{Kind, Request};

use crate::config::{Client, Config, Service, ServiceKind};
use crate::firewall::Access;

/// What to do for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Open {
        address: IpAddr,
        grants: Vec<Access>,
    },
    Close {
        address: IpAddr,
        services: Vec<String>,
    },
}

/// Why a request is refused by policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyRefusal {
    #[error("client `{client}` may not open service `{service}`")]
    NotAllowed { client: String, service: String },
    #[error("client `{client}` asked for address {asked} but sent from {source_address}; set allow-address-override = true to permit this")]
    AddressOverride {
        client: String,
        asked: IpAddr,
        source_address: IpAddr,
    },
    #[error("client `{client}` has require-address but the packet names no address; send with `spa --address ADDRESS` (the public address the gateway sees)")]
    AddressMissing { client: String },
    #[error("client `{client}` has require-address; the packet is for {named} but came from {source_address} (stolen, or the client's public address changed)")]
    AddressMismatch {
        client: String,
        named: IpAddr,
        source_address: IpAddr,
    },
    #[error("service `{0}` forwards only {1}; nothing to open for this address family")]
    Family(String, &'static str),
}

impl PolicyRefusal {
    /// Whether the refusal depends on the observed source rather than on the packet itself:
    /// the same packet may still be granted from another address.
    pub fn depends_on_source(&self) -> bool {
        matches!(
            self,
            Self::AddressOverride { .. } | Self::AddressMismatch { .. } | Self::Family(..)
        )
    }
}

/// The grant length for one service: the request's (0 = the service default), capped by the
/// service's max-timeout and the client's max-duration.
pub fn duration_for(service: &Service, requested_secs: u32, cap: Option<Duration>) -> Duration {
    let wanted = if requested_secs == 0 {
        service.timeout
    } else {
        Duration::from_secs(u64::from(requested_secs))
    };
    let mut d = wanted.min(service.max_timeout);
    if let Some(cap) = cap {
        d = d.min(cap);
    }
    d.max(Duration::from_secs(1))
}

/// Whether `service` can be opened for an address of this family.
pub fn family_ok(service: &Service, address: IpAddr) -> Result<(), PolicyRefusal> {
    if service.kind != ServiceKind::Nat {
        return Ok(());
    }
    let forward = service
        .forward
        .as_ref()
        .expect("nat services have a target");
    match (
        address.is_ipv6(),
        forward.v4.is_some(),
        forward.v6.is_some(),
    ) {
        (false, false, _) => Err(PolicyRefusal::Family(service.name.clone(), "IPv6")),
        (true, _, false) => Err(PolicyRefusal::Family(service.name.clone(), "IPv4")),
        _ => Ok(()),
    }
}

/// Decides a request from `client` that arrived from `source`.
pub fn decide(
    config: &Config,
    client: &Client,
    request: &Request,
    source: IpAddr,
) -> Result<Decision, PolicyRefusal> {
    for name in &request.services {
        if !client.services.contains(name) {
            return Err(PolicyRefusal::NotAllowed {
                client: client.name.clone(),
                service: name.clone(),
            });
        }
    }
    if client.require_address {
        match request.address {
            None => {
                return Err(PolicyRefusal::AddressMissing {
                    client: client.name.clone(),
                })
            }
            Some(named) if named != source => {
                return Err(PolicyRefusal::AddressMismatch {
                    client: client.name.clone(),
                    named,
                    source_address: source,
                })
            }
            Some(_) => {}
        }
    }
    let address = match request.address {
        None => source,
        Some(asked) if asked == source => source,
        Some(asked) if client.allow_address_override => asked,
        Some(asked) => {
            return Err(PolicyRefusal::AddressOverride {
                client: client.name.clone(),
                asked,
                source_address: source,
            })
        }
    };
    let mut services: Vec<String> = request.services.clone();
    services.sort();
    services.dedup();
    match request.kind {
        Kind::Close => Ok(Decision::Close { address, services }),
        Kind::Open => {
            let mut grants = Vec::with_capacity(services.len());
            for name in &services {
                let service = &config.services[name];
                family_ok(service, address)?;
                grants.push(Access {
                    address,
                    service: name.clone(),
                    timeout: duration_for(service, request.duration_secs, client.max_duration),
                    idle: service.idle_timeout,
                    owner: client.name.clone(),
                });
            }
            Ok(Decision::Open { address, grants })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spa_shared::payload::Kind;
    use std::path::Path;

    const KEY: &str = "aGVsbG8gd29ybGQgdGhpcyBpcyAzMiBieXRlcyEhISE=";

    fn config(client_extra: &str) -> Config {
        let text = format!(
            "[server]\nprivate-key = \"k\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n[clients.alice]\npublic-key = \"{KEY}\"\nservices = [\"ssh\"]\n{client_extra}"
        );
        Config::parse(Path::new("/etc/spad/spad.toml"), &text).unwrap()
    }

    fn request(address: Option<IpAddr>) -> Request {
        Request {
            kind: Kind::Open,
            timestamp: 1,
            nonce: [0; 16],
            duration_secs: 0,
            address,
            services: vec!["ssh".into()],
        }
    }

    #[test]
    fn require_address_refuses_a_packet_resent_from_elsewhere() {
        let strict = config("require-address = true\n");
        let alice = &strict.clients["alice"];
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "203.0.113.66".parse().unwrap();
        // The packet names a; the thief re-sends it from b.
        assert_eq!(
            decide(&strict, alice, &request(Some(a)), b),
            Err(PolicyRefusal::AddressMismatch {
                client: "alice".into(),
                named: a,
                source_address: b,
            })
        );
        assert_eq!(
            decide(&strict, alice, &request(None), a),
            Err(PolicyRefusal::AddressMissing {
                client: "alice".into()
            })
        );
        let Ok(Decision::Open { address, .. }) = decide(&strict, alice, &request(Some(a)), a)
        else {
            panic!("a packet naming its own source opens");
        };
        assert_eq!(address, a);
        // Without require-address the same unnamed packet opens for whoever sent it.
        let loose = config("");
        assert!(decide(&loose, &loose.clients["alice"], &request(None), b).is_ok());
    }

    #[test]
    fn require_address_and_override_are_exclusive() {
        let text = format!(
            "[server]\nprivate-key = \"k\"\n[services.ssh]\nkind = \"management\"\nports = [\"22/tcp\"]\ntimeout = \"30s\"\n[clients.alice]\npublic-key = \"{KEY}\"\nservices = [\"ssh\"]\nallow-address-override = true\nrequire-address = true\n"
        );
        let err = Config::parse(Path::new("/etc/spad/spad.toml"), &text).unwrap_err();
        assert_eq!((err.line, err.column), (11, 19), "{err}");
        assert!(err.message.contains("contradicts"), "{err}");
    }
}
