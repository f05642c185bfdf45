//! What IMAP needs from a message's MIME structure, computed once at delivery
//! (`analyze`) and kept in the home shard's cache file (`crate::mailcache`): the
//! ENVELOPE, BODY and BODYSTRUCTURE as the bytes they are sent as, and the part table
//! (where every part's MIME header and body are in the stored bytes), so a FETCH of
//! `BODY[1.2]`, `BODY[1.2.MIME]`, `BODY[HEADER]`, `BODY[TEXT]` or `BODY[2.HEADER]` is
//! a slice of the message, never a parse.
//!
//! mail-parser finds the structure (boundaries, nesting, parameters, RFC 2231); the
//! IMAP rendering is ours. What IMAP sends as strings (ENVELOPE fields, Content-ID,
//! Content-Description, Content-Location, Content-MD5) are the raw header values,
//! unfolded, encoded-words left as they are (RFC 3501 §7.4.2); parameters are
//! mail-parser's (RFC 2231 continuations joined and decoded).
//!
//! Malformed mail never panics and still gets an answer: a multipart without a usable
//! boundary is a text/plain leaf, a multipart without parts gets one empty text/plain
//! part (both as Dovecot answers), a message/rfc822 with a transfer encoding other
//! than the identity ones is a leaf (its parts are not in the stored bytes), and
//! nesting deeper than [`NESTING_MAX`] is a leaf.
//!
//! Offsets are relative to the message as stored (trace prefix + body). The message
//! a mailbox serves has a per-entry prefix in front (docs/mailboxes.md, "The message
//! as a mailbox serves it"): [`Meta::shift`] moves every offset behind it and makes
//! the top-level header (and part 1 of a single-part message) begin at 0, so that
//! `BODY[HEADER]` and RFC822.SIZE count the prefix lines.

mod address;
pub mod imap;
#[cfg(test)]
mod tests;

use crate::codec::{self, Reader};
use mail_parser::{Encoding, Header, HeaderValue, Message, MessageParser, MessagePart, PartType};

/// Parts nested deeper than this (multiparts and message/rfc822 together) are
/// rendered as leaves: it bounds the recursion, and Dovecot stops at 100 too.
pub const NESTING_MAX: usize = 100;

/// Bytes `start..start + len` of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: u64,
    pub len: u64,
}

impl Span {
    fn new(start: u64, end: u64) -> Span {
        Span {
            start,
            len: end.saturating_sub(start),
        }
    }

    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The range to slice the message with.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..self.end() as usize
    }
}

/// One row of the part table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The IMAP part number, `[1, 2]` for `1.2` (RFC 3501 §6.4.5).
    pub number: Vec<u32>,
    /// `BODY[n.MIME]`: the part's MIME header, its blank line included. For part 1 of
    /// a single-part message (or of a message/rfc822 whose body is single-part) this
    /// is that message's header.
    pub header: Span,
    /// `BODY[n]`: the part's body as stored (still transfer-encoded).
    pub body: Span,
    /// For a message/rfc822 part: `BODY[n.HEADER]` and `BODY[n.TEXT]`.
    pub message: Option<(Span, Span)>,
}

/// The IMAP view of one message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// RFC822.SIZE.
    pub size: u64,
    /// `BODY[HEADER]`, blank line included.
    pub header: Span,
    /// `BODY[TEXT]`.
    pub text: Span,
    /// The ENVELOPE, a parenthesised list, as sent.
    pub envelope: Vec<u8>,
    /// BODY (non-extensible), as sent.
    pub body: Vec<u8>,
    /// BODYSTRUCTURE, as sent.
    pub bodystructure: Vec<u8>,
    /// Every part, in part-number order (depth first).
    pub parts: Vec<Part>,
}

const VERSION: u8 = 1;

impl Meta {
    /// The part `number` (`[1, 2]` for `1.2`), if the message has it.
    pub fn part(&self, number: &[u32]) -> Option<&Part> {
        self.parts
            .binary_search_by(|p| p.number.as_slice().cmp(number))
            .ok()
            .map(|i| &self.parts[i])
    }

    /// Moves every offset behind a served prefix of `prefix_len` bytes, which
    /// belongs to the top-level header. Apply once to the meta of the stored
    /// message (the cache may hold either; the caller knows which).
    pub fn shift(&mut self, prefix_len: u64) {
        let top = self.header;
        let shift = |s: &mut Span| {
            if *s == top {
                s.len += prefix_len;
            } else {
                s.start += prefix_len;
            }
        };
        shift(&mut self.header);
        shift(&mut self.text);
        for p in &mut self.parts {
            shift(&mut p.header);
            shift(&mut p.body);
            if let Some((h, t)) = &mut p.message {
                shift(h);
                shift(t);
            }
        }
        self.size += prefix_len;
    }

    /// [`Meta::shift`], by value.
    pub fn shifted(mut self, prefix_len: u64) -> Meta {
        self.shift(prefix_len);
        self
    }

    /// Appends the versioned encoding (what the cache file holds).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.extend_from_slice(&self.size.to_le_bytes());
        let span = |out: &mut Vec<u8>, s: &Span| {
            out.extend_from_slice(&s.start.to_le_bytes());
            out.extend_from_slice(&s.len.to_le_bytes());
        };
        span(out, &self.header);
        span(out, &self.text);
        codec::put_bytes(out, &self.envelope);
        codec::put_bytes(out, &self.body);
        codec::put_bytes(out, &self.bodystructure);
        out.extend_from_slice(&(self.parts.len() as u32).to_le_bytes());
        for p in &self.parts {
            out.extend_from_slice(&(p.number.len() as u32).to_le_bytes());
            for n in &p.number {
                out.extend_from_slice(&n.to_le_bytes());
            }
            span(out, &p.header);
            span(out, &p.body);
            match &p.message {
                None => out.push(0),
                Some((h, t)) => {
                    out.push(1);
                    span(out, h);
                    span(out, t);
                }
            }
        }
    }

    /// Decodes [`Meta::encode`]'s bytes. Every span must lie inside the message
    /// (`size`), so a caller can slice with them without checking again.
    pub fn decode(buf: &[u8]) -> Result<Meta, &'static str> {
        let mut r = Reader::new(buf, "mime meta truncated");
        if r.u8()? != VERSION {
            return Err("unknown mime meta version");
        }
        let size = r.u64()?;
        let span = |r: &mut Reader| -> Result<Span, &'static str> {
            let s = Span {
                start: r.u64()?,
                len: r.u64()?,
            };
            match s.start.checked_add(s.len) {
                Some(end) if end <= size => Ok(s),
                _ => Err("mime meta span outside the message"),
            }
        };
        let header = span(&mut r)?;
        let text = span(&mut r)?;
        let envelope = r.bytes()?.to_vec();
        let body = r.bytes()?.to_vec();
        let bodystructure = r.bytes()?.to_vec();
        let n = r.u32()? as usize;
        // Each part takes at least 37 bytes: a count past that is a lie.
        if n > buf.len() / 37 + 1 {
            return Err("mime meta part count too large");
        }
        let mut parts = Vec::with_capacity(n);
        for _ in 0..n {
            let depth = r.u32()? as usize;
            if depth > buf.len() / 4 {
                return Err("mime meta part number too long");
            }
            let mut number = Vec::with_capacity(depth);
            for _ in 0..depth {
                number.push(r.u32()?);
            }
            let header = span(&mut r)?;
            let body = span(&mut r)?;
            let message = match r.u8()? {
                0 => None,
                1 => Some((span(&mut r)?, span(&mut r)?)),
                _ => return Err("bad mime meta tag"),
            };
            parts.push(Part {
                number,
                header,
                body,
                message,
            });
        }
        if !r.at_end() {
            return Err("trailing bytes after mime meta");
        }
        if !parts.windows(2).all(|w| w[0].number < w[1].number) {
            return Err("mime meta parts out of order");
        }
        Ok(Meta {
            size,
            header,
            text,
            envelope,
            body,
            bodystructure,
            parts,
        })
    }
}

/// Parses `message` (the whole message as stored: header then body) once.
pub fn analyze(message: &[u8]) -> Meta {
    // mail-parser decodes every body it parses (a text part into a `String`, lossy
    // UTF-8): measured, that and the line count were a fifth of the CPU of local
    // delivery at 100 KiB (bench/RESULTS.md, "Local delivery: the structure from the
    // header"). A message whose top-level type is neither multipart nor message/* is
    // one leaf: its header, its body's length and lines are the whole structure, so
    // only the header section is parsed (mail-parser's header parser sees the same
    // bytes either way: its header ends at the first empty line or before).
    let cut = header_end(message);
    if cut < message.len() {
        let head = MessageParser::new().parse(&message[..cut]);
        if head
            .as_ref()
            .is_some_and(|m| m.parts.first().is_some_and(|root| !has_parts(root)))
        {
            return analyze_parsed(message, head);
        }
    }
    analyze_parsed(message, MessageParser::new().parse(message))
}

/// Where the header section ends at the latest: after the first empty line.
fn header_end(message: &[u8]) -> usize {
    if message.starts_with(b"\n") {
        return 1;
    }
    if message.starts_with(b"\r\n") {
        return 2;
    }
    // The LF-only form is looked for only before the CRLF one: a CRLF message has
    // none, and its whole body would be searched.
    let crlf = memchr::memmem::find(message, b"\n\r\n").map_or(message.len(), |i| i + 3);
    memchr::memmem::find(&message[..crlf], b"\n\n").map_or(crlf, |i| i + 2)
}

/// Whether a part may have parts of its own: any of its Content-Type fields (mail-parser
/// goes by the last, the rendering by the first) is multipart/* or message/*.
fn has_parts(part: &MessagePart) -> bool {
    part.headers.iter().any(|h| match &h.value {
        HeaderValue::ContentType(ct) if h.name.as_str().eq_ignore_ascii_case("Content-Type") => {
            ct.ctype().eq_ignore_ascii_case("multipart")
                || ct.ctype().eq_ignore_ascii_case("message")
        }
        _ => false,
    })
}

/// `analyze` over mail-parser's parse of `message` (or of its header section alone).
fn analyze_parsed(message: &[u8], parsed: Option<Message>) -> Meta {
    let len = message.len() as u64;
    let mut ctx = Ctx {
        raw: message,
        parts: Vec::new(),
    };
    let (header, text, envelope, body, bodystructure) = match &parsed {
        Some(m) if !m.parts.is_empty() => {
            let root = &m.parts[0];
            let body_start = ctx.clamp(root.offset_body as u64, 0);
            let header = Span::new(0, body_start);
            let text = Span::new(body_start, len);
            let envelope = ctx.envelope(&root.headers);
            let mut number = Vec::new();
            let (body, bs) = ctx.message(m, header, len, &mut number, 0);
            (header, text, envelope, body, bs)
        }
        _ => {
            // No header line at all: all body, text/plain.
            let text = Span::new(0, len);
            let header = Span::new(0, 0);
            ctx.parts.push(Part {
                number: vec![1],
                header,
                body: text,
                message: None,
            });
            let envelope = ctx.envelope(&[]);
            let (b, bs) = ctx.leaf(None, &[], text, false);
            (header, text, envelope, b, bs)
        }
    };
    Meta {
        size: len,
        header,
        text,
        envelope,
        body,
        bodystructure,
        parts: ctx.parts,
    }
}

struct Ctx<'a> {
    raw: &'a [u8],
    parts: Vec<Part>,
}

/// A parsed Content-Type or Content-Disposition.
struct Ct<'a> {
    ty: &'a str,
    subtype: Option<&'a str>,
    params: &'a [mail_parser::Attribute<'a>],
}

fn content<'a>(headers: &'a [Header<'a>], name: &str) -> Option<Ct<'a>> {
    headers
        .iter()
        .find(|h| h.name.as_str().eq_ignore_ascii_case(name))
        .and_then(|h| match &h.value {
            HeaderValue::ContentType(ct) => Some(Ct {
                ty: ct.ctype(),
                subtype: ct.subtype(),
                params: ct.attributes().unwrap_or(&[]),
            }),
            _ => None,
        })
}

impl Ctx<'_> {
    /// `v` as an offset into the message, at least `min`.
    fn clamp(&self, v: u64, min: u64) -> u64 {
        v.min(self.raw.len() as u64)
            .max(min.min(self.raw.len() as u64))
    }

    /// The first `name` header's raw value, unfolded.
    fn raw_value(&self, headers: &[Header], name: &str) -> Option<Vec<u8>> {
        let h = headers
            .iter()
            .find(|h| h.name.as_str().eq_ignore_ascii_case(name))?;
        let end = self.clamp(h.offset_end as u64, 0) as usize;
        let start = self.clamp(h.offset_start as u64, 0).min(end as u64) as usize;
        Some(imap::unfold(&self.raw[start..end]))
    }

    fn envelope(&self, headers: &[Header]) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(b'(');
        imap::nstring(&mut out, self.raw_value(headers, "Date").as_deref());
        out.push(b' ');
        imap::nstring(&mut out, self.raw_value(headers, "Subject").as_deref());
        let list = |name: &str| {
            self.raw_value(headers, name)
                .map(|v| address::parse(&v))
                .unwrap_or_default()
        };
        let from = list("From");
        let mut sender = list("Sender");
        if sender.is_empty() {
            sender = from.clone();
        }
        let mut reply_to = list("Reply-To");
        if reply_to.is_empty() {
            reply_to = from.clone();
        }
        for l in [
            &from,
            &sender,
            &reply_to,
            &list("To"),
            &list("Cc"),
            &list("Bcc"),
        ] {
            out.push(b' ');
            addresses(&mut out, l);
        }
        out.push(b' ');
        imap::nstring(&mut out, self.raw_value(headers, "In-Reply-To").as_deref());
        out.push(b' ');
        imap::nstring(&mut out, self.raw_value(headers, "Message-ID").as_deref());
        out.push(b')');
        out
    }

    /// Renders the message `m` whose header is `header` and which ends at `end`,
    /// adding its parts under `number` (the message/rfc822 part's number, or none at
    /// the top). Returns (BODY, BODYSTRUCTURE) of its body.
    fn message(
        &mut self,
        m: &Message,
        header: Span,
        end: u64,
        number: &mut Vec<u32>,
        depth: usize,
    ) -> (Vec<u8>, Vec<u8>) {
        let root = &m.parts[0];
        if self.is_multipart(root, depth) {
            self.node(m, 0, end, number, depth, false)
        } else {
            number.push(1);
            let at = self.parts.len();
            let r = self.node(m, 0, end, number, depth, true);
            // Part 1 of a single-part message: its MIME header is the message header.
            self.parts[at].header = header;
            number.pop();
            r
        }
    }

    /// A multipart by its Content-Type, whether or not its boundary was found:
    /// one without parts gets an empty one, as Dovecot answers.
    fn is_multipart(&self, part: &MessagePart, depth: usize) -> bool {
        depth < NESTING_MAX
            && content(&part.headers, "Content-Type")
                .is_some_and(|c| c.ty.eq_ignore_ascii_case("multipart"))
    }

    /// Renders part `id` of `m`; `row` adds it to the part table as `number`.
    fn node(
        &mut self,
        m: &Message,
        id: usize,
        end: u64,
        number: &mut Vec<u32>,
        depth: usize,
        row: bool,
    ) -> (Vec<u8>, Vec<u8>) {
        let part = &m.parts[id];
        let hstart = self.clamp(part.offset_header as u64, 0);
        let bstart = self.clamp(part.offset_body as u64, hstart);
        let bend = self.clamp(end, bstart);
        let body_span = Span::new(bstart, bend);
        let at = self.parts.len();
        if row {
            self.parts.push(Part {
                number: number.clone(),
                header: Span::new(hstart, bstart),
                body: body_span,
                message: None,
            });
        }
        let ct = content(&part.headers, "Content-Type");
        let children: &[u32] = match &part.body {
            PartType::Multipart(c) => c,
            _ => &[],
        };
        match &part.body {
            _ if self.is_multipart(part, depth) => {
                let (mut body, mut bs) = (vec![b'('], vec![b'(']);
                let mut any = false;
                for (k, &cid) in children.iter().enumerate() {
                    let Some(child) = m.parts.get(cid as usize) else {
                        continue;
                    };
                    if cid as usize <= id {
                        continue; // never loop back up
                    }
                    number.push(k as u32 + 1);
                    let cend = child.offset_end as u64;
                    let (b, s) = self.node(m, cid as usize, cend, number, depth + 1, true);
                    number.pop();
                    body.extend_from_slice(&b);
                    bs.extend_from_slice(&s);
                    any = true;
                }
                if !any {
                    // A multipart needs a part: Dovecot's empty text/plain.
                    number.push(1);
                    self.parts.push(Part {
                        number: number.clone(),
                        header: Span::new(bend, bend),
                        body: Span::new(bend, bend),
                        message: None,
                    });
                    number.pop();
                    let empty =
                        b"(\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0";
                    body.extend_from_slice(empty);
                    body.push(b')');
                    bs.extend_from_slice(empty);
                    bs.extend_from_slice(b" NIL NIL NIL NIL)");
                }
                let subtype = ct.as_ref().and_then(|c| c.subtype).unwrap_or("mixed");
                for out in [&mut body, &mut bs] {
                    out.push(b' ');
                    imap::string(out, subtype.as_bytes());
                }
                bs.push(b' ');
                params(&mut bs, ct.as_ref().map(|c| c.params).unwrap_or(&[]));
                self.extension(&mut bs, &part.headers);
                body.push(b')');
                bs.push(b')');
                (body, bs)
            }
            PartType::Message(nested)
                if !nested.parts.is_empty()
                    && part.encoding == Encoding::None
                    && depth < NESTING_MAX =>
            {
                let nroot = &nested.parts[0];
                let nbody = self.clamp(nroot.offset_body as u64, bstart).min(bend);
                let nheader = Span::new(bstart, nbody);
                if row {
                    self.parts[at].message = Some((nheader, Span::new(nbody, bend)));
                }
                let envelope = self.envelope(&nroot.headers);
                let (nb, nbs) = self.message(nested, nheader, bend, number, depth + 1);
                let (ty, sub) = match &ct {
                    Some(c) => (c.ty, c.subtype.unwrap_or("rfc822")),
                    None => ("message", "rfc822"),
                };
                let mut fields = Vec::new();
                imap::string(&mut fields, ty.as_bytes());
                fields.push(b' ');
                imap::string(&mut fields, sub.as_bytes());
                fields.push(b' ');
                params(&mut fields, ct.as_ref().map(|c| c.params).unwrap_or(&[]));
                self.fields(&mut fields, &part.headers, body_span);
                let lines = self.lines(body_span);
                let render = |inner: &[u8]| {
                    let mut out = vec![b'('];
                    out.extend_from_slice(&fields);
                    out.push(b' ');
                    out.extend_from_slice(&envelope);
                    out.push(b' ');
                    out.extend_from_slice(inner);
                    out.extend_from_slice(format!(" {lines}").as_bytes());
                    out
                };
                let mut body = render(&nb);
                let mut bs = render(&nbs);
                self.leaf_extension(&mut bs, &part.headers);
                body.push(b')');
                bs.push(b')');
                (body, bs)
            }
            _ => {
                let message_default = matches!(part.body, PartType::Message(_));
                self.leaf(ct, &part.headers, body_span, message_default)
            }
        }
    }

    /// A leaf: basic or text. A multipart or message/rfc822 that could not be
    /// taken apart is text/plain (or, when encoded, the type it says).
    fn leaf(
        &self,
        ct: Option<Ct>,
        headers: &[Header],
        span: Span,
        message_default: bool,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut out = vec![b'('];
        let ct = ct.filter(|c| !c.ty.eq_ignore_ascii_case("multipart"));
        let text = match &ct {
            Some(c) => {
                imap::string(&mut out, c.ty.as_bytes());
                out.push(b' ');
                let sub = c.subtype.unwrap_or(if c.ty.eq_ignore_ascii_case("text") {
                    "plain"
                } else {
                    "octet-stream"
                });
                imap::string(&mut out, sub.as_bytes());
                out.push(b' ');
                let text = c.ty.eq_ignore_ascii_case("text");
                if text {
                    text_params(&mut out, c.params);
                } else {
                    params(&mut out, c.params);
                }
                text
            }
            None if message_default => {
                out.extend_from_slice(b"\"message\" \"rfc822\" NIL");
                false
            }
            None => {
                out.extend_from_slice(b"\"text\" \"plain\" (\"charset\" \"us-ascii\")");
                true
            }
        };
        self.fields(&mut out, headers, span);
        if text {
            out.extend_from_slice(format!(" {}", self.lines(span)).as_bytes());
        }
        let mut bs = out.clone();
        self.leaf_extension(&mut bs, headers);
        out.push(b')');
        bs.push(b')');
        (out, bs)
    }

    /// body-fld-id, body-fld-desc, body-fld-enc, body-fld-octets.
    fn fields(&self, out: &mut Vec<u8>, headers: &[Header], span: Span) {
        out.push(b' ');
        imap::nstring(out, self.raw_value(headers, "Content-ID").as_deref());
        out.push(b' ');
        imap::nstring(
            out,
            self.raw_value(headers, "Content-Description").as_deref(),
        );
        out.push(b' ');
        let enc = self
            .raw_value(headers, "Content-Transfer-Encoding")
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| b"7bit".to_vec());
        imap::string(out, &enc);
        out.extend_from_slice(format!(" {}", span.len).as_bytes());
    }

    fn lines(&self, span: Span) -> usize {
        memchr::memchr_iter(b'\n', &self.raw[span.range()]).count()
    }

    /// body-ext-1part after the fields: MD5, then disposition, language, location.
    fn leaf_extension(&self, out: &mut Vec<u8>, headers: &[Header]) {
        out.push(b' ');
        imap::nstring(out, self.raw_value(headers, "Content-MD5").as_deref());
        self.extension(out, headers);
    }

    /// Disposition, language, location.
    fn extension(&self, out: &mut Vec<u8>, headers: &[Header]) {
        out.push(b' ');
        match content(headers, "Content-Disposition") {
            Some(d) => {
                out.push(b'(');
                imap::string(out, d.ty.as_bytes());
                out.push(b' ');
                params(out, d.params);
                out.push(b')');
            }
            None => out.extend_from_slice(b"NIL"),
        }
        out.push(b' ');
        let langs: Vec<Vec<u8>> = self
            .raw_value(headers, "Content-Language")
            .map(|v| {
                v.split(|&b| b == b',')
                    .map(imap::unfold)
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        match langs.as_slice() {
            [] => out.extend_from_slice(b"NIL"),
            [one] => imap::string(out, one),
            many => {
                out.push(b'(');
                for (i, l) in many.iter().enumerate() {
                    if i > 0 {
                        out.push(b' ');
                    }
                    imap::string(out, l);
                }
                out.push(b')');
            }
        }
        out.push(b' ');
        imap::nstring(out, self.raw_value(headers, "Content-Location").as_deref());
    }
}

/// A text part's parameters: charset us-ascii when it has none (RFC 2045 §5.2),
/// which Dovecot also sends.
fn text_params(out: &mut Vec<u8>, attrs: &[mail_parser::Attribute]) {
    if attrs.iter().any(|a| a.name.eq_ignore_ascii_case("charset")) {
        return params(out, attrs);
    }
    out.push(b'(');
    for a in attrs {
        imap::string(out, a.name.as_bytes());
        out.push(b' ');
        imap::string(out, a.value.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(b"\"charset\" \"us-ascii\")");
}

fn params(out: &mut Vec<u8>, attrs: &[mail_parser::Attribute]) {
    if attrs.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for (i, a) in attrs.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        imap::string(out, a.name.as_bytes());
        out.push(b' ');
        imap::string(out, a.value.as_bytes());
    }
    out.push(b')');
}

fn addresses(out: &mut Vec<u8>, list: &[address::Address]) {
    if list.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for a in list {
        out.push(b'(');
        imap::nstring(out, a.name.as_deref());
        out.push(b' ');
        imap::nstring(out, a.adl.as_deref());
        out.push(b' ');
        imap::nstring(out, a.mailbox.as_deref());
        out.push(b' ');
        imap::nstring(out, a.host.as_deref());
        out.push(b')');
    }
    out.push(b')');
}
