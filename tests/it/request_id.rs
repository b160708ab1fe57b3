//! Request ids: generated when absent, kept only from trusted proxies and only when plain,
//! forwarded upstream (replacing the client's) and echoed on the response.

use super::harness::*;

async fn signed_in(trust_loopback: bool) -> (Gateway, String) {
    let gw = Gateway::start_with(|c| {
        if trust_loopback {
            c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        }
    })
    .await;
    let (c, _, _) = gw.signed_in("rid@example.com").await;
    let cookie = gw.cookies(&c);
    (gw, cookie)
}

/// A proxied GET with the session in `cookie` and `X-Request-Id: id`.
async fn get_with_id(gw: &Gateway, cookie: &str, id: &str) -> Raw {
    raw(
        gw.addr,
        "GET",
        "/campaigns",
        &[("Cookie", cookie), ("X-Request-Id", id)],
        "",
    )
    .await
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

#[tokio::test]
async fn generated_when_absent_forwarded_and_echoed() {
    let (gw, cookie) = signed_in(false).await;
    let r = raw(gw.addr, "GET", "/campaigns", &[("Cookie", &cookie)], "").await;
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").expect("echoed");
    assert!(is_uuid(&id), "{id}");
    assert_eq!(
        gw.upstream.last().headers_named("x-request-id"),
        vec![id.as_str()]
    );
    // Gateway pages and refusals carry one too, a different one each time.
    let a = raw(gw.addr, "GET", "/_portcullis/login", &[], "").await;
    let b = raw(gw.addr, "GET", "/campaigns", &[], "").await;
    let (a, b) = (
        a.header("x-request-id").unwrap(),
        b.header("x-request-id").unwrap(),
    );
    assert!(is_uuid(&a) && is_uuid(&b) && a != b && a != id);
    // A client naming it in `Connection` does not take it from the console.
    let r = raw(
        gw.addr,
        "GET",
        "/campaigns",
        &[
            ("Cookie", &cookie),
            ("Connection", "keep-alive, X-Request-Id"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").unwrap();
    assert_eq!(
        gw.upstream.last().headers_named("x-request-id"),
        vec![id.as_str()]
    );
}

#[tokio::test]
async fn kept_from_a_trusted_proxy_when_well_formed() {
    let (gw, cookie) = signed_in(true).await;
    for id in ["abc-123", "req:1.2_3-x", &"a".repeat(128)] {
        let r = get_with_id(&gw, &cookie, id).await;
        assert_eq!(r.header("x-request-id").as_deref(), Some(id));
        assert_eq!(gw.upstream.last().headers_named("x-request-id"), vec![id]);
    }
}

#[tokio::test]
async fn replaced_when_malformed_or_from_an_untrusted_peer() {
    let long = "a".repeat(129);
    let malformed = [
        "has space",
        "semi;colon",
        "slash/",
        "quote\"",
        "é",
        long.as_str(),
    ];
    let (gw, cookie) = signed_in(true).await;
    for id in malformed {
        let r = get_with_id(&gw, &cookie, id).await;
        let got = r.header("x-request-id").unwrap();
        assert!(is_uuid(&got), "{id:?} → {got}");
        assert_eq!(
            gw.upstream.last().headers_named("x-request-id"),
            vec![got.as_str()]
        );
    }
    // Two ids from a trusted proxy: ambiguous, replaced.
    let r = raw(
        gw.addr,
        "GET",
        "/campaigns",
        &[
            ("Cookie", &cookie),
            ("X-Request-Id", "one"),
            ("X-Request-Id", "two"),
        ],
        "",
    )
    .await;
    assert!(is_uuid(&r.header("x-request-id").unwrap()));
    assert_eq!(gw.upstream.last().headers_named("x-request-id").len(), 1);

    let (gw, cookie) = signed_in(false).await;
    let r = get_with_id(&gw, &cookie, "chosen-by-client").await;
    let got = r.header("x-request-id").unwrap();
    assert!(is_uuid(&got), "{got}");
    let seen = gw.upstream.last();
    assert_eq!(seen.headers_named("x-request-id"), vec![got.as_str()]);
    // An underscore spelling, which CGI-style consoles read as the same header (and join with
    // the gateway's), does not reach the console either, from any peer.
    for trusted in [false, true] {
        let (gw, cookie) = signed_in(trusted).await;
        let r = raw(
            gw.addr,
            "GET",
            "/campaigns",
            &[("Cookie", &cookie), ("X-Request_Id", "forged-by-client")],
            "",
        )
        .await;
        assert_eq!(r.status, 200);
        let seen = gw.upstream.last();
        let names: Vec<String> = seen
            .headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase().replace('_', "-"))
            .filter(|n| n == "x-request-id")
            .collect();
        assert_eq!(names.len(), 1, "{:?}", seen.headers);
        assert!(!seen
            .headers
            .iter()
            .any(|(_, v)| v.contains("forged-by-client")));
    }
}
