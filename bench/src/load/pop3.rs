//! One load-generating POP3 client session (RFC 1939), sans-IO: bytes in, bytes to
//! send out, figures into [`Pop3Stats`].
//!
//! A session reads the greeting, logs in (USER/PASS, or AUTH PLAIN with an initial
//! response, RFC 5034), then per the plan: QUIT at once (`LoginsOnly`); STAT, LIST
//! and UIDL (`ListOnly`); or STAT and RETR of every message or of a random sample,
//! each optionally followed by DELE; then QUIT. Commands go one at a time (no
//! pipelining), as fetchmail and getmail send them.
//!
//! Every retrieved message is un-stuffed as it streams in (a line starting with a dot
//! loses that dot; `.` CRLF alone ends it) and checked without being buffered: its
//! octets are counted and, when its header carries `X-Load-Checksum:` (what
//! `ringmail-load smtp` writes: the CRC32C of everything after the first blank line,
//! see `session::message`), the CRC32C of its body is computed line by line and
//! compared. When every message was retrieved, their octets must add up to STAT's.
//!
//! After the reply to QUIT the session waits for the server to close (RFC 1939 §6:
//! the server closes after UPDATE), so that the next login of the same user does not
//! race the server's release of the maildrop lock.

use super::session::CHECKSUM_HEADER;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    UserPass,
    Plain,
}

/// What a session does once logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Log in and QUIT: the logins/s figure.
    LoginsOnly,
    /// STAT, LIST, UIDL, QUIT: what a client checking for new mail sends.
    ListOnly,
    /// STAT, then RETR of every message.
    RetrAll,
    /// STAT, then RETR of this many distinct messages drawn at random (all if fewer).
    Sample(usize),
}

/// What every session of a run does.
#[derive(Debug, Clone)]
pub struct Pop3Plan {
    pub auth: Auth,
    pub work: Work,
    /// DELE each retrieved message (the deletions take effect at QUIT).
    pub dele: bool,
}

/// A user to log in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: String,
}

/// What went wrong, by kind (the report counts each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The connect failed.
    Connect,
    /// The server closed before the session was done.
    Closed,
    /// The greeting was not +OK.
    Greeting,
    /// USER, PASS or AUTH was refused.
    Login,
    /// The login was refused with `[IN-USE]`: another session holds the maildrop.
    InUse,
    Stat,
    List,
    Retr,
    Dele,
    Quit,
    /// A reply that is neither +OK nor -ERR, or a malformed one.
    Protocol,
    /// A message whose body does not match its X-Load-Checksum.
    Checksum,
    /// The retrieved messages' octets do not add up to STAT's total.
    Size,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Closed => "closed",
            ErrorKind::Greeting => "greeting",
            ErrorKind::Login => "login",
            ErrorKind::InUse => "in_use",
            ErrorKind::Stat => "stat",
            ErrorKind::List => "list",
            ErrorKind::Retr => "retr",
            ErrorKind::Dele => "dele",
            ErrorKind::Quit => "quit",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Checksum => "checksum",
            ErrorKind::Size => "size",
        }
    }
}

/// What sessions measured (one thread's, or a whole run's once merged).
#[derive(Debug, Clone)]
pub struct Pop3Stats {
    /// Successful logins.
    pub logins: u64,
    /// Sessions that ended with +OK to QUIT.
    pub sessions: u64,
    /// Messages retrieved whole.
    pub messages: u64,
    /// Their octets, un-stuffed (what the server stores).
    pub message_bytes: u64,
    /// Messages whose checksum matched; those without a checksum header.
    pub verified: u64,
    pub unverified: u64,
    /// LIST entries seen (`ListOnly`).
    pub listed: u64,
    pub deleted: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// From the connect to the +OK of the login, microseconds.
    pub login_us: Histogram<u64>,
    /// From RETR sent to the message's last line, microseconds.
    pub retr_us: Histogram<u64>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl Pop3Stats {
    pub fn new() -> Pop3Stats {
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds");
        Pop3Stats {
            logins: 0,
            sessions: 0,
            messages: 0,
            message_bytes: 0,
            verified: 0,
            unverified: 0,
            listed: 0,
            deleted: 0,
            errors: BTreeMap::new(),
            login_us: h(),
            retr_us: h(),
            bytes_received: 0,
            bytes_sent: 0,
        }
    }

    pub fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_default() += 1;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn merge(&mut self, o: &Pop3Stats) {
        self.logins += o.logins;
        self.sessions += o.sessions;
        self.messages += o.messages;
        self.message_bytes += o.message_bytes;
        self.verified += o.verified;
        self.unverified += o.unverified;
        self.listed += o.listed;
        self.deleted += o.deleted;
        for (k, n) in &o.errors {
            *self.errors.entry(*k).or_default() += n;
        }
        self.login_us.add(&o.login_us).expect("same bounds");
        self.retr_us.add(&o.retr_us).expect("same bounds");
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
    }
}

impl Default for Pop3Stats {
    fn default() -> Self {
        Pop3Stats::new()
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// What the driver should do after a feed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Close the connection (after sending what was queued).
    pub close: bool,
    /// Do not log in again on this slot: the session failed in a way that would only
    /// repeat (a refused password, a broken server).
    pub failed: bool,
}

/// A line longer than this without a line end is a protocol error (RFC 1939 keeps
/// replies to 512 octets; message lines to 998 plus CRLF by RFC 5322, but servers pass
/// longer ones through, so the bound is generous).
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Greeting,
    User,
    Pass,
    Stat,
    /// Waiting for LIST's (or UIDL's) status line, then its lines up to the dot.
    Listing {
        uidl: bool,
        body: bool,
    },
    /// Waiting for RETR's status line, then (`body`) the message.
    Retr {
        body: bool,
    },
    Dele,
    Quit,
    /// QUIT answered: waiting for the server to close.
    Done,
}

/// The checks on one message as it streams in.
#[derive(Debug, Default)]
struct Check {
    in_header: bool,
    want: Option<Result<u32, ()>>,
    crc: u32,
    octets: u64,
}

impl Check {
    fn new() -> Check {
        Check {
            in_header: true,
            ..Check::default()
        }
    }

    /// One un-stuffed line, its line end included.
    fn line(&mut self, l: &[u8]) {
        self.octets += l.len() as u64;
        if !self.in_header {
            self.crc = crc32c::crc32c_append(self.crc, l);
        } else if l == b"\r\n" || l == b"\n" {
            self.in_header = false;
        } else if self.want.is_none() {
            self.want = checksum_header(l);
        }
    }
}

/// The checksum a header line carries, if it is `X-Load-Checksum:` (name in any case);
/// `Err` when its value is not hex.
fn checksum_header(line: &[u8]) -> Option<Result<u32, ()>> {
    let name = CHECKSUM_HEADER.as_bytes();
    if line.len() <= name.len() || !line[..name.len()].eq_ignore_ascii_case(name) {
        return None;
    }
    let value = line[name.len()..].strip_prefix(b":")?;
    let value = std::str::from_utf8(value).map_err(|_| ());
    Some(value.and_then(|v| u32::from_str_radix(v.trim(), 16).map_err(|_| ())))
}

/// A status line's verdict.
#[derive(Debug, PartialEq, Eq)]
enum Status<'a> {
    Ok(&'a [u8]),
    Err(&'a [u8]),
    Bad,
}

fn status(line: &[u8]) -> Status<'_> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some(rest) = line.strip_prefix(b"+OK") {
        if rest.is_empty() || rest[0] == b' ' {
            return Status::Ok(rest.trim_ascii_start());
        }
    }
    if let Some(rest) = line.strip_prefix(b"-ERR") {
        if rest.is_empty() || rest[0] == b' ' {
            return Status::Err(rest.trim_ascii_start());
        }
    }
    Status::Bad
}

/// STAT's `+OK count octets`.
fn parse_stat(text: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(text).ok()?;
    let mut it = text.split_ascii_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// `AUTH PLAIN` initial response: base64 of NUL user NUL password (RFC 4616).
pub fn auth_plain(login: &Login) -> String {
    let mut raw = Vec::with_capacity(login.user.len() + login.password.len() + 2);
    raw.push(0);
    raw.extend_from_slice(login.user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(login.password.as_bytes());
    base64(&raw)
}

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A small deterministic generator for the sample (splitmix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Which messages (1-based numbers) a login retrieves out of `count`.
fn choose(work: Work, count: usize, rng: &mut Rng) -> Vec<usize> {
    match work {
        Work::RetrAll => (1..=count).collect(),
        Work::Sample(k) if k >= count => (1..=count).collect(),
        Work::Sample(k) => {
            // The first k of a Fisher-Yates shuffle: k distinct numbers, in random order.
            let mut all: Vec<usize> = (1..=count).collect();
            for i in 0..k {
                let j = i + (rng.next() % (count - i) as u64) as usize;
                all.swap(i, j);
            }
            all.truncate(k);
            all
        }
        Work::LoginsOnly | Work::ListOnly => Vec::new(),
    }
}

pub struct Session {
    st: St,
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    started: Instant,
    /// When the command now answered was sent.
    sent_at: Instant,
    rng: Rng,
    /// Messages still to retrieve, in order (reversed: popped from the end).
    todo: Vec<usize>,
    /// The message being retrieved.
    current: usize,
    check: Check,
    /// STAT's total octets, and whether every message is retrieved (the sum must match).
    stat_octets: u64,
    retr_all: bool,
    retr_octets: u64,
    retr_failed: bool,
}

impl Session {
    /// A session on a connection started at `now`; `seed` varies the sample per login.
    pub fn new(now: Instant, seed: u64) -> Session {
        Session {
            st: St::Greeting,
            partial: Vec::new(),
            started: now,
            sent_at: now,
            rng: Rng(seed),
            todo: Vec::new(),
            current: 0,
            check: Check::new(),
            stat_octets: 0,
            retr_all: false,
            retr_octets: 0,
            retr_failed: false,
        }
    }

    /// QUIT was answered: a close by the server is expected now.
    pub fn is_done(&self) -> bool {
        self.st == St::Done
    }

    /// Feeds received bytes: appends what to send to `send`, counts into `stats`.
    pub fn feed(
        &mut self,
        plan: &Pop3Plan,
        login: &Login,
        data: &[u8],
        now: Instant,
        send: &mut Vec<u8>,
        stats: &mut Pop3Stats,
    ) -> Step {
        let mut step = Step::default();
        let mut rest = data;
        if !self.partial.is_empty() {
            match memchr::memchr(b'\n', rest) {
                None => {
                    self.partial.extend_from_slice(rest);
                    if self.partial.len() > MAX_LINE {
                        self.fail(ErrorKind::Protocol, stats, &mut step);
                    }
                    return step;
                }
                Some(i) => {
                    let mut line = std::mem::take(&mut self.partial);
                    line.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    self.line(plan, login, &line, now, send, stats, &mut step);
                    line.clear();
                    self.partial = line;
                }
            }
        }
        while !step.close {
            let Some(i) = memchr::memchr(b'\n', rest) else {
                if rest.len() > MAX_LINE {
                    self.fail(ErrorKind::Protocol, stats, &mut step);
                } else {
                    self.partial.extend_from_slice(rest);
                }
                break;
            };
            self.line(plan, login, &rest[..=i], now, send, stats, &mut step);
            rest = &rest[i + 1..];
        }
        step
    }

    fn fail(&mut self, kind: ErrorKind, stats: &mut Pop3Stats, step: &mut Step) {
        stats.error(kind);
        step.close = true;
        step.failed = true;
        self.st = St::Done;
    }

    fn command(&mut self, send: &mut Vec<u8>, now: Instant, cmd: &str) {
        send.extend_from_slice(cmd.as_bytes());
        send.extend_from_slice(b"\r\n");
        self.sent_at = now;
    }

    /// One complete line (its line end included), in the state the session is in.
    #[allow(clippy::too_many_arguments)]
    fn line(
        &mut self,
        plan: &Pop3Plan,
        login: &Login,
        line: &[u8],
        now: Instant,
        send: &mut Vec<u8>,
        stats: &mut Pop3Stats,
        step: &mut Step,
    ) {
        // Multi-line bodies first: their lines are data, not status lines.
        match self.st {
            St::Retr { body: true } => {
                if line == b".\r\n" {
                    self.message_done(now, stats);
                    return self.next_message(plan, now, send, stats);
                }
                let unstuffed = if line.first() == Some(&b'.') {
                    &line[1..]
                } else {
                    line
                };
                return self.check.line(unstuffed);
            }
            St::Listing { uidl, body: true } => {
                if line == b".\r\n" {
                    return if uidl {
                        self.quit(send, now)
                    } else {
                        self.st = St::Listing {
                            uidl: true,
                            body: false,
                        };
                        self.command(send, now, "UIDL")
                    };
                }
                if !uidl {
                    stats.listed += 1;
                }
                return;
            }
            St::Done => return,
            _ => {}
        }
        let (ok, text) = match status(line) {
            Status::Ok(t) => (true, t),
            Status::Err(t) => (false, t),
            Status::Bad => return self.fail(ErrorKind::Protocol, stats, step),
        };
        match self.st {
            St::Greeting if !ok => self.fail(ErrorKind::Greeting, stats, step),
            St::Greeting => match plan.auth {
                Auth::UserPass => {
                    self.st = St::User;
                    self.command(send, now, &format!("USER {}", login.user));
                }
                Auth::Plain => {
                    self.st = St::Pass;
                    self.command(send, now, &format!("AUTH PLAIN {}", auth_plain(login)));
                }
            },
            St::User | St::Pass if !ok => {
                if memchr::memmem::find(text, b"[IN-USE]").is_some() {
                    // Another session holds the maildrop: worth another try.
                    stats.error(ErrorKind::InUse);
                    step.close = true;
                    self.st = St::Done;
                } else {
                    self.fail(ErrorKind::Login, stats, step)
                }
            }
            St::User => {
                self.st = St::Pass;
                self.command(send, now, &format!("PASS {}", login.password));
            }
            St::Pass => {
                stats.logins += 1;
                let _ = stats.login_us.record(micros(now - self.started));
                if plan.work == Work::LoginsOnly {
                    self.quit(send, now)
                } else {
                    self.st = St::Stat;
                    self.command(send, now, "STAT");
                }
            }
            St::Stat => {
                let Some((count, octets)) = ok.then(|| parse_stat(text)).flatten() else {
                    return self.fail(ErrorKind::Stat, stats, step);
                };
                if plan.work == Work::ListOnly {
                    self.st = St::Listing {
                        uidl: false,
                        body: false,
                    };
                    return self.command(send, now, "LIST");
                }
                let mut todo = choose(plan.work, count, &mut self.rng);
                self.retr_all = todo.len() == count;
                self.stat_octets = octets;
                todo.reverse();
                self.todo = todo;
                self.next_message(plan, now, send, stats)
            }
            St::Listing { uidl, body: false } => {
                if ok {
                    self.st = St::Listing { uidl, body: true };
                } else {
                    stats.error(ErrorKind::List);
                    self.quit(send, now)
                }
            }
            St::Retr { body: false } => {
                if ok {
                    self.st = St::Retr { body: true };
                    self.check = Check::new();
                } else {
                    stats.error(ErrorKind::Retr);
                    self.retr_failed = true;
                    self.next_message(plan, now, send, stats)
                }
            }
            St::Dele => {
                if ok {
                    stats.deleted += 1;
                } else {
                    stats.error(ErrorKind::Dele);
                }
                self.retr(now, send, stats)
            }
            St::Quit => {
                if ok {
                    stats.sessions += 1;
                } else {
                    stats.error(ErrorKind::Quit);
                }
                self.st = St::Done;
            }
            St::Retr { body: true } | St::Listing { body: true, .. } | St::Done => {
                unreachable!("handled above")
            }
        }
    }

    /// The message now retrieved is whole: count it and check it.
    fn message_done(&mut self, now: Instant, stats: &mut Pop3Stats) {
        stats.messages += 1;
        stats.message_bytes += self.check.octets;
        self.retr_octets += self.check.octets;
        let _ = stats.retr_us.record(micros(now - self.sent_at));
        match self.check.want {
            None => stats.unverified += 1,
            Some(Ok(want)) if want == self.check.crc && !self.check.in_header => {
                stats.verified += 1
            }
            Some(_) => stats.error(ErrorKind::Checksum),
        }
    }

    /// DELE the message just retrieved if the plan says so, else the next RETR.
    fn next_message(
        &mut self,
        plan: &Pop3Plan,
        now: Instant,
        send: &mut Vec<u8>,
        stats: &mut Pop3Stats,
    ) {
        if plan.dele && matches!(self.st, St::Retr { body: true }) {
            self.st = St::Dele;
            return self.command(send, now, &format!("DELE {}", self.current));
        }
        self.retr(now, send, stats)
    }

    fn retr(&mut self, now: Instant, send: &mut Vec<u8>, stats: &mut Pop3Stats) {
        match self.todo.pop() {
            Some(n) => {
                self.current = n;
                self.st = St::Retr { body: false };
                self.command(send, now, &format!("RETR {n}"));
            }
            None => {
                if !self.sizes_agree() {
                    stats.error(ErrorKind::Size);
                }
                self.quit(send, now)
            }
        }
    }

    fn quit(&mut self, send: &mut Vec<u8>, now: Instant) {
        self.st = St::Quit;
        self.command(send, now, "QUIT");
    }

    /// Whether the messages retrieved add up to STAT's octets (checked before QUIT
    /// when every message was retrieved without error).
    fn sizes_agree(&self) -> bool {
        !self.retr_all || self.retr_failed || self.retr_octets == self.stat_octets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::session::message;

    fn plan(work: Work, dele: bool, auth: Auth) -> Pop3Plan {
        Pop3Plan { auth, work, dele }
    }

    fn login() -> Login {
        Login {
            user: "user1@localhost".into(),
            password: "password1".into(),
        }
    }

    /// A session under test: feeds server bytes, collects what it sends.
    struct T {
        plan: Pop3Plan,
        s: Session,
        stats: Pop3Stats,
        sent: Vec<u8>,
        last: Step,
    }

    impl T {
        fn new(plan: Pop3Plan) -> T {
            T {
                plan,
                s: Session::new(Instant::now(), 7),
                stats: Pop3Stats::new(),
                sent: Vec::new(),
                last: Step::default(),
            }
        }

        /// Feeds `data` and returns what the session sent in answer.
        fn feed(&mut self, data: &[u8]) -> String {
            let before = self.sent.len();
            self.last = self.s.feed(
                &self.plan,
                &login(),
                data,
                Instant::now(),
                &mut self.sent,
                &mut self.stats,
            );
            String::from_utf8(self.sent[before..].to_vec()).unwrap()
        }

        /// Feeds `data` in the pieces `cuts` makes of it.
        fn feed_cut(&mut self, data: &[u8], cuts: &[usize]) -> String {
            let mut out = String::new();
            let mut at = 0;
            for &c in cuts.iter().chain([data.len()].iter()) {
                out += &self.feed(&data[at..c]);
                at = c;
            }
            out
        }

        fn errors(&self) -> Vec<(&'static str, u64)> {
            self.stats
                .errors
                .iter()
                .map(|(k, n)| (k.name(), *n))
                .collect()
        }
    }

    /// RETR's answer for `m`: +OK, the dot-stuffed message, the terminating dot.
    fn retr_reply(m: &[u8]) -> Vec<u8> {
        let mut out = format!("+OK {} octets\r\n", m.len()).into_bytes();
        for line in m.split_inclusive(|b| *b == b'\n') {
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    /// A message whose body has lines starting with dots, as a server stores it: the
    /// prefix a server adds, then a `ringmail-load` style message.
    fn dotted_message() -> Vec<u8> {
        let body = b".leading dot\r\n..two dots\r\n.\r\nplain line\r\n. space\r\n".to_vec();
        let mut m = format!(
            "Return-Path: <a@b>\r\nDelivered-To: user1@localhost\r\nSubject: dots\r\nx-load-checksum: {:08x}\r\n\r\n",
            crc32c::crc32c(&body)
        )
        .into_bytes();
        m.extend_from_slice(&body);
        m
    }

    fn login_to_stat(t: &mut T, count: usize, octets: u64) -> String {
        assert_eq!(t.feed(b"+OK ready\r\n"), "USER user1@localhost\r\n");
        assert_eq!(t.feed(b"+OK\r\n"), "PASS password1\r\n");
        assert_eq!(t.feed(b"+OK logged in\r\n"), "STAT\r\n");
        t.feed(format!("+OK {count} {octets}\r\n").as_bytes())
    }

    #[test]
    fn status_lines() {
        assert_eq!(status(b"+OK\r\n"), Status::Ok(b""));
        assert_eq!(status(b"+OK 2 320\r\n"), Status::Ok(b"2 320"));
        assert_eq!(
            status(b"-ERR [IN-USE] busy\r\n"),
            Status::Err(b"[IN-USE] busy")
        );
        assert_eq!(status(b"-ERR\n"), Status::Err(b""));
        assert_eq!(status(b"+OKAY\r\n"), Status::Bad);
        assert_eq!(status(b"220 smtp\r\n"), Status::Bad);
        assert_eq!(parse_stat(b"2 320"), Some((2, 320)));
        assert_eq!(parse_stat(b"two"), None);
    }

    #[test]
    fn base64_and_auth_plain() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
        let l = Login {
            user: "user".into(),
            password: "pass".into(),
        };
        assert_eq!(auth_plain(&l), "AHVzZXIAcGFzcw==");
        let mut t = T::new(plan(Work::LoginsOnly, false, Auth::Plain));
        assert_eq!(
            t.feed(b"+OK hi\r\n"),
            format!("AUTH PLAIN {}\r\n", auth_plain(&login()))
        );
        assert_eq!(t.feed(b"+OK\r\n"), "QUIT\r\n");
        assert_eq!(t.stats.logins, 1);
    }

    #[test]
    fn retrieves_every_message_and_verifies_it() {
        let m1 = message(1, 4096, "a@b", "user1@localhost");
        let m2 = dotted_message();
        let total = (m1.len() + m2.len()) as u64;
        let mut t = T::new(plan(Work::RetrAll, false, Auth::UserPass));
        assert_eq!(login_to_stat(&mut t, 2, total), "RETR 1\r\n");
        assert_eq!(t.feed(&retr_reply(&m1)), "RETR 2\r\n");
        assert_eq!(t.feed(&retr_reply(&m2)), "QUIT\r\n");
        assert!(!t.s.is_done());
        assert_eq!(t.feed(b"+OK bye\r\n"), "");
        assert!(
            t.s.is_done() && !t.last.close,
            "waits for the server to close"
        );
        assert_eq!(t.stats.logins, 1);
        assert_eq!(t.stats.sessions, 1);
        assert_eq!((t.stats.messages, t.stats.verified), (2, 2));
        assert_eq!(t.stats.message_bytes, total);
        assert_eq!(t.stats.retr_us.len(), 2);
        assert_eq!(t.stats.login_us.len(), 1);
        assert!(t.errors().is_empty(), "{:?}", t.errors());
    }

    #[test]
    fn unstuffs_at_every_split() {
        let m = dotted_message();
        let reply = retr_reply(&m);
        // Every single cut, and every pair of cuts a few bytes apart.
        let mut cuts: Vec<Vec<usize>> = (0..=reply.len()).map(|k| vec![k]).collect();
        for k in 0..reply.len() {
            for d in 1..4 {
                if k + d <= reply.len() {
                    cuts.push(vec![k, k + d]);
                }
            }
        }
        // And one byte at a time.
        cuts.push((1..reply.len()).collect());
        for c in cuts {
            let mut t = T::new(plan(Work::RetrAll, false, Auth::UserPass));
            assert_eq!(login_to_stat(&mut t, 1, m.len() as u64), "RETR 1\r\n");
            assert_eq!(t.feed_cut(&reply, &c), "QUIT\r\n", "cuts {c:?}");
            assert_eq!((t.stats.messages, t.stats.verified), (1, 1), "cuts {c:?}");
            assert_eq!(t.stats.message_bytes, m.len() as u64, "cuts {c:?}");
            assert!(t.errors().is_empty(), "cuts {c:?}: {:?}", t.errors());
        }
    }

    #[test]
    fn a_changed_body_is_a_checksum_error() {
        let mut m = message(3, 2000, "a@b", "c@d");
        let n = m.len();
        m[n - 10] ^= 1;
        let mut t = T::new(plan(Work::RetrAll, false, Auth::UserPass));
        login_to_stat(&mut t, 1, m.len() as u64);
        assert_eq!(t.feed(&retr_reply(&m)), "QUIT\r\n");
        assert_eq!(t.errors(), vec![("checksum", 1)]);
        assert_eq!((t.stats.messages, t.stats.verified), (1, 0));
        // No checksum header: counted, not verified, no error.
        let mut t = T::new(plan(Work::RetrAll, false, Auth::UserPass));
        let plain = b"Subject: x\r\n\r\nbody\r\n";
        login_to_stat(&mut t, 1, plain.len() as u64);
        t.feed(&retr_reply(plain));
        assert_eq!((t.stats.unverified, t.stats.verified), (1, 0));
        assert!(t.errors().is_empty());
    }

    #[test]
    fn octets_must_add_up_to_stat() {
        let m = message(3, 500, "a@b", "c@d");
        let mut t = T::new(plan(Work::RetrAll, false, Auth::UserPass));
        login_to_stat(&mut t, 1, m.len() as u64 + 1);
        assert_eq!(t.feed(&retr_reply(&m)), "QUIT\r\n");
        assert_eq!(t.errors(), vec![("size", 1)]);
    }

    #[test]
    fn dele_follows_each_retr() {
        let m = message(0, 300, "a@b", "c@d");
        let mut t = T::new(plan(Work::RetrAll, true, Auth::UserPass));
        assert_eq!(login_to_stat(&mut t, 2, 2 * m.len() as u64), "RETR 1\r\n");
        assert_eq!(t.feed(&retr_reply(&m)), "DELE 1\r\n");
        assert_eq!(t.feed(b"+OK deleted\r\n"), "RETR 2\r\n");
        assert_eq!(t.feed(&retr_reply(&m)), "DELE 2\r\n");
        assert_eq!(t.feed(b"-ERR no\r\n"), "QUIT\r\n");
        assert_eq!(t.stats.deleted, 1);
        assert_eq!(t.errors(), vec![("dele", 1)]);
    }

    #[test]
    fn a_refused_retr_moves_on() {
        let m = message(0, 300, "a@b", "c@d");
        let mut t = T::new(plan(Work::RetrAll, false, Auth::UserPass));
        login_to_stat(&mut t, 2, 2 * m.len() as u64);
        assert_eq!(t.feed(b"-ERR no such message\r\n"), "RETR 2\r\n");
        assert_eq!(t.feed(&retr_reply(&m)), "QUIT\r\n");
        // The size check is off once a message is missing.
        assert_eq!(t.errors(), vec![("retr", 1)]);
    }

    #[test]
    fn samples_are_distinct_and_in_range() {
        let mut rng = Rng(42);
        for count in [0, 1, 5, 100] {
            for k in [0, 1, 3, 100, 200] {
                let v = choose(Work::Sample(k), count, &mut rng);
                assert_eq!(v.len(), k.min(count));
                let mut d = v.clone();
                d.sort();
                d.dedup();
                assert_eq!(d.len(), v.len(), "distinct");
                assert!(v.iter().all(|n| (1..=count).contains(n)));
            }
        }
        let m = message(0, 300, "a@b", "c@d");
        let mut t = T::new(plan(Work::Sample(1), false, Auth::UserPass));
        let first = login_to_stat(&mut t, 10, 10 * m.len() as u64);
        assert!(first.starts_with("RETR "), "{first}");
        assert_eq!(t.feed(&retr_reply(&m)), "QUIT\r\n");
        assert!(t.errors().is_empty(), "a sample skips the size check");
    }

    #[test]
    fn list_only_counts_entries_then_uidl() {
        let mut t = T::new(plan(Work::ListOnly, false, Auth::UserPass));
        assert_eq!(login_to_stat(&mut t, 2, 700), "LIST\r\n");
        assert_eq!(
            t.feed(b"+OK 2 messages\r\n1 300\r\n2 400\r\n.\r\n"),
            "UIDL\r\n"
        );
        assert_eq!(
            t.feed_cut(
                b"+OK\r\n1 0000000100000001\r\n2 0000000200000001\r\n.\r\n",
                &[3, 9, 40]
            ),
            "QUIT\r\n"
        );
        assert_eq!(t.stats.listed, 2);
        assert_eq!(t.stats.messages, 0);
    }

    #[test]
    fn logins_refused() {
        let mut t = T::new(plan(Work::RetrAll, false, Auth::UserPass));
        t.feed(b"+OK\r\n");
        t.feed(b"+OK\r\n");
        t.feed(b"-ERR [IN-USE] Mailbox is locked by another session\r\n");
        assert_eq!(
            t.last,
            Step {
                close: true,
                failed: false
            },
            "in use: try again"
        );
        assert_eq!(t.errors(), vec![("in_use", 1)]);
        let mut t = T::new(plan(Work::RetrAll, false, Auth::Plain));
        t.feed(b"+OK\r\n");
        t.feed(b"-ERR [AUTH] Authentication failed.\r\n");
        assert_eq!(
            t.last,
            Step {
                close: true,
                failed: true
            },
            "wrong password: stop"
        );
        assert_eq!(t.errors(), vec![("login", 1)]);
        assert_eq!(t.stats.logins, 0);
        let mut t = T::new(plan(Work::RetrAll, false, Auth::Plain));
        t.feed(b"* OK IMAP here\r\n");
        assert_eq!(t.errors(), vec![("protocol", 1)]);
        assert!(t.last.failed);
    }

    #[test]
    fn overlong_lines_are_refused() {
        let mut t = T::new(plan(Work::LoginsOnly, false, Auth::UserPass));
        let junk = vec![b'x'; MAX_LINE / 2 + 1];
        t.feed(&junk);
        assert!(t.errors().is_empty());
        t.feed(&junk);
        assert_eq!(t.errors(), vec![("protocol", 1)]);
    }
}
