//! In-person key enrolment: the user touches their key at the admin's browser. The ceremony
//! is bound to the admin's session and to the user it is for; the key is the user's, and the
//! audit trail records which admin enrolled it.

use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use webauthn_rs::prelude::RegisterPublicKeyCredential;

use super::{record, Admin};
use crate::auth::webauthn::Registered;
use crate::http::error::AppError;
use crate::http::webauthn::ApiCsrf;
use crate::http::Json;
use crate::state::AppState;
use crate::store::User;

async fn target(state: &AppState, id: &str) -> Result<User, AppError> {
    state
        .durable
        .user_by_id(id)
        .await?
        .ok_or_else(AppError::not_found)
}

#[derive(Deserialize)]
pub struct Start {
    #[serde(default)]
    name: String,
}

/// `POST /_portcullis/admin/users/{id}/keys/register/start` `{name}` → `{ceremony, options}`.
pub async fn register_start(
    State(state): State<AppState>,
    admin: Admin,
    _csrf: ApiCsrf,
    Path(id): Path<String>,
    Json(body): Json<Start>,
) -> Result<Response, AppError> {
    let keys = crate::http::webauthn::keys(&state)?;
    let user = target(&state, &id).await?;
    if !body.name.trim().is_empty()
        && !crate::policy::is_readable_name(body.name.trim(), crate::auth::webauthn::MAX_NAME)
    {
        return Err(AppError::invalid_input(crate::policy::NAME_RULE));
    }
    if !keys.has_room(&user.id).await? {
        return Err(crate::http::webauthn::too_many_keys());
    }
    let s = keys
        .start_registration(&user, &admin.session.key, &body.name)
        .await?;
    Ok(crate::http::webauthn::started(s))
}

#[derive(Deserialize)]
pub struct Finish {
    ceremony: String,
    credential: RegisterPublicKeyCredential,
}

/// `POST /_portcullis/admin/users/{id}/keys/register/finish` `{ceremony, credential}` →
/// `{redirect}`.
pub async fn register_finish(
    State(state): State<AppState>,
    admin: Admin,
    _csrf: ApiCsrf,
    Path(id): Path<String>,
    Json(body): Json<Finish>,
) -> Result<Response, AppError> {
    let keys = crate::http::webauthn::keys(&state)?;
    let user = target(&state, &id).await?;
    let outcome = keys
        .finish_registration(
            &body.ceremony,
            &admin.session.key,
            &user,
            &body.credential,
            &admin.client,
            Some(&admin.user.email),
        )
        .await?;
    match outcome {
        Registered::Stored(cred) => {
            let why = format!("admin_enrolled (key {})", cred.id);
            record(&state, &admin, "webauthn_admin_enrolled", Some(&user), &why).await;
            Ok(crate::http::webauthn::redirect_json(
                &super::users::key_added(&user),
            ))
        }
        Registered::Refused(r) => Err(crate::http::webauthn::refused(
            r,
            "The security key's answer could not be verified. Please try again.",
        )),
    }
}
