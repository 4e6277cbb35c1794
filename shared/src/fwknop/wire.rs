//! The outer layer of a fwknop packet: base64 shape, HMAC, OpenSSL-salted AES-256-CBC.
//!
//! Order of work on a received datagram, cheapest first: [`precheck`] (length and alphabet, no
//! key), [`authenticate`] (one HMAC per configured client, compared as base64 text in constant
//! time), and only for an authenticated packet [`decrypt`]. Key and IV come from the key and the
//! salt by OpenSSL's `EVP_BytesToKey` with MD5 and one round, as libfko does outside its legacy
//! IV mode.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use hmac::{Mac, SimpleHmac};
use md5::Digest;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::message::{self, Message};
use super::FwknopError;

/// Base64 of `Salted__`'s first 7.5 bytes: always the same, so libfko strips it on the wire.
pub const SALTED_PREFIX: &[u8] = b"U2FsdGVkX1";
/// The largest datagram fwknop sends (its `MAX_SPA_PACKET_LEN`).
pub const MAX_DATAGRAM: usize = 1500;
/// Shortest ciphertext text: salt header plus one AES block is 32 bytes, 43 base64 characters,
/// of which the 10-character prefix is not sent.
pub const MIN_CIPHERTEXT_TEXT: usize = 33;
/// libfko calls ciphertext of this many base64 characters or more GPG (`MIN_GNUPG_MSG_SIZE`).
pub const GPG_MIN_TEXT: usize = 400;

/// Unpadded standard base64 that also reads padded input and ignores unused trailing bits, as
/// libfko's decoder does. Only used on data that is authenticated or inside the ciphertext.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);
/// Unpadded base64 as libfko writes it (`=` stripped).
pub(crate) const UNPADDED: GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

pub(crate) fn b64_decode(text: &[u8]) -> Option<Vec<u8>> {
    LENIENT.decode(text).ok()
}

/// The HMAC algorithm of a fwknop client (`HMAC_DIGEST_TYPE`, `--hmac-digest-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HmacDigest {
    Sha1,
    #[default]
    Sha256,
    Sha384,
    Sha512,
}

impl HmacDigest {
    /// Length of the unpadded base64 HMAC at the end of the datagram.
    pub fn b64_len(self) -> usize {
        match self {
            HmacDigest::Sha1 => 27,
            HmacDigest::Sha256 => 43,
            HmacDigest::Sha384 => 64,
            HmacDigest::Sha512 => 86,
        }
    }

    /// Parses the names fwknop uses (`sha256`, `SHA256`, …).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Some(HmacDigest::Sha1),
            "sha256" => Some(HmacDigest::Sha256),
            "sha384" => Some(HmacDigest::Sha384),
            "sha512" => Some(HmacDigest::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HmacDigest::Sha1 => "sha1",
            HmacDigest::Sha256 => "sha256",
            HmacDigest::Sha384 => "sha384",
            HmacDigest::Sha512 => "sha512",
        }
    }
}

/// One fwknop client's shared secrets, zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    encryption: Zeroizing<Vec<u8>>,
    hmac: Zeroizing<Vec<u8>>,
    digest: HmacDigest,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys(.., hmac {})", self.digest.name())
    }
}

/// The longest key libfko accepts (`MAX_KEY_LEN`, and the HMAC block limit).
pub const MAX_KEY_LEN: usize = 128;

impl Keys {
    /// Keys as raw bytes (what `KEY_BASE64` / `HMAC_KEY_BASE64` decode to).
    pub fn new(
        encryption: Vec<u8>,
        hmac: Vec<u8>,
        digest: HmacDigest,
    ) -> Result<Self, &'static str> {
        let (encryption, hmac) = (Zeroizing::new(encryption), Zeroizing::new(hmac));
        if encryption.is_empty() || encryption.len() > MAX_KEY_LEN {
            return Err("the encryption key must be 1-128 bytes");
        }
        if hmac.is_empty() || hmac.len() > MAX_KEY_LEN {
            return Err("the HMAC key must be 1-128 bytes");
        }
        Ok(Self {
            encryption,
            hmac,
            digest,
        })
    }

    pub fn digest(&self) -> HmacDigest {
        self.digest
    }
}

/// Cheap shape check before any key is used: length and base64 alphabet, and no salted prefix
/// (libfko never sends it; an attacker may prepend it to a seen packet to dodge a replay check).
pub fn precheck(datagram: &[u8]) -> Result<(), FwknopError> {
    if datagram.len() < MIN_CIPHERTEXT_TEXT || datagram.len() > MAX_DATAGRAM {
        return Err(FwknopError::NotFwknop("length out of range"));
    }
    if !datagram
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
    {
        return Err(FwknopError::NotFwknop("not unpadded base64 text"));
    }
    if datagram.starts_with(SALTED_PREFIX) {
        return Err(FwknopError::NotFwknop(
            "starts with the salted prefix no client sends",
        ));
    }
    Ok(())
}

/// Unpadded base64 HMAC of `SALTED_PREFIX || ciphertext_text` into `out`; returns its length.
fn hmac_b64(keys: &Keys, ciphertext_text: &[u8], out: &mut [u8; 88]) -> usize {
    fn run<D>(key: &[u8], text: &[u8], out: &mut [u8; 88]) -> usize
    where
        D: Digest + hmac::digest::core_api::BlockSizeUser,
    {
        let mut mac = <SimpleHmac<D> as Mac>::new_from_slice(key).expect("HMAC takes any key");
        mac.update(SALTED_PREFIX);
        mac.update(text);
        let tag = mac.finalize().into_bytes();
        UNPADDED
            .encode_slice(tag, out)
            .expect("88 bytes hold a SHA-512 tag in base64")
    }
    match keys.digest {
        HmacDigest::Sha1 => run::<sha1::Sha1>(&keys.hmac, ciphertext_text, out),
        HmacDigest::Sha256 => run::<sha2::Sha256>(&keys.hmac, ciphertext_text, out),
        HmacDigest::Sha384 => run::<sha2::Sha384>(&keys.hmac, ciphertext_text, out),
        HmacDigest::Sha512 => run::<sha2::Sha512>(&keys.hmac, ciphertext_text, out),
    }
}

/// Verifies the trailing HMAC with `keys`, in constant time over the base64 text, and returns
/// the ciphertext text it covers. Nothing is decrypted before this succeeds.
pub fn authenticate<'a>(datagram: &'a [u8], keys: &Keys) -> Result<&'a [u8], FwknopError> {
    let tag_len = keys.digest.b64_len();
    if datagram.len() < tag_len + MIN_CIPHERTEXT_TEXT {
        return Err(FwknopError::NoHmacMatch);
    }
    let (ciphertext_text, tag) = datagram.split_at(datagram.len() - tag_len);
    let mut expected = [0u8; 88];
    let n = hmac_b64(keys, ciphertext_text, &mut expected);
    if bool::from(expected[..n].ct_eq(tag)) {
        Ok(ciphertext_text)
    } else {
        Err(FwknopError::NoHmacMatch)
    }
}

/// OpenSSL `EVP_BytesToKey(AES-256-CBC, MD5, salt, key, 1 round)`: 32-byte key, 16-byte IV.
fn key_and_iv(key: &[u8], salt: &[u8]) -> Zeroizing<[u8; 48]> {
    let mut out = Zeroizing::new([0u8; 48]);
    let mut previous: Option<[u8; 16]> = None;
    for chunk in out.chunks_mut(16) {
        let mut md5 = md5::Md5::new();
        if let Some(p) = previous {
            md5.update(p);
        }
        md5.update(key);
        md5.update(salt);
        let d: [u8; 16] = md5.finalize().into();
        chunk.copy_from_slice(&d);
        previous = Some(d);
    }
    out
}

type Decryptor = cbc::Decryptor<aes::Aes256>;
type Encryptor = cbc::Encryptor<aes::Aes256>;

/// Decrypts authenticated ciphertext text into the inner message bytes.
pub fn decrypt(ciphertext_text: &[u8], keys: &Keys) -> Result<Zeroizing<Vec<u8>>, FwknopError> {
    if ciphertext_text.len() >= GPG_MIN_TEXT {
        return Err(FwknopError::Gpg);
    }
    let mut text = Vec::with_capacity(SALTED_PREFIX.len() + ciphertext_text.len());
    text.extend_from_slice(SALTED_PREFIX);
    text.extend_from_slice(ciphertext_text);
    let raw = b64_decode(&text).ok_or(FwknopError::Malformed("ciphertext is not base64"))?;
    let mut raw = Zeroizing::new(raw);
    if raw.len() < 32 || (raw.len() - 16) % 16 != 0 || &raw[..8] != b"Salted__" {
        return Err(FwknopError::Malformed("ciphertext is not whole AES blocks"));
    }
    let kiv = key_and_iv(&keys.encryption, &raw[8..16]);
    let decryptor = Decryptor::new_from_slices(&kiv[..32], &kiv[32..]).expect("sizes are fixed");
    let plain = decryptor
        .decrypt_padded_mut::<Pkcs7>(&mut raw[16..])
        .map_err(|_| FwknopError::Decrypt)?;
    Ok(Zeroizing::new(plain.to_vec()))
}

/// Authenticates, decrypts and parses one datagram for one client.
pub fn open(datagram: &[u8], keys: &Keys) -> Result<Message, FwknopError> {
    let ciphertext_text = authenticate(datagram, keys)?;
    let plain = decrypt(ciphertext_text, keys)?;
    message::parse(&plain)
}

/// For the log only, after no client's HMAC matched: does this datagram decrypt and parse as a
/// packet without HMAC under `keys`? Never grants anything.
pub fn is_without_hmac(datagram: &[u8], keys: &Keys) -> bool {
    // Cheap first: one AES block. A libfko message starts with its 16 random digits.
    if datagram.len() < MIN_CIPHERTEXT_TEXT || datagram.len() >= GPG_MIN_TEXT {
        return false;
    }
    let mut head = SALTED_PREFIX.to_vec();
    head.extend_from_slice(&datagram[..MIN_CIPHERTEXT_TEXT]);
    let Some(raw) = b64_decode(&head) else {
        return false;
    };
    if raw.len() < 32 || &raw[..8] != b"Salted__" {
        return false;
    }
    let kiv = key_and_iv(&keys.encryption, &raw[8..16]);
    let mut decryptor =
        Decryptor::new_from_slices(&kiv[..32], &kiv[32..]).expect("sizes are fixed");
    let mut block = aes::Block::clone_from_slice(&raw[16..32]);
    decryptor.decrypt_block_mut(&mut block);
    if !block.iter().all(u8::is_ascii_digit) {
        return false;
    }
    decrypt(datagram, keys).is_ok_and(|plain| message::parse(&plain).is_ok())
}

/// What [`seal`] needs besides the message: the random parts a real client draws.
#[derive(Debug, Clone, Copy)]
pub struct SealParams {
    pub salt: [u8; 8],
    /// Whether to append the HMAC (`--use-hmac`).
    pub hmac: bool,
}

/// Builds a datagram as libfko does (SHA-256 inner digest). For tests and benchmarks.
pub fn seal(message: &Message, keys: &Keys, params: SealParams) -> String {
    let plain = Zeroizing::new(message::encode_with_digest(message));
    let kiv = key_and_iv(&keys.encryption, &params.salt);
    let encryptor = Encryptor::new_from_slices(&kiv[..32], &kiv[32..]).expect("sizes are fixed");
    let mut raw = b"Salted__".to_vec();
    raw.extend_from_slice(&params.salt);
    raw.extend_from_slice(&encryptor.encrypt_padded_vec_mut::<Pkcs7>(plain.as_bytes()));
    let text = UNPADDED.encode(raw);
    let mut out = text[SALTED_PREFIX.len()..].to_string();
    if params.hmac {
        let mut tag = [0u8; 88];
        let n = hmac_b64(keys, out.as_bytes(), &mut tag);
        out.push_str(std::str::from_utf8(&tag[..n]).expect("base64 is ASCII"));
    }
    out
}
