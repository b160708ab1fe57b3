//! The accept loop every listener runs: one HTTP/1.1 connection task per client (hyper), each
//! request carrying the peer's address (`ConnectInfo`, as `axum::serve` gives it), upgrades
//! (WebSockets) passed on, and a bound on how long a client may take to send a request's head,
//! counted from when the connection opens or falls idle between requests
//! (`server.header_timeout`): a client that connects and sends nothing, or its headers a byte at
//! a time, cannot hold a connection (and a file descriptor) open for good; and, where the
//! listener has one, a bound on the connections each client address holds at once (`cap`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;
use tower::ServiceExt;

use super::cap::ConnectionCap;

/// The largest request head (line and headers) a connection may send, and the read buffer's
/// bound: a head held open at hyper's default (about 400 KiB) by each of a thousand connections
/// took half a gigabyte; browsers' heads, cookies included, stay far below this. A larger head
/// gets `431`.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A TCP listener whose failed accepts say what to do: out of file descriptors, the warning
/// names the limit to raise; no failure stops the loop for long (50 ms), so the gateway takes
/// connections again as soon as descriptors are free.
pub struct Plain(pub tokio::net::TcpListener);

impl Listener for Plain {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                Err(e) => accept_failed(&e).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// When the warning of an accept that failed for want of file descriptors was last logged.
static OUT_OF_FILES_SAID: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

/// What an accept that failed calls for: nothing for a client that went away before it was
/// accepted; otherwise a warning (out of file descriptors: at most one a minute, with what to
/// raise) and a short pause rather than a spin.
pub(crate) async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        tracing::debug!(error = %e, "a client went away before its connection was accepted");
        return;
    }
    // EMFILE (the process's limit) and ENFILE (the system's).
    if matches!(e.raw_os_error(), Some(24 | 23)) {
        if out_of_files_due() {
            tracing::warn!(
                error = %e,
                "no file descriptor left for new connections: they wait until some close. Raise                  the open files limit (LimitNOFILE in systemd, ulimit -n, the container                  runtime's nofile; ENFILE: the system's fs.file-max), or lower                  server.max_connections_per_address so one client cannot take them all                  (repeats of this warning are held back for a minute)"
            );
        }
    } else {
        tracing::warn!(error = %e, "accept failed");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Whether the out-of-descriptors warning is due (none in the last minute); records it if so.
fn out_of_files_due() -> bool {
    let mut said = OUT_OF_FILES_SAID
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    if said.is_some_and(|t| now.duration_since(t) < Duration::from_secs(60)) {
        return false;
    }
    *said = Some(now);
    true
}

/// Serves `listener` with `service` until `stop` turns true: then no connection is accepted any
/// more, each open one finishes the request it is serving and closes, and this returns once all
/// are closed (the caller bounds that wait). With `cap`, a connection whose client address
/// holds the most connections it allows is closed as soon as it is accepted.
pub async fn serve<L, S>(
    mut listener: L,
    service: S,
    mut stop: watch::Receiver<bool>,
    header_timeout: Duration,
    send_timeout: Duration,
    cap: Option<Arc<ConnectionCap>>,
) where
    L: Listener<Addr = SocketAddr>,
    S: tower::Service<axum::extract::Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    // Each connection holds a receiver; the sender's `closed` is when the last has gone.
    let (all_closed, open) = watch::channel(());
    loop {
        let stopping = async {
            let _ = stop.wait_for(|s| *s).await;
        };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopping => break,
        };
        let admitted = match &cap {
            None => None,
            Some(cap) => match cap.admit(peer.ip()) {
                Some(admitted) => admitted.map(Arc::new),
                None => continue,
            },
        };
        let counted = admitted.clone();
        let open = open.clone();
        let hold = open.clone();
        let service = service
            .clone()
            .map_request(move |req: http::Request<Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                // A WebSocket tunnel outlives this connection's task: it holds the connection
                // open for the shutdown's drain in its place.
                if req.headers().contains_key(http::header::UPGRADE) {
                    req.extensions_mut()
                        .insert(crate::proxy::ConnectionHold(hold.clone(), counted.clone()));
                }
                req
            });
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(LazyTimer)
                .header_read_timeout(header_timeout)
                .max_header_size(MAX_HEAD_BYTES)
                .max_buf_size(MAX_HEAD_BYTES);
            let conn = builder
                .serve_connection(
                    TokioIo::new(SendBound::new(io, send_timeout)),
                    TowerToHyperService::new(service),
                )
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let stopping = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stopping => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // A client that went away or sent a malformed or slow request head.
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(open);
            drop(admitted);
        });
    }
    drop(listener);
    drop(open);
    all_closed.closed().await;
}

/// A client connection whose writes may stall (the client reads nothing, its window full) for
/// `limit` at most, then fail: a client that stops reading an answer (a console's long stream,
/// a large download) would otherwise hold the answer's buffers, up to a megabyte, for as long
/// as the console sends. The timer is armed only while a write waits, so a connection whose
/// writes go straight out costs nothing more.
struct SendBound<S> {
    io: S,
    limit: Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendBound<S> {
    fn new(io: S, limit: Duration) -> Self {
        Self {
            io,
            limit,
            waiting: None,
        }
    }

    /// What a write or flush that answered `poll` makes of it: on progress the timer goes; while
    /// it waits, the timer runs, and once it has run out the write fails.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.waiting = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.waiting = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing of the answer for server.body_timeout",
            )));
        }
        Poll::Pending
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SendBound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SendBound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bounded(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bounded(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.bounded(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// hyper's timer for the request-head bound, with a deadline moved for nothing: hyper moves it
/// once per request (to now + `server.header_timeout`), and re-registering a tokio timer each
/// time costs about a thousand instructions per proxied request. Here moving it later only
/// records the new deadline; the underlying timer, armed at the earlier one, re-arms itself
/// when it fires early. It never fires before the deadline in force.
#[derive(Clone, Copy, Debug)]
struct LazyTimer;

struct LazySleep {
    deadline: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::rt::Timer for LazyTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(LazySleep {
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline.into())),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<LazySleep>() {
            Some(mut lazy) => {
                lazy.deadline = new_deadline;
                // Earlier than the armed timer (hyper never asks for that): re-arm now.
                if tokio::time::Instant::from(new_deadline) < lazy.timer.deadline() {
                    lazy.timer.as_mut().reset(new_deadline.into());
                }
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> Instant {
        // tokio's clock, as the timers it arms (the same as the system's, but for tests).
        tokio::time::Instant::now().into_std()
    }
}

impl Future for LazySleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            std::task::ready!(self.timer.as_mut().poll(cx));
            let deadline = tokio::time::Instant::from(self.deadline);
            if self.timer.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Fired at a deadline since moved: wait on for the one in force.
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl hyper::rt::Sleep for LazySleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test(start_paused = true)]
    async fn a_moved_deadline_is_kept_and_never_fired_early() {
        let now = || LazyTimer.now();
        let start = now();
        let mut sleep = LazyTimer.sleep_until(start + Duration::from_secs(10));
        // Moved later twice before the first deadline: fires at the last one, not before.
        tokio::time::sleep(Duration::from_secs(5)).await;
        LazyTimer.reset(&mut sleep, start + Duration::from_secs(15));
        LazyTimer.reset(&mut sleep, start + Duration::from_secs(20));
        let fired = tokio::time::timeout(Duration::from_secs(14), &mut sleep).await;
        assert!(fired.is_err(), "fired before its deadline");
        tokio::time::timeout(Duration::from_secs(2), &mut sleep)
            .await
            .expect("fires at its deadline");
        assert!(now() >= start + Duration::from_secs(20));
        // Moved earlier than the armed timer: fires then.
        let mut sleep = LazyTimer.sleep_until(now() + Duration::from_secs(30));
        let soon = now() + Duration::from_secs(3);
        LazyTimer.reset(&mut sleep, soon);
        tokio::time::timeout(Duration::from_secs(4), &mut sleep)
            .await
            .expect("fires at the earlier deadline");
    }
}
