//! The command-line interface: `serve`, `demo`, `check-config`, and administration commands
//! (`user …`, `keys rotate`, `audit tail`, `token verify`). Every administrative change is
//! written to the audit trail with the acting OS user.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::auth::password::{check_policy, PasswordHasher};
use crate::clock::{rfc3339, Clock, SystemClock};
use crate::config::{Config, LogFormat};
use crate::secret::Secret;
use crate::store::{AuditEvent, AuditQuery, DurableStore, NewUser, User};

/// Writes a line to standard output. A closed or failing output is an error like any other
/// (reported, exit status 1), never a panic as with `println!`.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).context("cannot write to standard output")?
    };
}

/// Writes a line to standard error, for notes and errors. A closed standard error is ignored:
/// what the command did is done, and `eprintln!` would panic over it.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// A listing's reader went away (`| head`): for a listing that is the reader's choice, not an
/// error; the command ends there with success.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
struct OutputClosed;

/// A write error of a listing: [`OutputClosed`] for a closed pipe, itself otherwise.
fn listing_write(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(OutputClosed)
    } else {
        anyhow::Error::new(e).context("cannot write to standard output")
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "A login gateway: password + second factor before anything reaches the console"
)]
pub struct Cli {
    /// Config file (TOML). Environment variables PORTCULLIS__SECTION__KEY override it.
    #[arg(long, global = true, env = "PORTCULLIS_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Run the gateway on embedded defaults with a built-in demo console behind it.
    Demo(crate::demo::DemoArgs),
    /// Validate the config and print the effective values (secrets redacted).
    CheckConfig,
    /// Manage users.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage token signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Set up administrators of the admin console.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Read the audit trail, or remove its old events.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Work with identity tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Move the durable store to another database.
    #[command(subcommand)]
    Storage(StorageCmd),
}

#[derive(Subcommand, Debug)]
pub enum StorageCmd {
    /// Copy every user, factor, key, device, pending notice and audit event from the
    /// configuration's `storage.durable` into a new, empty database (SQLite to PostgreSQL as a
    /// deployment grows past one gateway, or back), in one transaction. Stop the gateways
    /// first; then point `storage.durable` at the new database. The copy keeps the master key:
    /// the gateways must bring the same one.
    Copy {
        /// The new database: `postgres://…` or `sqlite:///path` (set up here; it must hold no
        /// row of the gateway's yet).
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create a user; the password is read from standard input (never from the command line).
    /// With --no-password none is read or set: the user sets one through an enrolment link
    /// (`user enrol-link`), so nobody who learns a password first can set up the second factor;
    /// the account sets up its first factor through a link only.
    Add {
        email: String,
        #[arg(long)]
        account: String,
        #[arg(long)]
        admin: bool,
        /// Create the user without a password (then give them `user enrol-link`).
        #[arg(long)]
        no_password: bool,
    },
    /// List users.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Disable a user and end all of its sessions at once.
    Disable { email: String },
    /// Enable a disabled user.
    Enable { email: String },
    /// End every session of the user on every gateway (within a second) and tell them by
    /// email; the account stays enabled, so they may sign in again.
    EndSessions { email: String },
    /// Restore password sign-in of a user locked by a "this wasn't me" report.
    Unlock { email: String },
    /// Remove the user's second factors and end its sessions; the user sets one up again
    /// through an enrolment link (`user enrol-link`): the password alone no longer signs in.
    ResetMfa { email: String },
    /// Set a new password for the user, read from standard input (never from the command line);
    /// ends every session of the user and tells them by email.
    SetPassword { email: String },
    /// TOTP provisioning.
    #[command(subcommand)]
    Totp(TotpCmd),
    /// Prints a one-time enrolment link for a user (set a password if they have none, and
    /// register their own second factor); valid for `admin.enrolment_link_ttl`.
    EnrolLink {
        email: String,
        /// Only a security key may be registered through the link.
        #[arg(long)]
        key_only: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TotpCmd {
    /// Create a new TOTP secret for the user and print its otpauth:// URI once.
    Generate { email: String },
}

#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Creates (or promotes) an admin and prints a one-time enrolment link, valid 15 minutes,
    /// through which they set a password and register a security key.
    Bootstrap {
        email: String,
        /// Account id of a new admin user (default `admin`); an existing user keeps theirs.
        #[arg(long)]
        account: Option<String>,
    },
    /// Takes the administrator role from a user: their sessions end on every gateway (within a
    /// second), they are told by email, and they may sign in again as a customer of their
    /// account. Their security keys stay theirs.
    Revoke { email: String },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Add a new signing key: published at once, it signs 90 s later (every gateway and backend
    /// cache has it by then); the previous one signs until then and stays published for
    /// `token.key_overlap` more. The new key uses `token.algorithm`; where that differs from
    /// the current key's, every gateway switches, and the command asks for
    /// `--switch-algorithm` naming it.
    Rotate {
        /// Confirms a switch of every gateway's signing algorithm to this one (`EdDSA` or
        /// `ES256`, which must be `token.algorithm`): backends that pin the old algorithm
        /// refuse every token signed with the new key.
        #[arg(long, value_name = "ALGORITHM", value_parser = ["EdDSA", "ES256"])]
        switch_algorithm: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Show the latest events.
    Tail {
        /// How many events.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Keep printing new events as they are written; a database that goes away meanwhile is
        /// waited for (said on standard error), and following goes on where it was.
        #[arg(short, long)]
        follow: bool,
    },
    /// Remove events older than a retention period (at least a day), a few thousand per
    /// statement so running gateways keep writing meanwhile. The removal is itself audited.
    Prune {
        /// Retention period, e.g. `400d`, `13weeks`, `1year`: events older than this go.
        #[arg(long, value_parser = retention)]
        older_than: std::time::Duration,
    },
}

/// `--older-than`: a duration with its unit (`400d`, `13weeks`, `1year`); a refusal says the
/// form and the least it may be.
fn retention(v: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(v).map_err(|_| {
        "give a retention period with its unit, such as 400d, 13weeks or 1year (at least 1d)"
            .to_string()
    })
}

/// How long `audit prune`, cut short by the database going away, waits for it to come back to
/// record how many events went.
const PRUNE_RECORD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// The shortest retention `audit prune` accepts: the last day of the trail is what an incident
/// is investigated from, and a typo (`--older-than 1m`) must not wipe it.
const MIN_AUDIT_RETENTION: std::time::Duration = std::time::Duration::from_secs(86_400);
/// Events removed per statement by `audit prune`.
const AUDIT_PRUNE_BATCH: u32 = 5_000;

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Verify a token as a backend should; prints its claims.
    Verify {
        token: String,
        /// JWKS as an http:// URL or a file path.
        #[arg(long)]
        jwks: String,
        /// Expected audience (default: token.audience from the config).
        #[arg(long)]
        audience: Option<String>,
        /// Expected issuer (default: the configured issuer).
        #[arg(long)]
        issuer: Option<String>,
        /// Algorithm to accept, EdDSA or ES256; given twice, both, as backends accept them
        /// during an algorithm switch (default: token.algorithm from the config).
        #[arg(long = "algorithm", value_name = "ALG", value_parser = ["EdDSA", "ES256"])]
        algorithms: Vec<String>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // clap would say a value is missing for `--config`, which the command line did not name.
    let named = std::env::args_os().any(|a| {
        let a = a.to_string_lossy();
        a == "--config" || a.starts_with("--config=")
    });
    if std::env::var_os("PORTCULLIS_CONFIG").is_some_and(|v| v.is_empty()) {
        if !named {
            note!(
                "error: PORTCULLIS_CONFIG is set but empty: name a configuration file, or unset it"
            );
            return ExitCode::from(2);
        }
        // The command line names the file: the empty variable stands for nothing (the parser
        // would refuse it even so). No other thread runs yet.
        std::env::remove_var("PORTCULLIS_CONFIG");
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            note!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<OutputClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Logged>().is_some() => ExitCode::FAILURE,
        Err(e) => {
            note!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error already written to the log.
#[derive(Debug, thiserror::Error)]
#[error("see the log")]
struct Logged;

/// An error and its causes on one line, each cause once: many errors already name their cause
/// in their own message, and `{:#}` would repeat it.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Loads the configuration from `--config` and the environment.
pub fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    load_config_for(path, true)
}

/// [`load_config`] for a command that uses the database (`database`), which the note on the
/// defaults names, or not (`token verify`).
fn load_config_for(path: Option<&std::path::Path>, database: bool) -> Result<Config> {
    let config = Config::load(path, crate::config::environment()?)?;
    if path.is_none() {
        let with = match database {
            true => format!(
                ", with the database {}",
                crate::secret::redact_url(&config.storage.durable)
            ),
            false => String::new(),
        };
        note!(
            "note: no --config (or PORTCULLIS_CONFIG) given: built-in defaults and PORTCULLIS__* \
             variables only{with}"
        );
    }
    Ok(config)
}

/// Installs the log subscriber.
pub fn init_logging(config: &Config) {
    // `PORTCULLIS_LOG` is already `log.level` here, validated with it (`Config::load`).
    let mut filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    // PostgreSQL's notices ("relation … already exists, skipping" at every start) and the
    // pool's own reconnection chatter are the database driver's, not the gateway's news (an
    // outage is logged by the gateway), unless asked for by name.
    if !config.log.level.contains("sqlx") {
        for quiet in ["sqlx::postgres::notice=warn", "sqlx_core::pool=warn"] {
            if let Ok(quiet) = quiet.parse() {
                filter = filter.add_directive(quiet);
            }
        }
    }
    // The WebAuthn library logs a visitor's malformed answer at ERROR, with its bytes: the
    // refusal is the gateway's to report (audited, and logged at debug), not an operator's
    // alert, unless asked for by name.
    if !config.log.level.contains("webauthn") {
        for quiet in ["webauthn_rs_core=off", "webauthn_rs=off"] {
            if let Ok(quiet) = quiet.parse() {
                filter = filter.add_directive(quiet);
            }
        }
    }
    // Colours only for a terminal: in a file or the journal they are escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(args) => crate::demo::run(args, cli.config.as_deref()).await,
        Command::CheckConfig => {
            let config = load_config(cli.config.as_deref())?;
            let warnings = preflight(&config)?;
            check_stored_keys(&config).await?;
            check_redis(&config).await?;
            write!(std::io::stdout(), "{}", config.to_redacted_toml())
                .context("cannot write to standard output")?;
            if config.webauthn.enabled && !config.webauthn_effective() {
                note!(
                    "note: webauthn.enabled is off in effect: server.public_url has an IP \
                     address, not a domain name, so security keys and passkeys are not offered"
                );
            }
            for w in warnings.iter().chain(&advice(&config)) {
                note!("warning: {w}");
            }
            note!("config is valid");
            Ok(())
        }
        Command::Serve => {
            let config = load_config(cli.config.as_deref())?;
            init_logging(&config);
            // Once logging is set up, the reason the gateway cannot run goes to the log, in its
            // format (a JSON pipeline keeps it), and only there.
            serve(config).await.map_err(|e| {
                if !tracing::enabled!(tracing::Level::ERROR) {
                    return e;
                }
                tracing::error!(error = %error_text(&e), "portcullis cannot run");
                anyhow::Error::new(Logged)
            })
        }
        Command::Token(TokenCmd::Verify {
            token,
            jwks,
            audience,
            issuer,
            algorithms,
        }) => {
            let config = load_config_for(cli.config.as_deref(), false)?;
            let expect = Expected {
                audience,
                issuer,
                algorithms,
            };
            verify_token(&config, &token, &jwks, expect).await
        }
        Command::Storage(StorageCmd::Copy { to }) => {
            let config = load_config(cli.config.as_deref())?;
            copy_storage(&config, &to).await
        }
        other => {
            let config = load_config(cli.config.as_deref())?;
            admin(config, other).await
        }
    }
}

/// Writes `ev`, the `audit_pruned` event of a prune to `before`, with the count `removed`. A
/// prune `cut_short` counts again where the database answers (`to_remove` were older at its
/// start, and nothing else removes events that old): a batch whose commit's answer was lost
/// went all the same.
async fn record_prune(
    durable: &dyn DurableStore,
    ev: &mut AuditEvent,
    (before, to_remove, cut_short): (crate::clock::UnixTime, u64, bool),
    removed: &mut u64,
) -> crate::store::StoreResult<()> {
    if cut_short {
        if let Ok(left) = durable.audit_events_before(before).await {
            *removed = to_remove.saturating_sub(left).max(*removed);
        }
    }
    ev.reason = Some(format!("before:{before},removed:{removed}"));
    durable.append_audit(std::slice::from_ref(ev)).await
}

/// Ends every session of `u` on every gateway (within a second), writes `ev`, and tells the
/// owner `what` an administrator did.
async fn end_sessions_and_tell(
    config: &Config,
    durable: &Arc<dyn DurableStore>,
    u: &User,
    ev: AuditEvent,
    what: &str,
) -> Result<()> {
    durable
        .void_sessions(&u.id, SystemClock.now_millis())
        .await?;
    durable.append_audit(&[ev]).await?;
    notifier(config, durable)?.admin_change(u, what).await;
    Ok(())
}

/// `portcullis storage copy --to URL`.
async fn copy_storage(config: &Config, to: &str) -> Result<()> {
    use crate::store::sql::SqlStore;
    let from = &config.storage.durable;
    if let Some(path) = crate::store::sql::sqlite_file(from) {
        if !std::path::Path::new(path).exists() {
            anyhow::bail!(
                "there is no database at {path} to copy: give the gateway's configuration with \
                 --config (or PORTCULLIS_CONFIG)"
            );
        }
    }
    if !(to.starts_with("postgres://")
        || to.starts_with("postgresql://")
        || to.starts_with("sqlite:"))
    {
        anyhow::bail!("--to must be a postgres:// or sqlite:// URL");
    }
    if !to.starts_with("sqlite:") && !crate::config::storage::postgres_names_database(to) {
        anyhow::bail!("--to {}", crate::config::storage::NO_DATABASE_NAMED);
    }
    if to == from.as_str() {
        anyhow::bail!("--to names the database the configuration already uses");
    }
    let source = SqlStore::connect(from).await?;
    // The copy is for gateways with this configuration's master key: one that is not the
    // database's would stop them on the copy, after the move.
    if config.secrets.master_key.is_some() {
        let key = config.master_key()?;
        let now = SystemClock.now();
        let checked =
            crate::token::check_master_key(&source, &key, now, crate::token::Claim::No).await;
        if let Err(e) = checked {
            source.close().await;
            return Err(e.into());
        }
    }
    // The store names the configuration's key in its errors; here the database is `--to`'s.
    let target = SqlStore::connect(to)
        .await
        .map_err(|e| anyhow::anyhow!(e.to_string().replace("(storage.durable)", "(--to)")))?;
    let result = copy_between(&source, &target).await;
    // Each file whole on its own (its `-wal` folded in): the copy is what gets moved.
    source.close().await;
    target.close().await;
    result
}

/// [`copy_storage`] between its opened databases.
async fn copy_between(
    source: &crate::store::sql::SqlStore,
    target: &crate::store::sql::SqlStore,
) -> Result<()> {
    target.migrate().await?;
    // Progress on stderr as each table begins, and every 100,000 rows: an audit trail of
    // millions takes minutes. The counts, once done, on stdout.
    let copied = source
        .copy_into(target, &mut |table, n| {
            if n == 0 {
                note!("copying {table}…");
            } else {
                note!("{table}: {n} rows so far…");
            }
        })
        .await?;
    // A gateway still running on the old database wrote to it during the copy: what it wrote
    // is not in the new one, and whatever it writes next will not be either.
    let changed = source.changed_since(&copied).await?;
    if !changed.is_empty() {
        let tables: Vec<String> = changed
            .iter()
            .map(|(t, then, now)| format!("{t}: {then} rows copied, {now} now"))
            .collect();
        anyhow::bail!(
            "the old database changed while it was copied ({}): a gateway still runs on it. \
             Stop every gateway, empty or drop the new database (it holds the copy as it was \
             when the copy began), and copy again",
            tables.join("; ")
        );
    }
    let rows: u64 = copied.iter().map(|(_, n)| n).sum();
    let clock = SystemClock;
    let ev = AuditEvent::new("storage_copied", "success", clock.now())
        .actor(&actor())
        .reason(&format!("rows:{rows}"));
    crate::store::DurableStore::append_audit(target, &[ev]).await?;
    for (table, n) in &copied {
        say!("{table:<22} {n} rows");
    }
    say!(
        "copied {rows} rows into the new database; stop every gateway if any still runs on the \
         old one, set storage.durable to the new database's URL (with the same master key), and \
         start them"
    );
    Ok(())
}

/// Raises the process's limit on open files to the most it may have (the hard limit: a shell's
/// or a container's soft limit is often 1024, which one client at
/// `server.max_connections_per_address` would use up) and warns where even that leaves room
/// for few clients at the bound.
fn raise_file_limit(config: &Config) {
    let cap = u64::from(config.server.max_connections_per_address);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(limit, "open files limit");
            if cap > 0 && limit < cap.saturating_mul(8) {
                tracing::warn!(
                    limit,
                    max_connections_per_address = cap,
                    "the process may open {limit} files, room for few clients at \
                     server.max_connections_per_address ({cap}): raise the hard limit \
                     (LimitNOFILE in systemd, ulimit -Hn, the container runtime's nofile)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open files limit"),
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: draining in-flight requests");
}

/// What `serve` needs beyond a valid configuration, checked before anything starts (and by
/// `check-config`): a usable master key and, when set, a TLS pair that loads and a GeoIP
/// database that tells places.
fn preflight(config: &Config) -> Result<Vec<String>> {
    config.master_key()?;
    let mut warnings = Vec::new();
    if let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (_, w) = crate::server::tls::Tls::load(cert, key, &config.server.public_url, now)?;
        warnings.extend(w);
    }
    if let Some(db) = &config.risk.geoip_database {
        crate::risk::check_database(db)?;
    }
    if config.notify.smtp_url.is_none() {
        check_outbox(&config.notify.outbox_dir)?;
    }
    if let Some(path) = crate::store::sql::sqlite_file(&config.storage.durable) {
        check_sqlite_file(std::path::Path::new(path))?;
    }
    Ok(warnings)
}

/// A SQLite database is a file, or one the gateway can make in a directory that exists.
fn check_sqlite_file(path: &std::path::Path) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!(
            "storage.durable: {} is a directory; name the database file in it",
            path.display()
        );
    }
    if path.exists() && !path.is_file() {
        anyhow::bail!(
            "storage.durable: {} is not a regular file (a device or a socket cannot hold the database)",
            path.display()
        );
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !path.exists() && !parent.is_dir() {
        anyhow::bail!(
            "storage.durable: the directory {} of the database file does not exist",
            parent.display()
        );
    }
    Ok(())
}

/// Without `notify.smtp_url`, mail is written to `notify.outbox_dir`: it must be a directory,
/// or one the gateway can create (tried where the missing part would start, with a directory
/// that is removed at once).
fn check_outbox(outbox: &std::path::Path) -> Result<()> {
    let what = "without notify.smtp_url, mail is written there";
    if outbox.exists() {
        if !outbox.is_dir() {
            anyhow::bail!(
                "notify.outbox_dir: {} is not a directory ({what})",
                outbox.display()
            );
        }
        return Ok(());
    }
    let cwd = std::path::Path::new(".");
    let existing = outbox
        .ancestors()
        .skip(1)
        .map(|a| if a.as_os_str().is_empty() { cwd } else { a })
        .find(|a| a.exists())
        .unwrap_or(cwd);
    let probe = existing.join(format!(".portcullis-check-{}", std::process::id()));
    match std::fs::create_dir(&probe) {
        Ok(()) => {
            let _ = std::fs::remove_dir(&probe);
            Ok(())
        }
        Err(e) => anyhow::bail!(
            "notify.outbox_dir: {} cannot be created in {}: {e} ({what})",
            outbox.display(),
            existing.display()
        ),
    }
}

/// `check-config`'s look at a Redis ephemeral store: a server that answers and refuses the
/// configured password, user or database is an error (`serve` would never be ready); one that
/// does not answer is a note. `PING` only: nothing is written.
/// The clock the gateways share, as they read it for their own check (Redis's `TIME`, else
/// PostgreSQL's `now()`); `None` where they share none (SQLite and the memory store).
async fn fleet_time_ms(config: &Config, durable: &dyn DurableStore) -> Result<Option<i64>> {
    if let Some(store) = redis_store(config).await? {
        return Ok(crate::store::EphemeralStore::server_time_ms(&store).await?);
    }
    Ok(durable.server_time_ms().await?)
}

/// The configuration's Redis store, connected; `None` on the memory store.
async fn redis_store(config: &Config) -> Result<Option<crate::store::redis::RedisStore>> {
    let Some(target) = config.storage.redis_target()? else {
        return Ok(None);
    };
    let options = crate::store::redis::RedisOptions {
        target,
        prefix: config.storage.redis_prefix.clone(),
        connect_timeout: config.storage.redis_connect_timeout,
        response_timeout: config.storage.redis_response_timeout,
    };
    Ok(Some(
        crate::store::redis::RedisStore::connect(options).await?,
    ))
}

async fn check_redis(config: &Config) -> Result<()> {
    let Some(store) = redis_store(config).await? else {
        return Ok(());
    };
    // As the readiness probe asks: every kind of command the gateway sends, on short-lived keys
    // under the prefix, so an ACL that leaves one out is found here, not at the first sign-in.
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::store::EphemeralStore::ping(&store),
    )
    .await;
    match answered {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.to_string().contains("invalid peer certificate") => {
            anyhow::bail!(
                "storage.ephemeral: the Redis server's TLS certificate was not accepted \
                 (storage.redis_tls_ca names the CA of a private one): {e}"
            )
        }
        Ok(Err(e)) if refused_by_redis(&e.to_string()) => {
            anyhow::bail!("storage.ephemeral: the Redis server refused the gateway: {e}")
        }
        Ok(Err(e)) => {
            // A server that speaks TLS drops a plain connection at its first bytes.
            let plain = config.storage.ephemeral.starts_with("redis://")
                || config.storage.ephemeral.starts_with("redis+cluster://");
            let why = e.to_string().to_ascii_lowercase();
            let reset = why.contains("reset by peer");
            // A plain server never answers a TLS handshake: the connection hangs until it
            // times out.
            let hint = if plain && reset {
                " (a server that speaks TLS resets a plain connection: if it does, use rediss://)"
            } else if !plain && (why.contains("timed out") || why.contains("timeout")) {
                " (a server without TLS does not answer a TLS handshake: if it speaks plain \
                 Redis, use redis://)"
            } else {
                ""
            };
            note!(
                "note: Redis was not reached, so its password and database were not checked: \
                 {e}{hint}"
            );
            Ok(())
        }
        Err(_) => {
            note!(
                "note: Redis did not answer in time, so its password and database were not checked"
            );
            Ok(())
        }
    }
}

/// Whether a Redis error is the server's refusal of the configuration (password, user,
/// database, permissions) rather than the server not being reached.
fn refused_by_redis(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    [
        "authentication failed",
        "wrongpass",
        "noauth",
        "noperm",
        "no permissions",
        "db index",
    ]
    .iter()
    .any(|s| e.contains(s))
}

/// Whether the database server answered and refused (no such database, a wrong password, no
/// access for this role or address): the configuration's fault, not an outage.
fn refused_by_the_database(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("does not exist")
        || e.contains("password authentication failed")
        || e.contains("no pg_hba.conf entry")
        || e.contains("permission denied")
}

/// `check-config`'s look at the durable store: the master key must be the database's (open its
/// check value, or its signing keys and a TOTP secret), as `serve` will require; nothing is
/// written. Where the database does not exist yet or does not answer, a note says what was not
/// checked; a wrong key is an error.
async fn check_stored_keys(config: &Config) -> Result<()> {
    let url = &config.storage.durable;
    let sqlite = crate::store::sql::sqlite_file(url);
    if let Some(path) = sqlite {
        if let Err(e) = crate::store::sql::sqlite_access(path) {
            anyhow::bail!("storage.durable: the gateway could not open the database {path}: {e}");
        }
        if !std::path::Path::new(path).exists() {
            note!("note: the database {path} does not exist yet; the master key was not checked against stored keys");
            return Ok(());
        }
    }
    let reach = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::store::sql::SqlStore::connect(url),
    )
    .await;
    let store = match reach {
        Ok(Ok(store)) => store,
        // A certificate refused is the configuration's fault, not an outage: `serve` would
        // refuse it too.
        Ok(Err(e)) if e.to_string().to_ascii_lowercase().contains("certificate") => {
            anyhow::bail!(
                "storage.durable: the database server's TLS certificate was not accepted: {e}"
            );
        }
        // A file that does not open is the configuration's fault: there is no server to wait for.
        Ok(Err(e)) if sqlite.is_some() => anyhow::bail!("storage.durable: {e}"),
        Ok(Err(e)) if refused_by_the_database(&e.to_string()) => {
            anyhow::bail!("storage.durable: the database server refused the gateway: {e}");
        }
        // A server that answers but will not speak TLS where the URL's sslmode asks for it:
        // `serve` would refuse it too.
        Ok(Err(e)) if e.to_string().to_ascii_lowercase().contains("tls") => {
            anyhow::bail!(
                "storage.durable: the database server would not set up TLS as the URL's sslmode \
                 asks: {e}"
            );
        }
        Ok(Err(e)) => {
            note!("note: the master key was not checked against stored keys: {e}");
            return Ok(());
        }
        Err(_) => {
            note!("note: the master key was not checked against stored keys: the durable store did not answer");
            return Ok(());
        }
    };
    if let Ok(false) = store.is_set_up().await {
        if let Ok(false) = store.can_set_up().await {
            anyhow::bail!(
                "storage.durable: the database role sees none of the gateway's tables and may not \
                 create them in its schema, so the gateway could not start: connect as the \
                 database's owner, or GRANT CREATE ON SCHEMA public (and the tables' privileges) \
                 to the role"
            );
        }
        note!("note: the database has no tables yet (the gateway sets them up when it first starts); the master key was not checked against stored keys");
        return Ok(());
    }
    // Privileges first: a role that may not read the migration record cannot tell whether a
    // migration is due.
    match store.missing_privileges().await {
        Ok(missing) if !missing.is_empty() => {
            anyhow::bail!(
                "{}",
                crate::store::sql::missing_privileges_message(&missing)
            )
        }
        Ok(_) => {}
        Err(e) => note!("note: the database role's privileges were not checked: {e}"),
    }
    if !store.is_current().await {
        if let Ok(false) = store.can_set_up().await {
            anyhow::bail!(
                "storage.durable: the gateway's tables need setting up for this version (a \
                 migration) and the database role may not create in its schema, so the gateway \
                 could not start: run this version once as the database's owner (any command, \
                 e.g. `portcullis user list`), then start the gateways as this role"
            );
        }
    }
    let key = config.master_key()?;
    // As `serve` warns at start: the keys sign with the algorithm they were made for.
    if let Ok(Some(alg)) = crate::token::current_algorithm(&store, SystemClock.now()).await {
        let configured = config.token.algorithm.as_str();
        if alg != configured {
            note!(
                "warning: the current signing key is {alg}, not token.algorithm ({configured}): \
                 the gateways sign with {alg} until `portcullis keys rotate --switch-algorithm \
                 {configured}`"
            );
        }
    }
    match crate::token::check_master_key(&store, &key, SystemClock.now(), crate::token::Claim::No)
        .await
    {
        Ok(()) => Ok(()),
        Err(e @ crate::token::TokenError::WrongMasterKey) => Err(e.into()),
        Err(e) => {
            note!("note: the master key was not checked against stored keys: {e}");
            Ok(())
        }
    }
}

/// Settings that are valid but most likely not what the operator meant: warned about by
/// `check-config` and when `serve` starts.
fn advice(config: &Config) -> Vec<String> {
    let mut advice: Vec<String> =
        crate::config::ignored_variables(crate::config::environment().unwrap_or_default())
            .into_iter()
            .map(|name| {
                format!(
                    "the environment variable {name} is not read: overrides are spelled \
                 PORTCULLIS__SECTION__KEY (capitals, two underscores after PORTCULLIS and between \
                 section and key), besides PORTCULLIS_CONFIG and PORTCULLIS_LOG"
                )
            })
            .collect();
    advice.extend(config.exposed_secret_files());
    if let Some(host) = crate::config::storage::postgres_maybe_plain(&config.storage.durable) {
        advice.push(format!(
            "storage.durable: the connection to PostgreSQL at {host} may be plain text (no \
             sslmode, or prefer, allow or disable: the driver falls back to plain text where the \
             server, or someone in between, declines TLS); add ?sslmode=verify-full"
        ));
    }
    if config
        .server
        .trusted_proxies
        .iter()
        .any(|n| n.prefix_len() == 0)
    {
        advice.push(
            "server.trusted_proxies holds a network of every address (/0): every client's \
             X-Forwarded-For is believed, so any client can name the address that risk scoring, \
             throttling and the audit trail see; name your load balancers' addresses"
                .to_string(),
        );
    }
    if config.forward_auth.enabled && config.server.trusted_proxies.is_empty() {
        advice.push(
            "forward_auth is on but server.trusted_proxies is empty: the asking proxy's \
             X-Forwarded-Method and X-Forwarded-Uri are not believed, so every check is for `/` \
             and no [[step_up]] rule applies; add the proxy's address"
                .to_string(),
        );
    }
    advice
}

/// `portcullis serve`.
pub async fn serve(config: Config) -> Result<()> {
    // Its warnings are logged where the TLS pair is loaded for good.
    preflight(&config)?;
    raise_file_limit(&config);
    let listen = config.server.listen.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let state = crate::state::AppState::new(config, clock).await?;
    let hangups = crate::server::Hangups::listen();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    if !state.config.is_https() {
        tracing::warn!("public_url is plain http: session cookies drop the __Host- prefix and the Secure flag; use https outside a loopback demo");
    }
    for w in advice(&state.config) {
        tracing::warn!("{w}");
    }
    // Said at start (and by every readiness probe while it lasts).
    crate::http::health::clock_off(&state).await;
    crate::server::run_with(listener, state, shutdown_signal(), hangups).await?;
    Ok(())
}

/// The acting OS user, as the audit trail records CLI changes: the process's real user (not
/// `$USER`, which the caller sets at will), by name where `/etc/passwd` has it; `SUDO_USER`, when set,
/// beside it as a claim.
fn actor() -> String {
    let uid = rustix::process::getuid().as_raw();
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| user_name(&passwd, uid));
    let who = name.unwrap_or_else(|| format!("uid:{uid}"));
    // `SUDO_USER` is what sudo sets, but anyone can set it: it is recorded as the claim it is,
    // beside the real user it cannot hide, and only as a plain user name.
    let plain = |n: &str| {
        !n.is_empty()
            && n.len() <= 32
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    match std::env::var("SUDO_USER") {
        Ok(by) if plain(&by) => format!("cli:{who}(SUDO_USER={by})"),
        _ => format!("cli:{who}"),
    }
}

/// An account id as given on the command line, trimmed and held to [`crate::policy::is_account_id`]
/// as in the admin console.
fn account_id(raw: &str) -> Result<String> {
    let id = raw.trim();
    if !crate::policy::is_account_id(id) {
        bail!("--account must have 1 to 128 characters, without control or invisible characters");
    }
    Ok(id.to_string())
}

/// The name of `uid` in a `passwd` file's text.
fn user_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse() == Ok(uid) && !name.is_empty()).then(|| name.to_string())
    })
}

/// Reads a new password from the terminal (twice) or from one line of standard input.
fn read_password() -> Result<Secret<String>> {
    if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("New password: ")?;
        let b = rpassword::prompt_password("Repeat it: ")?;
        if a != b {
            bail!("the two passwords differ");
        }
        return Ok(Secret::new(a));
    }
    let mut line = String::new();
    let read = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    if read == 0 {
        bail!(
            "no password given: standard input ended before a line was read (run the command \
             at a terminal to be asked, or give the password as one line on standard input)"
        );
    }
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        bail!("the password read from standard input is empty");
    }
    Ok(Secret::new(password))
}

/// A new user's address, normalised, once it is one and could pass for no existing user's.
async fn new_user_email(durable: &dyn DurableStore, raw: &str) -> Result<String> {
    let email = crate::store::normalise_email(raw);
    if !crate::policy::is_plausible_email(&email) {
        bail!("`{email}` is not an email address");
    }
    if let Some(why) = crate::policy::email_confusion(&email) {
        bail!("`{email}`: {why}");
    }
    if let Some(other) = crate::store::lookalike_user(durable, &email).await? {
        bail!(
            "`{email}` looks like the address of the existing user {other}: a user made with it \
             could pass for them; use another address"
        );
    }
    Ok(email)
}

async fn find_user(durable: &dyn DurableStore, email: &str) -> Result<User> {
    durable
        .user_by_email(email)
        .await?
        .with_context(|| format!("no user with email {email}"))
}

/// The mail queue, for commands that tell an owner about a change (the gateways deliver it).
fn notifier(config: &Config, durable: &Arc<dyn DurableStore>) -> Result<crate::notify::Notifier> {
    let notifier = crate::notify::Notifier::new(
        &config.notify,
        &config.server.public_url,
        durable.clone(),
        Arc::new(SystemClock),
    )?;
    // Sealed where the command has the master key (checked to be the database's already).
    Ok(match config.master_key() {
        Ok(key) => notifier.sealing_with(Arc::new(key)),
        Err(_) => notifier,
    })
}

/// Why security keys cannot be used on this gateway, if they cannot.
fn keys_unavailable(config: &Config) -> Option<&'static str> {
    if !config.webauthn.enabled {
        return Some("WebAuthn is switched off ([webauthn] enabled = false)");
    }
    match config.server.public_url.host() {
        Some(url::Host::Domain(_)) => None,
        _ => Some("server.public_url has no domain name (security keys need one, e.g. http://localhost:8080/)"),
    }
}

/// Issues an enrolment link, audits it and prints it (once) with its expiry.
async fn print_enrolment_link(
    config: &Config,
    durable: &dyn DurableStore,
    user: &User,
    key_only: bool,
    ttl: std::time::Duration,
    audit: &dyn Fn(&str, Option<&User>, &str) -> AuditEvent,
) -> Result<()> {
    let key_only = key_only || user.is_admin;
    if let Some(why) = keys_unavailable(config).filter(|_| key_only) {
        // The link could not be used, and issuing it would void the user's earlier one.
        anyhow::bail!(
            "{} needs a security key, and keys cannot be used on this gateway: {why}",
            if user.is_admin {
                "an admin's enrolment link"
            } else {
                "a --key-only enrolment link"
            }
        );
    }
    let issued = crate::enrolment::issue(
        durable,
        &config.server.public_url,
        user,
        &actor(),
        key_only,
        ttl,
        SystemClock.now(),
    )
    .await?;
    let kind = if key_only { "key_only" } else { "any_factor" };
    durable
        .append_audit(&[audit("enrolment_link_issued", Some(user), kind)])
        .await?;
    say!("{}", issued.url);
    note!(
        "one-time enrolment link for {} (expires {}; single use): through it they {}register {}",
        user.email,
        rfc3339(issued.expires_at),
        if user.password_hash.is_empty() {
            "set a password and "
        } else {
            ""
        },
        if key_only {
            "a security key"
        } else {
            "a second factor"
        },
    );
    // The link adds a factor: one set up already (by the user, or by whoever learnt a password
    // handed over) stays, and goes on signing in.
    if crate::store::has_second_factor(durable, &user.id).await? {
        note!(
            "note: {} has a second factor already, which the link leaves in place; if it may not \
             be theirs, run `portcullis user reset-mfa {}` first (it ends this link too: issue \
             a new one after it)",
            user.email,
            user.email
        );
    }
    Ok(())
}

/// Administrative commands that work on the durable store directly.
async fn admin(config: Config, cmd: Command) -> Result<()> {
    // Only a command that creates a user may start a database. Any other finds nothing to read
    // or change in one that is not there (a forgotten --config): it says so rather than create
    // one, show it empty or fail on it and leave it behind.
    let may_create = matches!(
        cmd,
        Command::User(UserCmd::Add { .. }) | Command::Admin(AdminCmd::Bootstrap { .. })
    );
    if let Some(path) = crate::store::sql::sqlite_file(&config.storage.durable) {
        if !may_create && !std::path::Path::new(path).exists() {
            anyhow::bail!(
                "there is no database at {path}: give the gateway's configuration with --config \
                 (or PORTCULLIS_CONFIG); only `user add` and `admin bootstrap` start a new one"
            );
        }
    }
    let durable: Arc<dyn DurableStore> =
        Arc::new(crate::store::sql::SqlStore::connect(&config.storage.durable).await?);
    let result = admin_on(config, cmd, durable.clone()).await;
    // A SQLite file is whole again once the command is done (its `-wal` folded in).
    durable.close().await;
    result
}

/// [`admin`] on its opened database.
async fn admin_on(config: Config, cmd: Command, durable: Arc<dyn DurableStore>) -> Result<()> {
    let clock = SystemClock;
    durable.migrate().await?;
    // A command run with another master key than the database's would seal what the gateways
    // cannot open (a TOTP secret, a signing key): refused before anything is written. The first
    // one to bring a key to a new database makes it the database's.
    if config.secrets.master_key.is_some() {
        let key = config.master_key()?;
        crate::token::check_master_key(
            durable.as_ref(),
            &key,
            clock.now(),
            crate::token::Claim::Yes,
        )
        .await?;
    }
    let audit = |event: &str, user: Option<&User>, reason: &str| {
        let mut ev = AuditEvent::new(event, "success", clock.now())
            .actor(&actor())
            .reason(reason);
        if let Some(u) = user {
            ev = ev.user(u);
        }
        ev
    };
    match cmd {
        Command::User(UserCmd::Add {
            email,
            account,
            admin,
            no_password,
        }) => {
            let email = new_user_email(durable.as_ref(), &email).await?;
            if admin {
                if let Some(why) = keys_unavailable(&config) {
                    bail!("admins sign in with a security key, but {why}");
                }
            }
            let account = account_id(&account)?;
            // Asked before the password is: an address in use is the first thing to know.
            if durable.user_by_email(&email).await?.is_some() {
                bail!("already exists: a user with email {email} exists");
            }
            // No password: none until the user sets one through an enrolment link.
            let hash = if no_password {
                String::new()
            } else {
                let password = read_password()?;
                check_policy(password.expose(), &config.password, &email)?;
                let hasher = PasswordHasher::new(&config.password)?;
                hasher.hash(&password).await?
            };
            let new = NewUser {
                email,
                account_id: account,
                is_admin: admin,
                password_hash: hash,
            };
            let user = durable.create_user(new, clock.now()).await?;
            let mut events = vec![audit("user_created", Some(&user), "cli")];
            if user.is_admin {
                events.push(audit("admin_granted", Some(&user), "created"));
            }
            durable.append_audit(&events).await?;
            say!(
                "created user {} ({}) in account {}{}",
                user.email,
                user.id,
                user.account_id,
                if user.is_admin { " as admin" } else { "" }
            );
            if no_password {
                say!(
                    "no password is set: give the user an enrolment link (portcullis user \
                     enrol-link {}); through it they choose a password and set up their second \
                     factor",
                    user.email
                );
            } else if user.is_admin {
                say!("at first sign-in the admin must register a security key (admins sign in with one)");
            } else if config
                .webauthn
                .requires_phishing_resistant(&user.account_id)
            {
                say!("at first sign-in the user must register a security key or passkey (the account takes no codes)");
            } else {
                say!("at first sign-in the user must set up a second factor (an authenticator app or a security key)");
            }
        }
        Command::User(UserCmd::List { json }) => {
            let users = durable.list_users().await?;
            let mut out = std::io::stdout().lock();
            for u in users {
                let totp = durable.totp(&u.id).await?.is_some();
                let all = durable.webauthn_credentials(&u.id).await?;
                let suspended = all.iter().filter(|c| c.is_suspended()).count();
                let keys = all.len() - suspended;
                let mut factors = match (totp, keys) {
                    (false, 0) => "no-second-factor".to_string(),
                    (true, 0) => "totp".to_string(),
                    (false, n) => format!("keys:{n}"),
                    (true, n) => format!("totp keys:{n}"),
                };
                // Suspended keys sign nobody in, but wait for an administrator.
                if suspended > 0 {
                    factors.push_str(&format!(" suspended-keys:{suspended}"));
                }
                if json {
                    let v = serde_json::json!({"id": u.id, "email": u.email, "account": u.account_id, "admin": u.is_admin, "disabled": u.disabled, "locked": u.locked, "totp": totp, "keys": keys, "suspended_keys": suspended, "created_at": rfc3339(u.created_at)});
                    writeln!(out, "{v}").map_err(listing_write)?;
                } else {
                    writeln!(
                        out,
                        "{:<36}  {:<32}  {:<16}  {}{}{}{}",
                        u.id,
                        u.email,
                        // Quoted where it is not one plain word: no id can read as more columns.
                        shown(&u.account_id),
                        if u.is_admin { "admin " } else { "" },
                        if u.disabled { "disabled " } else { "" },
                        if u.locked { "locked " } else { "" },
                        factors
                    )
                    .map_err(listing_write)?;
                }
            }
        }
        Command::User(UserCmd::Disable { email }) => {
            let u = find_user(durable.as_ref(), &email).await?;
            if u.disabled {
                // Nothing changes, so nothing is audited (as in the admin console).
                say!("{} is disabled already", u.email);
                return Ok(());
            }
            durable
                .set_disabled(&u.id, true, clock.now_millis())
                .await?;
            durable
                .append_audit(&[audit("user_disabled", Some(&u), "cli")])
                .await?;
            say!(
                "disabled {}; its sessions end within a second on every gateway",
                u.email
            );
        }
        Command::User(UserCmd::EndSessions { email }) => {
            let u = find_user(durable.as_ref(), &email).await?;
            // A disabled account's sessions ended when it was disabled, and it can start none:
            // there is nothing to end, record or tell.
            if u.disabled {
                say!("{} is disabled: it has no sessions to end", u.email);
                return Ok(());
            }
            let ev = audit("sessions_ended", Some(&u), "cli");
            let what = "an administrator ended every session of the account";
            end_sessions_and_tell(&config, &durable, &u, ev, what).await?;
            say!(
                "ended every session of {} (on every gateway within a second); they may sign in \
                 again",
                u.email
            );
        }
        Command::User(UserCmd::Unlock { email }) => {
            let u = find_user(durable.as_ref(), &email).await?;
            if !u.locked {
                say!("{} is not locked", u.email);
                return Ok(());
            }
            durable.set_locked(&u.id, false).await?;
            durable
                .append_audit(&[audit("user_unlocked", Some(&u), "cli")])
                .await?;
            notifier(&config, &durable)?
                .admin_change(&u, "an administrator unlocked password sign-in")
                .await;
            if !crate::store::awaits_enrolment_link(durable.as_ref(), &u).await? {
                say!(
                    "unlocked {}; password sign-in works again (ask them to change the password)",
                    u.email
                );
            } else {
                say!(
                    "unlocked {email}; it has no second factor left, so its password alone still does \
                     not sign in: give the user an enrolment link (portcullis user enrol-link {email})",
                    email = u.email
                );
            }
        }
        Command::User(UserCmd::Enable { email }) => {
            let u = find_user(durable.as_ref(), &email).await?;
            if !u.disabled {
                say!("{} is not disabled", u.email);
                return Ok(());
            }
            durable
                .set_disabled(&u.id, false, clock.now_millis())
                .await?;
            durable
                .append_audit(&[audit("user_enabled", Some(&u), "cli")])
                .await?;
            say!("enabled {}", u.email);
        }
        Command::User(UserCmd::ResetMfa { email }) => {
            let u = find_user(durable.as_ref(), &email).await?;
            if crate::store::nothing_to_reset(durable.as_ref(), &u).await? {
                // No factor to remove, but a setup under way through a link (perhaps someone
                // else's use of one that leaked) is cut off, and links not used yet end, as a
                // reset would: audited as one (not mailed again).
                durable.reset_second_factors(&u.id, clock.now()).await?;
                durable.void_sessions(&u.id, clock.now_millis()).await?;
                let mut ev = audit("second_factors_reset", Some(&u), "cli");
                ev.reason = Some(
                    "no factor left to remove: sign-ins under way and unused links ended".into(),
                );
                durable.append_audit(&[ev]).await?;
                say!(
                    "{email} has no second factor to remove: it sets one up through an enrolment \
                     link (portcullis user enrol-link {email}). Any sign-in or enrolment under \
                     way was ended, and any link not used yet no longer works",
                    email = u.email
                );
                return Ok(());
            }
            durable.reset_second_factors(&u.id, clock.now()).await?;
            notifier(&config, &durable)?
                .admin_change(&u, crate::notify::RESET_NOTICE)
                .await;
            durable.void_sessions(&u.id, clock.now_millis()).await?;
            durable
                .append_audit(&[audit("second_factors_reset", Some(&u), "cli")])
                .await?;
            say!(
                "removed the second factors of {email}; its sessions ended. The password alone no longer \
                 signs in: give the user an enrolment link (portcullis user enrol-link {email}) or \
                 provision an app (portcullis user totp generate {email})",
                email = u.email
            );
        }
        Command::User(UserCmd::SetPassword { email }) => {
            let u = find_user(durable.as_ref(), &email).await?;
            let password = read_password()?;
            check_policy(password.expose(), &config.password, &u.email)?;
            let hash = PasswordHasher::new(&config.password)?
                .hash(&password)
                .await?;
            durable.set_password_hash(&u.id, &hash).await?;
            crate::device::forget_remembered(durable.as_ref(), &u.id, None).await?;
            let ev = audit("password_changed", Some(&u), "cli");
            let what =
                "an administrator set a new password, and every session of the account was ended";
            end_sessions_and_tell(&config, &durable, &u, ev, what).await?;
            say!("set a new password for {}; its sessions ended", u.email);
            if crate::store::awaits_enrolment_link(durable.as_ref(), &u).await? {
                say!(
                    "it has no second factor and sets one up only through an enrolment link, so \
                     the password alone signs in to nothing: give the user one (portcullis user \
                     enrol-link {})",
                    u.email
                );
            }
        }
        Command::User(UserCmd::Totp(TotpCmd::Generate { email })) => {
            let u = find_user(durable.as_ref(), &email).await?;
            // Checked against the database's master key on the way in (`admin`).
            let key = config.master_key()?;
            let secret = crate::auth::totp::generate_secret();
            let sealed = key.seal(&crate::auth::flow::totp_context(&u.id), secret.expose())?;
            durable
                .set_totp(crate::store::TotpRecord {
                    user_id: u.id.clone(),
                    secret_sealed: sealed,
                    created_at: clock.now(),
                })
                .await?;
            durable
                .append_audit(&[audit("totp_generated", Some(&u), "cli")])
                .await?;
            notifier(&config, &durable)?
                .admin_change(
                    &u,
                    "an administrator set up a new authenticator app, replacing any earlier one",
                )
                .await;
            let issuer = config
                .server
                .public_url
                .host_str()
                .unwrap_or("Portcullis")
                .to_string();
            say!(
                "{}",
                crate::auth::totp::otpauth_uri(secret.expose(), &issuer, &u.email)
            );
            note!(
                "this URI is shown once; it replaces any earlier TOTP secret of {}",
                u.email
            );
        }
        Command::Admin(AdminCmd::Bootstrap { email, account }) => {
            if let Some(why) = keys_unavailable(&config) {
                bail!("admins sign in with a security key, but {why}");
            }
            let email = new_user_email(durable.as_ref(), &email).await?;
            let user = match durable.user_by_email(&email).await? {
                Some(u) => {
                    if let Some(a) = account.filter(|a| a.trim() != u.account_id) {
                        note!(
                            "note: {email} already exists in account `{}`; --account {a} applies \
                             only to a new user and was not used",
                            u.account_id
                        );
                    }
                    if !u.is_admin {
                        durable.set_admin(&u.id, true).await?;
                        durable
                            .append_audit(&[audit("admin_granted", Some(&u), "bootstrap")])
                            .await?;
                    }
                    u
                }
                None => {
                    let account = account_id(account.as_deref().unwrap_or("admin"))?;
                    let new = NewUser {
                        email,
                        account_id: account,
                        is_admin: true,
                        password_hash: String::new(),
                    };
                    let u = durable.create_user(new, clock.now()).await?;
                    durable
                        .append_audit(&[audit("user_created", Some(&u), "bootstrap")])
                        .await?;
                    u
                }
            };
            let ttl = crate::enrolment::BOOTSTRAP_TTL;
            print_enrolment_link(&config, durable.as_ref(), &user, true, ttl, &audit).await?;
        }
        Command::Admin(AdminCmd::Revoke { email }) => {
            let u = find_user(durable.as_ref(), &email).await?;
            if !u.is_admin {
                say!("{} is not an administrator", u.email);
                return Ok(());
            }
            durable.set_admin(&u.id, false).await?;
            // A privilege change: sessions signed in as an administrator end with it.
            let ev = audit("admin_revoked", Some(&u), "cli");
            let what = "an administrator took the administrator role from the account";
            end_sessions_and_tell(&config, &durable, &u, ev, what).await?;
            let left = durable
                .list_users()
                .await?
                .into_iter()
                .filter(|a| a.is_admin && !a.disabled)
                .count();
            say!(
                "{} is no longer an administrator; their sessions ended (on every gateway within a \
                 second)",
                u.email
            );
            if left == 0 {
                note!(
                    "note: no enabled administrator is left; `portcullis admin bootstrap EMAIL` \
                     makes one"
                );
            }
        }
        Command::User(UserCmd::EnrolLink { email, key_only }) => {
            let u = find_user(durable.as_ref(), &email).await?;
            let ttl = config.admin.enrolment_link_ttl;
            print_enrolment_link(&config, durable.as_ref(), &u, key_only, ttl, &audit).await?;
        }
        Command::Keys(KeysCmd::Rotate { switch_algorithm }) => {
            let key = config.master_key()?;
            let to = config.token.algorithm.as_str();
            let from = crate::token::current_algorithm(durable.as_ref(), clock.now()).await?;
            let switching = from.as_deref().is_some_and(|f| f != to);
            match (switching, switch_algorithm.as_deref()) {
                (false, None) => {}
                (true, Some(a)) if a == to => {}
                (true, Some(a)) => bail!(
                    "--switch-algorithm {a} does not match this configuration's token.algorithm \
                     ({to}), which the new key would use: name {to} to switch to it, or correct \
                     token.algorithm (PORTCULLIS__TOKEN__ALGORITHM) first. Nothing was changed."
                ),
                (true, None) => bail!(
                    "the gateways sign with {} now; this configuration's token.algorithm is {to}, \
                     so the new key would switch every gateway to {to}, and backends that accept \
                     only {} would refuse every token. If that is intended (backends accept both; \
                     docs/backend-integration.md), run `portcullis keys rotate --switch-algorithm \
                     {to}`; otherwise correct token.algorithm (PORTCULLIS__TOKEN__ALGORITHM) \
                     first. Nothing was changed.",
                    from.as_deref().unwrap_or_default(),
                    from.as_deref().unwrap_or_default()
                ),
                (false, Some(a)) if a == to => bail!(
                    "--switch-algorithm {a}: the gateways sign with {to} already, as token.algorithm \
                     says; leave the option out to rotate within {to}. Nothing was changed."
                ),
                (false, Some(a)) => bail!(
                    "--switch-algorithm {a}: the new key takes this configuration's token.algorithm, \
                     which is {to}, as the gateways sign now. To switch to {a}, set token.algorithm \
                     = \"{a}\" (or PORTCULLIS__TOKEN__ALGORITHM={a}) in the configuration the \
                     gateways and this command read, then run this again. Nothing was changed."
                ),
            }
            // The key's times are this host's: from a clock the gateways do not share it would
            // sign too early (before every cache has it) or not for a long while.
            let max = config.server.max_clock_skew;
            if !max.is_zero() {
                let before = clock.now_millis();
                if let Some(server) = fleet_time_ms(&config, durable.as_ref()).await? {
                    let offset = (before + clock.now_millis()) / 2 - server;
                    if offset.unsigned_abs() > max.as_millis() as u64 {
                        bail!(
                            "this host's clock is {} ms {} the gateways' shared store's (more than \
                             server.max_clock_skew): a key made here would start signing at the \
                             wrong time on the gateways. Set the clock right (NTP) and rotate \
                             again. Nothing was changed.",
                            offset.abs(),
                            if offset > 0 { "ahead of" } else { "behind" }
                        );
                    }
                }
            }
            let kid = crate::token::rotate(durable.as_ref(), &key, &config, clock.now()).await?;
            let mut ev = audit("signing_key_rotated", None, "cli");
            ev.reason = Some(match (switching, from.as_deref()) {
                (true, Some(f)) => format!("new_kid:{kid} alg:{f}->{to}"),
                _ => format!("new_kid:{kid}"),
            });
            durable.append_audit(&[ev]).await?;
            say!(
                "new signing key {kid} ({to}): published by every gateway within 10 seconds, \
                 signing from {} seconds from now; the previous key signs until then and stays \
                 published for {} more",
                crate::token::PUBLISH_LEAD,
                crate::config::duration::text(config.token.key_overlap)
            );
            if let (true, Some(f)) = (switching, from) {
                say!("every gateway switches from {f} to {to} with this key");
            }
        }
        Command::Audit(AuditCmd::Prune { older_than }) => {
            if older_than < MIN_AUDIT_RETENTION {
                bail!(
                    "--older-than must be at least {} (it was {}): the last day of the audit \
                     trail is always kept",
                    crate::config::duration::text(MIN_AUDIT_RETENTION),
                    crate::config::duration::text(older_than)
                );
            }
            // Before 1970 nothing was recorded: such a retention removes nothing, so it is
            // refused as a mistake rather than run with a date that means nothing.
            let before = clock
                .now()
                .checked_sub(i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX))
                .filter(|b| *b > 0)
                .with_context(|| {
                    format!(
                        "--older-than {} reaches back before 1970: no event is that old",
                        crate::config::duration::text(older_than)
                    )
                })?;
            // Its start is on the record before anything goes: a removal cut short whose end
            // cannot be written (the database gone for good) still shows in the trail.
            let mut start = audit("audit_prune_started", None, "cli");
            start.reason = Some(format!("before:{before}"));
            durable.append_audit(&[start]).await.context(
                "the prune could not be written to the audit trail; nothing was removed",
            )?;
            // Counted first: a batch removed whose commit's answer was lost is counted once the
            // database is back (nothing else removes events that old).
            let to_remove = durable.audit_events_before(before).await?;
            let mut removed: u64 = 0;
            let done = loop {
                match durable.prune_audit(before, AUDIT_PRUNE_BATCH).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => removed += n,
                    Err(e) => break Err(e),
                }
            };
            // The removal is on the record even when it stopped part-way (the store went away
            // between two batches), as far as the store still takes the event.
            let mut ev = audit("audit_pruned", None, "cli");
            if done.is_err() {
                ev.outcome = "failure".into();
            }
            let prune = (before, to_remove, done.is_err());
            let mut recorded = record_prune(durable.as_ref(), &mut ev, prune, &mut removed).await;
            if let Err(e) = done {
                // The database went away mid-way: its end is written once it is back, for up
                // to PRUNE_RECORD_PATIENCE.
                let deadline = std::time::Instant::now() + PRUNE_RECORD_PATIENCE;
                while recorded.is_err() && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    recorded = record_prune(durable.as_ref(), &mut ev, prune, &mut removed).await;
                }
                if recorded.is_err() {
                    bail!(
                        "stopped after removing {removed} audit events: {e}; the database did not \
                         come back within {} to record it (the trail holds its start, \
                         audit_prune_started)",
                        crate::config::duration::text(PRUNE_RECORD_PATIENCE)
                    );
                }
                bail!("stopped after removing {removed} audit events: {e}");
            }
            recorded?;
            say!(
                "removed {removed} audit events from before {}",
                rfc3339(before)
            );
        }
        Command::Audit(AuditCmd::Tail {
            lines,
            json,
            follow,
        }) => {
            // With `-n 0`, the newest event is looked up only to follow on from it.
            let mut events = durable
                .query_audit(&AuditQuery {
                    newest_first: true,
                    limit: lines.max(1),
                    ..Default::default()
                })
                .await?;
            let mut last = events.first().map_or(0, |e| e.id);
            // The newest event seen: where following goes on from, while the trail still holds it.
            let mut seen = events.first().map(|e| (e.id, e.at, e.event.clone()));
            if lines == 0 {
                events.clear();
            }
            events.reverse();
            loop {
                // In time order: a summary of repeated refusals is written when its run ends
                // but stamped with the run's first time.
                events.sort_by_key(|e| e.at);
                let mut out = std::io::stdout().lock();
                for e in &events {
                    if e.id >= last {
                        seen = Some((e.id, e.at, e.event.clone()));
                    }
                    last = last.max(e.id);
                    if json {
                        writeln!(out, "{}", serde_json::to_string(e)?).map_err(listing_write)?;
                    } else {
                        writeln!(
                            out,
                            "{} {:<22} {:<8} user={} ip={} reason={}{}{}",
                            rfc3339(e.at),
                            e.event,
                            e.outcome,
                            shown(e.email.as_deref().or(e.user_id.as_deref()).unwrap_or("-")),
                            shown(e.ip.as_deref().unwrap_or("-")),
                            shown(e.reason.as_deref().unwrap_or("-")),
                            e.actor
                                .as_deref()
                                .map(|a| format!(" actor={}", shown(a)))
                                .unwrap_or_default(),
                            // A summary of repeated refusals: how many it stands for.
                            if e.times == 1 {
                                String::new()
                            } else {
                                format!(" times={}", e.times)
                            }
                        )
                        .map_err(listing_write)?;
                    }
                }
                out.flush().map_err(listing_write)?;
                if !follow {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                // A database that is away (a restart, a failover) is waited for: a follower
                // feeding another system goes on where it was once the database is back.
                let mut away: Option<(std::time::Instant, std::time::Instant)> = None;
                events = loop {
                    match follow_on(durable.as_ref(), last, seen.as_ref()).await {
                        Ok(FollowOn::Next(events)) => {
                            if away.is_some() {
                                note!("audit tail: the database is back; following on");
                            }
                            break events;
                        }
                        Ok(FollowOn::Rewritten { events, newest }) => {
                            let (id, at, _) = seen.take().unwrap_or_default();
                            note!(
                                "audit tail: the trail no longer holds the last event shown (id \
                                 {id}): it was restored from a backup or rewritten; following \
                                 on with the events written since {}",
                                rfc3339(at)
                            );
                            // Those events are shown next; without any, the trail's newest
                            // (older, restored) is where following goes on from.
                            seen = newest;
                            last = seen.as_ref().map_or(0, |n| n.0);
                            if let Some(e) = events.last() {
                                last = e.id;
                                seen = Some((e.id, e.at, e.event.clone()));
                            }
                            break events;
                        }
                        Err(crate::store::StoreError::Unavailable(e)) => {
                            // Said at once, then once a minute with the error of the moment, so
                            // a failure that will not clear by itself (a revoked permission)
                            // does not go unseen.
                            let now = std::time::Instant::now();
                            match away {
                                None => {
                                    note!(
                                        "audit tail: the database is unavailable ({e}); retrying"
                                    );
                                    away = Some((now, now));
                                }
                                Some((since, said))
                                    if now.duration_since(said)
                                        >= std::time::Duration::from_secs(60) =>
                                {
                                    note!(
                                        "audit tail: the database is still unavailable after {} s ({e}); retrying",
                                        now.duration_since(since).as_secs()
                                    );
                                    away = Some((since, now));
                                }
                                Some(_) => {}
                            }
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
            }
        }
        _ => bail!("unsupported command"),
    }
    Ok(())
}

/// What following the audit trail finds next.
enum FollowOn {
    /// The events after the last one shown.
    Next(Vec<AuditEvent>),
    /// The last event shown is gone or another (a restore from a backup set the ids back): the
    /// events from its time on, and the newest id the trail now holds.
    Rewritten {
        events: Vec<AuditEvent>,
        newest: Option<(i64, i64, String)>,
    },
}

/// The events after `last`, once the trail is seen to still hold the last event shown (`seen`:
/// its id, time and name).
async fn follow_on(
    durable: &dyn DurableStore,
    last: i64,
    seen: Option<&(i64, i64, String)>,
) -> crate::store::StoreResult<FollowOn> {
    if let Some((id, at, event)) = seen {
        let now = durable
            .query_audit(&AuditQuery {
                after_id: Some(id - 1),
                limit: 1,
                ..Default::default()
            })
            .await?;
        let same = now
            .first()
            .is_some_and(|e| e.id == *id && e.at == *at && e.event == *event);
        if !same {
            let events = durable
                .query_audit(&AuditQuery {
                    since: Some(*at),
                    limit: 1000,
                    ..Default::default()
                })
                .await?;
            let newest = durable
                .query_audit(&AuditQuery {
                    newest_first: true,
                    limit: 1,
                    ..Default::default()
                })
                .await?
                .first()
                .map(|e| (e.id, e.at, e.event.clone()));
            return Ok(FollowOn::Rewritten { events, newest });
        }
    }
    Ok(FollowOn::Next(
        durable
            .query_audit(&AuditQuery {
                after_id: Some(last),
                limit: 1000,
                ..Default::default()
            })
            .await?,
    ))
}

/// A value of an audit event in `audit tail`'s text lines: as it is when it is one plain word,
/// else quoted with escapes, so that no value can break a line, fake a field or another event,
/// or send control sequences to the reader's terminal.
fn shown(value: &str) -> std::borrow::Cow<'_, str> {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\\');
    if plain && !value.chars().any(crate::policy::is_hidden_char) {
        value.into()
    } else {
        format!("{value:?}").into()
    }
}

/// Largest JWKS file `token verify` reads: a key set is a few kilobytes.
const MAX_JWKS_BYTES: u64 = 1 << 20;

/// A text file of at most `max` bytes; a longer one (or an endless one such as `/dev/zero`) is
/// refused after `max` bytes rather than read whole.
fn read_small(path: &std::path::Path, max: u64) -> Result<String> {
    use std::io::Read;
    let mut body = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut body)?;
    if body.len() as u64 > max {
        bail!("it is larger than {max} bytes, which no key set is");
    }
    String::from_utf8(body).context("it is not text")
}

/// What `token verify` was told to expect over the config's values.
struct Expected {
    audience: Option<String>,
    issuer: Option<String>,
    /// Empty: the config's `token.algorithm` alone.
    algorithms: Vec<String>,
}

/// `portcullis token verify`.
async fn verify_token(config: &Config, token: &str, jwks: &str, expect: Expected) -> Result<()> {
    let Expected {
        audience,
        issuer,
        algorithms,
    } = expect;
    let body = if jwks.starts_with("http://") {
        crate::demo::fetch_text(jwks)
            .await
            .with_context(|| format!("cannot fetch {jwks}"))?
    } else if jwks.starts_with("https://") {
        bail!("fetch https JWKS with your HTTP client and pass the file: --jwks ./jwks.json");
    } else {
        read_small(std::path::Path::new(jwks), MAX_JWKS_BYTES)
            .with_context(|| format!("cannot read {jwks}"))?
    };
    let set: serde_json::Value = serde_json::from_str(&body).context("the JWKS is not JSON")?;
    if set
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .is_none()
    {
        bail!(
            "{jwks} is not a key set (JWKS): it has no \"keys\" array; give the gateway's \
             /.well-known/jwks.json"
        );
    }
    let audience = audience.unwrap_or_else(|| config.token.audience.clone());
    let issuer = issuer.unwrap_or_else(|| config.issuer());
    // Only the algorithms a backend pins: the one the gateway is set to sign with, or those
    // given (both, during a switch).
    let accepted = if algorithms.is_empty() {
        vec![config.token.algorithm.as_str().to_string()]
    } else {
        algorithms
    };
    if let Ok(h) = jsonwebtoken::decode_header(token.trim()) {
        let alg = format!("{:?}", h.alg);
        if !accepted.contains(&alg) {
            let why = if accepted.len() == 1 && accepted[0] == config.token.algorithm.as_str() {
                format!(
                    " (token.algorithm of the config: give the gateway's --config; during an \
                     algorithm switch, which signs with the previous algorithm for 90 s more, \
                     accept both: --algorithm {} --algorithm {alg})",
                    accepted[0]
                )
            } else {
                String::new()
            };
            bail!(
                "invalid token: signed with {alg}, but accepted here: {}{why}",
                accepted.join(", ")
            );
        }
    }
    let claims = crate::token::verify(token.trim(), &set, &audience, Some(&issuer), 30)
        .map_err(|e| {
            // Say what was expected and where it came from, the usual cause being a missing
            // --config.
            let text = e.to_string();
            if text.contains("(iss)") {
                anyhow::anyhow!("{text}: expected `{issuer}` (the gateway's token.issuer: give its --config, or --issuer)")
            } else if text.contains("(aud)") {
                anyhow::anyhow!("{text}: expected `{audience}` (the gateway's token.audience: give its --config, or --audience)")
            } else {
                e.into()
            }
        })?;
    say!("{}", serde_json::to_string_pretty(&claims)?);
    note!("token is valid");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::error_text;

    #[test]
    fn each_cause_is_named_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(crate::config::ConfigError::Read {
            path: "/x.toml".into(),
            source: io,
        });
        assert_eq!(
            error_text(&e),
            "cannot read config file /x.toml: no such file"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_text(&e), "outer: inner");
    }

    #[test]
    fn the_actor_is_named_from_the_passwd_file() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\n# note\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(super::user_name(passwd, 0).as_deref(), Some("root"));
        assert_eq!(super::user_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(super::user_name(passwd, 7), None);
    }
}
