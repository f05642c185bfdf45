//! IMAP string syntax (RFC 3501 §4.3, RFC 9051 §4.3) for the rendered ENVELOPE and
//! BODYSTRUCTURE: what is sent is exactly these bytes, so the choice between a quoted
//! string and a literal is made here, once, at delivery.

/// Appends `s` as an IMAP string: quoted when every byte may go in a quoted string
/// (7-bit, no CR, LF or NUL), else a literal. NUL is not allowed in a literal either
/// (only in literal8, which a FETCH of ENVELOPE cannot use): it is sent as 0x80, as
/// Dovecot does, so an 8-bit client sees a replacement and the octet count stays.
pub fn string(out: &mut Vec<u8>, s: &[u8]) {
    if s.iter()
        .all(|&b| (1..0x80).contains(&b) && b != b'\r' && b != b'\n')
    {
        out.push(b'"');
        for &b in s {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
        out.extend(s.iter().map(|&b| if b == 0 { 0x80 } else { b }));
    }
}

/// An nstring: NIL for `None`.
pub fn nstring(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// A header value as IMAP sends it: the bytes after the colon, leading white space
/// and the line end dropped, folding undone by removing the CR LF (the white space
/// after it stays), as RFC 5322 §2.2.3 unfolds.
pub fn unfold(raw: &[u8]) -> Vec<u8> {
    let start = raw
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(raw.len());
    let mut v: Vec<u8> = raw[start..]
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    while v.last().is_some_and(|&b| b == b' ' || b == b'\t') {
        v.pop();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_when_possible_literal_otherwise() {
        let s = |v: &[u8]| {
            let mut o = Vec::new();
            string(&mut o, v);
            o
        };
        assert_eq!(s(b"a \"b\" \\c"), b"\"a \\\"b\\\" \\\\c\"");
        assert_eq!(s("é".as_bytes()), b"{2}\r\n\xc3\xa9");
        assert_eq!(s(b"a\r\nb"), b"{4}\r\na\r\nb");
        assert_eq!(s(b"a\0"), b"{2}\r\na\x80");
        assert_eq!(s(b""), b"\"\"");
        assert_eq!(unfold(b" a\r\n\tb  \r\n"), b"a\tb");
    }
}
