//! Home: open alerts (possibly cloned keys, locked accounts, reported sign-ins) and charts of
//! sign-ins, failures and denials over the last 24 hours and 7 days.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::chart::{self, Bucket};
use super::pages::{self, Alert};
use super::{respond, when, Admin};
use crate::http::error::AppError;
use crate::http::pages::render;
use crate::state::AppState;
use crate::store::AuditQuery;

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;
/// Alerts of one kind listed at most (the users page finds the rest).
const ALERTS_LISTED: u32 = 200;
/// Reports read to tell when locked accounts were locked.
const LOCK_REPORTS_READ: u32 = 5000;
/// Reported sign-ins stay on the home page this long.
const REPORTS_SHOWN: i64 = 7 * DAY;
/// The administrators' actions that close a reported sign-in's alert.
const HANDLING: [&str; 3] = ["user_unlocked", "second_factors_reset", "sessions_ended"];

fn sums(b: &[Bucket]) -> (i64, i64, i64) {
    let t = chart::totals(b);
    (t.sign_ins, t.failures, t.denials)
}

/// `GET /_portcullis/admin`.
pub async fn home_get(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let now = state.clock.now();
    let d = &state.durable;
    let mut emails: std::collections::HashMap<String, String> = Default::default();
    let mut alerts = Vec::new();
    for c in d.suspended_webauthn_credentials().await? {
        let (kind, what) = match c.suspended_reason.as_deref() {
            Some("possible_clone") => (
                "possible_clone",
                format!(
                    "Possibly cloned security key (added {}; its counter went backwards)",
                    when(c.created_at)
                ),
            ),
            Some("sign_in_reported") => (
                "suspended",
                format!(
                    "Security key suspended by a report (added {}: at most 15 minutes before, or \
                 after, a sign-in the owner reported as not theirs; restore it if it is the \
                 owner's)",
                    when(c.created_at)
                ),
            ),
            _ => ("suspended", "Suspended security key".to_string()),
        };
        let email = match emails.get(&c.user_id) {
            Some(e) => e.clone(),
            None => {
                let e = d
                    .user_by_id(&c.user_id)
                    .await?
                    .map(|u| u.email)
                    .unwrap_or_else(|| c.user_id.clone());
                emails.insert(c.user_id.clone(), e.clone());
                e
            }
        };
        alerts.push(Alert {
            kind,
            text: format!("{what}: “{}”", c.name),
            email,
            user_id: c.user_id,
            at: c.suspended_at.map(when).unwrap_or_default(),
        });
    }
    let reports = d
        .query_audit(&AuditQuery {
            event: Some("sign_in_reported".into()),
            since: Some(now - REPORTS_SHOWN),
            newest_first: true,
            limit: ALERTS_LISTED,
            ..AuditQuery::default()
        })
        .await?;
    // A report an administrator has since acted on (unlocked the account, reset its factors,
    // ended its sessions) is no longer open.
    let handled = match reports.is_empty() {
        true => Vec::new(),
        false => {
            let mut acts = Vec::new();
            for event in HANDLING {
                acts.extend(
                    d.query_audit(&AuditQuery {
                        event: Some(event.into()),
                        since: Some(now - REPORTS_SHOWN),
                        limit: ALERTS_LISTED,
                        ..AuditQuery::default()
                    })
                    .await?,
                );
            }
            acts
        }
    };
    for e in &reports {
        let Some(user_id) = &e.user_id else { continue };
        if handled
            .iter()
            .any(|a| a.user_id.as_ref() == Some(user_id) && a.at >= e.at)
        {
            continue;
        }
        alerts.push(Alert {
            kind: "reported",
            text: "A sign-in was reported as not the owner's".into(),
            email: e.email.clone().unwrap_or_else(|| user_id.clone()),
            user_id: user_id.clone(),
            at: when(e.at),
        });
    }

    let locked = d.locked_users(ALERTS_LISTED).await?;
    if !locked.is_empty() {
        // When each was locked: the newest report of the account, from one read of the reports
        // (older than the week the alerts above cover too).
        let all_reports = d
            .query_audit(&AuditQuery {
                event: Some("sign_in_reported".into()),
                newest_first: true,
                limit: LOCK_REPORTS_READ,
                ..AuditQuery::default()
            })
            .await?;
        for u in locked {
            let reported = all_reports
                .iter()
                .find(|e| e.user_id.as_ref() == Some(&u.id))
                .map(|e| e.at);
            alerts.push(Alert {
                kind: "locked",
                text: "Password sign-in locked".into(),
                user_id: u.id,
                email: u.email,
                at: reported.map(when).unwrap_or_default(),
            });
        }
    }
    let day_counts = d.audit_counts(now - DAY, HOUR).await?;
    let day = chart::buckets(&day_counts, now, HOUR, 24);
    let week_width = 6 * HOUR;
    let week_counts = d.audit_counts(now - 7 * DAY, week_width).await?;
    let week = chart::buckets(&week_counts, now, week_width, 28);
    let day_svg = chart::svg(
        "Sign-ins, failures and denials per hour, last 24 hours",
        &day,
        chart::hour_label,
    );
    let week_svg = chart::svg(
        "Sign-ins, failures and denials per 6 hours, last 7 days",
        &week,
        chart::date_label,
    );
    let (_, set) = super::csrf(&state, &headers);
    let page = pages::Home {
        admin: &admin.user.email,
        alerts: &alerts,
        day_svg: &day_svg,
        week_svg: &week_svg,
        day: sums(&day),
        week: sums(&week),
        users: d.count_users().await?,
    };
    Ok(respond(render(StatusCode::OK, &page), set))
}
