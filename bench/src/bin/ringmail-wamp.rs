//! `ringmail-wamp`: write amplification under a steady mixed load. ringmail-load sends
//! for a bounded time, a share of the messages to a remote domain (relayed into
//! ringmail-sink, which defers a few per mille of them: those stay queued and get
//! copied forward by compaction) and the rest to the local domain (mail that stays:
//! queued on a server without mailboxes, in a mailbox with them), while compaction
//! runs. Reported: the bytes the server wrote to the block layer over its whole life
//! (`ru_oublock` from wait4, the accounting of /proc/PID/io `write_bytes`; O_DIRECT
//! included) over the message bytes it accepted, the data directory at the end, and
//! the device's own write counter over the run (every process: a noisy upper bound on a
//! shared machine). Behind `bench/wamp.sh`.
//!
//! When the server logs its counters of bytes written by cause at a clean stop (the
//! `stopped` line: ringmail_store::stats), they are reported next to the block-layer
//! total: the store's own amplification (records, copies forward, snapshots) over
//! the ingested bytes, and the log's constant factors (tail blocks written again,
//! block padding, zeros ahead, segment headers) that make up the rest.

use clap::Parser;
use ringmail_bench::load::session::{message, recipients, Plan, TlsMode};
use ringmail_bench::procstat;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "ringmail-wamp")]
struct Args {
    /// Seconds of load.
    #[arg(long, default_value_t = 90)]
    seconds: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Concurrent sessions of the load (few: a steady rate, not a flood).
    #[arg(long, default_value_t = 4)]
    sessions: usize,
    /// Percent of messages to the local domain (they stay); the rest are relayed.
    #[arg(long, default_value_t = 20)]
    stay_percent: u32,
    /// Per mille of relayed messages the sink answers 451 (they stay, deferred).
    #[arg(long, default_value_t = 10)]
    defer_permille: u32,
    /// Passed to ringmail serve as --segment-size (default: the server's).
    #[arg(long)]
    segment_size: Option<u64>,
    /// Passed to ringmail serve as --log-zero-ahead (default: the server's).
    #[arg(long)]
    zero_ahead: Option<bool>,
    /// Passed to ringmail serve as --cores (default: all).
    #[arg(long)]
    cores: Option<usize>,
    /// Directory holding ringmail (the server under test).
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Directory holding ringmail-load and ringmail-sink (default: --bin).
    #[arg(long)]
    tools_bin: Option<PathBuf>,
    /// Where the data directory goes (on the disk under test); emptied first.
    #[arg(long, default_value = "/tmp/ringmail-wamp")]
    work: PathBuf,
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmail-wamp: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Bounded poll of a log file for a line.
fn wait_for_line(log: &std::path::Path, needle: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no \"{needle}\" in {} within {limit:?}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_in(log: &std::path::Path, needle: &str) -> u64 {
    std::fs::read(log)
        .map(|t| memchr::memmem::find_iter(&t, needle.as_bytes()).count() as u64)
        .unwrap_or(0)
}

/// Compaction rounds that copied something forward: the store's `compacted` lines
/// with `copied=` above 0.
fn copy_rounds(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("compacted"))
        .filter(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("copied="))
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
        .count() as u64
}

fn run(a: Args) -> Result<(), String> {
    let tools = a.tools_bin.clone().unwrap_or_else(|| a.bin.clone());
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(&a.work).map_err(|e| format!("{}: {e}", a.work.display()))?;
    let data = a.work.join("data");
    let log = a.work.join("ringmail.log");
    let sink_port = free_port();
    let mut sink = Command::new(tools.join("ringmail-sink"))
        .args(["--listen", &format!("127.0.0.1:{sink_port}")])
        .args(["--tempfail", &a.defer_permille.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("ringmail-sink: {e}"))?;
    let port = free_port();
    let dev_before = procstat::device_written(&a.work);
    let mut cmd = Command::new(a.bin.join("ringmail"));
    cmd.args([
        "serve",
        "--smtp",
        &format!("127.0.0.1:{port}"),
        "--hostname",
        "ringmail.test",
    ])
    .args(["--route", &format!("*=127.0.0.1:{sink_port}"), "--data"])
    .arg(&data)
    .env("RINGMAIL_LOG", "info")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?);
    if let Some(s) = a.segment_size {
        cmd.args(["--segment-size", &s.to_string()]);
    }
    if let Some(z) = a.zero_ahead {
        cmd.args(["--log-zero-ahead", &z.to_string()]);
    }
    if let Some(c) = a.cores {
        cmd.args(["--cores", &c.to_string()]);
    }
    let server = cmd.spawn().map_err(|e| format!("ringmail: {e}"))?;
    let pid = server.id();
    let stop_server = || {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        procstat::wait4(pid)
    };
    if let Err(e) = wait_for_line(&log, "ringmail ready", Duration::from_secs(60)) {
        let _ = stop_server();
        let _ = sink.kill();
        return Err(e);
    }
    let stay = a.stay_percent.min(100);
    let plan_domains = vec![
        ("relay.test".to_string(), 100 - stay),
        ("localhost".to_string(), stay),
    ];
    let mut load = Command::new(tools.join("ringmail-load"));
    load.args(["smtp", "--target", &format!("127.0.0.1:{port}"), "--json"])
        .args([
            "--sessions",
            &a.sessions.to_string(),
            "--messages",
            "1000000000",
        ])
        .args([
            "--size",
            &a.size.to_string(),
            "--max-seconds",
            &a.seconds.to_string(),
        ]);
    for (d, w) in &plan_domains {
        if *w > 0 {
            load.args(["--domain", &format!("{d}:{w}")]);
        }
    }
    let load = load
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("ringmail-load: {e}"))?;
    let t0 = Instant::now();
    let load_pid = load.id();
    let load_out = std::thread::spawn(move || load.wait_with_output());
    // Samples: seconds, bytes the server wrote so far, data directory size.
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let sample = |samples: &mut Vec<(f64, u64, u64)>| {
        if let Some(w) = procstat::write_bytes(pid) {
            samples.push((t0.elapsed().as_secs_f64(), w, procstat::dir_bytes(&data).0));
        }
    };
    let alive = |p: u32| {
        std::path::Path::new(&format!("/proc/{p}")).exists()
            && !std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| s.contains(") Z "))
    };
    while alive(load_pid) {
        sample(&mut samples);
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = load_out
        .join()
        .map_err(|_| "ringmail-load's waiter panicked")?
        .map_err(|e| format!("ringmail-load: {e}"))?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let lo = ringmail_bench::compare::parse_load_output(&String::from_utf8_lossy(&out.stdout))?;
    // Let delivery of what was accepted finish (bounded): until the count of sent
    // recipients stops moving for 2 s.
    let settle = Instant::now();
    let mut last = (count_in(&log, "status=sent"), Instant::now());
    while settle.elapsed() < Duration::from_secs(60) && last.1.elapsed() < Duration::from_secs(2) {
        sample(&mut samples);
        std::thread::sleep(Duration::from_millis(500));
        let n = count_in(&log, "status=sent");
        if n != last.0 {
            last = (n, Instant::now());
        }
    }
    sample(&mut samples);
    let (data_apparent, data_allocated) = procstat::dir_bytes(&data);
    let exit = stop_server()?;
    let dev_after = procstat::device_written(&a.work);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(sink.id() as i32, libc::SIGTERM) };
    let sink_out = sink.wait_with_output().map_err(|e| e.to_string())?;
    let so =
        ringmail_bench::compare::parse_sink_output(&String::from_utf8_lossy(&sink_out.stdout))?;
    if exit.status != 0 {
        return Err(format!("ringmail exited with status {}", exit.status));
    }
    // What the server accepted: the load's messages rebuilt from their numbers (the
    // budget hands out 0, 1, 2, ...; the few in flight at the deadline are not counted).
    let plan = Plan {
        from: "load@ringmail-load.test".into(),
        to: vec![],
        domains: plan_domains.into_iter().filter(|(_, w)| *w > 0).collect(),
        rcpts_per_message: 1,
        size_min: a.size,
        size_max: a.size,
        per_connection: 0,
        pipelining: false,
        bdat: false,
        lmtp: false,
        to_cycle: None,
        helo: String::new(),
        tls: TlsMode::Plain,
        auth: None,
        dkim: None,
    };
    let (mut ingested, mut stayed) = (0u64, 0u64);
    for seq in 0..lo.messages {
        let to = recipients(&plan, seq).remove(0);
        ingested += message(seq, a.size, &plan.from, &to).len() as u64;
        stayed += u64::from(to.ends_with("@localhost"));
    }
    let copied = copy_rounds(&std::fs::read_to_string(&log).unwrap_or_default());
    let counters = procstat::stopped_counters(&std::fs::read_to_string(&log).unwrap_or_default());
    let ratio = exit.written_bytes as f64 / ingested.max(1) as f64;
    let dev = match (dev_before, dev_after) {
        (Some(b), Some(e)) => Some(e.saturating_sub(b)),
        _ => None,
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let label = if a.label.is_empty() {
        String::new()
    } else {
        format!("{} ", a.label)
    };
    let report = format!(
        "{label}write amplification: {} s of ringmail-load ({} sessions, {} B messages, {stay}% to the local domain, the sink defers {} per mille), compaction running\n\n\
| accepted | staying (local) | relayed (sink accepted) | ingested MiB | server wrote MiB | written / ingested | device wrote MiB (all processes) | data dir at end MiB (allocated) | compaction rounds that copied |\n|---|---|---|---|---|---|---|---|---|\n\
| {} | {stayed} | {} | {:.0} | {:.0} | {ratio:.2} | {} | {:.0} ({:.0}) | {copied} |\n",
        a.seconds, a.sessions, a.size, a.defer_permille, lo.messages, so.accepted,
        mib(ingested), mib(exit.written_bytes),
        dev.map_or("n/a".into(), |d| format!("{:.0}", mib(d))),
        mib(data_apparent), mib(data_allocated),
    );
    let report = match &counters {
        Some(c) => format!("{report}\n{}", breakdown(c, ingested, exit.written_bytes)),
        None => format!("{report}\n(the server logged no counters of bytes written by cause)\n"),
    };
    println!("{report}");
    let base = ringmail_bench::results_base(&a.out, "wamp", &a.label)?;
    let raw = serde_json::json!({
        "label": a.label, "seconds": a.seconds, "load_seconds": load_seconds,
        "sessions": a.sessions, "message_bytes": a.size, "stay_percent": stay,
        "defer_permille": a.defer_permille, "accepted": lo.messages, "load_errors": lo.errors,
        "staying": stayed, "sink_accepted": so.accepted, "ingested_bytes": ingested,
        "server_written_bytes": exit.written_bytes, "written_over_ingested": ratio,
        "device_written_bytes": dev, "data_bytes_end": data_apparent,
        "data_allocated_bytes_end": data_allocated, "compaction_copy_rounds": copied,
        "server_cpu_seconds": (exit.user + exit.system).as_secs_f64(),
        "zero_ahead": a.zero_ahead,
        "written_by_cause": counters,
    });
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&raw).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(base.with_extension("md"), &report).map_err(|e| e.to_string())?;
    let mut csv = std::fs::File::create(base.with_extension("csv")).map_err(|e| e.to_string())?;
    writeln!(csv, "seconds,server_written_bytes,data_bytes").map_err(|e| e.to_string())?;
    for (t, w, d) in &samples {
        writeln!(csv, "{t:.1},{w},{d}").map_err(|e| e.to_string())?;
    }
    let title = format!(
        "{label}ringmail: written {:.0} MiB for {:.0} MiB ingested ({ratio:.2}x)",
        mib(exit.written_bytes),
        mib(ingested)
    );
    std::fs::write(
        base.with_extension("svg"),
        ringmail_bench::wamp::svg(&samples, &title)?,
    )
    .map_err(|e| e.to_string())?;
    eprintln!("wrote {}.{{json,md,csv,svg}}", base.display());
    Ok(())
}

/// The server's counters of bytes written by cause, each in MiB and over the ingested
/// bytes: the store's own writes first, then the log's constant factors, then their
/// sum against the block layer's count (what the counters do not explain is the file
/// system's doing on the process's behalf, or other files).
fn breakdown(
    c: &std::collections::BTreeMap<String, u64>,
    ingested: u64,
    proc_written: u64,
) -> String {
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let x = |b: u64| b as f64 / ingested.max(1) as f64;
    let copied = get("copied_bytes");
    let records = get("log_record_bytes");
    let store = records + get("snapshot_bytes");
    let counted = store
        + get("log_tail_bytes")
        + get("log_pad_bytes")
        + get("zero_bytes")
        + get("segment_header_bytes");
    let mut out = String::from("| written by cause | MiB | / ingested |\n|---|---|---|\n");
    let mut row = |name: &str, b: u64| {
        out.push_str(&format!("| {name} | {:.0} | {:.2} |\n", mib(b), x(b)));
    };
    row("records (new)", records.saturating_sub(copied));
    row("records copied forward by compaction", copied);
    row("snapshots", get("snapshot_bytes"));
    row("**store** (records + copies + snapshots)", store);
    row(
        "tail block written again before each buffer",
        get("log_tail_bytes"),
    );
    row("padding to the block boundary", get("log_pad_bytes"));
    row("zeros ahead of the writer", get("zero_bytes"));
    row("segment headers", get("segment_header_bytes"));
    row("**counted in all** (device-level, by the store)", counted);
    row("block layer (wait4), for comparison", proc_written);
    out
}
