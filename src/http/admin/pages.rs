//! Askama page types of the admin console.

use askama::Template;

pub use crate::http::pages::KeyRow;

/// An alert on the home page.
pub struct Alert {
    /// `possible_clone`, `locked` or `reported`.
    pub kind: &'static str,
    pub text: String,
    pub user_id: String,
    pub email: String,
    pub at: String,
}

#[derive(Template)]
#[template(path = "admin/home.html")]
pub struct Home<'a> {
    pub admin: &'a str,
    pub alerts: &'a [Alert],
    pub day_svg: &'a str,
    pub week_svg: &'a str,
    /// (sign-ins, failures, denials) over the last 24 hours and 7 days.
    pub day: (i64, i64, i64),
    pub week: (i64, i64, i64),
    pub users: i64,
}

/// A row of the users list.
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub account: String,
    pub admin: bool,
    pub disabled: bool,
    pub locked: bool,
}

#[derive(Template)]
#[template(path = "admin/users.html")]
pub struct Users<'a> {
    pub admin: &'a str,
    pub csrf: &'a str,
    pub q: &'a str,
    pub rows: &'a [UserRow],
    /// More matched than shown.
    pub truncated: bool,
    pub error: Option<&'a str>,
    /// The "create a user" form as it was sent, when it was refused (its error is `error`).
    pub draft: Option<&'a NewUserDraft>,
}

/// The "create a user" form's fields, kept when the form is refused so nothing is typed twice.
pub struct NewUserDraft {
    pub email: String,
    pub account: String,
    pub admin: bool,
}

pub struct DeviceRow {
    pub id: String,
    pub name: String,
    pub first_seen: String,
    pub last_seen: String,
    pub last_ip: String,
    pub binding: &'static str,
    pub active: bool,
}

pub struct SessionRow {
    pub id: String,
    pub started: String,
    pub last_seen: String,
    pub ip: String,
    pub agent: String,
    pub methods: String,
}

pub struct EventRow {
    pub at: String,
    pub event: String,
    pub outcome: String,
    pub email: String,
    pub account: String,
    pub ip: String,
    pub reason: String,
    pub actor: String,
    /// 1, or how many repeated refusals a summary row stands for.
    pub times: i64,
}

/// A freshly issued enrolment link, shown to the admin who issued it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct IssuedLink {
    pub url: String,
    pub expires: String,
}

#[derive(Template)]
#[template(path = "admin/user.html")]
pub struct UserPage<'a> {
    pub admin: &'a str,
    pub csrf: &'a str,
    pub user: &'a crate::store::User,
    pub created: String,
    pub has_password: bool,
    pub has_totp: bool,
    /// No second factor, and only an enrolment link sets one up (its factors were reset, or it
    /// was created without a password): the password alone signs in to nothing.
    pub awaits_link: bool,
    pub recovery_left: u32,
    pub keys: &'a [KeyRow],
    pub devices: &'a [DeviceRow],
    pub sessions: &'a [SessionRow],
    pub events: &'a [EventRow],
    /// Keys can be enrolled here (WebAuthn available).
    pub webauthn: bool,
    pub link: Option<IssuedLink>,
    pub notice: Option<&'a str>,
    pub error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "admin/audit.html")]
pub struct Audit<'a> {
    pub admin: &'a str,
    pub user: &'a str,
    pub account: &'a str,
    pub event: &'a str,
    pub since: &'a str,
    pub until: &'a str,
    pub rows: &'a [EventRow],
    pub truncated: bool,
    /// The query string of the filter, for the export link.
    pub export_query: &'a str,
    pub error: Option<&'a str>,
}
