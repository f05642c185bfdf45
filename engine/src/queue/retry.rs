//! When to try a deferred recipient again: exponential backoff with jitter, capped,
//! until the message is too old (then it fails and bounces).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait after the first failed attempt.
    pub first: Duration,
    /// No wait is longer than this.
    pub cap: Duration,
    /// A message older than this is not tried again.
    pub max_age: Duration,
    /// Each wait is shortened by up to this share (per mille), at random, so that
    /// messages deferred together do not all come back in the same instant.
    pub jitter_permille: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first: Duration::from_secs(60),
            cap: Duration::from_secs(3600),
            max_age: Duration::from_secs(5 * 24 * 3600),
            jitter_permille: 200,
        }
    }
}

/// What to do after a temporary failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again at this time (milliseconds since the Unix epoch).
    RetryAt(u64),
    /// The message has been queued too long: fail it (bounce with the last reply).
    Expire,
}

impl RetryPolicy {
    /// After `attempts` failed attempts (1 after the first), for a message received
    /// at `received_ms`, at `now_ms`; `random` is any 64-bit random value.
    pub fn next(&self, attempts: u32, received_ms: u64, now_ms: u64, random: u64) -> Next {
        let age = Duration::from_millis(now_ms.saturating_sub(received_ms));
        if age >= self.max_age {
            return Next::Expire;
        }
        let doublings = attempts.saturating_sub(1).min(30);
        let wait = self.first.saturating_mul(1u32 << doublings).min(self.cap);
        let jitter = wait.as_millis() as u64 * (random % (self.jitter_permille as u64 + 1)) / 1000;
        let wait_ms = (wait.as_millis() as u64 - jitter).max(1);
        // Never past the expiry: the last attempt happens at the deadline.
        let deadline = received_ms + self.max_age.as_millis() as u64;
        Next::RetryAt((now_ms + wait_ms).min(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn doubles_from_a_minute_to_an_hour() {
        let p = RetryPolicy {
            jitter_permille: 0,
            ..RetryPolicy::default()
        };
        let waits: Vec<u64> = (1..=9)
            .map(|a| match p.next(a, 0, 1000, 0) {
                Next::RetryAt(t) => (t - 1000) / MIN,
                Next::Expire => panic!(),
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(
            p.next(u32::MAX, 0, 1000, 0),
            Next::RetryAt(1000 + 60 * MIN),
            "no overflow"
        );
    }

    #[test]
    fn jitter_only_shortens_and_stays_within_its_share() {
        let p = RetryPolicy::default();
        for r in 0..1000u64 {
            let Next::RetryAt(t) = p.next(1, 0, 0, r.wrapping_mul(0x9E37_79B9_7F4A_7C15)) else {
                panic!()
            };
            assert!((48_000..=MIN).contains(&t), "{t}");
        }
    }

    #[test]
    fn expiry() {
        let p = RetryPolicy::default();
        let five_days = 5 * 24 * 3600 * 1000;
        assert_eq!(p.next(3, 0, five_days, 0), Next::Expire);
        // Close to the deadline the retry lands on it, not after it.
        assert_eq!(p.next(20, 0, five_days - 1000, 0), Next::RetryAt(five_days));
    }
}
