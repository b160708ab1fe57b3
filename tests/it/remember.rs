//! "Remember this browser": opt-in at the second factor, remembered once the session binds to
//! a WebCrypto device key, and then the key — never the device cookie alone — stands in for the
//! second factor after the password, until it expires or policy turns it off.

use serde_json::{json, Value};

use super::binding::{bind_webcrypto, browser_with, device_cookie_of, gateway, Device};
use super::harness::*;

pub(super) const EMAIL: &str = "rem@example.com";

/// Password + TOTP on `b`, ticking "remember this browser" when `remember`.
async fn sign_in(gw: &Gateway, b: &Browser, secret: &[u8], remember: bool) {
    gw.clock.advance(30);
    let r = gw.password(b, EMAIL, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let html = gw.page(b, "/_portcullis/mfa").await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let code = gw.totp_now(secret);
    let mut form = vec![("code", code.as_str()), ("csrf", csrf.as_str())];
    if remember {
        assert!(html.contains("name=\"remember\""), "{html}");
        form.push(("remember", "1"));
    }
    assert_eq!(post_mfa(gw, b, &form).await.status(), 303);
}

/// Sends the second-factor form with `fields`.
async fn post_mfa(gw: &Gateway, b: &Browser, fields: &[(&str, &str)]) -> reqwest::Response {
    b.post(gw.url("/_portcullis/mfa"))
        .form(fields)
        .send()
        .await
        .unwrap()
}

pub(super) async fn sign_out(gw: &Gateway, b: &Browser) {
    let csrf = gw.csrf(b, "/_portcullis/logout").await;
    b.post(gw.url("/_portcullis/logout"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
}

/// A JSON call of the remembered-device page.
async fn call(gw: &Gateway, b: &Browser, path: &str, body: Value) -> reqwest::Response {
    let csrf = gw.csrf(b, "/_portcullis/remembered").await;
    b.post(gw.url(&format!("/_portcullis/remembered/{path}")))
        .header("x-csrf-token", csrf)
        .header("accept", "application/json")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The device proof after the password, signed by `dev`.
pub(super) async fn prove(gw: &Gateway, b: &Browser, dev: &Device) -> reqwest::Response {
    let r = call(gw, b, "challenge", json!({})).await;
    assert_eq!(r.status(), 200);
    let ch: Value = r.json().await.unwrap();
    let proof = dev.proof(ch["challenge"].as_str().unwrap(), false);
    call(gw, b, "finish", json!({ "proof": proof })).await
}

/// A user signed in with "remember" ticked and bound to `dev`: their browser and TOTP secret.
pub(super) async fn remembered_user(gw: &Gateway, dev: &Device) -> (Browser, Vec<u8>) {
    let (b, secret, _) = gw.signed_in(EMAIL).await;
    sign_out(gw, &b).await;
    sign_in(gw, &b, &secret, true).await;
    bind_webcrypto(gw, &b, dev).await;
    (b, secret)
}

#[tokio::test]
async fn a_remembered_browser_proves_its_key_instead_of_the_second_factor() {
    let gw = gateway().await;
    let dev = Device::new();
    let (b, secret) = remembered_user(&gw, &dev).await;
    let user = gw.user(EMAIL).await;
    let device = &gw.state.durable.list_devices(&user.id).await.unwrap()[0];
    let until = device.remembered_until.expect("remembered");
    let now = portcullis::clock::Clock::now(&gw.clock);
    assert!((until - now - 30 * 86_400).abs() < 120, "for 30 days");
    let account = gw.page(&b, "/_portcullis/account").await;
    assert!(
        account.contains("Remembered"),
        "the owner sees it: {account}"
    );

    sign_out(&gw, &b).await;
    gw.clock.advance(60);
    let r = gw.password(&b, EMAIL, PASSWORD, "/campaigns").await;
    assert_eq!(location(&r), "/_portcullis/remembered");
    // Nothing of the console before the proof.
    assert_eq!(gw.status(&b, "/campaigns").await, 303);
    let r = prove(&gw, &b, &dev).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["redirect"], "/campaigns");
    // Bound at once to the same key: the console opens without another proof.
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    let token = gw.upstream.last_token();
    let claims = portcullis::token::verify(
        &token,
        &gw.jwks().await,
        "esp-console",
        Some(&gw.state.config.issuer()),
        3600,
    )
    .unwrap();
    assert_eq!(claims.amr, vec!["pwd".to_string(), "swk".to_string()]);
    // The device's key stood in for the second factor, but is no fresh second-factor proof:
    // changing how the user signs in still asks for one.
    let account = gw.page(&b, "/_portcullis/account").await;
    assert!(account.contains("id=\"reauth\""), "{account}");
    // The owner's sign-in history says how this sign-in was made.
    assert!(
        account.contains("password + remembered browser</td>"),
        "{account}"
    );
    assert!(gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "second_factor" && e.reason.as_deref() == Some("remembered_device")));
    assert!(gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "device_remembered" && e.ip.as_deref() == Some("127.0.0.1")));
    // The console is told so: no second factor proven in this session (`factor_time` absent),
    // though `auth_time` is the sign-in's; a code at the step-up page proves one.
    assert_eq!(claims.factor_time, None, "{claims:?}");
    gw.clock.advance(60);
    let r = super::risk::reauth_with_code(&gw, &b, &secret, "/campaigns").await;
    assert_eq!(r.status(), 303);
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    let stepped = super::webauthn::last_claims(&gw).await;
    assert_eq!(stepped.factor_time, Some(stepped.auth_time));
    assert!(stepped.auth_time >= claims.auth_time + 60);
}

#[tokio::test]
async fn the_password_alone_or_a_copied_device_cookie_still_needs_the_second_factor() {
    let gw = gateway().await;
    let dev = Device::new();
    let (b, _) = remembered_user(&gw, &dev).await;
    // Another browser with the password: the second factor, as always.
    let other = gw.browser();
    let r = gw.password(&other, EMAIL, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    // A thief who copied the device cookie (and knows the password) but has no key.
    let thief = browser_with(&gw, &device_cookie_of(&gw, &b));
    let r = gw.password(&thief, EMAIL, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/remembered");
    let r = prove(&gw, &thief, &Device::new()).await;
    assert_eq!(r.status(), 401);
    // One failed proof and the sign-in is back at the second factor; no console.
    assert_eq!(gw.status(&thief, "/campaigns").await, 303);
    assert_eq!(gw.status(&thief, "/_portcullis/mfa").await, 200);
    // The page's "Use my second factor instead" (the owner's way on, whose browser lost its
    // key) goes there too, not to a sign-in said to have expired.
    let csrf = gw.csrf(&thief, "/_portcullis/mfa").await;
    let r = thief
        .post(gw.url("/_portcullis/remembered/skip"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/mfa");
    // No second try at the device proof: the sign-in waits for the second factor only.
    let csrf = gw.csrf(&thief, "/_portcullis/mfa").await;
    let r = thief
        .post(gw.url("/_portcullis/remembered/challenge"))
        .header("x-csrf-token", csrf)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let failures = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "remembered_device" && e.outcome == "failure")
        .map(|e| e.ip)
        .collect::<Vec<_>>();
    // With the address it came from: a copied device cookie with a known password.
    assert_eq!(failures, [Some("127.0.0.1".to_string())]);
}

#[tokio::test]
async fn remembering_ends_with_its_date_the_device_and_the_factors() {
    let gw = gateway().await;
    let dev = Device::new();
    let (b, _) = remembered_user(&gw, &dev).await;
    let user = gw.user(EMAIL).await;
    // After 30 days the second factor is asked again.
    sign_out(&gw, &b).await;
    gw.clock.advance(30 * 86_400 + 1);
    let r = gw.password(&b, EMAIL, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    // A reset of the second factors forgets remembered devices.
    let device = gw.state.durable.list_devices(&user.id).await.unwrap()[0].clone();
    gw.state
        .durable
        .remember_device(
            &device.id,
            device.remember_key.as_deref(),
            Some(i64::MAX / 4),
        )
        .await
        .unwrap();
    gw.state
        .durable
        .reset_second_factors(&user.id, portcullis::clock::Clock::now(&gw.clock))
        .await
        .unwrap();
    // Nor does the password alone set up a new factor in the remembered device's place.
    let r = gw.password(&b, EMAIL, PASSWORD, "").await;
    assert_eq!(r.status(), 401);
    let again = gw.state.durable.list_devices(&user.id).await.unwrap()[0].clone();
    assert_eq!(again.remembered_until, None);
}

#[tokio::test]
async fn policy_can_switch_it_off_for_an_account() {
    let gw = super::harness::Gateway::start_with(|c| {
        super::harness::binding_on(c);
        c.remember_device.off_accounts = vec!["acct-1".into()];
    })
    .await;
    let (b, secret, _) = gw.signed_in(EMAIL).await;
    assert_eq!(gw.user(EMAIL).await.account_id, "acct-1");
    sign_out(&gw, &b).await;
    gw.clock.advance(30);
    gw.password(&b, EMAIL, PASSWORD, "").await;
    let html = gw.page(&b, "/_portcullis/mfa").await;
    assert!(!html.contains("name=\"remember\""), "not offered");
    // Asking anyway changes nothing.
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let code = gw.totp_now(&secret);
    b.post(gw.url("/_portcullis/mfa"))
        .form(&[
            ("code", code.as_str()),
            ("csrf", csrf.as_str()),
            ("remember", "1"),
        ])
        .send()
        .await
        .unwrap();
    bind_webcrypto(&gw, &b, &Device::new()).await;
    let user = gw.user(EMAIL).await;
    assert_eq!(
        gw.state.durable.list_devices(&user.id).await.unwrap()[0].remembered_until,
        None
    );
}

/// "Use the second factor instead" moves a sign-in waiting for the device proof to the second
/// factor; posted again (a second tab, a resubmitted form) it sends the browser to the step the
/// sign-in is at, not back to the start as if it had expired.
#[tokio::test]
async fn skipping_the_device_proof_goes_to_the_second_factor_and_a_second_skip_is_no_expiry() {
    let gw = gateway().await;
    let dev = Device::new();
    let (b, secret) = remembered_user(&gw, &dev).await;
    sign_out(&gw, &b).await;
    gw.clock.advance(60);
    let r = gw.password(&b, EMAIL, PASSWORD, "/campaigns").await;
    assert_eq!(location(&r), "/_portcullis/remembered");
    let csrf = gw.csrf(&b, "/_portcullis/remembered").await;
    let skip = || async {
        b.post(gw.url("/_portcullis/remembered/skip"))
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap()
    };
    let r = skip().await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let r = skip().await;
    assert_eq!(location(&r), "/_portcullis/mfa", "not an expired sign-in");
    // The sign-in goes on with the second factor, and ends where it was asked to.
    let html = gw.page(&b, "/_portcullis/mfa").await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let code = gw.totp_now(&secret);
    let r = b
        .post(gw.url("/_portcullis/mfa"))
        .form(&[("code", code.as_str()), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/campaigns");
    // Without any sign-in under way it is an expired one.
    let fresh = gw.browser();
    let csrf = gw.csrf(&fresh, "/_portcullis/login").await;
    let r = fresh
        .post(gw.url("/_portcullis/remembered/skip"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/login?notice=expired");
}

/// The owner replacing a second factor (the recovery codes, the app) from another browser ends
/// what remembered browsers stood in for: one remembered by a thief (who had the password and a
/// code once) is asked for the second factor again.
#[tokio::test]
async fn replacing_a_factor_forgets_the_other_remembered_browsers() {
    let gw = gateway().await;
    let dev = Device::new();
    let (b, secret) = remembered_user(&gw, &dev).await;
    sign_out(&gw, &b).await;
    gw.clock.advance(30);
    let r = gw.password(&b, EMAIL, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/remembered", "remembered so far");
    // The owner, on another browser, makes new recovery codes.
    let owner = gw.sign_in_again(EMAIL, &secret).await;
    bind_webcrypto(&gw, &owner, &Device::new()).await;
    let csrf = gw.csrf(&owner, "/_portcullis/account").await;
    let r = owner
        .post(gw.url("/_portcullis/account/recovery-codes"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let user = gw.user(EMAIL).await;
    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    assert!(
        devices.iter().all(|d| d.remembered_until.is_none()),
        "{devices:?}"
    );
    // The remembered browser is asked for the second factor.
    gw.clock.advance(30);
    let r = gw.password(&b, EMAIL, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
}

/// The offer says how long it lasts in the unit that fits: never "for 0 days".
#[tokio::test]
async fn the_offer_says_how_long_in_words() {
    for (lifetime, says) in [
        (30 * 86_400, "for 30 days"),
        (86_400, "for 1 day"),
        (12 * 3_600, "for 12 hours"),
        (4 * 60, "for 4 minutes"),
        (36 * 3_600, "for 36 hours"),
        (90, "for 90 seconds"),
    ] {
        let gw = Gateway::start_with(|c| {
            binding_on(c);
            c.remember_device.lifetime = std::time::Duration::from_secs(lifetime);
        })
        .await;
        let (b, _, _) = gw.signed_in(EMAIL).await;
        sign_out(&gw, &b).await;
        let r = gw.password(&b, EMAIL, PASSWORD, "").await;
        assert_eq!(location(&r), "/_portcullis/mfa");
        let html = gw.page(&b, "/_portcullis/mfa").await;
        assert!(
            html.contains(&format!("Remember this browser {says} (")),
            "{lifetime}: {html}"
        );
    }
}

/// A wrong code keeps the owner's choices: "remember this browser" comes back ticked, and a
/// sign-in stopped by wrong codes (or begun again with "Start over") still goes where it was
/// going.
#[tokio::test]
async fn a_wrong_code_keeps_the_box_ticked_and_a_new_start_keeps_the_way_on() {
    let gw = gateway().await;
    let (b, secret, _) = gw.signed_in(EMAIL).await;
    sign_out(&gw, &b).await;
    gw.clock.advance(30);
    let next = "/campaigns/42?tab=send&x=1";
    let r = gw.password(&b, EMAIL, PASSWORD, next).await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let html = gw.page(&b, "/_portcullis/mfa").await;
    let start_over = "name=\"next\" value=\"/campaigns/42?tab=send&#38;x=1\"";
    assert!(html.contains(start_over), "Start over keeps next: {html}");
    assert!(!html.contains("data-remember checked"), "unticked at first");
    // Four wrong codes with the box ticked: it stays ticked each time.
    for _ in 0..4 {
        let html = gw.page(&b, "/_portcullis/mfa").await;
        let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
        let form = [("code", "000000"), ("csrf", &csrf), ("remember", "1")];
        let r = post_mfa(&gw, &b, &form).await;
        assert_eq!(r.status(), 401);
        let page = r.text().await.unwrap();
        assert!(page.contains("data-remember checked"), "{page}");
        assert!(page.contains(start_over), "{page}");
        // Not ticked this time: comes back unticked.
        let csrf = extract(&page, "name=\"csrf\" value=\"", "\"").unwrap();
        let r = post_mfa(&gw, &b, &[("code", ""), ("csrf", csrf.as_str())]).await;
        assert_eq!(r.status(), 400);
        assert!(!r.text().await.unwrap().contains("data-remember checked"));
    }
    // The fifth wrong code ends the sign-in: back to the sign-in page, still going to `next`.
    let r = gw.code(&b, "/_portcullis/mfa", "000000").await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        location(&r),
        "/_portcullis/login?next=%2Fcampaigns%2F42%3Ftab%3Dsend%26x%3D1&notice=restart"
    );
    let page = gw.page(&b, &location(&r)).await;
    assert!(page.contains("Too many wrong codes"), "{page}");
    assert!(page.contains(start_over), "{page}");
    // "Start over" ends the sign-in under way (a shared computer): the right code sent after
    // it (Back) completes nothing; the sign-in page goes on to `next`.
    gw.clock.advance(30);
    let r = gw.password(&b, EMAIL, PASSWORD, next).await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let html = gw.page(&b, "/_portcullis/mfa").await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    // The browser's cookies as they were (Back, or a copy): the sign-in is ended on the
    // gateway, not only forgotten by the browser.
    let cookies = gw.cookies(&b);
    let r = b
        .post(gw.url("/_portcullis/logout"))
        .form(&[("csrf", csrf.as_str()), ("next", next)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        location(&r),
        "/_portcullis/login?next=%2Fcampaigns%2F42%3Ftab%3Dsend%26x%3D1"
    );
    let code = gw.totp_now(&secret);
    let r = gw
        .api()
        .post(gw.url("/_portcullis/mfa"))
        .header("accept", "text/html")
        .header("cookie", &cookies)
        .form(&[("code", code.as_str()), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert!(location(&r).starts_with("/_portcullis/login"), "{r:?}");
    let set: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
    assert!(
        !set.iter()
            .any(|v| v.to_str().unwrap().starts_with("portcullis-session=")
                && !v.to_str().unwrap().contains("Max-Age=0")),
        "no session: {set:?}"
    );
    // The code sent from another tab of that browser, whose cookie went with the sign-in: told
    // that the sign-in was interrupted, not shown a bare sign-in page.
    let r = post_mfa(&gw, &b, &[("code", code.as_str()), ("csrf", csrf.as_str())]).await;
    assert_eq!(location(&r), "/_portcullis/login?notice=expired");
}

/// The sign-in page's hint ("a second factor next") says that a remembered browser proves
/// itself instead, where browsers may be remembered, and only there.
#[tokio::test]
async fn the_sign_in_hint_names_the_remembered_browser_only_where_there_is_one() {
    for (lifetime, remembering) in [(30 * 86_400, true), (0, false)] {
        let gw = Gateway::start_with(|c| {
            binding_on(c);
            c.remember_device.lifetime = std::time::Duration::from_secs(lifetime);
        })
        .await;
        let html = gw.page(&gw.browser(), "/_portcullis/login").await;
        assert!(html.contains("asked for a second factor next"), "{html}");
        assert_eq!(
            html.contains("proves itself instead"),
            remembering,
            "{lifetime}"
        );
    }
}

/// A remembered browser signed out from another one's account page is shown as remembered no
/// more (its key signs nobody in any more).
#[tokio::test]
async fn a_signed_out_device_is_no_longer_shown_as_remembered() {
    let gw = gateway().await;
    let dev = Device::new();
    let (b, secret) = remembered_user(&gw, &dev).await;
    let user = gw.user(EMAIL).await;
    let remembered = gw.state.durable.list_devices(&user.id).await.unwrap()[0]
        .id
        .clone();
    let other = gw.browser();
    gw.clock.advance(30);
    gw.sign_in_on(&other, EMAIL, &secret).await;
    bind_webcrypto(&gw, &other, &Device::new()).await;
    let html = gw.page(&other, "/_portcullis/account").await;
    assert!(html.contains("<dt>Remembered</dt>"), "{html}");
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let r = other
        .post(gw.url(&format!("/_portcullis/account/devices/{remembered}/revoke")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert!(location(&r).contains("notice=device_revoked"));
    let html = gw.page(&other, "/_portcullis/account").await;
    assert!(!html.contains("<dt>Remembered</dt>"), "{html}");
    drop(b);
}

/// "Sign out every other device" on the account page: every other browser's sessions end at
/// once, a remembered one is remembered no more (password alone goes to the second factor
/// again), each is reported as new at its next sign-in; the browser that asked stays in.
#[tokio::test]
async fn signing_out_every_other_device_ends_them_all_but_this_one() {
    let gw = gateway().await;
    let dev = Device::new();
    let (remembered, secret) = remembered_user(&gw, &dev).await;
    let plain = gw.browser();
    gw.clock.advance(30);
    gw.sign_in_on(&plain, EMAIL, &secret).await;
    bind_webcrypto(&gw, &plain, &Device::new()).await;
    let this = gw.browser();
    gw.clock.advance(30);
    gw.sign_in_on(&this, EMAIL, &secret).await;
    bind_webcrypto(&gw, &this, &Device::new()).await;
    for b in [&plain, &this] {
        assert_eq!(gw.status(b, "/campaigns").await, 200);
    }
    let user = gw.user(EMAIL).await;
    let live = |gw: &Gateway| {
        let id = user.id.clone();
        let sessions = gw.state.sessions.clone();
        async move { sessions.list_user(&id).await.unwrap().len() }
    };
    assert_eq!(live(&gw).await, 3);

    let html = gw.page(&this, "/_portcullis/account").await;
    assert!(html.contains("id=\"sign-out-others\""), "{html}");
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    // Without the page's token: refused, nobody signed out.
    let r = this
        .post(gw.url("/_portcullis/account/devices/sign-out-others"))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(gw.status(&plain, "/campaigns").await, 200);

    let r = this
        .post(gw.url("/_portcullis/account/devices/sign-out-others"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(location(&r).contains("notice=others_signed_out"));
    // The browser signed out is told so, not that its session ran out: the owner learns of
    // it if it was not them.
    let refused = gw.navigate(&plain, "/campaigns").await;
    assert_eq!(
        location(&refused),
        "/_portcullis/login?next=%2Fcampaigns&notice=signed_out_elsewhere"
    );
    let told = gw.page(&plain, &location(&refused)).await;
    assert!(told.contains("signed out from another browser"), "{told}");
    assert_eq!(gw.status(&this, "/campaigns").await, 200, "this one stays");
    assert_eq!(
        live(&gw).await,
        1,
        "the remembered browser's session ended too"
    );

    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    assert_eq!(devices.len(), 3);
    assert_eq!(devices.iter().filter(|d| d.status == "revoked").count(), 2);
    let html = gw.page(&this, &location(&r)).await;
    assert!(
        html.contains("Every other browser was signed out"),
        "{html}"
    );
    assert!(!html.contains("<dt>Remembered</dt>"), "{html}");
    assert!(
        !html.contains("id=\"sign-out-others\""),
        "nothing left to sign out"
    );
    assert!(gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "other_devices_revoked"
            && e.reason.as_deref() == Some("2_devices:2_sessions")));

    // The remembered browser's key no longer stands in for the second factor.
    gw.clock.advance(30);
    let r = gw.password(&remembered, EMAIL, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    drop(dev);
}

/// A password change forgets the other remembered browsers, as a factor change does: from the
/// account page all but the browser that changed it, from the CLI every one. With the new
/// password they ask for the second factor again.
#[tokio::test]
async fn a_password_change_forgets_the_other_remembered_browsers() {
    let gw = gateway().await;
    let dev = Device::new();
    let (b, secret) = remembered_user(&gw, &dev).await;
    sign_out(&gw, &b).await;
    let owner = gw.sign_in_again(EMAIL, &secret).await;
    bind_webcrypto(&gw, &owner, &Device::new()).await;
    let new = "another long passphrase here";
    let csrf = gw.csrf(&owner, "/_portcullis/account").await;
    let r = owner
        .post(gw.url("/_portcullis/account/password"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("current_password", PASSWORD),
            ("password", new),
            ("password2", new),
        ])
        .send()
        .await
        .unwrap();
    assert!(location(&r).contains("notice=password_changed"));
    let user = gw.user(EMAIL).await;
    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    assert!(
        devices.iter().all(|d| d.remembered_until.is_none()),
        "{devices:?}"
    );
    gw.clock.advance(30);
    let r = gw.password(&b, EMAIL, new, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");

    // Remembered again (as the store has it), then the CLI sets a password: forgotten too.
    let until = portcullis::clock::Clock::now(&gw.clock) + 3600;
    for d in &devices {
        let key = d.remember_key.as_deref();
        gw.state
            .durable
            .remember_device(&d.id, key, Some(until))
            .await
            .unwrap();
    }
    let out = gw
        .cli(
            &["user", "set-password", EMAIL],
            Some("yet another long passphrase\n"),
        )
        .await;
    assert!(out.status.success(), "{out:?}");
    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    assert!(
        devices.iter().all(|d| d.remembered_until.is_none()),
        "{devices:?}"
    );
}
