//! `spad client add NAME --public-key KEY --services …`: the last step of onboarding. Adds a
//! `[clients.NAME]` table to the configuration file, keeping every comment and the layout
//! (toml_edit), checks the result with the loader the daemon uses before anything is written,
//! replaces the file atomically (same mode and owner), and asks a running daemon to reload.
//! `spad client remove NAME` is the reverse (a lost device): on reload the daemon drops the
//! client's live grants, since the new config no longer allows them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use spa_shared::invite::valid_profile_name;
use spa_shared::keys::PublicKey;
use toml_edit::{Array, DocumentMut, Item, Table};

use crate::config::Config;

/// `spad client …` commands.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Add a client to the configuration (comments and layout kept), check it, reload spad.
    Add(AddArgs),
    /// Remove a client from the configuration and reload spad, which closes its live grants.
    Remove(RemoveArgs),
}

/// `spad client remove` arguments.
#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// Configuration file.
    #[arg(short, long, default_value = crate::cli::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The client's name.
    pub name: String,
    /// Only write the file; do not signal a running spad.
    #[arg(long)]
    pub no_reload: bool,
}

/// `spad client add` arguments.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// Configuration file.
    #[arg(short, long, default_value = crate::cli::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The client's name (as in the invitation).
    pub name: String,
    /// The client's public key (base64), as `spa enroll` printed it.
    #[arg(long)]
    pub public_key: String,
    /// Services the client may open (comma-separated).
    #[arg(long, required = true, value_delimiter = ',')]
    pub services: Vec<String>,
    /// Cap on the duration this client may ask for, e.g. 12h.
    #[arg(long)]
    pub max_duration: Option<String>,
    /// Only write the file; do not signal a running spad.
    #[arg(long)]
    pub no_reload: bool,
}

/// Runs a `spad client` command.
pub fn run(command: ClientCommand) -> anyhow::Result<()> {
    match command {
        ClientCommand::Add(args) => add(args),
        ClientCommand::Remove(args) => remove(args),
    }
}

/// The configuration text without `[clients.NAME]` (its comment lines go with it).
pub fn without_client(path: &Path, text: &str, name: &str) -> anyhow::Result<String> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let clients = doc.get_mut("clients").and_then(Item::as_table_mut);
    let removed = clients.and_then(|c| c.remove(name));
    if removed.is_none() {
        let known = Config::parse(path, text)
            .map(|c| c.clients.keys().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        bail!(
            "no client `{name}` in {}; configured: {known}",
            path.display()
        );
    }
    let new = doc.to_string();
    let config = Config::parse(path, &new).map_err(|e| {
        anyhow::anyhow!(
            "the config without client `{name}` does not check: {e}; nothing was written"
        )
    })?;
    if config.clients.contains_key(name) {
        bail!("internal error: client `{name}` is still in the config; nothing was written");
    }
    Ok(new)
}

fn remove(args: RemoveArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let new = without_client(&args.config, &text, &args.name)?;
    replace_file(&args.config, &new)?;
    println!(
        "removed client {} from {}",
        args.name,
        args.config.display()
    );
    if !args.no_reload {
        report_reload(&reload_daemon(&args.config)?);
    }
    Ok(())
}

fn report_reload(pids: &[i32]) {
    if pids.is_empty() {
        println!("no running spad uses this config; it will load the change when it starts");
    }
    for pid in pids {
        println!("asked spad (pid {pid}) to reload; its log says whether the reload was accepted");
    }
}

/// The configuration text with `[clients.NAME]` added after the last client (or at the end).
pub fn with_client(
    path: &Path,
    text: &str,
    name: &str,
    public_key: &PublicKey,
    services: &[String],
    max_duration: Option<&str>,
) -> anyhow::Result<String> {
    if !valid_profile_name(name) {
        bail!("client name `{name}` must be 1-64 of [A-Za-z0-9._-], not starting with . or -");
    }
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let last_position = doc
        .get("clients")
        .and_then(Item::as_table)
        .map(|clients| {
            if clients.contains_key(name) {
                bail!(
                    "client `{name}` already exists in {}; pick another name or edit it by hand",
                    path.display()
                );
            }
            Ok(clients
                .iter()
                .filter_map(|(_, item)| item.as_table()?.position())
                .max())
        })
        .transpose()?
        .flatten();
    let mut table = Table::new();
    table
        .decor_mut()
        .set_prefix("\n# added by `spad client add`\n");
    table["public-key"] = toml_edit::value(public_key.to_string());
    table["services"] = toml_edit::value(services.iter().collect::<Array>());
    if let Some(d) = max_duration {
        table["max-duration"] = toml_edit::value(d);
    }
    // Tables print in position order; reuse the last client's position so the new one
    // follows it (ties keep insertion order), or go to the end.
    let position = last_position.unwrap_or_else(|| {
        doc.iter()
            .filter_map(|(_, item)| item.as_table()?.position())
            .max()
            .map_or(0, |p| p + 1)
    });
    table.set_position(position);
    let clients = doc
        .entry("clients")
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_mut()
        .context("`clients` in the config is not a table")?;
    clients.insert(name, Item::Table(table));
    let new = doc.to_string();
    // The daemon's own loader decides, before anything touches the disk.
    let config = Config::parse(path, &new).map_err(|e| {
        anyhow::anyhow!(
            "the config with client `{name}` added does not check: {e}; nothing was written"
        )
    })?;
    if config.clients.get(name).map(|c| c.public_key) != Some(*public_key) {
        bail!("internal error: client `{name}` did not land in the config; nothing was written");
    }
    Ok(new)
}

/// Replaces `path` with `text` atomically, keeping its mode, owner and group (a packaged
/// config is root:spad 0640). A symlink is followed: its target is replaced, not the link.
fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let path =
        &std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let meta = std::fs::metadata(path)?;
    let mode = meta.permissions().mode() & 0o7777;
    let tmp = path.with_file_name(format!(
        ".{}.spad-new",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("config")
    ));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))
            .with_context(|| format!("keeping the owner of {}", path.display()))?;
        // create_new applied the umask; set the mode exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn add(args: AddArgs) -> anyhow::Result<()> {
    let key = PublicKey::from_base64(&args.public_key)
        .map_err(|e| anyhow::anyhow!("--public-key: {e} (paste what `spa enroll` printed)"))?;
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let new = with_client(
        &args.config,
        &text,
        &args.name,
        &key,
        &args.services,
        args.max_duration.as_deref(),
    )?;
    replace_file(&args.config, &new)?;
    println!(
        "added client {} ({}) to {}",
        args.name,
        args.services.join(","),
        args.config.display()
    );
    if !args.no_reload {
        report_reload(&reload_daemon(&args.config)?);
    }
    Ok(())
}

/// Asks every running `spad run` that uses `config` to reload; returns their PIDs.
///
/// Today this is SIGHUP to the matching processes found in /proc; it is the one place to switch
/// to the control socket.
pub fn reload_daemon(config: &Path) -> anyhow::Result<Vec<i32>> {
    let wanted =
        std::fs::canonicalize(config).with_context(|| format!("resolving {}", config.display()))?;
    let mut pids = Vec::new();
    for pid in daemons_using(&wanted) {
        // A PID reused in between gets SIGHUP only if it is again a spad on this file.
        let Some(target) = rustix::process::Pid::from_raw(pid) else {
            continue;
        };
        if rustix::process::kill_process(target, rustix::process::Signal::HUP).is_ok() {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// PIDs of `spad run` processes whose config file is `wanted` (canonical).
fn daemons_using(wanted: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id() as i32;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let Some(config) = run_config(&args) else {
                return false;
            };
            let full = if config.is_absolute() {
                config
            } else {
                match std::fs::read_link(format!("/proc/{pid}/cwd")) {
                    Ok(cwd) => cwd.join(config),
                    Err(_) => return false,
                }
            };
            std::fs::canonicalize(full).is_ok_and(|c| c == wanted)
        })
        .collect()
}

/// The config file of a `spad run` command line, or None if it is not one.
fn run_config(args: &[String]) -> Option<PathBuf> {
    let program = Path::new(args.first()?).file_name()?.to_str()?;
    if program != "spad" {
        return None;
    }
    if args.get(1)? != "run" {
        return None;
    }
    let rest = &args[2..];
    for (i, arg) in rest.iter().enumerate() {
        if arg == "-c" || arg == "--config" {
            return rest.get(i + 1).map(PathBuf::from);
        }
        if let Some(v) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
        if let Some(v) = arg.strip_prefix("-c").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(v));
        }
    }
    Some(PathBuf::from(crate::cli::DEFAULT_CONFIG))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# my gateway
[server]
private-key = "server.key"   # keep me

[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "30s"

# ---- clients ----
[clients.alice]
public-key = "BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU="
services = ["ssh"]   # alice only needs ssh

[knocking]
blacklist-after = 3
"#;

    fn path() -> PathBuf {
        PathBuf::from("/etc/spad/spad.toml")
    }

    #[test]
    fn a_client_is_added_after_the_last_one_keeping_comments() {
        let key = PublicKey([6; 32]);
        let new = with_client(&path(), TEXT, "phone", &key, &["ssh".into()], Some("1h")).unwrap();
        let (before, after) = new.split_once("[knocking]").unwrap();
        assert!(
            before.starts_with(TEXT.split("[knocking]").next().unwrap()),
            "{new}"
        );
        assert!(
            before.contains("[clients.phone]\npublic-key = \"BgYG"),
            "{new}"
        );
        assert!(before.contains("max-duration = \"1h\""), "{new}");
        assert!(after.contains("blacklist-after = 3"));
        let config = Config::parse(&path(), &new).unwrap();
        assert_eq!(config.clients["phone"].public_key, key);
    }

    #[test]
    fn without_clients_the_table_goes_at_the_end() {
        let text = TEXT
            .replace("[clients.alice]", "# [clients.alice]")
            .replace("public-key = \"BQ", "# public-key = \"BQ");
        let text = text.replace("services = [\"ssh\"]   #", "# services = [\"ssh\"]   #");
        let new = with_client(
            &path(),
            &text,
            "phone",
            &PublicKey([6; 32]),
            &["ssh".into()],
            None,
        )
        .unwrap();
        assert!(new.starts_with(&text), "{new}");
        assert!(new.trim_end().ends_with("services = [\"ssh\"]"), "{new}");
    }

    #[test]
    fn removal_is_the_inverse_of_addition() {
        let key = PublicKey([6; 32]);
        let added = with_client(&path(), TEXT, "phone", &key, &["ssh".into()], None).unwrap();
        assert_eq!(without_client(&path(), &added, "phone").unwrap(), TEXT);
        let err = without_client(&path(), TEXT, "phone")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no client `phone`") && err.contains("configured: alice"),
            "{err}"
        );
    }

    #[test]
    fn refused_additions_say_why() {
        let cases = [
            ("alice", PublicKey([6; 32]), "ssh", "already exists"),
            (
                "phone",
                PublicKey([5; 32]),
                "ssh",
                "same public key as `alice`",
            ),
            ("phone", PublicKey([6; 32]), "vpn", "unknown service `vpn`"),
            ("../x", PublicKey([6; 32]), "ssh", "client name"),
        ];
        for (name, key, service, want) in cases {
            let err = with_client(&path(), TEXT, name, &key, &[service.into()], None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn the_file_is_replaced_through_symlinks_keeping_mode_and_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("spad-client-add-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let real = dir.join("real.toml");
        std::fs::write(&real, "old").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
        // A file we just made is ours: its owner tells whether we may chown.
        let root = std::fs::metadata(&real).unwrap().uid() == 0;
        if root {
            std::os::unix::fs::chown(&real, Some(0), Some(1)).unwrap();
        }
        let link = dir.join("spad.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        replace_file(&link, "new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "new");
        let meta = std::fs::metadata(&real).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        if root {
            assert_eq!(meta.gid(), 1, "group kept");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_command_lines_name_their_config() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            run_config(&args("/usr/sbin/spad run -c /etc/x.toml")),
            Some(PathBuf::from("/etc/x.toml"))
        );
        assert_eq!(
            run_config(&args("spad run --config=a.toml")),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            run_config(&args("spad run")),
            Some(PathBuf::from(crate::cli::DEFAULT_CONFIG))
        );
        assert_eq!(run_config(&args("spad check -c /etc/x.toml")), None);
        assert_eq!(run_config(&args("vim run -c /etc/x.toml")), None);
    }
}
