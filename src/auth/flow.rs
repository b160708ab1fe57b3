//! The sign-in state machine, free of HTTP: password step, second-factor step, TOTP enrolment.
//! Each step returns an outcome the web layer turns into a page; every decision is audited and
//! every guess is counted (per account and per client address) before any expensive work.

use std::sync::Arc;
use std::time::Duration;

use super::password::{PasswordError, PasswordHasher};
use super::{recovery, totp};
use crate::audit::Audit;
use crate::clock::Clock;
use crate::config::LimitsConfig;
use crate::crypto::MasterKey;
use crate::secret::Secret;
use crate::session::{Session, Stage};
use crate::store::{AuditEvent, DurableStore, EphemeralStore, StoreError, TotpRecord, User};

mod password_step;
mod self_service;
mod throttle;
pub use password_step::PasswordCheck;
pub use self_service::{TotpChange, TOTP_CHANGE_TTL};
pub(crate) use throttle::{address_counter, device_counter, Reservation};
pub use throttle::{awaits_factor_first, awaits_password, delay_for, KnownDevice};

/// Who is signing in, for audit and throttling.
#[derive(Debug, Clone)]
pub struct Client {
    pub ip: String,
    pub user_agent: String,
}

/// Failures that are not a "no": the caller answers 503.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sign-in is busy; try again in a moment")]
    Busy,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<PasswordError> for FlowError {
    fn from(e: PasswordError) -> Self {
        match e {
            PasswordError::Busy => FlowError::Busy,
            PasswordError::Internal(m) => FlowError::Internal(m),
        }
    }
}

/// Result of the password step.
#[derive(Debug)]
pub enum PasswordOutcome {
    /// Password right; the session to create (second factor or enrolment still to do).
    Proceed {
        user: Box<User>,
        session: Box<Session>,
    },

    /// Wrong email or password (deliberately indistinguishable), or account disabled or
    /// locked: a right password on such an account answers as a wrong one, so it confirms no
    /// guess.
    Denied,
    /// Too many failures; try again after this many seconds.
    Throttled { retry_after: u64 },
    /// The account had too many consecutive wrong passwords: the password was not checked;
    /// this session asks for the second factor first, then for the password.
    FactorFirst { session: Box<Session> },
}

/// Result of a second-factor or enrolment step.
#[derive(Debug)]
pub enum CodeOutcome {
    /// Code right; the session has moved on (caller rotates the id).
    Accepted,
    /// Code wrong, replayed or malformed; try again.
    Rejected,
    /// Too many wrong codes in this sign-in: it is over, start again from the password.
    Restart,
    /// Policy requires a security key or passkey for this user: codes do not complete it.
    KeyRequired,
    Throttled {
        retry_after: u64,
    },
}

/// Everything the sign-in needs.
#[derive(Debug, Clone)]
pub struct LoginFlow {
    pub durable: Arc<dyn DurableStore>,
    pub ephemeral: Arc<dyn EphemeralStore>,
    pub hasher: Arc<PasswordHasher>,
    pub master_key: Arc<MasterKey>,
    pub clock: Arc<dyn Clock>,
    pub limits: LimitsConfig,
    pub audit: Audit,
    /// Issuer name shown in authenticator apps.
    pub totp_issuer: String,
    /// Tells owners about changes to how their account is protected.
    pub notifier: Arc<crate::notify::Notifier>,
    /// Who must sign in with a key (`webauthn.require_phishing_resistant`, per account).
    pub webauthn_policy: crate::config::WebauthnConfig,
    /// Sign-in results, step-ups and throttled attempts are counted here.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// `amr` value of a recovery code.
pub const AMR_RECOVERY: &str = "rec";
/// How long an enrolment begun from an enrolment link may take (ms), when
/// `session.login_timeout` is shorter: setting up an authenticator app may mean installing one.
pub const LINK_ENROLMENT_MS: i64 = 60 * 60 * 1000;
/// `acr` of a password plus a second factor.
pub const ACR_MFA: &str = "urn:portcullis:acr:mfa";
/// `amr` value of a security key or passkey (proof of possession of a hardware-bound key).
pub const AMR_KEY: &str = "hwk";
/// `acr` of a sign-in completed with a security key or passkey: phishing-resistant, because
/// the key signs the origin it was used on.
pub const ACR_PHISHING_RESISTANT: &str = "urn:portcullis:acr:phr";

/// The `acr` of a session's latest proof (the one at `auth_time`): phishing-resistant only when
/// that proof was a security key or passkey, whatever the session used before.
pub fn acr_for(session: &Session) -> &'static str {
    // `strong_ms` is set to the very `auth_ms` of a key proof; a later code moves `auth_ms` on.
    if session.strong_ms.is_some_and(|s| s >= session.auth_ms) {
        ACR_PHISHING_RESISTANT
    } else {
        ACR_MFA
    }
}

impl LoginFlow {
    fn window(&self) -> Duration {
        self.limits.window
    }

    pub(crate) async fn count(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self
            .ephemeral
            .get(key)
            .await?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0))
    }

    /// Takes one attempt from each `(counter, limit)` budget. When any is spent, every
    /// reservation is returned and the spent budget named.
    pub(crate) async fn reserve(
        &self,
        budgets: &[(String, u64)],
    ) -> Result<Reservation, StoreError> {
        let mut keys = Vec::with_capacity(budgets.len());
        let mut prior = 0;
        for (key, limit) in budgets {
            let n = self.ephemeral.incr(key, self.window()).await?;
            keys.push(key.clone());
            if n > *limit {
                self.metrics.throttled(key);
                self.release(&keys).await?;
                return Ok(Reservation::Spent {
                    counter: key.clone(),
                });
            }
            prior = prior.max(n - 1);
        }
        Ok(Reservation::Taken { keys, prior })
    }

    /// Returns reserved attempts.
    pub(crate) async fn release(&self, keys: &[String]) -> Result<(), StoreError> {
        for k in keys {
            self.ephemeral.decr(k).await?;
        }
        Ok(())
    }

    /// Whether policy holds `user` to phishing-resistant sign-in, or this sign-in scored high
    /// risk with a key on the account (`risk_key`); audits the refusal of a code.
    async fn key_required(&self, user: &User, risk_key: bool, client: &Client) -> bool {
        let reason = if self
            .webauthn_policy
            .requires_phishing_resistant(&user.account_id)
        {
            "phishing_resistant_required"
        } else if risk_key {
            "high_risk"
        } else {
            return false;
        };
        self.audit(
            AuditEvent::new("second_factor", "denied", self.clock.now())
                .user(user)
                .reason(reason),
            client,
        )
        .await;
        true
    }

    pub(crate) async fn audit(&self, ev: AuditEvent, client: &Client) {
        self.metrics.sign_in_event(&ev);
        self.audit
            .record(ev.client(&client.ip, &client.user_agent))
            .await;
    }

    /// [`LoginFlow::audit`] for a refusal an attacker can repeat at will, one run per `run` key
    /// (see [`Audit::record_repeated`]).
    pub(crate) async fn audit_repeated(&self, run: String, ev: AuditEvent, client: &Client) {
        self.metrics.sign_in_event(&ev);
        self.audit
            .record_repeated(run, ev.client(&client.ip, &client.user_agent))
            .await;
    }

    /// The session of a user who opened a valid enrolment link: straight to enrolment (a new
    /// authenticator app, or a security key; only a key when `key_only`). The link stands in for
    /// the password step, so it is audited like one.
    pub async fn link_enrolment_session(
        &self,
        user: &User,
        key_only: bool,
        password_set: bool,
        client: &Client,
    ) -> Result<Session, FlowError> {
        let stage = Stage::EnrolTotp {
            sealed_secret: self.new_sealed_secret(&user.id)?,
            key_only,
            first: !crate::store::has_second_factor(self.durable.as_ref(), &user.id).await?,
        };
        let now = self.clock.now();
        self.audit(
            AuditEvent::new("enrolment_link_used", "success", now).user(user),
            client,
        )
        .await;
        // An administrator's link leads on to the admin console, a customer's to the console.
        let on_to = user
            .is_admin
            .then(|| crate::http::admin::PREFIX.to_string());
        let mut session = Session::after_password(
            &user.id,
            stage,
            self.clock.now_millis(),
            &client.ip,
            &client.user_agent,
            on_to,
        );
        // Time to install an authenticator app: the link is used, a new one takes an admin.
        session.pending_ms = Some(LINK_ENROLMENT_MS);
        if !password_set {
            // The link stood in for a password the account keeps: none was typed, and the
            // token's `amr` will not say one was.
            session.amr.clear();
        }
        Ok(session)
    }

    fn new_sealed_secret(&self, user_id: &str) -> Result<Vec<u8>, FlowError> {
        let secret = totp::generate_secret();
        self.master_key
            .seal(&enrol_context(user_id), secret.expose())
            .map_err(|e| FlowError::Internal(e.to_string()))
    }

    /// Records that the authenticator secret of the enrolment in `session` is on show. True
    /// when another one was shown to the account before and never confirmed (a sign-in given up
    /// half-way, started again): its entry in the owner's app will never give a right code,
    /// which the page must say. (Call [`LoginFlow::enrolment_overtaken`] first: a page of a
    /// setup begun before the one shown last is not shown again.)
    pub async fn enrolment_secret_shown(&self, session: &Session) -> Result<bool, FlowError> {
        let Stage::EnrolTotp { sealed_secret, .. } = &session.stage else {
            return Ok(false);
        };
        let mark = ShownMark::of(sealed_secret, session.created_ms);
        let key = enrol_shown_key(&session.user_id);
        let before = self.ephemeral.get(&key).await?.map(|b| ShownMark::read(&b));
        if before.as_ref().is_some_and(|b| b.digest == mark.digest) {
            return Ok(false);
        }
        self.ephemeral
            .put(&key, &mark.bytes(), ENROL_SHOWN_TTL)
            .await?;
        Ok(before.is_some())
    }

    /// Why the setup in `session` may no longer complete, as a sign-in page notice: a second
    /// factor was set up for the account from another sign-in since this one began with none
    /// (`enrol_elsewhere`: one wins, and the other is told rather than silently replacing it),
    /// or the setup was begun again and another secret shown since (`enrol_superseded`: the
    /// page that showed it said this one no longer works). Where the page is to be `showing`
    /// again, only a setup begun later than this one overtakes it (a reload of the latest page,
    /// or the first showing of a new one, goes on).
    pub async fn enrolment_overtaken(
        &self,
        session: &Session,
        showing: bool,
    ) -> Result<Option<&'static str>, FlowError> {
        let Stage::EnrolTotp {
            sealed_secret,
            first,
            ..
        } = &session.stage
        else {
            return Ok(None);
        };
        if *first
            && crate::store::has_second_factor(self.durable.as_ref(), &session.user_id).await?
        {
            return Ok(Some(ENROL_ELSEWHERE));
        }
        let mine = ShownMark::of(sealed_secret, session.created_ms);
        let Some(shown) = self
            .ephemeral
            .get(&enrol_shown_key(&session.user_id))
            .await?
        else {
            return Ok(None);
        };
        let shown = ShownMark::read(&shown);
        if shown.digest != mine.digest && (!showing || shown.begun_ms > mine.begun_ms) {
            return Ok(Some(ENROL_SUPERSEDED));
        }
        Ok(None)
    }

    /// An enrolment is done (app or key): no secret shown before is pending any more.
    pub(crate) async fn enrolment_done(&self, user_id: &str) -> Result<(), FlowError> {
        Ok(self.ephemeral.delete(&enrol_shown_key(user_id)).await?)
    }

    /// The secret being enrolled, for the QR code page.
    pub fn enrolment_secret(
        &self,
        session: &Session,
    ) -> Result<Option<Secret<Vec<u8>>>, FlowError> {
        let Stage::EnrolTotp { sealed_secret, .. } = &session.stage else {
            return Ok(None);
        };
        let plain = self
            .master_key
            .open(&enrol_context(&session.user_id), sealed_secret)
            .map_err(|e| FlowError::Internal(e.to_string()))?;
        Ok(Some(Secret::new(plain.to_vec())))
    }

    /// Checks the per-account second-factor budget; `Some(retry_after)` when exhausted.
    /// Takes one second-factor attempt from the account's and the address's budgets before the
    /// code or key is checked (so concurrent guesses cannot all pass); `Some(retry_after)` when
    /// a budget is spent. A wrong answer keeps the attempt; a right one gives it back with
    /// [`LoginFlow::code_attempt_settled`].
    pub(crate) async fn code_budget_spent(
        &self,
        user_id: &str,
        device: Option<&str>,
        client: &Client,
    ) -> Result<Option<u64>, StoreError> {
        let budgets = code_budgets(user_id, device, client, &self.limits);
        Ok(match self.reserve(&budgets).await? {
            Reservation::Taken { .. } => None,
            Reservation::Spent { .. } => Some(self.window().as_secs()),
        })
    }

    /// Gives back the attempt taken by [`LoginFlow::code_budget_spent`]: the answer was right
    /// (or refused by policy, not as a guess).
    pub(crate) async fn code_attempt_settled(
        &self,
        user_id: &str,
        device: Option<&str>,
        client: &Client,
    ) -> Result<(), StoreError> {
        let keys: Vec<String> = code_budgets(user_id, device, client, &self.limits)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        self.release(&keys).await
    }

    /// Counts a wrong code; returns whether this sign-in must restart.
    pub(crate) async fn wrong_code(
        &self,
        session: &mut Session,
        client: &Client,
        event: &str,
        reason: &str,
    ) -> Result<CodeOutcome, FlowError> {
        // The attempt was already counted by `code_budget_spent`.
        let now = self.clock.now();
        session.failed_codes += 1;
        let mut ev = AuditEvent::new(event, "failure", now).reason(reason);
        if let Some(u) = self.durable.user_by_id(&session.user_id).await? {
            ev = ev.user(&u);
        }
        self.audit(ev, client).await;
        if u64::from(session.failed_codes) >= self.limits.second_factor_failures_per_login {
            self.metrics.sign_in_codes_spent();
            return Ok(CodeOutcome::Restart);
        }
        Ok(CodeOutcome::Rejected)
    }

    /// Whether the user (still) exists and may sign in.
    pub(crate) async fn active_user(&self, user_id: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .durable
            .user_by_id(user_id)
            .await?
            .filter(|u| !u.disabled))
    }

    /// Step 2: a TOTP code or a recovery code. On success the session becomes authenticated.
    pub async fn second_factor_step(
        &self,
        session: &mut Session,
        code: &Secret<String>,
        client: &Client,
    ) -> Result<CodeOutcome, FlowError> {
        if session.stage != Stage::SecondFactor || awaits_password(session) {
            return Ok(CodeOutcome::Restart);
        }
        // A decoy (no account behind it: the lookup under its made-up id finds nothing) and an
        // account disabled (or gone) since are answered alike, after the same work as for an
        // account, so that a sign-in switched to second factor first tells none of them apart.
        let user = self.active_user(&session.user_id).await?;
        let Some(user) = user.filter(|_| !session.decoy) else {
            let why = if session.decoy {
                "bad_code"
            } else {
                "user_disabled"
            };
            return self.code_without_account(session, code, client, why).await;
        };
        if let Some(retry_after) = self
            .code_budget_spent(&user.id, session.own_device(), client)
            .await?
        {
            self.audit_repeated(
                user.id.clone(),
                AuditEvent::new("second_factor", "denied", self.clock.now())
                    .user(&user)
                    .reason("throttled"),
                client,
            )
            .await;
            return Ok(CodeOutcome::Throttled { retry_after });
        }
        // A high-risk sign-in wants the key, but takes a recovery code too: a code kept on paper
        // is no easier to steal than the key, and it is the owner's way in without the key.
        let recovery = recovery::looks_like_recovery_code(code.expose().trim());
        if self
            .key_required(&user, session.risk_key && !recovery, client)
            .await
        {
            self.code_attempt_settled(&user.id, session.own_device(), client)
                .await?;
            return Ok(CodeOutcome::KeyRequired);
        }
        let input = code.expose().trim();
        let method = if recovery::looks_like_recovery_code(input) {
            let Some(norm) = recovery::normalise(input) else {
                return self
                    .wrong_code(session, client, "second_factor", "malformed_code")
                    .await;
            };
            let hash = self.master_key.recovery_code_hash(&norm);
            if !self
                .durable
                .consume_recovery_code(&user.id, &hash, self.clock.now())
                .await?
            {
                return self
                    .wrong_code(session, client, "second_factor", "bad_recovery_code")
                    .await;
            }
            AMR_RECOVERY
        } else {
            let Some(rec) = self.durable.totp(&user.id).await? else {
                // A user with security keys only: a code can only be a wrong one.
                return self
                    .wrong_code(session, client, "second_factor", "no_totp")
                    .await;
            };
            let secret = self
                .master_key
                .open(&totp_context(&user.id), &rec.secret_sealed)
                .map_err(|e| FlowError::Internal(e.to_string()))?;
            let Some(step) = totp::matching_step(&secret, input, self.clock.now()) else {
                return self
                    .wrong_code(session, client, "second_factor", "bad_code")
                    .await;
            };
            if !self.claim_step(&user.id, step).await? {
                return self
                    .wrong_code(session, client, "second_factor", "replayed_code")
                    .await;
            }
            "otp"
        };
        self.code_attempt_settled(&user.id, session.own_device(), client)
            .await?;
        self.complete(session, &user, method);
        let ev = AuditEvent::new("second_factor", "success", self.clock.now())
            .user(&user)
            .reason(method);
        self.audit(ev, client).await;
        if method == AMR_RECOVERY {
            let left = self.durable.recovery_codes_left(&user.id).await?;
            self.audit(
                AuditEvent::new("recovery_code_used", "success", self.clock.now())
                    .user(&user)
                    .reason(&format!("{left}_left")),
                client,
            )
            .await;
            self.notifier
                .account_change_by_owner(
                    &user,
                    &format!("a recovery code was used to sign in ({left} left)"),
                )
                .await;
        }
        Ok(CodeOutcome::Accepted)
    }

    /// [`LoginFlow::second_factor_step`] for a sign-in with no account that may sign in behind it
    /// (a decoy, or one disabled since): every code is wrong, counted, throttled and audited as
    /// for an account, after the same lookups and checks (the app's record read, a secret
    /// opened and the code checked against it, or a recovery code looked up), so that neither
    /// the answer nor its time differs.
    async fn code_without_account(
        &self,
        session: &mut Session,
        code: &Secret<String>,
        client: &Client,
        why: &str,
    ) -> Result<CodeOutcome, FlowError> {
        let id = session.user_id.clone();
        if let Some(retry_after) = self
            .code_budget_spent(&id, session.own_device(), client)
            .await?
        {
            let ev =
                AuditEvent::new("second_factor", "denied", self.clock.now()).reason("throttled");
            self.audit_repeated(id, ev, client).await;
            return Ok(CodeOutcome::Throttled { retry_after });
        }
        let input = code.expose().trim();
        if recovery::looks_like_recovery_code(input) {
            if let Some(norm) = recovery::normalise(input) {
                let hash = self.master_key.recovery_code_hash(&norm);
                self.durable
                    .consume_recovery_code(&id, &hash, self.clock.now())
                    .await?;
            }
        } else {
            self.durable.totp(&id).await?;
            let context = totp_context(&id);
            let crypto = |e: crate::crypto::CryptoError| FlowError::Internal(e.to_string());
            let sealed = self.master_key.seal(&context, &[0; 20]).map_err(crypto)?;
            let secret = self.master_key.open(&context, &sealed).map_err(crypto)?;
            let _ = totp::matching_step(&secret, input, self.clock.now());
        }
        self.wrong_code(session, client, "second_factor", why).await
    }

    /// Records that a TOTP step was used: each step is accepted at most once per user, and never
    /// an older step after a newer one (so a code seen over a shoulder is worthless once used).
    pub(crate) async fn claim_step(&self, user_id: &str, step: u64) -> Result<bool, StoreError> {
        self.ephemeral
            .set_if_greater(
                &format!("totp_step:{{{user_id}}}"),
                step,
                Duration::from_secs(10 * 60),
            )
            .await
    }

    /// [`LoginFlow::claim_step`] for the app being set up with `secret`: each step confirms it at
    /// most once (two confirmations of one session are also taken one at a time, and the second
    /// finds the sign-in complete). The step is then recorded as used for sign-in too, so the
    /// confirming code does not also sign in; it may equal a step used moments ago with the
    /// account's earlier secret (a sign-in just before an enrolment link was used), which is no
    /// replay of this one.
    async fn claim_enrolment(
        &self,
        user_id: &str,
        secret: &[u8],
        step: u64,
    ) -> Result<bool, StoreError> {
        // Keyed, as every name the stores keep of a secret is.
        let digest = hex::encode(
            self.master_key
                .link_mac_parts(&[b"totp-enrolment\0", secret]),
        );
        let first = self
            .ephemeral
            .set_if_greater(
                &format!("totp_enrol_step:{{{user_id}}}:{}", &digest[..32]),
                step,
                Duration::from_secs(10 * 60),
            )
            .await?;
        if first {
            self.claim_step(user_id, step).await?;
        }
        Ok(first)
    }

    /// The session has passed `method`: complete, or (when the second factor came first and
    /// the password is still to come) waiting for the password.
    pub(crate) fn complete(&self, session: &mut Session, user: &User, method: &str) {
        if awaits_factor_first(session) {
            session.amr = vec![method.into()];
            session.failed_codes = 0;
            return;
        }
        // An enrolment through a link that stood in for the password has none to name.
        let linked = session.amr.is_empty() && matches!(session.stage, Stage::EnrolTotp { .. });
        session.stage = Stage::Authenticated;
        session.amr = if linked {
            vec![method.into()]
        } else {
            vec!["pwd".into(), method.into()]
        };
        let now = self.clock.now_millis();
        session.auth_ms = now;
        session.created_ms = now;
        session.last_seen_ms = now;
        session.failed_codes = 0;
        session.user_id = user.id.clone();
        session.strong_ms = (method == AMR_KEY).then_some(now);
        // A remembered device's key stands in for the second factor at sign-in, but is not one.
        session.factor_ms = (method != crate::http::remembered::AMR_DEVICE).then_some(now);
    }

    /// Enrolment: the code from the new authenticator confirms the secret; the factor and ten
    /// fresh recovery codes are stored. The codes (plain) are returned once, for display.
    pub async fn confirm_enrolment(
        &self,
        session: &mut Session,
        code: &Secret<String>,
        client: &Client,
    ) -> Result<CodeOutcome, FlowError> {
        let Some(secret) = self.enrolment_secret(session)? else {
            return Ok(CodeOutcome::Restart);
        };
        let Some(user) = self.active_user(&session.user_id).await? else {
            return Ok(CodeOutcome::Restart);
        };
        if self.key_required(&user, false, client).await
            || matches!(session.stage, Stage::EnrolTotp { key_only: true, .. })
        {
            return Ok(CodeOutcome::KeyRequired);
        }
        if let Some(retry_after) = self
            .code_budget_spent(&user.id, session.own_device(), client)
            .await?
        {
            return Ok(CodeOutcome::Throttled { retry_after });
        }
        let now = self.clock.now();
        let Some(step) = totp::matching_step(secret.expose(), code.expose().trim(), now) else {
            return self
                .wrong_code(session, client, "totp_enrolment", "bad_code")
                .await;
        };
        if !self
            .claim_enrolment(&user.id, secret.expose(), step)
            .await?
        {
            return self
                .wrong_code(session, client, "totp_enrolment", "replayed_code")
                .await;
        }
        self.install_totp(&user.id, &secret, now).await?;
        self.enrolment_done(&user.id).await?;
        let codes = self.enrolment_recovery_codes(&user.id).await?;
        self.audit(
            AuditEvent::new("totp_enrolled", "success", now).user(&user),
            client,
        )
        .await;
        self.notifier
            .account_change_by_owner(&user, "an authenticator app was set up as a second factor")
            .await;
        self.code_attempt_settled(&user.id, session.own_device(), client)
            .await?;
        self.complete(session, &user, "otp");
        if let Some(codes) = codes {
            self.show_recovery_codes(session, &user.id, &codes)?;
        }
        Ok(CodeOutcome::Accepted)
    }

    /// The recovery codes an enrolment shows: fresh ones for an account that has none left, or
    /// `None` where the owner still holds some (an enrolment link used to add a factor to an
    /// account that has one): those are kept, not voided behind the owner's back.
    pub(crate) async fn enrolment_recovery_codes(
        &self,
        user_id: &str,
    ) -> Result<Option<Vec<String>>, FlowError> {
        if self.durable.recovery_codes_left(user_id).await? > 0 {
            return Ok(None);
        }
        self.issue_recovery_codes(user_id).await.map(Some)
    }

    /// Stores a confirmed TOTP secret (sealed) as the user's factor, replacing any earlier one.
    async fn install_totp(
        &self,
        user_id: &str,
        secret: &Secret<Vec<u8>>,
        now: crate::clock::UnixTime,
    ) -> Result<(), FlowError> {
        let sealed = self
            .master_key
            .seal(&totp_context(user_id), secret.expose())
            .map_err(|e| FlowError::Internal(e.to_string()))?;
        self.durable
            .set_totp(TotpRecord {
                user_id: user_id.to_string(),
                secret_sealed: sealed,
                created_at: now,
            })
            .await?;
        Ok(())
    }

    /// Moves the session to showing fresh recovery codes, held sealed in the session record.
    pub fn show_recovery_codes(
        &self,
        session: &mut Session,
        user_id: &str,
        codes: &[String],
    ) -> Result<(), FlowError> {
        let sealed_codes = self.seal_recovery_codes(user_id, codes)?;
        session.stage = Stage::ShowRecoveryCodes { sealed_codes };
        Ok(())
    }

    /// Recovery codes sealed to be shown once (one per line), so a shared ephemeral store
    /// (Redis) never holds them in clear.
    pub fn seal_recovery_codes(
        &self,
        user_id: &str,
        codes: &[String],
    ) -> Result<Vec<u8>, FlowError> {
        let joined = zeroize::Zeroizing::new(codes.join("\n"));
        self.master_key
            .seal(&recovery_show_context(user_id), joined.as_bytes())
            .map_err(|e| FlowError::Internal(e.to_string()))
    }

    /// Replaces a user's recovery codes; returns the new ones in plain text (show once).
    pub async fn issue_recovery_codes(&self, user_id: &str) -> Result<Vec<String>, FlowError> {
        let codes = recovery::generate();
        let hashes: Vec<String> = codes
            .iter()
            .filter_map(|c| recovery::normalise(c.expose()))
            .map(|n| self.master_key.recovery_code_hash(&n))
            .collect();
        self.durable
            .set_recovery_codes(user_id, &hashes, self.clock.now())
            .await?;
        Ok(codes.iter().map(|c| c.expose().clone()).collect())
    }

    /// After a complete sign-in: the account's consecutive failures start over, and so does
    /// its failure budget — unless the sign-in came from a known device, whose own budget it
    /// used: then failures from elsewhere still stand against their senders.
    pub async fn forget_failures(&self, user: &User, known_device: bool) -> Result<(), StoreError> {
        self.forget_consecutive(user).await?;
        if known_device {
            return Ok(());
        }
        self.ephemeral
            .delete(&throttle::account_counter(&user.email))
            .await
    }
}

/// Sealing context of a confirmed TOTP secret.
pub fn totp_context(user_id: &str) -> String {
    format!("totp:{user_id}")
}

/// The budgets a second-factor attempt draws on: the account's wrong codes and the address's
/// failed steps; from the user's own known device (`device`), a budget of that device's wrong
/// codes instead, as large as the account's, which nobody elsewhere can spend, and a ceiling
/// over all the account's known devices together (three times the account's), so that someone
/// holding several device cookies cannot multiply the guesses.
fn code_budgets(
    user_id: &str,
    device: Option<&str>,
    client: &Client,
    limits: &LimitsConfig,
) -> Vec<(String, u64)> {
    if let Some(id) = device {
        return vec![
            (
                format!("fail:code:dev:{{{id}}}"),
                limits.second_factor_failures_per_account,
            ),
            (
                format!("fail:code:known:{{{user_id}}}"),
                limits.second_factor_failures_per_account.saturating_mul(3),
            ),
        ];
    }
    vec![
        (
            format!("fail:code:{{{user_id}}}"),
            limits.second_factor_failures_per_account,
        ),
        (throttle::address_counter(client), limits.failures_per_ip),
    ]
}

/// The network a client address belongs to for throttling: its /24 (IPv4) or /64 (IPv6), so
/// an attacker rotating through neighbouring addresses shares one budget.
pub fn network_of(ip: &str) -> String {
    let parsed = ip.parse::<std::net::IpAddr>().map(|a| a.to_canonical());
    match parsed {
        Ok(std::net::IpAddr::V4(v4)) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => ip.to_string(),
    }
}

/// Sealing context of fresh recovery codes held in a session until they are shown.
pub fn recovery_show_context(user_id: &str) -> String {
    format!("recovery-show:{user_id}")
}

/// How long the page remembers an enrolment secret it showed and that was never confirmed.
const ENROL_SHOWN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What is kept of the enrolment secret shown last to a user: its digest (SHA-256 of the
/// sealed secret) and when its sign-in began (Unix ms), which tells a later setup from an
/// earlier one.
struct ShownMark {
    digest: [u8; 32],
    begun_ms: i64,
}

impl ShownMark {
    fn of(sealed_secret: &[u8], begun_ms: i64) -> Self {
        use sha2::Digest;
        Self {
            digest: sha2::Sha256::digest(sealed_secret).into(),
            begun_ms,
        }
    }

    /// A stored mark (a digest alone, as written before the time was kept, reads as begun at 0).
    fn read(bytes: &[u8]) -> Self {
        let mut digest = [0u8; 32];
        let n = bytes.len().min(32);
        digest[..n].copy_from_slice(&bytes[..n]);
        let begun_ms = bytes
            .get(32..40)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, i64::from_be_bytes);
        Self { digest, begun_ms }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.digest.to_vec();
        out.extend_from_slice(&self.begun_ms.to_be_bytes());
        out
    }
}

/// Sign-in page notices of [`LoginFlow::enrolment_overtaken`].
pub const ENROL_ELSEWHERE: &str = "enrol_elsewhere";
pub const ENROL_SUPERSEDED: &str = "enrol_superseded";

/// The digest of the enrolment secret last shown to a user.
fn enrol_shown_key(user_id: &str) -> String {
    format!("enrol_shown:{user_id}")
}

/// Sealing context of a TOTP secret still being enrolled.
fn enrol_context(user_id: &str) -> String {
    format!("totp-enrol:{user_id}")
}

#[cfg(test)]
mod tests {
    use super::network_of;

    #[test]
    fn networks_group_neighbours() {
        assert_eq!(network_of("203.0.113.77"), "203.0.113.0/24");
        assert_eq!(network_of("2001:db8:1:2:aa::1"), "2001:db8:1:2::/64");
        assert_eq!(network_of("::ffff:203.0.113.7"), "203.0.113.0/24");
        assert_eq!(network_of("not an ip"), "not an ip");
    }
}
