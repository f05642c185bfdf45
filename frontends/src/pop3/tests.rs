//! The POP3 session core: every command in every state, pipelining, the same bytes out
//! whatever the input's split, the limits, and hostile input.

use super::{Config, Login, Message, Session, State, Step, Stuffer, Top, Waiting};

const M1: &[u8] = b"From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n.dot line\r\nbye\r\n";
const M2: &[u8] = b"Subject: two\r\n\r\nline 1\r\nline 2\r\n";
const M3: &[u8] = b"Subject: three\r\n\r\nno final newline";

fn bodies() -> [&'static [u8]; 3] {
    [M1, M2, M3]
}

fn messages() -> Vec<Message> {
    let uidls = ["u-one", "u-two", "u-three"];
    bodies()
        .iter()
        .zip(uidls)
        .map(|(b, u)| Message {
            size: b.len() as u64,
            uidl: u.to_string(),
        })
        .collect()
}

fn config() -> Config {
    Config {
        hostname: "mail.example.org".to_string(),
        ..Config::default()
    }
}

/// The account directory of these tests.
fn check(user: &str, password: &str) -> Login {
    match (user, password) {
        ("alice", "secret word") => Login::Ok(messages()),
        ("busy", _) => Login::InUse,
        ("slow", _) => Login::TempFail,
        _ => Login::Failed,
    }
}

/// A driver like the engine's: answers every step at once, streams messages in small
/// chunks, and records all it wrote and every step it saw.
struct Driver {
    s: Session,
    wire: Vec<u8>,
    steps: Vec<String>,
    closed: bool,
}

impl Driver {
    fn new(cfg: Config) -> Driver {
        let mut d = Driver {
            s: Session::new(cfg),
            wire: Vec::new(),
            steps: Vec::new(),
            closed: false,
        };
        d.run();
        d
    }

    fn flush(&mut self) {
        self.wire.extend_from_slice(self.s.output());
        self.s.clear_output();
    }

    fn feed(&mut self, bytes: &[u8]) {
        assert!(!self.closed, "fed after Close");
        self.s.push(bytes);
        self.run();
    }

    fn run(&mut self) {
        loop {
            match self.s.process() {
                Step::NeedInput => {
                    self.flush();
                    return;
                }
                Step::Flush => {
                    self.steps.push("flush".to_string());
                    self.flush();
                }
                Step::Authenticate { user, password } => {
                    self.steps.push(format!("auth {user}/{password}"));
                    assert_eq!(self.s.waiting(), Some(Waiting::Login));
                    let answer = check(&user, &password);
                    self.s.login(answer);
                }
                Step::Retrieve { index, lines } => {
                    self.steps.push(format!("retrieve {index} {lines:?}"));
                    assert_eq!(self.s.waiting(), Some(Waiting::Retrieve));
                    let status_line_queued = match lines {
                        None => self.s.output().ends_with(b" octets\r\n"),
                        Some(_) => self.s.output().ends_with(b"+OK\r\n"),
                    };
                    assert!(status_line_queued);
                    self.flush();
                    let body = bodies()[index];
                    match lines {
                        None => {
                            let mut st = Stuffer::new();
                            for c in body.chunks(5) {
                                st.push(c, &mut self.wire);
                            }
                            st.finish(&mut self.wire);
                        }
                        Some(n) => {
                            let mut top = Top::new(n);
                            for c in body.chunks(5) {
                                if !top.push(c, &mut self.wire) {
                                    break;
                                }
                            }
                            top.finish(&mut self.wire);
                        }
                    }
                    self.s.retrieved();
                }
                Step::Quit { deleted } => {
                    self.steps.push(format!("quit {deleted:?}"));
                    assert_eq!(self.s.state(), State::Update);
                    self.s.quit_done(true);
                }
                Step::Close => {
                    self.flush();
                    self.steps.push("close".to_string());
                    self.closed = true;
                    return;
                }
            }
        }
    }

    /// Sends `bytes` in one write and returns what the session wrote back.
    fn say(&mut self, bytes: &str) -> String {
        let before = self.wire.len();
        self.feed(bytes.as_bytes());
        String::from_utf8_lossy(&self.wire[before..]).into_owned()
    }
}

fn authorization() -> Driver {
    let mut d = Driver::new(config());
    d.wire.clear();
    d
}

fn transaction() -> Driver {
    let mut d = authorization();
    assert_eq!(
        d.say("USER alice\r\nPASS secret word\r\n"),
        "+OK send PASS\r\n+OK maildrop has 3 messages (126 octets)\r\n"
    );
    assert_eq!(d.s.state(), State::Transaction);
    d
}

/// A whole session: every command, errors between, a too long line, an empty one, a
/// bare LF, then QUIT and a command after it that must go unanswered.
fn script() -> Vec<u8> {
    let long = format!("LIST {}\r\n", "9".repeat(300));
    [
        "CAPA\r\n",
        "USER alice\r\n",
        "PASS wrong\r\n",
        "user alice\r\n",
        "pass secret word\r\n",
        "STAT\r\n",
        "LIST\r\n",
        "LIST  2\r\n",
        "UIDL\r\n",
        "uidl 3\r\n",
        "RETR 1\r\n",
        "TOP 2 1\r\n",
        "DELE 1\r\n",
        "DELE 1\r\n",
        "RETR 1\r\n",
        "LIST 1\r\n",
        "STAT\r\n",
        "RSET\r\n",
        "TOP 3 0\n",
        "DELE 3\r\n",
        "NOOP\r\n",
        "XYZZY\r\n",
        &long,
        "\n",
        "RETR 2\r\n",
        "QUIT\r\n",
        "NOOP\r\n",
    ]
    .concat()
    .into_bytes()
}

const CAPA_AUTHORIZATION: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\n\
    SASL PLAIN\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nEXPIRE NEVER\r\n\
    IMPLEMENTATION ringmail\r\n.\r\n";

const CAPA_TRANSACTION: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\n\
    RESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nEXPIRE NEVER\r\n\
    IMPLEMENTATION ringmail\r\n.\r\n";

fn expected_transcript() -> String {
    [
        "+OK ringmail POP3 ready mail.example.org\r\n",
        CAPA_AUTHORIZATION,
        "+OK send PASS\r\n",
        "-ERR [AUTH] invalid user name or password\r\n",
        "+OK send PASS\r\n",
        "+OK maildrop has 3 messages (126 octets)\r\n",
        "+OK 3 126\r\n",
        "+OK 3 messages (126 octets)\r\n1 60\r\n2 32\r\n3 34\r\n.\r\n",
        "+OK 2 32\r\n",
        "+OK unique-id listing follows\r\n1 u-one\r\n2 u-two\r\n3 u-three\r\n.\r\n",
        "+OK 3 u-three\r\n",
        "+OK 60 octets\r\n",
        "From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n..dot line\r\nbye\r\n.\r\n",
        "+OK\r\nSubject: two\r\n\r\nline 1\r\n.\r\n",
        "+OK message 1 deleted\r\n",
        "-ERR message 1 already deleted\r\n",
        "-ERR no such message\r\n",
        "-ERR no such message\r\n",
        "+OK 2 66\r\n",
        "+OK maildrop has 3 messages (126 octets)\r\n",
        "+OK\r\nSubject: three\r\n\r\n.\r\n",
        "+OK message 3 deleted\r\n",
        "+OK\r\n",
        "-ERR unknown command\r\n",
        "-ERR line too long\r\n",
        "-ERR empty command\r\n",
        "+OK 32 octets\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\n.\r\n",
        "+OK ringmail POP3 server signing off (1 messages deleted)\r\n",
    ]
    .concat()
}

const EXPECTED_STEPS: [&str; 8] = [
    "auth alice/wrong",
    "auth alice/secret word",
    "retrieve 0 None",
    "retrieve 1 Some(1)",
    "retrieve 2 Some(0)",
    "retrieve 1 None",
    "quit [2]",
    "close",
];

/// Runs the script split into the given chunks.
fn run_split(chunks: &[&[u8]]) -> (String, Vec<String>) {
    let mut d = Driver::new(config());
    for c in chunks {
        if d.closed {
            break;
        }
        d.feed(c);
    }
    assert!(d.closed, "the session did not close");
    (String::from_utf8_lossy(&d.wire).into_owned(), d.steps)
}

#[test]
fn pipelined_session_in_one_write() {
    let (wire, steps) = run_split(&[&script()]);
    assert_eq!(wire, expected_transcript());
    assert_eq!(steps, EXPECTED_STEPS);
}

#[test]
fn session_one_byte_at_a_time() {
    let script = script();
    let bytes: Vec<&[u8]> = script.chunks(1).collect();
    let (wire, steps) = run_split(&bytes);
    assert_eq!(wire, expected_transcript());
    assert_eq!(steps, EXPECTED_STEPS);
}

#[test]
fn session_split_in_two_at_every_byte() {
    let script = script();
    let expected = expected_transcript();
    for i in 0..=script.len() {
        let (wire, steps) = run_split(&[&script[..i], &script[i..]]);
        assert_eq!(wire, expected, "split at {i}");
        assert_eq!(steps, EXPECTED_STEPS, "split at {i}");
    }
}

/// xorshift64: deterministic, good enough to pick chunk sizes and junk bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn session_split_at_random() {
    let script = script();
    let expected = expected_transcript();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let mut chunks = Vec::new();
        let mut rest = &script[..];
        while !rest.is_empty() {
            let n = 1 + rng.below(if round % 2 == 0 { 8 } else { 120 }) as usize;
            let (c, r) = rest.split_at(n.min(rest.len()));
            chunks.push(c);
            rest = r;
        }
        let (wire, steps) = run_split(&chunks);
        assert_eq!(wire, expected, "round {round}");
        assert_eq!(steps, EXPECTED_STEPS);
    }
}

#[test]
fn greeting_names_the_host_without_an_apop_timestamp() {
    let s = Session::new(config());
    assert_eq!(s.output(), b"+OK ringmail POP3 ready mail.example.org\r\n");
    let s = Session::new(Config {
        hostname: "<1.2@evil>\r\nX".to_string(),
        ..Config::default()
    });
    assert_eq!(s.output(), b"+OK ringmail POP3 ready 1.2@evilX\r\n");
    assert_eq!(s.state(), State::Authorization);
    assert_eq!(s.user(), None);
}

#[test]
fn defaults() {
    let c = Config::default();
    assert_eq!(c.line_bytes_max, 255);
    assert_eq!(c.sasl_line_bytes_max, 8192);
    assert_eq!(c.error_count_max, 20);
    assert!(!c.stls);
    assert!(c.user_pass);
}

#[test]
fn authorization_state_commands() {
    let mut d = authorization();
    assert_eq!(d.say("CAPA\r\n"), CAPA_AUTHORIZATION);
    assert_eq!(d.say("capa x\r\n"), "-ERR CAPA takes no arguments\r\n");
    for cmd in [
        "STAT", "LIST", "LIST 1", "UIDL", "RETR 1", "TOP 1 1", "DELE 1",
    ] {
        let reply = d.say(&format!("{cmd}\r\n"));
        assert_eq!(reply, "-ERR not allowed before login\r\n", "{cmd}");
    }
    assert_eq!(d.say("NOOP\r\n"), "-ERR not allowed before login\r\n");
    assert_eq!(d.say("RSET\r\n"), "-ERR not allowed before login\r\n");
    // Not implemented, not advertised: unknown. STLS too while it is off.
    assert_eq!(d.say("APOP alice 0123\r\n"), "-ERR unknown command\r\n");
    assert_eq!(d.say("STLS\r\n"), "-ERR unknown command\r\n");
    assert_eq!(d.say("PASS x\r\n"), "-ERR send USER first\r\n");
    assert_eq!(d.say("USER\r\n"), "-ERR USER needs one user name\r\n");
    assert_eq!(d.say("USER a b\r\n"), "-ERR USER needs one user name\r\n");
    assert_eq!(d.say("USER  bob  \r\n"), "+OK send PASS\r\n");
    // A later USER replaces the earlier one.
    assert_eq!(d.say("USER alice\r\n"), "+OK send PASS\r\n");
    assert_eq!(d.say("PASS\r\n"), "-ERR PASS needs a password\r\n");
    assert_eq!(d.s.state(), State::Authorization);
    assert_eq!(d.say("QUIT now\r\n"), "-ERR QUIT takes no arguments\r\n");
    assert_eq!(d.say("quit\r\n"), "+OK bye\r\n");
    assert!(d.closed);
    assert_eq!(d.s.state(), State::Closed);
    // Nothing to expunge in AUTHORIZATION: no Quit step.
    assert_eq!(d.steps, ["close"]);
    // Input after the close is dropped, and process keeps saying Close.
    d.s.push(b"NOOP\r\n");
    assert_eq!(d.s.process(), Step::Close);
    assert_eq!(d.s.output(), b"");
    assert_eq!(d.s.buffered(), 0);
}

#[test]
fn password_is_the_rest_of_the_line() {
    let mut d = authorization();
    d.say("USER alice\r\nPASS secret word\r\n");
    assert_eq!(d.steps, ["auth alice/secret word"]);
    let mut d = authorization();
    d.say("USER alice\r\nPASS  two  spaces \r\n");
    assert_eq!(d.steps, ["auth alice/ two  spaces "]);
}

#[test]
fn failed_login_forgets_the_user() {
    let mut d = authorization();
    assert_eq!(
        d.say("USER alice\r\nPASS nope\r\n"),
        "+OK send PASS\r\n-ERR [AUTH] invalid user name or password\r\n"
    );
    assert_eq!(d.s.user(), None);
    assert_eq!(d.say("PASS secret word\r\n"), "-ERR send USER first\r\n");
    // USER again after a failure is fine.
    assert_eq!(
        d.say("USER alice\r\nPASS secret word\r\n"),
        "+OK send PASS\r\n+OK maildrop has 3 messages (126 octets)\r\n"
    );
    assert_eq!(d.s.user(), Some("alice"));
}

#[test]
fn login_refusals_have_their_response_codes() {
    let mut d = authorization();
    assert_eq!(
        d.say("USER busy\r\nPASS x\r\n"),
        "+OK send PASS\r\n-ERR [IN-USE] maildrop already locked\r\n"
    );
    assert_eq!(
        d.say("USER slow\r\nPASS x\r\n"),
        "+OK send PASS\r\n-ERR [SYS/TEMP] service temporarily unavailable, try later\r\n"
    );
    assert_eq!(d.s.state(), State::Authorization);
    assert_eq!(d.s.user(), None);
}

#[test]
fn non_utf8_credentials_are_refused_in_core() {
    let mut d = authorization();
    d.feed(b"USER \xff\r\n");
    assert!(d.wire.ends_with(b"-ERR invalid user name\r\n"));
    d.feed(b"USER alice\r\nPASS \xc3\x28\r\n");
    assert!(d
        .wire
        .ends_with(b"-ERR [AUTH] invalid user name or password\r\n"));
    assert!(d.steps.is_empty());
}

#[test]
fn user_pass_can_be_turned_off() {
    let mut d = Driver::new(Config {
        user_pass: false,
        ..config()
    });
    d.wire.clear();
    assert_eq!(
        d.say("CAPA\r\n"),
        CAPA_AUTHORIZATION.replace("USER\r\n", "")
    );
    assert_eq!(
        d.say("USER alice\r\n"),
        "-ERR USER/PASS not enabled, use AUTH PLAIN\r\n"
    );
    assert_eq!(
        d.say("PASS secret word\r\n"),
        "-ERR USER/PASS not enabled, use AUTH PLAIN\r\n"
    );
    assert_eq!(
        d.say("AUTH PLAIN AGFsaWNlAHNlY3JldCB3b3Jk\r\n"),
        "+OK maildrop has 3 messages (126 octets)\r\n"
    );
}

#[test]
fn passwords_can_be_refused_until_tls() {
    let mut d = Driver::new(Config {
        cleartext_auth: false,
        stls: true,
        ..config()
    });
    d.wire.clear();
    let with_stls = CAPA_AUTHORIZATION.replace(".\r\n", "STLS\r\n.\r\n");
    assert_eq!(
        d.say("CAPA\r\n"),
        with_stls
            .replace("USER\r\n", "")
            .replace("SASL PLAIN\r\n", "")
    );
    let refused = "-ERR [AUTH] plaintext authentication disallowed without TLS, use STLS\r\n";
    assert_eq!(d.say("USER alice\r\n"), refused);
    assert_eq!(d.say("PASS secret word\r\n"), refused);
    assert_eq!(d.say("AUTH PLAIN AGFsaWNlAHNlY3JldCB3b3Jk\r\n"), refused);
    assert_eq!(d.say("AUTH\r\n"), "+OK\r\n.\r\n");
    assert!(d.steps.is_empty(), "no password reached the driver");
    assert_eq!(d.say("STLS\r\n"), "+OK begin TLS negotiation\r\n");
    assert_eq!(d.s.waiting(), Some(Waiting::StartTls));
    d.s.tls_started();
    d.run();
    // Under TLS: offered and taken, as always.
    assert_eq!(d.say("CAPA\r\n"), CAPA_AUTHORIZATION);
    assert_eq!(
        d.say("USER alice\r\nPASS secret word\r\n"),
        "+OK send PASS\r\n+OK maildrop has 3 messages (126 octets)\r\n"
    );
}

#[test]
fn an_authzid_naming_the_same_user_in_another_case_is_that_user() {
    let mut d = Driver::new(config());
    d.wire.clear();
    // "ALICE\0alice\0secret word"
    assert_eq!(
        d.say("AUTH PLAIN QUxJQ0UAYWxpY2UAc2VjcmV0IHdvcmQ=\r\n"),
        "+OK maildrop has 3 messages (126 octets)\r\n"
    );
}

#[test]
fn transaction_state_commands() {
    let mut d = transaction();
    assert_eq!(d.say("CAPA\r\n"), CAPA_TRANSACTION);
    for cmd in ["USER alice", "PASS x", "AUTH", "AUTH PLAIN"] {
        let reply = d.say(&format!("{cmd}\r\n"));
        assert_eq!(reply, "-ERR already logged in\r\n", "{cmd}");
    }
    assert_eq!(d.say("STLS\r\n"), "-ERR unknown command\r\n");
    assert_eq!(d.say("stat\r\n"), "+OK 3 126\r\n");
    assert_eq!(d.say("STAT 1\r\n"), "-ERR STAT takes no arguments\r\n");
    assert_eq!(d.say("NOOP\r\n"), "+OK\r\n");
    assert_eq!(d.say("NOOP 1\r\n"), "-ERR NOOP takes no arguments\r\n");
    assert_eq!(d.say("LIST 3\r\n"), "+OK 3 34\r\n");
    assert_eq!(d.say("LIST 1 2\r\n"), "-ERR too many arguments\r\n");
    assert_eq!(d.say("UIDL 2\r\n"), "+OK 2 u-two\r\n");
    assert_eq!(d.say("UIDL 2 3\r\n"), "-ERR too many arguments\r\n");
    assert_eq!(d.say("DELE 2\r\n"), "+OK message 2 deleted\r\n");
    assert_eq!(
        d.say("LIST\r\n"),
        "+OK 2 messages (94 octets)\r\n1 60\r\n3 34\r\n.\r\n"
    );
    assert_eq!(
        d.say("UIDL\r\n"),
        "+OK unique-id listing follows\r\n1 u-one\r\n3 u-three\r\n.\r\n"
    );
    assert_eq!(d.say("UIDL 2\r\n"), "-ERR no such message\r\n");
    assert_eq!(d.say("TOP 2 1\r\n"), "-ERR no such message\r\n");
    assert_eq!(d.say("RSET x\r\n"), "-ERR RSET takes no arguments\r\n");
    assert_eq!(
        d.say("RSET\r\n"),
        "+OK maildrop has 3 messages (126 octets)\r\n"
    );
    assert_eq!(d.say("UIDL 2\r\n"), "+OK 2 u-two\r\n");
    assert_eq!(d.say("RETR\r\n"), "-ERR RETR needs one message number\r\n");
    assert_eq!(
        d.say("RETR 1 2\r\n"),
        "-ERR RETR needs one message number\r\n"
    );
    assert_eq!(
        d.say("TOP 1\r\n"),
        "-ERR TOP needs a message number and a line count\r\n"
    );
    assert_eq!(
        d.say("TOP 1 2 3\r\n"),
        "-ERR TOP needs a message number and a line count\r\n"
    );
    assert_eq!(d.say("DELE\r\n"), "-ERR DELE needs one message number\r\n");
    assert_eq!(d.say("QUIT x\r\n"), "-ERR QUIT takes no arguments\r\n");
    assert_eq!(d.s.user(), Some("alice"));
    assert_eq!(
        d.say("QUIT\r\n"),
        "+OK ringmail POP3 server signing off (0 messages deleted)\r\n"
    );
    assert_eq!(d.steps.last().map(String::as_str), Some("close"));
    assert!(d.steps.contains(&"quit []".to_string()));
}

#[test]
fn message_numbers_and_line_counts() {
    let mut d = transaction();
    for bad in ["+1", "-1", "1x", "x", "0x1", "１"] {
        let reply = d.say(&format!("RETR {bad}\r\n"));
        assert_eq!(reply, "-ERR invalid message number\r\n", "{bad}");
    }
    for missing in [
        "0",
        "4",
        "18446744073709551615",
        "18446744073709551616",
        "9".repeat(40).as_str(),
    ] {
        let reply = d.say(&format!("LIST {missing}\r\n"));
        assert_eq!(reply, "-ERR no such message\r\n", "{missing}");
    }
    assert_eq!(d.say("LIST 002\r\n"), "+OK 2 32\r\n");
    assert_eq!(d.say("TOP 1 -1\r\n"), "-ERR invalid line count\r\n");
    assert_eq!(d.say("TOP 1 +1\r\n"), "-ERR invalid line count\r\n");
    assert_eq!(
        d.say("TOP 1 18446744073709551616\r\n"),
        "-ERR line count too large\r\n"
    );
    assert_eq!(
        d.say("TOP 2 18446744073709551615\r\n"),
        "+OK\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\n.\r\n"
    );
    assert_eq!(
        d.steps.last().unwrap(),
        "retrieve 1 Some(18446744073709551615)"
    );
    assert_eq!(
        d.say("DELE 99999999999999999999\r\n"),
        "-ERR no such message\r\n"
    );
    // The errors above are 15, under the limit of 20: the session is still open.
    assert_eq!(d.say("STAT\r\n"), "+OK 3 126\r\n");
}

#[test]
fn retr_and_top_of_odd_messages() {
    let mut d = transaction();
    assert_eq!(
        d.say("RETR 3\r\n"),
        "+OK 34 octets\r\nSubject: three\r\n\r\nno final newline\r\n.\r\n"
    );
    assert_eq!(
        d.say("TOP 1 0\r\n"),
        "+OK\r\nFrom: a@example.org\r\nSubject: one\r\n\r\n.\r\n"
    );
    assert_eq!(
        d.say("TOP 1 2\r\n"),
        "+OK\r\nFrom: a@example.org\r\nSubject: one\r\n\r\nHello\r\n..dot line\r\n.\r\n"
    );
    assert_eq!(
        d.say("TOP 3 5\r\n"),
        "+OK\r\nSubject: three\r\n\r\nno final newline\r\n.\r\n"
    );
}

#[test]
fn commands_are_held_while_a_login_is_checked() {
    let mut s = Session::new(config());
    s.clear_output();
    s.push(b"USER alice\r\nPASS secret word\r\nSTAT\r\nLIST 1\r\nCAPA\r\n");
    let Step::Authenticate { user, password } = s.process() else {
        panic!("no Authenticate step");
    };
    assert_eq!((user.as_str(), password.as_str()), ("alice", "secret word"));
    assert_eq!(s.output(), b"+OK send PASS\r\n");
    assert_eq!(s.waiting(), Some(Waiting::Login));
    assert_eq!(s.state(), State::Authorization);
    // Asking again without the answer handles nothing.
    s.clear_output();
    for _ in 0..3 {
        assert_eq!(s.process(), Step::NeedInput);
    }
    // More input while waiting waits too; other answers than login are ignored.
    s.push(b"NOOP\r\n");
    s.retrieved();
    s.quit_done(true);
    s.tls_started();
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(s.output(), b"");
    assert!(!s.in_tls());
    s.login(Login::Ok(messages()));
    assert_eq!(s.user(), Some("alice"));
    assert_eq!(s.process(), Step::NeedInput);
    let expected = [
        "+OK maildrop has 3 messages (126 octets)\r\n",
        "+OK 3 126\r\n",
        "+OK 1 60\r\n",
        CAPA_TRANSACTION,
        "+OK\r\n",
    ]
    .concat();
    assert_eq!(String::from_utf8_lossy(s.output()), expected);
    // A second answer is ignored.
    s.clear_output();
    s.login(Login::Failed);
    assert_eq!(s.output(), b"");
    assert_eq!(s.state(), State::Transaction);
}

#[test]
fn commands_are_held_while_a_message_is_streamed() {
    let mut s = Session::new(config());
    s.push(b"USER alice\r\nPASS secret word\r\n");
    assert!(matches!(s.process(), Step::Authenticate { .. }));
    s.login(Login::Ok(messages()));
    s.clear_output();
    s.push(b"NOOP\r\nTOP 2 0\r\nDELE 1\r\nQUIT\r\n");
    assert_eq!(
        s.process(),
        Step::Retrieve {
            index: 1,
            lines: Some(0)
        }
    );
    assert_eq!(s.output(), b"+OK\r\n+OK\r\n");
    assert_eq!(s.waiting(), Some(Waiting::Retrieve));
    s.clear_output();
    assert_eq!(s.process(), Step::NeedInput);
    s.login(Login::Failed);
    s.quit_done(true);
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(s.output(), b"");
    s.retrieved();
    assert_eq!(s.process(), Step::Quit { deleted: vec![0] });
    assert_eq!(s.output(), b"+OK message 1 deleted\r\n");
    assert_eq!(s.state(), State::Update);
    assert_eq!(s.waiting(), Some(Waiting::Quit));
}

#[test]
fn the_expunge_is_waited_for_and_its_failure_reported() {
    let mut s = Session::new(config());
    s.push(b"USER alice\r\nPASS secret word\r\n");
    assert!(matches!(s.process(), Step::Authenticate { .. }));
    s.login(Login::Ok(messages()));
    s.push(b"DELE 3\r\nDELE 1\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(
        s.process(),
        Step::Quit {
            deleted: vec![0, 2]
        }
    );
    s.clear_output();
    assert_eq!(s.process(), Step::NeedInput);
    s.retrieved();
    s.login(Login::Failed);
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(s.output(), b"");
    assert_eq!(s.state(), State::Update);
    s.quit_done(false);
    assert_eq!(
        s.output(),
        b"-ERR [SYS/TEMP] some deleted messages not removed\r\n"
    );
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.process(), Step::Close);
    assert_eq!(s.process(), Step::Close);
    assert_eq!(
        s.output(),
        b"-ERR [SYS/TEMP] some deleted messages not removed\r\n"
    );
}

#[test]
fn quit_reports_how_many_were_deleted() {
    let mut d = transaction();
    assert_eq!(
        d.say("DELE 1\r\nDELE 2\r\nQUIT\r\n"),
        "+OK message 1 deleted\r\n+OK message 2 deleted\r\n\
         +OK ringmail POP3 server signing off (2 messages deleted)\r\n"
    );
    assert_eq!(d.steps[d.steps.len() - 2], "quit [0, 1]");
}

#[test]
fn empty_maildrop() {
    let mut s = Session::new(config());
    s.push(b"USER alice\r\nPASS x\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\n");
    assert!(matches!(s.process(), Step::Authenticate { .. }));
    s.clear_output();
    s.login(Login::Ok(Vec::new()));
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(
        String::from_utf8_lossy(s.output()),
        "+OK maildrop has 0 messages (0 octets)\r\n+OK 0 0\r\n\
         +OK 0 messages (0 octets)\r\n.\r\n+OK unique-id listing follows\r\n.\r\n\
         -ERR no such message\r\n"
    );
}

// AUTH (RFC 5034) with PLAIN (RFC 4616).

fn b64(s: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn auth_lists_mechanisms() {
    let mut d = authorization();
    assert_eq!(d.say("AUTH\r\n"), "+OK\r\nPLAIN\r\n.\r\n");
    assert_eq!(
        d.say("AUTH CRAM-MD5\r\n"),
        "-ERR unsupported authentication mechanism\r\n"
    );
    assert_eq!(
        d.say("AUTH PLAIN a b\r\n"),
        "-ERR AUTH takes a mechanism and an optional initial response\r\n"
    );
}

#[test]
fn auth_plain_initial_response() {
    let mut d = authorization();
    let ir = b64(b"\0alice\0secret word");
    assert_eq!(
        d.say(&format!("auth plain {ir}\r\n")),
        "+OK maildrop has 3 messages (126 octets)\r\n"
    );
    assert_eq!(d.steps, ["auth alice/secret word"]);
    assert_eq!(d.s.user(), Some("alice"));
}

#[test]
fn auth_plain_authzid_must_be_empty_or_the_user() {
    let mut d = authorization();
    let own = b64(b"alice\0alice\0secret word");
    assert_eq!(
        d.say(&format!("AUTH PLAIN {own}\r\n")),
        "+OK maildrop has 3 messages (126 octets)\r\n"
    );
    let mut d = authorization();
    let other = b64(b"bob\0alice\0secret word");
    assert_eq!(
        d.say(&format!("AUTH PLAIN {other}\r\n")),
        "-ERR [AUTH] logging in as another user is not allowed\r\n"
    );
    assert!(d.steps.is_empty());
}

#[test]
fn auth_plain_continuation() {
    let mut d = authorization();
    assert_eq!(d.say("AUTH PLAIN\r\n"), "+ \r\n");
    // The response line is not a command, even if it looks like one.
    assert_eq!(d.say("QUIT\r\n"), "-ERR invalid SASL response\r\n");
    assert!(!d.closed);
    assert_eq!(d.say("AUTH PLAIN\r\n"), "+ \r\n");
    let response = b64(b"\0alice\0secret word");
    assert_eq!(
        d.say(&format!("{response}\r\n")),
        "+OK maildrop has 3 messages (126 octets)\r\n"
    );
    assert_eq!(d.steps, ["auth alice/secret word"]);
}

#[test]
fn auth_plain_pipelined_with_its_response() {
    let mut d = authorization();
    let response = b64(b"\0alice\0secret word");
    assert_eq!(
        d.say(&format!("AUTH PLAIN\r\n{response}\r\nSTAT\r\n")),
        "+ \r\n+OK maildrop has 3 messages (126 octets)\r\n+OK 3 126\r\n"
    );
}

#[test]
fn auth_plain_cancel_and_bad_responses() {
    let mut d = authorization();
    assert_eq!(
        d.say("AUTH PLAIN\r\n*\r\n"),
        "+ \r\n-ERR authentication cancelled\r\n"
    );
    // After the cancel a line is a command again.
    assert_eq!(d.say("NOOP\r\n"), "-ERR not allowed before login\r\n");
    assert_eq!(
        d.say("AUTH PLAIN !!!!\r\n"),
        "-ERR invalid SASL response\r\n"
    );
    assert_eq!(
        d.say("AUTH PLAIN\r\n!!!!\r\n"),
        "+ \r\n-ERR invalid SASL response\r\n"
    );
    // "=" is the empty initial response: no valid PLAIN message.
    assert_eq!(d.say("AUTH PLAIN =\r\n"), "-ERR invalid SASL response\r\n");
    // An empty continuation line is an empty response.
    assert_eq!(
        d.say("AUTH PLAIN\r\n\r\n"),
        "+ \r\n-ERR invalid SASL response\r\n"
    );
    let malformed: [&[u8]; 5] = [
        b"alice\0secret",         // one NUL
        b"\0alice\0secret\0more", // three
        b"\0\0secret",            // no authcid
        b"\0alice\0",             // no password
        b"\0al\xffice\0secret",   // not UTF-8
    ];
    for m in malformed {
        let reply = d.say(&format!("AUTH PLAIN {}\r\n", b64(m)));
        assert_eq!(reply, "-ERR invalid SASL response\r\n", "{m:?}");
    }
    assert!(d.steps.is_empty());
    assert_eq!(d.s.state(), State::Authorization);
}

#[test]
fn auth_plain_accepts_unpadded_base64() {
    let mut d = authorization();
    let ir = b64(b"alice\0alice\0secret word");
    let unpadded = ir.trim_end_matches('=');
    assert_ne!(unpadded, ir, "the sample must need padding");
    assert_eq!(
        d.say(&format!("AUTH PLAIN {unpadded}\r\n")),
        "+OK maildrop has 3 messages (126 octets)\r\n"
    );
}

#[test]
fn auth_forgets_a_pending_user() {
    let mut d = authorization();
    d.say("USER alice\r\nAUTH PLAIN\r\n*\r\n");
    assert_eq!(d.say("PASS secret word\r\n"), "-ERR send USER first\r\n");
}

#[test]
fn sasl_response_may_be_longer_than_a_command() {
    // A 1000-character password: its response line is far over 255 octets.
    let password = "p".repeat(1000);
    let response = b64(format!("\0alice\0{password}").as_bytes());
    assert!(response.len() > 255);
    let mut d = authorization();
    d.say(&format!("AUTH PLAIN\r\n{response}\r\n"));
    assert_eq!(d.steps, [format!("auth alice/{password}")]);
    // The same as an initial response is a command line: too long.
    let mut d = authorization();
    assert_eq!(
        d.say(&format!("AUTH PLAIN {response}\r\n")),
        "-ERR line too long\r\n"
    );
}

#[test]
fn sasl_line_limit() {
    for split in [false, true] {
        let mut d = authorization();
        let say = |d: &mut Driver, text: &str| {
            let before = d.wire.len();
            if split {
                text.as_bytes().chunks(1).for_each(|b| d.feed(b));
            } else {
                d.feed(text.as_bytes());
            }
            String::from_utf8_lossy(&d.wire[before..]).into_owned()
        };
        // 8190 + CRLF fits (it decodes to no valid message); 8191 + CRLF does not.
        let fits = format!("AUTH PLAIN\r\n{}\r\n", "A".repeat(8190));
        assert_eq!(say(&mut d, &fits), "+ \r\n-ERR invalid SASL response\r\n");
        let over = format!("AUTH PLAIN\r\n{}\r\n", "A".repeat(8191));
        assert_eq!(say(&mut d, &over), "+ \r\n-ERR line too long\r\n");
        // The too long response ended the exchange: next is a command.
        assert_eq!(say(&mut d, "CAPA\r\n"), CAPA_AUTHORIZATION);
    }
}

// STLS (RFC 2595), when turned on.

#[test]
fn stls_when_enabled() {
    let mut s = Session::new(Config {
        stls: true,
        ..config()
    });
    s.clear_output();
    s.push(b"CAPA\r\n");
    assert_eq!(s.process(), Step::NeedInput);
    let capa = CAPA_AUTHORIZATION.replace(".\r\n", "STLS\r\n.\r\n");
    assert_eq!(String::from_utf8_lossy(s.output()), capa);
    s.clear_output();
    // What is pipelined after STLS, and what arrives before the handshake, is
    // plaintext that must not count as sent under TLS.
    s.push(b"USER mallory\r\nSTLS\r\nPASS injected\r\nQUIT\r\n");
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(
        s.output(),
        b"+OK send PASS\r\n+OK begin TLS negotiation\r\n"
    );
    assert_eq!(s.waiting(), Some(Waiting::StartTls));
    assert_eq!(s.buffered(), 0);
    s.push(b"QUIT\r\n");
    assert_eq!(s.buffered(), 0);
    s.clear_output();
    s.tls_started();
    assert!(s.in_tls());
    assert_eq!(s.waiting(), None);
    // The USER given before STLS is forgotten.
    s.push(b"PASS secret word\r\nCAPA\r\nSTLS\r\n");
    assert_eq!(s.process(), Step::NeedInput);
    let expected = [
        "-ERR send USER first\r\n",
        CAPA_AUTHORIZATION,
        "-ERR already using TLS\r\n",
    ]
    .concat();
    assert_eq!(String::from_utf8_lossy(s.output()), expected);
}

#[test]
fn stls_after_login_is_refused() {
    let mut s = Session::new(Config {
        stls: true,
        ..config()
    });
    s.push(b"USER alice\r\nPASS secret word\r\n");
    assert!(matches!(s.process(), Step::Authenticate { .. }));
    s.login(Login::Ok(messages()));
    s.clear_output();
    s.push(b"STLS\r\nCAPA\r\n");
    assert_eq!(s.process(), Step::NeedInput);
    let expected = ["-ERR already logged in\r\n", CAPA_TRANSACTION].concat();
    assert_eq!(String::from_utf8_lossy(s.output()), expected);
    assert!(!s.in_tls());
}

#[test]
fn an_implicit_tls_session_neither_offers_nor_takes_stls() {
    let mut s = Session::new(Config {
        stls: true,
        ..config()
    });
    s.set_tls();
    s.clear_output();
    s.push(b"CAPA\r\nSTLS\r\n");
    assert_eq!(s.process(), Step::NeedInput);
    let expected = [CAPA_AUTHORIZATION, "-ERR already using TLS\r\n"].concat();
    assert_eq!(String::from_utf8_lossy(s.output()), expected);
    assert!(s.in_tls());
}

// Line limits and errors.

#[test]
fn line_of_255_octets_fits_and_256_does_not() {
    for split in [false, true] {
        for (eol, pad) in [("\r\n", 0), ("\n", 1)] {
            let mut d = authorization();
            let mut say = |text: String| {
                let before = d.wire.len();
                if split {
                    text.as_bytes().chunks(1).for_each(|b| d.feed(b));
                } else {
                    d.feed(text.as_bytes());
                }
                String::from_utf8_lossy(&d.wire[before..]).into_owned()
            };
            // "USER " + name + eol: 255 octets in all.
            let fits = format!("USER {}{eol}", "a".repeat(248 + pad));
            assert_eq!(fits.len(), 255);
            assert_eq!(say(fits), "+OK send PASS\r\n");
            let over = format!("USER {}{eol}", "a".repeat(249 + pad));
            assert_eq!(over.len(), 256);
            assert_eq!(say(over), "-ERR line too long\r\n");
            // Connection kept; the next line is read from its start.
            assert_eq!(say("CAPA\r\n".to_string()), CAPA_AUTHORIZATION);
        }
    }
}

#[test]
fn huge_line_is_refused_without_being_buffered() {
    let mut d = transaction();
    let before = d.wire.len();
    d.feed(b"LIST ");
    let chunk = [b'1'; 1000];
    for _ in 0..100 {
        d.feed(&chunk);
        assert!(d.s.buffered() <= 255, "{} bytes held", d.s.buffered());
    }
    // Answered as soon as it is known to be too long, once.
    assert_eq!(&d.wire[before..], b"-ERR line too long\r\n");
    d.feed(b"111\r\nSTAT\r\n");
    assert_eq!(&d.wire[before..], b"-ERR line too long\r\n+OK 3 126\r\n");
    assert_eq!(d.s.buffered(), 0);
}

#[test]
fn over_long_line_is_dropped_as_soon_as_it_is_known() {
    // 255 octets without an LF: the LF still to come makes it too long, so it is
    // answered and dropped now, not held.
    let mut s = Session::new(config());
    s.clear_output();
    for b in "USER ".bytes().chain(std::iter::repeat_n(b'a', 249)) {
        s.push(&[b]);
        assert!(s.buffered() < 255, "{} bytes held", s.buffered());
        assert_eq!(s.process(), Step::NeedInput);
    }
    s.push(b"a");
    assert_eq!(s.buffered(), 0);
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(s.output(), b"-ERR line too long\r\n");
    // A 256-octet line pushed whole is not queued either.
    let mut s = Session::new(config());
    s.clear_output();
    s.push(format!("USER {}\r\n", "a".repeat(249)).as_bytes());
    assert_eq!(s.buffered(), 0);
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(s.output(), b"-ERR line too long\r\n");
}

#[test]
fn huge_line_in_one_push_is_not_copied() {
    let mut s = Session::new(config());
    let mut line = vec![b'x'; 100_000];
    line.extend_from_slice(b"\r\nCAPA\r\n");
    s.clear_output();
    s.push(&line);
    assert!(s.buffered() < 16, "{} bytes held", s.buffered());
    assert_eq!(s.process(), Step::NeedInput);
    let expected = ["-ERR line too long\r\n", CAPA_AUTHORIZATION].concat();
    assert_eq!(String::from_utf8_lossy(s.output()), expected);
}

#[test]
fn empty_and_blank_lines_are_errors() {
    let mut d = authorization();
    assert_eq!(d.say("\r\n"), "-ERR empty command\r\n");
    assert_eq!(d.say("\n"), "-ERR empty command\r\n");
    assert_eq!(d.say("   \r\n"), "-ERR empty command\r\n");
    // Leading spaces before a command are tolerated.
    assert_eq!(d.say("  CAPA\r\n"), CAPA_AUTHORIZATION);
}

#[test]
fn too_many_errors_close_the_session() {
    let mut d = Driver::new(Config {
        error_count_max: 3,
        ..config()
    });
    d.wire.clear();
    assert_eq!(
        d.say("a\r\nUSER alice\r\nb\r\nc\r\nNOOP\r\nQUIT\r\n"),
        "-ERR unknown command\r\n+OK send PASS\r\n-ERR unknown command\r\n\
         -ERR unknown command\r\n-ERR too many errors\r\n"
    );
    assert!(d.closed);
    assert_eq!(d.s.state(), State::Closed);
    assert_eq!(d.s.process(), Step::Close);
}

#[test]
fn errors_count_in_total_and_failed_logins_count() {
    let mut d = authorization();
    // 19 errors, good commands between them: still open.
    for i in 0..19 {
        let reply = d.say(&format!("USER alice\r\nPASS guess{i}\r\n"));
        assert_eq!(
            reply,
            "+OK send PASS\r\n-ERR [AUTH] invalid user name or password\r\n"
        );
    }
    assert!(!d.closed);
    assert_eq!(
        d.say("USER alice\r\nPASS guess\r\nCAPA\r\n"),
        "+OK send PASS\r\n-ERR [AUTH] invalid user name or password\r\n\
         -ERR too many errors\r\n"
    );
    assert!(d.closed);
    assert_eq!(d.steps.len(), 20 + 1);
}

#[test]
fn step_debug_hides_the_password() {
    let step = Step::Authenticate {
        user: "alice".to_string(),
        password: "hunter2".to_string(),
    };
    let shown = format!("{step:?}");
    assert!(shown.contains("alice"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// Junk of every kind, in every state: no panic, replies are lines, memory bounded.
#[test]
fn random_input_never_panics() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let words: [&[u8]; 22] = [
        b"USER alice",
        b"PASS secret word",
        b"AUTH PLAIN",
        b"AUTH",
        b"*",
        b"STAT",
        b"LIST",
        b"LIST 1",
        b"UIDL 2",
        b"RETR 1",
        b"TOP 2 0",
        b"TOP 1 99",
        b"DELE 1",
        b"DELE 2",
        b"RSET",
        b"NOOP",
        b"CAPA",
        b"AGFsaWNlAHNlY3JldCB3b3Jk",
        b"RETR 99999999999999999999999",
        b"STLS",
        b"QUIT",
        b"\xff\xfe\0",
    ];
    for round in 0..400 {
        let mut d = Driver::new(Config {
            stls: round % 3 == 0,
            error_count_max: 1000,
            ..config()
        });
        for _ in 0..60 {
            if d.closed {
                break;
            }
            let mut bytes = Vec::new();
            match rng.below(4) {
                0 => bytes.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
                1 => bytes.extend(std::iter::repeat_n(b'a', rng.below(600) as usize)),
                _ => {
                    bytes.extend_from_slice(words[rng.below(words.len() as u64) as usize]);
                    bytes.extend_from_slice(if rng.below(2) == 0 { b"\r\n" } else { b"\n" });
                }
            }
            d.feed(&bytes);
            if d.s.waiting() == Some(Waiting::StartTls) {
                d.s.tls_started();
                d.run();
            }
            assert!(d.s.buffered() <= 8192, "{} bytes held", d.s.buffered());
        }
        // Whatever happened, the greeting came first and what was written is whole lines.
        assert!(d.wire.starts_with(b"+OK ringmail POP3 ready"));
        assert!(d.wire.ends_with(b"\r\n"));
    }
}

#[test]
fn a_long_pipeline_is_answered_in_bounded_pieces() {
    let mut d = Driver::new(Config {
        output_bytes_max: 200,
        ..config()
    });
    d.feed(b"USER alice\r\nPASS secret word\r\n");
    d.steps.clear();
    let before = d.wire.len();
    // One write of 40 UIDLs: every reply arrives, in order, and the session hands its
    // replies out whenever they pass the limit instead of holding them all.
    let mut most = 0;
    d.s.push("UIDL\r\n".repeat(40).as_bytes());
    loop {
        let step = d.s.process();
        most = most.max(d.s.output().len());
        match step {
            Step::Flush => d.flush(),
            Step::NeedInput => {
                d.flush();
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let one = "+OK unique-id listing follows\r\n1 u-one\r\n2 u-two\r\n3 u-three\r\n.\r\n";
    assert_eq!(String::from_utf8_lossy(&d.wire[before..]), one.repeat(40));
    assert!(most < 200 + one.len(), "{most} bytes held");
}

#[test]
fn a_message_that_cannot_be_read_is_refused_and_the_session_goes_on() {
    let mut d = transaction();
    d.wire.clear();
    d.s.push(b"DELE 1\r\nRETR 2\r\nTOP 3 0\r\nSTAT\r\n");
    let Step::Retrieve {
        index: 1,
        lines: None,
    } = d.s.process()
    else {
        panic!("RETR 2 wanted")
    };
    // Nothing of it was sent: the store failed before.
    d.s.retrieve_failed();
    assert_eq!(d.s.waiting(), None);
    let Step::Retrieve {
        index: 2,
        lines: Some(0),
    } = d.s.process()
    else {
        panic!("TOP 3 wanted")
    };
    d.s.retrieve_failed();
    assert!(matches!(d.s.process(), Step::NeedInput));
    d.flush();
    assert_eq!(
        String::from_utf8_lossy(&d.wire),
        "+OK message 1 deleted\r\n\
         -ERR [SYS/TEMP] the message cannot be read now, try again later\r\n\
         -ERR [SYS/TEMP] the message cannot be read now, try again later\r\n\
         +OK 2 66\r\n"
    );
    // Outside a retrieve it changes nothing.
    d.s.retrieve_failed();
    assert!(d.s.output().is_empty());
}
