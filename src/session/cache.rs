//! A small local cache of session records for the gate, so a session used again within
//! `session.local_cache` (≤ 1 s) costs no store round trip.
//!
//! - Entries live at most `ttl` (monotonic time, not the injected clock: this is about how
//!   stale a copy may be, not about session lifetimes, which are still checked on every hit).
//! - At most `max` entries; a full cache drops expired entries and otherwise caches nothing new.
//! - Every local change forgets the entry at once; changes on other gateways arrive as messages
//!   on the invalidation channel ([`LocalCache::apply`]).
//! - While the channel is down, nothing is served from the cache (and everything in it is
//!   dropped), so a missed message can never keep a revoked session alive.
//! - `seq` counts invalidations: a record read from the store is cached only if no
//!   invalidation happened since the read started, so a revocation that overtakes a read is
//!   never undone by the read's late result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Session;

/// Message prefix that names one session by its storage key.
const SESSION_MSG: &str = "s:";
/// Message prefix that names every session of a user (and the user's cached record).
const USER_MSG: &str = "u:";

/// The message that drops one session (by storage key) everywhere.
pub fn session_message(key: &str) -> String {
    format!("{SESSION_MSG}{key}")
}

/// The message that drops everything cached about a user everywhere.
pub fn user_message(user_id: &str) -> String {
    format!("{USER_MSG}{user_id}")
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    session: Arc<Session>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: crate::CacheMap<Entry>,
    seq: u64,
}

/// Session records by storage key, each trusted for at most `ttl`.
#[derive(Debug)]
pub struct LocalCache {
    ttl: Duration,
    max: usize,
    /// Whether invalidations are known to arrive (always, without a channel).
    live: AtomicBool,
    inner: Mutex<Inner>,
}

impl LocalCache {
    /// A cache that serves at once when `live` (no channel to wait for), or after the first
    /// [`LocalCache::set_live`]. A zero `ttl` or `max` turns it off.
    pub fn new(ttl: Duration, max: usize, live: bool) -> Self {
        Self {
            ttl,
            max,
            live: AtomicBool::new(live),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.max > 0 && self.live.load(Ordering::SeqCst)
    }

    /// Whether the cache may serve now.
    pub fn is_live(&self) -> bool {
        self.enabled()
    }

    /// The cached record, if it is younger than the cache's lifetime.
    pub fn get(&self, key: &str) -> Option<Arc<Session>> {
        if !self.enabled() {
            return None;
        }
        let inner = self.inner.lock().ok()?;
        inner
            .entries
            .get(key)
            .filter(|e| e.at.elapsed() < self.ttl)
            .map(|e| Arc::clone(&e.session))
    }

    /// A ticket to take before reading the store; [`LocalCache::insert`] needs it.
    pub fn ticket(&self) -> u64 {
        self.inner.lock().map(|i| i.seq).unwrap_or(u64::MAX)
    }

    /// Caches a record read from the store, unless anything was invalidated since `ticket`.
    pub fn insert(&self, key: &str, session: Arc<Session>, ticket: u64) {
        if !self.enabled() {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.seq != ticket {
            return;
        }
        if inner.entries.len() >= self.max {
            let ttl = self.ttl;
            inner.entries.retain(|_, e| e.at.elapsed() < ttl);
            if inner.entries.len() >= self.max {
                return;
            }
        }
        inner.entries.insert(
            key.to_string(),
            Entry {
                at: Instant::now(),
                session,
            },
        );
    }

    fn invalidate(&self, f: impl FnOnce(&mut crate::CacheMap<Entry>)) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.seq = inner.seq.wrapping_add(1);
            f(&mut inner.entries);
        }
    }

    /// Drops one session.
    pub fn forget(&self, key: &str) {
        self.invalidate(|e| {
            e.remove(key);
        });
    }

    /// Drops every session of a user.
    pub fn forget_user(&self, user_id: &str) {
        self.invalidate(|e| e.retain(|_, v| v.session.user_id != user_id));
    }

    /// The channel came up (serve again, starting empty) or went down (serve nothing).
    pub fn set_live(&self, live: bool) {
        self.invalidate(crate::CacheMap::clear);
        self.live.store(live, Ordering::SeqCst);
    }

    /// Applies a message from the channel; returns the user it named, if it named a user.
    /// Anything unreadable drops the whole cache (fail safe).
    pub fn apply(&self, message: &str) -> Option<String> {
        if let Some(key) = message.strip_prefix(SESSION_MSG) {
            self.forget(key);
            None
        } else if let Some(user) = message.strip_prefix(USER_MSG) {
            self.forget_user(user);
            Some(user.to_string())
        } else {
            self.invalidate(crate::CacheMap::clear);
            None
        }
    }

    /// Entries held now (for tests and bounds).
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.entries.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Stage;

    fn session(user: &str) -> Session {
        Session::after_password(user, Stage::Authenticated, 1, "ip", "ua", None)
    }

    /// Caches a session of each user under each key.
    fn fill(c: &LocalCache, entries: &[(&str, &str)]) {
        for (key, user) in entries {
            c.insert(key, Arc::new(session(user)), c.ticket());
        }
    }

    #[test]
    fn serves_until_forgotten() {
        let c = LocalCache::new(Duration::from_secs(1), 10, true);
        let t = c.ticket();
        c.insert("k", Arc::new(session("u1")), t);
        assert_eq!(c.get("k").map(|s| s.user_id.clone()), Some("u1".into()));
        c.forget("k");
        assert!(c.get("k").is_none());
    }

    #[test]
    fn a_read_overtaken_by_an_invalidation_is_not_cached() {
        let c = LocalCache::new(Duration::from_secs(1), 10, true);
        let t = c.ticket();
        c.apply(&session_message("other"));
        c.insert("k", Arc::new(session("u1")), t);
        assert!(c.get("k").is_none());
    }

    #[test]
    fn user_messages_drop_all_of_a_users_sessions() {
        let c = LocalCache::new(Duration::from_secs(1), 10, true);
        fill(&c, &[("a", "u1"), ("b", "u1"), ("c", "u2")]);
        assert_eq!(c.apply(&user_message("u1")), Some("u1".into()));
        assert!(c.get("a").is_none() && c.get("b").is_none());
        assert!(c.get("c").is_some());
        c.apply("garbage");
        assert!(c.is_empty());
    }

    #[test]
    fn nothing_is_served_while_the_channel_is_down() {
        let c = LocalCache::new(Duration::from_secs(1), 10, false);
        c.insert("k", Arc::new(session("u1")), c.ticket());
        assert!(
            c.get("k").is_none(),
            "not live before the first subscription"
        );
        c.set_live(true);
        c.insert("k", Arc::new(session("u1")), c.ticket());
        assert!(c.get("k").is_some());
        c.set_live(false);
        assert!(c.get("k").is_none());
        c.set_live(true);
        assert!(c.get("k").is_none(), "entries from before the gap are gone");
    }

    #[test]
    fn bounded_and_expiring() {
        let c = LocalCache::new(Duration::from_millis(30), 2, true);
        fill(&c, &[("a", "u"), ("b", "u"), ("c", "u")]);
        assert_eq!(c.len(), 2);
        assert!(c.get("c").is_none());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.get("a").is_none(), "expired");
        c.insert("c", Arc::new(session("u")), c.ticket());
        assert!(c.get("c").is_some(), "expired entries make room");
        let off = LocalCache::new(Duration::ZERO, 2, true);
        off.insert("a", Arc::new(session("u")), off.ticket());
        assert!(off.get("a").is_none());
    }
}
