//! Email to account owners: sign-ins from new devices, reported sign-ins, locked accounts.
//!
//! [`Notifier::enqueue`] only writes the message to the durable mail queue, so sending never
//! delays or fails a sign-in. A background worker ([`Notifier::run`]) claims due messages (a
//! lease, so several gateways polling one queue do not send twice), delivers them by SMTP when
//! `[notify] smtp_url` is set or writes each as an `.eml` file to `[notify] outbox_dir`
//! otherwise, and retries failures with exponential backoff. Failures are logged with the
//! message id and recipient domain, never the body (it holds a single-use link).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::{Mailbox, Message, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use tokio::sync::Notify;

use crate::clock::{Clock, UnixTime};
use crate::config::NotifyConfig;
use crate::store::{DurableStore, Mail, StoreResult};

/// How long a claimed message is held by one worker before another may try it (a crash while
/// sending delays the mail by this much, never loses it).
const LEASE_SECS: i64 = 120;
/// First retry delay; doubled per failed attempt up to [`MAX_BACKOFF_SECS`].
const FIRST_BACKOFF_SECS: i64 = 30;
const MAX_BACKOFF_SECS: i64 = 3600;
/// Messages claimed per pass.
const BATCH: u32 = 20;
/// How often the queue is polled when nothing wakes the worker (mail queued by another gateway).
const POLL: Duration = Duration::from_secs(5);
/// Due time of a message that can never be sent (invalid recipient): effectively never.
const NEVER: UnixTime = i64::MAX / 4;

/// Why the notifier could not start.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify.from: {0}")]
    From(String),
    #[error("notify.smtp_url is not usable: {0}")]
    Smtp(String),
    #[error("notify.outbox_dir {path}: {source}")]
    Outbox {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone)]
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Outbox(PathBuf),
}

impl std::fmt::Debug for Transport {
    // The SMTP transport holds credentials: show only which kind this is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Smtp(_) => f.write_str("Smtp"),
            Self::Outbox(p) => f.debug_tuple("Outbox").field(p).finish(),
        }
    }
}

/// What the owner is told when an administrator removes their second factors.
pub const RESET_NOTICE: &str = "an administrator removed all second factors; you set one up again \
     through the enrolment link your administrator gives you (your password alone no longer signs in)";

/// `at` (Unix seconds) as notices print it: date and time to the second, saying UTC
/// (`2026-12-06 10:40:00 UTC`).
pub fn utc_text(at: UnixTime) -> String {
    let rfc3339 = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or_default()),
    )
    .to_string();
    format!(
        "{} UTC",
        rfc3339.trim_end_matches('Z').replacen('T', " ", 1)
    )
}

/// The mail queue and its delivery.
#[derive(Debug, Clone)]
pub struct Notifier {
    durable: Arc<dyn DurableStore>,
    clock: Arc<dyn Clock>,
    transport: Transport,
    from: Mailbox,
    wake: Arc<Notify>,
    /// The gateway's host name, for subjects and bodies.
    site: String,
    /// `/_portcullis/report` on the public URL, for "this wasn't me" links.
    report_url: url::Url,
    /// How long such a link works (seconds).
    report_ttl: i64,
    /// Seals queued bodies (they hold live single-use links) and opens them to send: the
    /// gateway's master key; `None` for a command run without one, whose bodies wait in clear.
    sealing: Option<Arc<crate::crypto::MasterKey>>,
}

/// How a sealed body starts in the queue (then base64 of the sealed bytes).
const SEALED: &str = "sealed:v1:";

/// The context a message's body is sealed under: bound to its id, so one message's body cannot
/// be moved into another's row.
fn body_context(id: &str) -> String {
    format!("mail-body:{id}")
}

impl Notifier {
    /// Builds the notifier; with no SMTP server the outbox directory is created (mode 0700).
    pub fn new(
        config: &NotifyConfig,
        public_url: &url::Url,
        durable: Arc<dyn DurableStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, NotifyError> {
        let from = config
            .from
            .parse::<Mailbox>()
            .map_err(|e| NotifyError::From(e.to_string()))?;
        let transport = match &config.smtp_url {
            Some(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
                    .map_err(|e| NotifyError::Smtp(e.to_string()))?
                    .timeout(Some(Duration::from_secs(20)))
                    .build(),
            ),
            None => {
                let dir = config.outbox_dir.clone();
                create_private_dir(&dir).map_err(|source| NotifyError::Outbox {
                    path: dir.clone(),
                    source,
                })?;
                Transport::Outbox(dir)
            }
        };
        Ok(Self {
            durable,
            clock,
            transport,
            from,
            wake: Arc::new(Notify::new()),
            site: public_url.host_str().unwrap_or("Portcullis").to_string(),
            report_url: {
                let mut u = public_url.clone();
                u.set_path("/_portcullis/report");
                u.set_query(None);
                u
            },
            report_ttl: i64::try_from(config.report_link_ttl.as_secs()).unwrap_or(i64::MAX / 4),
            sealing: None,
        })
    }

    /// Seals the bodies queued from now on under `key` (and opens sealed ones to send): a copy
    /// of the database shows no link of a notice waiting to go out.
    pub fn sealing_with(mut self, key: Arc<crate::crypto::MasterKey>) -> Self {
        self.sealing = Some(key);
        self
    }

    /// Where messages go, for start-up logs: `smtp` or the outbox directory.
    pub fn destination(&self) -> String {
        match &self.transport {
            Transport::Smtp(_) => "smtp".into(),
            Transport::Outbox(dir) => dir.display().to_string(),
        }
    }

    /// Queues a plain-text message and wakes the worker. Only a storage failure is an error.
    pub async fn enqueue(&self, to: &str, subject: &str, body: &str) -> StoreResult<()> {
        use base64::Engine;
        let now = self.clock.now();
        let id = uuid::Uuid::new_v4().to_string();
        let body = match &self.sealing {
            Some(key) => {
                let sealed = key
                    .seal(&body_context(&id), body.as_bytes())
                    .map_err(|e| crate::store::StoreError::Unavailable(e.to_string()))?;
                format!(
                    "{SEALED}{}",
                    base64::engine::general_purpose::STANDARD.encode(sealed)
                )
            }
            None => body.to_string(),
        };
        self.durable
            .enqueue_mail(Mail {
                id,
                to_addr: to.to_string(),
                subject: subject.to_string(),
                body,
                created_at: now,
                attempts: 0,
                next_attempt_at: now,
                sent_at: None,
                last_error: None,
            })
            .await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Tells the owner that how their account is protected changed (`what`, e.g. "a security
    /// key was added"). A queueing failure is logged, never passed on: the change itself has
    /// happened and must not be undone or reported as failed because of mail.
    pub async fn account_change(&self, user: &crate::store::User, what: &str) {
        self.change_notice(
            user,
            what,
            "If this was you, there is nothing to do. If it was not, contact your administrator at\n\
             once: someone else may have access to your account.\n",
        )
        .await;
    }

    /// Tells the owner that `n` wrong passwords were tried in a row for their account, so it now
    /// asks for the second factor first: what happened (nothing got in), what they will see at
    /// their next sign-in, and what to do about a password that may be known or guessed.
    pub async fn password_guessing(&self, user: &crate::store::User, n: u64) {
        let body = format!(
            "{n} wrong passwords in a row were tried for your account {email} on {site}\n\
             (the last at {when}). A wrong password opens nothing: nobody got into your account\n\
             with them.\n\
             \n\
             Until you next sign in, your account asks for your second factor first (a code from\n\
             your authenticator app, a recovery code, or your security key), and only then for\n\
             your password, so that guesses at your password are not even checked. Nothing else\n\
             changes for you.\n\
             \n\
             If you did not type them yourself, someone is guessing your password, perhaps with\n\
             a list of passwords leaked elsewhere. If you use this password on any other site,\n\
             change it there, and choose a new one here that you use nowhere else.\n",
            email = user.email,
            site = self.site,
            when = utc_text(self.clock.now()),
        );
        let subject = format!("Someone may be guessing your password on {}", self.site);
        self.queue(user, &subject, &body, "password-guessing").await;
    }

    /// Tells the owner that a sign-in to their account was stopped half-way: it began from
    /// network `began` (its password, or its second factor where that comes first, given there)
    /// and went on from `went_on`, another network or browser.
    pub async fn sign_in_stopped(&self, user: &crate::store::User, began: &str, went_on: &str) {
        let body = format!(
            "A sign-in to your account {email} on {site} was stopped at {when}: it began from\n\
             the network {began}, where the password (or the second factor) was given, and went\n\
             on from another network or browser ({went_on}). Nothing was signed in.\n\
             \n\
             If you were changing networks (a VPN, Wi-Fi to mobile), sign in again; there is\n\
             nothing else to do. If it was not you, someone may know your password, or have a\n\
             copy of your browser's cookies: change your password, and tell your administrator.\n",
            email = user.email,
            site = self.site,
            when = utc_text(self.clock.now()),
        );
        let subject = format!("A sign-in to your account on {} was stopped", self.site);
        self.queue(user, &subject, &body, "stopped-sign-in").await;
    }

    /// Queues a notice to `user`; a queueing failure is logged (naming `what` notice), never
    /// passed on: what it tells of has happened.
    async fn queue(&self, user: &crate::store::User, subject: &str, body: &str, what: &str) {
        if let Err(e) = self.enqueue(&user.email, subject, body).await {
            tracing::warn!(error = %e, notice = what, "could not queue a notice");
        }
    }

    /// A change an administrator made to `user`'s account (`what`): the notice says who made it
    /// instead of asking whether it was the owner. (The reason the administrator gave is for the
    /// audit trail, not for the mail.)
    pub async fn admin_change(&self, user: &crate::store::User, what: &str) {
        self.change_notice(
            user,
            what,
            &format!(
                "An administrator of {site} made this change. If you did not expect it, contact\n\
                 your administrator.\n",
                site = self.site
            ),
        )
        .await;
    }

    /// A new single-use "this wasn't me" link for `user` (only its hash is stored): for a
    /// sign-in from `device`, or for a change of the account's security (`None`). What it takes
    /// back counts from its `created_at`: now, or `since` (a sign-in that set up the account's
    /// first factor counts from its start). Returns the link.
    pub async fn report_link(
        &self,
        user: &crate::store::User,
        device: Option<&str>,
        since: Option<i64>,
    ) -> StoreResult<url::Url> {
        let now = self.clock.now();
        let created_at = since.map_or(now, |s| s.min(now));
        let token = crate::crypto::random_token(32);
        self.durable
            .create_report_link(crate::store::ReportLink {
                token_hash: crate::crypto::sha256_hex(token.as_bytes()),
                user_id: user.id.clone(),
                device_id: device.map(str::to_string),
                created_at,
                expires_at: now.saturating_add(self.report_ttl),
                used_at: None,
            })
            .await?;
        let mut link = self.report_url.clone();
        link.query_pairs_mut().append_pair("t", &token);
        Ok(link)
    }

    /// How long a "this wasn't me" link works, in words: days where it is a whole number of
    /// them, else hours (`notify.report_link_ttl` is 1h to 30d): "7 days", "36 hours", "1 hour".
    pub fn report_lifetime(&self) -> String {
        lifetime_words(self.report_ttl)
    }

    /// [`Self::account_change`] for a change made with the owner's own session (a key added,
    /// the app or the recovery codes replaced, the password changed), with a "this wasn't me"
    /// link: a session copied from the owner's browser could make it, and reporting it ends
    /// every session and undoes what was set up since (keys suspended, app and codes removed).
    pub async fn account_change_by_owner(&self, user: &crate::store::User, what: &str) {
        let link = match self.report_link(user, None, None).await {
            Ok(link) => link,
            Err(e) => {
                tracing::warn!(error = %e, "could not make a report link; the notice goes without");
                return self.account_change(user, what).await;
            }
        };
        let advice = format!(
            "If this was you, there is nothing to do.\n\
             \n\
             If it was NOT you, someone is using your account: open this link now. It ends every\n\
             session of your account, suspends security keys added since, removes an authenticator\n\
             app or recovery codes set up since, and locks password sign-in until your administrator\n\
             restores it:\n\
             \n\
             {link}\n\
             \n\
             The link works once and expires in {days}.\n",
            days = self.report_lifetime(),
        );
        self.change_notice(user, what, &advice).await;
    }

    /// A change of a security key for a notice: `what` happened, and the key's name on a line of
    /// its own, said to be the name it was given (whoever added the key chose it, so it must
    /// not read as part of the sentence; names hold no line breaks).
    pub fn key_change(what: &str, name: &str) -> String {
        format!("{what}\n  The name it was given: {name}")
    }

    /// Queues the notice of a change, `what`, followed by `advice`.
    pub(crate) async fn change_notice(&self, user: &crate::store::User, what: &str, advice: &str) {
        let body = format!(
            "A security setting of your account {email} on {site} changed:\n\n  {what}\n  ({when})\n\n{advice}",
            email = user.email,
            site = self.site,
            when = utc_text(self.clock.now()),
        );
        let subject = format!("Security change on your account on {}", self.site);
        self.queue(user, &subject, &body, "account-change").await;
    }

    /// One pass over the queue: claims due messages and delivers them. Returns how many went
    /// out.
    pub async fn deliver_due(&self) -> StoreResult<usize> {
        let now = self.clock.now();
        let claimed = self
            .durable
            .claim_due_mail(now, now + LEASE_SECS, BATCH)
            .await?;
        let mut sent = 0;
        for mail in claimed {
            match self.send(&mail).await {
                Ok(()) => {
                    self.durable.mail_sent(&mail.id, self.clock.now()).await?;
                    sent += 1;
                }
                Err(Failure { message, permanent }) => {
                    let next = if permanent {
                        NEVER
                    } else {
                        self.clock.now() + backoff(mail.attempts)
                    };
                    tracing::warn!(
                        mail_id = %mail.id,
                        to_domain = mail.to_addr.rsplit('@').next().unwrap_or_default(),
                        attempts = mail.attempts + 1,
                        permanent,
                        error = %message,
                        "could not deliver a notification; it stays queued"
                    );
                    self.durable.mail_failed(&mail.id, &message, next).await?;
                }
            }
        }
        Ok(sent)
    }

    /// Delivers queued mail until the task is dropped: after every enqueue on this gateway and
    /// every few seconds (mail queued by other gateways, retries).
    pub async fn run(self) {
        loop {
            loop {
                match self.deliver_due().await {
                    Ok(n) if n as u32 == BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "mail queue unavailable; will retry");
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(POLL, self.wake.notified()).await;
        }
    }

    async fn send(&self, mail: &Mail) -> Result<(), Failure> {
        let message = self.build(mail)?;
        match &self.transport {
            Transport::Smtp(smtp) => smtp.send(message).await.map(|_| ()).map_err(|e| Failure {
                permanent: e.is_permanent(),
                message: e.to_string(),
            }),
            Transport::Outbox(dir) => {
                let bytes = message.formatted();
                // Names sort in the order messages were queued, then written.
                let written = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                let name = format!("{:012}-{written:020}-{}.eml", mail.created_at, mail.id);
                write_atomically(dir, &name, &bytes).map_err(|e| Failure {
                    permanent: false,
                    message: format!("cannot write to the outbox: {e}"),
                })
            }
        }
    }

    /// A queued message's body as it is to be sent: opened where it was sealed.
    fn body_of(&self, mail: &Mail) -> Result<String, Failure> {
        use base64::Engine;
        let Some(sealed) = mail.body.strip_prefix(SEALED) else {
            return Ok(mail.body.clone());
        };
        // Not permanent: a gateway with the right key (this one after a fix) sends it later.
        let unreadable = |why: &str| Failure {
            permanent: false,
            message: format!("cannot open the sealed message: {why}"),
        };
        let key = self
            .sealing
            .as_ref()
            .ok_or_else(|| unreadable("no master key here"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| unreadable("not base64"))?;
        let opened = key
            .open(&body_context(&mail.id), &bytes)
            .map_err(|_| unreadable("another master key sealed it, or it was altered"))?;
        String::from_utf8(opened.to_vec()).map_err(|_| unreadable("not text"))
    }

    fn build(&self, mail: &Mail) -> Result<Message, Failure> {
        let to = mail.to_addr.parse::<Mailbox>().map_err(|e| Failure {
            permanent: true,
            message: format!("invalid recipient: {e}"),
        })?;
        let date = std::time::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(self.clock.now()).unwrap_or_default());
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .date(date)
            // Stable across retries (the queue's id), so a receiver can drop a duplicate.
            .message_id(Some(format!("<{}@{}>", mail.id, self.site)))
            // `MIME-Version`, `Content-Type: text/plain; charset=utf-8` and a transfer encoding.
            .singlepart(SinglePart::plain(self.body_of(mail)?))
            .map_err(|e| Failure {
                permanent: true,
                message: format!("cannot build the message: {e}"),
            })
    }
}

struct Failure {
    message: String,
    permanent: bool,
}

/// Delay before the next try after `attempts` earlier failed tries.
fn backoff(attempts: i64) -> i64 {
    let shift = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    FIRST_BACKOFF_SECS
        .saturating_mul(1_i64 << shift)
        .min(MAX_BACKOFF_SECS)
}

/// Creates the outbox (and what is missing above it) readable by the gateway's user only. A
/// directory that exists is left as it is: its owner may have made it group-readable for the
/// system that takes the mail from there.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.is_dir() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir)?.permissions().mode();
            if mode & 0o002 != 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    "notify.outbox_dir is writable by every user: anyone on this host can add or \
                     replace mail there; make it writable by the gateway's user (and group) only"
                );
            }
        }
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes `name` in `dir` through a temporary file and a rename, so a reader of the outbox never
/// sees half a message. Messages carry one-time links: readable by the gateway's user and its
/// group (a hand-off to another system), never by others.
fn write_atomically(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&tmp, dir.join(name))
}

/// A lifetime of `secs` (at least an hour) in words: whole days, else whole hours.
fn lifetime_words(secs: i64) -> String {
    let (n, unit) = if secs % 86_400 == 0 {
        (secs / 86_400, "day")
    } else {
        (secs / 3_600, "hour")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report link's lifetime is said as set (`notify.report_link_ttl`, 1h to 30d): an hour
    /// is not "0 days", a day and a half not "1 days".
    #[test]
    fn a_report_links_lifetime_is_said_as_set() {
        for (secs, said) in [
            (3_600, "1 hour"),
            (36 * 3_600, "36 hours"),
            (86_400, "1 day"),
            (7 * 86_400, "7 days"),
            (30 * 86_400, "30 days"),
        ] {
            assert_eq!(lifetime_words(secs), said);
        }
    }

    /// The outbox the gateway creates is private; one that exists keeps the mode its owner gave
    /// it (a group hand-off); messages are never readable by others.
    #[cfg(unix)]
    #[test]
    fn the_outbox_is_private_unless_its_owner_shared_it_and_mail_is_never_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let root = tempfile::tempdir().unwrap();
        let created = root.path().join("a/outbox");
        create_private_dir(&created).unwrap();
        assert_eq!(mode(&created), 0o700);
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2770)).unwrap();
        create_private_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o2770);
        write_atomically(&shared, "m.eml", b"Subject: x\r\n\r\nbody").unwrap();
        assert_eq!(mode(&shared.join("m.eml")) & 0o007, 0, "not for others");
        assert_eq!(
            std::fs::read(shared.join("m.eml")).unwrap(),
            b"Subject: x\r\n\r\nbody"
        );
        assert!(!shared.join(".m.eml.tmp").exists());
        // One anyone may write to is used, with a warning.
        let (logs, _guard) = crate::test_logs::capture();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        create_private_dir(&shared).unwrap();
        assert!(
            logs.text().contains("writable by every user"),
            "{}",
            logs.text()
        );
        // A file in the way is an error, not a directory made elsewhere.
        std::fs::write(root.path().join("file"), b"").unwrap();
        assert!(create_private_dir(&root.path().join("file")).is_err());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), 30);
        assert_eq!(backoff(1), 60);
        assert_eq!(backoff(3), 240);
        assert_eq!(backoff(7), MAX_BACKOFF_SECS);
        assert_eq!(backoff(1_000), MAX_BACKOFF_SECS);
        assert_eq!(backoff(-5), 30);
    }
}
