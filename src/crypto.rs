//! Small, well-reviewed building blocks: the master key and keys derived from it, authenticated
//! encryption of secrets at rest, random tokens, hashing and constant-time comparison.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// Format tag of sealed blobs, so the scheme can change later without ambiguity.
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 24;

/// Errors of this module; deliberately without detail about secret material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the master key must be 32 bytes, base64-encoded (generate one with `openssl rand -base64 32`)")]
    BadMasterKey,
    #[error("encrypted data could not be decrypted: wrong master key or corrupted data")]
    Open,
    #[error("encryption failed")]
    Seal,
}

/// The one secret the operator configures; every other key is derived from it.
#[derive(Clone)]
pub struct MasterKey {
    at_rest: [u8; 32],
    csrf: [u8; 32],
    recovery: [u8; 32],
    links: [u8; 32],
    /// HMAC-SHA256 already keyed with `links` (its inner and outer pads compressed once):
    /// the link MACs run on every proxied request (the bound cookie and its device context),
    /// and each clone of this saves two SHA-256 compressions.
    links_mac: Hmac<Sha256>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.at_rest.zeroize();
        self.csrf.zeroize();
        self.recovery.zeroize();
        self.links.zeroize();
    }
}

/// The master key's bytes from standard or URL-safe base64 (padding optional).
fn decode_key(encoded: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let trimmed = encoded.trim();
    Ok(Zeroizing::new(
        STANDARD
            .decode(trimmed)
            .or_else(|_| URL_SAFE_NO_PAD.decode(trimmed.trim_end_matches('=')))
            .map_err(|_| CryptoError::BadMasterKey)?,
    ))
}

impl MasterKey {
    /// Parses a base64 (standard or URL-safe) encoded 32-byte key.
    pub fn from_base64(encoded: &str) -> Result<Self, CryptoError> {
        let raw = decode_key(encoded)?;
        let bytes: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::BadMasterKey)?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Whether `encoded` (as [`MasterKey::from_base64`] reads it) is a placeholder rather than
    /// random bytes: fewer than 8 different byte values (all zeros, a repeated word), where 32
    /// random bytes hold some 30.
    pub fn is_placeholder(encoded: &str) -> bool {
        decode_key(encoded)
            .is_ok_and(|raw| raw.iter().collect::<std::collections::HashSet<_>>().len() < 8)
    }

    /// Derives the working keys from raw key material (HKDF-SHA256, one label per purpose).
    pub fn from_bytes(ikm: &[u8; 32]) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"portcullis/v1"), ikm);
        let derive = |label: &[u8]| {
            let mut out = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so this cannot fail.
            let _ = hk.expand(label, &mut out);
            out
        };
        let links = derive(b"signed-links");
        Self {
            at_rest: derive(b"at-rest"),
            csrf: derive(b"csrf"),
            recovery: derive(b"recovery-codes"),
            links_mac: keyed(&links),
            links,
        }
    }

    /// A fresh random master key, base64-encoded (used by `portcullis demo`).
    pub fn generate_base64() -> String {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(k.as_mut());
        STANDARD.encode(k.as_ref())
    }

    /// Encrypts `plaintext` with XChaCha20-Poly1305; `context` is bound as associated data so a
    /// blob cannot be moved to another row or purpose.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = XChaCha20Poly1305::new((&self.at_rest).into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Seal)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a blob made by [`MasterKey::seal`] with the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEALED_V1 {
            return Err(CryptoError::Open);
        }
        let cipher = XChaCha20Poly1305::new((&self.at_rest).into());
        let nonce = XNonce::from_slice(&sealed[1..1 + NONCE_LEN]);
        cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad: context.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Open)
    }

    /// MAC for CSRF tokens.
    pub fn csrf_mac(&self, data: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.csrf, data)
    }

    /// Keyed hash of a recovery code: the codes have ~50 bits of entropy, so a plain hash
    /// would be brute-forceable from a database dump; without the master key it is not.
    pub fn recovery_code_hash(&self, normalised_code: &str) -> String {
        hex::encode(hmac_sha256(&self.recovery, normalised_code.as_bytes()))
    }

    /// MAC for signed one-time links (enrolment, "this wasn't me").
    pub fn link_mac(&self, data: &[u8]) -> [u8; 32] {
        self.link_mac_parts(&[data])
    }

    /// [`MasterKey::link_mac`] of the concatenation of `parts`, without building it.
    pub fn link_mac_parts(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.links_mac.clone();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

/// HMAC-SHA256 with a 32-byte key.
pub fn hmac_sha256(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
    hmac_sha256_parts(key, &[data])
}

/// HMAC-SHA256 of the concatenation of `parts`.
pub fn hmac_sha256_parts(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = keyed(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 keyed with `key`. HMAC zero-pads keys shorter than the block, so passing the
/// padded block to the infallible constructor gives the standard result.
fn keyed(key: &[u8; 32]) -> Hmac<Sha256> {
    let mut block = Zeroizing::new([0u8; 64]);
    block[..32].copy_from_slice(key);
    <Hmac<Sha256> as Mac>::new(&(*block).into())
}

/// `n` random bytes from the OS, base64url without padding.
pub fn random_token(n: usize) -> String {
    let mut buf = Zeroizing::new(vec![0u8; n]);
    rand::rngs::OsRng.fill_bytes(buf.as_mut_slice());
    URL_SAFE_NO_PAD.encode(buf.as_slice())
}

/// Hex SHA-256, used to store lookup keys (session ids) instead of the secrets themselves.
///
/// (On every proxied request, for the session's storage key: written into a fixed buffer rather
/// than collected character by character.)
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut out = [0u8; 64];
    if hex::encode_to_slice(digest, &mut out).is_ok() {
        if let Ok(text) = std::str::from_utf8(&out) {
            return text.to_owned();
        }
    }
    hex::encode(digest)
}

/// Constant-time equality for secrets of possibly different lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_bytes(&[7u8; 32])
    }

    /// The pre-keyed link MAC is HMAC-SHA256 under the links key, whatever was MACed before
    /// (RFC 4231 test case 2 for the HMAC itself).
    #[test]
    fn link_macs_are_plain_hmac_sha256() {
        let k = key();
        for data in [&b""[..], b"x", &[0xAB; 200]] {
            assert_eq!(k.link_mac(data), hmac_sha256(&k.links, data));
            assert_eq!(k.link_mac(data), k.link_mac_parts(&[data]));
        }
        assert_eq!(
            k.link_mac_parts(&[b"ab", b"c"]),
            hmac_sha256(&k.links, b"abc")
        );
        let mut jefe = [0u8; 32];
        jefe[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex::encode(hmac_sha256(&jefe, b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn sealed_blob_round_trips_only_in_its_context() {
        let k = key();
        let blob = k.seal("totp:user-1", b"JBSWY3DPEHPK3PXP").unwrap();
        assert!(!blob.windows(16).any(|w| w == b"JBSWY3DPEHPK3PXP"));
        assert_eq!(
            k.open("totp:user-1", &blob).unwrap().as_slice(),
            b"JBSWY3DPEHPK3PXP"
        );
        assert!(
            k.open("totp:user-2", &blob).is_err(),
            "blob moved to another user"
        );
        let other = MasterKey::from_bytes(&[8u8; 32]);
        assert!(
            other.open("totp:user-1", &blob).is_err(),
            "wrong master key"
        );
        let mut tampered = blob.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(k.open("totp:user-1", &tampered).is_err());
        assert!(k.open("totp:user-1", &[1, 2, 3]).is_err());
    }

    #[test]
    fn master_key_parsing() {
        let b64 = MasterKey::generate_base64();
        assert!(MasterKey::from_base64(&b64).is_ok());
        assert!(MasterKey::from_base64("c2hvcnQ=").is_err());
        assert!(MasterKey::from_base64("not base64 at all!").is_err());
        assert_eq!(format!("{:?}", key()), "MasterKey([redacted])");
    }

    #[test]
    fn sha256_hex_is_the_lowercase_hex_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_hex(b"abc"), hex::encode(Sha256::digest(b"abc")));
    }

    #[test]
    fn derived_keys_differ_by_purpose() {
        let k = key();
        assert_ne!(k.csrf_mac(b"x"), k.link_mac(b"x"));
        assert_ne!(
            k.recovery_code_hash("abc"),
            key_other().recovery_code_hash("abc")
        );
    }

    fn key_other() -> MasterKey {
        MasterKey::from_bytes(&[9u8; 32])
    }

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert_eq!(random_token(32).len(), 43);
        assert_ne!(random_token(32), random_token(32));
    }
}
