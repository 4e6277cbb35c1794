//! Least privilege: after `spad run` has opened its sockets as root, it becomes an unprivileged
//! user (`user = "spad"` in `[server]` or `spad run --user spad`) that keeps only CAP_NET_ADMIN
//! (netlink, checked on every send) and CAP_NET_RAW (the capture socket), in the effective,
//! permitted, inheritable and ambient sets, so the `nft`/`iptables-restore` it runs for reloads
//! keep them too. Every other capability leaves the bounding set, `no_new_privs` is set, and
//! the state directory is handed to that user: it is the only place spad writes.
//!
//! Commands started for knock doors get none of this ([`without_capabilities`]).
//!
//! Credentials are per thread at the system-call level, so the drop refuses to run once a second
//! thread exists; the daemon starts its socket threads afterwards.

use std::path::Path;

use anyhow::{bail, Context};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// The capabilities spad keeps.
pub const KEPT: CapabilitySet = CapabilitySet::NET_ADMIN.union(CapabilitySet::NET_RAW);

/// A local account from `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks `name` up in `/etc/passwd` (system users are local; NSS is not consulted).
pub fn lookup_user(name: &str) -> anyhow::Result<Account> {
    let text = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    find_user(&text, name).with_context(|| {
        format!(
            "no user `{name}` in /etc/passwd; create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {name}`"
        )
    })
}

fn find_user(passwd: &str, name: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| {
            Some(Account {
                name: name.to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        })?
    })
}

/// The id of group `name` from `/etc/group`, if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    find_group(&text, name)
}

fn find_group(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            f[2].parse().ok()
        } else {
            None
        }
    })
}

/// Gives up CAP_BPF for good once the capture is open: the unit grants it only so the
/// capture can load its eBPF prefilter ([`crate::capture::ebpf`]). Removed from the
/// effective, permitted, inheritable and ambient sets (no privilege needed to give one up);
/// a reload that needs a new capture attaches the program loaded before
/// ([`crate::capture::program`]), which needs no privilege. As root
/// nothing changes (root keeps everything until `user =` drops it). Must run on the only
/// thread: capabilities are per thread. Returns whether it gave CAP_BPF up.
pub fn shed_bpf() -> anyhow::Result<bool> {
    use rustix::thread as t;
    if rustix::process::geteuid().is_root() {
        return Ok(false);
    }
    let sets = t::capabilities(None).context("capget")?;
    if !sets.permitted.contains(CapabilitySet::BPF) {
        return Ok(false);
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .context("reading /proc/self/task")?
        .count();
    if threads != 1 {
        bail!("internal: cannot give up CAP_BPF with {threads} threads running");
    }
    t::configure_capability_in_ambient_set(CapabilitySet::BPF, false)
        .context("lowering the ambient CAP_BPF")?;
    t::set_capabilities(
        None,
        CapabilitySets {
            effective: sets.effective - CapabilitySet::BPF,
            permitted: sets.permitted - CapabilitySet::BPF,
            inheritable: sets.inheritable - CapabilitySet::BPF,
        },
    )
    .context("capset")?;
    let now = t::capabilities(None).context("capget")?;
    if (now.effective | now.permitted | now.inheritable).contains(CapabilitySet::BPF)
        || t::capability_is_in_ambient_set(CapabilitySet::BPF).unwrap_or(true)
    {
        bail!("giving up CAP_BPF did not take effect");
    }
    Ok(true)
}

/// Becomes `account` with only [`KEPT`], after handing it `state_dir`. Must run as root, on
/// the only thread. Verifies the result and fails (so the daemon stops) if anything is off.
pub fn drop_to(account: &Account, state_dir: &Path) -> anyhow::Result<()> {
    use rustix::process::{Gid, Uid};
    use rustix::thread as t;
    let euid = rustix::process::geteuid();
    if euid.as_raw() == account.uid && !euid.is_root() {
        // Already started as that user (systemd's User= with ambient capabilities).
        let sets = t::capabilities(None).context("capget")?;
        if KEPT.contains(sets.permitted) {
            return Ok(());
        }
    }
    if !euid.is_root() {
        bail!(
            "`user = \"{}\"` needs spad to start as root (it drops to that user after opening its sockets); or start it as that user with ambient capabilities, as conf/spad.service does",
            account.name
        );
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .context("reading /proc/self/task")?
        .count();
    if threads != 1 {
        bail!("internal: cannot drop privileges with {threads} threads running");
    }
    hand_over(state_dir, account.uid)?;

    // The bounding set first, while CAP_SETPCAP is still held.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(40);
    for bit in 0..=last.min(63) {
        let cap = CapabilitySet::from_bits_retain(1 << bit);
        if !KEPT.contains(cap) {
            match t::remove_capability_from_bounding_set(cap) {
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(e) => return Err(e).context("dropping capabilities from the bounding set"),
            }
        }
    }
    t::set_keep_capabilities(true).context("PR_SET_KEEPCAPS")?;
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    t::set_thread_groups(&[gid]).context("setgroups")?;
    t::set_thread_res_gid(gid, gid, gid).context("setresgid")?;
    t::set_thread_res_uid(uid, uid, uid).context("setresuid")?;
    t::set_capabilities(
        None,
        CapabilitySets {
            effective: KEPT,
            permitted: KEPT,
            inheritable: KEPT,
        },
    )
    .context("capset")?;
    for cap in [CapabilitySet::NET_ADMIN, CapabilitySet::NET_RAW] {
        t::configure_capability_in_ambient_set(cap, true).context("raising ambient caps")?;
    }
    t::set_keep_capabilities(false).context("PR_SET_KEEPCAPS")?;
    t::set_no_new_privs(true).context("PR_SET_NO_NEW_PRIVS")?;

    // Verify rather than trust: the ids, the sets, and that root cannot be regained.
    let now = t::capabilities(None).context("capget")?;
    if rustix::process::getuid() != uid
        || rustix::process::geteuid() != uid
        || rustix::process::getgid() != gid
        || now.effective != KEPT
        || now.permitted != KEPT
        || t::set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT).is_ok()
    {
        bail!("privilege drop to `{}` did not take effect", account.name);
    }
    Ok(())
}

/// Gives `dir` and everything in it (bounded depth) to user `uid`, keeping each group (the
/// control socket's `spad` group stays); nothing else is writable to it.
fn hand_over(dir: &Path, uid: u32) -> anyhow::Result<()> {
    fn walk(path: &Path, uid: u32, depth: u32) -> anyhow::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), None)
            .with_context(|| format!("handing {} to uid {uid}", path.display()))?;
        let meta = std::fs::symlink_metadata(path)?;
        if meta.is_dir() && depth < 4 {
            for entry in std::fs::read_dir(path)? {
                walk(&entry?.path(), uid, depth + 1)?;
            }
        }
        Ok(())
    }
    walk(dir, uid, 0)
}

/// Gives `path` and its parents up to `state_dir` the owner of `state_dir` when they differ,
/// so files a root `spad` command writes there stay readable to a daemon running as a user.
pub fn owned_like_state_dir(state_dir: &Path, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(state_dir)?;
    let mut at = Some(path);
    while let Some(p) = at.filter(|p| p.starts_with(state_dir) && *p != state_dir) {
        let meta = std::fs::symlink_metadata(p)?;
        if meta.uid() != owner.uid() || meta.gid() != owner.gid() {
            std::os::unix::fs::lchown(p, Some(owner.uid()), Some(owner.gid()))?;
        }
        at = p.parent();
    }
    Ok(())
}

/// Makes `command` start without any capability, even when spad runs as root: the ambient set
/// is cleared (enough for a non-root spad: `execve` then grants nothing) and, as root, the
/// `NO_ROOT` secure bit keeps `execve` from granting them back and the sets are emptied.
pub fn without_capabilities(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let as_root = rustix::process::geteuid().is_root();
    // SAFETY: the closure runs in the forked child before exec and only makes raw prctl/capset
    // system calls (rustix, no allocation, no locks), which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            use rustix::thread as t;
            t::clear_ambient_capability_set()?;
            if as_root {
                t::set_capabilities_secure_bits(
                    t::CapabilitiesSecureBits::NO_ROOT | t::CapabilitiesSecureBits::NO_ROOT_LOCKED,
                )?;
                t::set_capabilities(
                    None,
                    CapabilitySets {
                        effective: CapabilitySet::empty(),
                        permitted: CapabilitySet::empty(),
                        inheritable: CapabilitySet::empty(),
                    },
                )?;
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_groups_are_parsed_from_the_files() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nspad:x:998:997::/nonexistent:/usr/sbin/nologin\n";
        assert_eq!(
            find_user(passwd, "spad"),
            Some(Account {
                name: "spad".into(),
                uid: 998,
                gid: 997
            })
        );
        assert_eq!(find_user(passwd, "spa"), None);
        assert_eq!(find_user("spad:x:nope:1\n", "spad"), None);
        assert_eq!(find_group("spad:x:997:\nadm:x:4:\n", "spad"), Some(997));
        assert_eq!(find_group("adm:x:4:\n", "spad"), None);
    }

    #[test]
    fn files_written_into_a_users_state_dir_become_that_users() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("spad-owned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/file"), "x").unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        owned_like_state_dir(&dir, &dir.join("sub/file")).unwrap();
        for p in [dir.join("sub"), dir.join("sub/file")] {
            let meta = std::fs::metadata(&p).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{}", p.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commands_start_without_capabilities() {
        // Runs as root in the test environment; the child must still have no capabilities.
        let mut cmd = std::process::Command::new("grep");
        cmd.args(["^Cap", "/proc/self/status"]);
        without_capabilities(&mut cmd);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            let line = text.lines().find(|l| l.starts_with(set)).unwrap();
            assert!(line.ends_with("0000000000000000"), "{text}");
        }
    }
}
