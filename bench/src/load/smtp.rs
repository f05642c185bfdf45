//! `ringmail-load smtp`: the SMTP session (`session.rs`) on the ring driver, its
//! shared message budget, its figures and its report. TLS (STARTTLS or implicit) is
//! rustls's client connection between the driver's bytes and the session's.

use super::session::{Budget, Plan, Session, TlsMode};
use super::uring::{self, ConnError, Progress, Protocol, Step};
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The run's message budget, shared by every thread.
pub struct SharedBudget {
    next: AtomicU64,
    total: u64,
    size_min: usize,
    size_max: usize,
}

impl SharedBudget {
    pub fn new(total: u64, size_min: usize, size_max: usize) -> SharedBudget {
        assert!(size_min <= size_max);
        SharedBudget {
            next: AtomicU64::new(0),
            total,
            size_min,
            size_max,
        }
    }

    /// The size of message `seq`: a fixed hash of it mapped onto the size range.
    pub fn size_of(&self, seq: u64) -> usize {
        let span = (self.size_max - self.size_min + 1) as u64;
        let h = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        self.size_min + (h % span) as usize
    }

    fn remaining(&self) -> bool {
        self.next.load(Ordering::Relaxed) < self.total
    }
}

impl Budget for &SharedBudget {
    fn next(&mut self) -> Option<(u64, usize)> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        (seq < self.total).then(|| (seq, self.size_of(seq)))
    }
}

/// What one thread measured.
pub struct Stats {
    pub ok: u64,
    pub errors: u64,
    pub bytes: u64,
    pub codes: BTreeMap<u16, u64>,
    /// Transaction latency, microseconds.
    pub latency_us: Histogram<u64>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            ok: 0,
            errors: 0,
            bytes: 0,
            codes: BTreeMap::new(),
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        }
    }

    pub fn merge(&mut self, o: &Stats) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.bytes += o.bytes;
        for (c, n) in &o.codes {
            *self.codes.entry(*c).or_default() += n;
        }
        self.latency_us
            .add(&o.latency_us)
            .expect("same histogram bounds");
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// The SMTP mode as the ring driver runs it.
struct Smtp<'a> {
    plan: &'a Plan,
    budget: &'a SharedBudget,
    progress: &'a Progress,
    /// Takes any certificate (a load target's is often self-signed); shared by every
    /// connection, so later ones resume a TLS session as real clients do.
    tls: Arc<ClientConfig>,
}

/// One connection: the SMTP session and, once on, its TLS.
struct Conn {
    session: Session,
    tls: Option<Box<ClientConnection>>,
}

impl Smtp<'_> {
    fn error(&self, stats: &mut Stats) {
        stats.errors += 1;
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn start_tls(&self) -> Box<ClientConnection> {
        let name = ServerName::try_from("localhost").expect("a valid name");
        Box::new(ClientConnection::new(self.tls.clone(), name).expect("a client connection"))
    }
}

/// Ciphertext in, plaintext out (into `plain`).
fn decrypt(
    tls: &mut ClientConnection,
    mut data: &[u8],
    plain: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut buf = [0u8; 16 << 10];
    while !data.is_empty() {
        tls.read_tls(&mut data)?;
        tls.process_new_packets().map_err(std::io::Error::other)?;
        loop {
            match tls.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Everything rustls has to send (handshake, encrypted plaintext) into `send`.
fn flush(tls: &mut ClientConnection, send: &mut Vec<u8>) -> std::io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(send)?;
    }
    Ok(())
}

impl Protocol for Smtp<'_> {
    type Session = Conn;
    type Stats = Stats;

    fn stats(&self) -> Stats {
        Stats::new()
    }

    fn merge(into: &mut Stats, from: Stats) {
        into.merge(&from);
    }

    fn start(&self, _slot: usize, _nth: u64, _now: Instant) -> Option<Conn> {
        // The message is drawn when the server is ready for it; a connection is only
        // made while some are left.
        self.budget.remaining().then(|| Conn {
            session: Session::new(),
            tls: None,
        })
    }

    fn connected(&self, conn: &mut Conn, send: &mut Vec<u8>) {
        if self.plan.tls == TlsMode::Implicit {
            let mut tls = self.start_tls();
            flush(&mut tls, send).expect("a ClientHello");
            conn.tls = Some(tls);
        }
    }

    fn feed(
        &self,
        conn: &mut Conn,
        data: &[u8],
        now: Instant,
        send: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> Step {
        let failed = Step {
            close: true,
            finished: true,
        };
        let mut plain = Vec::new();
        let data = match &mut conn.tls {
            None => data,
            Some(tls) => {
                if decrypt(tls, data, &mut plain).is_err() {
                    self.error(stats);
                    return failed;
                }
                &plain[..]
            }
        };
        let mut b = self.budget;
        let mut out = conn.session.feed(self.plan, &mut b, data, now);
        if out.start_tls {
            conn.tls = Some(self.start_tls());
        }
        for code in &out.codes {
            *stats.codes.entry(*code).or_default() += 1;
        }
        if let Some((code, latency)) = out.finished {
            if code / 100 == 2 {
                stats.ok += 1;
                self.progress.ok.fetch_add(1, Ordering::Relaxed);
            } else {
                self.error(stats);
            }
            let _ = stats.latency_us.record((latency.as_micros() as u64).max(1));
        }
        if out.failed {
            self.error(stats);
        }
        match &mut conn.tls {
            None => send.append(&mut out.send),
            Some(tls) => {
                let sent = tls.writer().write_all(&out.send);
                if sent.and_then(|_| flush(tls, send)).is_err() {
                    self.error(stats);
                    return failed;
                }
            }
        }
        Step {
            close: out.close,
            finished: out.failed,
        }
    }

    fn is_done(conn: &Conn) -> bool {
        conn.session.is_done()
    }

    fn connection_error(&self, stats: &mut Stats, _e: ConnError) {
        self.error(stats);
    }

    fn sent(&self, stats: &mut Stats, bytes: usize) {
        stats.bytes += bytes as u64;
    }
}

/// A whole SMTP run.
pub struct SmtpRun {
    pub target: SocketAddr,
    pub sessions: usize,
    pub threads: usize,
    /// How long a thread polls for completions before it sleeps.
    pub spin: std::time::Duration,
    pub messages: u64,
    pub plan: Plan,
    pub max_duration: Duration,
}

/// The result of a run, as printed.
pub struct Report {
    pub stats: Stats,
    pub elapsed: Duration,
    pub messages_requested: u64,
}

impl SmtpRun {
    pub fn run(&self) -> std::io::Result<Report> {
        let budget = SharedBudget::new(self.messages, self.plan.size_min, self.plan.size_max);
        let progress = Progress::default();
        let proto = Smtp {
            plan: &self.plan,
            budget: &budget,
            progress: &progress,
            tls: ringmail::delivery::tls::OutboundTls::new(vec![], None)
                .map_err(std::io::Error::other)?
                .unverified,
        };
        let deadline = Instant::now() + self.max_duration;
        let (stats, elapsed) = uring::run(
            &proto,
            uring::Fleet {
                target: self.target,
                sessions: self.sessions,
                threads: self.threads,
                spin: self.spin,
                deadline,
            },
            &progress,
            |p, secs| {
                let ok = p.ok.load(Ordering::Relaxed);
                format!(
                    "{secs:7.1}s {ok:>10} messages {:>10.0} msg/s {:>6} errors ",
                    ok as f64 / secs,
                    p.errors.load(Ordering::Relaxed)
                )
            },
        )?;
        Ok(Report {
            stats,
            elapsed,
            messages_requested: self.messages,
        })
    }
}
impl Report {
    pub fn messages_per_sec(&self) -> f64 {
        self.stats.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(h: &Histogram<u64>, q: f64) -> f64 {
        h.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn text(&self) -> String {
        let s = &self.stats;
        let secs = self.elapsed.as_secs_f64();
        let codes: Vec<String> = s.codes.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        format!(
            "messages {} of {} ({} errors) in {secs:.2} s\nrate {:.0} msg/s, {:.1} MiB/s sent\nlatency per transaction: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms\nreplies: {}",
            s.ok,
            self.messages_requested,
            s.errors,
            self.messages_per_sec(),
            s.bytes as f64 / secs / (1 << 20) as f64,
            Self::ms(&s.latency_us, 0.5),
            Self::ms(&s.latency_us, 0.9),
            Self::ms(&s.latency_us, 0.99),
            Self::ms(&s.latency_us, 0.999),
            s.latency_us.max() as f64 / 1000.0,
            codes.join(", ")
        )
    }

    /// One JSON object: the contract scripts rely on (`messages`, `errors`, `seconds`,
    /// `messages_per_sec`, `p50_ms`, `p99_ms`, and more).
    pub fn json(&self) -> String {
        let s = &self.stats;
        let secs = self.elapsed.as_secs_f64();
        let codes: serde_json::Map<String, serde_json::Value> = s
            .codes
            .iter()
            .map(|(c, n)| (c.to_string(), (*n).into()))
            .collect();
        serde_json::json!({
            "mode": "smtp",
            "messages": s.ok,
            "requested": self.messages_requested,
            "errors": s.errors,
            "seconds": secs,
            "messages_per_sec": self.messages_per_sec(),
            "mib_per_sec": s.bytes as f64 / secs / (1 << 20) as f64,
            "p50_ms": Self::ms(&s.latency_us, 0.5),
            "p90_ms": Self::ms(&s.latency_us, 0.9),
            "p99_ms": Self::ms(&s.latency_us, 0.99),
            "p999_ms": Self::ms(&s.latency_us, 0.999),
            "max_ms": s.latency_us.max() as f64 / 1000.0,
            "codes": codes,
        })
        .to_string()
    }
}
