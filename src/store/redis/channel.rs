//! The invalidation channel: Redis pub/sub on `<prefix>invalidate`, through which gateways tell
//! each other to drop what they cached about a session or a user.
//!
//! - Publishing uses its own lazily connected `ConnectionManager` (one `PUBLISH`, bounded like
//!   every store call).
//! - Receiving runs in one task per gateway on a dedicated pub/sub connection. It reports
//!   [`Notice::Up`] once `SUBSCRIBE` is confirmed and [`Notice::Down`] as soon as the connection
//!   ends, fails a `PING` (sent every [`PING_EVERY`], which also finds half-open connections) or
//!   cannot be made; then it connects again by itself, trying the nodes in turn on a cluster
//!   (cluster pub/sub reaches every node).
//! - The task ends when its receiver says so (the owner is gone).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{fail, node_client, RedisOptions, RedisTarget};
use crate::store::{StoreError, StoreResult};

/// How often an idle subscription is checked with `PING`.
pub const PING_EVERY: Duration = Duration::from_secs(2);
/// First wait before connecting again after a failure; it doubles up to [`RETRY_MAX`] while
/// attempts keep failing.
const RETRY_AFTER: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_millis(3200);
/// How often a subscription Redis goes on refusing is warned about again (tried every
/// [`RETRY_MAX`] meanwhile, logged at debug level).
const REFUSED_WARN_EVERY: Duration = Duration::from_secs(600);

/// How one subscription ended.
enum Ended {
    /// It was up and broke.
    Lost,
    /// It could not be made.
    Failed,
    /// Redis answered and refused it (its ACL): a configuration error, warned about at first
    /// and then once every [`REFUSED_WARN_EVERY`].
    Refused(String),
    /// The owner is gone.
    Stop,
}

/// What the receiving task tells its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// Subscribed: from now on every message published reaches this gateway.
    Up,
    /// The subscription is gone (or could not be made): messages may be missed until `Up`.
    Down,
    /// A message published by some gateway (this one included).
    Message(&'a str),
    /// Nothing happened for a while; lets the owner say whether it still wants messages.
    Idle,
}

/// Both ends of the channel for one gateway.
pub struct Channel {
    clients: Vec<redis::Client>,
    publisher: ConnectionManager,
    name: String,
    deadline: Duration,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("name", &self.name).finish()
    }
}

impl Channel {
    /// Sets up the channel for the Redis deployment in `opts`; connects lazily.
    pub fn new(opts: &RedisOptions) -> StoreResult<Self> {
        let (target, ca) = match &opts.target {
            RedisTarget::PrivateCa { target, ca_pem } => (&**target, Some(ca_pem)),
            t => (t, None),
        };
        let urls = match target {
            RedisTarget::Single(u) => vec![u.clone()],
            RedisTarget::Cluster(nodes) => nodes.clone(),
            RedisTarget::PrivateCa { .. } => {
                return Err(StoreError::Unavailable("redis: nested CA settings".into()))
            }
        };
        let clients = urls
            .iter()
            .map(|u| node_client(u, ca))
            .collect::<StoreResult<Vec<_>>>()?;
        let first = clients
            .first()
            .cloned()
            .ok_or_else(|| StoreError::Unavailable("redis: no node to publish to".into()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let publisher = ConnectionManager::new_lazy_with_config(first, config)
            .map_err(|e| fail("connect", &e))?;
        Ok(Self {
            clients,
            publisher,
            name: format!("{}invalidate", opts.prefix),
            deadline: opts.connect_timeout + opts.response_timeout,
        })
    }

    /// Publishes one message to every gateway.
    pub async fn publish(&self, message: &str) -> StoreResult<()> {
        let mut conn = self.publisher.clone();
        let cmd = redis::cmd("PUBLISH")
            .arg(&self.name)
            .arg(message)
            .to_owned();
        // A connection dropped while idle (Redis restarted, or its idle `timeout` closed it) is
        // found by the first write: the message goes once more, on the connection opened
        // meanwhile (a message twice does no harm), rather than the announcement being lost; so
        // does one refused with the last reconnection attempt of an outage that has ended.
        let tries = async {
            match cmd.query_async::<i64>(&mut conn).await {
                Err(e) if e.is_connection_dropped() || e.is_connection_refusal() => {
                    tracing::debug!("redis connection dropped; publishing once more");
                    cmd.query_async::<i64>(&mut conn).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.deadline, tries).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(fail("publish", &e)),
            Err(_) => Err(StoreError::Unavailable("redis publish: timed out".into())),
        }
    }

    /// Starts the receiving task. `on` gets every notice and returns `false` to end the task.
    pub fn subscribe(self: &Arc<Self>, on: impl Fn(Notice<'_>) -> bool + Send + Sync + 'static) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut node = 0;
            let mut wait = RETRY_AFTER;
            let mut warned: Option<tokio::time::Instant> = None;
            loop {
                let client = &me.clients[node % me.clients.len()];
                match me.receive(client, &on).await {
                    Ended::Stop => return,
                    Ended::Lost => wait = RETRY_AFTER,
                    Ended::Failed => {}
                    Ended::Refused(error) => {
                        let now = tokio::time::Instant::now();
                        if warned.is_none_or(|at| now - at >= REFUSED_WARN_EVERY) {
                            warned = Some(now);
                            tracing::warn!(%error, "invalidation channel refused by Redis; every request reads Redis until it is allowed (said again every 10 minutes while it lasts)");
                        } else {
                            tracing::debug!(%error, "invalidation channel refused by Redis");
                        }
                    }
                }
                if !on(Notice::Down) {
                    return;
                }
                node += 1;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        });
    }

    /// One subscription, until it breaks or the owner is gone. Failures to connect are logged
    /// at debug level (the store's own calls report an outage); losing a working subscription
    /// is a warning.
    async fn receive(&self, client: &redis::Client, on: &impl Fn(Notice<'_>) -> bool) -> Ended {
        let connected = tokio::time::timeout(self.deadline, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&self.name).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            // A server that answers and refuses (an ACL without `SUBSCRIBE` on the channel) is
            // the configuration's fault, said as a warning: the channel would never work.
            Ok(Err(e)) if !(e.is_io_error() || e.is_connection_refusal() || e.is_timeout()) => {
                return Ended::Refused(fail("subscribe", &e).to_string());
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %fail("subscribe", &e), "invalidation channel unavailable");
                return Ended::Failed;
            }
            Err(_) => {
                tracing::debug!("invalidation channel unavailable: subscribe timed out");
                return Ended::Failed;
            }
        };
        if !on(Notice::Up) {
            return Ended::Stop;
        }
        tracing::info!(channel = %self.name, "invalidation channel subscribed");
        let (mut sink, mut stream) = pubsub.split();
        loop {
            let next = tokio::time::timeout(PING_EVERY, stream.next()).await;
            match next {
                Ok(Some(msg)) => {
                    let Ok(text) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if !on(Notice::Message(&text)) {
                        return Ended::Stop;
                    }
                }
                Ok(None) => {
                    tracing::warn!("invalidation channel lost; reconnecting");
                    return Ended::Lost;
                }
                Err(_) => {
                    if !on(Notice::Idle) {
                        return Ended::Stop;
                    }
                    let ping = tokio::time::timeout(self.deadline, sink.ping::<redis::Value>());
                    if !matches!(ping.await, Ok(Ok(_))) {
                        tracing::warn!("invalidation channel does not answer; reconnecting");
                        return Ended::Lost;
                    }
                }
            }
        }
    }
}
