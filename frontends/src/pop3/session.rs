//! The POP3 server state machine: bytes in, replies and [`Step`]s out.
//!
//! The driver pushes what it received, calls [`Session::process`] until it returns
//! [`Step::NeedInput`] or [`Step::Close`], answers the other steps (a password check, a
//! message to stream, an expunge) and writes [`Session::output`]. See the module doc of
//! `pop3` for the invariants.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write as _;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// What a session may do; fixed for its life.
#[derive(Clone, Debug)]
pub struct Config {
    /// Named in the greeting, "+OK ringmail POP3 ready <hostname>". It carries no APOP
    /// timestamp (angle brackets are dropped: clients such as fetchmail try APOP when
    /// the greeting has one), since APOP needs plaintext passwords, which ringmail does
    /// not store.
    pub hostname: String,
    /// Longest command line, its CRLF included (RFC 2449 section 4: 255).
    pub line_bytes_max: usize,
    /// Longest SASL continuation response line, its CRLF included (RFC 5034 lets it be
    /// longer than a command).
    pub sasl_line_bytes_max: usize,
    /// After this many -ERR replies in total the session says "-ERR too many errors"
    /// and closes (it bounds what a confused or hostile client costs, password guesses
    /// included).
    pub error_count_max: u32,
    /// Advertise and accept STLS (RFC 2595). When false, STLS is an unknown command.
    pub stls: bool,
    /// Accept USER/PASS (RFC 1939 section 7).
    pub user_pass: bool,
    /// Accept passwords (USER/PASS, AUTH PLAIN) without TLS. When false they are
    /// neither advertised nor accepted until STLS or on an implicit-TLS connection
    /// (RFC 2595 section 6: a server MUST offer a configuration that does not permit
    /// plaintext passwords without TLS).
    pub cleartext_auth: bool,
    /// Once this many reply bytes are waiting in `output()`, `process()` returns
    /// [`Step::Flush`] before it handles another command: a pipeline of UIDL after
    /// UIDL (RFC 2449 lets a client send any number at once) never piles up more
    /// than this and one reply.
    pub output_bytes_max: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: "localhost".to_string(),
            line_bytes_max: 255,
            sasl_line_bytes_max: 8192,
            error_count_max: 20,
            stls: false,
            user_pass: true,
            cleartext_auth: true,
            output_bytes_max: 64 << 10,
        }
    }
}

/// One message of the maildrop as it was at login: fixed for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Octets RETR sends, before dot-stuffing (what LIST and STAT report).
    pub size: u64,
    /// The unique-id UIDL reports: 1 to 70 characters in 0x21..=0x7E (RFC 1939 section
    /// 7). The driver's to guarantee; the core sends it as it is.
    pub uidl: String,
}

/// The driver's answer to [`Step::Authenticate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// The password is right and the maildrop is locked: its messages, in order.
    Ok(Vec<Message>),
    /// Wrong user name or password.
    Failed,
    /// The maildrop is locked by another session.
    InUse,
    /// The store or the password checks are overloaded: try again later.
    TempFail,
}

/// What the driver has to do next.
#[derive(Clone, PartialEq, Eq)]
pub enum Step {
    /// Write `output()`, read more, `push()` it and call `process()` again.
    NeedInput,
    /// Check this password (from USER+PASS or AUTH PLAIN), then call `login()`.
    Authenticate { user: String, password: String },
    /// Send message `index` (0-based into the login's messages): the status line is
    /// already in `output()`; write it, `clear_output()`, stream the message through a
    /// [`Stuffer`](super::Stuffer) (`lines` None, RETR) or a [`Top`](super::Top)
    /// (`lines` Some, TOP), finish it, then call `retrieved()`; or, when the message
    /// cannot be read before anything was written, leave `output()` as it is and call
    /// `retrieve_failed()`.
    Retrieve { index: usize, lines: Option<u64> },
    /// QUIT in TRANSACTION: expunge these messages (0-based, ascending), then call
    /// `quit_done()`.
    Quit { deleted: Vec<usize> },
    /// Write `output()`, `clear_output()`, then call `process()` again (the
    /// replies reached `Config::output_bytes_max`; more commands are buffered).
    Flush,
    /// Write `output()` and close the connection.
    Close,
}

/// The password stays out of logs.
impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::NeedInput => f.write_str("NeedInput"),
            Step::Flush => f.write_str("Flush"),
            Step::Authenticate { user, .. } => f
                .debug_struct("Authenticate")
                .field("user", user)
                .field("password", &"<hidden>")
                .finish(),
            Step::Retrieve { index, lines } => f
                .debug_struct("Retrieve")
                .field("index", index)
                .field("lines", lines)
                .finish(),
            Step::Quit { deleted } => f.debug_struct("Quit").field("deleted", deleted).finish(),
            Step::Close => f.write_str("Close"),
        }
    }
}

/// The RFC 1939 session states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Authorization,
    Transaction,
    /// QUIT was given in TRANSACTION: the expunge is under way.
    Update,
    /// The last reply is in `output()`; nothing more is read.
    Closed,
}

/// The driver's answer the session waits for (no command is handled meanwhile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// `login()`, after [`Step::Authenticate`].
    Login,
    /// `retrieved()`, after [`Step::Retrieve`].
    Retrieve,
    /// `quit_done()`, after [`Step::Quit`].
    Quit,
    /// STLS was accepted ("+OK" is in `output()`): the driver writes it, runs the TLS
    /// handshake and calls `tls_started()`. `process()` returns NeedInput meanwhile
    /// (there is no Step for it: a driver that sets `Config::stls` checks `waiting()`).
    StartTls,
}

/// One received line, as `push()` cut it.
enum Input {
    /// Without its LF and the CR before it; `wire_len` counts them.
    Line { text: Vec<u8>, wire_len: usize },
    /// A line longer than any limit: its bytes were dropped as they came.
    TooLong,
}

/// SASL responses: standard alphabet; padding accepted with or without.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One POP3 server session.
pub struct Session {
    cfg: Config,
    state: State,
    waiting: Option<Waiting>,
    /// Where in `out` the status line of the outstanding retrieve begins.
    status_at: usize,
    out: Vec<u8>,
    /// Complete lines not handled yet.
    input: VecDeque<Input>,
    /// The start of the next line (no LF yet), shorter than the limit that applies.
    partial: Vec<u8>,
    /// Dropping the rest of a too long line, up to its LF.
    discarding: bool,
    errors: u32,
    /// "AUTH PLAIN" without initial response: the next line is the response.
    sasl_pending: bool,
    tls: bool,
    /// Given by USER, waiting for PASS.
    pending_user: Option<String>,
    /// Whose password the driver is checking.
    authenticating: Option<String>,
    user: Option<String>,
    messages: Vec<Message>,
    deleted: Vec<bool>,
    live_count: usize,
    live_octets: u64,
}

impl Session {
    /// A new session, its greeting already in `output()`.
    pub fn new(cfg: Config) -> Session {
        let host: String = cfg
            .hostname
            .chars()
            .filter(|c| !c.is_control() && *c != '<' && *c != '>')
            .collect();
        let mut s = Session {
            cfg,
            state: State::Authorization,
            waiting: None,
            status_at: 0,
            out: Vec::with_capacity(512),
            input: VecDeque::new(),
            partial: Vec::new(),
            discarding: false,
            errors: 0,
            sasl_pending: false,
            tls: false,
            pending_user: None,
            authenticating: None,
            user: None,
            messages: Vec::new(),
            deleted: Vec::new(),
            live_count: 0,
            live_octets: 0,
        };
        let _ = write!(s.out, "+OK ringmail POP3 ready {host}\r\n");
        s
    }

    /// Takes received bytes. Complete lines wait for `process()`; a line is never held
    /// beyond the longest limit: once too long, its bytes are dropped up to its LF and
    /// it is answered "-ERR line too long" in its turn.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.state == State::Closed || self.waiting == Some(Waiting::StartTls) {
            // After STLS, plaintext that followed it must not be taken as commands
            // sent under TLS (the STARTTLS command injection attack).
            return;
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.discarding {
                match memchr::memchr(b'\n', rest) {
                    Some(lf) => {
                        self.discarding = false;
                        rest = &rest[lf + 1..];
                        continue;
                    }
                    None => return,
                }
            }
            let limit = self.push_limit();
            match memchr::memchr(b'\n', rest) {
                Some(lf) => {
                    let wire_len = self.partial.len() + lf + 1;
                    if wire_len > limit {
                        self.partial.clear();
                        self.input.push_back(Input::TooLong);
                    } else {
                        self.partial.extend_from_slice(&rest[..lf]);
                        if self.partial.last() == Some(&b'\r') {
                            self.partial.pop();
                        }
                        let text = std::mem::take(&mut self.partial);
                        self.input.push_back(Input::Line { text, wire_len });
                    }
                    rest = &rest[lf + 1..];
                }
                None => {
                    // The LF still to come makes the line at least one byte longer.
                    if self.partial.len() + rest.len() >= limit {
                        self.partial = Vec::new();
                        self.discarding = true;
                        self.input.push_back(Input::TooLong);
                    } else {
                        self.partial.extend_from_slice(rest);
                    }
                    return;
                }
            }
        }
    }

    /// The limit `push()` holds the next line to. With no line queued, the session's
    /// state says exactly which line comes next; with lines queued, one of them may
    /// start a SASL exchange, so the larger limit caps memory and `handle()` applies
    /// the exact one. Either way the reply is the same, whatever the input's split.
    fn push_limit(&self) -> usize {
        if self.input.is_empty() {
            self.line_limit()
        } else {
            self.cfg.line_bytes_max.max(self.cfg.sasl_line_bytes_max)
        }
    }

    /// The limit of the next line `handle()` takes.
    fn line_limit(&self) -> usize {
        if self.sasl_pending {
            self.cfg.sasl_line_bytes_max
        } else {
            self.cfg.line_bytes_max
        }
    }

    /// Handles buffered lines, in order, until one needs the driver (the returned
    /// step), the replies waiting reach `Config::output_bytes_max` (Flush), the input
    /// runs out (NeedInput) or the session closes (Close). While an
    /// answer (`login`, `retrieved`, `quit_done`, `tls_started`) is outstanding it
    /// handles nothing and returns NeedInput.
    pub fn process(&mut self) -> Step {
        loop {
            if self.state == State::Closed {
                return Step::Close;
            }
            if self.waiting.is_some() {
                return Step::NeedInput;
            }
            if self.input.is_empty() {
                return Step::NeedInput;
            }
            if self.out.len() >= self.cfg.output_bytes_max {
                return Step::Flush;
            }
            let Some(input) = self.input.pop_front() else {
                return Step::NeedInput;
            };
            if let Some(step) = self.handle(input) {
                return step;
            }
        }
    }

    /// Replies accumulated since the last `clear_output()`.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Bytes held from `push()` that `process()` has not handled yet.
    pub fn buffered(&self) -> usize {
        self.partial.len()
            + self
                .input
                .iter()
                .map(|i| match i {
                    Input::Line { text, .. } => text.len(),
                    Input::TooLong => 0,
                })
                .sum::<usize>()
    }

    /// The answer to [`Step::Authenticate`]; ignored when none is outstanding.
    pub fn login(&mut self, result: Login) {
        if self.waiting != Some(Waiting::Login) {
            return;
        }
        self.waiting = None;
        let user = self.authenticating.take();
        match result {
            Login::Ok(messages) => {
                self.state = State::Transaction;
                self.user = user;
                self.deleted = vec![false; messages.len()];
                self.messages = messages;
                self.recount();
                let (n, octets) = (self.live_count, self.live_octets);
                self.ok(format_args!("maildrop has {n} messages ({octets} octets)"));
            }
            Login::Failed => self.err("[AUTH] invalid user name or password"),
            Login::InUse => self.err("[IN-USE] maildrop already locked"),
            Login::TempFail => self.err("[SYS/TEMP] service temporarily unavailable, try later"),
        }
    }

    /// The driver finished streaming a [`Step::Retrieve`]; ignored when none is
    /// outstanding.
    pub fn retrieved(&mut self) {
        if self.waiting == Some(Waiting::Retrieve) {
            self.waiting = None;
        }
    }

    /// Instead of `retrieved()`: the message could not be read, and none of it (nor
    /// its status line) was sent; `output()` is as [`Step::Retrieve`] left it. Its
    /// `+OK` becomes `-ERR [SYS/TEMP]` (RFC 2449 section 8.1.2: the server's trouble,
    /// worth trying later) and the session goes on. Ignored when no retrieve is
    /// outstanding.
    pub fn retrieve_failed(&mut self) {
        if self.waiting != Some(Waiting::Retrieve) {
            return;
        }
        self.waiting = None;
        self.out.truncate(self.status_at.min(self.out.len()));
        self.out.extend_from_slice(
            b"-ERR [SYS/TEMP] the message cannot be read now, try again later\r\n",
        );
    }

    /// The answer to [`Step::Quit`]: whether every deleted message was expunged.
    /// Ignored when none is outstanding; the next `process()` returns Close.
    pub fn quit_done(&mut self, ok: bool) {
        if self.waiting != Some(Waiting::Quit) {
            return;
        }
        self.waiting = None;
        if ok {
            let n = self.deleted.iter().filter(|d| **d).count();
            self.ok(format_args!(
                "ringmail POP3 server signing off ({n} messages deleted)"
            ));
        } else {
            self.out
                .extend_from_slice(b"-ERR [SYS/TEMP] some deleted messages not removed\r\n");
        }
        self.close();
    }

    /// The connection is under TLS from its start (an implicit-TLS listener): STLS
    /// is neither advertised nor accepted.
    pub fn set_tls(&mut self) {
        self.tls = true;
    }

    /// The TLS handshake after STLS succeeded; ignored when none is outstanding.
    pub fn tls_started(&mut self) {
        if self.waiting == Some(Waiting::StartTls) {
            self.waiting = None;
            self.tls = true;
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The answer the session waits for, if any.
    pub fn waiting(&self) -> Option<Waiting> {
        self.waiting
    }

    /// The authenticated user (from TRANSACTION on).
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The session runs under TLS (after STLS).
    pub fn in_tls(&self) -> bool {
        self.tls
    }

    fn handle(&mut self, input: Input) -> Option<Step> {
        let text = match input {
            Input::Line { text, wire_len } if wire_len <= self.line_limit() => text,
            _ => {
                self.sasl_pending = false;
                self.err("line too long");
                return None;
            }
        };
        if self.sasl_pending {
            self.sasl_pending = false;
            return self.sasl_response(&text);
        }
        let line = trim_start_spaces(&text);
        let (verb, rest) = match memchr::memchr(b' ', line) {
            Some(sp) => (&line[..sp], &line[sp + 1..]),
            None => (line, &b""[..]),
        };
        if verb.is_empty() {
            self.err("empty command");
            return None;
        }
        let Some(cmd) = Command::parse(verb, self.cfg.stls) else {
            self.err("unknown command");
            return None;
        };
        match self.state {
            State::Authorization => self.authorization(cmd, rest),
            State::Transaction => self.transaction(cmd, rest),
            // process() handles nothing in these states.
            State::Update | State::Closed => None,
        }
    }

    fn authorization(&mut self, cmd: Command, rest: &[u8]) -> Option<Step> {
        match cmd {
            Command::Capa => self.capa(rest),
            Command::User => self.user_cmd(rest),
            Command::Pass => return self.pass(rest),
            Command::Auth => return self.auth(rest),
            Command::Stls => self.stls(rest),
            Command::Quit => {
                if no_args(rest) {
                    self.ok(format_args!("bye"));
                    self.close();
                } else {
                    self.err("QUIT takes no arguments");
                }
            }
            Command::Stat
            | Command::List
            | Command::Uidl
            | Command::Retr
            | Command::Top
            | Command::Dele
            | Command::Noop
            | Command::Rset => self.err("not allowed before login"),
        }
        None
    }

    fn transaction(&mut self, cmd: Command, rest: &[u8]) -> Option<Step> {
        match cmd {
            Command::Capa => self.capa(rest),
            Command::User | Command::Pass | Command::Auth | Command::Stls => {
                self.err("already logged in")
            }
            Command::Stat => {
                if no_args(rest) {
                    let (n, octets) = (self.live_count, self.live_octets);
                    self.ok(format_args!("{n} {octets}"));
                } else {
                    self.err("STAT takes no arguments");
                }
            }
            Command::List => self.list(rest, false),
            Command::Uidl => self.list(rest, true),
            Command::Retr => return self.retr(rest),
            Command::Top => return self.top(rest),
            Command::Dele => self.dele(rest),
            Command::Noop => {
                if no_args(rest) {
                    self.ok(format_args!(""));
                } else {
                    self.err("NOOP takes no arguments");
                }
            }
            Command::Rset => {
                if no_args(rest) {
                    self.deleted.iter_mut().for_each(|d| *d = false);
                    self.recount();
                    let (n, octets) = (self.live_count, self.live_octets);
                    self.ok(format_args!("maildrop has {n} messages ({octets} octets)"));
                } else {
                    self.err("RSET takes no arguments");
                }
            }
            Command::Quit => {
                if !no_args(rest) {
                    self.err("QUIT takes no arguments");
                    return None;
                }
                let deleted: Vec<usize> = (0..self.deleted.len())
                    .filter(|&i| self.deleted[i])
                    .collect();
                self.state = State::Update;
                self.waiting = Some(Waiting::Quit);
                return Some(Step::Quit { deleted });
            }
        }
        None
    }

    /// RFC 2449 section 5.
    fn capa(&mut self, rest: &[u8]) {
        if !no_args(rest) {
            self.err("CAPA takes no arguments");
            return;
        }
        let auth = self.state == State::Authorization;
        let passwords = auth && self.passwords_allowed();
        let o = &mut self.out;
        o.extend_from_slice(b"+OK Capability list follows\r\nTOP\r\nUIDL\r\n");
        if passwords && self.cfg.user_pass {
            o.extend_from_slice(b"USER\r\n");
        }
        if passwords {
            o.extend_from_slice(b"SASL PLAIN\r\n");
        }
        o.extend_from_slice(
            b"RESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nEXPIRE NEVER\r\n\
              IMPLEMENTATION ringmail\r\n",
        );
        if auth && self.cfg.stls && !self.tls {
            o.extend_from_slice(b"STLS\r\n");
        }
        o.extend_from_slice(b".\r\n");
    }

    /// Whether a password may be sent now (under TLS, or when the configuration
    /// allows it without).
    fn passwords_allowed(&self) -> bool {
        self.tls || self.cfg.cleartext_auth
    }

    /// Refuses a password command before TLS when passwords need it; true if so.
    fn refused_without_tls(&mut self) -> bool {
        if self.passwords_allowed() {
            return false;
        }
        self.err("[AUTH] plaintext authentication disallowed without TLS, use STLS");
        true
    }

    fn user_cmd(&mut self, rest: &[u8]) {
        if !self.cfg.user_pass {
            self.err("USER/PASS not enabled, use AUTH PLAIN");
            return;
        }
        if self.refused_without_tls() {
            return;
        }
        let mut args = args(rest);
        let (Some(name), None) = (args.next(), args.next()) else {
            self.err("USER needs one user name");
            return;
        };
        match std::str::from_utf8(name) {
            Ok(name) => {
                self.pending_user = Some(name.to_string());
                self.ok(format_args!("send PASS"));
            }
            Err(_) => self.err("invalid user name"),
        }
    }

    /// The password is the rest of the line after "PASS " (it may hold spaces).
    fn pass(&mut self, password: &[u8]) -> Option<Step> {
        if !self.cfg.user_pass {
            self.err("USER/PASS not enabled, use AUTH PLAIN");
            return None;
        }
        if self.refused_without_tls() {
            return None;
        }
        if self.pending_user.is_none() {
            self.err("send USER first");
            return None;
        }
        if password.is_empty() {
            self.err("PASS needs a password");
            return None;
        }
        let user = self.pending_user.take()?;
        match std::str::from_utf8(password) {
            Ok(password) => self.start_login(user, password.to_string()),
            // No stored password is anything but UTF-8: this one cannot be right.
            Err(_) => {
                self.err("[AUTH] invalid user name or password");
                None
            }
        }
    }

    /// RFC 5034; "AUTH" alone lists the mechanisms.
    fn auth(&mut self, rest: &[u8]) -> Option<Step> {
        let mut args = args(rest);
        let (mech, initial, extra) = (args.next(), args.next(), args.next());
        let Some(mech) = mech else {
            self.out.extend_from_slice(match self.passwords_allowed() {
                true => b"+OK\r\nPLAIN\r\n.\r\n",
                false => b"+OK\r\n.\r\n",
            });
            return None;
        };
        if extra.is_some() {
            self.err("AUTH takes a mechanism and an optional initial response");
            return None;
        }
        if !mech.eq_ignore_ascii_case(b"PLAIN") {
            self.err("unsupported authentication mechanism");
            return None;
        }
        if self.refused_without_tls() {
            return None;
        }
        self.pending_user = None;
        match initial {
            None => {
                self.out.extend_from_slice(b"+ \r\n");
                self.sasl_pending = true;
                None
            }
            // RFC 5034 section 4: "=" is an empty initial response.
            Some(b"=") => self.plain(b""),
            Some(encoded) => self.decode_plain(encoded),
        }
    }

    /// The line after "+ ": the client's response, or "*" to cancel.
    fn sasl_response(&mut self, line: &[u8]) -> Option<Step> {
        let line = trim_spaces(line);
        if line == b"*" {
            self.err("authentication cancelled");
            return None;
        }
        self.decode_plain(line)
    }

    fn decode_plain(&mut self, encoded: &[u8]) -> Option<Step> {
        match BASE64.decode(encoded) {
            Ok(message) => self.plain(&message),
            Err(_) => {
                self.err("invalid SASL response");
                None
            }
        }
    }

    /// RFC 4616: [authzid] NUL authcid NUL passwd. Logging in as someone else (an
    /// authzid other than the authcid) is refused here: there are no admin proxies.
    fn plain(&mut self, message: &[u8]) -> Option<Step> {
        let mut parts = message.split(|b| *b == 0);
        let fields = (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(authzid), Some(authcid), Some(passwd), None) = fields else {
            self.err("invalid SASL response");
            return None;
        };
        let (Ok(authzid), Ok(authcid), Ok(passwd)) = (
            std::str::from_utf8(authzid),
            std::str::from_utf8(authcid),
            std::str::from_utf8(passwd),
        ) else {
            self.err("invalid SASL response");
            return None;
        };
        if authcid.is_empty() || passwd.is_empty() {
            self.err("invalid SASL response");
            return None;
        }
        if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(authcid) {
            self.err("[AUTH] logging in as another user is not allowed");
            return None;
        }
        self.start_login(authcid.to_string(), passwd.to_string())
    }

    fn start_login(&mut self, user: String, password: String) -> Option<Step> {
        self.authenticating = Some(user.clone());
        self.waiting = Some(Waiting::Login);
        Some(Step::Authenticate { user, password })
    }

    /// RFC 2595 section 4: only in AUTHORIZATION; what was pipelined after it is
    /// dropped.
    fn stls(&mut self, rest: &[u8]) {
        if self.tls {
            self.err("already using TLS");
            return;
        }
        if !no_args(rest) {
            self.err("STLS takes no arguments");
            return;
        }
        self.ok(format_args!("begin TLS negotiation"));
        self.input.clear();
        self.partial = Vec::new();
        self.discarding = false;
        self.pending_user = None;
        self.waiting = Some(Waiting::StartTls);
    }

    /// LIST or UIDL, of one message or of all.
    fn list(&mut self, rest: &[u8], uidl: bool) {
        let mut args = args(rest);
        match (args.next(), args.next()) {
            (None, _) => {
                if uidl {
                    self.out
                        .extend_from_slice(b"+OK unique-id listing follows\r\n");
                } else {
                    let (n, octets) = (self.live_count, self.live_octets);
                    let _ = write!(self.out, "+OK {n} messages ({octets} octets)\r\n");
                }
                for (i, m) in self.messages.iter().enumerate() {
                    if self.deleted[i] {
                        continue;
                    }
                    let _ = if uidl {
                        write!(self.out, "{} {}\r\n", i + 1, m.uidl)
                    } else {
                        write!(self.out, "{} {}\r\n", i + 1, m.size)
                    };
                }
                self.out.extend_from_slice(b".\r\n");
            }
            (Some(number), None) => {
                let Some(i) = self.message(number) else {
                    return;
                };
                let m = &self.messages[i];
                let _ = if uidl {
                    write!(self.out, "+OK {} {}\r\n", i + 1, m.uidl)
                } else {
                    write!(self.out, "+OK {} {}\r\n", i + 1, m.size)
                };
            }
            _ => self.err("too many arguments"),
        }
    }

    fn retr(&mut self, rest: &[u8]) -> Option<Step> {
        let mut args = args(rest);
        let (Some(number), None) = (args.next(), args.next()) else {
            self.err("RETR needs one message number");
            return None;
        };
        let index = self.message(number)?;
        let size = self.messages[index].size;
        self.status_at = self.out.len();
        self.ok(format_args!("{size} octets"));
        self.waiting = Some(Waiting::Retrieve);
        Some(Step::Retrieve { index, lines: None })
    }

    fn top(&mut self, rest: &[u8]) -> Option<Step> {
        let mut args = args(rest);
        let (Some(number), Some(lines), None) = (args.next(), args.next(), args.next()) else {
            self.err("TOP needs a message number and a line count");
            return None;
        };
        let index = self.message(number)?;
        let lines = match parse_decimal(lines) {
            Ok(lines) => lines,
            Err(Number::Invalid) => {
                self.err("invalid line count");
                return None;
            }
            Err(Number::Overflow) => {
                self.err("line count too large");
                return None;
            }
        };
        self.status_at = self.out.len();
        self.ok(format_args!(""));
        self.waiting = Some(Waiting::Retrieve);
        Some(Step::Retrieve {
            index,
            lines: Some(lines),
        })
    }

    fn dele(&mut self, rest: &[u8]) {
        let mut args = args(rest);
        let (Some(number), None) = (args.next(), args.next()) else {
            self.err("DELE needs one message number");
            return;
        };
        let Some(i) = self.existing(number) else {
            return;
        };
        if self.deleted[i] {
            self.err(format_args!("message {} already deleted", i + 1));
            return;
        }
        self.deleted[i] = true;
        self.live_count -= 1;
        self.live_octets = self.live_octets.saturating_sub(self.messages[i].size);
        self.ok(format_args!("message {} deleted", i + 1));
    }

    /// The 0-based index of a message number that exists and is not deleted; else
    /// replies -ERR.
    fn message(&mut self, number: &[u8]) -> Option<usize> {
        let i = self.existing(number)?;
        if self.deleted[i] {
            self.err("no such message");
            return None;
        }
        Some(i)
    }

    /// The 0-based index of a message number in range (deleted or not); else replies
    /// -ERR.
    fn existing(&mut self, number: &[u8]) -> Option<usize> {
        match parse_decimal(number) {
            Ok(n) if n >= 1 && n <= self.messages.len() as u64 => Some((n - 1) as usize),
            Ok(_) | Err(Number::Overflow) => {
                self.err("no such message");
                None
            }
            Err(Number::Invalid) => {
                self.err("invalid message number");
                None
            }
        }
    }

    fn recount(&mut self) {
        let live = self
            .messages
            .iter()
            .zip(&self.deleted)
            .filter(|(_, d)| !**d);
        let (count, octets) = live.fold((0usize, 0u64), |(c, o), (m, _)| {
            (c + 1, o.saturating_add(m.size))
        });
        self.live_count = count;
        self.live_octets = octets;
    }

    fn ok(&mut self, text: fmt::Arguments<'_>) {
        let text = text.to_string();
        if text.is_empty() {
            self.out.extend_from_slice(b"+OK\r\n");
        } else {
            let _ = write!(self.out, "+OK {text}\r\n");
        }
    }

    /// Every -ERR goes through here: it counts towards `error_count_max`.
    fn err(&mut self, text: impl fmt::Display) {
        let _ = write!(self.out, "-ERR {text}\r\n");
        self.errors = self.errors.saturating_add(1);
        if self.errors >= self.cfg.error_count_max {
            self.out.extend_from_slice(b"-ERR too many errors\r\n");
            self.close();
        }
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.waiting = None;
        self.sasl_pending = false;
        self.input.clear();
        self.partial = Vec::new();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Capa,
    User,
    Pass,
    Auth,
    Stls,
    Quit,
    Stat,
    List,
    Uidl,
    Retr,
    Top,
    Dele,
    Noop,
    Rset,
}

impl Command {
    /// Case-insensitive; STLS exists only when enabled.
    fn parse(verb: &[u8], stls: bool) -> Option<Command> {
        const ALL: [(&[u8], Command); 14] = [
            (b"CAPA", Command::Capa),
            (b"USER", Command::User),
            (b"PASS", Command::Pass),
            (b"AUTH", Command::Auth),
            (b"STLS", Command::Stls),
            (b"QUIT", Command::Quit),
            (b"STAT", Command::Stat),
            (b"LIST", Command::List),
            (b"UIDL", Command::Uidl),
            (b"RETR", Command::Retr),
            (b"TOP", Command::Top),
            (b"DELE", Command::Dele),
            (b"NOOP", Command::Noop),
            (b"RSET", Command::Rset),
        ];
        let (_, cmd) = ALL
            .iter()
            .find(|(name, _)| verb.eq_ignore_ascii_case(name))?;
        (*cmd != Command::Stls || stls).then_some(*cmd)
    }
}

/// Arguments: separated by one space or more.
fn args(rest: &[u8]) -> impl Iterator<Item = &[u8]> {
    rest.split(|b| *b == b' ').filter(|a| !a.is_empty())
}

fn no_args(rest: &[u8]) -> bool {
    args(rest).next().is_none()
}

fn trim_start_spaces(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| *b != b' ').unwrap_or(s.len());
    &s[start..]
}

fn trim_spaces(s: &[u8]) -> &[u8] {
    let s = trim_start_spaces(s);
    let end = s.iter().rposition(|b| *b != b' ').map_or(0, |e| e + 1);
    &s[..end]
}

enum Number {
    /// Not a non-empty run of decimal digits (signs included).
    Invalid,
    /// Decimal, but past u64.
    Overflow,
}

fn parse_decimal(s: &[u8]) -> Result<u64, Number> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return Err(Number::Invalid);
    }
    s.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(Number::Overflow)
    })
}
