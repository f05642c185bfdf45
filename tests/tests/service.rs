//! Running as a service: started as root, the server drops to `user` once its
//! listeners are bound, hands it the data directory, and takes mail as that user.

use ringmail_tests::{queue_list, skip, Client, Server};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// The real, effective, saved and file-system uids of a process (`Uid:` of its
/// status).
fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect()
}

#[test]
fn started_as_root_it_drops_to_the_configured_user_and_still_takes_mail() {
    // SAFETY: a plain getter.
    if unsafe { libc::geteuid() } != 0 {
        return skip("dropping privileges needs the tests to run as root");
    }
    let nobody = 65534;
    let tmp = tempfile::tempdir().unwrap();
    // The user must reach the data directory through its parent.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tmp.path().join("data");
    let server = Server::start_in(Some(tmp), data.clone(), &["--user", "nobody"]);
    let pid = server.child.as_ref().unwrap().id();
    assert_eq!(uids(pid), [nobody; 4], "{}", server.log_text());
    assert!(server
        .log_text()
        .contains("running as an unprivileged user"));
    // Everything in the data directory is the user's now, and new files are too.
    for entry in std::fs::read_dir(&data).unwrap() {
        let e = entry.unwrap();
        assert_eq!(e.metadata().unwrap().uid(), nobody, "{:?}", e.path());
    }
    let mut c = Client::connect(server.addr);
    assert_eq!(c.codes(1), [220]);
    c.send(b"EHLO t\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n");
    assert_eq!(c.codes(4), [250, 250, 250, 354]);
    c.send(b"Subject: as nobody\r\n\r\nbody\r\n.\r\n");
    assert!(c.reply().starts_with("250 2.0.0 Ok: queued as"));
    assert_eq!(queue_list(&data).len(), 1);
    assert_eq!(
        std::fs::metadata(data.join("ringmail.pid")).unwrap().uid(),
        nobody
    );
}

/// Under systemd (`Type=notify`): READY=1 once ready, STOPPING=1 when a stop begins,
/// on the datagram socket `NOTIFY_SOCKET` names.
#[test]
fn systemd_hears_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = std::process::Command::new(ringmail_tests::binary())
        .arg("serve")
        .arg("--data")
        .arg(tmp.path().join("data"))
        .args(["--dns", "127.0.0.1:9"])
        .args(ringmail_tests::port_zero(ringmail_tests::LISTENERS))
        .env("NOTIFY_SOCKET", &path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("READY=1 within 30 s");
    assert!(String::from_utf8_lossy(&buf[..n])
        .lines()
        .any(|l| l == "READY=1"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = socket.recv(&mut buf).expect("STOPPING=1 within 30 s");
    assert!(String::from_utf8_lossy(&buf[..n])
        .lines()
        .any(|l| l == "STOPPING=1"));
    assert!(child.wait().unwrap().success());
}
