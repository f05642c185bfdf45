//! The `ringmail` command line (DESIGN.md, "Command-line contract").

use clap::{Args, Parser, Subcommand};
use ringmail::config::{self, parse_addr, parse_cidr, parse_route, Config};
use ringmail::{queue, runtime};
use ringmail_store::message::format_id;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ringmail",
    version,
    about = "A thread-per-core io_uring mail relay engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Inspect the queue (works offline, also after the server was killed).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with the same settings; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (created on first start) [default: ./ringmail-data]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Executors (one pinned thread per core) [default: all cores]
    #[arg(long)]
    cores: Option<usize>,
    /// Name in the greeting and in Received headers [default: the system's host name]
    #[arg(long)]
    hostname: Option<String>,
    /// SMTP listener [default: 127.0.0.1:2525]
    #[arg(long, value_parser = parse_addr)]
    smtp: Option<std::net::SocketAddr>,
    /// A domain whose mail is accepted from anyone (repeatable) [default: localhost]
    #[arg(long = "local-domain")]
    local_domains: Vec<String>,
    /// A network that may relay to any domain (repeatable) [default: 127.0.0.0/8, ::1/128]
    #[arg(long = "relay-network", value_parser = parse_cidr)]
    relay_networks: Vec<ipnet::IpNet>,
    /// Largest message in bytes [default: 52428800]
    #[arg(long)]
    max_message_size: Option<usize>,
    /// Seconds an SMTP client may stay silent [default: 300]
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Concurrent connections per shard [default: 10000]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Name server for MX lookups, ADDR:PORT (repeatable) [default: /etc/resolv.conf]
    #[arg(long = "dns", value_parser = parse_addr)]
    dns: Vec<std::net::SocketAddr>,
    /// Port of remote MX hosts [default: 25]
    #[arg(long)]
    mx_port: Option<u16>,
    /// A fixed next hop for a domain, DOMAIN=HOST:PORT; `*` for every non-local domain
    /// (a smarthost) (repeatable)
    #[arg(long = "route", value_parser = parse_route)]
    routes: Vec<(String, String, u16)>,
    /// Seconds before the first retry of a deferred recipient [default: 60]
    #[arg(long)]
    retry_first: Option<u64>,
    /// Longest wait between retries, seconds [default: 3600]
    #[arg(long)]
    retry_max: Option<u64>,
    /// Seconds after which an undeliverable message bounces [default: 432000]
    #[arg(long)]
    max_queue_age: Option<u64>,
    /// Size at which a log segment is sealed, in bytes [default: 67108864]
    #[arg(long)]
    segment_size: Option<u64>,
    /// Most messages per second to one destination domain, per shard [default: no limit]
    #[arg(long)]
    destination_rate: Option<f64>,
    /// Most concurrent connections to one destination domain, per shard [default: 16]
    #[arg(long)]
    destination_connections: Option<usize>,
    /// Most delivery attempts running at once per shard, all destinations [default: 1000]
    #[arg(long)]
    max_deliveries: Option<usize>,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Ask the running server to retry deferred mail now (SIGUSR1).
    Flush {
        #[arg(long, default_value = "./ringmail-data")]
        data: PathBuf,
    },
    /// List queued messages.
    List {
        #[arg(long, default_value = "./ringmail-data")]
        data: PathBuf,
        /// JSON Lines, one message a line.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGMAIL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Queue {
            command: QueueCommand::List { data, json },
        } => queue_list(data, json),
        Command::Queue {
            command: QueueCommand::Flush { data },
        } => queue_flush(data),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmail: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(a: ServeArgs) -> Result<(), String> {
    let mut cfg = Config::default();
    if let Some(path) = &a.config {
        cfg.apply_file(path)?;
    }
    if let Some(v) = a.data {
        cfg.data = v;
    }
    if let Some(v) = a.cores {
        cfg.cores = Some(v);
    }
    if let Some(v) = a.hostname {
        cfg.hostname = v;
    }
    if let Some(v) = a.smtp {
        cfg.smtp = v;
    }
    if !a.local_domains.is_empty() {
        cfg.local_domains = a.local_domains;
    }
    if !a.relay_networks.is_empty() {
        cfg.relay_networks = a.relay_networks;
    }
    if let Some(v) = a.max_message_size {
        cfg.limits.message_bytes_max = v;
    }
    if let Some(v) = a.idle_timeout {
        cfg.idle_timeout = Duration::from_secs(v);
    }
    if let Some(v) = a.max_connections {
        cfg.connections_per_shard_max = v;
    }
    if !a.dns.is_empty() {
        cfg.dns = a.dns;
    }
    if let Some(v) = a.mx_port {
        cfg.mx_port = v;
    }
    if !a.routes.is_empty() {
        cfg.routes = a.routes;
    }
    if let Some(v) = a.retry_first {
        cfg.retry.first = Duration::from_secs(v);
    }
    if let Some(v) = a.retry_max {
        cfg.retry.cap = Duration::from_secs(v);
    }
    if let Some(v) = a.max_queue_age {
        cfg.retry.max_age = Duration::from_secs(v);
    }
    if let Some(v) = a.segment_size {
        cfg.segment_bytes_max = v.max(config::SEGMENT_BYTES_MIN);
    }
    if let Some(v) = a.destination_rate {
        cfg.destination_rate = Some(v);
    }
    if let Some(v) = a.destination_connections {
        cfg.connections_per_destination_max = v;
    }
    if let Some(v) = a.max_deliveries {
        cfg.deliveries_per_shard_max = v;
    }
    cfg.validate()?;
    runtime::serve(cfg)
}

fn queue_flush(data: PathBuf) -> Result<(), String> {
    let path = runtime::pid_file(&data);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read {}: {e} (is the server running on this data directory?)",
            path.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{} does not hold a process id", path.display()))?;
    // SAFETY: kill(2) with a plain signal number.
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        return Err(format!(
            "cannot signal process {pid}: {} (is the server running?)",
            std::io::Error::last_os_error()
        ));
    }
    println!("asked ringmail (pid {pid}) to retry deferred mail now");
    Ok(())
}

fn queue_list(data: PathBuf, json: bool) -> Result<(), String> {
    let messages = queue::list(&data).map_err(|e| e.to_string())?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = (|| -> std::io::Result<()> {
        if json {
            for m in &messages {
                writeln!(out, "{}", m.to_json())?;
            }
        } else {
            writeln!(
                out,
                "{:<16} {:>10}  {:<24}  Sender/Recipient",
                "Queue ID", "Size", "Arrival"
            )?;
            for m in &messages {
                let arrival = chrono::DateTime::from_timestamp_millis(m.received_at_ms as i64)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default();
                let from = if m.from.is_empty() { "<>" } else { &m.from };
                writeln!(
                    out,
                    "{:<16} {:>10}  {:<24}  {}",
                    format_id(m.id),
                    m.size,
                    arrival,
                    from
                )?;
                for r in &m.rcpt {
                    writeln!(out, "{:>55}  {} ({})", "", r.to, r.status.as_str())?;
                }
            }
            writeln!(out, "-- {} message(s) in queue", messages.len())?;
        }
        out.flush()
    })();
    match result {
        // A closed pipe (`| head`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| e.to_string()),
    }
}
