//! Changing the password from the account page: the current password (checked as a sign-in
//! checks one, budgets and all), the new one twice, and a fresh second-factor proof as for every
//! change of how the user signs in. Every other session of the account ends; the owner is told.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::account::{changing, refused_page};
use super::error::{wants_html, AppError};
use super::{see_other, Form, Peer};
use crate::auth::flow::PasswordCheck;
use crate::auth::password::check_new_password;
use crate::secret::Secret;
use crate::state::AppState;

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    current_password: Secret<String>,
    #[serde(default)]
    password: Secret<String>,
    #[serde(default)]
    password2: Secret<String>,
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/account/password` (`current_password`, `password`, `password2`, `csrf`).
pub async fn password_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<PasswordForm>,
) -> Result<Response, AppError> {
    let (loaded, user) = match changing(&state, &headers, &form.csrf).await? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let refuse = |msg: String, field: &'static str, status: StatusCode| {
        let (state, headers, who) = (&state, &headers, (&loaded, &user));
        async move { refused_page(state, headers, who, (&msg, field), status).await }
    };
    let new = &form.password;
    if form.current_password.expose().is_empty() {
        return refuse(
            "Enter your current password.".into(),
            "current-password",
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    if new.expose() == form.current_password.expose() {
        return refuse(
            "The new password is the current one: choose another.".into(),
            "new-password",
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    if let Err(why) = check_new_password(
        new.expose(),
        form.password2.expose(),
        &state.config.password,
        &user.email,
    ) {
        return refuse(why.to_string(), "new-password", StatusCode::BAD_REQUEST).await;
    }
    let client = super::client(&state, peer, &headers);
    let device = super::devices::known_device(&state, &headers).await?;
    match state
        .login
        .confirm_password(&user, &form.current_password, &client, device.as_ref())
        .await?
    {
        PasswordCheck::Right => {}
        PasswordCheck::Throttled { retry_after } => return Err(AppError::throttled(retry_after)),
        PasswordCheck::Wrong => {
            let msg = "Your current password is not right.";
            if !wants_html(&headers) {
                return Err(AppError::forbidden("wrong_password", msg));
            }
            return refuse(msg.into(), "current-password", StatusCode::FORBIDDEN).await;
        }
    }
    state
        .login
        .set_password(&user, new, &client, "account_page")
        .await?;
    // Whoever else holds a session of the account (a stolen one, say) is out, and no other
    // remembered browser skips the second factor with the new password.
    super::account::end_other_sessions(&state, &user.id, &loaded.key).await?;
    let this = loaded.session.device_id.as_deref();
    crate::device::forget_remembered(state.durable.as_ref(), &user.id, this).await?;
    Ok(see_other("/_portcullis/account?notice=password_changed"))
}
