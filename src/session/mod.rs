//! Server-side sessions. The browser holds only a 256-bit random id in a cookie; the store holds
//! the record under the id's SHA-256, so a store dump reveals no usable cookie. A session moves
//! through stages (password verified → second factor / enrolment → authenticated) and gets a
//! new id at every step up in privilege, which makes fixation impossible.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::config::SessionConfig;
use crate::crypto::{random_token, sha256_hex};
use crate::store::redis::Channel;
use crate::store::{EphemeralStore, StoreError, StoreResult};

pub mod cache;
use cache::LocalCache;

/// Cookie name on HTTPS deployments: `__Host-` pins it to this origin, path `/`, Secure.
pub const COOKIE_HTTPS: &str = "__Host-portcullis-session";
/// Cookie name on the plain-HTTP loopback demo, where browsers refuse `__Host-` cookies.
pub const COOKIE_HTTP: &str = "portcullis-session";
/// Length of a cookie value: 32 random bytes, base64url.
const ID_LEN: usize = 43;

/// Where a session stands in the sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Password verified; waiting for a second factor.
    SecondFactor,
    /// Password verified, no second factor yet: must enrol TOTP. The secret being enrolled is
    /// sealed with the master key.
    /// `key_only` (an enrolment link for an admin account): only a security key may be
    /// registered, the authenticator app is not offered.
    EnrolTotp {
        sealed_secret: Vec<u8>,
        #[serde(default)]
        key_only: bool,
        /// The account had no second factor when this setup began: it completes only while
        /// that holds (another sign-in that set one up meanwhile wins, and this one is told).
        #[serde(default)]
        first: bool,
    },
    /// Enrolment confirmed; the recovery codes are shown once, then the session is complete.
    /// The codes are sealed with the master key (one per line), so a shared ephemeral store
    /// (Redis) never holds them in clear.
    ShowRecoveryCodes { sealed_codes: Vec<u8> },
    /// Password verified on a remembered device: waiting for the proof of that device's key,
    /// which stands in for the second factor (or for the second factor, if the user prefers).
    DeviceProof,
    /// Password and second factor done: may reach the console.
    Authenticated,
}

/// A server-side session record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub user_id: String,
    pub stage: Stage,
    /// Public, non-secret identifier (the JWT `sid`); stays the same across id rotation.
    pub public_id: String,
    /// Authentication methods completed (`pwd`, `otp`, …), for the JWT `amr`.
    pub amr: Vec<String>,
    /// When the session was created (ms).
    pub created_ms: i64,
    /// When the last authentication step completed (ms); compared with the user's
    /// `sessions_valid_after_ms`.
    pub auth_ms: i64,
    /// Last use (ms), refreshed at most once a minute.
    pub last_seen_ms: i64,
    pub ip: String,
    pub user_agent: String,
    /// Where to go after sign-in (already validated as a same-origin path).
    pub return_to: Option<String>,
    /// Wrong second-factor codes in this sign-in.
    pub failed_codes: u32,
    /// The device key this complete session is bound to, once the browser registered one
    /// (`binding`); the gate then forwards it only with a fresh bound cookie from that key.
    #[serde(default)]
    pub binding: Option<crate::binding::BoundKey>,
    /// The device (`devices.id`) this complete session was signed in from; revoking the device
    /// ends the session.
    #[serde(default)]
    pub device_id: Option<String>,
    /// The sign-in recorded `device_id` as a new device: this browser is the one its device key
    /// is first taken from.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_device: bool,
    /// When the user last proved themselves with a security key or passkey (ms): the
    /// phishing-resistant proof that admin changes (sudo mode) ask for.
    #[serde(default)]
    pub strong_ms: Option<i64>,
    /// The user asked at this sign-in to have this device remembered; acted on when the
    /// session binds to a device key.
    #[serde(default)]
    pub remember_device: bool,
    /// A sign-in for an address with no account that asks for the second factor first, as an
    /// account under a guessing campaign does (see `auth::flow`): it looks the same to the
    /// guesser and can never complete.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub decoy: bool,
    /// A pending sign-in's known device: the user's own device (`devices.id`) whose cookie came
    /// with the password. Its wrong codes draw on a budget of the device's own, so a stranger who
    /// has the password cannot spend the account's and lock the owner out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_device: Option<String>,
    /// When the user last proved a second factor (ms): the sign-in's, unless a remembered
    /// device's key stood in for it (`swk`), or a step-up's. Freshness rules (factor changes on
    /// the account page, `[[step_up]]`) ask for this, not for the last sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor_ms: Option<i64>,
    /// This sign-in scored high risk (`risk`) and the account has a security key: only the key
    /// completes it, codes are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub risk_key: bool,
    /// Where and when this complete session's device was last proven (`risk`), when the GeoIP
    /// database knew the place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<crate::risk::Fix>,
    /// When the session's device key proved itself from a place it could not have travelled to
    /// since its last proof (ms): the gate holds the session until a second factor newer than
    /// this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_hold_ms: Option<i64>,
    /// The hold is lifted only by a security key (the account has one, and a high-risk sign-in
    /// of it would need it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub risk_hold_key: bool,
    /// How long this pending sign-in may take (ms) when longer than `session.login_timeout`: an
    /// enrolment begun from an enrolment link, which may wait while the user installs an app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_ms: Option<i64>,
    /// Where the session's device key last proved itself: the [`crate::binding::device_context`]
    /// (keyed network and browser, hex) of that proof. A form sent after the bound cookie ran
    /// out is held for the next proof only from there (a copied session cookie used elsewhere
    /// gets nothing held, so it cannot push the owner's held forms out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_context: Option<String>,
}

impl Session {
    /// A fresh record for a user whose password was just verified.
    pub fn after_password(
        user_id: &str,
        stage: Stage,
        now_ms: i64,
        ip: &str,
        ua: &str,
        return_to: Option<String>,
    ) -> Self {
        Self {
            user_id: user_id.to_string(),
            stage,
            public_id: uuid::Uuid::new_v4().to_string(),
            amr: vec!["pwd".into()],
            created_ms: now_ms,
            auth_ms: now_ms,
            last_seen_ms: now_ms,
            ip: ip.to_string(),
            user_agent: ua.chars().take(512).collect(),
            return_to,
            failed_codes: 0,
            binding: None,
            device_id: None,
            new_device: false,
            strong_ms: None,
            remember_device: false,
            decoy: false,
            known_device: None,
            factor_ms: None,
            risk_key: false,
            fix: None,
            risk_hold_ms: None,
            risk_hold_key: false,
            pending_ms: None,
            proof_context: None,
        }
    }

    /// When the user last proved a second factor ([`Session::factor_ms`]); for a session
    /// recorded before that field, its last sign-in unless a remembered device signed it in.
    pub fn second_factor_ms(&self) -> Option<i64> {
        self.factor_ms
            .or_else(|| (!self.amr.iter().any(|m| m == "swk")).then_some(self.auth_ms))
    }

    /// The user's own device whose budget this session's second-factor attempts draw on: the
    /// device a complete session was signed in from, or a pending sign-in's known device.
    pub fn own_device(&self) -> Option<&str> {
        self.device_id.as_deref().or(self.known_device.as_deref())
    }

    /// Whether the session is held by [`Session::risk_hold_ms`]: no second factor (a key, with
    /// [`Session::risk_hold_key`]) proven since.
    pub fn held(&self) -> bool {
        self.risk_hold_ms.is_some_and(|h| {
            let proof = if self.risk_hold_key {
                self.strong_ms
            } else {
                self.second_factor_ms()
            };
            proof.is_none_or(|f| f < h)
        })
    }

    pub fn is_authenticated(&self) -> bool {
        self.stage == Stage::Authenticated
    }
}

/// A session loaded from a cookie, with the key it is stored under.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// SHA-256 of the cookie value: the storage key, safe to log and to use as a cache key.
    pub key: String,
    pub session: Session,
}

/// A session as the gate reads it on every proxied request: shared with this gateway's local
/// cache rather than copied out of it.
#[derive(Debug, Clone)]
pub struct Cached {
    /// SHA-256 of the cookie value, as in [`Loaded`].
    pub key: String,
    pub session: Arc<Session>,
}

impl Loaded {
    /// The storage key and the record, for code that serves both kinds of loaded session.
    pub fn record(&self) -> (&str, &Session) {
        (&self.key, &self.session)
    }
}

impl Cached {
    /// The storage key and the record, as [`Loaded::record`].
    pub fn record(&self) -> (&str, &Session) {
        (&self.key, &self.session)
    }
}

/// Why a cookie did not yield a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Missing,
    Malformed,
    Unknown,
    Expired,
}

/// Session persistence and timeouts.
#[derive(Debug, Clone)]
pub struct Sessions {
    store: Arc<dyn EphemeralStore>,
    clock: Arc<dyn Clock>,
    config: SessionConfig,
    cookie_name: &'static str,
    secure: bool,
    /// Records the gate read recently (off until [`Sessions::with_cache`]).
    cache: Arc<LocalCache>,
    /// Where changes are announced to the other gateways (Redis only).
    channel: Option<Arc<Channel>>,
}

/// Whether a record is due for its once-a-minute `last_seen` refresh.
fn touch_due(s: &Session, now_ms: i64) -> bool {
    now_ms - s.last_seen_ms >= 60_000
}

fn record_key(hash: &str) -> String {
    format!("session:{hash}")
}

/// How many entries a user's session index gathers between two prunings of the entries whose
/// sessions ran out on their own.
const PRUNE_EVERY: u64 = 32;

/// Word of why a session was ended, kept for the browser that held it (see [`Ended`]).
fn ended_key(hash: &str) -> String {
    format!("ended:{hash}")
}

/// How long the word of why a session was ended is kept: the cookie that names it lives until
/// its browser closes, most often within a day.
const ENDED_NOTE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why a session was ended by someone other than its holder, said to the browser that held it at
/// its next request (as the sign-in page's notice): otherwise it would read as idle or timed
/// out, and the owner would not learn that another browser, or an administrator, ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The account's owner, from another browser (its account page: a device signed out,
    /// every other one, a password change).
    ByOwner,
    /// An administrator (the admin console).
    ByAdmin,
}

impl Ended {
    /// The sign-in page's notice code.
    pub fn notice(self) -> &'static str {
        match self {
            Ended::ByOwner => "signed_out_elsewhere",
            Ended::ByAdmin => "ended_by_admin",
        }
    }

    /// The sign-in page's notice for a session that ended, by `by` where word was left.
    pub fn notice_of(by: Option<Self>) -> &'static str {
        by.map_or("session_ended", Self::notice)
    }

    fn of(code: &[u8]) -> Option<Self> {
        [Ended::ByOwner, Ended::ByAdmin]
            .into_iter()
            .find(|e| e.notice().as_bytes() == code)
    }
}

fn user_index_key(user_id: &str) -> String {
    format!("user_sessions:{{{user_id}}}")
}

impl Sessions {
    pub fn new(
        store: Arc<dyn EphemeralStore>,
        clock: Arc<dyn Clock>,
        config: SessionConfig,
        https: bool,
    ) -> Self {
        Self {
            store,
            clock,
            config,
            cookie_name: if https { COOKIE_HTTPS } else { COOKIE_HTTP },
            secure: https,
            cache: Arc::new(LocalCache::new(Duration::ZERO, 0, true)),
            channel: None,
        }
    }

    /// Serves the gate from `cache` and announces every change on `channel`.
    pub fn with_cache(mut self, cache: Arc<LocalCache>, channel: Option<Arc<Channel>>) -> Self {
        self.cache = cache;
        self.channel = channel;
        self
    }

    /// The gate's cache (the invalidation listener feeds it).
    pub fn cache(&self) -> &Arc<LocalCache> {
        &self.cache
    }

    /// Tells the other gateways to drop what they cached. A failure is logged, not returned:
    /// the change itself is made, and their copies are at most `session.local_cache` old.
    pub(crate) async fn announce(&self, message: &str) {
        if let Some(c) = &self.channel {
            if let Err(e) = c.publish(message).await {
                tracing::warn!(error = %e, "could not announce a session change to the other gateways");
            }
        }
    }

    pub fn cookie_name(&self) -> &'static str {
        self.cookie_name
    }

    /// Time the store keeps a record of this stage.
    fn ttl(&self, s: &Session) -> Duration {
        if s.is_authenticated() {
            self.config.idle_timeout.min(self.config.absolute_timeout)
        } else {
            self.pending_limit(s)
        }
    }

    /// How long a pending sign-in may take: `session.login_timeout`, or the record's own longer
    /// limit.
    fn pending_limit(&self, s: &Session) -> Duration {
        // Only while the app is being set up: shown recovery codes, or any later step, wait no
        // longer than a sign-in does.
        if !matches!(s.stage, Stage::EnrolTotp { .. }) {
            return self.config.login_timeout;
        }
        let own = s
            .pending_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis);
        own.map_or(self.config.login_timeout, |own| {
            own.max(self.config.login_timeout)
        })
    }

    /// Checks the timeouts of a record at `now_ms`.
    fn expired(&self, s: &Session, now_ms: i64) -> bool {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if s.is_authenticated() {
            now_ms - s.last_seen_ms >= ms(self.config.idle_timeout)
                || now_ms - s.created_ms >= ms(self.config.absolute_timeout)
        } else {
            now_ms - s.created_ms >= ms(self.pending_limit(s))
        }
    }

    /// Stores a new session under a fresh id; returns the cookie value and the storage key.
    pub async fn create(&self, s: &Session) -> StoreResult<(String, String)> {
        let id = random_token(32);
        let key = sha256_hex(id.as_bytes());
        let body = serde_json::to_vec(s).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if !self
            .store
            .put_if_absent(&record_key(&key), &body, self.ttl(s))
            .await?
        {
            return Err(StoreError::Conflict("session id collision".into()));
        }
        // Only complete sessions are indexed (a sign-in under way is voided with the others by
        // the user's `sessions_valid_after_ms`): pending ones are anyone's to make once the
        // second factor comes first, and would grow the user's index without bound.
        if s.is_authenticated() {
            let held = self
                .store
                .set_add(
                    &user_index_key(&s.user_id),
                    &key,
                    self.config.absolute_timeout,
                )
                .await?;
            // Entries of sessions that ran out on their own stay until looked at: every
            // [`PRUNE_EVERY`] entries the index is looked at, and theirs dropped.
            if held >= PRUNE_EVERY && held % PRUNE_EVERY == 0 {
                self.prune_index(&s.user_id).await?;
            }
        }
        Ok((id, key))
    }

    /// Drops the user's index entries whose session record has gone.
    async fn prune_index(&self, user_id: &str) -> StoreResult<()> {
        let index = user_index_key(user_id);
        for k in self.store.set_members(&index).await? {
            if self.store.get(&record_key(&k)).await?.is_none() {
                self.store.set_remove(&index, &k).await?;
            }
        }
        Ok(())
    }

    /// The storage key a cookie value names, if it is well-formed.
    fn storage_key(cookie_value: Option<&str>) -> Result<String, Invalid> {
        let Some(v) = cookie_value else {
            return Err(Invalid::Missing);
        };
        if v.len() != ID_LEN
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Invalid::Malformed);
        }
        Ok(sha256_hex(v.as_bytes()))
    }

    /// Loads the session a cookie value names from the store, enforcing timeouts. Everything
    /// that changes a session starts here, never from the gate's cache.
    pub async fn load(&self, cookie_value: Option<&str>) -> StoreResult<Result<Loaded, Invalid>> {
        match Self::storage_key(cookie_value) {
            Ok(key) => self.fetch(key).await,
            Err(why) => Ok(Err(why)),
        }
    }

    /// The gate's load: a record read from the store within `session.local_cache` is used
    /// without a store call; otherwise one read (which then fills the cache). Timeouts are
    /// checked on every use, and a record due for its idle bookkeeping ([`Sessions::touch`])
    /// is read afresh, so the write never starts from a copy.
    pub async fn load_cached(
        &self,
        cookie_value: Option<&str>,
    ) -> StoreResult<Result<Cached, Invalid>> {
        match Self::storage_key(cookie_value) {
            Ok(key) => self.load_cached_key(key).await,
            Err(why) => Ok(Err(why)),
        }
    }

    /// [`Sessions::load_cached`] by storage key: for checking again, later, a session already
    /// found (an open WebSocket tunnel's).
    pub async fn load_cached_key(&self, key: String) -> StoreResult<Result<Cached, Invalid>> {
        let now = self.clock.now_millis();
        if let Some(session) = self.cache.get(&key) {
            if !self.expired(&session, now) && !touch_due(&session, now) {
                return Ok(Ok(Cached { key, session }));
            }
        }
        let ticket = self.cache.ticket();
        Ok(self.fetch(key).await?.map(|Loaded { key, session }| {
            let session = Arc::new(session);
            self.cache.insert(&key, Arc::clone(&session), ticket);
            Cached { key, session }
        }))
    }

    /// Reads one record.
    async fn fetch(&self, key: String) -> StoreResult<Result<Loaded, Invalid>> {
        let Some(body) = self.store.get(&record_key(&key)).await? else {
            return Ok(Err(Invalid::Unknown));
        };
        let session: Session =
            serde_json::from_slice(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if self.expired(&session, self.clock.now_millis()) {
            self.destroy(&key, &session.user_id).await?;
            return Ok(Err(Invalid::Expired));
        }
        Ok(Ok(Loaded { key, session }))
    }

    /// Writes a changed record back under the same id; every gateway drops its copy.
    pub async fn save(&self, key: &str, s: &Session) -> StoreResult<()> {
        self.write(key, s).await?;
        self.announce(&cache::session_message(key)).await;
        Ok(())
    }

    /// [`Sessions::save`] for a record that may have ended meanwhile (on another gateway): the
    /// write only replaces an existing record, so it never brings an ended session back. False
    /// when it had ended.
    pub async fn update(&self, key: &str, s: &Session) -> StoreResult<bool> {
        let body = serde_json::to_vec(s).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.cache.forget(key);
        let stored = self
            .store
            .put_if_present(&record_key(key), &body, self.ttl(s))
            .await;
        self.cache.forget(key);
        self.announce(&cache::session_message(key)).await;
        stored
    }

    /// Writes a record and drops this gateway's copy.
    async fn write(&self, key: &str, s: &Session) -> StoreResult<()> {
        let body = serde_json::to_vec(s).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.cache.forget(key);
        let r = self.store.put(&record_key(key), &body, self.ttl(s)).await;
        self.cache.forget(key);
        r
    }

    /// Refreshes `last_seen` when it is more than a minute old (idle timeout bookkeeping
    /// without a store write on every request). False when the session has gone meanwhile
    /// (ended on another gateway between the read and this write): the write only replaces an
    /// existing record, so it can never bring an ended session back.
    ///
    /// The write is a compare-and-set against the record as it was read (afresh, once due for
    /// its touch): what a device proof, a risk hold or a failure count wrote since, while this
    /// request was being checked, is not put back. Then the record is read again and touched as
    /// it is now (`loaded` becomes it: the caller checks it again).
    pub async fn touch(&self, loaded: &mut Cached) -> StoreResult<bool> {
        let now = self.clock.now_millis();
        if !touch_due(&loaded.session, now) {
            return Ok(true);
        }
        let key = record_key(&loaded.key);
        let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
        // As stored, if nothing changed since it was read (records are written as serialised
        // here, so the bytes come out the same).
        let read = serde_json::to_vec(&loaded.session).map_err(corrupt)?;
        // A copy of its own (the cache may hold this record): once a minute, not per request.
        Arc::make_mut(&mut loaded.session).last_seen_ms = now;
        let body = serde_json::to_vec(&loaded.session).map_err(corrupt)?;
        self.cache.forget(&loaded.key);
        let ttl = self.ttl(&loaded.session);
        let stored = self.store.put_if_unchanged(&key, &read, &body, ttl).await;
        self.cache.forget(&loaded.key);
        if stored? {
            return Ok(true);
        }
        // Changed since (or gone): touched as it is now, once; a lost race leaves it for the
        // next request.
        let Some(now_stored) = self.store.get(&key).await? else {
            return Ok(false);
        };
        let mut current: Session = serde_json::from_slice(&now_stored).map_err(corrupt)?;
        current.last_seen_ms = now;
        let body = serde_json::to_vec(&current).map_err(corrupt)?;
        let ttl = self.ttl(&current);
        let touched = self
            .store
            .put_if_unchanged(&key, &now_stored, &body, ttl)
            .await?;
        self.cache.forget(&loaded.key);
        // Lost again: still there, or ended in between.
        if !touched && self.store.get(&key).await?.is_none() {
            return Ok(false);
        }
        loaded.session = Arc::new(current);
        Ok(true)
    }

    /// Moves a record to a brand-new id (privilege change) and deletes the old one.
    pub async fn rotate(&self, old_key: &str, s: &Session) -> StoreResult<(String, String)> {
        let created = self.create(s).await?;
        self.destroy(old_key, &s.user_id).await?;
        Ok(created)
    }

    /// Ends one session, on every gateway.
    pub async fn destroy(&self, key: &str, user_id: &str) -> StoreResult<()> {
        self.cache.forget(key);
        self.store.delete(&record_key(key)).await?;
        self.cache.forget(key);
        self.announce(&cache::session_message(key)).await;
        self.store.set_remove(&user_index_key(user_id), key).await
    }

    /// [`Sessions::destroy`], leaving word of `why` for the browser that held the session.
    pub async fn destroy_because(&self, key: &str, user_id: &str, why: Ended) -> StoreResult<()> {
        self.leave_word(key, why).await?;
        self.destroy(key, user_id).await
    }

    async fn leave_word(&self, key: &str, why: Ended) -> StoreResult<()> {
        let note = why.notice().as_bytes();
        self.store.put(&ended_key(key), note, ENDED_NOTE_TTL).await
    }

    /// Why the session a cookie names was ended by someone else, if word of it was left.
    pub async fn ended_by_whom(&self, cookie_value: Option<&str>) -> StoreResult<Option<Ended>> {
        let Ok(key) = Self::storage_key(cookie_value) else {
            return Ok(None);
        };
        Ok(self
            .store
            .get(&ended_key(&key))
            .await?
            .and_then(|b| Ended::of(&b)))
    }

    /// Ends every session of a user known to this store, on every gateway.
    pub async fn destroy_all(&self, user_id: &str) -> StoreResult<usize> {
        self.destroy_all_leaving(user_id, None).await
    }

    /// [`Sessions::destroy_all`], leaving word of `why` for each browser that held one.
    pub async fn destroy_all_because(&self, user_id: &str, why: Ended) -> StoreResult<usize> {
        self.destroy_all_leaving(user_id, Some(why)).await
    }

    async fn destroy_all_leaving(&self, user_id: &str, why: Option<Ended>) -> StoreResult<usize> {
        self.cache.forget_user(user_id);
        let keys = self.store.set_members(&user_index_key(user_id)).await?;
        for k in &keys {
            if let Some(why) = why {
                self.leave_word(k, why).await?;
            }
            self.store.delete(&record_key(k)).await?;
        }
        self.store.delete(&user_index_key(user_id)).await?;
        self.cache.forget_user(user_id);
        self.announce(&cache::user_message(user_id)).await;
        Ok(keys.len())
    }

    /// The live sessions of a user (storage key and record), oldest first; index entries whose
    /// record has gone are dropped.
    pub async fn list_user(&self, user_id: &str) -> StoreResult<Vec<Loaded>> {
        let keys = self.store.set_members(&user_index_key(user_id)).await?;
        let now = self.clock.now_millis();
        let mut out = Vec::new();
        for k in keys {
            let Some(body) = self.store.get(&record_key(&k)).await? else {
                self.store.set_remove(&user_index_key(user_id), &k).await?;
                continue;
            };
            let session: Session =
                serde_json::from_slice(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if !self.expired(&session, now) {
                out.push(Loaded { key: k, session });
            }
        }
        out.sort_by_key(|l| l.session.created_ms);
        Ok(out)
    }

    /// Ends every session of `user_id` that was signed in from `device_id`, leaving word of
    /// `why`; returns how many.
    pub async fn destroy_device(
        &self,
        user_id: &str,
        device_id: &str,
        why: Ended,
    ) -> StoreResult<usize> {
        let keys = self.store.set_members(&user_index_key(user_id)).await?;
        let mut ended = 0;
        for k in &keys {
            let Some(body) = self.store.get(&record_key(k)).await? else {
                self.store.set_remove(&user_index_key(user_id), k).await?;
                continue;
            };
            let s: Session =
                serde_json::from_slice(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if s.device_id.as_deref() == Some(device_id) {
                self.destroy_because(k, user_id, why).await?;
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// `Set-Cookie` value that installs a session id.
    pub fn set_cookie(&self, id: &str) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Lax{secure}",
            self.cookie_name
        )
    }

    /// `Set-Cookie` value that removes the session cookie.
    pub fn clear_cookie(&self) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{secure}",
            self.cookie_name
        )
    }
}

#[cfg(test)]
mod tests;
