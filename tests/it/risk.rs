//! Risk scoring: sign-ins from new networks, countries and impossible places ask for more, the
//! owner hears of a right password entered from far away, and a session whose device key proves
//! itself from a place it could not have reached is held until a second factor.
//!
//! The GeoIP test database (`tests/data/geoip-test.mmdb`, written by `make-geoip.py`) places
//! loopback networks: 127.0.0.0/24 in Frankfurt, 127.0.1.0/24 in Berlin, 127.0.2.0/24 in
//! Sydney, 127.0.3.0/24 in Paris. Clients bind their source address to be "there".

use serde_json::Value;

use super::binding::{bind_webcrypto, webcrypto_refresh, Device};
use super::harness::*;
use super::webauthn::{key, localhost, register, second_factor};

fn geoip(c: &mut portcullis::config::Config) {
    c.risk.geoip_database =
        Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip-test.mmdb"));
}

/// A gateway with device binding and the test GeoIP database, adjusted by `more`.
async fn placed_gateway(more: impl FnOnce(&mut portcullis::config::Config)) -> Gateway {
    Gateway::start_with(|c| {
        binding_on(c);
        geoip(c);
        more(c);
    })
    .await
}

/// A code from the app at `/_portcullis/reauth`, coming back to `next`.
pub(super) async fn reauth_with_code(
    gw: &Gateway,
    b: &Browser,
    secret: &[u8],
    next: &str,
) -> reqwest::Response {
    gw.clock.advance(30);
    reauth_with(gw, b, &gw.totp_now(secret), next).await
}

/// The step-up page for `next` opened in `b` and `code` sent from it.
pub(super) async fn reauth_with(
    gw: &Gateway,
    b: &Browser,
    code: &str,
    next: &str,
) -> reqwest::Response {
    let back: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    let html = gw
        .page(b, &format!("/_portcullis/reauth?next={back}"))
        .await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    b.post(gw.url("/_portcullis/reauth"))
        .form(&[("csrf", csrf.as_str()), ("code", code), ("next", next)])
        .send()
        .await
        .unwrap()
}

/// Switches `email` to "second factor first" with three wrong passwords from `b` (gateways
/// with `limits.second_factor_first_after = 3`), then gives its app code there: the password is
/// what the sign-in waits for.
async fn code_first(gw: &Gateway, b: &Browser, email: &str, secret: &[u8]) {
    for _ in 0..3 {
        let r = gw.password(b, email, "wrong password 1", "").await;
        assert_eq!(r.status(), 401);
    }
    gw.clock.advance(60);
    let r = gw.password(b, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let r = gw.code(b, "/_portcullis/mfa", &gw.totp_now(secret)).await;
    assert_eq!(location(&r), "/_portcullis/login?notice=password_next");
}

async fn events(gw: &Gateway, name: &str) -> Vec<portcullis::store::AuditEvent> {
    gw.audit()
        .await
        .into_iter()
        .filter(|e| e.event == name)
        .collect()
}

/// What an API client of a held session gets for `path`: `403 step_up_required` (the body).
async fn held_json(gw: &Gateway, b: &Browser, path: &str) -> Value {
    let r = b
        .get(gw.url(path))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "{path}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "step_up_required", "{path}");
    v
}

fn mails_about<'a>(mail: &'a [String], subject: &str) -> Vec<&'a String> {
    mail.iter().filter(|m| m.contains(subject)).collect()
}

/// A sign-in from Sydney minutes after one in Frankfurt, from a new browser: the password is
/// right, but the app code is refused — only the account's security key completes it — and the
/// owner learns at once that their password was entered there (once, not per attempt).
#[tokio::test]
async fn a_right_password_from_an_impossible_place_needs_the_key_and_tells_the_owner() {
    let gw = Gateway::start_with(|c| {
        localhost(c);
        geoip(c);
    })
    .await;
    let email = "far@example.com";
    let (home, secret, _) = gw.signed_in(email).await;
    let mut k = key();
    register(&gw, &home, &mut k, "Desk key").await;

    gw.clock.advance(600);
    let far = gw.browser_moved_to(&gw.browser(), "127.0.2.9");
    let r = gw.password(&far, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let page = gw.page(&far, "/_portcullis/mfa").await;
    assert!(page.contains("not enough this time"), "{page}");
    let r = gw
        .code(&far, "/_portcullis/mfa", &gw.totp_now(&secret))
        .await;
    assert_eq!(r.status(), 403);
    let page = r.text().await.unwrap();
    assert!(page.contains("looks unusual"), "{page}");
    assert_eq!(gw.status(&far, "/campaigns").await, 303);

    let assessed = events(&gw, "risk_assessed").await;
    let last = assessed.last().unwrap();
    assert_eq!(last.outcome, "high");
    assert_eq!(last.ip.as_deref(), Some("127.0.2.9"));
    let reason = last.reason.as_deref().unwrap();
    assert!(
        reason.contains("impossible_travel") && reason.contains("Sydney, AU"),
        "{reason}"
    );
    let denied = events(&gw, "second_factor").await;
    assert!(
        denied
            .iter()
            .any(|e| e.outcome == "denied" && e.reason.as_deref() == Some("high_risk")),
        "{denied:?}"
    );
    let mail = gw.outbox().await;
    let unusual = mails_about(&mail, "Unusual sign-in");
    assert_eq!(unusual.len(), 1, "{mail:?}");
    assert!(
        unusual[0].contains("127.0.2.9")
            && unusual[0].contains("Sydney, AU")
            && unusual[0].contains("Frankfurt am Main, DE")
            && unusual[0].contains("security key"),
        "{}",
        unusual[0]
    );

    // The key completes it; the attempt again within the hour mails nobody again.
    let (r, _, _) = second_factor(&gw, &far, &mut k, |_, _| {}).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(gw.status(&far, "/campaigns").await, 200);
    // The new-device notice and the device list name the place too.
    let mail = gw.outbox().await;
    let new_device = mails_about(&mail, "New sign-in");
    assert!(
        new_device
            .last()
            .is_some_and(|m| m.contains("Address: 127.0.2.9 (Sydney, AU)")),
        "{new_device:?}"
    );
    let account = gw.page(&far, "/_portcullis/account").await;
    assert!(account.contains("127.0.2.9 (Sydney, AU)"), "{account}");
    let again = gw.browser_moved_to(&gw.browser(), "127.0.4.9");
    gw.clock.advance(60);
    let r = gw.password(&again, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    assert_eq!(mails_about(&gw.outbox().await, "Unusual sign-in").len(), 1);
    let metrics = gw.state.metrics.render(&gw.state.login.hasher).unwrap();
    assert!(
        metrics.contains("portcullis_risk_assessments_total{stage=\"sign_in\",level=\"high\"} 2"),
        "{metrics}"
    );
}

/// An account with no security key is not locked out by a risky sign-in: its app code still
/// completes it (and the owner is told). Completed sign-ins teach the account's history, so the
/// next sign-in from there is ordinary.
#[tokio::test]
async fn without_a_key_the_app_code_still_completes_a_risky_sign_in() {
    let gw = Gateway::start_with(geoip).await;
    let email = "app-only@example.com";
    let (_, secret, _) = gw.signed_in(email).await;
    gw.clock.advance(300);
    let far = gw.browser_moved_to(&gw.browser(), "127.0.2.9");
    gw.sign_in_on(&far, email, &secret).await;
    assert_eq!(gw.status(&far, "/campaigns").await, 200);
    assert_eq!(
        events(&gw, "risk_assessed").await.last().unwrap().outcome,
        "high"
    );
    assert_eq!(mails_about(&gw.outbox().await, "Unusual sign-in").len(), 1);

    // Sydney is familiar now: a new browser there is only that.
    let again = gw.browser_moved_to(&gw.browser(), "127.0.2.10");
    gw.sign_in_on(&again, email, &secret).await;
    let last = events(&gw, "risk_assessed").await.pop().unwrap();
    assert_eq!(
        (last.outcome.as_str(), last.reason.as_deref()),
        ("low", Some("score 25: new_device (Sydney, AU)"))
    );
}

/// A remembered browser skips the second factor only where the sign-in looks ordinary: in
/// another country it gives its code like any other.
#[tokio::test]
async fn a_remembered_browser_in_a_new_country_gives_its_second_factor() {
    let gw = placed_gateway(|_| {}).await;
    let dev = Device::new();
    let (b, _) = super::remember::remembered_user(&gw, &dev).await;
    super::remember::sign_out(&gw, &b).await;
    let email = super::remember::EMAIL;

    gw.clock.advance(3600);
    let paris = gw.browser_moved_to(&b, "127.0.3.9");
    let r = gw.password(&paris, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let last = events(&gw, "risk_assessed").await.pop().unwrap();
    assert_eq!(last.outcome, "medium");
    assert_eq!(
        last.reason.as_deref(),
        Some("score 45: new_network, new_country (Paris, FR)")
    );
    // No mail for a medium score.
    assert!(mails_about(&gw.outbox().await, "Unusual sign-in").is_empty());

    // Another network at home is ordinary; so is the usual one.
    for (from, what) in [("127.0.1.9", "Berlin"), ("127.0.0.1", "home")] {
        let there = gw.browser_moved_to(&b, from);
        let r = gw.password(&there, email, PASSWORD, "").await;
        assert_eq!(location(&r), "/_portcullis/remembered", "{what}");
    }
}

/// A signed-in, bound session whose device key proves itself from Sydney minutes after
/// Berlin is held: neither the console nor the account page until a second factor, though
/// its device proof was good. A move the owner could have made carries on.
#[tokio::test]
async fn a_session_proven_from_an_impossible_place_is_held_until_a_second_factor() {
    let gw = placed_gateway(|c| {
        c.forward_auth.enabled = true;
        // Forward-auth is asked by a proxy on loopback, naming the browser's address.
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let email = "held@example.com";
    let (b, secret, _) = gw.signed_in(email).await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    assert_eq!(gw.status(&b, "/inbox").await, 200);
    let mut ws = super::proxy::open_ws(&gw, &b).await;

    // Berlin a minute later (another network, close enough never to count as travel): prove
    // and carry on.
    gw.clock.advance(60);
    let berlin = gw.browser_moved_to(&b, "127.0.1.9");
    assert_eq!(gw.status(&berlin, "/inbox").await, 303);
    assert_eq!(webcrypto_refresh(&gw, &berlin, &dev).await.status(), 200);
    assert_eq!(gw.status(&berlin, "/inbox").await, 200);
    assert!(events(&gw, "session_risk").await.is_empty());

    // Sydney eight minutes after Berlin (the bound cookie still fresh): the proof is good, the
    // session is held.
    gw.clock.advance(480);
    let sydney = gw.browser_moved_to(&b, "127.0.2.9");
    assert_eq!(gw.status(&sydney, "/inbox").await, 303);
    assert_eq!(webcrypto_refresh(&gw, &sydney, &dev).await.status(), 200);
    assert!(
        super::proxy::closed_within(&mut ws, std::time::Duration::from_secs(5)).await,
        "the hold closes the session's websocket"
    );
    let seen = gw.upstream.count();
    let r = gw.get(&sydney, "/inbox?x=1").await;
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/_portcullis/reauth?next=%2Finbox%3Fx%3D1");
    let v = held_json(&gw, &sydney, "/inbox").await;
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("could not have travelled"),
        "{v}"
    );
    // Forward-auth answers the held session as a step-up too.
    let r = raw(
        gw.addr,
        "GET",
        "/_portcullis/auth",
        &[
            ("Cookie", &gw.cookies(&sydney)),
            ("X-Original-URI", "/inbox"),
            ("X-Forwarded-For", "127.0.2.9"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(r.body.contains("step_up_required"), "{}", r.body);
    let r = gw.get(&sydney, "/_portcullis/account").await;
    assert_eq!(r.status(), 303, "{:?}", r.text().await);
    assert!(location(&r).starts_with("/_portcullis/reauth?next="));
    // The owner's browser back in Berlin is the same held session.
    assert_eq!(gw.status(&berlin, "/inbox").await, 303);
    assert_eq!(gw.upstream.count(), seen, "nothing reached the console");

    let held = events(&gw, "session_risk").await;
    assert_eq!(held.len(), 1);
    let reason = held[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("impossible_travel") && reason.contains("Sydney, AU"),
        "{reason}"
    );
    let mail = gw.outbox().await;
    let moved = mails_about(&mail, "moved too far");
    assert_eq!(moved.len(), 1, "{mail:?}");
    // Berlin, seconds after Frankfurt, was no place the session could have reached yet: the
    // jump to Sydney is measured from Frankfurt.
    assert!(moved[0].contains("Frankfurt am Main, DE"), "{}", moved[0]);

    // Another device proof does not lift the hold (the Berlin request dropped the bound cookie
    // from the shared jar); a second factor does.
    assert_eq!(webcrypto_refresh(&gw, &sydney, &dev).await.status(), 200);
    assert_eq!(gw.status(&sydney, "/inbox").await, 303);
    let r = reauth_with_code(&gw, &sydney, &secret, "/inbox").await;
    assert_eq!(location(&r), "/_portcullis/reauth/done?next=%2Finbox");
    assert_eq!(gw.status(&sydney, "/inbox").await, 200);
    // The second factor was given in Sydney: that is the session's place now, and its next
    // proofs there are no move.
    assert_eq!(webcrypto_refresh(&gw, &sydney, &dev).await.status(), 200);
    assert_eq!(gw.status(&sydney, "/inbox").await, 200);
    // Two proofs from Sydney while the session's place was still Frankfurt: two holds counted.
    let metrics = gw.state.metrics.render(&gw.state.login.hasher).unwrap();
    assert!(
        metrics.contains("portcullis_risk_assessments_total{stage=\"session\",level=\"high\"} 2")
            && metrics.contains("portcullis_step_ups_total{reason=\"session_risk\"}"),
        "{metrics}"
    );
}

/// A GeoIP database that is missing or of the wrong kind stops the gateway at start-up with a
/// message naming the key.
#[tokio::test]
async fn a_database_that_cannot_tell_places_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut c = test_config(dir.path(), addr, addr);
    c.risk.geoip_database = Some(dir.path().join("missing.mmdb"));
    c.validate().unwrap();
    let clock = std::sync::Arc::new(portcullis::clock::ManualClock::starting_now());
    let e = portcullis::state::AppState::new(c.clone(), clock)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("risk.geoip_database") && e.contains("missing.mmdb"),
        "{e}"
    );
    c.risk.geoip_database = Some(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip-asn-test.mmdb"),
    );
    c.validate().unwrap();
    let clock = std::sync::Arc::new(portcullis::clock::ManualClock::starting_now());
    let e = portcullis::state::AppState::new(c, clock)
        .await
        .unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("risk.geoip_database") && e.contains("City, Country"),
        "{e}"
    );
}

/// The switch to "second factor first" (after many wrong passwords, which an attacker can cause)
/// does not skip the scoring: a sign-in from an impossible place whose app code came first is
/// refused at its password when the account has a key, and the key-first one goes through.
#[tokio::test]
async fn a_risky_sign_in_whose_code_came_first_still_needs_the_key() {
    let gw = Gateway::start_with(|c| {
        localhost(c);
        geoip(c);
        c.limits.second_factor_first_after = 3;
    })
    .await;
    let email = "first@example.com";
    let (home, secret, _) = gw.signed_in(email).await;
    let mut k = key();
    register(&gw, &home, &mut k, "Desk key").await;
    let thief = gw.browser_moved_to(&gw.browser(), "127.0.2.9");
    // Code first, then the right password, from Sydney: refused, the sign-in ended.
    code_first(&gw, &thief, email, &secret).await;
    let r = gw.password(&thief, email, PASSWORD, "").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("security key"));
    assert_eq!(gw.status(&thief, "/campaigns").await, 303);
    assert_eq!(
        events(&gw, "risk_assessed").await.last().unwrap().outcome,
        "high"
    );
    let denied = events(&gw, "second_factor").await.pop().unwrap();
    assert_eq!(
        (denied.outcome.as_str(), denied.reason.as_deref()),
        ("denied", Some("high_risk"))
    );
    assert_eq!(mails_about(&gw.outbox().await, "Unusual sign-in").len(), 1);
    // The key first, then the password: in.
    let owner = gw.browser_moved_to(&gw.browser(), "127.0.2.10");
    let r = gw.password(&owner, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let (r, _, _) = second_factor(&gw, &owner, &mut k, |_, _| {}).await;
    assert_eq!(r.status(), 200);
    let r = gw.password(&owner, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/");
    assert_eq!(gw.status(&owner, "/campaigns").await, 200);
}

/// A high-risk sign-in of an account with a key also takes a recovery code (the owner's way in
/// without the key); with `risk.high_risk_factor = "any"` the app code does too; and where keys
/// cannot be used (WebAuthn off), nothing asks for one.
#[tokio::test]
async fn the_owner_without_the_key_at_hand_is_not_locked_out() {
    for (setting, what) in [
        ("recovery", "a recovery code"),
        ("any", "high_risk_factor any"),
        ("no-webauthn", "keys unusable here"),
    ] {
        let gw = Gateway::start_with(|c| {
            localhost(c);
            geoip(c);
            if setting == "any" {
                c.risk.high_risk_factor = portcullis::config::HighRiskFactor::Any;
            }
        })
        .await;
        let email = "traveller@example.com";
        let (home, secret, codes) = gw.signed_in(email).await;
        let mut k = key();
        register(&gw, &home, &mut k, "Desk key").await;
        let gw = if setting == "no-webauthn" {
            gw.restarted_with(|c| c.webauthn.enabled = false).await
        } else {
            gw
        };
        gw.clock.advance(600);
        let far = gw.browser_moved_to(&gw.browser(), "127.0.2.9");
        let r = gw.password(&far, email, PASSWORD, "").await;
        assert_eq!(location(&r), "/_portcullis/mfa", "{what}");
        let code = if setting == "recovery" {
            codes[0].clone()
        } else {
            gw.totp_now(&secret)
        };
        let r = gw.code(&far, "/_portcullis/mfa", &code).await;
        assert_eq!(r.status(), 303, "{what}");
        assert_eq!(gw.status(&far, "/campaigns").await, 200, "{what}");
    }
}

/// A held session reaches no admin page either: the console's guard sends it to confirm first,
/// and a key-session admin whose session is held gets nowhere until then.
#[tokio::test]
async fn a_held_admin_session_reaches_no_admin_page() {
    let gw = super::webauthn::gateway().await;
    let (_, c, _, _) = super::admin::admin(&gw).await;
    assert_eq!(gw.status(&c, "/_portcullis/admin").await, 200);
    // Hold the session as a device proof from an impossible place does, a minute later.
    gw.clock.advance(60);
    let cookies = gw.cookies(&c);
    let id = cookies
        .split("; ")
        .find_map(|kv| kv.strip_prefix("portcullis-session="))
        .unwrap();
    let mut loaded = gw.state.sessions.load(Some(id)).await.unwrap().unwrap();
    loaded.session.risk_hold_ms = Some(portcullis::clock::Clock::now_millis(&gw.clock));
    assert!(gw
        .state
        .sessions
        .update(&loaded.key, &loaded.session)
        .await
        .unwrap());
    let r = gw.get(&c, "/_portcullis/admin/users").await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        location(&r),
        "/_portcullis/reauth?next=%2F_portcullis%2Fadmin%2Fusers"
    );
    held_json(&gw, &c, "/_portcullis/admin/users").await;
    // The reauth page says why.
    let page = gw
        .page(&c, "/_portcullis/reauth?next=%2F_portcullis%2Fadmin")
        .await;
    assert!(page.contains("could not have travelled"), "{page}");
    // No "Cancel": every page of a held session asks for the proof again; signing out is the
    // way out.
    assert!(
        !page.contains(">Cancel</a>") && page.contains(">Sign out</a>"),
        "{page}"
    );
}

/// A sign-in the owner reports with "this wasn't me" is taken out of the account's history:
/// after the account is unlocked, the thief's place counts as new again.
#[tokio::test]
async fn a_reported_sign_in_does_not_make_its_place_familiar() {
    let gw = Gateway::start_with(geoip).await;
    let email = "reported@example.com";
    let (_, secret, _) = gw.signed_in(email).await;
    gw.clock.advance(2 * 86_400);
    let thief = gw.browser_moved_to(&gw.browser(), "127.0.2.9");
    gw.sign_in_on(&thief, email, &secret).await;
    let mail = gw.outbox().await;
    let notice = mails_about(&mail, "New sign-in").pop().unwrap().clone();
    assert!(notice.contains("127.0.2.9 (Sydney, AU)"), "{notice}");
    let r = super::devices::report(&gw, &super::devices::report_link(&notice)).await;
    assert_eq!(r.status(), 200);
    let user = gw.user(email).await;
    gw.state.durable.set_locked(&user.id, false).await.unwrap();

    gw.clock.advance(60);
    let again = gw.browser_moved_to(&gw.browser(), "127.0.2.10");
    let r = gw.password(&again, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let last = events(&gw, "risk_assessed").await.pop().unwrap();
    let reason = last.reason.unwrap_or_default();
    assert!(
        reason.contains("new_network") && reason.contains("new_country"),
        "{reason}"
    );
}

/// A sign-in is scored where its password was given, so it must go on from there: a code sent
/// from another network ends it (a thief could otherwise give the password near the owner and a
/// phished code from anywhere), in either order of password and code.
#[tokio::test]
async fn a_sign_in_cannot_move_to_another_network_between_its_steps() {
    let gw = Gateway::start_with(|c| {
        geoip(c);
        c.limits.second_factor_first_after = 3;
    })
    .await;
    let email = "split@example.com";
    let (_, secret, _) = gw.signed_in(email).await;
    gw.clock.advance(60);
    let near = gw.browser_moved_to(&gw.browser(), "127.0.0.77");
    let r = gw.password(&near, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    // The code sent from elsewhere (its form fetched where the sign-in began) ends the sign-in.
    let csrf = gw.csrf(&near, "/_portcullis/mfa").await;
    let far = gw.browser_moved_to(&near, "127.0.2.77");
    let r = far
        .post(gw.url("/_portcullis/mfa"))
        .header("accept", "text/html")
        .form(&[("code", gw.totp_now(&secret)), ("csrf", csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/login?notice=moved");
    assert_eq!(gw.status(&far, "/campaigns").await, 303);
    let moved = events(&gw, "sign_in_moved").await;
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].ip.as_deref(), Some("127.0.2.77"));
    // The owner is told: someone gave the password, here or elsewhere.
    let told = gw.outbox().await.join("\n");
    assert!(
        told.contains("Subject: A sign-in to your account on")
            && told.contains("Nothing was signed in")
            && told.contains("127.0.2.0/24"),
        "{told}"
    );

    // So does the mere page of the step, asked from elsewhere.
    let r = gw.password(&near, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let far = gw.browser_moved_to(&near, "127.0.2.77");
    assert_eq!(
        location(&gw.get(&far, "/_portcullis/mfa").await),
        "/_portcullis/login?notice=moved"
    );
    assert_eq!(events(&gw, "sign_in_moved").await.len(), 2);
    // The same network is no move: the owner's sign-in goes on.
    gw.sign_in_on(&near, email, &secret).await;
    assert_eq!(gw.status(&near, "/campaigns").await, 200);

    // Second factor first: the code from far away, the password near the owner.
    let thief = gw.browser_moved_to(&gw.browser(), "127.0.2.78");
    code_first(&gw, &thief, email, &secret).await;
    let near_again = gw.browser_moved_to(&thief, "127.0.0.78");
    let r = gw.password(&near_again, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/login?notice=moved");
    assert_eq!(gw.status(&near_again, "/campaigns").await, 303);
}

/// A cookie jar copied while its user sets up a second factor (the app's key on the page, the
/// recovery codes after it) reads nothing and sets up nothing from another network or another
/// browser: the enrolment ends (`sign_in_moved`), and its owner starts again.
#[tokio::test]
async fn a_jar_copied_mid_enrolment_reads_and_sets_up_nothing() {
    let gw = Gateway::start().await;
    let email = "enrolling@example.com";
    gw.add_user(email).await;
    // From another network, then from another browser on the same one.
    for round in 0..2 {
        // The owner's enrolment under way: the app's key on the page.
        let c = gw.browser();
        let r = gw.password(&c, email, PASSWORD, "").await;
        assert_eq!(location(&r), "/_portcullis/enrol/totp");
        let html = gw.page(&c, "/_portcullis/enrol/totp").await;
        let secret = extract(&html, "id=\"totp-secret\">", "<").unwrap();
        let copy = match round {
            0 => gw.browser_moved_to(&c, "127.0.2.50"),
            _ => gw.copied_jar(&c, None, Some("Thief/9")),
        };
        let r = gw.get(&copy, "/_portcullis/enrol/totp").await;
        assert_eq!(
            location(&r),
            "/_portcullis/login?notice=moved",
            "round {round}"
        );
        assert!(!r.text().await.unwrap().contains(&secret));
        // The enrolment is gone: nothing can be set up in it any more (the answer to the copy
        // dropped the session cookie of the jar it shares: a plain sign-in page).
        let r = gw.get(&c, "/_portcullis/enrol/totp").await;
        assert_eq!(location(&r), "/_portcullis/login", "round {round}");
    }
    assert_eq!(events(&gw, "sign_in_moved").await.len(), 2);

    // The recovery codes, shown once after the app is set up: not to a copy either.
    let c = gw.browser();
    let (secret, _) = gw.enrol_totp(&c, email).await;
    let copy = gw.copied_jar(&c, Some("127.0.3.50"), None);
    let r = gw.get(&copy, "/_portcullis/recovery-codes").await;
    assert_eq!(location(&r), "/_portcullis/login?notice=moved");
    // The owner, from where they began, signs in again with the app they set up.
    let c = gw.browser();
    gw.sign_in_on(&c, email, &secret).await;
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
    // A key ceremony of a sign-in under way, from a copy: 401 JSON naming the sign-in.
    gw.clock.advance(60);
    let c = gw.browser();
    let r = gw.password(&c, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let csrf = gw.csrf(&c, "/_portcullis/mfa").await;
    let copy = gw.copied_jar(&c, None, Some("Thief/9"));
    moved_api_step(
        &gw,
        &copy,
        "/_portcullis/webauthn/authenticate/start",
        &csrf,
    )
    .await;
}

/// A step of a sign-in under way asked by an API client (a page's script) from elsewhere:
/// `401 sign_in_moved`, naming the sign-in page.
async fn moved_api_step(gw: &Gateway, from: &Browser, path: &str, csrf: &str) {
    let r = from
        .post(gw.url(path))
        .header("x-csrf-token", csrf)
        .header("accept", "application/json")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "{path}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["error"].as_str(), v["login"].as_str()),
        (
            Some("sign_in_moved"),
            Some("/_portcullis/login?notice=moved")
        )
    );
}

/// A held session of an account with a security key is lifted only by the key, as a high-risk
/// sign-in of that account would need it; a code from the app leaves it held.
#[tokio::test]
async fn a_held_session_of_an_account_with_a_key_needs_the_key() {
    use serde_json::json;
    use webauthn_authenticator_rs::prelude::RequestChallengeResponse;
    let gw = placed_gateway(localhost).await;
    let email = "held-key@example.com";
    let (b, secret, _) = gw.signed_in(email).await;
    let dev = Device::new();
    bind_webcrypto(&gw, &b, &dev).await;
    let mut k = key();
    register(&gw, &b, &mut k, "Desk key").await;
    gw.clock.advance(120);
    let sydney = gw.browser_moved_to(&b, "127.0.2.9");
    assert_eq!(gw.status(&sydney, "/inbox").await, 303);
    assert_eq!(webcrypto_refresh(&gw, &sydney, &dev).await.status(), 200);
    let r = gw.get(&sydney, "/inbox").await;
    assert_eq!(location(&r), "/_portcullis/reauth?next=%2Finbox&key=1");
    // An app code is taken by the step-up page, but does not lift the hold.
    reauth_with_code(&gw, &sydney, &secret, "/inbox").await;
    assert_eq!(gw.status(&sydney, "/inbox").await, 303);
    // The key does.
    let html = gw
        .page(&sydney, "/_portcullis/reauth?next=%2Finbox&key=1")
        .await;
    let csrf = extract(&html, "data-csrf=\"", "\"").unwrap();
    let r = super::webauthn::call(&gw, &sydney, &csrf, "reauth/start", json!({})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let rcr: RequestChallengeResponse = serde_json::from_value(v["options"].clone()).unwrap();
    let cred = k
        .do_authentication(super::webauthn::origin(&gw), rcr)
        .unwrap();
    let body = json!({ "ceremony": v["ceremony"], "credential": cred, "next": "/inbox" });
    let r = super::webauthn::call(&gw, &sydney, &csrf, "reauth/finish", body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(gw.status(&sydney, "/inbox").await, 200);
}

/// A session signed in from an address the database cannot place closely starts where the
/// account was last placed: its key proving itself from Sydney seconds later is still held.
#[tokio::test]
async fn a_session_that_starts_unlocated_is_measured_from_the_last_place() {
    let gw = placed_gateway(|_| {}).await;
    let email = "unlocated@example.com";
    let (_, secret, _) = gw.signed_in(email).await;
    gw.clock.advance(60);
    // Known by its country only.
    let nl = gw.browser_moved_to(&gw.browser(), "127.0.5.9");
    gw.sign_in_on(&nl, email, &secret).await;
    let dev = Device::new();
    bind_webcrypto(&gw, &nl, &dev).await;
    assert_eq!(gw.status(&nl, "/inbox").await, 200);
    gw.clock.advance(5);
    let sydney = gw.browser_moved_to(&nl, "127.0.2.9");
    assert_eq!(webcrypto_refresh(&gw, &sydney, &dev).await.status(), 200);
    let r = gw.get(&sydney, "/inbox").await;
    assert_eq!(location(&r), "/_portcullis/reauth?next=%2Finbox");
}

/// A remembered browser's device proof must come from the network its password came from, as
/// a second factor must: from elsewhere the sign-in ends.
#[tokio::test]
async fn a_remembered_browsers_proof_cannot_move_to_another_network() {
    let gw = placed_gateway(|_| {}).await;
    let dev = Device::new();
    let (b, _) = super::remember::remembered_user(&gw, &dev).await;
    super::remember::sign_out(&gw, &b).await;
    gw.clock.advance(60);
    let r = gw.password(&b, super::remember::EMAIL, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/remembered");
    // The proof (the page's script, an API client) from elsewhere: 401, naming the sign-in.
    let csrf = gw.csrf(&b, "/_portcullis/remembered").await;
    let far = gw.browser_moved_to(&b, "127.0.2.9");
    moved_api_step(&gw, &far, "/_portcullis/remembered/challenge", &csrf).await;
    assert_eq!(gw.status(&far, "/inbox").await, 303);
    assert_eq!(events(&gw, "sign_in_moved").await.len(), 1);
}
