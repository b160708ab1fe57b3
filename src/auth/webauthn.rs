//! Security keys and passkeys (WebAuthn, through webauthn-rs).
//!
//! Every ceremony has two halves. `start_*` creates the challenge and keeps the ceremony state
//! server-side in the ephemeral store under a random id, bound to the browser that asked (the
//! session's storage key, or the CSRF cookie before any session exists) and expiring with the
//! configured timeout. `finish_*` takes the state out in one atomic step, so a challenge answers
//! at most once, then verifies the authenticator's answer.
//!
//! A key that reports a signature counter lower than or equal to the stored one may have been
//! cloned: the sign-in is refused, the key is suspended and `webauthn_possible_clone` is
//! audited. Counters are raised with a compare-and-set, so parallel sign-ins never lower them.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use webauthn_rs::prelude::{
    AuthenticationResult, DiscoverableAuthentication, DiscoverableKey, Passkey,
    PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential, RegisterPublicKeyCredential,
    SecurityKey, SecurityKeyAuthentication, SecurityKeyRegistration, Url, Uuid, Webauthn,
    WebauthnBuilder, WebauthnError,
};

use super::flow::{Client, CodeOutcome, FlowError, LoginFlow, AMR_KEY};
use crate::config::{Config, UserVerification};
use crate::crypto::{ct_eq, random_token};
use crate::session::{Session, Stage};
use crate::store::{AuditEvent, StoreError, User, WebauthnCredential};

/// `amr` of a passkey sign-in: the key (`hwk`) verified its user (`user`) itself.
pub const PASSKEY_AMR: [&str; 2] = [AMR_KEY, "user"];
/// Longest key name kept.
pub const MAX_NAME: usize = 64;

/// Why keys are unavailable, for the start-up log.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("WebAuthn is switched off ([webauthn] enabled = false)")]
    Disabled,
    #[error("server.public_url has no domain name (an IP address cannot be a WebAuthn relying party); security keys and passkeys are off")]
    NoDomain,
    #[error("WebAuthn configuration refused: {0}")]
    Invalid(String),
}

/// What a ceremony is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Register,
    SecondFactor,
    Passkey,
}

/// The webauthn-rs state of one ceremony.
#[derive(Serialize, Deserialize)]
enum CeremonyState {
    Passkey(PasskeyRegistration),
    SecurityKey(SecurityKeyRegistration),
    PasskeyAuth(PasskeyAuthentication),
    SecurityKeyAuth(SecurityKeyAuthentication),
    Discoverable(DiscoverableAuthentication),
}

/// What the ephemeral store keeps for an open ceremony.
#[derive(Serialize, Deserialize)]
struct Ceremony {
    purpose: Purpose,
    /// The user the ceremony is for (none for a passkey sign-in).
    user_id: Option<String>,
    /// The browser it is bound to (see the module docs).
    binding: String,
    /// Key name chosen at registration.
    name: Option<String>,
    state: CeremonyState,
}

/// A started ceremony: its id and the options for `navigator.credentials`.
#[derive(Debug)]
pub struct Started {
    pub ceremony: String,
    pub options: serde_json::Value,
}

/// Why a finish was refused; `reason` goes to the audit trail, never to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The ceremony is unknown: expired, already used, or never started here.
    Expired,
    /// The authenticator's answer did not verify, or the key may not be used.
    Rejected(&'static str),
}

/// Result of a registration.
#[derive(Debug)]
pub enum Registered {
    Stored(Box<WebauthnCredential>),
    Refused(Refusal),
}

/// Result of a passkey sign-in.
#[derive(Debug)]
pub enum PasskeySignIn {
    Accepted(Box<User>),
    Refused(Refusal),
    Throttled { retry_after: u64 },
}

/// Security keys and passkeys over the sign-in flow's stores, counters and audit.
#[derive(Debug, Clone)]
pub struct Keys {
    webauthn: Arc<Webauthn>,
    flow: LoginFlow,
    uv: UserVerification,
    ttl: Duration,
}

fn ceremony_key(id: &str) -> String {
    format!("webauthn:{id}")
}

/// The credential id as stored: base64url without padding.
fn encode_id(raw: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(raw)
}

/// Audit reason of a verification failure.
fn failure_reason(e: &WebauthnError) -> &'static str {
    match e {
        WebauthnError::UserNotVerified => "user_not_verified",
        WebauthnError::InvalidRPOrigin => "wrong_origin",
        WebauthnError::MismatchedChallenge => "wrong_challenge",
        WebauthnError::CredentialPossibleCompromise => "possible_clone",
        _ => "invalid_response",
    }
}

/// The authenticator model (AAGUID) from a registration's attestation object, when reported.
fn aaguid(reg: &RegisterPublicKeyCredential) -> Option<String> {
    let obj: serde_cbor_2::Value =
        serde_cbor_2::from_slice(reg.response.attestation_object.as_ref()).ok()?;
    let serde_cbor_2::Value::Map(map) = obj else {
        return None;
    };
    let auth_data = map.iter().find_map(|(k, v)| match (k, v) {
        (serde_cbor_2::Value::Text(k), serde_cbor_2::Value::Bytes(b)) if k == "authData" => Some(b),
        _ => None,
    })?;
    // rpIdHash (32) | flags (1) | signCount (4) | AAGUID (16) when attested data is present.
    let flags = *auth_data.get(32)?;
    if flags & 0x40 == 0 {
        return None;
    }
    let id = Uuid::from_slice(auth_data.get(37..53)?).ok()?;
    (!id.is_nil()).then(|| id.hyphenated().to_string())
}

/// Converts between the credential wrappers of webauthn-rs: `Passkey` and `SecurityKey` hold
/// the same credential and serialise identically; the wrapper only picks the ceremony policy.
fn rewrap<A: Serialize, B: for<'de> Deserialize<'de>>(a: &A) -> Result<B, FlowError> {
    serde_json::to_value(a)
        .and_then(serde_json::from_value)
        .map_err(|e| FlowError::Internal(format!("credential conversion: {e}")))
}

fn corrupt(e: serde_json::Error) -> FlowError {
    FlowError::Store(StoreError::Corrupt(e.to_string()))
}

fn internal(e: impl std::fmt::Display) -> FlowError {
    FlowError::Internal(e.to_string())
}

impl Keys {
    /// Builds the relying party from the configuration.
    pub fn new(config: &Config, flow: LoginFlow) -> Result<Self, SetupError> {
        if !config.webauthn.enabled {
            return Err(SetupError::Disabled);
        }
        let rp_id = config.webauthn_rp_id().ok_or(SetupError::NoDomain)?;
        let origin: &Url = &config.server.public_url;
        let webauthn = WebauthnBuilder::new(&rp_id, origin)
            .map_err(|e| SetupError::Invalid(e.to_string()))?
            .rp_name(&config.webauthn.rp_name)
            .timeout(config.webauthn.ceremony_timeout)
            .build()
            .map_err(|e| SetupError::Invalid(e.to_string()))?;
        Ok(Self {
            webauthn: Arc::new(webauthn),
            flow,
            uv: config.webauthn.user_verification,
            ttl: config.webauthn.ceremony_timeout,
        })
    }

    async fn store(
        &self,
        ceremony: Ceremony,
        options: impl Serialize,
    ) -> Result<Started, FlowError> {
        let id = random_token(32);
        let body = serde_json::to_vec(&ceremony).map_err(internal)?;
        if !self
            .flow
            .ephemeral
            .put_if_absent(&ceremony_key(&id), &body, self.ttl)
            .await?
        {
            return Err(FlowError::Store(StoreError::Conflict(
                "ceremony id collision".into(),
            )));
        }
        let options = serde_json::to_value(options).map_err(internal)?;
        Ok(Started {
            ceremony: id,
            options,
        })
    }

    /// Takes a ceremony out of the store (once) and checks what it is for and who started it.
    async fn take(
        &self,
        id: &str,
        purpose: Purpose,
        binding: &str,
        user_id: Option<&str>,
    ) -> Result<Option<Ceremony>, FlowError> {
        if id.len() != 43 {
            return Ok(None);
        }
        let Some(body) = self.flow.ephemeral.take(&ceremony_key(id)).await? else {
            return Ok(None);
        };
        let c: Ceremony = serde_json::from_slice(&body).map_err(corrupt)?;
        let ok = c.purpose == purpose
            && ct_eq(c.binding.as_bytes(), binding.as_bytes())
            && c.user_id.as_deref() == user_id;
        Ok(ok.then_some(c))
    }

    async fn audit(&self, ev: AuditEvent, client: &Client) {
        self.flow.audit(ev, client).await;
    }

    async fn audit_user(
        &self,
        event: &str,
        outcome: &str,
        user: Option<&User>,
        reason: &str,
        client: &Client,
    ) {
        let mut ev = AuditEvent::new(event, outcome, self.flow.clock.now()).reason(reason);
        if let Some(u) = user {
            ev = ev.user(u);
        }
        self.audit(ev, client).await;
    }

    /// A user's keys that may be used.
    async fn usable(&self, user_id: &str) -> Result<Vec<(WebauthnCredential, Passkey)>, FlowError> {
        let mut out = Vec::new();
        for c in self.flow.durable.webauthn_credentials(user_id).await? {
            if c.is_suspended() {
                continue;
            }
            let pk: Passkey = serde_json::from_str(&c.passkey).map_err(corrupt)?;
            out.push((c, pk));
        }
        Ok(out)
    }

    /// Whether the user has a key that may be used.
    pub async fn has_usable(&self, user_id: &str) -> Result<bool, FlowError> {
        Ok(!self.usable(user_id).await?.is_empty())
    }

    /// Starts registering a new key for `user`.
    pub async fn start_registration(
        &self,
        user: &User,
        binding: &str,
        name: &str,
    ) -> Result<Started, FlowError> {
        let handle = Uuid::parse_str(&user.id).map_err(internal)?;
        let exclude: Vec<_> = self
            .flow
            .durable
            .webauthn_credentials(&user.id)
            .await?
            .iter()
            .filter_map(|c| serde_json::from_str::<Passkey>(&c.passkey).ok())
            .map(|p| p.cred_id().clone())
            .collect();
        let exclude = (!exclude.is_empty()).then_some(exclude);
        let (options, state) = match self.uv {
            UserVerification::Required => {
                let (ccr, st) = self
                    .webauthn
                    .start_passkey_registration(handle, &user.email, &user.email, exclude)
                    .map_err(internal)?;
                (ccr, CeremonyState::Passkey(st))
            }
            UserVerification::Preferred => {
                let (ccr, st) = self
                    .webauthn
                    .start_securitykey_registration(
                        handle,
                        &user.email,
                        &user.email,
                        exclude,
                        None,
                        None,
                    )
                    .map_err(internal)?;
                (ccr, CeremonyState::SecurityKey(st))
            }
        };
        let mut options = serde_json::to_value(options).map_err(internal)?;
        // Ask for a discoverable credential where the authenticator can keep one, so the key
        // also works for passkey sign-in; security keys with no room still register.
        if let Some(sel) = options.pointer_mut("/publicKey/authenticatorSelection") {
            sel["residentKey"] = serde_json::Value::from("preferred");
        }
        let name: String = name.trim().chars().take(MAX_NAME).collect();
        let ceremony = Ceremony {
            purpose: Purpose::Register,
            user_id: Some(user.id.clone()),
            binding: binding.to_string(),
            name: Some(if name.is_empty() {
                "Security key".into()
            } else {
                name
            }),
            state,
        };
        self.store(ceremony, options).await
    }

    /// Finishes a registration and stores the key.
    pub async fn finish_registration(
        &self,
        ceremony: &str,
        binding: &str,
        user: &User,
        reg: &RegisterPublicKeyCredential,
        client: &Client,
    ) -> Result<Registered, FlowError> {
        let event = "webauthn_registered";
        let Some(c) = self
            .take(ceremony, Purpose::Register, binding, Some(&user.id))
            .await?
        else {
            self.audit_user(event, "failure", Some(user), "ceremony_expired", client)
                .await;
            return Ok(Registered::Refused(Refusal::Expired));
        };
        let verified = match &c.state {
            CeremonyState::Passkey(st) => self.webauthn.finish_passkey_registration(reg, st),
            CeremonyState::SecurityKey(st) => self
                .webauthn
                .finish_securitykey_registration(reg, st)
                .and_then(|sk| rewrap(&sk).map_err(|_| WebauthnError::Configuration)),
            _ => Err(WebauthnError::InvalidClientDataType),
        };
        let passkey = match verified {
            Ok(p) => p,
            Err(e) => {
                let reason = failure_reason(&e);
                tracing::debug!(error = %e, "registration refused");
                self.audit_user(event, "failure", Some(user), reason, client)
                    .await;
                return Ok(Registered::Refused(Refusal::Rejected(reason)));
            }
        };
        let cred = WebauthnCredential {
            id: Uuid::new_v4().to_string(),
            user_id: user.id.clone(),
            credential_id: encode_id(passkey.cred_id().as_ref()),
            passkey: serde_json::to_string(&passkey).map_err(internal)?,
            name: c.name.unwrap_or_default(),
            aaguid: aaguid(reg),
            sign_count: 0,
            created_at: self.flow.clock.now(),
            last_used_at: None,
            suspended_at: None,
            suspended_reason: None,
        };
        match self.flow.durable.add_webauthn_credential(&cred).await {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                self.audit_user(event, "failure", Some(user), "credential_exists", client)
                    .await;
                return Ok(Registered::Refused(Refusal::Rejected("credential_exists")));
            }
            Err(e) => return Err(e.into()),
        }
        self.audit_user(event, "success", Some(user), "registered", client)
            .await;
        Ok(Registered::Stored(Box::new(cred)))
    }

    /// Starts a key ceremony as the second factor of a session waiting for one; `None` when
    /// the user has no usable key.
    pub async fn start_second_factor(
        &self,
        session: &Session,
        binding: &str,
    ) -> Result<Option<Started>, FlowError> {
        let keys: Vec<Passkey> = self
            .usable(&session.user_id)
            .await?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        if keys.is_empty() {
            return Ok(None);
        }
        let (options, state) = match self.uv {
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
        let ceremony = Ceremony {
            purpose: Purpose::SecondFactor,
            user_id: Some(session.user_id.clone()),
            binding: binding.to_string(),
            name: None,
            state,
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
        let Some(user) = self.flow.active_user(&session.user_id).await? else {
            return Ok(CodeOutcome::Restart);
        };
        if let Some(retry_after) = self.flow.code_budget_spent(&user.id).await? {
            self.audit_user(EVENT, "denied", Some(&user), "throttled", client)
                .await;
            return Ok(CodeOutcome::Throttled { retry_after });
        }
        let Some(c) = self
            .take(ceremony, Purpose::SecondFactor, binding, Some(&user.id))
            .await?
        else {
            return self
                .flow
                .wrong_code(session, client, EVENT, "ceremony_expired")
                .await;
        };
        let stored = self
            .flow
            .durable
            .webauthn_credential(&encode_id(response.get_credential_id()))
            .await?;
        let stored = match stored {
            Some(s) if s.user_id == user.id && !s.is_suspended() => s,
            Some(s) if s.user_id == user.id => {
                return self
                    .flow
                    .wrong_code(session, client, EVENT, "suspended_credential")
                    .await
            }
            _ => {
                return self
                    .flow
                    .wrong_code(session, client, EVENT, "unknown_credential")
                    .await
            }
        };
        let verified = match &c.state {
            CeremonyState::PasskeyAuth(st) => {
                self.webauthn.finish_passkey_authentication(response, st)
            }
            CeremonyState::SecurityKeyAuth(st) => self
                .webauthn
                .finish_securitykey_authentication(response, st),
            _ => Err(WebauthnError::InvalidClientDataType),
        };
        if let Some(reason) = self.settle(&user, &stored, verified, client).await? {
            return self.flow.wrong_code(session, client, EVENT, reason).await;
        }
        self.flow.complete(session, &user, AMR_KEY);
        self.audit_user(EVENT, "success", Some(&user), AMR_KEY, client)
            .await;
        Ok(CodeOutcome::Accepted)
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
        };
        self.store(ceremony, options).await
    }

    /// Whether the client address has used up its failure budget.
    async fn ip_budget_spent(&self, client: &Client) -> Result<bool, FlowError> {
        Ok(self.flow.count(&format!("fail:ip:{}", client.ip)).await?
            >= self.flow.limits.failures_per_ip)
    }

    async fn passkey_failure(
        &self,
        user: Option<&User>,
        refusal: Refusal,
        client: &Client,
    ) -> Result<PasskeySignIn, FlowError> {
        let reason = match &refusal {
            Refusal::Expired => "ceremony_expired",
            Refusal::Rejected(r) => r,
        };
        self.flow
            .ephemeral
            .incr(&format!("fail:ip:{}", client.ip), self.flow.limits.window)
            .await?;
        self.audit_user("passkey_sign_in", "failure", user, reason, client)
            .await;
        Ok(PasskeySignIn::Refused(refusal))
    }

    /// Finishes a passkey sign-in; on success the caller creates an authenticated session.
    pub async fn finish_passkey(
        &self,
        ceremony: &str,
        binding: &str,
        response: &PublicKeyCredential,
        client: &Client,
    ) -> Result<PasskeySignIn, FlowError> {
        if self.ip_budget_spent(client).await? {
            self.audit_user("passkey_sign_in", "denied", None, "throttled", client)
                .await;
            return Ok(PasskeySignIn::Throttled {
                retry_after: self.flow.limits.window.as_secs(),
            });
        }
        let Some(c) = self.take(ceremony, Purpose::Passkey, binding, None).await? else {
            return self.passkey_failure(None, Refusal::Expired, client).await;
        };
        let CeremonyState::Discoverable(state) = c.state else {
            return self.passkey_failure(None, Refusal::Expired, client).await;
        };
        let rejected = |r| Refusal::Rejected(r);
        let Ok((handle, raw_id)) = self.webauthn.identify_discoverable_authentication(response)
        else {
            return self
                .passkey_failure(None, rejected("no_user_handle"), client)
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
                .passkey_failure(None, rejected("unknown_credential"), client)
                .await;
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

    /// Registration during forced enrolment: the key replaces TOTP as the first second factor;
    /// the session moves on to showing fresh recovery codes.
    pub async fn complete_enrolment(
        &self,
        session: &mut Session,
        user: &User,
    ) -> Result<(), FlowError> {
        let codes = self.flow.issue_recovery_codes(&user.id).await?;
        self.flow.complete(session, user, AMR_KEY);
        session.stage = Stage::ShowRecoveryCodes { codes };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passkey_and_security_key_wrappers_convert() {
        let sk: Result<SecurityKey, _> = rewrap(&serde_json::json!({"cred": 1}));
        assert!(sk.is_err(), "garbage is refused, not accepted");
        let v = serde_json::json!({"cred": {"cred_id": "AA"}});
        let back: serde_json::Value = rewrap(&v).unwrap();
        assert_eq!(back, v);
    }
}
