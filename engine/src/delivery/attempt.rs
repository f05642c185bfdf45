//! One delivery attempt: one message to the recipients of one destination domain,
//! over the domain's MX hosts in order (or a fixed route), with the sans-IO client
//! core on the executor's io_uring.
//!
//! Every wait has a deadline (`DeliveryTimeouts`): one per reply, and one for the
//! whole attempt, so no server holds a delivery slot longer than that.

use super::tls::{OutboundTls, TlsLevel};
use crate::dns::resolver::Resolver;
use crate::dns::Route;
use crate::net::tls::Stream;
use crate::net::{Ring, SendBuf};
use crate::queue::MessageText;
use crate::smtp::address::ascii_address;
use crate::smtp::client::{
    Awaiting, Client, DotStuffer, Event, RcptResult, Reply, Transaction, TxRcpt,
};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct AttemptConfig {
    /// The name ringmail gives in EHLO.
    pub helo: String,
    /// Port of MX hosts (25; tests use a high port).
    pub mx_port: u16,
    pub timeouts: DeliveryTimeouts,
    /// STARTTLS policy per destination and the client settings.
    pub tls: OutboundTls,
}

/// How long an attempt waits. Each reply limit is a deadline for the whole reply,
/// from the command (or the connection) to its last line: a server trickling a
/// byte at a time runs out of time like a silent one. The defaults are RFC 5321
/// §4.5.3.2's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryTimeouts {
    /// One TCP connection (per address of each host).
    pub connect: Duration,
    pub greeting: Duration,
    /// EHLO/HELO, MAIL, RSET and QUIT.
    pub command: Duration,
    pub rcpt: Duration,
    /// DATA until its 354.
    pub data_init: Duration,
    /// Each send of the message text (and of commands) taking no bytes at all.
    pub data_block: Duration,
    /// The end of the message (final dot or BDAT LAST) until its reply: long, as the
    /// server may scan the message before answering.
    pub data_done: Duration,
    /// Everything of one attempt together: every MX host and address, connections
    /// and replies. 15 minutes: the longest single wait above (10 minutes for the
    /// final reply) plus a normal transaction's few seconds, with room for a large
    /// message on a slow link (50 MB in 10 minutes is under 1 Mbit/s); a server
    /// that needs longer is broken or tarpitting, and holding a delivery slot for it
    /// for hours starves the rest of the queue. The recipients are then deferred
    /// and retried on the usual schedule.
    pub attempt: Duration,
}

impl Default for DeliveryTimeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        DeliveryTimeouts {
            connect: Duration::from_secs(10),
            greeting: min(5),
            command: min(5),
            rcpt: min(5),
            data_init: min(2),
            data_block: min(3),
            data_done: min(10),
            attempt: min(15),
        }
    }
}

impl DeliveryTimeouts {
    fn reply(&self, what: Awaiting) -> Duration {
        match what {
            Awaiting::Greeting => self.greeting,
            Awaiting::Hello
            | Awaiting::Mail
            | Awaiting::Rset
            | Awaiting::Quit
            | Awaiting::StartTls => self.command,
            Awaiting::Rcpt => self.rcpt,
            Awaiting::Data => self.data_init,
            Awaiting::EndOfData => self.data_done,
        }
    }
}

/// The attempt's ceiling and the clock of the reply awaited now: every wait ends at
/// the earlier of the two, and a timeout is reported by the one that ran out.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    attempt: Instant,
    attempt_limit: Duration,
}

impl Deadlines {
    /// How long an operation may wait now, `left` of its own `limit`, and the reason
    /// to give if it times out.
    fn wait(&self, left: Duration, limit: Duration, what: &str) -> (Duration, String) {
        let attempt_left = self.attempt.saturating_duration_since(Instant::now());
        if attempt_left <= left {
            (
                attempt_left.max(Duration::from_millis(1)),
                format!(
                    "timed out: the attempt's limit of {:?} ran out (waiting for {what})",
                    self.attempt_limit
                ),
            )
        } else {
            (
                left.max(Duration::from_millis(1)),
                format!("timed out: {what} did not come within {limit:?}"),
            )
        }
    }

    fn passed(&self) -> bool {
        Instant::now() >= self.attempt
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
}

/// Where the domain's mail goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// By its MX records.
    Mx(String),
    /// A fixed next hop (`--route DOMAIN=HOST:PORT`).
    Route(String, u16),
    /// An address literal (`user@[192.0.2.1]`): that address on the MX port, no DNS.
    Literal(IpAddr),
}

/// Idle SMTP connections kept for the next message to the same host, by address, TLS
/// level and host name (a connection set up under one policy serves only that policy,
/// and one whose certificate was checked for a name serves only that name).
pub struct Pool {
    idle: std::cell::RefCell<std::collections::HashMap<PoolKey, Vec<Idle>>>,
    /// Messages one connection carries before it is closed.
    pub messages_per_connection_max: usize,
    /// An idle connection older than this is closed.
    pub idle_timeout: Duration,
}

type PoolKey = (SocketAddr, TlsLevel, String);

/// How long a retired connection's QUIT may take to go out.
const QUIT_SEND: Duration = Duration::from_secs(5);

/// Closes an idle connection in the background, after a QUIT (RFC 5321 §4.1.1.10:
/// the client "MUST NOT intentionally close the transmission channel until it sends
/// a QUIT command"); its answer is not waited for.
fn retire(mut i: Idle) {
    glommio::spawn_local(async move {
        i.client.quit();
        let quit = i.client.output().to_vec();
        if !quit.is_empty() {
            let _ = i.stream.send_all(&quit, QUIT_SEND).await;
        }
        i.stream.close().await;
        drop(i.fd);
    })
    .detach();
}

struct Idle {
    fd: std::os::fd::OwnedFd,
    /// The socket, under TLS if it was negotiated.
    stream: Stream,
    client: Client,
    used: usize,
    since: std::time::Instant,
}

impl Pool {
    pub fn new(messages_per_connection_max: usize, idle_timeout: Duration) -> Pool {
        Pool {
            idle: Default::default(),
            messages_per_connection_max,
            idle_timeout,
        }
    }

    fn take(&self, addr: &PoolKey) -> Option<Idle> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(addr)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < self.idle_timeout {
                return Some(i);
            }
            retire(i);
        }
        None
    }

    fn put(&self, addr: PoolKey, i: Idle) {
        self.idle.borrow_mut().entry(addr).or_default().push(i);
    }

    /// Closes connections idle past the timeout, each after a QUIT.
    pub fn expire(&self) {
        let timeout = self.idle_timeout;
        let mut old = Vec::new();
        self.idle.borrow_mut().retain(|_, list| {
            let (keep, gone): (Vec<Idle>, Vec<Idle>) = std::mem::take(list)
                .into_iter()
                .partition(|i| i.since.elapsed() < timeout);
            *list = keep;
            old.extend(gone);
            !list.is_empty()
        });
        old.into_iter().for_each(retire);
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}

#[derive(Debug)]
pub struct Outcome {
    /// One per recipient of the transaction, in order.
    pub results: Vec<RcptResult>,
    /// `host[ip]:port` that answered, for the delivery log.
    pub relay: Option<String>,
    /// The TLS version and cipher suite of that session; None: plaintext.
    pub tls: Option<String>,
    /// That host offered DSN and got the recipients' DSN parameters: success is
    /// reported from there on (else a NOTIFY=SUCCESS gets a "relayed" report here).
    pub peer_dsn: bool,
}

impl Outcome {
    /// The same result for every recipient, no host having answered.
    fn everyone(tx: &Transaction, r: RcptResult) -> Outcome {
        Outcome {
            results: all(tx, r),
            relay: None,
            tls: None,
            peer_dsn: false,
        }
    }
}

fn all(tx: &Transaction, r: RcptResult) -> Vec<RcptResult> {
    tx.rcpts.iter().map(|_| r.clone()).collect()
}

fn local(code: u16, e: (u8, u16, u16), text: String) -> Reply {
    Reply {
        code,
        text,
        enhanced: Some(e),
    }
}

/// Delivers `message` (trace prefix and body, as stored) to `tx`'s recipients.
pub async fn attempt(
    ring: &Rc<Ring>,
    pool: &Pool,
    resolver: &Resolver,
    cfg: &AttemptConfig,
    dest: &Destination,
    tx: &Transaction,
    message: &MessageText,
) -> Outcome {
    let deadlines = Deadlines {
        attempt: Instant::now() + cfg.timeouts.attempt,
        attempt_limit: cfg.timeouts.attempt,
    };
    let (hosts, port) = match dest {
        Destination::Route(host, port) => (vec![host.clone()], *port),
        Destination::Literal(ip) => (vec![ip.to_string()], cfg.mx_port),
        Destination::Mx(domain) => match resolver.mx_route(domain, &cfg.helo).await {
            Ok(Route::Hosts(h)) => (h, cfg.mx_port),
            Ok(Route::BestMxIsSelf) => {
                // Postfix's wording and status: every host would lead back here.
                let r = local(
                    554,
                    (5, 4, 6),
                    format!("mail for {domain} loops back to myself (this host is its best MX)"),
                );
                return Outcome::everyone(tx, RcptResult::Failed(r));
            }
            Ok(Route::Implicit) => (vec![domain.clone()], cfg.mx_port),
            Ok(Route::NullMx) => {
                let r = local(
                    556,
                    (5, 1, 10),
                    format!("{domain} does not accept mail (null MX)"),
                );
                return Outcome::everyone(tx, RcptResult::Failed(r));
            }
            Ok(Route::NoSuchDomain) => {
                let r = local(550, (5, 1, 2), format!("{domain} does not exist"));
                return Outcome::everyone(tx, RcptResult::Failed(r));
            }
            Err(e) => {
                let r = local(
                    451,
                    (4, 4, 3),
                    format!("MX lookup for {domain} failed: {e}"),
                );
                return Outcome::everyone(tx, RcptResult::Deferred(r));
            }
        },
    };
    let ascii = ascii_transaction(tx, message);
    let ascii = ascii.as_ref();
    let nexthop = match dest {
        Destination::Route(host, _) => host.clone(),
        Destination::Literal(ip) => crate::smtp::address::Domain::Literal(*ip).to_string(),
        Destination::Mx(domain) => domain.clone(),
    };
    // The status when every host failed: the TLS policy's when all of them failed it
    // (RFC 3463 §3.8, so that the queue and DSNs show a security failure), else 4.4.1.
    let mut status = None;
    let mut all_tls = true;
    let policy = cfg
        .tls
        .level(&crate::smtp::address::domain_key(recipient_domain(tx)));
    let mut last = String::from("no address for any MX host");
    // Every host named looked up and found without an address (NXDOMAIN or no
    // A/AAAA), none failing temporarily: RFC 5321 §5.1, "If MX records are present,
    // but none of them are usable, or the implicit MX is unusable, this situation
    // MUST be reported as an error".
    let mut none_usable = matches!(dest, Destination::Mx(_));
    for host in &hosts {
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match resolver.addresses(host).await {
                Ok(a) => a,
                Err(e) => {
                    all_tls = false;
                    none_usable = false;
                    last = format!("{host}: {e}");
                    continue;
                }
            },
        };
        if addrs.is_empty() {
            last = format!("{host}: no address (A or AAAA)");
            continue;
        }
        none_usable = false;
        for ip in addrs {
            if deadlines.passed() {
                last = format!(
                    "{last}; timed out: the attempt's limit of {:?} ran out",
                    cfg.timeouts.attempt
                );
                break;
            }
            let addr = SocketAddr::new(ip, port);
            let mut way = Way {
                addr,
                host,
                level: policy,
                may_reuse: true,
            };
            let mut tls = None;
            let mut peer_dsn = false;
            let res = loop {
                let res = session(
                    ring,
                    pool,
                    cfg,
                    &deadlines,
                    &way,
                    tx,
                    ascii,
                    message,
                    &nexthop,
                    &mut tls,
                    &mut peer_dsn,
                )
                .await;
                match res {
                    // A pooled connection the server has meanwhile closed fails before
                    // any result: then a fresh one is tried before the next address.
                    Err(Failure {
                        retry: Retry::Fresh,
                        ..
                    }) if way.may_reuse => way.may_reuse = false,
                    // Opportunistic TLS that failed in the handshake: once more in
                    // plaintext, as `may` allows (Postfix does the same).
                    Err(Failure {
                        retry: Retry::Plaintext,
                        why,
                        ..
                    }) if way.level == TlsLevel::May => {
                        tracing::info!(host = %host, addr = %addr, "{why}; trying again without TLS");
                        way.level = TlsLevel::None;
                        way.may_reuse = false;
                    }
                    res => break res,
                }
            };
            match res {
                Ok(results) => {
                    return Outcome {
                        results: match ascii.filter(|a| a.used.take()) {
                            Some(a) => a.expand(tx, results),
                            None => results,
                        },
                        relay: Some(format!("{host}[{ip}]:{port}")),
                        tls,
                        peer_dsn,
                    }
                }
                Err(f) => {
                    match f.tls {
                        Some(s) => status = Some(s),
                        None => all_tls = false,
                    }
                    last = format!("{host}[{ip}]:{port}: {}", f.why)
                }
            }
        }
    }
    if none_usable {
        let r = local(
            550,
            (5, 4, 4),
            format!("no mail host of {nexthop} has an address ({last})"),
        );
        return Outcome::everyone(tx, RcptResult::Failed(r));
    }
    let status = status.filter(|_| all_tls).unwrap_or((4, 4, 1));
    let r = local(451, status, format!("no MX host took the message ({last})"));
    Outcome::everyone(tx, RcptResult::Deferred(r))
}

/// The domain the transaction's recipients share (an attempt is per domain), whose
/// TLS policy applies.
fn recipient_domain(tx: &Transaction) -> &str {
    let to = tx.rcpts.first().map_or("", |r| r.to.as_str());
    to.rsplit_once('@').map_or("", |(_, d)| d)
}

/// The host one session goes to and how.
struct Way<'a> {
    addr: SocketAddr,
    /// The host's name: SNI, and the name its certificate must carry under `verify`.
    host: &'a str,
    level: TlsLevel,
    may_reuse: bool,
}

/// Why a session could not use its host, and what may be tried at once.
struct Failure {
    why: String,
    retry: Retry,
    /// The TLS policy's own refusal, and its status: no STARTTLS (4.7.4), a failed
    /// handshake (4.7.5).
    tls: Option<(u8, u16, u16)>,
}

#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// The next address or host, if any.
    No,
    /// A pooled connection died before this session received anything: a fresh
    /// connection to the same address.
    Fresh,
    /// The TLS handshake failed (nothing of the transaction was sent).
    Plaintext,
}

/// `tx` as an ASCII message, for a server without SMTPUTF8. RFC 6531 §3.2 and §3.5:
/// an internationalised message (UTF-8 in the envelope or in the headers, RFC 6532)
/// goes only to a server that offers SMTPUTF8, else it fails (5.6.7). An A-label is
/// the same domain, so where the only UTF-8 is in envelope domains the message can
/// go as ASCII; a UTF-8 local part has no such form, so only its recipient fails.
struct AsciiForm {
    tx: Transaction,
    /// Indices (in the original transaction) of the recipients `tx` carries.
    kept: Vec<usize>,
    /// This form was the one sent in the last session.
    used: std::cell::Cell<bool>,
}

impl AsciiForm {
    /// The results of `self.tx` as results of `tx`: the recipients left out fail.
    fn expand(&self, tx: &Transaction, results: Vec<RcptResult>) -> Vec<RcptResult> {
        let mut out: Vec<Option<RcptResult>> = vec![None; tx.rcpts.len()];
        for (&i, r) in self.kept.iter().zip(results) {
            out[i] = Some(r);
        }
        out.into_iter()
            .zip(&tx.rcpts)
            .map(|(r, rcpt)| {
                r.unwrap_or_else(|| {
                    RcptResult::Failed(local(
                        553,
                        (5, 6, 7),
                        format!(
                            "<{}>: a non-ASCII local part needs SMTPUTF8, and the server does not offer it",
                            rcpt.to
                        ),
                    ))
                })
            })
            .collect()
    }
}

/// None when the message needs SMTPUTF8 whatever its envelope (UTF-8 headers or
/// trace prefix, a sender with a UTF-8 local part, no recipient with an ASCII form),
/// or when it was not sent with SMTPUTF8 (then it goes as it is).
fn ascii_transaction(tx: &Transaction, message: &MessageText) -> Option<AsciiForm> {
    if !tx.smtputf8
        || !message.prefix.is_ascii()
        || crate::smtp::headers::scan(&message.body[..]).non_ascii
    {
        return None;
    }
    let from = match tx.from.is_empty() {
        true => String::new(),
        false => ascii_address(&tx.from)?,
    };
    let (kept, rcpts): (Vec<usize>, Vec<TxRcpt>) = tx
        .rcpts
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let to = ascii_address(&r.to)?;
            Some((
                i,
                TxRcpt {
                    to,
                    // A UTF-8 ORCPT cannot go without SMTPUTF8; DSNs then name the
                    // recipient as sent.
                    orcpt: r.orcpt.clone().filter(|o| o.is_ascii()),
                    notify: r.notify.clone(),
                },
            ))
        })
        .unzip();
    if rcpts.is_empty() {
        return None;
    }
    Some(AsciiForm {
        tx: Transaction {
            from,
            rcpts,
            smtputf8: false,
            ..tx.clone()
        },
        kept,
        used: std::cell::Cell::new(false),
    })
}

/// The form of the transaction this server takes.
fn for_server<'a>(
    c: &Client,
    tx: &'a Transaction,
    ascii: Option<&'a AsciiForm>,
) -> &'a Transaction {
    match ascii {
        Some(a) if !c.extensions().smtputf8 => {
            a.used.set(true);
            &a.tx
        }
        _ => tx,
    }
}

/// One SMTP session with one host. Err: the host could not be used (no connection,
/// refused greeting, a failed TLS handshake), so the next one may be tried; Ok: the
/// transaction's results. `tls` is set to the session's TLS version and cipher once
/// TLS is on.
#[allow(clippy::too_many_arguments)]
async fn session(
    ring: &Rc<Ring>,
    pool: &Pool,
    cfg: &AttemptConfig,
    deadlines: &Deadlines,
    way: &Way<'_>,
    tx: &Transaction,
    ascii: Option<&AsciiForm>,
    message: &MessageText,
    nexthop: &str,
    tls: &mut Option<String>,
    peer_dsn: &mut bool,
) -> Result<Vec<RcptResult>, Failure> {
    if let Some(a) = ascii {
        a.used.set(false);
    }
    *tls = None;
    let t = &cfg.timeouts;
    let key = (way.addr, way.level, way.host.to_ascii_lowercase());
    // Sends: the data-block limit per send, within the attempt's ceiling.
    let send_wait = || {
        deadlines.wait(
            t.data_block,
            t.data_block,
            "the server to take what was sent",
        )
    };
    let send_error = |e: std::io::Error, why: String| {
        if is_timeout(&e) {
            why
        } else {
            format!("send: {e}")
        }
    };
    let pooled = if way.may_reuse { pool.take(&key) } else { None };
    let reused = pooled.is_some();
    let (fd, mut stream, mut c, used) = match pooled {
        Some(i) => (i.fd, i.stream, i.client, i.used),
        None => {
            let (wait, why) = deadlines.wait(t.connect, t.connect, "the connection");
            let fd = ring.connect(way.addr, wait).await.map_err(|e| {
                let why = if is_timeout(&e) {
                    why
                } else {
                    format!("connect: {e}")
                };
                Failure {
                    why,
                    retry: Retry::No,
                    tls: None,
                }
            })?;
            let stream = Stream::plain(ring.clone(), fd.as_raw_fd());
            (fd, stream, Client::with_tls(&cfg.helo, way.level.wish()), 0)
        }
    };
    *tls = stream.tls_description();
    // A pooled connection that died before this session received anything was
    // closed by the server while idle, so a fresh connection may be tried at once.
    let fail = |why: String, received: bool| Failure {
        why,
        retry: match reused && !received {
            true => Retry::Fresh,
            false => Retry::No,
        },
        tls: None,
    };
    let mut results: Option<Vec<RcptResult>> = None;
    let mut started = false;
    if reused {
        started = true;
        *peer_dsn = c.passes_dsn();
        if let Some(Event::Done(r)) = c.start(for_server(&c, tx, ascii)) {
            // Refused before any command: the connection is as good as before.
            pool.put(
                key,
                Idle {
                    fd,
                    stream,
                    client: c,
                    used,
                    since: std::time::Instant::now(),
                },
            );
            return Ok(r);
        }
        let out = c.output().to_vec();
        c.clear_output();
        let (wait, why) = send_wait();
        stream
            .send_all(&out, wait)
            .await
            .map_err(|e| fail(send_error(e, why), false))?;
    }
    let mut buf = Vec::with_capacity(16 << 10);
    // Anything received on this connection in this session: a pooled connection
    // that dies before that was closed by the server while idle (try a fresh one);
    // after it, the message may have been taken, so never resend at once.
    let mut received = false;
    let mut finished = false;
    // The reply awaited now must be complete by this time: restarted when a reply
    // was taken or commands were sent, never by bytes that only trickle in.
    let mut reply_clock = (c.replies(), Instant::now());
    loop {
        let what = c.awaiting().unwrap_or(Awaiting::Quit);
        let limit = t.reply(what);
        let left = (reply_clock.1 + limit).saturating_duration_since(Instant::now());
        let (wait, why) = deadlines.wait(left, limit, what.describe());
        // Under TLS one receive may take several reads (a record at a time): the
        // whole of it stays within this wait, however the bytes trickle in.
        let (res, b) = bounded(wait, stream.recv(std::mem::take(&mut buf), wait)).await;
        buf = b;
        let mut events: std::collections::VecDeque<Event> = match res {
            Ok(n) if n > 0 => {
                received = true;
                c.feed(&buf[..n]).into()
            }
            // Closed, reset or silent: whatever was not answered is deferred (the
            // connection is dropped, so closed, and never pooled).
            res => {
                let timed_out = matches!(&res, Err(e) if is_timeout(e));
                let lost = if timed_out {
                    c.abort(Reply {
                        code: 451,
                        text: why.clone(),
                        enhanced: Some((4, 4, 2)),
                    })
                } else {
                    c.connection_lost()
                };
                if timed_out && results.is_none() && !matches!(lost, Some(Event::Done(_))) {
                    return Err(fail(why, received));
                }
                return match (results, lost) {
                    (Some(r), _) => Ok(r),
                    (None, Some(Event::Done(_))) if reused && !received => {
                        Err(fail("pooled connection closed".into(), received))
                    }
                    (None, Some(Event::Done(r))) => Ok(r),
                    _ => Err(fail(
                        "connection closed before the transaction".into(),
                        received,
                    )),
                };
            }
        };
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(16 << 10);
        }
        while let Some(ev) = events.pop_front() {
            match ev {
                Event::Ready if !started => {
                    started = true;
                    *peer_dsn = c.passes_dsn();
                    if let Some(Event::Done(r)) = c.start(for_server(&c, tx, ascii)) {
                        results = Some(r);
                        finished = true;
                    }
                }
                Event::Ready => finished = results.is_some(),
                Event::StartTls => {
                    handshake(&mut stream, cfg, deadlines, way).await?;
                    *tls = stream.tls_description();
                    c.tls_started();
                }
                Event::SendBody { bdat } => {
                    let (wait, why) = send_wait();
                    within(
                        deadlines,
                        send_body(&mut stream, &mut c, message, bdat, wait),
                    )
                    .await
                    .map_err(|e| fail(send_error(e, why), received))?;
                    reply_clock = (c.replies(), Instant::now());
                    if !bdat {
                        // Replies that arrived with the 354 are read now.
                        events.extend(c.body_sent());
                    }
                }
                Event::Done(r) => results = Some(r),
                Event::Failed(_) if !c.output().is_empty() => {
                    // Its QUIT first, not waiting for the answer; then as below.
                    let quit = c.output().to_vec();
                    c.clear_output();
                    let (wait, _) = send_wait();
                    let _ = stream.send_all(&quit, wait).await;
                    events.push_front(ev);
                }
                // Postfix's wording and status: permanent for the destination, as
                // every host of it would lead back here.
                Event::Failed(_) if c.loops_back() => {
                    let r = local(
                        554,
                        (5, 4, 6),
                        format!("mail for {nexthop} loops back to myself"),
                    );
                    return Ok(all(tx, RcptResult::Failed(r)));
                }
                Event::Failed(reply) => {
                    return match results {
                        Some(r) => Ok(r),
                        None => Err(Failure {
                            tls: (reply.enhanced == Some((4, 7, 4))).then_some((4, 7, 4)),
                            ..fail(reply.to_line(), received)
                        }),
                    };
                }
                Event::Closed => {
                    return results.ok_or_else(|| fail("closed".to_string(), received))
                }
            }
        }
        if finished {
            let r = results.take().expect("finished with results");
            if c.reusable() && c.output().is_empty() && used + 1 < pool.messages_per_connection_max
            {
                pool.put(
                    key,
                    Idle {
                        fd,
                        stream,
                        client: c,
                        used: used + 1,
                        since: std::time::Instant::now(),
                    },
                );
            } else {
                // Done with this connection: a polite QUIT, without waiting for 221.
                c.quit();
                let (wait, _) = send_wait();
                let _ = stream.send_all(c.output(), wait).await;
            }
            return Ok(r);
        }
        if c.replies() != reply_clock.0 {
            reply_clock = (c.replies(), Instant::now());
        }
        if !c.output().is_empty() {
            let out = c.output().to_vec();
            c.clear_output();
            let (wait, why) = send_wait();
            if let Err(e) = stream.send_all(&out, wait).await {
                return results.ok_or_else(|| fail(send_error(e, why), received));
            }
            reply_clock = (c.replies(), Instant::now());
        }
    }
}

/// The client's TLS handshake after the server's 220 to STARTTLS, with the settings
/// of the way's level (`verify` checks the certificate against the host's name).
async fn handshake(
    stream: &mut Stream,
    cfg: &AttemptConfig,
    deadlines: &Deadlines,
    way: &Way<'_>,
) -> Result<(), Failure> {
    let t = &cfg.timeouts;
    let (wait, why) = deadlines.wait(t.command, t.command, "the TLS handshake");
    let name =
        rustls::pki_types::ServerName::try_from(way.host.to_string()).map_err(|e| Failure {
            why: format!("`{}` is not a name TLS can check: {e}", way.host),
            retry: Retry::Plaintext,
            tls: Some((4, 7, 5)),
        })?;
    let config = cfg.tls.client_config(way.level);
    let shake = async {
        (
            stream.start_tls_client(config, name, wait).await,
            Vec::new(),
        )
    };
    bounded(wait, shake).await.0.map_err(|e| Failure {
        why: match is_timeout(&e) {
            true => why,
            false => format!("TLS handshake failed: {e}"),
        },
        tls: Some((4, 7, 5)),
        retry: Retry::Plaintext,
    })
}

/// A receive (or the handshake) no longer than `wait` in all; on timeout the buffer
/// went with the cancelled request and a new one is made.
async fn bounded<T>(
    wait: Duration,
    op: impl std::future::Future<Output = (std::io::Result<T>, Vec<u8>)>,
) -> (std::io::Result<T>, Vec<u8>) {
    futures_lite::future::or(op, async {
        glommio::timer::sleep(wait).await;
        (Err(std::io::ErrorKind::TimedOut.into()), Vec::new())
    })
    .await
}

/// Runs `op` (a send of the message, which may take many kernel sends, each with
/// its own stall limit) no longer than the attempt's ceiling allows. Dropping the
/// send early is safe: the ring keeps the buffer of a cancelled request.
async fn within(
    deadlines: &Deadlines,
    op: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    let left = deadlines.attempt.saturating_duration_since(Instant::now());
    futures_lite::future::or(op, async {
        glommio::timer::sleep(left).await;
        Err(std::io::ErrorKind::TimedOut.into())
    })
    .await
}

/// Below this size a message is copied behind the command into one send; above it,
/// the stored bytes go out as they are (no copy), in a send of their own.
const SHARED_SEND_MIN: usize = 16 << 10;

/// Sends the pending commands (BDAT, or the end of the pipelined group before DATA's
/// text) and the message. DATA text needs dot-stuffing only when a line starts with a
/// dot; otherwise the stored body is sent unchanged, then the end marker.
async fn send_body(
    stream: &mut Stream,
    c: &mut Client,
    message: &MessageText,
    bdat: bool,
    stall: Duration,
) -> std::io::Result<()> {
    let mut out = c.output().to_vec();
    c.clear_output();
    let mut d = DotStuffer::default();
    // The trace prefix is small: it always goes with the commands.
    if bdat {
        out.extend_from_slice(&message.prefix);
    } else {
        d.stuff(&message.prefix, &mut out);
    }
    let body = &message.body;
    if body.len() >= SHARED_SEND_MIN && (bdat || d.pass(body)) {
        stream.send(SendBuf::Owned(out), true, stall).await?;
        stream
            .send(SendBuf::Shared(Box::new(body.clone())), !bdat, stall)
            .await?;
        if !bdat {
            stream
                .send(SendBuf::Static(d.finish()), false, stall)
                .await?;
        }
        return Ok(());
    }
    if bdat {
        out.extend_from_slice(body);
    } else {
        d.stuff(body, &mut out);
        out.extend_from_slice(d.finish());
    }
    stream.send(SendBuf::Owned(out), false, stall).await
}
