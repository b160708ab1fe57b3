use super::*;
use crate::store::AuditEvent;

/// A cheap hasher, for rendering.
fn hasher() -> PasswordHasher {
    PasswordHasher::new(&crate::config::PasswordConfig {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        ..Default::default()
    })
    .unwrap()
}

fn value(m: &Metrics, line_start: &str) -> f64 {
    let text = m.render(&hasher()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{line_start}` in\n{text}"))
}

fn ev(event: &str, outcome: &str, reason: &str) -> AuditEvent {
    AuditEvent::new(event, outcome, 0).reason(reason)
}

#[test]
fn audit_events_become_sign_in_counts() {
    let m = Metrics::new();
    // (event, outcome, reason) → (result, factor)
    let cases = [
        (
            "login_password",
            "failure",
            "bad_password",
            "failure",
            "password",
        ),
        (
            "login_password",
            "denied",
            "throttled",
            "throttled",
            "password",
        ),
        ("login_password", "denied", "locked", "denied", "password"),
        ("second_factor", "success", "otp", "success", "totp"),
        ("second_factor", "success", "rec", "success", "recovery"),
        ("second_factor", "success", "hwk", "success", "key"),
        (
            "second_factor",
            "failure",
            "replayed_code",
            "failure",
            "totp",
        ),
        (
            "second_factor",
            "failure",
            "bad_recovery_code",
            "failure",
            "recovery",
        ),
        (
            "second_factor",
            "failure",
            "unknown_credential",
            "failure",
            "key",
        ),
        (
            "second_factor",
            "denied",
            "throttled",
            "throttled",
            "second_factor",
        ),
        (
            "passkey_sign_in",
            "success",
            "hwk_user",
            "success",
            "passkey",
        ),
        ("totp_enrolment", "failure", "bad_code", "failure", "totp"),
    ];
    for (event, outcome, reason, result, factor) in cases {
        let e = ev(event, outcome, reason);
        let line =
            format!("portcullis_sign_in_attempts_total{{result=\"{result}\",factor=\"{factor}\"}}");
        let before = value(&m, &line);
        m.sign_in_event(&e);
        assert_eq!(value(&m, &line), before + 1.0, "{e:?}");
    }
    // Not sign-in steps: no count anywhere.
    let before = m.render(&hasher()).unwrap();
    m.sign_in_event(&ev("logout", "success", "user"));
    m.sign_in_event(&ev("proxy_denied", "denied", "second_factor_incomplete"));
    let after = m.render(&hasher()).unwrap();
    assert_eq!(before, after);
}

#[test]
fn step_ups_are_counted_by_reason() {
    let m = Metrics::new();
    m.sign_in_event(&ev("login_password", "success", "second_factor_required"));
    m.sign_in_event(&ev("login_password", "success", "enrolment_required"));
    m.sign_in_event(&ev(
        "second_factor",
        "denied",
        "phishing_resistant_required",
    ));
    for reason in [
        "second_factor_required",
        "enrolment_required",
        "key_required",
    ] {
        assert_eq!(
            value(
                &m,
                &format!("portcullis_step_ups_total{{reason=\"{reason}\"}}")
            ),
            1.0
        );
    }
}

#[test]
fn throttled_budgets_are_named_without_the_key() {
    let m = Metrics::new();
    m.throttled("fail:pwd:{alice@example.com}");
    m.throttled("fail:ip:192.0.2.1");
    m.throttled("fail:net:192.0.2.0/24");
    m.throttled("fail:code:{u1}");
    m.throttled("rate:global:1700000000");
    m.throttled("fail:dev:{d1}");
    m.sign_in_codes_spent();
    // Labels name the budget, never the account or address it was kept for.
    let text = m.render(&hasher()).unwrap();
    assert!(
        !text.contains("alice@") && !text.contains("192.0.2"),
        "{text}"
    );
    for limit in LIMITS {
        assert_eq!(
            value(
                &m,
                &format!("portcullis_throttled_attempts_total{{limit=\"{limit}\"}}")
            ),
            1.0
        );
    }
}

#[test]
fn each_outcome_counts_in_its_own_series() {
    let m = Metrics::new();
    for (i, p) in Proxied::ALL.into_iter().enumerate() {
        for _ in 0..=i {
            m.proxied(p);
        }
    }
    for (i, f) in ForwardAuth::ALL.into_iter().enumerate() {
        for _ in 0..=i {
            m.forward_auth(f);
        }
    }
    for (i, p) in Proxied::ALL.into_iter().enumerate() {
        let line = format!(
            "portcullis_proxied_requests_total{{outcome=\"{}\"}}",
            p.label()
        );
        assert_eq!(value(&m, &line), (i + 1) as f64, "{line}");
    }
    for (i, f) in ForwardAuth::ALL.into_iter().enumerate() {
        let line = format!(
            "portcullis_forward_auth_decisions_total{{outcome=\"{}\"}}",
            f.label()
        );
        assert_eq!(value(&m, &line), (i + 1) as f64, "{line}");
    }
}
