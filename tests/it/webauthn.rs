//! Security keys and passkeys end to end: real ceremonies over HTTP against the real router,
//! answered by a software authenticator (webauthn-authenticator-rs `SoftPasskey`). WebAuthn
//! needs a domain, so these gateways answer as `http://localhost:<port>` (a secure context).

use portcullis::clock::Clock;
use serde_json::{json, Value};
use webauthn_authenticator_rs::prelude::{
    CreationChallengeResponse, PublicKeyCredential, RequestChallengeResponse, Url,
};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;

use super::harness::*;

pub(super) type Key = WebauthnAuthenticator<SoftPasskey>;

/// A key that performs user verification (PIN or biometric).
pub(super) fn key() -> Key {
    WebauthnAuthenticator::new(SoftPasskey::new(true))
}

pub(super) fn localhost(c: &mut portcullis::config::Config) {
    let port = c.server.listen.rsplit(':').next().unwrap().to_string();
    c.server.public_url = Url::parse(&format!("http://localhost:{port}/")).unwrap();
}

pub(super) async fn gateway() -> Gateway {
    Gateway::start_with(localhost).await
}

pub(super) fn origin(gw: &Gateway) -> Url {
    gw.state.config.server.public_url.clone()
}

/// The status of a console request from `c`: 200 when forwarded, 303 to the sign-in page.
pub(super) async fn console(gw: &Gateway, c: &Browser) -> u16 {
    gw.status(c, "/campaigns").await
}

pub(super) async fn user(gw: &Gateway, email: &str) -> portcullis::store::User {
    gw.user(email).await
}

/// A signed-in user (TOTP enrolled) who has just registered one key named `name`.
pub(super) async fn with_key(
    gw: &Gateway,
    email: &str,
    name: &str,
) -> (
    Browser,
    portcullis::store::User,
    Key,
    portcullis::store::WebauthnCredential,
) {
    let (c, _, _) = gw.signed_in(email).await;
    let u = user(gw, email).await;
    let mut k = key();
    register(gw, &c, &mut k, name).await;
    let cred = only_credential(gw, &u.id).await;
    (c, u, k, cred)
}

/// The text of a gateway page.
pub(super) async fn page(gw: &Gateway, c: &Browser, path: &str) -> String {
    gw.page(c, path).await
}

/// Removes a key through the account page's form.
pub(super) async fn remove_key(gw: &Gateway, c: &Browser, id: &str) -> reqwest::Response {
    let csrf = gw.csrf(c, "/_portcullis/account").await;
    let path = format!("/_portcullis/account/keys/{id}/remove");
    post_form(gw, c, &path, &[("csrf", csrf.as_str())]).await
}

/// A form post from a page of the account.
pub(super) async fn post_form(
    gw: &Gateway,
    c: &Browser,
    path: &str,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    c.post(gw.url(path)).form(fields).send().await.unwrap()
}

/// A JSON call with the CSRF header.
pub(super) async fn call(
    gw: &Gateway,
    c: &Browser,
    csrf: &str,
    path: &str,
    body: Value,
) -> reqwest::Response {
    c.post(gw.url(&format!("/_portcullis/webauthn/{path}")))
        .header("accept", "application/json")
        .header("x-csrf-token", csrf)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// `(ceremony, options)` from a start call that must succeed.
pub(super) async fn start(
    gw: &Gateway,
    c: &Browser,
    csrf: &str,
    path: &str,
    body: Value,
) -> (String, Value) {
    let r = call(gw, c, csrf, path, body).await;
    assert_eq!(r.status(), 200, "{path}");
    let v: Value = r.json().await.unwrap();
    (
        v["ceremony"].as_str().unwrap().to_string(),
        v["options"].clone(),
    )
}

pub(super) async fn error_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v["error"].as_str().unwrap_or_default().to_string())
}

/// Starts a registration from `page` and lets `k` answer; returns the finish body.
pub(super) async fn registration(
    gw: &Gateway,
    c: &Browser,
    k: &mut Key,
    page: &str,
    name: &str,
) -> (String, Value) {
    let csrf = gw.csrf(c, page).await;
    let (ceremony, options) = start(gw, c, &csrf, "register/start", json!({ "name": name })).await;
    let ccr: CreationChallengeResponse = serde_json::from_value(options).unwrap();
    let reg = k.do_registration(origin(gw), ccr).unwrap();
    (csrf, json!({ "ceremony": ceremony, "credential": reg }))
}

/// Registers a key for the signed-in browser from the account page.
pub(super) async fn register(gw: &Gateway, c: &Browser, k: &mut Key, name: &str) {
    let (csrf, body) = registration(gw, c, k, "/_portcullis/account", name).await;
    let r = call(gw, c, &csrf, "register/finish", body).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Password step in a fresh browser; the session then waits for its second factor.
pub(super) async fn after_password(gw: &Gateway, email: &str) -> Browser {
    gw.clock.advance(30);
    let c = gw.browser();
    let r = gw.password(&c, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    c
}

/// Runs a second-factor ceremony; `tamper` may change the options the key sees and the origin.
pub(super) async fn second_factor(
    gw: &Gateway,
    c: &Browser,
    k: &mut Key,
    tamper: impl FnOnce(&mut Value, &mut Url),
) -> (reqwest::Response, Value, String) {
    let csrf = gw.csrf(c, "/_portcullis/mfa").await;
    let (ceremony, mut options) = start(gw, c, &csrf, "authenticate/start", json!({})).await;
    let mut at = origin(gw);
    tamper(&mut options, &mut at);
    let rcr: RequestChallengeResponse = serde_json::from_value(options).unwrap();
    let cred = k.do_authentication(at, rcr).unwrap();
    let body = json!({ "ceremony": ceremony, "credential": cred });
    (
        call(gw, c, &csrf, "authenticate/finish", body.clone()).await,
        body,
        csrf,
    )
}

/// Runs a passkey sign-in from the login page. The software key keeps no discoverable
/// credentials, so the test plays the browser's part: it names the credential to use and
/// returns the user handle stored with it, as a discoverable authenticator would.
pub(super) async fn passkey(
    gw: &Gateway,
    c: &Browser,
    k: &mut Key,
    cred_id: &str,
    user_id: &str,
    tamper: impl FnOnce(&mut Value),
) -> (reqwest::Response, Value, String) {
    let csrf = gw.csrf(c, "/_portcullis/login").await;
    let (ceremony, mut options) = start(gw, c, &csrf, "passkey/start", json!({})).await;
    assert_eq!(options["publicKey"]["userVerification"], "required");
    assert!(options["publicKey"]["allowCredentials"]
        .as_array()
        .is_none_or(|a| a.is_empty()));
    options["publicKey"]["allowCredentials"] = json!([{ "type": "public-key", "id": cred_id }]);
    tamper(&mut options);
    let rcr: RequestChallengeResponse = serde_json::from_value(options).unwrap();
    let mut cred: PublicKeyCredential = k.do_authentication(origin(gw), rcr).unwrap();
    let handle = uuid::Uuid::parse_str(user_id).unwrap();
    cred.response.user_handle = Some(handle.as_bytes().to_vec().into());
    let body = json!({ "ceremony": ceremony, "credential": cred, "next": "/reports?x=1" });
    (
        call(gw, c, &csrf, "passkey/finish", body.clone()).await,
        body,
        csrf,
    )
}

/// The claims of the identity token the console received last.
pub(super) async fn last_claims(gw: &Gateway) -> portcullis::token::Claims {
    let token = gw.upstream.last_token();
    let jwks = gw.jwks().await;
    // The test clock runs ahead of the wall clock by the steps the tests take; the leeway covers
    // that (these tests check claims, not timing).
    let iss = gw.state.config.issuer();
    portcullis::token::verify(&token, &jwks, "esp-console", Some(&iss), 3600).unwrap()
}

/// A user's stored keys.
pub(super) async fn credentials(
    gw: &Gateway,
    user_id: &str,
) -> Vec<portcullis::store::WebauthnCredential> {
    gw.state
        .durable
        .webauthn_credentials(user_id)
        .await
        .unwrap()
}

pub(super) async fn only_credential(
    gw: &Gateway,
    user_id: &str,
) -> portcullis::store::WebauthnCredential {
    let mut creds = credentials(gw, user_id).await;
    assert_eq!(creds.len(), 1);
    creds.remove(0)
}

pub(super) async fn audited(gw: &Gateway, event: &str, outcome: &str) -> Vec<Option<String>> {
    gw.audit()
        .await
        .into_iter()
        .filter(|e| e.event == event && e.outcome == outcome)
        .map(|e| e.reason)
        .collect()
}

/// A registration answered with `expected` (status, error code): no key was stored for the
/// user, and the audit trail holds exactly these failure reasons.
pub(super) async fn registration_refused(
    gw: &Gateway,
    r: reqwest::Response,
    user_id: &str,
    expected: (u16, &str),
    reasons: &[&str],
) {
    assert_eq!(error_code(r).await, (expected.0, expected.1.to_string()));
    assert!(credentials(gw, user_id).await.is_empty());
    let want: Vec<Option<String>> = reasons.iter().map(|r| Some(r.to_string())).collect();
    assert_eq!(audited(gw, "webauthn_registered", "failure").await, want);
}

#[tokio::test]
async fn security_key_as_second_factor_gives_a_phishing_resistant_token() {
    let gw = gateway().await;
    let (c, user, mut k, _) = with_key(&gw, "keys@example.com", "Blue YubiKey").await;
    let html = page(&gw, &c, "/_portcullis/account").await;
    assert!(
        html.contains("Blue YubiKey") && html.contains("never"),
        "{html}"
    );
    let stored = only_credential(&gw, &user.id).await;
    assert!(
        !stored.passkey.contains("private"),
        "only public material is stored"
    );

    let c = after_password(&gw, "keys@example.com").await;
    let mfa = page(&gw, &c, "/_portcullis/mfa").await;
    assert!(mfa.contains("Use security key") && mfa.contains("data-webauthn=\"second-factor\""));
    let (r, _, _) = second_factor(&gw, &c, &mut k, |_, _| {}).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["redirect"], "/");
    assert_eq!(console(&gw, &c).await, 200);
    let claims = last_claims(&gw).await;
    assert_eq!(claims.sub, user.id);
    assert_eq!(claims.amr, vec!["pwd", "hwk"]);
    assert_eq!(claims.acr, "urn:portcullis:acr:phr");

    let used = only_credential(&gw, &user.id).await;
    assert!(used.last_used_at.is_some() && used.sign_count >= 1);
    assert_eq!(
        audited(&gw, "webauthn_registered", "success").await.len(),
        1
    );
    assert_eq!(
        audited(&gw, "second_factor", "success")
            .await
            .last()
            .cloned()
            .flatten()
            .as_deref(),
        Some("hwk")
    );
}

#[tokio::test]
async fn passkey_sign_in_counts_as_two_factors() {
    let gw = gateway().await;
    let (_, user, mut k, cred) = with_key(&gw, "pk@example.com", "Laptop").await;

    let fresh = gw.browser();
    let login = page(&gw, &fresh, "/_portcullis/login").await;
    assert!(login.contains("Sign in with a passkey"));
    let (r, _, _) = passkey(&gw, &fresh, &mut k, &cred.credential_id, &user.id, |_| {}).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["redirect"], "/reports?x=1");
    assert_eq!(
        fresh
            .get(gw.url("/reports?x=1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let claims = last_claims(&gw).await;
    assert_eq!(claims.sub, user.id);
    assert_eq!(claims.amr, vec!["hwk", "user"]);
    assert_eq!(claims.acr, "urn:portcullis:acr:phr");
    assert_eq!(audited(&gw, "passkey_sign_in", "success").await.len(), 1);
}

/// Another copy of the user's only key has since signed with higher counters: the stored
/// counter is ahead of what the test's key reports next. The key as stored before.
async fn counter_ahead(gw: &Gateway, user_id: &str) -> portcullis::store::WebauthnCredential {
    let cred = only_credential(gw, user_id).await;
    let mut pk: Value = serde_json::from_str(&cred.passkey).unwrap();
    pk["cred"]["counter"] = json!(100);
    let now = gw.clock.now();
    assert!(gw
        .state
        .durable
        .record_webauthn_use(&cred.id, &pk.to_string(), 100, now)
        .await
        .unwrap());
    cred
}

/// A step-up whose key answers as a copy of itself would suspends the key and ends every
/// session, this one too: the page is told so, with the way to sign in again (not "try
/// again", which can no longer succeed).
#[tokio::test]
async fn a_step_up_with_a_copied_key_says_the_session_ended() {
    let gw = gateway().await;
    let (c, user, mut k, _) = with_key(&gw, "copied-key@example.com", "Key").await;
    assert_eq!(console(&gw, &c).await, 200);
    counter_ahead(&gw, &user.id).await;
    let html = gw.page(&c, "/_portcullis/reauth?next=%2Fcampaigns").await;
    let csrf = extract(&html, "data-csrf=\"", "\"").unwrap();
    let v: Value = call(&gw, &c, &csrf, "reauth/start", json!({}))
        .await
        .json()
        .await
        .unwrap();
    let rcr: RequestChallengeResponse = serde_json::from_value(v["options"].clone()).unwrap();
    let answer = k.do_authentication(origin(&gw), rcr).unwrap();
    let body = json!({ "ceremony": v["ceremony"], "credential": answer, "next": "/campaigns" });
    let r = call(&gw, &c, &csrf, "reauth/finish", body).await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "session_ended");
    assert_eq!(
        v["login"],
        "/_portcullis/login?next=%2Fcampaigns&notice=key_suspended"
    );
    let login = gw.page(&gw.browser(), v["login"].as_str().unwrap()).await;
    assert!(login.contains("was suspended"), "{login}");
    gw.clock.advance(2);
    assert_eq!(console(&gw, &c).await, 303, "the session ended");
}

#[tokio::test]
async fn counter_going_backwards_refuses_and_suspends_the_key() {
    let gw = gateway().await;
    let (_, user, mut k, _) = with_key(&gw, "clone@example.com", "Key").await;
    let earlier = after_password(&gw, "clone@example.com").await;
    assert_eq!(
        second_factor(&gw, &earlier, &mut k, |_, _| {})
            .await
            .0
            .status(),
        200
    );
    assert_eq!(console(&gw, &earlier).await, 200);

    // Another copy of the key has since signed with higher counters: the stored counter is
    // ahead of what this one reports next.
    counter_ahead(&gw, &user.id).await;

    let c = after_password(&gw, "clone@example.com").await;
    let (r, _, _) = second_factor(&gw, &c, &mut k, |_, _| {}).await;
    assert_eq!(error_code(r).await, (401, "key_rejected".into()));
    assert_eq!(console(&gw, &c).await, 303);
    let cred = only_credential(&gw, &user.id).await;
    assert_eq!(cred.suspended_reason.as_deref(), Some("possible_clone"));
    assert_eq!(
        audited(&gw, "webauthn_possible_clone", "denied")
            .await
            .len(),
        1
    );
    // Which answer came from the copy cannot be told: the session the key proved earlier ends
    // too (it may be the copier's), and the owner is told why.
    gw.clock.advance(2);
    assert_ne!(console(&gw, &earlier).await, 200);
    assert!(gw
        .outbox()
        .await
        .iter()
        .any(|m| m.contains("answered as a copy of itself would")));

    // A suspended key is no longer offered or accepted, also not for passkey sign-in.
    let mfa = page(&gw, &c, "/_portcullis/mfa").await;
    assert!(!mfa.contains("Use security key"));
    let csrf = gw.csrf(&c, "/_portcullis/mfa").await;
    let (status, code) =
        error_code(call(&gw, &c, &csrf, "authenticate/start", json!({})).await).await;
    assert_eq!((status, code.as_str()), (404, "no_keys"));
    let (r, _, _) = passkey(
        &gw,
        &gw.browser(),
        &mut k,
        &cred.credential_id,
        &user.id,
        |_| {},
    )
    .await;
    // Said to be suspended: trying the same key again will not help.
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("This key is suspended"),
        "{v}"
    );
    let html = c.get(gw.url("/_portcullis/account")).send().await.unwrap();
    assert_eq!(html.status(), 303, "not signed in");
    // Were the suspended key the only factor, the password alone still would not enrol a new
    // one: the sign-in asks for the second factor (a recovery code), not for an enrolment.
    gw.drop_totp(&user.id).await;
    let b = gw.browser();
    let r = gw.password(&b, "clone@example.com", PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    // It asks for what the account has: no app, so a recovery code.
    let mfa = page(&gw, &b, "/_portcullis/mfa").await;
    assert!(
        mfa.contains(">A recovery code</label>") && !mfa.contains("authenticator app"),
        "{mfa}"
    );
}

#[tokio::test]
async fn a_challenge_answers_once() {
    let gw = gateway().await;
    let (c, _, _) = gw.signed_in("replay@example.com").await;
    let user = user(&gw, "replay@example.com").await;
    let mut k = key();
    // Registration: the same finish twice.
    let (csrf, body) = registration(&gw, &c, &mut k, "/_portcullis/account", "Once").await;
    assert_eq!(
        call(&gw, &c, &csrf, "register/finish", body.clone())
            .await
            .status(),
        200
    );
    let again = call(&gw, &c, &csrf, "register/finish", body).await;
    assert_eq!(error_code(again).await, (400, "ceremony_expired".into()));
    let cred = only_credential(&gw, &user.id).await;

    // Passkey sign-in: the same finish twice (from the same browser).
    let b = gw.browser();
    // The browser's form cookie before the sign-in, known here: the ceremony is bound to it.
    let old_cookie = format!("portcullis-csrf={}", "c".repeat(43));
    b.jar.add_cookie_str(&old_cookie, &gw.base.parse().unwrap());
    let (r, body, old_csrf) = passkey(&gw, &b, &mut k, &cred.credential_id, &user.id, |_| {}).await;
    assert_eq!(r.status(), 200);
    // The sign-in renewed the browser's form cookie; the answer sent again with the cookie and
    // token it was made with (a copy of the browser from before) finds the ceremony spent.
    let again = gw
        .api()
        .post(gw.url("/_portcullis/webauthn/passkey/finish"))
        .header("accept", "application/json")
        .header("x-csrf-token", &old_csrf)
        .header("cookie", &old_cookie)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(again).await, (400, "ceremony_expired".into()));
    // From the browser itself, its token of before is refused as an old form.
    let again = call(&gw, &b, &old_csrf, "passkey/finish", body).await;
    assert_eq!(error_code(again).await, (403, "csrf".into()));

    // Second factor: a recorded answer replayed into a new sign-in's ceremony.
    let c1 = after_password(&gw, "replay@example.com").await;
    let (r, old, _) = second_factor(&gw, &c1, &mut k, |_, _| {}).await;
    assert_eq!(r.status(), 200);
    let c2 = after_password(&gw, "replay@example.com").await;
    let csrf = gw.csrf(&c2, "/_portcullis/mfa").await;
    let (ceremony, _) = start(&gw, &c2, &csrf, "authenticate/start", json!({})).await;
    let replay = json!({ "ceremony": ceremony, "credential": old["credential"] });
    let r = call(&gw, &c2, &csrf, "authenticate/finish", replay.clone()).await;
    assert_eq!(error_code(r).await, (401, "key_rejected".into()));
    // And the old ceremony itself cannot be finished by another browser.
    let r = call(&gw, &c2, &csrf, "authenticate/finish", old).await;
    assert_eq!(error_code(r).await.0, 401);
    assert_eq!(console(&gw, &c2).await, 303);

    // A ceremony sent by another sign-in is refused there and stays its own sign-in's: the
    // other cannot make it fail by sending it first.
    let c3 = after_password(&gw, "replay@example.com").await;
    let csrf3 = gw.csrf(&c3, "/_portcullis/mfa").await;
    let (ceremony, options) = start(&gw, &c3, &csrf3, "authenticate/start", json!({})).await;
    let rcr: RequestChallengeResponse = serde_json::from_value(options).unwrap();
    let cred = k.do_authentication(origin(&gw), rcr).unwrap();
    let answer = json!({ "ceremony": ceremony, "credential": cred });
    let r = call(&gw, &c2, &csrf, "authenticate/finish", answer.clone()).await;
    assert_eq!(error_code(r).await.0, 401);
    let r = call(&gw, &c3, &csrf3, "authenticate/finish", answer).await;
    assert_eq!(r.status(), 200);
    assert_eq!(console(&gw, &c3).await, 200);
    let reasons = audited(&gw, "second_factor", "failure").await;
    assert!(
        reasons.contains(&Some("wrong_challenge".into())),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn an_expired_ceremony_is_refused() {
    let gw = gateway().await;
    let (c, _, _) = gw.signed_in("slow@example.com").await;
    let user = user(&gw, "slow@example.com").await;
    let mut k = key();
    let (csrf, body) = registration(&gw, &c, &mut k, "/_portcullis/account", "Slow").await;
    let timeout = gw.state.config.webauthn.ceremony_timeout.as_secs() as i64;
    gw.clock.advance(timeout + 1);
    let r = call(&gw, &c, &csrf, "register/finish", body).await;
    registration_refused(
        &gw,
        r,
        &user.id,
        (400, "ceremony_expired"),
        &["ceremony_expired"],
    )
    .await;
}

#[tokio::test]
async fn user_verification_is_required_for_passkeys() {
    let gw = gateway().await;
    let (_, user, mut k, cred) = with_key(&gw, "uv@example.com", "Key").await;
    // A client that skips user verification: the key signs with "user present" only.
    let (r, _, _) = passkey(
        &gw,
        &gw.browser(),
        &mut k,
        &cred.credential_id,
        &user.id,
        |o| {
            o["publicKey"]["userVerification"] = json!("discouraged");
        },
    )
    .await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "key_rejected");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("did not check your PIN or fingerprint"),
        "{v}"
    );
    assert!(audited(&gw, "passkey_sign_in", "failure")
        .await
        .contains(&Some("user_not_verified".into())));
    // Same as second factor under the default `user_verification = "required"`.
    let c = after_password(&gw, "uv@example.com").await;
    let (r, _, _) = second_factor(&gw, &c, &mut k, |o, _| {
        o["publicKey"]["userVerification"] = json!("discouraged");
    })
    .await;
    assert_eq!(error_code(r).await.0, 401);
    assert_eq!(console(&gw, &c).await, 303);
}

#[tokio::test]
async fn an_answer_made_for_another_origin_is_refused() {
    let gw = gateway().await;
    let (c, _, _) = gw.signed_in("phish@example.com").await;
    let mut k = key();
    register(&gw, &c, &mut k, "Key").await;
    let c = after_password(&gw, "phish@example.com").await;
    // A look-alike site on another port relays our challenge to the user's key.
    let (r, _, _) = second_factor(&gw, &c, &mut k, |_, at| {
        at.set_port(Some(1)).unwrap();
    })
    .await;
    assert_eq!(error_code(r).await, (401, "key_rejected".into()));
    assert!(audited(&gw, "second_factor", "failure")
        .await
        .contains(&Some("wrong_origin".into())));
    assert_eq!(console(&gw, &c).await, 303);
}

#[tokio::test]
async fn json_calls_need_the_csrf_header_and_our_origin() {
    let gw = gateway().await;
    let (c, _, _) = gw.signed_in("csrf@example.com").await;
    let csrf = gw.csrf(&c, "/_portcullis/account").await;
    let path = "/_portcullis/webauthn/register/start";
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no token", vec![]),
        ("wrong token", vec![("x-csrf-token", "A".repeat(43))]),
        (
            "foreign origin",
            vec![
                ("x-csrf-token", csrf.clone()),
                ("origin", "http://evil.example".into()),
            ],
        ),
        (
            "cross-site fetch",
            vec![
                ("x-csrf-token", csrf.clone()),
                ("sec-fetch-site", "cross-site".into()),
            ],
        ),
    ];
    for (what, headers) in cases {
        let mut req = c
            .post(gw.url(path))
            .header("accept", "application/json")
            .json(&json!({}));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let (status, code) = error_code(req.send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (403, "csrf"), "{what}");
    }
    for p in [
        "passkey/start",
        "authenticate/start",
        "passkey/finish",
        "authenticate/finish",
    ] {
        let r = c
            .post(gw.url(&format!("/_portcullis/webauthn/{p}")))
            .header("accept", "application/json")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{p}");
    }
    // Not JSON, or malformed JSON: a clear 4xx.
    let r = c
        .post(gw.url(path))
        .header("accept", "application/json")
        .header("x-csrf-token", &csrf)
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = call(
        &gw,
        &c,
        &csrf,
        "register/finish",
        json!({"ceremony": "x", "credential": {"id": 1}}),
    )
    .await;
    assert_eq!(error_code(r).await, (400, "invalid_input".into()));
    let r = call(
        &gw,
        &c,
        &csrf,
        "register/start",
        json!({"name": "x".repeat(65)}),
    )
    .await;
    // A key name refused here is refused as on the rename form: what was typed.
    assert_eq!(error_code(r).await, (400, "invalid_input".into()));
}

/// Anyone may start a passkey sign-in, and each start is held as a challenge until it times
/// out: one address gets a hundred a window, then `429` with `Retry-After` (nothing more is
/// held), while another address still starts its own.
#[tokio::test]
async fn passkey_starts_are_bounded_per_address() {
    let gw = Gateway::start_with(localhost).await;
    let c = gw.browser();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    for i in 0..100 {
        let r = call(&gw, &c, &csrf, "passkey/start", json!({})).await;
        assert_eq!(r.status(), 200, "start {i}");
    }
    let r = call(&gw, &c, &csrf, "passkey/start", json!({})).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let (status, code) = error_code(r).await;
    assert_eq!((status, code.as_str()), (429, "too_many_attempts"));
    // Refused by its own budget, the address takes nothing from the one all addresses share
    // (200 a second): hundreds more at once leave another address's start alone.
    let more = (0..300).map(|_| call(&gw, &c, &csrf, "passkey/start", json!({})));
    for r in futures_util::future::join_all(more).await {
        assert_eq!(r.status(), 429);
    }
    let other = gw.browser_moved_to(&c, "127.0.0.9");
    let r = call(&gw, &other, &csrf, "passkey/start", json!({})).await;
    assert_eq!(r.status(), 200, "another address is held back too");
}

#[tokio::test]
async fn an_ip_address_public_url_switches_keys_off() {
    let gw = Gateway::start().await;
    let c = gw.browser();
    let login = page(&gw, &c, "/_portcullis/login").await;
    assert!(!login.contains("passkey"));
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    let (status, code) = error_code(call(&gw, &c, &csrf, "passkey/start", json!({})).await).await;
    assert_eq!((status, code.as_str()), (404, "webauthn_unavailable"));
}

#[tokio::test]
async fn preferred_user_verification_accepts_a_touch_after_the_password() {
    let gw = Gateway::start_with(|c| {
        localhost(c);
        c.webauthn.user_verification = portcullis::config::UserVerification::Preferred;
    })
    .await;
    let (c, _, _) = gw.signed_in("touch@example.com").await;
    // What the browser is asked: a touch preferred, a credential the sign-in names (Chromium
    // has a key without a PIN set one before it makes a discoverable one), and no key
    // protection that only goes with user verification required (Chromium refuses that
    // pairing before any key is asked).
    let csrf = gw.csrf(&c, "/_portcullis/account").await;
    let (_, options) = start(&gw, &c, &csrf, "register/start", json!({ "name": "k" })).await;
    let asked = &options["publicKey"];
    assert_eq!(
        asked["authenticatorSelection"]["userVerification"],
        "preferred"
    );
    assert_eq!(
        asked["authenticatorSelection"]["residentKey"],
        "discouraged"
    );
    assert_eq!(
        asked["extensions"]["credentialProtectionPolicy"],
        "userVerificationOptionalWithCredentialIDList",
        "{asked}"
    );
    // A key without PIN or biometric.
    let mut k: Key = WebauthnAuthenticator::new(SoftPasskey::new(false));
    register(&gw, &c, &mut k, "Plain key").await;
    let c = after_password(&gw, "touch@example.com").await;
    let (r, _, _) = second_factor(&gw, &c, &mut k, |_, _| {}).await;
    assert_eq!(r.status(), 200);
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    assert_eq!(last_claims(&gw).await.amr, vec!["pwd", "hwk"]);
}

#[tokio::test]
async fn failed_keys_count_like_wrong_codes() {
    let gw = gateway().await;
    let (_, _, mut k, _) = with_key(&gw, "tries@example.com", "Key").await;
    let c = after_password(&gw, "tries@example.com").await;
    let per_login = gw.state.config.limits.second_factor_failures_per_login;
    let mut last = (0, String::new());
    for _ in 0..per_login {
        let (r, _, _) = second_factor(&gw, &c, &mut k, |_, at| {
            at.set_port(Some(1)).unwrap();
        })
        .await;
        last = error_code(r).await;
    }
    // The last failure ends the sign-in: it starts again from the password.
    assert_eq!(last, (401, "restart".into()));
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    let r = call(&gw, &c, &csrf, "authenticate/start", json!({})).await;
    assert_eq!(error_code(r).await, (401, "session_required".into()));
    assert_eq!(console(&gw, &c).await, 303);
}

/// Passkey sign-ins from an address whose failure budget is spent are refused with `429`, also
/// with a valid key, unless the browser is a known device of the key's owner; a flood of them is
/// one row and one summary in the trail.
#[tokio::test]
async fn a_passkey_flood_from_one_address_is_throttled_and_summarised() {
    const BUDGET: u64 = 2;
    const REFUSED: usize = 12;
    const OTHER_REPLAYS: usize = 5;
    const DEVICE_BUDGET: u64 = 2;
    let gw = Gateway::start_with(|c| {
        localhost(c);
        c.limits.failures_per_ip = BUDGET;
        c.limits.failures_per_device = DEVICE_BUDGET;
    })
    .await;
    let (owner, user, mut k, cred) = with_key(&gw, "flood@example.com", "Key").await;
    let b = gw.browser();
    let (r, body, _) = passkey(&gw, &b, &mut k, &cred.credential_id, &user.id, |_| {}).await;
    assert_eq!(r.status(), 200);
    // Replays of the used answer from a browser that is no known device fail and spend the
    // address's budget...
    let (other, _, _) = gw.signed_in("other@example.com").await;
    // Both signed out: their device cookies stay, and the login page is theirs again.
    for c in [&owner, &other] {
        let csrf = gw.csrf(c, "/_portcullis/logout").await;
        let r = post_form(&gw, c, "/_portcullis/logout", &[("csrf", csrf.as_str())]).await;
        assert!(r.status().is_success() || r.status().is_redirection());
        assert_eq!(console(&gw, c).await, 303);
    }
    let attacker = gw.browser();
    let csrf = gw.csrf(&attacker, "/_portcullis/login").await;
    for _ in 0..BUDGET {
        let r = call(&gw, &attacker, &csrf, "passkey/finish", body.clone()).await;
        assert_eq!(error_code(r).await, (400, "ceremony_expired".into()));
    }
    // ...after which even a fresh, valid answer from that address is refused.
    for i in 0..REFUSED {
        let r = call(&gw, &attacker, &csrf, "passkey/finish", body.clone()).await;
        assert_eq!(r.status(), 429, "attempt {i}");
        assert!(r.headers().contains_key("retry-after"), "attempt {i}");
    }
    let fresh = gw.browser();
    let (r, _, _) = passkey(&gw, &fresh, &mut k, &cred.credential_id, &user.id, |_| {}).await;
    assert_eq!(r.status(), 429, "a valid key from the same address");
    // A known device of someone else does not lift the budget...
    let (r, _, _) = passkey(&gw, &other, &mut k, &cred.credential_id, &user.id, |_| {}).await;
    assert_eq!(r.status(), 429, "another account's device");
    // Nor does it let failures past the spent budget (each would be a row in the trail).
    let csrf_other = gw.csrf(&other, "/_portcullis/login").await;
    for i in 0..OTHER_REPLAYS {
        let r = call(&gw, &other, &csrf_other, "passkey/finish", body.clone()).await;
        assert_eq!(r.status(), 429, "replay {i} with another account's device");
    }
    // ...but the owner's own known device signs in from the flooded address.
    let (r, _, _) = passkey(&gw, &owner, &mut k, &cred.credential_id, &user.id, |_| {}).await;
    assert_eq!(r.status(), 200, "the owner's known device");
    assert_eq!(console(&gw, &owner).await, 200);
    // The owner's device has a budget of its own, which its own failures spend.
    let csrf = gw.csrf(&owner, "/_portcullis/logout").await;
    post_form(
        &gw,
        &owner,
        "/_portcullis/logout",
        &[("csrf", csrf.as_str())],
    )
    .await;
    for i in 0..DEVICE_BUDGET {
        let (r, _, _) = passkey(&gw, &owner, &mut k, &cred.credential_id, &user.id, |o| {
            o["publicKey"]["challenge"] = json!("AAAAAAAAAAAAAAAAAAAAAA");
        })
        .await;
        let status = r.status().as_u16();
        assert!(status == 400 || status == 401, "failure {i}: {status}");
    }
    let (r, _, _) = passkey(&gw, &owner, &mut k, &cred.credential_id, &user.id, |_| {}).await;
    assert_eq!(r.status(), 429, "the device's own budget spent");
    let throttled: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "passkey_sign_in" && e.outcome == "denied")
        .map(|e| (e.reason, e.times))
        .collect();
    assert_eq!(
        throttled,
        [
            (Some("throttled".to_string()), 1),
            (Some("throttled".to_string()), 1),
            (
                Some("throttled".to_string()),
                (REFUSED + OTHER_REPLAYS) as i64 + 1
            )
        ],
        "the address's first refusal at once, then the device's, then the address's other {} \
         in one summary",
        REFUSED + OTHER_REPLAYS + 1
    );
    assert_eq!(
        audited(&gw, "passkey_sign_in", "failure").await.len(),
        (BUDGET + DEVICE_BUDGET) as usize
    );
    // And counted as throttled, by budget.
    let metric = |limit| super::throttle::throttled_metric(&gw, limit);
    assert_eq!(metric("ip"), (REFUSED + OTHER_REPLAYS + 2) as f64);
    assert_eq!(metric("device"), 1.0);
}

/// Passkey attempts take from the address's budget before they are looked at: sixty failing
/// at once against a budget of three give exactly three failures and fifty-seven refusals
/// (on Redis, where every store operation is a round trip that others can overtake).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_passkey_failures_cannot_exceed_the_budget() {
    const BUDGET: u64 = 3;
    let gw = Gateway::start_with(|c| {
        localhost(c);
        c.storage.ephemeral = "redis://127.0.0.1:6379/".into();
        c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
        c.limits.failures_per_ip = BUDGET;
    })
    .await;
    let (_, user, mut k, cred) = with_key(&gw, "burst@example.com", "Key").await;
    let (r, body, _) = passkey(
        &gw,
        &gw.browser(),
        &mut k,
        &cred.credential_id,
        &user.id,
        |_| {},
    )
    .await;
    assert_eq!(r.status(), 200);
    let attacker = gw.browser();
    let csrf = gw.csrf(&attacker, "/_portcullis/login").await;
    let posts = (0..60)
        .map(|_| {
            attacker
                .post(gw.url("/_portcullis/webauthn/passkey/finish"))
                .header("accept", "application/json")
                .header("x-csrf-token", csrf.as_str())
                .json(&body)
        })
        .collect();
    let mut statuses = super::bad_input::all_at_once(posts).await;
    statuses.sort_unstable();
    let expected: Vec<u16> = [400; BUDGET as usize]
        .into_iter()
        .chain([429; 57])
        .collect();
    assert_eq!(statuses, expected);
}

/// A passkey is no phishing target, but an intruder with a session can add one of their own,
/// which would sign them in again whatever the lock on passwords. Reporting the intruder's
/// sign-in suspends every key registered since; the owner's older passkey still signs in.
#[tokio::test]
async fn a_reported_sign_in_takes_the_keys_it_added_with_it() {
    let gw = gateway().await;
    let email = "reported@example.com";
    let (owner, secret, _) = gw.signed_in(email).await;
    let u = user(&gw, email).await;
    let mut owners_key = key();
    register(&gw, &owner, &mut owners_key, "Owner's key").await;
    let owners = only_credential(&gw, &u.id).await;
    gw.clock.advance(3600);

    let thief = gw.browser();
    gw.sign_in_on(&thief, email, &secret).await;
    let mut thiefs_key = key();
    register(&gw, &thief, &mut thiefs_key, "Mine now").await;
    let thiefs = credentials(&gw, &u.id)
        .await
        .into_iter()
        .find(|c| c.id != owners.id)
        .unwrap();

    let mut notices = gw.outbox().await;
    notices.retain(|m| m.contains("Subject: New sign-in to your account"));
    let link = super::devices::report_link(notices.last().unwrap());
    assert_eq!(super::devices::report(&gw, &link).await.status(), 200);

    let creds = credentials(&gw, &u.id).await;
    let state = |id: &str| creds.iter().find(|c| c.id == id).unwrap().is_suspended();
    assert!(state(&thiefs.id), "the intruder's key is suspended");
    assert!(!state(&owners.id), "the owner's older key is not");
    assert_eq!(audited(&gw, "webauthn_suspended", "success").await.len(), 1);

    gw.clock.advance(30);
    let (r, _, _) = passkey(
        &gw,
        &gw.browser(),
        &mut thiefs_key,
        &thiefs.credential_id,
        &u.id,
        |_| {},
    )
    .await;
    assert_ne!(r.status(), 200, "the intruder's passkey signs nobody in");
    let (r, _, _) = passkey(
        &gw,
        &gw.browser(),
        &mut owners_key,
        &owners.credential_id,
        &u.id,
        |_| {},
    )
    .await;
    assert_eq!(r.status(), 200, "the owner's passkey still does");
}

/// A passkey added with the owner's session long before (the notice of it unseen) signs an
/// intruder in from a browser of their own: reporting that sign-in suspends the key that made
/// it, however old, so the report takes away the one thing the intruder is known to hold.
#[tokio::test]
async fn a_reported_passkey_sign_in_suspends_the_key_that_made_it() {
    let gw = gateway().await;
    let email = "old-passkey@example.com";
    let (owner, _, _) = gw.signed_in(email).await;
    let u = user(&gw, email).await;
    let mut planted = key();
    register(&gw, &owner, &mut planted, "Phone passkey").await;
    let cred = only_credential(&gw, &u.id).await;
    gw.clock.advance(3600);
    assert_eq!(planted_sign_in(&gw, &mut planted, &cred, &u.id).await, 200);
    let mut notices = gw.outbox().await;
    notices.retain(|m| m.contains("Subject: New sign-in to your account"));
    let notice = notices.last().unwrap();
    assert!(
        notice.contains("suspends the security keys and passkeys used or added since"),
        "{notice}"
    );
    gw.clock.advance(600);
    let link = super::devices::report_link(notice);
    assert_eq!(super::devices::report(&gw, &link).await.status(), 200);

    assert!(
        only_credential(&gw, &u.id).await.is_suspended(),
        "the key is suspended"
    );
    gw.clock.advance(30);
    assert_ne!(
        planted_sign_in(&gw, &mut planted, &cred, &u.id).await,
        200,
        "the passkey signs nobody in any more"
    );
}

/// A passkey sign-in with key `k` (registered as `cred`) from a browser of its own.
async fn planted_sign_in(
    gw: &Gateway,
    k: &mut Key,
    cred: &portcullis::store::WebauthnCredential,
    user_id: &str,
) -> u16 {
    let c = gw.browser();
    let (r, _, _) = passkey(gw, &c, k, &cred.credential_id, user_id, |_| {}).await;
    r.status().as_u16()
}

/// The token's `acr` and `auth_time` describe the session's latest proof: after a key step-up
/// they say phishing-resistant at that moment; after a later app code, `mfa` at the code's
/// moment, so a console asking for a fresh key proof is not shown an old one as fresh. A
/// `[[step_up]]` rule that wants a key agrees: after the code, the key is asked for again.
#[tokio::test]
async fn acr_and_auth_time_follow_the_latest_proof() {
    let gw = Gateway::start_with(|c| {
        localhost(c);
        c.step_up = vec![portcullis::policy::step_up::StepUpRule {
            path: "/api-keys/**".into(),
            methods: vec![],
            max_age: std::time::Duration::from_secs(3600),
            key: true,
        }];
    })
    .await;
    let (c, secret, _) = gw.signed_in("latest@example.com").await;
    let mut k = key();
    register(&gw, &c, &mut k, "Desk").await;
    assert_eq!(console(&gw, &c).await, 200);
    let signed_in = last_claims(&gw).await;
    assert_eq!(signed_in.acr, "urn:portcullis:acr:mfa");

    gw.clock.advance(120);
    let html = gw.page(&c, "/_portcullis/reauth?next=%2Fcampaigns").await;
    let csrf = extract(&html, "data-csrf=\"", "\"").unwrap();
    let r = call(&gw, &c, &csrf, "reauth/start", json!({})).await;
    let v: Value = r.json().await.unwrap();
    let rcr: RequestChallengeResponse = serde_json::from_value(v["options"].clone()).unwrap();
    let cred = k.do_authentication(origin(&gw), rcr).unwrap();
    let body = json!({ "ceremony": v["ceremony"], "credential": cred, "next": "/campaigns" });
    assert_eq!(
        call(&gw, &c, &csrf, "reauth/finish", body).await.status(),
        200
    );
    assert_eq!(console(&gw, &c).await, 200);
    let keyed = last_claims(&gw).await;
    assert_eq!(keyed.acr, "urn:portcullis:acr:phr");
    assert_eq!(gw.status(&c, "/api-keys").await, 200, "the key rule is met");
    assert!(keyed.amr.contains(&"hwk".to_string()));
    assert!(keyed.auth_time >= signed_in.auth_time + 120);

    gw.clock.advance(300);
    let r = super::risk::reauth_with_code(&gw, &c, &secret, "/campaigns").await;
    assert_eq!(r.status(), 303);
    assert_eq!(console(&gw, &c).await, 200);
    let coded = last_claims(&gw).await;
    assert_eq!(
        coded.acr, "urn:portcullis:acr:mfa",
        "an old key proof is no fresh one"
    );
    assert!(coded.auth_time >= keyed.auth_time + 300);
    // Each of these proofs is a second factor of the user's own: `factor_time` follows them.
    for claims in [&signed_in, &keyed, &coded] {
        assert_eq!(claims.factor_time, Some(claims.auth_time), "{claims:?}");
    }
    // The key proof is within the rule's hour, but the latest proof is a code: the key again.
    let r = gw.get(&c, "/api-keys").await;
    assert_eq!(location(&r), "/_portcullis/reauth?next=%2Fapi-keys&key=1");
    assert!(
        coded.amr.contains(&"hwk".to_string()),
        "amr: every method the session used"
    );
}
