//! Inbound mail authentication end to end against the built binary, with verdicts
//! from the test DNS server's crafted records: SPF pass, fail, softfail, neutral,
//! none, permerror (11 lookups), temperror (SERVFAIL, and no answer at all); DKIM
//! pass, fail (body changed), a bad key, a missing key; DMARC pass through SPF
//! alignment and through DKIM alignment, fail under `p=reject` (recorded, or refused
//! with 550 5.7.1 when enforced), none; a forged `Authentication-Results:` renamed;
//! temporary DNS failures deferred (451 4.7.5) when configured; our own users' mail
//! not verified; an alias forwarding elsewhere, with an ARC chain over two hops.

use ringmail::mailauth::{Algorithm, DkimKeyConfig, Signers};
use ringmail_tests::dns::{DnsServer, Zone};
use ringmail_tests::{
    binary, dkim_generate, mailbox_list, run_ok, txt_record, user_add, user_add_with, Server,
};
use std::process::Command;
use std::time::{Duration, Instant};

const HOST: &str = "mx.ringmail.test";

/// The zone every test here uses, and the DKIM key published in it (selector s1 of
/// dk.test).
fn zone(dkim_record: &str) -> Zone {
    let mut z = Zone::default()
        .txt("spf-pass.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("_dmarc.spf-pass.test", "v=DMARC1; p=reject")
        .txt("spf-fail.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("spf-soft.test", "v=spf1 ~all")
        .txt("spf-neutral.test", "v=spf1 ?all")
        .a("spf-none.test", "192.0.2.9")
        .txt("dm-reject.test", "v=spf1 -all")
        .txt("_dmarc.dm-reject.test", "v=DMARC1; p=reject")
        .servfail("spf-temp.test")
        .silent_name("spf-timeout.test")
        .txt("s1._domainkey.dk.test", dkim_record)
        .txt(
            "bad._domainkey.dk.test",
            "v=DKIM1; k=ed25519; p=bm90IGEga2V5",
        )
        .txt("_dmarc.dk.test", "v=DMARC1; p=reject")
        .a("dk.test", "192.0.2.10");
    // Eleven mechanisms that each cost a lookup: RFC 7208 §4.6.4 allows ten.
    let many: Vec<String> = (1..=11).map(|i| format!("a:h{i}.spf-perm.test")).collect();
    z = z.txt("spf-perm.test", &format!("v=spf1 {} -all", many.join(" ")));
    for i in 1..=11 {
        z = z.a(&format!("h{i}.spf-perm.test"), "192.0.2.11");
    }
    z
}

/// A key for dk.test (selector s1) made by `ringmail dkim generate`, its record, and
/// a signer with it.
fn dk_key(dir: &std::path::Path) -> (String, Signers) {
    let (record, key) = dkim_generate(dir, "dk.test", "s1", "ed25519");
    let (_, value) = txt_record(&record);
    let signers = Signers::load(&[DkimKeyConfig {
        domain: "dk.test".into(),
        selector: "s1".into(),
        key: key.into(),
        algorithm: Algorithm::Ed25519,
        headers: vec![],
    }])
    .unwrap();
    (value, signers)
}

fn message(from: &str, subject: &str, extra: &str) -> Vec<u8> {
    format!("{extra}From: <{from}>\r\nTo: bob@localhost\r\nSubject: {subject}\r\n\r\nhello\r\n")
        .into_bytes()
}

fn signed(signers: &Signers, text: &[u8]) -> Vec<u8> {
    let s = signers
        .sign(b"", &ringmail::smtp::Body::from(text.to_vec()), &|_| true)
        .expect("a key for the From: domain")
        .expect("signed");
    [s.header.as_bytes(), text].concat()
}

/// Sends `text` from `mail_from` (HELO client.test); the reply code to the data.
fn send(server: &Server, mail_from: &str, text: &[u8]) -> String {
    let script = r#"
import sys, smtplib
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=60)
s.ehlo('client.test')
try:
    s.sendmail(sys.argv[2], ['bob@localhost'], sys.stdin.buffer.read())
    print('250')
except smtplib.SMTPDataError as e:
    print(e.smtp_code, e.smtp_error.decode())
s.quit()
"#;
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", script, &server.addr.port().to_string(), mail_from])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The stored message whose Subject is `subject` (prefixes included).
fn stored(server: &Server, subject: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for m in mailbox_list(&server.data, "bob@localhost", Some("INBOX")) {
            let uid = m["uid"].as_u64().unwrap().to_string();
            let text = run_ok(
                Command::new(binary())
                    .args(["mailbox", "show", "bob@localhost", "--uid", &uid, "--data"])
                    .arg(&server.data),
            )
            .stdout;
            let text = String::from_utf8_lossy(&text).into_owned();
            if text.contains(&format!("\r\nSubject: {subject}\r\n")) {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "no message {subject}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Our Authentication-Results field of a stored message, unfolded.
fn results(text: &str) -> String {
    let start = text
        .find(&format!("Authentication-Results: {HOST};"))
        .unwrap_or_else(|| panic!("no results in {text}"));
    let field = &text[start..];
    let mut end = 0;
    while let Some(i) = field[end..].find("\r\n") {
        end += i + 2;
        if !field[end..].starts_with([' ', '\t']) {
            break;
        }
    }
    field[..end].replace("\r\n", "")
}

fn verifying_server(extra: &[&str]) -> (Server, DnsServer, Signers) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    user_add(&data, "bob@localhost", "pw");
    let (record, signers) = dk_key(&tmp.path().join("keys"));
    let dns = DnsServer::start(zone(&record));
    let dns_addr = dns.addr.to_string();
    // 127.0.0.1 is outside the relay networks: every test client is a stranger.
    let mut args = vec!["--dns", &dns_addr, "--relay-network", "192.0.2.0/24"];
    args.extend_from_slice(extra);
    let server = Server::start_in(Some(tmp), data, &args);
    (server, dns, signers)
}

#[test]
fn verdicts_are_recorded_in_authentication_results_and_the_log() {
    let (server, _dns, signers) = verifying_server(&[]);
    // Unsigned, From: the envelope sender: (sender, subject, words expected).
    let spf: [(&str, &str, &[&str]); 9] = [
        ("a@spf-pass.test", "spf pass", &["spf=pass", "dmarc=pass"]),
        ("a@spf-fail.test", "spf fail", &["spf=fail"]),
        ("a@spf-soft.test", "spf softfail", &["spf=softfail"]),
        ("a@spf-neutral.test", "spf neutral", &["spf=neutral"]),
        ("a@spf-none.test", "spf none", &["spf=none", "dmarc=none"]),
        ("a@spf-perm.test", "spf permerror", &["spf=permerror"]),
        ("a@spf-temp.test", "spf temperror", &["spf=temperror"]),
        // No answer at all: the lookup times out, a temporary error too.
        ("a@spf-timeout.test", "spf timeout", &["spf=temperror"]),
        (
            "a@dm-reject.test",
            "dmarc fail",
            &["spf=fail", "dmarc=fail", "policy.dmarc=reject"],
        ),
    ];
    let mut cases: Vec<(&str, &str, Vec<u8>, &[&str])> = spf
        .iter()
        .map(|&(from, subject, want)| (from, subject, message(from, subject, ""), want))
        .collect();
    // DKIM aligned with From: dk.test, the envelope elsewhere: DMARC passes by DKIM.
    cases.push((
        "a@spf-none.test",
        "dkim pass",
        signed(&signers, &message("a@dk.test", "dkim pass", "")),
        &["dkim=pass", "header.d=dk.test", "dmarc=pass"],
    ));
    cases.push((
        "a@spf-none.test",
        "no signature",
        message("a@dk.test", "no signature", ""),
        &["dkim=none", "dmarc=fail"],
    ));
    for (mail_from, subject, text, want) in &cases {
        assert_eq!(send(&server, mail_from, text), "250", "{subject}");
        let r = results(&stored(&server, subject));
        for w in *want {
            assert!(r.contains(w), "{subject}: no {w} in {r}");
        }
    }
    // The body changed after signing: the signature fails.
    let mut changed = signed(&signers, &message("a@dk.test", "dkim fail", ""));
    let n = changed.len();
    changed[n - 4] = b'X';
    assert_eq!(send(&server, "a@spf-none.test", &changed), "250");
    let r = results(&stored(&server, "dkim fail"));
    // mail-auth words a body hash mismatch `neutral` (RFC 6376 §6.1.3 calls it a
    // failure); either way not a pass, and it says why.
    assert!(r.contains("dkim=fail") || r.contains("dkim=neutral"), "{r}");
    assert!(r.contains("body hash did not verify"), "{r}");
    // A key that is not one, and a selector without a record.
    for (selector, subject) in [("bad", "bad key"), ("gone", "missing key")] {
        let text = signed(&signers, &message("a@dk.test", subject, ""));
        let text = String::from_utf8(text)
            .unwrap()
            .replacen("s=s1;", &format!("s={selector};"), 1);
        assert_eq!(send(&server, "a@spf-none.test", text.as_bytes()), "250");
        let r = results(&stored(&server, subject));
        assert!(!r.contains("dkim=pass"), "{subject}: {r}");
        // A broken key fails; a missing one is a permanent error (never temporary:
        // the name does not exist).
        assert!(
            ["dkim=fail", "dkim=permerror", "dkim=neutral"]
                .iter()
                .any(|w| r.contains(w)),
            "{subject}: {r}"
        );
    }
    // The log line of each message carries the same words.
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(" queued ") && l.contains("spf=pass") && l.contains("dmarc=pass")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(" queued ") && l.contains("spf=softfail")),
        "{log}"
    );
}

#[test]
fn a_forged_authentication_results_does_not_survive() {
    let (server, _dns, _) = verifying_server(&[]);
    let forged = format!("Authentication-Results: {HOST}; spf=pass smtp.mailfrom=a@dm-reject.test; dmarc=pass\r\nAuthentication-Results: other.test; dkim=pass\r\n");
    let text = message("a@dm-reject.test", "forged", &forged);
    assert_eq!(send(&server, "a@dm-reject.test", &text), "250");
    let m = stored(&server, "forged");
    assert!(
        m.contains(&format!(
            "X-Forged-Authentication-Results: {HOST}; spf=pass"
        )),
        "{m}"
    );
    assert!(
        m.contains("Authentication-Results: other.test; dkim=pass"),
        "not ours: kept"
    );
    // Ours, once, with the real verdict.
    assert_eq!(
        m.matches(&format!("\r\nAuthentication-Results: {HOST};"))
            .count()
            + usize::from(m.starts_with(&format!("Authentication-Results: {HOST};"))),
        1,
        "{m}"
    );
    assert!(results(&m).contains("dmarc=fail"), "{m}");
}

#[test]
fn dmarc_reject_is_refused_when_enforced_and_dns_failures_deferred() {
    let (server, _dns, _) = verifying_server(&[
        "--mail-auth",
        "verify=true,dmarc-policy=enforce,dns-temperror=tempfail",
    ]);
    let reply = send(
        &server,
        "a@dm-reject.test",
        &message("a@dm-reject.test", "rejected", ""),
    );
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    let reply = send(
        &server,
        "a@spf-temp.test",
        &message("a@spf-temp.test", "deferred", ""),
    );
    assert!(reply.starts_with("451 4.7.5"), "{reply}");
    // Passing mail still goes through.
    assert_eq!(
        send(
            &server,
            "a@spf-pass.test",
            &message("a@spf-pass.test", "fine", "")
        ),
        "250"
    );
    stored(&server, "fine");
    assert!(
        server.log_text().contains("refused"),
        "{}",
        server.log_text()
    );
}

#[test]
fn our_own_users_mail_is_not_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    user_add(&data, "bob@localhost", "pw");
    // The default relay networks include 127.0.0.1.
    let server = Server::start_in(Some(tmp), data, &[]);
    assert_eq!(
        send(
            &server,
            "a@spf-fail.test",
            &message("a@spf-fail.test", "ours", "")
        ),
        "250"
    );
    let m = stored(&server, "ours");
    assert!(!m.contains("Authentication-Results:"), "{m}");
    assert!(server.log_text().contains("spf=skipped"));
}

/// A server to be, named `mx.DOMAIN` for local domain DOMAIN: its data directory
/// (set up offline by `setup`) and a key for DOMAIN it seals ARC sets with, whose
/// record is added to `zone`.
struct Forwarder {
    tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    domain: String,
    key: String,
}

fn forwarder(domain: &str, zone: &mut Zone, setup: impl FnOnce(&std::path::Path)) -> Forwarder {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (record, key) = dkim_generate(&data, domain, "arc", "ed25519");
    let (name, value) = txt_record(&record);
    *zone = std::mem::take(zone).txt(name.trim_end_matches('.'), &value);
    setup(&data);
    Forwarder {
        tmp,
        data,
        domain: domain.into(),
        key,
    }
}

impl Forwarder {
    /// Outside whose relay networks every test client is.
    fn start(self, dns: &DnsServer, extra: &[&str]) -> Server {
        let host = format!("mx.{}", self.domain);
        let dkim = format!("domain={},selector=arc,key={}", self.domain, self.key);
        let dns = dns.addr.to_string();
        let mut args = vec![
            "--hostname",
            &host,
            "--local-domain",
            &self.domain,
            "--relay-network",
            "192.0.2.0/24",
            "--dkim",
            &dkim,
            "--dns",
            &dns,
        ];
        args.extend_from_slice(extra);
        Server::start_in(Some(self.tmp), self.data, &args)
    }
}

#[test]
fn an_alias_forwards_elsewhere_and_the_arc_chain_validates_over_two_hops() {
    let mut zone = zone("v=DKIM1; k=ed25519; p=");
    let alias = |data: &std::path::Path, domain: &str, to: &str| {
        run_ok(
            Command::new(binary())
                .args(["alias", "add", &format!("fwd@{domain}"), to])
                .args(["--local-domain", domain, "--data"])
                .arg(data),
        );
    };
    // C holds the mailbox; B forwards fwd@b.test to C; A forwards fwd@a.test to B.
    let c = forwarder("c.test", &mut zone, |data| {
        user_add_with(data, "carol@c.test", "pw", &["--local-domain", "c.test"])
    });
    let b = forwarder("b.test", &mut zone, |data| {
        alias(data, "b.test", "carol@c.test")
    });
    let a = forwarder("a.test", &mut zone, |data| {
        alias(data, "a.test", "fwd@b.test")
    });
    let dns = DnsServer::start(zone);
    let c = c.start(&dns, &[]);
    let route_c = format!("c.test=127.0.0.1:{}", c.addr.port());
    let b = b.start(&dns, &["--route", &route_c]);
    let route_b = format!("b.test=127.0.0.1:{}", b.addr.port());
    let a = a.start(&dns, &["--route", &route_b]);

    let script = r#"
import sys, smtplib
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=60)
s.sendmail('someone@spf-none.test', ['fwd@a.test'], b'From: <someone@spf-none.test>\r\nTo: fwd@a.test\r\nSubject: two hops\r\n\r\nforwarded twice\r\n')
s.quit()
"#;
    run_ok(Command::new("python3").args(["-c", script, &a.addr.port().to_string()]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let list = mailbox_list(&c.data, "carol@c.test", Some("INBOX"));
        if let Some(e) = list.first() {
            let uid = e["uid"].as_u64().unwrap().to_string();
            let text = run_ok(
                Command::new(binary())
                    .args(["mailbox", "show", "carol@c.test", "--uid", &uid, "--data"])
                    .arg(&c.data),
            )
            .stdout;
            break String::from_utf8_lossy(&text).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "not forwarded: A {} B {}",
            a.log_text(),
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // A sealed i=1, B i=2, and C found the chain valid.
    assert!(m.contains("ARC-Seal: i=1;"), "{m}");
    assert!(m.contains("ARC-Seal: i=2;"), "{m}");
    let start = m
        .find("Authentication-Results: mx.c.test;")
        .expect("C's results");
    let end = m[start..]
        .find("\r\nReceived:")
        .map_or(m.len(), |e| start + e);
    let c_results = m[start..end].replace("\r\n", "");
    assert!(c_results.contains("arc=pass"), "{c_results}\n{m}");
}
