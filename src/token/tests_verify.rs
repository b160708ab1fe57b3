//! Tests that [`verify`] refuses every token a backend must refuse.
// Tests may unwrap and panic: a failure is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::tests::{check, identity, jwks, text, Fx};
use super::*;
use crate::clock::Clock;
use crate::config::TokenAlgorithm;

fn rejected(result: Result<Claims, TokenError>, needle: &str) {
    match result {
        Err(TokenError::Invalid(msg)) => {
            assert!(msg.contains(needle), "expected `{needle}` in `{msg}`")
        }
        other => panic!("expected rejection mentioning `{needle}`, got {other:?}"),
    }
}

/// Signs arbitrary claims with the signer's real current key.
fn sign_raw(signer: &Signer, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(signer.current_kid());
    jsonwebtoken::encode(&header, claims, &signer.current_encoding_key()).unwrap()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn valid_claims(fx: &Fx) -> Value {
    let now = fx.clock.now();
    json!({
        "iss": "https://gw.example", "aud": "esp-console", "sub": "user-1",
        "email": "alice@example.com", "account": "acct-9", "amr": ["pwd", "otp"],
        "acr": "mfa", "auth_time": now, "sid": "sid-abc",
        "iat": now, "nbf": now, "exp": now + 120, "jti": "j-1"
    })
}

#[tokio::test]
async fn audience_and_issuer_must_match() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let token = text(signer.token_for("s1", &identity()).unwrap());
    let set = jwks(&signer);
    rejected(
        verify(&token, &set, "other-app", Some("https://gw.example"), 5),
        "audience",
    );
    rejected(
        verify(&token, &set, "esp-console", Some("https://evil.example"), 5),
        "issuer",
    );
    assert!(verify(&token, &set, "esp-console", None, 5).is_ok());
}

#[tokio::test]
async fn lifetime_is_checked_with_leeway() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let set = jwks(&signer);
    let real_now = fx.clock.now();

    fx.clock.set(real_now - 1000); // exp = now - 880
    let old = text(signer.token_for("past", &identity()).unwrap());
    rejected(check(&fx, &signer, &old), "expired");
    assert!(
        verify(&old, &set, "esp-console", None, 2000).is_ok(),
        "leeway applies"
    );

    fx.clock.set(real_now + 1000);
    let future = text(signer.token_for("future", &identity()).unwrap());
    rejected(check(&fx, &signer, &future), "not yet valid");
}

#[tokio::test]
async fn tampering_breaks_the_signature() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let token = text(signer.token_for("s1", &identity()).unwrap());
    let parts: Vec<&str> = token.split('.').collect();

    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = "admin".into();
    let forged = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    rejected(check(&fx, &signer, &forged), "signature");

    let mut sig = parts[2].as_bytes().to_vec();
    let mid = sig.len() / 2;
    sig[mid] = if sig[mid] == b'A' { b'B' } else { b'A' };
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(sig).unwrap()
    );
    rejected(check(&fx, &signer, &forged), "signature");

    let unsigned = format!("{}.{}.", parts[0], parts[1]);
    assert!(check(&fx, &signer, &unsigned).is_err());
}

#[tokio::test]
async fn alg_none_and_hmac_confusion_are_refused() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let kid = signer.current_kid();
    let set = jwks(&signer);
    let claims = valid_claims(&fx);

    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
        b64(&claims)
    );
    rejected(check(&fx, &signer, &none), "alg");

    // The classic confusion: HMAC keyed with the public key, in every form a verifier might
    // hand to an HMAC check.
    let x = set["keys"][0]["x"].as_str().unwrap();
    let secrets = [
        URL_SAFE_NO_PAD.decode(x).unwrap(),
        x.as_bytes().to_vec(),
        set["keys"][0].to_string().into_bytes(),
    ];
    for secret in secrets {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        let hs =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
        rejected(check(&fx, &signer, &hs), "alg");
    }

    // A JWKS entry that claims to be an HMAC key is never accepted either.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("oct".into());
    let hs = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"k")).unwrap();
    let oct =
        json!({"keys": [{"kty": "oct", "kid": "oct", "alg": "HS256", "k": "aw", "crv": "-"}]});
    rejected(verify(&hs, &oct, "esp-console", None, 5), "not allowed");
}

#[tokio::test]
async fn the_key_comes_from_the_jwks_by_kid() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let token = text(signer.token_for("s1", &identity()).unwrap());
    let set = jwks(&signer);

    let mut unknown = set.clone();
    unknown["keys"][0]["kid"] = "someone-else".into();
    rejected(
        verify(&token, &unknown, "esp-console", None, 5),
        "unknown kid",
    );

    let mut doubled = set.clone();
    let entry = set["keys"][0].clone();
    doubled["keys"].as_array_mut().unwrap().push(entry);
    rejected(
        verify(&token, &doubled, "esp-console", None, 5),
        "more than once",
    );

    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = None;
    let kidless =
        jsonwebtoken::encode(&header, &valid_claims(&fx), &signer.current_encoding_key()).unwrap();
    rejected(check(&fx, &signer, &kidless), "no kid");

    // The JWK's alg pins the algorithm: a mismatching or missing alg is refused.
    let mut mismatch = set.clone();
    mismatch["keys"][0]["alg"] = "ES256".into();
    rejected(
        verify(&token, &mismatch, "esp-console", None, 5),
        "not allowed",
    );
    let mut es_key = set.clone();
    es_key["keys"][0] = json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
        "kid": signer.current_kid(), "x": set["keys"][0]["x"], "y": set["keys"][0]["x"]
    });
    rejected(
        verify(&token, &es_key, "esp-console", None, 5),
        "does not match",
    );
    let mut no_alg = set.clone();
    no_alg["keys"][0].as_object_mut().unwrap().remove("alg");
    rejected(verify(&token, &no_alg, "esp-console", None, 5), "no alg");
    let mut enc = set.clone();
    enc["keys"][0]["use"] = "enc".into();
    rejected(verify(&token, &enc, "esp-console", None, 5), "use");

    // A short key must be refused, not crash the verifier.
    let mut short = set.clone();
    short["keys"][0]["x"] = "AAAA".into();
    rejected(
        verify(&token, &short, "esp-console", None, 5),
        "malformed x",
    );
    rejected(
        verify(&token, &json!({}), "esp-console", None, 5),
        "keys array",
    );
}

#[tokio::test]
async fn required_claims_must_be_present_and_well_formed() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let good = sign_raw(&signer, &valid_claims(&fx));
    check(&fx, &signer, &good).unwrap();

    for claim in ["iss", "aud", "sub", "exp", "nbf", "iat"] {
        let mut claims = valid_claims(&fx);
        claims.as_object_mut().unwrap().remove(claim);
        let token = sign_raw(&signer, &claims);
        rejected(
            verify(&token, &jwks(&signer), "esp-console", None, 5),
            claim,
        );
    }

    // Older jsonwebtoken releases skipped the check for string-valued exp.
    let mut claims = valid_claims(&fx);
    claims["exp"] = json!((fx.clock.now() - 1000).to_string());
    let token = sign_raw(&signer, &claims);
    rejected(check(&fx, &signer, &token), "exp");
    let mut claims = valid_claims(&fx);
    claims["aud"] = json!(["other", "esp-console"]);
    assert!(check(&fx, &signer, &sign_raw(&signer, &claims)).is_err());
}

/// A token whose header names critical extensions is refused (RFC 7515: this verifier knows
/// none), and so is one issued in the future beyond the leeway although its `nbf` has passed.
#[tokio::test]
async fn critical_extensions_and_a_future_iat_are_refused() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let set = jwks(&signer);
    let claims = valid_claims(&fx);
    let good = sign_raw(&signer, &claims);
    assert!(verify(&good, &set, "esp-console", None, 5).is_ok());
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(signer.current_kid());
    let mut head: Value = serde_json::to_value(&header).unwrap();
    head["crit"] = json!(["exp"]);
    head["exp"] = json!(1);
    let body = good.split('.').nth(1).unwrap();
    let input = format!("{}.{body}", b64(&head));
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &signer.current_encoding_key(),
        Algorithm::EdDSA,
    )
    .unwrap();
    rejected(
        verify(&format!("{input}.{sig}"), &set, "esp-console", None, 5),
        "crit",
    );
    let mut future = claims.clone();
    future["iat"] = json!(fx.clock.now() + 3600);
    let token = sign_raw(&signer, &future);
    rejected(verify(&token, &set, "esp-console", None, 5), "iat");
}
