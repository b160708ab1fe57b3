//! The Python verification shown in docs/backend-integration.md, run for real with PyJWT against
//! a token the gateway issued and the gateway's live JWKS.

use super::harness::*;

/// The doc's `verify` function, with the gateway's issuer and the test's JWKS URL filled in.
fn python_verifier(jwks_url: &str, issuer: &str) -> String {
    let doc = include_str!("../../docs/backend-integration.md");
    let start = doc.find("```python\n").expect("python example in the doc") + "```python\n".len();
    let code = &doc[start..start + doc[start..].find("```").unwrap()];
    let code = code
        .replace("https://login.esp.example/.well-known/jwks.json", jwks_url)
        .replace("https://login.esp.example", issuer);
    format!("{code}\nimport sys, json\nprint(json.dumps(verify(sys.argv[1])))\n")
}

fn run_python(script: &str, token: &str) -> std::process::Output {
    std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(token)
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_documented_python_check_accepts_our_tokens_and_refuses_tampering() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .output()
        .unwrap();
    assert!(probe.status.success(), "PyJWT with cryptography is needed: python3 -m pip install 'pyjwt[crypto]' (.ci/run installs it)");
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("py@example.com").await;
    c.get(gw.url("/x")).send().await.unwrap();
    let token = gw.upstream.last_token();
    let script = python_verifier(&gw.url("/.well-known/jwks.json"), &gw.base);
    let out = tokio::task::spawn_blocking({
        let (s, t) = (script.clone(), token.clone());
        move || run_python(&s, &t)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["email"], "py@example.com");
    // Flip one character of the signature: refused.
    let mut bad = token.clone().into_bytes();
    let i = bad.len() - 3;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    let out = tokio::task::spawn_blocking(move || run_python(&script, &bad))
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "tampered token accepted by the documented check"
    );
}

/// The documented verifier, kept running as a console is, stops trusting a key once a rotation
/// has retired it and it has left the JWKS (PyJWT's own key cache would keep it until a restart).
#[tokio::test]
async fn the_documented_python_check_drops_a_retired_key() {
    use std::io::{BufRead, Write};
    let gw = Gateway::start().await;
    let (c, _, _) = gw.signed_in("py-rotation@example.com").await;
    c.get(gw.url("/x")).send().await.unwrap();
    let token = gw.upstream.last_token();
    let old_kid = gw.state.signer.current_kid();
    let verifier = python_verifier(&gw.url("/.well-known/jwks.json"), &gw.base);
    assert!(
        verifier.contains("lifespan=60"),
        "the doc's cache time moved"
    );
    // The same code with the key set cached for a second rather than a minute; the token
    // checked once, and again when told to.
    let code = verifier
        .replace("lifespan=60", "lifespan=1")
        .split("\nimport sys, json\n")
        .next()
        .unwrap()
        .to_string();
    let script = format!(
        "{code}\nimport sys\nt = sys.argv[1]\nverify(t)\nprint('first', flush=True)\n\
         sys.stdin.readline()\ntry:\n    verify(t)\n    print('second accepted', flush=True)\n\
         except Exception as e:\n    print('second refused', type(e).__name__, flush=True)\n"
    );
    let mut py = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(&token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read off the runtime's thread: the gateway under test answers the script's requests.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = py.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = lines_tx.send(line.unwrap_or_default());
        }
    });
    let line = lines.recv().await.unwrap_or_default();
    assert_eq!(line.trim(), "first", "the token was refused at first");

    // Rotated, and the old key past its overlap: gone from the JWKS.
    let rotated = gw.cli(&["keys", "rotate"], None).await;
    assert!(rotated.status.success());
    let overlap = gw.state.config.token.key_overlap.as_secs() as i64;
    gw.clock.advance(90 + overlap + 60);
    gw.state.signer.refresh().await.unwrap();
    let jwks: serde_json::Value = reqwest::get(gw.url("/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !jwks.to_string().contains(&format!("\"{old_kid}\"")),
        "the retired key is still published: {jwks}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut stdin = py.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    let line = lines.recv().await.unwrap_or_default();
    let _ = py.wait();
    assert!(
        line.starts_with("second refused"),
        "a retired key still verifies: {line}"
    );
}
