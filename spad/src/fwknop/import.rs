//! `spad import-fwknop`: turns fwknopd's `access.conf` (and optionally `fwknopd.conf`) into
//! `[services.*]` and `[fwknop-clients.*]` TOML, and says what it cannot carry over.
//!
//! Every stanza appears in the output: one it cannot express safely is written so that
//! `spad check` refuses it (an empty key or service list to fill in), or commented out with
//! the reason (GPG). Nothing is dropped without a note.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use base64::Engine;

/// fwknopd's default `FW_ACCESS_TIMEOUT` when neither file sets one.
const DEFAULT_ACCESS_TIMEOUT: u64 = 30;

#[derive(Debug, Clone)]
struct Entry {
    keyword: String,
    value: String,
    line: usize,
}

#[derive(Debug, Default)]
struct Stanza {
    line: usize,
    entries: Vec<Entry>,
}

impl Stanza {
    fn get(&self, keyword: &str) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| e.keyword == keyword)
    }
}

/// `KEYWORD value` lines (fwknop 2.x), also accepting the 1.x `KEYWORD: value;` form.
fn entries(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (keyword, value) = line
            .split_once(|c: char| c.is_whitespace())
            .unwrap_or((line, ""));
        out.push(Entry {
            keyword: keyword.trim_end_matches(':').to_ascii_uppercase(),
            value: value.trim().trim_end_matches(';').trim().to_string(),
            line: i + 1,
        });
    }
    out
}

fn yes(value: &str) -> bool {
    value.eq_ignore_ascii_case("y") || value.eq_ignore_ascii_case("yes")
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One port of `OPEN_PORTS`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Port {
    proto: String,
    port: u16,
}

fn ports(value: &str) -> Result<Vec<Port>, String> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|spec| {
            let (proto, port) = spec
                .split_once('/')
                .ok_or_else(|| format!("`{spec}` is not proto/port"))?;
            let proto = proto.to_ascii_lowercase();
            if proto != "tcp" && proto != "udp" {
                return Err(format!("`{spec}`: only tcp and udp can be opened"));
            }
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{spec}`: not a port"))?;
            Ok(Port { proto, port })
        })
        .collect()
}

/// A service the import defines.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceOut {
    port: Port,
    timeout: u64,
    max_timeout: u64,
    forward: Option<String>,
}

/// Settings from fwknopd.conf that apply to every stanza.
#[derive(Debug)]
struct Global {
    access_timeout: u64,
    max_age: Option<u64>,
    notes: Vec<String>,
}

fn global(conf: Option<(&str, &str)>) -> Global {
    let mut g = Global {
        access_timeout: DEFAULT_ACCESS_TIMEOUT,
        max_age: None,
        notes: Vec::new(),
    };
    let Some((name, text)) = conf else {
        return g;
    };
    for e in entries(text) {
        let at = format!("{name}:{}", e.line);
        match e.keyword.as_str() {
            "FW_ACCESS_TIMEOUT" => match e.value.parse() {
                Ok(t) => g.access_timeout = t,
                Err(_) => g.notes.push(format!("{at}: FW_ACCESS_TIMEOUT `{}` is not a number; using {DEFAULT_ACCESS_TIMEOUT}s", e.value)),
            },
            "MAX_SPA_PACKET_AGE" => match e.value.parse::<u64>() {
                Ok(a) if (1..=600).contains(&a) => g.max_age = Some(a),
                _ => g.notes.push(format!("{at}: MAX_SPA_PACKET_AGE `{}` is outside 1-600 s; spad keeps its default 120s", e.value)),
            },
            "ENABLE_SPA_PACKET_AGING" if !yes(&e.value) => g.notes.push(format!(
                "{at}: ENABLE_SPA_PACKET_AGING N is not carried over: spad always refuses stale packets"
            )),
            "ENABLE_DIGEST_PERSISTENCE" if !yes(&e.value) => g.notes.push(format!(
                "{at}: ENABLE_DIGEST_PERSISTENCE N is not carried over: spad always keeps replay digests on disk"
            )),
            "PCAP_FILTER" | "UDPSERV_PORT" => g.notes.push(format!(
                "{at}: {} {}: spad listens on [server] port (default 62201/udp) for both protocols",
                e.keyword, e.value
            )),
            "ENABLE_SPA_OVER_HTTP" | "ENABLE_TCP_SERVER" if yes(&e.value) => g.notes.push(format!(
                "{at}: {} Y is not carried over: spad hears fwknop packets over UDP only",
                e.keyword
            )),
            _ => {}
        }
    }
    g
}

/// What one stanza became.
#[derive(Debug, Default)]
struct ClientOut {
    lines: Vec<String>,
    notes: Vec<String>,
    commented_out: bool,
}

fn service_name(s: &ServiceOut) -> String {
    match &s.forward {
        None => format!("fwknop-{}{}-{}s", s.proto_name(), s.port.port, s.timeout),
        Some(_) => format!(
            "fwknop-nat-{}{}-{}s",
            s.proto_name(),
            s.port.port,
            s.timeout
        ),
    }
}

impl ServiceOut {
    fn proto_name(&self) -> &str {
        &self.port.proto
    }
}

/// The stanza being converted and the name of its file, for the `FILE:LINE` of each note.
struct Source<'a> {
    stanza: &'a Stanza,
    access_name: &'a str,
}

impl Source<'_> {
    /// Where `entry` is.
    fn at(&self, entry: &Entry) -> String {
        format!("{}:{}", self.access_name, entry.line)
    }

    /// Where the stanza starts (its SOURCE line).
    fn start(&self) -> String {
        format!("{}:{}", self.access_name, self.stanza.line)
    }
}

/// The grant settings every service of one stanza shares.
struct Grant {
    timeout: u64,
    max_timeout: Option<u64>,
    forward: Option<String>,
}

fn convert_stanza(
    stanza: &Stanza,
    access_name: &str,
    g: &Global,
    services: &mut BTreeMap<String, ServiceOut>,
) -> ClientOut {
    let src = Source {
        stanza,
        access_name,
    };
    let mut out = ClientOut::default();
    convert_keys(&src, &mut out);
    convert_digest(&src, &mut out);
    let grant = Grant {
        timeout: access_timeout(&src, g, &mut out),
        max_timeout: max_timeout(&src, &mut out),
        forward: forward(&src, &mut out),
    };
    let wanted = open_ports(&src, &grant, services, &mut out);
    let list: Vec<String> = wanted.iter().map(|n| toml_string(n)).collect();
    out.lines.push(format!(
        "services = [{}]{}",
        list.join(", "),
        if list.is_empty() { "  # FILL IN" } else { "" }
    ));
    let require = stanza
        .get("REQUIRE_SOURCE_ADDRESS")
        .or_else(|| stanza.get("REQUIRE_SOURCE"))
        .is_some_and(|e| yes(&e.value));
    out.lines
        .push(format!("require-source-address = {require}"));
    if let Some(m) = grant.max_timeout {
        out.lines.push(format!("max-timeout = \"{m}s\""));
    }
    if let Some(a) = g.max_age {
        out.lines.push(format!("max-age = \"{a}s\""));
    }
    for e in &stanza.entries {
        if let Some(note) = not_carried_over(e) {
            out.notes.push(format!("{}: {note}", src.at(e)));
        }
    }
    out
}

/// The stanza's key given as base64 (`base64_keyword`) or as a passphrase (`text_keyword`,
/// encoded here), with the entry it came from.
fn key_entry<'a>(
    stanza: &'a Stanza,
    base64_keyword: &str,
    text_keyword: &str,
) -> Option<(String, &'a Entry)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    stanza
        .get(base64_keyword)
        .map(|e| (e.value.clone(), e))
        .or_else(|| {
            stanza
                .get(text_keyword)
                .map(|e| (b64.encode(e.value.as_bytes()), e))
        })
}

fn is_base64_key(value: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    b64.decode(value).is_ok_and(|k| !k.is_empty())
}

/// The GPG notes (a GPG-only stanza is commented out), then `key-base64` and `hmac-key-base64`.
fn convert_keys(src: &Source, out: &mut ClientOut) {
    let stanza = src.stanza;
    let gpg = stanza.entries.iter().any(|e| e.keyword.starts_with("GPG_"));
    let key = key_entry(stanza, "KEY_BASE64", "KEY");
    let hmac = key_entry(stanza, "HMAC_KEY_BASE64", "HMAC_KEY");
    if gpg && key.is_none() {
        out.commented_out = true;
        out.notes.push(format!(
            "{}: GPG-only stanza: not supported. Migrate this client to Rijndael + HMAC: run `fwknop --key-gen`, put KEY_BASE64 and HMAC_KEY_BASE64 here and in its ~/.fwknoprc, and uncomment",
            src.start()
        ));
    } else if gpg {
        out.notes.push(format!(
            "{}: the GPG_* settings are not carried over (GPG is not supported); only the Rijndael key is",
            src.start()
        ));
    }
    convert_key(src, key, out);
    convert_hmac_key(src, hmac, out);
}

fn convert_key(src: &Source, key: Option<(String, &Entry)>, out: &mut ClientOut) {
    match &key {
        Some((value, e)) if is_base64_key(value) => {
            out.lines
                .push(format!("key-base64 = {}", toml_string(value)));
            if e.keyword == "KEY" {
                out.notes.push(format!("{}: KEY (a passphrase) written as key-base64 of the same bytes; consider `fwknop --key-gen` for a random key", src.at(e)));
            }
        }
        Some((value, e)) => {
            out.lines.push("key-base64 = \"\"  # FILL IN".into());
            out.notes.push(format!(
                "{}: {} `{value}` is not base64 (placeholder?); fill in the client's real key",
                src.at(e),
                e.keyword
            ));
        }
        None => out
            .lines
            .push("key-base64 = \"\"  # FILL IN: no KEY in this stanza".into()),
    }
}

fn convert_hmac_key(src: &Source, hmac: Option<(String, &Entry)>, out: &mut ClientOut) {
    match &hmac {
        Some((value, _)) if is_base64_key(value) => {
            out.lines
                .push(format!("hmac-key-base64 = {}", toml_string(value)));
        }
        Some((value, e)) => {
            out.lines.push("hmac-key-base64 = \"\"  # FILL IN".into());
            out.notes.push(format!(
                "{}: {} `{value}` is not base64 (placeholder?); fill in the client's real HMAC key",
                src.at(e),
                e.keyword
            ));
        }
        None => {
            out.lines.push("hmac-key-base64 = \"\"  # FILL IN".into());
            out.notes.push(format!("{}: no HMAC key: fwknopd accepted packets without HMAC, spad does not. Generate one with `fwknop --key-gen` and give the client --use-hmac (or USE_HMAC Y in ~/.fwknoprc)", src.start()));
        }
    }
}

/// `HMAC_DIGEST_TYPE` as `hmac-digest`, when the stanza has one.
fn convert_digest(src: &Source, out: &mut ClientOut) {
    let Some(e) = src.stanza.get("HMAC_DIGEST_TYPE") else {
        return;
    };
    let d = e.value.to_ascii_lowercase();
    if matches!(d.as_str(), "sha1" | "sha256" | "sha384" | "sha512") {
        out.lines.push(format!("hmac-digest = \"{d}\""));
    } else {
        out.lines.push("hmac-digest = \"\"  # FILL IN".into());
        out.notes.push(format!(
            "{}: HMAC_DIGEST_TYPE {} is not supported; use sha256 on both sides",
            src.at(e),
            e.value
        ));
    }
}

/// The stanza's `FW_ACCESS_TIMEOUT`, else the global one; at least 1 s.
fn access_timeout(src: &Source, g: &Global, out: &mut ClientOut) -> u64 {
    match src.stanza.get("FW_ACCESS_TIMEOUT") {
        None => g.access_timeout,
        Some(e) => e.value.parse().unwrap_or_else(|_| {
            out.notes.push(format!(
                "{}: FW_ACCESS_TIMEOUT `{}` is not a number; using {}s",
                src.at(e),
                e.value,
                g.access_timeout
            ));
            g.access_timeout
        }),
    }
    .max(1)
}

/// The stanza's `MAX_FW_TIMEOUT`, when it is a positive number.
fn max_timeout(src: &Source, out: &mut ClientOut) -> Option<u64> {
    src.stanza.get("MAX_FW_TIMEOUT").and_then(|e| {
        e.value.parse::<u64>().ok().filter(|m| *m > 0).or_else(|| {
            out.notes.push(format!(
                "{}: MAX_FW_TIMEOUT `{}` ignored",
                src.at(e),
                e.value
            ));
            None
        })
    })
}

/// The stanza's `FORCE_NAT IP PORT` as the `IP:PORT` to forward to.
fn forward(src: &Source, out: &mut ClientOut) -> Option<String> {
    src.stanza.get("FORCE_NAT").and_then(|e| {
        let mut parts = e.value.split_whitespace();
        match (
            parts.next().map(str::parse::<std::net::Ipv4Addr>),
            parts.next().map(str::parse::<u16>),
        ) {
            (Some(Ok(ip)), Some(Ok(port))) if port != 0 => Some(format!("{ip}:{port}")),
            _ => {
                out.notes.push(format!(
                    "{}: FORCE_NAT `{}` is not `IP PORT`; written without NAT",
                    src.at(e),
                    e.value
                ));
                None
            }
        }
    })
}

/// One service per port of `OPEN_PORTS` (shared with other stanzas that grant alike); returns
/// their names.
fn open_ports(
    src: &Source,
    grant: &Grant,
    services: &mut BTreeMap<String, ServiceOut>,
    out: &mut ClientOut,
) -> Vec<String> {
    let mut wanted: Vec<String> = Vec::new();
    match src.stanza.get("OPEN_PORTS").map(|e| (ports(&e.value), e)) {
        Some((Ok(list), _)) => {
            for port in list {
                let s = ServiceOut {
                    port,
                    timeout: grant.timeout,
                    max_timeout: grant.max_timeout.unwrap_or(grant.timeout).max(grant.timeout),
                    forward: grant.forward.clone(),
                };
                let name = service_name(&s);
                if let Some(existing) = services.get(&name) {
                    if *existing != s {
                        out.notes.push(format!("{}: service `{name}` differs from another stanza's (max-timeout or NAT target); review it", src.start()));
                    }
                } else {
                    services.insert(name.clone(), s);
                }
                wanted.push(name);
            }
        }
        Some((Err(problem), e)) => out.notes.push(format!("{}: OPEN_PORTS {problem}; fill in services", src.at(e))),
        None => out.notes.push(format!("{}: no OPEN_PORTS: fwknopd honoured any requested port, spad opens only listed services; fill in services", src.start())),
    }
    wanted
}

/// The note for a stanza entry the conversion above did not carry over, if it needs one.
fn not_carried_over(e: &Entry) -> Option<String> {
    let note = match e.keyword.as_str() {
        "SOURCE" if e.value.eq_ignore_ascii_case("any") => return None,
        "SOURCE" => format!("SOURCE {}: spad accepts this client's packets from any source address; restrict reachability with a service allow list or an upstream filter if you relied on it", e.value),
        "DESTINATION" if e.value.eq_ignore_ascii_case("any") => return None,
        "DESTINATION" => format!("DESTINATION {}: not carried over", e.value),
        "KEY" | "KEY_BASE64" | "HMAC_KEY" | "HMAC_KEY_BASE64" | "HMAC_DIGEST_TYPE"
        | "FW_ACCESS_TIMEOUT" | "MAX_FW_TIMEOUT" | "OPEN_PORTS" | "FORCE_NAT"
        | "REQUIRE_SOURCE_ADDRESS" | "REQUIRE_SOURCE" => return None,
        k if k.starts_with("GPG_") => return None,
        "RESTRICT_PORTS" => format!("RESTRICT_PORTS {}: not needed, spad opens only the listed services", e.value),
        "ENABLE_CMD_EXEC" | "ENABLE_CMD_SUDO_EXEC" if !yes(&e.value) => return None,
        "ENABLE_CMD_EXEC" | "ENABLE_CMD_SUDO_EXEC" | "CMD_SUDO_EXEC_USER"
        | "CMD_SUDO_EXEC_GROUP" | "CMD_EXEC_USER" | "CMD_EXEC_GROUP" => format!(
            "{} {}: NOT carried over: spad never runs a command a packet asks for",
            e.keyword, e.value
        ),
        "CMD_CYCLE_OPEN" | "CMD_CYCLE_CLOSE" | "CMD_CYCLE_TIMER" => format!(
            "{} {}: NOT carried over: spad opens kernel set elements, not commands",
            e.keyword, e.value
        ),
        "ENCRYPTION_MODE" if e.value.eq_ignore_ascii_case("cbc") => return None,
        "ENCRYPTION_MODE" => format!("ENCRYPTION_MODE {}: only CBC (fwknop's default) is supported; legacy IV clients must move to current keys", e.value),
        "REQUIRE_USERNAME" => format!("REQUIRE_USERNAME {}: not carried over; each client's keys identify it", e.value),
        "ACCESS_EXPIRE" | "ACCESS_EXPIRE_EPOCH" => format!("{} {}: not carried over; remove the stanza when access should end", e.keyword, e.value),
        "FORCE_SNAT" | "FORCE_MASQUERADE" | "DISABLE_DNAT" | "FORWARD_ALL" => format!("{} {}: not carried over", e.keyword, e.value),
        other => format!("{other} {}: unknown to the import, not carried over", e.value),
    };
    Some(note)
}

/// Converts the text of `access.conf` (and optionally `fwknopd.conf`) into TOML.
pub fn convert(access_name: &str, access: &str, fwknopd_conf: Option<(&str, &str)>) -> String {
    let g = global(fwknopd_conf);
    let (stanzas, stray) = stanzas(access_name, access);
    let mut services = BTreeMap::new();
    let clients: Vec<ClientOut> = stanzas
        .iter()
        .map(|s| convert_stanza(s, access_name, &g, &mut services))
        .collect();

    let mut out = String::new();
    write_header(&mut out, access_name, fwknopd_conf);
    for note in g.notes.iter().chain(&stray) {
        let _ = writeln!(out, "# NOTE: {note}");
    }
    write_services(&mut out, &services);
    write_clients(&mut out, access_name, &clients, &stanzas);
    if stanzas.is_empty() {
        let _ = writeln!(out, "\n# NOTE: no SOURCE stanza found: nothing to import.");
    }
    out
}

/// Splits `access.conf` into stanzas (each starts at a SOURCE line); notes on the lines that
/// belong to none.
fn stanzas(access_name: &str, access: &str) -> (Vec<Stanza>, Vec<String>) {
    let mut stanzas: Vec<Stanza> = Vec::new();
    let mut stray = Vec::new();
    for e in entries(access) {
        if e.keyword.starts_with('%') {
            stray.push(format!(
                "{access_name}:{}: {} {} is not followed; import that file too",
                e.line, e.keyword, e.value
            ));
        } else if e.keyword == "SOURCE" {
            stanzas.push(Stanza {
                line: e.line,
                entries: vec![e],
            });
        } else if let Some(s) = stanzas.last_mut() {
            s.entries.push(e);
        } else {
            stray.push(format!(
                "{access_name}:{}: {} before any SOURCE line is ignored by fwknopd too",
                e.line, e.keyword
            ));
        }
    }
    (stanzas, stray)
}

fn write_header(out: &mut String, access_name: &str, fwknopd_conf: Option<(&str, &str)>) {
    let _ = writeln!(
        out,
        "# Generated by `spad import-fwknop` from {access_name}{}.",
        fwknopd_conf
            .map(|(n, _)| format!(" and {n}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "# Add it to spad.toml (next to your [server] section) and run `spad check`."
    );
    let _ = writeln!(
        out,
        "# Lines marked FILL IN make `spad check` fail until you complete them."
    );
}

fn write_services(out: &mut String, services: &BTreeMap<String, ServiceOut>) {
    for (name, s) in services {
        let _ = writeln!(out, "\n[services.{name}]");
        let _ = writeln!(
            out,
            "kind = \"{}\"",
            if s.forward.is_some() {
                "nat"
            } else {
                "management"
            }
        );
        let _ = writeln!(out, "ports = [\"{}/{}\"]", s.port.port, s.port.proto);
        let _ = writeln!(out, "timeout = \"{}s\"", s.timeout);
        if s.max_timeout != s.timeout {
            let _ = writeln!(out, "max-timeout = \"{}s\"", s.max_timeout);
        }
        if let Some(f) = &s.forward {
            let _ = writeln!(out, "forward-to = \"{f}\"");
        }
    }
}

/// One `[fwknop-clients.stanza-N]` per stanza, after its notes; commented out when it cannot
/// be carried over.
fn write_clients(out: &mut String, access_name: &str, clients: &[ClientOut], stanzas: &[Stanza]) {
    for (i, (client, stanza)) in clients.iter().zip(stanzas).enumerate() {
        let _ = writeln!(
            out,
            "\n# From {access_name}:{} (stanza {}).",
            stanza.line,
            i + 1
        );
        for note in &client.notes {
            let _ = writeln!(out, "# NOTE: {note}");
        }
        let prefix = if client.commented_out { "# " } else { "" };
        let _ = writeln!(out, "{prefix}[fwknop-clients.stanza-{}]", i + 1);
        for line in &client.lines {
            let _ = writeln!(out, "{prefix}{line}");
        }
    }
}

/// Reads the files and converts them.
pub fn run(access: &Path, fwknopd_conf: Option<&Path>) -> anyhow::Result<String> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let access_text = read(access)?;
    let conf = match fwknopd_conf {
        Some(p) => Some((p.display().to_string(), read(p)?)),
        None => None,
    };
    Ok(convert(
        &access.display().to_string(),
        &access_text,
        conf.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const SERVER: &str = "[server]\nprivate-key = \"k\"\n";

    /// fwknop's shipped access.conf stanza, with real keys in place of __CHANGEME__.
    const DOCUMENTED: &str = "\
#### fwknopd access.conf stanzas ###

SOURCE              ANY
KEY_BASE64          xcsrgDBeUqPBrTEMD2FgWJelzKvSfKCPjJdxgeMV0d8=
HMAC_KEY_BASE64     DAhvL9Rel3gK9ZviITalrjsL9ef++tbV9M14qKq4z+4LJKa3Ll5j7uH8kjch8PBt5It9nTUpYKFkfx6HF+mT3Q==
OPEN_PORTS          tcp/22, udp/1194
FW_ACCESS_TIMEOUT   60
MAX_FW_TIMEOUT      300
REQUIRE_SOURCE_ADDRESS Y
HMAC_DIGEST_TYPE    SHA512

SOURCE              192.168.10.0/24, 10.1.1.123
KEY                 some passphrase
HMAC_KEY            another passphrase
OPEN_PORTS          tcp/3389
FORCE_NAT           192.168.1.12 3389
ENABLE_CMD_EXEC     Y
CMD_CYCLE_OPEN      iptables -A INPUT -s $SRC -j ACCEPT
CMD_CYCLE_CLOSE     iptables -D INPUT -s $SRC -j ACCEPT
CMD_CYCLE_TIMER     30

SOURCE              ANY
GPG_HOME_DIR        /homedir/path/.gnupg
GPG_DECRYPT_ID      ABCD1234
GPG_DECRYPT_PW      __CHANGEME__
GPG_REQUIRE_SIG     Y
GPG_REMOTE_ID       1234ABCD

SOURCE              ANY
KEY_BASE64          __CHANGEME__
HMAC_KEY_BASE64     __CHANGEME__
";

    #[test]
    fn documented_stanzas_convert_with_notes_and_nothing_silently_dropped() {
        let conf = "FW_ACCESS_TIMEOUT 45\nMAX_SPA_PACKET_AGE 90\nPCAP_FILTER udp port 62201\n";
        let out = convert(
            "/etc/fwknop/access.conf",
            DOCUMENTED,
            Some(("/etc/fwknop/fwknopd.conf", conf)),
        );
        for needle in [
            "[services.fwknop-tcp22-60s]",
            "max-timeout = \"300s\"",
            "[services.fwknop-nat-tcp3389-45s]",
            "forward-to = \"192.168.1.12:3389\"",
            "[fwknop-clients.stanza-1]",
            "hmac-digest = \"sha512\"",
            "require-source-address = true",
            "max-age = \"90s\"",
            "services = [\"fwknop-tcp22-60s\", \"fwknop-udp1194-60s\"]",
            "[fwknop-clients.stanza-2]",
            "key-base64 = \"c29tZSBwYXNzcGhyYXNl\"",
            "SOURCE 192.168.10.0/24, 10.1.1.123: spad accepts",
            "ENABLE_CMD_EXEC Y: NOT carried over",
            "CMD_CYCLE_OPEN iptables -A INPUT -s $SRC -j ACCEPT: NOT carried over",
            "CMD_CYCLE_TIMER 30: NOT carried over",
            "# [fwknop-clients.stanza-3]",
            "GPG-only stanza: not supported",
            "[fwknop-clients.stanza-4]",
            "KEY_BASE64 `__CHANGEME__` is not base64",
            "PCAP_FILTER udp port 62201",
        ] {
            assert!(out.contains(needle), "missing `{needle}` in:\n{out}");
        }
        assert_eq!(out.matches("# From /etc/fwknop/access.conf:").count(), 4);
        // Without the placeholder stanza the result is a valid spad config as it stands.
        let complete = DOCUMENTED
            .split("SOURCE              ANY\nGPG_HOME_DIR")
            .next()
            .unwrap();
        let toml = convert("access.conf", complete, Some(("fwknopd.conf", conf)));
        let config = Config::parse(Path::new("/etc/spad/spad.toml"), &format!("{SERVER}{toml}"))
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(config.fwknop_clients.len(), 2);
        assert_eq!(config.fwknop_clients["stanza-1"].max_age.as_secs(), 90);
        // The placeholder stanza fails closed with a line to fix.
        let err =
            Config::parse(Path::new("/etc/spad/spad.toml"), &format!("{SERVER}{out}")).unwrap_err();
        assert!(err.message.contains("key"), "{err}");
    }

    #[test]
    fn stanzas_without_ports_or_hmac_fail_check_until_filled_in() {
        let text = "SOURCE ANY\nKEY_BASE64 xcsrgDBeUqPBrTEMD2FgWJelzKvSfKCPjJdxgeMV0d8=\n";
        let out = convert("access.conf", text, None);
        assert!(out.contains("no OPEN_PORTS"), "{out}");
        assert!(out.contains("no HMAC key"), "{out}");
        assert!(Config::parse(Path::new("/x/spad.toml"), &format!("{SERVER}{out}")).is_err());
        let out = convert("access.conf", "OPEN_PORTS tcp/22\n%include /etc/x\n", None);
        assert!(out.contains("before any SOURCE"), "{out}");
        assert!(out.contains("%INCLUDE /etc/x is not followed"), "{out}");
        assert!(out.contains("no SOURCE stanza found"), "{out}");
    }
}
