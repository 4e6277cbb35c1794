//! The client side, end to end: onboarding a device (`spad invite` → `spa enroll` →
//! `spad client add` → `spa -p NAME knock --wait`), feedback without a reply, `--dry-run`
//! and `-v`, name resolution on a device without /etc/resolv.conf (a mount namespace, dnsmasq
//! in the lab), and the aarch64 static client under qemu-user.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use spa_e2e::*;

const CONF: &str = "demo.toml";
const T: Duration = Duration::from_millis(700);

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn lab_with_ssh(backend: Backend) -> (Lab, Echo) {
    let mut lab = Lab::new(CONF);
    let echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    lab.start_spad(CONF, backend);
    (lab, echo)
}

/// Runs `spa` in client namespace `ns` with `HOME` set to `home` (and no XDG_CONFIG_HOME).
fn spa_as(lab: &Lab, ns: &str, home: &Path, args: &[&str]) -> Output {
    let spa = binary("spa");
    let home = format!("HOME={}", home.display());
    let mut full = vec![
        "-u",
        "XDG_CONFIG_HOME",
        home.as_str(),
        spa.to_str().unwrap(),
    ];
    full.extend_from_slice(args);
    lab.try_exec(ns, "env", &full)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

pub fn onboarding_invite_enroll_add_then_knock_and_wait(backend: Backend) {
    let (mut lab, _echo) = lab_with_ssh(backend);
    let conf = lab.path(CONF);
    let conf_s = conf.to_str().unwrap().to_string();

    // 1. The admin invites the device.
    let invite = lab.spad(&[
        "invite",
        "phone",
        "--services",
        "ssh",
        "--address",
        GW4,
        "-c",
        &conf_s,
    ]);
    let shown = String::from_utf8(invite.stdout).unwrap();
    let uri = shown
        .lines()
        .find(|l| l.starts_with("spa://"))
        .unwrap_or_else(|| panic!("no URI in:\n{shown}"))
        .to_string();
    let server_private = std::fs::read_to_string(lab.path("keys/server.key")).unwrap();
    assert!(
        !shown.contains(server_private.trim()),
        "no private key, ever"
    );
    assert!(shown.contains('█'), "a QR code is shown:\n{shown}");

    // 2. The device enrolls: key pair and profile, directories created, all private.
    let home = lab.path("home-a");
    let enrolled = spa_as(&lab, &lab.a, &home, &["enroll", &uri]);
    assert!(enrolled.status.success(), "{}", text(&enrolled));
    let dir = home.join(".config/spa");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("phone.toml")), 0o600);
    assert_eq!(mode(&dir.join("phone.key")), 0o600);
    let printed = String::from_utf8(enrolled.stdout).unwrap();
    let public_key = printed
        .split_whitespace()
        .skip_while(|w| *w != "--public-key")
        .nth(1)
        .unwrap_or_else(|| panic!("no public key in:\n{printed}"))
        .to_string();
    let derived = Command::new(binary("spa"))
        .arg("pubkey")
        .stdin(std::fs::File::open(dir.join("phone.key")).unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&derived.stdout).trim(), public_key);
    let listed = spa_as(&lab, &lab.a, &home, &["profiles"]);
    assert!(
        text(&listed).contains(&format!("{GW4}:62201 ssh")),
        "{}",
        text(&listed)
    );

    // $XDG_CONFIG_HOME wins over $HOME when set.
    let xdg = |dir: &Path| {
        let spa = binary("spa");
        let env = format!("XDG_CONFIG_HOME={}", dir.display());
        lab.try_exec(
            &lab.a,
            "env",
            &[
                env.as_str(),
                spa.to_str().unwrap(),
                "-p",
                "phone",
                "knock",
                "--dry-run",
            ],
        )
    };
    assert!(xdg(&home.join(".config")).status.success());
    let elsewhere = xdg(&lab.path("xdg-elsewhere"));
    assert!(
        text(&elsewhere).contains("xdg-elsewhere/spa/phone.toml does not exist"),
        "{}",
        text(&elsewhere)
    );

    // 3. Before the admin adds the key, --wait reports that nothing opened, and exits non-zero.
    let early = spa_as(&lab, &lab.a, &home, &["-p", "phone", "knock", "--wait=3s"]);
    assert!(!early.status.success(), "{}", text(&early));
    assert!(
        text(&early).contains("no answer from 203.0.113.1:22")
            && text(&early).contains("spad client add")
            && text(&early).contains("sent a fresh packet (3 of 3)"),
        "{}",
        text(&early)
    );

    // 4. The admin adds the client: a bad key changes nothing; a good one keeps the file's
    //    comments and reloads the running daemon.
    let before = std::fs::read_to_string(&conf).unwrap();
    let spad = binary("spad");
    let bad = Command::new(&spad)
        .args([
            "client",
            "add",
            "phone",
            "--public-key",
            "AAAA",
            "--services",
            "ssh",
            "-c",
            &conf_s,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), before);
    let reloads = lab.log().matches("reloaded").count();
    let added = lab.spad(&[
        "client",
        "add",
        "phone",
        "--public-key",
        &public_key,
        "--services",
        "ssh",
        "-c",
        &conf_s,
    ]);
    assert!(text(&added).contains("asked spad (pid"), "{}", text(&added));
    let after = std::fs::read_to_string(&conf).unwrap();
    for line in before.lines() {
        assert!(after.contains(line), "lost line `{line}`:\n{after}");
    }
    assert!(lab.wait_log("reloaded", reloads + 1), "{}", lab.log());

    // 5. Now the profile found by name opens SSH, and --wait confirms it, even though the
    //    first packet is lost on the wire (dropped as it leaves the client's interface: a
    //    quota of one 204-byte packet).
    let lossy = lab.path("lossy.nft");
    std::fs::write(
        &lossy,
        "table netdev lossy {\n chain out {\n  type filter hook egress device eth0 priority 0;\n  udp dport 62201 quota until 300 bytes drop\n }\n}\n",
    )
    .unwrap();
    lab.exec(&lab.a, "nft", &["-f", lossy.to_str().unwrap()]);
    let ok = spa_as(&lab, &lab.a, &home, &["-p", "phone", "knock", "--wait"]);
    lab.exec(&lab.a, "nft", &["delete", "table", "netdev", "lossy"]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains("sent a fresh packet (2 of 3)"),
        "the lost packet was followed by a fresh one: {}",
        text(&ok)
    );
    assert!(
        text(&ok).contains("203.0.113.1:22 answers"),
        "{}",
        text(&ok)
    );
    assert!(lab.wait_log("granted owner=phone", 1), "{}", lab.log());

    // 6. A granted port where nothing listens is told apart from a closed door.
    let mut args: Vec<String> = vec!["knock".into()];
    args.extend(lab.knock_args("alice", false));
    args.extend(["-s", "vpn", "--wait=2s", "--probe-port", "443"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = lab.spa_in(&lab.a, &refs);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("nothing listens on port 443"),
        "{}",
        text(&refused)
    );

    // 7. A lost device: removing the client restores the file and closes its grant on reload.
    let reloads = lab.log().matches("reloaded").count();
    let removed = lab.spad(&["client", "remove", "phone", "-c", &conf_s]);
    assert!(
        text(&removed).contains("asked spad (pid"),
        "{}",
        text(&removed)
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), before);
    assert!(lab.wait_log("reloaded", reloads + 1), "{}", lab.log());
    assert!(
        wait_until(Duration::from_secs(5), || tcp_probe(
            &lab.a,
            Lab::gw4(22),
            T
        ) == Connect::TimedOut),
        "the removed client's grant is closed"
    );
    let late = spa_as(&lab, &lab.a, &home, &["-p", "phone", "knock", "--wait=1s"]);
    assert!(!late.status.success(), "{}", text(&late));
    lab.stop_spad(0, false);
}

pub fn dry_run_and_verbose_explain_and_dry_run_sends_nothing(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    let alice_pub = std::fs::read_to_string(lab.path("keys/alice.pub")).unwrap();
    for verb in ["knock", "close"] {
        let mut args: Vec<String> = vec![verb.into(), "--dry-run".into()];
        args.extend(lab.knock_args("alice", false));
        args.extend(["-s".into(), "ssh".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lab.spa_in(&lab.a, &refs);
        assert!(out.status.success(), "{}", text(&out));
        let said = text(&out);
        assert!(said.contains("dry run: nothing sent"), "{said}");
        assert!(said.contains(alice_pub.trim()), "{said}");
        assert!(
            said.contains("203.0.113.1 (via an address literal), UDP port 62201"),
            "{said}"
        );
    }
    let mut seq = vec!["sequence", "--dry-run", "--server", GW4, "7000", "8000:udp"];
    let out = lab.spa_in(&lab.a, &seq);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "203.0.113.1 7000/tcp 8000/udp\n"
    );
    seq.clear();
    // Nothing reached the gateway: the port stays filtered and spad logged no packet at all.
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert!(!lab.log().contains("alice"), "{}", lab.log());
    // -v alone sends and explains.
    let out = lab.knock(
        &lab.a,
        "alice",
        &["ssh"],
        &["-v", "--duration", "20s"],
        false,
    );
    assert!(
        text(&out).contains("request: open ssh for the packet's source address, for 20s"),
        "{}",
        text(&out)
    );
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq in the gateway namespace, answering only for gw.lab.test.
fn dnsmasq(lab: &Lab) -> Guard {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.gw,
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
        ])
        .args([
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address",
            GW4,
            "--port",
            "53",
        ])
        .args(["--user=root", "--pid-file", "--conf-file=/dev/null"])
        .args([
            "--address=/gw.lab.test/203.0.113.1",
            "--address=/gw.lab.test/2001:db8:1::1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (scripts/install-deps.sh installs dnsmasq-base)");
    let guard = Guard(child);
    let up = wait_until(Duration::from_secs(10), || {
        in_ns(&lab.a, || {
            spa_client::dns::lookup(
                "203.0.113.1:53".parse().unwrap(),
                "gw.lab.test",
                spa_client::dns::QueryType::A,
                Duration::from_millis(200),
            )
            .is_ok()
        })
    });
    assert!(up, "dnsmasq did not answer");
    guard
}

/// Runs `program` in network namespace `ns` and a private mount namespace whose /etc is an
/// empty tmpfs: like a phone, there is no /etc/resolv.conf (nor /etc/hosts).
fn without_etc(ns: &str, program: &Path, args: &[&str]) -> Output {
    without_etc_env(ns, program, &[], args)
}

fn without_etc_env(ns: &str, program: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args).env_remove("PREFIX");
    for (key, value) in env {
        cmd.env(key, value);
    }
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (unshare, mount, setns) on constant C strings and an fd the parent keeps open; it
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                c"/etc".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ))?;
            check(libc::setns(fd, libc::CLONE_NEWNET))
        });
    }
    let out = cmd.output().unwrap();
    drop(netns);
    out
}

fn static_client() -> PathBuf {
    let spa = workspace().join("target/x86_64-unknown-linux-musl/client/spa");
    assert!(
        spa.exists(),
        "build it: cargo build --profile client -p spa-client --target x86_64-unknown-linux-musl"
    );
    spa
}

pub fn names_resolve_without_resolv_conf_through_the_configured_resolver(backend: Backend) {
    let (lab, _echo) = lab_with_ssh(backend);
    let _dns = dnsmasq(&lab);
    let spa = static_client();
    let profile = lab.path("phone.toml");
    std::fs::write(
        &profile,
        format!(
            "server = \"gw.lab.test\"\nserver-public-key = \"{}\"\nprivate-key = \"keys/alice.key\"\nservices = [\"ssh\"]\nprobe-port = 22\n",
            lab.server_public_key()
        ),
    )
    .unwrap();
    let p = profile.to_str().unwrap();

    // No /etc/resolv.conf and no resolver: a clear error, nothing sent.
    let out = without_etc(&lab.a, &spa, &["knock", "-p", p]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no /etc/resolv.conf") && text(&out).contains("resolver = ["),
        "{}",
        text(&out)
    );
    // --resolver: resolved through dnsmasq, knocked, and confirmed.
    let out = without_etc(
        &lab.a,
        &spa,
        &["knock", "-p", p, "--resolver", GW4, "-4", "-v", "--wait=3s"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("gateway gw.lab.test is 203.0.113.1 (via DNS server 203.0.113.1:53)"),
        "{}",
        text(&out)
    );
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    // The same from the profile, over IPv6 (AAAA).
    let mut with_resolver = std::fs::read_to_string(&profile).unwrap();
    with_resolver.push_str("resolver = [\"203.0.113.1\"]\n");
    std::fs::write(&profile, with_resolver).unwrap();
    let out = without_etc(&lab.a, &spa, &["knock", "-p", p, "-6", "-v"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is 2001:db8:1::1"), "{}", text(&out));
    assert!(
        lab.wait_log("granted owner=alice address=2001:db8:1::10", 1),
        "{}",
        lab.log()
    );
    // Termux keeps its resolver in $PREFIX/etc/resolv.conf: the fallback after the system's.
    let prefix = lab.path("termux-prefix");
    std::fs::create_dir_all(prefix.join("etc")).unwrap();
    std::fs::write(
        prefix.join("etc/resolv.conf"),
        format!("nameserver {GW4}\n"),
    )
    .unwrap();
    let no_resolver = std::fs::read_to_string(&profile)
        .unwrap()
        .replace("resolver = [\"203.0.113.1\"]\n", "");
    std::fs::write(&profile, no_resolver).unwrap();
    let out = without_etc_env(
        &lab.a,
        &spa,
        &[("PREFIX", &prefix)],
        &["knock", "-p", p, "-4", "-v"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("(via DNS server 203.0.113.1:53)"),
        "{}",
        text(&out)
    );
}

fn qemu() -> &'static str {
    for name in ["qemu-aarch64-static", "qemu-aarch64"] {
        if Command::new(name).arg("--version").output().is_ok() {
            return name;
        }
    }
    panic!("qemu-aarch64 is missing: scripts/install-deps.sh installs qemu-user-static");
}

pub fn the_aarch64_static_client_runs_under_qemu_and_knocks(backend: Backend) {
    let spa = workspace().join("target/aarch64-unknown-linux-musl/client/spa");
    assert!(
        spa.exists(),
        "build it: cargo build --profile client -p spa-client --target aarch64-unknown-linux-musl"
    );
    let elf = std::fs::read(&spa).unwrap();
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183, "EM_AARCH64");
    let qemu = qemu();
    // genkey | pubkey under emulation agrees with the native client.
    let key = Command::new(qemu).arg(&spa).arg("genkey").output().unwrap();
    assert!(key.status.success(), "{}", text(&key));
    let pubkey = |program: &str, args: &[&Path]| {
        let mut child = Command::new(program)
            .args(args)
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &key.stdout).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let emulated = pubkey(qemu, &[&spa]);
    assert_eq!(emulated.trim().len(), 44, "{emulated}");
    assert_eq!(emulated, pubkey(binary("spa").to_str().unwrap(), &[]));

    let (lab, _echo) = lab_with_ssh(backend);
    let mut args: Vec<String> = vec![spa.display().to_string(), "knock".into()];
    args.extend(lab.knock_args("alice", false));
    args.extend(["-s", "ssh", "--wait=3s", "--probe-port", "22"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.try_exec(&lab.a, qemu, &refs);
    assert!(out.status.success(), "{}", text(&out));
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
}

/// The README's "First use" block, run line by line: gateway lines in the gateway namespace,
/// device lines in client `a`. Only what a reader substitutes is substituted: the URI and key
/// printed along the way, the host name, and `/etc/spad` (a lab directory; `sudo` dropped).
#[test]
fn first_use_follows_the_readme() {
    if !e2e_or_skip() {
        return;
    }
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let block = readme
        .split("### First use")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("README has a First use section with a sh block")
        .to_string();
    let lab = Lab::new("spad.toml");
    let _echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let etc = lab.path("etc-spad").display().to_string();
    let home = lab.path("home-readme");
    let path = format!(
        "PATH={}:{}",
        binary("spad").parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let home_env = format!("HOME={}", home.display());
    let shell = |ns: &str, line: &str| -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "env", "-u", "XDG_CONFIG_HOME"])
            .args([path.as_str(), home_env.as_str(), "sh", "-c", line])
            .current_dir(workspace());
        cmd
    };
    let (mut ns, mut uri, mut key, mut daemon) =
        (lab.gw.clone(), None::<String>, None::<String>, None);
    let mut knocked = false;
    for raw in block.lines() {
        let line = raw.trim();
        if line.starts_with("# on the gateway") {
            ns = lab.gw.clone();
        } else if line.starts_with("# on the device") {
            ns = lab.a.clone();
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut cmd = line
            .split(" #")
            .next()
            .unwrap()
            .trim()
            .replace("sudo ", "")
            .replace("/etc/spad", &etc)
            .replace("gw.example.net", GW4);
        if let Some(start) = cmd.find("'spa://") {
            let end = cmd[start + 1..].find('\'').unwrap() + start + 2;
            let printed = uri.take().expect("invite ran before enroll");
            cmd.replace_range(start..end, &format!("'{printed}'"));
        }
        if cmd.contains("--public-key KEY") {
            cmd = cmd.replace("KEY", &key.take().expect("enroll printed a key"));
        }
        if let Some(background) = cmd.strip_suffix('&') {
            // The daemon: in the background, its state kept in the lab.
            let run = format!(
                "exec {} --state-dir {}",
                background.trim(),
                lab.path("state").display()
            );
            let log = std::fs::File::create(lab.path("spad.log")).unwrap();
            let child = shell(&ns, &run)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            daemon = Some(Guard(child));
            assert!(lab.wait_log("listening port=", 1), "{}", lab.log());
            continue;
        }
        let out = shell(&ns, &cmd).output().unwrap();
        assert!(out.status.success(), "`{cmd}` failed:\n{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if cmd.contains("spad invite") {
            uri = stdout
                .lines()
                .find(|l| l.starts_with("spa://"))
                .map(String::from);
        }
        if cmd.contains("spa enroll") {
            key = stdout
                .split_whitespace()
                .skip_while(|w| *w != "--public-key")
                .nth(1)
                .map(String::from);
        }
        if cmd.contains("knock --wait") {
            assert!(text(&out).contains("answers"), "{}", text(&out));
            knocked = true;
        }
    }
    assert!(
        daemon.is_some() && knocked,
        "the README starts spad and knocks"
    );
    assert!(
        lab.wait_log("granted owner=alice-laptop", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);

    // A missing config or profile is reported as missing, with where to start.
    let out = Command::new(binary("spad"))
        .args(["check", "-c", lab.path("nope/spad.toml").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        text(&out).contains("spad.toml: missing: no such file; start from conf/spad.toml"),
        "{}",
        text(&out)
    );
    let out = spa_as(&lab, &lab.b, &lab.path("home-b"), &["-p", "work", "knock"]);
    assert!(
        text(&out).contains("no profile `work`") && text(&out).contains("spa enroll"),
        "{}",
        text(&out)
    );
}

both_backends!(
    onboarding_invite_enroll_add_then_knock_and_wait,
    dry_run_and_verbose_explain_and_dry_run_sends_nothing,
    names_resolve_without_resolv_conf_through_the_configured_resolver,
    the_aarch64_static_client_runs_under_qemu_and_knocks,
);
