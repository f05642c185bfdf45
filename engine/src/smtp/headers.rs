//! What delivery and ingest need to know of a message's header section (RFC 5322
//! §2.2): how many `Received:` trace headers it has (the hop count, a loop's mark)
//! and whether any header has non-ASCII octets (RFC 6532 headers, which only an
//! SMTPUTF8 server may receive, RFC 6531 §3.2).

/// Facts of one header section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderFacts {
    /// `Received:` fields (RFC 5321 §4.4 trace headers).
    pub received: usize,
    /// Some octet of the header section is not ASCII.
    pub non_ascii: bool,
}

/// Scans the header section at the start of `text` (it ends at the first empty
/// line, or with the text). Only header lines are read: the body's length does not
/// matter unless the message has no body separator.
pub fn scan(text: &[u8]) -> HeaderFacts {
    let mut facts = HeaderFacts::default();
    let mut rest = text;
    while !rest.is_empty() {
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let line = &rest[..end];
        rest = &rest[end..];
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.is_empty() {
            break;
        }
        if !content.is_ascii() {
            facts.non_ascii = true;
        }
        if is_field(content, b"received") {
            facts.received += 1;
        }
    }
    facts
}

/// `line` starts the field `name` (compared without case; RFC 5322 §4.5.3 allows
/// white space before the colon in obsolete syntax).
fn is_field(line: &[u8], name: &[u8]) -> bool {
    line.len() > name.len()
        && line[..name.len()].eq_ignore_ascii_case(name)
        && line[name.len()..]
            .iter()
            .find(|&&c| c != b' ' && c != b'\t')
            == Some(&b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_received_fields_of_the_header_section_only() {
        let text = b"Received: from a\r\n\tby b\r\nRECEIVED : from c\r\nReceived-SPF: pass\r\n\
            X-Received: x\r\nSubject: Received: no\r\n\r\nReceived: in the body\r\n";
        assert_eq!(
            scan(text),
            HeaderFacts {
                received: 2,
                non_ascii: false
            }
        );
        assert_eq!(scan(b"").received, 0);
        assert_eq!(scan(b"\r\nReceived: x\r\n").received, 0);
        assert_eq!(scan(b"Received: x").received, 1, "no line end");
    }

    #[test]
    fn non_ascii_in_headers_but_not_in_the_body() {
        assert!(scan("From: Jöran <j@x.test>\r\n\r\nbody\r\n".as_bytes()).non_ascii);
        assert!(scan("Subject: a\r\n\tfolded ü\r\n\r\n".as_bytes()).non_ascii);
        assert!(!scan("Subject: a\r\n\r\nbödy\r\n".as_bytes()).non_ascii);
    }
}
