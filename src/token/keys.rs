//! Signing keys: generation, sealing at rest, opening, their public JWKs and the in-memory ring.
//!
//! The public JWK is always derived from the private key, never copied from storage, so the
//! JWKS cannot carry anything but public components and a tampered `public_jwk` column is
//! detected instead of published.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::TokenError;
use crate::clock::UnixTime;
use crate::config::TokenAlgorithm;
use crate::crypto::MasterKey;
use crate::store::SigningKeyRecord;

/// The public half of a signing key as published in the JWKS. A closed struct: there is no
/// field a private component could end up in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PublicJwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

/// A signing key opened for use.
pub(crate) struct LoadedKey {
    pub kid: String,
    pub alg: Algorithm,
    pub created_at: UnixTime,
    pub encoding: EncodingKey,
    pub public: PublicJwk,
}

/// The sealing context binds a blob to its kid, so blobs cannot be swapped between rows.
fn seal_context(kid: &str) -> String {
    format!("signing-key:{kid}")
}

fn crypto(msg: impl Into<String>) -> TokenError {
    TokenError::Crypto(msg.into())
}

fn jose_alg(alg: TokenAlgorithm) -> Algorithm {
    match alg {
        TokenAlgorithm::EdDSA => Algorithm::EdDSA,
        TokenAlgorithm::ES256 => Algorithm::ES256,
    }
}

/// Generates a fresh private key and returns it as PKCS#8 DER.
fn generate_der(alg: TokenAlgorithm) -> Result<Zeroizing<Vec<u8>>, TokenError> {
    match alg {
        TokenAlgorithm::EdDSA => {
            use ed25519_dalek::pkcs8::EncodePrivateKey;
            let sk = ed25519_dalek::SigningKey::generate(&mut OsRng);
            let doc = sk
                .to_pkcs8_der()
                .map_err(|_| crypto("cannot encode the Ed25519 key"))?;
            Ok(Zeroizing::new(doc.as_bytes().to_vec()))
        }
        TokenAlgorithm::ES256 => {
            use p256::pkcs8::EncodePrivateKey;
            let sk = p256::SecretKey::random(&mut OsRng);
            let doc = sk
                .to_pkcs8_der()
                .map_err(|_| crypto("cannot encode the P-256 key"))?;
            Ok(Zeroizing::new(doc.as_bytes().to_vec()))
        }
    }
}

/// Derives the public JWK from a PKCS#8 private key.
fn public_jwk(alg: Algorithm, der: &[u8], kid: &str) -> Result<PublicJwk, TokenError> {
    match alg {
        Algorithm::EdDSA => {
            use ed25519_dalek::pkcs8::DecodePrivateKey;
            let sk = ed25519_dalek::SigningKey::from_pkcs8_der(der)
                .map_err(|_| crypto(format!("signing key {kid} is not a valid Ed25519 key")))?;
            Ok(PublicJwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes()),
                y: None,
                kid: kid.into(),
                alg: "EdDSA".into(),
                use_: "sig".into(),
            })
        }
        Algorithm::ES256 => {
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            use p256::pkcs8::DecodePrivateKey;
            let sk = p256::SecretKey::from_pkcs8_der(der)
                .map_err(|_| crypto(format!("signing key {kid} is not a valid P-256 key")))?;
            let point = sk.public_key().to_encoded_point(false);
            let (Some(x), Some(y)) = (point.x(), point.y()) else {
                return Err(crypto(format!("signing key {kid} has no affine point")));
            };
            Ok(PublicJwk {
                kty: "EC".into(),
                crv: "P-256".into(),
                x: URL_SAFE_NO_PAD.encode(x),
                y: Some(URL_SAFE_NO_PAD.encode(y)),
                kid: kid.into(),
                alg: "ES256".into(),
                use_: "sig".into(),
            })
        }
        other => Err(crypto(format!(
            "signing key {kid} has unsupported algorithm {other:?}"
        ))),
    }
}

/// A new key of `alg`, ready to insert: private part sealed, public part as JWK JSON.
pub(crate) fn new_record(
    alg: TokenAlgorithm,
    master_key: &MasterKey,
    now: UnixTime,
) -> Result<SigningKeyRecord, TokenError> {
    // UUID v7 sorts by creation time, so "newest first" stays right within one second.
    let kid = uuid::Uuid::now_v7().to_string();
    let der = generate_der(alg)?;
    let public = public_jwk(jose_alg(alg), &der, &kid)?;
    let private_sealed = master_key
        .seal(&seal_context(&kid), &der)
        .map_err(|e| crypto(e.to_string()))?;
    let public_jwk =
        serde_json::to_string(&public).map_err(|_| crypto("cannot encode the public key"))?;
    Ok(SigningKeyRecord {
        kid,
        alg: alg.as_str().to_string(),
        public_jwk,
        private_sealed,
        created_at: now,
        retire_at: None,
    })
}

/// Opens a stored key: unseals the private part and checks it against the stored public part.
pub(super) fn open_record(
    record: &SigningKeyRecord,
    master_key: &MasterKey,
) -> Result<LoadedKey, TokenError> {
    let kid = &record.kid;
    let alg = match record.alg.as_str() {
        "EdDSA" => Algorithm::EdDSA,
        "ES256" => Algorithm::ES256,
        other => {
            return Err(crypto(format!(
                "signing key {kid} has unsupported algorithm {other}"
            )))
        }
    };
    let der = master_key
        .open(&seal_context(kid), &record.private_sealed)
        .map_err(|e| crypto(format!("signing key {kid}: {e}")))?;
    let public = public_jwk(alg, &der, kid)?;
    let stored: PublicJwk = serde_json::from_str(&record.public_jwk)
        .map_err(|_| crypto(format!("stored public key of {kid} is not a valid JWK")))?;
    if stored != public {
        return Err(crypto(format!(
            "stored public key of {kid} does not match its private key"
        )));
    }
    let encoding = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_der(&der),
        _ => EncodingKey::from_ec_der(&der),
    };
    Ok(LoadedKey {
        kid: kid.clone(),
        alg,
        created_at: record.created_at,
        encoding,
        public,
    })
}

/// How long a new signing key is published before it signs (seconds): longer than gateways
/// take to read a rotation from the store (every 10 s) plus how long a backend may cache the
/// JWKS (`max-age=60`), so no backend meets a token whose key it could not have fetched.
pub const PUBLISH_LEAD: UnixTime = 90;

/// The live keys of one moment: the one that signs, every one that is published, and the
/// JWKS document pre-serialised so serving it costs a reference-count increment.
pub(crate) struct KeyRing {
    pub current: Arc<LoadedKey>,
    pub keys: Vec<Arc<LoadedKey>>,
    pub jwks: Bytes,
}

impl KeyRing {
    /// Builds a ring from the store's live keys. Keys already open in `previous` are reused
    /// (a kid never changes its material), so a periodic refresh unseals only new keys.
    ///
    /// The key that signs is the newest one published for at least [`PUBLISH_LEAD`] at `now`
    /// (a key a rotation retires goes on signing until its successor is that old), so every
    /// gateway and every backend's cached JWKS have a key before any token names it; while no
    /// key is that old (a first key, or a rotation right after it), the one published longest.
    /// A retiring key signs only while it stays published for `token_ttl` more; without a key
    /// that is not retiring, none signs.
    pub fn build(
        records: &[SigningKeyRecord],
        master_key: &MasterKey,
        previous: Option<&KeyRing>,
        now: UnixTime,
        token_ttl: UnixTime,
    ) -> Result<Self, TokenError> {
        let known: HashMap<&str, &Arc<LoadedKey>> = previous
            .map(|p| p.keys.iter().map(|k| (k.kid.as_str(), k)).collect())
            .unwrap_or_default();
        let mut keys = Vec::with_capacity(records.len());
        // Newest first by creation; ties broken by kid so every gateway agrees.
        let newer = |best: Option<(UnixTime, &str, usize)>, candidate: (UnixTime, &str, usize)| {
            best.is_none_or(|(t, k, _)| (candidate.0, candidate.1) > (t, k))
        };
        let mut published: Option<(UnixTime, &str, usize)> = None;
        let mut oldest: Option<(UnixTime, &str, usize)> = None;
        let mut fresh = false;
        for record in records {
            let key = match known.get(record.kid.as_str()) {
                Some(k) if k.public.alg == record.alg => Arc::clone(k),
                _ => Arc::new(open_record(record, master_key)?),
            };
            let candidate = (record.created_at, record.kid.as_str(), keys.len());
            // A retiring key signs only tokens that end before it leaves the JWKS.
            let may_sign = record
                .retire_at
                .is_none_or(|t| t >= now.saturating_add(token_ttl));
            if may_sign
                && record.created_at <= now.saturating_sub(PUBLISH_LEAD)
                && newer(published, candidate)
            {
                published = Some(candidate);
            }
            if may_sign && oldest.is_none_or(|o| !newer(Some(o), candidate)) {
                oldest = Some(candidate);
            }
            fresh |= record.retire_at.is_none();
            keys.push(key);
        }
        // Every key is retiring: none may sign.
        if !fresh {
            return Err(TokenError::NoKey);
        }
        let (_, _, index) = published.or(oldest).ok_or(TokenError::NoKey)?;
        let current = keys.get(index).map(Arc::clone).ok_or(TokenError::NoKey)?;
        // Current key first: the order some clients try keys in.
        keys.sort_by(|a, b| {
            let rank = |k: &LoadedKey| (k.kid != current.kid, std::cmp::Reverse(k.created_at));
            rank(a).cmp(&rank(b))
        });
        let published: Vec<&PublicJwk> = keys.iter().map(|k| &k.public).collect();
        let jwks = serde_json::to_vec(&serde_json::json!({ "keys": published }))
            .map_err(|_| crypto("cannot encode the JWKS"))?;
        Ok(Self {
            current,
            keys,
            jwks: Bytes::from(jwks),
        })
    }
}
