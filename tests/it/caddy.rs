//! Forward-auth behind a real Caddy (Debian's `caddy`), configured with the Caddyfile of
//! docs/forward-auth.md as it is written there, only its host names pointed at this test's
//! gateway and console.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::harness::*;

struct Caddy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Caddyfile block of docs/forward-auth.md.
fn documented_caddyfile() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/forward-auth.md"))
        .unwrap();
    let start = doc
        .find("```caddyfile\n")
        .expect("a caddyfile block in the docs")
        + 13;
    let len = doc[start..].find("```").unwrap();
    doc[start..start + len].to_string()
}

/// The documented Caddyfile, its site on `listen` (plain HTTP, no admin endpoint: tests run
/// side by side), the gateway at `gw`, the console at `up`.
fn caddyfile(listen: SocketAddr, gw: SocketAddr, up: &str) -> String {
    let doc = documented_caddyfile();
    for name in ["console.esp.example {", "portcullis:8080", "console:9000"] {
        assert!(doc.contains(name), "the documented Caddyfile names {name}");
    }
    let site = doc
        .replace("console.esp.example {", &format!("http://{listen} {{"))
        .replace("portcullis:8080", &gw.to_string())
        .replace("console:9000", up.trim_start_matches("http://"));
    format!("{{\n    admin off\n    auto_https off\n}}\n{site}")
}

async fn start_caddy(gw: &Gateway) -> Caddy {
    let bin = "/usr/bin/caddy";
    assert!(
        std::path::Path::new(bin).exists(),
        "Caddy is needed for this test: apt-get install caddy"
    );
    let dir = tempfile::tempdir().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let up = gw.state.config.upstream.url.as_str().trim_end_matches('/');
    let conf = dir.path().join("Caddyfile");
    std::fs::write(&conf, caddyfile(addr, gw.addr, up)).unwrap();
    let log = std::fs::File::create(dir.path().join("caddy.log")).unwrap();
    let child = Command::new(bin)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&conf)
        .env("HOME", dir.path())
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut caddy = Caddy {
        child,
        addr,
        _dir: dir,
    };
    let log = caddy._dir.path().join("caddy.log");
    wait_listening(&mut caddy.child, addr, &log).await;
    caddy
}

#[tokio::test]
async fn caddy_forward_auth_guards_the_console() {
    let gw = Gateway::start_with(|c| {
        c.forward_auth.enabled = true;
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let caddy = start_caddy(&gw).await;

    // No session: a browser is sent to sign in, the original target its `next`.
    let r = raw(
        caddy.addr,
        "GET",
        "/campaigns?page=2",
        &[("Accept", "text/html")],
        "",
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.head);
    let next: String = url::form_urlencoded::byte_serialize(b"/campaigns?page=2").collect();
    assert_eq!(
        r.location(),
        format!("{}/_portcullis/login?next={next}", gw.base)
    );
    // The check itself is not answered from outside (its 200 would hand out a token).
    let r = raw(caddy.addr, "GET", "/_portcullis/auth", &[], "").await;
    assert_eq!(r.status, 404, "{}", r.head);
    assert_eq!(gw.upstream.count(), 0, "nothing reached the console");

    // Signed in: the console gets the request with the gateway's token, and only that.
    let (c, _, _) = gw.signed_in("caddy@example.com").await;
    let cookie = gw.cookies(&c);
    let user = gw.user("caddy@example.com").await;
    let r = raw(
        caddy.addr,
        "GET",
        "/campaigns?page=2",
        &[
            ("Cookie", &cookie),
            ("X-Portcullis-Assertion", "spoofed.by.client"),
            ("X-Forwarded-User", "spoofed.by.client"),
            ("Remote-User", "spoofed.by.client"),
            ("X-Original-URI", "spoofed.by.client"),
            ("X-Forwarded-Method", "spoofed.by.client"),
            ("Forwarded", "for=spoofed.by.client"),
            ("X-Client-Ip", "spoofed.by.client"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = gw.upstream.last();
    assert_eq!(seen.uri, "/campaigns?page=2");
    let tokens = seen.headers_named("x-portcullis-assertion");
    assert_eq!(tokens.len(), 1, "one token: {tokens:?}");
    let claims = portcullis::token::verify(
        tokens[0],
        &gw.jwks().await,
        "esp-console",
        Some(&gw.base),
        5,
    )
    .expect("the gateway's token");
    assert_eq!(claims.sub, user.id);
    for dropped in [
        "x-forwarded-user",
        "remote-user",
        "x-original-uri",
        "x-forwarded-method",
        "forwarded",
        "x-client-ip",
    ] {
        assert!(
            seen.header(dropped).is_none(),
            "{dropped} reached the console"
        );
    }
    let seen_before = gw.upstream.count();

    // The identity header spelled with `_`, which Caddy passes on: refused.
    let r = raw(
        caddy.addr,
        "GET",
        "/campaigns",
        &[("Cookie", &cookie), ("X_Portcullis_Assertion", "spoofed")],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert!(r.body.contains("identity_header"), "{}", r.body);

    // An upgrade to HTTP/2 cleartext, which Caddy passes on to the check and then to the
    // console: once the console agreed, the connection would be a tunnel past every later
    // check. Refused, and nothing reaches the console.
    let r = raw(
        caddy.addr,
        "GET",
        "/tunnel",
        &[
            ("Cookie", &cookie),
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert!(r.body.contains("upgrade_refused"), "{}", r.body);
    assert_eq!(
        gw.upstream.count(),
        seen_before,
        "refused requests never reach the console"
    );
}
