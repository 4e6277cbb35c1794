//! Tests of the whole configuration: parsing, defaults, and errors with their locations.

use super::*;
use std::time::Duration;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/spad/spad.toml"), text)
}

const KEY: &str = "aGVsbG8gd29ybGQgdGhpcyBpcyAzMiBieXRlcyEhISE=";

fn base() -> String {
    format!(
        r#"
[server]
private-key = "server.key"

[services.ssh]
kind = "management"
ports = ["22/tcp"]
timeout = "30s"

[clients.alice]
public-key = "{KEY}"
services = ["ssh"]
"#
    )
}

#[test]
fn minimal_config_parses_with_defaults() {
    let config = parse(&base()).unwrap();
    assert_eq!(config.server.port, 62201);
    assert_eq!(config.server.private_key, Path::new("/etc/spad/server.key"));
    assert_eq!(config.services["ssh"].timeout, Duration::from_secs(30));
    assert_eq!(config.clients["alice"].services, vec!["ssh"]);
}

#[test]
fn errors_carry_file_line_and_a_hint() {
    let text = base().replace("services = [\"ssh\"]", "services = [\"sshh\"]");
    let err = parse(&text).unwrap_err();
    assert_eq!((err.line, err.file.as_str()), (12, "/etc/spad/spad.toml"));
    assert!(
        err.message
            .contains("unknown service `sshh`; defined services: ssh"),
        "{err}"
    );

    let err = parse(&base().replace("timeout = \"30s\"", "timeout = \"30 parsecs\"")).unwrap_err();
    assert_eq!(err.line, 8);
    assert!(err.message.contains("write e.g."), "{err}");

    let err = parse(&base().replace("kind = \"management\"", "kind = \"management\"\ncolour = 1"))
        .unwrap_err();
    assert!(err.message.contains("unknown field `colour`"), "{err}");

    let err = parse(&base().replace("22/tcp", "70000/tcp")).unwrap_err();
    assert_eq!(err.line, 7);

    let err = parse(&base().replace(KEY, "short")).unwrap_err();
    assert!(err.message.contains("public-key"), "{err}");
}

#[test]
fn nat_rules() {
    let nat = |public: &str, target: &str| {
        format!(
            "{}\n[services.rdp]\nkind = \"nat\"\nports = [\"{public}\"]\ntimeout = \"1h\"\nforward-to = \"{target}\"\n",
            base()
        )
    };
    let config = parse(&nat("3389/tcp", "192.168.1.12:3389")).unwrap();
    assert_eq!(
        config.services["rdp"]
            .forward
            .as_ref()
            .unwrap()
            .v4
            .unwrap()
            .port(),
        3389
    );
    assert!(parse(&nat("3389/tcp", "not-an-address"))
        .unwrap_err()
        .message
        .contains("address:port"));
    assert!(parse(&nat("22/tcp", "192.168.1.12:22"))
        .unwrap_err()
        .message
        .contains("either local or forwarded"));
    let twice = format!(
        "{}\n[services.rdp2]\nkind = \"nat\"\nports = [\"3389/tcp\"]\ntimeout = \"1h\"\nforward-to = \"192.168.1.13:3389\"\n",
        nat("3389/tcp", "192.168.1.12:3389")
    );
    let err = parse(&twice).unwrap_err();
    assert!(err.message.contains("must not overlap"), "{err}");
}

#[test]
fn allow_list_and_interface_are_checked() {
    let text = base().replace(
        "timeout = \"30s\"",
        "timeout = \"30s\"\nallow = [\"10.0.0.0/33\"]",
    );
    assert!(parse(&text).unwrap_err().message.contains("CIDR"));
    let text = base().replace(
        "timeout = \"30s\"",
        "timeout = \"30s\"\ninterface = \"nosuchif0\"",
    );
    assert!(parse(&text)
        .unwrap_err()
        .message
        .contains("no interface `nosuchif0`"));
}

#[test]
fn door_bad_input_is_refused_with_its_line() {
    let door = |seq: &str| {
        format!(
            "{}\n[doors.d]\nsequence = [{seq}]\nservices = [\"ssh\"]\n",
            base()
        )
    };
    let err = parse(&door("\"7000/tcp\", \"70000/tcp\"")).unwrap_err();
    assert_eq!(err.line, 15);
    assert!(err.message.contains("out of range"), "{err}");
    let err = parse(&door("\"7000/tcp\", \"7000/tcp\"")).unwrap_err();
    assert!(err.message.contains("appears twice"), "{err}");
    let err = parse(&door("\"7000/tcp\", \"62201/udp\"")).unwrap_err();
    assert!(err.message.contains("SPA port"), "{err}");
    let err = parse(&door("\"7000/tcp\", \"22/tcp\"")).unwrap_err();
    assert!(err.message.contains("protected service port"), "{err}");
    let err = parse(&door("\"7000/tcp\"")).unwrap_err();
    assert!(err.message.contains("at least 2 ports"), "{err}");

    let totp = |name: &str, port: u16, secret: &str| {
        format!("[totp-doors.{name}]\nfirst-port = {port}\nsecret = \"{secret}\"\nservices = [\"ssh\"]\n")
    };
    let good = "JBSWY3DPEHPK3PXPJBSWY3DP";
    let text = format!(
        "{}\n{}{}",
        base(),
        totp("a", 40001, good),
        totp("b", 40001, good)
    );
    let err = parse(&text).unwrap_err();
    assert_eq!(err.line, 19);
    assert!(err.message.contains("unique first port"), "{err}");
    let err = parse(&format!("{}\n{}", base(), totp("a", 40001, "not base32!"))).unwrap_err();
    assert_eq!(err.line, 16);
    assert!(err.message.contains("base32"), "{err}");
    let text = format!(
        "{}\n{}port-range = \"20000-20002\"\n",
        base(),
        totp("a", 40001, good)
    );
    assert!(parse(&text)
        .unwrap_err()
        .message
        .contains("widen port-range"));
}

/// The error for `base()` with `from` replaced by `to`: its (line, column) and message.
fn refused(from: &str, to: &str) -> (usize, usize, String) {
    let text = base().replacen(from, to, 1);
    assert_ne!(text, base(), "`{from}` is not in the base config");
    let err = parse(&text).unwrap_err();
    (err.line, err.column, err.message)
}

#[test]
fn the_replay_window_is_bounded() {
    let server = "private-key = \"server.key\"";
    let (line, column, message) = refused(server, &format!("{server}\nmax-age = 0"));
    assert_eq!((line, column), (4, 11), "{message}");
    assert!(
        message.contains("max-age = 0 refuses every packet"),
        "{message}"
    );
    // i64::MAX seconds: in microseconds this once wrapped to well under a second.
    let (line, _, message) = refused(server, &format!("{server}\nmax-age = 9223372036854775807"));
    assert_eq!(line, 4);
    assert!(message.contains("longest kernel set timeout"), "{message}");
    let (line, _, message) = refused(server, &format!("{server}\nmax-future = \"2d\""));
    assert_eq!(line, 4);
    assert!(message.contains("write at most \"1h\""), "{message}");
    let (_, _, message) = refused(server, &format!("{server}\nmax-future = \"3650d\""));
    assert!(message.contains("24d"), "{message}");
    let config = parse(&base().replace(
        server,
        &format!("{server}\nmax-future = 0\nmax-age = \"1h\""),
    ))
    .unwrap();
    assert_eq!(config.server.max_age, Duration::from_secs(3600));
}

#[test]
fn timeouts_fit_the_kernel_sets_of_both_backends() {
    let (line, column, message) = refused("timeout = \"30s\"", "timeout = \"30d\"");
    assert_eq!((line, column), (8, 11));
    assert!(message.contains("longest kernel set timeout"), "{message}");
    let (line, _, _) = refused(
        "timeout = \"30s\"",
        "timeout = \"30s\"\nmax-timeout = 2147484",
    );
    assert_eq!(line, 9);
    let (line, _, _) = refused(
        "timeout = \"30s\"",
        "timeout = \"30s\"\nidle-timeout = \"100d\"",
    );
    assert_eq!(line, 9);
    let longest = base().replace("timeout = \"30s\"", "timeout = 2147483");
    assert_eq!(
        parse(&longest).unwrap().services["ssh"].timeout,
        Duration::from_secs(2_147_483)
    );
    let (line, _, message) = refused(
        "services = [\"ssh\"]",
        "services = [\"ssh\"]\nmax-duration = 0",
    );
    assert_eq!(line, 13);
    assert!(message.contains("max-duration = 0"), "{message}");
}

#[test]
fn two_services_may_not_share_a_local_port() {
    let other = "\n[services.ssh2]\nkind = \"management\"\nports = [\"2222/tcp\", \"22/tcp\"]\ntimeout = \"1m\"\n";
    let err = parse(&format!("{}{other}", base())).unwrap_err();
    assert_eq!((err.line, err.column), (16, 22), "{err}");
    assert!(
        err.message.contains("already a port of service `ssh`"),
        "{err}"
    );
    // The same port on another protocol is another port.
    assert!(parse(&format!(
        "{}{}",
        base(),
        other.replace("\"22/tcp\"", "\"22/udp\"")
    ))
    .is_ok());
}

#[test]
fn names_must_fit_the_kernel_comment() {
    let long = "\u{1F600}".repeat(26); // 104 bytes of UTF-8
    let (line, _, message) = refused("[clients.alice]", &format!("[clients.\"{long}\"]"));
    assert_eq!(line, 10);
    assert!(message.contains("104 bytes"), "{message}");
    let door = format!(
        "{}\n[doors.\"{long}\"]\nsequence = [\"7000/tcp\", \"8000/tcp\"]\nservices = [\"ssh\"]\n",
        base()
    );
    let err = parse(&door).unwrap_err();
    assert_eq!(err.line, 14, "{err}");
    assert!(err.message.contains("door name"), "{err}");
}

#[test]
fn knock_limits_that_would_break_doors_are_refused() {
    let with = |extra: &str| {
        let text = format!(
            "{}\n[doors.d]\nsequence = [\"7000/tcp\", \"8000/tcp\"]\nservices = [\"ssh\"]\n{extra}",
            base()
        );
        parse(&text)
    };
    assert!(with("").is_ok());
    let err = with("\n[knocking]\nmax-knocks-per-second = 0\n").unwrap_err();
    assert_eq!((err.line, err.column), (19, 25), "{err}");
    assert!(err.message.contains("write a rate"), "{err}");
    let err = with("\n[knocking]\nblacklist-after = 0\n").unwrap_err();
    assert_eq!(err.line, 19, "{err}");
    let err = with("seq-timeout = 0\n").unwrap_err();
    assert_eq!(err.line, 17, "{err}");
    assert!(err.message.contains("seq-timeout = 0"), "{err}");
    let err = with("\n[knocking]\nblacklist-for = \"90d\"\n").unwrap_err();
    assert!(err.message.contains("24d"), "{err}");
    let totp = format!(
        "{}\n[totp-doors.t]\nfirst-port = 40001\nsecret = \"JBSWY3DPEHPK3PXPJBSWY3DP\"\nservices = [\"ssh\"]\nskew-steps = 9\n",
        base()
    );
    let err = parse(&totp).unwrap_err();
    assert_eq!((err.line, err.column), (18, 14), "{err}");
    assert!(err.message.contains("at most 3"), "{err}");
}

#[test]
fn a_missing_or_non_utf8_file_says_so() {
    let dir = std::env::temp_dir().join(format!("spad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("absent.toml");
    let err = Config::load(&missing).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: missing: no such file; start from conf/spad.toml (README, First use) or pass -c FILE",
            missing.display()
        )
    );
    let latin1 = dir.join("latin1.toml");
    std::fs::write(&latin1, b"[server]\nprivate-key = \"cl\xe9.key\"\n").unwrap();
    let err = Config::load(&latin1).unwrap_err();
    assert_eq!((err.line, err.column), (2, 18), "{err}");
    assert!(err.message.contains("not UTF-8 (byte 0xe9)"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn handshake_budget_defaults_and_zero_is_refused_with_its_location() {
    let config = parse(&base()).unwrap();
    assert_eq!(
        (config.server.handshake_rate, config.server.handshake_burst),
        (100, 200)
    );
    let text = base().replace(
        "private-key = \"server.key\"",
        "private-key = \"server.key\"\nhandshake-rate = 5\nhandshake-burst = 0",
    );
    let err = parse(&text).unwrap_err();
    assert!(err.message.contains("handshake-burst = 0"), "{err}");
    let config = parse(&text.replace("handshake-burst = 0", "handshake-burst = 7")).unwrap();
    assert_eq!(
        (config.server.handshake_rate, config.server.handshake_burst),
        (5, 7)
    );
}

/// `base()` with `lines` added to `[server]` (from line 4 on).
fn with_server_lines(lines: &str) -> String {
    base().replace(
        "private-key = \"server.key\"",
        &format!("private-key = \"server.key\"\n{lines}"),
    )
}

#[test]
fn packet_budget_defaults_to_20000_per_second_and_1000_at_once() {
    let config = parse(&base()).unwrap();
    assert_eq!(
        (config.server.packet_rate, config.server.packet_burst),
        (20_000, 1_000)
    );
    assert_eq!(
        config.server.packet_budget(),
        Some(crate::capture::ebpf::SourceBudget {
            rate: 20_000,
            burst: 1_000
        })
    );
    let config = parse(&with_server_lines("packet-rate = 50\npacket-burst = 7")).unwrap();
    assert_eq!(
        config.server.packet_budget(),
        Some(crate::capture::ebpf::SourceBudget { rate: 50, burst: 7 })
    );
}

#[test]
fn packet_rate_0_turns_the_kernel_budget_off() {
    let config = parse(&with_server_lines("packet-rate = 0")).unwrap();
    assert_eq!(config.server.packet_rate, 0);
    assert_eq!(config.server.packet_budget(), None);
    // The burst does not matter without a rate.
    let config = parse(&with_server_lines("packet-rate = 0\npacket-burst = 0")).unwrap();
    assert_eq!(config.server.packet_budget(), None);
}

#[test]
fn a_packet_rate_above_the_maximum_is_refused_with_its_location_and_a_hint() {
    let err = parse(&with_server_lines("packet-rate = 2000000")).unwrap_err();
    assert_eq!(
        (err.file.as_str(), err.line, err.column),
        ("/etc/spad/spad.toml", 4, 15),
        "{err}"
    );
    assert!(
        err.message.contains("packet-rate is at most 1000000"),
        "{err}"
    );
    assert!(err.message.contains("write e.g. 20000"), "{err}");
    assert!(err.message.contains("0 for no kernel budget"), "{err}");
    // The highest rate itself is accepted.
    let config = parse(&with_server_lines("packet-rate = 1000000")).unwrap();
    assert_eq!(config.server.packet_rate, 1_000_000);
}

#[test]
fn a_packet_burst_of_0_with_a_rate_is_refused_with_its_location_and_a_hint() {
    let err = parse(&with_server_lines("packet-rate = 10\npacket-burst = 0")).unwrap_err();
    assert_eq!(
        (err.file.as_str(), err.line, err.column),
        ("/etc/spad/spad.toml", 5, 16),
        "{err}"
    );
    assert!(err.message.contains("packet-burst is 1-1000000"), "{err}");
    assert!(err.message.contains("write e.g. 1000"), "{err}");
    // With the default rate too.
    let err = parse(&with_server_lines("packet-burst = 0")).unwrap_err();
    assert_eq!(err.line, 4, "{err}");
    let err = parse(&with_server_lines("packet-burst = 1000001")).unwrap_err();
    assert!(err.message.contains("packet-burst is 1-1000000"), "{err}");
}
