//! The audit view: filter by user, account, event and time range; export the same filter as
//! JSON lines (one event object per line, oldest first, streamed page by page).

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::pages::{self, EventRow};
use super::users::event_row;
use super::{record, respond, Admin};
use crate::http::error::{refusal_for_api, AppError};
use crate::http::pages::render;
use crate::state::AppState;
use crate::store::AuditQuery;

/// Events shown on the page.
const SHOWN: u32 = 500;
/// Events read per page of an export.
const EXPORT_PAGE: u32 = 1000;

/// The filter as typed, and the store query it means.
struct Filter {
    user: String,
    account: String,
    event: String,
    since: String,
    until: String,
}

fn field(raw: &Option<String>, name: &str, max: usize) -> String {
    crate::http::query_param(raw, name)
        .map(|v| v.trim().chars().take(max).collect())
        .unwrap_or_default()
}

/// Where a bound given as a date falls: `From` a date is its first second, `Until` a date takes
/// that whole day in.
#[derive(Clone, Copy)]
enum Bound {
    From,
    Until,
}

/// A time from the filter: RFC 3339 (`2026-11-27T08:00:00Z`) or a date (`2026-11-27`, UTC: from
/// its midnight, or until the next). Empty means no bound.
fn parse_time(s: &str, bound: Bound) -> Result<Option<i64>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    let name = match bound {
        Bound::From => "From",
        Bound::Until => "Until",
    };
    let date = s.len() == 10;
    let full = if date {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    let day = if date && matches!(bound, Bound::Until) {
        86_400
    } else {
        0
    };
    OffsetDateTime::parse(&full, &Rfc3339)
        .map(|t| Some(t.unix_timestamp() + day))
        .map_err(|_| {
            format!("“{name}” must be a date like 2026-11-27 or a time like 2026-11-27T08:00:00Z.")
        })
}

impl Filter {
    fn from_query(raw: &Option<String>) -> Self {
        Self {
            user: field(raw, "user", 320),
            account: field(raw, "account", 128),
            event: field(raw, "event", 64),
            since: field(raw, "since", 40),
            until: field(raw, "until", 40),
        }
    }

    /// The store query, with the user given by address or id (an address is looked up).
    async fn query(&self, state: &AppState) -> Result<AuditQuery, String> {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let since = parse_time(&self.since, Bound::From)?;
        let until = parse_time(&self.until, Bound::Until)?;
        if let (Some(s), Some(u)) = (since, until) {
            if s >= u {
                return Err("“From” must be before “Until”.".to_string());
            }
        }
        // Text columns refuse a NUL: said here, not as a database failure.
        if [&self.user, &self.account, &self.event]
            .iter()
            .any(|f| f.chars().any(char::is_control))
        {
            return Err("The filter holds a character that is not allowed.".into());
        }
        let mut by_email = None;
        let user_id = if self.user.contains('@') {
            let email = crate::store::normalise_email(&self.user);
            match state.durable.user_by_email(&email).await {
                Ok(Some(u)) => Some(u.id),
                // Attempts on an address no user has are kept under the address typed.
                Ok(None) => {
                    by_email = Some(email);
                    None
                }
                Err(e) => return Err(format!("The users could not be read: {e}")),
            }
        } else if self.user.is_empty() {
            None
        } else {
            // Users are never deleted: an id no user has matches no event, and is a typo.
            match state.durable.user_by_id(&self.user).await {
                Ok(Some(u)) => Some(u.id),
                Ok(None) => {
                    return Err(format!(
                        "No user has the id {}. The user filter takes a user's address or id.",
                        self.user
                    ))
                }
                Err(e) => return Err(format!("The users could not be read: {e}")),
            }
        };
        Ok(AuditQuery {
            user_id,
            email: by_email,
            event: opt(&self.event),
            account_id: opt(&self.account),
            since,
            until,
            ..AuditQuery::default()
        })
    }

    fn query_string(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("user", &self.user)
            .append_pair("account", &self.account)
            .append_pair("event", &self.event)
            .append_pair("since", &self.since)
            .append_pair("until", &self.until)
            .finish()
    }
}

/// `GET /_portcullis/admin/audit?user=&account=&event=&since=&until=`.
pub async fn audit_get(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let filter = Filter::from_query(&q);
    let (rows, truncated, error, status) = match filter.query(&state).await {
        Ok(mut query) => {
            query.newest_first = true;
            query.limit = SHOWN + 1;
            let mut found = state.durable.query_audit(&query).await?;
            let truncated = found.len() > SHOWN as usize;
            found.truncate(SHOWN as usize);
            let rows: Vec<EventRow> = found.into_iter().map(event_row).collect();
            (rows, truncated, None, StatusCode::OK)
        }
        Err(msg) => (Vec::new(), false, Some(msg), StatusCode::BAD_REQUEST),
    };
    if let Some(refused) = refusal_for_api(&headers, status, error.as_deref()) {
        return Err(refused);
    }
    let (_, set) = super::csrf(&state, &headers);
    let page = pages::Audit {
        admin: &admin.user.email,
        user: &filter.user,
        account: &filter.account,
        event: &filter.event,
        since: &filter.since,
        until: &filter.until,
        rows: &rows,
        truncated,
        export_query: &filter.query_string(),
        error: error.as_deref(),
    };
    Ok(respond(render(status, &page), set))
}

/// `GET /_portcullis/admin/audit/export?…`: every matching event as JSON lines.
pub async fn export_get(
    State(state): State<AppState>,
    admin: Admin,
    RawQuery(q): RawQuery,
) -> Result<Response, AppError> {
    let filter = Filter::from_query(&q);
    let base = filter
        .query(&state)
        .await
        .map_err(|m| AppError::new(StatusCode::BAD_REQUEST, "invalid_input", m))?;
    record(
        &state,
        &admin,
        "audit_exported",
        None,
        &filter.query_string(),
    )
    .await;
    let durable = state.durable.clone();
    // Pages oldest first by id; each page continues after the last id seen.
    let pages = futures_util::stream::unfold(Some(0i64), move |after| {
        let durable = durable.clone();
        let mut query = base.clone();
        async move {
            let after = after?;
            query.after_id = Some(after);
            query.limit = EXPORT_PAGE;
            match durable.query_audit(&query).await {
                Ok(events) if events.is_empty() => None,
                Ok(events) => {
                    let last = events.last().map(|e| e.id).unwrap_or(after);
                    let mut chunk = Vec::new();
                    for e in &events {
                        if serde_json::to_writer(&mut chunk, e).is_ok() {
                            chunk.push(b'\n');
                        }
                    }
                    let next = (events.len() == EXPORT_PAGE as usize).then_some(last);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)), next))
                }
                Err(e) => {
                    // The response has started: end it with an error so the download fails
                    // visibly instead of looking complete.
                    tracing::error!(error = %e, "audit export interrupted");
                    Some((Err(std::io::Error::other("audit export interrupted")), None))
                }
            }
        }
    });
    let mut resp = Body::from_stream(pages).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"portcullis-audit.jsonl\""),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::{parse_time, Bound};

    #[test]
    fn times_parse_as_rfc3339_or_dates_and_refuse_garbage() {
        assert_eq!(parse_time("", Bound::From), Ok(None));
        assert_eq!(parse_time("1970-01-02", Bound::From), Ok(Some(86_400)));
        assert_eq!(
            parse_time("1970-01-01T01:00:00Z", Bound::From),
            Ok(Some(3_600))
        );
        assert_eq!(
            parse_time("1970-01-01T02:00:00+01:00", Bound::Until),
            Ok(Some(3_600))
        );
        assert!(parse_time("yesterday", Bound::From)
            .unwrap_err()
            .contains("From"));
        assert!(parse_time("2026-13-45", Bound::Until)
            .unwrap_err()
            .contains("Until"));
    }

    /// "Until 2026-11-27" takes in the whole of that day; "From" and "Until" the same date is
    /// that one day.
    #[test]
    fn until_a_date_takes_that_day_in() {
        assert_eq!(parse_time("1970-01-02", Bound::Until), Ok(Some(2 * 86_400)));
        let from = parse_time("1970-01-02", Bound::From).unwrap().unwrap();
        let until = parse_time("1970-01-02", Bound::Until).unwrap().unwrap();
        assert_eq!(until - from, 86_400);
    }
}
