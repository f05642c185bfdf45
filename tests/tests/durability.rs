//! Crash safety and disk errors against the real binary.
//!
//! - SIGKILL while several sessions send: every message that got a 250 must be in
//!   `queue list --json` afterwards, with the right size and content checksum.
//! - A full file system: the message gets 452 4.3.1, the server keeps running, nothing
//!   of the refused message is ever read back, and mail flows again once there is room.

use ringmail_tests::{queued_id, Client, Server};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Acked {
    size: usize,
    crc: u32,
}

fn body(thread: usize, n: usize) -> Vec<u8> {
    // Sizes from a few bytes to ~40 KiB, content unique per message.
    let lines = (n * 7919 + thread * 104_729) % 600;
    let mut b = format!("Subject: crash test {thread}/{n}\r\n\r\n").into_bytes();
    for i in 0..lines {
        b.extend_from_slice(
            format!("{thread:02} {n:06} {i:04} the quick brown fox jumps over the lazy dog\r\n")
                .as_bytes(),
        );
    }
    b
}

/// Sends messages from `sessions` threads until the connection breaks or `stop`;
/// returns what was acknowledged.
fn flood(
    server: &Server,
    sessions: usize,
    acked: Arc<Mutex<HashMap<String, Acked>>>,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    round: usize,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..sessions)
        .map(|t| {
            let addr = server.addr;
            let acked = acked.clone();
            let count = count.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let Ok(stream) = std::net::TcpStream::connect(addr) else {
                    return;
                };
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut c = Client {
                    reader: std::io::BufReader::new(stream),
                };
                let mut io = || -> std::io::Result<()> {
                    use std::io::{BufRead, Write};
                    let mut line = String::new();
                    let mut reply = |c: &mut Client| -> std::io::Result<String> {
                        let mut text = String::new();
                        loop {
                            line.clear();
                            if c.reader.read_line(&mut line)? == 0 {
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            text.push_str(&line);
                            if line.as_bytes().get(3) == Some(&b' ') {
                                return Ok(text);
                            }
                        }
                    };
                    reply(&mut c)?;
                    c.reader.get_mut().write_all(b"EHLO crash.test\r\n")?;
                    reply(&mut c)?;
                    for n in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        let b = body(t + round * 100, n);
                        // The whole transaction in one write (PIPELINING).
                        let mut tx =
                            b"MAIL FROM:<s@crash.test>\r\nRCPT TO:<r@localhost>\r\nDATA\r\n"
                                .to_vec();
                        tx.extend_from_slice(&b);
                        tx.extend_from_slice(b".\r\n");
                        c.reader.get_mut().write_all(&tx)?;
                        for _ in 0..3 {
                            reply(&mut c)?;
                        }
                        let r = reply(&mut c)?;
                        let id = queued_id(&r).unwrap_or_else(|| panic!("unexpected reply {r:?}"));
                        acked.lock().unwrap().insert(
                            id,
                            Acked {
                                size: b.len(),
                                crc: crc32c::crc32c(&b),
                            },
                        );
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                };
                let _ = io();
            })
        })
        .collect()
}

#[test]
fn sigkill_while_sessions_flow_loses_nothing_acknowledged() {
    let mut server = Server::start(&["--cores", "2"]);
    let acked = Arc::new(Mutex::new(HashMap::new()));
    for round in 0..3 {
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = flood(
            &server,
            8,
            acked.clone(),
            count.clone(),
            stop.clone(),
            round,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        // Kill at a different point each round.
        let target = 50 + round * 150;
        while count.load(Ordering::SeqCst) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        server.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        let queue = server.queue();
        let listed: HashMap<String, &serde_json::Value> = queue
            .iter()
            .map(|m| (m["id"].as_str().unwrap().to_string(), m))
            .collect();
        let acked = acked.lock().unwrap();
        assert!(
            acked.len() >= target.min(50),
            "too few messages were acknowledged to test anything: {}",
            acked.len()
        );
        for (id, a) in acked.iter() {
            let m = listed
                .get(id)
                .unwrap_or_else(|| panic!("round {round}: acknowledged message {id} lost"));
            assert_eq!(m["size"], a.size, "{id}");
            assert_eq!(m["crc32c"], format!("{:08x}", a.crc), "{id}");
        }
        eprintln!(
            "round {round}: {} acknowledged, {} listed",
            acked.len(),
            listed.len()
        );
        // More may be listed than acknowledged (synced, but killed before the 250).
        assert!(listed.len() >= acked.len());
        drop(acked);
        server.restart();
    }
}

/// Unmounts a test file system (lazily: the server may still hold files open).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Mounts a small file system of `kind` for a full-disk test, or says why not (it
/// needs root, and for ext4 a loop device and mkfs.ext4; CI runs as root).
fn small_fs(kind: &str) -> Option<(tempfile::TempDir, Unmount)> {
    let mnt = tempfile::tempdir().unwrap();
    // The first step that fails, with what it printed: the reason for a skip.
    let run = |cmd: &mut std::process::Command| -> Result<(), String> {
        match cmd.output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "{cmd:?}: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("{cmd:?}: {e}")),
        }
    };
    let mounted = match kind {
        "tmpfs" => run(std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(mnt.path())),
        _ => {
            // The image lives outside the mount point, next to it.
            let image = mnt.path().with_extension("img");
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(4 << 20))
                .map_err(|e| format!("{}: {e}", image.display()))
                .and_then(|()| {
                    run(std::process::Command::new("mkfs.ext4")
                        .args(["-q", "-F"])
                        .arg(&image))
                })
                .and_then(|()| {
                    run(std::process::Command::new("mount")
                        .args(["-o", "loop"])
                        .arg(&image)
                        .arg(mnt.path()))
                })
                .and_then(|()| {
                    std::fs::remove_file(&image).map_err(|e| format!("{}: {e}", image.display()))
                })
        }
    };
    if let Err(why) = mounted {
        ringmail_tests::skip(&format!(
            "cannot mount a small {kind} (needs root; ext4 needs mkfs.ext4 and a loop device): {why}"
        ));
        return None;
    }
    let guard = Unmount(mnt.path().to_path_buf());
    Some((mnt, guard))
}

/// tmpfs: glommio falls back to buffered writes (no O_DIRECT on tmpfs).
#[test]
fn a_full_disk_gets_452_and_the_server_carries_on() {
    full_disk("tmpfs");
}

/// ext4 on a loop device: the spool's direct I/O path runs out of space.
#[test]
fn a_full_ext4_disk_gets_452_and_the_server_carries_on() {
    full_disk("ext4");
}

fn full_disk(kind: &str) {
    let Some((mnt, _guard)) = small_fs(kind) else {
        return;
    };
    let data = mnt.path().join("data");
    let mut server = Server::start_in(None, data.clone(), &["--cores", "1"]);
    let mut c = server.connect();
    c.reply();
    c.send(b"EHLO c\r\n");
    c.reply();
    let payload = [
        b"Subject: fill\r\n\r\n".to_vec(),
        b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(2000),
    ]
    .concat();
    let mut ids = Vec::new();
    let mut refusal = None;
    for _ in 0..80 {
        let mut tx = b"MAIL FROM:<a@c.test>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n".to_vec();
        tx.extend_from_slice(&payload);
        tx.extend_from_slice(b".\r\n");
        c.send(&tx);
        assert_eq!(c.codes(3), [250, 250, 354]);
        let r = c.reply();
        match queued_id(&r) {
            Some(id) => ids.push(id),
            None => {
                refusal = Some(r);
                break;
            }
        }
    }
    let refusal = refusal.unwrap_or_else(|| panic!("a small {kind} never filled up"));
    assert!(refusal.starts_with("452 4.3.1 "), "{refusal}");
    assert!(!ids.is_empty());
    // The session and the server go on: a small message still fits.
    c.send(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<x@localhost>\r\nDATA\r\nsmall\r\n.\r\n");
    assert_eq!(c.codes(3), [250, 250, 354]);
    let small = c.reply();
    let small_id =
        queued_id(&small).unwrap_or_else(|| panic!("small message after ENOSPC: {small}"));
    ids.push(small_id);
    c.send(b"QUIT\r\n");
    c.reply();
    assert_eq!(server.terminate(), Some(0));
    // Exactly the acknowledged messages are there; the refused one left no record.
    let mut listed: Vec<String> = ringmail_tests::queue_list(&data)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
}
