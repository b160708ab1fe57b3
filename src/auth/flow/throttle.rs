//! Budgets and waits of password attempts, arranged so that a credential-stuffing flood cannot
//! be turned against the real customer.
//!
//! - A global per-second budget (shared through the ephemeral store) refuses a flood before it
//!   reaches the hashing pool.
//! - The account's, address's and network's failure budgets apply to browsers that are not a
//!   known device of the account; a browser with a valid device cookie of that user, on the
//!   network and in the kind of browser the device was last seen with, draws on a budget of its
//!   own (keyed by the device), so an attacker elsewhere cannot spend it, not even with a copy
//!   of the cookie.
//! - As failures grow, attempts wait longer before their password is checked (bounded by
//!   `limits.max_delay`); the wait is a timer, holding no hashing slot and no store connection.
//! - After `limits.second_factor_first_after` consecutive wrong passwords, the account asks for
//!   the second factor before the password (see `docs/security.md`).

use std::time::Duration;

use super::{network_of, Client, LoginFlow};
use crate::config::LimitsConfig;
use crate::session::{Session, Stage};
use crate::store::{AuditEvent, StoreError, User};

/// How long the consecutive-failure count of an account lives without a new failure's help:
/// it is set when the first failure is counted and ends with a complete sign-in.
pub const CONSECUTIVE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The first step of the progressive delay.
const FIRST_DELAY: Duration = Duration::from_millis(125);

/// Passkey ceremonies one address may start in `limits.window`: a person clicks the button a
/// few times; a script that starts thousands to fill the store gets `429`.
pub(crate) const CEREMONIES_PER_ADDRESS: u64 = 100;

/// A browser that presented a valid device cookie (an active device of `user_id`).
#[derive(Debug, Clone)]
pub struct KnownDevice {
    pub id: String,
    pub user_id: String,
    /// The address the device was last seen from (its last sign-in).
    pub last_ip: String,
    /// The browser the device was first signed in with.
    pub user_agent: String,
}

impl KnownDevice {
    /// Whether `client` is where the device was last seen: the same network (`/24`, `/64`) and
    /// the same kind of browser ([`crate::device::same_kind_of_browser`]). Only there does the
    /// device cookie earn the device's own failure budget: a copy of the cookie used from
    /// elsewhere would otherwise spend it, and lock the owner's own browser out.
    pub fn at_home(&self, client: &Client) -> bool {
        super::network_of(&self.last_ip) == super::network_of(&client.ip)
            && crate::device::same_kind_of_browser(&self.user_agent, &client.user_agent)
    }
}

/// What taking one attempt from the budgets gave.
#[derive(Debug)]
pub(crate) enum Reservation {
    /// Taken from every budget: the counters to give back if the attempt turns out right, and
    /// the most failures any of them had counted before this attempt.
    Taken { keys: Vec<String>, prior: u64 },
    /// A budget is spent: the counter that holds it (named as metrics label it by
    /// [`crate::metrics::limit_label`]).
    Spent { counter: String },
}

/// The wait before the password of an attempt is checked, after `prior` counted failures:
/// none while fewer than `delay_after_failures` (and before the first failure), then 125 ms
/// doubling up to `max_delay`. With the default 5, the sixth attempt after five failures is the
/// first to wait.
pub fn delay_for(prior: u64, limits: &LimitsConfig) -> Duration {
    let threshold = limits.delay_after_failures.max(1);
    let Some(over) = prior.checked_sub(threshold) else {
        return Duration::ZERO;
    };
    if limits.max_delay.is_zero() {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(over).unwrap_or(u32::MAX).min(16);
    FIRST_DELAY
        .saturating_mul(1 << doublings)
        .min(limits.max_delay)
}

/// A sign-in address as the throttling keys name it: a digest, so that each of the keys an
/// address flood leaves (unknown addresses are counted like accounts) has the same small size
/// whatever was typed, and what was typed (often a password in the wrong field) is not kept
/// in the ephemeral store.
fn address_digest(email: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(email.as_bytes())[..16])
}

/// Storage key of an account's consecutive wrong passwords (kept 30 days).
fn consecutive_key(email: &str) -> String {
    format!("consecutive:pwd:{{{}}}", address_digest(email))
}

/// The counter of an account's wrong passwords within the failure window.
pub(crate) fn account_counter(email: &str) -> String {
    format!("fail:pwd:{{{}}}", address_digest(email))
}

/// A sign-in that asks for the second factor first and has not had it yet.
pub fn awaits_factor_first(s: &Session) -> bool {
    s.stage == Stage::SecondFactor && s.amr.is_empty()
}

/// A sign-in whose second factor came first and whose password is still to come.
pub fn awaits_password(s: &Session) -> bool {
    s.stage == Stage::SecondFactor && !s.amr.is_empty() && !s.amr.iter().any(|m| m == "pwd")
}

/// The counter of an address's failures (password, codes and passkeys alike).
pub(crate) fn address_counter(client: &Client) -> String {
    format!("fail:ip:{}", client.ip)
}

/// The counter of a known device's own failures.
pub(crate) fn device_counter(device_id: &str) -> String {
    format!("fail:dev:{{{device_id}}}")
}

impl LoginFlow {
    /// The budgets one password attempt draws on: a known device's own, or the account's, the
    /// address's and the network's.
    pub(crate) fn password_budgets(
        &self,
        email: &str,
        client: &Client,
        device: Option<&str>,
    ) -> Vec<(String, u64)> {
        if let Some(id) = device {
            return vec![(device_counter(id), self.limits.failures_per_device)];
        }
        // The address's and network's first: an address over its budget is refused before the
        // account's counter is touched (a flood of made-up addresses from one host makes no
        // counter per address typed).
        vec![
            (address_counter(client), self.limits.failures_per_ip),
            (
                format!("fail:net:{}", network_of(&client.ip)),
                self.limits.failures_per_network,
            ),
            (
                account_counter(email),
                self.limits.password_failures_per_account,
            ),
        ]
    }

    /// Takes one from the global per-second budget of password attempts; `false` when this
    /// second's is spent. Attempts are counted whether right or wrong: it bounds the work, not
    /// the guesses.
    pub(crate) async fn global_budget(&self) -> Result<bool, StoreError> {
        // One count per second of the store's clock, which every gateway shares (gateways'
        // own clocks, a second apart, would each count a second of their own).
        let key = "rate:global";
        let n = self.ephemeral.incr_this_second(key).await?;
        if n > self.limits.global_sign_ins_per_second {
            self.metrics.throttled(key);
            return Ok(false);
        }
        Ok(true)
    }

    /// Takes one passkey ceremony from the budgets that bound what anonymous visitors can make
    /// the gateway hold (each ceremony is kept, as a challenge, for the ceremony timeout):
    /// [`CEREMONIES_PER_ADDRESS`] a window per address (an IPv6 client's /64), and the global
    /// per-second sign-in budget, counted apart from password attempts. `Some(retry_after)` when
    /// one is spent.
    pub(crate) async fn ceremony_budget(&self, client: &Client) -> Result<Option<u64>, StoreError> {
        // The address's first: an address over its own takes nothing from the shared budget.
        let address = if client.ip.contains(':') {
            network_of(&client.ip)
        } else {
            client.ip.clone()
        };
        let key = format!("cer:ip:{address}");
        if self.ephemeral.incr(&key, self.window()).await? > CEREMONIES_PER_ADDRESS {
            self.metrics.throttled(&key);
            return Ok(Some(self.limits.window.as_secs()));
        }
        let global = "cer:global";
        if self.ephemeral.incr_this_second(global).await? > self.limits.global_sign_ins_per_second {
            self.metrics.throttled(global);
            // Not started: the address's count goes back.
            self.ephemeral.decr(&key).await?;
            return Ok(Some(1));
        }
        Ok(None)
    }

    /// Waits the progressive delay for `prior` failures. Called with nothing held: no hashing
    /// slot, no store connection.
    pub(crate) async fn progressive_delay(&self, prior: u64) {
        let wait = delay_for(prior, &self.limits);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Whether the account behind `email` asks for its second factor before the password.
    pub(crate) async fn second_factor_first(&self, email: &str) -> Result<bool, StoreError> {
        Ok(self.count(&consecutive_key(email)).await? >= self.limits.second_factor_first_after)
    }

    /// Counts one more consecutive wrong password for `email`, whether or not it has an account
    /// (`user`), so that the switch to second factor first happens for any address and does not
    /// tell which ones have one. The attempt that reaches the threshold (exactly one, the count
    /// being atomic) audits the switch and tells the owner, if there is one.
    pub(crate) async fn consecutive_failure(
        &self,
        user: Option<&User>,
        email: &str,
        client: &Client,
    ) -> Result<(), StoreError> {
        let n = self
            .ephemeral
            .incr(&consecutive_key(email), CONSECUTIVE_TTL)
            .await?;
        if n != self.limits.second_factor_first_after {
            return Ok(());
        }
        let ev = AuditEvent::new("second_factor_first", "success", self.clock.now());
        let Some(user) = user else {
            let ev = ev
                .email(email)
                .reason("consecutive_password_failures_unknown_user");
            self.audit(ev, client).await;
            return Ok(());
        };
        let ev = ev.user(user).reason("consecutive_password_failures");
        self.audit(ev, client).await;
        self.notifier.password_guessing(user, n).await;
        Ok(())
    }

    /// After a complete sign-in: the consecutive-failure count starts over.
    pub(crate) async fn forget_consecutive(&self, user: &User) -> Result<(), StoreError> {
        self.ephemeral.delete(&consecutive_key(&user.email)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 30-day count an address flood leaves per address has one small size, whatever was
    /// typed (up to the longest address the form takes), and tells addresses apart.
    #[test]
    fn consecutive_counts_are_keyed_by_a_digest() {
        let long = format!("{}@example.com", "a".repeat(300));
        let keys = [consecutive_key("a@b.c"), consecutive_key(&long)];
        assert_eq!(keys[0].len(), keys[1].len());
        assert!(
            keys[1].len() < 60 && !keys[1].contains("example"),
            "{}",
            keys[1]
        );
        assert_ne!(keys[0], keys[1]);
        // A hash tag, so a Redis Cluster keeps each count on one node.
        assert!(keys[0].contains('{') && keys[0].ends_with('}'));
    }

    #[test]
    fn delay_grows_from_the_threshold_and_is_bounded() {
        let limits = LimitsConfig {
            delay_after_failures: 3,
            max_delay: Duration::from_secs(2),
            ..LimitsConfig::default()
        };
        let ms = |p| delay_for(p, &limits).as_millis();
        // Three failures answered at once; the fourth attempt, after them, waits.
        assert_eq!([ms(0), ms(1), ms(2)], [0, 0, 0]);
        assert_eq!([ms(3), ms(4), ms(5), ms(6)], [125, 250, 500, 1000]);
        assert_eq!([ms(7), ms(8), ms(1000), ms(u64::MAX)], [2000; 4]);
        // None: the first failure already slows the next attempt, not the first one.
        let none = LimitsConfig {
            delay_after_failures: 0,
            ..limits.clone()
        };
        assert_eq!(
            [delay_for(0, &none), delay_for(1, &none)],
            [Duration::ZERO, FIRST_DELAY]
        );
        let off = LimitsConfig {
            max_delay: Duration::ZERO,
            ..limits
        };
        assert_eq!(delay_for(1000, &off), Duration::ZERO);
    }
}
