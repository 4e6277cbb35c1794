//! Client profiles (`~/.config/spa/NAME.toml` or any path): where the gateway is and what to ask.
//! `spa -p NAME` looks in [`profile_dir`]; a value with a `/` or ending in `.toml` is a path.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use spa_shared::keys::{PrivateKey, PublicKey};

/// A profile file. Relative paths are relative to the profile's directory.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    /// Gateway host name or address.
    pub server: Option<String>,
    /// SPA port (default 62201).
    pub port: Option<u16>,
    /// The gateway's public key (base64).
    pub server_public_key: Option<String>,
    /// This client's private key file (mode 0600).
    pub private_key: Option<String>,
    /// Services to open.
    #[serde(default)]
    pub services: Vec<String>,
    /// Requested duration (`"30s"`, `"1h"`); the gateway caps it.
    pub duration: Option<String>,
    /// The address the packet is for, as the gateway sees it (see `spa knock --address`).
    pub address: Option<String>,
    /// TOTP knocking: first port, protocol, and the secret file (base32).
    pub totp_first_port: Option<u16>,
    pub totp_protocol: Option<String>,
    pub totp_secret_file: Option<String>,
    pub totp_port_range: Option<String>,
    pub totp_derived_ports: Option<usize>,
    /// DNS servers to ask for `server` (devices without /etc/resolv.conf).
    #[serde(default)]
    pub resolver: Vec<String>,
    /// A TCP port of the granted services that `spa knock --wait` connects to.
    pub probe_port: Option<u16>,
    #[serde(skip)]
    pub base: PathBuf,
}

/// Where profiles live: `$XDG_CONFIG_HOME/spa`, else `$HOME/.config/spa`.
pub fn profile_dir() -> anyhow::Result<PathBuf> {
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").and_then(non_empty) {
        return Ok(dir.join("spa"));
    }
    let home = std::env::var_os("HOME")
        .and_then(non_empty)
        .context("neither $XDG_CONFIG_HOME nor $HOME is set: pass the profile as a path")?;
    Ok(home.join(".config").join("spa"))
}

/// The file a `-p` value names: a path if it has a `/` or ends in `.toml`, else a profile name.
pub fn locate(value: &str) -> anyhow::Result<PathBuf> {
    if value.contains('/') || value.ends_with(".toml") {
        return Ok(PathBuf::from(value));
    }
    if !spa_shared::invite::valid_profile_name(value) {
        anyhow::bail!("`{value}` is neither a profile name ([A-Za-z0-9._-]) nor a path");
    }
    let path = profile_dir()?.join(format!("{value}.toml"));
    if !path.exists() {
        anyhow::bail!(
            "no profile `{value}`: {} does not exist (`spa profiles` lists them; `spa enroll URI` creates one)",
            path.display()
        );
    }
    Ok(path)
}

/// The profile names in `dir`, sorted.
pub fn list(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(String::from)
        })
        .filter(|n| spa_shared::invite::valid_profile_name(n))
        .collect();
    names.sort();
    Ok(names)
}

impl Profile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            anyhow::bail!("profile {} does not exist", path.display());
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading profile {}", path.display()))?;
        let mut profile: Profile = toml::from_str(&text).map_err(|e| {
            let (line, col) = e.span().map_or((0, 0), |s| {
                let before = &text[..s.start.min(text.len())];
                (
                    before.matches('\n').count() + 1,
                    before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1,
                )
            });
            anyhow::anyhow!("{}:{line}:{col}: {}", path.display(), e.message().trim())
        })?;
        profile.base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(profile)
    }

    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    pub fn server_key(&self) -> anyhow::Result<PublicKey> {
        let text = self
            .server_public_key
            .as_deref()
            .context("no server public key (profile server-public-key or --server-key)")?;
        PublicKey::from_base64(text).context("server public key")
    }

    pub fn private_key(&self) -> anyhow::Result<PrivateKey> {
        let path = self
            .private_key
            .as_deref()
            .context("no private key (profile private-key or --key)")?;
        read_private_key(&self.resolve(path))
    }
}

/// Reads a secret file, refusing group/other-readable ones (like ssh does).
pub fn read_secret(path: &Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{} has mode {mode:04o}: secrets must not be readable by others; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    ))
}

/// Reads a private key file.
pub fn read_private_key(path: &Path) -> anyhow::Result<PrivateKey> {
    let text = read_secret(path)?;
    PrivateKey::from_base64(&text).with_context(|| format!("{}: not a private key", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_profile_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/client.toml");
        let profile = Profile::load(&path).unwrap();
        assert_eq!(profile.services, vec!["ssh"]);
        assert!(profile.server_key().is_ok());
        assert_eq!(
            profile.resolve("alice.key"),
            path.parent().unwrap().join("alice.key")
        );
    }

    #[test]
    fn unknown_keys_name_the_line() {
        let dir = std::env::temp_dir().join(format!("spa-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        std::fs::write(&path, "server = \"x\"\nservcies = []\n").unwrap();
        let err = Profile::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("p.toml:2:1") && err.contains("unknown field"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
