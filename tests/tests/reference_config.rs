//! The reference configuration in conf/spad.toml is valid on a gateway with eth0/eth1, and
//! its ruleset loads into real nftables and iptables.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use spa_e2e::*;

#[test]
fn reference_config_checks_and_its_rulesets_load() {
    assert!(can_run(), "E2E tests need root");
    let lab = Lab::new("spad.toml");
    std::fs::create_dir_all(lab.path("totp")).unwrap();
    std::fs::copy(lab.path("keys/server.key"), lab.path("server.key")).unwrap();
    lab.spad(&[
        "totp",
        "new-secret",
        "--out",
        lab.path("totp/bob.secret").to_str().unwrap(),
    ]);
    let conf = lab.path("spad.toml").display().to_string();
    let state = lab.path("state").display().to_string();
    let spad = binary("spad").display().to_string();
    let out = lab.exec(
        &lab.gw,
        &spad,
        &["check", "-c", &conf, "--state-dir", &state],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("service vpn (Vpn)"));
    // nftables: the generated ruleset loads.
    let ruleset = lab
        .exec(
            &lab.gw,
            &spad,
            &["check", "-c", &conf, "--state-dir", &state, "--ruleset"],
        )
        .stdout;
    let path = lab.path("ruleset.nft");
    std::fs::write(&path, ruleset).unwrap();
    lab.exec(&lab.gw, "nft", &["-f", path.to_str().unwrap()]);
    assert!(lab.nft_list().contains("dnat ip6 to [fd00:1::12]:8080"));
}
