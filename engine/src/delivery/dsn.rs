//! Delivery status notifications (bounces): RFC 3464 `multipart/report` messages to the
//! envelope sender, honouring the DSN parameters of RFC 3461 (NOTIFY, RET, ENVID,
//! ORCPT). Pure functions: the caller queues the result with a null sender.

use ringmail_store::message::{notify, Ret};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Given up: a permanent error, or the message expired.
    Failed,
    /// Still trying (a delay warning).
    Delayed,
    /// Put into a mailbox here (RFC 3464 §2.3.3).
    Delivered,
    /// Passed to a next hop that does not take DSN requests, so no more report
    /// will come from there (RFC 3461 §5.2.3).
    Relayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// One recipient to report on.
#[derive(Debug, Clone)]
pub struct Report {
    pub rcpt: String,
    /// `ORCPT=` as the client gave it (`addr-type;xtext`).
    pub orcpt: Option<String>,
    /// `NOTIFY=` bits; 0 when the client gave none.
    pub notify: u8,
    pub action: Action,
    /// Enhanced status code, e.g. (5, 1, 1).
    pub status: (u8, u16, u16),
    /// The remote reply (`550 5.1.1 ...`) or the local reason.
    pub diagnostic: String,
    /// The host that answered, when one did.
    pub remote_mta: Option<String>,
}

/// The original message, as far as the report needs it.
pub struct Original<'a> {
    pub id: &'a str,
    pub from: &'a str,
    pub envid: Option<&'a str>,
    pub ret: Ret,
    pub arrival_date: &'a str,
    /// The message as stored: trace prefix and body.
    pub message: &'a [u8],
}

/// Whether the sender asked (or, without NOTIFY, is owed) a report of this kind
/// (RFC 3461 §4.1: without NOTIFY, failures are reported and delays may be).
pub fn wanted(notify_bits: u8, action: Action) -> bool {
    if notify_bits & notify::NEVER != 0 {
        return false;
    }
    match action {
        Action::Failed => notify_bits == 0 || notify_bits & notify::FAILURE != 0,
        Action::Delayed => notify_bits & notify::DELAY != 0,
        // Only on request (RFC 3461 §4.1).
        Action::Delivered | Action::Relayed => notify_bits & notify::SUCCESS != 0,
    }
}

/// Builds the report, or None when nobody is to get one (a null sender never gets a
/// bounce, which is what stops bounce loops; recipients that did not ask are left out).
pub fn build(
    reporting_mta: &str,
    original: &Original<'_>,
    reports: &[Report],
    date: &str,
) -> Option<Vec<u8>> {
    if original.from.is_empty() {
        return None;
    }
    let reports: Vec<&Report> = reports
        .iter()
        .filter(|r| wanted(r.notify, r.action))
        .collect();
    if reports.is_empty() {
        return None;
    }
    let failed = reports.iter().any(|r| r.action == Action::Failed);
    let delayed = reports.iter().any(|r| r.action == Action::Delayed);
    let boundary = format!("{}/{}", original.id, reporting_mta);
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", original.from));
    m.push_str(if failed {
        "Subject: Undelivered Mail Returned to Sender\r\n"
    } else if delayed {
        "Subject: Delayed Mail (still being retried)\r\n"
    } else {
        "Subject: Successful Mail Delivery Report\r\n"
    });
    m.push_str(&format!("Date: {date}\r\n"));
    m.push_str(&format!(
        "Message-ID: <{}.dsn@{reporting_mta}>\r\n",
        original.id
    ));
    m.push_str("Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n");
    m.push_str(&format!("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");

    // 1. For people.
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ));
    m.push_str(&format!(
        "This is the mail system at host {reporting_mta}.\r\n\r\n"
    ));
    if failed {
        m.push_str("I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients. It's attached below.\r\n\r\n");
    } else if delayed {
        m.push_str("Your message could not be delivered yet to one or more recipients.\r\nThe mail system will keep trying; you do not need to send it again.\r\n\r\n");
    } else {
        m.push_str("Your message was successfully delivered to the destination(s)\r\nlisted below. If it was delivered to a mailbox you will receive no\r\nfurther notifications; if it was relayed, you may still receive\r\nnotifications of mail delivery errors from other systems.\r\n\r\n");
    }
    for r in &reports {
        m.push_str(&fold(
            &format!("<{}>:", r.rcpt),
            &quoted(&r.diagnostic, false),
            "    ",
        ));
    }
    m.push_str("\r\n");

    // 2. For machines (RFC 3464 §2.2, §2.3).
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!("Reporting-MTA: dns; {reporting_mta}\r\n"));
    if let Some(envid) = original.envid {
        m.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    m.push_str(&format!("X-Ringmail-Queue-ID: {}\r\n", original.id));
    m.push_str(&format!("Arrival-Date: {}\r\n", original.arrival_date));
    for r in &reports {
        m.push_str("\r\n");
        m.push_str(&format!("Final-Recipient: rfc822; {}\r\n", r.rcpt));
        if let Some((kind, addr)) = r.orcpt.as_deref().and_then(|o| o.split_once(';')) {
            m.push_str(&format!("Original-Recipient: {kind}; {addr}\r\n"));
        }
        m.push_str(&format!("Action: {}\r\n", r.action.as_str()));
        let (c, s, d) = r.status;
        m.push_str(&format!("Status: {c}.{s}.{d}\r\n"));
        if let Some(mta) = &r.remote_mta {
            m.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        m.push_str(&fold(
            "Diagnostic-Code: smtp;",
            &quoted(&r.diagnostic, true),
            " ",
        ));
        m.push_str(&format!("Last-Attempt-Date: {date}\r\n"));
    }
    m.push_str("\r\n");

    // 3. The original: headers only unless RET=FULL (RFC 3461 §4.3), and only the
    // headers when nothing failed: "If a DSN contains no indications of delivery
    // failure, only the headers of the message SHOULD be returned."
    let mut out = m.into_bytes();
    match original.ret {
        Ret::Full if failed => {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(original.message);
            if !original.message.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
        Ret::Full | Ret::Hdrs | Ret::Unspecified => {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").as_bytes(),
            );
            let end = memchr::memmem::find(original.message, b"\r\n\r\n")
                .map_or(original.message.len(), |i| i + 2);
            out.extend_from_slice(&original.message[..end]);
            if !original.message[..end].ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Some(out)
}

/// Most characters of a remote reply quoted in a bounce: enough for any real
/// diagnostic, while a server that answers with pages of text cannot make the
/// bounce (and every line in it) as long as it likes.
pub const QUOTED_CHARS_MAX: usize = 1000;
/// Lines are folded at this width (RFC 5322 §2.1.1's "should").
const LINE_WIDTH: usize = 78;
/// Longer words are cut into pieces, which keeps every line under RFC 5322's hard
/// limit of 998 octets (a word is folded onto a line of its own, after the indent).
const WORD_BYTES_MAX: usize = 900;

/// The remote reply as quoted: its lines joined by single spaces, controls gone (a
/// stray CR or LF would end the line early), capped with a note saying how much was
/// cut. `ascii`: for a `message/delivery-status` field, which is US-ASCII (RFC 3464
/// §2.1.2); other characters become `?`.
fn quoted(text: &str, ascii: bool) -> String {
    let joined = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let total = joined.chars().count();
    let mut out: String = joined
        .chars()
        .take(QUOTED_CHARS_MAX)
        .map(|c| if ascii && !c.is_ascii() { '?' } else { c })
        .collect();
    if total > QUOTED_CHARS_MAX {
        out.truncate(out.trim_end().len());
        out.push_str(&format!(
            " [{} more characters of the reply not shown]",
            total - QUOTED_CHARS_MAX
        ));
    }
    out
}

/// `first` and the words of `text`, folded at `LINE_WIDTH` with each further line
/// starting with `indent` (whitespace, so a header unfolds to the text again);
/// every line ends with CRLF.
fn fold(first: &str, text: &str, indent: &str) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    let mut line_has_word = !first.is_empty();
    let pieces = text.split(' ').filter(|w| !w.is_empty()).flat_map(|w| {
        let mut rest = w;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let mut end = rest.len().min(WORD_BYTES_MAX);
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            let (piece, tail) = rest.split_at(end);
            rest = tail;
            Some(piece)
        })
    });
    for word in pieces {
        let width = line.chars().count() + 1 + word.chars().count();
        if line_has_word && width > LINE_WIDTH && line.len() > indent.len() {
            out.push_str(&line);
            out.push_str("\r\n");
            line = indent.to_string();
            line_has_word = false;
        }
        if line_has_word {
            line.push(' ');
        }
        line.push_str(word);
        line_has_word = true;
    }
    out.push_str(&line);
    out.push_str("\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"Received: from x\r\nSubject: hello\r\nFrom: a@src.test\r\n\r\nsecret body\r\n";

    fn original(ret: Ret) -> Original<'static> {
        Original {
            id: "0100000000000001",
            from: "a@src.test",
            envid: Some("QQ314159"),
            ret,
            arrival_date: "Sat, 28 Nov 2026 01:00:00 +0000",
            message: MSG,
        }
    }

    fn failure(rcpt: &str, notify_bits: u8) -> Report {
        Report {
            rcpt: rcpt.into(),
            orcpt: Some(format!("rfc822;{rcpt}")),
            notify: notify_bits,
            action: Action::Failed,
            status: (5, 1, 1),
            diagnostic: "550 5.1.1 no such user".into(),
            remote_mta: Some("mx1.dst.test".into()),
        }
    }

    #[test]
    fn a_failure_report_has_the_three_parts() {
        let m = build(
            "mx.ringmail.test",
            &original(Ret::Unspecified),
            &[failure("b@dst.test", 0)],
            "Sat, 28 Nov 2026 02:00:00 +0000",
        )
        .unwrap();
        let t = String::from_utf8(m).unwrap();
        assert!(t.contains("To: <a@src.test>\r\n"));
        assert!(t.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(t.contains("Auto-Submitted: auto-replied\r\n"));
        for field in [
            "Reporting-MTA: dns; mx.ringmail.test",
            "Original-Envelope-Id: QQ314159",
            "Final-Recipient: rfc822; b@dst.test",
            "Original-Recipient: rfc822; b@dst.test",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; mx1.dst.test",
            "Diagnostic-Code: smtp; 550 5.1.1 no such user",
        ] {
            assert!(t.contains(&format!("{field}\r\n")), "{field} missing:\n{t}");
        }
        // Headers only by default: the body stays private.
        assert!(t.contains("Content-Type: text/rfc822-headers\r\n\r\nReceived: from x\r\nSubject: hello\r\nFrom: a@src.test\r\n"));
        assert!(!t.contains("secret body"));
        let boundary = "0100000000000001/mx.ringmail.test";
        assert_eq!(t.matches(&format!("--{boundary}\r\n")).count(), 3);
        assert!(t.ends_with(&format!("--{boundary}--\r\n")));
        assert!(
            !t.contains("\n\n") && !t.replace("\r\n", "").contains('\n'),
            "CRLF line ends only"
        );
    }

    #[test]
    fn ret_full_returns_the_whole_message() {
        let t =
            String::from_utf8(build("h", &original(Ret::Full), &[failure("b@d", 0)], "D").unwrap())
                .unwrap();
        assert!(t.contains("Content-Type: message/rfc822\r\n\r\nReceived: from x\r\n"));
        assert!(t.contains("secret body\r\n"));
    }

    #[test]
    fn notify_and_the_null_sender_decide_who_gets_a_report() {
        use ringmail_store::message::notify::*;
        assert!(wanted(0, Action::Failed));
        assert!(!wanted(0, Action::Delayed));
        assert!(wanted(FAILURE | DELAY, Action::Delayed));
        assert!(!wanted(SUCCESS, Action::Failed));
        assert!(!wanted(NEVER, Action::Failed));
        assert!(build("h", &original(Ret::Hdrs), &[failure("b@d", NEVER)], "D").is_none());
        let mut o = original(Ret::Hdrs);
        o.from = "";
        assert!(
            build("h", &o, &[failure("b@d", 0)], "D").is_none(),
            "no bounce to the null sender"
        );
        // Only the recipients that asked are listed.
        let t = String::from_utf8(
            build(
                "h",
                &original(Ret::Hdrs),
                &[failure("b@d", NEVER), failure("c@d", FAILURE)],
                "D",
            )
            .unwrap(),
        )
        .unwrap();
        assert!(
            t.contains("Final-Recipient: rfc822; c@d")
                && !t.contains("Final-Recipient: rfc822; b@d")
        );
    }

    /// NOTIFY=SUCCESS gets a report when the mail is in a mailbox here or went to a
    /// next hop that takes no DSN requests: headers only, even under RET=FULL, as
    /// nothing failed (RFC 3461 §4.3); nobody else gets one.
    #[test]
    fn success_is_reported_only_on_request_and_with_headers_only() {
        use ringmail_store::message::notify::*;
        let success = |rcpt: &str, bits: u8, action: Action| Report {
            action,
            status: (2, 0, 0),
            diagnostic: "250 2.0.0 delivered to mailbox".into(),
            remote_mta: None,
            ..failure(rcpt, bits)
        };
        assert!(wanted(SUCCESS, Action::Delivered) && wanted(SUCCESS | FAILURE, Action::Relayed));
        assert!(!wanted(0, Action::Delivered) && !wanted(FAILURE, Action::Relayed));
        assert!(build(
            "h",
            &original(Ret::Full),
            &[success("b@d", 0, Action::Delivered)],
            "D"
        )
        .is_none());
        let t = String::from_utf8(
            build(
                "mx.ringmail.test",
                &original(Ret::Full),
                &[
                    success("b@d", SUCCESS, Action::Delivered),
                    success("c@e", SUCCESS | FAILURE, Action::Relayed),
                ],
                "D",
            )
            .unwrap(),
        )
        .unwrap();
        assert!(
            t.contains("Subject: Successful Mail Delivery Report\r\n"),
            "{t}"
        );
        for field in ["Action: delivered", "Action: relayed", "Status: 2.0.0"] {
            assert!(t.contains(&format!("{field}\r\n")), "{field} missing:\n{t}");
        }
        assert!(t.contains("Content-Type: text/rfc822-headers\r\n"));
        assert!(!t.contains("secret body"));
    }

    /// A multi-line reply of 5000 characters, as a server may send it (the client
    /// core joins the lines; a raw CR or LF must not break the bounce either).
    fn long_reply() -> String {
        let mut r = String::from("550 5.7.1");
        let mut i = 0;
        while r.len() < 5000 {
            r.push_str(&format!(" policy line {i} says no"));
            if i % 7 == 6 {
                r.push_str("\r\n550-5.7.1");
            }
            i += 1;
        }
        r
    }

    fn lines_of(t: &str) -> Vec<&str> {
        assert!(t.ends_with("\r\n"));
        let lines: Vec<&str> = t[..t.len() - 2].split("\r\n").collect();
        for l in &lines {
            assert!(
                !l.contains('\r') && !l.contains('\n'),
                "bare CR or LF: {l:?}"
            );
        }
        lines
    }

    /// RFC 5322 §2.2.3 unfolding of the field `name` in a header block.
    fn unfolded(lines: &[&str], name: &str) -> String {
        let start = lines
            .iter()
            .position(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name}"));
        let mut v = lines[start][name.len() + 2..].to_string();
        for l in &lines[start + 1..] {
            if !l.starts_with([' ', '\t']) {
                break;
            }
            v.push_str(l);
        }
        v
    }

    #[test]
    fn a_long_remote_reply_is_folded_and_capped() {
        let mut f = failure("b@dst.test", 0);
        f.diagnostic = long_reply();
        assert!(f.diagnostic.len() >= 5000);
        let m = build(
            "mx.ringmail.test",
            &original(Ret::Hdrs),
            &[f],
            "Sat, 28 Nov 2026 02:00:00 +0000",
        )
        .unwrap();
        let t = String::from_utf8(m.clone()).unwrap();
        let lines = lines_of(&t);
        for l in &lines {
            assert!(l.len() <= 78, "{} characters: {l:?}", l.len());
        }
        let diag = unfolded(&lines, "Diagnostic-Code");
        let (quote, note) = diag
            .strip_prefix("smtp; ")
            .unwrap()
            .split_once(" [")
            .expect("a note that the reply was cut");
        assert!(quote.starts_with("550 5.7.1 policy line 0 says no"));
        assert!(quote.len() <= QUOTED_CHARS_MAX && quote.len() > QUOTED_CHARS_MAX - 20);
        assert!(
            note.ends_with("more characters of the reply not shown]"),
            "{note}"
        );
        assert!(
            !quote.contains("  ") && !quote.contains("\r"),
            "the reply's lines are joined by single spaces"
        );
        // The text for people quotes the same, folded too.
        assert!(t.contains("<b@dst.test>: 550 5.7.1 policy line 0 says no"));
        let people = t.replace("\r\n    ", " ");
        assert!(people.contains(&format!("<b@dst.test>: {quote} [{note}\r\n")));

        // An independent parser agrees on the structure and on the field's value.
        let script = "import email, email.policy, sys\n\
            m = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)\n\
            parts = m.get_payload()\n\
            print(','.join(p.get_content_type() for p in parts))\n\
            blocks = parts[1].get_payload()\n\
            print(len(blocks), blocks[1]['Action'], blocks[1]['Status'])\n\
            print(blocks[1]['Diagnostic-Code'])\n\
            print(sum(len(p.defects) for p in m.walk()))\n";
        let mut py = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (the tests need it, see README)");
        use std::io::Write;
        py.stdin.take().unwrap().write_all(&m).unwrap();
        let out = py.wait_with_output().unwrap();
        assert!(out.status.success());
        let out = String::from_utf8(out.stdout).unwrap();
        let got: Vec<&str> = out.lines().collect();
        assert_eq!(
            got[0],
            "text/plain,message/delivery-status,text/rfc822-headers"
        );
        assert_eq!(got[1], "2 failed 5.1.1");
        assert_eq!(got[2], diag);
        assert_eq!(got[3], "0", "no defects");
    }

    #[test]
    fn a_reply_without_spaces_or_in_utf8_still_keeps_the_line_limits() {
        let mut f = failure("b@dst.test", 0);
        f.diagnostic = format!("550 5.7.1 {} ünïcödé done", "x".repeat(3000));
        let t = String::from_utf8(build("h", &original(Ret::Hdrs), &[f], "D").unwrap()).unwrap();
        let lines = lines_of(&t);
        for l in &lines {
            assert!(l.len() <= 998, "{} octets", l.len());
        }
        let diag = unfolded(&lines, "Diagnostic-Code");
        assert!(
            diag.is_ascii(),
            "delivery-status fields are US-ASCII: {diag}"
        );
        // Short replies are quoted whole, on one line, as before.
        let t =
            String::from_utf8(build("h", &original(Ret::Hdrs), &[failure("b@d", 0)], "D").unwrap())
                .unwrap();
        assert!(t.contains("\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\n"));
        assert!(t.contains("\r\n<b@d>: 550 5.1.1 no such user\r\n"));
    }
}
