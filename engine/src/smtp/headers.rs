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
    done: bool,
}

/// How far the current line matches `received` WSP* `:` (RFC 5322 §4.5.3 allows
/// white space before the colon in obsolete syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Field {
    /// This many letters of the name matched.
    #[default]
    Start,
    Name(usize),
    Space,
    Yes,
    No,
}

const NAME: &[u8] = b"received";

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
                self.field = match (self.field, c) {
                    (Field::Yes | Field::No, _) => break,
                    (Field::Start, _) if c.eq_ignore_ascii_case(&NAME[0]) => Field::Name(1),
                    (Field::Name(n), b' ' | b'\t') if n == NAME.len() => Field::Space,
                    (Field::Name(n), b':') if n == NAME.len() => Field::Yes,
                    (Field::Name(n), _) if n < NAME.len() && c.eq_ignore_ascii_case(&NAME[n]) => {
                        Field::Name(n + 1)
                    }
                    (Field::Space, b' ' | b'\t') => Field::Space,
                    (Field::Space, b':') => Field::Yes,
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
        if self.field == Field::Yes {
            self.facts.received += 1;
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

    /// Piece by piece, split anywhere, the scanner agrees with one whole scan.
    #[test]
    fn pieces_agree_with_the_whole() {
        let texts: [&[u8]; 6] = [
            b"Received: from a\r\n\tby b\r\nRECEIVED : from c\r\nReceived-SPF: pass\r\n\r\nReceived: x\r\n",
            "Subject: \u{fc}\r\nReceived:\r\n\r\n".as_bytes(),
            b"Received\r\nReceived \r\nReceived\r:x\nReceived\t\t:y\r\n",
            b"Received: x\r",
            b"Received\r",
            b"\r\nReceived: no\r\n",
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
