//! The [`DurableStore`] contract behind the admin console: user search, the admin flag,
//! suspended keys across users, audit filters and counts, and one-time enrolment links.

use std::sync::Arc;

use tokio::sync::Barrier;

use super::durable::{create, new_user};
use crate::store::{AuditEvent, AuditQuery, DurableStore, EnrolmentLink, WebauthnCredential};

/// Runs every check.
pub(super) async fn admin(s: &Arc<dyn DurableStore>, tag: &str) {
    search_and_admin_flag(s, tag).await;
    suspended_keys_of_everyone(s, tag).await;
    audit_filters_and_counts(s, tag).await;
    enrolment_links(s, tag).await;
}

async fn search_and_admin_flag(s: &Arc<dyn DurableStore>, tag: &str) {
    // A tag of its own: the rest of the suite creates users with the suite's tag.
    let tag = &format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let a = create(s, &format!("ann.{tag}@example.com")).await;
    let mut other = new_user(&format!("bob_{tag}@example.org"));
    other.account_id = format!("Acct-{tag}");
    let b = s.create_user(other, 1).await.unwrap();
    let emails = |v: Vec<crate::store::User>| v.into_iter().map(|u| u.email).collect::<Vec<_>>();

    let found = emails(s.search_users(&tag.to_uppercase(), 50).await.unwrap());
    assert_eq!(
        found,
        vec![a.email.clone(), b.email.clone()],
        "case-insensitive, by email"
    );
    assert_eq!(
        emails(s.search_users(&format!("ann.{tag}"), 50).await.unwrap()),
        vec![a.email.clone()]
    );
    assert_eq!(
        emails(s.search_users(&a.id, 50).await.unwrap()),
        vec![a.email.clone()],
        "by id"
    );
    assert_eq!(
        emails(s.search_users(&format!("acct-{tag}"), 50).await.unwrap()),
        vec![b.email.clone()],
        "by account id, case-insensitive"
    );
    // LIKE wildcards in the search text are literal characters.
    assert_eq!(
        emails(s.search_users(&format!("bob_{tag}"), 50).await.unwrap()),
        vec![b.email.clone()]
    );
    assert!(s
        .search_users(&format!("b%b_{tag}"), 50)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .search_users(&format!("bo__{tag}"), 50)
        .await
        .unwrap()
        .is_empty());
    assert!(s.search_users("' OR 1=1 --", 50).await.unwrap().is_empty());
    assert_eq!(s.search_users(tag, 1).await.unwrap().len(), 1, "limit");
    assert!(
        s.search_users("", 10_000).await.unwrap().len() >= 2,
        "empty text lists all"
    );

    let before = s.count_users().await.unwrap();
    assert!(before >= 2);
    s.set_locked(&b.id, true).await.unwrap();
    let locked: Vec<String> = emails(s.locked_users(10_000).await.unwrap());
    assert!(locked.contains(&b.email) && !locked.contains(&a.email));
    s.set_locked(&b.id, false).await.unwrap();
    assert!(!emails(s.locked_users(10_000).await.unwrap()).contains(&b.email));
    s.create_user(new_user(&format!("count.{tag}@example.com")), 1)
        .await
        .unwrap();
    assert_eq!(s.count_users().await.unwrap(), before + 1);

    assert!(!a.is_admin);
    s.set_admin(&a.id, true).await.unwrap();
    assert!(s.user_by_id(&a.id).await.unwrap().unwrap().is_admin);
    s.set_admin(&a.id, false).await.unwrap();
    assert!(!s.user_by_id(&a.id).await.unwrap().unwrap().is_admin);
}

async fn suspended_keys_of_everyone(s: &Arc<dyn DurableStore>, tag: &str) {
    let mut ids = Vec::new();
    for n in 0..3 {
        let u = create(s, &format!("susp{n}.{tag}@example.com")).await;
        let c = WebauthnCredential {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: u.id.clone(),
            credential_id: format!("susp-{tag}-{n}"),
            passkey: "{}".into(),
            name: format!("Key {n}"),
            aaguid: None,
            sign_count: 0,
            created_at: 10,
            last_used_at: None,
            suspended_at: None,
            suspended_reason: None,
        };
        s.add_webauthn_credential(&c).await.unwrap();
        ids.push(c.id);
    }
    s.suspend_webauthn_credential(&ids[0], "possible_clone", 100)
        .await
        .unwrap();
    s.suspend_webauthn_credential(&ids[2], "possible_clone", 200)
        .await
        .unwrap();
    let mine: Vec<String> = s
        .suspended_webauthn_credentials()
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.credential_id.starts_with(&format!("susp-{tag}-")))
        .map(|c| c.id)
        .collect();
    assert_eq!(
        mine,
        vec![ids[2].clone(), ids[0].clone()],
        "suspended only, newest first"
    );
}

async fn audit_filters_and_counts(s: &Arc<dyn DurableStore>, tag: &str) {
    let name = format!("adm_{tag}");
    let ev = |at: i64, account: &str, outcome: &str| {
        let mut e = AuditEvent::new(&name, outcome, at);
        e.account_id = Some(account.to_string());
        e
    };
    s.append_audit(&[
        ev(3_600, "a", "success"),
        ev(3_700, "b", "failure"),
        ev(7_200, "a", "failure"),
        // A summary of a run of 41 repeated refusals counts as 41.
        AuditEvent {
            times: 41,
            ..ev(7_300, "a", "failure")
        },
        ev(10_900, "b", "success"),
    ])
    .await
    .unwrap();
    let q = |account: Option<&str>, since: Option<i64>, until: Option<i64>| AuditQuery {
        event: Some(name.clone()),
        account_id: account.map(str::to_string),
        since,
        until,
        limit: 100,
        ..Default::default()
    };
    let at = |v: Vec<AuditEvent>| v.into_iter().map(|e| e.at).collect::<Vec<_>>();
    assert_eq!(
        at(s.query_audit(&q(Some("a"), None, None)).await.unwrap()),
        vec![3_600, 7_200, 7_300]
    );
    assert_eq!(
        at(s.query_audit(&q(None, Some(3_700), Some(7_300)))
            .await
            .unwrap()),
        vec![3_700, 7_200],
        "since inclusive, until exclusive"
    );
    assert_eq!(
        at(s.query_audit(&q(Some("b"), Some(4_000), None))
            .await
            .unwrap()),
        vec![10_900]
    );

    let counts: Vec<(i64, String, i64)> = s
        .audit_counts(3_650, 3_600)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.event == name)
        .map(|c| (c.bucket, c.outcome, c.count))
        .collect();
    let mut counts = counts;
    counts.sort();
    assert_eq!(
        counts,
        vec![
            (3_600, "failure".to_string(), 1),
            (7_200, "failure".to_string(), 42),
            (10_800, "success".to_string(), 1),
        ],
        "bucketed by hour from `since` on, a summary counted as the attempts it stands for"
    );
}

async fn enrolment_links(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("enrol.{tag}@example.com")).await;
    let link = |h: &str, expires_at: i64| EnrolmentLink {
        token_hash: format!("{h}-{tag}"),
        user_id: u.id.clone(),
        created_by: "cli:root".into(),
        key_only: true,
        created_at: 100,
        expires_at,
        used_at: None,
    };
    // A newer link supersedes the user's earlier unused ones.
    s.create_enrolment_link(link("first", 1000)).await.unwrap();
    s.create_enrolment_link(link("old", 150)).await.unwrap();
    let first = format!("first-{tag}");
    assert_eq!(
        s.enrolment_link(&first, 200).await.unwrap(),
        None,
        "superseded"
    );
    assert_eq!(s.consume_enrolment_link(&first, 200).await.unwrap(), None);
    s.create_enrolment_link(link("live", 1000)).await.unwrap();
    let live = format!("live-{tag}");
    assert_eq!(
        s.enrolment_link(&live, 200).await.unwrap(),
        Some(link("live", 1000))
    );
    assert_eq!(
        s.enrolment_link(&live, 200).await.unwrap(),
        Some(link("live", 1000)),
        "looking does not use it"
    );
    assert_eq!(
        s.enrolment_link(&format!("old-{tag}"), 200).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(
        s.consume_enrolment_link(&format!("old-{tag}"), 200)
            .await
            .unwrap(),
        None,
        "expired"
    );
    assert_eq!(
        s.consume_enrolment_link(&format!("nope-{tag}"), 200)
            .await
            .unwrap(),
        None
    );
    let gate = Arc::new(Barrier::new(10));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (s, gate, h) = (s.clone(), gate.clone(), live.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            s.consume_enrolment_link(&h, 200).await.unwrap()
        }));
    }
    let mut used = Vec::new();
    for t in tasks {
        used.extend(t.await.unwrap());
    }
    assert_eq!(used.len(), 1, "single use");
    assert_eq!(used[0].used_at, Some(200));
    assert!(used[0].key_only);
    assert_eq!(s.enrolment_link(&live, 200).await.unwrap(), None, "used");
}
