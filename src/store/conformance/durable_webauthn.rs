//! The [`DurableStore`] contract for security keys and passkeys: storage, the counter
//! compare-and-set, suspension, rename/remove scoped to the owner, and reset.

use std::sync::Arc;

use tokio::sync::Barrier;

use super::durable::create;
use crate::store::{DurableStore, KeyRemoval, StoreError, TotpRecord, WebauthnCredential};

fn cred(user_id: &str, tag: &str, n: u32) -> WebauthnCredential {
    WebauthnCredential {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user_id.to_string(),
        credential_id: format!("cred-{tag}-{n}"),
        passkey: format!("{{\"cred\":{{\"counter\":{n}}}}}"),
        name: format!("Key {n}"),
        aaguid: (n % 2 == 0).then(|| "cb69481e-8ff7-4039-93ec-0a2729a154a8".to_string()),
        sign_count: 0,
        created_at: 1_700_000_000 + i64::from(n),
        last_used_at: None,
        suspended_at: None,
        suspended_reason: None,
    }
}

/// Runs every check.
pub(super) async fn webauthn(s: &Arc<dyn DurableStore>, tag: &str) {
    storage_and_lookup(s, tag).await;
    counter_only_rises(s, tag).await;
    counter_races_have_one_winner(s, tag).await;
    suspension(s, tag).await;
    rename_and_remove_are_owner_scoped(s, tag).await;
    the_last_factor_stays(s, tag).await;
    a_suspended_key_is_removed_or_restored(s, tag).await;
    removals_at_once_leave_a_factor(s, tag).await;
}

async fn storage_and_lookup(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("wa-store.{tag}@example.com")).await;
    assert!(s.webauthn_credentials(&u.id).await.unwrap().is_empty());
    let (a, b) = (cred(&u.id, tag, 1), cred(&u.id, tag, 2));
    s.add_webauthn_credential(&b).await.unwrap();
    s.add_webauthn_credential(&a).await.unwrap();
    assert_eq!(
        s.webauthn_credentials(&u.id).await.unwrap(),
        vec![a.clone(), b.clone()],
        "oldest first, every field kept"
    );
    assert_eq!(
        s.webauthn_credential(&a.credential_id).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(s.webauthn_credential("no-such-cred").await.unwrap(), None);

    // A credential id belongs to one user only.
    let other = create(s, &format!("wa-other.{tag}@example.com")).await;
    let mut dup = cred(&other.id, tag, 1);
    dup.id = uuid::Uuid::new_v4().to_string();
    match s.add_webauthn_credential(&dup).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("duplicate credential id must conflict, got {other:?}"),
    }
    assert!(s.webauthn_credentials(&other.id).await.unwrap().is_empty());

    // Reset removes the keys with the other second factors.
    s.reset_second_factors(&u.id, 50).await.unwrap();
    assert!(s.webauthn_credentials(&u.id).await.unwrap().is_empty());
    assert_eq!(s.webauthn_credential(&a.credential_id).await.unwrap(), None);
}

async fn counter_only_rises(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("wa-count.{tag}@example.com")).await;
    let c = cred(&u.id, tag, 3);
    s.add_webauthn_credential(&c).await.unwrap();
    assert!(s
        .record_webauthn_use(&c.id, "{\"v\":5}", 5, 10)
        .await
        .unwrap());
    let got = s
        .webauthn_credential(&c.credential_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.sign_count, got.last_used_at), (5, Some(10)));
    assert_eq!(got.passkey, "{\"v\":5}");
    for stale in [5, 4, 0] {
        assert!(
            !s.record_webauthn_use(&c.id, "{\"v\":0}", stale, 11)
                .await
                .unwrap(),
            "counter {stale} after 5 is refused"
        );
    }
    let got = s
        .webauthn_credential(&c.credential_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (got.sign_count, got.last_used_at),
        (5, Some(10)),
        "unchanged"
    );

    // Authenticators without a counter always report 0: accepted while the stored one is 0.
    let z = cred(&u.id, tag, 4);
    s.add_webauthn_credential(&z).await.unwrap();
    assert!(s.record_webauthn_use(&z.id, "{}", 0, 20).await.unwrap());
    assert!(s.record_webauthn_use(&z.id, "{}", 0, 21).await.unwrap());
    let got = s
        .webauthn_credential(&z.credential_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.last_used_at, Some(21));
    assert!(!s
        .record_webauthn_use("no-such-id", "{}", 9, 22)
        .await
        .unwrap());
}

async fn counter_races_have_one_winner(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("wa-race.{tag}@example.com")).await;
    let c = cred(&u.id, tag, 5);
    s.add_webauthn_credential(&c).await.unwrap();
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (s, b, id) = (s.clone(), barrier.clone(), c.id.clone());
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            s.record_webauthn_use(&id, "{}", 7, 30).await.unwrap()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1, "the same counter value is accepted exactly once");
}

async fn suspension(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("wa-susp.{tag}@example.com")).await;
    let c = cred(&u.id, tag, 6);
    s.add_webauthn_credential(&c).await.unwrap();
    s.suspend_webauthn_credential(&c.id, "possible_clone", 40)
        .await
        .unwrap();
    let got = s
        .webauthn_credential(&c.credential_id)
        .await
        .unwrap()
        .unwrap();
    assert!(got.is_suspended());
    assert_eq!(got.suspended_at, Some(40));
    assert_eq!(got.suspended_reason.as_deref(), Some("possible_clone"));
    assert!(
        !s.record_webauthn_use(&c.id, "{}", 99, 41).await.unwrap(),
        "a suspended credential records no use"
    );
    // A second suspension keeps the first time and reason.
    s.suspend_webauthn_credential(&c.id, "other", 50)
        .await
        .unwrap();
    let got = s
        .webauthn_credential(&c.credential_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.suspended_at, Some(40));
    assert_eq!(got.suspended_reason.as_deref(), Some("possible_clone"));
}

async fn rename_and_remove_are_owner_scoped(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("wa-own.{tag}@example.com")).await;
    let mallory = create(s, &format!("wa-mallory.{tag}@example.com")).await;
    let c = cred(&u.id, tag, 7);
    s.add_webauthn_credential(&c).await.unwrap();
    assert!(!s
        .rename_webauthn_credential(&mallory.id, &c.id, "mine now")
        .await
        .unwrap());
    // A second key, so that removing the first is not refused as the last factor.
    s.add_webauthn_credential(&cred(&u.id, tag, 17))
        .await
        .unwrap();
    assert_eq!(
        s.remove_webauthn_credential(&mallory.id, &c.id, true, 70)
            .await
            .unwrap(),
        KeyRemoval::NotFound
    );
    assert!(s
        .rename_webauthn_credential(&u.id, &c.id, "Blue key 'quoted' <b>")
        .await
        .unwrap());
    let got = s
        .webauthn_credential(&c.credential_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.name, "Blue key 'quoted' <b>");
    let remove = || s.remove_webauthn_credential(&u.id, &c.id, true, 70);
    assert_eq!(remove().await.unwrap(), KeyRemoval::Removed);
    assert_eq!(remove().await.unwrap(), KeyRemoval::NotFound);
    assert_eq!(s.webauthn_credential(&c.credential_id).await.unwrap(), None);
}

/// A key is removed only while another second factor stays: another key that is not suspended,
/// or an authenticator app where codes count.
async fn the_last_factor_stays(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("wa-last.{tag}@example.com")).await;
    let (a, b) = (cred(&u.id, tag, 21), cred(&u.id, tag, 22));
    s.add_webauthn_credential(&a).await.unwrap();
    let remove = |id: String, codes_count: bool| {
        let s = s.clone();
        let user = u.id.clone();
        async move {
            s.remove_webauthn_credential(&user, &id, codes_count, 70)
                .await
                .unwrap()
        }
    };
    assert_eq!(remove(a.id.clone(), true).await, KeyRemoval::LastFactor);

    // A suspended second key is no factor to keep.
    s.add_webauthn_credential(&b).await.unwrap();
    s.suspend_webauthn_credential(&b.id, "possible_clone", 50)
        .await
        .unwrap();
    assert_eq!(remove(a.id.clone(), true).await, KeyRemoval::LastFactor);

    // An authenticator app is one, but only where the account's policy takes codes.
    s.set_totp(TotpRecord {
        user_id: u.id.clone(),
        secret_sealed: vec![1, 2, 3],
        created_at: 60,
    })
    .await
    .unwrap();
    assert_eq!(remove(a.id.clone(), false).await, KeyRemoval::LastFactor);
    assert_eq!(remove(a.id.clone(), true).await, KeyRemoval::Removed);
    assert_eq!(s.webauthn_credentials(&u.id).await.unwrap(), {
        let mut kept = b.clone();
        kept.suspended_at = Some(50);
        kept.suspended_reason = Some("possible_clone".into());
        vec![kept]
    });
}

/// A suspended key signs nobody in: it is removed even where no other factor is left, and the
/// account then enrols only through a link (its factors count as reset). An administrator may
/// instead lift the suspension, of that user's suspended key only.
async fn a_suspended_key_is_removed_or_restored(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("wa-susp-rm.{tag}@example.com")).await;
    let mallory = create(s, &format!("wa-susp-rm-m.{tag}@example.com")).await;
    let (a, b) = (cred(&u.id, tag, 31), cred(&u.id, tag, 32));
    for k in [&a, &b] {
        s.add_webauthn_credential(k).await.unwrap();
        s.suspend_webauthn_credential(&k.id, "sign_in_reported", 50)
            .await
            .unwrap();
    }
    assert!(!s
        .restore_webauthn_credential(&mallory.id, &a.id)
        .await
        .unwrap());
    assert!(s.restore_webauthn_credential(&u.id, &a.id).await.unwrap());
    assert!(
        !s.restore_webauthn_credential(&u.id, &a.id).await.unwrap(),
        "not suspended"
    );
    let got = s
        .webauthn_credential(&a.credential_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.suspended_at, got.suspended_reason), (None, None));
    // The restored key is a factor again: the suspended one goes, the account keeps its state.
    assert_eq!(
        s.remove_webauthn_credential(&u.id, &b.id, false, 70)
            .await
            .unwrap(),
        KeyRemoval::Removed
    );
    assert_eq!(
        s.user_by_id(&u.id).await.unwrap().unwrap().factors_reset_at,
        None
    );
    // Suspended again, and the last key: removed, and the account enrols through a link (its
    // recovery codes go too).
    s.set_recovery_codes(&u.id, &["h1".to_string(), "h2".to_string()], 75)
        .await
        .unwrap();
    s.suspend_webauthn_credential(&a.id, "possible_clone", 80)
        .await
        .unwrap();
    assert_eq!(
        s.remove_webauthn_credential(&u.id, &a.id, true, 90)
            .await
            .unwrap(),
        KeyRemoval::RemovedLastFactor
    );
    assert!(s.webauthn_credentials(&u.id).await.unwrap().is_empty());
    assert_eq!(
        s.user_by_id(&u.id).await.unwrap().unwrap().factors_reset_at,
        Some(90)
    );
    assert_eq!(s.recovery_codes_left(&u.id).await.unwrap(), 0);
}

/// Two keys removed at the same moment (the owner and an administrator): one removal wins,
/// the other finds the last factor and is refused, however the two interleave.
async fn removals_at_once_leave_a_factor(s: &Arc<dyn DurableStore>, tag: &str) {
    for round in 0..10u32 {
        let u = create(s, &format!("wa-race{round}.{tag}@example.com")).await;
        let keys = [
            cred(&u.id, &format!("{tag}-r{round}"), 1),
            cred(&u.id, &format!("{tag}-r{round}"), 2),
        ];
        for k in &keys {
            s.add_webauthn_credential(k).await.unwrap();
        }
        let barrier = Arc::new(Barrier::new(keys.len()));
        let tasks: Vec<_> = keys
            .iter()
            .map(|k| {
                let (s, b, user, id) = (s.clone(), barrier.clone(), u.id.clone(), k.id.clone());
                tokio::spawn(async move {
                    b.wait().await;
                    s.remove_webauthn_credential(&user, &id, true, 70)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        outcomes.sort_by_key(|o| *o == KeyRemoval::Removed);
        assert_eq!(
            outcomes,
            [KeyRemoval::LastFactor, KeyRemoval::Removed],
            "round {round}"
        );
        assert_eq!(s.webauthn_credentials(&u.id).await.unwrap().len(), 1);
    }
}
