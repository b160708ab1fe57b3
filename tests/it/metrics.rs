//! Prometheus metrics on their own listener: sign-ins, step-ups, throttling, proxied requests,
//! mail and store latency move by exactly what happened; nothing of it is reachable through the
//! gateway's listener; `portcullis serve` starts the listener too.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::harness::*;
use super::webauthn::{
    after_password, call, localhost, passkey, remove_key, second_factor, with_key,
};

/// Waits until something accepts connections on `addr`: the gateway opens its side listeners
/// in the task the harness spawns, shortly after `Gateway::start` returns.
pub async fn wait_listening(addr: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// Every sample of a scrape, keyed by `name{labels}` as written.
pub(super) async fn scrape(addr: &str) -> HashMap<String, f64> {
    wait_listening(addr).await;
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn at(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample `{key}` in {:#?}", m.keys()))
}

/// How much each sample moved between two scrapes.
pub(super) fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    at(after, key) - before.get(key).copied().unwrap_or(0.0)
}

fn sign_ins(result: &str, factor: &str) -> String {
    format!("portcullis_sign_in_attempts_total{{result=\"{result}\",factor=\"{factor}\"}}")
}

pub(super) fn metrics_on_free_port() -> (String, impl FnOnce(&mut portcullis::config::Config)) {
    let addr = format!("127.0.0.1:{}", free_port());
    let listen = addr.clone();
    (addr, move |c: &mut portcullis::config::Config| {
        c.metrics.listen = Some(listen);
        c.limits.password_failures_per_account = 2;
    })
}

#[tokio::test]
async fn counters_move_by_exactly_what_happened() {
    let (metrics, adjust) = metrics_on_free_port();
    let gw = Gateway::start_with(adjust).await;
    gw.add_user("alice@example.com").await;
    gw.add_user("mallory-target@example.com").await;
    let before = scrape(&metrics).await;

    // One wrong password, then a complete first sign-in with enrolment, then a second sign-in.
    let c = gw.browser();
    let r = gw
        .password(&c, "alice@example.com", "wrong password!", "")
        .await;
    assert_eq!(r.status(), 401);
    let (secret, _codes) = gw.enrol(&c, "alice@example.com").await;
    let c = gw.sign_in_again("alice@example.com", &secret).await;
    // The account budget is 2: the third wrong password is throttled.
    let attacker = gw.browser();
    for _ in 0..3 {
        gw.password(&attacker, "mallory-target@example.com", "guess guess", "")
            .await;
    }
    // Proxied: one forwarded, one browser sent to sign in, one API client refused.
    assert_eq!(gw.status(&c, "/inbox").await, 200);
    assert_eq!(gw.status(&gw.browser(), "/inbox").await, 303);
    assert_eq!(gw.status(&gw.api(), "/inbox").await, 401);
    let mails = gw.outbox().await.len() as f64;

    let after = scrape(&metrics).await;
    let d = |k: &str| moved(&before, &after, k);
    assert_eq!(d(&sign_ins("failure", "password")), 3.0);
    assert_eq!(d(&sign_ins("throttled", "password")), 1.0);
    assert_eq!(d(&sign_ins("success", "password")), 2.0);
    // The enrolment code and the second sign-in's code.
    assert_eq!(d(&sign_ins("success", "totp")), 2.0);
    assert_eq!(d(&sign_ins("failure", "totp")), 0.0);
    assert_eq!(
        d("portcullis_throttled_attempts_total{limit=\"account_password\"}"),
        1.0
    );
    assert_eq!(d("portcullis_throttled_attempts_total{limit=\"ip\"}"), 0.0);
    assert_eq!(
        d("portcullis_step_ups_total{reason=\"enrolment_required\"}"),
        1.0
    );
    assert_eq!(
        d("portcullis_step_ups_total{reason=\"second_factor_required\"}"),
        1.0
    );
    for (outcome, n) in [
        ("forwarded", 1.0),
        ("sign_in_redirect", 1.0),
        ("denied", 1.0),
        ("unavailable", 0.0),
    ] {
        let key = format!("portcullis_proxied_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(d(&key), n, "{outcome}");
    }
    assert!(mails >= 1.0, "the sign-ins queued notices");
    assert_eq!(
        d("portcullis_mail_deliveries_total{result=\"queued\"}"),
        mails
    );
    assert_eq!(
        d("portcullis_mail_deliveries_total{result=\"sent\"}"),
        mails
    );
    assert_eq!(
        d("portcullis_mail_deliveries_total{result=\"failed\"}"),
        0.0
    );
    for (store, op) in [("durable", "read"), ("ephemeral", "atomic")] {
        let key = format!(
            "portcullis_store_operation_seconds_count{{store=\"{store}\",operation=\"{op}\"}}"
        );
        assert!(d(&key) > 0.0, "{key}");
    }
    assert_eq!(at(&after, "portcullis_argon2_queue_depth"), 0.0);
}

#[tokio::test]
async fn keys_passkeys_and_fresh_proof_are_counted() {
    let (metrics, adjust) = metrics_on_free_port();
    let gw = Gateway::start_with(|c| {
        adjust(c);
        localhost(c);
    })
    .await;
    let (c, user, mut k, cred) = with_key(&gw, "keys@example.com", "Key").await;
    let before = scrape(&metrics).await;

    // A key as second factor, then a passkey sign-in.
    let b = after_password(&gw, "keys@example.com").await;
    assert_eq!(
        second_factor(&gw, &b, &mut k, |_, _| {}).await.0.status(),
        200
    );
    let p = gw.browser();
    let (r, _, _) = passkey(&gw, &p, &mut k, &cred.credential_id, &user.id, |_| {}).await;
    assert_eq!(r.status(), 200);
    // Eleven minutes on, changing keys needs a fresh proof: adding and removing are refused.
    gw.clock.advance(11 * 60);
    let csrf = gw.csrf(&c, "/_portcullis/account").await;
    let r = call(
        &gw,
        &c,
        &csrf,
        "register/start",
        serde_json::json!({ "name": "x" }),
    )
    .await;
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "reauthentication_required");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("/_portcullis/reauth"));
    assert_eq!(remove_key(&gw, &c, &cred.id).await.status(), 403);
    // An API client is told the same for a removal as for every other factor change.
    let csrf = gw.csrf(&c, "/_portcullis/account").await;
    let r = c
        .post(gw.url(&format!("/_portcullis/account/keys/{}/remove", cred.id)))
        .header("accept", "application/json")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "reauthentication_required");

    let after = scrape(&metrics).await;
    let d = |k: &str| moved(&before, &after, k);
    assert_eq!(d(&sign_ins("success", "password")), 1.0);
    assert_eq!(d(&sign_ins("success", "key")), 1.0);
    assert_eq!(d(&sign_ins("success", "passkey")), 1.0);
    assert_eq!(d(&sign_ins("success", "totp")), 0.0);
    assert_eq!(
        d("portcullis_step_ups_total{reason=\"second_factor_required\"}"),
        1.0
    );
    assert_eq!(
        d("portcullis_step_ups_total{reason=\"fresh_proof_required\"}"),
        3.0
    );
}

#[tokio::test]
async fn outages_and_mail_failures_are_counted() {
    let (metrics, adjust) = metrics_on_free_port();
    // Nothing listens on the SMTP port: every delivery fails (and is retried later).
    let smtp = format!("smtp://127.0.0.1:{}", free_port());
    let gw = Gateway::start_with(|c| {
        adjust(c);
        c.notify.smtp_url = Some(portcullis::secret::Secret::new(smtp));
    })
    .await;
    let before = scrape(&metrics).await;
    let (b, _, _) = gw.signed_in("outage@example.com").await;
    let mail = |result: &str| format!("portcullis_mail_deliveries_total{{result=\"{result}\"}}");
    let mut after = scrape(&metrics).await;
    for _ in 0..200 {
        let queued = moved(&before, &after, &mail("queued"));
        if queued >= 1.0 && moved(&before, &after, &mail("failed")) == queued {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        after = scrape(&metrics).await;
    }
    let queued = moved(&before, &after, &mail("queued"));
    assert!(queued >= 1.0);
    assert_eq!(moved(&before, &after, &mail("failed")), queued);
    assert_eq!(moved(&before, &after, &mail("sent")), 0.0);

    // The durable store goes away under a signed-in user: refused with 503, counted.
    let _repair = gw.break_durable_store().await;
    gw.assert_unavailable_json(&b, "/inbox").await;
    let later = scrape(&metrics).await;
    let key = "portcullis_proxied_requests_total{outcome=\"unavailable\"}";
    assert_eq!(moved(&after, &later, key), 1.0);
    assert_eq!(
        moved(
            &after,
            &later,
            "portcullis_proxied_requests_total{outcome=\"forwarded\"}"
        ),
        0.0
    );
    // A sign-in refused meanwhile writes no audit event: it is counted as a page refused.
    let c = gw.browser();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    let r = gw
        .login_form(&c, &csrf, "someone@example.com", PASSWORD, "")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let last = scrape(&metrics).await;
    assert_eq!(
        moved(&later, &last, "portcullis_pages_unavailable_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argon2_queue_depth_follows_the_hashing_pool() {
    let (metrics, adjust) = metrics_on_free_port();
    let gw = Gateway::start_with(|c| {
        adjust(c);
        // One slot and costly hashes, so sign-ins wait in line long enough to be seen.
        c.password.max_concurrent_hashes = 1;
        c.password.argon2_memory_kib = 64 * 1024;
        c.password.argon2_iterations = 3;
    })
    .await;
    let depth = |m: HashMap<String, f64>| at(&m, "portcullis_argon2_queue_depth");
    assert_eq!(depth(scrape(&metrics).await), 0.0);
    let c = gw.browser();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    let attempts: Vec<_> = (0..3)
        .map(|i| {
            let form = gw.login_form(&c, &csrf, &format!("nobody{i}@example.com"), "pw", "");
            tokio::spawn(form.send())
        })
        .collect();
    let mut deepest = 0.0f64;
    while !attempts.iter().all(|a| a.is_finished()) {
        deepest = deepest.max(depth(scrape(&metrics).await));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        deepest >= 2.0,
        "one hash running and at least one waiting; saw {deepest}"
    );
    assert_eq!(depth(scrape(&metrics).await), 0.0);
}

#[tokio::test]
async fn metrics_are_only_on_their_own_listener() {
    let (metrics, adjust) = metrics_on_free_port();
    let gw = Gateway::start_with(adjust).await;
    // The gateway's listener has no metrics: its own namespace says 404, and `/metrics` is a
    // console path like any other (refused without a session, never the gateway's numbers).
    assert_eq!(gw.status(&gw.api(), "/_portcullis/metrics").await, 404);
    let r = gw.get(&gw.api(), "/metrics").await;
    assert_eq!(r.status(), 401);
    assert!(!r.text().await.unwrap().contains("portcullis_"));
    // And the metrics listener serves nothing of the gateway but its health probes.
    wait_listening(&metrics).await;
    for path in [
        "/_portcullis/login",
        "/",
        "/metrics/x",
        "/_portcullis/readyz",
    ] {
        let r = reqwest::get(format!("http://{metrics}{path}"))
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn the_metrics_listener_answers_the_health_probes() {
    let (metrics, adjust) = metrics_on_free_port();
    let _gw = Gateway::start_with(adjust).await;
    wait_listening(&metrics).await;
    let r = reqwest::get(format!("http://{metrics}/healthz"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    let r = reqwest::get(format!("http://{metrics}/readyz"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["stores"]["durable"], "up", "{body}");
}

/// Runs `portcullis serve` on `config` with `env` overrides; output goes to `log` when given.
pub fn serve_binary(
    config: &std::path::Path,
    env: &[(&str, String)],
    log: Option<&std::path::Path>,
) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(["serve", "--config"]).arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = match log {
        Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
        None => Stdio::null(),
    };
    Process(
        cmd.env("PORTCULLIS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap(),
    )
}

#[tokio::test]
async fn serve_starts_the_metrics_listener() {
    let gw = Gateway::start().await;
    let (port, metrics) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let _serve = serve_binary(
        &gw.config_path,
        &[
            ("PORTCULLIS__SERVER__LISTEN", format!("127.0.0.1:{port}")),
            ("PORTCULLIS__METRICS__LISTEN", metrics.clone()),
        ],
        None,
    );
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(format!("http://{metrics}/metrics")).await {
            let text = r.text().await.unwrap();
            assert!(text.contains("portcullis_sign_in_attempts_total"), "{text}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("portcullis serve never answered on its metrics listener {metrics}");
}

/// A listener that cannot be opened (the metrics port taken) stops the start-up: the gateway
/// never says it is listening, and with JSON logs the reason is a JSON line like every other.
#[tokio::test]
async fn a_listener_that_cannot_open_stops_the_start_and_is_logged_as_json() {
    let gw = Gateway::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let log = gw.dir.path().join("refused.log");
    let mut serve = serve_binary(
        &gw.config_path,
        &[
            (
                "PORTCULLIS__SERVER__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            ),
            (
                "PORTCULLIS__METRICS__LISTEN",
                taken.local_addr().unwrap().to_string(),
            ),
            ("PORTCULLIS__LOG__FORMAT", "json".into()),
        ],
        Some(&log),
    );
    let mut status = None;
    for _ in 0..300 {
        status = serve.0.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!status.expect("serve exits").success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with("note:"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "portcullis cannot run"
                && l["fields"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("(metrics)"))),
        "{text}"
    );
    assert!(!text.contains("portcullis is listening"), "{text}");
}

#[tokio::test]
async fn forward_auth_answers_are_counted_by_outcome() {
    let (metrics, adjust) = metrics_on_free_port();
    let gw = Gateway::start_with(|c| {
        adjust(c);
        c.forward_auth.enabled = true;
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let (c, _, _) = gw.signed_in("fa-metrics@example.com").await;
    let cookie = gw.cookies(&c);
    let before = scrape(&metrics).await;
    let ask = |cookie: String, uri: &'static str, accept: &'static str| {
        let addr = gw.addr;
        async move {
            raw(
                addr,
                "GET",
                "/_portcullis/auth",
                &[
                    ("Cookie", cookie.as_str()),
                    ("X-Original-URI", uri),
                    ("Accept", accept),
                ],
                "",
            )
            .await
            .status
        }
    };
    // Two allowed, one API client without a session, one browser without a session, one
    // question about the gateway's own namespace.
    assert_eq!(ask(cookie.clone(), "/inbox", "application/json").await, 200);
    assert_eq!(
        ask(cookie.clone(), "/campaigns", "application/json").await,
        200
    );
    assert_eq!(ask(String::new(), "/inbox", "application/json").await, 401);
    assert_eq!(ask(String::new(), "/inbox", "text/html").await, 302);
    assert_eq!(ask(cookie, "/_portcullis/login", "text/html").await, 403);
    let after = scrape(&metrics).await;
    for (outcome, n) in [
        ("allowed", 2.0),
        ("sign_in", 2.0),
        ("device_proof", 0.0),
        ("step_up", 0.0),
        ("denied", 1.0),
        ("unavailable", 0.0),
    ] {
        let key = format!("portcullis_forward_auth_decisions_total{{outcome=\"{outcome}\"}}");
        assert_eq!(moved(&before, &after, &key), n, "{outcome}");
    }
    // These are not proxied requests of this gateway.
    assert_eq!(
        moved(
            &before,
            &after,
            "portcullis_proxied_requests_total{outcome=\"forwarded\"}"
        ),
        0.0
    );
}

/// Every documented series is there before its first event, so alerts and `rate()` see it.
#[tokio::test]
async fn every_series_exists_from_the_start() {
    let (metrics, adjust) = metrics_on_free_port();
    let _gw = Gateway::start_with(adjust).await;
    wait_listening(&metrics).await;
    let m = scrape(&metrics).await;
    let mut expected: Vec<String> = [
        (
            "durable",
            &["read", "write", "atomic", "audit", "mail", "ping"][..],
        ),
        ("ephemeral", &["read", "write", "atomic", "ping"][..]),
    ]
    .iter()
    .flat_map(|(store, ops)| {
        ops.iter().map(move |op| {
            format!(
                "portcullis_store_operation_seconds_count{{store=\"{store}\",operation=\"{op}\"}}"
            )
        })
    })
    .collect();
    expected.push("portcullis_pages_unavailable_total".to_string());
    expected.push("portcullis_sign_ins_shed_total".to_string());
    for reason in [
        "second_factor_required",
        "enrolment_required",
        "key_required",
        "fresh_proof_required",
        "device_proof_required",
        "sensitive_action",
    ] {
        expected.push(format!("portcullis_step_ups_total{{reason=\"{reason}\"}}"));
    }
    let missing: Vec<_> = expected.iter().filter(|k| !m.contains_key(*k)).collect();
    assert!(missing.is_empty(), "missing {missing:?}");
}

/// `log.requests`: one JSON line per forwarded request, naming its method, path (never the
/// query), status and the request id the console received; without it, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_are_logged_when_asked_for() {
    let mut gw = Gateway::start_with(|c| {
        c.storage.ephemeral = "redis://127.0.0.1:6379/".into();
        c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    })
    .await;
    let log = gw.dir.path().join("requests.log");
    let port = free_port();
    let _serve = serve_binary(
        &gw.config_path,
        &[
            ("PORTCULLIS__SERVER__LISTEN", format!("127.0.0.1:{port}")),
            ("PORTCULLIS__LOG__FORMAT", "json".into()),
            ("PORTCULLIS__LOG__REQUESTS", "true".into()),
        ],
        Some(&log),
    );
    gw.aim_at(([127, 0, 0, 1], port).into());
    gw.wait_readyz(200).await;
    let (c, _, _) = gw.signed_in("logged@example.com").await;
    let r = c
        .get(gw.url("/campaigns/7?token=do-not-log-me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent_id = gw
        .upstream
        .last()
        .header("x-request-id")
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| {
                l["fields"]["message"] == "forwarded" && l["fields"]["path"] == "/campaigns/7"
            });
        if let Some(line) = found {
            assert!(!text.contains("do-not-log-me"), "{text}");
            break line;
        }
        assert!(std::time::Instant::now() < deadline, "no line: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["fields"]["method"], "GET", "{line}");
    assert_eq!(line["fields"]["status"], 200, "{line}");
    let text = line.to_string();
    assert!(text.contains(&sent_id), "{text} lacks {sent_id}");
}
