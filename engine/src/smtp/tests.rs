//! Byte-level tests of the server core. Every case runs through `check`, which feeds
//! the input whole, byte by byte, and split at pseudo-random points, and demands the
//! same replies and the same stored messages each time.

use super::server::{Config, Limits, Session, Step};
use std::rc::Rc;

fn config(limits: Limits) -> Rc<Config> {
    Rc::new(Config {
        hostname: "mx.test".into(),
        local_domains: vec!["local.test".into()],
        own_addresses: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
        limits,
        starttls: false,
        auth: false,
        auth_without_tls: false,
        sender_login_match: true,
        submission: false,
    })
}

struct Outcome {
    replies: String,
    bodies: Vec<Vec<u8>>,
    closed: bool,
}

fn run(cfg: Rc<Config>, relay: bool, chunks: &[&[u8]]) -> Outcome {
    let mut s = Session::new(cfg, relay);
    let mut bodies = Vec::new();
    let mut replies = String::new();
    let mut closed = false;
    let drain = |s: &mut Session, replies: &mut String| {
        replies.push_str(std::str::from_utf8(s.output()).unwrap());
        s.clear_output();
    };
    'feed: for chunk in chunks {
        s.push(chunk);
        loop {
            match s.process() {
                Step::NeedInput => break,
                Step::Message(tx) => {
                    bodies.push(tx.body.to_vec());
                    s.message_stored("ID");
                }
                Step::Close => {
                    closed = true;
                    break 'feed;
                }
                // The handshake succeeds at once.
                Step::StartTls => s.tls_started(),
                Step::Authenticate { user, password } => s.auth_done(verdict(&user, &password)),
            }
        }
    }
    drain(&mut s, &mut replies);
    Outcome {
        replies,
        bodies,
        closed,
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Feeds `input` whole, byte by byte and at random splits; all must agree with
/// `expected` (reply codes in order, one per line, `|`-joined) and `bodies`.
fn check_with(limits: Limits, relay: bool, input: &[u8], expected: &str, bodies: &[&[u8]]) {
    let cfg = config(limits);
    let mut splits: Vec<Vec<&[u8]>> = vec![vec![input], input.chunks(1).collect()];
    for seed in 1..=8u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut parts = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let n = (rng.next() % 7 + 1).min(rest.len() as u64) as usize;
            parts.push(&rest[..n]);
            rest = &rest[n..];
        }
        splits.push(parts);
    }
    for (i, chunks) in splits.iter().enumerate() {
        let out = run(cfg.clone(), relay, chunks);
        let codes: Vec<&str> = out
            .replies
            .split("\r\n")
            .filter(|l| !l.is_empty() && l.as_bytes().get(3) == Some(&b' '))
            .map(|l| &l[..3])
            .collect();
        assert_eq!(
            codes.join("|"),
            expected,
            "split #{i}; replies:\n{}",
            out.replies
        );
        let got: Vec<&[u8]> = out.bodies.iter().map(|b| b.as_slice()).collect();
        assert_eq!(got, bodies, "split #{i}");
        let _ = out.closed;
    }
}

fn check(input: &str, expected: &str, bodies: &[&[u8]]) {
    check_with(Limits::default(), true, input.as_bytes(), expected, bodies);
}

const TX: &str = "EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n";

#[test]
fn a_whole_transaction() {
    check(
        &format!("{TX}Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"),
        "220|250|250|250|354|250|221",
        &[b"Subject: hi\r\n\r\nbody\r\n"],
    );
}

#[test]
fn empty_message_and_ehlo_keywords() {
    let out = run(
        config(Limits::default()),
        true,
        &[format!("{TX}.\r\n").as_bytes()],
    );
    for kw in [
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
    ] {
        assert!(out.replies.contains(&format!("250-{kw}\r\n")), "{kw}");
    }
    assert_eq!(out.bodies, vec![Vec::<u8>::new()]);
}

#[test]
fn dot_stuffing_round_trip() {
    check(
        &format!("{TX}..\r\n...x\r\n.y\r\nz.\r\n.\r\n"),
        "220|250|250|250|354|250",
        &[b".\r\n..x\r\ny\r\nz.\r\n"],
    );
}

#[test]
fn smuggling_inputs_never_end_data() {
    // Each smuggled "end" is followed by a command; it must become message text, and
    // the message must be refused at the real end.
    for smuggle in ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n", "\r\n.\r"] {
        let input = format!("{TX}a{smuggle}MAIL FROM:<x@evil.test>\r\n.\r\nNOOP\r\n");
        check(&input, "220|250|250|250|354|550|250", &[]);
    }
}

#[test]
fn bare_cr_or_lf_anywhere_is_refused_and_the_session_goes_on() {
    check(
        &format!("{TX}a\nb\r\n.\r\n{TX}ok\r\n.\r\n"),
        "220|250|250|250|354|550|250|250|250|354|250",
        &[b"ok\r\n"],
    );
    check(
        &format!("{TX}a\rb\r\n.\r\n"),
        "220|250|250|250|354|550",
        &[],
    );
}

#[test]
fn data_line_limit() {
    let ok_line = "x".repeat(998);
    check(
        &format!("{TX}{ok_line}\r\n.\r\n"),
        "220|250|250|250|354|250",
        &[format!("{ok_line}\r\n").as_bytes()],
    );
    let long = "x".repeat(999);
    check(
        &format!("{TX}{long}\r\n.\r\nNOOP\r\n"),
        "220|250|250|250|354|550|250",
        &[],
    );
    // A stuffed dot does not count toward the line length (RFC 5321 §4.5.3.1.6);
    // the line after it starts afresh.
    let dot_line = format!(".{}", "x".repeat(997));
    check(
        &format!("{TX}.{ok_line}\r\n.{dot_line}\r\n.\r\n"),
        "220|250|250|250|354|250",
        &[format!("{ok_line}\r\n{dot_line}\r\n").as_bytes()],
    );
    check(
        &format!("{TX}.x{ok_line}\r\n.\r\n"),
        "220|250|250|250|354|550",
        &[],
    );
}

#[test]
fn size_limits() {
    let limits = Limits {
        message_bytes_max: 10,
        ..Limits::default()
    };
    let over = format!("{TX}0123456789ab\r\n.\r\nNOOP\r\n");
    check_with(
        limits.clone(),
        true,
        over.as_bytes(),
        "220|250|250|250|354|552|250",
        &[],
    );
    let exact = format!("{TX}01234567\r\n.\r\n");
    check_with(
        limits.clone(),
        true,
        exact.as_bytes(),
        "220|250|250|250|354|250",
        &[b"01234567\r\n"],
    );
    check_with(
        limits,
        true,
        b"EHLO c\r\nMAIL FROM:<a@c.test> SIZE=11\r\nMAIL FROM:<a@c.test> SIZE=10\r\n",
        "220|250|552|250",
        &[],
    );
}

#[test]
fn bdat_chunks_and_last() {
    // A CRLF split between two chunks is one line end.
    check(
        "EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 4\r\nhel\rBDAT 5 LAST\r\n\nlo\r\nQUIT\r\n",
        "220|250|250|250|250|250|221",
        &[b"hel\r\nlo\r\n"],
    );
    // Without BINARYMIME a chunk is text: a bare LF, a CR without its LF (at a
    // chunk's end too, or the text's), or a line over 1000 octets refuse the message
    // at LAST, as DATA would (the chunks are still read).
    for text in ["a\nb\r\n", "a\r", "a\rb\r\n"] {
        let input = format!(
            "EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nBDAT {}\r\n{text}BDAT 4 LAST\r\nxy\r\nNOOP\r\n",
            text.len()
        );
        let want = if text == "a\r" {
            "220|250|250|250|250|550|250"
        } else {
            "220|250|250|250|550|550|250"
        };
        check(&input, want, &[]);
    }
    let long = "x".repeat(999);
    check(
        &format!("EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 1001 LAST\r\n{long}\r\nNOOP\r\n"),
        "220|250|250|250|550|250",
        &[],
    );
    check(
        "EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 0 LAST\r\n",
        "220|250|250|250|250",
        &[b""],
    );
    // DATA after BDAT in one transaction is out of sequence.
    check(
        "EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 2\r\nabDATA\r\n",
        "220|250|250|250|250|503",
        &[],
    );
    // A chunk without a transaction is read (not taken as commands), then refused.
    check(
        "EHLO c\r\nBDAT 6\r\nNOOP\r\nNOOP\r\n",
        "220|250|503|250",
        &[],
    );
    check(
        "EHLO c\r\nBDAT x\r\nBDAT 1 FIRST\r\n",
        "220|250|501|501",
        &[],
    );
}

#[test]
fn bdat_over_the_size_limit() {
    let limits = Limits {
        message_bytes_max: 4,
        ..Limits::default()
    };
    let input = b"EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 3\r\nabcBDAT 3 LAST\r\ndefNOOP\r\n";
    check_with(limits, true, input, "220|250|250|250|250|552|250", &[]);
}

#[test]
fn bad_sequences_get_503() {
    check("MAIL FROM:<a@c.test>\r\n", "220|503", &[]);
    check("EHLO c\r\nRCPT TO:<b@local.test>\r\n", "220|250|503", &[]);
    check("EHLO c\r\nDATA\r\n", "220|250|503", &[]);
    check(
        "EHLO c\r\nMAIL FROM:<a@c.test>\r\nDATA\r\n",
        "220|250|250|503",
        &[],
    );
    check(
        "EHLO c\r\nMAIL FROM:<a@c.test>\r\nMAIL FROM:<a@c.test>\r\n",
        "220|250|250|503",
        &[],
    );
    check(
        "EHLO c\r\nMAIL FROM:<a@c.test>\r\nRSET\r\nRCPT TO:<b@local.test>\r\n",
        "220|250|250|250|503",
        &[],
    );
}

#[test]
fn syntax_errors_and_unknown_commands() {
    check("EHLO\r\nHELO\r\nFOO\r\n\r\nEHLO c\r\nMAIL TO:<a@b>\r\nMAIL FROM:a@b\r\nMAIL FROM:<a@b> FOO=1\r\n", "220|501|501|500|500|250|501|501|555", &[]);
    check("EHLO c\r\nMAIL FROM:<a@b> BODY=BINARYMIME\r\nMAIL FROM:<a@b> RET=X\r\nMAIL FROM:<a@b> SIZE=x\r\n", "220|250|501|501|501", &[]);
    check("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<>\r\nRCPT TO:<b@local.test> NOTIFY=NEVER,SUCCESS\r\nRCPT TO:<b@local.test> ORCPT=bad\r\n", "220|250|250|501|501|501", &[]);
    check(
        "RSET x\r\nVRFY\r\nVRFY a\r\nNOOP x\r\nHELP\r\nSTARTTLS\r\n",
        "220|501|501|252|250|214|502",
        &[],
    );
    // MAIL parameters need EHLO.
    check(
        "HELO c\r\nMAIL FROM:<a@b> SIZE=1\r\nMAIL FROM:<a@b>\r\n",
        "220|250|555|250",
        &[],
    );
}

#[test]
fn dsn_and_esmtp_parameters_are_kept() {
    let cfg = config(Limits::default());
    let mut s = Session::new(cfg, true);
    s.push(b"EHLO c\r\nMAIL FROM:<a@c.test> RET=HDRS ENVID=QQ+2B1 BODY=8BITMIME SIZE=100\r\nRCPT TO:<b@local.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@local.test\r\nDATA\r\nx\r\n.\r\n");
    let Step::Message(tx) = s.process() else {
        panic!("no message")
    };
    assert_eq!(tx.ret, super::Ret::Hdrs);
    assert_eq!(tx.envid.as_deref(), Some("QQ+2B1"));
    assert_eq!(tx.body_type, super::BodyType::EightBitMime);
    assert_eq!(
        tx.recipients[0].notify,
        super::notify::SUCCESS | super::notify::FAILURE
    );
    assert_eq!(
        tx.recipients[0].orcpt.as_deref(),
        Some("rfc822;b@local.test")
    );
    assert_eq!(tx.protocol, "ESMTP");
}

#[test]
fn smtputf8_addresses_need_the_parameter() {
    check("EHLO c\r\nMAIL FROM:<ü@c.test>\r\nMAIL FROM:<ü@c.test> SMTPUTF8\r\nRCPT TO:<ö@local.test>\r\n", "220|250|553|250|250", &[]);
    check(
        "EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<ö@local.test>\r\n",
        "220|250|250|553",
        &[],
    );
}

#[test]
fn relay_policy() {
    let input = b"EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@remote.test>\r\nRCPT TO:<x@LOCAL.test>\r\nRCPT TO:<Postmaster>\r\n";
    check_with(
        Limits::default(),
        false,
        input,
        "220|250|250|554|250|250",
        &[],
    );
    check_with(
        Limits::default(),
        true,
        input,
        "220|250|250|250|250|250",
        &[],
    );
    let out = run(config(Limits::default()), false, &[input]);
    assert!(out
        .replies
        .contains("554 5.7.1 <x@remote.test>: Relay access denied\r\n"));
}

#[test]
fn command_line_limit() {
    let long = format!("NOOP {}\r\n", "x".repeat(506));
    check(&long, "220|500", &[]);
    let exact = format!("NOOP {}\r\n", "x".repeat(505));
    check(&exact, "220|250", &[]);
    // A line far over the limit is skipped to its end, once.
    check(
        &format!("NOOP {}\r\nNOOP\r\n", "x".repeat(5000)),
        "220|500|250",
        &[],
    );
}

#[test]
fn mail_and_rcpt_lines_get_the_room_their_parameters_need() {
    // A long path with an ORCPT of itself: over 512 octets, within 512 + 500
    // (RFC 3461 §5), as Postfix sends it with DSN.
    let domain = format!("{0}.{0}.{1}.remote.test", "b".repeat(60), "b".repeat(50));
    let address = format!("{}@{domain}", "a".repeat(64));
    let rcpt = format!("RCPT TO:<{address}> NOTIFY=FAILURE ORCPT=rfc822;{address}\r\n");
    assert!(rcpt.len() > 512 && rcpt.len() <= 1012, "{}", rcpt.len());
    let input = format!("EHLO c\r\nMAIL FROM:<a@c.test>\r\n{rcpt}");
    check_with(
        Limits::default(),
        true,
        input.as_bytes(),
        "220|250|250|250",
        &[],
    );
    // Past what the parameters allow, the line is too long.
    let mail = format!("MAIL FROM:<a@c.test> ENVID={}\r\n", "e".repeat(1200));
    check_with(
        Limits::default(),
        true,
        format!("EHLO c\r\n{mail}").as_bytes(),
        "220|250|500",
        &[],
    );
}

#[test]
fn offered_parameters_in_the_wrong_form_are_syntax_errors() {
    let input = "EHLO c\r\nMAIL FROM:<a@c.test> SIZE\r\nMAIL FROM:<a@c.test> RET\r\n\
                 MAIL FROM:<a@c.test> SMTPUTF8=yes\r\nMAIL FROM:<a@c.test> SMTPUTF8\r\n\
                 RCPT TO:<b@remote.test> ORCPT=utf-8;b\u{7f}@remote.test\r\n\
                 RCPT TO:<b@remote.test> ORCPT=utf-8;b\u{e9}@remote.test\r\n";
    check_with(
        Limits::default(),
        true,
        input.as_bytes(),
        "220|250|501|501|501|250|501|250",
        &[],
    );
}

#[test]
fn recipient_limit() {
    let limits = Limits {
        rcpt_count_max: 2,
        ..Limits::default()
    };
    let input = b"EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<1@local.test>\r\nRCPT TO:<2@local.test>\r\nRCPT TO:<3@local.test>\r\n";
    check_with(limits, true, input, "220|250|250|250|250|452", &[]);
}

#[test]
fn pipelined_replies_come_in_order_after_the_message_is_stored() {
    let cfg = config(Limits::default());
    let mut s = Session::new(cfg, true);
    s.clear_output();
    s.push(format!("{TX}x\r\n.\r\nNOOP\r\nQUIT\r\n").as_bytes());
    assert!(matches!(s.process(), Step::Message(_)));
    // Nothing after the message is answered before its verdict.
    assert!(!String::from_utf8_lossy(s.output()).contains("221"));
    assert!(matches!(s.process(), Step::NeedInput));
    s.message_failed("451 4.3.0 Error: queue file write error\r\n");
    assert!(matches!(s.process(), Step::Close));
    let out = String::from_utf8_lossy(s.output()).to_string();
    assert!(out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n451 4.3.0 Error: queue file write error\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"), "{out}");
}

#[test]
fn too_many_errors_close_the_session() {
    let input = "FOO\r\n".repeat(25);
    let out = run(config(Limits::default()), true, &[input.as_bytes()]);
    assert!(out.closed);
    assert!(out
        .replies
        .ends_with("421 4.7.0 Error: too many errors, closing connection\r\n"));
    assert_eq!(out.replies.matches("500 ").count(), 20);
}

#[test]
fn timeout_and_shutdown_replies() {
    let mut s = Session::new(config(Limits::default()), true);
    s.clear_output();
    s.idle_timeout();
    assert!(s.output().starts_with(b"421 4.4.2"));
    assert!(matches!(s.process(), Step::Close));
}

fn reply_codes(cfg: Rc<Config>, relay: bool, input: &str) -> (String, String) {
    let out = run(cfg, relay, &[input.as_bytes()]);
    let codes: Vec<&str> = out
        .replies
        .split("\r\n")
        .filter(|l| !l.is_empty() && l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..3])
        .collect();
    (codes.join("|"), out.replies)
}

/// RFC 5321 §4.1.3 literals at RCPT: a literal is a remote destination (relay
/// clients only) unless it is listed among the local domains, compared as an
/// address; a malformed or undeliverable literal is refused with a reason.
#[test]
fn address_literals_at_rcpt() {
    let cfg = Rc::new(Config {
        hostname: "mx.test".into(),
        local_domains: vec!["local.test".into(), "[IPv6:2001:db8::1]".into()],
        own_addresses: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
        limits: Limits::default(),
        starttls: false,
        auth: false,
        auth_without_tls: false,
        sender_login_match: true,
        submission: false,
    });
    let input = "EHLO c\r\nMAIL FROM:<a@c.test>\r\n\
        RCPT TO:<x@[127.0.0.2]>\r\n\
        RCPT TO:<x@[ipv6:2001:DB8:0::1]>\r\n\
        RCPT TO:<x@[IPv6:::ffff:127.0.0.2]>\r\n\
        RCPT TO:<x@[1.2.3]>\r\n\
        RCPT TO:<x@[0.0.0.0]>\r\n";
    let (codes, replies) = reply_codes(cfg.clone(), false, input);
    assert_eq!(codes, "220|250|250|554|250|554|501|553", "{replies}");
    assert!(
        replies.contains("501 5.1.3 Bad recipient address syntax: not an address literal"),
        "{replies}"
    );
    assert!(
        replies.contains("553 5.1.3 <x@[0.0.0.0]>: Recipient domain is an address literal"),
        "{replies}"
    );
    let (codes, replies) = reply_codes(cfg, true, input);
    assert_eq!(codes, "220|250|250|250|250|250|501|553", "{replies}");
}

/// A local domain matches in either IDNA form; a name without an A-label is refused.
#[test]
fn internationalised_domains_at_rcpt() {
    let cfg = Rc::new(Config {
        hostname: "mx.test".into(),
        local_domains: vec!["bücher.test".into()],
        own_addresses: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
        limits: Limits::default(),
        starttls: false,
        auth: false,
        auth_without_tls: false,
        sender_login_match: true,
        submission: false,
    });
    let input = "EHLO c\r\nMAIL FROM:<a@c.test> SMTPUTF8\r\n\
        RCPT TO:<x@XN--BCHER-KVA.test>\r\n\
        RCPT TO:<x@bücher.test>\r\n\
        RCPT TO:<x@\u{301}a.test>\r\n";
    let (codes, replies) = reply_codes(cfg.clone(), false, input);
    assert_eq!(codes, "220|250|250|250|250|553", "{replies}");
    let local_ascii = Rc::new(Config {
        local_domains: vec!["xn--bcher-kva.test".into()],
        own_addresses: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
        ..(*cfg).clone()
    });
    let (codes, replies) = reply_codes(local_ascii, false, input);
    assert_eq!(codes, "220|250|250|250|250|553", "{replies}");
}

/// Found by fuzzing (fuzz/corpus/smtp_session/two-limits): a message over both the
/// size and the line limit was refused for whichever the reads happened to reach first
/// (550 whole, 552 byte by byte). The reply must not depend on the splits.
#[test]
fn a_message_over_two_limits_gets_one_reply_however_it_is_split() {
    let limits = Limits {
        data_line_bytes_max: 80,
        message_bytes_max: 256,
        ..Limits::default()
    };
    let text = format!(
        "{}{}\r\n",
        format!("{}\r\n", "a".repeat(70)).repeat(3),
        "b".repeat(200)
    );
    check_with(
        limits,
        true,
        format!("{TX}{text}.\r\nQUIT\r\n").as_bytes(),
        "220|250|250|250|354|550|221",
        &[],
    );
}

/// A message that arrives with `hop-count-max` (50) `Received:` headers is looping:
/// refused at its end with 554 5.4.6, by DATA and by BDAT, however it is split;
/// one fewer passes, and `Received:` lines of the body do not count.
#[test]
fn too_many_hops_is_refused_at_the_end_of_the_message() {
    let hops = |n: usize| "Received: from x by y; Sat, 1 Jan 2000 00:00:00 +0000\r\n".repeat(n);
    for (n, code) in [(49, "250"), (50, "554"), (51, "554")] {
        let text = format!("{}Subject: hi\r\n\r\n{}body\r\n", hops(n), hops(60));
        let data = format!("{TX}{text}.\r\nNOOP\r\n");
        let stored: &[&[u8]] = if code == "250" {
            &[text.as_bytes()]
        } else {
            &[]
        };
        let expected = format!("220|250|250|250|354|{code}|250");
        check_with(Limits::default(), true, data.as_bytes(), &expected, stored);
        let bdat = format!(
            "EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nBDAT {} LAST\r\n{text}NOOP\r\n",
            text.len()
        );
        let expected = format!("220|250|250|250|{code}|250");
        check_with(Limits::default(), true, bdat.as_bytes(), &expected, stored);
    }
    let out = run(
        config(Limits::default()),
        true,
        &[format!("{TX}{}\r\n.\r\n", hops(51)).as_bytes()],
    );
    assert!(
        out.replies.ends_with("554 5.4.6 Too many hops\r\n"),
        "{}",
        out.replies
    );
    let limits = Limits {
        hop_count_max: 2,
        ..Limits::default()
    };
    let two = format!("{TX}{}\r\n.\r\n", hops(2));
    check_with(limits, true, two.as_bytes(), "220|250|250|250|354|554", &[]);
}

/// A literal of this host's own addresses (loopback, listen address) is never
/// relayed, in any spelling: it would come straight back. Listed as a local domain
/// it is local.
#[test]
fn a_literal_of_our_own_address_is_refused_at_rcpt() {
    let input = "EHLO c\r\nMAIL FROM:<a@c.test>\r\n\
        RCPT TO:<x@[127.0.0.1]>\r\n\
        RCPT TO:<x@[IPv6:::1]>\r\n\
        RCPT TO:<x@[IPv6:::ffff:127.0.0.1]>\r\n\
        RCPT TO:<x@[192.0.2.7]>\r\n\
        RCPT TO:<x@[127.0.0.2]>\r\n";
    let mut cfg = Config {
        hostname: "mx.test".into(),
        local_domains: vec!["local.test".into()],
        own_addresses: vec![
            [127, 0, 0, 1].into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
            [192, 0, 2, 7].into(),
        ],
        limits: Limits::default(),
        starttls: false,
        auth: false,
        auth_without_tls: false,
        sender_login_match: true,
        submission: false,
    };
    let (codes, replies) = reply_codes(Rc::new(cfg.clone()), true, input);
    assert_eq!(codes, "220|250|250|553|553|553|553|250", "{replies}");
    assert!(
        replies.contains("553 5.1.3 <x@[127.0.0.1]>: mail for [127.0.0.1] loops back to myself"),
        "{replies}"
    );
    cfg.local_domains.push("[192.0.2.7]".into());
    let (codes, replies) = reply_codes(Rc::new(cfg), false, input);
    assert_eq!(codes, "220|250|250|553|553|553|250|554", "{replies}");
}

/// The sender's domain must be one a bounce can go to: a literal of an address
/// mail cannot be sent to, or a name without an A-label, is refused at MAIL.
#[test]
fn a_sender_domain_routing_cannot_take_is_refused_at_mail() {
    let cfg = config(Limits::default());
    for (from, code) in [
        ("<x@[0.0.0.0]>", "553 5.1.7"),
        ("<x@[IPv6:ff02::1]>", "553 5.1.7"),
        ("<x@[255.255.255.255]>", "553 5.1.7"),
        ("<x@\u{301}a.test> SMTPUTF8", "553 5.1.7"),
        ("<x@[1.2.3]>", "501 5.1.7"),
        ("<x@[192.0.2.1]>", "250 2.1.0"),
        ("<x@c.test>", "250 2.1.0"),
        ("<>", "250 2.1.0"),
    ] {
        let input = format!("EHLO c\r\nMAIL FROM:{from}\r\n");
        let out = run(cfg.clone(), true, &[input.as_bytes()]);
        let last = out.replies.lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with(code), "{from}: {}", out.replies);
    }
}

/// Pushes `bytes` and runs the session until it needs input; a message is stored.
fn feed(s: &mut Session, bytes: &[u8], bodies: &mut Vec<Vec<u8>>) {
    s.push(bytes);
    loop {
        match s.process() {
            Step::NeedInput => break,
            Step::Message(tx) => {
                bodies.push(tx.body.to_vec());
                drop(tx);
                s.message_stored("ID");
            }
            Step::Close | Step::StartTls | Step::Authenticate { .. } => {
                panic!("closed: {}", String::from_utf8_lossy(s.output()))
            }
        }
    }
    s.clear_output();
}

/// Alternating ranges and tiny BDAT chunks, each pair padded with NOOPs: the body
/// must not hold a gather buffer per tiny chunk, nor every receive chunk the padding
/// filled (they held a range each): what the session holds stays within a small
/// multiple of the text, not of what the client sent.
#[test]
fn a_hostile_bdat_sequence_holds_memory_in_proportion_to_its_text() {
    let mut s = Session::new(config(Limits::default()), true);
    let mut bodies = Vec::new();
    feed(
        &mut s,
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@local.test>\r\n",
        &mut bodies,
    );
    let mut want = Vec::new();
    let mut sent = 0;
    for i in 0..2000usize {
        // Text lines (each "z" starts the next one), under the line limit.
        let mut range = vec![b'a' + (i % 26) as u8; 510];
        range.extend_from_slice(b"\r\n");
        let mut input = b"BDAT 512\r\n".to_vec();
        input.extend_from_slice(&range);
        input.extend_from_slice(b"BDAT 1\r\nz");
        input.extend_from_slice(&b"NOOP\r\n".repeat(100));
        sent += input.len();
        want.extend_from_slice(&range);
        want.push(b'z');
        feed(&mut s, &input, &mut bodies);
        let held = s.held_bytes();
        let bound = want.len() * 3 / 2 + (256 << 10);
        assert!(
            held <= bound,
            "after {} text bytes ({sent} sent) the session holds {held}, bound {bound}",
            want.len()
        );
    }
    feed(&mut s, b"BDAT 0 LAST\r\n", &mut bodies);
    assert_eq!(bodies, vec![want]);
}

/// A large message grows the receive chunks; the next, small one starts small again.
#[test]
fn receive_chunks_start_small_again_after_a_large_message() {
    let mut s = Session::new(config(Limits::default()), true);
    let mut bodies = Vec::new();
    let line = [&[b'x'; 98][..], b"\r\n"].concat();
    feed(
        &mut s,
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@local.test>\r\nDATA\r\n",
        &mut bodies,
    );
    for _ in 0..40_000 {
        feed(&mut s, &line, &mut bodies);
    }
    feed(&mut s, b".\r\n", &mut bodies);
    assert_eq!(bodies.len(), 1);
    feed(
        &mut s,
        b"MAIL FROM:<a@c.test> SIZE=20000\r\nRCPT TO:<x@local.test>\r\nDATA\r\n",
        &mut bodies,
    );
    let mut max_held = 0;
    for _ in 0..200 {
        feed(&mut s, &line, &mut bodies);
        max_held = max_held.max(s.held_bytes());
    }
    feed(&mut s, b".\r\n", &mut bodies);
    assert_eq!(bodies.len(), 2);
    assert!(
        max_held <= 128 << 10,
        "a 20000-byte message held {max_held} bytes"
    );
}

/// A directory of one domain: `bob` exists, `full` is at its quota, `small` takes at
/// most 100 more bytes; it records what it was asked.
struct Directory(std::cell::RefCell<Vec<(String, String, Option<u64>)>>);

impl super::server::LocalRecipients for Directory {
    fn check(
        &self,
        address: &str,
        domain: &str,
        declared: Option<u64>,
    ) -> super::server::LocalVerdict {
        use super::server::LocalVerdict::*;
        self.0
            .borrow_mut()
            .push((address.into(), domain.into(), declared));
        match address.split('@').next().unwrap() {
            "bob" => Accept,
            "full" => Full,
            "small" if declared.unwrap_or(0) > 100 => Full,
            "small" => Accept,
            _ => Unknown,
        }
    }

    /// bob@local.test may send as himself and as team@local.test.
    fn may_send_as(&self, login: &str, sender: &str) -> bool {
        login == "bob@local.test" && ["bob@local.test", "team@local.test"].contains(&sender)
    }
}

#[test]
fn local_recipients_are_checked_against_the_directory_and_postmaster_always_passes() {
    let dir = Rc::new(Directory(Default::default()));
    let mut s = Session::new(config(Limits::default()), false);
    s.set_local_recipients(dir.clone());
    s.push(
        b"EHLO c\r\nMAIL FROM:<a@c.test> SIZE=500\r\nRCPT TO:<bob@local.test>\r\n\
          RCPT TO:<nobody@LOCAL.test>\r\nRCPT TO:<full@local.test>\r\n\
          RCPT TO:<small@local.test>\r\nRCPT TO:<PostMaster@local.test>\r\n\
          RCPT TO:<Postmaster>\r\nRCPT TO:<x@remote.test>\r\nRSET\r\n\
          MAIL FROM:<a@c.test>\r\nRCPT TO:<small@local.test>\r\n",
    );
    assert!(matches!(s.process(), Step::NeedInput));
    let out = String::from_utf8(s.output().to_vec()).unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with("250-")).collect();
    assert_eq!(
        lines[3..],
        [
            "250 2.1.5 Ok",
            "550 5.1.1 <nobody@LOCAL.test>: Recipient address rejected: User unknown in local recipient table",
            "452 4.2.2 <full@local.test>: Mailbox full",
            "452 4.2.2 <small@local.test>: Mailbox full",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            // Not local, and this client may not relay: the directory is not asked.
            "554 5.7.1 <x@remote.test>: Relay access denied",
            "250 2.0.0 Ok",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
        ],
        "{out}"
    );
    let asked = dir.0.borrow();
    let asked: Vec<_> = asked
        .iter()
        .map(|(a, d, s)| (a.as_str(), d.as_str(), *s))
        .collect();
    assert_eq!(
        asked,
        [
            ("bob@local.test", "local.test", Some(500)),
            ("nobody@LOCAL.test", "LOCAL.test", Some(500)),
            ("full@local.test", "local.test", Some(500)),
            ("small@local.test", "local.test", Some(500)),
            ("small@local.test", "local.test", None),
        ]
    );
}

/// The password check of the core tests: bob@local.test's password is "right".
fn verdict(user: &str, password: &str) -> super::server::AuthVerdict {
    use super::server::AuthVerdict;
    match (user, password) {
        ("bob@local.test", "right") => AuthVerdict::Ok(user.into()),
        (_, "busy") => AuthVerdict::TempFail,
        _ => AuthVerdict::Failed,
    }
}

fn tls_config() -> Rc<Config> {
    Rc::new(Config {
        starttls: true,
        auth: false,
        auth_without_tls: false,
        sender_login_match: true,
        submission: false,
        ..(*config(Limits::default())).clone()
    })
}

/// Feeds `input` in one piece and runs the core to its next stop.
fn feed_str(s: &mut Session, input: &str) -> Step {
    s.push(input.as_bytes());
    s.process()
}

fn take_output(s: &mut Session) -> String {
    let out = String::from_utf8(s.output().to_vec()).unwrap();
    s.clear_output();
    out
}

#[test]
fn starttls_is_offered_once_and_the_session_starts_over_under_tls() {
    let mut s = Session::new(tls_config(), true);
    assert!(matches!(
        feed_str(&mut s, "EHLO c.test\r\n"),
        Step::NeedInput
    ));
    let ehlo = take_output(&mut s);
    assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
    // The injection case: what was pipelined after STARTTLS in plaintext is dropped.
    assert!(matches!(
        feed_str(&mut s, "STARTTLS\r\nRSET\r\nMAIL FROM:<evil@c.test>\r\n"),
        Step::StartTls
    ));
    assert_eq!(take_output(&mut s), "220 2.0.0 Ready to start TLS\r\n");
    // Until the handshake is done, nothing more is handled.
    assert!(matches!(s.process(), Step::StartTls));
    s.tls_started();
    assert!(s.in_tls());
    assert!(matches!(s.process(), Step::NeedInput));
    assert_eq!(take_output(&mut s), "", "a plaintext command was answered");
    // Nothing said before counts: EHLO again first.
    feed_str(&mut s, "MAIL FROM:<a@c.test>\r\n");
    assert!(take_output(&mut s).starts_with("503 "));
    feed_str(&mut s, "EHLO c.test\r\n");
    let ehlo = take_output(&mut s);
    assert!(
        ehlo.starts_with("250-mx.test\r\n") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    feed_str(&mut s, "STARTTLS\r\n");
    assert_eq!(
        take_output(&mut s),
        "554 5.5.1 Error: TLS already active\r\n"
    );
    let Step::Message(tx) = feed_str(
        &mut s,
        "MAIL FROM:<a@c.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nhi\r\n.\r\n",
    ) else {
        panic!("no message: {}", take_output(&mut s))
    };
    assert_eq!(tx.protocol, "ESMTPS");
}

#[test]
fn starttls_refusals() {
    let mut s = Session::new(tls_config(), true);
    feed_str(
        &mut s,
        "EHLO c.test\r\nSTARTTLS now\r\nMAIL FROM:<a@c.test>\r\nSTARTTLS\r\n",
    );
    let out = take_output(&mut s);
    assert!(
        out.ends_with("501 5.5.4 Syntax: STARTTLS\r\n250 2.1.0 Ok\r\n503 5.5.1 Error: MAIL transaction in progress\r\n"),
        "{out}"
    );
    feed_str(&mut s, "RSET\r\nSTARTTLS\r\n");
    assert!(take_output(&mut s).ends_with("220 2.0.0 Ready to start TLS\r\n"));

    // Without a certificate it is an unknown command, and EHLO does not offer it.
    let mut s = Session::new(config(Limits::default()), true);
    feed_str(&mut s, "EHLO c.test\r\nSTARTTLS\r\n");
    let out = take_output(&mut s);
    assert!(
        !out.contains("STARTTLS") && out.ends_with("502 5.5.1 Error: command not implemented\r\n"),
        "{out}"
    );

    // On an implicit-TLS listener there is nothing to start.
    let mut s = Session::new(tls_config(), true);
    s.set_tls();
    feed_str(&mut s, "EHLO c.test\r\nSTARTTLS\r\n");
    let out = take_output(&mut s);
    assert!(
        !out.contains("250-STARTTLS") && out.ends_with("554 5.5.1 Error: TLS already active\r\n"),
        "{out}"
    );
}

fn auth_config(without_tls: bool) -> Rc<Config> {
    Rc::new(Config {
        auth: true,
        auth_without_tls: without_tls,
        ..(*tls_config()).clone()
    })
}

/// A session under TLS with the test directory, after EHLO.
fn auth_session(relay: bool) -> Session {
    let mut s = Session::new(auth_config(false), relay);
    s.set_tls();
    s.set_local_recipients(Rc::new(Directory(Default::default())));
    feed_str(&mut s, "EHLO c.test\r\n");
    let ehlo = take_output(&mut s);
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    s
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Runs the core and answers every password check with `verdict`.
fn run_auth(s: &mut Session, input: &str) -> String {
    s.push(input.as_bytes());
    loop {
        match s.process() {
            Step::Authenticate { user, password } => s.auth_done(verdict(&user, &password)),
            Step::NeedInput => break,
            other => panic!("unexpected step: {}", matches!(other, Step::Close)),
        }
    }
    take_output(s)
}

#[test]
fn auth_plain_and_login_with_and_without_initial_responses() {
    let plain = b64("\0bob@local.test\0right");
    for input in [
        format!("AUTH PLAIN {plain}\r\n"),
        format!("AUTH plain\r\n{plain}\r\n"),
        format!(
            "AUTH LOGIN\r\n{}\r\n{}\r\n",
            b64("bob@local.test"),
            b64("right")
        ),
        format!(
            "AUTH LOGIN {}\r\n{}\r\n",
            b64("bob@local.test"),
            b64("right")
        ),
        // The authorization identity may be the user itself.
        format!(
            "AUTH PLAIN {}\r\n",
            b64("bob@local.test\0bob@local.test\0right")
        ),
    ] {
        let mut s = auth_session(false);
        let out = run_auth(&mut s, &input);
        assert!(
            out.ends_with("235 2.7.0 Authentication successful\r\n"),
            "{input:?}: {out}"
        );
        assert_eq!(s.authenticated(), Some("bob@local.test"));
        // Not offered, nor taken, twice.
        let out = run_auth(&mut s, "EHLO c.test\r\nAUTH PLAIN =\r\n");
        assert!(!out.contains("AUTH PLAIN"), "{out}");
        assert!(
            out.ends_with("503 5.5.1 Error: already authenticated\r\n"),
            "{out}"
        );
    }
    let mut s = auth_session(false);
    let out = run_auth(&mut s, "AUTH LOGIN\r\n");
    assert_eq!(out, "334 VXNlcm5hbWU6\r\n");
    let out = run_auth(&mut s, &format!("{}\r\n", b64("bob@local.test")));
    assert_eq!(out, "334 UGFzc3dvcmQ6\r\n");
}

#[test]
fn auth_failures_and_refusals() {
    let cases = [
        (
            format!("AUTH PLAIN {}\r\n", b64("\0bob@local.test\0wrong")),
            "535 5.7.8 Error: authentication failed\r\n",
        ),
        (
            format!("AUTH PLAIN {}\r\n", b64("\0bob@local.test\0busy")),
            "454 4.7.0 Temporary authentication failure, try again later\r\n",
        ),
        // Acting for someone else is not offered.
        (
            format!(
                "AUTH PLAIN {}\r\n",
                b64("alice@local.test\0bob@local.test\0right")
            ),
            "535 5.7.8 Error: authentication failed\r\n",
        ),
        (
            "AUTH PLAIN\r\n*\r\n".to_string(),
            "501 5.7.0 Authentication aborted\r\n",
        ),
        (
            "AUTH PLAIN !!!\r\n".to_string(),
            "501 5.5.2 Error: cannot decode the response\r\n",
        ),
        (
            format!("AUTH PLAIN {}\r\n", b64("no separators")),
            "501 5.5.2 Error: invalid response\r\n",
        ),
        (
            "AUTH CRAM-MD5\r\n".to_string(),
            "504 5.5.4 Unrecognized authentication type\r\n",
        ),
        (
            "AUTH\r\n".to_string(),
            "501 5.5.4 Syntax: AUTH mechanism\r\n",
        ),
        (
            "MAIL FROM:<bob@local.test>\r\nAUTH PLAIN =\r\n".to_string(),
            "503 5.5.1 Error: MAIL transaction in progress\r\n",
        ),
    ];
    for (input, want) in cases {
        let mut s = auth_session(false);
        let out = run_auth(&mut s, &input);
        assert!(out.ends_with(want), "{input:?}: {out}");
        assert_eq!(s.authenticated(), None, "{input:?}");
        // The session goes on.
        assert!(run_auth(&mut s, "NOOP\r\n").starts_with("250 "));
    }
    // Before TLS it is neither offered nor taken; before EHLO, not taken.
    let mut s = Session::new(auth_config(false), false);
    let out = run_auth(&mut s, "AUTH PLAIN =\r\nEHLO c.test\r\nAUTH PLAIN =\r\n");
    assert!(
        out.contains("503 5.5.1 Error: send EHLO first\r\n"),
        "{out}"
    );
    assert!(!out.contains("250-AUTH"), "{out}");
    assert!(
        out.ends_with("538 5.7.11 Encryption required for requested authentication mechanism\r\n"),
        "{out}"
    );
    // Unless configured otherwise.
    let mut s = Session::new(auth_config(true), false);
    let out = run_auth(
        &mut s,
        &format!(
            "EHLO c.test\r\nAUTH PLAIN {}\r\n",
            b64("\0bob@local.test\0right")
        ),
    );
    assert!(
        out.contains("250-AUTH PLAIN LOGIN\r\n")
            && out.ends_with("235 2.7.0 Authentication successful\r\n"),
        "{out}"
    );
    // A long initial response fits (RFC 4954: 12288 octets); the command limit does not apply.
    let mut s = auth_session(false);
    let long = b64(&format!("\0bob@local.test\0{}", "x".repeat(4000)));
    assert!(run_auth(&mut s, &format!("AUTH PLAIN {long}\r\n"))
        .ends_with("535 5.7.8 Error: authentication failed\r\n"));
}

#[test]
fn an_authenticated_client_relays_and_sends_only_as_itself() {
    let mut s = auth_session(false);
    // Before AUTH: no relaying from outside the relay networks.
    let out = run_auth(
        &mut s,
        "MAIL FROM:<bob@local.test>\r\nRCPT TO:<x@remote.test>\r\nRSET\r\n",
    );
    assert!(out.contains("554 5.7.1"), "{out}");
    run_auth(
        &mut s,
        &format!("AUTH PLAIN {}\r\n", b64("\0bob@local.test\0right")),
    );
    let out = run_auth(&mut s, "MAIL FROM:<alice@local.test>\r\n");
    assert_eq!(out, "553 5.7.1 <alice@local.test>: Sender address rejected: not owned by user bob@local.test\r\n");
    for from in ["bob@local.test", "team@local.test", ""] {
        let out = run_auth(
            &mut s,
            &format!("MAIL FROM:<{from}> AUTH=<>\r\nRCPT TO:<x@remote.test>\r\nRSET\r\n"),
        );
        assert_eq!(
            out, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n",
            "{from}"
        );
    }
    let Step::Message(tx) = feed_str(
        &mut s,
        "MAIL FROM:<bob@local.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\nhi\r\n.\r\n",
    ) else {
        panic!("no message: {}", take_output(&mut s))
    };
    assert_eq!(tx.protocol, "ESMTPSA");
    assert_eq!(tx.auth.as_deref(), Some("bob@local.test"));
    // STARTTLS would start the session over: refused after AUTH.
    let mut s = Session::new(auth_config(true), false);
    s.set_local_recipients(Rc::new(Directory(Default::default())));
    let out = run_auth(
        &mut s,
        &format!(
            "EHLO c.test\r\nAUTH PLAIN {}\r\nSTARTTLS\r\n",
            b64("\0bob@local.test\0right")
        ),
    );
    assert!(
        out.ends_with("503 5.5.1 Error: already authenticated\r\n"),
        "{out}"
    );
}

#[test]
fn submission_needs_auth_before_mail_and_reports_the_missing_fields() {
    let cfg = Rc::new(Config {
        submission: true,
        ..(*auth_config(false)).clone()
    });
    // Even from a relay network.
    let mut s = Session::new(cfg, true);
    s.set_tls();
    s.set_local_recipients(Rc::new(Directory(Default::default())));
    let out = run_auth(&mut s, "EHLO c.test\r\nMAIL FROM:<bob@local.test>\r\n");
    assert!(
        out.ends_with("530 5.7.0 Authentication required\r\n"),
        "{out}"
    );
    run_auth(
        &mut s,
        &format!("AUTH PLAIN {}\r\n", b64("\0bob@local.test\0right")),
    );
    let Step::Message(tx) = feed_str(
        &mut s,
        "MAIL FROM:<bob@local.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\nSubject: s\r\nMessage-ID: <m@c.test>\r\n\r\nhi\r\n.\r\n",
    ) else {
        panic!("no message: {}", take_output(&mut s))
    };
    assert!(tx.submission);
    assert!(tx.headers.message_id && !tx.headers.date);
}
