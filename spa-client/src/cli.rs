//! The `spa` command line: one short function per command.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use spa_shared::invite::Invite;
use spa_shared::keys::PrivateKey;
use spa_shared::payload::Kind;

use crate::probe::{self, Outcome, MAX_PACKETS};
use crate::profile::{self, Profile};
use crate::request::Outgoing;
use crate::resolve::{self, Family, Resolver};
use crate::send::{self, Knock};

#[derive(Debug, Parser)]
#[command(
    name = "spa",
    version,
    about = "Single Packet Authorization client: open a gateway with one packet",
    after_help = "Profiles live in $XDG_CONFIG_HOME/spa (default ~/.config/spa); `spa enroll URI` \
                  creates one from a gateway's invitation."
)]
struct Cli {
    /// Profile: a name in ~/.config/spa (NAME.toml), or a path; flags override its values.
    #[arg(short, long, global = true, value_name = "NAME|PATH")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The clap definition, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

#[derive(Debug, Args, Default)]
struct Target {
    /// Gateway host name or address.
    #[arg(long)]
    server: Option<String>,
    /// DNS server to resolve the gateway's name with (repeatable; instead of the system's).
    #[arg(long = "resolver", value_name = "ADDRESS")]
    resolvers: Vec<String>,
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

    fn profile(&self, selected: Option<&str>) -> anyhow::Result<Profile> {
        let mut profile = match selected {
            Some(value) => Profile::load(&profile::locate(value)?)?,
            None => Profile::default(),
        };
        if let Some(server) = &self.server {
            profile.server = Some(server.clone());
        }
        if !self.resolvers.is_empty() {
            profile.resolver = self.resolvers.clone();
        }
        Ok(profile)
    }

    fn resolver(profile: &Profile) -> anyhow::Result<Resolver> {
        let servers = profile
            .resolver
            .iter()
            .map(|s| resolve::parse_server(s))
            .collect::<anyhow::Result<_>>()?;
        Ok(Resolver::new(servers))
    }
}

/// What every command that builds an SPA packet shares (`knock` and `close`).
#[derive(Debug, Args)]
struct PacketArgs {
    #[command(flatten)]
    target: Target,
    /// The gateway's SPA port (default 62201).
    #[arg(long)]
    port: Option<u16>,
    /// The gateway's public key (base64).
    #[arg(long)]
    server_key: Option<String>,
    /// This client's private key file (mode 0600).
    #[arg(long)]
    key: Option<String>,
    /// Service name (repeatable; default: the profile's services).
    #[arg(short, long = "service")]
    services: Vec<String>,
    /// Name the address the packet is for: your public address as the gateway sees it
    /// (required when the gateway sets require-address for you; another address needs
    /// allow-address-override). Behind NAT, look it up (e.g. from your router) and pass it.
    #[arg(long)]
    address: Option<IpAddr>,
    /// Also write the packet to FILE (to inspect it, or to test replay protection).
    #[arg(long, value_name = "FILE")]
    save_packet: Option<PathBuf>,
    /// Build the packet and explain it, but send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Explain what is sent: destination, keys, request fields, packet size.
    #[arg(short, long)]
    verbose: bool,
    /// Shift the packet's timestamp by this many seconds (to test clock-skew limits).
    #[arg(long, hide = true, allow_hyphen_values = true, default_value_t = 0)]
    time_offset: i64,
}

#[derive(Debug, Args)]
struct KnockArgs {
    #[command(flatten)]
    packet: PacketArgs,
    /// How long to open for, e.g. 30s or 1h. The gateway silently caps it at the service's
    /// max-timeout and the client's max-duration.
    #[arg(long)]
    duration: Option<String>,
    /// After knocking, connect to a TCP port of the service until it answers (default 5s),
    /// sending a fresh packet each second without an answer (3 at most); exit non-zero with
    /// the likely cause if it never answers.
    #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, require_equals = true, default_missing_value = "5s")]
    wait: Option<String>,
    /// The TCP port --wait connects to (default: the profile's probe-port).
    #[arg(long)]
    probe_port: Option<u16>,
    /// After knocking, connect to HOST:PORT and relay stdin/stdout (for ssh ProxyCommand).
    #[arg(long, value_name = "HOST:PORT")]
    connect: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a new private key (base64), or write it to a 0600 file with --out.
    Genkey {
        /// Write the key to this file (mode 0600, directories created) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read a private key on stdin, print its public key.
    Pubkey,
    /// Send one SPA packet that opens services for this address.
    Knock(KnockArgs),
    /// Send one SPA packet that closes this address's grants now, instead of at expiry.
    Close(PacketArgs),
    /// Knock a plain port sequence (knockd style): 7000 8000:udp 9000.
    Sequence {
        #[command(flatten)]
        target: Target,
        /// Delay between knocks in milliseconds.
        #[arg(short, long, default_value_t = 20)]
        delay: u64,
        /// Print the sequence and destination; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Ports to knock in order: PORT, PORT:tcp or PORT:udp.
        #[arg(required = true)]
        ports: Vec<Knock>,
    },
    /// Knock a TOTP sequence: first port, then ports derived from the current code.
    TotpKnock(TotpArgs),
    /// Create a key pair and a profile from a gateway's invitation (spa://…, from `spad invite`).
    Enroll {
        /// The spa:// URI (or the text of its QR code).
        uri: String,
    },
    /// List the profiles in ~/.config/spa (or $XDG_CONFIG_HOME/spa).
    Profiles,
}

#[derive(Debug, Args)]
struct TotpArgs {
    #[command(flatten)]
    target: Target,
    /// The door's first port (the gateway's first-port).
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
    /// Range the derived ports come from, LOW-HIGH (the gateway's port-range; default 20000-29999).
    #[arg(long)]
    port_range: Option<String>,
    /// How many ports follow the first (the gateway's derived-ports; default 2).
    #[arg(long)]
    derived_ports: Option<usize>,
    /// Delay between knocks in milliseconds.
    #[arg(short, long, default_value_t = 20)]
    delay: u64,
    /// Print the sequence only; send nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.profile.as_deref(), cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spa: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(selected: Option<&str>, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Genkey { out } => genkey(out),
        Command::Pubkey => pubkey(),
        Command::Knock(args) => knock(selected, args),
        Command::Close(args) => {
            spa(selected, args, Kind::Close, None)?;
            Ok(())
        }
        Command::Sequence {
            target,
            delay,
            dry_run,
            ports,
        } => sequence(selected, target, delay, dry_run, ports),
        Command::TotpKnock(args) => totp_knock(selected, args),
        Command::Enroll { uri } => enroll(&uri),
        Command::Profiles => profiles(),
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn genkey(out: Option<PathBuf>) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = PrivateKey::generate(&mut rand_core::OsRng);
    let Some(path) = out else {
        println!("{}", key.to_base64().as_str());
        return Ok(());
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::enroll::create_private_dir(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{}", key.to_base64().as_str())?;
    Ok(())
}

fn pubkey() -> anyhow::Result<()> {
    let mut text = zeroize::Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut text)?;
    let key = PrivateKey::from_base64(&text).context("reading a private key from stdin")?;
    println!("{}", key.public_key());
    Ok(())
}

fn knock(selected: Option<&str>, args: KnockArgs) -> anyhow::Result<()> {
    let family = args.packet.target.family();
    let dry_run = args.packet.dry_run;
    let (profile, outgoing) = spa(selected, args.packet, Kind::Open, args.duration)?;
    if dry_run {
        return Ok(());
    }
    if let Some(limit) = args.wait {
        let limit = spa_shared::duration::parse(&limit)
            .with_context(|| format!("--wait={limit} is not a duration (5s, 1m)"))?;
        let port = args.probe_port.or(profile.probe_port).context(
            "--wait needs a TCP port to try: --probe-port PORT or probe-port in the profile",
        )?;
        let to = SocketAddr::new(outgoing.to.ip(), port);
        let mut packets = 1;
        let outcome = probe::wait_resending(to, limit, || {
            outgoing.send_fresh()?;
            packets += 1;
            eprintln!("spa: no answer yet; sent a fresh packet ({packets} of {MAX_PACKETS})");
            Ok(())
        })?;
        let said = probe::explain(outcome, to, limit, outgoing.to.port());
        match outcome {
            Outcome::Answered(_) => eprintln!("spa: {said}"),
            _ => bail!("{said}"),
        }
    }
    if let Some(target) = args.connect {
        crate::relay::relay(&target, family, &Target::resolver(&profile)?)?;
    }
    Ok(())
}

fn duration_secs(text: Option<String>) -> anyhow::Result<u32> {
    Ok(match text {
        Some(text) => spa_shared::duration::parse(&text)
            .with_context(|| format!("`{text}` is not a duration (30s, 15m, 1h)"))?
            .as_secs()
            .min(u64::from(u32::MAX)) as u32,
        None => 0,
    })
}

/// Builds the request from the profile and flags, explains it if asked, and sends it.
fn spa(
    selected: Option<&str>,
    args: PacketArgs,
    kind: Kind,
    duration: Option<String>,
) -> anyhow::Result<(Profile, Outgoing)> {
    let mut profile = args.target.profile(selected)?;
    if let Some(k) = args.server_key {
        profile.server_public_key = Some(k);
    }
    if let Some(k) = args.key {
        profile.private_key = Some(k);
    }
    if !args.services.is_empty() {
        profile.services = args.services;
    }
    let duration_secs = duration_secs(duration.or(profile.duration.clone()))?;
    let address = match (args.address, &profile.address) {
        (Some(a), _) => Some(a),
        (None, Some(text)) => Some(
            text.parse()
                .with_context(|| format!("profile address `{text}`"))?,
        ),
        (None, None) => None,
    };
    if profile.services.is_empty() {
        let verb = if kind == Kind::Open { "open" } else { "close" };
        bail!("no services to {verb} (use -s NAME or services = [..] in the profile)");
    }
    let server = profile
        .server
        .clone()
        .context("no server (use --server or server = \"...\" in the profile)")?;
    let port = args.port.or(profile.port).unwrap_or(62201);
    let (to, via) = Target::resolver(&profile)?.resolve_via(&server, port, args.target.family())?;
    let outgoing = Outgoing {
        server,
        to,
        via,
        key: profile.private_key()?,
        server_key: profile.server_key()?,
        kind,
        services: profile.services.clone(),
        duration_secs,
        address,
        time_offset_secs: args.time_offset,
    };
    let (request, packet) = outgoing.seal()?;
    if let Some(path) = &args.save_packet {
        std::fs::write(path, &packet).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.verbose || args.dry_run {
        for line in outgoing.explain(&request, packet.len()) {
            eprintln!("spa: {line}");
        }
    }
    if args.dry_run {
        eprintln!("spa: dry run: nothing sent");
        return Ok((profile, outgoing));
    }
    send::datagram(to, &packet)?;
    eprintln!(
        "spa: sent {} request for {} to {to} ({} bytes)",
        outgoing.verb(),
        outgoing.services.join(","),
        packet.len()
    );
    Ok((profile, outgoing))
}

fn sequence(
    selected: Option<&str>,
    target: Target,
    delay: u64,
    dry_run: bool,
    ports: Vec<Knock>,
) -> anyhow::Result<()> {
    let profile = target.profile(selected)?;
    let server = profile.server.clone().context("no server (use --server)")?;
    let host = Target::resolver(&profile)?.resolve(&server, 1, target.family())?;
    if dry_run {
        let shown: Vec<String> = ports
            .iter()
            .map(|k| format!("{}/{}", k.port, if k.udp { "udp" } else { "tcp" }))
            .collect();
        println!("{} {}", host.ip(), shown.join(" "));
        eprintln!("spa: dry run: nothing sent");
        return Ok(());
    }
    send::sequence(host, &ports, Duration::from_millis(delay))?;
    eprintln!("spa: knocked {} ports on {}", ports.len(), host.ip());
    Ok(())
}

fn totp_knock(selected: Option<&str>, args: TotpArgs) -> anyhow::Result<()> {
    let profile = args.target.profile(selected)?;
    let first = args
        .first_port
        .or(profile.totp_first_port)
        .context("no first port (use --first-port or totp-first-port)")?;
    let udp = match args
        .protocol
        .or(profile.totp_protocol.clone())
        .as_deref()
        .unwrap_or("tcp")
    {
        "tcp" => false,
        "udp" => true,
        other => bail!("protocol `{other}` is tcp or udp"),
    };
    let params = spa_shared::totp::Params::default();
    let code = match args.code {
        Some(c) => c.trim().to_string(),
        None => {
            let path = args
                .secret_file
                .or(profile.totp_secret_file.clone())
                .context("no secret (use --secret-file or --code)")?;
            let text = crate::profile::read_secret(&profile.resolve(&path))?;
            let secret = spa_shared::totp::Secret::from_base32(&text).context("TOTP secret")?;
            spa_shared::totp::code_at_step(&secret, &params, params.step(now_micros() / 1_000_000))
        }
    };
    let range = args
        .port_range
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
        count: args
            .derived_ports
            .or(profile.totp_derived_ports)
            .unwrap_or(2),
        excluded: Vec::new(),
    };
    let ports = spa_shared::totp::derive_ports(first, &code, &rule)?;
    let knocks: Vec<Knock> = ports.iter().map(|p| Knock { port: *p, udp }).collect();
    let shown: Vec<String> = ports
        .iter()
        .map(|p| format!("{p}/{}", if udp { "udp" } else { "tcp" }))
        .collect();
    if args.dry_run {
        println!("{}", shown.join(" "));
        return Ok(());
    }
    let server = profile.server.clone().context("no server (use --server)")?;
    let host = Target::resolver(&profile)?.resolve(&server, 1, args.target.family())?;
    send::sequence(host, &knocks, Duration::from_millis(args.delay))?;
    eprintln!(
        "spa: knocked TOTP sequence {} on {}",
        shown.join(" "),
        host.ip()
    );
    Ok(())
}

fn enroll(uri: &str) -> anyhow::Result<()> {
    let invite = Invite::parse(uri).context("reading the invitation")?;
    let dir = profile::profile_dir()?;
    let done = crate::enroll::enroll(&invite, &dir)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "wrote {} and {}",
        done.profile.display(),
        done.key.display()
    )?;
    writeln!(
        out,
        "\nGive this public key to the gateway's admin (it is not secret):\n"
    )?;
    writeln!(out, "{}", crate::enroll::qr(&done.public_key.to_string()))?;
    writeln!(out, "{}\n", done.public_key)?;
    writeln!(
        out,
        "The admin runs:  spad client add {} --public-key {} --services {}",
        invite.name,
        done.public_key,
        invite.services.join(",")
    )?;
    writeln!(out, "Then knock:      spa -p {} knock --wait", invite.name)?;
    Ok(())
}

fn profiles() -> anyhow::Result<()> {
    let dir = profile::profile_dir()?;
    let names = profile::list(&dir)?;
    if names.is_empty() {
        eprintln!(
            "spa: no profiles in {} (`spa enroll URI` creates one)",
            dir.display()
        );
        return Ok(());
    }
    for name in names {
        match Profile::load(&dir.join(format!("{name}.toml"))) {
            Ok(p) => println!(
                "{name:<20} {}:{} {}",
                p.server.as_deref().unwrap_or("(no server)"),
                p.port.unwrap_or(62201),
                p.services.join(",")
            ),
            Err(e) => println!("{name:<20} (unreadable: {e:#})"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command has a help line.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "spa", &mut missing);
        assert!(missing.is_empty(), "no help line: {missing:?}");
    }

    #[test]
    fn close_help_does_not_talk_about_opening() {
        let mut cmd = command();
        let close = cmd.find_subcommand_mut("close").unwrap();
        let help = close.render_long_help().to_string().to_lowercase();
        assert!(!help.contains("open"), "{help}");
    }

    #[test]
    fn genkey_out_creates_private_directories_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("spa-genkey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let key = root.join(".config/spa/alice.key");
        genkey(Some(key.clone())).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(key.parent().unwrap()), 0o700);
        assert!(crate::profile::read_private_key(&key).is_ok());
        assert!(genkey(Some(key)).is_err(), "refuses to overwrite");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn wait_takes_an_optional_value() {
        let cli = Cli::try_parse_from(["spa", "-p", "gw", "knock", "--wait"]).unwrap();
        let Command::Knock(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.wait.as_deref(), Some("5s"));
        let cli = Cli::try_parse_from(["spa", "knock", "--wait=2s", "-p", "x"]).unwrap();
        assert_eq!(cli.profile.as_deref(), Some("x"));
    }
}
