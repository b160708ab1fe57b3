//! `[storage]`: where state lives, and how long to wait for a store before failing closed.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use serde::{Deserialize, Serialize};

use super::{duration, key_err, ConfigError};
use crate::secret::redact_url;
use crate::store::redis::RedisTarget;

/// `[storage]`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Durable store URL: `sqlite:///path/db.sqlite` (created if missing) or `postgres://…`.
    pub durable: String,
    /// Ephemeral store: `memory` (one gateway), `redis://[user:pass@]host:port[/db]` (one Redis
    /// server, several gateways) or `redis+cluster://[user:pass@]host:port,host:port` (Redis
    /// Cluster; the listed nodes are seeds).
    pub ephemeral: String,
    /// Prepended to every Redis key, so several deployments (or tests) can share one server.
    pub redis_prefix: String,
    /// Longest wait for a connection to a Redis node; after it the request gets 503.
    #[serde(with = "duration")]
    pub redis_connect_timeout: Duration,
    /// Longest wait for one Redis answer; after it the request gets 503.
    #[serde(with = "duration")]
    pub redis_response_timeout: Duration,
    /// With `rediss://`: a PEM CA bundle that alone is trusted for the Redis servers'
    /// certificates (a private CA). Unset, or empty (`PORTCULLIS__STORAGE__REDIS_TLS_CA=""`):
    /// the system's trusted roots.
    #[serde(deserialize_with = "super::empty_path_is_none")]
    pub redis_tls_ca: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            durable: "sqlite://portcullis.sqlite".into(),
            ephemeral: "memory".into(),
            redis_prefix: "portcullis:".into(),
            redis_connect_timeout: Duration::from_secs(2),
            redis_response_timeout: Duration::from_secs(1),
            redis_tls_ca: None,
        }
    }
}

/// URLs may carry passwords: `Debug` (and so any `{:?}` of the config) shows them redacted.
impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("durable", &redact_url(&self.durable))
            .field("ephemeral", &redact_url(&self.ephemeral))
            .field("redis_prefix", &self.redis_prefix)
            .field("redis_connect_timeout", &self.redis_connect_timeout)
            .field("redis_response_timeout", &self.redis_response_timeout)
            .field("redis_tls_ca", &self.redis_tls_ca)
            .finish()
    }
}

impl StorageConfig {
    /// The Redis target when the ephemeral store is Redis; `None` for `memory`.
    pub fn redis_target(&self) -> Result<Option<RedisTarget>, ConfigError> {
        if self.ephemeral == "memory" {
            if self.redis_tls_ca.is_some() {
                return Err(key_err(
                    "storage.redis_tls_ca",
                    "is set, but storage.ephemeral is `memory`: it is for a rediss:// or \
                     rediss+cluster:// store",
                ));
            }
            return Ok(None);
        }
        let target = match RedisTarget::parse(&self.ephemeral) {
            Some(Ok(t)) => t,
            Some(Err(why)) => return Err(key_err("storage.ephemeral", why)),
            None => {
                return Err(key_err(
                    "storage.ephemeral",
                    "must be `memory`, a redis:// or rediss:// URL, or a redis+cluster:// or \
                     rediss+cluster:// URL",
                ))
            }
        };
        let Some(path) = &self.redis_tls_ca else {
            return Ok(Some(target));
        };
        if !target.is_tls() {
            return Err(key_err(
                "storage.redis_tls_ca",
                "needs a TLS store URL (rediss:// or rediss+cluster://)",
            ));
        }
        Ok(Some(RedisTarget::PrivateCa {
            target: Box::new(target),
            ca_pem: read_ca(("storage.redis_tls_ca", ""), path)?,
        }))
    }

    /// A copy whose URLs have their passwords redacted, for showing.
    pub fn redacted(&self) -> Self {
        Self {
            durable: redact_url(&self.durable),
            ephemeral: redact_url(&self.ephemeral),
            ..self.clone()
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.redis_target()?;
        if self.redis_prefix.is_empty() || self.redis_prefix.chars().any(char::is_whitespace) {
            return Err(key_err(
                "storage.redis_prefix",
                "must be non-empty and without spaces",
            ));
        }
        if self.redis_connect_timeout.is_zero() || self.redis_connect_timeout > MAX_WAIT {
            return Err(key_err(
                "storage.redis_connect_timeout",
                "must be between 1ms and 30s",
            ));
        }
        if self.redis_response_timeout.is_zero() || self.redis_response_timeout > MAX_WAIT {
            return Err(key_err(
                "storage.redis_response_timeout",
                "must be between 1ms and 30s",
            ));
        }
        if !(self.durable.starts_with("sqlite:")
            || self.durable.starts_with("postgres://")
            || self.durable.starts_with("postgresql://"))
        {
            return Err(key_err(
                "storage.durable",
                "must start with sqlite: or postgres://",
            ));
        }
        // Not shown: the URL may hold a password.
        if !self.durable.starts_with("sqlite:") && url::Url::parse(&self.durable).is_err() {
            return Err(key_err(
                "storage.durable",
                "is not a valid postgres:// URL (host, port and database name)",
            ));
        }
        if !self.durable.starts_with("sqlite:") && !postgres_names_database(&self.durable) {
            return Err(key_err("storage.durable", NO_DATABASE_NAMED));
        }
        let lower = self.durable.to_ascii_lowercase();
        if lower.starts_with("sqlite:")
            && (crate::store::sql::sqlite_file(&self.durable).is_none()
                || lower.contains("mode=memory")
                || lower.contains(":memory:")
                || lower.contains("vfs=memdb"))
        {
            return Err(key_err(
                "storage.durable",
                "an in-memory SQLite database would lose every user, key and audit event when the \
                 gateway stops: give a file (sqlite:///var/lib/portcullis/portcullis.sqlite)",
            ));
        }
        // Its options as the driver reads them (`sslmode`, `mode`, …), so that a value the
        // store would refuse at start is refused here, by name. The driver's message names the
        // option, never the URL.
        let options = if self.durable.starts_with("sqlite:") {
            sqlx::sqlite::SqliteConnectOptions::from_str(&self.durable).map(drop)
        } else {
            sqlx::postgres::PgConnectOptions::from_str(&self.durable).map(drop)
        };
        if let Err(e) = options {
            let why = match e {
                sqlx::Error::Configuration(why) => why.to_string(),
                _ => "has options the database driver does not accept".to_string(),
            };
            return Err(key_err("storage.durable", why));
        }
        // The driver ignores an option it does not know, with a log line at most: a misspelled
        // `sslmode` would leave the connection free to fall back to plain text.
        if !self.durable.starts_with("sqlite:") {
            if let Ok(url) = url::Url::parse(&self.durable) {
                if let Some((option, _)) = url
                    .query_pairs()
                    .find(|(o, _)| !PG_OPTIONS.contains(&o.as_ref()) && !o.starts_with("options["))
                {
                    return Err(key_err(
                        "storage.durable",
                        format!(
                            "has an option the PostgreSQL driver does not know, `{option}`, which \
                             it would ignore (a misspelled sslmode leaves the connection free to \
                             be plain text); it knows {}",
                            PG_OPTIONS.join(", ")
                        ),
                    ));
                }
            }
        }
        // The files the URL names for TLS are read when the first connection opens: a missing
        // one would show as "no such file" from a store that cannot be reached, naming nothing.
        if let Ok(url) = url::Url::parse(&self.durable) {
            for (option, value) in url.query_pairs() {
                let path = Path::new(value.as_ref());
                let named = |why: String| {
                    key_err(
                        "storage.durable",
                        format!("{option} {}: {why}", path.display()),
                    )
                };
                match option.as_ref() {
                    "sslrootcert" => drop(read_ca(("storage.durable", "sslrootcert "), path)?),
                    "sslcert" | "sslkey" => {
                        std::fs::File::open(path).map_err(|e| named(e.to_string()))?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// Reads a PEM CA bundle (the file of `key`, named in errors after `what`) and checks that it
/// holds at least one certificate.
fn read_ca((key, what): (&str, &str), path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bad = |why: String| key_err(key, format!("{what}{}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(pem)
}

/// The options of a `postgres://` URL that the driver reads (and `options[NAME]`); it ignores
/// any other.
const PG_OPTIONS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Whether a `postgres://` URL leaves the connection free to be plain text: no `sslmode` of
/// `require`, `verify-ca` or `verify-full` (the driver's default, `prefer`, falls back to plain
/// text where the server, or someone in between, declines TLS), to a host that is not this
/// machine. `None` for another URL, else the host.
pub(crate) fn postgres_maybe_plain(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return None;
    }
    let mode = parsed
        .query_pairs()
        .filter(|(o, _)| o == "sslmode" || o == "ssl-mode")
        .last()
        .map(|(_, v)| v.to_ascii_lowercase());
    if matches!(
        mode.as_deref(),
        Some("require" | "verify-ca" | "verify-full")
    ) {
        return None;
    }
    let host = parsed
        .query_pairs()
        .filter(|(o, _)| o == "host")
        .last()
        .map(|(_, v)| v.into_owned())
        .or_else(|| parsed.host_str().map(str::to_string))
        .unwrap_or_default();
    let local = host.is_empty()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!local).then_some(host)
}

/// Longer waits would hold requests (and their connections) for too long while a store is down.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Why a `postgres://` URL without a database name is refused.
pub(crate) const NO_DATABASE_NAMED: &str =
    "names no database: end the URL with it (postgres://user@host:5432/portcullis); without one \
     the server's default database for the user (often `postgres`, or one named after the user) \
     would get the gateway's tables";

/// Whether a `postgres://` URL names its database (its path, or a `dbname` option): without one
/// the driver takes the server's default for the user, or `PGDATABASE`, wherever that points.
pub(crate) fn postgres_names_database(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| {
        !u.path().trim_start_matches('/').is_empty()
            || u.query_pairs().any(|(k, v)| k == "dbname" && !v.is_empty())
    })
}
