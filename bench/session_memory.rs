//! Memory per session: creates N complete, device-bound sessions (one user each) through
//! `portcullis::session::Sessions` on the memory store and on Redis, and reports the process RSS
//! growth per session (memory store) and Redis `used_memory` growth per session.
//!
//! Usage: `bench-session-memory [sessions=100000] [redis://127.0.0.1:6379]`. The Redis keys go
//! under a fresh prefix and are deleted at the end.

use std::sync::Arc;
use std::time::Instant;

use futures_util::{stream, StreamExt};
use portcullis::binding::{BoundKey, Method};
use portcullis::clock::{Clock, SystemClock};
use portcullis::config::{SessionConfig, StorageConfig};
use portcullis::session::{Session, Sessions, Stage};

const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                  Chrome/131.0.0.0 Safari/537.36";

/// A session as a browser sign-in leaves it: password + TOTP, bound to a P-256 device key.
fn session(i: usize, now_ms: i64) -> Session {
    let mut s = Session::after_password(
        &uuid::Uuid::new_v4().to_string(),
        Stage::Authenticated,
        now_ms,
        &format!("203.0.{}.{}", (i / 250) % 250, i % 250 + 1),
        UA,
        None,
    );
    s.amr.push("otp".into());
    s.device_id = Some(uuid::Uuid::new_v4().to_string());
    s.binding = Some(BoundKey {
        method: Method::Webcrypto,
        alg: "ES256".into(),
        jwk: serde_json::json!({
            "kty": "EC", "crv": "P-256",
            "x": portcullis::crypto::random_token(32),
            "y": portcullis::crypto::random_token(32),
        }),
        thumbprint: portcullis::crypto::random_token(32),
    });
    s
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn redis_used_memory(client: &redis::Client) -> anyhow::Result<u64> {
    let mut con = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut con)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no used_memory in INFO memory"))
}

async fn fill(sessions: &Sessions, n: usize) -> anyhow::Result<f64> {
    let now = SystemClock.now_millis();
    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..n)
        .map(|i| async move { sessions.create(&session(i, now)).await.map(|_| ()) })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn open(ephemeral: &str, prefix: &str, dir: &std::path::Path) -> anyhow::Result<Sessions> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let storage = StorageConfig {
        durable: format!("sqlite://{}", dir.join("m.sqlite").display()),
        ephemeral: ephemeral.into(),
        redis_prefix: prefix.into(),
        ..StorageConfig::default()
    };
    let (_, store) = portcullis::store::open(&storage, clock.clone()).await?;
    Ok(Sessions::new(store, clock, SessionConfig::default(), true))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let redis_url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let dir = std::env::temp_dir().join(format!("portcullis-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let record = serde_json::to_vec(&session(0, SystemClock.now_millis()))?.len();
    println!("One session record: {record} bytes of JSON, plus its entry in the user's index.\n");
    println!("| store | sessions | growth | bytes per session | seconds to create |");
    println!("|---|---|---|---|---|");

    let memory = open("memory", "", &dir).await?;
    let before = rss_bytes();
    let secs = fill(&memory, n).await?;
    let grown = rss_bytes().saturating_sub(before);
    println!(
        "| memory (process RSS) | {n} | {:.1} MiB | {:.0} | {secs:.1} |",
        grown as f64 / 1048576.0,
        grown as f64 / n as f64
    );
    drop(memory);

    let prefix = format!("bench-mem-{}:", portcullis::crypto::random_token(8));
    let client = redis::Client::open(redis_url.as_str())?;
    let redis = open(&redis_url, &prefix, &dir).await?;
    let before = redis_used_memory(&client).await?;
    let secs = fill(&redis, n).await?;
    let grown = redis_used_memory(&client).await?.saturating_sub(before);
    println!(
        "| Redis (INFO used_memory) | {n} | {:.1} MiB | {:.0} | {secs:.1} |",
        grown as f64 / 1048576.0,
        grown as f64 / n as f64
    );

    // Clean up: every key under the prefix.
    let mut con = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut con)
        .await?;
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut con).await?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
