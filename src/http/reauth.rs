//! `/_portcullis/reauth`: a signed-in user proves themselves again without signing out — with
//! a code from their authenticator app (`POST /_portcullis/reauth`) or their security key
//! (`POST /_portcullis/webauthn/reauth/start|finish`) — and goes back to where they were.
//! Changes of factors ask for a recent proof of either kind; the admin console asks for a
//! recent security key (`?key=1` hides codes). Each success gives the session a new id.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use webauthn_rs::prelude::PublicKeyCredential;

use super::error::{wants_html, AppError};
use super::login::{check_csrf, csrf_token, current_session, restart, with_cookies};
use super::pages::{self, render};
use super::webauthn::{ended_by_failures, keys, no_session, redirect_json, started, ApiCsrf};
use super::{see_other, Form, Json, Peer};
use crate::auth::flow::CodeOutcome;
use crate::policy::safe_return_target;
use crate::secret::Secret;
use crate::session::Loaded;
use crate::state::AppState;
use crate::store::User;

const DEFAULT_NEXT: &str = "/_portcullis/account";

/// The reauthentication page for a path, asking for a security key when `key_only`.
pub fn url(next: &str, key_only: bool) -> String {
    let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    format!(
        "/_portcullis/reauth?next={next}{}",
        if key_only { "&key=1" } else { "" }
    )
}

fn next_path(state: &AppState, raw: &str) -> String {
    safe_return_target(raw, &state.config.server.public_url).unwrap_or_else(|| DEFAULT_NEXT.into())
}

/// The signed-in session and its user, or `None` (no session, not complete, or refused).
async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(Loaded, User)>, AppError> {
    let Some(loaded) = current_session(state, headers).await? else {
        return Ok(None);
    };
    if !loaded.session.is_authenticated() {
        return Ok(None);
    }
    let user = state
        .user_gate
        .admit(state, &loaded.session.user_id, loaded.session.auth_ms)
        .await?;
    Ok(user.map(|u| (loaded, std::sync::Arc::unwrap_or_clone(u))))
}

struct View<'a> {
    /// The client's address (a held form is described only to the browser that sent it).
    peer: std::net::SocketAddr,
    next: &'a str,
    key_only: bool,
    error: Option<&'a str>,
    status: StatusCode,
    /// The session is held by the risk engine (see `Session::held`): say why.
    held: bool,
    /// A form was refused for want of this proof and not passed on (`notice=not_sent`, from
    /// forward-auth, which holds no form): say to send it again.
    not_sent: bool,
}

async fn page(
    state: &AppState,
    headers: &HeaderMap,
    (loaded, user): (&Loaded, &User),
    v: View<'_>,
) -> Result<Response, AppError> {
    // A form held for this step-up: said what it is, and "Cancel" goes back to its page.
    let form = super::held::waiting(state, (loaded, v.peer, headers), v.next).await?;
    // The step-up of a held form that is gone (sent, dropped, replaced or timed out; the
    // browser's Back after it): nothing is left to confirm, and its page says what became of it.
    // Not for a session the risk engine holds: every page but this one sends it here.
    if form.is_none() && v.error.is_none() && !v.held && super::held::names_a_form(v.next) {
        return Ok(super::see_other(v.next));
    }
    let keys = match &state.keys {
        Some(k) => k.has_usable(&user.id).await?,
        None => false,
    };
    let codes = !v.key_only
        && !state
            .config
            .webauthn
            .requires_phishing_resistant(&user.account_id)
        && state.durable.totp(&user.id).await?.is_some();
    let why = if v.held {
        "This session was just used from a place it could not have travelled to since it was \
         last used. If that was you (a VPN or a proxy can make it look so), confirm it's you to \
         carry on."
    } else if v.key_only && v.next.starts_with("/_portcullis/admin") {
        "The admin console needs a recent touch of your security key."
    } else if v.key_only {
        "This action needs a recent touch of your security key."
    } else if v.next.starts_with("/_portcullis/account") {
        "For your security, confirm it's you before changing how you sign in."
    } else {
        "For your security, this action needs a recent confirmation that it's you."
    };
    let (token, set) = csrf_token(state, headers);
    let action = url(v.next, v.key_only);
    let view = pages::Reauth {
        csrf: &token,
        action: &action,
        sid: &loaded.session.public_id,
        next: v.next,
        why,
        keys,
        codes,
        admin: user.is_admin,
        error: v.error,
        form: form.as_ref(),
        not_sent: v.not_sent && form.is_none(),
        cancel: (!v.held).then(|| form.as_ref().and_then(|f| f.back.as_deref()).unwrap_or("/")),
    };
    Ok(with_cookies(render(v.status, &view), set))
}

use super::query_param as query;

/// Where a proof sends the browser: a gateway page (the account, the admin console, a held
/// form) at once; a console address through [`DONE`], which continues there with the proof
/// behind it in the history, and stays, saying the proof is done, where that address is a
/// download (a list export) the browser saves without leaving the page.
fn after_proof(next: &str) -> String {
    if next.starts_with("/_portcullis/") {
        return next.to_string();
    }
    let n: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    format!("{DONE}?next={n}")
}

/// The page after a proof that goes on to a console address.
pub const DONE: &str = "/_portcullis/reauth/done";

/// `GET /_portcullis/reauth/done?next=…`: "Confirmed", continuing to `next` (its page's script
/// replaces it in the history with `next`; without script, its link does). Only for a complete
/// session: anyone else is sent to sign in (an API client gets `401`), on to `next`.
pub async fn done_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let next = safe_return_target(
        &query(&q, "next").unwrap_or_default(),
        &state.config.server.public_url,
    )
    .unwrap_or_else(|| "/".into());
    if signed_in(&state, &headers).await?.is_none() {
        let login = super::gate::LOGIN_PATH;
        let browser = wants_html(&headers);
        return Ok(super::gate::refuse(
            &state,
            browser,
            login,
            (Some(&next), None),
            false,
        ));
    }
    Ok(render(StatusCode::OK, &pages::ReauthDone { next: &next }))
}

/// To the sign-in page, on to `next` (a new sign-in is a fresh proof of its own; a rule that
/// wants a key asks for it there again), saying that the session ended where the browser still
/// sent the cookie of one that is no more. A sign-in under way is left as it is.
async fn sign_in_first(
    state: &AppState,
    headers: &HeaderMap,
    next: &str,
) -> Result<Response, AppError> {
    // (Called where no complete session counts: a record still there is a sign-in under way,
    // or a complete session ended elsewhere.)
    let cookie = super::get_cookie(headers, state.sessions.cookie_name());
    let pending = current_session(state, headers)
        .await?
        .is_some_and(|l| !l.session.is_authenticated());
    let ended = cookie.is_some() && !pending;
    let notice = ended.then_some("session_ended");
    let to = super::gate::sign_in_location(super::gate::LOGIN_PATH, Some(next), notice);
    Ok(see_other(&to))
}

/// `GET /_portcullis/reauth?next=PATH[&key=1]`.
pub async fn reauth_get(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let next = next_path(&state, &query(&q, "next").unwrap_or_default());
    let key_only = query(&q, "key").as_deref() == Some("1");
    let Some((loaded, user)) = signed_in(&state, &headers).await? else {
        return sign_in_first(&state, &headers, &next).await;
    };
    let view = View {
        peer,
        next: &next,
        key_only,
        error: None,
        status: StatusCode::OK,
        held: loaded.session.held(),
        not_sent: query(&q, "notice").as_deref() == Some("not_sent"),
    };
    page(&state, &headers, (&loaded, &user), view).await
}

#[derive(Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    code: Secret<String>,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: String,
    /// The public id of the session the page was shown to: a page left open from a session
    /// that has ended (signed out, another user signed in in the same browser) checks no code
    /// against the session the browser has now.
    #[serde(default)]
    sid: Option<String>,
}

/// `POST /_portcullis/reauth` `code, next, csrf[, sid]`: a code from the authenticator app.
pub async fn reauth_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    let next = next_path(&state, &form.next);
    let Some((mut loaded, user)) = signed_in(&state, &headers).await? else {
        // No complete session: as for the page, sign in first. Whatever the cookie holds (a
        // sign-in under way, say) is left as it is.
        if !wants_html(&headers) {
            return Err(no_session());
        }
        return sign_in_first(&state, &headers, &next).await;
    };
    if form.sid.as_deref().is_some_and(|sid| {
        !crate::crypto::ct_eq(sid.as_bytes(), loaded.session.public_id.as_bytes())
    }) {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            "session_changed",
            "This confirmation page was opened for a session that has since ended (signed out, \
             or someone signed in again in this browser), so the code was not checked. Open the \
             page again from where you were.",
        ));
    }
    super::login::code_given(&form.code)?;
    let client = super::client(&state, peer, &headers);
    let outcome = state
        .login
        .step_up_code(&mut loaded.session, &form.code, &client)
        .await?;
    let held = loaded.session.held();
    let retry = |msg: &'static str, status: StatusCode| View {
        peer,
        next: &next,
        key_only: false,
        error: Some(msg),
        status,
        held,
        not_sent: false,
    };
    match outcome {
        CodeOutcome::Accepted => {
            super::risk::after_second_factor(&state, &client, &mut loaded.session);
            let (id, _) = state.sessions.rotate(&loaded.key, &loaded.session).await?;
            Ok(with_cookies(
                see_other(&after_proof(&next)),
                [state.sessions.set_cookie(&id)],
            ))
        }
        CodeOutcome::Rejected => {
            state.sessions.save(&loaded.key, &loaded.session).await?;
            let msg = if crate::auth::recovery::looks_like_recovery_code(form.code.expose()) {
                "Recovery codes are for signing in without your authenticator app, not for \
                 confirming an action: enter the 6-digit code from your app, or use your security \
                 key. Without either, sign out and sign in again with a recovery code."
            } else {
                "That code is not right, or it was already used. Wait for a new code and try again."
            };
            if !wants_html(&headers) {
                return Err(AppError::new(StatusCode::UNAUTHORIZED, "invalid_code", msg));
            }
            page(
                &state,
                &headers,
                (&loaded, &user),
                retry(msg, StatusCode::UNAUTHORIZED),
            )
            .await
        }
        CodeOutcome::Restart => {
            // Wrong codes to confirm an action, until the session's budget of them ran out:
            // whoever holds this session does not hold the second factor. The session ends, on
            // the record, and the owner hears of it.
            state.sessions.destroy(&loaded.key, &user.id).await?;
            state.signer.forget(&loaded.key);
            state
                .audit
                .record(
                    crate::store::AuditEvent::new("session_ended", "success", state.clock.now())
                        .user(&user)
                        .reason("step_up_codes_exhausted")
                        .client(&client.ip, &client.user_agent),
                )
                .await;
            let host = super::devices::public_host(&state);
            let what = format!(
                "A signed-in session of your account {email} on {host} was asked to confirm an\n\
                 action with your second factor and gave wrong codes too many times. That session\n\
                 has been ended.",
                email = user.email
            );
            let advice = "If it was NOT you, someone is using your account (malware on a computer you signed\n\
                 in on can do this). Open this link now: it ends every session of your account,\n\
                 suspends security keys and removes an authenticator app or recovery codes added\n\
                 since this message was sent, and locks password sign-in until your administrator\n\
                 restores it; change your password once they have:";
            let subject = format!("Wrong codes from a session of your account on {host}");
            super::login::tell_owner_hourly(
                &state,
                &user,
                &client,
                "step_up_failed",
                &subject,
                (&what, advice),
            )
            .await?;
            Ok(restart(&state, "restart", Some(&next)))
        }
        CodeOutcome::Throttled { retry_after } => Err(AppError::throttled(retry_after)),
        CodeOutcome::KeyRequired => {
            let msg = "This account must confirm with a security key: codes are not accepted.";
            if !wants_html(&headers) {
                return Err(AppError::forbidden("key_required", msg));
            }
            let view = retry(msg, StatusCode::FORBIDDEN);
            page(&state, &headers, (&loaded, &user), view).await
        }
    }
}

/// `POST /_portcullis/webauthn/reauth/start` → `{ceremony, options}`.
pub async fn key_start(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let keys = keys(&state)?;
    let (loaded, _) = signed_in(&state, &headers).await?.ok_or_else(no_session)?;
    match keys.start_step_up(&loaded.session, &loaded.key).await? {
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

#[derive(Deserialize)]
pub struct KeyFinish {
    ceremony: String,
    credential: PublicKeyCredential,
    #[serde(default)]
    next: String,
}

/// `POST /_portcullis/webauthn/reauth/finish` `{ceremony, credential, next}` → `{redirect}`.
pub async fn key_finish(
    State(state): State<AppState>,
    _csrf: ApiCsrf,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<KeyFinish>,
) -> Result<Response, AppError> {
    let keys = keys(&state)?;
    let (mut loaded, _) = signed_in(&state, &headers).await?.ok_or_else(no_session)?;
    let client = super::client(&state, peer, &headers);
    let outcome = keys
        .finish_step_up(
            &body.ceremony,
            &loaded.key,
            &mut loaded.session,
            &body.credential,
            &client,
        )
        .await?;
    match outcome {
        CodeOutcome::Accepted => {
            super::risk::after_second_factor(&state, &client, &mut loaded.session);
            let (id, _) = state.sessions.rotate(&loaded.key, &loaded.session).await?;
            let next = next_path(&state, &body.next);
            Ok(with_cookies(
                redirect_json(&after_proof(&next)),
                [state.sessions.set_cookie(&id)],
            ))
        }
        CodeOutcome::Restart => ended_by_failures(&state, &loaded).await,
        CodeOutcome::Throttled { retry_after } => Err(AppError::throttled(retry_after)),
        CodeOutcome::Rejected | CodeOutcome::KeyRequired => {
            // A key that answered as a copy of itself was suspended and every session of the
            // account ended (`auth::webauthn`): this one too, and trying again cannot help.
            let user_id = &loaded.session.user_id;
            if keys.suspended_as_copy(user_id, &body.credential).await? {
                state.user_gate.forget(&loaded.session.user_id);
                if signed_in(&state, &headers).await?.is_none() {
                    let next = next_path(&state, &body.next);
                    return Ok(ended_by_a_copied_key(&state, &next));
                }
            }
            // (Only while it lasts: a session ended meanwhile is not written back.)
            state.sessions.update(&loaded.key, &loaded.session).await?;
            Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "key_rejected",
                "The security key was not accepted. Please try again.",
            ))
        }
    }
}

/// The answer to a step-up whose key was suspended as a possible copy, which ended the session:
/// `401 session_ended` with the sign-in URL (`login`, on to `next`, saying why) that the page
/// links to; the session cookie is cleared.
fn ended_by_a_copied_key(state: &AppState, next: &str) -> Response {
    let login =
        super::gate::sign_in_location(super::gate::LOGIN_PATH, Some(next), Some("key_suspended"));
    let message = "Your security key answered as a copy of itself would, so it was suspended \
                   and every session of your account was ended. Sign in again with another key, \
                   your authenticator app or a recovery code.";
    super::login::ended_with_sign_in(
        state,
        (StatusCode::UNAUTHORIZED, "session_ended"),
        message,
        login,
    )
}
