//! The gate in front of the console: every request outside the gateway's own routes passes here.
//! It is forwarded only for a session that completed the password *and* a second factor, whose
//! user is still enabled and has not voided it; everything else is refused — browsers are sent to
//! sign in, API clients get 401 JSON. Storage trouble fails closed (503).

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{wants_html, AppError};
use super::{apply_security_headers, csrf, get_cookie, see_other};
use crate::auth::flow::acr_for;
use crate::config::{Config, ConfigError};
use crate::metrics::Proxied;
use crate::policy::{is_gateway_path, normalise_path, safe_return_to};
use crate::proxy::Forwarding;
use crate::session::{self, Cached, Invalid};
use crate::state::AppState;
use crate::store::AuditEvent;
use crate::token::Identity;

/// The sign-in page, as the gate's redirects name it.
pub(crate) const LOGIN_PATH: &str = "/_portcullis/login";

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

/// Answer for a request that may not pass: browsers are sent to `login` (with `next` when
/// there is a safe place to return to), API clients get 401 JSON that names the sign-in URL.
pub(crate) fn refuse(
    state: &AppState,
    browser: bool,
    login: &str,
    (next, notice): (Option<&str>, Option<&str>),
    clear_cookie: bool,
) -> Response {
    let location = sign_in_location(login, next, notice.filter(|_| browser));
    let mut resp = if browser {
        see_other(&location)
    } else {
        authentication_required(login, &location)
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

/// The 401 an API client gets where it must sign in first: our error format (browsers that
/// cannot be redirected, e.g. websocket upgrades, get the HTML page), with the sign-in URL
/// (`location`: `login` with its `next`) added for clients that follow it.
pub(crate) fn authentication_required(login: &str, location: &str) -> Response {
    let message = format!("Sign in at {login} first.");
    let body = serde_json::json!({
        "error": "authentication_required",
        "message": message,
        "login": location,
    });
    let mut r =
        AppError::new(StatusCode::UNAUTHORIZED, "authentication_required", message).into_response();
    *r.body_mut() = axum::body::Body::from(body.to_string());
    if let Ok(v) =
        HeaderValue::from_str(&format!("Portcullis realm=\"console\", login=\"{login}\""))
    {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// The sign-in URL with its `next` parameter.
pub(crate) fn login_location(login: &str, next: Option<&str>) -> String {
    match next {
        Some(n) => format!("{login}?next={}", urlencode(n)),
        None => login.to_string(),
    }
}

/// The sign-in page's URL with `next` and a `notice` (a code of the sign-in page's: why the
/// browser is there).
pub(crate) fn sign_in_location(login: &str, next: Option<&str>, notice: Option<&str>) -> String {
    let mut location = login_location(login, next);
    if let Some(notice) = notice {
        location.push(if next.is_some() { '&' } else { '?' });
        location.push_str("notice=");
        location.push_str(notice);
    }
    location
}

/// Where a browser refused for want of a session goes back to after signing in, and what the
/// sign-in page tells it: a page read again (`GET`, `HEAD`) comes back, told its session ended
/// when it had one (`ended`: `Some`, with who ended it where that is known); a form cannot be sent again through a redirect, so the browser is
/// told it was not sent and comes back to the page it was on (`Referer`).
pub(crate) fn sign_in_return(
    state: &AppState,
    (method, target): (&Method, &str),
    headers: &HeaderMap,
    ended: Option<Option<crate::session::Ended>>,
) -> (Option<String>, Option<&'static str>) {
    if is_read(method) {
        (
            return_target(state, method, target),
            ended.map(crate::session::Ended::notice_of),
        )
    } else {
        (referring_page(state, headers), Some("not_sent"))
    }
}

/// Where sign-in sends a refused proxied request back to: its own path and query, if safe and
/// if the request can be repeated by following a link.
pub(crate) fn return_target(state: &AppState, method: &Method, target: &str) -> Option<String> {
    safe_return_to(target, &state.config.server.public_url).filter(|_| is_read(method))
}

/// `GET` or `HEAD`, in any letter case (as a proxy may pass on a client's `get`).
pub(crate) fn is_read(method: &Method) -> bool {
    let m = method.as_str();
    m.eq_ignore_ascii_case("GET") || m.eq_ignore_ascii_case("HEAD")
}

/// The step-up reason of a request a `[[step_up]]` rule held back (metrics).
pub(crate) const STEP_UP_REASON: &str = "sensitive_action";
/// The step-up reason of a request of a session held by the risk engine (metrics).
pub(crate) const RISK_REASON: &str = "session_risk";

/// The answer to a request a `[[step_up]]` rule held back: a browser navigation goes to
/// `/_portcullis/reauth` and comes back to `next` after the proof; anything else gets
/// `403 step_up_required` (an error page with a link for browsers) naming that page in `reauth`,
/// coming back to `back` (the page the form was on), since a form or API call cannot be
/// replayed through a redirect.
/// `status`: 403, or 401 for forward-auth (which a proxy such as nginx turns into a redirect).
/// `reason`: [`STEP_UP_REASON`], or [`RISK_REASON`] for a session held by the risk engine.
pub(crate) fn step_up_refusal(
    browser: bool,
    (next, back): (Option<&str>, Option<&str>),
    (key, reason): (bool, &str),
    status: StatusCode,
) -> Response {
    if let (true, Some(n)) = (browser, next) {
        return see_other(&super::reauth::url(n, key));
    }
    let reauth = super::reauth::url(next.or(back).unwrap_or("/"), key);
    let proof = if key {
        "a touch of your security key"
    } else {
        "your second factor"
    };
    let message = if reason == RISK_REASON {
        format!(
            "This session was just used from a place it could not have travelled to in the time. \
             Confirm it's you with {proof}, then send the request again: it was not sent."
        )
    } else {
        format!(
            "This action needs a recent confirmation with {proof}. Confirm it's you, then send \
             it again: it was not sent."
        )
    };
    step_up_answer(status, &message, reauth, "Confirm it's you")
}

/// A request held for a fresh proof: `step_up_required` with the step-up address (`reauth`
/// in the JSON, a link labelled `action` on the page).
pub(crate) fn step_up_answer(
    status: StatusCode,
    message: &str,
    reauth: String,
    action: &'static str,
) -> Response {
    let body = serde_json::json!({
        "error": "step_up_required",
        "message": message,
        "reauth": reauth,
    });
    let mut r = AppError {
        action: Some((reauth, action)),
        ..AppError::new(status, "step_up_required", message)
    }
    .into_response();
    *r.body_mut() = axum::body::Body::from(body.to_string());
    r
}

/// The same-origin page a request came from (`Referer`), as a safe return target.
pub(crate) fn referring_page(state: &AppState, headers: &HeaderMap) -> Option<String> {
    referring(state, headers, safe_return_to)
}

/// As [`referring_page`], where the gateway's own account and admin pages count too (see
/// [`crate::policy::safe_return_target`]).
pub(crate) fn referring_gateway_page(state: &AppState, headers: &HeaderMap) -> Option<String> {
    referring(state, headers, crate::policy::safe_return_target)
}

fn referring(
    state: &AppState,
    headers: &HeaderMap,
    safe: fn(&str, &url::Url) -> Option<String>,
) -> Option<String> {
    let referer = headers.get(header::REFERER)?.to_str().ok()?;
    let url = url::Url::parse(referer).ok()?;
    let public = &state.config.server.public_url;
    if url.origin() != public.origin() {
        return None;
    }
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    safe(&target, public)
}

/// What the gate decided about the session a request carries.
pub(crate) enum Decision {
    /// A signed-in user whose session completed a second factor: the identity token to send on
    /// (as the identity header's value), and the session.
    Pass(HeaderValue, Cached),
    /// No such session; `clear_cookie` when the cookie named a session that is no more, and
    /// `ended` where word was left of who ended it (the sign-in page's notice).
    Refuse {
        clear_cookie: bool,
        ended: Option<crate::session::Ended>,
    },
    /// A complete session without a valid device proof (`binding.enabled`); with the session's
    /// public id and whether a browser's form may be held for it from here
    /// ([`super::binding::may_hold`]).
    Unbound(super::binding::Unbound, String, bool),
    /// A complete, proven session asking for an action a `[[step_up]]` rule guards, whose last
    /// proof is older than the rule allows (`reason` [`STEP_UP_REASON`]; `key`: the rule wants
    /// a security key), or a session held by the risk engine until a second factor
    /// ([`RISK_REASON`]).
    StepUp {
        key: bool,
        reason: &'static str,
        /// The session's public id (a browser's form is held for it).
        session: String,
    },
}

/// How many session cookies of one request are looked at, the first included.
pub(crate) const SESSION_COOKIES_TRIED: usize = 4;

/// When the first session cookie a request carries names no session: a live session under
/// another cookie of the same name (one set for a parent domain or a narrower path by another
/// site of the domain, which the browser sends first, must not sign the user out). Plain HTTP
/// only: over HTTPS the cookie is `__Host-`, which no other site can set, so a second one is
/// the client's own doing and costs no further store reads.
pub(crate) async fn another_session(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<crate::session::Cached>, AppError> {
    if state.config.is_https() {
        return Ok(None);
    }
    let name = state.sessions.cookie_name();
    let first = get_cookie(headers, name);
    let mut tried = Vec::new();
    let others = super::cookie_values(headers, name)
        .skip(1)
        .filter(|v| Some(*v) != first)
        .take(SESSION_COOKIES_TRIED - 1);
    for value in others {
        if tried.contains(&value) {
            continue;
        }
        tried.push(value);
        if let Ok(l) = state.sessions.load_cached(Some(value)).await? {
            return Ok(Some(l));
        }
    }
    Ok(None)
}

/// The answer to a session the risk engine holds until a second factor (step 4), if it is.
fn risk_held(s: &crate::session::Session) -> Option<Decision> {
    s.held().then(|| Decision::StepUp {
        key: s.risk_hold_key,
        reason: RISK_REASON,
        session: s.public_id.clone(),
    })
}

/// The one policy shared by the proxy and the forward-auth endpoint: session → second factor
/// complete → user still admitted → identity → signed token. Storage trouble is an error (503),
/// never a pass.
pub(crate) async fn decide(
    state: &AppState,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
    (method, path): (&Method, &str),
) -> Result<Decision, AppError> {
    let cookie = get_cookie(headers, state.sessions.cookie_name());
    let mut loaded = match state.sessions.load_cached(cookie).await? {
        Ok(l) => l,
        Err(why) => match another_session(state, headers).await? {
            Some(l) => l,
            None => {
                // Only where a session is gone: read on the way to the sign-in page alone.
                let ended = match why {
                    Invalid::Unknown => state.sessions.ended_by_whom(cookie).await?,
                    _ => None,
                };
                return Ok(Decision::Refuse {
                    clear_cookie: why != Invalid::Missing,
                    ended,
                });
            }
        },
    };
    // Who is asking matters only for the audit trail of a refusal; built when needed.
    let client = || super::client(state, peer, headers);
    if !loaded.session.is_authenticated() {
        let client = client();
        // Between the password and the second factor: nothing of the console is reachable.
        let ev = AuditEvent::new("proxy_denied", "denied", state.clock.now())
            .reason("second_factor_incomplete");
        let ev = match state.durable.user_by_id(&loaded.session.user_id).await? {
            Some(u) => ev.user(&u),
            None => ev,
        };
        // A half-signed-in session can ask again and again: one run per session.
        state
            .audit
            .record_repeated(
                // Per user and network: decoy sessions of one address share a user id, and the
                // addresses of a replay from elsewhere stay apart from the owner's.
                format!(
                    "{}:{}",
                    loaded.session.user_id,
                    crate::auth::flow::network_of(&client.ip)
                ),
                ev.client(&client.ip, &client.user_agent),
            )
            .await;
        return Ok(Decision::Refuse {
            clear_cookie: false,
            ended: None,
        });
    }
    let Some(user) = state
        .user_gate
        .admit(state, &loaded.session.user_id, loaded.session.auth_ms)
        .await?
    else {
        let client = client();
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
        return Ok(Decision::Refuse {
            clear_cookie: true,
            ended: None,
        });
    };
    if state.config.binding.enabled {
        // Step 3 of the request path: a fresh proof from the device key the session is bound to.
        let context = super::binding::context_of(state, peer, headers);
        if let Some(why) =
            super::binding::check(state, loaded.record(), headers, &context, client).await?
        {
            let hold = super::binding::may_hold(&loaded.session, &why, &context, &client());
            let public_id = loaded.session.public_id.clone();
            return Ok(Decision::Unbound(why, public_id, hold));
        }
    }
    // Step 4: a session the risk engine holds until a second factor.
    if let Some(held) = risk_held(&loaded.session) {
        return Ok(held);
    }
    let s = &loaded.session;
    // Step 5: an action that needs a fresh proof (`[[step_up]]`).
    let proofs = (s.second_factor_ms(), s.strong_ms, state.clock.now_millis());
    if let Some(key) = crate::policy::step_up::unmet(&state.config.step_up, method, path, proofs) {
        return Ok(Decision::StepUp {
            key,
            reason: STEP_UP_REASON,
            session: s.public_id.clone(),
        });
    }
    if !state.sessions.touch(&mut loaded).await? {
        // Ended elsewhere a moment ago.
        return Ok(Decision::Refuse {
            clear_cookie: true,
            ended: None,
        });
    }
    // The touch reads the record again where it was written meanwhile: a hold set since counts.
    if let Some(held) = risk_held(&loaded.session) {
        return Ok(held);
    }
    let identity = Identity {
        sub: &user.id,
        email: &user.email,
        account: &user.account_id,
        amr: &loaded.session.amr,
        acr: acr_for(&loaded.session),
        auth_time: loaded.session.auth_ms / 1000,
        factor_time: loaded.session.second_factor_ms().map(|ms| ms / 1000),
        sid: &loaded.session.public_id,
    };
    let token = state
        .signer
        .token_for(&loaded.key, &identity)
        .map_err(|e| AppError::internal(&e))?;
    Ok(Decision::Pass(token, loaded))
}

/// How often an open WebSocket tunnel's session is checked again.
const TUNNEL_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// For a WebSocket tunnel: completes once the session it was opened under is over (ended,
/// expired, its user disabled or its sessions voided), checked every [`TUNNEL_RECHECK`] through
/// the same cache as the gate, or once the bound cookie it was opened with runs out
/// (`bound_until`, Unix milliseconds: a copied cookie reaches no further through a tunnel than
/// through requests). Storage trouble ends it too (fail closed; the client reconnects through
/// the gate).
fn session_watch(
    state: &AppState,
    opened_under: Cached,
    bound_until: Option<i64>,
) -> crate::proxy::Watch {
    let state = state.clone();
    let key: std::sync::Arc<str> = opened_under.key.into();
    let user_id: std::sync::Arc<str> = opened_under.session.user_id.as_str().into();
    let auth_ms = opened_under.session.auth_ms;
    std::sync::Arc::new(move || {
        let (state, key, user_id) = (state.clone(), key.clone(), user_id.clone());
        Box::pin(async move {
            let mut tick = tokio::time::interval(TUNNEL_RECHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if bound_until.is_some_and(|until| state.clock.now_millis() >= until) {
                    tracing::info!("websocket closed: the device proof it was opened with ran out");
                    return;
                }
                if !still_admitted(&state, &key, &user_id, auth_ms).await {
                    return;
                }
            }
        })
    })
}

/// Whether the session under `key` still lets its user through the gate.
async fn still_admitted(state: &AppState, key: &str, user_id: &str, auth_ms: i64) -> bool {
    let same = match state.sessions.load_cached_key(key.to_string()).await {
        // A session held by the risk engine keeps no tunnel open either.
        Ok(Ok(l)) => {
            l.session.is_authenticated() && l.session.user_id == user_id && !l.session.held()
        }
        Ok(Err(_)) => false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a websocket's session; closing it");
            false
        }
    };
    same && matches!(
        state.user_gate.admit(state, user_id, auth_ms).await,
        Ok(Some(_))
    )
}

/// The configured identity header's name (validated with the configuration).
pub(crate) fn token_header_name(config: &Config) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(config.token.header.as_bytes()).map_err(|_| ConfigError::Key {
        key: "token.header".into(),
        message: "is not a valid HTTP header name".into(),
    })
}

/// What every forwarded request shares, computed once at start-up: the scheme and host the
/// client used (from `server.public_url`), the gateway's cookies and the identity header that
/// never reach the upstream from the client. Each request fills in its own path, peer and token.
pub(crate) fn forwarding_template(config: &Config) -> Result<Forwarding, ConfigError> {
    let public = &config.server.public_url;
    let host = match public.port() {
        Some(p) => format!("{}:{p}", public.host_str().unwrap_or_default()),
        None => public.host_str().unwrap_or_default().to_string(),
    };
    let invalid = || ConfigError::Key {
        key: "server.public_url".into(),
        message: "its scheme and host cannot be sent as X-Forwarded-* headers".into(),
    };
    Ok(Forwarding {
        path_and_query: String::new(),
        peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        peer_trusted: false,
        proto: HeaderValue::from_str(public.scheme()).map_err(|_| invalid())?,
        host: HeaderValue::from_str(&host).map_err(|_| invalid())?,
        add_headers: Vec::new(),
        gateway_cookies: [
            session::COOKIE_HTTPS,
            session::COOKIE_HTTP,
            csrf::COOKIE_HTTPS,
            csrf::COOKIE_HTTP,
            crate::device::COOKIE_HTTPS,
            crate::device::COOKIE_HTTP,
            crate::binding::COOKIE_HTTPS,
            crate::binding::COOKIE_HTTP,
        ]
        .map(String::from)
        .into_iter()
        .chain(super::held::cookie_names())
        .collect(),
        strip_headers: [config.token.header.to_ascii_lowercase()].into(),
        watch: None,
    })
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn is_upgrade(req: &Request) -> bool {
    req.headers().contains_key(header::UPGRADE)
}

/// Whether a request that carries the user's cookies came from one of the console's own pages
/// (or a page of `upstream.allowed_origins`), as far as the browser tells: by its one `Origin`
/// (`null`, as sandboxed frames and some redirects send it, only where `Sec-Fetch-Site` vouches
/// for the same origin), or without one by `Sec-Fetch-Site`. Clients that send neither are not
/// browsers, and carry no ambient cookies of the user.
fn from_own_pages(state: &AppState, headers: &HeaderMap) -> bool {
    // A browser sends each of these once; a second one (which a console may read instead) is
    // taken as foreign.
    let mut sites = headers.get_all("sec-fetch-site").iter();
    let fetch_site = match (sites.next(), sites.next()) {
        (Some(_), Some(_)) => return false,
        (site, _) => site.map(HeaderValue::as_bytes),
    };
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let Some(origin) = origins.next() else {
        return fetch_site.is_none_or(|s| s == b"same-origin" || s == b"none");
    };
    if origins.next().is_some() {
        return false;
    }
    let origin = origin.as_bytes();
    own_origin(state, origin) || (origin == b"null" && fetch_site == Some(b"same-origin"))
}

/// Whether `origin` is the gateway's public origin or one of `upstream.allowed_origins`.
fn own_origin(state: &AppState, origin: &[u8]) -> bool {
    origin == super::login::public_origin(state).as_bytes()
        || state
            .config
            .upstream
            .allowed_origins
            .iter()
            .any(|o| o.as_bytes() == origin)
}

/// Whether the request carries an `Origin` that is not the console's own (or carries two): for
/// a request whose method is not known (a forward-auth question without it), where a
/// navigation from another site (which carries no `Origin`) must still pass.
pub(crate) fn foreign_origin(state: &AppState, headers: &HeaderMap) -> bool {
    let mut origins = headers.get_all(header::ORIGIN).iter();
    match (origins.next(), origins.next()) {
        (None, _) => false,
        (Some(o), None) => !own_origin(state, o.as_bytes()),
        (Some(_), Some(_)) => true,
    }
}

/// Refuses a WebSocket handshake a page of another origin started. Browsers send `Origin` with
/// every such handshake and let any page open one, with the site's cookies when the sites are
/// the same (a sibling subdomain): the console's pages are served at the gateway's origin, so
/// a socket opened from anywhere else is not the console's.
pub(crate) fn cross_site_upgrade(state: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    // As for a write, `Origin` and `Sec-Fetch-Site` alike; and a handshake says its page's
    // real origin, never `null` from the console's own pages.
    if from_own_pages(state, headers) && !foreign_origin(state, headers) {
        return Ok(());
    }
    tracing::info!("cross-origin WebSocket handshake refused");
    Err(AppError::forbidden(
        "cross_origin",
        "WebSocket connections are accepted only from the console's own pages.",
    ))
}

/// Refuses a request that changes something (any method but `GET`, `HEAD`, `OPTIONS`, `TRACE`)
/// which a page of another origin sent. The session cookies are `SameSite=Lax`: a browser sends
/// them with a form another page of the same site posts (another port of the host, a sibling
/// subdomain such as a tracking domain), so without this a page there could have the console
/// send a campaign as the signed-in user, cross-site request forgery the console would have to
/// stop itself.
pub(crate) fn cross_site_write(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), AppError> {
    if method.is_safe() || from_own_pages(state, headers) {
        return Ok(());
    }
    tracing::info!(%method, "request from another origin's page refused");
    Err(cross_origin_refusal())
}

/// The refusal of a request another origin's page sent.
pub(crate) fn cross_origin_refusal() -> AppError {
    AppError::forbidden(
        "cross_origin",
        "This request came from a page of another site. The console accepts changes only from \
         its own pages: go back to the console and try again there.",
    )
}

/// The fallback handler: gate, then forward.
pub async fn proxy(
    State(state): State<AppState>,
    super::Peer(peer): super::Peer,
    req: Request,
) -> Response {
    proxy_request(&state, peer, req).await
}

/// The gate and the forwarding of one request from `peer`, for [`proxy`] and for the paths that
/// [`super::Gateway`] sends here without the router.
pub(crate) async fn proxy_request(
    state: &AppState,
    peer: std::net::SocketAddr,
    req: Request,
) -> Response {
    answered(state, gate_and_forward(state, peer, req).await, false)
}

/// The answer to a gated request: the console's as it is (marked [`ConsoleAnswer`] with
/// `mark`), or the gateway's own, hardened as its pages are (refusals, redirects to sign in,
/// error pages when a store or the console is away).
fn answered(state: &AppState, result: Result<Answer, AppError>, mark: bool) -> Response {
    let mut own = match result {
        Ok(Answer::Upstream(mut r)) => {
            if mark {
                r.extensions_mut().insert(ConsoleAnswer);
            }
            return r;
        }
        Ok(Answer::Own(r)) => r,
        Err(e) => e.into_response(),
    };
    apply_security_headers(own.headers_mut(), state.config.is_https());
    own
}

/// Where a refused request goes on to after the proof it waits for: a browser's form, held
/// ([`super::held`]), to the page that sends it; a read, back to itself; anything else nowhere
/// (its answer names the page it came from).
async fn held_or_back(
    state: &AppState,
    session: (&str, std::net::SocketAddr),
    (path_and_query, back): (&str, &Option<String>),
    browser: bool,
    req: Request,
) -> Result<(Option<String>, Option<String>), AppError> {
    let read = return_target(state, req.method(), path_and_query);
    if !super::held::holdable(req.method(), req.headers(), browser) {
        return Ok((read, None));
    }
    let target = (path_and_query, back.clone());
    let held = super::held::hold(state, session, target, req).await;
    // A form that cannot be kept (the store did not answer) is the request's outcome.
    let held = held.inspect_err(|_| state.metrics.proxied(Proxied::Unavailable))?;
    Ok(match held {
        Some(held) => (Some(held.page), Some(held.cookie)),
        None => (read, None),
    })
}

/// `resp` with the cookie that ties a held form to the browser that sent it, if one was held.
fn with_held_cookie(mut resp: Response, cookie: Option<String>) -> Response {
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// A console's answer to a form sent from the held page ([`super::held`]): its headers are
/// its own, not the gateway's pages'.
#[derive(Clone, Copy)]
pub(crate) struct ConsoleAnswer;

/// Sends a held form through the gate and on to the console, as [`proxy_request`] does; the
/// console's answer is marked [`ConsoleAnswer`].
pub(crate) async fn forward_held(
    state: &AppState,
    peer: std::net::SocketAddr,
    req: Request,
) -> Response {
    answered(state, gate_and_forward(state, peer, req).await, true)
}

/// The `Allow` of a `405` for a method the gateway never forwards: the methods the console is
/// sent (any other, `CONNECT` and `TRACE` aside, is forwarded too).
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// The answer to `CONNECT`, `TRACE` or `TRACK` for the console: never forwarded, whoever asks
/// (`405` with the methods that are).
fn unforwarded_method() -> Response {
    let mut r = AppError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "The gateway does not forward this method (CONNECT, TRACE, TRACK) to the console.",
    )
    .into_response();
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
    r
}

/// What a proxied request is answered with: the console's answer, or the gateway's own.
enum Answer {
    Upstream(Response),
    Own(Response),
}

async fn gate_and_forward(
    state: &AppState,
    peer: std::net::SocketAddr,
    req: Request,
) -> Result<Answer, AppError> {
    let canonical = normalise_path(req.uri().path()).map_err(|e| {
        state.metrics.proxied(Proxied::Denied);
        AppError::bad_request(e.to_string())
    })?;
    if is_gateway_path(&canonical) {
        // The gateway's namespace in any other spelling: never forwarded.
        state.metrics.proxied(Proxied::Denied);
        return Err(AppError::not_found());
    }
    if is_upgrade(&req) {
        cross_site_upgrade(state, req.headers())
            .inspect_err(|_| state.metrics.proxied(Proxied::Denied))?;
    }
    cross_site_write(state, req.method(), req.headers())
        .inspect_err(|_| state.metrics.proxied(Proxied::Denied))?;
    // A method the console is never sent is refused as such, session or not.
    if crate::proxy::never_forwarded(req.method()) {
        state.metrics.proxied(Proxied::Denied);
        return Ok(Answer::Own(unforwarded_method()));
    }
    // A body in a transfer coding besides `chunked` (RFC 9112 §6.1: 501), which would reach the
    // console stripped of it.
    if let Some(coding) = crate::proxy::other_transfer_coding(req.headers()) {
        state.metrics.proxied(Proxied::Denied);
        tracing::info!(%coding, "a request body in another transfer coding than chunked refused");
        return Err(AppError::new(
            StatusCode::NOT_IMPLEMENTED,
            "transfer_coding",
            "The request's body is sent in a transfer coding the gateway does not support: \
             send it plain or chunked (a compressed body says so in Content-Encoding).",
        ));
    }
    let path_len = canonical.len();
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{canonical}?{q}"),
        None => canonical,
    };
    let path = &path_and_query[..path_len];
    let decision = decide(state, peer, req.headers(), (req.method(), path)).await;
    let decision = decision.inspect_err(|_| state.metrics.proxied(Proxied::Unavailable))?;
    let browser = wants_html(req.headers()) && !is_upgrade(&req);
    let watch;
    let token = match decision {
        Decision::Pass(token, loaded) => {
            watch = is_upgrade(&req).then(|| {
                let until = state.config.binding.enabled.then(|| {
                    let context = super::binding::context_of(state, peer, req.headers());
                    super::binding::bound_until(state, &loaded.session, req.headers(), &context)
                });
                session_watch(state, loaded, until.flatten())
            });
            token
        }
        Decision::Unbound(why, session, hold) => {
            state.metrics.step_up("device_proof_required");
            let bind = super::binding::BIND_PATH;
            let back = referring_page(state, req.headers());
            // A browser's form is kept until this browser has proven itself again (a bound
            // cookie that ran out while the form was being filled in), then sent; never for a
            // proof that failed, for a bound cookie presented from elsewhere (`Moved`, a sign of
            // a copy), nor from another place than the key last proved itself.
            let (n, cookie) = match hold {
                true => {
                    held_or_back(
                        state,
                        (&session, peer),
                        (&path_and_query, &back),
                        browser,
                        req,
                    )
                    .await?
                }
                false => (return_target(state, req.method(), &path_and_query), None),
            };
            state.metrics.proxied(Proxied::Denied);
            let refused =
                super::binding::refusal(state, why, browser, bind, (n.as_deref(), back.as_deref()));
            return Ok(Answer::Own(with_held_cookie(refused, cookie)));
        }
        Decision::StepUp {
            key,
            reason,
            session,
        } => {
            state.metrics.step_up(reason);
            let back = referring_page(state, req.headers());
            // A browser's form is kept until the proof, then sent (see `held`).
            let (n, cookie) = held_or_back(
                state,
                (&session, peer),
                (&path_and_query, &back),
                browser,
                req,
            )
            .await?;
            state.metrics.proxied(Proxied::Denied);
            let pages = (n.as_deref(), back.as_deref());
            let why = (key, reason);
            let refused = step_up_refusal(browser, pages, why, StatusCode::FORBIDDEN);
            return Ok(Answer::Own(with_held_cookie(refused, cookie)));
        }
        Decision::Refuse {
            clear_cookie,
            ended,
        } => {
            state.metrics.proxied(match browser {
                true => Proxied::SignInRedirect,
                false => Proxied::Denied,
            });
            let (n, notice) = sign_in_return(
                state,
                (req.method(), &path_and_query),
                req.headers(),
                clear_cookie.then_some(ended),
            );
            // The dead cookie is cleared by the answer that tells the browser (a page's
            // navigation), not by a request of the page's own (a poll, an image, a script), which
            // would leave the next navigation without a word on why it must sign in.
            return Ok(Answer::Own(refuse(
                state,
                browser,
                LOGIN_PATH,
                (n.as_deref(), notice),
                clear_cookie && browser,
            )));
        }
    };
    // One line per forwarded request where asked for (`log.requests`): the path without its
    // query, which may carry tokens.
    let logged = state.config.log.requests.then(|| {
        (
            req.method().clone(),
            path.to_string(),
            std::time::Instant::now(),
        )
    });
    let fwd = Forwarding {
        path_and_query,
        peer,
        peer_trusted: crate::proxy::is_trusted(peer.ip(), &state.config.server.trusted_proxies),
        add_headers: vec![(state.token_header.clone(), token)],
        watch,
        ..state.forwarding.clone()
    };
    // For the log line of a failure (a shared buffer's count, not a copy).
    let uri = req.uri().clone();
    match state.upstream.forward(req, fwd).await {
        Ok(r) => {
            state.metrics.proxied(Proxied::Forwarded);
            if let Some((method, path, started)) = logged {
                let status = r.status().as_u16();
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(%method, path = path.as_str(), status, ms, "forwarded");
            }
            Ok(Answer::Upstream(r))
        }
        Err(e @ crate::proxy::ProxyError::RequestBody(_)) => {
            state.metrics.proxied(Proxied::Denied);
            tracing::info!(error = %e, "request body broke off or was malformed; not forwarded whole");
            Err(AppError::bad_request(
                "The request body was malformed or ended before its announced length.",
            ))
        }
        Err(crate::proxy::ProxyError::RequestBodyStalled) => {
            state.metrics.proxied(Proxied::Denied);
            tracing::info!("request body stalled past server.body_timeout; not forwarded whole");
            Err(AppError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "The request's body stopped arriving. Try again.",
            ))
        }
        Err(e @ crate::proxy::ProxyError::MethodNotAllowed) => {
            state.metrics.proxied(Proxied::Denied);
            tracing::info!(error = %e, "CONNECT or TRACE to the console refused");
            Ok(Answer::Own(unforwarded_method()))
        }
        Err(e) => {
            state.metrics.proxied(Proxied::Unavailable);
            // What went wrong, as far as the connection tells (never a header value or a query):
            // garbage from the console, a reset, a timeout.
            let cause = std::iter::successors(std::error::Error::source(&e), |c| c.source())
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": ");
            tracing::warn!(error = %e, %cause, path = uri.path(), "upstream request failed");
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
            Err(AppError::new(status, code, msg))
        }
    }
}
