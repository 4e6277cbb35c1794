//! End to end: knockd-style doors opened by the real `knock` client, `nc` and `nmap`;
//! TOTP doors opened by `spa` and checked against `oathtool`; each knockd fault fixed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use spa_e2e::*;

const T: Duration = Duration::from_millis(600);

fn lab(config: &str, backend: Backend) -> (Lab, Echo) {
    let mut lab = Lab::new(config);
    let echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    std::fs::write(lab.path("onetime.txt"), "7100,7200,7300\n").unwrap();
    lab.start_spad(config, backend);
    (lab, echo)
}

fn knock(lab: &Lab, ns: &str, ports: &[&str]) {
    let mut args = vec![GW4];
    args.extend_from_slice(ports);
    lab.exec(ns, "knock", &args);
}

/// Waits until `door` opened for `address` and its grant reached the firewall: the OPEN line
/// is logged just before the grant is installed, so a probe right after it could race it.
fn wait_granted(lab: &Lab, address: &str, door: &str, count: usize) -> bool {
    lab.wait_log(&format!("{address}: door {door}: OPEN"), count)
        && lab.wait_log(
            &format!("granted owner=door:{door} address={address} "),
            count,
        )
}

fn ssh(ns: &str) -> Connect {
    tcp_probe(ns, Lab::gw4(22), T)
}

pub fn knockd_client_opens_a_mixed_door_and_closes_it(backend: Backend) {
    let (lab, _e) = lab("demo.toml", backend);
    assert_eq!(ssh(&lab.a), Connect::TimedOut);
    knock(&lab, &lab.a, &["7000", "8000:udp", "9000"]);
    assert!(
        lab.wait_log("203.0.113.10: door ops: OPEN", 1),
        "{}",
        lab.log()
    );
    // The grant's line follows the OPEN line; wait for it rather than race the writer.
    lab.wait_log("granted owner=door:ops", 1);
    let log = lab.log();
    assert!(
        log.contains("door ops: stage 1/3") && log.contains("door ops: stage 2/3"),
        "{log}"
    );
    assert!(
        log.contains("granted owner=door:ops address=203.0.113.10 services=ssh(8s)"),
        "{log}"
    );
    assert_eq!(ssh(&lab.a), Connect::Open);
    assert_eq!(ssh(&lab.b), Connect::TimedOut);
    knock(&lab, &lab.a, &["9000", "8000:udp", "7000"]);
    assert!(
        lab.wait_log("closed owner=door:ops address=203.0.113.10", 1),
        "{}",
        lab.log()
    );
    assert_eq!(ssh(&lab.a), Connect::TimedOut);
}

pub fn nc_and_nmap_loops_open_a_door(backend: Backend) {
    let (lab, _e) = lab("knockd.toml", backend);
    // As the seeds do it: `for p in 7000 8000 9000; do nc -z -w1 host $p; done`.
    for port in ["7000", "8000", "9000"] {
        let _ = lab.try_exec(&lab.a, "nc", &["-z", "-w", "1", GW4, port]);
    }
    assert!(
        wait_granted(&lab, "203.0.113.10", "openssh", 1),
        "{}",
        lab.log()
    );
    assert_eq!(ssh(&lab.a), Connect::Open);
    // `for p in ...; do nmap -Pn --max-retries 0 -p $p host; done` from the other client.
    for port in ["7000", "8000", "9000"] {
        lab.exec(
            &lab.b,
            "nmap",
            &["-Pn", "-n", "-sS", "--max-retries", "0", "-p", port, GW4],
        );
    }
    assert!(
        wait_granted(&lab, "203.0.113.20", "openssh", 1),
        "{}",
        lab.log()
    );
    assert_eq!(ssh(&lab.b), Connect::Open);
    // The knockd-style start command ran without a shell, with %IP% replaced.
    assert!(wait_until(Duration::from_secs(5), || lab
        .path("door-opened-203.0.113.10")
        .exists()));
}

pub fn progress_is_per_source(backend: Backend) {
    let (lab, _e) = lab("knockd.toml", backend);
    knock(&lab, &lab.a, &["7000"]);
    assert!(lab.wait_log("203.0.113.10: door openssh: stage 1/3", 1));
    // B completes the door while A is mid-sequence (knockd could wipe A's progress here).
    knock(&lab, &lab.b, &["7000", "8000", "9000"]);
    assert!(
        lab.wait_log("203.0.113.20: door openssh: OPEN", 1),
        "{}",
        lab.log()
    );
    knock(&lab, &lab.a, &["8000", "9000"]);
    assert!(
        wait_granted(&lab, "203.0.113.10", "openssh", 1),
        "{}",
        lab.log()
    );
    assert_eq!(ssh(&lab.a), Connect::Open);
}

pub fn a_duplicated_knock_does_not_reset(backend: Backend) {
    let (lab, _e) = lab("knockd.toml", backend);
    knock(&lab, &lab.a, &["7000", "7000", "8000", "8000", "9000"]);
    assert!(
        lab.wait_log("203.0.113.10: door openssh: OPEN", 1),
        "{}",
        lab.log()
    );
    assert!(!lab.log().contains("reset"));
}

pub fn foreign_ports_and_the_spa_port_do_not_affect_progress(backend: Backend) {
    let (lab, _e) = lab("knockd.toml", backend);
    knock(
        &lab,
        &lab.a,
        &[
            "7000",
            "5555",
            "62201:udp",
            "12345:udp",
            "8000",
            "443",
            "9000",
        ],
    );
    assert!(
        lab.wait_log("203.0.113.10: door openssh: OPEN", 1),
        "{}",
        lab.log()
    );
}

pub fn exhausted_one_time_list_is_harmless(backend: Backend) {
    let (lab, _e) = lab("knockd.toml", backend);
    knock(&lab, &lab.a, &["7100", "7200", "7300"]);
    assert!(
        lab.wait_log("203.0.113.10: door emergency: OPEN", 1),
        "{}",
        lab.log()
    );
    assert_eq!(
        std::fs::read_to_string(lab.path("onetime.txt")).unwrap(),
        "7100,7200,7300\n",
        "the configured list stays read-only"
    );
    assert_eq!(
        std::fs::read_to_string(lab.path("state/one-time-used")).unwrap(),
        "emergency 7100/tcp,7200/tcp,7300/tcp\n",
        "the use is recorded in the state directory"
    );
    knock(&lab, &lab.b, &["7100", "7200", "7300"]);
    std::thread::sleep(Duration::from_millis(500)); // nothing to wait for: the door must stay shut
    assert!(
        !lab.log().contains("203.0.113.20: door emergency: OPEN"),
        "{}",
        lab.log()
    );
    // The daemon is alive and still serves other doors and SPA.
    knock(&lab, &lab.b, &["7000", "8000", "9000"]);
    assert!(
        lab.wait_log("203.0.113.20: door openssh: OPEN", 1),
        "{}",
        lab.log()
    );
}

pub fn an_ascending_sweep_does_not_open_and_gets_blacklisted(backend: Backend) {
    let (lab, _e) = lab("knockd.toml", backend);
    lab.exec(
        &lab.a,
        "nmap",
        &[
            "-Pn",
            "-n",
            "-sS",
            "-r",
            "--max-retries",
            "0",
            "-T4",
            "-p",
            "6990-9010",
            GW4,
        ],
    );
    assert!(
        lab.wait_log("203.0.113.10: blacklisted for 1m", 1),
        "{}",
        lab.log()
    );
    let log = lab.log();
    assert!(!log.contains("door openssh: OPEN"), "{log}");
    assert!(
        log.contains("reset (wrong port") || log.contains("decoy port"),
        "{log}"
    );
    assert_eq!(ssh(&lab.a), Connect::TimedOut);
    // Blacklisted: even the right sequence is ignored now; the kernel set records it.
    knock(&lab, &lab.a, &["7000", "8000", "9000"]);
    std::thread::sleep(Duration::from_millis(500)); // the door must stay shut
    assert!(!lab.log().contains("door openssh: OPEN"));
    let conf = lab.path("knockd.toml").display().to_string();
    let listed = lab.exec(
        &lab.gw,
        binary("spad").to_str().unwrap(),
        &["list", "-c", &conf],
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("(blacklisted)"));
    // Other sources are unaffected.
    knock(&lab, &lab.b, &["7000", "8000", "9000"]);
    assert!(
        lab.wait_log("203.0.113.20: door openssh: OPEN", 1),
        "{}",
        lab.log()
    );
}

pub fn totp_door_opens_once_per_step_and_matches_oathtool(backend: Backend) {
    let mut lab = Lab::new("demo.toml");
    let _vpn = Echo::tcp(&lab.gw, "[::]:443".parse().unwrap());
    // Enrollment: a wrong code is refused, the oathtool code enrolls.
    let conf = lab.path("demo.toml").display().to_string();
    let mut bad = std::process::Command::new(binary("spad"))
        .args(["totp", "enroll", "-c", &conf, "--door", "carol"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    bad.stdin.take().unwrap().write_all(b"000000\n").unwrap();
    let bad = bad.wait_with_output().unwrap();
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("stays disabled")
    );
    let good = lab.enroll("demo.toml", "carol");
    let shown = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        shown.contains("otpauth://totp/spad:carol?secret=") && shown.contains("█"),
        "{shown}"
    );
    lab.start_spad("demo.toml", backend);

    // spad's code equals oathtool's (retry once if a step boundary falls in between).
    let same = (0..2).any(|_| {
        let ours = String::from_utf8_lossy(
            &lab.spad(&["totp", "show", "-c", &conf, "--door", "carol"])
                .stdout,
        )
        .into_owned();
        ours.contains(&format!("code {} ", lab.oathtool(&[])))
    });
    assert!(same, "spad and oathtool disagree on the code");

    // Wait for a fresh step with at least 12 s left, so the replay below lands in the same step.
    assert!(wait_until(Duration::from_secs(30), || {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        secs % 30 < 18
    }));
    let key = lab.path("keys/carol.totp").display().to_string();
    let out = lab.spa_in(
        &lab.a,
        &[
            "totp-knock",
            "--server",
            GW4,
            "--first-port",
            "40001",
            "--secret-file",
            &key,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lab.wait_log("203.0.113.10: totp door carol: OPEN", 1)
            && lab.wait_log("granted owner=door:carol address=203.0.113.10 ", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(443), T), Connect::Open);

    // The same sequence (sniffed) replayed from B in the same step is refused.
    let code = lab.oathtool(&[]);
    let out = lab.spa_in(
        &lab.b,
        &[
            "totp-knock",
            "--server",
            GW4,
            "--first-port",
            "40001",
            "--code",
            &code,
        ],
    );
    assert!(out.status.success());
    assert!(
        lab.wait_log("203.0.113.20: totp door carol: refused", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(443), T), Connect::TimedOut);

    // A code from two steps ago does not open.
    let old = lab.oathtool(&["-N", "now - 60 seconds"]);
    let out = lab.spa_in(
        &lab.b,
        &[
            "totp-knock",
            "--server",
            GW4,
            "--first-port",
            "40001",
            "--code",
            &old,
        ],
    );
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(500)); // the door must stay shut
    assert!(
        !lab.log().contains("203.0.113.20: totp door carol: OPEN"),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(443), T), Connect::TimedOut);
}

/// A knockd user re-opens a door whose close sequence starts with the open sequence's last port
/// (the knockd convention): every open succeeds and none counts as a failure.
pub fn reopening_a_door_many_times_is_not_a_failure(backend: Backend) {
    let (lab, _e) = lab("knockd.toml", backend);
    for round in 1..=5 {
        knock(&lab, &lab.a, &["7000", "8000", "9000"]);
        assert!(
            lab.wait_log("203.0.113.10: door openssh: OPEN", round),
            "open {round}:\n{}",
            lab.log()
        );
    }
    let log = lab.log();
    assert!(!log.contains("blacklisted"), "{log}");
    assert!(!log.contains("reset"), "{log}");
    assert_eq!(ssh(&lab.a), Connect::Open);
}

/// A DrayTek-style user knocks with the code of the previous, the current and the next step
/// (a phone clock a little off): three valid knocks, three opens, no failure counted.
pub fn valid_totp_knocks_on_every_skew_step_are_not_failures(backend: Backend) {
    let mut lab = Lab::new("demo.toml");
    let _vpn = Echo::tcp(&lab.gw, "[::]:443".parse().unwrap());
    let good = lab.enroll("demo.toml", "carol");
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    lab.start_spad("demo.toml", backend);
    // A fresh step with at least 12 s left, so "now - 30 s" and "now + 30 s" name the
    // neighbouring steps for the whole test.
    assert!(wait_until(Duration::from_secs(30), || {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        secs % 30 < 18
    }));
    let key = lab.path("keys/carol.totp").display().to_string();
    let out = lab.spa_in(
        &lab.a,
        &[
            "totp-knock",
            "--server",
            GW4,
            "--first-port",
            "40001",
            "--secret-file",
            &key,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lab.wait_log("203.0.113.10: totp door carol: OPEN", 1),
        "{}",
        lab.log()
    );
    for (round, when) in [(2, "now - 30 seconds"), (3, "now + 30 seconds")] {
        let code = lab.oathtool(&["-N", when]);
        let out = lab.spa_in(
            &lab.a,
            &[
                "totp-knock",
                "--server",
                GW4,
                "--first-port",
                "40001",
                "--code",
                &code,
            ],
        );
        assert!(out.status.success());
        assert!(
            lab.wait_log("203.0.113.10: totp door carol: OPEN", round),
            "knock {round} ({when}):\n{}",
            lab.log()
        );
    }
    let log = lab.log();
    assert!(!log.contains("blacklisted"), "{log}");
    assert!(!log.contains("reset"), "{log}");
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(443), T), Connect::Open);
}

/// The operator's way to re-arm a used-up one-time door (docs/operations.md): append new
/// sequences to the list and reload. The capture must watch the new ports at once: the
/// capture's ports used to be compared with ones recomputed from the same (already
/// re-read) list, so no change was seen and the new sequence was filtered out in the kernel
/// until an unrelated port change or a restart.
pub fn a_re_armed_one_time_door_opens_after_a_reload(backend: Backend) {
    let (mut lab, _e) = lab("knockd.toml", backend);
    knock(&lab, &lab.a, &["7100", "7200", "7300"]);
    assert!(
        lab.wait_log("203.0.113.10: door emergency: OPEN", 1),
        "{}",
        lab.log()
    );
    std::fs::write(
        lab.path("onetime.txt"),
        "7100,7200,7300\n10100,10200,10300\n",
    )
    .unwrap();
    lab.reload_spad(0);
    assert!(lab.wait_log("reloaded; kept", 1), "{}", lab.log());
    knock(&lab, &lab.b, &["10100", "10200", "10300"]);
    assert!(
        lab.wait_log("203.0.113.20: door emergency: OPEN", 1),
        "{}",
        lab.log()
    );
}

both_backends!(
    a_re_armed_one_time_door_opens_after_a_reload,
    knockd_client_opens_a_mixed_door_and_closes_it,
    nc_and_nmap_loops_open_a_door,
    progress_is_per_source,
    a_duplicated_knock_does_not_reset,
    foreign_ports_and_the_spa_port_do_not_affect_progress,
    exhausted_one_time_list_is_harmless,
    an_ascending_sweep_does_not_open_and_gets_blacklisted,
    totp_door_opens_once_per_step_and_matches_oathtool,
    reopening_a_door_many_times_is_not_a_failure,
    valid_totp_knocks_on_every_skew_step_are_not_failures,
);
