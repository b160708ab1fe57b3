//! A minimal upstream for the HTTP benchmarks: answers every request with a small 200 body, so
//! the measurement is of the proxy, not of the console. Usage: `bench-upstream 127.0.0.1:18081`.

use axum::Router;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into());
    let app = Router::new().fallback(|| async { "ok: a small console page\n" });
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}
