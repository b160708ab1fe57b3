//! Devices at sign-in, new-device notices, and the "this wasn't me" link they carry.
//!
//! After every complete sign-in, [`signed_in`] looks for the browser's device cookie. A known,
//! active device of the same user is touched; anything else (no cookie, another user's device, a
//! revoked one) is a new device: a record is created, a fresh device cookie set, an audit event
//! `new_device` written and a notice queued to the owner with a single-use link to report it.
//!
//! `GET /_portcullis/report?t=…` shows what the link will do; only the `POST` acts (mail
//! scanners fetch links), and then every session of the account ends, the device is revoked,
//! password sign-in is locked until an admin unlocks it (`portcullis user unlock`), and the owner
//! gets a confirmation.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::error::AppError;
use super::login::{check_csrf, csrf_token, with_cookies};
use super::pages::{self, render};
use super::{get_cookie, Form, Peer};
use crate::auth::flow::{Client, KnownDevice};
use crate::crypto::{random_token, sha256_hex};
use crate::device::{self, friendly_name, plausible_token};
use crate::state::AppState;
use crate::store::{AuditEvent, Device, DroppedFactors, User};

pub(super) fn cookie_name(state: &AppState) -> &'static str {
    if state.config.is_https() {
        device::COOKIE_HTTPS
    } else {
        device::COOKIE_HTTP
    }
}

/// The host name of `server.public_url`, as mails name the site.
pub(super) fn public_host(state: &AppState) -> &str {
    state
        .config
        .server
        .public_url
        .host_str()
        .unwrap_or_default()
}

fn set_device_cookie(state: &AppState, token: &str) -> String {
    let secure = if state.config.is_https() {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        cookie_name(state),
        device::COOKIE_MAX_AGE_SECS
    )
}

/// The active device whose cookie the browser presents, if any (a revoked device, a malformed
/// or unknown cookie: none).
pub async fn known_device(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<KnownDevice>, AppError> {
    let Some(token) = get_cookie(headers, cookie_name(state)).filter(|t| plausible_token(t)) else {
        return Ok(None);
    };
    Ok(state
        .durable
        .device_by_token(&sha256_hex(token.as_bytes()))
        .await?
        .filter(|d| d.status == "active")
        .map(|d| KnownDevice {
            id: d.id,
            user_id: d.user_id,
            last_ip: d.last_ip,
            user_agent: d.user_agent,
        }))
}

/// Records the device of a complete sign-in; returns its id and the cookies to set (a new
/// device cookie when the browser is not a known device of this user).
///
/// `enrolled_since`: where the sign-in set up the account's first factor, when it began (Unix
/// seconds): a report of it then takes back everything set up since (the account had nothing
/// of the owner's before).
pub async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    (client, enrolled_since): (&Client, Option<i64>),
) -> Result<(String, Vec<String>), AppError> {
    let now = state.clock.now();
    if let Some(d) = known_device(state, headers).await? {
        if d.user_id == user.id {
            state.durable.touch_device(&d.id, now, &client.ip).await?;
            return Ok((d.id, Vec::new()));
        }
    }
    let (id, cookie) = new_device(state, user, client, enrolled_since, None).await?;
    Ok((id, vec![cookie]))
}

/// Records a new device of `user` for this browser, audits it (`new_device`, with `why` beside
/// the device's name where there is more to say) and mails the owner; returns its id and the
/// device cookie to set.
pub(crate) async fn new_device(
    state: &AppState,
    user: &User,
    client: &Client,
    enrolled_since: Option<i64>,
    why: Option<&str>,
) -> Result<(String, String), AppError> {
    let now = state.clock.now();
    let token = random_token(32);
    let device = Device {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user.id.clone(),
        token_hash: sha256_hex(token.as_bytes()),
        name: friendly_name(&client.user_agent),
        user_agent: client.user_agent.clone(),
        binding: "cookie".into(),
        status: "active".into(),
        first_seen: now,
        last_seen: now,
        last_ip: client.ip.clone(),
        remembered_until: None,
        remember_key: None,
    };
    state.durable.create_device(device.clone()).await?;
    let reason = match why {
        Some(why) => format!("{} ({why})", device.name),
        None => device.name.clone(),
    };
    state
        .audit
        .record(
            AuditEvent::new("new_device", "success", now)
                .user(user)
                .reason(&reason)
                .client(&client.ip, &client.user_agent),
        )
        .await;
    notify_new_device(state, user, &device, enrolled_since).await?;
    Ok((device.id, set_device_cookie(state, &token)))
}

/// Queues the new-device notice with its "this wasn't me" link.
async fn notify_new_device(
    state: &AppState,
    user: &User,
    device: &Device,
    enrolled_since: Option<i64>,
) -> Result<(), AppError> {
    let now = state.clock.now();
    let link = state
        .notifier
        .report_link(user, Some(&device.id), enrolled_since)
        .await?;
    let when = crate::notify::utc_text(now);
    let host = public_host(state);
    let body = format!(
        "Your account {email} on {host} was just signed in to from a device it had not been used from before.\n\
         \n\
         When:    {when}\n\
         Device:  {name}\n\
         Address: {ip}\n\
         \n\
         If this was you, there is nothing to do.\n\
         \n\
         If it was NOT you, open this link now. It ends every session of your account, signs that\n\
         device out and forgets it (a later sign-in from it is reported as a new device),\n\
         suspends the security keys and passkeys used or added since that sign-in and locks\n\
         password sign-in until your administrator restores it:\n\
         \n\
         {link}\n\
         \n\
         The link works once and expires in {days}. Whoever signed in had your password and a\n\
         second factor, or one of your passkeys: once access is restored, change your password and\n\
         check your security keys and authenticator app.\n",
        email = user.email,
        name = device.name,
        ip = super::risk::address(state, &device.last_ip),
        days = state.notifier.report_lifetime(),
    );
    state
        .notifier
        .enqueue(
            &user.email,
            &format!("New sign-in to your account on {host}"),
            &body,
        )
        .await?;
    Ok(())
}

/// `GET /_portcullis/report?t=…`: explains what reporting does; the form posts the token.
pub async fn report_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let t = super::query_param(&q, "t").unwrap_or_default();
    if !plausible_token(&t) {
        return Err(invalid_link());
    }
    // A used, expired or unknown link says so at once, not after the owner has confirmed.
    let Some(link) = state
        .durable
        .report_link(&sha256_hex(t.as_bytes()), state.clock.now())
        .await?
    else {
        return Err(invalid_link());
    };
    // The sign-in it reports, described, so that the owner can tell whether it was theirs.
    let device = match &link.device_id {
        Some(id) => state
            .durable
            .list_devices(&link.user_id)
            .await?
            .into_iter()
            .find(|d| &d.id == id)
            .map(|d| pages::ReportedDevice {
                name: d.name,
                first_seen: crate::clock::rfc3339(d.first_seen),
                last_ip: d.last_ip,
            }),
        None => None,
    };
    let (csrf, set) = csrf_token(&state, &headers);
    Ok(with_cookies(
        render(
            StatusCode::OK,
            &pages::Report {
                csrf: &csrf,
                token: &t,
                change: link.device_id.is_none(),
                sent: crate::clock::rfc3339(link.created_at),
                device,
            },
        ),
        set,
    ))
}

#[derive(Deserialize)]
pub struct ReportForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    t: String,
}

fn invalid_link() -> AppError {
    AppError::new(
        StatusCode::GONE,
        "link_invalid",
        "This link is not valid: it was already used, it has expired, or it was copied incompletely. \
         If someone else is using your account, contact your administrator.",
    )
}

/// How long before the reported sign-in's notice a key counts as registered by it: the notice
/// is made when the sign-in completes, and a key registered during enrolment comes just before.
const REPORT_KEY_WINDOW: i64 = 15 * 60;

/// How long before the reported sign-in's notice a key's last use counts as that sign-in's (the
/// notice is made as the sign-in completes, moments after the key's answer).
const REPORT_KEY_USE_SLACK: i64 = 60;

/// How long before a change's report link was made an authenticator app or recovery codes
/// count as set up since: the notice (and its link) is made just after the change, in the same
/// request. A sign-in's link counts from the sign-in itself: from its start where it set up the
/// account's first factor (see [`signed_in`]), else from its completion.
const REPORT_FACTOR_SLACK: i64 = 1;

/// `POST /_portcullis/report`: the owner says a sign-in (or a security change) was not theirs.
pub async fn report_post(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<ReportForm>,
) -> Result<Response, AppError> {
    check_csrf(&state, &headers, &form.csrf)?;
    if !plausible_token(&form.t) {
        return Err(invalid_link());
    }
    let now = state.clock.now();
    let Some(link) = state
        .durable
        .consume_report_link(&sha256_hex(form.t.as_bytes()), now)
        .await?
    else {
        return Err(invalid_link());
    };
    let Some(user) = state.durable.user_by_id(&link.user_id).await? else {
        return Err(invalid_link());
    };
    state.durable.set_locked(&user.id, true).await?;
    state
        .durable
        .void_sessions(&user.id, state.clock.now_millis())
        .await?;
    state.sessions.destroy_all(&user.id).await?;
    // The link came with a new-device notice (a sign-in), or with a change's.
    let sign_in = link.device_id.is_some();
    // Keys registered since the reported sign-in may be the intruder's (a passkey would sign
    // them in again, lock or not): suspended, for an administrator to look at. So is a key
    // used for or since the reported sign-in: a passkey sign-in is reported with the key that
    // made it, the one thing the intruder is known to hold.
    let since = link.created_at.saturating_sub(REPORT_KEY_WINDOW);
    let used_since = link.created_at.saturating_sub(REPORT_KEY_USE_SLACK);
    for key in state.durable.webauthn_credentials(&user.id).await? {
        let used = sign_in && key.last_used_at.is_some_and(|at| at >= used_since);
        if (key.created_at >= since || used) && !key.is_suspended() {
            state
                .durable
                .suspend_webauthn_credential(&key.id, "sign_in_reported", now)
                .await?;
            state
                .audit
                .record(
                    AuditEvent::new("webauthn_suspended", "success", now)
                        .user(&user)
                        .reason(&format!("sign_in_reported: credential {}", key.id)),
                )
                .await;
        }
    }
    // So may an authenticator app or recovery codes set up during or since the sign-in (a
    // sign-in that enrolled the account's first factor counts from its start), or since the
    // change was made (the owner's own are older; a password alone no longer sets up a first
    // factor on an account that had one): removed, and the account then enrols again only
    // through an enrolment link.
    let dropped = state
        .durable
        .drop_factors_since(
            &user.id,
            if sign_in {
                link.created_at
            } else {
                link.created_at.saturating_sub(REPORT_FACTOR_SLACK)
            },
            now,
        )
        .await?;
    if dropped != DroppedFactors::default() {
        state
            .audit
            .record(
                AuditEvent::new("second_factors_dropped", "success", now)
                    .user(&user)
                    .reason(&format!("sign_in_reported: {}", dropped.describe())),
            )
            .await;
    }
    if let Some(device_id) = &link.device_id {
        state.durable.revoke_device(device_id).await?;
        // The reported sign-in's network, country and place are not the owner's: the risk
        // history forgets them, so they count as new again. Best effort: the account is locked
        // and its sessions ended already, which is what the owner asked for.
        let now_ms = state.clock.now_millis();
        let forgotten = match state.durable.list_devices(&user.id).await {
            Ok(devices) => match devices.iter().find(|d| d.id == *device_id) {
                Some(d) => {
                    state
                        .risk
                        .forget_sign_in(&user.id, &d.last_ip, now_ms)
                        .await
                }
                None => Ok(()),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = forgotten {
            tracing::warn!(user = %user.id, error = %e, "could not take a reported sign-in out of the risk history");
        }
    }
    let client = super::client(&state, peer, &headers);
    state
        .audit
        .record(
            AuditEvent::new("sign_in_reported", "success", now)
                .user(&user)
                .reason("owner_reported_not_me")
                .client(&client.ip, &client.user_agent),
        )
        .await;
    let host = public_host(&state);
    state
        .notifier
        .enqueue(
            &user.email,
            &format!("Your account on {host} is locked"),
            &format!(
                "You reported {what} on {email} on {host} as not yours.\n\
                 \n\
                 Every session of the account has ended,{device} security keys added since then\n\
                 are suspended, and password sign-in is locked.{changed}\n\
                 Contact your administrator to restore access, then change your password.\n",
                email = user.email,
                what = if sign_in {
                    "a sign-in"
                } else {
                    "a security change"
                },
                device = if sign_in {
                    " the device that signed in is blocked,"
                } else {
                    ""
                },
                changed = if dropped == DroppedFactors::default() {
                    ""
                } else {
                    "\nAn authenticator app or recovery codes set up since then were removed:\n\
                     your administrator gives you an enrolment link to set them up again."
                }
            ),
        )
        .await?;
    if super::prefers_json(&headers) {
        return Ok(axum::response::IntoResponse::into_response(axum::Json(
            serde_json::json!({
                "reported": if sign_in { "sign_in" } else { "change" },
                "sessions_ended": true,
                "password_sign_in_locked": true,
                "factors_removed": dropped != DroppedFactors::default(),
            }),
        )));
    }
    Ok(render(
        StatusCode::OK,
        &pages::Reported {
            email: &user.email,
            change: !sign_in,
        },
    ))
}
