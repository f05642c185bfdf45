//! The POP3 core: every command in every state, pipelined input, input split at
//! every byte and at random points, the limits.

use super::*;

fn msgs() -> Vec<Message> {
    vec![
        Message {
            size: 100,
            uidl: "A".into(),
        },
        Message {
            size: 200,
            uidl: "B".into(),
        },
        Message {
            size: 300,
            uidl: "C".into(),
        },
    ]
}

/// Drives a session over `chunks` the way the driver does, answering steps: the
/// password "pw" logs in, "busy" is a temporary failure, "locked" in use; RETR and
/// TOP write a marker; QUIT succeeds. Returns the whole output and the steps.
fn drive(chunks: &[&[u8]]) -> (String, Vec<Step>) {
    let mut s = Session::new(Config::default());
    let mut out = Vec::new();
    let mut steps = Vec::new();
    let run = |s: &mut Session, out: &mut Vec<u8>, steps: &mut Vec<Step>| loop {
        let step = s.process();
        out.extend_from_slice(s.output());
        s.clear_output();
        match &step {
            Step::NeedInput => return false,
            Step::Close => {
                steps.push(step);
                return true;
            }
            Step::Authenticate { password, .. } => {
                let r = match password.as_str() {
                    "pw" | "with space" => Login::Ok(msgs()),
                    "busy" => Login::TempFail,
                    "locked" => Login::InUse,
                    _ => Login::Failed,
                };
                steps.push(step.clone());
                s.login(r);
            }
            Step::Retrieve { index, lines } => {
                out.extend_from_slice(format!("<msg {index} {lines:?}>\r\n.\r\n").as_bytes());
                steps.push(step.clone());
                s.retrieved();
            }
            Step::Quit { .. } => {
                steps.push(step.clone());
                s.quit_done(true);
            }
        }
    };
    for c in chunks {
        s.push(c);
        if run(&mut s, &mut out, &mut steps) {
            break;
        }
    }
    (String::from_utf8(out).unwrap(), steps)
}

fn whole(input: &str) -> (String, Vec<Step>) {
    drive(&[input.as_bytes()])
}

const SESSION: &str = "CAPA\r\nUSER u@x\r\nPASS pw\r\nSTAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 3\r\n\
    RETR 1\r\nTOP 2 5\r\nDELE 1\r\nDELE 1\r\nRETR 1\r\nSTAT\r\nRSET\r\nSTAT\r\nNOOP\r\n\
    DELE 3\r\nLIST\r\nQUIT\r\nSTAT\r\n";

#[test]
fn a_whole_pipelined_session() {
    let (out, steps) = whole(SESSION);
    let want = "+OK ringmail POP3 server ready on localhost\r\n\
        +OK capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\n\
        PIPELINING\r\nAUTH-RESP-CODE\r\nEXPIRE NEVER\r\nIMPLEMENTATION ringmail\r\n.\r\n\
        +OK send PASS\r\n\
        +OK maildrop has 3 messages (600 octets)\r\n\
        +OK 3 600\r\n\
        +OK 3 messages (600 octets)\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n\
        +OK 2 200\r\n\
        +OK unique-id listing follows\r\n1 A\r\n2 B\r\n3 C\r\n.\r\n\
        +OK 3 C\r\n\
        +OK 100 octets\r\n<msg 0 None>\r\n.\r\n\
        +OK top of message follows\r\n<msg 1 Some(5)>\r\n.\r\n\
        +OK message 1 deleted\r\n\
        -ERR message already deleted\r\n\
        -ERR message already deleted\r\n\
        +OK 2 500\r\n\
        +OK maildrop has 3 messages (600 octets)\r\n\
        +OK 3 600\r\n\
        +OK\r\n\
        +OK message 3 deleted\r\n\
        +OK 2 messages (300 octets)\r\n1 100\r\n2 200\r\n.\r\n\
        +OK ringmail POP3 server signing off (1 messages deleted)\r\n";
    assert_eq!(out, want);
    assert_eq!(
        steps,
        vec![
            Step::Authenticate {
                user: "u@x".into(),
                password: "pw".into()
            },
            Step::Retrieve {
                index: 0,
                lines: None
            },
            Step::Retrieve {
                index: 1,
                lines: Some(5)
            },
            Step::Quit { deleted: vec![2] },
            Step::Close,
        ]
    );
}

#[test]
fn the_same_session_split_at_every_byte_and_at_random() {
    let want = whole(SESSION);
    let b = SESSION.as_bytes();
    let bytes: Vec<&[u8]> = b.chunks(1).collect();
    assert_eq!(drive(&bytes), want, "one byte at a time");
    for i in 0..=b.len() {
        assert_eq!(drive(&[&b[..i], &b[i..]]), want, "split at {i}");
    }
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..200 {
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < b.len() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = 1 + (seed % 40) as usize;
            let end = (at + n).min(b.len());
            chunks.push(&b[at..end]);
            at = end;
        }
        assert_eq!(drive(&chunks), want);
    }
}

#[test]
fn authorization_state_commands() {
    let (out, steps) = whole("STAT\r\nPASS pw\r\nNOOP\r\nRETR 1\r\nUSER\r\nfrob\r\n\r\nQUIT\r\n");
    assert_eq!(
        out.lines().skip(1).map(|l| &l[..4]).collect::<Vec<_>>(),
        ["-ERR", "-ERR", "-ERR", "-ERR", "-ERR", "-ERR", "-ERR", "+OK "],
        "{out}"
    );
    assert!(out.contains("-ERR USER first"));
    assert!(out.contains("-ERR unknown command"));
    assert_eq!(steps, vec![Step::Close]);
    // Lower case works; PASS takes the rest of the line, spaces included.
    let (_, steps) = whole("user u@x\r\npass with space\r\n");
    assert_eq!(
        steps,
        vec![Step::Authenticate {
            user: "u@x".into(),
            password: "with space".into()
        }]
    );
}

#[test]
fn login_failures_give_their_response_codes_and_allow_another_try() {
    let (out, _) = whole("USER u\r\nPASS bad\r\nUSER u\r\nPASS busy\r\nUSER u\r\nPASS locked\r\nUSER u\r\nPASS pw\r\nSTAT\r\n");
    assert!(
        out.contains("-ERR [AUTH] invalid user name or password\r\n"),
        "{out}"
    );
    assert!(out.contains("-ERR [SYS/TEMP] "), "{out}");
    assert!(out.contains("-ERR [IN-USE] "), "{out}");
    assert!(out.ends_with("+OK 3 600\r\n"), "{out}");
}

#[test]
fn transaction_state_refuses_bad_numbers_and_login_commands() {
    let (out, _) = whole(
        "USER u\r\nPASS pw\r\nRETR 0\r\nRETR 4\r\nRETR -1\r\nRETR +1\r\nRETR 99999999999999999999999\r\n\
         TOP 1\r\nTOP 1 -1\r\nTOP 1 x\r\nLIST 1 2\r\nUSER u\r\nPASS pw\r\nAUTH PLAIN\r\nSTAT 1\r\nTOP 1 0\r\n",
    );
    let lines: Vec<&str> = out.lines().skip(3).collect();
    assert_eq!(lines.len(), 16, "{out}");
    assert!(lines[..13].iter().all(|l| l.starts_with("-ERR")), "{out}");
    assert_eq!(lines[13], "+OK top of message follows");
    assert!(out.contains("-ERR no such message"));
    assert!(out.contains("-ERR invalid message number"));
}

#[test]
fn capa_after_login_drops_the_login_mechanisms() {
    let (out, _) = whole("USER u\r\nPASS pw\r\nCAPA\r\n");
    let capa = &out[out.find("+OK capability").unwrap()..];
    assert!(!capa.contains("USER") && !capa.contains("SASL"), "{capa}");
    assert!(capa.contains("TOP\r\nUIDL\r\n") && capa.ends_with(".\r\n"));
    let mut s = Session::new(Config {
        stls: true,
        ..Config::default()
    });
    s.push(b"CAPA\r\n");
    s.process();
    assert!(String::from_utf8_lossy(s.output()).contains("\r\nSTLS\r\n"));
}

fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn auth_plain_with_and_without_initial_response() {
    let ok = b64(b"\0u@x\0pw");
    let (out, steps) = whole(&format!("AUTH PLAIN {ok}\r\nSTAT\r\n"));
    assert_eq!(steps.len(), 1);
    assert!(out.ends_with("+OK 3 600\r\n"), "{out}");
    let (out, _) = whole(&format!("AUTH plain\r\n{ok}\r\nSTAT\r\n"));
    assert!(out.contains("\r\n+ \r\n"), "{out}");
    assert!(out.ends_with("+OK 3 600\r\n"), "{out}");
    // authzid equal to authcid is fine; another is refused.
    let (_, steps) = whole(&format!("AUTH PLAIN {}\r\n", b64(b"u@x\0u@x\0pw")));
    assert_eq!(steps.len(), 1);
    let (out, steps) = whole(&format!("AUTH PLAIN {}\r\n", b64(b"v@x\0u@x\0pw")));
    assert!(steps.is_empty() && out.contains("-ERR [AUTH]"), "{out}");
    // Cancel, bad base64, a malformed message, "=" (empty), unknown mechanism, list.
    let (out, _) = whole("AUTH PLAIN\r\n*\r\nAUTH PLAIN !!!\r\nAUTH PLAIN =\r\n");
    assert!(out.contains("-ERR authentication cancelled"), "{out}");
    assert!(
        out.contains("-ERR invalid SASL response (not base64)"),
        "{out}"
    );
    assert!(out.contains("-ERR invalid SASL PLAIN response"), "{out}");
    let (out, _) = whole(&format!(
        "AUTH PLAIN {}\r\nAUTH CRAM-MD5\r\nAUTH\r\n",
        b64(b"nonul")
    ));
    assert!(
        out.contains("-ERR unsupported authentication mechanism"),
        "{out}"
    );
    assert!(out.ends_with("+OK\r\nPLAIN\r\n.\r\n"), "{out}");
    // A wrong password through AUTH: [AUTH].
    let (out, _) = whole(&format!("AUTH PLAIN {}\r\n", b64(b"\0u@x\0bad")));
    assert!(
        out.ends_with("-ERR [AUTH] invalid user name or password\r\n"),
        "{out}"
    );
}

#[test]
fn line_limits() {
    // 255 octets with CRLF is taken, 256 refused; the session goes on.
    let ok = format!("USER {}\r\n", "u".repeat(255 - 7));
    assert_eq!(ok.len(), 255);
    let (out, _) = whole(&ok);
    assert!(out.ends_with("+OK send PASS\r\n"), "{out}");
    let long = format!("USER {}\r\nQUIT\r\n", "u".repeat(256 - 7));
    let (out, _) = whole(&long);
    assert!(out.contains("-ERR line too long\r\n+OK"), "{out}");
    // A 100 KB line is refused without being kept.
    let mut s = Session::new(Config::default());
    s.clear_output();
    s.push(&vec![b'x'; 100_000]);
    assert!(s.buffered() <= 8192 + 16, "{}", s.buffered());
    s.push(b"yyy\r\nNOOP\r\n");
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(
        String::from_utf8_lossy(s.output()),
        "-ERR line too long\r\n-ERR command not valid in this state or with these arguments\r\n"
    );
    // A SASL response may be longer than a command line.
    let big = b64(format!("\0u@x\0{}", "p".repeat(1000)).as_bytes());
    let (_, steps) = whole(&format!("AUTH PLAIN\r\n{big}\r\n"));
    assert!(matches!(&steps[0], Step::Authenticate { password, .. } if password.len() == 1000));
}

#[test]
fn bare_lf_and_binary_input() {
    let (out, steps) = whole("USER u\nPASS pw\nSTAT\n");
    assert_eq!(steps.len(), 1);
    assert!(out.ends_with("+OK 3 600\r\n"));
    let (out, _) = drive(&[b"\xff\xfe\r\n\0\r\nQUIT\r\n"]);
    assert!(out.contains("-ERR command is not UTF-8"), "{out}");
}

#[test]
fn too_many_errors_close_the_session() {
    let input = "frob\r\n".repeat(25);
    let (out, steps) = whole(&input);
    assert_eq!(out.matches("-ERR unknown command").count(), 20);
    assert!(out.ends_with("-ERR too many errors, closing\r\n"));
    assert_eq!(steps, vec![Step::Close]);
}

#[test]
fn nothing_is_handled_while_a_step_is_outstanding() {
    let mut s = Session::new(Config::default());
    s.push(b"USER u\r\nPASS pw\r\nSTAT\r\n");
    assert!(matches!(s.process(), Step::Authenticate { .. }));
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(s.state(), State::Authorization);
    s.login(Login::Ok(msgs()));
    assert_eq!(s.user(), Some("u"));
    assert_eq!(s.process(), Step::NeedInput);
    assert!(String::from_utf8_lossy(s.output()).ends_with("+OK 3 600\r\n"));
    s.push(b"RETR 1\r\nSTAT\r\n");
    s.clear_output();
    assert!(matches!(s.process(), Step::Retrieve { .. }));
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(s.output(), b"+OK 100 octets\r\n");
    s.retrieved();
    s.clear_output();
    assert_eq!(s.process(), Step::NeedInput);
    assert_eq!(s.output(), b"+OK 3 600\r\n");
    // A failed UPDATE says so.
    s.push(b"DELE 2\r\nQUIT\r\n");
    assert_eq!(s.process(), Step::Quit { deleted: vec![1] });
    assert_eq!(s.state(), State::Update);
    s.quit_done(false);
    assert_eq!(s.process(), Step::Close);
    assert!(String::from_utf8_lossy(s.output())
        .ends_with("-ERR [SYS/TEMP] some deleted messages not removed\r\n"));
}
