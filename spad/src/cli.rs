//! The `spad` command line: run the daemon, manage keys, inspect and revoke grants, enroll
//! TOTP users. Errors reach the user as one clear message and exit code 1.

use std::io::{BufRead, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use spa_shared::keys::PrivateKey;

use crate::config::Config;
use crate::daemon::{self, Overrides};

pub(crate) const DEFAULT_CONFIG: &str = "/etc/spad/spad.toml";

#[derive(Debug, Parser)]
#[command(
    name = "spad",
    version,
    about = "Single Packet Authorization gateway daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(short, long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Use this state directory instead of the configured one.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (SIGHUP reloads, SIGTERM stops).
    Run(ConfigArg),
    /// Validate the configuration and key, print a summary, touch nothing.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the nftables ruleset spad would load.
        #[arg(long)]
        ruleset: bool,
        /// Print the summary as JSON (fields in docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// Print a new private key (base64), or write it to a 0600 file with --out.
    Genkey {
        /// Write the key to this file (mode 0600, directories created) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read a private key on stdin, print its public key.
    Pubkey,
    /// Is the daemon running: pid, uptime, config, backend, capture, counters, grants.
    /// Exits with status 3 when no daemon is running.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON (fields in docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// List live grants and blacklisted sources (asks the daemon; without one, the kernel).
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON (fields in docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// Close access now: every grant of an address, or of a client, or of one service.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// Close the grants of this source address.
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        address: Option<IpAddr>,
        /// Close the grants owned by this client (its [clients.NAME]).
        #[arg(long)]
        client: Option<String>,
        /// Only these services (default: all).
        #[arg(long)]
        service: Vec<String>,
        /// Print what was removed as JSON (fields in docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// Close every grant. With a running daemon the ruleset stays; without one, the table is removed.
    Flush {
        #[command(flatten)]
        config: ConfigArg,
        /// Print what was removed as JSON (with a running daemon).
        #[arg(long)]
        json: bool,
    },
    /// Remove spad's protection for good: protected ports become reachable by everyone.
    /// Refused while a daemon runs on the state directory (it would reinstall it).
    Uninstall(ConfigArg),
    /// TOTP doors: secrets, enrollment, current codes.
    #[command(subcommand)]
    Totp(TotpCommand),
    /// Print fwknopd's access.conf as [services] and [fwknop-clients] TOML, with notes on what
    /// cannot be carried over.
    ImportFwknop {
        /// fwknopd's access.conf.
        #[arg(long)]
        access: PathBuf,
        /// fwknopd.conf, for the default access timeout and the packet max-age.
        #[arg(long)]
        fwknopd_conf: Option<PathBuf>,
    },
    /// Print a spa:// enrollment URI and QR code for a new client device (no secrets in it).
    Invite(crate::invite::InviteArgs),
    /// Manage SPA clients in the configuration file.
    #[command(subcommand)]
    Client(crate::client_admin::ClientCommand),
}

/// The clap definition, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

#[derive(Debug, Subcommand)]
enum TotpCommand {
    /// Create a new random TOTP secret (base32) in a 0600 file.
    NewSecret {
        /// The secret file to create (mode 0600, directories created; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the QR code and otpauth URI for a door, then verify a code typed on stdin.
    Enroll {
        #[command(flatten)]
        config: ConfigArg,
        /// The TOTP door ([totp-doors.NAME]) to enroll.
        #[arg(long)]
        door: String,
        /// Issuer shown by the authenticator app.
        #[arg(long, default_value = "spad")]
        issuer: String,
    },
    /// Print the current code and knock sequence of a door (for debugging).
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The TOTP door ([totp-doors.NAME]) to show.
        #[arg(long)]
        door: String,
    },
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // The status is printed; stdout (text or JSON) already says so.
        Err(e) if e.is::<crate::control::NotRunning>() => {
            ExitCode::from(crate::control::NotRunning::EXIT_CODE)
        }
        Err(e) => {
            eprintln!("spad: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn overrides(arg: &ConfigArg) -> Overrides {
    Overrides {
        state_dir: arg.state_dir.clone(),
    }
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    let mut config = Config::load(&arg.config)?;
    if let Some(dir) = &arg.state_dir {
        config.server.state_dir = dir.clone();
    }
    Ok(config)
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(arg) => daemon::run(arg.config.clone(), overrides(&arg)),
        Command::Invite(args) => crate::invite::run(args),
        Command::Client(command) => crate::client_admin::run(command),
        Command::Check {
            config: arg,
            ruleset,
            json,
        } => {
            let (config, server) = daemon::load(&arg.config, &overrides(&arg))?;
            if ruleset {
                print!(
                    "{}",
                    crate::firewall::nftables::ruleset(&config, &config.server.table, &[])
                );
                return Ok(());
            }
            if json {
                let checked = crate::status::Checked::new(&config, server.public_key().to_string());
                println!("{}", serde_json::to_string_pretty(&checked)?);
                return Ok(());
            }
            println!("{}: OK", arg.config.display());
            println!("server public key: {}", server.public_key());
            for s in config.services.values() {
                let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
                println!("service {} ({:?}): {}", s.name, s.kind, ports.join(" "));
            }
            for c in config.clients.values() {
                println!("client {}: {}", c.name, c.services.join(","));
            }
            for c in config.fwknop_clients.values() {
                println!("fwknop client {}: {}", c.name, c.services.join(","));
            }
            for d in &config.doors.doors {
                println!("door {}: {} ports", d.name, d.sequence.len());
            }
            for d in &config.doors.totp {
                println!("totp door {}: first port {}", d.name, d.first_port);
            }
            Ok(())
        }
        Command::ImportFwknop {
            access,
            fwknopd_conf,
        } => {
            print!(
                "{}",
                crate::fwknop::import::run(&access, fwknopd_conf.as_deref())?
            );
            Ok(())
        }
        Command::Genkey { out } => {
            let key = PrivateKey::generate(&mut rand_core::OsRng);
            match out {
                Some(path) => crate::keyfile::write_secret_text(&path, &key.to_base64())
                    .with_context(|| format!("writing {}", path.display())),
                None => {
                    println!("{}", key.to_base64().as_str());
                    Ok(())
                }
            }
        }
        Command::Pubkey => {
            let mut text = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut text)?;
            let key = PrivateKey::from_base64(&text).context("reading a private key from stdin")?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::Status { config: arg, json } => {
            crate::control::status_command(&arg.config, arg.state_dir.as_deref(), json)
        }
        Command::List { config: arg, json } => {
            crate::control::list_command(&arg.config, arg.state_dir.as_deref(), json)
        }
        Command::Revoke {
            config: arg,
            address,
            client,
            service,
            json,
        } => crate::control::revoke_command(
            &arg.config,
            arg.state_dir.as_deref(),
            address,
            client,
            service,
            json,
        ),
        Command::Flush { config: arg, json } => {
            if crate::control::flush_via_daemon(&arg.config, arg.state_dir.as_deref(), json)? {
                return Ok(());
            }
            let config = load_config(&arg)?;
            crate::firewall::open(&config)?.flush()?;
            println!(
                "closed every grant in table {}; protected ports stay protected",
                config.server.table
            );
            Ok(())
        }
        Command::Uninstall(arg) => crate::firewall::uninstall(&load_config(&arg)?),
        Command::Totp(TotpCommand::NewSecret { out }) => {
            let mut bytes = [0u8; 20];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
            let secret = spa_shared::totp::Secret::from_bytes(bytes.to_vec());
            crate::keyfile::write_secret_text(&out, &secret.to_base32())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote a new TOTP secret to {}", out.display());
            Ok(())
        }
        Command::Totp(TotpCommand::Enroll {
            config: arg,
            door,
            issuer,
        }) => {
            let config = load_config(&arg)?;
            let d = find_totp(&config, &door)?;
            let uri = spa_shared::totp::otpauth_uri(&issuer, &door, &d.secret, &d.params);
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "Scan with Google Authenticator (or any RFC 6238 app), or paste the secret.\n"
            )?;
            writeln!(out, "{}", crate::enroll::qr(&uri))?;
            writeln!(out, "{uri}\n")?;
            writeln!(
                out,
                "first knock port: {} ({})",
                d.first_port,
                d.proto.name()
            )?;
            write!(out, "Validation code: ")?;
            out.flush()?;
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            if crate::enroll::verify(d, &line, now).is_none() {
                bail!("the code does not match the secret (check the phone's clock and the secret); door {door} stays disabled");
            }
            crate::enroll::record(&config.server.state_dir, d)?;
            writeln!(
                out,
                "verified: TOTP door {door} is enrolled; reload spad (SIGHUP) to enable it"
            )?;
            Ok(())
        }
        Command::Totp(TotpCommand::Show { config: arg, door }) => {
            let config = load_config(&arg)?;
            let d = find_totp(&config, &door)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let step = d.params.step(now);
            let code = spa_shared::totp::code_at_step(&d.secret, &d.params, step);
            let ports = spa_shared::totp::derive_ports(d.first_port, &code, &d.rule)?;
            let ports: Vec<String> = ports
                .iter()
                .map(|p| format!("{p}/{}", d.proto.name()))
                .collect();
            println!("step {step} code {code} sequence {}", ports.join(" "));
            println!(
                "enrolled: {}",
                crate::enroll::is_enrolled(&config.server.state_dir, d)
            );
            Ok(())
        }
    }
}

fn find_totp<'a>(
    config: &'a Config,
    door: &str,
) -> anyhow::Result<&'a crate::knock::config::TotpDoor> {
    config
        .doors
        .totp
        .iter()
        .find(|d| d.name == door)
        .with_context(|| {
            let known: Vec<&str> = config.doors.totp.iter().map(|d| d.name.as_str()).collect();
            format!("no TOTP door `{door}`; configured: {}", known.join(", "))
        })
}

#[allow(dead_code)]
fn exists(path: &Path) -> bool {
    path.exists()
}
