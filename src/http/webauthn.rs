//! The JSON API of security keys and passkeys under `/_portcullis/webauthn/`, used by
//! `static/webauthn.js`. Every call is a POST carrying the page's CSRF token in `X-CSRF-Token`
//! (checked with the Origin like every gateway form) and a JSON body, so a cross-site page can
//! neither send nor read it. Ceremony rules live in `auth::webauthn`; this module maps them to
//! sessions, cookies and JSON answers.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use webauthn_rs::prelude::{PublicKeyCredential, RegisterPublicKeyCredential};

use super::error::AppError;
use super::login::{
    check_csrf, complete_sign_in, current_session, end_current_session, stage_page, with_cookies,
};
use super::{csrf, get_cookie, Json, Peer};
use crate::auth::flow::CodeOutcome;
use crate::auth::webauthn::{Keys, PasskeySignIn, Refusal, Registered, Started, PASSKEY_AMR};
use crate::crypto::sha256_hex;
use crate::policy::safe_return_target;
use crate::session::{Loaded, Session, Stage};
use crate::state::AppState;
use crate::store::User;

/// Header that carries the CSRF token of JSON calls.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How recent the last second-factor proof must be to add or remove a key (ms).
pub const FRESH_PROOF_MS: i64 = 10 * 60 * 1000;

/// Proof that a JSON call carries a valid CSRF header and comes from our origin. An extractor,
/// so it runs before the body is read: a forged call is refused before any parsing.
pub struct ApiCsrf;

impl FromRequestParts<AppState> for ApiCsrf {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        check_csrf(state, &parts.headers, token)?;
        Ok(ApiCsrf)
    }
}

/// The key service, or 404 when WebAuthn is off here.
pub(crate) fn keys(state: &AppState) -> Result<&Keys, AppError> {
    state.keys.as_ref().ok_or_else(|| {
        AppError::new(
            StatusCode::NOT_FOUND,
            "webauthn_unavailable",
            "Security keys are not available on this gateway.",
        )
    })
}

pub(crate) fn started(s: Started) -> Response {
    axum::Json(serde_json::json!({ "ceremony": s.ceremony, "options": s.options })).into_response()
}

pub(crate) fn redirect_json(to: &str) -> Response {
    axum::Json(serde_json::json!({ "redirect": to })).into_response()
}

/// After a step up in privilege: the session moves to a new id (set as cookie) and the browser
/// is told where its stage belongs.
async fn stepped_up(
    state: &AppState,
    loaded: &Loaded,
    more_cookies: Vec<String>,
) -> Result<Response, AppError> {
    let (id, _) = state.sessions.rotate(&loaded.key, &loaded.session).await?;
    let mut cookies = vec![state.sessions.set_cookie(&id)];
    cookies.extend(more_cookies);
    Ok(with_cookies(redirect_json(&stage_page(loaded)), cookies))
}

fn expired() -> AppError {
    AppError::new(
        StatusCode::BAD_REQUEST,
        "ceremony_expired",
        "This security key request is not valid here: it expired, was already used, or belongs to another sign-in. Please try again.",
    )
}

pub(crate) fn refused(r: Refusal, message: &str) -> AppError {
    match r {
        Refusal::Expired => expired(),
        Refusal::Policy("too_many_keys") => too_many_keys(),
        Refusal::Rejected("credential_exists") => AppError::new(
            StatusCode::CONFLICT,
            "credential_exists",
            "This security key or passkey is registered already. Use another one, or sign in with it.",
        ),
        Refusal::Rejected("credential_id_too_long") => AppError::bad_request(
            "This security key's credential id is longer than WebAuthn allows (1023 bytes).",
        ),
        // Said for what it is: trying again with the same key will not help.
        Refusal::Rejected("user_not_verified") => AppError::new(
            StatusCode::UNAUTHORIZED,
            "key_rejected",
            "The security key did not check your PIN or fingerprint, which is needed here. Use \
             a key with a PIN or biometric set up.",
        ),
        Refusal::Rejected("suspended_credential" | "possible_clone") => AppError::new(
            StatusCode::UNAUTHORIZED,
            "key_rejected",
            "This key is suspended: an answer from it looked like one from a copy of the key. \
             Use another key, or sign in with your password and another factor; your account \
             page lists the key as suspended.",
        ),
        Refusal::Rejected(_) => AppError::new(
            StatusCode::UNAUTHORIZED,
            "key_rejected",
            message.to_string(),
        ),
        Refusal::Policy("aaguid_not_allowed") => AppError::forbidden(
            "aaguid_not_allowed",
            "This model of security key is not allowed for your account. Use one of the keys your organisation approved.",
        ),
        Refusal::Policy(_) => AppError::forbidden(
            "attestation_not_verified",
            "This security key could not prove that it is an approved model. Use one of the keys your organisation approved.",
        ),
    }
}

pub(super) fn no_session() -> AppError {
    AppError::new(
        StatusCode::UNAUTHORIZED,
        "session_required",
        "There is no sign-in here at the step this needs: none was started, it has ended, or it \
         is at another step. Sign in and try again.",
    )
}

/// Too many failed key answers: the session ends and the JSON answer says to sign in again.
pub(crate) async fn ended_by_failures(
    state: &AppState,
    loaded: &Loaded,
) -> Result<Response, AppError> {
    state
        .sessions
        .destroy(&loaded.key, &loaded.session.user_id)
        .await?;
    state.signer.forget(&loaded.key);
    let resp = AppError::new(
        StatusCode::UNAUTHORIZED,
        "restart",
        "Too many failed attempts. Please sign in again.",
    )
    .into_response();
    Ok(with_cookies(resp, [state.sessions.clear_cookie()]))
}

/// Whether the session's last second-factor proof is recent enough for a change of factors.
/// On an administrator's account only a security-key proof counts: a code (a recovery code, an
/// app set up later) must not let a new key in, and with it the admin console, which takes
/// keys only.
pub(super) fn fresh(state: &AppState, s: &Session, user: &User) -> bool {
    let proof = if user.is_admin {
        s.strong_ms
    } else {
        s.second_factor_ms()
    };
    proof.is_some_and(|at| state.clock.now_millis() - at <= FRESH_PROOF_MS)
}

/// The session allowed to register a key and its user: a complete session with a fresh
/// second-factor proof, or a new user at the forced-enrolment step.
async fn registering(state: &AppState, headers: &HeaderMap) -> Result<(Loaded, User), AppError> {
    let loaded = current_session(state, headers)
        .await?
        .ok_or_else(no_session)?;
    let user = match &loaded.session.stage {
        Stage::Authenticated => {
            let user = state
                .user_gate
                .admit(state, &loaded.session.user_id, loaded.session.auth_ms)
                .await?
                .map(std::sync::Arc::unwrap_or_clone)
                .ok_or_else(no_session)?;
            if !fresh(state, &loaded.session, &user) {
                state.metrics.step_up("fresh_proof_required");
                return Err(AppError::forbidden(
                    "reauthentication_required",
                    if user.is_admin {
                        "For your security, confirm it's you again with a security key at \
                         /_portcullis/reauth?key=1 before adding a key: on an administrator's \
                         account a code does not count."
                    } else {
                        "For your security, confirm it's you again at /_portcullis/reauth before adding a key."
                    },
                ));
            }
            user
        }
        Stage::EnrolTotp { .. } => state
            .login
            .active_user(&loaded.session.user_id)
            .await?
            .ok_or_else(no_session)?,
        _ => return Err(no_session()),
    };
    Ok((loaded, user))
}

/// A setup of the first second factor with a key that may no longer complete (see
/// [`crate::auth::flow::LoginFlow::enrolment_overtaken`]): the sign-in ends, audited, and the
/// answer says why with the sign-in URL; `None` where it may go on.
async fn overtaken(
    state: &AppState,
    loaded: &Loaded,
    user: &User,
    (peer, headers): (std::net::SocketAddr, &HeaderMap),
) -> Result<Option<Response>, AppError> {
    let Some(why) = state
        .login
        .enrolment_overtaken(&loaded.session, false)
        .await?
    else {
        return Ok(None);
    };
    let client = super::client(state, peer, headers);
    let ev = crate::store::AuditEvent::new("webauthn_enrolled", "denied", state.clock.now())
        .user(user)
        .reason(why);
    state.login.audit(ev, &client).await;
    state
        .sessions
        .destroy(&loaded.key, &loaded.session.user_id)
        .await?;
    let login = super::gate::sign_in_location(super::gate::LOGIN_PATH, None, Some(why));
    let message = super::login::notice_text(why).unwrap_or_default();
    Ok(Some(super::login::ended_with_sign_in(
        state,
        (StatusCode::CONFLICT, "enrolment_overtaken"),
        message,
        login,
    )))
}

#[derive(Deserialize)]
pub struct RegisterStart {
    #[serde(default)]
    name: String,
}

/// An account holding [`crate::auth::webauthn::MAX_KEYS`] keys registers no more.
pub(crate) fn too_many_keys() -> AppError {
    AppError::new(
        StatusCode::CONFLICT,
        "too_many_keys",
        "This account has as many security keys and passkeys as it may have (16): remove one \
         it no longer uses before adding another.",
    )
}

/// `POST /_portcullis/webauthn/register/start` `{name}` → `{ceremony, options}`.
pub async fn register_start(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<RegisterStart>,
) -> Result<Response, AppError> {
    let keys = keys(&state)?;
    let (loaded, user) = registering(&state, &headers).await?;
    if let Some(r) = overtaken(&state, &loaded, &user, (peer, &headers)).await? {
        return Ok(r);
    }
    if !body.name.trim().is_empty()
        && !crate::policy::is_readable_name(body.name.trim(), crate::auth::webauthn::MAX_NAME)
    {
        return Err(AppError::invalid_input(crate::policy::NAME_RULE));
    }
    if !keys.has_room(&user.id).await? {
        return Err(crate::http::webauthn::too_many_keys());
    }
    let s = keys
        .start_registration(&user, &loaded.key, &body.name)
        .await?;
    Ok(started(s))
}

#[derive(Deserialize)]
pub struct Finish<T> {
    ceremony: String,
    credential: T,
    /// Where to go after a passkey sign-in (validated as a same-origin path).
    #[serde(default)]
    next: String,
    /// "Remember this browser", ticked on the second-factor page.
    #[serde(default)]
    remember: bool,
}

/// `POST /_portcullis/webauthn/register/finish` `{ceremony, credential}` → `{redirect}`.
pub async fn register_finish(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<Finish<RegisterPublicKeyCredential>>,
) -> Result<Response, AppError> {
    let keys = keys(&state)?;
    let (mut loaded, user) = registering(&state, &headers).await?;
    if let Some(r) = overtaken(&state, &loaded, &user, (peer, &headers)).await? {
        return Ok(r);
    }
    let client = super::client(&state, peer, &headers);
    let outcome = keys
        .finish_registration(
            &body.ceremony,
            &loaded.key,
            &user,
            &body.credential,
            &client,
            None,
        )
        .await?;
    match outcome {
        Registered::Refused(r) => Err(refused(
            r,
            "The security key's answer could not be verified. Please try again.",
        )),
        Registered::Stored(_) if matches!(loaded.session.stage, Stage::EnrolTotp { .. }) => {
            keys.complete_enrolment(&mut loaded.session, &user, &client)
                .await?;
            // Complete at once where the account kept its recovery codes (no page to show).
            let device = if loaded.session.is_authenticated() {
                complete_sign_in(&state, &headers, &client, &mut loaded.session).await?
            } else {
                Vec::new()
            };
            stepped_up(&state, &loaded, device).await
        }
        Registered::Stored(_) => Ok(redirect_json("/_portcullis/account?notice=key_added")),
    }
}

/// The session waiting for its second factor.
async fn pending_second_factor(state: &AppState, headers: &HeaderMap) -> Result<Loaded, AppError> {
    current_session(state, headers)
        .await?
        .filter(|l| l.session.stage == Stage::SecondFactor)
        .ok_or_else(no_session)
}

/// `POST /_portcullis/webauthn/authenticate/start` → `{ceremony, options}`.
pub async fn authenticate_start(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let keys = keys(&state)?;
    let loaded = pending_second_factor(&state, &headers).await?;
    match keys
        .start_second_factor(&loaded.session, &loaded.key)
        .await?
    {
        Some(s) => Ok(started(s)),
        None => Err(AppError::new(
            StatusCode::NOT_FOUND,
            "no_keys",
            "No security key of this account can be used: none is registered, or each was \
             suspended (a possible copy, or a \"this wasn't me\" report) until an administrator \
             restores it. Use your authenticator app or a recovery code.",
        )),
    }
}

/// `POST /_portcullis/webauthn/authenticate/finish` `{ceremony, credential}` → `{redirect}`.
pub async fn authenticate_finish(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<Finish<PublicKeyCredential>>,
) -> Result<Response, AppError> {
    let keys = keys(&state)?;
    let mut loaded = pending_second_factor(&state, &headers).await?;
    loaded.session.remember_device =
        body.remember && super::remembered::offered(&state, &loaded.session.user_id).await?;
    let client = super::client(&state, peer, &headers);
    let outcome = keys
        .finish_second_factor(
            &body.ceremony,
            &loaded.key,
            &mut loaded.session,
            &body.credential,
            &client,
        )
        .await?;
    match outcome {
        CodeOutcome::Accepted => {
            let device = complete_sign_in(&state, &headers, &client, &mut loaded.session).await?;
            stepped_up(&state, &loaded, device).await
        }
        CodeOutcome::Rejected => {
            state.sessions.save(&loaded.key, &loaded.session).await?;
            let message = if super::login::codes_accepted(&state, &loaded.session.user_id).await? {
                "The security key was not accepted. Try again, or use a code instead."
            } else {
                "The security key was not accepted. Try again, with this account's security key \
                 or passkey (it takes no codes)."
            };
            Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "key_rejected",
                message,
            ))
        }
        CodeOutcome::Restart => {
            super::login::second_factor_failed(&state, &loaded.session, &client).await?;
            ended_by_failures(&state, &loaded).await
        }
        CodeOutcome::Throttled { retry_after } => {
            super::login::second_factor_failed(&state, &loaded.session, &client).await?;
            Err(AppError::throttled(retry_after))
        }
        // Only codes are refused by that policy; a key never is.
        CodeOutcome::KeyRequired => Err(AppError::forbidden(
            "key_required",
            "This account must sign in with a security key or passkey.",
        )),
    }
}

/// What a passkey ceremony is bound to before any session exists: the browser's CSRF cookie.
fn browser_binding(state: &AppState, headers: &HeaderMap) -> Result<String, AppError> {
    get_cookie(headers, csrf::cookie_name(state.config.is_https()))
        .map(|v| sha256_hex(v.as_bytes()))
        .ok_or_else(|| AppError::forbidden("csrf", "Reload the page and try again."))
}

/// `POST /_portcullis/webauthn/passkey/start` → `{ceremony, options}`.
/// Anyone may start one, so ceremonies are bounded per address and in all
/// (`429 throttled` beyond, with `Retry-After`): each is held until it times out.
pub async fn passkey_start(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let keys = keys(&state)?;
    let binding = browser_binding(&state, &headers)?;
    let client = super::client(&state, peer, &headers);
    if let Some(retry_after) = state.login.ceremony_budget(&client).await? {
        return Err(AppError::throttled(retry_after));
    }
    Ok(started(keys.start_passkey(&binding).await?))
}

/// `POST /_portcullis/webauthn/passkey/finish` `{ceremony, credential, next}` → `{redirect}`:
/// a complete sign-in (the passkey is something the user has, unlocked by something they know
/// or are).
pub async fn passkey_finish(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<Finish<PublicKeyCredential>>,
) -> Result<Response, AppError> {
    let keys = keys(&state)?;
    let binding = browser_binding(&state, &headers)?;
    let client = super::client(&state, peer, &headers);
    let device = super::devices::known_device(&state, &headers).await?;
    let user = match keys
        .finish_passkey(
            &body.ceremony,
            &binding,
            &body.credential,
            &client,
            device.as_ref(),
        )
        .await?
    {
        PasskeySignIn::Accepted(u) => u,
        PasskeySignIn::Refused(r) => {
            return Err(refused(
                r,
                "That passkey was not accepted. Try again, or sign in with your password.",
            ))
        }
        PasskeySignIn::Throttled { retry_after } => return Err(AppError::throttled(retry_after)),
    };
    end_current_session(&state, &headers).await?;
    let next = safe_return_target(&body.next, &state.config.server.public_url);
    let mut session = Session::after_password(
        &user.id,
        Stage::Authenticated,
        state.clock.now_millis(),
        &client.ip,
        &client.user_agent,
        next,
    );
    session.amr = PASSKEY_AMR.iter().map(|s| s.to_string()).collect();
    session.strong_ms = Some(session.auth_ms);
    session.factor_ms = Some(session.auth_ms);
    let device_cookies = complete_sign_in(&state, &headers, &client, &mut session).await?;
    let (id, key) = state.sessions.create(&session).await?;
    let loaded = Loaded { key, session };
    let mut cookies = vec![state.sessions.set_cookie(&id)];
    cookies.extend(device_cookies);
    Ok(with_cookies(redirect_json(&stage_page(&loaded)), cookies))
}
