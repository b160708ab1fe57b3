//! Forms held for a proof: a browser's form (a `POST`, `PUT`, `PATCH` or `DELETE` it sent to
//! the console) that a `[[step_up]]` rule, the risk engine's hold or a device proof to renew (a
//! bound cookie that ran out while the form was filled in) stopped is kept, sealed under the
//! master key in the ephemeral store, up to [`HELD_PER_SESSION`] per session (two tabs each
//! stopped for a proof) for [`HELD_TTL`], instead of being lost.
//! The browser goes to `/_portcullis/reauth`, which says what will be sent, or to the device
//! check; after the proof, `GET /_portcullis/held?id=…` shows it once more with a button (the
//! page's script presses it), and `POST /_portcullis/held` sends it through the gate, as the
//! browser sent it, with the session's fresh proof: the console's answer is the browser's. A
//! form held is sent at most once (the record is taken), only by the session and the browser
//! that sent it, and only while it passes the gate (a proof that went stale again holds it
//! again). Forward-auth mode cannot hold a form (the proxy in front has its body) and answers
//! as before.

use axum::extract::{ConnectInfo, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::error::{wants_html, AppError};
use super::login::{check_csrf, csrf_token, current_session, with_cookies};
use super::pages::{self, render};
use super::{see_other, Form, Peer};
use crate::session::Loaded;
use crate::state::AppState;

/// The held form's page, and where the form is sent from.
pub const PATH: &str = "/_portcullis/held";
/// The cookie that ties a held form to the browser that sent it (`__Host-` over HTTPS), one
/// per slot ([`cookie_name`]): only that browser may see or send it, so a copied session
/// cookie that gets a form held cannot have the owner's browser send it (a link the owner
/// opens).
pub const COOKIE_HTTPS: &str = "__Host-portcullis-held";
/// The same on the plain-HTTP loopback demo.
pub const COOKIE_HTTP: &str = "portcullis-held";
/// How many forms a session may have held at once (one per tab stopped for a proof); a newer
/// one takes the place of the oldest.
pub const HELD_PER_SESSION: u64 = 4;
/// How many forms are being read to be held at once, gateway-wide: each holds up to
/// [`HELD_MAX_BODY`] (and its sealed copy) in memory until it is stored; more at once are
/// answered as forms that cannot be held.
const HOLDING_AT_ONCE: usize = 16;
static HOLDING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HOLDING_AT_ONCE);
/// The request headers kept with a held form and sent with it: what the browser said of where
/// the form came from (checked when it was held), not what the held page's request says.
const KEPT_HEADERS: [header::HeaderName; 7] = [
    header::ORIGIN,
    header::REFERER,
    header::ACCEPT,
    header::HeaderName::from_static("sec-fetch-site"),
    header::HeaderName::from_static("sec-fetch-mode"),
    header::HeaderName::from_static("sec-fetch-user"),
    header::HeaderName::from_static("sec-fetch-dest"),
];
/// How long a held form waits for its step-up.
pub const HELD_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// The largest form body held (a larger one is refused as before, with the advice to go back).
pub const HELD_MAX_BODY: usize = 1024 * 1024;

/// A held form, as sealed in the ephemeral store.
#[derive(Serialize, Deserialize)]
struct Held {
    /// The id in the held page's address: names this form, not an earlier one of the session.
    id: String,
    method: String,
    /// Path (canonical) and query, as the gate forwards it.
    target: String,
    content_type: Option<String>,
    /// The body, base64.
    body: String,
    /// The page the form was on, if known: where "Don't send" goes.
    back: Option<String>,
    /// SHA-256 (hex) of the value of the cookie set on the browser that sent the form.
    tie: String,
    /// [`KEPT_HEADERS`] as the form was sent.
    headers: Vec<(String, String)>,
    /// The device context (network and browser, keyed) of the request that sent it (hex): the
    /// held form is seen and sent only from there, so a cookie planted in another browser (by a
    /// site of the same host) does not make that browser its sender.
    context: String,
}

/// A form just held: the page that sends it, and the cookie to set on the browser that sent it.
pub(crate) struct HeldAt {
    pub page: String,
    pub cookie: String,
}

fn key(session_public_id: &str, slot: u64) -> String {
    format!("held:{session_public_id}:{slot}")
}

/// The tie cookie of a slot (see [`COOKIE_HTTPS`]).
fn cookie_name(https: bool, slot: u64) -> String {
    let base = if https { COOKIE_HTTPS } else { COOKIE_HTTP };
    format!("{base}-{slot}")
}

/// Every name a tie cookie may have: the gateway's own, never sent on to the console.
pub(crate) fn cookie_names() -> Vec<String> {
    (0..HELD_PER_SESSION)
        .flat_map(|slot| [cookie_name(true, slot), cookie_name(false, slot)])
        .collect()
}

/// The slot a held page's id names (`{slot}-{random}`).
fn slot_of(id: &str) -> Option<u64> {
    let (slot, _) = id.split_once('-')?;
    let slot: u64 = slot.parse().ok()?;
    (slot < HELD_PER_SESSION).then_some(slot)
}

fn context(session_public_id: &str) -> String {
    format!("held-form:{session_public_id}")
}

/// Whether a request the gate refused for a step-up may be held: a browser's form (not a read,
/// not a WebSocket) with a body that is not encoded (`Content-Encoding`).
pub(crate) fn holdable(method: &Method, headers: &HeaderMap, browser: bool) -> bool {
    browser
        && !super::gate::is_read(method)
        && *method != Method::OPTIONS
        && !headers.contains_key(header::CONTENT_ENCODING)
}

/// Holds `req` (its body read, up to [`HELD_MAX_BODY`]) for the session `session_public_id`,
/// in the next of its slots (replacing the oldest form it holds, once all are taken); returns
/// the held page's address (`next` for the step-up) and the cookie for the browser, or `None`
/// when the body is too large (announced or sent), broke off, or too many forms are being held
/// at once (the caller answers as for a form it cannot hold).
pub(crate) async fn hold(
    state: &AppState,
    (session_public_id, peer): (&str, std::net::SocketAddr),
    (target, back): (&str, Option<String>),
    req: Request,
) -> Result<Option<HeldAt>, AppError> {
    let device = hex::encode(super::binding::context_of(state, peer, req.headers()));
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > HELD_MAX_BODY) {
        return Ok(None);
    }
    let Ok(_reading) = HOLDING.try_acquire() else {
        tracing::info!("a form was not held: too many are being held at once");
        return Ok(None);
    };
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, HELD_MAX_BODY).await else {
        return Ok(None);
    };
    let turn = state
        .ephemeral
        .incr(&format!("held-next:{session_public_id}"), HELD_TTL)
        .await?;
    let slot = turn % HELD_PER_SESSION;
    let id = format!("{slot}-{}", crate::crypto::random_token(16));
    let tie = crate::crypto::random_token(24);
    let held = Held {
        id: id.clone(),
        method: parts.method.as_str().to_string(),
        target: target.to_string(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: STANDARD.encode(&body),
        back,
        tie: crate::crypto::sha256_hex(tie.as_bytes()),
        headers: KEPT_HEADERS
            .iter()
            .filter_map(|n| {
                let v = parts.headers.get(n)?.to_str().ok()?;
                Some((n.as_str().to_string(), v.to_string()))
            })
            .collect(),
        context: device,
    };
    let plain =
        zeroize::Zeroizing::new(serde_json::to_vec(&held).map_err(|e| AppError::internal(&e))?);
    let sealed = state
        .master_key
        .seal(&context(session_public_id), &plain)
        .map_err(|e| AppError::internal(&e))?;
    state
        .ephemeral
        .put(&key(session_public_id, slot), &sealed, HELD_TTL)
        .await?;
    let https = state.config.is_https();
    let name = cookie_name(https, slot);
    let secure = if https { "; Secure" } else { "" };
    Ok(Some(HeldAt {
        page: format!("{PATH}?id={id}"),
        cookie: format!(
            "{name}={tie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            HELD_TTL.as_secs()
        ),
    }))
}

/// Whether the request (`peer`, `headers`) comes from the browser that sent `held`: its cookie,
/// and the same device context (network and browser).
fn tied(
    state: &AppState,
    (held, slot): (&Held, u64),
    (peer, headers): (std::net::SocketAddr, &HeaderMap),
) -> bool {
    let context = hex::encode(super::binding::context_of(state, peer, headers));
    if !crate::crypto::ct_eq(context.as_bytes(), held.context.as_bytes()) {
        return false;
    }
    let name = cookie_name(state.config.is_https(), slot);
    super::get_cookie(headers, &name).is_some_and(|v| {
        let sent = crate::crypto::sha256_hex(v.as_bytes());
        crate::crypto::ct_eq(sent.as_bytes(), held.tie.as_bytes())
    })
}

/// What the step-up page says of a form held for it: the method and the path it goes to, and
/// where "Cancel" goes (the page the form was on).
pub(crate) struct Waiting {
    /// Its id, for the step-up page's "Cancel", which drops it.
    pub id: String,
    pub method: String,
    pub path: String,
    pub back: Option<String>,
}

/// The form held for `loaded`'s session under `id` (the id in `next`, the held page's
/// address), if `next` is that page and the form still waits.
pub(crate) async fn waiting(
    state: &AppState,
    (loaded, peer, headers): (&Loaded, std::net::SocketAddr, &HeaderMap),
    next: &str,
) -> Result<Option<Waiting>, AppError> {
    let Some(id) = id_in(next) else {
        return Ok(None);
    };
    Ok(read(state, (loaded, peer, headers), &id, false)
        .await?
        .map(|h| Waiting {
            id: h.id,
            path: h.target,
            method: h.method,
            back: h.back,
        }))
}

/// Whether `next` is the page of a held form (whether or not it is still held).
pub(crate) fn names_a_form(next: &str) -> bool {
    id_in(next).is_some()
}

/// The `id` of a held page's address.
fn id_in(next: &str) -> Option<String> {
    let query = next.strip_prefix(PATH)?.strip_prefix('?')?;
    super::query_param(&Some(query.to_string()), "id").filter(|id| plausible_id(id))
}

fn plausible_id(id: &str) -> bool {
    id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The session's held form if its id is `id` and this browser sent it; taken (so sent at most
/// once) with `take`.
async fn read(
    state: &AppState,
    (loaded, peer, headers): (&Loaded, std::net::SocketAddr, &HeaderMap),
    id: &str,
    take: bool,
) -> Result<Option<Held>, AppError> {
    let public = &loaded.session.public_id;
    let Some(slot) = slot_of(id) else {
        return Ok(None);
    };
    let ours = |h: &Held| h.id == id && tied(state, (h, slot), (peer, headers));
    let key = key(public, slot);
    let sealed = if take {
        // Only the form this page names: an earlier page's id takes nothing of a newer form
        // held in its slot since.
        match state.ephemeral.get(&key).await? {
            Some(s) if opened(state, public, &s).is_some_and(|h| ours(&h)) => {
                state.ephemeral.take(&key).await?
            }
            _ => None,
        }
    } else {
        state.ephemeral.get(&key).await?
    };
    Ok(sealed
        .and_then(|s| opened(state, public, &s))
        .filter(|h| ours(h)))
}

fn opened(state: &AppState, session_public_id: &str, sealed: &[u8]) -> Option<Held> {
    let plain = state
        .master_key
        .open(&context(session_public_id), sealed)
        .ok()?;
    serde_json::from_slice(&plain).ok()
}

/// The session of a request to the held page: complete, or `None`.
async fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<Option<Loaded>, AppError> {
    Ok(current_session(state, headers)
        .await?
        .filter(|l| l.session.is_authenticated()))
}

fn gone(back: &str) -> AppError {
    AppError {
        action: Some((back.to_string(), "Back to the console")),
        ..AppError::new(
            StatusCode::GONE,
            "held_form_gone",
            "This form is no longer held: it was sent already (the console's answer to it was \
             shown on this page: reloading the page does not send it again), or dropped, or \
             forms sent later from this session took its place (four are held at a time), or \
             it waited more than 10 minutes. If it was not sent, go back to the console and \
             send it again: your browser's Back button may bring it back as you filled it in.",
        )
    }
}

/// `GET /_portcullis/held?id=…`: the held form, once the step-up is done: what it is and a
/// button that sends it (pressed by the page's script; "Don't send" drops it).
pub async fn held_get(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let id = super::query_param(&q, "id").unwrap_or_default();
    let Some(loaded) = signed_in(&state, &headers).await? else {
        return Ok(see_other(super::gate::LOGIN_PATH));
    };
    let held = match plausible_id(&id) {
        true => read(&state, (&loaded, peer, &headers), &id, false).await?,
        false => None,
    };
    let Some(held) = held else {
        return Err(gone("/"));
    };
    let (csrf, set) = csrf_token(&state, &headers);
    let page = pages::HeldForm {
        csrf: &csrf,
        id: &id,
        method: &held.method,
        path: &held.target,
        back: held.back.as_deref().unwrap_or("/"),
    };
    Ok(with_cookies(render(StatusCode::OK, &page), set))
}

#[derive(Deserialize)]
pub struct SendForm {
    #[serde(default)]
    id: String,
    #[serde(default)]
    csrf: String,
    /// "Don't send": drop the form and go back to its page (a checkbox's values: `drop=0` or
    /// `drop=` sends it, a value that is neither is refused).
    #[serde(default, deserialize_with = "super::checkbox")]
    drop: bool,
}

/// `POST /_portcullis/held` `id, csrf[, drop]`: sends the held form through the gate (the
/// console's answer is this request's), or drops it.
pub async fn held_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<SendForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    let Some(loaded) = signed_in(&state, &headers).await? else {
        if !wants_html(&headers) {
            return Err(super::webauthn::no_session());
        }
        return Ok(see_other(super::gate::LOGIN_PATH));
    };
    let held = match plausible_id(&form.id) {
        true => read(&state, (&loaded, peer, &headers), &form.id, true).await?,
        false => None,
    };
    let Some(held) = held else {
        return Err(gone("/"));
    };
    if form.drop {
        return Ok(see_other(held.back.as_deref().unwrap_or("/")));
    }
    let req = rebuilt(&held, &headers, peer)?;
    // A form of the admin console goes to the console's own route, through its guard again.
    if held.target.starts_with("/_portcullis/admin/") {
        let router = super::router(state.clone());
        return Ok(match tower::ServiceExt::oneshot(router, req).await {
            Ok(r) => r,
            Err(never) => match never {},
        });
    }
    Ok(super::gate::forward_held(&state, peer, req).await)
}

/// The held form as a request of this browser: its method, target, type and body, with the
/// headers of the request that sends it (its cookies prove the session and the device; its
/// `Origin` is the gateway's own page).
fn rebuilt(
    held: &Held,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
) -> Result<Request, AppError> {
    let body = STANDARD
        .decode(&held.body)
        .map_err(|e| AppError::internal(&e))?;
    let method = Method::from_bytes(held.method.as_bytes()).map_err(|e| AppError::internal(&e))?;
    let mut req = Request::builder()
        .method(method)
        .uri(held.target.as_str())
        .body(axum::body::Body::from(body.clone()))
        .map_err(|e| AppError::internal(&e))?;
    let h = req.headers_mut();
    // The sending request's own framing and body headers are not the held form's.
    let framing = [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONTENT_ENCODING,
        header::EXPECT,
        header::TE,
        header::TRAILER,
    ];
    for (name, value) in headers {
        if !framing.contains(name) && !KEPT_HEADERS.contains(name) {
            h.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &held.headers {
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            h.insert(n, v);
        }
    }
    if let Some(t) = held
        .content_type
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        h.insert(header::CONTENT_TYPE, t);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    req.extensions_mut().insert(ConnectInfo(peer));
    Ok(req)
}
