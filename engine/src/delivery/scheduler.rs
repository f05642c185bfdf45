//! The delivery scheduler of one executor: finds recipients that are due, groups them
//! by message and destination domain, runs attempts (bounded per destination), and
//! records every outcome in the log before acting on it: delivered, failed (with a
//! bounce to the sender) or deferred until the retry policy's next time.
//!
//! It also runs compaction every few seconds (`Spool::compact`) and applies the
//! per-destination rate limit.

use super::attempt::{attempt, AttemptConfig, Destination};
use super::dsn;
use crate::config::Config;
use crate::dns::resolver::Resolver;
use crate::net::Ring;
use crate::queue::retry::{Next, RetryPolicy};
use crate::queue::{Loaded, RcptStatus, Spool};
use crate::smtp::client::{RcptResult, Reply, Transaction, TxRcpt};
use ringmail_store::message::{format_id, notify, BodyType, Envelope, RcptUpdate, Recipient, Ret};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest sleep between looks at the queue (deferred mail also wakes it on time).
const SCAN_INTERVAL: Duration = Duration::from_millis(100);
/// How often finished segments are looked for and deleted.
const COMPACTION_INTERVAL: Duration = Duration::from_secs(2);
/// Messages taken off a spool's ready queue per pass.
const TAKE_PER_PASS: usize = 64;

pub struct Delivery {
    cfg: Rc<Config>,
    ring: Rc<Ring>,
    resolver: Resolver,
    spools: Vec<Rc<Spool>>,
    attempt: AttemptConfig,
    retry: RetryPolicy,
    /// (message id, recipient index) being attempted now.
    in_flight: RefCell<HashSet<(u64, u32)>>,
    /// An attempt finished: its destination has room again.
    finished: event_listener::Event,
    /// Idle connections for the next message to the same host.
    pool: super::attempt::Pool,
    last_compaction: Cell<std::time::Instant>,
    /// Token buckets of the per-destination rate limit: (tokens, last refill).
    buckets: RefCell<HashMap<String, (f64, std::time::Instant)>>,
    /// Attempts running per destination domain.
    per_destination: RefCell<HashMap<String, usize>>,
    /// Attempts running on this executor, all destinations together.
    running: Cell<usize>,
    stopping: Cell<bool>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

/// `NOTIFY=` as sent on (None: the client gave none).
fn notify_param(bits: u8) -> Option<String> {
    let words = notify::words(bits);
    (!words.is_empty()).then(|| words.join(","))
}

fn domain_of(address: &str) -> Option<String> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
}

impl Delivery {
    pub fn new(cfg: Rc<Config>, ring: Rc<Ring>, spools: Vec<Rc<Spool>>) -> Rc<Delivery> {
        let resolver = Resolver::new(cfg.dns.clone(), Duration::from_secs(3), 2);
        Rc::new(Delivery {
            attempt: AttemptConfig {
                helo: cfg.hostname.clone(),
                mx_port: cfg.mx_port,
                timeouts: cfg.delivery_timeouts,
            },
            retry: cfg.retry,
            cfg,
            ring,
            resolver,
            spools,
            in_flight: RefCell::new(HashSet::new()),
            finished: event_listener::Event::new(),
            pool: super::attempt::Pool::new(100, Duration::from_secs(5)),
            last_compaction: Cell::new(std::time::Instant::now()),
            buckets: RefCell::new(HashMap::new()),
            per_destination: RefCell::new(HashMap::new()),
            running: Cell::new(0),
            stopping: Cell::new(false),
        })
    }

    pub fn stop(&self) {
        self.stopping.set(true);
    }

    /// Waits (bounded) for running attempts to record their outcomes, so a shutdown
    /// does not close the logs under them.
    pub async fn drained(&self, grace: Duration) {
        let deadline = std::time::Instant::now() + grace;
        while !self.in_flight.borrow().is_empty() && std::time::Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Hands out due work until stopped: woken by new mail, a finished attempt, a
    /// flush, or the next deferred time.
    pub async fn run(self: Rc<Self>) {
        while !self.stopping.get() {
            let listeners: Vec<_> = self.spools.iter().map(|s| s.wake.listen()).collect();
            let finished = self.finished.listen();
            self.pool.expire();
            self.scan();
            if self.last_compaction.get().elapsed() >= COMPACTION_INTERVAL {
                self.last_compaction.set(std::time::Instant::now());
                for spool in &self.spools {
                    if let Err(e) = spool.compact().await {
                        tracing::warn!(shard = spool.shard, error = %e, "compaction failed");
                    }
                }
            }
            let now = now_ms();
            let next = self.spools.iter().filter_map(|s| s.next_wakeup_ms()).min();
            let wait = next.map_or(SCAN_INTERVAL, |t| {
                Duration::from_millis(t.saturating_sub(now)).min(SCAN_INTERVAL)
            });
            futures_lite::future::or(
                async {
                    glommio::timer::sleep(wait).await;
                },
                async {
                    futures_lite::future::or(finished, async {
                        // Any spool's wake will do.
                        let mut ls = listeners;
                        match ls.pop() {
                            Some(l) if ls.is_empty() => l.await,
                            Some(l) => {
                                futures_lite::future::or(l, async move {
                                    for l in ls {
                                        l.await;
                                    }
                                })
                                .await
                            }
                            None => std::future::pending::<()>().await,
                        }
                    })
                    .await
                },
            )
            .await;
        }
    }

    /// The per-destination rate limit: a token bucket holding up to a second's worth.
    fn take_token(&self, domain: &str) -> bool {
        let Some(rate) = self.cfg.destination_rate else {
            return true;
        };
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.borrow_mut();
        let (tokens, last) = buckets
            .entry(domain.to_string())
            .or_insert((rate.max(1.0), now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate.max(1.0));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_local(&self, domain: &str) -> bool {
        self.cfg
            .local_domains
            .iter()
            .any(|l| l.eq_ignore_ascii_case(domain))
    }

    fn destination(&self, domain: &str) -> Destination {
        let route = self
            .cfg
            .routes
            .iter()
            .find(|(d, _, _)| d.eq_ignore_ascii_case(domain))
            .or_else(|| self.cfg.routes.iter().find(|(d, _, _)| d == "*"));
        match route {
            Some((_, host, port)) => Destination::Route(host.clone(), *port),
            None => Destination::Mx(domain.to_string()),
        }
    }

    fn scan(self: &Rc<Self>) {
        let now = now_ms();
        for spool in &self.spools {
            // Bounded per pass: a backlog for one busy destination is cycled through
            // a few at a time, not all of it on every finished attempt.
            for (id, due) in spool.take_due(now, TAKE_PER_PASS) {
                let mut by_domain: HashMap<String, Vec<u32>> = HashMap::new();
                for (i, to) in due {
                    let Some(domain) = domain_of(&to) else {
                        continue;
                    };
                    // Local recipients wait for the mailbox store; they stay queued.
                    if self.is_local(&domain) || self.in_flight.borrow().contains(&(id, i)) {
                        continue;
                    }
                    by_domain.entry(domain).or_default().push(i);
                }
                let mut busy = false;
                for (domain, rcpts) in by_domain {
                    let running = self
                        .per_destination
                        .borrow()
                        .get(&domain)
                        .copied()
                        .unwrap_or(0);
                    if running >= self.cfg.connections_per_destination_max
                        || self.running.get() >= self.cfg.deliveries_per_shard_max
                        || !self.take_token(&domain)
                    {
                        busy = true;
                        continue;
                    }
                    self.running.set(self.running.get() + 1);
                    *self
                        .per_destination
                        .borrow_mut()
                        .entry(domain.clone())
                        .or_default() += 1;
                    for &i in &rcpts {
                        self.in_flight.borrow_mut().insert((id, i));
                    }
                    let (me, spool) = (self.clone(), spool.clone());
                    glommio::spawn_local(async move {
                        me.deliver(&spool, id, &domain, &rcpts).await;
                        me.running.set(me.running.get() - 1);
                        for i in &rcpts {
                            me.in_flight.borrow_mut().remove(&(id, *i));
                        }
                        let mut per = me.per_destination.borrow_mut();
                        if let Some(n) = per.get_mut(&domain) {
                            *n -= 1;
                            if *n == 0 {
                                per.remove(&domain);
                            }
                        }
                        drop(per);
                        me.finished.notify(usize::MAX);
                    })
                    .detach();
                }
                if busy {
                    // Its destination (or the shard) is at its limit: back of the
                    // line, tried again when an attempt finishes.
                    spool.requeue(id);
                }
            }
        }
    }

    async fn deliver(&self, spool: &Rc<Spool>, id: u64, domain: &str, rcpts: &[u32]) {
        let idt = format_id(id);
        let Some(queued) = spool.get(id) else { return };
        let Loaded { env, message } = match spool.read_message(id).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(id = %idt, error = %e, "cannot read the queued message; trying again in a minute");
                spool.retry_at(id, now_ms() + 60_000);
                return;
            }
        };
        let tx = Transaction {
            from: env.from.clone(),
            rcpts: rcpts
                .iter()
                .map(|&i| {
                    let r = &env.recipients[i as usize];
                    TxRcpt {
                        to: r.address.clone(),
                        notify: notify_param(r.notify),
                        orcpt: r.orcpt.clone(),
                    }
                })
                .collect(),
            size: message.len() as u64,
            eight_bit: env.body_type == BodyType::EightBitMime,
            smtputf8: env.smtputf8,
            ret: match env.ret {
                Ret::Full => Some("FULL"),
                Ret::Hdrs => Some("HDRS"),
                Ret::Unspecified => None,
            },
            envid: env.envid.clone(),
        };
        let outcome = attempt(
            &self.ring,
            &self.pool,
            &self.resolver,
            &self.attempt,
            &self.destination(domain),
            &tx,
            &message,
        )
        .await;
        let now = now_ms();
        let relay = outcome.relay.clone().unwrap_or_else(|| "none".into());
        let delay_s = now.saturating_sub(env.received_at_ms) as f64 / 1000.0;
        let mut failures = Vec::new();
        // One draw for the attempt: its deferred recipients come back together.
        let jitter = random_u64();
        for (k, result) in outcome.results.into_iter().enumerate() {
            let i = rcpts[k];
            let attempts = queued.rcpt.get(i as usize).map_or(0, |r| r.attempts) + 1;
            let to = &env.recipients[i as usize];
            let (status, next, reply, word) = match result {
                RcptResult::Delivered(r) => (RcptStatus::Delivered, 0, r, "sent"),
                RcptResult::Failed(r) => (RcptStatus::Failed, 0, r, "bounced"),
                RcptResult::Deferred(r) => {
                    match self.retry.next(attempts, env.received_at_ms, now, jitter) {
                        Next::RetryAt(t) => (RcptStatus::Deferred, t, r, "deferred"),
                        Next::Expire => {
                            let text = format!(
                                "message expired after {attempts} attempts; last: {}",
                                r.to_line()
                            );
                            (
                                RcptStatus::Failed,
                                0,
                                Reply {
                                    code: 550,
                                    text,
                                    enhanced: Some((5, 4, 7)),
                                },
                                "expired",
                            )
                        }
                    }
                }
            };
            tracing::info!(id = %idt, to = %format!("<{}>", to.address), relay = %relay, delay = delay_s, attempts, status = %format!("{word} ({})", reply.to_line()), "delivery");
            if status == RcptStatus::Failed {
                failures.push((to.clone(), reply.clone(), outcome.relay.clone()));
            }
            let update = RcptUpdate {
                id,
                rcpt: i,
                status,
                attempts,
                next_attempt_ms: next,
                reply: reply.to_line(),
            };
            if let Err(e) = spool.record(update).await {
                // The recipients not recorded stay as they were and are tried again
                // (one delivered but unrecorded may be sent twice: the window every
                // MTA has between a remote 250 and its own disk).
                tracing::error!(id = %idt, error = %e, "cannot record a delivery result; trying again in a minute");
                spool.retry_at(id, now_ms() + 60_000);
                break;
            }
        }
        if !failures.is_empty() {
            self.bounce(spool, &env, &message.to_vec(), failures).await;
        }
    }

    /// Queues a bounce for `failures` to the sender (never for the null sender).
    async fn bounce(
        &self,
        spool: &Rc<Spool>,
        env: &Envelope,
        message: &[u8],
        failures: Vec<(Recipient, Reply, Option<String>)>,
    ) {
        let reports: Vec<dsn::Report> = failures
            .into_iter()
            .map(|(r, reply, relay)| dsn::Report {
                rcpt: r.address,
                orcpt: r.orcpt,
                notify: r.notify,
                action: dsn::Action::Failed,
                status: reply.enhanced.unwrap_or((5, 0, 0)),
                diagnostic: reply.to_line(),
                remote_mta: relay.and_then(|r| r.split('[').next().map(str::to_string)),
            })
            .collect();
        let id = format_id(env.id);
        let arrival = chrono::DateTime::from_timestamp_millis(env.received_at_ms as i64)
            .map(|t| t.to_rfc2822())
            .unwrap_or_default();
        let original = dsn::Original {
            id: &id,
            from: &env.from,
            envid: env.envid.as_deref(),
            ret: env.ret,
            arrival_date: &arrival,
            message,
        };
        let Some(report) = dsn::build(
            &self.cfg.hostname,
            &original,
            &reports,
            &chrono::Utc::now().to_rfc2822(),
        ) else {
            return;
        };
        let bounce = Envelope {
            id: spool.next_id(),
            received_at_ms: now_ms(),
            from: String::new(),
            recipients: vec![Recipient {
                address: env.from.clone(),
                notify: 0,
                orcpt: None,
            }],
            // A returned 8-bit message makes the report 8-bit too.
            body_type: if env.ret == Ret::Full && env.body_type == BodyType::EightBitMime {
                BodyType::EightBitMime
            } else {
                BodyType::Unspecified
            },
            smtputf8: env.smtputf8,
            ret: Ret::Unspecified,
            envid: None,
            helo: self.cfg.hostname.clone(),
            peer: "local".into(),
        };
        let bid = format_id(bounce.id);
        match spool.enqueue(bounce, b"", report).await {
            Ok(()) => tracing::info!(id = %id, bounce = %bid, to = %env.from, "bounce queued"),
            Err(e) => tracing::error!(id = %id, error = %e, "cannot queue the bounce"),
        }
    }
}
