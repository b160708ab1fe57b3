//! Store wrappers that time every operation into the `store_operation_seconds` histogram and
//! count the mail queue's deliveries (every delivery ends in `mail_sent` or `mail_failed`), so
//! no backend has to know about metrics.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Metrics, StoreKind};
use crate::clock::UnixTime;
use crate::store::{
    AuditCount, AuditEvent, AuditQuery, Device, DroppedFactors, DurableStore, EnrolmentLink,
    EphemeralStore, KeyRemoval, Mail, NewUser, ReportLink, SigningKeyRecord, StoreResult,
    TotpRecord, User, WebauthnCredential,
};

/// A store whose operations are timed.
pub struct Timed<S: ?Sized> {
    inner: Arc<S>,
    metrics: Arc<Metrics>,
}

/// Shows the wrapped store only (its `Debug` already hides credentials).
impl<S: ?Sized + std::fmt::Debug> std::fmt::Debug for Timed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Timed").field(&self.inner).finish()
    }
}

impl<S: ?Sized> Timed<S> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<S>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn time<T>(
        &self,
        kind: StoreKind,
        class: &'static str,
        op: impl Future<Output = T>,
    ) -> T {
        let started = Instant::now();
        let out = op.await;
        self.metrics.store_latency(kind, class, started.elapsed());
        out
    }

    async fn durable<T>(&self, class: &'static str, op: impl Future<Output = T>) -> T {
        self.time(StoreKind::Durable, class, op).await
    }

    async fn ephemeral<T>(&self, class: &'static str, op: impl Future<Output = T>) -> T {
        self.time(StoreKind::Ephemeral, class, op).await
    }
}

/// Operation classes: `read` (lookups), `write` (changes), `atomic` (check-and-change in one
/// step: consume, compare-and-set, counters), `audit`, `mail`, `ping`.
const READ: &str = "read";
const WRITE: &str = "write";
const ATOMIC: &str = "atomic";
const AUDIT: &str = "audit";
const MAIL: &str = "mail";
const PING: &str = "ping";

#[async_trait]
impl DurableStore for Timed<dyn DurableStore> {
    async fn migrate(&self) -> StoreResult<()> {
        self.inner.migrate().await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.durable(PING, self.inner.ping()).await
    }
    async fn close(&self) {
        self.inner.close().await;
    }
    async fn server_time_ms(&self) -> StoreResult<Option<i64>> {
        self.durable(PING, self.inner.server_time_ms()).await
    }
    async fn create_user(&self, new: NewUser, now: UnixTime) -> StoreResult<User> {
        self.durable(WRITE, self.inner.create_user(new, now)).await
    }
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
        self.durable(READ, self.inner.user_by_email(email)).await
    }
    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>> {
        self.durable(READ, self.inner.user_by_id(id)).await
    }
    async fn list_users(&self) -> StoreResult<Vec<User>> {
        self.durable(READ, self.inner.list_users()).await
    }
    async fn search_users(&self, text: &str, limit: u32) -> StoreResult<Vec<User>> {
        self.durable(READ, self.inner.search_users(text, limit))
            .await
    }
    async fn locked_users(&self, limit: u32) -> StoreResult<Vec<User>> {
        self.durable(READ, self.inner.locked_users(limit)).await
    }
    async fn count_users(&self) -> StoreResult<i64> {
        self.durable(READ, self.inner.count_users()).await
    }
    async fn set_admin(&self, user_id: &str, is_admin: bool) -> StoreResult<()> {
        self.durable(WRITE, self.inner.set_admin(user_id, is_admin))
            .await
    }
    async fn suspended_webauthn_credentials(&self) -> StoreResult<Vec<WebauthnCredential>> {
        self.durable(READ, self.inner.suspended_webauthn_credentials())
            .await
    }
    async fn audit_counts(
        &self,
        since: UnixTime,
        bucket_secs: i64,
    ) -> StoreResult<Vec<AuditCount>> {
        self.durable(AUDIT, self.inner.audit_counts(since, bucket_secs))
            .await
    }
    async fn prune_audit(&self, before: UnixTime, limit: u32) -> StoreResult<u64> {
        self.durable(AUDIT, self.inner.prune_audit(before, limit))
            .await
    }
    async fn audit_events_before(&self, before: UnixTime) -> StoreResult<u64> {
        self.durable(AUDIT, self.inner.audit_events_before(before))
            .await
    }
    async fn create_enrolment_link(&self, link: EnrolmentLink) -> StoreResult<()> {
        self.durable(WRITE, self.inner.create_enrolment_link(link))
            .await
    }
    async fn enrolment_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<EnrolmentLink>> {
        self.durable(READ, self.inner.enrolment_link(token_hash, now))
            .await
    }
    async fn consume_enrolment_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<EnrolmentLink>> {
        self.durable(ATOMIC, self.inner.consume_enrolment_link(token_hash, now))
            .await
    }
    async fn set_password_hash(&self, user_id: &str, hash: &str) -> StoreResult<()> {
        self.durable(WRITE, self.inner.set_password_hash(user_id, hash))
            .await
    }
    async fn set_disabled(&self, user_id: &str, disabled: bool, now_ms: i64) -> StoreResult<()> {
        self.durable(WRITE, self.inner.set_disabled(user_id, disabled, now_ms))
            .await
    }
    async fn void_sessions(&self, user_id: &str, at_ms: i64) -> StoreResult<()> {
        self.durable(WRITE, self.inner.void_sessions(user_id, at_ms))
            .await
    }
    async fn totp(&self, user_id: &str) -> StoreResult<Option<TotpRecord>> {
        self.durable(READ, self.inner.totp(user_id)).await
    }
    async fn oldest_totp(&self) -> StoreResult<Option<TotpRecord>> {
        self.durable(READ, self.inner.oldest_totp()).await
    }
    async fn set_totp(&self, record: TotpRecord) -> StoreResult<()> {
        self.durable(WRITE, self.inner.set_totp(record)).await
    }
    async fn reset_second_factors(&self, user_id: &str, now: UnixTime) -> StoreResult<()> {
        self.durable(WRITE, self.inner.reset_second_factors(user_id, now))
            .await
    }
    async fn drop_factors_since(
        &self,
        user_id: &str,
        since: UnixTime,
        now: UnixTime,
    ) -> StoreResult<DroppedFactors> {
        self.durable(WRITE, self.inner.drop_factors_since(user_id, since, now))
            .await
    }
    async fn add_webauthn_credential(&self, cred: &WebauthnCredential) -> StoreResult<()> {
        self.durable(WRITE, self.inner.add_webauthn_credential(cred))
            .await
    }
    async fn webauthn_credentials(&self, user_id: &str) -> StoreResult<Vec<WebauthnCredential>> {
        self.durable(READ, self.inner.webauthn_credentials(user_id))
            .await
    }
    async fn webauthn_credential(
        &self,
        credential_id: &str,
    ) -> StoreResult<Option<WebauthnCredential>> {
        self.durable(READ, self.inner.webauthn_credential(credential_id))
            .await
    }
    async fn record_webauthn_use(
        &self,
        id: &str,
        passkey: &str,
        sign_count: i64,
        now: UnixTime,
    ) -> StoreResult<bool> {
        let op = self.inner.record_webauthn_use(id, passkey, sign_count, now);
        self.durable(ATOMIC, op).await
    }
    async fn suspend_webauthn_credential(
        &self,
        id: &str,
        reason: &str,
        now: UnixTime,
    ) -> StoreResult<()> {
        let op = self.inner.suspend_webauthn_credential(id, reason, now);
        self.durable(WRITE, op).await
    }
    async fn rename_webauthn_credential(
        &self,
        user_id: &str,
        id: &str,
        name: &str,
    ) -> StoreResult<bool> {
        let op = self.inner.rename_webauthn_credential(user_id, id, name);
        self.durable(WRITE, op).await
    }
    async fn remove_webauthn_credential(
        &self,
        user_id: &str,
        id: &str,
        codes_count: bool,
        now: UnixTime,
    ) -> StoreResult<KeyRemoval> {
        let op = self
            .inner
            .remove_webauthn_credential(user_id, id, codes_count, now);
        self.durable(WRITE, op).await
    }
    async fn restore_webauthn_credential(&self, user_id: &str, id: &str) -> StoreResult<bool> {
        let op = self.inner.restore_webauthn_credential(user_id, id);
        self.durable(WRITE, op).await
    }
    async fn set_recovery_codes(
        &self,
        user_id: &str,
        hashes: &[String],
        now: UnixTime,
    ) -> StoreResult<()> {
        let op = self.inner.set_recovery_codes(user_id, hashes, now);
        self.durable(WRITE, op).await
    }
    async fn consume_recovery_code(
        &self,
        user_id: &str,
        hash: &str,
        now: UnixTime,
    ) -> StoreResult<bool> {
        let op = self.inner.consume_recovery_code(user_id, hash, now);
        self.durable(ATOMIC, op).await
    }
    async fn recovery_codes_left(&self, user_id: &str) -> StoreResult<u32> {
        self.durable(READ, self.inner.recovery_codes_left(user_id))
            .await
    }
    async fn insert_signing_key(&self, key: SigningKeyRecord) -> StoreResult<()> {
        self.durable(WRITE, self.inner.insert_signing_key(key))
            .await
    }
    async fn insert_first_signing_key(&self, key: SigningKeyRecord) -> StoreResult<bool> {
        self.durable(ATOMIC, self.inner.insert_first_signing_key(key))
            .await
    }
    async fn retire_signing_keys_except(
        &self,
        keep_kid: &str,
        retire_at: UnixTime,
    ) -> StoreResult<()> {
        let op = self.inner.retire_signing_keys_except(keep_kid, retire_at);
        self.durable(WRITE, op).await
    }
    async fn live_signing_keys(&self, now: UnixTime) -> StoreResult<Vec<SigningKeyRecord>> {
        self.durable(READ, self.inner.live_signing_keys(now)).await
    }
    async fn append_audit(&self, events: &[AuditEvent]) -> StoreResult<()> {
        self.durable(AUDIT, self.inner.append_audit(events)).await
    }
    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditEvent>> {
        self.durable(AUDIT, self.inner.query_audit(q)).await
    }
    async fn set_locked(&self, user_id: &str, locked: bool) -> StoreResult<()> {
        self.durable(WRITE, self.inner.set_locked(user_id, locked))
            .await
    }
    async fn create_device(&self, device: Device) -> StoreResult<()> {
        self.durable(WRITE, self.inner.create_device(device)).await
    }
    async fn device_by_token(&self, token_hash: &str) -> StoreResult<Option<Device>> {
        self.durable(READ, self.inner.device_by_token(token_hash))
            .await
    }
    async fn touch_device(&self, id: &str, now: UnixTime, ip: &str) -> StoreResult<()> {
        self.durable(WRITE, self.inner.touch_device(id, now, ip))
            .await
    }
    async fn list_devices(&self, user_id: &str) -> StoreResult<Vec<Device>> {
        self.durable(READ, self.inner.list_devices(user_id)).await
    }
    async fn remember_device(
        &self,
        id: &str,
        key: Option<&str>,
        until: Option<UnixTime>,
    ) -> StoreResult<()> {
        self.durable(WRITE, self.inner.remember_device(id, key, until))
            .await
    }
    async fn set_device_binding(&self, id: &str, binding: &str) -> StoreResult<()> {
        self.durable(WRITE, self.inner.set_device_binding(id, binding))
            .await
    }
    async fn meta(&self, name: &str) -> StoreResult<Option<String>> {
        self.durable(READ, self.inner.meta(name)).await
    }
    async fn set_meta_if_absent(&self, name: &str, value: &str) -> StoreResult<bool> {
        self.durable(WRITE, self.inner.set_meta_if_absent(name, value))
            .await
    }
    async fn risk_history(&self, user_id: &str) -> StoreResult<Option<String>> {
        self.durable(READ, self.inner.risk_history(user_id)).await
    }
    async fn set_risk_history(&self, user_id: &str, body: &str, now: UnixTime) -> StoreResult<()> {
        self.durable(WRITE, self.inner.set_risk_history(user_id, body, now))
            .await
    }
    async fn revoke_device(&self, id: &str) -> StoreResult<bool> {
        self.durable(WRITE, self.inner.revoke_device(id)).await
    }
    async fn enqueue_mail(&self, mail: Mail) -> StoreResult<()> {
        let done = self.durable(MAIL, self.inner.enqueue_mail(mail)).await;
        self.metrics.mail_if_ok(&done, "queued");
        done
    }
    async fn claim_due_mail(
        &self,
        now: UnixTime,
        lease_until: UnixTime,
        limit: u32,
    ) -> StoreResult<Vec<Mail>> {
        let op = self.inner.claim_due_mail(now, lease_until, limit);
        self.durable(MAIL, op).await
    }
    async fn mail_sent(&self, id: &str, now: UnixTime) -> StoreResult<()> {
        let done = self.durable(MAIL, self.inner.mail_sent(id, now)).await;
        self.metrics.mail_if_ok(&done, "sent");
        done
    }
    async fn mail_failed(
        &self,
        id: &str,
        error: &str,
        next_attempt_at: UnixTime,
    ) -> StoreResult<()> {
        let op = self.inner.mail_failed(id, error, next_attempt_at);
        let done = self.durable(MAIL, op).await;
        self.metrics.mail_if_ok(&done, "failed");
        done
    }
    async fn list_mail(&self, limit: u32) -> StoreResult<Vec<Mail>> {
        self.durable(MAIL, self.inner.list_mail(limit)).await
    }
    async fn create_report_link(&self, link: ReportLink) -> StoreResult<()> {
        self.durable(WRITE, self.inner.create_report_link(link))
            .await
    }
    async fn report_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<ReportLink>> {
        self.durable(READ, self.inner.report_link(token_hash, now))
            .await
    }
    async fn consume_report_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<ReportLink>> {
        let op = self.inner.consume_report_link(token_hash, now);
        self.durable(ATOMIC, op).await
    }
}

#[async_trait]
impl EphemeralStore for Timed<dyn EphemeralStore> {
    async fn ping(&self) -> StoreResult<()> {
        self.ephemeral(PING, self.inner.ping()).await
    }
    async fn server_time_ms(&self) -> StoreResult<Option<i64>> {
        self.ephemeral(PING, self.inner.server_time_ms()).await
    }
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.ephemeral(READ, self.inner.get(key)).await
    }
    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<()> {
        self.ephemeral(WRITE, self.inner.put(key, value, ttl)).await
    }
    async fn put_if_present(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        self.ephemeral(ATOMIC, self.inner.put_if_present(key, value, ttl))
            .await
    }

    async fn put_if_absent(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        self.ephemeral(ATOMIC, self.inner.put_if_absent(key, value, ttl))
            .await
    }
    async fn put_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> StoreResult<bool> {
        let put = self.inner.put_if_unchanged(key, expected, value, ttl);
        self.ephemeral(ATOMIC, put).await
    }
    async fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.ephemeral(ATOMIC, self.inner.take(key)).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.ephemeral(WRITE, self.inner.delete(key)).await
    }
    async fn incr(&self, key: &str, ttl: Duration) -> StoreResult<u64> {
        self.ephemeral(ATOMIC, self.inner.incr(key, ttl)).await
    }
    async fn incr_this_second(&self, key: &str) -> StoreResult<u64> {
        self.ephemeral(ATOMIC, self.inner.incr_this_second(key))
            .await
    }
    async fn decr(&self, key: &str) -> StoreResult<()> {
        self.ephemeral(ATOMIC, self.inner.decr(key)).await
    }
    async fn set_if_greater(&self, key: &str, value: u64, ttl: Duration) -> StoreResult<bool> {
        self.ephemeral(ATOMIC, self.inner.set_if_greater(key, value, ttl))
            .await
    }
    async fn set_add(&self, key: &str, member: &str, ttl: Duration) -> StoreResult<u64> {
        self.ephemeral(WRITE, self.inner.set_add(key, member, ttl))
            .await
    }
    async fn set_remove(&self, key: &str, member: &str) -> StoreResult<()> {
        self.ephemeral(WRITE, self.inner.set_remove(key, member))
            .await
    }
    async fn set_members(&self, key: &str) -> StoreResult<Vec<String>> {
        self.ephemeral(READ, self.inner.set_members(key)).await
    }
}
