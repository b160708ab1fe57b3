//! The 100,000 most common passwords, so that a new password can be refused when it is one of the
//! first guesses of any credential-stuffing or spraying tool.
//!
//! The list is the top 100,000 of the OWASP SecLists "10 million password list" (CC BY-SA 3.0,
//! see `src/auth/data/README.md`). It is embedded gzip-compressed (~370 KB) and decompressed into
//! a set on first use, which takes a few tens of milliseconds once per process; it is only
//! consulted when a password is set, never on the request path or at sign-in.

use std::collections::HashSet;
use std::io::Read;
use std::sync::OnceLock;

/// The list as shipped: gzip of newline-separated passwords, most common first.
static COMPRESSED: &[u8] = include_bytes!("data/common-passwords-100k.txt.gz");

/// Lower-cased entries, built on first use. Immutable once built, so sharing it is harmless.
static SET: OnceLock<HashSet<String>> = OnceLock::new();

/// Whether `password` is on the list, ignoring case ("PassWord" counts as "password").
pub fn is_common(password: &str) -> bool {
    let lower = zeroize::Zeroizing::new(password.to_lowercase());
    set().contains(lower.as_str())
}

fn set() -> &'static HashSet<String> {
    SET.get_or_init(|| match decompress() {
        Ok(text) => lines(&text).map(str::to_lowercase).collect(),
        Err(e) => {
            // The data is compiled in and checked by the tests below, so this means a broken
            // build. Stay available (passwords can still be set) but say so loudly.
            tracing::error!(error = %e, "embedded common-password list is unreadable; check disabled");
            HashSet::new()
        }
    })
}

fn decompress() -> std::io::Result<String> {
    let mut text = String::with_capacity(800 * 1024);
    flate2::read::GzDecoder::new(COMPRESSED).read_to_string(&mut text)?;
    Ok(text)
}

/// Non-empty lines, tolerating CRLF line ends.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty())
}

// Tests should stop at the first surprise; the crate-level deny is for production code.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn list_is_complete_and_loads() {
        let text = decompress().unwrap();
        let raw: Vec<&str> = lines(&text).collect();
        assert_eq!(raw.len(), 100_000);
        let distinct: HashSet<&str> = raw.iter().copied().collect();
        assert!(distinct.len() >= 99_000, "{} distinct", distinct.len());
        // Folding case merges variants such as "Password"/"password"; ~96.5k remain.
        assert!(set().len() >= 96_000, "{} case-folded", set().len());
        assert_eq!(raw[0], "123456");
    }

    #[test]
    fn finds_common_passwords_ignoring_case() {
        for pw in [
            "123456",
            "password",
            "PASSWORD",
            "Password123",
            "iloveyou1",
            "qwerty",
        ] {
            assert!(is_common(pw), "{pw}");
        }
        for pw in [
            "",
            "correct horse battery staple",
            "x9#Lq!v2Zr@8mW",
            "ünïcödé-pässwörd",
        ] {
            assert!(!is_common(pw), "{pw}");
        }
    }
}
