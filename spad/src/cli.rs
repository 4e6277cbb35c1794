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

/// The configuration with the command line's overrides, loaded the way the daemon loads it.
fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    daemon::load_config(&arg.config, &overrides(arg))
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(arg) => cmd_run(arg),
        Command::Invite(args) => crate::invite::run(args),
        Command::Client(command) => crate::client_admin::run(command),
        Command::Check {
            config,
            ruleset,
            json,
        } => cmd_check(&config, ruleset, json),
        Command::ImportFwknop {
            access,
            fwknopd_conf,
        } => cmd_import_fwknop(&access, fwknopd_conf.as_deref()),
        Command::Genkey { out } => cmd_genkey(out.as_deref()),
        Command::Pubkey => cmd_pubkey(),
        Command::Status { config, json } => cmd_status(&config, json),
        Command::List { config, json } => cmd_list(&config, json),
        Command::Revoke {
            config,
            address,
            client,
            service,
            json,
        } => cmd_revoke(&config, address, client, service, json),
        Command::Flush { config, json } => cmd_flush(&config, json),
        Command::Uninstall(config) => cmd_uninstall(&config),
        Command::Totp(TotpCommand::NewSecret { out }) => cmd_totp_new_secret(&out),
        Command::Totp(TotpCommand::Enroll {
            config,
            door,
            issuer,
        }) => cmd_totp_enroll(&config, &door, &issuer),
        Command::Totp(TotpCommand::Show { config, door }) => cmd_totp_show(&config, &door),
    }
}

/// `spad run`.
fn cmd_run(arg: ConfigArg) -> anyhow::Result<()> {
    let overrides = overrides(&arg);
    crate::event_loop::run(arg.config, overrides)
}

/// `spad check`.
fn cmd_check(arg: &ConfigArg, ruleset: bool, json: bool) -> anyhow::Result<()> {
    let (config, server) = daemon::load(&arg.config, &overrides(arg))?;
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
    print_summary(&config);
    Ok(())
}

/// The human summary of `spad check`: services, clients and doors.
fn print_summary(config: &Config) {
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
}

/// `spad import-fwknop`.
fn cmd_import_fwknop(access: &Path, fwknopd_conf: Option<&Path>) -> anyhow::Result<()> {
    print!("{}", crate::fwknop::import::run(access, fwknopd_conf)?);
    Ok(())
}

/// `spad genkey`.
fn cmd_genkey(out: Option<&Path>) -> anyhow::Result<()> {
    let key = PrivateKey::generate(&mut rand_core::OsRng);
    match out {
        Some(path) => crate::keyfile::write_secret_text(path, &key.to_base64())
            .with_context(|| format!("writing {}", path.display())),
        None => {
            println!("{}", key.to_base64().as_str());
            Ok(())
        }
    }
}

/// `spad pubkey`.
fn cmd_pubkey() -> anyhow::Result<()> {
    let mut text = zeroize::Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut text)?;
    let key = PrivateKey::from_base64(&text).context("reading a private key from stdin")?;
    println!("{}", key.public_key());
    Ok(())
}

/// `spad status`.
fn cmd_status(arg: &ConfigArg, json: bool) -> anyhow::Result<()> {
    crate::control::status_command(&arg.config, arg.state_dir.as_deref(), json)
}

/// `spad list`.
fn cmd_list(arg: &ConfigArg, json: bool) -> anyhow::Result<()> {
    crate::control::list_command(&arg.config, arg.state_dir.as_deref(), json)
}

/// `spad revoke`.
fn cmd_revoke(
    arg: &ConfigArg,
    address: Option<IpAddr>,
    client: Option<String>,
    service: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    crate::control::revoke_command(
        &arg.config,
        arg.state_dir.as_deref(),
        address,
        client,
        service,
        json,
    )
}

/// `spad flush`: through the daemon when one runs, else on the kernel directly.
fn cmd_flush(arg: &ConfigArg, json: bool) -> anyhow::Result<()> {
    if crate::control::flush_via_daemon(&arg.config, arg.state_dir.as_deref(), json)? {
        return Ok(());
    }
    let config = load_config(arg)?;
    crate::firewall::open(&config)?.flush()?;
    println!(
        "closed every grant in table {}; protected ports stay protected",
        config.server.table
    );
    Ok(())
}

/// `spad uninstall`.
fn cmd_uninstall(arg: &ConfigArg) -> anyhow::Result<()> {
    crate::firewall::uninstall(&load_config(arg)?)
}

/// `spad totp new-secret`.
fn cmd_totp_new_secret(out: &Path) -> anyhow::Result<()> {
    let mut bytes = [0u8; 20];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    let secret = spa_shared::totp::Secret::from_bytes(bytes.to_vec());
    crate::keyfile::write_secret_text(out, &secret.to_base32())
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote a new TOTP secret to {}", out.display());
    Ok(())
}

/// `spad totp enroll`: show the QR code, verify one code, record the enrollment.
fn cmd_totp_enroll(arg: &ConfigArg, door: &str, issuer: &str) -> anyhow::Result<()> {
    let config = load_config(arg)?;
    let d = find_totp(&config, door)?;
    let uri = spa_shared::totp::otpauth_uri(issuer, door, &d.secret, &d.params);
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
    if crate::enroll::verify(d, &line, unix_now()?).is_none() {
        bail!("the code does not match the secret (check the phone's clock and the secret); door {door} stays disabled");
    }
    crate::enroll::record(&config.server.state_dir, d)?;
    writeln!(
        out,
        "verified: TOTP door {door} is enrolled; reload spad (SIGHUP) to enable it"
    )?;
    Ok(())
}

/// `spad totp show`: the current code and knock sequence of a door.
fn cmd_totp_show(arg: &ConfigArg, door: &str) -> anyhow::Result<()> {
    let config = load_config(arg)?;
    let d = find_totp(&config, door)?;
    let step = d.params.step(unix_now()?);
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

/// Seconds since the Unix epoch, from the system clock.
fn unix_now() -> anyhow::Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs())
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
