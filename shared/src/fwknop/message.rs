//! The inner fwknop message: colon-separated text, checked by its own trailing digest.
//!
//! `random:b64(user):timestamp:version:type:b64(access)[:b64(nat)][:b64(server-auth)][:timeout]:digest`
//! where `access` is `a.b.c.d,tcp/22[,udp/53…]`, `nat` is `a.b.c.d,port`, `timeout` is present
//! only for the client-timeout message types, and `digest` is the unpadded base64 MD5, SHA-1,
//! SHA-256, SHA-384 or SHA-512 (told apart by length) of everything before its colon.

use std::net::Ipv4Addr;

use base64::Engine;
use sha2::Digest;

use super::wire::{b64_decode, UNPADDED};
use super::FwknopError;

/// libfko's message types, by their number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Command = 0,
    Access = 1,
    NatAccess = 2,
    ClientTimeoutAccess = 3,
    ClientTimeoutNatAccess = 4,
    LocalNatAccess = 5,
    ClientTimeoutLocalNatAccess = 6,
}

impl MessageType {
    fn from_number(n: u8) -> Option<Self> {
        Some(match n {
            0 => Self::Command,
            1 => Self::Access,
            2 => Self::NatAccess,
            3 => Self::ClientTimeoutAccess,
            4 => Self::ClientTimeoutNatAccess,
            5 => Self::LocalNatAccess,
            6 => Self::ClientTimeoutLocalNatAccess,
            _ => return None,
        })
    }

    /// Carries a NAT field (`-N` or `--nat-local`).
    pub fn has_nat(self) -> bool {
        matches!(
            self,
            Self::NatAccess
                | Self::ClientTimeoutNatAccess
                | Self::LocalNatAccess
                | Self::ClientTimeoutLocalNatAccess
        )
    }

    /// `--nat-local`: forward to a port of the gateway itself.
    pub fn is_local_nat(self) -> bool {
        matches!(
            self,
            Self::LocalNatAccess | Self::ClientTimeoutLocalNatAccess
        )
    }

    /// Carries a client timeout (`-f`).
    pub fn has_timeout(self) -> bool {
        matches!(
            self,
            Self::ClientTimeoutAccess
                | Self::ClientTimeoutNatAccess
                | Self::ClientTimeoutLocalNatAccess
        )
    }

    fn for_parts(nat: bool, local: bool, timeout: bool) -> Self {
        match (nat, local, timeout) {
            (false, _, false) => Self::Access,
            (false, _, true) => Self::ClientTimeoutAccess,
            (true, false, false) => Self::NatAccess,
            (true, false, true) => Self::ClientTimeoutNatAccess,
            (true, true, false) => Self::LocalNatAccess,
            (true, true, true) => Self::ClientTimeoutLocalNatAccess,
        }
    }
}

/// A protocol an access request may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One `proto/port` of the access request (`-A tcp/22`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub proto: Proto,
    pub port: u16,
}

/// The `-N internal:port` (or `--nat-local`) target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatTarget {
    pub address: Ipv4Addr,
    pub port: u16,
}

/// A decoded, digest-checked access request. Command messages never get this far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The 16 random digits that make each packet unique.
    pub random: String,
    pub user: String,
    /// Seconds since the UNIX epoch, from the client's clock.
    pub timestamp: u64,
    pub version: String,
    pub kind: MessageType,
    /// The address to open for (`-a`/`-R`); `0.0.0.0` (`-s`) means the packet's source.
    pub allow_ip: Ipv4Addr,
    pub access: Vec<Access>,
    pub nat: Option<NatTarget>,
    /// `-f` seconds, for the client-timeout message types.
    pub client_timeout: Option<u32>,
}

impl Message {
    /// A plain access request (for tests and examples).
    pub fn access(timestamp: u64, allow_ip: Ipv4Addr, access: Vec<Access>) -> Self {
        Self {
            random: "1234567890123456".into(),
            user: "root".into(),
            timestamp,
            version: "3.0.0".into(),
            kind: MessageType::Access,
            allow_ip,
            access,
            nat: None,
            client_timeout: None,
        }
    }

    /// Sets the NAT target and timeout and fixes `kind` to match.
    pub fn with(mut self, nat: Option<NatTarget>, local: bool, timeout: Option<u32>) -> Self {
        self.kind = MessageType::for_parts(nat.is_some(), local, timeout.is_some());
        self.nat = nat;
        self.client_timeout = timeout;
        self
    }
}

const MAX_USER: usize = 64;

fn text_field(field: &str) -> Result<String, FwknopError> {
    let bytes =
        b64_decode(field.as_bytes()).ok_or(FwknopError::Malformed("field is not base64"))?;
    let text = String::from_utf8(bytes).map_err(|_| FwknopError::Malformed("field is not text"))?;
    if text.is_empty() || !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(FwknopError::Malformed("field is empty or not printable"));
    }
    Ok(text)
}

fn number<T: std::str::FromStr>(field: &str, what: &'static str) -> Result<T, FwknopError> {
    if field.is_empty() || field.len() > 20 || !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FwknopError::Malformed(what));
    }
    field.parse().map_err(|_| FwknopError::Malformed(what))
}

fn port(text: &str) -> Result<u16, FwknopError> {
    match number::<u16>(text, "port is not a number 1-65535")? {
        0 => Err(FwknopError::Malformed("port 0")),
        p => Ok(p),
    }
}

fn address(text: &str) -> Result<Ipv4Addr, FwknopError> {
    text.parse()
        .map_err(|_| FwknopError::Malformed("address is not a dotted IPv4 address"))
}

/// `a.b.c.d,proto/port[,proto/port…]`
fn parse_access(text: &str) -> Result<(Ipv4Addr, Vec<Access>), FwknopError> {
    let mut parts = text.split(',');
    let ip = address(parts.next().unwrap_or_default())?;
    let mut access = Vec::new();
    for spec in parts {
        let (proto, number) = spec
            .split_once('/')
            .ok_or(FwknopError::Malformed("access is not proto/port"))?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => return Err(FwknopError::Protocol(other.chars().take(16).collect())),
        };
        access.push(Access {
            proto,
            port: port(number)?,
        });
    }
    if access.is_empty() {
        return Err(FwknopError::Malformed("access request names no port"));
    }
    if access.len() > 32 {
        return Err(FwknopError::Malformed("more than 32 ports requested"));
    }
    Ok((ip, access))
}

fn inner_digest_ok(body: &str, digest: &str) -> Result<(), FwknopError> {
    let computed = match digest.len() {
        22 => UNPADDED.encode(md5::Md5::digest(body)),
        27 => UNPADDED.encode(sha1::Sha1::digest(body)),
        43 => UNPADDED.encode(sha2::Sha256::digest(body)),
        64 => UNPADDED.encode(sha2::Sha384::digest(body)),
        86 => UNPADDED.encode(sha2::Sha512::digest(body)),
        _ => return Err(FwknopError::Malformed("digest has no known length")),
    };
    if computed == digest {
        Ok(())
    } else {
        Err(FwknopError::Digest)
    }
}

/// Parses decrypted bytes. Refuses command messages and server-auth fields.
pub fn parse(plain: &[u8]) -> Result<Message, FwknopError> {
    if !plain.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(FwknopError::Malformed("not printable text"));
    }
    let text = std::str::from_utf8(plain).map_err(|_| FwknopError::Malformed("not text"))?;
    let (body, digest) = text
        .rsplit_once(':')
        .ok_or(FwknopError::Malformed("no digest field"))?;
    inner_digest_ok(body, digest)?;
    let fields: Vec<&str> = body.split(':').collect();
    if fields.len() < 6 {
        return Err(FwknopError::Malformed("fewer than 7 fields"));
    }
    let random = fields[0];
    if random.len() < 16 || random.len() > 32 || !random.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FwknopError::Malformed("random value is not 16-32 digits"));
    }
    let user = text_field(fields[1])?;
    if user.len() > MAX_USER || user.contains(':') {
        return Err(FwknopError::Malformed("user name too long"));
    }
    let timestamp: u64 = number(fields[2], "timestamp is not a number")?;
    let version = fields[3];
    if version.is_empty() || version.len() > 8 {
        return Err(FwknopError::Malformed("version field"));
    }
    let kind = MessageType::from_number(number(fields[4], "message type is not a number")?)
        .ok_or(FwknopError::Malformed("unknown message type"))?;
    if kind == MessageType::Command {
        return Err(FwknopError::Command);
    }
    let (allow_ip, access) = parse_access(&text_field(fields[5])?)?;
    let mut rest = &fields[6..];
    let nat = if kind.has_nat() {
        let (first, tail) = rest
            .split_first()
            .ok_or(FwknopError::Malformed("NAT message without NAT field"))?;
        rest = tail;
        let nat = text_field(first)?;
        let (ip, number) = nat
            .split_once(',')
            .ok_or(FwknopError::Malformed("NAT field is not address,port"))?;
        if access.len() != 1 {
            return Err(FwknopError::Malformed(
                "a NAT request names exactly one public port",
            ));
        }
        Some(NatTarget {
            address: address(ip)?,
            port: port(number)?,
        })
    } else {
        None
    };
    let client_timeout = if kind.has_timeout() {
        let (last, before) = rest.split_last().ok_or(FwknopError::Malformed(
            "client-timeout message without timeout",
        ))?;
        rest = before;
        Some(number::<u32>(last, "client timeout is not a number")?)
    } else {
        None
    };
    match rest {
        [] => {}
        [_server_auth] => return Err(FwknopError::ServerAuth),
        _ => return Err(FwknopError::Malformed("too many fields")),
    }
    Ok(Message {
        random: random.to_string(),
        user,
        timestamp,
        version: version.to_string(),
        kind,
        allow_ip,
        access,
        nat,
        client_timeout,
    })
}

/// The message fields as libfko encodes them, without the trailing digest.
pub fn encode(m: &Message) -> String {
    let specs: Vec<String> = m
        .access
        .iter()
        .map(|a| format!("{}/{}", a.proto.name(), a.port))
        .collect();
    let mut out = format!(
        "{}:{}:{}:{}:{}:{}",
        m.random,
        UNPADDED.encode(&m.user),
        m.timestamp,
        m.version,
        m.kind as u8,
        UNPADDED.encode(format!("{},{}", m.allow_ip, specs.join(",")))
    );
    if let Some(nat) = m.nat {
        out.push(':');
        out.push_str(&UNPADDED.encode(format!("{},{}", nat.address, nat.port)));
    }
    if let Some(t) = m.client_timeout {
        out.push_str(&format!(":{t}"));
    }
    out
}

/// The full plaintext as libfko encrypts it: the fields, a colon and their SHA-256 digest.
pub fn encode_with_digest(m: &Message) -> String {
    let body = encode(m);
    let digest = UNPADDED.encode(sha2::Sha256::digest(body.as_bytes()));
    format!("{body}:{digest}")
}
