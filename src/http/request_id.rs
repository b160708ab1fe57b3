//! Request ids: every request gets one, so a line in the gateway's log, the console's log and a
//! client's report can be matched. An incoming `X-Request-Id` is kept only from a trusted proxy
//! and only in a plain, bounded form; anything else is replaced by a fresh UUID. The id is
//! recorded in the request's tracing span, sent upstream (replacing what the client sent) and
//! returned on the response.

use std::future::Future;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use tracing::Instrument;

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
        _ => {
            let mut text = uuid::Uuid::encode_buffer();
            let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
            HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
        }
    }
}

/// Chooses the id (`trusted`: the peer is a trusted proxy), puts it on the request (so it
/// travels upstream), in the span `next` runs in and on the response.
pub(crate) async fn tag<F: Future<Output = Response>>(
    trusted: bool,
    mut req: Request,
    next: impl FnOnce(Request) -> F,
) -> Response {
    let id = choose(req.headers(), trusted);
    req.headers_mut().insert(X_REQUEST_ID, id.clone());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or_default(),
        method = %req.method(),
    );
    let mut resp = next(req).instrument(span).await;
    resp.headers_mut().insert(X_REQUEST_ID, id);
    resp
}

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    #[test]
    fn only_plain_bounded_ids_are_acceptable() {
        let long = "a".repeat(128);
        for ok in ["a", "abc-123", "req:1.2_3-x", long.as_str()] {
            assert!(is_acceptable(ok.as_bytes()), "{ok}");
        }
        let too_long = "a".repeat(129);
        for bad in [
            "",
            "a b",
            "a/b",
            "a;b",
            "a\"b",
            "é",
            "a\tb",
            too_long.as_str(),
        ] {
            assert!(!is_acceptable(bad.as_bytes()), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_id_is_in_the_span_of_everything_logged_for_the_request() {
        let (captured, _guard) = crate::test_logs::capture();

        let app = Router::new()
            .route(
                "/",
                get(|| async {
                    tracing::info!("handled");
                    "ok"
                }),
            )
            .layer(axum::middleware::from_fn(
                |req, next: axum::middleware::Next| tag(true, req, |r| next.run(r)),
            ));
        let req = Request::builder()
            .uri("/")
            .header("x-request-id", "trace-me-42")
            .body(Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.headers()["x-request-id"], "trace-me-42");

        let text = captured.text();
        let line = text
            .lines()
            .find(|l| l.contains("handled"))
            .unwrap_or_else(|| panic!("nothing logged: {text}"));
        assert!(line.contains("request_id=trace-me-42"), "{line}");
    }
}
