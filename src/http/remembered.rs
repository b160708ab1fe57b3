//! "Remember this browser". At a sign-in the user may tick "remember this browser" on the
//! second-factor page; when that session then binds to a WebCrypto device key (the
//! `/_portcullis/bind` interstitial), the device record keeps the key and a date
//! (`remember_device.lifetime`). A later password sign-in from that device — recognised by its
//! device cookie — goes to `/_portcullis/remembered` instead of the second factor: the page
//! signs a single-use challenge with the key in the browser's IndexedDB, and only that proof
//! completes the sign-in (`amr: ["pwd","swk"]`), bound to the same key at once.
//!
//! What it never does: skip the second factor for a device that is not known, bound and
//! remembered; accept a copied device cookie without the key (the key cannot leave the browser);
//! outlive its date, the device's revocation, a reset of the user's factors, or a policy that
//! switches it off for the account. Any failure falls back to the second factor.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::AppError;
use super::login::{
    check_csrf, complete_sign_in, csrf_token, current_session, stage_page, with_cookies,
};
use super::pages::{self, render};
use super::webauthn::{redirect_json, ApiCsrf};
use super::{get_cookie, see_other, Form, Json, Peer};
use crate::auth::flow::Client;
use crate::binding::{self, BoundKey, ChallengeUse, Method, Purpose};
use crate::crypto::sha256_hex;
use crate::session::{Loaded, Session, Stage};
use crate::state::AppState;
use crate::store::{AuditEvent, Device, User};

/// The page a remembered device proves itself on.
pub const PATH: &str = "/_portcullis/remembered";
/// `amr` of a sign-in completed by a remembered device's key: proof of possession of a
/// software-secured key (RFC 8176 `swk`).
pub const AMR_DEVICE: &str = "swk";

/// Whether the second-factor page offers "remember this browser" to this user.
pub async fn offered(state: &AppState, user_id: &str) -> Result<bool, AppError> {
    if !state.config.binding.enabled || state.config.remember_device.lifetime.is_zero() {
        return Ok(false);
    }
    Ok(state
        .durable
        .user_by_id(user_id)
        .await?
        .is_some_and(|u| state.config.remember_device.allowed_for(&u.account_id)))
}

/// The browser's device, when it is a known, active device of `user` remembered until later
/// than now with a key to prove, and policy still allows it.
pub async fn remembered(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
) -> Result<Option<(Device, BoundKey)>, AppError> {
    if !state.config.binding.enabled || !state.config.remember_device.allowed_for(&user.account_id)
    {
        return Ok(None);
    }
    let Some(token) = get_cookie(headers, super::devices::cookie_name(state))
        .filter(|t| crate::device::plausible_token(t))
    else {
        return Ok(None);
    };
    let Some(d) = state
        .durable
        .device_by_token(&sha256_hex(token.as_bytes()))
        .await?
    else {
        return Ok(None);
    };
    let now = state.clock.now();
    if d.user_id != user.id || d.status != "active" || d.remembered_until.is_none_or(|t| t <= now) {
        return Ok(None);
    }
    let Some(key) = d
        .remember_key
        .as_deref()
        .and_then(|k| serde_json::from_str::<BoundKey>(k).ok())
    else {
        return Ok(None);
    };
    Ok(Some((d, key)))
}

/// When a session binds to a WebCrypto key: remembers its device if the user asked for it.
pub(crate) async fn on_bound(
    state: &AppState,
    session: &Session,
    key: &BoundKey,
    client: &Client,
) -> Result<(), AppError> {
    let Some(device) = &session.device_id else {
        return Ok(());
    };
    if !session.remember_device || key.method != Method::Webcrypto {
        return Ok(());
    }
    let Some(user) = state.durable.user_by_id(&session.user_id).await? else {
        return Ok(());
    };
    if !state.config.remember_device.allowed_for(&user.account_id) {
        return Ok(());
    }
    let secs = i64::try_from(state.config.remember_device.lifetime.as_secs()).unwrap_or(0);
    let until = state.clock.now().saturating_add(secs);
    let key_json = serde_json::to_string(key).map_err(|e| AppError::internal(&e))?;
    state
        .durable
        .remember_device(device, Some(&key_json), Some(until))
        .await?;
    let ev = AuditEvent::new("device_remembered", "success", state.clock.now())
        .user(&user)
        .reason(&format!("until {}", crate::clock::rfc3339(until)))
        .client(&client.ip, &client.user_agent);
    state.audit.record(ev).await;
    Ok(())
}

/// The session waiting for its device proof.
async fn waiting(state: &AppState, headers: &HeaderMap) -> Result<Option<Loaded>, AppError> {
    Ok(current_session(state, headers)
        .await?
        .filter(|l| l.session.stage == Stage::DeviceProof))
}

/// `GET /_portcullis/remembered`: the page that proves the device key.
pub async fn page_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(_): RawQuery,
) -> Result<Response, AppError> {
    let Some(loaded) = current_session(&state, &headers).await? else {
        return Ok(super::no_session("/_portcullis/login?notice=expired"));
    };
    if loaded.session.stage != Stage::DeviceProof {
        return Ok(see_other(&stage_page(&loaded)));
    }
    let (token, set) = csrf_token(&state, &headers);
    Ok(with_cookies(
        render(StatusCode::OK, &pages::Remembered { csrf: &token }),
        set,
    ))
}

/// `POST /_portcullis/remembered/challenge` → `{challenge}`.
pub async fn challenge_post(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let loaded = waiting(&state, &headers)
        .await?
        .ok_or_else(super::webauthn::no_session)?;
    let challenge = binding::issue_challenge(
        state.ephemeral.as_ref(),
        &loaded.session.public_id,
        Purpose::Remembered,
    )
    .await?;
    Ok(axum::Json(serde_json::json!({ "challenge": challenge })).into_response())
}

#[derive(Deserialize)]
pub struct ProofBody {
    #[serde(default)]
    proof: Option<String>,
}

/// Back to the second factor: the answer to any failed device proof.
async fn fall_back(
    state: &AppState,
    (mut loaded, client): (Loaded, &Client),
    why: &'static str,
) -> Result<Response, AppError> {
    loaded.session.stage = Stage::SecondFactor;
    state.sessions.save(&loaded.key, &loaded.session).await?;
    let mut ev = AuditEvent::new("remembered_device", "failure", state.clock.now())
        .reason(why)
        .client(&client.ip, &client.user_agent);
    if let Some(u) = state.durable.user_by_id(&loaded.session.user_id).await? {
        ev = ev.user(&u);
    }
    state.audit.record(ev).await;
    Err(AppError::new(
        StatusCode::UNAUTHORIZED,
        "device_not_proven",
        "This browser could not prove it is the remembered device. Use your second factor instead.",
    ))
}

/// `POST /_portcullis/remembered/finish` `{"proof": JWS}` → `{redirect}`.
pub async fn finish_post(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<ProofBody>,
) -> Result<Response, AppError> {
    let mut loaded = waiting(&state, &headers)
        .await?
        .ok_or_else(super::webauthn::no_session)?;
    let Some(user) = state.login.active_user(&loaded.session.user_id).await? else {
        return Err(super::webauthn::no_session());
    };
    // (A proof from another network or browser never gets here: `guard_sign_in_steps`.)
    let client = super::client(&state, peer, &headers);
    // Everything is checked again now: the device may have been revoked or forgotten meanwhile.
    let Some((_, key)) = remembered(&state, &headers, &user).await? else {
        return fall_back(&state, (loaded, &client), "not_remembered").await;
    };
    let Some(proof) = body.proof.filter(|p| p.len() <= 4096) else {
        return fall_back(&state, (loaded, &client), "no_key").await;
    };
    let jti = match binding::verify_refresh(&proof, &key) {
        Ok(jti) => jti,
        Err(e) => return fall_back(&state, (loaded, &client), e.reason()).await,
    };
    let used = binding::consume_challenge(
        state.ephemeral.as_ref(),
        &jti,
        &loaded.session.public_id,
        Purpose::Remembered,
    )
    .await?;
    if used != ChallengeUse::Fresh {
        return fall_back(&state, (loaded, &client), "stale_challenge").await;
    }
    state.login.complete(&mut loaded.session, &user, AMR_DEVICE);
    let device_cookies = complete_sign_in(&state, &headers, &client, &mut loaded.session).await?;
    // The session is bound to the key that just proved itself, first registration wins as ever.
    let continuity = super::binding::Continuity::DeviceKey;
    let bound = super::binding::register(&state, &mut loaded, key, &client, continuity).await?;
    let ev = AuditEvent::new("second_factor", "success", state.clock.now())
        .user(&user)
        .reason("remembered_device")
        .client(&client.ip, &client.user_agent);
    state.audit.record(ev).await;
    let (id, _) = state.sessions.rotate(&loaded.key, &loaded.session).await?;
    let mut cookies = vec![state.sessions.set_cookie(&id)];
    cookies.extend(device_cookies);
    cookies.extend(bound.into_iter().flatten());
    Ok(with_cookies(redirect_json(&stage_page(&loaded)), cookies))
}

#[derive(Deserialize)]
pub struct SkipForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/remembered/skip`: use the second factor instead.
pub async fn skip_post(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<SkipForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    let Some(mut loaded) = current_session(&state, &headers).await? else {
        return Ok(super::no_session("/_portcullis/login?notice=expired"));
    };
    if loaded.session.stage != Stage::DeviceProof {
        // Another step of this sign-in (or a complete session): that step's page, as `GET`.
        return Ok(see_other(&stage_page(&loaded)));
    }
    loaded.session.stage = Stage::SecondFactor;
    state.sessions.save(&loaded.key, &loaded.session).await?;
    Ok(see_other("/_portcullis/mfa"))
}
