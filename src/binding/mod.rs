//! Binding sessions to the device that signed in. A complete session is tied to one public key
//! whose private half the browser keeps: a Device Bound Session Credentials (DBSC) key, held by
//! the platform (TPM) where the browser supports it, or a non-extractable WebCrypto key kept in
//! the browser profile's IndexedDB otherwise. The browser proves possession by signing a
//! single-use challenge; the gateway then issues a short-lived *bound cookie*, a MAC under the
//! master key over the session, the key and an expiry. The gate forwards a session only with a
//! valid, unexpired bound cookie issued to the same network and browser, so a copied cookie jar
//! is useless on another device.
//!
//! Both methods use the same proof: a compact JWS with `typ: dbsc+jwt` whose `jti` is the
//! challenge, signed with ES256 (or RS256 for DBSC); a registration proof carries its public key
//! in the `jwk` header. Signatures are checked with `jsonwebtoken`; no cryptography is written
//! here. No HTTP types: the web layer is `http::binding`.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::crypto::{ct_eq, random_token, MasterKey};
use crate::store::{EphemeralStore, StoreError, StoreResult};

/// Bound cookie name on HTTPS deployments.
pub const COOKIE_HTTPS: &str = "__Host-portcullis-bound";
/// Bound cookie name on the plain-HTTP loopback demo.
pub const COOKIE_HTTP: &str = "portcullis-bound";
/// How long a challenge may wait for its proof.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(120);
/// The JWS `typ` of every proof.
pub const PROOF_TYPE: &str = "dbsc+jwt";
/// Longest proof accepted (an RS256 proof with a 4096-bit key in its header is ~2 KiB).
const MAX_PROOF_LEN: usize = 8192;
/// Smallest RSA modulus accepted for RS256 keys (bytes).
const MIN_RSA_MODULUS: usize = 256;

/// How a session's key is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Device Bound Session Credentials: the browser refreshes the bound cookie by itself.
    Dbsc,
    /// The fallback: a WebCrypto key in IndexedDB, used by the gateway's own page.
    Webcrypto,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Dbsc => "dbsc",
            Method::Webcrypto => "webcrypto",
        }
    }
}

/// The public key a session is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundKey {
    pub method: Method,
    /// `ES256` or `RS256`; proofs must use this algorithm.
    pub alg: String,
    /// The public JWK (public members only).
    pub jwk: serde_json::Value,
    /// RFC 7638 SHA-256 thumbprint of the key; the bound cookie's MAC covers it.
    pub thumbprint: String,
}

/// Why a proof was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the proof is not a well-formed JWS")]
    Malformed,
    #[error("the proof's typ is not dbsc+jwt")]
    WrongType,
    #[error("the proof's algorithm is not allowed for this key")]
    Algorithm,
    #[error("the registration proof carries no usable public key")]
    NoKey,
    #[error("the proof names a key other than the session's")]
    OtherKey,
    #[error("the proof's signature does not verify")]
    BadSignature,
}

impl ProofError {
    /// Stable reason for audit events.
    pub fn reason(self) -> &'static str {
        match self {
            ProofError::Malformed => "proof_malformed",
            ProofError::WrongType => "proof_wrong_type",
            ProofError::Algorithm => "proof_wrong_algorithm",
            ProofError::NoKey => "proof_without_key",
            ProofError::OtherKey => "proof_other_key",
            ProofError::BadSignature => "proof_bad_signature",
        }
    }
}

#[derive(Deserialize)]
struct ProofClaims {
    jti: String,
}

fn header_of(token: &str) -> Result<jsonwebtoken::Header, ProofError> {
    if token.is_empty() || token.len() > MAX_PROOF_LEN {
        return Err(ProofError::Malformed);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| ProofError::Malformed)?;
    if header.typ.as_deref() != Some(PROOF_TYPE) {
        return Err(ProofError::WrongType);
    }
    if !matches!(header.alg, Algorithm::ES256 | Algorithm::RS256) {
        return Err(ProofError::Algorithm);
    }
    Ok(header)
}

/// The public members of a JWK usable with `alg`, or `None` for any other key.
fn public_jwk(jwk: &Jwk, alg: Algorithm) -> Option<serde_json::Value> {
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256)
            if p.curve == EllipticCurve::P256 =>
        {
            let coord_ok = |c: &str| URL_SAFE_NO_PAD.decode(c).is_ok_and(|b| b.len() == 32);
            (coord_ok(&p.x) && coord_ok(&p.y))
                .then(|| serde_json::json!({ "kty": "EC", "crv": "P-256", "x": p.x, "y": p.y }))
        }
        (AlgorithmParameters::RSA(p), Algorithm::RS256) => {
            let n = URL_SAFE_NO_PAD.decode(&p.n).ok()?;
            (n.len() >= MIN_RSA_MODULUS && URL_SAFE_NO_PAD.decode(&p.e).is_ok())
                .then(|| serde_json::json!({ "kty": "RSA", "n": p.n, "e": p.e }))
        }
        _ => None,
    }
}

fn verify_with(token: &str, jwk: &Jwk, alg: Algorithm) -> Result<String, ProofError> {
    let key = DecodingKey::from_jwk(jwk).map_err(|_| ProofError::NoKey)?;
    let mut v = Validation::new(alg);
    // A proof is a possession check of a fresh single-use challenge, not a bearer token: the
    // challenge store decides freshness, so no time claims are required.
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    let data = jsonwebtoken::decode::<ProofClaims>(token, &key, &v)
        .map_err(|_| ProofError::BadSignature)?;
    Ok(data.claims.jti)
}

/// Checks a registration proof: `typ` `dbsc+jwt`, ES256/RS256, signed by the key in its `jwk`
/// header. Returns the key (for `method`) and the proof's `jti` — which the caller must match
/// against a challenge it issued.
pub fn verify_registration(token: &str, method: Method) -> Result<(BoundKey, String), ProofError> {
    let header = header_of(token)?;
    let jwk = header.jwk.as_ref().ok_or(ProofError::NoKey)?;
    let public = public_jwk(jwk, header.alg).ok_or(ProofError::NoKey)?;
    let public_jwk: Jwk = serde_json::from_value(public.clone()).map_err(|_| ProofError::NoKey)?;
    let jti = verify_with(token, &public_jwk, header.alg)?;
    let alg = if header.alg == Algorithm::RS256 {
        "RS256"
    } else {
        "ES256"
    };
    Ok((
        BoundKey {
            method,
            alg: alg.into(),
            thumbprint: public_jwk.thumbprint(ThumbprintHash::SHA256),
            jwk: public,
        },
        jti,
    ))
}

/// Checks a refresh proof against the session's key; returns its `jti`. A `jwk` header is
/// tolerated only when it is that same key: a proof can never bring its own key.
pub fn verify_refresh(token: &str, key: &BoundKey) -> Result<String, ProofError> {
    let header = header_of(token)?;
    let alg = if key.alg == "RS256" {
        Algorithm::RS256
    } else {
        Algorithm::ES256
    };
    if header.alg != alg {
        return Err(ProofError::Algorithm);
    }
    let stored: Jwk = serde_json::from_value(key.jwk.clone()).map_err(|_| ProofError::NoKey)?;
    if let Some(other) = &header.jwk {
        let same = ct_eq(
            other.thumbprint(ThumbprintHash::SHA256).as_bytes(),
            key.thumbprint.as_bytes(),
        );
        if !same {
            return Err(ProofError::OtherKey);
        }
    }
    verify_with(token, &stored, alg)
}

/// Where a bound cookie was issued: the client's network (its /24, or /64 for IPv6) and its
/// `User-Agent`, as a short keyed hash (keyed, so a leaked cookie and user agent do not give
/// away the owner's network to an offline search). A cookie presented from another network or by
/// another browser is not taken as a proof: the browser that holds the key proves again (the bind
/// page or a DBSC refresh does it without asking the user), and a copy of the cookie jar used
/// elsewhere is refused at once rather than for the rest of the cookie's life.
pub fn device_context(
    key: &MasterKey,
    ip: std::net::IpAddr,
    user_agent: &str,
) -> [u8; CONTEXT_LEN] {
    let (v4, v6);
    let network: &[u8] = match ip {
        std::net::IpAddr::V4(a) => {
            v4 = a.octets();
            &v4[..3]
        }
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => {
                v4 = m.octets();
                &v4[..3]
            }
            None => {
                v6 = a.octets();
                &v6[..8]
            }
        },
    };
    let mac = key.link_mac_parts(&[
        b"portcullis/bound-context/v2\0",
        network,
        b"\0",
        user_agent.as_bytes(),
    ]);
    let mut out = [0u8; CONTEXT_LEN];
    out.copy_from_slice(&mac[..CONTEXT_LEN]);
    out
}

/// Bytes of [`device_context`] kept in the cookie.
pub const CONTEXT_LEN: usize = 12;

/// The bound cookie: `<expiry ms>.<context>.<MAC>`, the MAC (master-key derived) covering the
/// session's public id, the key's thumbprint, the expiry and the [`device_context`] it was issued
/// to. Unforgeable without the master key, useless for any other session or key, refused after
/// its expiry by the server itself, and not a proof from another network or browser.
pub fn bound_cookie_value(
    key: &MasterKey,
    session_public_id: &str,
    thumbprint: &str,
    expires_ms: i64,
    context: &[u8; CONTEXT_LEN],
) -> String {
    let mac = bound_mac(key, session_public_id, thumbprint, expires_ms, context);
    format!(
        "{expires_ms}.{}.{}",
        URL_SAFE_NO_PAD.encode(context),
        URL_SAFE_NO_PAD.encode(mac)
    )
}

/// The MAC over `portcullis/bound-cookie/v2 NUL <public id> NUL <thumbprint> NUL <expiry ms> NUL
/// <context>` (checked on every proxied request, so fed in parts rather than formatted).
fn bound_mac(
    key: &MasterKey,
    public_id: &str,
    thumbprint: &str,
    expires_ms: i64,
    context: &[u8],
) -> [u8; 32] {
    let mut expiry = itoa::Buffer::new();
    key.link_mac_parts(&[
        b"portcullis/bound-cookie/v2\0",
        public_id.as_bytes(),
        b"\0",
        thumbprint.as_bytes(),
        b"\0",
        expiry.format(expires_ms).as_bytes(),
        b"\0",
        context,
    ])
}

/// What a presented bound cookie is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieCheck {
    /// Valid for this session and key, and not expired.
    Valid,
    /// None presented.
    Missing,
    /// Made by us for this session and key, past its expiry, presented from the network and
    /// browser it was issued to: the owner's client that kept it a moment too long (or ignores
    /// `Max-Age`); the key must prove itself again.
    Expired,
    /// Made by us for this session and key, but presented from another network or browser than
    /// it was issued to: the holder of the key must prove it again.
    Moved,
    /// Shaped as a bound cookie but not made by us for this session and key (forged, tampered
    /// with, another session's). A value of no such shape is `Missing`.
    Invalid,
}

impl CookieCheck {
    /// Stable reason for audit events.
    pub fn reason(self) -> &'static str {
        match self {
            CookieCheck::Valid => "valid",
            CookieCheck::Missing => "bound_cookie_missing",
            CookieCheck::Expired => "bound_cookie_expired",
            CookieCheck::Moved => "bound_cookie_moved",
            CookieCheck::Invalid => "bound_cookie_invalid",
        }
    }
}

/// Checks a bound cookie value at `now_ms`, presented from `context` (constant-time MAC
/// comparison).
pub fn check_bound_cookie(
    key: &MasterKey,
    value: Option<&str>,
    session_public_id: &str,
    thumbprint: &str,
    now_ms: i64,
    context: &[u8; CONTEXT_LEN],
) -> CookieCheck {
    let Some(v) = value else {
        return CookieCheck::Missing;
    };
    // `<expiry>.<context>.<mac>`, split in two byte searches (this runs on every request). A
    // value of another shape is no bound cookie at all, taken as none (a forgery must at least
    // look like one to count as a failed proof).
    let Some(first) = memchr::memchr(b'.', v.as_bytes()) else {
        return CookieCheck::Missing;
    };
    let (exp, rest) = (&v[..first], &v[first + 1..]);
    let Some(second) = memchr::memchr(b'.', rest.as_bytes()) else {
        return check_v1_cookie(key, v, session_public_id, thumbprint);
    };
    let (issued_to, mac) = (&rest[..second], &rest[second + 1..]);
    let (Ok(exp), Ok(issued_to), Ok(mac)) = (
        exp.parse::<i64>(),
        URL_SAFE_NO_PAD.decode(issued_to),
        URL_SAFE_NO_PAD.decode(mac),
    ) else {
        return CookieCheck::Missing;
    };
    let want = bound_mac(key, session_public_id, thumbprint, exp, &issued_to);
    if issued_to.len() != CONTEXT_LEN || !ct_eq(&want, &mac) {
        return CookieCheck::Invalid;
    }
    let here = ct_eq(&issued_to, context);
    if now_ms >= exp {
        // Past its expiry somewhere else: as any cookie that moved, the key must prove again.
        return if here {
            CookieCheck::Expired
        } else {
            CookieCheck::Moved
        };
    }
    if !here {
        return CookieCheck::Moved;
    }
    CookieCheck::Valid
}

/// A cookie of the format before the device context (`<expiry ms>.<MAC>`, `bound-cookie/v1`):
/// made by us for this session and key, it is taken as [`CookieCheck::Moved`], so that after an
/// upgrade the browser that holds the key proves again, without counting as a failure.
fn check_v1_cookie(key: &MasterKey, v: &str, public_id: &str, thumbprint: &str) -> CookieCheck {
    let Some((exp, mac)) = v.split_once('.') else {
        return CookieCheck::Missing;
    };
    let (Ok(exp), Ok(mac)) = (exp.parse::<i64>(), URL_SAFE_NO_PAD.decode(mac)) else {
        return CookieCheck::Missing;
    };
    let mut expiry = itoa::Buffer::new();
    let want = key.link_mac_parts(&[
        b"portcullis/bound-cookie/v1\0",
        public_id.as_bytes(),
        b"\0",
        thumbprint.as_bytes(),
        b"\0",
        expiry.format(exp).as_bytes(),
    ]);
    if ct_eq(&want, &mac) {
        CookieCheck::Moved
    } else {
        CookieCheck::Invalid
    }
}

/// What a challenge was issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Register,
    Refresh,
    /// A remembered device proving its key after the password.
    Remembered,
}

#[derive(Serialize, Deserialize)]
struct ChallengeRecord {
    session: String,
    purpose: Purpose,
}

fn challenge_key(challenge: &str) -> String {
    format!(
        "binding_challenge:{}",
        crate::crypto::sha256_hex(challenge.as_bytes())
    )
}

/// Issues a single-use challenge (256 random bits) for one session and purpose. Several may be
/// outstanding at once: the DBSC spec notes a proof for an older challenge can arrive after a
/// newer one was issued, so each stays valid on its own until used or expired.
pub async fn issue_challenge(
    store: &dyn EphemeralStore,
    session_public_id: &str,
    purpose: Purpose,
) -> StoreResult<String> {
    let challenge = random_token(32);
    let body = serde_json::to_vec(&ChallengeRecord {
        session: session_public_id.to_string(),
        purpose,
    })
    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if !store
        .put_if_absent(&challenge_key(&challenge), &body, CHALLENGE_TTL)
        .await?
    {
        return Err(StoreError::Conflict("challenge collision".into()));
    }
    Ok(challenge)
}

/// How a presented challenge turned out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeUse {
    /// Issued for this session and purpose, unused and unexpired; now used up.
    Fresh,
    /// Unknown, used already or expired.
    Stale,
    /// Issued for another session or purpose (now used up, so it cannot be tried again).
    Foreign,
}

/// Consumes a challenge atomically (`take`): of two requests carrying it, one wins.
pub async fn consume_challenge(
    store: &dyn EphemeralStore,
    challenge: &str,
    session_public_id: &str,
    purpose: Purpose,
) -> StoreResult<ChallengeUse> {
    if challenge.is_empty() || challenge.len() > 128 {
        return Ok(ChallengeUse::Stale);
    }
    let Some(body) = store.take(&challenge_key(challenge)).await? else {
        return Ok(ChallengeUse::Stale);
    };
    let rec: ChallengeRecord =
        serde_json::from_slice(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if rec.session == session_public_id && rec.purpose == purpose {
        Ok(ChallengeUse::Fresh)
    } else {
        Ok(ChallengeUse::Foreign)
    }
}

/// Claims the binding of a session for one key, once: the first registration wins, even
/// against a concurrent one by the other method.
pub async fn claim(
    store: &dyn EphemeralStore,
    session_public_id: &str,
    thumbprint: &str,
    ttl: Duration,
) -> StoreResult<bool> {
    store
        .put_if_absent(
            &format!("binding_claim:{session_public_id}"),
            thumbprint.as_bytes(),
            ttl,
        )
        .await
}

fn failures_key(session_public_id: &str) -> String {
    format!("binding_failures:{session_public_id}")
}

/// Counts one failed proof for a session; returns the count so far.
pub async fn count_failure(
    store: &dyn EphemeralStore,
    session_public_id: &str,
    ttl: Duration,
) -> StoreResult<u64> {
    store.incr(&failures_key(session_public_id), ttl).await
}

/// A successful proof starts the count over.
pub async fn forget_failures(
    store: &dyn EphemeralStore,
    session_public_id: &str,
) -> StoreResult<()> {
    store.delete(&failures_key(session_public_id)).await
}

#[cfg(test)]
mod tests;
