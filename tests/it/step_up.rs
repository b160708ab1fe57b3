//! `[[step_up]]`: console actions (sending a campaign, API keys, list export) forwarded only for
//! a session whose last second-factor proof is recent enough, through the proxy and forward-auth.

use std::time::Duration;

use portcullis::policy::step_up::StepUpRule;

use super::forward_auth::auth;
use super::harness::*;

pub(super) fn rules(c: &mut portcullis::config::Config) {
    c.step_up = vec![
        rule("/campaigns/*/send", &["POST"], false),
        rule("/lists/*/export", &[], false),
        rule("/reports/download", &["GET"], false),
    ];
    c.forward_auth.enabled = true;
    c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
}

fn rule(path: &str, methods: &[&str], key: bool) -> StepUpRule {
    StepUpRule {
        path: path.into(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        max_age: Duration::from_secs(5 * 60),
        key,
    }
}

async fn send_campaign(gw: &Gateway, c: &Browser, path: &str, accept: &str) -> reqwest::Response {
    c.post(gw.url(path))
        .header("accept", accept)
        .form(&[("recipients", "50000")])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn sensitive_actions_need_a_recent_proof() {
    let gw = Gateway::start_with(rules).await;
    let (c, secret, codes) = gw.signed_in("sender@example.com").await;
    // Just signed in: the proof is fresh.
    let r = send_campaign(&gw, &c, "/campaigns/7/send", "application/json").await;
    assert_eq!(r.status(), 200);
    let forwarded = gw.upstream.count();

    gw.clock.advance(6 * 60);
    // Other console requests go on as before.
    assert_eq!(gw.status(&c, "/campaigns/7").await, 200);
    assert_eq!(
        gw.status(&c, "/campaigns/7/send").await,
        200,
        "GET is not guarded"
    );
    let forwarded = forwarded + 2;
    // The guarded action, in any spelling, is held back.
    for path in [
        "/campaigns/7/send",
        "/Campaigns/7/SEND",
        "/campaigns//7/send/",
        // Blank and dot segments, a lone format suffix, blanks before the segment: a console
        // that trims segments routes them to the action.
        "/campaigns/7/%20/send",
        "/campaigns/7/send/%20",
        "/campaigns/7/send/...",
        "/campaigns/7/send/.json",
        "/campaigns/7/x/..%20/send",
        "/campaigns/7/%20send",
        "/campaigns/7/x/.%20./send",
        "/campaigns/7/send/+",
        "/campaigns/7/%EF%BD%93end",
        "/index.php/campaigns/7/send",
        // A POST to a GET rule's path: `_method=GET` makes it the GET.
        "/reports/download",
    ] {
        let r = send_campaign(&gw, &c, path, "application/json").await;
        assert_eq!(r.status(), 403, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "step_up_required", "{path}");
        assert!(
            v["reauth"]
                .as_str()
                .unwrap()
                .starts_with("/_portcullis/reauth?next="),
            "{v}"
        );
    }
    // The gateway's own paths in such spellings are not the console's either.
    for path in [
        "/index.php/_portcullis/account",
        "/+/_portcullis/account",
        "/.well-known/jwks.json%20",
        "/.well-known/jwks.json.",
    ] {
        assert_eq!(gw.status(&c, path).await, 404, "{path}");
    }
    assert_eq!(
        gw.upstream.count(),
        forwarded,
        "a gateway path went through"
    );
    // Another action whose name begins like the guarded one is not guarded.
    let r = send_campaign(&gw, &c, "/campaigns/7/send-test", "application/json").await;
    assert_eq!(r.status(), 200);
    let forwarded = forwarded + 1;
    // Overlong UTF-8 (`%C0%AE%C0%AE` is `..` to a lenient decoder) is refused outright.
    let r = send_campaign(
        &gw,
        &c,
        "/x/%c0%ae%c0%ae/campaigns/7/send",
        "application/json",
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        gw.upstream.count(),
        forwarded,
        "a guarded action went through"
    );
    // A form sent from a console page is held, not lost: to the step-up page, which sends it
    // once proven (see `a_form_stopped_for_a_step_up_is_sent_after_the_proof`).
    let r = c
        .post(gw.url("/campaigns/7/send"))
        .header("accept", "text/html")
        .header("referer", gw.url("/campaigns/new?draft=7"))
        .form(&[("recipients", "50000")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(
        location(&r).starts_with("/_portcullis/reauth?next=%2F_portcullis%2Fheld%3Fid%3D"),
        "{}",
        location(&r)
    );
    // One it cannot hold (too large to keep) gets a page with a link to prove it and return to
    // the form, saying it was not sent.
    let big = "x".repeat(portcullis::http::held::HELD_MAX_BODY + 1);
    let r = c
        .post(gw.url("/campaigns/7/send"))
        .header("accept", "text/html")
        .header("referer", gw.url("/campaigns/new?draft=7"))
        .form(&[("recipients", big.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("href=\"/_portcullis/reauth?next=%2Fcampaigns%2Fnew%3Fdraft%3D7\""),
        "{page}"
    );
    // The page says the form was not sent, in words, with the link beside them; a routine
    // confirmation, not titled as a refusal.
    assert!(
        page.contains("it was not sent") && !page.contains("at /_portcullis/reauth"),
        "{page}"
    );
    assert!(
        page.contains("<h1>Confirm it&#39;s you</h1>") && !page.contains("Not allowed"),
        "{page}"
    );
    // A navigation is sent to prove itself and to come back.
    let r = gw.get(&c, "/lists/3/export?format=csv").await;
    assert_eq!(
        location(&r),
        "/_portcullis/reauth?next=%2Flists%2F3%2Fexport%3Fformat%3Dcsv"
    );
    assert_eq!(
        gw.upstream.count(),
        forwarded,
        "nothing held back was forwarded"
    );

    // Forward-auth applies the same rule: 401 naming the step-up page (nginx redirects there),
    // also when the proxy passes a browser's Accept (a form post cannot be redirected to).
    let cookie = gw.cookies(&c);
    // A proxy passes the request line's bytes as they came (nginx's `$request_uri`): bytes
    // beyond ASCII are read, not taken for an absent target (which would be `/`, unguarded).
    for (uri, accept) in [
        ("/campaigns/7/send", "application/json"),
        ("/campaigns/7/send.json", "text/html"),
        ("/campaigns/7/send?x=é", "application/json"),
        ("/campaigns/7/send?é", "text/html"),
        ("/campaigns/é/send", "application/json"),
    ] {
        let r = auth(
            &gw,
            &[
                ("Cookie", &cookie),
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Uri", uri),
                ("Accept", accept),
            ],
        )
        .await;
        assert_eq!(r.status, 401, "{uri} {accept}: {}", r.head);
        assert!(r.header("x-portcullis-assertion").is_none());
        assert!(
            r.location().contains("/_portcullis/reauth?next="),
            "{}",
            r.head
        );
    }

    // A proxy that does not say the method (nginx asks with `GET` whatever the client sent):
    // the path's rules apply as for any method, not as for the check's own `GET`; told `GET`,
    // the rule for `POST` does not.
    for (method, status) in [(None, 401), (Some("GET"), 200)] {
        let mut h = vec![
            ("Cookie", cookie.as_str()),
            ("X-Original-URI", "/campaigns/7/send"),
            ("Accept", "application/json"),
        ];
        h.extend(method.map(|m| ("X-Forwarded-Method", m)));
        let r = auth(&gw, &h).await;
        assert_eq!(r.status, status, "{method:?}: {}", r.head);
        assert_eq!(
            r.header("x-portcullis-assertion").is_some(),
            status == 200,
            "{}",
            r.head
        );
    }

    // A form held back comes back to the page it was on (its same-origin `Referer`), as in
    // proxy mode: the step-up page returns there, not to the start.
    let referer = gw.url("/campaigns/7?tab=review");
    for accept in ["text/html", "application/json"] {
        let r = auth(
            &gw,
            &[
                ("Cookie", &cookie),
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Uri", "/campaigns/7/send"),
                ("Referer", &referer),
                ("Accept", accept),
            ],
        )
        .await;
        assert_eq!(r.status, 401, "{accept}: {}", r.head);
        assert!(
            r.location().ends_with(
                "/_portcullis/reauth?next=%2Fcampaigns%2F7%3Ftab%3Dreview&notice=not_sent"
            ),
            "{accept}: {}",
            r.head
        );
    }

    // A target with control characters, or a method that is none, is refused, never taken for
    // `/` or the request's own method.
    for (method, uri) in [
        ("POST", "/campaigns/7/send?\tx"),
        ("PO ST", "/campaigns/7/send"),
        // Two targets joined into one line, as intermediaries merge repeated headers.
        ("POST", "/x, /campaigns/7/send"),
        ("POST", "/campaigns/7/send, /x"),
        ("POST", "/campaigns/7/send%c2%85"),
    ] {
        let r = auth(
            &gw,
            &[
                ("Cookie", &cookie),
                ("X-Forwarded-Method", method),
                ("X-Forwarded-Uri", uri),
                ("Accept", "application/json"),
            ],
        )
        .await;
        assert_eq!(r.status, 403, "{method} {uri:?}: {}", r.head);
        assert!(r.body.contains("bad_original_request"), "{}", r.body);
        assert!(r.header("x-portcullis-assertion").is_none());
    }
    // The original request described twice (a proxy that adds rather than replaces): which
    // copy counts cannot be told, refused.
    for (name, first, second) in [
        ("X-Forwarded-Method", "GET", "POST"),
        ("X-Original-URI", "/campaigns/7", "/campaigns/7/send"),
    ] {
        let mut h = vec![("Cookie", cookie.as_str()), ("Accept", "application/json")];
        if name == "X-Original-URI" {
            h.push(("X-Forwarded-Method", "POST"));
        } else {
            h.push(("X-Forwarded-Uri", "/campaigns/7/send"));
        }
        h.push((name, first));
        h.push((name, second));
        let r = raw(gw.addr, "GET", "/_portcullis/auth", &h, "").await;
        assert_eq!(r.status, 403, "{name}: {}", r.head);
        assert!(r.body.contains(name), "the header is named: {}", r.body);
        assert!(r.header("x-portcullis-assertion").is_none());
    }
    // A refusal names the header the proxy sent (nginx's documented X-Original-URI), not the
    // other spelling.
    for (name, value) in [("X-Original-URI", "/a b"), ("X-Original-Method", "PO ST")] {
        let r = auth(
            &gw,
            &[
                ("Cookie", &cookie),
                (name, value),
                ("Accept", "application/json"),
            ],
        )
        .await;
        assert_eq!(r.status, 403, "{name}: {}", r.head);
        assert!(r.body.contains(name), "the header is named: {}", r.body);
    }
    // A browser's navigation to a guarded page whose address is no safe way back is still sent
    // to the step-up page (a 302 that Traefik and Caddy relay), on to the start page.
    let r = auth(
        &gw,
        &[
            ("Cookie", &cookie),
            ("X-Forwarded-Method", "GET"),
            ("X-Forwarded-Uri", "//lists/3/export"),
            ("Accept", "text/html"),
        ],
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.head);
    assert!(
        r.location().ends_with("/_portcullis/reauth?next=%2F"),
        "{}",
        r.head
    );
    // A rule for GET guards HEAD, which consoles answer with the GET handler.
    let r = c
        .head(gw.url("/reports/download"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "HEAD of a guarded GET");
    // In any letter case (a console that upper-cases the method runs its GET handler for it),
    // here and in forward-auth.
    for method in ["head", "Head"] {
        let r = raw(
            gw.addr,
            method,
            "/reports/download",
            &[("Cookie", &cookie), ("Accept", "application/json")],
            "",
        )
        .await;
        assert_eq!(r.status, 403, "{method}: {}", r.head);
        let r = auth(
            &gw,
            &[
                ("Cookie", &cookie),
                ("X-Forwarded-Method", method),
                ("X-Forwarded-Uri", "/reports/download"),
                ("Accept", "application/json"),
            ],
        )
        .await;
        assert_eq!(r.status, 401, "forward-auth {method}: {}", r.head);
        assert!(r.header("x-portcullis-assertion").is_none());
    }

    // A fresh proof with the authenticator app, and the action goes through.
    let html = gw
        .page(&c, "/_portcullis/reauth?next=%2Flists%2F3%2Fexport")
        .await;
    assert!(
        html.contains("this action needs a recent confirmation"),
        "{html}"
    );
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    // A recovery code is not a confirmation, and the page says what to use instead.
    let r = c
        .post(gw.url("/_portcullis/reauth"))
        .header("accept", "text/html")
        .form(&[
            ("csrf", csrf.as_str()),
            ("code", codes[0].as_str()),
            ("next", "/lists/3/export"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("Recovery codes are for signing in"),
        "a recovery code is told apart"
    );
    gw.clock.advance(30);
    let r = c
        .post(gw.url("/_portcullis/reauth"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("code", gw.totp_now(&secret).as_str()),
            ("next", "/lists/3/export"),
        ])
        .send()
        .await
        .unwrap();
    // To the console address through the "Confirmed" page, which goes on there (and stays, for
    // a download the browser saves in place, rather than leave the step-up form on screen).
    let done = location(&r);
    assert_eq!(done, "/_portcullis/reauth/done?next=%2Flists%2F3%2Fexport");
    let page = gw.page(&c, &done).await;
    assert!(
        page.contains("data-continue=\"/lists/3/export\"")
            && page.contains("<a href=\"/lists/3/export\">Continue</a>"),
        "{page}"
    );
    // Only a same-site address is continued to.
    let page = gw
        .page(
            &c,
            "/_portcullis/reauth/done?next=https%3A%2F%2Fevil.example%2F",
        )
        .await;
    assert!(
        page.contains("data-continue=\"/\"") && !page.contains("evil"),
        "{page}"
    );
    // Without a session it confirms nothing: a browser signs in (and goes on to `next`), an API
    // client gets 401.
    let r = gw.get(&gw.browser(), &done).await;
    assert_eq!(
        location(&r),
        "/_portcullis/login?next=%2Flists%2F3%2Fexport"
    );
    let r = gw.api().get(gw.url(&done)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "authentication_required");
    let r = send_campaign(&gw, &c, "/campaigns/7/send", "application/json").await;
    assert_eq!(r.status(), 200);
    assert_eq!(gw.status(&c, "/lists/3/export").await, 200);
}

/// A rule that wants a security key is not met by a code (keys need a domain name for the
/// gateway: where they are off, such a rule is refused as configuration).
#[tokio::test]
async fn a_rule_for_a_key_is_not_met_by_a_code() {
    let gw = Gateway::start_with(|c| {
        super::webauthn::localhost(c);
        c.step_up = vec![rule("/api-keys/**", &[], true)];
    })
    .await;
    let (c, _, _) = gw.signed_in("keyed@example.com").await;
    let r = gw.get(&c, "/api-keys").await;
    assert_eq!(location(&r), "/_portcullis/reauth?next=%2Fapi-keys&key=1");
    // The page speaks of the console's action, not of a part of the gateway.
    let page = gw
        .page(&c, "/_portcullis/reauth?next=%2Fapi-keys&key=1")
        .await;
    assert!(
        page.contains("This action needs a recent touch of your security key"),
        "{page}"
    );
    let r = c
        .delete(gw.url("/api-keys/9"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// A code sent to the step-up form while a sign-in is under way is refused (a page to sign in
/// first; `401 session_required` as JSON) without ending that sign-in, which then completes
/// with its second factor.
#[tokio::test]
async fn a_step_up_code_during_a_sign_in_leaves_the_sign_in_alone() {
    let gw = Gateway::start().await;
    let email = "pending@example.com";
    let (_, secret, _) = gw.signed_in(email).await;
    gw.clock.advance(30);
    let c = gw.browser();
    let r = gw.password(&c, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let csrf = gw.csrf(&c, "/_portcullis/mfa").await;
    for accept in ["text/html", "application/json"] {
        let r = c
            .post(gw.url("/_portcullis/reauth"))
            .header("accept", accept)
            .form(&[("csrf", csrf.as_str()), ("code", "000000"), ("next", "/")])
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("set-cookie").is_none(), "{accept}");
        if accept == "text/html" {
            assert_eq!(r.status(), 303);
            assert_eq!(location(&r), "/_portcullis/login?next=%2F");
        } else {
            assert_eq!(r.status(), 401);
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["error"], "session_required");
        }
    }
    let r = gw.code(&c, "/_portcullis/mfa", &gw.totp_now(&secret)).await;
    assert_eq!(r.status(), 303, "the sign-in goes on");
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
}

/// Wrong codes to confirm an action, until the session's budget of them runs out: whoever holds
/// the session lacks the second factor. The session ends, on the record, and the owner is
/// mailed once with a "this wasn't me" link.
#[tokio::test]
async fn a_session_that_spends_its_step_up_codes_ends_and_the_owner_hears() {
    let gw = Gateway::start_with(rules).await;
    let email = "guessed@example.com";
    let (c, _, _) = gw.signed_in(email).await;
    gw.clock.advance(6 * 60);
    let html = gw.page(&c, "/_portcullis/reauth?next=%2F").await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    // Sent all at once, they are checked one after another: the others wait their turn (409),
    // none is counted twice or lost.
    let burst = (0..8)
        .map(|_| {
            c.post(gw.url("/_portcullis/reauth"))
                .header("accept", "application/json")
                .form(&[("csrf", csrf.as_str()), ("code", "000000"), ("next", "/")])
        })
        .collect();
    let statuses = super::bad_input::all_at_once(burst).await;
    assert!(statuses.contains(&409), "{statuses:?}");
    let mut errors = Vec::new();
    for _ in 0..8 {
        let r = c
            .post(gw.url("/_portcullis/reauth"))
            .header("accept", "application/json")
            .form(&[("csrf", csrf.as_str()), ("code", "000000"), ("next", "/")])
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status == 303 {
            errors.push("restart".to_string());
            continue;
        }
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        errors.push(v["error"].as_str().unwrap_or_default().to_string());
    }
    assert!(
        errors.iter().any(|e| e == "session_required"),
        "the session ended: {errors:?}"
    );
    assert_eq!(gw.status(&c, "/campaigns").await, 303, "signed out");
    let ended: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "session_ended")
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(ended, ["step_up_codes_exhausted"]);
    // Exactly the session's budget of wrong codes was checked, the burst's among them.
    let checked = gw
        .audit()
        .await
        .iter()
        .filter(|e| e.event == "step_up" && e.reason.as_deref() == Some("bad_code"))
        .count();
    assert_eq!(checked, 5);
    let told: Vec<String> = gw
        .outbox()
        .await
        .into_iter()
        .filter(|m| m.contains("Subject: Wrong codes from a session of your account"))
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].contains("/_portcullis/report?t="), "{}", told[0]);
}

/// The form a browser sent while its proof was stale is held (sealed, for its session), not
/// lost: the step-up page says what will be sent, and after the code the held page sends it
/// through the gate exactly as it was sent, once; the console's answer is the browser's. Another
/// session cannot send or see it, a second send finds it gone, and "Don't send" drops it.
#[tokio::test]
async fn a_form_stopped_for_a_step_up_is_sent_after_the_proof() {
    let gw = Gateway::start_with(rules).await;
    let (c, secret, _) = gw.signed_in("held@example.com").await;
    assert_eq!(gw.status(&c, "/campaigns/7/edit").await, 200);
    let sid = super::webauthn::last_claims(&gw).await.sid;
    gw.clock.advance(6 * 60);
    let before = gw.upstream.count();
    let body = "subject=Hello+%C3%A9&recipients=50000&note=a%26b";
    let r = gw
        .form_from(&c, ("/campaigns/7/send?draft=1", "/campaigns/7/edit"), body)
        .await;
    assert_eq!(r.status(), 303);
    let reauth = location(&r);
    assert_eq!(gw.upstream.count(), before, "held, not forwarded");
    let page = gw.page(&c, &reauth).await;
    assert!(
        page.contains("id=\"held-form\"")
            && page.contains("<code>POST /campaigns/7/send?draft=1</code>"),
        "the step-up page says what it sends: {page}"
    );
    // Its "Cancel" drops the form (a link back would leave it waiting for a proof given later).
    let held_id = reauth.split("id%3D").nth(1).unwrap();
    assert!(
        page.contains(&format!("action=\"/_portcullis/held?id={held_id}\""))
            && page.contains("name=\"drop\"")
            && page.contains(&format!("name=\"id\" value=\"{held_id}\"")),
        "{page}"
    );
    let next = extract(&page, "name=\"next\" value=\"", "\"").unwrap();
    assert!(next.starts_with("/_portcullis/held?id="), "{next}");
    // The held record is sealed: nothing of the form is readable in the store.
    let id = next.split("id=").nth(1).unwrap().to_string();
    let slot = id.split('-').next().unwrap();
    let sealed = gw
        .state
        .ephemeral
        .get(&format!("held:{sid}:{slot}"))
        .await
        .unwrap();
    let sealed = String::from_utf8_lossy(&sealed.expect("held for the session")).into_owned();
    assert!(!sealed.contains("recipients") && !sealed.contains("campaigns"));
    // Another signed-in user's session cannot see or send it.
    let (other, _, _) = gw.signed_in("other@example.com").await;
    assert_eq!(gw.status(&other, &next).await, 410);
    let csrf = gw.csrf(&other, "/_portcullis/account").await;
    let r = gw.send_held(&other, (&id, &csrf), false).await;
    assert_eq!(r.status(), 410);
    assert_eq!(gw.upstream.count(), before);
    // The owner confirms with a code: on to the held page, which sends the form.
    gw.clock.advance(30);
    let code = gw.totp_now(&secret);
    let csrf = extract(&page, "name=\"csrf\" value=\"", "\"").unwrap();
    let r = c
        .post(gw.url("/_portcullis/reauth"))
        .form(&[("code", code.as_str()), ("csrf", &csrf), ("next", &next)])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), next);
    let held = gw.page(&c, &next).await;
    assert!(held.contains("POST /campaigns/7/send") && held.contains("data-autosubmit"));
    let csrf = extract(&held, "name=\"csrf\" value=\"", "\"").unwrap();
    // Sent by the page's script (a fetch says `Sec-Fetch-Dest: empty`): the console is told
    // what the form's own request said, nothing of the sending one's.
    let r = c
        .post(gw.url(&format!("/_portcullis/held?id={id}")))
        .header("sec-fetch-dest", "empty")
        .header("sec-fetch-mode", "cors")
        .form(&[("csrf", csrf.as_str()), ("id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the console's answer");
    assert!(
        r.headers().get("content-security-policy").is_none(),
        "the console's own headers"
    );
    assert_eq!(gw.upstream.count(), before + 1);
    let seen = gw.upstream.last();
    // Where the form came from, as the browser said when it was sent (not the held page).
    assert_eq!(
        seen.header("referer"),
        Some(gw.url("/campaigns/7/edit").as_str())
    );
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/campaigns/7/send?draft=1");
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.header("sec-fetch-dest"), None);
    assert_eq!(seen.header("sec-fetch-mode"), None);
    assert_eq!(
        seen.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    // With the identity of the session, fresh proof and all.
    let claims = super::webauthn::last_claims(&gw).await;
    assert_eq!(claims.amr, vec!["pwd", "otp"]);
    // Sent once: again (a reload, a second click) finds it gone, and says so in those words.
    let r = gw.send_held(&c, (&id, &csrf), false).await;
    assert_eq!(r.status(), 410);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("<title>This form is no longer held")
            && page.contains("does not send it again"),
        "{page}"
    );
    assert_eq!(gw.upstream.count(), before + 1);
    // The browser's Back to the step-up page of the form sent: nothing is left to confirm, so
    // it goes on to the held page, which says the form is gone.
    let held_page = format!("/_portcullis/held?id={id}");
    let q: String = url::form_urlencoded::byte_serialize(held_page.as_bytes()).collect();
    let r = gw.get(&c, &format!("/_portcullis/reauth?next={q}")).await;
    assert_eq!(location(&r), held_page);
    assert_eq!(gw.status(&c, &held_page).await, 410);

    // Sent by a request framed otherwise (chunked): the console gets the held form with its own
    // length, never two framings.
    let next = held_after_stale_proof(&gw, &c, "9", "recipients=9").await;
    let r = super::risk::reauth_with_code(&gw, &c, &secret, &next).await;
    assert_eq!(location(&r), next);
    let held = gw.page(&c, &next).await;
    let csrf = extract(&held, "name=\"csrf\" value=\"", "\"").unwrap();
    let id = next.split("id=").nth(1).unwrap();
    let form = format!("csrf={csrf}&id={id}");
    let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(form))]);
    let r = c
        .post(gw.url("/_portcullis/held"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = gw.upstream.last();
    assert_eq!(seen.uri, "/campaigns/9/send");
    assert_eq!(seen.header("content-length"), Some("12"));
    assert_eq!(seen.header("transfer-encoding"), None);
    assert_eq!(seen.body, b"recipients=9");
    let sent = gw.upstream.count();

    // "Don't send" drops a held form and goes back to its page.
    let next = held_after_stale_proof(&gw, &c, "8", "recipients=1").await;
    let id = next.split("id=").nth(1).unwrap().to_string();
    let csrf = gw.csrf(&c, "/_portcullis/account").await;
    // `drop` is a checkbox: a value that is neither ticked nor not is refused, and the form
    // stays held.
    let r = c
        .post(gw.url("/_portcullis/held"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("id", id.as_str()),
            ("drop", "maybe"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = gw.send_held(&c, (&id, &csrf), true).await;
    assert_eq!(location(&r), "/campaigns/8/edit");
    assert_eq!(gw.status(&c, &next).await, 410);
    assert_eq!(gw.upstream.count(), sent, "dropped, never sent");
}

/// Forms stopped in several tabs of one session are each held, up to four: after one proof,
/// each tab's held page sends its own form; a fifth takes the place of the oldest, whose page
/// then says it is no longer held.
#[tokio::test]
async fn forms_from_several_tabs_are_each_held() {
    let gw = Gateway::start_with(rules).await;
    let (c, secret, _) = gw.signed_in("tabs@example.com").await;
    let elsewhere = gw.sign_in_again("tabs@example.com", &secret).await;
    gw.clock.advance(6 * 60);
    let mut pages = Vec::new();
    for n in 1..=5 {
        let (action, from) = (
            format!("/campaigns/{n}/send"),
            format!("/campaigns/{n}/edit"),
        );
        let body = format!("recipients={n}");
        let r = gw.form_from(&c, (&action, &from), &body).await;
        pages.push(next_of_step_up(&location(&r)));
    }
    let before = gw.upstream.count();
    let r = super::risk::reauth_with_code(&gw, &c, &secret, &pages[4]).await;
    assert_eq!(location(&r), pages[4]);
    // The same code typed again on another tab's step-up page (the app still shows it) is no
    // wrong code: that page goes on with the proof just made, however often it is sent, and
    // the session lives on.
    let code = gw.totp_now(&secret);
    for _ in 0..6 {
        let r = super::risk::reauth_with(&gw, &c, &code, &pages[3]).await;
        assert_eq!(location(&r), pages[3]);
    }
    assert_eq!(gw.status(&c, "/_portcullis/account").await, 200);
    // Another session of the account is not that session: the code is a replay there.
    let r = super::risk::reauth_with(&gw, &elsewhere, &code, "/campaigns").await;
    assert_eq!(r.status(), 401);
    // The oldest made room for the fifth.
    assert_eq!(gw.status(&c, &pages[0]).await, 410);
    for (n, next) in pages.iter().enumerate().skip(1).rev() {
        let held = gw.page(&c, next).await;
        let csrf = extract(&held, "name=\"csrf\" value=\"", "\"").unwrap();
        let id = next.split("id=").nth(1).unwrap();
        let r = gw.send_held(&c, (id, &csrf), false).await;
        assert_eq!(r.status(), 200, "{next}");
        let seen = gw.upstream.last();
        assert_eq!(seen.uri, format!("/campaigns/{}/send", n + 1));
        assert_eq!(seen.body, format!("recipients={}", n + 1).as_bytes());
        // The browser holds a tie cookie per held form: the gateway's own, never the console's.
        let cookies = seen.header("cookie").unwrap_or_default().to_string();
        assert!(!cookies.contains("portcullis-held"), "{cookies}");
    }
    assert!(
        gw.cookies(&c).contains("portcullis-held-"),
        "the browser does hold tie cookies"
    );
    assert_eq!(gw.upstream.count(), before + 4);
}

/// A step-up page left open from a session that has since ended (signed out, and another user
/// signed in in the same browser) checks no code against the session the browser has now: that
/// user's budget of wrong codes is not spent by someone else's page.
#[tokio::test]
async fn a_step_up_page_of_an_ended_session_checks_no_code_against_the_next() {
    let gw = Gateway::start_with(rules).await;
    let (c, _, _) = gw.signed_in("first-user@example.com").await;
    let html = gw.page(&c, "/_portcullis/reauth?next=%2Fcampaigns").await;
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let sid = extract(&html, "name=\"sid\" value=\"", "\"").unwrap();
    super::login::sign_out(&gw, &c).await;
    let (_, secret, _) = gw.signed_in("next-user@example.com").await;
    gw.sign_in_on(&c, "next-user@example.com", &secret).await;
    let send = |csrf: String| {
        c.post(gw.url("/_portcullis/reauth"))
            .form(&[
                ("csrf", csrf.as_str()),
                ("code", "000000"),
                ("next", "/campaigns"),
                ("sid", sid.as_str()),
            ])
            .send()
    };
    // The sign-in renewed the form token: the page's own is refused first.
    assert_eq!(send(csrf).await.unwrap().status(), 403);
    // With a token of now (the page reloaded in part, a script), the session it was for is
    // named.
    let r = send(gw.csrf(&c, "/_portcullis/account").await)
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("session that has since ended"));
    let counted = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "step_up" && e.email.as_deref() == Some("next-user@example.com"))
        .count();
    assert_eq!(
        counted, 0,
        "nothing checked against the next user's session"
    );
}

/// Six minutes on (the proof stale), a form to campaign `n`'s send action is held: the held
/// page's address, from the step-up the browser is sent to.
async fn held_after_stale_proof(gw: &Gateway, c: &Browser, n: &str, body: &str) -> String {
    gw.clock.advance(6 * 60);
    let action = format!("/campaigns/{n}/send");
    let r = gw
        .form_from(c, (&action, &format!("/campaigns/{n}/edit")), body)
        .await;
    next_of_step_up(&location(&r))
}

/// The `next` of a step-up page's address: where the browser goes once it is done.
pub(super) fn next_of_step_up(reauth: &str) -> String {
    let next = reauth.split("next=").nth(1).unwrap();
    percent_encoding::percent_decode_str(next)
        .decode_utf8()
        .unwrap()
        .to_string()
}

/// A copied session cookie alone (malware's copy, another client) can get a form held, but not
/// sent: the form is tied to the browser that sent it (a cookie of its own, and its network and
/// browser), so the owner's browser, lured to the held page or its step-up, even with that
/// cookie planted in it, neither sees what it is nor sends it.
#[tokio::test]
async fn a_form_held_for_a_copied_session_cookie_is_never_sent_by_the_owners_browser() {
    let gw = Gateway::start_with(rules).await;
    let (owner, secret, _) = gw.signed_in("lured@example.com").await;
    gw.clock.advance(6 * 60);
    let session = gw
        .cookies(&owner)
        .split("; ")
        .find(|c| c.starts_with("portcullis-session="))
        .unwrap()
        .to_string();
    let before = gw.upstream.count();
    let r = gw
        .api()
        .post(gw.url("/campaigns/7/send"))
        .header("accept", "text/html")
        .header("cookie", &session)
        .header("user-agent", "ThiefBrowser/1.0")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("recipients=999999&from=thief")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let reauth = location(&r);
    // The cookie that ties the form to its sender, planted in the owner's browser (a site on
    // another port of the same host can set it): still not the browser that sent the form.
    let tie = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("portcullis-held-"))
        .expect("the tie cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    owner
        .jar
        .add_cookie_str(&tie, &gw.url("/").parse::<url::Url>().unwrap());
    let next = reauth.split("next=").nth(1).unwrap();
    let next = percent_encoding::percent_decode_str(next)
        .decode_utf8()
        .unwrap()
        .to_string();
    assert!(next.starts_with("/_portcullis/held?id="), "{next}");
    // The owner's browser, lured to the step-up, is not asked to confirm anything: there is no
    // form of its own to confirm, and the held page it is sent on to tells nothing of the form.
    let r = gw.get(&owner, &reauth).await;
    assert_eq!(location(&r), next);
    let r = gw.get(&owner, &next).await;
    assert_eq!(r.status(), 410);
    let page = r.text().await.unwrap();
    assert!(!page.contains("999999"), "{page}");
    // Confirming all the same, it cannot see or send it.
    let r = super::risk::reauth_with_code(&gw, &owner, &secret, "/campaigns").await;
    assert!(location(&r).contains("campaigns"), "{}", location(&r));
    assert_eq!(gw.status(&owner, &next).await, 410);
    let csrf = gw.csrf(&owner, "/_portcullis/account").await;
    let id = next.split("id=").nth(1).unwrap();
    assert_eq!(gw.send_held(&owner, (id, &csrf), false).await.status(), 410);
    assert_eq!(gw.upstream.count(), before, "nothing sent");
}

/// A form that announces a body larger than can be held is not read to be held (a session could
/// otherwise have the gateway wait for, and keep, whatever it announces): answered at once as a
/// form that cannot be held, and nothing is forwarded.
#[tokio::test]
async fn a_form_announcing_too_large_a_body_is_not_read_to_be_held() {
    let gw = Gateway::start_with(rules).await;
    let (c, _, _) = gw.signed_in("announced@example.com").await;
    gw.clock.advance(6 * 60);
    let before = gw.upstream.count();
    let big = portcullis::http::held::HELD_MAX_BODY * 5;
    let request = format!(
        "POST /campaigns/7/send HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\nAccept: text/html\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {big}\r\n\
         Connection: close\r\n\r\nrecipients=1",
        gw.addr,
        gw.cookies(&c)
    );
    let (status, head) = super::bad_input::send_raw(&gw, &request).await;
    assert_eq!(status, 403, "answered without waiting for the body: {head}");
    assert!(
        !head.to_ascii_lowercase().contains("portcullis-held"),
        "{head}"
    );
    assert_eq!(gw.upstream.count(), before);
}

/// A step-up page whose session has ended meanwhile (ended from the CLI, another gateway) sends
/// the browser to sign in saying so, and on to where the step-up was going: a new sign-in is a
/// fresh proof of its own.
#[tokio::test]
async fn a_step_up_of_an_ended_session_signs_in_on_to_its_next() {
    let gw = Gateway::start_with(rules).await;
    let (c, _, _) = gw.signed_in("ended-step-up@example.com").await;
    let u = gw.user("ended-step-up@example.com").await;
    super::account::ended_elsewhere(&gw, &u.id).await;
    let r = gw.get(&c, "/_portcullis/reauth?next=%2Fcampaigns").await;
    assert_eq!(
        location(&r),
        "/_portcullis/login?next=%2Fcampaigns&notice=session_ended"
    );
    // A browser that never signed in is sent on without a word.
    let r = gw
        .get(&gw.browser(), "/_portcullis/reauth?next=%2Fcampaigns")
        .await;
    assert_eq!(location(&r), "/_portcullis/login?next=%2Fcampaigns");
}
