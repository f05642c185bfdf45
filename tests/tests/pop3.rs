//! POP3 end to end against the built binary, with real clients: python3 poplib (every
//! command), curl's pop3:// (list and fetch), a raw socket for the cases clients hide
//! (pipelining, long lines, a dropped connection). Mail arrives through SMTP
//! (smtplib) and local delivery, so what RETR sends is compared with what was sent.

use ringmail_tests::{binary, mailbox_list, run_ok, wait_inbox, Server};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "secret password";

fn server_with(users: &[&str]) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for u in users {
        ringmail_tests::user_add(&data, u, PASSWORD);
    }
    Server::start_in(Some(tmp), data, &[])
}

/// Runs a python3 script with the SMTP and POP3 ports as arguments; its stdout.
fn py(server: &Server, script: &str) -> String {
    let out = run_ok(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(server.addr.port().to_string())
            .arg(server.pop3.port().to_string()),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Sends `body` (a whole message, CRLF lines) to `to` over SMTP.
fn send(server: &Server, to: &str, body: &[u8]) {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    let mut expect = |r: &mut BufReader<TcpStream>, code: &str| loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "wanted {code}, got {line:?}");
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    };
    expect(&mut r, "220");
    s.write_all(b"EHLO test\r\n").unwrap();
    expect(&mut r, "250");
    s.write_all(format!("MAIL FROM:<sender@example.org>\r\nRCPT TO:<{to}>\r\nDATA\r\n").as_bytes())
        .unwrap();
    expect(&mut r, "250");
    expect(&mut r, "250");
    expect(&mut r, "354");
    let mut stuffed = Vec::with_capacity(body.len() + 16);
    for l in body.split_inclusive(|b| *b == b'\n') {
        if l.starts_with(b".") {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(l);
    }
    stuffed.extend_from_slice(b".\r\nQUIT\r\n");
    s.write_all(&stuffed).unwrap();
    expect(&mut r, "250");
}

/// Waits (bounded) until `address`'s INBOX holds `n` messages.
fn inbox_flags(server: &Server, address: &str) -> Vec<Vec<String>> {
    mailbox_list(&server.data, address, Some("INBOX"))
        .iter()
        .map(|v| {
            v["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

fn mailbox_show(server: &Server, address: &str, uid: u32) -> Vec<u8> {
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
            .arg(&server.data),
    )
    .stdout
}

/// A raw POP3 connection.
struct Pop {
    s: TcpStream,
    r: BufReader<TcpStream>,
}

impl Pop {
    fn connect(addr: SocketAddr) -> Pop {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut p = Pop {
            r: BufReader::new(s.try_clone().unwrap()),
            s,
        };
        assert!(p.line().starts_with("+OK"));
        p
    }

    fn login(addr: SocketAddr, user: &str) -> Pop {
        let mut p = Pop::connect(addr);
        p.send(&format!("USER {user}\r\nPASS {PASSWORD}\r\n"));
        assert!(p.line().starts_with("+OK"));
        let r = p.line();
        assert!(r.starts_with("+OK"), "{r}");
        p
    }

    fn send(&mut self, s: &str) {
        self.s.write_all(s.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }

    /// A multi-line response's body, raw (still stuffed), up to the terminating dot.
    fn multi(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut l = Vec::new();
            self.r.read_until(b'\n', &mut l).unwrap();
            assert!(
                !l.is_empty(),
                "connection closed inside a multi-line response"
            );
            if l == b".\r\n" {
                return out;
            }
            out.extend_from_slice(&l);
        }
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0))
    }
}

fn unstuff(stuffed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stuffed.len());
    for l in stuffed.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(l.strip_prefix(b".").unwrap_or(l));
    }
    out
}

#[test]
fn poplib_runs_every_command_and_retr_gives_the_message_as_sent() {
    let server = server_with(&["alice@localhost"]);
    let tricky: &[u8] = b"From: a@example.org\r\nTo: alice@localhost\r\nSubject: dots\r\n\r\n\
        .a line starting with a dot\r\n..two dots\r\n.\r\nna\xc3\xafve 8-bit \xe9t\xe9\r\nlast line\r\n";
    send(&server, "alice@localhost", tricky);
    for i in 2..=3 {
        let m = format!("Subject: m{i}\r\n\r\nbody {i}\r\nsecond line\r\nthird line\r\n");
        send(&server, "alice@localhost", m.as_bytes());
    }
    wait_inbox(&server, "alice@localhost", 3);
    let stored: Vec<Vec<u8>> = (1..=3)
        .map(|uid| mailbox_show(&server, "alice@localhost", uid))
        .collect();
    assert!(
        stored[0].ends_with(tricky),
        "the stored message ends with what was sent"
    );

    let out = py(
        &server,
        r#"
import poplib, sys, hashlib
p = poplib.POP3("127.0.0.1", int(sys.argv[2]), timeout=30)
print("welcome", p.getwelcome().decode()[:3])
caps = p.capa()
print("capa", " ".join(sorted(caps)))
print("user", p.user("alice@localhost").decode()[:3])
print("pass", p.pass_("secret password").decode()[:3])
count, size = p.stat()
print("stat", count, size)
resp, items, _ = p.list()
print("list", " ".join(i.decode() for i in items))
print("list1", p.list(1).decode())
resp, uidls, _ = p.uidl()
print("uidl", " ".join(u.decode() for u in uidls))
for n in (1, 2, 3):
    resp, lines, octets = p.retr(n)
    print("retr", n, resp.decode(), hashlib.sha256(b"\r\n".join(lines) + b"\r\n").hexdigest())
resp, lines, _ = p.top(2, 1)
print("top", len(lines), lines[-1].decode(), lines[-2] == b"")
resp, lines, _ = p.top(2, 0)
print("top0", lines[-1] == b"")
print("dele", p.dele(2).decode())
try:
    p.dele(2)
except poplib.error_proto as e:
    print("dele2", str(e)[:6])
print("stat2", p.stat())
print("rset", p.rset().decode()[:3])
print("stat3", p.stat())
print("noop", p.noop().decode())
print("dele3", p.dele(3).decode()[:3])
print("quit", p.quit().decode()[:3])
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    let get = |k: &str| -> String {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no {k} in {out}"))[k.len() + 1..]
            .to_string()
    };
    assert_eq!(get("welcome"), "+OK");
    let caps = get("capa");
    for c in [
        "TOP",
        "UIDL",
        "USER",
        "SASL",
        "RESP-CODES",
        "PIPELINING",
        "AUTH-RESP-CODE",
        "EXPIRE",
        "IMPLEMENTATION",
    ] {
        assert!(caps.split(' ').any(|x| x == c), "CAPA has {c}: {caps}");
    }
    assert!(
        caps.split(' ').any(|x| x == "STLS"),
        "STLS before TLS is on: {caps}"
    );
    assert!(!caps.contains("APOP"), "{caps}");
    assert_eq!(get("pass"), "+OK");
    let total: usize = stored.iter().map(|m| m.len()).sum();
    assert_eq!(
        get("stat"),
        format!("3 {total}"),
        "STAT's sizes are the octets RETR sends"
    );
    assert_eq!(
        get("list"),
        format!(
            "1 {} 2 {} 3 {}",
            stored[0].len(),
            stored[1].len(),
            stored[2].len()
        )
    );
    assert_eq!(get("list1"), format!("+OK 1 {}", stored[0].len()));
    let uidls: Vec<String> = get("uidl").split(' ').map(String::from).collect();
    assert_eq!(uidls.len(), 6, "{uidls:?}");
    let uidl_values: std::collections::HashSet<&String> = uidls.iter().skip(1).step_by(2).collect();
    assert_eq!(uidl_values.len(), 3, "UIDLs are unique: {uidls:?}");
    for (i, m) in stored.iter().enumerate() {
        let want = sha256(m);
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("retr {} ", i + 1)))
            .unwrap();
        assert!(
            line.ends_with(&want),
            "RETR {} is the stored message: {line}",
            i + 1
        );
        assert!(line.contains(&format!("+OK {} octets", m.len())), "{line}");
    }
    // TOP 2 1: the header block, the blank line, one body line.
    let top = get("top");
    assert!(top.ends_with("body 2 True"), "{top}");
    assert_eq!(get("top0"), "True");
    assert!(get("dele").starts_with("+OK"));
    assert_eq!(get("dele2"), "b'-ERR");
    assert_eq!(
        get("stat2"),
        format!("(2, {})", stored[0].len() + stored[2].len())
    );
    assert_eq!(get("stat3"), format!("(3, {total})"));
    assert_eq!(get("quit"), "+OK");
    // QUIT expunged message 3 (and only it); RETR marked the others \Seen.
    wait_inbox(&server, "alice@localhost", 2);
    let flags = inbox_flags(&server, "alice@localhost");
    assert!(
        flags.iter().all(|f| f.contains(&"\\Seen".to_string())),
        "{flags:?}"
    );
}

fn sha256(bytes: &[u8]) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys,hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn curl_lists_and_fetches_by_number() {
    let server = server_with(&["bob@localhost"]);
    send(&server, "bob@localhost", b"Subject: one\r\n\r\nfirst\r\n");
    send(&server, "bob@localhost", b"Subject: two\r\n\r\nsecond\r\n");
    wait_inbox(&server, "bob@localhost", 2);
    let url = format!("pop3://127.0.0.1:{}/", server.pop3.port());
    let list = run_ok(Command::new("curl").args([
        "-s",
        "--max-time",
        "30",
        "-u",
        &format!("bob@localhost:{PASSWORD}"),
        &url,
    ]));
    let text = String::from_utf8_lossy(&list.stdout).to_string();
    let stored2 = mailbox_show(&server, "bob@localhost", 2);
    assert!(text.contains(&format!("2 {}", stored2.len())), "{text}");
    let fetch = run_ok(Command::new("curl").args([
        "-s",
        "--max-time",
        "30",
        "-u",
        &format!("bob@localhost:{PASSWORD}"),
        &format!("{url}2"),
    ]));
    assert_eq!(unstuff(&fetch.stdout), stored2);
    // A wrong password: curl fails (67: login denied).
    let bad = Command::new("curl")
        .args(["-s", "--max-time", "30", "-u", "bob@localhost:wrong", &url])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn a_20_mib_message_comes_back_byte_identical() {
    let server = server_with(&["big@localhost"]);
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while body.len() < 20 << 20 {
        // Some lines start with a dot, some carry 8-bit text.
        let line = match i % 7 {
            0 => format!(".dot line {i}\r\n"),
            1 => format!("\u{e9}t\u{e9} {i} {}\r\n", "x".repeat(60)),
            _ => format!("line {i} {}\r\n", "y".repeat(70)),
        };
        body.extend_from_slice(line.as_bytes());
        i += 1;
    }
    send(&server, "big@localhost", &body);
    wait_inbox(&server, "big@localhost", 1);
    let stored = mailbox_show(&server, "big@localhost", 1);
    assert!(stored.ends_with(&body));
    let mut p = Pop::login(server.pop3, "big@localhost");
    p.send("RETR 1\r\n");
    let ok = p.line();
    assert_eq!(ok, format!("+OK {} octets\r\n", stored.len()));
    let got = unstuff(&p.multi());
    assert_eq!(got.len(), stored.len());
    assert!(got == stored, "RETR of 20 MiB is byte-identical");
    p.send("QUIT\r\n");
    assert!(p.line().starts_with("+OK"));
}

#[test]
fn a_second_login_is_in_use_and_a_dropped_session_expunges_nothing() {
    let server = server_with(&["carol@localhost"]);
    for i in 0..3 {
        send(
            &server,
            "carol@localhost",
            format!("Subject: {i}\r\n\r\nbody\r\n").as_bytes(),
        );
    }
    wait_inbox(&server, "carol@localhost", 3);
    let mut first = Pop::login(server.pop3, "carol@localhost");
    let mut second = Pop::connect(server.pop3);
    second.send(&format!("USER carol@localhost\r\nPASS {PASSWORD}\r\n"));
    assert!(second.line().starts_with("+OK"));
    let r = second.line();
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
    // DELE everything, then drop the connection without QUIT.
    first.send("DELE 1\r\nDELE 2\r\nDELE 3\r\nSTAT\r\n");
    for _ in 0..3 {
        assert!(first.line().starts_with("+OK"));
    }
    assert_eq!(first.line(), "+OK 0 0\r\n");
    drop(first);
    // The lock goes with the session: a new login works (bounded retries while the
    // server notices the close) and still sees all three.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        let mut p = Pop::connect(server.pop3);
        p.send(&format!("USER carol@localhost\r\nPASS {PASSWORD}\r\n"));
        assert!(p.line().starts_with("+OK"));
        let r = p.line();
        if r.starts_with("+OK") {
            break p;
        }
        assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
        assert!(
            Instant::now() < deadline,
            "the lock of a dropped session stays"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    again.send("STAT\r\n");
    assert!(again.line().starts_with("+OK 3 "));
    // Mail delivered during a session shows in the next one, not in this one.
    send(&server, "carol@localhost", b"Subject: late\r\n\r\nlate\r\n");
    wait_inbox(&server, "carol@localhost", 4);
    again.send("STAT\r\nQUIT\r\n");
    assert!(again.line().starts_with("+OK 3 "));
    assert!(again.line().starts_with("+OK"));
    let mut next = Pop::login(server.pop3, "carol@localhost");
    next.send("STAT\r\nQUIT\r\n");
    assert!(next.line().starts_with("+OK 4 "));
}

#[test]
fn bad_input_gets_err_and_the_session_goes_on() {
    let server = server_with(&["dave@localhost"]);
    send(&server, "dave@localhost", b"Subject: x\r\n\r\nx\r\n");
    wait_inbox(&server, "dave@localhost", 1);
    let mut p = Pop::connect(server.pop3);
    // A wrong password: [AUTH], and the session may try again.
    p.send("USER dave@localhost\r\nPASS wrong\r\n");
    assert!(p.line().starts_with("+OK"));
    let r = p.line();
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    // A command line over 255 octets, an unknown command, a command of the wrong state.
    p.send(&format!("NOOP {}\r\nFROB\r\nSTAT\r\n", "x".repeat(300)));
    for _ in 0..3 {
        let r = p.line();
        assert!(r.starts_with("-ERR"), "{r}");
    }
    // AUTH PLAIN with an initial response (authzid empty), pipelined with commands.
    let plain = base64(format!("\0dave@localhost\0{PASSWORD}").as_bytes());
    p.send(&format!(
        "AUTH PLAIN {plain}\r\nSTAT\r\nRETR 9\r\nLIST 1\r\nQUIT\r\n"
    ));
    let r = p.line();
    assert!(r.starts_with("+OK"), "{r}");
    assert!(p.line().starts_with("+OK 1 "));
    assert!(p.line().starts_with("-ERR"));
    assert!(p.line().starts_with("+OK 1 "));
    assert!(p.line().starts_with("+OK"));
    assert!(p.closed());
}

#[test]
fn uidl_is_stable_across_a_restart() {
    let mut server = server_with(&["erin@localhost"]);
    for i in 0..3 {
        send(
            &server,
            "erin@localhost",
            format!("Subject: {i}\r\n\r\nbody\r\n").as_bytes(),
        );
    }
    wait_inbox(&server, "erin@localhost", 3);
    let uidl = |server: &Server| {
        let mut p = Pop::login(server.pop3, "erin@localhost");
        p.send("UIDL\r\n");
        assert!(p.line().starts_with("+OK"));
        let list = String::from_utf8(p.multi()).unwrap();
        p.send("QUIT\r\n");
        assert!(p.line().starts_with("+OK"));
        list
    };
    let before = uidl(&server);
    assert_eq!(before.lines().count(), 3, "{before}");
    assert_eq!(server.terminate(), Some(0));
    server.restart();
    assert_eq!(uidl(&server), before);
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
