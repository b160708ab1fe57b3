//! Time-based one-time passwords (RFC 6238) as every authenticator app understands them: HMAC-SHA1,
//! 6 digits, 30-second steps, with one step of clock drift allowed either way.
//!
//! [`matching_step`] says *which* step a code belongs to (totp-rs' `check` only says yes or no),
//! so the caller can store the last accepted step per user and refuse any code at or before it:
//! that is what makes a code single-use. Time is a parameter, never read here.
//!
//! The shared secret only ever lives in a [`Secret`] or in a short-lived `totp_rs::TOTP` that is
//! wiped on drop (totp-rs' `zeroize` feature); `TOTP`'s derived `Debug` prints the secret, so no
//! `TOTP` is ever stored, logged or formatted.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use qrcode::render::svg;
use qrcode::{EcLevel, QrCode};
use rand::RngCore;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use totp_rs::{Algorithm, TOTP};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Digits per code.
pub const DIGITS: usize = 6;
/// Seconds per time step.
pub const STEP: u64 = 30;
/// Bytes of a new secret: 160 bits, the size RFC 4226 recommends.
pub const SECRET_LEN: usize = 20;
/// Shortest secret accepted when checking codes (RFC 4226's minimum of 128 bits); a shorter one
/// means corrupt data, and checking must fail closed.
const MIN_SECRET_LEN: usize = 16;

/// Characters left as they are in otpauth labels and parameters: RFC 3986 unreserved.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A fresh random secret from the OS.
pub fn generate_secret() -> Secret<Vec<u8>> {
    let mut bytes = vec![0u8; SECRET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    Secret::new(bytes)
}

/// RFC 4648 base32 without padding, the form authenticator apps accept for manual entry.
pub fn secret_base32(secret: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(secret.len().div_ceil(5) * 8);
    for chunk in secret.chunks(5) {
        let mut block = Zeroizing::new([0u8; 5]);
        block[..chunk.len()].copy_from_slice(chunk);
        let bits = Zeroizing::new(block.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)));
        // Each input byte contributes 8 bits; emit only the characters those bits reach.
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..chars {
            let index = (*bits >> (35 - 5 * i)) & 0x1f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

/// The `otpauth://` URI for enrolment (Google Authenticator key-URI format), with every
/// parameter spelled out so no app has to guess defaults. Issuer and account are
/// percent-encoded; a `:` inside them is encoded too, so it cannot split the label.
pub fn otpauth_uri(secret: &[u8], issuer: &str, account: &str) -> String {
    let issuer = utf8_percent_encode(issuer, URI_COMPONENT).to_string();
    let account = utf8_percent_encode(account, URI_COMPONENT);
    format!(
        "otpauth://totp/{issuer}:{account}?secret={}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={STEP}",
        secret_base32(secret)
    )
}

/// The URI as an inline SVG QR code: black modules on white with a quiet zone, at least
/// 220×220 px, no XML prologue and no external references, so it can be placed in a page
/// directly under a strict CSP. If the URI is too long for any QR code (thousands of bytes),
/// returns an SVG saying so; the manual-entry key still works.
pub fn qr_svg(uri: &str) -> String {
    match QrCode::with_error_correction_level(uri.as_bytes(), EcLevel::M) {
        Ok(code) => {
            let image = code
                .render::<svg::Color<'_>>()
                .dark_color(svg::Color("#000000"))
                .light_color(svg::Color("#ffffff"))
                .quiet_zone(true)
                .min_dimensions(220, 220)
                .build();
            // The renderer starts with an XML declaration, which is not allowed inline in HTML.
            match image.find("<svg") {
                Some(start) => image[start..].to_string(),
                None => image,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, uri_len = uri.len(), "otpauth URI does not fit in a QR code");
            concat!(
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="220" height="220" viewBox="0 0 220 220">"#,
                r##"<rect width="220" height="220" fill="#ffffff"/>"##,
                r#"<text x="110" y="115" font-size="12" text-anchor="middle">QR code unavailable</text>"#,
                "</svg>"
            )
            .to_string()
        }
    }
}

/// The time step a code belongs to, among `now`'s step and one either side, or `None`.
///
/// `code` must be exactly 6 ASCII digits once whitespace is removed ("123 456" is fine);
/// anything else, a negative `now` or a secret shorter than 128 bits gives `None`. All
/// candidates are computed and compared in constant time, whichever matches; if two steps match
/// (a one-in-a-million coincidence) the later one is returned, which is the safer one to record
/// as used.
pub fn matching_step(secret: &[u8], code: &str, now: i64) -> Option<u64> {
    let typed = normalise_code(code)?;
    if secret.len() < MIN_SECRET_LEN {
        return None;
    }
    let current = u64::try_from(now).ok()? / STEP;
    let totp = totp(secret);
    let mut found = Choice::from(0);
    let mut step = 0u64;
    for candidate in current.saturating_sub(1)..=current + 1 {
        let expected = Zeroizing::new(totp.generate(candidate * STEP));
        let hit = expected.as_bytes().ct_eq(typed.as_bytes());
        step.conditional_assign(&candidate, hit);
        found |= hit;
    }
    bool::from(found).then_some(step)
}

/// The code for `unix_time` (negative times count as 0); for tests and the demo.
pub fn code_at(secret: &[u8], unix_time: i64) -> String {
    let time = u64::try_from(unix_time).unwrap_or(0);
    totp(secret).generate(time)
}

/// A throwaway `TOTP` for `secret`; its copy of the secret is wiped when it is dropped. Skew is
/// 0 because the window is applied by [`matching_step`] itself.
fn totp(secret: &[u8]) -> TOTP {
    TOTP::new_unchecked(
        Algorithm::SHA1,
        DIGITS,
        0,
        STEP,
        secret.to_vec(),
        None,
        String::new(),
    )
}

/// The code without whitespace, if it is exactly [`DIGITS`] ASCII digits.
fn normalise_code(code: &str) -> Option<Zeroizing<String>> {
    let mut out = Zeroizing::new(String::with_capacity(DIGITS));
    for c in code.chars().filter(|c| !c.is_whitespace()) {
        if !c.is_ascii_digit() || out.len() == DIGITS {
            return None;
        }
        out.push(c);
    }
    (out.len() == DIGITS).then_some(out)
}

// Tests should stop at the first surprise; the crate-level deny is for production code.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// The RFC 6238 appendix B SHA-1 key.
    const RFC_KEY: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_sha1_vectors() {
        // The RFC lists 8-digit codes; 6-digit codes are their last six digits.
        let vectors = [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ];
        for (t, eight) in vectors {
            assert_eq!(code_at(RFC_KEY, t), eight[2..], "t={t}");
            assert_eq!(
                matching_step(RFC_KEY, &eight[2..], t),
                Some(t as u64 / STEP)
            );
        }
        assert_eq!(code_at(RFC_KEY, 59), "287082");
        assert_eq!(code_at(RFC_KEY, 1_111_111_109), "081804");
    }

    #[test]
    fn accepts_one_step_of_drift_and_no_more() {
        let secret = generate_secret();
        let s = secret.expose();
        let now = 1_700_000_015;
        let step = now as u64 / STEP;
        for (offset, expected) in [(-1, Some(step - 1)), (0, Some(step)), (1, Some(step + 1))] {
            let code = code_at(s, now + offset * STEP as i64);
            assert_eq!(matching_step(s, &code, now), expected, "offset {offset}");
        }
        for offset in [-2i64, 2, -10, 10] {
            let code = code_at(s, now + offset * STEP as i64);
            // A far code can coincide with a near one by chance; only assert when it does not.
            let near = (-1..=1).any(|o| code_at(s, now + o * STEP as i64) == code);
            if !near {
                assert_eq!(matching_step(s, &code, now), None, "offset {offset}");
            }
        }
    }

    #[test]
    fn refuses_malformed_codes_and_bad_inputs() {
        let t = 59;
        assert_eq!(matching_step(RFC_KEY, "287 082", t), Some(1));
        assert_eq!(matching_step(RFC_KEY, " 287082\t", t), Some(1));
        for bad in [
            "28708",
            "2870820",
            "28708a",
            "abcdef",
            "",
            "287-082",
            "２８７０８２",
            "+87082",
        ] {
            assert_eq!(matching_step(RFC_KEY, bad, t), None, "{bad:?}");
        }
        assert_eq!(matching_step(RFC_KEY, "287082", -1), None);
        assert_eq!(
            matching_step(&RFC_KEY[..15], &code_at(&RFC_KEY[..15], t), t),
            None
        );
        // At the epoch there is no previous step; the first step still works.
        assert_eq!(matching_step(RFC_KEY, &code_at(RFC_KEY, 0), 0), Some(0));
    }

    #[test]
    fn secrets_and_encodings() {
        let a = generate_secret();
        assert_eq!(a.expose().len(), SECRET_LEN);
        assert_ne!(a.expose(), generate_secret().expose());
        assert_eq!(format!("{a:?}"), crate::secret::REDACTED);
        // RFC 4648 section 10 vectors, without padding.
        for (raw, b32) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(secret_base32(raw.as_bytes()), b32);
        }
        assert_eq!(secret_base32(RFC_KEY), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
    }

    #[test]
    fn otpauth_uri_spells_out_everything() {
        let uri = otpauth_uri(RFC_KEY, "Acme Mail", "alice@example.com");
        assert_eq!(
            uri,
            "otpauth://totp/Acme%20Mail:alice%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=Acme%20Mail&algorithm=SHA1&digits=6&period=30"
        );
        let odd = otpauth_uri(RFC_KEY, "A:B&C", "x:y?z");
        assert!(
            odd.starts_with("otpauth://totp/A%3AB%26C:x%3Ay%3Fz?secret="),
            "{odd}"
        );
        // The URI round-trips through totp-rs' own parser to the same secret and settings.
        let parsed = TOTP::from_url(&uri).unwrap();
        assert_eq!(parsed.generate(59), "287082");
        assert_eq!(parsed.account_name, "alice@example.com");
        assert_eq!(parsed.issuer.as_deref(), Some("Acme Mail"));
    }

    #[test]
    fn qr_svg_is_self_contained() {
        let svg = qr_svg(&otpauth_uri(RFC_KEY, "Acme Mail", "alice@example.com"));
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg:.80}"
        );
        assert!(svg.ends_with("</svg>"));
        assert!(svg.contains("fill=\"#000000\"") && svg.contains("fill=\"#ffffff\""));
        assert!(!svg.contains("href") && !svg.contains("<?xml") && !svg.contains("<script"));
        let width: u32 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|w| w.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap();
        assert!(width >= 220, "width {width}");
        let huge = qr_svg(&"x".repeat(5000));
        assert!(huge.starts_with("<svg") && huge.contains("unavailable"));
    }
}
