//! What crosses the proxy: identity headers, the gateway's cookies, X-Forwarded-*, bodies,
//! websockets, and upstream failures.

use super::harness::*;
use futures_util::{SinkExt, StreamExt};

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_console() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("h@example.com").await;
    let cookie = gw.cookies(&c);
    let spoofed = [
        "X-JWT-Assertion",
        "X-Kong-Jwt-Claim-Sub",
        "X-Endpoint-API-UserInfo",
        "Eppn",
        "Shib-Identity-Provider",
        "Mellon-NameID",
        "X-Hasura-User-Id",
        "X-Principal",
        "X-Username",
        "X-Identity",
        "X-Auth-Subject",
        "X-Roles",
        "X-Groups",
        "Client-Ip",
        "X-Envoy-External-Address",
        "X-Original-Forwarded-For",
        "Front-End-Https",
        "X-Url-Scheme",
        "X-Host",
        "X-Portcullis-Assertion",
        "x_portcullis_assertion",
        "X-Forwarded-User",
        "X_Forwarded_User",
        "x-forwarded-email",
        "X-Remote-User",
        "Remote-User",
        "remote_user",
        "X-Auth-Request-User",
        "X-Original-URL",
        "X-Forwarded-Uri",
        "X-Portcullis-Admin",
        // Every other X-Forwarded-*, identities of other proxies, client addresses as CDNs pass
        // them, and method overrides.
        "X-Forwarded-Method",
        "X-Forwarded-Port",
        "X-Forwarded-Server",
        "X-Forwarded-Ssl",
        "X-Forwarded-Scheme",
        "X-Forwarded-Path",
        "X-Forwarded-Client-Cert",
        "X-Forwarded-Access-Token",
        "X-Forwarded-Roles",
        "X-Auth-User",
        "X-Authenticated-User",
        "X-Authenticated-Userid",
        "X-Webauth-User",
        "X-Userinfo",
        "X-Id-Token",
        "X-User-Id",
        "X-Amzn-Oidc-Identity",
        "X-Amzn-Oidc-Data",
        "X-Ms-Client-Principal-Name",
        "X-Goog-Authenticated-User-Email",
        "Cf-Access-Authenticated-User-Email",
        "CF-Connecting-IP",
        "True-Client-IP",
        "X-Client-IP",
        "X-HTTP-Method-Override",
        "Http-Method-Override",
        "X-Method",
        "X-Original-Http-Method",
        "_method",
        "Method-Override",
        "X-Override-Method",
        "X-Request-Method",
        // Another base path or path, and Next.js's subrequest marker.
        "X-Script-Name",
        "Script-Name",
        "Request-Uri",
        "X-Override-URL",
        "X-Middleware-Subrequest",
        // Whole families, by their proxy's prefix.
        "X-Auth-Request-Groups",
        "X-Auth-Request-Preferred-Username",
        "X-Remote-Email",
        "X-Remote-Groups",
        "X-Proxy-User",
        "X-Webauth-Email",
        "X-Pomerium-Jwt-Assertion",
        "X-Pomerium-Claim-Email",
        "Tailscale-User-Login",
        "Tailscale-User-Name",
        "X-Ms-Token-Aad-Access-Token",
        "X-Goog-Iap-Jwt-Assertion",
        "Cf-Access-Client-Id",
        "Remote-Email",
        "Remote-Groups",
        "X-Authentik-Username",
        "X-Vouch-User",
        "OIDC-Claim-Email",
        "X-Oidc-Email",
        "X-Consumer-Username",
        "X-Credential-Username",
        "X-Apigateway-Api-Userinfo",
        "X-Ssl-Client-S-Dn",
        "Ssl-Client-Verify",
        "X-Client-Cert",
        "X-Arr-ClientCert",
        "Impersonate-User",
        "X-Impersonate-User",
        "X-Sudo-User",
        "X-Real-User",
        "X-Auth-Email",
        "X-Envoy-Original-Path",
        "X-Azure-ClientIP",
        "Akamai-Client-IP",
        "X-Appengine-User-Email",
        "Gap-Auth",
        "Auth-User",
        // Client addresses, schemes, client certificates and claims of a proof, as other
        // platforms pass them.
        "X-Originating-IP",
        "X-ProxyUser-Ip",
        "X-Original-Remote-Addr",
        "Forwarded-For",
        "X-Custom-IP-Authorization",
        "X-Azure-SocketIP",
        "Fly-Client-IP",
        "X-Vercel-Forwarded-For",
        "Cloudfront-Viewer-Address",
        "X-Scheme",
        "X-ARR-SSL",
        "Cloudfront-Forwarded-Proto",
        "X-Client-Scheme",
        "X-SSL-Cert",
        "X-Client-Dn",
        "X-Client-Cn",
        "Proxy-Remote-User",
        "X-Iap-User",
        "X-Admin",
        "X-Role",
        "X-Amr",
        "X-Acr",
        "X-Auth-Time",
        "X-Mfa",
        "X-Step-Up",
        "X-Sid",
    ];
    // Two requests: one would pass hyper's limit of 100 header fields.
    let (first, second) = spoofed.split_at(spoofed.len() / 2);
    let r = raw(
        gw.addr,
        "GET",
        "/campaigns",
        &second
            .iter()
            .map(|h| (*h, "admin@esp.example"))
            .chain([("Cookie", cookie.as_str())])
            .collect::<Vec<_>>(),
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    for (k, v) in &gw.upstream.last().headers {
        assert!(!v.contains("admin@esp.example"), "{k} leaked");
    }
    let mut headers: Vec<(&str, &str)> = first.iter().map(|h| (*h, "admin@esp.example")).collect();
    headers.push(("Cookie", &cookie));
    headers.push(("X-Forwarded-For", "6.6.6.6"));
    headers.push(("X-Forwarded-Host", "evil.example"));
    headers.push(("X-Forwarded-Proto", "gopher"));
    headers.push(("Connection", "close, X-Hop"));
    headers.push(("X-Hop", "should-go"));
    let r = raw(gw.addr, "GET", "/campaigns", &headers, "").await;
    assert_eq!(r.status, 200);
    let seen = gw.upstream.last();
    for (k, v) in &seen.headers {
        assert!(!v.contains("admin@esp.example"), "{k} leaked");
    }
    assert_eq!(
        seen.headers_named("x-portcullis-assertion").len(),
        1,
        "exactly our token"
    );
    assert!(seen
        .header("x-portcullis-assertion")
        .unwrap()
        .starts_with("ey"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(gw.addr.to_string().as_str())
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert!(
        seen.header("x-hop").is_none(),
        "headers named in Connection are hop-by-hop"
    );
}

/// A second session cookie of the same name (another site of the domain can set one over plain
/// HTTP, for a parent domain or a narrower path, and the browser sends it first) neither signs
/// the user out nor stands in for the session: the live one is found, nothing is cleared.
#[tokio::test]
async fn a_planted_session_cookie_does_not_sign_the_user_out() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("toss@example.com").await;
    let jar = c.cookie_header();
    let bogus = "portcullis-session=planted-by-a-sibling-site";
    for cookie in [format!("{bogus}; {jar}"), format!("{jar}; {bogus}")] {
        for path in ["/campaigns", "/_portcullis/account"] {
            let r = raw(gw.addr, "GET", path, &[("Cookie", &cookie)], "").await;
            assert_eq!(r.status, 200, "{path} with {cookie}: {}", r.head);
            assert!(
                !r.head
                    .to_ascii_lowercase()
                    .contains("set-cookie: portcullis-session="),
                "{}",
                r.head
            );
        }
    }
    // Planted cookies alone are no session.
    let r = raw(
        gw.addr,
        "GET",
        "/campaigns",
        &[("Cookie", bogus), ("Accept", "application/json")],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
}

/// A console page that says nothing of framing may be framed by its own origin only: another
/// origin of the same site (a sibling subdomain, to which the session's `SameSite=Lax` cookie
/// goes) cannot frame the signed-in console and have its buttons clicked. A console that says
/// for itself (`X-Frame-Options`, or `frame-ancestors` in its CSP) is left as it says.
#[tokio::test]
async fn console_pages_that_say_nothing_of_framing_are_framed_by_their_own_origin_only() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("frames@example.com").await;
    let framing = |path: &'static str| {
        let (gw, c) = (&gw, &c);
        async move {
            let r = gw.get(c, path).await;
            assert_eq!(r.status(), 200, "{path}");
            let h = r.headers();
            let xfo = h
                .get("x-frame-options")
                .map(|v| v.to_str().unwrap().to_string());
            let csp: Vec<String> = h
                .get_all("content-security-policy")
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            (xfo, csp)
        }
    };
    for path in ["/campaigns", "/framing/none"] {
        let (xfo, _) = framing(path).await;
        assert_eq!(xfo.as_deref(), Some("SAMEORIGIN"), "{path}");
    }
    let (xfo, _) = framing("/framing/xfo").await;
    assert_eq!(
        xfo.as_deref(),
        Some("DENY"),
        "the console's own answer stays"
    );
    let (xfo, csp) = framing("/framing/csp").await;
    assert_eq!(xfo, None, "the console's frame-ancestors decides");
    assert_eq!(
        csp,
        ["default-src 'self'; Frame-Ancestors https://partner.example"]
    );
}

#[tokio::test]
async fn gateway_cookies_and_session_binding_stay_at_the_gateway_and_console_cookies_pass() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("k@example.com").await;
    let cookie = format!("{}; console_pref=dark; other=1", gw.cookies(&c));
    let r = raw(gw.addr, "GET", "/cookies", &[("Cookie", &cookie)], "").await;
    assert_eq!(r.status, 201, "status relayed");
    let set: Vec<&str> = r
        .head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .collect();
    assert_eq!(set.len(), 2, "both Set-Cookie headers relayed: {}", r.head);
    assert_eq!(
        r.header("cache-control").as_deref(),
        Some("private, max-age=10")
    );
    let head = r.head.to_ascii_lowercase();
    assert!(
        !head.contains("session-registration")
            && !head.contains("session-challenge")
            && !head.contains("leaked.token"),
        "the console's session-binding or identity headers relayed: {}",
        r.head
    );
    let seen = gw.upstream.last();
    let sent = seen.headers_named("cookie").join("; ");
    assert!(
        sent.contains("console_pref=dark") && sent.contains("other=1"),
        "{sent}"
    );
    assert!(!sent.contains("portcullis"), "{sent}");
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("big@example.com").await;
    const SIZE: u64 = 1 << 30; // 1 GiB each way
    let before = peak_rss_kib();
    let chunk = bytes::Bytes::from(vec![b'u'; 256 * 1024]);
    let stream = futures_util::stream::iter(
        (0..SIZE / chunk.len() as u64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let r = c
        .post(gw.url("/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(gw.upstream.last().body_len, SIZE);
    let r = c
        .get(gw.url(&format!("/download/{SIZE}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = 0u64;
    let mut body = r.bytes_stream();
    while let Some(b) = body.next().await {
        got += b.unwrap().len() as u64;
    }
    assert_eq!(got, SIZE);
    let grew_mib = (peak_rss_kib() - before) / 1024;
    assert!(
        grew_mib < 256,
        "peak memory grew by {grew_mib} MiB while moving 2 GiB: bodies are being buffered"
    );
}

fn peak_rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn websockets_are_relayed_for_a_complete_session() {
    use tokio_tungstenite::tungstenite::Message;
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("w@example.com").await;
    let mut ws = open_ws(&gw, &c).await;
    for text in ["hello", "second message"] {
        ws.send(Message::text(text)).await.unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), text);
    }
}

/// A page of another origin (a sibling subdomain shares the site's cookies) cannot open a
/// socket to the console with the user's session: the handshake is refused before it is
/// forwarded. The console's own pages, and clients that send no `Origin`, can.
#[tokio::test]
async fn a_websocket_from_another_origin_is_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("wo@example.com").await;
    let own = gw.base.trim_end_matches('/').to_string();
    for (origin, allowed) in [
        ("http://evil.example", false),
        ("http://console.127.0.0.1.nip.io", false),
        ("null", false),
        (own.as_str(), true),
        // Not a browser: no ambient cookies of the user, nothing to refuse.
        ("none", true),
    ] {
        let mut req = format!("ws://{}/ws", gw.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("cookie", gw.cookies(&c).parse().unwrap());
        req.headers_mut().insert("origin", origin.parse().unwrap());
        if origin == "none" {
            req.headers_mut().remove("origin");
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((_, resp)) => assert!(allowed, "{origin}: {}", resp.status()),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert!(!allowed, "{origin}: {}", resp.status());
                assert_eq!(resp.status(), 403);
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
                assert!(body.contains("cross_origin"), "{body}");
            }
            Err(e) => panic!("{origin}: {e}"),
        }
    }
}

/// Opens a WebSocket through the gateway with `c`'s cookies and checks one echo.
pub(super) async fn open_ws(
    gw: &Gateway,
    c: &Browser,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    open_ws_via(gw.addr, &gw.cookies(c)).await
}

/// Opens a WebSocket to the console's echo through `addr` (the gateway, or a proxy in front)
/// with `cookie`, and checks one echo.
pub(super) async fn open_ws_via(
    addr: std::net::SocketAddr,
    cookie: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("ping")).await.unwrap();
    let got = ws.next().await.unwrap().unwrap();
    assert_eq!(got.into_text().unwrap().as_str(), "ping");
    ws
}

/// Whether the socket is closed by the other side within `limit` (messages before that are
/// skipped).
pub(super) async fn closed_within(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    limit: std::time::Duration,
) -> bool {
    use tokio_tungstenite::tungstenite::Message;
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A WebSocket lasts no longer than the session it was opened under: signing out, or the user
/// being disabled, closes it within a couple of seconds; while the session lives it stays open.
#[tokio::test]
async fn a_websocket_closes_when_its_session_ends() {
    use tokio_tungstenite::tungstenite::Message;
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("ws-end@example.com").await;
    let mut ws = open_ws(&gw, &c).await;
    // Several checks of the session go by: still open and working.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    ws.send(Message::text("still here")).await.unwrap();
    let got = ws.next().await.unwrap().unwrap();
    assert_eq!(got.into_text().unwrap().as_str(), "still here");
    super::login::sign_out(&gw, &c).await;
    assert!(
        closed_within(&mut ws, std::time::Duration::from_secs(5)).await,
        "signing out closes the websocket"
    );

    let (c, _, _) = gw.signed_in("ws-disabled@example.com").await;
    let mut ws = open_ws(&gw, &c).await;
    let user = gw.user("ws-disabled@example.com").await;
    gw.state
        .durable
        .set_disabled(
            &user.id,
            true,
            portcullis::clock::Clock::now_millis(&gw.clock),
        )
        .await
        .unwrap();
    // (As from another process: the gate's copy of the user is at most a second old.)
    gw.clock.advance(2);
    assert!(
        closed_within(&mut ws, std::time::Duration::from_secs(5)).await,
        "disabling the user closes the websocket"
    );
}

#[tokio::test]
async fn upstream_down_is_a_clear_502_never_a_bypass() {
    let gw = Gateway::start_with(|c| {
        // A port nothing listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        c.upstream.url = url::Url::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap();
    })
    .await;
    let (c, _, _) = gw.signed_in("d@example.com").await;
    let r = c.get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_hardened(r.headers(), "502");
    let page = r.text().await.unwrap();
    assert!(page.contains("cannot be reached"));
    // Signed in already: the page offers to try again, not to sign in.
    assert!(
        page.contains(r#"<a href="/">Try again</a>"#) && !page.contains("Go to sign-in"),
        "{page}"
    );
    let r = gw.api().get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(r.status(), 401, "still gated");
}

#[tokio::test]
async fn slow_upstream_is_a_504() {
    // An upstream that accepts and never answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let gw = Gateway::start_with(|c| {
        c.upstream.url = url::Url::parse(&format!("http://{addr}/")).unwrap();
        c.upstream.response_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let (c, _, _) = gw.signed_in("slow@example.com").await;
    let r = c
        .get(gw.url("/x"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");
}

/// A body sent slowly but steadily for longer than `upstream.response_timeout`: the console's
/// time to answer counts from the end of the body, so the upload goes through; a console slow to
/// answer after that still gets its 504.
#[tokio::test]
async fn an_upload_longer_than_the_response_timeout_goes_through() {
    let gw = Gateway::start_with(|c| {
        c.upstream.response_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let (c, _, _) = gw.signed_in("uploader@example.com").await;
    let slow_body = || {
        // 12 chunks 200 ms apart: 2.4 s of steady upload, no pause near the body timeout.
        let stream = futures_util::stream::iter(0..12).then(|_| async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'u'; 1000]))
        });
        reqwest::Body::wrap_stream(stream)
    };
    let r = c
        .post(gw.url("/import"))
        .header("accept", "application/json")
        .body(slow_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(gw.upstream.last().body_len, 12_000);
    // The recording console reads the body, then waits 3 s before answering.
    let started = std::time::Instant::now();
    let r = c
        .post(gw.url("/slow/3000"))
        .header("accept", "application/json")
        .body(slow_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(3200),
        "the answer's timer started before the body's end: 504 after {waited:?}"
    );
}

/// A console that closes a kept-alive connection as the next request arrives on it after a
/// pause (as a server whose keep-alive timeout runs out just then does): a `GET` written on
/// such a connection is sent again on a new one, once; a `POST` is not (it may have been acted
/// on).
#[tokio::test]
async fn a_get_on_a_connection_the_console_closed_is_sent_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                // Reads one request head; answers it keep-alive style; then waits for the next
                // request's first bytes and closes without an answer.
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let gw = Gateway::start_with(|c| {
        c.upstream.url = url::Url::parse(&format!("http://{addr}/")).unwrap();
    })
    .await;
    let (c, _, _) = gw.signed_in("keepalive@example.com").await;
    for i in 0..5 {
        // Idle long enough for a keep-alive timeout to be near.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let r = c
            .get(gw.url(&format!("/page/{i}")))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {i}");
    }
    // Each GET after the first was written on the kept connection, lost, and sent again.
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 5);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = c
        .post(gw.url("/campaigns/draft"))
        .header("accept", "application/json")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "a POST is never sent twice");
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 5);
}

/// On shutdown, requests in flight finish (drain) and new connections are refused. (That the
/// process does not wait longer than `server.shutdown_timeout` is checked on the real binary in
/// `it::cluster`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let mut gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("drain@example.com").await;
    let (client, url) = (c.client.clone(), gw.url("/slow/500"));
    let quick =
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    gw.stop();
    assert_eq!(
        quick.await.unwrap().unwrap(),
        200,
        "an in-flight request is drained"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        reqwest::Client::new()
            .get(gw.url("/_portcullis/healthz"))
            .send()
            .await
            .is_err(),
        "no new connections after shutdown"
    );
}

/// A page of another origin of the same site (another port of the host, a sibling subdomain)
/// posts a form to the console: the browser sends the `SameSite=Lax` session cookies with it,
/// so the gateway refuses every request that changes something unless the browser says it came
/// from the console's own pages (or a configured origin). Reading is not refused.
#[tokio::test]
async fn another_sites_page_cannot_make_the_console_act() {
    let gw = Gateway::start_with(|c| {
        c.upstream.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let (c, _, _) = gw.signed_in("sender@example.com").await;
    let cookie = gw.cookies(&c);
    let own = gw.base.trim_end_matches('/').to_string();
    let sibling = own.replace("127.0.0.1", "tracking.127.0.0.1.example");
    let other_port = format!("http://127.0.0.1:{}", gw.addr.port() + 1);
    let send = |method: &'static str, extra: Vec<(&'static str, String)>| {
        let cookie = cookie.clone();
        async move {
            let mut headers: Vec<(&str, &str)> = vec![
                ("Cookie", &cookie),
                ("Accept", "text/html"),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ];
            headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
            raw(gw.addr, method, "/campaigns/7/send", &headers, "name=x").await
        }
    };
    let before = gw.upstream.requests().len();
    for (method, extra) in [
        ("POST", vec![("Origin", other_port.clone())]),
        ("POST", vec![("Origin", sibling.clone())]),
        ("DELETE", vec![("Origin", "https://evil.example".into())]),
        (
            "PUT",
            vec![("Sec-Fetch-Site", "same-site".into())], // no Origin, the browser says whose
        ),
        ("PATCH", vec![("Sec-Fetch-Site", "cross-site".into())]),
        (
            "POST",
            vec![
                ("Origin", "null".into()),
                ("Sec-Fetch-Site", "same-site".into()),
            ],
        ),
        // Two origins, or two fetch sites: a console might read the second.
        (
            "POST",
            vec![("Origin", own.clone()), ("Origin", other_port.clone())],
        ),
        (
            "POST",
            vec![
                ("Sec-Fetch-Site", "same-origin".into()),
                ("Sec-Fetch-Site", "cross-site".into()),
            ],
        ),
    ] {
        let r = send(method, extra.clone()).await;
        assert_eq!(r.status, 403, "{method} {extra:?}: {}", r.head);
        assert!(r.body.contains("another site"), "{}", r.body);
    }
    // A WebSocket handshake says its page's real origin: `null` is not the console's; nor is
    // one without `Origin` whose `Sec-Fetch-Site` names another site, as for a write.
    for said in [
        vec![("Origin", "null"), ("Sec-Fetch-Site", "same-origin")],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Sec-Fetch-Site", "same-site")],
    ] {
        let mut headers = vec![
            ("Cookie", cookie.as_str()),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ];
        headers.extend(said.iter().copied());
        let r = raw(gw.addr, "GET", "/ws", &headers, "").await;
        assert_eq!(r.status, 403, "{said:?}: {}", r.head);
    }
    assert_eq!(
        gw.upstream.requests().len(),
        before,
        "a refused request reached the console"
    );
    // As JSON for API clients.
    let r = raw(
        gw.addr,
        "POST",
        "/campaigns/7/send",
        &[
            ("Cookie", &cookie),
            ("Accept", "application/json"),
            ("Origin", &other_port),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("\"error\":\"cross_origin\""), "{}", r.body);
    // The console's own pages, the configured origin, clients that are no browser (no `Origin`,
    // no `Sec-Fetch-Site`), and reading from anywhere all pass.
    for (method, extra) in [
        ("POST", vec![("Origin", own.clone())]),
        (
            "POST",
            vec![
                ("Origin", own.clone()),
                ("Sec-Fetch-Site", "same-origin".into()),
            ],
        ),
        (
            "POST",
            vec![
                ("Origin", "null".into()),
                ("Sec-Fetch-Site", "same-origin".into()),
            ],
        ),
        ("PUT", vec![("Origin", "https://app.example.com".into())]),
        ("POST", vec![]),
        ("DELETE", vec![("Sec-Fetch-Site", "none".into())]),
        ("GET", vec![("Origin", other_port.clone())]),
        ("GET", vec![("Sec-Fetch-Site", "cross-site".into())]),
    ] {
        let r = send(method, extra.clone()).await;
        assert_eq!(r.status, 200, "{method} {extra:?}: {}", r.head);
    }
    assert_eq!(gw.upstream.requests().len(), before + 8);
}

/// The console is sent its own address as `Host`; a redirect it builds from that is turned into
/// the gateway's origin (as nginx's `proxy_redirect default` does), and one elsewhere is left.
#[tokio::test]
async fn the_consoles_redirects_to_itself_point_at_the_gateway() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("moved@example.com").await;
    let r = c.get(gw.url("/moved")).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        format!("{}/campaigns/7?from=moved", gw.base).as_str()
    );
    let r = c.get(gw.url("/moved-away")).send().await.unwrap();
    assert_eq!(r.headers()["location"], "https://docs.example.com/help");
}

/// A client that stops reading an answer the console streams is disconnected once nothing has
/// gone out to it for `server.body_timeout`, rather than holding the answer's buffers for as
/// long as the console sends.
#[tokio::test]
async fn a_client_that_stops_reading_is_let_go() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start_with(|c| {
        c.server.body_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let (c, _, _) = gw.signed_in("stops-reading@example.com").await;
    let cookie = gw.cookies(&c);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.addr).await.unwrap();
    // An answer far longer than any buffer on the way: 100 GB.
    let request = format!(
        "GET /download/100000000000 HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\n\r\n",
        gw.addr
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    // It stops reading, for longer than the bound.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    // What was on its way is there to read, then the end: the gateway let it go.
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n as u64,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "still streaming after {read} bytes");
    assert!(read < 1 << 30, "{read} bytes");
    // The gateway serves on.
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
}
