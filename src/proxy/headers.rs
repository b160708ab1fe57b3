//! Header hygiene on both sides of the proxy: hop-by-hop removal, stripping of client-supplied
//! identity headers, the gateway's own `X-Forwarded-*`, and keeping the gateway's cookies out of
//! the upstream's reach in both directions.
//!
//! Header *values* are never logged here: they may hold cookies, tokens or credentials.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Forwarding;

/// `X-Forwarded-For`, `-Proto` and `-Host` are not in `http`'s list of well-known names.
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Every header in the gateway's namespace is the gateway's to set.
const IDENTITY_DENY_PREFIX: &str = "x-portcullis-";

/// Headers the gateway sets or frames messages with. Their canonical spelling is replaced or
/// checked, but an underscore (or other punctuation) spelling (`X_Forwarded_For`,
/// `Content_Length`, `X-Request.Id`) would slip past and alias the real one in CGI-style
/// backends, so such spellings are always dropped.
const PUNCTUATION_ALIASED: [&str; 6] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "content-length",
];

/// The bytes of a header name a CGI-style backend reads as `-` besides `-` itself: one table
/// look-up per byte, for every header of every request.
static PUNCTUATION: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c != b'-' && !c.is_ascii_alphanumeric();
        b += 1;
    }
    table
};

/// Removes hop-by-hop headers and every header named in `Connection`.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names present to find out, nothing
    // collected.
    if !headers.keys().any(|k| is_hop_by_hop(k.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        // The request id is the gateway's own (set before this runs): no client takes it away.
        .filter(|name| name.as_str() != "x-request-id")
        .collect();
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k.as_str()))
        .cloned()
        .collect();
    for name in named.iter().chain(&present) {
        headers.remove(name);
    }
}

/// Whether `name` (lower case, as a `HeaderName` is) is a hop-by-hop header (RFC 9110 §7.6.1,
/// plus the historic `Keep-Alive` and `Proxy-Connection`). Such headers describe one connection,
/// so forwarding them would let a client steer the gateway's connection to the upstream (e.g.
/// `Upgrade: h2c` smuggling) or vice versa. A `match`, which compares by length first: this runs
/// for every header of every message in both directions.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Whether a message declared chunked (or other) transfer coding; then any `Content-Length`
/// alongside it is meaningless (RFC 9112 §6.3) and must not survive to the next hop, where it
/// could disagree with the framing hyper chooses.
pub(crate) fn has_transfer_encoding(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
}

/// The first transfer coding besides `chunked` a request declares (`gzip` of `gzip, chunked`):
/// the HTTP parser takes the chunks off and nothing would apply the other coding, so the body
/// would reach the console as if it had none.
pub(crate) fn other_transfer_coding(headers: &HeaderMap) -> Option<String> {
    first_token_but(headers, header::TRANSFER_ENCODING, "chunked")
}

/// The first item of the comma-separated lists in the `name` headers that is not `allowed`
/// (any letter case), shortened for a log line; a value that is not text counts as one.
pub(crate) fn first_token_but(
    headers: &HeaderMap,
    name: header::HeaderName,
    allowed: &str,
) -> Option<String> {
    headers.get_all(name).iter().find_map(|v| {
        let Ok(text) = v.to_str() else {
            return Some("(unreadable)".to_string());
        };
        text.split(',')
            .map(str::trim)
            .find(|t| !t.is_empty() && !t.eq_ignore_ascii_case(allowed))
            .map(|t| t.chars().take(64).collect())
    })
}

/// Removes headers a client must never supply: [`is_identity_header`], the `x-portcullis-`
/// namespace, `extra` (the caller's list) and the names the gateway is about to add, all compared
/// as CGI-style backends see names (lower case, `_` and other punctuation read as `-`); plus
/// such spellings of headers the gateway sets.
pub(crate) fn strip_identity(
    headers: &mut HeaderMap,
    extra: &[String],
    added: &[(HeaderName, HeaderValue)],
) {
    let doomed = |name: &HeaderName| {
        let raw = name.as_str();
        // A `HeaderName` is lower case already: only punctuation other than `-` (`_`, `.`, `~`,
        // …, which CGI-style servers turn into the same `_` as `-`) needs reading as `-`.
        let punctuated = raw.bytes().any(|b| PUNCTUATION[usize::from(b)]);
        let norm = match punctuated {
            true => Cow::Owned(
                raw.bytes()
                    .map(|b| char::from(normalised_byte(b)))
                    .collect(),
            ),
            false => Cow::Borrowed(raw),
        };
        let norm: &str = &norm;
        is_identity_header(norm)
            || norm.starts_with(IDENTITY_DENY_PREFIX)
            || extra.iter().any(|e| same_normalised(e, norm))
            || added.iter().any(|(n, _)| same_normalised(n.as_str(), norm))
            || (punctuated && (PUNCTUATION_ALIASED.contains(&norm) || is_hop_by_hop(norm)))
    };
    // A client rarely sends any of them: one pass to find out, nothing collected.
    if !headers.keys().any(doomed) {
        return;
    }
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// Whether `name` (as a `HeaderName` is: lower case), spelled with other punctuation than `-`
/// (`x_forwarded_user`, `remote.user`), is a header a client must never supply: the gateway's
/// identity header `token` (lower case) or a name in its `x-portcullis-` namespace, an
/// [`is_identity_header`] of another gateway or proxy, or a client address or host the asking
/// proxy sets. A CGI-style console reads such a spelling as the header itself, but a proxy
/// that replaces or blanks headers by name leaves it in place (nginx drops names with `_` by
/// default; Caddy and Traefik pass them on). The names themselves are replaced or blanked by the
/// proxies' documented configurations.
pub(crate) fn is_identity_alias(name: &str, token: &str) -> bool {
    if !name.bytes().any(|b| PUNCTUATION[usize::from(b)]) {
        return false;
    }
    let norm: String = name
        .bytes()
        .map(|b| char::from(normalised_byte(b)))
        .collect();
    same_normalised(name, token)
        || norm.starts_with(IDENTITY_DENY_PREFIX)
        || is_identity_header(&norm)
        || matches!(
            norm.as_str(),
            "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host"
        )
}

/// Whether `name` (as a `HeaderName` is: lower case) asks, in any spelling a console may read,
/// for another method than the request's.
pub(crate) fn is_method_override(name: &str) -> bool {
    [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "http-method-override",
        "x-method",
        "x-original-http-method",
        "-method",
        "method-override",
        "x-override-method",
        "x-request-method",
    ]
    .iter()
    .any(|m| same_normalised(name, m))
}

/// One byte of a header name as CGI-style backends read it: lower case, and any punctuation
/// (`_`, `.`, `~`, …) as `-` (they all become `_` in `HTTP_…` variables).
fn normalised_byte(b: u8) -> u8 {
    if b.is_ascii_alphanumeric() {
        b.to_ascii_lowercase()
    } else {
        b'-'
    }
}

/// Whether `name`, read byte by byte as [`normalised_byte`] reads it, is `normalised`; without
/// building the normalised form.
fn same_normalised(name: &str, normalised: &str) -> bool {
    name.len() == normalised.len()
        && name
            .bytes()
            .zip(normalised.bytes())
            .all(|(a, b)| normalised_byte(a) == b)
}

/// Whether `name` (normalised) is a header through which a client could claim an identity, a
/// different request target or a different client address. The console must only ever learn
/// these from the gateway. (A `match` compares by length first: this runs for every header of
/// every request.)
pub(crate) fn is_identity_header(name: &str) -> bool {
    // Every `X-Forwarded-*` but the three the gateway writes itself (`set_forwarded`): the
    // console learns the method, port, scheme, path or server from the gateway's request, and
    // an identity from the token, never from the client.
    if let Some(what) = name.strip_prefix("x-forwarded-") {
        return !matches!(what, "for" | "proto" | "host");
    }
    has_identity_prefix(name)
        || matches!(
            name,
            "x-auth-request-user"
            | "x-auth-request-email"
            | "x-remote-user"
            | "remote-user"
            | "x-user"
            | "x-email"
            | "x-original-url"
            | "x-rewrite-url"
            | "x-original-uri"
            | "x-original-method"
            | "x-original-host"
            | "forwarded"
            | "x-real-ip"
            // Identities other gateways and identity-aware proxies hand to their backends:
            | "x-auth-user"
            | "x-authenticated-user"
            | "x-authenticated-userid"
            | "x-authenticated-email"
            | "x-webauth-user"
            | "x-userinfo"
            | "x-id-token"
            | "x-access-token"
            | "x-user-id"
            | "x-user-email"
            | "x-amzn-oidc-identity"
            | "x-amzn-oidc-data"
            | "x-amzn-oidc-accesstoken"
            | "x-ms-client-principal"
            | "x-ms-client-principal-name"
            | "x-ms-client-principal-id"
            | "x-ms-client-principal-idp"
            | "x-ms-token-aad-id-token"
            | "x-goog-authenticated-user-email"
            | "x-goog-authenticated-user-id"
            | "x-goog-iap-jwt-assertion"
            | "cf-access-authenticated-user-email"
            | "cf-access-jwt-assertion"
            // Client addresses as CDNs and load balancers pass them:
            | "cf-connecting-ip"
            | "true-client-ip"
            | "x-client-ip"
            | "x-cluster-client-ip"
            | "fastly-client-ip"
            // Another method than the request's, which frameworks take in place of it:
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "http-method-override"
            | "x-method"
            | "x-original-http-method"
            | "-method"
            | "method-override"
            | "x-override-method"
            | "x-request-method"
            // Another path or base path than the request's, which middleware takes in place of
            // it (a prefix stripped from the path the gateway checked), and Next.js's marker of
            // its own subrequests, which skips its middleware (CVE-2025-29927):
            | "x-script-name"
            | "script-name"
            | "request-uri"
            | "x-override-url"
            | "x-middleware-subrequest"
            | "x-proxy-user"
            | "x-proxy-remote-user"
            // Generic names consoles and frameworks read a user, tenant or role from:
            | "x-principal"
            | "x-username"
            | "x-identity"
            | "x-roles"
            | "x-groups"
            | "x-subject"
            | "x-auth-subject"
            | "x-sub"
            | "x-uid"
            | "x-userid"
            // Acting in another's name:
            | "x-impersonate"
            | "x-on-behalf-of"
            | "x-acting-user"
            // The scheme or host a framework believes it was reached by:
            | "x-url-scheme"
            | "x-host"
            | "x-forwarded"
        )
}

/// Whole families of identity headers, by the prefix their proxy gives them (oauth2-proxy's
/// `X-Auth-Request-Groups`, Pomerium's `X-Pomerium-Claim-Email`, Tailscale's
/// `Tailscale-User-Login`, Authelia's `Remote-Email`, Authentik's `X-Authentik-Username`,
/// mod_auth_openidc's `OIDC-Claim-Email`, API gateways' consumer headers, TLS client
/// certificates as terminating proxies pass them, impersonation…). Sorted by first byte, so
/// most names are passed on after one comparison.
fn has_identity_prefix(name: &str) -> bool {
    let any = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
    match name.as_bytes() {
        // `x-…` by its third byte, so a header is compared with a few prefixes at most.
        [b'x', b'-', third, ..] => match third {
            b'a' => any(&[
                "x-auth-request-",
                "x-authenticated-",
                "x-authentik-",
                "x-auth-email",
                "x-amzn-oidc-",
                "x-apigateway-api-userinfo",
                "x-arr-clientcert",
                "x-arr-ssl",
                "x-azure-clientip",
                "x-azure-socketip",
                "x-appengine-user-",
                // Claims of a proof the console might read: only the token carries them.
                "x-amr",
                "x-acr",
                "x-auth-time",
                "x-admin",
            ]),
            b'c' => any(&[
                "x-consumer-",
                "x-credential-",
                "x-client-cert",
                "x-client-verify",
                "x-client-dn",
                "x-client-cn",
                "x-client-scheme",
                "x-custom-ip-",
            ]),
            b'e' => any(&[
                "x-envoy-original-",
                "x-envoy-external-address",
                "x-envoy-peer-",
                "x-endpoint-api-userinfo",
            ]),
            b'g' => any(&["x-goog-authenticated-user-", "x-goog-iap-"]),
            b'h' => any(&["x-hasura-"]),
            b'i' => any(&["x-impersonate-", "x-iap-"]),
            b'j' => any(&["x-jwt-"]),
            b'k' => any(&["x-kong-"]),
            b'm' => any(&["x-ms-client-principal", "x-ms-token-", "x-mellon-", "x-mfa"]),
            b'o' => any(&[
                "x-oidc-",
                "x-original-forwarded-",
                "x-original-remote-",
                "x-originating-ip",
            ]),
            b'p' => any(&["x-pomerium-", "x-proxyuser-"]),
            b'r' => any(&["x-remote-", "x-real-user", "x-role"]),
            b's' => any(&[
                "x-ssl-client-",
                "x-ssl-cert",
                "x-sudo-user",
                "x-shib-",
                "x-saml-",
                "x-scheme",
                "x-step-up",
                "x-sid",
            ]),
            b'v' => any(&["x-vouch-", "x-vercel-forwarded-"]),
            b'w' => any(&["x-webauth-"]),
            _ => false,
        },
        [b't', ..] => name.starts_with("tailscale-user-"),
        [b'c', ..] => {
            name.starts_with("cf-access-")
                || name == "client-ip"
                || name.starts_with("cloudfront-viewer-")
                || name == "cloudfront-forwarded-proto"
        }
        [b'p', ..] => name == "proxy-remote-user",
        [b'r', ..] => name.starts_with("remote-"),
        [b'o', ..] => name.starts_with("oidc-"),
        [b'g', ..] => name.starts_with("gap-"),
        [b's', ..] => name.starts_with("ssl-client-") || name.starts_with("shib-"),
        [b'i', ..] => name.starts_with("impersonate-"),
        [b'a', ..] => name == "auth-user" || name == "akamai-client-ip",
        [b'm', ..] => name.starts_with("mellon-"),
        [b'e', ..] => name == "eppn",
        [b'f', ..] => {
            name == "front-end-https" || name == "forwarded-for" || name == "fly-client-ip"
        }
        _ => false,
    }
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host`. A trusted peer's chain is extended; anybody
/// else's claims are replaced, so a client cannot choose the address the console sees.
pub(crate) fn set_forwarded(
    headers: &mut HeaderMap,
    fwd: &Forwarding,
) -> Result<(), InvalidForwarding> {
    let (proto, host) = (fwd.proto.clone(), fwd.host.clone());

    let prior: Option<Vec<&str>> = if fwd.peer_trusted {
        // Values that are not plain text cannot be extended faithfully; start a fresh chain.
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(|v| v.to_str().ok().map(str::trim))
            .collect()
    } else {
        None
    };
    let chain = match prior {
        Some(parts) if !parts.is_empty() && parts.iter().all(|p| !p.is_empty()) => {
            let chain = format!("{}, {}", parts.join(", "), fwd.peer.ip().to_canonical());
            HeaderValue::from_str(&chain).map_err(|_| InvalidForwarding("for"))?
        }
        _ => address_value(fwd.peer.ip()).map_err(|_| InvalidForwarding("for"))?,
    };
    headers.insert(X_FORWARDED_FOR, chain);

    if !(fwd.peer_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, proto);
    }
    if !(fwd.peer_trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        headers.insert(X_FORWARDED_HOST, host);
    }
    Ok(())
}

/// `ip` (IPv4-mapped IPv6 as IPv4) as a header value, the text of its `Display`. IPv4, the
/// common case on every proxied request, is written without the formatting machinery.
fn address_value(ip: std::net::IpAddr) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let mut digits = itoa::Buffer::new();
                let digits = digits.format(octet).as_bytes();
                text[len..len + digits.len()].copy_from_slice(digits);
                len += digits.len();
            }
            HeaderValue::from_bytes(&text[..len])
        }
        v6 => HeaderValue::from_str(&v6.to_string()),
    }
}

/// A forwarding instruction that cannot be written as a header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidForwarding(pub(crate) &'static str);

/// The name part of a `name=value` cookie pair (or of a bare token), trimmed like browsers and
/// most server-side parsers do, so padding cannot hide a name.
fn cookie_name(pair: &[u8]) -> &[u8] {
    let end = memchr::memchr(b'=', pair).unwrap_or(pair.len());
    pair[..end].trim_ascii()
}

/// Removes the gateway's cookies from every `Cookie` header. The remaining pairs are kept
/// byte-for-byte and merged into one header (RFC 6265 §5.4: one `Cookie` header per request;
/// several arrive from HTTP/2 clients). With nothing left, no `Cookie` header is sent.
pub(crate) fn filter_request_cookies(headers: &mut HeaderMap, gateway: &[String]) {
    let mut kept: Vec<u8> = Vec::new();
    let mut seen = false;
    for value in headers.get_all(header::COOKIE) {
        seen = true;
        let mut rest = value.as_bytes();
        loop {
            let end = memchr::memchr(b';', rest).unwrap_or(rest.len());
            let pair = rest[..end].trim_ascii_start();
            if !pair.trim_ascii().is_empty() {
                let name = cookie_name(pair);
                if !gateway.iter().any(|g| g.as_bytes() == name) {
                    if !kept.is_empty() {
                        kept.extend_from_slice(b"; ");
                    }
                    kept.extend_from_slice(pair);
                }
            }
            if end == rest.len() {
                break;
            }
            rest = &rest[end + 1..];
        }
    }
    if !seen {
        return;
    }
    headers.remove(header::COOKIE);
    if kept.is_empty() {
        return;
    }
    // Every byte came from a valid header value and `; ` is valid, so this cannot fail; if it
    // somehow did, sending no cookies is the safe side.
    if let Ok(v) = HeaderValue::from_bytes(&kept) {
        headers.insert(header::COOKIE, v);
    }
}

/// A `Location` naming the console's own address (`own_prefix`: `http://host:port` and the base
/// path, matched without regard to case) is turned into the same path at `public` (the
/// gateway's origin); any other is left as it is.
pub(crate) fn rewrite_own_location(headers: &mut HeaderMap, own_prefix: &str, public: &str) {
    let Some(location) = headers.get(header::LOCATION) else {
        return;
    };
    let bytes = location.as_bytes();
    let Some(head) = bytes.get(..own_prefix.len()) else {
        return;
    };
    let rest = &bytes[own_prefix.len()..];
    if !head.eq_ignore_ascii_case(own_prefix.as_bytes())
        || !(rest.is_empty() || matches!(rest[0], b'/' | b'?' | b'#'))
    {
        return;
    }
    let mut out = Vec::with_capacity(public.len() + rest.len() + 1);
    out.extend_from_slice(public.as_bytes());
    if !rest.starts_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(rest);
    if let Ok(v) = HeaderValue::from_bytes(&out) {
        headers.insert(header::LOCATION, v);
    }
}

/// Response headers with which a server starts or steers Device Bound Session Credentials
/// (current and older names). On the gateway's origin only the gateway binds sessions: a console
/// that sent them could have the browser register a session with an endpoint of the console's, or
/// answer the gateway's own refreshes with challenges the gateway never issued (each a failed
/// device proof, and enough of them end the session).
const SESSION_BINDING_RESPONSE_HEADERS: [&str; 4] = [
    "secure-session-registration",
    "secure-session-challenge",
    "sec-session-registration",
    "sec-session-challenge",
];

/// Drops what only the gateway sends from the upstream's response: the session-binding headers
/// (see [`SESSION_BINDING_RESPONSE_HEADERS`]) and `own` (lower case: the identity header), which
/// a console echoing its request headers (a debugging page) would otherwise hand the page's
/// scripts as a live identity token.
pub(crate) fn remove_gateway_response_headers(headers: &mut HeaderMap, own: &[String]) {
    let gateways = |k: &HeaderName| {
        SESSION_BINDING_RESPONSE_HEADERS.contains(&k.as_str())
            || own.iter().any(|o| o == k.as_str())
    };
    // Almost no response carries one: a pass over the names present, nothing hashed.
    if !headers.keys().any(gateways) {
        return;
    }
    let present: Vec<HeaderName> = headers.keys().filter(|k| gateways(k)).cloned().collect();
    for name in present {
        tracing::debug!(header = %name, "dropped a header of the gateway's from the upstream's response");
        headers.remove(name);
    }
}

/// A console's answer that says nothing of who may frame it (no `X-Frame-Options`, no CSP
/// `frame-ancestors`) may be framed by its own origin only (`X-Frame-Options: SAMEORIGIN`):
/// otherwise a page of another origin on the same site (a sibling subdomain), to which the
/// browser sends the session's `SameSite=Lax` cookie, could frame the signed-in console and have
/// the user click its buttons. A console that says for itself is left as it says.
pub(crate) fn frame_own_origin_only(headers: &mut HeaderMap) {
    if headers.contains_key(header::X_FRAME_OPTIONS) {
        return;
    }
    let says = headers
        .get_all(header::CONTENT_SECURITY_POLICY)
        .iter()
        .any(|v| {
            v.as_bytes()
                .windows(15)
                .any(|w| w.eq_ignore_ascii_case(b"frame-ancestors"))
        });
    if !says {
        headers.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
    }
}

/// Drops every `Set-Cookie` that would set one of the gateway's cookies, so the upstream can
/// neither overwrite nor shadow the gateway's session. Names are compared ignoring case (dropping
/// a look-alike is harmless; a look-alike reaching a lenient parser is not), and a value-only
/// `Set-Cookie: portcullis-session` is caught too. Other `Set-Cookie` headers stay, in order.
pub(crate) fn filter_response_cookies(headers: &mut HeaderMap, gateway: &[String]) {
    let values: Vec<HeaderValue> = match headers.entry(header::SET_COOKIE) {
        header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
        header::Entry::Vacant(_) => return,
    };
    for value in values {
        let bytes = value.as_bytes();
        let first = bytes.split(|&b| b == b';').next().unwrap_or(bytes);
        let name = cookie_name(first);
        if gateway
            .iter()
            .any(|g| g.as_bytes().eq_ignore_ascii_case(name))
        {
            tracing::debug!("dropped an upstream Set-Cookie naming a gateway cookie");
            continue;
        }
        headers.append(header::SET_COOKIE, value);
    }
}

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let mut ips: Vec<IpAddr> = [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
        ]
        .iter()
        .map(|t| t.parse().unwrap())
        .collect();
        for i in 0..=255u8 {
            ips.push(IpAddr::V4(Ipv4Addr::new(
                i,
                255 - i,
                i / 3,
                i.wrapping_mul(7),
            )));
        }
        for ip in ips {
            let v = address_value(ip).unwrap();
            assert_eq!(v.to_str().unwrap(), ip.to_string(), "{ip}");
        }
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped());
        assert_eq!(address_value(mapped).unwrap(), "10.0.0.7");
        let plain_v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(address_value(plain_v6).unwrap(), "::1");
    }

    #[test]
    fn hop_by_hop_names_are_exactly_the_list() {
        const HOP_BY_HOP: [&str; 9] = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ];
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
            assert!(!is_hop_by_hop(&format!("{name}s")), "{name}s");
            assert!(!is_hop_by_hop(&name[1..]), "{}", &name[1..]);
        }
        for name in [
            "host",
            "cookie",
            "x-connection",
            "tes",
            "upgrade-insecure-requests",
        ] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn names_compare_as_cgi_backends_read_them() {
        assert!(same_normalised("X-Auth_Token", "x-auth-token"));
        assert!(same_normalised("x-auth-token", "x-auth-token"));
        assert!(!same_normalised("x-auth-tokens", "x-auth-token"));
        // Any punctuation becomes `_` in a CGI variable, as `-` does.
        assert!(same_normalised("x-auth+token", "x-auth-token"));
        let mut h = HeaderMap::new();
        for name in [
            "x_auth_token",
            "X-Auth-Token",
            "x_forwarded_for",
            "connection",
            "accept",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        strip_identity(&mut h, &["X-Auth_Token".to_string()], &[]);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "connection"]);
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn gateway() -> Vec<String> {
        vec![
            "__Host-portcullis-session".into(),
            "portcullis-session".into(),
            "portcullis-csrf".into(),
        ]
    }

    #[test]
    fn connection_named_headers_and_hop_by_hop_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "x-other-hop"),
            ("x-secret-hop", "1"),
            ("x-other-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("accept", "text/html"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn identity_headers_go_in_any_spelling() {
        let mut h = map(&[
            ("X_Forwarded_User", "admin"),
            ("x-forwarded-email", "a@b"),
            ("X_PORTCULLIS_ASSERTION", "forged"),
            ("x-portcullis-anything", "forged"),
            ("remote_user", "admin"),
            ("x_forwarded_for", "1.2.3.4"),
            ("X-Forwarded-Method", "DELETE"),
            ("x-forwarded-port", "1"),
            ("X-Forwarded-Ssl", "on"),
            ("x-forwarded-client-cert", "forged"),
            ("X-Auth-User", "admin"),
            ("x-authenticated-userid", "admin"),
            ("X-Amzn-Oidc-Identity", "admin"),
            ("x_ms_client_principal_name", "admin"),
            ("Cf-Access-Authenticated-User-Email", "a@b"),
            ("CF-Connecting-IP", "1.2.3.4"),
            ("True-Client-IP", "1.2.3.4"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("X-Impersonate", "admin@example.com"),
            ("X-On-Behalf-Of", "admin@example.com"),
            ("x_acting_user", "admin"),
            ("X-Userid", "1"),
            ("X-Uid", "1"),
            ("X-Sub", "1"),
            ("content_length", "5"),
            ("x_custom_id", "forged"),
            ("x-keep_me", "yes"),
            ("authorization", "Bearer console-token"),
            // Other punctuation, which CGI-style servers turn into `_` as they do `-`.
            ("X-Request.Id", "forged"),
            ("x-request~id", "forged"),
            ("X-Portcullis.Assertion", "forged"),
            ("X-Forwarded.For", "1.2.3.4"),
            ("Remote.User", "admin"),
            ("x.keep.me.too", "yes"),
        ]);
        strip_identity(&mut h, &["X-Custom-Id".into()], &[]);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-keep_me", "x.keep.me.too"]);
    }

    #[test]
    fn request_cookies_lose_only_the_gateways() {
        let mut h = map(&[
            ("cookie", "a=1; portcullis-session=SECRET;b=\"x y\""),
            ("cookie", " __Host-portcullis-session=S2 ; c=3"),
            ("cookie", "portcullis-csrf =S3"),
        ]);
        filter_request_cookies(&mut h, &gateway());
        let all: Vec<&[u8]> = h.get_all("cookie").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(all, [b"a=1; b=\"x y\"; c=3".as_slice()]);

        let mut h = map(&[("cookie", "portcullis-session=S; portcullis-csrf=T")]);
        filter_request_cookies(&mut h, &gateway());
        assert!(!h.contains_key("cookie"));
    }

    #[test]
    fn cookie_names_are_matched_exactly_in_requests() {
        let mut h = map(&[("cookie", "portcullis-session-x=1; xportcullis-session=2")]);
        filter_request_cookies(&mut h, &gateway());
        assert_eq!(
            h["cookie"].as_bytes(),
            b"portcullis-session-x=1; xportcullis-session=2"
        );
    }

    #[test]
    fn only_the_consoles_own_address_is_rewritten_in_location() {
        let own = "http://10.0.0.5:9000/console";
        let public = "https://login.esp.example";
        for (sent, want) in [
            (
                "http://10.0.0.5:9000/console/campaigns?x=1",
                "https://login.esp.example/campaigns?x=1",
            ),
            ("HTTP://10.0.0.5:9000/console", "https://login.esp.example/"),
            (
                "http://10.0.0.5:9000/console?x",
                "https://login.esp.example/?x",
            ),
            // Not the console's: another port, another base path, another host, relative.
            (
                "http://10.0.0.5:90001/console/a",
                "http://10.0.0.5:90001/console/a",
            ),
            (
                "http://10.0.0.5:9000/consoles/a",
                "http://10.0.0.5:9000/consoles/a",
            ),
            ("http://10.0.0.5:9000/", "http://10.0.0.5:9000/"),
            ("https://docs.example.com/x", "https://docs.example.com/x"),
            ("/campaigns", "/campaigns"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_static(sent));
            rewrite_own_location(&mut h, own, public);
            assert_eq!(h[header::LOCATION], want, "{sent}");
        }
    }

    #[test]
    fn upstream_cannot_set_gateway_cookies() {
        let mut h = map(&[
            ("set-cookie", "theme=dark; Path=/"),
            ("set-cookie", "portcullis-session=evil; Path=/"),
            ("set-cookie", "PORTCULLIS-CSRF=evil"),
            ("set-cookie", " __Host-portcullis-session =evil; Secure"),
            ("set-cookie", "portcullis-session"),
            ("set-cookie", "lang=en; HttpOnly"),
        ]);
        filter_response_cookies(&mut h, &gateway());
        let all: Vec<&str> = h
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(all, ["theme=dark; Path=/", "lang=en; HttpOnly"]);
    }
}
