//! The `spa` command line.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use spa_shared::keys::PrivateKey;
use spa_shared::payload::{Kind, Request};

use crate::profile::Profile;
use crate::send::{self, Family, Knock};

#[derive(Debug, Parser)]
#[command(
    name = "spa",
    version,
    about = "Single Packet Authorization client: open a gateway with one packet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args, Default)]
struct Target {
    /// Profile file (TOML); flags override its values.
    #[arg(short, long)]
    profile: Option<PathBuf>,
    /// Gateway host name or address.
    #[arg(long)]
    server: Option<String>,
    /// Use IPv4 only.
    #[arg(short = '4', conflicts_with = "ipv6")]
    ipv4: bool,
    /// Use IPv6 only.
    #[arg(short = '6')]
    ipv6: bool,
}

impl Target {
    fn family(&self) -> Family {
        match (self.ipv4, self.ipv6) {
            (true, _) => Family::V4,
            (_, true) => Family::V6,
            _ => Family::Any,
        }
    }
    fn profile(&self) -> anyhow::Result<Profile> {
        let mut profile = match &self.profile {
            Some(path) => Profile::load(path)?,
            None => Profile::default(),
        };
        if let Some(server) = &self.server {
            profile.server = Some(server.clone());
        }
        Ok(profile)
    }
}

#[derive(Debug, Args)]
struct SpaArgs {
    #[command(flatten)]
    target: Target,
    /// SPA port (default 62201).
    #[arg(long)]
    port: Option<u16>,
    /// The gateway's public key (base64).
    #[arg(long)]
    server_key: Option<String>,
    /// This client's private key file.
    #[arg(long)]
    key: Option<String>,
    /// Service to open (repeatable).
    #[arg(short, long = "service")]
    services: Vec<String>,
    /// Requested duration, e.g. 30s or 1h (the gateway caps it).
    #[arg(long)]
    duration: Option<String>,
    /// Name the address the packet is for: your public address as the gateway sees it
    /// (required when the gateway sets require-address for you; another address needs
    /// allow-address-override). Behind NAT, look it up (e.g. from your router) and pass it.
    #[arg(long)]
    address: Option<IpAddr>,
    /// After knocking, connect to HOST:PORT and relay stdin/stdout (for ssh ProxyCommand).
    #[arg(long, value_name = "HOST:PORT")]
    connect: Option<String>,
    /// Also write the packet to FILE (to inspect it, or to test replay protection).
    #[arg(long, value_name = "FILE")]
    save_packet: Option<PathBuf>,
    /// Shift the packet's timestamp by this many seconds (to test clock-skew limits).
    #[arg(long, hide = true, allow_hyphen_values = true, default_value_t = 0)]
    time_offset: i64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a new private key (base64), or write it to a 0600 file with --out.
    Genkey {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read a private key on stdin, print its public key.
    Pubkey,
    /// Send one SPA packet that opens services for this address.
    Knock(SpaArgs),
    /// Send one SPA packet that closes services for this address now.
    Close(SpaArgs),
    /// Knock a plain port sequence (knockd style): 7000 8000:udp 9000.
    Sequence {
        #[command(flatten)]
        target: Target,
        /// Delay between knocks in milliseconds.
        #[arg(short, long, default_value_t = 20)]
        delay: u64,
        #[arg(required = true)]
        ports: Vec<Knock>,
    },
    /// Knock a TOTP sequence: first port, then ports derived from the current code.
    TotpKnock {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        first_port: Option<u16>,
        /// tcp or udp.
        #[arg(long)]
        protocol: Option<String>,
        /// Base32 secret file (mode 0600).
        #[arg(long, conflicts_with = "code")]
        secret_file: Option<String>,
        /// The 6-digit code shown by an authenticator app, instead of the secret.
        #[arg(long)]
        code: Option<String>,
        #[arg(long)]
        port_range: Option<String>,
        #[arg(long)]
        derived_ports: Option<usize>,
        /// Delay between knocks in milliseconds.
        #[arg(short, long, default_value_t = 20)]
        delay: u64,
        /// Print the sequence only; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spa: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn spa(args: SpaArgs, kind: Kind) -> anyhow::Result<()> {
    let mut profile = args.target.profile()?;
    if let Some(k) = args.server_key {
        profile.server_public_key = Some(k);
    }
    if let Some(k) = args.key {
        profile.private_key = Some(k);
    }
    if !args.services.is_empty() {
        profile.services = args.services;
    }
    let duration_secs = match args.duration.or(profile.duration.clone()) {
        Some(text) => spa_shared::duration::parse(&text)
            .with_context(|| format!("`{text}` is not a duration (30s, 15m, 1h)"))?
            .as_secs()
            .min(u64::from(u32::MAX)) as u32,
        None => 0,
    };
    let address = match (args.address, &profile.address) {
        (Some(a), _) => Some(a),
        (None, Some(text)) => Some(
            text.parse()
                .with_context(|| format!("profile address `{text}`"))?,
        ),
        (None, None) => None,
    };
    if profile.services.is_empty() {
        bail!(
            "no services to {} (use -s NAME or services = [..] in the profile)",
            if kind == Kind::Open { "open" } else { "close" }
        );
    }
    let server = profile
        .server
        .clone()
        .context("no server (use --server or server = \"...\" in the profile)")?;
    let to = send::resolve(
        &server,
        args.port.or(profile.port).unwrap_or(62201),
        args.target.family(),
    )?;
    let key = profile.private_key()?;
    let mut nonce = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let timestamp = now_micros().saturating_add_signed(args.time_offset.saturating_mul(1_000_000));
    let request = Request {
        kind,
        timestamp,
        nonce,
        duration_secs,
        address,
        services: profile.services.clone(),
    };
    let packet = spa_shared::packet::seal(
        &mut rand_core::OsRng,
        &key,
        &profile.server_key()?,
        &request,
    )?;
    if let Some(path) = &args.save_packet {
        std::fs::write(path, &packet).with_context(|| format!("writing {}", path.display()))?;
    }
    send::datagram(to, &packet)?;
    let verb = if kind == Kind::Open { "open" } else { "close" };
    eprintln!(
        "spa: sent {verb} request for {} to {to} ({} bytes)",
        profile.services.join(","),
        packet.len()
    );
    if let Some(target) = args.connect {
        relay(&target, args.target.family())?;
    }
    Ok(())
}

/// Connects (retrying while the grant lands) and relays stdin/stdout: `ssh -o ProxyCommand`.
fn relay(target: &str, family: Family) -> anyhow::Result<()> {
    let (host, port) = target
        .rsplit_once(':')
        .context("--connect takes HOST:PORT")?;
    let to: SocketAddr = send::resolve(host, port.parse().context("--connect port")?, family)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {to}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut upstream = stream.try_clone()?;
    let copier = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    let mut downstream = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    loop {
        let n = downstream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    drop(copier);
    Ok(())
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Genkey { out } => {
            let key = PrivateKey::generate(&mut rand_core::OsRng);
            match out {
                Some(path) => {
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    writeln!(f, "{}", key.to_base64().as_str())?;
                }
                None => println!("{}", key.to_base64().as_str()),
            }
            Ok(())
        }
        Command::Pubkey => {
            let mut text = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut text)?;
            println!(
                "{}",
                PrivateKey::from_base64(&text)
                    .context("reading a private key from stdin")?
                    .public_key()
            );
            Ok(())
        }
        Command::Knock(args) => spa(args, Kind::Open),
        Command::Close(args) => spa(args, Kind::Close),
        Command::Sequence {
            target,
            delay,
            ports,
        } => {
            let profile = target.profile()?;
            let server = profile.server.context("no server (use --server)")?;
            let host = send::resolve(&server, 1, target.family())?;
            send::sequence(host, &ports, Duration::from_millis(delay))?;
            eprintln!("spa: knocked {} ports on {}", ports.len(), host.ip());
            Ok(())
        }
        Command::TotpKnock {
            target,
            first_port,
            protocol,
            secret_file,
            code,
            port_range,
            derived_ports,
            delay,
            dry_run,
        } => {
            let profile = target.profile()?;
            let first = first_port
                .or(profile.totp_first_port)
                .context("no first port (use --first-port or totp-first-port)")?;
            let udp = match protocol
                .or(profile.totp_protocol.clone())
                .as_deref()
                .unwrap_or("tcp")
            {
                "tcp" => false,
                "udp" => true,
                other => bail!("protocol `{other}` is tcp or udp"),
            };
            let params = spa_shared::totp::Params::default();
            let code = match code {
                Some(c) => c.trim().to_string(),
                None => {
                    let path = secret_file
                        .or(profile.totp_secret_file.clone())
                        .context("no secret (use --secret-file or --code)")?;
                    let text = crate::profile::read_secret(&profile.resolve(&path))?;
                    let secret =
                        spa_shared::totp::Secret::from_base32(&text).context("TOTP secret")?;
                    spa_shared::totp::code_at_step(
                        &secret,
                        &params,
                        params.step(now_micros() / 1_000_000),
                    )
                }
            };
            let range = port_range
                .or(profile.totp_port_range.clone())
                .unwrap_or_else(|| "20000-29999".into());
            let (low, high) = range
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .context("port range is LOW-HIGH")?;
            // No exclusions needed: the gateway refuses port ranges that contain any excluded port,
            // so its derivation never skips one and both sides compute the same sequence.
            let rule = spa_shared::totp::PortRule {
                low,
                high,
                count: derived_ports.or(profile.totp_derived_ports).unwrap_or(2),
                excluded: Vec::new(),
            };
            let ports = spa_shared::totp::derive_ports(first, &code, &rule)?;
            let knocks: Vec<Knock> = ports.iter().map(|p| Knock { port: *p, udp }).collect();
            let shown: Vec<String> = ports
                .iter()
                .map(|p| format!("{p}/{}", if udp { "udp" } else { "tcp" }))
                .collect();
            if dry_run {
                println!("{}", shown.join(" "));
                return Ok(());
            }
            let server = profile.server.context("no server (use --server)")?;
            let host = send::resolve(&server, 1, target.family())?;
            send::sequence(host, &knocks, Duration::from_millis(delay))?;
            eprintln!(
                "spa: knocked TOTP sequence {} on {}",
                shown.join(" "),
                host.ip()
            );
            Ok(())
        }
    }
}
