//! A message body as the session received it: the receive chunks themselves, never
//! copied nor reallocated, and the ranges of them that hold the text.
//!
//! Why: the body used to be copied from the receive buffer into a growing `Vec`
//! (and again whenever it grew), then into the log's batch. Now the session only
//! scans what arrives (for the end, bare CR/LF, line lengths, limits) and remembers
//! where the text is; whoever stores the body reads it once, in pieces
//! ([`Body::pieces`]), with DATA's dot-stuffing skipped on the way. The one copy is
//! the store's, straight into its aligned write buffer.

use std::ops::Range;
use std::rc::Rc;

/// A `Part` whose chunk is still the session's receive buffer.
pub(super) const CURRENT: usize = usize::MAX;

/// BDAT chunks smaller than this are gathered into a buffer of their own (a copy,
/// counted): a range per tiny chunk would cost more memory than the bytes.
pub(super) const SMALL_PART_BYTES: usize = 512;
/// The largest gathered buffer. A run of tiny chunks gathers into buffers that
/// double up to this (never reallocated: that would copy again), so their slack is
/// at most what the run holds; a lone tiny chunk gets a buffer of its own size.
const GATHER_BYTES: usize = 16 << 10;

#[derive(Debug, Clone)]
enum Part {
    /// `range` of chunk `chunks[i]`.
    Chunk(usize, Range<usize>),
    Gathered(Vec<u8>),
}

/// The text of a message: `len` bytes, in [`Body::pieces`].
#[derive(Default)]
pub struct Body {
    chunks: Vec<Rc<Vec<u8>>>,
    parts: Vec<Part>,
    /// DATA text as sent: a dot that starts a line is dot-stuffing, skipped on read.
    dot_stuffed: bool,
    len: usize,
    /// Body bytes the session copied (gathered small BDAT chunks, ranges copied out
    /// of a chunk that was mostly other bytes).
    copied: usize,
    /// Bytes allocated for `chunks` and the gathered buffers.
    held: usize,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("len", &self.len)
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Body {
        let len = v.len();
        Body {
            parts: vec![Part::Chunk(0, 0..len)],
            chunks: vec![Rc::new(v)],
            dot_stuffed: false,
            len,
            copied: 0,
            held: 0,
        }
    }
}

impl Body {
    pub(super) fn new(dot_stuffed: bool) -> Body {
        Body {
            dot_stuffed,
            ..Body::default()
        }
    }

    /// Bytes of the text (after dot-unstuffing).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Body bytes the session copied on the way (0 unless a client sent tiny BDAT
    /// chunks).
    pub fn copied_bytes(&self) -> usize {
        self.copied
    }

    /// Memory the body holds: its retired chunks and gathered buffers as allocated,
    /// and its lists of them.
    pub fn held_bytes(&self) -> usize {
        self.held
            + self.parts.capacity() * std::mem::size_of::<Part>()
            + self.chunks.capacity() * std::mem::size_of::<Rc<Vec<u8>>>()
    }

    /// Calls `f` with the text's bytes in order, in pieces, until it returns false.
    pub fn pieces(&self, mut f: impl FnMut(&[u8]) -> bool) {
        // A stuffed dot is the first byte of a line; the text starts a line.
        let mut line_start = true;
        for part in &self.parts {
            let raw: &[u8] = match part {
                Part::Chunk(i, r) => &self.chunks[*i][r.clone()],
                Part::Gathered(v) => v,
            };
            if raw.is_empty() {
                continue;
            }
            if !self.dot_stuffed {
                if !f(raw) {
                    return;
                }
                continue;
            }
            let base = usize::from(line_start && raw[0] == b'.');
            let mut from = base;
            // Dots after a line end within the range. (The text has no bare LF: every
            // LF ends a line.)
            for at in memchr::memmem::find_iter(&raw[base..], b"\n.") {
                let nl = base + at;
                if !f(&raw[from..=nl]) {
                    return;
                }
                from = nl + 2;
            }
            if from < raw.len() && !f(&raw[from..]) {
                return;
            }
            line_start = raw.last() == Some(&b'\n');
        }
    }

    /// The text in one buffer (a copy: for tests and tools, not the store's path).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        self.pieces(|p| {
            v.extend_from_slice(p);
            true
        });
        v
    }

    /// Adds `range` of the current receive chunk (`CURRENT` until it is retired).
    pub(super) fn add(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        if let Some(Part::Chunk(CURRENT, r)) = self.parts.last_mut() {
            if r.end == range.start {
                r.end = range.end;
                return;
            }
        }
        self.parts.push(Part::Chunk(CURRENT, range));
    }

    /// Adds a copy of `bytes` (a tiny BDAT chunk).
    pub(super) fn gather(&mut self, bytes: &[u8]) {
        self.copied += bytes.len();
        let mut run = 0;
        if let Some(Part::Gathered(v)) = self.parts.last_mut() {
            if v.len() + bytes.len() <= v.capacity() {
                v.extend_from_slice(bytes);
                return;
            }
            run = v.capacity();
        }
        let mut v = Vec::with_capacity(bytes.len().max((run * 2).min(GATHER_BYTES)));
        v.extend_from_slice(bytes);
        self.held += v.capacity();
        self.parts.push(Part::Gathered(v));
    }

    /// Whether some part refers to the current receive chunk.
    pub(super) fn uses_current(&self) -> bool {
        self.parts
            .iter()
            .rev()
            .take_while(|p| !matches!(p, Part::Chunk(i, _) if *i != CURRENT))
            .any(|p| matches!(p, Part::Chunk(CURRENT, _)))
    }

    /// The current receive chunk becomes `chunk`: parts that referred to it now
    /// refer to this.
    pub(super) fn retire(&mut self, chunk: Rc<Vec<u8>>) {
        let i = self.chunks.len();
        let mut any = false;
        for p in self.parts.iter_mut().rev() {
            match p {
                Part::Chunk(c, _) if *c == CURRENT => {
                    *c = i;
                    any = true;
                }
                Part::Chunk(_, _) => break,
                Part::Gathered(_) => {}
            }
        }
        if any {
            self.held += chunk.capacity();
            self.chunks.push(chunk);
        }
    }

    /// [`Body::retire`] for a full receive chunk. If less than half of it from where
    /// the text starts is text
    /// (BDAT ranges among command lines a client padded it with), the text is copied
    /// out (counted) and the chunk let go: otherwise what a body holds would be
    /// bounded only by what the client sends. Returns whether it copied.
    pub(super) fn retire_full(&mut self, chunk: Rc<Vec<u8>>) -> bool {
        let current = || {
            self.parts
                .iter()
                .rev()
                .take_while(|p| !matches!(p, Part::Chunk(i, _) if *i != CURRENT))
        };
        let (mut text, mut first) = (0, chunk.len());
        for p in current() {
            if let Part::Chunk(_, r) = p {
                text += r.len();
                first = first.min(r.start);
            }
        }
        // Bytes before the text (a message before it, its commands) are one chunk's
        // worth at most, not what makes memory grow with padding: judged from there.
        if text == 0 || text * 2 >= chunk.len() - first {
            self.retire(chunk);
            return false;
        }
        for p in self.parts.iter_mut().rev() {
            match p {
                Part::Chunk(CURRENT, r) => {
                    let v = chunk[r.clone()].to_vec();
                    self.copied += v.len();
                    self.held += v.capacity();
                    *p = Part::Gathered(v);
                }
                Part::Chunk(_, _) => break,
                Part::Gathered(_) => {}
            }
        }
        true
    }

    pub(super) fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_body(chunks: &[&[u8]]) -> Body {
        let mut b = Body::new(true);
        for c in chunks {
            b.add(0..c.len());
            b.retire(Rc::new(c.to_vec()));
        }
        let len = b.to_vec().len();
        b.set_len(len);
        b
    }

    #[test]
    fn dots_that_start_lines_are_skipped_across_chunk_boundaries() {
        let whole = b".a\r\n..b\r\nc.d\r\n.\r\n".to_vec();
        let want = b"a\r\n.b\r\nc.d\r\n\r\n".to_vec();
        for cut in 0..=whole.len() {
            let b = data_body(&[&whole[..cut], &whole[cut..]]);
            assert_eq!(b.to_vec(), want, "cut at {cut}");
        }
        for cut2 in 0..=whole.len() {
            for cut1 in 0..=cut2 {
                let b = data_body(&[&whole[..cut1], &whole[cut1..cut2], &whole[cut2..]]);
                assert_eq!(b.to_vec(), want, "cuts at {cut1}, {cut2}");
            }
        }
    }
}
