//! The POP3 server session (RFC 1939 with RFC 2449 CAPA and response codes, RFC 5034
//! AUTH with RFC 4616 PLAIN) as a state machine: bytes in, replies and steps out.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// What the session needs to know, fixed for the life of the server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Named in the greeting.
    pub hostname: String,
    /// A command line, CRLF included (RFC 2449 §4: 255 octets).
    pub line_bytes_max: usize,
    /// A SASL response line (RFC 5034 §4 lets it be longer than a command).
    pub sasl_line_bytes_max: usize,
    /// Errors after which the session is closed.
    pub error_count_max: u32,
    /// STLS is offered and taken (needs TLS in the driver).
    pub stls: bool,
    /// USER/PASS are taken.
    pub user_pass: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: "localhost".into(),
            line_bytes_max: 255,
            sasl_line_bytes_max: 8192,
            error_count_max: 20,
            stls: false,
            user_pass: true,
        }
    }
}

/// One message of the maildrop as it was at login: fixed for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Octets RETR sends, before stuffing.
    pub size: u64,
    pub uidl: String,
}

/// The driver's answer to [`Step::Authenticate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    Ok(Vec<Message>),
    Failed,
    InUse,
    TempFail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write `output()`, read more, `push()`, `process()` again.
    NeedInput,
    /// Check the password; answer with [`Session::login`].
    Authenticate { user: String, password: String },
    /// `+OK` is in the output: send it, then the message (`lines`: TOP's body lines)
    /// through a `Stuffer` or `Top`; then [`Session::retrieved`].
    Retrieve { index: usize, lines: Option<u64> },
    /// The UPDATE state: expunge these (0-based, ascending); then
    /// [`Session::quit_done`].
    Quit { deleted: Vec<usize> },
    /// Write `output()` and close.
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Authorization,
    Transaction,
    Update,
    Closed,
}

#[derive(Debug, PartialEq, Eq)]
enum Wait {
    None,
    Login,
    Retrieve,
    Quit,
    /// `AUTH PLAIN` without an initial response: the next line is the response.
    SaslResponse,
}

pub struct Session {
    cfg: Config,
    state: State,
    wait: Wait,
    input: Vec<u8>,
    /// Bytes of an over-long line being thrown away until its LF.
    discarding: bool,
    output: Vec<u8>,
    errors: u32,
    /// USER given, PASS awaited.
    pending_user: Option<String>,
    /// The user of the login being checked, then of the session.
    user: Option<String>,
    messages: Vec<Message>,
    deleted: Vec<bool>,
}

/// What `AUTH` alone lists.
const MECHANISMS: &str = "PLAIN";

impl Session {
    pub fn new(cfg: Config) -> Session {
        // No `<...>` in it: clients read that as an APOP timestamp, and APOP is not offered.
        let greeting = format!("+OK ringmail POP3 server ready on {}\r\n", cfg.hostname);
        Session {
            cfg,
            state: State::Authorization,
            wait: Wait::None,
            input: Vec::new(),
            discarding: false,
            output: greeting.into_bytes(),
            errors: 0,
            pending_user: None,
            user: None,
            messages: Vec::new(),
            deleted: Vec::new(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The authenticated user.
    pub fn user(&self) -> Option<&str> {
        match self.state {
            State::Transaction | State::Update => self.user.as_deref(),
            _ => None,
        }
    }

    pub fn output(&self) -> &[u8] {
        &self.output
    }

    pub fn clear_output(&mut self) {
        self.output.clear();
    }

    /// Bytes received and not handled yet (bounded by the line limits).
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// Received bytes. An over-long line is not kept: its start is refused when it
    /// is seen to be too long, and the rest is dropped up to its LF.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.discarding {
                match memchr::memchr(b'\n', bytes) {
                    Some(i) => {
                        self.discarding = false;
                        bytes = &bytes[i + 1..];
                    }
                    None => return,
                }
                continue;
            }
            // Keep at most one line over the limit's worth beyond complete lines.
            let limit = self.line_limit();
            let last_lf = memchr::memrchr(b'\n', &self.input).map_or(0, |i| i + 1);
            let partial = self.input.len() - last_lf;
            let room = limit + 1 - partial.min(limit + 1);
            match memchr::memchr(b'\n', bytes) {
                Some(i) if i < room => {
                    self.input.extend_from_slice(&bytes[..=i]);
                    bytes = &bytes[i + 1..];
                }
                _ if bytes.len() < room => {
                    self.input.extend_from_slice(bytes);
                    return;
                }
                _ => {
                    // This line is too long: keep a marker line in its place.
                    self.input.truncate(last_lf);
                    self.input.extend_from_slice(TOO_LONG);
                    self.discarding = true;
                }
            }
        }
    }

    fn line_limit(&self) -> usize {
        self.cfg.line_bytes_max.max(self.cfg.sasl_line_bytes_max)
    }

    /// Handles the buffered commands until one needs the driver or input runs out.
    pub fn process(&mut self) -> Step {
        loop {
            match self.state {
                State::Closed => return Step::Close,
                State::Update if self.wait == Wait::None => return Step::Close,
                _ => {}
            }
            if !matches!(self.wait, Wait::None | Wait::SaslResponse) {
                return Step::NeedInput;
            }
            let Some(end) = memchr::memchr(b'\n', &self.input) else {
                return Step::NeedInput;
            };
            let raw: Vec<u8> = self.input.drain(..=end).collect();
            let step = if raw == TOO_LONG {
                self.wait = Wait::None;
                self.err("line too long")
            } else {
                let mut line = &raw[..raw.len() - 1];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                if self.wait == Wait::SaslResponse {
                    self.wait = Wait::None;
                    self.sasl_response(line)
                } else if raw.len() > self.cfg.line_bytes_max {
                    self.err("line too long")
                } else {
                    match std::str::from_utf8(line) {
                        Ok(text) => {
                            let text = text.to_string();
                            self.command(&text)
                        }
                        Err(_) => self.err("command is not UTF-8"),
                    }
                }
            };
            if step != Step::NeedInput {
                return step;
            }
        }
    }

    /// The answer to [`Step::Authenticate`].
    pub fn login(&mut self, result: Login) {
        if self.wait != Wait::Login {
            return;
        }
        self.wait = Wait::None;
        match result {
            Login::Ok(messages) => {
                self.deleted = vec![false; messages.len()];
                self.messages = messages;
                self.state = State::Transaction;
                let (n, size) = self.totals();
                self.reply(&format!("+OK maildrop has {n} messages ({size} octets)"));
            }
            Login::Failed => {
                self.user = None;
                self.count_error();
                self.reply("-ERR [AUTH] invalid user name or password");
            }
            Login::InUse => {
                self.user = None;
                self.reply("-ERR [IN-USE] maildrop already locked by another session");
            }
            Login::TempFail => {
                self.user = None;
                self.reply("-ERR [SYS/TEMP] cannot log in now, try again later");
            }
        }
    }

    /// The driver finished streaming a [`Step::Retrieve`].
    pub fn retrieved(&mut self) {
        if self.wait == Wait::Retrieve {
            self.wait = Wait::None;
        }
    }

    /// The answer to [`Step::Quit`].
    pub fn quit_done(&mut self, ok: bool) {
        if self.wait != Wait::Quit {
            return;
        }
        self.wait = Wait::None;
        if ok {
            let n = self.deleted.iter().filter(|d| **d).count();
            self.reply(&format!(
                "+OK ringmail POP3 server signing off ({n} messages deleted)"
            ));
        } else {
            self.reply("-ERR [SYS/TEMP] some deleted messages not removed");
        }
        self.state = State::Closed;
    }

    fn command(&mut self, line: &str) -> Step {
        let (verb, args) = match line.split_once(' ') {
            Some((v, a)) => (v, a),
            None => (line, ""),
        };
        if verb.is_empty() {
            return self.err("empty command");
        }
        let verb = verb.to_ascii_uppercase();
        let words: Vec<&str> = args.split(' ').filter(|w| !w.is_empty()).collect();
        match (self.state, verb.as_str()) {
            (_, "CAPA") => {
                self.capa();
                Step::NeedInput
            }
            (_, "QUIT") if self.state == State::Authorization => {
                self.reply("+OK ringmail POP3 server signing off");
                self.state = State::Closed;
                Step::Close
            }
            (_, "NOOP") if words.is_empty() && self.state == State::Transaction => {
                self.reply("+OK");
                Step::NeedInput
            }
            (State::Authorization, "USER") if self.cfg.user_pass => match words.as_slice() {
                [name] => {
                    self.pending_user = Some(name.to_string());
                    self.reply("+OK send PASS");
                    Step::NeedInput
                }
                _ => self.err("USER takes one argument"),
            },
            (State::Authorization, "PASS") if self.cfg.user_pass => {
                let Some(user) = self.pending_user.take() else {
                    return self.err("USER first");
                };
                // The password is the rest of the line: it may hold spaces.
                self.authenticate(user, args.to_string())
            }
            (State::Authorization, "AUTH") => self.auth(&words),
            (State::Authorization, "STLS") if self.cfg.stls => {
                self.err("STLS is not available on this connection")
            }
            (State::Transaction, "STAT") if words.is_empty() => {
                let (n, size) = self.totals();
                self.reply(&format!("+OK {n} {size}"));
                Step::NeedInput
            }
            (State::Transaction, "LIST" | "UIDL") => self.listing(&verb, &words),
            (State::Transaction, "RETR") => match words.as_slice() {
                [n] => match self.message_number(n) {
                    Ok(i) => {
                        let size = self.messages[i].size;
                        self.reply(&format!("+OK {size} octets"));
                        self.wait = Wait::Retrieve;
                        Step::Retrieve {
                            index: i,
                            lines: None,
                        }
                    }
                    Err(e) => self.err(e),
                },
                _ => self.err("RETR takes a message number"),
            },
            (State::Transaction, "TOP") => match words.as_slice() {
                [n, lines] => match (self.message_number(n), parse_number(lines)) {
                    (Ok(i), Some(lines)) => {
                        self.reply("+OK top of message follows");
                        self.wait = Wait::Retrieve;
                        Step::Retrieve {
                            index: i,
                            lines: Some(lines),
                        }
                    }
                    (Err(e), _) => self.err(e),
                    (_, None) => self.err("the line count must be a non-negative number"),
                },
                _ => self.err("TOP takes a message number and a line count"),
            },
            (State::Transaction, "DELE") => match words.as_slice() {
                [n] => match self.message_number(n) {
                    Ok(i) => {
                        self.deleted[i] = true;
                        self.reply(&format!("+OK message {} deleted", i + 1));
                        Step::NeedInput
                    }
                    Err(e) => self.err(e),
                },
                _ => self.err("DELE takes a message number"),
            },
            (State::Transaction, "RSET") if words.is_empty() => {
                self.deleted.iter_mut().for_each(|d| *d = false);
                let (n, size) = self.totals();
                self.reply(&format!("+OK maildrop has {n} messages ({size} octets)"));
                Step::NeedInput
            }
            (State::Transaction, "QUIT") => {
                self.state = State::Update;
                self.wait = Wait::Quit;
                let deleted = (0..self.deleted.len())
                    .filter(|i| self.deleted[*i])
                    .collect();
                Step::Quit { deleted }
            }
            (
                _,
                "USER" | "PASS" | "AUTH" | "APOP" | "STAT" | "LIST" | "UIDL" | "RETR" | "TOP"
                | "DELE" | "RSET" | "NOOP" | "STLS",
            ) => self.err("command not valid in this state or with these arguments"),
            _ => self.err("unknown command"),
        }
    }

    fn capa(&mut self) {
        let mut caps = vec!["+OK capability list follows", "TOP", "UIDL"];
        let authorization = self.state == State::Authorization;
        if authorization && self.cfg.user_pass {
            caps.push("USER");
        }
        if authorization {
            caps.push("SASL PLAIN");
        }
        if authorization && self.cfg.stls {
            caps.push("STLS");
        }
        caps.extend([
            "RESP-CODES",
            "PIPELINING",
            "AUTH-RESP-CODE",
            "EXPIRE NEVER",
            "IMPLEMENTATION ringmail",
            ".",
        ]);
        for c in caps {
            self.reply(c);
        }
    }

    fn auth(&mut self, words: &[&str]) -> Step {
        match words {
            [] => {
                // The mechanisms, as clients that send a bare AUTH expect.
                self.reply("+OK");
                self.reply(MECHANISMS);
                self.reply(".");
                Step::NeedInput
            }
            [mech] if mech.eq_ignore_ascii_case("PLAIN") => {
                self.reply("+ ");
                self.wait = Wait::SaslResponse;
                Step::NeedInput
            }
            [mech, initial] if mech.eq_ignore_ascii_case("PLAIN") => {
                let initial = initial.to_string();
                self.sasl_response(initial.as_bytes())
            }
            [_] | [_, _] => self.err("unsupported authentication mechanism"),
            _ => self.err("AUTH takes a mechanism and an optional initial response"),
        }
    }

    /// A PLAIN response (RFC 4616): `authzid NUL authcid NUL password`, base64.
    fn sasl_response(&mut self, line: &[u8]) -> Step {
        if line == b"*" {
            return self.err("authentication cancelled");
        }
        let decoded = if line == b"=" {
            Some(Vec::new())
        } else {
            STANDARD.decode(line).ok()
        };
        let Some(decoded) = decoded else {
            return self.err("invalid SASL response (not base64)");
        };
        let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
        let [authzid, authcid, password] = parts.as_slice() else {
            return self.err("invalid SASL PLAIN response");
        };
        let (Ok(authzid), Ok(authcid), Ok(password)) = (
            std::str::from_utf8(authzid),
            std::str::from_utf8(authcid),
            std::str::from_utf8(password),
        ) else {
            return self.err("invalid SASL PLAIN response (not UTF-8)");
        };
        if authcid.is_empty() {
            return self.err("invalid SASL PLAIN response (no user)");
        }
        if !authzid.is_empty() && authzid != authcid {
            self.count_error();
            self.reply("-ERR [AUTH] cannot log in as another user");
            return self.closed_if_too_many();
        }
        self.authenticate(authcid.to_string(), password.to_string())
    }

    fn authenticate(&mut self, user: String, password: String) -> Step {
        self.user = Some(user.clone());
        self.wait = Wait::Login;
        Step::Authenticate { user, password }
    }

    fn listing(&mut self, verb: &str, words: &[&str]) -> Step {
        let item = |m: &Message| match verb {
            "LIST" => m.size.to_string(),
            _ => m.uidl.clone(),
        };
        match words {
            [] => {
                if verb == "LIST" {
                    let (n, size) = self.totals();
                    self.reply(&format!("+OK {n} messages ({size} octets)"));
                } else {
                    self.reply("+OK unique-id listing follows");
                }
                for i in 0..self.messages.len() {
                    if !self.deleted[i] {
                        let line = format!("{} {}", i + 1, item(&self.messages[i]));
                        self.reply(&line);
                    }
                }
                self.reply(".");
                Step::NeedInput
            }
            [n] => match self.message_number(n) {
                Ok(i) => {
                    let line = format!("+OK {} {}", i + 1, item(&self.messages[i]));
                    self.reply(&line);
                    Step::NeedInput
                }
                Err(e) => self.err(e),
            },
            _ => self.err("too many arguments"),
        }
    }

    /// A message number of the maildrop that is not marked deleted: its index.
    fn message_number(&self, arg: &str) -> Result<usize, &'static str> {
        let n = parse_number(arg).ok_or("invalid message number")?;
        if n == 0 || n > self.messages.len() as u64 {
            return Err("no such message");
        }
        let i = (n - 1) as usize;
        if self.deleted[i] {
            return Err("message already deleted");
        }
        Ok(i)
    }

    fn totals(&self) -> (usize, u64) {
        self.messages
            .iter()
            .zip(&self.deleted)
            .filter(|(_, d)| !**d)
            .fold((0, 0), |(n, s), (m, _)| (n + 1, s + m.size))
    }

    fn reply(&mut self, line: &str) {
        self.output.extend_from_slice(line.as_bytes());
        self.output.extend_from_slice(b"\r\n");
    }

    fn count_error(&mut self) {
        self.errors += 1;
    }

    fn err(&mut self, text: &str) -> Step {
        self.count_error();
        self.reply(&format!("-ERR {text}"));
        self.closed_if_too_many()
    }

    fn closed_if_too_many(&mut self) -> Step {
        if self.errors >= self.cfg.error_count_max {
            self.reply("-ERR too many errors, closing");
            self.state = State::Closed;
            return Step::Close;
        }
        Step::NeedInput
    }
}

/// Stands in the input for a line that was too long (no real line holds a NUL).
const TOO_LONG: &[u8] = b"\0too long\n";

/// A decimal number without sign; None when it is not one or overflows.
fn parse_number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}
