//! The `[services.*]` sections: what a grant opens (local ports or a per-client DNAT forward).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use spa_shared::payload::valid_service_name;
use toml::Spanned;

use super::server::{Interfaces, Server};
use super::span::{at, Located, Seconds};
use crate::net::{Cidr, PortProto, Proto};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawService {
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

/// Which service owns each port so far, to refuse overlaps between services.
#[derive(Default)]
struct PortOwners {
    nat_public: BTreeMap<PortProto, String>,
    /// Local ports, with the service and the interface it is protected on (`None`: all).
    local: BTreeMap<PortProto, Vec<(String, Option<String>)>>,
}

impl PortOwners {
    /// Records `port` for service `name`, refusing a port that is both local and forwarded,
    /// forwarded twice, or local to two services on one interface (a grant for one service
    /// would then open the other's port too).
    fn claim(
        &mut self,
        port: PortProto,
        service: &RawService,
        name: &str,
        text: &Spanned<String>,
    ) -> Result<(), Located> {
        let kind = service.kind;
        if kind == ServiceKind::Nat {
            if let Some(other) = self.nat_public.insert(port, name.to_string()) {
                return Err(at(
                    text,
                    format!("public port {port} is already forwarded by service `{other}`; NAT public ports must not overlap"),
                ));
            }
            if let Some((other, _)) = self.local.get(&port).and_then(|o| o.first()) {
                return Err(at(text, format!("public port {port} is a local port of service `{other}`; a port is either local or forwarded")));
            }
        } else {
            if let Some(other) = self.nat_public.get(&port) {
                return Err(at(text, format!("{port} is forwarded by NAT service `{other}`; a port is either local or forwarded")));
            }
            let interface = service.interface.as_ref().map(|i| i.get_ref().clone());
            let owners = self.local.entry(port).or_default();
            let overlapping = owners
                .iter()
                .find(|(_, other)| other.is_none() || interface.is_none() || *other == interface);
            if let Some((other, _)) = overlapping {
                return Err(at(text, format!("{port} is already a port of service `{other}`: a grant for either would open it for both; keep the port in one service and list that service for the clients that need it (or protect each on its own `interface`)")));
            }
            owners.push((name.to_string(), interface));
        }
        Ok(())
    }
}

/// Validates every `[services.*]` section.
pub(super) fn build(
    raw: &BTreeMap<String, Spanned<RawService>>,
    server: &Server,
    interfaces: &Interfaces,
) -> Result<BTreeMap<String, Service>, Located> {
    let mut owners = PortOwners::default();
    let mut services = BTreeMap::new();
    for (name, spanned) in raw {
        let service = build_one(name, spanned, server, interfaces, &mut owners)?;
        services.insert(name.clone(), service);
    }
    Ok(services)
}

fn build_one(
    name: &str,
    spanned: &Spanned<RawService>,
    server: &Server,
    interfaces: &Interfaces,
    owners: &mut PortOwners,
) -> Result<Service, Located> {
    let here = |message: String| Located {
        span: spanned.span(),
        message,
    };
    if !valid_service_name(name) {
        return Err(here(format!(
            "service name `{name}` must be 1-32 of [a-z0-9_-]"
        )));
    }
    let service = spanned.get_ref();
    if service.ports.is_empty() {
        return Err(here(format!(
            "service `{name}` has no ports; write ports = [\"22/tcp\"]"
        )));
    }
    let ports = ports(name, service, server, owners)?;
    let mut allow = Vec::new();
    for entry in &service.allow {
        allow.push(entry.get_ref().parse::<Cidr>().map_err(|e| at(entry, e))?);
    }
    let interface = service
        .interface
        .as_ref()
        .map(|i| interfaces.check(i))
        .transpose()?;
    let forward = forward(name, spanned)?;
    let max_timeout = service.max_timeout.map_or(service.timeout.0, |m| m.0);
    if service.timeout.0.is_zero() || max_timeout < service.timeout.0 {
        return Err(here(format!(
            "service `{name}`: timeout must be > 0 and max-timeout at least timeout"
        )));
    }
    if service.idle_timeout.is_some_and(|i| i.0.is_zero()) {
        return Err(here(format!(
            "service `{name}`: idle-timeout must be > 0 (leave it out for none)"
        )));
    }
    Ok(Service {
        name: name.to_string(),
        kind: service.kind,
        ports,
        timeout: service.timeout.0,
        max_timeout,
        idle_timeout: service.idle_timeout.map(|i| i.0),
        allow,
        interface,
        forward,
    })
}

/// The service's ports, each checked against the SPA port, itself and other services.
fn ports(
    name: &str,
    service: &RawService,
    server: &Server,
    owners: &mut PortOwners,
) -> Result<Vec<PortProto>, Located> {
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
        owners.claim(port, service, name, text)?;
        ports.push(port);
    }
    Ok(ports)
}

/// The DNAT target of a NAT service (`None` for other kinds).
fn forward(name: &str, spanned: &Spanned<RawService>) -> Result<Option<Forward>, Located> {
    let service = spanned.get_ref();
    if service.kind != ServiceKind::Nat {
        if let Some(t) = service
            .forward_to
            .as_ref()
            .or(service.forward_to_v6.as_ref())
        {
            return Err(at(t, "forward-to only applies to kind = \"nat\""));
        }
        return Ok(None);
    }
    let v4 = service
        .forward_to
        .as_ref()
        .map(|t| forward_target(t, false))
        .transpose()?;
    let v6 = service
        .forward_to_v6
        .as_ref()
        .map(|t| forward_target(t, true))
        .transpose()?;
    if v4.is_none() && v6.is_none() {
        return Err(at(
            spanned,
            format!("NAT service `{name}` needs forward-to = \"192.168.1.12:3389\" (and/or forward-to-v6)"),
        ));
    }
    if service.ports.len() != 1 {
        return Err(at(
            &service.ports[0],
            "a NAT service forwards exactly one public port; make one service per forward",
        ));
    }
    Ok(Some(Forward { v4, v6 }))
}

/// One `forward-to`/`forward-to-v6` value: a unicast address of the right family and a port.
fn forward_target(t: &Spanned<String>, want_v6: bool) -> Result<SocketAddr, Located> {
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
}

/// The service names a client lists, each checked against the defined services (for spa and
/// fwknop clients alike).
pub(crate) fn known(
    listed: &[Spanned<String>],
    services: &BTreeMap<String, Service>,
) -> Result<Vec<String>, Located> {
    listed
        .iter()
        .map(|service| {
            if services.contains_key(service.get_ref()) {
                Ok(service.get_ref().clone())
            } else {
                let known = services.keys().cloned().collect::<Vec<_>>().join(", ");
                Err(at(
                    service,
                    format!(
                        "unknown service `{}`; defined services: {known}",
                        service.get_ref()
                    ),
                ))
            }
        })
        .collect()
}
