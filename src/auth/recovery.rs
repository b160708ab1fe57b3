//! Recovery codes: ten single-use codes shown once at enrolment, for when the authenticator is
//! lost.
//!
//! A code is 10 characters of Crockford's base32 alphabet (`0-9`, `a-z` without `i l o u`),
//! shown as `k7d2m-9xq4p`: 50 bits from the OS random generator. Crockford's alphabet is the
//! 32-symbol set that forgives misreading: input is case-insensitive, `o` is read as `0` and `i`
//! or `l` as `1`, and spaces and dashes are ignored. This module only makes and canonicalises
//! codes; the caller stores `MasterKey::recovery_code_hash(normalised)` and consumes a code by
//! deleting its hash (50 bits are too few for a plain hash, hence the keyed one).

use rand::RngCore;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Codes per set.
pub const COUNT: usize = 10;
/// Significant characters per code.
pub const CODE_LEN: usize = 10;
/// Crockford's base32 alphabet in lower case; index = 5-bit value.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A fresh set of [`COUNT`] distinct codes, formatted `xxxxx-xxxxx` for display.
pub fn generate() -> Vec<Secret<String>> {
    let mut codes: Vec<Secret<String>> = Vec::with_capacity(COUNT);
    while codes.len() < COUNT {
        let code = one_code();
        // Duplicates are astronomically unlikely (~10⁻¹⁴), but two equal codes would be one
        // code counted twice, so make sure.
        if !codes.iter().any(|c| c.expose() == code.expose()) {
            codes.push(code);
        }
    }
    codes
}

fn one_code() -> Secret<String> {
    let mut raw = Zeroizing::new([0u8; 8]);
    rand::rngs::OsRng.fill_bytes(raw.as_mut());
    // 64 random bits; the 50 low ones become 10 symbols of 5 bits, each uniformly distributed.
    let bits = Zeroizing::new(u64::from_le_bytes(*raw));
    let mut code = String::with_capacity(CODE_LEN + 1);
    for i in 0..CODE_LEN {
        if i == CODE_LEN / 2 {
            code.push('-');
        }
        let index = (*bits >> (5 * i)) & 0x1f;
        code.push(char::from(ALPHABET[index as usize]));
    }
    Secret::new(code)
}

/// The canonical form to hash: 10 lower-case alphabet characters, no separators. Accepts any
/// case, whitespace and dashes anywhere, and reads `o` as `0`, `i`/`l` as `1`. Anything else,
/// or a different number of characters, gives `None`.
pub fn normalise(input: &str) -> Option<String> {
    let mut out = String::with_capacity(CODE_LEN);
    for c in input.chars() {
        if c.is_whitespace() || c == '-' {
            continue;
        }
        let c = match c.to_ascii_lowercase() {
            'o' => '0',
            'i' | 'l' => '1',
            other => other,
        };
        if !c.is_ascii() || !ALPHABET.contains(&(c as u8)) || out.len() == CODE_LEN {
            return None;
        }
        out.push(c);
    }
    (out.len() == CODE_LEN).then_some(out)
}

/// Whether the input is shaped like a recovery code (so it should be checked as one), rather
/// than like a 6-digit TOTP code. Same rule as [`normalise`]; the two shapes cannot overlap.
pub fn looks_like_recovery_code(input: &str) -> bool {
    normalise(input).is_some()
}

// Tests should stop at the first surprise; the crate-level deny is for production code.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generates_ten_distinct_well_formed_codes() {
        let codes = generate();
        assert_eq!(codes.len(), COUNT);
        let distinct: HashSet<&String> = codes.iter().map(|c| c.expose()).collect();
        assert_eq!(distinct.len(), COUNT);
        for code in &codes {
            let c = code.expose();
            assert_eq!(c.len(), 11, "{c}");
            assert_eq!(&c[5..6], "-");
            assert!(c
                .chars()
                .filter(|&ch| ch != '-')
                .all(|ch| ALPHABET.contains(&(ch as u8))));
            assert_eq!(normalise(c).as_deref(), Some(c.replace('-', "").as_str()));
            assert!(looks_like_recovery_code(c));
            assert_eq!(format!("{code:?}"), crate::secret::REDACTED);
        }
        // Fresh sets differ from each other.
        let again: HashSet<String> = generate().iter().map(|c| c.expose().clone()).collect();
        assert!(distinct.iter().all(|c| !again.contains(*c)));
    }

    #[test]
    fn symbols_are_roughly_uniform() {
        let mut counts = [0usize; 32];
        for _ in 0..200 {
            for code in generate() {
                for ch in code.expose().bytes().filter(|&b| b != b'-') {
                    if let Some(i) = ALPHABET.iter().position(|&a| a == ch) {
                        counts[i] += 1;
                    }
                }
            }
        }
        // 20,000 symbols → 625 expected per symbol; a missing or doubled symbol is far outside.
        assert!(
            counts.iter().all(|&n| (450..=800).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn normalise_is_forgiving_but_exact() {
        assert_eq!(normalise("K7D2M 9XQ4P"), normalise("k7d2m-9xq4p"));
        assert_eq!(normalise("k7d2m-9xq4p").as_deref(), Some("k7d2m9xq4p"));
        assert_eq!(normalise("  k7d2m9xq4p \n").as_deref(), Some("k7d2m9xq4p"));
        assert_eq!(normalise("O0IL1-abcde").as_deref(), Some("00111abcde"));
        for bad in [
            "",
            "k7d2m-9xq4",
            "k7d2m-9xq4pp",
            "k7d2m-9xq4u",
            "k7d2m_9xq4p",
            "k7d2m-9xq4é",
            "123456",
            "k7d2m-9xq4p-k7d2m-9xq4p",
        ] {
            assert_eq!(normalise(bad), None, "{bad:?}");
            assert!(!looks_like_recovery_code(bad), "{bad:?}");
        }
        assert!(looks_like_recovery_code("K7D2M 9XQ4P"));
        assert!(!looks_like_recovery_code("123 456"));
    }
}
