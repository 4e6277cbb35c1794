//! TOTP enrollment: the DrayTek "Validation Code / Verify" step. A TOTP door opens only after
//! an admin has shown the secret to the user's authenticator and typed back a valid code; the
//! proof is a file `STATE_DIR/totp-enrolled/DOOR` holding a hash of the enrolled secret, so
//! changing the secret requires enrolling again.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use spa_shared::totp::{self, Secret};

use crate::knock::config::TotpDoor;

fn fingerprint(secret: &Secret) -> String {
    let digest = Sha256::digest(secret.to_base32().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the enrollment proof of `door` lives.
pub fn proof_path(state_dir: &Path, door: &str) -> PathBuf {
    state_dir.join("totp-enrolled").join(door)
}

/// Whether `door` has been enrolled with its current secret.
pub fn is_enrolled(state_dir: &Path, door: &TotpDoor) -> bool {
    std::fs::read_to_string(proof_path(state_dir, &door.name))
        .is_ok_and(|t| t.trim() == fingerprint(&door.secret))
}

/// Checks `code` against the door's secret at `unix_secs` (± the door's skew). Returns the step.
pub fn verify(door: &TotpDoor, code: &str, unix_secs: u64) -> Option<u64> {
    let code = code.trim();
    let current = door.params.step(unix_secs);
    (current.saturating_sub(door.skew_steps)..=current + door.skew_steps).find(|step| {
        totp::codes_equal(&totp::code_at_step(&door.secret, &door.params, *step), code)
    })
}

/// Records that `door` is enrolled.
pub fn record(state_dir: &Path, door: &TotpDoor) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let path = proof_path(state_dir, &door.name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path.parent().unwrap_or(state_dir))?;
    crate::state::write_atomic(&path, fingerprint(&door.secret).as_bytes())?;
    // Run as root next to an unprivileged daemon: what it must read belongs to it.
    crate::privilege::owned_like_state_dir(state_dir, &path)
}

/// A terminal QR code of `text` (two rows per character line).
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
