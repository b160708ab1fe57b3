//! Users: list and search, create (with an enrolment link), and one user's page with its
//! factors, devices, live sessions and recent events, and the actions on them.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::pages::{self, DeviceRow, EventRow, IssuedLink, KeyRow, SessionRow, UserRow};
use super::{checked, csrf, record, respond, when, Admin};
use crate::http::error::{refusal_for_api, AppError};
use crate::http::pages::render;
use crate::http::{see_other, Form};
use crate::state::AppState;
use crate::store::{
    normalise_email, AuditEvent, AuditQuery, KeyRemoval, NewUser, StoreError, User,
};

/// Users shown per search.
const PAGE: u32 = 200;
/// Longest reason kept.
const MAX_REASON: usize = 200;

use crate::http::query_param as query;

fn notice_text(code: &str) -> Option<&'static str> {
    Some(match code {
        "disabled" => "The account is disabled and its sessions have ended.",
        "enabled" => "The account is enabled again.",
        "unlocked" => "Password sign-in is unlocked.",
        "unlocked_no_factor" => {
            "Password sign-in is unlocked, but the account has no second factor left: its \
             password alone still signs in nobody. Issue an enrolment link below and give it to \
             the user."
        }
        "factors_reset" => {
            "Every second factor was removed, every session ended and every enrolment link not \
             used yet stopped working. The password alone no longer signs in: issue a new \
             enrolment link below and give it to the user."
        }
        "disabled_already" => "The account was disabled already: nothing changed.",
        "not_disabled" => "The account was not disabled: nothing changed.",
        "not_suspended" => "The key was not suspended: nothing changed.",
        "no_factors" => {
            "The account has no second factor to remove: it sets one up through an enrolment \
             link. Any sign-in or enrolment under way was ended, and any link not used yet no \
             longer works (one may have leaked). Issue a new link below and give it to the user."
        }
        "sessions_ended" => "The sessions have ended.",
        "no_sessions" => "The account had no live session: nothing was ended.",
        "session_gone" => "That session had ended already.",
        "not_locked" => "Password sign-in was not locked: nothing changed.",
        "session_ended" => "The session has ended.",
        "key_removed" => "The key was revoked and the account's sessions ended.",
        "key_removed_own" => "The key was revoked.",
        "key_removed_no_factor" => {
            "The key was revoked and the account's sessions ended. The account has no second \
             factor left: issue an enrolment link below and give it to the user."
        }
        "key_restored" => "The key is no longer suspended: it signs in again.",
        "key_added" => "The key was enrolled.",
        "device_revoked" => "The device was revoked and its sessions ended.",
        "device_revoked_already" => {
            "That device had been revoked already: nothing changed (any session it still had \
             was ended)."
        }
        _ => return None,
    })
}

/// `GET /_portcullis/admin/users?q=`.
pub async fn list_get(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let text = query(&q, "q").unwrap_or_default();
    // Text columns refuse a NUL: said here, as the audit filters say it, not as a store failure.
    if text.chars().any(char::is_control) {
        let refused = "The search holds a character that is not allowed.";
        return list_page(
            &state,
            &admin,
            &headers,
            ("", None),
            Some(refused),
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    list_page(
        &state,
        &admin,
        &headers,
        (&text, None),
        None,
        StatusCode::OK,
    )
    .await
}

/// The users page: the search `text`'s matches, and the "create a user" form (as it was sent,
/// with `draft`, when it was refused).
async fn list_page(
    state: &AppState,
    admin: &Admin,
    headers: &HeaderMap,
    (text, draft): (&str, Option<&pages::NewUserDraft>),
    error: Option<&str>,
    status: StatusCode,
) -> Result<Response, AppError> {
    if let Some(refused) = refusal_for_api(headers, status, error) {
        return Err(refused);
    }
    let text: String = text.chars().take(320).collect();
    let mut found = state.durable.search_users(&text, PAGE + 1).await?;
    let truncated = found.len() > PAGE as usize;
    found.truncate(PAGE as usize);
    let rows: Vec<UserRow> = found
        .into_iter()
        .map(|u| UserRow {
            id: u.id,
            email: u.email,
            account: u.account_id,
            admin: u.is_admin,
            disabled: u.disabled,
            locked: u.locked,
        })
        .collect();
    let (token, set) = csrf(state, headers);
    let page = pages::Users {
        admin: &admin.user.email,
        csrf: &token,
        q: &text,
        rows: &rows,
        truncated,
        error,
        draft,
    };
    Ok(respond(render(status, &page), set))
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    account: String,
    #[serde(default, deserialize_with = "crate::http::checkbox")]
    admin: bool,
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/admin/users`: creates a user without a password and shows their
/// enrolment link once.
pub async fn create_post(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    Form(form): Form<CreateForm>,
) -> Result<Response, AppError> {
    checked(&state, &headers, &form.csrf)?;
    let email = normalise_email(&form.email);
    let account = form.account.trim().to_string();
    let draft = pages::NewUserDraft {
        email: form.email.trim().to_string(),
        account: account.clone(),
        admin: form.admin,
    };
    let (st, ad, hd, dr) = (&state, &admin, &headers, &draft);
    let refused = |msg: &'static str, status| async move {
        list_page(st, ad, hd, ("", Some(dr)), Some(msg), status).await
    };
    let bad = |msg| refused(msg, StatusCode::BAD_REQUEST);
    if !crate::policy::is_plausible_email(&email) {
        return bad("Enter the user's email address, e.g. name@example.com.").await;
    }
    if let Some(why) = crate::policy::email_confusion(&email) {
        return bad(why).await;
    }
    if crate::store::lookalike_user(state.durable.as_ref(), &email)
        .await?
        .is_some()
    {
        return refused(
            "This address looks like the address of an existing user, so a user made with it \
             could pass for them. Use another address.",
            StatusCode::CONFLICT,
        )
        .await;
    }
    if !crate::policy::is_account_id(&account) {
        return bad(
            "The account id has 1 to 128 characters, without control or invisible characters.",
        )
        .await;
    }
    let is_admin = form.admin;
    let created = state
        .durable
        .create_user(
            NewUser {
                email,
                account_id: account,
                is_admin,
                // No password until the user sets one through their enrolment link.
                password_hash: String::new(),
            },
            state.clock.now(),
        )
        .await;
    let user = match created {
        Ok(u) => u,
        Err(StoreError::Conflict(_)) => {
            let msg = "A user with this email already exists.";
            return refused(msg, StatusCode::CONFLICT).await;
        }
        Err(e) => return Err(e.into()),
    };
    record(&state, &admin, "user_created", Some(&user), "admin").await;
    // An administrator made by another is found by the same event as one made on the command
    // line, not only by reading the account ids of created users.
    if is_admin {
        record(&state, &admin, "admin_granted", Some(&user), "created").await;
    }
    let link = issue_link(&state, &admin, &user, is_admin).await?;
    show_link(&state, &admin, &headers, &user, link).await
}

/// What to show on a user page besides the user.
#[derive(Default)]
struct View<'a> {
    link: Option<IssuedLink>,
    notice: Option<&'a str>,
    error: Option<&'a str>,
    status: Option<StatusCode>,
}

async fn issue_link(
    state: &AppState,
    admin: &Admin,
    user: &User,
    key_only: bool,
) -> Result<IssuedLink, AppError> {
    let issued = crate::enrolment::issue(
        state.durable.as_ref(),
        &state.config.server.public_url,
        user,
        &admin.user.email,
        key_only || user.is_admin,
        state.config.admin.enrolment_link_ttl,
        state.clock.now(),
    )
    .await?;
    let kind = if key_only || user.is_admin {
        "key_only"
    } else {
        "any_factor"
    };
    record(state, admin, "enrolment_link_issued", Some(user), kind).await;
    Ok(IssuedLink {
        url: issued.url,
        expires: when(issued.expires_at),
    })
}

/// The user named in the path, or 404.
async fn target(state: &AppState, id: &str) -> Result<User, AppError> {
    if id.len() > 64 {
        return Err(AppError::not_found());
    }
    state
        .durable
        .user_by_id(id)
        .await?
        .ok_or_else(AppError::not_found)
}

/// A form's CSRF token checked, then the user named in the path.
async fn checked_target(
    state: &AppState,
    headers: &HeaderMap,
    csrf: &str,
    id: &str,
) -> Result<User, AppError> {
    checked(state, headers, csrf)?;
    target(state, id).await
}

/// `GET /_portcullis/admin/users/{id}`.
pub async fn user_get(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let user = target(&state, &id).await?;
    let code = query(&q, "notice");
    let mut view = View {
        notice: code.as_deref().and_then(notice_text),
        ..View::default()
    };
    if let Some(token) = query(&q, "link") {
        match shown_link(&state, &admin, &user, &token).await? {
            Some(link) => view.link = Some(link),
            None => {
                view.notice = Some(
                    "No enrolment link is shown here: a link is shown for 15 minutes after it \
                     was issued, on the page of its user, to the session that issued it, and \
                     only while it works (not once used, replaced by a newer one or ended by a \
                     reset). Whether it was used is in the events below (enrolment_link_used). \
                     If it was not handed over, issue a new one: that voids it.",
                )
            }
        }
    }
    user_page(&state, &admin, &headers, &user, view).await
}

async fn user_page(
    state: &AppState,
    admin: &Admin,
    headers: &HeaderMap,
    user: &User,
    view: View<'_>,
) -> Result<Response, AppError> {
    let status = view.status.unwrap_or(StatusCode::OK);
    if let Some(refused) = refusal_for_api(headers, status, view.error) {
        return Err(refused);
    }
    let d = &state.durable;
    let keys: Vec<KeyRow> = d
        .webauthn_credentials(&user.id)
        .await?
        .into_iter()
        .map(KeyRow::of)
        .collect();
    let devices: Vec<DeviceRow> = d
        .list_devices(&user.id)
        .await?
        .into_iter()
        .map(|v| DeviceRow {
            first_seen: when(v.first_seen),
            last_seen: when(v.last_seen),
            active: v.status == "active",
            binding: crate::http::account::binding_text(&v.binding),
            id: v.id,
            name: v.name,
            last_ip: crate::http::risk::address(state, &v.last_ip),
        })
        .collect();
    let sessions: Vec<SessionRow> = state
        .sessions
        .list_user(&user.id)
        .await?
        .into_iter()
        .filter(|l| {
            l.session.is_authenticated() && l.session.auth_ms > user.sessions_valid_after_ms
        })
        .map(|l| SessionRow {
            id: l.session.public_id.clone(),
            started: when(l.session.created_ms / 1000),
            last_seen: when(l.session.last_seen_ms / 1000),
            ip: l.session.ip.clone(),
            agent: crate::device::friendly_name(&l.session.user_agent),
            methods: l.session.amr.join(", "),
        })
        .collect();
    let events: Vec<EventRow> = d
        .query_audit(&AuditQuery {
            user_id: Some(user.id.clone()),
            newest_first: true,
            limit: 25,
            ..AuditQuery::default()
        })
        .await?
        .into_iter()
        .map(event_row)
        .collect();
    let (token, set) = csrf(state, headers);
    let page = pages::UserPage {
        admin: &admin.user.email,
        csrf: &token,
        user,
        created: when(user.created_at),
        has_password: !user.password_hash.is_empty(),
        has_totp: d.totp(&user.id).await?.is_some(),
        awaits_link: crate::store::awaits_enrolment_link(d.as_ref(), user).await?,
        recovery_left: d.recovery_codes_left(&user.id).await?,
        keys: &keys,
        devices: &devices,
        sessions: &sessions,
        events: &events,
        webauthn: state.keys.is_some(),
        link: view.link,
        notice: view.notice,
        error: view.error,
    };
    Ok(respond(render(status, &page), set))
}

/// An audit event as a table row.
pub(super) fn event_row(e: AuditEvent) -> EventRow {
    EventRow {
        at: when(e.at),
        event: e.event,
        outcome: e.outcome,
        email: e.email.unwrap_or_default(),
        account: e.account_id.unwrap_or_default(),
        ip: e.ip.unwrap_or_default(),
        reason: e.reason.unwrap_or_default(),
        actor: e.actor.unwrap_or_default(),
        times: e.times,
    }
}

#[derive(Deserialize)]
pub struct ReasonForm {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    csrf: String,
}

/// The reason an admin gave, trimmed; `None` when empty. Refused (never cut or filtered, so
/// the trail keeps what the admin wrote) when longer than [`MAX_REASON`] characters or not one
/// line of text.
fn reason(raw: &str) -> Result<Option<String>, &'static str> {
    let r = raw.trim();
    if r.chars().any(crate::policy::is_hidden_char) {
        return Err("a reason is one line of text, without control or invisible characters.");
    }
    if r.chars().count() > MAX_REASON {
        return Err("a reason has at most 200 characters.");
    }
    Ok((!r.is_empty()).then(|| r.to_string()))
}

/// A checked action form: the CSRF token, the user, and the admin's reason. Actions an admin
/// could lock themselves out with are refused on their own account.
async fn acting(
    state: &AppState,
    admin: &Admin,
    headers: &HeaderMap,
    id: &str,
    form: &ReasonForm,
    (not_on_self, what): (bool, &str),
) -> Result<Result<(User, String), Response>, AppError> {
    let user = checked_target(state, headers, &form.csrf, id).await?;
    if not_on_self && user.id == admin.user.id {
        let view = View {
            error: Some("You cannot do this to your own account. Ask another administrator."),
            status: Some(StatusCode::CONFLICT),
            ..View::default()
        };
        return user_page(state, admin, headers, &user, view).await.map(Err);
    }
    let refused = match reason(&form.reason) {
        Ok(Some(r)) => return Ok(Ok((user, r))),
        Ok(None) => "give a reason, it is kept in the audit trail.",
        Err(why) => why,
    };
    // The page has several forms with a reason: the message names the one sent.
    let refused = format!("{what}: {refused}");
    let view = View {
        error: Some(&refused),
        status: Some(StatusCode::BAD_REQUEST),
        ..View::default()
    };
    user_page(state, admin, headers, &user, view).await.map(Err)
}

fn done(user: &User, notice: &str) -> Response {
    see_other(&format!(
        "/_portcullis/admin/users/{}?notice={notice}",
        user.id
    ))
}

/// Ends every session of a user on every gateway.
async fn end_all(state: &AppState, user: &User) -> Result<(), AppError> {
    state
        .durable
        .void_sessions(&user.id, state.clock.now_millis())
        .await?;
    let why = crate::session::Ended::ByAdmin;
    state.sessions.destroy_all_because(&user.id, why).await?;
    state.user_gate.forget(&user.id);
    Ok(())
}

macro_rules! action {
    ($name:ident, $doc:literal, $what:literal, |$state:ident, $admin:ident, $user:ident, $why:ident| $body:block, not_on_self = $self_guard:expr) => {
        #[doc = $doc]
        pub async fn $name(
            State($state): State<AppState>,
            $admin: Admin,
            headers: HeaderMap,
            Path(id): Path<String>,
            Form(form): Form<ReasonForm>,
        ) -> Result<Response, AppError> {
            let ($user, $why) =
                match acting(&$state, &$admin, &headers, &id, &form, ($self_guard, $what)).await? {
                    Ok(v) => v,
                    Err(page) => return Ok(page),
                };
            $body
        }
    };
}

action!(
    disable_post,
    "`POST …/users/{id}/disable`: refuses sign-in and ends every session.",
    "Disable the account",
    |state, admin, user, why| {
        // Already disabled: nothing changes, so nothing is recorded or told again.
        if user.disabled {
            return Ok(done(&user, "disabled_already"));
        }
        state
            .durable
            .set_disabled(&user.id, true, state.clock.now_millis())
            .await?;
        end_all(&state, &user).await?;
        record(&state, &admin, "user_disabled", Some(&user), &why).await;
        state
            .notifier
            .admin_change(&user, "an administrator disabled the account")
            .await;
        Ok(done(&user, "disabled"))
    },
    not_on_self = true
);

action!(
    enable_post,
    "`POST …/users/{id}/enable`.",
    "Enable the account",
    |state, admin, user, why| {
        if !user.disabled {
            return Ok(done(&user, "not_disabled"));
        }
        state
            .durable
            .set_disabled(&user.id, false, state.clock.now_millis())
            .await?;
        state.user_gate.forget(&user.id);
        record(&state, &admin, "user_enabled", Some(&user), &why).await;
        state
            .notifier
            .admin_change(&user, "an administrator enabled the account again")
            .await;
        Ok(done(&user, "enabled"))
    },
    not_on_self = false
);

action!(
    unlock_post,
    "`POST …/users/{id}/unlock`: password sign-in works again after a report.",
    "Unlock password sign-in",
    |state, admin, user, why| {
        if !user.locked {
            return Ok(done(&user, "not_locked"));
        }
        state.durable.set_locked(&user.id, false).await?;
        state.user_gate.forget(&user.id);
        record(&state, &admin, "user_unlocked", Some(&user), &why).await;
        state
            .notifier
            .admin_change(&user, "an administrator unlocked password sign-in")
            .await;
        // A report may have taken the account's last factors: then the password alone still
        // signs in nobody, and the user needs an enrolment link.
        let factorless = crate::store::awaits_enrolment_link(state.durable.as_ref(), &user).await?;
        Ok(done(
            &user,
            if factorless {
                "unlocked_no_factor"
            } else {
                "unlocked"
            },
        ))
    },
    not_on_self = false
);

action!(
    reset_factors_post,
    "`POST …/users/{id}/reset-factors`: removes TOTP, keys and recovery codes, ends every session.",
    "Reset second factors",
    |state, admin, user, why| {
        if crate::store::nothing_to_reset(state.durable.as_ref(), &user).await? {
            // No factor to remove, but a setup under way through a link (perhaps someone else's
            // use of one that leaked) is cut off, and links not used yet end, as a reset would:
            // audited as one (not mailed again: the owner was told of the first).
            state
                .durable
                .reset_second_factors(&user.id, state.clock.now())
                .await?;
            end_all(&state, &user).await?;
            let why = format!(
                "{why} (no factor left to remove: sign-ins under way and unused links ended)"
            );
            record(&state, &admin, "second_factors_reset", Some(&user), &why).await;
            return Ok(done(&user, "no_factors"));
        }
        state
            .durable
            .reset_second_factors(&user.id, state.clock.now())
            .await?;
        end_all(&state, &user).await?;
        record(&state, &admin, "second_factors_reset", Some(&user), &why).await;
        state
            .notifier
            .admin_change(&user, crate::notify::RESET_NOTICE)
            .await;
        Ok(done(&user, "factors_reset"))
    },
    not_on_self = true
);

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
    #[serde(default, deserialize_with = "crate::http::checkbox")]
    key_only: bool,
    /// Optional for ending sessions and revoking a device: kept in the audit trail when given.
    #[serde(default)]
    reason: String,
}

/// What the audit trail records for an action whose reason is optional: `what`, and the
/// admin's reason after it when one was given.
fn with_reason(what: &str, raw: &str) -> Result<String, AppError> {
    match reason(raw) {
        Ok(Some(r)) => Ok(format!("{what}: {r}")),
        Ok(None) => Ok(what.to_string()),
        Err(why) => Err(AppError::new(StatusCode::BAD_REQUEST, "invalid_input", why)),
    }
}

/// `POST …/users/{id}/sessions/end`: ends every session of the user.
pub async fn end_sessions_post(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let user = checked_target(&state, &headers, &form.csrf, &id).await?;
    let why = with_reason("all", &form.reason)?;
    let live = state.sessions.list_user(&user.id).await?;
    end_all(&state, &user).await?;
    if live.is_empty() {
        // Nothing was ended: nothing to record or tell again.
        return Ok(done(&user, "no_sessions"));
    }
    record(&state, &admin, "sessions_ended", Some(&user), &why).await;
    state
        .notifier
        .admin_change(&user, "an administrator ended every session of the account")
        .await;
    Ok(done(&user, "sessions_ended"))
}

/// `POST …/users/{id}/sessions/{sid}/end`: ends one session (by its public id, the JWT `sid`).
pub async fn end_session_post(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    Path((id, sid)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let user = checked_target(&state, &headers, &form.csrf, &id).await?;
    let why = with_reason(&format!("sid:{sid}"), &form.reason)?;
    let Some(found) = state
        .sessions
        .list_user(&user.id)
        .await?
        .into_iter()
        .find(|l| l.session.public_id == sid)
    else {
        // Ended meanwhile (by the user, by expiry, or by this form sent twice).
        return Ok(done(&user, "session_gone"));
    };
    let by_admin = crate::session::Ended::ByAdmin;
    state
        .sessions
        .destroy_because(&found.key, &user.id, by_admin)
        .await?;
    state.signer.forget(&found.key);
    record(&state, &admin, "session_ended", Some(&user), &why).await;
    state
        .notifier
        .admin_change(
            &user,
            &format!(
                "an administrator ended a session of the account (signed in from {})",
                found.session.ip
            ),
        )
        .await;
    Ok(done(&user, "session_ended"))
}

/// [`acting`] on the user's key `key` (404 when they have none such): the user, the reason and
/// the key.
async fn acting_on_key(
    (state, admin, headers): (&AppState, &Admin, &HeaderMap),
    (id, key): (&str, &str),
    form: &ReasonForm,
    what: &str,
) -> Result<Result<(User, String, crate::store::WebauthnCredential), Response>, AppError> {
    let (user, why) = match acting(state, admin, headers, id, form, (false, what)).await? {
        Ok(v) => v,
        Err(page) => return Ok(Err(page)),
    };
    let found = key_of(state, &user, key).await?;
    Ok(Ok((user, why, found)))
}

/// The user's key `key`; 404 when they have none such.
async fn key_of(
    state: &AppState,
    user: &User,
    key: &str,
) -> Result<crate::store::WebauthnCredential, AppError> {
    let keys = state.durable.webauthn_credentials(&user.id).await?;
    keys.into_iter()
        .find(|c| c.id == key)
        .ok_or_else(AppError::not_found)
}

/// `POST …/users/{id}/keys/{key}/remove`: revokes a security key or passkey.
pub async fn remove_key_post(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
    Form(form): Form<ReasonForm>,
) -> Result<Response, AppError> {
    let on = (&state, &admin, &headers);
    let (user, why, found) = match acting_on_key(on, (&id, &key), &form, "Revoke this key").await? {
        Ok(v) => v,
        Err(page) => return Ok(page),
    };
    let name = found.name;
    // As on the account page: the last usable second factor stays. Without one, the password
    // alone would start a sign-in that enrols a new factor; a lost last key is what "Reset
    // second factors" is for (it ends every session and tells the owner). A suspended key
    // signs nobody in and always goes: then an account left without a factor enrols through
    // a link.
    let notice =
        match crate::http::account::remove_key_keeping_a_factor(&state, &user, &key).await? {
            KeyRemoval::Removed => "key_removed",
            KeyRemoval::RemovedLastFactor => "key_removed_no_factor",
            KeyRemoval::NotFound => return Err(AppError::not_found()),
            KeyRemoval::LastFactor => {
                let ev = AuditEvent::new("webauthn_removed", "denied", state.clock.now())
                    .actor(&admin.user.email)
                    .client(&admin.client.ip, &admin.client.user_agent)
                    .user(&user)
                    .reason(&format!("last_factor (key {key})"));
                state.audit.record(ev).await;
                let view = View {
                    error: Some(
                        "This is the account's only usable second factor, so it stays: without it \
                     the password alone would start a sign-in. If the key is lost, use Reset \
                     second factors.",
                    ),
                    status: Some(StatusCode::CONFLICT),
                    ..View::default()
                };
                return user_page(&state, &admin, &headers, &user, view).await;
            }
        };
    // A key an administrator revokes may be in other hands (lost, or an intruder's): the
    // sessions it may have proved end with it (an administrator's own stay).
    let notice = if user.id == admin.user.id {
        "key_removed_own"
    } else {
        end_all(&state, &user).await?;
        notice
    };
    record(
        &state,
        &admin,
        "webauthn_removed",
        Some(&user),
        &format!("{why} (key {key})"),
    )
    .await;
    state
        .notifier
        .admin_change(
            &user,
            &crate::notify::Notifier::key_change(
                &format!(
                    "an administrator removed one of your security keys{}",
                    match notice {
                        "key_removed_own" => "",
                        _ => " and ended the account's sessions",
                    }
                ),
                &name,
            ),
        )
        .await;
    Ok(done(&user, notice))
}

/// `POST …/users/{id}/keys/{key}/restore`: lifts a key's suspension (by a report or a
/// possible clone) once the administrator has found it to be the owner's.
pub async fn restore_key_post(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
    Form(form): Form<ReasonForm>,
) -> Result<Response, AppError> {
    let on = (&state, &admin, &headers);
    let (user, why, found) = match acting_on_key(on, (&id, &key), &form, "Restore this key").await?
    {
        Ok(v) => v,
        Err(page) => return Ok(page),
    };
    // Not suspended (any more): nothing changes, nothing is recorded or told again.
    if !state
        .durable
        .restore_webauthn_credential(&user.id, &key)
        .await?
    {
        return Ok(done(&user, "not_suspended"));
    }
    let was = found.suspended_reason.unwrap_or_default();
    record(
        &state,
        &admin,
        "webauthn_restored",
        Some(&user),
        &format!("{why} (key {key}, suspended: {was})"),
    )
    .await;
    state
        .notifier
        .admin_change(
            &user,
            &crate::notify::Notifier::key_change(
                "an administrator restored one of your security keys, which had been suspended",
                &found.name,
            ),
        )
        .await;
    Ok(done(&user, "key_restored"))
}

/// `POST …/users/{id}/devices/{device}/revoke`: the device's sessions end; it must be
/// confirmed again at its next sign-in.
pub async fn revoke_device_post(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    Path((id, device)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let user = checked_target(&state, &headers, &form.csrf, &id).await?;
    let why = with_reason(&format!("device:{device}"), &form.reason)?;
    let Some(found) = state
        .durable
        .list_devices(&user.id)
        .await?
        .into_iter()
        .find(|d| d.id == device)
    else {
        return Err(AppError::not_found());
    };
    let changed = state.durable.revoke_device(&device).await?;
    state
        .sessions
        .destroy_device(&user.id, &device, crate::session::Ended::ByAdmin)
        .await?;
    if changed {
        record(&state, &admin, "device_revoked", Some(&user), &why).await;
        state
            .notifier
            .admin_change(
                &user,
                &format!(
                    "an administrator revoked the device \"{}\" and ended its sessions",
                    found.name
                ),
            )
            .await;
        return Ok(done(&user, "device_revoked"));
    }
    Ok(done(&user, "device_revoked_already"))
}

/// `POST …/users/{id}/enrolment-link`: a one-time link for the user, shown once.
pub async fn enrolment_link_post(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    let user = checked_target(&state, &headers, &form.csrf, &id).await?;
    let link = issue_link(&state, &admin, &user, form.key_only).await?;
    show_link(&state, &admin, &headers, &user, link).await
}

/// How long a link just issued stays on its page for the admin who issued it (reloading the
/// page, going back to it); the link itself stays valid for `admin.enrolment_link_ttl`.
const LINK_SHOWN: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Where a link issued for `user` is kept: for this admin session and this user only, so the
/// page of another user never shows it.
fn shown_link_key(admin: &Admin, user: &User, token: &str) -> String {
    format!(
        "admin_link:{}:{}:{token}",
        admin.session.session.public_id, user.id
    )
}

/// A link just issued: to an API client in JSON; to a browser on the user's page through a
/// redirect, so that reloading the page shows the same link again instead of sending the form
/// again, which would issue another and void this one. Kept for that in the ephemeral store,
/// sealed with the master key, for this admin's session only.
async fn show_link(
    state: &AppState,
    admin: &Admin,
    headers: &HeaderMap,
    user: &User,
    link: IssuedLink,
) -> Result<Response, AppError> {
    if crate::http::prefers_json(headers) {
        return Ok(axum::response::IntoResponse::into_response(axum::Json(
            serde_json::json!({
                "user": user.id,
                "enrolment_link": link.url,
                "expires": link.expires,
            }),
        )));
    }
    let token = crate::crypto::random_token(16);
    let key = shown_link_key(admin, user, &token);
    let plain = serde_json::to_vec(&link).map_err(|e| AppError::internal(&e))?;
    let sealed = state
        .master_key
        .seal(&key, &plain)
        .map_err(|e| AppError::internal(&e))?;
    state
        .ephemeral
        .put(
            &key,
            &sealed,
            LINK_SHOWN.min(state.config.admin.enrolment_link_ttl),
        )
        .await?;
    Ok(see_other(&format!(
        "/_portcullis/admin/users/{}?link={token}",
        user.id
    )))
}

/// The link [`show_link`] kept under `token` for this admin, while it is kept.
async fn shown_link(
    state: &AppState,
    admin: &Admin,
    user: &User,
    token: &str,
) -> Result<Option<IssuedLink>, AppError> {
    if token.len() > 64
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Ok(None);
    }
    let key = shown_link_key(admin, user, token);
    let Some(sealed) = state.ephemeral.get(&key).await? else {
        return Ok(None);
    };
    let Ok(plain) = state.master_key.open(&key, &sealed) else {
        return Ok(None);
    };
    let Ok(link) = serde_json::from_slice::<IssuedLink>(&plain) else {
        return Ok(None);
    };
    // Shown only while it still works: not once used, superseded by a newer one or ended by a
    // reset of the factors.
    let live = match link_token_hash(&link.url) {
        Some(hash) => state
            .durable
            .enrolment_link(&hash, state.clock.now())
            .await?
            .is_some(),
        None => false,
    };
    Ok(live.then_some(link))
}

/// The stored hash of an enrolment link's token, from the link.
fn link_token_hash(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let token = url.query_pairs().find(|(k, _)| k == "t")?.1;
    crate::enrolment::token_hash(&token)
}

/// Re-renders a user's page after an in-person key enrolment (used by `keys`).
pub(super) fn key_added(user: &User) -> String {
    format!("/_portcullis/admin/users/{}?notice=key_added", user.id)
}
