//! Criterion benchmarks of the per-request work on the proxy path: path canonicalisation,
//! session lookup in the memory store, the user gate, and the cached identity token; and of the
//! password check every sign-in pays (argon2id at the default parameters).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::clock::{Clock, SystemClock};
use portcullis::config::Config;
use portcullis::secret::Secret;
use portcullis::session::{Session, Stage};
use portcullis::state::AppState;
use portcullis::token::Identity;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.storage.durable = format!("sqlite://{}", dir.path().join("b.sqlite").display());
    config.secrets.master_key = Some(Secret::new(portcullis::crypto::MasterKey::generate_base64()));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let state = rt.block_on(AppState::new(config, clock.clone())).unwrap();

    c.bench_function("normalise_path", |b| {
        b.iter(|| {
            portcullis::policy::normalise_path(std::hint::black_box(
                "/campaigns/2024/../2025/./list%2ejson",
            ))
        })
    });

    let session = Session::after_password(
        "u1",
        Stage::Authenticated,
        clock.now_millis(),
        "127.0.0.1",
        "bench",
        None,
    );
    let (id, key) = rt.block_on(state.sessions.create(&session)).unwrap();
    c.bench_function("session_load_memory", |b| {
        b.iter(|| {
            rt.block_on(state.sessions.load(Some(&id)))
                .unwrap()
                .unwrap()
        })
    });

    let amr = vec!["pwd".to_string(), "otp".to_string()];
    let identity = Identity {
        sub: "u1",
        email: "u1@example.com",
        account: "a1",
        amr: &amr,
        acr: "urn:portcullis:acr:mfa",
        auth_time: clock.now(),
        factor_time: Some(clock.now()),
        sid: "sid",
    };
    c.bench_function("token_for_cached", |b| {
        b.iter(|| state.signer.token_for(&key, &identity).unwrap())
    });
    let mut n = 0u64;
    c.bench_function("token_mint_uncached", |b| {
        b.iter(|| {
            n += 1;
            state.signer.token_for(&format!("k{n}"), &identity).unwrap()
        })
    });
}

fn argon2(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hasher = portcullis::auth::password::PasswordHasher::new(
        &portcullis::config::PasswordConfig::default(),
    )
    .unwrap();
    let password = Secret::new("tall violet lantern orbit 42".to_string());
    let stored = rt.block_on(hasher.hash(&password)).unwrap();
    let mut group = c.benchmark_group("argon2");
    group.sample_size(10);
    group.bench_function("password_verify_default", |b| {
        b.iter(|| {
            rt.block_on(hasher.verify(&password, Some(&stored)))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench, argon2);
criterion_main!(benches);
