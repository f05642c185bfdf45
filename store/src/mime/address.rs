//! Address lists of the ENVELOPE (RFC 3501 §7.4.2): (name adl mailbox host) per
//! address, group syntax as a start (NIL NIL "group" NIL) and an end (NIL NIL NIL NIL).
//!
//! Why not mail-parser's addresses: it decodes RFC 2047 encoded-words in display
//! names, and IMAP sends them as they are in the header. This is a lenient RFC 5322
//! tokenizer over the raw value, in the manner of Dovecot's: it never fails, junk is
//! skipped, a missing domain or mailbox is sent as Dovecot sends it.

/// One element of an envelope address list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Address {
    pub name: Option<Vec<u8>>,
    pub adl: Option<Vec<u8>>,
    pub mailbox: Option<Vec<u8>>,
    pub host: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// An atom (raw) or a quoted string (unquoted), with whether white space or a
    /// comment came before it.
    Word(Vec<u8>, bool),
    Special(u8, bool),
    Comment(Vec<u8>),
}

fn is_special(b: u8) -> bool {
    matches!(
        b,
        b'(' | b')' | b'<' | b'>' | b'[' | b']' | b':' | b';' | b'@' | b'\\' | b',' | b'.' | b'"'
    )
}

fn tokenize(s: &[u8]) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut ws = false;
    while i < s.len() {
        let b = s[i];
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                ws = true;
                i += 1;
            }
            b'(' => {
                let mut depth = 0usize;
                let mut c = Vec::new();
                while i < s.len() {
                    let b = s[i];
                    i += 1;
                    match b {
                        b'\\' if i < s.len() => {
                            c.push(s[i]);
                            i += 1;
                        }
                        b'(' => {
                            if depth > 0 {
                                c.push(b);
                            }
                            depth += 1;
                        }
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                            c.push(b);
                        }
                        _ => c.push(b),
                    }
                }
                out.push(Tok::Comment(c));
                ws = true;
            }
            b'"' => {
                i += 1;
                let mut w = Vec::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    if s[i] != b'\r' && s[i] != b'\n' {
                        w.push(s[i]);
                    }
                    i += 1;
                }
                i += 1;
                out.push(Tok::Word(w, ws));
                ws = false;
            }
            b'[' => {
                let start = i;
                while i < s.len() && s[i] != b']' {
                    i += 1;
                }
                i = (i + 1).min(s.len());
                out.push(Tok::Word(s[start..i].to_vec(), ws));
                ws = false;
            }
            _ if is_special(b) => {
                out.push(Tok::Special(b, ws));
                ws = false;
                i += 1;
            }
            _ => {
                let start = i;
                while i < s.len() && !is_special(s[i]) && !b" \t\r\n".contains(&s[i]) {
                    i += 1;
                }
                out.push(Tok::Word(s[start..i].to_vec(), ws));
                ws = false;
            }
        }
    }
    out
}

struct Parser {
    toks: Vec<Tok>,
    i: usize,
    comment: Option<Vec<u8>>,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i)
    }

    fn special(&self) -> Option<u8> {
        match self.peek() {
            Some(Tok::Special(c, _)) => Some(*c),
            _ => None,
        }
    }

    /// Words and dots up to the next other special: a phrase (spaces where the
    /// header had white space) and the same joined tight (a local part or domain).
    fn words(&mut self) -> (Vec<u8>, Vec<u8>, bool) {
        let (mut spaced, mut tight, mut any) = (Vec::new(), Vec::new(), false);
        loop {
            let (w, ws): (&[u8], bool) = match self.toks.get(self.i) {
                Some(Tok::Word(w, ws)) => (w, *ws),
                Some(Tok::Special(b'.', ws)) => (b".", *ws),
                Some(Tok::Comment(c)) => {
                    if self.comment.is_none() {
                        self.comment = Some(c.clone());
                    }
                    self.i += 1;
                    continue;
                }
                _ => break,
            };
            if ws && !spaced.is_empty() {
                spaced.push(b' ');
            }
            spaced.extend_from_slice(w);
            tight.extend_from_slice(w);
            any = true;
            self.i += 1;
        }
        (spaced, tight, any)
    }
}

const MISSING_MAILBOX: &[u8] = b"MISSING_MAILBOX";
const MISSING_DOMAIN: &[u8] = b"MISSING_DOMAIN";

/// Parses a raw (unfolded) address header value.
pub fn parse(raw: &[u8]) -> Vec<Address> {
    let mut p = Parser {
        toks: tokenize(raw),
        i: 0,
        comment: None,
    };
    let mut out = Vec::new();
    let mut in_group = false;
    while p.i < p.toks.len() {
        let began = p.i;
        p.comment = None;
        let (phrase, tight, any) = p.words();
        let mut addr = None;
        match p.special() {
            Some(b':') if !in_group => {
                p.i += 1;
                out.push(Address {
                    mailbox: Some(phrase),
                    ..Address::default()
                });
                in_group = true;
                continue;
            }
            Some(b'<') => {
                p.i += 1;
                let mut adl = None;
                if p.special() == Some(b'@') {
                    let start = p.i;
                    while p.i < p.toks.len() && !matches!(p.special(), Some(b':') | Some(b'>')) {
                        p.i += 1;
                    }
                    let mut route = Vec::new();
                    for t in &p.toks[start..p.i] {
                        match t {
                            Tok::Word(w, _) => route.extend_from_slice(w),
                            Tok::Special(c, _) => route.push(*c),
                            Tok::Comment(_) => {}
                        }
                    }
                    if p.special() == Some(b':') {
                        p.i += 1;
                        adl = Some(route);
                    }
                }
                let (_, local, _) = p.words();
                let mut host = None;
                if p.special() == Some(b'@') {
                    p.i += 1;
                    let (_, d, _) = p.words();
                    host = Some(d);
                }
                if p.special() == Some(b'>') {
                    p.i += 1;
                }
                let name = (!phrase.is_empty()).then_some(phrase);
                addr = Some(Address {
                    name,
                    adl,
                    mailbox: Some(if local.is_empty() {
                        MISSING_MAILBOX.to_vec()
                    } else {
                        local
                    }),
                    host: Some(match host {
                        Some(h) if !h.is_empty() => h,
                        _ => MISSING_DOMAIN.to_vec(),
                    }),
                });
            }
            Some(b'@') => {
                p.i += 1;
                let (_, d, _) = p.words();
                addr = Some(Address {
                    name: None,
                    adl: None,
                    mailbox: Some(if tight.is_empty() {
                        MISSING_MAILBOX.to_vec()
                    } else {
                        tight
                    }),
                    host: Some(if d.is_empty() {
                        MISSING_DOMAIN.to_vec()
                    } else {
                        d
                    }),
                });
            }
            _ if any => {
                addr = Some(Address {
                    name: None,
                    adl: None,
                    mailbox: Some(tight),
                    host: Some(MISSING_DOMAIN.to_vec()),
                });
            }
            _ => {}
        }
        // Whatever is left of this address up to its comma is junk (a trailing
        // comment still names an address that has no display name).
        while let Some(t) = p.peek() {
            match t {
                Tok::Special(b',', _) | Tok::Special(b';', _) => break,
                Tok::Special(b':', _) if !in_group && addr.is_none() => break,
                Tok::Comment(c) if p.comment.is_none() => p.comment = Some(c.clone()),
                _ => {}
            }
            p.i += 1;
        }
        if let Some(mut a) = addr {
            if a.name.is_none() {
                a.name = p.comment.take().filter(|c| !c.is_empty());
            }
            out.push(a);
        }
        match p.special() {
            Some(b';') => {
                p.i += 1;
                if in_group {
                    out.push(Address::default());
                    in_group = false;
                }
            }
            Some(b',') => p.i += 1,
            _ => {}
        }
        if p.i == began {
            // Never spin on a token no rule takes.
            p.i += 1;
        }
    }
    if in_group {
        out.push(Address::default());
    }
    out
}
