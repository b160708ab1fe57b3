//! Sign-in pages: password, second factor, TOTP enrolment, recovery codes, sign-out.
//! Every form is CSRF-checked; every step up in privilege gives the session a new id.

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::{wants_html, AppError};
use super::pages::{self, render};
use super::{csrf, query_param, see_other, Form, Peer};
use crate::auth::flow::{
    awaits_factor_first, awaits_password, Client, CodeOutcome, PasswordOutcome,
};
use crate::auth::totp;
use crate::policy::safe_return_target;
use crate::secret::Secret;
use crate::session::{Loaded, Session, Stage};
use crate::state::AppState;
use crate::store::AuditEvent;

pub(super) fn public_origin(state: &AppState) -> String {
    state
        .config
        .server
        .public_url
        .origin()
        .ascii_serialization()
}

pub(super) fn check_csrf(
    state: &AppState,
    headers: &HeaderMap,
    token: &str,
) -> Result<(), AppError> {
    csrf::verify(
        headers,
        token,
        &state.master_key,
        state.config.is_https(),
        &public_origin(state),
    )
}

/// The CSRF token for a page, plus the cookie to set if the browser has none yet.
pub(super) fn csrf_token(state: &AppState, headers: &HeaderMap) -> (String, Option<String>) {
    csrf::issue(headers, &state.master_key, state.config.is_https())
}

pub(super) fn with_cookies(
    mut resp: Response,
    cookies: impl IntoIterator<Item = String>,
) -> Response {
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

pub(super) async fn current_session(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Loaded>, AppError> {
    // The session cookies the browser sent, as the gate reads them (see `another_session`).
    let many = if state.config.is_https() {
        1
    } else {
        super::gate::SESSION_COOKIES_TRIED
    };
    let cookies = super::cookie_values(headers, state.sessions.cookie_name()).take(many);
    for value in cookies {
        if let Ok(l) = state.sessions.load(Some(value)).await? {
            if voided_while_pending(state, &l).await? {
                continue;
            }
            return Ok(Some(l));
        }
    }
    Ok(None)
}

/// The complete session of a gateway page's request (the account page, the admin console) and
/// its user, who may still use the gateway; else `Err(notice)`, what its sign-in page says: none
/// for a browser that never signed in or is signing in, who ended the session where the store
/// kept word of it (`signed_out_elsewhere`, `ended_by_admin`), `session_ended` otherwise (idle,
/// its time up, the account's sessions ended or the account disabled).
pub(super) async fn signed_in_user(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Result<(Loaded, crate::store::User), Option<&'static str>>, AppError> {
    let Some(loaded) = current_session(state, headers).await? else {
        let cookie = super::get_cookie(headers, state.sessions.cookie_name());
        if cookie.is_none() {
            return Ok(Err(None));
        }
        let by = state.sessions.ended_by_whom(cookie).await?;
        return Ok(Err(Some(crate::session::Ended::notice_of(by))));
    };
    if !loaded.session.is_authenticated() {
        return Ok(Err(None));
    }
    Ok(match live_user(state, &loaded).await? {
        Some(user) => Ok((loaded, std::sync::Arc::unwrap_or_clone(user))),
        None => Err(Some("session_ended")),
    })
}

/// The user of a complete session that still counts (not ended on any gateway, the account
/// enabled), as the gate's user check finds it.
async fn live_user(
    state: &AppState,
    loaded: &Loaded,
) -> Result<Option<std::sync::Arc<crate::store::User>>, AppError> {
    if !loaded.session.is_authenticated() {
        return Ok(None);
    }
    Ok(state
        .user_gate
        .admit(state, &loaded.session.user_id, loaded.session.auth_ms)
        .await?)
}

/// A sign-in or enrolment under way when every session of its account was ended (`user
/// reset-mfa`, `set-password`, `disable`, a report, from any gateway or the command line):
/// ended too, and its record dropped, so it cannot go on to complete. (A complete session is
/// checked by the gate's user check.)
async fn voided_while_pending(state: &AppState, l: &Loaded) -> Result<bool, AppError> {
    // (A decoy's made-up id finds no user: looked up all the same, so that it takes the time
    // an account's sign-in does.)
    if l.session.is_authenticated() {
        return Ok(false);
    }
    let Some(user) = state.durable.user_by_id(&l.session.user_id).await? else {
        return Ok(false);
    };
    // Begun before the sessions were ended (one begun in the same millisecond, as a sign-in
    // right after the end can be, lives on).
    if l.session.created_ms >= user.sessions_valid_after_ms {
        return Ok(false);
    }
    state.sessions.destroy(&l.key, &l.session.user_id).await?;
    Ok(true)
}

/// Ends the session the browser already has (even a complete one) before a new sign-in:
/// one sign-in, one session.
pub(super) async fn end_current_session(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(), AppError> {
    if let Some(old) = current_session(state, headers).await? {
        state
            .sessions
            .destroy(&old.key, &old.session.user_id)
            .await?;
        state.signer.forget(&old.key);
    }
    Ok(())
}

/// Where a session in a given stage belongs.
pub(super) fn stage_page(loaded: &Loaded) -> String {
    match &loaded.session.stage {
        Stage::SecondFactor if awaits_password(&loaded.session) => {
            "/_portcullis/login?notice=password_next".into()
        }
        Stage::SecondFactor => "/_portcullis/mfa".into(),
        Stage::DeviceProof => super::remembered::PATH.into(),
        Stage::EnrolTotp { .. } => "/_portcullis/enrol/totp".into(),
        Stage::ShowRecoveryCodes { .. } => "/_portcullis/recovery-codes".into(),
        Stage::Authenticated => loaded
            .session
            .return_to
            .clone()
            .unwrap_or_else(|| "/".into()),
    }
}

/// Back to the sign-in page, the pending sign-in ended, told why; `next`, where the ended
/// sign-in was going, is kept for the new one.
pub(super) fn restart(state: &AppState, why: &str, next: Option<&str>) -> Response {
    let to = super::gate::sign_in_location(super::gate::LOGIN_PATH, next, Some(why));
    with_cookies(see_other(&to), [state.sessions.clear_cookie()])
}

/// A setup of the first second factor that may no longer complete (see
/// [`crate::auth::flow::LoginFlow::enrolment_overtaken`]): the sign-in ends and the sign-in
/// page says why (`why`, its notice).
pub(super) async fn overtaken(
    state: &AppState,
    loaded: &Loaded,
    why: &str,
) -> Result<Response, AppError> {
    state
        .sessions
        .destroy(&loaded.key, &loaded.session.user_id)
        .await?;
    Ok(restart(state, why, loaded.session.return_to.as_deref()))
}

/// A JSON call's answer when its sign-in or session has ended: `status` and `code` with the
/// `message` and the sign-in URL (`login`) that the page links to, the session cookie cleared.
pub(super) fn ended_with_sign_in(
    state: &AppState,
    (status, code): (StatusCode, &'static str),
    message: &str,
    login: String,
) -> Response {
    let body = serde_json::json!({ "error": code, "message": message, "login": login });
    let refused = AppError {
        action: Some((login, "Sign in again")),
        ..AppError::new(status, code, message)
    };
    let mut r = refused.into_response();
    *r.body_mut() = axum::body::Body::from(body.to_string());
    with_cookies(r, [state.sessions.clear_cookie()])
}

/// [`restart`] for a sign-in that ran out: to an API client, `401` (see [`super::no_session`]).
pub(super) fn expired(state: &AppState) -> Response {
    with_cookies(
        super::no_session("/_portcullis/login?notice=expired"),
        [state.sessions.clear_cookie()],
    )
}

pub(super) fn notice_text(code: &str) -> Option<&'static str> {
    Some(match code {
        "expired" => {
            "Your sign-in took too long or was interrupted. Please start again. If you were \
             setting up your second factor from an enrolment link, ask your administrator for a \
             new link."
        }
        "restart" => "Too many wrong codes. Please sign in again.",
        "moved" => {
            "Your sign-in continued from another network or browser than it started on, so it \
             was ended. Please sign in again. If you were setting up your second factor from an \
             enrolment link, ask your administrator for a new link."
        }
        "logged_out" => "You are signed out.",
        "signed_out_elsewhere" => {
            "This browser was signed out from another browser signed in to your account (from \
             its account page, or by a password change there). If that was not you, sign in \
             and change your password at once."
        }
        "ended_by_admin" => {
            "An administrator ended this session. Please sign in again; if you do not know why, \
             ask your administrator."
        }
        crate::auth::flow::ENROL_ELSEWHERE => {
            "While you were setting up your second factor, one was set up for this account from \
             another sign-in, so this setup was stopped. Sign in with that second factor. If it \
             was not you, tell your administrator at once: someone else knows your password."
        }
        crate::auth::flow::ENROL_SUPERSEDED => {
            "This setup of your second factor was begun again in another browser or tab, so the \
             key shown here no longer works. Finish it where it was begun last, or sign in again \
             to start over."
        }
        "session_ended" => {
            "Your session has ended (it was left idle, reached its time limit, or was ended \
             elsewhere). Please sign in again."
        }
        "not_sent" => {
            "You are not signed in (your session may have ended), so what you sent was not \
             passed on. Sign in, then send it again: your browser's Back button may bring a \
             form back as you filled it in."
        }
        "password_next" => "Your second factor is confirmed. Now enter your password.",
        "key_suspended" => {
            "Your security key answered as a copy of itself would, so it was suspended and every \
             session of your account was ended (you were sent a message about it). Sign in with \
             another key, your authenticator app or a recovery code."
        }
        _ => return None,
    })
}

/// `GET /_portcullis/login`.
pub async fn login_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let next = query_param(&q, "next")
        .and_then(|n| safe_return_target(&n, &state.config.server.public_url))
        .unwrap_or_default();
    let mut username = String::new();
    let mut ended = false;
    let mut factor_given = false;
    // Without a session cookie nothing below asks the ephemeral store: ask it here, so that
    // while it is away the page says sign-in is unavailable (503) before a password is typed,
    // not after.
    if super::get_cookie(&headers, state.sessions.cookie_name()).is_none() {
        state.ephemeral.ping().await?;
    }
    if let Some(loaded) = current_session(&state, &headers).await? {
        if loaded.session.is_authenticated() {
            if live_user(&state, &loaded).await?.is_some() {
                return Ok(see_other(if next.is_empty() { "/" } else { &next }));
            }
            // Ended meanwhile (every session of the account voided, the account disabled):
            // the page the browser came from sent it here, so sending it back would loop.
            // The record and its cookie go; the sign-in form is shown.
            state
                .sessions
                .destroy(&loaded.key, &loaded.session.user_id)
                .await?;
            state.signer.forget(&loaded.key);
            ended = true;
        }
        if awaits_password(&loaded.session) {
            factor_given = true;
            if let Some(u) = state.durable.user_by_id(&loaded.session.user_id).await? {
                username = u.email;
            }
        }
    }
    let notice = query_param(&q, "notice").as_deref().and_then(notice_text);
    let (token, set) = csrf_token(&state, &headers);
    let page = pages::Login {
        csrf: &token,
        next: &next,
        username: &username,
        error: None,
        notice,
        passkeys: state.keys.is_some(),
        factor_given,
        remembering: remembering(&state),
    };
    let page = with_cookies(render(StatusCode::OK, &page), set);
    Ok(if ended {
        with_cookies(page, [state.sessions.clear_cookie()])
    } else {
        page
    })
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: Secret<String>,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: String,
}

/// Whether the browser is signed in (a complete session that still counts) as `username`.
async fn signed_in_as(
    state: &AppState,
    headers: &HeaderMap,
    username: &str,
) -> Result<bool, AppError> {
    let Some(loaded) = current_session(state, headers).await? else {
        return Ok(false);
    };
    let live = live_user(state, &loaded).await?;
    Ok(live.is_some_and(|u| u.email == crate::store::normalise_email(username)))
}

/// `POST /_portcullis/login`.
pub async fn login_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, AppError> {
    let next = safe_return_target(&form.next, &state.config.server.public_url);
    if let Err(refused) = check_csrf(&state, &headers, &form.csrf) {
        // A second tab left on the form while this browser signed in (which renewed the form
        // token): naming the user signed in here, the session goes on, as it does below.
        // Nothing is changed, so the stale token matters not; but only for a form of our own
        // pages, or another page of the site could learn who the browser is signed in as.
        let ours = super::csrf::from_our_pages(&headers, &public_origin(&state));
        return match ours && signed_in_as(&state, &headers, &form.username).await? {
            true => Ok(see_other(next.as_deref().unwrap_or("/"))),
            false => Err(refused),
        };
    }
    let client = super::client(&state, peer, &headers);
    if form.username.len() > 320 {
        return Err(AppError::invalid_input("That email address is too long."));
    }
    // A form missing either is no guess at anything: said so, checked against no budget.
    if form.username.trim().is_empty() || form.password.expose().is_empty() {
        let refused = AppError::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "Enter your email address and your password.",
        );
        return login_refused(&state, &headers, (&form.username, next.as_deref()), refused);
    }
    let device = super::devices::known_device(&state, &headers).await?;
    // A sign-in whose second factor came first finishes here, with its password.
    let mut after_factor = None;
    if let Some(loaded) = current_session(&state, &headers).await? {
        let live = live_user(&state, &loaded).await?;
        if live.is_some_and(|u| u.email == crate::store::normalise_email(&form.username)) {
            // Already signed in as this user (the form sent again from another tab): the
            // session goes on, as the sign-in page itself would have sent the browser on.
            return Ok(see_other(next.as_deref().unwrap_or("/")));
        }
        if awaits_password(&loaded.session) {
            let owner = state.durable.user_by_id(&loaded.session.user_id).await?;
            if owner.is_some_and(|u| u.email == crate::store::normalise_email(&form.username)) {
                if moved_mid_sign_in(&state, &loaded, &client).await? {
                    return Ok(restart(
                        &state,
                        "moved",
                        loaded.session.return_to.as_deref(),
                    ));
                }
                after_factor = Some(loaded);
            }
        }
    }
    let outcome = match &mut after_factor {
        Some(loaded) => {
            state
                .login
                .password_after_factor(
                    &mut loaded.session,
                    &form.password,
                    &client,
                    device.as_ref(),
                )
                .await?
        }
        None => {
            state
                .login
                .password_step(
                    &form.username,
                    &form.password,
                    &client,
                    next.clone(),
                    device.as_ref(),
                )
                .await?
        }
    };
    let (user, mut session) = match outcome {
        PasswordOutcome::Proceed { session, user } if session.is_authenticated() => {
            let Some(loaded) = after_factor else {
                return Err(AppError::internal(
                    &"a sign-in completed without its session",
                ));
            };
            let mut session = *session;
            // The second factor came first, before the sign-in could be scored: score it now.
            let device_known = device.as_ref().is_some_and(|d| d.user_id == user.id);
            super::risk::at_password(&state, &user, &client, device_known, &mut session).await?;
            if session.risk_key
                && !session.amr.iter().any(|m| {
                    m == crate::auth::flow::AMR_KEY || m == crate::auth::flow::AMR_RECOVERY
                })
            {
                state.metrics.step_up("unusual_sign_in");
                state.sessions.destroy(&loaded.key, &user.id).await?;
                // Written as the code step writes a code refused for the same reason.
                let ev = AuditEvent::new("second_factor", "denied", state.clock.now())
                    .user(&user)
                    .reason("high_risk");
                state.login.audit(ev, &client).await;
                return Err(AppError::forbidden(
                    "key_required",
                    "This sign-in looks unusual (a new place, network or browser), so it must be \
                     made with your security key or passkey: sign in again and use the key (or \
                     one of your recovery codes) when asked for the second factor.",
                ));
            }
            let loaded = Loaded {
                key: loaded.key,
                session,
            };
            return after_code(
                &state,
                &headers,
                &client,
                loaded,
                CodeOutcome::Accepted,
                |_| see_other("/_portcullis/login"),
            )
            .await;
        }
        PasswordOutcome::Proceed { user, session } => (*user, *session),
        PasswordOutcome::FactorFirst { session } => {
            end_current_session(&state, &headers).await?;
            let (id, _) = state.sessions.create(&session).await?;
            return Ok(with_cookies(
                see_other("/_portcullis/mfa"),
                [state.sessions.set_cookie(&id)],
            ));
        }
        PasswordOutcome::Throttled { retry_after } => {
            return Err(AppError::throttled_sign_in(retry_after))
        }
        PasswordOutcome::Denied => {
            let refused = AppError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "The email or password is not right.",
            );
            return login_refused(&state, &headers, (&form.username, next.as_deref()), refused);
        }
    };
    // How unusual the sign-in is decides what its second factor must be.
    let device_known = device.as_ref().is_some_and(|d| d.user_id == user.id);
    let risk = super::risk::at_password(&state, &user, &client, device_known, &mut session).await?;
    // A remembered device may prove its key instead of the second factor, unless the sign-in
    // looks unusual.
    if session.stage == Stage::SecondFactor
        && super::remembered::remembered(&state, &headers, &user)
            .await?
            .is_some()
    {
        if risk.level < crate::risk::Level::Medium {
            session.stage = Stage::DeviceProof;
        } else if !session.risk_key {
            state.metrics.step_up("unusual_sign_in");
        }
    }
    if session.risk_key {
        state.metrics.step_up("unusual_sign_in");
    }
    end_current_session(&state, &headers).await?;
    let (id, key) = state.sessions.create(&session).await?;
    let loaded = Loaded { key, session };
    tracing::debug!(user = %user.id, "password accepted");
    Ok(with_cookies(
        see_other(&stage_page(&loaded)),
        [state.sessions.set_cookie(&id)],
    ))
}

/// The sign-in form refused: an API client gets `refused` as JSON, a browser the sign-in page
/// again with its message (the address it typed kept, and where it was going).
fn login_refused(
    state: &AppState,
    headers: &HeaderMap,
    (username, next): (&str, Option<&str>),
    refused: AppError,
) -> Result<Response, AppError> {
    if !wants_html(headers) {
        return Err(refused);
    }
    let (token, set) = csrf_token(state, headers);
    let page = pages::Login {
        csrf: &token,
        next: next.unwrap_or(""),
        username,
        error: Some(&refused.message),
        notice: None,
        passkeys: state.keys.is_some(),
        factor_given: false,
        remembering: remembering(state),
    };
    Ok(with_cookies(render(refused.status, &page), set))
}

/// Whether a browser may have been remembered at an earlier sign-in (see
/// [`pages::Login::remembering`]).
fn remembering(state: &AppState) -> bool {
    state.config.binding.enabled && !state.config.remember_device.lifetime.is_zero()
}

/// Loads the pending session for a step page (`sent`: a step's form was sent), or the response
/// that sends the browser elsewhere.
async fn pending(
    state: &AppState,
    (headers, sent): (&HeaderMap, bool),
    want: fn(&Stage) -> bool,
) -> Result<Result<Loaded, Response>, AppError> {
    let Some(loaded) = current_session(state, headers).await? else {
        // A sign-in that ran out, or none at all (a bookmark, a page opened anew): only the
        // first is told it took too long, and so is a step's form sent from a page whose
        // sign-in has gone (ended from another tab, its cookie with it).
        if !sent && super::get_cookie(headers, state.sessions.cookie_name()).is_none() {
            return Ok(Err(super::no_session("/_portcullis/login")));
        }
        return Ok(Err(expired(state)));
    };
    if !want(&loaded.session.stage) {
        return Ok(Err(see_other(&stage_page(&loaded))));
    }
    Ok(Ok(loaded))
}

/// `GET /_portcullis/mfa`.
pub async fn mfa_get(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let loaded = match pending(&state, (&headers, false), |s| *s == Stage::SecondFactor).await? {
        Ok(l) => l,
        Err(r) => return Ok(r),
    };
    if awaits_password(&loaded.session) {
        return Ok(see_other(&stage_page(&loaded)));
    }
    let view = MfaView::of(&state, &loaded, false).await?;
    let (token, set) = csrf_token(&state, &headers);
    Ok(with_cookies(view.page(StatusCode::OK, &token, None), set))
}

/// The days "remember this browser" lasts, when it is offered on this page (never on the
/// page of a sign-in whose second factor comes first).
fn remember_offer(state: &AppState, offered: bool, first: bool) -> Option<String> {
    (offered && !first).then(|| remember_for(state))
}

/// What the second-factor page shows besides its form's token and error.
struct MfaView {
    /// Offer "Use security key".
    keys: bool,
    /// The second factor comes first (many wrong passwords): say why.
    first: bool,
    /// "Remember this browser" offered, for this long.
    remember: Option<String>,
    /// The box ticked already (the form came back with a wrong code).
    remember_ticked: bool,
    /// A high-risk sign-in that only the key or a recovery code completes.
    unusual: bool,
    /// The user has an authenticator app (always so when the second factor comes first).
    app: bool,
    /// Codes complete the sign-in (always so when the second factor comes first).
    codes: bool,
    /// "Start over" (a sign-out of this sign-in): where the sign-in page then goes on to, as
    /// this sign-in would have.
    start_over: String,
}

impl MfaView {
    async fn of(state: &AppState, loaded: &Loaded, ticked: bool) -> Result<Self, AppError> {
        let session = &loaded.session;
        let first = awaits_factor_first(session);
        let offered = super::remembered::offered(state, &session.user_id).await?;
        let remember = remember_offer(state, offered, first);
        Ok(Self {
            keys: has_keys(state, session).await?,
            first,
            remember_ticked: ticked && remember.is_some(),
            remember,
            unusual: session.risk_key,
            app: first || state.durable.totp(&session.user_id).await?.is_some(),
            codes: first || codes_accepted(state, &session.user_id).await?,
            start_over: session.return_to.clone().unwrap_or_else(|| "/".into()),
        })
    }

    /// The second-factor page; with a word on why when the second factor comes first.
    fn page(&self, status: StatusCode, csrf: &str, error: Option<&str>) -> Response {
        if self.first {
            let page = pages::MfaFirst {
                csrf,
                error,
                keys: self.keys,
                remember: false,
                remember_for: String::new(),
                remember_ticked: false,
                app: true,
                codes: true,
                start_over: &self.start_over,
            };
            render(status, &page)
        } else {
            let page = pages::Mfa {
                csrf,
                error,
                keys: self.keys,
                remember: self.remember.is_some(),
                remember_for: self.remember.clone().unwrap_or_default(),
                remember_ticked: self.remember_ticked,
                unusual: self.unusual,
                app: self.app,
                codes: self.codes,
                start_over: &self.start_over,
            };
            render(status, &page)
        }
    }
}

/// Whether codes (an app's, recovery codes) complete a sign-in of `user_id`: not where the
/// account is held to keys and passkeys (`webauthn.require_phishing_resistant`).
pub(super) async fn codes_accepted(state: &AppState, user_id: &str) -> Result<bool, AppError> {
    let user = state.durable.user_by_id(user_id).await?;
    Ok(user.is_none_or(|u| {
        !state
            .config
            .webauthn
            .requires_phishing_resistant(&u.account_id)
    }))
}

/// Whether to offer a security key on the second-factor page: where the user has a usable key,
/// and on every sign-in whose second factor comes first, which offers a key ceremony whatever
/// the account has (made-up keys where it has none), so that the offer tells nothing.
async fn has_keys(state: &AppState, session: &Session) -> Result<bool, AppError> {
    Ok(match &state.keys {
        Some(_) if awaits_factor_first(session) => true,
        Some(k) => k.has_usable(&session.user_id).await?,
        None => false,
    })
}

#[derive(Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    code: Secret<String>,
    #[serde(default)]
    csrf: String,
    /// "Remember this browser" (second-factor page only).
    #[serde(default, deserialize_with = "super::checkbox")]
    remember: bool,
}

/// How long "remember this browser" lasts, in words: in the largest unit (days, hours,
/// minutes, seconds) that tells it exactly ("36 hours", never a rounded "1 day").
fn remember_for(state: &AppState) -> String {
    let secs = state.config.remember_device.lifetime.as_secs().max(1);
    let (n, unit) = [
        (86_400, "day"),
        (3_600, "hour"),
        (60, "minute"),
        (1, "second"),
    ]
    .into_iter()
    .find(|(size, _)| secs % size == 0)
    .map_or((secs, "second"), |(size, unit)| (secs / size, unit));
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Turns a code step's outcome into a response.
async fn after_code(
    state: &AppState,
    headers: &HeaderMap,
    client: &Client,
    mut loaded: Loaded,
    outcome: CodeOutcome,
    retry: impl FnOnce(&str) -> Response,
) -> Result<Response, AppError> {
    match outcome {
        CodeOutcome::Accepted => {
            let device_cookies = if loaded.session.is_authenticated() {
                complete_sign_in(state, headers, client, &mut loaded.session).await?
            } else {
                Vec::new()
            };
            let (id, _) = state.sessions.rotate(&loaded.key, &loaded.session).await?;
            let mut cookies = vec![state.sessions.set_cookie(&id)];
            cookies.extend(device_cookies);
            let mut resp = with_cookies(see_other(&stage_page(&loaded)), cookies);
            super::binding::offer_registration(state, &loaded.session, &mut resp).await?;
            Ok(resp)
        }
        CodeOutcome::Rejected => {
            state.sessions.save(&loaded.key, &loaded.session).await?;
            let mut msg = "That code is not right, or it was already used. Wait for a new code from your app, or check the recovery code, and try again.".to_string();
            // Said before the last tries (every sign-in alike, with an account or without),
            // so the sign-in starting over comes as no surprise.
            let left = state
                .config
                .limits
                .second_factor_failures_per_login
                .saturating_sub(u64::from(loaded.session.failed_codes));
            match left {
                1 => msg.push_str(
                    " One more wrong code and this sign-in starts over from the beginning.",
                ),
                2 => msg.push_str(
                    " Two more wrong codes and this sign-in starts over from the beginning.",
                ),
                _ => {}
            }
            if !wants_html(headers) {
                return Err(AppError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_code",
                    &msg,
                ));
            }
            Ok(retry(&msg))
        }
        CodeOutcome::Restart => {
            state
                .sessions
                .destroy(&loaded.key, &loaded.session.user_id)
                .await?;
            second_factor_failed(state, &loaded.session, client).await?;
            loaded.session.failed_codes = 0;
            Ok(restart(
                state,
                "restart",
                loaded.session.return_to.as_deref(),
            ))
        }
        CodeOutcome::Throttled { retry_after } => {
            // The account's budget of codes is spent, over several sign-ins that each gave the
            // right password: as telling as one sign-in stopped.
            second_factor_failed(state, &loaded.session, client).await?;
            Err(AppError::throttled_sign_in(retry_after))
        }
        CodeOutcome::KeyRequired => {
            let msg = if loaded.session.risk_key {
                "This sign-in looks unusual (a new place, network or browser), so it must be \
                 confirmed with your security key or passkey: a code from your authenticator app \
                 is not accepted this time. Use your key, or one of your recovery codes."
            } else {
                "This account must sign in with a security key or passkey: codes are not \
                 accepted. Use your key, or ask your administrator for help."
            };
            if !wants_html(headers) {
                return Err(AppError::new(StatusCode::FORBIDDEN, "key_required", msg));
            }
            let mut page = retry(msg);
            *page.status_mut() = StatusCode::FORBIDDEN;
            Ok(page)
        }
    }
}

/// How often at most the owner is told of sign-ins stopped after the right password.
const FAILED_SECOND_FACTOR_NOTICE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A sign-in that gave the account's right password was stopped by wrong second factors (its
/// own, or the account's budget of them spent): someone may know the password. The owner is mailed (once an hour at most), with a link that
/// ends every session and locks password sign-in. Not for a sign-in without an account behind
/// it, nor one whose second factor came first (no password was given).
pub(super) async fn second_factor_failed(
    state: &AppState,
    session: &Session,
    client: &Client,
) -> Result<(), AppError> {
    let signing_in = session.stage == Stage::SecondFactor && !session.decoy;
    if !signing_in || !session.amr.iter().any(|m| m == "pwd") {
        return Ok(());
    }
    let Some(user) = state.login.active_user(&session.user_id).await? else {
        return Ok(());
    };
    let host = super::devices::public_host(state);
    let what = format!(
        "A sign-in to your account {email} on {host} gave your password correctly, then failed\n\
         its second factor too many times, and was stopped.",
        email = user.email
    );
    let advice = "If it was NOT you, someone knows your password. Open this link now: it ends every session\n\
         of your account, suspends security keys and removes an authenticator app or recovery\n\
         codes added since this message was sent, and locks password sign-in until your\n\
         administrator restores it; change your password once they have:";
    let subject = format!("Someone may know your password on {host}");
    tell_owner_hourly(
        state,
        &user,
        client,
        "second_factor_failed",
        &subject,
        (&what, advice),
    )
    .await
}

/// Mails `user` of wrong second factors (`what` happened; `advice` leads to the "this wasn't
/// me" link), at most once an hour per `kind`.
pub(super) async fn tell_owner_hourly(
    state: &AppState,
    user: &crate::store::User,
    client: &Client,
    kind: &str,
    subject: &str,
    (what, advice): (&str, &str),
) -> Result<(), AppError> {
    let once = format!("notice:{kind}:{{{}}}", user.id);
    let first = state
        .ephemeral
        .put_if_absent(&once, b"1", FAILED_SECOND_FACTOR_NOTICE)
        .await?;
    if !first {
        return Ok(());
    }
    let link = state.notifier.report_link(user, None, None).await?;
    let body = format!(
        "{what}\n\
         \n\
         When:    {when}\n\
         Device:  {device}\n\
         Address: {address}\n\
         \n\
         If this was you, there is nothing to do.\n\
         \n\
         {advice}\n\
         \n\
         {link}\n\
         \n\
         The link works once and expires in {days}.\n",
        when = crate::notify::utc_text(state.clock.now()),
        device = crate::device::friendly_name(&client.user_agent),
        address = super::risk::address(state, &client.ip),
        days = state.notifier.report_lifetime(),
    );
    state.notifier.enqueue(&user.email, subject, &body).await?;
    Ok(())
}

/// Book-keeping once a sign-in is complete: the failure counter starts over, the device is
/// recognised (or recorded and reported to the owner) and the CSRF cookie is renewed. Returns
/// cookies to set.
pub(super) async fn complete_sign_in(
    state: &AppState,
    headers: &HeaderMap,
    client: &Client,
    session: &mut Session,
) -> Result<Vec<String>, AppError> {
    complete_sign_in_as(state, headers, (client, None), session).await
}

/// [`complete_sign_in`]; `enrolled_since`: the start of a sign-in that set up the account's
/// first factor (its report takes back everything set up since).
async fn complete_sign_in_as(
    state: &AppState,
    headers: &HeaderMap,
    (client, enrolled_since): (&Client, Option<i64>),
    session: &mut Session,
) -> Result<Vec<String>, AppError> {
    if !session.is_authenticated() {
        // The second factor came first; the password is still to come.
        return Ok(Vec::new());
    }
    let Some(user) = state.durable.user_by_id(&session.user_id).await? else {
        return Ok(Vec::new());
    };
    super::risk::at_completion(state, &user, client, session).await;
    let (device_id, cookies) =
        super::devices::signed_in(state, headers, &user, (client, enrolled_since)).await?;
    // No new device cookie: the browser was a known device of this user.
    state
        .login
        .forget_failures(&user, cookies.is_empty())
        .await?;
    session.device_id = Some(device_id);
    session.new_device = !cookies.is_empty();
    let mut cookies = cookies;
    cookies.push(super::csrf::renewed(state.config.is_https()));
    Ok(cookies)
}

/// Whether `client` is the one a session began with: the same network (/24, /64) and the
/// same browser (`User-Agent`). A copied cookie jar used elsewhere is not.
pub(crate) fn same_client(session: &crate::session::Session, client: &Client) -> bool {
    use crate::auth::flow::network_of;
    client.user_agent == session.user_agent && network_of(&client.ip) == network_of(&session.ip)
}

/// Whether a pending sign-in goes on from another network (/24, /64) or another browser than
/// the step before it came from. Such a sign-in is ended (audited `sign_in_moved`): a sign-in
/// is scored where its password was given (`risk`), so its second factor must come from there
/// too, or a thief with the password and a phished code could give the password near the owner
/// and the code from anywhere; and a cookie jar copied mid-enrolment would read the new
/// authenticator key and recovery codes, or register a key of its own.
pub(super) async fn moved_mid_sign_in(
    state: &AppState,
    loaded: &Loaded,
    client: &Client,
) -> Result<bool, AppError> {
    use crate::auth::flow::network_of;
    if same_client(&loaded.session, client) {
        return Ok(false);
    }
    state
        .sessions
        .destroy(&loaded.key, &loaded.session.user_id)
        .await?;
    let ev = AuditEvent::new("sign_in_moved", "denied", state.clock.now())
        .reason(&format!("from {}", network_of(&loaded.session.ip)))
        .client(&client.ip, &client.user_agent);
    let owner = match state.durable.user_by_id(&loaded.session.user_id).await? {
        Some(u) if !loaded.session.decoy => Some(u),
        _ => None,
    };
    let ev = match &owner {
        Some(u) => ev.user(u),
        None => ev,
    };
    state.audit.record(ev).await;
    // Someone gave the account's password (or its second factor, where that comes first): the
    // owner changing networks mid-way, or a copy of their browser's cookies used elsewhere.
    // (Or an enrolment link was used, which stands in for the password.)
    let proven =
        !loaded.session.amr.is_empty() || matches!(loaded.session.stage, Stage::EnrolTotp { .. });
    if let Some(u) = owner.filter(|_| proven) {
        let (began, went_on) = (network_of(&loaded.session.ip), network_of(&client.ip));
        state.notifier.sign_in_stopped(&u, &began, &went_on).await;
    }
    Ok(true)
}

/// The pages of a sign-in under way (second factor, enrolment, recovery codes, a remembered
/// browser's proof, key ceremonies): each checks that it is asked by the client the sign-in
/// began with ([`moved_mid_sign_in`]).
const SIGN_IN_STEPS: &[&str] = &[
    "/_portcullis/mfa",
    "/_portcullis/enrol/",
    "/_portcullis/recovery-codes",
    "/_portcullis/remembered",
    "/_portcullis/webauthn/register/",
    "/_portcullis/webauthn/authenticate/",
];

/// A signed-in session's fresh proof (`/_portcullis/reauth`, its key ceremony): checked one at a
/// time for each session, so wrong codes sent all at once are counted one after another and
/// the session ends at its budget as it does when they come in turn.
const STEP_UPS: &[&str] = &["/_portcullis/reauth", "/_portcullis/webauthn/reauth/"];

/// The account page's changes of how its owner signs in: run one at a time for each account
/// (two sets of recovery codes made at once would both be shown, one of them void).
const ACCOUNT_CHANGES: &[&str] = &[
    "/_portcullis/account/recovery-codes",
    "/_portcullis/account/totp",
    "/_portcullis/account/password",
    // (keys: so that two registrations at once cannot pass the account's limit of keys)
    "/_portcullis/webauthn/register/",
];

/// Middleware: a request for a step of a sign-in under way from another network or browser
/// than the sign-in began with ends that sign-in; a browser is sent to sign in again, an API
/// client gets `401 sign_in_moved`. Complete sessions and other pages pass untouched.
pub async fn guard_sign_in_steps(
    State(state): State<AppState>,
    Peer(peer): Peer,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let change = ACCOUNT_CHANGES.iter().any(|p| path.starts_with(p));
    let step_up = STEP_UPS.iter().any(|p| path.starts_with(p));
    if !change && !step_up && !SIGN_IN_STEPS.iter().any(|p| path.starts_with(p)) {
        return next.run(req).await;
    }
    let headers = req.headers().clone();
    let step = async {
        let Some(loaded) = current_session(&state, &headers).await? else {
            return Ok(Step::Free);
        };
        if loaded.session.is_authenticated() {
            return Ok(if change {
                Step::Account(loaded.session.user_id.clone())
            } else if step_up {
                Step::Confirmation(loaded.key)
            } else {
                Step::Free
            });
        }
        let client = super::client(&state, peer, &headers);
        Ok::<_, AppError>(match moved_mid_sign_in(&state, &loaded, &client).await? {
            true => Step::Moved,
            false => Step::Pending(loaded.key),
        })
    }
    .await;
    match step {
        Ok(Step::Pending(key)) if req.method() == axum::http::Method::POST => {
            let claim = format!("sign_in_step:{key}");
            let busy = "This step of your sign-in is being checked already (was it sent \
                        twice?). Wait a moment, then go back and reload the page.";
            one_at_a_time(&state, (&claim, busy), next.run(req)).await
        }
        Ok(Step::Account(user)) if req.method() == axum::http::Method::POST => {
            let claim = format!("account_change:{user}");
            let busy = "A change to how you sign in is being made already (was it sent \
                        twice?). Wait a moment, then reload your account page to see it.";
            one_at_a_time(&state, (&claim, busy), next.run(req)).await
        }
        Ok(Step::Confirmation(key)) if req.method() == axum::http::Method::POST => {
            let claim = format!("step_up:{key}");
            let busy = "This confirmation is being checked already (was it sent twice?). Wait a \
                        moment, then go back and reload the page.";
            one_at_a_time(&state, (&claim, busy), next.run(req)).await
        }
        Ok(Step::Free | Step::Pending(_) | Step::Account(_) | Step::Confirmation(_)) => {
            next.run(req).await
        }
        Ok(Step::Moved) if wants_html(&headers) => restart(&state, "moved", None),
        Ok(Step::Moved) => {
            let body = serde_json::json!({
                "error": "sign_in_moved",
                "message": "This sign-in went on from another network or browser than it began \
                            on, so it was ended. Sign in again.",
                "login": "/_portcullis/login?notice=moved",
            });
            let answer = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
            with_cookies(answer, [state.sessions.clear_cookie()])
        }
        Err(e) => e.into_response(),
    }
}

/// What [`guard_sign_in_steps`] found the request to be.
enum Step {
    /// Not a sign-in under way (none, or a complete session): nothing to guard.
    Free,
    /// A step of the sign-in under this session key, from the client it began with.
    Pending(String),
    /// A step from another network or browser: the sign-in is ended.
    Moved,
    /// A change of how this user signs in, from the account page of a complete session.
    Account(String),
    /// A fresh proof of the complete session under this key.
    Confirmation(String),
}

/// How long a step may hold its claim beyond the time its request's body may take to arrive
/// (`server.body_timeout`, counted from when the claim is taken, before the body is read):
/// released when the step is answered, so this is only for a gateway stopped mid-step.
const STEP_CLAIM_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `step` (a form or ceremony sent for a sign-in under way, or a change of how an account
/// signs in) unless another under the same `claim` is being handled: two codes sent at once (a
/// double submit, a copy of the cookies on the same network) would otherwise each be checked
/// and spent, and each complete the sign-in. The other gets `409 step_in_progress` (`busy`).
async fn one_at_a_time(
    state: &AppState,
    (claim, busy): (&str, &str),
    step: impl std::future::Future<Output = Response>,
) -> Response {
    let hold = state.config.server.body_timeout + STEP_CLAIM_MARGIN;
    match state.ephemeral.put_if_absent(claim, b"1", hold).await {
        Ok(true) => {}
        Ok(false) => {
            return AppError::new(StatusCode::CONFLICT, "step_in_progress", busy).into_response()
        }
        Err(e) => return AppError::from(e).into_response(),
    }
    let mut held = Held {
        store: Some(state.ephemeral.clone()),
        claim: claim.to_string(),
    };
    let answer = step.await;
    if let Some(store) = held.store.take() {
        if let Err(e) = store.delete(claim).await {
            // It runs out by itself.
            tracing::warn!(error = %e, "cannot release a sign-in step");
        }
    }
    answer
}

/// A step's claim while its request is handled: released by [`one_at_a_time`] once answered,
/// or here when the request is dropped first (the client went away mid-step), rather than left
/// to hold the sign-in until it runs out.
struct Held {
    store: Option<std::sync::Arc<dyn crate::store::EphemeralStore>>,
    claim: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        let (Some(store), Ok(runtime)) = (self.store.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let claim = std::mem::take(&mut self.claim);
        runtime.spawn(async move {
            if let Err(e) = store.delete(&claim).await {
                tracing::warn!(error = %e, "cannot release a sign-in step");
            }
        });
    }
}

/// `POST /_portcullis/mfa`.
pub async fn mfa_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    let mut loaded = match pending(&state, (&headers, true), |s| *s == Stage::SecondFactor).await? {
        Ok(l) => l,
        Err(r) => return Ok(r),
    };
    if awaits_password(&loaded.session) {
        return Ok(see_other(&stage_page(&loaded)));
    }
    // (A code from another network or browser never gets here: `guard_sign_in_steps`.)
    let client = super::client(&state, peer, &headers);
    let view = MfaView::of(&state, &loaded, form.remember).await?;
    loaded.session.remember_device = view.remember_ticked;
    let (token, set) = csrf_token(&state, &headers);
    let page = |status, msg: &str| with_cookies(view.page(status, &token, Some(msg)), set);
    // A form without a code is no guess: said so, checked against no budget.
    if form.code.expose().trim().is_empty() {
        let msg = "Enter the code from your authenticator app, or a recovery code.";
        if !wants_html(&headers) {
            return Err(AppError::new(StatusCode::BAD_REQUEST, "invalid_input", msg));
        }
        return Ok(page(StatusCode::BAD_REQUEST, msg));
    }
    let outcome = state
        .login
        .second_factor_step(&mut loaded.session, &form.code, &client)
        .await?;
    after_code(&state, &headers, &client, loaded, outcome, |msg| {
        page(StatusCode::UNAUTHORIZED, msg)
    })
    .await
}

fn is_enrolling(s: &Stage) -> bool {
    matches!(s, Stage::EnrolTotp { .. })
}

/// Renders the enrolment page for the secret in the session.
/// An account held to security keys (an enrolment link for a key only, or
/// `webauthn.require_phishing_resistant` and its per-account list) is shown the key's
/// registration alone: it could never confirm an authenticator app.
fn enrol_page(
    state: &AppState,
    loaded: &Loaded,
    user: &crate::store::User,
    csrf: &str,
    (error, notes): (Option<&str>, EnrolNotes),
    status: StatusCode,
) -> Result<Response, AppError> {
    let Some(secret) = state.login.enrolment_secret(&loaded.session)? else {
        return Ok(see_other(&stage_page(loaded)));
    };
    let email = user.email.as_str();
    let uri = totp::otpauth_uri(secret.expose(), &state.login.totp_issuer, email);
    let page = pages::EnrolTotp {
        csrf,
        qr_svg: &totp::qr_svg(&uri),
        secret: &totp::secret_base32(secret.expose()),
        uri: &uri,
        error,
        replaced: notes.replaced,
        has_factor: notes.has_factor,
        webauthn: state.keys.is_some(),
        key_only: matches!(
            loaded.session.stage,
            Stage::EnrolTotp { key_only: true, .. }
        ) || state
            .config
            .webauthn
            .requires_phishing_resistant(&user.account_id),
    };
    Ok(render(status, &page))
}

/// What the enrolment page says besides its form.
#[derive(Clone, Copy, Default)]
struct EnrolNotes {
    /// Another secret was shown to the account before and never confirmed.
    replaced: bool,
    /// The account has a usable second factor already (a key an administrator enrolled with
    /// the owner, say): this enrolment adds one, and may be skipped.
    has_factor: bool,
}

/// Whether `user_id` has a second factor it can sign in with: an authenticator app, or a
/// security key that is not suspended.
pub(super) async fn has_usable_factor(state: &AppState, user_id: &str) -> Result<bool, AppError> {
    has_usable_factor_before(state, user_id, i64::MAX).await
}

/// [`has_usable_factor`], counting an authenticator app only when it was set up before
/// `before` (an enrolment link's issue: one set up since goes when the link is used).
pub(super) async fn has_usable_factor_before(
    state: &AppState,
    user_id: &str,
    before: crate::clock::UnixTime,
) -> Result<bool, AppError> {
    if state
        .durable
        .totp(user_id)
        .await?
        .is_some_and(|t| t.created_at < before)
    {
        return Ok(true);
    }
    Ok(match &state.keys {
        Some(keys) => keys.has_usable(user_id).await?,
        None => false,
    })
}

/// `GET /_portcullis/enrol/totp`.
pub async fn enrol_get(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let loaded = match pending(&state, (&headers, false), is_enrolling).await? {
        Ok(l) => l,
        Err(r) => return Ok(r),
    };
    let Some(user) = state.durable.user_by_id(&loaded.session.user_id).await? else {
        return Ok(expired(&state));
    };
    if let Some(why) = state
        .login
        .enrolment_overtaken(&loaded.session, true)
        .await?
    {
        return overtaken(&state, &loaded, why).await;
    }
    let notes = EnrolNotes {
        replaced: state.login.enrolment_secret_shown(&loaded.session).await?,
        has_factor: has_usable_factor(&state, &user.id).await?,
    };
    let (token, set) = csrf_token(&state, &headers);
    Ok(with_cookies(
        enrol_page(
            &state,
            &loaded,
            &user,
            &token,
            (None, notes),
            StatusCode::OK,
        )?,
        set,
    ))
}

/// A code form sent without its code is bad input (400 `invalid_input`), not an attempt:
/// nothing is checked, audited or counted against a budget.
pub(super) fn code_given(code: &Secret<String>) -> Result<(), AppError> {
    if code.expose().trim().is_empty() {
        return Err(AppError::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "Enter the code from your authenticator app.",
        ));
    }
    Ok(())
}

/// `POST /_portcullis/enrol/totp`.
pub async fn enrol_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    let mut loaded = match pending(&state, (&headers, true), is_enrolling).await? {
        Ok(l) => l,
        Err(r) => return Ok(r),
    };
    let Some(user) = state.durable.user_by_id(&loaded.session.user_id).await? else {
        return Ok(expired(&state));
    };
    code_given(&form.code)?;
    let client = super::client(&state, peer, &headers);
    if let Some(why) = state
        .login
        .enrolment_overtaken(&loaded.session, false)
        .await?
    {
        let ev = AuditEvent::new("totp_enrolled", "denied", state.clock.now())
            .user(&user)
            .reason(why);
        state.login.audit(ev, &client).await;
        return overtaken(&state, &loaded, why).await;
    }
    let before = loaded.clone();
    let notes = EnrolNotes {
        replaced: false,
        has_factor: has_usable_factor(&state, &user.id).await?,
    };
    let outcome = state
        .login
        .confirm_enrolment(&mut loaded.session, &form.code, &client)
        .await?;
    let (token, set) = csrf_token(&state, &headers);
    let wrong = matches!(outcome, CodeOutcome::Rejected);
    let retry = |msg: &str| {
        // A wrong code here is most often a device's clock; any other refusal says its own.
        let msg = if wrong {
            "That code is not right. Check the time on your device and enter the current code. \
             If your app lists this account more than once, use the entry added last, from the \
             code on this page."
        } else {
            msg
        };
        let page = enrol_page(
            &state,
            &before,
            &user,
            &token,
            (Some(msg), notes),
            StatusCode::UNAUTHORIZED,
        )
        .unwrap_or_else(IntoResponse::into_response);
        with_cookies(page, set)
    };
    after_code(&state, &headers, &client, loaded, outcome, retry).await
}

/// Recovery codes of `user_id` sealed to be shown once (one per line), opened.
pub(super) fn opened_codes(
    state: &AppState,
    user_id: &str,
    sealed: &[u8],
) -> Result<Vec<String>, AppError> {
    let opened = zeroize::Zeroizing::new(
        state
            .master_key
            .open(&crate::auth::flow::recovery_show_context(user_id), sealed)
            .map_err(|e| AppError::internal(&e))?,
    );
    Ok(String::from_utf8_lossy(&opened)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// `GET /_portcullis/recovery-codes`: shown exactly while the session is in that stage.
pub async fn codes_get(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let loaded = match pending(&state, (&headers, false), |s| {
        matches!(s, Stage::ShowRecoveryCodes { .. })
    })
    .await?
    {
        Ok(l) => l,
        Err(r) => return Ok(r),
    };
    let Stage::ShowRecoveryCodes { sealed_codes } = &loaded.session.stage else {
        return Ok(see_other(&stage_page(&loaded)));
    };
    let codes = opened_codes(&state, &loaded.session.user_id, sealed_codes)?;
    let (token, set) = csrf_token(&state, &headers);
    Ok(with_cookies(
        render(
            StatusCode::OK,
            &pages::RecoveryCodes {
                csrf: &token,
                codes: &codes,
            },
        ),
        set,
    ))
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/recovery-codes`: the codes are saved; the sign-in is complete.
pub async fn codes_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    let mut loaded = match pending(&state, (&headers, true), |s| {
        matches!(s, Stage::ShowRecoveryCodes { .. })
    })
    .await?
    {
        Ok(l) => l,
        Err(r) => return Ok(r),
    };
    loaded.session.stage = Stage::Authenticated;
    let client = super::client(&state, peer, &headers);
    // The sign-in set up the account's first factor (the app or a key, and these codes).
    let began = loaded.session.created_ms.div_euclid(1000);
    let device_cookies = complete_sign_in_as(
        &state,
        &headers,
        (&client, Some(began)),
        &mut loaded.session,
    )
    .await?;
    let (id, _) = state.sessions.rotate(&loaded.key, &loaded.session).await?;
    let mut cookies = vec![state.sessions.set_cookie(&id)];
    cookies.extend(device_cookies);
    let mut resp = with_cookies(see_other(&stage_page(&loaded)), cookies);
    super::binding::offer_registration(&state, &loaded.session, &mut resp).await?;
    Ok(resp)
}

/// `GET /_portcullis/logout`: a confirmation form (signing out takes a POST, so a link or image
/// on another site cannot sign anyone out).
pub async fn logout_get(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some(loaded) = current_session(&state, &headers).await? else {
        return Ok(see_other("/_portcullis/login?notice=logged_out"));
    };
    // The address only to the session's own device: a copied session cookie may sign the
    // session out (that is the safe way round) but learns nothing from the page.
    let client = super::client(&state, peer, &headers);
    let email = if super::binding::shows_its_device(&state, &loaded.session, &headers, &client) {
        // Signing out needs no database: during an outage the page shows no email, nothing else.
        state
            .durable
            .user_by_id(&loaded.session.user_id)
            .await
            .ok()
            .flatten()
            .map(|u| u.email)
            .unwrap_or_default()
    } else {
        String::new()
    };
    let (token, set) = csrf_token(&state, &headers);
    let back = super::gate::referring_gateway_page(&state, &headers);
    Ok(with_cookies(
        render(
            StatusCode::OK,
            &pages::Logout {
                csrf: &token,
                email: &email,
                back: back.as_deref().unwrap_or("/"),
            },
        ),
        set,
    ))
}

#[derive(Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: String,
    /// "Start over" on a sign-in's step: the sign-in page is shown next, going on to this
    /// address (same-site) once signed in, rather than the signed-out notice.
    #[serde(default)]
    next: Option<String>,
}

/// `POST /_portcullis/logout`: ends the session (or the sign-in under way) server-side at once.
pub async fn logout_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    // A sign-out the session store did not take says so: the user is still signed in.
    let still_in = |e: AppError| AppError {
        message: format!(
            "You are still signed in: signing out could not reach the session store. {}",
            e.message
        ),
        ..e
    };
    if let Some(loaded) = current_session(&state, &headers).await.map_err(still_in)? {
        let client = super::client(&state, peer, &headers);
        // A copied cookie jar may sign the session out (the safe way round), but from another
        // network or browser than the session's device that is a sign of the copy: written
        // down as such, and the owner is told.
        let elsewhere = loaded.session.is_authenticated()
            && !super::binding::from_its_device(&state, &loaded.session, &headers, &client);
        state
            .sessions
            .destroy(&loaded.key, &loaded.session.user_id)
            .await
            .map_err(|e| still_in(e.into()))?;
        state.signer.forget(&loaded.key);
        let mut ev = AuditEvent::new("logout", "success", state.clock.now())
            .client(&client.ip, &client.user_agent);
        if elsewhere {
            ev = ev.reason("not_from_the_sessions_device");
        }
        // The session is gone already: a database outage must not turn the sign-out into an
        // error or lose its audit event; the user id alone names who signed out.
        let user = state.durable.user_by_id(&loaded.session.user_id).await;
        ev = match &user {
            Ok(Some(u)) => ev.user(u),
            _ => AuditEvent {
                user_id: Some(loaded.session.user_id.clone()),
                ..ev
            },
        };
        state.audit.record(ev).await;
        if let (true, Ok(Some(u))) = (elsewhere, &user) {
            // Best effort: the sign-out has happened.
            let notice = super::binding::CopyNotice {
                subject: "was signed out",
                done: "signed out",
                by: "another network or browser than it was last proven from",
                how: "",
                rest: "If you signed out after moving to another network (a laptop on other Wi-Fi, a\n\
                       phone on mobile data) or after your browser updated, there is nothing to do.\n\
                       If not, someone may have a copy of your browser's cookies: they could not use\n\
                       the session, only end it. Change your password and check your computer for\n\
                       malware.\n",
            };
            if let Err(e) = super::binding::tell_of_a_copy(&state, u, &client, notice).await {
                tracing::warn!(error = %e, "could not queue the notice of a sign-out from elsewhere");
            }
        }
    }
    let mut resp = match &form.next {
        Some(next) => {
            let next = safe_return_target(next, &state.config.server.public_url);
            let next = next.as_deref().filter(|n| *n != "/");
            see_other(&super::gate::login_location(super::gate::LOGIN_PATH, next))
        }
        None => see_other("/_portcullis/login?notice=logged_out"),
    };
    // Console pages the browser kept in its cache (Back after signing out on a shared computer)
    // go with the session. Only the cache: the device and remembered-browser keys stay.
    resp.headers_mut().insert(
        HeaderName::from_static("clear-site-data"),
        HeaderValue::from_static("\"cache\""),
    );
    // The bound cookie of the ended session goes too: it proves nothing any more.
    let cookies = [
        state.sessions.clear_cookie(),
        super::binding::dropped_cookie(&state),
    ];
    Ok(with_cookies(resp, cookies))
}
