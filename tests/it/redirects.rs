//! Return-to targets: only relative, same-origin paths survive sign-in; everything else lands on "/".

use super::harness::*;

/// Attempts at leaving the site after sign-in.
const EVIL: &[&str] = &[
    "//evil.example",
    "/\\evil.example",
    "\\/evil.example",
    "https://evil.example",
    "/%2F%2Fevil.example",
    "/%2f/evil.example",
    "/%5Cevil.example",
    "%5C%5Cevil.example",
    "\t//evil.example",
    "/\t/evil.example",
    "%09//evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "///evil.example",
    "////evil.example",
    "https://user:pass@evil.example/",
    "//user@evil.example/",
    "https://127.0.0.1.evil.example/",
    "ftp://evil.example",
    " //evil.example",
    "/%0d%0aLocation:%20https://evil.example",
    "/_portcullis/logout",
];

#[tokio::test]
async fn sign_in_never_redirects_off_site() {
    let gw = Gateway::start().await;
    let (_c, secret, _) = gw.signed_in("r@example.com").await;
    let mut evil: Vec<String> = EVIL.iter().map(|s| s.to_string()).collect();
    // The gateway's own host on another scheme, and an absolute URL to it.
    evil.push(format!("https://{}/campaigns", gw.addr));
    evil.push(format!("http://{}/campaigns", gw.addr));
    for (i, target) in evil.iter().enumerate() {
        gw.clock.advance(30);
        let c = gw.browser();
        // The login page never echoes an unsafe target into its form.
        let page = c
            .get(gw.url("/_portcullis/login"))
            .query(&[("next", target.as_str())])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains("name=\"next\" value=\"\""),
            "{target}: login page kept it"
        );
        let r = gw.password(&c, "r@example.com", PASSWORD, target).await;
        assert_eq!(location(&r), "/_portcullis/mfa", "{i} {target}");
        let r = gw.code(&c, "/_portcullis/mfa", &gw.totp_now(&secret)).await;
        assert_eq!(location(&r), "/", "{target} must not survive");
    }
}

#[tokio::test]
async fn safe_targets_survive() {
    let gw = Gateway::start().await;
    let (_c, secret, _) = gw.signed_in("s@example.com").await;
    for (target, want) in [
        ("/campaigns", "/campaigns"),
        ("/campaigns?page=2&q=a%20b", "/campaigns?page=2&q=a%20b"),
        ("/a/../api-keys", "/api-keys"),
        // The gateway's own pages that send a browser to sign in name themselves in `next`.
        ("/_portcullis/account", "/_portcullis/account"),
        ("/_portcullis/admin/users", "/_portcullis/admin/users"),
    ] {
        gw.clock.advance(30);
        let c = gw.browser();
        gw.password(&c, "s@example.com", PASSWORD, target).await;
        let r = gw.code(&c, "/_portcullis/mfa", &gw.totp_now(&secret)).await;
        assert_eq!(location(&r), want);
    }
}
