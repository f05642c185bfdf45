//! TLS end to end against the built binary, with real clients: python3's smtplib
//! (`starttls`, `SMTP_SSL`) and poplib (`stls`, `POP3_SSL`) verifying the embedded
//! self-signed certificate, curl over STARTTLS and implicit TLS, raw sockets for the
//! command-injection case (plaintext pipelined after STARTTLS/STLS), and SNI choosing
//! between configured certificates; SMTP AUTH and the submission service, which
//! need TLS.

use ringmail_tests::{binary, run_ok, user_add, user_add_with, wait_inbox, Server};
use std::process::Command;
use std::time::{Duration, Instant};

const PASSWORD: &str = "secret password";
const HOST: &str = "mx.ringmail.test";

fn server_with(users: &[&str], args: &[&str]) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for u in users {
        user_add(&data, u, PASSWORD);
    }
    Server::start_in(Some(tmp), data, args)
}

/// The self-signed certificate the server made for its hostname.
fn self_signed(server: &Server) -> String {
    server
        .data
        .join(format!("tls/{HOST}.pem"))
        .to_string_lossy()
        .into_owned()
}

/// Runs a python3 script with argv: SMTP, POP3, SMTPS, POP3S ports, then `extra`.
fn py(server: &Server, script: &str, extra: &[&str]) -> String {
    let ports =
        [server.addr, server.pop3, server.smtps, server.pop3s].map(|a| a.port().to_string());
    let out = run_ok(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(ports)
            .args(extra),
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn smtplib_and_poplib_use_starttls_stls_and_implicit_tls_with_the_self_signed_certificate() {
    let server = server_with(&["bob@localhost"], &[]);
    let ca = self_signed(&server);
    // Verified: the certificate names `localhost` besides the hostname, and the
    // clients check it against the name they connect to.
    let sent = py(
        &server,
        r#"
import sys, smtplib, ssl
smtp, smtps, ca = int(sys.argv[1]), int(sys.argv[3]), sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP('localhost', smtp, timeout=30)
s.ehlo('client.test')
assert s.has_extn('starttls'), s.esmtp_features
code, _ = s.starttls(context=ctx)
print('smtp', code, s.sock.version())
s.ehlo('client.test')
assert not s.has_extn('starttls'), 'offered again under TLS'
print('again', s.docmd('STARTTLS')[0])
s.sendmail('alice@example.org', ['bob@localhost'], b'Subject: one\r\n\r\nover STARTTLS\r\n')
s.quit()
s = smtplib.SMTP_SSL('localhost', smtps, context=ctx, timeout=30)
s.ehlo('client.test')
assert not s.has_extn('starttls')
s.sendmail('alice@example.org', ['bob@localhost'], b'Subject: two\r\n\r\nover implicit TLS\r\n')
s.quit()
# TLS 1.2 is offered too, for clients without 1.3.
old = ssl.create_default_context(cafile=ca)
old.maximum_version = ssl.TLSVersion.TLSv1_2
s = smtplib.SMTP_SSL('localhost', smtps, context=old, timeout=30)
print('tls12', s.sock.version())
s.quit()
"#,
        &[&ca],
    );
    assert_eq!(
        sent,
        "smtp 220 TLSv1.3\nagain 554\ntls12 TLSv1.2\n",
        "{}",
        server.log_text()
    );
    wait_inbox(&server, "bob@localhost", 2);
    let fetched = py(
        &server,
        r#"
import sys, poplib, ssl
pop3, pop3s, ca = int(sys.argv[2]), int(sys.argv[4]), sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
p = poplib.POP3('localhost', pop3, timeout=30)
assert 'STLS' in p.capa()
print(p.stls(context=ctx).decode(), p.sock.version())
assert 'STLS' not in p.capa()
p.user('bob@localhost'); p.pass_('secret password')
text = b'\n'.join(p.retr(1)[1])
print(p.stat()[0], b'with ESMTPS' in text, b'over STARTTLS' in text)
p.quit()
p = poplib.POP3_SSL('localhost', pop3s, context=ctx, timeout=30)
assert 'STLS' not in p.capa()
p.user('bob'); p.pass_('secret password')
print('pop3s', p.sock.version(), b'over implicit TLS' in b'\n'.join(p.retr(2)[1]))
p.quit()
"#,
        &[&ca],
    );
    assert_eq!(
        fetched,
        "+OK begin TLS negotiation TLSv1.3\n2 True True\npop3s TLSv1.3 True\n",
        "{}",
        server.log_text()
    );
}

#[test]
fn curl_sends_and_fetches_over_starttls_and_implicit_tls() {
    let server = server_with(&["bob@localhost"], &[]);
    let tmp = tempfile::tempdir().unwrap();
    let msg = tmp.path().join("m.txt");
    std::fs::write(&msg, "Subject: by curl\r\n\r\nsent by curl\r\n").unwrap();
    let ca = self_signed(&server);
    let resolve = |port: u16| format!("{HOST}:{port}:127.0.0.1");
    for (url, port) in [
        (
            format!("smtp://{HOST}:{}", server.addr.port()),
            server.addr.port(),
        ),
        (
            format!("smtps://{HOST}:{}", server.smtps.port()),
            server.smtps.port(),
        ),
    ] {
        run_ok(
            Command::new("curl")
                .args([
                    "-sS",
                    "--ssl-reqd",
                    "--cacert",
                    &ca,
                    "--resolve",
                    &resolve(port),
                    &url,
                    "--mail-from",
                    "alice@example.org",
                    "--mail-rcpt",
                    "bob@localhost",
                    "-T",
                ])
                .arg(&msg),
        );
    }
    wait_inbox(&server, "bob@localhost", 2);
    let list = run_ok(Command::new("curl").args([
        "-sS",
        "--ssl-reqd",
        "--cacert",
        &ca,
        "--resolve",
        &resolve(server.pop3.port()),
        "-u",
        "bob@localhost:secret password",
        &format!("pop3://{HOST}:{}/", server.pop3.port()),
    ]));
    let list = String::from_utf8(list.stdout).unwrap();
    assert_eq!(list.lines().count(), 2, "{list}");
    let fetched = run_ok(Command::new("curl").args([
        "-sS",
        "--cacert",
        &ca,
        "--resolve",
        &resolve(server.pop3s.port()),
        "-u",
        "bob:secret password",
        &format!("pop3s://{HOST}:{}/2", server.pop3s.port()),
    ]));
    let fetched = String::from_utf8(fetched.stdout).unwrap();
    assert!(
        fetched.contains("sent by curl") && fetched.contains("with ESMTPS"),
        "{fetched}"
    );
}

/// CVE-2011-0411: a command pipelined in plaintext after STARTTLS (or STLS), in the
/// same write, must never be answered as if it came under TLS.
#[test]
fn plaintext_pipelined_after_starttls_or_stls_is_never_answered() {
    let server = server_with(&[], &[]);
    let out = py(
        &server,
        r#"
import sys, socket, ssl
smtp, pop3 = int(sys.argv[1]), int(sys.argv[2])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
def reply(f):
    lines = []
    while True:
        l = f.readline()
        lines.append(l)
        if l[3:4] != b'-': return lines
s = socket.create_connection(('127.0.0.1', smtp), timeout=30); f = s.makefile('rb')
reply(f)
s.sendall(b'EHLO c.test\r\n'); reply(f)
s.sendall(b'STARTTLS\r\nRSET\r\n')
print(f.readline().decode().strip())
t = ctx.wrap_socket(s); f = t.makefile('rb')
# HELP's 214 must be the first reply under TLS: RSET's 250 would come before it.
t.sendall(b'HELP\r\n')
print('smtp first under TLS:', f.readline()[:3].decode())
s = socket.create_connection(('127.0.0.1', pop3), timeout=30); f = s.makefile('rb')
f.readline()
s.sendall(b'STLS\r\nSTAT\r\n')
print(f.readline().decode().strip())
t = ctx.wrap_socket(s); f = t.makefile('rb')
# CAPA's +OK must come first: STAT before login would be -ERR.
t.sendall(b'CAPA\r\n')
print('pop3 first under TLS:', f.readline()[:3].decode())
"#,
        &[],
    );
    assert_eq!(
        out,
        "220 2.0.0 Ready to start TLS\nsmtp first under TLS: 214\n+OK begin TLS negotiation\npop3 first under TLS: +OK\n"
    );
}

#[test]
fn sni_picks_the_configured_certificate_for_the_name_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = Vec::new();
    let mut ders = Vec::new();
    for name in ["a.example.test", "b.example.test"] {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (cert, key) = (
            tmp.path().join(format!("{name}.pem")),
            tmp.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        args.extend([
            "--tls-certificate".to_string(),
            cert.to_string_lossy().into_owned(),
            "--tls-key".to_string(),
            key.to_string_lossy().into_owned(),
        ]);
        ders.push(
            made.cert
                .der()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        );
    }
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let server = server_with(&[], &args);
    let out = py(
        &server,
        r#"
import sys, socket, ssl
smtps = int(sys.argv[3])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
for name in ['a.example.test', 'b.example.test', 'other.test']:
    t = ctx.wrap_socket(socket.create_connection(('127.0.0.1', smtps), timeout=30), server_hostname=name)
    print(t.getpeercert(binary_form=True).hex())
    t.close()
"#,
        &[],
    );
    let got: Vec<&str> = out.lines().collect();
    // The name's own certificate; an unknown name gets the first.
    assert_eq!(got, [&ders[0], &ders[1], &ders[0]]);
    assert!(
        !server.data.join("tls").exists(),
        "made a self-signed certificate although certificates are configured"
    );
}

#[test]
fn certificate_settings_that_cannot_work_stop_the_server_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let missing = tmp.path().join("missing.pem");
    let serve = |extra: &[&str]| {
        let out = Command::new(binary())
            .arg("serve")
            .arg("--data")
            .arg(&data)
            .args(ringmail_tests::port_zero(ringmail_tests::LISTENERS))
            .args(["--dns", "127.0.0.1:9"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let m = missing.to_str().unwrap();
    let err = serve(&["--tls-certificate", m]);
    assert!(
        err.contains("`tls-certificate` and `tls-key` go in pairs"),
        "{err}"
    );
    let err = serve(&["--tls-certificate", m, "--tls-key", m]);
    assert!(
        err.contains("cannot read certificates from") && err.contains("missing.pem"),
        "{err}"
    );
}

/// SMTP AUTH (RFC 4954) with smtplib and curl: only under TLS, wrong passwords
/// refused after the failure delay, relaying and the sender address tied to the login.
#[test]
fn smtp_auth_after_starttls_lets_a_user_relay_as_itself() {
    // Loopback is not a relay network here: relaying needs AUTH.
    let server = server_with(
        &["bob@localhost", "carol@localhost"],
        &[
            "--relay-network",
            "192.0.2.0/24",
            "--auth-failure-delay",
            "1",
        ],
    );
    let ca = self_signed(&server);
    let out = py(
        &server,
        r#"
import sys, smtplib, ssl, time
smtp, ca = int(sys.argv[1]), sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP('localhost', smtp, timeout=30)
s.ehlo('client.test')
print('before TLS', s.has_extn('auth'))
try:
    s.login('bob@localhost', 'secret password')
except smtplib.SMTPNotSupportedError:
    print('login refused before TLS')
print(s.docmd('AUTH', 'PLAIN AGJvYkBsb2NhbGhvc3QAc2VjcmV0IHBhc3N3b3Jk')[0])
s.mail('bob@localhost')
print('relay before AUTH', s.rcpt('someone@remote.test')[0])
s.rset()
s.starttls(context=ctx)
s.ehlo('client.test')
print('under TLS', s.esmtp_features.get('auth', '').strip())
t = time.monotonic()
try:
    s.login('bob@localhost', 'wrong')
except smtplib.SMTPAuthenticationError as e:
    print('wrong password', e.smtp_code, time.monotonic() - t >= 0.9)
s.user, s.password = 'bob@localhost', 'secret password'
print('login', s.auth('LOGIN', s.auth_login, initial_response_ok=False)[0])
print('other sender', s.mail('carol@localhost')[0])
s.rset()
print('own sender', s.mail('bob@localhost')[0], 'relay', s.rcpt('someone@remote.test')[0], s.rcpt('carol@localhost')[0])
code, _ = s.data(b'Subject: authenticated\r\n\r\nhello\r\n')
print('data', code)
s.quit()
"#,
        &[&ca],
    );
    assert_eq!(
        out,
        "before TLS False\nlogin refused before TLS\n538\nrelay before AUTH 554\n\
         under TLS PLAIN LOGIN\nwrong password 535 True\nlogin 235\nother sender 553\n\
         own sender 250 relay 250 250\ndata 250\n",
        "{}",
        server.log_text()
    );
    wait_inbox(&server, "carol@localhost", 1);
    let shown = run_ok(
        Command::new(binary())
            .args(["mailbox", "show", "carol@localhost", "--uid", "1", "--data"])
            .arg(&server.data),
    );
    let shown = String::from_utf8(shown.stdout).unwrap();
    assert!(
        shown.contains("(Authenticated sender: bob@localhost)") && shown.contains("with ESMTPSA"),
        "{shown}"
    );
    // curl authenticates with PLAIN over STARTTLS and relays.
    let tmp = tempfile::tempdir().unwrap();
    let msg = tmp.path().join("m.txt");
    std::fs::write(&msg, "Subject: by curl\r\n\r\nsent by curl\r\n").unwrap();
    let url = format!("smtp://localhost:{}", server.addr.port());
    let sent = Command::new("curl")
        .args([
            "-sS",
            "--ssl-reqd",
            "--cacert",
            &ca,
            &url,
            "-u",
            "carol@localhost:secret password",
        ])
        .args([
            "--mail-from",
            "carol@localhost",
            "--mail-rcpt",
            "someone@remote.test",
            "-T",
        ])
        .arg(&msg)
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        server.log_text().contains("smtp auth user=carol@localhost"),
        "{}",
        server.log_text()
    );
}

/// Message submission (RFC 6409): AUTH before MAIL, STARTTLS before AUTH, and a
/// message without `Date:` or `Message-ID:` gets them.
#[test]
fn submission_requires_tls_and_auth_and_adds_date_and_message_id() {
    let server = server_with(&["bob@localhost", "carol@localhost"], &[]);
    let ca = self_signed(&server);
    let port = server.submission.port().to_string();
    let out = py(
        &server,
        r#"
import sys, smtplib, ssl
port, ca = int(sys.argv[6]), sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP('localhost', port, timeout=30)
s.ehlo('client.test')
print('plaintext', s.has_extn('auth'), s.mail('bob@localhost')[0])
s.starttls(context=ctx)
s.ehlo('client.test')
print('tls, before AUTH', s.mail('bob@localhost')[0])
s.login('bob@localhost', 'secret password')
s.sendmail('bob@localhost', ['carol@localhost'], b'Subject: bare\r\n\r\nno date, no id\r\n')
s.sendmail('bob@localhost', ['carol@localhost'],
    b'Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <own@client.test>\r\nSubject: full\r\n\r\nhas both\r\n')
s.quit()
"#,
        &[&ca, &port],
    );
    assert_eq!(
        out,
        "plaintext False 530\ntls, before AUTH 530\n",
        "{}",
        server.log_text()
    );
    wait_inbox(&server, "carol@localhost", 2);
    let show = |uid: &str| {
        let o = run_ok(
            Command::new(binary())
                .args(["mailbox", "show", "carol@localhost", "--uid", uid, "--data"])
                .arg(&server.data),
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let count = |text: &str, field: &str| {
        text.split("\r\n\r\n")
            .next()
            .unwrap()
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with(field))
            .count()
    };
    let bare = show("1");
    assert_eq!(
        (count(&bare, "date:"), count(&bare, "message-id:")),
        (1, 1),
        "{bare}"
    );
    assert!(bare.contains("@mx.ringmail.test>"), "{bare}");
    let full = show("2");
    assert_eq!(
        (count(&full, "date:"), count(&full, "message-id:")),
        (1, 1),
        "{full}"
    );
    assert!(full.contains("Message-ID: <own@client.test>"), "{full}");
}

/// A ringmail for `x.test` (user bob) to deliver to, as its MX `mx.ringmail.test`,
/// and a name server that says so.
fn receiving_mx() -> (Server, ringmail_tests::dns::DnsServer) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    user_add_with(&data, "bob@x.test", PASSWORD, &["--local-domain", "x.test"]);
    let b = Server::start_in(Some(tmp), data, &["--local-domain", "x.test"]);
    let zone = ringmail_tests::dns::Zone::default()
        .mx("x.test", 10, HOST)
        .a(HOST, "127.0.0.1");
    (b, ringmail_tests::dns::DnsServer::start(zone))
}

/// A relaying ringmail (`relay.ringmail.test`) whose mail for x.test goes to `b` by
/// its MX record, under `extra` TLS settings.
fn sending_relay(b: &Server, dns: &ringmail_tests::dns::DnsServer, extra: &[&str]) -> Server {
    let (dns, port) = (dns.addr.to_string(), b.addr.port().to_string());
    let mut args = vec![
        "--hostname",
        "relay.ringmail.test",
        "--local-domain",
        "relay.test",
        "--dns",
        &dns,
        "--mx-port",
        &port,
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn send_to(server: &Server, to: &str, subject: &str) {
    py(
        server,
        r#"
import sys, smtplib
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=30)
s.sendmail('alice@relay.test', [sys.argv[5]], 'Subject: %s\r\n\r\nover TLS, or not\r\n' % sys.argv[6])
s.quit()
"#,
        &[to, subject],
    );
}

/// The relay's delivery log lines for `to`, once there are `n` of them.
fn delivery_lines(server: &Server, to: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines: Vec<String> = server
            .log_text()
            .lines()
            .filter(|l| l.contains(" delivery ") && l.contains(&format!("to=<{to}>")))
            .map(str::to_string)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{n} delivery lines for {to}: {}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn delivery_uses_starttls_opportunistically_and_resumes_the_tls_session() {
    let (b, dns) = receiving_mx();
    let a = sending_relay(&b, &dns, &[]);
    send_to(&a, "bob@x.test", "first");
    wait_inbox(&b, "bob@x.test", 1);
    let line = &delivery_lines(&a, "bob@x.test", 1)[0];
    assert!(line.contains("status=sent"), "{line}");
    assert!(line.contains("tls=TLSv1.3:TLS13_"), "{line}");
    // The receiving side saw TLS: its Received header says ESMTPS.
    let fetched = py(
        &b,
        r#"
import sys, poplib
p = poplib.POP3('127.0.0.1', int(sys.argv[2]), timeout=30)
p.user('bob@x.test'); p.pass_(sys.argv[5])
print(b'\n'.join(p.retr(1)[1]).decode())
p.quit()
"#,
        &[PASSWORD],
    );
    assert!(fetched.contains("with ESMTPS"), "{fetched}");
    // A later connection (the first one's idle time in the pool, 5 s, ran out)
    // resumes the TLS session instead of a full handshake.
    std::thread::sleep(Duration::from_secs(6));
    send_to(&a, "bob@x.test", "second");
    wait_inbox(&b, "bob@x.test", 2);
    let line = &delivery_lines(&a, "bob@x.test", 2)[1];
    assert!(line.contains("status=sent"), "{line}");
    assert!(line.contains(":resumed"), "{line}");
}

#[test]
fn verify_defers_on_an_unknown_certificate_and_delivers_with_its_ca() {
    let (b, dns) = receiving_mx();
    let a = sending_relay(&b, &dns, &["--tls-policy", "x.test=verify"]);
    send_to(&a, "bob@x.test", "verified?");
    let line = &delivery_lines(&a, "bob@x.test", 1)[0];
    assert!(line.contains("status=deferred"), "{line}");
    assert!(line.contains("TLS handshake failed"), "{line}");
    assert!(line.contains("certificate"), "{line}");
    assert_eq!(a.queue().len(), 1, "kept for a retry");

    // With the receiving server's self-signed certificate as the trusted CA, the MX
    // host's name checks out.
    let ca = self_signed(&b);
    let a = sending_relay(
        &b,
        &dns,
        &["--tls-policy", "x.test=verify", "--tls-ca-file", &ca],
    );
    send_to(&a, "bob@x.test", "verified");
    wait_inbox(&b, "bob@x.test", 1);
    let line = &delivery_lines(&a, "bob@x.test", 1)[0];
    assert!(line.contains("status=sent"), "{line}");
    assert!(line.contains("tls=TLSv1.3"), "{line}");
}

#[test]
fn encrypt_defers_at_a_server_without_starttls_and_none_never_asks() {
    let sink = ringmail_tests::sink::Sink::start(
        "127.0.0.1:0".parse().unwrap(),
        ringmail_bench::sink::Faults::default(),
    );
    let (b, dns) = receiving_mx();
    let route = format!("plain.test=127.0.0.1:{}", sink.addr.port());
    let a = sending_relay(
        &b,
        &dns,
        &[
            "--route",
            &route,
            "--tls-policy",
            "plain.test=encrypt",
            "--tls-policy",
            "x.test=none",
        ],
    );
    send_to(&a, "carol@plain.test", "must be encrypted");
    let line = &delivery_lines(&a, "carol@plain.test", 1)[0];
    assert!(line.contains("status=deferred"), "{line}");
    assert!(line.contains("4.7.4"), "{line}");
    assert!(line.contains("does not offer STARTTLS"), "{line}");
    send_to(&a, "bob@x.test", "in clear");
    wait_inbox(&b, "bob@x.test", 1);
    let line = &delivery_lines(&a, "bob@x.test", 1)[0];
    assert!(line.contains("status=sent"), "{line}");
    assert!(line.contains("tls=none"), "{line}");
}

/// A self-signed certificate for `name` written to `cert`/`key`; its DER in hex.
fn write_certificate(name: &str, cert: &std::path::Path, key: &std::path::Path) -> String {
    let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    std::fs::write(cert, made.cert.pem()).unwrap();
    std::fs::write(key, made.key_pair.serialize_pem()).unwrap();
    made.cert.der().iter().map(|b| format!("{b:02x}")).collect()
}

fn sighup(server: &Server) {
    let pid = server.child.as_ref().unwrap().id() as i32;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

fn wait_log(server: &Server, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.log_text().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {needle:?}: {}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_rereads_the_certificates_without_dropping_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("mx.pem"), tmp.path().join("mx.key"));
    let first = write_certificate("localhost", &cert, &key);
    let (c, k) = (cert.to_string_lossy(), key.to_string_lossy());
    let server = server_with(
        &["bob@localhost"],
        &["--tls-certificate", &c, "--tls-key", &k],
    );
    // A python session that opens TLS, prints the certificate, waits for a line on
    // stdin (the reload happens meanwhile), then sends a message on the same session
    // and prints the certificate of a new connection.
    let mut session = Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import sys, smtplib, ssl, socket
port = int(sys.argv[1])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP('127.0.0.1', port, timeout=30)
s.starttls(context=ctx)
print(s.sock.getpeercert(binary_form=True).hex(), flush=True)
sys.stdin.readline()
s.sendmail('a@remote.test', ['bob@localhost'], 'Subject: across a reload\r\n\r\nstill here\r\n')
s.quit()
n = smtplib.SMTP('127.0.0.1', port, timeout=30)
n.starttls(context=ctx)
print(n.sock.getpeercert(binary_form=True).hex(), flush=True)
n.quit()
"#,
        )
        .arg(server.addr.port().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut out = std::io::BufReader::new(session.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), first);

    // A broken file: the reload fails, said in the log, and the old certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    sighup(&server);
    wait_log(&server, "the certificates in use stay", 1);
    assert!(server.log_text().contains(&*k), "names the file");
    // And a handshake now still gets the first certificate.
    let now = py(
        &server,
        r#"
import sys, socket, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[3])), timeout=30), server_hostname='localhost')
print(t.getpeercert(binary_form=True).hex())
t.close()
"#,
        &[],
    );
    assert_eq!(now.trim(), first, "the certificate in use stayed");

    let second = write_certificate("localhost", &cert, &key);
    sighup(&server);
    wait_log(&server, "TLS certificates re-read", 1);
    writeln!(session.stdin.take().unwrap()).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        second,
        "a new session gets the new certificate"
    );
    assert!(
        session.wait().unwrap().success(),
        "the open session went on"
    );
    wait_inbox(&server, "bob@localhost", 1);
}
