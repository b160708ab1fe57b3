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
    let ready = durable && ephemeral;
    let word = |up: bool| if up { "up" } else { "down" };
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "stores": { "durable": word(durable), "ephemeral": word(ephemeral) },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    probe_answer(status, body)
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
