//! The proxy hot path on Redis: how many commands a proxied request costs, counted by a private
//! `redis-server` (`INFO commandstats`, so no other test's traffic counts), and how a session
//! revoked on one gateway stops working on another that had it cached — including when the
//! invalidation channel breaks.

use std::time::{Duration, Instant};

use super::harness::*;
use super::redis::{gateway_on, PrivateRedis};
use portcullis::clock::Clock;

/// Commands that are not the request's: the channel's keep-alive and our own counting.
const NOT_COUNTED: &[&str] = &[
    "info",
    "ping",
    "subscribe",
    "client",
    "hello",
    "select",
    "keys",
];

/// Commands the server has run so far, apart from [`NOT_COUNTED`].
async fn commands(redis: &PrivateRedis) -> u64 {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.split('|').next()?;
            if NOT_COUNTED.contains(&name) {
                return None;
            }
            let calls = rest.strip_prefix("calls=")?.split(',').next()?;
            calls.parse::<u64>().ok()
        })
        .sum()
}

/// Runs one raw command on the private Redis.
async fn raw_cmd<T: ::redis::FromRedisValue>(redis: &PrivateRedis, cmd: &::redis::Cmd) -> T {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// Waits until the gateway's session cache serves (its invalidation channel is subscribed).
async fn cache_live(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.state.sessions.cache().is_live() {
        assert!(Instant::now() < deadline, "the channel never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until the gateway's cache holds nothing (a published invalidation arrived).
async fn cache_empty(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.state.sessions.cache().is_empty() {
        assert!(Instant::now() < deadline, "the invalidation never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One proxied request; returns its status and the commands it cost.
async fn costed(redis: &PrivateRedis, gw: &Gateway, c: &Browser) -> (u16, u64) {
    let before = commands(redis).await;
    let status = c.get(gw.url("/x")).send().await.unwrap().status().as_u16();
    (status, commands(redis).await - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_request_costs_one_redis_command_and_none_when_seen_within_a_second() {
    let redis = PrivateRedis::start();
    let gw = gateway_on(redis.url()).await;
    cache_live(&gw).await;
    let (c, _, _) = gw.signed_in("hot@example.com").await;
    // Let anything the sign-in cached run out.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let (status, first) = costed(&redis, &gw, &c).await;
    let loaded = Instant::now();
    assert_eq!(status, 200);
    assert!(first <= 1, "a request not seen recently: {first} commands");
    assert_eq!(first, 1, "the session is read from Redis once");

    let mut cached = 0;
    for _ in 0..5 {
        let (status, n) = costed(&redis, &gw, &c).await;
        assert_eq!(status, 200);
        // A request within the cache's lifetime costs nothing; one after it (a slow machine)
        // reads once more, never more than that.
        assert!(n <= 1, "{n} commands");
        if loaded.elapsed() < Duration::from_millis(900) {
            assert_eq!(n, 0, "seen within the last second: no Redis command");
            cached += 1;
        }
    }
    assert!(cached > 0, "no request came within a second of the first");
    assert_eq!(gw.upstream.count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_gateway_reaches_the_others_cache() {
    let redis = PrivateRedis::start();
    let a = gateway_on(redis.url()).await;
    let b = a.restarted().await;
    cache_live(&a).await;
    cache_live(&b).await;
    let email = "revoked@example.com";
    let (c, secret, _) = a.signed_in(email).await;

    // B serves the session from its cache; A logs it out.
    assert_eq!(costed(&redis, &b, &c).await.0, 200);
    assert_eq!(b.state.sessions.cache().len(), 1);
    super::login::sign_out(&a, &c).await;
    cache_empty(&b).await;
    let r = c.get(b.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 303, "B refuses once A's message arrived");

    // A's connections dropped while idle (Redis's `timeout`, a restart): the next revocation is
    // announced all the same, on the connection opened meanwhile, not lost to the dropped one.
    let c = a.sign_in_again(email, &secret).await;
    assert_eq!(costed(&redis, &b, &c).await.0, 200);
    assert_eq!(b.state.sessions.cache().len(), 1);
    let _: i64 = raw_cmd(
        &redis,
        ::redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal"),
    )
    .await;
    super::login::sign_out(&a, &c).await;
    let announced = Instant::now();
    cache_empty(&b).await;
    assert!(
        announced.elapsed() < Duration::from_millis(500),
        "the revocation was announced, not left to the cache's second"
    );

    // Every session of a user, ended on A (admin "end sessions", "this wasn't me").
    let c = a.sign_in_again(email, &secret).await;
    assert_eq!(costed(&redis, &b, &c).await.0, 200);
    assert_eq!(b.state.sessions.cache().len(), 1);
    let user = a.user(email).await;
    a.state.sessions.destroy_all(&user.id).await.unwrap();
    cache_empty(&b).await;
    assert_eq!(c.get(b.url("/x")).send().await.unwrap().status(), 303);

    // A user disabled on A: B drops the user's cached record and sessions.
    let c = a.sign_in_again(email, &secret).await;
    assert_eq!(costed(&redis, &b, &c).await.0, 200);
    let now = a.clock.now_millis();
    a.state
        .durable
        .set_disabled(&user.id, true, now)
        .await
        .unwrap();
    a.state.user_gate.forget(&user.id);
    cache_empty(&b).await;
    assert_eq!(c.get(b.url("/x")).send().await.unwrap().status(), 303);
}

/// Redis dropped the gateway's connections while idle (its `timeout`, a restart): the first
/// sign-in after that is served, its counters (the per-second global budget among them) tried
/// once more on the connection opened meanwhile, not refused with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_sign_in_after_redis_dropped_its_connections_is_served() {
    let redis = PrivateRedis::start();
    let gw = gateway_on(redis.url()).await;
    gw.add_user("dropped@example.com").await;
    for _ in 0..3 {
        let b = gw.browser();
        let csrf = gw.csrf(&b, "/_portcullis/login").await;
        let _: i64 = raw_cmd(
            &redis,
            ::redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal"),
        )
        .await;
        let r = b
            .post(gw.url("/_portcullis/login"))
            .form(&[
                ("username", "dropped@example.com"),
                ("password", "not the password at all"),
                ("csrf", csrf.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_invalidation_channel_stops_the_cache_until_it_reconnects() {
    let redis = PrivateRedis::start();
    let gw = gateway_on(redis.url()).await;
    cache_live(&gw).await;
    let email = "channel@example.com";
    let (c, secret, _) = gw.signed_in(email).await;
    assert_eq!(costed(&redis, &gw, &c).await.0, 200);
    assert_eq!(gw.state.sessions.cache().len(), 1);

    // The subscription is cut and the session deleted behind the gateway's back: the message
    // that would have announced it can no longer arrive. The cached copy must not be served.
    let killed: i64 = raw_cmd(
        &redis,
        ::redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
    )
    .await;
    assert_eq!(killed, 1, "one gateway, one subscription");
    let pattern = format!("{}session:*", gw.state.config.storage.redis_prefix);
    let keys: Vec<String> = raw_cmd(&redis, ::redis::cmd("KEYS").arg(&pattern)).await;
    assert_eq!(keys.len(), 1);
    let _: i64 = raw_cmd(&redis, ::redis::cmd("DEL").arg(&keys[0])).await;
    // The channel's loss clears the cache (and it stays off until subscribed again).
    cache_empty(&gw).await;
    let r = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 303, "no copy outlives a missed revocation");

    // It reconnects by itself and caches again.
    cache_live(&gw).await;
    let c = gw.sign_in_again(email, &secret).await;
    assert_eq!(costed(&redis, &gw, &c).await, (200, 1));
    let (status, n) = costed(&redis, &gw, &c).await;
    assert_eq!(status, 200);
    assert!(n <= 1);
}

/// The id of the one pub/sub client connected to the private Redis.
async fn subscriber_id(redis: &PrivateRedis) -> String {
    let list: String = raw_cmd(
        redis,
        ::redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub"),
    )
    .await;
    let ids: Vec<&str> = list
        .lines()
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next())
        .collect();
    assert_eq!(ids.len(), 1, "{list}");
    ids[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscription_is_kept_not_reconnected() {
    let redis = PrivateRedis::start();
    let gw = gateway_on(redis.url()).await;
    cache_live(&gw).await;
    let id = subscriber_id(&redis).await;
    // Two keep-alive pings later, the same connection is still subscribed.
    tokio::time::sleep(portcullis::store::redis::PING_EVERY * 2 + Duration::from_millis(500)).await;
    assert_eq!(subscriber_id(&redis).await, id);
    assert!(gw.state.sessions.cache().is_live());
    let pings: String = raw_cmd(&redis, ::redis::cmd("INFO").arg("commandstats")).await;
    assert!(
        pings.contains("cmdstat_ping:"),
        "the subscription is checked"
    );
}
