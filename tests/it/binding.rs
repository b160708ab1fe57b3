//! Sessions bound to the device: DBSC driven by a test client that implements the browser side
//! (a P-256 key, proof JWTs), the WebCrypto fallback protocol driven the same way, and the
//! copied-cookie attack.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{json, Value};

use super::harness::{binding_on, extract, location, raw, Browser, Gateway};

/// The browser side of both methods: a P-256 key and the proofs it signs.
pub(super) struct Device {
    key: SigningKey,
}

impl Device {
    pub(super) fn new() -> Self {
        Self {
            key: SigningKey::random(&mut rand::rngs::OsRng),
        }
    }

    fn jwk(&self) -> Value {
        let p = self.key.verifying_key().to_encoded_point(false);
        let b = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
        json!({"kty": "EC", "crv": "P-256", "x": b(p.x().unwrap()), "y": b(p.y().unwrap())})
    }

    /// A `dbsc+jwt` proof of `jti`; registration proofs carry the public key.
    pub(super) fn proof(&self, jti: &str, with_jwk: bool) -> String {
        let mut header = json!({"alg": "ES256", "typ": "dbsc+jwt"});
        if with_jwk {
            header["jwk"] = self.jwk();
        }
        let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string().as_bytes());
        let input = format!("{}.{}", enc(&header), enc(&json!({ "jti": jti })));
        let sig: Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

const TTL_SECS: i64 = 600;

pub(super) async fn gateway() -> Gateway {
    Gateway::start_with(binding_on).await
}

/// The challenge of a `Secure-Session-Registration` header.
fn registration_challenge(r: &reqwest::Response) -> String {
    let v = r
        .headers()
        .get("secure-session-registration")
        .expect("a registration header")
        .to_str()
        .unwrap();
    assert!(
        v.starts_with("(ES256 RS256);path=\"/_portcullis/dbsc/register\";challenge=\""),
        "{v}"
    );
    extract(v, "challenge=\"", "\"").unwrap()
}

fn set_cookie_named(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

/// Posts a DBSC registration proof with `b`'s cookies.
async fn dbsc_register(gw: &Gateway, b: &reqwest::Client, proof: String) -> reqwest::Response {
    b.post(gw.url("/_portcullis/dbsc/register"))
        .header("secure-session-response", proof)
        .send()
        .await
        .unwrap()
}

/// Registers `dev` through DBSC for the signed-in browser `b`; returns the instructions.
async fn bind_dbsc(gw: &Gateway, b: &Browser, dev: &Device) -> Value {
    let page = gw.get(b, "/_portcullis/bind").await;
    let challenge = registration_challenge(&page);
    let r = dbsc_register(gw, b, dev.proof(&challenge, true)).await;
    assert_eq!(r.status(), 200);
    assert!(set_cookie_named(&r, "portcullis-bound").is_some());
    r.json().await.unwrap()
}

/// The first step of a DBSC refresh: 403 with `Secure-Session-Challenge`; returns the challenge.
async fn refresh_challenge(gw: &Gateway, b: &Browser, sid: &str) -> String {
    let r = b
        .post(gw.url("/_portcullis/dbsc/refresh"))
        .header("sec-secure-session-id", sid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let ch = r
        .headers()
        .get("secure-session-challenge")
        .expect("a challenge")
        .to_str()
        .unwrap()
        .to_string();
    assert!(ch.ends_with(&format!(";id=\"{sid}\"")), "{ch}");
    extract(&ch, "\"", "\"").unwrap()
}

/// Answers a refresh challenge with `proof` (under the header's older name when `legacy`).
async fn refresh_with(gw: &Gateway, b: &Browser, proof: String, legacy: bool) -> reqwest::Response {
    let name = if legacy {
        "sec-session-response"
    } else {
        "secure-session-response"
    };
    b.post(gw.url("/_portcullis/dbsc/refresh"))
        .header(name, proof)
        .send()
        .await
        .unwrap()
}

/// The DBSC refresh as the browser runs it: 403 with a challenge, then the proof.
async fn dbsc_refresh(gw: &Gateway, b: &Browser, dev: &Device, sid: &str) -> reqwest::Response {
    let challenge = refresh_challenge(gw, b, sid).await;
    // The older header name is accepted as well.
    refresh_with(gw, b, dev.proof(&challenge, false), true).await
}

/// A JSON call of the interstitial's script.
async fn bind_api(gw: &Gateway, b: &Browser, path: &str, body: Value) -> reqwest::Response {
    let csrf = gw.csrf(b, "/_portcullis/bind").await;
    b.post(gw.url(&format!("/_portcullis/bind/{path}")))
        .header("x-csrf-token", csrf)
        .header("accept", "application/json")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn webcrypto_challenge(gw: &Gateway, b: &Browser) -> Value {
    let r = bind_api(gw, b, "challenge", json!({})).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The fallback's registration: a challenge, then the proof with the public key.
pub(super) async fn bind_webcrypto(gw: &Gateway, b: &Browser, dev: &Device) {
    let r = register_webcrypto(gw, b, dev, None).await;
    assert_eq!(r.status(), 200);
}

/// A registration of `dev` whose challenge `kept` (the key the browser kept from its last
/// session) signs too, as the bind page does.
async fn register_webcrypto(
    gw: &Gateway,
    b: &Browser,
    dev: &Device,
    kept: Option<&Device>,
) -> reqwest::Response {
    let ch = webcrypto_challenge(gw, b).await;
    assert_eq!(ch["purpose"], "register");
    let challenge = ch["challenge"].as_str().unwrap();
    let proof = dev.proof(challenge, true);
    let previous = kept.map(|k| k.proof(challenge, false));
    bind_api(
        gw,
        b,
        "register",
        json!({ "proof": proof, "previous": previous }),
    )
    .await
}

/// The device cookie (`name=value`) in `b`'s jar.
pub(super) fn device_cookie_of(gw: &Gateway, b: &Browser) -> String {
    gw.cookies(b)
        .split("; ")
        .find(|c| c.starts_with("portcullis-device="))
        .expect("a device cookie")
        .to_string()
}

/// A fresh browser whose jar holds `cookie` (`name=value`) alone.
pub(super) fn browser_with(gw: &Gateway, cookie: &str) -> Browser {
    let c = gw.browser();
    c.jar
        .add_cookie_str(&format!("{cookie}; Path=/"), &gw.base.parse().unwrap());
    c
}

/// The fallback's renewal.
pub(super) async fn webcrypto_refresh(
    gw: &Gateway,
    b: &Browser,
    dev: &Device,
) -> reqwest::Response {
    let ch = webcrypto_challenge(gw, b).await;
    assert_eq!(ch["purpose"], "refresh");
    let proof = dev.proof(ch["challenge"].as_str().unwrap(), false);
    bind_api(gw, b, "refresh", json!({ "proof": proof })).await
}

/// What a browser does when the bound cookie's `Max-Age` runs out: it forgets it.
fn drop_bound_cookie(gw: &Gateway, b: &Browser) {
    b.jar.add_cookie_str(
        "portcullis-bound=; Max-Age=0; Path=/",
        &gw.base.parse().unwrap(),
    );
}

/// Audit events named `name`, oldest first.
async fn events(gw: &Gateway, name: &str) -> Vec<portcullis::store::AuditEvent> {
    gw.audit()
        .await
        .into_iter()
        .filter(|e| e.event == name)
        .collect()
}

async fn binding_failures(gw: &Gateway) -> Vec<portcullis::store::AuditEvent> {
    events(gw, "session_binding_failed").await
}

/// A browser that cannot prove the device key (it lost it, or runs no JavaScript) has a way out
/// on the device-check page: signing out there ends the session, and the sign-in page no longer
/// sends it back to the check (a link to the sign-in page did, for a session still complete).
#[tokio::test]
async fn the_device_check_page_lets_a_browser_that_cannot_prove_sign_out() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("stuck@example.com").await;
    let page = gw.page(&b, "/_portcullis/bind?next=%2Fcampaigns").await;
    assert!(page.contains(r#"action="/_portcullis/logout""#), "{page}");
    let csrf = extract(&page, "name=\"csrf\" value=\"", "\"").unwrap();
    let r = b
        .post(gw.url("/_portcullis/logout"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/login?notice=logged_out");
    let r = gw.get(&b, "/_portcullis/login").await;
    assert_eq!(
        r.status(),
        200,
        "the sign-in page sends the browser elsewhere"
    );
}

#[tokio::test]
async fn dbsc_registration_and_refresh_with_a_challenge() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("dbsc@example.com").await;
    // Complete but not bound: nothing reaches the console; a navigation goes to the interstitial.
    let r = gw.get(&b, "/campaigns?page=2").await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        location(&r),
        "/_portcullis/bind?next=%2Fcampaigns%3Fpage%3D2"
    );
    assert_eq!(gw.upstream.count(), 0);

    let dev = Device::new();
    let ins = bind_dbsc(&gw, &b, &dev).await;
    let sid = ins["session_identifier"].as_str().unwrap().to_string();
    assert_eq!(ins["refresh_url"], "/_portcullis/dbsc/refresh");
    assert_eq!(ins["scope"]["origin"], gw.base.as_str());
    assert_eq!(ins["credentials"][0]["type"], "cookie");
    assert_eq!(ins["credentials"][0]["name"], "portcullis-bound");
    assert!(ins["credentials"][0]["attributes"]
        .as_str()
        .unwrap()
        .contains("HttpOnly"));

    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    let seen = gw.upstream.last();
    assert!(
        !seen
            .header("cookie")
            .unwrap_or("")
            .contains("portcullis-bound"),
        "the bound cookie stays at the gateway"
    );
    let token = seen.header("x-portcullis-assertion").unwrap();
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["sid"],
        sid.as_str(),
        "the DBSC session is the gateway session"
    );

    // The cookie runs out; the browser refreshes it with a signed challenge.
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(&gw, &b);
    let r = dbsc_refresh(&gw, &b, &dev, &sid).await;
    assert_eq!(r.status(), 200);
    let cookie = set_cookie_named(&r, "portcullis-bound").unwrap();
    assert!(cookie.contains("Max-Age=595"), "{cookie}");
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["session_identifier"], sid.as_str());
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    assert!(binding_failures(&gw).await.is_empty());
    let bound = events(&gw, "session_bound").await;
    assert_eq!(bound.len(), 1);
    assert_eq!(bound[0].reason.as_deref(), Some("dbsc"));

    // A refresh naming another DBSC session is refused (under either header name).
    for name in ["sec-secure-session-id", "sec-session-id"] {
        let r = b
            .post(gw.url("/_portcullis/dbsc/refresh"))
            .header(name, "someone-else")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}");
        assert!(r.headers().get("secure-session-challenge").is_none());
    }
    // Without a session the browser is told to end its DBSC session.
    let r = gw
        .api()
        .post(gw.url("/_portcullis/dbsc/refresh"))
        .header("sec-secure-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["continue"], false);
}

#[tokio::test]
async fn the_sign_in_answer_offers_dbsc_registration() {
    let gw = gateway().await;
    gw.add_user("offer@example.com").await;
    let b = gw.browser();
    let (secret, _) = gw.enrol_totp(&b, "offer@example.com").await;
    let (_, r) = gw.save_recovery_codes(&b).await;
    assert_eq!(r.status(), 303);
    let challenge = registration_challenge(&r);
    let dev = Device::new();
    // An expired challenge: the browser is asked to register again, with a new one.
    gw.clock
        .advance(portcullis::binding::CHALLENGE_TTL.as_secs() as i64 + 1);
    let r = dbsc_register(&gw, &b, dev.proof(&challenge, true)).await;
    assert_eq!(r.status(), 403);
    let challenge = registration_challenge(&r);
    // The new challenge registers this session, once.
    let proof = dev.proof(&challenge, true);
    assert_eq!(dbsc_register(&gw, &b, proof.clone()).await.status(), 200);
    let r = dbsc_register(&gw, &b, proof).await;
    assert_eq!(r.status(), 403, "replayed");
    assert!(
        r.headers().get("secure-session-registration").is_none(),
        "bound already"
    );

    // A later sign-in (second factor) offers it too.
    let b2 = gw.browser();
    gw.clock.advance(30);
    gw.password(&b2, "offer@example.com", super::harness::PASSWORD, "")
        .await;
    let r = gw
        .code(&b2, "/_portcullis/mfa", &gw.totp_now(&secret))
        .await;
    assert_eq!(r.status(), 303);
    registration_challenge(&r);
}

#[tokio::test]
async fn an_expired_bound_cookie_asks_for_a_fresh_proof_and_is_no_failure() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("expired@example.com").await;
    bind_dbsc(&gw, &b, &Device::new()).await;
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    let before = gw.upstream.count();
    gw.clock.advance(TTL_SECS + 1);
    // The owner's client sends it a moment too late (one that ignores `Max-Age`, say): it is
    // asked to prove again, as when the cookie is missing, and nothing is counted against it.
    let r = gw.get(&b, "/campaigns").await;
    assert_eq!(location(&r), "/_portcullis/bind?next=%2Fcampaigns");
    for _ in 0..6 {
        let r = b
            .get(gw.url("/campaigns"))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "binding_refresh_required");
    }
    assert_eq!(gw.upstream.count(), before, "never forwarded");
    assert!(binding_failures(&gw).await.is_empty());
    assert!(!gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "session_suspended"));
}

#[tokio::test]
async fn a_wrong_key_gets_no_cookie() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("wrongkey@example.com").await;
    let dev = Device::new();
    let ins = bind_dbsc(&gw, &b, &dev).await;
    let sid = ins["session_identifier"].as_str().unwrap();
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(&gw, &b);
    let thief = Device::new();
    // Signed by another key; then another key bringing itself along in the header.
    for with_jwk in [false, true] {
        let challenge = refresh_challenge(&gw, &b, sid).await;
        let r = refresh_with(&gw, &b, thief.proof(&challenge, with_jwk), false).await;
        assert_eq!(r.status(), 403, "with its own jwk: {with_jwk}");
        assert!(set_cookie_named(&r, "portcullis-bound").is_none());
    }
    let reasons: Vec<_> = binding_failures(&gw)
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(reasons, ["proof_bad_signature", "proof_other_key"]);
    // Still no cookie: a DBSC browser never sends a request without it, so that counts too.
    assert_eq!(gw.status(&b, "/campaigns").await, 403);
    // The right key still works.
    assert_eq!(dbsc_refresh(&gw, &b, &dev, sid).await.status(), 200);
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
}

#[tokio::test]
async fn a_replayed_refresh_proof_is_refused() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("replay@example.com").await;
    let dev = Device::new();
    let ins = bind_dbsc(&gw, &b, &dev).await;
    let sid = ins["session_identifier"].as_str().unwrap();
    let proof = dev.proof(&refresh_challenge(&gw, &b, sid).await, false);
    let first = refresh_with(&gw, &b, proof.clone(), false).await;
    assert_eq!(first.status(), 200);
    let replay = refresh_with(&gw, &b, proof, false).await;
    assert_eq!(replay.status(), 403, "used challenge");
    assert!(set_cookie_named(&replay, "portcullis-bound").is_none());
    assert!(
        replay.headers().get("secure-session-challenge").is_some(),
        "a new challenge, as for a browser that raced itself"
    );
    // An expired challenge is refused the same way.
    let challenge = refresh_challenge(&gw, &b, sid).await;
    gw.clock
        .advance(portcullis::binding::CHALLENGE_TTL.as_secs() as i64 + 1);
    let r = refresh_with(&gw, &b, dev.proof(&challenge, false), false).await;
    assert_eq!(r.status(), 403);
    assert!(set_cookie_named(&r, "portcullis-bound").is_none());
}

/// The `name=value` pair of cookie `name` in `b`'s jar.
fn cookie_pair(b: &Browser, name: &str) -> String {
    b.cookie_header()
        .split("; ")
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_proof_for_another_session_is_refused() {
    let gw = gateway().await;
    let (a, _, _) = gw.signed_in("a@example.com").await;
    let (b, _, _) = gw.signed_in("b@example.com").await;
    let dev_a = Device::new();
    let dev_b = Device::new();
    bind_dbsc(&gw, &a, &dev_a).await;
    // B's registration challenge, signed and sent with A's cookies: refused, nothing changes.
    let page = gw.get(&b, "/_portcullis/bind").await;
    let b_challenge = registration_challenge(&page);
    let r = dbsc_register(&gw, &a, dev_b.proof(&b_challenge, true)).await;
    assert_eq!(r.status(), 403);
    // B's refresh challenge answered by A's key on A's session.
    let ins_b = bind_dbsc(&gw, &b, &dev_b).await;
    let b_refresh = refresh_challenge(&gw, &b, ins_b["session_identifier"].as_str().unwrap()).await;
    let r = refresh_with(&gw, &a, dev_a.proof(&b_refresh, false), false).await;
    assert_eq!(r.status(), 403);
    assert!(set_cookie_named(&r, "portcullis-bound").is_none());
    let reasons: Vec<_> = binding_failures(&gw)
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(
        reasons,
        ["proof_for_another_session", "proof_for_another_session"]
    );
    // A bound cookie of session A does not serve session B.
    let r = gw
        .api()
        .get(gw.url("/campaigns"))
        .header(
            "cookie",
            format!(
                "{}; {}",
                cookie_pair(&b, "portcullis-session"),
                cookie_pair(&a, "portcullis-bound")
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let last = binding_failures(&gw).await.pop().unwrap();
    assert_eq!(last.reason.as_deref(), Some("bound_cookie_invalid"));
}

#[tokio::test]
async fn the_webcrypto_fallback_binds_renews_and_never_loses_a_post() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("webcrypto@example.com").await;
    let r = gw.get(&b, "/reports").await;
    assert_eq!(location(&r), "/_portcullis/bind?next=%2Freports");
    let page = gw.page(&b, "/_portcullis/bind?next=%2Freports").await;
    assert!(page.contains("data-next=\"/reports\""), "{page}");
    assert!(page.contains("src=\"/_portcullis/static/binding.js\""));
    assert!(!page.contains("<script>"), "no inline script");
    let js = gw.get(&b, "/_portcullis/static/binding.js").await;
    assert_eq!(js.status(), 200);
    assert!(js
        .text()
        .await
        .unwrap()
        .contains("crypto.subtle.generateKey"));

    // The JSON calls need the page's CSRF token.
    let r = b
        .post(gw.url("/_portcullis/bind/challenge"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    assert_eq!(gw.status(&b, "/reports").await, 200);
    // The device record says how its sessions are bound, and the account page shows it.
    let user = gw.user("webcrypto@example.com").await;
    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    assert_eq!(devices[0].binding, "webcrypto");
    let account = gw.page(&b, "/_portcullis/account").await;
    assert!(
        account.contains("bound to a key kept by the browser"),
        "{account}"
    );
    // Registering again (another key, or the same) is refused: the first key keeps the session.
    let ch = webcrypto_challenge(&gw, &b).await;
    assert_eq!(ch["purpose"], "refresh");
    assert_eq!(ch["method"], "webcrypto");

    // The cookie runs out.
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(&gw, &b);
    let before = gw.upstream.count();
    // A navigation goes through the interstitial and back.
    let r = gw.get(&b, "/reports?x=1").await;
    assert_eq!(location(&r), "/_portcullis/bind?next=%2Freports%3Fx%3D1");
    // A form post is neither forwarded nor dropped: held until the proof (see
    // `a_form_sent_after_the_bound_cookie_ran_out_is_sent_after_the_proof`), or, too large to
    // hold, refused with a page that says what to do and links to the proof that returns to the
    // page the form was on.
    let r = b
        .post(gw.url("/campaigns/7/send"))
        .header("referer", gw.url("/campaigns/new?draft=7"))
        .form(&[("subject", "Hello")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(location(&r).starts_with("/_portcullis/bind?next=%2F_portcullis%2Fheld"));
    let big = "x".repeat(portcullis::http::held::HELD_MAX_BODY + 1);
    let r = b
        .post(gw.url("/campaigns/7/send"))
        .header("referer", gw.url("/campaigns/new?draft=7"))
        .form(&[("subject", big.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("device proof of this session has run out")
            && html.contains("<title>Confirm this browser")
            && html.contains("href=\"/_portcullis/bind?next=%2Fcampaigns%2Fnew%3Fdraft%3D7\""),
        "{html}"
    );
    assert!(!html.contains("Go to sign-in"), "the session is not over");
    // An API client gets JSON naming the renewal page.
    let r = b
        .post(gw.url("/api/campaigns"))
        .header("accept", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "binding_refresh_required");
    assert_eq!(v["bind"], "/_portcullis/bind");
    assert_eq!(gw.upstream.count(), before, "nothing forwarded");
    assert!(
        binding_failures(&gw).await.is_empty(),
        "an expiry is not an attack"
    );

    let r = webcrypto_refresh(&gw, &b, &dev).await;
    assert_eq!(r.status(), 200);
    assert!(set_cookie_named(&r, "portcullis-bound").is_some());
    assert_eq!(gw.status(&b, "/reports?x=1").await, 200);

    // Another key, or no key at all, gets nothing.
    drop_bound_cookie(&gw, &b);
    let r = webcrypto_refresh(&gw, &b, &Device::new()).await;
    assert_eq!(r.status(), 403);
    let ch = webcrypto_challenge(&gw, &b).await;
    assert!(ch["challenge"].is_string());
    let r = bind_api(&gw, &b, "refresh", json!({ "proof": null })).await;
    assert_eq!(r.status(), 403);
    let reasons: Vec<_> = binding_failures(&gw)
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(reasons, ["proof_bad_signature", "no_device_key"]);
}

#[tokio::test]
async fn copied_cookies_get_nothing_while_the_original_keeps_working() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("victim@example.com").await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    assert_eq!(gw.status(&b, "/inbox").await, 200);
    // Malware copies every cookie of the signed-in browser.
    let copied = gw.cookies(&b);
    for name in [
        "portcullis-session=",
        "portcullis-device=",
        "portcullis-bound=",
    ] {
        assert!(copied.contains(name), "{copied}");
    }
    let thief = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("thief-agent/1.0")
        .build()
        .unwrap();
    // Some minutes later the copied bound cookie has expired; the owner's browser renewed its own.
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(&gw, &b);
    assert_eq!(webcrypto_refresh(&gw, &b, &dev).await.status(), 200);
    let seen = gw.upstream.count();

    for accept in ["text/html", "application/json"] {
        let r = thief
            .get(gw.url("/inbox"))
            .header("cookie", &copied)
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        // Expired, and from another browser: the key must prove itself again, as for any
        // cookie that moved.
        assert_ne!(r.status(), 200, "{accept}");
    }
    assert_eq!(gw.upstream.count(), seen, "nothing forwarded");
    // Without the stale bound cookie it is sent to prove possession, which it cannot.
    let without_bound: String = copied
        .split("; ")
        .filter(|c| !c.starts_with("portcullis-bound="))
        .collect::<Vec<_>>()
        .join("; ");
    let r = thief
        .get(gw.url("/inbox"))
        .header("cookie", &without_bound)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/bind?next=%2Finbox");
    let page = thief
        .get(gw.url("/_portcullis/bind"))
        .header("cookie", &without_bound)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = extract(&page, "data-csrf=\"", "\"").unwrap();
    let api = |path: &str, body: Value| {
        thief
            .post(gw.url(&format!("/_portcullis/bind/{path}")))
            .header("cookie", &without_bound)
            .header("x-csrf-token", &csrf)
            .json(&body)
            .send()
    };
    let ch: Value = api("challenge", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let own_key = Device::new();
    let r = api(
        "refresh",
        json!({ "proof": own_key.proof(ch["challenge"].as_str().unwrap(), false) }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = api(
        "register",
        json!({ "proof": own_key.proof(ch["challenge"].as_str().unwrap(), true) }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403, "a second key cannot take over the session");
    assert_eq!(gw.upstream.count(), seen, "the thief reached nothing");

    let failed = binding_failures(&gw).await;
    let reasons: Vec<_> = failed.iter().filter_map(|e| e.reason.as_deref()).collect();
    assert_eq!(
        reasons,
        ["proof_bad_signature", "proof_for_another_session"]
    );
    for e in &failed {
        assert_eq!(e.user_agent.as_deref(), Some("thief-agent/1.0"));
        assert_eq!(e.ip.as_deref(), Some("127.0.0.1"));
    }
    // The owner is not disturbed.
    assert_eq!(gw.status(&b, "/inbox").await, 200);
}

/// A copied cookie jar whose bound cookie was tampered with: a failed proof each time it is
/// used (its MAC does not match).
fn tampered(copied: &str) -> String {
    copied
        .split("; ")
        .map(|c| match c.strip_prefix("portcullis-bound=") {
            Some(v) => {
                // The MAC's first character (its last one also carries padding bits, which a
                // decoder may refuse: that would be no bound cookie at all, not a forgery).
                let at = v.rfind('.').unwrap() + 1;
                let swapped = if v[at..].starts_with('A') { 'B' } else { 'A' };
                format!("portcullis-bound={}{swapped}{}", &v[..at], &v[at + 1..])
            }
            None => c.to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test]
async fn repeated_failures_end_the_session_and_tell_the_owner() {
    let gw = Gateway::start_with(|c| {
        binding_on(c);
        c.binding.max_failures = 3;
    })
    .await;
    let (b, _, _) = gw.signed_in("owner@example.com").await;
    bind_dbsc(&gw, &b, &Device::new()).await;
    let copied = tampered(&gw.cookies(&b));
    let thief = gw.api();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = thief
            .get(gw.url("/inbox"))
            .header("cookie", &copied)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if statuses.len() == 3 {
            assert!(
                r.headers()
                    .get_all("set-cookie")
                    .iter()
                    .any(|v| v.to_str().unwrap().contains("Max-Age=0")),
                "the session cookie is cleared"
            );
        }
    }
    assert_eq!(statuses, [403, 403, 403]);
    let suspended = events(&gw, "session_suspended").await;
    assert_eq!(suspended.len(), 1);
    assert_eq!(suspended[0].reason.as_deref(), Some("binding_failures"));
    // The session is over for everyone, owner included.
    assert_eq!(
        location(&gw.get(&b, "/inbox").await),
        "/_portcullis/login?next=%2Finbox&notice=session_ended"
    );
    let mail = gw.outbox().await;
    let notice = mail
        .iter()
        .find(|m| m.contains("was ended"))
        .expect("the owner is told");
    assert!(notice.contains("To: owner@example.com"), "{notice}");
    assert!(notice.contains("3 failed attempts"), "{notice}");
}

#[tokio::test]
async fn forward_auth_applies_the_same_binding_rule() {
    let gw = Gateway::start_with(|c| {
        binding_on(c);
        c.forward_auth.enabled = true;
    })
    .await;
    let (b, _, _) = gw.signed_in("fwd@example.com").await;
    let ask = || {
        gw.api()
            .get(gw.url("/_portcullis/auth"))
            .header("cookie", gw.cookies(&b))
            .send()
    };
    let r = ask().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "binding_required");
    assert_eq!(v["bind"], gw.url("/_portcullis/bind").as_str());
    bind_dbsc(&gw, &b, &Device::new()).await;
    let r = ask().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-portcullis-assertion").is_some());
}

#[tokio::test]
async fn binding_endpoints_are_absent_when_binding_is_off() {
    let gw = Gateway::start().await;
    let (b, _, _) = gw.signed_in("off@example.com").await;
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    let r = b
        .post(gw.url("/_portcullis/dbsc/register"))
        .header("secure-session-response", Device::new().proof("x", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        location(&gw.get(&b, "/_portcullis/bind?next=%2Fx").await),
        "/x"
    );
}

#[tokio::test]
async fn two_gateways_on_redis_share_bindings_challenges_and_failures() {
    let a = gateway_on_redis(|c| c.binding.max_failures = 2).await;
    let b = a.restarted().await;
    // Cookies belong to the host, so one browser talks to both gateways (as behind a balancer).
    let (owner, _, _) = a.signed_in("two@example.com").await;
    let dev = Device::new();
    let ins = bind_dbsc(&a, &owner, &dev).await;
    let sid = ins["session_identifier"].as_str().unwrap();
    assert_eq!(
        b.status(&owner, "/campaigns").await,
        200,
        "bound on A, valid on B"
    );
    // A challenge issued by A is answered on B, once.
    let challenge = refresh_challenge(&a, &owner, sid).await;
    let proof = dev.proof(&challenge, false);
    assert_eq!(
        refresh_with(&b, &owner, proof.clone(), false)
            .await
            .status(),
        200
    );
    assert_eq!(refresh_with(&a, &owner, proof, false).await.status(), 403);
    // A registration through B cannot replace the key registered through A.
    let r = dbsc_register(&b, &owner, Device::new().proof(&challenge, true)).await;
    assert_eq!(r.status(), 403);
    // Failures on either gateway count together: two end the session everywhere.
    let copied = tampered(&a.cookies(&owner));
    for gw in [&a, &b] {
        let r = gw
            .api()
            .get(gw.url("/inbox"))
            .header("cookie", &copied)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    assert_eq!(
        location(&a.get(&owner, "/inbox").await),
        "/_portcullis/login?next=%2Finbox&notice=session_ended"
    );
}

/// A gateway with binding on over the shared Redis (a fresh key prefix), where concurrent
/// requests really interleave at every store call.
async fn gateway_on_redis(adjust: impl FnOnce(&mut portcullis::config::Config)) -> Gateway {
    Gateway::start_with(|c| {
        binding_on(c);
        c.storage.ephemeral = "redis://127.0.0.1:6379/".into();
        c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
        adjust(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_registration_wins_even_when_two_race() {
    let gw = gateway_on_redis(|_| {}).await;
    let (b, _, _) = gw.signed_in("race@example.com").await;
    // Two registration challenges outstanding: the DBSC header of the page and the fallback's.
    let page = gw.get(&b, "/_portcullis/bind").await;
    let dbsc_challenge = registration_challenge(&page);
    let ch = webcrypto_challenge(&gw, &b).await;
    assert_eq!(ch["purpose"], "register");
    let (dbsc_key, webcrypto_key) = (Device::new(), Device::new());
    let csrf = gw.csrf(&b, "/_portcullis/bind").await;
    let (r1, r2) = tokio::join!(
        dbsc_register(&gw, &b, dbsc_key.proof(&dbsc_challenge, true)),
        b.post(gw.url("/_portcullis/bind/register"))
            .header("x-csrf-token", &csrf)
            .json(&json!({ "proof": webcrypto_key.proof(ch["challenge"].as_str().unwrap(), true) }))
            .send(),
    );
    let mut statuses = [r1.status().as_u16(), r2.unwrap().status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "one key binds the session");
    assert_eq!(events(&gw, "session_bound").await.len(), 1);
    // Whichever won, the session now has exactly that key: the other key's proofs fail.
    let loaded = gw
        .state
        .sessions
        .load(Some(
            cookie_pair(&b, "portcullis-session")
                .split_once('=')
                .unwrap()
                .1,
        ))
        .await
        .unwrap()
        .unwrap();
    let bound = loaded.session.binding.expect("bound");
    let winner = if bound.method == portcullis::binding::Method::Dbsc {
        &dbsc_key
    } else {
        &webcrypto_key
    };
    assert_eq!(bound.jwk, winner.jwk());
}

#[tokio::test]
async fn malformed_proofs_get_clear_errors() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("junk@example.com").await;
    let dev = Device::new();
    let challenge = registration_challenge(&gw.get(&b, "/_portcullis/bind").await);
    let not_dbsc = {
        let good = dev.proof(&challenge, true);
        let (_, rest) = good.split_once('.').unwrap();
        let header = URL_SAFE_NO_PAD.encode(
            json!({"alg": "ES256", "typ": "JWT", "jwk": dev.jwk()})
                .to_string()
                .as_bytes(),
        );
        format!("{header}.{rest}")
    };
    for (what, proof) in [
        ("garbage", "not a jws".to_string()),
        ("two parts", "a.b".to_string()),
        ("wrong typ", not_dbsc),
        ("no key", dev.proof(&challenge, false)),
    ] {
        let r = b
            .post(gw.url("/_portcullis/dbsc/register"))
            .header("accept", "application/json")
            .header("secure-session-response", proof)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{what}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "bad_request", "{what}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .starts_with("The device proof was refused"),
            "{what}: {v}"
        );
    }
    let r = b
        .post(gw.url("/_portcullis/dbsc/register"))
        .header("accept", "application/json")
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "payload_too_large");
    let r = bind_api(&gw, &b, "register", json!({ "proof": 42 })).await;
    assert_eq!(r.status(), 400);
    // None of it bound the session; the challenge still works.
    assert_eq!(
        dbsc_register(&gw, &b, dev.proof(&challenge, true))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn copied_cookies_reach_neither_the_account_page_nor_the_admin_console() {
    let gw = gateway().await;
    let (b, dev) = bound_admin(&gw, "boss@example.com").await;
    assert_eq!(gw.status(&b, "/_portcullis/account").await, 200);
    let copied = tampered(&gw.cookies(&b));
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(&gw, &b);
    assert_eq!(webcrypto_refresh(&gw, &b, &dev).await.status(), 200);
    // The owner still has the account page; the copy gets neither it nor its forms.
    assert_eq!(gw.status(&b, "/_portcullis/account").await, 200);
    // (A form of that page whose proof ran out links to the proof and back to the page: gateway
    // pages send no `Referer`.)
    let owner_copy = gw.cookies(&b);
    let session_only: Vec<&str> = owner_copy
        .split("; ")
        .filter(|c| !c.starts_with("portcullis-bound="))
        .collect();
    let r = raw(
        gw.addr,
        "POST",
        "/_portcullis/account/recovery-codes",
        &[
            ("Cookie", &session_only.join("; ")),
            ("Accept", "text/html"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "csrf=x",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(
        r.body
            .contains("href=\"/_portcullis/bind?next=%2F_portcullis%2Faccount\""),
        "{}",
        r.body
    );
    let csrf = gw.csrf(&b, "/_portcullis/account").await;
    let thief = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let before = binding_failures(&gw).await.len();
    for path in [
        "/_portcullis/account",
        "/_portcullis/admin",
        "/_portcullis/reauth",
    ] {
        let r = thief
            .get(gw.url(path))
            .header("cookie", &copied)
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "device_proof_failed", "{path}");
    }
    let r = thief
        .post(gw.url("/_portcullis/account/recovery-codes"))
        .header("cookie", &copied)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(
        binding_failures(&gw).await.len() > before,
        "each is a binding failure"
    );
}

/// A user made an admin, signed in (with a code) and bound to a device of its own: the browser
/// and the device.
async fn bound_admin(gw: &Gateway, email: &str) -> (Browser, Device) {
    let (b, _, _) = gw.signed_in(email).await;
    let boss = gw.user(email).await;
    gw.state.durable.set_admin(&boss.id, true).await.unwrap();
    gw.state.user_gate.forget(&boss.id);
    let dev = Device::new();
    bind_webcrypto(gw, &b, &dev).await;
    (b, dev)
}

/// The bound cookie of `b` run out, a form `body` sent to `action` from the page `from` is held
/// for the device check: the check's address, and the held page's.
async fn held_for_the_device_check(
    gw: &Gateway,
    b: &Browser,
    (action, from): (&str, &str),
    body: &str,
) -> (String, String) {
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(gw, b);
    let r = gw.form_from(b, (action, from), body).await;
    assert_eq!(r.status(), 303);
    let bind = location(&r);
    assert!(
        bind.starts_with("/_portcullis/bind?next=%2F_portcullis%2Fheld%3Fid%3D"),
        "{bind}"
    );
    let next = super::step_up::next_of_step_up(&bind);
    (bind, next)
}

/// A code sent from the step-up page after the device proof ran out is refused for the proof,
/// and the way to renew it comes back to that step-up page (its form posts to the page's own
/// address: gateway pages send no `Referer`), not to the console's start.
#[tokio::test]
async fn a_step_up_sent_after_the_bound_cookie_ran_out_returns_to_its_page() {
    let gw = gateway().await;
    let (b, secret, _) = gw.signed_in("late-code@example.com").await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    let html = gw
        .page(&b, "/_portcullis/reauth?next=%2Fcampaigns%2F7")
        .await;
    let action = extract(&html, "<form method=\"post\" action=\"", "\"").unwrap();
    assert_eq!(action, "/_portcullis/reauth?next=%2Fcampaigns%2F7");
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(&gw, &b);
    let r = b
        .post(gw.url(&action))
        .header("accept", "text/html")
        .form(&[
            ("csrf", csrf.as_str()),
            ("code", gw.totp_now(&secret).as_str()),
            ("next", "/campaigns/7"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let page = r.text().await.unwrap();
    assert!(
        page.contains(
            "href=\"/_portcullis/bind?next=%2F_portcullis%2Freauth%3Fnext%3D%252Fcampaigns%252F7\""
        ),
        "{page}"
    );
}

/// An admin's form sent after the device proof ran out (an admin left on a page longer than the
/// bound cookie lives) is held, not lost: once the browser has proven itself, the held form goes
/// to the admin console's guard again, which holds it for the key's touch where the sudo window
/// has passed too, as typed.
#[tokio::test]
async fn an_admin_form_sent_after_the_bound_cookie_ran_out_is_held() {
    let gw = gateway().await;
    let (b, dev) = bound_admin(&gw, "long-admin@example.com").await;
    gw.signed_in("someone@example.com").await;
    let target = gw.user("someone@example.com").await;
    let csrf = gw.csrf(&b, "/_portcullis/account").await;
    let action = format!("/_portcullis/admin/users/{}/disable", target.id);
    let body = format!("csrf={csrf}&reason=left+the+company");
    let form = (action.as_str(), "/_portcullis/admin/users");
    let (_, next) = held_for_the_device_check(&gw, &b, form, &body).await;
    assert_eq!(webcrypto_refresh(&gw, &b, &dev).await.status(), 200);
    let held = gw.page(&b, &next).await;
    assert!(held.contains(&format!("POST {action}")), "{held}");
    let held_csrf = extract(&held, "name=\"csrf\" value=\"", "\"").unwrap();
    let id = next.split("id=").nth(1).unwrap();
    // Sent to the console's guard: this code-only session has no key proof, so it is held
    // again for the key's touch, not refused and lost.
    let r = gw.send_held(&b, (id, &held_csrf), false).await;
    assert_eq!(r.status(), 303);
    let step = location(&r);
    super::admin::assert_held_for_the_key(&step);
    assert!(gw.page(&b, &step).await.contains(&format!("POST {action}")));
    assert!(!gw.user("someone@example.com").await.disabled);
}

/// A bound cookie is a proof only from the network and browser it was issued to: a copy of the
/// whole cookie jar used at once, while its bound cookie is still fresh, from another browser or
/// another address gets nothing (the cookie is dropped and the key must prove again, which the
/// copy cannot), while the owner's browser on a new network proves again and carries on.
#[tokio::test]
async fn a_fresh_copied_cookie_jar_gets_nothing_from_another_browser_or_network() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("fresh-copy@example.com").await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    assert_eq!(gw.status(&b, "/inbox").await, 200);
    let copied = gw.cookies(&b);
    let seen = gw.upstream.count();
    let client = |ua: Option<&str>, from: &str| {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(Some(from.parse().unwrap()));
        if let Some(ua) = ua {
            builder = builder.user_agent(ua);
        }
        builder.build().unwrap()
    };
    for (what, thief) in [
        (
            "another browser",
            client(Some("thief-agent/1.0"), "127.0.0.1"),
        ),
        ("another network", client(None, "127.0.1.2")),
    ] {
        let get = |accept: &'static str| {
            thief
                .get(gw.url("/inbox"))
                .header("cookie", &copied)
                .header("accept", accept)
                .send()
        };
        let r = get("application/json").await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        let dropped = set_cookie_named(&r, "portcullis-bound").unwrap_or_default();
        assert!(dropped.contains("Max-Age=0"), "{what}: {dropped}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "binding_refresh_required", "{what}");
        let r = get("text/html").await.unwrap();
        assert_eq!(location(&r), "/_portcullis/bind?next=%2Finbox", "{what}");
        // The bind page drops it too (behind nginx the gate's answer does not reach the browser).
        let r = thief
            .get(gw.url("/_portcullis/bind?next=%2Finbox"))
            .header("cookie", &copied)
            .send()
            .await
            .unwrap();
        let dropped = set_cookie_named(&r, "portcullis-bound").unwrap_or_default();
        assert!(
            dropped.contains("Max-Age=0"),
            "{what}: bind page: {dropped}"
        );
        // Nor does it reach a page that changes how the owner signs in.
        let r = thief
            .post(gw.url("/_portcullis/account/recovery-codes"))
            .header("cookie", &copied)
            .header("accept", "application/json")
            .form(&[("csrf", "x")])
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 401 || r.status() == 403,
            "{what}: {}",
            r.status()
        );
    }
    assert_eq!(gw.upstream.count(), seen, "the copies reached nothing");
    assert!(
        binding_failures(&gw).await.is_empty(),
        "a moved cookie alone is not counted: the proof that follows is"
    );
    // It is written down, with the address and browser it came from.
    let moved: Vec<(Option<String>, Option<String>)> = events(&gw, "session_binding_moved")
        .await
        .into_iter()
        .map(|e| (e.ip, e.user_agent))
        .collect();
    assert!(
        moved.contains(&(Some("127.0.0.1".into()), Some("thief-agent/1.0".into())))
            && moved
                .iter()
                .any(|(ip, _)| ip.as_deref() == Some("127.0.1.2")),
        "{moved:?}"
    );

    // The owner's own browser is undisturbed; on a new network it proves again and carries on.
    assert_eq!(gw.status(&b, "/inbox").await, 200);
    let moved = gw.browser_moved_to(&b, "127.0.2.3");
    assert_eq!(gw.status(&moved, "/inbox").await, 303);
    assert_eq!(webcrypto_refresh(&gw, &moved, &dev).await.status(), 200);
    assert_eq!(gw.status(&moved, "/inbox").await, 200);
}

/// Over plain HTTP another site of the domain can plant a bound cookie (or a session cookie) of
/// the same name, which the browser sends first: the owner's valid one still counts, no failed
/// proof is counted, and the session is not ended however often it happens.
#[tokio::test]
async fn a_planted_bound_cookie_is_no_failed_proof() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("plant@example.com").await;
    bind_webcrypto(&gw, &b, &Device::new()).await;
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    let jar = b.cookie_header();
    let planted = "portcullis-bound=garbage; portcullis-session=planted";
    let cookie = format!("{planted}; {jar}");
    for _ in 0..8 {
        let r = raw(gw.addr, "GET", "/campaigns", &[("Cookie", &cookie)], "").await;
        assert_eq!(r.status, 200, "{}", r.head);
    }
    let events = gw.audit().await;
    assert!(!events
        .iter()
        .any(|e| e.event == "session_binding_failed" || e.event == "session_suspended"));
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    // Alone, a value that is no bound cookie at all (junk, empty) is taken as none: the key
    // must prove again, and nothing is counted against the session.
    let session = jar
        .split("; ")
        .find(|c| c.starts_with("portcullis-session="))
        .unwrap();
    let alone = |bound: &str| {
        let cookie = format!("portcullis-bound={bound}; {session}");
        async move {
            raw(
                gw.addr,
                "GET",
                "/campaigns",
                &[("Cookie", &cookie), ("Accept", "application/json")],
                "",
            )
            .await
        }
    };
    for junk in ["garbage", "", "x.y.z"] {
        for _ in 0..6 {
            let r = alone(junk).await;
            assert_eq!(r.status, 401, "{junk:?}: {}", r.head);
            assert!(r.body.contains("binding_refresh_required"), "{}", r.body);
        }
    }
    assert!(binding_failures(&gw).await.is_empty());
    assert_eq!(
        gw.status(&b, "/campaigns").await,
        200,
        "the session lives on"
    );
    // One shaped as a bound cookie without the gateway's MAC is a forgery: a failed proof.
    let forged = tampered(&jar);
    let forged = forged
        .split("; ")
        .find_map(|c| c.strip_prefix("portcullis-bound="))
        .unwrap();
    let r = alone(forged).await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(binding_failures(&gw).await.len(), 1);
}

/// A cookie jar copied between the sign-in and the first device proof cannot bind the session
/// to the copier's key from another network or another browser (which would also make the
/// copier's browser the remembered one): refused as a failed proof, and the browser that
/// signed in binds as before.
#[tokio::test]
async fn the_first_key_comes_from_the_browser_that_signed_in() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("first-key@example.com").await;
    for copy in [
        gw.copied_jar(&b, Some("127.0.2.60"), None),
        gw.copied_jar(&b, None, Some("Thief/1")),
    ] {
        let thief = Device::new();
        let ch = webcrypto_challenge(&gw, &copy).await;
        assert_eq!(ch["purpose"], "register");
        let proof = thief.proof(ch["challenge"].as_str().unwrap(), true);
        let r = bind_api(&gw, &copy, "register", json!({ "proof": proof })).await;
        assert_eq!(r.status(), 403);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "device_proof_failed");
    }
    assert_eq!(
        events(&gw, "session_binding_failed")
            .await
            .iter()
            .filter(|e| e.reason.as_deref() == Some("registration_from_elsewhere"))
            .count(),
        2
    );
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
}

/// A WebSocket opened with a bound cookie lasts no longer than that cookie: a copied cookie
/// reaches no further through a tunnel than through requests (the page that holds the key opens
/// it again with a fresh one).
#[tokio::test]
async fn a_websocket_closes_when_its_device_proof_runs_out() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("ws-bound@example.com").await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    let mut ws = super::proxy::open_ws(&gw, &b).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    ws.send(Message::text("still here")).await.unwrap();
    let got = ws.next().await.unwrap().unwrap();
    assert_eq!(got.into_text().unwrap().as_str(), "still here");
    let ttl = i64::try_from(gw.state.config.binding.bound_cookie_ttl.as_secs()).unwrap();
    gw.clock.advance(ttl + 1);
    assert!(
        super::proxy::closed_within(&mut ws, std::time::Duration::from_secs(5)).await,
        "the tunnel outlived its bound cookie"
    );
}

/// A copied device cookie does not make its holder the owner's device: binding a session, the
/// browser must sign the challenge with the key the device kept from its last session too.
/// Without that (no key, the owner's older key, its own key) the sign-in is a new device's —
/// recorded with a cookie of its own, audited and mailed to the owner — while the owner's
/// browser, which holds the key, stays the known device and is not reported.
#[tokio::test]
async fn a_copied_device_cookie_without_the_devices_key_is_a_new_device() {
    let gw = gateway().await;
    let email = "kept-key@example.com";
    let (b, secret, _) = gw.signed_in(email).await;
    let mut kept = Device::new();
    bind_webcrypto(&gw, &b, &kept).await;
    let device_cookie = device_cookie_of(&gw, &b);
    // A browser holding that device cookie (the owner's later, or a copy) signs in.
    let with_device_cookie = || browser_with(&gw, &device_cookie);
    let reported = || async { events(&gw, "new_device").await.len() };
    assert_eq!(reported().await, 1, "the first sign-in");
    // The owner's browser: its kept key signs, nobody is told, the device keeps the new key.
    let owner = with_device_cookie();
    gw.sign_in_on(&owner, email, &secret).await;
    let next = Device::new();
    let r = register_webcrypto(&gw, &owner, &next, Some(&kept)).await;
    assert_eq!(r.status(), 200);
    assert!(set_cookie_named(&r, "portcullis-device").is_none());
    assert_eq!(reported().await, 1, "the owner's own browser");
    let old = std::mem::replace(&mut kept, next);
    let mails = gw.outbox().await.len();
    // The thief's browser, with the device cookie and without the device's key.
    for (i, signer) in [None, Some(&old), Some(&Device::new())]
        .into_iter()
        .enumerate()
    {
        let thief = with_device_cookie();
        gw.sign_in_on(&thief, email, &secret).await;
        let own = Device::new();
        // (The thief's own key signing as the kept one is the third case.)
        let signer = if i == 2 { Some(&own) } else { signer };
        let r = register_webcrypto(&gw, &thief, &own, signer).await;
        assert_eq!(r.status(), 200, "case {i}: it gave the password and a code");
        let cookie = set_cookie_named(&r, "portcullis-device").unwrap_or_default();
        assert!(
            !cookie.is_empty() && !cookie.starts_with(&device_cookie),
            "case {i}: a device cookie of its own: {cookie}"
        );
        let new = events(&gw, "new_device").await;
        assert_eq!(new.len(), 2 + i, "case {i}: reported");
        assert!(
            new.last()
                .unwrap()
                .reason
                .as_deref()
                .unwrap_or_default()
                .contains("without that device's key"),
            "{:?}",
            new.last()
        );
        assert_eq!(
            gw.outbox().await.len(),
            mails + 1 + i,
            "case {i}: the owner is mailed"
        );
    }
    // The owner's browser is still the known device, with the key it keeps.
    let owner = with_device_cookie();
    gw.sign_in_on(&owner, email, &secret).await;
    let r = register_webcrypto(&gw, &owner, &Device::new(), Some(&kept)).await;
    assert_eq!(r.status(), 200);
    assert!(set_cookie_named(&r, "portcullis-device").is_none());
    assert_eq!(reported().await, 4, "the owner is not reported");
}

/// A device whose sessions bind through DBSC keeps no key to prove (DBSC keys live one session
/// each): a copy of its cookie binding WebCrypto keys, once or again, must not make the copy's
/// key the one the owner's browser is asked for, nor the owner a new device.
#[tokio::test]
async fn a_dbsc_device_does_not_take_a_copys_key() {
    let gw = gateway().await;
    let email = "dbsc-device@example.com";
    let (b, secret, _) = gw.signed_in(email).await;
    bind_dbsc(&gw, &b, &Device::new()).await;
    let device_cookie = device_cookie_of(&gw, &b);
    // A browser holding that device cookie (the owner's later, or a copy) signs in.
    let with_device_cookie = || browser_with(&gw, &device_cookie);
    for _ in 0..2 {
        let copy = with_device_cookie();
        gw.sign_in_on(&copy, email, &secret).await;
        let r = register_webcrypto(&gw, &copy, &Device::new(), None).await;
        assert_eq!(r.status(), 200);
    }
    let user = gw.user(email).await;
    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert!(devices[0].remember_key.is_none(), "{devices:?}");
    // The owner's browser binds through DBSC again: still the known device.
    let owner = with_device_cookie();
    gw.sign_in_on(&owner, email, &secret).await;
    bind_dbsc(&gw, &owner, &Device::new()).await;
    assert_eq!(events(&gw, "new_device").await.len(), 1);
}

#[tokio::test]
async fn the_sign_out_page_names_the_account_only_to_the_sessions_device() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("quiet@example.com").await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    let page = |c: &Browser| {
        let c = c.get(gw.url("/_portcullis/logout"));
        async move { c.send().await.unwrap().text().await.unwrap() }
    };
    assert!(page(&b).await.contains("quiet@example.com"));
    // The session cookie copied into another browser: the page still signs the session out
    // (the safe way round) but does not say whose it is.
    let session = gw
        .cookies(&b)
        .split("; ")
        .find(|c| c.starts_with("portcullis-session="))
        .unwrap()
        .to_string();
    let thief = browser_with(&gw, &session);
    let html = page(&thief).await;
    assert!(html.contains("action=\"/_portcullis/logout\""), "{html}");
    assert!(!html.contains("quiet@example.com"), "{html}");
    // Seeing the page counts nothing against the owner's session.
    assert!(!gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "session_binding_failed"));
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
}

/// A browser string with bytes beyond ASCII (an accent, a stray byte, a direction override) is
/// still that browser: kept in the audit trail and the device's name, and a copy of the session
/// used with another such string is another browser, not one of the same empty name.
#[tokio::test]
async fn a_user_agent_beyond_ascii_is_kept_and_told_apart() {
    let gw = gateway().await;
    let email = "accent@example.com";
    let owner_ua = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0 Safari/537.36 é";
    let b = gw.copied_jar(&gw.browser(), None, Some(owner_ua));
    gw.add_user(email).await;
    gw.enrol(&b, email).await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    assert_eq!(gw.status(&b, "/inbox").await, 200);
    let bound = events(&gw, "session_bound").await;
    assert_eq!(
        bound.last().and_then(|e| e.user_agent.as_deref()),
        Some(owner_ua),
        "{bound:?}"
    );
    let page = b
        .get(gw.url("/_portcullis/account"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Chrome on Windows"), "{page}");

    // A copy of the jar in a browser whose string also goes beyond ASCII: not the owner's.
    let seen = gw.upstream.count();
    for thief_ua in [
        "Totally different Firefox/99 \u{202e}",
        "Totally different Firefox/99 \u{fc}",
    ] {
        let thief = gw.copied_jar(&b, None, Some(thief_ua));
        let r = thief
            .get(gw.url("/inbox"))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{thief_ua}");
    }
    // Raw bytes that are no UTF-8 at all.
    let odd = reqwest::header::HeaderValue::from_bytes(b"Other/1.0 \xff\xfe").unwrap();
    let thief = gw.copied_jar(&b, None, None);
    let r = thief
        .get(gw.url("/inbox"))
        .header("user-agent", odd)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(gw.upstream.count(), seen, "no copy reached the console");
    let moved: Vec<String> = events(&gw, "session_binding_moved")
        .await
        .into_iter()
        .filter_map(|e| e.user_agent)
        .collect();
    // Written once a minute per session and network: the first copy, its override written
    // out.
    assert_eq!(moved, ["Totally different Firefox/99 \\u{202E}"]);
    // The copies shared the owner's jar and had its bound cookie dropped: the owner's browser
    // proves its key again and carries on.
    assert_eq!(webcrypto_refresh(&gw, &b, &dev).await.status(), 200);
    assert_eq!(gw.status(&b, "/inbox").await, 200, "the owner carries on");
}

/// Whether `r` set a cookie that ties a held form to the browser (a form was held).
fn holds_a_form(r: &reqwest::Response) -> bool {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.starts_with("portcullis-held-"))
}

/// A copied session cookie without the bound cookie reads as a browser whose proof ran out (or,
/// before the first proof, one that has yet to make it); used from another network or another
/// browser than the key last proved itself from, it gets no form held, so it cannot push the
/// owner's held forms out of their slots: the owner's browser proves itself and sends its form.
#[tokio::test]
async fn a_copied_session_cookie_cannot_push_the_owners_held_form_out() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("crowded@example.com").await;
    let copies = [
        gw.copied_jar(&b, Some("127.0.2.61"), None),
        gw.copied_jar(&b, None, Some("Thief/1")),
    ];
    let thief_form = ("/campaigns/9/send", "/campaigns/9/edit");
    // Before the first proof: only the browser that signed in has its form held.
    for copy in &copies {
        let r = gw.form_from(copy, thief_form, "recipients=all").await;
        assert_eq!(r.status(), 401, "refused, not held");
        assert!(!holds_a_form(&r), "held for a copy");
    }
    let r = gw.form_from(&b, thief_form, "recipients=mine").await;
    assert_eq!(r.status(), 303);
    assert!(holds_a_form(&r), "the owner's browser has its form held");
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    let before = gw.upstream.count();
    let form = ("/campaigns/7/save", "/campaigns/7/edit");
    let (_, next) = held_for_the_device_check(&gw, &b, form, "subject=Mine").await;
    // More forms than a session may have held, from each copy: none is held.
    let slots = portcullis::http::held::HELD_PER_SESSION;
    for copy in &copies {
        for _ in 0..=slots {
            let r = gw.form_from(copy, thief_form, "recipients=all").await;
            assert_eq!(r.status(), 401, "refused, not held");
            assert!(!holds_a_form(&r), "held for a copy");
        }
    }
    assert_eq!(gw.upstream.count(), before, "nothing forwarded");
    assert_eq!(webcrypto_refresh(&gw, &b, &dev).await.status(), 200);
    let held = gw.page(&b, &next).await;
    let csrf = extract(&held, "name=\"csrf\" value=\"", "\"").unwrap();
    let id = next.split("id=").nth(1).unwrap();
    assert_eq!(gw.send_held(&b, (id, &csrf), false).await.status(), 200);
    let seen = gw.upstream.last();
    assert_eq!(seen.uri, "/campaigns/7/save");
    assert_eq!(seen.body, b"subject=Mine");
    // The owner's browser on another network proves itself there: from then on its forms are
    // held there (and no longer where it was).
    let moved = gw.copied_jar(&b, Some("127.0.2.70"), None);
    assert_eq!(webcrypto_refresh(&gw, &moved, &dev).await.status(), 200);
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(&gw, &b);
    let r = gw.form_from(&moved, form, "subject=Moved").await;
    assert_eq!(r.status(), 303);
    assert!(holds_a_form(&r), "held where the key last proved itself");
    assert_eq!(gw.form_from(&b, form, "subject=Old").await.status(), 401);
}

/// A form sent after the bound cookie ran out (filled in over more than its lifetime, on a
/// console page that does not renew it) is held, not lost: the browser proves itself again at
/// the device check, and the held page sends the form as it was typed.
#[tokio::test]
async fn a_form_sent_after_the_bound_cookie_ran_out_is_sent_after_the_proof() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("long-form@example.com").await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    assert_eq!(gw.status(&b, "/campaigns/7/edit").await, 200);
    let before = gw.upstream.count();
    let body = "subject=Spring&recipients=1200";
    let form = ("/campaigns/7/save", "/campaigns/7/edit");
    let (bind, next) = held_for_the_device_check(&gw, &b, form, body).await;
    assert_eq!(gw.upstream.count(), before, "held, not forwarded");
    // The held page waits for the proof like every session page.
    assert_eq!(gw.get(&b, &next).await.status(), 303);
    // The device check page carries the held page as where to go on.
    let page = gw.page(&b, &bind).await;
    assert!(page.contains(&format!("data-next=\"{next}\"")), "{page}");
    assert_eq!(webcrypto_refresh(&gw, &b, &dev).await.status(), 200);
    let held = gw.page(&b, &next).await;
    assert!(held.contains("POST /campaigns/7/save"), "{held}");
    let csrf = extract(&held, "name=\"csrf\" value=\"", "\"").unwrap();
    let id = next.split("id=").nth(1).unwrap();
    let r = gw.send_held(&b, (id, &csrf), false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(gw.upstream.count(), before + 1);
    let seen = gw.upstream.last();
    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("POST", "/campaigns/7/save")
    );
    assert_eq!(seen.body, body.as_bytes());
}

/// A copied cookie jar may sign the session out from elsewhere (the safe way round: nothing it
/// cannot use stays alive for it), but that is written down as not from the session's device
/// and the owner is told; the owner's own browser signing out, its bound cookie run out, is a
/// plain sign-out.
#[tokio::test]
async fn a_sign_out_from_a_copied_jar_elsewhere_is_written_down_and_told() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("own-out@example.com").await;
    bind_webcrypto(&gw, &b, &Device::new()).await;
    gw.clock.advance(TTL_SECS + 1);
    drop_bound_cookie(&gw, &b);
    super::login::sign_out(&gw, &b).await;
    let (c, _, _) = gw.signed_in("copied-out@example.com").await;
    bind_webcrypto(&gw, &c, &Device::new()).await;
    let copy = gw.copied_jar(&c, Some("127.0.2.62"), None);
    super::login::sign_out(&gw, &copy).await;
    assert_eq!(gw.status(&c, "/inbox").await, 303, "the session ended");
    let outs: Vec<(Option<String>, Option<String>)> = events(&gw, "logout")
        .await
        .into_iter()
        .map(|e| (e.email, e.reason))
        .collect();
    assert_eq!(
        outs,
        [
            (Some("own-out@example.com".into()), None),
            (
                Some("copied-out@example.com".into()),
                Some("not_from_the_sessions_device".into())
            ),
        ]
    );
    let told: Vec<String> = gw
        .outbox()
        .await
        .into_iter()
        .filter(|m| m.contains("was signed out from another network or browser"))
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0].contains("copied-out@example.com")
            && told[0].contains("127.0.2.62")
            && told[0].contains("there is nothing to do"),
        "{}",
        told[0]
    );
}

/// The device check goes on to a step-up page that sent the browser to it (the step-up found
/// the device proof run out): the step-up, and the form it holds, carry on from there. Other
/// gateway pages that are no way back are still refused as `next`.
#[tokio::test]
async fn the_device_check_returns_to_the_step_up_that_sent_it() {
    let gw = gateway().await;
    let (b, _, _) = gw.signed_in("bind-to-reauth@example.com").await;
    let q = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let reauth = "/_portcullis/reauth?next=%2F_portcullis%2Fheld%3Fid%3D1-abc&key=1";
    let page = gw
        .page(&b, &format!("/_portcullis/bind?next={}", q(reauth)))
        .await;
    assert!(
        page.contains(&format!("data-next=\"{}\"", reauth.replace('&', "&#38;"))),
        "{page}"
    );
    for other in ["/_portcullis/logout", "//evil.example/_portcullis/reauth"] {
        let page = gw
            .page(&b, &format!("/_portcullis/bind?next={}", q(other)))
            .await;
        assert!(page.contains("data-next=\"/\""), "{other}: {page}");
    }
}
