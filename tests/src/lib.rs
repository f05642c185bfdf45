//! Helpers for the end-to-end tests: start the real `ringmail` binary on a loopback
//! port of its choosing with a fresh data directory, talk to it, stop or kill it, and read its
//! queue with the offline command.

pub mod dns;
pub mod sink;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every listener flag of `serve`, each given port 0 by the tests: the server binds
/// a free port itself and reports it (a port picked here and passed on could be
/// taken by someone else in between).
pub const LISTENERS: [&str; 6] = [
    "--smtp",
    "--pop3",
    "--smtps",
    "--pop3s",
    "--submission",
    "--admin",
];

/// `serve` arguments putting each of these listeners on a free loopback port.
pub fn port_zero(flags: impl IntoIterator<Item = &'static str>) -> Vec<&'static str> {
    flags
        .into_iter()
        .flat_map(|flag| [flag, "127.0.0.1:0"])
        .collect()
}

/// The server binary under test. Cargo builds the package's binaries before it runs
/// its integration tests, into the directory above the tests' own `deps/`.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/*/deps");
    let bin = dir.join("ringmail-under-test");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with cargo test",
        bin.display()
    );
    bin
}

/// What a test does when this machine cannot give it what it needs (root, a loop
/// device, a high enough limit): in CI (`CI=true`, where the machine is known to have it)
/// it fails; elsewhere it says so on stderr, so that a pass is never silently a skip.
pub fn skip(why: &str) {
    skip_with(std::env::var("CI").ok().as_deref(), why)
}

/// `skip` for a given value of `CI`.
pub fn skip_with(ci: Option<&str>, why: &str) {
    if matches!(ci, Some(v) if !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")) {
        panic!("cannot run in CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// Unique log file names within one test process.
static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn log_path(data: &Path) -> PathBuf {
    let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    data.with_extension(format!("log-{}-{n}", std::process::id()))
}

pub struct Server {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    /// The POP3 listener.
    pub pop3: SocketAddr,
    /// The implicit-TLS listeners (SMTP submissions and POP3S).
    pub smtps: SocketAddr,
    pub pop3s: SocketAddr,
    /// The message submission listener (RFC 6409).
    pub submission: SocketAddr,
    /// Metrics and the admin API.
    pub admin: SocketAddr,
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    args: Vec<String>,
    log: PathBuf,
    /// Soft open-files limit the server starts with (None: inherited).
    nofile: Option<u64>,
}

impl Server {
    /// Starts a server with a fresh data directory; `args` are extra `serve` flags.
    pub fn start(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        Self::start_in(Some(tmp), data, args)
    }

    /// Starts a server on an existing data directory.
    pub fn start_in(tmp: Option<tempfile::TempDir>, data: PathBuf, args: &[&str]) -> Server {
        let log = log_path(&data);
        let mut s = Server {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pop3: SocketAddr::from(([127, 0, 0, 1], 0)),
            smtps: SocketAddr::from(([127, 0, 0, 1], 0)),
            pop3s: SocketAddr::from(([127, 0, 0, 1], 0)),
            submission: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            data,
            _tmp: tmp,
            args: args.iter().map(|s| s.to_string()).collect(),
            log,
            nofile: None,
        };
        s.spawn();
        s
    }

    /// Starts a server whose soft open-files limit is `soft` (the hard one unchanged),
    /// as a default login session would give it.
    pub fn start_with_nofile(soft: u64, args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut s = Server {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pop3: SocketAddr::from(([127, 0, 0, 1], 0)),
            smtps: SocketAddr::from(([127, 0, 0, 1], 0)),
            pop3s: SocketAddr::from(([127, 0, 0, 1], 0)),
            submission: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: log_path(&data),
            data,
            _tmp: Some(tmp),
            args: args.iter().map(|s| s.to_string()).collect(),
            nofile: Some(soft),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut cmd = Command::new(binary());
        if let Some(soft) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: getrlimit/setrlimit are async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("serve")
            .arg("--data")
            .arg(&self.data)
            // Port 0 for every listener the test does not place itself.
            .args(port_zero(
                LISTENERS
                    .into_iter()
                    .filter(|flag| !self.args.iter().any(|a| a == flag)),
            ))
            // Unless the test names the server itself (two servers talking).
            .args(if self.args.iter().any(|a| a == "--hostname") {
                &[][..]
            } else {
                &["--hostname", "mx.ringmail.test"][..]
            })
            // Tests never ask the machine's resolver: unless a test brings its own
            // name server, lookups go to a port where nothing answers.
            .args(if self.args.iter().any(|a| a == "--dns") {
                &[][..]
            } else {
                &["--dns", "127.0.0.1:9"][..]
            })
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ringmail");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the server reports ready (every executor has recovered and listens)
    /// and takes the address it bound from that line.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ringmail exited early with {status}: {}", self.log_text());
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains("ringmail ready")) {
                self.addr =
                    ready_addr(line).unwrap_or_else(|| panic!("no smtp= address in {line:?}"));
                let field = |name: &str| {
                    ready_field(line, name)
                        .unwrap_or_else(|| panic!("no {name}= address in {line:?}"))
                };
                self.pop3 = field("pop3");
                self.smtps = field("smtps");
                self.pop3s = field("pop3s");
                self.submission = field("submission");
                self.admin = field("admin");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ringmail did not become ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Restarts on the same data directory (on a new port: read `addr` again).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.spawn();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then waits; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                c.kill().unwrap();
                panic!("ringmail did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ringmail queue list --json`, parsed.
    pub fn queue(&self) -> Vec<serde_json::Value> {
        queue_list(&self.data)
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The address in the server's `ringmail ready smtp=ADDR ...` log line.
pub fn ready_addr(line: &str) -> Option<SocketAddr> {
    ready_field(line, "smtp")
}

/// The address `KEY=ADDR` of the server's `ringmail ready` line.
pub fn ready_field(line: &str, key: &str) -> Option<SocketAddr> {
    // `--log-format json`: one object per line.
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        return v[key].as_str()?.parse().ok();
    }
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()?.parse().ok()
}

pub fn queue_list(data: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(
        Command::new(binary())
            .args(["queue", "list", "--json", "--data"])
            .arg(data),
    );
    // A healthy data directory reads without a word of damage (every index's
    // snapshot section is accounted for).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("did not decode"), "queue list: {err}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("queue list prints JSON lines"))
        .collect()
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Adds a user offline or through a running server (`ringmail user add`), with
/// `password`.
pub fn user_add(data: &Path, address: &str, password: &str) {
    user_add_with(data, address, password, &[]);
}

/// `user_add` with more flags (`--local-domain D` for an address outside the
/// default local domain).
pub fn user_add_with(data: &Path, address: &str, password: &str, flags: &[&str]) {
    use std::io::Write;
    let mut child = Command::new(binary())
        .args(["user", "add", address, "--password-stdin", "--data"])
        .arg(data)
        .args(flags)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "user add {address}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits (up to 20 s) until `address`'s INBOX holds `n` messages; fails if it holds
/// more.
pub fn wait_inbox(server: &Server, address: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = mailbox_list(&server.data, address, Some("INBOX")).len();
        if got >= n {
            assert_eq!(got, n, "{address}: more than {n} delivered");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{address}: {got} of {n} delivered"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// `ringmail dkim generate DOMAIN --selector S --algorithm A --data DATA`: the DNS
/// record line it printed and the key's path.
pub fn dkim_generate(
    data: &Path,
    domain: &str,
    selector: &str,
    algorithm: &str,
) -> (String, String) {
    let out = run_ok(
        Command::new(binary())
            .args(["dkim", "generate", domain, "--selector", selector])
            .args(["--algorithm", algorithm, "--data"])
            .arg(data),
    );
    let record = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let path = String::from_utf8(out.stderr).unwrap().trim().to_string();
    (record, path)
}

/// A `NAME. IN TXT "…" "…"` line's name and its value, the quoted strings joined.
pub fn txt_record(line: &str) -> (&str, String) {
    let (name, value) = line.split_once(" IN TXT ").expect("a TXT record line");
    let value = value.split("\" \"").map(|p| p.trim_matches('"')).collect();
    (name, value)
}

/// `ringmail mailbox list ADDRESS [--mailbox NAME] --json`, one value per entry.
pub fn mailbox_list(data: &Path, address: &str, mailbox: Option<&str>) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(binary());
    cmd.args(["mailbox", "list", address, "--json"]);
    if let Some(m) = mailbox {
        cmd.args(["--mailbox", m]);
    }
    let out = run_ok(cmd.arg("--data").arg(data));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("mailbox list prints JSON lines"))
        .collect()
}

/// Runs a python3 script with the server's port as its first argument.
pub fn python(script: &str, port: u16) -> String {
    let out = run_ok(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(port.to_string()),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A raw SMTP client on a blocking socket: writes bytes, reads whole replies.
pub struct Client {
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect to ringmail");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client {
            reader: BufReader::new(s),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// Reads one (possibly multi-line) reply; returns its text.
    pub fn reply(&mut self) -> String {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "connection closed while waiting for a reply; got so far: {text:?}"
            );
            text.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                return text;
            }
        }
    }

    /// Reads `n` replies and returns their codes.
    pub fn codes(&mut self, n: usize) -> Vec<u16> {
        (0..n).map(|_| self.reply()[..3].parse().unwrap()).collect()
    }

    /// Whether the server closed the connection (reads to EOF).
    pub fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok() && rest.is_empty()
    }
}

/// Extracts the id from `250 2.0.0 Ok: queued as ID`.
pub fn queued_id(reply: &str) -> Option<String> {
    reply
        .trim_end()
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .map(|s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_fails_in_ci_and_is_reported_elsewhere() {
        for ci in ["true", "1", "yes"] {
            let r = std::panic::catch_unwind(|| skip_with(Some(ci), "no loop device"));
            assert!(r.is_err(), "CI={ci} must fail");
        }
        for ci in [None, Some(""), Some("false"), Some("0")] {
            skip_with(ci, "no loop device");
        }
    }

    #[test]
    fn the_ready_line_gives_the_address() {
        let line = "2026-01-01T00:00:00Z  INFO ringmail::runtime: ringmail ready \
                    smtp=127.0.0.1:40123 executors=2 shards=2 data=/tmp/x";
        assert_eq!(ready_addr(line), Some("127.0.0.1:40123".parse().unwrap()));
        assert_eq!(ready_addr("ringmail ready"), None);
    }
}
