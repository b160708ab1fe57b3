//! Two real `portcullis serve` processes sharing Redis (sessions, challenges, replay cache,
//! counters) and PostgreSQL (users, factors, keys) behave as one gateway: a sign-in started on
//! one finishes on the other, a session works on both, logout on one ends it on both, and a
//! gateway killed mid-traffic loses no session.

use std::process::{Command, Stdio};
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

use super::harness::*;

/// A fresh PostgreSQL database on the shared server; dropped by the caller's guard.
async fn fresh_database() -> (String, String) {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect("postgres://postgres@127.0.0.1:5432/test")
        .await
        .expect(
            "PostgreSQL must answer on 127.0.0.1:5432 (user postgres, trust auth, database test)",
        );
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    (
        name.clone(),
        format!("postgres://postgres@127.0.0.1:5432/{name}"),
    )
}

async fn drop_database(name: &str) {
    if let Ok(mut admin) = PgConnection::connect("postgres://postgres@127.0.0.1:5432/test").await {
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
    }
}

fn serve(config: &std::path::Path, port: u16) -> Process {
    Process(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["serve", "--config"])
            .arg(config)
            .env("PORTCULLIS__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("PORTCULLIS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn wait_ready(port: u16) {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/_portcullis/readyz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway on {port} never became ready");
}

fn totp(secret: &[u8]) -> String {
    portcullis::auth::totp::code_at(
        secret,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_sign_ins_sessions_and_logout() {
    let (db, durable) = fresh_database().await;
    let result = tokio::spawn(scenario(durable)).await;
    drop_database(&db).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(durable: String) {
    let dir = tempfile::tempdir().unwrap();
    let (up_addr, upstream) = start_upstream().await;
    let (pa, pb) = (free_port(), free_port());
    let prefix = format!("t{}:", uuid::Uuid::new_v4().simple());
    let key = portcullis::crypto::MasterKey::generate_base64();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\npublic_url = \"http://127.0.0.1:{pa}/\"\n\
             [upstream]\nurl = \"http://{up_addr}/\"\n\
             [storage]\ndurable = \"{durable}\"\nephemeral = \"redis://127.0.0.1:6379/\"\nredis_prefix = \"{prefix}\"\n\
             [password]\nargon2_memory_kib = 1024\nargon2_iterations = 1\n\
             [secrets]\nmaster_key = \"{key}\"\n\
             [notify]\noutbox_dir = \"{}\"\n",
            dir.path().join("outbox").display()
        ),
    )
    .unwrap();
    let add = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["--config"])
        .arg(&config)
        .args(["user", "add", "both@example.com", "--account", "acct-1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(format!("{PASSWORD}\n").as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );

    let mut a = Some(serve(&config, pa));
    let _b = serve(&config, pb);
    wait_ready(pa).await;
    wait_ready(pb).await;
    let on = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");

    // One browser; cookies belong to the host, so both gateways see them (as behind a balancer).
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let c = reqwest::Client::builder()
        .cookie_provider(jar)
        .redirect(reqwest::redirect::Policy::none())
        .default_headers({
            let mut h = reqwest::header::HeaderMap::new();
            h.insert("accept", "text/html".parse().unwrap());
            h
        })
        .build()
        .unwrap();
    let csrf_of = |html: &str| extract(html, "name=\"csrf\" value=\"", "\"").unwrap();
    let page = |url: String| {
        let c = c.clone();
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    };

    // Password on A …
    let csrf = csrf_of(&page(on(pa, "/_portcullis/login")).await);
    let r = c
        .post(on(pa, "/_portcullis/login"))
        .form(&[
            ("username", "both@example.com"),
            ("password", PASSWORD),
            ("csrf", &csrf),
            ("next", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/enrol/totp");
    // … enrolment page on B (the pending session lives in Redis) …
    let html = page(on(pb, "/_portcullis/enrol/totp")).await;
    let b32 = extract(&html, "id=\"totp-secret\">", "<").expect("B sees A's pending sign-in");
    let secret = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
    let r = c
        .post(on(pb, "/_portcullis/enrol/totp"))
        .form(&[("code", totp(&secret)), ("csrf", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/recovery-codes");
    // … recovery codes confirmed on A.
    let html = page(on(pa, "/_portcullis/recovery-codes")).await;
    let r = c
        .post(on(pa, "/_portcullis/recovery-codes"))
        .form(&[("csrf", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);

    // The session works on both; both sign with keys from the shared store.
    for port in [pa, pb] {
        let r = c.get(on(port, "/campaigns")).send().await.unwrap();
        assert_eq!(r.status(), 200, "gateway {port}");
    }
    let jwks_a = page(on(pa, "/.well-known/jwks.json")).await;
    let jwks_b = page(on(pb, "/.well-known/jwks.json")).await;
    assert_eq!(jwks_a, jwks_b, "one key set");
    let token = upstream
        .last()
        .header("x-portcullis-assertion")
        .unwrap()
        .to_string();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    assert!(jwks_a.contains(&kid));

    // A is killed mid-traffic: B carries on with the same session.
    drop(a.take());
    for _ in 0..20 {
        let r = c.get(on(pb, "/campaigns")).send().await.unwrap();
        assert_eq!(r.status(), 200, "no session lost");
    }

    // Logout on B ends the session everywhere (a restarted A sees it gone).
    let html = page(on(pb, "/_portcullis/logout")).await;
    let r = c
        .post(on(pb, "/_portcullis/logout"))
        .form(&[("csrf", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let _a = serve(&config, pa);
    wait_ready(pa).await;
    for port in [pa, pb] {
        let r = c.get(on(port, "/campaigns")).send().await.unwrap();
        assert_eq!(r.status(), 303, "gateway {port} refuses after logout");
    }
}
