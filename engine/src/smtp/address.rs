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
    /// A domain in brackets that is not an IPv4 or `IPv6:` address literal
    /// (RFC 5321 §4.1.3; general literals of other tags are not supported).
    Literal,
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
    if domain.starts_with('[') && !valid_domain(domain) {
        return Err(PathError::Literal);
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
    parse_address_literal(lit).is_some()
}

/// The address of a literal's content (between the brackets), RFC 5321 §4.1.3:
/// dotted-quad IPv4, or `IPv6:` (the tag in any case) and an IPv6 address.
fn parse_address_literal(lit: &str) -> Option<std::net::IpAddr> {
    match lit.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => lit[5..]
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(std::net::IpAddr::V6),
        _ => lit
            .parse::<std::net::Ipv4Addr>()
            .ok()
            .map(std::net::IpAddr::V4),
    }
}

/// A domain as delivery routes it: one spelling per destination, so that
/// `bücher.test` and `xn--bcher-kva.test`, or `[IPv6:0::1]` and `[IPv6:::1]`, are
/// the same destination (local domains, routes, rate limits, connection counts).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A host name: lower-case ASCII, internationalised labels as IDNA A-labels.
    Name(String),
    /// An address literal: delivered to that address, no DNS.
    Literal(std::net::IpAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainError {
    /// Not an address literal of RFC 5321 §4.1.3.
    Literal,
    /// A literal of an address mail cannot go to (unspecified, multicast, broadcast).
    Undeliverable,
    /// A non-ASCII name that has no IDNA A-label form (UTS 46), or a name that is not
    /// a host name.
    Name,
}

impl std::fmt::Display for DomainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DomainError::Literal => "not an address literal (RFC 5321 4.1.3)",
            DomainError::Undeliverable => "an address literal mail cannot be sent to",
            DomainError::Name => "not a valid (internationalised) domain name",
        })
    }
}

/// Parses a domain of a mailbox (without the `@`).
pub fn parse_domain(d: &str) -> Result<Domain, DomainError> {
    if let Some(lit) = d.strip_prefix('[') {
        let lit = lit.strip_suffix(']').ok_or(DomainError::Literal)?;
        // An IPv4-mapped IPv6 literal is that IPv4 address.
        let ip = parse_address_literal(lit)
            .ok_or(DomainError::Literal)?
            .to_canonical();
        let undeliverable = ip.is_unspecified()
            || ip.is_multicast()
            || ip == std::net::IpAddr::V4(std::net::Ipv4Addr::BROADCAST);
        return match undeliverable {
            true => Err(DomainError::Undeliverable),
            false => Ok(Domain::Literal(ip)),
        };
    }
    let d = d.strip_suffix('.').unwrap_or(d);
    let ascii = if d.is_ascii() {
        d.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(d).map_err(|_| DomainError::Name)?
    };
    match !ascii.starts_with('[') && ascii.is_ascii() && valid_domain(&ascii) {
        true => Ok(Domain::Name(ascii)),
        false => Err(DomainError::Name),
    }
}

impl std::fmt::Display for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Domain::Name(n) => f.write_str(n),
            Domain::Literal(std::net::IpAddr::V4(ip)) => write!(f, "[{ip}]"),
            Domain::Literal(std::net::IpAddr::V6(ip)) => write!(f, "[IPv6:{ip}]"),
        }
    }
}

/// The spelling routing uses for `d` (see `Domain`); a domain that does not parse
/// keeps its lower-case self, so it still groups with its own spelling.
pub fn domain_key(d: &str) -> String {
    parse_domain(d).map_or_else(|_| d.to_lowercase(), |d| d.to_string())
}

/// `d` is one of `local` (compared as `Domain`s: a literal is local only if it is
/// listed, e.g. `[192.0.2.1]`).
pub fn is_local_domain(local: &[String], d: &str) -> bool {
    let key = domain_key(d);
    local.iter().any(|l| domain_key(l) == key)
}

/// `address` with its domain as an A-label, for a server without SMTPUTF8; None
/// when the local part is not ASCII (nothing can carry it there) or the domain has
/// no A-label.
pub fn ascii_address(address: &str) -> Option<String> {
    if address.is_ascii() {
        return Some(address.to_string());
    }
    let (local, domain) = address.rsplit_once('@')?;
    if !local.is_ascii() {
        return None;
    }
    match parse_domain(domain).ok()? {
        Domain::Name(a) => Some(format!("{local}@{a}")),
        Domain::Literal(_) => None,
    }
}

/// Encodes `s` as xtext (RFC 3461 §4): `+`, `=`, controls, space and non-ASCII
/// bytes as `+XX`.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        match c {
            33..=42 | 44..=60 | 62..=126 => out.push(c as char),
            _ => out.push_str(&format!("+{c:02X}")),
        }
    }
    out
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
    fn address_literals_per_rfc5321() {
        let v4: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let v6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(parse_domain("[192.0.2.1]"), Ok(Domain::Literal(v4)));
        assert_eq!(parse_domain("[IPv6:2001:db8::1]"), Ok(Domain::Literal(v6)));
        assert_eq!(
            parse_domain("[ipv6:2001:DB8:0:0::1]"),
            Ok(Domain::Literal(v6))
        );
        assert_eq!(
            parse_domain("[IPv6:::ffff:192.0.2.1]"),
            Ok(Domain::Literal(v4))
        );
        assert_eq!(ok("<a@[ipv6:2001:db8::1]>"), "a@[ipv6:2001:db8::1]");
        assert_eq!(Domain::Literal(v6).to_string(), "[IPv6:2001:db8::1]");
        for bad in [
            "[1.2.3]",
            "[2001:db8::1]",
            "[IPv6:1.2.3.4]",
            "[x-tag:stuff]",
            "[]",
            "[IPv6:::1%eth0]",
        ] {
            assert_eq!(parse_domain(bad), Err(DomainError::Literal), "{bad}");
            assert_eq!(
                parse_path(&format!("<a@{bad}>"), false, false).unwrap_err(),
                PathError::Literal,
                "{bad}"
            );
        }
        for bad in [
            "[0.0.0.0]",
            "[224.0.0.1]",
            "[255.255.255.255]",
            "[IPv6:::]",
            "[IPv6:ff02::1]",
        ] {
            assert_eq!(parse_domain(bad), Err(DomainError::Undeliverable), "{bad}");
        }
        let local = vec!["[IPv6:2001:db8::1]".to_string(), "local.test".into()];
        assert!(is_local_domain(&local, "[IPv6:2001:DB8:0::1]"));
        assert!(!is_local_domain(&local, "[192.0.2.1]"));
        assert!(is_local_domain(&local, "LOCAL.test"));
    }

    #[test]
    fn idna_a_labels() {
        assert_eq!(
            parse_domain("bücher.test"),
            Ok(Domain::Name("xn--bcher-kva.test".into()))
        );
        assert_eq!(
            parse_domain("BÜCHER.Test"),
            parse_domain("xn--bcher-kva.test")
        );
        assert_eq!(domain_key("Bücher.test"), "xn--bcher-kva.test");
        assert!(is_local_domain(
            &["xn--bcher-kva.test".into()],
            "bücher.test"
        ));
        assert!(is_local_domain(
            &["bücher.test".into()],
            "XN--BCHER-KVA.test"
        ));
        assert_eq!(
            ascii_address("user@bücher.test").as_deref(),
            Some("user@xn--bcher-kva.test")
        );
        assert_eq!(ascii_address("a@b.test").as_deref(), Some("a@b.test"));
        assert_eq!(
            ascii_address("üser@bücher.test"),
            None,
            "no A-label for a local part"
        );
        assert_eq!(ascii_address("üser@b.test"), None);
        // Not valid IDNA (a label may not start with a combining mark).
        assert_eq!(parse_domain("\u{301}a.test"), Err(DomainError::Name));
    }

    #[test]
    fn xtext_encoding_is_valid_xtext_and_escapes_plus_and_equals() {
        assert_eq!(xtext_encode("a+b=c@d.test"), "a+2Bb+3Dc@d.test");
        assert!(valid_xtext(&xtext_encode("ü +=x")));
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
