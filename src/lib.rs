//! Portcullis: a login gateway that keeps stolen passwords and stolen cookies away from an email
//! service provider's customer console.
//!
//! Portcullis runs as a reverse proxy in front of the console. No request is forwarded unless it
//! belongs to a session that completed a password *and* a second factor; every forwarded request
//! carries a short-lived signed JWT the backend verifies against `/.well-known/jwks.json`.
//!
//! # Layout
//! - [`config`]: typed configuration (defaults → TOML → `PORTCULLIS__SECTION__KEY` env).
//! - [`server`]: builds the router and runs it on a listener with a shutdown signal.
//! - [`state`]: the one shared [`state::AppState`] handed to every handler.
//! - [`http`]: the gateway's own pages and APIs (login, second factor, enrolment, logout).
//! - [`proxy`]: forwarding to the upstream console (streaming, websockets, header hygiene).
//! - [`auth`]: passwords, TOTP, recovery codes and the login state machine; no HTTP types.
//! - [`session`]: session ids, cookies, server-side session records and timeouts.
//! - [`policy`]: path normalisation and return-to validation.
//! - [`risk`]: risk scoring of sign-ins and of sessions on the move (GeoIP, history, levels).
//! - [`token`]: JWT minting, signing keys (encrypted at rest), JWKS and rotation.
//! - [`store`]: durable (SQLite, PostgreSQL) and ephemeral (memory) storage behind narrow traits.
//! - [`audit`]: the durable audit trail, written off the request path.
//! - [`binding`]: binding sessions to a key the browser holds (DBSC, WebCrypto), bound cookies.
//! - [`enrolment`]: one-time links through which a user sets up their own factors.
//! - [`device`]: recognising the browsers a user signed in from (device cookie, names).
//! - [`notify`]: email to account owners through a durable queue (SMTP or an outbox directory).
//! - [`metrics`]: Prometheus metrics on a listener of their own.
//! - [`demo`]: the built-in demo ESP console used by `portcullis demo`.
//! - [`cli`]: the command-line interface's commands.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Tests may unwrap: a panic there is a failed test, not an outage. The non-test build still denies it.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![forbid(unsafe_code)]

/// The map behind the caches every proxied request reads (sessions, users, identity tokens).
/// Their keys name records that exist (a session's storage key, a user id), inserted only after
/// the record was read, so nobody can fill them with keys of their choosing; foldhash, seeded
/// afresh in every process, hashes such keys in a fraction of the time of std's SipHash.
pub(crate) type CacheMap<V> = std::collections::HashMap<String, V, foldhash::fast::RandomState>;

pub mod audit;
pub mod auth;
pub mod binding;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod device;
pub mod enrolment;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod risk;
pub mod secret;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
#[cfg(test)]
mod test_logs;
pub mod token;
