//! Tests of password hashing, verification, the hashing queue and the password policy.

use super::*;
use std::sync::Arc;
use std::time::Duration;

fn cfg() -> PasswordConfig {
    PasswordConfig {
        min_length: 8,
        max_length: 256,
        argon2_memory_kib: 1024,
        argon2_iterations: 1,
        argon2_parallelism: 1,
        max_concurrent_hashes: 2,
        max_queued_hashes: 8,
        hashing_nice: 10,
    }
}

fn pw(s: &str) -> Secret<String> {
    Secret::new(s.to_string())
}

/// Verifies and unwraps; every call here is expected to reach a verdict.
async fn check(h: &PasswordHasher, password: &str, stored: Option<&str>) -> Verification {
    h.verify(&pw(password), stored).await.unwrap()
}

const MATCH: Verification = Verification::Match {
    needs_rehash: false,
};

#[tokio::test]
async fn hash_verify_round_trip() {
    let h = PasswordHasher::new(&cfg()).unwrap();
    let stored = h.hash(&pw("correct horse battery")).await.unwrap();
    assert!(
        stored.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"),
        "{stored}"
    );
    assert!(!stored.contains("correct"));
    let again = h.hash(&pw("correct horse battery")).await.unwrap();
    assert_ne!(stored, again, "salts must differ");
    assert_eq!(
        check(&h, "correct horse battery", Some(&stored)).await,
        MATCH
    );
    for wrong in ["Correct horse battery", "correct horse battery ", "x"] {
        let v = check(&h, wrong, Some(&stored)).await;
        assert_eq!(v, Verification::Mismatch, "{wrong}");
    }
    assert_eq!(h.queue_depth(), 0);
}

#[tokio::test]
async fn unknown_user_empty_oversized_and_garbage_hashes_mismatch() {
    let h = PasswordHasher::new(&cfg()).unwrap();
    let stored = h.hash(&pw("")).await.unwrap();
    let mismatch = |v: Verification| assert_eq!(v, Verification::Mismatch);
    mismatch(check(&h, "some password", None).await);
    // Even a hash of the empty string must not let an empty password in.
    mismatch(check(&h, "", Some(&stored)).await);
    for garbage in [
        "",
        "not-a-hash",
        "$2b$12$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234",
    ] {
        mismatch(check(&h, "some password", Some(garbage)).await);
    }
    // 256 four-byte characters (1024 bytes) is the longest allowed password; one byte more
    // is refused even when it would match.
    let longest = "😀".repeat(256);
    let stored = h.hash(&pw(&longest)).await.unwrap();
    assert_eq!(check(&h, &longest, Some(&stored)).await, MATCH);
    let too_long = format!("{longest}x");
    assert!(h.hash(&pw(&too_long)).await.is_err());
    let forged = hash_with(&h.params, too_long.as_bytes()).unwrap();
    mismatch(check(&h, &too_long, Some(&forged)).await);
}

#[tokio::test]
async fn rejected_inputs_still_do_the_hashing_work() {
    // With the only slot taken, a path that skipped argon2 would return at once.
    let h = PasswordHasher::new(&PasswordConfig {
        max_concurrent_hashes: 1,
        ..cfg()
    })
    .unwrap();
    let stored = h.hash(&pw("correct horse battery")).await.unwrap();
    let slot = h.slots.try_acquire().unwrap();
    let long = "a".repeat(5000);
    let cases = [
        ("unknown user", "a password", None),
        ("empty", "", Some(stored.as_str())),
        ("oversized", long.as_str(), Some(stored.as_str())),
        ("garbage hash", "a password", Some("nope")),
    ];
    for (what, password, stored) in cases {
        let password = pw(password);
        let fut = h.verify(&password, stored);
        let waited = tokio::time::timeout(Duration::from_millis(50), fut).await;
        assert!(waited.is_err(), "{what} returned without hashing");
    }
    drop(slot);
    assert_eq!(check(&h, "a password", None).await, Verification::Mismatch);
}

#[tokio::test]
async fn rehash_is_requested_when_parameters_change() {
    let old = PasswordHasher::new(&cfg()).unwrap();
    let stored = old.hash(&pw("correct horse battery")).await.unwrap();
    assert_eq!(
        check(&old, "correct horse battery", Some(&stored)).await,
        MATCH
    );
    for changed in [
        PasswordConfig {
            argon2_iterations: 2,
            ..cfg()
        },
        PasswordConfig {
            argon2_memory_kib: 2048,
            ..cfg()
        },
        PasswordConfig {
            argon2_parallelism: 2,
            ..cfg()
        },
    ] {
        let new = PasswordHasher::new(&changed).unwrap();
        let v = check(&new, "correct horse battery", Some(&stored)).await;
        assert_eq!(v, Verification::Match { needs_rehash: true });
        let wrong = check(&new, "wrong horse battery", Some(&stored)).await;
        assert_eq!(wrong, Verification::Mismatch);
    }
    // Another argon2 variant still verifies, and is flagged for upgrade.
    let salt = SaltString::generate(&mut OsRng);
    let argon2i = Argon2::new(Algorithm::Argon2i, Version::V0x13, old.params.clone())
        .hash_password(b"correct horse battery", &salt)
        .unwrap()
        .to_string();
    let v = check(&old, "correct horse battery", Some(&argon2i)).await;
    assert_eq!(v, Verification::Match { needs_rehash: true });
}

#[tokio::test]
async fn busy_when_the_queue_is_full() {
    let h = PasswordHasher::new(&PasswordConfig {
        argon2_memory_kib: 8192,
        max_concurrent_hashes: 1,
        max_queued_hashes: 1,
        ..cfg()
    })
    .unwrap();
    let password = pw("correct horse battery");
    let results = futures_util::future::join_all((0..6).map(|_| h.hash(&password))).await;
    let busy = results
        .iter()
        .filter(|r| matches!(r, Err(PasswordError::Busy)))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(busy >= 1 && ok >= 2, "busy {busy}, ok {ok}");
    assert_eq!(busy + ok, 6);
    assert_eq!(h.queue_depth(), 0);
}

#[tokio::test]
async fn queue_depth_counts_and_cancelled_waiters_leave_the_queue() {
    let h = Arc::new(
        PasswordHasher::new(&PasswordConfig {
            max_concurrent_hashes: 1,
            max_queued_hashes: 1,
            ..cfg()
        })
        .unwrap(),
    );
    let slot = h.slots.try_acquire().unwrap();
    assert_eq!(h.queue_depth(), 1);
    let spawn_hash = |h: Arc<PasswordHasher>| {
        tokio::spawn(async move { h.hash(&pw("correct horse battery")).await })
    };
    let waiter = spawn_hash(Arc::clone(&h));
    while h.slots.waiting() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.queue_depth(), 2);
    let refused = h.verify(&pw("correct horse battery"), None).await;
    assert!(matches!(refused, Err(PasswordError::Busy)));
    waiter.abort();
    assert!(waiter.await.is_err());
    assert_eq!(
        h.queue_depth(),
        1,
        "an abandoned waiter must leave the queue"
    );
    let waiter = spawn_hash(Arc::clone(&h));
    while h.slots.waiting() == 0 {
        tokio::task::yield_now().await;
    }
    drop(slot);
    assert!(waiter.await.unwrap().is_ok());
    assert_eq!(h.queue_depth(), 0);
}

#[test]
fn policy() {
    let c = cfg();
    let email = "alice.smith+esp@example.com";
    let ok = |p: &str| check_policy(p, &c, email).map_err(|e| e.to_string());
    assert!(ok("sh0rt!").unwrap_err().contains("at least 8"));
    // Length counts characters, not bytes: 7 CJK characters are 21 bytes but still too short.
    assert!(ok("密码密码密码密").is_err());
    assert!(ok("密码是很长的句子").is_ok());
    let japanese: String = "日本語のパスワード".chars().cycle().take(128).collect();
    assert_eq!(japanese.chars().count(), 128);
    assert!(ok(&japanese).is_ok());
    let mixed: String = "Zürich-東京-😀-".chars().cycle().take(200).collect();
    assert_eq!(mixed.chars().count(), 200);
    assert!(ok(&mixed).is_ok());
    assert!(
        ok(&"😀".repeat(256)).is_ok(),
        "256 four-byte characters fit"
    );
    assert!(ok(&"a".repeat(257)).unwrap_err().contains("at most 256"));
    // No sign-in form can send a NUL: a password with one could never be given.
    assert!(ok("Sup3r-Secr\0et-Pass!").unwrap_err().contains("NUL"));
    for common in ["password123", "iloveyou1", "PASSWORD123", "qwertyuiop"] {
        assert!(ok(common).unwrap_err().contains("common"), "{common}");
    }
    for leaky in [
        "alice.smith+esp",
        "My-ALICE.SMITH-pw",
        "xxalice.smithxx",
        "alice.smith2024",
    ] {
        assert!(ok(leaky).unwrap_err().contains("email"), "{leaky}");
    }
    // Short local parts are not treated as a secret worth hiding.
    assert!(check_policy("bob-the-builder-42", &c, "bob@example.com").is_ok());
    assert!(check_policy("correct horse battery", &c, "not-an-email").is_ok());
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn hashes_run_at_the_configured_priority_and_nothing_else_does() {
    let before = pool::current_nice();
    let h = PasswordHasher::new(&PasswordConfig {
        hashing_nice: 7,
        ..cfg()
    })
    .unwrap();
    let niceness =
        futures_util::future::join_all((0..4).map(|_| h.pool.run(pool::current_nice))).await;
    // (A test run that is itself niced cannot be compared with 7.)
    if before == 0 {
        assert!(
            niceness.iter().all(|n| *n == Some(7)),
            "hashing threads at {niceness:?}"
        );
    }
    // The same work the sign-in does, on the same threads.
    let stored = h.hash(&pw("correct horse battery")).await.unwrap();
    assert_eq!(
        check(&h, "correct horse battery", Some(&stored)).await,
        MATCH
    );
    // The runtime's own threads (where requests are handled) keep their priority.
    assert_eq!(pool::current_nice(), before);
    let worker = tokio::task::spawn_blocking(pool::current_nice)
        .await
        .unwrap();
    assert_eq!(worker, before);
}

#[tokio::test]
async fn a_panicking_job_is_an_error_and_the_threads_live_on() {
    let h = PasswordHasher::new(&PasswordConfig {
        max_concurrent_hashes: 1,
        ..cfg()
    })
    .unwrap();
    let lost: Option<()> = h.pool.run(|| panic!("boom")).await;
    assert!(lost.is_none());
    let stored = h.hash(&pw("correct horse battery")).await.unwrap();
    assert_eq!(
        check(&h, "correct horse battery", Some(&stored)).await,
        MATCH
    );
}
