//! The `ringmail` command line; the settings are in docs/configuration.md.

use clap::{Args, Parser, Subcommand};
use ringmail::config::Settings;
use ringmail::{accounts, queue, runtime};
use ringmail_store::message::format_id;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// Check or print settings (docs/configuration.md lists them all).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Inspect the queue (works offline, also after the server was killed).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Inspect users' mailboxes (works offline, also after the server was killed).
    Mailbox {
        #[command(subcommand)]
        command: MailboxCommand,
    },
    /// Manage accounts: through the running server's control socket, or offline.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage aliases and catch-alls (FROM `@domain`), like `user`.
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
    /// DKIM keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Make a signing key in DATA/dkim/DOMAIN.SELECTOR.key; prints the DNS TXT record
    /// to publish on stdout and the key's path on stderr.
    Generate {
        domain: String,
        #[arg(long, default_value = "default")]
        selector: String,
        /// `ed25519` (RFC 8463) or `rsa2048` (RSA-SHA256, for verifiers without
        /// Ed25519).
        #[arg(long, default_value = "ed25519")]
        algorithm: String,
        #[arg(long, default_value = "./ringmail-data")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum MailboxCommand {
    /// List a user's messages: every mailbox, or one.
    List {
        address: String,
        #[arg(long)]
        mailbox: Option<String>,
        #[arg(long, default_value = "./ringmail-data")]
        data: PathBuf,
        /// JSON Lines, one message a line.
        #[arg(long)]
        json: bool,
    },
    /// Print one message as the mailbox serves it (its bytes, unchanged).
    Show {
        address: String,
        #[arg(long)]
        uid: u32,
        #[arg(long, default_value = "INBOX")]
        mailbox: String,
        #[arg(long, default_value = "./ringmail-data")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add an account; the password is read as one line from stdin.
    Add {
        address: String,
        /// Read the password from stdin (the only way: never on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Mailbox size limit in bytes (0: unlimited).
        #[arg(long, default_value_t = 0)]
        quota_bytes: u64,
        /// Message count limit (0: unlimited).
        #[arg(long, default_value_t = 0)]
        quota_messages: u64,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Delete an account (its mailboxes are dropped by their home shard).
    Del {
        address: String,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Set an account's password, read as one line from stdin.
    Passwd {
        address: String,
        #[arg(long, required = true)]
        password_stdin: bool,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Set an account's limits (0: unlimited).
    Quota {
        address: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        messages: u64,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// List the accounts.
    List {
        /// JSON Lines, one account a line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
}

#[derive(Subcommand)]
enum AliasCommand {
    /// Add (or replace) an alias: FROM is an address, or `@domain` for the domain's
    /// catch-all; each TO an existing account.
    Add {
        from: String,
        #[arg(required = true)]
        to: Vec<String>,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Delete an alias or catch-all.
    Del {
        from: String,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// List aliases and catch-alls.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with the same settings, keys named as the flags; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a settings file: exit 0 when `serve --config FILE` would accept it.
    Check { file: PathBuf },
    /// Print the effective settings (defaults, then --config FILE, then flags) as TOML.
    Show(Box<ServeArgs>),
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Ask the running server to retry deferred mail now: all of it, a domain's or
    /// one message's (through the admin API).
    Flush {
        /// Only recipients in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// Only this message.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Messages by destination and age, like Postfix's qshape (offline too).
    Summary {
        /// Only recipients in this state: queued, deferred or held.
        #[arg(long)]
        state: Option<String>,
        /// Only messages with recipients in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// The JSON answer of the admin API.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// One message: envelope, recipients' states, and (server running) its headers.
    Show {
        id: String,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Keep messages from being delivered until released.
    Hold {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Let held messages be delivered (now).
    Release {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Drop messages from the queue; the senders are told only with --bounce.
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Send each sender a bounce (a delivery status notification).
        #[arg(long)]
        bounce: bool,
        #[command(flatten)]
        server: Box<ServeArgs>,
    },
    /// Fail messages now and send each sender a bounce.
    Bounce {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        server: Box<ServeArgs>,
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

/// Log lines to stderr, filtered by `RINGMAIL_LOG` (else `RUST_LOG`; `RUST_LOG`
/// syntax; default `info`), as text or as one JSON object per line.
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGMAIL_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "info".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match json {
        true => log.json().flatten_event(true).init(),
        false => log
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging(false);
    }
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => Settings::layered(Some(&file), Settings::default()).map(|_| {
            println!("{}: ok", file.display());
        }),
        Command::Config {
            command: ConfigCommand::Show(a),
        } => Settings::layered(a.config.as_deref(), a.settings).map(|s| {
            print!("{}", s.to_toml());
        }),
        Command::Queue {
            command: QueueCommand::List { data, json },
        } => queue_list(data, json),
        Command::Queue { command } => queue(command),
        Command::Mailbox {
            command:
                MailboxCommand::List {
                    address,
                    mailbox,
                    data,
                    json,
                },
        } => mailbox_list(data, &address, mailbox.as_deref(), json),
        Command::Mailbox {
            command:
                MailboxCommand::Show {
                    address,
                    uid,
                    mailbox,
                    data,
                },
        } => ringmail::mailbox::list::show(&data, &address, &mailbox, uid)
            .and_then(|m| std::io::stdout().write_all(&m).map_err(|e| e.to_string())),
        Command::User { command } => user(command),
        Command::Alias { command } => alias(command),
        Command::Dkim {
            command:
                DkimCommand::Generate {
                    domain,
                    selector,
                    algorithm,
                    data,
                },
        } => dkim_generate(&data, &domain, &selector, &algorithm),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmail: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dkim_generate(data: &Path, domain: &str, selector: &str, algorithm: &str) -> Result<(), String> {
    use ringmail::mailauth::Algorithm;
    let algorithm = match algorithm.to_ascii_lowercase().as_str() {
        "ed25519" => Algorithm::Ed25519,
        "rsa2048" | "rsa-sha256" | "rsa" => Algorithm::RsaSha256,
        other => return Err(format!("`{other}` is not ed25519 or rsa2048")),
    };
    let (path, record) = ringmail::mailauth::keys::generate(data, domain, selector, algorithm)?;
    println!("{record}");
    eprintln!("{}", path.display());
    Ok(())
}

fn serve(a: ServeArgs) -> Result<(), String> {
    let settings = Settings::layered(a.config.as_deref(), a.settings.clone());
    let cfg = settings.and_then(|s| s.to_config());
    init_logging(cfg.as_ref().is_ok_and(|c| c.log_format == "json"));
    // SIGHUP reads the same file and flags again.
    let (file, flags) = (a.config, a.settings);
    let load = move || Settings::layered(file.as_deref(), flags.clone())?.to_config();
    runtime::serve(cfg?, Some(Box::new(load)))
}

/// The settings an account command runs with: those `serve` would (the local
/// domains decide which addresses are valid; the data directory where they go).
fn account_config(a: ServeArgs) -> Result<ringmail::config::Config, String> {
    Settings::layered(a.config.as_deref(), a.settings)?.to_config()
}

fn password() -> Result<String, String> {
    accounts::cli::read_password(&mut std::io::stdin().lock())
}

fn user(c: UserCommand) -> Result<(), String> {
    use accounts::Request;
    let (server, req, json) = match c {
        UserCommand::Add {
            address,
            quota_bytes,
            quota_messages,
            server,
            ..
        } => {
            let phc = accounts::cli::hash_password(&password()?)?;
            let req = Request::UserAdd {
                address,
                phc,
                quota_bytes,
                quota_messages,
            };
            (server, req, false)
        }
        UserCommand::Del { address, server } => (server, Request::UserDel { address }, false),
        UserCommand::Passwd {
            address, server, ..
        } => {
            let phc = accounts::cli::hash_password(&password()?)?;
            (server, Request::UserPasswd { address, phc }, false)
        }
        UserCommand::Quota {
            address,
            bytes,
            messages,
            server,
        } => {
            let req = Request::UserQuota {
                address,
                quota_bytes: bytes,
                quota_messages: messages,
            };
            (server, req, false)
        }
        UserCommand::List { json, server } => (server, Request::UserList, json),
    };
    let cfg = account_config(*server)?;
    let reply = accounts::cli::run(&cfg, &req)?;
    let users = match req {
        Request::UserList => reply["users"].as_array().cloned().unwrap_or_default(),
        Request::UserAdd { address, .. } => {
            println!("added {address} (id {})", reply["id"]);
            return Ok(());
        }
        _ => return Ok(()),
    };
    print_lines(|out| {
        if json {
            for u in &users {
                writeln!(out, "{u}")?;
            }
        } else {
            writeln!(
                out,
                "{:<40} {:>20} {:>14} {:>14}",
                "Address", "Id", "Quota bytes", "Quota messages"
            )?;
            for u in &users {
                writeln!(
                    out,
                    "{:<40} {:>20} {:>14} {:>14}",
                    u["address"].as_str().unwrap_or(""),
                    u["id"],
                    u["quota_bytes"],
                    u["quota_messages"]
                )?;
            }
            writeln!(out, "-- {} account(s)", users.len())?;
        }
        Ok(())
    })
}

fn alias(c: AliasCommand) -> Result<(), String> {
    use accounts::Request;
    let (server, req, json) = match c {
        AliasCommand::Add { from, to, server } => {
            (server, Request::AliasAdd { from, targets: to }, false)
        }
        AliasCommand::Del { from, server } => (server, Request::AliasDel { from }, false),
        AliasCommand::List { json, server } => (server, Request::AliasList, json),
    };
    let cfg = account_config(*server)?;
    let reply = accounts::cli::run(&cfg, &req)?;
    if req != Request::AliasList {
        return Ok(());
    }
    let aliases = reply["aliases"].as_array().cloned().unwrap_or_default();
    print_lines(|out| {
        for a in &aliases {
            if json {
                writeln!(out, "{a}")?;
            } else {
                let targets: Vec<&str> = a["targets"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|t| t.as_str()).collect())
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{} -> {}",
                    a["from"].as_str().unwrap_or(""),
                    targets.join(", ")
                )?;
            }
        }
        Ok(())
    })
}

/// Writes to stdout; a closed pipe (`| head`) is not an error of ours.
fn print_lines(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<(), String> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match f(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| e.to_string()),
    }
}

/// `ringmail queue …` but `list`: through the running server's admin API; the
/// read-only ones offline when none runs.
fn queue(c: QueueCommand) -> Result<(), String> {
    use ringmail::admin::client;
    let api = |server: Box<ServeArgs>| -> Result<_, String> {
        let cfg = account_config(*server)?;
        let addr = client::running(&cfg.data);
        Ok((cfg, addr))
    };
    let need = |cfg: &ringmail::config::Config, addr: Option<std::net::SocketAddr>| {
        addr.ok_or_else(|| {
            format!(
                "no server answers for {} (this command needs the running server)",
                cfg.data.display()
            )
        })
    };
    match c {
        QueueCommand::List { data, json } => queue_list(data, json),
        QueueCommand::Flush { domain, id, server } => {
            let (cfg, addr) = api(server)?;
            let path = format!(
                "/api/v1/queue/flush{}",
                client::query(&[("domain", &domain), ("id", &id)])
            );
            let r = client::call(need(&cfg, addr)?, cfg.admin_token.as_deref(), "POST", &path)?;
            println!("{} deferred recipient(s) made due now", r["flushed"]);
            Ok(())
        }
        QueueCommand::Summary {
            state,
            domain,
            json,
            server,
        } => {
            let (cfg, addr) = api(server)?;
            let shape = match addr {
                Some(addr) => {
                    let path = format!(
                        "/api/v1/queue/summary{}",
                        client::query(&[("state", &state), ("domain", &domain)])
                    );
                    client::call(addr, cfg.admin_token.as_deref(), "GET", &path)?
                }
                None => {
                    let filter = queue::report::Filter::parse(|k| match k {
                        "state" => state.clone(),
                        "domain" => domain.clone(),
                        _ => None,
                    })?;
                    let now = chrono::Utc::now().timestamp_millis() as u64;
                    let mut shape = queue::report::Shape::default();
                    for m in queue::list(&cfg.data).map_err(|e| e.to_string())? {
                        shape.add(&m, &filter, now);
                    }
                    shape.to_json(ringmail::admin::SUMMARY_TOP)
                }
            };
            print_lines(|out| match json {
                true => writeln!(out, "{shape}"),
                false => print_shape(out, &shape),
            })
        }
        QueueCommand::Show { id, server } => {
            let (cfg, addr) = api(server)?;
            let shown = match addr {
                Some(addr) => client::call(
                    addr,
                    cfg.admin_token.as_deref(),
                    "GET",
                    &format!("/api/v1/queue/{id}"),
                )?,
                None => {
                    let want = ringmail_store::message::parse_id(&id).ok_or_else(|| {
                        format!("`{id}` is not a queue id (16 hexadecimal digits)")
                    })?;
                    queue::list(&cfg.data)
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .find(|m| m.id == want)
                        .map(|m| m.to_json())
                        .ok_or_else(|| format!("no message {id} in the queue"))?
                }
            };
            print_lines(|out| {
                let headers = shown["headers"].as_str().map(str::to_string);
                let mut v = shown.clone();
                if let Some(o) = v.as_object_mut() {
                    o.remove("headers");
                }
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                )?;
                if let Some(h) = headers {
                    write!(out, "\n{h}")?;
                }
                Ok(())
            })
        }
        QueueCommand::Hold { ids, server } => control(server, &ids, "hold"),
        QueueCommand::Release { ids, server } => control(server, &ids, "release"),
        QueueCommand::Delete {
            ids,
            bounce: false,
            server,
        } => control(server, &ids, "delete"),
        QueueCommand::Delete {
            ids,
            bounce: true,
            server,
        }
        | QueueCommand::Bounce { ids, server } => control(server, &ids, "bounce"),
    }
}

/// Hold, release, delete or bounce each message, through the running server; every
/// change is durable when the server answers.
fn control(server: Box<ServeArgs>, ids: &[String], op: &str) -> Result<(), String> {
    use ringmail::admin::client;
    let cfg = account_config(*server)?;
    let addr = client::running(&cfg.data).ok_or_else(|| {
        format!(
            "no server answers for {} (`queue {op}` needs the running server)",
            cfg.data.display()
        )
    })?;
    let mut failed = 0;
    for id in ids {
        let path = format!("/api/v1/queue/{id}/{op}");
        match client::call(addr, cfg.admin_token.as_deref(), "POST", &path) {
            Ok(r) => {
                let busy = r["busy"].as_u64().unwrap_or(0);
                let note = match busy {
                    0 => String::new(),
                    n => format!(" ({n} under a delivery attempt now, left as they are)"),
                };
                println!("{id}: {op}: {} recipient(s){note}", r["changed"]);
            }
            Err(e) => {
                eprintln!("ringmail: {id}: {e}");
                failed += 1;
            }
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(format!("{n} of {} message(s) not changed", ids.len())),
    }
}

/// The summary as a qshape-like table.
fn print_shape(out: &mut dyn Write, shape: &serde_json::Value) -> std::io::Result<()> {
    let labels: Vec<String> = shape["buckets"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let row = |out: &mut dyn Write, name: &str, r: &serde_json::Value| -> std::io::Result<()> {
        write!(out, "{name:>32} {:>7}", r["messages"].as_u64().unwrap_or(0))?;
        for n in r["by_age"].as_array().into_iter().flatten() {
            write!(out, " {:>7}", n.as_u64().unwrap_or(0))?;
        }
        writeln!(out)
    };
    write!(out, "{:>32} {:>7}", "", "T")?;
    for l in &labels {
        write!(out, " {l:>7}")?;
    }
    writeln!(out)?;
    row(out, "TOTAL", &shape["total"])?;
    for d in shape["destinations"].as_array().into_iter().flatten() {
        row(out, d["domain"].as_str().unwrap_or(""), d)?;
    }
    Ok(())
}

fn mailbox_list(
    data: PathBuf,
    address: &str,
    mailbox: Option<&str>,
    json: bool,
) -> Result<(), String> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    ringmail::mailbox::list::run(&data, address, mailbox, json, &mut out)?;
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.to_string()),
        _ => Ok(()),
    }
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
