//! Envelope paths (RFC 5321 §4.1.2) and SMTPUTF8 mailboxes (RFC 6531 §3.3).

/// A reverse or forward path, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mailbox {
    /// The mailbox as given, without angle brackets or source route; empty for `<>`.
    pub address: String,
    /// Byte index of the `@` in `address`, when there is a domain.
    at: Option<usize>,
}

impl Mailbox {
    pub fn null() -> Mailbox {
        Mailbox {
            address: String::new(),
            at: None,
        }
    }
    pub fn is_null(&self) -> bool {
        self.address.is_empty()
    }
    pub fn domain(&self) -> Option<&str> {
        self.at.map(|i| &self.address[i + 1..])
    }
    pub fn is_ascii(&self) -> bool {
        self.address.is_ascii()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not `<…>`, or not a mailbox inside.
    Syntax,
    /// Longer than RFC 5321 §4.5.3.1 allows.
    TooLong,
}

const LOCAL_PART_BYTES_MAX: usize = 64;
const DOMAIN_BYTES_MAX: usize = 255;
/// RFC 5321 §4.5.3.1.3: 256 octets including the angle brackets.
const PATH_BYTES_MAX: usize = 254;

/// Parses `<path>` at the start of `s` and returns it with the rest (the parameters).
///
/// `<>` is accepted only where `allow_null` (MAIL). `<Postmaster>` without a domain is
/// accepted only where `allow_postmaster` (RCPT, RFC 5321 §4.1.1.3). Non-ASCII is
/// accepted here; whether SMTPUTF8 was declared is the caller's check.
pub fn parse_path(
    s: &str,
    allow_null: bool,
    allow_postmaster: bool,
) -> Result<(Mailbox, &str), PathError> {
    let b = s.as_bytes();
    if b.first() != Some(&b'<') {
        return Err(PathError::Syntax);
    }
    let close = find_close(b).ok_or(PathError::Syntax)?;
    let inner = &s[1..close];
    let rest = &s[close + 1..];
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return Err(PathError::Syntax);
    }
    let rest = rest.trim_start_matches(' ');
    if inner.len() > PATH_BYTES_MAX {
        return Err(PathError::TooLong);
    }
    if inner.is_empty() {
        return if allow_null {
            Ok((Mailbox::null(), rest))
        } else {
            Err(PathError::Syntax)
        };
    }
    if allow_postmaster && inner.eq_ignore_ascii_case("postmaster") {
        return Ok((
            Mailbox {
                address: inner.to_string(),
                at: None,
            },
            rest,
        ));
    }
    // A source route (`@a,@b:`) is obsolete; RFC 5321 §4.1.1.3 says to accept and ignore it.
    let mailbox = match inner.starts_with('@') {
        true => {
            let colon = inner.find(':').ok_or(PathError::Syntax)?;
            for hop in inner[..colon].split(',') {
                let d = hop.strip_prefix('@').ok_or(PathError::Syntax)?;
                if !valid_domain(d) {
                    return Err(PathError::Syntax);
                }
            }
            &inner[colon + 1..]
        }
        false => inner,
    };
    let at = local_part_end(mailbox).ok_or(PathError::Syntax)?;
    if mailbox.as_bytes().get(at) != Some(&b'@') {
        return Err(PathError::Syntax);
    }
    let domain = &mailbox[at + 1..];
    if at > LOCAL_PART_BYTES_MAX || domain.len() > DOMAIN_BYTES_MAX {
        return Err(PathError::TooLong);
    }
    if !valid_domain(domain) {
        return Err(PathError::Syntax);
    }
    Ok((
        Mailbox {
            address: mailbox.to_string(),
            at: Some(at),
        },
        rest,
    ))
}

/// Index of the `>` that closes the path, skipping quoted strings.
fn find_close(b: &[u8]) -> Option<usize> {
    let mut i = 1;
    let mut quoted = false;
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Validates the local part at the start of `s`; returns the index just past it.
fn local_part_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.first() == Some(&b'"') {
        let mut i = 1;
        while i < b.len() {
            match b[i] {
                b'"' => return Some(i + 1),
                b'\\' => {
                    // quoted-pairSMTP: backslash then any printable ASCII.
                    if !matches!(b.get(i + 1), Some(32..=126)) {
                        return None;
                    }
                    i += 2;
                }
                32 | 33 | 35..=91 | 93..=126 | 128..=255 => i += 1,
                _ => return None,
            }
        }
        return None;
    }
    // Dot-string: atoms separated by single dots.
    let end = s.find('@').unwrap_or(s.len());
    let local = &s[..end];
    if local.is_empty() || local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return None;
    }
    local
        .bytes()
        .all(|c| c == b'.' || is_atext(c))
        .then_some(end)
}

fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c) || c >= 0x80
}

/// A domain name (LDH labels, or UTF-8 U-labels) or an address literal.
pub fn valid_domain(d: &str) -> bool {
    if d.is_empty() || d.len() > DOMAIN_BYTES_MAX {
        return false;
    }
    if let Some(lit) = d.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return valid_address_literal(lit);
    }
    d.split('.').all(|label| {
        let lb = label.as_bytes();
        !lb.is_empty()
            && lb.len() <= 63
            && lb[0] != b'-'
            && lb[lb.len() - 1] != b'-'
            && lb
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c >= 0x80)
    })
}

fn valid_address_literal(lit: &str) -> bool {
    if let Some(v6) = lit.strip_prefix("IPv6:") {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    lit.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Checks an xtext value (RFC 3461 §4): printable ASCII except `+` and `=`, with
/// `+XX` hex escapes.
pub fn valid_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                if !(b.get(i + 1).is_some_and(|c| c.is_ascii_hexdigit())
                    && b.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit()))
                {
                    return false;
                }
                i += 3;
            }
            33..=42 | 44..=60 | 62..=126 => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        parse_path(s, true, true).unwrap().0.address
    }

    #[test]
    fn accepts_rfc5321_paths() {
        assert_eq!(ok("<a@b.example>"), "a@b.example");
        assert_eq!(ok("<>"), "");
        assert_eq!(
            ok("<@relay.example,@r2.example:a@b.example>"),
            "a@b.example"
        );
        assert_eq!(
            ok("<\"quoted > local\"@b.example>"),
            "\"quoted > local\"@b.example"
        );
        assert_eq!(ok("<a@[127.0.0.1]>"), "a@[127.0.0.1]");
        assert_eq!(ok("<a@[IPv6:::1]>"), "a@[IPv6:::1]");
        assert_eq!(ok("<Postmaster>"), "Postmaster");
        assert_eq!(ok("<üser@exämple.test>"), "üser@exämple.test");
        let (m, rest) = parse_path("<a@b> SIZE=10 BODY=8BITMIME", false, false).unwrap();
        assert_eq!(m.domain(), Some("b"));
        assert_eq!(rest, "SIZE=10 BODY=8BITMIME");
    }

    #[test]
    fn rejects_bad_paths() {
        for bad in [
            "a@b",
            "<a@b",
            "<a>",
            "<@b>",
            "<a@>",
            "<a..b@c>",
            "<.a@c>",
            "<a@-c>",
            "<a@c..d>",
            "<a b@c>",
            "<a@[1.2.3]>",
            "<a@b>x",
            "<>",
            "<Postmaster>",
        ] {
            assert!(parse_path(bad, false, false).is_err(), "{bad}");
        }
        let long = format!("<{}@b.example>", "a".repeat(65));
        assert_eq!(
            parse_path(&long, false, false).unwrap_err(),
            PathError::TooLong
        );
    }

    #[test]
    fn xtext() {
        assert!(valid_xtext("QQ314159"));
        assert!(valid_xtext("rfc822+3Ba@b"));
        assert!(!valid_xtext("a+3"));
        assert!(!valid_xtext("a=b"));
        assert!(!valid_xtext("a b"));
    }
}
