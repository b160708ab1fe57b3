//! The password step: the usual first step, and the last one of a sign-in whose second factor
//! came first. Each attempt first takes from the global budget (unless it comes from a known
//! device of the account) and from its failure budgets, waits its progressive delay, and only
//! then costs an argon2 hash.

use super::throttle::{awaits_password, KnownDevice};
use super::{Client, FlowError, LoginFlow, PasswordOutcome, Reservation};
use crate::auth::password::{Lane, Verification};
use crate::secret::Secret;
use crate::session::{Session, Stage};
use crate::store::{AuditEvent, User};

/// An attempt that may go on to have its password checked.
struct Attempt {
    email: String,
    user: Option<User>,
    reserved: Vec<String>,
    prior: u64,
    /// Where its hash waits: [`Lane::Known`] from a known device of this very account.
    lane: Lane,
    /// The audit reason of a wrong password: `bad_password` at sign-in, `bad_current_password`
    /// where a signed-in owner confirms it (the account page), so the owner's sign-in history
    /// tells the two apart.
    wrong: &'static str,
}

/// What [`LoginFlow::confirm_password`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum PasswordCheck {
    Right,
    Wrong,
    Throttled { retry_after: u64 },
}

impl LoginFlow {
    /// Checks a signed-in `user`'s current password (before it is changed) as a sign-in checks
    /// one: the same budgets, delay, hashing lane and audit, so a session in other hands cannot
    /// be used to guess it faster than the sign-in page allows.
    pub async fn confirm_password(
        &self,
        user: &User,
        password: &Secret<String>,
        client: &Client,
        device: Option<&KnownDevice>,
    ) -> Result<PasswordCheck, FlowError> {
        let attempt = match self.take_attempt(&user.email, client, device).await? {
            Ok(a) => Attempt {
                wrong: "bad_current_password",
                ..a
            },
            Err(PasswordOutcome::Throttled { retry_after }) => {
                return Ok(PasswordCheck::Throttled { retry_after })
            }
            Err(_) => return Ok(PasswordCheck::Wrong),
        };
        Ok(
            match self.check_password(attempt, password, client).await? {
                Some(u) if u.id == user.id => PasswordCheck::Right,
                _ => PasswordCheck::Wrong,
            },
        )
    }

    /// Takes the attempt from its budgets; `Err(outcome)` when one is spent (audited, named).
    async fn take_attempt(
        &self,
        email: &str,
        client: &Client,
        device: Option<&KnownDevice>,
    ) -> Result<Result<Attempt, PasswordOutcome>, FlowError> {
        let email = crate::store::normalise_email(email);
        // Only a device of this very account, where it was last seen, earns its own budget;
        // looking the user up first is needed only then.
        let mut user = None;
        let mut own_device = None;
        if let Some(d) = device.filter(|d| d.at_home(client)) {
            let u = self.durable.user_by_email(&email).await?;
            if u.as_ref().is_some_and(|u| u.id == d.user_id) {
                own_device = Some(d.id.as_str());
            }
            user = Some(u);
        }
        // The address's, network's and account's budgets first, then the fleet's per-second
        // one: an address (or account) already refused by its own takes nothing from the
        // budget everyone shares, so one host cannot spend it for every other.
        let (budget, counter, retry_after) = {
            let budgets = self.password_budgets(&email, client, own_device);
            match self.reserve(&budgets).await? {
                Reservation::Spent { counter } => (
                    crate::metrics::limit_label(&counter),
                    counter,
                    self.window().as_secs(),
                ),
                Reservation::Taken { keys, .. }
                    if own_device.is_none() && !self.global_budget().await? =>
                {
                    self.release(&keys).await?;
                    ("global", "rate:global".to_string(), 1)
                }
                Reservation::Taken { keys, prior } => {
                    let user = match user {
                        Some(u) => u,
                        None => match self.durable.user_by_email(&email).await {
                            Ok(u) => u,
                            Err(e) => {
                                // Not an answer (the store is down): the attempt does not count.
                                self.release(&keys).await?;
                                return Err(e.into());
                            }
                        },
                    };
                    return Ok(Ok(Attempt {
                        email,
                        user,
                        reserved: keys,
                        prior,
                        lane: match own_device {
                            Some(_) => Lane::Known,
                            None => Lane::Other,
                        },
                        wrong: "bad_password",
                    }));
                }
            }
        };
        // One run per spent counter: a flood's refusals from one address, against one account,
        // or past the global budget are each one summary a minute in the trail.
        self.audit_repeated(
            counter,
            AuditEvent::new("login_password", "denied", self.clock.now())
                .email(&email)
                .reason(&format!("throttled:{budget}")),
            client,
        )
        .await;
        Ok(Err(PasswordOutcome::Throttled { retry_after }))
    }

    /// Waits the attempt's delay, then checks the password. `Some(user)` when it matched (the
    /// reservation is returned); `None` when not (the reservation stays: it is this failure,
    /// audited and counted towards second factor first).
    async fn check_password(
        &self,
        attempt: Attempt,
        password: &Secret<String>,
        client: &Client,
    ) -> Result<Option<User>, FlowError> {
        self.progressive_delay(attempt.prior).await;
        let Attempt {
            email,
            user,
            reserved,
            lane,
            wrong,
            ..
        } = attempt;
        let verdict = match self
            .hasher
            .verify_in(
                lane,
                password,
                user.as_ref().map(|u| u.password_hash.as_str()),
            )
            .await
        {
            Ok(v) => v,
            Err(e) => {
                // Not an answer (hashing pool full): the attempt does not count.
                self.release(&reserved).await?;
                return Err(e.into());
            }
        };
        // A disabled or locked account, or one whose second factors were removed and which may
        // enrol again only through an enrolment link (its password alone may be a thief's):
        // refused as a wrong password is, and counted as one (budgets and consecutive
        // failures), so neither the answer nor what is left of a budget tells a guesser that
        // this password was right.
        let refusal = match (&user, &verdict) {
            (Some(u), Verification::Match { .. }) => self.refusal(u).await?,
            _ => None,
        };
        match (user, verdict) {
            (Some(u), Verification::Match { .. }) if refusal.is_some() => {
                let ev = AuditEvent::new("login_password", "denied", self.clock.now())
                    .user(&u)
                    .reason(refusal.unwrap_or_default());
                self.audit(ev, client).await;
                self.consecutive_failure(Some(&u), &email, client).await?;
                Ok(None)
            }
            (Some(u), Verification::Match { needs_rehash }) => {
                self.release(&reserved).await?;
                if needs_rehash {
                    self.rehash(lane, &u, password).await;
                }
                Ok(Some(u))
            }
            (user, _) => {
                let ev =
                    AuditEvent::new("login_password", "failure", self.clock.now()).email(&email);
                let ev = match &user {
                    Some(u) => ev.user(u).reason(wrong),
                    None => ev.reason("unknown_user"),
                };
                self.audit(ev, client).await;
                self.consecutive_failure(user.as_ref(), &email, client)
                    .await?;
                Ok(None)
            }
        }
    }

    /// Stores a hash of the matched `password` with the current parameters. Best effort: the
    /// stored hash stays valid, so a rehash that cannot run now (hashing queue full during a
    /// flood, durable store unreachable) is left for the next sign-in rather than turning this
    /// one away.
    async fn rehash(&self, lane: Lane, user: &User, password: &Secret<String>) {
        let stored = match self.hasher.hash_in(lane, password).await {
            Ok(fresh) => self.durable.set_password_hash(&user.id, &fresh).await,
            Err(e) => {
                tracing::info!(user = %user.id, error = %e, "password rehash postponed to the next sign-in");
                return;
            }
        };
        if let Err(e) = stored {
            tracing::warn!(user = %user.id, error = %e, "could not store the rehashed password; the old hash stays");
        }
    }

    /// Step 1: email and password. `device` is the browser's known device, if it showed one.
    pub async fn password_step(
        &self,
        email: &str,
        password: &Secret<String>,
        client: &Client,
        return_to: Option<String>,
        device: Option<&KnownDevice>,
    ) -> Result<PasswordOutcome, FlowError> {
        let attempt = match self.take_attempt(email, client, device).await? {
            Ok(a) => a,
            Err(outcome) => return Ok(outcome),
        };
        // An account under a guessing campaign asks for its second factor first; an address
        // with no account does exactly the same (a decoy), so the switch reveals nothing.
        let first = match &attempt.user {
            Some(user) => self.factor_first_due(user, &attempt.email).await,
            None => self.decoy_factor_first_due(&attempt.email).await,
        };
        let first = match first {
            Ok(first) => first,
            Err(e) => {
                // Not an answer: the attempt does not count.
                self.release(&attempt.reserved).await?;
                return Err(e);
            }
        };
        if first {
            // Not a guess: nothing was checked, so nothing is counted.
            self.release(&attempt.reserved).await?;
            let user = attempt.user.as_ref();
            return self
                .factor_first_session(user, &attempt.email, client, return_to, device)
                .await;
        }
        let Some(user) = self.check_password(attempt, password, client).await? else {
            return Ok(PasswordOutcome::Denied);
        };
        let stage = if self.has_second_factor(&user).await? {
            Stage::SecondFactor
        } else {
            Stage::EnrolTotp {
                sealed_secret: self.new_sealed_secret(&user.id)?,
                key_only: false,
                first: true,
            }
        };
        let reason = if matches!(stage, Stage::SecondFactor) {
            "second_factor_required"
        } else {
            "enrolment_required"
        };
        self.audit(
            AuditEvent::new("login_password", "success", self.clock.now())
                .user(&user)
                .reason(reason),
            client,
        )
        .await;
        let mut session = Session::after_password(
            &user.id,
            stage,
            self.clock.now_millis(),
            &client.ip,
            &client.user_agent,
            return_to,
        );
        session.known_device = own_device(&user, device, client);
        Ok(PasswordOutcome::Proceed {
            user: Box::new(user),
            session: Box::new(session),
        })
    }

    /// Whether this account's second factor must come before its password now.
    async fn factor_first_due(&self, user: &User, email: &str) -> Result<bool, FlowError> {
        Ok(self.has_second_factor(user).await? && self.second_factor_first(email).await?)
    }

    /// [`LoginFlow::factor_first_due`] for an address without an account: the same lookups
    /// (under the decoy id, finding nothing), so both take the same time.
    async fn decoy_factor_first_due(&self, email: &str) -> Result<bool, FlowError> {
        let decoy = self.decoy_user_id(email);
        self.durable.webauthn_credentials(&decoy).await?;
        self.durable.totp(&decoy).await?;
        Ok(self.second_factor_first(email).await?)
    }

    /// Whether the user has a second factor (a key, suspended or not, or TOTP). A suspended key
    /// counts: a possible clone must not turn the account into one whose password alone enrols a
    /// new factor; its owner signs in with a recovery code, or an admin resets the factors.
    /// Why a right password of `user` is refused all the same, if it is.
    async fn refusal(&self, user: &User) -> Result<Option<&'static str>, FlowError> {
        Ok(if user.disabled {
            Some("disabled")
        } else if user.locked {
            Some("locked")
        } else if crate::store::awaits_enrolment_link(self.durable.as_ref(), user).await? {
            Some("enrolment_link_required")
        } else {
            None
        })
    }

    async fn has_second_factor(&self, user: &User) -> Result<bool, FlowError> {
        Ok(crate::store::has_second_factor(self.durable.as_ref(), &user.id).await?)
    }

    /// A pending sign-in that asks for the second factor before the password. For an address
    /// without an account (`user` none) it is a decoy: the same audit event and the same code
    /// page, under a stable made-up user id (so per-account code budgets behave alike), and it
    /// accepts no code.
    async fn factor_first_session(
        &self,
        user: Option<&User>,
        email: &str,
        client: &Client,
        return_to: Option<String>,
        device: Option<&KnownDevice>,
    ) -> Result<PasswordOutcome, FlowError> {
        let ev = AuditEvent::new("login_password", "denied", self.clock.now())
            .reason("second_factor_first");
        let (ev, user_id) = match user {
            Some(u) => (ev.user(u), u.id.clone()),
            None => (ev.email(email), self.decoy_user_id(email)),
        };
        // Repeatable at will against an account past 100 failures: one run per account.
        self.audit_repeated(format!("second_factor_first:{email}"), ev, client)
            .await;
        let mut session = Session::after_password(
            &user_id,
            Stage::SecondFactor,
            self.clock.now_millis(),
            &client.ip,
            &client.user_agent,
            return_to,
        );
        // No method proven yet: the password was not checked.
        session.amr.clear();
        session.decoy = user.is_none();
        session.known_device = user.and_then(|u| own_device(u, device, client));
        Ok(PasswordOutcome::FactorFirst {
            session: Box::new(session),
        })
    }

    /// A user id for an address without an account: a UUID made from a keyed hash of the
    /// address, the same on every gateway and every attempt, and no real user's.
    fn decoy_user_id(&self, email: &str) -> String {
        let mac = self
            .master_key
            .link_mac(format!("portcullis/decoy-user/v1\0{email}").as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&mac[..16]);
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }

    /// The password of a sign-in whose second factor came first. On `Proceed` the session is
    /// complete (`amr` password plus the factor).
    pub async fn password_after_factor(
        &self,
        session: &mut Session,
        password: &Secret<String>,
        client: &Client,
        device: Option<&KnownDevice>,
    ) -> Result<PasswordOutcome, FlowError> {
        let Some(method) = session
            .amr
            .first()
            .cloned()
            .filter(|_| awaits_password(session))
        else {
            return Ok(PasswordOutcome::Denied);
        };
        let Some(user) = self.durable.user_by_id(&session.user_id).await? else {
            return Ok(PasswordOutcome::Denied);
        };
        let attempt = match self.take_attempt(&user.email, client, device).await? {
            Ok(a) => a,
            Err(outcome) => return Ok(outcome),
        };
        let Some(user) = self.check_password(attempt, password, client).await? else {
            return Ok(PasswordOutcome::Denied);
        };
        self.audit(
            AuditEvent::new("login_password", "success", self.clock.now())
                .user(&user)
                .reason("after_second_factor"),
            client,
        )
        .await;
        session.amr = vec!["pwd".into()];
        self.complete(session, &user, &method);
        Ok(PasswordOutcome::Proceed {
            user: Box::new(user),
            session: Box::new(session.clone()),
        })
    }
}

/// The id of `device` when it is a known device of `user` used where it was last seen (a
/// pending sign-in's own budget: a copy of its cookie elsewhere draws on the account's).
fn own_device(user: &User, device: Option<&KnownDevice>, client: &Client) -> Option<String> {
    device
        .filter(|d| d.user_id == user.id && d.at_home(client))
        .map(|d| d.id.clone())
}
