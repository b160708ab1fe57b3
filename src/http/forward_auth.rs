//! Forward-auth mode: `/_portcullis/auth` answers another reverse proxy (nginx `auth_request`,
//! Traefik `forwardAuth`, Caddy `forward_auth`) whether the request it holds may pass. The
//! decision is the gate's own ([`super::gate::decide`]); only the answer differs: 200 with the
//! identity token in the configured header, 401 JSON (API clients) or a redirect to sign-in
//! (browsers), 403 for the gateway's own namespace, 503 when storage fails.
//!
//! The original request's method and target are believed only from trusted proxies; anybody
//! else is taken to be asking about `/`, so a client cannot steer the sign-in `next` or dodge
//! the namespace check with a header of its choosing.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{wants_html, AppError};
use super::gate::{decide, refuse, return_target, Decision, LOGIN_PATH};
use crate::metrics::ForwardAuth;
use crate::policy::{is_gateway_path, normalise_path};
use crate::state::AppState;

/// The original request as the asking proxy describes it.
struct Original {
    method: Method,
    /// The method step-up rules are matched with: the original's, or
    /// [`unknown_method`](crate::policy::step_up::unknown_method) when the asking proxy did not
    /// say it (nginx asks with `GET` whatever the client sent: a `POST` the rules guard must not
    /// pass as one).
    rule_method: Method,
    /// Path and query.
    target: String,
}

/// A refusal of the original request as the asking proxy describes it: `403
/// bad_original_request` (a proxy's auth check relays 401 and 403 as refusals; nginx would turn
/// a 400 into a 500 and then into "temporarily unavailable").
fn bad_original(message: impl Into<String>) -> AppError {
    AppError::forbidden("bad_original_request", message)
}

/// The first of `names` present, with its name as the refusals show it; `Err` when it came more
/// than once (which copy the console's proxy acts on cannot be told).
fn first_header<'a>(
    headers: &'a HeaderMap,
    names: &[(&'static str, &'static str)],
) -> Result<Option<(&'static str, &'a HeaderValue)>, AppError> {
    let Some(&(name, shown)) = names.iter().find(|(n, _)| headers.contains_key(*n)) else {
        return Ok(None);
    };
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(bad_original(format!(
            "The original request is described twice ({shown}): the asking proxy must replace \
             the header, not add to it."
        )));
    }
    Ok(first.map(|v| (shown, v)))
}

/// Reads the original method and target; only a trusted peer's headers count. A header that
/// is there but cannot be what it names is refused, never read as absent: a target the gateway
/// took for `/` would pass a request its rules guard.
fn original(
    method: &Method,
    headers: &HeaderMap,
    (peer, trusted): (std::net::IpAddr, bool),
) -> Result<Original, AppError> {
    const TARGET: [(&str, &str); 2] = [
        ("x-forwarded-uri", "X-Forwarded-Uri"),
        ("x-original-uri", "X-Original-URI"),
    ];
    const METHOD: [(&str, &str); 2] = [
        ("x-forwarded-method", "X-Forwarded-Method"),
        ("x-original-method", "X-Original-Method"),
    ];
    if !trusted {
        // A proxy left out of `server.trusted_proxies` has every request checked as `GET /`,
        // which no step-up rule guards: said in the log, since nothing else shows it.
        if TARGET.iter().any(|(n, _)| headers.contains_key(*n)) {
            static LAST: AtomicU64 = AtomicU64::new(0);
            misconfigured(
                &LAST,
                format_args!(
                    "a forward-auth check from {peer} describes its request (X-Forwarded-Uri or \
                 X-Original-URI), but {peer} is not in server.trusted_proxies: it was checked \
                 as `/`, where no [[step_up]] rule applies; add the proxy's address"
                ),
            );
        }
        return Ok(Original {
            method: method.clone(),
            rule_method: method.clone(),
            target: "/".into(),
        });
    }
    let (method, rule_method) = match first_header(headers, &METHOD)? {
        Some((name, m)) => {
            let m = Method::from_bytes(m.as_bytes().trim_ascii()).map_err(|_| {
                bad_original(format!(
                    "The original request's method ({name}) is not one."
                ))
            })?;
            (m.clone(), m)
        }
        None => (method.clone(), crate::policy::step_up::unknown_method()),
    };
    let target = match first_header(headers, &TARGET)? {
        Some((name, t)) => readable_target(t.as_bytes()).ok_or_else(|| {
            bad_original(format!(
                "The original request's address ({name}) holds spaces or control characters."
            ))
        })?,
        None => {
            static LAST: AtomicU64 = AtomicU64::new(0);
            misconfigured(
                &LAST,
                format_args!(
                "the forward-auth check from {peer} names no original address (X-Forwarded-Uri \
                 or X-Original-URI): it was checked as `/`, where no [[step_up]] rule applies; \
                 see docs/forward-auth.md for the proxy's configuration"
            ),
            );
            "/".into()
        }
    };
    Ok(Original {
        method,
        rule_method,
        target,
    })
}

/// Where a proof (device, step-up) returns to: the original URI for a page (`GET`/`HEAD`),
/// else the page the form was on (`Referer`, same origin only), as in proxy mode.
/// The notice by which the step-up and device-proof pages say that a form was not passed on
/// (to be sent again once the proof is made).
const NOT_SENT: &str = "not_sent";

fn pages(
    state: &AppState,
    orig: &Original,
    headers: &HeaderMap,
) -> (Option<String>, Option<String>) {
    let next = return_target(state, &orig.method, &orig.target);
    let back = match next {
        Some(_) => None,
        None => super::gate::referring_page(state, headers),
    };
    (next, back)
}

/// Logs a warning about the asking proxy's configuration, at most once a minute (every check
/// of a misconfigured proxy would repeat it).
fn misconfigured(last_at: &AtomicU64, what: std::fmt::Arguments<'_>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = last_at.load(Ordering::Relaxed);
    if now >= last.saturating_add(60)
        && last_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!("{what}");
    }
}

/// A target as a proxy passes it on (nginx's `$request_uri` is the request line's, bytes as
/// the client sent them): bytes beyond ASCII percent-encoded, as the console's framework will
/// decode them, so rules see the path the console acts on. `None` for spaces and control
/// characters, which no request line's target holds.
fn readable_target(raw: &[u8]) -> Option<String> {
    // A space is in no request line's target either: two targets joined into one header
    // (`/x, /campaigns/7/send`, as intermediaries merge repeated lines) are refused with it.
    if raw.iter().any(|&b| b <= 0x20 || b == 0x7f) {
        return None;
    }
    Some(percent_encoding::percent_encode(raw, percent_encoding::CONTROLS).to_string())
}

/// `/_portcullis/auth`, any method.
pub async fn auth_any(
    State(state): State<AppState>,
    super::Peer(peer): super::Peer,
    req: Request,
) -> Response {
    let mut answer = if state.config.forward_auth.enabled {
        let (outcome, answer) = match check(&state, peer, req.method(), req.headers()).await {
            Ok(decided) => decided,
            Err(e) => {
                let outcome = match e.status.is_server_error() {
                    true => ForwardAuth::Unavailable,
                    false => ForwardAuth::Denied,
                };
                // nginx relays only the status: the reason is here, under the request id.
                if e.status == StatusCode::FORBIDDEN {
                    tracing::info!(status = 403, error = %e.code, "forward-auth check refused");
                }
                (outcome, e.into_response())
            }
        };
        state.metrics.forward_auth(outcome);
        answer
    } else {
        AppError::not_found().into_response()
    };
    // Anything but a 200 may reach the browser as it is (Traefik and Caddy relay refusals), so
    // it gets the headers of a gateway page; a 200 goes to the asking proxy only.
    if answer.status() != StatusCode::OK {
        super::apply_security_headers(answer.headers_mut(), state.config.is_https());
    }
    answer
}

async fn check(
    state: &AppState,
    peer: std::net::SocketAddr,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(ForwardAuth, Response), AppError> {
    let trusted = crate::proxy::is_trusted(peer.ip(), &state.config.server.trusted_proxies);
    // A WebSocket handshake the asking proxy holds (its key header travels end to end, where
    // `Upgrade` may not): another origin's page may not open it, as in proxy mode.
    if headers.contains_key(header::UPGRADE) || headers.contains_key(header::SEC_WEBSOCKET_KEY) {
        super::gate::cross_site_upgrade(state, headers)?;
    }
    // Another protocol asked for (`h2c`, `TLS/1.2`): a proxy that passes `Upgrade` on (Caddy,
    // Traefik) would hand the connection to the console once it agrees, a tunnel past every
    // later check. Proxy mode offers the console `websocket` alone; here the request is refused.
    if let Some(other) = crate::proxy::first_token_but(headers, header::UPGRADE, "websocket") {
        tracing::info!(protocol = %other, "forward-auth: an upgrade to another protocol than WebSocket refused");
        return Err(AppError::forbidden(
            "upgrade_refused",
            "Only WebSocket upgrades reach the console: a connection switched to another protocol \
             would pass the gateway's checks of every later request.",
        ));
    }
    let orig = original(method, headers, (peer.ip(), trusted))?;
    if crate::proxy::never_forwarded(&orig.method) {
        // 403, which every asking proxy relays as a refusal.
        return Err(AppError::forbidden(
            "method_not_allowed",
            "The gateway does not let this method (CONNECT, TRACE, TRACK) through to the console.",
        ));
    }
    // The asking proxy passes the client's `Origin` and `Sec-Fetch-Site` with its question.
    if orig.rule_method == crate::policy::step_up::unknown_method() {
        // The method was not said (nginx asks with `GET` whatever the client sent): a foreign
        // `Origin`, which a browser sends with every form post, is refused as for a write; a
        // navigation from another site carries none and passes.
        if super::gate::foreign_origin(state, headers) {
            tracing::warn!(
                "forward-auth: a request from another origin's page, its method not said \
                 (X-Forwarded-Method), refused"
            );
            return Err(super::gate::cross_origin_refusal());
        }
    } else {
        super::gate::cross_site_write(state, &orig.method, headers)?;
    }
    // The proxy forwards the client's headers to the console as they are: a method override
    // there would let the console act as for another method than the one checked here (a GET
    // passing as the POST a step-up rule guards). Proxy mode drops such headers; here the
    // request is refused.
    // In any spelling: `X_HTTP_Method_Override` reaches a CGI-style console as the same name.
    for (name, value) in headers {
        if crate::proxy::is_method_override(name.as_str()) {
            let same = value
                .to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case(orig.method.as_str()));
            if !same {
                // 403: a proxy's auth check relays it as a refusal (nginx turns a 400 into 500).
                return Err(AppError::forbidden(
                    "method_override",
                    "A method-override header is not accepted: send the request with its own method.",
                ));
            }
            continue;
        }
        // The client's own copy of the identity header, or of another proxy's identity or
        // client-address header, in a spelling the asking proxy does not replace or blank
        // (`X_Portcullis_Assertion`, `X_Forwarded_User`, `Remote_User`: nginx drops them by
        // default, Caddy and Traefik pass them on), would reach a CGI-style console as the
        // header itself. (Under their own names the asking proxy replaces or blanks them.)
        if crate::proxy::is_identity_alias(name.as_str(), state.token_header.as_str()) {
            return Err(AppError::forbidden(
                "identity_header",
                "The request carries an identity or client-address header (the gateway's own, or \
                 another proxy's such as X-Forwarded-User or Remote-User) spelled with `_` or \
                 other punctuation: a console would read it as that header, which only the \
                 gateway and the proxy set.",
            ));
        }
    }
    let path = orig.target.split(['?', '#']).next().unwrap_or_default();
    let canonical = normalise_path(path).map_err(|e| bad_original(e.to_string()))?;
    if is_gateway_path(&canonical) {
        return Err(AppError::forbidden(
            "gateway_path",
            "The gateway's own addresses are not behind forward authentication.",
        ));
    }
    match decide(state, peer, headers, (&orig.rule_method, &canonical)).await? {
        Decision::Pass(token, _) => {
            let mut r = StatusCode::OK.into_response();
            r.headers_mut().insert(state.token_header.clone(), token);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok((ForwardAuth::Allowed, r))
        }
        Decision::Unbound(why, _, _) => {
            let (next, back) = pages(state, &orig, headers);
            let bind = state
                .config
                .server
                .public_url
                .join(super::binding::BIND_PATH)
                .map_err(|e| AppError::internal(&e))?;
            let mut r = super::binding::refusal(
                state,
                why,
                wants_html(headers),
                bind.as_str(),
                (next.as_deref(), back.as_deref()),
            );
            // As for sign-in below: a 401 names the device-proof page in `Location` too, so a
            // proxy that turns 401 into its own redirect (nginx) sends the browser there.
            if r.status() == StatusCode::SEE_OTHER {
                *r.status_mut() = StatusCode::FOUND;
            } else if r.status() == StatusCode::UNAUTHORIZED {
                // A form (its page to return to): the proxy's redirect drops the 401's page, so
                // the device-proof page says that what was sent was not passed on.
                let form = !super::gate::is_read(&orig.method);
                let to = super::gate::sign_in_location(
                    bind.as_str(),
                    next.as_deref().or(back.as_deref()),
                    form.then_some(NOT_SENT),
                );
                if let Ok(to) = HeaderValue::from_str(&to) {
                    r.headers_mut().insert(header::LOCATION, to);
                }
            }
            Ok((ForwardAuth::DeviceProof, r))
        }
        Decision::StepUp { key, reason, .. } => {
            state.metrics.step_up(reason);
            let (next, back) = pages(state, &orig, headers);
            let mut r = super::gate::step_up_refusal(
                wants_html(headers),
                (next.as_deref(), back.as_deref()),
                (key, reason),
                StatusCode::UNAUTHORIZED,
            );
            let after = next.as_deref().or(back.as_deref()).unwrap_or("/");
            let mut page = super::reauth::url(after, key);
            // A form, which nothing holds here: the step-up page says it was not sent (a proxy
            // that turns the 401 into its own redirect drops the page that would say so).
            if !super::gate::is_read(&orig.method) {
                page.push_str("&notice=");
                page.push_str(NOT_SENT);
            }
            let reauth = state
                .config
                .server
                .public_url
                .join(&page)
                .map_err(|e| AppError::internal(&e))?;
            let location = HeaderValue::from_str(reauth.as_str()).ok();
            // As for sign-in: a 302 for a browser's navigation (also where its address was no
            // safe way back: then to the step-up page and on to the start), else a 401 naming
            // the page in `Location`, which a proxy that turns 401 into its own redirect (nginx)
            // follows.
            let navigation = wants_html(headers) && super::gate::is_read(&orig.method);
            if navigation && r.status() != StatusCode::SEE_OTHER {
                r = StatusCode::FOUND.into_response();
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            }
            if r.status() == StatusCode::SEE_OTHER {
                *r.status_mut() = StatusCode::FOUND;
            }
            if let Some(to) = location {
                r.headers_mut().insert(header::LOCATION, to);
            }
            Ok((ForwardAuth::StepUp, r))
        }
        Decision::Refuse {
            clear_cookie,
            ended,
        } => {
            // As the proxy does: a page comes back after sign-in (told its session ended), a
            // form is said not to be sent and its page comes back.
            let (next, notice) = super::gate::sign_in_return(
                state,
                (&orig.method, &orig.target),
                headers,
                clear_cookie.then_some(ended),
            );
            let login = state
                .config
                .server
                .public_url
                .join(LOGIN_PATH)
                .map_err(|e| AppError::internal(&e))?;
            // The dead cookie is cleared by the answer to a navigation, not to a request of the
            // page's own (a poll), which proxies such as Traefik and Caddy relay too. (nginx's
            // check asks as an API client but never relays the answer's cookies.)
            if wants_html(headers) {
                // The asking proxy relays the answer: a plain 302 is what all of them pass on.
                let mut r = refuse(
                    state,
                    true,
                    login.as_str(),
                    (next.as_deref(), notice),
                    clear_cookie,
                );
                *r.status_mut() = StatusCode::FOUND;
                return Ok((ForwardAuth::SignIn, r));
            }
            // A 401 names the sign-in URL in `Location` too, for proxies (nginx `auth_request`)
            // that turn 401 into their own redirect of the browser and cannot relay a 3xx: with
            // the notice the page shows, in the header and in the body alike.
            let to = super::gate::sign_in_location(login.as_str(), next.as_deref(), notice);
            let mut r = super::gate::authentication_required(login.as_str(), &to);
            let h = r.headers_mut();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Ok(to) = HeaderValue::from_str(&to) {
                h.insert(header::LOCATION, to);
            }
            Ok((ForwardAuth::SignIn, r))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    header::HeaderName::from_static(n),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    /// A proxy left out of `trusted_proxies`, or one that names no target, is checked as `/`
    /// and said in the log (once a minute); a trusted proxy that does not say the method has the
    /// rules applied as for any method.
    #[test]
    fn what_the_asking_proxy_leaves_out() {
        let (logs, _guard) = crate::test_logs::capture();
        let peer: std::net::IpAddr = "10.0.0.5".parse().unwrap();
        let described = headers(&[("x-original-uri", "/campaigns/7/send")]);
        for _ in 0..2 {
            let o = original(&Method::GET, &described, (peer, false)).unwrap();
            assert_eq!((o.method, o.rule_method), (Method::GET, Method::GET));
            assert_eq!(o.target, "/");
        }
        let text = logs.text();
        assert_eq!(
            text.matches("10.0.0.5 is not in server.trusted_proxies")
                .count(),
            1,
            "{text}"
        );
        // Trusted, with a target but no method: the method for the rules is any method.
        let o = original(&Method::GET, &described, (peer, true)).unwrap();
        assert_eq!(o.method, Method::GET);
        assert_eq!(o.rule_method, crate::policy::step_up::unknown_method());
        assert_eq!(o.target, "/campaigns/7/send");
        assert!(!logs.text().contains("names no original address"));
        // Trusted, without a target.
        let o = original(
            &Method::GET,
            &headers(&[("x-forwarded-method", "POST")]),
            (peer, true),
        )
        .unwrap();
        assert_eq!((o.method, o.target.as_str()), (Method::POST, "/"));
        assert!(
            logs.text().contains("names no original address"),
            "{}",
            logs.text()
        );
        // Told the method, the rules get it.
        let told = headers(&[("x-forwarded-uri", "/a"), ("x-forwarded-method", "DELETE")]);
        let o = original(&Method::GET, &told, (peer, true)).unwrap();
        assert_eq!((o.method, o.rule_method), (Method::DELETE, Method::DELETE));
    }
}
