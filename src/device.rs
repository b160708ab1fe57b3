//! Devices: the browsers a user completed a sign-in from, recognised again by a long-lived,
//! HttpOnly device cookie (256 random bits; only its SHA-256 is stored).

/// Device cookie over https: `__Host-` keeps it to this origin, path `/`, Secure.
pub const COOKIE_HTTPS: &str = "__Host-portcullis-device";
/// Device cookie on a plain-http loopback demo.
pub const COOKIE_HTTP: &str = "portcullis-device";
/// Lifetime of the device cookie (browsers cap cookies at 400 days).
pub const COOKIE_MAX_AGE_SECS: u64 = 400 * 24 * 3600;
/// Length of a device cookie value: 32 random bytes, base64url.
pub const TOKEN_LEN: usize = 43;

/// A short human name for a user agent, e.g. "Firefox on Windows", for device lists and
/// notifications. Unknown agents are "Unknown browser on unknown system"; the full user agent
/// is kept beside it.
pub fn friendly_name(user_agent: &str) -> String {
    // Order matters: Edge and Opera also say Chrome, Chrome also says Safari.
    const BROWSERS: [(&str, &str); 7] = [
        ("Edg/", "Edge"),
        ("OPR/", "Opera"),
        ("Firefox/", "Firefox"),
        ("FxiOS/", "Firefox"),
        ("CriOS/", "Chrome"),
        ("Chrome/", "Chrome"),
        ("Safari/", "Safari"),
    ];
    const SYSTEMS: [(&str, &str); 7] = [
        ("Android", "Android"),
        ("iPhone", "iPhone"),
        ("iPad", "iPad"),
        ("Windows", "Windows"),
        ("Mac OS X", "macOS"),
        ("CrOS", "ChromeOS"),
        ("Linux", "Linux"),
    ];
    let browser = BROWSERS
        .iter()
        .find(|(m, _)| user_agent.contains(m))
        .map_or("Unknown browser", |(_, n)| n);
    let system = SYSTEMS
        .iter()
        .find(|(m, _)| user_agent.contains(m))
        .map_or("unknown system", |(_, n)| n);
    format!("{browser} on {system}")
}

/// Whether two user agents are the same kind of browser: the same browser on the same system
/// (another version of it too: browsers update every few weeks), or, where either is not one
/// [`friendly_name`] knows, the very same user agent.
pub fn same_kind_of_browser(a: &str, b: &str) -> bool {
    let name = friendly_name(a);
    if name.contains("nknown") {
        return a == b;
    }
    name == friendly_name(b)
}

/// Whether a cookie value can be a device token at all (cheap check before any lookup).
pub fn plausible_token(v: &str) -> bool {
    v.len() == TOKEN_LEN
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// After the owner replaced a second factor (the app, the recovery codes) or the password: a
/// browser remembered in place of a second factor ("remember this browser") stops standing in
/// for it, but for the device `keep` the owner made the change from (none: every one). A
/// thief's remembered browser must not outlive the owner's clean-up. (The device keeps its key:
/// it is still a known device.)
pub async fn forget_remembered(
    durable: &dyn crate::store::DurableStore,
    user_id: &str,
    keep: Option<&str>,
) -> crate::store::StoreResult<()> {
    for d in durable.list_devices(user_id).await? {
        if d.remembered_until.is_some() && keep != Some(d.id.as_str()) {
            durable
                .remember_device(&d.id, d.remember_key.as_deref(), None)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_common_browsers() {
        let cases = [
            ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36", "Chrome on Windows"),
            ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36 Edg/156.0.0.0", "Edge on Windows"),
            ("Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0", "Firefox on Linux"),
            ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.0 Safari/605.1.15", "Safari on macOS"),
            ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/156.0 Mobile/15E148 Safari/604.1", "Chrome on iPhone"),
            ("Mozilla/5.0 (Linux; Android 15) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Mobile Safari/537.36", "Chrome on Android"),
            ("curl/8.5.0", "Unknown browser on unknown system"),
            ("", "Unknown browser on unknown system"),
        ];
        for (ua, want) in cases {
            assert_eq!(friendly_name(ua), want, "{ua}");
        }
    }

    #[test]
    fn the_same_kind_of_browser_is_its_name_or_else_its_very_user_agent() {
        let chrome = |v: &str| {
            format!("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v} Safari/537.36")
        };
        assert!(same_kind_of_browser(
            &chrome("156.0.0.0"),
            &chrome("157.0.0.0")
        ));
        assert!(!same_kind_of_browser(&chrome("156.0.0.0"), "curl/8.5.0"));
        assert!(!same_kind_of_browser("curl/8.5.0", &chrome("156.0.0.0")));
        assert!(!same_kind_of_browser("", "curl/8.5.0"));
        assert!(!same_kind_of_browser("Chrome/156.0", "Chrome/157.0"));
        assert!(same_kind_of_browser("curl/8.5.0", "curl/8.5.0"));
    }

    #[test]
    fn token_shape() {
        assert!(plausible_token(&crate::crypto::random_token(32)));
        assert!(!plausible_token("short"));
        assert!(!plausible_token(&"a".repeat(42)));
        assert!(!plausible_token(&format!("{}=", "a".repeat(42))));
    }
}
