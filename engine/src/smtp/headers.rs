//! What delivery and ingest need to know of a message's header section (RFC 5322
//! §2.2): how many `Received:` trace headers it has (the hop count, a loop's mark),
//! whether any header has non-ASCII octets (RFC 6532 headers, which only an
//! SMTPUTF8 server may receive, RFC 6531 §3.2), and whether it has `Date:` and
//! `Message-ID:` (a submission server adds them when missing, RFC 6409 §8).

/// Facts of one header section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderFacts {
    /// `Received:` fields (RFC 5321 §4.4 trace headers).
    pub received: usize,
    /// Some octet of the header section is not ASCII.
    pub non_ascii: bool,
    pub date: bool,
    pub message_id: bool,
}

/// Scans the header section at the start of `text` (it ends at the first empty
/// line, or with the text). Only header lines are read: the body's length does not
/// matter unless the message has no body separator.
pub fn scan(text: &[u8]) -> HeaderFacts {
    let mut s = Scanner::default();
    s.feed(text);
    s.finish()
}

/// [`scan`] over text that comes in pieces (a body where the session received it),
/// without joining them.
#[derive(Debug, Default)]
pub struct Scanner {
    facts: HeaderFacts,
    /// Octets of the current line seen so far.
    line_len: usize,
    /// The last octet seen was a CR.
    cr: bool,
    field: Field,
    name: [u8; NAME_BYTES_MAX],
    done: bool,
}

/// The current line's field name so far: letters, then WSP* `:` (RFC 5322 §4.5.3
/// allows white space before the colon in obsolete syntax). Only names as long as
/// the longest one looked for are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Field {
    /// This many octets of the name were read (lower-cased into `name`).
    #[default]
    Start,
    Name(usize),
    /// White space after the name.
    Space(usize),
    /// The colon came: the name is `name[..n]`.
    Yes(usize),
    /// Not a field looked for (a continuation line, a longer name, …).
    No,
}

/// The longest name looked for: `message-id`.
const NAME_BYTES_MAX: usize = 10;

impl Scanner {
    /// Reads the next piece; false once the header section has ended.
    pub fn feed(&mut self, mut text: &[u8]) -> bool {
        while !self.done && !text.is_empty() {
            let nl = memchr::memchr(b'\n', text);
            let line = &text[..nl.unwrap_or(text.len())];
            if !line.is_ascii() {
                self.facts.non_ascii = true;
            }
            for &c in line {
                let n = match self.field {
                    Field::Start => 0,
                    Field::Name(n) => n,
                    _ => usize::MAX,
                };
                self.field = match (self.field, c) {
                    (Field::Yes(_) | Field::No, _) => break,
                    (Field::Start | Field::Name(_), b':') if n > 0 => Field::Yes(n),
                    (Field::Name(n), b' ' | b'\t') => Field::Space(n),
                    (Field::Start | Field::Name(_), _)
                        if n < NAME_BYTES_MAX && (c.is_ascii_alphanumeric() || c == b'-') =>
                    {
                        self.name[n] = c.to_ascii_lowercase();
                        Field::Name(n + 1)
                    }
                    (Field::Space(n), b' ' | b'\t') => Field::Space(n),
                    (Field::Space(n), b':') => Field::Yes(n),
                    _ => Field::No,
                };
            }
            if let Some(&last) = line.last() {
                self.cr = last == b'\r';
            }
            self.line_len += line.len();
            match nl {
                None => text = &[],
                Some(i) => {
                    // The line's content: without its LF and the CR before it.
                    let content = self.line_len - usize::from(self.cr);
                    self.end_line(content);
                    text = &text[i + 1..];
                }
            }
        }
        !self.done
    }

    fn end_line(&mut self, content: usize) {
        if content == 0 {
            self.done = true;
            return;
        }
        if let Field::Yes(n) = self.field {
            match &self.name[..n] {
                b"received" => self.facts.received += 1,
                b"date" => self.facts.date = true,
                b"message-id" => self.facts.message_id = true,
                _ => {}
            }
        }
        self.line_len = 0;
        self.cr = false;
        self.field = Field::Start;
    }

    /// The facts, the text being over.
    pub fn finish(mut self) -> HeaderFacts {
        if !self.done && self.line_len > 0 {
            let content = self.line_len - usize::from(self.cr);
            self.end_line(content);
        }
        self.facts
    }
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
                ..HeaderFacts::default()
            }
        );
        assert_eq!(scan(b"").received, 0);
        assert_eq!(scan(b"\r\nReceived: x\r\n").received, 0);
        assert_eq!(scan(b"Received: x").received, 1, "no line end");
    }

    #[test]
    fn date_and_message_id_of_the_header_section_only() {
        let f = scan(b"DATE : Mon, 1 Dec 2026\r\nMessage-Id: <a@b>\r\n\r\n");
        assert!(f.date && f.message_id);
        let f = scan(b"X-Date: a\r\nResent-Message-ID: <a@b>\r\nDated: x\r\n\r\nDate: body\r\n");
        assert!(!f.date && !f.message_id, "{f:?}");
        assert!(!scan(b"Subject: x\r\n Date: folded\r\n\r\n").date);
    }

    #[test]
    fn non_ascii_in_headers_but_not_in_the_body() {
        assert!(scan("From: Jöran <j@x.test>\r\n\r\nbody\r\n".as_bytes()).non_ascii);
        assert!(scan("Subject: a\r\n\tfolded ü\r\n\r\n".as_bytes()).non_ascii);
        assert!(!scan("Subject: a\r\n\r\nbödy\r\n".as_bytes()).non_ascii);
    }

    /// Piece by piece, split anywhere, the scanner agrees with one whole scan.
    #[test]
    fn pieces_agree_with_the_whole() {
        let texts: [&[u8]; 7] = [
            b"Received: from a\r\n\tby b\r\nRECEIVED : from c\r\nReceived-SPF: pass\r\n\r\nReceived: x\r\n",
            "Subject: \u{fc}\r\nReceived:\r\n\r\n".as_bytes(),
            b"Received\r\nReceived \r\nReceived\r:x\nReceived\t\t:y\r\n",
            b"Received: x\r",
            b"Received\r",
            b"\r\nReceived: no\r\n",
            b"Date: x\r\nMessage-ID : <y>\r\nReceived: z\r\n\r\n",
        ];
        for text in texts {
            let whole = scan(text);
            for cut in 0..=text.len() {
                let mut s = Scanner::default();
                s.feed(&text[..cut]);
                s.feed(&text[cut..]);
                assert_eq!(
                    s.finish(),
                    whole,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(text)
                );
            }
            let mut s = Scanner::default();
            for b in text.chunks(1) {
                s.feed(b);
            }
            assert_eq!(s.finish(), whole);
        }
        assert_eq!(scan(texts[0]).received, 2);
        assert_eq!(scan(texts[2]).received, 1);
        assert_eq!(scan(texts[3]).received, 1);
        assert_eq!(scan(texts[4]).received, 0);
    }
}
