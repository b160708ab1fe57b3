use super::*;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn public(k: &SigningKey) -> serde_json::Value {
    let p = k.verifying_key().to_encoded_point(false);
    serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
}

fn proof(k: &SigningKey, header: serde_json::Value, jti: &str) -> String {
    let h = b64(header.to_string().as_bytes());
    let p = b64(serde_json::json!({ "jti": jti }).to_string().as_bytes());
    let sig: Signature = k.sign(format!("{h}.{p}").as_bytes());
    format!("{h}.{p}.{}", b64(&sig.to_bytes()))
}

fn key() -> SigningKey {
    SigningKey::random(&mut rand::rngs::OsRng)
}

#[test]
fn registration_proofs_verify_with_their_own_key_only() {
    let k = key();
    let t = proof(
        &k,
        serde_json::json!({"alg": "ES256", "typ": "dbsc+jwt", "jwk": public(&k)}),
        "ch-1",
    );
    let (bound, jti) = verify_registration(&t, Method::Dbsc).unwrap();
    assert_eq!(jti, "ch-1");
    assert_eq!(bound.jwk, public(&k));
    assert_eq!(bound.alg, "ES256");

    let other = key();
    let cases = [
        // (what, token, error)
        (
            "signed by another key",
            proof(
                &other,
                serde_json::json!({"alg": "ES256", "typ": "dbsc+jwt", "jwk": public(&k)}),
                "c",
            ),
            ProofError::BadSignature,
        ),
        (
            "plain jwt typ",
            proof(
                &k,
                serde_json::json!({"alg": "ES256", "typ": "JWT", "jwk": public(&k)}),
                "c",
            ),
            ProofError::WrongType,
        ),
        (
            "no typ",
            proof(
                &k,
                serde_json::json!({"alg": "ES256", "jwk": public(&k)}),
                "c",
            ),
            ProofError::WrongType,
        ),
        (
            "no key",
            proof(
                &k,
                serde_json::json!({"alg": "ES256", "typ": "dbsc+jwt"}),
                "c",
            ),
            ProofError::NoKey,
        ),
        (
            "HS256",
            proof(
                &k,
                serde_json::json!({"alg": "HS256", "typ": "dbsc+jwt", "jwk": public(&k)}),
                "c",
            ),
            ProofError::Algorithm,
        ),
        (
            "RS256 with an EC key",
            proof(
                &k,
                serde_json::json!({"alg": "RS256", "typ": "dbsc+jwt", "jwk": public(&k)}),
                "c",
            ),
            ProofError::NoKey,
        ),
        ("not a JWS", "a.b".to_string(), ProofError::Malformed),
        ("empty", String::new(), ProofError::Malformed),
    ];
    for (what, token, want) in cases {
        assert_eq!(
            verify_registration(&token, Method::Dbsc).unwrap_err(),
            want,
            "{what}"
        );
    }
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"dbsc+jwt"}"#),
        b64(br#"{"jti":"c"}"#)
    );
    assert!(
        verify_registration(&none, Method::Dbsc).is_err(),
        "alg none"
    );
}

#[test]
fn refresh_proofs_need_the_stored_key() {
    let k = key();
    let reg = proof(
        &k,
        serde_json::json!({"alg": "ES256", "typ": "dbsc+jwt", "jwk": public(&k)}),
        "r",
    );
    let (bound, _) = verify_registration(&reg, Method::Webcrypto).unwrap();
    let ok = proof(
        &k,
        serde_json::json!({"alg": "ES256", "typ": "dbsc+jwt"}),
        "x",
    );
    assert_eq!(verify_refresh(&ok, &bound).unwrap(), "x");
    let same_key = proof(
        &k,
        serde_json::json!({"alg": "ES256", "typ": "dbsc+jwt", "jwk": public(&k)}),
        "y",
    );
    assert_eq!(verify_refresh(&same_key, &bound).unwrap(), "y");

    let thief = key();
    let signed_by_thief = proof(
        &thief,
        serde_json::json!({"alg": "ES256", "typ": "dbsc+jwt"}),
        "x",
    );
    assert_eq!(
        verify_refresh(&signed_by_thief, &bound).unwrap_err(),
        ProofError::BadSignature
    );
    let bringing_own_key = proof(
        &thief,
        serde_json::json!({"alg": "ES256", "typ": "dbsc+jwt", "jwk": public(&thief)}),
        "x",
    );
    assert_eq!(
        verify_refresh(&bringing_own_key, &bound).unwrap_err(),
        ProofError::OtherKey
    );
}

#[test]
fn bound_cookies_are_tied_to_session_key_and_time() {
    let mk = MasterKey::from_bytes(&[7u8; 32]);
    let v = bound_cookie_value(&mk, "sess-a", "thumb-a", 10_000);
    assert_eq!(
        check_bound_cookie(&mk, Some(&v), "sess-a", "thumb-a", 9_999),
        CookieCheck::Valid
    );
    assert_eq!(
        check_bound_cookie(&mk, Some(&v), "sess-a", "thumb-a", 10_000),
        CookieCheck::Expired
    );
    assert_eq!(
        check_bound_cookie(&mk, Some(&v), "sess-b", "thumb-a", 1),
        CookieCheck::Invalid
    );
    assert_eq!(
        check_bound_cookie(&mk, Some(&v), "sess-a", "thumb-b", 1),
        CookieCheck::Invalid
    );
    assert_eq!(
        check_bound_cookie(&mk, None, "sess-a", "thumb-a", 1),
        CookieCheck::Missing
    );
    let other_master = MasterKey::from_bytes(&[8u8; 32]);
    assert_eq!(
        check_bound_cookie(&other_master, Some(&v), "sess-a", "thumb-a", 1),
        CookieCheck::Invalid
    );
    // A longer life cannot be written into the cookie.
    let (_, mac) = v.split_once('.').unwrap();
    let stretched = format!("99999999.{mac}");
    assert_eq!(
        check_bound_cookie(&mk, Some(&stretched), "sess-a", "thumb-a", 1),
        CookieCheck::Invalid
    );
    for junk in ["", "x", "1.", ".abc", "abc.def", "1.!!!"] {
        assert_eq!(
            check_bound_cookie(&mk, Some(junk), "sess-a", "thumb-a", 1),
            CookieCheck::Invalid,
            "{junk}"
        );
    }
}

#[tokio::test]
async fn challenges_work_once_for_their_own_session_and_purpose() {
    let clock = std::sync::Arc::new(crate::clock::ManualClock::starting_now());
    let store = crate::store::memory::MemoryStore::new(clock.clone());
    let a = issue_challenge(&store, "s1", Purpose::Refresh)
        .await
        .unwrap();
    let b = issue_challenge(&store, "s1", Purpose::Refresh)
        .await
        .unwrap();
    // Both outstanding: the older one still answers after the newer was issued.
    assert_eq!(
        consume_challenge(&store, &a, "s1", Purpose::Refresh)
            .await
            .unwrap(),
        ChallengeUse::Fresh
    );
    assert_eq!(
        consume_challenge(&store, &a, "s1", Purpose::Refresh)
            .await
            .unwrap(),
        ChallengeUse::Stale
    );
    assert_eq!(
        consume_challenge(&store, &b, "s2", Purpose::Refresh)
            .await
            .unwrap(),
        ChallengeUse::Foreign
    );
    assert_eq!(
        consume_challenge(&store, &b, "s1", Purpose::Refresh)
            .await
            .unwrap(),
        ChallengeUse::Stale
    );
    let c = issue_challenge(&store, "s1", Purpose::Register)
        .await
        .unwrap();
    assert_eq!(
        consume_challenge(&store, &c, "s1", Purpose::Refresh)
            .await
            .unwrap(),
        ChallengeUse::Foreign
    );
    let d = issue_challenge(&store, "s1", Purpose::Refresh)
        .await
        .unwrap();
    clock.advance(CHALLENGE_TTL.as_secs() as i64 + 1);
    assert_eq!(
        consume_challenge(&store, &d, "s1", Purpose::Refresh)
            .await
            .unwrap(),
        ChallengeUse::Stale
    );
}

/// The MAC input is a stable format: bound cookies issued before an upgrade stay valid after
/// it, and sessions stay bound across gateways of different versions.
#[test]
fn the_bound_cookie_mac_covers_the_documented_string() {
    let mk = MasterKey::from_bytes(&[7u8; 32]);
    for exp in [0_i64, 1_733_000_000_123, -5, i64::MAX] {
        let text = format!("portcullis/bound-cookie/v1\0sess-a\0thumb-a\0{exp}");
        assert_eq!(
            bound_mac(&mk, "sess-a", "thumb-a", exp),
            mk.link_mac(text.as_bytes()),
            "{exp}"
        );
    }
    assert_ne!(
        bound_mac(&mk, "sess-a", "thumb-a", 1),
        bound_mac(&mk, "sess-a\0thumb-a", "", 1),
        "the parts are separated"
    );
}
