//! One delivery attempt end to end: DNS from a server in the test process, fake MX
//! hosts on 127.0.0.2/127.0.0.3 (ringmail-sink, or nothing listening), real SMTP.

use ringmail::delivery::attempt::{attempt, AttemptConfig, Destination, Outcome, Pool};
use ringmail::dns::resolver::Resolver;
use ringmail::net::Ring;
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
    glommio::LocalExecutor::default().run(async move {
        let ring = Ring::start().unwrap();
        let resolver = Resolver::new(vec![dns], Duration::from_millis(500), 2);
        let cfg = AttemptConfig {
            helo: "ringmail.test".into(),
            mx_port: port,
            connect_timeout: Duration::from_secs(2),
            reply_timeout: Duration::from_secs(5),
        };
        let pool = Pool::new(100, Duration::from_secs(5));
        attempt(
            &ring,
            &pool,
            &resolver,
            &cfg,
            &dest,
            &tx,
            &std::rc::Rc::new(MESSAGE.to_vec()),
        )
        .await
    })
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
