//! `cargo run -p xtask -- dist [DIR]`: writes what the Debian packages ship besides the
//! binaries, generated from the clap definitions so they never drift from `--help`:
//! man pages (`spad.8`, `spad-SUBCOMMAND.8`, `spa.1`, `spa-SUBCOMMAND.1`), bash/zsh/fish
//! completions, and the systemd unit with the packaged binary's path. Default DIR:
//! `target/dist`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap_complete::Shell;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("dist") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let dir = args
                .next()
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target/dist"));
            dist(&root, &dir)?;
            println!("wrote {}", dir.display());
            Ok(())
        }
        _ => anyhow::bail!("usage: cargo run -p xtask -- dist [DIR]"),
    }
}

fn dist(root: &Path, dir: &Path) -> anyhow::Result<()> {
    for sub in ["man", "completions", "systemd"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    for (cmd, section) in [
        (spad::cli::command(), "8"),
        (spa_client::cli::command(), "1"),
    ] {
        man_pages(cmd.clone(), section, &dir.join("man"))?;
        let name = cmd.get_name().to_string();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let file = match shell {
                Shell::Bash => name.clone(),
                Shell::Zsh => format!("_{name}"),
                _ => format!("{name}.fish"),
            };
            let mut out = std::fs::File::create(dir.join("completions").join(file))?;
            clap_complete::generate(shell, &mut cmd.clone(), name.clone(), &mut out);
        }
    }
    // The unit in conf/ is for a hand install (/usr/local/sbin); the package puts spad in /usr/sbin.
    let unit = std::fs::read_to_string(root.join("conf/spad.service"))
        .context("reading conf/spad.service")?;
    std::fs::write(
        dir.join("systemd/spad.service"),
        unit.replace("/usr/local/sbin/spad", "/usr/sbin/spad"),
    )?;
    Ok(())
}

/// One page for the command and one per subcommand (`spad-invite.8`), recursively.
fn man_pages(cmd: clap::Command, section: &str, dir: &Path) -> anyhow::Result<()> {
    let cmd = cmd.disable_help_subcommand(true);
    let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(section)
        .render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.{section}")), page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page_name = format!("{name}-{}", sub.get_name());
        let usage = format!("{} {}", name.replace('-', " "), sub.get_name());
        man_pages(
            sub.clone().display_name(page_name).bin_name(usage),
            section,
            dir,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Every argument of every command of both programs has a help line, so no man page or
    /// completion shows a bare flag.
    #[test]
    fn every_flag_of_spad_and_spa_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&spad::cli::command(), "spad", &mut missing);
        walk(&spa_client::cli::command(), "spa", &mut missing);
        assert!(missing.is_empty(), "no help line: {missing:?}");
    }

    #[test]
    fn dist_writes_pages_completions_and_the_packaged_unit() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = std::env::temp_dir().join(format!("spa-dist-{}", std::process::id()));
        super::dist(&root, &dir).unwrap();
        let page = std::fs::read_to_string(dir.join("man/spad-invite.8")).unwrap();
        assert!(
            page.contains("spad invite") && page.contains("\\-\\-services"),
            "{page}"
        );
        let close = std::fs::read_to_string(dir.join("man/spa-close.1")).unwrap();
        assert!(!close.to_lowercase().contains("open"), "{close}");
        let bash = std::fs::read_to_string(dir.join("completions/spa")).unwrap();
        assert!(bash.contains("enroll") && bash.contains("--wait"));
        let unit = std::fs::read_to_string(dir.join("systemd/spad.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/sbin/spad run") && !unit.contains("/usr/local/"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
