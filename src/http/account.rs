//! `/_portcullis/account`: the signed-in user's own factors. Lists security keys and passkeys
//! (name, added, last used, model), renames and removes them, and adds new ones through
//! `static/webauthn.js`; makes new recovery codes and replaces the authenticator app; shows the
//! latest sign-in attempts from the audit trail. Every change of a factor needs a fresh
//! second-factor proof; removing a key is refused when it would leave the account without any
//! second factor.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::error::{wants_html, AppError};
use super::login::{check_csrf, csrf_token, with_cookies};
use super::pages::{self, render, DeviceRow, KeyRow, SignInRow};
use super::webauthn::fresh;
use super::{see_other, Form, Peer};
use crate::auth::flow::TotpChange;
use crate::auth::totp;
use crate::clock::rfc3339;
use crate::secret::Secret;
use crate::session::Loaded;
use crate::state::AppState;
use crate::store::{AuditEvent, AuditQuery, KeyRemoval, User};

const PATH: &str = "/_portcullis/account";
/// Where a stale session proves its second factor again and comes back here.
pub const REAUTH: &str = "/_portcullis/reauth?next=%2F_portcullis%2Faccount";
/// Sign-in attempts shown on the page.
const SIGN_INS_SHOWN: usize = 20;
/// Audit events read to find them (other events of the user are skipped).
const SIGN_INS_SCANNED: u32 = 500;
/// Longest wait for the audit writer before the sign-ins are read.
const AUDIT_CATCH_UP: std::time::Duration = std::time::Duration::from_millis(500);

/// How a device's sessions are bound, for people.
pub(super) fn binding_text(binding: &str) -> &'static str {
    match binding {
        "dbsc" => "bound to a key in the device's security chip (DBSC)",
        "webcrypto" => "bound to a key kept by the browser",
        _ => "device cookie only",
    }
}

/// The complete session of a user who may still use the gateway, or where to send the browser.
async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Result<(Loaded, User), Response>, AppError> {
    // A session that has ended (idle, its time up, ended by an administrator) is told as the
    // console's pages tell it; a browser that never signed in, or is signing in, is not.
    // Its dead cookie goes with the notice, which is then said once.
    // (`Some(notice)`: it had one, which ended.)
    let to_login = |ended: Option<&str>| match ended {
        Some(notice) => with_cookies(
            super::no_session(&format!(
                "/_portcullis/login?next=%2F_portcullis%2Faccount&notice={notice}"
            )),
            [state.sessions.clear_cookie()],
        ),
        None => super::no_session("/_portcullis/login?next=%2F_portcullis%2Faccount"),
    };
    Ok(super::login::signed_in_user(state, headers)
        .await?
        .map_err(to_login))
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
        "others_signed_out" => {
            "Every other browser was signed out; each will have to be confirmed again."
        }
        "totp_changed" => "Your new authenticator app is set up; the earlier one no longer works.",
        "codes_shown" => {
            "New recovery codes are shown only once. If you did not save them, make new ones."
        }
        "password_changed" => {
            "Your password was changed. Every other browser signed in to your account was signed out."
        }
        _ => return None,
    })
}

/// The page with `msg` for an action it refused (`field`: the id of the field it is about, or
/// `""`), or the refusal as JSON for an API client.
pub(super) async fn refused_page(
    state: &AppState,
    headers: &HeaderMap,
    (loaded, user): (&Loaded, &User),
    (msg, field): (&str, &str),
    status: StatusCode,
) -> Result<Response, AppError> {
    page(
        state,
        headers,
        loaded,
        user,
        None,
        (Some(msg), field),
        status,
    )
    .await
}

/// Renders the page with an optional error, and the id of the field it is about (`""` for
/// none), which is then marked invalid and described by it.
pub(super) async fn page(
    state: &AppState,
    headers: &HeaderMap,
    loaded: &Loaded,
    user: &User,
    notice: Option<&str>,
    (error, error_field): (Option<&str>, &str),
    status: StatusCode,
) -> Result<Response, AppError> {
    if let Some(refused) = super::error::refusal_for_api(headers, status, error) {
        return Err(refused);
    }
    let keys: Vec<KeyRow> = state
        .durable
        .webauthn_credentials(&user.id)
        .await?
        .into_iter()
        .map(KeyRow::of)
        .collect();
    let has_totp = state.durable.totp(&user.id).await?.is_some();
    let recovery_left = state.durable.recovery_codes_left(&user.id).await?;
    let sign_ins = recent_sign_ins(state, &user.id).await?;
    let devices: Vec<DeviceRow> = state
        .durable
        .list_devices(&user.id)
        .await?
        .into_iter()
        .map(|d| {
            let active = d.status == "active";
            (d, active)
        })
        .map(|(d, active)| DeviceRow {
            current: loaded.session.device_id.as_deref() == Some(d.id.as_str()),
            first_seen: rfc3339(d.first_seen),
            last_seen: rfc3339(d.last_seen),
            last_ip: super::risk::address(state, &d.last_ip),
            binding: binding_text(&d.binding),
            // A device signed out is remembered no more (its cookie and key sign nobody in).
            remembered: d
                .remembered_until
                .filter(|t| active && *t > state.clock.now())
                .map(rfc3339),
            revoked: !active,
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
        others: devices.iter().any(|d| !d.current && !d.revoked),
        has_totp,
        // Keys sign nobody in where they are off (`webauthn.enabled`, an IP address).
        codes_only: !has_totp
            && (state.keys.is_none() || keys.iter().all(|k| k.suspended.is_some())),
        recovery_left,
        codes_refused: state
            .config
            .webauthn
            .requires_phishing_resistant(&user.account_id),
        sign_ins: &sign_ins,
        webauthn: state.keys.is_some(),
        fresh: super::webauthn::fresh(state, &loaded.session, user),
        key_only: user.is_admin,
        password_min: state.config.password.min_length,
        password_max: state.config.password.max_length,
        notice,
        error,
        error_field,
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
    let notice = super::query_param(&q, "notice").and_then(|v| notice_text(&v));
    page(
        &state,
        &headers,
        &loaded,
        &user,
        notice,
        (None, ""),
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
    if !crate::policy::is_readable_name(name, crate::auth::webauthn::MAX_NAME) {
        let msg = crate::policy::NAME_RULE;
        let who = (&loaded, &user);
        return refused_page(&state, &headers, who, (msg, ""), StatusCode::BAD_REQUEST).await;
    }
    let Some(was) = state
        .durable
        .webauthn_credentials(&user.id)
        .await?
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| c.name)
    else {
        return Err(AppError::not_found());
    };
    // A name is what the owner tells their keys apart by: renaming one (a planted key passing
    // for the owner's phone) needs the fresh proof every change of the keys needs.
    if !fresh(&state, &loaded.session, &user) {
        state.metrics.step_up("fresh_proof_required");
        return stale(&state, &headers, &loaded, &user).await;
    }
    if !state
        .durable
        .rename_webauthn_credential(&user.id, &id, name)
        .await?
    {
        return Err(AppError::not_found());
    }
    // Both names: a key renamed to pass for another of the owner's stays traceable.
    // Quoted with escapes: a name holding a quote cannot blur where one ends.
    let reason = format!("key {id}: {was:?} -> {name:?}");
    let change = ("webauthn_renamed", reason.as_str(), "key_renamed");
    done(&state, (peer, &headers), &user, change).await
}

/// Removes the key `id` of `user` unless it is their last second factor (another usable key, or
/// an authenticator app where the account's policy takes codes, must stay; a suspended key,
/// which signs nobody in, always goes): one check-and-remove
/// in the store, so the owner and an administrator removing two keys at once cannot leave the
/// account with none.
pub(crate) async fn remove_key_keeping_a_factor(
    state: &AppState,
    user: &User,
    id: &str,
) -> Result<crate::store::KeyRemoval, AppError> {
    let codes_count = !state
        .config
        .webauthn
        .requires_phishing_resistant(&user.account_id);
    Ok(state
        .durable
        .remove_webauthn_credential(&user.id, id, codes_count, state.clock.now())
        .await?)
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
        async move { refused_page(state, headers, (loaded, user), (msg, ""), status).await }
    };
    if !fresh(&state, &loaded.session, &user) {
        state.metrics.step_up("fresh_proof_required");
        // As every other factor change refuses it (`reauthentication_required` for API clients).
        return stale(&state, &headers, &loaded, &user).await;
    }
    let (outcome, reason) = match remove_key_keeping_a_factor(&state, &user, &id).await? {
        KeyRemoval::NotFound => return Err(AppError::not_found()),
        KeyRemoval::Removed | KeyRemoval::RemovedLastFactor => ("success", id.as_str()),
        KeyRemoval::LastFactor => ("denied", "last_factor"),
    };
    audit(
        &state,
        peer,
        &headers,
        &user,
        "webauthn_removed",
        outcome,
        reason,
    )
    .await;
    if outcome != "success" {
        return refuse(
            "This is your only second factor. Add another key or an authenticator app first.",
            StatusCode::CONFLICT,
        )
        .await;
    }
    let name = creds
        .iter()
        .find(|c| c.id == id)
        .map(|c| c.name.clone())
        .unwrap_or_default();
    state
        .notifier
        .account_change_by_owner(
            &user,
            &crate::notify::Notifier::key_change("a security key or passkey was removed", &name),
        )
        .await;
    Ok(see_other(&format!("{PATH}?notice=key_removed")))
}

/// A change the owner made: audited as `event` (a success, with `reason`), and the browser sent
/// back to the page, which says `notice`.
async fn done(
    state: &AppState,
    (peer, headers): (std::net::SocketAddr, &HeaderMap),
    user: &User,
    (event, reason, notice): (&str, &str, &str),
) -> Result<Response, AppError> {
    audit(state, peer, headers, user, event, "success", reason).await;
    Ok(see_other(&format!("{PATH}?notice={notice}")))
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
    let (loaded, user) = match acting(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let devices = state.durable.list_devices(&user.id).await?;
    if !devices.iter().any(|d| d.id == id) {
        return Err(AppError::not_found());
    }
    state.durable.revoke_device(&id).await?;
    // This browser signed itself out: it is told it is signed out, not that another browser
    // did it (the word left for the device's other sessions).
    let this_browser = loaded.session.device_id.as_deref() == Some(id.as_str());
    if this_browser {
        state.sessions.destroy(&loaded.key, &user.id).await?;
        state.signer.forget(&loaded.key);
    }
    let by_owner = crate::session::Ended::ByOwner;
    let ended = state
        .sessions
        .destroy_device(&user.id, &id, by_owner)
        .await?
        + usize::from(this_browser);
    let reason = format!("{id}:{ended}_sessions");
    let change = ("device_revoked", reason.as_str(), "device_revoked");
    let resp = done(&state, (peer, &headers), &user, change).await?;
    if !this_browser {
        return Ok(resp);
    }
    Ok(with_cookies(
        see_other("/_portcullis/login?notice=logged_out"),
        [
            state.sessions.clear_cookie(),
            super::binding::dropped_cookie(&state),
        ],
    ))
}

/// `POST /_portcullis/account/devices/sign-out-others`: every device of the account but this
/// browser is signed out (each must be confirmed again, its remembered mark gone) and every
/// other session ends at once, whichever device holds it. Like signing one device out, it only
/// takes access away, so no fresh proof is needed.
pub async fn sign_out_others_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let (loaded, user) = match acting(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let this = loaded.session.device_id.as_deref();
    let mut devices = 0;
    for d in state.durable.list_devices(&user.id).await? {
        if Some(d.id.as_str()) != this && d.status == "active" {
            state.durable.revoke_device(&d.id).await?;
            devices += 1;
        }
    }
    let ended = end_other_sessions(&state, &user.id, &loaded.key).await?;
    let reason = format!("{devices}_devices:{ended}_sessions");
    let change = (
        "other_devices_revoked",
        reason.as_str(),
        "others_signed_out",
    );
    done(&state, (peer, &headers), &user, change).await
}

/// Ends every session of `user_id` but the one stored under `keep`, on every gateway; returns
/// how many ended.
pub(super) async fn end_other_sessions(
    state: &AppState,
    user_id: &str,
    keep: &str,
) -> Result<usize, AppError> {
    let mut ended = 0;
    for other in state.sessions.list_user(user_id).await? {
        if other.key != keep {
            let by_owner = crate::session::Ended::ByOwner;
            state
                .sessions
                .destroy_because(&other.key, user_id, by_owner)
                .await?;
            state.signer.forget(&other.key);
            ended += 1;
        }
    }
    state.user_gate.forget(user_id);
    Ok(ended)
}

/// The user's latest sign-in attempts (newest first): password failures, second factors,
/// first-time enrolments and passkey sign-ins. A password step that succeeded is not a sign-in
/// by itself; its second factor is.
async fn recent_sign_ins(state: &AppState, user_id: &str) -> Result<Vec<SignInRow>, AppError> {
    // Events are written in the background; give the writer a moment so the sign-in that led
    // here is listed. Bounded: a slow store must not hold the page.
    let _ = tokio::time::timeout(AUDIT_CATCH_UP, state.audit.catch_up()).await;
    let events = state
        .durable
        .query_audit(&AuditQuery {
            user_id: Some(user_id.to_string()),
            newest_first: true,
            limit: SIGN_INS_SCANNED,
            ..Default::default()
        })
        .await?;
    Ok(events
        .into_iter()
        .filter(|e| e.user_id.as_deref() == Some(user_id))
        .filter_map(|e| {
            let method = sign_in_method(&e.event, &e.outcome, e.reason.as_deref())?;
            Some(SignInRow {
                at: rfc3339(e.at),
                result: {
                    let result = match e.outcome.as_str() {
                        "success" => "signed in",
                        "denied" => "refused",
                        _ => "failed",
                    };
                    match e.times {
                        1 => result.to_string(),
                        n => format!("{result} ({n} times)"),
                    }
                },
                method,
                ip: e.ip.unwrap_or_default(),
                browser: crate::device::friendly_name(e.user_agent.as_deref().unwrap_or("")),
            })
        })
        .take(SIGN_INS_SHOWN)
        .collect())
}

/// How a sign-in attempt was made, or `None` for events that are not sign-in attempts.
fn sign_in_method(event: &str, outcome: &str, reason: Option<&str>) -> Option<&'static str> {
    Some(match (event, outcome, reason) {
        ("login_password", "success", _) => return None,
        ("login_password", _, Some("bad_current_password")) => "current password, on this page",
        ("login_password", _, _) => "password",
        ("second_factor", "success", Some("rec")) => "password + recovery code",
        ("second_factor", "success", Some("hwk")) => "password + security key",
        ("second_factor", "success", Some("remembered_device")) => "password + remembered browser",
        ("second_factor", "success", _) => "password + authenticator app",
        ("second_factor", _, _) => "password + second factor",
        ("totp_enrolled", _, _) => "password + new authenticator app",
        ("webauthn_enrolled", _, _) => "password + new security key",
        ("passkey_sign_in", _, _) => "passkey",
        _ => return None,
    })
}

/// The refusal of a factor change without a fresh second-factor proof: the page with a message
/// and a link to prove it again for browsers, JSON `reauthentication_required` for API clients.
async fn stale(
    state: &AppState,
    headers: &HeaderMap,
    loaded: &Loaded,
    user: &User,
) -> Result<Response, AppError> {
    if !wants_html(headers) {
        return Err(AppError::forbidden(
            "reauthentication_required",
            if user.is_admin {
                format!("Changing how an administrator signs in needs a recent proof with a security key; confirm it at {REAUTH}&key=1 and try again.")
            } else {
                format!("Changing how you sign in needs a recent second-factor proof; confirm it at {REAUTH} and try again.")
            },
        ));
    }
    let msg = if user.is_admin {
        "For your security, confirm it's you again with your security key before changing how you sign in."
    } else {
        "For your security, confirm it's you again before changing how you sign in."
    };
    refused_page(
        state,
        headers,
        (loaded, user),
        (msg, ""),
        StatusCode::FORBIDDEN,
    )
    .await
}

/// A factor change by the signed-in user: CSRF checked, then the session, then a fresh proof.
pub(super) async fn changing(
    state: &AppState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Result<(Loaded, User), Response>, AppError> {
    let (loaded, user) = match acting(state, headers, csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(Err(r)),
    };
    if !fresh(state, &loaded.session, &user) {
        return Ok(Err(stale(state, headers, &loaded, &user).await?));
    }
    Ok(Ok((loaded, user)))
}

/// `POST /_portcullis/account/recovery-codes`: replaces every recovery code and shows the new
/// ones once.
pub async fn recovery_codes_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let (loaded, user) = match changing(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let client = super::client(&state, peer, &headers);
    let codes = state
        .login
        .regenerate_recovery_codes(&user, &client)
        .await?;
    crate::device::forget_remembered(
        state.durable.as_ref(),
        &user.id,
        loaded.session.device_id.as_deref(),
    )
    .await?;
    if super::prefers_json(&headers) {
        return Ok(axum::response::IntoResponse::into_response(axum::Json(
            serde_json::json!({ "recovery_codes": codes }),
        )));
    }
    // Shown by the page the browser is sent to, once: reloading that page (or the browser's
    // "send again") makes no second set that voids the first behind the owner's back.
    let sealed = state.login.seal_recovery_codes(&user.id, &codes)?;
    let key = codes_to_show(&loaded);
    state.ephemeral.put(&key, &sealed, CODES_SHOWN_FOR).await?;
    Ok(see_other(CODES_PATH))
}

/// The account page's new recovery codes.
const CODES_PATH: &str = "/_portcullis/account/recovery-codes";
/// How long new recovery codes wait for their page.
const CODES_SHOWN_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// Where a session's new recovery codes wait (sealed) for their page.
fn codes_to_show(loaded: &Loaded) -> String {
    format!("account_codes:{{{}}}", loaded.session.public_id)
}

/// `GET /_portcullis/account/recovery-codes`: the new recovery codes, once; after that (a
/// reload) the account page says they were shown.
pub async fn recovery_codes_get(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let (loaded, user) = match signed_in(&state, &headers).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let Some(sealed) = state.ephemeral.take(&codes_to_show(&loaded)).await? else {
        return Ok(see_other(&format!("{PATH}?notice=codes_shown")));
    };
    let codes = super::login::opened_codes(&state, &user.id, &sealed)?;
    Ok(render(
        StatusCode::OK,
        &pages::AccountRecoveryCodes { codes: &codes },
    ))
}

/// Names a pending authenticator secret on its page (the start of its SHA-256: the page shows
/// the secret itself), so a code sent from a page of an earlier setup is told apart.
fn setup_of(secret: &Secret<Vec<u8>>) -> String {
    crate::crypto::sha256_hex(secret.expose())[..16].to_string()
}

/// The page that shows a pending authenticator secret and asks for a code from it.
fn totp_page(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    (secret, replaced): (&Secret<Vec<u8>>, bool),
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    // An API client gets the refusal in JSON, as from the account page's other forms.
    if let Some(refused) = super::error::refusal_for_api(headers, status, error) {
        return axum::response::IntoResponse::into_response(refused);
    }
    let uri = totp::otpauth_uri(secret.expose(), &state.login.totp_issuer, &user.email);
    if super::prefers_json(headers) {
        return axum::response::IntoResponse::into_response(axum::Json(serde_json::json!({
            "secret": totp::secret_base32(secret.expose()),
            "otpauth_uri": uri,
            "confirm": "/_portcullis/account/totp/confirm",
        })));
    }
    let (token, set) = csrf_token(state, headers);
    let view = pages::AccountTotp {
        csrf: &token,
        qr_svg: &totp::qr_svg(&uri),
        secret: &totp::secret_base32(secret.expose()),
        uri: &uri,
        error,
        replaced,
        setup: &setup_of(secret),
    };
    with_cookies(render(status, &view), set)
}

/// `POST /_portcullis/account/totp`: makes a new authenticator secret, pending until a code
/// from it is confirmed; the current app keeps working until then.
pub async fn totp_post(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let (loaded, user) = match changing(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let (secret, replaced) = state.login.start_totp_change(&user, &loaded.key).await?;
    Ok(totp_page(
        &state,
        &headers,
        &user,
        (&secret, replaced),
        None,
        StatusCode::OK,
    ))
}

#[derive(Deserialize)]
pub struct TotpConfirmForm {
    #[serde(default)]
    code: Secret<String>,
    #[serde(default)]
    csrf: String,
    /// The setup whose page sent the code ([`setup_of`]); optional.
    #[serde(default)]
    setup: String,
}

/// `POST /_portcullis/account/totp/confirm`: a code from the new app replaces the old one.
pub async fn totp_confirm_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<TotpConfirmForm>,
) -> Result<Response, AppError> {
    let (loaded, user) = match changing(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    super::login::code_given(&form.code)?;
    let client = super::client(&state, peer, &headers);
    let outcome = state
        .login
        .confirm_totp_change(
            &user,
            (&loaded.key, loaded.session.own_device()),
            &form.code,
            &client,
        )
        .await?;
    match outcome {
        TotpChange::Changed => {
            crate::device::forget_remembered(
                state.durable.as_ref(),
                &user.id,
                loaded.session.device_id.as_deref(),
            )
            .await?;
            Ok(see_other(&format!("{PATH}?notice=totp_changed")))
        }
        TotpChange::Throttled { retry_after } => Err(AppError::throttled(retry_after)),
        TotpChange::Rejected => {
            let Some(secret) = state.login.pending_totp_change(&user, &loaded.key).await? else {
                return expired_change(&state, &headers, &loaded, &user).await;
            };
            // A page of a setup begun again since (another tab): its key is not this one.
            let superseded = !form.setup.is_empty()
                && !crate::crypto::ct_eq(form.setup.as_bytes(), setup_of(&secret).as_bytes());
            let (code, msg) = match superseded {
                true => (
                    "totp_setup_replaced",
                    "This setup was begun again since (in another tab or window) with a new key, \
                     shown below: the key your code came from no longer works. Delete its entry \
                     from your app, scan this code and enter the code the new entry shows.",
                ),
                false => (
                    "invalid_code",
                    "That code is not right. Check the time on your device and enter the current \
                     code from the new app.",
                ),
            };
            if !wants_html(&headers) {
                return Err(AppError::new(StatusCode::UNAUTHORIZED, code, msg));
            }
            Ok(totp_page(
                &state,
                &headers,
                &user,
                (&secret, false),
                Some(msg),
                StatusCode::UNAUTHORIZED,
            ))
        }
        TotpChange::Expired => expired_change(&state, &headers, &loaded, &user).await,
    }
}

async fn expired_change(
    state: &AppState,
    headers: &HeaderMap,
    loaded: &Loaded,
    user: &User,
) -> Result<Response, AppError> {
    if !wants_html(headers) {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            "totp_change_expired",
            "The new authenticator setup expired or was already completed. Start again from your account page.",
        ));
    }
    let msg = "The new authenticator setup expired or was already completed. Start again below.";
    refused_page(
        state,
        headers,
        (loaded, user),
        (msg, ""),
        StatusCode::CONFLICT,
    )
    .await
}
