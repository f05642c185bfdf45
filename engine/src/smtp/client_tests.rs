//! Byte-level tests of the SMTP client core: every reply path, fed whole and byte by
//! byte.

use super::client::{Awaiting, Client, DotStuffer, Event, RcptResult, Reply, Transaction, TxRcpt};

const FULL_EHLO: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n";
const PIPELINING_EHLO: &str = "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
const PLAIN_EHLO: &str = "250 mx.test\r\n";

/// Feeds `server` whole or byte by byte; returns the client's output and the events.
fn feed(c: &mut Client, server: &str, bytewise: bool) -> (String, Vec<Event>) {
    let mut events = Vec::new();
    if bytewise {
        for b in server.as_bytes() {
            events.extend(c.feed(std::slice::from_ref(b)));
        }
    } else {
        events.extend(c.feed(server.as_bytes()));
    }
    let out = String::from_utf8(c.output().to_vec()).unwrap();
    c.clear_output();
    (out, events)
}

fn ready(ehlo: &str, bytewise: bool) -> Client {
    let mut c = Client::new("me.test");
    let (out, ev) = feed(&mut c, "220 mx.test ESMTP\r\n", bytewise);
    assert_eq!(out, "EHLO me.test\r\n");
    assert!(ev.is_empty());
    let (out, ev) = feed(&mut c, ehlo, bytewise);
    assert_eq!(out, "");
    assert_eq!(ev, vec![Event::Ready]);
    c
}

fn tx(rcpts: &[&str]) -> Transaction {
    Transaction {
        from: "a@src.test".into(),
        rcpts: rcpts
            .iter()
            .map(|r| TxRcpt {
                to: r.to_string(),
                ..TxRcpt::default()
            })
            .collect(),
        size: 123,
        ..Transaction::default()
    }
}

fn codes(ev: &[Event]) -> Vec<(char, u16)> {
    let Some(Event::Done(r)) = ev.iter().find(|e| matches!(e, Event::Done(_))) else {
        panic!("no Done in {ev:?}")
    };
    r.iter()
        .map(|r| match r {
            RcptResult::Delivered(x) => ('D', x.code),
            RcptResult::Deferred(x) => ('T', x.code),
            RcptResult::Failed(x) => ('F', x.code),
        })
        .collect()
}

fn both(f: impl Fn(bool)) {
    f(false);
    f(true);
}

#[test]
fn ehlo_extensions_are_read() {
    both(|bw| {
        let c = ready(FULL_EHLO, bw);
        let e = c.extensions();
        assert!(
            e.pipelining
                && e.eight_bit_mime
                && e.smtputf8
                && e.chunking
                && e.dsn
                && e.enhanced_status_codes
        );
        assert_eq!(e.size, Some(100000));
    });
}

#[test]
fn helo_fallback_when_ehlo_is_refused() {
    both(|bw| {
        let mut c = Client::new("me.test");
        feed(&mut c, "220 old.test\r\n", bw);
        let (out, ev) = feed(&mut c, "502 5.5.1 what\r\n", bw);
        assert_eq!(out, "HELO me.test\r\n");
        assert!(ev.is_empty());
        let (_, ev) = feed(&mut c, "250 old.test\r\n", bw);
        assert_eq!(ev, vec![Event::Ready]);
        assert!(!c.extensions().esmtp);
    });
}

#[test]
fn pipelined_data_with_a_refused_recipient() {
    both(|bw| {
        let mut c = ready(PIPELINING_EHLO, bw);
        assert_eq!(c.start(&tx(&["x@d.test", "y@d.test"])), None);
        let (out, _) = feed(&mut c, "", bw);
        assert_eq!(
            out,
            "MAIL FROM:<a@src.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nDATA\r\n"
        );
        let (_, ev) = feed(
            &mut c,
            "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n",
            bw,
        );
        assert_eq!(ev, vec![Event::SendBody { bdat: false }]);
        c.body_sent();
        let (_, ev) = feed(&mut c, "250-2.0.0 queued\r\n250 2.0.0 as ABC\r\n", bw);
        assert_eq!(codes(&ev), [('D', 250), ('F', 550)]);
        let Event::Done(r) = &ev[0] else { panic!() };
        let RcptResult::Delivered(reply) = &r[0] else {
            panic!()
        };
        assert_eq!(reply.to_line(), "250 2.0.0 queued as ABC");
        let RcptResult::Failed(reply) = &r[1] else {
            panic!()
        };
        assert_eq!(reply.enhanced, Some((5, 1, 1)));
        assert_eq!(ev.last(), Some(&Event::Ready), "the connection is reusable");
    });
}

#[test]
fn temporary_and_permanent_results_per_recipient_and_for_the_message() {
    both(|bw| {
        let mut c = ready(PIPELINING_EHLO, bw);
        c.start(&tx(&["x@d", "y@d", "z@d"]));
        feed(&mut c, "", bw);
        let (_, ev) = feed(
            &mut c,
            "250 ok\r\n451 4.2.1 mailbox busy\r\n250 ok\r\n250 ok\r\n354 go\r\n",
            bw,
        );
        assert_eq!(ev, vec![Event::SendBody { bdat: false }]);
        c.body_sent();
        let (_, ev) = feed(&mut c, "452 4.3.1 out of space\r\n", bw);
        assert_eq!(codes(&ev), [('T', 451), ('T', 452), ('T', 452)]);
        c.start(&tx(&["x@d"]));
        feed(&mut c, "", bw);
        feed(&mut c, "250 ok\r\n250 ok\r\n354 go\r\n", bw);
        c.body_sent();
        let (_, ev) = feed(&mut c, "554 5.7.1 spam\r\n", bw);
        assert_eq!(codes(&ev), [('F', 554)]);
    });
}

#[test]
fn every_recipient_refused_ends_without_a_body() {
    both(|bw| {
        // Pipelined DATA gets its own refusal; then RSET.
        let mut c = ready(PIPELINING_EHLO, bw);
        c.start(&tx(&["x@d"]));
        feed(&mut c, "", bw);
        let (out, ev) = feed(
            &mut c,
            "250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n",
            bw,
        );
        assert_eq!(out, "RSET\r\n");
        assert!(ev.is_empty());
        let (_, ev) = feed(&mut c, "250 ok\r\n", bw);
        assert_eq!(codes(&ev), [('F', 550)]);
        // A refused MAIL refuses everyone the same way.
        c.start(&tx(&["x@d", "y@d"]));
        feed(&mut c, "", bw);
        let (out, _) = feed(&mut c, "451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n", bw);
        assert_eq!(out, "RSET\r\n");
        let (_, ev) = feed(&mut c, "250 ok\r\n", bw);
        assert_eq!(codes(&ev), [('T', 451), ('T', 451)]);
    });
}

#[test]
fn lockstep_without_pipelining() {
    both(|bw| {
        let mut c = ready(PLAIN_EHLO, bw);
        c.start(&tx(&["x@d", "y@d"]));
        let steps = [
            ("", "MAIL FROM:<a@src.test>\r\n"),
            ("250 ok\r\n", "RCPT TO:<x@d>\r\n"),
            ("250 ok\r\n", "RCPT TO:<y@d>\r\n"),
            ("250 ok\r\n", "DATA\r\n"),
        ];
        for (server, client) in steps {
            assert_eq!(feed(&mut c, server, bw).0, client, "after {server:?}");
        }
        let (_, ev) = feed(&mut c, "354 go\r\n", bw);
        assert_eq!(ev, vec![Event::SendBody { bdat: false }]);
        c.body_sent();
        let (_, ev) = feed(&mut c, "250 ok\r\n", bw);
        assert_eq!(codes(&ev), [('D', 250), ('D', 250)]);
        // MAIL refused: no RCPT is sent.
        c.start(&tx(&["x@d"]));
        feed(&mut c, "", bw);
        let (out, ev) = feed(&mut c, "550 5.7.1 sender refused\r\n", bw);
        assert_eq!(out, "");
        assert_eq!(codes(&ev), [('F', 550)]);
    });
}

#[test]
fn bdat_when_chunking_is_offered() {
    both(|bw| {
        let mut c = ready(FULL_EHLO, bw);
        c.start(&tx(&["x@d"]));
        let (out, _) = feed(&mut c, "", bw);
        assert_eq!(out, "MAIL FROM:<a@src.test> SIZE=123\r\nRCPT TO:<x@d>\r\n");
        let (out, ev) = feed(&mut c, "250 ok\r\n250 ok\r\n", bw);
        assert_eq!(out, "BDAT 123 LAST\r\n");
        assert_eq!(ev, vec![Event::SendBody { bdat: true }]);
        let (_, ev) = feed(&mut c, "250 2.0.0 ok\r\n", bw);
        assert_eq!(codes(&ev), [('D', 250)]);
    });
}

#[test]
fn requirements_the_server_cannot_meet_fail_without_a_command() {
    let mut c = ready(FULL_EHLO, false);
    let mut big = tx(&["x@d"]);
    big.size = 100_001;
    let Some(Event::Done(r)) = c.start(&big) else {
        panic!()
    };
    assert!(
        matches!(&r[0], RcptResult::Failed(x) if x.code == 552 && x.enhanced == Some((5, 3, 4)))
    );
    assert_eq!(c.output(), b"");
    let mut c = ready(PLAIN_EHLO, false);
    let mut eight = tx(&["x@d"]);
    eight.eight_bit = true;
    let Some(Event::Done(r)) = c.start(&eight) else {
        panic!()
    };
    assert!(matches!(&r[0], RcptResult::Failed(x) if x.enhanced == Some((5, 6, 3))));
    let mut utf8 = tx(&["ü@d"]);
    utf8.smtputf8 = true;
    let Some(Event::Done(r)) = c.start(&utf8) else {
        panic!()
    };
    assert!(matches!(&r[0], RcptResult::Failed(x) if x.enhanced == Some((5, 6, 7))));
    assert_eq!(c.output(), b"");
}

#[test]
fn esmtp_parameters_only_where_offered() {
    let mut t = tx(&["x@d"]);
    t.eight_bit = true;
    t.smtputf8 = true;
    t.ret = Some("HDRS");
    t.envid = Some("ID1".into());
    t.rcpts[0].notify = Some("FAILURE".into());
    t.rcpts[0].orcpt = Some("rfc822;x@d".into());
    let mut c = ready(FULL_EHLO, false);
    c.start(&t);
    let (out, _) = feed(&mut c, "", false);
    assert_eq!(out, "MAIL FROM:<a@src.test> SIZE=123 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=ID1\r\nRCPT TO:<x@d> NOTIFY=FAILURE ORCPT=rfc822;x@d\r\n");
    let mut c = ready("250-mx\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n", false);
    c.start(&t);
    let (out, _) = feed(&mut c, "", false);
    assert_eq!(out, "MAIL FROM:<a@src.test> BODY=8BITMIME SMTPUTF8\r\n");
}

#[test]
fn a_connection_lost_mid_data_defers_the_accepted_recipients() {
    let mut c = ready(PIPELINING_EHLO, false);
    c.start(&tx(&["x@d", "y@d"]));
    feed(&mut c, "250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n", false);
    let Some(Event::Done(r)) = c.connection_lost() else {
        panic!()
    };
    assert!(matches!(&r[0], RcptResult::Deferred(x) if x.enhanced == Some((4, 4, 2))));
    assert!(matches!(&r[1], RcptResult::Failed(x) if x.code == 550));
    // Outside a transaction there is nothing to report.
    let mut idle = ready(PLAIN_EHLO, false);
    assert_eq!(idle.connection_lost(), None);
}

#[test]
fn a_broken_or_closing_server_fails_the_session() {
    let mut c = Client::new("me");
    let ev = c.feed(b"554 5.7.1 go away\r\n");
    assert!(matches!(&ev[..], [Event::Failed(r)] if r.code == 554));
    let mut c = ready(PIPELINING_EHLO, false);
    c.start(&tx(&["x@d"]));
    let ev = c.feed(b"HTTP/1.1 400 Bad Request\r\n");
    assert!(matches!(ev.last(), Some(Event::Failed(_))), "{ev:?}");
    assert!(matches!(&ev[0], Event::Done(r) if matches!(r[0], RcptResult::Deferred(_))));
    let mut c = ready(PIPELINING_EHLO, false);
    let ev = c.feed(b"421 4.3.2 shutting down\r\n");
    assert!(matches!(&ev[..], [Event::Failed(r)] if r.code == 421));
    let mut c = ready(PIPELINING_EHLO, false);
    let ev = c.feed(&b"250-x".repeat(2000));
    assert!(
        matches!(&ev[..], [Event::Failed(_)]),
        "an endless line is refused"
    );
}

#[test]
fn quit() {
    let mut c = ready(PLAIN_EHLO, true);
    c.quit();
    assert_eq!(c.output(), b"QUIT\r\n");
    c.clear_output();
    assert_eq!(c.feed(b"221 2.0.0 bye\r\n"), vec![Event::Closed]);
}

#[test]
fn dot_stuffing_across_chunks() {
    for split in 0..=12 {
        let text = b".a\r\n..b\r\nc.\r\n.";
        let (x, y) = text.split_at(split.min(text.len()));
        let mut d = DotStuffer::default();
        let mut out = Vec::new();
        d.stuff(x, &mut out);
        d.stuff(y, &mut out);
        out.extend_from_slice(d.finish());
        assert_eq!(out, b"..a\r\n...b\r\nc.\r\n..\r\n.\r\n", "split {split}");
    }
    let mut d = DotStuffer::default();
    let mut out = Vec::new();
    d.stuff(b"ends with CRLF\r\n", &mut out);
    assert_eq!(d.finish(), b".\r\n");
    d.stuff(b"half\r", &mut out);
    assert_eq!(d.finish(), b"\n.\r\n");
    assert_eq!(DotStuffer::default().finish(), b".\r\n", "empty message");
}

#[test]
fn text_without_a_leading_dot_passes_unchanged() {
    // pass() agrees with stuff(): true exactly when stuffing would copy the text as is,
    // and the end marker is the same either way.
    let cases: [&[u8]; 8] = [
        b"plain\r\ntext\r\n",
        b"no newline",
        b"half\r",
        b"",
        b".first line",
        b"a\r\n.b\r\n",
        b"bare\n.dot",
        b"mid.dle\r\n",
    ];
    for text in cases {
        let mut stuffed = Vec::new();
        let mut s = DotStuffer::default();
        s.stuff(text, &mut stuffed);
        let mut p = DotStuffer::default();
        let passed = p.pass(text);
        assert_eq!(
            passed,
            stuffed == text,
            "{:?}",
            String::from_utf8_lossy(text)
        );
        if passed {
            assert_eq!(p.finish(), s.finish());
        } else {
            assert_eq!(p.finish(), DotStuffer::default().finish(), "unchanged");
        }
    }
    // A chunk after a line end: a dot first needs stuffing, else it passes.
    let mut d = DotStuffer::default();
    assert!(d.pass(b"line\r\n"));
    assert!(!d.pass(b".next"));
    assert!(d.pass(b"next"));
    assert!(d.pass(b".after text"), "mid-line dot");
}

#[test]
fn a_reply_right_behind_the_354_waits_for_the_body() {
    let mut c = ready(PIPELINING_EHLO, false);
    c.start(&tx(&["x@d"]));
    feed(&mut c, "", false);
    // The 421 arrives in the same packet as the 354; it answers the message, so it
    // must not be taken before the body was sent.
    let (_, ev) = feed(
        &mut c,
        "250 ok\r\n250 ok\r\n354 go\r\n421 4.3.2 closing\r\n",
        false,
    );
    assert_eq!(ev, vec![Event::SendBody { bdat: false }]);
    let ev = c.body_sent();
    assert_eq!(codes(&ev), [('T', 421)]);
    assert!(!c.reusable(), "the server announced it is closing");
}

#[test]
fn a_refused_data_resets_the_envelope_and_a_bogus_one_defers() {
    let mut c = ready(PIPELINING_EHLO, false);
    c.start(&tx(&["x@d"]));
    feed(&mut c, "", false);
    let (out, ev) = feed(
        &mut c,
        "250 ok\r\n250 ok\r\n451 4.3.0 no data now\r\n",
        false,
    );
    assert_eq!(out, "RSET\r\n");
    assert!(ev.is_empty());
    let (_, ev) = feed(&mut c, "250 ok\r\n", false);
    assert_eq!(codes(&ev), [('T', 451)]);
    assert!(c.reusable());
    // A 250 where 354 is due is not a delivery.
    c.start(&tx(&["x@d"]));
    feed(&mut c, "", false);
    feed(&mut c, "250 ok\r\n250 ok\r\n250 what\r\n", false);
    let (_, ev) = feed(&mut c, "250 ok\r\n", false);
    assert_eq!(codes(&ev), [('T', 451)]);
}

#[test]
fn an_endless_multiline_reply_is_refused() {
    let mut c = ready(PIPELINING_EHLO, false);
    let ev = c.feed("250-x\r\n".repeat(300).as_bytes());
    assert!(matches!(&ev[..], [Event::Failed(_)]), "{ev:?}");
}

/// Found by fuzzing (fuzz/corpus/smtp_client/ready-then-more): a server that sends
/// more after its EHLO reply, in the same segment, must not make `Ready` stale. The
/// unsolicited reply used to be taken at once (failing the session), so the driver,
/// which starts the transaction on `Ready`, called `start` on a finished client and
/// its assertion took the executor down.
#[test]
fn bytes_after_the_ehlo_reply_wait_for_the_transaction() {
    let mut c = Client::new("me.test");
    feed(&mut c, "220 mx.test ESMTP\r\n", false);
    let (_, ev) = feed(&mut c, "250 mx.test\r\n421 4.3.2 going down\r\n", false);
    assert_eq!(ev, vec![Event::Ready]);
    // The driver's turn; the early 421 then answers MAIL: the recipient is deferred.
    assert_eq!(c.start(&tx(&["x@d"])), None);
    let (_, ev) = feed(&mut c, "", false);
    assert_eq!(codes(&ev), [('T', 421)], "{ev:?}");
}

#[test]
fn a_354_after_every_recipient_was_refused_gets_an_empty_message() {
    // RFC 2920 §3.1: the pipelined DATA may still be answered 354 by a server that
    // refused every RCPT. The client ends the data at once with the bare dot (never
    // a command as message text), and the recipients keep their RCPT replies, even
    // when the server takes the empty message.
    both(|bw| {
        for dot_reply in [
            "554 5.5.1 no valid recipients\r\n",
            "250 2.0.0 ok, empty\r\n",
        ] {
            let mut c = ready(PIPELINING_EHLO, bw);
            c.start(&tx(&["x@d", "y@d"]));
            feed(&mut c, "", bw);
            let (out, ev) = feed(
                &mut c,
                "250 ok\r\n550 5.1.1 no\r\n450 4.2.1 busy\r\n354 go ahead\r\n",
                bw,
            );
            assert_eq!(out, ".\r\n", "the empty message, and nothing else");
            assert!(ev.is_empty(), "{ev:?}");
            let (out, ev) = feed(&mut c, dot_reply, bw);
            assert_eq!(out, "");
            assert_eq!(codes(&ev), [('F', 550), ('T', 450)], "after {dot_reply:?}");
            assert_eq!(ev.last(), Some(&Event::Ready));
            assert!(c.reusable(), "the transaction is over, the session clean");
        }
        // A refused MAIL followed by a 354 to the pipelined DATA: the same.
        let mut c = ready(PIPELINING_EHLO, bw);
        c.start(&tx(&["x@d"]));
        feed(&mut c, "", bw);
        let (out, _) = feed(
            &mut c,
            "451 4.3.0 later\r\n503 5.5.1 need MAIL\r\n354 go\r\n",
            bw,
        );
        assert_eq!(out, ".\r\n");
        let (_, ev) = feed(&mut c, "503 5.5.1 no recipients\r\n", bw);
        assert_eq!(codes(&ev), [('T', 451)]);
    });
}

#[test]
fn no_bdat_when_every_recipient_was_refused() {
    both(|bw| {
        let mut c = ready(FULL_EHLO, bw);
        c.start(&tx(&["x@d", "y@d"]));
        let (out, _) = feed(&mut c, "", bw);
        assert!(!out.contains("BDAT") && !out.contains("DATA"), "{out}");
        let (out, ev) = feed(&mut c, "250 ok\r\n550 5.1.1 no\r\n551 5.1.6 moved\r\n", bw);
        assert_eq!(out, "RSET\r\n");
        assert!(ev.is_empty(), "no SendBody: {ev:?}");
        let (_, ev) = feed(&mut c, "250 ok\r\n", bw);
        assert_eq!(codes(&ev), [('F', 550), ('F', 551)]);
    });
}

#[test]
fn the_reply_awaited_is_known_at_each_step_and_an_abort_defers_with_its_reason() {
    // The driver times each reply by what it answers (RFC 5321 §4.5.3.2).
    both(|bw| {
        let mut c = Client::new("me.test");
        assert_eq!(c.awaiting(), Some(Awaiting::Greeting));
        feed(&mut c, "220 mx\r\n", bw);
        assert_eq!(c.awaiting(), Some(Awaiting::Hello));
        feed(&mut c, PIPELINING_EHLO, bw);
        assert_eq!(c.awaiting(), None, "idle");
        let before = c.replies();
        c.start(&tx(&["x@d", "y@d"]));
        assert_eq!(c.awaiting(), Some(Awaiting::Mail));
        feed(&mut c, "250 ok\r\n", bw);
        assert_eq!(c.awaiting(), Some(Awaiting::Rcpt));
        feed(&mut c, "250 ok\r\n250 ok\r\n", bw);
        assert_eq!(c.awaiting(), Some(Awaiting::Data));
        assert_eq!(c.replies(), before + 3, "one count per complete reply");
        feed(&mut c, "354 go\r\n", bw);
        assert_eq!(c.awaiting(), None, "the driver's turn: the text");
        c.body_sent();
        assert_eq!(c.awaiting(), Some(Awaiting::EndOfData));
        // A partial reply is not a reply.
        feed(&mut c, "25", bw);
        assert_eq!(c.replies(), before + 4);
        let why = Reply {
            code: 451,
            text: "timed out".into(),
            enhanced: Some((4, 4, 2)),
        };
        let Some(Event::Done(r)) = c.abort(why.clone()) else {
            panic!()
        };
        assert_eq!(r, vec![RcptResult::Deferred(why.clone()); 2]);
        assert!(!c.reusable());
    });
}

/// A server that names itself with our own name (in the greeting, or in the
/// EHLO/HELO reply) is this host: the session ends before any transaction (554
/// 5.4.6) and the client says it loops back.
#[test]
fn a_server_with_our_own_name_is_a_loop() {
    let looped = |ev: &[Event]| matches!(ev, [Event::Failed(r)] if r.code == 554 && r.enhanced == Some((5, 4, 6)));
    both(|bw| {
        let mut c = Client::new("me.test");
        let (out, ev) = feed(&mut c, "220 ME.test ESMTP ringmail\r\n", bw);
        assert_eq!(out, "QUIT\r\n", "a QUIT before the close");
        assert!(looped(&ev), "{ev:?}");
        assert!(c.loops_back());

        let mut c = Client::new("me.test");
        feed(&mut c, "220 relay.test ESMTP\r\n", bw);
        let (out, ev) = feed(&mut c, "250-me.test.\r\n250 PIPELINING\r\n", bw);
        assert_eq!(out, "QUIT\r\n", "a QUIT before the close");
        assert!(looped(&ev), "{ev:?}");
        assert!(c.loops_back());

        let mut c = Client::new("me.test");
        feed(&mut c, "220 old.test\r\n", bw);
        feed(&mut c, "502 no\r\n", bw);
        let (out, ev) = feed(&mut c, "250 me.test\r\n", bw);
        assert_eq!(out, "QUIT\r\n");
        assert!(looped(&ev), "{ev:?}");

        let c = ready(FULL_EHLO, bw);
        assert!(!c.loops_back(), "mx.test is another host");
    });
}

const TLS_EHLO: &str = "250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n";

#[test]
fn starttls_when_offered_then_ehlo_again_under_tls() {
    use super::client::TlsWish;
    for bytewise in [false, true] {
        for wish in [TlsWish::Opportunistic, TlsWish::Required] {
            let mut c = Client::with_tls("me.test", wish);
            feed(&mut c, "220 mx.test ESMTP\r\n", bytewise);
            let (out, ev) = feed(&mut c, TLS_EHLO, bytewise);
            assert_eq!((out.as_str(), ev), ("STARTTLS\r\n", vec![]));
            assert_eq!(c.awaiting(), Some(Awaiting::StartTls));
            let (out, ev) = feed(&mut c, "220 2.0.0 go ahead\r\n", bytewise);
            assert_eq!((out.as_str(), ev), ("", vec![Event::StartTls]));
            assert_eq!(c.awaiting(), None);
            c.tls_started();
            assert!(c.tls_on());
            assert_eq!(String::from_utf8_lossy(c.output()), "EHLO me.test\r\n");
            c.clear_output();
            // Offered again under TLS (a confused server): not taken twice.
            let (out, ev) = feed(&mut c, TLS_EHLO, bytewise);
            assert_eq!((out.as_str(), ev), ("", vec![Event::Ready]));
            assert!(c.extensions().pipelining);
        }
    }
}

#[test]
fn plaintext_after_the_starttls_220_is_dropped() {
    use super::client::TlsWish;
    let mut c = Client::with_tls("me.test", TlsWish::Required);
    feed(&mut c, "220 mx.test ESMTP\r\n", false);
    feed(&mut c, TLS_EHLO, false);
    // An injected EHLO reply in the same read as the 220 (CVE-2011-0411's mirror):
    // never taken as the server's word under TLS.
    let (_, ev) = feed(
        &mut c,
        "220 go ahead\r\n250-evil.test\r\n250 PIPELINING\r\n",
        false,
    );
    assert_eq!(ev, vec![Event::StartTls]);
    c.tls_started();
    assert_eq!(c.awaiting(), Some(Awaiting::Hello));
    assert!(
        !c.extensions().pipelining,
        "nothing from before the handshake counts"
    );
    c.clear_output();
    // Under TLS, a 5xx to EHLO is that server's refusal, not a missing STARTTLS.
    let (_, ev) = feed(&mut c, "502 5.5.2 no EHLO\r\n", false);
    assert!(
        !matches!(ev.as_slice(), [Event::Failed(r)] if r.text.contains("does not offer STARTTLS")),
        "{ev:?}"
    );
}

#[test]
fn without_starttls_opportunistic_goes_on_and_required_fails() {
    use super::client::TlsWish;
    let mut c = Client::with_tls("me.test", TlsWish::Opportunistic);
    feed(&mut c, "220 mx.test ESMTP\r\n", false);
    assert_eq!(feed(&mut c, PLAIN_EHLO, false).1, vec![Event::Ready]);
    // Refused STARTTLS: on in plaintext.
    let mut c = Client::with_tls("me.test", TlsWish::Opportunistic);
    feed(&mut c, "220 mx.test ESMTP\r\n", false);
    feed(&mut c, TLS_EHLO, false);
    assert_eq!(
        feed(&mut c, "454 4.7.0 TLS not available\r\n", false).1,
        vec![Event::Ready]
    );
    assert!(!c.tls_on());
    // Required: neither an EHLO without STARTTLS, nor a refusal, nor HELO will do.
    for (ehlo, then) in [
        (PLAIN_EHLO, None),
        (TLS_EHLO, Some("454 4.7.0 TLS not available\r\n")),
        ("500 what\r\n", None),
    ] {
        let mut c = Client::with_tls("me.test", TlsWish::Required);
        feed(&mut c, "220 mx.test ESMTP\r\n", false);
        let (_, mut ev) = feed(&mut c, ehlo, false);
        if let Some(t) = then {
            ev = feed(&mut c, t, false).1;
        }
        let Some(Event::Failed(r)) = ev.last() else {
            panic!("{ehlo:?}: {ev:?}")
        };
        assert_eq!((r.code, r.enhanced), (451, Some((4, 7, 4))), "{ehlo:?}");
        assert!(r.text.contains("TLS is required"), "{}", r.text);
    }
    // Off: STARTTLS is never sent.
    let mut c = Client::new("me.test");
    feed(&mut c, "220 mx.test ESMTP\r\n", false);
    assert_eq!(
        feed(&mut c, TLS_EHLO, false),
        (String::new(), vec![Event::Ready])
    );
}

/// A session that cannot go on ends with a QUIT (RFC 5321 §4.1.1.10; §3.1: a
/// server greeting 554 waits for it), except when the server said 421: it closes.
#[test]
fn a_refused_session_says_quit_unless_the_server_is_closing() {
    both(|bw| {
        let mut c = Client::new("me.test");
        let (out, ev) = feed(&mut c, "554 5.7.1 no mail from you\r\n", bw);
        assert_eq!(out, "QUIT\r\n");
        assert!(
            matches!(ev.as_slice(), [Event::Failed(r)] if r.code == 554),
            "{ev:?}"
        );

        let mut c = Client::new("me.test");
        let (out, ev) = feed(&mut c, "421 4.3.2 shutting down\r\n", bw);
        assert_eq!(out, "");
        assert!(
            matches!(ev.as_slice(), [Event::Failed(r)] if r.code == 421),
            "{ev:?}"
        );
    });
}
