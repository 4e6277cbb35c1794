//! The backend-neutral rule model: what must hold in the kernel for a configuration, built
//! once and rendered by both backends ([`super::nftables`] as `nft -f` text, [`super::iptables`]
//! as `iptables-restore` input). A rule written here is enforced alike on both.
//!
//! The plan is a pure function of the configuration and of what spad observed on the host
//! (established connections to admit, listeners to spare), so it is tested without a kernel.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::established::{Flow, Observed};
use crate::config::{Conceal, Config, Service, ServiceKind};
use crate::net::{Cidr, PortProto, Proto};

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(address: IpAddr) -> Self {
        if address.is_ipv6() {
            Family::V6
        } else {
            Family::V4
        }
    }

    fn digit(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }
}

/// What a set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetRole {
    /// Granted addresses of a service, each with the grant's timeout.
    Grant,
    /// Idle timers of a service, re-armed by traffic in the kernel.
    Idle,
    /// Sources whose knocks are ignored.
    Blacklist,
}

/// A typed set identifier; the backends derive their names from it and decode them back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetId {
    pub role: SetRole,
    pub family: Family,
    /// The service (empty for the blacklist).
    pub service: String,
}

impl SetId {
    pub fn grant(service: &str, family: Family) -> Self {
        Self {
            role: SetRole::Grant,
            family,
            service: service.to_string(),
        }
    }

    pub fn idle(service: &str, family: Family) -> Self {
        Self {
            role: SetRole::Idle,
            family,
            service: service.to_string(),
        }
    }

    pub fn blacklist(family: Family) -> Self {
        Self {
            role: SetRole::Blacklist,
            family,
            service: String::new(),
        }
    }

    /// The nftables name: `a4_SERVICE`, `i6_SERVICE`, `blacklist4`.
    pub fn nft_name(&self) -> String {
        match self.role {
            SetRole::Grant => format!("a{}_{}", self.family.digit(), self.service),
            SetRole::Idle => format!("i{}_{}", self.family.digit(), self.service),
            SetRole::Blacklist => format!("blacklist{}", self.family.digit()),
        }
    }

    /// Decodes an nftables name made by [`SetId::nft_name`]; `None` for anything else.
    pub fn parse_nft(name: &str) -> Option<Self> {
        let family = |digit: char| match digit {
            '4' => Some(Family::V4),
            '6' => Some(Family::V6),
            _ => None,
        };
        if let Some(rest) = name.strip_prefix("blacklist") {
            let mut chars = rest.chars();
            let f = family(chars.next()?)?;
            return chars.next().is_none().then(|| Self::blacklist(f));
        }
        let (prefix, service) = name.split_once('_')?;
        let mut chars = prefix.chars();
        let role = match chars.next()? {
            'a' => SetRole::Grant,
            'i' => SetRole::Idle,
            _ => return None,
        };
        let f = family(chars.next()?)?;
        if chars.next().is_some() || service.is_empty() {
            return None;
        }
        Some(Self {
            role,
            family: f,
            service: service.to_string(),
        })
    }

    /// The ipset name (at most 31 bytes): `TABLE-a4-SERVICE`, `TABLE-bl4`; long names end in
    /// a hash of the service.
    pub fn ipset_name(&self, table: &str) -> String {
        let digit = self.family.digit();
        let role = match self.role {
            SetRole::Grant => 'a',
            SetRole::Idle => 'i',
            SetRole::Blacklist => return format!("{table}-bl{digit}"),
        };
        let name = format!("{table}-{role}{digit}-{}", self.service);
        if name.len() <= 31 {
            return name;
        }
        let hash = self
            .service
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        format!("{}~{hash:08x}", &name[..22])
    }
}

/// One set of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub id: SetId,
    /// Updated from the packet path (idle timers).
    pub dynamic: bool,
}

/// Destination ports of one protocol: single ports (low == high) first, then ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMatch {
    pub proto: Proto,
    pub items: Vec<(u16, u16)>,
}

impl PortMatch {
    /// Items as text, ranges joined with `sep` (`-` for nftables, `:` for iptables).
    pub fn texts(&self, sep: &str) -> Vec<String> {
        self.items
            .iter()
            .map(|(low, high)| {
                if low == high {
                    low.to_string()
                } else {
                    format!("{low}{sep}{high}")
                }
            })
            .collect()
    }
}

/// Per protocol (TCP, then UDP), the ports and ranges; protocols with nothing are left out.
pub fn port_matches(ports: &[PortProto], ranges: &[(Proto, u16, u16)]) -> Vec<PortMatch> {
    let mut out = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        let mut singles: Vec<u16> = ports
            .iter()
            .filter(|p| p.proto == proto)
            .map(|p| p.port)
            .collect();
        singles.sort_unstable();
        singles.dedup();
        let mut items: Vec<(u16, u16)> = singles.into_iter().map(|p| (p, p)).collect();
        items.extend(ranges.iter().filter(|r| r.0 == proto).map(|r| (r.1, r.2)));
        if !items.is_empty() {
            out.push(PortMatch { proto, items });
        }
    }
    out
}

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Any,
    /// An allow list (all in the rule's family).
    Nets(Vec<Cidr>),
    /// Granted: in the grant set and, with an idle timeout, in the idle set too.
    Granted {
        grant: SetId,
        idle: Option<SetId>,
    },
}

/// What happens to a matching packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    /// Answer as `conceal` says (drop, or like a closed port).
    Conceal(Conceal),
    Dnat(SocketAddr),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Packets of connections conntrack already tracks are accepted.
    Established,
    /// A connection that predates the ruleset is accepted by its exact flow.
    Flow(Flow),
    /// Traffic to `ports` (arriving on `iif`) from `source`; `family: None` means both.
    Ports {
        family: Option<Family>,
        iif: Option<String>,
        ports: PortMatch,
        source: Source,
        verdict: Verdict,
    },
    /// Re-arms `set`'s idle timer (to `timeout`) for a member sending to `ports`.
    Refresh {
        family: Family,
        iif: Option<String>,
        ports: PortMatch,
        set: SetId,
        timeout: Duration,
    },
    /// Forwarded traffic to a NAT target: `dnat_from: Some(public port)` matches only
    /// connections spad's DNAT made; `None` matches all.
    ToTarget {
        target: SocketAddr,
        proto: Proto,
        dnat_from: Option<u16>,
        verdict: Verdict,
    },
}

impl Rule {
    /// Whether the rule applies to `family` (for backends with one ruleset per family).
    pub fn in_family(&self, family: Family) -> bool {
        match self {
            Rule::Established => true,
            Rule::Flow(f) => Family::of(f.remote.ip()) == family,
            Rule::Ports { family: f, .. } => f.is_none_or(|f| f == family),
            Rule::Refresh { family: f, .. } => *f == family,
            Rule::ToTarget { target, .. } => Family::of(target.ip()) == family,
        }
    }
}

/// Everything the kernel must hold for a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub sets: Vec<SetSpec>,
    /// Prerouting, before the conntrack shortcut: idle timers.
    pub refresh: Vec<Rule>,
    /// Input: what reaches the gateway itself.
    pub input: Vec<Rule>,
    /// NAT prerouting: per-client DNAT (empty without NAT services).
    pub nat: Vec<Rule>,
    /// Forward: only DNATed connections reach NAT targets.
    pub forward: Vec<Rule>,
}

fn granted(service: &Service, family: Family) -> Source {
    Source::Granted {
        grant: SetId::grant(&service.name, family),
        idle: service
            .idle_timeout
            .map(|_| SetId::idle(&service.name, family)),
    }
}

/// The allow list of `service` in `family`, if it has one there.
fn allowed(service: &Service, family: Family) -> Option<Source> {
    let nets: Vec<Cidr> = service
        .allow
        .iter()
        .filter(|c| Family::of(c.addr) == family)
        .copied()
        .collect();
    (!nets.is_empty()).then_some(Source::Nets(nets))
}

impl Plan {
    /// Builds the plan for `config` on a host as `observed`.
    pub fn build(config: &Config, observed: &Observed) -> Self {
        let nat: Vec<&Service> = config
            .services
            .values()
            .filter(|s| s.kind == ServiceKind::Nat)
            .collect();
        Self {
            sets: Self::sets(config),
            refresh: Self::refresh(config),
            input: Self::input(config, observed),
            nat: Self::nat(&nat),
            forward: if nat.is_empty() {
                Vec::new()
            } else {
                Self::forward(&nat)
            },
        }
    }

    fn sets(config: &Config) -> Vec<SetSpec> {
        let mut out = Vec::new();
        for service in config.services.values() {
            for family in Family::BOTH {
                out.push(SetSpec {
                    id: SetId::grant(&service.name, family),
                    dynamic: false,
                });
                if service.idle_timeout.is_some() {
                    out.push(SetSpec {
                        id: SetId::idle(&service.name, family),
                        dynamic: true,
                    });
                }
            }
        }
        for family in Family::BOTH {
            out.push(SetSpec {
                id: SetId::blacklist(family),
                dynamic: false,
            });
        }
        out
    }

    fn refresh(config: &Config) -> Vec<Rule> {
        let mut rules = Vec::new();
        for service in config.services.values() {
            let Some(idle) = service.idle_timeout else {
                continue;
            };
            for ports in port_matches(&service.ports, &[]) {
                for family in Family::BOTH {
                    rules.push(Rule::Refresh {
                        family,
                        iif: service.interface.clone(),
                        ports: ports.clone(),
                        set: SetId::idle(&service.name, family),
                        timeout: idle,
                    });
                }
            }
        }
        rules
    }

    fn input(config: &Config, observed: &Observed) -> Vec<Rule> {
        let conceal = Verdict::Conceal(config.server.conceal);
        let mut rules = vec![Rule::Established];
        // Connections that existed before the ruleset (conntrack may not have seen them).
        rules.extend(observed.flows.iter().copied().map(Rule::Flow));
        for service in config
            .services
            .values()
            .filter(|s| s.kind != ServiceKind::Nat)
        {
            for ports in port_matches(&service.ports, &[]) {
                for family in Family::BOTH {
                    for source in allowed(service, family)
                        .into_iter()
                        .chain([granted(service, family)])
                    {
                        rules.push(Rule::Ports {
                            family: Some(family),
                            iif: service.interface.clone(),
                            ports: ports.clone(),
                            source,
                            verdict: Verdict::Accept,
                        });
                    }
                }
            }
        }
        // Knock and watched ports, then everything protected (NAT public ports included),
        // answer strangers alike. After the accepts: a service port inside a door's range
        // stays usable.
        let (hidden, ranges) = super::hidden_ports(config, &observed.listening);
        for ports in port_matches(&hidden, &ranges) {
            rules.push(Rule::Ports {
                family: None,
                iif: None,
                ports,
                source: Source::Any,
                verdict: conceal,
            });
        }
        for service in config.services.values() {
            for ports in port_matches(&service.ports, &[]) {
                rules.push(Rule::Ports {
                    family: None,
                    iif: service.interface.clone(),
                    ports,
                    source: Source::Any,
                    verdict: conceal,
                });
            }
        }
        rules
    }

    fn nat(nat: &[&Service]) -> Vec<Rule> {
        let mut rules = Vec::new();
        for service in nat {
            let Some(forward) = service.forward.as_ref() else {
                continue;
            };
            for ports in port_matches(&service.ports, &[]) {
                for (target, family) in [(forward.v4, Family::V4), (forward.v6, Family::V6)] {
                    let Some(target) = target else { continue };
                    for source in allowed(service, family)
                        .into_iter()
                        .chain([granted(service, family)])
                    {
                        rules.push(Rule::Ports {
                            family: Some(family),
                            iif: service.interface.clone(),
                            ports: ports.clone(),
                            source,
                            verdict: Verdict::Dnat(target),
                        });
                    }
                }
            }
        }
        rules
    }

    fn forward(nat: &[&Service]) -> Vec<Rule> {
        let mut rules = vec![Rule::Established];
        for service in nat {
            let (Some(forward), Some(public)) = (service.forward.as_ref(), service.ports.first())
            else {
                continue;
            };
            for target in [forward.v4, forward.v6].into_iter().flatten() {
                rules.push(Rule::ToTarget {
                    target,
                    proto: public.proto,
                    dnat_from: Some(public.port),
                    verdict: Verdict::Accept,
                });
                rules.push(Rule::ToTarget {
                    target,
                    proto: public.proto,
                    dnat_from: None,
                    verdict: Verdict::Drop,
                });
            }
        }
        rules
    }

    /// Whether the plan has NAT chains.
    pub fn has_nat(&self) -> bool {
        !self.nat.is_empty() || !self.forward.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_ids_round_trip_and_strangers_are_refused() {
        for id in [
            SetId::grant("ssh", Family::V4),
            SetId::idle("vpn_x", Family::V6),
            SetId::blacklist(Family::V6),
        ] {
            assert_eq!(SetId::parse_nft(&id.nft_name()), Some(id.clone()));
        }
        for stranger in [
            "a4",
            "a4_",
            "x4_ssh",
            "a5_ssh",
            "a44_ssh",
            "blacklist",
            "blacklist46",
        ] {
            assert_eq!(SetId::parse_nft(stranger), None, "{stranger}");
        }
        assert_eq!(
            SetId::grant("ssh", Family::V4).ipset_name("spad"),
            "spad-a4-ssh"
        );
        assert_eq!(SetId::blacklist(Family::V6).ipset_name("spad"), "spad-bl6");
        let long = SetId::idle("a-very-long-service-name-of-32ch", Family::V6).ipset_name("spad");
        assert!(long.len() <= 31, "{long}");
    }

    #[test]
    fn port_matches_put_singles_before_ranges_per_protocol() {
        let tcp = |port| PortProto {
            port,
            proto: Proto::Tcp,
        };
        let m = port_matches(&[tcp(443), tcp(22), tcp(22)], &[(Proto::Tcp, 7000, 9000)]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].texts("-"), vec!["22", "443", "7000-9000"]);
        assert_eq!(m[0].texts(":"), vec!["22", "443", "7000:9000"]);
    }

    /// One plan with every kind of rule, rendered by both backends: the renderings must stay
    /// byte for byte as reviewed in `golden/` (run with `SPAD_BLESS=1` to rewrite them after
    /// an intended change, then review the diff).
    #[test]
    fn both_renderings_of_one_plan_match_the_golden_files() {
        let config = Config::parse(
            std::path::Path::new("golden.toml"),
            r#"
[server]
private-key = "k"
conceal = "closed"
[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "30s"
allow = ["192.0.2.0/24", "2001:db8:9::/48"]
[services.vpn]
kind = "vpn"
ports = ["51820/udp", "443/tcp"]
timeout = "1h"
idle-timeout = "30s"
interface = "eth0"
[services.rdp]
kind = "nat"
ports = ["3389/tcp"]
timeout = "8s"
forward-to = "192.168.1.12:3389"
forward-to-v6 = "[fd00:1::12]:3389"
[doors.ops]
sequence = ["7000/tcp", "8000/udp", "9000/tcp"]
services = ["ssh"]
[knocking]
decoy-ports = ["7001/tcp"]
"#,
        )
        .unwrap();
        let tcp = |port| PortProto {
            port,
            proto: Proto::Tcp,
        };
        let observed = Observed {
            flows: vec![Flow {
                local: "203.0.113.1:22".parse().unwrap(),
                remote: "198.51.100.7:40000".parse().unwrap(),
            }],
            listening: vec![tcp(8080)],
        };
        let plan = Plan::build(&config, &observed);
        let renderings = [
            (
                "plan.nft",
                super::super::nftables::full_ruleset(&plan, "spad", &[]),
            ),
            (
                "plan.v4.ipt",
                super::super::iptables::rules(&plan, "spad", Family::V4),
            ),
            (
                "plan.v6.ipt",
                super::super::iptables::rules(&plan, "spad", Family::V6),
            ),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/firewall/golden");
        for (name, text) in renderings {
            let path = dir.join(name);
            if std::env::var_os("SPAD_BLESS").is_some() {
                std::fs::write(&path, &text).unwrap();
            }
            let golden = std::fs::read_to_string(&path).unwrap();
            assert_eq!(text, golden, "{name} changed; review and bless it");
        }
    }
}
