use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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
fn bound_cookies_are_tied_to_session_key_time_and_place() {
    let mk = MasterKey::from_bytes(&[7u8; 32]);
    let here = device_context(&mk, "203.0.113.7".parse().unwrap(), "Firefox/140");
    let v = bound_cookie_value(&mk, "sess-a", "thumb-a", 10_000, &here);
    let check = |value: Option<&str>, sess: &str, thumb: &str, now: i64, at: &[u8; CONTEXT_LEN]| {
        check_bound_cookie(&mk, value, sess, thumb, now, at)
    };
    assert_eq!(
        check(Some(&v), "sess-a", "thumb-a", 9_999, &here),
        CookieCheck::Valid
    );
    assert_eq!(
        check(Some(&v), "sess-a", "thumb-a", 10_000, &here),
        CookieCheck::Expired
    );
    let far = device_context(&mk, "198.51.100.7".parse().unwrap(), "Firefox/140");
    assert_eq!(
        check(Some(&v), "sess-a", "thumb-a", 10_000, &far),
        CookieCheck::Moved,
        "expired elsewhere: the key must prove again, like any cookie that moved"
    );
    assert_eq!(
        check(Some(&v), "sess-b", "thumb-a", 1, &here),
        CookieCheck::Invalid
    );
    assert_eq!(
        check(Some(&v), "sess-a", "thumb-b", 1, &here),
        CookieCheck::Invalid
    );
    assert_eq!(
        check(None, "sess-a", "thumb-a", 1, &here),
        CookieCheck::Missing
    );
    // The same /24 and browser is the same place; another network or browser is not.
    let same = device_context(&mk, "203.0.113.200".parse().unwrap(), "Firefox/140");
    assert_eq!(
        check(Some(&v), "sess-a", "thumb-a", 1, &same),
        CookieCheck::Valid
    );
    for (ip, ua) in [
        ("203.0.114.7", "Firefox/140"),
        ("2001:db8::7", "Firefox/140"),
        ("203.0.113.7", "Firefox/141"),
        ("203.0.113.7", ""),
    ] {
        let elsewhere = device_context(&mk, ip.parse().unwrap(), ua);
        assert_eq!(
            check(Some(&v), "sess-a", "thumb-a", 1, &elsewhere),
            CookieCheck::Moved,
            "{ip} {ua}"
        );
    }
    // IPv6 within one /64 is one place; an IPv4-mapped address is its IPv4 network.
    assert_eq!(
        device_context(&mk, "2001:db8:1:2::1".parse().unwrap(), "x"),
        device_context(&mk, "2001:db8:1:2:ffff::9".parse().unwrap(), "x")
    );
    assert_ne!(
        device_context(&mk, "2001:db8:1:2::1".parse().unwrap(), "x"),
        device_context(&mk, "2001:db8:1:3::1".parse().unwrap(), "x")
    );
    assert_eq!(
        device_context(&mk, "::ffff:203.0.113.9".parse().unwrap(), "x"),
        device_context(&mk, "203.0.113.1".parse().unwrap(), "x")
    );
    let other_master = MasterKey::from_bytes(&[8u8; 32]);
    assert_eq!(
        check_bound_cookie(&other_master, Some(&v), "sess-a", "thumb-a", 1, &here),
        CookieCheck::Invalid
    );
    // Neither a longer life nor another place can be written into the cookie.
    let (_, rest) = v.split_once('.').unwrap();
    let stretched = format!("99999999.{rest}");
    assert_eq!(
        check(Some(&stretched), "sess-a", "thumb-a", 1, &here),
        CookieCheck::Invalid
    );
    let (exp, rest) = v.split_once('.').unwrap();
    let (_, mac) = rest.split_once('.').unwrap();
    let elsewhere = device_context(&mk, "198.51.100.1".parse().unwrap(), "curl");
    let moved = format!("{exp}.{}.{mac}", URL_SAFE_NO_PAD.encode(elsewhere));
    assert_eq!(
        check(Some(&moved), "sess-a", "thumb-a", 1, &elsewhere),
        CookieCheck::Invalid
    );
    // Shaped as a bound cookie (either version) without our MAC: a forgery, counted.
    for forged in ["1.", "1..", &format!("{exp}.{mac}")] {
        assert_eq!(
            check(Some(forged), "sess-a", "thumb-a", 1, &here),
            CookieCheck::Invalid,
            "{forged}"
        );
    }
    // Of no such shape: no bound cookie at all, as if none had come.
    for junk in ["", "x", ".abc", "abc.def", "1.!!!", "1.a.b", "x.y.z"] {
        assert_eq!(
            check(Some(junk), "sess-a", "thumb-a", 1, &here),
            CookieCheck::Missing,
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
/// it, and sessions stay bound across gateways of the same format. A cookie of the format before
/// the device context (v1) is recognised and sent to prove again, not counted as a failure.
#[test]
fn the_bound_cookie_mac_covers_the_documented_string() {
    let mk = MasterKey::from_bytes(&[7u8; 32]);
    let ctx = [9u8; CONTEXT_LEN];
    for exp in [0_i64, 1_733_000_000_123, -5, i64::MAX] {
        let mut text = format!("portcullis/bound-cookie/v2\0sess-a\0thumb-a\0{exp}\0").into_bytes();
        text.extend_from_slice(&ctx);
        assert_eq!(
            bound_mac(&mk, "sess-a", "thumb-a", exp, &ctx),
            mk.link_mac(&text),
            "{exp}"
        );
    }
    assert_ne!(
        bound_mac(&mk, "sess-a", "thumb-a", 1, &ctx),
        bound_mac(&mk, "sess-a\0thumb-a", "", 1, &ctx),
        "the parts are separated"
    );
    let v1 = |sess: &str| {
        let mac =
            mk.link_mac(format!("portcullis/bound-cookie/v1\0{sess}\0thumb-a\05000").as_bytes());
        format!("5000.{}", URL_SAFE_NO_PAD.encode(mac))
    };
    let check = |v: &str| check_bound_cookie(&mk, Some(v), "sess-a", "thumb-a", 1, &ctx);
    assert_eq!(check(&v1("sess-a")), CookieCheck::Moved);
    assert_eq!(check(&v1("sess-b")), CookieCheck::Invalid);
}
