//! A man-on-the-side who withholds a client's packet and re-sends it from his own address gets
//! nothing when the client has `require-address`: the packet names the address it is for,
//! and it must be the observed source. A packet that names the sender's address still opens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use spa_e2e::*;

const CONF: &str = "demo.toml";
const T: Duration = Duration::from_millis(700);

fn send_raw(ns: &str, to: SocketAddr, bytes: Vec<u8>) {
    in_ns(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(&bytes, to).unwrap();
    });
}

/// Bob's packet for `address`, made in namespace a but "withheld": it goes to a port spad
/// does not watch, and the bytes are kept for whoever re-sends them.
fn withheld_packet(lab: &Lab, address: Option<&str>, name: &str) -> Vec<u8> {
    let saved = lab.path(name);
    let mut extra = vec!["--port", "9", "--save-packet", saved.to_str().unwrap()];
    if let Some(address) = address {
        extra.extend(["--address", address]);
    }
    lab.knock(&lab.a, "bob", &["ssh"], &extra, false);
    std::fs::read(&saved).unwrap()
}

pub fn a_withheld_packet_resent_from_elsewhere_is_refused(backend: Backend) {
    let mut lab = Lab::new(CONF);
    let conf = lab.path(CONF);
    let text = std::fs::read_to_string(&conf).unwrap();
    let text = text.replacen(
        "[clients.bob]\n",
        "[clients.bob]\nrequire-address = true\n",
        1,
    );
    std::fs::write(&conf, text).unwrap();
    let _echo = Echo::tcp(&lab.gw, "[::]:22".parse().unwrap());
    lab.start_spad(CONF, backend);
    let ssh = Lab::gw4(22);
    let a = client_addr("a", false).to_string();
    let b = client_addr("b", false).to_string();

    // The thief (b) re-sends a's packet, which names a, from his own address.
    let stolen = withheld_packet(&lab, Some(&a), "stolen.bin");
    send_raw(&lab.b, Lab::gw4(62201), stolen.clone());
    let refusal =
        format!("client `bob` has require-address; the packet is for {a} but came from {b}");
    assert!(lab.wait_log(&refusal, 1), "{}", lab.log());
    assert_eq!(
        tcp_probe(&lab.b, ssh, T),
        Connect::TimedOut,
        "the thief gets nothing"
    );

    // A packet that names no address is refused for this client, whoever sends it.
    let unnamed = withheld_packet(&lab, None, "unnamed.bin");
    send_raw(&lab.b, Lab::gw4(62201), unnamed);
    assert!(
        lab.wait_log(
            "client `bob` has require-address but the packet names no address",
            1
        ),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, ssh, T), Connect::TimedOut);

    // The refusal did not use up the packet: when it reaches the gateway from a, it opens.
    send_raw(&lab.a, Lab::gw4(62201), stolen);
    assert!(
        lab.wait_log(&format!("granted owner=bob address={a}"), 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.a, ssh, T), Connect::Open);

    // A packet that names b opens for b when b sends it.
    let for_b = withheld_packet(&lab, Some(&b), "for-b.bin");
    send_raw(&lab.b, Lab::gw4(62201), for_b);
    assert!(
        lab.wait_log(&format!("granted owner=bob address={b}"), 1),
        "{}",
        lab.log()
    );
    assert_eq!(tcp_probe(&lab.b, ssh, T), Connect::Open);
}

both_backends!(a_withheld_packet_resent_from_elsewhere_is_refused);
