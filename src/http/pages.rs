//! Askama page types of the sign-in flow.

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use super::error::AppError;

#[derive(Template)]
#[template(path = "login.html")]
pub struct Login<'a> {
    pub csrf: &'a str,
    pub next: &'a str,
    pub username: &'a str,
    pub error: Option<&'a str>,
    pub notice: Option<&'a str>,
    /// Offer passkey sign-in (WebAuthn is available here).
    pub passkeys: bool,
    /// The second factor came first and is given: the password is the last step.
    pub factor_given: bool,
    /// Browsers may be remembered (device binding on, `remember_device.lifetime` not zero): a
    /// remembered one proves its key instead of asking for the second factor.
    pub remembering: bool,
}

#[derive(Template)]
#[template(path = "mfa.html")]
pub struct Mfa<'a> {
    pub csrf: &'a str,
    pub error: Option<&'a str>,
    /// Offer "Use security key" (the user has a usable key).
    pub keys: bool,
    /// Offer "remember this browser".
    pub remember: bool,
    /// How long it lasts, in words ("30 days").
    pub remember_for: String,
    /// The box comes back ticked (the form was sent with it, and a wrong code).
    pub remember_ticked: bool,
    /// A high-risk sign-in: say that only the key or a recovery code completes it.
    pub unusual: bool,
    /// Ask for an authenticator app's code (the user has an app): otherwise only for a
    /// recovery code.
    pub app: bool,
    /// Codes complete this sign-in: not for an account held to keys and passkeys
    /// (`webauthn.require_phishing_resistant`), whose page offers the key alone.
    pub codes: bool,
    /// "Start over" ends this sign-in (`POST /_portcullis/logout`) and shows the sign-in page,
    /// going on to this address as this sign-in would have.
    pub start_over: &'a str,
}

#[derive(Template)]
#[template(path = "enrol_totp.html")]
pub struct EnrolTotp<'a> {
    pub csrf: &'a str,
    pub qr_svg: &'a str,
    pub secret: &'a str,
    pub uri: &'a str,
    pub error: Option<&'a str>,
    /// Another secret was shown to this account before, in a setup never finished: say that
    /// it no longer works.
    pub replaced: bool,
    /// The account has a usable second factor already: this adds another, and may be skipped.
    pub has_factor: bool,
    /// Offer a security key instead of the app (WebAuthn available).
    pub webauthn: bool,
    /// Only a security key may be registered (enrolment link of an admin account).
    pub key_only: bool,
}

#[derive(Template)]
#[template(path = "recovery_codes.html")]
pub struct RecoveryCodes<'a> {
    pub csrf: &'a str,
    pub codes: &'a [String],
}

#[derive(Template)]
#[template(path = "logout.html")]
pub struct Logout<'a> {
    pub csrf: &'a str,
    pub email: &'a str,
    /// Where "Stay signed in" goes: the page that linked here (same origin), else `/`.
    pub back: &'a str,
}

#[derive(Template)]
#[template(path = "report.html")]
pub struct Report<'a> {
    pub csrf: &'a str,
    pub token: &'a str,
    /// The link came with a notice of a security change, not of a sign-in.
    pub change: bool,
    /// When the message with the link was sent (RFC 3339, UTC).
    pub sent: String,
    /// The device whose sign-in the link reports, when it is known.
    pub device: Option<ReportedDevice>,
}

/// What the report page tells of the sign-in it is about, so the owner can tell it is theirs.
pub struct ReportedDevice {
    /// "Firefox on Windows".
    pub name: String,
    /// First sign-in from it (RFC 3339, UTC).
    pub first_seen: String,
    /// The address it last came from.
    pub last_ip: String,
}

#[derive(Template)]
#[template(path = "reported.html")]
pub struct Reported<'a> {
    pub email: &'a str,
    /// As in [`Report`].
    pub change: bool,
}

/// One security key on the account page.
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub created: String,
    pub last_used: String,
    pub aaguid: String,
    /// Why the key was suspended, when it was, in words.
    pub suspended: Option<String>,
}

impl KeyRow {
    /// A stored key as the account page and the admin console show it.
    pub fn of(c: crate::store::WebauthnCredential) -> Self {
        let when = crate::clock::rfc3339;
        Self {
            created: when(c.created_at),
            last_used: c.last_used_at.map(when).unwrap_or_else(|| "never".into()),
            aaguid: crate::auth::webauthn::models::describe(c.aaguid.as_deref()),
            suspended: c.suspended_reason.map(|why| {
                match why.as_str() {
                    "possible_clone" => "possibly cloned: its signature counter went backwards",
                    "sign_in_reported" => "a sign-in was reported as not the owner's",
                    other => other,
                }
                .to_string()
            }),
            id: c.id,
            name: c.name,
        }
    }
}

/// One device on the account page.
pub struct DeviceRow {
    pub id: String,
    pub name: String,
    pub first_seen: String,
    pub last_seen: String,
    pub last_ip: String,
    /// How its sessions are bound, in words.
    pub binding: &'static str,
    /// Until when it is remembered ("remember this browser"), if it is.
    pub remembered: Option<String>,
    pub revoked: bool,
    /// The browser showing the page.
    pub current: bool,
}

#[derive(Template)]
#[template(path = "account.html")]
pub struct Account<'a> {
    pub csrf: &'a str,
    pub email: &'a str,
    pub keys: &'a [KeyRow],
    pub devices: &'a [DeviceRow],
    /// Some device other than this browser is still signed in (offer to sign them all out).
    pub others: bool,
    pub has_totp: bool,
    /// No app and no usable key: only recovery codes sign the user in (say to set one up).
    pub codes_only: bool,
    /// Unused recovery codes.
    pub recovery_left: u32,
    /// The account signs in with keys and passkeys only (`webauthn.require_phishing_resistant`):
    /// codes are not accepted, so none are offered.
    pub codes_refused: bool,
    /// The user's latest sign-in attempts, newest first.
    pub sign_ins: &'a [SignInRow],
    /// Keys can be added here (WebAuthn available).
    pub webauthn: bool,
    /// The last second-factor proof is recent enough to change factors.
    pub fresh: bool,
    /// An administrator: only a security-key proof makes the session fresh.
    pub key_only: bool,
    /// Length limits of a new password.
    pub password_min: usize,
    pub password_max: usize,
    pub notice: Option<&'a str>,
    pub error: Option<&'a str>,
    /// The id of the field the error is about (`""`: none): marked invalid, described by it.
    pub error_field: &'a str,
}

/// Renders a page with a status.
pub fn render<T: Template>(status: StatusCode, page: &T) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => AppError::internal(&e).into_response(),
    }
}

#[derive(Template)]
#[template(path = "reauth.html")]
pub struct Reauth<'a> {
    pub csrf: &'a str,
    /// The page's own address, where its code form posts: a device proof that ran out before
    /// the code was sent comes back here once renewed.
    pub action: &'a str,
    /// The public id of the session the page is shown to (sent back with the code).
    pub sid: &'a str,
    /// Where to go once confirmed (a same-origin path).
    pub next: &'a str,
    /// Why a new proof is asked for.
    pub why: &'a str,
    /// Offer the security key.
    pub keys: bool,
    /// Offer a code from the authenticator app.
    pub codes: bool,
    /// An administrator (who cannot add a key with a code).
    pub admin: bool,
    pub error: Option<&'a str>,
    /// A form held for this step-up, sent once it is done.
    pub form: Option<&'a super::held::Waiting>,
    /// A form that needed this proof was not passed on (and none is held): say to send it
    /// again once confirmed.
    pub not_sent: bool,
    /// Where "Cancel" goes: the page of the held form, else the start page; none for a session
    /// the risk engine holds, whose every page asks for this proof again.
    pub cancel: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "enrol_link.html")]
pub struct EnrolLink<'a> {
    pub csrf: &'a str,
    pub token: &'a str,
    pub email: &'a str,
    /// The user has no password yet: ask for one.
    pub set_password: bool,
    pub key_only: bool,
    /// The account has a usable second factor already: the link adds another.
    pub has_factor: bool,
    pub min_length: usize,
    pub max_length: usize,
    pub error: Option<&'a str>,
}

/// One sign-in attempt on the account page, from the audit trail.
pub struct SignInRow {
    pub at: String,
    /// "signed in", "failed", "refused"; with how many times for a summary of repeats.
    pub result: String,
    pub method: &'static str,
    pub ip: String,
    pub browser: String,
}

impl SignInRow {
    /// The address in pieces a narrow screen may break between: an IPv6 address at its
    /// colons rather than inside a group.
    pub fn ip_pieces(&self) -> Vec<&str> {
        self.ip.split_inclusive(':').collect()
    }
}

#[derive(Template)]
#[template(path = "account_recovery_codes.html")]
pub struct AccountRecoveryCodes<'a> {
    pub codes: &'a [String],
}

#[derive(Template)]
#[template(path = "account_totp.html")]
pub struct AccountTotp<'a> {
    pub csrf: &'a str,
    pub qr_svg: &'a str,
    pub secret: &'a str,
    pub uri: &'a str,
    pub error: Option<&'a str>,
    /// This setup replaces one started before and not finished: say its secret no longer works.
    pub replaced: bool,
    /// Names the key shown (see `account::setup_of`): a code sent from a page of an earlier
    /// setup is told that its key was replaced.
    pub setup: &'a str,
}

/// The device-binding interstitial (WebCrypto fallback).
#[derive(Template)]
#[template(path = "bind.html")]
pub struct Bind<'a> {
    pub csrf: &'a str,
    /// Where to continue once the device is proven (a validated same-origin path).
    pub next: &'a str,
    /// A form that needed the proof was not passed on (`notice=not_sent`): the page says so and
    /// waits for the person to continue, then send it again.
    pub not_sent: bool,
}

/// The page on which a remembered device proves its key after the password.
#[derive(Template)]
#[template(path = "remembered.html")]
pub struct Remembered<'a> {
    pub csrf: &'a str,
}

/// The second-factor page of a sign-in that asks for it before the password (the account had
/// too many consecutive wrong passwords): the same form, with a word on why.
#[derive(Template)]
#[template(path = "mfa_first.html")]
pub struct MfaFirst<'a> {
    pub csrf: &'a str,
    pub error: Option<&'a str>,
    /// Offer "Use security key" (the user has a usable key).
    pub keys: bool,
    /// Never offered here (the shared form asks): remembering waits for a normal sign-in.
    pub remember: bool,
    /// How long it lasts, in words ("30 days").
    pub remember_for: String,
    pub remember_ticked: bool,
    /// Always: what the account has is not told before the password.
    pub app: bool,
    /// Always, for the same reason.
    pub codes: bool,
    /// "Start over" ends this sign-in (`POST /_portcullis/logout`) and shows the sign-in page,
    /// going on to this address as this sign-in would have.
    pub start_over: &'a str,
}

#[cfg(test)]
mod tests {
    use super::SignInRow;

    /// An IPv6 address may break between its groups on a narrow screen, never inside one; the
    /// pieces put together are the address.
    #[test]
    fn an_address_breaks_at_its_colons_only() {
        let row = |ip: &str| SignInRow {
            at: String::new(),
            result: String::new(),
            method: "password",
            ip: ip.into(),
            browser: String::new(),
        };
        let v6 = row("2001:db8:85a3::8a2e:370:7334");
        assert_eq!(
            v6.ip_pieces(),
            ["2001:", "db8:", "85a3:", ":", "8a2e:", "370:", "7334"]
        );
        assert_eq!(v6.ip_pieces().concat(), v6.ip);
        assert_eq!(row("127.0.0.1").ip_pieces(), ["127.0.0.1"]);
    }
}

/// A form held for a step-up, ready to be sent (`/_portcullis/held`).
#[derive(Template)]
#[template(path = "held.html")]
pub struct HeldForm<'a> {
    pub csrf: &'a str,
    pub id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The page the form was on ("Don't send" goes there).
    pub back: &'a str,
}

/// A step-up done, going on to a console address.
#[derive(Template)]
#[template(path = "reauth_done.html")]
pub struct ReauthDone<'a> {
    pub next: &'a str,
}
