//! Failed logins per source: a leaky bucket per address (IPv6: per /64, what one
//! subscriber usually holds), drained at `per_minute` a minute. A source whose bucket
//! is full is refused without a verification until it has drained below full.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(u32),
    /// The top 64 bits.
    V6(u64),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(a) => Source::V4(a.to_bits()),
            IpAddr::V6(a) => Source::V6((a.to_bits() >> 64) as u64),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Failures not yet drained, as of `at`.
    level: f64,
    at: Instant,
}

pub(crate) struct Limiter {
    /// 0: no limit.
    per_minute: u32,
    sources_max: usize,
    buckets: HashMap<Source, Bucket>,
    last_sweep: Option<Instant>,
}

/// How often drained sources are dropped even while the table is not full.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl Limiter {
    pub(crate) fn new(per_minute: u32, sources_max: usize) -> Limiter {
        Limiter {
            per_minute,
            sources_max: sources_max.max(1),
            buckets: HashMap::new(),
            last_sweep: None,
        }
    }

    fn drained(&self, b: &Bucket, now: Instant) -> f64 {
        let minutes = now.saturating_duration_since(b.at).as_secs_f64() / 60.0;
        (b.level - minutes * f64::from(self.per_minute)).max(0.0)
    }

    /// Whether `source` is over its limit now.
    pub(crate) fn limited(&self, source: Source, now: Instant) -> bool {
        self.per_minute != 0
            && self
                .buckets
                .get(&source)
                .is_some_and(|b| self.drained(b, now) >= f64::from(self.per_minute))
    }

    pub(crate) fn record_failure(&mut self, source: Source, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        let due = self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        if due || (self.buckets.len() >= self.sources_max && !self.buckets.contains_key(&source)) {
            self.sweep(now);
        }
        if self.buckets.len() >= self.sources_max && !self.buckets.contains_key(&source) {
            // Still full of sources that failed within the last minute: make room
            // with an arbitrary one (HashMap order is random per process), so that
            // memory stays bounded and a flood of sources cannot switch the limit off
            // for new ones.
            if let Some(k) = self.buckets.keys().next().copied() {
                self.buckets.remove(&k);
            }
        }
        let level = self
            .buckets
            .get(&source)
            .map_or(0.0, |b| self.drained(b, now));
        self.buckets.insert(
            source,
            Bucket {
                level: level + 1.0,
                at: now,
            },
        );
    }

    /// Drops every source whose bucket has drained.
    fn sweep(&mut self, now: Instant) {
        let per_minute = f64::from(self.per_minute);
        self.buckets.retain(|_, b| {
            let minutes = now.saturating_duration_since(b.at).as_secs_f64() / 60.0;
            b.level - minutes * per_minute > 0.0
        });
        self.last_sweep = Some(now);
    }

    pub(crate) fn sources(&self) -> usize {
        self.buckets.len()
    }
}
