//! The [`DurableStore`] contract for devices, the mail queue and "this wasn't me" links.

use std::sync::Arc;

use tokio::sync::Barrier;

use super::durable::create;
use crate::store::{Device, DurableStore, Mail, ReportLink};

fn device(user_id: &str, id: &str, seen: i64) -> Device {
    Device {
        id: id.into(),
        user_id: user_id.into(),
        token_hash: format!("hash-{id}"),
        name: "Firefox on Linux".into(),
        user_agent: "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0".into(),
        binding: "cookie".into(),
        status: "active".into(),
        first_seen: seen,
        last_seen: seen,
        last_ip: "192.0.2.1".into(),
        remembered_until: None,
        remember_key: None,
    }
}

pub(super) async fn devices_and_lock(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("dev-{tag}@example.com")).await;
    assert!(!u.locked);
    s.set_locked(&u.id, true).await.unwrap();
    assert!(s.user_by_id(&u.id).await.unwrap().unwrap().locked);
    s.set_locked(&u.id, false).await.unwrap();
    assert!(!s.user_by_id(&u.id).await.unwrap().unwrap().locked);

    let a = device(&u.id, &format!("a-{tag}"), 100);
    let b = device(&u.id, &format!("b-{tag}"), 200);
    s.create_device(a.clone()).await.unwrap();
    s.create_device(b.clone()).await.unwrap();
    assert!(
        s.create_device(a.clone()).await.is_err(),
        "one record per device"
    );
    assert_eq!(
        s.device_by_token(&a.token_hash).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(s.device_by_token("hash-none").await.unwrap(), None);
    let listed: Vec<String> = s
        .list_devices(&u.id)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(listed, vec![b.id.clone(), a.id.clone()], "latest first");

    s.touch_device(&a.id, 300, "198.51.100.7").await.unwrap();
    let a2 = s.device_by_token(&a.token_hash).await.unwrap().unwrap();
    assert_eq!(
        (a2.last_seen, a2.last_ip.as_str(), a2.first_seen),
        (300, "198.51.100.7", 100)
    );

    s.remember_device(&a.id, Some("{\"jwk\":1}"), Some(5000))
        .await
        .unwrap();
    let r = s.device_by_token(&a.token_hash).await.unwrap().unwrap();
    assert_eq!(
        (r.remembered_until, r.remember_key.as_deref()),
        (Some(5000), Some("{\"jwk\":1}"))
    );
    // Resetting the second factors forgets remembered devices too.
    s.reset_second_factors(&a.user_id, 50).await.unwrap();
    let r = s.device_by_token(&a.token_hash).await.unwrap().unwrap();
    assert_eq!((r.remembered_until, r.remember_key), (None, None));
    s.set_device_binding(&a.id, "webcrypto").await.unwrap();
    let listed = s.list_devices(&a.user_id).await.unwrap();
    assert_eq!(
        listed.iter().find(|d| d.id == a.id).unwrap().binding,
        "webcrypto"
    );
    assert!(s.revoke_device(&a.id).await.unwrap());
    assert!(!s.revoke_device(&a.id).await.unwrap(), "already revoked");
    let a3 = s.device_by_token(&a.token_hash).await.unwrap().unwrap();
    assert_eq!(a3.status, "revoked");
}

pub(super) async fn mail_queue(s: &Arc<dyn DurableStore>, tag: &str) {
    let mail = |n: i64| Mail {
        id: format!("m{n}-{tag}"),
        to_addr: format!("q-{tag}@example.com"),
        subject: format!("subject {n} ü"),
        body: format!("body {n}\nline two"),
        created_at: 1000 + n,
        attempts: 0,
        next_attempt_at: 1000 + n,
        sent_at: None,
        last_error: None,
    };
    for n in 0..3 {
        s.enqueue_mail(mail(n)).await.unwrap();
    }
    // Only due mail is claimed, and a claimed mail is not claimed again while leased.
    let got = s.claim_due_mail(1001, 5000, 10).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec![format!("m0-{tag}"), format!("m1-{tag}")]);
    assert_eq!(got[0].body, "body 0\nline two");
    assert_eq!(got[0].subject, "subject 0 ü");
    assert!(s
        .claim_due_mail(1002, 5000, 10)
        .await
        .unwrap()
        .iter()
        .all(|m| m.id == format!("m2-{tag}")));

    s.mail_sent(&format!("m0-{tag}"), 1100).await.unwrap();
    s.mail_failed(&format!("m1-{tag}"), "connection refused", 1200)
        .await
        .unwrap();
    assert!(s.claim_due_mail(1199, 5000, 10).await.unwrap().is_empty());
    let again = s.claim_due_mail(1200, 5000, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].last_error.as_deref(), Some("connection refused"));
    let all = s.list_mail(100).await.unwrap();
    let sent = all.iter().find(|m| m.id == format!("m0-{tag}")).unwrap();
    assert_eq!((sent.sent_at, sent.attempts), (Some(1100), 1));
    // Its body, which may hold a live single-use link, is gone; an unsent one keeps its own.
    assert_eq!(sent.body, "");
    let unsent = all.iter().find(|m| m.id == format!("m1-{tag}")).unwrap();
    assert!(!unsent.body.is_empty());
    // Sent mail is never claimed again, however late.
    assert!(s
        .claim_due_mail(i64::MAX / 2, i64::MAX / 2 + 1, 10)
        .await
        .unwrap()
        .iter()
        .all(|m| m.id != format!("m0-{tag}")));
}

pub(super) async fn report_links(s: &Arc<dyn DurableStore>, tag: &str) {
    let u = create(s, &format!("rep-{tag}@example.com")).await;
    let link = |h: &str, expires_at: i64| ReportLink {
        token_hash: format!("{h}-{tag}"),
        user_id: u.id.clone(),
        device_id: Some("dev-1".into()),
        created_at: 100,
        expires_at,
        used_at: None,
    };
    s.create_report_link(link("live", 1000)).await.unwrap();
    s.create_report_link(link("old", 150)).await.unwrap();
    // Looking a link up does not use it; an expired or unknown one is not found.
    let live = format!("live-{tag}");
    for _ in 0..2 {
        let seen = s.report_link(&live, 200).await.unwrap().unwrap();
        assert_eq!((seen.user_id.as_str(), seen.used_at), (u.id.as_str(), None));
    }
    assert_eq!(s.report_link(&live, 1000).await.unwrap(), None, "expired");
    assert_eq!(
        s.report_link(&format!("old-{tag}"), 200).await.unwrap(),
        None
    );
    assert_eq!(
        s.report_link(&format!("nope-{tag}"), 200).await.unwrap(),
        None
    );
    assert_eq!(
        s.consume_report_link(&format!("old-{tag}"), 200)
            .await
            .unwrap(),
        None,
        "expired"
    );
    assert_eq!(
        s.consume_report_link(&format!("nope-{tag}"), 200)
            .await
            .unwrap(),
        None
    );
    // Twenty concurrent uses of one link: exactly one succeeds.
    let gate = Arc::new(Barrier::new(20));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (s, gate, h) = (s.clone(), gate.clone(), format!("live-{tag}"));
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            s.consume_report_link(&h, 200).await.unwrap()
        }));
    }
    let mut used = Vec::new();
    for t in tasks {
        if let Some(l) = t.await.unwrap() {
            used.push(l);
        }
    }
    assert_eq!(used.len(), 1, "single use");
    assert_eq!(used[0].user_id, u.id);
    assert_eq!(used[0].used_at, Some(200));
    assert_eq!(used[0].device_id.as_deref(), Some("dev-1"));
    assert_eq!(s.report_link(&live, 200).await.unwrap(), None, "used");
}

/// Risk histories: absent until written, then replaced whole, per user.
pub(super) async fn risk_history(s: &Arc<dyn DurableStore>, tag: &str) {
    let (a, b) = (format!("risk-a-{tag}"), format!("risk-b-{tag}"));
    assert_eq!(s.risk_history(&a).await.unwrap(), None);
    s.set_risk_history(&a, r#"{"networks":[]}"#, 100)
        .await
        .unwrap();
    s.set_risk_history(&a, "{\"last\":null,\"note\":\"it's \u{e9}\"}", 200)
        .await
        .unwrap();
    assert_eq!(
        s.risk_history(&a).await.unwrap().as_deref(),
        Some("{\"last\":null,\"note\":\"it's \u{e9}\"}")
    );
    assert_eq!(s.risk_history(&b).await.unwrap(), None);
}

/// Values of the database's own: set once, by the first of concurrent writers, never replaced.
pub(super) async fn meta(s: &Arc<dyn DurableStore>, tag: &str) {
    let name = format!("check-{tag}");
    assert_eq!(s.meta(&name).await.unwrap(), None);
    let gate = Arc::new(Barrier::new(10));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (s, gate, name) = (s.clone(), gate.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            s.set_meta_if_absent(&name, &format!("v{i}")).await.unwrap()
        }));
    }
    let mut set = 0;
    for t in tasks {
        set += usize::from(t.await.unwrap());
    }
    assert_eq!(set, 1, "exactly one writer sets it");
    let first = s.meta(&name).await.unwrap().unwrap();
    assert!(!s.set_meta_if_absent(&name, "later").await.unwrap());
    assert_eq!(s.meta(&name).await.unwrap(), Some(first));
}
