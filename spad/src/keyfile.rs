//! Secret files on disk: private keys and TOTP secrets. Refuses files that others can read,
//! writes new ones with mode 0600, and keeps the bytes in zeroized buffers.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use spa_shared::keys::PrivateKey;
use zeroize::Zeroizing;

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has mode {mode:04o}: a secret must not be readable by group or others; run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
    #[error("{path}: private key {source}")]
    Invalid {
        path: String,
        source: spa_shared::keys::KeyError,
    },
}

/// Reads a secret text file after checking it is not group/other accessible.
pub fn read_secret_text(path: &Path) -> Result<Zeroizing<String>, KeyFileError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path: shown, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: shown,
        source,
    })?;
    Ok(Zeroizing::new(text))
}

/// Reads a private key file (base64, as `spad genkey` writes it).
pub fn read_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let text = read_secret_text(path)?;
    PrivateKey::from_base64(&text).map_err(|source| KeyFileError::Invalid {
        path: path.display().to_string(),
        source,
    })
}

/// Writes a secret text file with mode 0600, refusing to overwrite an existing file. Missing
/// directories are created with mode 0700 (`mkdir -p`).
pub fn write_secret_text(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_permissions_are_refused_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("spad-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("new/dirs/k");
        let key = PrivateKey::from_bytes([3; 32]);
        write_secret_text(&path, &key.to_base64()).unwrap();
        assert_eq!(
            read_private_key(&path).unwrap().public_key(),
            key.public_key()
        );
        assert!(write_secret_text(&path, "x").is_err(), "must not overwrite");
        let created = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(
            created.permissions().mode() & 0o777,
            0o700,
            "mkdir -p, private"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private_key(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
