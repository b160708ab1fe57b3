//! Two real `portcullis serve` processes sharing Redis (sessions, challenges, replay cache,
//! counters) and PostgreSQL (users, factors, keys) behave as one gateway: a sign-in started on
//! one finishes on the other, a session works on both, logout on one ends it on both, and a
//! gateway killed mid-traffic loses no session. Device binding is off here: these clients hold no
//! device key.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::harness::*;

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
    let config = write_config(
        dir.path(),
        &durable,
        up_addr,
        &format!("http://127.0.0.1:{pa}/"),
    );
    add_user(&config, "both@example.com");

    let mut a = Some(serve(&config, pa));
    let _b = serve(&config, pb);
    wait_ready(pa).await;
    wait_ready(pb).await;
    let on = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");

    let c = browser();
    // Password on A, enrolment on B (the pending sign-in lives in Redis), codes confirmed on A.
    sign_in(&c, &on(pa, ""), &on(pb, ""), "both@example.com").await;

    // The session works on both; both sign with keys from the shared store.
    for port in [pa, pb] {
        let r = c.get(on(port, "/campaigns")).send().await.unwrap();
        assert_eq!(r.status(), 200, "gateway {port}");
    }
    let jwks_a = text(&c, on(pa, "/.well-known/jwks.json")).await;
    let jwks_b = text(&c, on(pb, "/.well-known/jwks.json")).await;
    assert_eq!(jwks_a, jwks_b, "one key set");
    let token = upstream.last_token();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    assert!(jwks_a.contains(&kid));

    // A is killed mid-traffic: B carries on with the same session.
    drop(a.take());
    for _ in 0..20 {
        let r = c.get(on(pb, "/campaigns")).send().await.unwrap();
        assert_eq!(r.status(), 200, "no session lost");
    }

    // Logout on B ends the session everywhere (a restarted A sees it gone).
    let html = text(&c, on(pb, "/_portcullis/logout")).await;
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

/// The config both gateways of a test share: one PostgreSQL database, one Redis prefix, one
/// master key, cheap argon2, binding off (these clients hold no device key).
fn write_config(
    dir: &std::path::Path,
    durable: &str,
    upstream: std::net::SocketAddr,
    public_url: &str,
) -> std::path::PathBuf {
    let prefix = format!("t{}:", uuid::Uuid::new_v4().simple());
    let key = portcullis::crypto::MasterKey::generate_base64();
    let config = dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\npublic_url = \"{public_url}\"\n\
             [upstream]\nurl = \"http://{upstream}/\"\n\
             [storage]\ndurable = \"{durable}\"\nephemeral = \"redis://127.0.0.1:6379/\"\nredis_prefix = \"{prefix}\"\n\
             [password]\nargon2_memory_kib = 1024\nargon2_iterations = 1\n\
             [secrets]\nmaster_key = \"{key}\"\n\
             [notify]\noutbox_dir = \"{}\"\n\
             [binding]\nenabled = false\n",
            dir.join("outbox").display()
        ),
    )
    .unwrap();
    config
}

fn add_user(config: &std::path::Path, email: &str) {
    let add = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["--config"])
        .arg(config)
        .args(["user", "add", email, "--account", "acct-1"])
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
}

/// A browser-like client. Cookies belong to the host, so gateways on other ports of 127.0.0.1
/// see them too (as behind a load balancer).
fn browser() -> reqwest::Client {
    browser_with_jar().0
}

/// [`browser`] and its cookie jar.
fn browser_with_jar() -> (reqwest::Client, std::sync::Arc<reqwest::cookie::Jar>) {
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let client = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .default_headers({
            let mut h = reqwest::header::HeaderMap::new();
            h.insert("accept", "text/html".parse().unwrap());
            h
        })
        .build()
        .unwrap();
    (client, jar)
}

fn csrf_of(html: &str) -> String {
    extract(html, "name=\"csrf\" value=\"", "\"").unwrap()
}

async fn text(c: &reqwest::Client, url: String) -> String {
    c.get(url).send().await.unwrap().text().await.unwrap()
}

/// The password step on gateway `base`; returns where it sends the browser.
async fn password(c: &reqwest::Client, base: &str, email: &str) -> String {
    let csrf = csrf_of(&text(c, format!("{base}/_portcullis/login")).await);
    let r = c
        .post(format!("{base}/_portcullis/login"))
        .form(&[
            ("username", email),
            ("password", PASSWORD),
            ("csrf", &csrf),
            ("next", ""),
        ])
        .send()
        .await
        .unwrap();
    location(&r)
}

/// First sign-in of `email` with password and TOTP enrolment: the password and the recovery
/// codes through gateway `a`, the enrolment through gateway `b` (the same one is fine).
async fn sign_in(c: &reqwest::Client, a: &str, b: &str, email: &str) {
    assert_eq!(password(c, a, email).await, "/_portcullis/enrol/totp");
    let html = text(c, format!("{b}/_portcullis/enrol/totp")).await;
    let b32 = extract(&html, "id=\"totp-secret\">", "<").expect("the pending sign-in");
    let secret = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
    let r = c
        .post(format!("{b}/_portcullis/enrol/totp"))
        .form(&[("code", totp(&secret)), ("csrf", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/recovery-codes");
    let html = text(c, format!("{a}/_portcullis/recovery-codes")).await;
    let r = c
        .post(format!("{a}/_portcullis/recovery-codes"))
        .form(&[("csrf", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
}

/// The configuration of one gateway on SQLite and the memory store in `dir`, on `port`, in
/// front of `upstream`, with a one-second shutdown timeout.
fn lone_gateway_config(
    dir: &std::path::Path,
    port: u16,
    up_addr: std::net::SocketAddr,
) -> std::path::PathBuf {
    let config = dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\npublic_url = \"http://127.0.0.1:{port}/\"\nshutdown_timeout = \"1s\"\n\
             [upstream]\nurl = \"http://{up_addr}/\"\n\
             [storage]\ndurable = \"sqlite://{}\"\n\
             [password]\nargon2_memory_kib = 1024\nargon2_iterations = 1\n\
             [secrets]\nmaster_key = \"{}\"\n\
             [notify]\noutbox_dir = \"{}\"\n\
             [binding]\nenabled = false\n",
            dir.join("db.sqlite").display(),
            portcullis::crypto::MasterKey::generate_base64(),
            dir.join("outbox").display()
        ),
    )
    .unwrap();
    config
}

/// Sends SIGTERM to a gateway; when.
fn terminate(gw: &Process) -> std::time::Instant {
    let term = Command::new("kill")
        .args(["-TERM", &gw.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    std::time::Instant::now()
}

/// How a gateway signalled at `signalled` exits, within ten seconds.
async fn exit_of(gw: &mut Process, signalled: std::time::Instant) -> std::process::ExitStatus {
    loop {
        if let Some(status) = gw.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "still running long after the shutdown timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM: requests in flight are answered, those still running after
/// `server.shutdown_timeout` are dropped, and the process exits instead of waiting for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (up_addr, _upstream) = start_upstream().await;
    let port = free_port();
    let config = lone_gateway_config(dir.path(), port, up_addr);
    add_user(&config, "term@example.com");
    let mut gw = serve(&config, port);
    wait_ready(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let c = browser();
    sign_in(&c, &base, &base, "term@example.com").await;

    let request = |path: &str| {
        let (c, url) = (c.clone(), format!("{base}{path}"));
        tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    let quick = request("/slow/500");
    let stuck = request("/slow/30000");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = terminate(&gw);
    assert_eq!(quick.await.unwrap().unwrap(), 200, "drained");
    let exited = exit_of(&mut gw, signalled).await;
    assert!(exited.success(), "{exited:?}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert!(
        stuck.await.unwrap().is_err(),
        "the stuck request was dropped"
    );
}

/// Sends `text` on `ws` and whether it comes back within two seconds (`None`: the socket failed).
async fn echo(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    text: &str,
) -> Option<bool> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text)).await.ok()?;
    let got = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .ok()??
        .ok()?;
    Some(got.into_text().ok()?.as_str() == text)
}

/// SIGTERM with only a WebSocket tunnel open: the tunnel is drained like a request in flight,
/// working until `server.shutdown_timeout`, then the process exits (before, it counted for
/// nothing and was cut at once, while a request in flight elsewhere kept it for the timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_open_websocket_until_the_timeout() {
    use reqwest::cookie::CookieStore;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    let (up_addr, _upstream) = start_upstream().await;
    let port = free_port();
    let config = lone_gateway_config(dir.path(), port, up_addr);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("shutdown_timeout = \"1s\"", "shutdown_timeout = \"3s\""),
    )
    .unwrap();
    add_user(&config, "ws-term@example.com");
    let mut gw = serve(&config, port);
    wait_ready(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let (c, jar) = browser_with_jar();
    sign_in(&c, &base, &base, "ws-term@example.com").await;
    let cookies = jar.cookies(&base.parse().unwrap()).unwrap();
    let mut req = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookies);
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(echo(&mut ws, "before").await, Some(true));
    let signalled = terminate(&gw);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(gw.0.try_wait().unwrap().is_none(), "waits for the tunnel");
    assert_eq!(
        echo(&mut ws, "during the drain").await,
        Some(true),
        "the tunnel works during the drain"
    );
    let exited = exit_of(&mut gw, signalled).await;
    assert!(exited.success(), "{exited:?}");
    assert!(signalled.elapsed() >= Duration::from_secs(2));
}

/// A key ceremony started on one gateway finishes on the other (registration and second
/// factor), and a signing-key rotation made on the command line reaches both running gateways
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ceremonies_cross_gateways_and_rotation_reaches_both() {
    let (db, durable) = fresh_database().await;
    let result = tokio::spawn(ceremonies_and_rotation(durable)).await;
    drop_database(&db).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A JSON call of `static/webauthn.js`.
async fn key_call(
    c: &reqwest::Client,
    url: String,
    csrf: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = c
        .post(url)
        .header("accept", "application/json")
        .header("x-csrf-token", csrf)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn ceremonies_and_rotation(durable: String) {
    use webauthn_authenticator_rs::prelude::{
        CreationChallengeResponse, RequestChallengeResponse, Url,
    };
    let dir = tempfile::tempdir().unwrap();
    let (up_addr, upstream) = start_upstream().await;
    let (pa, pb) = (free_port(), free_port());
    // Behind a load balancer both gateways answer for one public origin (a host name, as
    // security keys need).
    let public = format!("http://localhost:{pa}/");
    let config = write_config(dir.path(), &durable, up_addr, &public);
    add_user(&config, "keys@example.com");
    let _a = serve(&config, pa);
    let _b = serve(&config, pb);
    wait_ready(pa).await;
    wait_ready(pb).await;
    let on = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let c = browser();
    sign_in(&c, &on(pa, ""), &on(pb, ""), "keys@example.com").await;

    // Registration: started on A, answered on B.
    let mut k = super::webauthn::key();
    let origin = Url::parse(&public).unwrap();
    let csrf = csrf_of(&text(&c, on(pa, "/_portcullis/account")).await);
    let v = key_call(
        &c,
        on(pa, "/_portcullis/webauthn/register/start"),
        &csrf,
        serde_json::json!({"name": "Desk key"}),
    )
    .await;
    let ccr: CreationChallengeResponse = serde_json::from_value(v["options"].clone()).unwrap();
    let reg = k.do_registration(origin.clone(), ccr).unwrap();
    key_call(
        &c,
        on(pb, "/_portcullis/webauthn/register/finish"),
        &csrf,
        serde_json::json!({"ceremony": v["ceremony"], "credential": reg}),
    )
    .await;

    // Second factor: password on B, challenge from A, answer at B.
    let csrf = csrf_of(&text(&c, on(pb, "/_portcullis/logout")).await);
    c.post(on(pb, "/_portcullis/logout"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(
        password(&c, &on(pb, ""), "keys@example.com").await,
        "/_portcullis/mfa"
    );
    let csrf = csrf_of(&text(&c, on(pa, "/_portcullis/mfa")).await);
    let v = key_call(
        &c,
        on(pa, "/_portcullis/webauthn/authenticate/start"),
        &csrf,
        serde_json::json!({}),
    )
    .await;
    let rcr: RequestChallengeResponse = serde_json::from_value(v["options"].clone()).unwrap();
    let cred = k.do_authentication(origin, rcr).unwrap();
    key_call(
        &c,
        on(pb, "/_portcullis/webauthn/authenticate/finish"),
        &csrf,
        serde_json::json!({"ceremony": v["ceremony"], "credential": cred}),
    )
    .await;
    assert_eq!(
        c.get(on(pa, "/campaigns")).send().await.unwrap().status(),
        200
    );
    let token = upstream.last_token();
    let old_kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();

    // Rotation on the command line: both running gateways publish the new key (it signs from
    // `PUBLISH_LEAD` later, see `token::tests`).
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&config)
        .args(["keys", "rotate"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut switched = [false, false];
    for _ in 0..300 {
        for (i, port) in [pa, pb].into_iter().enumerate() {
            // A new session signs with the key current on that gateway.
            if !switched[i] {
                let jwks = text(&c, on(port, "/.well-known/jwks.json")).await;
                let v: serde_json::Value = serde_json::from_str(&jwks).unwrap();
                switched[i] = v["keys"].as_array().unwrap().len() >= 2 && jwks.contains(&old_kid);
            }
        }
        if switched == [true, true] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        switched,
        [true, true],
        "both gateways publish the new key next to the old one"
    );
}

/// The system calls the systemd unit's `SystemCallFilter=` lines allow: the first line is an
/// allow list, later ones add (or, with `~`, take away) calls and `@groups`, expanded by
/// `systemd-analyze syscall-filter`.
fn unit_allowed_system_calls(unit: &str) -> std::collections::HashSet<String> {
    fn expand(
        name: &str,
        into: &mut std::collections::HashSet<String>,
        seen: &mut std::collections::HashSet<String>,
    ) {
        if !name.starts_with('@') {
            into.insert(name.to_string());
            return;
        }
        if !seen.insert(name.to_string()) {
            return;
        }
        let out = Command::new("systemd-analyze")
            .args(["syscall-filter", name])
            .output()
            .expect("systemd-analyze (apt-get install systemd)");
        assert!(out.status.success(), "{name}");
        for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
            let entry = line.trim();
            if !entry.is_empty() && !entry.starts_with('#') {
                expand(entry, into, seen);
            }
        }
    }
    let mut allowed = std::collections::HashSet::new();
    let mut first = true;
    for line in unit.lines() {
        let Some(list) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        let (deny, list) = match list.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, list),
        };
        assert!(
            !(first && deny),
            "the unit's filter should start as an allow list"
        );
        first = false;
        let mut names = std::collections::HashSet::new();
        for name in list.split_whitespace() {
            expand(name, &mut names, &mut std::collections::HashSet::new());
        }
        if deny {
            allowed.retain(|n| !names.contains(n));
        } else {
            allowed.extend(names);
        }
    }
    assert!(!first, "the unit has no SystemCallFilter=");
    allowed
}

/// The shipped systemd unit's system call filter lets the gateway do its work: every call the
/// real gateway makes from start to a signed-in, proxied request, a wrong password (the hashing
/// thread lowers its own priority) and a SIGTERM is one the filter allows (a call it refuses
/// kills the process, or with `SystemCallErrorNumber=` fails it). The calls are those `strace`
/// sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_system_call_filter_allows_what_the_gateway_calls() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/portcullis.service"),
    )
    .unwrap();
    assert!(
        unit.contains("SystemCallErrorNumber=EPERM"),
        "a call the filter refuses must fail, not kill the gateway"
    );
    let allowed = unit_allowed_system_calls(&unit);
    assert!(!allowed.contains("reboot") && allowed.contains("epoll_wait"));

    let dir = tempfile::tempdir().unwrap();
    let (up_addr, _upstream) = start_upstream().await;
    let port = free_port();
    let config = lone_gateway_config(dir.path(), port, up_addr);
    add_user(&config, "filter@example.com");
    let trace = dir.path().join("trace");
    let strace = Process(
        Command::new("strace")
            .args(["-f", "-qq", "-o"])
            .arg(&trace)
            .arg(env!("CARGO_BIN_EXE_portcullis"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("PORTCULLIS__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("PORTCULLIS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace (apt-get install strace)"),
    );
    wait_ready(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let c = browser();
    sign_in(&c, &base, &base, "filter@example.com").await;
    assert_eq!(
        c.get(format!("{base}/campaigns"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let other = browser();
    let csrf = csrf_of(&text(&other, format!("{base}/_portcullis/login")).await);
    let r = other
        .post(format!("{base}/_portcullis/login"))
        .form(&[
            ("username", "filter@example.com"),
            ("password", "not the password"),
            ("csrf", &csrf),
            ("next", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // SIGTERM to the gateway (strace's child), then its exit.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.0.id())).unwrap();
    let gateway = children
        .split_whitespace()
        .next()
        .expect("the traced gateway");
    assert!(Command::new("kill")
        .args(["-TERM", gateway])
        .status()
        .unwrap()
        .success());
    let mut strace = strace;
    let status = strace.0.wait().unwrap();
    assert!(status.success(), "{status:?}");

    let calls: std::collections::BTreeSet<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(' ')?.1.trim_start();
            let name = rest.split('(').next()?;
            (!name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
            .then(|| name.to_string())
        })
        .collect();
    assert!(calls.contains("setpriority"), "{calls:?}");
    // Run as root (as here), SQLite gives a new journal file its database's owner; the unit's
    // user is not root.
    let as_root_only = ["fchown"];
    let refused: Vec<&String> = calls
        .iter()
        .filter(|c| !allowed.contains(*c) && !as_root_only.contains(&c.as_str()))
        .collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter= refuses calls the gateway makes: {refused:?}"
    );
}
