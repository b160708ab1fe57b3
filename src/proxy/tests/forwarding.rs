//! Header hygiene, cookies, status relay and error mapping, checked on what the upstream really
//! received and what `forward` really returned.

use super::*;
use crate::proxy::ProxyError;

fn header_values(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn method_target_and_end_to_end_headers_are_kept() {
    let up = start_upstream().await;
    let headers = [
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("authorization", "Bearer console-api-key"),
        ("x-requested-with", "XMLHttpRequest"),
    ];
    for (base, expected) in [
        ("/", "/campaigns?page=2&sort=-date"),
        ("/console/", "/console/campaigns?page=2&sort=-date"),
    ] {
        let upstream = Upstream::new(&config(up.addr, base));
        // The Host the client used must not leak into the upstream's virtual hosting.
        let mut sent = headers.to_vec();
        sent.push(("host", "gateway.example"));
        let req = request(Method::PATCH, "/x", &sent, Body::from("{}"));
        let res = upstream
            .forward(req, forwarding("/campaigns?page=2&sort=-date"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen = up.seen.last();
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(seen.uri, expected);
        for (k, v) in headers {
            assert_eq!(header_values(&seen.headers, k), [v], "{k}");
        }
        assert_eq!(header_values(&seen.headers, "host"), [up.addr.to_string()]);
    }
}

#[tokio::test]
async fn hop_by_hop_request_headers_stay_on_their_hop() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let req = request(
        Method::GET,
        "/",
        &[
            ("connection", "keep-alive, X-Client-Hop"),
            ("x-client-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "kept"),
        ],
        Body::empty(),
    );
    upstream.forward(req, forwarding("/")).await.unwrap();
    let seen = up.seen.last();
    for name in [
        "connection",
        "x-client-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(!seen.headers.contains_key(name), "{name} reached upstream");
    }
    assert_eq!(header_values(&seen.headers, "x-end-to-end"), ["kept"]);
}

#[tokio::test]
async fn hop_by_hop_response_headers_stay_on_their_hop() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let req = request(Method::GET, "/hop", &[], Body::empty());
    let res = upstream.forward(req, forwarding("/hop")).await.unwrap();
    for name in [
        "connection",
        "x-up-hop",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ] {
        assert!(!res.headers().contains_key(name), "{name} reached client");
    }
    assert_eq!(header_values(res.headers(), "x-kept"), ["yes"]);
}

#[tokio::test]
async fn identity_headers_are_stripped_in_any_spelling() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let spoofed = [
        ("X-Forwarded-User", "admin"),
        ("X_Forwarded_User", "admin"),
        ("x_forwarded_email", "admin@esp.example"),
        ("X-Forwarded-Groups", "admins"),
        ("x-forwarded-preferred-username", "admin"),
        ("X-Auth-Request-User", "admin"),
        ("x_auth_request_email", "admin@esp.example"),
        ("X-Remote-User", "admin"),
        ("Remote_User", "admin"),
        ("remote-user", "admin"),
        ("X-User", "admin"),
        ("X_Email", "admin@esp.example"),
        ("X_Portcullis_Assertion", "forged.jwt"),
        ("x-portcullis-assertion", "forged.jwt"),
        ("X-Portcullis-Whatever", "forged"),
        ("X-Original-URL", "/admin"),
        ("x_rewrite_url", "/admin"),
        ("X-Forwarded-Uri", "/admin"),
        ("X-Original-Uri", "/admin"),
        ("X-Forwarded-Prefix", "/admin"),
        ("Forwarded", "for=127.0.0.1;host=localhost"),
        ("X-Real-IP", "127.0.0.1"),
        ("X_Custom_Identity", "admin"),
        ("Content_Length", "0"),
        ("X_Forwarded_Host", "evil.example"),
        ("Expect", "100-continue"),
        // Hop-by-hop headers in underscore spelling: one hop's framing or credentials, read as
        // the real header by CGI-style backends.
        ("Transfer_Encoding", "chunked"),
        ("Proxy_Authorization", "Basic YWRtaW46YWRtaW4="),
        ("keep_alive", "timeout=5"),
    ];
    let mut headers = spoofed.to_vec();
    headers.push(("x-harmless_name", "kept"));
    // As a client sends a body: with its length.
    headers.push(("content-length", "4"));
    let req = request(Method::POST, "/", &headers, Body::from("data"));
    upstream.forward(req, forwarding("/")).await.unwrap();

    let seen = up.seen.last();
    for (name, _) in spoofed {
        let lower = name.to_ascii_lowercase();
        if lower.replace('_', "-") == "x-portcullis-assertion" {
            continue;
        }
        assert!(
            !seen.headers.contains_key(lower.as_str()),
            "{name} reached upstream"
        );
    }
    assert!(!seen.headers.contains_key("x-portcullis-whatever"));
    assert!(!seen.headers.contains_key("x_portcullis_assertion"));
    assert_eq!(
        header_values(&seen.headers, "x-portcullis-assertion"),
        ["signed.jwt"]
    );
    assert_eq!(header_values(&seen.headers, "x-harmless_name"), ["kept"]);
    assert_eq!(header_values(&seen.headers, "content-length"), ["4"]);
}

#[tokio::test]
async fn spoofed_forwarded_headers_from_untrusted_peer_are_replaced() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let req = request(
        Method::GET,
        "/",
        &[
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-for", "10.0.0.1"),
            ("X_Forwarded_For", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.example"),
        ],
        Body::empty(),
    );
    upstream.forward(req, forwarding("/")).await.unwrap();
    let seen = up.seen.last();
    assert_eq!(
        header_values(&seen.headers, "x-forwarded-for"),
        ["203.0.113.9"]
    );
    assert_eq!(header_values(&seen.headers, "x-forwarded-proto"), ["https"]);
    assert_eq!(
        header_values(&seen.headers, "x-forwarded-host"),
        ["gateway.example"]
    );
    assert!(!seen.headers.contains_key("x_forwarded_for"));
}

#[tokio::test]
async fn trusted_peer_chain_is_extended() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let mut fwd = forwarding("/");
    fwd.peer = "10.0.0.2:5000".parse().unwrap();
    fwd.peer_trusted = true;
    let req = request(
        Method::GET,
        "/",
        &[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "http"),
        ],
        Body::empty(),
    );
    upstream.forward(req, fwd).await.unwrap();
    let seen = up.seen.last();
    assert_eq!(
        header_values(&seen.headers, "x-forwarded-for"),
        ["198.51.100.1, 198.51.100.2, 10.0.0.2"]
    );
    assert_eq!(header_values(&seen.headers, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        header_values(&seen.headers, "x-forwarded-host"),
        ["gateway.example"]
    );
}

#[tokio::test]
async fn gateway_cookies_never_reach_upstream() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let req = request(
        Method::GET,
        "/",
        &[
            (
                "cookie",
                "a=1; portcullis-session=SESSION-SECRET; b=\"q v\"",
            ),
            ("cookie", "__Host-portcullis-session=HOST-SECRET; c=3"),
            ("cookie", "portcullis-csrf=CSRF-SECRET"),
        ],
        Body::empty(),
    );
    upstream.forward(req, forwarding("/")).await.unwrap();
    let seen = up.seen.last();
    assert_eq!(
        header_values(&seen.headers, "cookie"),
        ["a=1; b=\"q v\"; c=3"]
    );

    let req = request(
        Method::GET,
        "/",
        &[(
            "cookie",
            "portcullis-session=S; __Host-portcullis-session=H",
        )],
        Body::empty(),
    );
    upstream.forward(req, forwarding("/")).await.unwrap();
    assert!(!up.seen.last().headers.contains_key("cookie"));
}

#[tokio::test]
async fn upstream_cannot_set_gateway_cookies() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let req = request(Method::GET, "/cookies", &[], Body::empty());
    let res = upstream.forward(req, forwarding("/cookies")).await.unwrap();
    assert_eq!(
        header_values(res.headers(), "set-cookie"),
        ["theme=dark; Path=/", "lang=en; Max-Age=60"]
    );
}

#[tokio::test]
async fn status_codes_and_cache_headers_are_relayed() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    for code in [201u16, 204, 302, 404, 500] {
        let target = format!("/status/{code}");
        let req = request(Method::POST, "/", &[], Body::empty());
        let res = upstream.forward(req, forwarding(&target)).await.unwrap();
        assert_eq!(res.status().as_u16(), code);
        assert_eq!(header_values(res.headers(), "location"), ["/elsewhere?x=1"]);
        assert_eq!(header_values(res.headers(), "etag"), ["\"v1\""]);
        assert_eq!(header_values(res.headers(), "cache-control"), ["no-store"]);
    }
}

#[tokio::test]
async fn refused_connection_is_502() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let upstream = Upstream::new(&config(addr, "/"));
    let req = request(Method::GET, "/", &[], Body::empty());
    let err = upstream.forward(req, forwarding("/")).await.unwrap_err();
    assert!(matches!(err, ProxyError::Connect(_)), "{err:?}");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let up = start_upstream().await;
    let mut cfg = config(up.addr, "/");
    cfg.response_timeout = Duration::from_millis(200);
    let upstream = Upstream::new(&cfg);
    let req = request(Method::GET, "/", &[], Body::empty());
    let started = std::time::Instant::now();
    let err = upstream
        .forward(req, forwarding("/sleep"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::Timeout(_)), "{err:?}");
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn tunnelling_and_tracing_methods_are_refused() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    for method in [Method::TRACE, Method::CONNECT] {
        let req = request(method, "/", &[], Body::empty());
        let err = upstream.forward(req, forwarding("/")).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
    let req = request(Method::GET, "/", &[], Body::empty());
    let err = upstream
        .forward(req, forwarding("no-slash"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::Invalid(_)), "{err:?}");
    assert_eq!(up.seen.count(), 0);
}
