//! Test harness: starts a gateway (real router, real listener on port 0, SQLite in a temp dir,
//! in-memory ephemeral store, a manual clock) in front of a recording upstream.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::StreamExt;
use portcullis::clock::{Clock, ManualClock};
use portcullis::config::Config;
use portcullis::secret::Secret;
use portcullis::state::AppState;
use portcullis::store::{NewUser, User};

pub const PASSWORD: &str = "correct horse battery staple";

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    /// The body's first 64 KiB.
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The recording upstream.
#[derive(Clone, Default)]
pub struct Upstream {
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    pub fn last(&self) -> Seen {
        self.requests()
            .last()
            .cloned()
            .expect("upstream saw no request")
    }
    /// The identity token on the last request the console received.
    pub fn last_token(&self) -> String {
        self.last()
            .header("x-portcullis-assertion")
            .expect("the last request carried no identity token")
            .to_string()
    }
}

async fn record(State(up): State<Upstream>, req: Request) -> Response {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let path = req.uri().path().to_string();
    let mut body = req.into_body().into_data_stream();
    let mut body_len = 0u64;
    let mut kept = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap_or_default();
        body_len += chunk.len() as u64;
        let room = (64 * 1024usize).saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    up.seen.lock().unwrap().push(Seen {
        method,
        uri,
        headers,
        body_len,
        body: kept,
    });
    if let Some(n) = path.strip_prefix("/download/") {
        let total: u64 = n.parse().unwrap_or(0);
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(total, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(chunk.len() as u64);
                Some((Ok::<_, std::io::Error>(chunk.slice(..n as usize)), left - n))
            }
        });
        return Response::new(Body::from_stream(stream));
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return (axum::http::StatusCode::OK, "slow answer").into_response();
    }
    if path == "/moved" || path == "/moved-away" {
        // A framework's redirect built from the `Host` it was sent (the console's own address).
        let host = headers_host(&up);
        let to = match path.as_str() {
            "/moved" => format!("http://{host}/campaigns/7?from=moved"),
            _ => "https://docs.example.com/help".to_string(),
        };
        return Response::builder()
            .status(302)
            .header("location", to)
            .body(Body::empty())
            .unwrap();
    }
    // A console page that says who may frame it (`/framing/xfo`, `/framing/csp`) or not.
    if let Some(kind) = path.strip_prefix("/framing/") {
        let mut r = Response::builder().header("content-type", "text/html");
        r = match kind {
            "xfo" => r.header("x-frame-options", "DENY"),
            "csp" => r.header(
                "content-security-policy",
                "default-src 'self'; Frame-Ancestors https://partner.example",
            ),
            _ => r.header("content-security-policy", "default-src 'self'"),
        };
        return r.body(Body::from("<p>console</p>")).unwrap();
    }
    if path == "/cookies" {
        return Response::builder()
            .status(201)
            .header("set-cookie", "a=1; Path=/")
            .header("set-cookie", "b=2; Path=/")
            .header("cache-control", "private, max-age=10")
            // A console starting and steering device-bound sessions of its own.
            .header(
                "secure-session-registration",
                "(ES256);path=\"/console/dbsc\";challenge=\"c\"",
            )
            .header("Sec-Session-Challenge", "\"c\";id=\"x\"")
            // A console echoing its request headers hands back the identity token.
            .header("x-portcullis-assertion", "leaked.token.value")
            .header("secure-session-challenge", "\"c\";id=\"x\"")
            .body(Body::from("cookies"))
            .unwrap();
    }
    (
        axum::http::StatusCode::OK,
        format!("upstream saw {body_len} bytes"),
    )
        .into_response()
}

/// The `Host` of the request the upstream saw last.
fn headers_host(up: &Upstream) -> String {
    up.last()
        .headers
        .iter()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

async fn ws_echo(ws: axum::extract::ws::WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if socket.send(msg).await.is_err() {
                break;
            }
        }
    })
}

/// Starts the recording upstream; returns its address.
pub async fn start_upstream() -> (SocketAddr, Upstream) {
    let up = Upstream::default();
    let app = Router::new()
        .route("/ws", axum::routing::any(ws_echo))
        .fallback(record)
        .with_state(up.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (addr, up)
}

/// A cookie-keeping client whose cookies the test can read.
pub struct Browser {
    pub client: reqwest::Client,
    pub jar: Arc<reqwest::cookie::Jar>,
    base: url::Url,
}

impl std::ops::Deref for Browser {
    type Target = reqwest::Client;
    fn deref(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Browser {
    /// The `Cookie` header this browser sends to the gateway.
    pub fn cookie_header(&self) -> String {
        use reqwest::cookie::CookieStore;
        self.jar
            .cookies(&self.base)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    pub base: String,
    pub state: AppState,
    pub clock: ManualClock,
    pub upstream: Upstream,
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// Config used by tests: cheap argon2 so many sign-ins stay fast.
pub fn test_config(dir: &std::path::Path, gateway: SocketAddr, upstream: SocketAddr) -> Config {
    let mut c = Config::default();
    c.server.listen = gateway.to_string();
    c.server.public_url = url::Url::parse(&format!("http://{gateway}/")).unwrap();
    c.upstream.url = url::Url::parse(&format!("http://{upstream}/")).unwrap();
    c.upstream.response_timeout = Duration::from_secs(5);
    c.storage.durable = format!("sqlite://{}", dir.join("db.sqlite").display());
    c.password.argon2_memory_kib = 1024;
    c.password.argon2_iterations = 1;
    c.secrets.master_key = Some(Secret::new(portcullis::crypto::MasterKey::generate_base64()));
    c.notify.outbox_dir = dir.join("outbox");
    // Device binding is off for tests that are not about it: their clients are plain HTTP
    // clients without a device key. `tests/it/binding.rs` switches it on ([`binding_on`]).
    c.binding.enabled = false;
    // Tests move the gateway's clock on (`FakeClock::advance`) while Redis's stays: the check
    // of clocks is for the tests about it (`it::redis::a_gateway_whose_clock_is_off_is_not_ready`).
    c.server.max_clock_skew = Duration::ZERO;
    c
}

/// The configuration adjustment of tests about device binding: on, as `serve` and `demo` run.
pub fn binding_on(c: &mut Config) {
    c.binding.enabled = true;
}

impl Gateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let (up_addr, upstream) = start_upstream().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = test_config(dir.path(), addr, up_addr);
        adjust(&mut config);
        Self::launch(dir, listener, config, upstream).await
    }

    /// A second gateway process over the same database and keys (a restart, or another
    /// gateway sharing the durable store), on a new port.
    pub async fn restarted(&self) -> Self {
        self.restarted_with(|_| {}).await
    }

    /// Like [`Gateway::restarted`], with a changed configuration.
    pub async fn restarted_with(&self, adjust: impl FnOnce(&mut Config)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = (*self.state.config).clone();
        adjust(&mut config);

        config.server.listen = addr.to_string();
        config.server.public_url = url::Url::parse(&format!("http://{addr}/")).unwrap();
        Self::launch(self.dir.clone(), listener, config, self.upstream.clone()).await
    }

    async fn launch(
        dir: Arc<tempfile::TempDir>,
        listener: tokio::net::TcpListener,
        config: Config,
        upstream: Upstream,
    ) -> Self {
        let addr = listener.local_addr().unwrap();

        config.validate().unwrap();
        let config_path = dir.path().join("portcullis.toml");
        let mut toml_text = toml::to_string(&config).unwrap();
        // The redacted dump hides the key; write the real one for CLI runs.
        let key = config.secrets.master_key.as_ref().unwrap().expose().clone();
        toml_text = toml_text.replace(
            "master_key = \"[redacted]\"",
            &format!("master_key = \"{key}\""),
        );
        std::fs::write(&config_path, toml_text).unwrap();
        let clock = ManualClock::starting_now();
        let state = AppState::new(config, Arc::new(clock.clone()))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            portcullis::server::run(listener, st, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Gateway {
            addr,
            base: format!("http://{addr}"),
            state,
            clock,
            upstream,
            dir,
            config_path,
            shutdown: Some(tx),
        }
    }

    /// Sends the shutdown signal (as SIGTERM does for the binary).
    pub fn stop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A browser-like client: cookie store, no redirects followed, Accept: text/html.
    pub fn browser(&self) -> Browser {
        let jar = Arc::new(reqwest::cookie::Jar::default());
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("accept", "text/html,application/xhtml+xml".parse().unwrap());
        let client = reqwest::Client::builder()
            .cookie_provider(jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(h)
            .build()
            .unwrap();
        Browser {
            client,
            jar,
            base: self.base.parse().unwrap(),
        }
    }

    /// The same browser (its cookie jar, its headers) connecting from another loopback address,
    /// as a laptop does on another network.
    pub fn browser_moved_to(&self, b: &Browser, address: &str) -> Browser {
        self.copied_jar(b, Some(address), None)
    }

    /// A client with `b`'s cookie jar, connecting from `address` (loopback by default) and
    /// naming itself `user_agent` (reqwest's own by default): a copy of the jar in another
    /// browser, or on another network.
    pub fn copied_jar(
        &self,
        b: &Browser,
        address: Option<&str>,
        user_agent: Option<&str>,
    ) -> Browser {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("accept", "text/html,application/xhtml+xml".parse().unwrap());
        let mut builder = reqwest::Client::builder()
            .cookie_provider(b.jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(h)
            .local_address(address.map(|a| a.parse().unwrap()));
        if let Some(agent) = user_agent {
            builder = builder.user_agent(agent);
        }
        Browser {
            client: builder.build().unwrap(),
            jar: b.jar.clone(),
            base: self.base.parse().unwrap(),
        }
    }

    /// The `Cookie` header a browser would send to the gateway (all of its cookies).
    pub fn cookies(&self, b: &Browser) -> String {
        b.cookie_header()
    }

    /// An API-like client: no cookie store, no redirects.
    pub fn api(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    pub async fn add_user(&self, email: &str) -> User {
        let hash = self
            .state
            .login
            .hasher
            .hash(&Secret::new(PASSWORD.to_string()))
            .await
            .unwrap();
        self.state
            .durable
            .create_user(
                NewUser {
                    email: email.into(),
                    account_id: "acct-1".into(),
                    is_admin: false,
                    password_hash: hash,
                },
                self.clock.now(),
            )
            .await
            .unwrap()
    }

    /// The gateway's published JWKS.
    pub async fn jwks(&self) -> serde_json::Value {
        self.api()
            .get(self.url("/.well-known/jwks.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// GETs a page and returns its CSRF token (from a form field or a script's `data-csrf`).
    pub async fn csrf(&self, c: &reqwest::Client, path: &str) -> String {
        let html = c
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        extract(&html, "name=\"csrf\" value=\"", "\"")
            .or_else(|| extract(&html, "data-csrf=\"", "\""))
            .unwrap_or_else(|| panic!("no csrf token on {path}: {html}"))
    }

    /// Posts the password form; returns the response.
    pub async fn password(
        &self,
        c: &reqwest::Client,
        email: &str,
        password: &str,
        next: &str,
    ) -> reqwest::Response {
        let csrf = self.csrf(c, "/_portcullis/login").await;
        self.login_form(c, &csrf, email, password, next)
            .send()
            .await
            .unwrap()
    }

    /// The sign-in form post, ready to send (with a CSRF token fetched earlier).
    pub fn login_form(
        &self,
        c: &reqwest::Client,
        csrf: &str,
        email: &str,
        password: &str,
        next: &str,
    ) -> reqwest::RequestBuilder {
        c.post(self.url("/_portcullis/login")).form(&[
            ("username", email),
            ("password", password),
            ("csrf", csrf),
            ("next", next),
        ])
    }

    /// Posts a code to a code page (`/_portcullis/mfa` or `/_portcullis/enrol/totp`).
    pub async fn code(&self, c: &reqwest::Client, path: &str, code: &str) -> reqwest::Response {
        let csrf = self.csrf(c, path).await;
        c.post(self.url(path))
            .form(&[("code", code), ("csrf", &csrf)])
            .send()
            .await
            .unwrap()
    }

    /// A browser's urlencoded form `body` posted to `path` from the console page `from`.
    pub async fn form_from(
        &self,
        c: &reqwest::Client,
        (path, from): (&str, &str),
        body: &str,
    ) -> reqwest::Response {
        c.post(self.url(path))
            .header("accept", "text/html")
            .header("referer", self.url(from))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    /// Sends (or with `drop`, drops) the form held under `id` from `/_portcullis/held`.
    pub async fn send_held(
        &self,
        c: &reqwest::Client,
        (id, csrf): (&str, &str),
        drop: bool,
    ) -> reqwest::Response {
        let mut form = vec![("csrf", csrf), ("id", id)];
        if drop {
            form.push(("drop", "1"));
        }
        c.post(self.url("/_portcullis/held"))
            .header("accept", "text/html")
            .form(&form)
            .send()
            .await
            .unwrap()
    }

    /// A browser's navigation to `path` with `c` (`Accept: text/html`), not followed.
    pub async fn navigate(&self, c: &reqwest::Client, path: &str) -> reqwest::Response {
        c.get(self.url(path))
            .header("accept", "text/html")
            .send()
            .await
            .unwrap()
    }

    /// `GET path` with `c`.
    pub async fn get(&self, c: &reqwest::Client, path: &str) -> reqwest::Response {
        c.get(self.url(path)).send().await.unwrap()
    }

    /// The status of `GET path` with `c`.
    pub async fn status(&self, c: &reqwest::Client, path: &str) -> u16 {
        self.get(c, path).await.status().as_u16()
    }

    /// The text of a page fetched with `c`.
    pub async fn page(&self, c: &reqwest::Client, path: &str) -> String {
        c.get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Password + the TOTP enrolment form: returns the secret and the response to the confirmed
    /// code (a redirect to the recovery codes).
    pub async fn enrol_totp(
        &self,
        c: &reqwest::Client,
        email: &str,
    ) -> (Vec<u8>, reqwest::Response) {
        let r = self.password(c, email, PASSWORD, "").await;
        assert_eq!(r.status(), 303);
        assert_eq!(location(&r), "/_portcullis/enrol/totp");
        self.enrol_app(c).await
    }

    /// The TOTP enrolment form of a session at that step (after the password, or an enrolment
    /// link): returns the secret and the response to the confirmed code (a redirect to the
    /// recovery codes).
    pub async fn enrol_app(&self, c: &reqwest::Client) -> (Vec<u8>, reqwest::Response) {
        let html = self.page(c, "/_portcullis/enrol/totp").await;
        let b32 = extract(&html, "id=\"totp-secret\">", "<").expect("secret on enrolment page");
        let secret = totp_rs::Secret::Encoded(b32).to_bytes().unwrap();
        let r = self
            .code(c, "/_portcullis/enrol/totp", &self.totp_now(&secret))
            .await;
        assert_eq!(r.status(), 303);
        assert_eq!(location(&r), "/_portcullis/recovery-codes");
        (secret, r)
    }

    /// Password + forced enrolment + recovery codes: returns the TOTP secret and the codes.
    pub async fn enrol(&self, c: &reqwest::Client, email: &str) -> (Vec<u8>, Vec<String>) {
        let (secret, _) = self.enrol_totp(c, email).await;
        let (codes, r) = self.save_recovery_codes(c).await;
        assert_eq!(r.status(), 303);
        (secret, codes)
    }

    /// Reads the recovery codes page and confirms it (which completes the sign-in); returns the
    /// codes and the answer to the confirmation.
    pub async fn save_recovery_codes(
        &self,
        c: &reqwest::Client,
    ) -> (Vec<String>, reqwest::Response) {
        let html = self.page(c, "/_portcullis/recovery-codes").await;
        let codes: Vec<String> = html
            .split("<li><code>")
            .skip(1)
            .filter_map(|s| s.split('<').next().map(str::to_string))
            .collect();
        assert_eq!(codes.len(), 10, "{html}");
        let csrf = extract(&html, "name=\"csrf\" value=\"", "\"").unwrap();
        let r = c
            .post(self.url("/_portcullis/recovery-codes"))
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        (codes, r)
    }

    pub fn totp_now(&self, secret: &[u8]) -> String {
        portcullis::auth::totp::code_at(secret, self.clock.now())
    }

    /// A fully signed-in browser for a new user; returns the client and the TOTP secret.
    pub async fn signed_in(&self, email: &str) -> (Browser, Vec<u8>, Vec<String>) {
        self.add_user(email).await;
        let c = self.browser();
        let (secret, codes) = self.enrol(&c, email).await;
        (c, secret, codes)
    }

    /// Signs in an enrolled user with password + TOTP in a fresh browser, moving the clock one
    /// step on so the code is new.
    pub async fn sign_in_again(&self, email: &str, secret: &[u8]) -> Browser {
        let c = self.browser();
        self.sign_in_on(&c, email, secret).await;
        c
    }

    /// Signs in an enrolled user with password + TOTP in browser `c` (which keeps its device
    /// cookie), moving the clock one step on so the code is new.
    pub async fn sign_in_on(&self, c: &reqwest::Client, email: &str, secret: &[u8]) {
        self.clock.advance(30);
        let r = self.password(c, email, PASSWORD, "").await;
        assert_eq!(location(&r), "/_portcullis/mfa");
        let r = self
            .code(c, "/_portcullis/mfa", &self.totp_now(secret))
            .await;
        assert_eq!(r.status(), 303);
    }

    /// The stored record of a user.
    pub async fn user(&self, email: &str) -> User {
        self.state
            .durable
            .user_by_email(email)
            .await
            .unwrap()
            .expect("user exists")
    }

    /// Delivers queued mail and returns every message in the outbox so far, oldest first, as
    /// its headers and its decoded body (see [`readable_mail`]).
    pub async fn outbox(&self) -> Vec<String> {
        // The gateway's own mail worker may hold a message mid-write: wait until the queue has
        // nothing unsent.
        for _ in 0..250 {
            self.state.notifier.deliver_due().await.unwrap();
            let queue = self.state.durable.list_mail(10_000).await.unwrap();
            if queue.iter().all(|m| m.sent_at.is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dir = self.dir.path().join("outbox");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|x| x == "eml"));
        names.sort();
        names
            .iter()
            .map(|p| readable_mail(&std::fs::read(p).unwrap()))
            .collect()
    }

    /// Runs the real binary against this gateway's config. Async, so the in-test gateway keeps
    /// running meanwhile (a blocked test thread would stall it mid-transaction and hold the
    /// SQLite write lock against the CLI).
    pub async fn cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        self.cli_env(args, stdin, &[]).await
    }

    /// [`Self::cli`] with environment variables set for the command.
    pub async fn cli_env(
        &self,
        args: &[&str],
        stdin: Option<&str>,
        env: &[(&str, &str)],
    ) -> std::process::Output {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.arg("--config").arg(&self.config_path).args(args);
        cmd.envs(env.iter().copied());
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).await.unwrap();
        }
        drop(input);
        child.wait_with_output().await.unwrap()
    }

    /// Audit events so far (after flushing the writer).
    pub async fn audit(&self) -> Vec<portcullis::store::AuditEvent> {
        self.state.audit.flush().await;
        self.state
            .durable
            .query_audit(&portcullis::store::AuditQuery {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
    }
}

/// The gateway's page hardening (`what` names the answer in failures): a strict CSP, nothing
/// kept, no referrer, no sniffing.
pub fn assert_hardened(h: &reqwest::header::HeaderMap, what: &str) {
    let csp = h
        .get("content-security-policy")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{what}: {csp}"
    );
    assert_eq!(h.get("cache-control").unwrap(), "no-store", "{what}");
    assert_eq!(h.get("referrer-policy").unwrap(), "no-referrer", "{what}");
    assert_eq!(
        h.get("x-content-type-options").unwrap(),
        "nosniff",
        "{what}"
    );
}

pub fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A page without its lines that carry a CSRF token (which differ on every load), to compare
/// two pages.
pub fn without_csrf(page: String) -> String {
    page.lines()
        .filter(|l| !l.contains("csrf"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn extract(haystack: &str, start: &str, end: &str) -> Option<String> {
    let i = haystack.find(start)? + start.len();
    let j = haystack[i..].find(end)? + i;
    Some(haystack[i..j].to_string())
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Raw {
    /// The `Location` header, empty when there is none.
    pub fn location(&self) -> String {
        self.header("location").unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends a request exactly as written (no client-side URL normalisation), with `Connection:
/// close`, and reads the whole answer.
pub async fn raw(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// The session cookie pair (`name=value`) a response set.
pub fn session_cookie(r: &reqwest::Response) -> String {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.contains("portcullis-session=") && !v.contains("Max-Age=0"))
        .map(|v| v.split(';').next().unwrap().to_string())
        .expect("a session cookie")
}

/// A message as a test reads it: `Name: value` header lines, a blank line, the body with its
/// transfer encoding (quoted-printable for long lines) undone.
pub fn readable_mail(raw: &[u8]) -> String {
    let m = mailparse::parse_mail(raw).expect("a well-formed message");
    let mut out = String::new();
    for h in &m.headers {
        out.push_str(&format!("{}: {}\n", h.get_key(), h.get_value()));
    }
    out.push('\n');
    out.push_str(&m.get_body().expect("a decodable body"));
    out
}

impl Gateway {
    /// The master key of the gateway's configuration, as written to its config file.
    pub fn master_key(&self) -> String {
        let key = self.state.config.secrets.master_key.as_ref();
        key.unwrap().expose().clone()
    }

    /// Takes a user's authenticator app away in the database, as for an account that enrolled
    /// a key only (the gateway itself never removes the last factor).
    pub async fn drop_totp(&self, user_id: &str) {
        let url = format!("sqlite://{}", self.dir.path().join("db.sqlite").display());
        let db = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("DELETE FROM totp_credentials WHERE user_id = ?")
            .bind(user_id)
            .execute(&db)
            .await
            .unwrap();
    }

    /// Breaks the durable store under the running gateway (its users table disappears) and
    /// moves the clock past any cached user check; returns a pool on the database to repair it.
    pub async fn break_durable_store(&self) -> sqlx::SqlitePool {
        let url = format!("sqlite://{}", self.dir.path().join("db.sqlite").display());
        let admin = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("ALTER TABLE users RENAME TO users_away")
            .execute(&admin)
            .await
            .unwrap();
        self.clock.advance(2);
        admin
    }

    /// An API client carrying `b`'s cookies gets `path` refused with the JSON 503 of a store
    /// outage (fail closed).
    pub async fn assert_unavailable_json(&self, b: &Browser, path: &str) {
        let r = self
            .api()
            .get(self.url(path))
            .header("cookie", self.cookies(b))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unavailable", "JSON for API clients");
    }
}

/// A port nothing listens on right now, for a listener a test starts a moment later (a
/// gateway's metrics, a private Redis, nginx, a child process). Taken below the kernel's range
/// of ephemeral ports (32768 and up), where the outgoing connections of tests running beside
/// this one take theirs: a port handed out from that range could be taken by one of them
/// between this check and the bind. Each port is handed out once per test process, from a
/// start that differs between processes.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % SPAN).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// A child process killed (and reaped) when the test lets go of it, also on panic.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private PostgreSQL server for fault tests: its own data directory and unix socket directory
/// in a temp dir, trust authentication, listening on 127.0.0.1 on a port of its own, so tests can
/// stop, kill and restart it without touching the shared server. It runs as the `postgres` OS
/// user (the server refuses to run as root). Dropping it shuts the server down at once.
pub struct PrivatePostgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: (u32, u32),
    postmaster: Option<std::process::Child>,
    /// Server settings beyond the defaults (`-c name=value`).
    settings: Vec<String>,
}

impl PrivatePostgres {
    const HOWTO: &'static str =
        "PostgreSQL server binaries are needed for the PostgreSQL fault tests: apt-get install postgresql";

    /// Creates a cluster (`initdb`, a few seconds) and starts it.
    pub async fn start() -> Self {
        Self::start_with(|_| Vec::new()).await
    }

    /// As [`PrivatePostgres::start`], serving TLS (also) with `cert` and `key` (PEM); plain
    /// connections are still accepted.
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
        Self::start_with(move |(data, user)| {
            // The server reads its key only if it owns it and no one else may read it.
            for (from, name) in [(&cert, "server.crt"), (&key, "server.key")] {
                let to = data.join(name);
                std::fs::copy(from, &to).unwrap();
                std::os::unix::fs::chown(&to, Some(user.0), Some(user.1)).unwrap();
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .unwrap();
            }
            vec!["ssl=on".into()]
        })
        .await
    }

    /// Creates a cluster and starts it with the settings `prepare` returns, after it has put
    /// what they need into the data directory.
    async fn start_with(
        prepare: impl FnOnce((&std::path::Path, (u32, u32))) -> Vec<String>,
    ) -> Self {
        use std::os::unix::process::CommandExt;
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            })
            .unwrap_or_else(|| panic!("no /usr/lib/postgresql/*/bin/initdb. {}", Self::HOWTO));
        let id = |flag: &str| -> u32 {
            let out = std::process::Command::new("id")
                .args([flag, "postgres"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("no `postgres` OS user. {}", Self::HOWTO))
        };
        let user = (id("-u"), id("-g"));
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(user.0), Some(user.1)).unwrap();
        let out = std::process::Command::new(bin.join("initdb"))
            .args([
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
                "--encoding=UTF8",
            ])
            .arg("-D")
            .arg(dir.path().join("data"))
            .uid(user.0)
            .gid(user.1)
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let settings = prepare((&dir.path().join("data"), user));
        let mut pg = Self {
            port: free_port(),
            dir,
            bin,
            user,
            postmaster: None,
            settings,
        };
        pg.restart().await;
        pg
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server on the same port and data directory and waits until it accepts
    /// connections. After a hard kill the old server's processes may still be on their way
    /// out; a start refused for that is tried again.
    pub async fn restart(&mut self) {
        use std::os::unix::process::CommandExt;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut child = std::process::Command::new(self.bin.join("postgres"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-k")
                .arg(self.dir.path())
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
                .uid(self.user.0)
                .gid(self.user.1)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(self.dir.path().join("server.log")).unwrap())
                .spawn()
                .unwrap();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(self.dir.path().join("server.log"));
                    assert!(
                        std::time::Instant::now() < deadline,
                        "postgres exited ({status}): {}",
                        log.unwrap_or_default()
                    );
                    break;
                }
                if let Ok(c) = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url()).await
                {
                    let _ = sqlx::Connection::close(c).await;
                    self.postmaster = Some(child);
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "postgres did not accept connections on {}",
                    self.port
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fast shutdown (`SIGINT`): open transactions are rolled back, clients disconnected,
    /// everything committed is kept. Returns when the server has exited.
    pub fn stop(&mut self) {
        self.signal("-INT");
    }

    /// A hard kill (`SIGKILL`) of the postmaster, as a crash would; its backends notice and
    /// exit, and the next start recovers from the write-ahead log.
    pub fn kill(&mut self) {
        self.signal("-KILL");
    }

    fn signal(&mut self, signal: &str) {
        if let Some(mut child) = self.postmaster.take() {
            let _ = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Immediate shutdown: the postmaster stops its backends and removes its shared memory.
        self.signal("-QUIT");
    }
}

impl Gateway {
    /// Points the client helpers (`url`, `password`, `code`, `browser`, …) at another gateway on
    /// `addr` that shares this one's config and stores, such as `portcullis serve` run with
    /// [`Gateway::config_path`]. `state` stays this process's view of the shared stores.
    pub fn aim_at(&mut self, addr: SocketAddr) {
        self.addr = addr;
        self.base = format!("http://{addr}");
    }

    /// Polls `/_portcullis/readyz` until it answers `want` (a gateway reconnects to its stores
    /// on its own schedule); fails after a minute.
    pub async fn wait_readyz(&self, want: u16) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.api().get(self.url("/_portcullis/readyz")).send().await;
            if status.as_ref().is_ok_and(|r| r.status() == want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "readyz never answered {want}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A fresh PostgreSQL database on the shared server: its name and URL (drop it with
/// [`drop_database`]).
pub async fn fresh_database() -> (String, String) {
    use sqlx::{Connection, Executor};
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/test")
        .await
        .expect(
            "PostgreSQL must answer on 127.0.0.1:5432 (user postgres, trust auth, database test)",
        );
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    (
        name.clone(),
        format!("postgres://postgres@127.0.0.1:5432/{name}"),
    )
}

pub async fn drop_database(name: &str) {
    use sqlx::{Connection, Executor};
    if let Ok(mut admin) =
        sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/test").await
    {
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
    }
}

/// Waits until `child` (a server this test started, writing its errors to `log`) accepts
/// connections on `addr`; panics with its log when it exits first or takes over 10 seconds.
pub async fn wait_listening(
    child: &mut std::process::Child,
    addr: SocketAddr,
    log: &std::path::Path,
) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{log:?}: exited ({status}): {:?}",
                std::fs::read_to_string(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "nothing listens on {addr}: {:?}",
        std::fs::read_to_string(log)
    );
}
