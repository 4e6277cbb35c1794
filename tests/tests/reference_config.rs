//! The reference configuration in conf/spad.toml is valid on a gateway with eth0/eth1 and
//! ships with no live client or door; its commented examples are valid too once uncommented,
//! their keys are consistent with conf/client.toml, and their rulesets load into real
//! nftables.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use spa_e2e::*;

/// The reference config with its commented-out example tables and keys made live.
fn uncommented(text: &str) -> String {
    let live = |rest: &str| {
        rest.starts_with('[')
            || rest.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            })
    };
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if live(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn check(lab: &Lab, conf: &str) -> String {
    let state = lab.path("state").display().to_string();
    let spad = binary("spad").display().to_string();
    let out = lab.exec(
        &lab.gw,
        &spad,
        &["check", "-c", conf, "--state-dir", &state],
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn reference_config_checks_and_its_rulesets_load() {
    if !e2e_or_skip() {
        return;
    }
    let lab = Lab::new("spad.toml");
    std::fs::copy(lab.path("keys/server.key"), lab.path("server.key")).unwrap();
    // As shipped: valid on first use, with no client and no door anyone could use.
    let shipped = lab.path("spad.toml").display().to_string();
    let summary = check(&lab, &shipped);
    assert!(summary.contains("service vpn"), "{summary}");
    assert!(
        !summary.contains("client ") && !summary.contains("door "),
        "{summary}"
    );

    // The examples, uncommented, are valid as well.
    std::fs::create_dir_all(lab.path("totp")).unwrap();
    lab.spad(&[
        "totp",
        "new-secret",
        "--out",
        lab.path("totp/bob.secret").to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(lab.path("spad.toml")).unwrap();
    let examples = lab.path("spad-examples.toml");
    std::fs::write(&examples, uncommented(&text)).unwrap();
    let conf = examples.display().to_string();
    let summary = check(&lab, &conf);
    for want in [
        "client alice-laptop",
        "client alice-phone",
        "client branch-router",
        "door openssh",
        "totp door bob",
    ] {
        assert!(summary.contains(want), "{want}: {summary}");
    }
    // nftables: the generated ruleset loads.
    let state = lab.path("state").display().to_string();
    let spad = binary("spad").display().to_string();
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

/// Example keys: every one distinct, and conf/client.toml (alice-laptop's profile) names the
/// example gateway key the reference config announces, not a client's key.
#[test]
fn example_keys_are_consistent() {
    let conf = std::fs::read_to_string(workspace().join("conf/spad.toml")).unwrap();
    let profile = std::fs::read_to_string(workspace().join("conf/client.toml")).unwrap();
    let keys_in = |text: &str, field: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim_start_matches("# ").strip_prefix(field))
            .filter_map(|rest| rest.split('"').nth(1).map(String::from))
            .collect()
    };
    let clients = keys_in(&conf, "public-key = ");
    assert_eq!(clients.len(), 3, "{clients:?}");
    let server = keys_in(&profile, "server-public-key = ");
    assert_eq!(server.len(), 1);
    assert!(
        conf.contains(&server[0]),
        "spad.toml names the example gateway key"
    );
    let mut all = clients.clone();
    all.push(server[0].clone());
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "every example key is distinct");
    for key in &all {
        let bytes = key.trim_end_matches('=').len();
        assert_eq!(bytes, 43, "{key} is a 32-byte base64 key");
    }
    // The profile asks for a service alice-laptop has.
    assert!(profile.contains("services = [\"ssh\"]"));
    assert!(conf.contains("# services = [\"ssh\", \"webadmin\", \"vpn\", \"rdp\", \"intranet\"]"));
}
