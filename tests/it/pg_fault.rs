//! A real `portcullis serve` process on a private PostgreSQL (durable) and Redis (ephemeral,
//! a fresh prefix), with the database stopped (fast shutdown) or killed outright under it.
//! While the database is away the gateway fails closed: sign-ins get a clear 503 and never a
//! session, signed-in users' requests get 503 once their cached user check (at most a second
//! old) needs the database, readiness says `durable: down` while liveness stays up. Nothing is
//! lost: audit events and queued mail from just before and during the outage are in the database
//! afterwards. When the database is back the same process serves again, without a restart.
//!
//! An in-process gateway on the same database and Redis prefix sets up the user and reads the
//! audit trail; the process under test shares its config, keys and sessions.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::harness::*;

/// How the database goes away.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// `SIGINT`: PostgreSQL's fast shutdown.
    Stop,
    /// `SIGKILL` of the postmaster, as a crash would.
    Kill,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_fails_closed_loses_nothing_and_recovers() {
    outage(Outage::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_fails_closed_loses_nothing_and_recovers() {
    outage(Outage::Kill).await;
}

/// A wrong password for this address before the outage spends its account budget, so its
/// attempt during the outage is throttled: an audit event made while the database is away.
const GHOST: &str = "nobody@example.com";
const BUDGET: u64 = 2;

async fn outage(how: Outage) {
    let mut pg = PrivatePostgres::start().await;
    let durable = pg.url();
    let mut gw = Gateway::start_with(move |c| {
        c.storage.durable = durable;
        c.storage.ephemeral = "redis://127.0.0.1:6379/".into();
        c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
        c.limits.password_failures_per_account = BUDGET;
    })
    .await;
    let email = "pg-user@example.com";
    let (c, _, codes) = gw.signed_in(email).await;

    let port = free_port();
    let log = gw.dir.path().join("serve.log");
    let mut serve = Process(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&gw.config_path)
            .arg("serve")
            .env("PORTCULLIS__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("PORTCULLIS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // From here on every request goes to the process.
    gw.aim_at(([127, 0, 0, 1], port).into());
    gw.wait_readyz(200).await;

    // Before the outage: the session works through the process, a new device signs in there
    // (a new-device notice and a recovery-code notice are queued), and the ghost address spends
    // its budget.
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
    let before = gw.browser();
    sign_in_with_code(&gw, &before, email, &codes[0]).await;
    assert_eq!(gw.status(&before, "/campaigns").await, 200);
    for _ in 0..BUDGET {
        let r = gw
            .password(&gw.browser(), GHOST, "wrong password", "")
            .await;
        assert!(!sets_session(&r), "a wrong password gets no session");
    }
    let mail_before = mail_ids(&gw).await;
    assert!(mail_before.len() >= 2, "notices queued: {mail_before:?}");

    // An operator's `audit tail --follow`, feeding another system, runs through the outage.
    let followed = gw.dir.path().join("follow.out");
    let follow_err = gw.dir.path().join("follow.err");
    let mut follower = Process(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&gw.config_path)
            .args(["audit", "tail", "-n", "0", "--follow"])
            .stdout(std::fs::File::create(&followed).unwrap())
            .stderr(std::fs::File::create(&follow_err).unwrap())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    match how {
        Outage::Stop => pg.stop(),
        Outage::Kill => pg.kill(),
    }

    // New sign-ins: 503, a page for browsers and JSON for API clients, never a session. A user
    // retrying during the outage spends none of the account's budget (it is `BUDGET`): the
    // sign-in after the outage below still works.
    for _ in 1..BUDGET {
        let r = gw.password(&gw.browser(), email, PASSWORD, "").await;
        assert_eq!(r.status(), 503);
    }
    let r = gw.password(&gw.browser(), email, PASSWORD, "").await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(!sets_session(&r));
    let page = r.text().await.unwrap();
    assert!(page.contains("Temporarily unavailable"), "{page}");
    let api = gw.browser();
    let csrf = gw.csrf(&api, "/_portcullis/login").await;
    let r = gw
        .login_form(&api, &csrf, "other@example.com", PASSWORD, "")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(!sets_session(&r));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unavailable", "{body}");

    // Signed-in users: refused once the cached user check has run out, and from then on; no
    // request reaches the console.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.status(&c, "/campaigns").await != 503 {
        assert!(Instant::now() < deadline, "proxied requests kept passing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let forwarded = gw.upstream.count();
    let page = gw.page(&c, "/campaigns").await;
    assert!(page.contains("Temporarily unavailable"), "{page}");
    gw.assert_unavailable_json(&before, "/campaigns").await;
    assert_eq!(gw.upstream.count(), forwarded, "nothing forwarded");

    // Probes: live, not ready, naming the durable store.
    assert_eq!(gw.status(&gw.api(), "/_portcullis/healthz").await, 200);
    let r = gw.get(&gw.api(), "/_portcullis/readyz").await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["stores"]["durable"], "down", "{body}");
    assert_eq!(body["stores"]["ephemeral"], "up", "{body}");

    // Signing out works without the database; its audit event waits for it.
    let csrf = gw.csrf(&before, "/_portcullis/logout").await;
    let r = before
        .post(gw.url("/_portcullis/logout"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&r), "/_portcullis/login?notice=logged_out");

    // An audit event made during the outage (the throttled ghost attempt needs only Redis).
    let r = gw
        .password(&gw.browser(), GHOST, "wrong password", "")
        .await;
    assert_eq!(r.status(), 429);

    // The database returns: the same process serves again by itself.
    pg.restart().await;
    gw.wait_readyz(200).await;
    assert_eq!(
        gw.status(&c, "/campaigns").await,
        200,
        "the session lives on"
    );
    let after = gw.browser();
    sign_in_with_code(&gw, &after, email, &codes[1]).await;
    assert_eq!(gw.status(&after, "/campaigns").await, 200);
    assert!(
        serve.0.try_wait().unwrap().is_none(),
        "the gateway process exited"
    );

    // Nothing lost: the mail queued before the outage and every audit event, including the
    // one recorded while the database was away (written once the writer gets through).
    let mail_after = mail_ids(&gw).await;
    for id in &mail_before {
        assert!(mail_after.contains(id), "mail {id} lost");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = gw.audit().await;
        let count = |event: &str, outcome: &str, reason: Option<&str>| {
            events
                .iter()
                .filter(|e| e.event == event && e.outcome == outcome)
                .filter(|e| reason.is_none() || e.reason.as_deref() == reason)
                .count()
        };
        if count("login_password", "failure", Some("unknown_user")) == BUDGET as usize
            && events
                .iter()
                .filter(|e| e.event == "login_password" && e.outcome == "denied")
                .filter(|e| {
                    e.reason
                        .as_deref()
                        .is_some_and(|r| r.starts_with("throttled"))
                })
                .count()
                == 1
            && count("recovery_code_used", "success", None) == 2
            && count("logout", "success", None) == 1
        {
            // Named as any other: the sign-out made while the database was away (recorded with
            // the session's user id alone) has the address and account its filters look for.
            let logout = events.iter().find(|e| e.event == "logout").unwrap();
            assert_eq!(logout.email.as_deref(), Some(email), "{logout:?}");
            assert!(logout.account_id.is_some(), "{logout:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "audit events missing after the outage: {events:#?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The follower waited for the database and printed what was written after it came back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&followed)
        .unwrap_or_default()
        .contains(" logout ")
    {
        assert!(
            follower.0.try_wait().unwrap().is_none(),
            "audit tail --follow exited: {}",
            std::fs::read_to_string(&follow_err).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the follower printed no logout");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let said = std::fs::read_to_string(&follow_err).unwrap_or_default();
    assert!(
        said.contains("unavailable") && said.contains("back"),
        "{said}"
    );
    let _ = follower.0.kill();
}

/// Whether a response starts a session.
fn sets_session(r: &reqwest::Response) -> bool {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("portcullis-session=") && !v.contains("Max-Age=0"))
}

/// The ids of every message in the mail queue, sent or not.
async fn mail_ids(gw: &Gateway) -> Vec<String> {
    let queue = gw.state.durable.list_mail(10_000).await.unwrap();
    queue.into_iter().map(|m| m.id).collect()
}

/// A complete sign-in with the password and a recovery code.
async fn sign_in_with_code(gw: &Gateway, b: &Browser, email: &str, code: &str) {
    let r = gw.password(b, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let r = gw.code(b, "/_portcullis/mfa", code).await;
    assert_eq!(r.status(), 303, "sign-in with a recovery code");
}

/// Old audit events put straight into the table for `audit prune` to remove.
const OLD_EVENTS: i64 = 400_000;

/// `audit prune` with the database stopped under it part-way: it stops with a clear error that
/// says how many events it removed, and that count is exact: after the restart exactly that many
/// of the old events are gone, no recent event with them. If the database came back in time to
/// take it, the removal is on record as a failure with the same count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_prune_stopped_part_way_reports_exactly_what_it_removed() {
    use sqlx::{Connection, Row};
    let mut pg = PrivatePostgres::start().await;
    let durable = pg.url();
    let gw = Gateway::start_with(move |c| c.storage.durable = durable).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let old_at = now - 500 * 86_400;
    let mut db = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    sqlx::query(
        "INSERT INTO audit_events (at, event, outcome, reason) \
         SELECT $1, 'login_password', 'denied', 'old-' || n FROM generate_series(1, $2) AS n",
    )
    .bind(old_at)
    .bind(OLD_EVENTS)
    .execute(&mut db)
    .await
    .unwrap();
    gw.state
        .durable
        .append_audit(&[
            portcullis::store::AuditEvent::new("login_password", "denied", now).reason("recent"),
        ])
        .await
        .unwrap();

    let prune = gw.cli(&["audit", "prune", "--older-than", "400d"], None);
    tokio::pin!(prune);
    // Stop the server once the first batch has gone and while the rest are still there.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::select! {
            out = &mut prune => panic!(
                "audit prune ended before the database was stopped: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            left = events_at(&mut db, old_at) => {
                if left < OLD_EVENTS {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "audit prune removed nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(db);
    pg.stop();
    // Back a few seconds later, while the command waits to record how far it got.
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.restart().await;
    let out = prune.await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a prune cut short reported success");
    let removed: i64 = err
        .split("stopped after removing ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in the error: {err}"));
    assert!(removed > 0 && removed < OLD_EVENTS, "{err}");

    let mut db = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    assert_eq!(events_at(&mut db, old_at).await, OLD_EVENTS - removed);
    let rows = sqlx::query("SELECT event, outcome, reason FROM audit_events WHERE at >= $1")
        .bind(now)
        .fetch_all(&mut db)
        .await
        .unwrap();
    let rows: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r.get("event"),
                r.get("outcome"),
                r.get::<Option<String>, _>("reason").unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        rows.iter().any(|(_, _, r)| r == "recent"),
        "a recent event went: {rows:?}"
    );
    // Its start was written before anything went, and its end once the database was back:
    // a failure, with the count removed.
    let of = |event: &str| -> Vec<(String, String)> {
        rows.iter()
            .filter(|(e, _, _)| e == event)
            .map(|(_, o, r)| (o.clone(), r.clone()))
            .collect()
    };
    let started = of("audit_prune_started");
    assert!(
        started.len() == 1 && started[0].1.starts_with("before:"),
        "{rows:?}"
    );
    let pruned = of("audit_pruned");
    assert_eq!(pruned.len(), 1, "{rows:?}");
    assert_eq!(pruned[0].0, "failure");
    assert!(
        pruned[0].1.ends_with(&format!(",removed:{removed}")),
        "{rows:?}"
    );
}

/// How many audit events carry the time `at`.
async fn events_at(db: &mut sqlx::PgConnection, at: i64) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT count(*) FROM audit_events WHERE at = $1")
        .bind(at)
        .fetch_one(db)
        .await
        .unwrap()
        .get(0)
}

/// PostgreSQL over TLS: with `sslmode=verify-full` and the server's CA in `sslrootcert`, a
/// whole sign-in runs over it and every connection the gateway holds is encrypted; a server
/// whose certificate that CA did not sign is refused.
#[tokio::test]
async fn the_durable_store_speaks_tls_to_postgres_and_checks_the_server() {
    use portcullis::store::DurableStore;
    use sqlx::Connection;
    let certs = tempfile::tempdir().unwrap();
    super::tls::make_ca(certs.path());
    let (cert, key) = super::tls::make_leaf(certs.path(), "pg");
    let pg = PrivatePostgres::start_tls(&cert, &key).await;
    let tls_url = |ca: &std::path::Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url(),
            ca.join("ca.pem").display()
        )
    };
    let durable = tls_url(certs.path());
    let gw = Gateway::start_with(move |c| c.storage.durable = durable).await;
    let (c, _, _) = gw.signed_in("tls-db@example.com").await;
    assert_eq!(gw.status(&c, "/campaigns").await, 200);
    let mut admin = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    let (all, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) \
         WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        all >= 1 && encrypted == all,
        "{encrypted} of {all} encrypted"
    );
    // Another CA: the server's certificate is not accepted.
    let other = tempfile::tempdir().unwrap();
    super::tls::make_ca(other.path());
    match portcullis::store::sql::SqlStore::connect(&tls_url(other.path())).await {
        Err(_) => {}
        Ok(store) => assert!(store.ping().await.is_err(), "an unknown server is refused"),
    }
    // `check-config` refuses it too, as the configuration's fault (not a store that is down).
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config"])
        .arg(&gw.config_path)
        .env("PORTCULLIS__STORAGE__DURABLE", tls_url(other.path()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("TLS certificate was not accepted"), "{err}");
}

/// A database server that answers but declines TLS, where the URL's `sslmode` asks for it, is
/// the configuration's fault: `check-config` refuses it, as `serve` would, rather than noting a
/// store that is away.
#[tokio::test]
async fn check_config_refuses_a_database_that_declines_the_tls_asked_for() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start().await;
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = server.accept().await {
            tokio::spawn(async move {
                // The SSLRequest (8 bytes), answered "N": no TLS here.
                let mut request = [0u8; 8];
                if conn.read_exact(&mut request).await.is_ok() {
                    let _ = conn.write_all(b"N").await;
                }
                let _ = conn.read(&mut request).await;
            });
        }
    });
    let url = format!("postgres://portcullis@{at}/portcullis?sslmode=require");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--config"])
        .arg(&gw.config_path)
        .env("PORTCULLIS__STORAGE__DURABLE", url)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("would not set up TLS"), "{err}");
}
