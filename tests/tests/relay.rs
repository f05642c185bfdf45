//! The server as a relay, end to end: the built binary, a DNS server in the test
//! process, and ringmail-sink as the remote MX hosts on 127.0.0.2/127.0.0.3.

use ringmail_bench::load::{Plan, SmtpRun, TlsMode};
use ringmail_bench::sink::Faults;
use ringmail_tests::dns::{DnsServer, Zone};
use ringmail_tests::sink::Sink;
use ringmail_tests::{queued_id, Server};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// One port bound on both 127.0.0.2 and 127.0.0.3 (MX hosts share the MX port), the
/// listeners kept until a sink takes them: a port only looked up and passed on could be
/// taken by another test before the sink binds it.
struct MxPort {
    port: u16,
    listeners: [Option<std::net::TcpListener>; 2],
}

fn mx_port() -> MxPort {
    loop {
        let first = ringmail_bench::sink::bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let port = first.local_addr().unwrap().port();
        if let Ok(second) = ringmail_bench::sink::bind(SocketAddr::from(([127, 0, 0, 3], port))) {
            return MxPort {
                port,
                listeners: [Some(first), Some(second)],
            };
        }
    }
}

/// A ringmail-sink as an MX host on 127.0.0.`host` (2 or 3), on the shared MX port.
fn mx_sink(host: u8, mx: &mut MxPort, faults: Faults) -> Sink {
    let listener = mx.listeners[usize::from(host - 2)]
        .take()
        .expect("one sink per MX host");
    Sink::serve(listener, faults)
}

fn zone() -> Zone {
    Zone::default()
        .mx("dst.test", 10, "down.dst.test")
        .mx("dst.test", 20, "up.dst.test")
        .a("down.dst.test", "127.0.0.4")
        .a("up.dst.test", "127.0.0.2")
        .a("src.test", "127.0.0.3")
        .a("implicit.test", "127.0.0.2")
        .mx("nullmx.test", 0, ".")
        .mx("nohost.test", 10, "gone.nohost.test")
}

/// The relay under test, sending to the MX port of `mx`. Listeners no sink took are
/// closed here: an MX host without a sink refuses connections, as a down host does.
fn relay(dns: &DnsServer, mx: MxPort, extra: &[&str]) -> Server {
    let dns = dns.addr.to_string();
    let port = mx.port.to_string();
    drop(mx);
    let mut args = vec!["--dns", &dns, "--mx-port", &port, "--cores", "1"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn send(server: &Server, from: &str, to: &str, body: &str) -> String {
    let mut c = server.connect();
    c.reply();
    c.send(
        format!("EHLO client.test\r\nMAIL FROM:<{from}>\r\nRCPT TO:<{to}>\r\nDATA\r\n").as_bytes(),
    );
    assert_eq!(c.codes(4)[3], 354);
    c.send(format!("{body}.\r\nQUIT\r\n").as_bytes());
    let id = queued_id(&c.reply()).expect("queued");
    c.reply();
    id
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn relays_by_mx_preference_with_failover_and_the_message_leaves_the_queue() {
    let dns = DnsServer::start(zone());
    let mut mx = mx_port();
    let up = mx_sink(
        2,
        &mut mx,
        Faults {
            verify: true,
            ..Faults::default()
        },
    );
    // Small segments, so that compaction has finished ones to delete (a segment must
    // hold the largest message record: small messages and few recipients).
    let server = relay(
        &dns,
        mx,
        &[
            "--segment-size",
            "1048576",
            "--message-size-max",
            "65536",
            "--recipients-max",
            "100",
        ],
    );
    // 1000 messages through the relay, each with a checksum the sink verifies.
    let plan = Plan {
        from: "load@src.test".into(),
        to: vec!["a@dst.test".into(), "b@implicit.test".into()],
        domains: vec![],
        rcpts_per_message: 0,
        size_min: 100,
        size_max: 20_000,
        per_connection: 0,
        pipelining: true,
        bdat: false,
        lmtp: false,
        to_cycle: None,
        helo: "client.test".into(),
        tls: TlsMode::Plain,
        auth: None,
        dkim: None,
    };
    let report = SmtpRun {
        target: server.addr,
        sessions: 4,
        threads: 1,
        spin: Duration::ZERO,
        messages: 1000,
        plan,
        max_duration: Duration::from_secs(60),
    }
    .run()
    .unwrap();
    assert_eq!(report.stats.ok, 1000);
    // Each message goes out twice: once to dst.test's MX, once to implicit.test.
    wait_until("2000 deliveries", 120, || up.accepted() >= 2000);
    wait_until("an empty queue", 30, || server.queue().is_empty());
    assert_eq!(up.accepted(), 2000);
    assert_eq!(
        up.counters.verified.load(Ordering::SeqCst),
        2000,
        "every body arrived intact"
    );
    assert_eq!(up.counters.corrupt.load(Ordering::SeqCst), 0);
    assert!(
        server.log_text().contains("relay=up.dst.test[127.0.0.2]"),
        "MX 10 is down, MX 20 took it"
    );
    // Connections are reused: far fewer than one per message.
    let connections = up.counters.connections.load(Ordering::SeqCst);
    assert!(
        connections < 200,
        "{connections} connections for 2000 deliveries"
    );
    // Space comes back: ~10 MiB went through; the finished segments are deleted.
    let bytes = || -> u64 {
        std::fs::read_dir(server.data.join("shard-0"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    assert!(bytes() > 0);
    // (The log line comes right after the files are gone: wait for both.)
    wait_until("compaction", 30, || {
        bytes() <= 2 * 1_048_576 && server.log_text().contains("compacted")
    });
}

#[test]
fn permanent_failures_bounce_to_the_sender_and_null_mx_bounces_at_once() {
    let dns = DnsServer::start(zone());
    let mut mx = mx_port();
    let refusing = mx_sink(
        2,
        &mut mx,
        Faults {
            permfail_permille: 1000,
            ..Faults::default()
        },
    );
    let sender_mx = mx_sink(3, &mut mx, Faults::default());
    let server = relay(&dns, mx, &[]);
    send(
        &server,
        "alice@src.test",
        "x@dst.test",
        "Subject: refused\r\n\r\nhello\r\n",
    );
    send(
        &server,
        "alice@src.test",
        "y@nullmx.test",
        "Subject: null mx\r\n\r\nhello\r\n",
    );
    // An MX whose host does not exist: unusable, an error at once (RFC 5321 §5.1),
    // not a retry until the message expires.
    send(
        &server,
        "alice@src.test",
        "z@nohost.test",
        "Subject: no host\r\n\r\nhello\r\n",
    );
    // Three bounces reach the sender's domain (implicit MX 127.0.0.3).
    wait_until("three bounces", 30, || sender_mx.accepted() >= 3);
    wait_until("an empty queue", 30, || server.queue().is_empty());
    assert_eq!(refusing.counters.permfailed.load(Ordering::SeqCst), 1);
    let log = server.log_text();
    assert!(log.contains("status=bounced (554 5.3.0"), "{log}");
    assert!(log.contains("status=bounced (556 5.1.10"), "{log}");
    assert!(log.contains("status=bounced (550 5.4.4 no mail host of nohost.test has an address (gone.nohost.test: no address"), "{log}");
    assert_eq!(log.matches("bounce queued").count(), 3);
}

#[test]
fn a_temporary_failure_is_retried_and_the_schedule_survives_a_restart() {
    let dns = DnsServer::start(zone());
    let mut mx = mx_port();
    let sink = mx_sink(
        2,
        &mut mx,
        Faults {
            tempfail_first: 1,
            ..Faults::default()
        },
    );
    let mut server = relay(&dns, mx, &["--retry-first", "2"]);
    let id = send(
        &server,
        "alice@src.test",
        "x@dst.test",
        "Subject: retry\r\n\r\nhello\r\n",
    );
    wait_until("a deferral", 30, || {
        server
            .queue()
            .first()
            .is_some_and(|m| m["rcpt"][0]["status"] == "deferred")
    });
    let q = server.queue();
    assert_eq!(q[0]["id"], id.as_str());
    assert_eq!(q[0]["rcpt"][0]["attempts"], 1);
    assert!(q[0]["rcpt"][0]["reply"]
        .as_str()
        .unwrap()
        .starts_with("451 4.3.0"));
    // Killed while deferred: the restarted server keeps the schedule and delivers.
    server.kill9();
    server.restart();
    wait_until("the retry", 30, || sink.accepted() == 1);
    wait_until("an empty queue", 30, || server.queue().is_empty());
    assert_eq!(sink.counters.tempfailed.load(Ordering::SeqCst), 1);
}

#[test]
fn queue_flush_retries_deferred_mail_now() {
    let dns = DnsServer::start(zone());
    let mut mx = mx_port();
    let sink = mx_sink(
        2,
        &mut mx,
        Faults {
            tempfail_first: 1,
            ..Faults::default()
        },
    );
    let server = relay(&dns, mx, &["--retry-first", "3600"]);
    send(
        &server,
        "alice@src.test",
        "x@dst.test",
        "Subject: flush\r\n\r\nhello\r\n",
    );
    wait_until("a deferral", 30, || {
        server
            .queue()
            .first()
            .is_some_and(|m| m["rcpt"][0]["status"] == "deferred")
    });
    let next = server.queue()[0]["rcpt"][0]["next_attempt_ms"]
        .as_u64()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(next > now + 2_000_000, "deferred for most of an hour");
    let out = ringmail_tests::run_ok(
        std::process::Command::new(ringmail_tests::binary())
            .args(["queue", "flush", "--data"])
            .arg(&server.data),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 deferred recipient(s) made due now"
    );
    wait_until("the flushed delivery", 30, || sink.accepted() == 1);
    wait_until("an empty queue", 30, || server.queue().is_empty());
}

#[test]
fn mail_that_stays_undeliverable_expires_and_bounces() {
    let dns = DnsServer::start(zone());
    let mut mx = mx_port();
    let _busy = mx_sink(
        2,
        &mut mx,
        Faults {
            tempfail_permille: 1000,
            ..Faults::default()
        },
    );
    let sender_mx = mx_sink(3, &mut mx, Faults::default());
    let server = relay(&dns, mx, &["--retry-first", "1", "--queue-age-max", "3"]);
    send(
        &server,
        "alice@src.test",
        "x@dst.test",
        "Subject: expires\r\n\r\nhello\r\n",
    );
    wait_until("the bounce", 40, || sender_mx.accepted() == 1);
    wait_until("an empty queue", 30, || server.queue().is_empty());
    let log = server.log_text();
    assert!(
        log.contains("status=expired (550 5.4.7 message expired after"),
        "{log}"
    );
}

#[test]
fn a_destination_rate_limit_spaces_the_deliveries() {
    let dns = DnsServer::start(zone());
    let mut mx = mx_port();
    let sink = mx_sink(2, &mut mx, Faults::default());
    let server = relay(&dns, mx, &["--destination-rate", "10"]);
    let t = Instant::now();
    for i in 0..25 {
        send(
            &server,
            "alice@src.test",
            "x@dst.test",
            &format!("Subject: {i}\r\n\r\nhello\r\n"),
        );
    }
    wait_until("25 deliveries", 60, || sink.accepted() == 25);
    // A burst of 10, then 10 a second: the last 15 take at least 1.5 s from the
    // first message, however fast they were sent.
    assert!(
        t.elapsed() >= Duration::from_millis(1300),
        "{:?}",
        t.elapsed()
    );
}

/// A slow MX in test threads: answers each message 150 ms after its text (the first
/// only once a second transaction is open), and keeps
/// the highest number of transactions it saw open at once.
fn slow_mx() -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (active, max, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (m, d) = (max.clone(), done.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (active, max, done) = (active.clone(), max.clone(), done.clone());
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let _ = w.write_all(b"220 slow.test\r\n");
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250 slow.test\r\n"
                    } else if cmd.starts_with("MAIL") {
                        let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        b"250 ok\r\n"
                    } else if cmd.starts_with("DATA") {
                        let _ = w.write_all(b"354 go\r\n");
                        let mut text = String::new();
                        while !text.ends_with("\r\n.\r\n") {
                            if r.read_line(&mut text).unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        // The first transaction is held until a second one is open, so
                        // that the cap is reached whatever the timing; every one is then
                        // held a little, the window in which a third would show up.
                        let deadline = Instant::now() + Duration::from_secs(20);
                        while max.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        std::thread::sleep(Duration::from_millis(150));
                        active.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::SeqCst);
                        b"250 taken\r\n"
                    } else if cmd.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n");
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    if w.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, m, d)
}

#[test]
fn concurrent_deliveries_are_capped_per_shard() {
    let (mx, max, done) = slow_mx();
    let dns = DnsServer::start(zone());
    let route = format!("*=127.0.0.2:{}", mx.port());
    let server = relay(
        &dns,
        mx_port(),
        &["--route", &route, "--deliveries-max", "2"],
    );
    // Ten destinations: without the cap all ten would be tried at once.
    for i in 0..10 {
        send(
            &server,
            "a@src.test",
            &format!("r@d{i}.test"),
            "Subject: cap\r\n\r\nhi\r\n",
        );
    }
    wait_until("ten deliveries", 30, || done.load(Ordering::SeqCst) == 10);
    assert_eq!(max.load(Ordering::SeqCst), 2, "two at a time, no more");
}

/// `x@[127.0.0.1]` (in any spelling) from a relay client would be delivered to this
/// host and queued again, forever: refused at RCPT.
#[test]
fn a_literal_of_the_server_itself_is_refused_at_rcpt() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.reply();
    c.send(
        b"EHLO client.test\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<x@[127.0.0.1]>\r\n\
          RCPT TO:<x@[IPv6:::1]>\r\nRCPT TO:<x@[IPv6:::ffff:127.0.0.1]>\r\n",
    );
    assert_eq!(c.codes(2), [250, 250]);
    for _ in 0..3 {
        let r = c.reply();
        assert!(
            r.starts_with("553 5.1.3") && r.contains("loops back to myself"),
            "{r}"
        );
    }
}

/// A route to a server that greets with our own name (here a second instance with
/// the same host name, as a copied configuration gives) is a loop: the mail
/// bounces with 554 5.4.6 and is never handed over.
#[test]
fn a_route_back_to_ourselves_bounces_with_5_4_6_instead_of_looping() {
    let twin = Server::start(&["--cores", "1"]);
    let route = format!("loop.test={}", twin.addr);
    let server = Server::start(&["--cores", "1", "--route", &route]);
    send(
        &server,
        "a@src.test",
        "x@loop.test",
        "Subject: hi\r\n\r\nbody\r\n",
    );
    wait_until("the bounce", 30, || {
        server.log_text().contains("bounce queued")
    });
    let log = server.log_text();
    assert!(
        log.contains("status=bounced (554 5.4.6 mail for 127.0.0.1 loops back to myself)"),
        "{log}"
    );
    assert!(twin.queue().is_empty(), "{}", twin.log_text());
}

/// A backup MX (this host, by its name, at preference 20) sends only to the better
/// ones (RFC 5321 §5.1): while the primary is down the mail waits, it never goes to
/// the host the backup's own name resolves to.
#[test]
fn a_backup_mx_waits_for_the_primary_and_never_sends_to_itself() {
    let dns = DnsServer::start(
        zone()
            .mx("backup.test", 10, "down.dst.test")
            .mx("backup.test", 20, "mx.ringmail.test")
            .a("mx.ringmail.test", "127.0.0.2"),
    );
    let mut mx = mx_port();
    // Where this host's name points: nothing may arrive here.
    let itself = mx_sink(2, &mut mx, Faults::default());
    let server = relay(&dns, mx, &[]);
    let id = send(
        &server,
        "a@src.test",
        "x@backup.test",
        "Subject: hi\r\n\r\nbody\r\n",
    );
    wait_until("the attempt", 30, || {
        server.log_text().contains("status=deferred")
    });
    let q = server.queue();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["id"], id.as_str());
    assert_eq!(q[0]["rcpt"][0]["status"], "deferred");
    assert_eq!(itself.accepted(), 0);
    assert!(!server.log_text().contains("loops back"));
}

/// A pooled connection left idle is closed after a QUIT (RFC 5321 §4.1.1.10), not
/// dropped (the pool keeps one 5 s; the upkeep looks every 2 s).
#[test]
fn an_idle_pooled_connection_is_closed_with_quit() {
    let dns = DnsServer::start(zone());
    let mut mx = mx_port();
    let up = mx_sink(2, &mut mx, Faults::default());
    let server = relay(&dns, mx, &[]);
    send(
        &server,
        "a@src.test",
        "x@implicit.test",
        "Subject: hi\r\n\r\nbody\r\n",
    );
    wait_until("the delivery", 30, || up.accepted() == 1);
    assert_eq!(
        up.counters.quits.load(Ordering::SeqCst),
        0,
        "kept for reuse"
    );
    wait_until("the QUIT of the idle connection", 30, || {
        up.counters.quits.load(Ordering::SeqCst) == 1
    });
}
