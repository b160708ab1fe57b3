//! Prometheus metrics, served on a listener of their own (`[metrics] listen`), never on the
//! gateway's public one.
//!
//! One [`Metrics`] per gateway lives in the [`AppState`](crate::state::AppState) (no global
//! registry), so gateways started side by side in one process — the integration tests — keep
//! separate counts. The code that makes a decision counts it with a one-line call; the store
//! latencies are measured by wrapping both stores in [`stores::Timed`], and the argon2 queue is
//! read from the hashing pool when the metrics are scraped.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::auth::password::PasswordHasher;
use crate::store::AuditEvent;

pub mod stores;

/// A label set of one label.
type One = [(&'static str, &'static str); 1];
/// A label set of two labels.
type Two = [(&'static str, &'static str); 2];
/// Latency histograms, one per label set.
type Latencies = Family<Two, Histogram, fn() -> Histogram>;

/// What became of a request the gate looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// Passed the gate and sent to the console.
    Forwarded,
    /// A browser without a complete session, sent to the sign-in page.
    SignInRedirect,
    /// Refused outright: an API client without a session (401), a gateway path in disguise,
    /// a malformed path.
    Denied,
    /// A store or the console could not answer (503 / 502 / 504).
    Unavailable,
}

impl Proxied {
    const ALL: [Self; 4] = [
        Self::Forwarded,
        Self::SignInRedirect,
        Self::Denied,
        Self::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::SignInRedirect => "sign_in_redirect",
            Self::Denied => "denied",
            Self::Unavailable => "unavailable",
        }
    }
}

/// What the forward-auth endpoint answered the asking proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardAuth {
    /// 200 with the identity token: the proxy lets the request through.
    Allowed,
    /// No complete session: a redirect to sign in (browsers) or 401.
    SignIn,
    /// A complete session without a valid device proof.
    DeviceProof,
    /// A `[[step_up]]` rule wants a fresh proof first.
    StepUp,
    /// Refused: the gateway's own namespace, a malformed path.
    Denied,
    /// A store could not answer (503).
    Unavailable,
}

impl ForwardAuth {
    const ALL: [Self; 6] = [
        Self::Allowed,
        Self::SignIn,
        Self::DeviceProof,
        Self::StepUp,
        Self::Denied,
        Self::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::SignIn => "sign_in",
            Self::DeviceProof => "device_proof",
            Self::StepUp => "step_up",
            Self::Denied => "denied",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Which store a latency belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Durable,
    Ephemeral,
}

/// Sign-in factors, as labelled.
const FACTORS: [&str; 6] = [
    "password",
    "totp",
    "recovery",
    "key",
    "passkey",
    "second_factor",
];
/// Sign-in results, as labelled.
const RESULTS: [&str; 4] = ["success", "failure", "throttled", "denied"];
/// Throttling budgets, as labelled.
const LIMITS: [&str; 7] = [
    "account_password",
    "account_second_factor",
    "ip",
    "network",
    "sign_in_codes",
    "global",
    "device",
];
/// Step-up reasons, as labelled.
const STEP_UPS: [&str; 8] = [
    "second_factor_required",
    "enrolment_required",
    "key_required",
    "fresh_proof_required",
    "device_proof_required",
    "sensitive_action",
    "unusual_sign_in",
    "session_risk",
];
/// Store operation classes each store times (see `metrics::stores`), as labelled.
const STORE_OPERATIONS: [(&str, &[&str]); 2] = [
    (
        "durable",
        &["read", "write", "atomic", "audit", "mail", "ping"],
    ),
    ("ephemeral", &["read", "write", "atomic", "ping"]),
];

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The series of `proxied_requests`, by [`Proxied`] (in [`Proxied::ALL`] order): looked up
    /// once here, since every proxied request counts itself.
    proxied: [Counter; Proxied::ALL.len()],
    /// The same for `forward_auth_decisions`, by [`ForwardAuth`].
    forward_auth: [Counter; ForwardAuth::ALL.len()],
    audit_dropped: Counter,
    pages_unavailable: Counter,
    sign_ins_shed: Counter,
    connections_refused: Counter,
    sign_ins: Family<Two, Counter>,
    step_ups: Family<One, Counter>,
    throttled: Family<One, Counter>,
    store_latency: Latencies,
    argon2_queue: Gauge,
    mail: Family<One, Counter>,
    risk: Family<Two, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~1.6 s: a local Redis answers in well under a millisecond, a busy SQLite or a
    // distant PostgreSQL can take hundreds.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    /// A fresh registry with every metric at zero (known label sets included, so dashboards
    /// and rate() see a series before its first event).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let proxied = Family::<One, Counter>::default();
        registry.register(
            "proxied_requests",
            "Requests outside the gateway's own routes, by what the gate did with them",
            proxied.clone(),
        );
        let forward_auth = Family::<One, Counter>::default();
        registry.register(
            "forward_auth_decisions",
            "Answers of the forward-auth endpoint to the asking proxy, by outcome",
            forward_auth.clone(),
        );
        let sign_ins = Family::<Two, Counter>::default();
        registry.register(
            "sign_in_attempts",
            "Sign-in steps by result and factor (second_factor: refused before the factor was looked at)",
            sign_ins.clone(),
        );
        let step_ups = Family::<One, Counter>::default();
        registry.register(
            "step_ups",
            "Sign-ins asked for more proof, by reason",
            step_ups.clone(),
        );
        let throttled = Family::<One, Counter>::default();
        registry.register(
            "throttled_attempts",
            "Attempts refused because a failure budget was spent, by budget",
            throttled.clone(),
        );
        let store_latency: Latencies = Family::new_with_constructor(latency_histogram);
        registry.register(
            "store_operation_seconds",
            "Time one store operation took, by store and operation class",
            store_latency.clone(),
        );
        let argon2_queue = Gauge::default();
        registry.register(
            "argon2_queue_depth",
            "Password hashes running or waiting for a hashing slot",
            argon2_queue.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_events_dropped",
            "Audit events given up because the queue to the durable store stayed full (they are still in the log)",
            audit_dropped.clone(),
        );
        let pages_unavailable = Counter::default();
        registry.register(
            "pages_unavailable",
            "Requests of the gateway's own pages and forms (sign-in, enrolment, account, admin) refused with 503 because a store did not answer",
            pages_unavailable.clone(),
        );
        let sign_ins_shed = Counter::default();
        registry.register(
            "sign_ins_shed",
            "Sign-in steps refused with 503 because the password hashing queue was full (load shed during a flood; not in pages_unavailable)",
            sign_ins_shed.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed as soon as accepted because their client address held server.max_connections_per_address already",
            connections_refused.clone(),
        );
        let mail = Family::<One, Counter>::default();
        registry.register(
            "mail_deliveries",
            "Notification deliveries by result (queued, sent, failed)",
            mail.clone(),
        );
        let risk = Family::<Two, Counter>::default();
        registry.register(
            "risk_assessments",
            "Risk scores of sign-ins (stage sign_in) and of sessions proven from a new place (stage session), by level",
            risk.clone(),
        );
        for stage in ["sign_in", "session"] {
            for level in ["low", "medium", "high"] {
                let _ = risk.get_or_create(&[("stage", stage), ("level", level)]);
            }
        }
        let proxied =
            Proxied::ALL.map(|p| proxied.get_or_create(&[("outcome", p.label())]).clone());
        let forward_auth = ForwardAuth::ALL.map(|f| {
            forward_auth
                .get_or_create(&[("outcome", f.label())])
                .clone()
        });
        for r in RESULTS {
            for f in FACTORS {
                let _ = sign_ins.get_or_create(&[("result", r), ("factor", f)]);
            }
        }
        for s in STEP_UPS {
            let _ = step_ups.get_or_create(&[("reason", s)]);
        }
        for l in LIMITS {
            let _ = throttled.get_or_create(&[("limit", l)]);
        }
        for r in ["queued", "sent", "failed"] {
            let _ = mail.get_or_create(&[("result", r)]);
        }
        for (store, operations) in STORE_OPERATIONS {
            for op in operations {
                let _ = store_latency.get_or_create(&[("store", store), ("operation", op)]);
            }
        }
        Self {
            registry,
            proxied,
            forward_auth,
            audit_dropped,
            pages_unavailable,
            sign_ins_shed,
            connections_refused,
            sign_ins,
            step_ups,
            throttled,
            store_latency,
            argon2_queue,
            mail,
            risk,
        }
    }

    /// Counts one request the gate decided about.
    pub fn proxied(&self, outcome: Proxied) {
        self.proxied[outcome as usize].inc();
    }

    /// Counts an audit event given up (see `audit`).
    pub fn audit_dropped(&self) {
        self.audit_dropped.inc();
    }

    /// Counts one request of a gateway page or form refused with 503.
    pub fn page_unavailable(&self) {
        self.pages_unavailable.inc();
    }

    /// Counts one sign-in step shed because the hashing queue was full.
    pub fn sign_in_shed(&self) {
        self.sign_ins_shed.inc();
    }

    /// Counts one connection refused by the bound on connections per address.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Counts one answer of the forward-auth endpoint.
    pub fn forward_auth(&self, outcome: ForwardAuth) {
        self.forward_auth[outcome as usize].inc();
    }

    /// Counts a sign-in decision from the audit event that records it. Every sign-in step is
    /// audited through one place (`LoginFlow::audit`), so counting there misses none; events
    /// that are not sign-in steps are ignored.
    pub fn sign_in_event(&self, ev: &AuditEvent) {
        let reason = ev.reason.as_deref().unwrap_or_default();
        let factor = match ev.event.as_str() {
            "login_password" => "password",
            "totp_enrolled" | "totp_enrolment" => "totp",
            "passkey_sign_in" => "passkey",
            "webauthn_enrolled" => "key",
            "second_factor" => second_factor_of(&ev.outcome, reason),
            _ => return,
        };
        let result = match (ev.outcome.as_str(), reason) {
            ("success", _) => "success",
            ("failure", _) => "failure",
            (_, r) if r == "throttled" || r.starts_with("throttled:") => "throttled",
            _ => "denied",
        };
        self.sign_ins
            .get_or_create(&[("result", result), ("factor", factor)])
            .inc();
        let step_up = match (ev.event.as_str(), result, reason) {
            ("login_password", "success", "second_factor_required") => "second_factor_required",
            ("login_password", "success", "enrolment_required") => "enrolment_required",
            ("second_factor", "denied", "phishing_resistant_required") => "key_required",
            _ => return,
        };
        self.step_up(step_up);
    }

    /// Counts a request that needs more proof than its session has (`fresh_proof_required`:
    /// changing second factors needs a second-factor proof within the last 10 minutes).
    pub fn step_up(&self, reason: &'static str) {
        self.step_ups.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts one risk assessment (`stage`: `sign_in` or `session`).
    pub fn risk(&self, stage: &'static str, level: crate::risk::Level) {
        self.risk
            .get_or_create(&[("stage", stage), ("level", level.as_str())])
            .inc();
    }

    /// Counts an attempt refused by the budget stored under `key` (`fail:pwd:…`, `fail:ip:…`).
    pub fn throttled(&self, key: &str) {
        self.throttled
            .get_or_create(&[("limit", limit_label(key))])
            .inc();
    }

    /// Counts a sign-in ended because it used up its wrong codes.
    pub fn sign_in_codes_spent(&self) {
        self.throttled(":login");
    }

    /// Records how long one store operation took.
    pub fn store_latency(&self, store: StoreKind, class: &'static str, took: Duration) {
        let store = match store {
            StoreKind::Durable => "durable",
            StoreKind::Ephemeral => "ephemeral",
        };
        self.store_latency
            .get_or_create(&[("store", store), ("operation", class)])
            .observe(took.as_secs_f64());
    }

    /// Counts a notification queued, sent or failed, once the store has recorded it.
    pub fn mail_if_ok<T, E>(&self, done: &Result<T, E>, result: &'static str) {
        if done.is_ok() {
            self.mail.get_or_create(&[("result", result)]).inc();
        }
    }

    /// The metrics in the Prometheus (OpenMetrics) text format, with the argon2 queue read now.
    pub fn render(&self, hasher: &PasswordHasher) -> Result<String, std::fmt::Error> {
        self.argon2_queue
            .set(i64::try_from(hasher.queue_depth()).unwrap_or(i64::MAX));
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The name of the budget stored under `key`, as metrics label it and audit events say it:
/// `fail:pwd:…` is the account's, `rate:global:…` the global per-second one, `fail:dev:…` a
/// known device's.
pub fn limit_label(key: &str) -> &'static str {
    match key.split(':').nth(1) {
        Some("pwd") => "account_password",
        Some("code") => "account_second_factor",
        Some("ip") => "ip",
        Some("net") => "network",
        Some("global") => "global",
        Some("dev") => "device",
        _ => "sign_in_codes",
    }
}

/// The factor a `second_factor` audit event is about, from its reason.
fn second_factor_of(outcome: &str, reason: &str) -> &'static str {
    match (outcome, reason) {
        ("success", "otp") => "totp",
        ("success", "rec") => "recovery",
        ("success", _) => "key",
        ("denied", _) => "second_factor",
        (_, "bad_code" | "replayed_code" | "no_totp") => "totp",
        (_, "bad_recovery_code" | "malformed_code") => "recovery",
        _ => "key",
    }
}

/// What the metrics listener needs.
#[derive(Clone)]
struct Scrape {
    metrics: Arc<Metrics>,
    hasher: Arc<PasswordHasher>,
}

/// The metrics listener's router: `GET /metrics` (the server adds the health probes), 404 for
/// anything else.
pub fn router(metrics: Arc<Metrics>, hasher: Arc<PasswordHasher>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scrape { metrics, hasher })
}

async fn scrape(State(s): State<Scrape>) -> Response {
    match s.metrics.render(&s.hasher) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not render metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests;
