//! Users' mailboxes on their home shards (docs/mailboxes.md): the engine side of
//! the store's mailbox index. `home` makes changes durable and applies them on the
//! home shard's executor; `service` carries work and change notifications between
//! executors; `list` is `ringmail mailbox list`.

pub mod home;
pub mod list;
pub mod service;

pub use home::{ChangeError, DeliverError, Delivery, Home};
pub use service::{MailService, Mesh, Subscription};

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds from a message's arrival to its entry being durable in a mailbox,
/// per executor: one counter per millisecond up to 10 s (what the 50 ms p99
/// is measured with; logged when the executor stops).
pub struct Latency {
    buckets: Vec<u64>,
    count: u64,
}

const LATENCY_MS_MAX: usize = 10_000;

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: vec![0; LATENCY_MS_MAX + 1],
            count: 0,
        }
    }
}

impl Latency {
    pub fn record(&mut self, ms: u64) {
        self.buckets[(ms as usize).min(LATENCY_MS_MAX)] += 1;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Latency) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The smallest latency at or under which `q` (0..=1) of the deliveries were
    /// (10 000: "10 s or more").
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (ms, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return ms as u64;
            }
        }
        LATENCY_MS_MAX as u64
    }
}

#[cfg(test)]
mod tests {
    use super::Latency;

    #[test]
    fn quantiles_count_from_the_fastest() {
        let mut l = Latency::default();
        for ms in 1..=100 {
            l.record(ms);
        }
        l.record(50_000);
        assert_eq!(l.count(), 101);
        assert_eq!(l.quantile(0.5), 51);
        assert_eq!(l.quantile(0.99), 100);
        assert_eq!(l.quantile(1.0), 10_000);
    }
}
