//! The deployment files in `deploy/` are checked by the tools that will read them: nginx's own
//! configuration test, `systemd-analyze verify`, and a YAML parser for the Kubernetes manifests
//! and the compose file.

use std::process::Command;

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_nginx_tls_front_passes_nginx_t() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=login.esp.example",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let site = std::fs::read_to_string(repo("deploy/nginx/portcullis.conf"))
        .unwrap()
        .replace("/etc/ssl/portcullis/fullchain.pem", cert.to_str().unwrap())
        .replace("/etc/ssl/portcullis/privkey.pem", key.to_str().unwrap());
    std::fs::write(dir.path().join("site.conf"), site).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "pid {0}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {0}/body;\n  proxy_temp_path {0}/proxy;\n  fastcgi_temp_path {0}/fcgi;\n  uwsgi_temp_path {0}/uwsgi;\n  scgi_temp_path {0}/scgi;\n  include {0}/site.conf;\n}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new("/usr/sbin/nginx")
        .arg("-t")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .output()
        .expect("nginx is needed (apt-get install nginx)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in [
        "portcullis.service",
        "portcullis-audit-prune.service",
        "portcullis-audit-prune.timer",
    ] {
        let unit = std::fs::read_to_string(repo(&format!("deploy/systemd/{name}")))
            .unwrap()
            .replace(
                "/usr/local/bin/portcullis",
                env!("CARGO_BIN_EXE_portcullis"),
            );
        if name.ends_with(".service") {
            assert!(
                unit.contains("NoNewPrivileges=yes") && unit.contains("ProtectSystem=strict"),
                "{name} is not sandboxed"
            );
        }
        if name == "portcullis.service" {
            // operations.md: `systemctl reload` sends the SIGHUP that reloads the TLS pair.
            assert!(
                unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
                "{name} cannot be reloaded"
            );
        }
        let path = dir.path().join(name);
        std::fs::write(&path, unit).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The retention job's command line is one the CLI takes.
#[test]
fn the_audit_prune_unit_runs_a_command_that_exists() {
    let unit =
        std::fs::read_to_string(repo("deploy/systemd/portcullis-audit-prune.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/portcullis "))
        .unwrap();
    assert_cli_takes(line.split_whitespace().map(String::from).collect());
}

/// The Kubernetes retention job: daily, never two at once, the gateways' config and only the
/// database's URL of their secrets, and a command line the CLI takes.
#[test]
fn the_kubernetes_audit_prune_job_runs_a_command_that_exists() {
    let check = r#"
import json, sys, yaml
docs = {d["kind"]: d for d in yaml.safe_load_all(open(sys.argv[1]))}
job, dep = docs["CronJob"]["spec"], docs["Deployment"]["spec"]["template"]["spec"]
assert len(job["schedule"].split()) == 5, "a cron schedule"
assert job["concurrencyPolicy"] == "Forbid", "one prune at a time"
pod = job["jobTemplate"]["spec"]["template"]["spec"]
c, g = pod["containers"][0], dep["containers"][0]
assert c["image"] == g["image"]
durable = [e for e in g["env"] if e["name"] == "PORTCULLIS__STORAGE__DURABLE_FILE"]
assert c["env"] == durable, "the gateways' database URL, and no other secret"
assert pod["securityContext"] == dep["securityContext"]
assert pod["automountServiceAccountToken"] is False and dep["automountServiceAccountToken"] is False
assert c["securityContext"] == g["securityContext"]
mounts = {m["mountPath"] for m in g["volumeMounts"] if m.get("readOnly")}
assert {m["mountPath"] for m in c["volumeMounts"]} == mounts
secret = [v for v in pod["volumes"] if "secret" in v][0]["secret"]
assert secret["items"] == [{"key": "durable", "path": "durable"}], secret
assert durable[0]["value"].endswith("/durable")
print(json.dumps(c["args"]))
"#;
    let out = python(check, &["deploy/kubernetes/portcullis.yaml"]);
    let args: Vec<String> = serde_json::from_slice(&out).unwrap();
    assert_eq!(args[..2], ["audit", "prune"]);
    assert_cli_takes(args);
}

/// `args` (with `--config PATH`) get past the CLI's parsing: run with a config that does not
/// exist, the only complaint is the missing file.
fn assert_cli_takes(mut args: Vec<String>) {
    let config = args.iter().position(|a| *a == "--config").unwrap();
    args[config + 1] = "/nonexistent/portcullis.toml".into();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/portcullis.toml"), "{err}");
    assert!(
        !err.contains("unexpected argument") && !err.contains("Usage:"),
        "{err}"
    );
}

#[test]
fn kubernetes_and_compose_files_say_what_operations_needs() {
    let check = r#"
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
kinds = {d["kind"]: d for d in docs}
dep = kinds["Deployment"]["spec"]
assert dep["replicas"] >= 2, "at least two gateways"
c = dep["template"]["spec"]["containers"][0]
assert c["readinessProbe"]["httpGet"]["path"] == "/_portcullis/readyz"
assert c["livenessProbe"]["httpGet"]["path"] == "/_portcullis/healthz"
env = {e["name"]: e["value"] for e in c["env"]}
assert env["PORTCULLIS__SECRETS__MASTER_KEY_FILE"].startswith("/run/secrets/")
# Notices go out by mail: a pod's outbox is gone with it, and other replicas never see it.
assert env["PORTCULLIS__NOTIFY__SMTP_URL_FILE"].startswith("/run/secrets/")
assert dep["template"]["spec"]["terminationGracePeriodSeconds"] > 60, "draining (30 s) and the audit queue (30 s) fit"
assert "Secret" not in kinds, "no secret values in the manifest"
assert c["lifecycle"]["preStop"], "serves on while the endpoints drop the pod"
# Only the ingress reaches the listener whose X-Forwarded-For is believed, only monitoring the
# metrics, which ask for no credentials.
policy = kinds["NetworkPolicy"]["spec"]
assert policy["podSelector"]["matchLabels"] == dep["selector"]["matchLabels"]
ports = sorted(p["port"] for rule in policy["ingress"] for p in rule["ports"])
assert ports == [8080, 9464], ports
for kind, pod in (("Deployment", dep["template"]["spec"]),
                  ("CronJob", kinds["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"])):
    ctx = pod["securityContext"]
    secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert secrets, kind
    for s in secrets:
        # Secret files are root's unless fsGroup gives them the user's group, which must read them.
        assert ctx.get("fsGroup") == ctx["runAsUser"] and s["defaultMode"] & 0o040, (kind, ctx, s)
compose = yaml.safe_load(open(sys.argv[2]))
services = compose["services"]
assert {"gateway-a", "gateway-b", "redis", "postgres", "lb", "console"} <= set(services)
assert services["gateway-a"]["environment"]["PORTCULLIS__STORAGE__EPHEMERAL"].startswith("redis://")
assert services["gateway-a"]["environment"]["PORTCULLIS__NOTIFY__SMTP_URL"] == "smtp://mail:1025"
assert "mail" in services
"#;
    python(
        check,
        &[
            "deploy/kubernetes/portcullis.yaml",
            "deploy/docker-compose.yml",
        ],
    );
}

/// Runs a Python check over repository files (its arguments); asserts it passed and returns what
/// it printed.
fn python(check: &str, files: &[&str]) -> Vec<u8> {
    let out = Command::new("python3")
        .args(["-c", check])
        .args(files.iter().map(|f| repo(f)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The compose file's load balancer (deploy/nginx/compose.conf), run by a real nginx in front of
/// a gateway that trusts it: what the console is told of the request's host and address is the
/// balancer's, never the client's own `X-Forwarded-Host` or `X-Forwarded-For`.
#[tokio::test]
async fn the_compose_balancer_passes_on_no_forwarded_host_of_the_clients() {
    use super::harness::*;
    let gw = Gateway::start_with(|c| {
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let site = std::fs::read_to_string(repo("deploy/nginx/compose.conf")).unwrap();
    assert!(site.contains("server gateway-a:8080") && site.contains("listen 80;"));
    let nginx = super::forward_auth::run_nginx(|dir, addr| {
        let site = site
            .replace("gateway-a:8080", &gw.addr.to_string())
            .replace("gateway-b:8080", &gw.addr.to_string())
            .replace("listen 80;", &format!("listen {addr};"));
        format!(
            "daemon off;\nmaster_process off;\npid {0}/nginx.pid;\nerror_log {0}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {0}/body;\n  proxy_temp_path {0}/proxy;\n  fastcgi_temp_path {0}/fcgi;\n  uwsgi_temp_path {0}/uwsgi;\n  scgi_temp_path {0}/scgi;\n{site}\n}}\n",
            dir.display()
        )
    })
    .await;
    let (c, _, _) = gw.signed_in("compose@example.com").await;
    let cookie = gw.cookies(&c);
    let r = raw(
        nginx.addr,
        "GET",
        "/campaigns",
        &[
            ("Cookie", &cookie),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-For", "203.0.113.9"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = gw.upstream.last();
    assert_eq!(
        seen.headers_named("x-forwarded-host"),
        ["localhost:8080"],
        "the public host, once"
    );
    assert!(
        !seen
            .headers_named("x-forwarded-for")
            .iter()
            .any(|v| v.contains("203.0.113.9")),
        "{:?}",
        seen.headers_named("x-forwarded-for")
    );
}
