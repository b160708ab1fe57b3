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
    AttestationCaList, AttestedPasskeyRegistration, DiscoverableAuthentication, Passkey,
    PasskeyAuthentication, PasskeyRegistration, RegisterPublicKeyCredential,
    SecurityKeyAuthentication, SecurityKeyRegistration, Url, Uuid, Webauthn, WebauthnBuilder,
    WebauthnError,
};

use super::flow::{Client, FlowError, LoginFlow, AMR_KEY};
use crate::config::{Attestation, Config, KeyPolicy, UserVerification, WebauthnConfig};
use crate::crypto::{ct_eq, random_token};
use crate::session::Session;
use crate::store::{AuditEvent, StoreError, User, WebauthnCredential};

/// `amr` of a passkey sign-in: the key (`hwk`) verified its user (`user`) itself.
pub const PASSKEY_AMR: [&str; 2] = [AMR_KEY, "user"];
/// Longest key name kept.
pub const MAX_NAME: usize = 64;

/// The most keys an account may hold (suspended ones count): browsers refuse a sign-in whose
/// list of allowed keys is longer than 64, so an account stuffed with keys could never use one.
pub const MAX_KEYS: usize = 16;

/// The longest credential id taken (WebAuthn Level 3 §7.1: longer ones fail registration).
const MAX_CREDENTIAL_ID: usize = 1023;

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
    /// A signed-in user proving themselves again (step-up, admin sudo mode).
    StepUp,
}

/// The webauthn-rs state of one ceremony.
#[derive(Serialize, Deserialize)]
enum CeremonyState {
    Passkey(PasskeyRegistration),
    SecurityKey(SecurityKeyRegistration),
    PasskeyAuth(PasskeyAuthentication),
    SecurityKeyAuth(SecurityKeyAuthentication),
    Discoverable(DiscoverableAuthentication),
    /// Registration that requires a verified attestation and user verification.
    AttestedPasskey(AttestedPasskeyRegistration),
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
    /// Registration under `attestation = "required"`: the models allowed (empty: any model
    /// the trusted CAs vouch for). Fixed when the ceremony starts.
    #[serde(default)]
    attested_models: Option<Vec<Uuid>>,
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
    /// The answer verified but the account's key policy does not accept this key
    /// (`attestation_not_verified`, `aaguid_not_allowed`).
    Policy(&'static str),
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
    /// Global and per-account key policy (`[webauthn]`).
    policy: WebauthnConfig,
    /// Trusted authenticator CAs, loaded when some account requires attestation.
    cas: Option<AttestationCaList>,
    ttl: Duration,
}

mod attestation;
mod decoy;
pub mod models;
mod sign_in;

pub use attestation::attestation_cas;

/// The `credProtect` asked of a new key: asked, never demanded (`enforce… = false`). The
/// attested registration demands it, and a browser then refuses a key without the extension
/// (older CTAP 2.0 keys, Chromium's virtual one) before anything reaches the gateway, with no
/// word of why; user verification is checked on every use of the key anyway where the policy
/// requires it. Where a touch is enough after the password (`user_verification = "preferred"`),
/// level 2 instead of the security-key registration's level 3 ("user verification required"),
/// which browsers refuse unless user verification is required of the whole ceremony: Chromium
/// answers `NotSupportedError` before any key is asked. Level 2 keeps a discoverable credential
/// from being found without the key's PIN or biometric, and lets a touch use it where the
/// sign-in names it (after the password, at a step-up).
fn key_protection(options: &mut serde_json::Value, touch_enough: bool) {
    let Some(ext) = options.pointer_mut("/publicKey/extensions") else {
        return;
    };
    if ext.get("credentialProtectionPolicy").is_none() {
        return;
    }
    if touch_enough {
        ext["credentialProtectionPolicy"] =
            serde_json::Value::from("userVerificationOptionalWithCredentialIDList");
    }
    ext["enforceCredentialProtectionPolicy"] = serde_json::Value::from(false);
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
        let cas = if config.webauthn.any_attestation_required() {
            Some(
                attestation_cas(&config.webauthn.attestation_ca_files)
                    .map_err(SetupError::Invalid)?,
            )
        } else {
            None
        };
        Ok(Self {
            webauthn: Arc::new(webauthn),
            flow,
            policy: config.webauthn.clone(),
            cas,
            ttl: config.webauthn.ceremony_timeout,
        })
    }

    /// The key policy of a user's account.
    fn policy_of(&self, user: &User) -> KeyPolicy {
        self.policy.policy_for(&user.account_id)
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
        let key = ceremony_key(id);
        // Read before it is taken: a ceremony sent by another session (or for another purpose)
        // is refused and left for the one it belongs to, which could otherwise be made to fail.
        let Some(seen) = self.flow.ephemeral.get(&key).await? else {
            return Ok(None);
        };
        let c: Ceremony = serde_json::from_slice(&seen).map_err(corrupt)?;
        let ours = c.purpose == purpose
            && ct_eq(c.binding.as_bytes(), binding.as_bytes())
            && c.user_id.as_deref() == user_id;
        if !ours {
            return Ok(None);
        }
        // Single use: only the request that takes it (the same one it read) goes on.
        let taken = self.flow.ephemeral.take(&key).await?;
        Ok(taken.is_some_and(|t| t == seen).then_some(c))
    }

    async fn audit(&self, ev: AuditEvent, client: &Client) {
        self.flow.audit(ev, client).await;
    }

    /// A throttled attempt, which the attacker can repeat at will: one run per `run` key.
    async fn audit_throttled(
        &self,
        event: &str,
        user: Option<&User>,
        run: String,
        client: &Client,
    ) {
        let mut ev = AuditEvent::new(event, "denied", self.flow.clock.now()).reason("throttled");
        if let Some(u) = user {
            ev = ev.user(u);
        }
        self.flow.audit_repeated(run, ev, client).await;
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

    /// A registration's audit event: an administrator enrolling the key in person at their
    /// browser is its `actor` (the owner did not add it).
    async fn audit_registration(
        &self,
        by_admin: Option<&str>,
        outcome: &str,
        user: Option<&User>,
        reason: &str,
        client: &Client,
    ) {
        let mut ev =
            AuditEvent::new("webauthn_registered", outcome, self.flow.clock.now()).reason(reason);
        if let Some(u) = user {
            ev = ev.user(u);
        }
        if let Some(admin) = by_admin {
            ev = ev.actor(admin);
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

    /// Whether `user` may register another key ([`MAX_KEYS`]).
    pub async fn has_room(&self, user_id: &str) -> Result<bool, FlowError> {
        Ok(self.flow.durable.webauthn_credentials(user_id).await?.len() < MAX_KEYS)
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
        let policy = self.policy_of(user);
        let cas = match policy.attestation {
            Attestation::None => None,
            Attestation::Required => Some(self.cas.clone().ok_or_else(|| {
                FlowError::Internal("attestation required but no CA list loaded".into())
            })?),
        };
        let attested_models = cas.is_some().then(|| policy.allowed_aaguids.clone());
        let (options, state) = match (policy.user_verification, cas) {
            (UserVerification::Required, None) => {
                let (ccr, st) = self
                    .webauthn
                    .start_passkey_registration(handle, &user.email, &user.email, exclude)
                    .map_err(internal)?;
                (ccr, CeremonyState::Passkey(st))
            }
            (UserVerification::Required, Some(cas)) => {
                let (ccr, st) = self
                    .webauthn
                    .start_attested_passkey_registration(
                        handle,
                        &user.email,
                        &user.email,
                        exclude,
                        cas,
                        None,
                    )
                    .map_err(internal)?;
                (ccr, CeremonyState::AttestedPasskey(st))
            }
            (UserVerification::Preferred, cas) => {
                let (ccr, st) = self
                    .webauthn
                    .start_securitykey_registration(
                        handle,
                        &user.email,
                        &user.email,
                        exclude,
                        cas,
                        None,
                    )
                    .map_err(internal)?;
                (ccr, CeremonyState::SecurityKey(st))
            }
        };
        let mut options = serde_json::to_value(options).map_err(internal)?;
        let touch_enough = policy.user_verification == UserVerification::Preferred;
        // Ask for a discoverable credential where the authenticator can keep one, so the key
        // also works for passkey sign-in; security keys with no room still register. Not where
        // a touch is enough: a credential the sign-in names (as the security-key registration
        // asks), since for a discoverable one the browser has a key without a PIN set one first
        // (Chromium: refused where it cannot ask).
        if !touch_enough {
            if let Some(sel) = options.pointer_mut("/publicKey/authenticatorSelection") {
                sel["residentKey"] = serde_json::Value::from("preferred");
            }
        }
        key_protection(&mut options, touch_enough);
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
            attested_models,
        };
        self.store(ceremony, options).await
    }

    /// Finishes a registration and stores the key. `by_admin` names the administrator at whose
    /// browser the key was enrolled in person, for the owner's notice.
    pub async fn finish_registration(
        &self,
        ceremony: &str,
        binding: &str,
        user: &User,
        reg: &RegisterPublicKeyCredential,
        client: &Client,
        by_admin: Option<&str>,
    ) -> Result<Registered, FlowError> {
        let Some(c) = self
            .take(ceremony, Purpose::Register, binding, Some(&user.id))
            .await?
        else {
            self.audit_registration(by_admin, "failure", Some(user), "ceremony_expired", client)
                .await;
            return Ok(Registered::Refused(Refusal::Expired));
        };
        // The credential and the model its attestation vouched for (only when verified).
        let verified = match &c.state {
            CeremonyState::Passkey(st) => self
                .webauthn
                .finish_passkey_registration(reg, st)
                .map(|p| (p, None)),
            CeremonyState::SecurityKey(st) => self
                .webauthn
                .finish_securitykey_registration(reg, st)
                .and_then(|sk| {
                    let model = attestation::attested_model(sk.attestation());
                    let p = rewrap(&sk).map_err(|_| WebauthnError::Configuration)?;
                    Ok((p, model))
                }),
            CeremonyState::AttestedPasskey(st) => self
                .webauthn
                .finish_attested_passkey_registration(reg, st)
                .map(|ap| {
                    let model = attestation::attested_model(ap.attestation());
                    (Passkey::from(ap), model)
                }),
            _ => Err(WebauthnError::InvalidClientDataType),
        };
        let (passkey, model) = match verified {
            Ok(p) => p,
            Err(e) => {
                let policy = c.attested_models.is_some() && attestation::is_attestation_failure(&e);
                let (refusal, reason) = if policy {
                    let reason = "attestation_not_verified";
                    (Refusal::Policy(reason), reason)
                } else {
                    let reason = failure_reason(&e);
                    (Refusal::Rejected(reason), reason)
                };
                tracing::debug!(error = %e, "registration refused");
                self.audit_registration(by_admin, "failure", Some(user), reason, client)
                    .await;
                return Ok(Registered::Refused(refusal));
            }
        };
        if passkey.cred_id().as_ref().len() > MAX_CREDENTIAL_ID {
            let reason = "credential_id_too_long";
            self.audit_registration(by_admin, "failure", Some(user), reason, client)
                .await;
            return Ok(Registered::Refused(Refusal::Rejected(reason)));
        }
        if !self.has_room(&user.id).await? {
            let reason = "too_many_keys";
            self.audit_registration(by_admin, "failure", Some(user), reason, client)
                .await;
            return Ok(Registered::Refused(Refusal::Policy(reason)));
        }
        if let Some(allowed) = &c.attested_models {
            if !attestation::model_allowed(model, allowed) {
                let reason = "aaguid_not_allowed";
                self.audit_registration(by_admin, "failure", Some(user), reason, client)
                    .await;
                return Ok(Registered::Refused(Refusal::Policy(reason)));
            }
        }
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
                self.audit_registration(
                    by_admin,
                    "failure",
                    Some(user),
                    "credential_exists",
                    client,
                )
                .await;
                return Ok(Registered::Refused(Refusal::Rejected("credential_exists")));
            }
            Err(e) => return Err(e.into()),
        }
        self.audit_registration(by_admin, "success", Some(user), "registered", client)
            .await;
        let notifier = &self.flow.notifier;
        match by_admin {
            None => {
                notifier
                    .account_change_by_owner(
                        user,
                        &crate::notify::Notifier::key_change(
                            "a security key or passkey was added",
                            &cred.name,
                        ),
                    )
                    .await;
            }
            Some(admin) => {
                notifier
                    .admin_change(
                        user,
                        &crate::notify::Notifier::key_change(
                            &format!(
                                "an administrator ({admin}) enrolled a security key or passkey \
                                 for you in person"
                            ),
                            &cred.name,
                        ),
                    )
                    .await;
            }
        }
        Ok(Registered::Stored(Box::new(cred)))
    }

    /// Registration during forced enrolment: the key replaces TOTP as the first second factor;
    /// the session moves on to showing fresh recovery codes (where the account has none left).
    pub async fn complete_enrolment(
        &self,
        session: &mut Session,
        user: &User,
        client: &Client,
    ) -> Result<(), FlowError> {
        self.flow.enrolment_done(&user.id).await?;
        // The sign-in this completes, on the record as `totp_enrolled` records an app's.
        let ev = AuditEvent::new("webauthn_enrolled", "success", self.flow.clock.now()).user(user);
        self.audit(ev, client).await;
        // No recovery codes where they would not be accepted: the account signs in with keys
        // and passkeys only.
        let codes = if self.policy.requires_phishing_resistant(&user.account_id) {
            None
        } else {
            self.flow.enrolment_recovery_codes(&user.id).await?
        };
        self.flow.complete(session, user, AMR_KEY);
        match codes {
            Some(codes) => self.flow.show_recovery_codes(session, &user.id, &codes),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use webauthn_rs::prelude::SecurityKey;

    #[test]
    fn passkey_and_security_key_wrappers_convert() {
        let sk: Result<SecurityKey, _> = rewrap(&serde_json::json!({"cred": 1}));
        assert!(sk.is_err(), "garbage is refused, not accepted");
        let v = serde_json::json!({"cred": {"cred_id": "AA"}});
        let back: serde_json::Value = rewrap(&v).unwrap();
        assert_eq!(back, v);
    }
}
