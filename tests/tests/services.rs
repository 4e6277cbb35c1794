//! End to end, on both backends: management, VPN and NAT services; idle timeouts kept
//! alive by traffic in the kernel; allow lists; close, revoke, reload and flush-on-exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use spa_e2e::*;

const CONF: &str = "demo.toml";
const T: Duration = Duration::from_millis(600);

fn lan(port: u16, v6: bool) -> SocketAddr {
    SocketAddr::new(if v6 { LAN6 } else { LAN4 }.parse().unwrap(), port)
}

/// Whether client A is in the VPN service's idle set, read from the kernel without traffic.
fn idle_member(lab: &Lab, backend: Backend) -> bool {
    let out = match backend {
        Backend::Nftables => {
            lab.try_exec(&lab.gw, "nft", &["list", "set", "inet", "spad", "i4_vpn"])
        }
        Backend::Iptables => lab.try_exec(&lab.gw, "ipset", &["list", "spad-i4-vpn"]),
    };
    String::from_utf8_lossy(&out.stdout).contains("203.0.113.10")
}

pub fn vpn_one_grant_opens_every_protocol_and_idles_out(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _wg = Echo::udp(&lab.gw, "[::]:51820".parse().unwrap());
    let _ike = Echo::udp(&lab.gw, "[::]:4500".parse().unwrap());
    let _ssl = Echo::tcp(&lab.gw, "[::]:443".parse().unwrap());
    lab.start_spad(CONF, backend);
    assert!(!udp_probe(&lab.a, Lab::gw4(51820), T));
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(443), T), Connect::TimedOut);

    lab.knock(&lab.a, "alice", &["vpn"], &[], false);
    assert!(
        lab.wait_log(
            "granted owner=alice address=203.0.113.10 services=vpn(1h, idle 4s)",
            1
        ),
        "{}",
        lab.log()
    );
    assert!(udp_probe(&lab.a, Lab::gw4(51820), T), "WireGuard port open");
    assert!(
        udp_probe(&lab.a, Lab::gw4(4500), T),
        "IPsec NAT-T port open"
    );
    assert_eq!(
        tcp_probe(&lab.a, Lab::gw4(443), T),
        Connect::Open,
        "SSL VPN port open"
    );
    assert!(!udp_probe(&lab.b, Lab::gw4(51820), T), "not for B");

    // Traffic on one flow for twice the idle timeout keeps the grant alive (kernel refresh).
    let gw = Lab::gw4(51820);
    let kept_alive = in_ns(&lab.a, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let start = Instant::now();
        let mut answered = 0;
        while start.elapsed() < Duration::from_secs(8) {
            s.send_to(b"ping", gw).unwrap();
            let mut buf = [0u8; 8];
            if s.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        answered
    });
    assert!(kept_alive >= 12, "only {kept_alive} answers while active");
    assert!(
        udp_probe(&lab.a, gw, T),
        "a new flow still opens after 8s of activity (idle 4s)"
    );
    // Silence past the idle timeout locks it, although the absolute timeout is an hour. Any
    // probe would be traffic that re-arms the timer, so watch the kernel's idle set instead.
    assert!(
        idle_member(&lab, backend),
        "idle set holds the client while active"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !idle_member(&lab, backend)),
        "idle entry did not expire"
    );
    assert!(!udp_probe(&lab.a, gw, T), "locked after the idle timeout");
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(443), T), Connect::TimedOut);
}

pub fn nat_forward_only_for_the_knocker_and_the_dnat_goes_with_the_grant(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _rdp = Echo::tcp(&lab.lan, "[::]:3389".parse().unwrap());
    lab.start_spad(CONF, backend);
    for v6 in [false, true] {
        let public = if v6 { Lab::gw6(3389) } else { Lab::gw4(3389) };
        assert_eq!(tcp_probe(&lab.a, public, T), Connect::TimedOut, "v6={v6}");
        assert_eq!(
            tcp_probe(&lab.a, lan(3389, v6), T),
            Connect::TimedOut,
            "internal server not reachable directly"
        );
        lab.knock(&lab.a, "alice", &["rdp"], &["--duration", "3s"], v6);
        let who = if v6 { "2001:db8:1::10" } else { "203.0.113.10" };
        assert!(
            lab.wait_log(
                &format!("granted owner=alice address={who} services=rdp(3s)"),
                1
            ),
            "{}",
            lab.log()
        );
        assert_eq!(
            tcp_probe(&lab.a, public, T),
            Connect::Open,
            "forwarded for the knocker, v6={v6}"
        );
        assert_eq!(
            tcp_probe(&lab.b, public, T),
            Connect::TimedOut,
            "not for others"
        );
        assert_eq!(
            tcp_probe(&lab.a, lan(3389, v6), T),
            Connect::TimedOut,
            "only through the DNAT"
        );
        let mut held = Held::open(&lab.a, public).unwrap();
        assert!(
            wait_until(Duration::from_secs(8), || tcp_probe(
                &lab.a,
                public,
                Duration::from_millis(300)
            ) == Connect::TimedOut),
            "forward did not expire"
        );
        assert!(
            held.echo(),
            "established forwarded connection survives expiry\n{}",
            lab.snapshot()
        );
        let listed = lab.exec(
            &lab.gw,
            binary("spad").to_str().unwrap(),
            &["list", "-c", lab.path(CONF).to_str().unwrap()],
        );
        assert!(
            !String::from_utf8_lossy(&listed.stdout).contains(who),
            "the DNAT grant is gone"
        );
    }
}

pub fn allow_list_bypasses_knocking(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _admin = Echo::tcp(&lab.gw, "[::]:8443".parse().unwrap());
    lab.start_spad(CONF, backend);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(8443), T), Connect::TimedOut);
    // Move client B to the allow-listed address.
    lab.ip(&lab.b, &["addr", "del", "203.0.113.20/24", "dev", "eth0"]);
    lab.ip(&lab.b, &["addr", "add", "203.0.113.200/24", "dev", "eth0"]);
    lab.ip(&lab.b, &["route", "replace", "default", "via", GW4]);
    assert_eq!(
        tcp_probe(&lab.b, Lab::gw4(8443), T),
        Connect::Open,
        "allow-listed without a knock"
    );
    assert_eq!(
        tcp_probe(&lab.a, Lab::gw4(8443), T),
        Connect::TimedOut,
        "others still filtered"
    );
    assert_eq!(
        tcp_probe(&lab.b, Lab::gw4(22), T),
        Connect::TimedOut,
        "the allow list is per service"
    );
}

pub fn close_and_revoke_take_effect_at_once(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    lab.start_spad(CONF, backend);
    let conf = lab.path(CONF).display().to_string();
    let spad = binary("spad").display().to_string();

    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=alice", 1));
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    let mut held = Held::open(&lab.a, Lab::gw4(22)).unwrap();
    let mut args: Vec<String> = vec!["close".into()];
    args.extend(lab.knock_args("alice", false));
    args.extend(["-s".into(), "ssh".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(lab.spa_in(&lab.a, &refs).status.success());
    assert!(
        lab.wait_log("closed owner=alice address=203.0.113.10 services=ssh", 1),
        "{}",
        lab.log()
    );
    assert_eq!(
        tcp_probe(&lab.a, Lab::gw4(22), T),
        Connect::TimedOut,
        "closed by the client"
    );
    assert!(
        held.echo(),
        "established connection survives a close\n{}",
        lab.snapshot()
    );

    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=alice", 2));
    let listed = lab.exec(&lab.gw, &spad, &["list", "-c", &conf]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("owner=alice"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    lab.exec(
        &lab.gw,
        &spad,
        &["revoke", "-c", &conf, "--address", "203.0.113.10"],
    );
    assert_eq!(
        tcp_probe(&lab.a, Lab::gw4(22), T),
        Connect::TimedOut,
        "revoked by address"
    );

    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
    lab.knock(&lab.b, "bob", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=bob", 1));
    assert!(wait_until(Duration::from_secs(5), || tcp_probe(
        &lab.a,
        Lab::gw4(22),
        T
    ) == Connect::Open));
    lab.exec(
        &lab.gw,
        &spad,
        &["revoke", "-c", &conf, "--client", "alice"],
    );
    assert_eq!(
        tcp_probe(&lab.a, Lab::gw4(22), T),
        Connect::TimedOut,
        "revoked by client"
    );
    assert_eq!(
        tcp_probe(&lab.b, Lab::gw4(22), T),
        Connect::Open,
        "other clients untouched"
    );
}

pub fn reknock_refreshes_without_duplicates_and_reload_prunes(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let daemon = lab.start_spad(CONF, backend);
    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "3s"], false);
    assert!(lab.wait_log("granted owner=alice", 1));
    std::thread::sleep(Duration::from_secs(2)); // let most of the first grant elapse
    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "3s"], false);
    assert!(lab.wait_log("granted owner=alice", 2));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        tcp_probe(&lab.a, Lab::gw4(22), T),
        Connect::Open,
        "refreshed: 3.5s after the first knock"
    );
    let conf = lab.path(CONF).display().to_string();
    let listed = String::from_utf8_lossy(
        &lab.exec(
            &lab.gw,
            binary("spad").to_str().unwrap(),
            &["list", "-c", &conf],
        )
        .stdout,
    )
    .into_owned();
    assert_eq!(
        listed.matches("203.0.113.10").count(),
        1,
        "one element, not two: {listed}"
    );

    // Reload with alice no longer allowed ssh: her live grant is pruned, bob's stays.
    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
    lab.knock(&lab.b, "bob", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=bob", 1));
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace(
            "services = [\"ssh\", \"vpn\", \"rdp\", \"admin\"]",
            "services = [\"vpn\"]",
        ),
    )
    .unwrap();
    lab.reload_spad(daemon);
    assert!(
        lab.wait_log("reloaded; kept 1 live grants", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::Open);
    // A broken config on reload keeps the running one.
    std::fs::write(&conf, "this is not toml [").unwrap();
    lab.reload_spad(daemon);
    assert!(
        lab.wait_log("reload failed, keeping the running config", 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::Open);
}

pub fn flush_on_exit_closes_grants_and_bad_config_touches_nothing(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let _ssh = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    let conf = lab.path(CONF);
    let text = std::fs::read_to_string(&conf).unwrap();
    // A bad config: spad refuses it with file:line and installs nothing.
    std::fs::write(
        &conf,
        text.replace(
            "timeout = \"8s\"\nmax-timeout",
            "timeout = \"8 s\"\nmax-timeout",
        ),
    )
    .unwrap();
    let out = lab.try_exec(
        &lab.gw,
        binary("spad").to_str().unwrap(),
        &["run", "-c", conf.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("demo.toml:17:11") && err.contains("write e.g."),
        "{err}"
    );
    assert!(!lab.nft_list().contains("spad"), "nothing installed");
    assert!(
        String::from_utf8_lossy(&lab.try_exec(&lab.gw, "iptables-save", &[]).stdout)
            .matches("SPAD")
            .count()
            == 0
    );

    std::fs::write(
        &conf,
        text.replacen("[server]\n", "[server]\nflush-on-exit = true\n", 1),
    )
    .unwrap();
    let daemon = lab.start_spad(CONF, backend);
    lab.knock(&lab.a, "alice", &["ssh"], &["--duration", "1h"], false);
    assert!(lab.wait_log("granted owner=alice", 1));
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::Open);
    lab.stop_spad(daemon, false);
    assert!(
        lab.log().contains("flush-on-exit: all grants closed"),
        "{}",
        lab.log()
    );
    // The grant is gone; the protection stays (only `spad uninstall` removes it).
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(22), T), Connect::TimedOut);
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(22), T), Connect::TimedOut);
}

both_backends!(
    vpn_one_grant_opens_every_protocol_and_idles_out,
    nat_forward_only_for_the_knocker_and_the_dnat_goes_with_the_grant,
    allow_list_bypasses_knocking,
    close_and_revoke_take_effect_at_once,
    reknock_refreshes_without_duplicates_and_reload_prunes,
    flush_on_exit_closes_grants_and_bad_config_touches_nothing,
);
