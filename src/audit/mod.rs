//! The audit trail: who did what, when, from where, with what outcome and why. Events are handed
//! to a background writer so the request path never waits on the database; [`Audit::flush`]
//! waits until everything recorded so far is durable (used at shutdown and by tests).
//! An event never carries a password, code, secret or token — only the reason for a decision.
//!
//! Refusals an attacker can repeat at will and without limit (a flood of throttled sign-in
//! attempts, a half-signed-in session asking for the console, a non-admin asking for the admin
//! console) are recorded with [`Audit::record_repeated`]: the first of a run is written as it
//! comes, the rest of the run as one summary row a minute, so a flood cannot fill the database
//! with millions of rows an hour. Every attempt still has its log line. They go by a queue of
//! their own, so that a flood while the database is away cannot crowd out the events that must
//! not be lost.

use std::sync::atomic::{AtomicBool, Ordering};
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
/// How long a run of repeated events lasts: its first event is written at once, the ones after
/// it within this time as one summary when it ends.
const RUN: Duration = Duration::from_secs(60);
/// Runs followed at once at most; past that, a new key joins the one overflow run of its kind of
/// event, so memory stays bounded whatever the attacker varies.
const MAX_RUNS: usize = 10_000;

enum Msg {
    Event(Box<AuditEvent>),
    Repeated(String, Box<AuditEvent>),
    /// Answered once everything before it is written; with `true`, the summaries of the runs
    /// open then too.
    Flush(oneshot::Sender<()>, bool),
}

/// Handle for recording audit events.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    /// Repeated refusals, on a queue of their own: while the durable store is away a flood fills
    /// this one, not the one of the events that must not be lost.
    repeats: mpsc::Sender<Msg>,
    /// See [`QUEUE_WAIT`].
    wait: Duration,
    metrics: Arc<Metrics>,
    /// Set when shutdown gave up on the events still queued ([`Audit::flush_within`]): the
    /// writer stops retrying them, and says nothing more of them.
    given_up: Arc<AtomicBool>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Event(e) => write!(f, "Event({})", e.event),
            Msg::Repeated(run, e) => write!(f, "Repeated({run}, {})", e.event),
            Msg::Flush(_, runs) => write!(f, "Flush({runs})"),
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
        Self::start_runs(durable, metrics, queue, wait, RUN)
    }

    fn start_runs(
        durable: Arc<dyn DurableStore>,
        metrics: Arc<Metrics>,
        queue: usize,
        wait: Duration,
        run: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue);
        let (repeats, repeated) = mpsc::channel(queue);
        let given_up = Arc::new(AtomicBool::new(false));
        let store = Writing {
            durable,
            given_up: given_up.clone(),
        };
        tokio::spawn(writer(store, rx, repeated, run));
        Self {
            tx,
            repeats,
            wait,
            metrics,
            given_up,
        }
    }

    /// Records an event. Waits if the queue is full, for at most [`QUEUE_WAIT`]; then the event
    /// is given up (it is in the log line written here), with an error logged and counted
    /// (`portcullis_audit_events_dropped_total`).
    pub async fn record(&self, event: AuditEvent) {
        self.send(event, |e| Msg::Event(Box::new(e))).await;
    }

    /// Records a refusal that may come again and again: events with the same `run` key (say the
    /// throttling counter that refused them) within a minute of the first are one run. The
    /// first is written as [`Audit::record`] writes it; the others of the run as one summary
    /// event when the run ends (or at [`Audit::flush`]), with `times` = how many, the time of the
    /// last, and empty fields where they differed (the accounts of a flood from one address,
    /// the addresses of a flood against one account). Each still has its log line here.
    ///
    /// Never waits: with the queue of repeats full (the durable store away under a flood) the
    /// event is given up at once, counted in `portcullis_audit_events_dropped_total`; its log
    /// line stays.
    pub async fn record_repeated(&self, run: String, event: AuditEvent) {
        // Logged by the writer as the trail has it: the run's first event, then its summary. A
        // flood beyond every budget writes a line per run, not per attempt.
        // One run per event and outcome, whatever the caller's key.
        let run = format!("{}\0{}\0{run}", event.event, event.outcome);
        match self.repeats.try_send(Msg::Repeated(run, Box::new(event))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.metrics.audit_dropped(),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit writer has stopped; event lost");
            }
        }
    }

    fn log(event: &AuditEvent) {
        tracing::info!(
            target: "portcullis::audit",
            event = %event.event,
            outcome = %event.outcome,
            user_id = event.user_id.as_deref().unwrap_or("-"),
            email = event.email.as_deref().unwrap_or("-"),
            ip = event.ip.as_deref().unwrap_or("-"),
            reason = event.reason.as_deref().unwrap_or("-"),
            times = event.times,
            "audit"
        );
    }

    async fn send(&self, event: AuditEvent, msg: impl FnOnce(AuditEvent) -> Msg) {
        Self::log(&event);
        let name = event.event.clone();
        match tokio::time::timeout(self.wait, self.tx.send(msg(event))).await {
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

    /// Waits until every event recorded before this call is written, the summaries of open
    /// runs included (which ends those runs: shutdown, tests).
    pub async fn flush(&self) {
        self.written(true).await;
    }

    /// Waits until every event recorded before this call is written, but for the repeats that
    /// open runs still hold: those runs go on. For a page that lists what was just recorded,
    /// so that asking for it again and again cannot cut the runs of a flood short.
    pub async fn catch_up(&self) {
        self.written(false).await;
    }

    async fn written(&self, with_runs: bool) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done, with_runs)).await.is_ok() {
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
        self.given_up.store(true, Ordering::Relaxed);
        tracing::error!(
            ?limit,
            "audit events could not be written before shutdown: the durable store did not take \
             them in time; the events still queued are lost"
        );
        false
    }
}

/// The runs of repeated events the writer follows (see [`Audit::record_repeated`]).
struct Runs {
    length: Duration,
    /// [`MAX_RUNS`] but in tests.
    max: usize,
    open: crate::CacheMap<Run>,
    /// When each run opened ends, in the order they opened (all last as long, so the soonest
    /// to end is at the front). An entry whose run was closed early stays until its time and
    /// is passed over then.
    ends: std::collections::VecDeque<(tokio::time::Instant, String)>,
}

struct Run {
    ends: tokio::time::Instant,
    /// The repeats after the first, merged; `None` until there is one.
    summary: Option<AuditEvent>,
}

impl Runs {
    fn new(length: Duration, max: usize) -> Self {
        Self {
            length,
            max,
            open: crate::CacheMap::default(),
            ends: std::collections::VecDeque::new(),
        }
    }

    /// Takes a repeated event: into `batch` if it opens a run, into its run's summary if not.
    /// With `max` runs open, a new key joins the one overflow run of its kind of event (event,
    /// outcome, reason) instead: an attacker who varies the key past the bound gets one run,
    /// not a row per attempt.
    fn take(&mut self, mut key: String, event: AuditEvent, batch: &mut Vec<AuditEvent>) {
        let now = tokio::time::Instant::now();
        if self.open.len() >= self.max && !self.open.contains_key(&key) {
            key = format!(
                "\0overflow\0{}\0{}\0{}",
                event.event,
                event.outcome,
                event.reason.as_deref().unwrap_or_default()
            );
        }
        if let Some(run) = self.open.get_mut(&key) {
            if now < run.ends {
                match &mut run.summary {
                    Some(s) => s.absorb(event),
                    None => run.summary = Some(event),
                }
                return;
            }
            if let Some(s) = self.open.remove(&key).and_then(|r| r.summary) {
                Audit::log(&s);
                batch.push(s);
            }
        }
        let ends = now + self.length;
        self.ends.push_back((ends, key.clone()));
        self.open.insert(
            key,
            Run {
                ends,
                summary: None,
            },
        );
        Audit::log(&event);
        batch.push(event);
    }

    /// [`Runs::take`] for every repeat waiting on its queue.
    fn take_queued(&mut self, repeated: &mut mpsc::Receiver<Msg>, batch: &mut Vec<AuditEvent>) {
        while let Ok(Msg::Repeated(key, e)) = repeated.try_recv() {
            self.take(key, *e, batch);
        }
    }

    /// Ends the runs that are over by `now`, their summaries into `batch`.
    fn close_due(&mut self, batch: &mut Vec<AuditEvent>, now: tokio::time::Instant) {
        while let Some((ends, _)) = self.ends.front() {
            if *ends > now {
                return;
            }
            let Some((ends, key)) = self.ends.pop_front() else {
                return;
            };
            if self.open.get(&key).is_some_and(|r| r.ends == ends) {
                if let Some(s) = self.open.remove(&key).and_then(|r| r.summary) {
                    Audit::log(&s);
                    batch.push(s);
                }
            }
        }
    }

    /// Ends every run, their summaries into `batch`.
    fn close_all(&mut self, batch: &mut Vec<AuditEvent>) {
        for s in self.open.drain().filter_map(|(_, r)| r.summary) {
            Audit::log(&s);
            batch.push(s);
        }
        self.ends.clear();
    }

    /// When the soonest-ending run ends.
    fn next_end(&self) -> Option<tokio::time::Instant> {
        self.ends.front().map(|(ends, _)| *ends)
    }
}

impl AuditEvent {
    /// Merges a later event of the same run into this summary.
    fn absorb(&mut self, later: AuditEvent) {
        fn keep_if_same(mine: &mut Option<String>, theirs: Option<String>) {
            if *mine != theirs {
                *mine = None;
            }
        }
        self.times += later.times;
        self.at = self.at.max(later.at);
        keep_if_same(&mut self.user_id, later.user_id);
        keep_if_same(&mut self.email, later.email);
        keep_if_same(&mut self.account_id, later.account_id);
        keep_if_same(&mut self.ip, later.ip);
        keep_if_same(&mut self.user_agent, later.user_agent);
        keep_if_same(&mut self.reason, later.reason);
        keep_if_same(&mut self.actor, later.actor);
    }
}

async fn writer(
    store: Writing,
    mut rx: mpsc::Receiver<Msg>,
    mut repeated: mpsc::Receiver<Msg>,
    run: Duration,
) {
    let mut batch: Vec<AuditEvent> = Vec::with_capacity(BATCH);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    // Whether one of the waiters asked for the runs' summaries too.
    let mut close_runs = false;
    let mut runs = Runs::new(run, MAX_RUNS);
    loop {
        // Wait for the next message (the events that must not be lost first), or for the
        // soonest run to end.
        let end = runs.next_end();
        let first = tokio::select! {
            biased;
            m = rx.recv() => m,
            Some(m) = repeated.recv() => Some(m),
            () = sleep_until(end) => {
                runs.close_due(&mut batch, tokio::time::Instant::now());
                store.write(&mut batch).await;
                continue;
            }
        };
        let Some(first) = first else {
            // Every handle is gone: what the runs and the queue of repeats hold is still written.
            runs.take_queued(&mut repeated, &mut batch);
            runs.close_all(&mut batch);
            store.write(&mut batch).await;
            return;
        };
        let mut next = Some(first);
        let mut lingered = false;
        loop {
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => batch.push(*e),
                    Msg::Repeated(key, e) => runs.take(key, *e, &mut batch),
                    Msg::Flush(w, with_runs) => {
                        waiters.push(w);
                        close_runs |= with_runs;
                        // The repeats recorded before the flush are on the other queue.
                        runs.take_queued(&mut repeated, &mut batch);
                    }
                }
                if batch.len() < BATCH {
                    next = rx.try_recv().or_else(|_| repeated.try_recv()).ok();
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
            next = rx.try_recv().or_else(|_| repeated.try_recv()).ok();
            if next.is_none() {
                break;
            }
        }
        // A flush writes what the runs hold too; their next repeats open new runs.
        if close_runs {
            runs.close_all(&mut batch);
            close_runs = false;
        } else {
            runs.close_due(&mut batch, tokio::time::Instant::now());
        }
        store.write(&mut batch).await;
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Sleeps until `end`; with none, never ends.
async fn sleep_until(end: Option<tokio::time::Instant>) {
    match end {
        Some(end) => tokio::time::sleep_until(end).await,
        None => std::future::pending().await,
    }
}

/// Where the writer writes, and whether shutdown has given up on it.
struct Writing {
    durable: Arc<dyn DurableStore>,
    given_up: Arc<AtomicBool>,
}

impl Writing {
    /// Writes `batch` and empties it. A database outage must not drop events: retries with
    /// back-off until written, or until shutdown gives up on them (they were reported lost).
    async fn write(&self, batch: &mut Vec<AuditEvent>) {
        let mut delay = Duration::from_millis(100);
        while !batch.is_empty() {
            match self.durable.append_audit(batch).await {
                Ok(()) => batch.clear(),
                Err(_) if self.given_up.load(Ordering::Relaxed) => return,
                Err(e) => {
                    tracing::error!(error = %e, pending = batch.len(), "audit write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
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
            times: 1,
        }
    }

    pub fn user(mut self, u: &crate::store::User) -> Self {
        self.user_id = Some(u.id.clone());
        self.email = Some(u.email.clone());
        self.account_id = Some(u.account_id.clone());
        self
    }

    /// The address a client typed, for an event about an account that may not exist. Kept only
    /// if it has the shape of an address ([`crate::policy::is_plausible_email`]): anything else
    /// names no account, is often a password typed into the wrong field, and may carry line
    /// breaks or terminal escapes meant for whoever reads the trail.
    pub fn email(mut self, email: &str) -> Self {
        self.email = crate::policy::is_plausible_email(email).then(|| email.to_string());
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

    /// A store and a writer over it.
    async fn started(dir: &tempfile::TempDir) -> (Arc<SqlStore>, Audit) {
        let (store, _) = store(dir).await;
        let audit = Audit::start(store.clone(), Arc::new(Metrics::new()));
        (store, audit)
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

    /// The log line of every event names whom it concerns, as its row does: an event the
    /// database could not take (an outage) is still in the log, account and all.
    #[tokio::test]
    async fn the_log_line_names_the_account_and_address() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, audit) = started(&dir).await;
        let (logs, _guard) = crate::test_logs::capture();
        let mut ev = AuditEvent::new("login_throttled", "failure", 1);
        ev.email = Some("owner@example.com".into());
        ev.ip = Some("192.0.2.7".into());
        audit.record(ev).await;
        let text = logs.text();
        assert!(
            text.contains("owner@example.com") && text.contains("login_throttled"),
            "{text}"
        );
    }

    /// A flood of refusals logs what the trail gets, not a line per attempt: the run's first
    /// refusal, and its summary with how many followed.
    #[tokio::test]
    async fn a_run_of_refusals_is_logged_as_the_trail_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, audit) = started(&dir).await;
        let (logs, _guard) = crate::test_logs::capture();
        for _ in 0..50 {
            let mut ev = AuditEvent::new("login_password", "denied", 1);
            ev.reason = Some("throttled:ip".into());
            audit.record_repeated("192.0.2.9".into(), ev).await;
        }
        audit.flush().await;
        let text = logs.text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("login_password"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("times=1"), "{}", lines[0]);
        assert!(lines[1].contains("times=49"), "{}", lines[1]);
    }

    /// A user of `account` created in `store`.
    async fn customer(store: &SqlStore, email: &str, account: &str) -> crate::store::User {
        let new = crate::store::NewUser {
            email: email.into(),
            account_id: account.into(),
            is_admin: false,
            password_hash: String::new(),
        };
        store.create_user(new, 1).await.unwrap()
    }

    /// The account's events: one, written with the owner's address.
    async fn assert_one_named(store: &SqlStore, account: &str, email: &str) {
        let q = AuditQuery {
            account_id: Some(account.into()),
            limit: 10,
            ..AuditQuery::default()
        };
        let found = store.query_audit(&q).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].email.as_deref(), Some(email));
    }

    fn event() -> AuditEvent {
        AuditEvent::new(
            "login_password",
            "failure",
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )
    }

    /// What a client typed as its address is kept only when it is shaped like one: a password
    /// typed into the address field, or a value carrying line breaks and terminal escapes, is not.
    #[test]
    fn a_typed_address_is_kept_only_when_it_is_one() {
        assert_eq!(
            event().email("ghost@example.com").email.as_deref(),
            Some("ghost@example.com")
        );
        for typed in [
            "zebra-quantum-al-991!",
            "nobody@example.com ip=203.0.113.9\n2026-12-06T10:40:00Z login_password success",
            "evil@example.com\u{1b}[2J",
            "",
        ] {
            assert_eq!(event().email(typed).email, None, "{typed:?}");
        }
    }

    /// An event recorded with a user id alone is written with the user's address and account,
    /// so filters by either find it; one whose user is unknown is written as it came.
    #[tokio::test]
    async fn events_with_a_user_id_alone_are_written_with_address_and_account() {
        let dir = tempfile::tempdir().unwrap();
        let (store, audit) = started(&dir).await;
        let user = customer(&store, "moved@example.com", "acct-7").await;
        for id in [user.id.as_str(), "gone"] {
            audit
                .record(AuditEvent {
                    user_id: Some(id.into()),
                    ..AuditEvent::new("session_binding_moved", "denied", 2)
                })
                .await;
        }
        audit.flush().await;
        assert_one_named(&store, "acct-7", "moved@example.com").await;
        let q = AuditQuery {
            user_id: Some("gone".into()),
            limit: 10,
            ..AuditQuery::default()
        };
        let found = store.query_audit(&q).await.unwrap();
        assert_eq!((found.len(), found[0].email.as_deref()), (1, None));
    }

    /// Events recorded while the database is away are named once it is back, also where the
    /// users could not be read at a moment the events could be written (the database coming
    /// back between the two): the naming is part of the write.
    #[tokio::test]
    async fn events_written_after_an_outage_are_named_too() {
        for away in [&["users", "audit_events"][..], &["users"][..]] {
            let dir = tempfile::tempdir().unwrap();
            let (store, url) = store(&dir).await;
            let user = customer(&store, "outage@example.com", "acct-8").await;
            let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
            for table in away {
                let sql = rename(table, &format!("{table}_away"));
                sqlx::query(&sql).execute(&mut conn).await.unwrap();
            }
            let audit = Audit::start(store.clone(), Arc::new(Metrics::new()));
            audit
                .record(AuditEvent {
                    user_id: Some(user.id.clone()),
                    ..AuditEvent::new("logout", "success", 2)
                })
                .await;
            // The writer has tried (and failed) by now.
            assert!(
                tokio::time::timeout(Duration::from_millis(300), audit.flush())
                    .await
                    .is_err(),
                "{away:?}: written while its user could not be read"
            );
            for table in away {
                let sql = rename(&format!("{table}_away"), table);
                sqlx::query(&sql).execute(&mut conn).await.unwrap();
            }
            assert!(audit.flush_within(Duration::from_secs(10)).await);
            assert_one_named(&store, "acct-8", "outage@example.com").await;
        }
    }

    #[tokio::test]
    async fn a_flush_within_its_limit_writes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (store, audit) = started(&dir).await;
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
        let (logs, _guard) = crate::test_logs::capture();
        let audit = Audit::start(store, Arc::new(Metrics::new()));
        audit.record(event()).await;
        let started = std::time::Instant::now();
        assert!(!audit.flush_within(Duration::from_millis(300)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        // Once shutdown has said the queued events are lost, the writer stops retrying them:
        // its next try (the back-off is at most 200 ms by then) says nothing more.
        let said = logs.text();
        let (before, after) = said.split_once("events still queued are lost").unwrap();
        assert!(before.contains("retrying"), "{said}");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let said = logs.text();
        let after_now = said.split_once("events still queued are lost").unwrap().1;
        assert_eq!(
            after_now, after,
            "a retry was logged after the events were given up"
        );
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
        let dropped = dropped(&metrics);
        // At least those beyond a full batch and a full queue; how many more depends on how
        // many the writer had taken when its first write failed.
        assert!(
            (1.0..=(BATCH + 20) as f64).contains(&dropped),
            "{dropped} given up"
        );
    }

    /// `portcullis_audit_events_dropped_total`.
    fn dropped(metrics: &Metrics) -> f64 {
        let hasher = crate::auth::password::PasswordHasher::new(&crate::config::PasswordConfig {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            ..Default::default()
        })
        .unwrap();
        let text = metrics.render(&hasher).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("portcullis_audit_events_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter in\n{text}"))
    }

    #[tokio::test]
    async fn a_flood_while_the_store_is_away_does_not_crowd_out_other_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = broken_store(&dir).await;
        let metrics = Arc::new(Metrics::new());
        let audit = Audit::start_with(store, metrics.clone(), 4, Duration::from_millis(5));
        // The writer takes this one and keeps retrying it.
        audit.record(event()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let flood = tokio::time::timeout(
            Duration::from_secs(10),
            repeat(&audit, "k", "192.0.2.1", 100),
        )
        .await;
        assert!(flood.is_ok(), "a repeat never waits for room");
        let given_up = dropped(&metrics);
        assert!(given_up >= 90.0, "{given_up} repeats given up");
        // The events that must not be lost still find room.
        for _ in 0..3 {
            audit.record(event()).await;
        }
        assert_eq!(dropped(&metrics), given_up, "no other event given up");
    }

    fn all(limit: u32) -> AuditQuery {
        AuditQuery {
            limit,
            ..AuditQuery::default()
        }
    }

    /// `n` refusals from `ip`, recorded as one run `key`.
    async fn repeat(audit: &Audit, key: &str, ip: &str, n: usize) {
        for _ in 0..n {
            audit.record_repeated(key.into(), refused(ip)).await;
        }
    }

    fn refused(ip: &str) -> AuditEvent {
        AuditEvent::new("login_password", "denied", 1_000)
            .email("target@example.com")
            .reason("throttled:account")
            .client(ip, "flood/1.0")
    }

    #[tokio::test]
    async fn a_run_of_repeated_refusals_is_its_first_row_and_one_summary() {
        let dir = tempfile::tempdir().unwrap();
        let (store, audit) = started(&dir).await;
        // 50 refusals of one run (from two addresses), 3 of another, one ordinary event.
        for i in 0..50 {
            let ip = if i % 2 == 0 { "192.0.2.1" } else { "192.0.2.2" };
            audit
                .record_repeated("fail:pwd:target".into(), refused(ip))
                .await;
        }
        repeat(&audit, "fail:ip:198.51.100.9", "198.51.100.9", 3).await;
        audit.record(event()).await;
        audit.flush().await;
        let rows = store.query_audit(&all(100)).await.unwrap();
        let mut summary: Vec<_> = rows
            .iter()
            .map(|e| (e.times, e.ip.as_deref(), e.email.is_some()))
            .collect();
        // Repeats and other events go by queues of their own: no order between them.
        summary.sort();
        assert_eq!(
            summary,
            [
                (1, None, false),
                (1, Some("192.0.2.1"), true),
                (1, Some("198.51.100.9"), true),
                // The address left out where it varied.
                (2, Some("198.51.100.9"), true),
                (49, None, true),
            ],
            "{rows:#?}"
        );
        assert_eq!(rows.iter().map(|e| e.times).sum::<i64>(), 54);
        assert!(rows
            .iter()
            .filter(|e| e.outcome == "denied")
            .all(|e| e.reason.as_deref() == Some("throttled:account")));
    }

    #[tokio::test]
    async fn a_run_ends_by_itself_and_the_next_repeat_opens_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store(&dir).await;
        let run = Duration::from_millis(300);
        let audit = Audit::start_runs(
            store.clone(),
            Arc::new(Metrics::new()),
            QUEUE,
            QUEUE_WAIT,
            run,
        );
        repeat(&audit, "k", "192.0.2.1", 6).await;
        // No flush: the summary is written when the run ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let rows = loop {
            let rows = store.query_audit(&all(100)).await.unwrap();
            if rows.len() >= 2 || std::time::Instant::now() > deadline {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(rows.iter().map(|e| e.times).collect::<Vec<_>>(), [1, 5]);
        assert_eq!(rows[1].ip.as_deref(), Some("192.0.2.1"), "shared: kept");
        audit
            .record_repeated("k".into(), refused("192.0.2.1"))
            .await;
        audit.flush().await;
        let rows = store.query_audit(&all(100)).await.unwrap();
        assert_eq!(rows.iter().map(|e| e.times).collect::<Vec<_>>(), [1, 5, 1]);
    }

    #[tokio::test]
    async fn catching_up_writes_what_came_before_but_does_not_cut_a_run_short() {
        let dir = tempfile::tempdir().unwrap();
        let (store, audit) = started(&dir).await;
        repeat(&audit, "k", "192.0.2.1", 6).await;
        audit.record(event()).await;
        audit.catch_up().await;
        let rows = store.query_audit(&all(100)).await.unwrap();
        let mut written: Vec<_> = rows.iter().map(|e| (e.outcome.as_str(), e.times)).collect();
        written.sort();
        assert_eq!(written, [("denied", 1), ("failure", 1)], "{rows:#?}");
        // A page asked again and again: the run goes on.
        for _ in 0..3 {
            audit.catch_up().await;
            audit
                .record_repeated("k".into(), refused("192.0.2.1"))
                .await;
        }
        audit.flush().await;
        let rows = store.query_audit(&all(100)).await.unwrap();
        let mut times: Vec<_> = rows.iter().map(|e| e.times).collect();
        times.sort();
        assert_eq!(times, [1, 1, 8], "{rows:#?}");
    }

    #[test]
    fn runs_stay_bounded_and_keys_past_the_bound_share_one_run() {
        let mut runs = Runs::new(Duration::from_secs(60), 3);
        let mut batch = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            // Ten keys cycled four times with room for three runs: the three first keys get a
            // run each, the seven others one overflow run, however they cycle.
            for round in 0..4 {
                for key in 0..10 {
                    runs.take(format!("k{key}"), refused("192.0.2.1"), &mut batch);
                    assert!(runs.open.len() <= 4, "round {round}: {}", runs.open.len());
                }
            }
            assert_eq!(batch.len(), 4, "first rows only: {batch:#?}");
            runs.close_all(&mut batch);
        });
        assert!(runs.open.is_empty() && runs.ends.is_empty());
        assert_eq!(
            batch.iter().map(|e| e.times).sum::<i64>(),
            40,
            "no count lost"
        );
        let mut summaries: Vec<_> = batch[4..].iter().map(|e| e.times).collect();
        summaries.sort();
        assert_eq!(summaries, [3, 3, 3, 27]);
    }
}
