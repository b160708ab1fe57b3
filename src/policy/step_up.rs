//! Console actions that need a fresh proof (`[[step_up]]`): sending a campaign, making API keys,
//! adding sending domains, exporting lists. A session that signed in (or last proved itself)
//! longer ago than a rule's `max_age` must prove itself again before such a request is
//! forwarded, with a security key where the rule says `key = true`.
//!
//! Rules match generously, since matching too much only asks for a proof: paths compare
//! segment by segment ignoring letter case, empty segments are ignored, a path segment also
//! matches without trailing dots and spaces and without a format suffix (`send.json`,
//! `export.csv`, which frameworks route to the same action), and both the canonical path and its
//! lenient reading (escapes decoded, `;` parameters dropped, as a console behind the gateway may
//! read it) are tried. A rule for PUT, PATCH or DELETE also covers POST, which frameworks turn
//! into those methods with a `_method` form field, and a rule for GET covers HEAD, which they
//! answer by running the GET handler. Every matching rule applies: a request needs
//! the proof each of them asks for.

use super::{path_matches, segments};
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};

/// One `[[step_up]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepUpRule {
    /// A path pattern: `/` separated segments; `*` is any one segment, a last `**` any rest
    /// (also none): `/campaigns/*/send`, `/api-keys/**`.
    pub path: String,
    /// The methods it applies to, e.g. `["POST"]`; empty (the default): every method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// How long ago the last second-factor proof may be.
    #[serde(with = "humantime_serde", default = "default_max_age")]
    pub max_age: Duration,
    /// Only a security key or passkey counts as the proof (phishing-resistant).
    #[serde(default)]
    pub key: bool,
}

fn default_max_age() -> Duration {
    Duration::from_secs(5 * 60)
}

/// Why a rule is refused, for the configuration error.
pub fn check_rule(rule: &StepUpRule) -> Result<(), String> {
    if !rule.path.starts_with('/') || rule.path.contains(['?', '#']) {
        return Err("path must be a path starting with '/' (no query)".into());
    }
    let segments: Vec<&str> = segments(&rule.path).collect();
    if let Some(pos) = segments.iter().position(|s| *s == "**") {
        if pos + 1 != segments.len() {
            return Err("`**` may only be the last segment of a path".into());
        }
    }
    // A star inside a name (`send*`, `*.csv`) would be matched as a literal star, so the rule
    // would cover nothing the writer meant.
    if let Some(s) = segments
        .iter()
        .find(|s| s.contains('*') && !matches!(**s, "*" | "**"))
    {
        return Err(format!(
            "`{s}`: `*` stands for a whole segment only (`/campaigns/*/send`), and a last `**` \
             for any rest; there are no partial wildcards"
        ));
    }
    for m in &rule.methods {
        if !STANDARD_METHODS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(m.trim()))
        {
            return Err(format!(
                "`{m}` is not an HTTP method (one of {})",
                STANDARD_METHODS.join(", ")
            ));
        }
    }
    if super::normalise_path(&rule.path).as_deref() != Ok(rule.path.as_str()) {
        return Err(
            "path must be written in its canonical form (no escapes, `.` or `..` segments, or empty ones: `//`)".into(),
        );
    }
    // Also with a format suffix (`/_portcullis.json`), which rules ignore when they match.
    let first = segments.first().copied().unwrap_or_default();
    if super::is_gateway_path(&rule.path) || first.to_ascii_lowercase().starts_with("_portcullis.")
    {
        return Err(
            "path is in the gateway's own namespace (/_portcullis), which is never forwarded: \
             the rule would never apply"
                .into(),
        );
    }
    if rule.max_age < Duration::from_secs(30) || rule.max_age > Duration::from_secs(24 * 3600) {
        return Err("max_age must be between 30s and 24h".into());
    }
    Ok(())
}

/// Methods a rule may name.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
];

/// The method of a request whose method is not known (a forward-auth check whose proxy did not
/// say it): every rule for its path applies.
pub fn unknown_method() -> Method {
    // `*` is a token, so a valid extension method, and no request's method.
    Method::from_bytes(b"*").unwrap_or(Method::POST)
}

/// Whether `rule` covers `method`: every rule covers POST, which frameworks run as the method a
/// `_method` form field or query parameter names (Rails and Sinatra's `MethodOverride` takes
/// GET, PUT, PATCH, DELETE… from a POST); a rule for GET covers HEAD, which frameworks answer by
/// running the GET handler; and every rule covers the [`unknown_method`].
fn covers(rule: &StepUpRule, method: &Method) -> bool {
    let names = |m: &str| {
        rule.methods
            .iter()
            .any(|r| r.trim().eq_ignore_ascii_case(m))
    };
    // Compared without regard to case: a console may read `head` or `post` as HEAD or POST
    // (Django upper-cases the method), so a spelling of ours must not dodge the rule.
    let is = |m: &str| method.as_str().eq_ignore_ascii_case(m);
    rule.methods.is_empty()
        || method.as_str() == "*"
        || names(method.as_str())
        || is("POST")
        || (is("HEAD") && names("GET"))
}

/// The rules that apply to `method` `path` (canonical), in either reading of the path.
fn matching<'a>(
    rules: &'a [StepUpRule],
    method: &'a Method,
    path: &'a str,
) -> impl Iterator<Item = &'a StepUpRule> + 'a {
    // The other readings differ only where there is something to decode, drop or trim.
    let others = super::has_other_readings(path).then(|| super::readings(path));
    rules.iter().filter(move |r| {
        covers(r, method)
            && (path_matches(&r.path, path)
                || others
                    .iter()
                    .flatten()
                    .any(|reading| path_matches(&r.path, reading)))
    })
}

/// What the rules that apply to `method` `path` ask of a session whose last second-factor proof
/// was at `auth_ms` (its last key proof at `strong_ms`): `None` when every one of them is met,
/// else `Some(key)`, `key` when one that is not met wants a security key.
pub fn unmet(
    rules: &[StepUpRule],
    method: &Method,
    path: &str,
    (factor_ms, strong_ms, now_ms): (Option<i64>, Option<i64>, i64),
) -> Option<bool> {
    if rules.is_empty() {
        return None;
    }
    matching(rules, method, path)
        .filter(|r| !satisfied(r, factor_ms, strong_ms, now_ms))
        .fold(None, |key, r| Some(key.unwrap_or(false) || r.key))
}

/// Whether a session whose last second-factor proof was at `factor_ms` (and last key proof at
/// `strong_ms`) satisfies `rule` at `now_ms`. A key rule wants the latest proof to be the key
/// (an app code after it makes the session's latest proof a code again, as the token's `acr`
/// says to the console).
pub fn satisfied(
    rule: &StepUpRule,
    factor_ms: Option<i64>,
    strong_ms: Option<i64>,
    now_ms: i64,
) -> bool {
    let proof = if rule.key {
        strong_ms.filter(|key| factor_ms.is_none_or(|code| *key >= code))
    } else {
        factor_ms
    };
    let max = i64::try_from(rule.max_age.as_millis()).unwrap_or(i64::MAX);
    proof.is_some_and(|at| now_ms.saturating_sub(at) <= max)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(path: &str, methods: &[&str]) -> StepUpRule {
        StepUpRule {
            path: path.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            max_age: Duration::from_secs(300),
            key: false,
        }
    }

    #[test]
    fn rules_match_paths_and_methods_generously() {
        let rules = [
            rule("/campaigns/*/send", &["POST"]),
            rule("/api-keys/**", &[]),
        ];
        let post = Method::POST;
        for (method, path, hit) in [
            (&post, "/campaigns/42/send", Some(0)),
            (&post, "/Campaigns/42/SEND", Some(0)),
            (&post, "/campaigns//42/send/", Some(0)),
            (&post, "/campaigns/42/send;jsessionid=1", Some(0)),
            (&post, "/campaigns/42%2Fsend", Some(0)),
            (&Method::GET, "/campaigns/42/send", None),
            (&post, "/campaigns/42", None),
            (&post, "/campaigns/42/send/now", None),
            (&Method::GET, "/api-keys", Some(1)),
            (&Method::DELETE, "/api-keys/7", Some(1)),
            (&Method::GET, "/api-keysx", None),
            // Format suffixes, trailing dots and spaces route to the same action.
            (&post, "/campaigns/42/send.json", Some(0)),
            (&post, "/campaigns/42/send.", Some(0)),
            (&post, "/campaigns/42/send%20", Some(0)),
            (&post, "/campaigns/42/send..;", Some(0)),
            (&post, "/campaigns/42/send%2Ejson", Some(0)),
            (&post, "/campaigns/42/send%3F", Some(0)),
            (&post, "/campaigns/42/send%23", Some(0)),
            (&post, "/campaigns/42/%C5%BFend", Some(0)),
            // The Kelvin sign, whose lower case is `k`.
            (&Method::GET, "/api-%E2%84%AAeys", Some(1)),
            (&post, "/campaigns/42/send%E2%80%8B", Some(0)),
            (&post, "/campaigns/42/send%C0%AF", Some(0)),
            (&post, "/campaigns/42/send%FF", Some(0)),
            (&post, "/campaigns/42/sender", None),
            (&post, "/campaigns/42/sendé", None),
            // Segments of nothing but blanks and dots, which servers that trim segments drop or
            // (two dots and more) climb by; a lone format suffix; blanks before a segment.
            (&post, "/campaigns/42/%20/send", Some(0)),
            (&post, "/campaigns/42/send/%20", Some(0)),
            (&post, "/campaigns/42/send/%20%20/", Some(0)),
            (&post, "/campaigns/42/send/...", Some(0)),
            (&post, "/campaigns/42/send/.json", Some(0)),
            (&post, "/campaigns/42/send/%C2%A0", Some(0)),
            (&post, "/campaigns/42/send/%E2%80%8B", Some(0)),
            (&post, "/campaigns/42/.%20/send", Some(0)),
            (&post, "/campaigns/42/x/..%20/send", Some(0)),
            (&post, "/campaigns/42/x/.../send", Some(0)),
            (&post, "/campaigns/42/%20send", Some(0)),
            (&post, "/campaigns/42/%09send", Some(0)),
            (&post, "/campaigns/42/x%20send", None),
            (&post, "/campaigns/42/send/x", None),
            // Dots with blanks between them climb too; `+` is a blank to consoles that read it
            // as a space; Java folds `İ` to `i`; NFKC makes fullwidth letters plain; invisible
            // characters inside a name are dropped; a PHP front controller routes what follows.
            (&post, "/campaigns/42/x/.%20./send", Some(0)),
            (&post, "/campaigns/42/x/.%C2%A0./send", Some(0)),
            (&post, "/campaigns/42/x/.%2520./send", Some(0)),
            (&post, "/campaigns/42/x%2F.%20.%2Fsend", Some(0)),
            (&post, "/campaigns/42/x/..+/send", Some(0)),
            (&post, "/campaigns/42/send/+", Some(0)),
            (&post, "/campaigns/42/+/send", Some(0)),
            (&post, "/campaigns/42/+send", Some(0)),
            (&Method::GET, "/ap%C4%B0-keys/x", Some(1)),
            (&Method::GET, "/AP%C4%B0-KEYS", Some(1)),
            (&post, "/campaigns/42/%EF%BD%93end", Some(0)),
            (&post, "/%EF%BD%83ampaigns/42/send", Some(0)),
            (&Method::GET, "/api%EF%BC%8Dkeys/x", Some(1)),
            (&post, "/campaigns/42/se%C2%ADnd", Some(0)),
            (&post, "/campaigns/42/se%E2%80%8Dnd", Some(0)),
            (&post, "/index.php/campaigns/42/send", Some(0)),
            (&post, "/INDEX.PHP/campaigns/42/send", Some(0)),
            (&post, "/app.php/x.php/campaigns/42/send", Some(0)),
            (&post, "/index.php%2fcampaigns/42/send", Some(0)),
            // Other names that begin with the literal are other actions.
            (&post, "/campaigns/42/send-test", None),
            (&post, "/campaigns/42/send_later", None),
            (&Method::GET, "/api-keys-help", None),
            (&Method::GET, "/api-keys_help/x", None),
            (&post, "/index.php", None),
        ] {
            let got = matching(&rules, method, path)
                .next()
                .map(|r| r.path.as_str());
            assert_eq!(got, hit.map(|i| rules[i].path.as_str()), "{method} {path}");
        }
    }

    /// A rule written with a format suffix names the route: consoles that route formats serve
    /// every spelling from one handler, so the rule guards them all, not the one it names.
    #[test]
    fn a_rule_with_a_format_suffix_guards_its_route() {
        let rules = [
            rule("/x/send.json", &["GET"]),
            rule("/lists/*/export.csv", &[]),
        ];
        let get = Method::GET;
        for (path, hit) in [
            ("/x/send.json", Some(0)),
            ("/x/send", Some(0)),
            ("/x/send.xml", Some(0)),
            ("/X/SEND", Some(0)),
            ("/x/send;.json", Some(0)),
            ("/x/send/", Some(0)),
            ("/x/sender", None),
            ("/x/send-later.json", None),
            ("/x/send.json/more", None),
            ("/lists/7/export", Some(1)),
            ("/lists/7/export.xlsx", Some(1)),
            ("/lists/7/exports", None),
        ] {
            let got = matching(&rules, &get, path).next().map(|r| r.path.as_str());
            assert_eq!(got, hit.map(|i| rules[i].path.as_str()), "{path}");
        }
    }

    #[test]
    fn every_matching_rule_applies_and_post_stands_for_overridden_methods() {
        let lax = StepUpRule {
            max_age: Duration::from_secs(3600),
            ..rule("/api-keys/**", &[])
        };
        let strict = StepUpRule {
            key: true,
            ..rule("/api-keys/*/reveal", &["DELETE"])
        };
        let rules = [lax, strict];
        let at = |age_s: i64| (Some(0), None, age_s * 1000);
        // 50 minutes after a code: the first rule is met, the second (a key) is not, also for
        // a POST (a `_method=DELETE` form).
        assert_eq!(
            unmet(&rules, &Method::DELETE, "/api-keys/9/reveal", at(3000)),
            Some(true)
        );
        assert_eq!(
            unmet(&rules, &Method::POST, "/api-keys/9/reveal", at(3000)),
            Some(true)
        );
        assert_eq!(
            unmet(&rules, &Method::GET, "/api-keys/9/reveal", at(3000)),
            None
        );
        assert_eq!(
            unmet(&rules, &Method::GET, "/api-keys/9/reveal", at(4000)),
            Some(false)
        );
        assert_eq!(unmet(&rules, &Method::GET, "/campaigns", at(99_999)), None);
    }

    /// A rule for GET guards HEAD too (the GET handler runs for it), and POST (which a
    /// `_method` field makes any method); not the other way round.
    #[test]
    fn a_rule_for_get_covers_head() {
        let rules = [rule("/reports/download", &["GET"])];
        let old = (Some(0), None, 99_999_000);
        assert_eq!(
            unmet(&rules, &Method::HEAD, "/reports/download", old),
            Some(false)
        );
        // In any letter case: consoles that upper-case the method take `head` for HEAD.
        for spelling in ["head", "Head", "hEAD"] {
            let m = Method::from_bytes(spelling.as_bytes()).unwrap();
            assert_eq!(unmet(&rules, &m, "/reports/download", old), Some(false));
        }
        let put = [rule("/w", &["DELETE"])];
        let post = Method::from_bytes(b"post").unwrap();
        assert_eq!(unmet(&put, &post, "/w", old), Some(false));
        // Nor can a POST dodge a rule for GET: `_method=GET` makes it one in Rails and Sinatra.
        let get = [rule("/reports/*/download", &["GET"])];
        assert_eq!(
            unmet(&get, &Method::POST, "/reports/1/download", old),
            Some(false)
        );
        assert_eq!(unmet(&get, &Method::PUT, "/reports/1/download", old), None);
        let head_only = [rule("/reports/download", &["HEAD"])];
        assert_eq!(
            unmet(&head_only, &Method::GET, "/reports/download", old),
            None
        );
    }

    /// A request whose method is not known meets every rule for its path, whatever methods
    /// the rule names; other paths' rules still do not apply.
    #[test]
    fn an_unknown_method_meets_every_rule_of_the_path() {
        let rules = [
            rule("/campaigns/*/send", &["POST"]),
            rule("/keys", &["DELETE"]),
        ];
        let old = (Some(0), None, 99_999_000);
        let any = unknown_method();
        assert_eq!(unmet(&rules, &any, "/campaigns/7/send", old), Some(false));
        assert_eq!(unmet(&rules, &any, "/keys", old), Some(false));
        assert_eq!(unmet(&rules, &any, "/campaigns/7", old), None);
        assert_eq!(unmet(&rules, &Method::GET, "/campaigns/7/send", old), None);
    }

    #[test]
    fn a_proof_counts_for_max_age_and_a_key_rule_wants_a_key() {
        let mut r = rule("/x", &[]);
        assert!(satisfied(&r, Some(1_000), None, 1_000 + 300_000));
        assert!(!satisfied(&r, Some(1_000), None, 1_000 + 300_001));
        // A sign-in by a remembered device's key has no second-factor proof to count.
        assert!(!satisfied(&r, None, None, 1_000));
        r.key = true;
        assert!(!satisfied(&r, Some(1_000), None, 1_000));
        assert!(satisfied(&r, Some(0), Some(1_000), 2_000));
        assert!(satisfied(&r, Some(1_000), Some(1_000), 2_000));
        // An app code after the key: the latest proof is a code, as `acr` tells the console.
        assert!(!satisfied(&r, Some(1_500), Some(1_000), 2_000));
    }

    #[test]
    fn bad_rules_are_refused() {
        for bad in [
            rule("campaigns", &[]),
            rule("/a/**/b", &[]),
            rule("/campaigns/send*", &[]),
            rule("/lists/*.csv", &["GET"]),
            rule("/a/***", &[]),
            rule("/a?x=1", &[]),
            rule("/a", &["PO ST"]),
            rule("/a", &["POTS"]),
            rule("/%61pi-keys/**", &[]),
            rule("/a/../b", &[]),
            rule("/_portcullis/login", &["POST"]),
            rule("/_Portcullis/**", &[]),
            rule("/_portcullis.json", &["POST"]),
            StepUpRule {
                max_age: Duration::from_secs(1),
                ..rule("/a", &[])
            },
        ] {
            assert!(check_rule(&bad).is_err(), "{bad:?}");
        }
        assert!(check_rule(&rule("/campaigns/*/send", &["post"])).is_ok());
    }
}
