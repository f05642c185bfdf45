//! End to end with real clients against the built binary: python3 smtplib, curl, and a
//! raw socket client that pipelines whole transactions.

use ringmail_tests::{python, queued_id, run_ok, Server};
use std::process::Command;

fn by_id(q: &[serde_json::Value], id: &str) -> serde_json::Value {
    q.iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in queue: {q:?}"))
        .clone()
}

#[test]
fn python_smtplib_ehlo_recipients_8bitmime_and_smtputf8() {
    let server = Server::start(&[]);
    let out = python(
        r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
code, ehlo = s.ehlo('client.test')
assert code == 250, code
for kw in (b'PIPELINING', b'SIZE', b'8BITMIME', b'SMTPUTF8', b'ENHANCEDSTATUSCODES', b'CHUNKING', b'DSN'):
    assert kw in ehlo, kw
# Several recipients, one local and two remote (127.0.0.1 is a relay network).
r = s.sendmail('alice@client.test', ['bob@localhost', 'carol@remote.test', 'dave@remote.test'],
               b'Subject: many\r\n\r\nhello all\r\n')
assert r == {}, r
print(s.noop()[0])
# 8-bit body announced with BODY=8BITMIME.
body8 = 'Subject: caf\u00e9\r\n\r\nna\u00efve \u00fcber\r\n'.encode('utf-8')
s.sendmail('alice@client.test', ['bob@localhost'], body8, mail_options=['BODY=8BITMIME'])
# An SMTPUTF8 address.
s.sendmail('j\u00f6rg@client.test', ['\u00fcser@localhost'], b'Subject: utf8\r\n\r\nx\r\n', mail_options=['SMTPUTF8'])
# Without SMTPUTF8 the same address is refused with 553 5.6.7.
try:
    s.sendmail('j\u00f6rg@client.test', ['bob@localhost'], b'x\r\n')
    raise SystemExit('non-ASCII sender accepted without SMTPUTF8')
except (smtplib.SMTPSenderRefused, UnicodeEncodeError, smtplib.SMTPNotSupportedError) as e:
    print('refused', type(e).__name__)
s.quit()
"#,
        server.addr.port(),
    );
    assert!(out.contains("250"), "{out}");
    let q = server.queue();
    assert_eq!(q.len(), 3, "{q:?}");
    let many = q
        .iter()
        .find(|m| m["rcpt"].as_array().unwrap().len() == 3)
        .unwrap();
    assert_eq!(many["from"], "alice@client.test");
    assert_eq!(many["size"], "Subject: many\r\n\r\nhello all\r\n".len());
    let tos: Vec<&str> = many["rcpt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        tos,
        ["bob@localhost", "carol@remote.test", "dave@remote.test"]
    );
    // The local recipient waits for the mailbox store; the remote ones are being
    // tried (no name server answers in tests), so they are queued or deferred.
    let rcpt = many["rcpt"].as_array().unwrap();
    assert_eq!(
        (rcpt[0]["status"].as_str(), rcpt[0]["attempts"].as_u64()),
        (Some("queued"), Some(0))
    );
    assert!(
        rcpt[1..]
            .iter()
            .all(|r| r["status"] == "queued" || r["status"] == "deferred"),
        "{rcpt:?}"
    );
    let eight = "Subject: café\r\n\r\nnaïve über\r\n";
    assert!(q.iter().any(|m| m["size"] == eight.len()
        && m["crc32c"] == format!("{:08x}", crc32c::crc32c(eight.as_bytes()))));
    let utf8 = q
        .iter()
        .find(|m| m["from"] == "jörg@client.test")
        .expect("SMTPUTF8 message queued");
    assert_eq!(utf8["rcpt"][0]["to"], "üser@localhost");
}

#[test]
fn curl_sends_a_message() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.eml");
    let body = "From: a@client.test\r\nTo: x@localhost\r\nSubject: curl\r\n\r\nsent by curl\r\n";
    std::fs::write(&file, body).unwrap();
    let out = run_ok(
        Command::new("curl")
            .args([
                "-sS",
                "-v",
                "--mail-from",
                "a@client.test",
                "--mail-rcpt",
                "x@localhost",
                "-T",
            ])
            .arg(&file)
            .arg(format!("smtp://{}/client.test", server.addr)),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    let id = log
        .lines()
        .find_map(|l| l.strip_prefix("< ").and_then(queued_id))
        .unwrap_or_else(|| panic!("no queued reply in curl's log: {log}"));
    let m = by_id(&server.queue(), &id);
    assert_eq!(m["size"], body.len());
    assert_eq!(
        m["crc32c"],
        format!("{:08x}", crc32c::crc32c(body.as_bytes()))
    );
}

#[test]
fn a_whole_pipelined_transaction_in_one_write() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    assert!(c.reply().starts_with("220 "));
    c.send(
        b"EHLO pipe.test\r\nMAIL FROM:<p@pipe.test>\r\nRCPT TO:<a@localhost>\r\nRCPT TO:<b@remote.test>\r\nDATA\r\nSubject: pipe\r\n\r\n..dot\r\n.\r\nMAIL FROM:<p@pipe.test>\r\nRCPT TO:<c@localhost>\r\nBDAT 7 LAST\r\nchunk\r\nNOOP\r\nQUIT\r\n",
    );
    assert!(c.reply().starts_with("250-"));
    assert_eq!(c.codes(4), [250, 250, 250, 354]);
    let first = queued_id(&c.reply()).expect("first message queued");
    assert_eq!(c.codes(2), [250, 250]);
    let second = queued_id(&c.reply()).expect("BDAT message queued");
    assert_eq!(c.codes(2), [250, 221]);
    assert!(c.closed());
    let q = server.queue();
    let m1 = by_id(&q, &first);
    let body1 = "Subject: pipe\r\n\r\n.dot\r\n";
    assert_eq!(m1["size"], body1.len());
    assert_eq!(
        m1["crc32c"],
        format!("{:08x}", crc32c::crc32c(body1.as_bytes()))
    );
    assert_eq!(by_id(&q, &second)["size"], 7);
    // The trace header is stored beside the body, once.
    let seg = std::fs::read_dir(server.data.join("shard-0"))
        .unwrap()
        .chain(
            std::fs::read_dir(server.data.join("shard-1"))
                .into_iter()
                .flatten(),
        )
        .map(|e| e.unwrap().path())
        .collect::<Vec<_>>();
    let all: Vec<u8> = seg.iter().flat_map(|p| std::fs::read(p).unwrap()).collect();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains(&format!(
            "by mx.ringmail.test (ringmail) with ESMTP id {first}"
        )),
        "no Received header for {first}"
    );
    assert_eq!(
        text.matches("..dot").count() + text.matches("\r\n.dot\r\n").count(),
        1
    );
}

#[test]
fn relay_is_denied_outside_relay_networks() {
    // 127.0.0.1 is not in the only relay network, so only local domains are accepted.
    let server = Server::start(&[
        "--relay-network",
        "127.0.0.2/32",
        "--local-domain",
        "local.test",
    ]);
    let mut c = server.connect();
    c.reply();
    c.send(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@elsewhere.test>\r\nRCPT TO:<y@LOCAL.test>\r\nQUIT\r\n");
    c.reply();
    assert_eq!(c.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(
        c.reply(),
        "554 5.7.1 <x@elsewhere.test>: Relay access denied\r\n"
    );
    assert_eq!(c.codes(2), [250, 221]);
}

#[test]
fn limits_size_idle_timeout_and_connection_cap() {
    let server = Server::start(&[
        "--cores",
        "1",
        "--message-size-max",
        "1000",
        "--idle-timeout",
        "1",
        "--connections-max",
        "2",
    ]);
    let mut a = server.connect();
    a.reply();
    // SIZE= over the limit is refused at MAIL; data growing past it at the end of DATA.
    a.send(b"EHLO c\r\nMAIL FROM:<a@c.test> SIZE=1001\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n");
    a.reply();
    assert!(a.reply().starts_with("552 5.3.4 "));
    assert_eq!(a.codes(3), [250, 250, 354]);
    a.send(
        &[
            b"x".repeat(600),
            b"\r\n".to_vec(),
            b"y".repeat(600),
            b"\r\n.\r\n".to_vec(),
        ]
        .concat(),
    );
    assert!(a.reply().starts_with("552 5.3.4 "));
    // A text line over 1000 octets refuses that message only.
    a.send(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n");
    assert_eq!(a.codes(3), [250, 250, 354]);
    a.send(&[b"z".repeat(999), b"\r\n.\r\nNOOP\r\n".to_vec()].concat());
    assert!(a.reply().starts_with("550 5.6.0 "));
    assert_eq!(a.codes(1), [250]);
    // Two connections are the cap on this single shard: a third gets 421 4.7.0.
    let mut b = server.connect();
    b.reply();
    let mut c = server.connect();
    assert!(c.reply().starts_with("421 4.7.0 "));
    assert!(c.closed());
    // A silent client is told and closed after the idle timeout.
    let t = std::time::Instant::now();
    assert!(b.reply().starts_with("421 4.4.2 "));
    assert!(b.closed());
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert!(server.queue().is_empty());
}

#[test]
fn sigterm_closes_sessions_keeps_messages_and_exits_zero() {
    let mut server = Server::start(&[]);
    let mut c = server.connect();
    c.reply();
    c.send(b"EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n");
    assert_eq!(c.codes(4)[3], 354);
    c.send(b"Subject: before shutdown\r\n\r\nx\r\n.\r\n");
    let id = queued_id(&c.reply()).unwrap();
    assert_eq!(server.terminate(), Some(0));
    assert!(c.reply().starts_with("421 4.3.2 "));
    let q = server.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["id"], id.as_str());
    // And it starts again on the same data, with the message still queued.
    server.restart();
    assert_eq!(server.queue().len(), 1);
}

#[test]
fn dsn_parameters_are_stored_with_the_envelope() {
    let server = Server::start(&[]);
    python(
        r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
s.ehlo('client.test')
s.sendmail('alice@client.test', ['bob@localhost', 'carol@localhost'], b'Subject: dsn\r\n\r\nx\r\n',
           mail_options=['RET=HDRS', 'ENVID=QQ314159', 'BODY=7BIT'],
           rcpt_options=['NOTIFY=SUCCESS,DELAY', 'ORCPT=rfc822;bob@localhost'])
s.quit()
"#,
        server.addr.port(),
    );
    let q = server.queue();
    assert_eq!(q.len(), 1);
    let m = &q[0];
    assert_eq!(m["ret"], "HDRS");
    assert_eq!(m["envid"], "QQ314159");
    assert_eq!(m["body"], "7BIT");
    assert_eq!(m["smtputf8"], false);
    for r in m["rcpt"].as_array().unwrap() {
        assert_eq!(r["notify"], serde_json::json!(["SUCCESS", "DELAY"]));
        assert_eq!(r["orcpt"], "rfc822;bob@localhost");
    }
}

#[test]
fn a_low_open_files_limit_is_raised_at_start() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid out pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_max < 1024 {
        // Root may raise the hard limit (the server inherits it); anyone else cannot.
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_cur,
            rlim_max: 4096,
        };
        // SAFETY: setrlimit with a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            ringmail_tests::skip(&format!(
                "the hard open-files limit is {} and cannot be raised: {}",
                lim.rlim_max,
                std::io::Error::last_os_error()
            ));
            return;
        }
    }
    // 64 descriptors would not even hold the connections below.
    let server = Server::start_with_nofile(64, &[]);
    assert!(
        server.log_text().contains("raised the open files limit"),
        "{}",
        server.log_text()
    );
    let conns: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(server.addr).unwrap())
        .collect();
    for mut c in conns {
        use std::io::Read;
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut greeting = [0u8; 4];
        c.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"220 ");
    }
}

/// The local ports of the sockets `pid` listens on over IPv4 (from /proc).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports: Vec<u16> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is f[1] (HEXIP:HEXPORT), st is f[3] (0A: LISTEN), inode f[9].
            (f[3] == "0A" && inodes.contains(f[9]))
                .then(|| u16::from_str_radix(f[1].split(':').nth(1)?, 16).ok())
                .flatten()
        })
        .collect();
    ports.sort();
    ports
}

/// `--smtp 127.0.0.1:0`, `--pop3 127.0.0.1:0` and the TLS twins (what every test server uses): each
/// port is chosen once, every executor listens on it, and the ready line says which.
#[test]
fn port_0_is_one_port_for_every_executor_and_is_reported() {
    let server = Server::start(&["--cores", "2"]);
    assert_ne!(server.addr.port(), 0, "{}", server.log_text());
    let pid = server.child.as_ref().unwrap().id();
    // Each listener (SMTP, POP3, their implicit-TLS twins, submission) is one port, on both
    // executors; the admin listener one socket.
    let mut want: Vec<u16> = [
        server.addr,
        server.pop3,
        server.smtps,
        server.pop3s,
        server.submission,
    ]
    .iter()
    .flat_map(|a| [a.port(), a.port()])
    .collect();
    // The admin listener is executor 0's alone.
    want.push(server.admin.port());
    want.sort();
    assert_eq!(listening_ports(pid), want, "{}", server.log_text());
    assert!(
        server
            .log_text()
            .contains(&format!("listening smtp={}", server.addr)),
        "{}",
        server.log_text()
    );
    let mut c = server.connect();
    assert!(c.reply().starts_with("220 "));
}
