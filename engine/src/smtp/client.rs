//! The SMTP client as a sans-IO state machine, for delivery to remote MX hosts
//! (RFC 5321, with PIPELINING, SIZE, 8BITMIME, SMTPUTF8, CHUNKING, DSN and enhanced
//! status codes).
//!
//! The driver feeds received bytes to [`Client::feed`] and writes [`Client::output`].
//! [`Event::Ready`] says a transaction may start ([`Client::start`]);
//! [`Event::SendBody`] says the message text goes out now: with `bdat` the stored bytes
//! as they are (the `BDAT n LAST` command is already in the output), otherwise
//! dot-stuffed through a [`DotStuffer`], after which the driver calls
//! [`Client::body_sent`]. [`Event::Done`] carries one result per recipient.
//!
//! Architecture invariant: no sockets, clocks or executors in here; a broken server
//! gives results, never a panic. A connection lost after the end of the message was
//! sent but before the reply is the one window SMTP cannot close (RFC 1047): such
//! recipients are reported deferred, and a retry may deliver the message twice.

/// A server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of all lines, joined with a space (codes and enhanced codes stripped).
    pub text: String,
    /// `class.subject.detail` when the server sent enhanced status codes.
    pub enhanced: Option<(u8, u16, u16)>,
}

impl Reply {
    fn local(code: u16, enhanced: (u8, u16, u16), text: &str) -> Reply {
        Reply {
            code,
            text: text.into(),
            enhanced: Some(enhanced),
        }
    }

    /// 2xx: only a completion counts as success (a 3xx where a completion is due is
    /// a protocol error, taken as temporary).
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// As logged and put in bounces: `250 2.0.0 Ok`.
    pub fn to_line(&self) -> String {
        match self.enhanced {
            Some((c, s, d)) => format!("{} {c}.{s}.{d} {}", self.code, self.text),
            None => format!("{} {}", self.code, self.text),
        }
    }
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    Delivered(Reply),
    /// Try again later (4xx, or the connection broke).
    Deferred(Reply),
    /// Give up and bounce (5xx, or a requirement the server cannot meet).
    Failed(Reply),
}

impl RcptResult {
    fn from_reply(r: Reply) -> RcptResult {
        if r.is_positive() {
            RcptResult::Delivered(r)
        } else if r.code >= 500 {
            RcptResult::Failed(r)
        } else {
            RcptResult::Deferred(r)
        }
    }
}

/// Extensions the server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub esmtp: bool,
    pub pipelining: bool,
    /// `SIZE n`: the server's limit (0: announced without a limit).
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    pub starttls: bool,
}

impl Extensions {
    fn parse(lines: &[String]) -> Extensions {
        let mut e = Extensions {
            esmtp: true,
            ..Extensions::default()
        };
        // The first line is the greeting name; keywords follow.
        for line in lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => e.pipelining = true,
                "SIZE" => e.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => e.eight_bit_mime = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "CHUNKING" => e.chunking = true,
                "DSN" => e.dsn = true,
                "ENHANCEDSTATUSCODES" => e.enhanced_status_codes = true,
                "STARTTLS" => e.starttls = true,
                _ => {}
            }
        }
        e
    }
}

/// One message for one destination.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    pub from: String,
    pub rcpts: Vec<TxRcpt>,
    /// Octets of the message as it will be sent (prefix + stored body), for SIZE=.
    pub size: u64,
    /// The message has 8-bit text (announce BODY=8BITMIME; needs the extension).
    pub eight_bit: bool,
    /// Addresses or headers need SMTPUTF8.
    pub smtputf8: bool,
    /// DSN parameters, sent only to a server that offers DSN.
    pub ret: Option<&'static str>,
    pub envid: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct TxRcpt {
    pub to: String,
    pub notify: Option<String>,
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Greeted and introduced: a transaction may start.
    Ready,
    /// Send the message text now (see the module docs).
    SendBody { bdat: bool },
    /// The transaction ended; results in recipient order.
    Done(Vec<RcptResult>),
    /// The session cannot go on (greeting or EHLO/HELO refused, protocol error);
    /// the connection should be closed. Carries the reply that ended it.
    Failed(Reply),
    /// QUIT was answered.
    Closed,
    /// The server said 220 to STARTTLS: run the TLS handshake, then call
    /// `tls_started` (or drop the connection if it failed).
    StartTls,
}

/// What the client does about TLS (RFC 3207), as the destination's policy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsWish {
    /// Never STARTTLS.
    Off,
    /// STARTTLS when offered; without it, or when the server refuses it, on in
    /// plaintext.
    Opportunistic,
    /// STARTTLS or nothing: a server without it fails the session (temporarily).
    Required,
}

/// The reply the client is waiting for, so the driver can give it its own deadline
/// (RFC 5321 §4.5.3.2 times each command's reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    Greeting,
    /// EHLO or HELO.
    Hello,
    Mail,
    Rcpt,
    /// DATA initiation: the 354.
    Data,
    /// The reply to the end of the message (the final dot, or BDAT LAST).
    EndOfData,
    Rset,
    Quit,
    StartTls,
}

impl Awaiting {
    /// As a reason names it: `the reply to DATA`.
    pub fn describe(self) -> &'static str {
        match self {
            Awaiting::Greeting => "the greeting",
            Awaiting::Hello => "the reply to EHLO/HELO",
            Awaiting::Mail => "the reply to MAIL",
            Awaiting::Rcpt => "the reply to RCPT",
            Awaiting::Data => "the reply to DATA",
            Awaiting::EndOfData => "the reply to the end of the message",
            Awaiting::Rset => "the reply to RSET",
            Awaiting::Quit => "the reply to QUIT",
            Awaiting::StartTls => "the reply to STARTTLS",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Greeting,
    Ehlo,
    Helo,
    /// STARTTLS sent, waiting for its 220.
    StartTls,
    /// The driver's handshake.
    Handshake,
    Ready,
    /// Waiting for MAIL and RCPT replies: `got` received so far.
    Envelope {
        got: usize,
    },
    /// DATA sent (pipelined or not), waiting for 354.
    Data,
    /// The body is going out (driver's turn), then the final reply.
    Body,
    Final,
    /// Every recipient was refused yet the pipelined DATA got 354: the bare end
    /// marker went out, waiting for its reply (whatever it is, nobody was delivered).
    EmptyData,
    /// Waiting for the reply to a RSET after every recipient was refused.
    Rset,
    Quit,
    Done,
}

pub struct Client {
    helo_name: String,
    st: St,
    ext: Extensions,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Current transaction: recipients' results so far (None: not answered yet).
    results: Vec<Option<RcptResult>>,
    mail_reply: Option<Reply>,
    pipelined_data: bool,
    bdat: bool,
    /// Lockstep: recipients still to send.
    pending_rcpts: Vec<String>,
    /// Octets of the current message (for BDAT).
    size: u64,
    /// The server said 421: it is closing the connection.
    closing: bool,
    /// Complete replies taken so far (the driver restarts a reply's clock on each).
    replies: u64,
    /// The server greeted with our own name: this is a mail loop.
    loops: bool,
    tls: TlsWish,
    /// The session runs under TLS.
    tls_on: bool,
}

fn tls_not_offered() -> Reply {
    Reply::local(
        451,
        (4, 7, 4),
        "TLS is required, but the server does not offer STARTTLS",
    )
}

/// Longest reply line accepted (RFC 5321 says 512; some servers send more).
const REPLY_LINE_BYTES_MAX: usize = 4096;
/// Most lines in one reply (an EHLO reply has a dozen or two).
const REPLY_LINES_MAX: usize = 200;

impl Client {
    pub fn new(helo_name: &str) -> Client {
        Self::with_tls(helo_name, TlsWish::Off)
    }

    pub fn with_tls(helo_name: &str, tls: TlsWish) -> Client {
        Client {
            helo_name: helo_name.into(),
            st: St::Greeting,
            ext: Extensions::default(),
            inbuf: Vec::new(),
            out: Vec::new(),
            results: Vec::new(),
            mail_reply: None,
            pipelined_data: false,
            bdat: false,
            pending_rcpts: Vec::new(),
            size: 0,
            closing: false,
            replies: 0,
            loops: false,
            tls,
            tls_on: false,
        }
    }

    /// The handshake after `Event::StartTls` succeeded: the session starts over
    /// with EHLO (RFC 3207 §4.2: nothing the server said before counts).
    pub fn tls_started(&mut self) {
        assert_eq!(self.st, St::Handshake, "no STARTTLS was answered");
        self.tls_on = true;
        self.inbuf.clear();
        self.ext = Extensions::default();
        self.out
            .extend_from_slice(format!("EHLO {}\r\n", self.helo_name).as_bytes());
        self.st = St::Ehlo;
    }

    pub fn tls_on(&self) -> bool {
        self.tls_on
    }

    /// The server named itself (greeting or EHLO/HELO reply) with the name this
    /// client gives: it is this host, and the session ended with `Failed` (Postfix's
    /// loop detection). Delivery to it would come back here.
    pub fn loops_back(&self) -> bool {
        self.loops
    }

    /// The server offered DSN (RFC 3461): the recipients' NOTIFY and ORCPT go on.
    pub fn passes_dsn(&self) -> bool {
        self.ext.dsn
    }

    /// Ends the session when the reply's first line names our own host.
    fn greeted_by_myself(&mut self, lines: &[String], events: &mut Vec<Event>) -> bool {
        let name = lines
            .first()
            .and_then(|l| l.split_ascii_whitespace().next());
        let mine = name.is_some_and(|n| {
            n.trim_end_matches('.')
                .eq_ignore_ascii_case(&self.helo_name)
        });
        if mine {
            self.loops = true;
            let text = format!(
                "the server greeted me with my own hostname {}",
                self.helo_name
            );
            self.fail(Reply::local(554, (5, 4, 6), &text), events);
        }
        mine
    }

    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Feeds received bytes; returns what happened, in order.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Event> {
        self.inbuf.extend_from_slice(data);
        let mut events = Vec::new();
        loop {
            match take_reply(&mut self.inbuf) {
                Ok(Some((reply, lines))) => {
                    self.replies += 1;
                    self.on_reply(reply, lines, &mut events)
                }
                Ok(None) => break,
                Err(reply) => {
                    self.fail(reply, &mut events);
                    break;
                }
            }
            // Done: nothing more to read. Body: the driver must send the message
            // first; replies after the 354 stay buffered until `body_sent`. Ready: the
            // driver starts a transaction on the event; bytes after it wait for that,
            // or a stale `Ready` would send it to `start` on a finished client.
            if matches!(self.st, St::Done | St::Body | St::Ready | St::Handshake) {
                break;
            }
        }
        events
    }

    /// The reply the client waits for now; None when it waits for nothing from the
    /// server (idle, done, or the driver's turn to send the message text).
    pub fn awaiting(&self) -> Option<Awaiting> {
        Some(match self.st {
            St::Greeting => Awaiting::Greeting,
            St::Ehlo | St::Helo => Awaiting::Hello,
            St::StartTls => Awaiting::StartTls,
            St::Envelope { got: 0 } => Awaiting::Mail,
            St::Envelope { .. } => Awaiting::Rcpt,
            St::Data => Awaiting::Data,
            St::Final | St::EmptyData => Awaiting::EndOfData,
            St::Rset => Awaiting::Rset,
            St::Quit => Awaiting::Quit,
            St::Ready | St::Body | St::Done | St::Handshake => return None,
        })
    }

    /// Complete replies received on this connection so far.
    pub fn replies(&self) -> u64 {
        self.replies
    }

    /// Ready for another transaction on this connection: idle, nothing unread, and
    /// the server did not announce it is closing.
    pub fn reusable(&self) -> bool {
        self.st == St::Ready && self.inbuf.is_empty() && !self.closing
    }

    /// Starts a transaction. Requirements the server cannot meet fail the recipients
    /// at once, without a command sent (then `Done` is returned and the client stays
    /// ready).
    pub fn start(&mut self, tx: &Transaction) -> Option<Event> {
        assert_eq!(self.st, St::Ready, "start() needs Event::Ready first");
        assert!(!tx.rcpts.is_empty(), "a transaction has recipients");
        let refuse = |r: Reply| {
            Some(Event::Done(
                tx.rcpts
                    .iter()
                    .map(|_| RcptResult::Failed(r.clone()))
                    .collect(),
            ))
        };
        if let Some(limit) = self.ext.size.filter(|l| *l > 0) {
            if tx.size > limit {
                return refuse(Reply::local(
                    552,
                    (5, 3, 4),
                    &format!(
                        "message size {} exceeds the server's limit {limit}",
                        tx.size
                    ),
                ));
            }
        }
        if tx.eight_bit && !self.ext.eight_bit_mime {
            // RFC 6152 §3: 8-bit data to a server without 8BITMIME is never sent raw;
            // ringmail does not down-convert, so the message fails.
            return refuse(Reply::local(
                554,
                (5, 6, 3),
                "8-bit message, and the server does not offer 8BITMIME",
            ));
        }
        if tx.smtputf8 && !self.ext.smtputf8 {
            return refuse(Reply::local(
                553,
                (5, 6, 7),
                "the message needs SMTPUTF8, and the server does not offer it",
            ));
        }
        let mut mail = format!("MAIL FROM:<{}>", tx.from);
        if self.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", tx.size));
        }
        if tx.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if tx.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if self.ext.dsn {
            if let Some(ret) = tx.ret {
                mail.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = &tx.envid {
                mail.push_str(&format!(" ENVID={envid}"));
            }
        }
        mail.push_str("\r\n");
        self.out.extend_from_slice(mail.as_bytes());
        let rcpt_lines: Vec<String> = tx
            .rcpts
            .iter()
            .map(|r| {
                let mut l = format!("RCPT TO:<{}>", r.to);
                if self.ext.dsn {
                    if let Some(n) = &r.notify {
                        l.push_str(&format!(" NOTIFY={n}"));
                    }
                    if let Some(o) = &r.orcpt {
                        l.push_str(&format!(" ORCPT={o}"));
                    }
                }
                l.push_str("\r\n");
                l
            })
            .collect();
        self.results = vec![None; tx.rcpts.len()];
        self.size = tx.size;
        self.mail_reply = None;
        self.bdat = self.ext.chunking;
        self.pipelined_data = false;
        if self.ext.pipelining {
            for l in &rcpt_lines {
                self.out.extend_from_slice(l.as_bytes());
            }
            // DATA may ride along (RFC 2920); BDAT waits for the recipients' replies so
            // no body is sent when all of them are refused.
            if !self.bdat {
                self.out.extend_from_slice(b"DATA\r\n");
                self.pipelined_data = true;
            }
            self.pending_rcpts.clear();
        } else {
            self.pending_rcpts = rcpt_lines.into_iter().rev().collect();
        }
        self.st = St::Envelope { got: 0 };
        None
    }

    /// The driver finished sending the message text after `SendBody { bdat: false }`
    /// (dot-stuffed, ending with the terminator from `DotStuffer::finish`).
    pub fn body_sent(&mut self) -> Vec<Event> {
        if self.st != St::Body {
            return Vec::new();
        }
        self.st = St::Final;
        // Replies that came with the 354 (a pipelining server's early answer).
        self.feed(&[])
    }

    /// Ends the session politely.
    pub fn quit(&mut self) {
        if matches!(self.st, St::Ready | St::Greeting | St::Ehlo | St::Helo) {
            self.out.extend_from_slice(b"QUIT\r\n");
            self.st = St::Quit;
        }
    }

    /// The connection broke: every unanswered recipient is deferred.
    pub fn connection_lost(&mut self) -> Option<Event> {
        self.abort(Reply::local(
            451,
            (4, 4, 2),
            "connection lost during the transaction",
        ))
    }

    /// The driver gives up on the connection (a timeout, say) for `reason`, a 4xx:
    /// every recipient without a final answer is deferred with it.
    pub fn abort(&mut self, reason: Reply) -> Option<Event> {
        let in_tx = matches!(
            self.st,
            St::Envelope { .. } | St::Data | St::Body | St::Final | St::EmptyData | St::Rset
        );
        self.st = St::Done;
        if !in_tx {
            return None;
        }
        let lost = reason;
        let results = self
            .results
            .drain(..)
            .map(|r| match r {
                // Accepted at RCPT but the message never confirmed: try again.
                Some(RcptResult::Delivered(_)) | None => RcptResult::Deferred(lost.clone()),
                Some(done) => done,
            })
            .collect();
        Some(Event::Done(results))
    }

    /// The session cannot go on: a QUIT is queued unless the server is closing
    /// (RFC 5321 §4.1.1.10: the client "MUST NOT intentionally close the transmission
    /// channel until it sends a QUIT command"; §3.1: a server that greeted with 554
    /// waits for it). The driver sends it without waiting for the answer.
    fn fail(&mut self, reply: Reply, events: &mut Vec<Event>) {
        if let Some(Event::Done(r)) = self.connection_lost() {
            events.push(Event::Done(r));
        }
        self.st = St::Done;
        if !self.closing {
            self.out.extend_from_slice(b"QUIT\r\n");
        }
        events.push(Event::Failed(reply));
    }

    fn on_reply(&mut self, reply: Reply, lines: Vec<String>, events: &mut Vec<Event>) {
        if reply.code == 421 {
            self.closing = true;
        }
        match self.st {
            St::Greeting => {
                if reply.code != 220 {
                    return self.fail(reply, events);
                }
                if self.greeted_by_myself(&lines, events) {
                    return;
                }
                self.out
                    .extend_from_slice(format!("EHLO {}\r\n", self.helo_name).as_bytes());
                self.st = St::Ehlo;
            }
            St::Ehlo => {
                if reply.code == 250 {
                    if self.greeted_by_myself(&lines, events) {
                        return;
                    }
                    self.ext = Extensions::parse(&lines);
                    if !self.tls_on && self.tls != TlsWish::Off && self.ext.starttls {
                        self.out.extend_from_slice(b"STARTTLS\r\n");
                        self.st = St::StartTls;
                        return;
                    }
                    if !self.tls_on && self.tls == TlsWish::Required {
                        return self.fail(tls_not_offered(), events);
                    }
                    self.st = St::Ready;
                    events.push(Event::Ready);
                } else if reply.code >= 500 && self.tls == TlsWish::Required && !self.tls_on {
                    // HELO has no STARTTLS.
                    self.fail(tls_not_offered(), events);
                } else if reply.code >= 500 {
                    // An old server: fall back to HELO (RFC 5321 §3.2).
                    self.out
                        .extend_from_slice(format!("HELO {}\r\n", self.helo_name).as_bytes());
                    self.st = St::Helo;
                } else {
                    self.fail(reply, events);
                }
            }
            St::StartTls => {
                if reply.code == 220 {
                    self.st = St::Handshake;
                    events.push(Event::StartTls);
                } else if self.tls == TlsWish::Required {
                    let text = format!(
                        "TLS is required, and the server refused STARTTLS: {}",
                        reply.to_line()
                    );
                    self.fail(Reply::local(451, (4, 7, 4), &text), events);
                } else {
                    // Opportunistic: on in plaintext, as offered before.
                    self.st = St::Ready;
                    events.push(Event::Ready);
                }
            }
            St::Handshake => {}
            St::Helo => {
                if reply.code != 250 {
                    return self.fail(reply, events);
                }
                if self.greeted_by_myself(&lines, events) {
                    return;
                }
                self.ext = Extensions::default();
                self.st = St::Ready;
                events.push(Event::Ready);
            }
            St::Envelope { got } => {
                if got == 0 {
                    self.mail_reply = Some(reply.clone());
                } else {
                    let i = got - 1;
                    // A refused MAIL refuses every recipient the same way.
                    let mail = self.mail_reply.clone().unwrap();
                    self.results[i] = Some(if mail.is_positive() {
                        if reply.is_positive() {
                            RcptResult::Delivered(reply.clone())
                        } else {
                            RcptResult::from_reply(reply.clone())
                        }
                    } else {
                        RcptResult::from_reply(mail)
                    });
                }
                let got = got + 1;
                if !self.ext.pipelining {
                    if got == 1 && !reply.is_positive() {
                        // MAIL refused in lockstep: no RCPT goes out.
                        for r in self.results.iter_mut() {
                            *r = Some(RcptResult::from_reply(reply.clone()));
                        }
                        return self.end_tx(events);
                    }
                    if let Some(next) = self.pending_rcpts.pop() {
                        self.out.extend_from_slice(next.as_bytes());
                        self.st = St::Envelope { got };
                        return;
                    }
                }
                if got <= self.results.len() {
                    self.st = St::Envelope { got };
                    return;
                }
                let accepted = self
                    .results
                    .iter()
                    .any(|r| matches!(r, Some(RcptResult::Delivered(_))));
                if !accepted {
                    if self.pipelined_data {
                        // The server answers the pipelined DATA with 503/554.
                        self.st = St::Data;
                    } else {
                        self.out.extend_from_slice(b"RSET\r\n");
                        self.st = St::Rset;
                    }
                    return;
                }
                if self.bdat {
                    // The command is in the output; the stored bytes follow as they are.
                    self.out
                        .extend_from_slice(format!("BDAT {} LAST\r\n", self.size).as_bytes());
                    self.st = St::Final;
                    events.push(Event::SendBody { bdat: true });
                } else if self.pipelined_data {
                    self.st = St::Data;
                } else {
                    self.out.extend_from_slice(b"DATA\r\n");
                    self.st = St::Data;
                }
            }
            St::Data => {
                let accepted = self
                    .results
                    .iter()
                    .any(|r| matches!(r, Some(RcptResult::Delivered(_))));
                if !accepted {
                    if reply.code == 354 {
                        // RFC 2920 §3.1: the server took the pipelined DATA although
                        // no RCPT succeeded. End the data at once with an empty
                        // message (anything else would be taken as its text).
                        self.out.extend_from_slice(b".\r\n");
                        self.st = St::EmptyData;
                        return;
                    }
                    // The reply to a pipelined DATA after every RCPT failed; the
                    // transaction is over (RSET leaves the session clean).
                    self.out.extend_from_slice(b"RSET\r\n");
                    self.st = St::Rset;
                    return;
                }
                if reply.code == 354 {
                    self.st = St::Body;
                    events.push(Event::SendBody { bdat: false });
                } else {
                    // DATA refused (or answered out of protocol): the recipients get
                    // that reply; RSET clears the envelope the server may still hold.
                    let reply = if reply.code < 400 {
                        Reply::local(
                            451,
                            (4, 5, 0),
                            &format!("unexpected reply to DATA: {}", reply.to_line()),
                        )
                    } else {
                        reply
                    };
                    for r in self.results.iter_mut() {
                        if matches!(r, Some(RcptResult::Delivered(_))) {
                            *r = Some(RcptResult::from_reply(reply.clone()));
                        }
                    }
                    self.out.extend_from_slice(b"RSET\r\n");
                    self.st = St::Rset;
                }
            }
            St::Body | St::Final => self.finish(reply, events),
            // The empty message ends the transaction like a RSET would; a server that
            // "delivered" it delivered it to nobody, so the RCPT replies stand.
            St::Rset | St::EmptyData => self.end_tx(events),
            St::Ready => {
                // An unsolicited reply: most likely 421 before closing.
                self.fail(reply, events);
            }
            St::Quit => {
                self.st = St::Done;
                events.push(Event::Closed);
            }
            St::Done => {}
        }
    }

    /// Applies the reply to the end of the message to every accepted recipient.
    fn finish(&mut self, reply: Reply, events: &mut Vec<Event>) {
        for r in self.results.iter_mut() {
            if matches!(r, Some(RcptResult::Delivered(_))) {
                *r = Some(RcptResult::from_reply(reply.clone()));
            }
        }
        self.end_tx(events);
    }

    fn end_tx(&mut self, events: &mut Vec<Event>) {
        let results = self
            .results
            .drain(..)
            .map(|r| r.expect("every recipient answered"))
            .collect();
        events.push(Event::Done(results));
        self.st = St::Ready;
        events.push(Event::Ready);
    }
}

/// Takes one complete reply off the front of `buf`: Ok(None) when incomplete, Err when
/// the server sent something that is not a reply.
fn take_reply(buf: &mut Vec<u8>) -> Result<Option<(Reply, Vec<String>)>, Reply> {
    let mut pos = 0;
    let mut lines = Vec::new();
    let mut code = None;
    loop {
        if lines.len() >= REPLY_LINES_MAX {
            return Err(Reply::local(500, (5, 5, 0), "reply has too many lines"));
        }
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) else {
            if buf.len() - pos > REPLY_LINE_BYTES_MAX {
                return Err(Reply::local(500, (5, 5, 0), "reply line too long"));
            }
            return Ok(None);
        };
        let raw = &buf[pos..pos + nl];
        let line = String::from_utf8_lossy(raw.strip_suffix(b"\r").unwrap_or(raw)).into_owned();
        pos += nl + 1;
        let c: Option<u16> = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .filter(|c| (200..600).contains(c));
        let Some(c) = c else {
            return Err(Reply::local(
                500,
                (5, 5, 0),
                &format!(
                    "not an SMTP reply: {}",
                    line.chars().take(80).collect::<String>()
                ),
            ));
        };
        if *code.get_or_insert(c) != c {
            return Err(Reply::local(
                500,
                (5, 5, 0),
                "multi-line reply with mixed codes",
            ));
        }
        let sep = line.as_bytes().get(3).copied();
        lines.push(line.get(4..).unwrap_or("").to_string());
        match sep {
            Some(b'-') => continue,
            None | Some(b' ') => break,
            Some(_) => return Err(Reply::local(500, (5, 5, 0), "malformed reply line")),
        }
    }
    buf.drain(..pos);
    let code = code.unwrap();
    let mut enhanced = None;
    let texts: Vec<String> = lines
        .iter()
        .map(|l| match parse_enhanced(l, code) {
            Some((e, rest)) => {
                enhanced.get_or_insert(e);
                rest.to_string()
            }
            None => l.clone(),
        })
        .collect();
    Ok(Some((
        Reply {
            code,
            text: texts.join(" "),
            enhanced,
        },
        lines,
    )))
}

/// `2.1.0 rest` → ((2,1,0), "rest"), when the class matches the reply code's.
fn parse_enhanced(line: &str, code: u16) -> Option<((u8, u16, u16), &str)> {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let mut parts = word.split('.');
    let class: u8 = parts.next()?.parse().ok()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || class as u16 != code / 100 {
        return None;
    }
    Some(((class, subject, detail), rest))
}

/// Dot-stuffs message text for DATA as it streams out (RFC 5321 §4.5.2), without
/// holding the whole message: call `stuff` on each chunk, then `finish`.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    last_cr: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            last_cr: false,
        }
    }
}

impl DotStuffer {
    /// Appends `chunk` to `out`, doubling each dot that starts a line.
    pub fn stuff(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut start = 0;
        for i in memchr::memchr_iter(b'.', chunk) {
            let line_start = if i == 0 {
                self.at_line_start
            } else {
                chunk[i - 1] == b'\n'
            };
            if line_start {
                out.extend_from_slice(&chunk[start..=i]);
                out.push(b'.');
                start = i + 1;
            }
        }
        out.extend_from_slice(&chunk[start..]);
        if let Some(&last) = chunk.last() {
            self.at_line_start = last == b'\n';
            self.last_cr = last == b'\r';
        }
    }

    /// True when `chunk` needs no stuffing (no line in it starts with a dot): the
    /// stuffer then stands after it, as if `stuff` had copied it unchanged. False
    /// leaves the stuffer as it was.
    pub fn pass(&mut self, chunk: &[u8]) -> bool {
        let dot_first = chunk.first() == Some(&b'.') && self.at_line_start;
        if dot_first || memchr::memmem::find(chunk, b"\n.").is_some() {
            return false;
        }
        if let Some(&last) = chunk.last() {
            self.at_line_start = last == b'\n';
            self.last_cr = last == b'\r';
        }
        true
    }

    /// The end-of-data marker, with the CRLF the text may lack before it.
    pub fn finish(&self) -> &'static [u8] {
        if self.at_line_start {
            b".\r\n"
        } else if self.last_cr {
            b"\n.\r\n"
        } else {
            b"\r\n.\r\n"
        }
    }
}
