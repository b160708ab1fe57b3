//! Signing in with a key: as the second factor after the password, and passkey sign-in
//! (discoverable credential, no password). Both end in [`Keys::settle`], which stores the new
//! signature counter by compare-and-set or suspends a key whose counter went backwards.

use webauthn_rs::prelude::{
    AuthenticationResult, DiscoverableKey, Passkey, PublicKeyCredential, SecurityKey, WebauthnError,
};

use super::{
    corrupt, encode_id, failure_reason, internal, rewrap, Ceremony, CeremonyState, Keys,
    PasskeySignIn, Purpose, Refusal, Started,
};
use crate::auth::flow::{
    address_counter, awaits_factor_first, device_counter, Client, CodeOutcome, FlowError,
    KnownDevice, Reservation, AMR_KEY,
};
use crate::config::UserVerification;
use crate::session::{Session, Stage};
use crate::store::{AuditEvent, User, WebauthnCredential};

impl Keys {
    /// Starts a key ceremony as the second factor of a session waiting for one; `None` when
    /// the user has no usable key.
    pub async fn start_second_factor(
        &self,
        session: &Session,
        binding: &str,
    ) -> Result<Option<Started>, FlowError> {
        self.start_assertion(session, binding, Purpose::SecondFactor)
            .await
    }

    /// Starts a key ceremony through which a signed-in user proves themselves again (step-up);
    /// `None` when the user has no usable key.
    pub async fn start_step_up(
        &self,
        session: &Session,
        binding: &str,
    ) -> Result<Option<Started>, FlowError> {
        if !session.is_authenticated() {
            return Ok(None);
        }
        self.start_assertion(session, binding, Purpose::StepUp)
            .await
    }

    async fn start_assertion(
        &self,
        session: &Session,
        binding: &str,
        purpose: Purpose,
    ) -> Result<Option<Started>, FlowError> {
        // A sign-in whose second factor comes first offers a key ceremony whatever the account
        // has (see `decoy`): the same lookups, then made-up keys where there is no usable one.
        let factor_first = purpose == Purpose::SecondFactor && awaits_factor_first(session);
        let mut keys: Vec<Passkey> = self
            .usable(&session.user_id)
            .await?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let user = self.flow.active_user(&session.user_id).await?;
        if factor_first && (keys.is_empty() || user.is_none()) {
            keys = self.made_up_keys(&session.user_id)?;
        }
        if keys.is_empty() || (user.is_none() && !factor_first) {
            return Ok(None);
        }
        let verification = match &user {
            // Second factor first: one policy for every account and for none, the strictest
            // configured anywhere, so the options do not tell an account's policy (or that
            // there is no account).
            _ if factor_first => {
                let required =
                    |uv: Option<UserVerification>| uv == Some(UserVerification::Required);
                if required(Some(self.policy.user_verification))
                    || self
                        .policy
                        .accounts
                        .values()
                        .any(|a| required(a.user_verification))
                {
                    UserVerification::Required
                } else {
                    UserVerification::Preferred
                }
            }
            Some(u) => self.policy_of(u).user_verification,
            None => self.policy.user_verification,
        };
        let (mut options, state) = match verification {
            UserVerification::Required => {
                let (rcr, st) = self
                    .webauthn
                    .start_passkey_authentication(&keys)
                    .map_err(internal)?;
                (
                    serde_json::to_value(rcr).map_err(internal)?,
                    CeremonyState::PasskeyAuth(st),
                )
            }
            UserVerification::Preferred => {
                let keys: Vec<SecurityKey> = keys.iter().map(rewrap).collect::<Result<_, _>>()?;
                let (rcr, st) = self
                    .webauthn
                    .start_securitykey_authentication(&keys)
                    .map_err(internal)?;
                (
                    serde_json::to_value(rcr).map_err(internal)?,
                    CeremonyState::SecurityKeyAuth(st),
                )
            }
        };
        if factor_first {
            // Made-up keys have no transports; real ones lose theirs here, so both look alike.
            if let Some(allowed) = options
                .pointer_mut("/publicKey/allowCredentials")
                .and_then(|a| a.as_array_mut())
            {
                for credential in allowed.iter_mut().filter_map(|c| c.as_object_mut()) {
                    credential.remove("transports");
                }
            }
        }
        let ceremony = Ceremony {
            purpose,
            user_id: Some(session.user_id.clone()),
            binding: binding.to_string(),
            name: None,
            state,
            attested_models: None,
        };
        self.store(ceremony, options).await.map(Some)
    }

    /// Finishes a second-factor ceremony. On success the session is authenticated with
    /// `amr: ["pwd", "hwk"]`; failures count against the same budgets as wrong codes.
    pub async fn finish_second_factor(
        &self,
        ceremony: &str,
        binding: &str,
        session: &mut Session,
        response: &PublicKeyCredential,
        client: &Client,
    ) -> Result<CodeOutcome, FlowError> {
        const EVENT: &str = "second_factor";
        if session.stage != Stage::SecondFactor {
            return Ok(CodeOutcome::Restart);
        }
        let user = match self
            .assert(
                ceremony,
                Purpose::SecondFactor,
                binding,
                session,
                response,
                client,
                EVENT,
            )
            .await?
        {
            Ok(user) => user,
            Err(outcome) => return Ok(outcome),
        };
        self.flow.complete(session, &user, AMR_KEY);
        self.audit_user(EVENT, "success", Some(&user), AMR_KEY, client)
            .await;
        Ok(CodeOutcome::Accepted)
    }

    /// Whether the key of `user_id` that gave `response` is suspended as a possible copy of
    /// itself (its signature counter went backwards), which ends every session of its account.
    pub async fn suspended_as_copy(
        &self,
        user_id: &str,
        response: &PublicKeyCredential,
    ) -> Result<bool, FlowError> {
        let stored = self
            .flow
            .durable
            .webauthn_credential(&encode_id(response.get_credential_id()))
            .await?;
        Ok(stored.is_some_and(|s| {
            s.user_id == user_id && s.suspended_reason.as_deref() == Some("possible_clone")
        }))
    }

    /// Finishes a step-up ceremony of a signed-in session: on success the session's last proof
    /// (`auth_ms`) and last phishing-resistant proof (`strong_ms`) become now, and `hwk` joins
    /// its `amr`. Failures count like wrong codes; too many end the session (`Restart`).
    pub async fn finish_step_up(
        &self,
        ceremony: &str,
        binding: &str,
        session: &mut Session,
        response: &PublicKeyCredential,
        client: &Client,
    ) -> Result<CodeOutcome, FlowError> {
        const EVENT: &str = "step_up";
        if !session.is_authenticated() {
            return Ok(CodeOutcome::Restart);
        }
        let user = match self
            .assert(
                ceremony,
                Purpose::StepUp,
                binding,
                session,
                response,
                client,
                EVENT,
            )
            .await?
        {
            Ok(user) => user,
            Err(outcome) => return Ok(outcome),
        };
        let now = self.flow.clock.now_millis();
        session.auth_ms = now;
        session.factor_ms = Some(now);
        session.strong_ms = Some(now);
        session.failed_codes = 0;
        if !session.amr.iter().any(|m| m == AMR_KEY) {
            session.amr.push(AMR_KEY.into());
        }
        self.audit_user(EVENT, "success", Some(&user), AMR_KEY, client)
            .await;
        Ok(CodeOutcome::Accepted)
    }

    /// The shared half of second factor and step-up: budget, ceremony, key and signature
    /// checks. `Ok(user)` when the key answered; otherwise the outcome to return.
    #[allow(clippy::too_many_arguments)]
    async fn assert(
        &self,
        ceremony: &str,
        purpose: Purpose,
        binding: &str,
        session: &mut Session,
        response: &PublicKeyCredential,
        client: &Client,
        event: &str,
    ) -> Result<Result<User, CodeOutcome>, FlowError> {
        let user = self.flow.active_user(&session.user_id).await?;
        if user.is_none() && purpose != Purpose::SecondFactor {
            return Ok(Err(CodeOutcome::Restart));
        }
        let user_id = session.user_id.clone();
        if let Some(retry_after) = self
            .flow
            .code_budget_spent(&user_id, session.own_device(), client)
            .await?
        {
            self.audit_throttled(event, user.as_ref(), user_id, client)
                .await;
            return Ok(Err(CodeOutcome::Throttled { retry_after }));
        }
        let Some(c) = self
            .take(ceremony, purpose, binding, Some(&user_id))
            .await?
        else {
            return self
                .flow
                .wrong_code(session, client, event, "ceremony_expired")
                .await
                .map(Err);
        };
        let Some(user) = user else {
            // No account behind the sign-in (a decoy of second factor first), or disabled
            // since: every key is a wrong one, answered as an account answers a key it does not
            // have, after the same lookup, so the two cannot be told apart.
            self.flow
                .durable
                .webauthn_credential(&encode_id(response.get_credential_id()))
                .await?;
            let reason = if session.decoy {
                "unknown_credential"
            } else {
                "user_disabled"
            };
            return self
                .flow
                .wrong_code(session, client, event, reason)
                .await
                .map(Err);
        };
        let stored = self
            .flow
            .durable
            .webauthn_credential(&encode_id(response.get_credential_id()))
            .await?;
        let reason = match stored {
            Some(s) if s.user_id == user.id && !s.is_suspended() => {
                let verified = match &c.state {
                    CeremonyState::PasskeyAuth(st) => {
                        self.webauthn.finish_passkey_authentication(response, st)
                    }
                    CeremonyState::SecurityKeyAuth(st) => self
                        .webauthn
                        .finish_securitykey_authentication(response, st),
                    _ => Err(WebauthnError::InvalidClientDataType),
                };
                self.settle(&user, &s, verified, client).await?
            }
            Some(s) if s.user_id == user.id => Some("suspended_credential"),
            _ => Some("unknown_credential"),
        };
        if let Some(reason) = reason {
            return self
                .flow
                .wrong_code(session, client, event, reason)
                .await
                .map(Err);
        }
        self.flow
            .code_attempt_settled(&user.id, session.own_device(), client)
            .await?;
        Ok(Ok(user))
    }

    /// Applies a verification result to the stored key: on success the new counter is stored
    /// (compare-and-set); a counter that went backwards suspends the key. `Some(reason)` when
    /// the sign-in must be refused.
    async fn settle(
        &self,
        user: &User,
        stored: &WebauthnCredential,
        verified: Result<AuthenticationResult, WebauthnError>,
        client: &Client,
    ) -> Result<Option<&'static str>, FlowError> {
        let result = match verified {
            Ok(r) => r,
            Err(WebauthnError::CredentialPossibleCompromise) => {
                self.suspend_clone(user, stored, client).await?;
                return Ok(Some("possible_clone"));
            }
            Err(e) => {
                tracing::debug!(error = %e, "assertion refused");
                return Ok(Some(failure_reason(&e)));
            }
        };
        if encode_id(result.cred_id().as_ref()) != stored.credential_id {
            return Ok(Some("unknown_credential"));
        }
        let mut passkey: Passkey = serde_json::from_str(&stored.passkey).map_err(corrupt)?;
        passkey.update_credential(&result);
        let json = serde_json::to_string(&passkey).map_err(internal)?;
        let recorded = self
            .flow
            .durable
            .record_webauthn_use(
                &stored.id,
                &json,
                i64::from(result.counter()),
                self.flow.clock.now(),
            )
            .await?;
        if !recorded {
            // Another sign-in stored this counter value (or a higher one) first, or the key was
            // suspended meanwhile: a replayed or cloned answer, never a normal one.
            return Ok(Some("counter_not_increased"));
        }
        Ok(None)
    }

    async fn suspend_clone(
        &self,
        user: &User,
        stored: &WebauthnCredential,
        client: &Client,
    ) -> Result<(), FlowError> {
        let now = self.flow.clock.now();
        self.flow
            .durable
            .suspend_webauthn_credential(&stored.id, "possible_clone", now)
            .await?;
        let ev = AuditEvent::new("webauthn_possible_clone", "denied", now)
            .user(user)
            .reason(&format!("credential {}", stored.id));
        self.audit(ev, client).await;
        tracing::warn!(user = %user.id, credential = %stored.id, "security key counter went backwards; key suspended");
        // Which of the two is the copy cannot be told: a session the key proved earlier may be
        // the copier's as well as the owner's. Every session ends; the owner signs in again
        // with another factor and is told why.
        self.flow
            .durable
            .void_sessions(&user.id, self.flow.clock.now_millis())
            .await?;
        self.flow
            .notifier
            .change_notice(
                user,
                &crate::notify::Notifier::key_change(
                    "one of your security keys answered as a copy of itself would (its signature \
                     counter went backwards), so it was suspended and every session of the account \
                     was ended",
                    &stored.name,
                ),
                "Sign in with another key, your authenticator app or one of your recovery codes\n\
                 (an administrator can restore the key, or give you an enrolment link). If the key\n\
                 was out of your hands, or you cannot tell why this happened, tell your\n\
                 administrator: someone may have copied it.\n",
            )
            .await;
        Ok(())
    }

    /// Starts a passkey sign-in (discoverable credential, user verification required).
    pub async fn start_passkey(&self, binding: &str) -> Result<Started, FlowError> {
        let (rcr, st) = self
            .webauthn
            .start_discoverable_authentication()
            .map_err(internal)?;
        let mut options = serde_json::to_value(rcr).map_err(internal)?;
        // webauthn-rs marks this as conditional (autofill) UI; the login page uses a button,
        // which needs an ordinary modal request.
        if let Some(o) = options.as_object_mut() {
            o.remove("mediation");
        }
        let ceremony = Ceremony {
            purpose: Purpose::Passkey,
            user_id: None,
            binding: binding.to_string(),
            name: None,
            state: CeremonyState::Discoverable(st),
            attested_models: None,
        };
        self.store(ceremony, options).await
    }

    /// Takes one attempt from the failure budget kept in `counter` (at most `limit`), before
    /// the attempt is looked at, so that concurrent attempts cannot overshoot it; `false` when
    /// the budget is spent (nothing then stays taken). A success gives the attempt back.
    async fn take_attempt(&self, counter: &str, limit: u64) -> Result<bool, FlowError> {
        let budget = [(counter.to_string(), limit)];
        Ok(matches!(
            self.flow.reserve(&budget).await?,
            Reservation::Taken { .. }
        ))
    }

    /// A failed passkey sign-in (its attempt already taken from a budget).
    async fn passkey_failure(
        &self,
        user: Option<&User>,
        refusal: Refusal,
        client: &Client,
    ) -> Result<PasskeySignIn, FlowError> {
        let reason = match &refusal {
            Refusal::Expired => "ceremony_expired",
            Refusal::Rejected(r) | Refusal::Policy(r) => r,
        };
        self.audit_user("passkey_sign_in", "failure", user, reason, client)
            .await;
        Ok(PasskeySignIn::Refused(refusal))
    }

    /// A passkey sign-in refused because the failure budget kept in `counter` is spent (counted
    /// in the metrics where the budget was taken); one run in the audit trail per budget.
    async fn passkey_throttled(&self, client: &Client, counter: &str) -> PasskeySignIn {
        self.audit_throttled("passkey_sign_in", None, counter.to_string(), client)
            .await;
        PasskeySignIn::Throttled {
            retry_after: self.flow.limits.window.as_secs(),
        }
    }

    /// A failure before the key has named its owner. Without a device cookie the address's
    /// attempt was taken up front; with one, it is taken now, and refused as throttled when the
    /// address's budget is spent (whatever device cookie came along).
    async fn early_failure(
        &self,
        refusal: Refusal,
        client: &Client,
        taken: bool,
    ) -> Result<PasskeySignIn, FlowError> {
        let address = address_counter(client);
        if !taken
            && !self
                .take_attempt(&address, self.flow.limits.failures_per_ip)
                .await?
        {
            return Ok(self.passkey_throttled(client, &address).await);
        }
        self.passkey_failure(None, refusal, client).await
    }

    /// Finishes a passkey sign-in; on success the caller creates an authenticated session.
    ///
    /// Every attempt takes one from a failure budget before it is looked at, and a success gives
    /// it back: the address's (`limits.failures_per_ip`), except that a known device (`device`)
    /// of the key's owner draws on its own (`limits.failures_per_device`, as for passwords). So
    /// a flood from the owner's address (a shared NAT, say) cannot keep the owner's browser out,
    /// a device cookie of anyone else earns nothing, and concurrent attempts cannot overshoot a
    /// budget.
    pub async fn finish_passkey(
        &self,
        ceremony: &str,
        binding: &str,
        response: &PublicKeyCredential,
        client: &Client,
        device: Option<&KnownDevice>,
    ) -> Result<PasskeySignIn, FlowError> {
        let address = address_counter(client);
        // Without a device cookie the address's budget is the only one there can be.
        let mut taken: Option<String> = None;
        if device.is_none() {
            if !self
                .take_attempt(&address, self.flow.limits.failures_per_ip)
                .await?
            {
                return Ok(self.passkey_throttled(client, &address).await);
            }
            taken = Some(address.clone());
        }
        let early = taken.is_some();
        let Some(c) = self.take(ceremony, Purpose::Passkey, binding, None).await? else {
            return self.early_failure(Refusal::Expired, client, early).await;
        };
        let CeremonyState::Discoverable(state) = c.state else {
            return self.early_failure(Refusal::Expired, client, early).await;
        };
        let rejected = |r| Refusal::Rejected(r);
        let Ok((handle, raw_id)) = self.webauthn.identify_discoverable_authentication(response)
        else {
            return self
                .early_failure(rejected("no_user_handle"), client, early)
                .await;
        };
        let stored = self
            .flow
            .durable
            .webauthn_credential(&encode_id(raw_id))
            .await?;
        // The user handle the authenticator returns must name the key's owner.
        let Some(stored) = stored.filter(|s| s.user_id == handle.hyphenated().to_string()) else {
            return self
                .early_failure(rejected("unknown_credential"), client, early)
                .await;
        };
        let counter = match (
            taken,
            device.filter(|d| d.user_id == stored.user_id && d.at_home(client)),
        ) {
            (Some(counter), _) => counter,
            (None, owners) => {
                let (counter, limit) = match owners {
                    Some(d) => (device_counter(&d.id), self.flow.limits.failures_per_device),
                    None => (address, self.flow.limits.failures_per_ip),
                };
                if !self.take_attempt(&counter, limit).await? {
                    return Ok(self.passkey_throttled(client, &counter).await);
                }
                counter
            }
        };
        let user = self.flow.active_user(&stored.user_id).await?;
        let Some(user) = user else {
            return self
                .passkey_failure(None, rejected("user_disabled"), client)
                .await;
        };
        if stored.is_suspended() {
            return self
                .passkey_failure(Some(&user), rejected("suspended_credential"), client)
                .await;
        }
        let passkey: Passkey = serde_json::from_str(&stored.passkey).map_err(corrupt)?;
        let verified = self.webauthn.finish_discoverable_authentication(
            response,
            state,
            &[DiscoverableKey::from(&passkey)],
        );
        if let Some(reason) = self.settle(&user, &stored, verified, client).await? {
            return self
                .passkey_failure(Some(&user), rejected(reason), client)
                .await;
        }
        // A success is no failure: its attempt goes back.
        self.flow.release(std::slice::from_ref(&counter)).await?;
        self.audit_user(
            "passkey_sign_in",
            "success",
            Some(&user),
            "hwk_user",
            client,
        )
        .await;
        Ok(PasskeySignIn::Accepted(Box::new(user)))
    }
}
