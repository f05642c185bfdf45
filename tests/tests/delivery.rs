//! One delivery attempt end to end: DNS from a server in the test process, fake MX
//! hosts on 127.0.0.2/127.0.0.3 (ringmail-sink, or nothing listening), real SMTP.

use ringmail::delivery::attempt::{
    attempt, AttemptConfig, DeliveryTimeouts, Destination, Outcome, Pool,
};
use ringmail::delivery::tls::OutboundTls;
use ringmail::dns::resolver::Resolver;
use ringmail::net::Ring;
use ringmail::queue::MessageText;
use ringmail::smtp::client::{RcptResult, Transaction, TxRcpt};
use ringmail_bench::sink::Faults;
use ringmail_tests::dns::{DnsServer, Zone};
use ringmail_tests::sink::Sink;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A sink on 127.0.0.2; 127.0.0.3 on the same port has nothing listening.
fn start_mx(faults: Faults) -> Sink {
    Sink::start("127.0.0.2:0".parse().unwrap(), faults)
}

fn zone() -> Zone {
    Zone::default()
        .mx("example.test", 10, "down.example.test")
        .mx("example.test", 20, "up.example.test")
        .a("down.example.test", "127.0.0.3")
        .a("up.example.test", "127.0.0.2")
        .a("implicit.test", "127.0.0.2")
        .mx("nullmx.test", 0, ".")
}

const MESSAGE: &[u8] = b"Received: from client ([127.0.0.1])\r\n\tby mx (ringmail) with ESMTP id 1\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n";

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
        size: MESSAGE.len() as u64,
        ..Transaction::default()
    }
}

fn run(dns: SocketAddr, port: u16, dest: Destination, tx: Transaction) -> Outcome {
    run_message(dns, port, dest, tx, b"", MESSAGE.to_vec())
}

fn run_message(
    dns: SocketAddr,
    port: u16,
    dest: Destination,
    tx: Transaction,
    prefix: &[u8],
    message: Vec<u8>,
) -> Outcome {
    let tls = OutboundTls::new(vec![], None).unwrap();
    run_full(dns, port, dest, tx, prefix, message, tls)
}

fn run_full(
    dns: SocketAddr,
    port: u16,
    dest: Destination,
    tx: Transaction,
    prefix: &[u8],
    message: Vec<u8>,
    tls: OutboundTls,
) -> Outcome {
    let prefix = prefix.to_vec();
    glommio::LocalExecutor::default().run(async move {
        let ring = Ring::start().unwrap();
        // The test server always answers: a timeout that never expires, so a slow
        // machine cannot turn an answer into a DNS timeout.
        let resolver = Resolver::new(vec![dns], Duration::from_secs(10), 2);
        let cfg = AttemptConfig {
            helo: "ringmail.test".into(),
            mx_port: port,
            timeouts: short_timeouts(),
            tls,
        };
        let pool = Pool::new(100, Duration::from_secs(5));
        attempt(
            &ring,
            &pool,
            &resolver,
            &cfg,
            &dest,
            &tx,
            &MessageText {
                prefix,
                body: message.into(),
            },
        )
        .await
    })
}

/// An MX without CHUNKING (like many real ones): PIPELINING and DATA only. Records
/// each message's text as received (still dot-stuffed).
fn plain_mx() -> (SocketAddr, std::thread::JoinHandle<Vec<Vec<u8>>>) {
    let (addr, t) = recording_mx();
    (addr, std::thread::spawn(move || t.join().unwrap().messages))
}

#[derive(Default)]
struct Recorded {
    /// Command lines, without CRLF.
    commands: Vec<String>,
    messages: Vec<Vec<u8>>,
}

/// What the recording MX saw, once its client closed or quit; a test fails rather
/// than hangs when the connection never comes.
fn recorded(got: std::thread::JoinHandle<Recorded>) -> Recorded {
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(got.join());
    });
    wait.recv_timeout(Duration::from_secs(30))
        .expect("a connection to the MX within 30 s")
        .expect("the MX thread")
}

/// A scripted MX on 127.0.0.2 (any port) for one connection: `script` gets the
/// connection's reader and writer, whose reads time out after `read_timeout` (which
/// bounds the test if the client never comes or never closes); what it returns is
/// what the thread yields.
fn scripted_mx<T: Send + 'static>(
    read_timeout: Duration,
    script: impl FnOnce(std::io::BufReader<std::net::TcpStream>, std::net::TcpStream) -> T
        + Send
        + 'static,
) -> (SocketAddr, std::thread::JoinHandle<T>) {
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(read_timeout)).unwrap();
        let w = conn.try_clone().unwrap();
        script(std::io::BufReader::new(conn), w)
    });
    (addr, t)
}

/// `plain_mx` that also records the commands: one connection on 127.0.0.2 (any
/// port), no SMTPUTF8, no 8BITMIME; done when the client closes or quits.
fn recording_mx() -> (SocketAddr, std::thread::JoinHandle<Recorded>) {
    use std::io::{BufRead, Write};
    scripted_mx(Duration::from_secs(10), move |mut r, mut w| {
        w.write_all(b"220 plain.test ESMTP\r\n").unwrap();
        let mut got = Recorded::default();
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line).unwrap() == 0 {
                return got;
            }
            got.commands
                .push(String::from_utf8_lossy(&line).trim_end().to_string());
            let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
            let reply: &[u8] = if cmd.starts_with("EHLO") {
                b"250-plain.test\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n"
            } else if cmd.starts_with("DATA") {
                w.write_all(b"354 go ahead\r\n").unwrap();
                let mut text = Vec::new();
                while !text.ends_with(b"\r\n.\r\n") {
                    if r.read_until(b'\n', &mut text).unwrap() == 0 {
                        return got;
                    }
                }
                got.messages.push(text);
                b"250 2.0.0 taken\r\n"
            } else if cmd.starts_with("QUIT") {
                w.write_all(b"221 bye\r\n").unwrap();
                return got;
            } else {
                b"250 ok\r\n"
            };
            w.write_all(reply).unwrap();
        }
    })
}

/// RFC 5321 §4.5.2 in reverse: the text before the end marker, one dot taken off
/// each line that starts with one.
fn unstuff(text: &[u8]) -> Vec<u8> {
    let body = &text[..text.len() - 3];
    let mut out = Vec::with_capacity(body.len());
    for line in body.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

#[test]
fn data_to_a_server_without_chunking_arrives_intact_large_and_small() {
    let line = |i: usize| format!("line {i:05} of a long message, some text to fill it\r\n");
    let plain: Vec<u8> = (0..1500).flat_map(|i| line(i).into_bytes()).collect();
    let dotted: Vec<u8> = (0..1500)
        .flat_map(|i| {
            let l = line(i);
            if i % 100 == 7 { format!(".{l}") } else { l }.into_bytes()
        })
        .collect();
    assert!(plain.len() > 64 << 10, "large enough to go out unbuffered");
    let cases = [
        ("large, no line starts with a dot", plain),
        ("large, dot-stuffed", dotted),
        ("small", MESSAGE.to_vec()),
        ("large, no final CRLF", {
            let mut m = line(1).repeat(2000).into_bytes();
            m.extend_from_slice(b"no line end");
            m
        }),
    ];
    let prefix = b"Received: from client.test\r\n\tby mx.test with ESMTP id 1\r\n";
    for (what, message) in cases {
        let (addr, mx) = plain_mx();
        let mut t = tx(&["x@example.test"]);
        t.size = (prefix.len() + message.len()) as u64;
        let o = run_message(
            "127.0.0.1:9".parse().unwrap(),
            addr.port(),
            Destination::Route("127.0.0.2".into(), addr.port()),
            t,
            prefix,
            message.clone(),
        );
        assert_eq!(kinds(&o), [('D', 250)], "{what}");
        let got = mx.join().unwrap();
        assert_eq!(got.len(), 1, "{what}");
        let mut want = [&prefix[..], &message[..]].concat();
        if !want.ends_with(b"\r\n") {
            want.extend_from_slice(b"\r\n");
        }
        assert_eq!(unstuff(&got[0]), want, "{what}");
    }
}

fn kinds(o: &Outcome) -> Vec<(char, u16)> {
    o.results
        .iter()
        .map(|r| match r {
            RcptResult::Delivered(x) => ('D', x.code),
            RcptResult::Deferred(x) => ('T', x.code),
            RcptResult::Failed(x) => ('F', x.code),
        })
        .collect()
}

#[test]
fn by_mx_preference_with_failover_and_the_body_arrives_intact() {
    let dns = DnsServer::start(zone());
    let mx = start_mx(Faults {
        verify: false,
        ..Faults::default()
    });
    let o = run(
        dns.addr,
        mx.addr.port(),
        Destination::Mx("example.test".into()),
        tx(&["x@example.test", "y@example.test"]),
    );
    assert_eq!(kinds(&o), [('D', 250), ('D', 250)]);
    assert_eq!(
        o.relay.as_deref(),
        Some(format!("up.example.test[127.0.0.2]:{}", mx.addr.port()).as_str())
    );
    assert_eq!(
        mx.counters.accepted.load(Ordering::SeqCst),
        1,
        "one transaction for both recipients"
    );
    assert_eq!(
        mx.counters.crc_xor.load(Ordering::SeqCst),
        crc32c::crc32c(MESSAGE) as u64,
        "byte-identical"
    );
}

#[test]
fn implicit_mx_null_mx_and_nxdomain() {
    let dns = DnsServer::start(zone());
    let mx = start_mx(Faults::default());
    let o = run(
        dns.addr,
        mx.addr.port(),
        Destination::Mx("implicit.test".into()),
        tx(&["x@implicit.test"]),
    );
    assert_eq!(kinds(&o), [('D', 250)]);
    let o = run(
        dns.addr,
        mx.addr.port(),
        Destination::Mx("nullmx.test".into()),
        tx(&["x@nullmx.test"]),
    );
    assert_eq!(kinds(&o), [('F', 556)]);
    let RcptResult::Failed(r) = &o.results[0] else {
        panic!()
    };
    assert_eq!(r.enhanced, Some((5, 1, 10)));
    let o = run(
        dns.addr,
        mx.addr.port(),
        Destination::Mx("nowhere.test".into()),
        tx(&["x@nowhere.test"]),
    );
    assert_eq!(kinds(&o), [('F', 550)]);
    assert_eq!(mx.counters.accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn refusals_and_unreachable_hosts() {
    let dns = DnsServer::start(zone());
    let mx = start_mx(Faults {
        permfail_permille: 1000,
        ..Faults::default()
    });
    let o = run(
        dns.addr,
        mx.addr.port(),
        Destination::Route("127.0.0.2".into(), mx.addr.port()),
        tx(&["x@any.test"]),
    );
    assert_eq!(kinds(&o), [('F', 554)]);
    let tmp = start_mx(Faults {
        tempfail_permille: 1000,
        ..Faults::default()
    });
    let o = run(
        dns.addr,
        tmp.addr.port(),
        Destination::Route("127.0.0.2".into(), tmp.addr.port()),
        tx(&["x@any.test"]),
    );
    assert_eq!(kinds(&o), [('T', 451)]);
    // Nothing listens on 127.0.0.3: deferred, with the reason.
    let o = run(
        dns.addr,
        mx.addr.port(),
        Destination::Route("127.0.0.3".into(), mx.addr.port()),
        tx(&["x@any.test"]),
    );
    assert_eq!(kinds(&o), [('T', 451)]);
    let RcptResult::Deferred(r) = &o.results[0] else {
        panic!()
    };
    assert!(
        r.text.contains("127.0.0.3") && r.enhanced == Some((4, 4, 1)),
        "{r:?}"
    );
}

/// RFC 5321 §5.1: hosts of equal preference are tried in random order, so two equal
/// MX hosts share the mail. The attempts run one after another with one connection
/// pool, as the scheduler runs them: the pool is keyed by host address, so reuse
/// follows the host the shuffle picked and does not pin the domain to one host.
#[test]
fn equal_preference_mx_hosts_share_the_mail() {
    let dns = DnsServer::start(
        Zone::default()
            .mx("equal.test", 10, "mx-a.equal.test")
            .mx("equal.test", 10, "mx-b.equal.test")
            .a("mx-a.equal.test", "127.0.0.2")
            .a("mx-b.equal.test", "127.0.0.3"),
    );
    let (a, b) = Sink::pair(
        "127.0.0.2".parse().unwrap(),
        "127.0.0.3".parse().unwrap(),
        Faults::default(),
    );
    let port = a.addr.port();
    const MESSAGES: u64 = 200;
    let dns_addr = dns.addr;
    let delivered = glommio::LocalExecutor::default().run(async move {
        let ring = Ring::start().unwrap();
        let resolver = Resolver::new(vec![dns_addr], Duration::from_millis(500), 2);
        let cfg = AttemptConfig {
            helo: "ringmail.test".into(),
            mx_port: port,
            timeouts: short_timeouts(),
            tls: OutboundTls::new(vec![], None).unwrap(),
        };
        let pool = Pool::new(100, Duration::from_secs(5));
        let message = MessageText {
            prefix: Vec::new(),
            body: MESSAGE.to_vec().into(),
        };
        let mut delivered = 0;
        for _ in 0..MESSAGES {
            let o = attempt(
                &ring,
                &pool,
                &resolver,
                &cfg,
                &Destination::Mx("equal.test".into()),
                &tx(&["x@equal.test"]),
                &message,
            )
            .await;
            delivered += u64::from(kinds(&o) == [('D', 250)]);
        }
        delivered
    });
    assert_eq!(delivered, MESSAGES);
    let (to_a, to_b) = (a.accepted(), b.accepted());
    assert_eq!(to_a + to_b, MESSAGES);
    // Binomial(200, 1/2): outside 70..=130 once in ~30 000 runs.
    for (host, n) in [("127.0.0.2", to_a), ("127.0.0.3", to_b)] {
        assert!(
            (MESSAGES * 35 / 100..=MESSAGES * 65 / 100).contains(&n),
            "{host} got {n} of {MESSAGES} (127.0.0.2: {to_a}, 127.0.0.3: {to_b})"
        );
    }
}

/// The server end to end: `args` are extra `serve` flags; one message from a relay
/// client (127.0.0.1 is in the default relay networks).
fn serve_one(args: &[&str], mail_from: &str, rcpt_to: &str) -> ringmail_tests::Server {
    let server = ringmail_tests::Server::start(args);
    let mut c = server.connect();
    c.reply();
    c.send(
        format!("EHLO client.test\r\nMAIL FROM:{mail_from}\r\nRCPT TO:<{rcpt_to}>\r\nDATA\r\n")
            .as_bytes(),
    );
    let codes = c.codes(4);
    assert_eq!(codes, [250, 250, 250, 354], "{}", server.log_text());
    c.send(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    assert!(ringmail_tests::queued_id(&c.reply()).is_some());
    server
}

/// `user@[127.0.0.2]` goes to 127.0.0.2 on the MX port, asking no DNS.
#[test]
fn a_domain_literal_is_delivered_to_its_address_without_dns() {
    let dns = DnsServer::start(zone());
    let (mx, got) = recording_mx();
    let (dns_addr, port) = (dns.addr.to_string(), mx.port().to_string());
    let _server = serve_one(
        &["--dns", &dns_addr, "--mx-port", &port, "--cores", "1"],
        "<a@src.test>",
        "user@[127.0.0.2]",
    );
    let got = recorded(got);
    assert_eq!(got.messages.len(), 1, "{:?}", got.commands);
    assert!(
        got.commands
            .iter()
            .any(|c| c == "RCPT TO:<user@[127.0.0.2]>"),
        "{:?}",
        got.commands
    );
    assert_eq!(
        dns.queries.load(Ordering::SeqCst),
        0,
        "no DNS for a literal"
    );
}

/// `user@bücher.test` (SMTPUTF8) is looked up as `xn--bcher-kva.test` and handed to
/// a server without SMTPUTF8 with the A-label, the sender's domain converted too.
#[test]
fn an_internationalised_domain_goes_as_its_a_label_to_a_server_without_smtputf8() {
    let dns = DnsServer::start(
        Zone::default()
            .mx("xn--bcher-kva.test", 10, "mx.xn--bcher-kva.test")
            .a("mx.xn--bcher-kva.test", "127.0.0.2"),
    );
    let (mx, got) = recording_mx();
    let (dns_addr, port) = (dns.addr.to_string(), mx.port().to_string());
    let _server = serve_one(
        &["--dns", &dns_addr, "--mx-port", &port, "--cores", "1"],
        "<a@exämple.test> SMTPUTF8",
        "user@bücher.test",
    );
    let got = recorded(got);
    assert_eq!(got.messages.len(), 1, "{:?}", got.commands);
    let mail = got.commands.iter().find(|c| c.starts_with("MAIL"));
    assert_eq!(
        mail.map(|m| m.split(' ').next_back().unwrap_or_default() != "SMTPUTF8"),
        Some(true),
        "{:?}",
        got.commands
    );
    assert!(
        mail.is_some_and(|m| m.starts_with("MAIL FROM:<a@xn--exmple-cua.test>")),
        "{:?}",
        got.commands
    );
    assert!(
        got.commands
            .iter()
            .any(|c| c == "RCPT TO:<user@xn--bcher-kva.test>"),
        "{:?}",
        got.commands
    );
}

/// A non-ASCII local part has no form without SMTPUTF8: refused for good, 5.6.7.
#[test]
fn a_non_ascii_local_part_to_a_server_without_smtputf8_fails_with_5_6_7() {
    let dns = DnsServer::start(
        Zone::default()
            .mx("xn--bcher-kva.test", 10, "mx.xn--bcher-kva.test")
            .a("mx.xn--bcher-kva.test", "127.0.0.2"),
    );
    let (mx, got) = recording_mx();
    let mut t = tx(&["üser@bücher.test"]);
    t.smtputf8 = true;
    let o = run(
        dns.addr,
        mx.port(),
        Destination::Mx("bücher.test".into()),
        t,
    );
    assert_eq!(kinds(&o), [('F', 553)]);
    let RcptResult::Failed(r) = &o.results[0] else {
        panic!()
    };
    assert_eq!(r.enhanced, Some((5, 6, 7)), "{r:?}");
    let got = recorded(got);
    assert!(
        !got.commands.iter().any(|c| c.starts_with("RCPT")),
        "{:?}",
        got.commands
    );
}

/// An MX that refuses every RCPT (550, then 450) yet answers 354 to the pipelined
/// DATA, as some do. Returns the text it received after its 354, up to and
/// including the end marker (or whatever came before the connection closed).
fn refusing_mx() -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    use std::io::{BufRead, Write};
    scripted_mx(Duration::from_secs(10), move |mut r, mut w| {
        w.write_all(b"220 refusing.test ESMTP\r\n").unwrap();
        let mut rcpts = 0;
        let mut line = Vec::new();
        loop {
            line.clear();
            if !matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                return Vec::new();
            }
            let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
            let reply: &[u8] = if cmd.starts_with("EHLO") {
                b"250-refusing.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
            } else if cmd.starts_with("RCPT") {
                rcpts += 1;
                if rcpts == 1 {
                    b"550 5.1.1 no such user\r\n"
                } else {
                    b"450 4.2.1 mailbox busy\r\n"
                }
            } else if cmd.starts_with("DATA") {
                w.write_all(b"354 go ahead\r\n").unwrap();
                let mut text = Vec::new();
                while !(text == b".\r\n" || text.ends_with(b"\r\n.\r\n")) {
                    if !matches!(r.read_until(b'\n', &mut text), Ok(n) if n > 0) {
                        return text;
                    }
                }
                w.write_all(b"554 5.5.1 no valid recipients\r\n").unwrap();
                return text;
            } else {
                b"250 2.0.0 ok\r\n"
            };
            w.write_all(reply).unwrap();
        }
    })
}

#[test]
fn a_354_after_every_rcpt_was_refused_ends_the_attempt_at_once() {
    let (addr, mx) = refusing_mx();
    let started = std::time::Instant::now();
    let o = run(
        "127.0.0.1:9".parse().unwrap(),
        addr.port(),
        Destination::Route("127.0.0.2".into(), addr.port()),
        tx(&["x@example.test", "y@example.test"]),
    );
    let elapsed = started.elapsed();
    assert_eq!(
        mx.join().unwrap(),
        b".\r\n",
        "an empty message, not a command as text"
    );
    assert_eq!(kinds(&o), [('F', 550), ('T', 450)], "by their RCPT replies");
    assert!(
        elapsed < Duration::from_secs(4),
        "no wait for a reply timeout: {elapsed:?}"
    );
}

/// An MX that sends its greeting one byte every 100 ms (each read gets a byte long
/// before any idle timer fires), then answers like `plain_mx`. Returns whether the
/// client closed the connection while the greeting was still trickling.
fn trickling_mx() -> (SocketAddr, std::thread::JoinHandle<bool>) {
    use std::io::{BufRead, Write};
    scripted_mx(Duration::from_secs(10), move |mut r, mut w| {
        // The pace is the behaviour under test, not a synchronisation.
        for b in b"220 trickle.test ESMTP\r\n" {
            std::thread::sleep(Duration::from_millis(100));
            if w.write_all(std::slice::from_ref(b)).is_err() {
                return true;
            }
        }
        let mut line = Vec::new();
        loop {
            line.clear();
            if !matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                return false;
            }
            let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
            let reply: &[u8] = if cmd.starts_with("DATA") {
                w.write_all(b"354 go ahead\r\n").unwrap();
                let mut text = Vec::new();
                while !text.ends_with(b"\r\n.\r\n") {
                    if !matches!(r.read_until(b'\n', &mut text), Ok(n) if n > 0) {
                        return false;
                    }
                }
                b"250 2.0.0 taken\r\n"
            } else if cmd.starts_with("QUIT") {
                let _ = w.write_all(b"221 bye\r\n");
                return false;
            } else {
                b"250 ok\r\n"
            };
            if w.write_all(reply).is_err() {
                return false;
            }
        }
    })
}

/// An MX that takes MAIL and RCPT but never answers the (pipelined) DATA. Returns
/// whether it then saw the client close the connection.
fn silent_at_data_mx() -> (SocketAddr, std::thread::JoinHandle<bool>) {
    use std::io::{BufRead, Write};
    // Bounds the test if the client never gives up.
    scripted_mx(Duration::from_secs(20), move |mut r, mut w| {
        w.write_all(b"220 silent.test ESMTP\r\n").unwrap();
        let mut line = Vec::new();
        let mut in_data = false;
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            if in_data {
                continue;
            }
            let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
            if cmd.starts_with("DATA") {
                in_data = true;
                continue;
            }
            let reply: &[u8] = if cmd.starts_with("EHLO") {
                b"250-silent.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
            } else {
                b"250 2.0.0 ok\r\n"
            };
            w.write_all(reply).unwrap();
        }
    })
}

fn deferred_reason(o: &Outcome) -> String {
    let texts: Vec<String> = o
        .results
        .iter()
        .map(|r| match r {
            RcptResult::Deferred(x) => x.to_line(),
            other => panic!("not deferred: {other:?}"),
        })
        .collect();
    texts[0].clone()
}

#[test]
fn a_greeting_that_trickles_in_times_out_per_reply_not_per_read() {
    let (addr, mx) = trickling_mx();
    let t = DeliveryTimeouts {
        greeting: Duration::from_millis(300),
        ..short_timeouts()
    };
    let (o, idle) = run_timed(addr.port(), tx(&["x@example.test"]), t);
    let why = deferred_reason(&o);
    assert!(
        why.contains("timed out") && why.contains("greeting"),
        "{why}"
    );
    assert!(mx.join().unwrap(), "the client closed the connection");
    assert_eq!(idle, 0);
}

#[test]
fn a_server_that_never_answers_data_defers_and_the_connection_is_closed() {
    let (addr, mx) = silent_at_data_mx();
    let t = DeliveryTimeouts {
        data_init: Duration::from_millis(300),
        ..short_timeouts()
    };
    let (o, idle) = run_timed(addr.port(), tx(&["x@example.test", "y@example.test"]), t);
    assert_eq!(kinds(&o), [('T', 451), ('T', 451)]);
    let why = deferred_reason(&o);
    assert!(why.contains("timed out") && why.contains("DATA"), "{why}");
    assert_eq!(idle, 0, "a timed-out connection is never pooled");
    assert!(mx.join().unwrap(), "the server saw the connection close");
}

#[test]
fn the_whole_attempt_has_a_ceiling() {
    // Every reply would be within its own limit; the attempt as a whole is not.
    let (addr, mx) = trickling_mx();
    let t = DeliveryTimeouts {
        attempt: Duration::from_millis(400),
        ..short_timeouts()
    };
    let (o, idle) = run_timed(addr.port(), tx(&["x@example.test"]), t);
    let why = deferred_reason(&o);
    assert!(
        why.contains("timed out") && why.contains("attempt"),
        "{why}"
    );
    assert!(mx.join().unwrap());
    assert_eq!(idle, 0);
}

/// Limits of a few seconds (the test sets the one it exercises lower).
fn short_timeouts() -> DeliveryTimeouts {
    DeliveryTimeouts {
        connect: Duration::from_secs(2),
        greeting: Duration::from_secs(5),
        command: Duration::from_secs(5),
        rcpt: Duration::from_secs(5),
        data_init: Duration::from_secs(5),
        data_block: Duration::from_secs(5),
        data_done: Duration::from_secs(5),
        attempt: Duration::from_secs(30),
    }
}

/// One attempt to the MX on 127.0.0.2:`port` with `timeouts`; also returns the
/// connections left in the pool.
fn run_timed(port: u16, tx: Transaction, timeouts: DeliveryTimeouts) -> (Outcome, usize) {
    glommio::LocalExecutor::default().run(async move {
        let ring = Ring::start().unwrap();
        let resolver = Resolver::new(
            vec!["127.0.0.1:9".parse().unwrap()],
            Duration::from_millis(500),
            2,
        );
        let cfg = AttemptConfig {
            helo: "ringmail.test".into(),
            mx_port: port,
            timeouts,
            tls: OutboundTls::new(vec![], None).unwrap(),
        };
        let pool = Pool::new(100, Duration::from_secs(5));
        let o = attempt(
            &ring,
            &pool,
            &resolver,
            &cfg,
            &Destination::Route("127.0.0.2".into(), port),
            &tx,
            &MessageText {
                prefix: Vec::new(),
                body: MESSAGE.to_vec().into(),
            },
        )
        .await;
        (o, pool.idle_connections())
    })
}

fn idn_zone() -> DnsServer {
    DnsServer::start(
        Zone::default()
            .mx("xn--bcher-kva.test", 10, "mx.xn--bcher-kva.test")
            .a("mx.xn--bcher-kva.test", "127.0.0.2"),
    )
}

/// One recipient with a UTF-8 local part does not sink the others: the ones with
/// an ASCII form go in the ASCII transaction, only it fails with 5.6.7.
#[test]
fn only_the_recipient_without_an_ascii_form_fails_without_smtputf8() {
    let dns = idn_zone();
    let (mx, got) = recording_mx();
    let mut t = tx(&["üser@bücher.test", "user@bücher.test", "other@bücher.test"]);
    t.smtputf8 = true;
    let o = run(
        dns.addr,
        mx.port(),
        Destination::Mx("bücher.test".into()),
        t,
    );
    assert_eq!(kinds(&o), [('F', 553), ('D', 250), ('D', 250)]);
    let RcptResult::Failed(r) = &o.results[0] else {
        panic!()
    };
    assert_eq!(r.enhanced, Some((5, 6, 7)), "{r:?}");
    let got = recorded(got);
    let rcpts: Vec<&String> = got
        .commands
        .iter()
        .filter(|c| c.starts_with("RCPT"))
        .collect();
    assert_eq!(
        rcpts,
        [
            "RCPT TO:<user@xn--bcher-kva.test>",
            "RCPT TO:<other@xn--bcher-kva.test>"
        ],
        "{:?}",
        got.commands
    );
}

/// UTF-8 headers (RFC 6532) make the message internationalised whatever its
/// envelope: it never goes to a server without SMTPUTF8 (5.6.7), while the same
/// message with ASCII headers, SMTPUTF8 or not, does.
#[test]
fn utf8_headers_need_smtputf8_and_ascii_ones_do_not() {
    let dns = idn_zone();
    let utf8 = "From: Jöran <a@src.test>\r\nSubject: hi\r\n\r\nbody\r\n".as_bytes();
    let (mx, got) = recording_mx();
    let mut t = tx(&["user@bücher.test"]);
    t.smtputf8 = true;
    let dest = || Destination::Mx("bücher.test".into());
    let o = run_message(dns.addr, mx.port(), dest(), t.clone(), b"", utf8.to_vec());
    assert_eq!(kinds(&o), [('F', 553)]);
    let RcptResult::Failed(r) = &o.results[0] else {
        panic!()
    };
    assert_eq!(r.enhanced, Some((5, 6, 7)), "{r:?}");
    assert!(!recorded(got).commands.iter().any(|c| c.starts_with("MAIL")));
    // All ASCII, envelope and headers, with the SMTPUTF8 keyword: it is not needed.
    let (mx, got) = recording_mx();
    let mut t = tx(&["user@b.test"]);
    t.smtputf8 = true;
    let o = run(
        dns.addr,
        mx.port(),
        Destination::Literal([127, 0, 0, 2].into()),
        t,
    );
    assert_eq!(kinds(&o), [('D', 250)]);
    assert_eq!(recorded(got).messages.len(), 1);
}

fn wait_for_log(server: &ringmail_tests::Server, what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = server.log_text();
        if log.contains(what) {
            return log;
        }
        assert!(std::time::Instant::now() < deadline, "no {what:?} in {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// End to end: a message with a UTF-8 `From:` and an envelope that has an ASCII
/// form is not sent to a server without SMTPUTF8 with raw UTF-8 headers: it fails
/// 553 5.6.7 and bounces.
#[test]
fn a_utf8_from_header_to_a_server_without_smtputf8_bounces_with_5_6_7() {
    let dns = idn_zone();
    let (mx, got) = recording_mx();
    let (dns_addr, port) = (dns.addr.to_string(), mx.port().to_string());
    let server =
        ringmail_tests::Server::start(&["--dns", &dns_addr, "--mx-port", &port, "--cores", "1"]);
    let mut c = server.connect();
    c.reply();
    c.send(
        "EHLO client.test\r\nMAIL FROM:<a@src.test> SMTPUTF8\r\nRCPT TO:<user@bücher.test>\r\nDATA\r\n"
            .as_bytes(),
    );
    assert_eq!(c.codes(4), [250, 250, 250, 354], "{}", server.log_text());
    c.send("From: Jöran <a@src.test>\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n".as_bytes());
    assert!(ringmail_tests::queued_id(&c.reply()).is_some());
    let got = recorded(got);
    assert!(
        !got.commands.iter().any(|c| c.starts_with("MAIL")),
        "{:?}",
        got.commands
    );
    let log = wait_for_log(&server, "bounce queued");
    assert!(log.contains("status=bounced (553 5.6.7"), "{log}");
}

/// An MX on 127.0.0.2 that offers STARTTLS and, when it is taken, says 220 and then
/// sends no TLS but a line of text, as a broken TLS setup does. It serves
/// `connections` connections and yields, per connection, whether a message came.
fn broken_tls_mx(connections: usize) -> (SocketAddr, std::thread::JoinHandle<Vec<bool>>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..connections {
            let (conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut w = conn.try_clone().unwrap();
            let mut r = std::io::BufReader::new(conn);
            w.write_all(b"220 broken.test ESMTP\r\n").unwrap();
            let mut got = false;
            let mut line = Vec::new();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                    break;
                }
                let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
                let reply: &[u8] = if cmd.starts_with("EHLO") {
                    b"250-broken.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
                } else if cmd.starts_with("STARTTLS") {
                    let _ = w.write_all(b"220 ready\r\nthis is not TLS\r\n");
                    break;
                } else if cmd.starts_with("DATA") {
                    w.write_all(b"354 go ahead\r\n").unwrap();
                    let mut text = Vec::new();
                    while !text.ends_with(b"\r\n.\r\n") {
                        if r.read_until(b'\n', &mut text).unwrap() == 0 {
                            break;
                        }
                    }
                    got = true;
                    b"250 2.0.0 taken\r\n"
                } else if cmd.starts_with("QUIT") {
                    let _ = w.write_all(b"221 bye\r\n");
                    break;
                } else {
                    b"250 ok\r\n"
                };
                if w.write_all(reply).is_err() {
                    break;
                }
            }
            seen.push(got);
        }
        seen
    });
    (addr, t)
}

#[test]
fn a_failed_starttls_handshake_falls_back_to_plaintext_only_under_may() {
    let policy = |level: &str| {
        OutboundTls::new(vec![("example.test".into(), level.parse().unwrap())], None).unwrap()
    };
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let route = |addr: SocketAddr| Destination::Route(addr.ip().to_string(), addr.port());

    // One attempt under `level` to an MX serving `connections` connections: the
    // outcome, and whether each connection carried a message.
    let attempt = |level: &str, connections: usize| {
        let (addr, mx) = broken_tls_mx(connections);
        let o = run_full(
            nowhere,
            addr.port(),
            route(addr),
            tx(&["x@example.test"]),
            b"",
            MESSAGE.to_vec(),
            policy(level),
        );
        (o, mx.join().unwrap())
    };

    // may: the handshake fails, the same host takes the message in plaintext on a
    // second connection, without STARTTLS.
    let (o, carried) = attempt("may", 2);
    assert!(matches!(o.results[..], [RcptResult::Delivered(_)]), "{o:?}");
    assert_eq!(o.tls, None, "delivered in plaintext");
    assert_eq!(carried, [false, true]);

    // encrypt: no plaintext fallback; deferred, saying why, as a security failure.
    let (o, carried) = attempt("encrypt", 1);
    match &o.results[..] {
        [RcptResult::Deferred(r)] => {
            assert!(r.text.contains("TLS handshake failed"), "{r:?}");
            assert_eq!(r.enhanced, Some((4, 7, 5)), "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(carried, [false]);

    // none: never STARTTLS, though offered.
    let (o, carried) = attempt("none", 1);
    assert!(matches!(o.results[..], [RcptResult::Delivered(_)]), "{o:?}");
    assert_eq!(carried, [true]);
}
