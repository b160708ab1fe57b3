//! The administration CLI, run as the real binary against a running gateway's database.

use std::time::Duration;

use portcullis::clock::Clock;

use super::harness::*;

#[tokio::test]
async fn user_disable_ends_sessions_mid_flight() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("victim@example.com").await;
    assert_eq!(
        c.get(gw.url("/campaigns")).send().await.unwrap().status(),
        200
    );
    let out = gw
        .cli(&["user", "disable", "victim@example.com"], None)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gate re-reads the user at most a second later.
    gw.clock.advance(2);
    let r = c.get(gw.url("/campaigns")).send().await.unwrap();
    assert_eq!(r.status(), 303, "disabled user is out");
    // And cannot sign in again.
    let c2 = gw.browser();
    assert_eq!(
        gw.password(&c2, "victim@example.com", PASSWORD, "")
            .await
            .status(),
        401
    );
    // Disabling again, or enabling a user who is not disabled, changes and audits nothing.
    let again = gw
        .cli(&["user", "disable", "victim@example.com"], None)
        .await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("disabled already"));
    let ev = gw.audit().await;
    let disabled = ev.iter().filter(|e| e.event == "user_disabled").count();
    assert_eq!(disabled, 1);
    assert!(ev.iter().any(
        |e| e.event == "user_disabled" && e.actor.as_deref().unwrap_or("").starts_with("cli:")
    ));
    assert!(ev.iter().any(|e| e.event == "session_ended"));
    for _ in 0..2 {
        let out = gw
            .cli(&["user", "enable", "victim@example.com"], None)
            .await;
        assert!(out.status.success());
    }
    let ev = gw.audit().await;
    assert_eq!(ev.iter().filter(|e| e.event == "user_enabled").count(), 1);
}

/// `user end-sessions` signs a user out everywhere without disabling the account: the session
/// in use stops passing, the owner is told, and a new sign-in works.
#[tokio::test]
async fn user_end_sessions_signs_out_everywhere_and_leaves_the_account_enabled() {
    let gw = Gateway::start().await;
    let (c, secret, _) = gw.signed_in("roamer@example.com").await;
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
    let mails = gw.outbox().await.len();
    let out = gw
        .cli(&["user", "end-sessions", "roamer@example.com"], None)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ended every session"));
    gw.clock.advance(2);
    assert_eq!(gw.status(&c, "/campaigns").await, 303, "the session ended");
    let ev = gw.audit().await;
    assert!(ev.iter().any(
        |e| e.event == "sessions_ended" && e.actor.as_deref().unwrap_or("").starts_with("cli:")
    ));
    let outbox = gw.outbox().await;
    assert!(outbox.len() > mails, "the owner is told");
    assert!(outbox
        .iter()
        .any(|m| m.contains("ended every session of the account")));
    let again = gw.sign_in_again("roamer@example.com", &secret).await;
    assert_eq!(gw.status(&again, "/campaigns").await, 200);
    let out = gw
        .cli(&["user", "end-sessions", "nobody@example.com"], None)
        .await;
    assert!(!out.status.success());
    // A disabled account has no sessions to end: nothing recorded, nobody mailed.
    let out = gw
        .cli(&["user", "disable", "roamer@example.com"], None)
        .await;
    assert!(out.status.success());
    let (events, mails) = (gw.audit().await.len(), gw.outbox().await.len());
    let out = gw
        .cli(&["user", "end-sessions", "roamer@example.com"], None)
        .await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no sessions to end"));
    assert_eq!(gw.audit().await.len(), events);
    assert_eq!(gw.outbox().await.len(), mails);
}

#[tokio::test]
async fn user_add_reads_the_password_from_stdin_and_enforces_policy() {
    let gw = Gateway::start().await;
    let out = gw
        .cli(
            &["user", "add", "New@Example.com", "--account", "acct-9"],
            Some("password123\n"),
        )
        .await;
    assert!(!out.status.success(), "common password refused");
    let out = gw
        .cli(
            &["user", "add", "New@Example.com", "--account", "acct-9"],
            Some("short\n"),
        )
        .await;
    assert!(!out.status.success(), "short password refused");
    // No password at all (standard input closed or an empty line) is said as such, not judged
    // as a short one.
    for (stdin, says) in [(None, "no password given"), (Some("\n"), "is empty")] {
        let out = gw
            .cli(
                &["user", "add", "New@Example.com", "--account", "acct-9"],
                stdin,
            )
            .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{err}");
    }
    let out = gw
        .cli(
            &["user", "add", "New@Example.com", "--account", "acct-9"],
            Some(&format!("{PASSWORD}\n")),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = gw
        .cli(
            &["user", "add", "new@example.com", "--account", "acct-9"],
            Some(&format!("{PASSWORD}\n")),
        )
        .await;
    assert!(!out.status.success(), "duplicate refused");
    // An address in use is said before any password is judged.
    let out = gw
        .cli(
            &["user", "add", "NEW@example.com", "--account", "acct-9"],
            Some("short\n"),
        )
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already exists"),
        "{err}"
    );
    // A look-alike of it (a Cyrillic е) is refused; an internationalised domain is kept in its
    // ASCII form, one user in either spelling.
    let add = |email: &'static str| {
        let gw = &gw;
        async move {
            let out = gw
                .cli(
                    &["user", "add", email, "--account", "acct-9"],
                    Some(&format!("{PASSWORD}\n")),
                )
                .await;
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let (ok, err) = add("n\u{435}w@example.com").await;
    assert!(
        !ok && err.contains("mixes letters of different scripts"),
        "{err}"
    );
    // Drawn alike in one script (Cyrillic) is refused; a compatibility form (fullwidth) is the
    // same user.
    let (ok, err) = add("scope@example.com").await;
    assert!(ok, "{err}");
    let (ok, err) = add("\u{455}\u{441}\u{43e}\u{440}\u{435}@example.com").await;
    assert!(
        !ok && err.contains("looks like the address of the existing user scope@example.com"),
        "{err}"
    );
    let (ok, err) = add("\u{ff4e}ew@example.com").await;
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, err) = add("u@\u{43f}\u{440}\u{438}\u{43c}\u{435}\u{440}.\u{440}\u{444}").await;
    assert!(ok, "{err}");
    let (ok, err) = add("u@xn--e1afmkfd.xn--p1ai").await;
    assert!(!ok && err.contains("already exists"), "{err}");
    let list = gw.cli(&["user", "list", "--json"], None).await;
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("\"email\":\"new@example.com\"") && text.contains("acct-9"),
        "{text}"
    );
    assert!(
        text.contains("\"email\":\"u@xn--e1afmkfd.xn--p1ai\""),
        "{text}"
    );
    // The new user can sign in (and must enrol).
    let c = gw.browser();
    assert_eq!(
        location(&gw.password(&c, "new@example.com", PASSWORD, "").await),
        "/_portcullis/enrol/totp"
    );
    let audit = gw.cli(&["audit", "tail", "--json", "-n", "50"], None).await;
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(text.contains("user_created"), "{text}");
    assert!(!text.contains(PASSWORD), "no password in the audit trail");
}

#[tokio::test]
async fn reset_mfa_needs_a_new_factor_from_the_admin_and_totp_generate_provisions() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("m@example.com").await;
    // A link issued before the reset, not used yet (it may be the one that leaked), ends with it.
    // Issued for an account with a factor, it says that the link leaves that factor in place.
    let out = gw.cli(&["user", "enrol-link", "m@example.com"], None).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("has a second factor already"),
        "{said}"
    );
    let earlier = super::admin::link_path(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(gw.status(&gw.browser(), &earlier).await, 200);
    let out = gw.cli(&["user", "reset-mfa", "m@example.com"], None).await;
    assert!(out.status.success());
    assert_eq!(gw.status(&gw.browser(), &earlier).await, 410);
    gw.clock.advance(2);
    assert_eq!(
        c.get(gw.url("/x")).send().await.unwrap().status(),
        303,
        "sessions ended"
    );
    // The password alone no longer sets up a factor (it may be a thief's): refused as a wrong
    // one; the administrator provisions one or gives an enrolment link.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("user enrol-link m@example.com"), "{text}");
    // Again: nothing is left to remove, so the owner is not mailed again; sign-ins under way
    // and unused links still end, so it is audited.
    let (events, mails) = (gw.audit().await.len(), gw.outbox().await.len());
    let out = gw.cli(&["user", "reset-mfa", "m@example.com"], None).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no second factor to remove"), "{text}");
    assert_eq!(gw.audit().await.len(), events + 1);
    assert_eq!(gw.outbox().await.len(), mails);
    let c2 = gw.browser();
    assert_eq!(
        gw.password(&c2, "m@example.com", PASSWORD, "")
            .await
            .status(),
        401
    );
    // Without a factor, nothing to say.
    let out = gw.cli(&["user", "enrol-link", "m@example.com"], None).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !said.contains("second factor already"),
        "{said}"
    );
    let out = gw
        .cli(&["user", "totp", "generate", "m@example.com"], None)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let uri = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(uri.starts_with("otpauth://totp/"), "{uri}");
    let b32 = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let secret = totp_rs::Secret::Encoded(b32.to_string())
        .to_bytes()
        .unwrap();
    gw.clock.advance(30);
    let c3 = gw.browser();
    assert_eq!(
        location(&gw.password(&c3, "m@example.com", PASSWORD, "").await),
        "/_portcullis/mfa"
    );
    assert_eq!(
        location(
            &gw.code(&c3, "/_portcullis/mfa", &gw.totp_now(&secret))
                .await
        ),
        "/"
    );
    let ev = gw.audit().await;
    assert!(ev.iter().any(|e| e.event == "totp_generated"));
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_verifiable_and_switches_kid() {
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("rot@example.com").await;
    c.get(gw.url("/a")).send().await.unwrap();
    let old_token = gw.upstream.last_token();
    let old_kid = gw.state.signer.current_kid();
    // The first key, made as the first gateway started, is on the record.
    let created = |events: Vec<portcullis::store::AuditEvent>| -> Vec<Option<String>> {
        events
            .into_iter()
            .filter(|e| e.event == "signing_key_created")
            .map(|e| e.reason)
            .collect()
    };
    let first = created(gw.audit().await);
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0]
        .as_deref()
        .unwrap_or("")
        .contains(&format!("kid:{old_kid}")));
    let out = gw.cli(&["keys", "rotate"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Published at once, signing only once every gateway and backend cache can have it.
    gw.state.signer.refresh().await.unwrap();
    assert_eq!(gw.state.signer.current_kid(), old_kid);
    // (The command stamps the key with the real clock, which may have run ahead of the test's
    // gateway clock under load: a margin on top of the lead.)
    let ahead = portcullis::token::PUBLISH_LEAD + 60;
    gw.clock.advance(ahead);
    gw.state.signer.refresh().await.unwrap();
    let new_kid = gw.state.signer.current_kid();
    assert_ne!(old_kid, new_kid);
    let jwks: serde_json::Value = gw
        .api()
        .get(gw.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(
        kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()),
        "{kids:?}"
    );
    assert!(
        portcullis::token::verify(&old_token, &jwks, "esp-console", Some(&gw.base), 5).is_ok(),
        "old token verifies during overlap"
    );
    c.get(gw.url("/b")).send().await.unwrap();
    let new_token = gw.upstream.last_token();
    assert_ne!(new_token, old_token);
    let header = jsonwebtoken::decode_header(&new_token).unwrap();
    assert_eq!(header.kid.as_deref(), Some(new_kid.as_str()));
    // (The gateway's clock is ahead of the real one: the verifier allows for it.)
    let ahead = u64::try_from(ahead).unwrap();
    portcullis::token::verify(&new_token, &jwks, "esp-console", Some(&gw.base), ahead + 5).unwrap();
    // The old key's token verifies with the CLI, as a backend would.
    let jwks_file = gw.dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let out = gw
        .cli(
            &[
                "token",
                "verify",
                &old_token,
                "--jwks",
                jwks_file.to_str().unwrap(),
            ],
            None,
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rot@example.com"));
    let url = gw.url("/.well-known/jwks.json");
    let out = gw
        .cli(
            &[
                "token",
                "verify",
                &old_token,
                "--jwks",
                &url,
                "--audience",
                "someone-else",
            ],
            None,
        )
        .await;
    assert!(!out.status.success(), "wrong audience refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wrong audience") && err.contains("expected `someone-else`"),
        "{err}"
    );
    // A refused token against a key set (the saved one unless named): what the command said on
    // standard error.
    let saved = jwks_file.to_str().unwrap().to_string();
    let refused_by = |token: String, jwks: String| {
        let gw = &gw;
        async move {
            let out = gw
                .cli(&["token", "verify", &token, "--jwks", &jwks], None)
                .await;
            assert!(!out.status.success(), "{token}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };
    let refused = |token: String| refused_by(token, saved.clone());
    // A damaged token is said to be one, in words.
    let mut damaged = old_token.clone();
    damaged.insert(old_token.rfind('.').unwrap() + 5, '!');
    for bad in [damaged.as_str(), "hello", "a.b.c"] {
        let err = refused(bad.to_string()).await;
        assert!(err.contains("not a well-formed token"), "{bad}: {err}");
    }
    // Only the algorithm the gateway signs with is taken (EdDSA here), as a backend pins it.
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_string();
    let es256 = format!(
        "{}.{}.{}",
        b64(serde_json::json!({ "alg": "ES256", "kid": kid })),
        old_token.split('.').nth(1).unwrap(),
        "c2ln"
    );
    let err = refused(es256).await;
    assert!(
        err.contains("signed with ES256") && err.contains("EdDSA"),
        "{err}"
    );
    // JSON that is no key set is said to be that, not the token's fault.
    let not_a_set = gw.dir.path().join("not-a-set.json");
    std::fs::write(&not_a_set, "{\"status\": \"ok\"}").unwrap();
    let err = refused_by(old_token.clone(), not_a_set.display().to_string()).await;
    assert!(
        err.contains("is not a key set") && !err.contains("invalid token"),
        "{err}"
    );
    // A "key set" that never ends is refused after a bounded read, not read forever.
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        gw.cli(
            &["token", "verify", &old_token, "--jwks", "/dev/zero"],
            None,
        ),
    )
    .await
    .expect("token verify --jwks /dev/zero returns");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("larger than"), "{err}");
    // Nor over HTTP: a server whose body ends only when it closes the connection, and never does.
    let endless = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = endless.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = endless.accept().await {
            tokio::spawn(async move {
                // The request first, then an answer that never ends.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                    .await;
                let chunk = vec![b' '; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let url = format!("http://{addr}/jwks.json");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        gw.cli(&["token", "verify", &old_token, "--jwks", &url], None),
    )
    .await
    .expect("token verify --jwks of an endless answer returns");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than 1 MiB"), "{err}");
}

/// `check-config` asks the stores that answer: a database that does not exist, or a Redis
/// server refusing the configured password or database, is an error (`serve` would never be
/// ready); a store not reached is a note, and the check passes.
#[tokio::test]
async fn check_config_refuses_what_the_stores_refuse() {
    let gw = Gateway::start().await;
    let unused = free_port();
    let check = |key: &str, value: String| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&gw.config_path)
            .arg("check-config")
            .env(key, value)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (key, value, why) in [
        (
            "PORTCULLIS__STORAGE__DURABLE",
            "postgres://postgres@127.0.0.1:5432/no_such_database_here".to_string(),
            "does not exist",
        ),
        (
            "PORTCULLIS__STORAGE__EPHEMERAL",
            "redis://127.0.0.1:6379/99".to_string(),
            "DB index",
        ),
        (
            "PORTCULLIS__STORAGE__EPHEMERAL",
            "redis://:not-the-password@127.0.0.1:6379/0".to_string(),
            "authentication failed",
        ),
    ] {
        let (code, err) = check(key, value);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("refused the gateway") && err.contains(why),
            "{err}"
        );
    }
    let (code, err) = check(
        "PORTCULLIS__STORAGE__EPHEMERAL",
        format!("redis://127.0.0.1:{unused}/0"),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("Redis was not reached"), "{err}");
    // A single server named as a cluster: the setting and the fix are named.
    let (code, err) = check(
        "PORTCULLIS__STORAGE__EPHEMERAL",
        "redis+cluster://127.0.0.1:6379".to_string(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("storage.ephemeral names a cluster") && err.contains("use redis://"),
        "{err}"
    );
}

/// A secret file every user of the machine may read is pointed out, by its key and path; one
/// kept to the gateway's user is not.
#[tokio::test]
async fn a_world_readable_master_key_file_is_pointed_out() {
    use std::os::unix::fs::PermissionsExt;
    let gw = Gateway::start().await;
    let key = gw.master_key();
    let mk = gw.dir.path().join("mk-open");
    std::fs::write(&mk, &key).unwrap();
    let config = gw.dir.path().join("from-file.toml");
    let text = std::fs::read_to_string(&gw.config_path).unwrap().replace(
        &format!("master_key = \"{key}\""),
        &format!("master_key_file = \"{}\"", mk.display()),
    );
    assert!(text.contains("master_key_file"));
    std::fs::write(&config, text).unwrap();
    let check = |mode: u32| {
        std::fs::set_permissions(&mk, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&config)
            .arg("check-config")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(0o644);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("readable by every user") && err.contains("secrets.master_key"),
        "{err}"
    );
    let (code, err) = check(0o602);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("writable by every user"), "{err}");
    let (code, err) = check(0o640);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("by every user"), "{err}");
    // A configuration without secrets may be read by all, not changed by all (what it says the
    // gateway guards would be anyone's to change); an SMTP URL without a password is no secret,
    // one with a password is.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o646)).unwrap();
    let (_, err) = check(0o640);
    assert!(
        err.contains("(the configuration) is writable by every user"),
        "{err}"
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("[notify]\n"), "{text}");
    for (url, secret) in [
        ("smtp://127.0.0.1:2525", false),
        ("smtp://mailer:pw@127.0.0.1:2525", true),
    ] {
        let with = text.replace("[notify]\n", &format!("[notify]\nsmtp_url = \"{url}\"\n"));
        std::fs::write(&config, with).unwrap();
        let (_, err) = check(0o640);
        assert_eq!(
            err.contains("(the configuration, with secrets in it) is readable"),
            secret,
            "{url}: {err}"
        );
    }
    // The key written in the configuration itself: the file is what must be kept private.
    std::fs::set_permissions(&gw.config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&gw.config_path)
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the configuration, with secrets in it") && err.contains("readable"),
        "{err}"
    );
}

#[tokio::test]
async fn check_config_validates_and_redacts() {
    let gw = Gateway::start().await;
    let out = gw.cli(&["check-config"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[redacted]"));
    // The tests' gateway answers on an IP address: keys are off in effect, and it says so.
    let webauthn = text.split("[webauthn]").nth(1).unwrap_or_default();
    assert!(webauthn.contains("enabled = false"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("IP"));
    let key = gw.master_key();
    assert!(!text.contains(&key));
    let bad = gw.dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.bogus"));
    // What `serve` would refuse at start-up, `check-config` refuses too, naming it.
    let mk = gw.dir.path().join("mk");
    std::fs::write(&mk, &key).unwrap();
    for (text, named) in [
        ("[server]\nlisten = \"127.0.0.1:1\"\n".to_string(), "secrets.master_key"),
        (
            format!(
                "[secrets]\nmaster_key_file = \"{}\"\n[server]\npublic_url = \"https://gw.example/\"\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"\n",
                mk.display()
            ),
            "/nonexistent.pem",
        ),
        (
            format!("[secrets]\nmaster_key_file = \"{}\"\n[log]\nlevel = \"warning\"\n", mk.display()),
            "log.level",
        ),
        (
            format!(
                "[secrets]\nmaster_key_file = \"{}\"\n[risk]\ngeoip_database = \"{}/tests/data/geoip-asn-test.mmdb\"\n",
                mk.display(),
                env!("CARGO_MANIFEST_DIR")
            ),
            "risk.geoip_database",
        ),
        (
            format!(
                "[secrets]\nmaster_key_file = \"{}\"\n[notify]\noutbox_dir = \"/proc/nonexistent/outbox\"\n",
                mk.display()
            ),
            "notify.outbox_dir",
        ),
        (
            format!(
                "[secrets]\nmaster_key_file = \"{}\"\n[storage]\ndurable = \"sqlite://{}/no-such-dir/p.sqlite\"\n",
                mk.display(),
                gw.dir.path().display()
            ),
            "storage.durable",
        ),
        (
            format!(
                "[secrets]\nmaster_key_file = \"{}\"\n[storage]\ndurable = \"sqlite://{}\"\n",
                mk.display(),
                gw.dir.path().display()
            ),
            "is a directory",
        ),
        (
            format!(
                "[secrets]\nmaster_key_file = \"{}\"\n[storage]\ndurable = \"sqlite:///dev/null\"\n",
                mk.display()
            ),
            "not a regular file",
        ),
        (
            format!(
                "[secrets]\nmaster_key_file = \"{}\"\n[storage]\ndurable = \"postgres://u:pw@127.0.0.1:5432/db?sslmode=bogus\"\n",
                mk.display()
            ),
            "storage.durable",
        ),
    ] {
        std::fs::write(&bad, &text).unwrap();
        for command in ["check-config", "serve"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args([command, "--config", bad.to_str().unwrap()])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{command} accepted {text}");
            assert!(err.contains(named), "{command}: {err}");
            assert!(!err.contains("listening"), "{command}: {err}");
        }
    }
}

#[tokio::test]
async fn audit_prune_removes_only_events_past_the_retention_and_is_itself_audited() {
    let gw = Gateway::start().await;
    gw.signed_in("keeper@example.com").await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let day = 86_400;
    let old = |at: i64, reason: &str| {
        portcullis::store::AuditEvent::new("login_password", "denied", at).reason(reason)
    };
    gw.state
        .durable
        .append_audit(&[
            old(now - 400 * day, "ancient-1"),
            old(now - 400 * day, "ancient-2"),
            old(now - 31 * day, "ancient-3"),
            old(now - 10 * day, "recent"),
        ])
        .await
        .unwrap();
    let before = gw.audit().await;

    // A retention shorter than a day, one reaching back before 1970, or one that is not a
    // duration removes nothing.
    for bad in ["1m", "23h", "soon", "", "99999999999d", "3000years"] {
        let out = gw.cli(&["audit", "prune", "--older-than", bad], None).await;
        assert!(!out.status.success(), "--older-than {bad:?} accepted");
        assert!(!out.stderr.is_empty(), "--older-than {bad:?}: no message");
    }
    let out = gw
        .cli(&["audit", "prune", "--older-than", "1m"], None)
        .await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be at least 1d"));
    // No unit, or no duration: the form to give, never an example that is then refused.
    for bad in ["400", "banana"] {
        let out = gw.cli(&["audit", "prune", "--older-than", bad], None).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("such as 400d") && !err.contains("400ms"),
            "{err}"
        );
    }
    assert_eq!(gw.audit().await, before);

    let out = gw
        .cli(&["audit", "prune", "--older-than", "30d"], None)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("removed 3 audit events from before "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = gw.audit().await;
    let reasons = |evs: &[portcullis::store::AuditEvent]| -> Vec<String> {
        evs.iter().filter_map(|e| e.reason.clone()).collect()
    };
    let kept = reasons(&after);
    assert!(kept.iter().all(|r| !r.starts_with("ancient")), "{kept:?}");
    assert!(kept.contains(&"recent".to_string()));
    // Everything else of the trail (the sign-in just now) is still there, plus the removal.
    for e in before.iter().filter(|e| e.at > now - 30 * day) {
        assert!(after.contains(e), "{e:?} removed");
    }
    let pruned: Vec<_> = after.iter().filter(|e| e.event == "audit_pruned").collect();
    assert_eq!(pruned.len(), 1);
    assert!(pruned[0].actor.as_deref().unwrap_or("").starts_with("cli:"));
    assert!(pruned[0]
        .reason
        .as_deref()
        .unwrap_or("")
        .ends_with(",removed:3"));
    // Its start is on the record too, written before anything went.
    let started: Vec<_> = after
        .iter()
        .filter(|e| e.event == "audit_prune_started")
        .collect();
    assert_eq!(started.len(), 1);
    assert_eq!(
        started[0]
            .reason
            .as_deref()
            .map(|r| r.starts_with("before:")),
        Some(true)
    );
    assert_eq!(after.len(), before.len() - 3 + 2);
}

/// The audit trail names the process's real user, not what `$USER` claims.
#[tokio::test]
async fn the_acting_user_is_the_real_one_not_dollar_user() {
    let gw = Gateway::start().await;
    gw.add_user("actor@example.com").await;
    for (action, user) in [("disable", Some("fakeadmin")), ("enable", None)] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.arg("--config")
            .arg(&gw.config_path)
            .args(["user", action, "actor@example.com"]);
        match user {
            Some(u) => cmd.env("USER", u),
            None => cmd.env_remove("USER"),
        };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let actors: Vec<String> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "user_disabled" || e.event == "user_enabled")
        .filter_map(|e| e.actor)
        .collect();
    assert_eq!(actors.len(), 2, "{actors:?}");
    assert_eq!(actors[0], actors[1], "the same user both times");
    assert!(actors[0].starts_with("cli:"), "{actors:?}");
    assert!(
        !actors[0].contains("fakeadmin") && !actors[0].contains("unknown"),
        "{actors:?}"
    );
}

/// Whatever a client types as its address, `audit tail` prints one line per event: an address
/// that is not one (a password typed into the wrong field, text forging another event with a
/// line break, terminal escapes) is not kept; an unknown address that is one is.
#[tokio::test]
async fn audit_tail_keeps_no_typed_password_and_no_forged_lines() {
    let gw = Gateway::start().await;
    let forged = "nobody@example.com ip=203.0.113.9 reason=unknown_user\n\
                  2026-12-06T10:40:00Z login_password success user=bob@example.com ip=10.0.0.1\r\u{1b}[2J";
    for typed in [forged, "zebra-quantum-al-991!", "ghost@example.com"] {
        gw.clock.advance(30);
        gw.password(&gw.browser(), typed, "not the password 123", "")
            .await;
    }
    gw.audit().await;
    let out = gw.cli(&["audit", "tail", "-n", "10"], None).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("login_password"))
        .collect();
    assert_eq!(failures.len(), 3, "one line per attempt:\n{text}");
    assert!(failures.iter().all(|l| l.contains(" failure ")), "{text}");
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    assert!(!text.contains("zebra-quantum"), "{text}");
    assert!(text.contains("user=ghost@example.com"), "{text}");
    let json = gw.cli(&["audit", "tail", "--json", "-n", "10"], None).await;
    assert!(!String::from_utf8_lossy(&json.stdout).contains("zebra-quantum"));
}

/// `audit tail -n 0` prints nothing, and a reader that goes away (`| head`) is no error.
#[tokio::test]
async fn audit_tail_prints_what_is_asked_and_a_closed_pipe_is_no_error() {
    let gw = Gateway::start().await;
    gw.signed_in("tail@example.com").await;
    gw.audit().await;
    for args in [
        &["audit", "tail", "-n", "0"][..],
        &["audit", "tail", "-n", "0", "--json"],
    ] {
        let out = gw.cli(args, None).await;
        assert!(out.status.success());
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = gw.cli(&["audit", "tail", "-n", "2"], None).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    // Output closed before anything is written: a listing just ends; any other command says it
    // could not write its answer (exit 1), and none panics.
    let closed = |args: &[&str]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&gw.config_path)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for listing in [&["audit", "tail", "-n", "1000"][..], &["user", "list"]] {
        let (code, err) = closed(listing);
        assert_eq!(code, Some(0), "{listing:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{err}");
    }
    let (code, err) = closed(&["user", "enable", "tail@example.com"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot write to standard output"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A closed standard error costs a command its notes, not its result.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&gw.config_path)
        .arg("check-config")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[server]"));
}

/// A command run without any configuration says what it runs on instead of quietly using a
/// database in the working directory.
#[tokio::test]
async fn a_command_without_a_config_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(dir.path())
        .env_remove("PORTCULLIS_CONFIG")
        .args(["user", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no --config") && err.contains("portcullis.sqlite"),
        "{err}"
    );
    // A command that only reads finds no database there and says so, creating none.
    assert_eq!(out.status.code(), Some(1), "{err}");
    // `token verify` uses no database: the note names none.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(dir.path())
        .env_remove("PORTCULLIS_CONFIG")
        .args([
            "token",
            "verify",
            "x.y.z",
            "--jwks",
            "http://127.0.0.1:1/jwks.json",
        ])
        .output()
        .unwrap();
    let verify_err = String::from_utf8_lossy(&out.stderr);
    assert!(
        verify_err.contains("no --config") && !verify_err.contains("database"),
        "{verify_err}"
    );
    assert!(err.contains("there is no database at"), "{err}");
    // So does any command that does not create a user: it would fail anyway, and leave an
    // empty database behind for the next command to show as if it were the real one.
    for args in [
        &["user", "list"][..],
        &["audit", "tail"][..],
        &["user", "disable", "x@example.com"][..],
        &["user", "enrol-link", "x@example.com"][..],
        &["keys", "rotate"][..],
        &["audit", "prune", "--older-than", "400d"][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .current_dir(dir.path())
            .env_remove("PORTCULLIS_CONFIG")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("there is no database at"), "{args:?}: {err}");
        assert!(!dir.path().join("portcullis.sqlite").exists(), "{args:?}");
    }
}

/// `PORTCULLIS_CONFIG=` (an empty value, as a template that filled in nothing leaves it) is
/// refused by its name, not read as defaults nor as a `--config` missing its value.
#[test]
fn an_empty_config_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(dir.path())
        .env("PORTCULLIS_CONFIG", "")
        .args(["user", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PORTCULLIS_CONFIG is set but empty"), "{err}");
    assert!(!dir.path().join("portcullis.sqlite").exists());
    // A file named on the command line is read, as it is over a variable that names one.
    let file = dir.path().join("named.toml");
    std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").unwrap();
    for args in [
        vec![
            "--config".to_string(),
            file.display().to_string(),
            "check-config".into(),
        ],
        vec![
            format!("--config={}", file.display()),
            "check-config".into(),
        ],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .env("PORTCULLIS_CONFIG", "")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("server.bogus"), "{args:?}: {err}");
    }
}

/// A variable that is not UTF-8 text in the environment: someone else's is passed over, one
/// meant for the gateway is refused by its name, its value (a password, say) never shown.
#[test]
fn environment_variables_that_are_not_text_neither_crash_nor_show() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, value: &[u8]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .current_dir(dir.path())
            .env_remove("PORTCULLIS_CONFIG")
            .env(name, std::ffi::OsStr::from_bytes(value))
            .args(["user", "list"])
            .output()
            .unwrap()
    };
    let out = run("SOMEONE_ELSES", b"caf\xe9");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("there is no database at"), "{err}");
    let out = run(
        "PORTCULLIS__NOTIFY__SMTP_URL",
        b"smtps://mailer:Tr0ub4dor\xa7secret@smtp.example.com:465",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("PORTCULLIS__NOTIFY__SMTP_URL") && err.contains("not UTF-8"),
        "{err}"
    );
    assert!(
        !err.contains("Tr0ub4dor") && !err.contains("panicked"),
        "{err}"
    );
}

/// A command run with another master key than the gateways' is refused before it writes
/// anything: a signing key or TOTP secret sealed with it could never be opened (a rotation with
/// it stopped every gateway from starting again). `check-config` says so too.
#[tokio::test]
async fn commands_with_the_wrong_master_key_change_nothing() {
    let gw = Gateway::start().await;
    let (_, _, _) = gw.signed_in("mk@example.com").await;
    let user = gw.user("mk@example.com").await;
    let totp_before = gw.state.durable.totp(&user.id).await.unwrap();
    let keys_before = gw
        .state
        .durable
        .live_signing_keys(gw.clock.now())
        .await
        .unwrap()
        .len();
    let wrong = portcullis::crypto::MasterKey::generate_base64();
    let run = |args: &'static [&'static str]| {
        let (config, wrong) = (gw.config_path.clone(), wrong.clone());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .arg("--config")
                .arg(&config)
                .args(args)
                .env("PORTCULLIS__SECRETS__MASTER_KEY", wrong)
                .output()
                .await
                .unwrap()
        }
    };
    for args in [
        &["keys", "rotate"][..],
        &["user", "totp", "generate", "mk@example.com"][..],
        &["check-config"][..],
    ] {
        let out = run(args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("master key is not the one this database was set up with"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(gw.state.durable.totp(&user.id).await.unwrap(), totp_before);
    assert_eq!(
        gw.state
            .durable
            .live_signing_keys(gw.clock.now())
            .await
            .unwrap()
            .len(),
        keys_before
    );
    // The gateway's own key passes the same check.
    let out = gw.cli(&["check-config"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Before any gateway has started on a database (no signing key yet, the usual moment to set up
/// users), the first command that brings a master key makes it the database's: a later command
/// with another key is refused before it seals anything; the right key carries on. The new
/// database file is its owner's alone.
#[tokio::test]
async fn a_new_database_keeps_the_master_key_it_was_set_up_with() {
    let dir = tempfile::tempdir().unwrap();
    let right = portcullis::crypto::MasterKey::generate_base64();
    let wrong = portcullis::crypto::MasterKey::generate_base64();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndurable = \"sqlite://{}\"\n[secrets]\nmaster_key = \"{right}\"\n\
             [password]\nargon2_memory_kib = 1024\nargon2_iterations = 1\n",
            dir.path().join("db.sqlite").display()
        ),
    )
    .unwrap();
    let run = |args: &'static [&'static str], key: Option<&str>, stdin: String| {
        let config = config.clone();
        let key = key.map(str::to_string);
        async move {
            use tokio::io::AsyncWriteExt;
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
            cmd.arg("--config").arg(&config).args(args);
            if let Some(k) = key {
                cmd.env("PORTCULLIS__SECRETS__MASTER_KEY", k);
            }
            cmd.stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn().unwrap();
            let mut input = child.stdin.take().unwrap();
            input.write_all(stdin.as_bytes()).await.unwrap();
            drop(input);
            child.wait_with_output().await.unwrap()
        }
    };
    let add = &["user", "add", "first@example.com", "--account", "acme"];
    let out = run(add, None, format!("{PASSWORD}\n")).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The new database holds password hashes: its owner alone may read it (SQLite gives its
    // -wal and -shm files the database file's mode).
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir.path().join("db.sqlite")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    for args in [
        &["keys", "rotate"][..],
        &["user", "totp", "generate", "first@example.com"][..],
        &["check-config"][..],
    ] {
        let out = run(args, Some(&wrong), String::new()).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("not the one this database was set up with"),
            "{args:?}: {err}"
        );
    }
    // A database from before the check value existed, holding a TOTP secret and no signing
    // key: the secret decides, and check-config only looks.
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(run(
        &["user", "totp", "generate", "first@example.com"],
        None,
        String::new(),
    )
    .await);
    let db = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let take_claim = || {
        let db = db.clone();
        async move {
            use sqlx::{Connection, Executor, Row};
            let mut c = sqlx::SqliteConnection::connect(&db).await.unwrap();
            let n = c.fetch_one("SELECT COUNT(*) FROM meta").await.unwrap();
            let n: i64 = n.get(0);
            c.execute("DELETE FROM meta").await.unwrap();
            n
        }
    };
    assert_eq!(take_claim().await, 1);
    for args in [&["keys", "rotate"][..], &["check-config"][..]] {
        let out = run(args, Some(&wrong), String::new()).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
    ok(run(&["check-config"], None, String::new()).await);
    assert_eq!(take_claim().await, 0, "check-config writes nothing");
    // The right key carries on, and claims the database again.
    ok(run(&["keys", "rotate"], None, String::new()).await);
    ok(run(&["check-config"], None, String::new()).await);
    assert_eq!(take_claim().await, 1);
    // An earlier version's database with a signing key: the key decides.
    let out = run(&["keys", "rotate"], Some(&wrong), String::new()).await;
    assert_eq!(out.status.code(), Some(1));
    ok(run(&["keys", "rotate"], None, String::new()).await);
}

/// check-config refuses what serve would stop on: mail written to an outbox that is a file.
#[tokio::test]
async fn check_config_refuses_an_outbox_that_is_a_file() {
    let gw = Gateway::start().await;
    let file = gw.dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&gw.config_path)
        .arg("check-config")
        .env("PORTCULLIS__NOTIFY__OUTBOX_DIR", &file)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("notify.outbox_dir") && err.contains("not a directory"),
        "{err}"
    );
}

/// `portcullis demo` on `data` and the two ports, with standard output piped; its
/// configuration file, if any, given as `PORTCULLIS_CONFIG` (`by_env`) or with `--config`.
fn demo_command(
    config: Option<(&std::path::Path, bool)>,
    data: &std::path::Path,
    port: u16,
    console: u16,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.env_remove("PORTCULLIS_CONFIG");
    match config {
        Some((file, true)) => {
            cmd.env("PORTCULLIS_CONFIG", file);
        }
        Some((file, false)) => {
            cmd.arg("--config").arg(file);
        }
        None => {}
    }
    cmd.arg("demo")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--console-listen", &format!("127.0.0.1:{console}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    cmd
}

/// `portcullis demo` applies a configuration file given with `--config` or `PORTCULLIS_CONFIG`
/// (its step-up rules, limits, trusted proxies…), keeping only its own addresses and paths.
#[tokio::test]
async fn the_demo_applies_a_configuration_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.toml");
    std::fs::write(
        &file,
        "[server]\nmax_uri_length = 1024\n[notify]\nsmtp_url = \"smtp://127.0.0.1:1\"\n",
    )
    .unwrap();
    for by_env in [false, true] {
        let (port, console) = (free_port(), free_port());
        let data = dir.path().join(format!("data-{by_env}"));
        let mut child = demo_command(Some((&file, by_env)), &data, port, console)
            .spawn()
            .unwrap();
        let client = reqwest::Client::new();
        let long = format!("http://127.0.0.1:{port}/{}", "a".repeat(3000));
        let mut status = None;
        for _ in 0..300 {
            if let Ok(r) = client.get(&long).send().await {
                status = Some(r.status().as_u16());
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(status, Some(414), "by_env {by_env}: {stdout}");
        assert!(
            stdout.contains("demo.toml applies, except what the demo sets itself"),
            "{stdout}"
        );
        // The banner says what the user has to do next: started again on the same data, whose
        // user has not set up a second factor yet, it still asks for the app, not a code.
        assert!(stdout.contains("scan the QR code"), "{stdout}");
        // Mail goes out by the file's SMTP server, not into .eml files.
        assert!(
            stdout.contains("sent by SMTP") && !stdout.contains(".eml"),
            "{stdout}"
        );
        if !by_env {
            let (port, console) = (free_port(), free_port());
            let mut again = demo_command(None, &data, port, console).spawn().unwrap();
            let url = format!("http://127.0.0.1:{port}/_portcullis/healthz");
            for _ in 0..300 {
                if client.get(&url).send().await.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            again.kill().unwrap();
            let out = again.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains("scan the QR code") && !stdout.contains("enrolled earlier"),
                "{stdout}"
            );
        }
    }
}

/// A demo started with a relative data directory writes CLI settings that work from any
/// directory, and prints a password the account page's policy accepts (nothing of the address).
#[tokio::test]
async fn the_demos_cli_settings_work_from_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (port, console) = (free_port(), free_port());
    let mut cmd = demo_command(None, std::path::Path::new("rel-data"), port, console);
    let mut child = cmd.current_dir(dir.path()).spawn().unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/_portcullis/healthz");
    for _ in 0..300 {
        if client.get(&url).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let settings = dir.path().join("rel-data/portcullis.toml");
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .env_remove("PORTCULLIS_CONFIG")
        .arg("--config")
        .arg(&settings)
        .args(["user", "list"])
        .current_dir("/")
        .output()
        .unwrap();
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("demo@example.com"));
    let password = stdout
        .split("with password: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        password.len() >= 12 && !password.to_lowercase().contains("demo"),
        "{password}"
    );
}

/// A second demo started on a running one's data and one of its addresses fails before it
/// changes anything: the CLI settings the running demo wrote (its address, for enrolment links)
/// stay as they are.
#[tokio::test]
async fn a_demo_that_cannot_start_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let demo = |listen: u16, console: u16| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.env_remove("PORTCULLIS_CONFIG")
            .arg("demo")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--console-listen", &format!("127.0.0.1:{console}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let (port, console) = (free_port(), free_port());
    let mut running = demo(port, console).spawn().unwrap();
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..300 {
        let url = format!("http://127.0.0.1:{port}/_portcullis/healthz");
        if client.get(&url).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let settings = std::fs::read_to_string(data.join("portcullis.toml"));
    // (Given a database of its own in a variable, which the demo does not use: it says so.)
    let second = demo(free_port(), console)
        .env("PORTCULLIS__STORAGE__DURABLE", "sqlite:///elsewhere.sqlite")
        .output()
        .unwrap();
    let same_twice = demo(port + 1, port + 1).output().unwrap();
    let every_address = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .env_remove("PORTCULLIS_CONFIG")
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .args(["--listen", &format!("0.0.0.0:{}", port + 2)])
        .args(["--console-listen", &format!("127.0.0.1:{}", port + 2)])
        .output()
        .unwrap();
    running.kill().unwrap();
    running.wait().unwrap();
    assert!(up, "the first demo did not start");
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{console}")),
        "{err}"
    );
    assert!(
        err.contains("the demo sets storage (a SQLite file in --data-dir"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("portcullis.toml")).unwrap(),
        settings.unwrap(),
        "the running demo's settings were rewritten"
    );
    for overlapping in [same_twice, every_address] {
        let err = String::from_utf8_lossy(&overlapping.stderr);
        assert!(err.contains("need an address each"), "{err}");
    }
}

/// An admin signs in with a security key: where keys cannot work (a `public_url` without a
/// domain name), `user add --admin` refuses as `admin bootstrap` does, instead of creating an
/// admin who can never reach the admin console.
#[tokio::test]
async fn user_add_admin_needs_security_keys_to_work() {
    let gw = Gateway::start().await;
    let out = gw
        .cli(
            &[
                "user",
                "add",
                "boss@example.com",
                "--account",
                "ops",
                "--admin",
            ],
            Some("a long enough admin passphrase\n"),
        )
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admins sign in with a security key"), "{err}");
    assert!(gw
        .state
        .durable
        .user_by_email("boss@example.com")
        .await
        .unwrap()
        .is_none());
}

/// `check-config` on a new, empty PostgreSQL database says that it has no tables yet (a normal
/// state before the first start), not that storage is unavailable; it creates none.
#[tokio::test]
async fn check_config_on_an_empty_postgres_database_says_it_is_new() {
    let gw = Gateway::start().await;
    let (db, durable) = fresh_database().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config"])
        .arg(&gw.config_path)
        .env("PORTCULLIS__STORAGE__DURABLE", &durable)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    // A role that may connect but neither sees the tables nor may create them (PostgreSQL 15
    // leaves `public` to the database's owner): the gateway could never start on it.
    let role = format!("r_{}", &db[2..14]);
    let (tables, refused) = {
        use sqlx::{Connection, Executor};
        let mut c = sqlx::PgConnection::connect(&durable).await.unwrap();
        c.execute(format!("CREATE ROLE {role} LOGIN").as_str())
            .await
            .unwrap();
        c.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            .await
            .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check-config", "--config"])
            .arg(&gw.config_path)
            .env(
                "PORTCULLIS__STORAGE__DURABLE",
                durable.replace("postgres@", &format!("{role}@")),
            )
            .output()
            .unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        (tables, out)
    };
    drop_database(&db).await;
    {
        use sqlx::{Connection, Executor};
        let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/test")
            .await
            .unwrap();
        admin
            .execute(format!("DROP ROLE IF EXISTS {role}").as_str())
            .await
            .unwrap();
    }
    assert!(out.status.success(), "{err}");
    assert!(err.contains("has no tables yet"), "{err}");
    assert!(!err.contains("does not exist"), "{err}");
    assert_eq!(tables, 0, "nothing written");
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{refusal}");
    assert!(refusal.contains("may not create them"), "{refusal}");
}

/// A database that cannot be reached is named (without its password) with the cause, not only
/// "the pool timed out".
#[tokio::test]
async fn an_unreachable_database_is_named_with_its_cause() {
    let port = free_port();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["user", "list"])
        .env(
            "PORTCULLIS__SECRETS__MASTER_KEY",
            portcullis::crypto::MasterKey::generate_base64(),
        )
        .env(
            "PORTCULLIS__STORAGE__DURABLE",
            format!("postgres://app:s3cret@127.0.0.1:{port}/esp?sslmode=disable"),
        )
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}/esp")) && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

/// A SQLite database the gateway's user may not write — the file, or the directory SQLite keeps
/// its `-wal` and `-shm` files in — is named with its cause by `check-config` and by every
/// command, not as a server that did not answer in time. Run as another
/// user (nobody) where the tests run as root, for whom permission bits do not count.
#[tokio::test]
async fn a_database_the_gateways_user_cannot_write_is_named_at_once() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let set_mode = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    set_mode(base.path(), 0o755);
    let root = rustix::process::geteuid().is_root();
    // The binary where the other user can reach it (the checkout may sit in a private directory).
    let bin = base.path().join("portcullis");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_portcullis"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_portcullis"), &bin).unwrap();
    }
    set_mode(&bin, 0o755);
    let db_dir = base.path().join("db");
    let outbox = base.path().join("outbox");
    std::fs::create_dir(&db_dir).unwrap();
    std::fs::create_dir(&outbox).unwrap();
    set_mode(&outbox, 0o777);
    let db = db_dir.join("portcullis.sqlite");
    let key = portcullis::crypto::MasterKey::generate_base64();
    let listen = format!("127.0.0.1:{}", free_port());
    let run = |args: &[&str], other_user: bool| {
        let mut cmd = if other_user && root {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin);
            c
        } else {
            std::process::Command::new(&bin)
        };
        let mut child = cmd
            .args(args)
            .current_dir(base.path())
            .env("PORTCULLIS__SECRETS__MASTER_KEY", &key)
            .env(
                "PORTCULLIS__STORAGE__DURABLE",
                format!("sqlite://{}", db.display()),
            )
            .env("PORTCULLIS__NOTIFY__OUTBOX_DIR", &outbox)
            .env("PORTCULLIS__SERVER__PUBLIC_URL", "http://127.0.0.1:9/")
            .env("PORTCULLIS__UPSTREAM__URL", "http://127.0.0.1:9/")
            .env("PORTCULLIS__SERVER__LISTEN", &listen)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, format!("{PASSWORD}\n").as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };
    // The directory is not the user's: root's, or without write permission.
    if !root {
        set_mode(&db_dir, 0o555);
    }
    for args in [&["check-config"][..], &["serve"]] {
        let (code, err) = run(args, true);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&db_dir.display().to_string())
                && err.contains("cannot be written")
                && err.contains("-wal"),
            "{args:?}: {err}"
        );
    }
    assert!(!db.exists(), "nothing was created");
    // The database made by its owner, then kept from the other user: the file is named.
    set_mode(&db_dir, 0o755);
    let (code, err) = run(&["user", "add", "a@example.com", "--account", "a"], false);
    assert_eq!(code, Some(0), "{err}");
    set_mode(&db, 0o600);
    if !root {
        set_mode(&db, 0o400);
    }
    for args in [&["check-config"][..], &["user", "list"]] {
        let (code, err) = run(args, true);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&db.display().to_string()) && err.contains("cannot be read and written"),
            "{args:?}: {err}"
        );
    }
    // Given to the other user, it opens.
    if root {
        let nobody = Some(rustix::fs::Uid::from_raw(65534));
        for end in ["", "-wal", "-shm"] {
            let mut p = db.as_os_str().to_owned();
            p.push(end);
            if std::path::Path::new(&p).exists() {
                rustix::fs::chown(std::path::Path::new(&p), nobody, None).unwrap();
            }
        }
        rustix::fs::chown(db_dir.as_path(), nobody, None).unwrap();
    } else {
        set_mode(&db, 0o600);
    }
    let (code, err) = run(&["check-config"], true);
    assert_eq!(code, Some(0), "{err}");
}

/// `keys rotate` from a configuration whose `token.algorithm` is not the one the gateways sign
/// with (a stale file, a stray variable) would switch every gateway, and backends pinning the
/// old algorithm would refuse every token: it changes nothing unless the switch is confirmed,
/// and says so when it is.
#[tokio::test]
async fn a_rotation_that_would_switch_the_algorithm_must_be_confirmed() {
    let gw = Gateway::start().await;
    let before = gw.state.durable.live_signing_keys(0).await.unwrap().len();
    let es256 = [("PORTCULLIS__TOKEN__ALGORITHM", "ES256")];
    // `check-config` says what `serve` would warn of at start.
    let out = gw.cli_env(&["check-config"], None, &es256).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && err.contains("the current signing key is EdDSA, not token.algorithm (ES256)"),
        "{err}"
    );
    let out = gw.cli_env(&["keys", "rotate"], None, &es256).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sign with EdDSA") && err.contains("--switch-algorithm ES256"),
        "{err}"
    );
    assert_eq!(
        gw.state.durable.live_signing_keys(0).await.unwrap().len(),
        before
    );
    // A confirmation naming another algorithm than the configured one, or one where nothing
    // switches, is refused too.
    let out = gw
        .cli_env(
            &["keys", "rotate", "--switch-algorithm", "EdDSA"],
            None,
            &es256,
        )
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match") && err.contains("(ES256)"),
        "{err}"
    );
    // An algorithm the gateway does not sign with is refused as such.
    let out = gw
        .cli(&["keys", "rotate", "--switch-algorithm", "RS256"], None)
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("RS256") && err.contains("ES256"),
        "{err}"
    );
    let out = gw
        .cli(&["keys", "rotate", "--switch-algorithm", "EdDSA"], None)
        .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already"));
    // Asking to switch without the configuration saying so: told what to set.
    let out = gw
        .cli(&["keys", "rotate", "--switch-algorithm", "ES256"], None)
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("token.algorithm = \"ES256\""),
        "{err}"
    );
    assert_eq!(
        gw.state.durable.live_signing_keys(0).await.unwrap().len(),
        before
    );
    // Confirmed: the new key is ES256 and the output says every gateway switches.
    let out = gw
        .cli_env(
            &["keys", "rotate", "--switch-algorithm", "ES256"],
            None,
            &es256,
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("(ES256)") && said.contains("from EdDSA to ES256"),
        "{said}"
    );
    let current = portcullis::token::current_algorithm(gw.state.durable.as_ref(), i64::MAX / 4)
        .await
        .unwrap();
    assert_eq!(current.as_deref(), Some("ES256"));
    // A plain rotation within the configured algorithm needs no option.
    let out = gw.cli(&["keys", "rotate"], None).await;
    assert!(!out.status.success(), "EdDSA config against ES256 keys now");
    // Meanwhile the gateway still signs with EdDSA (90 s), and backends accept both: so does
    // `token verify` when told to; with the new configuration alone it says how.
    let (c, _, _) = gw.signed_in("switch@example.com").await;
    c.get(gw.url("/a")).send().await.unwrap();
    let token = gw.upstream.last_token();
    let jwks = gw.url("/.well-known/jwks.json");
    let verify = |extra: &'static [&'static str]| {
        let mut args = vec!["token", "verify", token.as_str(), "--jwks", jwks.as_str()];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let gw = &gw;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            gw.cli_env(&args, None, &es256).await
        }
    };
    let out = verify(&[]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("signed with EdDSA")
            && err.contains("--algorithm ES256 --algorithm EdDSA"),
        "{err}"
    );
    let out = verify(&["--algorithm", "ES256", "--algorithm", "EdDSA"]).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("switch@example.com"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = verify(&["--algorithm", "ES384"]).await;
    assert!(!out.status.success());
}

/// A least-privilege database role (reads and writes the gateway's tables, may not create in
/// the schema) runs the gateway once the tables are set up; one that may only read them is
/// named by `check-config`, not found out at the first sign-in.
#[tokio::test]
async fn a_least_privilege_database_role_runs_and_a_read_only_one_is_named() {
    let gw = Gateway::start().await;
    let (db, durable) = fresh_database().await;
    let run = |url: String, args: &'static [&'static str]| {
        let config = gw.config_path.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .arg("--config")
                .arg(config)
                .args(args)
                .env("PORTCULLIS__STORAGE__DURABLE", url)
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .unwrap()
        }
    };
    // Set up by the owner (the first command migrates).
    let out = run(durable.clone(), &["user", "list"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (app, reader) = (format!("a_{}", &db[2..14]), format!("r_{}", &db[2..14]));
    {
        use sqlx::{Connection, Executor};
        let mut c = sqlx::PgConnection::connect(&durable).await.unwrap();
        for sql in [
            format!("CREATE ROLE {app} LOGIN"),
            format!("CREATE ROLE {reader} LOGIN"),
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC".into(),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app}"),
            format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {app}"),
            format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader}"),
        ] {
            c.execute(sql.as_str()).await.unwrap();
        }
    }
    let as_role = |role: &str| durable.replace("postgres@", &format!("{role}@"));
    let checked = run(as_role(&app), &["check-config"]).await;
    let added = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&gw.config_path)
        .args(["user", "add", "least@example.com", "--account", "acct-1"])
        .env("PORTCULLIS__STORAGE__DURABLE", as_role(&app))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let added = {
        use tokio::io::AsyncWriteExt;
        let mut added = added;
        let mut input = added.stdin.take().unwrap();
        input
            .write_all(b"a long enough passphrase 42\n")
            .await
            .unwrap();
        drop(input);
        added.wait_with_output().await.unwrap()
    };
    let refused = run(as_role(&reader), &["check-config"]).await;
    // `serve` refuses it too rather than start and fail every sign-in.
    let port = free_port();
    let served = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&gw.config_path)
            .arg("serve")
            .env("PORTCULLIS__STORAGE__DURABLE", as_role(&reader))
            .env("PORTCULLIS__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "PORTCULLIS__SERVER__PUBLIC_URL",
                format!("http://127.0.0.1:{port}/"),
            )
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("serve with a read-only role did not stop")
    .unwrap();
    // A role without any grant yet (the owner set the tables up): the tables are named, not
    // the schema's CREATE.
    let bare = format!("b_{}", &db[2..14]);
    {
        use sqlx::{Connection, Executor};
        let mut c = sqlx::PgConnection::connect(&durable).await.unwrap();
        c.execute(format!("CREATE ROLE {bare} LOGIN").as_str())
            .await
            .unwrap();
    }
    let ungranted = run(as_role(&bare), &["check-config"]).await;
    drop_database(&db).await;
    {
        use sqlx::{Connection, Executor};
        let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/test")
            .await
            .unwrap();
        for role in [&app, &reader, &bare] {
            admin
                .execute(format!("DROP ROLE IF EXISTS {role}").as_str())
                .await
                .unwrap();
        }
    }
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        added.status.success(),
        "the up-to-date tables need no CREATE: {}",
        String::from_utf8_lossy(&added.stderr)
    );
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{refusal}");
    assert!(
        refusal.contains("may not read and write") && refusal.contains("users"),
        "{refusal}"
    );
    let said = String::from_utf8_lossy(&served.stderr);
    assert_eq!(served.status.code(), Some(1), "{said}");
    assert!(said.contains("may not read and write"), "{said}");
    let said = String::from_utf8_lossy(&ungranted.stderr);
    assert_eq!(ungranted.status.code(), Some(1), "{said}");
    assert!(
        said.contains("may not read and write") && !said.contains("CREATE ON SCHEMA"),
        "{said}"
    );
}

/// `audit tail --follow` across a restore of the database from a backup: the ids start again
/// below the last one shown, and the events written after the restore are shown all the same,
/// with a word on stderr, not skipped until the ids pass the old ones.
#[tokio::test]
async fn audit_tail_follow_carries_on_across_a_restore() {
    let gw = Gateway::start().await;
    let write = |reason: String| {
        let gw = &gw;
        async move {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            gw.state
                .durable
                .append_audit(&[
                    portcullis::store::AuditEvent::new("user_enabled", "success", now)
                        .reason(&reason),
                ])
                .await
                .unwrap();
        }
    };
    for n in 0..3 {
        write(format!("kept-{n}")).await;
    }
    let url = format!("sqlite://{}", gw.dir.path().join("db.sqlite").display());
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    let backup_at: i64 = sqlx::query_scalar("SELECT MAX(id) FROM audit_events")
        .fetch_one(&db)
        .await
        .unwrap();
    // Events written after the backup, which the follower shows.
    for n in 0..4 {
        write(format!("lost-{n}")).await;
    }
    let followed = gw.dir.path().join("follow.out");
    let noted = gw.dir.path().join("follow.err");
    let _follower = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&gw.config_path)
            .args(["audit", "tail", "-n", "2", "--follow"])
            .stdout(std::fs::File::create(&followed).unwrap())
            .stderr(std::fs::File::create(&noted).unwrap())
            .spawn()
            .unwrap(),
    );
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !read(&followed).contains("reason=lost-3") {
        assert!(std::time::Instant::now() < deadline, "{}", read(&followed));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The restore: the trail as it was at the backup, its id counter set back with it.
    sqlx::query("DELETE FROM audit_events WHERE id > ?")
        .bind(backup_at)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE sqlite_sequence SET seq = ? WHERE name = 'audit_events'")
        .bind(backup_at)
        .execute(&db)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Changes made after the restore, fewer than were lost: their ids are ones shown before.
    write("after-restore".into()).await;
    while !read(&followed).contains("reason=after-restore") {
        assert!(
            std::time::Instant::now() < deadline,
            "the event after the restore was skipped: {}\n{}",
            read(&followed),
            read(&noted)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        read(&noted).contains("no longer holds the last event shown"),
        "{}",
        read(&noted)
    );
}

/// `storage copy`: a gateway that began on SQLite moves to PostgreSQL. Everything comes along —
/// the user and their authenticator app (sealed under the same master key), the signing key,
/// the audit trail with its ids, whose next event follows on — and a target that holds rows
/// already is refused untouched.
#[tokio::test]
async fn storage_copy_moves_a_sqlite_gateway_to_postgres() {
    let gw = Gateway::start().await;
    let email = "mover@example.com";
    let (c, secret, _) = gw.signed_in(email).await;
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
    gw.state.audit.flush().await;
    let trail = gw.audit().await;
    let kid = gw.state.signer.current_kid();
    let (name, url) = fresh_database().await;
    // A URL without its database name would copy into the server's default database for the
    // user (or `PGDATABASE`'s): refused, nothing copied.
    let server = url.rsplit_once('/').unwrap().0.to_string();
    for nameless in [server.clone(), format!("{server}/")] {
        let out = gw.cli(&["storage", "copy", "--to", &nameless], None).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("names no database"),
            "{err}"
        );
        assert!(!err.contains("copying"), "{err}");
    }
    // A target that cannot be reached is named as `--to`, not as the configuration's database.
    let unreachable = "postgres://postgres@127.0.0.1:1/nowhere";
    let out = gw
        .cli(&["storage", "copy", "--to", unreachable], None)
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("(--to)") && !err.contains("storage.durable"),
        "{err}"
    );

    // Another master key than the database's: the gateways could not start on the copy, so it
    // is refused before anything is copied.
    let other = portcullis::crypto::MasterKey::generate_base64();
    let out = gw
        .cli_env(
            &["storage", "copy", "--to", &url],
            None,
            &[("PORTCULLIS__SECRETS__MASTER_KEY", other.as_str())],
        )
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("master key is not the one") && !err.contains("copying"),
        "{err}"
    );
    // A new database set up by a command run as its owner (which leaves the master key's
    // check value there, and nothing else) is still new to the copy.
    let out = gw
        .cli_env(
            &["user", "list"],
            None,
            &[("PORTCULLIS__STORAGE__DURABLE", url.as_str())],
        )
        .await;
    assert!(out.status.success(), "{out:?}");

    let out = gw.cli(&["storage", "copy", "--to", &url], None).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("users") && said.contains("audit_events"),
        "{said}"
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("copying users") && progress.contains("copying audit_events"),
        "{progress}"
    );
    // A second copy into the same database is refused, and adds nothing.
    let again = gw.cli(&["storage", "copy", "--to", &url], None).await;
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("already holds rows"),
        "{err}"
    );

    let key = gw.master_key();
    let moved = Gateway::start_with(move |cfg| {
        cfg.storage.durable = url;
        cfg.secrets.master_key = Some(portcullis::secret::Secret::new(key));
    })
    .await;
    assert_eq!(
        moved.state.signer.current_kid(),
        kid,
        "the same signing key"
    );
    let copied = moved.audit().await;
    for e in &trail {
        assert!(copied.contains(e), "{e:?} not copied");
    }
    assert_eq!(
        copied
            .iter()
            .filter(|e| e.event == "storage_copied")
            .count(),
        1
    );
    // The user signs in on the new database with the same authenticator app.
    moved.clock.advance(60);
    let b = moved.sign_in_again(email, &secret).await;
    assert_eq!(moved.status(&b, "/campaigns").await, 200);
    moved.state.audit.flush().await;
    let max_copied = copied.iter().map(|e| e.id).max().unwrap();
    assert!(
        moved.audit().await.iter().any(|e| e.id > max_copied),
        "new events follow the copied ids"
    );
    drop(moved);
    drop_database(&name).await;
}

/// Two `storage copy` runs into one new database at once: one copies, the other waits for its
/// lock and is then refused in words (the target holds rows), never with the database's own
/// unique-key error part way through.
#[tokio::test]
async fn two_storage_copies_into_one_database_at_once_one_is_refused() {
    let gw = Gateway::start().await;
    for i in 0..3 {
        gw.signed_in(&format!("racer{i}@example.com")).await;
    }
    gw.state.audit.flush().await;
    for _ in 0..3 {
        let (name, url) = fresh_database().await;
        let args = ["storage", "copy", "--to", url.as_str()];
        let (a, b) = tokio::join!(gw.cli(&args, None), gw.cli(&args, None));
        let outcomes = [&a, &b].map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        });
        assert_eq!(
            outcomes.iter().filter(|(ok, _)| *ok).count(),
            1,
            "{outcomes:?}"
        );
        let (_, refused) = outcomes.iter().find(|(ok, _)| !ok).unwrap();
        assert!(
            refused.contains("already holds rows") && !refused.contains("duplicate"),
            "{refused}"
        );
        drop_database(&name).await;
    }
}

/// `keys rotate` from a host whose clock is off from the database's would make a key that signs
/// too early on the gateways (before every JWKS cache has it) or not for a long while: refused,
/// nothing changed; from a host on time it goes through. (The host's clock is moved with
/// libfaketime, Debian's `faketime`.)
#[tokio::test]
async fn a_rotation_from_a_host_whose_clock_is_off_is_refused() {
    const LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        std::path::Path::new(LIB).exists(),
        "libfaketime is needed for this test: apt-get install faketime"
    );
    let (name, url) = fresh_database().await;
    let gw = Gateway::start_with(move |c| c.storage.durable = url).await;
    let kid = gw.state.signer.current_kid();
    let skew = [("PORTCULLIS__SERVER__MAX_CLOCK_SKEW", "2s")];
    for offset in ["+300s", "-300s"] {
        let out = gw
            .cli_env(
                &["keys", "rotate"],
                None,
                &[skew[0], ("LD_PRELOAD", LIB), ("FAKETIME", offset)],
            )
            .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{offset}: {err}");
        assert!(
            err.contains("clock is") && err.contains("Nothing was changed"),
            "{offset}: {err}"
        );
    }
    let rotated = gw
        .audit()
        .await
        .iter()
        .filter(|e| e.event == "signing_key_rotated")
        .count();
    assert_eq!(rotated, 0);
    assert_eq!(gw.state.signer.current_kid(), kid);
    let out = gw.cli_env(&["keys", "rotate"], None, &skew).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(gw);
    drop_database(&name).await;
    // On SQLite with Redis the gateways' clock is Redis's: the command reads the same one.
    let gw = Gateway::start_with(|c| {
        c.storage.ephemeral = "redis://127.0.0.1:6379/".into();
        c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    })
    .await;
    let out = gw
        .cli_env(
            &["keys", "rotate"],
            None,
            &[skew[0], ("LD_PRELOAD", LIB), ("FAKETIME", "+60s")],
        )
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("clock is"), "{err}");
}

/// `serve` started with a low soft limit on open files (a shell's or a container's 1024 and
/// less) raises it to the hard limit: one client at the connection bound would use it up.
#[tokio::test]
async fn serve_raises_its_open_files_limit() {
    let gw = Gateway::start().await;
    let (mut child, port) = serve_limited(&gw, "ulimit -Sn 256", std::process::Stdio::null());
    let pid = child.id().unwrap();
    let up = healthy(port).await;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    child.kill().await.unwrap();
    assert!(up, "serve did not start");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert!(
        numbers[1] == "unlimited" || numbers[1].parse::<u64>().unwrap() > 256,
        "{line}"
    );
    assert_eq!(
        numbers[0], numbers[1],
        "the soft limit was left low: {line}"
    );
}

/// `serve` on `gw`'s configuration and a free port, started by `sh` after `limit` (a `ulimit`
/// command); its standard error to `stderr`.
fn serve_limited(
    gw: &Gateway,
    limit: &str,
    stderr: std::process::Stdio,
) -> (tokio::process::Child, u16) {
    let port = free_port();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{limit} && exec \"$0\" --config \"$1\" serve"))
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .arg(&gw.config_path)
        .env("PORTCULLIS__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "PORTCULLIS__SERVER__PUBLIC_URL",
            format!("http://127.0.0.1:{port}/"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, port)
}

/// Whether the gateway on `port` answers its liveness probe within 15 s.
async fn healthy(port: u16) -> bool {
    let url = format!("http://127.0.0.1:{port}/_portcullis/healthz");
    for _ in 0..300 {
        if reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Out of file descriptors, the gateway says what to raise (once, not at every failed accept),
/// keeps running, and takes connections again as soon as descriptors are free.
#[tokio::test]
async fn out_of_file_descriptors_the_gateway_says_what_to_raise_and_recovers() {
    let gw = Gateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let (mut child, port) = serve_limited(&gw, "ulimit -n 64", file.into());
    assert!(healthy(port).await, "serve did not start");
    // More connections than the process may hold descriptors for, all held open.
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            held.push(c);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(child.try_wait().unwrap(), None, "the gateway kept running");
    drop(held);
    assert!(healthy(port).await, "connections are taken again");
    child.kill().await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let said = text
        .matches("no file descriptor left for new connections")
        .count();
    assert_eq!(said, 1, "said once, with the limit to raise: {text}");
    assert!(text.contains("LimitNOFILE"), "{text}");
}

/// `storage copy` reads the old database from one snapshot; what a gateway still running on it
/// writes meanwhile is not in the copy, and the copy finds it out: the old database's counts,
/// taken again after the copy, differ from what was copied (the command then fails, saying to
/// stop every gateway and copy again).
#[tokio::test]
async fn a_copy_finds_out_that_the_old_database_changed_meanwhile() {
    use portcullis::store::sql::SqlStore;
    use portcullis::store::DurableStore;
    let gw = Gateway::start().await;
    let email = "still-running@example.com";
    gw.signed_in(email).await;
    gw.state.audit.flush().await;
    let old = format!("sqlite://{}", gw.dir.path().join("db.sqlite").display());
    let source = SqlStore::connect(&old).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let new = format!("sqlite://{}", dir.path().join("new.sqlite").display());
    let target = SqlStore::connect(&new).await.unwrap();
    target.migrate().await.unwrap();
    let copied = source.copy_into(&target, &mut |_, _| {}).await.unwrap();
    assert_eq!(source.changed_since(&copied).await.unwrap(), vec![]);
    // The gateway goes on: a failed sign-in is written to the old database's audit trail.
    gw.password(&gw.browser(), email, "not the password at all", "")
        .await;
    gw.state.audit.flush().await;
    let changed = source.changed_since(&copied).await.unwrap();
    assert!(
        changed
            .iter()
            .any(|(table, then, now)| *table == "audit_events" && now > then),
        "{changed:?}"
    );
}

/// A configuration file's step-up rule that needs a security key is checked against the
/// address the demo serves (`--public-url` with a host name, where keys work), not against the
/// default address it replaces.
#[tokio::test]
async fn the_demo_checks_a_key_rule_against_its_own_address() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.toml");
    std::fs::write(
        &file,
        "[[step_up]]\npath = \"/api-keys\"\nmethods = [\"POST\"]\nmax_age = \"1m\"\nkey = true\n",
    )
    .unwrap();
    let (port, console) = (free_port(), free_port());
    let mut child = demo_command(
        Some((&file, false)),
        &dir.path().join("data"),
        port,
        console,
    )
    .args(["--public-url", &format!("http://localhost:{port}/")])
    .spawn()
    .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/_portcullis/healthz");
    let mut up = false;
    for _ in 0..300 {
        if client.get(&url).send().await.is_ok() {
            up = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(up, "{}", String::from_utf8_lossy(&out.stdout));
}

/// What lies in a SQLite file's write-ahead log is in the file itself once the command or
/// gateway that wrote it is done: the file alone, copied for a backup or a move, is the whole
/// database (a `-wal` is left, if at all, empty).
#[tokio::test]
async fn a_sqlite_file_alone_is_the_whole_database_after_each_command_and_a_clean_stop() {
    let gw = Gateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = |p: &std::path::Path| format!("sqlite://{}", p.display());
    let wal_empty = |db: &std::path::Path| {
        let wal = std::path::PathBuf::from(format!("{}-wal", db.display()));
        std::fs::metadata(&wal).map_or(0, |m| m.len()) == 0
    };
    // The users the database at `db` holds, read from a copy of its file alone.
    let users_in_copy_of = |db: std::path::PathBuf| {
        let gw = &gw;
        async move {
            let alone = tempfile::tempdir().unwrap();
            let copy = alone.path().join("copy.sqlite");
            std::fs::copy(&db, &copy).unwrap();
            let out = gw
                .cli_env(
                    &["user", "list"],
                    None,
                    &[("PORTCULLIS__STORAGE__DURABLE", url(&copy).as_str())],
                )
                .await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };

    // A command on a new database.
    let db = dir.path().join("gateway.sqlite");
    let env = [("PORTCULLIS__STORAGE__DURABLE", url(&db))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let add = |email: &'static str, password: &'static str| {
        let (gw, env) = (&gw, &env);
        async move {
            let out = gw
                .cli_env(
                    &["user", "add", email, "--account", "acct-1"],
                    Some(password),
                    env,
                )
                .await;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{err}");
        }
    };
    add("first@example.com", "correct horse battery staple 1\n").await;
    assert!(wal_empty(&db));
    assert!(users_in_copy_of(db.clone())
        .await
        .contains("first@example.com"));

    // A gateway that ran on it and was stopped, with a command run beside it meanwhile.
    let port = free_port();
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&gw.config_path)
        .arg("serve")
        .envs(env.iter().copied())
        .env("PORTCULLIS__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "PORTCULLIS__SERVER__PUBLIC_URL",
            format!("http://127.0.0.1:{port}/"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(healthy(port).await, "serve did not start");
    add("second@example.com", "violet lantern over quiet harbour\n").await;
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &serve.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(serve.wait().await.unwrap().success());
    assert!(wal_empty(&db), "the gateway left its log");
    let users = users_in_copy_of(db.clone()).await;
    assert!(
        users.contains("first@example.com") && users.contains("second@example.com"),
        "{users}"
    );

    // A copy made with `storage copy` into a new SQLite file.
    let moved = dir.path().join("moved.sqlite");
    let out = gw
        .cli_env(
            &["storage", "copy", "--to", url(&moved).as_str()],
            None,
            &env,
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wal_empty(&moved) && wal_empty(&db));
    let users = users_in_copy_of(moved).await;
    assert!(
        users.contains("first@example.com") && users.contains("second@example.com"),
        "{users}"
    );
}

/// `user list` quotes an account id that is not one plain word, so that no account id can read
/// as more columns (`acct   admin keys:1` would pass for an administrator with a key).
#[tokio::test]
async fn user_list_quotes_account_ids_with_blanks() {
    let gw = Gateway::start().await;
    let out = gw
        .cli(
            &[
                "user",
                "add",
                "spacey@example.com",
                "--account",
                "acct   admin keys:1",
            ],
            Some("correct horse battery staple 9\n"),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = gw.cli(&["user", "list"], None).await;
    let text = String::from_utf8_lossy(&list.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("spacey@example.com"))
        .unwrap();
    assert!(line.contains("\"acct   admin keys:1\""), "{line}");
}

/// `portcullis admin revoke EMAIL` takes the administrator role: the admin console refuses the
/// user from then on, their sessions end, and the change is audited and mailed.
#[tokio::test]
async fn admin_revoke_takes_the_role_and_ends_the_sessions() {
    let gw = Gateway::start().await;
    let email = "former.admin@example.com";
    let (b, _, _) = gw.signed_in(email).await;
    let u = gw.user(email).await;
    gw.state.durable.set_admin(&u.id, true).await.unwrap();
    gw.state.user_gate.forget(&u.id);
    let out = gw.cli(&["admin", "revoke", email], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("no longer an administrator"), "{said}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no enabled administrator is left"), "{err}");
    assert!(!gw.user(email).await.is_admin);
    gw.clock.advance(2);
    assert_eq!(gw.status(&b, "/campaigns").await, 303, "the session ended");
    let events = gw.audit().await;
    assert!(events
        .iter()
        .any(|e| e.event == "admin_revoked" && e.email.as_deref() == Some(email)));
    assert!(gw
        .outbox()
        .await
        .iter()
        .any(|m| m.contains("took the administrator role")));
    // Again: nothing to take.
    let out = gw.cli(&["admin", "revoke", email], None).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("is not an administrator"));
}
