//! `Stuffer` and `Top`: literal expectations, and the same output at every split.

use super::{Stuffer, Top};

fn stuff(chunks: &[&[u8]]) -> Vec<u8> {
    let mut s = Stuffer::new();
    let mut out = Vec::new();
    for c in chunks {
        s.push(c, &mut out);
    }
    s.finish(&mut out);
    out
}

fn top(lines: u64, chunks: &[&[u8]]) -> (Vec<u8>, Vec<bool>) {
    let mut t = Top::new(lines);
    let mut out = Vec::new();
    let more = chunks.iter().map(|c| t.push(c, &mut out)).collect();
    t.finish(&mut out);
    (out, more)
}

/// A byte-at-a-time stuffer written from RFC 1939's wording, to check the fast one
/// against on inputs too long to write out by hand.
fn stuff_naive(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line_start = true;
    for &b in data {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// TOP written the slow way: whole lines, the first blank one ends the header block.
fn top_naive(data: &[u8], n: u64) -> Vec<u8> {
    let lines: Vec<&[u8]> = data.split_inclusive(|b| *b == b'\n').collect();
    let blank = lines.iter().position(|l| *l == b"\r\n" || *l == b"\n");
    let end = match blank {
        Some(b) => (b + 1 + n as usize).min(lines.len()),
        None => lines.len(),
    };
    stuff_naive(&lines[..end].concat())
}

#[test]
fn stuffer_literals() {
    assert_eq!(stuff(&[b""]), b".\r\n");
    assert_eq!(stuff(&[]), b".\r\n");
    assert_eq!(stuff(&[b"."]), b"..\r\n.\r\n");
    assert_eq!(stuff(&[b".\r\n"]), b"..\r\n.\r\n");
    assert_eq!(stuff(&[b"a\r\n.b\r\n"]), b"a\r\n..b\r\n.\r\n");
    assert_eq!(stuff(&[b"a\r\n..\r\n"]), b"a\r\n...\r\n.\r\n");
    assert_eq!(stuff(&[b"a.b\r\nc. .\r\n"]), b"a.b\r\nc. .\r\n.\r\n");
    // No trailing CRLF: one is added before the end marker.
    assert_eq!(stuff(&[b"abc"]), b"abc\r\n.\r\n");
    assert_eq!(stuff(&[b"abc\r"]), b"abc\r\r\n.\r\n");
    // A line starts after a bare LF too.
    assert_eq!(stuff(&[b"a\n.b\n"]), b"a\n..b\n\r\n.\r\n");
    // A CR alone does not end a line.
    assert_eq!(stuff(&[b"a\r.b\r\n"]), b"a\r.b\r\n.\r\n");
    // Split right at the places that matter.
    assert_eq!(stuff(&[b"a\r\n", b".b\r\n"]), b"a\r\n..b\r\n.\r\n");
    assert_eq!(
        stuff(&[b"a\r", b"\n", b".", b".", b"\r\n"]),
        b"a\r\n...\r\n.\r\n"
    );
    assert_eq!(stuff(&[b"a\r", b"\n"]), b"a\r\n.\r\n");
    assert_eq!(stuff(&[b"a\n", b"\r\n"]), b"a\n\r\n.\r\n");
}

#[test]
fn stuffer_empty_chunks_change_nothing() {
    assert_eq!(stuff(&[b"", b".a", b"", b"\r\n", b""]), b"..a\r\n.\r\n");
}

/// Dot lines at the start, in the middle, at the end, doubled, after bare LFs.
const DOTTY: &[u8] = b".first\r\nplain\r\n..two\r\n.\r\nx.y\n.bare\n\r\n.\r\n. \r\nend.";

#[test]
fn stuffer_same_output_at_every_split() {
    let whole = stuff(&[DOTTY]);
    assert_eq!(whole, stuff_naive(DOTTY));
    assert!(whole.starts_with(b"..first\r\nplain\r\n...two\r\n..\r\n"));
    assert!(whole.ends_with(b"\r\nend.\r\n.\r\n"));
    let bytes: Vec<&[u8]> = DOTTY.chunks(1).collect();
    assert_eq!(stuff(&bytes), whole);
    for i in 0..=DOTTY.len() {
        assert_eq!(stuff(&[&DOTTY[..i], &DOTTY[i..]]), whole, "split at {i}");
        for j in i..=DOTTY.len() {
            let three = stuff(&[&DOTTY[..i], &DOTTY[i..j], &DOTTY[j..]]);
            assert_eq!(three, whole, "split at {i} and {j}");
        }
    }
}

#[test]
fn stuffer_matches_naive_on_pseudo_random_text() {
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..200 {
        let len = (next() % 300) as usize;
        // A small alphabet so dots, CRs and LFs meet often.
        let data: Vec<u8> = (0..len).map(|_| b".\r\na"[(next() % 4) as usize]).collect();
        let mut s = Stuffer::new();
        let mut out = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = 1 + (next() % 17) as usize;
            let (c, r) = rest.split_at(n.min(rest.len()));
            s.push(c, &mut out);
            rest = r;
        }
        s.finish(&mut out);
        assert_eq!(
            out,
            stuff_naive(&data),
            "{:?}",
            String::from_utf8_lossy(&data)
        );
    }
}

const MAIL: &[u8] = b"From: a@example.org\r\n.Dot-Header: x\r\n\r\nl1\r\n.l2\r\nl3\r\n";

#[test]
fn top_literals() {
    let head = b"From: a@example.org\r\n..Dot-Header: x\r\n\r\n";
    let with = |body: &[u8]| [&head[..], body, b".\r\n"].concat();
    assert_eq!(top(0, &[MAIL]).0, with(b""));
    assert_eq!(top(1, &[MAIL]).0, with(b"l1\r\n"));
    assert_eq!(top(2, &[MAIL]).0, with(b"l1\r\n..l2\r\n"));
    assert_eq!(top(3, &[MAIL]).0, with(b"l1\r\n..l2\r\nl3\r\n"));
    // Beyond the end: the whole message.
    assert_eq!(top(4, &[MAIL]).0, with(b"l1\r\n..l2\r\nl3\r\n"));
    assert_eq!(top(u64::MAX, &[MAIL]).0, stuff(&[MAIL]));
}

#[test]
fn top_says_when_it_is_done() {
    assert_eq!(
        top(0, &[b"H: a\r\n", b"\r\n", b"body\r\n"]).1,
        [true, false, false]
    );
    assert_eq!(top(1, &[b"H: a\r\n\r\n", b"b1\r\nb2"]).1, [true, false]);
    // Pushes after done add nothing.
    let (out, more) = top(1, &[b"H: a\r\n\r\nb1\r\n", b"b2\r\n", b".\r\n"]);
    assert_eq!(out, b"H: a\r\n\r\nb1\r\n.\r\n");
    assert_eq!(more, [false, false, false]);
    // Still wanting input at the end of a message shorter than asked for.
    assert_eq!(top(5, &[b"H: a\r\n\r\nb1\r\n"]).1, [true]);
}

#[test]
fn top_of_messages_without_a_body() {
    // No blank line: all header, sent whole.
    assert_eq!(top(0, &[b"H: a\r\nI: b\r\n"]).0, b"H: a\r\nI: b\r\n.\r\n");
    assert_eq!(top(3, &[b"H: a"]).0, b"H: a\r\n.\r\n");
    // Ends right at the blank line.
    assert_eq!(top(3, &[b"H: a\r\n\r\n"]).0, b"H: a\r\n\r\n.\r\n");
    // Nothing at all.
    assert_eq!(top(3, &[b""]).0, b".\r\n");
    // The body's last line has no CRLF.
    assert_eq!(
        top(3, &[b"H: a\r\n\r\nlast"]).0,
        b"H: a\r\n\r\nlast\r\n.\r\n"
    );
    // No header at all: the first line is the blank one.
    assert_eq!(top(1, &[b"\r\nb1\r\nb2\r\n"]).0, b"\r\nb1\r\n.\r\n");
}

#[test]
fn top_blank_line_needs_a_whole_empty_line() {
    // "\r" followed by text is no blank line; a header line continued stays header.
    let m = b"H: a\r\n\rX\r\n\r\nb1\r\nb2\r\n";
    assert_eq!(top(1, &[m]).0, b"H: a\r\n\rX\r\n\r\nb1\r\n.\r\n");
    // Bare LF line ends count, as for stuffing.
    let bare = b"H: a\n\nb1\n.b2\nb3\n";
    assert_eq!(top(2, &[bare]).0, b"H: a\n\nb1\n..b2\n\r\n.\r\n");
}

#[test]
fn top_same_output_at_every_split() {
    let samples: [&[u8]; 4] = [
        MAIL,
        b"H: a\n\nb1\n.b2\nb3\n",
        b"H: a\r\n\rX\r\n\r\n.\r\n..\r\nlast",
        b"H: a\r\n.H2: b",
    ];
    for m in samples {
        for n in [0, 1, 2, 5] {
            let whole = top(n, &[m]).0;
            assert_eq!(
                whole,
                top_naive(m, n),
                "{:?} {n}",
                String::from_utf8_lossy(m)
            );
            let bytes: Vec<&[u8]> = m.chunks(1).collect();
            assert_eq!(top(n, &bytes).0, whole);
            for i in 0..=m.len() {
                assert_eq!(top(n, &[&m[..i], &m[i..]]).0, whole, "split at {i}");
                for j in i..=m.len() {
                    assert_eq!(top(n, &[&m[..i], &m[i..j], &m[j..]]).0, whole);
                }
            }
        }
    }
}
