//! The load generator (`ringmail-load`) and the sink (`ringmail-sink`), small counts:
//! what arrives must be exactly what was sent, by count and by content checksum.

use ringmail_bench::load::{session::message, Plan, SharedBudget, SmtpRun, TlsMode};
use ringmail_bench::sink::Faults;
use ringmail_tests::sink::Sink;
use ringmail_tests::Server;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn plan(per_connection: usize, pipelining: bool, bdat: bool) -> Plan {
    Plan {
        from: "load@client.test".into(),
        to: vec!["a@localhost".into(), "b@localhost".into()],
        domains: vec![],
        rcpts_per_message: 0,
        size_min: 100,
        size_max: 9000,
        per_connection,
        pipelining,
        bdat,
        lmtp: false,
        to_cycle: None,
        helo: "client.test".into(),
        tls: TlsMode::Plain,
        auth: None,
        dkim: None,
    }
}

fn run(target: SocketAddr, messages: u64, plan: Plan) -> ringmail_bench::load::Report {
    SmtpRun {
        target,
        sessions: 6,
        threads: 2,
        spin: Duration::from_micros(20),
        messages,
        plan,
        max_duration: Duration::from_secs(60),
    }
    .run()
    .unwrap()
}

/// CRC32C of every message the run sends, by sequence number.
fn expected(messages: u64, plan: &Plan) -> Vec<u32> {
    let budget = SharedBudget::new(messages, plan.size_min, plan.size_max);
    (0..messages)
        .map(|seq| crc32c::crc32c(&message(seq, budget.size_of(seq), &plan.from, &plan.to[0])))
        .collect()
}

#[test]
fn load_into_ringmail_arrives_whole() {
    let server = Server::start(&[]);
    for (per_connection, pipelining, bdat) in [(1, false, false), (7, true, false), (0, true, true)]
    {
        let before = server.queue().len();
        let p = plan(per_connection, pipelining, bdat);
        let report = run(server.addr, 120, p.clone());
        assert_eq!(
            (report.stats.ok, report.stats.errors),
            (120, 0),
            "mode {per_connection}/{pipelining}/{bdat}"
        );
        assert_eq!(report.stats.latency_us.len(), 120);
        let q = server.queue();
        assert_eq!(q.len(), before + 120);
        let mut got: HashMap<String, usize> = HashMap::new();
        for m in &q[before..] {
            assert_eq!(m["rcpt"].as_array().unwrap().len(), 2);
            *got.entry(m["crc32c"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        let mut want: HashMap<String, usize> = HashMap::new();
        for crc in expected(120, &p) {
            *want.entry(format!("{crc:08x}")).or_default() += 1;
        }
        assert_eq!(got, want, "mode {per_connection}/{pipelining}/{bdat}");
    }
}

#[test]
fn load_into_the_sink_counts_and_checksums_match() {
    let sink = Sink::start(
        "127.0.0.1:0".parse().unwrap(),
        Faults {
            verify: true,
            ..Faults::default()
        },
    );
    let (addr, counters) = (sink.addr, &sink.counters);
    let p = plan(5, true, true);
    let report = run(addr, 500, p.clone());
    assert_eq!((report.stats.ok, report.stats.errors), (500, 0));
    assert_eq!(counters.accepted.load(Ordering::SeqCst), 500);
    assert_eq!(
        counters.verified.load(Ordering::SeqCst),
        500,
        "every message matched its checksum header"
    );
    assert_eq!(counters.corrupt.load(Ordering::SeqCst), 0);
    let want = expected(500, &p)
        .into_iter()
        .fold(0u64, |x, c| x ^ c as u64);
    assert_eq!(counters.crc_xor.load(Ordering::SeqCst), want);
    let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
    for key in [
        "messages",
        "errors",
        "seconds",
        "messages_per_sec",
        "p50_ms",
        "p99_ms",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    // Four 250s per message (MAIL, 2 RCPT, BDAT), one per connection (EHLO).
    assert_eq!(
        json["codes"]["250"].as_u64().unwrap(),
        500 * 4 + json["codes"]["220"].as_u64().unwrap()
    );
}

#[test]
fn the_sink_injects_faults_and_the_load_tool_counts_them() {
    let faults = Faults {
        tempfail_permille: 200,
        permfail_permille: 100,
        disconnect_permille: 50,
        verify: true,
        ..Faults::default()
    };
    let sink = Sink::start("127.0.0.1:0".parse().unwrap(), faults);
    let (addr, counters) = (sink.addr, &sink.counters);
    let report = run(addr, 1000, plan(0, true, false));
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::SeqCst);
    let (ok, temp, perm, disc) = (
        c(&counters.accepted),
        c(&counters.tempfailed),
        c(&counters.permfailed),
        c(&counters.disconnected),
    );
    assert_eq!(
        ok + temp + perm + disc,
        1000,
        "every message got exactly one outcome"
    );
    assert_eq!(report.stats.ok, ok);
    // Each refusal is an error; each dropped connection too (possibly counted once per
    // broken session rather than per message).
    assert!(report.stats.errors >= temp + perm);
    assert!(
        temp > 100 && perm > 40 && disc > 10,
        "shares roughly as asked: {temp} {perm} {disc}"
    );
    assert_eq!(report.stats.codes.get(&451).copied().unwrap_or(0), temp);
    assert_eq!(report.stats.codes.get(&554).copied().unwrap_or(0), perm);
}

#[test]
fn load_over_starttls_smtps_and_submission_with_auth_arrives_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for u in ["a@localhost", "b@localhost"] {
        ringmail_tests::user_add(&data, u, "load password");
    }
    let server = Server::start_in(Some(tmp), data, &[]);
    let tls_plan = |tls: TlsMode, auth: bool| Plan {
        from: "a@localhost".into(),
        tls,
        auth: auth.then(|| ("a@localhost".into(), "load password".into())),
        ..plan(5, true, false)
    };
    let cases = [
        (server.addr, tls_plan(TlsMode::StartTls, false)),
        (server.smtps, tls_plan(TlsMode::Implicit, false)),
        (server.submission, tls_plan(TlsMode::StartTls, true)),
    ];
    for (n, (target, p)) in cases.into_iter().enumerate() {
        let report = run(target, 40, p.clone());
        assert_eq!(
            (report.stats.ok, report.stats.errors),
            (40, 0),
            "{:?} auth {}: {:?}",
            p.tls,
            p.auth.is_some(),
            report.stats.codes
        );
        // Every message reached both mailboxes.
        let want = 40 * (n + 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while ringmail_tests::mailbox_list(&server.data, "b@localhost", Some("INBOX")).len() < want
        {
            assert!(std::time::Instant::now() < deadline, "{want} in b's INBOX");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // A wrong password: every session fails at AUTH, nothing is sent.
    let mut p = tls_plan(TlsMode::StartTls, true);
    p.auth = Some(("a@localhost".into(), "wrong".into()));
    let report = run(server.submission, 40, p);
    assert_eq!(report.stats.ok, 0);
    assert_eq!(
        report.stats.codes.get(&535),
        Some(&6),
        "{:?}",
        report.stats.codes
    );
}
