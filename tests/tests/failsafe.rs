//! Fail safe, on both backends: flushing and tampering never open a protected port, one
//! daemon per state directory, reloads never extend a grant, the list shows what the kernel
//! enforces, sessions that predate spad survive its start, a full disk never opens anything
//! (and grants resume when space returns), and `conceal` makes protected,
//! knock and watched ports answer alike (checked with nmap).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use spa_e2e::*;

const CONF: &str = "demo.toml";
const T: Duration = Duration::from_millis(600);
const A4: &str = "203.0.113.10";

/// Whether `address` is in `set` (`a4_ssh` style) of the gateway's kernel, without traffic.
fn member(lab: &Lab, backend: Backend, set: &str, address: &str) -> bool {
    let out = match backend {
        Backend::Nftables => lab.try_exec(&lab.gw, "nft", &["list", "set", "inet", "spad", set]),
        Backend::Iptables => {
            let name = format!("spad-{}", set.replacen('_', "-", 1));
            lab.try_exec(&lab.gw, "ipset", &["list", &name])
        }
    };
    String::from_utf8_lossy(&out.stdout).contains(&format!("{address} "))
        || String::from_utf8_lossy(&out.stdout).contains(&format!("{address}\n"))
}

fn edit_config(lab: &Lab, server_lines: &str) {
    let path = lab.path(CONF);
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("[server]\n", &format!("[server]\n{server_lines}"), 1);
    std::fs::write(&path, text).unwrap();
}

/// Tampers with the protection like a careless admin or a script would.
fn tamper(lab: &Lab, backend: Backend, step: usize) {
    let (program, args): (&str, &[&str]) = match (backend, step) {
        (Backend::Nftables, 0) => ("nft", &["flush", "chain", "inet", "spad", "input"]),
        (Backend::Nftables, _) => ("nft", &["delete", "table", "inet", "spad"]),
        (Backend::Iptables, 0) => ("iptables", &["-F", "SPAD-INPUT"]),
        (Backend::Iptables, _) => ("iptables", &["-D", "INPUT", "-j", "SPAD-INPUT"]),
    };
    lab.exec(&lab.gw, program, args);
}

pub fn flush_and_tampering_never_open_protected_ports(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let daemon = lab.start_spad(CONF, backend);
    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);

    // `spad flush` closes the grants and leaves the port protected.
    let out = lab.spad_gw(&["flush"], CONF);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw6(22), T), Connect::TimedOut);

    // Someone damages the protection while spad runs: it is put back and logged.
    for step in 0..2 {
        lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
        assert!(lab.wait_log("granted owner=alice", 2 + step));
        let started = Instant::now();
        tamper(&lab, backend, step);
        assert!(
            lab.wait_log("protection reinstalled", 1 + step),
            "{}",
            lab.log()
        );
        eprintln!(
            "{} step {step}: reinstalled {:?} after the damage",
            backend.name(),
            started.elapsed()
        );
        assert!(lab.log().contains("outside spad; reinstalling it"));
        assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);
        assert_eq!(tcp_probe(&lab.b, Lab::gw6(22), T), Connect::TimedOut);
        // The grant is kept, even when the whole nftables table was deleted.
        assert_eq!(
            tcp_probe(&lab.a, Lab::gw4(22), T),
            Connect::Open,
            "grant lost at step {step}"
        );
    }

    // A grant revoked by another process stays revoked through a repair.
    let out = lab.spad_gw(&["revoke", "--address", A4], CONF);
    assert!(out.status.success(), "{out:?}");
    tamper(&lab, backend, 1);
    assert!(lab.wait_log("protection reinstalled", 3), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);

    // Uninstall is refused while the daemon runs, naming it.
    let out = lab.spad_gw(&["uninstall"], CONF);
    assert!(!out.status.success());
    let pid = lab.spad_pid(daemon).to_string();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("pid {pid}")),
        "{out:?}"
    );

    // flush-on-exit closes grants, never the protection.
    lab.stop_spad(daemon, false);
    edit_config(&lab, "flush-on-exit = true\n");
    let daemon = lab.start_spad(CONF, backend);
    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=alice", 4));
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    lab.stop_spad(daemon, false);
    assert!(
        lab.log()
            .contains("flush-on-exit: all grants closed; the protection stays"),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);

    // Only the explicit, loud uninstall removes it.
    let out = lab.spad_gw(&["uninstall"], CONF);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARNING: removed spad's protection"));
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::Open);
}

pub fn a_second_daemon_refuses_and_names_the_first(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let first = lab.start_spad(CONF, backend);
    // Bounded: without the lock a second daemon would run until killed.
    let conf = lab.path(CONF);
    let spad = binary("spad");
    let out = lab.try_exec(
        &lab.gw,
        "timeout",
        &[
            "10",
            spad.to_str().unwrap(),
            "run",
            "-c",
            conf.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "second daemon started: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("another spad (pid {})", lab.spad_pid(first))),
        "{err}"
    );
    // Nor on the same table with another state directory.
    let other = lab.path("other-state");
    let out = lab.try_exec(
        &lab.gw,
        "timeout",
        &[
            "10",
            spad.to_str().unwrap(),
            "run",
            "-c",
            conf.to_str().unwrap(),
            "--state-dir",
            other.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "second daemon started: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("another spad (pid {})", lab.spad_pid(first)))
            && err.contains("firewall table spad"),
        "{err}"
    );
    // The first one is unharmed and still grants.
    lab.knock(&lab.a, "alice", &["ssh"], &[], false);
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    // Once it is gone (even by kill -9), a new one starts.
    lab.stop_spad(first, true);
    lab.start_spad(CONF, backend);
}

pub fn a_reload_storm_never_extends_a_grant(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let daemon = lab.start_spad(CONF, backend);
    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "3s"], false);
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    let granted = Instant::now();
    assert!(member(&lab, backend, "a4_ssh", A4));
    // SIGHUP every 10 ms; the grant must still end within its 3 s + 1 s.
    let mut ended = None;
    let mut reloads = 0;
    while granted.elapsed() < Duration::from_secs(8) {
        for _ in 0..5 {
            lab.reload_spad(daemon);
            reloads += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        if !member(&lab, backend, "a4_ssh", A4) {
            ended = Some(granted.elapsed());
            break;
        }
    }
    let ended = ended.expect("the grant outlived 8 s of reloads");
    eprintln!(
        "{}: 3 s grant ended after {ended:?} under {reloads} SIGHUPs",
        backend.name()
    );
    assert!(ended <= Duration::from_secs(4), "ended after {ended:?}");
    let reloaded = lab.log().matches("reloaded; kept").count();
    eprintln!("{}: {reloaded} reloads completed", backend.name());
    assert!(reloaded >= 3, "reloads ran: {reloaded}");
    assert!(!lab.log().contains("reload failed"), "{}", lab.log());
    assert!(
        !lab.log().contains("outside spad"),
        "the guard mistook spad's own reloads for tampering:\n{}",
        lab.log()
    );
}

pub fn an_idle_lapsed_grant_is_neither_listed_nor_kept(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let daemon = lab.start_spad(CONF, backend);
    lab.knock(&lab.a, "alice", &["vpn"], &[], false);
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    let list = String::from_utf8_lossy(&lab.spad_gw(&["list"], CONF).stdout).into_owned();
    assert!(list.contains(A4) && list.contains("vpn"), "{list}");
    // No traffic: the idle timer (4 s) lapses although the grant has an hour left.
    assert!(wait_until(Duration::from_secs(10), || !member(
        &lab, backend, "i4_vpn", A4
    )));
    let list = String::from_utf8_lossy(&lab.spad_gw(&["list"], CONF).stdout).into_owned();
    assert!(!list.contains(A4), "listed after the idle timeout:\n{list}");
    lab.reload_spad(daemon);
    assert!(
        lab.wait_log("reloaded; kept 0 live grants", 1),
        "{}",
        lab.log()
    );
    lab.stop_spad(daemon, false);
    lab.start_spad(CONF, backend);
    assert!(
        lab.log().contains("kept 0 live grants\n"),
        "restart counted a lapsed grant:\n{}",
        lab.log()
    );
    assert!(!udp_probe(&lab.a, Lab::gw4(51820), T));
    assert!(!lab.log().contains("outside spad"), "{}", lab.log());
}

pub fn sessions_opened_before_the_first_start_survive(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    // A fresh namespace: no connection tracking yet, as on a host before spad's first start.
    let mut v4 = Held::open(&lab.a, Lab::gw4(22)).unwrap();
    let mut v6 = Held::open(&lab.b, Lab::gw6(22)).unwrap();
    assert!(v4.echo() && v6.echo());
    let daemon = lab.start_spad(CONF, backend);
    assert!(v4.echo(), "IPv4 session cut by the first start");
    assert!(v6.echo(), "IPv6 session cut by the first start");
    // The port itself stays hidden, even from the session's own host.
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw6(22), T), Connect::TimedOut);
    lab.reload_spad(daemon);
    assert!(lab.wait_log("reloaded; kept", 1));
    assert!(v4.echo() && v6.echo(), "cut by a reload");
    lab.stop_spad(daemon, false);
    let daemon = lab.start_spad(CONF, backend);
    assert!(v4.echo() && v6.echo(), "cut by a restart");
    // And by a repair after someone deleted the protection.
    tamper(&lab, backend, 1);
    assert!(lab.wait_log("protection reinstalled", 1), "{}", lab.log());
    assert!(v4.echo() && v6.echo(), "cut by a repair");
    lab.stop_spad(daemon, false);
}

/// A small tmpfs mounted over a directory for one test; unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&dir).unwrap();
        let options = format!("size={size},mode=0700");
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &options,
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        SmallDisk(dir)
    }

    /// Writes a file until the disk refuses more; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = [0x55u8; 4096];
        // Bounded: the disk is a few MiB, so it is full long before 4 GiB.
        for _ in 0..(1 << 20) {
            if file
                .write_all(&chunk)
                .and_then(|()| file.sync_all())
                .is_err()
            {
                return path;
            }
        }
        panic!("{} never filled up", self.0.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", self.0.to_str().unwrap()])
            .status();
    }
}

/// A full disk: grants go on (the journal's last block or its preallocated room takes the
/// record); once the journal cannot be written (a restart on the full disk must rewrite it)
/// every SPA packet is refused with `persist` and nothing opens; when some space comes back,
/// even less than the journal's usual room, grants resume without a restart.
pub fn a_full_disk_never_opens_and_grants_resume_when_space_returns(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let disk = SmallDisk::mount(lab.path("state"), "3m");
    let daemon = lab.start_spad(CONF, backend);
    let filler = disk.fill();

    // The disk is full; the journal still has room for this packet's record.
    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);

    // A restart must rewrite the journal, which a full disk refuses: fail closed.
    lab.stop_spad(daemon, false);
    let daemon = lab.start_spad(CONF, backend);
    assert!(
        lab.wait_log("SPA grants are refused until it can be written", 1),
        "{}",
        lab.log()
    );
    lab.knock(&lab.b, "alice", &["ssh"], &["--duration", "1h"], false);
    assert!(
        lab.wait_log("reason=\"cannot persist the replay record\"", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);
    assert!(!member(&lab, backend, "a4_ssh", "203.0.113.20"));
    assert_eq!(
        lab.log().matches("granted owner=alice").count(),
        1,
        "{}",
        lab.log()
    );
    // The grant made before the restart is still in force.
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);

    // A little space returns, less than the journal's usual room: the journal is rewritten
    // without room and the next packet is granted.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len.saturating_sub(256 << 10)).unwrap();
    drop(file);
    lab.knock(&lab.b, "alice", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=alice", 2), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::Open);
    lab.stop_spad(daemon, false);
    drop(disk);
}

fn nmap(lab: &Lab, args: &[&str]) -> String {
    let out = lab.try_exec(&lab.b, "nmap", args);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The state nmap reports for `port` (`22/tcp`).
fn state<'a>(scan: &'a str, port: &str) -> Option<&'a str> {
    scan.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(port)).then(|| words.next()).flatten()
    })
}

pub fn conceal_closed_makes_every_port_look_closed(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let _wg = Echo::udp(&lab.gw, "[::]:51820".parse().unwrap());
    edit_config(&lab, "conceal = \"closed\"\n");
    lab.start_spad(CONF, backend);
    // Every TCP port of the gateway, protected, knock, decoy and in-between ones included.
    let tcp = nmap(
        &lab,
        &["-n", "-Pn", "-sS", "-p-", "-T5", "--max-retries", "1", GW4],
    );
    assert!(
        tcp.contains("Not shown: 65535 closed tcp ports (reset)") && !tcp.contains("filtered"),
        "{tcp}"
    );
    let tcp6 = nmap(
        &lab,
        &["-6", "-n", "-Pn", "-sS", "-p", "1-10000", "-T5", GW6],
    );
    assert!(tcp6.contains("10000 closed tcp ports (reset)"), "{tcp6}");
    // UDP: the SPA port, a knock port, a VPN port (listening) and an unused one, alike.
    let udp = nmap(
        &lab,
        &["-n", "-Pn", "-sU", "-p", "62201,8000,51820,12345", GW4],
    );
    for port in ["62201", "8000", "51820", "12345"] {
        assert_eq!(state(&udp, &format!("{port}/udp")), Some("closed"), "{udp}");
    }
    // A granted client still gets through.
    lab.knock(&lab.a, "alice", &["ssh"], &[], false);
    assert!(lab.wait_log("granted owner=alice", 1));
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
}

pub fn conceal_drop_hides_every_watched_port_alike(backend: Backend) {
    let mut lab = Lab::new(CONF);
    lab.start_spad(CONF, backend);
    // Door `ops` knocks 7000/tcp, 8000/udp, 9000/tcp: 7000-9000/tcp is watched.
    let scan = nmap(
        &lab,
        &[
            "-n",
            "-Pn",
            "-sS",
            "-p",
            "6998,7000,7500,8500,9000,9002",
            "--max-retries",
            "1",
            GW4,
        ],
    );
    for port in ["7000", "7500", "8500", "9000"] {
        assert_eq!(
            state(&scan, &format!("{port}/tcp")),
            Some("filtered"),
            "{scan}"
        );
    }
    for port in ["6998", "9002"] {
        assert_eq!(
            state(&scan, &format!("{port}/tcp")),
            Some("closed"),
            "{scan}"
        );
    }
}

/// Someone deletes spad's table between spad's install and the moment its guard takes the
/// installed protection as the reference (a boot script's `nft flush ruleset` racing spad's
/// start). The guard must not take the damage as the norm: it repairs, and the port stays
/// filtered. The test hook (debug builds only) holds that moment open for 1.5 s. nftables
/// only: iptables announces no changes, and is compared every 0.7 s against what it read.
#[test]
fn a_table_deleted_while_spad_starts_is_put_back() {
    if !spa_e2e::e2e_or_skip() {
        return;
    }
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let daemon = lab.start_spad_with_env(
        CONF,
        Backend::Nftables,
        &[("SPAD_TEST_HOLD_BEFORE_GUARD_MS", "1500")],
    );
    assert!(lab.wait_log("test hook: holding", 1), "{}", lab.log());
    tamper(&lab, Backend::Nftables, 1);
    // While the table is gone, nothing filters: the guard must notice once it runs.
    assert!(
        lab.wait_log("protection reinstalled", 1),
        "the deletion was taken as the norm:\n{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw6(22), T), Connect::TimedOut);
    // Its own start is not a tamper: a restart without interference repairs nothing.
    lab.stop_spad(daemon, false);
    let repairs = lab.log().matches("protection reinstalled").count();
    let daemon = lab.start_spad_with_env(
        CONF,
        Backend::Nftables,
        &[("SPAD_TEST_HOLD_BEFORE_GUARD_MS", "300")],
    );
    assert!(lab.wait_log("test hook: holding", 2), "{}", lab.log());
    lab.knock(&lab.a, "alice", &["ssh"], &[], false);
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    assert_eq!(
        lab.log().matches("protection reinstalled").count(),
        repairs,
        "{}",
        lab.log()
    );
    lab.stop_spad(daemon, false);
}

/// The table deleted again and again while spad puts it back: each deletion may land
/// between a repair and the guard's reading of it. The guard never takes a missing table as
/// the norm: it ends up in place and the port filtered. nftables only, as above.
#[test]
fn a_table_deleted_over_and_over_ends_up_back() {
    if !spa_e2e::e2e_or_skip() {
        return;
    }
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let daemon = lab.start_spad(CONF, Backend::Nftables);
    let table_there = || {
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &lab.gw, "nft", "list", "table", "inet", "spad",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for round in 0..5 {
        // Bounded: each round deletes at most 20 times, as fast as `nft` runs.
        for _ in 0..20 {
            let _ = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &lab.gw, "nft", "delete", "table", "inet", "spad",
                ])
                .output();
        }
        assert!(
            wait_until(Duration::from_secs(10), table_there),
            "round {round}: the table stayed deleted:\n{}",
            lab.log()
        );
    }
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw6(22), T), Connect::TimedOut);
    lab.stop_spad(daemon, false);
}

both_backends!(
    flush_and_tampering_never_open_protected_ports,
    a_second_daemon_refuses_and_names_the_first,
    a_reload_storm_never_extends_a_grant,
    an_idle_lapsed_grant_is_neither_listed_nor_kept,
    sessions_opened_before_the_first_start_survive,
    a_full_disk_never_opens_and_grants_resume_when_space_returns,
    conceal_closed_makes_every_port_look_closed,
    conceal_drop_hides_every_watched_port_alike,
);
