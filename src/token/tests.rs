//! Tests of key storage, minting, caching and rotation against a real SQLite store.
// Tests may unwrap and panic: a failure is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::config::TokenAlgorithm;
use crate::store::sql::SqlStore;

/// A temporary SQLite store, master key, config and clock.
pub(super) struct Fx {
    _dir: tempfile::TempDir,
    pub url: String,
    pub store: Arc<dyn DurableStore>,
    pub mk: Arc<MasterKey>,
    pub config: Config,
    pub clock: ManualClock,
}

impl Fx {
    pub async fn new(alg: TokenAlgorithm) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("keys.sqlite").display());
        let store = SqlStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let mut config = Config::default();
        config.token.algorithm = alg;
        config.token.audience = "esp-console".into();
        config.token.issuer = Some("https://gw.example".into());
        config.token.ttl = Duration::from_secs(120);
        config.token.key_overlap = Duration::from_secs(3600);
        Fx {
            _dir: dir,
            url,
            store: Arc::new(store),
            mk: Arc::new(MasterKey::from_bytes(&[1u8; 32])),
            config,
            clock: ManualClock::starting_now(),
        }
    }

    pub async fn load_with(&self, mk: MasterKey) -> Result<Signer, TokenError> {
        let clock: Arc<dyn Clock> = Arc::new(self.clock.clone());
        Signer::load(self.store.clone(), Arc::new(mk), &self.config, clock).await
    }

    pub async fn signer(&self) -> Signer {
        let clock: Arc<dyn Clock> = Arc::new(self.clock.clone());
        Signer::load(self.store.clone(), self.mk.clone(), &self.config, clock)
            .await
            .unwrap()
    }

    pub async fn live(&self) -> Vec<crate::store::SigningKeyRecord> {
        self.store
            .live_signing_keys(self.clock.now())
            .await
            .unwrap()
    }

    /// A direct connection, to break or tamper with the table underneath the store.
    pub async fn raw(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&self.url).await.unwrap()
    }
}

pub(super) fn identity() -> Identity<'static> {
    static AMR: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| vec!["pwd".into(), "otp".into()]);
    Identity {
        sub: "user-1",
        email: "alice@example.com",
        account: "acct-9",
        amr: &AMR,
        acr: "mfa",
        auth_time: 1_700_000_000,
        factor_time: Some(1_700_000_000),
        sid: "sid-abc",
    }
}

pub(super) fn jwks(s: &Signer) -> Value {
    serde_json::from_slice(&s.jwks_json()).unwrap()
}

/// A token as the text the identity header carries.
pub(super) fn text(token: http::HeaderValue) -> String {
    assert!(
        token.is_sensitive(),
        "the identity header is marked sensitive"
    );
    token.to_str().unwrap().to_string()
}

/// The very same cached token (not an equal one minted again).
fn same(a: &http::HeaderValue, b: &http::HeaderValue) -> bool {
    a.as_bytes().as_ptr() == b.as_bytes().as_ptr()
}

pub(super) fn header_of(token: &str) -> jsonwebtoken::Header {
    jsonwebtoken::decode_header(token).unwrap()
}

pub(super) fn check(fx: &Fx, s: &Signer, token: &str) -> Result<Claims, TokenError> {
    verify(token, &jwks(s), "esp-console", Some(&fx.config.issuer()), 5)
}

/// [`check`] for a token minted after the test clock was moved past a rotation's lead (the
/// verifier reads the real clock).
fn check_after_lead(fx: &Fx, s: &Signer, token: &str) -> Result<Claims, TokenError> {
    let leeway = u64::try_from(keys::PUBLISH_LEAD).unwrap() + 5;
    verify(
        token,
        &jwks(s),
        "esp-console",
        Some(&fx.config.issuer()),
        leeway,
    )
}

#[tokio::test]
async fn load_creates_one_key_and_a_restart_reuses_it() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let first = fx.signer().await;
    assert_eq!(fx.live().await.len(), 1);
    let token = text(first.token_for("s1", &identity()).unwrap());

    let second = fx.signer().await;
    assert_eq!(fx.live().await.len(), 1, "a restart must not add a key");
    assert_eq!(second.current_kid(), first.current_kid());
    assert_eq!(second.jwks_json(), first.jwks_json());
    check(&fx, &second, &token).unwrap();
}

#[tokio::test]
async fn private_key_is_sealed_and_needs_the_master_key() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let record = fx.live().await.remove(0);
    assert_eq!(record.kid, signer.current_kid());
    assert_eq!(record.alg, "EdDSA");
    let der = fx
        .mk
        .open(
            &format!("signing-key:{}", record.kid),
            &record.private_sealed,
        )
        .unwrap();
    assert!(der.len() >= 48, "PKCS#8 DER expected");
    assert!(
        !record
            .private_sealed
            .windows(16)
            .any(|w| der.windows(16).any(|d| d == w)),
        "the stored blob contains part of the DER"
    );
    let stored: Value = serde_json::from_str(&record.public_jwk).unwrap();
    assert!(stored.get("d").is_none());

    let err = fx.load_with(MasterKey::from_bytes(&[2u8; 32])).await;
    assert!(matches!(err, Err(TokenError::Crypto(_))), "{err:?}");
    assert_eq!(
        fx.live().await.len(),
        1,
        "a wrong master key must not add a key"
    );
}

#[tokio::test]
async fn a_tampered_public_key_is_refused() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let other = keys::new_record(TokenAlgorithm::EdDSA, &fx.mk, 0).unwrap();
    let mut forged: Value = serde_json::from_str(&other.public_jwk).unwrap();
    forged["kid"] = signer.current_kid().into();
    sqlx::query("UPDATE signing_keys SET public_jwk = ?1")
        .bind(forged.to_string())
        .execute(&fx.raw().await)
        .await
        .unwrap();
    let err = fx.load_with(MasterKey::from_bytes(&[1u8; 32])).await;
    assert!(matches!(err, Err(TokenError::Crypto(ref m)) if m.contains("does not match")));
}

async fn round_trip(alg: TokenAlgorithm) {
    let fx = Fx::new(alg).await;
    let signer = fx.signer().await;
    let now = fx.clock.now();
    let token = text(signer.token_for("s1", &identity()).unwrap());

    let header = header_of(&token);
    assert_eq!(header.kid.as_deref(), Some(signer.current_kid().as_str()));
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let expected_alg = match alg {
        TokenAlgorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        TokenAlgorithm::ES256 => jsonwebtoken::Algorithm::ES256,
    };
    assert_eq!(header.alg, expected_alg);

    let claims = check(&fx, &signer, &token).unwrap();
    let id = identity();
    assert_eq!(claims.iss, "https://gw.example");
    assert_eq!(claims.aud, "esp-console");
    assert_eq!(
        (
            claims.sub.as_str(),
            claims.email.as_str(),
            claims.account.as_str()
        ),
        (id.sub, id.email, id.account)
    );
    assert_eq!(
        (claims.amr.as_slice(), claims.acr.as_str()),
        (id.amr, id.acr)
    );
    assert_eq!(
        (claims.auth_time, claims.sid.as_str()),
        (id.auth_time, id.sid)
    );
    assert_eq!((claims.iat, claims.nbf, claims.exp), (now, now, now + 120));
    assert!(claims.jti.len() >= 16);

    let set = jwks(&signer);
    let keys = set["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let k = &keys[0];
    assert_eq!(k["kid"], signer.current_kid().as_str());
    assert_eq!(k["alg"], alg.as_str());
    assert_eq!(k["use"], "sig");
    match alg {
        TokenAlgorithm::EdDSA => {
            assert_eq!(
                (k["kty"].as_str(), k["crv"].as_str()),
                (Some("OKP"), Some("Ed25519"))
            );
            assert!(k.get("y").is_none());
        }
        TokenAlgorithm::ES256 => {
            assert_eq!(
                (k["kty"].as_str(), k["crv"].as_str()),
                (Some("EC"), Some("P-256"))
            );
            assert!(k["y"].is_string());
        }
    }
    assert!(k["x"].is_string());
    assert!(k.get("d").is_none(), "private part published");
    assert!(!String::from_utf8_lossy(&signer.jwks_json()).contains("\"d\""));
}

#[tokio::test]
async fn eddsa_tokens_verify_with_all_claims() {
    round_trip(TokenAlgorithm::EdDSA).await;
}

#[tokio::test]
async fn es256_tokens_verify_with_all_claims() {
    round_trip(TokenAlgorithm::ES256).await;
}

#[tokio::test]
async fn tokens_are_cached_per_session_until_a_quarter_of_the_ttl_remains() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let id = identity();
    let first = signer.token_for("s1", &id).unwrap();
    assert!(same(&first, &signer.token_for("s1", &id).unwrap()));

    let other = signer.token_for("s2", &id).unwrap();
    assert_ne!(first, other, "sessions share a token");

    fx.clock.advance(90); // exactly a quarter (30 s) left: still reused
    assert!(same(&first, &signer.token_for("s1", &id).unwrap()));
    fx.clock.advance(1);
    let renewed = signer.token_for("s1", &id).unwrap();
    assert_ne!(first, renewed);
    assert!(same(&renewed, &signer.token_for("s1", &id).unwrap()));

    let mut stepped_up = id;
    stepped_up.acr = "phr";
    let after_step_up = signer.token_for("s1", &stepped_up).unwrap();
    assert_ne!(
        renewed, after_step_up,
        "a changed identity must not get the old token"
    );

    signer.forget("s1");
    assert_ne!(after_step_up, signer.token_for("s1", &stepped_up).unwrap());
}

#[tokio::test]
async fn the_token_cache_stays_bounded() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let mut signer = fx.signer().await;
    signer.set_cache_cap(3);
    for i in 0..10 {
        text(signer.token_for(&format!("s{i}"), &identity()).unwrap());
        assert!(signer.cached_count() <= 3);
    }
    fx.clock.advance(121);
    signer.refresh().await.unwrap();
    assert_eq!(
        signer.cached_count(),
        0,
        "expired tokens are pruned on refresh"
    );
}

#[tokio::test]
async fn rotation_keeps_old_tokens_verifiable_through_the_overlap() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let other_gateway = fx.signer().await;
    let old_kid = signer.current_kid();
    let old_token = text(signer.token_for("s1", &identity()).unwrap());

    let new_kid = rotate(fx.store.as_ref(), &fx.mk, &fx.config, fx.clock.now())
        .await
        .unwrap();
    assert_ne!(new_kid, old_kid);
    // The new key is published at once, and signs only once every gateway and every backend's
    // cached JWKS can have it: the old one signs until then.
    signer.refresh().await.unwrap();
    assert_eq!(signer.current_kid(), old_kid, "published before it signs");
    let kids = |signer: &Signer| -> Vec<String> {
        jwks(signer)["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(kids(&signer), vec![old_kid.clone(), new_kid.clone()]);
    assert_eq!(
        header_of(&text(signer.token_for("s2", &identity()).unwrap()))
            .kid
            .as_deref(),
        Some(old_kid.as_str())
    );
    fx.clock.advance(keys::PUBLISH_LEAD - 1);
    signer.refresh().await.unwrap();
    assert_eq!(signer.current_kid(), old_kid);
    fx.clock.advance(1);
    assert_eq!(signer.current_kid(), old_kid, "switch happens on refresh");
    signer.refresh().await.unwrap();
    other_gateway.refresh().await.unwrap();
    assert_eq!(signer.current_kid(), new_kid);
    assert_eq!(other_gateway.current_kid(), new_kid);

    let set = jwks(&signer);
    let kids: Vec<&str> = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(
        kids,
        vec![new_kid.as_str(), old_kid.as_str()],
        "current first"
    );
    check(&fx, &signer, &old_token).unwrap();

    let new_token = text(signer.token_for("s1", &identity()).unwrap());
    assert_ne!(new_token, old_token, "a rotation forces a fresh token");
    assert_eq!(header_of(&new_token).kid.as_deref(), Some(new_kid.as_str()));
    check_after_lead(&fx, &other_gateway, &new_token).unwrap();

    fx.clock.advance(3601);
    signer.refresh().await.unwrap();
    let set = jwks(&signer);
    let keys = set["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], new_kid.as_str());
    let err = check(&fx, &signer, &old_token).unwrap_err();
    assert!(err.to_string().contains("unknown kid"), "{err}");
    assert_eq!(
        fx.signer().await.current_kid(),
        new_kid,
        "restart keeps the new key"
    );
}

#[tokio::test]
async fn rotation_can_switch_the_algorithm() {
    let mut fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    fx.config.token.algorithm = TokenAlgorithm::ES256;
    rotate(fx.store.as_ref(), &fx.mk, &fx.config, fx.clock.now())
        .await
        .unwrap();
    fx.clock.advance(keys::PUBLISH_LEAD);
    signer.refresh().await.unwrap();
    let token = text(signer.token_for("s1", &identity()).unwrap());
    assert_eq!(header_of(&token).alg, jsonwebtoken::Algorithm::ES256);
    check_after_lead(&fx, &signer, &token).unwrap();
}

#[tokio::test]
async fn refresh_keeps_the_old_ring_when_the_store_fails() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let before = signer.jwks_json();
    let raw = fx.raw().await;
    sqlx::query("ALTER TABLE signing_keys RENAME TO signing_keys_away")
        .execute(&raw)
        .await
        .unwrap();
    let err = signer.refresh().await;
    assert!(matches!(err, Err(TokenError::Store(_))), "{err:?}");
    assert_eq!(signer.jwks_json(), before);
    let token = text(signer.token_for("s1", &identity()).unwrap());
    check(&fx, &signer, &token).unwrap();

    sqlx::query("ALTER TABLE signing_keys_away RENAME TO signing_keys")
        .execute(&raw)
        .await
        .unwrap();
    signer.refresh().await.unwrap();
    assert_eq!(signer.jwks_json(), before);
}

#[tokio::test]
async fn refresh_without_a_signing_key_keeps_the_old_ring() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let kid = signer.current_kid();
    let now = fx.clock.now();
    fx.store
        .retire_signing_keys_except("none", now + 10)
        .await
        .unwrap();
    assert!(matches!(signer.refresh().await, Err(TokenError::NoKey)));
    assert_eq!(signer.current_kid(), kid);
    let fresh = fx.signer().await;
    assert_ne!(
        fresh.current_kid(),
        kid,
        "load generates a key when none may sign"
    );
}

/// A cached token asserts its identity in full: a change in any one field gets a new token.
#[tokio::test]
async fn a_change_in_any_field_of_the_identity_mints_a_new_token() {
    let fx = Fx::new(TokenAlgorithm::EdDSA).await;
    let signer = fx.signer().await;
    let id = identity();
    let cached = signer.token_for("s1", &id).unwrap();
    let other_amr = vec!["pwd".to_string(), "hwk".to_string()];
    let changes: [(&str, Identity<'_>); 9] = [
        (
            "sub",
            Identity {
                sub: "user-2",
                ..id
            },
        ),
        (
            "email",
            Identity {
                email: "bob@example.com",
                ..id
            },
        ),
        (
            "account",
            Identity {
                account: "acct-1",
                ..id
            },
        ),
        (
            "amr",
            Identity {
                amr: &other_amr,
                ..id
            },
        ),
        ("acr", Identity { acr: "phr", ..id }),
        (
            "auth_time",
            Identity {
                auth_time: id.auth_time + 1,
                ..id
            },
        ),
        (
            "factor_time",
            Identity {
                factor_time: Some(1_700_000_060),
                ..id
            },
        ),
        (
            "no factor_time",
            Identity {
                factor_time: None,
                ..id
            },
        ),
        (
            "sid",
            Identity {
                sid: "sid-xyz",
                ..id
            },
        ),
    ];
    for (field, changed) in changes {
        let token = signer.token_for("s1", &changed).unwrap();
        assert!(!same(&cached, &token), "{field} changed, token reused");
        let claims = check(&fx, &signer, &text(token)).unwrap();
        let asserted = Identity {
            sub: &claims.sub,
            email: &claims.email,
            account: &claims.account,
            amr: &claims.amr,
            acr: &claims.acr,
            auth_time: claims.auth_time,
            factor_time: claims.factor_time,
            sid: &claims.sid,
        };
        assert_eq!(asserted, changed, "{field}");
        // Back to the first identity: a token for it again (the cache holds one per session).
        signer.token_for("s1", &id).unwrap();
    }
}
