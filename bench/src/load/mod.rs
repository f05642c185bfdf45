//! `ringmail-load`: a load generator driven directly by io_uring (one ring per thread).
//!
//! Modes are subcommands; `smtp` is the first. A mode is a sans-IO session
//! (`session.rs`) plus the shared ring driver (`uring.rs`); POP3 and IMAP modes add a
//! session type each and reuse the driver, the budget, the statistics and the report.

pub mod session;
pub mod uring;

use hdrhistogram::Histogram;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use session::Plan;
pub use uring::{Progress, SharedBudget, Stats};

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
        let budget = Arc::new(SharedBudget::new(
            self.messages,
            self.plan.size_min,
            self.plan.size_max,
        ));
        let progress = Arc::new(Progress::default());
        let start = Instant::now();
        let deadline = start + self.max_duration;
        let threads = self.threads.clamp(1, self.sessions.max(1));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let sessions = self.sessions / threads + usize::from(t < self.sessions % threads);
                let (budget, progress, plan, target, spin) = (
                    budget.clone(),
                    progress.clone(),
                    self.plan.clone(),
                    self.target,
                    self.spin,
                );
                std::thread::spawn(move || {
                    uring::run_thread(target, sessions, &plan, &budget, &progress, deadline, spin)
                })
            })
            .collect();
        let live = std::io::stderr().is_terminal();
        while live && !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(250));
            let secs = start.elapsed().as_secs_f64();
            let ok = progress.ok.load(Ordering::Relaxed);
            eprint!(
                "\r{secs:7.1}s {ok:>10} messages {:>10.0} msg/s {:>6} errors ",
                ok as f64 / secs,
                progress.errors.load(Ordering::Relaxed)
            );
        }
        if live {
            eprintln!();
        }
        let mut stats = Stats::new();
        for h in handles {
            let s = h
                .join()
                .map_err(|_| std::io::Error::other("a load thread panicked"))??;
            stats.merge(&s);
        }
        Ok(Report {
            stats,
            elapsed: start.elapsed(),
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
