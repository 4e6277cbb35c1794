//! `spad invite NAME --services …`: the first step of onboarding a device. Prints a `spa://`
//! URI and its QR code with what the client needs (gateway address and port, the gateway's
//! public key, services, profile name, a TCP port to check the grant with). Nothing in it is
//! secret: the device makes its own key pair (`spa enroll`), and the admin adds the public
//! half with `spad client add`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use spa_shared::invite::{valid_profile_name, Invite};
use spa_shared::keys::PublicKey;

use crate::config::Config;
use crate::net::Proto;

/// `spad invite` arguments.
#[derive(Debug, clap::Args)]
pub struct InviteArgs {
    /// Configuration file.
    #[arg(short, long, default_value = crate::cli::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The client's name: its profile name on the device and its [clients.NAME] here.
    pub name: String,
    /// Services the client will ask for (comma-separated).
    #[arg(long, required = true, value_delimiter = ',')]
    pub services: Vec<String>,
    /// Host name or address clients reach this gateway at (default: this host's name).
    #[arg(long)]
    pub address: Option<String>,
}

/// Builds the invitation for `name` from a loaded configuration.
pub fn build(
    config: &Config,
    server_key: PublicKey,
    name: &str,
    services: &[String],
    address: &str,
) -> anyhow::Result<Invite> {
    if !valid_profile_name(name) {
        bail!("client name `{name}` must be 1-64 of [A-Za-z0-9._-], not starting with . or -");
    }
    for s in services {
        if !config.services.contains_key(s) {
            let known: Vec<&str> = config.services.keys().map(String::as_str).collect();
            bail!(
                "unknown service `{s}`; defined services: {}",
                known.join(", ")
            );
        }
    }
    // The first TCP port of the services, in the order asked: what `spa knock --wait` tries.
    let probe_port = services
        .iter()
        .flat_map(|s| config.services[s].ports.iter())
        .find(|p| p.proto == Proto::Tcp)
        .map(|p| p.port);
    let invite = Invite {
        server: address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port: config.server.port,
        server_key,
        services: services.to_vec(),
        name: name.to_string(),
        probe_port,
    };
    // The client parses it back with the same code: refuse here what it would refuse there.
    Invite::parse(&invite.to_uri()).context("the invitation would not parse on the device")?;
    Ok(invite)
}

fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// Runs `spad invite`.
pub fn run(args: InviteArgs) -> anyhow::Result<()> {
    let (config, server) = crate::daemon::load(&args.config, &Default::default())?;
    let mut out = std::io::stdout().lock();
    let address = match args.address {
        Some(a) => a,
        None => {
            let name = host_name().context("no --address and no host name: pass --address")?;
            eprintln!("spad: no --address given: using this host's name `{name}`; pass --address if clients reach the gateway by another name");
            name
        }
    };
    if config.clients.contains_key(&args.name) {
        eprintln!(
            "spad: note: client `{}` already exists in {}; `spad client add` will refuse the name",
            args.name,
            args.config.display()
        );
    }
    let invite = build(
        &config,
        server.public_key(),
        &args.name,
        &args.services,
        &address,
    )?;
    let uri = invite.to_uri();
    writeln!(
        out,
        "Invitation for `{}` (contains no secret). On the device, scan it or run:\n",
        args.name
    )?;
    writeln!(out, "  spa enroll '{uri}'\n")?;
    writeln!(out, "{}", crate::enroll::qr(&uri))?;
    writeln!(out, "{uri}\n")?;
    writeln!(
        out,
        "The device prints its public key; then add it here:\n\n  spad client add {} --public-key KEY --services {}{}",
        args.name,
        args.services.join(","),
        if args.config.as_path() == std::path::Path::new(crate::cli::DEFAULT_CONFIG) {
            String::new()
        } else {
            format!(" -c {}", args.config.display())
        }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = r#"
[server]
private-key = "server.key"
[services.vpn]
kind = "vpn"
ports = ["51820/udp", "443/tcp"]
timeout = "1h"
[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "30s"
"#;
        Config::parse(std::path::Path::new("/etc/spad/spad.toml"), text).unwrap()
    }

    #[test]
    fn the_invitation_carries_the_public_key_and_a_tcp_probe_port() {
        let key = PublicKey([5; 32]);
        let v = vec!["vpn".to_string(), "ssh".to_string()];
        let invite = build(&config(), key, "phone", &v, "[2001:db8::1]").unwrap();
        assert_eq!(invite.server, "2001:db8::1");
        assert_eq!(
            invite.probe_port,
            Some(443),
            "first TCP port in the order asked"
        );
        assert_eq!(invite.port, 62201);
        assert_eq!(Invite::parse(&invite.to_uri()).unwrap(), invite);
    }

    #[test]
    fn unknown_services_and_bad_names_are_refused() {
        let key = PublicKey([5; 32]);
        let err = build(&config(), key, "phone", &["rdp".into()], "gw").unwrap_err();
        assert!(
            err.to_string().contains("defined services: ssh, vpn"),
            "{err}"
        );
        assert!(build(&config(), key, "../x", &["ssh".into()], "gw").is_err());
        assert!(build(&config(), key, "x", &["ssh".into()], "bad host").is_err());
    }
}
