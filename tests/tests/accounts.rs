//! Accounts end to end: `ringmail user|alias` offline and against the running server
//! (its control socket), and what RCPT answers for them, with python3 smtplib.

use ringmail_tests::{binary, run_ok, Server};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const DOMAINS: [&str; 4] = ["--local-domain", "a.test", "--local-domain", "b.test"];

/// `ringmail ARGS --data DATA --local-domain a.test --local-domain b.test`, with
/// `stdin` as its input.
fn cli(data: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(binary())
        .args(args)
        .arg("--data")
        .arg(data)
        .args(DOMAINS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ringmail");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn cli_ok(data: &Path, args: &[&str], stdin: &str) -> String {
    let out = cli(data, args, stdin);
    assert!(
        out.status.success(),
        "ringmail {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn add_user(data: &Path, address: &str, password: &str) {
    let out = cli_ok(
        data,
        &["user", "add", address, "--password-stdin"],
        &format!("{password}\n"),
    );
    assert!(out.starts_with("added "), "{out}");
}

fn users(data: &Path) -> Vec<serde_json::Value> {
    cli_ok(data, &["user", "list", "--json"], "")
        .lines()
        .map(|l| serde_json::from_str(l).expect("user list prints JSON lines"))
        .collect()
}

/// One transaction (MAIL with `mail_options`, then each RCPT): the RCPT replies,
/// `CODE TEXT` each.
fn rcpt_replies(server: &Server, mail_options: &str, rcpts: &[&str]) -> Vec<String> {
    let script = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]))
s.ehlo('client.test')
opts = [o for o in sys.argv[2].split(',') if o]
code, _ = s.mail('sender@client.test', options=opts)
assert code == 250, code
for r in sys.argv[3:]:
    code, text = s.rcpt(r)
    print(code, text.decode())
s.rset()
s.quit()
"#;
    let out = run_ok(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(server.addr.port().to_string())
            .arg(mail_options)
            .args(rcpts),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn codes(replies: &[String]) -> Vec<&str> {
    replies.iter().map(|r| &r[..3]).collect()
}

/// Stands in for the queue's index, whose snapshot section comes first on shard 0.
struct Ignore;

impl ringmail_store::Index for Ignore {
    fn replay(&mut self, _: ringmail_store::Replayed<'_>) -> Result<(), &'static str> {
        Ok(())
    }
    fn refs(&self, _: &mut dyn FnMut(u64)) {}
    fn snapshot_chunk(&self, _: Option<u64>, _: &mut dyn FnMut(&[u8]) -> bool) -> Option<u64> {
        None
    }
    fn load(&mut self, _: &[u8]) -> Result<(), &'static str> {
        Ok(())
    }
    fn clear(&mut self) {}
}

fn stored_accounts(data: &Path) -> ringmail_store::accounts::AccountIndex {
    let mut ix = ringmail_store::accounts::AccountIndex::default();
    ringmail_store::shard::recover(
        data,
        0,
        ringmail_store::Mode::ReadOnly,
        &mut [&mut Ignore, &mut ix],
    )
    .unwrap();
    ix
}

#[test]
fn an_account_added_offline_is_known_when_the_server_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    add_user(&data, "Bob@A.test", "correct horse");
    let listed = users(&data);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["address"], "bob@a.test");
    assert_eq!(listed[0]["quota_bytes"], 0);
    assert!(listed[0]["id"].as_u64().is_some(), "{listed:?}");
    // The password is kept as an argon2id PHC string, and it verifies.
    let ix = stored_accounts(&data);
    let phc = ix.user("bob@a.test").unwrap().phc.to_string();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    use argon2::password_hash::{phc::PasswordHash, PasswordVerifier};
    let parsed = PasswordHash::new(&phc).unwrap();
    assert!(argon2::Argon2::default()
        .verify_password(b"correct horse", &parsed)
        .is_ok());
    assert!(argon2::Argon2::default()
        .verify_password(b"wrong", &parsed)
        .is_err());

    let server = Server::start_in(Some(tmp), data, &DOMAINS);
    let r = rcpt_replies(
        &server,
        "",
        &[
            "bob@a.test",
            "BOB@a.TEST",
            "nobody@a.test",
            "postmaster@a.test",
            "Postmaster",
            // b.test has no accounts: it takes every recipient, as before accounts.
            "anyone@b.test",
        ],
    );
    assert_eq!(
        codes(&r),
        ["250", "250", "550", "250", "250", "250"],
        "{r:?}"
    );
    assert_eq!(
        r[2],
        "550 5.1.1 <nobody@a.test>: Recipient address rejected: User unknown in local recipient table"
    );
}

#[test]
fn changes_while_the_server_runs_take_effect_at_once() {
    let server = Server::start(&DOMAINS);
    let data = server.data.clone();
    // The control socket changes accounts: only its owner may connect.
    use std::os::unix::fs::PermissionsExt;
    let sock = data.join("control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    add_user(&data, "bob@a.test", "pw-bob");
    add_user(&data, "carol@a.test", "pw-carol");
    let r = rcpt_replies(&server, "", &["bob@a.test", "carol@a.test", "dave@a.test"]);
    assert_eq!(codes(&r), ["250", "250", "550"], "{r:?}");

    // An alias with two targets.
    cli_ok(
        &data,
        &["alias", "add", "team@a.test", "bob@a.test", "carol@a.test"],
        "",
    );
    // A catch-all of b.test (which had no accounts, so it took everything before).
    cli_ok(&data, &["alias", "add", "@b.test", "bob@a.test"], "");
    let r = rcpt_replies(
        &server,
        "",
        &["team@a.test", "whoever@b.test", "dave@a.test"],
    );
    assert_eq!(codes(&r), ["250", "250", "550"], "{r:?}");
    let aliases = cli_ok(&data, &["alias", "list", "--json"], "");
    let aliases: Vec<serde_json::Value> = aliases
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        aliases,
        [
            serde_json::json!({"from": "@b.test", "targets": ["bob@a.test"]}),
            serde_json::json!({"from": "team@a.test", "targets": ["bob@a.test", "carol@a.test"]}),
        ]
    );

    // A quota the announced size would exceed: 452, the others still take it.
    cli_ok(
        &data,
        &[
            "user",
            "quota",
            "carol@a.test",
            "--bytes",
            "100",
            "--messages",
            "0",
        ],
        "",
    );
    let r = rcpt_replies(
        &server,
        "SIZE=200",
        &["carol@a.test", "team@a.test", "bob@a.test"],
    );
    assert_eq!(codes(&r), ["452", "250", "250"], "{r:?}");
    assert_eq!(r[0], "452 4.2.2 <carol@a.test>: Mailbox full");

    // The list, online, has both, with carol's quota.
    let listed = users(&data);
    let addresses: Vec<&str> = listed
        .iter()
        .map(|u| u["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["bob@a.test", "carol@a.test"]);
    assert_eq!(listed[1]["quota_bytes"], 100);

    // Deleted while running: refused at once.
    cli_ok(&data, &["user", "del", "carol@a.test"], "");
    let r = rcpt_replies(&server, "", &["carol@a.test", "bob@a.test"]);
    assert_eq!(codes(&r), ["550", "250"], "{r:?}");
    assert_eq!(users(&data).len(), 1);

    // The changes made through the socket are in the log: after a restart too.
    let mut server = server;
    assert_eq!(server.terminate(), Some(0));
    assert!(!sock.exists(), "the control socket is removed at shutdown");
    let ix = stored_accounts(&data);
    assert!(ix.user("bob@a.test").is_some() && ix.user("carol@a.test").is_none());
    server.restart();
    let r = rcpt_replies(&server, "", &["bob@a.test", "carol@a.test", "team@a.test"]);
    assert_eq!(codes(&r), ["250", "550", "250"], "{r:?}");
}

#[test]
fn an_address_outside_the_local_domains_is_refused_offline_and_online() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = cli(
        &data,
        &["user", "add", "x@elsewhere.test", "--password-stdin"],
        "pw\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("elsewhere.test is not a local domain"),
        "{err}"
    );
    // An empty password gets no account either.
    let out = cli(
        &data,
        &["user", "add", "x@a.test", "--password-stdin"],
        "\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty password"));
    assert!(users(&data).is_empty());
    let server = Server::start_in(Some(tmp), data.clone(), &DOMAINS);
    let out = cli(
        &data,
        &["user", "add", "x@elsewhere.test", "--password-stdin"],
        "pw\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("elsewhere.test is not a local domain"),
        "{err}"
    );
    let out = cli(&data, &["alias", "add", "team@a.test", "nobody@a.test"], "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody@a.test is not a user"));
    assert!(users(&data).is_empty());
    drop(server);
}

#[test]
fn a_second_server_on_the_same_data_directory_fails() {
    let server = Server::start(&DOMAINS);
    let out = Command::new(binary())
        .arg("serve")
        .arg("--data")
        .arg(&server.data)
        .args(["--smtp", "127.0.0.1:0", "--dns", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use: another ringmail holds"), "{err}");
    // The first one is unharmed.
    let r = rcpt_replies(&server, "", &["x@a.test"]);
    assert_eq!(codes(&r), ["250"], "{r:?}");
}
