//! The admin console: authorisation of every route (walked from the router's own table),
//! sudo mode, bootstrap and enrolment links, account actions with their audit trail, the
//! home page, the audit view and export, in-person key enrolment, and step-up.

use portcullis::clock::Clock;
use reqwest::Method;
use serde_json::{json, Value};
use webauthn_authenticator_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse};

use super::harness::*;
use super::webauthn::{
    after_password, call, error_code, gateway, key, origin, page, post_form, registration,
    second_factor, start, with_key, Key,
};

const ROOT: &str = "root@example.com";

/// A password + security-key session (sudo-fresh) in a fresh browser.
async fn key_session(gw: &Gateway, email: &str, k: &mut Key) -> Browser {
    let c = after_password(gw, email).await;
    let (r, _, _) = second_factor(gw, &c, k, |_, _| {}).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    c
}

/// An admin with a key: their TOTP-only browser, a key-session browser, the user and the key.
pub(super) async fn admin(gw: &Gateway) -> (Browser, Browser, portcullis::store::User, Key) {
    let (totp_browser, u, mut k, _) = with_key(gw, ROOT, "Admin key").await;
    gw.state.durable.set_admin(&u.id, true).await.unwrap();
    gw.state.user_gate.forget(&u.id);
    let c = key_session(gw, ROOT, &mut k).await;
    (totp_browser, c, u, k)
}

/// Every message sent to `to` so far, one after another.
async fn mail_to(gw: &Gateway, to: &str) -> String {
    let header = format!("To: {to}");
    gw.outbox()
        .await
        .into_iter()
        .filter(|m| m.contains(&header))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends `method path` as the admin pages and scripts do: forms carry `csrf` and a reason,
/// the key-enrolment calls are JSON with the CSRF header. `json` asks for a JSON answer.
async fn hit(
    gw: &Gateway,
    c: &Browser,
    method: &Method,
    path: &str,
    csrf: &str,
    json: bool,
) -> reqwest::Response {
    let url = gw.url(path);
    let mut rb = if *method == Method::GET {
        c.get(url)
    } else if path.contains("/keys/register/") {
        c.post(url)
            .header("x-csrf-token", csrf)
            .json(&json!({ "name": "Key" }))
    } else {
        c.post(url)
            .form(&[("csrf", csrf), ("reason", "route walk")])
    };
    if json {
        rb = rb.header("accept", "application/json");
    }
    rb.send().await.unwrap()
}

/// Every admin route with its placeholders filled in.
fn concrete_routes(user_id: &str) -> Vec<(Method, String)> {
    portcullis::http::admin::route_table()
        .into_iter()
        .map(|(m, p)| {
            let path = p
                .replace("{id}", user_id)
                .replace("{sid}", "no-such-session")
                .replace("{key}", "no-such-key")
                .replace("{device}", "no-such-device");
            assert!(!path.contains('{'), "unfilled placeholder in {p}");
            (Method::from_bytes(m.as_str().as_bytes()).unwrap(), path)
        })
        .collect()
}

/// Which admin addresses exist cannot be told from outside: a wrong method on a real one, and an
/// address that leads nowhere, are answered as a real one is (sign in, or not for you); only an
/// admin learns that a method or an address is wrong.
#[tokio::test]
async fn admin_addresses_cannot_be_mapped_without_an_admin_session() {
    let gw = gateway().await;
    let (_, fresh_admin, _, _) = admin(&gw).await;
    let (customer, _, _) = gw.signed_in("mapper@example.com").await;
    let target = gw.user("mapper@example.com").await;
    let routes = concrete_routes(&target.id);
    let anonymous = gw.browser();
    let customer_csrf = gw.csrf(&customer, "/_portcullis/account").await;
    let admin_csrf = gw.csrf(&fresh_admin, "/_portcullis/account").await;
    let mut probes: Vec<(Method, String, u16)> = Vec::new();
    for (_, path) in &routes {
        for m in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ] {
            if !routes.iter().any(|(rm, rp)| rp == path && *rm == m) {
                probes.push((m, path.clone(), 405));
            }
        }
    }
    for path in [
        "/_portcullis/admin/",
        "/_portcullis/admin/no-such-page",
        &format!("/_portcullis/admin/users/{}/no-such-action", target.id),
    ] {
        probes.push((Method::GET, path.to_string(), 404));
        probes.push((Method::POST, path.to_string(), 404));
    }
    for (m, path, for_admin) in &probes {
        let send = |c: &Browser, csrf: &str| {
            c.request(m.clone(), gw.url(path))
                .header("accept", "application/json")
                .header("x-csrf-token", csrf)
                .form(&[("csrf", csrf), ("reason", "mapping")])
                .send()
        };
        let r = send(&anonymous, "").await.unwrap();
        assert_eq!(
            error_code(r).await,
            (401, "authentication_required".into()),
            "{m} {path}"
        );
        let r = send(&customer, &customer_csrf).await.unwrap();
        assert_eq!(
            error_code(r).await,
            (403, "admin_only".into()),
            "{m} {path}"
        );
        let r = send(&fresh_admin, &admin_csrf).await.unwrap();
        assert_eq!(r.status().as_u16(), *for_admin, "{m} {path}");
    }
    // An admin's browser opening a form's address is sent to the form's page.
    let unlock = format!("/_portcullis/admin/users/{}/unlock", target.id);
    let r = gw.get(&fresh_admin, &unlock).await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        location(&r),
        format!("/_portcullis/admin/users/{}", target.id)
    );
    // A browser opening one without a session is sent to sign in, as for a real page.
    let r = gw.get(&anonymous, "/_portcullis/admin/no-such-page").await;
    assert_eq!(r.status(), 303);
    assert!(location(&r).starts_with("/_portcullis/login?next="));
}

#[tokio::test]
async fn every_admin_route_refuses_strangers_customers_and_stale_admins() {
    let gw = gateway().await;
    let (totp_admin, fresh_admin, _, _) = admin(&gw).await;
    let (customer, _, _) = gw.signed_in("customer@example.com").await;
    let target = gw.user("customer@example.com").await;
    let routes = concrete_routes(&target.id);
    assert!(routes.len() >= 15, "the table lists every route");
    let anonymous = gw.browser();
    let anon_csrf = gw.csrf(&anonymous, "/_portcullis/login").await;
    let customer_csrf = gw.csrf(&customer, "/_portcullis/account").await;
    let totp_csrf = gw.csrf(&totp_admin, "/_portcullis/account").await;

    for (m, path) in &routes {
        // Nobody signed in: to the sign-in page, or 401.
        let r = hit(&gw, &anonymous, m, path, &anon_csrf, *m != Method::GET).await;
        if *m == Method::GET {
            assert_eq!(r.status(), 303, "{m} {path}");
            assert!(
                location(&r).starts_with("/_portcullis/login?next="),
                "{m} {path}"
            );
        } else {
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            assert_eq!(
                (status, v["error"].as_str().unwrap_or_default()),
                (401, "authentication_required"),
                "{m} {path}"
            );
            let login = v["login"].as_str().unwrap_or_default();
            assert!(login.starts_with("/_portcullis/login"), "{m} {path}: {v}");
        }
        // A customer with a complete session: 403, whatever the route.
        let r = hit(&gw, &customer, m, path, &customer_csrf, true).await;
        assert_eq!(
            error_code(r).await,
            (403, "admin_only".into()),
            "{m} {path}"
        );
        // An admin whose session was completed with a code only: step up with the key.
        let r = hit(&gw, &totp_admin, m, path, &totp_csrf, true).await;
        assert_eq!(
            error_code(r).await,
            (403, "step_up_required".into()),
            "{m} {path}"
        );
        if *m == Method::GET {
            let r = hit(&gw, &totp_admin, m, path, &totp_csrf, false).await;
            assert_eq!(r.status(), 303, "{m} {path}");
            let to = location(&r);
            assert!(
                to.starts_with("/_portcullis/reauth?next=") && to.ends_with("&key=1"),
                "{to}"
            );
        }
    }
    let denied: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "admin_denied" && e.email.as_deref() == Some("customer@example.com"))
        .map(|e| e.times)
        .collect();
    assert_eq!(
        denied.iter().sum::<i64>(),
        routes.len() as i64,
        "every refusal of a customer is audited"
    );
    // A customer can ask again and again: the first refusal and one summary of the rest.
    assert_eq!(denied.len(), 2, "{denied:?}");

    // A fresh key session passes the guard on every route (the handler then answers).
    let admin_csrf = gw.csrf(&fresh_admin, "/_portcullis/admin/users").await;
    for (m, path) in &routes {
        let r = hit(&gw, &fresh_admin, m, path, &admin_csrf, true).await;
        let status = r.status().as_u16();
        assert!(
            status != 401 && status != 403,
            "{m} {path}: {status} {}",
            r.text().await.unwrap()
        );
        if *m == Method::GET {
            assert_eq!(status, 200, "{m} {path}");
        }
    }
    // Past the sudo window the same session must touch its key again.
    gw.clock.advance(15 * 60 + 1);
    for (m, path) in &routes {
        let r = hit(&gw, &fresh_admin, m, path, &admin_csrf, true).await;
        assert_eq!(
            error_code(r).await,
            (403, "step_up_required".into()),
            "{m} {path}"
        );
    }
}

#[tokio::test]
async fn admin_forms_need_the_csrf_token() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    gw.signed_in("customer@example.com").await;
    let target = gw.user("customer@example.com").await;
    let path = format!("/_portcullis/admin/users/{}/disable", target.id);
    let r = c
        .post(gw.url(&path))
        .form(&[("reason", "no token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(!gw.user("customer@example.com").await.disabled);
    // And a page of the console is refused inside a frame, scripts only from the gateway.
    let r = gw.get(&c, "/_portcullis/admin").await;
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
}

/// The enrolment link in an admin page (HTML-escaped) or the CLI's output, as a path.
pub(super) fn link_path(text: &str) -> String {
    let text = text.replace("&#x2f;", "/").replace("&amp;", "&");
    let url = extract(&text, "data-enrolment-link>", "<")
        .or_else(|| {
            text.lines()
                .find(|l| l.starts_with("http"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no link in {text}"));
    let url = url::Url::parse(url.trim()).unwrap();
    format!("{}?{}", url.path(), url.query().unwrap())
}

/// Opens an enrolment link in `c` and sets `password` through it; returns the response.
async fn use_link(gw: &Gateway, c: &Browser, path: &str, password: &str) -> reqwest::Response {
    let html = gw.page(c, path).await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap_or_else(|| panic!("{html}"));
    let token = extract(&html, "name=\"t\" value=\"", "\"").unwrap();
    c.post(gw.url("/_portcullis/enrol"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("t", token.as_str()),
            ("password", password),
            ("password2", password),
        ])
        .send()
        .await
        .unwrap()
}

const NEW_PASSWORD: &str = "a long and private passphrase 7";

#[tokio::test]
async fn bootstrap_admin_then_enrolment_link_for_a_customer() {
    let gw = gateway().await;
    let out = gw
        .cli(&["admin", "bootstrap", "Boss@Example.com"], None)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let boss_link = link_path(&stdout);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("15m")
            || String::from_utf8_lossy(&out.stderr).contains("expires")
    );
    let boss = gw.user("boss@example.com").await;
    assert!(boss.is_admin && boss.password_hash.is_empty());

    // Without a password the account cannot be signed in to.
    let c = gw.browser();
    for guess in ["", "any password at all"] {
        let r = gw.password(&c, "boss@example.com", guess, "").await;
        assert_eq!(r.status(), if guess.is_empty() { 400 } else { 401 });
    }

    // The link: a weak password is refused without using the link up.
    let c = gw.browser();
    let r = use_link(&gw, &c, &boss_link, "password").await;
    assert_eq!(r.status(), 400);
    // An API client is told in JSON.
    let html = gw.page(&c, &boss_link).await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let token = extract(&html, "name=\"t\" value=\"", "\"").unwrap();
    let r = c
        .post(gw.url("/_portcullis/enrol"))
        .header("accept", "application/json")
        .form(&[
            ("csrf", csrf.as_str()),
            ("t", token.as_str()),
            ("password", NEW_PASSWORD),
            ("password2", "a different passphrase 8"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "password_refused", "{v}");
    let r = use_link(&gw, &c, &boss_link, NEW_PASSWORD).await;
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    // Used once: gone.
    let again = gw.get(&gw.browser(), &boss_link).await;
    assert_eq!(again.status(), 410);
    // An admin link takes a security key only: the app is neither offered nor accepted.
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    assert!(
        !html.contains("totp-secret") && html.contains("Register my security key"),
        "{html}"
    );
    let r = gw.code(&c, "/_portcullis/enrol/totp", "123456").await;
    assert_eq!(r.status(), 403);
    let mut k = key();
    let (csrf, body) = registration(&gw, &c, &mut k, "/_portcullis/enrol/totp", "Boss key").await;
    let r = call(&gw, &c, &csrf, "register/finish", body).await;
    assert_eq!(r.status(), 200);
    let csrf = gw.csrf(&c, "/_portcullis/recovery-codes").await;
    let r = c
        .post(gw.url("/_portcullis/recovery-codes"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // An administrator's link leads on to the admin console.
    assert_eq!(location(&r), "/_portcullis/admin");
    // Registering the key was a touch of it: the console opens.
    assert_eq!(gw.status(&c, "/_portcullis/admin").await, 200);

    // The admin creates a customer; the customer sets everything up through their link.
    let csrf = gw.csrf(&c, "/_portcullis/admin/users").await;
    let r = c
        .post(gw.url("/_portcullis/admin/users"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("email", "New@Example.com"),
            ("account", "acct-9"),
        ])
        .send()
        .await
        .unwrap();
    // Shown on the user's page after a redirect: reloading it shows the same link again
    // rather than sending the form again (which would void it).
    assert_eq!(r.status(), 303);
    let customer = gw.user("new@example.com").await;
    assert!(!customer.is_admin && customer.account_id == "acct-9");
    let shown = location(&r);
    assert!(
        shown.starts_with(&format!("/_portcullis/admin/users/{}?link=", customer.id)),
        "{shown}"
    );
    let customer_link = link_path(&gw.page(&c, &shown).await);
    let page = gw.page(&c, &shown).await;
    assert_eq!(link_path(&page), customer_link);
    // A new account has no factor for the link to leave in place.
    assert!(!page.contains("link-keeps-factors"), "{page}");
    // Creating the same email again is refused with a message: a conflict (409), on the page
    // and as JSON.
    for accept in ["text/html", "application/json"] {
        let r = c
            .post(gw.url("/_portcullis/admin/users"))
            .header("accept", accept)
            .form(&[
                ("csrf", csrf.as_str()),
                ("email", "new@example.com"),
                ("account", "acct-9"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409);
        let body = r.text().await.unwrap();
        assert!(body.contains("already exists"), "{body}");
        assert_eq!(
            accept == "application/json",
            body.contains("\"conflict\""),
            "{body}"
        );
    }
    // A checkbox sent unticked by a script (`admin=false`) makes no administrator; a value that
    // is neither ticked nor unticked is refused, creating no one.
    for (i, (value, status)) in [("false", 303), ("0", 303), ("", 303), ("maybe", 400)]
        .into_iter()
        .enumerate()
    {
        let email = format!("box{i}@example.com");
        let r = c
            .post(gw.url("/_portcullis/admin/users"))
            .form(&[
                ("csrf", csrf.as_str()),
                ("email", email.as_str()),
                ("account", "acct-9"),
                ("admin", value),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "admin={value}");
        if status == 400 {
            let page = r.text().await.unwrap();
            assert!(
                page.contains("a checkbox is 1 (ticked) or left out"),
                "{page}"
            );
        }
        let made = gw.state.durable.user_by_email(&email).await.unwrap();
        assert_eq!(
            made.as_ref().map(|u| u.is_admin),
            (status == 303).then_some(false)
        );
    }

    let cust = gw.browser();
    let r = use_link(&gw, &cust, &customer_link, NEW_PASSWORD).await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    // Used, the link is no longer shown to the admin as one that works.
    let page = gw.page(&c, &shown).await;
    assert!(!page.contains("data-enrolment-link"), "{page}");
    gw.enrol_app(&cust).await;
    let csrf = gw.csrf(&cust, "/_portcullis/recovery-codes").await;
    cust.post(gw.url("/_portcullis/recovery-codes"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(gw.status(&cust, "/campaigns").await, 200);
    // The password was set through the link: both are named.
    assert_eq!(
        super::webauthn::last_claims(&gw).await.amr,
        vec!["pwd", "otp"]
    );
    // The customer's password works from now on, with the factor they chose.
    gw.clock.advance(30);
    let again = gw.browser();
    let r = gw
        .password(&again, "new@example.com", NEW_PASSWORD, "")
        .await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    // Customers never reach the admin console.
    assert_eq!(gw.status(&cust, "/_portcullis/admin").await, 403);
    assert_eq!(gw.get(&gw.browser(), &customer_link).await.status(), 410);

    let events = gw.audit().await;
    let by_boss = |name: &str| {
        events.iter().any(|e| {
            e.event == name
                && e.actor.as_deref() == Some("boss@example.com")
                && e.email.as_deref() == Some("new@example.com")
        })
    };
    assert!(by_boss("user_created") && by_boss("enrolment_link_issued"));
    assert!(events.iter().any(|e| e.event == "enrolment_link_issued"
        && e.email.as_deref() == Some("boss@example.com")
        && e.actor.as_deref().is_some_and(|a| a.starts_with("cli:"))));
}

/// `portcullis user enrol-link EMAIL`: the path of the link it printed.
pub(super) async fn enrol_link(gw: &Gateway, email: &str) -> String {
    let out = gw.cli(&["user", "enrol-link", email], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    link_path(&String::from_utf8(out.stdout).unwrap())
}

/// An enrolment link used for an account that keeps its password leads to the second factor
/// without the password: the token's `amr` names the factor alone, not a password nobody typed;
/// one that set the password names both.
#[tokio::test]
async fn a_link_that_stood_in_for_the_password_is_not_called_one() {
    let gw = gateway().await;
    gw.add_user("kept@example.com").await;
    let path = enrol_link(&gw, "kept@example.com").await;
    let c = gw.browser();
    let r = use_link(&gw, &c, &path, "").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let (secret, _) = gw.enrol_app(&c).await;
    gw.save_recovery_codes(&c).await;
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
    assert_eq!(super::webauthn::last_claims(&gw).await.amr, vec!["otp"]);
    // Signing in afterwards with the password is both, as ever.
    gw.clock.advance(30);
    let b = gw.sign_in_again("kept@example.com", &secret).await;
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    assert_eq!(
        super::webauthn::last_claims(&gw).await.amr,
        vec!["pwd", "otp"]
    );
}

#[tokio::test]
async fn enrolment_links_expire_and_forged_ones_are_refused() {
    let gw = gateway().await;
    gw.add_user("late@example.com").await;
    let path = enrol_link(&gw, "late@example.com").await;
    // Someone with a password already follows the link straight to enrolment.
    assert!(!gw
        .page(&gw.browser(), &path)
        .await
        .contains("Choose a password"));
    for forged in [
        "/_portcullis/enrol?t=AAAA",
        "/_portcullis/enrol",
        "/_portcullis/enrol?t=%00%01",
    ] {
        assert_eq!(gw.status(&gw.browser(), forged).await, 410, "{forged}");
    }
    let wrong = format!("{}x", &path[..path.len() - 1]);
    assert_eq!(gw.status(&gw.browser(), &wrong).await, 410);
    // A new link for the user ends the earlier one (it may have leaked).
    let newer = enrol_link(&gw, "late@example.com").await;
    assert_eq!(gw.status(&gw.browser(), &path).await, 410, "superseded");
    assert_eq!(gw.status(&gw.browser(), &newer).await, 200);
    gw.clock.advance(72 * 3600 + 5);
    assert_eq!(gw.status(&gw.browser(), &newer).await, 410, "expired");
}

/// A user whose factors were reset follows a new enrolment link in a fresh browser and sends its
/// form ("Continue"): the browser, the link's path, the form's fields (`csrf`, `t`) and the
/// answer.
async fn continue_from_link(
    gw: &Gateway,
    email: &str,
) -> (Browser, String, [String; 2], reqwest::Response) {
    gw.add_user(email).await;
    gw.cli(&["user", "reset-mfa", email], None).await;
    // (The command line voided sessions by the system's clock: the gateway's is moved past it.)
    gw.clock.advance(5);
    let path = enrol_link(gw, email).await;
    let (c, form, r) = open_enrolment_link(gw, &path).await;
    (c, path, form, r)
}

/// An account signed in with an app (and holding recovery codes) before an enrolment link for
/// it is issued (the command line issues it by the system's clock), the link then opened in a new
/// browser and continued to the app's step: the account's app secret and codes, the browser and
/// the secret of the app it offers.
async fn link_for_an_account_with_an_app(
    gw: &Gateway,
    email: &str,
) -> (Vec<u8>, Vec<String>, Browser, Vec<u8>) {
    gw.clock.advance(-120);
    let (_, secret, codes) = gw.signed_in(email).await;
    gw.clock.advance(120);
    let path = enrol_link(gw, email).await;
    let (c, _, r) = open_enrolment_link(gw, &path).await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    let b32 = extract(&html, "id=\"totp-secret\">", "<").unwrap();
    let offered = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
    (secret, codes, c, offered)
}

/// An enrolment link used by an account that already holds recovery codes (to add a factor)
/// keeps them: no new set voids the owner's saved one behind their back, and the sign-in
/// completes without a codes page.
#[tokio::test]
async fn an_enrolment_link_keeps_the_recovery_codes_an_account_holds() {
    let gw = gateway().await;
    let email = "keeps-codes@example.com";
    let (_, codes, c, secret) = link_for_an_account_with_an_app(&gw, email).await;
    let user = gw.user(email).await;
    let left = gw
        .state
        .durable
        .recovery_codes_left(&user.id)
        .await
        .unwrap();
    assert!(left > 0);
    gw.clock.advance(30);
    let r = gw
        .code(&c, "/_portcullis/enrol/totp", &gw.totp_now(&secret))
        .await;
    assert_eq!(location(&r), "/", "complete, no new codes to show");
    assert_eq!(gw.status(&c, "/inbox").await, 200);
    assert_eq!(
        gw.state
            .durable
            .recovery_codes_left(&user.id)
            .await
            .unwrap(),
        left,
        "the saved codes stand"
    );
    let d = gw.browser();
    gw.password(&d, email, PASSWORD, "").await;
    assert_eq!(
        location(&gw.code(&d, "/_portcullis/mfa", &codes[0]).await),
        "/"
    );
}

/// The app set up through an enrolment link takes its first code even for the 30 seconds in
/// which the account's earlier app was just used to sign in: a step used with another secret is
/// no replay of this one; a second confirmation sent with it (a double submit) sets nothing up
/// twice.
#[tokio::test]
async fn a_new_apps_first_code_is_no_replay_of_the_earlier_apps_last() {
    let gw = gateway().await;
    let email = "same-step@example.com";
    let (old_secret, _, c, secret) = link_for_an_account_with_an_app(&gw, email).await;
    // The earlier app signs in now, in this same step, on another browser.
    let d = gw.browser();
    gw.password(&d, email, PASSWORD, "").await;
    let r = gw
        .code(&d, "/_portcullis/mfa", &gw.totp_now(&old_secret))
        .await;
    assert_eq!(location(&r), "/");
    let code = gw.totp_now(&secret);
    let (first, second) = tokio::join!(
        gw.code(&c, "/_portcullis/enrol/totp", &code),
        gw.code(&c, "/_portcullis/enrol/totp", &code),
    );
    assert!(
        [&first, &second]
            .iter()
            .any(|r| r.status() == 303 && location(r) == "/"),
        "the app is set up"
    );
    // (The account's first app was set up before the link was used.)
    let set_up = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.email.as_deref() == Some(email))
        .skip_while(|e| e.event != "enrolment_link_used")
        .filter(|e| e.event == "totp_enrolled")
        .count();
    assert_eq!(set_up, 1, "one confirmation sets the app up");
}

/// Opens the enrolment link at `path` in a new browser and continues (an account with a
/// password is asked for none): the browser, the form's `csrf` and `t`, and the answer.
async fn open_enrolment_link(
    gw: &Gateway,
    path: &str,
) -> (Browser, [String; 2], reqwest::Response) {
    let c = gw.browser();
    let html = gw.page(&c, path).await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let token = extract(&html, "name=\"t\" value=\"", "\"").unwrap();
    let r = c
        .post(gw.url("/_portcullis/enrol"))
        .form(&[("csrf", csrf.as_str()), ("t", token.as_str())])
        .send()
        .await
        .unwrap();
    (c, [csrf, token], r)
}

/// An enrolment begun from a link may take longer than a sign-in (installing an app), and
/// opening the used link again in that browser (a second tab, Back, the mail) goes on with it;
/// anywhere else the used link stays gone.
#[tokio::test]
async fn an_enrolment_from_a_link_waits_for_the_app_and_the_link_reopened_goes_on_with_it() {
    let gw = gateway().await;
    let (c, path, [csrf, token], r) = continue_from_link(&gw, "slow@example.com").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    let b32 = extract(&html, "id=\"totp-secret\">", "<").unwrap();
    // The link opened again (GET) and its form sent again (Back, then Continue): the same
    // enrolment, the same secret.
    let r = gw.get(&c, &path).await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let r = c
        .post(gw.url("/_portcullis/enrol"))
        .form(&[("csrf", csrf.as_str()), ("t", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    // Another browser gets nothing from the used link.
    assert_eq!(gw.get(&gw.browser(), &path).await.status(), 410);
    // Half an hour later (three times the sign-in timeout), the app's code still completes it.
    gw.clock.advance(30 * 60);
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    assert_eq!(
        extract(&html, "id=\"totp-secret\">", "<").as_deref(),
        Some(b32.as_str())
    );
    let secret = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
    let r = gw
        .code(&c, "/_portcullis/enrol/totp", &gw.totp_now(&secret))
        .await;
    assert_eq!(location(&r), "/_portcullis/recovery-codes");
    // An enrolment never finished ends after an hour, as a sign-in does after its timeout.
    let (c, path, _, _) = continue_from_link(&gw, "gone@example.com").await;
    gw.clock.advance(61 * 60);
    assert_eq!(
        location(&gw.get(&c, "/_portcullis/enrol/totp").await),
        "/_portcullis/login?notice=expired"
    );
    assert_eq!(gw.get(&c, &path).await.status(), 410);
    // The sign-in page says what to do: a new link.
    let notice = gw.page(&c, "/_portcullis/login?notice=expired").await;
    assert!(
        notice.contains("ask your administrator for a new link"),
        "{notice}"
    );
    // An enrolment under way when every session of the account is ended (`user reset-mfa`,
    // `set-password`: a link that leaked, used by someone else) ends with them: its app is
    // never set up.
    let (c, path, _, _) = continue_from_link(&gw, "cut@example.com").await;
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    let b32 = extract(&html, "id=\"totp-secret\">", "<").unwrap();
    let secret = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
    let cut = gw.user("cut@example.com").await;
    gw.clock.advance(1);
    gw.state
        .durable
        .void_sessions(&cut.id, portcullis::clock::Clock::now_millis(&gw.clock))
        .await
        .unwrap();
    gw.clock.advance(1);
    let r = send_app_code_from(&gw, &c, &html, &secret).await;
    assert_eq!(location(&r), "/_portcullis/login?notice=expired");
    assert!(gw.state.durable.totp(&cut.id).await.unwrap().is_none());
    assert_eq!(gw.get(&c, &path).await.status(), 410, "no way back in");
}

/// Sends the app step's form of `html`, a page shown earlier (which may no longer open: its
/// session may have ended), with the app's code now.
async fn send_app_code_from(
    gw: &Gateway,
    c: &Browser,
    html: &str,
    secret: &[u8],
) -> reqwest::Response {
    let csrf = extract(html, "name=\"csrf\" value=\"", "\"").unwrap();
    c.post(gw.url("/_portcullis/enrol/totp"))
        .form(&[
            ("code", gw.totp_now(secret).as_str()),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .unwrap()
}

/// "Reset second factors" on an account that has none to remove (reset before, or created
/// without a password) still cuts off a setup under way through its link: someone else's use of a
/// link that leaked is stopped before their app is set up.
#[tokio::test]
async fn a_reset_with_no_factor_to_remove_still_ends_a_setup_under_way() {
    let gw = gateway().await;
    let (_, admin_c, _, _) = admin(&gw).await;
    let (c, _, _, r) = continue_from_link(&gw, "leaked@example.com").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    let b32 = extract(&html, "id=\"totp-secret\">", "<").unwrap();
    let secret = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
    let user = gw.user("leaked@example.com").await;
    // (A link nobody has used yet: it may be the one that leaked.)
    let unused = gw
        .state
        .durable
        .create_enrolment_link(portcullis::store::EnrolmentLink {
            token_hash: portcullis::crypto::sha256_hex(b"an unused link's token"),
            user_id: user.id.clone(),
            created_by: "test".into(),
            key_only: false,
            created_at: portcullis::clock::Clock::now(&gw.clock),
            expires_at: portcullis::clock::Clock::now(&gw.clock) + 3600,
            used_at: None,
        })
        .await;
    unused.unwrap();
    gw.clock.advance(1);
    let page = format!("/_portcullis/admin/users/{}", user.id);
    let csrf = gw.csrf(&admin_c, &page).await;
    let r = admin_c
        .post(gw.url(&format!("{page}/reset-factors")))
        .form(&[("csrf", csrf.as_str()), ("reason", "link leaked")])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), format!("{page}?notice=no_factors"));
    gw.clock.advance(1);
    let r = send_app_code_from(&gw, &c, &html, &secret).await;
    assert_eq!(location(&r), "/_portcullis/login?notice=expired");
    assert!(gw.state.durable.totp(&user.id).await.unwrap().is_none());
    let hash = portcullis::crypto::sha256_hex(b"an unused link's token");
    let now = portcullis::clock::Clock::now(&gw.clock);
    let link = gw.state.durable.enrolment_link(&hash, now).await.unwrap();
    assert!(link.is_none(), "the unused link ended with the reset");
}

/// A key-only link for an account without a second factor closes the way its password alone
/// would set up an authenticator app at the first sign-in (someone with the password would get
/// there first): the password now sets up nothing, and the link enrols a key.
#[tokio::test]
async fn a_key_only_link_closes_the_password_route_to_an_app() {
    let gw = gateway().await;
    let email = "key-only@example.com";
    gw.add_user(email).await;
    let out = gw
        .cli(&["user", "enrol-link", "--key-only", email], None)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = link_path(&String::from_utf8(out.stdout).unwrap());
    let c = gw.browser();
    let r = gw.password(&c, email, PASSWORD, "").await;
    let status = r.status();
    assert_ne!(location(&r), "/_portcullis/enrol/totp");
    assert!(status.is_client_error(), "{status}");
    assert_eq!(
        c.get(gw.url("/_portcullis/enrol/totp"))
            .send()
            .await
            .unwrap()
            .status(),
        303
    );
    assert!(gw
        .state
        .durable
        .totp(&gw.user(email).await.id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        gw.status(&gw.browser(), &path).await,
        200,
        "the link enrols"
    );
}

/// Where security keys cannot work (an IP address as public URL, or WebAuthn off), a key-only
/// link could never be used: it is refused, and the user's earlier link stays valid.
#[tokio::test]
async fn a_key_only_link_is_refused_where_keys_cannot_work() {
    let gw = Gateway::start().await;
    gw.add_user("nokey@example.com").await;
    let path = enrol_link(&gw, "nokey@example.com").await;
    let out = gw
        .cli(
            &["user", "enrol-link", "--key-only", "nokey@example.com"],
            None,
        )
        .await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a security key") && err.contains("public_url"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(
        gw.status(&gw.browser(), &path).await,
        200,
        "the earlier link still works"
    );
}

#[tokio::test]
async fn account_actions_take_effect_and_name_the_admin() {
    let gw = gateway().await;
    let (_, c, root, _) = admin(&gw).await;
    let (customer, secret, _) = gw.signed_in("customer@example.com").await;
    let target = gw.user("customer@example.com").await;
    let user_page = format!("/_portcullis/admin/users/{}", target.id);
    let html = gw.page(&c, &user_page).await;
    assert!(
        html.contains("customer@example.com") && html.contains("Live sessions"),
        "{html}"
    );
    assert!(
        html.contains("otp"),
        "the live session and its methods are listed"
    );
    let csrf = gw.csrf(&c, &user_page).await;
    let post = |path: String, reason: &'static str| {
        let c = &c.client;
        let csrf = csrf.clone();
        let url = gw.url(&path);
        async move {
            c.post(url)
                .form(&[("csrf", csrf.as_str()), ("reason", reason)])
                .send()
                .await
                .unwrap()
        }
    };

    // A reason is required.
    let r = post(format!("{user_page}/disable"), " ").await;
    assert_eq!(r.status(), 400);
    assert!(!gw.user("customer@example.com").await.disabled);
    // Disabling ends the customer's sessions at once.
    let r = post(format!("{user_page}/disable"), "fraud report 1234").await;
    assert_eq!(r.status(), 303);
    assert!(gw.user("customer@example.com").await.disabled);
    assert_eq!(gw.status(&customer, "/campaigns").await, 303);
    // An admin cannot disable or reset themselves.
    let own = format!("/_portcullis/admin/users/{}", root.id);
    assert_eq!(post(format!("{own}/disable"), "oops").await.status(), 409);
    assert_eq!(
        post(format!("{own}/reset-factors"), "oops").await.status(),
        409
    );
    // Enable (the owner is told), then reset the second factors: the next sign-in enrols anew.
    assert_eq!(
        post(format!("{user_page}/enable"), "resolved")
            .await
            .status(),
        303
    );
    let told = mail_to(&gw, "customer@example.com").await;
    assert!(told.contains("enabled the account again"), "{told}");
    gw.clock.advance(1);
    let again = gw.sign_in_again("customer@example.com", &secret).await;
    assert_eq!(gw.status(&again, "/campaigns").await, 200);
    assert_eq!(
        post(format!("{user_page}/reset-factors"), "lost phone")
            .await
            .status(),
        303
    );
    assert_eq!(gw.status(&again, "/campaigns").await, 303, "sessions ended");
    // Reset again: nothing is left to remove, so the owner is not mailed again; it still ends
    // sign-ins under way and unused links, so it is audited, with the admin's reason.
    let (events, mails) = (gw.audit().await.len(), gw.outbox().await.len());
    let r = post(format!("{user_page}/reset-factors"), "twice").await;
    assert!(
        location(&r).ends_with("notice=no_factors"),
        "{}",
        location(&r)
    );
    let page = gw.page(&c, &location(&r)).await;
    assert!(page.contains("no second factor to remove"), "{page}");
    let trail = gw.audit().await;
    assert_eq!(trail.len(), events + 1);
    assert!(trail.iter().any(|e| e.event == "second_factors_reset"
        && e.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("twice (no factor left"))));
    assert_eq!(gw.outbox().await.len(), mails);
    // The password alone no longer sets up a factor: the user needs an enrolment link.
    let r = gw
        .password(&gw.browser(), "customer@example.com", PASSWORD, "")
        .await;
    assert_eq!(r.status(), 401);
    // Locked by a report, unlocked by an admin.
    gw.state.durable.set_locked(&target.id, true).await.unwrap();
    let r = post(format!("{user_page}/unlock"), "owner called").await;
    assert_eq!(r.status(), 303);
    assert!(!gw.user("customer@example.com").await.locked);
    // Its factors were reset above: the admin is told the password alone still signs in nobody.
    let page = gw.page(&c, &location(&r)).await;
    assert!(
        page.contains("no second factor left") && page.contains("enrolment link"),
        "{page}"
    );
    // Unknown keys, devices and sessions are 404, not a silent success.
    assert_eq!(
        post(format!("{user_page}/keys/nope/remove"), "x")
            .await
            .status(),
        404
    );
    assert_eq!(
        post(format!("{user_page}/devices/nope/revoke"), "x")
            .await
            .status(),
        404
    );
    assert_eq!(
        post("/_portcullis/admin/users/no-such-user/disable".into(), "x")
            .await
            .status(),
        404
    );

    let events = gw.audit().await;
    for (event, reason) in [
        ("user_disabled", "fraud report 1234"),
        ("user_enabled", "resolved"),
        ("second_factors_reset", "lost phone"),
        ("user_unlocked", "owner called"),
    ] {
        assert!(
            events.iter().any(|e| e.event == event
                && e.actor.as_deref() == Some(ROOT)
                && e.user_id.as_deref() == Some(target.id.as_str())
                && e.reason.as_deref() == Some(reason)),
            "{event} audited with the admin as actor"
        );
    }
    // The owner was told about the disable and the reset.
    let mail = gw.outbox().await.join("\n");
    assert!(mail.contains("disabled the account") && mail.contains("removed all second factors"));
    // Said to be an administrator's doing, without asking whether it was the owner's, and
    // without the reason meant for the audit trail.
    let disabled = gw
        .outbox()
        .await
        .into_iter()
        .find(|m| m.contains("disabled the account"))
        .unwrap();
    assert!(
        disabled.contains("An administrator of")
            && !disabled.contains("If this was you")
            && !disabled.contains("fraud report 1234"),
        "{disabled}"
    );
    assert!(!disabled.contains("Z UTC"), "{disabled}");
}

#[tokio::test]
async fn sessions_and_devices_are_ended_from_the_console() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    let (customer, secret, _) = gw.signed_in("customer@example.com").await;
    let other = gw.sign_in_again("customer@example.com", &secret).await;
    let target = gw.user("customer@example.com").await;
    let user_page = format!("/_portcullis/admin/users/{}", target.id);
    let html = gw.page(&c, &user_page).await;
    let sid = extract(&html, "/sessions/", "/end\"").expect("a session to end");
    // Each row's button names what it acts on for a screen reader, not a bare "End".
    assert!(
        html.contains("aria-label=\"End the session started ")
            && html.contains("aria-label=\"Revoke the device "),
        "{html}"
    );
    let csrf = gw.csrf(&c, &user_page).await;
    let r = c
        .post(gw.url(&format!("{user_page}/sessions/{sid}/end")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let alive = [
        gw.status(&customer, "/campaigns").await,
        gw.status(&other, "/campaigns").await,
    ];
    assert_eq!(
        alive.iter().filter(|s| **s == 200).count(),
        1,
        "exactly that session ended: {alive:?}"
    );
    // Revoking a device ends its sessions.
    let device = gw.state.durable.list_devices(&target.id).await.unwrap()[0]
        .id
        .clone();
    let r = c
        .post(gw.url(&format!("{user_page}/devices/{device}/revoke")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        gw.state.durable.list_devices(&target.id).await.unwrap()[0].status,
        "revoked"
    );
    // Revoking it again changes nothing, is neither audited nor mailed again, and says so.
    let r = c
        .post(gw.url(&format!("{user_page}/devices/{device}/revoke")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(
        location(&r).contains("notice=device_revoked_already"),
        "{}",
        location(&r)
    );
    assert!(gw.page(&c, &location(&r)).await.contains("revoked already"));
    // End all, with a reason (a session of a new sign-in is live to be ended).
    gw.clock.advance(30);
    let third = gw.sign_in_again("customer@example.com", &secret).await;
    assert_eq!(gw.status(&third, "/campaigns").await, 200);
    let r = c
        .post(gw.url(&format!("{user_page}/sessions/end")))
        .form(&[("csrf", csrf.as_str()), ("reason", "laptop stolen")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(gw.status(&customer, "/campaigns").await, 303);
    assert_eq!(gw.status(&other, "/campaigns").await, 303);
    // The browser is told who ended its session (a page read, a navigation).
    let r = gw.navigate(&third, "/campaigns").await;
    assert_eq!(
        location(&r),
        "/_portcullis/login?next=%2Fcampaigns&notice=ended_by_admin"
    );
    let told = gw.page(&third, &location(&r)).await;
    assert!(
        told.contains("An administrator ended this session"),
        "{told}"
    );

    gw.state.audit.flush().await;
    let trail = gw.audit().await;
    let by_admin = |event: &str| -> Vec<String> {
        trail
            .iter()
            .filter(|e| e.event == event && e.actor.as_deref() == Some(ROOT))
            .map(|e| e.reason.clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(by_admin("session_ended"), [format!("sid:{sid}")]);
    assert_eq!(by_admin("device_revoked"), [format!("device:{device}")]);
    assert_eq!(by_admin("sessions_ended"), ["all: laptop stolen"]);
    // The owner is told of each, once.
    let told = mail_to(&gw, "customer@example.com").await;
    for what in [
        "an administrator ended a session of the account (signed in from 127.0.0.1)",
        "an administrator ended every session of the account",
    ] {
        assert_eq!(told.matches(what).count(), 1, "{what}: {told}");
    }
    assert_eq!(
        told.matches("an administrator revoked the device").count(),
        1,
        "{told}"
    );
}

/// Disabling a disabled account, enabling an enabled one or unlocking an unlocked one changes
/// nothing: no second audit row, no second mail to the owner.
#[tokio::test]
async fn account_actions_that_change_nothing_are_not_repeated() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    let target = gw.add_user("twice@example.com").await;
    let user_page = format!("/_portcullis/admin/users/{}", target.id);
    let csrf = gw.csrf(&c, &user_page).await;
    // The page says what happened, nothing when nothing did.
    for (action, notice) in [
        ("disable", "disabled"),
        ("disable", "disabled_already"),
        ("enable", "enabled"),
        ("enable", "not_disabled"),
        ("unlock", "not_locked"),
        ("sessions/end", "no_sessions"),
        ("sessions/end", "no_sessions"),
        ("sessions/no-such-session/end", "session_gone"),
    ] {
        let r = c
            .post(gw.url(&format!("{user_page}/{action}")))
            .form(&[("csrf", csrf.as_str()), ("reason", "checking")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{action}");
        let to = location(&r);
        assert!(to.ends_with(&format!("notice={notice}")), "{action}: {to}");
    }
    let page = gw
        .page(&c, &format!("{user_page}?notice=no_sessions"))
        .await;
    assert!(page.contains("had no live session"), "{page}");
    assert!(!gw.user("twice@example.com").await.disabled);
    gw.state.audit.flush().await;
    let events: Vec<String> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.actor.as_deref() == Some(ROOT) && e.user_id.as_deref() == Some(&target.id))
        .map(|e| e.event)
        .collect();
    assert_eq!(events, ["user_disabled", "user_enabled"]);
    let told = gw.outbox().await.join("\n");
    assert_eq!(
        told.matches("an administrator disabled the account")
            .count(),
        1
    );
    assert_eq!(
        told.matches("an administrator enabled the account").count(),
        1
    );
    assert_eq!(told.matches("unlocked").count(), 0, "{told}");
}

#[tokio::test]
async fn home_shows_alerts_and_charts_and_users_can_be_searched() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    let (_, _, mut k, cred) = with_key(&gw, "cloned@example.com", "Shared key").await;
    let _ = &mut k;
    gw.state
        .durable
        .suspend_webauthn_credential(&cred.id, "possible_clone", gw.clock.now())
        .await
        .unwrap();
    gw.signed_in("locked@example.com").await;
    let locked = gw.user("locked@example.com").await;
    gw.state.durable.set_locked(&locked.id, true).await.unwrap();
    // Locked by a report older than the week reported sign-ins stay on the page: the lock's
    // alert still says when.
    let reported_at = gw.clock.now() - 8 * 86_400;
    gw.state
        .audit
        .record(
            portcullis::store::AuditEvent::new("sign_in_reported", "success", reported_at)
                .user(&locked),
        )
        .await;
    // A failure to chart.
    gw.password(&gw.browser(), "locked@example.com", "wrong password!", "")
        .await;
    gw.state.audit.flush().await;

    let html = gw.page(&c, "/_portcullis/admin").await;
    assert!(
        html.contains("Possibly cloned security key") && html.contains("cloned@example.com"),
        "{html}"
    );
    assert!(html.contains("Password sign-in locked") && html.contains("locked@example.com"));
    let alert = extract(&html, "<li class=\"alert alert-locked\">", "</li>").unwrap();
    assert!(
        alert.contains(&portcullis::clock::rfc3339(reported_at)),
        "{alert}"
    );
    assert!(
        !html.contains("alert-reported"),
        "a week-old report is no open alert"
    );
    assert_eq!(html.matches("<svg class=\"chart\"").count(), 2);
    assert!(html.contains("class=\"sign-ins\"") && html.contains("class=\"failures\""));
    assert!(!html.contains("style="), "no inline style under the CSP");

    // A report of this week is an open alert until an administrator acts on the account.
    let now = gw.clock.now();
    gw.state
        .audit
        .record(
            portcullis::store::AuditEvent::new("sign_in_reported", "success", now).user(&locked),
        )
        .await;
    gw.state.audit.flush().await;
    let html = gw.page(&c, "/_portcullis/admin").await;
    assert!(html.contains("alert-reported"), "{html}");
    gw.clock.advance(1);
    let page = format!("/_portcullis/admin/users/{}", locked.id);
    let csrf = gw.csrf(&c, &page).await;
    let r = c
        .post(gw.url(&format!("{page}/unlock")))
        .form(&[("csrf", csrf.as_str()), ("reason", "owner called")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    gw.state.audit.flush().await;
    let html = gw.page(&c, "/_portcullis/admin").await;
    assert!(!html.contains("alert-reported"), "handled: {html}");
    let list = gw.page(&c, "/_portcullis/admin/users?q=LOCKED").await;
    assert!(list.contains("locked@example.com") && !list.contains("cloned@example.com"));
    let list = gw.page(&c, "/_portcullis/admin/users?q=%25").await;
    assert!(list.contains("No user matches"), "wildcards are literal");
}

#[tokio::test]
async fn audit_view_filters_and_exports_json_lines() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    gw.signed_in("customer@example.com").await;
    let target = gw.user("customer@example.com").await;
    gw.state.audit.flush().await;

    let path = format!(
        "/_portcullis/admin/audit?user={}&event=totp_enrolled",
        target.id
    );
    let html = gw.page(&c, &path).await;
    assert_eq!(html.matches(">totp_enrolled</td>").count(), 1, "{html}");
    assert!(html.contains("customer@example.com") && !html.contains(">login_password</td>"));
    // The user may be given by address, as the table shows users.
    let html = gw
        .page(
            &c,
            "/_portcullis/admin/audit?user=Customer%40example.com&event=totp_enrolled",
        )
        .await;
    assert_eq!(html.matches(">totp_enrolled</td>").count(), 1, "{html}");
    // Attempts on an address no user has (password spraying) are found by the address typed,
    // and only they: the customer's events are not among them.
    let sprayer = gw.browser();
    gw.password(&sprayer, "Nobody@example.com", "guess-one-two", "/")
        .await;
    gw.state.audit.flush().await;
    let html = gw
        .page(&c, "/_portcullis/admin/audit?user=nobody%40example.com")
        .await;
    assert_eq!(html.matches(">login_password</td>").count(), 1, "{html}");
    assert!(!html.contains("customer@example.com"), "{html}");
    let r = gw
        .get(
            &c,
            "/_portcullis/admin/audit/export?user=NOBODY%40example.com",
        )
        .await;
    assert_eq!(r.status(), 200);
    let lines = r.text().await.unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    assert!(lines.contains("\"nobody@example.com\""), "{lines}");
    let r = gw
        .get(&c, "/_portcullis/admin/audit?user=not-an-id-of-anyone")
        .await;
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("No user has the id not-an-id-of-anyone"));
    for q in [
        "audit?user=a%00b",
        "audit?user=a%00%40example.com",
        "audit?account=x%00",
        "audit?event=%01",
        "users?q=a%00b",
    ] {
        let r = gw.get(&c, &format!("/_portcullis/admin/{q}")).await;
        assert_eq!(r.status(), 400, "{q}");
        assert!(r.text().await.unwrap().contains("not allowed"), "{q}");
    }
    let r = gw
        .get(
            &c,
            "/_portcullis/admin/audit?since=2026-12-02&until=2026-12-01",
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("must be before"));
    let html = gw
        .page(&c, "/_portcullis/admin/audit?account=no-such-account")
        .await;
    assert!(html.contains("No event matches"));
    // The export is a plain link: a `download` link would turn the key step-up it may need
    // into a cancelled download, the page silent.
    let link = extract(&html, "<a href=\"/_portcullis/admin/audit/export?", ">").unwrap();
    assert!(!link.contains("download"), "{link}");
    let r = gw.get(&c, "/_portcullis/admin/audit?since=yesterday").await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("must be a date"));

    let r = gw
        .get(
            &c,
            &format!("/_portcullis/admin/audit/export?user={}", target.id),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/x-ndjson"));
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains("attachment"));
    let body = r.text().await.unwrap();
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{body}");
    assert!(lines.iter().all(|e| e["user_id"] == target.id.as_str()));
    assert!(
        lines
            .windows(2)
            .all(|w| w[0]["id"].as_i64() < w[1]["id"].as_i64()),
        "oldest first"
    );
    let far = gw
        .get(&c, "/_portcullis/admin/audit/export?since=2999-01-01")
        .await;
    assert_eq!(far.text().await.unwrap(), "");
    let exported = gw
        .audit()
        .await
        .into_iter()
        .any(|e| e.event == "audit_exported" && e.actor.as_deref() == Some(ROOT));
    assert!(exported, "exports are audited");
}

/// An administrator's key-session browser `c` enrols a new security key named `name` in person
/// for `user_id`; returns the key.
async fn enrol_in_person(gw: &Gateway, c: &Browser, user_id: &str, name: &str) -> Key {
    let base = format!("/_portcullis/admin/users/{user_id}/keys/register");
    let csrf = gw
        .csrf(c, &format!("/_portcullis/admin/users/{user_id}"))
        .await;
    let json_call = |path: String, body: Value| {
        let (c, csrf, url) = (&c.client, csrf.clone(), gw.url(&path));
        async move {
            c.post(url)
                .header("accept", "application/json")
                .header("x-csrf-token", csrf)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = json_call(format!("{base}/start"), json!({ "name": name })).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let ccr: CreationChallengeResponse = serde_json::from_value(v["options"].clone()).unwrap();
    let mut k = key();
    let reg = k.do_registration(origin(gw), ccr).unwrap();
    let r = json_call(
        format!("{base}/finish"),
        json!({ "ceremony": v["ceremony"], "credential": reg }),
    )
    .await;
    assert_eq!(r.status(), 200);
    k
}

/// A user created by an administrator, whose key the administrator then enrolled in person,
/// follows the enrolment link to set a password: the pages say the account has its second
/// factor already (adding another is offered, not demanded), and skipping that, the user signs
/// in with the password and the key.
#[tokio::test]
async fn a_user_with_a_key_enrolled_in_person_is_not_told_to_set_up_a_factor() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    let email = "in-person@example.com";
    let csrf = gw.csrf(&c, "/_portcullis/admin/users").await;
    let r = c
        .post(gw.url("/_portcullis/admin/users"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("email", email),
            ("account", "acct-7"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let path = link_path(&gw.page(&c, &location(&r)).await);
    let user = gw.user(email).await;
    // Before the key: a factor is still to be set up.
    let u = gw.browser();
    let page = gw.page(&u, &path).await;
    assert!(
        page.contains("Next you register your second factor"),
        "{page}"
    );
    let mut k = enrol_in_person(&gw, &c, &user.id, "Desk key").await;
    let page = gw.page(&u, &path).await;
    assert!(page.contains("has a second factor already"), "{page}");
    // The form posts to an address that names the link: opened again (a reload, Enter in the
    // address bar after a refused password), it is the link's page, not "expired".
    assert!(page.contains("action=\"/_portcullis/enrol?t="), "{page}");
    assert!(!page.contains("Next you register"), "{page}");
    let r = use_link(&gw, &u, &path, NEW_PASSWORD).await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let page = gw.page(&u, "/_portcullis/enrol/totp").await;
    assert!(page.contains("<h1>Add a second factor</h1>"), "{page}");
    assert!(page.contains("id=\"has-factor-notice\""), "{page}");
    assert!(!page.contains("needs a second factor"), "{page}");
    assert!(page.contains("href=\"/_portcullis/login\""), "{page}");
    // Skipped: the password just set and the key sign in.
    let r = gw.password(&u, email, NEW_PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let (r, _, _) = second_factor(&gw, &u, &mut k, |_, _| {}).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(gw.status(&u, "/campaigns").await, 200);
}

/// A refused "create a user" form comes back as it was sent, its error beside it.
#[tokio::test]
async fn a_refused_new_user_form_keeps_what_was_typed() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    gw.add_user("taken@example.com").await;
    let csrf = gw.csrf(&c, "/_portcullis/admin/users").await;
    for (email, account, status) in [
        ("taken@example.com", "acct-77", 409),
        ("not-an-address", "acct-77", 400),
        ("fresh@example.com", "", 400),
    ] {
        let r = c
            .post(gw.url("/_portcullis/admin/users"))
            .form(&[
                ("csrf", csrf.as_str()),
                ("email", email),
                ("account", account),
                ("admin", "1"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{email}");
        let page = r.text().await.unwrap();
        assert!(page.contains("id=\"create-error\""), "{page}");
        assert!(
            page.contains(&format!(
                "name=\"email\" type=\"email\" required maxlength=\"320\" value=\"{email}\""
            )),
            "{page}"
        );
        assert!(
            page.contains(&format!("maxlength=\"128\" value=\"{account}\"")),
            "{page}"
        );
        assert!(
            page.contains("value=\"1\" checked> Administrator"),
            "{page}"
        );
    }
    // A search's refusal is no create form's: the form comes back empty.
    let page = gw.page(&c, "/_portcullis/admin/users?q=%01").await;
    assert!(
        !page.contains("create-error") && !page.contains("checked>"),
        "{page}"
    );
}

#[tokio::test]
async fn an_admin_enrols_a_key_in_person_for_a_customer() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    gw.signed_in("customer@example.com").await;
    let target = gw.user("customer@example.com").await;
    let mut customer_key = enrol_in_person(&gw, &c, &target.id, "Desk key").await;
    let creds = gw
        .state
        .durable
        .webauthn_credentials(&target.id)
        .await
        .unwrap();
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].name, "Desk key");
    let audited = gw.audit().await.into_iter().any(|e| {
        e.event == "webauthn_admin_enrolled"
            && e.actor.as_deref() == Some(ROOT)
            && e.user_id.as_deref() == Some(target.id.as_str())
    });
    assert!(audited);
    // The registration itself is the administrator's act, not the owner's.
    let registered: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| {
            e.event == "webauthn_registered"
                && e.outcome == "success"
                && e.user_id.as_deref() == Some(target.id.as_str())
        })
        .map(|e| e.actor)
        .collect();
    assert_eq!(registered, [Some(ROOT.to_string())]);
    // The owner is told that an administrator, and which, enrolled it.
    let told = mail_to(&gw, "customer@example.com").await;
    assert!(
        told.contains("an administrator (root@example.com) enrolled a security key or passkey")
            && told.contains("The name it was given: Desk key"),
        "{told}"
    );
    // The key is the customer's: it completes their sign-in.
    key_session(&gw, "customer@example.com", &mut customer_key).await;
}

#[tokio::test]
async fn step_up_with_a_code_refreshes_the_proof_and_a_key_opens_sudo_mode() {
    let gw = gateway().await;
    let (totp_admin, _, _, mut k) = admin(&gw).await;
    let (customer, secret, _) = gw.signed_in("customer@example.com").await;
    gw.clock.advance(11 * 60);
    let account = gw.page(&customer, "/_portcullis/account").await;
    assert!(account.contains("id=\"reauth\""), "{account}");

    let html = gw
        .page(
            &customer,
            "/_portcullis/reauth?next=%2F_portcullis%2Faccount",
        )
        .await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let send = |code: String| {
        let (c, csrf, url) = (
            &customer.client,
            csrf.clone(),
            gw.url("/_portcullis/reauth"),
        );
        async move {
            c.post(url)
                .form(&[
                    ("csrf", csrf.as_str()),
                    ("code", code.as_str()),
                    ("next", "/_portcullis/account"),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(send("000000".into()).await.status(), 401);
    let r = send(gw.totp_now(&secret)).await;
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/_portcullis/account");
    assert!(!gw
        .page(&customer, "/_portcullis/account")
        .await
        .contains("id=\"reauth\""));
    // The same code again, in this session, proves nothing new and counts as no wrong code
    // (another step-up page of the session, say): on with the proof it has.
    let r = send(gw.totp_now(&secret)).await;
    assert_eq!(location(&r), "/_portcullis/account");
    assert!(gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "step_up"
            && e.reason.as_deref() == Some("otp_already_used_by_this_session")));

    // An admin with a code-only session is asked for the key, and only the key.
    let html = gw
        .page(
            &totp_admin,
            "/_portcullis/reauth?next=%2F_portcullis%2Fadmin&key=1",
        )
        .await;
    assert!(
        html.contains("data-webauthn=\"reauth\"") && !html.contains("name=\"code\""),
        "{html}"
    );
    let csrf = extract(&html, "data-csrf=\"", "\"").unwrap();
    let r = call(&gw, &totp_admin, &csrf, "reauth/start", json!({})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let rcr: RequestChallengeResponse = serde_json::from_value(v["options"].clone()).unwrap();
    let cred = k.do_authentication(origin(&gw), rcr).unwrap();
    let body =
        json!({ "ceremony": v["ceremony"], "credential": cred, "next": "/_portcullis/admin" });
    let r = call(&gw, &totp_admin, &csrf, "reauth/finish", body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["redirect"],
        "/_portcullis/admin"
    );
    assert_eq!(gw.status(&totp_admin, "/_portcullis/admin").await, 200);
    // The ceremony answers once.
    let (status, _) = error_code(call(&gw, &totp_admin, &csrf, "reauth/finish", body).await).await;
    assert_eq!(status, 401);
}

/// `admin bootstrap --account` for a user who exists already says it was not applied.
#[tokio::test]
async fn bootstrap_of_an_existing_user_says_the_account_was_kept() {
    let gw = gateway().await;
    gw.add_user("kept@example.com").await;
    let before = gw.user("kept@example.com").await;
    let out = gw
        .cli(
            &[
                "admin",
                "bootstrap",
                "Kept@Example.com",
                "--account",
                "other",
            ],
            None,
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was not used") && err.contains(&before.account_id),
        "{err}"
    );
    let after = gw.user("kept@example.com").await;
    assert!(after.is_admin);
    assert_eq!(after.account_id, before.account_id);
}

/// An admin removes a key only while another second factor stays: the last one is refused
/// (409, audited), since without it the password alone would start a sign-in that enrols anew.
#[tokio::test]
async fn an_admin_cannot_remove_an_accounts_last_second_factor() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    let (_, target, _, cred) = with_key(&gw, "lastkey@example.com", "Only key").await;
    // Key only: the authenticator app goes (as for an account enrolled with a key-only link).
    gw.drop_totp(&target.id).await;
    let user_page = format!("/_portcullis/admin/users/{}", target.id);
    let csrf = gw.csrf(&c, &user_page).await;
    let remove = format!("{user_page}/keys/{}/remove", cred.id);
    let r = c
        .post(gw.url(&remove))
        .form(&[("csrf", csrf.as_str()), ("reason", "owner asked")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("only usable second factor"));
    assert_eq!(
        gw.state
            .durable
            .webauthn_credentials(&target.id)
            .await
            .unwrap()
            .len(),
        1,
        "the key stays"
    );
    let refused = gw.audit().await.into_iter().any(|e| {
        e.event == "webauthn_removed"
            && e.outcome == "denied"
            && e.actor.as_deref() == Some(ROOT)
            && e.user_id.as_deref() == Some(target.id.as_str())
    });
    assert!(refused);
    // Suspended (a report, a possible clone), the key signs nobody in: it can go, and the
    // account, left without a factor, enrols only through a link (never after its password).
    gw.state
        .durable
        .suspend_webauthn_credential(&cred.id, "sign_in_reported", 1)
        .await
        .unwrap();
    let r = c
        .post(gw.url(&remove))
        .form(&[("csrf", csrf.as_str()), ("reason", "intruder's key")])
        .send()
        .await
        .unwrap();
    assert!(
        location(&r).ends_with("notice=key_removed_no_factor"),
        "{}",
        location(&r)
    );
    assert!(gw
        .page(&c, &location(&r))
        .await
        .contains("issue an enrolment link"));
    assert!(gw
        .user("lastkey@example.com")
        .await
        .factors_reset_at
        .is_some());
    let r = gw
        .password(&gw.browser(), "lastkey@example.com", PASSWORD, "")
        .await;
    assert_eq!(r.status(), 401, "the password alone sets up no factor");
    // With an authenticator app beside it, the key can go; the sessions it may have proved
    // end with it, and the owner is told which key.
    let (owner, other, _, other_cred) = with_key(&gw, "twokinds@example.com", "Spare key").await;
    assert_eq!(gw.status(&owner, "/campaigns").await, 200);
    let user_page = format!("/_portcullis/admin/users/{}", other.id);
    let csrf = gw.csrf(&c, &user_page).await;
    let r = c
        .post(gw.url(&format!("{user_page}/keys/{}/remove", other_cred.id)))
        .form(&[("csrf", csrf.as_str()), ("reason", "lost key")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(gw
        .state
        .durable
        .webauthn_credentials(&other.id)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(gw.status(&owner, "/campaigns").await, 303, "sessions ended");
    let told = mail_to(&gw, "twokinds@example.com").await;
    assert!(
        told.contains("removed one of your security keys")
            && told.contains("The name it was given: Spare key"),
        "{told}"
    );
}

/// A suspended key the owner confirms is theirs is restored by an administrator (with a
/// reason, audited, the owner told); its alert goes; a second restore changes nothing.
#[tokio::test]
async fn an_admin_restores_a_suspended_key() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    let (_, target, _, cred) = with_key(&gw, "restored@example.com", "Own key").await;
    gw.state
        .durable
        .suspend_webauthn_credential(&cred.id, "sign_in_reported", 1)
        .await
        .unwrap();
    let home = gw.page(&c, "/_portcullis/admin").await;
    assert!(
        home.contains("suspended by a report") && home.contains("Own key"),
        "{home}"
    );
    let user_page = format!("/_portcullis/admin/users/{}", target.id);
    let html = gw.page(&c, &user_page).await;
    let restore = format!("{user_page}/keys/{}/restore", cred.id);
    assert!(html.contains(&restore), "{html}");
    let csrf = gw.csrf(&c, &user_page).await;
    let post = |reason: &'static str| {
        c.post(gw.url(&restore))
            .form(&[("csrf", csrf.as_str()), ("reason", reason)])
            .send()
    };
    assert_eq!(
        post("").await.unwrap().status(),
        400,
        "a reason is required"
    );
    let r = post("owner showed the key").await.unwrap();
    assert!(
        location(&r).ends_with("notice=key_restored"),
        "{}",
        location(&r)
    );
    let now = gw
        .state
        .durable
        .webauthn_credentials(&target.id)
        .await
        .unwrap();
    assert!(!now[0].is_suspended());
    assert!(!gw.page(&c, "/_portcullis/admin").await.contains("Own key"));
    let restored = |events: &[portcullis::store::AuditEvent]| {
        events
            .iter()
            .filter(|e| e.event == "webauthn_restored" && e.actor.as_deref() == Some(ROOT))
            .count()
    };
    assert_eq!(restored(&gw.audit().await), 1);
    let told = mail_to(&gw, "restored@example.com").await;
    assert!(
        told.contains("restored one of your security keys")
            && told.contains("The name it was given: Own key"),
        "{told}"
    );
    let mails = gw.outbox().await.len();
    let r = post("again").await.unwrap();
    assert!(location(&r).ends_with("notice=not_suspended"));
    assert_eq!(
        restored(&gw.audit().await),
        1,
        "nothing changed, nothing recorded"
    );
    assert_eq!(gw.outbox().await.len(), mails);
    // Another user's key, or none: not found.
    let other = format!("/_portcullis/admin/users/{}/keys/nope/restore", target.id);
    let r = c
        .post(gw.url(&other))
        .form(&[("csrf", csrf.as_str()), ("reason", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// `user list` names every kind of second factor a user has, keys included.
#[tokio::test]
async fn user_list_shows_keys_as_second_factors() {
    let gw = gateway().await;
    with_key(&gw, "keyed@example.com", "Key").await;
    gw.add_user("bare@example.com").await;
    // A suspended key is no second factor, but is shown as waiting for an administrator.
    let (_, held, _, cred) = with_key(&gw, "held@example.com", "Held").await;
    gw.drop_totp(&held.id).await;
    gw.state
        .durable
        .suspend_webauthn_credential(&cred.id, "possible_clone", 1)
        .await
        .unwrap();
    let out = gw.cli(&["user", "list"], None).await;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |email: &str| {
        text.lines()
            .find(|l| l.contains(email))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("keyed@example.com").ends_with("totp keys:1"), "{text}");
    assert!(
        line("bare@example.com").ends_with("no-second-factor"),
        "{text}"
    );
    assert!(
        line("held@example.com").ends_with("no-second-factor suspended-keys:1"),
        "{text}"
    );
    let out = gw.cli(&["user", "list", "--json"], None).await;
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let keyed = rows
        .iter()
        .find(|r| r["email"] == "keyed@example.com")
        .unwrap();
    assert_eq!(
        (keyed["totp"].clone(), keyed["keys"].clone()),
        (json!(true), json!(1))
    );
    let held = rows
        .iter()
        .find(|r| r["email"] == "held@example.com")
        .unwrap();
    assert_eq!(
        (held["keys"].clone(), held["suspended_keys"].clone()),
        (json!(0), json!(1))
    );
}

/// A form or query the admin console refuses answers an API client with the JSON error every
/// other refusal is (status and message), and a browser with the page that shows it.
#[tokio::test]
async fn refused_forms_answer_api_clients_in_json() {
    let gw = gateway().await;
    let (_, c, me, _) = admin(&gw).await;
    let target = gw.add_user("formtarget@example.com").await;
    let csrf = gw.csrf(&c, "/_portcullis/admin/users").await;
    let me_page = format!("/_portcullis/admin/users/{}", me.id);
    let target_page = format!("/_portcullis/admin/users/{}", target.id);
    let long_reason = "r".repeat(201);
    // Method, path, form fields, then the status, code and words of the refusal.
    type Case<'a> = (
        &'a str,
        String,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/_portcullis/admin/users".into(),
            vec![("email", "not an address"), ("account", "acme")],
            400,
            "invalid_input",
            "email address",
        ),
        (
            "POST",
            format!("{target_page}/disable"),
            vec![("reason", "  ")],
            400,
            "invalid_input",
            "Disable the account: give a reason",
        ),
        (
            "POST",
            format!("{me_page}/disable"),
            vec![("reason", "testing")],
            409,
            "conflict",
            "your own account",
        ),
        (
            "POST",
            "/_portcullis/admin/users".into(),
            vec![("email", "bob@@example.com"), ("account", "acme")],
            400,
            "invalid_input",
            "email address",
        ),
        (
            "POST",
            format!("{target_page}/disable"),
            vec![("reason", long_reason.as_str())],
            400,
            "invalid_input",
            "at most 200 characters",
        ),
        (
            "POST",
            format!("{target_page}/sessions/end"),
            vec![("reason", "two\nlines")],
            400,
            "invalid_input",
            "one line of text",
        ),
        (
            "POST",
            format!("{target_page}/sessions/end"),
            vec![("reason", "a\u{202E}b")],
            400,
            "invalid_input",
            "one line of text",
        ),
        (
            "GET",
            "/_portcullis/admin/audit?since=yesterday".into(),
            vec![],
            400,
            "invalid_input",
            "must be a date",
        ),
        (
            "GET",
            "/_portcullis/admin/audit/export?since=zz".into(),
            vec![],
            400,
            "invalid_input",
            "must be a date",
        ),
    ];
    for (method, path, fields, status, code, says) in cases {
        let mut form = fields.clone();
        form.push(("csrf", csrf.as_str()));
        let send = |accept: &'static str| {
            let rb = if method == "GET" {
                c.get(gw.url(&path))
            } else {
                c.post(gw.url(&path)).form(&form)
            };
            rb.header("accept", accept).send()
        };
        let r = send("application/json").await.unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{method} {path}"
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], code, "{method} {path}: {v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{v}");
        let r = send("text/html").await.unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        let html = r.text().await.unwrap();
        assert!(html.contains("<html") && html.contains(says), "{html}");
        // A page shown again with its refusal takes the focus to it (keyboard and screen
        // readers land on the message, not at the top of the page).
        if html.contains(r#"<p class="error" role="alert""#) {
            assert!(
                html.contains(r#"role="alert" tabindex="-1" autofocus>"#),
                "{html}"
            );
        }
    }
    // Nothing was done by either answer.
    assert!(!gw.user("formtarget@example.com").await.disabled);
    assert!(!gw.user(ROOT).await.disabled);
}

/// On an administrator's account only a security-key proof is fresh enough to change how they
/// sign in: a session completed with a code (a thief with the password and a recovery code, or
/// an app) cannot add a key of its own, and with it reach the admin console, which takes keys
/// only; the admin's own key session can.
#[tokio::test]
async fn an_admins_codes_are_no_proof_for_adding_a_key() {
    let gw = gateway().await;
    let (code_browser, key_browser, _, _) = admin(&gw).await;
    let account = page(&gw, &code_browser, "/_portcullis/account").await;
    assert!(
        account.contains("reauth?next=%2F_portcullis%2Faccount&amp;key=1"),
        "{account}"
    );
    let csrf = gw.csrf(&code_browser, "/_portcullis/account").await;
    let r = call(
        &gw,
        &code_browser,
        &csrf,
        "register/start",
        json!({ "name": "thief" }),
    )
    .await;
    assert_eq!(
        error_code(r).await,
        (403, "reauthentication_required".to_string())
    );
    let r = post_form(
        &gw,
        &code_browser,
        "/_portcullis/account/totp",
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(r.status(), 403, "nor a new app");
    // The admin's key session may.
    let csrf = gw.csrf(&key_browser, "/_portcullis/account").await;
    start(
        &gw,
        &key_browser,
        &csrf,
        "register/start",
        json!({ "name": "spare" }),
    )
    .await;
}

/// `step` is the key step-up for a form held (its `next` the held page).
pub(super) fn assert_held_for_the_key(step: &str) {
    assert!(
        step.starts_with("/_portcullis/reauth?next=%2F_portcullis%2Fheld%3Fid%3D")
            && step.ends_with("&key=1"),
        "{step}"
    );
}

/// A browser's form sent past the sudo window (a reason typed in) is held: the step-up page
/// says what it sends, and after the key's touch the held page sends it to the admin console's
/// route, through its guard again. An API client is refused with the step-up that returns to
/// the page the form was on (the form's own address takes no GET; the pages send no `Referer`).
#[tokio::test]
async fn a_form_past_the_sudo_window_is_held_until_the_key_is_touched() {
    let gw = gateway().await;
    let (_, c, _, mut k) = admin(&gw).await;
    gw.signed_in("late-target@example.com").await;
    let target = gw.user("late-target@example.com").await;
    let user_page = format!("/_portcullis/admin/users/{}", target.id);
    let csrf = gw.csrf(&c, &user_page).await;
    gw.clock.advance(15 * 60 + 1);
    // An API client is told to confirm, with the page to come back to: nothing is done.
    let reauth = format!(
        "/_portcullis/reauth?next=%2F_portcullis%2Fadmin%2Fusers%2F{}&key=1",
        target.id
    );
    let r = c
        .post(gw.url(&format!("{user_page}/disable")))
        .header("accept", "application/json")
        .form(&[("csrf", csrf.as_str()), ("reason", "late")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "step_up_required");
    assert_eq!(v["reauth"], reauth.as_str());
    assert!(!gw.user("late-target@example.com").await.disabled);
    // A browser's form, its reason typed, is held until the key's touch, then done.
    let r = c
        .post(gw.url(&format!("{user_page}/disable")))
        .header("accept", "text/html")
        .form(&[("csrf", csrf.as_str()), ("reason", "left the company")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let step = location(&r);
    assert_held_for_the_key(&step);
    assert!(!gw.user("late-target@example.com").await.disabled);
    let html = gw.page(&c, &step).await;
    assert!(
        html.contains(&format!("POST {user_page}/disable")),
        "{html}"
    );
    let next = extract(&html, "data-next=\"", "\"").unwrap();
    let key_csrf = extract(&html, "data-csrf=\"", "\"").unwrap();
    let r = call(&gw, &c, &key_csrf, "reauth/start", json!({})).await;
    let v: Value = r.json().await.unwrap();
    let rcr: RequestChallengeResponse = serde_json::from_value(v["options"].clone()).unwrap();
    let cred = k.do_authentication(origin(&gw), rcr).unwrap();
    let body = json!({ "ceremony": v["ceremony"], "credential": cred, "next": next });
    let r = call(&gw, &c, &key_csrf, "reauth/finish", body).await;
    assert_eq!(r.json::<Value>().await.unwrap()["redirect"], next.as_str());
    let held = gw.page(&c, &next).await;
    let held_csrf = extract(&held, "name=\"csrf\" value=\"", "\"").unwrap();
    let id = next.split("id=").nth(1).unwrap();
    let r = gw.send_held(&c, (id, &held_csrf), false).await;
    assert!(
        r.status().is_redirection() || r.status().is_success(),
        "{}",
        r.status()
    );
    assert!(gw.user("late-target@example.com").await.disabled);
    gw.state.audit.flush().await;
    assert!(gw.audit().await.iter().any(|e| e.event == "user_disabled"
        && e.reason
            .as_deref()
            .is_some_and(|r| r.contains("left the company"))));
}

/// An enrolment link issued from a user's page is shown, after a redirect, to the session that
/// issued it only (another session of the same admin sees that it is no longer shown); an API
/// client gets it in JSON.
#[tokio::test]
async fn an_issued_link_is_shown_to_its_session_only_and_to_api_clients_in_json() {
    let gw = gateway().await;
    let (_, c, _, mut k) = admin(&gw).await;
    gw.signed_in("linked@example.com").await;
    let target = gw.user("linked@example.com").await;
    let user_page = format!("/_portcullis/admin/users/{}", target.id);
    let csrf = gw.csrf(&c, &user_page).await;
    let issue = |accept: &'static str| {
        c.post(gw.url(&format!("{user_page}/enrolment-link")))
            .header("accept", accept)
            .form(&[("csrf", csrf.as_str())])
            .send()
    };
    let r = issue("text/html").await.unwrap();
    assert_eq!(r.status(), 303);
    let shown = location(&r);
    let page = gw.page(&c, &shown).await;
    let link = link_path(&page);
    // The account has an app: the link leaves it in place, and the page says so.
    assert!(page.contains("id=\"link-keeps-factors\""), "{page}");
    // Not on another user's page either, where it would read as that user's link.
    let token = shown.split("link=").nth(1).unwrap();
    gw.signed_in("bystander@example.com").await;
    let bystander = gw.user("bystander@example.com").await;
    let wrong = gw
        .page(
            &c,
            &format!("/_portcullis/admin/users/{}?link={token}", bystander.id),
        )
        .await;
    assert!(
        !wrong.contains("data-enrolment-link") && wrong.contains("No enrolment link is shown here"),
        "{wrong}"
    );
    let other = key_session(&gw, ROOT, &mut k).await;
    let elsewhere = gw.page(&other, &shown).await;
    assert!(
        !elsewhere.contains("data-enrolment-link")
            && elsewhere.contains("No enrolment link is shown here"),
        "{elsewhere}"
    );
    assert!(!elsewhere.contains(link.split("t=").nth(1).unwrap()));
    let r = issue("application/json").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["user"], target.id.as_str());
    assert!(v["enrolment_link"]
        .as_str()
        .unwrap()
        .contains("/_portcullis/enrol?t="));
}

/// An enrolment from a link that moves to another network mid-way ends (the link is spent); an
/// account that never had a factor then signs in with its password and enrols as any first
/// sign-in does, while one whose factors were reset needs a new link (the notice says so).
#[tokio::test]
async fn an_enrolment_from_a_link_cut_short_by_a_move() {
    let gw = gateway().await;
    let email = "moving@example.com";
    gw.add_user(email).await;
    let path = enrol_link(&gw, email).await;
    let (c, _, r) = open_enrolment_link(&gw, &path).await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let moved = gw.browser_moved_to(&c, "127.0.4.9");
    let r = gw.get(&moved, "/_portcullis/enrol/totp").await;
    assert_eq!(location(&r), "/_portcullis/login?notice=moved");
    let page = gw
        .page(&gw.browser(), "/_portcullis/login?notice=moved")
        .await;
    assert!(
        page.contains("ask your administrator for a new link"),
        "{page}"
    );
    assert_eq!(gw.get(&c, &path).await.status(), 410, "the link is spent");
    // Never had a factor: the password leads to the set-up of one, as at any first sign-in.
    let r = gw.password(&gw.browser(), email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    // Factors reset: once the enrolment is cut short, the password alone sets up nothing (it
    // may be a thief's); a new link does.
    let reset = "moving-reset@example.com";
    let (c, _, _, r) = continue_from_link(&gw, reset).await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let moved = gw.browser_moved_to(&c, "127.0.4.10");
    let r = gw.get(&moved, "/_portcullis/enrol/totp").await;
    assert_eq!(location(&r), "/_portcullis/login?notice=moved");
    let r = gw.password(&gw.browser(), reset, PASSWORD, "").await;
    assert_eq!(r.status(), 401);
    let path = enrol_link(&gw, reset).await;
    assert_eq!(gw.status(&gw.browser(), &path).await, 200);
}

/// An admin form sent without a session (it ended in another tab, or ran out) is not acted on:
/// a browser goes to sign in, told the form was not sent, and comes back to the page the form
/// was on; an API client gets `401` JSON as from the gate.
#[tokio::test]
async fn an_admin_form_without_a_session_goes_to_sign_in_and_back() {
    let gw = gateway().await;
    let user = gw.add_user("target@example.com").await;
    let c = gw.browser();
    let path = format!("/_portcullis/admin/users/{}/disable", user.id);
    let r = c
        .post(gw.url(&path))
        .form(&[("reason", "fraud"), ("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        location(&r),
        format!(
            "/_portcullis/login?next=%2F_portcullis%2Fadmin%2Fusers%2F{}&notice=not_sent",
            user.id
        )
    );
    let r = gw
        .api()
        .post(gw.url(&path))
        .header("accept", "application/json")
        .form(&[("reason", "fraud")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(!gw.user("target@example.com").await.disabled);
    // An admin page opened with a session that has ended is told so at the sign-in page, as a
    // console page is; without any session cookie it just signs in.
    let (_, admin_browser, _, _) = admin(&gw).await;
    let page = format!("/_portcullis/admin/users/{}", user.id);
    let next = format!("%2F_portcullis%2Fadmin%2Fusers%2F{}", user.id);
    assert_eq!(
        location(&gw.get(&c, &page).await),
        format!("/_portcullis/login?next={next}")
    );
    // Nor is a sign-in still under way (the password given, the second factor not set up yet) one
    // that has ended.
    let pending = gw.browser();
    let r = gw
        .password(&pending, "target@example.com", PASSWORD, "")
        .await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    assert_eq!(
        location(&gw.get(&pending, &page).await),
        format!("/_portcullis/login?next={next}")
    );
    gw.clock.advance(13 * 3600);
    assert_eq!(
        location(&gw.get(&admin_browser, &page).await),
        format!("/_portcullis/login?next={next}&notice=session_ended")
    );
}

/// Someone who learnt the password of a user created with one sets up the second factor before
/// the owner uses their enrolment link: the owner's use of the link ends that person's session
/// and takes away the app and recovery codes they set up, so the owner's account is the
/// owner's alone. `user add --no-password` leaves no such window: the password alone signs in
/// to nothing until the link sets it.
#[tokio::test]
async fn an_enrolment_link_takes_back_what_a_password_thief_set_up_first() {
    let gw = gateway().await;
    let email = "provisioned@example.com";
    let out = gw
        .cli(
            &["user", "add", email, "--account", "acct-3"],
            Some("Cobalt-Lantern-5521!\n"),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = enrol_link(&gw, email).await;
    gw.clock.advance(5);
    // The thief, with the password only, sets up an app and keeps the recovery codes.
    let thief = gw.browser();
    let r = gw.password(&thief, email, "Cobalt-Lantern-5521!", "").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let (thief_secret, _) = gw.enrol_app(&thief).await;
    let (thief_codes, _) = gw.save_recovery_codes(&thief).await;
    assert_eq!(gw.status(&thief, "/inbox").await, 200);
    // The owner uses the link: a new app, and recovery codes of the owner's own.
    gw.clock.advance(30);
    let (owner, _, r) = open_enrolment_link(&gw, &path).await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    gw.enrol_app(&owner).await;
    let (owner_codes, _) = gw.save_recovery_codes(&owner).await;
    assert!(owner_codes.iter().all(|c| !thief_codes.contains(c)));
    assert_eq!(gw.status(&owner, "/inbox").await, 200);
    // The thief's session is over, and neither the thief's app nor codes sign in.
    assert_ne!(gw.status(&thief, "/inbox").await, 200);
    gw.clock.advance(30);
    for code in [gw.totp_now(&thief_secret), thief_codes[0].clone()] {
        let c = gw.browser();
        let r = gw.password(&c, email, "Cobalt-Lantern-5521!", "").await;
        assert_eq!(location(&r), "/_portcullis/mfa");
        assert_eq!(gw.code(&c, "/_portcullis/mfa", &code).await.status(), 401);
    }
    gw.state.audit.flush().await;
    assert!(gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "second_factors_dropped"
            && e.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("enrolment_link_used"))));

    // Created without a password: the password sign-in has nothing to check until the link.
    let email = "no-password@example.com";
    let out = gw
        .cli(
            &["user", "add", email, "--account", "acct-3", "--no-password"],
            None,
        )
        .await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("enrol-link"),
        "{said}"
    );
    let r = gw.password(&gw.browser(), email, "", "").await;
    assert_ne!(location(&r), "/_portcullis/enrol/totp");
    let path = enrol_link(&gw, email).await;
    let c = gw.browser();
    let r = use_link(&gw, &c, &path, NEW_PASSWORD).await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    // The link's setup cut short (the app not yet confirmed): whoever learnt the password the
    // link set, in another browser, sets up nothing with it; the link's browser goes on.
    let thief = gw.browser();
    let r = gw.password(&thief, email, NEW_PASSWORD, "").await;
    assert_ne!(location(&r), "/_portcullis/enrol/totp");
    assert_eq!(r.status(), 401, "refused as a wrong password is");
    assert_ne!(gw.status(&thief, "/_portcullis/enrol/totp").await, 200);
    let (secret, _) = gw.enrol_app(&c).await;
    gw.save_recovery_codes(&c).await;
    assert_eq!(gw.status(&c, "/inbox").await, 200);
    // Once it has its app, the password and the app sign in as for anyone.
    gw.clock.advance(30);
    let b = gw.browser();
    let r = gw.password(&b, email, NEW_PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let r = gw.code(&b, "/_portcullis/mfa", &gw.totp_now(&secret)).await;
    assert_eq!(location(&r), "/");
    // The admin console's new users are alike.
    let (_, admin_c, _, _) = admin(&gw).await;
    let csrf = gw.csrf(&admin_c, "/_portcullis/admin/users").await;
    let made = "console-made@example.com";
    let r = admin_c
        .post(gw.url("/_portcullis/admin/users"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("email", made),
            ("account", "acct-3"),
            ("reason", "new customer"),
        ])
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success() || r.status() == 303,
        "{}",
        r.status()
    );
    assert!(!gw.user(made).await.enrols_after_password());
    // Its page tells the admin so.
    let made_page = format!("/_portcullis/admin/users/{}", gw.user(made).await.id);
    let html = gw.page(&admin_c, &made_page).await;
    assert!(html.contains("waits for an enrolment link"), "{html}");
    // A password set for it on the command line signs in to nothing, and the command says so.
    let out = gw
        .cli(
            &["user", "set-password", made],
            Some(&format!("{NEW_PASSWORD}\n")),
        )
        .await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("enrol-link"),
        "{said}"
    );
    let r = gw.password(&gw.browser(), made, NEW_PASSWORD, "").await;
    assert_eq!(r.status(), 401);
}

/// An administrator created by another is audited as an administrator granted, by whom; a
/// customer created the same way is not.
#[tokio::test]
async fn creating_an_administrator_is_audited_as_a_grant() {
    let gw = gateway().await;
    let (_, c, _, _) = admin(&gw).await;
    let csrf = gw.csrf(&c, "/_portcullis/admin/users").await;
    for (email, admin) in [
        ("second.admin@example.com", Some("1")),
        ("plain.customer@example.com", None),
    ] {
        let mut form = vec![
            ("csrf", csrf.as_str()),
            ("email", email),
            ("account", "acct-5"),
        ];
        if let Some(v) = admin {
            form.push(("admin", v));
        }
        let r = c
            .post(gw.url("/_portcullis/admin/users"))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{email}");
    }
    let granted: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "admin_granted")
        .map(|e| (e.email, e.actor))
        .collect();
    assert_eq!(
        granted,
        [(
            Some("second.admin@example.com".to_string()),
            Some(ROOT.to_string())
        )]
    );
}
