//! `/_portcullis/account`: the signed-in user's own factors. Lists security keys and passkeys
//! (name, added, last used, model), renames and removes them, and adds new ones through
//! `static/webauthn.js`. Removing a key needs a fresh second-factor proof and is refused when it
//! would leave the account without any second factor.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::error::AppError;
use super::login::{check_csrf, csrf_token, current_session, with_cookies};
use super::pages::{self, render, DeviceRow, KeyRow};
use super::webauthn::fresh;
use super::{see_other, Form, Peer};
use crate::clock::rfc3339;
use crate::session::Loaded;
use crate::state::AppState;
use crate::store::{AuditEvent, User};

const PATH: &str = "/_portcullis/account";

/// The complete session of a user who may still use the gateway, or where to send the browser.
async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Result<(Loaded, User), Response>, AppError> {
    let to_login = || see_other("/_portcullis/login?next=%2F_portcullis%2Faccount");
    let Some(loaded) = current_session(state, headers).await? else {
        return Ok(Err(to_login()));
    };
    if !loaded.session.is_authenticated() {
        return Ok(Err(to_login()));
    }
    let user = state
        .user_gate
        .admit(state, &loaded.session.user_id, loaded.session.auth_ms)
        .await?;
    Ok(user.map(|u| (loaded, u)).ok_or_else(to_login))
}

/// A form post of the signed-in user: CSRF checked, then the session as for [`signed_in`].
async fn acting(
    state: &AppState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Result<(Loaded, User), Response>, AppError> {
    check_csrf(state, headers, csrf)?;
    signed_in(state, headers).await
}

fn notice_text(code: &str) -> Option<&'static str> {
    Some(match code {
        "key_added" => "Your security key was added.",
        "key_renamed" => "The key was renamed.",
        "key_removed" => "The key was removed.",
        "device_revoked" => "The device was signed out and will have to be confirmed again.",
        _ => return None,
    })
}

/// Renders the page with an optional error.
async fn page(
    state: &AppState,
    headers: &HeaderMap,
    loaded: &Loaded,
    user: &User,
    notice: Option<&str>,
    error: Option<&str>,
    status: StatusCode,
) -> Result<Response, AppError> {
    let keys: Vec<KeyRow> = state
        .durable
        .webauthn_credentials(&user.id)
        .await?
        .into_iter()
        .map(|c| KeyRow {
            created: rfc3339(c.created_at),
            last_used: c
                .last_used_at
                .map(rfc3339)
                .unwrap_or_else(|| "never".into()),
            aaguid: c.aaguid.clone().unwrap_or_else(|| "not reported".into()),
            suspended: c.suspended_reason.clone(),
            id: c.id,
            name: c.name,
        })
        .collect();
    let has_totp = state.durable.totp(&user.id).await?.is_some();
    let devices: Vec<DeviceRow> = state
        .durable
        .list_devices(&user.id)
        .await?
        .into_iter()
        .map(|d| DeviceRow {
            current: loaded.session.device_id.as_deref() == Some(d.id.as_str()),
            first_seen: rfc3339(d.first_seen),
            last_seen: rfc3339(d.last_seen),
            last_ip: d.last_ip,
            revoked: d.status != "active",
            id: d.id,
            name: d.name,
        })
        .collect();
    let (token, set) = csrf_token(state, headers);
    let view = pages::Account {
        csrf: &token,
        email: &user.email,
        keys: &keys,
        devices: &devices,
        has_totp,
        webauthn: state.keys.is_some(),
        fresh: super::webauthn::fresh(state, &loaded.session),
        notice,
        error,
    };
    Ok(with_cookies(render(status, &view), set))
}

/// `GET /_portcullis/account`.
pub async fn account_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let (loaded, user) = match signed_in(&state, &headers).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let notice = q.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "notice")
            .and_then(|(_, v)| notice_text(&v))
    });
    page(
        &state,
        &headers,
        &loaded,
        &user,
        notice,
        None,
        StatusCode::OK,
    )
    .await
}

#[derive(Deserialize)]
pub struct RenameForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/account/keys/{id}/rename`.
pub async fn rename_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<RenameForm>,
) -> Result<Response, AppError> {
    let (loaded, user) = match acting(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let name = form.name.trim();
    if name.is_empty()
        || name.chars().count() > crate::auth::webauthn::MAX_NAME
        || name.chars().any(char::is_control)
    {
        let msg = "A key name has 1 to 64 characters and no control characters.";
        return page(
            &state,
            &headers,
            &loaded,
            &user,
            None,
            Some(msg),
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    if !state
        .durable
        .rename_webauthn_credential(&user.id, &id, name)
        .await?
    {
        return Err(AppError::not_found());
    }
    audit(
        &state,
        peer,
        &headers,
        &user,
        "webauthn_renamed",
        "success",
        &id,
    )
    .await;
    Ok(see_other(&format!("{PATH}?notice=key_renamed")))
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/account/keys/{id}/remove`.
pub async fn remove_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let (loaded, user) = match acting(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let creds = state.durable.webauthn_credentials(&user.id).await?;
    if !creds.iter().any(|c| c.id == id) {
        return Err(AppError::not_found());
    }
    let refuse = |msg: &'static str, status| {
        let (state, headers, loaded, user) = (&state, &headers, &loaded, &user);
        async move { page(state, headers, loaded, user, None, Some(msg), status).await }
    };
    if !fresh(&state, &loaded.session) {
        state.metrics.step_up("fresh_proof_required");
        return refuse(
            "For your security, sign out and sign in again before removing a key.",
            StatusCode::FORBIDDEN,
        )
        .await;
    }
    let other_key = creds.iter().any(|c| c.id != id && !c.is_suspended());
    if !other_key && state.durable.totp(&user.id).await?.is_none() {
        audit(
            &state,
            peer,
            &headers,
            &user,
            "webauthn_removed",
            "denied",
            "last_factor",
        )
        .await;
        return refuse(
            "This is your only second factor. Add another key or an authenticator app first.",
            StatusCode::CONFLICT,
        )
        .await;
    }
    if !state
        .durable
        .remove_webauthn_credential(&user.id, &id)
        .await?
    {
        return Err(AppError::not_found());
    }
    audit(
        &state,
        peer,
        &headers,
        &user,
        "webauthn_removed",
        "success",
        &id,
    )
    .await;
    let name = creds
        .iter()
        .find(|c| c.id == id)
        .map(|c| c.name.clone())
        .unwrap_or_default();
    state
        .notifier
        .account_change(
            &user,
            &format!("the security key or passkey named \"{name}\" was removed"),
        )
        .await;
    Ok(see_other(&format!("{PATH}?notice=key_removed")))
}

async fn audit(
    state: &AppState,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
    user: &User,
    event: &str,
    outcome: &str,
    reason: &str,
) {
    let client = super::client(state, peer, headers);
    let ev = AuditEvent::new(event, outcome, state.clock.now())
        .user(user)
        .client(&client.ip, &client.user_agent)
        .reason(reason);
    state.audit.record(ev).await;
}

/// `POST /_portcullis/account/devices/{id}/revoke`: signs a device out (every session it holds
/// ends at once); a later sign-in from it counts as a new device and is reported. No fresh
/// proof is needed: revoking only takes access away.
pub async fn revoke_device_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let (_, user) = match acting(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let devices = state.durable.list_devices(&user.id).await?;
    if !devices.iter().any(|d| d.id == id) {
        return Err(AppError::not_found());
    }
    state.durable.revoke_device(&id).await?;
    let ended = state.sessions.destroy_device(&user.id, &id).await?;
    audit(
        &state,
        peer,
        &headers,
        &user,
        "device_revoked",
        "success",
        &format!("{id}:{ended}_sessions"),
    )
    .await;
    Ok(see_other(&format!("{PATH}?notice=device_revoked")))
}
