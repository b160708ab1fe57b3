//! The gateway on Redis: a private `redis-server` on a spare port is killed and restarted under
//! a running gateway. The gateway must refuse (503) while Redis is away — never forward, never
//! crash — keep answering its probes, and serve again by itself once Redis is back. Sessions do
//! not survive a Redis without persistence (as configured here); users sign in again.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::harness::*;

const HOWTO: &str =
    "redis-server must be installed for the Redis fault tests: apt-get install redis-server";

/// A private Redis without persistence, on a port of its own.
pub(super) struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub(super) fn start() -> Self {
        let port = super::harness::free_port();
        let mut r = Self { port, child: None };
        r.restart();
        r
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server on its port and waits until it answers.
    fn restart(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}\n{HOWTO}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway whose ephemeral store is `url`, with short Redis timeouts.
pub(super) async fn gateway_on(url: String) -> Gateway {
    Gateway::start_with(move |c| on_redis(c, url)).await
}

/// Ephemeral store `url` under a fresh key prefix, with short Redis timeouts.
fn on_redis(c: &mut portcullis::config::Config, url: String) {
    c.storage.ephemeral = url;
    c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    c.storage.redis_connect_timeout = Duration::from_millis(300);
    c.storage.redis_response_timeout = Duration::from_millis(500);
}

async fn status(gw: &Gateway, path: &str) -> (u16, serde_json::Value) {
    let r = gw.api().get(gw.url(path)).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

/// Polls readiness until it is `want` (the gateway reconnects on its own schedule, which a
/// machine busy with the rest of the suite can stretch).
async fn wait_ready(gw: &Gateway, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = status(gw, "/_portcullis/readyz").await;
        if s == want {
            return;
        }
        assert!(Instant::now() < deadline, "readyz stayed {s}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_and_recovers_without_restart() {
    let mut redis = PrivateRedis::start();
    let gw = gateway_on(redis.url()).await;
    let email = "redis-user@example.com";
    let (c, secret, _) = gw.signed_in(email).await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    assert_eq!(status(&gw, "/_portcullis/readyz").await.0, 200);

    // A sign-in form opened before Redis goes away.
    let fresh = gw.browser();
    let csrf = gw.csrf(&fresh, "/_portcullis/login").await;
    let out_csrf = gw.csrf(&c, "/_portcullis/logout").await;
    redis.kill();
    // The session was used a moment ago, so its record is in the gateway's local cache; the
    // cache stops serving as soon as the gateway notices its invalidation channel is gone
    // (see `it::hot_path`). Until then it may pass a session checked within the last second.
    let noticed = Instant::now() + Duration::from_secs(10);
    while gw.state.sessions.cache().is_live() {
        assert!(
            Instant::now() < noticed,
            "the channel's loss went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = gw.upstream.count();
    let started = Instant::now();
    let r = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 503, "Redis down: refuse, never pass (nor 502)");
    assert!(started.elapsed() < Duration::from_secs(3), "no hang");
    assert!(r.headers().contains_key("retry-after"));
    let page = r.text().await.unwrap();
    assert!(
        page.contains("Temporarily unavailable"),
        "HTML page: {page}"
    );
    gw.assert_unavailable_json(&c, "/x").await;
    assert_eq!(gw.upstream.count(), before, "nothing forwarded");

    // Sign-in pages refuse too: the form (also to a browser without a session, before a
    // password is typed) and a password sent from a form opened earlier.
    let r = c.get(gw.url("/_portcullis/login")).send().await.unwrap();
    assert_eq!(r.status(), 503, "login page with a session cookie");
    let r = gw.get(&gw.browser(), "/_portcullis/login").await;
    assert_eq!(r.status(), 503, "login page without a session");
    let r = gw
        .login_form(&fresh, &csrf, email, PASSWORD, "")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // A sign-out says it did not happen: the user is still signed in.
    let r = c
        .post(gw.url("/_portcullis/logout"))
        .header("accept", "text/html")
        .form(&[("csrf", out_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("You are still signed in"));

    // The process lives and says what is wrong; the probe's 503 is no page refused.
    let refused = |gw: &Gateway| {
        let text = gw.state.metrics.render(&gw.state.login.hasher).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("portcullis_pages_unavailable_total "))
            .map(str::to_string);
        line.unwrap_or_default()
    };
    let counted = refused(&gw);
    assert!(
        !counted.ends_with(" 0"),
        "the refused sign-ins were counted: {counted}"
    );
    assert_eq!(status(&gw, "/_portcullis/healthz").await.0, 200);
    let (s, body) = status(&gw, "/_portcullis/readyz").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(refused(&gw), counted);
    assert_eq!(body["stores"]["ephemeral"], "down", "{body}");
    assert_eq!(body["stores"]["durable"], "up", "{body}");

    // Redis returns (empty: sessions are gone); the same gateway serves again.
    redis.restart();
    wait_ready(&gw, 200).await;
    let r = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 303, "the old session was lost with Redis");
    assert_eq!(gw.upstream.count(), before);
    let again = gw.sign_in_again(email, &secret).await;
    assert_eq!(again.get(gw.url("/x")).send().await.unwrap().status(), 200);
    assert_eq!(gw.upstream.count(), before + 1);
}

/// Redis restarted while the gateway made no call: the first calls after it (the readiness
/// probe, a sign-in) are served. The gateway's connection is the dead one until its first write
/// fails; that call is tried once more on a new connection rather than answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_calls_after_redis_returns_are_served() {
    let mut redis = PrivateRedis::start();
    let gw = gateway_on(redis.url()).await;
    gw.add_user("first-call@example.com").await;
    assert_eq!(status(&gw, "/_portcullis/readyz").await.0, 200);
    for _ in 0..2 {
        redis.kill();
        redis.restart();
        let (s, body) = status(&gw, "/_portcullis/readyz").await;
        assert_eq!(s, 200, "the first probe after the restart: {body}");
        let c = gw.browser();
        let r = gw
            .password(&c, "first-call@example.com", PASSWORD, "")
            .await;
        assert_eq!(location(&r), "/_portcullis/enrol/totp");
    }
    // Calls made while Redis was away (refused), then Redis back: the first call after is
    // served too, not answered with the refusal of the last attempt during the outage.
    let (signed_in, _, _) = gw.signed_in("browsing@example.com").await;
    redis.kill();
    let r = signed_in.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    // Long enough for the reconnection that refusal set off to fail too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = signed_in.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        303,
        "the first request after the outage: the session went with Redis, so sign in again"
    );
    for first in ["/_portcullis/login", "/_portcullis/readyz"] {
        redis.kill();
        let c = gw.browser();
        assert_eq!(gw.get(&c, "/_portcullis/login").await.status(), 503);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.restart();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if first == "/_portcullis/readyz" {
            let (s, body) = status(&gw, first).await;
            assert_eq!(s, 200, "the first probe after the outage: {body}");
        }
        let r = gw
            .password(&c, "first-call@example.com", PASSWORD, "")
            .await;
        assert_eq!(
            location(&r),
            "/_portcullis/enrol/totp",
            "the first sign-in after the outage"
        );
    }
}

/// A gateway started while Redis is down comes up (not ready), refuses, and becomes ready
/// when Redis appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_starts_while_redis_is_down() {
    let mut redis = PrivateRedis::start();
    redis.kill();
    let gw = gateway_on(redis.url()).await;
    assert_eq!(status(&gw, "/_portcullis/healthz").await.0, 200);
    assert_eq!(status(&gw, "/_portcullis/readyz").await.0, 503);
    let c = gw.browser();
    gw.add_user("late@example.com").await;
    // The sign-in page says so before a password is typed.
    assert_eq!(gw.get(&c, "/_portcullis/login").await.status(), 503);
    redis.restart();
    wait_ready(&gw, 200).await;
    assert_eq!(
        location(&gw.password(&c, "late@example.com", PASSWORD, "").await),
        "/_portcullis/enrol/totp"
    );
}

/// The probes are the gateway's own: never forwarded, whatever the spelling, and they need no
/// session.
#[tokio::test]
async fn probes_are_gateway_routes() {
    let gw = Gateway::start().await;
    for path in ["/_portcullis/healthz", "/_portcullis/readyz"] {
        let (s, body) = status(&gw, path).await;
        assert_eq!(s, 200, "{path}: {body}");
    }
    let (_, body) = status(&gw, "/_portcullis/readyz").await;
    assert_eq!(body["stores"]["ephemeral"], "up");
    for path in [
        "/_PORTCULLIS/readyz",
        "/_portcullis//healthz",
        "/x/../_portcullis/healthz",
    ] {
        let r = raw(gw.addr, "GET", path, &[], "").await;
        assert_ne!(r.status, 200, "{path}");
    }
    assert_eq!(gw.upstream.count(), 0, "nothing reached the console");
}

/// `check-config` and the startup log show store URLs without their passwords.
#[tokio::test]
async fn store_passwords_stay_out_of_check_config_and_logs() {
    const PW: &str = "S3cret-redis-pw";
    let gw = Gateway::start().await;
    let gw = gw
        .restarted_with(|c| c.storage.ephemeral = format!("redis://:{PW}@127.0.0.1:1/0"))
        .await;
    let debug = format!("{:?}", gw.state);
    assert!(!debug.contains(PW), "Debug of the state shows the password");
    assert!(debug.contains("[redacted]"), "{debug}");
    let out = gw.cli(&["check-config"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains(PW), "{shown}");
    assert!(
        shown.contains("redis://:[redacted]@127.0.0.1:1/0"),
        "{shown}"
    );

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&gw.config_path)
        .arg("serve")
        .env("PORTCULLIS__SERVER__LISTEN", "127.0.0.1:0")
        .env("PORTCULLIS__LOG__LEVEL", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log.contains("portcullis is listening") && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            log.push_str(&line);
            log.push('\n');
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("portcullis is listening"), "{log}");
    assert!(log.contains("[redacted]@127.0.0.1:1/0"), "{log}");
    assert!(!log.contains(PW), "{log}");
}

#[tokio::test]
async fn the_metrics_listeners_readiness_probe_names_the_store_that_is_down() {
    let mut redis = PrivateRedis::start();
    let metrics = format!("127.0.0.1:{}", free_port());
    let (url, listen) = (redis.url(), metrics.clone());
    let _gw = Gateway::start_with(move |c| {
        on_redis(c, url);
        c.metrics.listen = Some(listen);
    })
    .await;
    super::metrics::wait_listening(&metrics).await;
    let probe = |path: &'static str| {
        let url = format!("http://{metrics}{path}");
        async move {
            let r = reqwest::get(url).await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    assert_eq!(probe("/readyz").await.0, 200);
    redis.kill();
    let (s, body) = probe("/readyz").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["stores"]["ephemeral"], "down", "{body}");
    assert_eq!(body["stores"]["durable"], "up", "{body}");
    // Alive all the same: restarting the gateway would not bring Redis back.
    assert_eq!(probe("/healthz").await.0, 200);
}

/// The ACL that operations.md gives for the gateways' Redis user (read from the document, so the
/// two cannot drift apart) is enough for a whole sign-in, a proxied request and a sign-out; a
/// user without scripting is not ready, rather than ready and refusing every sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_suffices_and_a_narrower_one_is_not_ready() {
    let redis = PrivateRedis::start();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let line = doc
        .lines()
        .find(|l| l.starts_with("ACL SETUSER portcullis on"))
        .expect("operations.md gives the ACL");
    let prefix = format!("acl{}:", uuid::Uuid::new_v4().simple());
    let documented: Vec<String> = line
        .split_whitespace()
        .skip(2)
        .map(|w| match w {
            ">PASSWORD" => ">gwpass".to_string(),
            _ => w.replace("portcullis:", &prefix),
        })
        .collect();
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let narrow = [
        "narrow",
        "on",
        ">np",
        &format!("~{prefix}*"),
        &format!("&{prefix}invalidate"),
        "+ping",
        "+get",
        "+set",
        "+getdel",
        "+del",
        "+publish",
        "+subscribe",
    ];
    for rules in [
        documented.iter().map(String::as_str).collect::<Vec<_>>(),
        narrow.to_vec(),
    ] {
        let _: () = ::redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&rules)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let port = redis.url().rsplit(':').next().unwrap().to_string();
    let on_user = |user: &str| {
        let url = format!("redis://{user}@127.0.0.1:{port}");
        let prefix = prefix.clone();
        move |c: &mut portcullis::config::Config| {
            on_redis(c, url);
            c.storage.redis_prefix = prefix;
        }
    };
    let gw = Gateway::start_with(on_user("portcullis:gwpass")).await;
    wait_ready(&gw, 200).await;
    let (c, _, _) = gw.signed_in("acl@example.com").await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    super::login::sign_out(&gw, &c).await;
    assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 303);

    let narrow = Gateway::start_with(on_user("narrow:np")).await;
    wait_ready(&narrow, 503).await;
    let (_, body) = status(&narrow, "/_portcullis/readyz").await;
    assert_eq!(body["stores"]["ephemeral"], "down", "{body}");
    // Each command the documented list names is needed: without any one of them (here one a
    // sign-in needs only at its second step) the gateway is not ready either.
    let mut short: Vec<String> = documented.clone();
    short[0] = "short".into();
    short.retain(|r| r != "+srem" && r != "+hkeys");
    let _: () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&short)
        .query_async(&mut admin)
        .await
        .unwrap();
    let short = Gateway::start_with(on_user("short:gwpass")).await;
    wait_ready(&short, 503).await;
    // `check-config` asks as the probe does: the documented user passes, the short one not.
    let out = gw.cli(&["check-config"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = short.cli(&["check-config"], None).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("refused the gateway"),
        "{said}"
    );
}

/// What is typed as the sign-in address (often a password, in the wrong field) is not kept in
/// Redis: the throttling keys name an address by a digest, the account's failure count as
/// well as its consecutive failures, and a right sign-in still clears the count it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_sign_in_addresses_are_not_kept_in_redis() {
    let gw = gateway_on("redis://127.0.0.1:6379/".into()).await;
    let prefix = gw.state.config.storage.redis_prefix.clone();
    let client = ::redis::Client::open("redis://127.0.0.1:6379/").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = || {
        let mut conn = conn.clone();
        let pattern = format!("{prefix}*");
        async move {
            let keys: Vec<String> = ::redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.join("\n")
        }
    };
    let (_, secret, _) = gw.signed_in("typed@example.com").await;
    let c = gw.browser();
    for typed in ["Tr0ub4dor-and-3@example.com", "typed@example.com"] {
        let r = gw.password(&c, typed, "not the password 1", "").await;
        assert_ne!(r.status(), 303, "{typed}: a wrong password is refused");
    }
    let all = keys().await;
    assert!(
        all.contains("fail:pwd:{"),
        "the account's count is kept: {all}"
    );
    for typed in ["tr0ub4dor", "typed@"] {
        assert!(!all.to_lowercase().contains(typed), "{typed} in {all}");
    }
    // The right password and code: the account's count is gone again.
    let counted = all.lines().filter(|k| k.contains("fail:pwd:{")).count();
    assert_eq!(counted, 2, "{all}");
    gw.sign_in_again("typed@example.com", &secret).await;
    let after = keys().await;
    assert_eq!(
        after.lines().filter(|k| k.contains("fail:pwd:{")).count(),
        1,
        "only the other address's count is left: {after}"
    );
    let _: () = ::redis::cmd("DEL")
        .arg(after.lines().collect::<Vec<_>>())
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Gateways compare times that other gateways stored (sessions, proofs, signing keys, the
/// per-second sign-in budget) with their own clock: a gateway whose clock is off from the one
/// its fleet shares (Redis's here, else PostgreSQL's) by more than `server.max_clock_skew` says
/// it is not ready, naming the offset, until its clock is right again; on one gateway's memory
/// store there is no shared clock to compare with.
#[tokio::test]
async fn a_gateway_whose_clock_is_off_is_not_ready() {
    let gw = Gateway::start_with(|c| {
        c.storage.ephemeral = "redis://127.0.0.1:6379/".into();
        c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
        c.server.max_clock_skew = Duration::from_secs(2);
    })
    .await;
    let (s, body) = status(&gw, "/_portcullis/readyz").await;
    assert_eq!(s, 200, "{body}");
    assert!(body.get("clock").is_none(), "{body}");
    gw.clock.advance(100);
    let (s, body) = status(&gw, "/_portcullis/readyz").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["stores"]["ephemeral"], "up");
    let off = body["clock"]["offset_ms"].as_i64().unwrap();
    assert!((99_000..=101_000).contains(&off), "{body}");
    assert_eq!(body["clock"]["max_ms"], 2000);

    let alone = Gateway::start_with(|c| c.server.max_clock_skew = Duration::from_secs(2)).await;
    alone.clock.advance(100);
    assert_eq!(status(&alone, "/_portcullis/readyz").await.0, 200);
}

/// A form stopped for a step-up that Redis will not keep (here its user may no longer write the
/// held-form keys) is refused with 503 and counted as unavailable, not as denied; nothing of it
/// reaches the console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_redis_cannot_hold_is_refused_and_counted_as_unavailable() {
    let redis = PrivateRedis::start();
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let prefix = format!("held{}:", uuid::Uuid::new_v4().simple());
    let acl = |rules: &[&str]| {
        let mut cmd = ::redis::cmd("ACL");
        cmd.arg("SETUSER").arg("gw").arg(rules);
        cmd
    };
    let everything = format!("~{prefix}*");
    let _: () = acl(&["on", ">gwpass", &everything, "&*", "+@all"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let port = redis.url().rsplit(':').next().unwrap().to_string();
    let (metrics, adjust) = super::metrics::metrics_on_free_port();
    let url = format!("redis://gw:gwpass@127.0.0.1:{port}");
    let keys = prefix.clone();
    let gw = Gateway::start_with(move |c| {
        on_redis(c, url);
        c.storage.redis_prefix = keys;
        adjust(c);
        super::step_up::rules(c);
    })
    .await;
    let (c, _, _) = gw.signed_in("unkept@example.com").await;
    assert_eq!(gw.status(&c, "/campaigns/7/edit").await, 200);
    gw.clock.advance(6 * 60);
    // Everything under the prefix stays readable and writable but the held forms' keys.
    let read = format!("%R~{prefix}*");
    let write = format!("%W~{prefix}[^h]*");
    let _: () = acl(&["resetkeys", &read, &write])
        .query_async(&mut admin)
        .await
        .unwrap();
    let before = super::metrics::scrape(&metrics).await;
    let forwarded = gw.upstream.count();
    let r = gw
        .form_from(
            &c,
            ("/campaigns/7/send", "/campaigns/7/edit"),
            "recipients=5",
        )
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("temporarily unavailable"));
    let after = super::metrics::scrape(&metrics).await;
    let outcome = |o: &str| format!("portcullis_proxied_requests_total{{outcome=\"{o}\"}}");
    assert_eq!(
        super::metrics::moved(&before, &after, &outcome("unavailable")),
        1.0
    );
    assert_eq!(
        super::metrics::moved(&before, &after, &outcome("denied")),
        0.0
    );
    assert_eq!(gw.upstream.count(), forwarded);
}
