//! A repair after spad's table was deleted restores only the idle grants spad can show to be
//! still alive (nftables): an idle timer that has lapsed in the kernel is not started again,
//! a grant kept alive by traffic and seen by a kernel read (`spad list`) comes back, and so
//! does one granted just before. Established connections of a grant left out keep working.
//! nftables only: a deleted iptables chain leaves its ipset sets, and their timers, in place.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use spa_e2e::*;

const CONF: &str = "demo.toml";
const T: Duration = Duration::from_millis(600);
/// The vpn service of demo.toml: `timeout = "1h"`, `idle-timeout = "4s"`, 443/tcp among its ports.
const VPN: u16 = 443;

fn in_set(lab: &Lab, set: &str, address: &str) -> bool {
    let out = lab.try_exec(&lab.gw, "nft", &["list", "set", "inet", "spad", set]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains(&format!("{address} ")) || text.contains(&format!("{address},"))
}

fn table_there(lab: &Lab) -> bool {
    lab.try_exec(&lab.gw, "nft", &["list", "table", "inet", "spad"])
        .status
        .success()
}

#[test]
fn a_repair_restores_live_idle_grants_only() {
    if !e2e_or_skip() {
        return;
    }
    let mut lab = Lab::new(CONF);
    let _service = Echo::tcp(&lab.gw, format!("[::]:{VPN}").parse().unwrap());
    let daemon = lab.start_spad(CONF, Backend::Nftables);
    let a = client_addr("a", false).to_string();
    let b = client_addr("b", false).to_string();
    let b6 = client_addr("b", true).to_string();

    // a: granted, a connection opened and then left quiet; the idle timer lapses in the
    // kernel although the grant has an hour left.
    lab.knock(&lab.a, "alice", &["vpn"], &[], false);
    assert!(lab.wait_log("granted owner=alice", 1), "{}", lab.log());
    let mut held = Held::open(&lab.a, Lab::gw4(VPN)).expect("a connects while granted");
    assert!(held.echo());
    assert!(
        wait_until(Duration::from_secs(10), || !in_set(&lab, "i4_vpn", &a)),
        "the idle timer did not lapse:\n{}",
        lab.nft_list()
    );
    assert!(
        in_set(&lab, "a4_vpn", &a),
        "the grant itself is still there"
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(VPN), T), Connect::TimedOut);

    // b: granted and kept alive by traffic for longer than the idle timeout (refreshed in the
    // kernel, unseen by spad), then seen alive by a kernel read.
    lab.knock(&lab.b, "alice", &["vpn"], &[], false);
    assert!(lab.wait_log("granted owner=alice", 2), "{}", lab.log());
    let busy_until = Instant::now() + Duration::from_secs(6);
    let mut refused = 0;
    wait_until(Duration::from_secs(10), || {
        if tcp_probe(&lab.b, Lab::gw4(VPN), T) != Connect::Open {
            refused += 1;
        }
        Instant::now() >= busy_until
    });
    assert_eq!(refused, 0, "b's traffic keeps its grant open");
    let list = lab.spad_gw(&["list"], CONF);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains(&b) && !list.contains(&format!("{a} ")),
        "{list}"
    );
    // b over IPv6: granted just before the deletion, no read since.
    lab.knock(&lab.b, "alice", &["vpn"], &[], true);
    assert!(lab.wait_log("granted owner=alice", 3), "{}", lab.log());

    lab.exec(&lab.gw, "nft", &["delete", "table", "inet", "spad"]);
    assert!(
        wait_until(Duration::from_secs(10), || table_there(&lab)
            && lab.log().contains("protection reinstalled")),
        "the table was not put back:\n{}",
        lab.log()
    );
    assert!(
        !in_set(&lab, "i4_vpn", &a),
        "an idle-lapsed grant came back with a fresh idle period:\n{}\n{}",
        lab.nft_list(),
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(VPN), T), Connect::TimedOut);
    // What was alive is back: no lockout.
    assert!(in_set(&lab, "i4_vpn", &b), "{}", lab.nft_list());
    assert!(in_set(&lab, "i6_vpn", &b6), "{}", lab.nft_list());
    assert_eq!(tcp_probe(&lab.b, Lab::gw4(VPN), T), Connect::Open);
    assert_eq!(tcp_probe(&lab.b, Lab::gw6(VPN), T), Connect::Open);
    // a's connection from before still works (conntrack); a new one needs a new knock.
    assert!(
        held.echo(),
        "an established connection survives the repair\n{}",
        lab.snapshot()
    );
    lab.knock(&lab.a, "alice", &["vpn"], &[], false);
    assert!(lab.wait_log("granted owner=alice", 4), "{}", lab.log());
    assert_eq!(tcp_probe(&lab.a, Lab::gw4(VPN), T), Connect::Open);
    lab.stop_spad(daemon, false);
}
