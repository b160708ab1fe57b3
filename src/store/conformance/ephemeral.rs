//! The [`EphemeralStore`] contract. Every backend runs [`ephemeral_suite`]; time moves through the
//! backend's own `advance` (a manual clock for memory, real sleeps for a server), so TTLs here are
//! a few whole seconds and every expiry check keeps at least one second of margin.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::Barrier;

use crate::store::EphemeralStore;

/// Moves the backend's notion of "now" forward.
pub(crate) type Advance = Arc<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>;

/// A backend under test.
pub(crate) struct EphemeralBackend {
    pub store: Arc<dyn EphemeralStore>,
    pub advance: Advance,
}

impl EphemeralBackend {
    async fn wait(&self, secs: u64) {
        (self.advance)(Duration::from_secs(secs)).await;
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Runs the whole contract. Keys carry a random prefix so a shared server can host many runs.
pub(crate) async fn ephemeral_suite(b: EphemeralBackend) {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let key = |name: &str| format!("conformance:{run}:{name}");
    get_put_delete(&b, &key).await;
    ttl_expiry(&b, &key).await;
    put_if_absent(&b, &key).await;
    put_if_present(&b, &key).await;
    put_if_unchanged(&b, &key).await;
    take_once(&b, &key).await;
    take_races(&b, &key("take-race")).await;
    incr(&b, &key).await;
    incr_races(&b, &key("incr-race")).await;
    incr_this_second(&b, &key("per-second")).await;
    set_if_greater(&b, &key).await;
    set_if_greater_races(&b, &key("sig-race")).await;
    sets(&b, &key).await;
    type_confusion(&b, &key).await;
}

async fn get_put_delete(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let (k, other) = (key("gpd"), key("gpd-other"));
    assert_eq!(s.get(&k).await.unwrap(), None, "missing key reads as None");
    s.put(&k, b"one", secs(60)).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap().as_deref(), Some(&b"one"[..]));
    s.put(&k, b"two", secs(60)).await.unwrap();
    assert_eq!(
        s.get(&k).await.unwrap().as_deref(),
        Some(&b"two"[..]),
        "put overwrites"
    );
    assert_eq!(s.get(&other).await.unwrap(), None, "keys are independent");
    let binary = [0u8, 255, 10, 13, 0, b'\'', b'"'];
    s.put(&other, &binary, secs(60)).await.unwrap();
    assert_eq!(s.get(&other).await.unwrap().as_deref(), Some(&binary[..]));
    s.delete(&k).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap(), None, "delete removes");
    assert_eq!(s.get(&other).await.unwrap().as_deref(), Some(&binary[..]));
    s.delete(&k).await.unwrap(); // deleting a missing key is fine
    s.put(&k, b"", secs(60)).await.unwrap();
    assert_eq!(
        s.get(&k).await.unwrap(),
        Some(Vec::new()),
        "empty value is a value"
    );
}

async fn ttl_expiry(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let (k, long) = (key("ttl"), key("ttl-long"));
    s.put(&k, b"v", secs(2)).await.unwrap();
    s.put(&long, b"w", secs(60)).await.unwrap();
    b.wait(1).await;
    assert_eq!(
        s.get(&k).await.unwrap().as_deref(),
        Some(&b"v"[..]),
        "alive before its TTL"
    );
    s.put(&k, b"v2", secs(2)).await.unwrap(); // a new put restarts the TTL
    b.wait(1).await;
    assert_eq!(
        s.get(&k).await.unwrap().as_deref(),
        Some(&b"v2"[..]),
        "put must restart the TTL"
    );
    b.wait(2).await;
    assert_eq!(s.get(&k).await.unwrap(), None, "expired after its TTL");
    assert_eq!(
        s.take(&k).await.unwrap(),
        None,
        "an expired value cannot be taken"
    );
    assert_eq!(s.get(&long).await.unwrap().as_deref(), Some(&b"w"[..]));
}

async fn put_if_absent(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let k = key("pia");
    assert!(s.put_if_absent(&k, b"first", secs(2)).await.unwrap());
    assert!(!s.put_if_absent(&k, b"second", secs(60)).await.unwrap());
    assert_eq!(
        s.get(&k).await.unwrap().as_deref(),
        Some(&b"first"[..]),
        "a refused put_if_absent leaves the value alone"
    );
    b.wait(3).await;
    assert!(
        s.put_if_absent(&k, b"third", secs(60)).await.unwrap(),
        "an expired key counts as absent"
    );
    assert_eq!(s.get(&k).await.unwrap().as_deref(), Some(&b"third"[..]));
    s.delete(&k).await.unwrap();
    assert!(s.put_if_absent(&k, b"fourth", secs(60)).await.unwrap());
}

async fn put_if_unchanged(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let k = key("piu");
    assert!(
        !s.put_if_unchanged(&k, b"", b"ghost", secs(60))
            .await
            .unwrap(),
        "nothing is created, not even for an empty expectation"
    );
    assert_eq!(s.get(&k).await.unwrap(), None);
    s.put(&k, b"read", secs(60)).await.unwrap();
    // Another writer changed it since it was read: the stale write is refused.
    s.put(&k, b"written meanwhile", secs(60)).await.unwrap();
    assert!(!s
        .put_if_unchanged(&k, b"read", b"stale", secs(60))
        .await
        .unwrap());
    assert_eq!(
        s.get(&k).await.unwrap().as_deref(),
        Some(&b"written meanwhile"[..])
    );
    assert!(s
        .put_if_unchanged(&k, b"written meanwhile", b"next", secs(2))
        .await
        .unwrap());
    assert_eq!(s.get(&k).await.unwrap().as_deref(), Some(&b"next"[..]));
    // The new TTL holds.
    b.wait(3).await;
    assert_eq!(s.get(&k).await.unwrap(), None, "expired with its new TTL");
    assert!(!s
        .put_if_unchanged(&k, b"next", b"late", secs(60))
        .await
        .unwrap());
    // Of many racing writers that read the same value, one wins.
    s.put(&k, b"v0", secs(60)).await.unwrap();
    let k = &k;
    let wins = futures_util::future::join_all((0..16).map(|i| {
        let v = format!("v{}", i + 1);
        async move {
            s.put_if_unchanged(k, b"v0", v.as_bytes(), secs(60))
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1);
}

async fn put_if_present(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let k = key("pip");
    assert!(
        !s.put_if_present(&k, b"ghost", secs(60)).await.unwrap(),
        "nothing is created"
    );
    assert_eq!(s.get(&k).await.unwrap(), None);
    s.put(&k, b"first", secs(2)).await.unwrap();
    assert!(s.put_if_present(&k, b"second", secs(2)).await.unwrap());
    assert_eq!(s.get(&k).await.unwrap().as_deref(), Some(&b"second"[..]));
    s.delete(&k).await.unwrap();
    assert!(
        !s.put_if_present(&k, b"revived", secs(60)).await.unwrap(),
        "a deleted key stays deleted"
    );
    assert_eq!(s.get(&k).await.unwrap(), None);
    s.put(&k, b"third", secs(2)).await.unwrap();
    b.wait(3).await;
    assert!(
        !s.put_if_present(&k, b"late", secs(60)).await.unwrap(),
        "an expired key counts as absent"
    );
    assert_eq!(s.get(&k).await.unwrap(), None);
}

async fn take_once(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let k = key("take");
    assert_eq!(s.take(&k).await.unwrap(), None);
    s.put(&k, b"challenge", secs(60)).await.unwrap();
    assert_eq!(
        s.take(&k).await.unwrap().as_deref(),
        Some(&b"challenge"[..])
    );
    assert_eq!(s.take(&k).await.unwrap(), None, "take is single-use");
    assert_eq!(s.get(&k).await.unwrap(), None, "take deletes");
    assert!(s.put_if_absent(&k, b"again", secs(60)).await.unwrap());
}

async fn take_races(b: &EphemeralBackend, k: &str) {
    const TASKS: usize = 50;
    b.store.put(k, b"only-once", secs(60)).await.unwrap();
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (s, k, barrier) = (b.store.clone(), k.to_string(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                s.take(&k).await.unwrap()
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(v) = t.await.unwrap() {
            winners.push(v);
        }
    }
    assert_eq!(
        winners,
        vec![b"only-once".to_vec()],
        "exactly one racer takes"
    );
}

async fn incr(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let k = key("incr");
    assert_eq!(s.incr(&k, secs(3)).await.unwrap(), 1, "incr creates at 1");
    b.wait(2).await;
    assert_eq!(s.incr(&k, secs(3)).await.unwrap(), 2);
    assert_eq!(s.incr(&k, secs(3)).await.unwrap(), 3);
    assert_eq!(s.incr(&key("incr-other"), secs(3)).await.unwrap(), 1);
    // decr takes one back and keeps the TTL; it never creates or goes below zero.
    s.decr(&k).await.unwrap();
    assert_eq!(s.incr(&k, secs(3)).await.unwrap(), 3);
    s.decr(&key("incr-missing")).await.unwrap();
    assert_eq!(s.get(&key("incr-missing")).await.unwrap(), None);
    let z = key("incr-zero");
    s.incr(&z, secs(3)).await.unwrap();
    s.decr(&z).await.unwrap();
    s.decr(&z).await.unwrap();
    assert_eq!(s.incr(&z, secs(3)).await.unwrap(), 1);
    // Created 4 s ago with a 3 s TTL: gone, unless incr wrongly extended the TTL.
    b.wait(2).await;
    assert_eq!(
        s.incr(&k, secs(3)).await.unwrap(),
        1,
        "the counter expires TTL after creation; incr must not extend it"
    );
}

async fn incr_races(b: &EphemeralBackend, k: &str) {
    const TASKS: u64 = 100;
    let barrier = Arc::new(Barrier::new(TASKS as usize));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (s, k, barrier) = (b.store.clone(), k.to_string(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                s.incr(&k, secs(60)).await.unwrap()
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(
        seen,
        (1..=TASKS).collect::<BTreeSet<_>>(),
        "each concurrent incr sees a distinct value"
    );
    assert_eq!(b.store.incr(k, secs(60)).await.unwrap(), TASKS + 1);
}

/// Counts per second of the store's clock: within a second one more each time, from one again
/// in the next (at most once in a quick run of calls), and a second later a fresh count.
async fn incr_this_second(b: &EphemeralBackend, k: &str) {
    let s = &b.store;
    let mut last = 0;
    let mut restarts = 0;
    for _ in 0..20 {
        let n = s.incr_this_second(k).await.unwrap();
        if n == last + 1 {
            last = n;
        } else {
            assert_eq!(n, 1, "a new second starts at one (after {last})");
            restarts += 1;
            last = 1;
        }
    }
    assert!(restarts <= 1, "{restarts} new seconds in a quick run");
    assert!(
        last >= 10,
        "most of the run was counted in one second: {last}"
    );
    b.wait(2).await;
    assert_eq!(s.incr_this_second(k).await.unwrap(), 1, "another second");
}

async fn set_if_greater(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let k = key("sig");
    assert!(
        s.set_if_greater(&k, 5, secs(2)).await.unwrap(),
        "5 on empty"
    );
    assert!(!s.set_if_greater(&k, 5, secs(60)).await.unwrap(), "5 again");
    assert!(!s.set_if_greater(&k, 4, secs(60)).await.unwrap(), "4 < 5");
    assert!(s.set_if_greater(&k, 6, secs(2)).await.unwrap(), "6 > 5");
    assert!(!s.set_if_greater(&k, 6, secs(60)).await.unwrap(), "6 again");
    assert!(s.set_if_greater(&k, u64::MAX, secs(2)).await.unwrap());
    assert!(!s.set_if_greater(&k, u64::MAX, secs(60)).await.unwrap());
    b.wait(3).await;
    assert!(
        s.set_if_greater(&k, 1, secs(60)).await.unwrap(),
        "after expiry any value is accepted"
    );
    assert!(!s.set_if_greater(&k, 0, secs(60)).await.unwrap());
}

async fn set_if_greater_races(b: &EphemeralBackend, k: &str) {
    const TASKS: u64 = 50;
    let barrier = Arc::new(Barrier::new(TASKS as usize));
    // Interleave small and large values so the order of arrival varies.
    let values: Vec<u64> = (1..=TASKS).map(|i| (i * 37) % TASKS + 1).collect();
    assert_eq!(values.iter().copied().collect::<BTreeSet<_>>().len(), 50);
    let tasks: Vec<_> = values
        .into_iter()
        .map(|v| {
            let (s, k, barrier) = (b.store.clone(), k.to_string(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                s.set_if_greater(&k, v, secs(60)).await.unwrap()
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        accepted += u32::from(t.await.unwrap());
    }
    assert!(accepted >= 1, "at least one value is stored");
    let s = &b.store;
    assert!(
        !s.set_if_greater(k, TASKS, secs(60)).await.unwrap(),
        "the maximum ({TASKS}) must be what is stored"
    );
    assert!(s.set_if_greater(k, TASKS + 1, secs(60)).await.unwrap());
}

async fn members(s: &Arc<dyn EphemeralStore>, k: &str) -> BTreeSet<String> {
    let list = s.set_members(k).await.unwrap();
    let set: BTreeSet<String> = list.iter().cloned().collect();
    assert_eq!(set.len(), list.len(), "set_members lists each member once");
    set
}

fn set_of(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

async fn sets(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let (k, other) = (key("set"), key("set-other"));
    assert!(members(s, &k).await.is_empty(), "missing set is empty");
    // Each addition answers how many members the set holds now (a repeat adds none).
    let mut held = Vec::new();
    for m in ["a", "b b", "a", "ünï'\""] {
        held.push(s.set_add(&k, m, secs(60)).await.unwrap());
    }
    assert_eq!(held, [1, 2, 2, 3]);
    assert_eq!(s.set_add(&other, "x", secs(60)).await.unwrap(), 1);
    assert_eq!(members(s, &k).await, set_of(&["a", "b b", "ünï'\""]));
    s.set_remove(&k, "a").await.unwrap();
    s.set_remove(&k, "not-there").await.unwrap();
    s.set_remove(&key("no-such-set"), "a").await.unwrap();
    assert_eq!(members(s, &k).await, set_of(&["b b", "ünï'\""]));
    s.set_remove(&k, "b b").await.unwrap();
    s.set_remove(&k, "ünï'\"").await.unwrap();
    assert!(
        members(s, &k).await.is_empty(),
        "removing every member empties the set"
    );
    assert_eq!(
        members(s, &other).await,
        set_of(&["x"]),
        "sets are independent"
    );

    // TTL: each add (re)sets it, so a set lives while it is being added to.
    let t = key("set-ttl");
    s.set_add(&t, "1", secs(3)).await.unwrap();
    b.wait(2).await;
    s.set_add(&t, "2", secs(3)).await.unwrap();
    b.wait(2).await;
    assert_eq!(
        members(s, &t).await,
        set_of(&["1", "2"]),
        "set_add must restart the set's TTL"
    );
    b.wait(2).await;
    assert!(
        members(s, &t).await.is_empty(),
        "the set expires as a whole"
    );
    s.set_add(&t, "3", secs(60)).await.unwrap();
    assert_eq!(
        members(s, &t).await,
        set_of(&["3"]),
        "no stale members after expiry"
    );
}

/// Using a key with the wrong kind of operation is an error (or a miss), never a panic, and it
/// never destroys what the key holds.
async fn type_confusion(b: &EphemeralBackend, key: &dyn Fn(&str) -> String) {
    let s = &b.store;
    let (set, text) = (key("tc-set"), key("tc-text"));
    s.set_add(&set, "member", secs(60)).await.unwrap();
    s.put(&text, b"not a number", secs(60)).await.unwrap();

    assert!(s.incr(&set, secs(60)).await.is_err(), "incr on a set");
    assert!(
        s.set_if_greater(&set, 7, secs(60)).await.is_err(),
        "set_if_greater on a set"
    );
    assert!(s.incr(&text, secs(60)).await.is_err(), "incr on text");
    assert!(
        s.set_if_greater(&text, 7, secs(60)).await.is_err(),
        "set_if_greater on text"
    );
    assert!(
        s.set_add(&text, "m", secs(60)).await.is_err(),
        "set_add on a plain value"
    );

    // Reads of the wrong kind: an error or nothing, but no data loss.
    assert!(
        !matches!(s.get(&set).await, Ok(Some(_))),
        "get on a set yields no bytes"
    );
    assert!(
        !matches!(s.take(&set).await, Ok(Some(_))),
        "take on a set yields no bytes"
    );
    assert!(!matches!(s.set_members(&text).await, Ok(v) if !v.is_empty()));
    let _ = s.set_remove(&text, "m").await;
    assert!(
        !s.put_if_absent(&set, b"x", secs(60)).await.unwrap(),
        "a set is present"
    );

    assert_eq!(
        members(s, &set).await,
        set_of(&["member"]),
        "the set survives"
    );
    assert_eq!(
        s.get(&text).await.unwrap().as_deref(),
        Some(&b"not a number"[..]),
        "the value survives"
    );
}
