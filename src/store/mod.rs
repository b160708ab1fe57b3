//! Storage behind two narrow traits, so backends can be swapped without touching callers.
//!
//! - [`DurableStore`]: users, second factors (TOTP, security keys and passkeys), recovery codes,
//!   signing keys and the audit trail;
//!   must survive restarts (SQLite embedded, PostgreSQL for several gateways).
//! - [`EphemeralStore`]: sessions, ceremony challenges, replay caches and counters; a key-value
//!   store where every key has a TTL and every multi-step update is one atomic operation, so a
//!   Redis implementation maps each call onto one command or script.
//!
//! Every backend error surfaces as [`StoreError`]; callers treat it as "deny" (fail closed).

pub mod memory;
pub mod redis;
pub mod sql;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, UnixTime};
use crate::config::StorageConfig;

/// A storage failure. The message is for logs; users only ever see a generic 503.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A gateway user (an ESP customer or admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Stable opaque id (UUID); the JWT `sub`.
    pub id: String,
    /// Normalised (trimmed, lower-case) email; the sign-in name.
    pub email: String,
    /// The ESP account this user belongs to; the JWT `account`.
    pub account_id: String,
    pub is_admin: bool,
    pub disabled: bool,
    /// Password sign-in refused (the owner reported a sign-in as not theirs) until an admin
    /// unlocks the account.
    pub locked: bool,
    /// PHC string of the argon2id hash.
    pub password_hash: String,
    pub created_at: UnixTime,
    /// Sessions authenticated at or before this instant (Unix milliseconds) are void
    /// (disable, second-factor reset, "this wasn't me").
    pub sessions_valid_after_ms: i64,
    /// When an administrator last removed the second factors (or a report removed those set up
    /// since the reported sign-in), or when the account was created without a password, if
    /// ever: such an account without a factor enrols (again) only through an enrolment link,
    /// never after its password alone.
    #[serde(default)]
    pub factors_reset_at: Option<UnixTime>,
}

impl User {
    /// Whether this account, once without a second factor, may set one up after its password
    /// alone: only an account whose factors were never removed (its first sign-in) and that was
    /// created with a password. One created without (its password set through an enrolment
    /// link) sets up its first factor through a link only, so a password learnt while the link's
    /// setup was cut short (the link used, the app not yet confirmed) sets up nothing.
    #[must_use]
    pub fn enrols_after_password(&self) -> bool {
        self.factors_reset_at.is_none()
    }
}

/// Whether the user has a second factor: an authenticator app or a security key (a suspended
/// key counts, so the password alone never sets up a new factor in its place).
pub async fn has_second_factor(durable: &dyn DurableStore, user_id: &str) -> StoreResult<bool> {
    Ok(durable.totp(user_id).await?.is_some()
        || !durable.webauthn_credentials(user_id).await?.is_empty())
}

/// Whether `user` sets up a second factor only through an enrolment link: its factors were
/// removed, or it was created without a password ([`User::enrols_after_password`]), and none
/// has been set up since.
pub async fn awaits_enrolment_link(durable: &dyn DurableStore, user: &User) -> StoreResult<bool> {
    Ok(!user.enrols_after_password() && !has_second_factor(durable, &user.id).await?)
}

/// Whether removing `user`'s second factors would change nothing: its factors were removed
/// already, no factor or recovery code has been set up since, and it enrols only through an
/// enrolment link. (A reset then removes nothing and is not mailed again; it still ends
/// sign-ins under way and links not used yet.)
pub async fn nothing_to_reset(durable: &dyn DurableStore, user: &User) -> StoreResult<bool> {
    Ok(awaits_enrolment_link(durable, user).await?
        && durable.recovery_codes_left(&user.id).await? == 0)
}

/// What [`DurableStore::drop_factors_since`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DroppedFactors {
    /// The authenticator app (its secret was set at or after the instant).
    pub totp: bool,
    /// Recovery codes made at or after the instant.
    pub recovery_codes: u64,
}

impl DroppedFactors {
    /// What went, for an audit event's reason: `totp, 10 recovery codes`.
    pub fn describe(&self) -> String {
        let mut what = Vec::new();
        if self.totp {
            what.push("totp".to_string());
        }
        if self.recovery_codes > 0 {
            what.push(format!("{} recovery codes", self.recovery_codes));
        }
        what.join(", ")
    }
}

/// A browser that completed a sign-in, recognised again by its device cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    pub user_id: String,
    /// SHA-256 (hex) of the device cookie value.
    pub token_hash: String,
    /// Friendly name derived from the user agent, e.g. "Firefox on Windows".
    pub name: String,
    pub user_agent: String,
    /// How sessions of this device are bound: `cookie` (device cookie only) until a session of
    /// it binds to a device key, then the method of that key (`dbsc`, `webcrypto`).
    pub binding: String,
    /// `active` or `revoked`.
    pub status: String,
    pub first_seen: UnixTime,
    pub last_seen: UnixTime,
    pub last_ip: String,
    /// Until when a password sign-in from this device may prove the device's key instead of a
    /// second factor ("remember this device"); `None`: not remembered.
    pub remembered_until: Option<UnixTime>,
    /// The device key (a serialised `binding::BoundKey`) that proves it is this device.
    pub remember_key: Option<String>,
}

/// An email waiting in (or sent from) the durable mail queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    pub id: String,
    pub to_addr: String,
    pub subject: String,
    pub body: String,
    pub created_at: UnixTime,
    pub attempts: i64,
    pub next_attempt_at: UnixTime,
    pub sent_at: Option<UnixTime>,
    pub last_error: Option<String>,
}

/// A single-use "this wasn't me" link sent with a new-device notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportLink {
    /// SHA-256 (hex) of the token in the link.
    pub token_hash: String,
    pub user_id: String,
    /// The device whose sign-in is reported.
    pub device_id: Option<String>,
    pub created_at: UnixTime,
    pub expires_at: UnixTime,
    pub used_at: Option<UnixTime>,
}

/// How many audit events of one kind and outcome fell into one time bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCount {
    /// Start of the bucket (Unix seconds, a multiple of the bucket width).
    pub bucket: UnixTime,
    pub event: String,
    pub outcome: String,
    pub count: i64,
}

/// A one-time link through which one user sets a password (when they have none) and registers
/// their own second factor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentLink {
    /// SHA-256 (hex) of the token in the link.
    pub token_hash: String,
    pub user_id: String,
    /// `cli:<os user>` or the issuing admin's email.
    pub created_by: String,
    /// Only a security key may be registered through the link (admin accounts).
    pub key_only: bool,
    pub created_at: UnixTime,
    pub expires_at: UnixTime,
    pub used_at: Option<UnixTime>,
}

/// Data for a new user.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub account_id: String,
    pub is_admin: bool,
    pub password_hash: String,
}

/// A user's TOTP factor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotpRecord {
    pub user_id: String,
    /// The secret, sealed with the master key (context `totp:<user id>`).
    pub secret_sealed: Vec<u8>,
    pub created_at: UnixTime,
}

/// A registered security key or passkey (WebAuthn credential).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebauthnCredential {
    /// Our own id (UUID), used in URLs of the account page.
    pub id: String,
    pub user_id: String,
    /// The authenticator's credential id, base64url without padding; unique across all users.
    pub credential_id: String,
    /// The serialised credential (public key, counter, flags) as JSON. Not secret.
    pub passkey: String,
    /// The name the user gave the key.
    pub name: String,
    /// Authenticator model id (AAGUID, hyphenated), when the authenticator reported one.
    pub aaguid: Option<String>,
    /// The highest signature counter seen; only ever raised.
    pub sign_count: i64,
    pub created_at: UnixTime,
    pub last_used_at: Option<UnixTime>,
    /// Set when the credential may no longer be used (e.g. a possibly cloned key).
    pub suspended_at: Option<UnixTime>,
    pub suspended_reason: Option<String>,
}

impl WebauthnCredential {
    pub fn is_suspended(&self) -> bool {
        self.suspended_at.is_some()
    }
}

/// What [`DurableStore::remove_webauthn_credential`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRemoval {
    Removed,
    /// Removed, a suspended key, and the account has no key and no authenticator app left: it
    /// now sets one up only through an enrolment link (never after its password alone, which
    /// may be an intruder's).
    RemovedLastFactor,
    /// Not removed: it is the user's last second factor.
    LastFactor,
    /// The user has no such credential.
    NotFound,
}

/// A JWT signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    pub kid: String,
    /// `EdDSA` or `ES256`.
    pub alg: String,
    /// Public key as a JWK (JSON), published in the JWKS.
    pub public_jwk: String,
    /// PKCS#8 private key, sealed with the master key (context `signing-key:<kid>`).
    pub private_sealed: Vec<u8>,
    pub created_at: UnixTime,
    /// When set, the key no longer signs; it stays published until this time.
    pub retire_at: Option<UnixTime>,
}

/// One audit event. Never holds a password, code, secret or token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Assigned by the store.
    #[serde(default)]
    pub id: i64,
    pub at: UnixTime,
    /// e.g. `login_password`, `second_factor`, `totp_enrolled`, `logout`, `proxy_denied`.
    pub event: String,
    /// `success`, `failure` or `denied`.
    pub outcome: String,
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub account_id: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// Machine-readable reason, e.g. `bad_password`, `replayed_code`, `cli`.
    pub reason: Option<String>,
    /// Who acted, for admin actions (`cli:<os user>` or an admin's email).
    pub actor: Option<String>,
    /// How many times it happened: 1, or for the summary of a run of repeated refusals how many
    /// attempts this one row stands for (see [`crate::audit::Audit::record_repeated`]); the
    /// fields the attempts did not all share are empty in a summary.
    #[serde(default = "one")]
    pub times: i64,
}

fn one() -> i64 {
    1
}

/// Which audit events to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user_id: Option<String>,
    /// Only events of this (normalised) address: for attempts on addresses no user has.
    pub email: Option<String>,
    pub event: Option<String>,
    pub account_id: Option<String>,
    /// Only events at or after this time.
    pub since: Option<UnixTime>,
    /// Only events before this time.
    pub until: Option<UnixTime>,
    /// Only events with an id greater than this (for following).
    pub after_id: Option<i64>,
    /// Newest first when true.
    pub newest_first: bool,
    pub limit: u32,
}

/// The durable store.
#[async_trait]
pub trait DurableStore: Send + Sync + std::fmt::Debug {
    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;
    /// Checks that the store answers (readiness).
    async fn ping(&self) -> StoreResult<()>;
    /// Closes the store's connections, once the process is done with it: an embedded SQLite
    /// file gets its write-ahead log folded in first, so the file alone is the whole database
    /// after a clean stop (a copy of it is complete). Nothing may use the store afterwards.
    async fn close(&self) {}
    /// The store server's clock (Unix milliseconds), where it is another host's that every
    /// gateway shares (PostgreSQL; not an embedded SQLite file).
    async fn server_time_ms(&self) -> StoreResult<Option<i64>> {
        Ok(None)
    }

    /// Creates a user. One without a password (`password_hash` empty: the user sets one
    /// through an enrolment link) is marked, in the same write, as setting up its first factor
    /// through such a link only ([`User::enrols_after_password`]).
    async fn create_user(&self, new: NewUser, now: UnixTime) -> StoreResult<User>;
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>>;
    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    /// Users whose email contains `text` (case-insensitive), or whose id or account id is
    /// `text`; all users when `text` is empty. Ordered by email, at most `limit`.
    async fn search_users(&self, text: &str, limit: u32) -> StoreResult<Vec<User>>;
    /// Users whose password sign-in is locked, by email, at most `limit` (admin alerts).
    async fn locked_users(&self, limit: u32) -> StoreResult<Vec<User>>;
    /// How many users there are.
    async fn count_users(&self) -> StoreResult<i64>;
    /// Promotes a user to admin or back.
    async fn set_admin(&self, user_id: &str, is_admin: bool) -> StoreResult<()>;
    async fn set_password_hash(&self, user_id: &str, hash: &str) -> StoreResult<()>;
    /// Disables or enables a user; disabling also voids every session up to `now_ms`.
    async fn set_disabled(&self, user_id: &str, disabled: bool, now_ms: i64) -> StoreResult<()>;
    /// Voids every session of the user that was authenticated at or before `at_ms`.
    async fn void_sessions(&self, user_id: &str, at_ms: i64) -> StoreResult<()>;

    async fn totp(&self, user_id: &str) -> StoreResult<Option<TotpRecord>>;
    /// The oldest TOTP record of any user (to check a master key against), if there is one.
    async fn oldest_totp(&self) -> StoreResult<Option<TotpRecord>>;
    /// Stores the (confirmed) TOTP factor, replacing any earlier one.
    async fn set_totp(&self, record: TotpRecord) -> StoreResult<()>;
    /// Removes TOTP, security keys and recovery codes, and ends the user's enrolment links not
    /// used yet (the user must enrol again, through a link issued after this: see
    /// [`User::enrols_after_password`]).
    async fn reset_second_factors(&self, user_id: &str, now: UnixTime) -> StoreResult<()>;
    /// Removes the authenticator app and the recovery codes set up at or after `since` (a
    /// reported sign-in's: the intruder holds them); when anything went, the account enrols
    /// again only through an enrolment link, as after [`Self::reset_second_factors`].
    async fn drop_factors_since(
        &self,
        user_id: &str,
        since: UnixTime,
        now: UnixTime,
    ) -> StoreResult<DroppedFactors>;

    /// Stores a newly registered credential; `Conflict` when its credential id is taken.
    async fn add_webauthn_credential(&self, cred: &WebauthnCredential) -> StoreResult<()>;
    /// A user's credentials (suspended ones included), oldest first.
    async fn webauthn_credentials(&self, user_id: &str) -> StoreResult<Vec<WebauthnCredential>>;
    /// The credential with this authenticator credential id (base64url), whoever owns it.
    async fn webauthn_credential(
        &self,
        credential_id: &str,
    ) -> StoreResult<Option<WebauthnCredential>>;
    /// Records a successful use: stores the updated credential and counter and the time, only if
    /// the credential is not suspended and `sign_count` is above the stored one (or both are 0,
    /// for authenticators without a counter). True when recorded; false means another sign-in
    /// got there first or the credential was suspended — the caller must refuse.
    async fn record_webauthn_use(
        &self,
        id: &str,
        passkey: &str,
        sign_count: i64,
        now: UnixTime,
    ) -> StoreResult<bool>;
    /// Suspends a credential so it can no longer be used.
    async fn suspend_webauthn_credential(
        &self,
        id: &str,
        reason: &str,
        now: UnixTime,
    ) -> StoreResult<()>;
    /// Renames a user's credential; false when the user has no such credential.
    async fn rename_webauthn_credential(
        &self,
        user_id: &str,
        id: &str,
        name: &str,
    ) -> StoreResult<bool>;
    /// Removes a user's credential unless it is their last second factor: the user keeps another
    /// credential that is not suspended or, when `codes_count` (the account's policy takes
    /// codes), an authenticator app. A suspended credential, which signs nobody in, is always
    /// removed; where that leaves no key and no app, the account's factors count as reset at
    /// `now` ([`KeyRemoval::RemovedLastFactor`]). Checked and removed under one lock of the
    /// user's row, so two removals at once (the owner and an administrator, say) cannot both
    /// pass the check.
    async fn remove_webauthn_credential(
        &self,
        user_id: &str,
        id: &str,
        codes_count: bool,
        now: UnixTime,
    ) -> StoreResult<KeyRemoval>;
    /// Lifts the suspension of a user's credential (an administrator found it to be the
    /// owner's); false when the user has no such suspended credential.
    async fn restore_webauthn_credential(&self, user_id: &str, id: &str) -> StoreResult<bool>;
    /// Every suspended credential of every user, most recently suspended first (admin alerts).
    async fn suspended_webauthn_credentials(&self) -> StoreResult<Vec<WebauthnCredential>>;

    /// Replaces all recovery codes of a user by these keyed hashes.
    async fn set_recovery_codes(
        &self,
        user_id: &str,
        hashes: &[String],
        now: UnixTime,
    ) -> StoreResult<()>;
    /// Marks the code used if it exists and is unused; true exactly once per code.
    async fn consume_recovery_code(
        &self,
        user_id: &str,
        hash: &str,
        now: UnixTime,
    ) -> StoreResult<bool>;
    /// Unused recovery codes left.
    async fn recovery_codes_left(&self, user_id: &str) -> StoreResult<u32>;

    async fn insert_signing_key(&self, key: SigningKeyRecord) -> StoreResult<()>;
    /// Stores `key` only while no key is current (none without `retire_at`); true when stored.
    /// Serialised across gateways, so gateways starting together settle on one first key.
    async fn insert_first_signing_key(&self, key: SigningKeyRecord) -> StoreResult<bool>;
    /// Marks every key except `keep_kid` that is not yet retiring as retiring at `retire_at`.
    async fn retire_signing_keys_except(
        &self,
        keep_kid: &str,
        retire_at: UnixTime,
    ) -> StoreResult<()>;
    /// All keys whose retirement lies after `now` (or that are not retiring), newest first.
    async fn live_signing_keys(&self, now: UnixTime) -> StoreResult<Vec<SigningKeyRecord>>;

    /// Writes `events`, all or none. An event with a user id but no address or account gets
    /// them from the user's record in the same write, where the user is there.
    async fn append_audit(&self, events: &[AuditEvent]) -> StoreResult<()>;
    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditEvent>>;
    /// Audit events since `since`, counted per `bucket_secs`-wide bucket, event and outcome.
    async fn audit_counts(&self, since: UnixTime, bucket_secs: i64)
        -> StoreResult<Vec<AuditCount>>;
    /// Deletes at most `limit` audit events from before `before` (retention) and returns how
    /// many it deleted. Callers repeat it until it returns 0, so that no single statement holds
    /// the table (or, in SQLite, the database) for long.
    async fn prune_audit(&self, before: UnixTime, limit: u32) -> StoreResult<u64>;
    /// How many audit events are from before `before`: what a prune to `before` would remove.
    async fn audit_events_before(&self, before: UnixTime) -> StoreResult<u64>;

    /// Locks or unlocks password sign-in of a user.
    async fn set_locked(&self, user_id: &str, locked: bool) -> StoreResult<()>;

    async fn create_device(&self, device: Device) -> StoreResult<()>;
    async fn device_by_token(&self, token_hash: &str) -> StoreResult<Option<Device>>;
    /// Records another sign-in from a known device.
    async fn touch_device(&self, id: &str, now: UnixTime, ip: &str) -> StoreResult<()>;
    /// A user's devices, most recently seen first.
    async fn list_devices(&self, user_id: &str) -> StoreResult<Vec<Device>>;
    /// Marks a device revoked; true when it was active.
    async fn revoke_device(&self, id: &str) -> StoreResult<bool>;
    /// Remembers a device until `until` by the key it must prove, or forgets it (`None`s).
    async fn remember_device(
        &self,
        id: &str,
        key: Option<&str>,
        until: Option<UnixTime>,
    ) -> StoreResult<()>;
    /// Records how the device's sessions are bound (`dbsc`, `webcrypto`).
    async fn set_device_binding(&self, id: &str, binding: &str) -> StoreResult<()>;
    /// What risk scoring remembers of a user's recent sign-ins (an opaque document).
    async fn risk_history(&self, user_id: &str) -> StoreResult<Option<String>>;
    /// A value of the database's own (see migration 0008), if set.
    async fn meta(&self, name: &str) -> StoreResult<Option<String>>;
    /// Sets `name` to `value` unless it is set already; whether this call set it.
    async fn set_meta_if_absent(&self, name: &str, value: &str) -> StoreResult<bool>;
    /// Replaces a user's risk history.
    async fn set_risk_history(&self, user_id: &str, body: &str, now: UnixTime) -> StoreResult<()>;

    async fn enqueue_mail(&self, mail: Mail) -> StoreResult<()>;
    /// Claims up to `limit` unsent mails due at `now`: each claimed mail's next attempt moves to
    /// `lease_until`, so another gateway polling the queue does not send it too.
    async fn claim_due_mail(
        &self,
        now: UnixTime,
        lease_until: UnixTime,
        limit: u32,
    ) -> StoreResult<Vec<Mail>>;
    /// Marks a mail sent and empties its body (which may hold a live single-use link).
    async fn mail_sent(&self, id: &str, now: UnixTime) -> StoreResult<()>;
    /// Records a failed attempt and when to try again.
    async fn mail_failed(
        &self,
        id: &str,
        error: &str,
        next_attempt_at: UnixTime,
    ) -> StoreResult<()>;
    /// Every mail in the queue, oldest first (operations and tests).
    async fn list_mail(&self, limit: u32) -> StoreResult<Vec<Mail>>;

    async fn create_report_link(&self, link: ReportLink) -> StoreResult<()>;
    /// Stores a new link; the user's earlier unused links stop working (they count as used).
    async fn create_enrolment_link(&self, link: EnrolmentLink) -> StoreResult<()>;
    /// The link, while unused and unexpired (does not use it).
    async fn enrolment_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<EnrolmentLink>>;
    /// Uses an enrolment link: returns it exactly once, while unexpired.
    async fn consume_enrolment_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<EnrolmentLink>>;

    /// The link, while unused and unexpired (does not use it).
    async fn report_link(&self, token_hash: &str, now: UnixTime)
        -> StoreResult<Option<ReportLink>>;
    /// Uses a link: returns it exactly once, while unexpired.
    async fn consume_report_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<ReportLink>>;
}

/// The ephemeral store: a TTL key-value store with a few atomic primitives.
#[async_trait]
pub trait EphemeralStore: Send + Sync + std::fmt::Debug {
    /// Checks that the store answers (readiness).
    async fn ping(&self) -> StoreResult<()>;
    /// The store server's clock (Unix milliseconds), where every gateway shares it (Redis; not
    /// the memory store).
    async fn server_time_ms(&self) -> StoreResult<Option<i64>> {
        Ok(None)
    }
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;
    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<()>;
    /// Stores only if the key is absent; true when stored (`SET NX EX`).
    async fn put_if_absent(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool>;
    /// Replaces the value only if the key exists (`SET XX PX`); true when stored. An update of a
    /// record that another gateway may have deleted meanwhile cannot bring it back.
    async fn put_if_present(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool>;
    /// Replaces the value only if it is `expected` now (compare-and-set; a missing key is never
    /// created); true when stored. A write of one field of a record read earlier cannot undo
    /// what another request wrote to the record meanwhile.
    async fn put_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> StoreResult<bool>;
    /// Reads and deletes in one step (`GETDEL`): single-use values.
    async fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// Increments a counter, creating it with `ttl` if absent; returns the new value.
    async fn incr(&self, key: &str, ttl: Duration) -> StoreResult<u64>;
    /// Counts one more under `key` in the current second of the store's own clock (Redis's
    /// `TIME`, the same for every gateway whatever theirs say); returns that second's count.
    /// Counts are kept for a few seconds.
    async fn incr_this_second(&self, key: &str) -> StoreResult<u64>;
    /// Takes one back from a counter that exists and is above zero, keeping its TTL; a missing
    /// or zero counter stays as it is (returning an attempt reserved with `incr`).
    async fn decr(&self, key: &str) -> StoreResult<()>;
    /// Stores `value` only if it is greater than the stored number (or none is stored);
    /// true when stored. Used for "each TOTP step at most once" replay protection.
    async fn set_if_greater(&self, key: &str, value: u64, ttl: Duration) -> StoreResult<bool>;
    /// Adds a member to a set, (re)setting the set's TTL.
    /// Adds `member` to the set at `key`, whose lifetime becomes at least `ttl`; returns how
    /// many members the set holds now.
    async fn set_add(&self, key: &str, member: &str, ttl: Duration) -> StoreResult<u64>;
    async fn set_remove(&self, key: &str, member: &str) -> StoreResult<()>;
    async fn set_members(&self, key: &str) -> StoreResult<Vec<String>>;
}

/// Opens the configured stores. The durable store must answer (its migrations run now); a Redis
/// ephemeral store connects lazily, so the gateway starts while Redis is down and answers 503
/// until it is back.
pub async fn open(
    storage: &StorageConfig,
    clock: Arc<dyn Clock>,
) -> StoreResult<(Arc<dyn DurableStore>, Arc<dyn EphemeralStore>)> {
    // Config::load has validated this already; a hand-built config may still be wrong.
    let target = storage
        .redis_target()
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let sql = sql::SqlStore::connect(&storage.durable).await?;
    sql.migrate().await?;
    // A role that may not write the gateway's tables would start and fail every sign-in:
    // refused now, as `check-config` refuses it.
    let missing = sql.missing_privileges().await?;
    if !missing.is_empty() {
        return Err(StoreError::Unavailable(sql::missing_privileges_message(
            &missing,
        )));
    }
    let durable: Arc<dyn DurableStore> = Arc::new(sql);
    let ephemeral: Arc<dyn EphemeralStore> = match target {
        None => Arc::new(memory::MemoryStore::new(clock)),
        Some(target) => {
            let store = redis::RedisStore::connect(redis::RedisOptions {
                target,
                prefix: storage.redis_prefix.clone(),
                connect_timeout: storage.redis_connect_timeout,
                response_timeout: storage.redis_response_timeout,
            })
            .await?;
            if let Err(e) = store.ping().await {
                tracing::warn!(error = %e, "Redis is not ready (not answering, or refusing the configured user, database or commands); sign-ins and proxied requests get 503 until it is");
            }
            Arc::new(store)
        }
    };
    Ok((durable, ephemeral))
}

/// Normalises a sign-in email for lookup: trimmed and lower-cased, so `Alice@X` and `alice@x`
/// are one account with one guess budget.
pub fn normalise_email(email: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    // Compatibility forms folded (NFKC: fullwidth `ａ`, `ℓ`, mathematical letters are the
    // letters they stand for), then lower case.
    let email: String = email.trim().nfkc().collect::<String>().to_lowercase();
    // An internationalised domain in its ASCII form (IDNA, UTS 46): `пример.рф` and
    // `xn--e1afmkfd.xn--p1ai` are one mailbox, and a domain that only looks like another shows
    // as what it is.
    match email.rsplit_once('@') {
        Some((local, domain)) if !domain.is_ascii() => match idna::domain_to_ascii(domain) {
            Ok(ascii) if !ascii.is_empty() => format!("{local}@{ascii}"),
            _ => email,
        },
        _ => email,
    }
}

/// An existing user whose address looks like `email` (a new user's, normalised) without being
/// it ([`crate::policy::email_skeleton`]): a user made with it could pass for that one.
pub async fn lookalike_user(
    durable: &dyn DurableStore,
    email: &str,
) -> StoreResult<Option<String>> {
    let skeleton = crate::policy::email_skeleton(email);
    Ok(durable
        .list_users()
        .await?
        .into_iter()
        .find(|u| u.email != email && crate::policy::email_skeleton(&u.email) == skeleton)
        .map(|u| u.email))
}

#[cfg(test)]
pub(crate) mod conformance;
