//! The invariant: a correct password alone never reaches the console — by any method, path
//! spelling, websocket, or between the password and the second factor.

use super::harness::*;

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Spellings of console paths, and of the gateway's namespace, that must never slip through.
const PATHS: &[&str] = &[
    "/",
    "/campaigns",
    "//campaigns",
    "/./campaigns",
    "/%2e/campaigns",
    "/%2e%2e/campaigns",
    "/a/../campaigns",
    "/_portcullis/../campaigns",
    "/_portcullis/%2e%2e/campaigns",
    "/_portcullis/..%2fcampaigns",
    "/_PORTCULLIS/login/../../campaigns",
    "/_PORTCULLIS/",
    "/_Portcullis/login",
    "/_portcullis",
    "/_portcullis/nope",
    "/campaigns%2fsend",
    "/campaigns;jsessionid=x",
    "/api/keys?x=1",
    "/.well-known/jwks.json/../../campaigns",
    "/%61pi/keys",
];

/// Every method × every spelling, sent raw, with the given cookie (if any), as a browser and as
/// an API client.
async fn assert_no_access(gw: &Gateway, cookie: Option<&str>, label: &str) {
    for path in PATHS {
        for m in METHODS {
            for accept in ["text/html", "application/json"] {
                let mut h = vec![("Accept", accept)];
                if let Some(c) = cookie {
                    h.push(("Cookie", c));
                }
                let r = raw(gw.addr, m, path, &h, "x=1").await;
                assert!(
                    matches!(r.status, 303 | 401 | 404),
                    "{label}: {m} {path} ({accept}) → {}",
                    r.status
                );
                if r.status == 401 {
                    assert!(r.header("www-authenticate").is_some(), "{m} {path}");
                    if *m != "HEAD" {
                        assert!(
                            r.body.contains("authentication_required"),
                            "{m} {path}: {}",
                            r.body
                        );
                    }
                }
                if r.status == 303 {
                    assert_eq!(
                        accept, "text/html",
                        "{m} {path}: only browsers are redirected"
                    );
                    assert!(r
                        .header("location")
                        .unwrap()
                        .starts_with("/_portcullis/login"));
                }
            }
        }
    }
    assert_eq!(gw.upstream.count(), 0, "{label}: the console saw a request");
}

#[tokio::test]
async fn nothing_passes_without_a_session() {
    let gw = Gateway::start().await;
    assert_no_access(&gw, None, "anonymous").await;
    assert_no_access(
        &gw,
        Some("portcullis-session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        "made-up cookie",
    )
    .await;
    let r = gw.api().get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = gw.browser().get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(r.status(), 303);
}

#[tokio::test]
async fn password_alone_reaches_nothing_during_enrolment_or_second_factor() {
    let gw = Gateway::start().await;
    // A user with no second factor yet: stuck in enrolment.
    gw.add_user("new@example.com").await;
    let c = gw.browser();
    let r = gw.password(&c, "new@example.com", PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let cookie = session_cookie(&r);
    assert_no_access(&gw, Some(&cookie), "enrolling").await;
    // An enrolled user between the password and the code.
    let (_, secret, _) = gw.signed_in("enrolled@example.com").await;
    let before = gw.upstream.count();
    let _ = secret;
    let c = gw.browser();
    let r = gw.password(&c, "enrolled@example.com", PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let cookie = session_cookie(&r);
    for path in PATHS {
        for m in METHODS {
            let r = raw(
                gw.addr,
                m,
                path,
                &[("Cookie", &cookie), ("Accept", "text/html")],
                "",
            )
            .await;
            assert!(matches!(r.status, 303 | 404), "{m} {path} → {}", r.status);
        }
    }
    assert_eq!(gw.upstream.count(), before);
    let ev = gw.audit().await;
    assert!(ev
        .iter()
        .any(|e| e.event == "proxy_denied"
            && e.reason.as_deref() == Some("second_factor_incomplete")));
    // The half-signed-in session's refusals, again and again: its first row and one summary.
    let denied: Vec<_> = ev
        .iter()
        .filter(|e| e.event == "proxy_denied" && e.email.as_deref() == Some("enrolled@example.com"))
        .collect();
    assert_eq!(denied.len(), 2, "{denied:#?}");
    assert_eq!(denied[0].times, 1);
    assert!(denied[1].times > 1, "{denied:#?}");
}

#[tokio::test]
async fn websocket_upgrade_needs_a_complete_session() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let gw = Gateway::start().await;
    gw.add_user("ws@example.com").await;
    let c = gw.browser();
    let r = gw.password(&c, "ws@example.com", PASSWORD, "").await;
    let cookie = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    for cookie in [None, Some(cookie)] {
        let mut req = format!("ws://{}/ws", gw.addr)
            .into_client_request()
            .unwrap();
        if let Some(c) = &cookie {
            req.headers_mut().insert("cookie", c.parse().unwrap());
        }
        let err = tokio_tungstenite::connect_async(req)
            .await
            .expect_err("upgrade refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn complete_session_reaches_canonical_paths_only() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("full@example.com").await;
    let cookie = gw.cookies(&c);
    for (raw_path, want) in [
        ("/a/../campaigns", "/campaigns"),
        ("//campaigns", "/campaigns"),
        ("/%2e%2e/campaigns?x=1", "/campaigns?x=1"),
        ("/_portcullis/../campaigns", "/campaigns"),
        ("/%61pi/keys", "/api/keys"),
        // Raw UTF-8 in the request line reaches the console as the same bytes, escaped.
        ("/caf\u{e9}", "/caf%C3%A9"),
    ] {
        let r = raw(gw.addr, "GET", raw_path, &[("Cookie", &cookie)], "").await;
        assert_eq!(r.status, 200, "{raw_path}");
        assert_eq!(gw.upstream.last().uri, want, "{raw_path}");
    }
    for raw_path in [
        "/_PORTCULLIS/login",
        "/_portcullis/nope",
        "/x/../_portcullis/login/..",
        "/_portcullis%2f../x",
        // As a server behind the gateway may read them: a backslash as a slash, `;` parameters
        // dropped, escapes decoded twice.
        "/_portcullis\\admin",
        "/\\_portcullis/admin",
        "/%5C_portcullis/admin",
        "/%2F_portcullis/admin",
        "/x/..;/_portcullis/admin",
        "/;/_portcullis/x",
        "/_portcullis%3Badmin",
        "/%255Fportcullis/admin",
        // Trailing dots and spaces, which Windows servers drop from a segment.
        "/_portcullis./login",
        "/_portcullis..;/login",
        "/_portcullis%20/login",
        "/_portcullis%2e/login",
    ] {
        let before = gw.upstream.count();
        let r = raw(gw.addr, "GET", raw_path, &[("Cookie", &cookie)], "").await;
        assert!(matches!(r.status, 404 | 400), "{raw_path} → {}", r.status);
        assert_eq!(
            gw.upstream.count(),
            before,
            "{raw_path} must not be forwarded"
        );
    }
}
