//! One-time enrolment links. An admin (in the console) or an operator (`portcullis admin
//! bootstrap`) issues a link bound to one user; through it the user sets a password when they
//! have none and registers their own second factor, so nobody else ever handles their secret.
//! Only the SHA-256 of the 256-bit token is stored; a link works once and expires.

use std::time::Duration;

use url::Url;

use crate::clock::UnixTime;
use crate::crypto::{random_token, sha256_hex};
use crate::store::{DurableStore, EnrolmentLink, StoreResult, User};

/// Path of the enrolment page.
pub const PATH: &str = "/_portcullis/enrol";
/// Lifetime of a bootstrap link (the first admin).
pub const BOOTSTRAP_TTL: Duration = Duration::from_secs(15 * 60);

/// An issued link: the URL to hand to the user (shown once) and when it expires.
#[derive(Debug, Clone)]
pub struct Issued {
    pub url: String,
    pub expires_at: UnixTime,
}

/// Issues a link for `user` that expires after `ttl`; `key_only` links accept only a security
/// key (admin accounts).
pub async fn issue(
    durable: &dyn DurableStore,
    public_url: &Url,
    user: &User,
    created_by: &str,
    key_only: bool,
    ttl: Duration,
    now: UnixTime,
) -> StoreResult<Issued> {
    // A key-only link for an account without a second factor: its password alone must not set
    // up an authenticator app meanwhile (the first sign-in of such an account enrols after its
    // password); from here it enrols through a link.
    if key_only && !crate::store::has_second_factor(durable, &user.id).await? {
        durable.reset_second_factors(&user.id, now).await?;
    }
    let token = random_token(32);
    let expires_at = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 4));
    durable
        .create_enrolment_link(EnrolmentLink {
            token_hash: sha256_hex(token.as_bytes()),
            user_id: user.id.clone(),
            created_by: created_by.to_string(),
            key_only,
            created_at: now,
            expires_at,
            used_at: None,
        })
        .await?;
    let mut url = public_url.clone();
    url.set_path(PATH);
    url.query_pairs_mut().append_pair("t", &token);
    Ok(Issued {
        url: url.to_string(),
        expires_at,
    })
}

/// The storage key of a token from a link; tokens of the wrong shape never match anything.
pub fn token_hash(token: &str) -> Option<String> {
    (token.len() == 43
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then(|| sha256_hex(token.as_bytes()))
}
