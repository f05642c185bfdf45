//! `ringmail-load smtp --target HOST:PORT --sessions N --messages M --size BYTES
//!  [--per-connection K] [--from ADDR] [--to ADDR] [--json]` and more; see `--help`.

use clap::{Args, Parser, Subcommand};
use ringmail_bench::load::{Plan, SmtpRun};
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
    /// Send mail over SMTP.
    Smtp(SmtpArgs),
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
    /// Send the envelope and DATA in one write (RFC 2920).
    #[arg(long)]
    pipelining: bool,
    /// Send BDAT LAST with the body instead of DATA (RFC 3030).
    #[arg(long)]
    bdat: bool,
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
    let Mode::Smtp(a) = Cli::parse().mode;
    let size_max = a.size_max.unwrap_or(a.size);
    if size_max < a.size || a.sessions == 0 {
        eprintln!("ringmail-load: need --sessions >= 1 and --size-max >= --size");
        return ExitCode::FAILURE;
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
            helo: "ringmail-load.test".into(),
        },
    };
    match run.run() {
        Ok(report) => {
            if a.json {
                println!("{}", report.json());
            } else {
                println!("{}", report.text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringmail-load: {e}");
            ExitCode::FAILURE
        }
    }
}
