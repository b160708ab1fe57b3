//! Second factor first with security keys on: every such sign-in offers a key ceremony, made up
//! where the account has no usable key (or there is no account), so neither the page nor the
//! ceremony tells which addresses belong to an account with a key.

use portcullis::clock::Clock;
use serde_json::{json, Value};

use super::harness::*;
use super::throttle::only_consecutive_failures_count;
use super::webauthn::*;

const WRONG: &str = "not the password at all";

/// The credential ids a ceremony's options name, and whether any carries transports.
fn allowed(options: &Value) -> (Vec<String>, bool) {
    let list = options["publicKey"]["allowCredentials"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ids = list
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    (ids, list.iter().any(|c| c.get("transports").is_some()))
}

/// The options without what differs on every start (the challenge).
fn shape(options: &Value) -> Value {
    let mut o = options.clone();
    o["publicKey"]["challenge"] = Value::Null;
    o["publicKey"]["allowCredentials"] = Value::Null;
    o
}

#[tokio::test]
async fn every_factor_first_sign_in_offers_a_key_whatever_the_account_has() {
    let gw = Gateway::start_with(|c| {
        localhost(c);
        only_consecutive_failures_count(c);
        c.limits.second_factor_first_after = 3;
        // The test accounts' own key policy is stricter than the global one: the ceremonies of
        // second factor first must not show it (an address without an account has none).
        c.webauthn.user_verification = portcullis::config::UserVerification::Preferred;
        c.webauthn.accounts.insert(
            "acct-1".into(),
            portcullis::config::AccountKeyPolicy {
                user_verification: Some(portcullis::config::UserVerification::Required),
                ..Default::default()
            },
        );
    })
    .await;
    let (_, _, mut owner_key, real) = with_key(&gw, "keyed@example.com", "Desk key").await;
    gw.signed_in("apponly@example.com").await;
    gw.signed_in("off@example.com").await;
    let off = gw.user("off@example.com").await;
    gw.state
        .durable
        .set_disabled(&off.id, true, gw.clock.now_millis())
        .await
        .unwrap();
    gw.state.user_gate.forget(&off.id);
    // An attacker's own key, registered on an account of their own.
    let (_, _, mut attacker_key, theirs) = with_key(&gw, "mallory@example.com", "Mine").await;

    let mut seen = Vec::new();
    for email in [
        "keyed@example.com",
        "apponly@example.com",
        "nobody@example.com",
        "off@example.com",
    ] {
        let c = gw.browser();
        for _ in 0..3 {
            gw.password(&c, email, WRONG, "").await;
        }
        let r = gw.password(&c, email, WRONG, "").await;
        assert_eq!(location(&r), "/_portcullis/mfa", "{email}");
        let page = gw.page(&c, "/_portcullis/mfa").await;
        assert!(page.contains("Use security key"), "{email}: {page}");
        let csrf = gw.csrf(&c, "/_portcullis/mfa").await;
        let (_, first) = start(&gw, &c, &csrf, "authenticate/start", json!({})).await;
        let (_, again) = start(&gw, &c, &csrf, "authenticate/start", json!({})).await;
        let (ids, transports) = allowed(&first);
        assert!(!ids.is_empty(), "{email}: {first}");
        assert!(
            !transports,
            "{email}: no transports name a kind of key: {first}"
        );
        assert_eq!(allowed(&again).0, ids, "{email}: the same ids every time");
        // An answer from a key the account does not have is refused alike everywhere.
        let (r, _, _) = second_factor(&gw, &c, &mut attacker_key, |options, _| {
            options["publicKey"]["allowCredentials"] =
                json!([{ "type": "public-key", "id": theirs.credential_id }]);
        })
        .await;
        let refused = error_code(r).await;
        assert_eq!(console(&gw, &c).await, 303, "{email}: no way in");
        seen.push((without_csrf(page), shape(&first), ids, refused));
    }
    for (i, s) in seen.iter().enumerate().skip(1) {
        assert_eq!(s.0, seen[0].0, "page {i} differs");
        assert_eq!(s.1, seen[0].1, "ceremony {i} differs");
        assert_eq!(s.3, seen[0].3, "refusal {i} differs");
    }
    assert_eq!(seen[0].3, (401, "key_rejected".to_string()));
    // The account with a key names its own; the others name made-up ones, each their own.
    assert_eq!(seen[0].2, vec![real.credential_id.clone()]);
    let all: std::collections::HashSet<_> = seen.iter().flat_map(|s| s.2.clone()).collect();
    assert_eq!(all.len(), seen.iter().map(|s| s.2.len()).sum::<usize>());
    assert!(!all.contains(&theirs.credential_id));

    // The owner's real key still does what it did: the second factor, then the password.
    let c = gw.browser();
    gw.password(&c, "keyed@example.com", WRONG, "").await;
    let (r, _, _) = second_factor(&gw, &c, &mut owner_key, |_, _| {}).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["redirect"], "/_portcullis/login?notice=password_next");
    let r = gw.password(&c, "keyed@example.com", PASSWORD, "").await;
    assert_eq!(r.status(), 303);
}
