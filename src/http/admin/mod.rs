//! The admin console at `/_portcullis/admin`: accounts, factors, devices, sessions, enrolment
//! links and the audit trail, for users with the admin role.
//!
//! Every route of [`router`] sits behind [`guard`], so a new route cannot skip it:
//! - no complete session → sign-in page (browsers) or 401;
//! - not an admin → 403;
//! - binding on and no valid device proof → the same answer as the gate's (bind page or 401/403);
//! - no security-key proof within `admin.sudo_timeout` (sudo mode; a session completed with a
//!   code only has none) → the step-up page asking for the key (browser `GET`) or 403
//!   `step_up_required`.
//!
//! Forms carry the CSRF token like every gateway form; the JSON calls of in-person key
//! enrolment carry it in `X-CSRF-Token`. Every change writes an audit event whose `actor` is the
//! admin's email.

mod audit;
mod chart;
mod home;
mod keys;
mod pages;
mod users;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;

use super::error::{wants_html, AppError};
use super::login::{check_csrf, csrf_token, with_cookies};
use super::{see_other, Peer};
use crate::auth::flow::Client;
use crate::session::Loaded;
use crate::state::AppState;
use crate::store::{AuditEvent, User};

/// Prefix of every admin route.
pub const PREFIX: &str = "/_portcullis/admin";

/// Every admin route: method, path and handler. [`router`] is built from this table and the
/// authorisation tests walk it, so a route added here is tested without being listed twice.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<AppState>)> {
    let u = "/_portcullis/admin/users";
    vec![
        (Method::GET, PREFIX, get(home::home_get)),
        (Method::GET, u, get(users::list_get)),
        (Method::POST, u, post(users::create_post)),
        (
            Method::GET,
            "/_portcullis/admin/users/{id}",
            get(users::user_get),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/disable",
            post(users::disable_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/enable",
            post(users::enable_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/unlock",
            post(users::unlock_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/reset-factors",
            post(users::reset_factors_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/sessions/end",
            post(users::end_sessions_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/sessions/{sid}/end",
            post(users::end_session_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/keys/{key}/remove",
            post(users::remove_key_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/keys/{key}/restore",
            post(users::restore_key_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/devices/{device}/revoke",
            post(users::revoke_device_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/enrolment-link",
            post(users::enrolment_link_post),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/keys/register/start",
            post(keys::register_start),
        ),
        (
            Method::POST,
            "/_portcullis/admin/users/{id}/keys/register/finish",
            post(keys::register_finish),
        ),
        (
            Method::GET,
            "/_portcullis/admin/audit",
            get(audit::audit_get),
        ),
        (
            Method::GET,
            "/_portcullis/admin/audit/export",
            get(audit::export_get),
        ),
    ]
}

/// Method and path of every admin route.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The admin routes, all behind [`guard`], and with them the console's wrong methods and its
/// addresses that lead nowhere: to anyone but an admin every address under [`PREFIX`] answers
/// alike, so which ones exist cannot be told from outside (by a `405` or a `404`).
pub fn router(state: AppState) -> Router<AppState> {
    routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .route("/_portcullis/admin/", axum::routing::any(nowhere))
        .route("/_portcullis/admin/{*rest}", axum::routing::any(nowhere))
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(middleware::from_fn_with_state(state, guard))
}

/// An address under [`PREFIX`] that leads nowhere, answered once [`guard`] let the admin by.
async fn nowhere() -> AppError {
    AppError::not_found()
}

/// The admin acting on a request, put in the request by [`guard`].
#[derive(Clone)]
pub struct Admin(Arc<AdminInner>);

pub struct AdminInner {
    pub session: Loaded,
    pub user: User,
    pub client: Client,
}

impl std::ops::Deref for Admin {
    type Target = AdminInner;
    fn deref(&self) -> &AdminInner {
        &self.0
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, AppError> {
        // Only reachable through `guard`; without it, refuse rather than serve.
        parts
            .extensions
            .get::<Admin>()
            .cloned()
            .ok_or_else(|| AppError::forbidden("admin_only", "This page is for administrators."))
    }
}

/// Whether the session's last security-key proof is within the sudo window.
pub fn sudo_fresh(state: &AppState, loaded: &Loaded) -> bool {
    let window = i64::try_from(state.config.admin.sudo_timeout.as_millis()).unwrap_or(0);
    loaded
        .session
        .strong_ms
        .is_some_and(|t| state.clock.now_millis() - t <= window)
}

/// Admits admins with a fresh security-key proof; everyone else gets the answer described in
/// the module docs.
async fn guard(
    State(state): State<AppState>,
    Peer(peer): Peer,
    mut req: Request,
    next: Next,
) -> Response {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| PREFIX.to_string());
    let browser_get = req.method() == Method::GET && wants_html(req.headers());
    match admit(&state, req.headers(), peer).await {
        Ok(Ok(admin)) => {
            // A copied admin cookie gets no further than a copied console cookie. A form's
            // answer links back to the page it was on (gateway pages send no `Referer`); a
            // browser's form stopped for a device proof to renew is held until it is made,
            // then sent (and checked here again).
            let back = (req.method() != Method::GET).then(|| {
                super::gate::referring_gateway_page(&state, req.headers())
                    .filter(|p| p.starts_with(PREFIX))
                    .unwrap_or_else(|| page_of_form(&target))
            });
            let who = (&admin.session, &admin.client, peer);
            let pages = (target.as_str(), back.as_deref());
            let bound =
                super::binding::guard_page_holding(&state, who, req, browser_get, pages).await;
            req = match bound {
                Ok(Ok(req)) => req,
                Ok(Err(refused)) => return refused,
                Err(e) => return e.into_response(),
            };
            if !sudo_fresh(&state, &admin.session) {
                if browser_get {
                    return see_other(&super::reauth::url(&target, true));
                }
                // A browser's form (a reason typed, a user made) is held until the key's touch,
                // then sent (`held`), as the console's forms are.
                let browser = wants_html(req.headers());
                if super::held::holdable(req.method(), req.headers(), browser) {
                    let back = super::gate::referring_gateway_page(&state, req.headers())
                        .filter(|p| p.starts_with(PREFIX))
                        .unwrap_or_else(|| page_of_form(&target));
                    let public_id = admin.session.session.public_id.clone();
                    let form = (target.as_str(), Some(back));
                    match super::held::hold(&state, (&public_id, peer), form, req).await {
                        Ok(Some(held)) => {
                            let mut r = see_other(&super::reauth::url(&held.page, true));
                            if let Ok(v) = axum::http::HeaderValue::from_str(&held.cookie) {
                                r.headers_mut().append(axum::http::header::SET_COOKIE, v);
                            }
                            return r;
                        }
                        Ok(None) => {
                            return super::gate::step_up_answer(
                                axum::http::StatusCode::FORBIDDEN,
                                STALE_FORM,
                                super::reauth::url(&page_of_form(&target), true),
                                "Confirm with your security key",
                            )
                        }
                        Err(e) => return e.into_response(),
                    }
                }
                // A form's address takes no GET: the step-up returns to the page the form was
                // on (else the console's home), and the form is sent again from there.
                let back = if req.method() == Method::GET {
                    target.clone()
                } else {
                    super::gate::referring_gateway_page(&state, req.headers())
                        .filter(|p| p.starts_with(PREFIX))
                        .unwrap_or_else(|| page_of_form(&target))
                };
                return super::gate::step_up_answer(
                    axum::http::StatusCode::FORBIDDEN,
                    STALE_FORM,
                    super::reauth::url(&back, true),
                    "Confirm with your security key",
                );
            }
            req.extensions_mut().insert(admin);
            next.run(req).await
        }
        Ok(Err(Refused::NoSession(notice))) => {
            if browser_get {
                // A session that ended is said so as the console's pages say it; a sign-in
                // under way is not one.
                let login =
                    super::gate::sign_in_location(super::gate::LOGIN_PATH, Some(&target), notice);
                return see_other(&login);
            }
            // A form a browser sent (the session ended in another tab, or ran out): not acted
            // on; after signing in, back to the page the form was on, told it was not sent.
            if wants_html(req.headers()) && req.method() != Method::GET {
                let back = page_of_form(&target);
                let login = super::gate::LOGIN_PATH;
                return see_other(&super::gate::sign_in_location(
                    login,
                    Some(&back),
                    Some("not_sent"),
                ));
            }
            // As the gate answers API clients: the sign-in URL, with the way back for a read.
            let back = (*req.method() == Method::GET).then_some(target.as_str());
            super::gate::refuse(&state, false, super::gate::LOGIN_PATH, (back, None), false)
        }
        Ok(Err(Refused::NotAdmin(user, client))) => {
            let ev = AuditEvent::new("admin_denied", "denied", state.clock.now())
                .user(&user)
                .client(&client.ip, &client.user_agent)
                .reason("not_admin");
            // A signed-in non-admin can ask again and again: one run per user.
            state.audit.record_repeated(user.id.clone(), ev).await;
            AppError::forbidden("admin_only", "This page is for gateway administrators.")
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The page whose form posts to `target`: a user's page for the actions on that user
/// (`…/users/{id}/…`), the user list for a new user, else the console's home. (The gateway's
/// pages send no `Referer`.)
pub(crate) fn page_of_form(target: &str) -> String {
    let path = target.split('?').next().unwrap_or_default();
    let users = format!("{PREFIX}/users");
    match path.strip_prefix(&format!("{users}/")) {
        Some(rest) => match rest.split_once('/') {
            Some((id, _)) if !id.is_empty() => format!("{users}/{id}"),
            _ => users,
        },
        None if path == users => users,
        None => PREFIX.to_string(),
    }
}

enum Refused {
    /// No complete session, with what its sign-in page says (see `login::signed_in_user`).
    NoSession(Option<&'static str>),
    NotAdmin(Box<User>, Client),
}

async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
) -> Result<Result<Admin, Refused>, AppError> {
    let (loaded, user) = match super::login::signed_in_user(state, headers).await? {
        Ok(found) => found,
        Err(notice) => return Ok(Err(Refused::NoSession(notice))),
    };
    let client = super::client(state, peer, headers);
    if !user.is_admin {
        return Ok(Err(Refused::NotAdmin(Box::new(user), client)));
    }
    Ok(Ok(Admin(Arc::new(AdminInner {
        session: loaded,
        user,
        client,
    }))))
}

/// Records an admin action: `target` is the user acted on, the actor is the admin.
async fn record(state: &AppState, admin: &Admin, event: &str, target: Option<&User>, reason: &str) {
    let mut ev = AuditEvent::new(event, "success", state.clock.now())
        .actor(&admin.user.email)
        .client(&admin.client.ip, &admin.client.user_agent)
        .reason(reason);
    if let Some(u) = target {
        ev = ev.user(u);
    }
    state.audit.record(ev).await;
}

/// The page's CSRF token and the cookie to set with it.
fn csrf(state: &AppState, headers: &HeaderMap) -> (String, Option<String>) {
    csrf_token(state, headers)
}

/// Checks a form's CSRF token.
fn checked(state: &AppState, headers: &HeaderMap, token: &str) -> Result<(), AppError> {
    check_csrf(state, headers, token)
}

/// Renders an admin page with the CSRF cookie when one was issued.
fn respond(resp: Response, set: Option<String>) -> Response {
    with_cookies(resp, set)
}

/// A request past the sudo window that is not held (an API client's, a form too large).
const STALE_FORM: &str = "The admin console needs a recent touch of your security key. Confirm \
                          it's you, then send it again: it was not sent.";

/// RFC 3339 time for pages.
fn when(t: i64) -> String {
    crate::clock::rfc3339(t)
}

#[cfg(test)]
mod tests {
    use super::page_of_form;

    #[test]
    fn a_form_returns_to_the_page_it_is_on() {
        for (target, page) in [
            (
                "/_portcullis/admin/users/u-1/disable",
                "/_portcullis/admin/users/u-1",
            ),
            (
                "/_portcullis/admin/users/u-1/sessions/s-9/end",
                "/_portcullis/admin/users/u-1",
            ),
            ("/_portcullis/admin/users", "/_portcullis/admin/users"),
            ("/_portcullis/admin/users?q=a", "/_portcullis/admin/users"),
            ("/_portcullis/admin/users/", "/_portcullis/admin/users"),
            ("/_portcullis/admin/audit", "/_portcullis/admin"),
        ] {
            assert_eq!(page_of_form(target), page, "{target}");
        }
    }
}
