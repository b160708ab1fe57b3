//! In-process ephemeral store: the default for a single gateway (`ephemeral = "memory"`).
//! Expiry follows the injected [`Clock`], so tests can expire sessions without sleeping.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{EphemeralStore, StoreError, StoreResult};
use crate::clock::Clock;

const SHARDS: usize = 16;
/// Expired entries are swept from a shard every this many writes to it.
const SWEEP_EVERY: u64 = 1024;

#[derive(Debug)]
enum Value {
    Bytes(Vec<u8>),
    Set(HashSet<String>),
}

#[derive(Debug)]
struct Entry {
    value: Value,
    expires_at_ms: i64,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<String, Entry>,
    writes: u64,
}

/// A sharded, TTL-aware map.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
    ops: AtomicU64,
}

impl MemoryStore {
    /// Stores `value` if `allowed(the live entry there, if any)`, in one step under the
    /// shard's lock; true when stored.
    fn put_when(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        allowed: impl FnOnce(Option<&Entry>) -> bool,
    ) -> StoreResult<bool> {
        let (mut s, now) = self.shard(key)?;
        if !allowed(s.live(key, now).map(|e| &*e)) {
            return Ok(false);
        }
        s.map.insert(
            key.to_string(),
            Entry {
                value: Value::Bytes(value.to_vec()),
                expires_at_ms: Self::deadline(now, ttl),
            },
        );
        s.wrote(now);
        Ok(true)
    }

    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            clock,
            ops: AtomicU64::new(0),
        }
    }

    /// Number of store operations served (for tests and metrics).
    pub fn operations(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Live entries (for memory measurements).
    pub fn len(&self) -> usize {
        let now = self.clock.now_millis();
        self.shards
            .iter()
            .filter_map(|s| s.lock().ok())
            .map(|s| s.map.values().filter(|e| e.expires_at_ms > now).count())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> StoreResult<(MutexGuard<'_, Shard>, i64)> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let idx = (self.hasher.hash_one(key) as usize) % SHARDS;
        let guard = self.shards[idx]
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store lock poisoned".into()))?;
        Ok((guard, self.clock.now_millis()))
    }

    fn deadline(now: i64, ttl: Duration) -> i64 {
        now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
    }
}

impl Shard {
    /// The live entry for `key`, dropping it if it has expired.
    fn live(&mut self, key: &str, now: i64) -> Option<&mut Entry> {
        if self.map.get(key).is_some_and(|e| e.expires_at_ms <= now) {
            self.map.remove(key);
        }
        self.map.get_mut(key)
    }

    fn wrote(&mut self, now: i64) {
        self.writes += 1;
        if self.writes % SWEEP_EVERY == 0 {
            self.map.retain(|_, e| e.expires_at_ms > now);
        }
    }
}

fn parse_num(e: &Entry) -> StoreResult<u64> {
    match &e.value {
        Value::Bytes(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StoreError::Corrupt("counter is not a number".into())),
        Value::Set(_) => Err(StoreError::Corrupt("counter key holds a set".into())),
    }
}

#[async_trait]
impl EphemeralStore for MemoryStore {
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let (mut s, now) = self.shard(key)?;
        Ok(match s.live(key, now) {
            Some(Entry {
                value: Value::Bytes(b),
                ..
            }) => Some(b.clone()),
            _ => None,
        })
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<()> {
        self.put_when(key, value, ttl, |_| true).map(|_| ())
    }

    async fn put_if_present(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        self.put_when(key, value, ttl, |live| live.is_some())
    }

    async fn put_if_absent(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        self.put_when(key, value, ttl, |live| live.is_none())
    }

    async fn put_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> StoreResult<bool> {
        self.put_when(key, value, ttl, |live| {
            matches!(live, Some(Entry { value: Value::Bytes(b), .. }) if b.as_slice() == expected)
        })
    }

    async fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let (mut s, now) = self.shard(key)?;
        match s.live(key, now) {
            None => return Ok(None),
            // Like Redis `GETDEL` on a set (WRONGTYPE): an error, and the set is kept.
            Some(Entry {
                value: Value::Set(_),
                ..
            }) => return Err(StoreError::Corrupt("take on a set key".into())),
            Some(_) => {}
        }
        Ok(match s.map.remove(key) {
            Some(Entry {
                value: Value::Bytes(b),
                ..
            }) => Some(b),
            _ => None,
        })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let (mut s, _) = self.shard(key)?;
        s.map.remove(key);
        Ok(())
    }

    async fn incr_this_second(&self, key: &str) -> StoreResult<u64> {
        // One process: its clock is the only one.
        let second = self.clock.now();
        self.incr(&format!("{key}:{second}"), Duration::from_secs(10))
            .await
    }

    async fn incr(&self, key: &str, ttl: Duration) -> StoreResult<u64> {
        let (mut s, now) = self.shard(key)?;
        let next = match s.live(key, now) {
            Some(e) => {
                let n = parse_num(e)?.saturating_add(1);
                e.value = Value::Bytes(n.to_string().into_bytes());
                n
            }
            None => {
                s.map.insert(
                    key.to_string(),
                    Entry {
                        value: Value::Bytes(b"1".to_vec()),
                        expires_at_ms: Self::deadline(now, ttl),
                    },
                );
                1
            }
        };
        s.wrote(now);
        Ok(next)
    }

    async fn decr(&self, key: &str) -> StoreResult<()> {
        let (mut s, now) = self.shard(key)?;
        if let Some(e) = s.live(key, now) {
            let n = parse_num(e)?;
            if n > 0 {
                e.value = Value::Bytes((n - 1).to_string().into_bytes());
            }
        }
        Ok(())
    }

    async fn set_if_greater(&self, key: &str, value: u64, ttl: Duration) -> StoreResult<bool> {
        let (mut s, now) = self.shard(key)?;
        if let Some(e) = s.live(key, now) {
            if parse_num(e)? >= value {
                return Ok(false);
            }
        }
        s.map.insert(
            key.to_string(),
            Entry {
                value: Value::Bytes(value.to_string().into_bytes()),
                expires_at_ms: Self::deadline(now, ttl),
            },
        );
        s.wrote(now);
        Ok(true)
    }

    async fn set_add(&self, key: &str, member: &str, ttl: Duration) -> StoreResult<u64> {
        let (mut s, now) = self.shard(key)?;
        let deadline = Self::deadline(now, ttl);
        let held = match s.live(key, now) {
            Some(Entry {
                value: Value::Set(set),
                expires_at_ms,
            }) => {
                set.insert(member.to_string());
                *expires_at_ms = (*expires_at_ms).max(deadline);
                set.len() as u64
            }
            Some(_) => return Err(StoreError::Corrupt("set key holds a value".into())),
            None => {
                let set = HashSet::from([member.to_string()]);
                s.map.insert(
                    key.to_string(),
                    Entry {
                        value: Value::Set(set),
                        expires_at_ms: deadline,
                    },
                );
                1
            }
        };
        s.wrote(now);
        Ok(held)
    }

    async fn set_remove(&self, key: &str, member: &str) -> StoreResult<()> {
        let (mut s, now) = self.shard(key)?;
        if let Some(Entry {
            value: Value::Set(set),
            ..
        }) = s.live(key, now)
        {
            set.remove(member);
            if set.is_empty() {
                s.map.remove(key);
            }
        }
        Ok(())
    }

    async fn set_members(&self, key: &str) -> StoreResult<Vec<String>> {
        let (mut s, now) = self.shard(key)?;
        Ok(match s.live(key, now) {
            Some(Entry {
                value: Value::Set(set),
                ..
            }) => set.iter().cloned().collect(),
            _ => Vec::new(),
        })
    }
}
