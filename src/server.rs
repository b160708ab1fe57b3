//! Builds the router and runs it on a listener until a shutdown signal, so the binary and the
//! tests start the gateway the same way (tests bind port 0 and pass their own shutdown).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::state::AppState;

/// How often signing keys are re-read, so a rotation made elsewhere is picked up.
const KEY_REFRESH: Duration = Duration::from_secs(10);

/// The gateway's router over `state`.
pub fn build_router(state: AppState) -> Router {
    crate::http::router(state)
}

/// Serves until `shutdown` completes, then drains in-flight requests and flushes the audit trail.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let signer = state.signer.clone();
    let refresher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(KEY_REFRESH);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = signer.refresh().await {
                tracing::warn!(error = %e, "could not refresh signing keys; keeping the current ones");
            }
        }
    });
    let mailer = tokio::spawn(state.notifier.as_ref().clone().run());
    let app = build_router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    // Small answers go out at once: no Nagle delay between a response head and its body.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    // After the signal, in-flight requests get `server.shutdown_timeout` to finish; then the
    // remaining connections (a stuck upstream, open websockets) are dropped.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let drain = state.config.server.shutdown_timeout;
    let mut graceful = stop_rx.clone();
    let serving = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|s| *s).await;
    });
    let mut deadline = stop_rx;
    let result = tokio::select! {
        r = serving => r,
        () = async move {
            let _ = deadline.wait_for(|s| *s).await;
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!(?drain, "shutdown timeout: dropping connections still open");
            Ok(())
        }
    };
    refresher.abort();
    mailer.abort();
    state.audit.flush().await;
    result
}
