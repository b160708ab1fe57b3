//! `portcullis demo`: the gateway on embedded defaults (SQLite under a data directory, in-memory
//! sessions) in front of a small built-in ESP console. The console trusts nothing but the
//! gateway's signed assertion, verified against the gateway's JWKS like a real backend would.

mod console;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::BodyExt;

use crate::auth::password::PasswordHasher;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::crypto::{random_token, MasterKey};
use crate::secret::Secret;

/// The demo's banner lines: a closed output (`portcullis demo | head`) must not stop the
/// gateway, as a panicking `println!` would.
macro_rules! show {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
use crate::store::NewUser;

pub use console::{console_router, ConsoleState};

/// The demo user's email.
pub const DEMO_EMAIL: &str = "demo@example.com";

/// Options of `portcullis demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the demo keeps its database and master key.
    #[arg(long, default_value = "portcullis-demo")]
    pub data_dir: PathBuf,
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the built-in console (reached only through the gateway).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub console_listen: SocketAddr,
    /// The URL browsers use (default `http://LISTEN/`). Security keys and passkeys need a host
    /// name, not an IP address: `--public-url http://localhost:8080/` turns them on.
    #[arg(long)]
    pub public_url: Option<url::Url>,
}

/// Reads or creates the demo's master key file (mode 0600).
fn master_key_file(dir: &Path) -> Result<String> {
    let path = dir.join("master.key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        return Ok(k.trim().to_string());
    }
    let k = MasterKey::generate_base64();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut f, k.as_bytes())?;
    Ok(k)
}

/// What the demo sets itself, whatever a configuration file says.
const DEMO_OWN: &str =
    "server.listen, server.public_url, upstream.url, storage, secrets.master_key \
     and (without notify.smtp_url) notify.outbox_dir";

/// The settings of [`DEMO_OWN`] that `config` (as loaded) sets to something else than the
/// default, each with where the demo takes it from instead.
fn ignored_settings(config: &Config) -> Vec<&'static str> {
    let defaults = Config::default();
    let mut ignored = Vec::new();
    if config.server.listen != defaults.server.listen {
        ignored.push("server.listen (use --listen)");
    }
    if config.server.public_url != defaults.server.public_url {
        ignored.push("server.public_url (use --public-url)");
    }
    if config.upstream.url != defaults.upstream.url {
        ignored.push("upstream.url (its own demo console)");
    }
    if config.storage.durable != defaults.storage.durable
        || config.storage.ephemeral != defaults.storage.ephemeral
    {
        ignored.push("storage (a SQLite file in --data-dir, sessions in memory)");
    }
    if config.secrets.master_key.is_some() {
        ignored.push("secrets.master_key (a key file in --data-dir)");
    }
    if config.notify.smtp_url.is_none() && config.notify.outbox_dir != defaults.notify.outbox_dir {
        ignored.push("notify.outbox_dir (outbox/ in --data-dir)");
    }
    ignored
}

/// The demo's configuration: defaults, the configuration file (`--config`, `PORTCULLIS_CONFIG`)
/// if one is given, the environment, and the demo's own addresses and paths ([`DEMO_OWN`]).
pub fn demo_config(args: &DemoArgs, file: Option<&Path>) -> Result<Config> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let public_url = match &args.public_url {
        Some(u) => u.clone(),
        None => url::Url::parse(&format!("http://{}/", args.listen))?,
    };
    let console_url = url::Url::parse(&format!("http://{}/", args.console_listen))?;
    let db = args.data_dir.join("portcullis.sqlite");
    let mut ignored = Vec::new();
    // The demo's own addresses and paths are in place before the settings are checked
    // together: a step-up rule that needs keys is checked against the address served.
    let env = crate::config::environment()?;
    let mut config = Config::load_then(file, env, |config| {
        ignored = ignored_settings(config);
        config.server.listen = args.listen.to_string();
        config.server.public_url = public_url;
        config.upstream.url = console_url;
        config.storage.durable = format!("sqlite://{}", db.display());
        config.storage.ephemeral = "memory".into();
        if config.notify.smtp_url.is_none() {
            config.notify.outbox_dir = args.data_dir.join("outbox");
        }
    })?;
    if !ignored.is_empty() {
        let _ = writeln!(
            std::io::stderr(),
            "note: the demo sets {} itself; the value given (in the configuration file or a \
             PORTCULLIS__ variable) is not used",
            ignored.join(", ")
        );
    }
    config.secrets.master_key = Some(Secret::new(master_key_file(&args.data_dir)?));
    if config.step_up.is_empty() {
        // The demo console's sensitive actions: sending a campaign and making an API key need a
        // second-factor proof from the last five minutes.
        config.step_up = ["/campaigns/send", "/api-keys"]
            .into_iter()
            .map(|path| crate::policy::step_up::StepUpRule {
                path: path.into(),
                methods: vec!["POST".into()],
                max_age: std::time::Duration::from_secs(5 * 60),
                key: false,
            })
            .collect();
    }
    config.validate()?;
    Ok(config)
}

/// Writes `portcullis.toml` into the data directory: the demo's settings for the CLI, so
/// `portcullis --config DIR/portcullis.toml …` (admin bootstrap, user commands) works on the
/// demo's database. The master key stays in its own file and is referenced, not copied.
pub fn write_cli_config(args: &DemoArgs, config: &Config) -> Result<PathBuf> {
    let mut t = toml::Table::new();
    let mut section = |name: &str, pairs: &[(&str, String)]| {
        let mut s = toml::Table::new();
        for (k, v) in pairs {
            s.insert((*k).into(), toml::Value::String(v.clone()));
        }
        t.insert(name.into(), toml::Value::Table(s));
    };
    section(
        "server",
        &[
            ("listen", config.server.listen.clone()),
            ("public_url", config.server.public_url.to_string()),
        ],
    );
    section("upstream", &[("url", config.upstream.url.to_string())]);
    section(
        "storage",
        &[
            ("durable", config.storage.durable.clone()),
            ("ephemeral", config.storage.ephemeral.clone()),
        ],
    );
    let key = args.data_dir.join("master.key");
    section("secrets", &[("master_key_file", key.display().to_string())]);
    section(
        "notify",
        &[("outbox_dir", config.notify.outbox_dir.display().to_string())],
    );
    let path = args.data_dir.join("portcullis.toml");
    let text = format!(
        "# Written by `portcullis demo` at every start: the demo's settings for the CLI, e.g.\n\
         #   portcullis --config {} admin bootstrap you@example.com\n{}",
        path.display(),
        toml::to_string(&t)?
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// `portcullis demo`; `file`: the configuration file given with `--config`, if any.
pub async fn run(mut args: DemoArgs, file: Option<&Path>) -> Result<()> {
    // Absolute, so the CLI settings written there work from any directory.
    args.data_dir = std::path::absolute(&args.data_dir)
        .with_context(|| format!("cannot resolve {}", args.data_dir.display()))?;
    let config = demo_config(&args, file)?;
    if let Some(file) = file {
        show!(
            "  config:    {} applies, except what the demo sets itself: {DEMO_OWN}",
            file.display()
        );
    }
    // Both addresses first: a demo that cannot start (another one runs on them) must change
    // nothing of the one that runs, neither its CLI settings nor its user's password.
    let (a, b) = (args.listen, args.console_listen);
    let overlap = a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified());
    if overlap {
        anyhow::bail!(
            "--listen {a} and --console-listen {b} overlap (the same port, on the same or on \
             every address): the gateway and its console need an address each"
        );
    }
    let console_listener = tokio::net::TcpListener::bind(args.console_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.console_listen))?;
    let hangups = crate::server::Hangups::listen();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let cli_config = write_cli_config(&args, &config)?;
    crate::cli::init_logging(&config);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let state = crate::state::AppState::new(config.clone(), clock.clone()).await?;

    // A fresh password for the demo user at every start, printed below.
    // Nothing of the address in it, which the password policy refuses on the account page.
    let password = Secret::new(format!("pc-{}", random_token(12)));
    let hasher = PasswordHasher::new(&config.password)?;
    let hash = hasher.hash(&password).await?;
    // Whether the user has still to set up a second factor (a new one, or one that never
    // finished its first sign-in).
    // (After a reset of its factors, only an enrolment link sets one up: not fresh.)
    let fresh = match state.durable.user_by_email(DEMO_EMAIL).await? {
        Some(u) => {
            state.durable.set_password_hash(&u.id, &hash).await?;
            let keys = state.durable.webauthn_credentials(&u.id).await?;
            u.factors_reset_at.is_none()
                && state.durable.totp(&u.id).await?.is_none()
                && keys.iter().all(|k| k.is_suspended())
        }
        None => {
            let new = NewUser {
                email: DEMO_EMAIL.into(),
                account_id: "acct-demo".into(),
                is_admin: false,
                password_hash: hash,
            };
            state.durable.create_user(new, clock.now()).await?;
            true
        }
    };

    let console = ConsoleState::new(
        format!("http://{}/.well-known/jwks.json", args.listen),
        &config,
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(console_listener, console_router(console)).await {
            tracing::error!(error = %e, "demo console stopped");
        }
    });

    show!("Portcullis demo");
    show!(
        "  gateway:   {}  (open this in a browser)",
        config.server.public_url
    );
    show!(
        "  console:   http://{}/  (behind the gateway; refuses direct requests)",
        args.console_listen
    );
    show!("  data:      {}", args.data_dir.display());
    match config.notify.smtp_url {
        Some(_) => show!("  emails:    sent by SMTP (notify.smtp_url)"),
        None => show!(
            "  emails:    {}  (new-device notices land here as .eml files)",
            state.notifier.destination()
        ),
    }
    show!("");
    show!(
        "  sign in as {DEMO_EMAIL} with password: {}",
        password.expose()
    );
    if fresh {
        show!("  then scan the QR code with an authenticator app (or type the key shown) and enter its code;");
        show!("  save the recovery codes shown once.");
    } else {
        show!("  then enter the code from the authenticator you enrolled earlier (the password is new at every start)");
        show!(
            "  (or run `portcullis --config {c} user reset-mfa {DEMO_EMAIL}`, then \
             `portcullis --config {c} user enrol-link {DEMO_EMAIL}` and open the link, to enrol again).",
            c = cli_config.display()
        );
    }
    show!("");
    show!("  note: the demo serves plain HTTP on loopback, so cookies drop the __Host- prefix and the Secure flag.");
    show!(
        "  admin:     portcullis --config {} admin bootstrap you@example.com",
        cli_config.display()
    );
    show!("             prints a one-time link to set up an admin (password + security key) for /_portcullis/admin");
    if state.keys.is_none() {
        show!("  security keys and passkeys are off on an IP address; try --public-url http://localhost:{}/", args.listen.port());
    }
    crate::server::run_with(listener, state, crate::cli::shutdown_signal(), hangups).await?;
    Ok(())
}

/// GETs an `http://` URL and returns the body as text (JWKS fetching for the console and the
/// CLI; plain HTTP only).
pub async fn fetch_text(url: &str) -> Result<String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.get(uri))
        .await
        .context("timed out")??;
    if !resp.status().is_success() {
        anyhow::bail!("{url} answered {}", resp.status());
    }
    // At most 1 MiB, however the body is framed (a length, chunks, or the connection's close),
    // and within the same time limit as the answer's head.
    let limited = http_body_util::Limited::new(resp.into_body(), 1 << 20);
    let body = tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect())
        .await
        .context("timed out")?
        .map_err(
            |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => anyhow::anyhow!("{url} answered more than 1 MiB"),
                None => anyhow::anyhow!("{url}: {e}"),
            },
        )?
        .to_bytes();
    Ok(String::from_utf8(body.to_vec())?)
}
