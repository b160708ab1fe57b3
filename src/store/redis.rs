//! Ephemeral store on Redis (`storage.ephemeral = "redis://…"`), shared by several gateways.
//!
//! - Every call is one command or one Lua script, so each is atomic on the server: `SET … PX`,
//!   `SET … NX PX`, `GETDEL`, and scripts for increment-with-expiry, set-if-greater and
//!   add-to-set-with-TTL. Every key gets a TTL in the same step that creates it.
//! - Every operation touches exactly one key, so Redis Cluster needs no hash tags: a script's
//!   single key decides its slot.
//! - Expiry is Redis's own (server time, `PX`), not the gateway's [`crate::clock::Clock`]: all
//!   gateways then agree on when a key is gone. Tests move time by sleeping.
//! - A dead or unreachable server answers with [`StoreError::Unavailable`] within
//!   `redis_connect_timeout + redis_response_timeout`; callers deny (fail closed). The
//!   connection manager reconnects by itself, so service resumes when Redis returns.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Script, Value};

use super::{EphemeralStore, StoreError, StoreResult};

mod channel;
pub use channel::{Channel, Notice, PING_EVERY};

/// URL scheme that selects Redis Cluster: `redis+cluster://[user:pass@]host1:port,host2:port`.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// URL scheme that selects Redis Cluster over TLS.
pub const TLS_CLUSTER_SCHEME: &str = "rediss+cluster://";

/// Where the Redis server (or cluster) is.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a proxy / failover endpoint): a `redis://` URL, or `rediss://` for TLS.
    Single(String),
    /// A cluster: one `redis://` (or `rediss://`) URL per seed node, sharing the credentials and
    /// database.
    Cluster(Vec<String>),
    /// A `rediss://` target whose server certificates are checked against this CA bundle (PEM)
    /// instead of the system's trusted roots (`storage.redis_tls_ca`).
    PrivateCa {
        target: Box<RedisTarget>,
        ca_pem: Vec<u8>,
    },
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single(u) => write!(f, "Single({})", crate::secret::redact_url(u)),
            Self::Cluster(us) => {
                let shown: Vec<String> = us.iter().map(|u| crate::secret::redact_url(u)).collect();
                write!(f, "Cluster({shown:?})")
            }
            Self::PrivateCa { target, .. } => write!(f, "PrivateCa({target:?})"),
        }
    }
}

impl RedisTarget {
    /// Parses `storage.ephemeral` when it names Redis; `None` when it does not (e.g. `memory`).
    /// Error messages never repeat the URL (it may hold a password).
    pub fn parse(url: &str) -> Option<Result<Self, String>> {
        if let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) {
            return Some(Self::parse_cluster(rest, "redis://"));
        }
        if let Some(rest) = url.strip_prefix(TLS_CLUSTER_SCHEME) {
            return Some(Self::parse_cluster(rest, "rediss://"));
        }
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return None;
        }
        Some(check_url(url).map(|()| Self::Single(url.to_string())))
    }

    /// Whether every connection of this target uses TLS.
    pub fn is_tls(&self) -> bool {
        match self {
            Self::Single(u) => u.starts_with("rediss://"),
            Self::Cluster(nodes) => nodes.iter().all(|u| u.starts_with("rediss://")),
            Self::PrivateCa { target, .. } => target.is_tls(),
        }
    }

    fn parse_cluster(rest: &str, node_scheme: &str) -> Result<Self, String> {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .map(|h| format!("{node_scheme}{userinfo}{}{tail}", h.trim()))
            .collect();
        if hosts.split(',').any(|h| h.trim().is_empty()) {
            return Err("a cluster URL lists seed nodes as host:port,host:port".into());
        }
        for n in &nodes {
            check_url(n)?;
        }
        Ok(Self::Cluster(nodes))
    }
}

fn check_url(url: &str) -> Result<(), String> {
    // The driver reads `#insecure` as "skip the server certificate's checks", which the
    // gateway never does (a private CA goes in `storage.redis_tls_ca`).
    if url.contains('#') {
        return Err(
            "a fragment (`#…`, such as `#insecure`) is not accepted: certificate checks \
                    cannot be skipped; for a private CA set storage.redis_tls_ca (a `#` in a \
                    password is written %23)"
                .into(),
        );
    }
    // The driver reads one option (`protocol`) and ignores every other: `?tls=true` or
    // `?ssl=1` would leave a plain connection that looks encrypted to whoever reads the config.
    if url.contains('?') {
        return Err(
            "options (`?…`) are not accepted: TLS is the rediss:// scheme (a private CA goes in \
             storage.redis_tls_ca), the database is the path (/0), the password is in the \
             address (redis://:password@host:6379/0; a `?` in it is written %3F)"
                .into(),
        );
    }
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| format!("not a valid Redis URL ({})", e.category()))
}

/// Connection settings for [`RedisStore::connect`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub target: RedisTarget,
    /// Prepended to every key (`portcullis:` by default), so gateways can share a server with
    /// other applications, and tests with each other.
    pub prefix: String,
    /// Longest wait for a TCP connection (and its handshake) to a node.
    pub connect_timeout: Duration,
    /// Longest wait for the answer to one command.
    pub response_timeout: Duration,
}

/// Either connection kind behind one interface.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Increments; the key gets its TTL when created (or if it somehow has none), never later, so
/// a window counted from the first failure is not stretched by later ones.
const INCR: &str = r"
local v = redis.call('INCR', KEYS[1])
if v == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return v
";

/// One more in this second's field of the hash KEYS[1], the second taken from the server's own
/// clock; fields older than ten seconds go when a new second starts.
const INCR_THIS_SECOND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1])
local n = redis.call('HINCRBY', KEYS[1], t[1], 1)
if n == 1 then
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(f) < now - 10 then redis.call('HDEL', KEYS[1], f) end
  end
  redis.call('PEXPIRE', KEYS[1], 20000)
end
return n
";

/// Stores ARGV[1] if it is greater than the stored decimal number. Numbers are compared as
/// digit strings: Lua numbers are doubles and cannot hold every u64.
const SET_IF_GREATER: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  if not string.match(cur, '^%d+$') then
    return redis.error_reply('ERR stored value is not a number')
  end
  cur = (string.gsub(cur, '^0+(%d)', '%1'))
  local new = ARGV[1]
  if #cur > #new or (#cur == #new and cur >= new) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Replaces the value with ARGV[2] (for ARGV[3] ms) only if it is ARGV[1] now.
const PUT_IF_UNCHANGED: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// The arguments of a script that takes none.
const NO_ARGS: [&[u8]; 0] = [];

/// Takes one back from an existing positive counter; never creates a key (a created key would
/// have no TTL).
const DECR: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]))
if cur and cur > 0 then
  redis.call('DECR', KEYS[1])
end
return 1
";

/// Adds a member and makes the set live at least ARGV[2] ms from now.
const SET_ADD: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SCARD', KEYS[1])
";

/// The Redis-backed ephemeral store.
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    /// Bound on one whole call, reconnection included: a dead Redis yields an error, not a hang.
    deadline: Duration,
    description: String,
    incr: Script,
    incr_this_second: Script,
    decr: Script,
    set_if_greater: Script,
    set_add: Script,
    put_if_unchanged: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.description)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisStore {
    /// Sets up the connection without waiting for the server: a gateway starts (and reports
    /// "not ready") while Redis is still down, and connects as soon as it answers.
    pub async fn connect(opts: RedisOptions) -> StoreResult<Self> {
        // TLS (`rediss://`) checks the server against the system's roots, or only against the
        // configured CA bundle.
        let (target, private_ca) = match &opts.target {
            RedisTarget::PrivateCa { target, ca_pem } => (&**target, Some(ca_pem)),
            t => (t, None),
        };
        let certs = |ca: &Vec<u8>| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        };
        let conn = match target {
            RedisTarget::PrivateCa { .. } => {
                return Err(StoreError::Unavailable("redis: nested CA settings".into()))
            }
            RedisTarget::Single(url) => {
                let client = node_client(url, private_ca)?;
                // Few, quick reconnection attempts: each failed call already answers 503, and
                // the next call starts a fresh attempt.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(opts.connect_timeout))
                    .set_response_timeout(Some(opts.response_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(200));
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, config)
                        .map_err(|e| fail("connect", &e))?,
                )
            }
            RedisTarget::Cluster(nodes) => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(opts.connect_timeout)
                    .response_timeout(opts.response_timeout)
                    .retries(1);
                if let Some(ca) = private_ca {
                    builder = builder.certs(certs(ca));
                }
                let client = builder.build().map_err(|e| fail("open cluster", &e))?;
                let connecting = client.get_async_connection();
                let conn =
                    tokio::time::timeout(opts.connect_timeout + opts.response_timeout, connecting)
                        .await
                        .map_err(|_| {
                            StoreError::Unavailable("redis cluster: connect timed out".into())
                        })?
                        .map_err(|e| {
                            if e.to_string().contains("cluster support disabled") {
                                // A single server named as a cluster: say which setting is off.
                                StoreError::Unavailable(
                                    "storage.ephemeral names a cluster (redis+cluster://) but \
                                     the Redis server is not one (its cluster support is \
                                     disabled): use redis:// (or rediss://) for a single server"
                                        .into(),
                                )
                            } else {
                                fail("connect cluster", &e)
                            }
                        })?;
                Conn::Cluster(conn)
            }
        };
        Ok(Self {
            conn,
            prefix: opts.prefix.clone(),
            deadline: opts.connect_timeout + opts.response_timeout,
            description: format!("{:?}", opts.target),
            incr: Script::new(INCR),
            incr_this_second: Script::new(INCR_THIS_SECOND),
            decr: Script::new(DECR),
            set_if_greater: Script::new(SET_IF_GREATER),
            set_add: Script::new(SET_ADD),
            put_if_unchanged: Script::new(PUT_IF_UNCHANGED),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs one command under the overall deadline.
    /// `SET key value <condition> PX ttl` (`NX`: only if absent, `XX`: only if present); true
    /// when stored.
    async fn set_if(
        &self,
        what: &str,
        condition: &str,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> StoreResult<bool> {
        let cmd = redis::cmd("SET")
            .arg(self.key(key))
            .arg(value)
            .arg(condition)
            .arg("PX")
            .arg(millis(ttl))
            .to_owned();
        let stored: Option<String> = self.run(what, &cmd).await?;
        Ok(stored.is_some())
    }

    async fn run<T: redis::FromRedisValue>(&self, what: &str, cmd: &Cmd) -> StoreResult<T> {
        self.bounded(what, || {
            let mut conn = self.conn.clone();
            async move { cmd.query_async(&mut conn).await }
        })
        .await
    }

    /// Runs one script on one key under the overall deadline.
    async fn script<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &Script,
        key: &str,
        args: &[impl redis::ToRedisArgs],
    ) -> StoreResult<T> {
        let mut call = script.key(self.key(key));
        for a in args {
            call.arg(a);
        }
        let call = &call;
        self.bounded(what, || {
            let mut conn = self.conn.clone();
            async move { call.invoke_async(&mut conn).await }
        })
        .await
    }

    /// Runs `attempt` under the overall deadline. A connection found dropped (Redis restarted
    /// since the last call: the old connection's first write fails) is tried once more, on the
    /// connection the manager has opened meanwhile, for operations that may run twice with the
    /// same effect ([`RETRIED`]); without that, the first call after every restart of Redis
    /// answered 503 although Redis was back. The others (counters, one-time takes, `SET NX`)
    /// may have run before the reply was lost, so they fail as before (closed). A refused
    /// connection sent nothing, so any call is tried once more: the manager hands the first
    /// call after an outage the refusal of its last attempt during it, and only then connects
    /// again (without this, the first call after Redis came back answered 503).
    async fn bounded<T, F, Fut>(&self, what: &str, mut attempt: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let single = matches!(self.conn, Conn::Single(_));
        let retry = single && RETRIED.contains(&what);
        let tries = async {
            match attempt().await {
                Err(e) if single && e.is_connection_refusal() => {
                    tracing::debug!(what, "redis connection refused; trying once more");
                    attempt().await
                }
                Err(e) if retry && e.is_connection_dropped() => {
                    tracing::debug!(what, "redis connection dropped; trying once more");
                    attempt().await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.deadline, tries).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(fail(what, &e)),
            Err(_) => Err(StoreError::Unavailable(format!("redis {what}: timed out"))),
        }
    }
}

/// Operations tried once more on a dropped connection (see `RedisStore::bounded`): those that
/// leave the same state however often they run, and the counters `incr` and `incr_this_second`,
/// whose second run (if the first did reach Redis) only counts one attempt more, which errs on
/// the closed side.
const RETRIED: [&str; 11] = [
    "incr",
    "incr_this_second",
    "ping",
    "get",
    "put",
    "put_if_present",
    // Run twice, the second finds its own write and stores nothing: the caller reads again.
    "put_if_unchanged",
    "delete",
    "set_add",
    "set_remove",
    "set_members",
];

/// A client for one server (or cluster node) URL, trusting `private_ca` alone when given.
fn node_client(url: &str, private_ca: Option<&Vec<u8>>) -> StoreResult<redis::Client> {
    match private_ca {
        Some(ca) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            },
        ),
        None => redis::Client::open(url),
    }
    .map_err(|e| fail("open", &e))
}

/// TTL in milliseconds as Redis wants it (at least 1: `PX 0` is an error, and a zero TTL means
/// "gone at once" as in the memory store).
fn millis(ttl: Duration) -> String {
    ttl.as_millis().clamp(1, i64::MAX as u128).to_string()
}

/// Maps a Redis error: a wrong type or a script refusal means the stored data is not what the
/// caller expects; anything else (connection, timeout, cluster down, loading) is unavailability.
/// Either way the caller denies.
fn fail(what: &str, e: &RedisError) -> StoreError {
    let msg = match e.category() {
        "" => format!("redis {what}"),
        category => format!("redis {what}: {category}"),
    };
    match e.code() {
        Some("WRONGTYPE") => StoreError::Corrupt(format!("{msg}: wrong kind of value")),
        // The server refused the command (a database number out of range, a script's error):
        // not data found damaged.
        Some("ERR") => StoreError::Unavailable(format!(
            "{msg}: the server refused it: {}",
            e.detail().unwrap_or("")
        )),
        _ => StoreError::Unavailable(format!("{msg}: {e}")),
    }
}

impl RedisStore {
    /// `PING` answered (after the connection's own `AUTH` and `SELECT`): the server is there
    /// and takes the configured user and database. Writes nothing.
    pub async fn answers(&self) -> StoreResult<()> {
        let pong: String = self.run("ping", &redis::cmd("PING")).await?;
        if pong != "PONG" {
            return Err(StoreError::Unavailable(format!(
                "redis ping: unexpected answer {pong:?}"
            )));
        }
        Ok(())
    }

    /// Readiness past `PING`: every kind of command the gateway sends, each once, on keys under
    /// the prefix (short-lived). A server that answers but refuses some of them (an ACL missing
    /// a command or scripting, keys outside the user's pattern) is not ready: it would refuse
    /// sign-ins, or some step of them, with 503.
    async fn serves_scripts(&self) -> StoreResult<()> {
        let (key, set) = ("ready", "ready:set");
        self.put(key, b"1", READY_PROBE_TTL).await?;
        self.get(key).await?;
        self.put_if_present(key, b"2", READY_PROBE_TTL).await?;
        self.take(key).await?;
        self.incr(key, READY_PROBE_TTL).await?;
        self.decr(key).await?;
        self.set_if_greater(key, 1, READY_PROBE_TTL).await?;
        self.delete(key).await?;
        self.put_if_absent(key, b"1", READY_PROBE_TTL).await?;
        self.set_add(set, "probe", READY_PROBE_TTL).await?;
        self.set_members(set).await?;
        self.set_remove(set, "probe").await?;
        self.incr_this_second("ready:second").await?;
        self.server_time_ms().await.map(drop)
    }
}

/// How long the readiness probe's counter lives.
const READY_PROBE_TTL: Duration = Duration::from_secs(10);

#[async_trait]
impl EphemeralStore for RedisStore {
    async fn ping(&self) -> StoreResult<()> {
        // A cluster's nodes answer PING while the cluster serves nothing (`CLUSTERDOWN` once a
        // master is lost without a replica to take over): ask for the cluster's own state.
        if matches!(self.conn, Conn::Cluster(_)) {
            let info: String = self
                .run("cluster info", redis::cmd("CLUSTER").arg("INFO"))
                .await?;
            return if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                self.serves_scripts().await
            } else {
                Err(StoreError::Unavailable(
                    "redis cluster: cluster_state is not ok".into(),
                ))
            };
        }
        self.answers().await?;
        self.serves_scripts().await
    }

    async fn server_time_ms(&self) -> StoreResult<Option<i64>> {
        let (secs, micros): (i64, i64) = self.run("time", &redis::cmd("TIME")).await?;
        Ok(Some(secs * 1000 + micros / 1000))
    }

    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.run("get", redis::cmd("GET").arg(self.key(key))).await
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<()> {
        let cmd = redis::cmd("SET")
            .arg(self.key(key))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .to_owned();
        self.run::<()>("put", &cmd).await
    }

    async fn put_if_absent(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        self.set_if("put_if_absent", "NX", key, value, ttl).await
    }

    async fn put_if_present(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        self.set_if("put_if_present", "XX", key, value, ttl).await
    }

    async fn put_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> StoreResult<bool> {
        let ttl = millis(ttl);
        let args = [expected, value, ttl.as_bytes()];
        let stored: i64 = self
            .script("put_if_unchanged", &self.put_if_unchanged, key, &args)
            .await?;
        Ok(stored == 1)
    }

    async fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.run("take", redis::cmd("GETDEL").arg(self.key(key)))
            .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.run::<()>("delete", redis::cmd("DEL").arg(self.key(key)))
            .await
    }

    async fn incr(&self, key: &str, ttl: Duration) -> StoreResult<u64> {
        let n: i64 = self.script("incr", &self.incr, key, &[millis(ttl)]).await?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt("redis incr: negative counter".into()))
    }

    async fn incr_this_second(&self, key: &str) -> StoreResult<u64> {
        let n: i64 = self
            .script("incr_this_second", &self.incr_this_second, key, &NO_ARGS)
            .await?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt("redis incr: negative counter".into()))
    }

    async fn decr(&self, key: &str) -> StoreResult<()> {
        self.script::<i64>("decr", &self.decr, key, &NO_ARGS)
            .await?;
        Ok(())
    }

    async fn set_if_greater(&self, key: &str, value: u64, ttl: Duration) -> StoreResult<bool> {
        let args = [value.to_string(), millis(ttl)];
        let stored: i64 = self
            .script("set_if_greater", &self.set_if_greater, key, &args)
            .await?;
        Ok(stored == 1)
    }

    async fn set_add(&self, key: &str, member: &str, ttl: Duration) -> StoreResult<u64> {
        let args = [member.to_string(), millis(ttl)];
        self.script::<u64>("set_add", &self.set_add, key, &args)
            .await
    }

    async fn set_remove(&self, key: &str, member: &str) -> StoreResult<()> {
        let cmd = redis::cmd("SREM").arg(self.key(key)).arg(member).to_owned();
        self.run::<()>("set_remove", &cmd).await
    }

    async fn set_members(&self, key: &str) -> StoreResult<Vec<String>> {
        self.run("set_members", redis::cmd("SMEMBERS").arg(self.key(key)))
            .await
    }
}

#[cfg(test)]
mod tests;
