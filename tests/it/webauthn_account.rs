//! The account page and enrolment with a key: adding, renaming and removing keys, the
//! fresh-proof rule, and a new user choosing a key instead of an authenticator app.

use serde_json::Value;

use super::harness::*;
use super::webauthn::*;

#[tokio::test]
async fn a_new_user_can_enrol_a_key_instead_of_totp() {
    let gw = gateway().await;
    let user = gw.add_user("new@example.com").await;
    let c = gw.browser();
    let r = gw.password(&c, "new@example.com", PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let mut k = key();
    let (csrf, body) = registration(&gw, &c, &mut k, "/_portcullis/enrol/totp", "Phone").await;
    let r = call(&gw, &c, &csrf, "register/finish", body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["redirect"], "/_portcullis/recovery-codes");
    let csrf = gw.csrf(&c, "/_portcullis/recovery-codes").await;
    let r = post_form(
        &gw,
        &c,
        "/_portcullis/recovery-codes",
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(location(&r), "/");
    assert_eq!(c.get(gw.url("/home")).send().await.unwrap().status(), 200);
    assert_eq!(last_claims(&gw).await.amr, vec!["pwd", "hwk"]);
    assert!(gw.state.durable.totp(&user.id).await.unwrap().is_none());
    // The sign-in the key completed is on the record, and so on the owner's list of sign-ins.
    gw.state.audit.flush().await;
    assert!(gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "webauthn_enrolled"
            && e.outcome == "success"
            && e.user_id.as_deref() == Some(user.id.as_str())));
    let account = gw.page(&c, "/_portcullis/account").await;
    assert!(account.contains("password + new security key"), "{account}");

    // Next time the key is the second factor; a 6-digit guess is just a wrong code.
    let c = after_password(&gw, "new@example.com").await;
    let r = gw.code(&c, "/_portcullis/mfa", "123456").await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        second_factor(&gw, &c, &mut k, |_, _| {}).await.0.status(),
        200
    );

    // The only second factor cannot be removed.
    let cred = only_credential(&gw, &user.id).await;
    let r = remove_key(&gw, &c, &cred.id).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("only second factor"));
    only_credential(&gw, &user.id).await;
}

#[tokio::test]
async fn keys_are_renamed_and_removed_from_the_account_page() {
    let gw = gateway().await;
    let (c, user, mut k, cred) = with_key(&gw, "manage@example.com", "Old name").await;
    let csrf = gw.csrf(&c, "/_portcullis/account").await;
    let r = post_form(
        &gw,
        &c,
        &format!("/_portcullis/account/keys/{}/rename", cred.id),
        &[("csrf", csrf.as_str()), ("name", "<b>New</b> name")],
    )
    .await;
    assert_eq!(location(&r), "/_portcullis/account?notice=key_renamed");
    let html = page(&gw, &c, "/_portcullis/account").await;
    assert!(
        html.contains("&#60;b&#62;New&#60;/b&#62; name") || html.contains("&lt;b&gt;New"),
        "{html}"
    );

    // The audit trail keeps both names.
    let renamed: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "webauthn_renamed")
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(
        renamed,
        [format!(
            "key {}: \"Old name\" -> \"<b>New</b> name\"",
            cred.id
        )]
    );

    // A name that reads otherwise than it is (a direction override, a zero-width space, a blank
    // that is no space, a private character, marks piled on one letter) is refused and the old
    // name kept.
    for hidden in [
        "yek\u{202E}krow",
        "Desk\u{200B}key",
        "\u{2800}",
        "YubiKey\u{2800}\u{2800}(alice)",
        "Key \u{E000}",
        "Ke\u{301}\u{301}\u{301}\u{301}\u{301}y",
        "\u{301}Key",
        "K\u{e48}\u{e49}\u{e4a}\u{e4b}\u{e48}",
        "Key \u{e48}",
        "Key\u{ffff}",
    ] {
        let r = post_form(
            &gw,
            &c,
            &format!("/_portcullis/account/keys/{}/rename", cred.id),
            &[("csrf", csrf.as_str()), ("name", hidden)],
        )
        .await;
        assert_eq!(r.status(), 400, "{hidden:?}");
        // An API client gets the refusal as JSON.
        let r = c
            .post(gw.url(&format!("/_portcullis/account/keys/{}/rename", cred.id)))
            .header("accept", "application/json")
            .form(&[("csrf", csrf.as_str()), ("name", hidden)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{hidden:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "invalid_input", "{v}");
        assert!(v["message"].as_str().unwrap().contains("key name"), "{v}");
    }
    let stored = gw
        .state
        .durable
        .webauthn_credentials(&user.id)
        .await
        .unwrap();
    assert_eq!(stored[0].name, "<b>New</b> name");

    // Someone else's key is not there for this user.
    let (other, _, _) = gw.signed_in("other@example.com").await;
    let r = remove_key(&gw, &other, &cred.id).await;
    assert_eq!(r.status(), 404);

    // Removing, and renaming (a planted key passing for the owner's), need a recent
    // second-factor proof.
    gw.clock.advance(11 * 60);
    for (action, form) in [
        ("remove", vec![("csrf", csrf.as_str())]),
        (
            "rename",
            vec![("csrf", csrf.as_str()), ("name", "Phone passkey")],
        ),
    ] {
        let r = post_form(
            &gw,
            &c,
            &format!("/_portcullis/account/keys/{}/{action}", cred.id),
            &form,
        )
        .await;
        assert_eq!(r.status(), 403, "{action}");
    }
    assert_eq!(credentials(&gw, &user.id).await[0].name, "<b>New</b> name");
    let c = after_password(&gw, "manage@example.com").await;
    assert_eq!(
        second_factor(&gw, &c, &mut k, |_, _| {}).await.0.status(),
        200
    );
    let r = remove_key(&gw, &c, &cred.id).await;
    assert_eq!(location(&r), "/_portcullis/account?notice=key_removed");
    assert!(credentials(&gw, &user.id).await.is_empty());
    assert_eq!(audited(&gw, "webauthn_removed", "success").await.len(), 1);
}

/// `webauthn.phishing_resistant_accounts`: users of a listed account cannot finish a sign-in or
/// an enrolment with a code (TOTP or recovery) — only a key will do; other accounts keep codes.
#[tokio::test]
async fn accounts_that_require_keys_refuse_codes() {
    let gw = Gateway::start_with(|c| {
        localhost(c);
        c.webauthn.phishing_resistant_accounts = vec!["acct-1".into()];
    })
    .await;
    gw.add_user("strict@example.com").await;

    // Enrolment: an authenticator app is refused, a key is accepted.
    let c = gw.browser();
    let r = gw.password(&c, "strict@example.com", PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    // The page offers the key alone: no authenticator app to set up that could never count.
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    assert!(
        html.contains("This account must sign in with a security key or passkey")
            && !html.contains("id=\"totp-secret\""),
        "{html}"
    );
    // A code sent all the same is refused for what it is, with the page saying why, not that
    // the code is wrong.
    let r = gw.code(&c, "/_portcullis/enrol/totp", "123456").await;
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("must sign in with a security key or passkey: codes are not accepted")
            && !text.contains("That code is not right"),
        "{text}"
    );
    let mut k = key();
    let (csrf, body) = registration(&gw, &c, &mut k, "/_portcullis/enrol/totp", "Desk").await;
    assert_eq!(
        call(&gw, &c, &csrf, "register/finish", body).await.status(),
        200
    );
    // No recovery codes are handed out that would not be accepted: the sign-in is complete,
    // and the account page says codes are not taken here.
    assert_eq!(console(&gw, &c).await, 200);
    let account = gw.page(&c, "/_portcullis/account").await;
    assert!(
        account.contains("id=\"codes-refused\"") && !account.contains("Make new recovery codes"),
        "{account}"
    );
    // Codes made all the same (an API client of the account page) do not complete a sign-in.
    let csrf = gw.csrf(&c, "/_portcullis/account").await;
    let made: Value = c
        .post(gw.url("/_portcullis/account/recovery-codes"))
        .header("accept", "application/json")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let recovery = made["recovery_codes"][0].as_str().unwrap().to_string();

    // Sign-in: the page offers the key alone, a recovery code does not complete it, a key
    // answer that fails says to try the key again (not a code), and the key does.
    let c = after_password(&gw, "strict@example.com").await;
    let mfa = gw.page(&c, "/_portcullis/mfa").await;
    assert!(
        mfa.contains("id=\"key-only\"") && !mfa.contains("name=\"code\""),
        "{mfa}"
    );
    let r = gw.code(&c, "/_portcullis/mfa", &recovery).await;
    assert_eq!(r.status(), 403);
    assert_eq!(console(&gw, &c).await, 303, "still not through");
    let (r, _, _) = second_factor(&gw, &c, &mut k, |_, at| {
        at.set_port(Some(1)).unwrap();
    })
    .await;
    let refused: Value = r.json().await.unwrap();
    let said = refused["message"].as_str().unwrap();
    assert!(
        said.contains("takes no codes") && !said.contains("use a code"),
        "{said}"
    );
    assert_eq!(
        second_factor(&gw, &c, &mut k, |_, _| {}).await.0.status(),
        200
    );
    assert_eq!(console(&gw, &c).await, 200);
    assert_eq!(last_claims(&gw).await.acr, "urn:portcullis:acr:phr");
    let ev = gw.audit().await;
    assert_eq!(
        ev.iter()
            .filter(|e| e.reason.as_deref() == Some("phishing_resistant_required"))
            .count(),
        2
    );

    // Another account keeps codes.
    let hash = gw
        .state
        .login
        .hasher
        .hash(&portcullis::secret::Secret::new(PASSWORD.to_string()))
        .await
        .unwrap();
    gw.state
        .durable
        .create_user(
            portcullis::store::NewUser {
                email: "relaxed@example.com".into(),
                account_id: "acct-2".into(),
                is_admin: false,
                password_hash: hash,
            },
            portcullis::clock::Clock::now(&gw.clock),
        )
        .await
        .unwrap();
    let c = gw.browser();
    gw.enrol(&c, "relaxed@example.com").await;
    assert_eq!(console(&gw, &c).await, 200);
}

/// Someone with a copy of the owner's session (cookies taken from the browser) adds a passkey
/// of their own, for lasting access. The owner's notice of the change carries a "this wasn't
/// me" link: following it ends every session, suspends the key and locks password sign-in.
#[tokio::test]
async fn a_key_added_with_a_copied_session_is_undone_from_the_notice() {
    let gw = gateway().await;
    let (c, user, _k, cred) = with_key(&gw, "copied@example.com", "Not mine").await;
    let mail = gw.outbox().await;
    let notice = mail
        .iter()
        .find(|m| {
            m.contains("Security change") && m.contains("a security key or passkey was added")
        })
        .expect("the owner is told of the new key");
    // The name, chosen by whoever added the key, stands on a line of its own, said to be a name.
    let lines: Vec<&str> = notice.lines().map(str::trim).collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("The name it was given:"))
        .expect("the name is told");
    assert_eq!(lines[at], "The name it was given: Not mine", "{notice}");
    assert_eq!(
        lines[at - 1],
        "a security key or passkey was added",
        "{notice}"
    );
    let link = super::devices::report_link(notice);
    let page = gw.page(&gw.browser(), &link).await;
    assert!(
        page.contains("a change to your account") && !page.contains("signs out the device"),
        "{page}"
    );
    let r = super::devices::report(&gw, &link).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Your account is locked"));
    assert_eq!(console(&gw, &c).await, 303, "the session is over");
    let key = only_credential(&gw, &user.id).await;
    assert_eq!(key.id, cred.id);
    assert!(key.is_suspended(), "{key:?}");
    assert!(gw.user("copied@example.com").await.locked);
    // The link works once.
    assert_eq!(gw.status(&gw.browser(), &link).await, 410);
}

/// An account holds at most 16 keys: browsers refuse a ceremony whose list of allowed keys is
/// longer than 64, so an account stuffed with keys (by whoever held a session with a fresh
/// proof) could never use one. The 17th is refused before the browser is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_holds_at_most_sixteen_keys() {
    let gw = gateway().await;
    let (c, u, _, _) = with_key(&gw, "many@example.com", "Key 1").await;
    for n in 2..=16 {
        register(&gw, &c, &mut key(), &format!("Key {n}")).await;
    }
    assert_eq!(credentials(&gw, &u.id).await.len(), 16);
    let csrf = gw.csrf(&c, "/_portcullis/account").await;
    let r = call(
        &gw,
        &c,
        &csrf,
        "register/start",
        serde_json::json!({ "name": "Key 17" }),
    )
    .await;
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "too_many_keys", "{v}");
    assert_eq!(credentials(&gw, &u.id).await.len(), 16);
    // One removed makes room for one again, however many are registered at once.
    let first = credentials(&gw, &u.id).await[0].id.clone();
    assert_eq!(
        location(&remove_key(&gw, &c, &first).await),
        "/_portcullis/account?notice=key_removed"
    );
    let mut bodies = Vec::new();
    for n in 0..8 {
        let page = "/_portcullis/account";
        bodies.push(registration(&gw, &c, &mut key(), page, &format!("Race {n}")).await);
    }
    let finishes = bodies
        .iter()
        .map(|(csrf, body)| {
            c.post(gw.url("/_portcullis/webauthn/register/finish"))
                .header("x-csrf-token", csrf.as_str())
                .json(body)
        })
        .collect();
    let statuses = super::bad_input::all_at_once(finishes).await;
    assert!(
        statuses.iter().all(|s| [200, 409].contains(s)),
        "{statuses:?}"
    );
    assert_eq!(credentials(&gw, &u.id).await.len(), 16, "{statuses:?}");
}

/// A key registered at the first setup of a second factor, by a sign-in that another one
/// overtook (it set up an app meanwhile), is refused before it is stored: that sign-in ends and
/// is told why, with the way to sign in; the other one's factor stands alone.
#[tokio::test]
async fn a_key_setup_overtaken_by_another_sign_in_is_refused() {
    let gw = gateway().await;
    let user = gw.add_user("race-key@example.com").await;
    let slow = gw.browser();
    let r = gw
        .password(&slow, "race-key@example.com", PASSWORD, "")
        .await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let mut k = key();
    let (csrf, body) = registration(&gw, &slow, &mut k, "/_portcullis/enrol/totp", "Key").await;
    // Meanwhile another sign-in sets up an app.
    gw.clock.advance(1);
    let other = gw.browser();
    gw.enrol(&other, "race-key@example.com").await;
    let r = call(&gw, &slow, &csrf, "register/finish", body).await;
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "enrolment_overtaken");
    assert_eq!(v["login"], "/_portcullis/login?notice=enrol_elsewhere");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("someone else knows"));
    assert!(gw
        .state
        .durable
        .webauthn_credentials(&user.id)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(gw.status(&slow, "/home").await, 303, "that sign-in is over");
    gw.state.audit.flush().await;
    assert!(gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "webauthn_enrolled"
            && e.outcome == "denied"
            && e.reason.as_deref() == Some("enrol_elsewhere")));
}
