//! Identity tokens for the backend: JWT minting, signing keys (sealed at rest), the JWKS and key
//! rotation.
//!
//! - [`Signer`] holds the live key ring in memory, mints one short-lived token per session and
//!   reuses it while enough lifetime remains, so the request path rarely signs anything.
//! - [`rotate`] adds a new current key and lets the others retire after an overlap, so tokens
//!   already issued stay verifiable; other gateways pick the change up on [`Signer::refresh`].
//! - [`verify`] checks a token the way a backend should (pinned algorithm per key, `kid` lookup,
//!   audience, issuer, lifetime), and is what the tests hold the tokens against.
//!
//! Private keys are PKCS#8 DER sealed with the master key under the context
//! `signing-key:<kid>`; the JWKS is built from public components only.

mod keys;
mod signer;
mod verify;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_verify;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::crypto::MasterKey;
use crate::store::DurableStore;

pub use keys::PUBLISH_LEAD;
pub use signer::Signer;
pub use verify::verify;

/// Errors of token minting, key handling and verification.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The durable store failed (reading or writing signing keys).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Key generation, sealing, opening or signing failed; never carries key material.
    #[error("signing key error: {0}")]
    Crypto(String),
    /// A token failed verification; the message names the failed check.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The store holds no key that may sign.
    #[error("no current signing key")]
    NoKey,
    /// The master key given is not the one the database was first used with (it does not open
    /// its check value or its signing keys).
    #[error("the master key is not the one this database was set up with: it does not open what the gateways sealed there (check secrets.master_key / master_key_file)")]
    WrongMasterKey,
}

/// Identity asserted to the backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// The gateway (`Config::issuer`).
    pub iss: String,
    /// The backend (`token.audience`).
    pub aud: String,
    /// Stable user id.
    pub sub: String,
    /// The user's normalised email.
    pub email: String,
    /// The ESP account the user belongs to.
    pub account: String,
    /// Authentication methods used in this session (e.g. `pwd`, `otp`).
    pub amr: Vec<String>,
    /// Authentication context class reached.
    pub acr: String,
    /// When the user last authenticated (Unix seconds).
    pub auth_time: i64,
    /// When the user last proved a second factor of their own (Unix seconds): a code or a key,
    /// at sign-in or a step-up; never a remembered browser's device key. What the gateway's
    /// `[[step_up]]` rules measure; absent for a session signed in by a remembered browser that
    /// has not stepped up since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor_time: Option<i64>,
    /// Opaque session id (never the session cookie itself).
    pub sid: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Not before (Unix seconds); equals `iat`.
    pub nbf: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
}

/// What the caller knows about the session, borrowed from the session and user records it was
/// read from (the request path builds one per request and allocates nothing for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    /// Stable user id (`sub`).
    pub sub: &'a str,
    /// The user's normalised email.
    pub email: &'a str,
    /// The ESP account id.
    pub account: &'a str,
    /// Authentication methods used in this session.
    pub amr: &'a [String],
    /// Authentication context class reached.
    pub acr: &'a str,
    /// When the user last authenticated (Unix seconds).
    pub auth_time: i64,
    /// When the user last proved a second factor of their own (Unix seconds), if ever in this
    /// session ([`Claims::factor_time`]).
    pub factor_time: Option<i64>,
    /// Opaque session id for the backend.
    pub sid: &'a str,
}

/// An [`Identity`] kept with a cached token: the token may be reused only for an identity equal
/// to [`OwnedIdentity::view`] in every field (a step-up changes `amr`, `acr`, `auth_time` and
/// `factor_time`, so a cached token must not outlive it).
#[derive(Debug, Clone)]
struct OwnedIdentity {
    sub: String,
    email: String,
    account: String,
    amr: Vec<String>,
    acr: String,
    auth_time: i64,
    factor_time: Option<i64>,
    sid: String,
}

impl OwnedIdentity {
    fn of(id: &Identity<'_>) -> Self {
        Self {
            sub: id.sub.to_string(),
            email: id.email.to_string(),
            account: id.account.to_string(),
            amr: id.amr.to_vec(),
            acr: id.acr.to_string(),
            auth_time: id.auth_time,
            factor_time: id.factor_time,
            sid: id.sid.to_string(),
        }
    }

    fn view(&self) -> Identity<'_> {
        Identity {
            sub: &self.sub,
            email: &self.email,
            account: &self.account,
            amr: &self.amr,
            acr: &self.acr,
            auth_time: self.auth_time,
            factor_time: self.factor_time,
            sid: &self.sid,
        }
    }
}

/// Adds a new key and marks all other non-retiring keys retiring; returns the new kid. The new
/// key is published at once and signs from [`keys::PUBLISH_LEAD`] later (gateways switch on
/// their first [`Signer::refresh`] after that); the old ones sign until then and stay published
/// for `config.token.key_overlap` more, so tokens they signed verify to their end. Used by
/// `portcullis keys rotate` (a separate process) and tests.
/// The algorithm of the key that signs now (the newest not retired), if there is one.
pub async fn current_algorithm(
    durable: &dyn DurableStore,
    now: i64,
) -> Result<Option<String>, TokenError> {
    let records = durable.live_signing_keys(now).await?;
    Ok(records
        .iter()
        .filter(|r| r.retire_at.is_none())
        .max_by_key(|r| r.created_at)
        .map(|r| r.alg.clone()))
}

pub async fn rotate(
    durable: &dyn DurableStore,
    master_key: &MasterKey,
    config: &Config,
    now: i64,
) -> Result<String, TokenError> {
    // A key sealed with another master key would become the one every gateway must open.
    check_master_key(durable, master_key, now, Claim::Yes).await?;
    let record = keys::new_record(config.token.algorithm, master_key, now)?;
    let kid = record.kid.clone();
    durable.insert_signing_key(record).await?;
    let overlap = i64::try_from(config.token.key_overlap.as_secs()).unwrap_or(i64::MAX);
    durable
        .retire_signing_keys_except(
            &kid,
            now.saturating_add(keys::PUBLISH_LEAD)
                .saturating_add(overlap),
        )
        .await?;
    tracing::info!(kid = %kid, alg = config.token.algorithm.as_str(), "signing key rotated");
    Ok(kid)
}

/// The `meta` entry holding a value sealed with the database's master key.
pub(crate) const MASTER_KEY_CHECK: &str = "master_key_check";
/// What that entry seals (and the context it is sealed under).
const MASTER_KEY_CHECK_CONTEXT: &str = "portcullis/master-key-check";

/// Whether `master_key` is the master key of this database, the one the gateways use: anything
/// sealed with another (a signing key, a TOTP secret) could never be opened by them.
///
/// The first command or gateway that uses a master key on a database leaves a value sealed
/// with it (`meta.master_key_check`); every later one must open it. Before that value exists,
/// the key must open the live signing keys and the oldest TOTP secret, where there are any
/// (a database from an earlier version, or one whose users were set up before); then the value
/// is written. With `Claim::No` (`check-config`, which may run against a database not yet
/// migrated) nothing is written and a missing `meta` table counts as a missing value.
pub async fn check_master_key(
    durable: &dyn DurableStore,
    master_key: &MasterKey,
    now: i64,
    claim: Claim,
) -> Result<(), TokenError> {
    let opens = |stored: &str| {
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, stored)
            .ok()
            .is_some_and(|sealed| master_key.open(MASTER_KEY_CHECK_CONTEXT, &sealed).is_ok())
    };
    let stored = match durable.meta(MASTER_KEY_CHECK).await {
        Ok(stored) => stored,
        Err(_) if claim == Claim::No => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(stored) = stored {
        return opens(&stored)
            .then_some(())
            .ok_or(TokenError::WrongMasterKey);
    }
    for record in durable.live_signing_keys(now).await? {
        keys::open_record(&record, master_key).map_err(|_| TokenError::WrongMasterKey)?;
    }
    if let Some(totp) = durable.oldest_totp().await? {
        let context = crate::auth::flow::totp_context(&totp.user_id);
        master_key
            .open(&context, &totp.secret_sealed)
            .map_err(|_| TokenError::WrongMasterKey)?;
    }
    if claim == Claim::No {
        return Ok(());
    }
    let sealed = master_key
        .seal(
            MASTER_KEY_CHECK_CONTEXT,
            MASTER_KEY_CHECK_CONTEXT.as_bytes(),
        )
        .map_err(|e| TokenError::Crypto(e.to_string()))?;
    let value = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sealed);
    if durable.set_meta_if_absent(MASTER_KEY_CHECK, &value).await? {
        return Ok(());
    }
    // Another command or gateway set it a moment ago: its key must be this one.
    match durable.meta(MASTER_KEY_CHECK).await? {
        Some(stored) if opens(&stored) => Ok(()),
        _ => Err(TokenError::WrongMasterKey),
    }
}

/// Whether [`check_master_key`] may make the key the database's when it has none yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A gateway starting, a command about to write.
    Yes,
    /// `check-config`: look, write nothing.
    No,
}
