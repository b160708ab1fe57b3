use super::*;

fn load_str(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile_dir();
    let p = dir.join("c.toml");
    std::fs::write(&p, toml_text).unwrap();
    Config::load(
        Some(&p),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("portcullis-cfg-{}", crate::crypto::random_token(8)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn defaults_are_valid() {
    let c = Config::load(None, Vec::new()).unwrap();
    assert_eq!(c.token.header, "X-Portcullis-Assertion");
    assert_eq!(c.token.ttl, Duration::from_secs(120));
    assert!(!c.is_https());
}

#[test]
fn unknown_keys_are_named() {
    let e = load_str("[server]\nlisen = \"0.0.0.0:1\"\n", &[]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("server.lisen"), "{msg}");
    let e = load_str("[sever]\nlisten = \"0.0.0.0:1\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("sever"), "{e}");
}

#[test]
fn env_overrides_file_and_parses_types() {
    let c = load_str(
        "[server]\nlisten = \"127.0.0.1:1\"\n",
        &[
            ("PORTCULLIS__SERVER__LISTEN", "127.0.0.1:9999"),
            ("PORTCULLIS__SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/8\"]"),
            ("PORTCULLIS__TOKEN__TTL", "60"),
            ("PORTCULLIS__SESSION__IDLE_TIMEOUT", "5m"),
            ("OTHER", "ignored"),
        ],
    )
    .unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:9999");
    assert_eq!(c.server.trusted_proxies.len(), 1);
    assert_eq!(c.token.ttl, Duration::from_secs(60));
    assert_eq!(c.session.idle_timeout, Duration::from_secs(300));
    let e = load_str("", &[("PORTCULLIS__NOPE__X", "1")]).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn secrets_come_from_files_and_are_redacted() {
    let dir = tempfile_dir();
    let key = crate::crypto::MasterKey::generate_base64();
    std::fs::write(dir.join("mk"), format!("{key}\n")).unwrap();
    let c = load_str(
        &format!(
            "[secrets]\nmaster_key_file = \"{}\"\n",
            dir.join("mk").display()
        ),
        &[],
    )
    .unwrap();
    assert!(c.master_key().is_ok());
    let dump = c.to_redacted_toml();
    assert!(!dump.contains(&key), "{dump}");
    assert!(dump.contains("[redacted]"), "{dump}");
    // The SMTP URL is shown as the store URLs are: all but its password.
    let c = load_str(
        "[notify]\nsmtp_url = \"smtps://mailer:s3cret-pw@smtp.example.com:465\"\n",
        &[],
    )
    .unwrap();
    let dump = c.to_redacted_toml();
    assert!(
        dump.contains("smtp_url = \"smtps://mailer:[redacted]@smtp.example.com:465\"")
            && !dump.contains("s3cret-pw"),
        "{dump}"
    );
    // Values the gateway derives are shown as it will use them: the issuer from the public URL.
    assert!(
        dump.contains("issuer = \"http://127.0.0.1:8080\""),
        "{dump}"
    );
    let e = load_str(
        &format!("[secrets]\nmaster_key = \"{key}\"\nmaster_key_file = \"/x\"\n"),
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("keep one"), "{e}");
}

#[test]
fn bad_values_are_refused_with_the_key() {
    for (text, key) in [
        ("[token]\nttl = \"10m\"\n", "token.ttl"),
        ("[token]\nttl = \"soon\"\n", "token.ttl"),
        (
            "[session]\nidle_timeout = \"40s\"\n",
            "session.idle_timeout",
        ),
        (
            "[session]\nlogin_timeout = \"0s\"\n",
            "session.login_timeout",
        ),
        (
            "[session]\nlogin_timeout = \"2h\"\n",
            "session.login_timeout",
        ),
        ("[server]\npublic_url = \"ftp://x\"\n", "server.public_url"),
        (
            "[server]\ntrusted_proxies = [\"not-a-cidr\"]\n",
            "server.trusted_proxies",
        ),
        ("[upstream]\nurl = \"https://x\"\n", "upstream.url"),
        ("[password]\nmin_length = 4\n", "password.min_length"),
        ("[secrets]\nmaster_key = \"short\"\n", "secrets.master_key"),
        (
            "[storage]\nephemeral = \"memcached\"\n",
            "storage.ephemeral",
        ),
        ("[notify]\nfrom = \"not an address\"\n", "notify.from"),
        (
            "[notify]\nreport_link_ttl = \"5m\"\n",
            "notify.report_link_ttl",
        ),
        ("[notify]\nsmtp = \"smtp://x\"\n", "notify.smtp"),
        (
            "[notify]\nsmtp_url = \"smtps://u:p@mail:465?tls=bogus\"\n",
            "notify.smtp_url",
        ),
        (
            "[notify]\nsmtp_url = \"smtp://mail:25?tsl=required\"\n",
            "notify.smtp_url",
        ),
        // Which of two would decide TLS is not clear: refused.
        (
            "[notify]\nsmtp_url = \"smtp://mail:25?tls=opportunistic&tls=required\"\n",
            "twice",
        ),
        (
            "[notify]\nsmtp_url = \"smtp://mail:25?tls=bogus\"\n",
            "tls=required",
        ),
        (
            "[server]\npublic_url = \"https://login.esp.example/#f\"\n",
            "fragment",
        ),
        (
            "[storage]\nephemeral = \"rediss://r:notaport\"\n",
            "storage.ephemeral",
        ),
        (
            "[storage]\nephemeral = \"redis://r:6379\"\nredis_tls_ca = \"/etc/ssl/ca.pem\"\n",
            "storage.redis_tls_ca",
        ),
        (
            "[storage]\nephemeral = \"rediss://r:6379\"\nredis_tls_ca = \"/nonexistent/ca.pem\"\n",
            "storage.redis_tls_ca",
        ),
        ("[storage]\nredis_prefix = \"\"\n", "storage.redis_prefix"),
        (
            "[upstream]\nallowed_origins = [\"https://app.example.com/\"]\n",
            "upstream.allowed_origins",
        ),
        (
            "[upstream]\nallowed_origins = [\"https://App.example.com\"]\n",
            "upstream.allowed_origins",
        ),
        (
            "[upstream]\nallowed_origins = [\"https://app.example.com:443\"]\n",
            "upstream.allowed_origins",
        ),
        (
            "[upstream]\nallowed_origins = [\"app.example.com\"]\n",
            "upstream.allowed_origins",
        ),
        (
            "[upstream]\nallowed_origins = [\"null\"]\n",
            "upstream.allowed_origins",
        ),
        (
            "[upstream]\nallowed_origins = [\"https://*.example.com\"]\n",
            "upstream.allowed_origins",
        ),
        (
            "[upstream]\nallowed_origins = [\"https://a..b\"]\n",
            "upstream.allowed_origins",
        ),
        (
            "[upstream]\nallowed_origins = [\"https://x_y.example.com\"]\n",
            "upstream.allowed_origins",
        ),
        (
            "[storage]\nredis_connect_timeout = 0\n",
            "storage.redis_connect_timeout",
        ),
        (
            "[storage]\nredis_response_timeout = \"1h\"\n",
            "storage.redis_response_timeout",
        ),
        ("[storage]\ndurable = \"mysql://x\"\n", "storage.durable"),
        (
            "[storage]\ndurable = \"postgres://u:pw@127.0.0.1:5432/db?sslmode=bogus\"\n",
            "storage.durable",
        ),
        (
            "[storage]\ndurable = \"sqlite://x.sqlite?mode=bogus\"\n",
            "storage.durable",
        ),
        (
            "[storage]\ndurable = \"sqlite::memory:\"\n",
            "storage.durable",
        ),
        (
            "[storage]\ndurable = \"sqlite://x.sqlite?mode=memory\"\n",
            "storage.durable",
        ),
        (
            "[storage]\ndurable = \"sqlite://x.sqlite?vfs=memdb\"\n",
            "storage.durable",
        ),
        (
            "[storage]\ndurable = \"sqlite:file::memory:\"\n",
            "storage.durable",
        ),
        (
            "[storage]\nredis_tls_ca = \"/etc/ssl/ca.pem\"\n",
            "storage.redis_tls_ca",
        ),
        (
            "[storage]\ndurable = \"postgres://u:pw@127.0.0.1:notaport/db\"\n",
            "storage.durable",
        ),
        // No database named: the server's default for the user would get the tables.
        (
            "[storage]\ndurable = \"postgres://u@127.0.0.1:5432\"\n",
            "names no database",
        ),
        (
            "[storage]\ndurable = \"postgresql://u@127.0.0.1/\"\n",
            "names no database",
        ),
        // An option the driver would ignore: a misspelled sslmode would leave the connection
        // free to be plain text.
        (
            "[storage]\ndurable = \"postgres://u@db.example/db?sslmod=verify-full\"\n",
            "`sslmod`",
        ),
        (
            "[storage]\ndurable = \"postgres://u@db.example/db?sslmode=verify-full&bogus=1\"\n",
            "`bogus`",
        ),
        // TLS files the database URL names, read only at the first connection.
        (
            "[storage]\ndurable = \"postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\"\n",
            "/nonexistent/ca.pem",
        ),
        (
            "[storage]\ndurable = \"postgres://u@h/db?sslmode=verify-full&sslrootcert=/dev/null\"\n",
            "no PEM certificate",
        ),
        (
            "[storage]\ndurable = \"postgres://u@h/db?sslcert=/nonexistent/c.pem&sslkey=/etc/hostname\"\n",
            "sslcert /nonexistent/c.pem",
        ),
        // The Redis driver would skip certificate checks for `#insecure`.
        (
            "[storage]\nephemeral = \"rediss://r:6379/0#insecure\"\n",
            "certificate checks",
        ),
        (
            "[storage]\nephemeral = \"rediss+cluster://a:1,b:2#insecure\"\n",
            "storage.ephemeral",
        ),
        // Options the driver would ignore: `?tls=true` would stay a plain connection.
        (
            "[storage]\nephemeral = \"redis://r:6379/0?tls=true\"\n",
            "options (`?…`) are not accepted",
        ),
        (
            "[storage]\nephemeral = \"redis+cluster://a:1,b:2/0?ssl=1\"\n",
            "options (`?…`) are not accepted",
        ),
        // Values that cannot work, refused here rather than at the first sign-in.
        ("[password]\nmin_length = 300\n", "password.min_length"),
        (
            "[password]\nargon2_memory_kib = 99999999\n",
            "password.argon2_memory_kib",
        ),
        (
            "[password]\nargon2_iterations = 0\n",
            "password.argon2_iterations",
        ),
        (
            "[password]\nargon2_parallelism = 0\n",
            "password.argon2_parallelism",
        ),
        (
            "[password]\nmax_concurrent_hashes = 3000\n",
            "password.max_concurrent_hashes",
        ),
        ("[server]\nmax_form_bytes = 0\n", "server.max_form_bytes"),
        (
            "[upstream]\nresponse_timeout = \"0s\"\n",
            "upstream.response_timeout",
        ),
        (
            "[upstream]\nconnect_timeout = \"0s\"\n",
            "upstream.connect_timeout",
        ),
        (
            "[upstream]\nurl = \"http://u:secretpw@127.0.0.1:1/\"\n",
            "upstream.url",
        ),
        (
            "[upstream]\nurl = \"http://127.0.0.1:1/b?a=1\"\n",
            "upstream.url",
        ),
        (
            "[server]\npublic_url = \"http://user:pw@x/\"\n",
            "server.public_url",
        ),
        ("[token]\nissuer = \"\"\n", "token.issuer"),
        ("[notify]\noutbox_dir = \"\"\n", "notify.outbox_dir"),
        ("[limits]\nfailures_per_ip = 0\n", "limits.failures_per_ip"),
        ("[limits]\nwindow = 0\n", "limits.window"),
        (
            "[server]\ntrusted_proxies = [\"10.0.0.1/8\"]\n",
            "server.trusted_proxies",
        ),
        (
            "[server]\npublic_url = \"https://x/\"\nredirect_http_listen = \"127.0.0.1:9\"\n\
             [metrics]\nlisten = \"127.0.0.1:9\"\n",
            "metrics.listen",
        ),
        (
            "[webauthn]\nattestation_ca_files = [\"/nonexistent/ca.pem\"]\n",
            "webauthn.attestation_ca_files",
        ),
        (
            "[server]\nlisten = \"0.0.0.0:9400\"\n[metrics]\nlisten = \"127.0.0.1:9400\"\n",
            "metrics.listen",
        ),
    ] {
        let e = load_str(text, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{text} → {e}");
    }
}

#[test]
fn smtp_password_is_never_shown() {
    let pw = "hunter2-smtp-Secret";
    // Unusable scheme: refused by key, without echoing the URL.
    let e = load_str(
        &format!("[notify]\nsmtp_url = \"gopher://mailer:{pw}@mail.example\"\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("notify.smtp_url"), "{e}");
    assert!(!e.contains(pw), "{e}");
    // Usable: accepted, and redacted in the dump check-config prints.
    let c = load_str(
        "",
        &[(
            "PORTCULLIS__NOTIFY__SMTP_URL",
            &format!("smtps://mailer:{pw}@mail.example:465"),
        )],
    )
    .unwrap();
    assert!(c.notify.smtp_url.is_some());
    let dump = c.to_redacted_toml();
    assert!(!dump.contains(pw), "{dump}");
    assert!(!format!("{c:?}").contains(pw));
}

#[test]
fn redis_settings_parse() {
    let c = load_str(
        "[storage]\nephemeral = \"redis+cluster://h1:7000,h2:7001\"\n\
         redis_prefix = \"gw1:\"\nredis_connect_timeout = \"500ms\"\nredis_response_timeout = 2\n",
        &[],
    )
    .unwrap();
    let s = &c.storage;
    assert_eq!(s.redis_prefix, "gw1:");
    assert_eq!(s.redis_connect_timeout, Duration::from_millis(500));
    assert_eq!(s.redis_response_timeout, Duration::from_secs(2));
    assert!(matches!(
        s.redis_target().unwrap(),
        Some(crate::store::redis::RedisTarget::Cluster(n)) if n.len() == 2
    ));
    let d = Config::load(None, Vec::new()).unwrap();
    assert_eq!(d.storage.redis_prefix, "portcullis:");
    assert!(d.storage.redis_target().unwrap().is_none());
}

#[test]
fn store_passwords_never_show() {
    let c = load_str(
        "[storage]\nephemeral = \"redis://:r3dis-pw@127.0.0.1:6379/0\"\n\
         durable = \"postgres://gw:pg-pw@127.0.0.1/gw\"\n",
        &[],
    )
    .unwrap();
    for shown in [c.to_redacted_toml(), format!("{c:?}")] {
        assert!(!shown.contains("r3dis-pw"), "{shown}");
        assert!(!shown.contains("pg-pw"), "{shown}");
        assert!(shown.contains("127.0.0.1:6379"), "{shown}");
    }
    // The configuration itself still holds the real URL.
    assert!(c.storage.ephemeral.contains("r3dis-pw"));
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/portcullis.example.toml");
    let c = Config::load(Some(&path), Vec::new()).unwrap();
    assert_eq!(c.storage.redis_prefix, "portcullis:");
    let c = Config::load(
        Some(&path),
        [(
            "PORTCULLIS__STORAGE__EPHEMERAL".to_string(),
            "redis://:pw@10.0.0.5:6379/0".to_string(),
        )],
    )
    .unwrap();
    assert!(c.storage.redis_target().unwrap().is_some());
}

#[test]
fn webauthn_defaults_follow_the_public_url() {
    let c = Config::load(None, Vec::new()).unwrap();
    assert!(c.webauthn.enabled);
    assert_eq!(c.webauthn.user_verification, UserVerification::Required);
    assert_eq!(c.webauthn.ceremony_timeout, Duration::from_secs(120));
    // The default public URL is an IP address: keys cannot work there, so they are off.
    assert_eq!(c.webauthn_rp_id(), None);
    let c = load_str(
        "[server]\npublic_url = \"https://login.esp.example/\"\n[webauthn]\nuser_verification = \"preferred\"\nceremony_timeout = \"5m\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.webauthn_rp_id().as_deref(), Some("login.esp.example"));
    // check-config shows the relying party in force, though none was set.
    assert!(
        c.to_redacted_toml()
            .contains("rp_id = \"login.esp.example\""),
        "{}",
        c.to_redacted_toml()
    );
    assert_eq!(c.webauthn.user_verification, UserVerification::Preferred);
    let c = load_str(
        "[server]\npublic_url = \"https://login.esp.example/\"\n[webauthn]\nrp_id = \"esp.example\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.webauthn_rp_id().as_deref(), Some("esp.example"));
    let c = load_str(
        "[server]\npublic_url = \"https://login.esp.example/\"\n",
        &[("PORTCULLIS__WEBAUTHN__ENABLED", "false")],
    )
    .unwrap();
    assert_eq!(c.webauthn_rp_id(), None);
}

#[test]
fn webauthn_bad_values_are_refused_with_the_key() {
    let site = "[server]\npublic_url = \"https://login.esp.example/\"\n[webauthn]\n";
    for (extra, key) in [
        ("rp_id = \"other.example\"", "webauthn.rp_id"),
        ("rp_id = \"sp.example\"", "webauthn.rp_id"),
        ("rp_id = \"\"", "webauthn.rp_id"),
        ("rp_id = \"ESP.example\"", "host names: \"esp.example\""),
        ("ceremony_timeout = \"6m\"", "webauthn.ceremony_timeout"),
        ("ceremony_timeout = \"5s\"", "webauthn.ceremony_timeout"),
        ("rp_name = \" \"", "webauthn.rp_name"),
        (
            "user_verification = \"discouraged\"",
            "webauthn.user_verification",
        ),
        ("rpid = \"esp.example\"", "webauthn.rpid"),
        (
            "enabled = false\nrequire_phishing_resistant = true",
            "webauthn.require_phishing_resistant",
        ),
        (
            "enabled = false\nphishing_resistant_accounts = [\"a\"]",
            "webauthn.phishing_resistant_accounts",
        ),
        (
            "enabled = false\n[[step_up]]\npath = \"/a\"\n[[step_up]]\npath = \"/k/**\"\nkey = true",
            "step_up[1].key",
        ),
    ] {
        let e = load_str(&format!("{site}{extra}\n"), &[]).unwrap_err();
        assert!(e.to_string().contains(key), "{extra}: {e}");
    }
    // A public suffix is a parent domain browsers never take as a relying party.
    for (url, rp_id) in [
        ("https://login.esp.example.com/", "com"),
        ("https://login.esp.example.co.uk/", "co.uk"),
        ("https://login.esp.example.ck/", "ck"),
        ("https://login.esp.example.zz/", "zz"),
    ] {
        let e = load_str(
            &format!("[server]\npublic_url = \"{url}\"\n[webauthn]\nrp_id = \"{rp_id}\"\n"),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("public suffix"), "{rp_id}: {e}");
    }
    let c = load_str(
        "[server]\npublic_url = \"https://login.esp.example.co.uk/\"\n[webauthn]\nrp_id = \"example.co.uk\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.webauthn_rp_id().as_deref(), Some("example.co.uk"));
    // Keys are off in effect with an IP address as the public URL's host: a rule that wants
    // them would let nobody it covers sign in, or reach its paths.
    for (extra, key) in [
        (
            "require_phishing_resistant = true",
            "webauthn.require_phishing_resistant",
        ),
        (
            "phishing_resistant_accounts = [\"a\"]",
            "webauthn.phishing_resistant_accounts",
        ),
        ("[[step_up]]\npath = \"/k\"\nkey = true", "step_up[0].key"),
    ] {
        let config =
            format!("[server]\npublic_url = \"http://127.0.0.1:8080/\"\n[webauthn]\n{extra}\n");
        let e = load_str(&config, &[]).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("IP address"), "{extra}: {e}");
    }
    let e = load_str("[webauthn]\nrp_id = \"127.0.0.1\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("webauthn.rp_id"), "{e}");
}

#[test]
fn webauthn_attestation_policy_is_checked() {
    let dir = tempfile_dir();
    let missing = dir.join("missing.pem");
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "no certificate here\n").unwrap();
    let (m, j) = (missing.display(), junk.display());
    for (extra, key, says) in [
        (
            "attestation = \"required\"\nallowed_aaguids = [\"not-a-uuid\"]".to_string(),
            "webauthn.allowed_aaguids",
            "not an AAGUID",
        ),
        (
            "allowed_aaguids = [\"2fc0579f-8113-47ea-b116-bb5a8db9202a\"]".to_string(),
            "webauthn.allowed_aaguids",
            "needs attestation",
        ),
        (
            "attestation = \"required\"".to_string(),
            "webauthn.attestation_ca_files",
            "at least one PEM file",
        ),
        (
            format!("attestation = \"required\"\nattestation_ca_files = [\"{m}\"]"),
            "webauthn.attestation_ca_files",
            "cannot read",
        ),
        (
            format!("attestation = \"required\"\nattestation_ca_files = [\"{j}\"]"),
            "webauthn.attestation_ca_files",
            "holds no PEM certificate",
        ),
        (
            "attestation = \"sometimes\"".to_string(),
            "webauthn.attestation",
            "",
        ),
        (
            "[webauthn.accounts.\"acct-1\"]\nattestation = \"required\"".to_string(),
            "webauthn.attestation_ca_files",
            "at least one PEM file",
        ),
        (
            "[webauthn.accounts.\"acct-1\"]\nallowed_aaguids = [\"2fc0579f-8113-47ea-b116-bb5a8db9202a\"]"
                .to_string(),
            "webauthn.accounts.\"acct-1\".allowed_aaguids",
            "needs attestation",
        ),
        (
            "[webauthn.accounts.\"acct-1\"]\nuser_verfication = \"preferred\"".to_string(),
            "user_verfication",
            "",
        ),
    ] {
        let e = load_str(&format!("[webauthn]\n{extra}\n"), &[]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(key) && msg.contains(says), "{extra}: {msg}");
    }
    let c = load_str(
        "[webauthn]\nuser_verification = \"preferred\"\n[webauthn.accounts.\"acct-1\"]\nuser_verification = \"required\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        c.webauthn.policy_for("acct-1").user_verification,
        UserVerification::Required
    );
    assert_eq!(
        c.webauthn.policy_for("acct-2").user_verification,
        UserVerification::Preferred
    );
    assert_eq!(
        c.webauthn.policy_for("acct-2").attestation,
        Attestation::None
    );
}

#[test]
fn listeners_and_tls_parse() {
    let c = load_str(
        "[server]\npublic_url = \"https://gw.example/\"\nlisten = \"0.0.0.0:443\"\n\
         tls_cert = \"/etc/portcullis/cert.pem\"\ntls_key = \"/etc/portcullis/key.pem\"\n\
         redirect_http_listen = \"0.0.0.0:80\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        c.server.tls_cert.as_deref(),
        Some(Path::new("/etc/portcullis/cert.pem"))
    );
    assert_eq!(c.server.redirect_http_listen.as_deref(), Some("0.0.0.0:80"));
    assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9464"));
    let d = Config::load(None, Vec::new()).unwrap();
    assert!(d.metrics.listen.is_none() && d.server.tls_cert.is_none());
    assert!(d.server.redirect_http_listen.is_none());
}

#[test]
fn bad_listeners_and_tls_are_refused_with_the_key() {
    let https = "[server]\npublic_url = \"https://gw.example/\"\n";
    for (text, key) in [
        (format!("{https}tls_cert = \"c.pem\"\n"), "server.tls_cert"),
        (format!("{https}tls_key = \"k.pem\"\n"), "server.tls_cert"),
        (
            "[server]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n".into(),
            "server.public_url",
        ),
        (
            "[server]\nredirect_http_listen = \"0.0.0.0:80\"\n".into(),
            "server.redirect_http_listen",
        ),
        (
            format!("{https}redirect_http_listen = \"port 80\"\n"),
            "server.redirect_http_listen",
        ),
        ("[metrics]\nlisten = \"9464\"\n".into(), "metrics.listen"),
        (
            "[metrics]\nlisten = \"127.0.0.1:8080\"\n".into(),
            "metrics.listen",
        ),
        ("[metrics]\nport = 9464\n".into(), "metrics.port"),
    ] {
        let e = load_str(&text, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{text} → {e}");
    }
}

#[test]
fn redis_over_tls_is_accepted() {
    for url in [
        "rediss://:pw@redis.internal:6380/0",
        "rediss+cluster://:pw@r1:7000,r2:7000",
    ] {
        let c = load_str(&format!("[storage]\nephemeral = \"{url}\"\n"), &[]).unwrap();
        assert!(c.storage.redis_target().unwrap().unwrap().is_tls(), "{url}");
    }
    // A private CA: only a file with a PEM certificate is taken.
    let dir = tempfile_dir();
    let (ca, junk) = (dir.join("ca.pem"), dir.join("junk.pem"));
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/portcullis.example.toml");
    std::fs::write(&junk, std::fs::read(example).unwrap()).unwrap();
    // Only the PEM framing is checked here; rustls checks the certificate when connecting.
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let with_ca = |p: &Path| {
        load_str(
            &format!(
                "[storage]\nephemeral = \"rediss://r:6380\"\nredis_tls_ca = \"{}\"\n",
                p.display()
            ),
            &[],
        )
    };
    let c = with_ca(&ca).unwrap();
    assert!(matches!(
        c.storage.redis_target().unwrap(),
        Some(crate::store::redis::RedisTarget::PrivateCa { .. })
    ));
    let e = with_ca(&junk).unwrap_err().to_string();
    assert!(e.contains("storage.redis_tls_ca"), "{e}");
}

#[test]
fn a_key_read_through_file_is_refused_without_showing_it() {
    let dir = tempfile_dir();
    let pem = dir.join("key.pem");
    std::fs::write(
        &pem,
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = load_str(
        &format!(
            "[server]\npublic_url = \"https://gw.example/\"\ntls_cert = \"c.pem\"\n\
             tls_key_file = \"{}\"\n",
            pem.display()
        ),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("server.tls_key"), "{e}");
    assert!(!e.contains("c2VjcmV0") && !e.contains("PRIVATE KEY"), "{e}");
}

#[test]
fn binding_defaults_and_bad_values_are_refused_with_the_key() {
    let c = Config::load(None, Vec::new()).unwrap();
    assert!(c.binding.enabled, "binding is on unless switched off");
    assert_eq!(c.binding.bound_cookie_ttl, Duration::from_secs(600));
    assert_eq!(c.binding.max_failures, 5);
    let c = load_str(
        "[binding]\nenabled = false\nbound_cookie_ttl = \"2m\"\nmax_failures = 3\n",
        &[],
    )
    .unwrap();
    assert!(!c.binding.enabled);
    assert_eq!(c.binding.bound_cookie_ttl, Duration::from_secs(120));
    assert_eq!(c.binding.max_failures, 3);
    for (text, key) in [
        (
            "[binding]\nbound_cookie_ttl = \"1s\"\n",
            "binding.bound_cookie_ttl",
        ),
        (
            "[binding]\nbound_cookie_ttl = \"2h\"\n",
            "binding.bound_cookie_ttl",
        ),
        ("[binding]\nmax_failures = 0\n", "binding.max_failures"),
        ("[binding]\nmax_fails = 3\n", "binding.max_fails"),
    ] {
        let e = load_str(text, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{text}: {e}");
    }
}

#[test]
fn session_local_cache_is_at_most_a_second() {
    let c = load_str("[session]\nlocal_cache = \"500ms\"\n", &[]).unwrap();
    assert_eq!(c.session.local_cache, Duration::from_millis(500));
    assert_eq!(c.session.local_cache_entries, 10_000);
    let off = load_str("[session]\nlocal_cache = 0\n", &[]).unwrap();
    assert!(off.session.local_cache.is_zero());
    for text in [
        "[session]\nlocal_cache = \"2s\"\n",
        "[session]\nlocal_cache_entries = 2000000\n",
    ] {
        let e = load_str(text, &[]).unwrap_err().to_string();
        assert!(e.contains("session.local_cache"), "{text}: {e}");
    }
}

#[test]
fn limits_defaults_and_bad_values_are_refused_with_the_key() {
    let c = Config::load(None, Vec::new()).unwrap();
    assert_eq!(c.limits.global_sign_ins_per_second, 200);
    assert_eq!(c.limits.failures_per_device, 50);
    assert_eq!(c.limits.delay_after_failures, 5);
    assert_eq!(c.limits.max_delay, Duration::from_secs(2));
    assert_eq!(c.limits.second_factor_first_after, 100);
    let c = load_str(
        "[limits]\nglobal_sign_ins_per_second = 50\nfailures_per_device = 7\nmax_delay = \"0s\"\nsecond_factor_first_after = 20\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.limits.global_sign_ins_per_second, 50);
    assert_eq!(c.limits.failures_per_device, 7);
    assert!(c.limits.max_delay.is_zero());
    assert_eq!(c.limits.second_factor_first_after, 20);
    for (text, key) in [
        ("[limits]\nmax_delay = \"11s\"\n", "limits.max_delay"),
        ("[limits]\nglobal_sign_ins_per_second = 0\n", "limits"),
        ("[limits]\nfailures_per_device = 0\n", "limits"),
        ("[limits]\nsecond_factor_first_after = 0\n", "limits"),
    ] {
        let e = load_str(text, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{text}: {e}");
    }
}

#[test]
fn log_level_must_name_levels() {
    for ok in [
        "info",
        "WARN",
        "off",
        "portcullis=debug,info",
        "portcullis::proxy=trace",
    ] {
        let c = load_str(&format!("[log]\nlevel = \"{ok}\"\n"), &[]);
        assert!(c.is_ok(), "{ok}: {:?}", c.err());
    }
    for bad in [
        "warning",
        "infoo",
        "",
        "portcullis",
        "portcullis=loud",
        "nonsense[[[",
    ] {
        let e = load_str(&format!("[log]\nlevel = \"{bad}\"\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("log.level"), "{bad}: {e}");
    }
}

#[test]
fn token_header_cannot_take_a_header_with_another_meaning() {
    for bad in [
        "Cookie",
        "host",
        "Authorization",
        "X-Forwarded-For",
        "x-request-id",
        "Transfer-Encoding",
        "Accept",
        "Accept-Language",
        "Origin",
        "Sec-Fetch-Site",
        "X-CSRF-Token",
        "X-Original-URL",
        "x_original_url",
        "Content-Type",
        "X-Auth-User",
        "If-None-Match",
    ] {
        let e = load_str(&format!("[token]\nheader = \"{bad}\"\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("token.header"), "{bad}: {e}");
    }
    for good in [
        "X-Esp-Identity",
        "X-Portcullis-Assertion",
        "X-Console-Identity",
    ] {
        assert!(
            load_str(&format!("[token]\nheader = \"{good}\"\n"), &[]).is_ok(),
            "{good}"
        );
    }
}

/// The environment overrides a key whichever spelling the file uses (`x` or `x_file`); both
/// spellings from the environment are a conflict.
#[test]
fn the_environment_overrides_either_spelling_of_a_secret() {
    let dir = tempfile_dir();
    let (file_key, env_key) = (
        crate::crypto::MasterKey::generate_base64(),
        crate::crypto::MasterKey::generate_base64(),
    );
    std::fs::write(dir.join("mk"), format!("{file_key}\n")).unwrap();
    std::fs::write(dir.join("mk-env"), format!("{env_key}\n")).unwrap();
    let from_file_path = format!(
        "[secrets]\nmaster_key_file = \"{}\"\n",
        dir.join("mk").display()
    );
    let c = load_str(
        &from_file_path,
        &[("PORTCULLIS__SECRETS__MASTER_KEY", &env_key)],
    )
    .unwrap();
    assert_eq!(c.secrets.master_key.as_ref().unwrap().expose(), &env_key);
    let env_file = dir.join("mk-env").display().to_string();
    let c = load_str(
        &format!("[secrets]\nmaster_key = \"{file_key}\"\n"),
        &[("PORTCULLIS__SECRETS__MASTER_KEY_FILE", &env_file)],
    )
    .unwrap();
    assert_eq!(c.secrets.master_key.as_ref().unwrap().expose(), &env_key);
    let e = load_str(
        "",
        &[
            ("PORTCULLIS__SECRETS__MASTER_KEY", &env_key),
            ("PORTCULLIS__SECRETS__MASTER_KEY_FILE", &env_file),
        ],
    )
    .unwrap_err();
    assert!(e.to_string().contains("keep one"), "{e}");
}

/// `PORTCULLIS_LOG` is `log.level`, refused as it is when it names no level (a typo had
/// silenced every log line).
#[test]
fn portcullis_log_is_the_log_level_and_validated() {
    let c = load_str("", &[("PORTCULLIS_LOG", "portcullis=debug,warn")]).unwrap();
    assert_eq!(c.log.level, "portcullis=debug,warn");
    let both = load_str(
        "",
        &[
            ("PORTCULLIS_LOG", "debug"),
            ("PORTCULLIS__LOG__LEVEL", "warn"),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(both.contains("keep one"), "{both}");
    for bad in ["verbose", "warning", ""] {
        let e = load_str("", &[("PORTCULLIS_LOG", bad)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("log.level") && e.contains("PORTCULLIS_LOG"),
            "{bad}: {e}"
        );
    }
}

/// A list given as a plain string says how to write a list.
#[test]
fn a_list_in_the_environment_is_a_toml_array() {
    let e = load_str("", &[("PORTCULLIS__SERVER__TRUSTED_PROXIES", "10.0.0.0/8")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("server.trusted_proxies") && e.contains("TOML array"),
        "{e}"
    );
    let c = load_str(
        "",
        &[("PORTCULLIS__SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/8\"]")],
    )
    .unwrap();
    assert_eq!(c.server.trusted_proxies.len(), 1);
    // A broken array is named as such; a text that reads as a number says to quote it.
    let e = load_str(
        "",
        &[("PORTCULLIS__SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/8\"")],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a valid TOML value"), "{e}");
    let e = load_str("", &[("PORTCULLIS__TOKEN__AUDIENCE", "123")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("quote") && e.contains("PORTCULLIS__"), "{e}");
    // The hint quotes the value given, not an example.
    let e = load_str("", &[("PORTCULLIS__TOKEN__AUDIENCE", "true")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'\"true\"'"), "{e}");
    // Numbers are asked for in words, not in the program's type names.
    let e = load_str("", &[("PORTCULLIS__SERVER__MAX_URI_LENGTH", "3x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("whole number") && !e.contains("usize"), "{e}");
    // A value of the wrong kind from a variable names the variable.
    let e = load_str("", &[("PORTCULLIS__SERVER__MAX_URI_LENGTH", "big")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("server.max_uri_length") && e.contains("PORTCULLIS__SERVER__MAX_URI_LENGTH"),
        "{e}"
    );
    // The same mistake in the file is the file's, not a variable's.
    let e = load_str("[server]\nlisten = 5\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("server.listen") && e.contains("in the file") && !e.contains("PORTCULLIS__"),
        "{e}"
    );
}

#[test]
fn risk_settings_are_checked_with_their_key() {
    let c = load_str("", &[]).unwrap();
    assert_eq!(
        (
            c.risk.medium_score,
            c.risk.high_score,
            c.risk.max_travel_speed
        ),
        (30, 60, 1000)
    );
    assert_eq!(c.risk.high_risk_factor, super::HighRiskFactor::Key);
    for (toml_text, key) in [
        ("[risk]\nmax_travel_speed = 50\n", "risk.max_travel_speed"),
        (
            "[risk]\nmin_travel_distance = 10\n",
            "risk.min_travel_distance",
        ),
        ("[risk]\nmedium_score = 0\n", "risk.medium_score"),
        (
            "[risk]\nmedium_score = 50\nhigh_score = 40\n",
            "risk.high_score",
        ),
        ("[risk]\nhistory = \"1h\"\n", "risk.history"),
        (
            "[risk]\nhigh_risk_factor = \"sms\"\n",
            "risk.high_risk_factor",
        ),
        ("[risk]\nweights = 3\n", "risk.weights"),
    ] {
        let e = load_str(toml_text, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{toml_text}: {e}");
    }
    let c = load_str(
        "",
        &[
            ("PORTCULLIS__RISK__HIGH_RISK_FACTOR", "any"),
            ("PORTCULLIS__RISK__HIGH_SCORE", "1000"),
        ],
    )
    .unwrap();
    assert_eq!(
        (c.risk.high_risk_factor, c.risk.high_score),
        (super::HighRiskFactor::Any, 1000)
    );
    // An IPv6 listen address from the environment is a text, not a broken TOML array.
    let c = load_str("", &[("PORTCULLIS__SERVER__LISTEN", "[::]:18580")]).unwrap();
    assert_eq!(c.server.listen, "[::]:18580");
    // An empty path switches the database off, also from the environment.
    let c = load_str(
        "[risk]\ngeoip_database = \"/var/lib/GeoIP/GeoLite2-City.mmdb\"\n",
        &[("PORTCULLIS__RISK__GEOIP_DATABASE", "")],
    )
    .unwrap();
    assert_eq!(c.risk.geoip_database, None);
    let c = load_str(
        "[storage]\nephemeral = \"rediss://r:6379\"\nredis_tls_ca = \"/etc/ssl/ca.pem\"\n",
        &[("PORTCULLIS__STORAGE__REDIS_TLS_CA", "")],
    )
    .unwrap();
    assert_eq!(c.storage.redis_tls_ca, None);
    let e = load_str("[risk]\nmedium_score = 1000\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("risk.medium_score (1000)"), "{e}");
}

#[test]
fn durations_print_as_they_are_written_and_read_back_the_same() {
    for (d, text) in [
        (Duration::from_secs(90 * 86_400), "90d"),
        (Duration::from_secs(36 * 3600), "1d 12h"),
        (Duration::from_secs(30 * 60), "30m"),
        (Duration::from_millis(1500), "1s 500ms"),
        (Duration::from_millis(250), "250ms"),
        (Duration::ZERO, "0s"),
        (Duration::from_secs(400 * 86_400 + 61), "400d 1m 1s"),
    ] {
        assert_eq!(duration::text(d), text);
        assert_eq!(humantime::parse_duration(text).unwrap(), d, "{text}");
    }
    // The effective config as check-config prints it.
    let c = Config::load(None, Vec::new()).unwrap();
    let printed = c.to_redacted_toml();
    assert!(printed.contains("history = \"90d\""), "{printed}");
}

#[test]
fn trusted_proxies_take_networks_and_single_addresses() {
    let c = load_str(
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\", \"2001:db8::1\"]\n",
        &[],
    )
    .unwrap();
    let shown: Vec<String> = c
        .server
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(shown, ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::1/128"]);
    let e = load_str("[server]\ntrusted_proxies = [\"10.0.0.7/8\"]\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("10.0.0.0/8") && e.contains("10.0.0.7"), "{e}");
}

/// What a configuration error says never holds a secret: not the line of a TOML syntax error
/// (a master key missing its closing quote), not the content of a `_file` key's file given to
/// a key of another type, not a file that is far too large.
#[test]
fn configuration_errors_never_repeat_secrets() {
    let key = "xvanoFPAOUJ0ZI3jzhuVt/0SiyPrX3BAu1GsQYGNhVw=";
    let e = load_str(&format!("[secrets]\nmaster_key = \"{key}\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2"), "{e}");
    assert!(!e.contains(key), "{e}");
    let e = load_str(
        &format!("[secrets]\nmaster_key = \"{key}\"\nmaster_key = \"{key}\"\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains(key), "{e}");
    // A duplicate key or table is named (a key is never a secret), where it is a bare key.
    assert!(
        e.contains("line 3") && e.contains("duplicate key `master_key`"),
        "{e}"
    );
    let e = load_str("[server]\n[server]\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate key `server`"), "{e}");
    for spelling in ["\"listen\"", "\"\\u006cisten\"", "'listen'"] {
        let e = load_str(
            &format!("[server]\nlisten = \"a\"\n{spelling} = \"b\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("duplicate key `listen`"), "{spelling}: {e}");
    }
    let e = load_str(&format!("[secrets]\n\"{key}\" = 1\n\"{key}\" = 1\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate key") && !e.contains(key), "{e}");

    let dir = tempfile_dir();
    let secret = dir.join("mk");
    std::fs::write(&secret, format!("{key}\n")).unwrap();
    let path = secret.display().to_string();
    for var in [
        "PORTCULLIS__SESSION__IDLE_TIMEOUT_FILE",
        "PORTCULLIS__SERVER__MAX_URI_LENGTH_FILE",
        "PORTCULLIS__TOKEN__ALGORITHM_FILE",
        "PORTCULLIS__UPSTREAM__URL_FILE",
        "PORTCULLIS__SERVER__PUBLIC_URL_FILE",
    ] {
        let e = load_str("", &[(var, path.as_str())])
            .unwrap_err()
            .to_string();
        assert!(!e.contains(key), "{var}: {e}");
    }
    // Contents that serde or humantime would quote escaped, or only in part.
    for (var, content) in [
        ("PORTCULLIS__SESSION__IDLE_TIMEOUT_FILE", "30my\"pass\\word"),
        (
            "PORTCULLIS__SERVER__MAX_URI_LENGTH_FILE",
            "tab\tsecret\u{7}bell",
        ),
    ] {
        let file = dir.join("odd");
        std::fs::write(&file, content).unwrap();
        let e = load_str("", &[(var, &file.display().to_string())])
            .unwrap_err()
            .to_string();
        for part in ["pass", "word", "secret", "bell"] {
            assert!(!e.contains(part), "{var}: {e}");
        }
        assert!(e.contains(&file.display().to_string()), "{e}");
    }
    // Values that read but do not validate: the error names the file they came from.
    for (var, content, key) in [
        (
            "PORTCULLIS__SECRETS__MASTER_KEY_FILE",
            "not-a-key-at-all-zzz",
            "secrets.master_key",
        ),
        (
            "PORTCULLIS__STORAGE__DURABLE_FILE",
            "mysql://dbuser:dbsecret9@db/x",
            "storage.durable",
        ),
    ] {
        let file = dir.join("invalid");
        std::fs::write(&file, content).unwrap();
        let e = load_str("", &[(var, &file.display().to_string())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(key) && e.contains(&file.display().to_string()),
            "{var}: {e}"
        );
        assert!(!e.contains("zzz") && !e.contains("dbsecret9"), "{var}: {e}");
    }
    let url = dir.join("url");
    std::fs::write(&url, "http://u:leakpw4@ho st/").unwrap();
    let e = load_str(
        "",
        &[("PORTCULLIS__UPSTREAM__URL_FILE", &url.display().to_string())],
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains("leakpw4"), "{e}");

    // URLs that do not parse are quoted in the error, their passwords are not.
    for (var, url) in [
        (
            "PORTCULLIS__UPSTREAM__URL",
            "http://user:UPWSECRET@127.0.0.1:99999/",
        ),
        (
            "PORTCULLIS__SERVER__PUBLIC_URL",
            "http://user:UPWSECRET@ho st/",
        ),
        (
            "PORTCULLIS__SERVER__PUBLIC_URL",
            "http://user:UPWSECRET@[::1/",
        ),
    ] {
        let e = load_str("", &[(var, url)]).unwrap_err().to_string();
        assert!(!e.contains("UPWSECRET"), "{var}: {e}");
    }
    let e = load_str(
        "[upstream]\nurl = \"http://user:UPWSECRET@127.0.0.1:99999/\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        !e.contains("UPWSECRET") && e.contains("upstream.url"),
        "{e}"
    );

    let big = dir.join("big");
    std::fs::write(&big, vec![b'a'; 70 * 1024]).unwrap();
    let e = load_str(
        "",
        &[(
            "PORTCULLIS__SECRETS__MASTER_KEY_FILE",
            &big.display().to_string(),
        )],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("larger than 64 KiB"), "{e}");
    let e = load_str("", &[("PORTCULLIS__SECRETS__MASTER_KEY_FILE", "/dev/zero")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than 64 KiB"), "{e}");
}

#[test]
fn a_step_up_rule_written_as_one_table_gets_a_hint_of_its_own() {
    let e = load_str("[step_up]\npath = \"/campaigns/send\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[[step_up]]") && !e.contains("10.0.0.0/8"),
        "{e}"
    );
}

/// Durations read as a text ("90s", "30") or a whole number of seconds; anything else is
/// refused in words, naming the key once. A number, boolean or list read through `_file` (which
/// gives text) is said to be so, and an unknown key through `_file` is an unknown key.
#[test]
fn durations_and_file_values_are_refused_in_words() {
    let c = load_str("[server]\nheader_timeout = \"45\"\n", &[]).unwrap();
    assert_eq!(c.server.header_timeout, Duration::from_secs(45));
    for bad in ["30.5", "true", "\"soon\"", "-3"] {
        let e = load_str(&format!("[server]\nheader_timeout = {bad}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.header_timeout"), "{bad}: {e}");
        assert!(
            !e.contains("untagged") && !e.contains("\nin `"),
            "{bad}: {e}"
        );
    }
    let dir = tempfile_dir();
    let num = dir.join("num");
    std::fs::write(&num, "8080\n").unwrap();
    let path = num.to_str().unwrap();
    let e = load_str("", &[("PORTCULLIS__SERVER__MAX_FORM_BYTES_FILE", path)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("gives text only") && e.contains(path), "{e}");
    let e = load_str("", &[("PORTCULLIS__SERVER__LISTN_FILE", path)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `listn`"), "{e}");
}

/// Variables that look meant for the gateway but are not read are named (the CLI warns of
/// them); Kubernetes' service links and the gateway's own variables are not.
#[test]
fn variables_that_are_not_read_are_named() {
    let env = [
        "PORTCULLIS_SERVER__LISTEN",
        "portcullis__server__listen",
        "PORTCULLIS_LOG_LEVEL",
        "PORTCULLIS__SERVER__LISTEN",
        "PORTCULLIS_CONFIG",
        "PORTCULLIS_LOG",
        "PORTCULLIS_SERVICE_HOST",
        "PORTCULLIS_SERVICE_PORT_HTTP",
        "PORTCULLIS_PORT",
        "PORTCULLIS_PORT_8080_TCP_ADDR",
        "PORTCULLIS_METRICS_SERVICE_HOST",
        "HOME",
    ]
    .map(|n| (n.to_string(), "x".to_string()));
    assert_eq!(
        crate::config::ignored_variables(env),
        [
            "PORTCULLIS_LOG_LEVEL",
            "PORTCULLIS_SERVER__LISTEN",
            "portcullis__server__listen"
        ]
    );
}

/// A master key that is a placeholder rather than random bytes is refused.
#[test]
fn a_placeholder_master_key_is_refused() {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    for placeholder in [
        [0u8; 32].to_vec(),
        b"passwordpasswordpasswordpassword".to_vec(),
    ] {
        let text = format!("[secrets]\nmaster_key = \"{}\"\n", b64(&placeholder));
        let e = load_str(&text, &[]).unwrap_err().to_string();
        assert!(
            e.contains("secrets.master_key") && e.contains("not random"),
            "{e}"
        );
    }
    let text = format!(
        "[secrets]\nmaster_key = \"{}\"\n",
        b64(b"0123456789abcdef0123456789abcdef")
    );
    assert!(load_str(&text, &[]).is_ok());
    // Random keys in URL-safe base64, with `-` and `_`, as the key reader takes them.
    for _ in 0..20 {
        let key = crate::crypto::MasterKey::generate_base64()
            .replace('+', "-")
            .replace('/', "_");
        let text = format!("[secrets]\nmaster_key = \"{key}\"\n");
        assert!(load_str(&text, &[]).is_ok(), "{key}");
    }
}

/// Tables set in the file only are said to be so when the environment tries them; a list's
/// example fits the key.
#[test]
fn file_only_tables_and_list_examples() {
    for name in [
        "PORTCULLIS__STEP_UP",
        "PORTCULLIS__WEBAUTHN__ACCOUNTS__A1__ATTESTATION",
        "PORTCULLIS__WEBAUTHN__ACCOUNTS",
    ] {
        let e = load_str("", &[(name, "x")]).unwrap_err().to_string();
        assert!(e.contains("file only"), "{name}: {e}");
    }
    // A section that does not exist: the variable is named, and the sections offered are those
    // a variable may set.
    let e = load_str("", &[("PORTCULLIS__FOO__BAR", "1")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PORTCULLIS__FOO__BAR") && e.contains("`server`") && !e.contains("step_up"),
        "{e}"
    );
    let e = load_str(
        "",
        &[("PORTCULLIS__REMEMBER_DEVICE__OFF_ACCOUNTS", "acct-1")],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("TOML array") && !e.contains("10.0.0.0/8"), "{e}");
}

#[test]
fn errors_about_secret_keys_do_not_repeat_their_values() {
    for (text, env) in [
        ("[secrets]\nmaster_key = 12345678901\n", vec![]),
        ("", vec![("PORTCULLIS__SECRETS__MASTER_KEY", "12345678901")]),
        ("[storage]\ndurable = 12345678901\n", vec![]),
    ] {
        let err = load_str(text, &env).unwrap_err().to_string();
        assert!(!err.contains("12345678901"), "{err}");
        assert!(err.contains("(not shown)"), "{err}");
    }
    // Other keys' values are shown: they help and hold no secret.
    let err = load_str("[server]\nlisten = 8080\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("8080"), "{err}");
}

#[test]
fn an_empty_path_is_said_to_be_empty() {
    for (env, key) in [
        (
            vec![("PORTCULLIS__SECRETS__MASTER_KEY_FILE", "")],
            "secrets.master_key_file",
        ),
        (
            vec![
                ("PORTCULLIS__SERVER__TLS_CERT", "/etc/ssl/cert.pem"),
                ("PORTCULLIS__SERVER__TLS_KEY", ""),
            ],
            "server.tls_key",
        ),
    ] {
        let err = load_str("", &env).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("is empty"), "{err}");
    }
}

/// The bound on connections per address: 1024 unless set, `0` for none, and nothing a NAT's
/// users or a browser would hit by accident (under 16) or that bounds nothing (over a million).
#[test]
fn connections_per_address_are_bounded_within_reason() {
    let c = load_str("", &[]).unwrap();
    assert_eq!(c.server.max_connections_per_address, 1024);
    for ok in ["0", "16", "1000000"] {
        let c = load_str(
            &format!("[server]\nmax_connections_per_address = {ok}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.server.max_connections_per_address.to_string(), ok);
    }
    for bad in ["1", "15", "1000001"] {
        let e = load_str(
            &format!("[server]\nmax_connections_per_address = {bad}\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("server.max_connections_per_address"),
            "{bad}: {e}"
        );
    }
    let e = load_str("[server]\nmax_connections_per_address = -1\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("server.max_connections_per_address"), "{e}");
}

/// A PostgreSQL connection that may fall back to plain text is named (for a warning) where it
/// leaves this machine; one that requires TLS, or stays on it, is not.
#[test]
fn a_postgres_url_that_may_be_plain_text_is_named() {
    use super::storage::postgres_maybe_plain;
    for (url, named) in [
        ("postgres://u@db.example:5432/p", Some("db.example")),
        ("postgres://u@10.0.0.5/p?sslmode=prefer", Some("10.0.0.5")),
        (
            "postgresql://u@db.example/p?sslmode=disable",
            Some("db.example"),
        ),
        (
            "postgres://u@127.0.0.1/p?host=db.example",
            Some("db.example"),
        ),
        ("postgres://u@db.example/p?sslmode=require", None),
        ("postgres://u@db.example/p?sslmode=verify-full", None),
        ("postgres://u@db.example/p?ssl-mode=verify-ca", None),
        ("postgres://u@127.0.0.1:5432/p", None),
        ("postgres://u@[::1]/p", None),
        ("postgres://u@localhost/p", None),
        ("postgres://u@x/p?host=/var/run/postgresql", None),
        ("sqlite:///var/lib/p.sqlite", None),
    ] {
        assert_eq!(postgres_maybe_plain(url).as_deref(), named, "{url}");
    }
}
