//! Probes for orchestrators and load balancers. They answer about the gateway only: no session,
//! no proxying, no detail beyond which store is down.
//!
//! - `GET /_portcullis/healthz`: liveness, 200 whenever the process serves requests. A store
//!   outage does not make it fail, so an orchestrator does not restart a gateway that will
//!   recover by itself.
//! - `GET /_portcullis/readyz`: readiness, 200 when both stores answer, otherwise 503 with JSON
//!   naming the store that is down, so a load balancer sends traffic elsewhere.
//!
//! The metrics listener (`[metrics] listen`) answers the same two probes as `/healthz` and
//! `/readyz` ([`probes`]), for orchestrators that check a port the public never reaches.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;
use crate::store::StoreResult;

/// The two probes at `/healthz` and `/readyz`, for the metrics listener.
pub fn probes(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz_get))
        .route("/readyz", axum::routing::get(readyz_get))
        .with_state(state)
}

/// A probe never waits longer than this for a store.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /_portcullis/healthz`.
pub async fn healthz_get() -> Response {
    probe_answer(StatusCode::OK, json!({ "status": "ok" }))
}

/// `GET /_portcullis/readyz`.
pub async fn readyz_get(State(state): State<AppState>) -> Response {
    let (durable, ephemeral) = tokio::join!(
        check("durable", state.durable.ping()),
        check("ephemeral", state.ephemeral.ping())
    );
    let offset = match durable && ephemeral {
        true => clock_off(&state).await,
        false => None,
    };
    let ready = durable && ephemeral && offset.is_none();
    let word = |up: bool| if up { "up" } else { "down" };
    let mut body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "stores": { "durable": word(durable), "ephemeral": word(ephemeral) },
    });
    if let Some(ms) = offset {
        body["clock"] = json!({
            "offset_ms": ms,
            "max_ms": state.config.server.max_clock_skew.as_millis() as u64,
        });
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    probe_answer(status, body)
}

/// How far (ms, positive when ahead) this gateway's clock is from the clock its gateways
/// share (Redis's, else PostgreSQL's), where one is shared, the check is on
/// (`server.max_clock_skew`) and the clock is off by more: `None` when it is not.
pub async fn clock_off(state: &AppState) -> Option<i64> {
    let max = state.config.server.max_clock_skew;
    if max.is_zero() {
        return None;
    }
    let offset = clock_offset_ms(state).await?;
    let limit = i64::try_from(max.as_millis()).unwrap_or(i64::MAX);
    if offset.abs() <= limit {
        return None;
    }
    tracing::warn!(
        offset_ms = offset,
        max_ms = limit,
        "this gateway's clock is off from the shared store's by more than server.max_clock_skew: \
         not ready (sessions, proofs, keys and limits compare times other gateways stored)"
    );
    Some(offset)
}

/// This gateway's clock less the shared store's (ms), measured half way through the question;
/// `None` where no store shares a clock or it does not answer in time.
async fn clock_offset_ms(state: &AppState) -> Option<i64> {
    let before = state.clock.now_millis();
    let asked = async {
        match state.ephemeral.server_time_ms().await? {
            Some(t) => Ok(Some(t)),
            None => state.durable.server_time_ms().await,
        }
    };
    let server = tokio::time::timeout(PROBE_TIMEOUT, asked)
        .await
        .ok()?
        .ok()??;
    let after = state.clock.now_millis();
    Some(before + (after - before) / 2 - server)
}

/// Whether a store answered in time; failures are logged (without secrets: store errors never
/// hold them), not shown.
async fn check(store: &str, ping: impl std::future::Future<Output = StoreResult<()>>) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(store, error = %e, "readiness: store is down");
            false
        }
        Err(_) => {
            tracing::warn!(store, "readiness: store did not answer in time");
            false
        }
    }
}

fn probe_answer(status: StatusCode, body: serde_json::Value) -> Response {
    let mut r = (status, axum::Json(body)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
