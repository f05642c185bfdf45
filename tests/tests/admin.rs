//! The admin listener end to end against the built binary: `/metrics` scraped before
//! and after mail flows (read with a Prometheus text parser), every queue API call
//! with curl, the `ringmail queue` commands that use it, the bearer token, and JSON
//! logs.

use ringmail_bench::sink::Faults;
use ringmail_tests::sink::Sink;
use ringmail_tests::{run_ok, user_add, Server};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// curl METHOD URL (with a bearer token when given): (HTTP status, body).
fn curl(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "-o", "-", "-w", "\n%{http_code}", url]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = run_ok(&mut cmd);
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn api(server: &Server, method: &str, path: &str) -> serde_json::Value {
    let (code, body) = curl(method, &format!("http://{}{path}", server.admin), None);
    assert_eq!(code, 200, "{method} {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Sends `request` on a connection of its own and reads until the server closes it
/// (bounded): the whole answer, as text.
fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Every sample of a scrape, `name{label="v",…}` (labels sorted) to its value.
fn scrape(server: &Server) -> HashMap<String, f64> {
    let (code, text) = curl("GET", &format!("http://{}/metrics", server.admin), None);
    assert_eq!(code, 200, "{text}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("the Prometheus text format");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        labels.sort();
        let key = match labels.is_empty() {
            true => s.metric.clone(),
            false => format!("{}{{{}}}", s.metric, labels.join(",")),
        };
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(key, v);
    }
    out
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    let a = after
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {after:?}"));
    a - before.get(key).copied().unwrap_or(0.0)
}

/// Sends one message per entry of `rcpts` in one SMTP session; returns the queue ids.
fn send(server: &Server, from: &str, rcpts: &[&[&str]]) -> Vec<String> {
    let script = format!(
        r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]))
s.ehlo()
for i, to in enumerate({rcpts:?}):
    s.mail({from:?})
    for t in to:
        s.rcpt(t)
    code, reply = s.data(b"Subject: admin test %d\r\n\r\nbody\r\n" % i)
    print(reply.decode().split()[-1])
s.quit()
"#
    );
    ringmail_tests::python(&script, server.addr.port())
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn metrics_move_by_exactly_what_was_sent_relayed_delivered_and_refused() {
    let sink = Sink::start("127.0.0.2:0".parse().unwrap(), Faults::default());
    let route = format!("sink.test={}", sink.addr);
    let server = Server::start(&["--route", &route, "--local-domain", "local.test"]);
    user_add(&server.data, "ann@local.test", "secret-pw-1");
    let before = scrape(&server);
    assert!(before["ringmail_executors"] >= 1.0);
    // Three messages to two remote recipients each, one to a local user.
    send(
        &server,
        "a@src.test",
        &[
            &["x@sink.test", "y@sink.test"],
            &["x@sink.test", "y@sink.test"],
            &["x@sink.test", "y@sink.test"],
            &["ann@local.test"],
        ],
    );
    // One recipient refused at RCPT (no such user), its message never sent.
    let refused = ringmail_tests::python(
        r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]))
s.ehlo(); s.mail("a@src.test")
print(s.rcpt("nobody@local.test")[0])
s.quit()
"#,
        server.addr.port(),
    );
    assert_eq!(refused.trim(), "550");
    wait_until("3 relayed messages", 30, || sink.accepted() >= 3);
    wait_until("an empty queue", 30, || {
        scrape(&server)
            .get("ringmail_queue_messages{state=\"ready\"}")
            .is_some_and(|v| *v == 0.0)
            && server.queue().is_empty()
    });
    let after = scrape(&server);
    assert_eq!(
        delta(&before, &after, "ringmail_messages_received_total"),
        4.0
    );
    assert_eq!(
        delta(&before, &after, "ringmail_recipients_delivered_total"),
        7.0
    );
    assert_eq!(
        delta(&before, &after, "ringmail_recipients_delivered_local_total"),
        1.0
    );
    assert_eq!(
        delta(&before, &after, "ringmail_recipients_deferred_total"),
        0.0
    );
    assert_eq!(
        delta(&before, &after, "ringmail_recipients_bounced_total"),
        0.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "ringmail_recipients_rejected_total{reason=\"unknown_user\"}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "ringmail_connections_accepted_total{service=\"smtp\"}"
        ),
        2.0
    );
    assert_eq!(after["ringmail_connections_open{service=\"smtp\"}"], 0.0);
    for state in ["active", "ready", "deferred", "held"] {
        assert_eq!(
            after[&format!("ringmail_queue_messages{{state=\"{state}\"}}")],
            0.0
        );
    }
    assert!(delta(&before, &after, "ringmail_commit_batches_total") >= 1.0);
    assert!(delta(&before, &after, "ringmail_received_bytes_total") > 0.0);
    assert!(delta(&before, &after, "ringmail_sent_bytes_total") > 0.0);
    // A histogram's count is the number of observations: one per delivered recipient.
    assert_eq!(delta(&before, &after, "ringmail_delivery_seconds"), 7.0);
}

#[test]
fn hold_release_delete_and_bounce_through_the_api_and_the_cli() {
    // Deliveries to `sink.test` get 451 first (deferred a minute or more); the
    // senders' bounces go to `src.test`.
    let sink = Sink::start(
        "127.0.0.2:0".parse().unwrap(),
        Faults {
            tempfail_first: 3,
            ..Faults::default()
        },
    );
    let senders = Sink::start("127.0.0.3:0".parse().unwrap(), Faults::default());
    let routes = [
        format!("sink.test={}", sink.addr),
        format!("src.test={}", senders.addr),
    ];
    let mut server = Server::start(&["--route", &routes[0], "--route", &routes[1], "--cores", "1"]);
    let ids = send(
        &server,
        "a@src.test",
        &[&["x@sink.test"], &["y@sink.test"], &["z@sink.test"]],
    );
    assert_eq!(ids.len(), 3);
    wait_until("three deferrals", 30, || {
        api(&server, "GET", "/api/v1/queue?state=deferred")["matched"] == 3
    });
    let data = server.data.to_str().unwrap().to_string();
    let cli = |args: &[&str]| {
        let out = run_ok(
            Command::new(ringmail_tests::binary())
                .arg("queue")
                .args(args)
                .args(["--data", &data]),
        );
        String::from_utf8(out.stdout).unwrap()
    };

    // Hold: durable, survives a restart, and a flush does not deliver it.
    let held = &ids[0];
    let r = api(&server, "POST", &format!("/api/v1/queue/{held}/hold"));
    assert_eq!(r["changed"], 1);
    let shown = api(&server, "GET", &format!("/api/v1/queue/{held}"));
    assert_eq!(shown["rcpt"][0]["status"], "held");
    assert!(shown["headers"]
        .as_str()
        .unwrap()
        .contains("Subject: admin test 0"));
    let summary = api(&server, "GET", "/api/v1/queue/summary?state=held");
    assert_eq!(summary["total"]["messages"], 1);
    assert_eq!(summary["destinations"][0]["domain"], "sink.test");
    // Durable when answered: a SIGKILL right after keeps it.
    server.kill9();
    let listed = ringmail_tests::queue_list(&server.data);
    let m = listed.iter().find(|m| m["id"] == *held).unwrap();
    assert_eq!(m["rcpt"][0]["status"], "held");
    server.restart();
    let scraped = scrape(&server);
    assert_eq!(scraped["ringmail_queue_messages{state=\"held\"}"], 1.0);
    let flushed = api(&server, "POST", &format!("/api/v1/queue/flush?id={held}"));
    assert_eq!(flushed["flushed"], 0, "a held message is not flushed");

    // Delete without a bounce: the message never leaves, the sender hears nothing.
    let deleted = &ids[1];
    assert!(cli(&["delete", deleted]).contains("delete: 1 recipient(s)"));
    let (code, _) = curl(
        "GET",
        &format!("http://{}/api/v1/queue/{deleted}", server.admin),
        None,
    );
    assert_eq!(code, 404);

    // Bounce now: the sender gets a delivery status notification.
    let bounced = &ids[2];
    assert!(cli(&["bounce", bounced]).contains("bounce: 1 recipient(s)"));
    wait_until("the bounce at the sender's MX", 30, || {
        senders.accepted() == 1
    });

    // Release: delivered now (the sink's 451s are used up by then: three were given
    // before, one per message). Nothing else reached the sink.
    let before = sink.accepted();
    assert!(cli(&["release", held]).contains("release: 1 recipient(s)"));
    wait_until("the released delivery", 30, || {
        sink.accepted() == before + 1
    });
    wait_until("an empty queue", 30, || server.queue().is_empty());
    assert_eq!(senders.accepted(), 1, "only the bounce reached the sender");
    let log = server.log_text();
    assert!(log.contains("status=\"deleted\""), "{log}");
    assert!(cli(&["summary"]).contains("TOTAL"));

    // Errors: a bad id, an unknown message, an unknown operation, a wrong method.
    let base = format!("http://{}", server.admin);
    assert_eq!(
        curl("POST", &format!("{base}/api/v1/queue/xyz/hold"), None).0,
        400
    );
    assert_eq!(
        curl("POST", &format!("{base}/api/v1/queue/{held}/hold"), None).0,
        404
    );
    assert_eq!(
        curl(
            "POST",
            &format!("{base}/api/v1/queue/{held}/frobnicate"),
            None
        )
        .0,
        404
    );
    assert_eq!(curl("DELETE", &format!("{base}/metrics"), None).0, 405);
    assert_eq!(
        curl("GET", &format!("{base}/api/v1/queue?state=gone"), None).0,
        400
    );
    // A web page's request (through a browser on this host) cannot steer the queue.
    let out = run_ok(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "-H",
        "Origin: http://example.org",
        &format!("{base}/api/v1/queue/flush"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    // Two Content-Length fields: refused, not guessed.
    let answer = exchange(
        server.admin,
        b"POST /api/v1/queue/flush HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// HTTP as RFC 9110/9112 have it: HEAD is GET without the body (the connection
/// stays in step), a 405 names what the resource takes, a request needs one Host,
/// and without a token only a loopback Host is served (DNS rebinding).
#[test]
fn head_allow_and_host_follow_http() {
    use std::io::{BufRead, BufReader, Read, Write};
    let server = Server::start(&[]);
    let raw = std::net::TcpStream::connect(server.admin).unwrap();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut w = raw.try_clone().unwrap();
    let mut r = BufReader::new(raw);
    // Reads one answer's head; its Content-Length.
    let head = |r: &mut BufReader<std::net::TcpStream>| -> (String, usize) {
        let mut all = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            all.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                return (all, length);
            }
        }
    };
    // HEAD then GET on one connection: the HEAD answer has a length and no body.
    w.write_all(b"HEAD /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /api/v1/queue/summary HTTP/1.1\r\nHost: localhost:8025\r\n\r\n")
        .unwrap();
    let (h, n) = head(&mut r);
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(n > 0, "{h}");
    let (h, n) = head(&mut r);
    assert!(h.starts_with("HTTP/1.1 200"), "the GET after the HEAD: {h}");
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).unwrap();
    assert!(String::from_utf8_lossy(&body).contains("\"buckets\""));
    // 405 with Allow; the flush resource takes POST only.
    for (req, allow) in [
        ("DELETE /metrics", "GET, HEAD"),
        ("GET /api/v1/queue/flush", "POST"),
        ("GET /api/v1/queue/0100000000000001/hold", "POST"),
    ] {
        write!(w, "{req} HTTP/1.1\r\nHost: [::1]:1\r\n\r\n").unwrap();
        let (h, n) = head(&mut r);
        assert!(h.starts_with("HTTP/1.1 405"), "{req}: {h}");
        assert!(h.contains(&format!("Allow: {allow}\r\n")), "{req}: {h}");
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).unwrap();
    }
    // A Host that is not the loopback: a page that rebound a name to 127.0.0.1.
    w.write_all(b"GET /api/v1/queue HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        .unwrap();
    let (h, n) = head(&mut r);
    assert!(h.starts_with("HTTP/1.1 403"), "{h}");
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).unwrap();
    // No Host at all in HTTP/1.1: 400, and the connection closes.
    w.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let (h, _) = head(&mut r);
    assert!(h.starts_with("HTTP/1.1 400"), "{h}");
    // `Connection` is a list: `keep-alive, close` closes.
    let answer = exchange(
        server.admin,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive, close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_configured_token_is_required_on_every_request() {
    let token = "0123456789abcdef-token";
    let server = Server::start(&["--admin-token", token]);
    let url = format!("http://{}/metrics", server.admin);
    assert_eq!(curl("GET", &url, None).0, 401);
    assert_eq!(curl("GET", &url, Some("0123456789abcdef-wrong")).0, 401);
    assert_eq!(curl("GET", &url, Some(token)).0, 200);
    let queue = format!("http://{}/api/v1/queue/summary", server.admin);
    assert_eq!(curl("GET", &queue, None).0, 401);
    assert_eq!(curl("GET", &queue, Some(token)).0, 200);
    // The CLI takes the token from the same settings.
    let data = server.data.to_str().unwrap();
    let out = Command::new(ringmail_tests::binary())
        .args(["queue", "flush", "--data", data])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    run_ok(Command::new(ringmail_tests::binary()).args([
        "queue",
        "flush",
        "--data",
        data,
        "--admin-token",
        token,
    ]));
    // Off the loopback, a token is a must.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(ringmail_tests::binary())
        .arg("serve")
        .arg("--data")
        .arg(other.path())
        .args(["--admin", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin-token"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let server = Server::start(&["--log-format", "json"]);
    send(&server, "a@src.test", &[&["someone@localhost"]]);
    wait_until("the queued line", 10, || {
        server.log_text().contains("\"queued\"")
    });
    let log = server.log_text();
    let mut queued = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["message"] == "queued" {
            assert_eq!(v["from"], "a@src.test");
            queued += 1;
        }
    }
    assert_eq!(queued, 1);
}

#[test]
fn a_connection_over_the_limit_is_refused_counted_and_logged() {
    let server = Server::start(&["--connections-max", "1", "--cores", "1"]);
    let before = scrape(&server);
    let mut first = ringmail_tests::Client::connect(server.addr);
    assert_eq!(first.codes(1), [220]);
    let mut second = ringmail_tests::Client::connect(server.addr);
    assert!(second.reply().starts_with("421 4.7.0"));
    let after = scrape(&server);
    assert_eq!(
        delta(
            &before,
            &after,
            "ringmail_connections_refused_total{service=\"smtp\"}"
        ),
        1.0
    );
    assert_eq!(after["ringmail_connections_open{service=\"smtp\"}"], 1.0);
    let log = server.log_text();
    assert!(
        log.contains("connection refused: too many connections") && log.contains("limit=1"),
        "{log}"
    );
    drop(first);
}

/// A connection that sends nothing, or not a whole request, within 10 s is answered
/// 408 and closed: silent or trickling clients cannot hold the 64 admin slots.
#[test]
fn a_silent_admin_connection_is_closed_with_408() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let started = std::time::Instant::now();
    let mut silent = std::net::TcpStream::connect(server.admin).unwrap();
    let mut trickling = std::net::TcpStream::connect(server.admin).unwrap();
    trickling.write_all(b"GET /metr").unwrap();
    for s in [&mut silent, &mut trickling] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_secs(9), "{took:?}");
    // The listener still serves.
    let answer = exchange(
        server.admin,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
