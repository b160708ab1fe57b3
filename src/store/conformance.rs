//! Conformance suite run against every store backend.
//!
//! One generic suite per trait ([`ephemeral::ephemeral_suite`], [`durable::durable_suite`]);
//! each backend is one test function below that builds the backend and hands it over, so a new
//! backend (Redis) is one more function.
//!
//! PostgreSQL tests need the shared server on 127.0.0.1:5432; each test runs in its own fresh
//! database, so tests can run in parallel. Redis tests need the shared server on 127.0.0.1:6379;
//! each uses its own random key prefix. A missing server is a failure, never a skip.
// Tests may unwrap and panic: a failure is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cluster;
mod durable;
mod durable_admin;
mod durable_audit;
mod durable_devices;
mod durable_webauthn;
mod ephemeral;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

use crate::clock::{Clock, ManualClock};
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisOptions, RedisStore, RedisTarget};
use crate::store::sql::SqlStore;
use crate::store::{DurableStore, EphemeralStore, StoreError};
use ephemeral::{Advance, EphemeralBackend};

const PG_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
const PG_HOWTO: &str = "PostgreSQL must answer on 127.0.0.1:5432 (user postgres, trust auth, \
     database `test`). Start it with: \
     pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ephemeral_memory() {
    let clock = ManualClock::starting_now();
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone()) as Arc<dyn Clock>));
    let advance: Advance = Arc::new(move |by: Duration| {
        clock.advance(i64::try_from(by.as_secs()).unwrap());
        Box::pin(async {})
    });
    ephemeral::ephemeral_suite(EphemeralBackend { store, advance }).await;
}

/// Redis keeps its own time, so the suite's clock moves by sleeping (a few seconds in total).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ephemeral_redis() {
    let store = Arc::new(shared_redis().await);
    let advance: Advance = Arc::new(|by: Duration| Box::pin(tokio::time::sleep(by)));
    ephemeral::ephemeral_suite(EphemeralBackend { store, advance }).await;
}

/// The same suite through Redis Cluster routing: a private three-master cluster, started for
/// this test from the redis-server binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ephemeral_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(cluster::LocalCluster::start)
        .await
        .unwrap();
    let nodes = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let target = RedisTarget::parse(&format!("redis+cluster://{nodes}"))
        .unwrap()
        .unwrap();
    let store = RedisStore::connect(RedisOptions {
        target,
        prefix: "cluster-test:".into(),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
    })
    .await
    .unwrap();
    let store = Arc::new(store);
    let advance: Advance = Arc::new(|by: Duration| Box::pin(tokio::time::sleep(by)));
    ephemeral::ephemeral_suite(EphemeralBackend {
        store: store.clone(),
        advance,
    })
    .await;
    // A key whose slot is moving to another master (resharding): read and written all along,
    // one call at a time, the client following the nodes' `ASK` and `MOVED` answers. (Many
    // calls at once on a slot held half-moved for seconds can fail: docs/operations.md.)
    store
        .put("moving", b"before", Duration::from_secs(60))
        .await
        .unwrap();
    let moving = {
        let cluster = &cluster;
        tokio::task::block_in_place(|| cluster.begin_moving("cluster-test:moving"))
    };
    for i in 0..20 {
        let got = store.get("moving").await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&b"before"[..]),
            "read {i} while the slot moves"
        );
    }
    store
        .put("moving", b"during", Duration::from_secs(60))
        .await
        .unwrap();
    tokio::task::block_in_place(|| cluster.finish_move(&moving));
    for _ in 0..5 {
        let got = store.get("moving").await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"during"[..]));
    }
    // Readiness is the cluster's: a master lost without a replica leaves the others answering
    // PING while every command is refused (`CLUSTERDOWN`); the store is then not ready, asked
    // of whichever node.
    store.ping().await.unwrap();
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.lose_a_master();
        cluster
    })
    .await
    .unwrap();
    for _ in 0..6 {
        let err = store.ping().await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
    drop(cluster);
}

pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub(crate) const REDIS_HOWTO: &str = "Redis must answer on 127.0.0.1:6379. Start it with: \
     redis-server --daemonize yes --port 6379 --save '' --appendonly no";

/// A store on the shared Redis server under a fresh key prefix; panics with a how-to when the
/// server does not answer.
pub(crate) async fn shared_redis() -> RedisStore {
    let store = RedisStore::connect(RedisOptions {
        target: RedisTarget::Single(REDIS_URL.into()),
        prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{REDIS_HOWTO}"));
    use crate::store::EphemeralStore;
    store
        .ping()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{REDIS_HOWTO}"));
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("conformance.sqlite");
    let store = SqlStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    durable::durable_suite(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_postgres() {
    with_pg_database(|url| async move {
        let store = SqlStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        durable::durable_suite(Arc::new(store)).await;
    })
    .await;
}

/// The file-backed SQLite store keeps its data across a reconnect (migrations included).
#[tokio::test]
async fn durable_sqlite_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("reopen.sqlite").display());
    let first = SqlStore::connect(&url).await.unwrap();
    first.migrate().await.unwrap();
    let u = durable::create(
        &(Arc::new(first) as Arc<dyn DurableStore>),
        "Keep@Example.com",
    )
    .await;
    let second = SqlStore::connect(&url).await.unwrap();
    second.migrate().await.unwrap();
    assert_eq!(
        second.user_by_email("keep@example.com").await.unwrap(),
        Some(u)
    );
}

/// Another process holding the SQLite file for longer than the busy timeout (the CLI in a
/// long transaction, a second gateway) delays a change; it is not lost and no error reaches
/// the caller. Without the retry the first write fails with "database is locked".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_change_waits_out_another_writer() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("busy.sqlite").display());
    let store = SqlStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let store: Arc<dyn DurableStore> = Arc::new(store);
    let u = durable::create(&store, "busy@example.com").await;

    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    other.execute("BEGIN EXCLUSIVE").await.unwrap();
    let writer = {
        let store = store.clone();
        let id = u.id.clone();
        tokio::spawn(async move { store.void_sessions(&id, 42).await })
    };
    // Longer than the 5 s busy timeout of one try.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    assert!(!writer.is_finished(), "the change waited for the lock");
    other.execute("COMMIT").await.unwrap();
    writer.await.unwrap().unwrap();
    let after = store.user_by_id(&u.id).await.unwrap().unwrap();
    assert_eq!(after.sessions_valid_after_ms, 42);
}

/// Creates `t_<random hex>` on the shared server, runs `body` with its URL, then drops it, also
/// when `body` panics (the panic is passed on afterwards).
async fn with_pg_database<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url = format!("{PG_SERVER}/test");
    let mut admin = match tokio::time::timeout(
        Duration::from_secs(10),
        PgConnection::connect(&admin_url),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!("cannot connect to {admin_url}: {e}\n{PG_HOWTO}"),
        Err(_) => panic!("timed out connecting to {admin_url}\n{PG_HOWTO}"),
    };
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}\n{PG_HOWTO}"));
    let outcome = tokio::spawn(body(format!("{PG_SERVER}/{name}"))).await;
    let dropped = admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await;
    let _ = admin.close().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    dropped.unwrap_or_else(|e| panic!("DROP DATABASE {name} failed: {e}"));
}
