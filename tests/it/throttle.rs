//! Throttling that a credential-stuffing flood cannot turn against the real customer: the
//! global budget, progressive delay, the known device's own budget, and second factor first
//! after 100 consecutive wrong passwords.

use std::time::{Duration, Instant};

use super::harness::{location, without_csrf, Browser, Gateway, PASSWORD};
use super::login::sign_out;

const WRONG: &str = "wrong guess 12345";

/// Gateways that believe `X-Forwarded-For` from the test, so each attempt can come from an
/// address of its own.
fn behind_proxy(c: &mut portcullis::config::Config) {
    c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
}

/// One password attempt from `ip` in a browser of its own (no device cookie); its status.
async fn attempt_from(gw: &Gateway, ip: &str, email: &str, password: &str) -> reqwest::Response {
    let c = gw.browser();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    gw.login_form(&c, &csrf, email, password, "")
        .header("x-forwarded-for", ip)
        .send()
        .await
        .unwrap()
}

/// Audit reasons of `login_password` events, oldest first.
async fn password_reasons(gw: &Gateway) -> Vec<String> {
    let mut ev = gw.audit().await;
    ev.sort_by_key(|e| e.id);
    ev.into_iter()
        .filter(|e| e.event == "login_password")
        .filter_map(|e| e.reason)
        .collect()
}

pub(super) fn throttled_metric(gw: &Gateway, limit: &str) -> f64 {
    let text = gw.state.metrics.render(&gw.state.login.hasher).unwrap();
    let name = format!("portcullis_throttled_attempts_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// A flood spread over many accounts and addresses (so no per-account or per-address budget
/// notices it) meets the global per-second budget, shared by two gateways over Redis: 429 with
/// `Retry-After: 1`, JSON for API clients, audited and counted as `global`; the next second
/// has a new budget.
#[tokio::test]
async fn a_flood_over_many_accounts_and_addresses_meets_the_global_budget() {
    let gw = Gateway::start_with(|c| {
        behind_proxy(c);
        c.limits.global_sign_ins_per_second = 6;
        c.storage.ephemeral = "redis://127.0.0.1:6379/".into();
        c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
    })
    .await;
    let other = gw.restarted().await;
    // The budget is counted per second of Redis's clock, whatever the gateways' say: they are
    // set a minute apart here. The attempts start as a real second begins, so they all fall
    // in it (a few tens of milliseconds).
    gw.clock.advance(60);
    next_real_second().await;
    let within = (0..6).map(|i| {
        let g = if i % 2 == 0 { &gw } else { &other };
        async move {
            let ip = format!("10.{i}.0.1");
            let r = attempt_from(g, &ip, &format!("u{i}@example.com"), WRONG).await;
            (i, r.status())
        }
    });
    for (i, status) in futures_util::future::join_all(within).await {
        assert_eq!(status, 401, "attempt {i} is within the budget");
    }
    let beyond = [&gw, &other]
        .map(|g| async move { attempt_from(g, "192.0.2.200", "fresh@example.com", WRONG).await });
    for r in futures_util::future::join_all(beyond).await {
        assert_eq!(r.status(), 429, "the budget is spent on both gateways");
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(r.text().await.unwrap().contains("Too many attempts"));
    }
    let c = gw.browser();
    let csrf = gw.csrf(&c, "/_portcullis/login").await;
    let r = gw
        .login_form(&c, &csrf, "x@example.com", WRONG, "")
        .header("x-forwarded-for", "192.0.2.201")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "too_many_attempts", "JSON for API clients");
    assert!(password_reasons(&gw)
        .await
        .iter()
        .any(|r| r == "throttled:global"));
    assert!(throttled_metric(&gw, "global") >= 1.0);
    next_real_second().await;
    let r = attempt_from(&gw, "192.0.2.202", "fresh@example.com", WRONG).await;
    assert_eq!(r.status(), 401, "a new second, a new budget");
}

/// Waits until a second of the real clock (Redis's, on this machine) has just begun.
async fn next_real_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let left = Duration::from_secs(1) - Duration::from_nanos(u64::from(now.subsec_nanos()));
    tokio::time::sleep(left + Duration::from_millis(20)).await;
}

/// A flood an attacker can keep up for hours must not write a row per refused attempt (millions
/// an hour, a database filled to the disk's end): refusals of one spent budget are the first
/// row and one summary with how many, the addresses left out where they varied; each wrong
/// password that was checked keeps its own row, and the metric counts every refusal.
#[tokio::test]
async fn a_flood_of_refused_attempts_is_summarised_in_the_trail() {
    const BUDGET: u64 = 2;
    const REFUSED: usize = 40;
    let gw = Gateway::start_with(|c| {
        behind_proxy(c);
        c.limits.password_failures_per_account = BUDGET;
    })
    .await;
    let target = "flooded@example.com";
    for i in 0..BUDGET {
        let r = attempt_from(&gw, &format!("10.9.0.{i}"), target, WRONG).await;
        assert_eq!(r.status(), 401);
    }
    for i in 0..REFUSED {
        let r = attempt_from(&gw, &format!("10.9.1.{i}"), target, WRONG).await;
        assert_eq!(r.status(), 429, "attempt {i}");
    }
    let rows: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "login_password" && e.email.as_deref() == Some(target))
        .collect();
    let refused: Vec<_> = rows
        .iter()
        .filter(|e| e.reason.as_deref() == Some("throttled:account_password"))
        .collect();
    assert_eq!(
        refused
            .iter()
            .map(|e| (e.times, e.ip.as_deref()))
            .collect::<Vec<_>>(),
        [(1, Some("10.9.1.0")), (REFUSED as i64 - 1, None)],
        "{rows:#?}"
    );
    assert_eq!(
        rows.iter()
            .filter(|e| e.outcome == "failure")
            .map(|e| e.times)
            .collect::<Vec<_>>(),
        [1; BUDGET as usize],
        "each checked password has its row"
    );
    assert_eq!(throttled_metric(&gw, "account_password"), REFUSED as f64);
    // The CLI shows what a summary stands for, in text and in JSON.
    let tail = gw.cli(&["audit", "tail", "-n", "100"], None).await;
    let text = String::from_utf8_lossy(&tail.stdout);
    let summary = format!("reason=throttled:account_password times={}", REFUSED - 1);
    assert!(text.lines().any(|l| l.ends_with(&summary)), "{text}");
    let tail = gw
        .cli(&["audit", "tail", "--json", "-n", "100"], None)
        .await;
    let text = String::from_utf8_lossy(&tail.stdout);
    assert!(
        text.contains(&format!("\"times\":{}", REFUSED - 1)),
        "{text}"
    );
    assert!(text.contains("\"times\":1"), "{text}");
}

/// An address already refused by its own budget takes nothing from the fleet's per-second one:
/// a host flooding from one address cannot make every other new device's sign-in a 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_address_over_its_budget_leaves_the_global_budget_alone() {
    let gw = Gateway::start_with(|c| {
        behind_proxy(c);
        c.limits.global_sign_ins_per_second = 5;
        c.limits.failures_per_ip = 2;
    })
    .await;
    gw.add_user("bystander@example.com").await;
    for _ in 0..2 {
        let r = attempt_from(&gw, "10.66.0.1", "target@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    for _ in 0..3 {
        // Fifty refused attempts at once from the same address, then another address's own
        // right password in the same second.
        let flood = (0..50).map(|i| {
            let gw = &gw;
            async move {
                attempt_from(gw, "10.66.0.1", &format!("t{i}@example.com"), WRONG)
                    .await
                    .status()
            }
        });
        let statuses = futures_util::future::join_all(flood).await;
        assert!(statuses.iter().all(|s| *s == 429), "{statuses:?}");
        let r = attempt_from(&gw, "10.77.0.1", "bystander@example.com", PASSWORD).await;
        assert_eq!(r.status(), 303, "another address was refused");
    }
    assert_eq!(throttled_metric(&gw, "global"), 0.0);
}

/// Forty attempts at once, each from another address for another account, with a global budget
/// of ten: exactly ten are checked, the rest refused — the counter is taken before anything is
/// checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_attempts_cannot_exceed_the_global_budget() {
    let gw = Gateway::start_with(|c| {
        behind_proxy(c);
        c.limits.global_sign_ins_per_second = 10;
        c.password.max_queued_hashes = 200;
    })
    .await;
    let browsers: Vec<_> = (0..40).map(|_| gw.browser()).collect();
    let csrfs =
        futures_util::future::join_all(browsers.iter().map(|b| gw.csrf(b, "/_portcullis/login")))
            .await;
    let posts = browsers
        .iter()
        .zip(csrfs)
        .enumerate()
        .map(|(i, (b, csrf))| {
            gw.login_form(b, &csrf, &format!("u{i}@example.com"), WRONG, "")
                .header("x-forwarded-for", format!("10.{i}.2.1"))
                .send()
        });
    let statuses: Vec<u16> = futures_util::future::join_all(posts)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        30,
        "{statuses:?}"
    );
    assert_eq!(throttled_metric(&gw, "global"), 30.0);
}

/// The owner's known device keeps working while a flood from many addresses has spent the
/// account's budget; the attacker — with the right password, from a fresh address, or with
/// another user's device cookie — is still refused. A sign-in on the known device does not
/// reset the attacker's budget; the device's own budget is spent only by failures on it.
#[tokio::test]
async fn the_owner_signs_in_from_a_known_device_while_the_flood_is_refused() {
    let gw = Gateway::start_with(|c| {
        behind_proxy(c);
        c.limits.failures_per_device = 3;
        c.limits.max_delay = Duration::ZERO;
    })
    .await;
    let email = "owner@example.com";
    let (owner, secret, _) = gw.signed_in(email).await;
    let (mallory_device, _, _) = gw.signed_in("mallory@example.com").await;
    for i in 0..10 {
        let r = attempt_from(&gw, &format!("10.{i}.7.1"), email, WRONG).await;
        assert_eq!(r.status(), 401);
    }
    let r = attempt_from(&gw, "198.51.100.9", email, PASSWORD).await;
    assert_eq!(
        r.status(),
        429,
        "the account's budget is spent for strangers"
    );
    // The answer says how long to wait, and that it may be someone else's doing, which the
    // browser the owner signs in with is spared.
    assert_eq!(r.headers()["retry-after"], "900");
    let said = r.text().await.unwrap();
    assert!(
        said.contains("not necessarily by you")
            && said.contains("Wait up to 15 minutes")
            && said.contains(
                "a browser you have signed in with before, on the network you signed in from \
                 then, is not held back"
            ),
        "{said}"
    );

    sign_out(&gw, &owner).await;
    gw.sign_in_on(&owner, email, &secret).await;
    assert_eq!(gw.status(&owner, "/console").await, 200, "the owner is in");

    let r = attempt_from(&gw, "198.51.100.10", email, PASSWORD).await;
    assert_eq!(
        r.status(),
        429,
        "the owner's sign-in did not reset the budget"
    );
    sign_out(&gw, &mallory_device).await;
    let r = gw.password(&mallory_device, email, PASSWORD, "").await;
    assert_eq!(r.status(), 429, "another user's device earns nothing");

    // The device's own budget: failures on it count there (and only there).
    sign_out(&gw, &owner).await;
    for _ in 0..3 {
        assert_eq!(gw.password(&owner, email, WRONG, "").await.status(), 401);
    }
    let r = gw.password(&owner, email, PASSWORD, "").await;
    assert_eq!(r.status(), 429);
    assert!(password_reasons(&gw)
        .await
        .iter()
        .any(|r| r == "throttled:device"));
    assert_eq!(throttled_metric(&gw, "device"), 1.0);
    assert!(throttled_metric(&gw, "account_password") >= 3.0);
}

/// A copy of the owner's device cookie, used from another network or in another kind of
/// browser, is no known device there: its wrong passwords draw on the account's, address's and
/// network's budgets, never on the device's own, so the owner's browser is not locked out.
#[tokio::test]
async fn a_copied_device_cookie_elsewhere_cannot_spend_the_devices_budget() {
    let gw = Gateway::start_with(|c| {
        behind_proxy(c);
        c.limits.failures_per_device = 3;
        c.limits.max_delay = Duration::ZERO;
    })
    .await;
    let email = "copied-device@example.com";
    let (owner, secret, _) = gw.signed_in(email).await;
    sign_out(&gw, &owner).await;
    let elsewhere = [
        gw.copied_jar(&owner, Some("127.0.9.9"), None),
        gw.copied_jar(&owner, None, Some("curl/8.5.0")),
    ];
    for thief in &elsewhere {
        for _ in 0..3 {
            assert_eq!(gw.password(thief, email, WRONG, "").await.status(), 401);
        }
    }
    assert!(
        !password_reasons(&gw)
            .await
            .iter()
            .any(|r| r == "throttled:device"),
        "the device's budget was drawn on from elsewhere"
    );
    // Six failures on the account (of its ten) and none on the device: the owner signs in.
    gw.sign_in_on(&owner, email, &secret).await;
    assert_eq!(gw.status(&owner, "/console").await, 200, "the owner is in");
    // The device's own budget still counts failures made on it.
    sign_out(&gw, &owner).await;
    for _ in 0..3 {
        assert_eq!(gw.password(&owner, email, WRONG, "").await.status(), 401);
    }
    assert_eq!(gw.password(&owner, email, PASSWORD, "").await.status(), 429);
}

/// Hashes slow enough for the queue to stay full while the owner tries.
fn slow_full_hashing(c: &mut portcullis::config::Config) {
    behind_proxy(c);
    c.limits.max_delay = Duration::ZERO;
    c.limits.global_sign_ins_per_second = 1000;
    c.password.argon2_memory_kib = 32 * 1024;
    c.password.argon2_iterations = 3;
    c.password.max_concurrent_hashes = 1;
    c.password.max_queued_hashes = 2;
}

/// Fills the hashing queue of `gw` (one hashing, two waiting) with strangers' wrong guesses and
/// checks that one more stranger is turned away with 503; the strangers' answers, to await.
async fn fill_the_hashing_queue(gw: &std::sync::Arc<Gateway>) -> Vec<tokio::task::JoinHandle<u16>> {
    let mut flood = Vec::new();
    for i in 0..3 {
        let g = gw.clone();
        flood.push(tokio::spawn(async move {
            let who = format!("stranger{i}@example.com");
            attempt_from(&g, &format!("10.8.{i}.1"), &who, WRONG)
                .await
                .status()
                .as_u16()
        }));
        // One hashing, then the queue fills one by one.
        wait_for_queue_depth(gw, i + 1).await;
    }
    let turned_away = attempt_from(gw, "10.8.9.1", "stranger9@example.com", WRONG).await;
    assert_eq!(turned_away.status(), 503, "the queue is full for strangers");
    // Counted as load shed, not as a store that did not answer (which operators alert on).
    let text = gw.state.metrics.render(&gw.state.login.hasher).unwrap();
    for line in [
        "portcullis_sign_ins_shed_total 1",
        "portcullis_pages_unavailable_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
    }
    flood
}

/// Waits until `n` password checks are hashing or waiting on `gw`.
async fn wait_for_queue_depth(gw: &Gateway, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.state.login.hasher.queue_depth() < n {
        assert!(
            Instant::now() < deadline,
            "check {n} never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A flood that keeps the hashing queue full turns strangers away with 503, never the owner
/// signing in from their known device: that attempt waits in a line of its own, served first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_hashing_queue_does_not_turn_the_owners_known_device_away() {
    let gw = std::sync::Arc::new(Gateway::start_with(slow_full_hashing).await);
    let email = "owner@example.com";
    let (owner, _, _) = gw.signed_in(email).await;
    sign_out(&gw, &owner).await;
    let flood = fill_the_hashing_queue(&gw).await;
    let r = gw.password(&owner, email, PASSWORD, "").await;
    assert_eq!(r.status(), 303, "the owner's known device is let through");
    assert!(
        location(&r).starts_with("/_portcullis/mfa"),
        "{}",
        location(&r)
    );
    for f in flood {
        assert_eq!(f.await.unwrap(), 401);
    }
}

/// The same for an owner whose stored hash has older parameters: the rehash that follows the
/// match waits in the owner's line too. Another known device waits behind the owner, so the
/// slot the owner frees goes to it and the strangers' line stays full; a rehash in that line
/// would be refused and, before, took the matched sign-in down with it (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rehash_after_the_owners_sign_in_does_not_meet_the_full_queue() {
    let first = Gateway::start_with(behind_proxy).await;
    let (email, other) = ("owner@example.com", "colleague@example.com");
    let (owner, _, _) = first.signed_in(email).await;
    sign_out(&first, &owner).await;
    let (colleague, _, _) = first.signed_in(other).await;
    sign_out(&first, &colleague).await;
    let stored = |gw: &Gateway| {
        let durable = gw.state.durable.clone();
        async move {
            durable
                .user_by_email(email)
                .await
                .unwrap()
                .unwrap()
                .password_hash
        }
    };
    let old = stored(&first).await;
    assert!(!old.contains("m=32768,t=3"), "{old}");
    let gw = std::sync::Arc::new(first.restarted_with(slow_full_hashing).await);
    let flood = fill_the_hashing_queue(&gw).await;
    let sign_in = |client: Browser, who: &'static str| {
        let gw = gw.clone();
        tokio::spawn(async move { gw.password(&client, who, PASSWORD, "").await })
    };
    let owners = sign_in(owner, email);
    wait_for_queue_depth(&gw, 4).await;
    let colleagues = sign_in(colleague, other);
    wait_for_queue_depth(&gw, 5).await;
    for r in [owners.await.unwrap(), colleagues.await.unwrap()] {
        assert_eq!(r.status(), 303, "a known device is let through");
        assert!(
            location(&r).starts_with("/_portcullis/mfa"),
            "{}",
            location(&r)
        );
    }
    let new = stored(&gw).await;
    assert!(new.contains("m=32768,t=3"), "rehashed: {new}");
    for f in flood {
        assert_eq!(f.await.unwrap(), 401);
    }
}

/// Failures make further attempts wait longer (bounded by `limits.max_delay`); while one
/// waits it holds no hashing slot (another sign-in is hashed meanwhile, with a pool of one and
/// no queue) and proxied traffic is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_slow_later_attempts_without_holding_a_slot_or_the_proxy() {
    let gw = Gateway::start_with(|c| {
        behind_proxy(c);
        c.limits.delay_after_failures = 0;
        c.limits.max_delay = Duration::from_secs(3);
        c.limits.password_failures_per_account = 100;
        c.password.max_concurrent_hashes = 1;
        c.password.max_queued_hashes = 0;
    })
    .await;
    let (user, _, _) = gw.signed_in("browsing@example.com").await;
    gw.add_user("target@example.com").await;
    // Five failures: 0, 125, 250, 500, 1000 ms; the sixth attempt waits 2 s.
    for i in 0..5 {
        let r = attempt_from(&gw, &format!("10.9.{i}.1"), "target@example.com", WRONG).await;
        assert_eq!(r.status(), 401);
    }
    let started = Instant::now();
    let b = gw.browser();
    let csrf = gw.csrf(&b, "/_portcullis/login").await;
    let sixth = gw
        .login_form(&b, &csrf, "target@example.com", WRONG, "")
        .header("x-forwarded-for", "10.9.99.1");
    let delayed = tokio::spawn(async move { sixth.send().await.unwrap().status().as_u16() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.status(&user, "/console").await, 200);
    assert!(!delayed.is_finished(), "the proxied request did not wait");
    let r = attempt_from(&gw, "192.0.2.77", "nobody@example.com", WRONG).await;
    assert_eq!(
        r.status(),
        401,
        "hashed, not 503: the waiting attempt holds no slot"
    );
    assert!(!delayed.is_finished());
    assert_eq!(delayed.await.unwrap(), 401);
    assert!(started.elapsed() >= Duration::from_secs(2), "it waited");
}

/// Budgets and delays out of the way, so only the consecutive-failure count decides.
pub(super) fn only_consecutive_failures_count(c: &mut portcullis::config::Config) {
    c.limits.password_failures_per_account = 1000;
    c.limits.failures_per_ip = 1000;
    c.limits.failures_per_network = 1000;
    c.limits.global_sign_ins_per_second = 1000;
    c.limits.max_delay = Duration::ZERO;
}

/// After 100 consecutive wrong passwords the account asks for the second factor first: a
/// password alone (right or wrong) gets the code page and is not even checked; the owner is
/// told once; the owner signs in code first, then password, and the count starts over.
#[tokio::test]
async fn after_100_wrong_passwords_the_second_factor_comes_first() {
    let gw = Gateway::start_with(only_consecutive_failures_count).await;
    let email = "sff@example.com";
    let (_, secret, _) = gw.signed_in(email).await;
    let attacker = gw.browser();
    for _ in 0..90 {
        let r = gw.password(&attacker, email, WRONG, "").await;
        assert_eq!(r.status(), 401);
    }
    // The hundredth arrives among twenty at once: still one notice, one audit event.
    let csrf = gw.csrf(&attacker, "/_portcullis/login").await;
    let burst = (0..20).map(|_| gw.login_form(&attacker, &csrf, email, WRONG, "").send());
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.unwrap().status(), 401);
    }
    let notice = "Subject: Someone may be guessing your password";
    let told = |mail: Vec<String>| mail.iter().filter(|m| m.contains(notice)).count();
    assert_eq!(told(gw.outbox().await), 1, "the owner is told");
    // What happened, that nothing got in, and what the next sign-in asks: not a change the
    // owner is asked whether they made.
    let mail = gw
        .outbox()
        .await
        .into_iter()
        .find(|m| m.contains(notice))
        .unwrap();
    let text = mail
        .replace("=\r\n", "")
        .replace("\r\n", " ")
        .replace('\n', " ");
    for said in [
        "100 wrong passwords in a row",
        "nobody got into your account",
        "asks for your second factor first",
    ] {
        assert!(text.contains(said), "{said}: {mail}");
    }
    assert!(!text.contains("If this was you"), "{mail}");
    let switched = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "second_factor_first")
        .count();
    assert_eq!(switched, 1, "and it is audited");

    // Right or wrong, a password alone gets the code page; neither is checked.
    let checked_before = password_reasons(&gw)
        .await
        .iter()
        .filter(|r| *r == "bad_password" || *r == "second_factor_required")
        .count();
    for guess in [PASSWORD, WRONG] {
        let r = gw.password(&attacker, email, guess, "").await;
        assert_eq!(r.status(), 303);
        assert_eq!(location(&r), "/_portcullis/mfa");
        assert_eq!(gw.status(&attacker, "/console").await, 303, "no way in");
    }
    let reasons = password_reasons(&gw).await;
    let checked_after = reasons
        .iter()
        .filter(|r| *r == "bad_password" || *r == "second_factor_required")
        .count();
    assert_eq!(checked_before, checked_after, "no password was checked");
    assert_eq!(
        reasons.iter().rev().take(2).collect::<Vec<_>>(),
        ["second_factor_first", "second_factor_first"]
    );
    assert!(gw
        .page(&attacker, "/_portcullis/mfa")
        .await
        .contains("many wrong passwords in a row"));
    assert_eq!(told(gw.outbox().await), 1, "told once, not per attempt");
    // Asked again and again, it is a run in the trail: a row for the first, one summary of the
    // rest (the two above were written apart, each at a flush).
    for _ in 0..10 {
        let r = gw.password(&gw.browser(), email, WRONG, "").await;
        assert_eq!(location(&r), "/_portcullis/mfa");
    }
    let mut runs: Vec<i64> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("second_factor_first") && e.event == "login_password"
        })
        .map(|e| e.times)
        .collect();
    runs.sort();
    assert_eq!(runs, [1, 1, 1, 9], "12 attempts, 4 rows");

    // The owner: code first, then the password (a wrong one is refused and counted).
    let owner = gw.browser();
    gw.clock.advance(30);
    let r = gw.password(&owner, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let r = gw
        .code(&owner, "/_portcullis/mfa", &gw.totp_now(&secret))
        .await;
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/_portcullis/login?notice=password_next");
    assert_eq!(
        gw.status(&owner, "/console").await,
        303,
        "a code alone reaches nothing"
    );
    let page = gw
        .page(&owner, "/_portcullis/login?notice=password_next")
        .await;
    assert!(page.contains("Now enter your password"), "{page}");
    assert!(page.contains(&format!("value=\"{email}\"")), "{page}");
    assert!(
        !page.contains("asked for a second factor next"),
        "the factor is given: {page}"
    );
    let r = gw.password(&owner, email, WRONG, "").await;
    assert_eq!(r.status(), 401);
    let r = gw.password(&owner, email, PASSWORD, "").await;
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/");
    assert_eq!(gw.status(&owner, "/console").await, 200, "the owner is in");
    let seen = gw.upstream.last();
    assert!(seen.header("x-portcullis-assertion").is_some());

    // The count started over: the password comes first again.
    gw.sign_in_again(email, &secret).await;
}

/// Second factor first with a security key: key first, then the password; the token carries
/// both methods.
#[tokio::test]
async fn key_first_then_password_signs_in_with_both_methods() {
    use super::webauthn::{console, last_claims, localhost, second_factor, with_key};
    let gw = Gateway::start_with(|c| {
        localhost(c);
        c.limits.second_factor_first_after = 3;
    })
    .await;
    let email = "keyfirst@example.com";
    let (_, _, mut k, _) = with_key(&gw, email, "Blue key").await;
    let attacker = gw.browser();
    for _ in 0..3 {
        assert_eq!(gw.password(&attacker, email, WRONG, "").await.status(), 401);
    }
    let c = gw.browser();
    let r = gw.password(&c, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let (r, _, _) = second_factor(&gw, &c, &mut k, |_, _| {}).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["redirect"], "/_portcullis/login?notice=password_next");
    assert_eq!(
        console(&gw, &c).await,
        303,
        "a key alone reaches nothing here"
    );
    let r = gw.password(&c, email, PASSWORD, "").await;
    assert_eq!(location(&r), "/");
    assert_eq!(console(&gw, &c).await, 200);
    assert_eq!(last_claims(&gw).await.amr, vec!["pwd", "hwk"]);
}

/// The switch to second factor first does not reveal which addresses have an account: an
/// address without one switches after the same number of wrong passwords, gets the same code
/// page, and the same answers to codes, which it never accepts.
#[tokio::test]
async fn second_factor_first_looks_the_same_for_an_address_without_an_account() {
    let gw = Gateway::start_with(|c| {
        only_consecutive_failures_count(c);
        c.limits.second_factor_first_after = 3;
    })
    .await;
    let real = "real-sff@example.com";
    let ghost = "ghost-sff@example.com";
    // A disabled account must not stand out either.
    let disabled = "disabled-sff@example.com";
    let (_, secret, _) = gw.signed_in(real).await;
    gw.signed_in(disabled).await;
    let out = gw.cli(&["user", "disable", disabled], None).await;
    assert!(out.status.success());
    // (The command line ended the sessions by the system's clock: the gateway's moves past it.)
    gw.clock.advance(5);
    let mut seen = Vec::new();
    for email in [real, ghost, disabled] {
        let attacker = gw.browser();
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(
                gw.password(&attacker, email, WRONG, "")
                    .await
                    .status()
                    .as_u16(),
            );
        }
        let r = gw.password(&attacker, email, WRONG, "").await;
        statuses.push(r.status().as_u16());
        let to = location(&r);
        let page = without_csrf(gw.page(&attacker, "/_portcullis/mfa").await);
        let mut codes = Vec::new();
        for _ in 0..2 {
            let r = gw.code(&attacker, "/_portcullis/mfa", "123456").await;
            codes.push((r.status().as_u16(), without_csrf(r.text().await.unwrap())));
        }
        assert_eq!(
            gw.status(&attacker, "/console").await,
            303,
            "no way in for {email}"
        );
        seen.push((statuses, to, page, codes));
    }
    assert_eq!(seen[0].0, [401, 401, 401, 303]);
    assert_eq!(seen[0].1, "/_portcullis/mfa");
    assert!(seen[0].2.contains("many wrong passwords in a row"));
    assert_eq!(
        seen[0], seen[1],
        "an address without an account answers alike"
    );
    assert_eq!(seen[2], seen[1], "a disabled account answers alike");

    // The right code of the real account is not a way into the decoy.
    let c = gw.browser();
    gw.password(&c, ghost, PASSWORD, "").await;
    let r = gw.code(&c, "/_portcullis/mfa", &gw.totp_now(&secret)).await;
    assert_ne!(location(&r), "/_portcullis/login?notice=password_next");
    assert_eq!(gw.status(&c, "/console").await, 303);
    let switched: Vec<_> = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "second_factor_first")
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        switched.contains(&"consecutive_password_failures_unknown_user".to_string()),
        "{switched:?}"
    );
}

/// Behind the same answers, the same work: a wrong code for an account switched to second
/// factor first and for an address without one (or a disabled account) reads the stores alike
/// (the app's record and the user looked up), so its time does not tell them apart; and a code
/// past the budget is audited for either.
#[tokio::test]
async fn second_factor_first_does_the_same_work_for_an_address_without_an_account() {
    let (metrics, adjust) = super::metrics::metrics_on_free_port();
    let gw = Gateway::start_with(|c| {
        adjust(c);
        only_consecutive_failures_count(c);
        c.limits.second_factor_first_after = 3;
        c.limits.second_factor_failures_per_account = 1;
    })
    .await;
    let real = "real-work@example.com";
    let ghost = "ghost-work@example.com";
    gw.signed_in(real).await;
    let reads = |m: &std::collections::HashMap<String, f64>| {
        ["read", "write", "atomic"].map(|op| {
            let durable = format!(
                "portcullis_store_operation_seconds_count{{store=\"durable\",operation=\"{op}\"}}"
            );
            let ephemeral = format!(
                "portcullis_store_operation_seconds_count{{store=\"ephemeral\",operation=\"{op}\"}}"
            );
            (
                m.get(&durable).copied().unwrap_or(0.0),
                m.get(&ephemeral).copied().unwrap_or(0.0),
            )
        })
    };
    let mut work = Vec::new();
    for email in [real, ghost] {
        let attacker = gw.browser();
        for _ in 0..4 {
            gw.password(&attacker, email, WRONG, "").await;
        }
        gw.page(&attacker, "/_portcullis/mfa").await;
        gw.state.audit.flush().await;
        let before = reads(&super::metrics::scrape(&metrics).await);
        let r = gw.code(&attacker, "/_portcullis/mfa", "123456").await;
        assert_eq!(r.status(), 401, "{email}");
        let after = reads(&super::metrics::scrape(&metrics).await);
        let moved: Vec<(f64, f64)> = before
            .iter()
            .zip(after.iter())
            .map(|(b, a)| (a.0 - b.0, a.1 - b.1))
            .collect();
        work.push(moved);
    }
    assert!(work[0][0].0 >= 2.0, "the account's reads: {work:?}");
    assert_eq!(
        work[0], work[1],
        "store operations of a wrong code, account then none"
    );
    // Past the budget, a code for the address without an account is refused and audited, as
    // one for an account is.
    let attacker = gw.browser();
    gw.password(&attacker, ghost, WRONG, "").await;
    let r = gw.code(&attacker, "/_portcullis/mfa", "654321").await;
    assert_eq!(r.status(), 429);
    let throttled = gw
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "second_factor" && e.outcome == "denied")
        .filter(|e| e.reason.as_deref() == Some("throttled") && e.user_id.is_none())
        .count();
    assert_eq!(throttled, 1);
}

/// Someone who has the password cannot lock the owner out of the second factor: wrong codes
/// from elsewhere spend the account's code budget, but a sign-in from the owner's known device
/// draws on a budget of that device's own, and its right code is taken. A browser that is not
/// the owner's known device still meets the spent budget.
#[tokio::test]
async fn wrong_codes_from_elsewhere_do_not_lock_the_owner_out() {
    let gw = Gateway::start().await;
    let email = "code-lockout@example.com";
    let (owner, secret, _) = gw.signed_in(email).await;
    let per_account = gw.state.config.limits.second_factor_failures_per_account;
    let per_login = gw.state.config.limits.second_factor_failures_per_login;
    let mut codes_tried = 0;
    let mut last = 0;
    while codes_tried < per_account + 1 {
        let attacker = gw.browser_moved_to(&gw.browser(), "127.0.1.5");
        gw.clock.advance(1);

        let r = gw.password(&attacker, email, PASSWORD, "").await;
        assert_eq!(location(&r), "/_portcullis/mfa");
        for _ in 0..per_login {
            last = gw
                .code(&attacker, "/_portcullis/mfa", "000000")
                .await
                .status()
                .as_u16();
            codes_tried += 1;
            if last == 429 {
                break;
            }
        }
        if last == 429 {
            break;
        }
    }
    assert_eq!(last, 429, "the account's code budget is spent");
    // A browser that is not a known device of the owner meets it, even with the right code.
    let stranger = gw.browser();
    gw.clock.advance(30);
    gw.password(&stranger, email, PASSWORD, "").await;
    let r = gw
        .code(&stranger, "/_portcullis/mfa", &gw.totp_now(&secret))
        .await;
    assert_eq!(r.status(), 429);
    // The owner's known device signs in (after signing out: the device is still known).
    sign_out(&gw, &owner).await;
    gw.sign_in_on(&owner, email, &secret).await;
    assert_eq!(gw.status(&owner, "/campaigns").await, 200);
}
