//! Errors of the web layer. Every error leaves as JSON (`{"error": code, "message": …}`) and,
//! for browsers, is re-rendered as an HTML page by [`render_errors`]. Internal failures become an
//! opaque message with an operation id that is logged — never the failure's own text.

use askama::Template;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use crate::store::StoreError;

/// An error answer.
#[derive(Debug, Clone)]
pub struct AppError {
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human message, safe to show.
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
    /// What a browser can do about it (a same-origin link and its words); the error page shows
    /// it in place of the link to sign in.
    pub action: Option<(String, &'static str)>,
}

/// The message of [`AppError::shed`], by which its answer is told apart.
const SHED_MESSAGE: &str =
    "Too many sign-ins are being checked right now. Please try again in a few seconds.";

/// Marker left on the answer to a sign-in shed because the password hashing queue was full, so
/// it is counted as shed load, not as a store that did not answer.
#[derive(Debug, Clone, Copy)]
pub struct Shed;

/// Marker left on error responses so the HTML renderer can find them.
#[derive(Debug, Clone)]
struct ErrorInfo(AppError);

impl AppError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            action: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A form's or a request's field the gateway does not take (`400 invalid_input`, as every
    /// refusal of what a user typed).
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "There is nothing at this address.",
        )
    }

    pub fn throttled(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                format!(
                    "Too many attempts. Wait {} before trying again.",
                    wait_text(retry_after)
                ),
            )
        }
    }

    /// [`AppError::throttled`] for a sign-in: someone else's attempts may have spent the budget,
    /// which the browser a user has signed in with before does not draw on, on the network it
    /// was last seen on.
    pub fn throttled_sign_in(retry_after: u64) -> Self {
        let mut e = Self::throttled(retry_after);
        e.message = format!(
            "Too many sign-in attempts were made for this account or from this network, not \
             necessarily by you. Wait {} before trying again; a browser you have signed in with \
             before, on the network you signed in from then, is not held back.",
            wait_text(retry_after)
        );
        e
    }

    pub fn unavailable(what: &str) -> Self {
        let op = uuid::Uuid::new_v4();
        tracing::error!(operation = %op, cause = what, "service unavailable");
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("This service is temporarily unavailable. Please try again shortly. (operation {op})"),
            )
        }
    }

    /// A sign-in refused because the password hashing queue is full: load shed on purpose
    /// during a flood, so it is logged at debug level only (a flood would otherwise write an
    /// error line per attempt) and counted apart ([`Shed`]).
    pub fn shed() -> Self {
        tracing::debug!("sign-in shed: password hashing queue full");
        Self {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", SHED_MESSAGE)
        }
    }

    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        let op = uuid::Uuid::new_v4();
        tracing::error!(operation = %op, error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("Something went wrong on our side. (operation {op})"),
        )
    }
}

impl From<StoreError> for AppError {
    /// Storage trouble always fails closed with 503.
    fn from(e: StoreError) -> Self {
        AppError::unavailable(&e.to_string())
    }
}

impl From<crate::auth::flow::FlowError> for AppError {
    fn from(e: crate::auth::flow::FlowError) -> Self {
        use crate::auth::flow::FlowError;
        match e {
            FlowError::Store(s) => s.into(),
            FlowError::Busy => AppError::shed(),
            FlowError::Internal(m) => AppError::internal(&m),
        }
    }
}

impl From<crate::auth::password::PasswordError> for AppError {
    fn from(e: crate::auth::password::PasswordError) -> Self {
        use crate::auth::password::PasswordError;
        match e {
            PasswordError::Busy => AppError::shed(),
            PasswordError::Internal(m) => AppError::internal(&m),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::SERVICE_UNAVAILABLE && self.message == SHED_MESSAGE {
            resp.extensions_mut().insert(Shed);
        }
        resp.extensions_mut().insert(ErrorInfo(self));
        resp
    }
}

/// Whether the client prefers an HTML page (a browser navigation) to JSON.
pub fn wants_html(headers: &HeaderMap) -> bool {
    let (html, json) = qualities(headers);
    // A browser names pages at least as high as JSON; a tie goes to the page.
    html.is_some_and(|h| h > 0 && json.is_none_or(|j| h >= j))
}

/// An API client: asks for JSON (`application/json`, `…+json`) above any page.
pub fn wants_json(headers: &HeaderMap) -> bool {
    let (html, json) = qualities(headers);
    json.is_some_and(|j| j > 0 && html.is_none_or(|h| j > h))
}

/// The highest quality (in thousandths) the `Accept` headers give a page (`text/html`, or
/// `text/*`) and JSON (a media type whose subtype is `json` or ends in `+json`), `None` for one
/// they do not name (`*/*` names neither). Media ranges are case-insensitive; a quality that
/// cannot be read counts as 1.
fn qualities(headers: &HeaderMap) -> (Option<u16>, Option<u16>) {
    let (mut html, mut json) = (None::<u16>, None::<u16>);
    let ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .flat_map(|accept| accept.as_bytes().split(|&b| b == b','));
    for range in ranges {
        let mut parts = range.split(|&b| b == b';');
        let essence = parts.next().unwrap_or_default().trim_ascii();
        let slot = if essence.eq_ignore_ascii_case(b"text/html")
            || essence.eq_ignore_ascii_case(b"text/*")
        {
            &mut html
        } else if is_json(essence) {
            &mut json
        } else {
            continue;
        };
        let Some(q) = parts.find_map(quality).unwrap_or(Some(1000)) else {
            continue;
        };
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    (html, json)
}

/// `application/json`, `application/problem+json`, in any letter case.
fn is_json(essence: &[u8]) -> bool {
    let Some(slash) = essence.iter().position(|&b| b == b'/') else {
        return false;
    };
    let subtype = &essence[slash + 1..];
    subtype.eq_ignore_ascii_case(b"json")
        || (subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// A media-range parameter's quality in thousandths (`q=0.5` is 500): `None` for another
/// parameter, `Some(None)` for a quality that is not one (`q=abc`, `q=1.5`, `q=.5`), whose range
/// is then left out rather than guessed at. Digits past the third decimal are read (and
/// dropped), so `q=0.0000` is a refusal as `q=0` is.
fn quality(param: &[u8]) -> Option<Option<u16>> {
    let value = match param.trim_ascii() {
        [b'q' | b'Q', b'=', value @ ..] => value.trim_ascii(),
        _ => return None,
    };
    let (int, frac) = match value.iter().position(|&b| b == b'.') {
        Some(dot) => (&value[..dot], &value[dot + 1..]),
        None => (value, &[][..]),
    };
    if !frac.iter().all(u8::is_ascii_digit) {
        return Some(None);
    }
    let thousandths = frac
        .iter()
        .chain(std::iter::repeat(&b'0'))
        .take(3)
        .fold(0u16, |q, &d| q * 10 + u16::from(d - b'0'));
    Some(match int {
        [b'0'] => Some(thousandths),
        [b'1'] if thousandths == 0 && frac.iter().all(|&d| d == b'0') => Some(1000),
        _ => None,
    })
}

/// A page's refusal of a form or query (its `message`, shown with `status`) as an API client
/// gets it: the JSON error every other refusal is, with a code for the status. `None` for a
/// browser, which gets the page, and for a page that refuses nothing.
pub fn refusal_for_api(
    headers: &HeaderMap,
    status: StatusCode,
    message: Option<&str>,
) -> Option<AppError> {
    let message = message.filter(|_| status.is_client_error() && !wants_html(headers))?;
    let code = match status.as_u16() {
        400 => "invalid_input",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        _ => "refused",
    };
    Some(AppError::new(status, code, message))
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    status: u16,
    message: &'a str,
    action: Option<(&'a str, &'a str)>,
}

fn title_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 414 | 422 => "That request could not be understood",
        401 => "Please sign in",
        403 => "Not allowed",
        404 => "Not found",
        405 => "Not available this way",
        409 => "Already done",
        410 => "This link is no longer valid",
        415 => "That kind of content is not taken here",
        429 => "Too many attempts",
        502 => "The console is not reachable",
        503 => "Temporarily unavailable",
        504 => "The console did not answer in time",
        _ => "Something went wrong",
    }
}

/// Re-renders an error response as an HTML page when the client is a browser (`html`, from
/// [`wants_html`] on the request); other clients keep the JSON.
pub fn render_errors(html: bool, mut resp: Response) -> Response {
    if !html {
        return resp;
    }
    let Some(ErrorInfo(err)) = resp.extensions_mut().remove::<ErrorInfo>() else {
        return resp;
    };
    let page = ErrorPage {
        title: match err.code {
            "binding_required" | "binding_refresh_required" => "Confirm this browser",
            // A routine confirmation, not a refusal: the page says what to do.
            "step_up_required" => "Confirm it's you",
            // A reload of the held page after its form went, most often: no link was followed.
            "held_form_gone" => "This form is no longer held",
            _ => title_for(err.status),
        },
        status: err.status.as_u16(),
        message: &err.message,
        action: err
            .action
            .as_ref()
            .map(|(href, label)| (href.as_str(), *label))
            // Otherwise: sign in where signing in is the answer; where the console or a store
            // is away for a moment, try again; else back to the start (a signed-in user is not
            // sent to sign in again).
            .or(Some(match err.status.as_u16() {
                401 => ("/_portcullis/login", "Go to sign-in"),
                502..=504 => ("/", "Try again"),
                _ => ("/", "Go to the start page"),
            })),
    };
    let body = page.render().unwrap_or_else(|_| err.message.clone());
    let mut out = (err.status, Html(body)).into_response();
    // Keep every header of the original answer (security headers, cookies, Retry-After,
    // WWW-Authenticate) except those describing the replaced body.
    for (name, value) in resp.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

/// `Retry-After` seconds in words: "up to 15 minutes", "a few seconds".
fn wait_text(secs: u64) -> String {
    match secs {
        0..=9 => "a few seconds".to_string(),
        10..=59 => format!("up to {secs} seconds"),
        60..=119 => "up to a minute or two".to_string(),
        _ => format!("up to {} minutes", secs.div_ceil(60)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static(v));
        h
    }

    /// The error page's way on: sign in only where signing in is the answer.
    #[test]
    fn error_pages_offer_sign_in_only_for_a_401() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let page = |e: AppError| {
            let resp = render_errors(true, e.into_response());
            let bytes = rt
                .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
                .unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        let p = page(AppError::forbidden("admin_only", "For administrators."));
        assert!(
            p.contains(r#"<a href="/">Go to the start page</a>"#) && !p.contains("sign-in"),
            "{p}"
        );
        let p = page(AppError::new(StatusCode::UNAUTHORIZED, "x", "Sign in."));
        assert!(
            p.contains(r#"<a href="/_portcullis/login">Go to sign-in</a>"#),
            "{p}"
        );
        let p = page(AppError::new(StatusCode::METHOD_NOT_ALLOWED, "x", "No."));
        assert!(p.contains("<title>Not available this way"), "{p}");
    }

    #[test]
    fn qualities_are_read_as_rfc_9110_writes_them() {
        for (param, q) in [
            ("q=1", Some(Some(1000))),
            ("q=1.000", Some(Some(1000))),
            ("Q=0.5", Some(Some(500))),
            ("q=0.123456", Some(Some(123))),
            ("q=0", Some(Some(0))),
            ("q=0.0000", Some(Some(0))),
            ("q=1.001", Some(None)),
            ("q=2", Some(None)),
            ("q=-1", Some(None)),
            ("q=", Some(None)),
            ("q=0.5x", Some(None)),
            ("level=1", None),
        ] {
            assert_eq!(quality(param.as_bytes()), q, "{param}");
        }
    }

    #[test]
    fn browsers_are_told_apart_by_their_accept_header() {
        for v in [
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            "TEXT/HTML",
            "application/json;q=0.5, Text/Html ; q=0.5",
            "text/html;q=0.001",
            "application/json;q=0.8,text/html",
            "text/*;q=0.5, application/json;q=0.4",
            "application/json;q=bogus, text/html",
        ] {
            assert!(wants_html(&accept(v)), "{v}");
        }
        for v in [
            "application/json",
            "*/*",
            "text/html;q=0",
            "text/html; Q=0.000, application/json",
            "text/htmlx",
            "application/xhtml+xml",
            "application/json;q=0.9,text/html;q=0.8",
            "application/json, Text/Html ; q=0.5",
            "text/html;q=0.0000, application/json",
            "text/html;q=bogus, application/json",
            "text/html;q=1.5",
            "text/html;q=.5",
            "text/html;q=00.5",
        ] {
            assert!(!wants_html(&accept(v)), "{v}");
        }
        assert!(!wants_html(&HeaderMap::new()));
        // Two `Accept` headers are one list.
        let mut two = accept("application/json;q=0.5");
        two.append(header::ACCEPT, HeaderValue::from_static("text/html"));
        assert!(wants_html(&two));
        let mut two = accept("text/html;q=0.5");
        two.append(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!wants_html(&two) && wants_json(&two));
    }
}
