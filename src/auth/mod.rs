//! Authentication primitives, free of HTTP types so they can be tested and reused on their own.
//!
//! - [`password`]: argon2id hashing on a bounded blocking pool, constant-cost verification
//!   (unknown users and malformed input cost the same as real checks), rehash detection, and the
//!   policy applied when a password is set.
//! - [`common`]: the 100,000 most common passwords, refused by that policy.
//! - [`totp`]: RFC 6238 codes (SHA-1, 6 digits, 30 s), enrolment URIs and QR codes, and
//!   step-aware checking so the caller can make each code single-use.
//! - [`recovery`]: single-use recovery codes and their canonical form for keyed hashing.
//!
//! - [`webauthn`]: security keys and passkeys (WebAuthn ceremonies with state kept in the
//!   ephemeral store, clone detection through the signature counter).
//!
//! - [`step_up`]: a signed-in user proving themselves again (recent-proof checks, sudo mode).
//!
//! - [`flow`]: the sign-in state machine (which factor comes next, attempt limits, replay
//!   records), with the store handles it needs and no HTTP types.

pub mod common;
pub mod flow;
pub mod password;
pub mod recovery;
pub mod step_up;
pub mod totp;
pub mod webauthn;
