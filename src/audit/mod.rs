//! The audit trail: who did what, when, from where, with what outcome and why. Events are handed
//! to a background writer so the request path never waits on the database; [`Audit::flush`]
//! waits until everything recorded so far is durable (used at shutdown and by tests).
//! An event never carries a password, code, secret or token — only the reason for a decision.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::store::{AuditEvent, DurableStore};

/// Events waiting for the writer; beyond this, recording waits (back-pressure).
const QUEUE: usize = 8192;
/// How long recording waits for room in a full queue before the event is given up. Only a
/// durable store away for a long time under a stream of events (a flood of refused sign-ins
/// during a database outage) fills the queue; without a bound every request that records an
/// event would hang with it, holding its connection and memory.
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Events written per transaction at most.
const BATCH: usize = 256;
/// How long the writer waits for more events to join a batch (not when a flush waits).
const LINGER: Duration = Duration::from_millis(5);

enum Msg {
    Event(Box<AuditEvent>),
    Flush(oneshot::Sender<()>),
}

/// Handle for recording audit events.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    /// See [`QUEUE_WAIT`].
    wait: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Event(e) => write!(f, "Event({})", e.event),
            Msg::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Audit {
    /// Starts the writer task on the current runtime.
    pub fn start(durable: Arc<dyn DurableStore>, metrics: Arc<Metrics>) -> Self {
        Self::start_with(durable, metrics, QUEUE, QUEUE_WAIT)
    }

    fn start_with(
        durable: Arc<dyn DurableStore>,
        metrics: Arc<Metrics>,
        queue: usize,
        wait: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue);
        tokio::spawn(writer(durable, rx));
        Self { tx, wait, metrics }
    }

    /// Records an event. Waits if the queue is full, for at most [`QUEUE_WAIT`]; then the event
    /// is given up (it is in the log line written here), with an error logged and counted
    /// (`portcullis_audit_events_dropped_total`).
    pub async fn record(&self, event: AuditEvent) {
        tracing::info!(
            target: "portcullis::audit",
            event = %event.event,
            outcome = %event.outcome,
            user_id = event.user_id.as_deref().unwrap_or("-"),
            ip = event.ip.as_deref().unwrap_or("-"),
            reason = event.reason.as_deref().unwrap_or("-"),
            "audit"
        );
        let name = event.event.clone();
        match tokio::time::timeout(self.wait, self.tx.send(Msg::Event(Box::new(event)))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!(event = %name, "audit writer has stopped; event lost"),
            Err(_) => {
                self.metrics.audit_dropped();
                tracing::error!(
                    event = %name,
                    "audit queue full (the durable store is not taking events): event given up; \
                     it is in the log line above"
                );
            }
        }
    }

    /// Waits until every event recorded before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// [`Audit::flush`], waiting at most `limit` (shutdown: a database that stays down must not
    /// keep the process from ending). False, with an error logged, when events were still
    /// unwritten at the limit; they are lost when the process exits.
    pub async fn flush_within(&self, limit: Duration) -> bool {
        if tokio::time::timeout(limit, self.flush()).await.is_ok() {
            return true;
        }
        tracing::error!(
            ?limit,
            "audit events could not be written before shutdown: the durable store did not take \
             them in time; the events still queued are lost"
        );
        false
    }
}

async fn writer(durable: Arc<dyn DurableStore>, mut rx: mpsc::Receiver<Msg>) {
    let mut batch: Vec<AuditEvent> = Vec::with_capacity(BATCH);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut lingered = false;
        loop {
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => batch.push(*e),
                    Msg::Flush(w) => waiters.push(w),
                }
                if batch.len() < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            // Events come in streams (a sign-in, a flood of refused guesses): waiting a moment
            // for the rest of one writes it in one transaction instead of many. Not when
            // somebody waits for the write (a flush) or the batch is full already.
            if lingered || !waiters.is_empty() || batch.len() >= BATCH {
                break;
            }
            lingered = true;
            tokio::time::sleep(LINGER).await;
            next = rx.try_recv().ok();
            if next.is_none() {
                break;
            }
        }
        // A database outage must not drop events: retry with back-off until written.
        let mut delay = Duration::from_millis(100);
        while !batch.is_empty() {
            match durable.append_audit(&batch).await {
                Ok(()) => batch.clear(),
                Err(e) => {
                    tracing::error!(error = %e, pending = batch.len(), "audit write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Builder-style constructors keep call sites short and uniform.
impl AuditEvent {
    /// A new event at `at` (Unix seconds).
    pub fn new(event: &str, outcome: &str, at: i64) -> Self {
        Self {
            id: 0,
            at,
            event: event.to_string(),
            outcome: outcome.to_string(),
            user_id: None,
            email: None,
            account_id: None,
            ip: None,
            user_agent: None,
            reason: None,
            actor: None,
        }
    }

    pub fn user(mut self, u: &crate::store::User) -> Self {
        self.user_id = Some(u.id.clone());
        self.email = Some(u.email.clone());
        self.account_id = Some(u.account_id.clone());
        self
    }

    pub fn email(mut self, email: &str) -> Self {
        self.email = Some(email.chars().take(320).collect());
        self
    }

    pub fn client(mut self, ip: &str, user_agent: &str) -> Self {
        self.ip = Some(ip.to_string());
        self.user_agent = Some(user_agent.chars().take(512).collect());
        self
    }

    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_string());
        self
    }

    pub fn actor(mut self, actor: &str) -> Self {
        self.actor = Some(actor.to_string());
        self
    }
}

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::store::sql::SqlStore;
    use crate::store::AuditQuery;

    async fn store(dir: &tempfile::TempDir) -> (Arc<SqlStore>, String) {
        let url = format!("sqlite://{}", dir.path().join("audit.sqlite").display());
        let store = SqlStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        (Arc::new(store), url)
    }

    /// A store whose audit table has disappeared under the writer: every write fails, and is
    /// retried.
    async fn broken_store(dir: &tempfile::TempDir) -> Arc<SqlStore> {
        let (store, url) = store(dir).await;
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::query("DROP TABLE audit_events")
            .execute(&mut conn)
            .await
            .unwrap();
        store
    }

    fn event() -> AuditEvent {
        AuditEvent::new(
            "login_password",
            "failure",
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )
    }

    #[tokio::test]
    async fn a_flush_within_its_limit_writes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store(&dir).await;
        let audit = Audit::start(store.clone(), Arc::new(Metrics::new()));
        audit.record(event()).await;
        assert!(audit.flush_within(Duration::from_secs(10)).await);
        let q = AuditQuery {
            limit: 10,
            ..AuditQuery::default()
        };
        assert_eq!(store.query_audit(&q).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_store_that_cannot_take_events_does_not_hold_shutdown_forever() {
        let dir = tempfile::tempdir().unwrap();
        let store = broken_store(&dir).await;
        let audit = Audit::start(store, Arc::new(Metrics::new()));
        audit.record(event()).await;
        let started = std::time::Instant::now();
        assert!(!audit.flush_within(Duration::from_millis(300)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_queue_that_stays_full_gives_events_up_instead_of_holding_requests() {
        let dir = tempfile::tempdir().unwrap();
        let store = broken_store(&dir).await;
        let metrics = Arc::new(Metrics::new());
        let audit = Audit::start_with(store, metrics.clone(), 4, Duration::from_millis(5));
        let recorded = tokio::time::timeout(Duration::from_secs(10), async {
            // More than the writer's batch and the queue together hold.
            for _ in 0..(BATCH + 20) {
                audit.record(event()).await;
            }
        })
        .await;
        assert!(recorded.is_ok(), "recording held the caller");
        let hasher = crate::auth::password::PasswordHasher::new(&crate::config::PasswordConfig {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            ..Default::default()
        })
        .unwrap();
        let text = metrics.render(&hasher).unwrap();
        let dropped: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("portcullis_audit_events_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter in\n{text}"));
        // At least those beyond a full batch and a full queue; how many more depends on how
        // many the writer had taken when its first write failed.
        assert!(
            (1.0..=(BATCH + 20) as f64).contains(&dropped),
            "{dropped} given up"
        );
    }
}
