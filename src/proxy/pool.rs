//! Kept-alive HTTP/1.1 connections to the upstream.
//!
//! A connection is taken from the pool for one request and handed back when the response body
//! has been read to its end, at which point HTTP/1.1 lets it carry the next request. Nothing is
//! spawned per request: the body itself gives the connection back when it is finished with (a
//! general-purpose client spawns a task per request to wait for that moment). A body dropped
//! before its end takes its connection with it, since the rest of that response would still be
//! on the wire.
//!
//! A request that could not even be written (the upstream had closed a kept-alive connection in
//! the meantime) is sent again once, on a new connection. One that was written is repeated only
//! where that is harmless: an idempotent method without a body, whose kept-alive connection
//! had sat idle for a second or more (long enough for the upstream's keep-alive timeout to end
//! it) and ended before any answer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{BoxError, ProxyError};

/// How long a kept-alive connection must have sat idle before a request sent on it is copied so
/// it can go again if the upstream closes the connection under it: servers close idle
/// connections when their keep-alive timeout (a second or more) runs out.
const REPEAT_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Idle connections kept at most; more are closed when handed back.
const MAX_IDLE: usize = 1024;

/// How long a request waits for a connection handed back a moment ago to turn ready before it
/// moves on to another (a healthy one takes microseconds).
const READY_WAIT: Duration = Duration::from_millis(10);

/// One kept-alive connection while nobody uses it.
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// The pool for one upstream address.
pub(super) struct Pool {
    /// `host:port` to connect to (resolved on each new connection).
    address: String,
    connect_timeout: Duration,
    /// Idle connections older than this are closed rather than reused.
    idle_timeout: Duration,
    /// Most recently returned at the back: taken from the back (warm), expired from the front.
    idle: Mutex<VecDeque<Idle>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("address", &self.address)
            .field("idle", &self.idle.lock().map(|i| i.len()).unwrap_or(0))
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(super) fn new(address: String, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            address,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Sends `req` on a kept-alive connection (or a new one) and returns the response, whose
    /// body hands the connection back once read to its end.
    pub(super) async fn send(
        self: &Arc<Self>,
        req: http::Request<Body>,
    ) -> Result<(http::Response<Incoming>, Option<SendRequest<Body>>), ProxyError> {
        let (mut sender, reused, idle) = match self.take().await {
            Some((s, idle)) => (s, true, idle),
            None => (self.connect().await?, false, Duration::ZERO),
        };
        // A kept-alive connection the upstream closes as the request goes out (a server's
        // keep-alive timeout running out, a second or more after its last answer) fails a
        // request that was written. One that changes nothing and has no body may go again, as
        // nginx sends it again; the copy that takes is made only where such a close may come
        // (a connection in steady use is not about to time out, and copying every request's
        // headers would cost a busy gateway more than the rare retry saves).
        let again = (reused && idle >= REPEAT_AFTER_IDLE)
            .then(|| Repeatable::of(&req))
            .flatten();
        let req = match sender.try_send_request(req).await {
            Ok(resp) => return Ok((resp, Some(sender))),
            Err(mut e) => match e.take_message() {
                // Never written: the kept-alive connection was closed under us. Once more, fresh.
                Some(req) if reused => req,
                None if again.is_some() && closed_before_an_answer(e.error()) => {
                    tracing::debug!(error = %e.error(), "kept-alive upstream connection closed; sending again");
                    again
                        .map(Repeatable::request)
                        .ok_or_else(|| failed(e.into_error()))?
                }
                _ => return Err(failed(e.into_error())),
            },
        };
        let mut sender = self.connect().await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, Some(sender))),
            Err(e) => Err(failed(e.into_error())),
        }
    }

    /// The most recently used idle connection that can take a request now, if any, and how
    /// long it sat idle.
    async fn take(&self) -> Option<(SendRequest<Body>, Duration)> {
        loop {
            let Idle { mut sender, since } = self.idle.lock().ok()?.pop_back()?;
            let idle = since.elapsed();
            if sender.is_closed() || idle >= self.idle_timeout {
                continue;
            }
            if sender.is_ready() {
                return Some((sender, idle));
            }
            // Handed back at the end of a response body, the connection turns ready as soon as
            // its task has seen that end. One that closes instead is skipped, and so is one still
            // busy past a moment (say, still sending an upload the upstream answered early):
            // dropping it here closes it once that exchange is over.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Some((sender, idle));
            }
        }
    }

    /// Opens a new connection and starts the task that drives it.
    async fn connect(&self) -> Result<SendRequest<Body>, ProxyError> {
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.address.as_str()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ProxyError::Connect(Box::new(e))),
            Err(_) => {
                return Err(ProxyError::Connect(
                    format!("no connection within {:?}", self.connect_timeout).into(),
                ))
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY upstream");
        }
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Connect(Box::new(e)))?;
        // With upgrades, so a WebSocket handshake can take the connection over after its `101`
        // (such a connection is then closed to the pool).
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Takes a connection back after a complete response, unless it is closing; drops idle
    /// connections past their time on the way.
    fn put(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        while idle
            .front()
            .is_some_and(|i| i.since.elapsed() >= self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// What is needed to send a request without a body again.
struct Repeatable {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

impl Repeatable {
    /// A copy of `req` if it is idempotent (RFC 9110 §9.2.2) and has no body.
    fn of(req: &http::Request<Body>) -> Option<Self> {
        (req.method().is_idempotent() && req.body().is_end_stream()).then(|| Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        })
    }

    fn request(self) -> http::Request<Body> {
        let mut req = http::Request::new(Body::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = http::Version::HTTP_11;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Whether a written request failed because its connection ended before any answer came: the
/// upstream closed or reset it (not a malformed answer, which would come again).
fn closed_before_an_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    std::iter::successors(std::error::Error::source(e), |c| c.source())
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            )
        })
}

/// What a failed exchange was: the client's request body stalled (a cause is the body
/// timeout's) or could not be read (the error hyper reports carries, as its cause, the error of
/// the body we gave it, which only the inbound body yields as `axum::Error`), or anything else,
/// the upstream's or the connection's.
fn failed(e: hyper::Error) -> ProxyError {
    let causes = || std::iter::successors(std::error::Error::source(&e), |c| c.source());
    if causes().any(|c| c.is::<tower_http::timeout::TimeoutError>()) {
        return ProxyError::RequestBodyStalled;
    }
    if causes().any(|c| c.is::<axum::Error>()) {
        return ProxyError::RequestBody(Box::new(e));
    }
    ProxyError::Upstream(Box::new(e))
}

/// A response body from the upstream that hands its connection back to the pool once it has
/// been read to the end (or had nothing to read).
pub(super) struct Returning {
    inner: Incoming,
    /// The connection, while the body is being read.
    sender: Option<SendRequest<Body>>,
    pool: Arc<Pool>,
    /// The end of the body has been seen.
    done: bool,
}

impl Returning {
    pub(super) fn new(inner: Incoming, sender: Option<SendRequest<Body>>, pool: Arc<Pool>) -> Self {
        Self {
            inner,
            sender,
            pool,
            done: false,
        }
    }

    fn give_back(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put(sender);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.done = true;
                this.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // A broken response leaves the connection in no state to reuse.
                this.sender = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            other => other.map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // Bodies with nothing to read (HEAD, 204, 304, `Content-Length: 0`) are never polled.
        if self.done || self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
