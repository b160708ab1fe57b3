//! Binding sessions to the device, on the wire (the rules are in [`crate::binding`]).
//!
//! - **DBSC**: a completed sign-in answers with `Secure-Session-Registration`; the browser posts
//!   a proof to `POST /_portcullis/dbsc/register` and gets the session instructions and a bound
//!   cookie. When the cookie expires the browser itself calls `POST /_portcullis/dbsc/refresh`:
//!   403 with `Secure-Session-Challenge`, then the proof in `Secure-Session-Response`, then a
//!   fresh bound cookie. The older `Sec-Session-*` request headers are accepted too.
//! - **WebCrypto fallback**: `GET /_portcullis/bind?next=…` is a small page whose module script
//!   (`static/binding.js`) keeps a non-extractable P-256 key in IndexedDB and signs a challenge
//!   from `POST /_portcullis/bind/challenge`, sent to `…/bind/register` (first time, with the
//!   public key) or `…/bind/refresh`; then it continues to `next`.
//! - **The gate** ([`check`]) forwards a complete session only with a valid bound cookie;
//!   everything else is refused here ([`refusal`]) and, where it points at theft, counted:
//!   audit `session_binding_failed`, and after `binding.max_failures` the session ends and its
//!   owner is told.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::{wants_html, AppError};
use super::login::{csrf_token, current_session, with_cookies};
use super::pages::{self, render};
use super::webauthn::ApiCsrf;
use super::{get_cookie, see_other, Json, Peer};
use crate::auth::flow::Client;
use crate::binding::{
    self, BoundKey, ChallengeUse, CookieCheck, Method, ProofError, Purpose, COOKIE_HTTP,
    COOKIE_HTTPS,
};
use crate::policy::safe_bind_return;
use crate::session::{Loaded, Session};
use crate::state::AppState;
use crate::store::AuditEvent;

/// The interstitial page of the WebCrypto fallback.
pub const BIND_PATH: &str = "/_portcullis/bind";
/// DBSC registration endpoint (named in `Secure-Session-Registration`).
pub const DBSC_REGISTER_PATH: &str = "/_portcullis/dbsc/register";
/// DBSC refresh endpoint (named in the session instructions).
pub const DBSC_REFRESH_PATH: &str = "/_portcullis/dbsc/refresh";
/// Response header that starts a DBSC registration.
pub const REGISTRATION_HEADER: &str = "secure-session-registration";
/// Response header carrying a refresh challenge.
pub const CHALLENGE_HEADER: &str = "secure-session-challenge";
/// Request headers carrying a proof (current name first).
const RESPONSE_HEADERS: [&str; 2] = ["secure-session-response", "sec-session-response"];
/// Request headers naming the DBSC session on refresh.
const SESSION_ID_HEADERS: [&str; 2] = ["sec-secure-session-id", "sec-session-id"];

const BINDING_JS: &str = include_str!("../../static/binding.js");

/// The bound cookie's name here.
pub fn cookie_name(state: &AppState) -> &'static str {
    if state.config.is_https() {
        COOKIE_HTTPS
    } else {
        COOKIE_HTTP
    }
}

/// Cookie attributes shared by `Set-Cookie` and the DBSC `credentials` entry.
fn cookie_attributes(state: &AppState) -> String {
    let secure = if state.config.is_https() {
        "; Secure"
    } else {
        ""
    };
    format!("Path=/; HttpOnly; SameSite=Lax{secure}")
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// A fresh bound cookie for `session` and `key`. The server refuses it after `bound_cookie_ttl`;
/// the browser drops it a little earlier, so a browser's own clock and the network delay never
/// present an expired one.
fn issue_cookie(state: &AppState, session: &Session, key: &BoundKey, client: &Client) -> String {
    let ttl = state.config.binding.bound_cookie_ttl;
    let expires = state.clock.now_millis() + ms(ttl);
    let value = binding::bound_cookie_value(
        &state.master_key,
        &session.public_id,
        &key.thumbprint,
        expires,
        &context_of_client(state, client),
    );
    let margin = if ttl.as_secs() < 60 { 1 } else { 5 };
    let max_age = ttl.as_secs().saturating_sub(margin).max(1);
    format!(
        "{}={value}; Max-Age={max_age}; {}",
        cookie_name(state),
        cookie_attributes(state)
    )
}

/// What the gate found wrong with a complete session's device proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unbound {
    /// No key registered yet: the browser must bind the session first.
    Register,
    /// A WebCrypto-bound session whose bound cookie the browser dropped: prove again.
    Refresh,
    /// A bound cookie presented from another network or browser than it was issued to: the
    /// browser that holds the key proves again; the cookie is dropped.
    Moved,
    /// A proof that points at a copied session (counted); `ended` when that was the last one.
    Failed { ended: bool },
}

/// The device context ([`binding::device_context`]) of a request from `peer`.
pub(crate) fn context_of(
    state: &AppState,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
) -> [u8; binding::CONTEXT_LEN] {
    let ip = crate::proxy::client_ip(peer, headers, &state.config.server.trusted_proxies);
    binding::device_context(&state.master_key, ip, &super::user_agent_of(headers))
}

/// Whether a form refused with `why` (a request from `client`, device context `context`) may be
/// held for the proof it waits for: only a proof to renew or make (never one that failed, nor a
/// bound cookie presented from elsewhere), and only from where the session's key last proved
/// itself (before the first proof: the browser that signed in). A copied session cookie used
/// from another network or browser gets nothing held, so it cannot push the owner's held forms
/// out of their slots; the owner's own browser there proves itself and sends its form.
pub(crate) fn may_hold(
    session: &Session,
    why: &Unbound,
    context: &[u8; binding::CONTEXT_LEN],
    client: &Client,
) -> bool {
    match why {
        Unbound::Register => super::login::same_client(session, client),
        Unbound::Refresh => match &session.proof_context {
            Some(proved) => {
                crate::crypto::ct_eq(proved.as_bytes(), hex::encode(context).as_bytes())
            }
            // A session last proven before the gateway kept where: its sign-in's browser.
            None => super::login::same_client(session, client),
        },
        Unbound::Moved | Unbound::Failed { .. } => false,
    }
}

/// The device context of `client` (as [`context_of`] gives it for the request it came from).
pub(crate) fn context_of_client(state: &AppState, client: &Client) -> [u8; binding::CONTEXT_LEN] {
    let ip = client
        .ip
        .parse()
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    binding::device_context(&state.master_key, ip, &client.user_agent)
}

/// Until when (Unix milliseconds) the request's valid bound cookie for `session` lasts: `None`
/// without one (binding off, or no valid cookie). A WebSocket opened with it closes then, as a
/// copy of the cookie stops working then: the page that holds the key reconnects with a fresh
/// one.
pub(crate) fn bound_until(
    state: &AppState,
    session: &Session,
    headers: &HeaderMap,
    context: &[u8; binding::CONTEXT_LEN],
) -> Option<i64> {
    let key = session.binding.as_ref()?;
    let now = state.clock.now_millis();
    super::cookie_values(headers, cookie_name(state))
        .take(super::gate::SESSION_COOKIES_TRIED)
        .filter(|v| {
            let verdict = binding::check_bound_cookie(
                &state.master_key,
                Some(v),
                &session.public_id,
                &key.thumbprint,
                now,
                context,
            );
            matches!(verdict, CookieCheck::Valid)
        })
        .filter_map(|v| v.split('.').next()?.parse::<i64>().ok())
        .max()
}

/// Whether the request shows the session's device: binding is off, or it carries a valid bound
/// cookie issued to this network and browser. Nothing is counted or recorded: for pages that
/// only choose what to show (a copied session cookie learns no more than it brought).
pub(crate) fn shows_its_device(
    state: &AppState,
    session: &Session,
    headers: &HeaderMap,
    client: &Client,
) -> bool {
    !state.config.binding.enabled
        || bound_until(state, session, headers, &context_of_client(state, client)).is_some()
}

/// Whether a request that acts on the session as a whole (signing it out) comes from its
/// device: [`shows_its_device`], or, its bound cookie run out, from where its key last proved
/// itself (before the first proof: the browser that signed in). Nothing is counted.
pub(crate) fn from_its_device(
    state: &AppState,
    session: &Session,
    headers: &HeaderMap,
    client: &Client,
) -> bool {
    if shows_its_device(state, session, headers, client) {
        return true;
    }
    let why = match session.binding {
        Some(_) => Unbound::Refresh,
        None => Unbound::Register,
    };
    may_hold(session, &why, &context_of_client(state, client), client)
}

/// The gate's check of a complete session asked from `context` (see [`context_of`]): `None`
/// when its bound cookie is valid and was issued to this network and browser. `client` is
/// asked for only when something is recorded, so a valid proof builds nothing.
pub(crate) async fn check(
    state: &AppState,
    (storage_key, session): (&str, &Session),
    headers: &HeaderMap,
    context: &[u8; binding::CONTEXT_LEN],
    client: impl FnOnce() -> Client,
) -> Result<Option<Unbound>, AppError> {
    let Some(key) = &session.binding else {
        return Ok(Some(Unbound::Register));
    };
    let verdict_of = |cookie: Option<&str>| {
        binding::check_bound_cookie(
            &state.master_key,
            cookie,
            &session.public_id,
            &key.thumbprint,
            state.clock.now_millis(),
            context,
        )
    };
    let mut verdict = verdict_of(get_cookie(headers, cookie_name(state)));
    // Over plain HTTP another site of the domain can plant a cookie of the same name, sent
    // first: a valid one among the next few counts (no store is read for them).
    if verdict != CookieCheck::Valid && !state.config.is_https() {
        let mut others = super::cookie_values(headers, cookie_name(state))
            .skip(1)
            .take(super::gate::SESSION_COOKIES_TRIED - 1);
        if others.any(|v| matches!(verdict_of(Some(v)), CookieCheck::Valid)) {
            verdict = CookieCheck::Valid;
        }
    }
    match (verdict, key.method) {
        (CookieCheck::Valid, _) => Ok(None),
        // The fallback's cookie runs out in normal use; the page proves again. So it does when
        // the browser it was issued to sends it a moment past its expiry (a client that ignores
        // `Max-Age`): not a failure, nothing reaches the console until a fresh proof.
        (CookieCheck::Missing, Method::Webcrypto) | (CookieCheck::Expired, _) => {
            Ok(Some(Unbound::Refresh))
        }
        // Another network or browser than the cookie was issued to: a phone that changed
        // networks, or a copy of the cookie jar. Only the key decides: the browser that holds
        // it proves again (the answer drops the cookie, which makes a DBSC browser refresh);
        // a copy cannot, and its failed proofs are counted there.
        (CookieCheck::Moved, _) => {
            let client = client();
            // Not a failure (the owner on a new network lands here too; the proof that follows
            // is what counts), but written down, once a minute per session and network.
            let ev = AuditEvent::new("session_binding_moved", "denied", state.clock.now())
                .reason(CookieCheck::Moved.reason())
                .client(&client.ip, &client.user_agent);
            let ev = AuditEvent {
                user_id: Some(session.user_id.clone()),
                ..ev
            };
            let run = format!(
                "binding_moved:{}:{}",
                session.public_id,
                crate::auth::flow::network_of(&client.ip)
            );
            state.audit.record_repeated(run, ev).await;
            Ok(Some(Unbound::Moved))
        }
        // A DBSC browser refreshes before it sends a request without the cookie; an expired or
        // foreign cookie is never sent by the browser that holds the key.
        (other, _) => {
            let ended = failure(state, (storage_key, session), &client(), other.reason()).await?;
            Ok(Some(Unbound::Failed { ended }))
        }
    }
}

/// Counts a failed proof: audit `session_binding_failed`; at `binding.max_failures` the session
/// ends (`session_suspended`) and the owner is told. Returns whether it ended.
async fn failure(
    state: &AppState,
    (storage_key, s): (&str, &Session),
    client: &Client,
    reason: &str,
) -> Result<bool, AppError> {
    let count = binding::count_failure(
        state.ephemeral.as_ref(),
        &s.public_id,
        state.config.session.absolute_timeout,
    )
    .await?;
    let user = state.durable.user_by_id(&s.user_id).await?;
    let event = |name: &str, reason: &str| {
        let ev = AuditEvent::new(name, "denied", state.clock.now())
            .reason(reason)
            .client(&client.ip, &client.user_agent);
        match &user {
            Some(u) => ev.user(u),
            None => AuditEvent {
                user_id: Some(s.user_id.clone()),
                ..ev
            },
        }
    };
    state
        .audit
        .record(event("session_binding_failed", reason))
        .await;
    if count < u64::from(state.config.binding.max_failures) {
        return Ok(false);
    }
    state.sessions.destroy(storage_key, &s.user_id).await?;
    state.signer.forget(storage_key);
    state
        .audit
        .record(event("session_suspended", "binding_failures"))
        .await;
    if let Some(u) = &user {
        let how = format!("{count} failed attempts, last ");
        let notice = CopyNotice {
            subject: "was ended",
            done: "used",
            by: "a browser that could not prove it is the device you signed in on",
            how: &how,
            rest: "This is what happens when someone copies the cookies of a signed-in browser.\n\
                   That session has been ended. If you did not expect this, change your password\n\
                   and check your computer for malware, then sign in again.\n",
        };
        tell_of_a_copy(state, u, client, notice).await?;
    }
    Ok(true)
}

/// What a notice of a session used from elsewhere says: the subject's end ("was ended"), what
/// was done with the session ("used"), by whom ("a browser that could not prove…"), what came
/// before the address ("3 failed attempts, last "), and the rest (what it means, what to do).
pub(crate) struct CopyNotice<'a> {
    pub subject: &'a str,
    pub done: &'a str,
    pub by: &'a str,
    pub how: &'a str,
    pub rest: &'a str,
}

/// Mails `user` that a session of theirs was used as `notice` says, by `client`.
pub(crate) async fn tell_of_a_copy(
    state: &AppState,
    user: &crate::store::User,
    client: &Client,
    notice: CopyNotice<'_>,
) -> crate::store::StoreResult<()> {
    let host = state
        .config
        .server
        .public_url
        .host_str()
        .unwrap_or_default();
    let body = format!(
        "A session of your account {email} on {host} was {done} from {by}\n\
         ({how}from {ip}, {ua}).\n\
         \n\
         {rest}",
        email = user.email,
        done = notice.done,
        by = notice.by,
        how = notice.how,
        ip = client.ip,
        ua = client.user_agent,
        rest = notice.rest,
    );
    let subject = format!("A session of your account on {host} {}", notice.subject);
    state.notifier.enqueue(&user.email, &subject, &body).await
}

/// The same device-proof rule for the gateway's own pages that act on a complete session (the
/// admin console, the account page): `Some(answer)` when binding is on and the proof is missing,
/// expired or wrong. `next` is where a browser navigation continues once proven, `back` the
/// page a form was sent from (its error page links to the proof and back there).
pub(crate) async fn guard_page(
    state: &AppState,
    loaded: &Loaded,
    headers: &HeaderMap,
    client: &Client,
    browser: bool,
    (next, back): (&str, Option<&str>),
) -> Result<Option<Response>, AppError> {
    if state.config.binding.enabled {
        let context = context_of_client(state, client);
        if let Some(why) =
            check(state, loaded.record(), headers, &context, || client.clone()).await?
        {
            return Ok(Some(refusal(
                state,
                why,
                browser,
                BIND_PATH,
                (Some(next), back),
            )));
        }
    }
    Ok(risk_hold_refusal(state, loaded, browser, next))
}

/// [`guard_page`] for a request that may be a browser's form (the admin console's): one refused
/// for a device proof to renew (its bound cookie ran out while it was filled in; never a proof
/// that failed, nor one made elsewhere) is held (`held`) and sent after the proof, as the gate
/// holds the console's forms. The request back when it may go on.
pub(crate) async fn guard_page_holding(
    state: &AppState,
    (loaded, client, peer): (&Loaded, &Client, std::net::SocketAddr),
    req: axum::extract::Request,
    browser: bool,
    (next, back): (&str, Option<&str>),
) -> Result<Result<axum::extract::Request, Response>, AppError> {
    if state.config.binding.enabled {
        let context = context_of_client(state, client);
        if let Some(why) = check(state, loaded.record(), req.headers(), &context, || {
            client.clone()
        })
        .await?
        {
            let here = may_hold(&loaded.session, &why, &context, client);
            let form = wants_html(req.headers());
            if here && super::held::holdable(req.method(), req.headers(), form) {
                let public_id = &loaded.session.public_id;
                let target = (next, back.map(str::to_string));
                if let Some(held) = super::held::hold(state, (public_id, peer), target, req).await?
                {
                    let pages = (Some(held.page.as_str()), back);
                    let refused = refusal(state, why, true, BIND_PATH, pages);
                    return Ok(Err(with_cookies(refused, [held.cookie])));
                }
                // Not held (too large, too many at once): answered as a form that cannot be.
            }
            let pages = (Some(next), back);
            return Ok(Err(refusal(state, why, browser, BIND_PATH, pages)));
        }
    }
    Ok(match risk_hold_refusal(state, loaded, browser, next) {
        Some(refused) => Err(refused),
        None => Ok(req),
    })
}

/// A session the risk engine holds reaches nothing but the pages that lift the hold: the
/// step-up it is answered with, unless `next` is one of those.
fn risk_hold_refusal(
    state: &AppState,
    loaded: &Loaded,
    browser: bool,
    next: &str,
) -> Option<Response> {
    let lifts_hold = ["/_portcullis/reauth", "/_portcullis/webauthn/reauth/"]
        .iter()
        .any(|p| next.starts_with(p));
    if !loaded.session.held() || lifts_hold {
        return None;
    }
    state.metrics.step_up(super::gate::RISK_REASON);
    let why = (loaded.session.risk_hold_key, super::gate::RISK_REASON);
    let pages = (Some(next), None);
    Some(super::gate::step_up_refusal(
        browser,
        pages,
        why,
        StatusCode::FORBIDDEN,
    ))
}

/// Gateway pages that change how a complete session's user signs in; they ask for the same
/// device proof as the console (see [`guard_session_pages`]).
const SESSION_PAGES: &[&str] = &[
    "/_portcullis/account",
    "/_portcullis/held",
    "/_portcullis/reauth",
    "/_portcullis/webauthn/register/",
    "/_portcullis/webauthn/reauth/",
];

/// Middleware: a copied cookie reaches the account page, step-up and key registration no more
/// than it reaches the console. Other requests pass untouched; sessions that are not complete
/// (sign-in, forced enrolment) are left to their own pages.
pub async fn guard_session_pages(
    State(state): State<AppState>,
    Peer(peer): Peer,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    // With binding off the pages are still checked: a session the risk engine holds.
    if !SESSION_PAGES.iter().any(|p| path.starts_with(p)) {
        return next.run(req).await;
    }
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let read = req.method() == axum::http::Method::GET;
    let browser = read && wants_html(req.headers());
    // A form goes back to its page once the proof is renewed (gateway pages send no
    // `Referer`): the account page's forms to that page; the step-up and held pages' forms
    // post to the page's own address, query and all.
    let own_page =
        ["/_portcullis/reauth", super::held::PATH].contains(&path) && req.uri().query().is_some();
    let back = match (read, path.starts_with("/_portcullis/account"), own_page) {
        (true, _, _) => None,
        (false, true, _) => Some("/_portcullis/account"),
        (false, false, true) => Some(target.as_str()),
        _ => None,
    };
    let headers = req.headers().clone();
    let refused = async {
        let Some(loaded) = current_session(&state, &headers)
            .await?
            .filter(|l| l.session.is_authenticated())
        else {
            return Ok(None);
        };
        let client = super::client(&state, peer, &headers);
        guard_page(&state, &loaded, &headers, &client, browser, (&target, back)).await
    }
    .await;
    match refused {
        Ok(None) => next.run(req).await,
        Ok(Some(r)) => r,
        Err(e) => e.into_response(),
    }
}

/// The answer to a request the gate refused for its device proof. `bind_url` is the
/// interstitial (absolute for forward-auth); `next` where a browser navigation may return,
/// `back` the page a form came from (a browser's error page links to the proof and back there).
pub(crate) fn refusal(
    state: &AppState,
    why: Unbound,
    browser: bool,
    bind_url: &str,
    (next, back): (Option<&str>, Option<&str>),
) -> Response {
    let with_next = |n: &str| {
        let q: String = url::form_urlencoded::byte_serialize(n.as_bytes()).collect();
        format!("{bind_url}?next={q}")
    };
    let confirm = || Some((with_next(back.unwrap_or("/")), "Confirm this browser"));
    let mut resp = match (why, browser, next) {
        (Unbound::Register | Unbound::Refresh | Unbound::Moved, true, Some(n)) => {
            see_other(&with_next(n))
        }
        (Unbound::Register, _, _) => json_error(
            StatusCode::UNAUTHORIZED,
            "binding_required",
            "This session is not bound to its device yet, so the request was not sent on. Let \
             the browser that signed in prove it holds its device key (open a page of the \
             console again, or confirm this browser), then send the request again.",
            (bind_url, confirm()),
        ),
        (Unbound::Refresh, _, _) => json_error(
            StatusCode::UNAUTHORIZED,
            "binding_refresh_required",
            "The device proof of this session has run out, or this browser does not hold it, \
             so the request was not sent on. \
             Let the browser that signed in renew it (open a page of the console again, or \
             confirm this browser: no password needed), then send the request again; the \
             browser's Back button brings a form back as you filled it in.",
            (bind_url, confirm()),
        ),
        (Unbound::Moved, _, _) => json_error(
            StatusCode::UNAUTHORIZED,
            "binding_refresh_required",
            "This session's device proof was made on another network or in another browser, so \
             the request was not sent on. Let the browser that signed in prove it again here (open a page of the console again, or \
             confirm this browser: no password needed), then send the request again; the \
             browser's Back button brings a form back as you filled it in.",
            (bind_url, confirm()),
        ),
        (Unbound::Failed { .. }, _, _) => json_error(
            StatusCode::FORBIDDEN,
            "device_proof_failed",
            "This session belongs to another device: the browser that signed in must prove it \
             holds its device key. Sign in again on this device.",
            (bind_url, None),
        ),
    };
    if let Unbound::Failed { ended: true } = why {
        if let Ok(v) = HeaderValue::from_str(&state.sessions.clear_cookie()) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    if why == Unbound::Moved {
        if let Ok(v) = HeaderValue::from_str(&dropped_cookie(state)) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Our error format plus the URL where the binding is renewed, and what a browser's error
/// page offers (`action`).
fn json_error(
    status: StatusCode,
    code: &'static str,
    message: &str,
    (bind_url, action): (&str, Option<(String, &'static str)>),
) -> Response {
    let body = serde_json::json!({ "error": code, "message": message, "bind": bind_url });
    let mut r = AppError {
        action,
        ..AppError::new(status, code, message)
    }
    .into_response();
    *r.body_mut() = axum::body::Body::from(body.to_string());
    r
}

/// Adds `Secure-Session-Registration` (with a new single-use challenge) to a response for a
/// complete, not yet bound session.
pub(crate) async fn offer_registration(
    state: &AppState,
    session: &Session,
    resp: &mut Response,
) -> Result<(), AppError> {
    if !state.config.binding.enabled || !session.is_authenticated() || session.binding.is_some() {
        return Ok(());
    }
    let challenge = binding::issue_challenge(
        state.ephemeral.as_ref(),
        &session.public_id,
        Purpose::Register,
    )
    .await?;
    let value = format!("(ES256 RS256);path=\"{DBSC_REGISTER_PATH}\";challenge=\"{challenge}\"");
    let v = HeaderValue::from_str(&value).map_err(|e| AppError::internal(&e))?;
    resp.headers_mut().append(REGISTRATION_HEADER, v);
    Ok(())
}

/// The complete session of this request, or the error an API caller gets.
async fn complete_session(state: &AppState, headers: &HeaderMap) -> Result<Loaded, AppError> {
    if !state.config.binding.enabled {
        return Err(AppError::not_found());
    }
    match current_session(state, headers).await? {
        Some(l) if l.session.is_authenticated() => Ok(l),
        _ => Err(AppError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_required",
            "Sign in first.",
        )),
    }
}

/// What shows that a browser binding a session is the device its device cookie names.
pub(crate) enum Continuity<'a> {
    /// The key registered is the device's own (a remembered device just proved it).
    DeviceKey,
    /// The registration of challenge `jti`, with the same challenge signed by the key the
    /// browser kept from its last session, if it sent one (`previous`).
    Previous {
        proof: Option<&'a str>,
        jti: &'a str,
    },
}

/// A browser binding a session of a known device must prove the key that device kept (the
/// WebCrypto fallback keeps one key per browser, replaced at each registration): a copied device
/// cookie does not make its holder the owner's device. Without that proof the browser is a new
/// device from here — recorded, given a device cookie of its own, audited and mailed to the
/// owner — and the session is its. With it, the device keeps the newly registered WebCrypto key
/// for its next sign-in. A device that kept no key (bound through DBSC, whose keys live one
/// session each) is known by its cookie alone, as with binding off. Returns the device cookie
/// to set, if any.
async fn device_continuity(
    state: &AppState,
    loaded: &mut Loaded,
    key: &BoundKey,
    continuity: Continuity<'_>,
    client: &Client,
) -> Result<Option<String>, AppError> {
    let Some(device_id) = loaded.session.device_id.clone() else {
        return Ok(None);
    };
    let devices = state.durable.list_devices(&loaded.session.user_id).await?;
    let Some(device) = devices.into_iter().find(|d| d.id == device_id) else {
        return Ok(None);
    };
    let kept = device
        .remember_key
        .as_deref()
        .and_then(|k| serde_json::from_str::<BoundKey>(k).ok())
        .filter(|k| k.method == Method::Webcrypto);
    let proven = match (&kept, continuity) {
        (None, _) | (_, Continuity::DeviceKey) => true,
        (Some(kept), Continuity::Previous { proof, jti }) => proof
            .filter(|p| p.len() <= MAX_PROOF_LEN)
            .and_then(|p| binding::verify_refresh(p, kept).ok())
            .is_some_and(|signed| signed == jti),
    };
    if proven {
        // The first key of a device comes from the sign-in that recorded it, or from the first
        // session of one never bound: a device bound before without a key kept (through DBSC,
        // whose keys live one session each) must not take a copy's key as the one its owner's
        // browser, which has none, would then be asked for.
        let first = kept.is_none() && (loaded.session.new_device || device.binding == "cookie");
        let replaced = kept.is_some_and(|k| k.thumbprint != key.thumbprint);
        if key.method == Method::Webcrypto && (first || replaced) {
            keep_key(state, &device_id, key, device.remembered_until).await?;
        }
        return Ok(None);
    }
    let Some(user) = state.durable.user_by_id(&loaded.session.user_id).await? else {
        return Ok(None);
    };
    let why = "the cookie of a known device, without that device's key";
    let (id, cookie) = super::devices::new_device(state, &user, client, None, Some(why)).await?;
    if key.method == Method::Webcrypto {
        keep_key(state, &id, key, None).await?;
    }
    loaded.session.device_id = Some(id);
    loaded.session.new_device = true;
    Ok(Some(cookie))
}

/// Keeps `key` as the one device `id`'s browser proves at its next registration (and, while
/// remembered until `remembered_until`, in place of a second factor).
async fn keep_key(
    state: &AppState,
    id: &str,
    key: &BoundKey,
    remembered_until: Option<i64>,
) -> Result<(), AppError> {
    let json = serde_json::to_string(key).map_err(|e| AppError::internal(&e))?;
    state
        .durable
        .remember_device(id, Some(&json), remembered_until)
        .await?;
    Ok(())
}

/// The longest device proof read (a JWS over a challenge, with at most an RSA key's JWK).
const MAX_PROOF_LEN: usize = 8192;

/// Binds `loaded` to `key`, once: the first registration of a session wins. Returns the cookies
/// to set (the bound cookie, and a device cookie where the browser turned out to be a new
/// device), or `None` where the session was bound already.
pub(crate) async fn register(
    state: &AppState,
    loaded: &mut Loaded,
    key: BoundKey,
    client: &Client,
    continuity: Continuity<'_>,
) -> Result<Option<Vec<String>>, AppError> {
    // The first key comes from the browser that signed in: a copy of its cookie jar, used
    // elsewhere before that browser bound, must not bind the session (and with it a
    // remembered browser) to the copier's key.
    if loaded.session.binding.is_none() && !super::login::same_client(&loaded.session, client) {
        failure(
            state,
            loaded.record(),
            client,
            "registration_from_elsewhere",
        )
        .await?;
        return Err(proof_failed());
    }
    if loaded.session.binding.is_some()
        || !binding::claim(
            state.ephemeral.as_ref(),
            &loaded.session.public_id,
            &key.thumbprint,
            state.config.session.absolute_timeout,
        )
        .await?
    {
        return Ok(None);
    }
    let device_cookie = device_continuity(state, loaded, &key, continuity, client).await?;
    loaded.session.binding = Some(key.clone());
    state.sessions.save(&loaded.key, &loaded.session).await?;
    binding::forget_failures(state.ephemeral.as_ref(), &loaded.session.public_id).await?;
    if let Some(device) = &loaded.session.device_id {
        state
            .durable
            .set_device_binding(device, key.method.as_str())
            .await?;
    }
    super::remembered::on_bound(state, &loaded.session, &key, client).await?;
    // The first proof counts as a proof from here, as every renewal does.
    super::risk::after_proof(state, loaded, client).await?;
    let mut ev = AuditEvent::new("session_bound", "success", state.clock.now())
        .reason(key.method.as_str())
        .client(&client.ip, &client.user_agent);
    if let Some(u) = state.durable.user_by_id(&loaded.session.user_id).await? {
        ev = ev.user(&u);
    }
    state.audit.record(ev).await;
    let mut cookies = vec![issue_cookie(state, &loaded.session, &key, client)];
    cookies.extend(device_cookie);
    Ok(Some(cookies))
}

fn already_bound() -> AppError {
    AppError::new(
        StatusCode::CONFLICT,
        "already_bound",
        "This session is already bound to a device key.",
    )
}

fn bad_proof(e: ProofError) -> AppError {
    AppError::bad_request(format!("The device proof was refused: {e}."))
}

fn stale_challenge() -> AppError {
    AppError::new(
        StatusCode::CONFLICT,
        "challenge_stale",
        "The challenge was already used or has expired. Ask for a new one.",
    )
}

fn proof_failed() -> AppError {
    AppError::forbidden(
        "device_proof_failed",
        "This browser could not prove it holds the device key of this session. Sign in again.",
    )
}

/// What happened to a refresh proof.
enum Refreshed {
    /// Proven: the bound cookie to set.
    Cookie(String),
    /// The challenge was used or expired (a race the spec allows for): ask again.
    Stale,
    /// Refused and counted.
    Failed,
}

/// Checks a refresh proof of `loaded`'s key against a fresh challenge and issues the cookie.
async fn refresh(
    state: &AppState,
    loaded: &mut Loaded,
    key: &BoundKey,
    proof: Option<&str>,
    client: &Client,
) -> Result<Refreshed, AppError> {
    let Some(proof) = proof.filter(|p| !p.is_empty()) else {
        failure(state, loaded.record(), client, "no_device_key").await?;
        return Ok(Refreshed::Failed);
    };
    let jti = match binding::verify_refresh(proof, key) {
        Ok(j) => j,
        Err(e) => {
            failure(state, loaded.record(), client, e.reason()).await?;
            return Ok(Refreshed::Failed);
        }
    };
    let public_id = &loaded.session.public_id;
    match binding::consume_challenge(state.ephemeral.as_ref(), &jti, public_id, Purpose::Refresh)
        .await?
    {
        ChallengeUse::Fresh => {}
        ChallengeUse::Stale => return Ok(Refreshed::Stale),
        ChallengeUse::Foreign => {
            failure(state, loaded.record(), client, "proof_for_another_session").await?;
            return Ok(Refreshed::Failed);
        }
    }
    binding::forget_failures(state.ephemeral.as_ref(), public_id).await?;
    // Proven from here: the session's place, and whether it could have travelled here.
    super::risk::after_proof(state, loaded, client).await?;
    Ok(Refreshed::Cookie(issue_cookie(
        state,
        &loaded.session,
        key,
        client,
    )))
}

// --- WebCrypto fallback ---------------------------------------------------------------------

fn next_of(state: &AppState, q: &Option<String>) -> String {
    super::query_param(q, "next")
        .and_then(|n| safe_bind_return(&n, &state.config.server.public_url))
        .unwrap_or_else(|| "/".into())
}

/// `GET /_portcullis/bind?next=…`: the interstitial that proves possession and continues.
pub async fn bind_get(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let next = next_of(&state, &q);
    if !state.config.binding.enabled {
        return Ok(see_other(&next));
    }
    let Some(loaded) = current_session(&state, &headers)
        .await?
        .filter(|l| l.session.is_authenticated())
    else {
        let login = super::gate::login_location(super::gate::LOGIN_PATH, Some(&next));
        return Ok(see_other(&login));
    };
    let (token, set) = csrf_token(&state, &headers);
    let mut resp = with_cookies(
        render(
            StatusCode::OK,
            &pages::Bind {
                csrf: &token,
                next: &next,
                not_sent: super::query_param(&q, "notice").as_deref() == Some("not_sent"),
            },
        ),
        set,
    );
    offer_registration(&state, &loaded.session, &mut resp).await?;
    // A bound cookie that is no proof from here (another network or browser, expired) is
    // dropped, also when the gate's own answer that would have dropped it did not reach the
    // browser (nginx `auth_request` keeps the check's cookies): a DBSC browser then refreshes,
    // where it would go on sending the stale one.
    if let Some(key) = &loaded.session.binding {
        let verdict = binding::check_bound_cookie(
            &state.master_key,
            get_cookie(&headers, cookie_name(&state)),
            &loaded.session.public_id,
            &key.thumbprint,
            state.clock.now_millis(),
            &context_of(&state, peer, &headers),
        );
        if !matches!(verdict, CookieCheck::Valid | CookieCheck::Missing) {
            if let Ok(v) = HeaderValue::from_str(&dropped_cookie(&state)) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
        }
    }
    Ok(resp)
}

/// A `Set-Cookie` that removes the bound cookie.
pub(super) fn dropped_cookie(state: &AppState) -> String {
    format!(
        "{}=; Max-Age=0; {}",
        cookie_name(state),
        cookie_attributes(state)
    )
}

/// `GET /_portcullis/static/binding.js`.
pub async fn binding_js() -> Response {
    let mut r = BINDING_JS.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}

/// `POST /_portcullis/bind/challenge`: a challenge for the page to sign.
pub async fn challenge_post(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let loaded = complete_session(&state, &headers).await?;
    let (purpose, method) = match &loaded.session.binding {
        None => (Purpose::Register, None),
        Some(k) => (Purpose::Refresh, Some(k.method.as_str())),
    };
    let challenge =
        binding::issue_challenge(state.ephemeral.as_ref(), &loaded.session.public_id, purpose)
            .await?;
    Ok(axum::Json(serde_json::json!({
        "challenge": challenge,
        "purpose": purpose,
        "method": method,
        "session": loaded.session.public_id,
    }))
    .into_response())
}

#[derive(Deserialize)]
pub struct ProofBody {
    #[serde(default)]
    proof: Option<String>,
    /// With a registration: the same challenge signed by the key the browser kept from its
    /// last session, if it has one (see [`Continuity`]).
    #[serde(default)]
    previous: Option<String>,
}

fn proven(cookies: Vec<String>) -> Response {
    with_cookies(
        axum::Json(serde_json::json!({ "ok": true })).into_response(),
        cookies,
    )
}

/// What a registration proof achieved.
enum Registration {
    /// Bound: the session and the cookies to set.
    Bound(Box<Loaded>, Vec<String>),
    /// The challenge was used or expired; the session, to offer a new one.
    Stale(Box<Loaded>),
}

/// A registration proof (either method): checks it, uses up its challenge, binds the session.
async fn register_proof(
    state: &AppState,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
    proof: &str,
    method: Method,
    previous: Option<&str>,
) -> Result<Registration, AppError> {
    let mut loaded = complete_session(state, headers).await?;
    let client = super::client(state, peer, headers);
    let (key, jti) = binding::verify_registration(proof, method).map_err(bad_proof)?;
    match binding::consume_challenge(
        state.ephemeral.as_ref(),
        &jti,
        &loaded.session.public_id,
        Purpose::Register,
    )
    .await?
    {
        ChallengeUse::Fresh => {}
        ChallengeUse::Stale => return Ok(Registration::Stale(Box::new(loaded))),
        ChallengeUse::Foreign => {
            failure(state, loaded.record(), &client, "proof_for_another_session").await?;
            return Err(proof_failed());
        }
    }
    let continuity = Continuity::Previous {
        proof: previous,
        jti: &jti,
    };
    match register(state, &mut loaded, key, &client, continuity).await? {
        Some(cookies) => Ok(Registration::Bound(Box::new(loaded), cookies)),
        None => Err(already_bound()),
    }
}

/// `POST /_portcullis/bind/register` `{"proof": JWS}`: binds the session to the key in the proof.
pub async fn register_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    _csrf: ApiCsrf,
    headers: HeaderMap,
    Json(body): Json<ProofBody>,
) -> Result<Response, AppError> {
    let proof = body.proof.unwrap_or_default();
    let previous = body.previous.as_deref();
    match register_proof(&state, peer, &headers, &proof, Method::Webcrypto, previous).await? {
        Registration::Bound(_, cookies) => Ok(proven(cookies)),
        Registration::Stale(_) => Err(stale_challenge()),
    }
}

/// `POST /_portcullis/bind/refresh` `{"proof": JWS | null}`: a fresh bound cookie for a proof
/// by the session's key; `null` (this browser has no key) counts as a failed proof.
pub async fn refresh_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    _csrf: ApiCsrf,
    headers: HeaderMap,
    Json(body): Json<ProofBody>,
) -> Result<Response, AppError> {
    let mut loaded = complete_session(&state, &headers).await?;
    let client = super::client(&state, peer, &headers);
    let Some(key) = loaded.session.binding.clone() else {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            "not_bound",
            "This session is not bound yet: register a key first.",
        ));
    };
    match refresh(&state, &mut loaded, &key, body.proof.as_deref(), &client).await? {
        Refreshed::Cookie(c) => Ok(proven(vec![c])),
        Refreshed::Stale => Err(stale_challenge()),
        Refreshed::Failed => Err(proof_failed()),
    }
}

// --- DBSC -----------------------------------------------------------------------------------

fn first_header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// A DBSC request's body, or our error format (413 for one over `server.max_form_bytes`).
fn dbsc_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, AppError> {
    body.map_err(|rej| {
        super::unreadable_body(rej.status(), &rej)
            .unwrap_or_else(|| AppError::bad_request("The request could not be read."))
    })
}

/// The proof of a DBSC request: the `Secure-Session-Response` header (or its older name), or
/// the body, where some browser versions put it.
fn dbsc_proof<'a>(headers: &'a HeaderMap, body: &'a Bytes) -> Option<&'a str> {
    first_header(headers, &RESPONSE_HEADERS)
        .or_else(|| std::str::from_utf8(body).ok().map(str::trim))
        .filter(|p| !p.is_empty())
}

/// The session instructions JSON (registration and refresh answers).
fn instructions(state: &AppState, session: &Session) -> serde_json::Value {
    serde_json::json!({
        "session_identifier": session.public_id,
        "refresh_url": DBSC_REFRESH_PATH,
        "scope": {
            "origin": state.config.server.public_url.origin().ascii_serialization(),
            "include_site": false,
        },
        "credentials": [{
            "type": "cookie",
            "name": cookie_name(state),
            "attributes": cookie_attributes(state),
        }],
    })
}

fn dbsc_answer(
    state: &AppState,
    session: &Session,
    cookies: impl IntoIterator<Item = String>,
) -> Response {
    with_cookies(
        axum::Json(instructions(state, session)).into_response(),
        cookies,
    )
}

/// `POST /_portcullis/dbsc/register`: the browser's registration proof.
pub async fn dbsc_register_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = dbsc_body(body)?;
    let proof = dbsc_proof(&headers, &body).unwrap_or_default();
    match register_proof(&state, peer, &headers, proof, Method::Dbsc, None).await? {
        Registration::Bound(loaded, cookies) => Ok(dbsc_answer(&state, &loaded.session, cookies)),
        Registration::Stale(loaded) => {
            // Ask the browser to register again with a new challenge.
            let mut r = AppError {
                status: StatusCode::FORBIDDEN,
                ..stale_challenge()
            }
            .into_response();
            offer_registration(&state, &loaded.session, &mut r).await?;
            Ok(r)
        }
    }
}

/// A 403 carrying a new refresh challenge for `session`.
async fn challenge_answer(state: &AppState, session: &Session) -> Result<Response, AppError> {
    let challenge = binding::issue_challenge(
        state.ephemeral.as_ref(),
        &session.public_id,
        Purpose::Refresh,
    )
    .await?;
    let mut r = StatusCode::FORBIDDEN.into_response();
    let v = HeaderValue::from_str(&format!("\"{challenge}\";id=\"{}\"", session.public_id))
        .map_err(|e| AppError::internal(&e))?;
    r.headers_mut().insert(CHALLENGE_HEADER, v);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `POST /_portcullis/dbsc/refresh`: 403 with a challenge, then a fresh bound cookie for a
/// proof of it. A session that is gone answers `{"continue": false}`, which ends the browser's
/// DBSC session.
pub async fn dbsc_refresh_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AppError> {
    let body = dbsc_body(body)?;
    if !state.config.binding.enabled {
        return Err(AppError::not_found());
    }
    let asked_for = first_header(&headers, &SESSION_ID_HEADERS).unwrap_or_default();
    let loaded = current_session(&state, &headers)
        .await?
        .filter(|l| l.session.is_authenticated());
    let (Some(mut loaded), Some(key)) = (
        loaded.clone(),
        loaded.and_then(|l| l.session.binding.filter(|k| k.method == Method::Dbsc)),
    ) else {
        return Ok(axum::Json(serde_json::json!({
            "session_identifier": asked_for,
            "continue": false,
        }))
        .into_response());
    };
    if !asked_for.is_empty() && asked_for != loaded.session.public_id {
        return Err(AppError::forbidden(
            "session_mismatch",
            "The session named in Sec-Secure-Session-Id is not the session of this cookie.",
        ));
    }
    let client = super::client(&state, peer, &headers);
    let Some(proof) = dbsc_proof(&headers, &body) else {
        return challenge_answer(&state, &loaded.session).await;
    };
    match refresh(&state, &mut loaded, &key, Some(proof), &client).await? {
        Refreshed::Cookie(c) => Ok(dbsc_answer(&state, &loaded.session, [c])),
        Refreshed::Stale => challenge_answer(&state, &loaded.session).await,
        Refreshed::Failed => Err(proof_failed()),
    }
}
