//! One delivery attempt: one message to the recipients of one destination domain,
//! over the domain's MX hosts in order (or a fixed route), with the sans-IO client
//! core on the executor's io_uring.
//!
//! Not built yet around it: per-destination queues, connection reuse, rate limits and
//! the scheduler that calls this with the retry policy.

use crate::dns::resolver::Resolver;
use crate::dns::Route;
use crate::net::Ring;
use crate::smtp::client::{Client, DotStuffer, Event, RcptResult, Reply, Transaction};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct AttemptConfig {
    /// The name ringmail gives in EHLO.
    pub helo: String,
    /// Port of MX hosts (25; tests use a high port).
    pub mx_port: u16,
    pub connect_timeout: Duration,
    /// Longest wait for any reply.
    pub reply_timeout: Duration,
}

/// Where the domain's mail goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// By its MX records.
    Mx(String),
    /// A fixed next hop (`--route DOMAIN=HOST:PORT`).
    Route(String, u16),
}

#[derive(Debug)]
pub struct Outcome {
    /// One per recipient of the transaction, in order.
    pub results: Vec<RcptResult>,
    /// `host[ip]:port` that answered, for the delivery log.
    pub relay: Option<String>,
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
    resolver: &Resolver,
    cfg: &AttemptConfig,
    dest: &Destination,
    tx: &Transaction,
    message: &[u8],
) -> Outcome {
    let (hosts, port) = match dest {
        Destination::Route(host, port) => (vec![host.clone()], *port),
        Destination::Mx(domain) => match resolver.mx_route(domain).await {
            Ok(Route::Hosts(h)) => (h, cfg.mx_port),
            Ok(Route::Implicit) => (vec![domain.clone()], cfg.mx_port),
            Ok(Route::NullMx) => {
                let r = local(
                    556,
                    (5, 1, 10),
                    format!("{domain} does not accept mail (null MX)"),
                );
                return Outcome {
                    results: all(tx, RcptResult::Failed(r)),
                    relay: None,
                };
            }
            Ok(Route::NoSuchDomain) => {
                let r = local(550, (5, 1, 2), format!("{domain} does not exist"));
                return Outcome {
                    results: all(tx, RcptResult::Failed(r)),
                    relay: None,
                };
            }
            Err(e) => {
                let r = local(
                    451,
                    (4, 4, 3),
                    format!("MX lookup for {domain} failed: {e}"),
                );
                return Outcome {
                    results: all(tx, RcptResult::Deferred(r)),
                    relay: None,
                };
            }
        },
    };
    let mut last = String::from("no address for any MX host");
    for host in &hosts {
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match resolver.addresses(host).await {
                Ok(a) => a,
                Err(e) => {
                    last = format!("{host}: {e}");
                    continue;
                }
            },
        };
        for ip in addrs {
            let addr = SocketAddr::new(ip, port);
            match session(ring, cfg, addr, tx, message).await {
                Ok(results) => {
                    return Outcome {
                        results,
                        relay: Some(format!("{host}[{ip}]:{port}")),
                    }
                }
                Err(why) => last = format!("{host}[{ip}]:{port}: {why}"),
            }
        }
    }
    let r = local(
        451,
        (4, 4, 1),
        format!("no MX host took the message ({last})"),
    );
    Outcome {
        results: all(tx, RcptResult::Deferred(r)),
        relay: None,
    }
}

/// One SMTP session with one host. Err: the host could not be used (no connection,
/// refused greeting), so the next one may be tried; Ok: the transaction's results.
async fn session(
    ring: &Rc<Ring>,
    cfg: &AttemptConfig,
    addr: SocketAddr,
    tx: &Transaction,
    message: &[u8],
) -> Result<Vec<RcptResult>, String> {
    let fd = ring
        .connect(addr, cfg.connect_timeout)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let raw = fd.as_raw_fd();
    let mut c = Client::new(&cfg.helo);
    let mut buf = Vec::with_capacity(16 << 10);
    let mut results: Option<Vec<RcptResult>> = None;
    let mut started = false;
    loop {
        let (res, b) = ring
            .recv(raw, std::mem::take(&mut buf), cfg.reply_timeout)
            .await;
        buf = b;
        let events = match res {
            Ok(n) if n > 0 => c.feed(&buf[..n]),
            // Closed, reset or silent: whatever was not answered is deferred.
            _ => {
                return match (results, c.connection_lost()) {
                    (Some(r), _) => Ok(r),
                    (None, Some(Event::Done(r))) => Ok(r),
                    _ => Err("connection closed before the transaction".into()),
                };
            }
        };
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(16 << 10);
        }
        for ev in events {
            match ev {
                Event::Ready if !started => {
                    started = true;
                    if let Some(Event::Done(r)) = c.start(tx) {
                        results = Some(r);
                        c.quit();
                    }
                }
                Event::Ready => c.quit(),
                Event::SendBody { bdat } => {
                    let mut out = c.output().to_vec();
                    c.clear_output();
                    if bdat {
                        out.extend_from_slice(message);
                    } else {
                        let mut d = DotStuffer::default();
                        d.stuff(message, &mut out);
                        out.extend_from_slice(d.finish());
                        c.body_sent();
                    }
                    ring.send_all(raw, &out, cfg.reply_timeout)
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                }
                Event::Done(r) => results = Some(r),
                Event::Failed(reply) => {
                    return match results {
                        Some(r) => Ok(r),
                        None => Err(reply.to_line()),
                    };
                }
                Event::Closed => return results.ok_or_else(|| "closed".to_string()),
            }
        }
        if !c.output().is_empty() {
            let out = c.output().to_vec();
            c.clear_output();
            if let Err(e) = ring.send_all(raw, &out, cfg.reply_timeout).await {
                return results.ok_or_else(|| format!("send: {e}"));
            }
        }
    }
}
