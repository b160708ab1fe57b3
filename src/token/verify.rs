//! Token verification as a backend should do it: the key is chosen by `kid` from a JWKS, the
//! algorithm is pinned by that key (the header only has to agree), and audience, issuer and
//! lifetime are checked with every claim the checks rely on required.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::{Claims, TokenError};

fn invalid(msg: impl Into<String>) -> TokenError {
    TokenError::Invalid(msg.into())
}

/// Whether the token's header (its first part) has a `crit` member.
fn has_crit(token: &str) -> bool {
    let head = token.split('.').next().unwrap_or_default();
    URL_SAFE_NO_PAD
        .decode(head)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .is_some_and(|h| h.get("crit").is_some())
}

/// Verifies `token` against `jwks` (`{"keys":[...]}`).
///
/// The header `alg` must be `EdDSA` or `ES256` and equal the `alg` of the JWK its `kid` names
/// (so `none`, HS* and algorithm confusion are refused); `aud` must equal `audience`, `iss`
/// must equal `issuer` when given; `exp`/`nbf` are checked against the system clock with
/// `leeway_secs`, as is an `iat` in the future; `iss`, `aud`, `sub`, `exp`, `nbf` and `iat`
/// must be present; a header with `crit` is refused.
pub fn verify(
    token: &str,
    jwks: &Value,
    audience: &str,
    issuer: Option<&str>,
    leeway_secs: u64,
) -> Result<Claims, TokenError> {
    // A header naming critical extensions must be refused by a verifier that does not know
    // them (RFC 7515 §4.1.11); this one knows none.
    if has_crit(token) {
        return Err(invalid(
            "the token's header names critical extensions (crit) this verifier does not know",
        ));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| {
        invalid(match e.kind() {
            ErrorKind::Json(_) => {
                "the token's header is not one this verifier knows (alg/kid: an unknown or `none` \
                 algorithm?)"
                    .to_string()
            }
            _ => "not a well-formed token (three base64url parts joined by dots)".to_string(),
        })
    })?;
    let kid = header
        .kid
        .as_deref()
        .ok_or_else(|| invalid("header has no kid"))?;
    let jwk = find_key(jwks, kid)?;
    let (alg, key) = decoding_key(jwk, kid)?;
    if header.alg != alg {
        return Err(invalid(format!(
            "header alg {:?} does not match the alg of key {kid}",
            header.alg
        )));
    }

    let mut validation = Validation::new(alg);
    validation.set_audience(&[audience]);
    if let Some(iss) = issuer {
        validation.set_issuer(&[iss]);
    }
    // `iat` is not a spec claim for jsonwebtoken; `Claims` requires it when deserialising.
    validation.set_required_spec_claims(&["iss", "aud", "sub", "exp", "nbf"]);
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = true;
    validation.leeway = leeway_secs;

    let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| {
            invalid(match e.kind() {
                ErrorKind::InvalidSignature => "signature does not verify".to_string(),
                ErrorKind::ExpiredSignature => "token has expired (exp)".to_string(),
                ErrorKind::ImmatureSignature => "token is not yet valid (nbf)".to_string(),
                ErrorKind::InvalidAudience => "wrong audience (aud)".to_string(),
                ErrorKind::InvalidIssuer => "wrong issuer (iss)".to_string(),
                ErrorKind::InvalidAlgorithm => "algorithm not allowed".to_string(),
                ErrorKind::MissingRequiredClaim(c) => format!("required claim {c} is missing"),
                ErrorKind::InvalidClaimFormat(c) => format!("claim {c} is malformed"),
                ErrorKind::Json(j) => format!("claims are malformed: {j}"),
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                    "not a well-formed token (three base64url parts joined by dots)".to_string()
                }
                other => format!("token rejected: {other:?}"),
            })
        })?;
    // Issued in the future (beyond the leeway): not a token this gateway made at its time.
    let now = jsonwebtoken::get_current_timestamp();
    let leeway = i64::try_from(leeway_secs).unwrap_or(i64::MAX);
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    if claims.iat > now.saturating_add(leeway) {
        return Err(invalid("token is issued in the future (iat)"));
    }
    Ok(claims)
}

/// The one JWK whose `kid` matches; a duplicated kid is ambiguous and refused.
fn find_key<'a>(jwks: &'a Value, kid: &str) -> Result<&'a Value, TokenError> {
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("JWKS has no keys array"))?;
    let mut matching = keys
        .iter()
        .filter(|k| k.get("kid").and_then(Value::as_str) == Some(kid));
    let found = matching
        .next()
        .ok_or_else(|| invalid(format!("unknown kid {kid}")))?;
    if matching.next().is_some() {
        return Err(invalid(format!(
            "kid {kid} appears more than once in the JWKS"
        )));
    }
    Ok(found)
}

fn member<'a>(jwk: &'a Value, name: &str, kid: &str) -> Result<&'a str, TokenError> {
    jwk.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("key {kid} has no {name}")))
}

/// A base64url coordinate of exactly 32 bytes. Checked here because jsonwebtoken's Ed25519
/// verifier slices the first 32 bytes of the key without a length check.
fn coordinate<'a>(jwk: &'a Value, name: &str, kid: &str) -> Result<&'a str, TokenError> {
    let value = member(jwk, name, kid)?;
    match URL_SAFE_NO_PAD.decode(value) {
        Ok(bytes) if bytes.len() == 32 => Ok(value),
        _ => Err(invalid(format!("key {kid} has a malformed {name}"))),
    }
}

/// The pinned algorithm and verification key of a JWK; only EdDSA (OKP Ed25519) and ES256
/// (EC P-256) signing keys are accepted.
fn decoding_key(jwk: &Value, kid: &str) -> Result<(Algorithm, DecodingKey), TokenError> {
    if let Some(use_) = jwk.get("use") {
        if use_.as_str() != Some("sig") {
            return Err(invalid(format!("key {kid} is not a signing key (use)")));
        }
    }
    let alg = member(jwk, "alg", kid)?;
    let kty = member(jwk, "kty", kid)?;
    let crv = member(jwk, "crv", kid)?;
    match (alg, kty, crv) {
        ("EdDSA", "OKP", "Ed25519") => {
            let x = coordinate(jwk, "x", kid)?;
            let key = DecodingKey::from_ed_components(x)
                .map_err(|_| invalid(format!("key {kid} has a malformed x")))?;
            Ok((Algorithm::EdDSA, key))
        }
        ("ES256", "EC", "P-256") => {
            let x = coordinate(jwk, "x", kid)?;
            let y = coordinate(jwk, "y", kid)?;
            let key = DecodingKey::from_ec_components(x, y)
                .map_err(|_| invalid(format!("key {kid} has malformed coordinates")))?;
            Ok((Algorithm::ES256, key))
        }
        _ => Err(invalid(format!(
            "key {kid}: alg {alg} with kty {kty}/crv {crv} is not allowed (EdDSA/OKP/Ed25519 or ES256/EC/P-256)"
        ))),
    }
}
