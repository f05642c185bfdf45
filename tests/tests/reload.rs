//! SIGHUP re-reads the config file: a changed route applies to mail sent afterwards, a
//! session open across the reload finishes normally, a setting that needs a restart
//! is named and keeps its value, and a broken file changes nothing.

use ringmail_bench::sink::Faults;
use ringmail_tests::sink::Sink;
use ringmail_tests::{Client, Server};
use std::time::{Duration, Instant};

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hup(server: &Server) {
    let pid = server.child.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

fn count(server: &Server, what: &str) -> usize {
    server.log_text().matches(what).count()
}

/// One message to `to` in a session of its own.
fn send(server: &Server, to: &str) {
    let mut c = Client::connect(server.addr);
    assert_eq!(c.codes(1), [220]);
    c.send(format!("EHLO t\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<{to}>\r\nDATA\r\n").as_bytes());
    assert_eq!(c.codes(4), [250, 250, 250, 354]);
    c.send(b"Subject: reload\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    assert_eq!(c.codes(2), [250, 221]);
}

#[test]
fn sighup_applies_a_new_route_to_later_mail_and_open_sessions_finish() {
    let first = Sink::start("127.0.0.2:0".parse().unwrap(), Faults::default());
    let second = Sink::start("127.0.0.3:0".parse().unwrap(), Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ringmail.toml");
    let write = |route: &str, extra: &str| {
        std::fs::write(&file, format!("route = [\"dst.test={route}\"]\n{extra}")).unwrap()
    };
    write(&first.addr.to_string(), "");
    let server = Server::start(&["--config", file.to_str().unwrap()]);
    send(&server, "x@dst.test");
    wait_until("the first delivery", 30, || first.accepted() == 1);

    // A session in the middle of a transaction while the settings change.
    let mut open = Client::connect(server.addr);
    assert_eq!(open.codes(1), [220]);
    open.send(b"EHLO t\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<y@dst.test>\r\n");
    assert_eq!(open.codes(3), [250, 250, 250]);

    // The route moves, and a setting that needs a restart changes too.
    write(&second.addr.to_string(), "auth-workers = 1\n");
    hup(&server);
    wait_until("the reload", 10, || count(&server, "reload: applied") == 1);
    let log = server.log_text();
    assert!(
        log.contains("settings=\"route\"") || log.contains("settings=route"),
        "{log}"
    );
    assert!(
        log.contains("need a restart") && log.contains("auth-workers"),
        "{log}"
    );

    // The open session finishes normally; its message and later mail take the new
    // route.
    open.send(b"DATA\r\n");
    assert_eq!(open.codes(1), [354]);
    open.send(b"Subject: across\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    assert_eq!(open.codes(2), [250, 221]);
    send(&server, "z@dst.test");
    wait_until("two deliveries on the new route", 30, || {
        second.accepted() == 2
    });
    assert_eq!(first.accepted(), 1);

    // A file that does not load changes nothing.
    std::fs::write(&file, "route = [\"dst.test=nowhere\"]\n").unwrap();
    hup(&server);
    wait_until("the refused reload", 10, || {
        count(&server, "the settings in use stay") == 1
    });
    send(&server, "w@dst.test");
    wait_until("a third delivery on the new route", 30, || {
        second.accepted() == 3
    });
    assert_eq!(count(&server, "reload: applied"), 1);
}
