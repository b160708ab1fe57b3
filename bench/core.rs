//! The gateway's HTTP core without its gate, for the proxy benchmark: the same accept loop
//! (`server::conn`, hyper's HTTP/1.1 server with the request-head timer) and the same upstream
//! forwarding (`proxy::Upstream`: header hygiene, the kept-alive connection pool, hyper's
//! HTTP/1.1 client) as `portcullis serve`, but no router, no session, no bound cookie, no token.
//! What it sustains is what any gate built on this core can reach at best.
//! Usage: `bench-core LISTEN_ADDR UPSTREAM_URL`, e.g. `bench-core 127.0.0.1:18085 http://127.0.0.1:18081/`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use http::HeaderValue;
use portcullis::config::UpstreamConfig;
use portcullis::proxy::{Forwarding, Upstream};

// The allocator the gateway's binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18085".into());
    let upstream_url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:18081/".into());
    let upstream = Upstream::new(&UpstreamConfig {
        url: upstream_url.parse()?,
        ..UpstreamConfig::default()
    });
    let host = HeaderValue::from_str(&listen)?;
    let cookies: Arc<[String]> = Arc::from(vec!["portcullis-session".to_string()]);
    let strip: Arc<[String]> = Arc::from(vec!["x-portcullis-assertion".to_string()]);
    let service = tower::service_fn(move |req: axum::extract::Request| {
        let upstream = upstream.clone();
        let fwd = Forwarding {
            path_and_query: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string()),
            peer: req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)), |c| c.0),
            peer_trusted: false,
            proto: HeaderValue::from_static("http"),
            host: host.clone(),
            add_headers: Vec::new(),
            gateway_cookies: Arc::clone(&cookies),
            strip_headers: Arc::clone(&strip),
            watch: None,
        };
        async move {
            let response: Response = match upstream.forward(req, fwd).await {
                Ok(r) => r,
                Err(e) => (e.status(), e.to_string()).into_response(),
            };
            Ok::<_, Infallible>(response)
        }
    });
    let listener = tokio::net::TcpListener::bind(&listen).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // Never stopped: the benchmark script kills the process.
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    portcullis::server::conn::serve(
        listener,
        service,
        stopped,
        Duration::from_secs(30),
        Duration::from_secs(30),
        None,
    )
    .await;
    Ok(())
}
