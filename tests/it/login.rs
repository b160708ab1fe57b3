//! The sign-in flow end to end: forced enrolment, TOTP, recovery codes, the identity token the
//! console receives, return-to, fixation, logout.

use super::harness::*;

/// Signs browser `b` out through the logout form: the session and bound cookies are removed,
/// the device cookie stays.
pub(super) async fn sign_out(gw: &Gateway, b: &reqwest::Client) {
    let csrf = gw.csrf(b, "/_portcullis/logout").await;
    let r = b
        .post(gw.url("/_portcullis/logout"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let removed: Vec<&str> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.contains("Max-Age=0"))
        .filter_map(|v| v.split('=').next())
        .collect();
    assert_eq!(removed, ["portcullis-session", "portcullis-bound"]);
    // Console pages the browser cached go too (Back on a shared computer), and only those.
    assert_eq!(
        r.headers()
            .get("clear-site-data")
            .map(|v| v.to_str().unwrap()),
        Some("\"cache\"")
    );
}

#[tokio::test]
async fn full_sign_in_delivers_a_verifiable_identity_token() {
    let gw = Gateway::start().await;
    let user = gw.add_user("Alice@Example.com").await;
    let c = gw.browser();
    // First request: sent to sign in, remembering where it wanted to go.
    let r = c.get(gw.url("/campaigns?page=2")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        location(&r),
        "/_portcullis/login?next=%2Fcampaigns%3Fpage%3D2"
    );
    let r = gw
        .password(&c, "alice@example.com", PASSWORD, "/campaigns?page=2")
        .await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    // Half-way through, nothing reaches the console.
    let r = c.get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(gw.upstream.count(), 0);
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    assert!(html.contains("<svg"), "QR code as SVG");
    let b32 = extract(&html, "id=\"totp-secret\">", "<").unwrap();
    let secret = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
    let r = gw
        .code(&c, "/_portcullis/enrol/totp", &gw.totp_now(&secret))
        .await;
    assert_eq!(location(&r), "/_portcullis/recovery-codes");
    let r = c.get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(
        r.status(),
        303,
        "no console before the codes are acknowledged"
    );
    let csrf = gw.csrf(&c, "/_portcullis/recovery-codes").await;
    let r = c
        .post(gw.url("/_portcullis/recovery-codes"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/campaigns?page=2");

    let r = c.get(gw.url("/campaigns?page=2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = gw.upstream.last();
    assert_eq!(seen.uri, "/campaigns?page=2");
    let token = seen
        .header("x-portcullis-assertion")
        .expect("identity header");
    let jwks: serde_json::Value = gw
        .api()
        .get(gw.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let claims = portcullis::token::verify(token, &jwks, "esp-console", Some(&gw.base), 5).unwrap();
    assert_eq!(claims.sub, user.id);
    assert_eq!(claims.email, "alice@example.com");
    assert_eq!(claims.account, "acct-1");
    assert_eq!(claims.amr, vec!["pwd", "otp"]);
    assert!(claims.exp - claims.iat <= 120 && claims.exp > claims.iat);
    assert!(!claims.sid.is_empty() && !claims.jti.is_empty());
    // Reused, not re-signed per request.
    c.get(gw.url("/other")).send().await.unwrap();
    assert_eq!(
        gw.upstream.last().header("x-portcullis-assertion"),
        Some(token)
    );
    // The gateway's cookies never reach the console.
    for s in gw.upstream.requests() {
        for cookie in s.headers_named("cookie") {
            assert!(!cookie.contains("portcullis"), "{cookie}");
        }
    }
}

#[tokio::test]
async fn totp_codes_work_once_and_recovery_codes_once_each() {
    let gw = Gateway::start().await;
    let (_c, secret, codes) = gw.signed_in("bob@example.com").await;
    gw.clock.advance(30);
    let code = gw.totp_now(&secret);
    let a = gw.browser();
    gw.password(&a, "bob@example.com", PASSWORD, "").await;
    assert_eq!(location(&gw.code(&a, "/_portcullis/mfa", &code).await), "/");
    // The same code again, in another sign-in: refused.
    let b = gw.browser();
    gw.password(&b, "bob@example.com", PASSWORD, "").await;
    let r = gw.code(&b, "/_portcullis/mfa", &code).await;
    assert_eq!(r.status(), 401);
    assert_eq!(b.get(gw.url("/x")).send().await.unwrap().status(), 303);
    // A recovery code works once.
    let r = gw
        .code(&b, "/_portcullis/mfa", &codes[0].to_uppercase())
        .await;
    assert_eq!(location(&r), "/");
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    let claims = super::webauthn::last_claims(&gw).await;
    assert_eq!(claims.amr, vec!["pwd", "rec"]);
    // A step-up with the app adds it to what the session has used.
    let r = super::risk::reauth_with_code(&gw, &b, &secret, "/campaigns").await;
    assert_eq!(r.status(), 303);
    assert_eq!(gw.status(&b, "/campaigns").await, 200);
    let claims = super::webauthn::last_claims(&gw).await;
    assert_eq!(claims.amr, vec!["pwd", "rec", "otp"]);
    let d = gw.browser();
    gw.password(&d, "bob@example.com", PASSWORD, "").await;
    assert_eq!(
        gw.code(&d, "/_portcullis/mfa", &codes[0]).await.status(),
        401
    );
    let ev = gw.audit().await;
    assert!(ev
        .iter()
        .any(|e| e.event == "second_factor" && e.reason.as_deref() == Some("replayed_code")));
    assert!(ev.iter().any(|e| e.event == "recovery_code_used"));
}

/// Codes sent at once for one sign-in (a double submit, a copy of the cookies on the same
/// network and browser): one is checked, the others are told a step is being checked, so the
/// sign-in completes once and one recovery code is spent, not one per request.
#[tokio::test]
async fn a_sign_in_completes_once_however_many_codes_arrive_at_once() {
    let gw = Gateway::start().await;
    let (_c, _, codes) = gw.signed_in("twice@example.com").await;
    let successes = |ev: Vec<portcullis::store::AuditEvent>| {
        ev.iter()
            .filter(|e| e.event == "second_factor" && e.outcome == "success")
            .count()
    };
    let before = successes(gw.audit().await);
    let a = gw.browser();
    gw.password(&a, "twice@example.com", PASSWORD, "").await;
    let csrf = gw.csrf(&a, "/_portcullis/mfa").await;
    let tries = codes.len().min(8);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(tries));
    let sent: Vec<_> = codes[..tries]
        .iter()
        .map(|code| {
            let (c, url, csrf) = (a.client.clone(), gw.url("/_portcullis/mfa"), csrf.clone());
            let (code, barrier) = (code.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let r = c
                    .post(url)
                    .form(&[("code", code.as_str()), ("csrf", csrf.as_str())])
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), location(&r))
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in sent {
        answers.push(t.await.unwrap());
    }
    let completed = answers.iter().filter(|(_, to)| to == "/").count();
    assert_eq!(completed, 1, "{answers:?}");
    assert_eq!(
        codes_left(&gw, "twice@example.com").await,
        codes.len() - 1,
        "{answers:?}"
    );
    assert_eq!(successes(gw.audit().await), before + 1, "{answers:?}");
}

/// A code whose form body is slow to arrive holds its sign-in for as long as the body may take
/// (`server.body_timeout`), not less: another code sent meanwhile is told a step is under way,
/// and the sign-in still completes once when the slow body arrives.
#[tokio::test]
async fn a_slow_step_holds_its_sign_in_until_its_body_is_in() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw =
        Gateway::start_with(|c| c.server.body_timeout = std::time::Duration::from_secs(60)).await;
    let (_c, _, codes) = gw.signed_in("slow-step@example.com").await;
    let a = gw.browser();
    gw.password(&a, "slow-step@example.com", PASSWORD, "").await;
    let csrf = gw.csrf(&a, "/_portcullis/mfa").await;
    let body = format!("code={}&csrf={csrf}", codes[0]);
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /_portcullis/mfa HTTP/1.1\r\nHost: x\r\nCookie: {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{}",
        gw.cookies(&a),
        body.len(),
        &body[..5]
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Longer than any fixed hold shorter than the body's own bound.
    gw.clock.advance(45);
    let r = gw.code(&a, "/_portcullis/mfa", &codes[1]).await;
    assert_eq!(
        r.status(),
        409,
        "the slow step's hold ran out before its body"
    );
    slow.write_all(&body.as_bytes()[5..]).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), slow.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    assert_eq!(
        codes_left(&gw, "slow-step@example.com").await,
        codes.len() - 1
    );
}

/// Recovery codes the account has left.
async fn codes_left(gw: &Gateway, email: &str) -> usize {
    let user = gw.user(email).await;
    let left = gw.state.durable.recovery_codes_left(&user.id).await;
    left.unwrap() as usize
}

#[tokio::test]
async fn session_id_changes_at_every_privilege_step_and_logout_ends_it() {
    let gw = Gateway::start().await;
    gw.add_user("carol@example.com").await;
    let c = gw.browser();
    let cookie_of = |r: &reqwest::Response| {
        r.headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("portcullis-session="))
            .map(|v| v.split(';').next().unwrap().to_string())
    };
    let r = gw.password(&c, "carol@example.com", PASSWORD, "").await;
    let first = cookie_of(&r).expect("session cookie after password");
    let html = gw.page(&c, "/_portcullis/enrol/totp").await;
    let secret = totp_rs::Secret::Encoded(extract(&html, "id=\"totp-secret\">", "<").unwrap())
        .to_bytes()
        .unwrap();
    let r = gw
        .code(&c, "/_portcullis/enrol/totp", &gw.totp_now(&secret))
        .await;
    let second = cookie_of(&r).expect("new cookie after second factor");
    assert_ne!(first, second);
    // The pre-MFA id is dead: an attacker who planted or saw it gets nothing.
    let stale = gw.api();
    let r = stale
        .get(gw.url("/_portcullis/recovery-codes"))
        .header("cookie", &first)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let csrf = gw.csrf(&c, "/_portcullis/recovery-codes").await;
    let r = c
        .post(gw.url("/_portcullis/recovery-codes"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    let third = cookie_of(&r).expect("new cookie when the session completes");
    assert_ne!(second, third);
    let r = stale
        .get(gw.url("/x"))
        .header("cookie", &third)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "complete session works");
    // Logout needs a POST with the CSRF token and ends the session server-side.
    let r = c
        .post(gw.url("/_portcullis/logout"))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    sign_out(&gw, &c).await;
    let r = stale
        .get(gw.url("/x"))
        .header("cookie", &third)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "copied cookie is dead after logout");
}

/// Fresh recovery codes wait in the session until shown: the session record holds them sealed,
/// so whoever reads the ephemeral store (a shared Redis) does not learn them.
#[tokio::test]
async fn recovery_codes_waiting_in_a_session_are_sealed() {
    let gw = Gateway::start().await;
    gw.add_user("sealed@example.com").await;
    let c = gw.browser();
    let (_, r) = gw.enrol_totp(&c, "sealed@example.com").await;
    let cookie = session_cookie(&r);
    let id = cookie.split_once('=').unwrap().1;
    let record = gw
        .state
        .ephemeral
        .get(&format!(
            "session:{}",
            portcullis::crypto::sha256_hex(id.as_bytes())
        ))
        .await
        .unwrap()
        .expect("the session record");
    let html = gw.page(&c, "/_portcullis/recovery-codes").await;
    let first = extract(&html, "<li><code>", "<").expect("codes shown");
    let record = String::from_utf8_lossy(&record);
    assert!(record.contains("sealed_codes"), "{record}");
    assert!(!record.contains(&first), "a code in clear in the session");
    assert!(!record.contains(&first.replace('-', "")));
}

/// The sign-in form sent again while signed in as that user (a second tab left on it) leaves
/// the session as it is and goes on; as another user, or with the session ended, it is a new
/// sign-in.
#[tokio::test]
async fn the_sign_in_form_sent_again_while_signed_in_keeps_the_session() {
    let gw = Gateway::start().await;
    let (c, secret, _) = gw.signed_in("tabs@example.com").await;
    gw.add_user("other@example.com").await;
    // The second tab's form was loaded before this sign-in, which renewed the form token.
    super::login::sign_out(&gw, &c).await;
    let stale = gw.csrf(&c, "/_portcullis/login").await;
    gw.sign_in_on(&c, "tabs@example.com", &secret).await;
    let csrf = gw.csrf(&c, "/_portcullis/logout").await;
    assert_ne!(stale, csrf);
    let before = gw.cookies(&c);
    for (email, password, token) in [
        ("tabs@example.com", PASSWORD, &stale),
        (" TABS@example.com", "not even the password", &stale),
        ("tabs@example.com", PASSWORD, &csrf),
    ] {
        let r = gw
            .login_form(&c, token, email, password, "/campaigns")
            .send()
            .await
            .unwrap();
        assert_eq!(location(&r), "/campaigns", "{email}");
        assert_eq!(gw.cookies(&c), before, "the same session");
        assert_eq!(gw.status(&c, "/campaigns").await, 200);
    }
    // From another page of the site (another port, a sibling host), naming the user signed in:
    // refused as any such form is, so it learns nothing of who is signed in here.
    for origin in ["http://127.0.0.1:1", "null"] {
        let r = gw
            .login_form(&c, &stale, "tabs@example.com", PASSWORD, "/campaigns")
            .header("origin", origin)
            .header("sec-fetch-site", "same-site")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{origin}");
    }
    // Another user's, with the stale token: refused as an old form, the session goes on.
    let r = gw
        .login_form(&c, &stale, "other@example.com", PASSWORD, "")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
    // Another user's sign-in is a new sign-in (and ends this session).
    let r = gw
        .login_form(&c, &csrf, "other@example.com", PASSWORD, "")
        .send()
        .await
        .unwrap();
    assert_ne!(location(&r), "/");
    assert_eq!(gw.status(&c, "/campaigns").await, 303);
}

/// The right password followed by wrong second factors until the sign-in is stopped: someone
/// may know the password, and the owner is mailed (once an hour), with a link that locks
/// password sign-in. A wrong password, an address without an account, or a stopped sign-in
/// again within the hour mail nobody.
#[tokio::test]
async fn the_owner_hears_of_a_right_password_with_failed_second_factors() {
    let gw = Gateway::start().await;
    let email = "guessed@example.com";
    let (_, secret, _) = gw.signed_in(email).await;
    let before = gw.outbox().await.len();
    let told = |mails: &[String]| {
        mails
            .iter()
            .filter(|m| m.contains("Subject: Someone may know your password"))
            .cloned()
            .collect::<Vec<_>>()
    };
    // Wrong codes until the sign-in is stopped.
    let stop = |who: &'static str, password: &'static str| {
        let gw = &gw;
        async move {
            let c = gw.browser();
            let r = gw.password(&c, who, password, "").await;
            if location(&r) != "/_portcullis/mfa" {
                return;
            }
            for _ in 0..5 {
                gw.code(&c, "/_portcullis/mfa", "000000").await;
            }
        }
    };
    stop("nobody-here@example.com", PASSWORD).await;
    stop(email, "not the password at all").await;
    assert!(told(&gw.outbox().await).is_empty(), "nobody to tell yet");
    stop(email, PASSWORD).await;
    let mails = gw.outbox().await;
    let notice = told(&mails);
    assert_eq!(notice.len(), 1, "{mails:?}");
    assert_eq!(mails.len(), before + 1);
    assert!(
        notice[0].contains("gave your password correctly") && notice[0].contains("too many times"),
        "{}",
        notice[0]
    );
    // Which browser, and from when the link takes back what was added.
    assert!(
        notice[0].contains("Device:  ") && notice[0].contains("since this message was sent"),
        "{}",
        notice[0]
    );
    // Its link is a report link: it locks password sign-in.
    let link = notice[0]
        .split_whitespace()
        .find(|w| w.contains("/_portcullis/report?t="))
        .unwrap()
        .to_string();
    let page = gw
        .get(&gw.browser(), &link[link.find("/_portcullis").unwrap()..])
        .await;
    assert_eq!(page.status(), 200);
    let text = page.text().await.unwrap();
    assert!(
        text.contains("a sign-in that\ngave your password"),
        "the page speaks of it: {text}"
    );
    // Stopped again within the hour: no second mail.
    gw.clock.advance(60);
    stop(email, PASSWORD).await;
    assert_eq!(told(&gw.outbox().await).len(), 1);
    // The owner still signs in.
    gw.clock.advance(3600);
    gw.sign_in_again(email, &secret).await;
}

/// A step of a sign-in opened with no sign-in under way (a bookmark, a page opened anew) goes
/// to the sign-in page plainly; only a sign-in that ran out is told it took too long.
#[tokio::test]
async fn a_sign_in_step_without_a_sign_in_is_not_called_expired() {
    let gw = Gateway::start().await;
    for path in [
        "/_portcullis/mfa",
        "/_portcullis/recovery-codes",
        "/_portcullis/enrol/totp",
    ] {
        let r = gw.get(&gw.browser(), path).await;
        assert_eq!(location(&r), "/_portcullis/login", "{path}");
        let r = gw
            .api()
            .get(gw.url(path))
            .header("accept", "text/html")
            .header("cookie", "portcullis-session=gone-long-ago")
            .send()
            .await
            .unwrap();
        assert_eq!(location(&r), "/_portcullis/login?notice=expired", "{path}");
    }
}

/// Wrong codes spread over several sign-ins that each gave the right password (four each, so no
/// sign-in is stopped by its own): the account's budget of codes runs out, and that is told to
/// the owner as a stopped sign-in is.
#[tokio::test]
async fn the_owner_hears_of_a_right_password_whose_codes_spent_the_accounts_budget() {
    let gw = Gateway::start().await;
    let email = "spread@example.com";
    gw.signed_in(email).await;
    let told = || async {
        gw.outbox()
            .await
            .iter()
            .filter(|m| m.contains("Subject: Someone may know your password"))
            .count()
    };
    let mut throttled = false;
    for _ in 0..4 {
        let c = gw.browser();
        let r = gw.password(&c, email, PASSWORD, "").await;
        assert_eq!(location(&r), "/_portcullis/mfa");
        for _ in 0..4 {
            let r = gw.code(&c, "/_portcullis/mfa", "000000").await;
            throttled |= r.status() == 429;
        }
        if throttled {
            break;
        }
        assert_eq!(told().await, 0, "no sign-in was stopped yet");
    }
    assert!(throttled, "the account's budget ran out");
    assert_eq!(told().await, 1);
}

/// A sign-in that must set up its second factor, given up after its key was shown and begun
/// again, shows a new key and says that the one shown before no longer works (the owner may
/// have scanned it); a reload of the same page does not say it again, and once a factor is
/// set up, a later setup does not speak of the old one.
#[tokio::test]
async fn an_enrolment_begun_again_says_the_key_shown_before_no_longer_works() {
    let gw = Gateway::start().await;
    let email = "twice-shown@example.com";
    let user = gw.add_user(email).await;
    let first = enrol_page(&gw, &gw.browser(), email).await;
    assert!(!first.contains("new-key-notice"), "{first}");
    let c = gw.browser();
    let second = enrol_page(&gw, &c, email).await;
    assert!(second.contains("id=\"new-key-notice\""), "{second}");
    assert_ne!(
        extract(&first, "id=\"totp-secret\">", "<"),
        extract(&second, "id=\"totp-secret\">", "<")
    );
    let reload = gw.page(&c, "/_portcullis/enrol/totp").await;
    assert!(!reload.contains("new-key-notice"), "{reload}");
    // A wrong code's advice names the likely cause.
    let r = gw.code(&c, "/_portcullis/enrol/totp", "000000").await;
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("use the entry added last"));
    gw.enrol_app(&c).await;
    // The factors removed: a new setup has nothing earlier to speak of.
    gw.drop_totp(&user.id).await;
    let later = enrol_page(&gw, &gw.browser(), email).await;
    assert!(later.contains("totp-secret"), "{later}");
    assert!(!later.contains("new-key-notice"), "{later}");
}

/// Two sign-ins setting up an account's first second factor at once (the owner, and a thief
/// with the stolen password) never both finish: the setup begun earlier no longer works, as the
/// later page says (nor is its page shown again), and a setup that lost the race is stopped and
/// told rather than silently replacing the factor, and with it the recovery codes, that the
/// other one set up.
#[tokio::test]
async fn only_one_of_two_concurrent_first_setups_completes_and_the_other_is_told() {
    let gw = Gateway::start().await;
    let email = "race@example.com";
    let user = gw.add_user(email).await;
    // The page's key and form token; the code is sent later without showing the page again.
    let begin = |c: Browser| {
        let gw = &gw;
        async move {
            gw.clock.advance(1);
            let html = enrol_page(gw, &c, email).await;
            let b32 = extract(&html, "id=\"totp-secret\">", "<").unwrap();
            let secret = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
            let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
            (c, secret, csrf, html)
        }
    };
    let send = |(c, secret, csrf): (&Browser, &[u8], &str)| {
        let gw = &gw;
        let code = gw.totp_now(secret);
        let req = c
            .post(gw.url("/_portcullis/enrol/totp"))
            .form(&[("code", code.as_str()), ("csrf", csrf)]);
        async move { req.send().await.unwrap() }
    };
    // A begins, then B: A's key no longer works, as B's page says.
    let (a, a_secret, a_csrf, _) = begin(gw.browser()).await;
    let (b, b_secret, b_csrf, b_page) = begin(gw.browser()).await;
    assert!(b_page.contains("id=\"new-key-notice\""), "{b_page}");
    let r = send((&a, &a_secret, &a_csrf)).await;
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/_portcullis/login?notice=enrol_superseded");
    assert!(gw.state.durable.totp(&user.id).await.unwrap().is_none());
    let told = gw.page(&a, &location(&r)).await;
    assert!(told.contains("begun again in another browser"), "{told}");
    // Nor is the page of a setup begun before the latest shown again: a reload cannot make
    // it the latest.
    let r = gw.get(&a, "/_portcullis/enrol/totp").await;
    assert_eq!(r.status(), 303, "{}", location(&r));
    let (older, _, _, _) = begin(gw.browser()).await;
    begin(gw.browser()).await;
    let r = gw.get(&older, "/_portcullis/enrol/totp").await;
    assert_eq!(location(&r), "/_portcullis/login?notice=enrol_superseded");
    drop((b, b_secret, b_csrf));

    // The latest setup works; C, begun before it finished, is stopped once it has.
    let (c, c_secret, c_csrf, _) = begin(gw.browser()).await;
    let (d, d_secret, d_csrf, _) = begin(gw.browser()).await;
    gw.clock.advance(30);
    let r = send((&d, &d_secret, &d_csrf)).await;
    assert_eq!(location(&r), "/_portcullis/recovery-codes");
    let (codes, _) = gw.save_recovery_codes(&d).await;
    assert_eq!(gw.status(&d, "/campaigns").await, 200);
    let r = send((&c, &c_secret, &c_csrf)).await;
    assert_eq!(location(&r), "/_portcullis/login?notice=enrol_elsewhere");
    let told = gw.page(&c, &location(&r)).await;
    assert!(told.contains("someone else knows your password"), "{told}");
    // D's factor and codes stand.
    let stored = gw.state.durable.totp(&user.id).await.unwrap().unwrap();
    let opened = gw
        .state
        .master_key
        .open(
            &portcullis::auth::flow::totp_context(&user.id),
            &stored.secret_sealed,
        )
        .unwrap();
    assert_eq!(opened.to_vec(), d_secret);
    assert_eq!(codes.len(), 10);
    let left = gw
        .state
        .durable
        .recovery_codes_left(&user.id)
        .await
        .unwrap();
    assert_eq!(left, 10);
    let denied: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "totp_enrolled" && e.outcome == "denied")
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(
        denied,
        ["enrol_superseded", "enrol_elsewhere"],
        "{denied:?}"
    );
}

/// Password for a user who must set up a second factor: the enrolment page.
async fn enrol_page(gw: &Gateway, c: &Browser, email: &str) -> String {
    let r = gw.password(c, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    gw.page(c, "/_portcullis/enrol/totp").await
}

/// The CSRF cookie is new at every completed sign-in: a form token known from before (an
/// earlier session of the browser, or a copied cookie jar) is no token for the new session.
#[tokio::test]
async fn a_completed_sign_in_renews_the_form_token() {
    let gw = Gateway::start().await;
    let (c, secret, _) = gw.signed_in("renewed@example.com").await;
    let old = gw.csrf(&c, "/_portcullis/account").await;
    sign_out(&gw, &c).await;
    assert_eq!(
        gw.csrf(&c, "/_portcullis/login").await,
        old,
        "kept until a sign-in"
    );
    gw.sign_in_on(&c, "renewed@example.com", &secret).await;
    let new = gw.csrf(&c, "/_portcullis/account").await;
    assert_ne!(new, old);
    let post = |token: String| {
        c.post(gw.url("/_portcullis/logout"))
            .form(&[("csrf", token)])
            .send()
    };
    let r = post(old).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("This form is out of date"));
    // A form without any token is told it has none, not that it is out of date.
    let r = post(String::new()).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("carries no form token"));
    assert_eq!(
        gw.status(&c, "/_portcullis/account").await,
        200,
        "still signed in"
    );
    assert_eq!(post(new).await.unwrap().status(), 303);
}

/// Wrong codes before the last ones say nothing more; the two before the sign-in starts over say
/// how many are left, on the page and to an API client alike.
#[tokio::test]
async fn the_last_wrong_codes_say_the_sign_in_will_start_over() {
    let gw = Gateway::start().await;
    let email = "tries-left@example.com";
    gw.signed_in(email).await;
    let per_login = gw.state.config.limits.second_factor_failures_per_login;
    assert_eq!(per_login, 5, "the default this test counts with");
    let b = gw.browser();
    let r = gw.password(&b, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let mut said = Vec::new();
    for _ in 0..per_login - 1 {
        let r = gw.code(&b, "/_portcullis/mfa", "000000").await;
        assert_eq!(r.status(), 401);
        let page = r.text().await.unwrap();
        said.push(
            if page.contains("One more wrong code and this sign-in starts over") {
                1
            } else if page.contains("Two more wrong codes and this sign-in starts over") {
                2
            } else {
                0
            },
        );
    }
    assert_eq!(said, [0, 0, 2, 1]);
    let r = gw.code(&b, "/_portcullis/mfa", "000000").await;
    assert!(location(&r).contains("notice=restart"), "{}", location(&r));
}

/// "Stay signed in" on the sign-out page goes back to the page that linked it (same origin
/// only), not to the start page.
#[tokio::test]
async fn staying_signed_in_goes_back_to_the_page_before() {
    let gw = Gateway::start().await;
    let (b, _, _) = gw.signed_in("stay@example.com").await;
    let base = gw.base.trim_end_matches('/');
    for (referer, back) in [
        (
            format!("{base}/campaigns/7?tab=send"),
            "/campaigns/7?tab=send",
        ),
        (
            format!("{base}/_portcullis/account"),
            "/_portcullis/account",
        ),
        ("http://evil.example/campaigns".to_string(), "/"),
    ] {
        let r = b
            .get(gw.url("/_portcullis/logout"))
            .header("referer", &referer)
            .send()
            .await
            .unwrap();
        let page = r.text().await.unwrap();
        assert!(
            page.contains(&format!("<a href=\"{back}\">Stay signed in</a>")),
            "{referer}: {page}"
        );
    }
}
