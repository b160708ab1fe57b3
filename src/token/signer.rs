//! The [`Signer`]: the in-memory key ring plus a bounded per-session token cache, so the
//! request path normally costs one map lookup and signs only when a token nears its expiry.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use http::HeaderValue;
use jsonwebtoken::Header;

use super::keys::{KeyRing, LoadedKey};
use super::{Claims, Identity, OwnedIdentity, TokenError};
use crate::clock::{Clock, UnixTime};
use crate::config::{Config, MAX_TOKEN_TTL};
use crate::crypto::{random_token, MasterKey};
use crate::store::DurableStore;

/// Cached tokens kept before expired ones are pruned; beyond it (all live) the cache is
/// emptied, since every entry can be re-minted. Bounds memory whatever the session count.
const CACHE_CAP: usize = 50_000;

/// A minted token and what it was minted for.
struct Cached {
    identity: OwnedIdentity,
    kid: String,
    /// As the identity header sends it (marked sensitive), so the request path neither copies
    /// nor re-validates it.
    token: HeaderValue,
    iat: UnixTime,
    exp: UnixTime,
}

/// Mints identity tokens for sessions and serves the JWKS.
pub struct Signer {
    durable: Arc<dyn DurableStore>,
    master_key: Arc<MasterKey>,
    clock: Arc<dyn Clock>,
    issuer: String,
    audience: String,
    /// `token.algorithm` of this gateway's configuration (the keys' own algorithm signs).
    algorithm: crate::config::TokenAlgorithm,
    /// Token lifetime in seconds.
    ttl: i64,
    /// Swapped whole on refresh; readers clone the `Arc` and never wait on the store.
    ring: RwLock<Arc<KeyRing>>,
    /// Session key → token; see [`CACHE_CAP`].
    cache: Mutex<crate::CacheMap<Cached>>,
    cache_cap: usize,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("current_kid", &self.current_kid())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the live keys from the store; if none may sign, generates one of
    /// `config.token.algorithm` and stores it (PKCS#8 DER sealed with the master key under
    /// `signing-key:<kid>`). Fails if a stored key cannot be opened (e.g. wrong master key).
    pub async fn load(
        durable: Arc<dyn DurableStore>,
        master_key: Arc<MasterKey>,
        config: &Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, TokenError> {
        let now = clock.now();
        let mut records = durable.live_signing_keys(now).await?;
        if !records.iter().any(|r| r.retire_at.is_none()) {
            let record = super::keys::new_record(config.token.algorithm, &master_key, now)?;
            let (kid, alg) = (record.kid.clone(), record.alg.clone());
            // Only the first of several gateways starting together stores its key; the others
            // read and use that one, so every gateway signs with and publishes the same key.
            if durable.insert_first_signing_key(record).await? {
                tracing::info!(%kid, %alg, "generated a signing key");
                // On the record like every later rotation: the key the backends first trust.
                let ev = crate::store::AuditEvent::new("signing_key_created", "success", now)
                    .reason(&format!("kid:{kid} alg:{alg}"));
                if let Err(e) = durable.append_audit(&[ev]).await {
                    tracing::warn!(error = %e, "could not write the new signing key to the audit trail");
                }
            }
            records = durable.live_signing_keys(now).await?;
        }
        let ttl = i64::try_from(config.token.ttl.min(MAX_TOKEN_TTL).as_secs().max(1)).unwrap_or(1);
        let ring = KeyRing::build(&records, &master_key, None, now, ttl)?;
        if ring.current.public.alg != config.token.algorithm.as_str() {
            tracing::warn!(
                kid = %ring.current.kid,
                current = %ring.current.public.alg,
                configured = config.token.algorithm.as_str(),
                "the current signing key differs from token.algorithm; rotate keys to switch"
            );
        }
        Ok(Self {
            durable,
            master_key,
            clock,
            issuer: config.issuer(),
            algorithm: config.token.algorithm,
            audience: config.token.audience.clone(),
            ttl,
            ring: RwLock::new(Arc::new(ring)),
            cache: Mutex::new(crate::CacheMap::default()),
            cache_cap: CACHE_CAP,
        })
    }

    /// Re-reads keys from the store, so a rotation done elsewhere (another gateway, the CLI)
    /// is picked up and keys past their overlap leave the JWKS. On any failure the old key
    /// ring stays in use and the error is returned.
    pub async fn refresh(&self) -> Result<(), TokenError> {
        let now = self.clock.now();
        let records = self.durable.live_signing_keys(now).await?;
        let old = self.ring();
        let ring = KeyRing::build(&records, &self.master_key, Some(&old), now, self.ttl)?;
        if ring.current.kid != old.current.kid {
            let alg = &ring.current.public.alg;
            tracing::info!(from = %old.current.kid, to = %ring.current.kid, %alg, "current signing key changed");
            if *alg != old.current.public.alg || alg != self.algorithm.as_str() {
                tracing::warn!(
                    from = %old.current.public.alg,
                    to = %alg,
                    configured = self.algorithm.as_str(),
                    "the gateways now sign with another algorithm (a rotation switched it); \
                     backends that pin the old one refuse every token"
                );
            }
        }
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        self.lock_cache().retain(|_, c| c.exp > now);
        Ok(())
    }

    /// The JWKS document `{"keys":[...]}`: public parts of every live key, current first.
    pub fn jwks_json(&self) -> Bytes {
        self.ring().jwks.clone()
    }

    /// The token for this session: reused while at least a quarter of its lifetime remains,
    /// the current key is the one that signed it and the identity is unchanged; otherwise a
    /// fresh one is minted and cached.
    pub fn token_for(
        &self,
        session_key: &str,
        identity: &Identity<'_>,
    ) -> Result<HeaderValue, TokenError> {
        let now = self.clock.now();
        let ring = self.ring();
        let current = &ring.current;
        if let Some(c) = self.lock_cache().get(session_key) {
            let fresh = c.kid == current.kid
                && now >= c.iat
                && c.exp.saturating_sub(now).saturating_mul(4) >= self.ttl
                && c.identity.view() == *identity;
            if fresh {
                return Ok(c.token.clone());
            }
        }
        // Signed without holding the lock; a concurrent duplicate mint is harmless.
        let (token, exp) = self.mint(current, identity, now)?;
        let mut cache = self.lock_cache();
        if cache.len() >= self.cache_cap && !cache.contains_key(session_key) {
            cache.retain(|_, c| c.exp > now);
            if cache.len() >= self.cache_cap {
                tracing::warn!(
                    cap = self.cache_cap,
                    "token cache full of live tokens; emptied"
                );
                cache.clear();
            }
        }
        cache.insert(
            session_key.to_string(),
            Cached {
                identity: OwnedIdentity::of(identity),
                kid: current.kid.clone(),
                token: token.clone(),
                iat: now,
                exp,
            },
        );
        Ok(token)
    }

    /// Drops the cached token of a session (logout).
    pub fn forget(&self, session_key: &str) {
        self.lock_cache().remove(session_key);
    }

    /// The kid of the key that signs now.
    pub fn current_kid(&self) -> String {
        self.ring().current.kid.clone()
    }

    fn ring(&self) -> Arc<KeyRing> {
        Arc::clone(&self.ring.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The cache holds no invariant a panicking holder could break, so poisoning is ignored.
    fn lock_cache(&self) -> MutexGuard<'_, crate::CacheMap<Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mint(
        &self,
        key: &LoadedKey,
        identity: &Identity<'_>,
        now: UnixTime,
    ) -> Result<(HeaderValue, UnixTime), TokenError> {
        let exp = now.saturating_add(self.ttl);
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: identity.sub.to_string(),
            email: identity.email.to_string(),
            account: identity.account.to_string(),
            amr: identity.amr.to_vec(),
            acr: identity.acr.to_string(),
            auth_time: identity.auth_time,
            factor_time: identity.factor_time,
            sid: identity.sid.to_string(),
            iat: now,
            nbf: now,
            exp,
            jti: random_token(16),
        };
        let mut header = Header::new(key.alg);
        header.kid = Some(key.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|e| TokenError::Crypto(format!("signing with {} failed: {e}", key.kid)))?;
        // A compact JWS is base64url and dots: always a valid header value.
        let mut token = HeaderValue::from_maybe_shared(Bytes::from(token))
            .map_err(|_| TokenError::Crypto("a signed token is not a header value".into()))?;
        token.set_sensitive(true);
        Ok((token, exp))
    }

    #[cfg(test)]
    pub(super) fn set_cache_cap(&mut self, cap: usize) {
        self.cache_cap = cap;
    }

    #[cfg(test)]
    pub(super) fn cached_count(&self) -> usize {
        self.lock_cache().len()
    }

    #[cfg(test)]
    pub(super) fn current_encoding_key(&self) -> jsonwebtoken::EncodingKey {
        self.ring().current.encoding.clone()
    }
}
