//! Typed configuration: embedded defaults, then a TOML file, then `PORTCULLIS__SECTION__KEY`
//! environment variables. Any `KEY_file` entry (or `PORTCULLIS__SECTION__KEY_FILE` variable) reads
//! the value of `KEY` from a file, for secrets mounted by an orchestrator. Unknown keys are errors
//! that name the key. This is the only module that reads configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

use crate::secret::Secret;

pub(crate) mod storage;
pub use storage::StorageConfig;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "PORTCULLIS__";
/// The variable that overrides `log.level` (validated as it is).
pub const LOG_ENV: &str = "PORTCULLIS_LOG";
/// The most memory one argon2id hash may take (KiB): 4 GiB.
const MAX_ARGON2_MEMORY_KIB: u32 = 4 * 1024 * 1024;
/// The hard ceiling on identity-token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(300);

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("environment variable {name}: its value is not UTF-8 text")]
    Environment { name: String },
    #[error("config key `{key}`: cannot read secret file {path}: {source}")]
    SecretFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub storage: StorageConfig,
    pub token: TokenConfig,
    pub session: SessionConfig,
    pub password: PasswordConfig,
    pub limits: LimitsConfig,
    pub secrets: SecretsConfig,
    pub log: LogConfig,
    pub notify: NotifyConfig,
    pub webauthn: WebauthnConfig,
    pub forward_auth: ForwardAuthConfig,
    pub admin: AdminConfig,
    pub remember_device: RememberDeviceConfig,
    pub metrics: MetricsConfig,
    pub binding: BindingConfig,
    pub risk: RiskConfig,
    /// `[[step_up]]`: console requests that need a fresh second-factor proof
    /// (see [`crate::policy::step_up`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub step_up: Vec<crate::policy::step_up::StepUpRule>,
    /// The files `_file` keys were read from (the key each set, and the path), for advice
    /// about their permissions; not a key of the file.
    #[serde(skip)]
    pub secret_files: Vec<(String, PathBuf)>,
    /// The configuration file read, and whether it holds a secret itself: the master key, or a
    /// store or SMTP URL with a password in it.
    #[serde(skip)]
    pub file: Option<(PathBuf, bool)>,
}

/// `[metrics]`: Prometheus metrics on a listener of their own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:PORT` serving `GET /metrics`; unset: no metrics listener. Keep it on loopback or a
    /// private network: it needs no credentials.
    pub listen: Option<String>,
}

/// `[remember_device]`: "remember this device", offered on the second-factor page. A known
/// device whose sessions are bound to a WebCrypto key, remembered by an explicit opt-in, may then
/// prove that key after the password instead of a second factor — until `lifetime` runs out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RememberDeviceConfig {
    /// How long a device is remembered; `0s` switches the offer off.
    #[serde(with = "duration")]
    pub lifetime: Duration,
    /// Accounts whose users are never offered it (policy).
    pub off_accounts: Vec<String>,
}

impl Default for RememberDeviceConfig {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(30 * 24 * 3600),
            off_accounts: Vec::new(),
        }
    }
}

impl RememberDeviceConfig {
    /// Whether users of `account_id` may have their devices remembered.
    pub fn allowed_for(&self, account_id: &str) -> bool {
        !self.lifetime.is_zero() && !self.off_accounts.iter().any(|a| a == account_id)
    }
}

/// `[risk]`: how sign-ins and sessions on the move are scored (see [`crate::risk`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiskConfig {
    /// A GeoIP database in MaxMind DB format (GeoLite2/GeoIP2 City or Country, DB-IP City or
    /// Country Lite): the place signals (new country, impossible travel) need it. Read at
    /// start-up and again on SIGHUP.
    /// An empty path (`PORTCULLIS__RISK__GEOIP_DATABASE=""`) is none.
    #[serde(deserialize_with = "empty_path_is_none")]
    pub geoip_database: Option<PathBuf>,
    /// Faster than this (km/h) between two proven places is impossible travel.
    pub max_travel_speed: u32,
    /// Places closer than this (km) never count as travel (GeoIP places are rough).
    pub min_travel_distance: u32,
    /// From this score a sign-in is medium risk: a remembered device gives the second factor.
    pub medium_score: u32,
    /// From this score a sign-in is high risk: an account with a security key must use it, and
    /// the owner is told at once.
    pub high_score: u32,
    /// What a high-risk sign-in of an account with a security key accepts: `key` (only the
    /// key) or `any` (any second factor).
    pub high_risk_factor: HighRiskFactor,
    /// How long an account's sign-in networks, countries and last place are remembered.
    #[serde(with = "duration")]
    pub history: Duration,
}

/// An optional path where an empty text means none (so an environment variable can unset it).
fn empty_path_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let p = Option::<PathBuf>::deserialize(d)?;
    Ok(p.filter(|p| !p.as_os_str().is_empty()))
}

/// `risk.high_risk_factor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HighRiskFactor {
    Key,
    Any,
}

impl Default for RiskConfig {
    fn default() -> Self {
        Self {
            geoip_database: None,
            max_travel_speed: 1000,
            min_travel_distance: 500,
            medium_score: 30,
            high_score: 60,
            high_risk_factor: HighRiskFactor::Key,
            history: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// `[admin]`: the admin console at `/_portcullis/admin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// How recent an admin's last security-key proof must be to use the console (sudo mode);
    /// older sessions are sent to touch their key again. At most 15 minutes.
    #[serde(with = "duration")]
    pub sudo_timeout: Duration,
    /// Lifetime of an enrolment link an admin issues to a user.
    #[serde(with = "duration")]
    pub enrolment_link_ttl: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            sudo_timeout: Duration::from_secs(15 * 60),
            enrolment_link_ttl: Duration::from_secs(72 * 3600),
        }
    }
}

/// `[binding]`: sessions bound to a key held by the browser that signed in (Device Bound Session
/// Credentials where the browser has it, a non-extractable WebCrypto key otherwise). A session
/// reaches the console only with a short-lived bound cookie that the gateway issues against a
/// fresh proof of that key, so a copied cookie jar stops working when its bound cookie expires.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BindingConfig {
    /// Whether complete sessions must be bound to a device key before they are forwarded.
    pub enabled: bool,
    /// Lifetime of the bound cookie; the browser proves possession of its key again after it.
    #[serde(with = "duration")]
    pub bound_cookie_ttl: Duration,
    /// Failed device proofs (invalid, expired or missing bound cookies where one is required,
    /// wrong signatures) after which the session is ended and its owner told. A successful
    /// proof starts the count over.
    pub max_failures: u32,
}

impl Default for BindingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bound_cookie_ttl: Duration::from_secs(10 * 60),
            max_failures: 5,
        }
    }
}

/// `[forward_auth]`: the `/_portcullis/auth` endpoint for deployments whose own reverse proxy
/// (nginx `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`) asks the gateway whether a
/// request may pass. Off by default, so a gateway that proxies itself does not expose it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardAuthConfig {
    /// Whether the endpoint answers; when off it is a 404 like any unknown gateway route.
    pub enabled: bool,
}

/// `[notify]`: email to account owners (sign-ins from new devices, reported sign-ins, locks).
/// Mail waits in a durable queue and never delays or fails a sign-in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// SMTP server: `smtp://host:25` (plain; add `?tls=required` or `?tls=opportunistic` for
    /// STARTTLS), `smtps://user:password@host:465` (TLS from the start). Unset: every message is
    /// written as an `.eml` file to `outbox_dir` instead. May hold a password: use
    /// `smtp_url_file` or `PORTCULLIS__NOTIFY__SMTP_URL`.
    pub smtp_url: Option<Secret<String>>,
    /// The `From:` of every message.
    pub from: String,
    /// Where messages are written when no SMTP server is configured.
    pub outbox_dir: std::path::PathBuf,
    /// How long a "this wasn't me" link in a new-device notice stays valid.
    #[serde(with = "duration")]
    pub report_link_ttl: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            smtp_url: None,
            from: "Portcullis <portcullis@localhost>".into(),
            outbox_dir: "outbox".into(),
            report_link_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `server.max_connections_per_address` unless set: a hundred browsers behind one NAT address,
/// six connections each, are well within it.
pub const DEFAULT_CONNECTIONS_PER_ADDRESS: u32 = 1024;

/// A deserialiser's message with the program's own type names said in words
/// (`expected usize` → `expected a whole number`).
fn in_words(why: &str) -> String {
    let mut out = why.to_string();
    for (rust, words) in [
        ("usize", "a whole number, not negative"),
        ("u64", "a whole number, not negative"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u16", "a whole number from 0 to 65535"),
        ("u8", "a whole number from 0 to 255"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
        ("f64", "a number"),
        ("f32", "a number"),
    ] {
        for lead in ["expected ", "an integer ", "a value "] {
            let from = format!("{lead}{rust}");
            if out.contains(&from) {
                out = out.replace(&from, &format!("{lead}{words}"));
            }
        }
    }
    out
}

/// `[server]`: where the gateway listens and how it is reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Socket address to listen on.
    pub listen: String,
    /// The URL browsers use to reach the gateway; decides cookie security and the JWT issuer.
    pub public_url: Url,
    /// Peers whose `X-Forwarded-*` headers are believed (CIDRs). Empty: nobody's.
    #[serde(with = "networks")]
    pub trusted_proxies: Vec<IpNet>,
    /// Longest request target accepted, in bytes; longer ones get 414.
    pub max_uri_length: usize,
    /// Largest body accepted by the gateway's own forms, in bytes.
    pub max_form_bytes: usize,
    /// On SIGTERM, how long in-flight requests may take to finish before connections drop.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// How long a client may take to send a request's head (line and headers), counted from
    /// when the connection is open or idle between requests: a connection that sends nothing,
    /// or its headers a byte at a time, is closed after it (every listener).
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// The longest pause while a client sends a request's body (a gateway form, or a body the
    /// gateway sends on to the console): a body that stalls is refused with 408.
    #[serde(with = "duration")]
    pub body_timeout: Duration,
    /// PEM certificate chain: when set (with `tls_key`) the listener speaks HTTPS only.
    /// Read again, with the key, on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// `IP:PORT` of a plain-HTTP listener that answers every request with a 308 to the same path
    /// on `public_url`'s https origin (never on the request's Host). Unset: none.
    pub redirect_http_listen: Option<String>,
    /// How far this gateway's clock may be from the shared stores' (Redis's, else
    /// PostgreSQL's) before the gateway says it is not ready: gateways compare the times other
    /// gateways stored (sessions, proofs, keys, counters) with their own. `0s`: not checked.
    #[serde(with = "duration")]
    pub max_clock_skew: Duration,
    /// The most connections one client address (an IPv6 client's /64) may hold open at once on
    /// each listener; more are closed as soon as they are accepted. The trusted proxies are not
    /// counted. `0`: no bound.
    pub max_connections_per_address: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: default_url("http://127.0.0.1:8080/"),
            trusted_proxies: Vec::new(),
            max_uri_length: 8192,
            max_form_bytes: 16 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            tls_cert: None,
            tls_key: None,
            redirect_http_listen: None,
            max_clock_skew: Duration::from_secs(2),
            max_connections_per_address: DEFAULT_CONNECTIONS_PER_ADDRESS,
        }
    }
}

/// `[upstream]`: the console behind the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the console (plain HTTP on a private network or loopback).
    pub url: Url,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time allowed for the upstream to send response headers once the request body has been
    /// sent; bodies may stream longer.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// Origins besides `server.public_url`'s whose pages may send the console requests that
    /// change things (any method but `GET`, `HEAD`, `OPTIONS`, `TRACE`) and open WebSockets to
    /// it, with the user's session (e.g. `https://app.example.com`). Requests from any other
    /// origin are refused.
    pub allowed_origins: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: default_url("http://127.0.0.1:8081/"),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            allowed_origins: Vec::new(),
        }
    }
}

/// Signature algorithm of identity tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TokenAlgorithm {
    #[default]
    EdDSA,
    ES256,
}

impl TokenAlgorithm {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EdDSA => "EdDSA",
            Self::ES256 => "ES256",
        }
    }
}

/// `[token]`: the identity JWT given to the backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Request header that carries the token upstream.
    pub header: String,
    /// `aud` claim: what the backend expects.
    pub audience: String,
    /// `iss` claim; defaults to the public URL without trailing slash.
    pub issuer: Option<String>,
    /// Token lifetime (at most 5 minutes).
    #[serde(with = "duration")]
    pub ttl: Duration,
    pub algorithm: TokenAlgorithm,
    /// How long a retired signing key stays in the JWKS after a rotation.
    #[serde(with = "duration")]
    pub key_overlap: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            header: "X-Portcullis-Assertion".into(),
            audience: "esp-console".into(),
            issuer: None,
            ttl: Duration::from_secs(120),
            algorithm: TokenAlgorithm::EdDSA,
            key_overlap: Duration::from_secs(24 * 3600),
        }
    }
}

/// `[session]`: lifetimes of sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// A session unused this long ends.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// A session ends this long after sign-in, used or not.
    #[serde(with = "duration")]
    pub absolute_timeout: Duration,
    /// Time allowed between the password and the second factor (or enrolment).
    #[serde(with = "duration")]
    pub login_timeout: Duration,
    /// How long a gateway on Redis reuses a session record it read, without asking Redis again
    /// (at most 1 s; `0` turns the cache off). Revocations reach it sooner, through pub/sub.
    #[serde(with = "duration")]
    pub local_cache: Duration,
    /// Most session records held in that cache.
    pub local_cache_entries: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(12 * 3600),
            login_timeout: Duration::from_secs(10 * 60),
            local_cache: Duration::from_secs(1),
            local_cache_entries: 10_000,
        }
    }
}

/// `[password]`: password policy and argon2id parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordConfig {
    pub min_length: usize,
    pub max_length: usize,
    /// argon2id memory cost in KiB (OWASP minimum: 19456).
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    /// Hashes computed at once (default: half the cores, at least one); memory use is this times
    /// `argon2_memory_kib`.
    pub max_concurrent_hashes: usize,
    /// Sign-ins allowed to wait for a hashing slot, in each of two lines (known devices of the
    /// account they name, served first; everyone else); beyond that they are shed with 503.
    pub max_queued_hashes: usize,
    /// Scheduling priority (Unix nice value, 0–19) of the threads that compute hashes. Above 0
    /// they yield the CPU to proxied traffic whenever both want it, so a sign-in flood slows
    /// sign-ins, not the console; an idle machine still hashes at full speed.
    pub hashing_nice: i32,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        Self {
            min_length: 8,
            max_length: 256,
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            // Half the cores (at least one): a sign-in flood can then take only half of the
            // machine from the proxied traffic of signed-in users.
            max_concurrent_hashes: std::thread::available_parallelism()
                .map(|n| (n.get() / 2).clamp(1, 256))
                .unwrap_or(1),
            max_queued_hashes: 64,
            hashing_nice: 10,
        }
    }
}

/// `[limits]`: throttling of guesses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Failed passwords per account within `window` before further tries get 429.
    pub password_failures_per_account: u64,
    /// Failed sign-in steps per client IP within `window` before further tries get 429.
    pub failures_per_ip: u64,
    /// Failed passwords per network (/24 for IPv4, /64 for IPv6) within `window`: an attacker
    /// rotating through neighbouring addresses shares one budget.
    pub failures_per_network: u64,
    /// Wrong second-factor codes per account within `window` before further tries get 429.
    pub second_factor_failures_per_account: u64,
    /// Wrong codes allowed in one sign-in before it must start again from the password.
    pub second_factor_failures_per_login: u64,
    #[serde(with = "duration")]
    pub window: Duration,
    /// Password attempts per second across all gateways (counted in the ephemeral store),
    /// except those from a known device of the account: a flood is refused with 429 before it
    /// reaches the hashing pool.
    pub global_sign_ins_per_second: u64,
    /// Failed passwords within `window` from one known device of the account (a browser with
    /// that user's device cookie). Such sign-ins draw on this budget instead of the account's,
    /// the address's and the network's, so failures from elsewhere cannot lock the owner out.
    pub failures_per_device: u64,
    /// Failures (of the account, address, network or device) within `window` that are
    /// answered without delay; each further attempt waits twice as long as the one before,
    /// from 125 ms up to `max_delay`.
    pub delay_after_failures: u64,
    /// The longest an attempt is delayed (at most 10s; `0s` turns the delay off). The wait
    /// holds neither a hashing slot nor a store connection and never touches proxied traffic.
    #[serde(with = "duration")]
    pub max_delay: Duration,
    /// Consecutive wrong passwords of an account after which it asks for the second factor
    /// before the password (NIST SP 800-63B); the owner is told once. A complete sign-in
    /// starts the count over.
    pub second_factor_first_after: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            password_failures_per_account: 10,
            failures_per_ip: 100,
            failures_per_network: 300,
            second_factor_failures_per_account: 10,
            second_factor_failures_per_login: 5,
            window: Duration::from_secs(15 * 60),
            global_sign_ins_per_second: 200,
            failures_per_device: 50,
            delay_after_failures: 5,
            max_delay: Duration::from_secs(2),
            second_factor_first_after: 100,
        }
    }
}

/// Whether a security key must verify its user (PIN or biometric) when used as second factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UserVerification {
    /// Every key must verify the user; keys without PIN or biometric cannot be used.
    #[default]
    Required,
    /// Keys verify the user when they can; a touch alone is accepted after the password.
    Preferred,
}

/// The longest a WebAuthn ceremony may stay open.
pub const MAX_CEREMONY_TIMEOUT: Duration = Duration::from_secs(300);

/// `[webauthn]`: security keys and passkeys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebauthnConfig {
    /// Off: no key can be registered or used (TOTP and recovery codes still work).
    pub enabled: bool,
    /// Relying-party id: the domain keys are bound to. Defaults to the host of
    /// `server.public_url`; cannot change once keys are registered.
    pub rp_id: Option<String>,
    /// Name shown by the browser when a key is registered.
    pub rp_name: String,
    /// User verification for keys used after the password (passkey sign-in always requires it).
    pub user_verification: UserVerification,
    /// Time the browser and the server allow for one ceremony (at most 5 minutes).
    #[serde(with = "duration")]
    pub ceremony_timeout: Duration,
    /// When set, TOTP codes and recovery codes no longer complete a sign-in: every user needs a
    /// security key or passkey (phishing-resistant).
    pub require_phishing_resistant: bool,
    /// Accounts (their `account` id) held to the same rule while the global switch is off.
    pub phishing_resistant_accounts: Vec<String>,
    /// `"required"`: a new key must prove its model with an attestation that chains to one of
    /// `attestation_ca_files`; keys without one (or with self attestation) are refused.
    pub attestation: Attestation,
    /// Authenticator models (AAGUIDs) a new key may be; empty: any model the CAs vouch for.
    /// Only with `attestation = "required"` (an unattested AAGUID proves nothing).
    pub allowed_aaguids: Vec<String>,
    /// PEM files with the root certificates of authenticator vendors whose attestation is
    /// trusted (several certificates per file allowed). Needed when attestation is required.
    pub attestation_ca_files: Vec<PathBuf>,
    /// Per-account overrides of `user_verification`, `attestation` and `allowed_aaguids`,
    /// keyed by the users' `account` id: `[webauthn.accounts."ACCOUNT-ID"]`.
    pub accounts: std::collections::BTreeMap<String, AccountKeyPolicy>,
}

/// Whether new keys must prove their model (WebAuthn attestation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Attestation {
    /// Any key is accepted; its model (AAGUID) is recorded when it reports one.
    #[default]
    None,
    /// Only keys whose attestation verifies against `attestation_ca_files`.
    Required,
}

/// `[webauthn.accounts."ACCOUNT-ID"]`: key policy of one account; unset keys follow `[webauthn]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountKeyPolicy {
    pub user_verification: Option<UserVerification>,
    pub attestation: Option<Attestation>,
    pub allowed_aaguids: Option<Vec<String>>,
}

/// The key policy in force for one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    pub user_verification: UserVerification,
    pub attestation: Attestation,
    /// Allowed models; empty means any (attested) model.
    pub allowed_aaguids: Vec<uuid::Uuid>,
}

impl WebauthnConfig {
    /// Whether users of `account_id` must sign in with a key.
    pub fn requires_phishing_resistant(&self, account_id: &str) -> bool {
        self.require_phishing_resistant
            || self
                .phishing_resistant_accounts
                .iter()
                .any(|a| a == account_id)
    }

    /// The key policy of `account_id`: its `[webauthn.accounts."…"]` entry over the globals.
    pub fn policy_for(&self, account_id: &str) -> KeyPolicy {
        let over = self.accounts.get(account_id);
        let aaguids = over
            .and_then(|o| o.allowed_aaguids.as_ref())
            .unwrap_or(&self.allowed_aaguids);
        KeyPolicy {
            user_verification: over
                .and_then(|o| o.user_verification)
                .unwrap_or(self.user_verification),
            attestation: over.and_then(|o| o.attestation).unwrap_or(self.attestation),
            // Validated at load time; an entry that does not parse cannot get here.
            allowed_aaguids: aaguids
                .iter()
                .filter_map(|a| uuid::Uuid::parse_str(a).ok())
                .collect(),
        }
    }

    /// Whether any account (or the global setting) requires attestation.
    pub fn any_attestation_required(&self) -> bool {
        self.attestation == Attestation::Required
            || self
                .accounts
                .values()
                .any(|a| a.attestation == Some(Attestation::Required))
    }
}

impl Default for WebauthnConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rp_id: None,
            rp_name: "Portcullis".into(),
            user_verification: UserVerification::Required,
            ceremony_timeout: Duration::from_secs(120),
            require_phishing_resistant: false,
            phishing_resistant_accounts: Vec::new(),
            attestation: Attestation::None,
            allowed_aaguids: Vec::new(),
            attestation_ca_files: Vec::new(),
            accounts: Default::default(),
        }
    }
}

/// `[secrets]`: key material. Use `master_key_file` or `PORTCULLIS__SECRETS__MASTER_KEY` rather
/// than writing the key into the file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// 32 random bytes, base64: encrypts TOTP secrets and signing keys at rest, keys CSRF MACs.
    pub master_key: Option<Secret<String>>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Header names `token.header` must not take: their meaning is HTTP's (framing, hop-by-hop,
/// cookies, authority) or the gateway's own (`X-Forwarded-*`, `X-Request-Id`).
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "cookie",
    "expect",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "set-cookie",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-real-ip",
    "x-request-id",
    // Request headers with a meaning to browsers, servers and frameworks:
    "cache-control",
    "date",
    "dnt",
    "from",
    "max-forwards",
    "origin",
    "pragma",
    "range",
    "referer",
    "user-agent",
    "via",
    "warning",
    "x-csrf-token",
    "x-xsrf-token",
    "x-requested-with",
];

/// Name prefixes `token.header` must not take, for the same reason: `Accept*`, `Content-*`,
/// conditional requests, fetch metadata (`Sec-*`), proxies' and the gateway's own.
const RESERVED_HEADER_PREFIXES: &[&str] = &[
    "accept",
    "access-control-",
    "content-",
    "if-",
    "proxy-",
    "sec-",
    "x-forwarded-",
];

/// Levels a `log.level` directive may name.
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// `log.level` must be a level or a list of `target=level` directives (with at most one bare
/// level): a word that is no level (`warning`, `infoo`) would be read as a target and leave
/// every other line unlogged.
fn validate_log_level(level: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        key_err(
            "log.level",
            format!("{why}; use a level (trace, debug, info, warn, error, off) or directives such as \"portcullis=debug,info\" (PORTCULLIS_LOG, when set, is this key)"),
        )
    };
    let is_level = |l: &str| LOG_LEVELS.iter().any(|v| v.eq_ignore_ascii_case(l.trim()));
    if level.trim().is_empty() {
        return Err(bad("is empty"));
    }
    for directive in level.split(',') {
        let ok = match directive.rsplit_once('=') {
            Some((target, l)) => !target.trim().is_empty() && is_level(l),
            None => is_level(directive),
        };
        if !ok {
            return Err(bad(&format!("`{}` is not a level", directive.trim())));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| bad(&e.to_string()))
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `portcullis=debug,info`.
    pub level: String,
    /// One `info` line per request forwarded to the console (method, path without its query,
    /// status, milliseconds to the console's answer), with the request id of its span.
    pub requests: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            requests: false,
        }
    }
}

#[allow(clippy::expect_used)]
fn default_url(s: &str) -> Url {
    // Only ever called with the literals above.
    Url::parse(s).expect("built-in default URL is valid")
}

/// `message` with the password of every quoted URL in it replaced (see `secret::redact_url`).
fn redact_quoted_urls(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        let Some(len) = rest[open + 1..].find('"') else {
            break;
        };
        let quoted = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..=open]);
        if quoted.contains("://") {
            out.push_str(&crate::secret::redact_url(quoted));
        } else {
            out.push_str(quoted);
        }
        out.push('"');
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

/// A TOML syntax error as its position and what is wrong, without the line itself: the line
/// may hold a secret (a master key whose closing quote is missing), and this message goes to
/// the terminal and the journal.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim_end_matches('\n');
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            // A duplicate key's span covers the key alone: its name (never a value) is said,
            // a quoted spelling (`"listen"`, `"\u006cisten"`) read as TOML reads it.
            let bare = |k: &str| {
                (1..=64).contains(&k.len())
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            };
            let key = text
                .get(span.clone())
                .filter(|_| what == "duplicate key")
                .and_then(|k| match k.starts_with(['"', '\'']) {
                    true => format!("k = {k}")
                        .parse::<toml::Table>()
                        .ok()
                        .and_then(|t| t.get("k").and_then(|v| v.as_str()).map(str::to_string)),
                    false => Some(k.to_string()),
                })
                .filter(|k| bare(k));
            match key {
                Some(key) => format!("line {line}, column {column}: duplicate key `{key}`"),
                None => format!("line {line}, column {column}: {what}"),
            }
        }
        None => what.to_string(),
    }
}

impl Config {
    /// Loads `path` (if given) and applies overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_then(path, env, |_| {})
    }

    /// [`Self::load`], with `adjust` applied to the values read before they are validated
    /// together (the demo's own addresses: a rule that needs keys is checked against the
    /// address the demo serves, not the default one).
    pub fn load_then(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        adjust: impl FnOnce(&mut Config),
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: p.to_path_buf(),
                        message: syntax_message(&text, &e),
                    })?
            }
            None => toml::Table::new(),
        };
        let value = |section: &str, key: &str| {
            table
                .get(section)
                .and_then(|t| t.as_table())
                .and_then(|t| t.get(key))
        };
        let holds_secret = value("secrets", "master_key").is_some()
            || [
                ("storage", "durable"),
                ("storage", "ephemeral"),
                ("notify", "smtp_url"),
            ]
            .iter()
            .filter_map(|(section, key)| value(section, key)?.as_str())
            .any(|url| crate::secret::redact_url(url) != url);
        let file = path.map(|p| (p.to_path_buf(), holds_secret));
        let from_env = apply_env(&mut table, env)?;
        let mut files = Vec::new();
        resolve_secret_files(&mut table, "", &mut files)?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let why = e.into_inner().to_string();
                // The TOML library names the key again on a line of its own: the error names it.
                let why = match why.split_once("\nin `") {
                    Some((first, _)) => first.trim_end().to_string(),
                    None => why.trim_end().to_string(),
                };
                let why = in_words(&why);
                // A `_file` key read a secret (or the wrong file): the error names the file and
                // what was expected, never what it holds (quoted, escaped or in part).
                if let Some(file) = files.iter().find(|f| f.key == key) {
                    let expected = why
                        .rsplit_once("expected ")
                        .map(|(_, what)| format!(" (expected {what})"))
                        .unwrap_or_default();
                    // No such key: said as for any key (its list of keys holds no content).
                    if why.starts_with("unknown field") {
                        return key_err(&key, why);
                    }
                    // A number, a boolean or a list read from a file: `_file` reads text only.
                    if why.starts_with("invalid type: string") {
                        return key_err(
                            &key,
                            format!(
                                "is read from {} by the `_file` suffix, which gives text only, but \
                                 this key takes another kind of value{expected}: set it directly",
                                file.path
                            ),
                        );
                    }
                    return key_err(
                        &key,
                        format!(
                            "the content of {} is not a valid value for this key{expected}",
                            file.path
                        ),
                    );
                }
                // A URL that does not parse is quoted whole: its password is not.
                let mut why = redact_quoted_urls(&why);
                // Nor is any value of a key that holds a secret (a key typed as a number).
                if SECRET_VALUE_KEYS.contains(&key.as_str()) {
                    why = without_quoted_values(&why);
                }
                if why.contains("expected a string")
                    && ["integer", "boolean", "float"]
                        .iter()
                        .any(|t| why.contains(&format!("invalid type: {t}")))
                {
                    if from_env.contains(&key) {
                        // The value as given, quoted as it should be (not for a secret's key).
                        let given = why
                            .split_once('`')
                            .and_then(|(_, rest)| rest.split_once('`'))
                            .map(|(v, _)| v)
                            .filter(|_| !SECRET_VALUE_KEYS.contains(&key.as_str()))
                            .unwrap_or("123");
                        why.push_str(&format!(
                            "; in a PORTCULLIS__SECTION__KEY variable, quote a text that reads \
                             as a number or boolean: '\"{given}\"'"
                        ));
                    } else {
                        why.push_str("; in the file, a text is written in quotes: key = \"value\"");
                    }
                }
                // A section no variable may name: the variable is what to look at, and the
                // sections it may name are those besides the file-only rules.
                let section_var = from_env
                    .iter()
                    .filter(|k| k.split_once('.').is_some_and(|(s, _)| s == key))
                    .min();
                if let (Some(set), true) = (section_var, why.starts_with("unknown field")) {
                    let var = format!(
                        "{ENV_PREFIX}{}",
                        set.replace('.', "__").to_ascii_uppercase()
                    );
                    let why = why.replace(", `step_up`", "").replace("`step_up`, ", "");
                    return key_err(
                        &var,
                        format!("names no section of the configuration: {why}"),
                    );
                }
                // A value set in the environment: the variable is what to look at.
                if from_env.contains(&key) && !why.contains("PORTCULLIS__") {
                    let var = format!(
                        "PORTCULLIS__{}",
                        key.replace('.', "__").to_ascii_uppercase()
                    );
                    why.push_str(&format!(" (the value of {var})"));
                }
                if why.contains("expected a sequence") && key == "step_up" {
                    why.push_str(
                        "; each rule is a table of its own in the file: [[step_up]] with path, \
                         methods, max_age and key under it (not [step_up])",
                    );
                } else if why.contains("expected a sequence") {
                    let example = match key.as_str() {
                        "server.trusted_proxies" => "'[\"10.0.0.0/8\", \"192.168.0.0/16\"]'",
                        _ => "'[\"first\", \"second\"]'",
                    };
                    why.push_str(&format!(
                        "; a list is written as a TOML array, also in a PORTCULLIS__SECTION__KEY \
                         variable: {example}"
                    ));
                }
                key_err(&key, why)
            })?;
        adjust(&mut config);
        config.validate().map_err(|e| match e {
            ConfigError::Key { key, message } => {
                let mut message = files.iter().fold(message, |m, f| f.scrub(m));
                // A value read from a file: the file is what to look at.
                if let Some(f) = files.iter().find(|f| f.key == key) {
                    message.push_str(&format!(" (the value read from {})", f.path));
                }
                ConfigError::Key { message, key }
            }
            other => other,
        })?;
        config.secret_files = files
            .iter()
            .map(|f| (f.key.clone(), PathBuf::from(&f.path)))
            .collect();
        config.file = file;
        Ok(config)
    }

    /// Files holding secrets that other users of the machine may read or change, as advice
    /// lines: the `_file` of a secret key (the master key, the store URLs, the SMTP URL), the
    /// TLS private key, and the configuration file itself where it holds the master key or
    /// SMTP URL inline.
    pub fn exposed_secret_files(&self) -> Vec<String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let files = self
                .secret_files
                .iter()
                .filter(|(key, _)| SECRET_VALUE_KEYS.contains(&key.as_str()))
                .map(|(key, path)| (format!("the value of {key}"), path, true));
            // The configuration file: anyone changing it changes what the gateway guards, so
            // it is pointed out when every user may write it; when every user may read it, only
            // where it holds a secret.
            let config = self.file.iter().map(|(path, secret)| {
                let what = match secret {
                    true => "the configuration, with secrets in it",
                    false => "the configuration",
                };
                (what.to_string(), path, *secret)
            });
            let tls_key = self.server.tls_key.iter().map(|path| {
                (
                    "the TLS private key, server.tls_key".to_string(),
                    path,
                    true,
                )
            });
            files
                .chain(config)
                .chain(tls_key)
                .filter_map(|(what, path, secret)| {
                    let mode = std::fs::metadata(path).ok()?.permissions().mode();
                    let who = match (mode & 0o002 != 0, mode & 0o004 != 0 && secret) {
                        (true, _) => "writable",
                        (false, true) => "readable",
                        (false, false) => return None,
                    };
                    Some(format!(
                        "{} ({what}) is {who} by every user of this machine (mode {:04o}): make \
                         it readable by the gateway's user (and group) only, e.g. chmod 0440 \
                         (Kubernetes: defaultMode 0440 on the Secret's volume)",
                        path.display(),
                        mode & 0o7777
                    ))
                })
                .collect()
        }
        #[cfg(not(unix))]
        Vec::new()
    }

    /// Checks relations between values that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.secrets.master_key.is_some() {
            self.master_key()?;
        }
        let s = &self.server;
        if !matches!(s.public_url.scheme(), "http" | "https") || s.public_url.host().is_none() {
            return Err(key_err(
                "server.public_url",
                "must be an http or https URL with a host",
            ));
        }
        if !s.public_url.username().is_empty() || s.public_url.password().is_some() {
            return Err(key_err(
                "server.public_url",
                "must not carry a user name or password",
            ));
        }
        if s.public_url.path() != "/"
            || s.public_url.query().is_some()
            || s.public_url.fragment().is_some()
        {
            return Err(key_err(
                "server.public_url",
                "must not have a path, query or fragment (#…); the gateway owns the whole origin",
            ));
        }
        if s.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(key_err(
                "server.listen",
                "must be IP:PORT, e.g. 0.0.0.0:8080",
            ));
        }
        self.validate_listeners()?;
        if s.max_uri_length < 256 {
            return Err(key_err("server.max_uri_length", "must be at least 256"));
        }
        if s.shutdown_timeout > Duration::from_secs(3600) {
            return Err(key_err("server.shutdown_timeout", "must be at most 1h"));
        }
        if self.upstream.url.scheme() != "http" || self.upstream.url.host().is_none() {
            return Err(key_err(
                "upstream.url",
                "must be an http:// URL (keep the console on a private network or loopback)",
            ));
        }
        let u = &self.upstream.url;
        if !u.username().is_empty() || u.password().is_some() {
            // Not shown: the value holds a password.
            return Err(key_err(
                "upstream.url",
                "must not carry a user name or password: the gateway sends none to the console, \
                 which trusts the identity token instead",
            ));
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err(key_err(
                "upstream.url",
                "must not have a query or fragment: each request's own query is sent",
            ));
        }
        for o in &self.upstream.allowed_origins {
            if o.contains('*') {
                return Err(key_err(
                    "upstream.allowed_origins",
                    format!(
                        "\"{o}\": patterns are not taken (a browser sends one exact origin): \
                         list each origin"
                    ),
                ));
            }
            let origin = Url::parse(o)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && host_a_browser_sends(u))
                .map(|u| u.origin().ascii_serialization());
            if origin.as_deref() != Some(o.as_str()) {
                return Err(key_err(
                    "upstream.allowed_origins",
                    format!(
                        "\"{o}\" is not an origin as browsers send it: scheme, host and a port \
                         other than the scheme's, in lower case, with no path or slash at the end \
                         (e.g. \"https://app.example.com\"{})",
                        origin
                            .map(|x| format!("; this one is \"{x}\""))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        for (key, t) in [
            ("server.header_timeout", s.header_timeout),
            ("server.body_timeout", s.body_timeout),
        ] {
            if t < Duration::from_secs(1) || t > Duration::from_secs(600) {
                return Err(key_err(key, "must be between 1s and 10m"));
            }
        }
        for (key, t) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.response_timeout", self.upstream.response_timeout),
        ] {
            if t < Duration::from_millis(100) || t > Duration::from_secs(3600) {
                return Err(key_err(key, "must be between 100ms and 1h"));
            }
        }
        if s.max_clock_skew > Duration::from_secs(600)
            || (!s.max_clock_skew.is_zero() && s.max_clock_skew < Duration::from_millis(100))
        {
            return Err(key_err(
                "server.max_clock_skew",
                "must be 0s (not checked) or between 100ms and 10m",
            ));
        }
        if s.max_connections_per_address != 0
            && !(16..=1_000_000).contains(&s.max_connections_per_address)
        {
            return Err(key_err(
                "server.max_connections_per_address",
                "must be 0 (no bound) or between 16 and 1000000 (a browser opens up to six \
                 connections to a site, and many users may share one address behind a NAT)",
            ));
        }
        if s.max_form_bytes < 1024 || s.max_form_bytes > 1024 * 1024 {
            return Err(key_err(
                "server.max_form_bytes",
                "must be between 1024 and 1048576 (the sign-in forms need about 1 KiB)",
            ));
        }
        let t = &self.token;
        if t.ttl < Duration::from_secs(10) || t.ttl > MAX_TOKEN_TTL {
            return Err(key_err("token.ttl", "must be between 10s and 5m"));
        }
        if t.key_overlap < t.ttl {
            return Err(key_err(
                "token.key_overlap",
                "must be at least token.ttl so issued tokens stay verifiable",
            ));
        }
        if http::HeaderName::from_bytes(t.header.as_bytes()).is_err() {
            return Err(key_err("token.header", "is not a valid HTTP header name"));
        }
        let name = t.header.trim().to_ascii_lowercase().replace('_', "-");
        if RESERVED_HEADERS.contains(&name.as_str())
            || RESERVED_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
            || crate::proxy::is_identity_header(&name)
        {
            return Err(key_err(
                "token.header",
                "names a header that HTTP or the gateway already uses for something else; \
                 choose one of your own, such as X-Portcullis-Assertion",
            ));
        }
        validate_log_level(&self.log.level)?;
        if t.audience.trim().is_empty() {
            return Err(key_err("token.audience", "must not be empty"));
        }
        if t.issuer.as_deref().is_some_and(|i| i.trim().is_empty()) {
            return Err(key_err(
                "token.issuer",
                "must not be empty (leave it out to use the public URL)",
            ));
        }
        if self.notify.outbox_dir.as_os_str().is_empty() {
            return Err(key_err("notify.outbox_dir", "must not be empty"));
        }
        let n = &self.notify;
        if n.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(key_err(
                "notify.from",
                "must be an email address, e.g. `Portcullis <security@esp.example>`",
            ));
        }
        if let Some(url) = &n.smtp_url {
            // Options the mail library would pass over in silence.
            if let Ok(parsed) = url::Url::parse(url.expose()) {
                let mut seen = std::collections::HashSet::new();
                for (option, value) in parsed.query_pairs() {
                    let why = match (parsed.scheme(), option.as_ref()) {
                        // The library reads one of two: which would decide TLS is not clear.
                        _ if !seen.insert(option.to_string()) => {
                            Some(format!("has the option `{option}` twice: keep one"))
                        }
                        ("smtps", "tls") => Some(format!(
                            "has ?tls={value}, but smtps:// speaks TLS from the start: drop the \
                             option (or use smtp:// with ?tls=required)"
                        )),
                        (_, "tls") if !matches!(value.as_ref(), "required" | "opportunistic") => {
                            Some(format!(
                                "has ?tls={value}: use tls=required (STARTTLS or no mail) or \
                                 tls=opportunistic"
                            ))
                        }
                        (_, "tls" | "ehlo_domain") => None,
                        _ => Some(format!(
                            "has an unknown option `{option}` (known: tls, ehlo_domain)"
                        )),
                    };
                    if let Some(why) = why {
                        return Err(key_err("notify.smtp_url", why));
                    }
                }
            }
            if let Err(e) =
                lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(url.expose())
            {
                // The URL may hold a password: name the problem, not the value.
                return Err(key_err(
                    "notify.smtp_url",
                    format!("is not a usable SMTP URL ({e}); use smtp://host:port or smtps://user:password@host"),
                ));
            }
        }
        if n.report_link_ttl < Duration::from_secs(3600)
            || n.report_link_ttl > Duration::from_secs(30 * 24 * 3600)
        {
            return Err(key_err(
                "notify.report_link_ttl",
                "must be between 1h and 30d",
            ));
        }
        for (i, rule) in self.step_up.iter().enumerate() {
            crate::policy::step_up::check_rule(rule)
                .map_err(|why| key_err(&format!("step_up[{i}]"), why))?;
        }
        let ss = &self.session;
        // A session's last use is recorded once a minute: a shorter idle limit would end
        // sessions in steady use.
        if ss.idle_timeout < Duration::from_secs(2 * 60) {
            return Err(key_err(
                "session.idle_timeout",
                "must be at least 2m (a session's last use is recorded once a minute)",
            ));
        }
        if ss.login_timeout < Duration::from_secs(60)
            || ss.login_timeout > Duration::from_secs(60 * 60)
        {
            return Err(key_err(
                "session.login_timeout",
                "must be between 1m and 1h: a sign-in needs time to find the second factor",
            ));
        }
        if ss.absolute_timeout > Duration::from_secs(90 * 86_400) {
            return Err(key_err("session.absolute_timeout", "must be at most 90d"));
        }
        if ss.idle_timeout.is_zero() || ss.absolute_timeout < ss.idle_timeout {
            return Err(key_err(
                "session.absolute_timeout",
                "must be at least session.idle_timeout (and both non-zero)",
            ));
        }
        if ss.local_cache > Duration::from_secs(1) {
            return Err(key_err(
                "session.local_cache",
                "must be at most 1s (0 turns the cache off)",
            ));
        }
        if ss.local_cache_entries > 1_000_000 {
            return Err(key_err(
                "session.local_cache_entries",
                "must be at most 1000000",
            ));
        }
        let p = &self.password;
        if p.min_length < 8 {
            return Err(key_err("password.min_length", "must be at least 8"));
        }
        if p.max_length < 128 || p.max_length > 4096 {
            return Err(key_err(
                "password.max_length",
                "must be between 128 and 4096",
            ));
        }
        if p.min_length > 128 {
            return Err(key_err(
                "password.min_length",
                "must be at most 128 (and so at most password.max_length)",
            ));
        }
        // Each hash holds `argon2_memory_kib` for its time, once per hashing slot.
        if !(8..=MAX_ARGON2_MEMORY_KIB).contains(&p.argon2_memory_kib) {
            return Err(key_err(
                "password.argon2_memory_kib",
                "must be between 8 and 4194304 (4 GiB), held once per hashing slot",
            ));
        }
        if !(1..=100).contains(&p.argon2_iterations) {
            return Err(key_err(
                "password.argon2_iterations",
                "must be between 1 and 100",
            ));
        }
        if !(1..=64).contains(&p.argon2_parallelism) {
            return Err(key_err(
                "password.argon2_parallelism",
                "must be between 1 and 64",
            ));
        }
        if argon2::Params::new(
            p.argon2_memory_kib,
            p.argon2_iterations,
            p.argon2_parallelism,
            None,
        )
        .is_err()
        {
            return Err(key_err(
                "password.argon2_memory_kib",
                "must be at least 8 KiB per lane (8 × password.argon2_parallelism)",
            ));
        }
        if !(1..=256).contains(&p.max_concurrent_hashes) {
            return Err(key_err(
                "password.max_concurrent_hashes",
                "must be between 1 and 256 (one thread each)",
            ));
        }
        if !(0..=19).contains(&p.hashing_nice) {
            return Err(key_err(
                "password.hashing_nice",
                "must be a nice value from 0 (normal priority) to 19 (lowest)",
            ));
        }
        let l = &self.limits;
        if l.window.is_zero() {
            return Err(key_err("limits.window", "must not be zero"));
        }
        for (key, n) in [
            (
                "limits.password_failures_per_account",
                l.password_failures_per_account,
            ),
            ("limits.failures_per_ip", l.failures_per_ip),
            ("limits.failures_per_network", l.failures_per_network),
            (
                "limits.second_factor_failures_per_account",
                l.second_factor_failures_per_account,
            ),
            (
                "limits.second_factor_failures_per_login",
                l.second_factor_failures_per_login,
            ),
            (
                "limits.global_sign_ins_per_second",
                l.global_sign_ins_per_second,
            ),
            ("limits.failures_per_device", l.failures_per_device),
            (
                "limits.second_factor_first_after",
                l.second_factor_first_after,
            ),
        ] {
            if n == 0 {
                return Err(key_err(key, "must be at least 1"));
            }
        }
        if l.max_delay > Duration::from_secs(10) {
            return Err(key_err("limits.max_delay", "must be at most 10s"));
        }
        let b = &self.binding;
        if b.bound_cookie_ttl < Duration::from_secs(3)
            || b.bound_cookie_ttl > Duration::from_secs(3600)
        {
            return Err(key_err(
                "binding.bound_cookie_ttl",
                "must be between 3s and 1h",
            ));
        }
        if b.max_failures == 0 || b.max_failures > 1000 {
            return Err(key_err(
                "binding.max_failures",
                "must be between 1 and 1000",
            ));
        }
        self.storage.validate()?;
        self.validate_webauthn()?;
        self.validate_admin()?;
        self.validate_risk()?;
        if let Some(k) = &self.secrets.master_key {
            crate::crypto::MasterKey::from_base64(k.expose())
                .map_err(|e| key_err("secrets.master_key", e.to_string()))?;
        }
        Ok(())
    }

    fn validate_admin(&self) -> Result<(), ConfigError> {
        if self.remember_device.lifetime > Duration::from_secs(90 * 24 * 3600) {
            return Err(key_err(
                "remember_device.lifetime",
                "must be at most 90 days (0s switches it off)",
            ));
        }
        let a = &self.admin;
        if a.sudo_timeout < Duration::from_secs(60) || a.sudo_timeout > Duration::from_secs(15 * 60)
        {
            return Err(key_err("admin.sudo_timeout", "must be between 1m and 15m"));
        }
        if a.enrolment_link_ttl < Duration::from_secs(5 * 60)
            || a.enrolment_link_ttl > Duration::from_secs(30 * 24 * 3600)
        {
            return Err(key_err(
                "admin.enrolment_link_ttl",
                "must be between 5m and 30 days",
            ));
        }
        Ok(())
    }

    fn validate_risk(&self) -> Result<(), ConfigError> {
        let r = &self.risk;
        if !(100..=20_000).contains(&r.max_travel_speed) {
            return Err(key_err(
                "risk.max_travel_speed",
                "must be between 100 and 20000 (km/h)",
            ));
        }
        if !(50..=5_000).contains(&r.min_travel_distance) {
            return Err(key_err(
                "risk.min_travel_distance",
                "must be between 50 and 5000 (km)",
            ));
        }
        if r.medium_score == 0 || r.medium_score > 1_000 {
            return Err(key_err("risk.medium_score", "must be between 1 and 1000"));
        }
        if r.high_score < r.medium_score || r.high_score > 1_000 {
            return Err(key_err(
                "risk.high_score",
                format!(
                    "is {}, and must be between risk.medium_score ({}) and 1000",
                    r.high_score, r.medium_score
                ),
            ));
        }
        if r.history < Duration::from_secs(24 * 3600)
            || r.history > Duration::from_secs(400 * 24 * 3600)
        {
            return Err(key_err(
                "risk.history",
                "must be between 1 day and 400 days",
            ));
        }
        // The database itself is opened by `serve` and `check-config` (not here, so that the
        // administration commands work while it is being replaced).
        Ok(())
    }

    /// TLS, the redirect listener and the metrics listener.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let https = self.is_https();
        for (key, path) in [
            ("server.tls_cert", &s.tls_cert),
            ("server.tls_key", &s.tls_key),
        ] {
            // `tls_key_file = "…"` would put the key itself here (the `_file` suffix reads a
            // value from a file): refuse without repeating it.
            if path
                .as_ref()
                .is_some_and(|p| p.as_os_str().to_string_lossy().trim().is_empty())
            {
                return Err(key_err(
                    key,
                    "is empty: give the path of a PEM file, or leave tls_cert and tls_key both \
                     out for plain HTTP",
                ));
            }
            if path
                .as_ref()
                .is_some_and(|p| p.to_string_lossy().contains('\n'))
            {
                return Err(key_err(
                    key,
                    "must be the path of a PEM file (set the path itself, not a `_file` key)",
                ));
            }
        }
        match (&s.tls_cert, &s.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(key_err(
                    "server.tls_cert",
                    "server.tls_cert and server.tls_key go together: set both or neither",
                ))
            }
            (Some(_), Some(_)) if !https => {
                return Err(key_err(
                    "server.public_url",
                    "must be an https:// URL when server.tls_cert is set",
                ))
            }
            _ => {}
        }
        let own = [
            ("server.redirect_http_listen", &s.redirect_http_listen),
            ("metrics.listen", &self.metrics.listen),
        ];
        for (i, (key, addr)) in own.iter().enumerate() {
            let Some(addr) = addr else { continue };
            let Ok(at) = addr.parse::<std::net::SocketAddr>() else {
                return Err(key_err(key, "must be IP:PORT, e.g. 127.0.0.1:9464"));
            };
            // One port on all addresses (0.0.0.0, ::) takes it on every single one too.
            let clash = |other: &str| {
                other.parse::<std::net::SocketAddr>().is_ok_and(|o| {
                    o.port() == at.port()
                        && (o.ip() == at.ip()
                            || o.ip().is_unspecified()
                            || at.ip().is_unspecified())
                })
            };
            if clash(&s.listen) {
                return Err(key_err(key, "must differ from server.listen"));
            }
            let earlier = own[..i]
                .iter()
                .find(|(_, a)| a.as_deref().is_some_and(clash));
            if let Some((other, _)) = earlier {
                return Err(key_err(key, format!("must differ from {other}")));
            }
        }
        if s.redirect_http_listen.is_some() && !https {
            return Err(key_err(
                "server.redirect_http_listen",
                "needs an https:// server.public_url to redirect to",
            ));
        }
        Ok(())
    }

    fn validate_webauthn(&self) -> Result<(), ConfigError> {
        let w = &self.webauthn;
        if w.ceremony_timeout < Duration::from_secs(30) || w.ceremony_timeout > MAX_CEREMONY_TIMEOUT
        {
            return Err(key_err(
                "webauthn.ceremony_timeout",
                "must be between 30s and 5m",
            ));
        }
        // Keys are off in effect too where the public URL's host is an IP address.
        if !self.webauthn_effective() {
            let why = match w.enabled {
                false => "needs security keys, which webauthn.enabled = false switches off",
                true => {
                    "needs security keys, which are off: server.public_url has an IP address, \
                     not a domain name, as its host"
                }
            };
            let key = match w.require_phishing_resistant {
                true => "webauthn.require_phishing_resistant",
                false => "webauthn.phishing_resistant_accounts",
            };
            if w.require_phishing_resistant || !w.phishing_resistant_accounts.is_empty() {
                return Err(key_err(
                    key,
                    format!("{why}: nobody it covers could sign in"),
                ));
            }
            if let Some(i) = self.step_up.iter().position(|r| r.key) {
                return Err(key_err(
                    &format!("step_up[{i}].key"),
                    format!(
                        "{why}: nobody could pass the rule, so its paths would be closed to all"
                    ),
                ));
            }
        }
        if w.rp_name.trim().is_empty() || w.rp_name.len() > 64 {
            return Err(key_err("webauthn.rp_name", "must be 1 to 64 characters"));
        }
        self.validate_attestation()?;
        if let Some(rp_id) = &w.rp_id {
            let host = self.server.public_url.domain().unwrap_or("");
            if rp_id.bytes().any(|b| b.is_ascii_uppercase()) {
                // Browsers compare the relying party as a host name, which they hold in lower
                // case: a key registered for "ESP.example" would match nothing.
                return Err(key_err(
                    "webauthn.rp_id",
                    format!(
                        "must be written in lower case, as browsers write host names: \"{}\"",
                        rp_id.to_ascii_lowercase()
                    ),
                ));
            }
            let ok = !rp_id.is_empty()
                && rp_id.parse::<std::net::IpAddr>().is_err()
                && (host == rp_id || host.ends_with(&format!(".{rp_id}")));
            if !ok {
                return Err(key_err(
                    "webauthn.rp_id",
                    "must be the domain of server.public_url or a parent domain of it",
                ));
            }
            // Browsers refuse a public suffix (`com`, `co.uk`) as a relying party: no key
            // could ever be registered.
            // (A parent domain must be one a site can register: not `com`, `co.uk`, an
            // unknown top-level domain, nor one a wildcard rule makes a suffix, `ck`.)
            let lower = rp_id.to_ascii_lowercase();
            if lower != host.to_ascii_lowercase() && psl::domain(lower.as_bytes()).is_none() {
                return Err(key_err(
                    "webauthn.rp_id",
                    "is a public suffix (such as com or co.uk), which browsers refuse for \
                     security keys: use your own domain (example.com) or the public URL's host",
                ));
            }
        }
        Ok(())
    }

    /// Attestation policy: AAGUIDs are UUIDs, an allow-list only where attestation is required,
    /// and the CA files exist and hold certificates whenever some account requires attestation.
    fn validate_attestation(&self) -> Result<(), ConfigError> {
        let w = &self.webauthn;
        let mut lists = vec![(
            "webauthn.allowed_aaguids".to_string(),
            w.attestation,
            &w.allowed_aaguids,
        )];
        for (account, p) in &w.accounts {
            if let Some(list) = &p.allowed_aaguids {
                let key = format!("webauthn.accounts.\"{account}\".allowed_aaguids");
                lists.push((key, p.attestation.unwrap_or(w.attestation), list));
            }
        }
        for (key, attestation, list) in lists {
            if let Some(bad) = list.iter().find(|a| uuid::Uuid::parse_str(a).is_err()) {
                return Err(key_err(
                    &key,
                    format!("`{bad}` is not an AAGUID (a UUID like 2fc0579f-8113-47ea-b116-bb5a8db9202a)"),
                ));
            }
            if !list.is_empty() && attestation != Attestation::Required {
                return Err(key_err(
                    &key,
                    "needs attestation = \"required\": a model that is not attested proves nothing",
                ));
            }
        }
        for account in w.accounts.keys() {
            let policy = w.policy_for(account);
            if !policy.allowed_aaguids.is_empty() && policy.attestation != Attestation::Required {
                return Err(key_err(
                    &format!("webauthn.accounts.\"{account}\".attestation"),
                    "the inherited allowed_aaguids need attestation = \"required\"",
                ));
            }
        }
        // Files listed are read whether or not an account needs them yet: a missing or broken
        // one shows now, not on the day attestation is switched on.
        if !w.attestation_ca_files.is_empty() {
            crate::auth::webauthn::attestation_cas(&w.attestation_ca_files)
                .map_err(|e| key_err("webauthn.attestation_ca_files", e))?;
        }
        if w.any_attestation_required() && w.attestation_ca_files.is_empty() {
            return Err(key_err(
                "webauthn.attestation_ca_files",
                "attestation = \"required\" needs at least one PEM file of trusted authenticator CAs",
            ));
        }
        Ok(())
    }

    /// The relying-party id WebAuthn uses, or `None` when keys cannot work here: WebAuthn is
    /// switched off, or the public URL's host is an IP address (browsers require a domain).
    pub fn webauthn_rp_id(&self) -> Option<String> {
        if !self.webauthn.enabled {
            return None;
        }
        match &self.webauthn.rp_id {
            Some(id) => Some(id.clone()),
            None => self.server.public_url.domain().map(str::to_string),
        }
    }

    /// The `iss` claim and the origin the gateway answers as.
    pub fn issuer(&self) -> String {
        self.token.issuer.clone().unwrap_or_else(|| {
            self.server
                .public_url
                .as_str()
                .trim_end_matches('/')
                .to_string()
        })
    }

    /// Whether cookies get `Secure` and the `__Host-` prefix.
    pub fn is_https(&self) -> bool {
        self.server.public_url.scheme() == "https"
    }

    /// The master key, required by every command that touches secrets.
    pub fn master_key(&self) -> Result<crate::crypto::MasterKey, ConfigError> {
        let k = self.secrets.master_key.as_ref().ok_or_else(|| {
            key_err(
                "secrets.master_key",
                "is required (set secrets.master_key_file or PORTCULLIS__SECRETS__MASTER_KEY)",
            )
        })?;
        let key = crate::crypto::MasterKey::from_base64(k.expose())
            .map_err(|e| key_err("secrets.master_key", e.to_string()))?;
        // A placeholder rather than random bytes: everything sealed with it would be readable
        // to anyone who guesses it.
        if crate::crypto::MasterKey::is_placeholder(k.expose()) {
            return Err(key_err(
                "secrets.master_key",
                "is not random (a placeholder such as all zeros or a repeated word): generate \
                 one with `openssl rand -base64 32`",
            ));
        }
        Ok(key)
    }

    /// Whether security keys and passkeys will be offered: switched on and with a domain name
    /// in `server.public_url` (an IP address cannot be a WebAuthn relying party).
    pub fn webauthn_effective(&self) -> bool {
        self.webauthn.enabled && self.webauthn_rp_id().is_some()
    }

    /// The effective configuration as TOML, secrets redacted (also passwords inside store URLs),
    /// `webauthn.enabled` and `token.issuer` as the gateway will run them.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = Self {
            storage: self.storage.redacted(),
            ..self.clone()
        };
        shown.webauthn.enabled = self.webauthn_effective();
        // The relying party as it is in force (the public URL's host unless set).
        if shown.webauthn.enabled {
            shown.webauthn.rp_id = self.webauthn_rp_id();
        }
        shown.token.issuer = Some(self.issuer());
        let text =
            toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        // The SMTP URL as the store URLs are shown: host, port and TLS mode, its password not.
        match &self.notify.smtp_url {
            Some(url) => {
                let marker = format!("smtp_url = \"{}\"", crate::secret::REDACTED);
                let shown = toml::Value::String(crate::secret::redact_url(url.expose()));
                text.replacen(&marker, &format!("smtp_url = {shown}"), 1)
            }
            None => text,
        }
    }
}

/// Variables that look meant for the gateway but are not read: `PORTCULLIS_SERVER__LISTEN` (one
/// underscore), `portcullis__server__listen` (lower case), `PORTCULLIS_LOG_LEVEL`. Kubernetes'
/// service links for a service named like the gateway (`PORTCULLIS_SERVICE_HOST`,
/// `PORTCULLIS_PORT_8080_TCP`, …) are not the operator's and are left alone.
/// The process environment as text, for [`Config::load`] and [`ignored_variables`]. A variable
/// that is not UTF-8 text is left out (it is none of the gateway's: other software shares the
/// environment) unless its name says it is meant for the gateway (`PORTCULLIS…`), which is an
/// error naming it, never its value (it may be a password).
pub fn environment() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => vars.push((name, value)),
            (name, _) => {
                let name = name.unwrap_or_else(|n| n.to_string_lossy().into_owned());
                if name.to_ascii_uppercase().starts_with("PORTCULLIS") {
                    return Err(ConfigError::Environment {
                        name: name.escape_debug().to_string(),
                    });
                }
            }
        }
    }
    Ok(vars)
}

pub fn ignored_variables(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let service_link = |n: &str| {
        n.contains("_SERVICE_HOST")
            || n.contains("_SERVICE_PORT")
            || n.ends_with("_PORT")
            || n.split("_PORT_")
                .nth(1)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    let mut ignored: Vec<String> = env
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| {
            name.to_ascii_uppercase().starts_with("PORTCULLIS")
                && !name.starts_with(ENV_PREFIX)
                && name != LOG_ENV
                && name != "PORTCULLIS_CONFIG"
                && !service_link(name)
        })
        .collect();
    ignored.sort();
    ignored
}

/// Applies `PORTCULLIS__SECTION__KEY=value` overrides. Values are read as TOML values when they
/// parse as one (numbers, booleans, arrays), as plain strings otherwise.
/// Returns the keys the environment set (`section.key`).
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<std::collections::HashSet<String>, ConfigError> {
    // Keys the environment set, to tell `key` and `key_file` both set there from one set in the
    // file and the other in the environment (where the environment wins).
    let mut from_env: std::collections::HashSet<(String, String)> = Default::default();
    for (name, raw) in env {
        if name == LOG_ENV || name == format!("{ENV_PREFIX}LOG__LEVEL") {
            // The log filter's own variable is `log.level` too, validated like it: the two may
            // not both be set.
            if !from_env.insert(("log".into(), "level".into())) {
                return Err(key_err(
                    "log.level",
                    format!("both {LOG_ENV} and {ENV_PREFIX}LOG__LEVEL are set; keep one"),
                ));
            }
            let log = table
                .entry("log")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(log) = log.as_table_mut() {
                log.insert("level".into(), toml::Value::String(raw));
            }
            continue;
        }
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if matches!(path.first().map(String::as_str), Some("step_up"))
            || (path.len() >= 2 && path[0] == "webauthn" && path[1] == "accounts")
        {
            return Err(key_err(
                &name,
                "[[step_up]] rules and webauthn.accounts tables are set in the configuration \
                 file only",
            ));
        }
        if path.len() != 2 || path.iter().any(|p| p.is_empty()) {
            return Err(key_err(
                &name,
                "environment overrides look like PORTCULLIS__SECTION__KEY",
            ));
        }
        let parsed = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| !v.is_table());
        // A value written as a TOML array or string that does not parse is a mistake to name,
        // not a plain text to take.
        // (An IPv6 socket address, `[::]:8080`, is a text that starts with a bracket.)
        if parsed.is_none()
            && raw.trim_start().starts_with(['[', '"'])
            && raw.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(key_err(
                &name,
                "is not a valid TOML value (a list is written '[\"a\", \"b\"]')",
            ));
        }
        let value = parsed.unwrap_or_else(|| toml::Value::String(raw.clone()));
        let section = table
            .entry(path[0].clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section) = section.as_table_mut() else {
            return Err(key_err(&path[0], "must be a table"));
        };
        // The other spelling of the same key (`x` / `x_file`): the environment's value replaces
        // the file's whichever spelling either uses; both from the environment is a conflict.
        let key = &path[1];
        let sibling = match key.strip_suffix("_file") {
            Some(base) => base.to_string(),
            None => format!("{key}_file"),
        };
        if from_env.contains(&(path[0].clone(), sibling.clone())) {
            return Err(key_err(
                &format!("{}.{}", path[0], key.trim_end_matches("_file")),
                format!(
                    "both {ENV_PREFIX}{}__{} and its _FILE form are set; keep one",
                    path[0].to_ascii_uppercase(),
                    key.trim_end_matches("_file").to_ascii_uppercase()
                ),
            ));
        }
        section.remove(&sibling);
        section.insert(key.clone(), value);
        from_env.insert((path[0].clone(), key.clone()));
    }
    Ok(from_env
        .into_iter()
        .map(|(section, key)| format!("{section}.{key}"))
        .collect())
}

/// The largest file a `_file` key reads: keys, URLs and paths are far smaller; anything larger
/// is the wrong file (`/dev/zero` would never end).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A file a `_file` key read: errors about its key name the file, never its content.
struct ReadFile {
    /// The key it gave a value (`secrets.master_key`).
    key: String,
    path: String,
    content: String,
}

impl ReadFile {
    /// `message` without the content, as it is and as `Debug` quotes it. Contents of a few
    /// characters are left alone: replacing them would garble every word that holds them.
    fn scrub(&self, message: String) -> String {
        if self.content.chars().count() < 4 {
            return message;
        }
        let instead = format!("<the content of {}>", self.path);
        let quoted = format!("{:?}", self.content);
        let inner = &quoted[1..quoted.len() - 1];
        message
            .replace(&quoted, &instead)
            .replace(inner, &instead)
            .replace(self.content.as_str(), &instead)
    }
}

/// Replaces every `X_file = "/path"` with `X = "<file contents>"`; each file read is added to
/// `read`, so errors can name the file instead of its content.
fn resolve_secret_files(
    table: &mut toml::Table,
    prefix: &str,
    read: &mut Vec<ReadFile>,
) -> Result<(), ConfigError> {
    let keys: Vec<String> = table.keys().cloned().collect();
    for k in keys {
        let full = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if let Some(toml::Value::Table(inner)) = table.get_mut(&k) {
            resolve_secret_files(inner, &full, read)?;
            continue;
        }
        let Some(base) = k.strip_suffix("_file") else {
            continue;
        };
        let Some(toml::Value::String(path)) = table.get(&k).cloned() else {
            return Err(key_err(&full, "must be a file path"));
        };
        if path.trim().is_empty() {
            return Err(key_err(
                &full,
                "is empty: give the path of the file to read the value from, or leave it out",
            ));
        }
        let base_full = full.trim_end_matches("_file").to_string();
        if table.contains_key(base) {
            return Err(key_err(
                &base_full,
                format!("both `{base}` and `{k}` are set; keep one"),
            ));
        }
        let content = read_secret_file(&path).map_err(|source| ConfigError::SecretFile {
            key: full.clone(),
            path: PathBuf::from(&path),
            source,
        })?;
        let content = content.trim_end_matches(['\r', '\n']).to_string();
        read.push(ReadFile {
            key: base_full.clone(),
            path,
            content: content.clone(),
        });
        table.remove(&k);
        table.insert(base.to_string(), toml::Value::String(content));
    }
    Ok(())
}

/// Whether `url`'s host is one a browser can have in an `Origin`: an IP address, or a name of
/// non-empty labels of letters, digits and `-` (in lower case, as parsed).
fn host_a_browser_sends(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        }),
        Some(_) => true,
        None => false,
    }
}

/// Keys whose values are secrets (or hold one): an error about them never repeats the value.
const SECRET_VALUE_KEYS: [&str; 4] = [
    "secrets.master_key",
    "storage.durable",
    "storage.ephemeral",
    "notify.smtp_url",
];

/// `message` with every value quoted in backticks (as serde quotes what it was given) left out.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut quoted = true;
    for part in parts {
        if quoted {
            out.push_str("(not shown)");
        } else {
            out.push_str(part);
        }
        quoted = !quoted;
    }
    out
}

/// A `_file` key's file as text, at most [`MAX_SECRET_FILE`] bytes.
fn read_secret_file(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut content = String::new();
    std::fs::File::open(path)?
        .take(MAX_SECRET_FILE + 1)
        .read_to_string(&mut content)?;
    if content.len() as u64 > MAX_SECRET_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {} KiB: not a key, URL or path (is it the right file?)",
            MAX_SECRET_FILE / 1024
        )));
    }
    Ok(content)
}

/// Networks as CIDRs (`10.0.0.0/8`); a single address (`10.0.0.7`) is that address alone. A
/// CIDR with host bits set (`10.0.0.7/8`) is refused: it reads as one host but means a network.
pub mod networks {
    use super::*;

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        nets.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|text| parse(text).map_err(serde::de::Error::custom))
            .collect()
    }

    pub fn parse(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        if let Ok(ip) = text.parse::<std::net::IpAddr>() {
            return Ok(IpNet::from(ip));
        }
        let net: IpNet = text.parse().map_err(|_| {
            format!("`{text}` is not a network like 10.0.0.0/8 or an address like 10.0.0.7")
        })?;
        if net.trunc() != net {
            return Err(format!(
                "`{text}` has host bits set: write {} for the network, or {} for the one address",
                net.trunc(),
                net.addr()
            ));
        }
        Ok(net)
    }
}

/// Durations as `"90s"`, `"15m"`, `"12h"` (humantime) or a plain number of seconds.
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(*d))
    }

    /// A duration as it would be written in the file: days, hours, minutes, seconds and
    /// milliseconds, largest first, only those that are not zero (`90d`, `1d 12h`, `1s 500ms`,
    /// `0s`); never months or years, whose length humantime takes as an average.
    pub fn text(d: Duration) -> String {
        let mut ms = d.as_millis();
        let mut out = Vec::new();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms >= size {
                out.push(format!("{}{unit}", ms / size));
                ms %= size;
            }
        }
        if ms > 0 || out.is_empty() {
            out.push(match ms {
                0 => "0s".to_string(),
                n => format!("{n}ms"),
            });
        }
        out.join(" ")
    }

    /// A duration: a text such as `"90s"`, `"15m"` or `"1h 30m"`, or a whole number of seconds
    /// (also written as a text, `"30"`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration like \"90s\" or \"15m\" (a whole number counts seconds)")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Duration, E> {
                Ok(Duration::from_secs(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Duration, E> {
                u64::try_from(n)
                    .map(Duration::from_secs)
                    .map_err(|_| E::custom(format!("{n} is negative: a duration is 0 or more")))
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Duration, E> {
                if let Ok(n) = t.trim().parse::<u64>() {
                    return Ok(Duration::from_secs(n));
                }
                humantime::parse_duration(t).map_err(|e| {
                    E::custom(format!(
                        "`{t}` is not a duration like \"90s\" or \"15m\": {e}"
                    ))
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests;
