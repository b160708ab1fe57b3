//! Request-target policy: one canonical spelling of every path (so decisions and the upstream see
//! the same thing) and validation of return-to targets (so sign-in can never redirect off-site).

use url::Url;

pub mod step_up;

/// The gateway's own namespace; nothing under it is ever forwarded.
pub const GATEWAY_PREFIX: &str = "/_portcullis";

/// Why a request target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("The address must be a path starting with “/” (such as /campaigns).")]
    NotAbsolute,
    #[error("The address holds a “%” that is not followed by two hexadecimal digits.")]
    BadEscape,
    #[error(
        "The address holds a character that is not allowed (NUL or another control character)."
    )]
    ControlCharacter,
    #[error(
        "The address holds an overlong UTF-8 spelling of a character (such as %C0%AE for “.”), \
         which no browser sends."
    )]
    Overlong,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Canonicalises one path segment: decodes escapes of unreserved characters (so `%2e` is `.`),
/// upper-cases the remaining escapes and refuses malformed ones and control characters.
fn canonical_segment(seg: &str) -> Result<String, PathError> {
    let bytes = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_val),
                bytes.get(i + 2).copied().and_then(hex_val),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = h * 16 + l;
            if v < 0x20 || v == 0x7f {
                return Err(PathError::ControlCharacter);
            }
            if is_unreserved(v) {
                out.push(v as char);
            } else {
                out.push_str(&format!("%{v:02X}"));
            }
            i += 3;
        } else {
            if b < 0x20 || b == 0x7f {
                return Err(PathError::ControlCharacter);
            }
            if b >= 0x80 {
                // A raw byte of UTF-8 (or anything else) is escaped, so the console gets the
                // bytes that were sent; pushed as a `char` it was encoded a second time.
                out.push_str(&format!("%{b:02X}"));
            } else {
                out.push(b as char);
            }
            i += 1;
        }
    }
    // The C1 controls (U+0080–U+009F), which some decoders treat as line ends (U+0085), are
    // control characters too; every byte beyond ASCII is an upper-case escape by now.
    if out.contains("%C2%8") || out.contains("%C2%9") {
        return Err(PathError::ControlCharacter);
    }
    if out.contains('%') && has_overlong_utf8(&out) {
        return Err(PathError::Overlong);
    }
    Ok(out)
}

/// Whether a canonical segment (every byte beyond ASCII an upper-case escape) holds an overlong
/// UTF-8 sequence: a lead byte `C0` or `C1` followed by a continuation byte, `E0` followed by
/// `80`–`9F`, or `F0` followed by `80`–`8F`. Lenient decoders read `%C0%AE` as `.` and
/// `%C0%AF` as `/`, so such a path could mean `..` or another segment to the console while it
/// means neither here.
fn has_overlong_utf8(seg: &str) -> bool {
    let b = seg.as_bytes();
    let escaped = |i: usize| -> Option<u8> {
        (b.get(i) == Some(&b'%'))
            .then(|| Some(hex_val(*b.get(i + 1)?)? * 16 + hex_val(*b.get(i + 2)?)?))
            .flatten()
    };
    (0..b.len()).any(|i| {
        let (Some(lead), Some(next)) = (escaped(i), escaped(i + 3)) else {
            return false;
        };
        match lead {
            0xC0 | 0xC1 => (0x80..=0xBF).contains(&next),
            0xE0 => (0x80..=0x9F).contains(&next),
            0xF0 => (0x80..=0x8F).contains(&next),
            _ => false,
        }
    })
}

/// The canonical form of a request path: escapes normalised, empty segments (`//`) collapsed,
/// `.` and `..` (in any spelling, e.g. `%2e%2E`) resolved without climbing above the root.
/// A trailing slash is kept. Encoded slashes stay encoded: they never create segments.
pub fn normalise_path(raw: &str) -> Result<String, PathError> {
    if is_canonical(raw) {
        return Ok(raw.to_string());
    }
    normalise_segments(raw)
}

/// Whether [`normalise_path`] would give `raw` back unchanged, found without building anything
/// (most proxied requests name a canonical path): absolute, printable ASCII without `%` or space,
/// no empty segment but a last one (the trailing slash), no `.` or `..` segment. Anything else
/// takes [`normalise_segments`], which is the definition.
fn is_canonical(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix('/') else {
        return false;
    };
    if raw.bytes().any(|b| b <= b' ' || b >= 0x7f || b == b'%') {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg == "." || seg == ".." || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// [`normalise_path`], segment by segment.
fn normalise_segments(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let mut stack: Vec<String> = Vec::new();
    let segments: Vec<&str> = raw[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        let seg = canonical_segment(seg)?;
        match seg.as_str() {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                stack.pop();
                trailing_slash = i == last;
            }
            _ => {
                stack.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(raw.len());
    for s in &stack {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// Whether a canonical path lies in the gateway's namespace (or is its key set, [`JWKS_PATH`]),
/// as any server behind the gateway might read it: its first segment read as a step-up rule reads
/// a literal ([`same_segment`]: any letter case, Java's included, blanks before it, and after it
/// anything that does not go on with a letter, digit, `-` or `_`: `/_portcullis.`,
/// `/_portcullis%20`, `/_portcullis.json`), in the path itself and in every other reading of it
/// ([`readings`]: escapes decoded, `\` and `;` parameters, blank and dot segments, `+`, NFKC,
/// a PHP front controller), so `/\_portcullis`, `/%2F_portcullis`, `/x/..;/_portcullis`,
/// `/%255Fportcullis`, `/+/_portcullis` or `/index.php/_portcullis` are the namespace too.
/// (Runs on every proxied request: a path with nothing to decode or drop is read once, where
/// a first segment that starts otherwise is told apart at its first character.)
pub fn is_gateway_path(canonical: &str) -> bool {
    is_gateways(canonical)
        || (has_other_readings(canonical) && readings(canonical).iter().any(|r| is_gateways(r)))
}

/// The gateway's key set, served at this path alone: the router answers the path itself, and
/// any other spelling of it (`/.well-known//jwks.json`, `/x/../.well-known/jwks.json`,
/// `/.well-known/jwks.json.`) is the gateway's too, never the console's.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// One reading of a path: in the namespace, or the key set.
fn is_gateways(path: &str) -> bool {
    // Both names start with a character only itself folds to, after any blanks: most paths
    // (`/campaigns`) are told apart at their first byte, before the path is split.
    if path
        .bytes()
        .find(|b| *b != b'/')
        .is_none_or(|b| b.is_ascii_alphanumeric())
    {
        return false;
    }
    let mut segs = segments(path);
    let Some(first) = segs.next() else {
        return false;
    };
    match first
        .trim_start_matches(|c: char| c.is_whitespace() || is_hidden_char(c))
        .as_bytes()
        .first()
    {
        Some(b'_') => same_segment(&GATEWAY_PREFIX[1..], first),
        Some(b'.') if same_segment(".well-known", first) => {
            matches!((segs.next(), segs.next()), (Some(k), None) if same_segment("jwks.json", k))
        }
        _ => false,
    }
}

/// A path's non-empty segments.
pub(crate) fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Whether `pattern` (`*` one segment, a last `**` any rest) matches `path`, segment by segment
/// as [`same_segment`] reads them; the pattern's last segment as the route it names, without a
/// format suffix ([`route_name`]).
pub(crate) fn path_matches(pattern: &str, path: &str) -> bool {
    let mut want = segments(pattern).peekable();
    let mut have = segments(path);
    loop {
        let w = want.next();
        let last = want.peek().is_none();
        match (w, have.next()) {
            (Some("**"), _) => return true,
            (None, None) => return true,
            (Some("*"), Some(_)) => {}
            (Some(w), Some(h)) if same_segment(if last { route_name(w) } else { w }, h) => {}
            _ => return false,
        }
    }
}

/// A pattern's last segment without its format suffix (`send.json` → `send`, `export.csv` →
/// `export`): consoles that route formats (Rails, Laravel) serve `/x/send` and `/x/send.xml`
/// from the handler of `/x/send.json`, and [`same_segment`] already reads every suffixed
/// spelling of `send` as `send`; a rule naming one spelling guards them all.
fn route_name(segment: &str) -> &str {
    match segment.split_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => segment,
    }
}

/// Whether a path segment `have` reads as a literal segment `want`: blanks before it aside,
/// compared character by character in Unicode's simple upper and then lower case, as Java's
/// case-insensitive comparison has them (`ſend` is `send`, `İ` and `ı` are `i`, the Kelvin sign
/// `K` a `k`), and `have` may go on after `want` with anything that does not start with a letter,
/// digit, `-` or `_` (a format suffix `.json`, trailing dots or spaces, `~`, `::$DATA`, `?`, an
/// invisible or undecodable character), which frameworks and servers drop or route to the same
/// action; `send-test` and `send_later` are other names.
pub(crate) fn same_segment(want: &str, have: &str) -> bool {
    let fold = |c: char| {
        let upper = c.to_uppercase().next().unwrap_or(c);
        upper.to_lowercase().next().unwrap_or(upper)
    };
    let have = have.trim_start_matches(|c: char| c.is_whitespace() || is_hidden_char(c));
    let mut have = have.chars();
    for w in want.chars() {
        match have.next() {
            Some(h) if h == w || fold(h) == fold(w) => {}
            _ => return false,
        }
    }
    have.next()
        .is_none_or(|c| !c.is_alphanumeric() && c != '-' && c != '_')
}

/// How far escapes are decoded in [`readings`]: a server that decodes twice is not unheard of,
/// three times would be.
const DECODE_ROUNDS: usize = 3;

/// Whether [`readings`] may differ from the path itself: something to decode or drop (`%`, `\`,
/// `;`, `+`), a segment that starts with a dot (`...`, `.json`), or a PHP script before the
/// route. Checked on every proxied request, without building anything.
pub(crate) fn has_other_readings(path: &str) -> bool {
    let b = path.as_bytes();
    // One pass for the bytes that may matter; most paths have none of them.
    let Some(first) = b
        .iter()
        .position(|c| matches!(c, b'%' | b'\\' | b';' | b'+' | b'.'))
    else {
        return false;
    };
    b[first..].iter().enumerate().any(|(j, &c)| {
        let i = first + j;
        match c {
            b'%' | b'\\' | b';' | b'+' => true,
            b'.' => {
                (i > 0 && b[i - 1] == b'/')
                    || b.get(i + 1..i + 4)
                        .is_some_and(|w| w.eq_ignore_ascii_case(b"php"))
            }
            _ => false,
        }
    })
}

/// The readings of a path, besides the path itself, that a server behind the gateway might make
/// of it: escapes decoded (up to [`DECODE_ROUNDS`] times) and `\` taken as `/`; then that text
/// as it is and with `+` read as a space, NFKC-normalised (fullwidth `ｓｅｎｄ` is `send`) and
/// without invisible characters (a soft hyphen, a joiner); each read with `;` parameters dropped
/// (as servlet containers do) and empty, `.` and `..` segments resolved, where a segment of
/// nothing but dots and blanks is taken as a segment, as nothing (a segment trimmed of its
/// trailing dots and spaces is empty, and Spring's trimmed tokens drop it; a lone `.json` is
/// dropped too, as a format suffix), or, holding two dots or more, as `..` (Windows servers read
/// `. .` and `..%20` so); and each of those also from the segment after a PHP script on
/// (`/index.php/campaigns/1/send` is the route `/campaigns/1/send` to a PHP front controller).
/// Used only to refuse, never to forward.
pub(crate) fn readings(path: &str) -> Vec<String> {
    use unicode_normalization::UnicodeNormalization;
    let text = decoded(path);
    let loose: String = text
        .replace('+', " ")
        .nfkc()
        .filter(|c| !is_hidden_char(*c))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for t in [&text, &loose] {
        for blank in [Blank::Standard, Blank::Dropped, Blank::Climbs] {
            let r = resolve(t, blank);
            for php in after_php(&r) {
                push_new(&mut out, php);
            }
            push_new(&mut out, r);
        }
    }
    out
}

fn push_new(out: &mut Vec<String>, reading: String) {
    if !out.contains(&reading) {
        out.push(reading);
    }
}

/// The rest of a resolved path after its first and after its last segment naming a PHP script
/// (`/index.php/x`: `/x`), as a front controller's `PATH_INFO` (nginx's greedy
/// `fastcgi_split_path_info`, Apache's first existing file).
fn after_php(path: &str) -> Vec<String> {
    let php =
        |seg: &str| seg.len() > 4 && seg.as_bytes()[seg.len() - 4..].eq_ignore_ascii_case(b".php");
    let segs: Vec<&str> = segments(path).collect();
    let mut out = Vec::new();
    for i in [
        segs.iter().position(|s| php(s)),
        segs.iter().rposition(|s| php(s)),
    ]
    .into_iter()
    .flatten()
    {
        let rest = format!("/{}", segs[i + 1..].join("/"));
        if !out.contains(&rest) {
            out.push(rest);
        }
    }
    out
}

/// How [`resolve`] reads a segment of only dots and blanks other than `.` and `..`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blank {
    /// As a segment like any other (the path as it is).
    Standard,
    /// As no segment at all; also a segment that starts with a dot.
    Dropped,
    /// Two dots or more as `..`, fewer as nothing.
    Climbs,
}

/// `path` with its escapes decoded, up to [`DECODE_ROUNDS`] times, and `\` as `/`.
fn decoded(path: &str) -> String {
    let mut bytes = path.as_bytes().to_vec();
    for _ in 0..DECODE_ROUNDS {
        let decoded: Vec<u8> = percent_encoding::percent_decode(&bytes).collect();
        if decoded == bytes {
            break;
        }
        bytes = decoded;
    }
    String::from_utf8_lossy(&bytes).replace('\\', "/")
}

/// Segments of `text` resolved: `;` parameters dropped, empty, `.` and `..` segments resolved,
/// blank ones as `blank` says.
fn resolve(text: &str, blank: Blank) -> String {
    let is_blank = |c: char| c.is_whitespace() || is_hidden_char(c);
    let mut stack: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        let seg = seg.split(';').next().unwrap_or_default();
        let trimmed = seg.trim_matches(is_blank);
        let dots_only = trimmed.chars().all(|c| c == '.' || is_blank(c));
        let dots = trimmed.chars().filter(|c| *c == '.').count();
        match seg {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            _ if blank == Blank::Dropped && (dots_only || trimmed.starts_with('.')) => {}
            _ if blank == Blank::Climbs && dots_only => {
                if dots >= 2 {
                    stack.pop();
                }
            }
            s => stack.push(s),
        }
    }
    let mut out = String::with_capacity(text.len() + 1);
    for s in &stack {
        out.push('/');
        out.push_str(s);
    }
    out
}

/// Characters that change how text reads without showing themselves: controls, line and
/// paragraph separators, and Unicode's format and default-ignorable characters (zero-width
/// spaces and joiners, direction marks, overrides and isolates, soft hyphen, combining grapheme
/// joiner, Hangul fillers, interlinear annotation marks, byte-order mark, tag characters,
/// variation selectors), the Braille blank that shows as a space but is none, and private-use
/// characters, which show as whatever a font makes of them, noncharacters, and code points
/// Unicode has not assigned (as of the tables this build carries: no font draws them, and a
/// later version may make them anything). Names and addresses that people read must not hold
/// them.
pub fn is_hidden_char(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{E000}'..='\u{F8FF}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFFB}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
                | '\u{F0000}'..='\u{10FFFF}'
                | '\u{FDD0}'..='\u{FDEF}'
        )
        || (u32::from(c) & 0xFFFE) == 0xFFFE
        || (!c.is_ascii() && c.general_category() == GeneralCategory::Unassigned)
}

/// A combining mark of any script (Unicode's general category M: Latin diacritics, Thai tone
/// marks, Hebrew points, Arabic harakat, Devanagari vowel signs…).
fn is_combining_mark(c: char) -> bool {
    unicode_normalization::char::is_combining_mark(c)
}

/// The most combining marks one letter takes in a name: enough for Hebrew's points, Tibetan's
/// and Burmese stacks, too few for a pile that runs over the lines around it.
const MAX_MARKS: usize = 4;

/// What a refused name is told (the rule of [`is_readable_name`]).
pub const NAME_RULE: &str = "A key name has 1 to 64 characters, no control or invisible \
     characters, and at most four accents or other marks on a letter (none on a space or first).";

/// A text a person will read as a name (a security key's, say): 1 to `max` characters, none of
/// them hidden ([`is_hidden_char`]), no combining mark first or on a space, and at most
/// [`MAX_MARKS`] on one letter.
pub fn is_readable_name(name: &str, max: usize) -> bool {
    use unicode_properties::UnicodeEmoji;
    let (mut marks, mut base_is_space, mut prev) = (0, true, ' ');
    !name.is_empty()
        && name.chars().count() <= max
        && name.chars().all(|c| {
            let mark = is_combining_mark(c);
            if mark {
                marks += 1;
            } else {
                marks = 0;
                base_is_space = c.is_whitespace();
            }
            // A mark needs a letter under it: none first, none on a space.
            let stray_mark = mark && base_is_space;
            // An emoji's presentation selector and the joiner inside an emoji sequence (❤️,
            // 👨‍👩‍👧, ❤️‍🔥, 1️⃣) are shown, not hidden: after an emoji (Unicode's emoji data) or
            // its selector they are taken.
            let emoji_part = matches!(c, '\u{FE0E}' | '\u{FE0F}' | '\u{200D}')
                && (prev.is_emoji_char() || prev == '\u{FE0F}')
                && !prev.is_alphabetic();
            prev = c;
            (emoji_part || !is_hidden_char(c)) && !stray_mark && marks <= MAX_MARKS
        })
}

/// An account id (trimmed) as users are grouped by, and per-account policy matches exactly: 1 to
/// 128 bytes, none of them hidden.
pub fn is_account_id(id: &str) -> bool {
    id.len() <= 128 && is_readable_name(id, 128)
}

/// An email address as the gateway accepts one for a user (already normalised): at most 254
/// bytes, one `@`, a local part of 1 to 64 bytes, a domain of at most 255 bytes made of non-empty dot-separated
/// labels (at least two), and no whitespace, hidden characters or the characters that quote or
/// separate addresses in mail headers (`<>()[]\,;:"`).
pub fn is_plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    // 254 in all: the longest path SMTP delivers (RFC 5321), so every user can be told.
    email.len() <= 254
        && (1..=64).contains(&local.len())
        && (1..=255).contains(&domain.len())
        && !domain.contains('@')
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && !email
            .chars()
            .any(|c| c.is_whitespace() || is_hidden_char(c) || "<>()[]\\,;:\"".contains(c))
}

/// Why a new user's (normalised) address is refused, if it is: a domain that is no host name
/// mail can go to (`exa_mple.com`, a label over 63 characters), or one that could pass for
/// another address: a domain in IDNA's ASCII form that does not decode (`xn--abc`), marks with
/// no letter under them or piled up, or a local part or domain label (read back from IDNA)
/// written in more than one script (Unicode's mixed-script rule, UTS 39: `аlice` with a
/// Cyrillic `а` beside `alice`).
pub fn email_confusion(email: &str) -> Option<&'static str> {
    use unicode_security::MixedScript;
    let Some((local, domain)) = email.rsplit_once('@') else {
        return Some("The address has no domain.");
    };
    // A name mail can be sent to: letters, digits and hyphens (or their IDNA form), labels of
    // at most 63 characters, 253 in all (STD3 rules, DNS lengths).
    if idna::domain_to_ascii_strict(domain).is_err() {
        return Some(
            "The address's domain is not a domain name mail can go to (letters, digits and \
             hyphens, each part at most 63 characters).",
        );
    }
    let (unicode, decoded) = idna::domain_to_unicode(domain);
    if decoded.is_err() {
        return Some("The address's domain is punycode (xn--) that does not decode.");
    }
    if !is_readable_name(local, 64) {
        return Some(
            "The address holds accents or other marks with no letter under them, or piled on \
             one letter, so it could pass for another address.",
        );
    }
    if !local.is_single_script() || !unicode.split('.').all(|label| label.is_single_script()) {
        return Some(
            "The address mixes letters of different scripts (a Cyrillic а among Latin letters, \
             say), so it could pass for another address.",
        );
    }
    None
}

/// What an address looks like, whatever script draws it (Unicode's confusable skeleton, UTS
/// 39, of the address with its domain read back from IDNA, in lower case): `аӏісе@` in Cyrillic
/// and `alice@` look alike.
pub fn email_skeleton(email: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let (local, domain) = email.rsplit_once('@').unwrap_or((email, ""));
    let (unicode, _) = idna::domain_to_unicode(domain);
    // A dot above an i or j (or a dotless one) draws nothing new: `i̇` looks like `i`.
    let mut text = String::new();
    let mut prev = ' ';
    for c in format!("{local}@{unicode}").nfd() {
        if !(c == '\u{0307}' && matches!(prev, 'i' | 'j' | '\u{0131}' | '\u{0237}' | 'I' | 'J')) {
            text.push(c);
            prev = c;
        }
    }
    unicode_security::skeleton(&text)
        .collect::<String>()
        .to_lowercase()
}

/// Accepts a return-to target only if it is a relative, same-origin path; returns it in a
/// canonical form, or `None`. Anything odd — schemes, hosts, backslashes, control or whitespace
/// characters (raw or encoded), protocol-relative `//` in any spelling — is refused.
pub fn safe_return_to(candidate: &str, public_url: &Url) -> Option<String> {
    return_to(candidate, public_url, |_| false)
}

/// Like [`safe_return_to`], but also accepts the gateway's own account and admin pages and the
/// page of a form held for a step-up: where
/// a sign-in, a step-up (`/_portcullis/reauth`) or a device proof (`/_portcullis/bind`) returns
/// to (their own redirects to sign in name them in `next`).
pub fn safe_return_target(candidate: &str, public_url: &Url) -> Option<String> {
    return_to(candidate, public_url, |path| {
        [
            "/_portcullis/account",
            "/_portcullis/admin",
            "/_portcullis/held",
        ]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
    })
}

/// Like [`safe_return_target`], and also the step-up page (`/_portcullis/reauth`): where a
/// device proof returns to when the step-up page found the proof run out (the step-up, and a
/// form it holds, go on from there).
pub fn safe_bind_return(candidate: &str, public_url: &Url) -> Option<String> {
    safe_return_target(candidate, public_url)
        .or_else(|| return_to(candidate, public_url, |path| path == "/_portcullis/reauth"))
}

fn return_to(candidate: &str, public_url: &Url, gateway_ok: fn(&str) -> bool) -> Option<String> {
    if candidate.is_empty() || candidate.len() > 2048 {
        return None;
    }
    if candidate
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return None;
    }
    let raw_path = candidate.split(['?', '#']).next().unwrap_or_default();
    let decoded = percent_encoding::percent_decode_str(raw_path)
        .decode_utf8()
        .ok()?;
    for form in [raw_path, decoded.as_ref()] {
        // A space is a legitimate path character; every other control or whitespace character
        // (tab, CR, LF…) is how browsers are tricked into reading `//host`.
        if !form.starts_with('/')
            || form.starts_with("//")
            || form.contains('\\')
            || form
                .chars()
                .any(|c| c.is_control() || (c.is_whitespace() && c != ' '))
        {
            return None;
        }
    }
    // Encoded CR/LF in the query would be header injection in a less careful redirect.
    if percent_encoding::percent_decode_str(candidate)
        .decode_utf8_lossy()
        .chars()
        .any(char::is_control)
    {
        return None;
    }

    let joined = public_url.join(candidate).ok()?;
    if joined.origin() != public_url.origin()
        || !joined.username().is_empty()
        || joined.password().is_some()
    {
        return None;
    }
    let path = normalise_path(joined.path()).ok()?;
    if is_gateway_path(&path) && !gateway_ok(&path) {
        return None;
    }
    Some(match joined.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick check never disagrees with the definition: every path of up to six characters
    /// after the leading `/`, over an alphabet of separators, dots, escapes (also of dots and
    /// slashes), a space, a control character and a non-ASCII letter.
    #[test]
    fn the_canonical_shortcut_agrees_with_the_segment_walk() {
        let alphabet = ['/', '.', 'a', '%', '2', 'e', 'F', ' ', '\u{1}', 'é'];
        let mut paths = vec![String::from("/")];
        let mut frontier = paths.clone();
        for _ in 0..6 {
            frontier = frontier
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            paths.extend(frontier.iter().cloned());
        }
        paths.extend(["", "a", "a/b", ".", "%2F"].map(String::from));
        let mut shortcuts = 0;
        for p in &paths {
            let walked = normalise_segments(p);
            assert_eq!(normalise_path(p), walked, "{p:?}");
            if is_canonical(p) {
                shortcuts += 1;
                assert_eq!(walked.as_deref(), Ok(p.as_str()), "{p:?}");
            }
        }
        assert!(
            shortcuts > 1000,
            "the shortcut was hardly taken: {shortcuts}"
        );
    }

    #[test]
    fn step_up_returns_only_to_account_and_admin_pages() {
        let base = Url::parse("https://gw.example.com/").unwrap();
        let ok = |c: &str| safe_return_target(c, &base);
        assert_eq!(
            ok("/_portcullis/admin").as_deref(),
            Some("/_portcullis/admin")
        );
        assert_eq!(
            ok("/_portcullis/admin/users?q=a").as_deref(),
            Some("/_portcullis/admin/users?q=a")
        );
        assert_eq!(
            ok("/_portcullis/account").as_deref(),
            Some("/_portcullis/account")
        );
        assert_eq!(ok("/campaigns").as_deref(), Some("/campaigns"));
        for bad in [
            "/_portcullis/login",
            "/_portcullis/reauth?next=/x",
            "/_portcullis/administrator",
            "/_portcullis/%61dmin/../login",
            "//evil.example/_portcullis/admin",
            "https://evil.example/_portcullis/admin",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
        assert_eq!(
            safe_return_to("/_portcullis/admin", &base),
            None,
            "sign-in never returns there"
        );
    }

    #[test]
    fn paths_have_one_canonical_spelling() {
        for (raw, want) in [
            ("/", "/"),
            ("/campaigns", "/campaigns"),
            ("//campaigns", "/campaigns"),
            ("/./campaigns", "/campaigns"),
            ("/a/../campaigns", "/campaigns"),
            ("/%2e%2e/campaigns", "/campaigns"),
            ("/%2E%2e/%2e/campaigns/", "/campaigns/"),
            ("/_portcullis/../campaigns", "/campaigns"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a%2fb", "/a%2Fb"),
            ("/%61pi/keys", "/api/keys"),
            ("/x;jsessionid=1", "/x;jsessionid=1"),
            ("/a/b/..", "/a/"),
            ("/a//", "/a/"),
            // Raw non-ASCII (UTF-8 sent unescaped) is escaped byte for byte, not re-encoded.
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/caf%C3%A9", "/caf%C3%A9"),
        ] {
            assert_eq!(normalise_path(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(normalise_path("x"), Err(PathError::NotAbsolute));
        assert_eq!(normalise_path("/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalise_path("/%2"), Err(PathError::BadEscape));
        assert_eq!(normalise_path("/a%00b"), Err(PathError::ControlCharacter));
        assert_eq!(normalise_path("/a%0ab"), Err(PathError::ControlCharacter));
        for c1 in ["/a%c2%85", "/a%C2%9B", "/a\u{85}b", "/x/\u{9f}"] {
            assert_eq!(normalise_path(c1), Err(PathError::ControlCharacter), "{c1}");
        }
        assert!(
            normalise_path("/caf%C3%A9/\u{a0}").is_ok(),
            "other text is not"
        );
    }

    #[test]
    fn overlong_utf8_is_refused_and_the_key_set_is_the_gateways_in_any_spelling() {
        for bad in [
            "/x/%c0%ae%c0%ae/campaigns",
            "/campaigns/1%c0%afsend",
            "/x/%e0%80%ae%e0%80%ae/y",
            "/a/..%c0%80/b",
            "/x/%f0%80%80%ae",
        ] {
            assert_eq!(normalise_path(bad), Err(PathError::Overlong), "{bad}");
        }
        for good in [
            "/caf%C3%A9",
            "/%C3%80%C2%AE",
            "/%E0%A4%85",
            "/%F0%9F%98%80",
            "/%C0",
        ] {
            assert!(normalise_path(good).is_ok(), "{good}");
        }
        for path in [
            "/.well-known/jwks.json",
            "/.well-known/JWKS.json",
            "/.well-known/jwks.json/",
            "/.well-known%2Fjwks.json",
            "/.well-known/jwks.json;x",
        ] {
            let canonical = normalise_path(path).unwrap();
            assert!(is_gateway_path(&canonical), "{path}");
        }
        for path in [
            "/.well-known/security.txt",
            "/well-known/jwks.json",
            "/.well-known/jwks",
        ] {
            assert!(!is_gateway_path(path), "{path}");
        }
    }

    #[test]
    fn names_and_addresses_hold_no_hidden_characters() {
        assert!(is_readable_name("Desk key", 64));
        assert!(is_readable_name("Clé de bureau", 64));
        // Scripts that stack marks, and emoji with their selector and joiners, are names.
        for good in [
            "\u{5d4}\u{5b7}\u{5e9}\u{5c1}\u{5b8}\u{5bc}\u{5de}",
            "\u{f66}\u{f92}\u{fb2}\u{f74}\u{f56}",
            "\u{1000}\u{103c}\u{103d}\u{1031}\u{1038}",
            "\u{2764}\u{fe0f} key",
            "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}",
            "\u{2764}\u{fe0f}\u{200d}\u{1f525}",
            "key 1\u{fe0f}\u{20e3}",
        ] {
            assert!(is_readable_name(good, 64), "{good:?}");
        }
        // A joiner or selector after a letter, or after a symbol that is no emoji, is hidden
        // as ever; so are code points Unicode has not assigned.
        assert!(!is_readable_name("a\u{200d}b", 64));
        assert!(!is_readable_name("a\u{fe0f}", 64));
        assert!(!is_readable_name("\u{2192}\u{200d}key", 64));
        assert!(!is_readable_name("key \u{0378}", 64));
        assert!(!is_readable_name("key \u{2FFFD}", 64));
        assert!(is_hidden_char('\u{0378}') && !is_hidden_char('\u{00e9}'));
        for bad in [
            "",
            "a\u{202E}yek",
            "zero\u{200B}width",
            "tab\there",
            "bom\u{FEFF}",
        ] {
            assert!(!is_readable_name(bad, 64), "{bad:?}");
        }
        assert!(!is_readable_name(&"k".repeat(65), 64));
        for good in [
            "ana@example.com",
            "ana.maria+esp@mail.example.co.uk",
            "o'brien@example.com",
            &format!("{}@example.com", "a".repeat(64)),
        ] {
            assert!(is_plausible_email(good), "{good:?}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        let long_domain = format!("ana@{}.com", "d".repeat(252));
        // Each part within its own bound, 312 bytes in all: no SMTP server delivers it.
        let long_path = format!(
            "{}@{}com",
            "a".repeat(64),
            format!("{}.", "b".repeat(60)).repeat(4)
        );
        let longest = format!(
            "{}@{}.{}.{}.com",
            "a".repeat(64),
            "b".repeat(60),
            "b".repeat(60),
            "b".repeat(63)
        );
        assert_eq!(longest.len(), 254);
        assert!(is_plausible_email(&longest));
        for bad in [
            "ana",
            "@example.com",
            "ana@example",
            "ana@.com",
            "ana@example.com.",
            "ana@example..com",
            "bob@@x.com",
            "bob@x@y.com",
            ".ana@example.com",
            "ana.@example.com",
            "a..na@example.com",
            "a na@example.com",
            "<ana>@example.com",
            "ana,bob@example.com",
            "\"ana\"@example.com",
            "ana\u{202E}@example.com",
            "a\u{200D}na@example.com",
            &long_local,
            &long_domain,
            &long_path,
        ] {
            assert!(!is_plausible_email(bad), "{bad:?}");
        }
        for (raw, good) in [
            ("alice@example.com", true),
            ("ana.maria+esp@mail.example.co.uk", true),
            ("\u{430}lice@example.com", false),
            ("alic\u{435}@example.com", false),
            ("bob@ex\u{430}mple.com", false),
            (
                "u@\u{43f}\u{440}\u{438}\u{43c}\u{435}\u{440}.\u{440}\u{444}",
                true,
            ),
            ("\u{43f}\u{435}\u{442}\u{44f}@example.com", true),
            ("\u{7530}\u{4e2d}\u{3055}\u{3093}@example.jp", true),
        ] {
            let email = crate::store::normalise_email(raw);
            assert!(is_plausible_email(&email), "{raw:?} as {email:?}");
            assert_eq!(
                email_confusion(&email).is_none(),
                good,
                "{raw:?} as {email:?}"
            );
        }
        // Whole-script and compatibility look-alikes: folded to the letters they stand for,
        // or drawn like them.
        assert_eq!(
            crate::store::normalise_email("\u{ff41}\u{ff4c}ice@example.com"),
            "alice@example.com"
        );
        assert_eq!(
            crate::store::normalise_email("a\u{2113}ice@example.com"),
            "alice@example.com"
        );
        for lookalike in [
            "\u{430}\u{4cf}\u{456}\u{441}\u{435}@example.com",
            "al\u{131}ce@example.com",
            "ali\u{307}ce@example.com",
            "al\u{131}\u{307}ce@example.com",
            "AL\u{130}CE@example.com",
        ] {
            let email = crate::store::normalise_email(lookalike);
            assert_eq!(
                email_skeleton(&email),
                email_skeleton("alice@example.com"),
                "{lookalike:?}"
            );
        }
        assert_ne!(
            email_skeleton("alice@example.com"),
            email_skeleton("alicia@example.com")
        );
        let long_label = format!("x@{}.com", "b".repeat(64));
        for refused in [
            "\u{301}alice@example.com",
            "x@xn--abc.com",
            "ali\u{301}\u{301}\u{301}\u{301}\u{301}\u{301}ce@example.com",
            "x@exa_mple.com",
            "x@-example.com",
            long_label.as_str(),
        ] {
            let email = crate::store::normalise_email(refused);
            assert!(email_confusion(&email).is_some(), "{refused:?}");
        }
        // What mail goes to is taken: hyphens, digits, 63-character labels, internationalised
        // domains.
        let longest = format!("x@{}.com", "b".repeat(63));
        for taken in [
            "x@mail-1.example.com",
            longest.as_str(),
            "u@\u{43f}\u{440}\u{438}\u{43c}\u{435}\u{440}.\u{440}\u{444}",
        ] {
            let email = crate::store::normalise_email(taken);
            assert_eq!(email_confusion(&email), None, "{taken:?}");
        }
        // An internationalised domain is one mailbox in either spelling.
        assert_eq!(
            crate::store::normalise_email(
                " U@\u{41f}\u{420}\u{418}\u{41c}\u{415}\u{420}.\u{420}\u{424} "
            ),
            "u@xn--e1afmkfd.xn--p1ai"
        );
        assert_eq!(
            crate::store::normalise_email("u@XN--E1AFMKFD.xn--p1ai"),
            "u@xn--e1afmkfd.xn--p1ai"
        );
    }

    #[test]
    fn gateway_namespace_in_any_case() {
        for p in [
            "/_portcullis",
            "/_portcullis/login",
            "/_portcullis/healthz",
            "/_portcullis/readyz",
            "/_PORTCULLIS/x",
            "/_Portcullis;x=1",
            "/_portcullis%2Flogin",
            "/_PortCullis%5cx",
            "/_portcullis%3Bx",
            // As a server behind the gateway may read them (backslash as slash, `;` parameters
            // dropped as servlet containers do, escapes decoded twice):
            "/_portcullis\\admin",
            "/\\_portcullis/admin",
            "/%5C_portcullis/admin",
            "/%2F_portcullis/admin",
            "/x/..;/_portcullis/admin",
            "/;/_portcullis/x",
            "/;x=1/_portcullis",
            "/%255Fportcullis/admin",
            "/a%2F..%2F_portcullis",
            // Trailing dots and spaces, which Windows servers drop from a segment:
            "/_portcullis./login",
            "/_portcullis../login",
            "/_portcullis..;/login",
            "/_portcullis%20/login",
            "/_portcullis%2e/login",
            "/_portcullis .. /login",
            "/_portcullis.",
            // A format suffix, blanks before it, other blank or dot segments, Java's case
            // folding, a PHP front controller, NFKC, `+` as a space:
            "/_portcullis.json",
            "/_portcullis.css",
            "/_portcullis~",
            "/_portcullis%2500",
            "/%20_portcullis",
            "/+/_portcullis",
            "/x/..+/_portcullis",
            "/x/.%20./_portcullis/account",
            "/_portcull%C4%B0s/account",
            "/_portcull%C4%B1s/account",
            "/_portculli%C5%BF/account",
            "/_portcullis%E2%80%8B",
            "/%E2%80%8B_portcullis",
            "/index.php/_portcullis/account",
            "/%EF%BC%BFportcullis/login",
            "/.well-known/jwks.json%20",
            "/.well-known/jwks.json.",
            "/.well-known/jwks.json~",
            "/.well-known/jwks.json::$DATA",
            "/.well-known/jwk%C5%BF.json",
            "/.well-known/jwks.json.json",
            "/.well-known/x/.%20./jwks.json",
            "/index.php/.well-known/jwks.json",
        ] {
            assert!(is_gateway_path(p), "{p}");
        }
        for p in [
            "/",
            "",
            "/_portcullisx",
            "/portcullis/login",
            "/_portculli",
            "/é/_portcullis",
            "/files/a%2F_portcullis",
            "/x;y/_portcullisx",
            "/campaigns;v=2",
            "/%2F",
            "/_portcullis-docs",
            "/_portcullis_x/y",
        ] {
            assert!(!is_gateway_path(p), "{p}");
        }
    }

    #[test]
    fn return_to_accepts_only_same_origin_paths() {
        let base = Url::parse("https://login.esp.example/").unwrap();
        for ok in [
            "/",
            "/campaigns",
            "/campaigns?page=2",
            "/files/my%20doc",
            "/q?x=a%20b",
            "/@evil.example",
            "/a/../b",
            "/files/my%20doc",
            "/q?x=a%20b",
            "/@evil.example",
        ] {
            assert!(safe_return_to(ok, &base).is_some(), "{ok}");
        }
        assert_eq!(
            safe_return_to("/a/../b?x=1", &base).as_deref(),
            Some("/b?x=1")
        );
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "https://evil.example",
            "/%2F%2Fevil.example",
            "/%2f/evil.example",
            "/%5Cevil.example",
            "\t//evil",
            "/\t/evil",
            "%09//evil",
            "/%09/evil",
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "///evil",
            "https://user:pass@login.esp.example/",
            "//user@evil.example",
            "http://login.esp.example/",
            "https://login.esp.example/x",
            "evil.example",
            "",
            " /x",
            "/_portcullis/logout",
            "/%0d%0aSet-Cookie:x",
        ] {
            assert_eq!(safe_return_to(bad, &base), None, "{bad:?}");
        }
    }
}
