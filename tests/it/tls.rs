//! Built-in TLS: HTTPS only on the gateway's listener (a whole sign-in over it, verified against
//! a CA made for the test), certificate reload on SIGHUP in the real binary (a broken pair is
//! refused and the old one stays), and the HTTP→HTTPS redirect listener, which never trusts the
//! Host header.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::harness::*;
use super::metrics::{serve_binary, wait_listening};

/// Runs `openssl` in `dir` with `args` (split on spaces).
fn openssl(dir: &Path, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(&args)
        .output()
        .expect("the openssl command line tool is needed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new P-256 key, unencrypted.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

/// A test CA in `dir` (`ca.pem`, `ca.key`).
pub(super) fn make_ca(dir: &Path) {
    openssl(
        dir,
        &format!("req -x509 {NEW_KEY} -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca"),
    );
}

/// A certificate for localhost and 127.0.0.1 signed by the test CA: `{name}.pem`, `{name}.key`.
pub(super) fn make_leaf(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    make_leaf_for(dir, name, "DNS:localhost,IP:127.0.0.1", 2)
}

/// A certificate for `names` (a subjectAltName list) signed by the test CA, valid for `days`
/// from now (a negative number: it ran out that many days ago).
fn make_leaf_for(dir: &Path, name: &str, names: &str, days: i32) -> (PathBuf, PathBuf) {
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={names}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &format!("req -new {NEW_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}"),
    );
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -out {name}.pem -days {days} -extfile {name}.ext"
        ),
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// A client that trusts only the test CA, keeps cookies and follows no redirects.
fn https_client(dir: &Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .tls_info(true)
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The certificate a fresh connection to `url` is shown, or `None` when no TLS session comes up.
async fn served_cert(dir: &Path, url: &str) -> Option<Vec<u8>> {
    let r = https_client(dir).get(url).send().await.ok()?;
    let info = r.extensions().get::<reqwest::tls::TlsInfo>()?;
    info.peer_certificate().map(<[u8]>::to_vec)
}

fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

#[tokio::test]
async fn sign_in_over_https_and_no_plain_http() {
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path());
    let (cert, key) = make_leaf(certs.path(), "gw");
    let mut gw = Gateway::start_with(|c| {
        let port = c.server.listen.rsplit(':').next().unwrap().to_string();
        c.server.public_url = format!("https://localhost:{port}/").parse().unwrap();
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key.clone());
        c.server.header_timeout = Duration::from_secs(2);
        c.server.max_connections_per_address = 16;
    })
    .await;
    gw.base = format!("https://localhost:{}", gw.addr.port());
    // Connections are counted per address as they are accepted, before their handshakes: a
    // client holding sixteen unfinished handshakes has its seventeenth closed at once (well
    // before the handshake's own bound), while another address is served.
    let from = |source: &'static str| async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{source}:0").parse().unwrap()).unwrap();
        s.connect(gw.addr).await.unwrap()
    };
    let mut pending = Vec::new();
    for _ in 0..16 {
        pending.push(from("127.0.0.3").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = from("127.0.0.3").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_millis(1000),
        tokio::io::AsyncReadExt::read(&mut over, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "a seventeenth connection waits for its handshake: {read:?}"
    );
    drop(pending);
    // A client that opens a connection and never starts its handshake is not waited for longer
    // than a request head would be.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(8),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "a silent TLS client held its connection: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let c = https_client(certs.path());
    let r = gw.get(&c, "/_portcullis/login").await;
    assert!(r.headers().contains_key("strict-transport-security"));
    let page = r.text().await.unwrap();
    assert!(page.contains("name=\"password\""), "{page}");
    assert_eq!(
        served_cert(certs.path(), &gw.url("/_portcullis/healthz")).await,
        Some(der(&cert))
    );
    // A whole sign-in (password, enrolment, recovery codes) and a proxied request over HTTPS,
    // with the __Host- cookies of an https deployment.
    gw.add_user("tls@example.com").await;
    gw.enrol(&c, "tls@example.com").await;
    assert_eq!(gw.status(&c, "/inbox").await, 200);
    assert_eq!(
        gw.upstream.last().header("x-forwarded-proto"),
        Some("https")
    );
    // Plain HTTP on the TLS port gets no HTTP answer at all.
    let plain = raw(gw.addr, "GET", "/_portcullis/login", &[], "").await;
    assert_eq!(plain.status, 0, "{plain:?}");
    assert!(!plain.body.contains("password"));
    // A client that does not trust the test CA refuses the connection.
    let untrusting = reqwest::Client::builder().use_rustls_tls().build().unwrap();
    assert!(untrusting.get(gw.url("/")).send().await.is_err());
}

#[tokio::test]
async fn redirect_listener_sends_browsers_to_https_on_the_public_origin() {
    let redirect = format!("127.0.0.1:{}", free_port());
    let listen = redirect.clone();
    let _gw = Gateway::start_with(|c| {
        c.server.public_url = "https://gw.example:8443/".parse().unwrap();
        c.server.redirect_http_listen = Some(listen);
    })
    .await;
    wait_listening(&redirect).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // (method, path, Host header) → Location. The Host header never decides the target.
    for (method, path, host, want) in [
        ("GET", "/", "gw.example", "https://gw.example:8443/"),
        (
            "GET",
            "/inbox?page=2&q=a%20b",
            "gw.example",
            "https://gw.example:8443/inbox?page=2&q=a%20b",
        ),
        (
            "GET",
            "/_portcullis/login",
            "evil.example",
            "https://gw.example:8443/_portcullis/login",
        ),
        (
            "POST",
            "/campaigns",
            "evil.example:443",
            "https://gw.example:8443/campaigns",
        ),
        (
            "GET",
            "//evil.example/x",
            "evil.example",
            "https://gw.example:8443//evil.example/x",
        ),
    ] {
        let r = client
            .request(method.parse().unwrap(), format!("http://{redirect}{path}"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 308, "{method} {path}");
        assert_eq!(location(&r), want, "{method} {path} Host: {host}");
    }
    // A target over `server.max_uri_length` is refused as on the main listener, not copied
    // into `Location`.
    let long = format!("/{}", "a".repeat(9000));
    for accept in ["text/html", "application/json"] {
        let r = client
            .get(format!("http://{redirect}{long}"))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 414, "{accept}");
        assert!(r.headers().get("location").is_none());
        let body = r.text().await.unwrap();
        assert!(body.contains("The address is too long"), "{body}");
    }
}

/// Waits until `check` is true, for at most ten seconds.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}");
}

fn hangup(p: &Process) {
    let ok = Command::new("kill")
        .args(["-HUP", &p.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP");
}

/// A config file in `dir` for `portcullis serve` with TLS from `cert` / `key` on `port`.
fn binary_config(
    dir: &Path,
    port: u16,
    upstream: std::net::SocketAddr,
    cert: &Path,
    key: &Path,
) -> PathBuf {
    let config = dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"https://localhost:{port}/\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n\
             [upstream]\nurl = \"http://{upstream}/\"\n\
             [storage]\ndurable = \"sqlite://{}\"\n\
             [password]\nargon2_memory_kib = 1024\nargon2_iterations = 1\n\
             [secrets]\nmaster_key = \"{}\"\n[notify]\noutbox_dir = \"{}\"\n",
            cert.display(),
            key.display(),
            dir.join("db.sqlite").display(),
            portcullis::crypto::MasterKey::generate_base64(),
            dir.join("outbox").display(),
        ),
    )
    .unwrap();
    // It holds the master key: kept to its owner, as a deployment keeps it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    config
}

#[tokio::test]
async fn serve_refuses_to_start_with_an_unusable_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d);
    let (cert, _key) = make_leaf(d, "gw");
    let (_, other_key) = make_leaf(d, "other");
    let (expired, expired_key) = make_leaf_for(d, "expired", "DNS:localhost", -1);
    let missing = d.join("missing.pem");
    // (certificate, key) → what the error names
    for (cert, key, says) in [
        (&missing, &other_key, "cannot read TLS certificate"),
        (&cert, &missing, "cannot read TLS private key"),
        (&cert, &other_key, "do not form a usable pair"),
        (&expired, &expired_key, "is not valid now: it expired at"),
    ] {
        let run = tempfile::tempdir().unwrap();
        let upstream = "127.0.0.1:9".parse().unwrap();
        let config = binary_config(run.path(), free_port(), upstream, cert, key);
        let log = run.path().join("refused.log");
        let mut p = serve_binary(&config, &[], Some(&log));
        let mut status = None;
        for _ in 0..300 {
            status = p.0.try_wait().unwrap();
            if status.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = status.expect("portcullis serve exits");
        assert!(!status.success());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(says), "{says}: {text}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d);
    let (a_cert, a_key) = make_leaf(d, "first");
    let (b_cert, b_key) = make_leaf(d, "second");
    let (cert, key) = (d.join("live.pem"), d.join("live.key"));
    std::fs::copy(&a_cert, &cert).unwrap();
    std::fs::copy(&a_key, &key).unwrap();
    let (up, _upstream) = start_upstream().await;
    let port = free_port();
    let config = binary_config(d, port, up, &cert, &key);
    let log = d.join("serve.log");
    let mut gw = serve_binary(&config, &[], Some(&log));
    let url = format!("https://localhost:{port}/_portcullis/healthz");
    let serves = |pem: PathBuf| {
        let url = url.clone();
        async move { served_cert(d, &url).await == Some(der(&pem)) }
    };
    eventually("the first certificate is served", || serves(a_cert.clone())).await;

    // A new pair on SIGHUP: new connections get it, without a restart.
    std::fs::copy(&b_cert, &cert).unwrap();
    std::fs::copy(&b_key, &key).unwrap();
    hangup(&gw);
    eventually("the second certificate is served", || {
        serves(b_cert.clone())
    })
    .await;

    // Broken pairs are refused; the second certificate stays and the process lives on. So are
    // pairs that load but that no browser would take: run out, or for another host (the most
    // common slips of a renewal).
    let garbage = d.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let (expired, expired_key) = make_leaf_for(d, "expired", "DNS:localhost", -1);
    let (elsewhere, elsewhere_key) = make_leaf_for(d, "elsewhere", "DNS:other.example", 2);
    for (i, (new_cert, new_key)) in [
        (&garbage, &b_key),           // unreadable certificate
        (&a_cert, &b_key),            // key of another certificate
        (&b_cert, &garbage),          // no key at all
        (&expired, &expired_key),     // ran out
        (&elsewhere, &elsewhere_key), // another host
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::copy(new_cert, &cert).unwrap();
        std::fs::copy(new_key, &key).unwrap();
        hangup(&gw);
        let refusals = i + 1;
        eventually("the broken pair is refused in the log", || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches("new TLS certificate refused")
                    .count()
                    == refusals
            }
        })
        .await;
        assert!(
            serves(b_cert.clone()).await,
            "pair {i}: the old certificate stays"
        );
        assert!(
            gw.0.try_wait().unwrap().is_none(),
            "the gateway is still running"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("PRIVATE KEY"),
        "no key material in logs: {text}"
    );
    assert!(
        text.contains("it expired at")
            && text.contains("is not for localhost")
            && text.contains("other.example"),
        "{text}"
    );
    drop(gw);

    // A gateway that started with a certificate for other names (warned about then: a name only
    // in the subject, a load balancer's internal name) renews as it ran: with a warning, not a
    // refusal that would keep it on the old certificate until that runs out.
    let (cert2, key2) = (d.join("live2.pem"), d.join("live2.key"));
    std::fs::copy(&elsewhere, &cert2).unwrap();
    std::fs::copy(&elsewhere_key, &key2).unwrap();
    let (renewed, renewed_key) = make_leaf_for(d, "renewed", "DNS:other.example", 3);
    let port = free_port();
    let run = d.join("second");
    std::fs::create_dir_all(&run).unwrap();
    let config = binary_config(&run, port, up, &cert2, &key2);
    let log = run.join("serve.log");
    let gw = serve_binary(&config, &[], Some(&log));
    eventually("the gateway starts, warning of the name", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("portcullis is listening") && text.contains("is not for localhost")
        }
    })
    .await;
    std::fs::copy(&renewed, &cert2).unwrap();
    std::fs::copy(&renewed_key, &key2).unwrap();
    hangup(&gw);
    eventually("the renewal is taken", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("TLS certificate reloaded")
        }
    })
    .await;
}

/// `check-config` refuses a certificate that has run out (as `serve` does) and warns of one for
/// another host than the public URL's, or one that runs out within two weeks.
#[tokio::test]
async fn check_config_refuses_an_expired_certificate_and_warns_of_a_wrong_or_ending_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d);
    let check = |cert: &Path, key: &Path| {
        let config = binary_config(d, 443, "127.0.0.1:9".parse().unwrap(), cert, key);
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["--config", config.to_str().unwrap(), "check-config"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (cert, key) = make_leaf_for(d, "good", "DNS:localhost", 90);
    let (ok, err) = check(&cert, &key);
    assert!(ok && !err.contains("warning"), "{err}");
    // A private key every user of the machine may read is pointed out.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |m| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o644);
        let (ok, err) = check(&cert, &key);
        assert!(
            ok && err.contains("(the TLS private key, server.tls_key) is readable by every user"),
            "{err}"
        );
        mode(0o600);
    }
    let (cert, key) = make_leaf_for(d, "expired", "DNS:localhost", -1);
    let (ok, err) = check(&cert, &key);
    assert!(!ok && err.contains("it expired at"), "{err}");
    let (cert, key) = make_leaf_for(d, "wild", "DNS:*.example.com,DNS:other.example", 90);
    let (ok, err) = check(&cert, &key);
    assert!(
        ok && err.contains("warning: TLS certificate")
            && err.contains("is not for localhost")
            && err.contains("*.example.com, other.example"),
        "{err}"
    );
    let (cert, key) = make_leaf_for(d, "ending", "DNS:localhost", 2);
    let (ok, err) = check(&cert, &key);
    assert!(
        ok && err.contains("expires at") && err.contains("renew it"),
        "{err}"
    );
    // A chain whose intermediate has run out (a renewal that kept an old intermediate) is
    // said; not refused, as some chains carry an expired cross-signature on purpose.
    std::fs::write(d.join("int.ext"), "basicConstraints=critical,CA:TRUE\n").unwrap();
    openssl(
        d,
        &format!("req -new {NEW_KEY} -keyout int.key -out int.csr -subj /CN=old-intermediate"),
    );
    openssl(
        d,
        "x509 -req -in int.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out int.pem -days -1 \
         -extfile int.ext",
    );
    std::fs::write(d.join("leaf.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        d,
        &format!("req -new {NEW_KEY} -keyout leaf.key -out leaf.csr -subj /CN=leaf"),
    );
    openssl(
        d,
        "x509 -req -in leaf.csr -CA int.pem -CAkey int.key -CAcreateserial -out leaf.pem \
         -days 90 -extfile leaf.ext",
    );
    let chain = d.join("chain.pem");
    let mut pem = std::fs::read(d.join("leaf.pem")).unwrap();
    pem.extend(std::fs::read(d.join("int.pem")).unwrap());
    std::fs::write(&chain, pem).unwrap();
    let (ok, err) = check(&chain, &d.join("leaf.key"));
    assert!(
        ok && err.contains("the chain's certificate \"CN=old-intermediate\" expired at"),
        "{err}"
    );
}

/// A private Redis that speaks TLS only, with a certificate from the test CA in `dir`; returns
/// the process and its port.
fn tls_redis(dir: &Path) -> (Process, u16) {
    let (cert, key) = make_leaf(dir, "redis");
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (with TLS support, as Debian builds it) is needed: apt-get install redis-server");
    (Process(child), port)
}

/// Readiness of a gateway whose ephemeral store is `url`, polled until it is `want`.
async fn ready_on(url: &str, ca: Option<PathBuf>, want: u16) -> Gateway {
    let url = url.to_string();
    let gw = Gateway::start_with(move |c| {
        c.storage.ephemeral = url;
        c.storage.redis_tls_ca = ca;
        c.storage.redis_prefix = format!("it:{}:", uuid::Uuid::new_v4().simple());
        c.storage.redis_connect_timeout = Duration::from_millis(500);
        c.storage.redis_response_timeout = Duration::from_millis(500);
    })
    .await;
    let ready = || async { gw.status(&gw.api(), "/_portcullis/readyz").await == want };
    eventually(
        &format!("readyz {want} on {}", gw.state.config.storage.ephemeral),
        ready,
    )
    .await;
    gw
}

#[tokio::test]
async fn redis_over_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path());
    let (_redis, port) = tls_redis(dir.path());
    wait_listening(&format!("127.0.0.1:{port}")).await;
    let ca = Some(dir.path().join("ca.pem"));

    // Trusting the private CA: the store answers and a whole sign-in keeps its state there.
    let gw = ready_on(&format!("rediss://127.0.0.1:{port}/0"), ca.clone(), 200).await;
    let (c, _, _) = gw.signed_in("tls-redis@example.com").await;
    assert_eq!(gw.status(&c, "/inbox").await, 200);
    assert_eq!(gw.upstream.count(), 1);
    let out = gw.cli(&["check-config"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Fail closed: the system roots do not know the test CA, and plain Redis on the TLS port
    // gets no answer. Neither gateway is ready, nor lets a sign-in through.
    for (url, ca) in [
        (format!("rediss://127.0.0.1:{port}/0"), None),
        (format!("redis://127.0.0.1:{port}/0"), None),
    ] {
        let gw = ready_on(&url, ca, 503).await;
        let r = gw.get(&gw.browser(), "/_portcullis/login").await;
        assert_eq!(r.status(), 503, "{url}");
        // `check-config` says so: a certificate refused is the configuration's fault, an
        // error; a server that gives no answer is one it could not check.
        let out = gw.cli(&["check-config"], None).await;
        let said = String::from_utf8_lossy(&out.stderr);
        if url.starts_with("rediss:") {
            assert!(
                !out.status.success() && said.contains("certificate was not accepted"),
                "{said}"
            );
        } else {
            // With the likely cause named: the server speaks TLS.
            assert!(
                out.status.success() && said.contains("if it does, use rediss://"),
                "{said}"
            );
        }
    }
}

/// Without TLS, SIGHUP (the systemd unit's `ExecReload`) must not end the gateway: it reloads
/// the GeoIP database (`risk.geoip_database`), refuses a broken one with an error log and keeps
/// the one in use, and the gateway serves on.
#[tokio::test]
async fn sighup_reloads_the_geoip_database_and_never_stops_a_gateway_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let geo = d.join("GeoLite2-City.mmdb");
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip-test.mmdb");
    std::fs::copy(&good, &geo).unwrap();
    let (up, _upstream) = start_upstream().await;
    let port = free_port();
    let config = d.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://localhost:{port}/\"\n\
             [upstream]\nurl = \"http://{up}/\"\n\
             [storage]\ndurable = \"sqlite://{}\"\n\
             [password]\nargon2_memory_kib = 1024\nargon2_iterations = 1\n\
             [secrets]\nmaster_key = \"{}\"\n[notify]\noutbox_dir = \"{}\"\n\
             [risk]\ngeoip_database = \"{}\"\n",
            d.join("db.sqlite").display(),
            portcullis::crypto::MasterKey::generate_base64(),
            d.join("outbox").display(),
            geo.display(),
        ),
    )
    .unwrap();
    let log = d.join("serve.log");
    let mut gw = serve_binary(&config, &[], Some(&log));
    let addr = format!("127.0.0.1:{port}");
    wait_listening(&addr).await;
    let logged = |what: &'static str, times: usize| {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches(what)
                .count()
                == times
        }
    };
    hangup(&gw);
    eventually("the database is reloaded", || {
        logged("GeoIP database reloaded", 1)
    })
    .await;
    std::fs::write(&geo, "not a database").unwrap();
    hangup(&gw);
    eventually("the broken database is refused", || {
        logged("GeoIP database refused", 1)
    })
    .await;
    let healthz = format!("http://{addr}/_portcullis/healthz");
    assert_eq!(reqwest::get(&healthz).await.unwrap().status(), 200);
    assert!(gw.0.try_wait().unwrap().is_none(), "the gateway runs on");
}
