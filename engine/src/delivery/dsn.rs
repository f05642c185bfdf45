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
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
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
    let boundary = format!("{}/{}", original.id, reporting_mta);
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", original.from));
    m.push_str(if failed {
        "Subject: Undelivered Mail Returned to Sender\r\n"
    } else {
        "Subject: Delayed Mail (still being retried)\r\n"
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
    } else {
        m.push_str("Your message could not be delivered yet to one or more recipients.\r\nThe mail system will keep trying; you do not need to send it again.\r\n\r\n");
    }
    for r in &reports {
        m.push_str(&format!("<{}>: {}\r\n", r.rcpt, r.diagnostic));
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
        m.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", r.diagnostic));
        m.push_str(&format!("Last-Attempt-Date: {date}\r\n"));
    }
    m.push_str("\r\n");

    // 3. The original: headers only unless RET=FULL (RFC 3461 §4.3).
    let mut out = m.into_bytes();
    match original.ret {
        Ret::Full => {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(original.message);
            if !original.message.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
        Ret::Hdrs | Ret::Unspecified => {
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
}
