//! CSRF defence for every gateway form: a random value in an HttpOnly cookie, a form token that is
//! its MAC under a key derived from the master key, and an Origin (or Referer) check. A forged
//! cross-site post has neither the cookie value's MAC nor our origin.

use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::error::AppError;
use super::get_cookie;
use crate::crypto::{ct_eq, random_token, MasterKey};

/// Cookie names; `__Host-` where the deployment is HTTPS.
pub const COOKIE_HTTPS: &str = "__Host-portcullis-csrf";
pub const COOKIE_HTTP: &str = "portcullis-csrf";

/// The CSRF cookie name for this deployment.
pub fn cookie_name(https: bool) -> &'static str {
    if https {
        COOKIE_HTTPS
    } else {
        COOKIE_HTTP
    }
}

/// The form token and, when the browser has no CSRF cookie yet, the `Set-Cookie` to send.
pub fn issue(headers: &HeaderMap, key: &MasterKey, https: bool) -> (String, Option<String>) {
    let name = cookie_name(https);
    let existing = get_cookie(headers, name).filter(|v| v.len() == 43);
    let (value, set) = match existing {
        Some(v) => (v.to_string(), None),
        None => {
            let (v, set) = new_cookie(https);
            (v, Some(set))
        }
    };
    (token_for(&value, key), set)
}

/// A new random cookie value and its `Set-Cookie`.
fn new_cookie(https: bool) -> (String, String) {
    let name = cookie_name(https);
    let v = random_token(32);
    let secure = if https { "; Secure" } else { "" };
    let set = format!("{name}={v}; Path=/; HttpOnly; SameSite=Strict{secure}");
    (v, set)
}

/// The `Set-Cookie` of a new CSRF cookie, sent when a sign-in completes: form tokens known
/// from before (an earlier session of the browser, a copied cookie jar) are none for the new
/// session. Pages opened before it ask to be reloaded.
pub fn renewed(https: bool) -> String {
    new_cookie(https).1
}

fn token_for(cookie_value: &str, key: &MasterKey) -> String {
    URL_SAFE_NO_PAD.encode(key.csrf_mac(cookie_value.as_bytes()))
}

/// Whether the request came from the gateway's own pages as far as the browser says (`Origin`,
/// else `Referer`, and `Sec-Fetch-Site`): what [`verify`] checks before the token.
pub fn from_our_pages(headers: &HeaderMap, public_origin: &str) -> bool {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let origin_ok = match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        // Our pages send `Referrer-Policy: no-referrer`, under which browsers post forms with
        // `Origin: null`; such a post is ours only if the browser also vouches for it with
        // `Sec-Fetch-Site: same-origin` (which no cross-site page can forge).
        Some("null") => fetch_site == Some("same-origin"),
        Some(o) => o == public_origin,
        None => match headers.get(header::REFERER).and_then(|v| v.to_str().ok()) {
            Some(r) => r == public_origin || r.starts_with(&format!("{public_origin}/")),
            None => true,
        },
    };
    let fetch_site_ok = fetch_site.is_none_or(|s| matches!(s, "same-origin" | "none"));
    origin_ok && fetch_site_ok
}

/// Checks a submitted form token against the cookie and the request's origin.
pub fn verify(
    headers: &HeaderMap,
    submitted: &str,
    key: &MasterKey,
    https: bool,
    public_origin: &str,
) -> Result<(), AppError> {
    if !from_our_pages(headers, public_origin) {
        return Err(AppError::forbidden(
            "csrf",
            "This form was submitted from another site. Go back, reload the page and try again.",
        ));
    }
    let Some(cookie) = get_cookie(headers, cookie_name(https)) else {
        return Err(AppError::forbidden("csrf", "Your browser did not send the form's security cookie. Enable cookies, reload the page and try again."));
    };
    if submitted.is_empty() {
        return Err(AppError::forbidden(
            "csrf",
            "This request carries no form token (the `csrf` field of a form, the `X-CSRF-Token` \
             header of a script's request): send it from the gateway's page, which holds one.",
        ));
    }
    if !ct_eq(token_for(cookie, key).as_bytes(), submitted.as_bytes()) {
        return Err(AppError::forbidden(
            "csrf",
            "This form is out of date: its page was loaded before this browser's latest \
             sign-in (or before its cookies were cleared). Go back to that page with your \
             browser's Back button (what you typed is kept) or open it again, and send the \
             form again.",
        ));
    }
    Ok(())
}
