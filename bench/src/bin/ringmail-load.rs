//! `ringmail-load smtp --target HOST:PORT --sessions N --messages M --size BYTES
//!  [--per-connection K] [--from ADDR] [--to ADDR] [--lmtp] [--json]`,
//! `ringmail-load pop3 --target HOST:PORT --sessions N --logins L (users) [--json]`,
//! `ringmail-load passwd-file (users)`, `ringmail-load verify PATH…`; see `--help`.

use clap::{Args, Parser, Subcommand};
use ringmail_bench::load::pop3::{Auth, Login, Pop3Plan, Work};
use ringmail_bench::load::pop3run::{users_from_file, users_from_pattern, Pop3Run};
use ringmail_bench::load::{verify, Plan, SmtpRun, TlsMode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ringmail-load",
    about = "An io_uring load generator for mail servers"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Send mail over SMTP (or LMTP).
    Smtp(SmtpArgs),
    /// Log in and retrieve mail over POP3.
    Pop3(Pop3Args),
    /// Print the users as a Dovecot passwd-file, hashed as ringmail hashes
    /// (`{ARGON2ID}`, the argon2 crate's default parameters).
    PasswdFile(UsersArgs),
    /// Measure argon2id verifications per second of a ringmail password hash with
    /// the server's own check, on 1 thread and on --threads at once: the most cold
    /// logins a second can be, there (prints one JSON object).
    Argon2(Argon2Args),
    /// Measure DKIM signatures per second of ringmail's signer (mail-auth, ring) over
    /// load messages of --size bytes, on --threads at once: the most signed messages a
    /// second can be, there (prints the rate alone).
    DkimSign(DkimSignArgs),
    /// Check saved messages (files, maildirs) against their X-Load-Checksum; prints
    /// one JSON object; fails unless every file verifies (and --expect matches).
    Verify(VerifyArgs),
}

#[derive(Args)]
struct Argon2Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Threads of the second measurement; 0: the available cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct DkimSignArgs {
    /// The private key (PEM), as `ringmail dkim generate` writes it.
    #[arg(long)]
    key: PathBuf,
    /// `ed25519` or `rsa-sha256`.
    #[arg(long, default_value = "ed25519")]
    algorithm: String,
    #[arg(long, default_value_t = 102400)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
}

#[derive(Args)]
struct UsersArgs {
    /// Users, one `address password` line each.
    #[arg(long, conflicts_with = "user_pattern")]
    users_file: Option<PathBuf>,
    /// Users from a pattern, `{}` standing for 0 to --user-count - 1.
    #[arg(long, default_value = "user{}@localhost")]
    user_pattern: String,
    #[arg(long, default_value = "password{}")]
    password_pattern: String,
    #[arg(long, default_value_t = 64)]
    user_count: usize,
}

impl UsersArgs {
    fn users(&self) -> Result<Vec<Login>, String> {
        match &self.users_file {
            Some(f) => {
                let text =
                    std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
                users_from_file(&text)
            }
            None => Ok(users_from_pattern(
                &self.user_pattern,
                &self.password_pattern,
                self.user_count,
            )),
        }
    }
}

#[derive(Args)]
struct Pop3Args {
    #[arg(long)]
    target: std::net::SocketAddr,
    /// Concurrent sessions (each logs in as its own users: at most as many as users).
    #[arg(long, default_value_t = 16)]
    sessions: usize,
    /// Logins in all (0: until --max-seconds).
    #[arg(long, default_value_t = 1000)]
    logins: u64,
    /// Log in as each user once (still at most --logins): after a server start, the
    /// cold-cache logins.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    users: UsersArgs,
    /// Log in with AUTH PLAIN (RFC 5034) instead of USER/PASS.
    #[arg(long)]
    auth_plain: bool,
    /// Log in and QUIT only: the logins/s figure.
    #[arg(long, conflicts_with_all = ["list_only", "sample"])]
    logins_only: bool,
    /// STAT, LIST and UIDL, no RETR.
    #[arg(long, conflicts_with = "sample")]
    list_only: bool,
    /// RETR this many messages drawn at random per login instead of every one.
    #[arg(long)]
    sample: Option<usize>,
    /// DELE every retrieved message.
    #[arg(long)]
    dele: bool,
    /// Threads, each with its own io_uring.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Microseconds a thread polls its completion queue before it sleeps.
    #[arg(long, default_value_t = 20)]
    spin_us: u64,
    /// Stop after this many seconds whatever is left.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Print the summary as one JSON object (the last line).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// Files or directories (walked; maildir `tmp/` and hidden entries skipped).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Fail unless exactly this many files, with this many distinct sequence numbers.
    #[arg(long)]
    expect: Option<u64>,
}

#[derive(Args)]
struct SmtpArgs {
    #[arg(long)]
    target: std::net::SocketAddr,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 32)]
    sessions: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Message size in bytes (the lower bound with --size-max).
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Upper bound of a uniform size range.
    #[arg(long)]
    size_max: Option<usize>,
    /// Messages per connection before QUIT (0: as many as the run has).
    #[arg(long, default_value_t = 0)]
    per_connection: usize,
    #[arg(long, default_value = "load@ringmail-load.test")]
    from: String,
    /// Recipient (repeatable: every message goes to each) [default: rcpt@localhost]
    #[arg(long = "to")]
    to: Vec<String>,
    /// Recipient domain with a weight, NAME[:WEIGHT] (repeatable): each message gets
    /// --rcpts recipients in domains drawn by weight. Overrides --to.
    #[arg(long = "domain", value_parser = parse_domain)]
    domains: Vec<(String, u32)>,
    /// Recipients per message with --domain.
    #[arg(long, default_value_t = 1)]
    rcpts: usize,
    /// One recipient per message, in turn: `{}` stands for the message number modulo
    /// --to-count (so each of those users gets its share). Overrides --to, --domain.
    #[arg(long)]
    to_pattern: Option<String>,
    #[arg(long, default_value_t = 64)]
    to_count: usize,
    /// Speak LMTP (RFC 2033): LHLO, a reply per recipient after the data.
    #[arg(long)]
    lmtp: bool,
    /// Send the envelope and DATA in one write (RFC 2920).
    #[arg(long)]
    pipelining: bool,
    /// Send BDAT LAST with the body instead of DATA (RFC 3030).
    #[arg(long)]
    bdat: bool,
    /// STARTTLS after EHLO (RFC 3207), then EHLO again; any certificate is taken.
    #[arg(long, conflicts_with = "smtps")]
    starttls: bool,
    /// TLS from the first byte (an smtps listener, RFC 8314).
    #[arg(long)]
    smtps: bool,
    /// AUTH PLAIN as USER:PASS on every connection before its first message.
    #[arg(long, value_parser = parse_auth)]
    auth: Option<(String, String)>,
    /// DKIM-sign every message: `domain=D,selector=S,key=PATH[,algorithm=A]` (the
    /// domain of --from).
    #[arg(long)]
    dkim: Option<ringmail::mailauth::DkimKeyConfig>,
    /// Threads, each with its own io_uring.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Microseconds a thread polls its completion queue before it sleeps (0: sleep
    /// at once). Waking a sleeping thread costs tens of microseconds in a VM.
    #[arg(long, default_value_t = 20)]
    spin_us: u64,
    /// Stop after this many seconds whatever is left.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Print the summary as one JSON object (the last line).
    #[arg(long)]
    json: bool,
}

fn parse_auth(s: &str) -> Result<(String, String), String> {
    s.split_once(':')
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .ok_or_else(|| "USER:PASS".to_string())
}

fn parse_domain(s: &str) -> Result<(String, u32), String> {
    match s.split_once(':') {
        None => Ok((s.to_string(), 1)),
        Some((d, w)) => Ok((
            d.to_string(),
            w.parse()
                .map_err(|_| format!("weight {w:?} is not a whole number"))?,
        )),
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().mode {
        Mode::Smtp(a) => smtp(a),
        Mode::Pop3(a) => pop3(a),
        Mode::PasswdFile(a) => passwd_file(a),
        Mode::Argon2(a) => argon2_rate(a),
        Mode::DkimSign(a) => dkim_sign_rate(a),
        Mode::Verify(a) => verify_files(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmail-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pop3(a: Pop3Args) -> Result<(), String> {
    let work = if a.logins_only {
        Work::LoginsOnly
    } else if a.list_only {
        Work::ListOnly
    } else if let Some(k) = a.sample {
        Work::Sample(k)
    } else {
        Work::RetrAll
    };
    let run = Pop3Run {
        target: a.target,
        sessions: a.sessions,
        threads: a.threads,
        spin: Duration::from_micros(a.spin_us),
        logins: a.logins,
        once: a.once,
        max_duration: Duration::from_secs(a.max_seconds),
        plan: Pop3Plan {
            auth: if a.auth_plain {
                Auth::Plain
            } else {
                Auth::UserPass
            },
            work,
            dele: a.dele,
        },
        users: a.users.users()?,
    };
    let report = run.run()?;
    if a.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.text());
    }
    Ok(())
}

fn passwd_file(a: UsersArgs) -> Result<(), String> {
    let mut out = String::new();
    for u in a.users()? {
        if u.user.contains(':') {
            return Err(format!("{}: a passwd-file user has no colon", u.user));
        }
        let phc = ringmail::accounts::cli::hash_password(&u.password)?;
        out.push_str(&format!("{}:{{ARGON2ID}}{phc}\n", u.user));
    }
    print!("{out}");
    Ok(())
}

fn argon2_rate(a: Argon2Args) -> Result<(), String> {
    let phc = ringmail::accounts::cli::hash_password("password0")?;
    let threads = match a.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let span = Duration::from_secs_f64(a.seconds.max(0.1));
    // Verifications per second of `n` threads verifying for `span` each.
    let rate = |n: usize| -> Result<f64, String> {
        let start = std::time::Instant::now();
        let done: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| {
                        let mut k = 0;
                        while start.elapsed() < span {
                            assert!(ringmail::auth::argon2_check(b"password0", &phc));
                            k += 1;
                        }
                        k
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
        });
        Ok(done as f64 / start.elapsed().as_secs_f64())
    };
    let one = rate(1)?;
    let all = rate(threads)?;
    println!(
        "{}",
        serde_json::json!({"mode": "argon2", "phc_params": phc.split('$').nth(3), "one_thread_per_sec": one, "threads": threads, "threads_per_sec": all})
    );
    Ok(())
}

fn dkim_sign_rate(a: DkimSignArgs) -> Result<(), String> {
    use ringmail::mailauth::{DkimKeyConfig, Signers};
    let signers = Signers::load(&[DkimKeyConfig {
        domain: "ringmail-load.test".into(),
        selector: "s".into(),
        key: a.key,
        algorithm: a.algorithm.parse()?,
        headers: vec![],
    }])?;
    let text = ringmail_bench::load::session::message(
        0,
        a.size,
        "load@ringmail-load.test",
        "rcpt@relay.test",
    );
    let prefix = b"Received: from ringmail-load.test ([127.0.0.1]) by relay.bench.test
";
    let span = Duration::from_secs_f64(a.seconds.max(0.1));
    let start = std::time::Instant::now();
    let signed: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..a.threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    // Each thread its own body: Body is not shared across threads.
                    let body = ringmail::smtp::Body::from(text.clone());
                    let mut k = 0;
                    while start.elapsed() < span {
                        signers
                            .sign(prefix, &body, &|_| true)
                            .expect("a From: with a key")
                            .expect("signed");
                        k += 1;
                    }
                    k
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    println!("{:.0}", signed as f64 / start.elapsed().as_secs_f64());
    Ok(())
}

fn verify_files(a: VerifyArgs) -> Result<(), String> {
    let v = verify::verify_paths(&a.paths)?;
    println!("{}", v.json());
    let complete = a
        .expect
        .is_none_or(|n| v.files == n && v.distinct == n && v.duplicates == 0);
    if v.verified == v.files && complete {
        Ok(())
    } else {
        Err(format!(
            "{} of {} files verified ({} mismatched, {} without checksum, {} distinct, {} duplicates){}",
            v.verified,
            v.files,
            v.mismatched,
            v.unverified,
            v.distinct,
            v.duplicates,
            a.expect.map_or(String::new(), |n| format!("; expected {n}"))
        ))
    }
}

fn smtp(a: SmtpArgs) -> Result<(), String> {
    let size_max = a.size_max.unwrap_or(a.size);
    if size_max < a.size || a.sessions == 0 {
        return Err("need --sessions >= 1 and --size-max >= --size".into());
    }
    let run = SmtpRun {
        target: a.target,
        sessions: a.sessions,
        threads: a.threads,
        spin: Duration::from_micros(a.spin_us),
        messages: a.messages,
        max_duration: Duration::from_secs(a.max_seconds),
        plan: Plan {
            from: a.from,
            domains: a.domains,
            rcpts_per_message: a.rcpts,
            to: if a.to.is_empty() {
                vec!["rcpt@localhost".into()]
            } else {
                a.to
            },
            size_min: a.size,
            size_max,
            per_connection: a.per_connection,
            pipelining: a.pipelining,
            bdat: a.bdat,
            lmtp: a.lmtp,
            to_cycle: a.to_pattern.map(|p| (p, a.to_count.max(1))),
            helo: "ringmail-load.test".into(),
            tls: match (a.starttls, a.smtps) {
                (true, _) => TlsMode::StartTls,
                (_, true) => TlsMode::Implicit,
                _ => TlsMode::Plain,
            },
            auth: a.auth,
            dkim: match a.dkim {
                Some(k) => Some(ringmail_bench::load::session::LoadSigner(
                    std::sync::Arc::new(ringmail::mailauth::Signers::load(&[k])?),
                )),
                None => None,
            },
        },
    };
    let report = run.run().map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.text());
    }
    Ok(())
}
