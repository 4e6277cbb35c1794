//! The kernel's per-source packet budget through reloads, end to end, with spad run as the
//! unit runs it (privileges dropped, CAP_BPF with them): a reload that needs a new capture
//! (here: the LAN interface `eth1` added to `interfaces`) attaches the program loaded at
//! start to its new sockets, so the budget stays loaded (status, metrics) and still cuts a
//! flood once spad falls behind; and a reload that fails after its new capture was opened, or
//! after it wrote new ports in place, leaves the running capture's ports in the program.
//! Every test runs on nftables and on iptables + ipset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use spa_e2e::*;

const CONF: &str = "demo.toml";
const T: Duration = Duration::from_millis(700);
const METRICS: u16 = 9712;
const BUDGET_REFUSED: &str = "warning: packet-rate is not enforced in the kernel (";

fn limited(lab: &Lab) -> u64 {
    status_counter(&lab.status_json(CONF), "capture_kernel_source_limited")
}

/// Started as root and dropped to `nobody` (no CAP_BPF left), spad reloads with the LAN
/// interface added: a new capture. It attaches the program loaded at start, so no warning,
/// the status still says `released` and the metrics `spad_capture_kernel_budget_loaded 1`
/// (before the program was shared, this capture fell back to the classic filter: `off`, 0);
/// once spad falls behind the budget engages and a flood is cut in the kernel; knocks are
/// still granted.
pub fn a_reload_with_new_interfaces_keeps_the_kernel_budget_after_the_privilege_drop(
    backend: Backend,
) {
    let mut lab = Lab::new(CONF);
    let _echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    lab.server_option(CONF, &format!("metrics = \"127.0.0.1:{METRICS}\""));
    let daemon = lab.start_spad_as_nobody(CONF, backend);
    assert_eq!(lab.kernel_budget(CONF), "released", "{}", lab.log());
    assert!(http_get(&lab.gw, METRICS, "/metrics")
        .1
        .contains("spad_capture_kernel_budget_loaded 1\n"));

    lab.edit_config(
        CONF,
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\", \"eth1\"]",
    );
    lab.reload_spad(daemon);
    assert!(lab.wait_log("reloaded; kept", 1), "{}", lab.log());
    let log = lab.log();
    assert!(!log.contains(BUDGET_REFUSED), "{log}");
    assert!(!log.contains("reload failed"), "{log}");
    assert_eq!(lab.kernel_budget(CONF), "released", "{}", lab.log());
    let body = http_get(&lab.gw, METRICS, "/metrics").1;
    assert!(
        body.contains("spad_capture_kernel_budget_loaded 1\n"),
        "{body}"
    );

    // The budget engages once spad falls behind, and the kernel cuts a flood.
    let b = lab.b.clone();
    assert!(
        lab.flood_while_behind(
            daemon,
            CONF,
            (&b, &b),
            || limited(&lab),
            |before| limited(&lab) > *before
        )
        .is_some(),
        "nothing cut in the kernel: {}\n{}",
        lab.status_json(CONF),
        lab.log()
    );

    // The new capture serves knocks.
    lab.knock(&lab.a, "alice", &["ssh"], &[], false);
    assert!(
        lab.wait_log("granted owner=alice address=203.0.113.10 ", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    lab.stop_spad(daemon, false);
    let log = lab.log();
    assert!(!log.contains("error:"), "{log}");
}

/// A reload that opens a new capture (the LAN interface added) and moves door `ops` from
/// ports 7000-9000 to 41000-41002 (so 7000 and 9000/tcp are no longer watched), then fails:
/// the firewall tools refuse the new ruleset (`nft` and `ipset` stand-ins that fail while a
/// marker file exists). The new capture had written its ports into the program it shares
/// with the running capture; the failed reload writes the running capture's back, so door
/// `ops` still opens at its old ports (without that, the kernel would drop the knocks at 7000
/// and 9000), and the budget is still loaded.
pub fn a_reload_that_fails_after_opening_a_new_capture_keeps_the_running_prefilter(
    backend: Backend,
) {
    a_failed_reload_keeps_the_running_ports(backend, true, false);
}

/// The same without a new capture: the moved door's ports are written in place into the
/// running capture's program, and the failed reload writes the old ones back.
pub fn a_reload_that_fails_after_moving_ports_in_place_keeps_the_running_prefilter(
    backend: Backend,
) {
    a_failed_reload_keeps_the_running_ports(backend, false, false);
}

/// While a reload is pending (held here inside the refusing firewall tool), the prefilter
/// passes both configs' ports: a knock on the running config's door sent meanwhile waits in
/// the running capture's ring and opens the door once the reload has failed. Were only the
/// new config's ports passed, the kernel would drop those knocks. With a new capture, and
/// in place.
pub fn a_knock_sent_while_a_reload_fails_opens_the_running_door(backend: Backend) {
    a_failed_reload_keeps_the_running_ports(backend, true, true);
    a_failed_reload_keeps_the_running_ports(backend, false, true);
}

fn a_failed_reload_keeps_the_running_ports(
    backend: Backend,
    new_capture: bool,
    knock_while_pending: bool,
) {
    let mut lab = Lab::new(CONF);
    let _echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let refuse = lab.path("refuse-firewall-tools");
    // With `hold`, the first refusing call says so (`holding`) and waits for `go` (at most
    // 10 s): the reload is pending meanwhile.
    let (hold, holding, go) = (lab.path("hold"), lab.path("holding"), lab.path("go"));
    let bin = lab.path("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["nft", "ipset"] {
        let real = run("sh", &["-c", &format!("command -v {tool}")]);
        let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
        let script = bin.join(tool);
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ -e '{refuse}' ]; then cat >/dev/null\n  if [ -e '{hold}' ]; then rm -f '{hold}'; touch '{holding}'; i=0\n    while [ ! -e '{go}' ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n  fi\n  echo \"{tool}: refused by the test\" >&2; exit 1; fi\nexec '{real}' \"$@\"\n",
                refuse = refuse.display(),
                hold = hold.display(),
                holding = holding.display(),
                go = go.display(),
            ),
        )
        .unwrap();
        run("chmod", &["0755", script.to_str().unwrap()]);
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let daemon = lab.start_spad_with_env(CONF, backend, &[("PATH", &path)]);
    assert_eq!(lab.kernel_budget(CONF), "released", "{}", lab.log());

    if new_capture {
        lab.edit_config(
            CONF,
            "interfaces = [\"eth0\"]",
            "interfaces = [\"eth0\", \"eth1\"]",
        );
    }
    lab.edit_config(
        CONF,
        "sequence = [\"7000/tcp\", \"8000/udp\", \"9000/tcp\"]",
        "sequence = [\"41000/tcp\", \"41001/udp\", \"41002/tcp\"]",
    );
    lab.edit_config(
        CONF,
        "close-sequence = [\"9000/tcp\", \"8000/udp\", \"7000/tcp\"]",
        "close-sequence = [\"41002/tcp\", \"41001/udp\", \"41000/tcp\"]",
    );
    std::fs::write(&refuse, "").unwrap();
    if knock_while_pending {
        std::fs::write(&hold, "").unwrap();
    }
    lab.reload_spad(daemon);
    if knock_while_pending {
        assert!(
            wait_until(Duration::from_secs(10), || holding.exists()),
            "the reload never reached the firewall: {}",
            lab.log()
        );
        // The running config's door, at its running ports, while the reload is pending.
        lab.exec(&lab.a, "knock", &[GW4, "7000", "8000:udp", "9000"]);
        std::fs::write(&go, "").unwrap();
    }
    assert!(
        lab.wait_log("reload failed, keeping the running config", 1),
        "{}",
        lab.log()
    );
    std::fs::remove_file(&refuse).unwrap();
    assert!(!lab.log().contains(BUDGET_REFUSED), "{}", lab.log());
    assert_eq!(lab.kernel_budget(CONF), "released", "{}", lab.log());

    // The running config's door, at its running ports.
    if !knock_while_pending {
        lab.exec(&lab.a, "knock", &[GW4, "7000", "8000:udp", "9000"]);
    }
    assert!(
        lab.wait_log("203.0.113.10: door ops: OPEN", 1)
            && lab.wait_log("granted owner=door:ops address=203.0.113.10 ", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    lab.stop_spad(daemon, false);
}

both_backends!(
    a_reload_with_new_interfaces_keeps_the_kernel_budget_after_the_privilege_drop,
    a_reload_that_fails_after_opening_a_new_capture_keeps_the_running_prefilter,
    a_reload_that_fails_after_moving_ports_in_place_keeps_the_running_prefilter,
    a_knock_sent_while_a_reload_fails_opens_the_running_door,
);
