//! One load-generating SMTP client session, sans-IO: bytes in, bytes to send out.
//!
//! A session connects, reads the greeting, says EHLO, then sends messages until the
//! shared budget is used up or its per-connection count is reached, then QUIT. With
//! `pipelining` the envelope and DATA go in one write (RFC 2920; the body waits for 354);
//! with `bdat` the whole transaction, body included, goes in one write (RFC 3030).

use std::time::{Duration, Instant};

/// What every session of a run sends.
#[derive(Debug, Clone)]
pub struct Plan {
    pub from: String,
    /// Fixed recipients of every message (used when `domains` is empty).
    pub to: Vec<String>,
    /// Recipient domains with weights: each message gets `rcpts_per_message`
    /// recipients, each in a domain drawn by weight.
    pub domains: Vec<(String, u32)>,
    pub rcpts_per_message: usize,
    /// Message size in bytes: each message draws uniformly from this range.
    pub size_min: usize,
    pub size_max: usize,
    /// Messages per connection before QUIT (0: until the run ends).
    pub per_connection: usize,
    pub pipelining: bool,
    pub bdat: bool,
    pub helo: String,
}

/// The header that carries the checksum of the message text (after the blank line),
/// so a sink can verify every message on its own.
pub const CHECKSUM_HEADER: &str = "X-Load-Checksum";

/// The message with sequence number `seq`: headers naming it, then lines of text up to
/// about `size` bytes (CRLF line ends, no line starting with a dot). Deterministic, so a
/// test can rebuild what was sent and compare checksums.
pub fn message(seq: u64, size: usize, from: &str, to: &str) -> Vec<u8> {
    let mut text = Vec::with_capacity(size);
    let line = b"The quick brown fox jumps over the lazy dog; ringmail load text 0123456789.\r\n";
    let header_guess = 200;
    while header_guess + text.len() + line.len() <= size {
        text.extend_from_slice(line);
    }
    let mut m = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: ringmail-load {seq}\r\nMessage-ID: <{seq}@ringmail-load>\r\n{CHECKSUM_HEADER}: {:08x}\r\n\r\n",
        crc32c::crc32c(&text)
    )
    .into_bytes();
    m.extend_from_slice(&text);
    m
}

/// Checks a received message against its checksum header: `Some(true)` when it
/// matches, `Some(false)` when it does not, `None` when it has none.
pub fn verify(message: &[u8]) -> Option<bool> {
    let split = memchr::memmem::find(message, b"\r\n\r\n")?;
    let headers = std::str::from_utf8(&message[..split]).ok()?;
    let value = headers
        .split("\r\n")
        .find_map(|h| h.strip_prefix(CHECKSUM_HEADER)?.strip_prefix(": "))?;
    let want = u32::from_str_radix(value.trim(), 16).ok()?;
    Some(crc32c::crc32c(&message[split + 4..]) == want)
}

/// The recipients of message `seq`.
pub fn recipients(plan: &Plan, seq: u64) -> Vec<String> {
    if plan.domains.is_empty() {
        return plan.to.clone();
    }
    let total: u64 = plan
        .domains
        .iter()
        .map(|(_, w)| *w as u64)
        .sum::<u64>()
        .max(1);
    (0..plan.rcpts_per_message.max(1) as u64)
        .map(|k| {
            let h = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ k.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
            .rotate_left(31);
            let mut pick = h % total;
            let domain = plan
                .domains
                .iter()
                .find(|(_, w)| {
                    if pick < *w as u64 {
                        true
                    } else {
                        pick -= *w as u64;
                        false
                    }
                })
                .map_or("localhost", |(d, _)| d.as_str());
            format!("user{}@{domain}", (h >> 32) % 1000)
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Greeting,
    Ehlo,
    /// Envelope replies (MAIL, then each RCPT) received so far.
    Envelope {
        replied: usize,
    },
    Data,
    /// Waiting for the reply to the end of data (or BDAT LAST).
    Final,
    Quit,
    Done,
}

/// What the driver should do after feeding a session.
#[derive(Debug, Default)]
pub struct Output {
    pub send: Vec<u8>,
    /// A transaction ended: its final reply code and its latency (MAIL to final reply).
    pub finished: Option<(u16, Duration)>,
    /// Every complete reply seen, by code (for the reply-code counts).
    pub codes: Vec<u16>,
    /// Close the connection (after sending `send`).
    pub close: bool,
    /// The server broke protocol or refused the session: count an error.
    pub failed: bool,
}

pub struct Session {
    st: St,
    inbuf: Vec<u8>,
    sent_on_conn: usize,
    tx_start: Instant,
    tx_ok: bool,
    body: Vec<u8>,
    rcpts: Vec<String>,
}

/// Asks the run for the next message: its sequence number and size, or None when done.
pub trait Budget {
    fn next(&mut self) -> Option<(u64, usize)>;
}

impl Session {
    pub fn new() -> Session {
        Session {
            st: St::Greeting,
            inbuf: Vec::new(),
            sent_on_conn: 0,
            tx_start: Instant::now(),
            tx_ok: true,
            body: Vec::new(),
            rcpts: Vec::new(),
        }
    }

    pub fn is_done(&self) -> bool {
        self.st == St::Done
    }

    /// Feeds received bytes; returns what to send and what happened.
    pub fn feed(
        &mut self,
        plan: &Plan,
        budget: &mut dyn Budget,
        data: &[u8],
        now: Instant,
    ) -> Output {
        self.inbuf.extend_from_slice(data);
        let mut out = Output::default();
        while let Some((code, len)) = next_reply(&self.inbuf) {
            self.inbuf.drain(..len);
            out.codes.push(code);
            self.on_reply(plan, budget, code, now, &mut out);
            if out.close {
                break;
            }
        }
        out
    }

    fn on_reply(
        &mut self,
        plan: &Plan,
        budget: &mut dyn Budget,
        code: u16,
        now: Instant,
        out: &mut Output,
    ) {
        match self.st {
            St::Greeting => {
                if code != 220 {
                    return self.fail(out);
                }
                out.send
                    .extend_from_slice(format!("EHLO {}\r\n", plan.helo).as_bytes());
                self.st = St::Ehlo;
            }
            St::Ehlo => {
                if code != 250 {
                    return self.fail(out);
                }
                self.start_message(plan, budget, now, out);
            }
            St::Envelope { replied } => {
                // A refused recipient fails the message but the transaction goes on
                // (the server answers DATA with 503/554 if none was accepted).
                if code / 100 != 2 {
                    self.tx_ok = false;
                }
                let replied = replied + 1;
                let lockstep = !plan.pipelining && !plan.bdat;
                if replied < 1 + self.rcpts.len() {
                    if lockstep {
                        out.send.extend_from_slice(
                            format!("RCPT TO:<{}>\r\n", self.rcpts[replied - 1]).as_bytes(),
                        );
                    }
                    self.st = St::Envelope { replied };
                } else if plan.bdat {
                    self.st = St::Final;
                } else {
                    if lockstep {
                        out.send.extend_from_slice(b"DATA\r\n");
                    }
                    self.st = St::Data;
                }
            }
            St::Data => {
                if code != 354 {
                    return self.finish(plan, budget, code, now, out);
                }
                out.send.append(&mut self.body);
                out.send.extend_from_slice(b".\r\n");
                self.st = St::Final;
            }
            St::Final => self.finish(plan, budget, code, now, out),
            St::Quit => {
                out.close = true;
                self.st = St::Done;
            }
            St::Done => {}
        }
    }

    fn fail(&mut self, out: &mut Output) {
        out.failed = true;
        out.close = true;
        self.st = St::Done;
    }

    fn finish(
        &mut self,
        plan: &Plan,
        budget: &mut dyn Budget,
        code: u16,
        now: Instant,
        out: &mut Output,
    ) {
        let code = if self.tx_ok || code / 100 != 2 {
            code
        } else {
            550
        };
        out.finished = Some((code, now - self.tx_start));
        self.sent_on_conn += 1;
        if plan.per_connection > 0 && self.sent_on_conn >= plan.per_connection {
            out.send.extend_from_slice(b"QUIT\r\n");
            self.st = St::Quit;
        } else {
            self.start_message(plan, budget, now, out);
        }
    }

    fn start_message(
        &mut self,
        plan: &Plan,
        budget: &mut dyn Budget,
        now: Instant,
        out: &mut Output,
    ) {
        let Some((seq, size)) = budget.next() else {
            out.send.extend_from_slice(b"QUIT\r\n");
            self.st = St::Quit;
            return;
        };
        self.tx_start = now;
        self.tx_ok = true;
        self.rcpts = recipients(plan, seq);
        let body = message(
            seq,
            size,
            &plan.from,
            self.rcpts.first().map_or("", String::as_str),
        );
        out.send.extend_from_slice(
            format!("MAIL FROM:<{}> SIZE={}\r\n", plan.from, body.len()).as_bytes(),
        );
        if plan.pipelining || plan.bdat {
            for to in &plan.to {
                out.send
                    .extend_from_slice(format!("RCPT TO:<{to}>\r\n").as_bytes());
            }
        }
        if plan.bdat {
            out.send
                .extend_from_slice(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
            out.send.extend_from_slice(&body);
        } else {
            if plan.pipelining {
                out.send.extend_from_slice(b"DATA\r\n");
            }
            self.body = body;
        }
        // Lockstep (no pipelining): MAIL now, each RCPT after the previous reply.
        if self.rcpts.is_empty() {
            // Nothing to send to: the run was configured without recipients.
            return self.fail(out);
        }
        self.st = St::Envelope { replied: 0 };
    }
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

/// Finds the first complete reply (possibly multi-line) in `buf`: its code and length.
fn next_reply(buf: &[u8]) -> Option<(u16, usize)> {
    let mut pos = 0;
    loop {
        let nl = memchr::memchr(b'\n', &buf[pos..])? + pos;
        let line = &buf[pos..nl];
        let code = line
            .get(..3)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u16>().ok());
        let last = line.get(3) != Some(&b'-');
        pos = nl + 1;
        if last {
            return Some((code.unwrap_or(0), pos));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_a_checksum_the_sink_can_verify() {
        for size in [0, 100, 4096, 100 << 10] {
            let m = message(7, size, "a@b", "c@d");
            assert_eq!(verify(&m), Some(true));
            assert!(m.len() <= size.max(300));
            assert!(!m.windows(3).any(|w| w == b"\n.\r" || w == b"\n.."));
            if size >= 4096 {
                let mut bad = m.clone();
                let n = bad.len();
                bad[n - 5] ^= 1;
                assert_eq!(verify(&bad), Some(false));
            }
        }
        assert_eq!(verify(b"Subject: x\r\n\r\nbody"), None);
    }

    #[test]
    fn weighted_domains() {
        let plan = Plan {
            from: "a@b".into(),
            to: vec![],
            domains: vec![("heavy.test".into(), 9), ("light.test".into(), 1)],
            rcpts_per_message: 3,
            size_min: 10,
            size_max: 10,
            per_connection: 0,
            pipelining: false,
            bdat: false,
            helo: "h".into(),
        };
        let mut heavy = 0;
        for seq in 0..1000 {
            let r = recipients(&plan, seq);
            assert_eq!(r.len(), 3);
            heavy += r.iter().filter(|a| a.ends_with("@heavy.test")).count();
            assert_eq!(r, recipients(&plan, seq), "deterministic");
        }
        assert!(
            (2500..2900).contains(&heavy),
            "about 90% heavy: {heavy} of 3000"
        );
    }
}
