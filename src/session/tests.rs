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
        let mut l = s.load(Some(&id)).await.unwrap().unwrap();
        s.touch(&mut l).await.unwrap();
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
