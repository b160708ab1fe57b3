//! `/_portcullis/enrol?t=…`: the page behind a one-time enrolment link. `GET` only shows what
//! the link does (so a mail scanner that follows links uses nothing up); the `POST` uses the
//! link once, sets the password when the user has none, and continues to the enrolment of
//! the second factor (a security key only, for admin accounts).

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::error::AppError;
use super::login::{check_csrf, csrf_token, end_current_session, with_cookies};
use super::pages::{self, render};
use super::{see_other, Form, Peer};
use crate::auth::password::check_new_password;
use crate::enrolment::token_hash;
use crate::secret::Secret;
use crate::session::Stage;
use crate::state::AppState;
use crate::store::{AuditEvent, EnrolmentLink, User};

fn gone() -> AppError {
    AppError::new(
        StatusCode::GONE,
        "link_invalid",
        "This enrolment link has expired or was already used. Ask your administrator for a new \
         one (the first administrator, set up from the command line, runs `portcullis admin \
         bootstrap` again).",
    )
}

/// The unused, unexpired link a token names, with its (enabled) user.
async fn valid(state: &AppState, token: &str) -> Result<(EnrolmentLink, User), AppError> {
    let hash = token_hash(token).ok_or_else(gone)?;
    let link = state
        .durable
        .enrolment_link(&hash, state.clock.now())
        .await?
        .ok_or_else(gone)?;
    let user = state
        .durable
        .user_by_id(&link.user_id)
        .await?
        .ok_or_else(gone)?;
    if user.disabled {
        return Err(AppError::forbidden(
            "account_disabled",
            "This account is disabled. Contact your administrator.",
        ));
    }
    Ok((link, user))
}

/// [`valid`], or for a link already used (or expired) in a browser whose enrolment from it is
/// still under way (a second tab, the Back button, the link opened again from the mail), that
/// enrolment's page: the link is used once, the enrolment it began goes on.
async fn valid_or_under_way(
    state: &AppState,
    headers: &HeaderMap,
    token: &str,
) -> Result<Result<(EnrolmentLink, User), Response>, AppError> {
    match valid(state, token).await {
        Err(e) if e.status == StatusCode::GONE => {
            let under_way = super::login::current_session(state, headers)
                .await?
                .filter(|l| {
                    matches!(
                        l.session.stage,
                        Stage::EnrolTotp { .. } | Stage::ShowRecoveryCodes { .. }
                    )
                });
            match under_way {
                Some(l) => Ok(Err(see_other(&super::login::stage_page(&l)))),
                None => Err(e),
            }
        }
        other => other.map(Ok),
    }
}

async fn page(
    state: &AppState,
    headers: &HeaderMap,
    token: &str,
    (link, user): (&EnrolmentLink, &User),
    error: Option<&str>,
    status: StatusCode,
) -> Result<Response, AppError> {
    // What the account will still have once the link is used (see `settle_before_link`).
    let has_factor =
        super::login::has_usable_factor_before(state, &user.id, link.created_at).await?;
    let (csrf, set) = csrf_token(state, headers);
    let view = pages::EnrolLink {
        csrf: &csrf,
        token,
        email: &user.email,
        set_password: user.password_hash.is_empty(),
        key_only: link.key_only,
        has_factor,
        min_length: state.config.password.min_length,
        max_length: state.config.password.max_length,
        error,
    };
    Ok(with_cookies(render(status, &view), set))
}

/// `GET /_portcullis/enrol?t=…`.
pub async fn enrol_link_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let token = super::query_param(&q, "t").unwrap_or_default();
    let (link, user) = match valid_or_under_way(&state, &headers, &token).await? {
        Ok(found) => found,
        Err(under_way) => return Ok(under_way),
    };
    page(
        &state,
        &headers,
        &token,
        (&link, &user),
        None,
        StatusCode::OK,
    )
    .await
}

#[derive(Deserialize)]
pub struct LinkForm {
    #[serde(default)]
    t: String,
    #[serde(default)]
    password: Secret<String>,
    #[serde(default)]
    password2: Secret<String>,
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/enrol`: uses the link and continues to the second-factor enrolment.
pub async fn enrol_link_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<LinkForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    let (link, user) = match valid_or_under_way(&state, &headers, &form.t).await? {
        Ok(found) => found,
        Err(under_way) => return Ok(under_way),
    };
    let set_password = user.password_hash.is_empty();
    // Check the new password before the link is used, so a typo costs nothing.
    let new_hash = if set_password {
        if let Err(v) = check_new_password(
            form.password.expose(),
            form.password2.expose(),
            &state.config.password,
            &user.email,
        ) {
            let msg = v.to_string();
            if super::prefers_json(&headers) {
                return Err(AppError::new(
                    StatusCode::BAD_REQUEST,
                    "password_refused",
                    msg,
                ));
            }
            let status = StatusCode::BAD_REQUEST;
            return page(
                &state,
                &headers,
                &form.t,
                (&link, &user),
                Some(&msg),
                status,
            )
            .await;
        }
        Some(state.login.hasher.hash(&form.password).await?)
    } else {
        None
    };
    let hash = token_hash(&form.t).ok_or_else(gone)?;
    let Some(link) = state
        .durable
        .consume_enrolment_link(&hash, state.clock.now())
        .await?
    else {
        return Err(gone());
    };
    let client = super::client(&state, peer, &headers);
    if let Some(h) = new_hash {
        state.durable.set_password_hash(&user.id, &h).await?;
        let ev = AuditEvent::new("password_set", "success", state.clock.now())
            .user(&user)
            .reason("enrolment_link")
            .client(&client.ip, &client.user_agent);
        state.audit.record(ev).await;
    }
    end_current_session(&state, &headers).await?;
    settle_before_link(&state, &user, &link).await?;
    let session = state
        .login
        .link_enrolment_session(&user, link.key_only, set_password, &client)
        .await?;
    let (id, _) = state.sessions.create(&session).await?;
    Ok(with_cookies(
        see_other("/_portcullis/enrol/totp"),
        [state.sessions.set_cookie(&id)],
    ))
}

/// What the owner's use of an enrolment link undoes: every other session of the account ends
/// (the link sets the account up afresh: whoever signed in before it, with a password learnt
/// meanwhile, is out), and an authenticator app or recovery codes set up since the link was
/// issued go (whoever knew the password could set up the first factor before the owner came:
/// those would be theirs). The owner sets up the factor and gets new recovery codes through the
/// link. A factor older than the link (an owner adding one) is kept.
async fn settle_before_link(
    state: &AppState,
    user: &User,
    link: &EnrolmentLink,
) -> Result<(), AppError> {
    let now = state.clock.now();
    // Every session and sign-in begun before this instant (the link's own begins after it).
    let before = state.clock.now_millis().saturating_sub(1);
    state.durable.void_sessions(&user.id, before).await?;
    let ended = state.sessions.destroy_all(&user.id).await?;
    state.user_gate.forget(&user.id);
    let dropped = state
        .durable
        .drop_factors_since(&user.id, link.created_at, now)
        .await?;
    if ended > 0 {
        let ev = AuditEvent::new("session_ended", "success", now)
            .user(user)
            .reason(&format!("enrolment_link_used: {ended} sessions"));
        state.audit.record(ev).await;
    }
    if dropped != crate::store::DroppedFactors::default() {
        let ev = AuditEvent::new("second_factors_dropped", "success", now)
            .user(user)
            .reason(&format!("enrolment_link_used: {}", dropped.describe()));
        state.audit.record(ev).await;
    }
    Ok(())
}
