//! The [`DurableStore`] contract: users, second factors and signing keys. Every backend runs
//! [`durable_suite`] on a freshly migrated, empty store; names carry a random tag anyway so the
//! checks do not lean on each other.

use std::sync::Arc;

use tokio::sync::Barrier;

use crate::store::{
    normalise_email, DroppedFactors, DurableStore, NewUser, SigningKeyRecord, StoreError,
    TotpRecord, User,
};

/// Runs the whole contract against a migrated store.
pub(crate) async fn durable_suite(store: Arc<dyn DurableStore>) {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    migrate_is_idempotent(&store).await;
    users(&store, &tag).await;
    list_users_sorted(&store, &tag).await;
    password_disable_and_sessions(&store, &tag).await;
    totp_and_reset(&store, &tag).await;
    factors_dropped_since(&store, &tag).await;
    recovery_codes(&store, &tag).await;
    recovery_code_races(&store, &tag).await;
    signing_keys(&store, &tag).await;
    first_signing_key_race(&store, &tag).await;
    super::durable_audit::audit(&store, &tag).await;
    super::durable_audit::hostile_text(&store, &tag).await;
    super::durable_audit::large_batch(&store, &tag).await;
    super::durable_devices::devices_and_lock(&store, &tag).await;
    super::durable_devices::mail_queue(&store, &tag).await;
    super::durable_devices::report_links(&store, &tag).await;
    super::durable_webauthn::webauthn(&store, &tag).await;
    super::durable_admin::admin(&store, &tag).await;
    super::durable_audit::prune(&store, &tag).await;
    super::durable_devices::risk_history(&store, &tag).await;
    super::durable_devices::meta(&store, &tag).await;
}

pub(super) fn new_user(email: &str) -> NewUser {
    NewUser {
        email: email.to_string(),
        account_id: "acct-1".into(),
        is_admin: false,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
    }
}

pub(super) async fn create(s: &Arc<dyn DurableStore>, email: &str) -> User {
    s.create_user(new_user(email), 1_700_000_000).await.unwrap()
}

async fn fetch(s: &Arc<dyn DurableStore>, id: &str) -> User {
    s.user_by_id(id).await.unwrap().unwrap()
}

async fn migrate_is_idempotent(s: &Arc<dyn DurableStore>) {
    s.migrate().await.unwrap();
    s.migrate().await.unwrap();
    s.ping().await.unwrap();
}

async fn users(s: &Arc<dyn DurableStore>, tag: &str) {
    let raw = format!("  Alice.{tag}@Example.COM \t");
    let norm = format!("alice.{tag}@example.com");
    assert_eq!(normalise_email(&raw), norm);
    let mut new = new_user(&raw);
    new.account_id = "acct-42".into();
    new.is_admin = true;
    let alice = s.create_user(new, 1_700_000_123).await.unwrap();
    assert_eq!(alice.email, norm, "stored email is normalised");
    assert!(!alice.id.is_empty());
    assert_eq!(alice.account_id, "acct-42");
    assert!(alice.is_admin);
    assert!(!alice.disabled);
    assert_eq!(alice.created_at, 1_700_000_123);
    assert_eq!(alice.sessions_valid_after_ms, 0);

    for spelling in [
        norm.clone(),
        norm.to_uppercase(),
        format!(" ALICE.{tag}@example.com  "),
    ] {
        let found = s.user_by_email(&spelling).await.unwrap();
        assert_eq!(found.as_ref(), Some(&alice), "lookup by {spelling:?}");
    }
    assert_eq!(
        s.user_by_email(&format!("bob.{tag}@example.com"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        fetch(s, &alice.id).await,
        alice,
        "user_by_id returns what create_user did"
    );
    assert_eq!(s.user_by_id("no-such-id").await.unwrap(), None);

    let bob = create(s, &format!("bob.{tag}@example.com")).await;
    assert_ne!(bob.id, alice.id, "ids are unique");
    assert!(!bob.is_admin);

    for dup in [
        norm.clone(),
        format!("ALICE.{tag}@EXAMPLE.com"),
        format!(" {norm} "),
    ] {
        match s.create_user(new_user(&dup), 1).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("duplicate email {dup:?} must be a Conflict, got {other:?}"),
        }
    }
    assert_eq!(
        fetch(s, &alice.id).await,
        alice,
        "a refused duplicate changes nothing"
    );
}

async fn list_users_sorted(s: &Arc<dyn DurableStore>, tag: &str) {
    let mut made = Vec::new();
    for name in ["zed", "Amy", "mo", "bea"] {
        made.push(create(s, &format!("{name}.list.{tag}@example.org")).await);
    }
    let all = s.list_users().await.unwrap();
    let emails: Vec<&str> = all.iter().map(|u| u.email.as_str()).collect();
    let mut sorted = emails.clone();
    sorted.sort_unstable();
    assert_eq!(emails, sorted, "list_users is sorted by email");
    let ours: Vec<&str> = emails
        .iter()
        .copied()
        .filter(|e| e.contains(&format!(".list.{tag}@")))
        .collect();
    let expected: Vec<String> = ["amy", "bea", "mo", "zed"]
        .iter()
        .map(|n| format!("{n}.list.{tag}@example.org"))
        .collect();
    assert_eq!(ours, expected);
    for u in &made {
        assert!(all.contains(u), "list_users returns full records");
    }
}

async fn password_disable_and_sessions(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("carol.{tag}@example.com")).await;
    let other = create(s, &format!("dave.{tag}@example.com")).await;

    s.set_password_hash(&u.id, "$argon2id$new").await.unwrap();
    assert_eq!(fetch(s, &u.id).await.password_hash, "$argon2id$new");
    assert_eq!(
        fetch(s, &other.id).await,
        other,
        "other users are untouched"
    );

    s.set_disabled(&u.id, true, 1_700_000_000_500)
        .await
        .unwrap();
    let d = fetch(s, &u.id).await;
    assert!(d.disabled);
    assert_eq!(
        d.sessions_valid_after_ms, 1_700_000_000_500,
        "disabling voids sessions"
    );

    s.set_disabled(&u.id, false, 1_800_000_000_000)
        .await
        .unwrap();
    let e = fetch(s, &u.id).await;
    assert!(!e.disabled);
    assert_eq!(
        e.sessions_valid_after_ms, 1_700_000_000_500,
        "enabling keeps the watermark: old sessions stay void"
    );

    s.void_sessions(&u.id, 1_750_000_000_000).await.unwrap();
    let v = fetch(s, &u.id).await;
    assert_eq!(v.sessions_valid_after_ms, 1_750_000_000_000);
    assert!(!v.disabled, "void_sessions does not disable");
    assert_eq!(v.password_hash, "$argon2id$new");
    assert_eq!(
        fetch(s, &other.id).await,
        other,
        "other users are untouched"
    );
}

async fn totp_and_reset(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("erin.{tag}@example.com")).await;
    let other = create(s, &format!("frank.{tag}@example.com")).await;
    assert_eq!(s.totp(&u.id).await.unwrap(), None);

    let first = TotpRecord {
        user_id: u.id.clone(),
        secret_sealed: vec![0, 1, 2, 255, 0, 39, 34],
        created_at: 100,
    };
    s.set_totp(first.clone()).await.unwrap();
    assert_eq!(s.totp(&u.id).await.unwrap(), Some(first));
    let second = TotpRecord {
        user_id: u.id.clone(),
        secret_sealed: vec![9; 64],
        created_at: 200,
    };
    s.set_totp(second.clone()).await.unwrap();
    assert_eq!(
        s.totp(&u.id).await.unwrap(),
        Some(second),
        "set_totp replaces"
    );
    let theirs = TotpRecord {
        user_id: other.id.clone(),
        secret_sealed: vec![7; 20],
        created_at: 300,
    };
    s.set_totp(theirs.clone()).await.unwrap();
    let codes: Vec<String> = (0..3).map(|i| format!("reset-{i}")).collect();
    s.set_recovery_codes(&u.id, &codes, 10).await.unwrap();
    s.set_recovery_codes(&other.id, &codes, 10).await.unwrap();

    assert_eq!(fetch(s, &u.id).await.factors_reset_at, None);
    assert!(fetch(s, &u.id).await.enrols_after_password());
    // A user made without a password (to set one through an enrolment link) takes its first
    // factor through a link only: marked in the same write that makes it.
    let password_less = NewUser {
        password_hash: String::new(),
        ..new_user(&format!("no-password-{}", u.email))
    };
    let made = s.create_user(password_less, 40).await.unwrap();
    assert_eq!(made.factors_reset_at, Some(40));
    assert_eq!(fetch(s, &made.id).await.factors_reset_at, Some(40));
    assert!(!fetch(s, &made.id).await.enrols_after_password());
    s.reset_second_factors(&u.id, 50).await.unwrap();
    assert_eq!(s.totp(&u.id).await.unwrap(), None, "reset removes TOTP");
    let reset = fetch(s, &u.id).await;
    assert_eq!(reset.factors_reset_at, Some(50), "the reset is remembered");
    assert!(!reset.enrols_after_password());
    assert_eq!(fetch(s, &other.id).await.factors_reset_at, None);
    assert_eq!(
        s.recovery_codes_left(&u.id).await.unwrap(),
        0,
        "reset removes codes"
    );
    assert!(!s.consume_recovery_code(&u.id, "reset-0", 11).await.unwrap());
    assert_eq!(
        s.totp(&other.id).await.unwrap(),
        Some(theirs),
        "only that user"
    );
    assert_eq!(s.recovery_codes_left(&other.id).await.unwrap(), 3);
    s.reset_second_factors(&u.id, 50).await.unwrap(); // nothing left: still fine
}

/// A report removes the authenticator app and recovery codes set up since the reported
/// sign-in, and only those.
async fn factors_dropped_since(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("drop-{tag}@example.com")).await;
    let other = create(s, &format!("drop-other-{tag}@example.com")).await;
    let totp = |user: &User, at| TotpRecord {
        user_id: user.id.clone(),
        secret_sealed: vec![1; 32],
        created_at: at,
    };
    let codes: Vec<String> = (0..4).map(|i| format!("drop-{i}")).collect();
    s.set_totp(totp(&u, 100)).await.unwrap();
    s.set_recovery_codes(&u.id, &codes, 100).await.unwrap();
    s.set_totp(totp(&other, 500)).await.unwrap();
    s.set_recovery_codes(&other.id, &codes, 500).await.unwrap();

    // Nothing of `u` is that recent: nothing goes, and the account is as it was.
    let none = s.drop_factors_since(&u.id, 101, 600).await.unwrap();
    assert_eq!(none, DroppedFactors::default());
    assert!(s.totp(&u.id).await.unwrap().is_some());
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 4);
    assert_eq!(fetch(s, &u.id).await.factors_reset_at, None);

    // Codes made again after it go, the older app stays.
    s.set_recovery_codes(&u.id, &codes, 300).await.unwrap();
    let codes_only = s.drop_factors_since(&u.id, 200, 600).await.unwrap();
    assert_eq!(
        codes_only,
        DroppedFactors {
            totp: false,
            recovery_codes: 4
        }
    );
    assert!(s.totp(&u.id).await.unwrap().is_some());
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 0);
    assert_eq!(fetch(s, &u.id).await.factors_reset_at, Some(600));

    // An app set up after it goes too; the other user keeps everything.
    s.set_totp(totp(&u, 400)).await.unwrap();
    let app = s.drop_factors_since(&u.id, 200, 700).await.unwrap();
    assert!(app.totp, "{app:?}");
    assert_eq!(s.totp(&u.id).await.unwrap(), None);
    assert_eq!(fetch(s, &u.id).await.factors_reset_at, Some(700));
    assert!(s.totp(&other.id).await.unwrap().is_some());
    assert_eq!(s.recovery_codes_left(&other.id).await.unwrap(), 4);
    assert_eq!(fetch(s, &other.id).await.factors_reset_at, None);
}

async fn recovery_codes(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("gina.{tag}@example.com")).await;
    let other = create(s, &format!("hal.{tag}@example.com")).await;
    let hashes: Vec<String> = (0..10).map(|i| format!("hash-{i:02}")).collect();
    let theirs = vec!["their-code".to_string()];
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 0);
    s.set_recovery_codes(&u.id, &hashes, 1_000).await.unwrap();
    s.set_recovery_codes(&other.id, &theirs, 1_000)
        .await
        .unwrap();
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 10);

    assert!(s
        .consume_recovery_code(&u.id, "hash-03", 1_001)
        .await
        .unwrap());
    assert!(
        !s.consume_recovery_code(&u.id, "hash-03", 1_002)
            .await
            .unwrap(),
        "a code works once"
    );
    assert!(
        !s.consume_recovery_code(&u.id, "their-code", 1_003)
            .await
            .unwrap(),
        "another user's code is refused"
    );
    assert!(!s
        .consume_recovery_code(&u.id, "hash-99", 1_004)
        .await
        .unwrap());
    assert!(!s.consume_recovery_code(&u.id, "", 1_004).await.unwrap());
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 9);
    assert_eq!(s.recovery_codes_left(&other.id).await.unwrap(), 1);
    assert!(s
        .consume_recovery_code(&u.id, "hash-09", 1_005)
        .await
        .unwrap());
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 8);

    let fresh: Vec<String> = (0..10).map(|i| format!("fresh-{i:02}")).collect();
    s.set_recovery_codes(&u.id, &fresh, 2_000).await.unwrap();
    assert_eq!(
        s.recovery_codes_left(&u.id).await.unwrap(),
        10,
        "set replaces all"
    );
    assert!(
        !s.consume_recovery_code(&u.id, "hash-00", 2_001)
            .await
            .unwrap(),
        "old unused codes are gone"
    );
    assert!(s
        .consume_recovery_code(&u.id, "fresh-00", 2_002)
        .await
        .unwrap());
    assert!(s
        .consume_recovery_code(&other.id, "their-code", 2_003)
        .await
        .unwrap());
    assert_eq!(s.recovery_codes_left(&other.id).await.unwrap(), 0);

    s.set_recovery_codes(&u.id, &[], 3_000).await.unwrap();
    assert_eq!(
        s.recovery_codes_left(&u.id).await.unwrap(),
        0,
        "set to none"
    );
}

async fn recovery_code_races(s: &Arc<dyn DurableStore>, tag: &str) {
    const TASKS: usize = 20;
    let u = create(s, &format!("ivy.{tag}@example.com")).await;
    let hashes = vec!["race-a".to_string(), "race-b".to_string()];
    s.set_recovery_codes(&u.id, &hashes, 1).await.unwrap();
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (s, id, barrier) = (s.clone(), u.id.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                s.consume_recovery_code(&id, "race-a", 2).await.unwrap()
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += u32::from(t.await.unwrap());
    }
    assert_eq!(wins, 1, "exactly one concurrent consume succeeds");
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 1);

    // New sets made at once (a double-click, two tabs, two gateways): one set is left, whole,
    // never the union of some (every code of each a working second factor).
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let (s, id, barrier) = (s.clone(), u.id.clone(), barrier.clone());
            tokio::spawn(async move {
                let set: Vec<String> = (0..3).map(|n| format!("set-{i}-{n}")).collect();
                barrier.wait().await;
                s.set_recovery_codes(&id, &set, 3).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 3);
    let mut sets_left = 0;
    for i in 0..TASKS {
        if s.consume_recovery_code(&u.id, &format!("set-{i}-0"), 4)
            .await
            .unwrap()
        {
            sets_left += 1;
        }
    }
    assert_eq!(sets_left, 1);
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 2);
}

/// Gateways starting together on an empty store: exactly one first key is stored.
async fn first_signing_key_race(s: &Arc<dyn DurableStore>, tag: &str) {
    // No key current, as in a fresh store (earlier checks leave some).
    s.retire_signing_keys_except("", 50).await.unwrap();
    let gate = Arc::new(Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (s, gate) = (s.clone(), gate.clone());
            let k = key(&format!("first-{tag}-{i}"), 100, None);
            tokio::spawn(async move {
                gate.wait().await;
                s.insert_first_signing_key(k).await.unwrap()
            })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        stored += usize::from(t.await.unwrap());
    }
    assert_eq!(stored, 1, "one first key");
    let current = s
        .live_signing_keys(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.retire_at.is_none())
        .count();
    assert_eq!(current, 1);
    let k = key(&format!("late-{tag}"), 100, None);
    assert!(
        !s.insert_first_signing_key(k).await.unwrap(),
        "a current key exists"
    );
}

fn key(kid: &str, created_at: i64, retire_at: Option<i64>) -> SigningKeyRecord {
    SigningKeyRecord {
        kid: kid.to_string(),
        alg: "EdDSA".into(),
        public_jwk: format!(r#"{{"kty":"OKP","crv":"Ed25519","kid":"{kid}","x":"AAAA"}}"#),
        private_sealed: vec![0, 1, 254, 255, created_at as u8],
        created_at,
        retire_at,
    }
}

async fn signing_keys(s: &Arc<dyn DurableStore>, tag: &str) {
    let kid = |n: &str| format!("{tag}-{n}");
    let live = |now: i64| {
        let s = s.clone();
        async move { s.live_signing_keys(now).await.unwrap() }
    };
    assert!(live(0).await.is_empty(), "a fresh store has no keys");

    let k1 = key(&kid("k1"), 100, None);
    let k2 = key(&kid("k2"), 200, None);
    let mut k3 = key(&kid("k3"), 300, None);
    k3.alg = "ES256".into();
    let old = key(&kid("old"), 50, Some(90));
    for k in [&k2, &k1, &old, &k3] {
        s.insert_signing_key(k.clone()).await.unwrap();
    }
    assert!(
        s.insert_signing_key(key(&kid("k1"), 400, None))
            .await
            .is_err(),
        "a kid is unique"
    );
    assert_eq!(
        live(1_000).await,
        vec![k3.clone(), k2.clone(), k1.clone()],
        "newest first, past retire_at left out, records intact"
    );
    assert_eq!(
        live(89).await.len(),
        4,
        "a retiring key stays live until retire_at"
    );

    s.retire_signing_keys_except(&k3.kid, 2_000).await.unwrap();
    let mut r1 = k1.clone();
    r1.retire_at = Some(2_000);
    let mut r2 = k2.clone();
    r2.retire_at = Some(2_000);
    assert_eq!(live(1_999).await, vec![k3.clone(), r2.clone(), r1.clone()]);
    assert_eq!(live(2_000).await, vec![k3.clone()], "gone at retire_at");

    // Keys already retiring keep their time; only the kept key is untouched.
    s.retire_signing_keys_except(&k3.kid, 5_000).await.unwrap();
    assert_eq!(live(1_999).await, vec![k3.clone(), r2, r1]);
    let k4 = key(&kid("k4"), 400, None);
    s.insert_signing_key(k4.clone()).await.unwrap();
    s.retire_signing_keys_except(&k4.kid, 6_000).await.unwrap();
    let mut r3 = k3.clone();
    r3.retire_at = Some(6_000);
    assert_eq!(live(5_999).await, vec![k4.clone(), r3]);
    assert_eq!(live(6_000).await, vec![k4]);
}
