//! Password hashing and checking with argon2id, and the policy applied when a password is set.
//!
//! argon2 is deliberately slow and memory-hungry, so it never runs on the async executor: every
//! hash runs on one of `max_concurrent_hashes` hashing threads of its own (at the lowered
//! priority `hashing_nice`, see `pool`) (memory use is that
//! times `argon2_memory_kib`), with at most `max_queued_hashes` callers waiting. Beyond that,
//! callers get [`PasswordError::Busy`] at once, so a password-spraying burst turns into quick
//! 503s instead of an ever-growing queue that starves the proxy. Sign-ins from a known device of
//! the account wait in a line of their own that is served first (see `slots`), so such a burst
//! cannot turn the account's owner away.
//!
//! Sign-in does the same work whether or not the account exists, and whether or not the password
//! was empty or absurdly long, so response times do not reveal which accounts exist. (A stored
//! hash with older, cheaper parameters costs less to check until it is rehashed on the next
//! successful sign-in.)

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::SaltString;
use argon2::password_hash::{self, PasswordHash, PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use zeroize::Zeroizing;

use crate::config::PasswordConfig;
use crate::secret::Secret;

mod pool;
mod slots;

pub use slots::Lane;

/// Absolute ceiling on the bytes of a password we will feed to argon2, whatever the config says.
pub const MAX_INPUT_BYTES: usize = 4096;

/// What is hashed in place of an empty or oversized password, so those cost the same as others.
const PLACEHOLDER: &[u8] = b"portcullis-placeholder-password";

/// Outcome of checking a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// The password is right. `needs_rehash`: the stored hash uses other parameters than the
    /// configured ones; hash the password again and store the result.
    Match { needs_rehash: bool },
    /// Wrong password, unknown user, or unusable stored hash: all look the same to the caller.
    Mismatch,
}

/// Why hashing or checking could not be done at all (as opposed to a wrong password).
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The hashing queue is full; the caller should answer 503 with `Retry-After`.
    #[error("too many password checks in progress; try again shortly")]
    Busy,
    /// A bug or resource failure; the message names the operation, never the password.
    #[error("password hashing failed: {0}")]
    Internal(String),
}

/// A password that breaks the policy; the message is meant for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyViolation(pub String);

/// argon2id hasher with a bounded pool of hashing slots.
pub struct PasswordHasher {
    /// Parameters for new hashes; stored hashes with others are reported as `needs_rehash`.
    params: Params,
    /// One slot per hash allowed to run at once, and the lines of callers waiting for one.
    slots: slots::Slots,
    /// Longest password in bytes that is hashed; longer ones are treated as wrong.
    max_input_bytes: usize,
    /// Hash of a random password with `params`, checked for unknown users so they cost the same.
    dummy_hash: String,
    /// The hashing threads, one per slot.
    pool: pool::Pool,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher")
            .field("params", &self.params)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl PasswordHasher {
    /// Builds the hasher; computes the dummy hash once, synchronously (call at start-up).
    pub fn new(cfg: &PasswordConfig) -> Result<Self, PasswordError> {
        let params = Params::new(
            cfg.argon2_memory_kib,
            cfg.argon2_iterations,
            cfg.argon2_parallelism,
            Some(Params::DEFAULT_OUTPUT_LEN),
        )
        .map_err(|e| PasswordError::Internal(format!("invalid argon2 parameters: {e}")))?;
        if cfg.max_concurrent_hashes == 0 {
            // Zero permits would make every sign-in wait forever.
            return Err(PasswordError::Internal(
                "max_concurrent_hashes must be at least 1".into(),
            ));
        }
        let mut random = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(random.as_mut());
        let dummy_hash = hash_with(&params, random.as_ref())?;
        let pool = pool::Pool::start(cfg.max_concurrent_hashes, cfg.hashing_nice)
            .map_err(|e| PasswordError::Internal(format!("cannot start hashing threads: {e}")))?;
        Ok(Self {
            pool,
            params,
            slots: slots::Slots::new(cfg.max_concurrent_hashes, cfg.max_queued_hashes),
            max_input_bytes: input_limit(cfg),
            dummy_hash,
        })
    }

    /// Hashes with argon2id and a random salt into a PHC string (`$argon2id$v=19$m=..`), on a
    /// hashing thread, at most `max_concurrent_hashes` at once; fails fast with
    /// [`PasswordError::Busy`] when `max_queued_hashes` callers are already waiting.
    ///
    /// Call [`check_policy`] first: a password longer than the sign-in limit is refused here,
    /// because it could never be verified afterwards.
    pub async fn hash(&self, password: &Secret<String>) -> Result<String, PasswordError> {
        self.hash_in(Lane::Other, password).await
    }

    /// [`PasswordHasher::hash`], waiting for a hashing slot in `lane` (the rehash after a
    /// sign-in from a known device waits where that sign-in's check waited).
    #[tracing::instrument(skip_all)]
    pub async fn hash_in(
        &self,
        lane: Lane,
        password: &Secret<String>,
    ) -> Result<String, PasswordError> {
        if password.expose().len() > self.max_input_bytes {
            return Err(PasswordError::Internal(
                "password exceeds the sign-in length limit (check_policy refuses these)".into(),
            ));
        }
        let permit = self.permit(lane).await?;
        let params = self.params.clone();
        let password = password.clone();
        self.pool
            .run(move || {
                // The permit lives as long as the hash runs, even if the caller has gone away, so
                // the memory bound holds.
                let _permit = permit;
                hash_with(&params, password.expose().as_bytes())
            })
            .await
            .ok_or_else(|| PasswordError::Internal("hashing task failed".into()))?
    }

    /// Checks `password` against the `stored` PHC hash.
    ///
    /// `stored == None` (unknown user), an empty password, a password over the length limit, or
    /// an unparsable stored hash all cost one argon2 run against the dummy hash and give
    /// [`Verification::Mismatch`]; an unparsable hash is logged at warn (without the hash).
    ///
    /// Waits in the line of other callers; see [`PasswordHasher::verify_in`].
    pub async fn verify(
        &self,
        password: &Secret<String>,
        stored: Option<&str>,
    ) -> Result<Verification, PasswordError> {
        self.verify_in(Lane::Other, password, stored).await
    }

    /// [`PasswordHasher::verify`], waiting for a hashing slot in `lane`: [`Lane::Known`] only
    /// for a sign-in from a known device of the account, whose attempts its own failure budget
    /// bounds.
    #[tracing::instrument(skip_all)]
    pub async fn verify_in(
        &self,
        lane: Lane,
        password: &Secret<String>,
        stored: Option<&str>,
    ) -> Result<Verification, PasswordError> {
        let usable = {
            let pw = password.expose();
            !pw.is_empty() && pw.len() <= self.max_input_bytes
        };
        // Only hand the real password to the blocking task when it will actually be hashed.
        let input = Secret::new(if usable {
            password.expose().clone()
        } else {
            String::new()
        });
        let stored = stored.map(str::to_owned);
        let dummy = self.dummy_hash.clone();
        let params = self.params.clone();
        let permit = self.permit(lane).await?;
        self.pool
            .run(move || {
                let _permit = permit;
                verify_blocking(&params, &dummy, input.expose(), usable, stored.as_deref())
            })
            .await
            .ok_or_else(|| PasswordError::Internal("verification task failed".into()))?
    }

    /// Hashes waiting for a slot plus hashes running, for metrics.
    pub fn queue_depth(&self) -> usize {
        self.slots.waiting() + self.slots.running()
    }

    /// A hashing slot: at once if one is free, after waiting if `lane` has room, else Busy. A
    /// caller whose future is dropped while waiting (client disconnected) leaves its line.
    async fn permit(&self, lane: Lane) -> Result<slots::Permit, PasswordError> {
        self.slots
            .acquire(lane)
            .await
            .map_err(|slots::Busy| PasswordError::Busy)
    }
}

/// Longest accepted password in bytes: enough for `max_length` characters of any script (UTF-8
/// needs at most 4 bytes each), never more than [`MAX_INPUT_BYTES`]. [`check_policy`] applies the
/// same bound, so every password that can be set can also be verified.
fn input_limit(cfg: &PasswordConfig) -> usize {
    cfg.max_length.saturating_mul(4).min(MAX_INPUT_BYTES)
}

fn argon2(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

fn hash_with(params: &Params, password: &[u8]) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    argon2(params)
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Internal(format!("argon2 hashing: {e}")))
}

/// The blocking part of [`PasswordHasher::verify`]: exactly one argon2 run on every path.
fn verify_blocking(
    params: &Params,
    dummy: &str,
    password: &str,
    usable: bool,
    stored: Option<&str>,
) -> Result<Verification, PasswordError> {
    let dummy = PasswordHash::new(dummy)
        .map_err(|e| PasswordError::Internal(format!("dummy hash unreadable: {e}")))?;
    let real = match stored.map(parse_stored) {
        Some(Some(hash)) if usable => Some(hash),
        _ => None,
    };
    let input = if usable {
        password.as_bytes()
    } else {
        PLACEHOLDER
    };
    let target = real.as_ref().unwrap_or(&dummy);
    match (argon2(params).verify_password(input, target), &real) {
        (Ok(()), Some(hash)) => Ok(Verification::Match {
            needs_rehash: needs_rehash(hash, params),
        }),
        (Ok(()), None) | (Err(password_hash::Error::Password), _) => Ok(Verification::Mismatch),
        (Err(e), Some(_)) => {
            tracing::warn!(error = %e, "stored password hash could not be checked; treating as a mismatch");
            Ok(Verification::Mismatch)
        }
        (Err(e), None) => Err(PasswordError::Internal(format!(
            "dummy hash verification: {e}"
        ))),
    }
}

/// Parses a stored hash we can verify (any argon2 variant with readable parameters); logs
/// anything else without echoing it, since a hash is still sensitive.
fn parse_stored(stored: &str) -> Option<PasswordHash<'_>> {
    // No password set yet (an account waiting for its enrolment link): nothing to match.
    if stored.is_empty() {
        return None;
    }
    let usable = PasswordHash::new(stored).ok().filter(|h| {
        Algorithm::try_from(h.algorithm).is_ok() && Params::try_from(h).is_ok() && h.hash.is_some()
    });
    if usable.is_none() {
        tracing::warn!(
            "stored password hash is not a usable argon2 PHC string; treating as a mismatch"
        );
    }
    usable
}

/// Whether a stored hash was made with another algorithm, version or parameters than `params`.
fn needs_rehash(hash: &PasswordHash<'_>, params: &Params) -> bool {
    hash.algorithm != Algorithm::Argon2id.ident()
        || hash.version != Some(u32::from(Version::V0x13))
        || Params::try_from(hash).map_or(true, |p| p != *params)
}

/// A new password typed twice, as a form takes it: both the same, and within [`check_policy`].
pub fn check_new_password(
    password: &str,
    again: &str,
    cfg: &PasswordConfig,
    email: &str,
) -> Result<(), PolicyViolation> {
    if password != again {
        return Err(PolicyViolation(
            "The two passwords are not the same.".into(),
        ));
    }
    check_policy(password, cfg, email)
}

/// Policy for a *new* password (not applied at sign-in, so tightening it locks nobody out):
/// `min_length..=max_length` characters (Unicode scalar values; any script, no normalisation),
/// not one of the 100,000 most common passwords (ignoring case), and not containing the local
/// part of the user's email address (ignoring case; only when it has at least 4 characters,
/// also checked without any `+tag`).
pub fn check_policy(
    password: &str,
    cfg: &PasswordConfig,
    email: &str,
) -> Result<(), PolicyViolation> {
    // No form can send one (the web refuses a NUL in any field), so a password holding one,
    // set from the command line, could never be given at sign-in.
    if password.contains('\0') {
        return Err(PolicyViolation(
            "A password cannot contain a NUL character.".to_string(),
        ));
    }
    let chars = password.chars().count();
    if chars < cfg.min_length {
        return Err(PolicyViolation(format!(
            "Use at least {} characters.",
            cfg.min_length
        )));
    }
    if chars > cfg.max_length {
        return Err(PolicyViolation(format!(
            "Use at most {} characters.",
            cfg.max_length
        )));
    }
    if password.len() > input_limit(cfg) {
        return Err(PolicyViolation(format!(
            "This password is too long: it may use at most {} bytes of UTF-8. Use fewer characters.",
            input_limit(cfg)
        )));
    }
    let lower = Zeroizing::new(password.to_lowercase());
    let local = email
        .rsplit_once('@')
        .map_or(email, |(local, _)| local)
        .to_lowercase();
    let untagged = local.split('+').next().unwrap_or_default();
    if [local.as_str(), untagged]
        .iter()
        .any(|part| part.chars().count() >= 4 && lower.contains(part))
    {
        return Err(PolicyViolation(
            "Don't use your email address, or the name before its @, in your password.".into(),
        ));
    }
    if super::common::is_common(password) {
        return Err(PolicyViolation(
            "This password is one of the most common passwords, which attackers try first. Choose another.".into(),
        ));
    }
    Ok(())
}

// Tests should stop at the first surprise; the crate-level deny is for production code.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
