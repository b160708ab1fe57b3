//! Malformed and hostile input gets a clear 4xx in the client's format — never a 500, a panic or
//! a pass.

use super::harness::*;

#[tokio::test]
async fn malformed_requests_get_clear_client_errors() {
    let gw = Gateway::start().await;
    let long_path = format!("/{}", "a".repeat(9000));
    let huge_cookie = format!("portcullis-session={}", "A".repeat(6000));
    // (method, target, headers, body, acceptable statuses)
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>, String, &'a [u16]);
    let cases: Vec<Case> = vec![
        ("GET", long_path.clone(), vec![], String::new(), &[414]),
        ("GET", "/%zz".into(), vec![], String::new(), &[400]),
        ("GET", "/a%00b".into(), vec![], String::new(), &[400]),
        // The gateway's own paths too, before any id in them is looked up.
        (
            "POST",
            "/_portcullis/account/keys/%00/rename".into(),
            vec![],
            String::new(),
            &[400],
        ),
        (
            "POST",
            "/_portcullis/account/devices/%C3%28/revoke".into(),
            vec![],
            String::new(),
            &[400],
        ),
        (
            "GET",
            "/x".into(),
            vec![("Cookie", huge_cookie)],
            String::new(),
            &[303, 401],
        ),
        (
            "GET",
            "/x".into(),
            vec![("Cookie", "portcullis-session=../../etc".into())],
            String::new(),
            &[303, 401],
        ),
        (
            "GET",
            "/x".into(),
            vec![("Cookie", "portcullis-session".into())],
            String::new(),
            &[303, 401],
        ),
        (
            "GET",
            "/x".into(),
            vec![("Cookie", ";;;=;".into())],
            String::new(),
            &[303, 401],
        ),
        (
            "POST",
            "/_portcullis/login".into(),
            vec![("Content-Type", "application/x-www-form-urlencoded".into())],
            "username=%ff%fe&password=x&csrf=y".into(),
            &[403],
        ),
        (
            "POST",
            "/_portcullis/login".into(),
            vec![("Content-Type", "application/json".into())],
            "{}".into(),
            &[415],
        ),
        // Media types are case-insensitive: the form is read (and refused for its missing CSRF
        // cookie, not for its type).
        (
            "POST",
            "/_portcullis/login".into(),
            vec![(
                "Content-Type",
                "Application/X-WWW-Form-Urlencoded; Charset=UTF-8".into(),
            )],
            "username=a%40b.example&password=x&csrf=y".into(),
            &[403],
        ),
        (
            "POST",
            "/_portcullis/login".into(),
            vec![("Content-Type", "application/x-www-form-urlencoded".into())],
            format!("username={}", "a".repeat(20_000)),
            &[413],
        ),
        (
            "POST",
            "/_portcullis/mfa".into(),
            vec![("Content-Type", "application/x-www-form-urlencoded".into())],
            "code=1&csrf=".into(),
            &[403],
        ),
        (
            "GET",
            "/_portcullis/static/../../Cargo.toml".into(),
            vec![],
            String::new(),
            &[303, 401, 404],
        ),
        (
            "GET",
            "/_portcullis/static/nope.js".into(),
            vec![],
            String::new(),
            &[404],
        ),
        (
            "DELETE",
            "/_portcullis/login".into(),
            vec![],
            String::new(),
            &[405],
        ),
    ];
    for (method, target, headers, body, want) in &cases {
        for accept in ["application/json", "text/html"] {
            let mut h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            h.push(("Accept", accept));
            let r = raw(gw.addr, method, target, &h, body).await;
            assert!(
                want.contains(&r.status),
                "{method} {} ({accept}) → {} {}",
                &target[..target.len().min(60)],
                r.status,
                &r.body[..r.body.len().min(300)]
            );
            if accept == "text/html" && !matches!(r.status, 303 | 405) {
                assert!(
                    r.header("content-type")
                        .unwrap_or_default()
                        .starts_with("text/html"),
                    "{method} {}: {}",
                    &target[..target.len().min(60)],
                    r.status
                );
            }
            if accept == "application/json" && r.status != 405 {
                assert!(
                    r.header("content-type")
                        .unwrap_or_default()
                        .starts_with("application/json"),
                    "{method} {}: {}",
                    &target[..target.len().min(60)],
                    r.status
                );
            }
        }
    }
    assert_eq!(gw.upstream.count(), 0);
}

#[tokio::test]
async fn wrong_and_truncated_codes_and_unknown_users_are_refused_plainly() {
    let gw = Gateway::start().await;
    let (_c, secret, _) = gw.signed_in("b@example.com").await;
    // Unknown user and wrong password look the same.
    let c = gw.browser();
    let a = gw.password(&c, "nobody@example.com", PASSWORD, "").await;
    let a_status = a.status();
    let a_text = a.text().await.unwrap();
    let b = gw
        .password(&c, "b@example.com", "wrong password!", "")
        .await;
    assert_eq!(a_status, 401);
    assert_eq!(b.status(), 401);
    assert!(a_text.contains("email or password is not right"));
    // The message is tied to the field for screen readers.
    assert!(
        a_text.contains("id=\"form-error\"")
            && a_text.contains("aria-invalid=\"true\" aria-describedby=\"form-error\""),
        "{a_text}"
    );
    assert!(b
        .text()
        .await
        .unwrap()
        .contains("email or password is not right"));
    // Truncated, overlong, non-numeric codes.
    gw.clock.advance(30);
    let r = gw.password(&c, "b@example.com", PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let good = gw.totp_now(&secret);
    for bad in [&good[..5], "1234567", "abcdef", "１２３４５６"] {
        let r = gw.code(&c, "/_portcullis/mfa", bad).await;
        assert_eq!(r.status(), 401, "{bad:?}");
    }
    // (An empty one is no attempt at all.)
    let r = gw.code(&c, "/_portcullis/mfa", "").await;
    assert_eq!(r.status(), 400);
    // The fifth wrong code ends this sign-in: it starts over from the password, and the right
    // code no longer helps.
    let r = gw.code(&c, "/_portcullis/mfa", "1").await;
    assert_eq!(r.status(), 303);
    assert!(
        location(&r).starts_with("/_portcullis/login"),
        "{}",
        location(&r)
    );
    let r = c.get(gw.url("/_portcullis/mfa")).send().await.unwrap();
    assert_eq!(r.status(), 303);

    assert!(
        location(&r).starts_with("/_portcullis/login"),
        "{}",
        location(&r)
    );
}

/// A NUL in a form field (an email typed with `%00`) is bad input, answered 400 before anything
/// is looked up or counted, on PostgreSQL too, whose text columns refuse it: never a 503 that
/// would report the database down, and the audit trail keeps being written.
#[tokio::test]
async fn a_nul_in_a_form_is_bad_input_not_a_store_failure() {
    let (db, durable) = fresh_database().await;
    let gw = Gateway::start_with(move |c| c.storage.durable = durable).await;
    gw.add_user("nul@example.com").await;
    let c = gw.browser();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    for username in [
        "nul%00@example.com",
        "nul@example.com%00",
        "nul\0@example.com",
    ] {
        let body = format!("username={username}&password=x&csrf={csrf}");
        for accept in ["application/json", "text/html"] {
            let r = c
                .post(gw.url("/_portcullis/login"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("accept", accept)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{username:?} {accept}");
            let text = r.text().await.unwrap();
            assert!(text.contains("not allowed (NUL)"), "{text}");
        }
    }
    // A percent sign typed as such is no NUL: an unknown account, refused as usual.
    let r = gw.password(&c, "nul%00@example.com", "x", "").await;
    assert_eq!(r.status(), 401);
    // The account and the audit trail carry on: a wrong password is refused and audited, the
    // right one goes on (to set up its second factor).
    let r = gw
        .password(&c, "nul@example.com", "not the password", "")
        .await;
    assert_eq!(r.status(), 401);
    let r = gw.password(&c, "nul@example.com", PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    let events = gw.audit().await;
    assert!(events.iter().any(|e| e.event == "login_password"
        && e.outcome == "failure"
        && e.email.as_deref() == Some("nul@example.com")));
    drop(gw);
    drop_database(&db).await;
}

/// A request body that breaks off or is malformed on its way through (a bad chunk size, fewer
/// bytes than its `Content-Length`) is the client's error, 400 in our format, not a 502 that
/// would report the console down; the console keeps serving.
#[tokio::test]
async fn a_broken_request_body_is_the_clients_error_not_the_consoles() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("body@example.com").await;
    let cookie = c.cookie_header();
    let head = |framing: &str| {
        format!(
            "POST /upload HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\nAccept: application/json\r\n\
             Connection: close\r\n{framing}\r\n",
            gw.addr
        )
    };
    // A transfer coding besides `chunked` (the chunks would reach the console without it, as
    // a plain body): 501, nothing forwarded.
    let before = gw.upstream.count();
    for framing in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: x-custom , chunked\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let request = head(framing) + "5\r\nhello\r\n0\r\n\r\n";
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let wait = std::time::Duration::from_secs(10);
        let _ = tokio::time::timeout(wait, s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 501"), "{framing:?} → {text}");
        assert!(text.contains("\"error\":\"transfer_coding\""), "{text}");
    }
    assert_eq!(gw.upstream.count(), before, "nothing reached the console");
    let cases = [
        head("Transfer-Encoding: chunked\r\n") + "zz\r\nabc\r\n0\r\n\r\n",
        head("Transfer-Encoding: chunked\r\n") + "FFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n",
        head("Content-Length: 100\r\n") + "abc",
    ];
    for request in cases {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut buf = Vec::new();
        let wait = std::time::Duration::from_secs(10);
        let _ = tokio::time::timeout(wait, s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 400"), "{request:?} → {text}");
        assert!(text.contains("\"error\":\"bad_request\""), "{text}");
        assert!(text.contains("request body"), "{text}");
    }
    let r = gw.get(&c, "/campaigns").await;
    assert_eq!(r.status(), 200);
}

/// A hundred wrong passwords at once: no more than the account's budget are even checked, the
/// rest get 429 — the counter is taken before the password is, so none slip through together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_guesses_cannot_exceed_the_budget() {
    let gw = Gateway::start_with(|c| {
        c.password.max_concurrent_hashes = 4;
        c.password.max_queued_hashes = 200;
    })
    .await;
    gw.add_user("race@example.com").await;
    let browsers: Vec<_> = (0..100).map(|_| gw.browser()).collect();
    let csrfs =
        futures_util::future::join_all(browsers.iter().map(|b| gw.csrf(b, "/_portcullis/login")))
            .await;
    let statuses = all_at_once(
        browsers
            .iter()
            .zip(csrfs)
            .map(|(b, csrf)| gw.login_form(b, &csrf, "race@example.com", "wrong guess 12345", ""))
            .collect(),
    )
    .await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(checked, 10, "exactly the budget is checked: {statuses:?}");
    assert_eq!(throttled, 90, "{statuses:?}");
    let ev = gw.audit().await;
    assert_eq!(
        ev.iter()
            .filter(|e| e.reason.as_deref() == Some("bad_password"))
            .count(),
        10
    );
}

/// Guesses spread over neighbouring addresses (one /24) share a budget.
#[tokio::test]
async fn a_network_shares_one_budget() {
    let gw = Gateway::start_with(|c| {
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.limits.failures_per_ip = 1000;
        c.limits.password_failures_per_account = 1000;
        c.limits.failures_per_network = 5;
    })
    .await;
    let c = gw.browser();
    let guess = |ip: String, email: String| {
        let (c, gw) = (&c, &gw);
        async move {
            let csrf = gw.csrf(c, "/_portcullis/login").await;
            gw.login_form(c, &csrf, &email, "wrong guess 12345", "")
                .header("x-forwarded-for", ip)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for i in 1..=5 {
        assert_eq!(
            guess(format!("203.0.113.{i}"), format!("u{i}@example.com")).await,
            401
        );
    }
    assert_eq!(
        guess("203.0.113.77".into(), "u9@example.com".into()).await,
        429
    );
    assert_eq!(
        guess("198.51.100.7".into(), "u9@example.com".into()).await,
        401,
        "another network has its own budget"
    );
}

#[tokio::test]
async fn password_guessing_is_throttled_per_account() {
    let gw = Gateway::start().await;
    gw.add_user("t@example.com").await;
    let c = gw.browser();
    for _ in 0..10 {
        assert_eq!(
            gw.password(&c, "T@Example.com", "bad guess 123", "")
                .await
                .status(),
            401
        );
    }
    let r = gw.password(&c, "t@example.com", PASSWORD, "").await;
    assert_eq!(
        r.status(),
        429,
        "even the right password waits once the budget is spent"
    );
    assert!(r.headers().contains_key("retry-after"));
    gw.clock.advance(15 * 60 + 1);
    let r = gw.password(&c, "t@example.com", PASSWORD, "").await;
    assert_eq!(r.status(), 303, "the window passed");
}

/// Wrong second-factor codes at once from twenty pending sign-ins of one account: only the
/// account's budget of them is checked; the rest get 429 (or, for a second code of one sign-in
/// while its first is checked, 409). (Counting after checking would let all of them try.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_codes_cannot_exceed_the_budget() {
    let gw = Gateway::start().await;
    let (_, secret, _) = gw.signed_in("codes@example.com").await;
    gw.clock.advance(30);
    let right = gw.totp_now(&secret);
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    let mut posts = Vec::new();
    for _ in 0..20 {
        let c = gw.browser();
        gw.password(&c, "codes@example.com", PASSWORD, "").await;
        let csrf = gw.csrf(&c, "/_portcullis/mfa").await;
        for _ in 0..3 {
            posts.push(
                c.post(gw.url("/_portcullis/mfa"))
                    .form(&[("code", wrong), ("csrf", csrf.as_str())]),
            );
        }
    }
    let statuses = all_at_once(posts).await;
    assert!(
        statuses.iter().all(|s| [401, 409, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    let checked = gw
        .audit()
        .await
        .iter()
        .filter(|e| e.event == "second_factor" && e.outcome == "failure")
        .count();
    assert_eq!(checked, 10, "exactly the account's budget was checked");
}

/// Sends every request at the same instant (behind a barrier); returns the statuses in order.
pub(super) async fn all_at_once(posts: Vec<reqwest::RequestBuilder>) -> Vec<u16> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(posts.len()));
    let tasks: Vec<_> = posts
        .into_iter()
        .map(|post| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                post.send().await.unwrap().status().as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// A gateway address asked with a method it does not take answers 405 with `Allow`, JSON for
/// API clients and a page for browsers, like every other refusal.
#[tokio::test]
async fn a_wrong_method_gets_a_405_that_says_so() {
    let gw = Gateway::start().await;
    for (method, path) in [
        ("PUT", "/_portcullis/login"),
        ("DELETE", "/_portcullis/mfa"),
        ("POST", "/.well-known/jwks.json"),
    ] {
        let r = raw(gw.addr, method, path, &[("Accept", "application/json")], "").await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.head);
        assert!(r.header("allow").is_some(), "{method} {path}: {}", r.head);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect(&r.body);
        assert_eq!(v["error"], "method_not_allowed", "{method} {path}");
        let r = raw(gw.addr, method, path, &[("Accept", "text/html")], "").await;
        assert_eq!(r.status, 405);
        assert!(r
            .header("content-type")
            .unwrap_or_default()
            .starts_with("text/html"));
        assert!(
            r.body.contains("does not take that kind of request"),
            "{}",
            r.body
        );
    }
    // A browser opening an address that only takes forms (the address bar after a refused form,
    // a reload) is sent to the page the form is on; an API client is told 405.
    for (path, page) in [
        ("/_portcullis/account/totp", "/_portcullis/account"),
        (
            "/_portcullis/account/keys/k1/rename",
            "/_portcullis/account",
        ),
    ] {
        let r = raw(gw.addr, "GET", path, &[("Accept", "text/html")], "").await;
        assert_eq!(r.status, 303, "{path}: {}", r.head);
        assert_eq!(r.location(), page, "{path}");
        let r = raw(gw.addr, "GET", path, &[("Accept", "application/json")], "").await;
        assert_eq!(r.status, 405, "{path}: {}", r.head);
    }
    // (The admin console's forms do the same for an admin; to anyone else their addresses
    // answer as every admin address does: `it::admin::admin_addresses_cannot_be_mapped_…`.)
}

/// Gateway pages read by an API client without a session answer `401` JSON with the sign-in URL
/// (as the gate does), not an empty redirect; other redirects carry their target in JSON.
#[tokio::test]
async fn api_clients_get_json_from_pages_that_need_a_session() {
    let gw = Gateway::start().await;
    for path in [
        "/_portcullis/account",
        "/_portcullis/mfa",
        "/_portcullis/enrol/totp",
        "/_portcullis/recovery-codes",
        "/_portcullis/reauth",
    ] {
        let r = raw(gw.addr, "GET", path, &[("Accept", "application/json")], "").await;
        assert_eq!(r.status, 401, "{path}: {}", r.head);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect(&r.body);
        assert_eq!(v["error"], "authentication_required", "{path}");
        let login = v["login"].as_str().unwrap_or_default();
        assert!(login.starts_with("/_portcullis/login"), "{path}: {login}");
        assert_eq!(r.header("location").as_deref(), Some(login), "{path}");
        // A browser is still sent to the page.
        let r = raw(gw.addr, "GET", path, &[("Accept", "text/html")], "").await;
        assert_eq!(r.status, 303, "{path}");
    }
    // q-values are weighed: JSON ranked above pages is an API client, pages ranked at least as
    // high as JSON a browser.
    for (accept, status) in [
        ("application/json;q=0.9, text/html;q=0.8", 401),
        ("text/html;q=0.5, application/problem+json", 401),
        ("application/json;q=0.8, text/html", 303),
        ("text/html, application/json", 303),
    ] {
        let r = raw(
            gw.addr,
            "GET",
            "/_portcullis/account",
            &[("Accept", accept)],
            "",
        )
        .await;
        assert_eq!(r.status, status, "{accept}: {}", r.head);
    }
    // Forms sent without a session, or with one that ran out, are refused the same way: a
    // redirect would read like the step's success.
    let b = gw.browser();
    let c = b.client.clone();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    let session = gw.state.sessions.cookie_name().to_string();
    for path in [
        "/_portcullis/mfa",
        "/_portcullis/enrol/totp",
        "/_portcullis/recovery-codes",
        "/_portcullis/account/totp",
        "/_portcullis/account/recovery-codes",
        "/_portcullis/remembered/skip",
    ] {
        let with_session = format!("{}; {session}=ran-out-or-made-up", gw.cookies(&b));
        for cookie in [None, Some(with_session)] {
            let mut req = c
                .post(gw.url(path))
                .header("Accept", "application/json")
                .form(&[("csrf", csrf.as_str()), ("code", "123456")]);
            if let Some(cookie) = &cookie {
                req = req.header("Cookie", cookie);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{path} {cookie:?}");
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["error"], "authentication_required", "{path}");
        }
        let r = c
            .post(gw.url(path))
            .header("Accept", "text/html")
            .form(&[("csrf", csrf.as_str()), ("code", "123456")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "a browser's {path}");
    }
    // The sign-in page itself is served as before.
    let r = raw(
        gw.addr,
        "GET",
        "/_portcullis/login?next=/campaigns",
        &[("Accept", "application/json")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "the sign-in page itself: {}", r.head);
}

/// A client that opens a connection and sends nothing, sends its request head a byte at a time,
/// or leaves a kept-alive connection idle, has it closed after `server.header_timeout`; a
/// proper request on the same gateway is served meanwhile, and a slow *response* (the console
/// taking its time) is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_and_idle_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw =
        Gateway::start_with(|c| c.server.header_timeout = std::time::Duration::from_secs(1)).await;
    // Closed: the peer reads EOF (or a reset) within a few seconds.
    async fn closed_within(s: &mut tokio::net::TcpStream, secs: u64) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match tokio::time::timeout(left, s.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
    let silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut trickle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = std::time::Instant::now();
    let dripping = tokio::spawn(async move {
        for b in b"GET /campaigns HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n".iter() {
            if trickle.write_all(&[*b]).await.is_err() {
                return (true, trickle);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        (false, trickle)
    });
    // A proper request meanwhile, and a kept-alive connection that then falls idle.
    let mut idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /_portcullis/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut silent = silent;
    assert!(
        closed_within(&mut silent, 5).await,
        "a silent connection stays open"
    );
    assert!(
        closed_within(&mut idle, 5).await,
        "an idle connection stays open"
    );
    let (cut, mut trickle) = dripping.await.unwrap();
    assert!(
        cut || closed_within(&mut trickle, 5).await,
        "a request head sent a byte at a time holds its connection"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // A console that answers slowly keeps its connection: the bound is on the request head.
    let (c, _, _) = gw.signed_in("slow-answer@example.com").await;
    let r = c.get(gw.url("/slow/2500")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// One client address holds at most `server.max_connections_per_address` connections: the next
/// is closed as soon as it is accepted (a client opening connections faster than
/// `server.header_timeout` closes them would otherwise use up the file descriptors), other
/// addresses are served meanwhile, a freed place is taken again, the refusal is counted, and a
/// trusted proxy (a load balancer carrying many clients) is not counted.
#[tokio::test]
async fn connections_per_address_are_capped_but_not_a_trusted_proxys() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn from(source: &str, gw: std::net::SocketAddr) -> tokio::net::TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{source}:0").parse().unwrap()).unwrap();
        s.connect(gw).await.unwrap()
    }
    // Whether a request on `s` is answered (rather than the connection closed unanswered).
    async fn answered(s: &mut tokio::net::TcpStream) -> bool {
        if s.write_all(b"GET /_portcullis/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut head)).await,
            Ok(Ok(_)) if &head == b"HTTP/1.1 200"
        )
    }
    let gw = Gateway::start_with(|c| c.server.max_connections_per_address = 16).await;
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut s = from("127.0.0.1", gw.addr).await;
        assert!(
            answered(&mut s).await,
            "a connection within the bound is refused"
        );
        held.push(s);
    }
    let mut over = from("127.0.0.1", gw.addr).await;
    assert!(!answered(&mut over).await, "a 17th connection is served");
    let mut other = from("127.0.0.2", gw.addr).await;
    assert!(answered(&mut other).await, "another address is refused");
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut s = from("127.0.0.1", gw.addr).await;
        if answered(&mut s).await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a freed place is not given back");
    let text = gw.state.metrics.render(&gw.state.login.hasher).unwrap();
    let refused: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_connections_refused_total "))
        .expect("the refusals are not counted")
        .parse()
        .unwrap();
    assert!(refused >= 1.0, "{refused}");
    drop((held, again, other));

    // A WebSocket tunnel outlives its HTTP connection's task and still counts as the connection
    // it is, until it closes.
    let gw = Gateway::start_with(|c| c.server.max_connections_per_address = 16).await;
    let (c, _, _) = gw.signed_in("tunnels@example.com").await;
    let cookie = gw.cookies(&c);
    drop(c);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut tunnels = Vec::new();
    for _ in 0..16 {
        tunnels.push(super::proxy::open_ws_via(gw.addr, &cookie).await);
    }
    let mut over = from("127.0.0.1", gw.addr).await;
    assert!(
        !answered(&mut over).await,
        "tunnels do not count against the bound"
    );
    drop(tunnels);

    // Behind a load balancer every client's connection comes from it: not counted.
    let gw = Gateway::start_with(|c| {
        c.server.max_connections_per_address = 16;
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let mut held = Vec::new();
    for i in 0..24 {
        let mut s = from("127.0.0.1", gw.addr).await;
        assert!(
            answered(&mut s).await,
            "a trusted proxy's connection {i} is refused"
        );
        held.push(s);
    }
}

/// A request body that stops arriving is refused with 408 once it has paused for
/// `server.body_timeout`, on a gateway form and on its way to the console (where it is the
/// client's fault, not the console's 504); a body announced larger than any gateway form is
/// refused with 413 before the client is asked for it (no `100 Continue`).
#[tokio::test]
async fn stalled_and_oversized_bodies_are_refused_early() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw =
        Gateway::start_with(|c| c.server.body_timeout = std::time::Duration::from_secs(1)).await;
    let (c, _, _) = gw.signed_in("stall@example.com").await;
    let cookie = gw.cookies(&c);
    // The answer's status line, read within `secs` seconds.
    async fn status_within(s: &mut tokio::net::TcpStream, secs: u64) -> String {
        let mut head = vec![0u8; 12];
        tokio::time::timeout(
            std::time::Duration::from_secs(secs),
            s.read_exact(&mut head),
        )
        .await
        .expect("an answer in time")
        .unwrap();
        String::from_utf8_lossy(&head).into_owned()
    }
    for (path, what) in [
        ("/_portcullis/login", "a form"),
        ("/campaigns", "the console"),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nAccept: application/json\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nusername=a"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(status_within(&mut s, 10).await, "HTTP/1.1 408", "{what}");
    }
    let metrics = gw.state.metrics.render(&gw.state.login.hasher).unwrap();
    assert!(
        !metrics.contains("outcome=\"unavailable\"} 1"),
        "a client's stalled body is not the console's trouble: {metrics}"
    );

    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /_portcullis/login HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\
          Expect: 100-continue\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status_within(&mut s, 5).await, "HTTP/1.1 413");
}

/// A sign-in form missing its password (or address), or a second-factor form missing its code,
/// is bad input said as such (400), not a failed attempt: nothing is audited as a guess and no
/// budget is spent.
#[tokio::test]
async fn forms_missing_their_secret_are_not_attempts() {
    let gw = Gateway::start().await;
    let (_, _, _) = gw.signed_in("empty@example.com").await;
    let failures = |ev: Vec<portcullis::store::AuditEvent>| {
        ev.iter()
            .filter(|e| e.outcome == "failure" || e.outcome == "denied")
            .count()
    };
    let before = failures(gw.audit().await);
    for (email, password) in [("empty@example.com", ""), ("", PASSWORD), ("  ", "x")] {
        for accept in ["application/json", "text/html"] {
            let c = gw.browser();
            let csrf = gw.csrf(&c, "/_portcullis/login").await;
            let r = gw
                .login_form(&c, &csrf, email, password, "")
                .header("accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{email:?} {accept}");
            let body = r.text().await.unwrap();
            assert!(
                body.contains("Enter your email address and your password"),
                "{body}"
            );
            assert_eq!(accept == "application/json", body.contains("invalid_input"));
        }
    }
    let c = gw.browser();
    gw.password(&c, "empty@example.com", PASSWORD, "").await;
    let r = gw.code(&c, "/_portcullis/mfa", " ").await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("Enter the code"));
    // A step-up and a first enrolment's app step alike.
    let (signed_in, _, _) = gw.signed_in("empty-reauth@example.com").await;
    let csrf = gw.csrf(&signed_in, "/_portcullis/reauth").await;
    let r = signed_in
        .post(gw.url("/_portcullis/reauth"))
        .form(&[("csrf", csrf.as_str()), ("code", ""), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    gw.add_user("empty-enrol@example.com").await;
    let enrolling = gw.browser();
    gw.password(&enrolling, "empty-enrol@example.com", PASSWORD, "")
        .await;
    let r = gw.code(&enrolling, "/_portcullis/enrol/totp", "").await;
    assert_eq!(r.status(), 400);
    assert_eq!(failures(gw.audit().await), before);
}

/// Sends `request` as it is on a new connection; the status of the answer and its head.
pub(super) async fn send_raw(gw: &Gateway, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string();
    (status, head)
}

/// An HTTP/1.1 request names its host once (RFC 9112 §3.2): none or two is a 400 before
/// anything else, for the gateway's pages and the console's paths alike, signed in or not.
#[tokio::test]
async fn a_request_without_one_host_is_refused() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("host@example.com").await;
    let cookie = gw.cookies(&c);
    let before = gw.upstream.requests().len();
    for target in ["/campaigns", "/_portcullis/login"] {
        for hosts in ["", "Host: a.example\r\nHost: b.example\r\n"] {
            let (status, head) = send_raw(
                &gw,
                &format!(
                    "GET {target} HTTP/1.1\r\n{hosts}Cookie: {cookie}\r\nConnection: close\r\n\r\n"
                ),
            )
            .await;
            assert_eq!(status, 400, "{target} with {hosts:?}: {head}");
        }
    }
    assert_eq!(gw.upstream.requests().len(), before, "reached the console");
    // HTTP/1.0 may leave it out.
    let (status, head) = send_raw(
        &gw,
        &format!("GET /campaigns HTTP/1.0\r\nCookie: {cookie}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
}

/// `CONNECT` and `TRACE` are never forwarded: a 405 that says which methods are.
#[tokio::test]
async fn connect_and_trace_get_a_405_with_allow() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("trace@example.com").await;
    let cookie = gw.cookies(&c);
    for method in ["TRACE", "CONNECT", "trace", "TRACK", "Track"] {
        let target = if method.eq_ignore_ascii_case("CONNECT") {
            "example.com:443"
        } else {
            "/campaigns"
        };
        let r = raw(
            gw.addr,
            method,
            target,
            &[("Cookie", &cookie), ("Accept", "application/json")],
            "",
        )
        .await;
        if method.eq_ignore_ascii_case("CONNECT") && r.status == 400 {
            continue; // authority-form: not a path the gateway serves at all
        }
        assert_eq!(r.status, 405, "{method}: {}", r.head);
        assert_eq!(
            r.header("allow").as_deref(),
            Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            "{method}"
        );
        assert!(r.body.contains("method_not_allowed"), "{}", r.body);
    }
    // Without a session too: the method is what is refused, not the caller.
    for method in ["TRACE", "track"] {
        let r = raw(
            gw.addr,
            method,
            "/campaigns",
            &[("Accept", "application/json")],
            "",
        )
        .await;
        assert_eq!(r.status, 405, "{method}: {}", r.head);
        assert!(r.header("allow").is_some(), "{method}: {}", r.head);
    }
}

/// A request head is bounded at 64 KiB (a thousand connections each holding hyper's default of
/// about 400 KiB open took half a gigabyte): a larger one gets 431; a large but ordinary head
/// (a 32 KiB cookie) is served.
#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let gw = Gateway::start().await;
    let pad = "a".repeat(100 * 1024);
    let (status, head) = send_raw(
        &gw,
        &format!("GET /campaigns HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 431, "{head}");
    let (c, _, _) = gw.signed_in("bigcookie@example.com").await;
    let cookie = format!("{}; prefs={}", gw.cookies(&c), "b".repeat(32 * 1024));
    let (status, head) = send_raw(
        &gw,
        &format!(
            "GET /campaigns HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
            gw.addr
        ),
    )
    .await;
    assert_eq!(status, 200, "{head}");
}

/// A gateway page that answers before the request's body is read (a refusal of its CSRF token,
/// a body too large) closes the connection, and its answer says so (RFC 9112 §9.6), so a
/// client that keeps the connection for its next request is not left with a dead one. A page
/// that reads the body keeps the connection open.
#[tokio::test]
async fn an_answer_before_the_body_is_read_says_the_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start().await;
    let answer_to = |head: String| async move {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        // The body is not sent yet: the answer comes without it.
        let mut buf = vec![0u8; 4096];
        let wait = std::time::Duration::from_secs(10);
        let n = tokio::time::timeout(wait, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase()
    };
    let host = gw.addr;
    for (head, status) in [
        (
            format!(
                "POST /_portcullis/bind/challenge HTTP/1.1\r\nHost: {host}\r\n\
                 Content-Type: application/json\r\nContent-Length: 13\r\n\r\n"
            ),
            "403",
        ),
        (
            format!(
                "POST /_portcullis/login HTTP/1.1\r\nHost: {host}\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n"
            ),
            "413",
        ),
    ] {
        let text = answer_to(head).await;
        assert!(text.starts_with(&format!("http/1.1 {status}")), "{text}");
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    }
    // A page that answers gladly leaves the connection as it was, whether it had a body to
    // read or one it took no interest in (the server drains what the client sent).
    for body in ["", "hello"] {
        let text = answer_to(format!(
            "GET /_portcullis/login HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        assert!(
            text.starts_with("http/1.1 200") && !text.contains("connection: close"),
            "{text}"
        );
    }
}
