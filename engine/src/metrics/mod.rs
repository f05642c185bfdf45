//! What the server counts, per executor: plain values in a thread-local (each
//! executor is one thread), so counting costs the hot path no atomic and no cache-line
//! traffic between cores. A scrape (`admin`) runs one job on every executor that
//! copies its [`Counters`] and measures its [`Gauges`], adds them up and writes them
//! in the Prometheus text format (`expose.rs`, with the `prometheus` crate).
//!
//! The metric names are a contract (docs/contracts.md, "Metrics"): extend, never
//! rename.

pub mod expose;

use ringmail_store::stats::Histogram;
use std::cell::RefCell;

/// The listeners, the `service` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Smtp = 0,
    Smtps,
    Submission,
    Pop3,
    Pop3s,
}

pub const SERVICES: [&str; 5] = ["smtp", "smtps", "submission", "pop3", "pop3s"];

/// Why a message (`ringmail_messages_rejected_total`) or a recipient
/// (`ringmail_recipients_rejected_total`) was refused: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Over the size limit (552 5.3.4).
    TooBig = 0,
    /// A text line over 1000 octets.
    LineTooLong,
    /// Bare CR or LF in DATA (SMTP smuggling defence).
    BareNewline,
    /// Relay access denied (554 5.7.1).
    Relay,
    /// No such local user (550 5.1.1).
    UnknownUser,
    /// Mailbox full (452 4.2.2).
    OverQuota,
    /// MAIL FROM not owned by the authenticated user (553 5.7.1).
    SenderNotOwned,
    /// MAIL before AUTH on submission (530 5.7.0).
    AuthRequired,
    /// DMARC policy reject (550 5.7.1).
    Dmarc,
    /// A DNS temporary error during verification, refused by policy (451 4.7.5).
    DnsTempfail,
    /// The message could not be made durable (451 4.3.0, 452 4.3.1).
    Storage,
    /// Recipient limit or other transaction limit.
    Limit,
}

pub const REJECTS: [&str; 12] = [
    "too_big",
    "line_too_long",
    "bare_newline",
    "relay_denied",
    "unknown_user",
    "over_quota",
    "sender_not_owned",
    "auth_required",
    "dmarc",
    "dns_tempfail",
    "storage",
    "limit",
];

impl Reject {
    pub fn as_str(self) -> &'static str {
        REJECTS[self as usize]
    }
}

/// One executor's counters since it started (`_total` metrics, and the open
/// connections it holds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub connections_accepted: [u64; SERVICES.len()],
    pub connections_refused: [u64; SERVICES.len()],
    /// Open now: accepted minus closed (an executor's own may go below zero only if
    /// a session moved, which none does).
    pub connections_open: [i64; SERVICES.len()],
    pub messages_received: u64,
    pub messages_rejected: [u64; REJECTS.len()],
    pub recipients_rejected: [u64; REJECTS.len()],
    pub recipients_delivered: u64,
    pub recipients_deferred: u64,
    pub recipients_bounced: u64,
    pub recipients_expired: u64,
    /// Of which delivered into local mailboxes.
    pub recipients_delivered_local: u64,
    /// Message bytes accepted (body as stored).
    pub bytes_in: u64,
    /// Message bytes sent to remote hosts (each recipient transaction once).
    pub bytes_out: u64,
    pub dns_queries: u64,
    pub dns_failures: u64,
    pub pop3_logins: u64,
    pub pop3_login_failures: u64,
    pub pop3_messages_retrieved: u64,
    pub pop3_bytes_retrieved: u64,
    pub smtp_auth_logins: u64,
    pub smtp_auth_failures: u64,
    /// From arrival to the end of a recipient's first attempt.
    pub delivery_first_attempt: Histogram,
    /// From arrival to delivered (remote or local).
    pub delivery_end_to_end: Histogram,
}

thread_local! {
    static COUNTERS: RefCell<Counters> = RefCell::new(Counters::default());
}

/// Changes this thread's counters.
pub fn count(f: impl FnOnce(&mut Counters)) {
    COUNTERS.with(|c| f(&mut c.borrow_mut()));
}

/// A copy of this thread's counters.
pub fn snapshot() -> Counters {
    COUNTERS.with(|c| *c.borrow())
}

pub fn connection_opened(s: Service) {
    count(|c| {
        c.connections_accepted[s as usize] += 1;
        c.connections_open[s as usize] += 1;
    });
}

pub fn connection_closed(s: Service) {
    count(|c| c.connections_open[s as usize] -= 1);
}

pub fn connection_refused(s: Service) {
    count(|c| c.connections_refused[s as usize] += 1);
}

pub fn message_rejected(r: Reject) {
    count(|c| c.messages_rejected[r as usize] += 1);
}

pub fn recipient_rejected(r: Reject) {
    count(|c| c.recipients_rejected[r as usize] += 1);
}

impl Counters {
    /// The sum of two executors' counters.
    pub fn plus(&self, o: &Counters) -> Counters {
        fn add<const N: usize>(a: [u64; N], b: [u64; N]) -> [u64; N] {
            std::array::from_fn(|i| a[i] + b[i])
        }
        Counters {
            connections_accepted: add(self.connections_accepted, o.connections_accepted),
            connections_refused: add(self.connections_refused, o.connections_refused),
            connections_open: std::array::from_fn(|i| {
                self.connections_open[i] + o.connections_open[i]
            }),
            messages_received: self.messages_received + o.messages_received,
            messages_rejected: add(self.messages_rejected, o.messages_rejected),
            recipients_rejected: add(self.recipients_rejected, o.recipients_rejected),
            recipients_delivered: self.recipients_delivered + o.recipients_delivered,
            recipients_deferred: self.recipients_deferred + o.recipients_deferred,
            recipients_bounced: self.recipients_bounced + o.recipients_bounced,
            recipients_expired: self.recipients_expired + o.recipients_expired,
            recipients_delivered_local: self.recipients_delivered_local
                + o.recipients_delivered_local,
            bytes_in: self.bytes_in + o.bytes_in,
            bytes_out: self.bytes_out + o.bytes_out,
            dns_queries: self.dns_queries + o.dns_queries,
            dns_failures: self.dns_failures + o.dns_failures,
            pop3_logins: self.pop3_logins + o.pop3_logins,
            pop3_login_failures: self.pop3_login_failures + o.pop3_login_failures,
            pop3_messages_retrieved: self.pop3_messages_retrieved + o.pop3_messages_retrieved,
            pop3_bytes_retrieved: self.pop3_bytes_retrieved + o.pop3_bytes_retrieved,
            smtp_auth_logins: self.smtp_auth_logins + o.smtp_auth_logins,
            smtp_auth_failures: self.smtp_auth_failures + o.smtp_auth_failures,
            delivery_first_attempt: self.delivery_first_attempt.plus(&o.delivery_first_attempt),
            delivery_end_to_end: self.delivery_end_to_end.plus(&o.delivery_end_to_end),
        }
    }
}

/// Queue figures of one state (`state` label).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueFigures {
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
}

/// The message states of `ringmail_queue_messages` (a message counts once, under the
/// first of these that one of its recipients is in).
pub const QUEUE_STATES: [&str; 4] = ["active", "ready", "deferred", "held"];

/// What one executor measures at scrape time (levels, not counts).
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub queue: [QueueFigures; QUEUE_STATES.len()],
    /// Per destination domain: (attempts running, recipients due now).
    pub destinations: std::collections::HashMap<String, (u64, u64)>,
    pub segments: u64,
    pub live_bytes: u64,
    pub store: ringmail_store::stats::Counters,
    pub mailbox_subscriptions: u64,
}

impl Gauges {
    pub fn merge(&mut self, o: Gauges) {
        for (a, b) in self.queue.iter_mut().zip(o.queue) {
            a.messages += b.messages;
            a.recipients += b.recipients;
            a.bytes += b.bytes;
        }
        for (d, (active, ready)) in o.destinations {
            let e = self.destinations.entry(d).or_default();
            e.0 += active;
            e.1 += ready;
        }
        self.segments += o.segments;
        self.live_bytes += o.live_bytes;
        self.store = self.store.plus(&o.store);
        self.mailbox_subscriptions += o.mailbox_subscriptions;
    }
}
