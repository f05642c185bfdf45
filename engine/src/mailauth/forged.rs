//! `Authentication-Results:` fields that arrive claiming our authserv-id are forged
//! (RFC 8601 §5: a receiving MTA must remove or rename them): they are renamed
//! `X-Forged-Authentication-Results:`, so a reader sees only ringmail's own results
//! under the real name, and the forged text stays for whoever investigates.
//!
//! Renaming changes the stored text, so a message carrying one is stored from the
//! copy verification takes anyway (the only case where a body is copied into the
//! store); every other message is only scanned, in its header section.

/// The field name given to a forged field.
pub const RENAMED: &str = "X-Forged-Authentication-Results";

/// Whether the header section `head` has an `Authentication-Results:` field whose
/// authserv-id is `hostname`.
pub fn has_forged(head: &[u8], hostname: &str) -> bool {
    fields(head).any(|(name, value)| is_ours(name, value, hostname))
}

/// `text` (a message) with every forged field of its header section renamed; None
/// when it has none.
pub fn rename(text: &[u8], hostname: &str) -> Option<Vec<u8>> {
    let head_len = memchr::memmem::find(text, b"\r\n\r\n").map_or(text.len(), |at| at + 4);
    if !has_forged(&text[..head_len], hostname) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() + 64);
    let mut at = 0;
    for (name, value) in fields(&text[..head_len]) {
        let start = name.as_ptr() as usize - text.as_ptr() as usize;
        if is_ours(name, value, hostname) {
            out.extend_from_slice(&text[at..start]);
            out.extend_from_slice(RENAMED.as_bytes());
            at = start + name.len();
        }
    }
    out.extend_from_slice(&text[at..]);
    Some(out)
}

fn is_ours(name: &[u8], value: &[u8], hostname: &str) -> bool {
    if !name.eq_ignore_ascii_case(b"Authentication-Results") {
        return false;
    }
    // authserv-id: the first token of the value (RFC 8601 §2.2), before `;` or
    // white space (a version may follow it).
    let value = String::from_utf8_lossy(value);
    let id = value
        .trim_start()
        .split(|c: char| c == ';' || c.is_whitespace())
        .next()
        .unwrap_or("");
    id.eq_ignore_ascii_case(hostname)
}

/// The fields of a header section: (name, value with its folding), in order.
fn fields(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = head;
    std::iter::from_fn(move || loop {
        if rest.is_empty() || rest.starts_with(b"\r\n") {
            return None;
        }
        // One field: through a line end not followed by white space (folding).
        let mut end = 0;
        loop {
            match memchr::memchr(b'\n', &rest[end..]) {
                Some(i) => {
                    end += i + 1;
                    if !matches!(rest.get(end), Some(b' ' | b'\t')) {
                        break;
                    }
                }
                None => {
                    end = rest.len();
                    break;
                }
            }
        }
        let field = &rest[..end];
        rest = &rest[end..];
        if let Some(colon) = memchr::memchr(b':', field) {
            let name = &field[..colon];
            let name = name.strip_suffix(b" ").unwrap_or(name);
            return Some((name, &field[colon + 1..]));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_results_claiming_our_name_are_renamed() {
        let text = b"Authentication-Results: mx.example.test;\r\n\tspf=pass smtp.mailfrom=a@b\r\nAuthentication-Results: other.test; dkim=pass\r\nauthentication-results:  MX.example.test 1; dmarc=pass\r\nSubject: Authentication-Results: mx.example.test\r\n\r\nAuthentication-Results: mx.example.test; body\r\n";
        let head_len = memchr::memmem::find(text, b"\r\n\r\n").unwrap() + 4;
        assert!(has_forged(&text[..head_len], "mx.example.test"));
        assert!(!has_forged(&text[..head_len], "elsewhere.test"));
        let renamed = rename(text, "mx.example.test").unwrap();
        let got = String::from_utf8(renamed).unwrap();
        assert_eq!(
            got,
            "X-Forged-Authentication-Results: mx.example.test;\r\n\tspf=pass smtp.mailfrom=a@b\r\nAuthentication-Results: other.test; dkim=pass\r\nX-Forged-Authentication-Results:  MX.example.test 1; dmarc=pass\r\nSubject: Authentication-Results: mx.example.test\r\n\r\nAuthentication-Results: mx.example.test; body\r\n"
        );
    }
}
