//! `spa enroll URI`: turns a gateway's invitation into a key pair and a profile on this
//! device. The private key never leaves the device; the public key is printed (and shown as a
//! QR code) for the gateway's admin, who adds it with `spad client add`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use spa_shared::invite::Invite;
use spa_shared::keys::{PrivateKey, PublicKey};

/// What enrollment wrote.
#[derive(Debug)]
pub struct Enrolled {
    pub profile: PathBuf,
    pub key: PathBuf,
    pub public_key: PublicKey,
}

/// The profile text for `invite`, with its key file next to it.
pub fn profile_text(invite: &Invite, key_file: &str) -> String {
    let quoted: Vec<String> = invite.services.iter().map(|s| format!("\"{s}\"")).collect();
    let mut text = format!(
        "# Written by `spa enroll` from the gateway's invitation. Paths are relative to this file.\n\
         server = \"{}\"\n\
         port = {}\n\
         server-public-key = \"{}\"\n\
         private-key = \"{key_file}\"   # mode 0600; never leaves this device\n\
         services = [{}]\n",
        invite.server,
        invite.port,
        invite.server_key,
        quoted.join(", ")
    );
    if let Some(port) = invite.probe_port {
        text.push_str(&format!(
            "probe-port = {port}                # `spa knock --wait` checks this TCP port answers\n"
        ));
    }
    text.push_str(
        "# resolver = [\"192.0.2.53\"]      # DNS server, for devices without /etc/resolv.conf\n",
    );
    text
}

fn create_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// Creates `dir` (and its parents) with mode 0700 if missing.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes `DIR/NAME.key` and `DIR/NAME.toml` for `invite`; refuses to replace either.
pub fn enroll(invite: &Invite, dir: &Path) -> anyhow::Result<Enrolled> {
    let profile = dir.join(format!("{}.toml", invite.name));
    let key = dir.join(format!("{}.key", invite.name));
    for path in [&profile, &key] {
        if path.exists() {
            bail!(
                "{} already exists: remove it first, or enroll under another name",
                path.display()
            );
        }
    }
    create_private_dir(dir)?;
    let private = PrivateKey::generate(&mut rand_core::OsRng);
    let mut key_text = private.to_base64();
    key_text.push('\n');
    create_secret(&key, &key_text)?;
    create_secret(
        &profile,
        &profile_text(invite, &format!("{}.key", invite.name)),
    )?;
    Ok(Enrolled {
        profile,
        key,
        public_key: private.public_key(),
    })
}

/// A terminal QR code of `text` (two rows per character line), dark on light.
pub fn qr(text: &str) -> String {
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => code
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build(),
        Err(e) => format!("(cannot render a QR code: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn enrollment_writes_a_loadable_private_profile_once() {
        let dir = std::env::temp_dir()
            .join(format!("spa-enroll-{}", std::process::id()))
            .join("deep/spa");
        let invite = Invite {
            server: "2001:db8::1".into(),
            port: 62201,
            server_key: PublicKey([9; 32]),
            services: vec!["ssh".into(), "vpn".into()],
            name: "phone".into(),
            probe_port: Some(22),
        };
        let done = enroll(&invite, &dir).unwrap();
        for path in [&done.profile, &done.key] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let profile = Profile::load(&done.profile).unwrap();
        assert_eq!(profile.server.as_deref(), Some("2001:db8::1"));
        assert_eq!(profile.services, vec!["ssh", "vpn"]);
        assert_eq!(profile.probe_port, Some(22));
        assert_eq!(profile.server_key().unwrap(), PublicKey([9; 32]));
        assert_eq!(profile.private_key().unwrap().public_key(), done.public_key);
        let again = enroll(&invite, &dir).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap()).unwrap();
    }
}
