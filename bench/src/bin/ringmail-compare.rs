//! `ringmail-compare`: runs each workload against ringmail, the peers and the limit in
//! the same run, interleaved, and reports medians and ratios. Started by `bench/compare`,
//! which installs the peers and builds the release binaries first.
//!
//! Targets, all on 127.0.0.1 ports chosen here:
//! - `sink`: ringmail-load straight into ringmail-sink: the limit;
//! - `ringmail`: ringmail serve (fresh data directory per run), durable;
//! - `postfix`: a private Postfix instance (bench/lib/postfix.sh) relaying to another
//!   ringmail-sink, with `smtpd_tls_security_level = may` and a self-signed P-256
//!   certificate (the key type of ringmail's own self-signed one).
//!
//! STARTTLS workloads run against ringmail and Postfix only (ringmail-sink has no
//! TLS); their rates are set against the same workload in plaintext, same run.
//!
//! Then the load tool is validated against Postfix's own smtp-source, both into
//! Postfix's smtp-sink.

use clap::Parser;
use ringmail_bench::compare::{self, Run};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "ringmail-compare")]
struct Args {
    /// About a minute in all: one repetition, fewer messages.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each workload (interleaved across targets).
    #[arg(long)]
    reps: Option<usize>,
    /// Where the raw JSON, the table and the chart go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Directory holding ringmail, ringmail-load and ringmail-sink.
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Skip the Postfix peer (for machines without the package).
    #[arg(long)]
    no_postfix: bool,
}

struct Workload {
    name: &'static str,
    /// Relay: the recipient is remote and the rate is end to end, from the first
    /// message sent to the last one delivered into the sink.
    relay: bool,
    size: usize,
    per_connection: usize,
    /// Messages for ringmail and the sink; Postfix gets a tenth (it is far slower and
    /// the run must stay bounded).
    messages: u64,
    /// The load tool says STARTTLS (`--starttls`) before its messages.
    tls: bool,
    /// The plaintext workload this one is compared with.
    plain: Option<&'static str>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on port {port}"))
}

struct Proc(Child);

impl Proc {
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let out = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        out.unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, stderr: Stdio) -> Result<Proc, String> {
    cmd.stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map(Proc)
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))
}

fn sink(bin: &Path) -> Result<(Proc, u16), String> {
    let port = free_port();
    let p = spawn(
        Command::new(bin.join("ringmail-sink")).args(["--listen", &format!("127.0.0.1:{port}")]),
        Stdio::null(),
    )?;
    wait_port(port)?;
    Ok((p, port))
}

fn load(bin: &Path, port: u16, w: &Workload, messages: u64) -> Result<compare::LoadOutput, String> {
    let out = Command::new(bin.join("ringmail-load"))
        .args([
            "smtp",
            "--target",
            &format!("127.0.0.1:{port}"),
            "--sessions",
            "32",
            "--json",
            "--max-seconds",
            "120",
        ])
        .args([
            "--messages",
            &messages.to_string(),
            "--size",
            &w.size.to_string(),
            "--per-connection",
            &w.per_connection.to_string(),
        ])
        .args(w.tls.then_some("--starttls"))
        .args([
            "--to",
            if w.relay {
                "rcpt@relay.test"
            } else {
                "rcpt@localhost"
            },
        ])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("ringmail-load: {e}"))?;
    compare::parse_load_output(&String::from_utf8_lossy(&out.stdout))
}

/// Polls until `empty` says the queue drained (bounded: 300 s).
fn wait_drained(what: &str, mut empty: impl FnMut() -> Result<bool, String>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !empty()? {
        if Instant::now() > deadline {
            return Err(format!("{what} did not deliver everything within 300 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether ringmail's delivery log (its stderr, in a file) has a `status=sent` line
/// for each of `messages` messages. Cheaper than `queue list`, which reads every
/// segment and would compete with the server for the disk while it is measured.
fn ringmail_delivered(log: &Path, messages: u64) -> Result<bool, String> {
    let text = std::fs::read(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let sent = memchr::memmem::find_iter(&text, b"status=sent").count() as u64;
    Ok(sent >= messages)
}

fn postfix_queue_empty(dir: &Path) -> Result<bool, String> {
    let out = Command::new("postqueue")
        .arg("-c")
        .arg(dir.join("etc"))
        .arg("-p")
        .output()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("Mail queue is empty"))
}

/// Postfix's TLS settings (main.cf lines) with a new self-signed certificate for
/// localhost in `dir`: ECDSA P-256, as ringmail's own; a session cache, so clients
/// resume as they do with ringmail.
fn postfix_tls(dir: &Path) -> Result<String, String> {
    let (cert, key) = (dir.join("postfix-tls.pem"), dir.join("postfix-tls.key"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args([
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("openssl: {e}"))?;
    if !st.success() {
        return Err("openssl could not make Postfix's certificate".into());
    }
    Ok(format!(
        "smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_session_cache_database = btree:${{data_directory}}/smtpd_scache\nsmtpd_tls_loglevel = 0",
        cert.display(),
        key.display()
    ))
}

/// `extra`: more main.cf lines (POSTFIX_MAIN_CF_EXTRA).
fn postfix(op: &str, dir: &Path, ports: &[u16], extra: &str) -> Result<(), String> {
    let script = format!(
        "source bench/lib/postfix.sh && postfix_{op} {} {}",
        dir.display(),
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let st = Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("POSTFIX_MAIN_CF_EXTRA", extra)
        .status()
        .map_err(|e| e.to_string())?;
    st.success()
        .then_some(())
        .ok_or_else(|| format!("postfix_{op} failed"))
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmail-compare: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> Result<(), String> {
    let reps = a.reps.unwrap_or(if a.quick { 1 } else { 3 });
    let scale = if a.quick { 5 } else { 1 };
    let workloads = [
        Workload {
            relay: false,
            name: "ingest 4 KiB, 1/conn",
            size: 4096,
            per_connection: 1,
            messages: 20_000 / scale,
            tls: false,
            plain: None,
        },
        Workload {
            relay: false,
            name: "ingest 4 KiB, many/conn",
            size: 4096,
            per_connection: 0,
            messages: 60_000 / scale,
            tls: false,
            plain: None,
        },
        Workload {
            relay: false,
            name: "ingest 100 KiB, 1/conn",
            size: 100 << 10,
            per_connection: 1,
            messages: 5_000 / scale,
            tls: false,
            plain: None,
        },
        Workload {
            relay: false,
            name: "ingest 100 KiB, many/conn",
            size: 100 << 10,
            per_connection: 0,
            messages: 10_000 / scale,
            tls: false,
            plain: None,
        },
        Workload {
            relay: true,
            name: "relay 4 KiB, many/conn",
            size: 4096,
            per_connection: 0,
            messages: 30_000 / scale,
            tls: false,
            plain: None,
        },
        Workload {
            relay: true,
            name: "relay 100 KiB, many/conn",
            size: 100 << 10,
            per_connection: 0,
            messages: 5_000 / scale,
            tls: false,
            plain: None,
        },
        Workload {
            relay: false,
            name: "ingest 4 KiB STARTTLS, 1/conn",
            size: 4096,
            per_connection: 1,
            messages: 20_000 / scale,
            tls: true,
            plain: Some("ingest 4 KiB, 1/conn"),
        },
        Workload {
            relay: false,
            name: "ingest 4 KiB STARTTLS, many/conn",
            size: 4096,
            per_connection: 0,
            messages: 60_000 / scale,
            tls: true,
            plain: Some("ingest 4 KiB, many/conn"),
        },
    ];
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (limit_sink, limit_port) = sink(&a.bin)?;
    // The far end of every relay: ringmail routes to it, Postfix relays to it.
    let (relay_sink, relay_port) = sink(&a.bin)?;
    let mut pf = None;
    if !a.no_postfix {
        let smtp_port = free_port();
        let dir = work.path().join("postfix");
        let tls = postfix_tls(work.path())?;
        postfix("start", &dir, &[smtp_port, relay_port], &tls)?;
        wait_port(smtp_port)?;
        pf = Some((smtp_port, dir));
    }
    let mut runs = Vec::new();
    let started = Instant::now();
    for w in &workloads {
        for rep in 0..reps {
            let record = |runs: &mut Vec<Run>, target: &str, o: compare::LoadOutput| {
                eprintln!(
                    "{:>26} {:>9} rep {rep}: {:>8.0} msg/s ({} messages, {} errors)",
                    w.name, target, o.rate, o.messages, o.errors
                );
                runs.push(Run::from_load(w.name, target, rep, &o));
            };
            if !w.tls {
                record(&mut runs, "sink", load(&a.bin, limit_port, w, w.messages)?);
            }
            let port = free_port();
            let data = work.path().join("ringmail-data");
            let _ = std::fs::remove_dir_all(&data);
            let log = work.path().join("ringmail.log");
            let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
            let server = spawn(
                Command::new(a.bin.join("ringmail"))
                    .args([
                        "serve",
                        "--smtp",
                        &format!("127.0.0.1:{port}"),
                        "--hostname",
                        "ringmail.test",
                        "--route",
                        &format!("*=127.0.0.1:{relay_port}"),
                        "--data",
                    ])
                    .arg(&data)
                    // Extra server flags, for A/B runs of a setting.
                    .args(
                        std::env::var("RINGMAIL_ARGS")
                            .unwrap_or_default()
                            .split_whitespace(),
                    )
                    .env("RINGMAIL_LOG", "info"),
                log_file.into(),
            )?;
            wait_port(port)?;
            let pid = server.0.id();
            let cpu0 = ringmail_bench::procstat::cpu_time(pid);
            let t = Instant::now();
            let mut o = load(&a.bin, port, w, w.messages)?;
            if w.relay {
                wait_drained("ringmail", || ringmail_delivered(&log, o.messages))?;
                o.rate = o.messages as f64 / t.elapsed().as_secs_f64();
            }
            // CPU of the measured stretch only: from before the load to the end of it
            // (ingest) or to the last delivery (relay).
            let cpu = cpu0
                .zip(ringmail_bench::procstat::cpu_time(pid))
                .map(|(a, b)| b - a);
            server.stop();
            let _ = std::fs::remove_dir_all(&data);
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            let per = |x: f64| x / o.messages.max(1) as f64;
            let mut r = Run::from_load(w.name, "ringmail", rep, &o);
            r.cpu_us_per_msg = cpu.map(|c| per(c.as_secs_f64() * 1e6));
            r.copies_per_msg =
                ringmail_bench::procstat::body_copies(&log_text).map(|n| per(n as f64));
            eprintln!(
                "{:>26} {:>9} rep {rep}: {:>8.0} msg/s ({} messages, {} errors), {} µs CPU/msg, {} copies/msg",
                w.name,
                "ringmail",
                o.rate,
                o.messages,
                o.errors,
                r.cpu_us_per_msg.map_or("n/a".into(), |v| format!("{v:.0}")),
                r.copies_per_msg.map_or("n/a".into(), |v| format!("{v:.2}")),
            );
            runs.push(r);
            if let Some((smtp_port, dir)) = &pf {
                let t = Instant::now();
                let mut o = load(&a.bin, *smtp_port, w, (w.messages / 10).max(100))?;
                if w.relay {
                    wait_drained("postfix", || postfix_queue_empty(dir))?;
                    o.rate = o.messages as f64 / t.elapsed().as_secs_f64();
                }
                record(&mut runs, "postfix", o);
            }
        }
    }
    let validation = validate(&a.bin, reps, scale)?;
    if let Some((_, dir)) = pf {
        postfix("stop", &dir, &[], "")?;
    }
    relay_sink.stop();
    let limit_out = limit_sink.stop();
    let sink_counts = compare::parse_sink_output(&limit_out)?;
    let sent_to_sink: u64 = runs
        .iter()
        .filter(|r| r.target == "sink")
        .map(|r| r.messages)
        .sum();
    if sink_counts.accepted != sent_to_sink {
        return Err(format!(
            "the sink accepted {} messages, the load tool reported {sent_to_sink}",
            sink_counts.accepted
        ));
    }

    let peers: Vec<&str> = if a.no_postfix {
        vec![]
    } else {
        vec!["postfix"]
    };
    let table = compare::markdown(&runs, "ringmail", "sink", &peers);
    let vtable = compare::markdown(&validation, "ringmail-load", "smtp-source", &[]);
    let costs = compare::cost_markdown(&runs, "ringmail");
    let mut targets_tls = vec!["ringmail"];
    targets_tls.extend(&peers);
    let pairs: Vec<(&str, &str)> = workloads
        .iter()
        .filter_map(|w| Some((w.name, w.plain?)))
        .collect();
    let tls_table = compare::tls_markdown(&runs, &pairs, &targets_tls);
    let report = format!(
        "ringmail-load, 32 sessions, medians of {reps} interleaved run(s), messages/s; {:.0} s in all\nPeers: {}\n\n{table}\nSTARTTLS against plaintext, each server against itself (same run): the share of its plaintext rate it keeps\n\n{tls_table}\nringmail's cost per message (CPU: user + system of the server while measured; copies: its body_copies= log counter)\n\n{costs}\nValidation: smtp-source vs ringmail-load, both into Postfix's smtp-sink (4 KiB, 32 sessions)\n\n{vtable}",
        started.elapsed().as_secs_f64(),
        peer_versions()
    );
    println!("{report}");
    let raw: Vec<_> = runs.iter().chain(&validation).map(Run::to_json).collect();
    let base = ringmail_bench::results_base(&a.out, "compare", "")?;
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&raw).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(base.with_extension("md"), &report).map_err(|e| e.to_string())?;
    let mut targets = vec!["sink", "ringmail"];
    targets.extend(&peers);
    let svg = compare::svg_chart(&runs, &targets, "ringmail vs peers, messages/s")?;
    std::fs::write(base.with_extension("svg"), svg).map_err(|e| e.to_string())?;
    eprintln!("wrote {}.{{json,md,svg}}", base.display());
    Ok(())
}

/// The first line of each peer's version report, for the record.
fn peer_versions() -> String {
    let first_line = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                // The line, up to any run of spaces (dnsmasq appends its copyright).
                let line = text.lines().next()?.trim();
                Some(line.split("  ").next().unwrap_or(line).to_string())
            })
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| "not installed".into())
    };
    format!(
        "Postfix {}, Dovecot {}, {}",
        first_line("postconf", &["-dh", "mail_version"]),
        first_line("dovecot", &["--version"]),
        first_line("dnsmasq", &["--version"])
    )
}

/// smtp-source vs ringmail-load into Postfix's smtp-sink, both modes, interleaved.
fn validate(bin: &Path, reps: usize, scale: u64) -> Result<Vec<Run>, String> {
    let port = free_port();
    let sink = spawn(
        Command::new("smtp-sink").args(["-u", "nobody", &format!("127.0.0.1:{port}"), "1000"]),
        Stdio::null(),
    )?;
    wait_port(port)?;
    let mut runs = Vec::new();
    for (name, many, messages) in [
        ("4 KiB, 1/conn", false, 20_000 / scale),
        ("4 KiB, many/conn", true, 60_000 / scale),
    ] {
        for rep in 0..reps {
            let mut cmd = Command::new("smtp-source");
            if many {
                cmd.arg("-d");
            }
            cmd.args([
                "-s",
                "32",
                "-l",
                "4096",
                "-m",
                &messages.to_string(),
                "-f",
                "s@source.test",
                "-t",
                "r@remote.test",
                &format!("127.0.0.1:{port}"),
            ]);
            let t = Instant::now();
            let out = cmd
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("smtp-source: {e}"))?;
            let secs = t.elapsed().as_secs_f64();
            if !out.status.success() {
                return Err("smtp-source failed".into());
            }
            let rate =
                compare::smtp_source_rate(&String::from_utf8_lossy(&out.stdout), messages, secs)?;
            runs.push(Run {
                workload: name.into(),
                target: "smtp-source".into(),
                rep,
                messages,
                errors: 0,
                seconds: secs,
                rate,
                p50_ms: None,
                p99_ms: None,
                cpu_us_per_msg: None,
                copies_per_msg: None,
            });
            let w = Workload {
                relay: false,
                name: "",
                size: 4096,
                per_connection: if many { 0 } else { 1 },
                messages,
                tls: false,
                plain: None,
            };
            let o = load(bin, port, &w, messages)?;
            runs.push(Run::from_load(name, "ringmail-load", rep, &o));
        }
    }
    drop(sink);
    let _ = SocketAddr::from(([127, 0, 0, 1], port));
    Ok(runs)
}
