//! The durable store on SQL: SQLite (embedded default) and PostgreSQL through sqlx's `Any`
//! driver. Both dialects take the same statements (`$N` placeholders, `ON CONFLICT`,
//! `RETURNING`); only the migrations differ (`migrations/sqlite`, `migrations/postgres`).

mod copy;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{
    AuditCount, AuditEvent, AuditQuery, Device, DroppedFactors, DurableStore, EnrolmentLink,
    KeyRemoval, Mail, NewUser, ReportLink, SigningKeyRecord, StoreError, StoreResult, TotpRecord,
    User, WebauthnCredential,
};
use crate::clock::UnixTime;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// An argument of a statement run through [`SqlStore::change`].
#[derive(Debug, Clone, Copy)]
enum Arg<'a> {
    Text(&'a str),
    Int(i64),
}

/// How long [`DurableStore::close`] waits for connections still in use.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A pooled SQL connection.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    sqlite: bool,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(db.message().to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Why the database at `url` cannot be opened, naming it (without password or options): the
/// pool only says it timed out, so one connection is tried on its own for the cause (refused,
/// no such host, authentication…).
async fn opening_failed(url: &str, e: sqlx::Error) -> String {
    let shown = crate::secret::redact_url(url.split('?').next().unwrap_or_default());
    let cause = match e {
        sqlx::Error::PoolTimedOut => {
            let alone = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                <sqlx::AnyConnection as sqlx::Connection>::connect(url),
            )
            .await;
            match alone {
                Ok(Err(e)) => e.to_string(),
                _ => "no connection opened in time (is the server up and reachable?)".into(),
            }
        }
        e => e.to_string(),
    };
    format!("cannot open the database {shown} (storage.durable): {cause}")
}

/// Whether SQLite refused because another connection (the CLI, a second gateway process)
/// holds the file: `SQLITE_BUSY`/`SQLITE_LOCKED` and their extended codes. The busy timeout
/// covers most of these; the rest (a stale WAL snapshot, a lock taken while a connection
/// opens) come back at once and are worth another try.
fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i64>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

/// How often a statement refused as busy is tried again, and the first pause between tries
/// (doubled each time, on top of the busy timeout each try already waits).
const BUSY_TRIES: u32 = 8;
const BUSY_FIRST_PAUSE_MS: u64 = 25;

/// Runs `op`, trying again while SQLite reports the file busy. Each try is a whole statement or
/// a whole transaction, so a retry never repeats half of a change. PostgreSQL is run once.
async fn retry_busy<T, E, Fut>(
    sqlite: bool,
    busy: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut pause = BUSY_FIRST_PAUSE_MS;
    let mut tries = 1;
    loop {
        match op().await {
            Err(e) if sqlite && tries < BUSY_TRIES && busy(&e) => {
                tracing::debug!(tries, "sqlite busy; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                pause = (pause * 2).min(1000);
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Longest wait for a pooled connection. SQLite's pool is small and its file may be held by
/// the CLI or another process for a while.
const SQLITE_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// PostgreSQL: while the server is down, sqlx keeps trying to connect until this runs out, so it
/// is how long a request waits before its 503. Short, so an outage is a prompt refusal rather
/// than requests piling up; a server back within it is used at once. Every call gets a fresh
/// chance: connections are checked before use and broken ones replaced, so recovery needs no
/// restart.
const POSTGRES_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Rows per `INSERT` of audit events, largest first: a batch is written as statements of these
/// sizes only (37 rows: 16 + 16 + 4 + 1), so there are five statements in all and each stays in
/// the connection's statement cache. With one statement per batch size, a flood's batches of
/// every size from 1 to 256 were each parsed anew. 256 rows are 2,816 values, well under the bind
/// limits of SQLite (32,766) and PostgreSQL (65,535).
const AUDIT_ROWS_PER_INSERT: [usize; 5] = [256, 64, 16, 4, 1];

/// `events` cut into [`AUDIT_ROWS_PER_INSERT`]-sized chunks, in order.
fn audit_chunks(mut events: &[AuditEvent]) -> impl Iterator<Item = &[AuditEvent]> {
    std::iter::from_fn(move || {
        let size = AUDIT_ROWS_PER_INSERT
            .into_iter()
            .find(|&s| s <= events.len())?;
        let (chunk, rest) = events.split_at(size);
        events = rest;
        Some(chunk)
    })
}

/// `INSERT INTO audit_events (…) VALUES ($1, …, $11), ($12, …), …` for `rows` rows; for SQLite
/// with `?1, …` instead: SQLite looks a `$N` parameter up by name among those before it, which
/// for a statement of 2,816 values is millions of string comparisons per parse, and `?N` by
/// number.
fn audit_insert_sql(rows: usize, sqlite: bool) -> String {
    const COLUMNS: usize = 11;
    let mut sql = String::from(
        "INSERT INTO audit_events (at, event, outcome, user_id, email, account_id, ip, user_agent, reason, actor, times) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        let arg = |col: usize| {
            let mark = if sqlite { '?' } else { '$' };
            format!("{mark}{}", row * COLUMNS + col + 1)
        };
        for col in 0..COLUMNS {
            if col > 0 {
                sql.push_str(", ");
            }
            // An event recorded with its user's id alone (the request had the session, not the
            // user: a bound cookie used elsewhere, a disabled user's session) gets the user's
            // address and account in the same statement that writes it, so that filters by
            // either find it: never written without them where the user is there (a lookup of
            // its own could fail in an outage that the write then outlived).
            match col {
                4 | 5 => {
                    let column = if col == 4 { "email" } else { "account_id" };
                    let (own, user) = (arg(col), arg(3));
                    sql.push_str(&format!(
                        "COALESCE({own}, (SELECT {column} FROM users WHERE id = {user}))"
                    ));
                }
                _ => sql.push_str(&arg(col)),
            }
        }
        sql.push(')');
    }
    sql
}

/// The file of a `sqlite:` URL (`sqlite:///var/lib/p.sqlite`, `sqlite://p.sqlite?mode=rwc`);
/// `None` for an in-memory database and for other URLs.
pub fn sqlite_file(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("sqlite:")?;
    let path = rest.trim_start_matches("//");
    let path = path.split('?').next().unwrap_or(path);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

/// Whether this process may use the SQLite file at `path` as the gateway does: read and write
/// the file (when it exists) and create its `-wal` and `-shm` companions beside it (write access
/// to its directory, unless both exist and are writable already) or the file itself. SQLite
/// reports these only as "unable to open" or "readonly database", from inside a connection, so
/// they are asked of the file system first, by the process's own user and groups. Nothing is
/// created.
pub fn sqlite_access(path: &str) -> Result<(), String> {
    use rustix::fs::{access, Access};
    let user = || {
        let uid = rustix::process::getuid().as_raw();
        format!("the gateway's user (uid {uid})")
    };
    let file = std::path::Path::new(path);
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let rw = Access::READ_OK | Access::WRITE_OK;
    if file.exists() && access(file, rw).is_err() {
        return Err(format!("it cannot be read and written by {}", user()));
    }
    if !dir.is_dir() {
        return Err(format!("its directory {} does not exist", dir.display()));
    }
    let companions_writable = ["-wal", "-shm"].iter().all(|end| {
        let mut p = file.as_os_str().to_owned();
        p.push(end);
        access(std::path::Path::new(&p), rw).is_ok()
    });
    if !companions_writable && access(dir, Access::WRITE_OK | Access::EXEC_OK).is_err() {
        return Err(format!(
            "its directory {} cannot be written by {}: SQLite keeps the database's -wal and -shm \
             files beside it",
            dir.display(),
            user()
        ));
    }
    Ok(())
}

/// Creates a database file that does not exist yet readable by its owner only (it holds
/// password hashes and the sealed secrets): SQLite would create it, and then its `-wal` and
/// `-shm` files, with the umask's permissions, usually readable by everyone.
fn create_private(path: &str) -> std::io::Result<()> {
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    match open.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl SqlStore {
    /// Connects to `sqlite://path` (file created if missing) or `postgres://…`.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let creates = !url.contains("mode=") || url.contains("mode=rwc");
        if let Some(path) = sqlite_file(url).filter(|_| creates) {
            sqlite_access(path).map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot open the database {path} (storage.durable): {e}"
                ))
            })?;
            create_private(path).map_err(|e| {
                StoreError::Unavailable(format!("cannot create the database file {path}: {e}"))
            })?;
        }
        let url = if sqlite && !url.contains("mode=") {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        } else {
            url.to_string()
        };
        let opts = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .acquire_timeout(if sqlite {
                SQLITE_ACQUIRE_TIMEOUT
            } else {
                POSTGRES_ACQUIRE_TIMEOUT
            });
        let opts = if sqlite {
            // An embedded file has no connection that can go stale under the pool, so a
            // connection is not pinged before each use (one trip to its worker thread saved on
            // every query).
            opts.test_before_acquire(false).after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA busy_timeout = 5000")
                        .execute(&mut *conn)
                        .await?;
                    // WAL lets the CLI and the gateway use the file at once. The mode is stored
                    // in the file; switching needs an exclusive lock that ignores busy_timeout,
                    // so only the first connection ever asks for it.
                    let mode: String = sqlx::query("PRAGMA journal_mode")
                        .fetch_one(&mut *conn)
                        .await?
                        .try_get(0)?;
                    if !mode.eq_ignore_ascii_case("wal") {
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                    }

                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
        } else {
            opts
        };
        // Opening runs the PRAGMAs above, which another process holding the file can refuse.
        let pool = match retry_busy(sqlite, is_busy, || opts.clone().connect(&url)).await {
            Ok(pool) => pool,
            Err(e) => return Err(StoreError::Unavailable(opening_failed(&url, e).await)),
        };
        Ok(Self { pool, sqlite })
    }

    /// One TOTP record: `rest` follows the table (a condition on `$1` = `user_id`, or an order).
    async fn one_totp(&self, rest: &str, user_id: Option<&str>) -> StoreResult<Option<TotpRecord>> {
        let sql = format!("SELECT user_id, secret_sealed, created_at FROM totp_credentials {rest}");
        let pool = &self.pool;
        let sql = &sql;
        let row = self
            .retrying(move || async move {
                let q = sqlx::query(sql);
                let q = match user_id {
                    Some(id) => q.bind(id),
                    None => q,
                };
                q.fetch_optional(pool).await
            })
            .await?;
        row.map(|r| {
            Ok(TotpRecord {
                user_id: r.try_get("user_id")?,
                secret_sealed: r.try_get("secret_sealed")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
        .map_err(unavailable)
    }

    /// Runs one statement with `args` as a change (see [`SqlStore::retrying`]); returns the rows
    /// it touched.
    /// Runs a query with these arguments and returns its rows (busy SQLite retried).
    async fn fetch(&self, sql: &str, args: &[Arg<'_>]) -> StoreResult<Vec<AnyRow>> {
        let pool = &self.pool;
        self.retrying(move || async move {
            let mut q = sqlx::query(sql);
            for a in args {
                q = match *a {
                    Arg::Text(t) => q.bind(t),
                    Arg::Int(n) => q.bind(n),
                };
            }
            q.fetch_all(pool).await
        })
        .await
    }

    async fn change(&self, sql: &str, args: &[Arg<'_>]) -> StoreResult<u64> {
        let pool = &self.pool;
        let done = self
            .retrying(move || async move {
                let mut q = sqlx::query(sql);
                for a in args {
                    q = match *a {
                        Arg::Text(t) => q.bind(t),
                        Arg::Int(n) => q.bind(n),
                    };
                }
                q.execute(pool).await
            })
            .await?;
        Ok(done.rows_affected())
    }

    /// Runs one statement or one transaction, trying again while SQLite is busy.
    async fn retrying<T, Fut>(&self, op: impl FnMut() -> Fut) -> StoreResult<T>
    where
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        retry_busy(self.sqlite, is_busy, op)
            .await
            .map_err(unavailable)
    }
}

fn user_from(r: &AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        account_id: r.try_get("account_id")?,
        is_admin: r.try_get::<i64, _>("is_admin")? != 0,
        disabled: r.try_get::<i64, _>("disabled")? != 0,
        locked: r.try_get::<i64, _>("locked")? != 0,
        password_hash: r.try_get("password_hash")?,
        created_at: r.try_get("created_at")?,
        sessions_valid_after_ms: r.try_get("sessions_valid_after_ms")?,
        factors_reset_at: r.try_get("factors_reset_at")?,
    })
}

fn key_from(r: &AnyRow) -> Result<SigningKeyRecord, sqlx::Error> {
    Ok(SigningKeyRecord {
        kid: r.try_get("kid")?,
        alg: r.try_get("alg")?,
        public_jwk: r.try_get("public_jwk")?,
        private_sealed: r.try_get("private_sealed")?,
        created_at: r.try_get("created_at")?,
        retire_at: r.try_get("retire_at")?,
    })
}

fn audit_from(r: &AnyRow) -> Result<AuditEvent, sqlx::Error> {
    Ok(AuditEvent {
        id: r.try_get("id")?,
        at: r.try_get("at")?,
        event: r.try_get("event")?,
        outcome: r.try_get("outcome")?,
        user_id: r.try_get("user_id")?,
        email: r.try_get("email")?,
        account_id: r.try_get("account_id")?,
        ip: r.try_get("ip")?,
        user_agent: r.try_get("user_agent")?,
        reason: r.try_get("reason")?,
        actor: r.try_get("actor")?,
        times: r.try_get("times")?,
    })
}

fn webauthn_from(r: &AnyRow) -> Result<WebauthnCredential, sqlx::Error> {
    Ok(WebauthnCredential {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        credential_id: r.try_get("credential_id")?,
        passkey: r.try_get("passkey")?,
        name: r.try_get("name")?,
        aaguid: r.try_get("aaguid")?,
        sign_count: r.try_get("sign_count")?,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
        suspended_at: r.try_get("suspended_at")?,
        suspended_reason: r.try_get("suspended_reason")?,
    })
}

const WEBAUTHN_COLS: &str = "id, user_id, credential_id, passkey, name, aaguid, sign_count, \
     created_at, last_used_at, suspended_at, suspended_reason";

const USER_COLS: &str =
    "id, email, account_id, is_admin, disabled, locked, password_hash, created_at, sessions_valid_after_ms, \
     factors_reset_at";
const DEVICE_COLS: &str =
    "id, user_id, token_hash, name, user_agent, binding, status, first_seen, last_seen, last_ip";
const MAIL_COLS: &str =
    "id, to_addr, subject, body, created_at, attempts, next_attempt_at, sent_at, last_error";
const ENROL_COLS: &str =
    "token_hash, user_id, created_by, key_only, created_at, expires_at, used_at";

fn enrolment_from(r: &AnyRow) -> Result<EnrolmentLink, sqlx::Error> {
    Ok(EnrolmentLink {
        token_hash: r.try_get("token_hash")?,
        user_id: r.try_get("user_id")?,
        created_by: r.try_get("created_by")?,
        key_only: r.try_get::<i64, _>("key_only")? != 0,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        used_at: r.try_get("used_at")?,
    })
}

/// Rows mapped to values, or the mapping error as an unavailable store.
fn rows<T>(rows: &[AnyRow], f: fn(&AnyRow) -> Result<T, sqlx::Error>) -> StoreResult<Vec<T>> {
    rows.iter()
        .map(f)
        .collect::<Result<_, _>>()
        .map_err(unavailable)
}

/// `text` as a `LIKE` pattern matching it anywhere, with `%`, `_` and `\` taken literally.
fn contains_pattern(text: &str) -> String {
    let mut p = String::from("%");
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

const REPORT_COLS: &str = "token_hash, user_id, device_id, created_at, expires_at, used_at";

fn device_from(r: &AnyRow) -> Result<Device, sqlx::Error> {
    Ok(Device {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        token_hash: r.try_get("token_hash")?,
        name: r.try_get("name")?,
        user_agent: r.try_get("user_agent")?,
        binding: r.try_get("binding")?,
        status: r.try_get("status")?,
        first_seen: r.try_get("first_seen")?,
        last_seen: r.try_get("last_seen")?,
        last_ip: r.try_get("last_ip")?,
        remembered_until: r.try_get("remembered_until")?,
        remember_key: r.try_get("remember_key")?,
    })
}

fn mail_from(r: &AnyRow) -> Result<Mail, sqlx::Error> {
    Ok(Mail {
        id: r.try_get("id")?,
        to_addr: r.try_get("to_addr")?,
        subject: r.try_get("subject")?,
        body: r.try_get("body")?,
        created_at: r.try_get("created_at")?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        sent_at: r.try_get("sent_at")?,
        last_error: r.try_get("last_error")?,
    })
}

fn report_from(r: &AnyRow) -> Result<ReportLink, sqlx::Error> {
    Ok(ReportLink {
        token_hash: r.try_get("token_hash")?,
        user_id: r.try_get("user_id")?,
        device_id: r.try_get("device_id")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        used_at: r.try_get("used_at")?,
    })
}

/// The statement that stores a signing key.
/// A write to the user's row, first in a transaction that replaces or counts the user's
/// factors: PostgreSQL locks the row until the transaction ends and SQLite takes its write lock,
/// so a second such change for the same user waits here and then sees what this one did.
async fn lock_user(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    user_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE users SET created_at = created_at WHERE id = $1")
        .bind(user_id)
        .execute(&mut **tx)
        .await
        .map(drop)
}

fn insert_key(
    key: &SigningKeyRecord,
) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(
        "INSERT INTO signing_keys (kid, alg, public_jwk, private_sealed, created_at, retire_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&key.kid)
    .bind(&key.alg)
    .bind(&key.public_jwk)
    .bind(&key.private_sealed)
    .bind(key.created_at)
    .bind(key.retire_at)
}

/// Maps every row, or the first row that does not fit.
fn all<T>(rows: &[AnyRow], f: fn(&AnyRow) -> Result<T, sqlx::Error>) -> StoreResult<Vec<T>> {
    rows.iter()
        .map(f)
        .collect::<Result<_, _>>()
        .map_err(unavailable)
}

#[async_trait]
impl DurableStore for SqlStore {
    async fn migrate(&self) -> StoreResult<()> {
        let m = self.migrator();
        // Up to date: nothing to run, and nothing asked of the role but to read the record (the
        // migrator's first step creates that table if missing, which PostgreSQL checks against
        // the schema's CREATE privilege even where the table exists).
        if self.applied_all(m).await {
            return Ok(());
        }
        let busy = |e: &sqlx::migrate::MigrateError| matches!(e, sqlx::migrate::MigrateError::Execute(e) if is_busy(e));
        retry_busy(self.sqlite, busy, || m.run(&self.pool))
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn close(&self) {
        if self.sqlite {
            // Everything the log holds goes into the file, and the log is emptied; where another
            // process has the file open, what it still reads is left (SQLite folds that in when
            // the last connection closes).
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await
            {
                tracing::warn!(error = %e, "cannot fold the SQLite write-ahead log into the database file");
            }
        }
        // Closing waits for connections in use to come back: a query stuck on a database that
        // stopped answering must not hold the process's exit.
        if tokio::time::timeout(CLOSE_WAIT, self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!("database connections still in use at exit; closing without them");
        }
    }

    async fn server_time_ms(&self) -> StoreResult<Option<i64>> {
        if self.sqlite {
            return Ok(None);
        }
        let ms: i64 = sqlx::query_scalar(
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(Some(ms))
    }

    async fn create_user(&self, new: NewUser, now: UnixTime) -> StoreResult<User> {
        let password_less = new.password_hash.is_empty();
        let user = User {
            id: uuid::Uuid::new_v4().to_string(),
            email: super::normalise_email(&new.email),
            account_id: new.account_id,
            is_admin: new.is_admin,
            disabled: false,
            locked: false,
            password_hash: new.password_hash,
            created_at: now,
            sessions_valid_after_ms: 0,
            // Without a password (set later through an enrolment link), the first factor too
            // comes through a link only ([`User::enrols_after_password`]).
            factors_reset_at: password_less.then_some(now),
        };
        let (pool, u) = (&self.pool, &user);
        self.retrying(move || async move {
            sqlx::query(
                "INSERT INTO users (id, email, account_id, is_admin, disabled, password_hash, created_at, sessions_valid_after_ms, factors_reset_at) \
                 VALUES ($1, $2, $3, $4, 0, $5, $6, 0, $7)",
            )
            .bind(&u.id)
            .bind(&u.email)
            .bind(&u.account_id)
            .bind(i64::from(u.is_admin))
            .bind(&u.password_hash)
            .bind(now)
            .bind(u.factors_reset_at)
            .execute(pool)
            .await
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => StoreError::Conflict(format!("a user with email {} exists", user.email)),
            other => other,
        })?;
        Ok(user)
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
        let pool = &self.pool;
        let row = self
            .retrying(move || async move {
                sqlx::query(&format!("SELECT {USER_COLS} FROM users WHERE email = $1"))
                    .bind(super::normalise_email(email))
                    .fetch_optional(pool)
                    .await
            })
            .await?;
        row.as_ref().map(user_from).transpose().map_err(unavailable)
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>> {
        let pool = &self.pool;
        let row = self
            .retrying(move || async move {
                sqlx::query(&format!("SELECT {USER_COLS} FROM users WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(pool)
                    .await
            })
            .await?;
        row.as_ref().map(user_from).transpose().map_err(unavailable)
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        let pool = &self.pool;
        let rows = self
            .retrying(move || async move {
                sqlx::query(&format!("SELECT {USER_COLS} FROM users ORDER BY email"))
                    .fetch_all(pool)
                    .await
            })
            .await?;
        rows.iter()
            .map(user_from)
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn search_users(&self, text: &str, limit: u32) -> StoreResult<Vec<User>> {
        let text = text.trim().to_lowercase();
        let pattern = contains_pattern(&text);
        let found = self
            .fetch(
                &format!(
                    "SELECT {USER_COLS} FROM users WHERE $1 = '' OR LOWER(email) LIKE $2 ESCAPE '\\' \
                     OR id = $1 OR LOWER(account_id) = $1 ORDER BY email LIMIT $3"
                ),
                &[
                    Arg::Text(&text),
                    Arg::Text(&pattern),
                    Arg::Int(i64::from(limit.clamp(1, 10_000))),
                ],
            )
            .await?;
        rows(&found, user_from)
    }

    async fn locked_users(&self, limit: u32) -> StoreResult<Vec<User>> {
        let found = self
            .fetch(
                &format!("SELECT {USER_COLS} FROM users WHERE locked <> 0 ORDER BY email LIMIT $1"),
                &[Arg::Int(i64::from(limit.clamp(1, 10_000)))],
            )
            .await?;
        rows(&found, user_from)
    }

    async fn count_users(&self) -> StoreResult<i64> {
        let found = self.fetch("SELECT COUNT(*) AS n FROM users", &[]).await?;
        let n = found
            .first()
            .map(|r| r.try_get::<i64, _>("n"))
            .transpose()
            .map_err(unavailable)?;
        Ok(n.unwrap_or(0))
    }

    async fn set_admin(&self, user_id: &str, is_admin: bool) -> StoreResult<()> {
        self.change(
            "UPDATE users SET is_admin = $1 WHERE id = $2",
            &[Arg::Int(i64::from(is_admin)), Arg::Text(user_id)],
        )
        .await?;
        Ok(())
    }

    async fn set_password_hash(&self, user_id: &str, hash: &str) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
                .bind(hash)
                .bind(user_id)
                .execute(pool)
                .await
        })
        .await?;
        Ok(())
    }

    async fn set_disabled(&self, user_id: &str, disabled: bool, now_ms: i64) -> StoreResult<()> {
        let q = if disabled {
            "UPDATE users SET disabled = 1, sessions_valid_after_ms = $1 WHERE id = $2"
        } else {
            "UPDATE users SET disabled = 0 WHERE id = $2 AND $1 = $1"
        };
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query(q)
                .bind(now_ms)
                .bind(user_id)
                .execute(pool)
                .await
        })
        .await?;
        Ok(())
    }

    async fn void_sessions(&self, user_id: &str, at_ms: i64) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query("UPDATE users SET sessions_valid_after_ms = $1 WHERE id = $2")
                .bind(at_ms)
                .bind(user_id)
                .execute(pool)
                .await
        })
        .await?;
        Ok(())
    }

    async fn totp(&self, user_id: &str) -> StoreResult<Option<TotpRecord>> {
        self.one_totp("WHERE user_id = $1", Some(user_id)).await
    }

    async fn oldest_totp(&self) -> StoreResult<Option<TotpRecord>> {
        self.one_totp("ORDER BY created_at, user_id LIMIT 1", None)
            .await
    }

    async fn set_totp(&self, record: TotpRecord) -> StoreResult<()> {
        let (pool, record) = (&self.pool, &record);
        self.retrying(move || async move { sqlx::query(
            "INSERT INTO totp_credentials (user_id, secret_sealed, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET secret_sealed = excluded.secret_sealed, created_at = excluded.created_at",
        )
        .bind(&record.user_id)
        .bind(&record.secret_sealed)
        .bind(record.created_at)
        .execute(pool)
        .await })
            .await?;
        Ok(())
    }

    async fn reset_second_factors(&self, user_id: &str, now: UnixTime) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE users SET factors_reset_at = $1 WHERE id = $2")
                .bind(now)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM totp_credentials WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM webauthn_credentials WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            // A remembered device stands in for a second factor: it goes with them.
            sqlx::query(
                "UPDATE devices SET remembered_until = NULL, remember_key = NULL WHERE user_id = $1",
            )
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
            // So do enrolment links not used yet (one may have leaked): the next one issued is
            // the way back.
            sqlx::query(
                "UPDATE enrolment_links SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL",
            )
            .bind(now)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })
        .await
    }

    async fn drop_factors_since(
        &self,
        user_id: &str,
        since: UnixTime,
        now: UnixTime,
    ) -> StoreResult<DroppedFactors> {
        let pool = &self.pool;
        self.retrying(move || async move {
            let mut tx = pool.begin().await?;
            let mut removed = [0u64; 2];
            for (n, table) in ["totp_credentials", "recovery_codes"].iter().enumerate() {
                removed[n] = sqlx::query(&format!(
                    "DELETE FROM {table} WHERE user_id = $1 AND created_at >= $2"
                ))
                .bind(user_id)
                .bind(since)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            let [totp, recovery_codes] = removed;
            let totp = totp > 0;
            if totp || recovery_codes > 0 {
                sqlx::query("UPDATE users SET factors_reset_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(DroppedFactors {
                totp,
                recovery_codes,
            })
        })
        .await
    }

    async fn add_webauthn_credential(&self, c: &WebauthnCredential) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query(&format!(
                "INSERT INTO webauthn_credentials ({WEBAUTHN_COLS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ))
            .bind(&c.id)
            .bind(&c.user_id)
            .bind(&c.credential_id)
            .bind(&c.passkey)
            .bind(&c.name)
            .bind(&c.aaguid)
            .bind(c.sign_count)
            .bind(c.created_at)
            .bind(c.last_used_at)
            .bind(c.suspended_at)
            .bind(&c.suspended_reason)
            .execute(pool)
            .await
        })
        .await?;
        Ok(())
    }

    async fn webauthn_credentials(&self, user_id: &str) -> StoreResult<Vec<WebauthnCredential>> {
        let rows = sqlx::query(&format!(
            "SELECT {WEBAUTHN_COLS} FROM webauthn_credentials WHERE user_id = $1 \
             ORDER BY created_at, id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(webauthn_from)
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn webauthn_credential(
        &self,
        credential_id: &str,
    ) -> StoreResult<Option<WebauthnCredential>> {
        let row = sqlx::query(&format!(
            "SELECT {WEBAUTHN_COLS} FROM webauthn_credentials WHERE credential_id = $1"
        ))
        .bind(credential_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref()
            .map(webauthn_from)
            .transpose()
            .map_err(unavailable)
    }

    async fn record_webauthn_use(
        &self,
        id: &str,
        passkey: &str,
        sign_count: i64,
        now: UnixTime,
    ) -> StoreResult<bool> {
        let changed = self
            .change(
                "UPDATE webauthn_credentials SET passkey = $1, sign_count = $2, last_used_at = $3 \
                 WHERE id = $4 AND suspended_at IS NULL \
                 AND (sign_count < $2 OR (sign_count = 0 AND $2 = 0))",
                &[
                    Arg::Text(passkey),
                    Arg::Int(sign_count),
                    Arg::Int(now),
                    Arg::Text(id),
                ],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn suspend_webauthn_credential(
        &self,
        id: &str,
        reason: &str,
        now: UnixTime,
    ) -> StoreResult<()> {
        self.change(
            "UPDATE webauthn_credentials SET suspended_at = $1, suspended_reason = $2 \
             WHERE id = $3 AND suspended_at IS NULL",
            &[Arg::Int(now), Arg::Text(reason), Arg::Text(id)],
        )
        .await?;
        Ok(())
    }

    async fn rename_webauthn_credential(
        &self,
        user_id: &str,
        id: &str,
        name: &str,
    ) -> StoreResult<bool> {
        let changed = self
            .change(
                "UPDATE webauthn_credentials SET name = $1 WHERE id = $2 AND user_id = $3",
                &[Arg::Text(name), Arg::Text(id), Arg::Text(user_id)],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn remove_webauthn_credential(
        &self,
        user_id: &str,
        id: &str,
        codes_count: bool,
        now: UnixTime,
    ) -> StoreResult<KeyRemoval> {
        let pool = &self.pool;
        self.retrying(move || async move {
            let mut tx = pool.begin().await?;
            lock_user(&mut tx, user_id).await?;
            let removed = sqlx::query(
                "DELETE FROM webauthn_credentials WHERE id = $1 AND user_id = $2 AND ( \
                   suspended_at IS NOT NULL \
                   OR EXISTS (SELECT 1 FROM webauthn_credentials \
                              WHERE user_id = $2 AND id <> $1 AND suspended_at IS NULL) \
                   OR ($3 = 1 AND EXISTS (SELECT 1 FROM totp_credentials WHERE user_id = $2)))",
            )
            .bind(id)
            .bind(user_id)
            .bind(i64::from(codes_count))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let outcome = if removed == 1 {
                // With no key and no app left (a suspended key removed), the password alone must
                // not set up a factor: the account enrols again through a link.
                let left = sqlx::query(
                    "UPDATE users SET factors_reset_at = COALESCE(factors_reset_at, $1) \
                     WHERE id = $2 \
                     AND NOT EXISTS (SELECT 1 FROM webauthn_credentials WHERE user_id = $2) \
                     AND NOT EXISTS (SELECT 1 FROM totp_credentials WHERE user_id = $2)",
                )
                .bind(now)
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if left == 0 {
                    KeyRemoval::Removed
                } else {
                    // Its recovery codes went with the factors they stood in for: the next
                    // factor comes with new ones.
                    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
                        .bind(user_id)
                        .execute(&mut *tx)
                        .await?;
                    KeyRemoval::RemovedLastFactor
                }
            } else {
                let found = sqlx::query(
                    "SELECT 1 FROM webauthn_credentials WHERE id = $1 AND user_id = $2",
                )
                .bind(id)
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
                if found.is_some() {
                    KeyRemoval::LastFactor
                } else {
                    KeyRemoval::NotFound
                }
            };
            tx.commit().await?;
            Ok(outcome)
        })
        .await
    }

    async fn restore_webauthn_credential(&self, user_id: &str, id: &str) -> StoreResult<bool> {
        let changed = self
            .change(
                "UPDATE webauthn_credentials SET suspended_at = NULL, suspended_reason = NULL \
                 WHERE id = $1 AND user_id = $2 AND suspended_at IS NOT NULL",
                &[Arg::Text(id), Arg::Text(user_id)],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn suspended_webauthn_credentials(&self) -> StoreResult<Vec<WebauthnCredential>> {
        let found = self
            .fetch(
                &format!(
                    "SELECT {WEBAUTHN_COLS} FROM webauthn_credentials \
                     WHERE suspended_at IS NOT NULL ORDER BY suspended_at DESC, id"
                ),
                &[],
            )
            .await?;
        rows(&found, webauthn_from)
    }

    async fn set_recovery_codes(
        &self,
        user_id: &str,
        hashes: &[String],
        now: UnixTime,
    ) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            let mut tx = pool.begin().await?;
            // Two new sets at once would otherwise both be kept on PostgreSQL: each deletes the
            // rows it saw, not the other's new ones.
            lock_user(&mut tx, user_id).await?;
            sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            for h in hashes {
                sqlx::query(
                "INSERT INTO recovery_codes (user_id, code_hash, created_at) VALUES ($1, $2, $3)",
            )
            .bind(user_id)
            .bind(h)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            }
            tx.commit().await
        })
        .await
    }

    async fn consume_recovery_code(
        &self,
        user_id: &str,
        hash: &str,
        now: UnixTime,
    ) -> StoreResult<bool> {
        let pool = &self.pool;
        let done = self.retrying(move || async move { sqlx::query(
            "UPDATE recovery_codes SET used_at = $1 WHERE user_id = $2 AND code_hash = $3 AND used_at IS NULL",
        )
        .bind(now)
        .bind(user_id)
        .bind(hash)
        .execute(pool)
        .await })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn recovery_codes_left(&self, user_id: &str) -> StoreResult<u32> {
        let pool = &self.pool;
        let n: i64 = self
            .retrying(move || async move {
                sqlx::query(
                    "SELECT COUNT(*) AS n FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL",
                )
                .bind(user_id)
                .fetch_one(pool)
                .await
                .and_then(|r| r.try_get("n"))
            })
            .await?;
        Ok(u32::try_from(n).unwrap_or(0))
    }

    async fn insert_signing_key(&self, key: SigningKeyRecord) -> StoreResult<()> {
        let (pool, key) = (&self.pool, &key);
        self.retrying(move || async move { insert_key(key).execute(pool).await })
            .await?;
        Ok(())
    }

    async fn insert_first_signing_key(&self, key: SigningKeyRecord) -> StoreResult<bool> {
        let (pool, key, sqlite) = (&self.pool, &key, self.sqlite);
        self.retrying(move || async move {
            let mut tx = pool.begin().await?;
            // Take the writer's lock before looking, so two gateways cannot both see "none".
            let lock = if sqlite {
                "UPDATE signing_keys SET kid = kid WHERE retire_at IS NULL AND kid = ''"
            } else {
                "SELECT pg_advisory_xact_lock(7260151)"
            };
            sqlx::query(lock).execute(&mut *tx).await?;
            let current: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM signing_keys WHERE retire_at IS NULL")
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("n")?;
            if current > 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            insert_key(key).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    async fn retire_signing_keys_except(
        &self,
        keep_kid: &str,
        retire_at: UnixTime,
    ) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query(
                "UPDATE signing_keys SET retire_at = $1 WHERE kid <> $2 AND retire_at IS NULL",
            )
            .bind(retire_at)
            .bind(keep_kid)
            .execute(pool)
            .await
        })
        .await?;
        Ok(())
    }

    async fn live_signing_keys(&self, now: UnixTime) -> StoreResult<Vec<SigningKeyRecord>> {
        let pool = &self.pool;
        let rows = self
            .retrying(move || async move {
                sqlx::query(
            "SELECT kid, alg, public_jwk, private_sealed, created_at, retire_at FROM signing_keys \
             WHERE retire_at IS NULL OR retire_at > $1 ORDER BY created_at DESC, kid DESC",
        )
        .bind(now)
        .fetch_all(pool).await
            })
            .await?;
        rows.iter()
            .map(key_from)
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> StoreResult<()> {
        let (pool, sqlite) = (&self.pool, self.sqlite);
        self.retrying(move || async move {
            let mut tx = pool.begin().await?;
            // One statement per chunk of rows rather than one per row: every statement is a
            // round trip to the database (or to SQLite's worker thread), and a flood of refused
            // sign-ins audits thousands of events a second.
            for chunk in audit_chunks(events) {
                let sql = audit_insert_sql(chunk.len(), sqlite);
                let mut q = sqlx::query(&sql);
                for e in chunk {
                    q = q
                        .bind(e.at)
                        .bind(&e.event)
                        .bind(&e.outcome)
                        .bind(&e.user_id)
                        .bind(&e.email)
                        .bind(&e.account_id)
                        .bind(&e.ip)
                        .bind(&e.user_agent)
                        .bind(&e.reason)
                        .bind(&e.actor)
                        .bind(e.times);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await
        })
        .await
    }

    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditEvent>> {
        let order = if q.newest_first { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT id, at, event, outcome, user_id, email, account_id, ip, user_agent, reason, actor, times FROM audit_events \
             WHERE ($1 = '' OR user_id = $1) AND ($2 = '' OR event = $2) AND id > $3 \
             AND ($5 = '' OR account_id = $5) AND at >= $6 AND at < $7 AND ($8 = '' OR email = $8) \
             ORDER BY id {order} LIMIT $4"
        );
        let found = self
            .fetch(
                &sql,
                &[
                    Arg::Text(q.user_id.as_deref().unwrap_or_default()),
                    Arg::Text(q.event.as_deref().unwrap_or_default()),
                    Arg::Int(q.after_id.unwrap_or(0)),
                    Arg::Int(i64::from(q.limit.clamp(1, 10_000))),
                    Arg::Text(q.account_id.as_deref().unwrap_or_default()),
                    Arg::Int(q.since.unwrap_or(i64::MIN)),
                    Arg::Int(q.until.unwrap_or(i64::MAX)),
                    Arg::Text(q.email.as_deref().unwrap_or_default()),
                ],
            )
            .await?;
        rows(&found, audit_from)
    }

    async fn audit_counts(
        &self,
        since: UnixTime,
        bucket_secs: i64,
    ) -> StoreResult<Vec<AuditCount>> {
        let width = bucket_secs.max(1);
        let found = self
            .fetch(
                "SELECT (at / $2) * $2 AS bucket, event, outcome, CAST(SUM(times) AS BIGINT) AS n FROM audit_events \
                 WHERE at >= $1 GROUP BY (at / $2) * $2, event, outcome ORDER BY bucket",
                &[Arg::Int(since), Arg::Int(width)],
            )
            .await?;
        rows(&found, |r| {
            Ok(AuditCount {
                bucket: r.try_get("bucket")?,
                event: r.try_get("event")?,
                outcome: r.try_get("outcome")?,
                count: r.try_get("n")?,
            })
        })
    }

    async fn prune_audit(&self, before: UnixTime, limit: u32) -> StoreResult<u64> {
        // Through the index on `at`; a subquery because neither SQLite (as built by sqlx) nor
        // PostgreSQL takes a LIMIT on DELETE itself.
        self.change(
            "DELETE FROM audit_events WHERE id IN \
             (SELECT id FROM audit_events WHERE at < $1 LIMIT $2)",
            &[Arg::Int(before), Arg::Int(i64::from(limit.max(1)))],
        )
        .await
    }

    async fn audit_events_before(&self, before: UnixTime) -> StoreResult<u64> {
        let pool = &self.pool;
        let n: i64 = self
            .retrying(move || async move {
                sqlx::query("SELECT COUNT(*) AS n FROM audit_events WHERE at < $1")
                    .bind(before)
                    .fetch_one(pool)
                    .await
                    .and_then(|r| r.try_get("n"))
            })
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn set_locked(&self, user_id: &str, locked: bool) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query("UPDATE users SET locked = $1 WHERE id = $2")
                .bind(i64::from(locked))
                .bind(user_id)
                .execute(pool)
                .await
        })
        .await?;
        Ok(())
    }

    async fn create_device(&self, device: Device) -> StoreResult<()> {
        let (pool, d) = (&self.pool, &device);
        self.retrying(move || async move {
            sqlx::query(&format!(
                "INSERT INTO devices ({DEVICE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ))
            .bind(&d.id)
            .bind(&d.user_id)
            .bind(&d.token_hash)
            .bind(&d.name)
            .bind(&d.user_agent)
            .bind(&d.binding)
            .bind(&d.status)
            .bind(d.first_seen)
            .bind(d.last_seen)
            .bind(&d.last_ip)
            .execute(pool)
            .await
        })
        .await?;
        Ok(())
    }

    async fn device_by_token(&self, token_hash: &str) -> StoreResult<Option<Device>> {
        let pool = &self.pool;
        let row = self
            .retrying(move || async move {
                sqlx::query(&format!(
                    "SELECT {DEVICE_COLS}, remembered_until, remember_key FROM devices WHERE token_hash = $1"
                ))
                .bind(token_hash)
                .fetch_optional(pool)
                .await
            })
            .await?;
        row.as_ref()
            .map(device_from)
            .transpose()
            .map_err(unavailable)
    }

    async fn touch_device(&self, id: &str, now: UnixTime, ip: &str) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query("UPDATE devices SET last_seen = $1, last_ip = $2 WHERE id = $3")
                .bind(now)
                .bind(ip)
                .bind(id)
                .execute(pool)
                .await
        })
        .await?;
        Ok(())
    }

    async fn list_devices(&self, user_id: &str) -> StoreResult<Vec<Device>> {
        let pool = &self.pool;
        let rows = self
            .retrying(move || async move {
                sqlx::query(&format!(
            "SELECT {DEVICE_COLS}, remembered_until, remember_key FROM devices WHERE user_id = $1 ORDER BY last_seen DESC, id"
        ))
                .bind(user_id)
                .fetch_all(pool)
                .await
            })
            .await?;
        all(&rows, device_from)
    }

    async fn remember_device(
        &self,
        id: &str,
        key: Option<&str>,
        until: Option<UnixTime>,
    ) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query("UPDATE devices SET remember_key = $1, remembered_until = $2 WHERE id = $3")
                .bind(key)
                .bind(until)
                .bind(id)
                .execute(pool)
                .await
        })
        .await?;
        Ok(())
    }

    async fn set_device_binding(&self, id: &str, binding: &str) -> StoreResult<()> {
        self.change(
            "UPDATE devices SET binding = $1 WHERE id = $2",
            &[Arg::Text(binding), Arg::Text(id)],
        )
        .await?;
        Ok(())
    }

    async fn risk_history(&self, user_id: &str) -> StoreResult<Option<String>> {
        let rows = self
            .fetch(
                "SELECT body FROM risk_history WHERE user_id = $1",
                &[Arg::Text(user_id)],
            )
            .await?;
        rows.first()
            .map(|r| r.try_get("body"))
            .transpose()
            .map_err(unavailable)
    }

    async fn meta(&self, name: &str) -> StoreResult<Option<String>> {
        let rows = self
            .fetch("SELECT value FROM meta WHERE name = $1", &[Arg::Text(name)])
            .await?;
        rows.first()
            .map(|r| r.try_get("value"))
            .transpose()
            .map_err(unavailable)
    }

    async fn set_meta_if_absent(&self, name: &str, value: &str) -> StoreResult<bool> {
        let n = self
            .change(
                "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[Arg::Text(name), Arg::Text(value)],
            )
            .await?;
        Ok(n == 1)
    }

    async fn set_risk_history(&self, user_id: &str, body: &str, now: UnixTime) -> StoreResult<()> {
        self.change(
            "INSERT INTO risk_history (user_id, body, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            &[Arg::Text(user_id), Arg::Text(body), Arg::Int(now)],
        )
        .await?;
        Ok(())
    }

    async fn revoke_device(&self, id: &str) -> StoreResult<bool> {
        let pool = &self.pool;
        let done = self
            .retrying(move || async move {
                sqlx::query(
                    "UPDATE devices SET status = 'revoked' WHERE id = $1 AND status = 'active'",
                )
                .bind(id)
                .execute(pool)
                .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn enqueue_mail(&self, mail: Mail) -> StoreResult<()> {
        let (pool, m) = (&self.pool, &mail);
        self.retrying(move || async move {
            sqlx::query(&format!(
                "INSERT INTO mail_queue ({MAIL_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ))
            .bind(&m.id)
            .bind(&m.to_addr)
            .bind(&m.subject)
            .bind(&m.body)
            .bind(m.created_at)
            .bind(m.attempts)
            .bind(m.next_attempt_at)
            .bind(m.sent_at)
            .bind(&m.last_error)
            .execute(pool)
            .await
        })
        .await?;
        Ok(())
    }

    async fn claim_due_mail(
        &self,
        now: UnixTime,
        lease_until: UnixTime,
        limit: u32,
    ) -> StoreResult<Vec<Mail>> {
        let pool = &self.pool;
        let rows = self
            .retrying(move || async move {
                sqlx::query(&format!(
            "SELECT {MAIL_COLS} FROM mail_queue WHERE sent_at IS NULL AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at, created_at LIMIT $2"
        ))
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
            })
            .await?;
        let mut claimed = Vec::new();
        for mut mail in all(&rows, mail_from)? {
            let (pool, m) = (&self.pool, &mail);
            // Only the gateway whose update still sees the old due time has the mail.
            let done = self
                .retrying(move || async move {
                    sqlx::query(
                        "UPDATE mail_queue SET next_attempt_at = $1 \
                         WHERE id = $2 AND next_attempt_at = $3 AND sent_at IS NULL",
                    )
                    .bind(lease_until)
                    .bind(&m.id)
                    .bind(m.next_attempt_at)
                    .execute(pool)
                    .await
                })
                .await?;
            if done.rows_affected() == 1 {
                mail.next_attempt_at = lease_until;
                claimed.push(mail);
            }
        }
        Ok(claimed)
    }

    async fn mail_sent(&self, id: &str, now: UnixTime) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query(
                // The body goes once it has gone out: it holds a live single-use link (a "this
                // wasn't me" link, an enrolment link) that a copy of the database would give away.
                "UPDATE mail_queue SET sent_at = $1, attempts = attempts + 1, last_error = NULL, \
                 body = '' WHERE id = $2",
            )
            .bind(now)
            .bind(id)
            .execute(pool)
            .await
        })
        .await?;
        Ok(())
    }

    async fn mail_failed(
        &self,
        id: &str,
        error: &str,
        next_attempt_at: UnixTime,
    ) -> StoreResult<()> {
        let pool = &self.pool;
        self.retrying(move || async move {
            sqlx::query(
                "UPDATE mail_queue SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2 \
                 WHERE id = $3",
            )
            .bind(error)
            .bind(next_attempt_at)
            .bind(id)
            .execute(pool)
            .await
        })
        .await?;
        Ok(())
    }

    async fn list_mail(&self, limit: u32) -> StoreResult<Vec<Mail>> {
        let pool = &self.pool;
        let rows = self
            .retrying(move || async move {
                sqlx::query(&format!(
                    "SELECT {MAIL_COLS} FROM mail_queue ORDER BY created_at, id LIMIT $1"
                ))
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
            })
            .await?;
        all(&rows, mail_from)
    }

    async fn create_report_link(&self, link: ReportLink) -> StoreResult<()> {
        let (pool, l) = (&self.pool, &link);
        self.retrying(move || async move {
            sqlx::query(&format!(
                "INSERT INTO report_links ({REPORT_COLS}) VALUES ($1, $2, $3, $4, $5, $6)"
            ))
            .bind(&l.token_hash)
            .bind(&l.user_id)
            .bind(&l.device_id)
            .bind(l.created_at)
            .bind(l.expires_at)
            .bind(l.used_at)
            .execute(pool)
            .await
        })
        .await?;
        Ok(())
    }

    async fn create_enrolment_link(&self, link: EnrolmentLink) -> StoreResult<()> {
        let pool = &self.pool;
        let link = &link;
        self.retrying(move || async move {
            let mut tx = pool.begin().await?;
            // The user's earlier links, if still unused, are superseded (marked used at this
            // moment) in the same transaction: a link that leaked or went to the wrong place
            // ends with the next one issued.
            sqlx::query(
                "UPDATE enrolment_links SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL",
            )
            .bind(link.created_at)
            .bind(&link.user_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "INSERT INTO enrolment_links ({ENROL_COLS}) VALUES ($1, $2, $3, $4, $5, $6, NULL)"
            ))
            .bind(&link.token_hash)
            .bind(&link.user_id)
            .bind(&link.created_by)
            .bind(i64::from(link.key_only))
            .bind(link.created_at)
            .bind(link.expires_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })
        .await
    }

    async fn enrolment_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<EnrolmentLink>> {
        let found = self
            .fetch(
                &format!(
                    "SELECT {ENROL_COLS} FROM enrolment_links \
                     WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2"
                ),
                &[Arg::Text(token_hash), Arg::Int(now)],
            )
            .await?;
        Ok(rows(&found, enrolment_from)?.pop())
    }

    async fn consume_enrolment_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<EnrolmentLink>> {
        let found = self
            .fetch(
                &format!(
                    "UPDATE enrolment_links SET used_at = $1 \
                     WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 \
                     RETURNING {ENROL_COLS}"
                ),
                &[Arg::Int(now), Arg::Text(token_hash)],
            )
            .await?;
        Ok(rows(&found, enrolment_from)?.pop())
    }

    async fn report_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<ReportLink>> {
        let found = self
            .fetch(
                &format!(
                    "SELECT {REPORT_COLS} FROM report_links \
                     WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2"
                ),
                &[Arg::Text(token_hash), Arg::Int(now)],
            )
            .await?;
        Ok(rows(&found, report_from)?.pop())
    }

    async fn consume_report_link(
        &self,
        token_hash: &str,
        now: UnixTime,
    ) -> StoreResult<Option<ReportLink>> {
        let pool = &self.pool;
        let row = self
            .retrying(move || async move {
                sqlx::query(&format!(
                    "UPDATE report_links SET used_at = $1 \
                     WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 \
                     RETURNING {REPORT_COLS}"
                ))
                .bind(now)
                .bind(token_hash)
                .fetch_optional(pool)
                .await
            })
            .await?;
        row.as_ref()
            .map(report_from)
            .transpose()
            .map_err(unavailable)
    }
}

/// What to do about a role lacking privileges on `missing` (tables and sequences).
pub fn missing_privileges_message(missing: &[String]) -> String {
    format!(
        "storage.durable: the database role may not read and write the gateway's {}, so \
         sign-ins would fail: GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA \
         public and USAGE ON ALL SEQUENCES IN SCHEMA public to the role (SELECT on \
         _sqlx_migrations is enough)",
        missing.join(", ")
    )
}

/// The tables the migrations create, which the gateway reads and writes.
const GATEWAY_TABLES: [&str; 12] = [
    "users",
    "totp_credentials",
    "recovery_codes",
    "signing_keys",
    "audit_events",
    "webauthn_credentials",
    "devices",
    "mail_queue",
    "report_links",
    "enrolment_links",
    "risk_history",
    "meta",
];

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
impl SqlStore {
    /// Whether the gateway's tables exist here (a new database has none until the first
    /// `serve` or CLI command sets them up).
    pub async fn is_set_up(&self) -> StoreResult<bool> {
        // (The catalog, not `information_schema`, which hides tables the role has no
        // privilege on: those are there, and named by `missing_privileges`.)
        let sql = if self.sqlite {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'signing_keys'"
        } else {
            "SELECT COUNT(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'signing_keys' AND c.relkind = 'r' AND n.nspname = current_schema()"
        };
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(n > 0)
    }

    /// This database's migrations.
    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        if self.sqlite {
            &SQLITE_MIGRATIONS
        } else {
            &POSTGRES_MIGRATIONS
        }
    }

    /// Whether every migration of this build has been applied here, successfully and as
    /// written (the record's checksums): false where the record cannot be read.
    async fn applied_all(&self, m: &sqlx::migrate::Migrator) -> bool {
        let Ok(rows) = sqlx::query("SELECT version, checksum, success FROM _sqlx_migrations")
            .fetch_all(&self.pool)
            .await
        else {
            return false;
        };
        let mut applied = std::collections::HashMap::new();
        for row in &rows {
            let (Ok(version), Ok(checksum), Ok(success)) = (
                row.try_get::<i64, _>(0),
                row.try_get::<Vec<u8>, _>(1),
                row.try_get::<bool, _>(2),
            ) else {
                return false;
            };
            if !success {
                return false;
            }
            applied.insert(version, checksum);
        }
        m.iter()
            .filter(|x| x.migration_type.is_up_migration())
            .all(|x| applied.get(&x.version) == Some(&x.checksum.to_vec()))
    }

    /// Whether the database is set up for this build of the gateway: every migration applied.
    pub async fn is_current(&self) -> bool {
        self.applied_all(self.migrator()).await
    }

    /// The gateway's tables (and sequences) the connecting role may not read and write as
    /// the gateway does, on PostgreSQL (none on SQLite: a file that opened can be written).
    pub async fn missing_privileges(&self) -> StoreResult<Vec<String>> {
        if self.sqlite {
            return Ok(Vec::new());
        }
        let tables = GATEWAY_TABLES
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        // (`has_table_privilege` with several privileges is true where any one is held.)
        sqlx::query_scalar::<_, String>(&format!(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND ( \
               (c.relkind = 'r' AND c.relname IN ({tables}) \
                 AND NOT (has_table_privilege(c.oid, 'SELECT') \
                   AND has_table_privilege(c.oid, 'INSERT') \
                   AND has_table_privilege(c.oid, 'UPDATE') \
                   AND has_table_privilege(c.oid, 'DELETE'))) \
               OR (c.relkind = 'r' AND c.relname = '_sqlx_migrations' \
                 AND NOT has_table_privilege(c.oid, 'SELECT')) \
               OR (c.relkind = 'S' AND NOT has_sequence_privilege(c.oid, 'USAGE'))) \
             ORDER BY 1"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)
    }

    /// Whether the gateway's first start could create its tables here: on PostgreSQL, the
    /// connecting role may create in its current schema (PostgreSQL 15 grants that on `public`
    /// to the database's owner alone); a SQLite file that opened can be written.
    pub async fn can_set_up(&self) -> StoreResult<bool> {
        if self.sqlite {
            return Ok(true);
        }
        sqlx::query_scalar::<_, bool>(
            "SELECT COALESCE(has_schema_privilege(current_schema(), 'CREATE'), false)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn audit_batches_are_cut_into_five_statement_sizes() {
        let events: Vec<AuditEvent> = (0..1000)
            .map(|i| AuditEvent::new("e", "success", i))
            .collect();
        let mut shapes = std::collections::BTreeSet::new();
        for n in 0..=events.len() {
            let chunks: Vec<&[AuditEvent]> = audit_chunks(&events[..n]).collect();
            let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
            let joined: Vec<i64> = chunks.iter().flat_map(|c| c.iter().map(|e| e.at)).collect();
            assert_eq!(joined, (0..n as i64).collect::<Vec<_>>());
            shapes.extend(sizes);
        }
        assert_eq!(shapes.into_iter().collect::<Vec<_>>(), [1, 4, 16, 64, 256]);
        assert_eq!(
            audit_chunks(&events[..37])
                .map(<[_]>::len)
                .collect::<Vec<_>>(),
            [16, 16, 4, 1]
        );
    }

    #[test]
    fn the_privilege_check_names_every_table_the_migrations_create() {
        let mut created = std::collections::BTreeSet::new();
        for dir in ["migrations/postgres", "migrations/sqlite"] {
            for entry in std::fs::read_dir(dir).unwrap() {
                let sql = std::fs::read_to_string(entry.unwrap().path()).unwrap();
                for part in sql.split("CREATE TABLE ").skip(1) {
                    let name = part.split_whitespace().next().unwrap();
                    created.insert(name.trim_start_matches("IF NOT EXISTS").to_string());
                }
            }
        }
        let named: std::collections::BTreeSet<String> =
            GATEWAY_TABLES.iter().map(|t| t.to_string()).collect();
        assert_eq!(created, named);
    }

    #[test]
    fn sqlite_statements_number_their_parameters() {
        let second = |m: char| {
            format!(
                "({m}12, {m}13, {m}14, {m}15, \
                 COALESCE({m}16, (SELECT email FROM users WHERE id = {m}15)), \
                 COALESCE({m}17, (SELECT account_id FROM users WHERE id = {m}15)), \
                 {m}18, {m}19, {m}20, {m}21, {m}22)"
            )
        };
        assert!(audit_insert_sql(2, true).ends_with(&second('?')));
        assert!(audit_insert_sql(2, false).ends_with(&second('$')));
        assert!(!audit_insert_sql(256, true).contains('$'));
    }
}
