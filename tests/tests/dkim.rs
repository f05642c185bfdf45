//! DKIM signing end to end against the built binary: `ringmail dkim generate` makes
//! the keys and the records to publish; mail from a relay network whose `From:` has a
//! key arrives signed, and the signature verifies with mail-auth against the
//! published record (Ed25519 and RSA-SHA256); a changed body fails; mail from
//! outside the relay networks is not signed.

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
};
use ringmail_tests::{binary, dkim_generate, mailbox_list, run_ok, txt_record, user_add, Server};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The TXT records the test publishes, as mail-auth's lookup cache: verification
/// never asks the network.
#[derive(Default)]
struct Published(Mutex<HashMap<Box<str>, Txt>>);

impl ResolverCache<Box<str>, Txt> for Published {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().get(name).cloned()
    }
    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().remove(name)
    }
    fn insert(&self, key: Box<str>, value: Txt, _: Instant) {
        self.0.lock().unwrap().insert(key, value);
    }
}

impl Published {
    /// Adds a record as `dkim generate` printed it (`NAME. IN TXT "…" "…"`).
    fn add(&self, line: &str) {
        let (name, value) = txt_record(line);
        let key = DomainKey::parse(value.as_bytes()).expect("a DKIM key record");
        self.insert(name.into(), Txt::from(Ok(key)), Instant::now());
    }
}

fn verify(published: &Published, message: &[u8]) -> Vec<String> {
    let auth = MessageAuthenticator::new_cloudflare().unwrap();
    let msg = AuthenticatedMessage::parse(message).expect("a message");
    let out = futures_lite::future::block_on(
        auth.verify_dkim(Parameters::new(&msg).with_txt_cache(published)),
    );
    out.iter()
        .map(|o| match o.result() {
            DkimResult::Pass => "pass".to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn send(server: &Server, from: &str, subject: &str) {
    let script = r#"
import sys, smtplib
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=30)
msg = 'From: Alice <%s>\r\nTo: bob@localhost\r\nSubject: %s\r\n\r\n.a line with a dot\r\nbody  with  spaces \r\n\r\n' % (sys.argv[2], sys.argv[3])
s.sendmail(sys.argv[2], ['bob@localhost'], msg)
s.quit()
"#;
    run_ok(Command::new("python3").args([
        "-c",
        script,
        &server.addr.port().to_string(),
        from,
        subject,
    ]));
}

/// Bob's messages, each as stored (prefixes included), once there are `n`.
fn bobs_messages(server: &Server, n: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = mailbox_list(&server.data, "bob@localhost", Some("INBOX"));
        if list.len() >= n {
            return list
                .iter()
                .map(|m| {
                    let uid = m["uid"].as_u64().unwrap().to_string();
                    run_ok(
                        Command::new(binary())
                            .args(["mailbox", "show", "bob@localhost", "--uid", &uid, "--data"])
                            .arg(&server.data),
                    )
                    .stdout
                })
                .collect();
        }
        assert!(Instant::now() < deadline, "{n} messages for bob");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mail_from_our_domains_is_signed_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    user_add(&data, "bob@localhost", "pw");
    let published = Published::default();
    let (ed_record, ed_key) = dkim_generate(&data, "example.test", "s1", "ed25519");
    let (rsa_record, rsa_key) = dkim_generate(&data, "rsa.test", "s2", "rsa2048");
    assert!(ed_record.starts_with("s1._domainkey.example.test. IN TXT \"v=DKIM1; k=ed25519; p="));
    assert!(rsa_record.starts_with("s2._domainkey.rsa.test. IN TXT \"v=DKIM1; k=rsa; p="));
    assert!(ed_key.ends_with("dkim/example.test.s1.key"), "{ed_key}");
    published.add(&ed_record);
    published.add(&rsa_record);
    let ed = format!("domain=example.test,selector=s1,key={ed_key}");
    let rsa = format!("domain=rsa.test,selector=s2,key={rsa_key},algorithm=rsa-sha256");
    let server = Server::start_in(Some(tmp), data, &["--dkim", &ed, "--dkim", &rsa]);

    send(&server, "alice@example.test", "ed25519");
    send(&server, "alice@news.rsa.test", "rsa");
    send(&server, "alice@elsewhere.test", "no key");
    let messages = bobs_messages(&server, 3);
    let text = |m: &[u8]| String::from_utf8_lossy(m).into_owned();
    let find = |subject: &str| {
        messages
            .iter()
            .find(|m| text(m).contains(&format!("Subject: {subject}\r\n")))
            .unwrap_or_else(|| panic!("no message {subject}"))
            .clone()
    };
    let signed = find("ed25519");
    assert!(
        text(&signed).contains("DKIM-Signature: "),
        "{}",
        text(&signed)
    );
    assert!(
        text(&signed).contains("a=ed25519-sha256"),
        "{}",
        text(&signed)
    );
    assert_eq!(verify(&published, &signed), ["pass"]);
    let rsa_signed = find("rsa");
    assert!(
        text(&rsa_signed).contains("a=rsa-sha256"),
        "{}",
        text(&rsa_signed)
    );
    assert!(
        text(&rsa_signed).contains("d=rsa.test"),
        "{}",
        text(&rsa_signed)
    );
    assert_eq!(verify(&published, &rsa_signed), ["pass"]);
    assert!(!text(&find("no key")).contains("DKIM-Signature"));

    // A changed body no longer verifies.
    let mut tampered = signed.clone();
    let at = tampered.len() - 5;
    tampered[at] ^= 0x20;
    assert_ne!(verify(&published, &tampered), ["pass"]);
    // The log says what signed each message.
    assert!(
        server.log_text().contains("dkim_sign=example.test/s1"),
        "{}",
        server.log_text()
    );
    assert!(server.log_text().contains("dkim_sign=rsa.test/s2"));
}

#[test]
fn mail_from_outside_the_relay_networks_is_not_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    user_add(&data, "bob@localhost", "pw");
    let (_, key) = dkim_generate(&data, "example.test", "s1", "ed25519");
    let dkim = format!("domain=example.test,selector=s1,key={key}");
    // 127.0.0.1 is not a relay network here: the sender is a stranger, and a
    // stranger's mail claiming our domain must not get our signature.
    let server = Server::start_in(
        Some(tmp),
        data,
        &["--dkim", &dkim, "--relay-network", "192.0.2.0/24"],
    );
    send(&server, "alice@example.test", "forged");
    let m = &bobs_messages(&server, 1)[0];
    assert!(!String::from_utf8_lossy(m).contains("DKIM-Signature"));
}

#[test]
fn a_key_that_does_not_load_stops_the_start_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("bad.key");
    std::fs::write(&key, "not a key").unwrap();
    let out = Command::new(binary())
        .args(["serve", "--smtp", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("data"))
        .arg("--dkim")
        .arg(format!(
            "domain=example.test,selector=s1,key={}",
            key.display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.key") && err.contains("DKIM"), "{err}");
}
