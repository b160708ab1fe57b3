//! Devices and new-device notices: a sign-in from a browser the account was not used from
//! before is recorded and mailed to the owner with a single-use "this wasn't me" link that ends
//! every session and locks password sign-in.

use super::harness::*;

/// The link in a notice, as a path with query.
pub(super) fn report_link(mail: &str) -> String {
    let start = mail.find("/_portcullis/report?t=").expect("a report link");
    mail[start..].split_whitespace().next().unwrap().to_string()
}

/// Opens the report link `link` (a path with query) in a fresh browser and confirms it.
pub(super) async fn report(gw: &Gateway, link: &str) -> reqwest::Response {
    let (reader, csrf) = open_report(gw, link).await;
    confirm_report(gw, &reader, &csrf, link).await
}

/// Opens the report link in a fresh browser: the browser and the page's CSRF token.
async fn open_report(gw: &Gateway, link: &str) -> (Browser, String) {
    let reader = gw.browser();
    let page = gw.page(&reader, link).await;
    let csrf = extract(&page, "name=\"csrf\" value=\"", "\"").unwrap();
    (reader, csrf)
}

/// Sends the report page's form.
async fn confirm_report(
    gw: &Gateway,
    reader: &Browser,
    csrf: &str,
    link: &str,
) -> reqwest::Response {
    confirm_report_as(gw, reader, csrf, link, "text/html").await
}

/// Sends the report page's form, accepting `accept`.
async fn confirm_report_as(
    gw: &Gateway,
    reader: &Browser,
    csrf: &str,
    link: &str,
    accept: &str,
) -> reqwest::Response {
    reader
        .post(gw.url("/_portcullis/report"))
        .header("accept", accept)
        .form(&[("csrf", csrf), ("t", link.split("t=").nth(1).unwrap())])
        .send()
        .await
        .unwrap()
}

/// The new-device notices in the outbox, oldest first.
async fn sign_in_notices(gw: &Gateway) -> Vec<String> {
    mail_about(gw, "Subject: New sign-in to your account").await
}

async fn mail_about(gw: &Gateway, subject: &str) -> Vec<String> {
    let mut mail = gw.outbox().await;
    mail.retain(|m| m.contains(subject));
    mail
}

#[tokio::test]
async fn sign_ins_from_new_devices_are_reported_known_devices_are_not() {
    let gw = Gateway::start().await;
    let (c, secret, _) = gw.signed_in("dev@example.com").await;
    let mail = sign_in_notices(&gw).await;
    assert_eq!(mail.len(), 1, "the first sign-in is a new device");
    assert!(mail[0].contains("To: dev@example.com"), "{}", mail[0]);
    assert!(mail[0].contains("Subject: New sign-in to your account"));
    assert!(mail[0].contains("Address: 127.0.0.1"));
    assert!(mail[0].contains("Device:  Unknown browser on unknown system"));
    // A well-formed message: MIME headers and an id of the gateway's host.
    assert!(mail[0].contains("MIME-Version: 1.0"), "{}", mail[0]);
    assert!(mail[0].contains("charset=utf-8"), "{}", mail[0]);
    let host = gw
        .state
        .config
        .server
        .public_url
        .host_str()
        .unwrap()
        .to_string();
    assert!(
        mail[0].contains("Message-ID: <") && mail[0].contains(&format!("@{host}>")),
        "{}",
        mail[0]
    );

    // The same browser signs in again the next day: it is known, nobody is told.
    gw.clock.advance(24 * 3600);
    gw.sign_in_on(&c, "dev@example.com", &secret).await;
    assert_eq!(sign_in_notices(&gw).await.len(), 1);

    // The device cookie never reaches the console.
    c.get(gw.url("/campaigns")).send().await.unwrap();
    let cookies = gw.upstream.last().headers_named("cookie").join("; ");
    assert!(!cookies.contains("portcullis-device"), "{cookies}");

    // A copy of the password on another machine: a new device, reported.
    let other = gw.browser();
    gw.sign_in_on(&other, "dev@example.com", &secret).await;
    let mail = sign_in_notices(&gw).await;
    assert_eq!(mail.len(), 2);
    assert_ne!(report_link(&mail[0]), report_link(&mail[1]));
    let devices = gw
        .state
        .durable
        .list_devices(&gw.user("dev@example.com").await.id)
        .await
        .unwrap();
    assert_eq!(devices.len(), 2);
    let ev = gw.audit().await;
    assert_eq!(ev.iter().filter(|e| e.event == "new_device").count(), 2);
}

/// A device cookie of another user, or a made-up one, is just a new device.
#[tokio::test]
async fn a_device_cookie_is_recognised_only_for_its_own_user() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("one@example.com").await;
    gw.add_user("two@example.com").await;
    // The same browser, later, enrols a second user: its device cookie belongs to the first.
    gw.clock.advance(24 * 3600);
    gw.enrol(&c, "two@example.com").await;
    let mail = sign_in_notices(&gw).await;
    assert_eq!(mail.len(), 2, "{mail:#?}");
    assert!(mail[1].contains("To: two@example.com"));
}

/// No authenticator app and no recovery code left on the account.
async fn assert_no_factor(gw: &Gateway, user_id: &str) {
    assert_eq!(gw.state.durable.totp(user_id).await.unwrap(), None);
    let codes = gw.state.durable.recovery_codes_left(user_id).await.unwrap();
    assert_eq!(codes, 0);
}

/// Once an administrator unlocks the account, its password alone is refused as a wrong one
/// rather than leading to the set-up of a new factor.
async fn unlocked_password_sets_up_nothing(gw: &Gateway, email: &str) {
    let out = gw.cli(&["user", "unlock", email], None).await;
    assert!(out.status.success());
    gw.clock.advance(30);
    let r = gw.password(&gw.browser(), email, PASSWORD, "").await;
    assert_eq!(r.status(), 401);
}

/// A password thief's first sign-in of an account that had no factor yet sets up the app and
/// the recovery codes before it completes (and its notice is made): the owner's report of that
/// sign-in takes them back, and the password alone then sets up nothing.
#[tokio::test]
async fn a_reported_first_sign_in_takes_the_app_it_enrolled() {
    let gw = Gateway::start().await;
    let email = "first-taken@example.com";
    let (_, _, _) = gw.signed_in(email).await;
    let user = gw.user(email).await;
    assert!(gw.state.durable.totp(&user.id).await.unwrap().is_some());
    let link = report_link(&sign_in_notices(&gw).await[0]);
    let r = report(&gw, &link).await;
    assert_eq!(r.status(), 200);
    assert_no_factor(&gw, &user.id).await;
    // The password alone sets up nothing now: an enrolment link does.
    unlocked_password_sets_up_nothing(&gw, email).await;
}

/// An intruder with a session can set up their own authenticator app and recovery codes; the
/// owner's report removes them (not the owner's older factors), and once an administrator
/// unlocks the account the password alone does not let anyone set up new ones: that takes an
/// enrolment link.
#[tokio::test]
async fn a_report_takes_the_factors_set_up_since_with_it() {
    use portcullis::clock::Clock;
    let gw = Gateway::start().await;
    let email = "taken@example.com";
    let (_, secret, _) = gw.signed_in(email).await;
    gw.clock.advance(3600);
    let thief = gw.browser();
    gw.sign_in_on(&thief, email, &secret).await;
    let user = gw.user(email).await;
    // What the intruder sets up with the session: new recovery codes, then an app of their own.
    gw.clock.advance(60);
    let now = gw.clock.now();
    gw.state
        .durable
        .set_recovery_codes(&user.id, &["thief-1".to_string()], now)
        .await
        .unwrap();
    let sealed = gw.state.durable.totp(&user.id).await.unwrap().unwrap();
    gw.state
        .durable
        .set_totp(portcullis::store::TotpRecord {
            created_at: now,
            ..sealed
        })
        .await
        .unwrap();

    let link = report_link(&sign_in_notices(&gw).await[1]);
    assert_eq!(report(&gw, &link).await.status(), 200);
    assert_no_factor(&gw, &user.id).await;
    let ev = gw.audit().await;
    assert!(
        ev.iter().any(|e| e.event == "second_factors_dropped"
            && e.reason.as_deref() == Some("sign_in_reported: totp, 1 recovery codes")),
        "{ev:#?}"
    );
    let locked = mail_about(&gw, "Subject: Your account on").await;
    assert!(
        locked[0].contains("were removed") && locked[0].contains("enrolment link"),
        "{}",
        locked[0]
    );

    // Unlocked, the account has no factor: its (stolen) password is refused as a wrong one
    // instead of leading to the set-up of a new factor.
    unlocked_password_sets_up_nothing(&gw, email).await;
    assert!(gw
        .audit()
        .await
        .iter()
        .any(|e| e.event == "login_password"
            && e.reason.as_deref() == Some("enrolment_link_required")));
    // The enrolment link the administrator gives the owner does.
    let out = gw.cli(&["user", "enrol-link", email], None).await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let url = text.lines().find(|l| l.starts_with("http")).unwrap();
    let url = url::Url::parse(url.trim()).unwrap();
    let path = format!("{}?{}", url.path(), url.query().unwrap());
    let owner = gw.browser();
    let html = gw.page(&owner, &path).await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let token = extract(&html, "name=\"t\" value=\"", "\"").unwrap();
    let r = owner
        .post(gw.url("/_portcullis/enrol"))
        .form(&[("csrf", csrf.as_str()), ("t", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/enrol/totp", "{}", r.status());
}

#[tokio::test]
async fn this_wasnt_me_ends_every_session_and_locks_password_sign_in() {
    let gw = Gateway::start().await;
    let (owner, secret, _) = gw.signed_in("victim@example.com").await;
    let thief = gw.browser();
    gw.sign_in_on(&thief, "victim@example.com", &secret).await;
    assert_eq!(gw.status(&thief, "/campaigns").await, 200);
    let mail = sign_in_notices(&gw).await;
    let link = report_link(&mail[1]);

    // Opening the link changes nothing by itself (mail scanners open links).
    let reader = gw.browser();
    let page = gw.page(&reader, &link).await;
    assert!(page.contains("Report and lock my account"), "{page}");
    assert_eq!(gw.status(&thief, "/campaigns").await, 200);
    // It says which sign-in it reports: the device, when it first signed in, from where.
    let user = gw.user("victim@example.com").await;
    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    let newest = devices.iter().max_by_key(|d| d.first_seen).unwrap();
    let first_seen = portcullis::clock::rfc3339(newest.first_seen);
    assert!(
        page.contains(&format!("<dt>Device</dt><dd>{}</dd>", newest.name))
            && page.contains(&format!("<time datetime=\"{first_seen}\">"))
            && page.contains("<dt>Last address</dt><dd>127.0.0.1</dd>"),
        "{page}"
    );

    let csrf = extract(&page, "name=\"csrf\" value=\"", "\"").unwrap();
    let token = link.split("t=").nth(1).unwrap();
    let post = |csrf: String, token: String| {
        let reader = &reader;
        let url = gw.url("/_portcullis/report");
        async move {
            reader
                .post(url)
                .form(&[("csrf", csrf.as_str()), ("t", token.as_str())])
                .send()
                .await
                .unwrap()
        }
    };
    // A forged token does nothing.
    let forged = portcullis::crypto::random_token(32);
    assert_eq!(post(csrf.clone(), forged).await.status(), 410);
    assert_eq!(gw.status(&thief, "/campaigns").await, 200);

    let r = post(csrf.clone(), token.to_string()).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Your account is locked"));

    // Every session is over, the thief's and the owner's.
    for c in [&thief, &owner] {
        let r = gw.get(c, "/campaigns").await;
        assert_eq!(r.status(), 303);
        assert!(location(&r).starts_with("/_portcullis/login"));
    }
    // The password alone no longer starts a sign-in, even with a fresh code; and the right
    // password is refused exactly as a wrong one is, so the lock confirms no guess.
    gw.clock.advance(30);
    let answer = |password: &'static str| {
        let gw = &gw;
        async move {
            let b = gw.browser();
            let csrf = gw.csrf(&b, "/_portcullis/login").await;
            let r = gw
                .login_form(&b, &csrf, "victim@example.com", password, "")
                .header("accept", "application/json")
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let right = answer(PASSWORD).await;
    assert_eq!(right.0, 401, "{}", right.1);
    assert_eq!(right, answer("not the password at all").await);
    assert!(!right.1.contains("locked"));
    let again = gw.browser();
    let r = gw
        .password(&again, "victim@example.com", PASSWORD, "")
        .await;
    assert_eq!(r.status(), 401);
    // The link works once; opened again it says so at once, to a browser and to a script.
    assert_eq!(post(csrf.clone(), token.to_string()).await.status(), 410);
    let r = reader.get(gw.url(&link)).send().await.unwrap();
    assert_eq!(r.status(), 410);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("already used") && !page.contains("Report and lock"),
        "{page}"
    );
    // (A token given twice is read as any query is, the first, and answered in our format.)
    for opened in [link.clone(), format!("{link}&t=other")] {
        let r = reader
            .get(gw.url(&opened))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 410, "{opened}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "link_invalid");
    }

    let locked = mail_about(&gw, "Subject: Your account on").await;
    assert_eq!(locked.len(), 1);
    assert!(locked[0].contains("To: victim@example.com"));
    let ev = gw.audit().await;
    assert!(ev.iter().any(|e| e.event == "sign_in_reported"));
    assert!(ev
        .iter()
        .any(|e| e.event == "login_password" && e.reason.as_deref() == Some("locked")));
    let user = gw.user("victim@example.com").await;
    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    assert_eq!(
        devices.iter().filter(|d| d.status == "revoked").count(),
        1,
        "the reported device is revoked"
    );

    // An admin restores access from the CLI.
    let out = gw
        .cli(&["user", "unlock", "victim@example.com"], None)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Once: an account that is not locked is said to be so, and nothing is recorded again.
    let out = gw
        .cli(&["user", "unlock", "victim@example.com"], None)
        .await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("is not locked"));
    let unlocks = gw
        .audit()
        .await
        .iter()
        .filter(|e| e.event == "user_unlocked")
        .count();
    assert_eq!(unlocks, 1);
    gw.clock.advance(2);
    let r = gw
        .password(&again, "victim@example.com", PASSWORD, "")
        .await;
    assert_eq!(location(&r), "/_portcullis/mfa");
}

/// An API client confirming a report gets what was done as JSON.
#[tokio::test]
async fn a_report_answers_an_api_client_in_json() {
    let gw = Gateway::start().await;
    let (_, _, _) = gw.signed_in("api-report@example.com").await;
    let link = report_link(&sign_in_notices(&gw).await[0]);
    let (reader, csrf) = open_report(&gw, &link).await;
    let r = confirm_report_as(&gw, &reader, &csrf, &link, "application/json").await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["reported"], "sign_in");
    assert_eq!(v["password_sign_in_locked"], true);
    assert!(gw.user("api-report@example.com").await.locked);
}

#[tokio::test]
async fn an_expired_report_link_is_refused() {
    let gw = Gateway::start().await;
    let (_, _, _) = gw.signed_in("late@example.com").await;
    let link = report_link(&sign_in_notices(&gw).await[0]);
    // Opened in time, the page asks for confirmation; past its lifetime it refuses at once.
    let (reader, csrf) = open_report(&gw, &link).await;
    gw.clock.advance(7 * 24 * 3600 + 1);
    let opened = reader.get(gw.url(&link)).send().await.unwrap();
    assert_eq!(opened.status(), 410);
    let r = confirm_report(&gw, &reader, &csrf, &link).await;
    assert_eq!(r.status(), 410);
    assert!(!gw.user("late@example.com").await.locked);
}

/// A real SMTP server (Python's aiosmtpd): mail queued while it is down is delivered once it
/// is up, and the sign-in itself never waited for it.
#[tokio::test]
async fn notices_go_through_smtp_and_survive_an_smtp_outage() {
    let port = free_port();
    let gw = Gateway::start_with(|c| {
        c.notify.smtp_url = Some(format!("smtp://127.0.0.1:{port}").into());
        c.notify.from = "Security <security@esp.example>".into();
    })
    .await;
    let (_, _, _) = gw.signed_in("smtp@example.com").await;
    // Nothing listens yet: the attempts fail and the mail (the enrolment notice and the
    // new-device notice) stays queued. The gateway's own worker may be the one trying; either
    // way each mail is tried exactly once.
    let queued = mail_once(&gw, |m| m.attempts >= 1).await;
    assert_eq!(queued.len(), 2);
    for m in &queued {
        assert_eq!(m.attempts, 1);
        assert!(m.sent_at.is_none());
        assert!(m.last_error.is_some());
        // Waiting, a notice's body is sealed under the master key: a copy of the database
        // shows no live "this wasn't me" link.
        assert!(m.body.starts_with("sealed:v1:"), "{}", m.body);
        assert!(!m.body.contains("report?t="), "{}", m.body);
    }

    let maildir = gw.dir.path().join("maildir");
    let _server = Process(
        std::process::Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .spawn()
            .expect("python3 -m aiosmtpd (python3 -m pip install aiosmtpd)"),
    );
    wait_for_port(port).await;
    // Retried after the backoff, not before.
    assert_eq!(gw.state.notifier.deliver_due().await.unwrap(), 0);
    assert!(gw
        .state
        .durable
        .list_mail(10)
        .await
        .unwrap()
        .iter()
        .all(|m| m.sent_at.is_none()));
    gw.clock.advance(31);
    let sent = mail_once(&gw, |m| m.sent_at.is_some()).await;
    assert!(sent.iter().all(|m| m.attempts == 2));
    let delivered: Vec<String> = std::fs::read_dir(maildir.join("new"))
        .unwrap()
        .map(|e| readable_mail(&std::fs::read(e.unwrap().path()).unwrap()))
        .collect();
    assert_eq!(delivered.len(), 2);
    let notice = delivered
        .iter()
        .find(|m| m.contains("Subject: New sign-in"))
        .expect("the new-device notice");
    assert!(notice.contains("From: Security <security@esp.example>"));
    assert!(notice.contains("To: smtp@example.com"));
    assert!(notice.contains("/_portcullis/report?t="));
    // Sent, the rows keep no body at all.
    assert!(sent.iter().all(|m| m.body.is_empty()));
}

/// Runs delivery passes until every queued mail satisfies `done`; returns the queue.
async fn mail_once(
    gw: &Gateway,
    done: impl Fn(&portcullis::store::Mail) -> bool,
) -> Vec<portcullis::store::Mail> {
    for _ in 0..250 {
        gw.state.notifier.deliver_due().await.unwrap();
        let queue = gw.state.durable.list_mail(10).await.unwrap();
        if !queue.is_empty() && queue.iter().all(&done) {
            return queue;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the mail queue never reached the expected state");
}

async fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the SMTP server did not start on port {port}");
}

/// Changes to how an account is protected are mailed to its owner: a second factor set up, a
/// recovery code used, second factors reset by an administrator.
#[tokio::test]
async fn owners_hear_about_changes_to_their_second_factors() {
    let gw = Gateway::start().await;
    let (_, _, codes) = gw.signed_in("care@example.com").await;
    let changes = mail_about(&gw, "Subject: Security change on your account").await;
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert!(changes[0].contains("an authenticator app was set up"));

    let c = gw.browser();
    gw.clock.advance(30);
    gw.password(&c, "care@example.com", PASSWORD, "").await;
    let r = gw.code(&c, "/_portcullis/mfa", &codes[0]).await;
    assert_eq!(r.status(), 303);
    let changes = mail_about(&gw, "Subject: Security change on your account").await;
    assert_eq!(changes.len(), 2);
    assert!(changes[1].contains("a recovery code was used to sign in (9 left)"));

    let out = gw
        .cli(&["user", "reset-mfa", "care@example.com"], None)
        .await;
    assert!(out.status.success());
    let changes = mail_about(&gw, "Subject: Security change on your account").await;
    assert_eq!(changes.len(), 3);
    // (The CLI stamps its notice with the real clock, the gateway's runs ahead: no order.)
    assert!(changes
        .iter()
        .any(|m| m.contains("an administrator removed all second factors")));
    assert!(
        !changes.iter().any(|m| m.contains(&codes[1])),
        "no secrets in mail"
    );
}

/// The account page lists the user's devices; signing one out ends its sessions at once and
/// its next sign-in is reported as a new device again. Other devices keep working.
#[tokio::test]
async fn a_device_signed_out_from_the_account_page_loses_its_sessions() {
    let gw = Gateway::start().await;
    let (a, secret, _) = gw.signed_in("two@example.com").await;
    let b = gw.browser();
    gw.sign_in_on(&b, "two@example.com", &secret).await;
    assert_eq!(gw.status(&b, "/campaigns").await, 200);

    let user = gw.user("two@example.com").await;
    let devices = gw.state.durable.list_devices(&user.id).await.unwrap();
    assert_eq!(devices.len(), 2);
    let b_device = &devices[0].id; // the latest sign-in
    let html = gw.page(&a, "/_portcullis/account").await;
    assert_eq!(html.matches("class=\"device\"").count(), 2, "{html}");
    assert_eq!(html.matches("this browser").count(), 1);
    assert!(html.contains(&format!("/_portcullis/account/devices/{b_device}/revoke")));

    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    // Another user's device id, or a made-up one, is not found.
    let r = a
        .post(gw.url("/_portcullis/account/devices/nope/revoke"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = a
        .post(gw.url(&format!("/_portcullis/account/devices/{b_device}/revoke")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(location(&r).contains("notice=device_revoked"));

    assert_eq!(gw.status(&b, "/campaigns").await, 303, "signed out at once");
    assert_eq!(
        gw.status(&a, "/campaigns").await,
        200,
        "the other device stays"
    );
    assert!(gw.audit().await.iter().any(|e| e.event == "device_revoked"));

    // Its next sign-in is a new device: reported again.
    assert_eq!(sign_in_notices(&gw).await.len(), 2);
    gw.sign_in_on(&b, "two@example.com", &secret).await;
    assert_eq!(sign_in_notices(&gw).await.len(), 3);

    // A browser that signs its own device out is signed out, and told just that: not that
    // another browser did it.
    let a_device = &devices[1].id;
    let html = gw.page(&a, "/_portcullis/account").await;
    assert!(html.contains(&format!("/_portcullis/account/devices/{a_device}/revoke")));
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let r = a
        .post(gw.url(&format!("/_portcullis/account/devices/{a_device}/revoke")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/login?notice=logged_out");
    assert_eq!(gw.status(&a, "/campaigns").await, 303);
    let r = gw.get(&a, "/_portcullis/account").await;
    assert!(
        !location(&r).contains("signed_out_elsewhere"),
        "{}",
        location(&r)
    );
    assert_eq!(
        gw.status(&b, "/campaigns").await,
        200,
        "the other device stays"
    );
}
