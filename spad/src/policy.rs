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
    #[error("service `{0}` forwards only {1}; nothing to open for this address family")]
    Family(String, &'static str),
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
