//! Builds the router and runs it on a listener until a shutdown signal, so the binary and the
//! tests start the gateway the same way (tests bind port 0 and pass their own shutdown).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;

use crate::state::AppState;

pub mod cap;
pub mod conn;
pub mod tls;

/// How often signing keys are re-read, so a rotation made elsewhere is picked up.
const KEY_REFRESH: Duration = Duration::from_secs(10);

/// Serves until `shutdown` completes, then drains in-flight requests and flushes the audit trail.
///
/// With `server.tls_cert` the listener speaks HTTPS only and SIGHUP reloads the certificate;
/// `server.redirect_http_listen` and `metrics.listen` open their own listeners, which stop with
/// the main one.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(listener, state, shutdown, Hangups::listen()).await
}

/// SIGHUPs, listened for from the moment this is made: made before the listener is bound, a
/// SIGHUP sent as soon as the gateway answers is never lost (nor, before a handler exists,
/// fatal: its default action ends the process).
pub struct Hangups(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangups {
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self(match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGHUP: the TLS certificate and the GeoIP database will not be reloaded");
                    None
                }
            })
        }
        #[cfg(not(unix))]
        Self()
    }
}

/// [`run`] with SIGHUPs listened for since `hangups` was made.
pub async fn run_with(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hangups: Hangups,
) -> std::io::Result<()> {
    let server = &state.config.server;
    let tls = match (&server.tls_cert, &server.tls_key) {
        (Some(cert), Some(key)) => {
            let (tls, warnings) = tls::Tls::load(cert, key, &server.public_url, state.clock.now())?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            Some(tls)
        }
        _ => None,
    };
    // After the signal, in-flight requests get `server.shutdown_timeout` to finish; then the
    // remaining connections (a stuck upstream, open websockets) are dropped.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let side = side_listeners(&state, &stop_rx).await?;
    // Every listener is open: only now is the gateway said to be up.
    let storage = &state.config.storage;
    tracing::info!(
        listen = %listener.local_addr()?,
        public_url = %state.config.server.public_url,
        upstream = %state.config.upstream.url,
        durable = %crate::secret::redact_url(&storage.durable),
        ephemeral = %crate::secret::redact_url(&storage.ephemeral),
        "portcullis is listening"
    );
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
    let app = crate::http::Gateway::new(state.clone());
    let header_timeout = state.config.server.header_timeout;
    let send_timeout = state.config.server.body_timeout;
    let cap = connection_cap(&state);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let drain = state.config.server.shutdown_timeout;
    let reloader = tokio::spawn(reload_on_hangup(hangups, tls.clone(), state.risk.clone()));
    let watcher = tokio::spawn(watch_certificate(tls.clone()));
    let serving: Pin<Box<dyn Future<Output = ()> + Send>> = match tls {
        Some(tls) => {
            // Nothing to do per connection: the TLS listener has set TCP_NODELAY already.
            // The bound is applied as connections are accepted, before their handshakes.
            let listener = tls.listener(listener, header_timeout, cap)?;
            Box::pin(conn::serve(
                listener,
                app,
                stop_rx.clone(),
                header_timeout,
                send_timeout,
                None,
            ))
        }
        None => {
            // Small answers go out at once: no Nagle delay between a response head and its body.
            let listener = ListenerExt::tap_io(conn::Plain(listener), |tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
            });
            Box::pin(conn::serve(
                listener,
                app,
                stop_rx.clone(),
                header_timeout,
                send_timeout,
                cap,
            ))
        }
    };
    let mut deadline = stop_rx;
    let result: std::io::Result<()> = tokio::select! {
        () = serving => Ok(()),
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
    for task in side.into_iter().chain([reloader, watcher]) {
        task.abort();
    }
    // The audit trail gets its own `shutdown_timeout` to reach the durable store.
    state.audit.flush_within(drain).await;
    // Last: a SQLite file is whole on its own after a clean stop (its `-wal` folded in).
    state.durable.close().await;
    result
}

/// How often a running gateway looks at its certificate's dates.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(6 * 3600);

/// A gateway runs for months: every few hours it says (at warn, at error once it has run out)
/// when its certificate runs out within 14 days, as start-up and SIGHUP do.
async fn watch_certificate(tls: Option<tls::Tls>) {
    let Some(tls) = tls else { return };
    let mut tick = tokio::time::interval(CERTIFICATE_CHECK);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match tls.check(now) {
            Ok(warnings) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
            }
            Err(e) => {
                tracing::error!("{e}: clients refuse it; put a new one in place and send SIGHUP")
            }
        }
    }
}

/// On every SIGHUP: reads the TLS certificate again (with `server.tls_cert`) and the GeoIP
/// database (`risk.geoip_database`). A file that does not load is refused with an error log and
/// the current one stays. Without either, SIGHUP is logged and ignored (never the end of the
/// process).
async fn reload_on_hangup(
    hangups: Hangups,
    tls: Option<tls::Tls>,
    risk: std::sync::Arc<crate::risk::Risk>,
) {
    #[cfg(unix)]
    {
        let Some(mut hangups) = hangups.0 else {
            return;
        };
        while hangups.recv().await.is_some() {
            if let Some(tls) = &tls {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                match tls.reload(now) {
                    Ok(warnings) => {
                        tracing::info!("SIGHUP: TLS certificate reloaded for new connections");
                        for w in warnings {
                            tracing::warn!("{w}");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: new TLS certificate refused; keeping the current one")
                    }
                }
            }
            // Reading a database whole takes a moment: not on a worker thread.
            let r = risk.clone();
            let reloaded = tokio::task::spawn_blocking(move || r.reload())
                .await
                .unwrap_or_else(|e| {
                    Err(crate::risk::GeoError {
                        path: risk.config().geoip_database.clone().unwrap_or_default(),
                        message: e.to_string(),
                    })
                });
            match reloaded {
                Ok(true) => tracing::info!("SIGHUP: GeoIP database reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: GeoIP database refused; keeping the current one")
                }
            }
            if tls.is_none() && risk.config().geoip_database.is_none() {
                tracing::info!("SIGHUP: nothing to reload");
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (tls, risk);
        std::future::pending::<()>().await;
    }
}

/// Starts the metrics and HTTP→HTTPS redirect listeners that are configured; they stop when
/// `stop` turns true. A listener that cannot bind stops the start-up.
async fn side_listeners(
    state: &AppState,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let mut apps = Vec::new();
    if let Some(addr) = &state.config.metrics.listen {
        let app = crate::metrics::router(state.metrics.clone(), state.login.hasher.clone())
            .merge(crate::http::health::probes(state.clone()));
        apps.push(("metrics", addr, app));
    }
    if let Some(addr) = &state.config.server.redirect_http_listen {
        apps.push((
            "redirect",
            addr,
            redirect_router(
                &state.config.server.public_url,
                state.config.server.max_uri_length,
            ),
        ));
    }
    for (what, addr, app) in apps {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
        })?;
        tracing::info!(listen = %addr, "{what} listener started");
        tasks.push(tokio::spawn(conn::serve(
            conn::Plain(listener),
            app,
            stop.clone(),
            state.config.server.header_timeout,
            state.config.server.body_timeout,
            connection_cap(state),
        )));
    }
    Ok(tasks)
}

/// The bound on connections per client address, one count per listener
/// (`server.max_connections_per_address`; the trusted proxies not counted).
fn connection_cap(state: &AppState) -> Option<Arc<cap::ConnectionCap>> {
    let s = &state.config.server;
    cap::ConnectionCap::new(
        s.max_connections_per_address,
        &s.trusted_proxies,
        "server.max_connections_per_address",
        Some(state.metrics.clone()),
    )
}

/// Answers every request with a 308 to the same path and query on the https origin of
/// `public_url`. The target never comes from the request's Host header, so the listener cannot
/// be made to redirect elsewhere. A target longer than `server.max_uri_length` is refused with
/// 414, as on the main listener, rather than copied into `Location`.
fn redirect_router(public_url: &url::Url, max_uri_length: usize) -> Router {
    let origin: Arc<str> = public_url.as_str().trim_end_matches('/').into();
    Router::new().fallback(move |uri: Uri, headers: axum::http::HeaderMap| {
        let origin = origin.clone();
        async move {
            let len = uri.path_and_query().map_or(0, |p| p.as_str().len());
            if len > max_uri_length {
                let refused = crate::http::error::AppError::new(
                    StatusCode::URI_TOO_LONG,
                    "uri_too_long",
                    "The address is too long.",
                );
                let html = crate::http::error::wants_html(&headers);
                return crate::http::error::render_errors(html, refused.into_response());
            }
            let path = uri
                .path_and_query()
                .map(|p| p.as_str())
                .filter(|p| p.starts_with('/'))
                .unwrap_or("/");
            let location = HeaderValue::from_str(&format!("{origin}{path}"))
                .or_else(|_| HeaderValue::from_str(&format!("{origin}/")));
            match location {
                Ok(l) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, l)]).into_response(),
                Err(_) => StatusCode::BAD_REQUEST.into_response(),
            }
        }
    })
}
