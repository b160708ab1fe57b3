//! The [`DurableStore`] contract, continued: the audit trail, and hostile text (quotes, SQL,
//! unicode) that must round-trip as data.

use std::sync::Arc;

use super::durable::{create, new_user};
use crate::store::{AuditEvent, AuditQuery, DurableStore};

fn event(at: i64, name: &str, user: Option<&str>) -> AuditEvent {
    AuditEvent {
        id: 0,
        at,
        event: name.to_string(),
        outcome: "success".into(),
        user_id: user.map(str::to_string),
        email: user.map(|u| format!("{u}@example.com")),
        account_id: Some("acct-1".into()),
        ip: Some("192.0.2.7".into()),
        user_agent: Some("test-agent/1.0".into()),
        reason: None,
        actor: None,
        times: 1,
    }
}

/// The stored events minus their store-assigned ids, to compare with what was appended.
fn without_ids(events: &[AuditEvent]) -> Vec<AuditEvent> {
    events
        .iter()
        .map(|e| AuditEvent { id: 0, ..e.clone() })
        .collect()
}

fn ids(events: &[AuditEvent]) -> Vec<i64> {
    events.iter().map(|e| e.id).collect()
}

fn q(
    user: Option<&str>,
    event: Option<&str>,
    after: Option<i64>,
    newest: bool,
    limit: u32,
) -> AuditQuery {
    AuditQuery {
        user_id: user.map(str::to_string),
        event: event.map(str::to_string),
        after_id: after,
        newest_first: newest,
        limit,
        ..Default::default()
    }
}

pub(super) async fn audit(s: &Arc<dyn DurableStore>, tag: &str) {
    let (u1, u2) = (format!("u1-{tag}"), format!("u2-{tag}"));
    let (login, logout) = (format!("login_{tag}"), format!("logout_{tag}"));
    let login_prefix = format!("login_{}", &tag[..4]);
    s.append_audit(&[]).await.unwrap();

    let mut batch = vec![
        event(10, &login, Some(&u1)),
        event(11, &login, Some(&u2)),
        event(12, &logout, Some(&u1)),
        event(13, &login, Some(&u1)),
        event(14, &login, None),
        event(15, &login_prefix, Some(&u1)),
    ];
    batch[1].outcome = "failure".into();
    batch[1].reason = Some("bad_password".into());
    batch[2].actor = Some("cli:root".into());
    batch[3].times = 37;
    batch[4].email = None;
    batch[4].account_id = None;
    batch[4].ip = None;
    batch[4].user_agent = None;
    s.append_audit(&batch).await.unwrap();
    // A second batch, later.
    let later = vec![event(20, &logout, Some(&u2)), event(21, &login, Some(&u1))];
    s.append_audit(&later).await.unwrap();
    let mut all_in = batch.clone();
    all_in.extend(later.iter().cloned());

    // Everything of ours, oldest first: each event as appended, ids increasing.
    let mut mine = Vec::new();
    for name in [&login, &logout, &login_prefix] {
        mine.extend(
            s.query_audit(&q(None, Some(name), None, false, 100))
                .await
                .unwrap(),
        );
    }
    mine.sort_by_key(|e| e.id);
    assert_eq!(
        without_ids(&mine),
        all_in,
        "every field round-trips, None stays None"
    );
    assert!(
        mine.windows(2).all(|w| w[0].id < w[1].id),
        "ids increase in append order"
    );
    assert!(mine.iter().all(|e| e.id > 0));
    let id_of = |i: usize| mine[i].id;

    let by_u1 = s
        .query_audit(&q(Some(&u1), None, None, false, 100))
        .await
        .unwrap();
    assert_eq!(
        ids(&by_u1),
        vec![id_of(0), id_of(2), id_of(3), id_of(5), id_of(7)]
    );
    let by_u2 = s
        .query_audit(&q(Some(&u2), None, None, false, 100))
        .await
        .unwrap();
    assert_eq!(ids(&by_u2), vec![id_of(1), id_of(6)]);
    assert_eq!(by_u2[0].reason.as_deref(), Some("bad_password"));

    let logins = s
        .query_audit(&q(None, Some(&login), None, false, 100))
        .await
        .unwrap();
    assert_eq!(
        ids(&logins),
        vec![id_of(0), id_of(1), id_of(3), id_of(4), id_of(7)],
        "event filter is exact (no prefix match)"
    );
    let both = s
        .query_audit(&q(Some(&u1), Some(&login), None, false, 100))
        .await
        .unwrap();
    assert_eq!(
        ids(&both),
        vec![id_of(0), id_of(3), id_of(7)],
        "filters combine"
    );

    let after = s
        .query_audit(&q(Some(&u1), None, Some(id_of(2)), false, 100))
        .await
        .unwrap();
    assert_eq!(
        ids(&after),
        vec![id_of(3), id_of(5), id_of(7)],
        "after_id is exclusive"
    );
    let newest = s
        .query_audit(&q(Some(&u1), None, None, true, 100))
        .await
        .unwrap();
    assert_eq!(
        ids(&newest),
        vec![id_of(7), id_of(5), id_of(3), id_of(2), id_of(0)]
    );
    let first2 = s
        .query_audit(&q(Some(&u1), None, None, false, 2))
        .await
        .unwrap();
    assert_eq!(
        ids(&first2),
        vec![id_of(0), id_of(2)],
        "limit keeps the oldest"
    );
    let last2 = s
        .query_audit(&q(Some(&u1), None, None, true, 2))
        .await
        .unwrap();
    assert_eq!(
        ids(&last2),
        vec![id_of(7), id_of(5)],
        "limit keeps the newest"
    );
    let follow = s
        .query_audit(&q(Some(&u1), None, Some(id_of(3)), true, 1))
        .await
        .unwrap();
    assert_eq!(ids(&follow), vec![id_of(7)]);
    let none = s
        .query_audit(&q(Some(&u1), None, Some(id_of(7)), false, 100))
        .await
        .unwrap();
    assert!(none.is_empty());
    let unknown = s
        .query_audit(&q(Some("nobody"), None, None, false, 100))
        .await
        .unwrap();
    assert!(unknown.is_empty());

    // No filters at all: at least ours, in order.
    let everything = s
        .query_audit(&q(None, None, None, false, 10_000))
        .await
        .unwrap();
    assert!(everything.windows(2).all(|w| w[0].id < w[1].id));
    for e in &mine {
        assert!(everything.contains(e));
    }
}

const HOSTILE: &[&str] = &[
    "'); DROP TABLE users;--",
    "o'brien\"; DELETE FROM audit_events; --",
    "x' OR '1'='1",
    "100% _match_ \\ backslash $1 ?",
    "ünïcødé 日本語 🎉 \u{202e}rtl",
    "line\nbreak\ttab\r",
];

pub(super) async fn hostile_text(s: &Arc<dyn DurableStore>, tag: &str) {
    // Emails: stored, found and listed as plain data.
    let evil = format!("'); DROP TABLE users;--{tag}@example.com");
    let u = create(s, &evil).await;
    assert_eq!(u.email, evil.to_lowercase());
    assert_eq!(s.user_by_email(&evil).await.unwrap(), Some(u.clone()));
    let uni = format!("Ünï.{tag}@Exämple.COM");
    let v = s.create_user(new_user(&uni), 1).await.unwrap();
    // The local part in lower case, the internationalised domain in its ASCII form.
    assert_eq!(v.email, format!("ünï.{tag}@xn--exmple-cua.com"));
    assert_eq!(s.user_by_email(&uni.to_uppercase()).await.unwrap(), Some(v));
    assert!(
        s.user_by_email("' OR '1'='1").await.unwrap().is_none(),
        "a quote in the lookup is not an injection"
    );
    s.set_password_hash(&u.id, HOSTILE[1]).await.unwrap();
    assert_eq!(
        s.user_by_id(&u.id).await.unwrap().unwrap().password_hash,
        HOSTILE[1]
    );

    // Audit fields.
    let name = format!("hostile_{tag}");
    let events: Vec<AuditEvent> = HOSTILE
        .iter()
        .enumerate()
        .map(|(i, text)| AuditEvent {
            id: 0,
            at: i as i64,
            event: name.clone(),
            outcome: (*text).to_string(),
            user_id: Some(format!("{text}{tag}")),
            email: Some((*text).to_string()),
            account_id: Some((*text).to_string()),
            ip: Some((*text).to_string()),
            user_agent: Some((*text).to_string()),
            reason: Some((*text).to_string()),
            actor: Some((*text).to_string()),
            times: i as i64 + 1,
        })
        .collect();
    s.append_audit(&events).await.unwrap();
    let back = s
        .query_audit(&q(None, Some(&name), None, false, 100))
        .await
        .unwrap();
    assert_eq!(
        without_ids(&back),
        events,
        "hostile text round-trips exactly"
    );
    for e in &events {
        let by_user = s
            .query_audit(&q(e.user_id.as_deref(), None, None, false, 100))
            .await
            .unwrap();
        assert_eq!(
            without_ids(&by_user),
            vec![e.clone()],
            "filter by {:?}",
            e.user_id
        );
    }
    let injected = s
        .query_audit(&q(Some("x' OR '1'='1"), None, None, false, 100))
        .await
        .unwrap();
    assert!(injected.is_empty(), "a quoted filter matches nothing");

    // The tables are all still there and intact.
    let listed = s.list_users().await.unwrap();
    assert!(listed.iter().any(|x| x.id == u.id && x.email == u.email));
    assert_eq!(
        s.query_audit(&q(None, Some(&name), None, false, 100))
            .await
            .unwrap()
            .len(),
        HOSTILE.len()
    );
    s.ping().await.unwrap();
}

/// Batches of sizes that take one statement, several of one size, several sizes, and more than
/// one statement's worth of rows: every event stored once, in order.
pub(super) async fn large_batch(s: &Arc<dyn DurableStore>, tag: &str) {
    for n in [1, 3, 37, 255, 256, 600] {
        let name = format!("bulk{n}_{tag}");
        let events: Vec<AuditEvent> = (0..n)
            .map(|i| {
                let mut e = event(1000 + i, &name, None);
                e.reason = Some(format!("n{i}"));
                e.ip = Some(format!("10.0.{}.{}", i / 256, i % 256));
                e
            })
            .collect();
        s.append_audit(&events).await.unwrap();
        let back = s
            .query_audit(&q(None, Some(&name), None, false, 1000))
            .await
            .unwrap();
        assert_eq!(without_ids(&back), events, "all {n}, in append order");
        assert!(back.windows(2).all(|w| w[0].id < w[1].id));
    }
}

/// Retention: events from before the cut-off go, a few at a time; nothing from the cut-off on is
/// touched. Runs last, on times before any other part of the suite writes (they are all
/// positive), so it can count the whole table.
pub(super) async fn prune(s: &Arc<dyn DurableStore>, tag: &str) {
    let name = format!("old_{tag}");
    let all = |s: Arc<dyn DurableStore>| async move {
        s.query_audit(&q(None, None, None, false, 10_000))
            .await
            .unwrap()
    };
    let events: Vec<AuditEvent> = (-100..-90).map(|at| event(at, &name, None)).collect();
    s.append_audit(&events).await.unwrap();
    let before = all(s.clone()).await;
    assert_eq!(s.audit_events_before(-100).await.unwrap(), 0);
    assert_eq!(
        s.audit_events_before(-95).await.unwrap(),
        5,
        "what a prune would remove"
    );
    assert_eq!(s.prune_audit(-100, 10).await.unwrap(), 0, "none older");
    // Five events lie before -95; at most two go per call.
    let mut removed = Vec::new();
    loop {
        let n = s.prune_audit(-95, 2).await.unwrap();
        assert!(n <= 2, "{n} removed in one call");
        if n == 0 {
            break;
        }
        removed.push(n);
    }
    assert_eq!(removed, [2, 2, 1]);
    assert_eq!(s.audit_events_before(-95).await.unwrap(), 0);
    let after = all(s.clone()).await;
    let gone: Vec<&AuditEvent> = before.iter().filter(|e| !after.contains(e)).collect();
    assert!(gone.iter().all(|e| e.at < -95 && e.event == name));
    assert_eq!(gone.len(), 5);
    assert_eq!(
        after.len(),
        before.len() - 5,
        "the rest of the trail is kept"
    );
    assert!(
        after.iter().any(|e| e.at == -95),
        "the cut-off itself is kept"
    );
}
