//! What a fwknop request may open: pure, from (config, client, message, source) to a decision.
//!
//! `-A proto/port,…` is granted only when every requested port belongs to a service the client
//! may use; the grant is that whole service. `-N internal:port` (sent with `-A proto/public`)
//! is honoured only when an allowed `nat` service forwards that public port to exactly that
//! target. `--nat-local` is honoured only for the same local port (it is then a plain access).
//! `-f` is capped by the client's max-timeout and the service's.

use std::net::IpAddr;

use spa_shared::fwknop::{Message, Proto as WireProto};

use super::config::FwknopClient;
use crate::config::{Config, ServiceKind};
use crate::firewall::Access;
use crate::net::{PortProto, Proto};
use crate::policy::{duration_for, family_ok, Decision, PolicyRefusal};

/// Why a decoded fwknop request is refused by policy.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FwknopRefusal {
    #[error("requested {0} is not a port of any service this client may open")]
    PortNotAllowed(PortProto),
    #[error("packet asks for {asked} but came from {source_address}; require-source-address = true (set it to false to let a client open for another address)")]
    AddressMismatch {
        asked: IpAddr,
        source_address: IpAddr,
    },
    #[error("packet carries no address (fwknop -s) and require-source-address = true; use -a or -R on the client, or set require-source-address = false")]
    NoAddress,
    #[error("NAT to {target} for public {public} is not an allowed nat service of this client")]
    NatNotAllowed { target: String, public: PortProto },
    #[error("--nat-local to another port ({0}) is not supported; request the local port with -A")]
    LocalNat(u16),
    #[error("{0}")]
    Policy(#[from] PolicyRefusal),
}

fn port_proto(access: &spa_shared::fwknop::Access) -> PortProto {
    PortProto {
        port: access.port,
        proto: match access.proto {
            WireProto::Tcp => Proto::Tcp,
            WireProto::Udp => Proto::Udp,
        },
    }
}

/// The owner recorded on fwknop grants: names the protocol in logs, status and the kernel.
pub fn owner(client: &FwknopClient) -> String {
    format!("fwknop:{}", client.name)
}

/// Decides a request from `client` that arrived from `source`.
pub fn decide(
    config: &Config,
    client: &FwknopClient,
    message: &Message,
    source: IpAddr,
) -> Result<Decision, FwknopRefusal> {
    let asked = IpAddr::V4(message.allow_ip);
    let address = if message.allow_ip.is_unspecified() {
        if client.require_source_address {
            return Err(FwknopRefusal::NoAddress);
        }
        source
    } else if asked == source || !client.require_source_address {
        asked
    } else {
        return Err(FwknopRefusal::AddressMismatch {
            asked,
            source_address: source,
        });
    };
    let allowed = client.services.iter().map(|n| &config.services[n]);
    let mut names: Vec<String> = Vec::new();
    for access in &message.access {
        let wanted = port_proto(access);
        let service = match message.nat {
            Some(nat) if !message.kind.is_local_nat() => {
                let target = std::net::SocketAddr::from((nat.address, nat.port));
                allowed
                    .clone()
                    .find(|s| {
                        s.kind == ServiceKind::Nat
                            && s.ports == [wanted]
                            && s.forward.as_ref().and_then(|f| f.v4) == Some(target)
                    })
                    .ok_or(FwknopRefusal::NatNotAllowed {
                        target: target.to_string(),
                        public: wanted,
                    })?
            }
            Some(nat) if nat.port != wanted.port => return Err(FwknopRefusal::LocalNat(nat.port)),
            _ => allowed
                .clone()
                .find(|s| s.ports.contains(&wanted))
                .ok_or(FwknopRefusal::PortNotAllowed(wanted))?,
        };
        if !names.contains(&service.name) {
            names.push(service.name.clone());
        }
    }
    let requested = message.client_timeout.unwrap_or(0);
    let mut grants = Vec::with_capacity(names.len());
    for name in names {
        let service = &config.services[&name];
        family_ok(service, address)?;
        grants.push(Access {
            address,
            timeout: duration_for(service, requested, client.max_timeout),
            idle: service.idle_timeout,
            owner: owner(client),
            service: name,
        });
    }
    Ok(Decision::Open { address, grants })
}
