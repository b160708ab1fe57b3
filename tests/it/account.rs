//! The account page's self-service: new recovery codes, a new authenticator app, recent
//! sign-ins. Each change needs the CSRF token and a fresh second-factor proof.

use portcullis::auth::totp::code_at;
use portcullis::clock::Clock;
use serde_json::Value;

use super::harness::*;
use super::webauthn::post_form;

const ACCOUNT: &str = "/_portcullis/account";
const CODES: &str = "/_portcullis/account/recovery-codes";
const TOTP: &str = "/_portcullis/account/totp";
const CONFIRM: &str = "/_portcullis/account/totp/confirm";

/// A form post from the account page with its CSRF token (and `fields`).
async fn act(gw: &Gateway, c: &Browser, path: &str, fields: &[(&str, &str)]) -> reqwest::Response {
    let csrf = gw.csrf(c, ACCOUNT).await;
    let mut all = vec![("csrf", csrf.as_str())];
    all.extend_from_slice(fields);
    post_form(gw, c, path, &all).await
}

/// The recovery codes listed on a page.
fn codes_on(html: &str) -> Vec<String> {
    html.split("<li><code>")
        .skip(1)
        .filter_map(|s| s.split('<').next().map(str::to_string))
        .collect()
}

/// Whether a second factor (code) completes a sign-in of `email` in a fresh browser.
async fn code_signs_in(gw: &Gateway, email: &str, code: &str) -> bool {
    gw.clock.advance(30);
    let c = gw.browser();
    let r = gw.password(&c, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let r = gw.code(&c, "/_portcullis/mfa", code).await;
    r.status() == 303
}

/// The new authenticator secret shown after starting a change.
async fn start_change(gw: &Gateway, c: &Browser) -> Vec<u8> {
    let r = act(gw, c, TOTP, &[]).await;
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    let b32 = extract(&html, "id=\"totp-secret\">", "<").expect("secret on the page");
    totp_rs::Secret::Encoded(b32).to_bytes().unwrap()
}

async fn events(gw: &Gateway, event: &str) -> Vec<(String, Option<String>)> {
    gw.audit()
        .await
        .into_iter()
        .filter(|e| e.event == event)
        .map(|e| (e.outcome, e.reason))
        .collect()
}

/// A change refused for a stale session: the page with a link to re-authenticate for
/// browsers, JSON `reauthentication_required` for API clients.
async fn assert_needs_fresh_proof(gw: &Gateway, c: &Browser, path: &str, fields: &[(&str, &str)]) {
    let r = act(gw, c, path, fields).await;
    assert_eq!(r.status(), 403, "{path}");
    let html = r.text().await.unwrap();
    assert!(
        html.contains("confirm it&#39;s you again") || html.contains("confirm it's you again"),
        "{html}"
    );
    assert!(
        html.contains("/_portcullis/reauth?next=%2F_portcullis%2Faccount"),
        "{html}"
    );
    let csrf = gw.csrf(c, ACCOUNT).await;
    let mut all = vec![("csrf", csrf.as_str())];
    all.extend_from_slice(fields);
    let r = c
        .post(gw.url(path))
        .header("accept", "application/json")
        .form(&all)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "{path}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "reauthentication_required", "{path}");
}

#[tokio::test]
async fn new_recovery_codes_replace_the_old_ones() {
    let gw = Gateway::start().await;
    let (c, _, old) = gw.signed_in("codes@example.com").await;
    let r = act(&gw, &c, CODES, &[]).await;
    assert_eq!(location(&r), CODES, "shown by a page of their own");
    let new = codes_on(&gw.page(&c, CODES).await);
    assert_eq!(new.len(), 10);
    // Shown once: the page again (a reload) makes no new set, and says why none is shown.
    assert_eq!(
        location(&gw.get(&c, CODES).await),
        "/_portcullis/account?notice=codes_shown"
    );
    assert!(gw
        .page(&c, "/_portcullis/account?notice=codes_shown")
        .await
        .contains("shown only once"));
    assert!(new.iter().all(|n| !old.contains(n)));
    assert!(!code_signs_in(&gw, "codes@example.com", &old[0]).await);
    assert!(code_signs_in(&gw, "codes@example.com", &new[0]).await);
    assert_eq!(
        events(&gw, "recovery_codes_regenerated").await,
        vec![("success".to_string(), None)]
    );
    let mail = gw.outbox().await;
    assert!(
        mail.iter().any(|m| m.contains("recovery codes was made")),
        "{mail:?}"
    );
}

/// New recovery codes asked for several times at once (a double submit, two tabs): one set is
/// made and shown; the others are told a change is under way, rather than shown sets that the
/// one made last has already voided.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_recovery_codes_asked_for_at_once_show_only_the_set_that_works() {
    let gw = Gateway::start().await;
    let email = "twice-codes@example.com";
    let (c, _, _) = gw.signed_in(email).await;
    let csrf = gw.csrf(&c, ACCOUNT).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let sent: Vec<_> = (0..8)
        .map(|_| {
            let (c, url, csrf) = (c.client.clone(), gw.url(CODES), csrf.clone());
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let r = c.post(url).form(&[("csrf", csrf)]).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    let mut made = 0;
    let mut busy = 0;
    for t in sent {
        match t.await.unwrap() {
            (303, _) => made += 1,
            (409, page) => {
                assert!(page.contains("being made already"), "{page}");
                busy += 1;
            }
            (status, page) => panic!("{status}: {page}"),
        }
    }
    assert!(
        busy > 0 && made > 0,
        "no request was told another was under way"
    );
    // (Answers that did not overlap may each have made a set, the later voiding the earlier:
    // the page shows the set that works.)
    let shown = codes_on(&gw.page(&c, CODES).await);
    assert_eq!(shown.len(), 10);
    assert!(
        code_signs_in(&gw, email, &shown[0]).await,
        "the set shown works"
    );
}

/// An API client gets what the account page's forms make as JSON: the new recovery codes (which
/// work), and the pending authenticator secret with where to confirm it.
#[tokio::test]
async fn api_clients_get_new_codes_and_a_new_app_secret_as_json() {
    let gw = Gateway::start().await;
    let email = "json-codes@example.com";
    let (c, _, old) = gw.signed_in(email).await;
    let json_post = |path: &'static str| {
        let c = &c;
        let gw = &gw;
        async move {
            let csrf = gw.csrf(c, ACCOUNT).await;
            let r = c
                .post(gw.url(path))
                .header("accept", "application/json")
                .form(&[("csrf", csrf.as_str())])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            assert!(r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"));
            assert_eq!(r.headers()["cache-control"], "no-store");
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let v = json_post(CODES).await;
    let new: Vec<String> = serde_json::from_value(v["recovery_codes"].clone()).unwrap();
    assert_eq!(new.len(), 10);
    assert!(new.iter().all(|n| !old.contains(n)));
    let v = json_post(TOTP).await;
    assert_eq!(v["confirm"], CONFIRM);
    let secret = v["secret"].as_str().unwrap().to_string();
    assert!(v["otpauth_uri"]
        .as_str()
        .unwrap()
        .contains(&format!("secret={secret}")));
    assert!(code_signs_in(&gw, email, &new[0]).await);
}

#[tokio::test]
async fn new_recovery_codes_need_csrf_and_a_fresh_proof() {
    let gw = Gateway::start().await;
    let (c, _, old) = gw.signed_in("stale-codes@example.com").await;
    let r = post_form(&gw, &c, CODES, &[]).await;
    assert_eq!(r.status(), 403);
    let r = post_form(&gw, &c, CODES, &[("csrf", "forged")]).await;
    assert_eq!(r.status(), 403);
    gw.clock.advance(11 * 60);
    assert_needs_fresh_proof(&gw, &c, CODES, &[]).await;
    // Nothing changed: the old codes still work.
    assert!(events(&gw, "recovery_codes_regenerated").await.is_empty());
    assert!(code_signs_in(&gw, "stale-codes@example.com", &old[0]).await);
}

#[tokio::test]
async fn a_new_authenticator_app_replaces_the_old_one_once_confirmed() {
    let gw = Gateway::start().await;
    let email = "app@example.com";
    let (c, old, _) = gw.signed_in(email).await;
    let new = start_change(&gw, &c).await;
    assert_ne!(new, old);
    // The pending secret lives server-side only.
    assert!(!gw
        .cookies(&c)
        .contains(&portcullis::auth::totp::secret_base32(&new)));
    // A code from the old app does not confirm the new one; the old app still works meanwhile.
    let now = gw.clock.now();
    let r = act(&gw, &c, CONFIRM, &[("code", &code_at(&old, now))]).await;
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("not right"));
    // An API client gets the refusal as JSON, not the page (which shows the new secret).
    let csrf = gw.csrf(&c, ACCOUNT).await;
    let r = c
        .post(gw.url(CONFIRM))
        .header("accept", "application/json")
        .form(&[("csrf", csrf.as_str()), ("code", &code_at(&old, now))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_code", "as every wrong code is");
    assert!(v["message"].as_str().unwrap().contains("not right"));
    let r = act(&gw, &c, CONFIRM, &[("code", &code_at(&new, now))]).await;
    assert_eq!(location(&r), "/_portcullis/account?notice=totp_changed");
    // Confirming works once.
    let r = act(&gw, &c, CONFIRM, &[("code", &code_at(&new, now))]).await;
    assert_eq!(r.status(), 409);

    let step_later = gw.clock.now() + 30;
    assert!(!code_signs_in(&gw, email, &code_at(&old, step_later)).await);
    let step_later = gw.clock.now() + 30;
    assert!(code_signs_in(&gw, email, &code_at(&new, step_later)).await);
    assert_eq!(
        events(&gw, "totp_changed").await,
        vec![
            ("failure".to_string(), Some("bad_code".to_string())),
            ("failure".to_string(), Some("bad_code".to_string())),
            ("success".to_string(), None)
        ]
    );
    let mail = gw.outbox().await;
    assert!(
        mail.iter()
            .any(|m| m.contains("authenticator app was replaced")),
        "{mail:?}"
    );
}

#[tokio::test]
async fn a_new_authenticator_app_needs_csrf_and_a_fresh_proof() {
    let gw = Gateway::start().await;
    let email = "stale-app@example.com";
    let (c, old, _) = gw.signed_in(email).await;
    let user = gw.user(email).await;
    let before = gw.state.durable.totp(&user.id).await.unwrap();
    for path in [TOTP, CONFIRM] {
        assert_eq!(
            post_form(&gw, &c, path, &[("code", "123456")])
                .await
                .status(),
            403
        );
    }
    let new = start_change(&gw, &c).await;
    gw.clock.advance(11 * 60);
    assert_needs_fresh_proof(&gw, &c, TOTP, &[]).await;
    let code = code_at(&new, gw.clock.now());
    assert_needs_fresh_proof(&gw, &c, CONFIRM, &[("code", &code)]).await;
    assert_eq!(gw.state.durable.totp(&user.id).await.unwrap(), before);
    assert!(events(&gw, "totp_changed").await.is_empty());
    let later = gw.clock.now() + 30;
    assert!(code_signs_in(&gw, email, &code_at(&old, later)).await);
}

#[tokio::test]
async fn recent_sign_ins_show_the_users_own_attempts() {
    let gw = Gateway::start().await;
    let (_, secret, _) = gw.signed_in("mine@example.com").await;
    let (theirs, _, other_codes) = gw.signed_in("theirs@example.com").await;
    assert!(code_signs_in(&gw, "theirs@example.com", &other_codes[0]).await);
    let r = gw
        .password(&gw.browser(), "mine@example.com", "wrong password", "")
        .await;
    assert_eq!(r.status(), 401);
    let c = gw.sign_in_again("mine@example.com", &secret).await;

    let html = gw.page(&c, ACCOUNT).await;
    let rows: Vec<&str> = html.split("<tr class=\"sign-in\">").skip(1).collect();
    assert_eq!(rows.len(), 3, "{html}");
    // Newest first: the sign-in just made, the wrong password, the first sign-in.
    assert!(rows[0].contains("signed in") && rows[0].contains("password + authenticator app"));
    assert!(rows[0].contains("127.0.0.1"));
    assert!(rows[0].contains(&portcullis::clock::rfc3339(gw.clock.now())));
    assert!(rows[1].contains("failed") && rows[1].contains(">password</td>"));
    assert!(rows[2].contains("password + new authenticator app"));
    assert!(
        !html.contains("recovery code</td>"),
        "another user's sign-in shown"
    );
    // The other user sees their own recovery-code sign-in, not this user's wrong password.
    let html = gw.page(&theirs, ACCOUNT).await;
    assert!(html.contains("password + recovery code</td>"), "{html}");
    assert!(!html.contains(">password</td>"), "{html}");
}

const PASSWORD_PATH: &str = "/_portcullis/account/password";

/// Whether `password` completes the password step of `email` in a fresh browser.
async fn password_works(gw: &Gateway, email: &str, password: &str) -> bool {
    gw.clock.advance(30);
    location(&gw.password(&gw.browser(), email, password, "").await) == "/_portcullis/mfa"
}

/// The password is changed on the account page with the current one and the new one twice,
/// within the fresh-proof window; every other session ends; the owner is told; a wrong
/// current password, a mismatch or a weak new one changes nothing.
#[tokio::test]
async fn the_password_is_changed_with_the_current_one_and_other_sessions_end() {
    let gw = Gateway::start().await;
    let email = "pw-change@example.com";
    let (c, secret, _) = gw.signed_in(email).await;
    let other = gw.sign_in_again(email, &secret).await;
    assert_eq!(gw.status(&other, "/campaigns").await, 200);
    // The form names the account for password managers (a field that is not sent).
    let page = gw.page(&c, ACCOUNT).await;
    assert!(
        page.contains(
            r#"<input type="email" value="pw-change@example.com" autocomplete="username""#
        ),
        "{page}"
    );
    let new = "a brand new passphrase for this";
    for (fields, status, says) in [
        (
            [
                ("current_password", "wrong password"),
                ("password", new),
                ("password2", new),
            ],
            403,
            "current password is not right",
        ),
        (
            [
                ("current_password", PASSWORD),
                ("password", new),
                ("password2", "typo"),
            ],
            400,
            "not the same",
        ),
        (
            [
                ("current_password", PASSWORD),
                ("password", "short"),
                ("password2", "short"),
            ],
            400,
            "at least",
        ),
        (
            [
                ("current_password", ""),
                ("password", new),
                ("password2", new),
            ],
            400,
            "Enter your current password",
        ),
        (
            [
                ("current_password", PASSWORD),
                ("password", PASSWORD),
                ("password2", PASSWORD),
            ],
            400,
            "is the current one",
        ),
    ] {
        let r = act(&gw, &c, PASSWORD_PATH, &fields).await;
        assert_eq!(r.status(), status, "{says}");
        let page = r.text().await.unwrap();
        assert!(page.contains(says), "{says}");
        // The field the message is about is marked and described by it.
        let field = if status == 403 || says.contains("Enter your current") {
            "current-password"
        } else {
            "new-password"
        };
        let input = extract(&page, &format!("<input id=\"{field}\""), ">").unwrap();
        assert!(
            input.contains("aria-invalid=\"true\"") && input.contains("form-error"),
            "{says}: {input}"
        );
    }
    // An API client gets the refusal as JSON.
    let csrf = gw.csrf(&c, ACCOUNT).await;
    let r = c
        .post(gw.url(PASSWORD_PATH))
        .header("accept", "application/json")
        .form(&[
            ("csrf", csrf.as_str()),
            ("current_password", "wrong password"),
            ("password", new),
            ("password2", new),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "wrong_password");
    assert!(
        password_works(&gw, email, PASSWORD).await,
        "nothing changed yet"
    );
    // The owner's sign-in history tells a mistyped current password from a failed sign-in.
    let page = gw.page(&c, ACCOUNT).await;
    assert!(page.contains("current password, on this page"), "{page}");
    assert_eq!(
        events(&gw, "login_password")
            .await
            .iter()
            .filter(|(_, r)| r.as_deref() == Some("bad_current_password"))
            .count(),
        2
    );

    let r = act(
        &gw,
        &c,
        PASSWORD_PATH,
        &[
            ("current_password", PASSWORD),
            ("password", new),
            ("password2", new),
        ],
    )
    .await;
    assert_eq!(location(&r), "/_portcullis/account?notice=password_changed");
    assert!(password_works(&gw, email, new).await);
    assert!(!password_works(&gw, email, PASSWORD).await);
    // This browser carries on; the other session is over.
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
    assert_eq!(gw.status(&other, "/campaigns").await, 303);
    assert_eq!(
        events(&gw, "password_changed").await,
        [("success".to_string(), Some("account_page".to_string()))]
    );
    let mail = gw.outbox().await.join("\n");
    assert!(mail.contains("the password was changed"), "{mail}");

    // After the fresh-proof window it needs a new proof first.
    gw.clock.advance(11 * 60);
    let r = act(
        &gw,
        &c,
        PASSWORD_PATH,
        &[
            ("current_password", new),
            ("password", PASSWORD),
            ("password2", PASSWORD),
        ],
    )
    .await;
    assert_eq!(r.status(), 403);
    assert!(password_works(&gw, email, new).await);
}

/// `portcullis user set-password` sets a new password read from standard input, checked
/// against the policy, and ends every session.
#[tokio::test]
async fn the_cli_sets_a_new_password_and_ends_sessions() {
    let gw = Gateway::start().await;
    let email = "cli-pw@example.com";
    let (c, _, _) = gw.signed_in(email).await;
    let out = gw
        .cli(&["user", "set-password", email], Some("short\n"))
        .await;
    assert!(!out.status.success());
    assert!(password_works(&gw, email, PASSWORD).await);
    let new = "another long passphrase here";
    let out = gw
        .cli(&["user", "set-password", email], Some(&format!("{new}\n")))
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(password_works(&gw, email, new).await);
    assert!(!password_works(&gw, email, PASSWORD).await);
    gw.clock.advance(2);
    assert_eq!(gw.status(&c, "/campaigns").await, 303, "its sessions ended");
    let out = gw
        .cli(
            &["user", "set-password", "nobody@example.com"],
            Some(&format!("{new}\n")),
        )
        .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user"));
}

/// A session ended elsewhere (every session of the account voided, say from the CLI or by a
/// copied key) while the browser still holds its cookie: the sign-in page shows the form and
/// drops the cookie, instead of sending the browser back to the page that sent it there (a
/// redirect loop).
#[tokio::test]
async fn the_sign_in_page_drops_a_session_ended_elsewhere() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("ended@example.com").await;
    let u = gw.user("ended@example.com").await;
    let r = gw
        .get(&c, "/_portcullis/login?next=%2F_portcullis%2Faccount")
        .await;
    assert_eq!(location(&r), "/_portcullis/account", "signed in: sent on");
    ended_elsewhere(&gw, &u.id).await;
    let r = gw
        .get(&c, "/_portcullis/login?next=%2F_portcullis%2Faccount")
        .await;
    assert_eq!(r.status(), 200);
    let cleared = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|v| v.to_str().unwrap().contains("Max-Age=0"));
    assert!(cleared, "{:?}", r.headers());
}

/// Every session of `user_id` ended elsewhere (the CLI, another gateway) a second on.
pub(super) async fn ended_elsewhere(gw: &Gateway, user_id: &str) {
    gw.clock.advance(1);
    gw.state
        .durable
        .void_sessions(user_id, gw.clock.now_millis())
        .await
        .unwrap();
    gw.state.user_gate.forget(user_id);
}

/// The account page of a session ended elsewhere says why, as console pages do, once (the dead
/// cookie goes with it); a browser that never signed in is sent to sign in without a word.
#[tokio::test]
async fn the_account_page_of_an_ended_session_says_so_once() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("ended-account@example.com").await;
    let u = gw.user("ended-account@example.com").await;
    assert_eq!(gw.status(&c, ACCOUNT).await, 200);
    ended_elsewhere(&gw, &u.id).await;
    assert_eq!(
        location(&gw.get(&c, ACCOUNT).await),
        "/_portcullis/login?next=%2F_portcullis%2Faccount&notice=session_ended"
    );
    assert_eq!(
        location(&gw.get(&c, ACCOUNT).await),
        "/_portcullis/login?next=%2F_portcullis%2Faccount"
    );
    assert_eq!(
        location(&gw.get(&gw.browser(), ACCOUNT).await),
        "/_portcullis/login?next=%2F_portcullis%2Faccount"
    );
}

/// A new app setup started again before the first was finished says that the key shown before
/// no longer works; the first start does not, and only the newest key confirms.
#[tokio::test]
async fn a_new_app_setup_started_again_says_the_earlier_key_is_void() {
    let gw = Gateway::start().await;
    let email = "restarted-setup@example.com";
    let (c, _, _) = gw.signed_in(email).await;
    let first = act(&gw, &c, TOTP, &[]).await.text().await.unwrap();
    assert!(first.contains("totp-secret"), "{first}");
    assert!(
        !first.contains("new-key-notice"),
        "nothing replaced yet: {first}"
    );
    let old = extract(&first, "id=\"totp-secret\">", "<").unwrap();
    let again = act(&gw, &c, TOTP, &[]).await.text().await.unwrap();
    assert!(again.contains("id=\"new-key-notice\""), "{again}");
    assert!(again.contains("no longer works"), "{again}");
    let new = extract(&again, "id=\"totp-secret\">", "<").unwrap();
    assert_ne!(old, new);
    // The earlier key's code is refused; sent from the earlier setup's page (another tab), the
    // refusal says that its key was replaced, not that the code or the clock is wrong.
    let old = totp_rs::Secret::Encoded(old).to_bytes().unwrap();
    let code = gw.totp_now(&old);
    let r = act(&gw, &c, CONFIRM, &[("code", code.as_str())]).await;
    assert_eq!(r.status(), 401);
    let first_setup = extract(&first, "name=\"setup\" value=\"", "\"").unwrap();
    gw.clock.advance(30);
    let code = gw.totp_now(&old);
    let fields = [("code", code.as_str()), ("setup", first_setup.as_str())];
    let r = act(&gw, &c, CONFIRM, &fields).await;
    assert_eq!(r.status(), 401);
    let page = r.text().await.unwrap();
    assert!(page.contains("begun again since"), "{page}");
    assert!(page.contains(&new), "the new key is shown: {page}");
    assert!(!page.contains("Check the time"), "{page}");
    gw.clock.advance(30);
    let new = totp_rs::Secret::Encoded(new).to_bytes().unwrap();
    let code = gw.totp_now(&new);
    let r = act(&gw, &c, CONFIRM, &[("code", code.as_str())]).await;
    assert_eq!(location(&r), "/_portcullis/account?notice=totp_changed");
}

/// An account left with recovery codes only (its app removed by a report, its keys suspended)
/// is told on its account page to set up a factor before the codes run out.
#[tokio::test]
async fn an_account_with_codes_only_is_told_to_set_up_a_factor() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("codes-only@example.com").await;
    let page = gw.page(&c, ACCOUNT).await;
    assert!(!page.contains("id=\"codes-only\""), "{page}");
    let u = gw.user("codes-only@example.com").await;
    gw.drop_totp(&u.id).await;
    let page = gw.page(&c, ACCOUNT).await;
    assert!(
        page.contains("id=\"codes-only\"") && page.contains("(10 left)"),
        "{page}"
    );
    // None left either: once this session ends nothing signs in, and the page says so.
    let now = gw.clock.now();
    gw.state
        .durable
        .set_recovery_codes(&u.id, &[], now)
        .await
        .unwrap();
    let page = gw.page(&c, ACCOUNT).await;
    assert!(
        page.contains("id=\"codes-only\"") && page.contains("Nothing is left"),
        "{page}"
    );
}
