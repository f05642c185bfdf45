//! The shard resolver against a DNS server in the test process: MX by preference,
//! implicit MX, null MX, NXDOMAIN, SERVFAIL, failover to the second server, the cache,
//! TCP after a truncated UDP answer.

use hickory_proto::rr::RecordType;
use ringmail::dns::resolver::Resolver;
use ringmail::dns::{Answer, DnsError, Route};
use ringmail_tests::dns::{DnsServer, Zone};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn zone() -> Zone {
    let mut z = Zone::default()
        .mx("example.test", 20, "mx2.example.test")
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", "127.0.0.2")
        .a("mx2.example.test", "127.0.0.3")
        .a("implicit.test", "127.0.0.4")
        .mx("nullmx.test", 0, ".");
    z.servfail.insert("broken.test".into());
    z.silent.insert("silent.test".into());
    z
}

/// For servers that answer: long enough never to expire, so that a slow test machine
/// cannot turn an answer into a timeout. Only a silent server makes a resolver time out.
const ANSWERED: Duration = Duration::from_secs(10);

/// Waits until `n` queries were counted, then checks that no more came.
fn counted(queries: &std::sync::atomic::AtomicUsize, n: usize, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while queries.load(Ordering::SeqCst) < n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(queries.load(Ordering::SeqCst), n, "{what}");
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutor::default().run(f)
}

#[test]
fn mx_rules_against_a_real_server() {
    let server = DnsServer::start(zone());
    let r = Resolver::new(vec![server.addr], ANSWERED, 2);
    run(async {
        assert_eq!(
            r.mx_route("example.test", "me.test").await.unwrap(),
            Route::Hosts(vec!["mx1.example.test".into(), "mx2.example.test".into()])
        );
        assert_eq!(
            r.addresses("mx1.example.test").await.unwrap(),
            vec!["127.0.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            r.mx_route("implicit.test", "me.test").await.unwrap(),
            Route::Implicit
        );
        assert_eq!(
            r.mx_route("nullmx.test", "me.test").await.unwrap(),
            Route::NullMx
        );
        assert_eq!(
            r.mx_route("nowhere.test", "me.test").await.unwrap(),
            Route::NoSuchDomain
        );
        assert!(matches!(
            r.mx_route("broken.test", "me.test").await,
            Err(DnsError::ServerFailure(_))
        ));
        assert!(r.addresses("nowhere.test").await.unwrap().is_empty());
    });
}

#[test]
fn answers_are_cached_by_ttl() {
    let server = DnsServer::start(zone());
    let r = Resolver::new(vec![server.addr], ANSWERED, 1);
    run(async {
        for _ in 0..5 {
            assert!(matches!(
                r.lookup("example.test", RecordType::MX).await.unwrap(),
                Answer::Mx(_)
            ));
        }
    });
    assert_eq!(server.queries.load(Ordering::SeqCst), 1);
}

#[test]
fn a_silent_server_times_out_and_the_next_one_answers() {
    let dead = DnsServer::start(Zone {
        silent: ["example.test".to_string()].into(),
        ..zone()
    });
    let live = DnsServer::start(zone());
    // One timeout for both servers: it must expire for the silent one, and the live one
    // must answer within it, so it is a second, not a race with a few hundred ms.
    let r = Resolver::new(vec![dead.addr, live.addr], Duration::from_secs(1), 1);
    run(async {
        let t = std::time::Instant::now();
        assert!(matches!(
            r.mx_route("example.test", "me.test").await.unwrap(),
            Route::Hosts(_)
        ));
        assert!(
            t.elapsed() >= Duration::from_secs(1),
            "the first server was waited for"
        );
    });
    // The server's thread counts a query when it reads it, maybe after the resolver
    // gave up on it.
    counted(&dead.queries, 1, "the silent server was asked first");
    assert_eq!(live.queries.load(Ordering::SeqCst), 1);
    let only_dead = Resolver::new(vec![dead.addr], Duration::from_millis(100), 2);
    run(async {
        assert_eq!(
            only_dead.mx_route("example.test", "me.test").await,
            Err(DnsError::Timeout)
        );
    });
    counted(&dead.queries, 3, "both attempts asked the silent server");
}

#[test]
fn a_truncated_answer_is_asked_again_over_tcp() {
    let mut z = zone();
    // Many MX hosts: the kind of answer that outgrows a UDP datagram.
    for i in 0..40 {
        z = z.mx("big.test", 10 + i, &format!("mx{i}.big.test"));
    }
    z.truncate.insert("big.test".into());
    let server = DnsServer::start(z);
    let r = Resolver::new(vec![server.addr], ANSWERED, 1);
    run(async {
        let Route::Hosts(hosts) = r.mx_route("big.test", "me.test").await.unwrap() else {
            panic!("hosts expected");
        };
        assert_eq!(hosts.len(), 40);
        assert_eq!(hosts[0], "mx0.big.test");
        assert_eq!(hosts[39], "mx39.big.test");
        // Names that fit in UDP never touch TCP.
        r.mx_route("example.test", "me.test").await.unwrap();
    });
    assert_eq!(server.tcp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(server.queries.load(Ordering::SeqCst), 3, "UDP, TCP, UDP");
}

/// Lookups of one question that overlap share one query: the first asks, the others
/// wait for its answer (and all of them get it).
#[test]
fn concurrent_identical_lookups_send_one_query() {
    let server = DnsServer::start(zone());
    let r = Resolver::new(vec![server.addr], Duration::from_millis(500), 1);
    const N: usize = 10;
    let answers = run(async {
        let lookups: Vec<_> = (0..N)
            .map(|_| Box::pin(r.lookup("mx1.example.test", RecordType::A)))
            .collect();
        join_all(lookups).await
    });
    assert_eq!(answers.len(), N);
    for a in answers {
        assert_eq!(
            a.unwrap(),
            Answer::Addrs(vec!["127.0.0.2".parse().unwrap()])
        );
    }
    assert_eq!(
        server.queries.load(Ordering::SeqCst),
        1,
        "one query on the wire"
    );
}

/// Polls every future on each wake-up (the first pass polls them all before any can
/// have its answer), and returns their outputs in order.
async fn join_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futures.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}

/// The lookup that asks for a merged question is dropped before its answer (its
/// delivery attempt was cancelled): the lookup waiting on it wakes, asks itself,
/// and gets the answer, instead of waiting forever or sharing a cancellation.
#[test]
fn a_waiter_asks_itself_when_the_asking_lookup_is_dropped() {
    let server = DnsServer::start(zone());
    let r = Resolver::new(vec![server.addr], ANSWERED, 1);
    use std::future::Future;
    let got = run(async {
        let mut asker = Box::pin(r.lookup("mx1.example.test", RecordType::A));
        let mut waiter = Box::pin(r.lookup("mx1.example.test", RecordType::A));
        // One poll each: the first is on the wire, the second waits for it.
        std::future::poll_fn(|cx| {
            assert!(asker.as_mut().poll(cx).is_pending(), "no answer yet");
            assert!(waiter.as_mut().poll(cx).is_pending(), "merged, waiting");
            std::task::Poll::Ready(())
        })
        .await;
        drop(asker);
        glommio::timer::timeout(Duration::from_secs(30), async { Ok(waiter.await) })
            .await
            .expect("the waiter woke")
    });
    assert_eq!(
        got.unwrap(),
        Answer::Addrs(vec!["127.0.0.2".parse().unwrap()])
    );
    // The waiter's own query, and the dropped one's if it left before the drop.
    let q = server.queries.load(Ordering::SeqCst);
    assert!((1..=2).contains(&q), "{q} queries");
}
