//! Local delivery end to end: python3 smtplib to local users, aliases and unknown
//! users; what lands in each mailbox (`ringmail mailbox list` / `show`), how much the
//! data directory grows, and SIGKILL in the middle of delivery and of compaction.

use ringmail_tests::{binary, mailbox_list, python, run_ok, Server};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn mailbox_show(data: &Path, address: &str, uid: u64) -> Vec<u8> {
    run_ok(
        Command::new(binary())
            .args([
                "mailbox",
                "show",
                address,
                "--uid",
                &uid.to_string(),
                "--data",
            ])
            .arg(data),
    )
    .stdout
}

/// Polls `mailbox list` (bounded) until `address` holds `n` messages.
fn wait_for(data: &Path, address: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = mailbox_list(data, address, None);
        if got.len() >= n || Instant::now() > deadline {
            assert_eq!(got.len(), n, "{address}: {got:?}");
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh data directory (with its temp dir) holding `users`.
fn data_with(users: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for u in users {
        ringmail_tests::user_add(&data, u, "secret password");
    }
    (tmp, data)
}

fn send(port: u16, from: &str, to: &[&str], body: &str) -> String {
    // The body goes through a file: a large one would not fit the argument list.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    python(
        &format!(
            r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
try:
    r = s.sendmail({from:?}, {to:?}, open({path:?}, 'rb').read())
    print('refused', r)
except smtplib.SMTPRecipientsRefused as e:
    print('all refused', e.recipients)
s.quit()
"#,
            to = to.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            path = file.path().to_str().unwrap(),
        ),
        port,
    )
}

/// For a failed space check: every shard's files and what compaction logged.
fn space_report(data: &Path, log: &str) -> String {
    let mut out = String::from("files:");
    for shard in std::fs::read_dir(data).unwrap().flatten() {
        let Ok(files) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for f in files.flatten() {
            let len = f.metadata().map_or(0, |m| m.len());
            out += &format!(
                " {}/{} {len};",
                shard.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            );
        }
    }
    out += "\nlog:\n";
    for l in log
        .lines()
        .filter(|l| l.contains("compact") || l.contains("WARN") || l.contains("ERROR"))
    {
        out += l;
        out += "\n";
    }
    out
}

fn segment_bytes(data: &Path) -> u64 {
    let mut total = 0;
    for shard in std::fs::read_dir(data).unwrap().flatten() {
        if !shard.file_name().to_string_lossy().starts_with("shard-") {
            continue;
        }
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            if f.file_name().to_string_lossy().starts_with("seg-") {
                total += f.metadata().unwrap().len();
            }
        }
    }
    total
}

#[test]
fn a_message_to_a_local_user_lands_in_its_inbox_with_its_bytes_and_size() {
    let (tmp, data) = data_with(&["alice@localhost"]);
    let server = Server::start_in(Some(tmp), data.clone(), &[]);
    let body = "Subject: hello\r\nFrom: b@client.test\r\n\r\nhello alice\r\n";
    let out = send(
        server.addr.port(),
        "b@client.test",
        &["alice@localhost"],
        body,
    );
    assert!(out.contains("refused {}"), "{out}");
    let got = wait_for(&data, "alice@localhost", 1);
    let e = &got[0];
    assert_eq!(e["mailbox"], "INBOX");
    assert_eq!(e["uid"], 1);
    assert_eq!(e["flags"], serde_json::json!([]));
    assert!(e["internal_date"].as_str().unwrap().ends_with('Z'), "{e}");
    let served = mailbox_show(&data, "alice@localhost", 1);
    let text = String::from_utf8(served.clone()).unwrap();
    assert!(
        text.starts_with(
            "Return-Path: <b@client.test>\r\nDelivered-To: alice@localhost\r\nReceived: "
        ),
        "{text}"
    );
    assert!(text.ends_with(body), "{text}");
    assert_eq!(e["size"].as_u64().unwrap(), served.len() as u64);
    // Delivered: the message left the queue.
    assert!(server.queue().is_empty(), "{:?}", server.queue());
}

#[test]
fn an_alias_with_two_targets_and_several_users_in_one_transaction_store_the_body_once() {
    let (tmp, data) = data_with(&[
        "u1@localhost",
        "u2@localhost",
        "u3@localhost",
        "u4@localhost",
    ]);
    run_ok(
        Command::new(binary())
            .args([
                "alias",
                "add",
                "team@localhost",
                "u1@localhost",
                "u2@localhost",
                "--data",
            ])
            .arg(&data),
    );
    let server = Server::start_in(Some(tmp), data.clone(), &["--log-zero-ahead", "false"]);
    // A body far larger than everything else written, so growth shows copies.
    let big = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789abcdef\r\n".repeat(64 << 10)
    );
    let before = segment_bytes(&data);
    let out = send(
        server.addr.port(),
        "b@client.test",
        &[
            "team@localhost",
            "u3@localhost",
            "u4@localhost",
            "nobody@localhost",
        ],
        &big,
    );
    // The unknown user is refused at RCPT (550 5.1.1); the others take the message.
    assert!(
        out.contains("nobody@localhost") && out.contains("550"),
        "{out}"
    );
    for u in [
        "u1@localhost",
        "u2@localhost",
        "u3@localhost",
        "u4@localhost",
    ] {
        let got = wait_for(&data, u, 1);
        let served = mailbox_show(&data, u, 1);
        assert!(served.ends_with(big.as_bytes()), "{u}");
        assert_eq!(got[0]["size"].as_u64().unwrap(), served.len() as u64, "{u}");
        assert!(
            String::from_utf8_lossy(&served).contains(&format!("Delivered-To: {u}\r\n")),
            "{u}"
        );
    }
    let grown = segment_bytes(&data) - before;
    assert!(
        grown < big.len() as u64 * 3 / 2,
        "four mailboxes of a {} byte message grew the log by {grown} bytes",
        big.len()
    );
}

#[test]
fn an_unknown_local_user_is_refused_and_a_user_added_while_running_takes_mail_at_once() {
    let (tmp, data) = data_with(&["alice@localhost"]);
    let server = Server::start_in(Some(tmp), data.clone(), &[]);
    let out = python(
        r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
s.ehlo('client.test')
s.mail('b@client.test')
print(s.rcpt('carol@localhost'))
s.quit()
"#,
        server.addr.port(),
    );
    assert!(out.contains("550") && out.contains("5.1.1"), "{out}");
    ringmail_tests::user_add(&data, "carol@localhost", "secret password");
    let out = send(
        server.addr.port(),
        "b@client.test",
        &["carol@localhost"],
        "Subject: x\r\n\r\nhi\r\n",
    );
    assert!(out.contains("refused {}"), "{out}");
    wait_for(&data, "carol@localhost", 1);
}

/// Sends `n` messages to `to` in the background, printing the number of each one the
/// server acknowledged.
fn sender(port: u16, to: &[&str], n: usize) -> std::process::Child {
    Command::new("python3")
        .arg("-c")
        .arg(format!(
            r#"
import smtplib, sys
for i in range({n}):
    try:
        s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=10)
        s.sendmail('b@client.test', {to:?}, ('Subject: %d\r\nX-Seq: %d\r\n\r\n' % (i, i) + ('x' * 70 + '\r\n') * (i * 37 % 71)).encode())
        print(i, flush=True)
        s.quit()
    except Exception as e:
        print('stopped:', repr(e), file=sys.stderr)
        sys.exit(0)
"#,
            to = to.iter().map(|t| t.to_string()).collect::<Vec<_>>()
        ))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Each acknowledged message is in each user's INBOX exactly once with its bytes.
fn check_exactly_once(data: &Path, users: &[&str], acked: &[usize]) {
    for u in users {
        let deadline = Instant::now() + Duration::from_secs(30);
        let entries = loop {
            let got = mailbox_list(data, u, None);
            let have: Vec<usize> = got
                .iter()
                .map(|e| seq_of(&mailbox_show(data, u, e["uid"].as_u64().unwrap())))
                .collect();
            if acked.iter().all(|a| have.contains(a)) || Instant::now() > deadline {
                break have;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        for a in acked {
            let n = entries.iter().filter(|s| *s == a).count();
            assert_eq!(
                n,
                1,
                "{u}: message {a} is there {n} times: {entries:?}; queue: {:?}",
                ringmail_tests::queue_list(data)
            );
        }
        // Unacknowledged ones (killed before the 250) may be there, once at most.
        let mut sorted = entries.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), entries.len(), "{u}: duplicates {entries:?}");
    }
}

fn seq_of(message: &[u8]) -> usize {
    let text = String::from_utf8_lossy(message);
    let line = text
        .lines()
        .find(|l| l.starts_with("X-Seq: "))
        .unwrap_or_else(|| panic!("no X-Seq in {text}"));
    let seq: usize = line["X-Seq: ".len()..].trim().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        body,
        format!("{}\r\n", "x".repeat(70)).repeat(seq * 37 % 71),
        "message {seq}"
    );
    seq
}

#[test]
fn sigkill_during_delivery_to_many_local_users_loses_and_duplicates_nothing_acknowledged() {
    let users = [
        "k1@localhost",
        "k2@localhost",
        "k3@localhost",
        "k4@localhost",
        "k5@localhost",
    ];
    let (tmp, data) = data_with(&users);
    let mut server = Server::start_in(Some(tmp), data.clone(), &["--cores", "2"]);
    let mut child = sender(server.addr.port(), &users, 400);
    // Kill once a good part is acknowledged (bounded wait on the sender's output).
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut acked = Vec::new();
    while acked.len() < 60 {
        match lines.next() {
            Some(Ok(l)) => acked.push(l.trim().parse::<usize>().unwrap()),
            _ => break,
        }
    }
    server.kill9();
    acked.extend(
        lines
            .map_while(Result::ok)
            .filter_map(|l| l.trim().parse::<usize>().ok()),
    );
    child.wait().unwrap();
    assert!(acked.len() >= 60, "only {} acknowledged", acked.len());
    server.restart();
    check_exactly_once(&data, &users, &acked);
}

#[test]
fn deleting_a_user_frees_its_messages_and_sigkill_during_compaction_keeps_the_others() {
    let keep = ["c1@localhost", "c2@localhost"];
    let (tmp, data) = data_with(&["c1@localhost", "c2@localhost", "doomed@localhost"]);
    // Small segments, so that compaction has segments to delete and to copy from.
    let args = [
        "--segment-size",
        "6000000",
        "--message-size-max",
        "500000",
        "--log-zero-ahead",
        "false",
    ];
    let mut server = Server::start_in(Some(tmp), data.clone(), &args);
    // Small messages that stay, between big ones that will be garbage.
    let mut child = sender(server.addr.port(), &keep, 60);
    let doomed = format!(
        "Subject: doomed\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(998)).repeat(400)
    );
    for _ in 0..40 {
        send(
            server.addr.port(),
            "b@client.test",
            &["doomed@localhost"],
            &doomed,
        );
    }
    let acked: Vec<usize> =
        std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()))
            .map_while(Result::ok)
            .filter_map(|l| l.trim().parse().ok())
            .collect();
    child.wait().unwrap();
    assert_eq!(acked.len(), 60);
    wait_for(&data, "doomed@localhost", 40);
    check_exactly_once(&data, &keep, &acked);
    let full = segment_bytes(&data);
    run_ok(
        Command::new(binary())
            .args(["user", "del", "doomed@localhost", "--data"])
            .arg(&data),
    );
    // Kill while compaction works through the garbage, restart, three times.
    for _ in 0..3 {
        let seen = server.log_text().matches("compacted").count();
        let deadline = Instant::now() + Duration::from_secs(15);
        while server.log_text().matches("compacted").count() == seen && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        server.kill9();
        server.restart();
        check_exactly_once(&data, &keep, &acked);
    }
    // The doomed user's 16 MB went (compaction keeps what lies after the older
    // snapshot, so allow some of it).
    // Mail flowing moves the snapshots (and so what compaction may reclaim) on, and
    // fills the segments the garbage shares with the mail that stays, so that they
    // are sealed and may go: 20 KB a message (a few bytes each, as before, took
    // minutes to fill a segment when the garbage had landed in the active ones).
    let more = format!(
        "Subject: more\r\n\r\n{}",
        format!("{}\r\n", "z".repeat(98)).repeat(200)
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while segment_bytes(&data) > full / 2 && Instant::now() < deadline {
        send(
            server.addr.port(),
            "b@client.test",
            &["c1@localhost"],
            &more,
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let extra = mailbox_list(&data, "c1@localhost", None).len() - acked.len();
    assert!(
        segment_bytes(&data) <= full / 2,
        "{} of {full} bytes left; {}",
        segment_bytes(&data),
        space_report(&data, &server.log_text())
    );
    // The small ones sent meanwhile are there too; the numbered ones exactly once.
    let have: Vec<usize> = mailbox_list(&data, "c2@localhost", None)
        .iter()
        .map(|e| {
            seq_of(&mailbox_show(
                &data,
                "c2@localhost",
                e["uid"].as_u64().unwrap(),
            ))
        })
        .collect();
    assert_eq!(have.len(), acked.len(), "{have:?}");
    assert!(extra > 0 || segment_bytes(&data) <= full / 2);
}

#[test]
fn a_full_mailbox_refuses_at_rcpt_postmaster_waits_and_an_idn_user_gets_its_mail() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let domains = [
        "--local-domain",
        "localhost",
        "--local-domain",
        "xn--bcher-kva.test",
    ];
    let add = |address: &str, extra: &[&str]| {
        let mut child = Command::new(binary())
            .args(["user", "add", address, "--password-stdin", "--data"])
            .arg(&data)
            .args(domains)
            .args(extra)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"pw\n").unwrap();
        assert!(child.wait().unwrap().success(), "user add {address}");
    };
    add("small@localhost", &["--quota-messages", "1"]);
    add("jörg@bücher.test", &[]);
    let mut server = Server::start_in(Some(tmp), data.clone(), &domains);
    let port = server.addr.port();
    send(
        port,
        "b@client.test",
        &["small@localhost"],
        "Subject: one\r\n\r\n1\r\n",
    );
    wait_for(&data, "small@localhost", 1);
    // The home shard published the usage: the next RCPT is refused while full, and
    // after a restart too (the recovered usage is published at start).
    for round in 0..2 {
        let out = send(
            port_of(&server),
            "b@client.test",
            &["small@localhost"],
            "Subject: two\r\n\r\n2\r\n",
        );
        assert!(
            out.contains("452") && out.contains("4.2.2"),
            "round {round}: {out}"
        );
        server.terminate();
        server.restart();
        let _ = round;
    }
    // Postmaster without an account or alias: accepted, and waits (no bounce).
    let out = send(
        port_of(&server),
        "b@client.test",
        &["postmaster@localhost"],
        "Subject: pm\r\n\r\nhi\r\n",
    );
    assert!(out.contains("refused {}"), "{out}");
    // An address in an internationalised domain, sent in its UTF-8 form.
    let out = python(
        r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
print('refused', s.sendmail('b@client.test', ['jörg@bücher.test'], 'Subject: idn\r\n\r\nhallo\r\n'.encode(), mail_options=['SMTPUTF8']))
s.quit()
"#,
        port_of(&server),
    );
    assert!(out.contains("refused {}"), "{out}");
    wait_for(&data, "jörg@xn--bcher-kva.test", 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let q = server.queue();
        let pm: Vec<_> = q
            .iter()
            .filter(|m| m["rcpt"][0]["to"] == "postmaster@localhost")
            .collect();
        assert!(
            q.iter().all(|m| m["from"] != ""),
            "a bounce was queued: {q:?}"
        );
        if pm.len() == 1 && pm[0]["rcpt"][0]["status"] == "deferred" {
            break;
        }
        assert!(Instant::now() < deadline, "{q:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_of(server: &Server) -> u16 {
    server.addr.port()
}

/// NOTIFY=SUCCESS (RFC 3461 §5.2.2): once the message is in the mailbox the sender
/// gets a "delivered" report, headers only; without it, nothing.
#[test]
fn a_delivery_asked_to_be_reported_is_reported_to_the_sender() {
    let (tmp, data) = data_with(&["alice@localhost", "bob@localhost"]);
    let server = Server::start_in(Some(tmp), data.clone(), &[]);
    let out = python(
        r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
body = b'Subject: report me\r\n\r\nsecret body\r\n'
print(s.sendmail('bob@localhost', ['alice@localhost'], body, rcpt_options=['NOTIFY=SUCCESS']))
print(s.sendmail('bob@localhost', ['alice@localhost'], body))
s.quit()
"#,
        server.addr.port(),
    );
    assert_eq!(out.trim(), "{}\n{}", "{out}");
    wait_for(&data, "alice@localhost", 2);
    let reports = wait_for(&data, "bob@localhost", 1);
    let report = String::from_utf8(mailbox_show(&data, "bob@localhost", 1)).unwrap();
    for field in [
        "Return-Path: <>",
        "Subject: Successful Mail Delivery Report",
        "Final-Recipient: rfc822; alice@localhost",
        "Action: delivered",
        "Status: 2.0.0",
        "Content-Type: text/rfc822-headers",
    ] {
        assert!(
            report.contains(&format!("{field}\r\n")),
            "{field}:\n{report}"
        );
    }
    assert!(!report.contains("secret body"), "{report}");
    assert!(!report.contains("Remote-MTA"), "{report}");
    // The second message asked for nothing: still one report.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        mailbox_list(&data, "bob@localhost", None).len(),
        reports.len()
    );
}
