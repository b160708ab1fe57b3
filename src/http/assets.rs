//! Static files, embedded in the binary so the gateway is one file to deploy.

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::error::AppError;

const CSS: &str = include_str!("../../static/portcullis.css");
const JS: &str = include_str!("../../static/portcullis.js");
const WEBAUTHN_JS: &str = include_str!("../../static/webauthn.js");
const ICON: &str = include_str!("../../static/favicon.svg");

/// `GET /_portcullis/static/{file}`.
pub async fn asset(Path(file): Path<String>) -> Response {
    let (body, ctype) = match file.as_str() {
        "portcullis.css" => (CSS, "text/css; charset=utf-8"),
        "portcullis.js" => (JS, "text/javascript; charset=utf-8"),
        "webauthn.js" => (WEBAUTHN_JS, "text/javascript; charset=utf-8"),
        "favicon.svg" => (ICON, "image/svg+xml"),
        _ => return AppError::not_found().into_response(),
    };
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}
