//! Server-rendered SVG bar charts of sign-ins, failures and denials (no script, no inline
//! style: colours come from classes in `portcullis.css`, so the strict CSP holds).

use std::fmt::Write;

use crate::store::AuditCount;

/// Events that complete a sign-in (with a factor set up on the way, for the last two).
const SIGN_IN_EVENTS: &[&str] = &[
    "second_factor",
    "passkey_sign_in",
    "totp_enrolled",
    "webauthn_enrolled",
];
/// Events whose failures are failed sign-in attempts.
const ATTEMPT_EVENTS: &[&str] = &[
    "login_password",
    "second_factor",
    "passkey_sign_in",
    "step_up",
    "totp_enrolment",
];

/// One bucket's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    pub start: i64,
    pub sign_ins: i64,
    pub failures: i64,
    pub denials: i64,
}

/// Totals of a series of buckets.
pub fn totals(buckets: &[Bucket]) -> Bucket {
    buckets.iter().fold(Bucket::default(), |t, b| Bucket {
        start: t.start,
        sign_ins: t.sign_ins + b.sign_ins,
        failures: t.failures + b.failures,
        denials: t.denials + b.denials,
    })
}

/// `n` buckets of `width` seconds ending with the one holding `now`, filled from `counts`.
pub fn buckets(counts: &[AuditCount], now: i64, width: i64, n: usize) -> Vec<Bucket> {
    let last = now - now.rem_euclid(width);
    let first = last - width * (i64::try_from(n).unwrap_or(1) - 1);
    let mut out: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            start: first + width * i64::try_from(i).unwrap_or(0),
            ..Bucket::default()
        })
        .collect();
    for c in counts {
        if c.bucket < first || c.bucket > last {
            continue;
        }
        let Ok(i) = usize::try_from((c.bucket - first) / width) else {
            continue;
        };
        let Some(b) = out.get_mut(i) else { continue };
        let ev = c.event.as_str();
        match c.outcome.as_str() {
            "success" if SIGN_IN_EVENTS.contains(&ev) => b.sign_ins += c.count,
            "failure" if ATTEMPT_EVENTS.contains(&ev) => b.failures += c.count,
            "denied" => b.denials += c.count,
            _ => {}
        }
    }
    out
}

/// The label of an hourly bucket: its hour (UTC), every third hour.
pub fn hour_label(start: i64) -> Option<String> {
    (start.rem_euclid(3 * 3600) == 0).then(|| utc(start, 11..16))
}

/// The label of a bucket of hours: the date (UTC), under the bucket that starts at midnight.
pub fn date_label(start: i64) -> Option<String> {
    (start.rem_euclid(24 * 3600) == 0).then(|| utc(start, 5..10))
}

fn utc(t: i64, part: std::ops::Range<usize>) -> String {
    crate::clock::rfc3339(t)
        .get(part)
        .unwrap_or_default()
        .to_string()
}

const W: f64 = 720.0;
const H: f64 = 180.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 10.0;

/// The chart as an `<svg>` element. `label` names a bucket on the x axis by its start, or
/// `None` for a bucket left unlabelled (a label marks where its bucket starts: a date under the
/// bucket that starts at midnight, not under every fourth whatever hour it starts at).
pub fn svg(title: &str, buckets: &[Bucket], label: impl Fn(i64) -> Option<String>) -> String {
    let max = buckets
        .iter()
        .map(|b| b.sign_ins.max(b.failures).max(b.denials))
        .max()
        .unwrap_or(0)
        .max(1);
    let n = buckets.len().max(1);
    let slot = (W - LEFT) / n as f64;
    let bar = (slot / 4.0).max(1.0);
    let plot_h = H - BOTTOM - TOP;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{title}\" xmlns=\"http://www.w3.org/2000/svg\"><title>{title}</title>"
    );
    // Axes and the scale.
    let base = H - BOTTOM;
    let _ = write!(
        s,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{base}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{base}\" x2=\"{W}\" y2=\"{base}\"/>\
         <text class=\"tick\" x=\"{x}\" y=\"{y}\" text-anchor=\"end\">{max}</text>\
         <text class=\"tick\" x=\"{x}\" y=\"{base}\" text-anchor=\"end\">0</text>",
        x = LEFT - 4.0,
        y = TOP + 8.0,
    );
    for (i, b) in buckets.iter().enumerate() {
        let x0 = LEFT + slot * i as f64 + bar / 2.0;
        for (k, (class, label, v)) in [
            ("sign-ins", "Sign-ins", b.sign_ins),
            ("failures", "Failures", b.failures),
            ("denials", "Denials", b.denials),
        ]
        .into_iter()
        .enumerate()
        {
            if v == 0 {
                continue;
            }
            let h = plot_h * v as f64 / max as f64;
            let _ = write!(
                s,
                "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\"><title>{label}: {v}</title></rect>",
                x = x0 + bar * k as f64,
                y = base - h,
            );
        }
        if let Some(l) = label(b.start) {
            let _ = write!(
                s,
                "<text class=\"tick\" x=\"{x:.1}\" y=\"{y}\">{l}</text>",
                x = x0,
                y = H - 6.0,
            );
        }
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(bucket: i64, event: &str, outcome: &str, n: i64) -> AuditCount {
        AuditCount {
            bucket,
            event: event.into(),
            outcome: outcome.into(),
            count: n,
        }
    }

    #[test]
    fn counts_land_in_their_buckets_by_kind() {
        let now = 10 * 3600 + 5;
        let counts = [
            count(10 * 3600, "second_factor", "success", 3),
            count(10 * 3600, "passkey_sign_in", "success", 1),
            // A sign-in that set up its second factor on the way is a sign-in too.
            count(10 * 3600, "totp_enrolled", "success", 2),
            count(10 * 3600, "webauthn_enrolled", "success", 1),
            count(9 * 3600, "login_password", "failure", 7),
            count(9 * 3600, "totp_enrolment", "failure", 1),
            count(9 * 3600, "proxy_denied", "denied", 2),
            // A password success is not a complete sign-in; too old counts are left out.
            count(9 * 3600, "login_password", "success", 5),
            count(3600, "second_factor", "success", 100),
        ];
        let b = buckets(&counts, now, 3600, 3);
        assert_eq!(
            b.iter().map(|b| b.start).collect::<Vec<_>>(),
            vec![8 * 3600, 9 * 3600, 10 * 3600]
        );
        assert_eq!((b[2].sign_ins, b[2].failures, b[2].denials), (7, 0, 0));
        assert_eq!((b[1].sign_ins, b[1].failures, b[1].denials), (0, 8, 2));
        assert_eq!(totals(&b).sign_ins, 7);
    }

    #[test]
    fn svg_scales_bars_and_has_no_inline_style_or_script() {
        let b = vec![
            Bucket {
                start: 0,
                sign_ins: 10,
                failures: 5,
                denials: 0,
            },
            Bucket {
                start: 3600,
                sign_ins: 0,
                failures: 0,
                denials: 1,
            },
        ];
        let s = svg("Last day", &b, |t| Some(format!("{}h", t / 3600)));
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(!s.contains("style") && !s.contains("script"));
        assert_eq!(s.matches("<rect").count(), 3, "zero bars are not drawn");
        assert!(
            s.contains(&format!("height=\"{:.1}\"", H - BOTTOM - TOP)),
            "the tallest bar fills the plot"
        );
        assert!(s.contains(">0h<") && s.contains(">1h<"));
        assert!(s.contains("<title>Sign-ins: 10</title>"));
    }

    /// A week of 6-hour buckets that starts at 18:00: the date stands under the bucket that
    /// starts at that date's midnight, not under the one before it.
    #[test]
    fn dates_stand_under_their_midnight() {
        let midnight = 1_796_515_200; // 2026-12-06T00:00:00Z
        let b: Vec<Bucket> = (0..8)
            .map(|i| Bucket {
                start: midnight - 6 * 3600 + i * 6 * 3600,
                ..Bucket::default()
            })
            .collect();
        let labels: Vec<Option<String>> = b.iter().map(|b| date_label(b.start)).collect();
        assert_eq!(labels[0], None, "18:00 the day before");
        assert_eq!(labels[1].as_deref(), Some("12-06"));
        assert_eq!(labels[5].as_deref(), Some("12-07"));
        assert_eq!(labels.iter().flatten().count(), 2);
        assert_eq!(hour_label(midnight + 3 * 3600).as_deref(), Some("03:00"));
        assert_eq!(hour_label(midnight + 3600), None);
    }
}
