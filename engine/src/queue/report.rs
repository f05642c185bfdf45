//! What the admin API and `ringmail queue` report about the queue, from the queued
//! messages alone (the running server's shards, or the offline `queue::list`): a
//! `qshape`-like summary by destination and age, and the filters of a listing.

use super::model::{QueuedMessage, RcptStatus};
use std::collections::HashMap;

/// Upper bounds of the age buckets, in minutes (Postfix's qshape: each twice the one
/// before); the last bucket is everything older.
pub const AGE_BUCKETS_MIN: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];
const BUCKETS: usize = AGE_BUCKETS_MIN.len() + 1;

/// The destination of an address: its domain in routing's spelling (A-label,
/// canonical literal: `smtp::address::domain_key`, as delivery and the metrics'
/// destinations key it; `""` without one).
pub fn domain(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| crate::smtp::address::domain_key(d))
        .unwrap_or_default()
}

/// Which queued messages a request is about (every field optional: all of them).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// A recipient not final yet in this domain.
    pub domain: Option<String>,
    /// A recipient in this state (`queued`, `deferred`, `held`).
    pub state: Option<RcptStatus>,
    /// Queued at least this long.
    pub min_age_s: Option<u64>,
    /// Queued at most this long.
    pub max_age_s: Option<u64>,
    /// The envelope sender, exactly (case-insensitive); `<>` for bounces.
    pub sender: Option<String>,
}

impl Filter {
    /// The filter of query parameters `domain`, `state`, `min_age`, `max_age`
    /// (seconds) and `sender`; an error names the bad one.
    pub fn parse(param: impl Fn(&str) -> Option<String>) -> Result<Filter, String> {
        let secs = |name: &str| -> Result<Option<u64>, String> {
            param(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("`{name}` must be a number of seconds"))
                })
                .transpose()
        };
        let state = match param("state").as_deref() {
            None => None,
            Some("queued") => Some(RcptStatus::Queued),
            Some("deferred") => Some(RcptStatus::Deferred),
            Some("held") => Some(RcptStatus::Held),
            Some(other) => {
                return Err(format!(
                    "`state` is queued, deferred or held, not `{other}`"
                ))
            }
        };
        Ok(Filter {
            domain: param("domain").map(|d| crate::smtp::address::domain_key(&d)),
            state,
            min_age_s: secs("min_age")?,
            max_age_s: secs("max_age")?,
            sender: param("sender"),
        })
    }

    /// Whether recipient `r` of a message is one the filter's recipient terms pick.
    fn picks_rcpt(&self, status: RcptStatus, to: &str) -> bool {
        !status.is_final()
            && self.state.is_none_or(|s| s == status)
            && self.domain.as_ref().is_none_or(|d| domain(to) == *d)
    }

    pub fn matches(&self, m: &QueuedMessage, now_ms: u64) -> bool {
        let age = now_ms.saturating_sub(m.received_at_ms) / 1000;
        if self.min_age_s.is_some_and(|a| age < a) || self.max_age_s.is_some_and(|a| age > a) {
            return false;
        }
        // `<>` (bounces) is the empty sender.
        let sender = self.sender.as_deref().map(|s| s.trim_matches(['<', '>']));
        if sender.is_some_and(|s| !m.from.eq_ignore_ascii_case(s)) {
            return false;
        }
        m.rcpt.iter().any(|r| self.picks_rcpt(r.status, &r.to))
    }
}

/// Message counts by age bucket, for one destination or all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Row {
    pub total: u64,
    pub buckets: [u64; BUCKETS],
}

impl Row {
    fn add(&mut self, bucket: usize) {
        self.total += 1;
        self.buckets[bucket] += 1;
    }

    fn merge(&mut self, o: &Row) {
        self.total += o.total;
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
    }
}

/// The queue's shape: per destination domain, messages by age (a message with
/// recipients in two domains counts once in each, and once in the total).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub total: Row,
    pub destinations: HashMap<String, Row>,
}

fn bucket(age_ms: u64) -> usize {
    let min = age_ms / 60_000;
    AGE_BUCKETS_MIN
        .iter()
        .position(|b| min < *b)
        .unwrap_or(AGE_BUCKETS_MIN.len())
}

impl Shape {
    /// Counts message `m` if the filter picks it (its pending recipients' domains).
    pub fn add(&mut self, m: &QueuedMessage, filter: &Filter, now_ms: u64) {
        if !filter.matches(m, now_ms) {
            return;
        }
        let b = bucket(now_ms.saturating_sub(m.received_at_ms));
        self.total.add(b);
        let mut seen: Vec<String> = Vec::new();
        for r in m.rcpt.iter() {
            if !filter.picks_rcpt(r.status, &r.to) {
                continue;
            }
            let d = domain(&r.to);
            if !seen.contains(&d) {
                self.destinations.entry(d.clone()).or_default().add(b);
                seen.push(d);
            }
        }
    }

    pub fn merge(&mut self, o: Shape) {
        self.total.merge(&o.total);
        for (d, row) in o.destinations {
            self.destinations.entry(d).or_default().merge(&row);
        }
    }

    /// The JSON answer (docs/contracts.md, "Admin API"): the busiest destinations
    /// first, at most `top` of them.
    pub fn to_json(&self, top: usize) -> serde_json::Value {
        let labels: Vec<String> = AGE_BUCKETS_MIN
            .iter()
            .map(|m| format!("<{m}m"))
            .chain(std::iter::once(format!(
                ">={}m",
                AGE_BUCKETS_MIN[AGE_BUCKETS_MIN.len() - 1]
            )))
            .collect();
        let mut rows: Vec<(&String, &Row)> = self.destinations.iter().collect();
        rows.sort_by(|a, b| b.1.total.cmp(&a.1.total).then(a.0.cmp(b.0)));
        let shown = rows.len().min(top);
        serde_json::json!({
            "buckets": labels,
            "total": { "messages": self.total.total, "by_age": self.total.buckets },
            "destinations_total": rows.len(),
            "destinations": rows[..shown].iter().map(|(d, r)| serde_json::json!({
                "domain": d,
                "messages": r.total,
                "by_age": r.buckets,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueuedRcpt;

    fn message(id: u64, age_min: u64, rcpts: &[(&str, RcptStatus)]) -> QueuedMessage {
        QueuedMessage {
            id,
            from: "a@example.org".into(),
            rcpt: rcpts
                .iter()
                .map(|(to, status)| QueuedRcpt {
                    to: (*to).into(),
                    next_attempt_ms: 0,
                    orcpt: None,
                    last_reply: None,
                    attempts: 0,
                    status: *status,
                    notify: 0,
                })
                .collect(),
            received_at_ms: 1_000_000_000 - age_min * 60_000,
            size: 10,
            envid: None,
            body_crc32c: 0,
            body_type: Default::default(),
            smtputf8: false,
            ret: Default::default(),
        }
    }

    #[test]
    fn the_shape_counts_each_message_once_per_pending_domain_by_age() {
        use RcptStatus::*;
        let now = 1_000_000_000;
        let mut s = Shape::default();
        let f = Filter::default();
        s.add(
            &message(1, 1, &[("x@A.example", Queued), ("y@a.example", Deferred)]),
            &f,
            now,
        );
        s.add(
            &message(2, 7, &[("x@a.example", Delivered), ("y@b.example", Held)]),
            &f,
            now,
        );
        s.add(&message(3, 5000, &[("x@b.example", Deferred)]), &f, now);
        assert_eq!(s.total.total, 3);
        assert_eq!(s.total.buckets[0], 1);
        assert_eq!(s.total.buckets[1], 1);
        assert_eq!(s.total.buckets[BUCKETS - 1], 1);
        assert_eq!(s.destinations["a.example"].total, 1);
        assert_eq!(s.destinations["b.example"].total, 2);
        let held = Filter {
            state: Some(Held),
            ..Filter::default()
        };
        let mut h = Shape::default();
        for m in [
            message(2, 7, &[("y@b.example", Held)]),
            message(4, 7, &[("y@b.example", Queued)]),
        ] {
            h.add(&m, &held, now);
        }
        assert_eq!(h.total.total, 1);
        let old = Filter::parse(|k| (k == "min_age").then(|| "3600".to_string())).unwrap();
        assert!(!old.matches(&message(5, 59, &[("x@c.example", Queued)]), now));
        assert!(old.matches(&message(5, 61, &[("x@c.example", Queued)]), now));
        assert!(Filter::parse(|k| (k == "state").then(|| "gone".to_string())).is_err());
    }
}
