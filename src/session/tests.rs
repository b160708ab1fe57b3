use super::*;
use crate::clock::ManualClock;
use crate::store::memory::MemoryStore;

fn sessions() -> (Sessions, ManualClock) {
    let clock = ManualClock::starting_now();
    let c: Arc<dyn Clock> = Arc::new(clock.clone());
    let store = Arc::new(MemoryStore::new(c.clone()));
    let cfg = SessionConfig {
        idle_timeout: Duration::from_secs(600),
        absolute_timeout: Duration::from_secs(3600),
        login_timeout: Duration::from_secs(300),
        ..SessionConfig::default()
    };
    (Sessions::new(store, c, cfg, true), clock)
}

fn authed(now: i64) -> Session {
    let mut s = Session::after_password("u1", Stage::Authenticated, now, "127.0.0.1", "ua", None);
    s.amr.push("otp".into());
    s
}

#[tokio::test]
async fn ids_are_random_and_only_hashes_are_keys() {
    let (s, clock) = sessions();
    let (id, key) = s.create(&authed(clock.now_millis())).await.unwrap();
    assert_eq!(id.len(), 43);
    assert_eq!(key, sha256_hex(id.as_bytes()));
    assert_ne!(id, key);
    let loaded = s.load(Some(&id)).await.unwrap().unwrap();
    assert_eq!(loaded.key, key);
    assert!(matches!(
        s.load(Some(&key)).await.unwrap(),
        Err(Invalid::Malformed | Invalid::Unknown)
    ));
    assert_eq!(
        s.load(Some("short")).await.unwrap().unwrap_err(),
        Invalid::Malformed
    );
    assert_eq!(s.load(None).await.unwrap().unwrap_err(), Invalid::Missing);
}

#[tokio::test]
async fn idle_and_absolute_timeouts() {
    let (s, clock) = sessions();
    let (id, _) = s.create(&authed(clock.now_millis())).await.unwrap();
    for _ in 0..7 {
        clock.advance(500);
        let mut l = s.load_cached(Some(&id)).await.unwrap().unwrap();
        assert!(s.touch(&mut l).await.unwrap());
    }
    // 3700 s in: kept alive by use, but past the absolute limit of 3600 s.
    clock.advance(200);
    assert_eq!(
        s.load(Some(&id)).await.unwrap().unwrap_err(),
        Invalid::Expired
    );
    let (id2, _) = s.create(&authed(clock.now_millis())).await.unwrap();
    clock.advance(601);
    assert!(s.load(Some(&id2)).await.unwrap().is_err(), "idle timeout");
}

#[tokio::test]
async fn pending_logins_expire_quickly() {
    let (s, clock) = sessions();
    let p = Session::after_password(
        "u1",
        Stage::SecondFactor,
        clock.now_millis(),
        "ip",
        "ua",
        None,
    );
    let (id, _) = s.create(&p).await.unwrap();
    clock.advance(299);
    assert!(s.load(Some(&id)).await.unwrap().is_ok());
    clock.advance(2);
    assert!(s.load(Some(&id)).await.unwrap().is_err());
}

#[tokio::test]
async fn rotation_kills_the_old_id_and_destroy_all_ends_everything() {
    let (s, clock) = sessions();
    let now = clock.now_millis();
    let (old, old_key) = s.create(&authed(now)).await.unwrap();
    let (new, _) = s.rotate(&old_key, &authed(now)).await.unwrap();
    assert!(s.load(Some(&old)).await.unwrap().is_err());
    assert!(s.load(Some(&new)).await.unwrap().is_ok());
    let (other, _) = s.create(&authed(now)).await.unwrap();
    assert_eq!(s.destroy_all("u1").await.unwrap(), 2);
    assert!(s.load(Some(&new)).await.unwrap().is_err());
    assert!(s.load(Some(&other)).await.unwrap().is_err());
}

#[test]
fn cookie_attributes() {
    let (s, _) = sessions();
    let c = s.set_cookie("abc");
    assert!(
        c.starts_with("__Host-portcullis-session=abc; Path=/; HttpOnly; SameSite=Lax; Secure"),
        "{c}"
    );
    assert!(s.clear_cookie().contains("Max-Age=0"));
}

/// Sessions whose gate reads go through a live local cache; also returns the store.
fn cached_sessions() -> (Sessions, ManualClock, Arc<MemoryStore>) {
    let clock = ManualClock::starting_now();
    let c: Arc<dyn Clock> = Arc::new(clock.clone());
    let store = Arc::new(MemoryStore::new(c.clone()));
    let cache = Arc::new(LocalCache::new(Duration::from_secs(1), 100, true));
    let s = Sessions::new(store.clone(), c, SessionConfig::default(), true).with_cache(cache, None);
    (s, clock, store)
}

/// Writes a changed copy of `s` straight into the store, as another gateway would.
async fn change_behind_the_back(store: &MemoryStore, key: &str, s: &Session) -> Session {
    let mut changed = s.clone();
    changed.amr.push("hwk".into());
    let body = serde_json::to_vec(&changed).unwrap();
    store
        .put(&record_key(key), &body, Duration::from_secs(3600))
        .await
        .unwrap();
    changed
}

#[tokio::test]
async fn the_gate_cache_is_dropped_by_every_local_change() {
    let (s, clock, store) = cached_sessions();
    let (id, key) = s.create(&authed(clock.now_millis())).await.unwrap();
    let first = s.load_cached(Some(&id)).await.unwrap().unwrap();
    assert_eq!(s.cache().len(), 1);

    // A change behind the cache's back is not seen within its lifetime (that is the point)…
    let changed = change_behind_the_back(&store, &key, &first.session).await;
    let hit = s.load_cached(Some(&id)).await.unwrap().unwrap();
    assert_eq!(hit.session, first.session);
    // …but one made through `save` is, at once, and `load` always reads the store.
    assert_eq!(s.load(Some(&id)).await.unwrap().unwrap().session, changed);
    s.save(&key, &changed).await.unwrap();
    assert_eq!(
        *s.load_cached(Some(&id)).await.unwrap().unwrap().session,
        changed
    );

    s.destroy(&key, "u1").await.unwrap();
    assert_eq!(
        s.load_cached(Some(&id)).await.unwrap().unwrap_err(),
        Invalid::Unknown
    );

    let (id, key) = s.create(&authed(clock.now_millis())).await.unwrap();
    s.load_cached(Some(&id)).await.unwrap().unwrap();
    let (new_id, _) = s.rotate(&key, &authed(clock.now_millis())).await.unwrap();
    assert_eq!(
        s.load_cached(Some(&id)).await.unwrap().unwrap_err(),
        Invalid::Unknown
    );
    s.load_cached(Some(&new_id)).await.unwrap().unwrap();
    s.destroy_all("u1").await.unwrap();
    assert_eq!(
        s.load_cached(Some(&new_id)).await.unwrap().unwrap_err(),
        Invalid::Unknown
    );
}

#[tokio::test]
async fn cached_records_still_time_out_and_are_touched_from_the_store() {
    let (s, clock, store) = cached_sessions();
    let (id, key) = s.create(&authed(clock.now_millis())).await.unwrap();
    let first = s.load_cached(Some(&id)).await.unwrap().unwrap();
    // Changed behind the cache's back; a minute later the record is due for its touch and is
    // read afresh, so the touch never writes the stale copy back.
    let changed = change_behind_the_back(&store, &key, &first.session).await;
    clock.advance(61);
    let mut fresh = s.load_cached(Some(&id)).await.unwrap().unwrap();
    assert_eq!(fresh.session.amr, changed.amr);
    assert!(s.touch(&mut fresh).await.unwrap());
    let stored = s.load(Some(&id)).await.unwrap().unwrap().session;
    assert_eq!(stored.amr, changed.amr);
    assert_eq!(stored.last_seen_ms, clock.now_millis());

    // Idle timeout is checked on a cached copy too.
    s.load_cached(Some(&id)).await.unwrap().unwrap();
    clock.advance(SessionConfig::default().idle_timeout.as_secs() as i64);
    assert!(s.load_cached(Some(&id)).await.unwrap().is_err());
}

#[tokio::test]
async fn a_touch_never_brings_back_a_session_ended_meanwhile() {
    let (s, clock) = sessions();
    let (id, key) = s.create(&authed(clock.now_millis())).await.unwrap();
    clock.advance(61);
    // Read for a request that is due for its touch; meanwhile the session is ended (on another
    // gateway, say) before the touch writes.
    let mut read = s.load_cached(Some(&id)).await.unwrap().unwrap();
    let user = read.session.user_id.clone();
    s.destroy(&key, &user).await.unwrap();
    assert!(
        !s.touch(&mut read).await.unwrap(),
        "the touch sees it has gone"
    );
    assert_eq!(
        s.load(Some(&id)).await.unwrap().unwrap_err(),
        Invalid::Unknown,
        "and does not write it back"
    );
}

/// A user's session index holds complete sessions only (anyone can start a sign-in for an
/// account whose second factor comes first), and entries of sessions that ran out on their own
/// are dropped as it grows, rather than kept while new sign-ins keep it alive.
#[tokio::test]
async fn the_user_index_holds_live_complete_sessions_only() {
    let (s, clock) = sessions();
    let index = |s: &Sessions| {
        let store = s.store.clone();
        async move {
            store
                .set_members(&user_index_key("u1"))
                .await
                .unwrap()
                .len()
        }
    };
    for _ in 0..50 {
        let pending = Session::after_password(
            "u1",
            Stage::SecondFactor,
            clock.now_millis(),
            "127.0.0.1",
            "ua",
            None,
        );
        s.create(&pending).await.unwrap();
    }
    assert_eq!(index(&s).await, 0, "sign-ins under way are indexed");
    // Sessions that ran out (their records gone with their lifetime), then new ones.
    for _ in 0..20 {
        s.create(&authed(clock.now_millis())).await.unwrap();
    }
    clock.advance(3601);
    for _ in 0..40 {
        s.create(&authed(clock.now_millis())).await.unwrap();
    }
    let held = index(&s).await;
    assert!(held <= 40 + 12, "{held} entries for 40 live sessions");
    assert_eq!(s.list_user("u1").await.unwrap().len(), 40);
    assert_eq!(s.destroy_all("u1").await.unwrap(), held);
}

/// A record read for a request that is due for its touch, then written by another request (a
/// device proof that set a risk hold) before the touch: the touch keeps what was written, and
/// the request goes on with it.
#[tokio::test]
async fn a_touch_never_undoes_what_was_written_since_the_read() {
    let (s, clock) = sessions();
    let (id, key) = s.create(&authed(clock.now_millis())).await.unwrap();
    clock.advance(61);
    let mut read = s.load_cached(Some(&id)).await.unwrap().unwrap();
    let mut held = (*read.session).clone();
    held.risk_hold_ms = Some(clock.now_millis());
    held.proof_context = Some("here".into());
    assert!(s.update(&key, &held).await.unwrap());
    assert!(s.touch(&mut read).await.unwrap());
    let stored = s.load(Some(&id)).await.unwrap().unwrap().session;
    assert_eq!(stored.risk_hold_ms, held.risk_hold_ms, "the hold stays");
    assert_eq!(stored.proof_context.as_deref(), Some("here"));
    assert_eq!(stored.last_seen_ms, clock.now_millis(), "and it is touched");
    assert_eq!(
        read.session.risk_hold_ms, held.risk_hold_ms,
        "the request sees it"
    );
}

/// A record read back and written out again is the same bytes (what the touch's
/// compare-and-set relies on to cost one store command): a full record, with a device key, a
/// place and every optional field, round-trips exactly.
#[tokio::test]
async fn a_record_is_written_out_as_it_was_read() {
    let (s, clock, store) = cached_sessions();
    let mut full = authed(clock.now_millis());
    full.binding = Some(crate::binding::BoundKey {
        method: crate::binding::Method::Webcrypto,
        alg: "ES256".into(),
        jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "y": "yy", "x": "xx"}),
        thumbprint: "tp".into(),
    });
    full.device_id = Some("dev".into());
    full.strong_ms = Some(1);
    full.factor_ms = Some(2);
    full.fix = Some(crate::risk::Fix {
        place: crate::risk::Place {
            country: Some("DE".into()),
            city: Some("Frankfurt am Main".into()),
            at: Some((501_100, 86_800)),
            radius_km: Some(20),
        },
        at_ms: 3,
    });
    full.risk_hold_ms = Some(4);
    full.proof_context = Some("abc".into());
    full.return_to = Some("/x?y=1".into());
    let (id, key) = s.create(&full).await.unwrap();
    let stored = store.get(&record_key(&key)).await.unwrap().unwrap();
    let read = s.load_cached(Some(&id)).await.unwrap().unwrap();
    assert_eq!(serde_json::to_vec(&*read.session).unwrap(), stored);
}
