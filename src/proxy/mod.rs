//! Forwarding of already-authorised requests to the upstream console.
//!
//! This module decides nothing about who may pass; the caller does that and hands over the
//! request together with [`Forwarding`] instructions. What it guarantees is hygiene: bodies stream
//! in both directions without being buffered, hop-by-hop headers stay on their hop, identity and
//! `X-Forwarded-*` headers come only from the gateway, the gateway's cookies never reach the
//! upstream and the upstream cannot set them, and WebSocket upgrades are tunnelled.
//!
//! # Layout
//! - `headers`: header hygiene on both sides.
//! - `addr`: [`client_ip`] and [`is_trusted`].
//! - `websocket`: upgrade detection and the byte tunnel after `101`.

mod addr;
mod headers;
mod pool;
mod websocket;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, StatusCode, Uri, Version};

pub use addr::{client_ip, is_trusted};
pub(crate) use headers::{
    first_token_but, is_identity_alias, is_identity_header, is_method_override,
    other_transfer_coding,
};
pub use websocket::ConnectionHold;

use crate::config::UpstreamConfig;

/// Boxed error source for failures that carry one.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an idle pooled connection to the upstream is kept; below common server keep-alive
/// limits so the gateway rarely reuses a connection the upstream is about to close.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause in a client's request body being sent on, unless configured otherwise.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request could not be forwarded. Messages hold no header values, paths or bodies.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream could not be reached (refused, unresolvable, connect timeout).
    #[error("upstream unreachable")]
    Connect(#[source] BoxError),
    /// The upstream sent no response headers within the response timeout (counted from the end
    /// of the request body).
    #[error("upstream sent no response within {0:?}")]
    Timeout(Duration),
    /// Any other failure while talking to the upstream (connection reset, malformed response).
    #[error("upstream request failed")]
    Upstream(#[source] BoxError),
    /// The client's request body broke off or was malformed (a bad chunk, fewer bytes than its
    /// `Content-Length`) while it was being sent on: the client's fault, not the console's.
    #[error("request body could not be read")]
    RequestBody(#[source] BoxError),
    /// The client's request body stalled (no bytes for the body timeout) while it was being sent
    /// on: the client's, not the console's, so 408 rather than the 504 the console would get.
    #[error("request body stalled")]
    RequestBodyStalled,
    /// A method the gateway never forwards ([`never_forwarded`]): `CONNECT` would open a tunnel
    /// and `TRACE` would reflect the gateway-added identity header back to the client.
    #[error("method not forwarded")]
    MethodNotAllowed,
    /// The forwarding instructions cannot be expressed on the wire (the named part is not a valid
    /// request target, header value or upstream URL); a bug or misconfiguration, not the client's.
    #[error("invalid forwarding instruction: {0}")]
    Invalid(&'static str),
}

impl ProxyError {
    /// The status the caller should answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Connect(_) | Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestBody(_) => StatusCode::BAD_REQUEST,
            Self::RequestBodyStalled => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Invalid(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// What the caller decided about one request, and what the upstream should be told.
///
/// `Debug` shows only the names of `add_headers` (their values are signed identity tokens) and
/// the path without its query (queries can carry tokens).
#[derive(Clone)]
pub struct Forwarding {
    /// Path and query to request upstream, already canonicalised by the caller (e.g.
    /// "/campaigns?page=2"); appended to the upstream base URL's path (base path "/" → used as is).
    pub path_and_query: String,
    /// TCP peer of the inbound connection.
    pub peer: std::net::SocketAddr,
    /// Whether `peer` is a trusted proxy (its X-Forwarded-* may be believed).
    pub peer_trusted: bool,
    /// Scheme the client used (from the gateway's public_url unless the caller decided
    /// otherwise), as `X-Forwarded-Proto` sends it.
    pub proto: HeaderValue,
    /// Host the client used, as for `proto` (`X-Forwarded-Host`).
    pub host: HeaderValue,
    /// Headers to add after stripping, e.g. the signed identity JWT header.
    pub add_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Names of the gateway's own cookies, removed from the Cookie header sent upstream and from
    /// upstream Set-Cookie responses. Shared: the same for every request.
    pub gateway_cookies: Arc<[String]>,
    /// Header names (lower-case) that must never come from the client, e.g. the configured
    /// identity header. Shared like `gateway_cookies`.
    pub strip_headers: Arc<[String]>,
    /// For a WebSocket upgrade: how long the tunnel may stay open (see [`Watch`]); none keeps it
    /// open until either side closes it.
    pub watch: Option<Watch>,
}

/// Makes a future that completes when a tunnelled connection must end (the session it was
/// opened under has ended); the tunnel is then closed.
pub type Watch =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let added: Vec<&str> = self.add_headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Forwarding")
            .field("path", &self.path_and_query.split('?').next())
            .field("peer", &self.peer)
            .field("peer_trusted", &self.peer_trusted)
            .field("proto", &self.proto)
            .field("host", &self.host)
            .field("add_headers", &added)
            .field("gateway_cookies", &self.gateway_cookies)
            .field("strip_headers", &self.strip_headers)
            .field("watch", &self.watch.is_some())
            .finish()
    }
}

/// Where requests go: fixed at start-up from the validated configuration.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port` to connect to.
    address: String,
    /// `Host` sent upstream: the upstream's own authority, so virtual hosting there works no
    /// matter which name the client used for the gateway.
    host: HeaderValue,
    /// Base path without its trailing slash ("" for "/").
    base_path: String,
    /// `http://authority` plus the base path: how the console's absolute `Location`s to itself
    /// begin.
    own_prefix: String,
}

impl Target {
    fn from_config(cfg: &UpstreamConfig) -> Result<Self, ProxyError> {
        let url = &cfg.url;
        let invalid = || ProxyError::Invalid("upstream url");
        let host = url.host_str().ok_or_else(invalid)?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let port = url.port_or_known_default().ok_or_else(invalid)?;
        let base_path = url.path().trim_end_matches('/').to_string();
        Ok(Self {
            address: format!("{host}:{port}"),
            host: HeaderValue::from_str(&authority).map_err(|_| invalid())?,
            own_prefix: format!("{}://{authority}{base_path}", url.scheme()),
            base_path,
        })
    }

    /// The request target sent upstream, in origin form (`/base/path?query`).
    fn uri_for(&self, path_and_query: String) -> Result<Uri, ProxyError> {
        if !path_and_query.starts_with('/') {
            return Err(ProxyError::Invalid("path_and_query"));
        }
        let pq = if self.base_path.is_empty() {
            // Taken over as it is, not copied.
            PathAndQuery::from_maybe_shared(bytes::Bytes::from(path_and_query))
        } else {
            PathAndQuery::try_from(format!("{}{path_and_query}", self.base_path))
        }
        .map_err(|_| ProxyError::Invalid("path_and_query"))?;
        Ok(Uri::from(pq))
    }
}

/// The upstream console and a pool of kept-alive HTTP/1.1 connections to it. Clones share the
/// pool.
#[derive(Clone)]
pub struct Upstream {
    /// `Err` only if the configured URL could not be turned into a target; every forward then
    /// fails with that error rather than the gateway panicking at start-up.
    target: Result<(Target, Arc<pool::Pool>), &'static str>,
    response_timeout: Duration,
    body_timeout: Duration,
    /// The gateway's public origin, which the console's absolute redirects to itself are
    /// rewritten to (none: left as sent).
    public_origin: Option<Arc<str>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("target", &self.target)
            .field("response_timeout", &self.response_timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Build from config. Connect timeout = cfg.connect_timeout; time to response headers =
    /// cfg.response_timeout.
    pub fn new(cfg: &UpstreamConfig) -> Self {
        let target = match Target::from_config(cfg) {
            Ok(t) => {
                let pool =
                    pool::Pool::new(t.address.clone(), cfg.connect_timeout, POOL_IDLE_TIMEOUT);
                Ok((t, Arc::new(pool)))
            }
            Err(ProxyError::Invalid(what)) => Err(what),
            Err(_) => Err("upstream url"),
        };
        Self {
            target,
            response_timeout: cfg.response_timeout,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            public_origin: None,
        }
    }

    /// Rewrites the console's `Location`s that name the console's own address (its `Host` is
    /// that address, so frameworks build such redirects) to `origin` (e.g.
    /// `https://login.esp.example`), as nginx's `proxy_redirect default` does: the browser is
    /// sent to the gateway, not to an internal address.
    pub fn with_public_origin(mut self, origin: &str) -> Self {
        self.public_origin = Some(origin.into());
        self
    }

    /// The longest pause in a client's request body while it is sent on (`server.body_timeout`).
    pub fn with_body_timeout(mut self, body_timeout: Duration) -> Self {
        self.body_timeout = body_timeout;
        self
    }

    /// Forward one request. `req` is the inbound request as axum gives it
    /// (axum::extract::Request = http::Request<axum::body::Body>).
    ///
    /// The response body streams from the upstream as it arrives; the time limit covers only the
    /// wait for response headers once the request body has been sent, so neither long uploads
    /// nor long downloads are cut off (a stalled upload is, by the body timeout).
    pub async fn forward(
        &self,
        mut req: axum::extract::Request,
        mut fwd: Forwarding,
    ) -> Result<axum::response::Response, ProxyError> {
        if never_forwarded(req.method()) {
            return Err(ProxyError::MethodNotAllowed);
        }
        let (target, pool) = self
            .target
            .as_ref()
            .map_err(|what| ProxyError::Invalid(what))?;
        let uri = target.uri_for(std::mem::take(&mut fwd.path_and_query))?;

        let upgrade = websocket::is_upgrade_request(&req);
        // Must be taken before the request is torn apart: it lives in the extensions.
        let inbound_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let hold = req.extensions_mut().remove::<websocket::ConnectionHold>();

        let (parts, body) = req.into_parts();
        let method = parts.method;
        let mut headers = parts.headers;
        // Framing: a `Content-Length` next to `Transfer-Encoding` is void; hyper re-frames from
        // the body, so drop it rather than let the next hop pick between two lengths.
        if headers::has_transfer_encoding(&headers) {
            headers.remove(header::CONTENT_LENGTH);
        }
        headers::remove_hop_by_hop(&mut headers);
        // `Expect: 100-continue` was answered by the gateway's own server (hyper sends the 100
        // when the body is first read); passed on, it would only let the upstream reply 417.
        headers.remove(header::EXPECT);
        headers::strip_identity(&mut headers, &fwd.strip_headers, &fwd.add_headers);
        headers::filter_request_cookies(&mut headers, &fwd.gateway_cookies);
        headers::set_forwarded(&mut headers, &fwd).map_err(|e| ProxyError::Invalid(e.0))?;
        headers.insert(header::HOST, target.host.clone());
        for (name, value) in &fwd.add_headers {
            headers.append(name.clone(), value.clone());
        }
        if upgrade {
            websocket::restore_handshake(&mut headers);
        }

        // A fresh request: the inbound one's extensions (connection info, hyper internals) are
        // the gateway's business, and the upstream always speaks HTTP/1.1.
        // A body that stalls fails its exchange (`RequestBodyStalled`) before the console's
        // answer is waited for in vain; a request without one (most) is not wrapped.
        // The console's time to answer counts from the end of the body: an upload that keeps
        // moving may take longer than `response_timeout` to send.
        let (body, body_sent) = if http_body::Body::is_end_stream(&body) {
            (body, None)
        } else {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let body = Body::new(tower_http::timeout::TimeoutBody::new(
                self.body_timeout,
                body,
            ));
            let sent = move || {
                let _ = tx.send(());
            };
            (Body::new(OnEnd::new(body, sent)), Some(rx))
        };
        let mut outbound = http::Request::new(body);
        *outbound.method_mut() = method.clone();
        *outbound.uri_mut() = uri;
        *outbound.version_mut() = Version::HTTP_11;
        *outbound.headers_mut() = headers;

        let started = Instant::now();
        let response_timeout = self.response_timeout;
        let deadline = async move {
            if let Some(sent) = body_sent {
                // Sent, or dropped (the console answered early, or the body failed, which
                // fails the exchange by itself): either way the wait for the answer is on.
                let _ = sent.await;
            }
            tokio::time::sleep(response_timeout).await;
        };
        let answer = tokio::select! {
            // The answer first: no random pick of a branch per request.
            biased;
            answer = pool.send(outbound) => answer,
            () = deadline => {
                tracing::debug!(%method, "upstream response timed out");
                return Err(ProxyError::Timeout(self.response_timeout));
            }
        };
        let (response, sender) = match answer {
            Err(e) => {
                tracing::debug!(%method, error = %e, "upstream request failed");
                return Err(e);
            }
            Ok(answer) => answer,
        };
        let status = response.status();
        tracing::debug!(
            %method,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "upstream responded"
        );

        if status == StatusCode::SWITCHING_PROTOCOLS {
            return match inbound_upgrade {
                Some(inbound) => Ok(websocket::tunnel(
                    inbound,
                    response,
                    &fwd.gateway_cookies,
                    (fwd.watch.clone(), hold),
                )),
                None => Err(ProxyError::Upstream(
                    "upstream switched protocols without being asked".into(),
                )),
            };
        }
        let (mut parts, incoming) = response.into_parts();
        if let Some(public) = &self.public_origin {
            headers::rewrite_own_location(&mut parts.headers, &target.own_prefix, public);
        }
        let body = Body::new(pool::Returning::new(incoming, sender, Arc::clone(pool)));
        Ok(relay(parts, body, &fwd))
    }
}

/// `CONNECT` (a tunnel), `TRACE` and IIS's `TRACK` (which reflect the request, the identity
/// header included, back to the client), in any letter case: a console that upper-cases
/// methods would read `trace` as `TRACE`.
pub fn never_forwarded(method: &Method) -> bool {
    let m = method.as_str();
    m.len() <= 7
        && ["CONNECT", "TRACE", "TRACK"]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(m))
}

/// A body that calls `at_end` once it has been read to its end (a request body sent on to the
/// console, one a gateway page read).
pub(crate) struct OnEnd<F: FnOnce() + Send + Unpin> {
    inner: Body,
    at_end: Option<F>,
}

impl<F: FnOnce() + Send + Unpin> OnEnd<F> {
    pub(crate) fn new(inner: Body, at_end: F) -> Self {
        Self {
            inner,
            at_end: Some(at_end),
        }
    }
}

impl<F: FnOnce() + Send + Unpin> http_body::Body for OnEnd<F> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            if let Some(at_end) = self.at_end.take() {
                at_end();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Turns the upstream's response into the client's: status, headers and body as sent, minus
/// hop-by-hop headers and any attempt to set the gateway's cookies or to bind sessions on its
/// origin, and framed by its own origin only where it says nothing of framing. The body is not
/// read here.
fn relay(parts: http::response::Parts, body: Body, fwd: &Forwarding) -> axum::response::Response {
    let mut headers = parts.headers;
    if headers::has_transfer_encoding(&headers) {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers::remove_hop_by_hop(&mut headers);
    headers::filter_response_cookies(&mut headers, &fwd.gateway_cookies);
    headers::remove_gateway_response_headers(&mut headers, &fwd.strip_headers);
    headers::frame_own_origin_only(&mut headers);
    let mut out = axum::response::Response::new(body);
    *out.status_mut() = parts.status;
    *out.headers_mut() = headers;
    out
}

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
