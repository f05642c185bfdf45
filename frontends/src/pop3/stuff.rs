//! Streaming transforms for the message bytes of a multi-line response (RETR, TOP).
//!
//! RFC 1939 section 3: a multi-line response ends with a line holding a single ".", so
//! every line of the data that starts with "." gets one more "." in front ("byte
//! stuffing"). A message can be tens of MiB, so the driver streams it in chunks through
//! these transforms instead of building the response in memory; both copy runs of bytes
//! (memchr finds the few places that need work) rather than looking at every byte.
//!
//! **Invariant:** the output depends only on the concatenation of the chunks, never on
//! where the stream was split; what a transform needs to know about earlier chunks (are
//! we at the start of a line, did the data so far end in CRLF, where in the header block
//! are we) is carried in its state.
//!
//! "A line" here starts at the start of the stream and after every LF, whether or not a
//! CR precedes it: a message with bare LF line ends is stuffed where a client reading
//! LF-terminated lines would see a line start, so no client can mistake a data line for
//! the end marker.

use memchr::memmem;

/// RFC 1939 byte-stuffing of a whole message (RETR), followed by the end marker.
#[derive(Clone, Debug)]
pub struct Stuffer {
    /// Nothing has been pushed yet.
    empty: bool,
    /// The last two bytes pushed (only meaningful once `empty` is false; when a single
    /// byte has been pushed, `tail[0]` is 0, which is neither CR nor LF).
    tail: [u8; 2],
    /// Finds "\n." (a line that starts with a dot, other than the first line).
    finder: memmem::Finder<'static>,
}

impl Default for Stuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl Stuffer {
    pub fn new() -> Self {
        Stuffer {
            empty: true,
            tail: [0, 0],
            finder: memmem::Finder::new(b"\n."),
        }
    }

    /// The next byte pushed starts a line.
    fn at_line_start(&self) -> bool {
        self.empty || self.tail[1] == b'\n'
    }

    /// Copies `chunk` to `out`, doubling a "." at the start of every line.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let Some(&first) = chunk.first() else {
            return;
        };
        out.reserve(chunk.len() + 16);
        if first == b'.' && self.at_line_start() {
            out.push(b'.');
        }
        let mut run = 0;
        for lf in self.finder.find_iter(chunk) {
            // chunk[lf] is the LF, chunk[lf + 1] the dot: copy through the dot, add one.
            out.extend_from_slice(&chunk[run..lf + 2]);
            out.push(b'.');
            run = lf + 2;
        }
        out.extend_from_slice(&chunk[run..]);
        self.tail = match chunk {
            [.., a, b] => [*a, *b],
            [b] => [self.tail[1], *b],
            [] => self.tail,
        };
        self.empty = false;
    }

    /// Ends the response: a CRLF if the data did not end with one (an empty message
    /// needs none: the end marker then follows the status line directly), then ".\r\n".
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.empty && self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// What the current line of the header block holds so far (TOP looks for the blank
/// line, which may be split across chunks, and may be "\r\n" or a bare "\n").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineSoFar {
    Empty,
    Cr,
    Other,
}

impl LineSoFar {
    fn then(self, seg: &[u8]) -> LineSoFar {
        match (self, seg) {
            (c, []) => c,
            (LineSoFar::Empty, b"\r") => LineSoFar::Cr,
            _ => LineSoFar::Other,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In the header block (up to and including the blank line).
    Header,
    /// In the body, this many lines (> 0) still to send.
    Body(u64),
    /// Everything TOP sends has been passed on.
    Done,
}

/// TOP n (RFC 1939 section 7): the header block, the blank line after it, then at most
/// n lines of the body, stuffed like [`Stuffer`], followed by the end marker. A message
/// without a blank line is all header: it is sent whole.
#[derive(Clone, Debug)]
pub struct Top {
    stuffer: Stuffer,
    lines: u64,
    phase: Phase,
    line: LineSoFar,
}

impl Top {
    pub fn new(lines: u64) -> Self {
        Top {
            stuffer: Stuffer::new(),
            lines,
            phase: Phase::Header,
            line: LineSoFar::Empty,
        }
    }

    /// Passes on the part of `chunk` that TOP sends. Returns false once it needs no
    /// more input (the driver may stop reading the message; later pushes add nothing).
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> bool {
        let take = self.scan(chunk);
        self.stuffer.push(&chunk[..take], out);
        self.phase != Phase::Done
    }

    /// How many bytes of `chunk` belong to the output; advances the phase over them.
    fn scan(&mut self, chunk: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            match self.phase {
                Phase::Done => return pos,
                Phase::Header => match memchr::memchr(b'\n', &chunk[pos..]) {
                    None => {
                        self.line = self.line.then(&chunk[pos..]);
                        return chunk.len();
                    }
                    Some(k) => {
                        let lf = pos + k;
                        let blank = self.line.then(&chunk[pos..lf]) != LineSoFar::Other;
                        self.line = LineSoFar::Empty;
                        pos = lf + 1;
                        if blank {
                            self.phase = match self.lines {
                                0 => Phase::Done,
                                n => Phase::Body(n),
                            };
                        }
                    }
                },
                Phase::Body(mut remaining) => {
                    for k in memchr::memchr_iter(b'\n', &chunk[pos..]) {
                        remaining -= 1;
                        if remaining == 0 {
                            self.phase = Phase::Done;
                            return pos + k + 1;
                        }
                    }
                    self.phase = Phase::Body(remaining);
                    return chunk.len();
                }
            }
        }
    }

    /// Ends the response like [`Stuffer::finish`].
    pub fn finish(self, out: &mut Vec<u8>) {
        self.stuffer.finish(out);
    }
}
