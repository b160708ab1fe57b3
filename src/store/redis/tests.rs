// Tests may unwrap and panic: a failure is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use super::*;
use crate::store::conformance::{shared_redis, REDIS_URL};

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn pttl(c: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(c).await.unwrap()
}

/// Every write leaves a prefixed key with a TTL: nothing in Redis lives forever, and nothing
/// lands outside the configured prefix.
#[tokio::test]
async fn every_key_is_prefixed_and_expires() {
    let s = shared_redis().await;
    let ttl = Duration::from_secs(60);
    s.put("a", b"1", ttl).await.unwrap();
    s.put_if_absent("b", b"1", ttl).await.unwrap();
    s.incr("c", ttl).await.unwrap();
    s.set_if_greater("d", 3, ttl).await.unwrap();
    s.set_add("e", "m", ttl).await.unwrap();
    let mut c = raw().await;
    for k in ["a", "b", "c", "d", "e"] {
        let t = pttl(&mut c, &s.key(k)).await;
        assert!(t > 0 && t <= 60_000, "{k}: PTTL {t}");
        assert_eq!(pttl(&mut c, k).await, -2, "{k} written without the prefix");
    }
}

/// A counter that somehow lost its TTL (written by an older version, `PERSIST`ed by hand) gets
/// one back at the next increment instead of counting forever.
#[tokio::test]
async fn incr_gives_a_counter_without_ttl_one() {
    let s = shared_redis().await;
    let mut c = raw().await;
    let _: () = redis::cmd("SET")
        .arg(s.key("n"))
        .arg("5")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(s.incr("n", Duration::from_secs(30)).await.unwrap(), 6);
    let t = pttl(&mut c, &s.key("n")).await;
    assert!(t > 0 && t <= 30_000, "PTTL {t}");
}

/// Numbers beyond 2^53 compare exactly (Lua doubles would call them equal).
#[tokio::test]
async fn set_if_greater_compares_large_numbers_exactly() {
    let s = shared_redis().await;
    let ttl = Duration::from_secs(30);
    let big = 1u64 << 60;
    assert!(s.set_if_greater("g", big, ttl).await.unwrap());
    assert!(s.set_if_greater("g", big + 1, ttl).await.unwrap());
    assert!(!s.set_if_greater("g", big + 1, ttl).await.unwrap());
    assert!(!s.set_if_greater("g", big - 1, ttl).await.unwrap());
}

fn options(target: &str) -> RedisOptions {
    RedisOptions {
        target: RedisTarget::Single(target.into()),
        prefix: "t:".into(),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(300),
    }
}

async fn assert_fails_fast(s: &RedisStore) {
    for _ in 0..3 {
        let started = Instant::now();
        let r = s.get("k").await;
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "a dead Redis is an error: {r:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered in {:?}",
            started.elapsed()
        );
        assert!(s.ping().await.is_err());
    }
}

/// Nothing listens: connection refused, answered quickly and repeatedly.
#[tokio::test]
async fn refused_connection_is_a_quick_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = RedisStore::connect(options(&format!("redis://127.0.0.1:{port}")))
        .await
        .unwrap();
    assert_fails_fast(&s).await;
}

/// A server that accepts and never answers: the response timeout ends the wait.
#[tokio::test]
async fn silent_server_is_a_quick_error() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = l.accept().await {
            held.push(sock);
        }
    });
    let s = RedisStore::connect(options(&format!("redis://127.0.0.1:{port}")))
        .await
        .unwrap();
    assert_fails_fast(&s).await;
    hold.abort();
}

#[test]
fn targets_parse_and_never_echo_passwords() {
    assert_eq!(RedisTarget::parse("memory"), None);
    assert_eq!(
        RedisTarget::parse("redis://:pw@r:6379/2"),
        Some(Ok(RedisTarget::Single("redis://:pw@r:6379/2".into())))
    );
    assert_eq!(
        RedisTarget::parse("redis+cluster://u:pw@h1:7000, h2:7001/"),
        Some(Ok(RedisTarget::Cluster(vec![
            "redis://u:pw@h1:7000/".into(),
            "redis://u:pw@h2:7001/".into()
        ])))
    );
    assert_eq!(
        RedisTarget::parse("rediss://:pw@r:6380/0"),
        Some(Ok(RedisTarget::Single("rediss://:pw@r:6380/0".into())))
    );
    let tls_cluster = RedisTarget::parse("rediss+cluster://:pw@h1:7000,h2:7001");
    assert_eq!(
        tls_cluster,
        Some(Ok(RedisTarget::Cluster(vec![
            "rediss://:pw@h1:7000".into(),
            "rediss://:pw@h2:7001".into()
        ])))
    );
    assert!(tls_cluster.unwrap().unwrap().is_tls());
    assert!(!RedisTarget::parse("redis://r:1").unwrap().unwrap().is_tls());
    for bad in [
        "rediss://:hunter2@r:notaport",
        "redis+cluster://:hunter2@h1:7000,,h2:7001",
        "redis://:hunter2@r:notaport",
    ] {
        let e = RedisTarget::parse(bad).unwrap().unwrap_err();
        assert!(!e.contains("hunter2"), "{bad} → {e}");
    }
    let shown = format!(
        "{:?}",
        RedisTarget::parse("redis+cluster://u:hunter2@h1:1,h2:2")
    );
    assert!(!shown.contains("hunter2"), "{shown}");
}
