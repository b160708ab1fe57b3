//! Step-up: a signed-in user proves themselves again without signing out, before a change
//! that needs a recent proof (changing factors, admin sudo mode). A code from the
//! authenticator app is checked here; a security key goes through
//! [`crate::auth::webauthn::Keys::finish_step_up`]. Both count against the same attempt
//! budgets as sign-in codes, and too many wrong answers end the session.

use super::flow::{totp_context, Client, CodeOutcome, FlowError, LoginFlow};
use super::totp;
use crate::secret::Secret;
use crate::session::Session;
use crate::store::AuditEvent;

const EVENT: &str = "step_up";

impl LoginFlow {
    /// Checks a code from the user's authenticator app for a signed-in session. On success the
    /// session's last proof (`auth_ms`) becomes now; `strong_ms` is left alone (a code is not
    /// phishing-resistant). Recovery codes are not taken here.
    pub async fn step_up_code(
        &self,
        session: &mut Session,
        code: &Secret<String>,
        client: &Client,
    ) -> Result<CodeOutcome, FlowError> {
        if !session.is_authenticated() {
            return Ok(CodeOutcome::Restart);
        }
        let Some(user) = self.active_user(&session.user_id).await? else {
            return Ok(CodeOutcome::Restart);
        };
        if let Some(retry_after) = self
            .code_budget_spent(&user.id, session.own_device(), client)
            .await?
        {
            let ev = AuditEvent::new(EVENT, "denied", self.clock.now())
                .user(&user)
                .reason("throttled");
            self.audit_repeated(user.id.clone(), ev, client).await;
            return Ok(CodeOutcome::Throttled { retry_after });
        }
        if self
            .webauthn_policy
            .requires_phishing_resistant(&user.account_id)
        {
            self.code_attempt_settled(&user.id, session.own_device(), client)
                .await?;
            return Ok(CodeOutcome::KeyRequired);
        }
        let Some(rec) = self.durable.totp(&user.id).await? else {
            return self.wrong_code(session, client, EVENT, "no_totp").await;
        };
        let secret = self
            .master_key
            .open(&totp_context(&user.id), &rec.secret_sealed)
            .map_err(|e| FlowError::Internal(e.to_string()))?;
        let input = code.expose().trim();
        let Some(step) = totp::matching_step(&secret, input, self.clock.now()) else {
            return self.wrong_code(session, client, EVENT, "bad_code").await;
        };
        if !self.claim_step(&user.id, step).await? {
            // The code this session itself confirmed with moments ago, typed again on another
            // of its step-up pages (a second tab whose form is held): no replay by anyone else
            // and no new proof either. The page goes on with the proof the session has (the
            // gate checks it again); it is never counted as a wrong code, which would end the
            // owner's session.
            let step_start_ms =
                i64::try_from(step.saturating_sub(1) * totp::STEP * 1000).unwrap_or(i64::MAX);
            if session.factor_ms.is_some_and(|f| f >= step_start_ms) {
                self.code_attempt_settled(&user.id, session.own_device(), client)
                    .await?;
                let ev = AuditEvent::new(EVENT, "success", self.clock.now())
                    .user(&user)
                    .reason("otp_already_used_by_this_session");
                self.audit(ev, client).await;
                return Ok(CodeOutcome::Accepted);
            }
            return self
                .wrong_code(session, client, EVENT, "replayed_code")
                .await;
        }
        self.code_attempt_settled(&user.id, session.own_device(), client)
            .await?;
        session.auth_ms = self.clock.now_millis();
        session.factor_ms = Some(session.auth_ms);
        session.failed_codes = 0;
        // `amr` lists every method the session has used: a session begun with a recovery code
        // or a key has now used the app too.
        if !session.amr.iter().any(|m| m == "otp") {
            session.amr.push("otp".into());
        }
        let ev = AuditEvent::new(EVENT, "success", self.clock.now())
            .user(&user)
            .reason("otp");
        self.audit(ev, client).await;
        Ok(CodeOutcome::Accepted)
    }
}
