//! Forward-auth mode: `/_portcullis/auth` answering another reverse proxy, directly and through a
//! real nginx (`auth_request`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::harness::*;

const AUTH: &str = "/_portcullis/auth";

/// A gateway with forward-auth on; loopback (the tests' own address) trusted as a proxy or not.
async fn gateway(trust_loopback: bool) -> Gateway {
    Gateway::start_with(|c| {
        c.forward_auth.enabled = true;
        if trust_loopback {
            c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        }
    })
    .await
}

/// Asks the endpoint with `headers` (the asking proxy's description of the request, the
/// client's cookies).
pub(super) async fn auth(gw: &Gateway, headers: &[(&str, &str)]) -> Raw {
    raw(gw.addr, "GET", AUTH, headers, "").await
}

/// Asks the endpoint about `uri` (named in `header`) for the session in `cookie`.
async fn ask(gw: &Gateway, cookie: &str, header: &str, uri: &str) -> Raw {
    auth(gw, &[("Cookie", cookie), (header, uri)]).await
}

fn json(r: &Raw) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

fn login_url(gw: &Gateway, next: &str) -> String {
    let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    format!("{}/_portcullis/login?next={next}", gw.base)
}

#[tokio::test]
async fn off_by_default_the_route_is_not_there() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("off@example.com").await;
    let cookie = gw.cookies(&c);
    let r = auth(&gw, &[("Cookie", &cookie)]).await;
    assert_eq!(r.status, 404, "{}", r.head);
    assert!(r.header("x-portcullis-assertion").is_none());
}

#[tokio::test]
async fn signed_in_session_gets_a_token_that_verifies() {
    let gw = gateway(true).await;
    let (c, _, _) = gw.signed_in("fa@example.com").await;
    let cookie = gw.cookies(&c);
    let user = gw.user("fa@example.com").await;
    let jwks = gw.jwks().await;
    for method in ["GET", "HEAD", "POST", "DELETE"] {
        let r = raw(
            gw.addr,
            method,
            AUTH,
            &[("Cookie", &cookie), ("X-Forwarded-Uri", "/campaigns")],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{method}: {}", r.head);
        let token = r.header("x-portcullis-assertion").expect("token header");
        let claims = portcullis::token::verify(&token, &jwks, "esp-console", Some(&gw.base), 5)
            .expect("token verifies against the JWKS");
        assert_eq!(claims.sub, user.id);
        assert!(
            r.header("x-portcullis-user").is_none(),
            "only the signed token speaks for the user"
        );
        assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    }
    assert_eq!(gw.upstream.count(), 0, "forward-auth never proxies");
}

/// A WebSocket handshake the proxy asks about is refused when another origin's page opened
/// it, as in proxy mode; the console's own pages and clients without `Origin` pass.
#[tokio::test]
async fn a_websocket_from_another_origin_is_refused_here_too() {
    let gw = gateway(true).await;
    let (c, _, _) = gw.signed_in("fa-ws@example.com").await;
    let cookie = gw.cookies(&c);
    let own = gw.base.trim_end_matches('/').to_string();
    for (origin, want) in [
        (Some("http://evil.example"), 403),
        (Some("null"), 403),
        (Some(own.as_str()), 200),
        (None, 200),
    ] {
        let mut headers = vec![
            ("Cookie", cookie.as_str()),
            ("X-Forwarded-Uri", "/ws"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        let r = auth(&gw, &headers).await;
        assert_eq!(r.status, want, "{origin:?}: {}", r.head);
        if want == 403 {
            assert!(r.body.contains("cross_origin"), "{}", r.body);
        }
    }
    // Two `Origin` headers (no browser sends them; a console may read the second): refused,
    // whichever comes first.
    for pair in [
        [own.as_str(), "http://evil.example"],
        ["http://evil.example", own.as_str()],
    ] {
        let r = auth(
            &gw,
            &[
                ("Cookie", cookie.as_str()),
                ("X-Forwarded-Uri", "/ws"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Origin", pair[0]),
                ("Origin", pair[1]),
            ],
        )
        .await;
        assert_eq!(r.status, 403, "{pair:?}: {}", r.head);
        assert!(r.body.contains("cross_origin"), "{}", r.body);
    }
}

/// An upgrade to another protocol than WebSocket (`h2c`), which a proxy that passes `Upgrade`
/// on (Caddy, Traefik) would turn into a tunnel to the console past every later check, is
/// refused; a WebSocket upgrade from the console's own page still passes.
#[tokio::test]
async fn an_upgrade_to_another_protocol_is_refused() {
    let gw = gateway(true).await;
    let (c, _, _) = gw.signed_in("fa-h2c@example.com").await;
    let cookie = gw.cookies(&c);
    let own = gw.base.trim_end_matches('/').to_string();
    for (upgrades, want) in [
        (vec!["h2c"], 403),
        (vec!["websocket, h2c"], 403),
        (vec!["websocket", "H2C"], 403),
        (vec!["TLS/1.2"], 403),
        (vec!["WebSocket"], 200),
        (vec!["websocket", " websocket "], 200),
    ] {
        let mut headers = vec![
            ("Cookie", cookie.as_str()),
            ("X-Forwarded-Uri", "/tunnel"),
            ("Origin", own.as_str()),
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ];
        for u in &upgrades {
            headers.push(("Upgrade", u));
        }
        let r = auth(&gw, &headers).await;
        assert_eq!(r.status, want, "{upgrades:?}: {}", r.head);
        if want == 403 {
            assert_eq!(json(&r)["error"], "upgrade_refused", "{}", r.body);
            assert!(r.header("x-portcullis-assertion").is_none());
        } else {
            assert!(r.header("x-portcullis-assertion").is_some());
        }
    }
}

/// The asking proxy passes the client's headers on to the console as they are: a method
/// override the console might honour (a GET acting as the POST a step-up rule guards) is
/// refused here, since the gateway cannot take it out as in proxy mode.
#[tokio::test]
async fn a_method_override_is_refused() {
    let gw = gateway(true).await;
    let (c, _, _) = gw.signed_in("fa-override@example.com").await;
    let cookie = gw.cookies(&c);
    for (name, value, want) in [
        ("X-HTTP-Method-Override", "POST", 403),
        ("X_HTTP_Method_Override", "DELETE", 403),
        ("X-HTTP-Method", "delete", 403),
        ("X-Method-Override", "PUT", 403),
        ("X-HTTP-Method-Override", "get", 200),
    ] {
        let r = auth(
            &gw,
            &[
                ("Cookie", cookie.as_str()),
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/campaigns/1/send"),
                (name, value),
            ],
        )
        .await;
        assert_eq!(r.status, want, "{name}: {value}: {}", r.body);
        if want == 403 {
            assert_eq!(json(&r)["error"], "method_override");
        }
    }
}

/// A client's own copy of the identity header spelled with `_` or other punctuation, which a
/// CGI-style console reads as the header but the asking proxy does not replace (nor a header of
/// the gateway's name space so spelled): the check refuses the request, so the console never
/// sees two identities.
#[tokio::test]
async fn a_client_sent_identity_header_is_refused() {
    let gw = gateway(true).await;
    let (c, _, _) = gw.signed_in("fa-identity@example.com").await;
    let cookie = gw.cookies(&c);
    for (name, want) in [
        ("X_Portcullis_Assertion", 403),
        ("x.portcullis.assertion", 403),
        ("X-Portcullis_Assertion", 403),
        ("X_PORTCULLIS_USER", 403),
        // Other proxies' identity and client-address headers so spelled.
        ("X_Forwarded_User", 403),
        ("X-Forwarded_User", 403),
        ("Remote_User", 403),
        ("X_Forwarded_For", 403),
        ("x.auth.request.email", 403),
        // Under its own name the asking proxy replaces it (`copy_headers`,
        // `authResponseHeaders`, `proxy_set_header`).
        ("X-Portcullis-Assertion", 200),
        ("X-Portcullis", 200),
        ("X_Request_Id", 200),
        ("X_Custom_Thing", 200),
    ] {
        let r = auth(
            &gw,
            &[
                ("Cookie", cookie.as_str()),
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/campaigns"),
                (name, "eyJhbGciOiJub25lIn0.e30."),
            ],
        )
        .await;
        assert_eq!(r.status, want, "{name}: {}", r.body);
        if want == 403 {
            assert_eq!(json(&r)["error"], "identity_header");
            assert!(r.header("x-portcullis-assertion").is_none());
        }
    }
}

#[tokio::test]
async fn no_session_gets_401_json_or_a_redirect_with_next_from_a_trusted_proxy() {
    let gw = gateway(true).await;
    let target = "/campaigns/7?tab=stats";
    for header in ["X-Forwarded-Uri", "X-Original-URI"] {
        let r = auth(&gw, &[(header, target)]).await;
        assert_eq!(r.status, 401, "{}", r.head);
        let body = json(&r);
        assert_eq!(body["error"], "authentication_required");
        assert_eq!(body["login"], login_url(&gw, target));
        assert_eq!(r.header("location"), Some(login_url(&gw, target)));

        let r = auth(
            &gw,
            &[
                (header, target),
                ("Accept", "text/html,application/xhtml+xml"),
            ],
        )
        .await;
        assert_eq!(r.status, 302, "{}", r.head);
        assert_eq!(r.header("location"), Some(login_url(&gw, target)));
        // Relayed to the browser by some proxies: the headers of a gateway page.
        assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
        assert!(r.header("content-security-policy").is_some());
    }
    // Traefik/Caddy style: the original method in X-Forwarded-Method; a POST is not returned to
    // but said not to be sent, and the page it came from is.
    let r = auth(
        &gw,
        &[
            ("X-Forwarded-Uri", "/campaigns/7/send"),
            ("X-Forwarded-Method", "POST"),
            ("Accept", "text/html"),
        ],
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some(format!("{}/_portcullis/login?notice=not_sent", gw.base))
    );
    let referer = format!("{}/campaigns/new?draft=7", gw.base);
    for accept in ["text/html", "application/json"] {
        let r = auth(
            &gw,
            &[
                ("X-Forwarded-Uri", "/campaigns/7/send"),
                ("X-Forwarded-Method", "POST"),
                ("Referer", referer.as_str()),
                ("Accept", accept),
            ],
        )
        .await;
        let want = format!(
            "{}/_portcullis/login?next=%2Fcampaigns%2Fnew%3Fdraft%3D7&notice=not_sent",
            gw.base
        );
        assert_eq!(
            r.header("location"),
            Some(want.clone()),
            "{accept}: {}",
            r.head
        );
        // An API client's 401 names the same URL in its body as in `Location`.
        if accept == "application/json" {
            assert_eq!(r.status, 401);
            assert_eq!(json(&r)["login"], want.as_str());
        }
    }
    // Unsafe return targets are dropped, never echoed.
    for bad in [
        "//evil.example/x",
        "/\\evil.example",
        "https://evil.example/",
    ] {
        let r = auth(&gw, &[("X-Forwarded-Uri", bad), ("Accept", "text/html")]).await;
        let loc = r.header("location").unwrap_or_default();
        assert!(!loc.contains("evil"), "{bad} → {loc}");
    }
}

#[tokio::test]
async fn an_untrusted_peer_cannot_choose_the_original_uri() {
    let gw = gateway(false).await;
    let r = auth(
        &gw,
        &[
            ("X-Forwarded-Uri", "/campaigns"),
            ("X-Original-URI", "/campaigns"),
            ("Accept", "text/html"),
        ],
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some(login_url(&gw, "/")));
    // Nor dodge or trip the namespace check with one.
    let r = auth(&gw, &[("X-Forwarded-Uri", "/_portcullis/login")]).await;
    assert_eq!(r.status, 401, "{}", r.head);
    // With no proxy trusted, forward-auth checks every request as `/`: `check-config` warns.
    let warning = "forward_auth is on but server.trusted_proxies is empty";
    let out = gw.cli(&["check-config"], None).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(warning));
    let trusted = gateway(true).await;
    let out = trusted.cli(&["check-config"], None).await;
    assert!(!String::from_utf8_lossy(&out.stderr).contains(warning));
    // Trusting every address is trusting every client's X-Forwarded-For: said too.
    let everyone = "server.trusted_proxies holds a network of every address";
    assert!(!String::from_utf8_lossy(&out.stderr).contains(everyone));
    for all in ["[\"0.0.0.0/0\"]", "[\"10.0.0.0/8\", \"::/0\"]"] {
        let env = [("PORTCULLIS__SERVER__TRUSTED_PROXIES", all)];
        let out = trusted.cli_env(&["check-config"], None, &env).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.contains(everyone),
            "{all}: {err}"
        );
    }
}

#[tokio::test]
async fn password_without_second_factor_is_refused() {
    let gw = gateway(true).await;
    gw.signed_in("half@example.com").await;
    let c = gw.browser();
    gw.clock.advance(30);
    let r = gw
        .password(&c.client, "half@example.com", PASSWORD, "")
        .await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let cookie = gw.cookies(&c);
    let r = ask(&gw, &cookie, "X-Forwarded-Uri", "/campaigns").await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(r.header("x-portcullis-assertion").is_none());
}

#[tokio::test]
async fn a_disabled_user_is_refused_and_the_cookie_cleared() {
    let gw = gateway(true).await;
    let (c, _, _) = gw.signed_in("gone@example.com").await;
    let cookie = gw.cookies(&c);
    assert_eq!(ask(&gw, &cookie, "X-Forwarded-Uri", "/").await.status, 200);
    let out = gw.cli(&["user", "disable", "gone@example.com"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.clock.advance(2);
    let cleared = |r: &Raw| {
        r.head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: portcullis-session=;")
                && l.contains("Max-Age=0")
        })
    };
    // A request of the page's own (a poll; proxies such as Caddy relay the answer): refused,
    // the cookie left for the navigation that tells the user why.
    let r = ask(&gw, &cookie, "X-Forwarded-Uri", "/").await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(r.header("x-portcullis-assertion").is_none());
    assert!(!cleared(&r), "a poll clears nothing: {}", r.head);
    // A method in lower case is still a page read again, not a form.
    let r = auth(
        &gw,
        &[
            ("Cookie", cookie.as_str()),
            ("X-Forwarded-Uri", "/inbox"),
            ("X-Forwarded-Method", "get"),
            ("Accept", "text/html"),
        ],
    )
    .await;
    assert!(
        r.location()
            .ends_with("/_portcullis/login?next=%2Finbox&notice=session_ended"),
        "{}",
        r.head
    );
    // The browser's navigation: sent to sign in, told its session ended, the cookie cleared.
    let r = auth(
        &gw,
        &[
            ("Cookie", cookie.as_str()),
            ("X-Forwarded-Uri", "/inbox"),
            ("Accept", "text/html"),
        ],
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.head);
    assert!(
        r.location()
            .ends_with("/_portcullis/login?next=%2Finbox&notice=session_ended"),
        "{}",
        r.head
    );
    assert!(
        cleared(&r),
        "the dead session's cookie is cleared: {}",
        r.head
    );
}

#[tokio::test]
async fn gateway_namespace_uris_are_refused() {
    let gw = gateway(true).await;
    let (c, _, _) = gw.signed_in("ns@example.com").await;
    let cookie = gw.cookies(&c);
    let spellings = [
        "/_portcullis/login",
        "/_portcullis",
        "/_PORTCULLIS/account",
        "/_Portcullis/auth?x=1",
        "/_portcullis%2flogin",
        "/x/../_portcullis/login",
        "//_portcullis/login",
        "/./_portcullis/logout",
        "/_portcullis\\admin",
        "/%2F_portcullis/admin",
        "/x/..;/_portcullis/admin",
        "/%255Fportcullis/admin",
        // Trailing dots and spaces, which Windows servers drop from a segment.
        "/_portcullis./login",
        "/_portcullis..;/login",
        "/_portcullis%20/login",
        "/_portcullis%2e/login",
        // Bytes beyond ASCII as a proxy passes the request line's: read, not taken for `/`.
        "/_portcullis/admin?é",
        "/_portcullis/admin/é",
    ];
    for uri in spellings {
        for header in ["X-Forwarded-Uri", "X-Original-URI"] {
            let r = ask(&gw, &cookie, header, uri).await;
            assert!(r.status == 403, "{header}: {uri} → {}", r.head);
            assert!(r.header("x-portcullis-assertion").is_none(), "{uri}");
        }
    }
}

#[tokio::test]
async fn storage_trouble_fails_closed() {
    let gw = gateway(true).await;
    let nginx = start_nginx(&gw).await;
    let (c, _, _) = gw.signed_in("down@example.com").await;
    let cookie = gw.cookies(&c);
    gw.break_durable_store().await;
    let r = ask(&gw, &cookie, "X-Forwarded-Uri", "/campaigns").await;
    assert_eq!(r.status, 503, "{}", r.head);
    assert!(r.header("x-portcullis-assertion").is_none());
    // Through the documented nginx config, a 503 with Retry-After too (auth_request alone would
    // make it a 500), and nothing reaches the console.
    let before = gw.upstream.count();
    let r = raw(nginx.addr, "GET", "/campaigns", &[("Cookie", &cookie)], "").await;
    assert_eq!(r.status, 503, "{}", r.head);
    assert_eq!(r.header("retry-after").as_deref(), Some("5"), "{}", r.head);
    assert!(r.body.contains("temporarily unavailable"), "{}", r.body);
    assert_eq!(gw.upstream.count(), before);
}

/// An nginx started for one test; stopped when dropped.
pub(super) struct Nginx {
    child: Child,
    pub(super) addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The documented nginx configuration (docs/forward-auth.md), pointed at `gw` and its upstream.
fn nginx_conf(dir: &std::path::Path, listen: SocketAddr, gw: SocketAddr, up: &str) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $portcullis_upgrade {{
        default         "";
        "~*^websocket$" websocket;
    }}
    map $http_upgrade $connection_upgrade {{
        default         close;
        "~*^websocket$" upgrade;
    }}
    server {{
        listen {listen};

        location = /.well-known/jwks.json {{
            proxy_pass http://{gw};
        }}

        location = /_portcullis/auth {{
            internal;
            proxy_pass http://{gw};
            proxy_redirect off;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Forwarded-Uri "";
            proxy_set_header X-Forwarded-Method $request_method;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Request-Id $request_id;
            # nginx cannot relay a redirect from here: ask for 401, redirect in @login.
            proxy_set_header Accept "application/json";
        }}

        location /_portcullis/ {{
            proxy_pass http://{gw};
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Request-Id $request_id;
        }}

        location @login {{
            return 302 $portcullis_login;
        }}

        location @portcullis_unavailable {{
            default_type text/plain;
            add_header Retry-After 5 always;
            return 503 "The sign-in service is temporarily unavailable. Please try again shortly.\n";
        }}

        location / {{
            auth_request /_portcullis/auth;
            auth_request_set $portcullis_token $upstream_http_x_portcullis_assertion;
            auth_request_set $portcullis_login $upstream_http_location;
            error_page 401 = @login;
            error_page 500 = @portcullis_unavailable;
            proxy_set_header X-Portcullis-Assertion $portcullis_token;
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-User "";
            proxy_set_header X-Forwarded-Email "";
            proxy_set_header X-Remote-User "";
            proxy_set_header X-Auth-Request-User "";
            proxy_set_header X-Auth-Request-Email "";
            proxy_set_header X-Original-URL "";
            proxy_set_header X-Original-URI "";
            proxy_set_header X-Forwarded-Uri "";
            proxy_set_header X-Forwarded-Method "";
            proxy_set_header Remote-User "";
            proxy_set_header X-Forwarded-Groups "";
            proxy_set_header X-Forwarded-Preferred-Username "";
            proxy_set_header X-Forwarded-Access-Token "";
            proxy_set_header X-Auth-Request-Groups "";
            proxy_set_header X-Auth-Request-Preferred-Username "";
            proxy_set_header X-Webauth-User "";
            proxy_set_header X-User "";
            proxy_set_header X-Email "";
            # Addresses and the scheme and host the request came by: nginx's, not the client's.
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Client-IP "";
            proxy_set_header Forwarded "";
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $portcullis_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_hide_header X-Portcullis-Assertion;
            proxy_hide_header Secure-Session-Registration;
            proxy_hide_header Secure-Session-Challenge;
            proxy_hide_header Sec-Session-Registration;
            proxy_hide_header Sec-Session-Challenge;
            proxy_pass {up};
        }}
    }}
}}
"#
    )
}

async fn start_nginx(gw: &Gateway) -> Nginx {
    let up = gw.state.config.upstream.url.as_str().trim_end_matches('/');
    run_nginx(|dir, addr| nginx_conf(dir, addr, gw.addr, up)).await
}

/// A real nginx on a free loopback port with the configuration `conf(dir, addr)` makes (`dir`
/// its own, for its files); stopped when dropped.
pub(super) async fn run_nginx(conf: impl FnOnce(&std::path::Path, SocketAddr) -> String) -> Nginx {
    let bin = "/usr/sbin/nginx";
    assert!(
        std::path::Path::new(bin).exists(),
        "nginx is needed for this test: apt-get install nginx"
    );
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf(dir.path(), addr)).unwrap();
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut nginx = Nginx {
        child,
        addr,
        _dir: dir,
    };
    let log = nginx._dir.path().join("error.log");
    wait_listening(&mut nginx.child, addr, &log).await;
    nginx
}

#[tokio::test]
async fn nginx_auth_request_guards_the_console() {
    let gw = gateway(true).await;
    let nginx = start_nginx(&gw).await;

    // No session: redirected to sign in, with the original target as `next`.
    let r = raw(nginx.addr, "GET", "/campaigns?page=2", &[], "").await;
    assert_eq!(r.status, 302, "{}", r.head);
    assert_eq!(
        r.header("location"),
        Some(login_url(&gw, "/campaigns?page=2"))
    );
    assert_eq!(gw.upstream.count(), 0, "nothing reached the console");

    // Signed in: the console gets the request with the gateway's token, and only that.
    let (c, _, _) = gw.signed_in("nginx@example.com").await;
    let cookie = gw.cookies(&c);
    // What only the gateway sends does not come back from the console through nginx.
    let r = raw(nginx.addr, "GET", "/cookies", &[("Cookie", &cookie)], "").await;
    assert_eq!(r.status, 201, "{}", r.head);
    let head = r.head.to_ascii_lowercase();
    assert!(
        !head.contains("x-portcullis-assertion") && !head.contains("session-registration"),
        "{}",
        r.head
    );
    let user = gw.user("nginx@example.com").await;
    let r = raw(
        nginx.addr,
        "GET",
        "/campaigns?page=2",
        &[
            ("Cookie", &cookie),
            ("X-Portcullis-Assertion", "spoofed.by.client"),
            ("X_Portcullis_Assertion", "spoofed.by.client"),
            ("X-Forwarded-User", "spoofed.by.client"),
            ("X-Forwarded-Email", "spoofed.by.client"),
            ("X-Remote-User", "spoofed.by.client"),
            ("X-Auth-Request-User", "spoofed.by.client"),
            ("X-Original-URI", "spoofed.by.client"),
            ("X-Forwarded-Method", "spoofed.by.client"),
            ("Remote-User", "spoofed.by.client"),
            ("X-Forwarded-Groups", "spoofed.by.client"),
            ("X-Auth-Request-Groups", "spoofed.by.client"),
            ("X-Real-IP", "spoofed.by.client"),
            ("Forwarded", "for=spoofed.by.client"),
            ("X-Forwarded-Host", "spoofed.by.client"),
            ("X-Request-Id", "spoofed.by.client"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = gw.upstream.last();
    assert_eq!(seen.uri, "/campaigns?page=2");
    // nginx's own request id, the one the gateway was asked with and logged.
    let id = seen.header("x-request-id").unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let tokens = seen.headers_named("x-portcullis-assertion");
    assert_eq!(tokens.len(), 1, "{:?}", seen.headers);
    assert!(
        !seen
            .headers
            .iter()
            .any(|(_, v)| v.contains("spoofed.by.client")),
        "the client's header was passed through: {:?}",
        seen.headers
    );
    let claims = portcullis::token::verify(
        tokens[0],
        &gw.jwks().await,
        "esp-console",
        Some(&gw.base),
        5,
    )
    .expect("token verifies");
    assert_eq!(claims.sub, user.id);
    // The console's WebSockets pass through nginx once the check passes.
    drop(super::proxy::open_ws_via(nginx.addr, &cookie).await);
    // Another protocol asked for never reaches the console (the check does not see `Upgrade`,
    // so a console speaking h2c would open a tunnel past it): the request goes as a plain one.
    let h2c = [
        ("Cookie", cookie.as_str()),
        ("Upgrade", "h2c"),
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ];
    let r = raw(nginx.addr, "GET", "/campaigns", &h2c, "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = gw.upstream.last();
    assert!(
        seen.header("upgrade").is_none()
            && !seen
                .header("connection")
                .is_some_and(|c| c.to_ascii_lowercase().contains("upgrade")),
        "{:?}",
        seen.headers
    );
    // The console verifies with the gateway's keys, reached through the same host.
    let r = raw(nginx.addr, "GET", "/.well-known/jwks.json", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.body.contains("\"keys\""), "{}", r.body);

    // The URI the check is about is nginx's, not one the client names.
    let r = raw(
        nginx.addr,
        "GET",
        "/real",
        &[
            ("X-Forwarded-Uri", "/spoofed"),
            ("X-Original-URI", "/spoofed"),
        ],
        "",
    )
    .await;
    assert_eq!(r.header("location"), Some(login_url(&gw, "/real")));
    let r = raw(
        nginx.addr,
        "GET",
        "/campaigns",
        &[
            ("Cookie", &cookie),
            ("X-Forwarded-Uri", "/_portcullis/admin"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);

    // A spoofed header alone (no session) still gets nowhere.
    let before = gw.upstream.count();
    let r = raw(
        nginx.addr,
        "GET",
        "/campaigns",
        &[("X-Portcullis-Assertion", "spoofed.by.client")],
        "",
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(gw.upstream.count(), before);
}

/// With device binding on (as `serve` runs), a browser signed in but not yet bound is sent by
/// the documented nginx configuration to the device-proof page, with its way back, and reaches
/// the console once bound.
#[tokio::test]
async fn nginx_sends_an_unbound_browser_to_its_device_proof() {
    let gw = Gateway::start_with(|c| {
        binding_on(c);
        c.forward_auth.enabled = true;
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let nginx = start_nginx(&gw).await;
    let (b, _, _) = gw.signed_in("unbound@example.com").await;
    let campaigns = || async {
        raw(
            nginx.addr,
            "GET",
            "/campaigns?page=2",
            &[("Cookie", &gw.cookies(&b))],
            "",
        )
        .await
    };
    let r = campaigns().await;
    assert_eq!(r.status, 302, "{}", r.head);
    assert_eq!(
        r.header("location").as_deref(),
        Some(format!("{}/_portcullis/bind?next=%2Fcampaigns%3Fpage%3D2", gw.base).as_str())
    );
    assert_eq!(gw.upstream.count(), 0);
    // A form: back to its page after the proof, and the device-proof page says it was not
    // sent (nothing holds it here), waiting for the person rather than moving on alone.
    let page = form_not_sent(&nginx, &gw, &b, "/_portcullis/bind").await;
    assert!(
        page.contains("id=\"not-sent\"") && page.contains("data-not-sent"),
        "{page}"
    );
    assert_eq!(gw.upstream.count(), 0);
    super::binding::bind_webcrypto(&gw, &b, &super::binding::Device::new()).await;
    let r = campaigns().await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(gw.upstream.last().uri, "/campaigns?page=2");
}

/// A browser's form sent through nginx from the console's page `/campaigns/1`, which nginx
/// redirects to the gateway's `page`, back to `/campaigns/1` and saying the form was not sent:
/// that page as the browser then reads it.
async fn form_not_sent(nginx: &Nginx, gw: &Gateway, b: &Browser, page: &str) -> String {
    let referer = format!("{}/campaigns/1", gw.base);
    let headers = [
        ("Cookie", gw.cookies(b)),
        ("Referer", referer),
        ("Content-Type", "application/x-www-form-urlencoded".into()),
    ];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = raw(nginx.addr, "POST", "/campaigns/1/send", &headers, "a=b").await;
    assert_eq!(r.status, 302, "{}", r.head);
    let to = format!("{page}?next=%2Fcampaigns%2F1&notice=not_sent");
    assert_eq!(r.header("location"), Some(format!("{}{to}", gw.base)));
    gw.page(b, &to).await
}

/// A form that a `[[step_up]]` rule guards, refused through the documented nginx configuration
/// (which turns the check's 401 into its own redirect, and holds no form): the step-up page
/// says it was not sent, and goes back to its page once confirmed.
#[tokio::test]
async fn nginx_sends_a_form_that_needs_a_step_up_to_a_page_saying_it_was_not_sent() {
    let gw = Gateway::start_with(|c| {
        c.forward_auth.enabled = true;
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.step_up = vec![portcullis::policy::step_up::StepUpRule {
            path: "/campaigns/*/send".into(),
            methods: vec!["POST".into()],
            max_age: std::time::Duration::from_secs(300),
            key: false,
        }];
    })
    .await;
    let nginx = start_nginx(&gw).await;
    let (b, _, _) = gw.signed_in("stale@example.com").await;
    gw.clock.advance(600);
    let page = form_not_sent(&nginx, &gw, &b, "/_portcullis/reauth").await;
    assert_eq!(gw.upstream.count(), 0, "nothing reached the console");
    assert!(page.contains("id=\"not-sent\""), "{page}");
    // The page without the notice says nothing of the kind.
    let plain = gw
        .page(&b, "/_portcullis/reauth?next=%2Fcampaigns%2F1")
        .await;
    assert!(!plain.contains("not-sent"), "{plain}");
}

/// Through the documented nginx configuration the gateway believes nginx, so nginx must not pass
/// on a client's own `X-Forwarded-For` or `X-Request-Id`: a sign-in through it is recorded with
/// the client's real address, whatever the client claims.
#[tokio::test]
async fn through_nginx_a_client_cannot_choose_its_address_or_request_id() {
    let gw = gateway(true).await;
    let nginx = start_nginx(&gw).await;
    gw.add_user("spoof@example.com").await;
    let b = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let login = format!("http://{}/_portcullis/login", nginx.addr);
    let r = b
        .get(&login)
        .header("accept", "text/html")
        .header("x-request-id", "chosen-by-client")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(id, "chosen-by-client");
    let html = r.text().await.unwrap();
    let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
    let r = b
        .post(&login)
        .header("origin", gw.base.as_str())
        .header("accept", "application/json")
        .header("x-forwarded-for", "203.0.113.9")
        .form(&[
            ("username", "spoof@example.com"),
            ("password", "not the password at all"),
            ("csrf", csrf.as_str()),
            ("next", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let ips: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "login_password" && e.email.as_deref() == Some("spoof@example.com"))
        .map(|e| e.ip)
        .collect();
    assert_eq!(ips, [Some("127.0.0.1".to_string())]);
}

/// The asking proxy passes the client's `Origin` with its question: a request that changes
/// something, sent by another origin's page, is refused as in proxy mode (the console would
/// otherwise act on a form posted from a sibling subdomain with the user's cookies).
#[tokio::test]
async fn a_write_from_another_sites_page_is_refused() {
    let gw = gateway(true).await;
    let (c, _, _) = gw.signed_in("fa-origin@example.com").await;
    let cookie = gw.cookies(&c);
    let own = gw.base.trim_end_matches('/').to_string();
    let gw = &gw;
    let ask = |method: &'static str, origin: String| {
        let cookie = cookie.clone();
        async move {
            auth(
                gw,
                &[
                    ("Cookie", &cookie),
                    ("X-Forwarded-Uri", "/campaigns/7/send"),
                    ("X-Forwarded-Method", method),
                    ("Origin", &origin),
                    ("Accept", "application/json"),
                ],
            )
            .await
        }
    };
    let r = ask("POST", "http://tracking.example.com".into()).await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(json(&r)["error"], "cross_origin");
    assert!(r.header("x-portcullis-assertion").is_none());
    assert_eq!(ask("POST", own.clone()).await.status, 200);
    assert_eq!(
        ask("GET", "http://tracking.example.com".into())
            .await
            .status,
        200
    );
    // A proxy that does not say the method (nginx asks with GET whatever the client sent): a
    // foreign `Origin`, which every browser form post carries, is refused; a navigation from
    // another site carries none and passes.
    let without_method = |extra: Vec<(&'static str, &'static str)>| {
        let cookie = cookie.clone();
        async move {
            let mut h: Vec<(&str, &str)> = vec![
                ("Cookie", &cookie),
                ("X-Original-URI", "/campaigns/7/send"),
                ("Accept", "application/json"),
            ];
            h.extend(extra);
            auth(gw, &h).await
        }
    };
    let r = without_method(vec![("Origin", "http://tracking.example.com")]).await;
    assert_eq!(r.status, 403, "{}", r.head);
    let r = without_method(vec![("Sec-Fetch-Site", "cross-site")]).await;
    assert_eq!(r.status, 200, "{}", r.head);
    // Methods never let through, in any letter case.
    for method in ["TRACE", "trace", "TRACK", "connect"] {
        let r = ask(method, own.clone()).await;
        assert_eq!(r.status, 403, "{method}: {}", r.head);
        assert_eq!(json(&r)["error"], "method_not_allowed");
    }
}
