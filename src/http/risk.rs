//! The risk engine ([`crate::risk`]) where the web layer decides: after a right password (what
//! the second factor must be), at a complete sign-in (what the account's history learns), and at
//! a session's device proof (whether the session moved impossibly far since its last one).

use super::error::AppError;
use crate::auth::flow::Client;
use crate::config::HighRiskFactor;
use crate::risk::{Assessment, Level};
use crate::session::{Loaded, Session};
use crate::state::AppState;
use crate::store::{AuditEvent, User};

/// Scores a sign-in of `user` whose password was right, and sets what the score asks of it: at
/// high risk an account with a usable security key must use it (`risk.high_risk_factor`), and
/// the owner is told (at most once an hour). Audited when any signal fired.
pub(super) async fn at_password(
    state: &AppState,
    user: &User,
    client: &Client,
    device_known: bool,
    session: &mut Session,
) -> Result<Assessment, AppError> {
    let now = state.clock.now_millis();
    let a = state
        .risk
        .assess_sign_in(&user.id, &client.ip, device_known, now)
        .await?;
    state.metrics.risk("sign_in", a.level);
    // Only where keys can be used here (WebAuthn on, at a domain): asking for one elsewhere
    // would lock the owner out.
    if a.level >= Level::High {
        session.risk_key = key_required(state, &user.id).await?;
    }
    if !a.signals.is_empty() {
        let ev = AuditEvent::new("risk_assessed", a.level.as_str(), state.clock.now())
            .user(user)
            .reason(&a.summary())
            .client(&client.ip, &client.user_agent);
        state.audit.record(ev).await;
    }
    if a.level >= Level::High && state.risk.may_notify(&user.id, "sign_in").await? {
        notify_sign_in(state, user, client, &a, session.risk_key).await;
    }
    Ok(a)
}

/// Whether a high-risk sign-in (or a held session) of `user_id` must be confirmed with a key:
/// `risk.high_risk_factor = "key"`, keys work here (WebAuthn on, at a domain) and the account
/// has a usable one. Asking for one elsewhere would lock the owner out.
async fn key_required(state: &AppState, user_id: &str) -> Result<bool, AppError> {
    if state.config.risk.high_risk_factor != HighRiskFactor::Key {
        return Ok(false);
    }
    Ok(match &state.keys {
        Some(keys) => keys.has_usable(user_id).await?,
        None => false,
    })
}

/// A complete sign-in of `user` from `client`: the account's history learns its network,
/// country and place, and the session keeps the place as its first fix. Best effort: the factor
/// is spent by now, and a history that missed this sign-in only asks for more at the next one.
pub(super) async fn at_completion(
    state: &AppState,
    user: &User,
    client: &Client,
    session: &mut Session,
) {
    let now = state.clock.now_millis();
    let place = state.risk.place(&client.ip);
    // Where the session starts: here, or — where the database cannot place this address
    // closely — where the account was last placed, so a session that starts somewhere
    // unlocated still has a place to be measured from.
    session.fix = match state
        .risk
        .record_sign_in(&user.id, &client.ip, place.as_ref(), now)
        .await
    {
        Ok(last) => state.risk.fix_at(&client.ip, now).or(last),
        Err(e) => {
            tracing::warn!(user = %user.id, error = %e, "could not record the sign-in in the risk history");
            state.risk.fix_at(&client.ip, now)
        }
    };
}

/// A second factor given from `client` (step-up): once it lifts the session's hold (see
/// [`Session::held`]), the session's place is where it was given.
pub(super) fn after_second_factor(state: &AppState, client: &Client, session: &mut Session) {
    if session.held() {
        return;
    }
    let now = state.clock.now_millis();
    if let Some(fix) = state.risk.fix_at(&client.ip, now) {
        session.fix = Some(fix);
    }
}

/// An address as pages and mails show it: with its place when the GeoIP database knows it
/// ("203.0.113.9 (Sydney, AU)").
pub(crate) fn address(state: &AppState, ip: &str) -> String {
    match state.risk.place(ip) {
        Some(p) => format!("{ip} ({})", p.describe()),
        None => ip.to_string(),
    }
}

/// The session's device key has just proven itself from `client`: keeps the new fix and where
/// the proof came from ([`Session::proof_context`]), and when
/// the session could not have travelled there since its last proof, holds it until a second
/// factor (audit `session_risk`, the owner told at most once an hour). `loaded` is left as
/// stored, so a caller that saves it again keeps what was written here.
pub(super) async fn after_proof(
    state: &AppState,
    loaded: &mut Loaded,
    client: &Client,
) -> Result<(), AppError> {
    let now = state.clock.now_millis();
    let s = &loaded.session;
    let (fix, risky) = state.risk.assess_move(s.fix.as_ref(), &client.ip, now);
    // Only a high score holds (so raising `risk.high_score` switches holds off too).
    let risky = risky.filter(|a| a.level >= Level::High);
    // Where the key proved itself: forms are held for its next proof only from there.
    let here = hex::encode(super::binding::context_of_client(state, client));
    if fix == s.fix && risky.is_none() && s.proof_context.as_deref() == Some(here.as_str()) {
        return Ok(());
    }
    let mut session = s.clone();
    session.fix = fix;
    session.proof_context = Some(here);
    if risky.is_some() {
        session.risk_hold_ms = Some(now);
        // As a high-risk sign-in of the account would: its key, where it has one.
        session.risk_hold_key = key_required(state, &s.user_id).await?;
    }
    if !state.sessions.update(&loaded.key, &session).await? {
        // Ended meanwhile: nothing left to hold.
        return Ok(());
    }
    let s = std::mem::replace(&mut loaded.session, session);
    if let Some(a) = &risky {
        state.metrics.risk("session", a.level);
        let user = state.durable.user_by_id(&s.user_id).await?;
        let ev = AuditEvent::new("session_risk", "denied", state.clock.now())
            .reason(&a.summary())
            .client(&client.ip, &client.user_agent);
        let ev = match &user {
            Some(u) => ev.user(u),
            None => AuditEvent {
                user_id: Some(s.user_id.clone()),
                ..ev
            },
        };
        state.audit.record(ev).await;
        if let Some(u) = user {
            if state.risk.may_notify(&u.id, "session").await? {
                notify_session(state, &u, client, a).await;
            }
        }
    }
    Ok(())
}

fn when(state: &AppState) -> String {
    crate::clock::rfc3339(state.clock.now())
}

fn place_of(a: &Assessment) -> String {
    a.place
        .as_ref()
        .map(|p| format!(" ({})", p.describe()))
        .unwrap_or_default()
}

fn reasons(a: &Assessment) -> String {
    a.signals
        .iter()
        .map(|s| format!("  - {}\n", s.explain()))
        .collect()
}

/// Tells the owner their password was just entered in a sign-in that looks unusual. A queueing
/// failure is logged: the sign-in is refused or allowed on its own merits, never for mail.
async fn notify_sign_in(
    state: &AppState,
    user: &User,
    client: &Client,
    a: &Assessment,
    key_only: bool,
) {
    let site = super::devices::public_host(state);
    let factor = if key_only {
        "your security key or passkey (a code from your app will not do for this one)"
    } else {
        "your second factor"
    };
    let mut account = state.config.server.public_url.clone();
    account.set_path("/_portcullis/account");
    let body = format!(
        "Someone just entered the right password for your account {email} on {site}, from:\n\
         \n\
         {reasons}\
         \n\
         When:    {when} (UTC)\n\
         Address: {ip}{place}\n\
         Browser: {browser}\n\
         \n\
         The sign-in cannot go on without {factor}. If this was you, there is nothing to do.\n\
         \n\
         If it was NOT you, someone knows your password. Change it now on your account page\n\
         ({account}) and tell your administrator.\n",
        email = user.email,
        reasons = reasons(a),
        when = when(state),
        ip = client.ip,
        place = place_of(a),
        browser = crate::device::friendly_name(&client.user_agent),
    );
    let subject = format!("Unusual sign-in to your account on {site}");
    if let Err(e) = state.notifier.enqueue(&user.email, &subject, &body).await {
        tracing::warn!(error = %e, "could not queue an unusual sign-in notice");
    }
}

/// Tells the owner a session of theirs was held after proving itself from far away.
async fn notify_session(state: &AppState, user: &User, client: &Client, a: &Assessment) {
    let site = super::devices::public_host(state);
    let mut account = state.config.server.public_url.clone();
    account.set_path("/_portcullis/account");
    let body = format!(
        "A signed-in session of your account {email} on {site} was just used from:\n\
         \n\
         {reasons}\
         \n\
         When:    {when} (UTC)\n\
         Address: {ip}{place}\n\
         \n\
         Until your second factor is confirmed again, that session cannot reach the console.\n\
         If this was you (a VPN or a proxy can make it look so), confirm it when asked.\n\
         \n\
         If it was NOT you, confirm your second factor in your own browser, then sign out your\n\
         other devices on your account page ({account}), change your password and tell your\n\
         administrator.\n",
        email = user.email,
        reasons = reasons(a),
        when = when(state),
        ip = client.ip,
        place = place_of(a),
    );
    let subject = format!("A session of your account on {site} moved too far, too fast");
    if let Err(e) = state.notifier.enqueue(&user.email, &subject, &body).await {
        tracing::warn!(error = %e, "could not queue a session risk notice");
    }
}
