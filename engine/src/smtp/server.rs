//! The SMTP server session as a sans-IO state machine (RFC 5321, with PIPELINING,
//! SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING and DSN).
//!
//! The driver puts received bytes in with [`Session::read_buf`]/[`Session::filled`] (or
//! [`Session::push`]), calls [`Session::process`], writes what [`Session::output`] holds,
//! and repeats. When `process` returns [`Step::Message`], the driver makes the message
//! durable and answers with [`Session::message_stored`] or [`Session::message_failed`];
//! input after the message stays buffered until then, so pipelined replies keep their
//! order. Replies to pipelined commands accumulate and are written together when the
//! session needs more input (RFC 2920 §3.2).
//!
//! Architecture invariant: no sockets, files, clocks or executors in here. Every limit is
//! enforced inside, with the reply docs/contracts.md ("Limits") names; a bad client gets
//! a reply, never a panic.

use super::address::{
    is_local_domain, parse_domain, parse_path, valid_xtext, Domain, DomainError, Mailbox, PathError,
};
use super::body::{Body, SMALL_PART_BYTES};
use super::types::{notify, BodyType, Recipient, Ret};
use std::rc::Rc;

/// Limits of one session. Names end in their unit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A command line, CRLF included (RFC 5321 §4.5.3.1.4).
    pub line_bytes_max: usize,
    /// A text line in DATA, CRLF included (RFC 5321 §4.5.3.1.6).
    pub data_line_bytes_max: usize,
    /// The message as sent, after dot-unstuffing.
    pub message_bytes_max: usize,
    pub rcpt_count_max: usize,
    /// Errors after which the session is closed (Postfix's hard_error_limit).
    pub error_count_max: u32,
    /// A message with this many `Received:` headers is refused: it is looping
    /// (Postfix's hopcount_limit).
    pub hop_count_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            line_bytes_max: 512,
            data_line_bytes_max: 1000,
            message_bytes_max: 50 << 20,
            rcpt_count_max: 1000,
            error_count_max: 20,
            hop_count_max: 50,
        }
    }
}

/// What the session needs to decide, fixed for the life of the server.
#[derive(Debug, Clone)]
pub struct Config {
    pub hostname: String,
    /// Domains whose recipients are accepted from anyone (lower case).
    pub local_domains: Vec<String>,
    /// Addresses of this host (loopback, the listen address or every interface's):
    /// mail to a literal of one of them would come straight back here.
    pub own_addresses: Vec<std::net::IpAddr>,
    pub limits: Limits,
    /// Offer and accept STARTTLS (RFC 3207): the driver can run a TLS handshake.
    pub starttls: bool,
    /// Offer and accept AUTH PLAIN and LOGIN (RFC 4954): the driver can check
    /// passwords (`Step::Authenticate`).
    pub auth: bool,
    /// Offer AUTH before TLS too (off: only under TLS, and AUTH in plaintext gets
    /// `538 5.7.11`).
    pub auth_without_tls: bool,
    /// An authenticated client's MAIL FROM must be an address it may send as
    /// (`LocalRecipients::may_send_as`).
    pub sender_login_match: bool,
    /// A message submission listener (RFC 6409): MAIL needs AUTH first, whatever
    /// the client's address.
    pub submission: bool,
}

/// The longest AUTH command or SASL response line, CRLF included (RFC 4954 §4).
pub const AUTH_LINE_BYTES_MAX: usize = 12288;

/// What the extensions offered add to the command line limit of MAIL (RFC 5321
/// §4.5.3.1.4: "SMTP extensions may be used to increase this limit"): SIZE 26
/// (RFC 1870), ENVID and RET 100 (RFC 3461), AUTH= 500 (RFC 4954), SMTPUTF8 10
/// (RFC 6531).
const MAIL_PARAMS_BYTES: usize = 26 + 100 + 500 + 10;
/// And of RCPT: NOTIFY and ORCPT 500 (RFC 3461 §5).
const RCPT_PARAMS_BYTES: usize = 500;

/// The driver's answer to `Step::Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthVerdict {
    /// The password is right; the identity is the account's address.
    Ok(String),
    /// Wrong user or password: `535 5.7.8`.
    Failed,
    /// The check could not run now (busy, rate-limited): `454 4.7.0`.
    TempFail,
}

/// What the account directory says about a recipient in a local domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalVerdict {
    Accept,
    /// No user, alias or catch-all has it: `550 5.1.1`.
    Unknown,
    /// Its mailbox is at or over quota, or the announced size would take it over:
    /// `452 4.2.2`.
    Full,
}

/// The account directory as RCPT asks it. The driver supplies it
/// ([`Session::set_local_recipients`]); without one every recipient of a local
/// domain is accepted. `postmaster` is never asked about: it is always accepted
/// (RFC 5321 §4.5.1).
pub trait LocalRecipients {
    /// `address` as the client gave it, whose `domain` is local; `declared`: the
    /// MAIL command's SIZE=, if any.
    fn check(&self, address: &str, domain: &str, declared: Option<u64>) -> LocalVerdict;

    /// Whether the account `login` (as `AuthVerdict::Ok` named it) may use `sender`
    /// as its MAIL FROM: its own address, or an alias of it.
    fn may_send_as(&self, login: &str, sender: &str) -> bool;
}

/// A message the client finished sending, to be made durable by the driver.
#[derive(Debug, Default)]
pub struct Transaction {
    pub from: String,
    pub recipients: Vec<Recipient>,
    /// The text, where the session received it (see `Body`).
    pub body: Body,
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub ret: Ret,
    pub envid: Option<String>,
    pub helo: String,
    /// `with` protocol for the Received header (RFC 3848, RFC 6531).
    pub protocol: &'static str,
    /// The account the client authenticated as (AUTH), if any.
    pub auth: Option<String>,
    /// What the header section has (`Date:`, `Message-ID:`, hops).
    pub headers: super::headers::HeaderFacts,
    /// It came through the submission listener (RFC 6409).
    pub submission: bool,
}

#[derive(Debug)]
pub enum Step {
    /// All buffered input is consumed: write the output, then read more.
    NeedInput,
    /// A message is complete: make it durable, then call `message_stored`/`message_failed`.
    Message(Box<Transaction>),
    /// Write the output, then close the connection.
    Close,
    /// Check this user name and password (AUTH), then call `auth_done`.
    Authenticate { user: String, password: String },
    /// STARTTLS was accepted: write the output (the 220) in plaintext, run the TLS
    /// handshake, then call `tls_started` (or close if it failed). Input that came
    /// after the command was discarded.
    StartTls,
}

/// Where a SASL exchange is (RFC 4954).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sasl {
    /// PLAIN without an initial response: its one response.
    Plain,
    /// LOGIN: the user name, then the password.
    LoginUser,
    LoginPassword,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Command,
    /// After a command line longer than the limit: skip to its end.
    SkipLine,
    Data,
    /// Waiting for the driver's TLS handshake after STARTTLS.
    StartTls,
    /// After a 334: the next line is a SASL response.
    Sasl(Sasl),
    /// Waiting for the driver's `auth_done`.
    Authenticating,
    /// Reading a BDAT chunk: `remaining` bytes, then the reply (or the commit if `last`).
    /// `valid`: false when there is no transaction to add it to (503 after reading it).
    /// `gather`: the chunk is tiny, its bytes are copied together (see `Body::gather`).
    Bdat {
        remaining: usize,
        last: bool,
        valid: bool,
        gather: bool,
    },
    /// A message was handed out; waiting for the driver's verdict.
    Storing,
    Closed,
}

/// A refusal the driver logs and counts: a whole message (at the end of its text) or
/// one recipient (at RCPT), with why and the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub why: crate::metrics::Reject,
    /// The recipient refused; None for a message.
    pub rcpt: Option<String>,
    pub reply: String,
}

/// Why a message that was read to its end is refused. When several apply, the
/// last (in this order) is answered: which limit the reader notices first depends on
/// how the input was split into reads, and the reply must not. A malformed text says
/// more about the message than its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refusal {
    TooBig,
    LineTooLong,
    BareNewline,
}

impl Refusal {
    fn why(self) -> crate::metrics::Reject {
        match self {
            Refusal::BareNewline => crate::metrics::Reject::BareNewline,
            Refusal::LineTooLong => crate::metrics::Reject::LineTooLong,
            Refusal::TooBig => crate::metrics::Reject::TooBig,
        }
    }

    fn reply(self) -> &'static str {
        match self {
            Refusal::BareNewline => "550 5.6.0 Message refused: bare CR or LF in DATA\r\n",
            Refusal::LineTooLong => {
                "550 5.6.0 Message refused: text line longer than 1000 octets\r\n"
            }
            Refusal::TooBig => "552 5.3.4 Message size exceeds fixed maximum message size\r\n",
        }
    }
}

#[derive(Debug, Default)]
struct Mail {
    from: Mailbox,
    smtputf8: bool,
    body_type: BodyType,
    ret: Ret,
    envid: Option<String>,
    recipients: Vec<Recipient>,
    body: Body,
    /// How large the message is expected to be (SIZE=, or the session's last one):
    /// receive chunks are sized by it.
    expected: Option<usize>,
    /// The SIZE= of the MAIL command (quotas are checked against it at RCPT).
    declared: Option<usize>,
    /// Bytes of the message seen, stored or not (the size limit counts these).
    size: usize,
    refusal: Option<Refusal>,
    /// BDAT was used in this transaction: DATA is out of sequence now.
    chunking: bool,
}

/// Where the DATA decoder stands inside the current line.
#[derive(Debug, Default, Clone, Copy)]
struct DataLine {
    /// Octets of the current line seen so far, a dot removed for transparency not
    /// counted (RFC 5321 §4.5.3.1.6).
    len: usize,
    /// Something of the current line was seen (its stuffed dot, say): a dot now is
    /// text, not the start of a line.
    started: bool,
    /// The last octet seen was a CR whose LF has not arrived yet.
    cr: bool,
}

/// What [`DataLine::take`] took.
struct Taken {
    /// Octets of text consumed.
    n: usize,
    /// They hold a CR or LF alone.
    bare: bool,
    /// The line is over `max` octets.
    long: bool,
}

impl DataLine {
    /// Takes message text from the start of `text` (not empty): the LF of a pending
    /// CR, or the text through its next CR or LF (all of it when there is none). A
    /// CR not followed by its LF is taken as nothing and reported bare. The one line
    /// state machine of DATA and BDAT: lines continue across calls, and a CRLF ends
    /// the line after its length was checked against `max`.
    fn take(&mut self, text: &[u8], max: usize) -> Taken {
        if self.cr {
            self.cr = false;
            if text[0] != b'\n' {
                return Taken {
                    n: 0,
                    bare: true,
                    long: false,
                };
            }
            self.len += 1;
            let long = self.len > max;
            self.len = 0;
            self.started = false;
            return Taken {
                n: 1,
                bare: false,
                long,
            };
        }
        let (n, stop) = match memchr::memchr2(b'\r', b'\n', text) {
            None => (text.len(), None),
            Some(i) => (i + 1, Some(text[i])),
        };
        self.len += n;
        self.started = true;
        self.cr = stop == Some(b'\r');
        Taken {
            n,
            bare: stop == Some(b'\n'),
            long: self.len > max,
        }
    }
}

pub struct Session {
    cfg: std::rc::Rc<Config>,
    relay_allowed: bool,
    /// Received bytes live in `input[start..end]`; `input` never shrinks below its
    /// length. While it holds text of the message being received (see `pinned`) it is
    /// neither compacted nor grown: a full one is retired into the message's `Body`
    /// and the next bytes go to a new chunk.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// DATA: where the text not yet added to the body starts in `input`.
    live_from: Option<usize>,
    /// The receive chunk lent to the body handed out last; `input` is empty
    /// meanwhile. Taken back (see `reclaim`) once the driver dropped the body.
    shared: Option<Rc<Vec<u8>>>,
    /// Size of the next receive chunk of a message without a size hint: doubles.
    chunk_bytes: usize,
    /// Body bytes this session copied (only when a driver kept a body past its
    /// verdict; see `reclaim`).
    copied: usize,
    out: Vec<u8>,
    state: State,
    helo: Option<String>,
    esmtp: bool,
    mail: Option<Mail>,
    line: DataLine,
    errors: u32,
    /// Size of the last message of this session: the next one is likely alike.
    last_body_len: usize,
    recipients: Option<Rc<dyn LocalRecipients>>,
    /// The session runs under TLS (after STARTTLS, or on an implicit-TLS listener).
    tls: bool,
    /// The account AUTH verified.
    authenticated: Option<String>,
    /// AUTH LOGIN's user name, until its password comes.
    sasl_user: Option<String>,
    /// Refusals since the driver last took them (`take_refused`), for its log and
    /// metrics: what, and the reply line sent.
    refused: Vec<Refused>,
}

const READ_CHUNK_BYTES: usize = 16 << 10;

/// The largest receive chunk: a message larger than this is received into several
/// (they are never reallocated, so size only bounds the slack of the last one).
const BODY_CHUNK_MAX: usize = 1 << 20;

/// A receive chunk holding text is retired when less than this is left free in it.
const CHUNK_FREE_MIN: usize = 2 << 10;

impl Session {
    /// Starts a session and queues the greeting. `relay_allowed`: the client's address
    /// is in a relay network, so it may send to any domain.
    pub fn new(cfg: std::rc::Rc<Config>, relay_allowed: bool) -> Session {
        let mut s = Session {
            cfg,
            relay_allowed,
            input: vec![0; READ_CHUNK_BYTES],
            start: 0,
            end: 0,
            live_from: None,
            shared: None,
            chunk_bytes: READ_CHUNK_BYTES,
            copied: 0,
            out: Vec::with_capacity(512),
            refused: Vec::new(),
            state: State::Command,
            helo: None,
            esmtp: false,
            mail: None,
            line: DataLine::default(),
            errors: 0,
            last_body_len: 0,
            recipients: None,
            tls: false,
            authenticated: None,
            sasl_user: None,
        };
        let greeting = format!("220 {} ESMTP ringmail\r\n", s.cfg.hostname);
        s.reply(&greeting);
        s
    }

    /// The connection is under TLS from its start (an implicit-TLS listener): STARTTLS
    /// is neither offered nor accepted, and Received says ESMTPS.
    pub fn set_tls(&mut self) {
        self.tls = true;
    }

    /// The TLS handshake after `Step::StartTls` succeeded. The session starts over as
    /// RFC 3207 §4.2 requires: the client must say EHLO again, and nothing it said
    /// before counts.
    pub fn tls_started(&mut self) {
        assert_eq!(self.state, State::StartTls, "no STARTTLS was accepted");
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.mail = None;
        self.state = State::Command;
    }

    pub fn in_tls(&self) -> bool {
        self.tls
    }

    /// The account the client authenticated as.
    pub fn authenticated(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    /// The answer to `Step::Authenticate`. A verified client may relay to any
    /// domain from now on.
    pub fn auth_done(&mut self, verdict: AuthVerdict) {
        assert_eq!(
            self.state,
            State::Authenticating,
            "no AUTH was being checked"
        );
        self.state = State::Command;
        match verdict {
            AuthVerdict::Ok(identity) => {
                self.authenticated = Some(identity);
                self.relay_allowed = true;
                self.reply("235 2.7.0 Authentication successful\r\n");
            }
            AuthVerdict::Failed => self.error("535 5.7.8 Error: authentication failed\r\n"),
            AuthVerdict::TempFail => {
                self.reply("454 4.7.0 Temporary authentication failure, try again later\r\n")
            }
        }
    }

    /// Recipients of local domains are checked against `r` from now on.
    pub fn set_local_recipients(&mut self, r: Rc<dyn LocalRecipients>) {
        self.recipients = Some(r);
    }

    /// Free space to receive into; report how much was received with `filled`.
    pub fn read_buf(&mut self) -> &mut [u8] {
        self.reclaim();
        if self.input.is_empty() {
            // The buffer lent to a receive never came back (the driver dropped the
            // receive): what it held is gone, and with it the message in progress.
            self.input = vec![0; READ_CHUNK_BYTES];
            self.start = 0;
            self.end = 0;
            if self.live_from.take().is_some()
                || self.mail.as_ref().is_some_and(|m| m.body.uses_current())
            {
                self.mail = None;
            }
        }
        if self.pinned() {
            if self.input.len() - self.end < CHUNK_FREE_MIN {
                self.retire_chunk();
            }
            return &mut self.input[self.end..];
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.input.len() > 2 * READ_CHUNK_BYTES {
                // An idle session keeps a small buffer, not its last message's chunk.
                self.input = vec![0; READ_CHUNK_BYTES];
            }
        } else if self.start > 0 && self.input.len() - self.end < READ_CHUNK_BYTES / 2 {
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.input.len() - self.end < READ_CHUNK_BYTES / 2 {
            // Only a partial line or chunk can be pending here, and those are bounded by
            // the limits (the decoders consume content as it arrives).
            let len = self.input.len() + READ_CHUNK_BYTES;
            self.input.resize(len, 0);
        }
        &mut self.input[self.end..]
    }

    /// Lends the receive buffer to a receive that owns its buffer until it completes
    /// (io_uring): the kernel writes at `buf[at..]`, straight where the session keeps
    /// the bytes. Hand it back with `received`.
    pub fn lend_read_buf(&mut self) -> (Vec<u8>, usize) {
        self.read_buf();
        (std::mem::take(&mut self.input), self.end)
    }

    /// The buffer lent by `lend_read_buf` is back with `n` more bytes.
    pub fn received(&mut self, buf: Vec<u8>, n: usize) {
        debug_assert!(self.input.is_empty(), "received without lend_read_buf");
        self.input = buf;
        self.filled(n);
    }

    /// Body bytes this session copied itself (besides what `Body::copied_bytes`
    /// counts): only when a driver kept a body past its verdict.
    pub fn copied_bytes(&self) -> usize {
        self.copied
    }

    /// The receive chunk holds text of the message being received: its bytes must
    /// stay where they are.
    fn pinned(&self) -> bool {
        self.mail.as_ref().is_some_and(|m| {
            m.refusal.is_none() && (self.live_from.is_some() || m.body.uses_current())
        })
    }

    /// Moves on to a new receive chunk; the full one goes to the message's body. Only
    /// undecided bytes move along: at most ".\r" of DATA (a line start that may be
    /// the end), or a partial command line between BDAT chunks, never stored text.
    fn retire_chunk(&mut self) {
        let keep = self.start..self.end;
        let size = self.next_chunk_bytes().max(keep.len() + CHUNK_FREE_MIN);
        let mut fresh = vec![0u8; size];
        fresh[..keep.len()].copy_from_slice(&self.input[keep.clone()]);
        let old = std::mem::replace(&mut self.input, fresh);
        let mail = self.mail.as_mut().unwrap();
        if let Some(from) = self.live_from {
            mail.body.add(from..self.start);
            self.live_from = Some(0);
        }
        if mail.body.retire_full(Rc::new(old)) {
            // The chunk was mostly command lines, not text: it says nothing about
            // the message's size, so the next one need not be larger.
            self.chunk_bytes = READ_CHUNK_BYTES;
        }
        self.end -= self.start;
        self.start = 0;
    }

    /// Memory the session holds for the message being received and its input: the
    /// receive chunk and what the message's body holds. Bounded by a multiple of the
    /// text received, however the client splits and pads it.
    pub fn held_bytes(&self) -> usize {
        let body = self.mail.as_ref().map_or(0, |m| m.body.held_bytes());
        self.input.capacity() + body
    }

    /// Chunks are sized by what is still expected, else they double: a large
    /// message costs a few allocations and no copies.
    fn next_chunk_bytes(&mut self) -> usize {
        let expected = self
            .mail
            .as_ref()
            .and_then(|m| m.expected.map(|e| e.saturating_sub(m.size)))
            .unwrap_or(0);
        let size = expected
            .saturating_add(CHUNK_FREE_MIN)
            .max(self.chunk_bytes)
            .clamp(READ_CHUNK_BYTES, BODY_CHUNK_MAX);
        self.chunk_bytes = (size * 2).min(BODY_CHUNK_MAX);
        size
    }

    /// Takes back the receive chunk lent to the last body. If the driver still holds
    /// that body, the unread bytes after it are copied to a chunk of their own.
    fn reclaim(&mut self) {
        let Some(chunk) = self.shared.take() else {
            return;
        };
        match Rc::try_unwrap(chunk) {
            Ok(v) => self.input = v,
            Err(chunk) => {
                let keep = &chunk[self.start..self.end];
                let mut fresh = vec![0u8; READ_CHUNK_BYTES.max(keep.len() + CHUNK_FREE_MIN)];
                fresh[..keep.len()].copy_from_slice(keep);
                // Counted as body bytes: they may be the next message's BDAT text.
                self.copied += keep.len();
                self.input = fresh;
                self.end -= self.start;
                self.start = 0;
            }
        }
    }

    /// `n` bytes were received into the last `read_buf`.
    pub fn filled(&mut self, n: usize) {
        assert!(self.end + n <= self.input.len(), "filled past read_buf");
        self.end += n;
    }

    /// Copies received bytes in (tests and simple drivers).
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let buf = self.read_buf();
            let n = buf.len().min(data.len());
            buf[..n].copy_from_slice(&data[..n]);
            self.filled(n);
            data = &data[n..];
        }
    }

    /// Replies queued for the client.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// The driver wrote the whole output.
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Whether the session has ended (after QUIT, a fatal error, a timeout or shutdown).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether a message is being received (the server lets it finish on shutdown).
    pub fn in_message(&self) -> bool {
        matches!(
            self.state,
            State::Data | State::Bdat { .. } | State::Storing
        )
    }

    /// The client stayed silent past the idle timeout.
    pub fn idle_timeout(&mut self) {
        self.close_with("421 4.4.2 Error: timeout exceeded, closing connection\r\n");
    }

    /// The server is shutting down.
    pub fn shutdown(&mut self) {
        self.close_with("421 4.3.2 Service shutting down, closing connection\r\n");
    }

    fn close_with(&mut self, reply: &str) {
        if self.state != State::Closed {
            self.reply(reply);
            self.state = State::Closed;
        }
    }

    /// The message handed out by the last `Step::Message` is durable under `id`.
    /// Drop the transaction's body first: the session then receives on into the
    /// buffer the body's end is in.
    pub fn message_stored(&mut self, id: &str) {
        assert_eq!(self.state, State::Storing, "no message was being stored");
        self.reclaim();
        let reply = format!("250 2.0.0 Ok: queued as {id}\r\n");
        self.reply(&reply);
        self.state = State::Command;
    }

    /// The message could not be made durable; `reply` is the full reply line.
    pub fn message_failed(&mut self, reply: &str) {
        assert_eq!(self.state, State::Storing, "no message was being stored");
        self.reclaim();
        self.reply(reply);
        self.state = State::Command;
    }

    /// Runs the state machine over the buffered input.
    pub fn process(&mut self) -> Step {
        if self.state != State::Storing {
            self.reclaim();
        }
        loop {
            let step = match self.state {
                State::Closed => return Step::Close,
                State::Storing => return Step::NeedInput,
                State::StartTls => return Step::StartTls,
                State::Authenticating => return Step::NeedInput,
                State::Sasl(stage) => self.sasl_response(stage),
                State::Command => self.command(),
                State::SkipLine => self.skip_line(),
                State::Data => self.data(),
                State::Bdat {
                    remaining,
                    last,
                    valid,
                    gather,
                } => self.bdat(remaining, last, valid, gather),
            };
            if let Some(step) = step {
                return step;
            }
        }
    }

    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
    }

    fn refused(&mut self, why: crate::metrics::Reject, rcpt: Option<&str>, reply: &str) {
        self.refused.push(Refused {
            why,
            rcpt: rcpt.map(str::to_string),
            reply: reply.trim_end().to_string(),
        });
    }

    /// The refusals since the last call (each once).
    pub fn take_refused(&mut self) -> Vec<Refused> {
        std::mem::take(&mut self.refused)
    }

    /// Counts an error reply; too many close the session.
    fn error(&mut self, text: &str) {
        self.reply(text);
        self.errors += 1;
        if self.errors >= self.cfg.limits.error_count_max {
            self.close_with("421 4.7.0 Error: too many errors, closing connection\r\n");
        }
    }

    fn pending(&self) -> &[u8] {
        &self.input[self.start..self.end]
    }

    fn command(&mut self) -> Option<Step> {
        let pending = self.pending();
        let verb = |v: &[u8]| pending.len() >= 5 && pending[..5].eq_ignore_ascii_case(v);
        let base = self.cfg.limits.line_bytes_max;
        let max = if self.cfg.auth && verb(b"AUTH ") {
            // AUTH carries a SASL initial response (RFC 4954 §4).
            AUTH_LINE_BYTES_MAX.max(base)
        } else if verb(b"MAIL ") {
            base + MAIL_PARAMS_BYTES
        } else if verb(b"RCPT ") {
            base + RCPT_PARAMS_BYTES
        } else {
            base
        };
        let Some(nl) = memchr::memchr(b'\n', pending) else {
            if pending.len() >= max {
                self.start = self.end;
                self.state = State::SkipLine;
                self.error("500 5.5.2 Error: line too long\r\n");
                return None;
            }
            return Some(Step::NeedInput);
        };
        let line_start = self.start;
        self.start += nl + 1;
        if nl + 1 > max {
            self.error("500 5.5.2 Error: line too long\r\n");
            return None;
        }
        let mut line = &self.input[line_start..line_start + nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let Ok(line) = std::str::from_utf8(line) else {
            self.error("500 5.5.2 Error: command is not valid UTF-8\r\n");
            return None;
        };
        let line = line.to_owned();
        self.dispatch(&line)
    }

    fn skip_line(&mut self) -> Option<Step> {
        match memchr::memchr(b'\n', self.pending()) {
            Some(nl) => {
                self.start += nl + 1;
                self.state = State::Command;
                None
            }
            None => {
                self.start = self.end;
                Some(Step::NeedInput)
            }
        }
    }

    fn dispatch(&mut self, line: &str) -> Option<Step> {
        let (verb, arg) = match line.find(' ') {
            Some(i) => (&line[..i], line[i + 1..].trim_end_matches(' ')),
            None => (line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => self.helo_cmd(arg, true),
            "HELO" => self.helo_cmd(arg, false),
            "MAIL" => self.mail_cmd(arg),
            "RCPT" => self.rcpt_cmd(arg),
            "DATA" => self.data_cmd(arg),
            "BDAT" => return self.bdat_cmd(arg),
            "RSET" => {
                if arg.is_empty() {
                    self.mail = None;
                    self.reply("250 2.0.0 Ok\r\n");
                } else {
                    self.error("501 5.5.4 Syntax: RSET\r\n");
                }
            }
            "NOOP" => self.reply("250 2.0.0 Ok\r\n"),
            "QUIT" => {
                self.reply("221 2.0.0 Bye\r\n");
                self.state = State::Closed;
            }
            "VRFY" => {
                if arg.is_empty() {
                    self.error("501 5.5.4 Syntax: VRFY address\r\n");
                } else {
                    self.reply("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n");
                }
            }
            "HELP" => self.reply(if self.offers_starttls() {
                "214-2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS\r\n214 2.0.0 See RFC 5321\r\n"
            } else {
                "214-2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\r\n214 2.0.0 See RFC 5321\r\n"
            }),
            "STARTTLS" if self.cfg.starttls => return self.starttls_cmd(arg),
            "AUTH" if self.cfg.auth => return self.auth_cmd(arg),
            "EXPN" | "ETRN" | "TURN" | "STARTTLS" | "AUTH" => self.error("502 5.5.1 Error: command not implemented\r\n"),
            "" => self.error("500 5.5.2 Error: bad syntax\r\n"),
            _ => self.error("500 5.5.2 Error: command not recognized\r\n"),
        }
        None
    }

    fn helo_cmd(&mut self, arg: &str, extended: bool) {
        if arg.is_empty() || arg.contains(' ') || arg.bytes().any(|c| c.is_ascii_control()) {
            let r = if extended {
                "501 5.5.4 Syntax: EHLO hostname\r\n"
            } else {
                "501 5.5.4 Syntax: HELO hostname\r\n"
            };
            self.error(r);
            return;
        }
        // EHLO/HELO resets the transaction (RFC 5321 §4.1.4).
        self.mail = None;
        self.helo = Some(arg.to_string());
        self.esmtp = extended;
        if !extended {
            let r = format!("250 {}\r\n", self.cfg.hostname);
            self.reply(&r);
            return;
        }
        let r = format!(
            "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-DSN\r\n{}{}250 HELP\r\n",
            self.cfg.hostname,
            self.cfg.limits.message_bytes_max,
            if self.offers_starttls() { "250-STARTTLS\r\n" } else { "" },
            if self.offers_auth() { "250-AUTH PLAIN LOGIN\r\n" } else { "" },
        );
        self.reply(&r);
    }

    fn offers_starttls(&self) -> bool {
        self.cfg.starttls && !self.tls
    }

    fn offers_auth(&self) -> bool {
        self.cfg.auth && (self.tls || self.cfg.auth_without_tls) && self.authenticated.is_none()
    }

    /// RFC 4954: `AUTH PLAIN [initial]` or `AUTH LOGIN [user]`.
    fn auth_cmd(&mut self, arg: &str) -> Option<Step> {
        if self.helo.is_none() || !self.esmtp {
            self.error("503 5.5.1 Error: send EHLO first\r\n");
            return None;
        }
        if self.authenticated.is_some() {
            self.error("503 5.5.1 Error: already authenticated\r\n");
            return None;
        }
        if self.mail.is_some() {
            self.error("503 5.5.1 Error: MAIL transaction in progress\r\n");
            return None;
        }
        if !self.offers_auth() {
            self.error("538 5.7.11 Encryption required for requested authentication mechanism\r\n");
            return None;
        }
        let (mech, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m, Some(i)),
            None => (arg, None),
        };
        match (mech.to_ascii_uppercase().as_str(), initial) {
            ("PLAIN", None) => {
                self.reply("334 \r\n");
                self.state = State::Sasl(Sasl::Plain);
                None
            }
            ("PLAIN", Some(i)) => self.sasl_response_line(Sasl::Plain, i),
            ("LOGIN", None) => {
                // "Username:"
                self.reply("334 VXNlcm5hbWU6\r\n");
                self.state = State::Sasl(Sasl::LoginUser);
                None
            }
            ("LOGIN", Some(i)) => self.sasl_response_line(Sasl::LoginUser, i),
            ("", _) => {
                self.error("501 5.5.4 Syntax: AUTH mechanism\r\n");
                None
            }
            _ => {
                self.error("504 5.5.4 Unrecognized authentication type\r\n");
                None
            }
        }
    }

    /// The line after a 334.
    fn sasl_response(&mut self, stage: Sasl) -> Option<Step> {
        let pending = self.pending();
        let Some(nl) = memchr::memchr(b'\n', pending) else {
            if pending.len() >= AUTH_LINE_BYTES_MAX {
                self.start = self.end;
                self.state = State::SkipLine;
                self.error("500 5.5.2 Error: line too long\r\n");
                return None;
            }
            return Some(Step::NeedInput);
        };
        let line_start = self.start;
        self.start += nl + 1;
        self.state = State::Command;
        if nl + 1 > AUTH_LINE_BYTES_MAX {
            self.error("500 5.5.2 Error: line too long\r\n");
            return None;
        }
        let mut line = &self.input[line_start..line_start + nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let line = String::from_utf8_lossy(line).into_owned();
        self.sasl_response_line(stage, &line)
    }

    fn sasl_response_line(&mut self, stage: Sasl, line: &str) -> Option<Step> {
        use base64::Engine as _;
        self.state = State::Command;
        if line == "*" {
            self.sasl_user = None;
            self.error("501 5.7.0 Authentication aborted\r\n");
            return None;
        }
        // "=" is an empty initial response (RFC 4954 §4).
        let decoded = if line == "=" {
            Ok(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(line.trim())
        };
        let Ok(decoded) = decoded else {
            self.sasl_user = None;
            self.error("501 5.5.2 Error: cannot decode the response\r\n");
            return None;
        };
        let bad = |s: &mut Self| {
            s.sasl_user = None;
            s.error("501 5.5.2 Error: invalid response\r\n");
            None
        };
        match stage {
            Sasl::Plain => {
                // authzid NUL authcid NUL password (RFC 4616); acting for another
                // identity is not offered.
                let mut parts = decoded.split(|b| *b == 0);
                let (Some(authz), Some(user), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return bad(self);
                };
                let (Ok(authz), Ok(user), Ok(password)) = (
                    std::str::from_utf8(authz),
                    std::str::from_utf8(user),
                    std::str::from_utf8(password),
                ) else {
                    return bad(self);
                };
                if user.is_empty() || (!authz.is_empty() && authz != user) {
                    self.error("535 5.7.8 Error: authentication failed\r\n");
                    return None;
                }
                self.state = State::Authenticating;
                Some(Step::Authenticate {
                    user: user.to_string(),
                    password: password.to_string(),
                })
            }
            Sasl::LoginUser => {
                let Ok(user) = String::from_utf8(decoded) else {
                    return bad(self);
                };
                if user.is_empty() {
                    return bad(self);
                }
                self.sasl_user = Some(user);
                // "Password:"
                self.reply("334 UGFzc3dvcmQ6\r\n");
                self.state = State::Sasl(Sasl::LoginPassword);
                None
            }
            Sasl::LoginPassword => {
                let user = self.sasl_user.take().unwrap_or_default();
                let Ok(password) = String::from_utf8(decoded) else {
                    return bad(self);
                };
                self.state = State::Authenticating;
                Some(Step::Authenticate { user, password })
            }
        }
    }

    /// RFC 3207. Whatever the client pipelined after STARTTLS is dropped unread: it
    /// came in plaintext, and must not pass for commands sent under TLS (the
    /// CVE-2011-0411 command injection).
    fn starttls_cmd(&mut self, arg: &str) -> Option<Step> {
        if self.tls {
            self.error("554 5.5.1 Error: TLS already active\r\n");
            return None;
        }
        if !arg.is_empty() {
            self.error("501 5.5.4 Syntax: STARTTLS\r\n");
            return None;
        }
        if self.mail.is_some() {
            self.error("503 5.5.1 Error: MAIL transaction in progress\r\n");
            return None;
        }
        // The session would start over, the authentication with it: refused
        // instead, as Postfix does.
        if self.authenticated.is_some() {
            self.error("503 5.5.1 Error: already authenticated\r\n");
            return None;
        }
        self.reply("220 2.0.0 Ready to start TLS\r\n");
        self.start = self.end;
        self.state = State::StartTls;
        Some(Step::StartTls)
    }

    fn mail_cmd(&mut self, arg: &str) {
        if self.helo.is_none() {
            return self.error("503 5.5.1 Error: send HELO/EHLO first\r\n");
        }
        if self.mail.is_some() {
            return self.error("503 5.5.1 Error: nested MAIL command\r\n");
        }
        if self.cfg.submission && self.authenticated.is_none() {
            let r = "530 5.7.0 Authentication required\r\n";
            self.refused(crate::metrics::Reject::AuthRequired, None, r);
            return self.error(r);
        }
        let Some(path) = strip_prefix_ci(arg, "FROM:") else {
            return self.error("501 5.5.4 Syntax: MAIL FROM:<address>\r\n");
        };
        let (from, params) = match parse_path(path.trim_start_matches(' '), true, false) {
            Ok(x) => x,
            Err(PathError::TooLong) => {
                return self.error("501 5.1.7 Bad sender address syntax: too long\r\n")
            }
            Err(PathError::Syntax) => return self.error("501 5.1.7 Bad sender address syntax\r\n"),
            Err(PathError::Literal) => return self.error(
                "501 5.1.7 Bad sender address syntax: not an address literal (RFC 5321 4.1.3)\r\n",
            ),
        };
        // A bounce goes to the sender's domain: one that routing cannot take would
        // wait out the queue lifetime there, so it is refused now, as at RCPT.
        if let Some(d) = from.domain() {
            match parse_domain(d) {
                Ok(_) => {}
                Err(e @ (DomainError::Undeliverable | DomainError::Name)) => {
                    let r = format!(
                        "553 5.1.7 <{}>: Sender domain is {e}\r\n",
                        sanitize(&from.address)
                    );
                    return self.error(&r);
                }
                Err(DomainError::Literal) => return self.error(
                    "501 5.1.7 Bad sender address syntax: not an address literal (RFC 5321 4.1.3)\r\n",
                ),
            }
        }
        let mut mail = Mail {
            from,
            ..Mail::default()
        };
        // Chunks grow while one message is received; a new one starts small again
        // (its size hint, if any, sizes them).
        self.chunk_bytes = READ_CHUNK_BYTES;
        let mut seen: Vec<String> = Vec::new();
        let mut declared = None;
        for param in params.split(' ').filter(|p| !p.is_empty()) {
            if !self.esmtp {
                return self.error("555 5.5.4 Error: MAIL parameters need EHLO\r\n");
            }
            let (key, value) = split_param(param);
            if seen.contains(&key) {
                return self.error("501 5.5.4 Error: duplicate MAIL parameter\r\n");
            }
            seen.push(key.clone());
            match (key.as_str(), value) {
                ("SIZE", Some(v)) => {
                    let Some(size) = parse_decimal(v) else {
                        return self.error("501 5.5.4 Syntax: SIZE=<number>\r\n");
                    };
                    if size > self.cfg.limits.message_bytes_max as u64 {
                        return self.error(
                            "552 5.3.4 Message size exceeds fixed maximum message size\r\n",
                        );
                    }
                    declared = Some(size as usize);
                }
                ("BODY", Some(v)) => {
                    mail.body_type = match v.to_ascii_uppercase().as_str() {
                        "7BIT" => BodyType::SevenBit,
                        "8BITMIME" => BodyType::EightBitMime,
                        _ => {
                            return self.error("501 5.5.4 Error: BODY must be 7BIT or 8BITMIME\r\n")
                        }
                    }
                }
                ("SMTPUTF8", None) => mail.smtputf8 = true,
                ("RET", Some(v)) => {
                    mail.ret = match v.to_ascii_uppercase().as_str() {
                        "FULL" => Ret::Full,
                        "HDRS" => Ret::Hdrs,
                        _ => return self.error("501 5.5.4 Error: RET must be FULL or HDRS\r\n"),
                    }
                }
                ("ENVID", Some(v)) => {
                    if v.is_empty() || v.len() > 100 || !valid_xtext(v) {
                        return self.error("501 5.5.4 Error: bad ENVID syntax\r\n");
                    }
                    mail.envid = Some(v.to_string());
                }
                // RFC 4954 §5: who submitted the message first. Accepted, and not
                // passed on: delivery does not authenticate to the next hop.
                ("AUTH", Some(v)) if self.cfg.auth => {
                    if v != "<>" && !valid_xtext(v) {
                        return self.error("501 5.5.4 Error: bad AUTH= syntax\r\n");
                    }
                }
                // A parameter we offer, in the wrong form: a syntax error, not an
                // unknown parameter (RFC 1870 "SIZE=" size-value, RFC 6531 no value).
                ("SIZE" | "BODY" | "RET" | "ENVID", None) | ("SMTPUTF8", Some(_)) => {
                    let r = format!("501 5.5.4 Error: bad {key} syntax\r\n");
                    return self.error(&r);
                }
                _ => {
                    let r = format!(
                        "555 5.5.4 Error: unsupported MAIL parameter {}\r\n",
                        sanitize(param)
                    );
                    return self.error(&r);
                }
            }
        }
        if !mail.from.is_ascii() && !mail.smtputf8 {
            return self.error("553 5.6.7 Error: non-ASCII address needs SMTPUTF8\r\n");
        }
        if let (Some(login), Some(r), true, false) = (
            &self.authenticated,
            &self.recipients,
            self.cfg.sender_login_match,
            mail.from.is_null(),
        ) {
            if !r.may_send_as(login, &mail.from.address) {
                let r = format!(
                    "553 5.7.1 <{}>: Sender address rejected: not owned by user {}\r\n",
                    sanitize(&mail.from.address),
                    sanitize(login)
                );
                self.refused(crate::metrics::Reject::SenderNotOwned, None, &r);
                return self.error(&r);
            }
        }
        // Receive chunks of about the right size (they never grow by copying).
        mail.declared = declared;
        mail.expected = declared
            .or((self.last_body_len > 0).then(|| self.last_body_len + self.last_body_len / 8));
        self.mail = Some(mail);
        self.reply("250 2.1.0 Ok\r\n");
    }

    fn rcpt_cmd(&mut self, arg: &str) {
        let Some(mail) = self.mail.as_ref() else {
            return self.error("503 5.5.1 Error: need MAIL command\r\n");
        };
        let smtputf8 = mail.smtputf8;
        let count = mail.recipients.len();
        let Some(path) = strip_prefix_ci(arg, "TO:") else {
            return self.error("501 5.5.4 Syntax: RCPT TO:<address>\r\n");
        };
        let (to, params) = match parse_path(path.trim_start_matches(' '), false, true) {
            Ok(x) => x,
            Err(PathError::TooLong) => {
                return self.error("501 5.1.3 Bad recipient address syntax: too long\r\n")
            }
            Err(PathError::Syntax) => {
                return self.error("501 5.1.3 Bad recipient address syntax\r\n")
            }
            Err(PathError::Literal) => {
                return self.error(
                    "501 5.1.3 Bad recipient address syntax: not an address literal (RFC 5321 4.1.3)\r\n",
                )
            }
        };
        let mut rcpt = Recipient {
            address: to.address.clone(),
            notify: 0,
            orcpt: None,
        };
        for param in params.split(' ').filter(|p| !p.is_empty()) {
            if !self.esmtp {
                return self.error("555 5.5.4 Error: RCPT parameters need EHLO\r\n");
            }
            let (key, value) = split_param(param);
            match (key.as_str(), value) {
                ("NOTIFY", Some(v)) if rcpt.notify == 0 => match parse_notify(v) {
                    Some(bits) => rcpt.notify = bits,
                    None => return self.error("501 5.5.4 Error: bad NOTIFY syntax\r\n"),
                },
                ("ORCPT", Some(v)) if rcpt.orcpt.is_none() => {
                    let ok = v.split_once(';').is_some_and(|(t, a)| {
                        !t.is_empty()
                            && t.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                            && !a.is_empty()
                            && a.len() <= 500
                            // RFC 6533's utf-8-addr-xtext: printable or UTF-8,
                            // never a control character.
                            && (valid_xtext(a) || (smtputf8 && !a.chars().any(char::is_control)))
                    });
                    if !ok {
                        return self.error("501 5.5.4 Error: bad ORCPT syntax\r\n");
                    }
                    rcpt.orcpt = Some(v.to_string());
                }
                _ => {
                    let r = format!(
                        "555 5.5.4 Error: unsupported RCPT parameter {}\r\n",
                        sanitize(param)
                    );
                    return self.error(&r);
                }
            }
        }
        if !to.is_ascii() && !smtputf8 {
            return self.error("553 5.6.7 Error: non-ASCII address needs SMTPUTF8\r\n");
        }
        if count >= self.cfg.limits.rcpt_count_max {
            // Not an error of the client's: it sends the rest in another transaction.
            let r = "452 4.5.3 Error: too many recipients\r\n";
            self.refused(crate::metrics::Reject::Limit, Some(&to.address), r);
            return self.reply(r);
        }
        let local = match to.domain() {
            None => true, // <Postmaster>
            // Routing needs the domain as a destination: an address to send to, or
            // a name with an A-label to look up. Without one the mail could only
            // wait out the queue lifetime, so it is refused now.
            Some(d) => match parse_domain(d) {
                Ok(Domain::Literal(ip))
                    if self.cfg.own_addresses.contains(&ip)
                        && !is_local_domain(&self.cfg.local_domains, d) =>
                {
                    // Relayed, it would be delivered back here, and again, forever.
                    let r = format!(
                        "553 5.1.3 <{}>: mail for {d} loops back to myself\r\n",
                        sanitize(&to.address)
                    );
                    return self.error(&r);
                }
                Ok(_) => is_local_domain(&self.cfg.local_domains, d),
                Err(e @ (DomainError::Undeliverable | DomainError::Name)) => {
                    let r = format!(
                        "553 5.1.3 <{}>: Recipient domain is {e}\r\n",
                        sanitize(&to.address)
                    );
                    return self.error(&r);
                }
                Err(DomainError::Literal) => {
                    return self.error(
                        "501 5.1.3 Bad recipient address syntax: not an address literal (RFC 5321 4.1.3)\r\n",
                    )
                }
            },
        };
        if !local && !self.relay_allowed {
            let r = format!(
                "554 5.7.1 <{}>: Relay access denied\r\n",
                sanitize(&to.address)
            );
            self.refused(crate::metrics::Reject::Relay, Some(&to.address), &r);
            return self.error(&r);
        }
        if let (true, Some(d), Some(check)) = (local, to.domain(), &self.recipients) {
            let local_part = &to.address[..to.address.len() - d.len() - 1];
            if !local_part.eq_ignore_ascii_case("postmaster") {
                let declared = self.mail.as_ref().unwrap().declared.map(|s| s as u64);
                match check.check(&to.address, d, declared) {
                    LocalVerdict::Accept => {}
                    LocalVerdict::Unknown => {
                        let r = format!(
                            "550 5.1.1 <{}>: Recipient address rejected: User unknown in local recipient table\r\n",
                            sanitize(&to.address)
                        );
                        self.refused(crate::metrics::Reject::UnknownUser, Some(&to.address), &r);
                        return self.error(&r);
                    }
                    LocalVerdict::Full => {
                        // Temporary: the client keeps the mail and retries.
                        let r = format!("452 4.2.2 <{}>: Mailbox full\r\n", sanitize(&to.address));
                        self.refused(crate::metrics::Reject::OverQuota, Some(&to.address), &r);
                        return self.reply(&r);
                    }
                }
            }
        }
        self.mail.as_mut().unwrap().recipients.push(rcpt);
        self.reply("250 2.1.5 Ok\r\n");
    }

    fn data_cmd(&mut self, arg: &str) {
        if !arg.is_empty() {
            return self.error("501 5.5.4 Syntax: DATA\r\n");
        }
        match &self.mail {
            None => return self.error("503 5.5.1 Error: need MAIL command\r\n"),
            Some(m) if m.recipients.is_empty() => {
                return self.error("503 5.5.1 Error: need RCPT command\r\n")
            }
            Some(m) if m.chunking => return self.error("503 5.5.1 Error: DATA after BDAT\r\n"),
            Some(_) => {}
        }
        self.line = DataLine::default();
        self.state = State::Data;
        self.mail.as_mut().unwrap().body = Body::new(true);
        self.live_from = Some(self.start);
        self.reply("354 End data with <CR><LF>.<CR><LF>\r\n");
    }

    fn bdat_cmd(&mut self, arg: &str) -> Option<Step> {
        let mut parts = arg.split(' ');
        let size = parts.next().and_then(parse_decimal);
        let last = match parts.next() {
            None => false,
            Some(l) if l.eq_ignore_ascii_case("LAST") => true,
            Some(_) => {
                self.error("501 5.5.4 Syntax: BDAT size [LAST]\r\n");
                return None;
            }
        };
        let Some(size) = size.filter(|_| parts.next().is_none()) else {
            // Without a size the chunk cannot be skipped: what follows is read as commands.
            self.error("501 5.5.4 Syntax: BDAT size [LAST]\r\n");
            return None;
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let valid = self.mail.as_ref().is_some_and(|m| !m.recipients.is_empty());
        if let Some(m) = self.mail.as_mut().filter(|_| valid) {
            if !m.chunking {
                // The message's first chunk: its text starts a line.
                self.line = DataLine::default();
            }
            m.chunking = true;
        }
        // The chunk is read even when it is refused (RFC 3030 §2): that keeps the
        // session in step. Refused bytes are dropped as they arrive.
        self.state = State::Bdat {
            remaining: size,
            last,
            valid,
            gather: size < SMALL_PART_BYTES,
        };
        None
    }

    fn bdat(&mut self, remaining: usize, last: bool, valid: bool, gather: bool) -> Option<Step> {
        let take = remaining.min(self.end - self.start);
        if take > 0 {
            let (from, to) = (self.start, self.start + take);
            self.start = to;
            if valid && self.mail.as_ref().unwrap().refusal.is_none() {
                if let Some(r) = self.scan_text(from, to) {
                    self.refuse(r);
                }
            }
            if valid {
                let max = self.cfg.limits.message_bytes_max;
                let mail = self.mail.as_mut().unwrap();
                mail.size = mail.size.saturating_add(take);
                if mail.size > max {
                    mail.refusal.get_or_insert(Refusal::TooBig);
                    mail.body = Body::default();
                } else if mail.refusal.is_none() {
                    if gather {
                        mail.body.gather(&self.input[from..to]);
                    } else {
                        mail.body.add(from..to);
                    }
                }
            }
        }
        let remaining = remaining - take;
        if remaining > 0 {
            self.state = State::Bdat {
                remaining,
                last,
                valid,
                gather,
            };
            return Some(Step::NeedInput);
        }
        self.state = State::Command;
        if !valid {
            self.error("503 5.5.1 Error: BDAT needs MAIL and RCPT first\r\n");
            return None;
        }
        if last && self.line.cr {
            // The text ends in a CR without its LF.
            self.refuse(Refusal::BareNewline);
        }
        let refusal = self.mail.as_ref().unwrap().refusal;
        match (refusal, last) {
            (Some(r), true) => {
                self.mail = None;
                self.refused(r.why(), None, r.reply());
                self.error(r.reply());
                None
            }
            (Some(r), false) => {
                self.error(r.reply());
                None
            }
            (None, true) => self.finish_message(None),
            (None, false) => {
                let n = self.mail.as_ref().unwrap().size;
                let r = format!("250 2.0.0 Ok: {n} octets received\r\n");
                self.reply(&r);
                None
            }
        }
    }

    /// Reads message text after DATA: dot-unstuffs it, watches line lengths and bare
    /// CR/LF, and ends at CRLF.CRLF only (so `\n.\n`, `\r.\r` and `\n.\r\n` never end
    /// it: the SMTP smuggling defence). Input split anywhere gives the same result:
    /// content is consumed as it arrives; only an undecidable line start waits.
    fn data(&mut self) -> Option<Step> {
        let max = self.cfg.limits.data_line_bytes_max;
        loop {
            let pending = &self.input[self.start..self.end];
            let Some(&first) = pending.first() else {
                return Some(Step::NeedInput);
            };
            // (A line with a CR pending has started: no dot check then.)
            if !self.line.started && first == b'.' {
                match (pending.get(1), pending.get(2)) {
                    (None, _) | (Some(b'\r'), None) => return Some(Step::NeedInput),
                    (Some(b'\r'), Some(b'\n')) => {
                        let dot = self.start;
                        self.start += 3;
                        return self.end_of_data(dot);
                    }
                    _ => {
                        // Dot-stuffing: the dot is neither part of the message nor of
                        // the line's length (RFC 5321 §4.5.3.1.6: "not counting the
                        // leading dot duplicated for transparency").
                        self.start += 1;
                        self.line.started = true;
                        continue;
                    }
                }
            }
            let t = self.line.take(pending, max);
            self.start += t.n;
            if t.long {
                self.refuse(Refusal::LineTooLong);
            }
            if t.bare {
                self.refuse(Refusal::BareNewline);
            }
            self.count_data(t.n);
        }
    }

    /// Counts `n` octets of text against the size limit. The text stays where it was
    /// received: the body refers to it (`live_from`), dots and all.
    fn count_data(&mut self, n: usize) {
        let mail = self.mail.as_mut().unwrap();
        mail.size = mail.size.saturating_add(n);
        if mail.size > self.cfg.limits.message_bytes_max {
            self.refuse(Refusal::TooBig);
        }
    }

    /// BDAT's text (without BINARYMIME, which is not offered, a chunk is text as
    /// DATA's is) gets DATA's checks: a CR or LF alone, or a line over the limit,
    /// refuses the message (a bare CR or LF relayed on by DATA to a next hop that
    /// reads it as a line end is what SMTP smuggling builds on). Lines continue
    /// across chunks in `self.line`.
    fn scan_text(&mut self, from: usize, to: usize) -> Option<Refusal> {
        let max = self.cfg.limits.data_line_bytes_max;
        let mut i = from;
        while i < to {
            let t = self.line.take(&self.input[i..to], max);
            if t.bare {
                return Some(Refusal::BareNewline);
            }
            if t.long {
                return Some(Refusal::LineTooLong);
            }
            i += t.n;
        }
        None
    }

    /// Marks the message refused; it is still read to its end, then answered.
    fn refuse(&mut self, why: Refusal) {
        let mail = self.mail.as_mut().unwrap();
        if mail.refusal < Some(why) {
            mail.refusal = Some(why);
            mail.body = Body::default();
            self.live_from = None;
        }
    }

    /// DATA ended; its last line's dot is at `dot`.
    fn end_of_data(&mut self, dot: usize) -> Option<Step> {
        self.state = State::Command;
        match self.mail.as_ref().unwrap().refusal {
            Some(r) => {
                self.mail = None;
                self.live_from = None;
                self.refused(r.why(), None, r.reply());
                self.error(r.reply());
                None
            }
            None => self.finish_message(Some(dot)),
        }
    }

    /// The body is complete (DATA: its text ends before `data_end`). If it refers to
    /// the receive chunk, the chunk is lent to it (`shared`).
    fn seal_body(&mut self, data_end: Option<usize>) {
        let mail = self.mail.as_mut().unwrap();
        if let (Some(from), Some(end)) = (self.live_from.take(), data_end) {
            mail.body.add(from..end);
        }
        if mail.body.uses_current() {
            let chunk = Rc::new(std::mem::take(&mut self.input));
            mail.body.retire(chunk.clone());
            self.shared = Some(chunk);
        }
        mail.body.set_len(mail.size);
    }

    /// The message was read whole and within the limits: refused if it has looped
    /// (too many `Received:` headers), else handed out. Only the header section is
    /// read, once, when the text is complete, so the answer does not depend on how
    /// the input was split.
    fn finish_message(&mut self, data_end: Option<usize>) -> Option<Step> {
        self.seal_body(data_end);
        let mut scanner = super::headers::Scanner::default();
        self.mail.as_ref().unwrap().body.pieces(|p| scanner.feed(p));
        let facts = scanner.finish();
        if facts.received >= self.cfg.limits.hop_count_max {
            self.mail = None;
            self.reclaim();
            self.error("554 5.4.6 Too many hops\r\n");
            return None;
        }
        Some(self.hand_out(facts))
    }

    fn hand_out(&mut self, headers: super::headers::HeaderFacts) -> Step {
        let mail = self.mail.take().unwrap();
        self.last_body_len = mail.body.len();
        self.state = State::Storing;
        // RFC 3848 and RFC 6531 names; HELO has neither a TLS nor an AUTH variant.
        let auth = self.authenticated.is_some();
        let protocol = match (mail.smtputf8, self.esmtp, self.tls, auth) {
            (true, _, false, false) => "UTF8SMTP",
            (true, _, true, false) => "UTF8SMTPS",
            (true, _, false, true) => "UTF8SMTPA",
            (true, _, true, true) => "UTF8SMTPSA",
            (false, true, false, false) => "ESMTP",
            (false, true, true, false) => "ESMTPS",
            (false, true, false, true) => "ESMTPA",
            (false, true, true, true) => "ESMTPSA",
            (false, false, _, _) => "SMTP",
        };
        Step::Message(Box::new(Transaction {
            from: mail.from.address,
            recipients: mail.recipients,
            body: mail.body,
            body_type: mail.body_type,
            smtputf8: mail.smtputf8,
            ret: mail.ret,
            envid: mail.envid,
            helo: self.helo.clone().unwrap_or_default(),
            protocol,
            auth: self.authenticated.clone(),
            headers,
            submission: self.cfg.submission,
        }))
    }
}

/// `KEYWORD[=value]` of an ESMTP parameter, the keyword upper-cased.
fn split_param(param: &str) -> (String, Option<&str>) {
    match param.split_once('=') {
        Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
        None => (param.to_ascii_uppercase(), None),
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// A decimal number of at most 20 digits.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_notify(v: &str) -> Option<u8> {
    if v.eq_ignore_ascii_case("NEVER") {
        return Some(notify::NEVER);
    }
    let mut bits = 0;
    for word in v.split(',') {
        let bit = match word.to_ascii_uppercase().as_str() {
            "SUCCESS" => notify::SUCCESS,
            "FAILURE" => notify::FAILURE,
            "DELAY" => notify::DELAY,
            _ => return None,
        };
        if bits & bit != 0 {
            return None;
        }
        bits |= bit;
    }
    Some(bits)
}

/// Client text echoed in a reply: printable ASCII only, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}
