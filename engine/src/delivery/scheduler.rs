//! The delivery scheduler of one executor: finds recipients that are due, groups them
//! by message and destination domain, runs attempts (bounded per destination), and
//! records every outcome in the log before acting on it: delivered, failed (with a
//! bounce to the sender) or deferred until the retry policy's next time.
//!
//! It also starts one task per spool that snapshots and compacts it every few
//! seconds (`Spool::compact`), beside the scheduling, and applies the
//! per-destination rate limit.

use super::attempt::{attempt, AttemptConfig, Destination, Outcome};
use super::dsn;
use super::local::Local;
use crate::config::Config;
use crate::dns::resolver::Resolver;
use crate::net::Ring;
use crate::queue::retry::Next;
use crate::queue::{Bounce, Loaded, RcptStatus, Spool};
use crate::smtp::address::{domain_key, is_local_domain, parse_domain, Domain};
use crate::smtp::client::{RcptResult, Reply, Transaction, TxRcpt};
use ringmail_store::message::{format_id, notify, BodyType, Envelope, RcptUpdate, Recipient, Ret};
use ringmail_store::LogError;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest sleep between looks at the queue (deferred mail also wakes it on time).
const SCAN_INTERVAL: Duration = Duration::from_millis(100);
/// How often each spool's upkeep task snapshots (when due) and compacts, and idle
/// rate-limit entries are dropped.
const COMPACTION_INTERVAL: Duration = Duration::from_secs(2);
/// Messages taken off a spool's ready queue per pass.
const TAKE_PER_PASS: usize = 64;
/// How often mail for a local domain without accounts is looked at again.
const UNSERVED_RETRY_MS: u64 = 60_000;
/// The destination key of local recipients (no domain name is empty).
const LOCAL_KEY: &str = "";

/// What an attempt made of a recipient, as the delivery log line names it
/// (`status=sent`, …) and the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Sent,
    Deferred,
    Bounced,
    /// Deferred past the queue lifetime: failed, and counted as bounced too.
    Expired,
}

impl Fate {
    fn as_str(self) -> &'static str {
        match self {
            Fate::Sent => "sent",
            Fate::Deferred => "deferred",
            Fate::Bounced => "bounced",
            Fate::Expired => "expired",
        }
    }
}

pub struct Delivery {
    /// Replaced by a reload (`reload`), with what is built from it.
    cfg: RefCell<Rc<Config>>,
    ring: Rc<Ring>,
    resolver: Resolver,
    pub(super) spools: Vec<Rc<Spool>>,
    attempt: RefCell<Rc<AttemptConfig>>,
    /// (message id, recipient index) being attempted now.
    pub(super) in_flight: RefCell<HashSet<(u64, u32)>>,
    /// Messages handed to home shards whose outcomes are not on record yet (a
    /// retry then asks the homes not to add the entries twice).
    unrecorded: RefCell<HashSet<u64>>,
    /// An attempt finished: its destination has room again.
    finished: event_listener::Event,
    /// Idle connections for the next message to the same host.
    pool: super::attempt::Pool,
    last_compaction: Cell<std::time::Instant>,
    /// The per-destination rate limit.
    rate: RefCell<RateLimit>,
    /// Attempts running per destination domain.
    pub(super) per_destination: RefCell<HashMap<String, usize>>,
    /// Attempts running on this executor, all destinations together.
    running: Cell<usize>,
    stopping: Cell<bool>,
    /// Wakes the upkeep tasks at `stop`.
    stopped: event_listener::Event,
    /// `Config::own_addresses`, looked up once.
    own_addresses: Vec<std::net::IpAddr>,
    /// Delivery into local users' mailboxes; without it (tests of the relay alone)
    /// local recipients stay queued.
    local: Option<Local>,
}

/// Where mail for `domain` (a `domain_of` key) goes, or why it can go nowhere (a
/// permanent failure: waiting would only bounce it days later). A smarthost (`*`)
/// takes literals too, as Postfix's relayhost does: where it is set, direct port 25
/// is not an option.
fn destination(
    routes: &[(String, String, u16)],
    own: &[std::net::IpAddr],
    domain: &str,
) -> Result<Destination, Reply> {
    let route = routes
        .iter()
        .find(|(d, _, _)| d != "*" && domain_key(d) == domain)
        .or_else(|| routes.iter().find(|(d, _, _)| d == "*"));
    let fail = |code, e, text: String| Reply {
        code,
        text,
        enhanced: Some(e),
    };
    match (route, parse_domain(domain)) {
        (Some((_, host, port)), _) => Ok(Destination::Route(host.clone(), *port)),
        // Local literals never get here: one of ours that is not local would be
        // delivered back to this host, and again.
        (None, Ok(Domain::Literal(ip))) if own.contains(&ip) => Err(fail(
            554,
            (5, 4, 6),
            format!("mail for {domain} loops back to myself"),
        )),
        (None, Ok(Domain::Literal(ip))) => Ok(Destination::Literal(ip)),
        (None, Ok(Domain::Name(_))) => Ok(Destination::Mx(domain.to_string())),
        (None, Err(e)) => Err(fail(550, (5, 1, 2), format!("{domain}: {e}"))),
    }
}

fn attempt_config(cfg: &Config, tls: super::tls::OutboundTls) -> AttemptConfig {
    AttemptConfig {
        helo: cfg.hostname.clone(),
        mx_port: cfg.mx_port,
        timeouts: cfg.delivery_timeouts,
        tls,
    }
}

pub(crate) fn now_ms() -> u64 {
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

/// The destination of `address` in its routing spelling (A-label, canonical
/// literal), so that every spelling of one domain shares its routes, rate bucket
/// and connection count.
fn domain_of(address: &str) -> Option<String> {
    address.rsplit_once('@').map(|(_, d)| domain_key(d))
}

/// The per-destination rate limit: a token bucket per domain holding up to a second's
/// worth of tokens.
struct RateLimit {
    /// Attempts per second per destination; None: no limit.
    rate: Option<f64>,
    /// (tokens, last refill) per destination domain.
    buckets: HashMap<String, (f64, std::time::Instant)>,
}

impl RateLimit {
    fn new(rate: Option<f64>) -> RateLimit {
        RateLimit {
            rate,
            buckets: HashMap::new(),
        }
    }

    fn capacity(rate: f64) -> f64 {
        rate.max(1.0)
    }

    fn take(&mut self, domain: &str, now: std::time::Instant) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        let cap = Self::capacity(rate);
        let (tokens, last) = self.buckets.entry(domain.to_string()).or_insert((cap, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate).min(cap);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops the buckets that have refilled to capacity: a full bucket is what a
    /// destination seen for the first time gets, so forgetting it changes nothing,
    /// and the map holds only the destinations mail went to in the last second or so
    /// instead of every domain ever relayed to.
    fn evict_idle(&mut self, now: std::time::Instant) {
        let Some(rate) = self.rate else {
            return;
        };
        let cap = Self::capacity(rate);
        self.buckets.retain(|_, (tokens, last)| {
            *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < cap
        });
    }
}

impl Delivery {
    pub fn new(
        cfg: Rc<Config>,
        ring: Rc<Ring>,
        spools: Vec<Rc<Spool>>,
        local: Option<Local>,
        tls: super::tls::OutboundTls,
    ) -> Rc<Delivery> {
        let resolver = Resolver::new(cfg.dns.clone(), Duration::from_secs(3), 2);
        let rate = RefCell::new(RateLimit::new(cfg.destination_rate));
        let own_addresses = cfg.own_addresses();
        Rc::new(Delivery {
            attempt: RefCell::new(Rc::new(attempt_config(&cfg, tls))),
            cfg: RefCell::new(cfg),
            ring,
            resolver,
            spools,
            in_flight: RefCell::new(HashSet::new()),
            unrecorded: RefCell::new(HashSet::new()),
            finished: event_listener::Event::new(),
            pool: super::attempt::Pool::new(100, Duration::from_secs(5)),
            last_compaction: Cell::new(std::time::Instant::now()),
            rate,
            per_destination: RefCell::new(HashMap::new()),
            running: Cell::new(0),
            stopping: Cell::new(false),
            stopped: event_listener::Event::new(),
            own_addresses,
            local,
        })
    }

    fn cfg(&self) -> Rc<Config> {
        self.cfg.borrow().clone()
    }

    /// New settings (SIGHUP, `reload`): routes, limits, retry schedule, timeouts and
    /// TLS policy apply to the attempts that start from now on.
    pub fn reload(&self, cfg: Rc<Config>, tls: super::tls::OutboundTls) {
        if cfg.destination_rate != self.cfg().destination_rate {
            *self.rate.borrow_mut() = RateLimit::new(cfg.destination_rate);
        }
        *self.attempt.borrow_mut() = Rc::new(attempt_config(&cfg, tls));
        *self.cfg.borrow_mut() = cfg;
    }

    /// The spools of this executor's shards.
    pub fn spools(&self) -> &[Rc<Spool>] {
        &self.spools
    }

    pub fn stop(&self) {
        self.stopping.set(true);
        self.stopped.notify(usize::MAX);
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
        let upkeep: Vec<_> = self
            .spools
            .iter()
            .map(|s| glommio::spawn_local(self.clone().upkeep(s.clone())))
            .collect();
        while !self.stopping.get() {
            let listeners: Vec<_> = self.spools.iter().map(|s| s.wake.listen()).collect();
            let finished = self.finished.listen();
            self.pool.expire();
            self.scan();
            if self.last_compaction.get().elapsed() >= COMPACTION_INTERVAL {
                self.last_compaction.set(std::time::Instant::now());
                self.rate.borrow_mut().evict_idle(std::time::Instant::now());
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
        // Not stopped mid-way: a shutdown closes the logs after this returns.
        for t in upkeep {
            t.await;
        }
    }

    /// Snapshots and compaction of one spool, on their own timer and task: a round
    /// may read and copy up to 64 MiB, during which scheduling goes on.
    async fn upkeep(self: Rc<Self>, spool: Rc<Spool>) {
        loop {
            let stopped = self.stopped.listen();
            if self.stopping.get() {
                return;
            }
            futures_lite::future::or(
                async {
                    glommio::timer::sleep(COMPACTION_INTERVAL).await;
                },
                stopped,
            )
            .await;
            if self.stopping.get() {
                return;
            }
            if let Err(e) = spool.compact().await {
                tracing::warn!(shard = spool.shard, error = %e, "compaction failed");
            }
        }
    }

    fn take_token(&self, domain: &str) -> bool {
        self.rate
            .borrow_mut()
            .take(domain, std::time::Instant::now())
    }

    fn is_local(&self, domain: &str) -> bool {
        is_local_domain(&self.cfg().local_domains, domain)
    }

    fn destination(&self, domain: &str) -> Result<Destination, Reply> {
        destination(&self.cfg().routes, &self.own_addresses, domain)
    }

    /// Lets the memory copy of a message go once all that is left of it is local
    /// recipients that wait (no mailbox store, or no account in their domain): they
    /// wait in the queue, and the cache is for
    /// the mail flowing now (kept, they would fill it for good).
    fn release_if_only_local_left(&self, spool: &Spool, id: u64) {
        // After most attempts the message is done and gone from the cache already.
        if !spool.is_cached(id) {
            return;
        }
        let remote_left = spool.any_pending_rcpt(id, |i, to| {
            self.in_flight.borrow().contains(&(id, i))
                || domain_of(to).is_none_or(|d| {
                    !self.is_local(&d) || self.local.as_ref().is_some_and(|l| l.serves(&d))
                })
        });
        if !remote_left {
            spool.uncache(id);
        }
    }

    fn scan(self: &Rc<Self>) {
        let now = now_ms();
        for spool in &self.spools {
            // Bounded per pass: a backlog for one busy destination is cycled through
            // a few at a time, not all of it on every finished attempt.
            for (id, due) in spool.take_due(now, TAKE_PER_PASS) {
                let mut by_domain: HashMap<String, Vec<u32>> = HashMap::new();
                let mut waits = false;
                for (i, to) in due {
                    let Some(domain) = domain_of(&to) else {
                        continue;
                    };
                    if self.in_flight.borrow().contains(&(id, i)) {
                        continue;
                    }
                    // Without the mailbox store, or an account in their domain, local
                    // recipients stay queued.
                    let local = self.is_local(&domain);
                    if local && !self.local.as_ref().is_some_and(|l| l.serves(&domain)) {
                        // Looked at again in a while: an account may come.
                        waits = self.local.is_some();
                        continue;
                    }
                    // All of a message's local recipients are one delivery, whatever
                    // their domains: it parses the message once.
                    let key = if local { LOCAL_KEY.to_string() } else { domain };
                    by_domain.entry(key).or_default().push(i);
                }
                if by_domain.is_empty() {
                    self.release_if_only_local_left(spool, id);
                }
                if waits {
                    spool.retry_at(id, now + UNSERVED_RETRY_MS);
                }
                let mut busy = false;
                for (domain, rcpts) in by_domain {
                    let running = self
                        .per_destination
                        .borrow()
                        .get(&domain)
                        .copied()
                        .unwrap_or(0);
                    // Local deliveries are bounded by the shard's limit only: no
                    // connection to a remote host is at stake.
                    let local = domain == LOCAL_KEY;
                    if (!local && running >= self.cfg().connections_per_destination_max)
                        || self.running.get() >= self.cfg().deliveries_per_shard_max
                        || (!local && !self.take_token(&domain))
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
                        me.release_if_only_local_left(&spool, id);
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
        let outcome = match self.destination(domain) {
            _ if domain == LOCAL_KEY => match &self.local {
                Some(local) => {
                    // Handed to the home shards before without the outcome on record
                    // (its batch failed): they may hold the entries already.
                    let retried = self.unrecorded.borrow().contains(&id)
                        || rcpts
                            .iter()
                            .any(|&i| queued.rcpt.get(i as usize).is_some_and(|r| r.attempts > 0));
                    self.unrecorded.borrow_mut().insert(id);
                    local.deliver(spool, &env, &message, rcpts, retried).await
                }
                None => return,
            },
            Ok(dest) => {
                // Its own copy: a reload may replace the settings meanwhile.
                let settings = self.attempt.borrow().clone();
                attempt(
                    &self.ring,
                    &self.pool,
                    &self.resolver,
                    &settings,
                    &dest,
                    &tx,
                    &message,
                )
                .await
            }
            Err(r) => Outcome {
                results: tx
                    .rcpts
                    .iter()
                    .map(|_| RcptResult::Failed(r.clone()))
                    .collect(),
                relay: None,
                tls: None,
                peer_dsn: false,
            },
        };
        let now = now_ms();
        let relay = outcome.relay.clone().unwrap_or_else(|| "none".into());
        let delay_s = now.saturating_sub(env.received_at_ms) as f64 / 1000.0;
        let mut reported = Vec::new();
        let mut updates = Vec::with_capacity(rcpts.len());
        // Counted once the outcomes are on record: (fate, first attempt).
        let mut counted: Vec<(Fate, bool)> = Vec::with_capacity(rcpts.len());
        // One draw for the attempt: its deferred recipients come back together.
        let jitter = random_u64();
        for (k, result) in outcome.results.into_iter().enumerate() {
            let i = rcpts[k];
            let attempts = queued.rcpt.get(i as usize).map_or(0, |r| r.attempts) + 1;
            let to = &env.recipients[i as usize];
            let (status, next, reply, fate) = match result {
                RcptResult::Delivered(r) => (RcptStatus::Delivered, 0, r, Fate::Sent),
                RcptResult::Failed(r) => (RcptStatus::Failed, 0, r, Fate::Bounced),
                RcptResult::Deferred(r) => {
                    match self
                        .cfg()
                        .retry
                        .next(attempts, env.received_at_ms, now, jitter)
                    {
                        Next::RetryAt(t) => (RcptStatus::Deferred, t, r, Fate::Deferred),
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
                                Fate::Expired,
                            )
                        }
                    }
                }
            };
            tracing::info!(id = %idt, to = %format!("<{}>", to.address), relay = %relay, tls = %outcome.tls.as_deref().unwrap_or("none"), delay = delay_s, attempts, status = %format!("{} ({})", fate.as_str(), reply.to_line()), "delivery");
            // What the sender is told: failures, and on request (NOTIFY=SUCCESS)
            // a delivery into a mailbox here, or a relay to a next hop that takes
            // no DSN requests (RFC 3461 §5.2.2, §5.2.3: none will come from there).
            let action = match status {
                RcptStatus::Failed => Some(dsn::Action::Failed),
                RcptStatus::Delivered
                    if to.notify & ringmail_store::message::notify::SUCCESS != 0 =>
                {
                    match (domain == LOCAL_KEY, outcome.peer_dsn) {
                        (true, _) => Some(dsn::Action::Delivered),
                        (false, false) => Some(dsn::Action::Relayed),
                        (false, true) => None,
                    }
                }
                _ => None,
            };
            if let Some(action) = action {
                reported.push((to.clone(), reply.clone(), outcome.relay.clone(), action));
            }
            counted.push((fate, attempts == 1));
            updates.push(RcptUpdate {
                id,
                rcpt: i,
                status,
                attempts,
                next_attempt_ms: next,
                reply: reply.to_line(),
            });
        }
        let bounce = if reported.is_empty() {
            None
        } else {
            match self.bounce(spool, &env, &message.to_vec(), reported).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(id = %idt, error = %e, "cannot take an id for the bounce; trying again in a minute");
                    spool.retry_at(id, now_ms() + 60_000);
                    return;
                }
            }
        };
        let bounce_id = bounce.as_ref().map(|b| format_id(b.env.id));
        // One batch for the whole attempt: the report (carrying the outcomes it
        // reports) first, then every recipient's outcome.
        match spool.record_outcomes(updates, bounce).await {
            Ok(()) => {
                self.unrecorded.borrow_mut().remove(&id);
                let since = Duration::from_millis(now.saturating_sub(env.received_at_ms));
                let local = domain == LOCAL_KEY;
                crate::metrics::count(|c| {
                    for (fate, first) in &counted {
                        let delivered = *fate == Fate::Sent;
                        match fate {
                            Fate::Sent => c.recipients_delivered += 1,
                            Fate::Deferred => c.recipients_deferred += 1,
                            Fate::Expired => {
                                c.recipients_expired += 1;
                                c.recipients_bounced += 1;
                            }
                            Fate::Bounced => c.recipients_bounced += 1,
                        }
                        if delivered && local {
                            c.recipients_delivered_local += 1;
                        }
                        if *first {
                            c.delivery_first_attempt.observe(since);
                        }
                        if delivered {
                            c.delivery_end_to_end.observe(since);
                        }
                    }
                    if !local && counted.iter().any(|(f, _)| *f == Fate::Sent) {
                        c.bytes_out += message.len() as u64;
                    }
                });
                if let Some(bid) = bounce_id {
                    tracing::info!(id = %idt, bounce = %bid, to = %env.from, "bounce queued");
                }
            }
            Err(e) => {
                // The recipients stay as they were and are tried again (one
                // delivered but unrecorded may be sent twice: the window every MTA
                // has between a remote 250 and its own disk); no bounce was queued.
                tracing::error!(id = %idt, error = %e, "cannot record the delivery results; trying again in a minute");
                spool.retry_at(id, now_ms() + 60_000);
            }
        }
    }

    /// The report (RFC 3464) of `outcomes` (failures, and the successes NOTIFY=SUCCESS
    /// asked for) to the sender, if one is wanted (never for the null sender, nor when
    /// NOTIFY says no).
    pub(super) async fn bounce(
        &self,
        spool: &Rc<Spool>,
        env: &Envelope,
        message: &[u8],
        outcomes: Vec<(Recipient, Reply, Option<String>, dsn::Action)>,
    ) -> Result<Option<Bounce>, LogError> {
        let reports: Vec<dsn::Report> = outcomes
            .into_iter()
            .map(|(r, reply, relay, action)| dsn::Report {
                rcpt: r.address,
                orcpt: r.orcpt,
                notify: r.notify,
                action,
                status: reply.enhanced.unwrap_or(match action {
                    dsn::Action::Failed => (5, 0, 0),
                    dsn::Action::Delayed => (4, 0, 0),
                    dsn::Action::Delivered | dsn::Action::Relayed => (2, 0, 0),
                }),
                diagnostic: reply.to_line(),
                // RFC 3464 §2.3.5: the MTA that gave the diagnostic; none for a
                // mailbox here.
                remote_mta: relay
                    .filter(|r| r != super::local::RELAY)
                    .and_then(|r| r.split('[').next().map(str::to_string)),
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
            &self.cfg().hostname,
            &original,
            &reports,
            &chrono::Utc::now().to_rfc2822(),
        ) else {
            return Ok(None);
        };
        let bid = spool.next_id().await?;
        let bounce = Envelope {
            id: bid,
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
            helo: self.cfg().hostname.clone(),
            peer: "local".into(),
        };
        Ok(Some(Bounce {
            env: bounce,
            text: report,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A destination routing cannot reach fails for good at once instead of being
    /// deferred until the queue lifetime ends: a malformed or undeliverable literal, a
    /// name without an A-label, a literal of this host's own address (a loop).
    #[test]
    fn undeliverable_destinations_fail_permanently() {
        let own: Vec<std::net::IpAddr> = vec![[127, 0, 0, 1].into()];
        let code = |d: &str| destination(&[], &own, d).map_err(|r| (r.code, r.enhanced));
        assert!(matches!(code("[192.0.2.1]"), Ok(Destination::Literal(_))));
        assert!(matches!(code("example.test"), Ok(Destination::Mx(_))));
        for bad in ["[0.0.0.0]", "[IPv6:ff02::1]", "[1.2.3]", "\u{301}a.test"] {
            assert_eq!(code(bad).err(), Some((550, Some((5, 1, 2)))), "{bad}");
        }
        assert_eq!(code("[127.0.0.1]").err(), Some((554, Some((5, 4, 6)))));
        let routes = vec![("*".to_string(), "smart.test".to_string(), 25)];
        assert!(matches!(
            destination(&routes, &own, "[0.0.0.0]"),
            Ok(Destination::Route(..))
        ));
    }

    /// Mail for local users waits in the queue (for the mailbox store); its memory
    /// copy must not stay with it, or it fills the cache meant for mail in flight.
    #[test]
    fn a_message_with_only_local_recipients_left_leaves_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().to_path_buf();
        ringmail_store::manifest::open_or_create(&data, 1).unwrap();
        glommio::LocalExecutor::default().run(async move {
            let spool = Rc::new(
                Spool::open(&data, 0, ringmail_store::LogConfig::default())
                    .await
                    .unwrap(),
            );
            let cfg = Rc::new(Config::default());
            let ring = crate::net::Ring::start().unwrap();
            let delivery = Delivery::new(
                cfg,
                ring,
                vec![spool.clone()],
                None,
                crate::delivery::tls::OutboundTls::new(vec![], None).unwrap(),
            );
            let id = spool.next_id().await.unwrap();
            let env = Envelope {
                id,
                from: "a@src.test".into(),
                recipients: vec![Recipient {
                    address: "user@localhost".into(),
                    ..Recipient::default()
                }],
                ..Envelope::default()
            };
            spool.enqueue(env, b"", b"hi\r\n".to_vec()).await.unwrap();
            assert_eq!(spool.cached_messages(), 1);
            delivery.scan();
            assert_eq!(spool.cached_messages(), 0, "a local message stays cached");
            assert!(spool.get(id).is_some(), "and stays queued");
            spool.close().await;
        });
    }

    #[test]
    fn idle_rate_buckets_are_evicted_once_full_again() {
        let mut limit = RateLimit::new(Some(2.0));
        let t0 = Instant::now();
        for i in 0..100 {
            assert!(limit.take(&format!("d{i}.test"), t0));
        }
        // A busy destination: its bucket is empty.
        assert!(limit.take("busy.test", t0));
        assert!(limit.take("busy.test", t0));
        assert!(!limit.take("busy.test", t0));
        assert_eq!(limit.buckets.len(), 101);
        // Not refilled yet: nothing may go, or the limit would be forgotten.
        limit.evict_idle(t0 + Duration::from_millis(100));
        assert_eq!(limit.buckets.len(), 101);
        // A second later every bucket is full again: the map empties.
        limit.evict_idle(t0 + Duration::from_secs(1));
        assert!(limit.buckets.is_empty(), "{} left", limit.buckets.len());
        // The limit still holds for a destination that comes back.
        let t1 = t0 + Duration::from_secs(2);
        assert!(limit.take("busy.test", t1));
        assert!(limit.take("busy.test", t1));
        assert!(!limit.take("busy.test", t1));
    }
}
