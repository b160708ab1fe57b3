//! Factor changes a signed-in user makes on the account page: a new set of recovery codes and a
//! new authenticator app. The web layer checks the session, CSRF and the fresh second-factor
//! proof; these steps store, audit and notify.
//!
//! A new TOTP secret waits, sealed, in the ephemeral store under the session's storage key
//! (never in a cookie) until a code from it confirms it; only then does it replace the old one.
//! Confirming takes the pending secret out atomically, so it is installed at most once.

use std::time::Duration;

use super::{Client, FlowError, LoginFlow};
use crate::auth::totp;
use crate::secret::Secret;
use crate::store::{AuditEvent, User};

/// How long a new authenticator secret waits for its confirming code.
pub const TOTP_CHANGE_TTL: Duration = Duration::from_secs(10 * 60);

/// Result of confirming a new authenticator app.
#[derive(Debug, PartialEq, Eq)]
pub enum TotpChange {
    /// The new secret replaced the old one.
    Changed,
    /// The code does not match the new secret; try again.
    Rejected,
    /// Nothing is pending for this session (expired, already confirmed, or never started).
    Expired,
    Throttled {
        retry_after: u64,
    },
}

fn pending_key(binding: &str) -> String {
    format!("totp_change:{binding}")
}

/// Sealing context of a pending secret: bound to its user.
fn change_context(user_id: &str) -> String {
    format!("totp-change:{user_id}")
}

impl LoginFlow {
    fn open_err(e: impl std::fmt::Display) -> FlowError {
        FlowError::Internal(e.to_string())
    }

    /// Replaces every recovery code of `user`; the new codes are returned to be shown once.
    pub async fn regenerate_recovery_codes(
        &self,
        user: &User,
        client: &Client,
    ) -> Result<Vec<String>, FlowError> {
        let codes = self.issue_recovery_codes(&user.id).await?;
        self.audit(
            AuditEvent::new("recovery_codes_regenerated", "success", self.clock.now()).user(user),
            client,
        )
        .await;
        self.notifier
            .account_change_by_owner(
                user,
                "a new set of recovery codes was made; the earlier codes no longer work",
            )
            .await;
        Ok(codes)
    }

    /// Replaces `user`'s password by `new` (already checked against the policy and confirmed by
    /// the current one), audits `password_changed` (`by`: `self` or the CLI) and tells the owner.
    pub async fn set_password(
        &self,
        user: &User,
        new: &Secret<String>,
        client: &Client,
        by: &str,
    ) -> Result<(), FlowError> {
        let hash = self.hasher.hash(new).await?;
        self.durable.set_password_hash(&user.id, &hash).await?;
        self.audit(
            AuditEvent::new("password_changed", "success", self.clock.now())
                .user(user)
                .reason(by),
            client,
        )
        .await;
        self.notifier
            .account_change_by_owner(
                user,
                "the password was changed, and every other session of the account was ended",
            )
            .await;
        Ok(())
    }

    /// Makes a new authenticator secret for `user`, pending for the session `binding` (a new
    /// start replaces an earlier pending one: then the flag is true, as the page must say that
    /// the secret shown before no longer works).
    pub async fn start_totp_change(
        &self,
        user: &User,
        binding: &str,
    ) -> Result<(Secret<Vec<u8>>, bool), FlowError> {
        let secret = totp::generate_secret();
        let sealed = self
            .master_key
            .seal(&change_context(&user.id), secret.expose())
            .map_err(Self::open_err)?;
        let key = pending_key(binding);
        let replaced = self.ephemeral.get(&key).await?.is_some();
        self.ephemeral.put(&key, &sealed, TOTP_CHANGE_TTL).await?;
        Ok((secret, replaced))
    }

    /// The secret pending for the session `binding`, if any.
    pub async fn pending_totp_change(
        &self,
        user: &User,
        binding: &str,
    ) -> Result<Option<Secret<Vec<u8>>>, FlowError> {
        let Some(sealed) = self.ephemeral.get(&pending_key(binding)).await? else {
            return Ok(None);
        };
        let plain = self
            .master_key
            .open(&change_context(&user.id), &sealed)
            .map_err(Self::open_err)?;
        Ok(Some(Secret::new(plain.to_vec())))
    }

    /// Confirms the pending secret with a code from it; on success it replaces the user's TOTP
    /// factor. Codes count against the same budgets as sign-in codes.
    pub async fn confirm_totp_change(
        &self,
        user: &User,
        (binding, device): (&str, Option<&str>),
        code: &Secret<String>,
        client: &Client,
    ) -> Result<TotpChange, FlowError> {
        let Some(secret) = self.pending_totp_change(user, binding).await? else {
            return Ok(TotpChange::Expired);
        };
        if let Some(retry_after) = self.code_budget_spent(&user.id, device, client).await? {
            return Ok(TotpChange::Throttled { retry_after });
        }
        let now = self.clock.now();
        let event = |outcome| AuditEvent::new("totp_changed", outcome, now).user(user);
        let Some(step) = totp::matching_step(secret.expose(), code.expose().trim(), now) else {
            self.audit(event("failure").reason("bad_code"), client)
                .await;
            return Ok(TotpChange::Rejected);
        };
        // Take the pending secret: of two confirmations at once, only one installs it.
        if self.ephemeral.take(&pending_key(binding)).await?.is_none() {
            return Ok(TotpChange::Expired);
        }
        self.install_totp(&user.id, &secret, now).await?;
        // The confirming code must not also sign in. The step may equal one already used to
        // sign in (with the old secret) moments ago, so a "not greater" answer is fine here.
        self.claim_step(&user.id, step).await?;
        self.code_attempt_settled(&user.id, device, client).await?;
        self.audit(event("success"), client).await;
        self.notifier
            .account_change_by_owner(
                user,
                "the authenticator app was replaced; codes from the earlier app no longer work",
            )
            .await;
        Ok(TotpChange::Changed)
    }
}
