//! The gate in front of the console: every request outside the gateway's own routes passes here.
//! It is forwarded only for a session that completed the password *and* a second factor, whose
//! user is still enabled and has not voided it; everything else is refused — browsers are sent to
//! sign in, API clients get 401 JSON. Storage trouble fails closed (503).

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{wants_html, AppError};
use super::{apply_security_headers, csrf, get_cookie, see_other};
use crate::auth::flow::acr_for;
use crate::policy::{is_gateway_path, normalise_path, safe_return_to};
use crate::proxy::Forwarding;
use crate::session::{self, Invalid};
use crate::state::AppState;
use crate::store::AuditEvent;
use crate::token::Identity;

/// `GET /.well-known/jwks.json`.
pub async fn jwks(State(state): State<AppState>) -> Response {
    let mut r = state.signer.jwks_json().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    r
}

/// Answer for a request that may not pass.
fn refuse(state: &AppState, req: &Request, canonical: &str, clear_cookie: bool) -> Response {
    let browser = wants_html(req.headers()) && !is_upgrade(req);
    let mut resp = if browser {
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let target = format!("{canonical}{query}");
        let next = safe_return_to(&target, &state.config.server.public_url)
            .filter(|_| matches!(*req.method(), Method::GET | Method::HEAD));
        let location = match next {
            Some(n) => format!("/_portcullis/login?next={}", urlencode(&n)),
            None => "/_portcullis/login".to_string(),
        };
        see_other(&location)
    } else {
        let mut r = AppError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_required",
            "Sign in at /_portcullis/login first.",
        )
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Portcullis realm=\"console\", login=\"/_portcullis/login\""),
        );
        r
    };
    if clear_cookie {
        if let Ok(v) = HeaderValue::from_str(&state.sessions.clear_cookie()) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn is_upgrade(req: &Request) -> bool {
    req.headers().contains_key(header::UPGRADE)
}

/// The fallback handler: gate, then forward.
pub async fn proxy(
    State(state): State<AppState>,
    super::Peer(peer): super::Peer,
    req: Request,
) -> Response {
    match gate_and_forward(&state, peer, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn gate_and_forward(
    state: &AppState,
    peer: std::net::SocketAddr,
    req: Request,
) -> Result<Response, AppError> {
    let canonical =
        normalise_path(req.uri().path()).map_err(|e| AppError::bad_request(e.to_string()))?;
    if is_gateway_path(&canonical) {
        // The gateway's namespace in any other spelling: never forwarded.
        let mut r = AppError::not_found().into_response();
        apply_security_headers(r.headers_mut(), state.config.is_https());
        return Ok(r);
    }
    let cookie = get_cookie(req.headers(), state.sessions.cookie_name());
    let mut loaded = match state.sessions.load(cookie).await? {
        Ok(l) => l,
        Err(why) => return Ok(refuse(state, &req, &canonical, why != Invalid::Missing)),
    };
    let client = super::client(state, peer, req.headers());
    if !loaded.session.is_authenticated() {
        // Between the password and the second factor: nothing of the console is reachable.
        let ev = AuditEvent::new("proxy_denied", "denied", state.clock.now())
            .reason("second_factor_incomplete");
        let ev = match state.durable.user_by_id(&loaded.session.user_id).await? {
            Some(u) => ev.user(&u),
            None => ev,
        };
        state
            .audit
            .record(ev.client(&client.ip, &client.user_agent))
            .await;
        return Ok(refuse(state, &req, &canonical, false));
    }
    let Some(user) = state
        .user_gate
        .admit(state, &loaded.session.user_id, loaded.session.auth_ms)
        .await?
    else {
        state
            .sessions
            .destroy(&loaded.key, &loaded.session.user_id)
            .await?;
        state.signer.forget(&loaded.key);
        let ev = AuditEvent::new("session_ended", "denied", state.clock.now())
            .reason("user_disabled_or_sessions_revoked");
        let ev = ev.client(&client.ip, &client.user_agent);
        let ev = AuditEvent {
            user_id: Some(loaded.session.user_id.clone()),
            ..ev
        };
        state.audit.record(ev).await;
        return Ok(refuse(state, &req, &canonical, true));
    };
    state.sessions.touch(&mut loaded).await?;
    let identity = Identity {
        sub: user.id.clone(),
        email: user.email.clone(),
        account: user.account_id.clone(),
        amr: loaded.session.amr.clone(),
        acr: acr_for(&loaded.session.amr).to_string(),
        auth_time: loaded.session.auth_ms / 1000,
        sid: loaded.session.public_id.clone(),
    };
    let token = state
        .signer
        .token_for(&loaded.key, &identity)
        .map_err(|e| AppError::internal(&e))?;
    let header_name = HeaderName::from_bytes(state.config.token.header.as_bytes())
        .map_err(|e| AppError::internal(&e))?;
    let header_value = HeaderValue::from_str(&token).map_err(|e| AppError::internal(&e))?;
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{canonical}?{q}"),
        None => canonical,
    };
    let public = &state.config.server.public_url;
    let host = match public.port() {
        Some(p) => format!("{}:{p}", public.host_str().unwrap_or_default()),
        None => public.host_str().unwrap_or_default().to_string(),
    };
    let fwd = Forwarding {
        path_and_query,
        peer,
        peer_trusted: crate::proxy::is_trusted(peer.ip(), &state.config.server.trusted_proxies),
        proto: public.scheme().to_string(),
        host,
        add_headers: vec![(header_name, header_value)],
        gateway_cookies: [
            session::COOKIE_HTTPS,
            session::COOKIE_HTTP,
            csrf::COOKIE_HTTPS,
            csrf::COOKIE_HTTP,
            crate::device::COOKIE_HTTPS,
            crate::device::COOKIE_HTTP,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        strip_headers: vec![state.config.token.header.to_ascii_lowercase()],
    };
    match state.upstream.forward(req, fwd).await {
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::warn!(error = %e, "upstream request failed");
            let status = e.status();
            let (code, msg) = if status == StatusCode::GATEWAY_TIMEOUT {
                (
                    "upstream_timeout",
                    "The console did not answer in time. Please try again.",
                )
            } else {
                (
                    "upstream_unavailable",
                    "The console cannot be reached right now. Please try again shortly.",
                )
            };
            Ok(AppError::new(status, code, msg).into_response())
        }
    }
}
