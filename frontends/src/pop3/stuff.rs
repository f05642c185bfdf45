//! Streaming output of a message in a multi-line response (RFC 1939 §3): a `.` at
//! the start of a line is doubled, and the response ends with `.` on a line of its
//! own. Chunks come in as the store reads them; the output is the same however the
//! message is split.

/// RETR: the whole message, byte-stuffed.
pub struct Stuffer {
    /// The next byte starts a line (the start of the message does).
    at_line_start: bool,
    /// The last byte pushed was CR, the one before the LF that would end the line.
    last_cr: bool,
    empty: bool,
}

impl Default for Stuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl Stuffer {
    pub fn new() -> Self {
        Stuffer {
            at_line_start: true,
            last_cr: false,
            empty: true,
        }
    }

    /// Appends `chunk` to `out`, stuffed: runs are copied whole, one LF search each.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        self.empty = false;
        out.reserve(chunk.len() + 8);
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    out.extend_from_slice(&rest[..=i]);
                    self.at_line_start = true;
                    rest = &rest[i + 1..];
                }
                None => {
                    out.extend_from_slice(rest);
                    self.at_line_start = false;
                    break;
                }
            }
        }
        self.last_cr = chunk.last() == Some(&b'\r');
    }

    /// Ends the response: CRLF first when the message did not end with one.
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.empty && !self.at_line_start {
            out.extend_from_slice(if self.last_cr { b"\n" } else { b"\r\n" });
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// TOP: the header block, the blank line after it, then at most `lines` body lines,
/// stuffed as [`Stuffer`] does.
pub struct Top {
    stuffer: Stuffer,
    /// Still in the header block.
    in_header: bool,
    /// The current line (of the header) has had bytes other than its CR/LF.
    line_has_text: bool,
    /// Body lines still to send.
    lines_left: u64,
    done: bool,
}

impl Top {
    pub fn new(lines: u64) -> Self {
        Top {
            stuffer: Stuffer::new(),
            in_header: true,
            line_has_text: false,
            lines_left: lines,
            done: false,
        }
    }

    /// Appends what of `chunk` TOP sends; false once it needs no more input.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> bool {
        let mut rest = chunk;
        while !rest.is_empty() && !self.done {
            if !self.in_header && self.lines_left == 0 {
                self.done = true;
                break;
            }
            let (line, complete) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..=i], true),
                None => (rest, false),
            };
            rest = &rest[line.len()..];
            self.stuffer.push(line, out);
            if self.in_header {
                let text = line.iter().any(|b| *b != b'\r' && *b != b'\n');
                self.line_has_text |= text;
                if complete {
                    // An empty line ends the header block.
                    if !self.line_has_text {
                        self.in_header = false;
                    }
                    self.line_has_text = false;
                }
            } else if complete {
                self.lines_left -= 1;
            }
        }
        if !self.in_header && self.lines_left == 0 {
            self.done = true;
        }
        !self.done
    }

    pub fn finish(self, out: &mut Vec<u8>) {
        self.stuffer.finish(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole_stuffed(m: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = Stuffer::new();
        s.push(m, &mut out);
        s.finish(&mut out);
        out
    }

    fn top_whole(m: &[u8], n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut t = Top::new(n);
        t.push(m, &mut out);
        t.finish(&mut out);
        out
    }

    #[test]
    fn stuffing_doubles_leading_dots_and_ends_with_a_dot_line() {
        assert_eq!(
            whole_stuffed(b".a\r\nb\r\n..c\r\n"),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        assert_eq!(whole_stuffed(b"a\r\n.\r\n"), b"a\r\n..\r\n.\r\n");
        // No final CRLF: one is added before the end marker.
        assert_eq!(whole_stuffed(b"a\r\nb"), b"a\r\nb\r\n.\r\n");
        assert_eq!(whole_stuffed(b"a\r"), b"a\r\n.\r\n");
        assert_eq!(whole_stuffed(b""), b".\r\n");
        // A bare LF starts a line too.
        assert_eq!(whole_stuffed(b"a\n.b\n"), b"a\n..b\n.\r\n");
        // A dot inside a line is left alone.
        assert_eq!(whole_stuffed(b"a.b\r\n"), b"a.b\r\n.\r\n");
    }

    #[test]
    fn stuffing_is_the_same_at_every_split() {
        let m = b".x\r\n\r\n..\r\n.\r\nmid.dle\r\n\n.\nend.";
        let want = whole_stuffed(m);
        for i in 0..=m.len() {
            for j in i..=m.len() {
                let mut out = Vec::new();
                let mut s = Stuffer::new();
                s.push(&m[..i], &mut out);
                s.push(&m[i..j], &mut out);
                s.push(&m[j..], &mut out);
                s.finish(&mut out);
                assert_eq!(out, want, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn top_sends_the_header_the_blank_line_and_n_body_lines() {
        let m = b"A: 1\r\nB: 2\r\n\r\n.one\r\ntwo\r\nthree\r\n";
        assert_eq!(top_whole(m, 0), b"A: 1\r\nB: 2\r\n\r\n.\r\n");
        assert_eq!(top_whole(m, 1), b"A: 1\r\nB: 2\r\n\r\n..one\r\n.\r\n");
        assert_eq!(
            top_whole(m, 2),
            b"A: 1\r\nB: 2\r\n\r\n..one\r\ntwo\r\n.\r\n"
        );
        assert_eq!(top_whole(m, 99), whole_stuffed(m));
        // No body at all, and no blank line.
        assert_eq!(top_whole(b"A: 1\r\n", 5), b"A: 1\r\n.\r\n");
        assert_eq!(top_whole(b"A: 1", 5), b"A: 1\r\n.\r\n");
    }

    #[test]
    fn top_is_the_same_at_every_split_and_stops_asking() {
        let m = b"A: 1\r\n.B: 2\r\n\r\n.one\r\ntwo\r\nthree\r\n";
        for n in 0..5 {
            let want = top_whole(m, n);
            for i in 0..=m.len() {
                let mut out = Vec::new();
                let mut t = Top::new(n);
                let more = t.push(&m[..i], &mut out);
                if more {
                    t.push(&m[i..], &mut out);
                }
                t.finish(&mut out);
                assert_eq!(out, want, "TOP {n} split at {i}");
            }
        }
        let mut t = Top::new(1);
        assert!(!t.push(m, &mut Vec::new()), "all it needs was in the chunk");
    }
}
