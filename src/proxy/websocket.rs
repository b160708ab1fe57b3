//! WebSocket pass-through. The handshake is forwarded like any request (with `Connection:
//! upgrade` and `Upgrade: websocket` put back after hop-by-hop removal); once the upstream agrees
//! with `101 Switching Protocols`, both upgraded connections are joined byte-for-byte.
//!
//! Only WebSocket upgrades are forwarded. Other protocols (notably `h2c`) are dropped with the
//! hop-by-hop headers: tunnelling them would hand the client a raw connection to the upstream
//! that later requests could use without passing the gateway's checks.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::headers;

/// Whether `req` asks for a WebSocket upgrade: an HTTP/1.1 `GET` with `Connection: upgrade` and
/// `websocket` among the `Upgrade` protocols (tokens compared ignoring case, as RFC 9110 says).
pub(crate) fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(req.headers(), header::CONNECTION, "upgrade")
        && has_token(req.headers(), header::UPGRADE, "websocket")
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Puts back the two headers that make the upstream request a WebSocket handshake, after hop-by-hop
/// removal took them away. Only `websocket` is offered, whatever else the client listed.
pub(crate) fn restore_handshake(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// Held by the task of one client connection while it is open, so that a graceful shutdown
/// waits for it (within `server.shutdown_timeout`), with the connection's place under the bound
/// on connections per address (none where the listener has no bound, or its stream carries its
/// place itself); put in an upgrade request's extensions by the accept loop, for the tunnel that
/// outlives the HTTP connection, so that it counts as the connection it was.
#[derive(Clone, Debug)]
pub struct ConnectionHold(
    pub tokio::sync::watch::Receiver<()>,
    pub Option<std::sync::Arc<crate::server::cap::Admitted>>,
);

/// Answers the client with the upstream's `101` (its `Sec-WebSocket-*` headers intact) and spawns
/// the task that joins the two upgraded connections once both sides have switched.
///
/// With `watch`, the tunnel lasts only as long as the future it makes has not completed: the
/// caller's authorisation of the connection (the session it was opened under). Both connections
/// are then closed.
pub(crate) fn tunnel(
    inbound: OnUpgrade,
    mut upstream: Response<Incoming>,
    gateway_cookies: &[String],
    (watch, hold): (Option<super::Watch>, Option<ConnectionHold>),
) -> axum::response::Response {
    let upstream_io = hyper::upgrade::on(&mut upstream);
    let (parts, _body) = upstream.into_parts();
    let mut headers = parts.headers;
    headers::remove_hop_by_hop(&mut headers);
    headers::filter_response_cookies(&mut headers, gateway_cookies);
    restore_handshake(&mut headers);

    tokio::spawn(async move {
        // A shutdown drains the tunnel as it drains the connection it came from.
        let _hold = hold;
        // The inbound side resolves only after hyper has written our 101 to the client.
        let (client, server) = match tokio::try_join!(inbound, upstream_io) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut server = TokioIo::new(server);
        let ended = async move {
            match watch {
                Some(w) => w().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut server) => match copied {
                Ok((up, down)) => {
                    tracing::debug!(bytes_up = up, bytes_down = down, "websocket tunnel closed");
                }
                Err(e) => tracing::debug!(error = %e, "websocket tunnel ended with an error"),
            },
            () = ended => {
                // Dropping both connections closes them.
                tracing::info!("websocket closed: what it was opened under (its session, its device proof) has ended");
            }
        }
    });

    let mut response = axum::response::Response::new(axum::body::Body::empty());
    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    response
}

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn req(method: Method, version: Version, pairs: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().method(method).version(version);
        for (k, v) in pairs {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn only_websocket_get_upgrades_count() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ];
        assert!(is_upgrade_request(&req(Method::GET, Version::HTTP_11, &ws)));
        assert!(!is_upgrade_request(&req(
            Method::POST,
            Version::HTTP_11,
            &ws
        )));
        assert!(!is_upgrade_request(&req(
            Method::GET,
            Version::HTTP_10,
            &ws
        )));
        let h2c = [("connection", "upgrade"), ("upgrade", "h2c")];
        assert!(!is_upgrade_request(&req(
            Method::GET,
            Version::HTTP_11,
            &h2c
        )));
        let no_conn = [("upgrade", "websocket")];
        assert!(!is_upgrade_request(&req(
            Method::GET,
            Version::HTTP_11,
            &no_conn
        )));
    }

    #[test]
    fn handshake_offers_websocket_only() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c, websocket"));
        headers::remove_hop_by_hop(&mut h);
        restore_handshake(&mut h);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
