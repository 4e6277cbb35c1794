//! Packaging: the Debian packages `spad` and `spa` build with cargo-deb from the
//! binaries the other tests use, carry the unit, man pages, completions and an example config
//! with no live client, install with `dpkg -i` on this machine (system user, private
//! directories, a server key), `systemd-analyze verify` accepts the installed unit, and a
//! purge removes what the install made. Skipped, with the reason, when cargo-deb is absent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use spa_e2e::*;

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds one package from already-built binaries into `dir`; returns its path.
fn build(dir: &Path, args: &[&str]) -> PathBuf {
    let out = Command::new(cargo())
        .args(["deb", "-q", "--fast", "--no-build", "-o"])
        .arg(dir)
        .args(args)
        .current_dir(workspace())
        .output()
        .unwrap();
    let printed = ok(out, "cargo deb");
    PathBuf::from(printed.lines().last().unwrap().trim())
}

fn contents(deb: &Path) -> Vec<String> {
    let listing = ok(
        Command::new("dpkg-deb")
            .arg("-c")
            .arg(deb)
            .output()
            .unwrap(),
        "dpkg-deb -c",
    );
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

fn extract(deb: &Path, member: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -xO '.{member}'",
            deb.display()
        ))
        .output()
        .unwrap();
    ok(out, member)
}

/// Runs dpkg, waiting (bounded) while another process holds its lock.
fn dpkg(args: &[&str]) -> Output {
    let mut last = None;
    wait_until(Duration::from_secs(120), || {
        let out = Command::new("dpkg").args(args).output().unwrap();
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        let done = out.status.success() || !locked;
        last = Some(out);
        done
    });
    last.unwrap()
}

/// Purges both packages when dropped, so a failed assertion leaves the machine as it was.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = dpkg(&["--purge", "spad", "spa"]);
    }
}

#[test]
fn debian_packages_build_install_and_purge() {
    if !e2e_or_skip() {
        return;
    }
    if Command::new(cargo())
        .args(["deb", "--version"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!(
            "SKIPPED debian_packages_build_install_and_purge: cargo-deb is absent \
             (`cargo install --locked cargo-deb --version 3.6.2`; .ci/run installs it)"
        );
        return;
    }
    for pkg in ["spad", "spa"] {
        let status = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&status.stdout).contains("ok installed"),
            "package {pkg} is already installed here; this test installs and purges it"
        );
    }
    // Man pages, completions and the packaged unit, generated from the clap definitions.
    ok(
        Command::new(cargo())
            .args(["run", "-q", "-p", "xtask", "--", "dist"])
            .current_dir(workspace())
            .output()
            .unwrap(),
        "xtask dist",
    );
    let dir = std::env::temp_dir().join(format!("spa-debs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let spad = build(&dir, &["-p", "spad", "--profile", "dev"]);
    let spa = build(
        &dir,
        &[
            "-p",
            "spa-client",
            "--profile",
            "client",
            "--target",
            "x86_64-unknown-linux-musl",
        ],
    );

    let files = contents(&spad);
    for want in [
        "/usr/sbin/spad",
        "/usr/lib/systemd/system/spad.service",
        "/etc/spad/spad.toml",
        "/usr/share/man/man8/spad.8.gz",
        "/usr/share/man/man8/spad-invite.8.gz",
        "/usr/share/man/man8/spad-client-add.8.gz",
        "/usr/share/bash-completion/completions/spad",
        "/usr/share/zsh/vendor-completions/_spad",
        "/usr/share/fish/vendor_completions.d/spad.fish",
        "/usr/share/doc/spad/operations.md",
        // The licences of the C library (aws-lc) and crates linked in.
        "/usr/share/doc/spad/third-party.md",
        "/usr/share/doc/spad/copyright",
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "spad lacks {want}: {files:?}"
        );
    }
    assert!(
        !files.iter().any(|f| f.ends_with(".key")),
        "no key is shipped"
    );
    let config = extract(&spad, "/etc/spad/spad.toml");
    assert!(
        !config.lines().any(|l| l.starts_with("[clients.")),
        "the shipped config has no live client"
    );
    assert!(config.contains("# [clients.alice-laptop]"), "but shows how");
    let unit = extract(&spad, "/usr/lib/systemd/system/spad.service");
    assert!(
        unit.contains("ExecStart=/usr/sbin/spad run -c /etc/spad/spad.toml"),
        "{unit}"
    );
    let files = contents(&spa);
    for want in [
        "/usr/bin/spa",
        "/usr/share/man/man1/spa.1.gz",
        "/usr/share/man/man1/spa-knock.1.gz",
        "/usr/share/bash-completion/completions/spa",
        "/usr/share/zsh/vendor-completions/_spa",
        "/usr/share/fish/vendor_completions.d/spa.fish",
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "spa lacks {want}: {files:?}"
        );
    }

    // Install both on this machine.
    let _installed = Installed;
    let out = dpkg(&["-i", spad.to_str().unwrap(), spa.to_str().unwrap()]);
    let said = ok(out, "dpkg -i");
    assert!(said.contains("created /etc/spad/server.key"), "{said}");
    ok(
        Command::new("id").arg("spad").output().unwrap(),
        "system user spad",
    );
    let key = std::fs::metadata("/etc/spad/server.key").unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    let version = ok(
        Command::new("/usr/sbin/spad")
            .arg("--version")
            .output()
            .unwrap(),
        "spad --version",
    );
    assert!(version.starts_with("spad "), "{version}");
    ok(
        Command::new("/usr/bin/spa")
            .arg("--version")
            .output()
            .unwrap(),
        "spa --version",
    );
    ok(
        Command::new("man")
            .args(["-w", "spad", "spa-enroll"])
            .output()
            .unwrap(),
        "man pages installed",
    );
    // systemd accepts the installed unit, and would refuse a broken one.
    ok(
        Command::new("systemd-analyze")
            .args(["verify", "/usr/lib/systemd/system/spad.service"])
            .output()
            .unwrap(),
        "systemd-analyze verify",
    );
    let broken = dir.join("spad.service");
    std::fs::write(
        &broken,
        unit.replace("/usr/sbin/spad run", "/nonexistent/spad run"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "verify must catch a missing binary");

    // A purge removes the binaries, the key made on install and the state directory.
    drop(_installed);
    for gone in [
        "/usr/sbin/spad",
        "/usr/bin/spa",
        "/etc/spad",
        "/var/lib/spad",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after purge");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
