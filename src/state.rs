//! The one shared application state, cloned into every handler. No globals: everything a
//! handler may touch is reachable from here, which keeps tests free to build their own.

use std::sync::{Arc, Mutex};

use crate::audit::Audit;
use crate::auth::flow::LoginFlow;
use crate::auth::password::PasswordHasher;
use crate::auth::webauthn::{Keys, SetupError};
use crate::clock::Clock;
use crate::config::Config;
use crate::crypto::MasterKey;
use crate::metrics::stores::Timed;
use crate::metrics::Metrics;
use crate::proxy::Upstream;
use crate::session::cache::LocalCache;
use crate::session::Sessions;
use crate::store::redis::{Channel, Notice, RedisOptions};
use crate::store::{DurableStore, EphemeralStore, StoreError, User};
use crate::token::Signer;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("signing keys: {0}")]
    Token(#[from] crate::token::TokenError),
    #[error("password hashing: {0}")]
    Password(#[from] crate::auth::password::PasswordError),
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
    #[error(transparent)]
    Webauthn(#[from] SetupError),
    #[error(transparent)]
    Geo(#[from] crate::risk::GeoError),
}

/// Shared state: one allocation behind an `Arc`, so the copy every request and every middleware
/// layer takes is one reference-count increment, not a clone of every handle and setting.
#[derive(Clone, Debug)]
pub struct AppState(Arc<AppStateInner>);

impl std::ops::Deref for AppState {
    type Target = AppStateInner;
    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// What [`AppState`] holds.
#[derive(Debug)]
pub struct AppStateInner {
    pub config: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    pub durable: Arc<dyn DurableStore>,
    pub ephemeral: Arc<dyn EphemeralStore>,
    pub master_key: Arc<MasterKey>,
    pub sessions: Sessions,
    pub login: LoginFlow,
    /// Security keys and passkeys; `None` when WebAuthn is off or cannot work at this address.
    pub keys: Option<Keys>,
    pub signer: Arc<Signer>,
    pub upstream: Arc<Upstream>,
    pub audit: Audit,
    /// Recently read user records, so the proxy path checks "disabled / sessions voided" at most
    /// once a second per user instead of on every request.
    pub user_gate: Arc<UserGate>,
    /// The mail queue to account owners.
    pub notifier: Arc<crate::notify::Notifier>,
    /// Counters and histograms served on the metrics listener.
    pub metrics: Arc<Metrics>,
    /// What every forwarded request shares (see `http::gate::forwarding_template`).
    pub forwarding: crate::proxy::Forwarding,
    /// The identity header's name, `token.header`.
    pub token_header: http::HeaderName,
    /// Scores sign-ins and sessions on the move (`[risk]`).
    pub risk: Arc<crate::risk::Risk>,
}

impl AppState {
    /// Opens the stores named in the config and assembles the state.
    pub async fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StartupError> {
        let (durable, ephemeral) = crate::store::open(&config.storage, clock.clone()).await?;
        Self::with_stores(config, clock, durable, ephemeral).await
    }

    /// Assembles the state over stores the caller opened (tests, several backends).
    pub async fn with_stores(
        config: Config,
        clock: Arc<dyn Clock>,
        durable: Arc<dyn DurableStore>,
        ephemeral: Arc<dyn EphemeralStore>,
    ) -> Result<Self, StartupError> {
        let metrics = Arc::new(Metrics::new());
        let durable: Arc<dyn DurableStore> = Arc::new(Timed::new(durable, metrics.clone()));
        let ephemeral: Arc<dyn EphemeralStore> = Arc::new(Timed::new(ephemeral, metrics.clone()));
        let master_key = Arc::new(config.master_key()?);
        crate::token::check_master_key(
            durable.as_ref(),
            &master_key,
            clock.now(),
            crate::token::Claim::Yes,
        )
        .await?;
        let signer = Arc::new(
            Signer::load(durable.clone(), master_key.clone(), &config, clock.clone()).await?,
        );
        let hasher = Arc::new(PasswordHasher::new(&config.password)?);
        let audit = Audit::start(durable.clone(), metrics.clone());
        let channel = match config.storage.redis_target()? {
            Some(target) => Some(Arc::new(Channel::new(&RedisOptions {
                target,
                prefix: config.storage.redis_prefix.clone(),
                connect_timeout: config.storage.redis_connect_timeout,
                response_timeout: config.storage.redis_response_timeout,
            })?)),
            None => None,
        };
        // The cache serves only while invalidations are known to arrive. With a shared store
        // that is once the channel is subscribed; with the memory store there is one process,
        // every change is made here and forgets its entry at once, so it serves from the start
        // (and saves decoding the record on every proxied request).
        let cache = Arc::new(LocalCache::new(
            config.session.local_cache,
            config.session.local_cache_entries,
            channel.is_none(),
        ));
        let sessions = Sessions::new(
            ephemeral.clone(),
            clock.clone(),
            config.session.clone(),
            config.is_https(),
        )
        .with_cache(cache.clone(), channel.clone());
        let user_gate = Arc::new(UserGate {
            channel: channel.clone(),
            ..UserGate::default()
        });
        if let Some(channel) = &channel {
            listen(channel, &cache, &user_gate);
        }
        let notifier = Arc::new(
            crate::notify::Notifier::new(
                &config.notify,
                &config.server.public_url,
                durable.clone(),
                clock.clone(),
            )?
            .sealing_with(master_key.clone()),
        );
        let login = LoginFlow {
            metrics: metrics.clone(),
            webauthn_policy: config.webauthn.clone(),
            notifier: notifier.clone(),
            durable: durable.clone(),
            ephemeral: ephemeral.clone(),
            hasher,
            master_key: master_key.clone(),
            clock: clock.clone(),
            limits: config.limits.clone(),
            audit: audit.clone(),
            totp_issuer: config
                .server
                .public_url
                .host_str()
                .unwrap_or("Portcullis")
                .to_string(),
        };
        let keys = match Keys::new(&config, login.clone()) {
            Ok(k) => Some(k),
            Err(e @ SetupError::Disabled) => {
                tracing::info!("{e}");
                None
            }
            Err(e @ SetupError::NoDomain) => {
                tracing::warn!("{e}");
                None
            }
            Err(e) => return Err(e.into()),
        };
        // Reading a GeoIP database whole takes a moment: not on a runtime worker thread.
        let (risk_config, d, e) = (config.risk.clone(), durable.clone(), ephemeral.clone());
        let risk = tokio::task::spawn_blocking(move || crate::risk::Risk::new(risk_config, d, e))
            .await
            .map_err(|e| {
                StartupError::Geo(crate::risk::GeoError {
                    path: config.risk.geoip_database.clone().unwrap_or_default(),
                    message: e.to_string(),
                })
            })??;
        let risk = Arc::new(risk);
        Ok(Self(Arc::new(AppStateInner {
            risk,
            forwarding: crate::http::gate::forwarding_template(&config)?,
            token_header: crate::http::gate::token_header_name(&config)?,
            metrics,
            keys,
            notifier,
            upstream: Arc::new(
                Upstream::new(&config.upstream)
                    .with_body_timeout(config.server.body_timeout)
                    .with_public_origin(&config.server.public_url.origin().ascii_serialization()),
            ),
            user_gate,
            config: Arc::new(config),
            clock,
            durable,
            ephemeral,
            master_key,
            sessions,
            login,
            signer,
            audit,
        })))
    }
}

/// Feeds the invalidation channel's notices to the session cache and the user gate, for as
/// long as the state exists.
fn listen(channel: &Arc<Channel>, cache: &Arc<LocalCache>, gate: &Arc<UserGate>) {
    let cache = Arc::downgrade(cache);
    let gate = Arc::downgrade(gate);
    channel.subscribe(move |notice| {
        let (Some(cache), Some(gate)) = (cache.upgrade(), gate.upgrade()) else {
            return false;
        };
        match notice {
            Notice::Up => cache.set_live(true),
            Notice::Down => cache.set_live(false),
            Notice::Message(m) => {
                if let Some(user) = cache.apply(m) {
                    gate.drop_local(&user);
                }
            }
            Notice::Idle => {}
        }
        true
    });
}

/// A per-user cache of the account record with a one-second lifetime.
#[derive(Debug, Default)]
pub struct UserGate {
    cache: Mutex<crate::CacheMap<(i64, Option<Arc<User>>)>>,
    /// Where [`UserGate::forget`] tells the other gateways (Redis only).
    channel: Option<Arc<Channel>>,
}

/// How long a cached user record is trusted.
const GATE_TTL_MS: i64 = 1000;
/// Entries kept before stale ones are pruned.
const GATE_MAX: usize = 100_000;

impl UserGate {
    /// The user if it exists, is enabled and has not voided sessions authenticated at `auth_ms`;
    /// shared with the cache (every proxied request asks, and a copy of the record would be
    /// made and dropped each time).
    pub async fn admit(
        &self,
        state: &AppState,
        user_id: &str,
        auth_ms: i64,
    ) -> Result<Option<Arc<User>>, StoreError> {
        let now = state.clock.now_millis();
        let cached = self.cache.lock().ok().and_then(|c| {
            c.get(user_id)
                .filter(|(at, _)| now - *at < GATE_TTL_MS && *at <= now)
                .map(|(_, u)| u.clone())
        });
        let user = match cached {
            Some(u) => u,
            None => {
                let u = state.durable.user_by_id(user_id).await?.map(Arc::new);
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() >= GATE_MAX {
                        c.retain(|_, (at, _)| now - *at < GATE_TTL_MS);
                    }
                    c.insert(user_id.to_string(), (now, u.clone()));
                }
                u
            }
        };
        Ok(user.filter(|u| !u.disabled && auth_ms > u.sessions_valid_after_ms))
    }

    /// Drops a cached record so the next request reads the store (after a local change), here
    /// at once and on the other gateways as soon as the channel delivers (their copies are at
    /// most a second old in any case).
    pub fn forget(&self, user_id: &str) {
        self.drop_local(user_id);
        if let (Some(channel), Ok(rt)) = (&self.channel, tokio::runtime::Handle::try_current()) {
            let channel = channel.clone();
            let message = crate::session::cache::user_message(user_id);
            rt.spawn(async move {
                if let Err(e) = channel.publish(&message).await {
                    tracing::warn!(error = %e, "could not announce a user change to the other gateways");
                }
            });
        }
    }

    /// Drops a cached record on this gateway only.
    fn drop_local(&self, user_id: &str) {
        if let Ok(mut c) = self.cache.lock() {
            c.remove(user_id);
        }
    }
}
