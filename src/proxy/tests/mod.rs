//! Tests over real sockets: an axum upstream on `127.0.0.1:0` that records what reached it, and,
//! for end-to-end cases, a tiny gateway app whose fallback calls [`Upstream::forward`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use sha2::{Digest, Sha256};

use super::{Forwarding, Upstream};
use crate::config::UpstreamConfig;

mod forwarding;
mod pool;
mod streaming;

/// What one request looked like when it reached the upstream.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    headers: HeaderMap,
}

/// Everything the upstream received, in order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    fn last(&self) -> Seen {
        self.0
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

struct TestUpstream {
    addr: SocketAddr,
    seen: Recorder,
}

async fn record(State(seen): State<Recorder>, req: Request, next: Next) -> Response {
    seen.0.lock().unwrap().push(Seen {
        method: req.method().clone(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    next.run(req).await
}

/// The byte at offset `i` of a generated download, so both sides can hash without storing it.
fn pattern_chunk(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

async fn upload(body: Body) -> String {
    let mut hasher = Sha256::new();
    let mut count = 0usize;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        count += chunk.len();
        hasher.update(&chunk);
    }
    format!("{count}:{}", hex::encode(hasher.finalize()))
}

async fn download(Path(total): Path<usize>) -> Body {
    const CHUNK: usize = 64 * 1024;
    let chunks = futures_util::stream::unfold(0usize, move |offset| async move {
        (offset < total).then(|| {
            let len = CHUNK.min(total - offset);
            (
                Ok::<_, Infallible>(bytes::Bytes::from(pattern_chunk(offset, len))),
                offset + len,
            )
        })
    });
    Body::from_stream(chunks)
}

async fn echo(body: Body) -> Body {
    body
}

async fn status(Path(code): Path<u16>) -> Response {
    let status = StatusCode::from_u16(code).unwrap();
    let body = if matches!(code, 204 | 304) {
        Body::empty()
    } else {
        Body::from(format!("status {code}"))
    };
    (
        status,
        [
            ("location", "/elsewhere?x=1"),
            ("etag", "\"v1\""),
            ("cache-control", "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn cookies() -> Response {
    let mut r = "cookies".into_response();
    for c in [
        "theme=dark; Path=/",
        "portcullis-session=evil; Path=/; HttpOnly",
        "__Host-portcullis-session=evil; Path=/; Secure",
        "Portcullis-Csrf=evil",
        "lang=en; Max-Age=60",
    ] {
        r.headers_mut()
            .append("set-cookie", HeaderValue::from_static(c));
    }
    r
}

async fn hop() -> Response {
    (
        [
            ("connection", "x-up-hop"),
            ("x-up-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("trailer", "x-checksum"),
            ("upgrade", "foo"),
            ("x-kept", "yes"),
        ],
        "hop",
    )
        .into_response()
}

async fn sleep() -> &'static str {
    tokio::time::sleep(Duration::from_secs(10)).await;
    "late"
}

async fn ws_echo(ws: WebSocketUpgrade) -> Response {
    ws.protocols(["chat"]).on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Text(_) | Message::Binary(_))
                && socket.send(msg).await.is_err()
            {
                break;
            }
        }
    })
}

async fn start_upstream() -> TestUpstream {
    let seen = Recorder::default();
    let app = Router::new()
        .route("/ws", get(ws_echo))
        .route("/upload", post(upload))
        .route("/download/{n}", get(download))
        .route("/echo", post(echo))
        .route("/status/{code}", any(status))
        .route("/cookies", get(cookies))
        .route("/hop", get(hop))
        .route("/sleep", get(sleep))
        .fallback(|| async { "ok" })
        .layer(axum::middleware::from_fn_with_state(seen.clone(), record));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    TestUpstream { addr, seen }
}

fn config(addr: SocketAddr, base_path: &str) -> UpstreamConfig {
    UpstreamConfig {
        url: format!("http://{addr}{base_path}").parse().unwrap(),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(5),
        allowed_origins: Vec::new(),
    }
}

const ASSERTION: HeaderName = HeaderName::from_static("x-portcullis-assertion");

/// Instructions as the caller would give them for an untrusted client at 203.0.113.9.
fn forwarding(path_and_query: &str) -> Forwarding {
    Forwarding {
        path_and_query: path_and_query.into(),
        peer: "203.0.113.9:40000".parse().unwrap(),
        peer_trusted: false,
        proto: HeaderValue::from_static("https"),
        host: HeaderValue::from_static("gateway.example"),
        add_headers: vec![(ASSERTION, HeaderValue::from_static("signed.jwt"))],
        gateway_cookies: [
            "__Host-portcullis-session",
            "portcullis-session",
            "portcullis-csrf",
        ]
        .map(String::from)
        .into(),
        strip_headers: ["x-portcullis-assertion", "x-custom-identity"]
            .map(String::from)
            .into(),
        watch: None,
    }
}

/// An inbound request as axum would hand it over.
fn request(method: Method, target: &str, headers: &[(&str, &str)], body: Body) -> Request {
    let mut b = http::Request::builder().method(method).uri(target);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).unwrap()
}

#[derive(Clone)]
struct Gateway {
    upstream: Upstream,
}

/// The caller's side in miniature: forward everything, answer errors with their status.
async fn gateway_fallback(
    State(g): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let mut fwd = forwarding(req.uri().path_and_query().map_or("/", |p| p.as_str()));
    fwd.peer = peer;
    match g.upstream.forward(req, fwd).await {
        Ok(r) => r,
        Err(e) => e.status().into_response(),
    }
}

async fn start_gateway(upstream: Upstream) -> SocketAddr {
    let app = Router::new()
        .fallback(gateway_fallback)
        .with_state(Gateway { upstream });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    addr
}
