//! One load-generating SMTP client session, sans-IO: bytes in, bytes to send out.
//!
//! A session connects, reads the greeting, says EHLO, then sends messages until the
//! shared budget is used up or its per-connection count is reached, then QUIT. With
//! `pipelining` the envelope and DATA go in one write (RFC 2920; the body waits for 354);
//! with `bdat` the whole transaction, body included, goes in one write (RFC 3030).
//! With `lmtp` it speaks LMTP (RFC 2033): LHLO, and one final reply per accepted
//! recipient. With `tls` StartTls it sends STARTTLS after EHLO and, once the driver
//! ran the handshake (`Output::start_tls`), EHLO again (RFC 3207); with `auth` it
//! authenticates (AUTH PLAIN with an initial response, RFC 4954) before its first
//! message on each connection.

use std::time::{Duration, Instant};

/// What every session of a run sends.
#[derive(Debug, Clone)]
pub struct Plan {
    pub from: String,
    /// Fixed recipients of every message (used when `domains` and `to_cycle` are empty).
    pub to: Vec<String>,
    /// One recipient per message, in turn: message `seq` goes to the pattern with `{}`
    /// replaced by `seq % count` (so `count` users get the same number of messages
    /// each, distinct ones). Overrides `to` and `domains`.
    pub to_cycle: Option<(String, usize)>,
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
    /// LMTP instead of SMTP.
    pub lmtp: bool,
    pub helo: String,
    pub tls: TlsMode,
    /// AUTH PLAIN as (user, password) on every connection.
    pub auth: Option<(String, String)>,
    /// Sign every message (DKIM) with this key, as a sending MTA would.
    pub dkim: Option<LoadSigner>,
}

/// The DKIM signer messages are signed with (ringmail's own).
#[derive(Clone)]
pub struct LoadSigner(pub std::sync::Arc<ringmail::mailauth::Signers>);

impl std::fmt::Debug for LoadSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadSigner")
    }
}

/// How a session's connection is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Plain,
    /// STARTTLS after the first EHLO.
    StartTls,
    /// TLS from the first byte (an `smtps` listener, RFC 8314); the session itself
    /// sees only plaintext, as without TLS.
    Implicit,
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
    if let Some((pattern, count)) = &plan.to_cycle {
        return vec![pattern.replace("{}", &(seq % (*count).max(1) as u64).to_string())];
    }
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
    /// STARTTLS sent, waiting for its 220.
    StartTls,
    /// AUTH sent, waiting for its 235.
    Auth,
    /// Envelope replies (MAIL, then each RCPT) received so far.
    Envelope {
        replied: usize,
    },
    Data,
    /// Waiting for the replies to the end of data (or BDAT LAST): one, or with LMTP
    /// one per accepted recipient.
    Final {
        left: usize,
    },
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
    /// The server said 220 to STARTTLS: run the TLS handshake now; `send` (EHLO) goes
    /// out under TLS.
    pub start_tls: bool,
}

pub struct Session {
    st: St,
    inbuf: Vec<u8>,
    sent_on_conn: usize,
    tx_start: Instant,
    tx_ok: bool,
    /// Recipients the server accepted in this transaction (LMTP replies per each).
    accepted: usize,
    body: Vec<u8>,
    rcpts: Vec<String>,
    tls_on: bool,
    authenticated: bool,
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
            accepted: 0,
            body: Vec::new(),
            rcpts: Vec::new(),
            tls_on: false,
            authenticated: false,
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
            if out.start_tls {
                // Nothing the server sent before the handshake counts.
                self.inbuf.clear();
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
                let verb = if plan.lmtp { "LHLO" } else { "EHLO" };
                out.send
                    .extend_from_slice(format!("{verb} {}\r\n", plan.helo).as_bytes());
                self.st = St::Ehlo;
            }
            St::Ehlo => {
                if code != 250 {
                    return self.fail(out);
                }
                if plan.tls == TlsMode::StartTls && !self.tls_on {
                    out.send.extend_from_slice(b"STARTTLS\r\n");
                    self.st = St::StartTls;
                } else if let Some((user, password)) =
                    plan.auth.as_ref().filter(|_| !self.authenticated)
                {
                    use base64::Engine;
                    let plain = format!("\0{user}\0{password}");
                    let b64 = base64::engine::general_purpose::STANDARD.encode(plain);
                    out.send
                        .extend_from_slice(format!("AUTH PLAIN {b64}\r\n").as_bytes());
                    self.st = St::Auth;
                } else {
                    self.start_message(plan, budget, now, out);
                }
            }
            St::StartTls => {
                if code != 220 {
                    return self.fail(out);
                }
                self.tls_on = true;
                out.start_tls = true;
                out.send
                    .extend_from_slice(format!("EHLO {}\r\n", plan.helo).as_bytes());
                self.st = St::Ehlo;
            }
            St::Auth => {
                if code != 235 {
                    return self.fail(out);
                }
                self.authenticated = true;
                self.start_message(plan, budget, now, out);
            }
            St::Envelope { replied } => {
                // A refused recipient fails the message but the transaction goes on
                // (the server answers DATA with 503/554 if none was accepted).
                if code / 100 != 2 {
                    self.tx_ok = false;
                } else if replied > 0 {
                    self.accepted += 1;
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
                    self.st = self.final_state(plan);
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
                self.st = self.final_state(plan);
            }
            St::Final { left } => {
                // LMTP: the transaction ends with the last recipient's reply; any
                // refusal fails the message.
                if code / 100 != 2 {
                    self.tx_ok = false;
                }
                if left > 1 {
                    self.st = St::Final { left: left - 1 };
                } else {
                    self.finish(plan, budget, code, now, out)
                }
            }
            St::Quit => {
                out.close = true;
                self.st = St::Done;
            }
            St::Done => {}
        }
    }

    fn final_state(&self, plan: &Plan) -> St {
        let left = if plan.lmtp { self.accepted } else { 1 };
        St::Final { left: left.max(1) }
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
        self.accepted = 0;
        self.rcpts = recipients(plan, seq);
        let mut body = message(
            seq,
            size,
            &plan.from,
            self.rcpts.first().map_or("", String::as_str),
        );
        if let Some(LoadSigner(signers)) = &plan.dkim {
            let text = ringmail::smtp::Body::from(body.clone());
            if let Some(Ok(signed)) = signers.sign(b"", &text, &|_| true) {
                body.splice(0..0, signed.header.into_bytes());
            }
        }
        if plan.lmtp {
            // Dovecot's LMTP refuses SIZE (555 5.5.4): it is not in RFC 2033's minimum.
            out.send
                .extend_from_slice(format!("MAIL FROM:<{}>\r\n", plan.from).as_bytes());
        } else {
            out.send.extend_from_slice(
                format!("MAIL FROM:<{}> SIZE={}\r\n", plan.from, body.len()).as_bytes(),
            );
        }
        if plan.pipelining || plan.bdat {
            for to in &self.rcpts {
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

    struct Seqs(std::ops::Range<u64>);

    impl Budget for Seqs {
        fn next(&mut self) -> Option<(u64, usize)> {
            self.0.next().map(|s| (s, 300))
        }
    }

    fn plan_to(to: &[&str]) -> Plan {
        Plan {
            from: "a@b".into(),
            to: to.iter().map(|t| t.to_string()).collect(),
            domains: vec![],
            rcpts_per_message: 1,
            size_min: 300,
            size_max: 300,
            per_connection: 0,
            pipelining: false,
            bdat: false,
            lmtp: true,
            to_cycle: None,
            helo: "h".into(),
            tls: TlsMode::Plain,
            auth: None,
            dkim: None,
        }
    }

    fn said(out: &Output) -> String {
        String::from_utf8_lossy(&out.send).into_owned()
    }

    #[test]
    fn lmtp_waits_for_a_reply_per_accepted_recipient() {
        let plan = plan_to(&["x@l", "y@l", "z@l"]);
        let mut budget = Seqs(0..1);
        let mut s = Session::new();
        let now = Instant::now();
        let mut feed = |s: &mut Session, r: &str| s.feed(&plan, &mut budget, r.as_bytes(), now);
        assert_eq!(said(&feed(&mut s, "220 lmtp\r\n")), "LHLO h\r\n");
        assert!(said(&feed(&mut s, "250-x\r\n250 ok\r\n")).starts_with("MAIL FROM:<a@b>"));
        assert_eq!(said(&feed(&mut s, "250 ok\r\n")), "RCPT TO:<x@l>\r\n");
        assert_eq!(said(&feed(&mut s, "250 ok\r\n")), "RCPT TO:<y@l>\r\n");
        assert_eq!(
            said(&feed(&mut s, "550 no such user\r\n")),
            "RCPT TO:<z@l>\r\n"
        );
        assert_eq!(said(&feed(&mut s, "250 ok\r\n")), "DATA\r\n");
        assert!(said(&feed(&mut s, "354 go\r\n")).ends_with("\r\n.\r\n"));
        // Two recipients were accepted: two replies end the transaction.
        let first = feed(&mut s, "250 x ok\r\n");
        assert!(first.finished.is_none() && first.send.is_empty());
        let last = feed(&mut s, "250 z ok\r\n");
        // The refused recipient fails the message.
        assert_eq!(last.finished.map(|f| f.0), Some(550));
        assert_eq!(said(&last), "QUIT\r\n");
    }

    #[test]
    fn cycled_recipients_share_the_messages_out() {
        let mut plan = plan_to(&[]);
        plan.to_cycle = Some(("user{}@localhost".into(), 3));
        let got: Vec<String> = (0..6).map(|seq| recipients(&plan, seq).remove(0)).collect();
        assert_eq!(
            got,
            ["user0@localhost", "user1@localhost", "user2@localhost"].repeat(2)
        );
        // Pipelined, the RCPT sent is the message's own recipient.
        plan.pipelining = true;
        plan.lmtp = false;
        let mut budget = Seqs(4..5);
        let mut s = Session::new();
        let now = Instant::now();
        s.feed(&plan, &mut budget, b"220 x\r\n", now);
        let out = s.feed(&plan, &mut budget, b"250 ok\r\n", now);
        assert!(
            said(&out).contains("RCPT TO:<user1@localhost>\r\nDATA\r\n"),
            "{}",
            said(&out)
        );
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
            lmtp: false,
            to_cycle: None,
            helo: "h".into(),
            tls: TlsMode::Plain,
            auth: None,
            dkim: None,
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

    #[test]
    fn starttls_then_ehlo_again_then_auth_then_the_message() {
        let mut plan = plan_to(&["x@l"]);
        plan.lmtp = false;
        plan.tls = TlsMode::StartTls;
        plan.auth = Some(("u@l".into(), "pw".into()));
        let mut budget = Seqs(0..1);
        let mut s = Session::new();
        let now = Instant::now();
        let mut feed = |s: &mut Session, r: &str| s.feed(&plan, &mut budget, r.as_bytes(), now);
        assert_eq!(said(&feed(&mut s, "220 mx\r\n")), "EHLO h\r\n");
        assert_eq!(
            said(&feed(&mut s, "250-mx\r\n250 STARTTLS\r\n")),
            "STARTTLS\r\n"
        );
        // Anything after the 220 (an injection attempt) is dropped.
        let out = feed(&mut s, "220 go ahead\r\n250 injected\r\n");
        assert!(out.start_tls);
        assert_eq!(said(&out), "EHLO h\r\n");
        // base64("\0u@l\0pw")
        assert_eq!(
            said(&feed(&mut s, "250-mx\r\n250 AUTH PLAIN\r\n")),
            "AUTH PLAIN AHVAbABwdw==\r\n"
        );
        assert!(said(&feed(&mut s, "235 ok\r\n")).starts_with("MAIL FROM:<a@b>"));
    }
}
