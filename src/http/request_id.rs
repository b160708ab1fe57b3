//! Request ids: every request gets one, so a line in the gateway's log, the console's log and a
//! client's report can be matched. An incoming `X-Request-Id` is kept only from a trusted proxy
//! and only in a plain, bounded form; anything else is replaced by a fresh UUID. The id is
//! recorded in the request's tracing span, sent upstream (replacing what the client sent) and
//! returned on the response.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::state::AppState;

/// The header carrying the id in both directions.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the request being handled, for handlers that want it.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

/// Whether an incoming id is 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn is_acceptable(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The id for a request: a trusted proxy's acceptable one (a single header), else a new UUID.
fn choose(headers: &HeaderMap, trusted: bool) -> HeaderValue {
    let mut incoming = headers.get_all(&X_REQUEST_ID).iter();
    match (incoming.next(), incoming.next()) {
        (Some(v), None) if trusted && is_acceptable(v.as_bytes()) => v.clone(),
        _ => HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("-")),
    }
}

/// Middleware: chooses the id, puts it on the request (so it travels upstream), in the span and
/// on the response.
pub async fn request_id(
    State(state): State<AppState>,
    super::Peer(peer): super::Peer,
    mut req: Request,
    next: Next,
) -> Response {
    let trusted = crate::proxy::is_trusted(peer.ip(), &state.config.server.trusted_proxies);
    let id = choose(req.headers(), trusted);
    req.headers_mut().insert(X_REQUEST_ID, id.clone());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = id.to_str().unwrap_or_default(),
        method = %req.method(),
    );
    let mut resp = next.run(req).instrument(span).await;
    resp.headers_mut().insert(X_REQUEST_ID, id);
    resp
}
