//! `spad check` refuses configuration values that would break or weaken the daemon, naming
//! `file:line:col`, and says plainly when the file is missing or not UTF-8. No namespace or
//! root is needed: this runs the real binary on files in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use spa_e2e::binary;

const KEY: &str = "aGVsbG8gd29ybGQgdGhpcyBpcyAzMiBieXRlcyEhISE=";

fn base() -> String {
    format!(
        r#"[server]
private-key = "server.key"
state-dir = "state"
max-age = "60s"

[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "30s"

[clients.alice]
public-key = "{KEY}"
services = ["ssh"]

[doors.ops]
sequence = ["7000/tcp", "8000/udp"]
services = ["ssh"]

[knocking]
max-knocks-per-second = 20
"#
    )
}

/// A directory with a server key, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("spad-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(binary("spad"))
            .args(["genkey", "--out"])
            .arg(dir.join("server.key"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Dir(dir)
    }

    /// Runs `spad check -c FILE` on `bytes`; returns (success, stdout + stderr).
    fn check(&self, bytes: &[u8]) -> (bool, String) {
        let path = self.0.join("spad.toml");
        std::fs::write(&path, bytes).unwrap();
        check_path(&path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check_path(path: &Path) -> (bool, String) {
    let out = Command::new(binary("spad"))
        .arg("check")
        .arg("-c")
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// 1-based line and column of the first `marker` in `text`.
fn position(text: &str, marker: &str) -> (usize, usize) {
    let offset = text.find(marker).expect("marker in text");
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[test]
fn spad_check_refuses_values_that_break_or_weaken_the_daemon() {
    let dir = Dir::new("refusals");
    let (ok, out) = dir.check(base().as_bytes());
    assert!(ok, "the base config must pass: {out}");
    let file = dir.0.join("spad.toml").display().to_string();
    let long_name = "\u{1F600}".repeat(26);
    // (replace, with, marker where the error must point, words the message must contain)
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "max-age = \"60s\"",
            "max-age = 0".into(),
            "0".into(),
            "max-age = 0 refuses every packet",
        ),
        (
            "max-age = \"60s\"",
            "max-age = 9223372036854775807".into(),
            "9223372036854775807".into(),
            "longest kernel set timeout",
        ),
        (
            "max-age = \"60s\"",
            "max-future = \"3650d\"".into(),
            "\"3650d\"".into(),
            "longest kernel set timeout",
        ),
        (
            "max-age = \"60s\"",
            "max-future = \"2d\"".into(),
            "\"2d\"".into(),
            "write at most \"1h\"",
        ),
        (
            "timeout = \"30s\"",
            "timeout = \"30d\"".into(),
            "\"30d\"".into(),
            "(2147483 s, what ipset accepts)",
        ),
        (
            "max-knocks-per-second = 20",
            "max-knocks-per-second = 0".into(),
            "0\n".into(),
            "max-knocks-per-second = 0",
        ),
        (
            "[knocking]",
            "[services.web]\nkind = \"vpn\"\nports = [\"22/tcp\"]\ntimeout = \"1m\"\n\n[knocking]"
                .into(),
            "\"22/tcp\"]\ntimeout = \"1m\"".into(),
            "already a port of service `ssh`",
        ),
        (
            "[clients.alice]",
            format!("[clients.\"{long_name}\"]"),
            format!("[clients.\"{long_name}\"]"),
            "104 bytes of UTF-8",
        ),
        (
            "[doors.ops]",
            format!("[doors.\"{long_name}\"]"),
            format!("[doors.\"{long_name}\"]"),
            "104 bytes of UTF-8",
        ),
    ];
    for (from, to, marker, words) in cases {
        let text = base().replacen(from, &to, 1);
        let (line, column) = position(&text, &marker);
        let (ok, out) = dir.check(text.as_bytes());
        assert!(!ok, "`{to}` must be refused; spad check said: {out}");
        let located = format!("{file}:{line}:{column}: ");
        assert!(
            out.contains(&located),
            "`{to}`: expected {located} in: {out}"
        );
        assert!(out.contains(words), "`{to}`: expected `{words}` in: {out}");
    }
}

#[test]
fn spad_check_names_a_missing_or_non_utf8_file_as_such() {
    let dir = Dir::new("unreadable");
    let missing = dir.0.join("absent.toml");
    let (ok, out) = check_path(&missing);
    assert!(!ok);
    assert!(
        out.contains(&format!("{}: missing: no such file", missing.display())),
        "{out}"
    );
    assert!(!out.contains(":0:0"), "{out}");
    let text = base().replacen("state-dir = \"state\"", "state-dir = \"\u{e9}tat\"", 1);
    let latin1: Vec<u8> = text.chars().map(|c| c as u32 as u8).collect();
    let (ok, out) = dir.check(&latin1);
    assert!(!ok);
    let file = dir.0.join("spad.toml").display().to_string();
    assert!(
        out.contains(&format!("{file}:3:14: not UTF-8 (byte 0xe9)")),
        "{out}"
    );
}
