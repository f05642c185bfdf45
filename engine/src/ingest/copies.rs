//! The count of user-space copies of a body on its way in (issue 9, item 6): from
//! the bytes the kernel put into the session's receive buffer to the O_DIRECT write,
//! a body is copied once and CRC'd once, whether it came by DATA or BDAT, with or
//! without SIZE=, small or several MiB; and the queue's fresh copy for the first
//! delivery is the written batch itself.

use super::envelope;
use crate::queue::{BodyBytes, Spool};
use crate::smtp::{self, Session, Step};
use ringmail_store::{stats, BodySource, LogConfig};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

fn config() -> Rc<smtp::Config> {
    Rc::new(smtp::Config {
        hostname: "mx.test".into(),
        local_domains: vec!["local.test".into()],
        own_addresses: vec![],
        limits: smtp::Limits::default(),
        starttls: false,
        auth: false,
        auth_without_tls: false,
        sender_login_match: true,
        submission: false,
    })
}

/// A text of `len` bytes with lines of varied length, some starting with a dot.
fn text(len: usize) -> Vec<u8> {
    let mut t = b"Subject: copies\r\nReceived: from a by b\r\n\r\n".to_vec();
    let mut i = 0u32;
    while t.len() < len {
        let n = (i * 37 % 90) as usize;
        if i.is_multiple_of(5) {
            t.push(b'.');
        }
        t.extend((0..n).map(|k| b'a' + ((k as u32 + i) % 26) as u8));
        t.extend_from_slice(b"\r\n");
        i += 1;
    }
    t
}

fn dot_stuffed(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 16);
    let mut line_start = true;
    for &c in text {
        if line_start && c == b'.' {
            out.push(b'.');
        }
        out.push(c);
        line_start = c == b'\n';
    }
    out
}

/// Where the "kernel" wrote into the session: every piece the store copies from
/// must lie in there (no copy in between).
#[derive(Default)]
struct Received(RefCell<Vec<(usize, usize)>>);

impl Received {
    /// `p` lies in bytes the kernel wrote (receives next to each other join up).
    fn contains(&self, p: &[u8]) -> bool {
        let (a, b) = (p.as_ptr() as usize, p.as_ptr() as usize + p.len());
        let mut ranges = self.0.borrow().clone();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged.iter().any(|&(s, e)| s <= a && b <= e)
    }
}

/// A body that checks where its pieces are before the store copies them.
struct Checked<'a> {
    body: smtp::Body,
    received: &'a Received,
    /// Reads of the whole body: one.
    passes: &'a std::cell::Cell<usize>,
}

impl BodySource for Checked<'_> {
    fn len(&self) -> usize {
        self.body.len()
    }
    fn pieces(&self, f: &mut dyn FnMut(&[u8])) {
        self.passes.set(self.passes.get() + 1);
        self.body.pieces(|p| {
            assert!(
                self.received.contains(p),
                "a piece of the body is not where it was received: it was copied"
            );
            // The store's copy into its write buffer is what takes the piece: nothing
            // gathers the body somewhere else first.
            let before = stats::get().body_bytes_copied;
            f(p);
            assert_eq!(
                stats::get().body_bytes_copied - before,
                p.len() as u64,
                "a piece was not copied straight into the log's buffer"
            );
            true
        })
    }
}

/// Sends two messages, pipelined, through one session into a spool, as ingest does,
/// receiving in pieces of `recv` bytes; returns the counters of the store's write
/// path for each.
fn two_messages(bdat: bool, size: bool, len: usize, recv: usize) -> Vec<stats::Counters> {
    let (_dir, data) = {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().to_path_buf();
        ringmail_store::manifest::open_or_create(&p, 1).unwrap();
        (d, p)
    };
    let body = text(len);
    let mut input = b"EHLO c.test\r\n".to_vec();
    for _ in 0..2 {
        input.extend_from_slice(
            match size {
                true => format!("MAIL FROM:<a@b.test> SIZE={}\r\n", body.len()),
                false => "MAIL FROM:<a@b.test>\r\n".to_string(),
            }
            .as_bytes(),
        );
        input.extend_from_slice(b"RCPT TO:<x@local.test>\r\n");
        if bdat {
            let half = body.len() / 2;
            input.extend_from_slice(format!("BDAT {half}\r\n").as_bytes());
            input.extend_from_slice(&body[..half]);
            input.extend_from_slice(format!("BDAT {} LAST\r\n", body.len() - half).as_bytes());
            input.extend_from_slice(&body[half..]);
        } else {
            input.extend_from_slice(b"DATA\r\n");
            input.extend_from_slice(&dot_stuffed(&body));
            input.extend_from_slice(b".\r\n");
        }
    }
    input.extend_from_slice(b"QUIT\r\n");
    let peer: SocketAddr = "127.0.0.2:40000".parse().unwrap();
    glommio::LocalExecutor::default().run(async move {
        let spool = Spool::open(&data, 0, LogConfig::default()).await.unwrap();
        let mut s = Session::new(config(), true);
        let received = Received::default();
        let mut rest = &input[..];
        let mut counted = Vec::new();
        let mut stored = 0;
        loop {
            match s.process() {
                Step::NeedInput if rest.is_empty() => break,
                Step::NeedInput => {
                    // The kernel's copy: into the session's own buffer.
                    let buf = s.read_buf();
                    let n = buf.len().min(rest.len()).min(recv);
                    buf[..n].copy_from_slice(&rest[..n]);
                    let at = buf.as_ptr() as usize;
                    received.0.borrow_mut().push((at, at + n));
                    s.filled(n);
                    rest = &rest[n..];
                }
                Step::Message(tx) => {
                    let id = spool.next_id().await.unwrap();
                    stats::reset();
                    let session_copies = tx.body.copied_bytes();
                    let (env, text) = envelope(*tx, id, 0, peer);
                    let passes = std::cell::Cell::new(0);
                    let checked = Checked {
                        body: text,
                        received: &received,
                        passes: &passes,
                    };
                    spool
                        .enqueue(env, b"Received: x\r\n", checked)
                        .await
                        .unwrap();
                    assert_eq!(passes.get(), 1, "the body was read more than once");
                    stats::add_session_copy(session_copies);
                    counted.push(stats::get());
                    s.message_stored("ID");
                    stored += 1;
                    // The first delivery reads the batch that went to the disk.
                    let l = spool.read_message(id).await.unwrap();
                    assert!(
                        matches!(l.message.body, BodyBytes::Log(_)),
                        "a copy of its own"
                    );
                    assert!(l.message.body[..] == body[..], "the stored body differs");
                    let m = spool.get(id).unwrap();
                    assert_eq!(m.body_crc32c, crc32c::crc32c(&body));
                    assert_eq!(m.size, body.len() as u64);
                }
                Step::Close | Step::StartTls | Step::Authenticate { .. } => break,
            }
        }
        assert_eq!(stored, 2, "{}", String::from_utf8_lossy(s.output()));
        assert_eq!(s.copied_bytes(), 0);
        spool.close().await;
        // What is on disk is what was sent.
        let listed = crate::queue::list(&data).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed
            .iter()
            .all(|m| m.body_crc32c == crc32c::crc32c(&body)));
        counted
    })
}

#[test]
fn a_body_is_copied_once_and_crcd_once_on_its_way_to_the_disk() {
    for bdat in [false, true] {
        for size in [false, true] {
            for (len, recv) in [
                (3000, 1 << 20),
                (3000, 7),
                (4 << 20, 64 << 10),
                (4 << 20, 1 << 20),
            ] {
                for (n, c) in two_messages(bdat, size, len, recv).into_iter().enumerate() {
                    let case = format!(
                        "bdat {bdat}, SIZE= {size}, {len} bytes, receives of {recv}, message {n}"
                    );
                    assert_eq!(c.bodies, 1, "{case}");
                    assert!(c.body_bytes as usize >= len, "{case}");
                    assert_eq!(c.body_bytes_copied, c.body_bytes, "{case}: copies {c:?}");
                    assert_eq!(c.body_bytes_crc, c.body_bytes, "{case}: CRC passes {c:?}");
                    assert_eq!(c.relocated_bytes, 0, "{case}");
                    assert!(c.tail_bytes_copied < 2 * 4096, "{case}: {c:?}");
                }
            }
        }
    }
}
