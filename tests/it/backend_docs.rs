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
    let token = gw
        .upstream
        .last()
        .header("x-portcullis-assertion")
        .unwrap()
        .to_string();
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
