//! RFC 6238 TOTP (the codes Google Authenticator and `oathtool` show) and the versioned
//! derivation of knock ports from a code.
//!
//! Port derivation v1, for a door with first port `F`, a code `C` (the decimal digits as
//! shown, e.g. `"287082"`), a port range `[lo, hi]` and `n` derived ports:
//!
//! ```text
//! for counter = 0, 1, 2, ... (at most 64 tries):
//!     h    = HMAC-SHA256(key = "spa-gateway totp-ports v1", F as u16 BE || C || counter as u8)
//!     port = lo + (u32 BE of h[0..4]) mod (hi - lo + 1)
//!     keep it unless it is F, already chosen, or excluded (the SPA port, other doors' ports,
//!     service ports); stop when n ports are kept
//! sequence = [F, kept ports...]
//! ```
//!
//! Because it depends only on the code, a user can knock from the 6 digits an authenticator app
//! shows; the secret itself never leaves the phone.
//!
//! The RFC 6238 codes and the `otpauth://` URI come from the `totp-rs` crate; the port
//! derivation is ours, and the one-use-per-step rule is the daemon's (`spad::knock`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use totp_rs::TOTP;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// HMAC key of port derivation v1.
pub const DERIVATION_V1_KEY: &[u8] = b"spa-gateway totp-ports v1";
const MAX_TRIES: u8 = 64;

/// TOTP hash algorithm (SHA1 is what every authenticator app supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "SHA1",
            Self::Sha256 => "SHA256",
            Self::Sha512 => "SHA512",
        }
    }

    fn library(self) -> totp_rs::Algorithm {
        match self {
            Self::Sha1 => totp_rs::Algorithm::SHA1,
            Self::Sha256 => totp_rs::Algorithm::SHA256,
            Self::Sha512 => totp_rs::Algorithm::SHA512,
        }
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TotpError {
    #[error("not valid base32 (letters A-Z and digits 2-7, like an authenticator app shows)")]
    Base32,
    #[error("secret is {0} bytes; use at least 10 (16 or 20 recommended)")]
    ShortSecret(usize),
    #[error("port range {0}-{1} has too few usable ports for {2} derived ports")]
    Range(u16, u16, usize),
}

/// A TOTP shared secret: zeroized on drop, compared in constant time, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Secret {
    /// Parses base32 as apps show it: case-insensitive, spaces, dashes and `=` padding ignored.
    pub fn from_base32(text: &str) -> Result<Self, TotpError> {
        let mut cleaned: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '-' | '='))
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let decoded = data_encoding::BASE32_NOPAD.decode(cleaned.as_bytes());
        cleaned.zeroize();
        let bytes = decoded.map_err(|_| TotpError::Base32)?;
        if bytes.len() < 10 {
            return Err(TotpError::ShortSecret(bytes.len()));
        }
        Ok(Self(bytes))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Base32 without padding, as `otpauth://` URIs carry it.
    pub fn to_base32(&self) -> String {
        data_encoding::BASE32_NOPAD.encode(&self.0)
    }
}

/// TOTP parameters (RFC 6238 defaults: SHA1, 30 s, 6 digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub algorithm: Algorithm,
    pub period_secs: u64,
    pub digits: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Sha1,
            period_secs: 30,
            digits: 6,
        }
    }
}

impl Params {
    /// The time step containing `unix_secs`.
    pub fn step(&self, unix_secs: u64) -> u64 {
        unix_secs / self.period_secs.max(1)
    }
}

/// A `totp-rs` generator for `secret`. Built unchecked: secret length (at least 10 bytes) and
/// digits (6-9) are validated here, not by the library. It wipes its copy of the secret on drop.
fn generator(
    secret: &Secret,
    algorithm: Algorithm,
    digits: u32,
    period_secs: u64,
    #[allow(unused_variables)] label: Option<(&str, &str)>,
) -> TOTP {
    let digits = digits.clamp(6, 9) as usize;
    #[cfg(feature = "otpauth")]
    {
        let (issuer, account) = label.map_or((None, String::new()), |(i, a)| {
            (Some(i.to_string()), a.to_string())
        });
        TOTP::new_unchecked(
            algorithm.library(),
            digits,
            0,
            period_secs,
            secret.0.clone(),
            issuer,
            account,
        )
    }
    #[cfg(not(feature = "otpauth"))]
    TOTP::new_unchecked(
        algorithm.library(),
        digits,
        0,
        period_secs,
        secret.0.clone(),
    )
}

/// The code for one time step (RFC 6238), zero-padded to `digits` (6-9).
pub fn code_at_step(secret: &Secret, params: &Params, step: u64) -> String {
    // With a period of one second the library's time argument is the step itself, exactly,
    // for every step (no multiplication that could overflow).
    generator(secret, params.algorithm, params.digits, 1, None).generate(step)
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Where derived ports may fall and which ports they must avoid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    pub low: u16,
    pub high: u16,
    pub count: usize,
    /// Sorted list of ports never to use (SPA port, other doors, service ports).
    pub excluded: Vec<u16>,
}

/// Derives the knock sequence `[first, p1, .., pn]` for one code (derivation v1).
pub fn derive_ports(first: u16, code: &str, rule: &PortRule) -> Result<Vec<u16>, TotpError> {
    let (low, high) = (rule.low.min(rule.high), rule.low.max(rule.high));
    let span = u32::from(high) - u32::from(low) + 1;
    let usable = (low..=high)
        .filter(|p| *p != first && rule.excluded.binary_search(p).is_err())
        .take(rule.count * 2)
        .count();
    // Demand twice as many usable ports as needed, so a sequence is never forced.
    if usable < rule.count * 2 {
        return Err(TotpError::Range(low, high, rule.count));
    }
    let mut ports = vec![first];
    let mut message = Vec::with_capacity(2 + code.len() + 1);
    for counter in 0..MAX_TRIES {
        if ports.len() == rule.count + 1 {
            break;
        }
        message.clear();
        message.extend_from_slice(&first.to_be_bytes());
        message.extend_from_slice(code.as_bytes());
        message.push(counter);
        let digest = hmac_sha256(DERIVATION_V1_KEY, &message);
        let value = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let port = (u32::from(low) + value % span) as u16;
        if !ports.contains(&port) && rule.excluded.binary_search(&port).is_err() {
            ports.push(port);
        }
    }
    if ports.len() != rule.count + 1 {
        return Err(TotpError::Range(low, high, rule.count));
    }
    Ok(ports)
}

/// The `otpauth://totp/ISSUER:ACCOUNT?secret=…&issuer=…` URI that authenticator apps import
/// (as text or QR code); algorithm, digits and period appear when they differ from the defaults.
#[cfg(feature = "otpauth")]
pub fn otpauth_uri(issuer: &str, account: &str, secret: &Secret, params: &Params) -> String {
    generator(
        secret,
        params.algorithm,
        params.digits,
        params.period_secs.max(1),
        Some((issuer, account)),
    )
    .get_url()
}

/// Constant-time comparison of two codes.
pub fn codes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA1, 8 digits, seed "12345678901234567890".
    #[test]
    fn rfc6238_vectors() {
        let sha1 = Secret::from_bytes(b"12345678901234567890".to_vec());
        let sha256 = Secret::from_bytes(b"12345678901234567890123456789012".to_vec());
        let sha512 = Secret::from_bytes(
            b"1234567890123456789012345678901234567890123456789012345678901234".to_vec(),
        );
        let cases: &[(u64, &str, &str, &str)] = &[
            (59, "94287082", "46119246", "90693936"),
            (1111111109, "07081804", "68084774", "25091201"),
            (1111111111, "14050471", "67062674", "99943326"),
            (1234567890, "89005924", "91819424", "93441116"),
            (2000000000, "69279037", "90698825", "38618901"),
            (20000000000, "65353130", "77737706", "47863826"),
        ];
        for &(time, c1, c256, c512) in cases {
            let p = |algorithm| Params {
                algorithm,
                period_secs: 30,
                digits: 8,
            };
            let step = p(Algorithm::Sha1).step(time);
            assert_eq!(code_at_step(&sha1, &p(Algorithm::Sha1), step), c1);
            assert_eq!(code_at_step(&sha256, &p(Algorithm::Sha256), step), c256);
            assert_eq!(code_at_step(&sha512, &p(Algorithm::Sha512), step), c512);
        }
    }

    #[test]
    fn base32_forms() {
        let a = Secret::from_base32("JBSW Y3DP EHPK 3PXP").unwrap();
        let b = Secret::from_base32("jbswy3dpehpk3pxp").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_base32(), "JBSWY3DPEHPK3PXP");
        assert_eq!(
            Secret::from_base32("not*base32").unwrap_err(),
            TotpError::Base32
        );
        assert_eq!(
            Secret::from_base32("JBSWY3DP").unwrap_err(),
            TotpError::ShortSecret(5)
        );
    }

    #[test]
    fn derivation_is_deterministic_distinct_and_avoids_exclusions() {
        let rule = PortRule {
            low: 20000,
            high: 20010,
            count: 3,
            excluded: vec![20001, 20002],
        };
        for code in ["000000", "123456", "999999", "287082"] {
            let ports = derive_ports(40000, code, &rule).unwrap();
            assert_eq!(ports.len(), 4);
            assert_eq!(ports[0], 40000);
            assert_eq!(ports, derive_ports(40000, code, &rule).unwrap());
            let mut sorted = ports.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 4, "{ports:?}");
            assert!(ports[1..].iter().all(|p| (20000..=20010).contains(p)));
            assert!(!ports.contains(&20001) && !ports.contains(&20002));
        }
        assert_ne!(
            derive_ports(40000, "123456", &rule),
            derive_ports(40000, "123457", &rule)
        );
        let tiny = PortRule {
            low: 1,
            high: 2,
            count: 2,
            excluded: vec![],
        };
        assert!(derive_ports(40000, "123456", &tiny).is_err());
    }

    #[cfg(feature = "otpauth")]
    #[test]
    fn uri_shape() {
        let secret = Secret::from_base32("JBSWY3DPEHPK3PXP").unwrap();
        let uri = otpauth_uri("spad gw", "alice@x", &secret, &Params::default());
        assert_eq!(
            uri,
            "otpauth://totp/spad%20gw:alice%40x?secret=JBSWY3DPEHPK3PXP&issuer=spad%20gw"
        );
        let other = Params {
            algorithm: Algorithm::Sha256,
            period_secs: 60,
            digits: 8,
        };
        assert_eq!(
            otpauth_uri("spad", "bob", &secret, &other),
            "otpauth://totp/spad:bob?secret=JBSWY3DPEHPK3PXP&digits=8&algorithm=SHA256&issuer=spad&period=60"
        );
    }

    #[test]
    fn codes_for_extreme_steps_do_not_panic() {
        let secret = Secret::from_bytes(b"12345678901234567890".to_vec());
        for step in [0, 1, u64::MAX / 30, u64::MAX] {
            assert_eq!(code_at_step(&secret, &Params::default(), step).len(), 6);
        }
    }
}
