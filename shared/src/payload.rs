//! The request carried inside the encrypted handshake: what the client asks for.
//!
//! ```text
//! offset size  field
//! 0      1     version (1)
//! 1      1     kind: 1 = open, 2 = close
//! 2      8     timestamp, microseconds since the UNIX epoch, big-endian
//! 10     16    random nonce
//! 26     4     requested duration in seconds, big-endian (0 = the service's default)
//! 30     1     address family of an explicit address to grant: 0 none, 4 IPv4, 6 IPv6
//! 31     0/4/16 the explicit address
//! ..     1     number of services, 1..=16
//! ..           per service: 1 byte length (1..=32) and the name ([a-z0-9_-])
//! ..           zero padding up to a multiple of 32 bytes (hides name lengths)
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::reader::Reader;
use crate::Micros;

/// Payload format version written by this crate.
pub const VERSION: u8 = 1;
/// Most services one request may name.
pub const MAX_SERVICES: usize = 16;
/// Longest service name.
pub const MAX_NAME_LEN: usize = 32;
/// Padding granularity.
pub const PAD_TO: usize = 32;

/// Open or close access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Open,
    Close,
}

/// One decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub timestamp: Micros,
    pub nonce: [u8; 16],
    /// Requested duration in seconds; 0 means "the service's default".
    pub duration_secs: u32,
    /// Address to grant instead of the packet's source (only if policy allows it).
    pub address: Option<IpAddr>,
    pub services: Vec<String>,
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload truncated")]
    Truncated,
    #[error("unsupported payload version {0}")]
    Version(u8),
    #[error("unknown request kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("service count {0} is not 1..={MAX_SERVICES}")]
    ServiceCount(usize),
    #[error("service name is not 1..={MAX_NAME_LEN} bytes of [a-z0-9_-]")]
    ServiceName,
    #[error("non-zero bytes after the last field")]
    Trailing,
}

/// Whether `name` is a valid service name on the wire (and in config).
pub fn valid_service_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Request {
    /// Encodes the request. Fails only if the services break the limits above.
    pub fn encode(&self) -> Result<Vec<u8>, PayloadError> {
        if self.services.is_empty() || self.services.len() > MAX_SERVICES {
            return Err(PayloadError::ServiceCount(self.services.len()));
        }
        let mut out = Vec::with_capacity(96);
        out.push(VERSION);
        out.push(match self.kind {
            Kind::Open => 1,
            Kind::Close => 2,
        });
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.duration_secs.to_be_bytes());
        match self.address {
            None => out.push(0),
            Some(IpAddr::V4(v4)) => {
                out.push(4);
                out.extend_from_slice(&v4.octets());
            }
            Some(IpAddr::V6(v6)) => {
                out.push(6);
                out.extend_from_slice(&v6.octets());
            }
        }
        out.push(self.services.len() as u8);
        for name in &self.services {
            if !valid_service_name(name) {
                return Err(PayloadError::ServiceName);
            }
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
        }
        let padded = out.len().div_ceil(PAD_TO) * PAD_TO;
        out.resize(padded, 0);
        Ok(out)
    }

    /// Decodes a payload; never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let mut reader = Reader::new(bytes);
        let t = || PayloadError::Truncated;
        let version = reader.byte().ok_or_else(t)?;
        if version != VERSION {
            return Err(PayloadError::Version(version));
        }
        let kind = match reader.byte().ok_or_else(t)? {
            1 => Kind::Open,
            2 => Kind::Close,
            other => return Err(PayloadError::Kind(other)),
        };
        let timestamp = u64::from_be_bytes(reader.array().ok_or_else(t)?);
        let nonce = reader.array().ok_or_else(t)?;
        let duration_secs = u32::from_be_bytes(reader.array().ok_or_else(t)?);
        let address = match reader.byte().ok_or_else(t)? {
            0 => None,
            4 => Some(IpAddr::V4(Ipv4Addr::from(
                reader.array::<4>().ok_or_else(t)?,
            ))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(
                reader.array::<16>().ok_or_else(t)?,
            ))),
            other => return Err(PayloadError::Family(other)),
        };
        let count = reader.byte().ok_or_else(t)? as usize;
        if count == 0 || count > MAX_SERVICES {
            return Err(PayloadError::ServiceCount(count));
        }
        let mut services = Vec::with_capacity(count);
        for _ in 0..count {
            let len = reader.byte().ok_or_else(t)? as usize;
            let name = std::str::from_utf8(reader.take(len).ok_or_else(t)?)
                .map_err(|_| PayloadError::ServiceName)?;
            if !valid_service_name(name) {
                return Err(PayloadError::ServiceName);
            }
            services.push(name.to_owned());
        }
        if reader.rest().iter().any(|&b| b != 0) {
            return Err(PayloadError::Trailing);
        }
        Ok(Self {
            kind,
            timestamp,
            nonce,
            duration_secs,
            address,
            services,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Request {
        Request {
            kind: Kind::Open,
            timestamp: 1_700_000_000_123_456,
            nonce: [9u8; 16],
            duration_secs: 300,
            address: Some("2001:db8::7".parse().unwrap()),
            services: vec!["ssh".into(), "vpn".into()],
        }
    }

    #[test]
    fn round_trip_and_padding() {
        let encoded = sample().encode().unwrap();
        assert_eq!(encoded.len() % PAD_TO, 0);
        assert_eq!(Request::decode(&encoded).unwrap(), sample());
    }

    #[test]
    fn refusals() {
        let mut bad = sample();
        bad.services = vec!["Bad Name".into()];
        assert_eq!(bad.encode().unwrap_err(), PayloadError::ServiceName);
        bad.services = vec![];
        assert_eq!(bad.encode().unwrap_err(), PayloadError::ServiceCount(0));
        let mut encoded = sample().encode().unwrap();
        *encoded.last_mut().unwrap() = 1;
        assert_eq!(
            Request::decode(&encoded).unwrap_err(),
            PayloadError::Trailing
        );
        encoded[0] = 2;
        assert_eq!(
            Request::decode(&encoded).unwrap_err(),
            PayloadError::Version(2)
        );
        assert_eq!(Request::decode(&[]).unwrap_err(), PayloadError::Truncated);
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            any::<bool>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<u32>(),
            prop_oneof![
                Just(None),
                any::<[u8; 4]>().prop_map(|b| Some(IpAddr::from(b))),
                any::<[u8; 16]>().prop_map(|b| Some(IpAddr::from(b))),
            ],
            prop::collection::vec("[a-z0-9_-]{1,32}", 1..=MAX_SERVICES),
        )
            .prop_map(
                |(open, timestamp, nonce, duration_secs, address, services)| Request {
                    kind: if open { Kind::Open } else { Kind::Close },
                    timestamp,
                    nonce,
                    duration_secs,
                    address,
                    services,
                },
            )
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(request in arb_request()) {
            let encoded = request.encode().unwrap();
            prop_assert_eq!(encoded.len() % PAD_TO, 0);
            prop_assert_eq!(Request::decode(&encoded).unwrap(), request);
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = Request::decode(&bytes);
        }
    }
}
