//! The scrape's answer: every executor's counters added up, its gauges merged, as
//! Prometheus metric families, written by the `prometheus` crate's text encoder
//! (format 0.0.4, which `promtool check metrics` lints).

use super::{Counters, Gauges, QUEUE_STATES, REJECTS, SERVICES};
use crate::auth::AuthCounters;
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use ringmail_store::stats::{self, LATENCY_BOUNDS_US};

/// Destinations shown by the per-destination gauges: the busiest, so the label's
/// cardinality stays bounded however many domains are queued.
pub const TOP_DESTINATIONS: usize = 20;

/// The content type of the answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything a scrape reports.
pub struct Scrape {
    pub counters: Counters,
    pub gauges: Gauges,
    pub auth: AuthCounters,
    pub executors: usize,
}

struct Families(Vec<MetricFamily>);

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

impl Families {
    fn family(&mut self, name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) {
        // The encoder refuses a family without samples (a label set that is empty
        // now, the destinations of an empty queue).
        if metrics.is_empty() {
            return;
        }
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(kind);
        f.set_metric(metrics);
        self.0.push(f);
    }

    /// A counter or gauge family: one sample per label set.
    fn samples(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: Vec<(Vec<LabelPair>, f64)>,
    ) {
        let metrics = samples
            .into_iter()
            .map(|(l, v)| {
                let mut m = Metric::from_label(l);
                match kind {
                    MetricType::COUNTER => {
                        let mut c = Counter::default();
                        c.set_value(v);
                        m.set_counter(c);
                    }
                    _ => {
                        let mut g = Gauge::default();
                        g.set_value(v);
                        m.set_gauge(g);
                    }
                }
                m
            })
            .collect();
        self.family(name, help, kind, metrics);
    }

    fn counters(&mut self, name: &str, help: &str, samples: Vec<(Vec<LabelPair>, f64)>) {
        self.samples(name, help, MetricType::COUNTER, samples);
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.counters(name, help, vec![(vec![], v as f64)]);
    }

    fn gauges(&mut self, name: &str, help: &str, samples: Vec<(Vec<LabelPair>, f64)>) {
        self.samples(name, help, MetricType::GAUGE, samples);
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.gauges(name, help, vec![(vec![], v)]);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &stats::Histogram) {
        let mut cumulative = 0;
        let buckets = LATENCY_BOUNDS_US
            .iter()
            .zip(h.buckets)
            .map(|(bound, n)| {
                cumulative += n;
                let mut b = Bucket::default();
                b.set_upper_bound(*bound as f64 / 1e6);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut hist = Histogram::default();
        hist.set_bucket(buckets);
        hist.set_sample_count(h.count);
        hist.set_sample_sum(h.sum_us as f64 / 1e6);
        let mut m = Metric::default();
        m.set_histogram(hist);
        self.family(name, help, MetricType::HISTOGRAM, vec![m]);
    }
}

/// One sample per label value of a fixed set.
fn by<T: Copy + Into<f64>>(
    label: &str,
    names: &[&str],
    values: &[T],
) -> Vec<(Vec<LabelPair>, f64)> {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| (labels(&[(label, n)]), (*v).into()))
        .collect()
}

fn f(v: u64) -> f64 {
    v as f64
}

/// The text the scrape answers.
pub fn render(s: &Scrape) -> Result<String, String> {
    let c = &s.counters;
    let g = &s.gauges;
    let mut out = Families(Vec::new());
    let u = |a: &[u64]| a.iter().map(|v| *v as f64).collect::<Vec<f64>>();
    out.gauges(
        "ringmail_connections_open",
        "Connections open now, by listener.",
        by(
            "service",
            &SERVICES,
            &c.connections_open.map(|v| v.max(0) as f64),
        ),
    );
    out.counters(
        "ringmail_connections_accepted_total",
        "Connections accepted, by listener.",
        by("service", &SERVICES, &u(&c.connections_accepted)),
    );
    out.counters(
        "ringmail_connections_refused_total",
        "Connections refused because a connection limit was reached, by listener.",
        by("service", &SERVICES, &u(&c.connections_refused)),
    );
    out.counter(
        "ringmail_messages_received_total",
        "Messages accepted (answered 250) and queued.",
        c.messages_received,
    );
    out.counters(
        "ringmail_messages_rejected_total",
        "Messages refused at the end of DATA or BDAT, by reason.",
        by("reason", &REJECTS, &u(&c.messages_rejected)),
    );
    out.counters(
        "ringmail_recipients_rejected_total",
        "Recipients refused at RCPT, by reason.",
        by("reason", &REJECTS, &u(&c.recipients_rejected)),
    );
    out.counter(
        "ringmail_recipients_delivered_total",
        "Recipients delivered: to a remote host or into a local mailbox.",
        c.recipients_delivered,
    );
    out.counter(
        "ringmail_recipients_delivered_local_total",
        "Recipients delivered into local mailboxes (a part of the delivered).",
        c.recipients_delivered_local,
    );
    out.counter(
        "ringmail_recipients_deferred_total",
        "Recipient attempts that ended deferred (to be tried again).",
        c.recipients_deferred,
    );
    out.counter(
        "ringmail_recipients_bounced_total",
        "Recipients failed for good (expired ones included), reported to the sender.",
        c.recipients_bounced,
    );
    out.counter(
        "ringmail_recipients_expired_total",
        "Recipients failed because the queue lifetime ran out (a part of the bounced).",
        c.recipients_expired,
    );
    out.counter(
        "ringmail_received_bytes_total",
        "Message bytes accepted (bodies as stored).",
        c.bytes_in,
    );
    out.counter(
        "ringmail_sent_bytes_total",
        "Message bytes sent to remote hosts.",
        c.bytes_out,
    );
    out.counter(
        "ringmail_dns_queries_total",
        "DNS queries sent for delivery.",
        c.dns_queries,
    );
    out.counter(
        "ringmail_dns_failures_total",
        "DNS queries for delivery that failed (timeout, SERVFAIL, bad answer).",
        c.dns_failures,
    );
    out.histogram(
        "ringmail_delivery_first_attempt_seconds",
        "Time from arrival to the end of a recipient's first delivery attempt.",
        &c.delivery_first_attempt,
    );
    out.histogram(
        "ringmail_delivery_seconds",
        "Time from arrival to delivery, end to end (retries included).",
        &c.delivery_end_to_end,
    );
    out.gauges(
        "ringmail_queue_messages",
        "Queued messages by state: active (an attempt running), ready (due now), deferred (waiting for a retry), held.",
        by(
            "state",
            &QUEUE_STATES,
            &g.queue.map(|q| q.messages as f64),
        ),
    );
    out.gauges(
        "ringmail_queue_recipients",
        "Recipients not final yet, by the state of their message.",
        by(
            "state",
            &QUEUE_STATES,
            &g.queue.map(|q| q.recipients as f64),
        ),
    );
    out.gauges(
        "ringmail_queue_bytes",
        "Bytes of queued messages, by state.",
        by("state", &QUEUE_STATES, &g.queue.map(|q| q.bytes as f64)),
    );
    let mut dests: Vec<(&String, &(u64, u64))> = g.destinations.iter().collect();
    dests.sort_by(|a, b| (b.1 .1, b.1 .0, a.0).cmp(&(a.1 .1, a.1 .0, b.0)));
    dests.truncate(TOP_DESTINATIONS);
    out.gauges(
        "ringmail_destination_connections_active",
        "Delivery attempts running per destination domain (the busiest 20).",
        dests
            .iter()
            .map(|(d, (a, _))| (labels(&[("destination", d)]), f(*a)))
            .collect(),
    );
    out.gauges(
        "ringmail_destination_ready_recipients",
        "Recipients due now per destination domain (the busiest 20).",
        dests
            .iter()
            .map(|(d, (_, r))| (labels(&[("destination", d)]), f(*r)))
            .collect(),
    );
    out.gauge(
        "ringmail_destinations_queued",
        "Destination domains with recipients queued (all of them).",
        g.destinations.len() as f64,
    );
    out.counter(
        "ringmail_commit_batches_total",
        "Group-commit batches made durable (one write and one fdatasync each).",
        g.store.batches,
    );
    out.counter(
        "ringmail_commit_record_bytes_total",
        "Record bytes in those batches (over the batches: the mean batch size).",
        g.store.log_record_bytes,
    );
    out.histogram(
        "ringmail_fdatasync_seconds",
        "Latency of each batch's fdatasync.",
        &g.store.sync_latency,
    );
    out.counter(
        "ringmail_store_written_bytes_total",
        "Bytes the store submitted to the disk (records, snapshots, padding, zeros).",
        g.store.written_bytes(),
    );
    out.counter(
        "ringmail_compaction_copied_bytes_total",
        "Record bytes compaction copied forward.",
        g.store.copied_bytes,
    );
    out.counter(
        "ringmail_snapshot_bytes_total",
        "Bytes of snapshot files written.",
        g.store.snapshot_bytes,
    );
    out.gauge(
        "ringmail_log_segments_live",
        "Log segments holding live (referenced) records, all shards.",
        f(g.segments),
    );
    out.gauge(
        "ringmail_log_live_bytes",
        "Bytes of live (referenced) records in the log, all shards.",
        f(g.live_bytes),
    );
    out.counter(
        "ringmail_pop3_logins_total",
        "Successful POP3 logins.",
        c.pop3_logins,
    );
    out.counter(
        "ringmail_pop3_login_failures_total",
        "POP3 logins refused (wrong password, unknown user, rate limit).",
        c.pop3_login_failures,
    );
    out.counter(
        "ringmail_pop3_retrieved_messages_total",
        "Messages sent by POP3 RETR.",
        c.pop3_messages_retrieved,
    );
    out.counter(
        "ringmail_pop3_retrieved_bytes_total",
        "Octets sent by POP3 RETR (before dot-stuffing).",
        c.pop3_bytes_retrieved,
    );
    out.counter(
        "ringmail_smtp_auth_logins_total",
        "Successful SMTP AUTH logins.",
        c.smtp_auth_logins,
    );
    out.counter(
        "ringmail_smtp_auth_failures_total",
        "SMTP AUTH logins refused.",
        c.smtp_auth_failures,
    );
    out.gauge(
        "ringmail_mailbox_subscriptions",
        "Sessions watching a mailbox for changes.",
        f(g.mailbox_subscriptions),
    );
    out.counter(
        "ringmail_auth_verifications_total",
        "argon2 password verifications run.",
        s.auth.verifications,
    );
    out.counter(
        "ringmail_auth_cache_hits_total",
        "Password checks answered from the login cache.",
        s.auth.cache_hits,
    );
    out.counter(
        "ringmail_auth_rate_limited_total",
        "Password checks refused by the per-source failure limit.",
        s.auth.rate_limited,
    );
    out.gauge(
        "ringmail_executors",
        "Executors (one per core) answering this scrape.",
        s.executors as f64,
    );
    prometheus::TextEncoder::new()
        .encode_to_string(&out.0)
        .map_err(|e| e.to_string())
}
