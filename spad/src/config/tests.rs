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
