//! `ringmail-load pop3`: POP3 sessions (`pop3.rs`) on the ring driver, the users they
//! log in as, the login budget, and the report.
//!
//! Users: each of the run's `sessions` slots owns the users whose index is the slot's
//! modulo `sessions`, and logs in as them in turn. No two slots share a user, so a
//! server that refuses a second concurrent login to a maildrop (`-ERR [IN-USE]`)
//! never sees one; hence at least as many users as sessions.

use super::pop3::{ErrorKind, Login, Pop3Plan, Pop3Stats, Session};
use super::uring::{self, ConnError, Progress, Protocol, Step};
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Users from a file of `address password` lines (blank lines and `#` comments
/// skipped; the password is the rest of the line).
pub fn users_from_file(text: &str) -> Result<Vec<Login>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, password) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("line {}: expected `address password`", n + 1))?;
        let password = password.trim();
        if password.is_empty() {
            return Err(format!("line {}: empty password", n + 1));
        }
        out.push(Login {
            user: user.to_string(),
            password: password.to_string(),
        });
    }
    Ok(out)
}

/// Users `0..count` from patterns, `{}` standing for the number.
pub fn users_from_pattern(user: &str, password: &str, count: usize) -> Vec<Login> {
    (0..count)
        .map(|i| Login {
            user: user.replace("{}", &i.to_string()),
            password: password.replace("{}", &i.to_string()),
        })
        .collect()
}

/// How many users slot `slot` owns.
pub fn owned(slot: usize, sessions: usize, users: usize) -> usize {
    (users - slot).div_ceil(sessions)
}

/// The user of slot `slot`'s `nth` login: slot, slot + sessions, … in turn.
pub fn user_of(slot: usize, nth: u64, sessions: usize, users: usize) -> usize {
    let owned = owned(slot, sessions, users) as u64;
    slot + sessions * (nth % owned) as usize
}

/// The run's logins, shared by every thread: `total` in all (0: no limit).
struct LoginBudget {
    taken: AtomicU64,
    total: u64,
}

impl LoginBudget {
    fn take(&self) -> bool {
        self.total == 0 || self.taken.fetch_add(1, Ordering::Relaxed) < self.total
    }
}

struct Pop3<'a> {
    plan: &'a Pop3Plan,
    users: &'a [Login],
    sessions: usize,
    once: bool,
    budget: &'a LoginBudget,
    progress: &'a Progress,
}

impl Protocol for Pop3<'_> {
    /// The session and the index of its user.
    type Session = (Session, usize);
    type Stats = Pop3Stats;

    fn stats(&self) -> Pop3Stats {
        Pop3Stats::new()
    }

    fn merge(into: &mut Pop3Stats, from: Pop3Stats) {
        into.merge(&from);
    }

    fn start(&self, slot: usize, nth: u64, now: Instant) -> Option<(Session, usize)> {
        if self.once && nth >= owned(slot, self.sessions, self.users.len()) as u64 {
            return None;
        }
        if !self.budget.take() {
            return None;
        }
        let user = user_of(slot, nth, self.sessions, self.users.len());
        let seed = (slot as u64) << 40 ^ nth;
        Some((Session::new(now, seed), user))
    }

    fn feed(
        &self,
        (session, user): &mut (Session, usize),
        data: &[u8],
        now: Instant,
        send: &mut Vec<u8>,
        stats: &mut Pop3Stats,
    ) -> Step {
        let before = (stats.logins, stats.messages, stats.error_count());
        let step = session.feed(self.plan, &self.users[*user], data, now, send, stats);
        let p = self.progress;
        p.ok.fetch_add(stats.logins - before.0, Ordering::Relaxed);
        p.items
            .fetch_add(stats.messages - before.1, Ordering::Relaxed);
        p.errors
            .fetch_add(stats.error_count() - before.2, Ordering::Relaxed);
        Step {
            close: step.close,
            finished: step.failed,
        }
    }

    fn is_done((session, _): &(Session, usize)) -> bool {
        session.is_done()
    }

    fn connection_error(&self, stats: &mut Pop3Stats, e: ConnError) {
        stats.error(match e {
            ConnError::Connect => ErrorKind::Connect,
            ConnError::Closed => ErrorKind::Closed,
        });
        self.progress.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn sent(&self, stats: &mut Pop3Stats, bytes: usize) {
        stats.bytes_sent += bytes as u64;
    }

    fn received(&self, stats: &mut Pop3Stats, bytes: usize) {
        stats.bytes_received += bytes as u64;
    }

    fn recv_bytes(&self) -> usize {
        // Messages of 100 KiB and more: fewer completions per message.
        64 << 10
    }
}

/// A whole POP3 run.
pub struct Pop3Run {
    pub target: SocketAddr,
    pub sessions: usize,
    pub threads: usize,
    pub spin: Duration,
    /// Logins in all (0: until `max_duration`).
    pub logins: u64,
    /// Each user logs in once (at most `logins`): the first logins after a start are
    /// the cold-cache figure.
    pub once: bool,
    pub max_duration: Duration,
    pub plan: Pop3Plan,
    pub users: Vec<Login>,
}

/// The result of a run, as printed.
pub struct Pop3Report {
    pub stats: Pop3Stats,
    pub elapsed: Duration,
    pub logins_requested: u64,
}

impl Pop3Run {
    pub fn run(&self) -> Result<Pop3Report, String> {
        if self.sessions == 0 || self.users.len() < self.sessions {
            return Err(format!(
                "{} sessions need at least as many users (have {}): a maildrop takes one login at a time",
                self.sessions,
                self.users.len()
            ));
        }
        let budget = LoginBudget {
            taken: AtomicU64::new(0),
            total: self.logins,
        };
        let progress = Progress::default();
        let proto = Pop3 {
            plan: &self.plan,
            users: &self.users,
            sessions: self.sessions,
            once: self.once,
            budget: &budget,
            progress: &progress,
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
                let (ok, items) = (p.ok.load(Ordering::Relaxed), p.items.load(Ordering::Relaxed));
                format!(
                    "{secs:7.1}s {ok:>9} logins {:>8.0}/s {items:>10} messages {:>8.0}/s {:>6} errors ",
                    ok as f64 / secs,
                    items as f64 / secs,
                    p.errors.load(Ordering::Relaxed)
                )
            },
        )
        .map_err(|e| e.to_string())?;
        Ok(Pop3Report {
            stats,
            elapsed,
            logins_requested: self.logins,
        })
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

impl Pop3Report {
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn logins_per_sec(&self) -> f64 {
        self.stats.logins as f64 / self.secs()
    }

    pub fn messages_per_sec(&self) -> f64 {
        self.stats.messages as f64 / self.secs()
    }

    pub fn mib_per_sec(&self) -> f64 {
        self.stats.message_bytes as f64 / self.secs() / (1 << 20) as f64
    }

    fn percentiles(h: &Histogram<u64>) -> String {
        if h.is_empty() {
            return "none".into();
        }
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0
        )
    }

    pub fn text(&self) -> String {
        let s = &self.stats;
        let errors: Vec<String> = s
            .errors
            .iter()
            .map(|(k, n)| format!("{}: {n}", k.name()))
            .collect();
        let requested = if self.logins_requested == 0 {
            "no limit".to_string()
        } else {
            self.logins_requested.to_string()
        };
        format!(
            "logins {} of {requested} ({} errors{}) in {:.2} s: {:.0} logins/s\nmessages {} ({} verified, {} without checksum, {} listed, {} deleted): {:.0} msg/s, {:.1} MiB/s\nlogin latency (connect to +OK): {}\nRETR latency: {}",
            s.logins,
            s.error_count(),
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join(", "))
            },
            self.secs(),
            self.logins_per_sec(),
            s.messages,
            s.verified,
            s.unverified,
            s.listed,
            s.deleted,
            self.messages_per_sec(),
            self.mib_per_sec(),
            Self::percentiles(&s.login_us),
            Self::percentiles(&s.retr_us),
        )
    }

    /// One JSON object, the contract scripts rely on: `logins`, `errors`,
    /// `errors_by_kind`, `seconds`, `logins_per_sec`, `messages`, `messages_per_sec`,
    /// `mib_per_sec`, `verified`, `login_p50_ms`, `retr_p50_ms`, and more.
    pub fn json(&self) -> String {
        let s = &self.stats;
        let kinds: serde_json::Map<String, serde_json::Value> = s
            .errors
            .iter()
            .map(|(k, n)| (k.name().to_string(), (*n).into()))
            .collect();
        let mut v = serde_json::json!({
            "mode": "pop3",
            "logins": s.logins,
            "requested_logins": self.logins_requested,
            "sessions": s.sessions,
            "messages": s.messages,
            "message_bytes": s.message_bytes,
            "verified": s.verified,
            "unverified": s.unverified,
            "listed": s.listed,
            "deleted": s.deleted,
            "errors": s.error_count(),
            "errors_by_kind": kinds,
            "seconds": self.secs(),
            "logins_per_sec": self.logins_per_sec(),
            "messages_per_sec": self.messages_per_sec(),
            "mib_per_sec": self.mib_per_sec(),
            "bytes_received": s.bytes_received,
            "bytes_sent": s.bytes_sent,
        });
        for (name, h) in [("login", &s.login_us), ("retr", &s.retr_us)] {
            for (q, key) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p999")] {
                v[format!("{name}_{key}_ms")] = ms(h, q).into();
            }
            v[format!("{name}_max_ms")] = (h.max() as f64 / 1000.0).into();
        }
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_files_and_patterns() {
        let u = users_from_file("# comment\n\na@x pw one\nb@x\tsecret\n").unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(
            (u[0].user.as_str(), u[0].password.as_str()),
            ("a@x", "pw one")
        );
        assert_eq!(u[1].password, "secret");
        assert!(users_from_file("lonely@x\n").is_err());
        let p = users_from_pattern("user{}@localhost", "password{}", 3);
        assert_eq!(p[2].user, "user2@localhost");
        assert_eq!(p[2].password, "password2");
    }

    #[test]
    fn slots_never_share_a_user() {
        for (sessions, users) in [(1, 1), (4, 4), (4, 10), (16, 64), (3, 7)] {
            let mut owner = vec![None; users];
            for slot in 0..sessions {
                for nth in 0..50 {
                    let u = user_of(slot, nth, sessions, users);
                    assert!(u < users);
                    assert!(owner[u].is_none_or(|o| o == slot), "user {u} shared");
                    owner[u] = Some(slot);
                }
            }
            assert!(owner.iter().all(Option::is_some), "every user is used");
            let once: usize = (0..sessions).map(|s| owned(s, sessions, users)).sum();
            assert_eq!(once, users, "--once logs every user in exactly once");
        }
    }
}
