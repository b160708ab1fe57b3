//! Key policy at registration: attestation required (against the configured vendor CAs), the
//! AAGUID allow-list, per-account overrides and user verification. Attested keys are played by
//! webauthn-authenticator-rs `SoftToken`, which signs a packed attestation with a certificate
//! chained to its own freshly made CA (AAGUID `softtoken::AAGUID`).

use serde_json::{json, Value};
use webauthn_authenticator_rs::prelude::CreationChallengeResponse;
use webauthn_authenticator_rs::softtoken::{SoftToken, AAGUID};
use webauthn_authenticator_rs::{AuthenticatorBackend, WebauthnAuthenticator};

use super::harness::*;
use super::webauthn::*;

type Token = WebauthnAuthenticator<SoftToken>;

/// A token that verifies its user, and the PEM of the CA that vouches for it.
fn token() -> (Token, String) {
    let (t, ca) = SoftToken::new(true).unwrap();
    let pem = String::from_utf8(ca.to_pem().unwrap()).unwrap();
    (WebauthnAuthenticator::new(t), pem)
}

/// Writes the trusted CAs into one PEM file (a bundle) in `dir`.
fn ca_file(dir: &tempfile::TempDir, pems: &[&str]) -> std::path::PathBuf {
    let p = dir.path().join("cas.pem");
    std::fs::write(&p, pems.concat()).unwrap();
    p
}

/// A gateway that requires attestation from `cas` and, when given, only these models.
async fn strict_gateway(cas: std::path::PathBuf, models: &[&str]) -> Gateway {
    let models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
    Gateway::start_with(move |c| {
        localhost(c);
        c.webauthn.attestation = portcullis::config::Attestation::Required;
        c.webauthn.allowed_aaguids = models;
        c.webauthn.attestation_ca_files = vec![cas];
    })
    .await
}

/// Registers with any authenticator from the account page; `tamper` may change the options.
async fn try_register<T: AuthenticatorBackend>(
    gw: &Gateway,
    c: &Browser,
    k: &mut WebauthnAuthenticator<T>,
    tamper: impl FnOnce(&mut Value),
) -> reqwest::Response {
    let csrf = gw.csrf(c, "/_portcullis/account").await;
    let (ceremony, mut options) =
        start(gw, c, &csrf, "register/start", json!({ "name": "Key" })).await;
    tamper(&mut options);
    let ccr: CreationChallengeResponse = serde_json::from_value(options).unwrap();
    let reg = k.do_registration(origin(gw), ccr).unwrap();
    let body = json!({ "ceremony": ceremony, "credential": reg });
    call(gw, c, &csrf, "register/finish", body).await
}

#[tokio::test]
async fn attested_keys_of_allowed_models_are_registered_and_sign_in() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, pem) = token();
    let (_, other_pem) = token();
    let gw = strict_gateway(
        ca_file(&dir, &[&other_pem, &pem]),
        &[&AAGUID.hyphenated().to_string()],
    )
    .await;
    let (c, _, _) = gw.signed_in("attested@example.com").await;
    let u = user(&gw, "attested@example.com").await;
    let r = try_register(&gw, &c, &mut t, |o| {
        assert_eq!(o["publicKey"]["attestation"], "direct");
        // The key's protection is asked, not demanded: a browser refuses a key without the
        // extension before anything reaches the gateway, and without a word of why.
        let ext = &o["publicKey"]["extensions"];
        assert_eq!(
            ext["credentialProtectionPolicy"],
            "userVerificationRequired"
        );
        assert_eq!(ext["enforceCredentialProtectionPolicy"], false, "{ext}");
    })
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let cred = only_credential(&gw, &u.id).await;
    assert_eq!(cred.aaguid, Some(AAGUID.hyphenated().to_string()));

    // The attested key then works as a second factor like any other.
    gw.clock.advance(30);
    let c = gw.browser();
    let r = gw.password(&c, "attested@example.com", PASSWORD, "").await;
    assert_eq!(location(&r), "/_portcullis/mfa");
    let csrf = gw.csrf(&c, "/_portcullis/mfa").await;
    let (ceremony, options) = start(&gw, &c, &csrf, "authenticate/start", json!({})).await;
    let cred = t
        .do_authentication(origin(&gw), serde_json::from_value(options).unwrap())
        .unwrap();
    let body = json!({ "ceremony": ceremony, "credential": cred });
    let r = call(&gw, &c, &csrf, "authenticate/finish", body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(console(&gw, &c).await, 200);
}

#[tokio::test]
async fn models_not_on_the_allow_list_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, pem) = token();
    let gw = strict_gateway(
        ca_file(&dir, &[&pem]),
        &["2fc0579f-8113-47ea-b116-bb5a8db9202a"],
    )
    .await;
    let (c, _, _) = gw.signed_in("model@example.com").await;
    let u = user(&gw, "model@example.com").await;
    let r = try_register(&gw, &c, &mut t, |_| {}).await;
    let reason = "aaguid_not_allowed";
    registration_refused(&gw, r, &u.id, (403, reason), &[reason]).await;
}

#[tokio::test]
async fn keys_without_trusted_attestation_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pem) = token();
    let gw = strict_gateway(ca_file(&dir, &[&pem]), &[]).await;
    let (c, _, _) = gw.signed_in("selfie@example.com").await;
    let u = user(&gw, "selfie@example.com").await;

    // Self attestation (SoftPasskey signs its attestation with the credential key itself).
    let reason = "attestation_not_verified";
    let r = try_register(&gw, &c, &mut key(), |_| {}).await;
    registration_refused(&gw, r, &u.id, (403, reason), &[reason]).await;
    // A real attestation, but from a vendor CA that is not trusted here.
    let (mut stranger, _) = token();
    let r = try_register(&gw, &c, &mut stranger, |_| {}).await;
    registration_refused(&gw, r, &u.id, (403, reason), &[reason, reason]).await;
}

#[tokio::test]
async fn accounts_can_require_attestation_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, pem) = token();
    let cas = ca_file(&dir, &[&pem]);
    let gw = Gateway::start_with(move |c| {
        localhost(c);
        c.webauthn.attestation_ca_files = vec![cas];
        c.webauthn.accounts.insert(
            "acct-1".into(),
            portcullis::config::AccountKeyPolicy {
                attestation: Some(portcullis::config::Attestation::Required),
                // Security-key registration (touch is enough) still checks the attestation.
                user_verification: Some(portcullis::config::UserVerification::Preferred),
                ..Default::default()
            },
        );
    })
    .await;
    // Users added by the harness belong to acct-1: a self-attested key is refused, an attested
    // one is accepted.
    let (c, _, _) = gw.signed_in("acct1@example.com").await;
    let r = try_register(&gw, &c, &mut key(), |o| {
        assert_eq!(o["publicKey"]["attestation"], "direct");
    })
    .await;
    assert_eq!(
        error_code(r).await,
        (403, "attestation_not_verified".into())
    );
    let r = try_register(&gw, &c, &mut t, |_| {}).await;
    assert_eq!(r.status(), 200);
    // Other accounts follow the global policy: any key.
    assert_eq!(
        gw.state.config.webauthn.policy_for("acct-2").attestation,
        portcullis::config::Attestation::None
    );
}

#[tokio::test]
async fn accounts_can_relax_user_verification() {
    let gw = Gateway::start_with(|c| {
        localhost(c);
        c.webauthn.accounts.insert(
            "acct-1".into(),
            portcullis::config::AccountKeyPolicy {
                user_verification: Some(portcullis::config::UserVerification::Preferred),
                ..Default::default()
            },
        );
    })
    .await;
    let (c, _, _) = gw.signed_in("touch@example.com").await;
    let u = user(&gw, "touch@example.com").await;
    // A key without PIN or biometric registers for this account (the global rule would refuse).
    let mut plain: Key = WebauthnAuthenticator::new(
        webauthn_authenticator_rs::softpasskey::SoftPasskey::new(false),
    );
    let r = try_register(&gw, &c, &mut plain, |o| {
        assert_eq!(
            o["publicKey"]["authenticatorSelection"]["userVerification"],
            "preferred"
        );
    })
    .await;
    assert_eq!(r.status(), 200);
    only_credential(&gw, &u.id).await;
}

#[tokio::test]
async fn registration_without_user_verification_is_refused_when_required() {
    let gw = gateway().await;
    let (c, _, _) = gw.signed_in("nouv@example.com").await;
    let u = user(&gw, "nouv@example.com").await;
    // A client that asks the key not to verify its user: the key answers with presence only.
    let r = try_register(&gw, &c, &mut key(), |o| {
        o["publicKey"]["authenticatorSelection"]["userVerification"] = json!("discouraged");
    })
    .await;
    let reasons = ["user_not_verified"];
    registration_refused(&gw, r, &u.id, (401, "key_rejected"), &reasons).await;
}

/// `portcullis check-config` names the key and the problem for a bad AAGUID and for a CA file
/// that cannot be read, and accepts a good attestation setup.
#[tokio::test]
async fn check_config_explains_attestation_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pem) = token();
    let good = ca_file(&dir, &[&pem]);
    let missing = dir.path().join("missing.pem");
    let check = |body: String| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, body).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check-config", "--config", path.to_str().unwrap()])
            .env(
                "PORTCULLIS__SECRETS__MASTER_KEY",
                portcullis::crypto::MasterKey::generate_base64(),
            )
            .output()
            .unwrap()
    };
    for (webauthn, says) in [
        (
            format!("attestation = \"required\"\nattestation_ca_files = [{good:?}]\nallowed_aaguids = [\"yubikey-5\"]"),
            "webauthn.allowed_aaguids`: `yubikey-5` is not an AAGUID",
        ),
        (
            format!("attestation = \"required\"\nattestation_ca_files = [{missing:?}]"),
            "webauthn.attestation_ca_files`: cannot read",
        ),
    ] {
        let out = check(format!("[webauthn]\n{webauthn}\n"));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    let out = check(format!(
        "[webauthn]\nattestation = \"required\"\nattestation_ca_files = [{good:?}]\nallowed_aaguids = [\"{AAGUID}\"]\n"
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
