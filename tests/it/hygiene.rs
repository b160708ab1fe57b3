//! Page hardening, CSRF and origin checks, secrets at rest, secrets out of the audit trail, and
//! a restart that loses nothing.

use super::harness::*;

#[tokio::test]
async fn gateway_pages_carry_strict_security_headers() {
    let gw = Gateway::start().await;
    let c = gw.browser();
    for path in [
        "/_portcullis/login",
        "/_portcullis/mfa",
        "/_portcullis/nope",
        "/_PORTCULLIS/x",
    ] {
        let r = c.get(gw.url(path)).send().await.unwrap();
        assert_hardened(r.headers(), path);
    }
    // No inline script anywhere on the sign-in pages.
    let html = gw.page(&c, "/_portcullis/login").await;
    assert!(
        !html.contains("<script>") && !html.contains("onclick="),
        "{html}"
    );
    // The pages name their own icon, served by the gateway: a browser asks no console
    // `/favicon.ico` from them (an error in every page's console before sign-in).
    assert!(
        html.contains("href=\"/_portcullis/static/favicon.svg\""),
        "{html}"
    );
    let r = c
        .get(gw.url("/_portcullis/static/favicon.svg"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
}

/// The gateway's own answers on the console's paths (sent to sign in, refused, a store away,
/// an address too long) are its pages too, hardened as they are: a store outage must not be the
/// moment a page of the gateway's can be framed or sniffed.
#[tokio::test]
async fn the_gateways_own_answers_on_console_paths_are_hardened() {
    let gw = Gateway::start().await;
    let long = format!("/campaigns/{}", "a".repeat(9000));
    for (client, path, status) in [
        (gw.browser().client, "/campaigns", 303),
        (gw.api(), "/campaigns", 401),
        (gw.browser().client, long.as_str(), 414),
        (gw.browser().client, "/_portcullis/%00", 400),
    ] {
        let r = client.get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        assert_hardened(
            r.headers(),
            &format!("{status} {}", &path[..20.min(path.len())]),
        );
    }
    let (c, _, _) = gw.signed_in("hardened@example.com").await;
    let r = c.get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The console's own answer keeps its own headers.
    assert!(r.headers().get("content-security-policy").is_none());
    let _db = gw.break_durable_store().await;
    gw.clock.advance(2);
    let r = c.get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_hardened(r.headers(), "503");
    assert!(r.text().await.unwrap().contains("temporarily unavailable"));
}

#[tokio::test]
async fn https_deployments_use_host_prefixed_secure_cookies() {
    let gw = Gateway::start_with(|c| {
        c.server.public_url = url::Url::parse("https://login.esp.example/").unwrap()
    })
    .await;
    gw.add_user("s@example.com").await;
    let r = gw
        .api()
        .get(gw.url("/_portcullis/login"))
        .send()
        .await
        .unwrap();
    let set = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        set.starts_with("__Host-portcullis-csrf=")
            && set.contains("Secure")
            && set.contains("HttpOnly")
            && set.contains("Path=/"),
        "{set}"
    );
    let csrf = extract(&r.text().await.unwrap(), "name=\"csrf\" value=\"", "\"").unwrap();
    let cookie = set.split(';').next().unwrap().to_string();
    let r = gw
        .api()
        .post(gw.url("/_portcullis/login"))
        .header("cookie", &cookie)
        .header("origin", "https://login.esp.example")
        .form(&[
            ("username", "s@example.com"),
            ("password", PASSWORD),
            ("csrf", &csrf),
            ("next", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers().get("set-cookie").unwrap().to_str().unwrap();
    assert!(
        set.starts_with("__Host-portcullis-session=")
            && set.contains("Secure")
            && set.contains("HttpOnly")
            && set.contains("SameSite=Lax"),
        "{set}"
    );
    assert!(r.headers().get("strict-transport-security").is_some());
}

#[tokio::test]
async fn forms_from_other_sites_are_refused() {
    let gw = Gateway::start().await;
    gw.add_user("o@example.com").await;
    let c = gw.browser();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    let form = [
        ("username", "o@example.com"),
        ("password", PASSWORD),
        ("csrf", csrf.as_str()),
        ("next", ""),
    ];
    for (name, value) in [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("referer", "https://evil.example/page"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = c
            .post(gw.url("/_portcullis/login"))
            .header(name, value)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}: {value}");
    }
    // A token from another browser (another CSRF cookie) does not fit this one.
    let other = gw.browser();
    let foreign = gw.csrf(&other, "/_portcullis/login").await;
    let r = c
        .post(gw.url("/_portcullis/login"))
        .form(&[
            ("username", "o@example.com"),
            ("password", PASSWORD),
            ("csrf", foreign.as_str()),
            ("next", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Missing token.
    let r = c
        .post(gw.url("/_portcullis/login"))
        .form(&[("username", "o@example.com"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let origin = gw.base.clone();
    let r = c
        .post(gw.url("/_portcullis/login"))
        .header("origin", origin)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "same origin passes");
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest_and_absent_from_the_audit_trail() {
    let gw = Gateway::start().await;
    let (c, secret, codes) = gw.signed_in("sec@example.com").await;
    c.get(gw.url("/x")).send().await.unwrap();
    let token = gw.upstream.last_token();
    let cookie = gw.cookies(&c);
    gw.state.audit.flush().await;
    // The database file (and its WAL) holds neither the TOTP secret nor the recovery codes.
    let mut db = Vec::new();
    for f in std::fs::read_dir(gw.dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.to_string_lossy().contains("db.sqlite") {
            db.extend(std::fs::read(&p).unwrap());
        }
    }
    assert!(db.len() > 1000);
    let b32 = portcullis::auth::totp::secret_base32(&secret);
    let contains = |needle: &[u8]| db.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(&secret), "raw TOTP secret in the database");
    assert!(
        !contains(b32.as_bytes()),
        "base32 TOTP secret in the database"
    );
    for code in &codes {
        assert!(!contains(code.as_bytes()), "recovery code in the database");
    }
    assert!(!contains(PASSWORD.as_bytes()), "password in the database");
    // The audit trail names events, never secrets.
    let events = gw.audit().await;
    assert!(events.len() >= 2);
    let dump = serde_json::to_string(&events).unwrap();
    for s in [
        PASSWORD,
        b32.as_str(),
        codes[0].as_str(),
        token.as_str(),
        cookie.split('=').nth(1).unwrap(),
    ] {
        assert!(!dump.contains(s), "audit trail leaks a secret");
    }
    for e in &events {
        assert!(e.at > 0 && !e.outcome.is_empty());
    }
    let login = events
        .iter()
        .find(|e| e.event == "login_password" && e.outcome == "success")
        .unwrap();
    assert_eq!(login.email.as_deref(), Some("sec@example.com"));
    assert_eq!(login.ip.as_deref(), Some("127.0.0.1"));
    assert!(login.user_agent.is_some());
    assert!(events.iter().any(|e| e.event == "totp_enrolled"));
}

#[tokio::test]
async fn idle_sessions_expire() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("idle@example.com").await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    gw.clock.advance(29 * 60);
    assert_eq!(
        c.get(gw.url("/x")).send().await.unwrap().status(),
        200,
        "still within 30 minutes"
    );
    gw.clock.advance(31 * 60);
    // A request of the page's own first (a poll): 401, and the cookie stays for the navigation
    // that tells the user.
    let r = c
        .get(gw.url("/api/poll"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers().get("set-cookie").is_none(),
        "no cookie cleared by a poll"
    );
    // A page opened now: the sign-in says the session ended, and comes back to the page.
    let r = c
        .get(gw.url("/x?y=1"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "idle for 31 minutes");
    assert_eq!(
        location(&r),
        "/_portcullis/login?next=%2Fx%3Fy%3D1&notice=session_ended"
    );
    let html = gw.page(&gw.browser(), &location(&r)).await;
    assert!(html.contains("Your session has ended"), "{html}");
    // A form sent then (the cookie is gone now) is not passed on; the browser is told so and comes back to the page the
    // form was on after signing in again.
    let before = gw.upstream.count();
    let r = c
        .post(gw.url("/campaigns/7/send"))
        .header("accept", "text/html")
        .header("referer", gw.url("/campaigns/new?draft=7"))
        .form(&[("subject", "Hello")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        location(&r),
        "/_portcullis/login?next=%2Fcampaigns%2Fnew%3Fdraft%3D7&notice=not_sent"
    );
    assert_eq!(gw.upstream.count(), before, "nothing forwarded");
    let html = gw.page(&gw.browser(), &location(&r)).await;
    assert!(html.contains("what you sent was not"), "{html}");
    // A browser that never signed in is sent to sign in without a word about an ended session.
    let r = gw
        .browser()
        .get(gw.url("/x"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/login?next=%2Fx");
}

#[tokio::test]
async fn a_restart_loses_no_user_factor_or_key() {
    let gw = Gateway::start().await;
    let (_c, secret, _) = gw.signed_in("keep@example.com").await;
    let kid = gw.state.signer.current_kid();
    let jwks_before: serde_json::Value = gw
        .api()
        .get(gw.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let again = gw.restarted().await;
    assert_eq!(
        again.state.signer.current_kid(),
        kid,
        "same signing key after restart"
    );
    let jwks_after: serde_json::Value = again
        .api()
        .get(again.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks_before, jwks_after);
    again.clock.advance(60);
    let c = again.browser();
    assert_eq!(
        location(&again.password(&c, "keep@example.com", PASSWORD, "").await),
        "/_portcullis/mfa",
        "TOTP still enrolled"
    );
    assert_eq!(
        location(
            &again
                .code(&c, "/_portcullis/mfa", &again.totp_now(&secret))
                .await
        ),
        "/"
    );
    assert_eq!(c.get(again.url("/x")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_null_origin_passes_only_when_the_browser_vouches_same_origin() {
    // Under `Referrer-Policy: no-referrer` browsers post our own forms with `Origin: null`.
    let gw = Gateway::start().await;
    gw.add_user("n@example.com").await;
    let c = gw.browser();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    let form = [
        ("username", "n@example.com"),
        ("password", PASSWORD),
        ("csrf", csrf.as_str()),
        ("next", ""),
    ];
    for (site, want) in [
        ("cross-site", 403),
        ("same-site", 403),
        ("same-origin", 303),
    ] {
        let r = c
            .post(gw.url("/_portcullis/login"))
            .header("origin", "null")
            .header("sec-fetch-site", site)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "Origin: null with Sec-Fetch-Site: {site}");
    }
}

#[tokio::test]
async fn storage_failure_fails_closed_with_503_and_recovers() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("fc@example.com").await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    let admin = gw.break_durable_store().await;
    let before = gw.upstream.count();
    let r = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        503,
        "the gate cannot check the user: refuse, never pass"
    );
    assert!(r.headers().contains_key("retry-after"));
    gw.assert_unavailable_json(&c, "/x").await;
    assert_eq!(
        gw.upstream.count(),
        before,
        "nothing forwarded while the store is down"
    );
    let c2 = gw.browser();
    assert_eq!(
        gw.password(&c2, "fc@example.com", PASSWORD, "")
            .await
            .status(),
        503
    );
    // Back again: everything recovers by itself.
    sqlx::query("ALTER TABLE users_away RENAME TO users")
        .execute(&admin)
        .await
        .unwrap();
    gw.clock.advance(2);
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn changed_argon2_parameters_rehash_at_the_next_sign_in() {
    let gw = Gateway::start().await;
    let (_c, secret, _) = gw.signed_in("rh@example.com").await;
    let old = gw
        .state
        .durable
        .user_by_email("rh@example.com")
        .await
        .unwrap()
        .unwrap()
        .password_hash;
    assert!(old.contains("m=1024,t=1"), "{old}");
    let again = gw
        .restarted_with(|c| c.password.argon2_iterations = 2)
        .await;
    again.clock.advance(60);
    let c = again.browser();
    assert_eq!(
        location(&again.password(&c, "rh@example.com", PASSWORD, "").await),
        "/_portcullis/mfa"
    );
    let new = again
        .state
        .durable
        .user_by_email("rh@example.com")
        .await
        .unwrap()
        .unwrap()
        .password_hash;
    assert!(
        new.contains("m=1024,t=2"),
        "rehashed with the new parameters: {new}"
    );
    assert_ne!(old, new);
    assert_eq!(
        location(
            &again
                .code(&c, "/_portcullis/mfa", &again.totp_now(&secret))
                .await
        ),
        "/"
    );
}

/// Every page layout of the gateway (sign-in, device check, admin console, the demo's) names
/// the gateway's icon, so no page makes the browser ask for `/favicon.ico` (refused or sent on
/// to the console, an error in the page's console each time).
#[test]
fn every_page_layout_names_the_icon() {
    fn layouts(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                layouts(&path, found);
            } else if std::fs::read_to_string(&path).unwrap().contains("<head>") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    layouts(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates"),
        &mut found,
    );
    assert!(found.len() >= 3, "{found:?}");
    for path in found {
        let html = std::fs::read_to_string(&path).unwrap();
        assert!(
            html.contains("<link rel=\"icon\" href=\"/_portcullis/static/favicon.svg\""),
            "{}",
            path.display()
        );
    }
}
