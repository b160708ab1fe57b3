//! The web layer: the gateway's own pages and APIs under `/_portcullis/`, the JWKS, and the
//! fallback that sends everything else through the gate to the proxy. Handlers stay thin; the
//! decisions live in `auth`, `session` and `policy`.

pub mod account;
pub mod admin;
pub mod assets;
pub mod binding;
pub mod csrf;
pub mod devices;
pub mod enrolment;
pub mod error;
pub mod forward_auth;
pub mod gate;
pub mod health;
pub mod held;
pub mod login;
mod pages;
pub mod password;
pub mod reauth;
pub mod remembered;
pub mod request_id;
pub(crate) mod risk;
pub mod webauthn;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::auth::flow::Client;
use crate::state::AppState;
use error::AppError;

/// Content-Security-Policy of every gateway page: no inline script, no framing, no foreign
/// resources.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The router of the gateway's namespace: gateway routes, JWKS, forward-auth, and the gated proxy
/// as fallback (for unknown paths under the namespace, which the gate refuses). Served behind
/// [`Gateway`], which puts [`front`] before it.
pub fn router(state: AppState) -> Router {
    let form_limit = state.config.server.max_form_bytes;
    let gateway = Router::new()
        .route(
            "/_portcullis/login",
            get(login::login_get).post(login::login_post),
        )
        .route(
            "/_portcullis/mfa",
            get(login::mfa_get).post(login::mfa_post),
        )
        .route(
            "/_portcullis/enrol/totp",
            get(login::enrol_get).post(login::enrol_post),
        )
        .route(
            "/_portcullis/recovery-codes",
            get(login::codes_get).post(login::codes_post),
        )
        .route(
            "/_portcullis/logout",
            get(login::logout_get).post(login::logout_post),
        )
        .route(
            "/_portcullis/report",
            get(devices::report_get).post(devices::report_post),
        )
        .route(binding::BIND_PATH, get(binding::bind_get))
        .route("/_portcullis/static/binding.js", get(binding::binding_js))
        .route("/_portcullis/bind/challenge", post(binding::challenge_post))
        .route("/_portcullis/bind/register", post(binding::register_post))
        .route("/_portcullis/bind/refresh", post(binding::refresh_post))
        .route(
            binding::DBSC_REGISTER_PATH,
            post(binding::dbsc_register_post),
        )
        .route(binding::DBSC_REFRESH_PATH, post(binding::dbsc_refresh_post))
        .route("/_portcullis/account", get(account::account_get))
        .route(
            "/_portcullis/account/devices/{id}/revoke",
            post(account::revoke_device_post),
        )
        .route(
            "/_portcullis/account/devices/sign-out-others",
            post(account::sign_out_others_post),
        )
        .route(
            "/_portcullis/account/keys/{id}/rename",
            post(account::rename_post),
        )
        .route(
            "/_portcullis/account/keys/{id}/remove",
            post(account::remove_post),
        )
        .route(
            "/_portcullis/account/recovery-codes",
            get(account::recovery_codes_get).post(account::recovery_codes_post),
        )
        .route("/_portcullis/account/totp", post(account::totp_post))
        .route(
            "/_portcullis/account/password",
            post(password::password_post),
        )
        .route(
            "/_portcullis/account/totp/confirm",
            post(account::totp_confirm_post),
        )
        .route(
            "/_portcullis/webauthn/register/start",
            post(webauthn::register_start),
        )
        .route(
            "/_portcullis/webauthn/register/finish",
            post(webauthn::register_finish),
        )
        .route(
            "/_portcullis/webauthn/authenticate/start",
            post(webauthn::authenticate_start),
        )
        .route(
            "/_portcullis/webauthn/authenticate/finish",
            post(webauthn::authenticate_finish),
        )
        .route(
            "/_portcullis/webauthn/passkey/start",
            post(webauthn::passkey_start),
        )
        .route(
            "/_portcullis/webauthn/passkey/finish",
            post(webauthn::passkey_finish),
        )
        .route(remembered::PATH, get(remembered::page_get))
        .route(
            "/_portcullis/remembered/challenge",
            post(remembered::challenge_post),
        )
        .route(
            "/_portcullis/remembered/finish",
            post(remembered::finish_post),
        )
        .route("/_portcullis/remembered/skip", post(remembered::skip_post))
        .route(
            "/_portcullis/reauth",
            get(reauth::reauth_get).post(reauth::reauth_post),
        )
        .route(reauth::DONE, get(reauth::done_get))
        .route(
            "/_portcullis/webauthn/reauth/start",
            post(reauth::key_start),
        )
        .route(
            "/_portcullis/webauthn/reauth/finish",
            post(reauth::key_finish),
        )
        .route(
            "/_portcullis/enrol",
            get(enrolment::enrol_link_get).post(enrolment::enrol_link_post),
        )
        .route(held::PATH, get(held::held_get).post(held::held_post))
        .route("/_portcullis/static/{file}", get(assets::asset))
        .route("/_portcullis/healthz", get(health::healthz_get))
        .route("/_portcullis/readyz", get(health::readyz_get))
        .route("/.well-known/jwks.json", get(gate::jwks))
        .merge(admin::router(state.clone()))
        // A known address asked with a method it does not take: a page or JSON like every other
        // refusal (axum's own answer has no body).
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            binding::guard_session_pages,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            login::guard_sign_in_steps,
        ))
        .layer(DefaultBodyLimit::max(form_limit))
        .layer(middleware::from_fn_with_state(state.clone(), bounded_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            security_headers,
        ));
    Router::new()
        .merge(gateway)
        // Asked once per request of the console by the reverse proxy in front: outside the
        // page layers, like the proxy fallback (it sets its own headers, see `forward_auth`).
        .route("/_portcullis/auth", any(forward_auth::auth_any))
        .fallback(gate::proxy)
        .with_state(state)
}

/// A known address asked with a method it does not take. A browser opening an address that
/// only takes forms (the address bar after a refused form, a bookmark, a reload) is sent to the
/// page the form is on; anything else gets `405`.
pub(crate) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    if gate::is_read(&method) && error::wants_html(&headers) {
        if let Some(page) = page_of_action(uri.path()) {
            return see_other(&page);
        }
    }
    AppError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This address does not take that kind of request.",
    )
    .into_response()
}

/// The page whose forms post to the gateway address `path`: the account page's, or the admin
/// console's page of the form ([`admin::page_of_form`]).
fn page_of_action(path: &str) -> Option<String> {
    if path.starts_with("/_portcullis/account/") {
        return Some("/_portcullis/account".into());
    }
    path.starts_with("/_portcullis/admin/")
        .then(|| admin::page_of_form(path))
}

/// The gateway as one service, the only one the listener serves: [`front`] for every request,
/// then the gateway's own namespace through [`router`] and everything else straight to the gate.
/// Every route of the router lies under `/_portcullis` or `/.well-known` (in the spelling the
/// router matches, case and all), so any other path would only reach the router's fallback: the
/// gate, which it now reaches without the router's matching and layers in between.
#[derive(Clone)]
pub struct Gateway {
    state: AppState,
    router: Router,
}

impl Gateway {
    pub fn new(state: AppState) -> Self {
        Gateway {
            router: router(state.clone()),
            state,
        }
    }
}

/// Whether a request target's path may match a route of [`router`] (its raw, undecoded form,
/// as the router matches it). Other spellings of the gateway's namespace are the gate's to
/// refuse ([`crate::policy::is_gateway_path`]).
fn is_routed(path: &str) -> bool {
    path.starts_with("/_portcullis") || path.starts_with("/.well-known")
}

impl tower::Service<Request> for Gateway {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let gateway = self.clone();
        Box::pin(async move { Ok(front(gateway, req).await) })
    }
}

/// What comes first for every request: the request id (see [`request_id`]), the refusal of
/// overlong request targets before any other work, and error answers re-rendered as pages for
/// browsers ([`error::render_errors`]).
async fn front(Gateway { state, router }: Gateway, req: Request) -> Response {
    let peer = peer_of(&req);
    let trusted = crate::proxy::is_trusted(peer.ip(), &state.config.server.trusted_proxies);
    request_id::tag(trusted, req, |req| async move {
        let html = error::wants_html(req.headers());
        let len = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().len())
            .unwrap_or(0);
        let routed = is_routed(req.uri().path());
        let refused = if len > state.config.server.max_uri_length {
            Some(AppError::new(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                "The address is too long.",
            ))
        } else if !one_host(&req) {
            // RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or with more than one, is
            // answered 400; a console or cache behind might pick another one than the gateway.
            Some(AppError::bad_request(
                "The request must name its host in exactly one Host header.",
            ))
        } else if routed && !readable_path(req.uri().path()) {
            // Ids in the gateway's own paths (a key's, a device's) reach the stores: a NUL, which
            // text columns refuse, or bytes that are no text are bad input, said in our format.
            Some(AppError::bad_request(
                "The address holds a character that is not allowed (NUL, or bytes that are not text).",
            ))
        } else {
            None
        };
        let resp = if let Some(refused) = refused {
            let mut r = refused.into_response();
            apply_security_headers(r.headers_mut(), state.config.is_https());
            if !http_body::Body::is_end_stream(req.body()) {
                closing(&mut r);
            }
            r
        } else if routed {
            // A refusal may come before the request's body was read (a token refused, a body
            // too large): the connection then closes, and the answer says so. (A page that
            // takes no body and answers it gladly leaves the small body the client sent to be
            // drained, and the connection kept.)
            let (req, read) = read_to_end(req);
            let mut r = match tower::ServiceExt::oneshot(router, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let refused = r.status().is_client_error() || r.status().is_server_error();
            if refused && read.is_some_and(|read| !read.load(std::sync::atomic::Ordering::Relaxed)) {
                closing(&mut r);
            }
            r
        } else {
            gate::proxy_request(&state, peer, req).await
        };
        error::render_errors(html, resp)
    })
    .await
}

/// Marks an answer as the last on its connection (RFC 9112 §9.6): the request's body was not
/// read to its end, so the connection cannot carry another request.
fn closing(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// A request with its body wrapped to record whether it was read to its end, and the record,
/// where it has a body; as it was otherwise.
fn read_to_end(
    req: Request,
) -> (
    Request,
    Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) {
    if http_body::Body::is_end_stream(req.body()) {
        return (req, None);
    }
    let read = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (parts, inner) = req.into_parts();
    let flag = read.clone();
    let at_end = move || flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let body = axum::body::Body::new(crate::proxy::OnEnd::new(inner, at_end));
    (Request::from_parts(parts, body), Some(read))
}

/// Whether the request names its host as HTTP/1.1 asks: one `Host` header (none is allowed in
/// HTTP/1.0).
fn one_host(req: &Request) -> bool {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), None) => true,
        (None, _) => req.version() < axum::http::Version::HTTP_11,
        (Some(_), Some(_)) => false,
    }
}

/// Whether a gateway path decodes to text without NUL (its raw form is checked by hyper).
fn readable_path(path: &str) -> bool {
    if !path.contains('%') {
        return true;
    }
    percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .is_ok_and(|p| !p.contains('\0'))
}

/// Security headers on every gateway response (pages, errors, JWKS, assets); the count of those
/// refused for want of a store (`pages_unavailable`).
pub async fn security_headers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let json_client = prefers_json(req.headers());
    let read = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    // Readiness answers 503 by design while a store is away: no page refused.
    let probe = req.uri().path() == "/_portcullis/readyz";
    let mut resp = next.run(req).await;
    // A held form's answer from the console ([`held`]) is the console's, headers and all.
    if resp.extensions().get::<gate::ConsoleAnswer>().is_some() {
        return resp;
    }
    // Counted here, where every page's answer passes: a sign-in refused for a store that is
    // away writes no audit event to count it by.
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE && !probe {
        if resp.extensions().get::<error::Shed>().is_some() {
            state.metrics.sign_in_shed();
        } else {
            state.metrics.page_unavailable();
        }
    }
    if json_client && resp.status() == StatusCode::SEE_OTHER {
        resp = redirect_for_json(resp, read);
    }
    apply_security_headers(resp.headers_mut(), state.config.is_https());
    resp
}

/// An API client: asks for JSON above any page (q-values weighed).
pub(crate) fn prefers_json(headers: &HeaderMap) -> bool {
    error::wants_json(headers)
}

/// A page's redirect as an API client should get it: a page read without a session (sent to
/// the sign-in page), or a form sent without one ([`no_session`]), is `401
/// authentication_required` with the sign-in URL, as the gate answers; any other redirect keeps
/// its `303` and `Location` and says where in a JSON body.
fn redirect_for_json(mut resp: Response, read: bool) -> Response {
    let Some(location) = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return resp;
    };
    let to_sign_in =
        location == gate::LOGIN_PATH || location.starts_with(&format!("{}?", gate::LOGIN_PATH));
    if (read && to_sign_in) || resp.extensions().get::<NoSession>().is_some() {
        // The gate's own answer, keeping what the page set (a cleared cookie, say).
        let mut r = gate::authentication_required(gate::LOGIN_PATH, &location);
        for (name, value) in resp.headers() {
            if name == header::SET_COOKIE {
                r.headers_mut().append(name.clone(), value.clone());
            } else if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                r.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return r;
    }
    let body = serde_json::json!({ "redirect": location });
    *resp.body_mut() = axum::body::Body::from(body.to_string());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp
}

/// The headers themselves, also used by gateway answers produced outside the gateway router.
pub fn apply_security_headers(h: &mut HeaderMap, https: bool) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    if https {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
}

/// The value of the first cookie `name` (surrounding quotes removed) from any `Cookie` header
/// whose value is printable ASCII; `None` when there is none.
///
/// Read as bytes: only the value found is checked to be text (as `HeaderValue::to_str` checks),
/// not every other cookie on every request, so a console cookie holding UTF-8 does not hide the
/// gateway's cookies either.
pub fn get_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let name = name.as_bytes();
    headers
        .get_all(header::COOKIE)
        .iter()
        .find_map(|v| cookie_in(v.as_bytes(), name).map(|(value, _)| value))
}

/// Every value of cookie `name`, in the order sent, as [`get_cookie`] reads the first. A
/// browser sends two cookies of one name when another site of the same domain set one for a
/// more specific path or a parent domain (over plain HTTP, without the `__Host-` prefix).
pub fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> CookieValues<'a> {
    CookieValues {
        headers: headers.get_all(header::COOKIE).iter(),
        rest: &[],
        name: name.as_bytes(),
    }
}

/// See [`cookie_values`].
pub struct CookieValues<'a> {
    headers: axum::http::header::ValueIter<'a, HeaderValue>,
    /// What is left of the `Cookie` header being read.
    rest: &'a [u8],
    name: &'a [u8],
}

impl<'a> Iterator for CookieValues<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        loop {
            if let Some((value, after)) = cookie_in(self.rest, self.name) {
                self.rest = after;
                return Some(value);
            }
            self.rest = self.headers.next()?.as_bytes();
        }
    }
}

/// The first cookie `name` in one `Cookie` header value whose value is printable ASCII (quotes
/// around it removed), and what follows it in the header.
fn cookie_in<'a>(mut rest: &'a [u8], name: &[u8]) -> Option<(&'a str, &'a [u8])> {
    while !rest.is_empty() {
        let end = memchr::memchr(b';', rest).unwrap_or(rest.len());
        let pair = rest[..end].trim_ascii();
        rest = rest.get(end + 1..).unwrap_or_default();
        let Some(value) = pair
            .strip_prefix(name)
            .and_then(|after| after.strip_prefix(b"="))
        else {
            continue;
        };
        let value = trim_quotes(value);
        if value
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            if let Ok(text) = std::str::from_utf8(value) {
                return Some((text, rest));
            }
        }
    }
    None
}

/// `value` without the `"` at either end (any number of them).
fn trim_quotes(mut value: &[u8]) -> &[u8] {
    while let [b'"', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b'"'] = value {
        value = rest;
    }
    value
}

/// The request's `User-Agent` as the gateway keeps it, compares and shows it: its first 512
/// characters, read as UTF-8, bytes that are not read as Latin-1 (as browsers send a string
/// beyond ASCII from scripts), and controls and hidden characters
/// ([`crate::policy::is_hidden_char`]) written as `\u{…}`: a browser string with odd bytes is
/// still that browser (in the audit trail, a device's name, the bound cookie's context), and
/// two strings that differ in odd bytes stay two.
pub(crate) fn user_agent_of(headers: &HeaderMap) -> std::borrow::Cow<'_, str> {
    const MAX_CHARS: usize = 512;
    let Some(value) = headers.get(header::USER_AGENT) else {
        return std::borrow::Cow::Borrowed("");
    };
    // Printable ASCII (every browser's own string): as it is, one character a byte.
    let bytes = value.as_bytes();
    if bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        if let Ok(ua) = std::str::from_utf8(&bytes[..bytes.len().min(MAX_CHARS)]) {
            return std::borrow::Cow::Borrowed(ua);
        }
    }
    let mut out = String::with_capacity(value.len().min(4 * MAX_CHARS));
    let mut count = 0;
    'chunks: for chunk in value.as_bytes().utf8_chunks() {
        let latin1 = chunk.invalid().iter().map(|&b| char::from(b));
        for c in chunk.valid().chars().chain(latin1) {
            if count == MAX_CHARS {
                break 'chunks;
            }
            if crate::policy::is_hidden_char(c) {
                use std::fmt::Write;
                let _ = write!(out, "\\u{{{:04X}}}", u32::from(c));
            } else {
                out.push(c);
            }
            count += 1;
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Who is asking: the client address (through trusted proxies only) and user agent.
pub fn client(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Client {
    let ip = crate::proxy::client_ip(peer, headers, &state.config.server.trusted_proxies);
    let user_agent = user_agent_of(headers).into_owned();
    Client {
        ip: ip.to_string(),
        user_agent,
    }
}

/// The TCP peer; taken from the connect info the server attaches, or the unspecified address
/// when the router is driven without it (then no proxy is ever trusted).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(peer_in(&parts.extensions)))
    }
}

fn peer_of(req: &Request) -> SocketAddr {
    peer_in(req.extensions())
}

fn peer_in(ext: &axum::http::Extensions) -> SocketAddr {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// `axum::Form` whose rejections become our error format (400, or 413 for oversized bodies).
pub struct Form<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Form<T> {
    type Rejection = AppError;

    async fn from_request(mut req: Request, state: &S) -> Result<Self, Self::Rejection> {
        lowercase_media_type(req.headers_mut());
        match axum::extract::RawForm::from_request(req, state).await {
            // NUL is no character of any field's value (no email, name, code or password has
            // one) and text columns refuse it: one is bad input, not a store failure.
            Ok(axum::extract::RawForm(raw)) if has_nul(&raw) => Err(AppError::invalid_input(
                "The form contains a character that is not allowed (NUL).",
            )),
            // Which field, and why (a field given twice, a checkbox's value, a number that is
            // none), for API clients; no secret field can fail to be read (text of any kind).
            Ok(axum::extract::RawForm(raw)) => {
                serde_urlencoded::from_bytes(&raw).map(Form).map_err(|e| {
                    AppError::invalid_input(format!(
                        "The form could not be read ({e}). Reload the page and try again."
                    ))
                })
            }
            Err(rej) => {
                let status = rej.status();
                Err(if let Some(e) = unreadable_body(status, &rej) {
                    e
                } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
                    AppError::new(
                        status,
                        "unsupported_media_type",
                        "Forms must be sent as application/x-www-form-urlencoded.",
                    )
                } else {
                    AppError::invalid_input(
                        "The form could not be read. Reload the page and try again.",
                    )
                })
            }
        }
    }
}

/// The first value of the query parameter `name` in a raw query string (a parameter given twice
/// counts once: the first), percent-decoded.
pub(crate) fn query_param(raw: &Option<String>, name: &str) -> Option<String> {
    raw.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    })
}

/// A checkbox's form field: left out, or `0`, `false`, `off` or empty, is unticked; `1`, `true`
/// or `on` (a browser's value for a box without one) is ticked; anything else is refused (the
/// form is bad input), so a client sending `admin=false` never gets what it declined.
/// Use with `#[serde(default, deserialize_with = "checkbox")]` on a `bool`.
pub(crate) fn checkbox<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let value = <String as serde::Deserialize>::deserialize(d)?;
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" => Ok(true),
        "" | "0" | "false" | "off" => Ok(false),
        _ => Err(serde::de::Error::custom(
            "a checkbox is 1 (ticked) or left out (not ticked)",
        )),
    }
}

/// Middleware for the gateway's own routes: a body announced larger than any of them takes
/// (`server.max_form_bytes`) is refused with 413 before a byte of it is asked for (no
/// `100 Continue`), and a body that stalls for `server.body_timeout` is refused with 408 when it
/// is read ([`unreadable_body`]).
async fn bounded_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = state.config.server.max_form_bytes;
    if announced.is_some_and(|n| n > limit as u64) {
        return AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "The request is too large.",
        )
        .into_response();
    }
    if http_body::Body::is_end_stream(req.body()) {
        return next.run(req).await;
    }
    let timeout = state.config.server.body_timeout;
    next.run(req.map(|b| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(timeout, b))))
        .await
}

/// A request body that could not be read, in our format: too large (413), stalled past
/// `server.body_timeout` (408), or else `None` for the caller's own answer (400, 415).
fn unreadable_body(
    status: StatusCode,
    error: &(dyn std::error::Error + 'static),
) -> Option<AppError> {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return Some(AppError::new(
            status,
            "payload_too_large",
            "The request is too large.",
        ));
    }
    let mut cause = Some(error);
    while let Some(c) = cause {
        if c.is::<tower_http::timeout::TimeoutError>() {
            return Some(AppError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "The request's body stopped arriving. Try again.",
            ));
        }
        cause = c.source();
    }
    None
}

/// Whether an `application/x-www-form-urlencoded` body holds a NUL, raw or escaped.
fn has_nul(raw: &[u8]) -> bool {
    memchr::memchr(0, raw).is_some()
        || memchr::memmem::find_iter(raw, b"%0").any(|i| raw.get(i + 2).copied() == Some(b'0'))
}

/// Writes the media type of `Content-Type` in lower case (its parameters as they are): media
/// types are case-insensitive, and axum's form extractor compares them as written.
fn lowercase_media_type(headers: &mut HeaderMap) {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let (essence, params) = match value.split_once(';') {
        Some((e, p)) => (e, Some(p)),
        None => (value, None),
    };
    if !essence.bytes().any(|b| b.is_ascii_uppercase()) {
        return;
    }
    let lower = essence.trim().to_ascii_lowercase();
    let fixed = match params {
        Some(p) => format!("{lower};{p}"),
        None => lower,
    };
    if let Ok(v) = HeaderValue::from_str(&fixed) {
        headers.insert(header::CONTENT_TYPE, v);
    }
}

/// `axum::Json` whose rejections become our error format (400, 413 or 415), never a panic.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rej) => {
                let status = rej.status();
                Err(if let Some(e) = unreadable_body(status, &rej) {
                    e
                } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
                    AppError::new(
                        status,
                        "unsupported_media_type",
                        "Requests must be sent as application/json.",
                    )
                } else {
                    AppError::invalid_input("The request could not be read.")
                })
            }
        }
    }
}

/// A 303 redirect (after a form post, or to the sign-in page).
pub fn see_other(location: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// A request that needs a session and came without one (or with one that ran out): the browser
/// is sent to `location`, the sign-in page; an API client gets `401 authentication_required`
/// whatever the method, not a redirect that reads like the step's success.
pub fn no_session(location: &str) -> Response {
    let mut r = see_other(location);
    r.extensions_mut().insert(NoSession);
    r
}

/// Marks [`no_session`]'s answers for [`security_headers`].
#[derive(Clone, Copy, Debug)]
struct NoSession;

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn cookies(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::COOKIE, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    /// A browser string is kept whatever bytes it holds: beyond ASCII as text, odd bytes,
    /// controls and hidden characters as U+FFFD, at most 512 characters; never emptied.
    #[test]
    fn user_agents_are_kept_readable() {
        let ua = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(header::USER_AGENT, HeaderValue::from_bytes(v).unwrap());
            user_agent_of(&h).into_owned()
        };
        assert_eq!(user_agent_of(&HeaderMap::new()), "");
        assert_eq!(ua(b"Mozilla/5.0 (X11)"), "Mozilla/5.0 (X11)");
        assert_eq!(ua("Chrome/120 \u{e9}".as_bytes()), "Chrome/120 \u{e9}");
        // Latin-1 bytes, as a browser's scripts send them, read as the same letters.
        assert_eq!(ua(b"T\xebst"), ua("T\u{eb}st".as_bytes()));
        assert_ne!(ua(b"T\xebst"), ua(b"T\xe8st"));
        assert_eq!(ua(b"a\xffb\tc"), "a\u{ff}b\\u{0009}c");
        assert_eq!(ua("x \u{202e}y".as_bytes()), "x \\u{202E}y");
        assert_eq!(ua("\u{9b}31m".as_bytes()), "\\u{009B}31m");
        assert_ne!(ua("\u{9b}".as_bytes()), ua("\u{9c}".as_bytes()));
        assert_ne!(ua("\u{200b}".as_bytes()), ua("\u{200c}".as_bytes()));
        let long = "\u{e9}".repeat(600);
        assert_eq!(ua(long.as_bytes()).chars().count(), 512);
        assert_eq!(ua("a".repeat(600).as_bytes()).len(), 512);
    }

    /// An API client is one that asks for JSON, in any letter case, and not for a page.
    #[test]
    fn api_clients_ask_for_json_in_any_case() {
        let accept = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static(v));
            h
        };
        for v in [
            "application/json",
            "APPLICATION/JSON",
            "application/problem+json",
            "application/json;q=0.9, text/html;q=0.8",
            "text/html;q=0, application/json",
        ] {
            assert!(prefers_json(&accept(v)), "{v}");
        }
        for v in [
            "text/html",
            "*/*",
            "text/html, application/json",
            "application/json;q=0",
            "application/jsonx",
            "text/json-ish",
        ] {
            assert!(!prefers_json(&accept(v)), "{v}");
        }
        assert!(!prefers_json(&HeaderMap::new()));
    }

    #[test]
    fn cookies_are_found_by_their_exact_name_in_any_cookie_header() {
        let name = "portcullis-session";
        for (values, want) in [
            (&[&b"a=1; portcullis-session=abc; b=2"[..]][..], Some("abc")),
            (&[b"a=1", b"b=2;portcullis-session=abc"], Some("abc")),
            (
                &[b"portcullis-session=first", b"portcullis-session=second"],
                Some("first"),
            ),
            (&[b"portcullis-session=\"abc\""], Some("abc")),
            (&[b"  portcullis-session=abc  ;"], Some("abc")),
            (&[b"portcullis-session="], Some("")),
            (&[b"portcullis-session=a=b"], Some("a=b")),
            // Names match exactly: no prefix, no suffix, no case folding, no spaces before `=`.
            (&[b"xportcullis-session=1; portcullis-session-x=2"], None),
            (&[b"Portcullis-Session=1"], None),
            (&[b"portcullis-session =1"], None),
            (&[b"portcullis-session"], None),
            (&[b""], None),
            (&[], None),
            // Other cookies holding UTF-8 do not hide it; a value that is not text is no value.
            (
                &[b"theme=\xc3\xa9t\xc3\xa9; portcullis-session=abc"],
                Some("abc"),
            ),
            (&[b"portcullis-session=\xc3\xa9"], None),
            (
                &[b"portcullis-session=\xc3\xa9", b"portcullis-session=ok"],
                Some("ok"),
            ),
        ] {
            assert_eq!(get_cookie(&cookies(values), name), want, "{values:?}");
            assert_eq!(
                cookie_values(&cookies(values), name).next(),
                want,
                "{values:?}"
            );
        }
    }

    #[test]
    fn every_cookie_of_a_name_is_found_in_order() {
        let h = cookies(&[
            b"portcullis-session=planted; a=1; portcullis-session=\xc3\xa9",
            b"",
            b"b=2; portcullis-session=\"real\";portcullis-session=third",
        ]);
        let all: Vec<&str> = cookie_values(&h, "portcullis-session").collect();
        assert_eq!(all, ["planted", "real", "third"]);
        assert_eq!(cookie_values(&h, "nope").count(), 0);
    }

    /// The fast path is only sound while no route of the router lies outside the two prefixes:
    /// a route elsewhere would be skipped and its request handed to the gate.
    #[test]
    fn every_route_of_the_router_is_routed() {
        for (_, path) in admin::route_table() {
            assert!(is_routed(path), "{path}");
        }
        for path in [
            "/_portcullis/login",
            "/_portcullis/auth",
            binding::BIND_PATH,
            binding::DBSC_REFRESH_PATH,
            remembered::PATH,
            "/.well-known/jwks.json",
            "/_portcullis/unknown",
        ] {
            assert!(is_routed(path), "{path}");
        }
    }

    /// Other spellings of the namespace skip the router but are still the gateway's: the gate
    /// refuses them after canonicalising (`policy::is_gateway_path`), as the router's fallback did.
    #[test]
    fn other_spellings_of_the_namespace_go_to_the_gate_which_keeps_them() {
        for path in [
            "/_PORTCULLIS/login",
            "/%5Fportcullis/login",
            "/./_portcullis/login",
            "//_portcullis/login",
        ] {
            assert!(!is_routed(path), "{path}");
            let canonical = crate::policy::normalise_path(path).unwrap();
            assert!(crate::policy::is_gateway_path(&canonical), "{path}");
        }
        for path in ["/", "/campaigns", "/_portcullisx", "/well-known/jwks.json"] {
            let canonical = crate::policy::normalise_path(path).unwrap();
            assert!(!crate::policy::is_gateway_path(&canonical), "{path}");
        }
        assert!(!is_routed("/campaigns"));
    }
}
