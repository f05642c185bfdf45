//! `ringmail-recovery`: recovery time and resident memory against the number of stored
//! messages. For each count, `ringmail-fill` writes a data directory; then, with the
//! page cache dropped before each, `ringmail serve` starts twice (the first start after
//! the fill, and again after that one stopped cleanly), timed from exec until its
//! `ringmail ready` line, with `VmRSS`/`VmHWM` read then; and `ringmail queue list`
//! runs offline. A server on an empty data directory, started in the same run, is the
//! baseline the resident bytes per message are counted over. The history variant puts
//! the largest count behind as many messages again that were relayed and are done.
//! Needs root (drop_caches). Behind `bench/recovery.sh`.
//!
//! `--users N` measures mailboxes instead (docs/mailboxes.md): each count is stored
//! messages, delivered by the fill into the INBOXes of N users. Each data directory
//! is opened cold by this binary itself first (`--harness`: the shards recovered
//! with their account and mail indexes as the server's executors recover them, a
//! counting allocator giving the heap bytes), then by `ringmail serve` as above
//! unless `--skip-server` (a server that does not recover the mail indexes would
//! drop the mailboxes' messages at its first start).

use clap::Parser;
use ringmail_bench::procstat;
use ringmail_bench::recovery::{self, Listing, Point, Restart};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Counts the heap the harness holds (`--harness`): live bytes and their peak.
struct Counting;

static LIVE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PEAK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn grew(n: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    let now = LIVE.fetch_add(n as u64, Relaxed) + n as u64;
    PEAK.fetch_max(now, Relaxed);
}

fn shrank(n: usize) {
    LIVE.fetch_sub(n as u64, std::sync::atomic::Ordering::Relaxed);
}

// SAFETY: every call goes to the system allocator as it came; only counted.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Parser)]
#[command(name = "ringmail-recovery")]
struct Args {
    /// Queued messages of each point.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    counts: Vec<u64>,
    /// Finished (relayed, delivered) messages of each history variant, which runs at
    /// the largest count; 0 skips it.
    #[arg(long, value_delimiter = ',', default_value = "1000000")]
    history: Vec<u64>,
    /// The history before every queued message instead of spread among them.
    #[arg(long)]
    history_first: bool,
    /// Body bytes per message.
    #[arg(long, default_value_t = 512)]
    size: usize,
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Where the data directories go (on the disk under test, not tmpfs); emptied first.
    #[arg(long, default_value = "/tmp/ringmail-recovery")]
    work: PathBuf,
    /// Directory holding the ringmail under test.
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Directory holding ringmail-fill (default: --bin). The fill writes the store's
    /// format of the build it comes from: give a build whose format the server reads
    /// (an older server with a newer fill that writes the same format, for instance).
    #[arg(long)]
    fill_bin: Option<PathBuf>,
    /// Names the build in the file names and the plot's title (e.g. before, after).
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Restarts after a clean stop, and offline listings, per point: the median (by
    /// time) is reported. The first start after the fill happens once by nature.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Mailboxes: the counts are stored messages, in the INBOXes of this many users
    /// (`--history` does not apply).
    #[arg(long, default_value_t = 0)]
    users: u64,
    /// Mailboxes: only the in-process open, no `ringmail serve`.
    #[arg(long)]
    skip_server: bool,
    /// Mailboxes: last, remove the snapshots and open once more (the whole log
    /// replayed, as after a crash before any snapshot).
    #[arg(long)]
    from_log: bool,
    /// Internal: open the mailbox data directory DATA in this process, print the
    /// ready line, exit.
    #[arg(long, hide = true)]
    harness: Option<PathBuf>,
}

/// The element with the median key (the lower middle of an even count).
fn median_by<T>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v.remove((v.len() - 1) / 2)
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let r = match (&a.harness, a.users) {
        (Some(data), _) => run_harness(data),
        (None, 0) => run(a),
        (None, _) => run_mailboxes(a),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmail-recovery: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn fill(a: &Args, data: &Path, live: u64, history: u64) -> Result<f64, String> {
    fill_users(a, data, live, history, 0)
}

fn fill_users(a: &Args, data: &Path, live: u64, history: u64, users: u64) -> Result<f64, String> {
    let t = Instant::now();
    let mut cmd = Command::new(a.fill_bin.as_ref().unwrap_or(&a.bin).join("ringmail-fill"));
    cmd.arg("--data")
        .arg(data)
        .args([
            "--messages",
            &live.to_string(),
            "--history",
            &history.to_string(),
        ])
        .args([
            "--size",
            &a.size.to_string(),
            "--shards",
            &a.shards.to_string(),
        ]);
    if a.history_first {
        cmd.arg("--history-first");
    }
    if users > 0 {
        cmd.args(["--users", &users.to_string()]);
    }
    let st = cmd.status().map_err(|e| format!("ringmail-fill: {e}"))?;
    if !st.success() {
        return Err(format!("ringmail-fill failed: {st}"));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// A cold start until ready, then a clean stop (SIGTERM, waited for).
fn restart(bin: &Path, data: &Path) -> Result<Restart, String> {
    procstat::drop_caches()?;
    let t0 = Instant::now();
    let mut child = Command::new(bin.join("ringmail"))
        .args([
            "serve",
            "--smtp",
            "127.0.0.1:0",
            "--hostname",
            "ringmail.test",
            "--data",
        ])
        .arg(data)
        .env("RINGMAIL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start ringmail: {e}"))?;
    let pid = child.id();
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the log to its end (the pipe must not fill), reporting when ready.
    let reader = std::thread::spawn(move || {
        let mut tail = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ringmail ready") {
                let _ = tx.send(Instant::now());
            }
            tail.push(line);
            if tail.len() > 50 {
                tail.remove(0);
            }
        }
        tail.join("\n")
    });
    let ready = rx.recv_timeout(Duration::from_secs(600));
    let seen = ready
        .as_ref()
        .ok()
        .and_then(|_| Some((procstat::rss(pid)?, procstat::cpu_time(pid)?)));
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let exit = procstat::wait4(pid)?;
    let log = reader.join().unwrap_or_default();
    let ready = ready.map_err(|_| format!("ringmail never became ready; its log:\n{log}"))?;
    let ((rss, hwm), cpu) = seen.ok_or("cannot read /proc for the server")?;
    if exit.status != 0 {
        return Err(format!(
            "ringmail exited with status {}; its log:\n{log}",
            exit.status
        ));
    }
    Ok(Restart {
        seconds: ready.duration_since(t0).as_secs_f64(),
        rss_bytes: rss,
        hwm_bytes: hwm,
        cpu_seconds: cpu.as_secs_f64(),
    })
}

fn queue_list(bin: &Path, data: &Path) -> Result<Listing, String> {
    procstat::drop_caches()?;
    let t = Instant::now();
    let child = Command::new(bin.join("ringmail"))
        .args(["queue", "list", "--data"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("ringmail queue list: {e}"))?;
    let exit = procstat::wait4(child.id())?;
    if exit.status != 0 {
        return Err(format!(
            "ringmail queue list exited with status {}",
            exit.status
        ));
    }
    Ok(Listing {
        seconds: t.elapsed().as_secs_f64(),
        user_seconds: exit.user.as_secs_f64(),
        system_seconds: exit.system.as_secs_f64(),
        max_rss_bytes: exit.max_rss_bytes,
    })
}

/// `--harness`: the shards opened as the server opens them, measured when settled.
fn run_harness(data: &Path) -> Result<(), String> {
    use std::io::Write;
    recovery::open_mailboxes(data, |shards| {
        let (rss, hwm) = procstat::rss(std::process::id()).unwrap_or((0, 0));
        let o = recovery::Opened {
            seconds: 0.0,
            heap_bytes: LIVE.load(std::sync::atomic::Ordering::Relaxed),
            heap_peak_bytes: PEAK.load(std::sync::atomic::Ordering::Relaxed),
            rss_bytes: rss,
            hwm_bytes: hwm,
            stored: 0,
            entries: 0,
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", recovery::harness_line(&o, shards));
        let _ = out.flush();
    })?;
    Ok(())
}

/// A cold open by the harness (this binary, `--harness`), checked against what the
/// fill wrote: every message stored and in an INBOX, nothing queued.
fn harness(data: &Path, messages: u64, users: u64) -> Result<recovery::Opened, String> {
    procstat::drop_caches()?;
    let t0 = Instant::now();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("--harness")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the harness: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut seen = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(f) = recovery::parse_harness_line(&line) {
            seen = Some((t0.elapsed().as_secs_f64(), f));
        }
    }
    let st = child.wait().map_err(|e| e.to_string())?;
    let (seconds, f) = seen.ok_or(format!("the harness never became ready ({st})"))?;
    if !st.success() {
        return Err(format!("the harness failed: {st}"));
    }
    let want = [
        ("stored", messages),
        ("entries", messages),
        ("queued", 0),
        ("missing", 0),
        ("users", users),
    ];
    for (k, v) in want {
        if f.get(k) != Some(&v) {
            return Err(format!("the harness found {k}={:?}, want {v}", f.get(k)));
        }
    }
    Ok(recovery::Opened {
        seconds,
        heap_bytes: f["heap_bytes"],
        heap_peak_bytes: f["heap_peak_bytes"],
        rss_bytes: f["rss_bytes"],
        hwm_bytes: f["hwm_bytes"],
        stored: f["stored"],
        entries: f["entries"],
    })
}

fn run_mailboxes(a: Args) -> Result<(), String> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(&a.work).map_err(|e| format!("{}: {e}", a.work.display()))?;
    let data = a.work.join("data");
    let reps = a.reps.max(1);
    fill_users(&a, &data, 0, 0, 0)?;
    let empty = recovery::MailboxBaseline {
        opened: harness(&data, 0, 0)?,
        server: if a.skip_server {
            None
        } else {
            Some(restart(&a.bin, &data)?)
        },
    };
    let _ = std::fs::remove_dir_all(&data);
    eprintln!(
        "empty data directory: opened in {:.3} s, heap {} KiB, VmRSS {} KiB{}",
        empty.opened.seconds,
        empty.opened.heap_bytes >> 10,
        empty.opened.rss_bytes >> 10,
        empty.server.as_ref().map_or(String::new(), |s| format!(
            "; server ready in {:.3} s, VmRSS {} KiB",
            s.seconds,
            s.rss_bytes >> 10
        ))
    );
    let mut points = Vec::new();
    for &n in &a.counts {
        let fill_seconds = fill_users(&a, &data, n, 0, a.users)?;
        let data_bytes = procstat::dir_bytes(&data).0;
        let mut opens = Vec::new();
        for _ in 0..reps {
            opens.push(harness(&data, n, a.users)?);
        }
        let opened = median_by(opens, |o| o.seconds);
        // After the harness: a server that does not know the mail indexes would
        // drop the messages.
        let server = if a.skip_server {
            None
        } else {
            let first = restart(&a.bin, &data)?;
            let mut agains = Vec::new();
            for _ in 0..reps {
                agains.push(restart(&a.bin, &data)?);
            }
            Some((first, median_by(agains, |r| r.seconds)))
        };
        let from_log = if a.from_log {
            for k in 0..a.shards {
                let dir = ringmail_store::segment::shard_dir(&data, k);
                for f in [
                    ringmail_store::shard::snapshot_path(&dir),
                    ringmail_store::shard::older_snapshot_path(&dir),
                ] {
                    match std::fs::remove_file(&f) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(format!("{}: {e}", f.display()))
                        }
                        _ => {}
                    }
                }
            }
            Some(harness(&data, n, a.users)?)
        } else {
            None
        };
        let p = recovery::MailboxPoint {
            messages: n,
            users: a.users,
            size: a.size,
            data_bytes,
            fill_seconds,
            opened,
            from_log,
            server,
        };
        eprintln!(
            "{n} stored over {} users ({} MiB, filled in {fill_seconds:.1} s): opened in {:.2} s, heap {:.0} B/msg over empty{}{}",
            a.users,
            data_bytes >> 20,
            p.opened.seconds,
            p.heap_per_message(&empty),
            p.from_log.as_ref().map_or(String::new(), |l| format!(
                "; {:.2} s from the log alone",
                l.seconds
            )),
            p.server.as_ref().map_or(String::new(), |(f, g)| format!(
                "; server ready in {:.2} s / {:.2} s after a clean stop",
                f.seconds, g.seconds
            ))
        );
        points.push(p);
        let _ = std::fs::remove_dir_all(&data);
    }
    let table = recovery::mailbox_markdown(&points, &empty);
    let label = if a.label.is_empty() {
        String::new()
    } else {
        format!("{} ", a.label)
    };
    let report = format!(
        "{label}mailbox recovery, {} users, {} B bodies, {} shards, cold page cache before every open, medians of {reps}; an empty data directory: heap {} KiB, harness VmRSS {} KiB{}; {:.0} s in all\n\n{table}",
        a.users,
        a.size,
        a.shards,
        empty.opened.heap_bytes >> 10,
        empty.opened.rss_bytes >> 10,
        empty.server.as_ref().map_or(String::new(), |s| format!(
            ", server VmRSS {} KiB",
            s.rss_bytes >> 10
        )),
        started.elapsed().as_secs_f64()
    );
    println!("{report}");
    let base = ringmail_bench::results_base(&a.out, "recovery-mailboxes", &a.label)?;
    let raw = serde_json::json!({
        "label": a.label, "users": a.users, "body_bytes": a.size, "shards": a.shards, "reps": reps,
        "empty": {
            "heap_bytes": empty.opened.heap_bytes, "harness_vm_rss_bytes": empty.opened.rss_bytes,
            "harness_seconds": empty.opened.seconds,
            "server_vm_rss_bytes": empty.server.as_ref().map(|s| s.rss_bytes),
            "server_seconds": empty.server.as_ref().map(|s| s.seconds),
        },
        "points": points.iter().map(|p| p.to_json(&empty)).collect::<Vec<_>>(),
    });
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&raw).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(base.with_extension("md"), &report).map_err(|e| e.to_string())?;
    eprintln!("wrote {}.{{json,md}}", base.display());
    Ok(())
}

fn run(a: Args) -> Result<(), String> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(&a.work).map_err(|e| format!("{}: {e}", a.work.display()))?;
    let data = a.work.join("data");
    fill(&a, &data, 0, 0)?;
    let empty = restart(&a.bin, &data)?;
    let _ = std::fs::remove_dir_all(&data);
    eprintln!(
        "empty data directory: ready in {:.3} s, VmRSS {} KiB",
        empty.seconds,
        empty.rss_bytes >> 10
    );
    let mut plan: Vec<(u64, u64)> = a.counts.iter().map(|&n| (n, 0)).collect();
    let largest = a.counts.iter().copied().max().unwrap_or(0);
    plan.extend(a.history.iter().filter(|h| **h > 0).map(|&h| (largest, h)));
    let mut points = Vec::new();
    for (live, history) in plan {
        let fill_s = fill(&a, &data, live, history)?;
        let data_bytes = procstat::dir_bytes(&data).0;
        let first = restart(&a.bin, &data)?;
        let mut agains = Vec::new();
        let mut listings = Vec::new();
        for _ in 0..a.reps.max(1) {
            agains.push(restart(&a.bin, &data)?);
            listings.push(queue_list(&a.bin, &data)?);
        }
        let again = median_by(agains, |r| r.seconds);
        let listing = median_by(listings, |l| l.seconds);
        let p = Point {
            live,
            history,
            size: a.size,
            data_bytes,
            first,
            again,
            listing,
        };
        eprintln!(
            "{live} queued, {history} history ({} MiB, filled in {fill_s:.1} s): ready in {:.2} s / {:.2} s after a clean stop, {:.0} B/msg over empty; queue list {:.2} s",
            data_bytes >> 20,
            p.first.seconds,
            p.again.seconds,
            p.bytes_per_message(&p.again, empty.rss_bytes),
            p.listing.seconds
        );
        points.push(p);
        let _ = std::fs::remove_dir_all(&data);
    }
    let table = recovery::markdown(&points, empty.rss_bytes);
    let label = if a.label.is_empty() {
        String::new()
    } else {
        format!("{} ", a.label)
    };
    let report = format!(
        "{label}recovery, {} B bodies, {} shards, cold page cache before every start, medians of {} restarts after a clean stop and listings; an empty data directory's server: {} KiB resident, ready in {:.3} s; {:.0} s in all\n\n{table}",
        a.size,
        a.shards,
        a.reps.max(1),
        empty.rss_bytes >> 10,
        empty.seconds,
        started.elapsed().as_secs_f64()
    );
    println!("{report}");
    let base = ringmail_bench::results_base(&a.out, "recovery", &a.label)?;
    let raw = serde_json::json!({
        "label": a.label, "body_bytes": a.size, "shards": a.shards, "reps": a.reps.max(1),
        "empty": {"seconds": empty.seconds, "vm_rss_bytes": empty.rss_bytes, "vm_hwm_bytes": empty.hwm_bytes},
        "points": points.iter().map(|p| p.to_json(empty.rss_bytes)).collect::<Vec<_>>(),
    });
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&raw).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(base.with_extension("md"), &report).map_err(|e| e.to_string())?;
    let title = format!(
        "{label}ringmail recovery, {} B bodies, cold page cache",
        a.size
    );
    let svg = recovery::svg(&points, empty.rss_bytes, &title)?;
    std::fs::write(base.with_extension("svg"), svg).map_err(|e| e.to_string())?;
    eprintln!("wrote {}.{{json,md,svg}}", base.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_by_key() {
        assert_eq!(super::median_by(vec![3.0, 1.0, 2.0], |x| *x), 2.0);
        assert_eq!(super::median_by(vec![4.0, 1.0, 3.0, 2.0], |x| *x), 2.0);
        assert_eq!(super::median_by(vec![7.0], |x| *x), 7.0);
    }
}
