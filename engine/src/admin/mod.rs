//! The admin listener (`admin`, default `127.0.0.1:8025`), served by executor 0:
//! Prometheus metrics at `GET /metrics` and the queue API under `/api/v1/queue`
//! (docs/contracts.md, "Admin API"). A request that touches the queue runs as a job
//! on the executor that owns the message's shard (`MailService::on_executor`), and a
//! change is durable there before the answer; a scrape asks every executor for its
//! counters and levels.

pub mod client;
pub mod http;

use crate::delivery::control::Op;
use crate::delivery::scheduler::Delivery;
use crate::mailbox::MailService;
use crate::metrics::{self, expose};
use crate::queue::report::{Filter, Shape};
use http::{Read, Request, Response};
use ringmail_store::message::{format_id, parse_id};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// An admin connection silent this long between requests is closed.
const IDLE: Duration = Duration::from_secs(60);
/// Admin connections open at once; more are closed at once.
const CONNECTIONS_MAX: usize = 64;
/// Messages a listing returns at most (`limit` asks for fewer).
pub const LIST_MAX: usize = 10_000;
/// Destinations a summary lists at most (`top` asks for fewer).
pub const SUMMARY_TOP: usize = 1_000;
/// The header section `GET /api/v1/queue/ID` shows at most.
const HEADERS_MAX: usize = 64 << 10;

thread_local! {
    /// This executor's delivery (and through it its spools), for the admin jobs.
    static NODE: RefCell<Option<Rc<Delivery>>> = const { RefCell::new(None) };
}

/// Makes this executor's delivery reachable by admin jobs (at its start).
pub fn register(delivery: Rc<Delivery>) {
    NODE.with(|n| *n.borrow_mut() = Some(delivery));
}

/// Forgets it (at its stop).
pub fn unregister() {
    NODE.with(|n| *n.borrow_mut() = None);
}

fn node() -> Option<Rc<Delivery>> {
    NODE.with(|n| n.borrow().clone())
}

pub struct Admin {
    mail: MailService,
    auth: Arc<crate::auth::Authenticator>,
    token: Option<String>,
    executors: usize,
    stop: crate::net::stop::Stop,
    open: Cell<usize>,
}

impl Admin {
    /// Serves `listener` (bound by `runtime::serve`) until `stop`.
    pub fn start(
        listener: std::os::fd::OwnedFd,
        mail: MailService,
        auth: Arc<crate::auth::Authenticator>,
        token: Option<String>,
    ) -> Rc<Admin> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: a bound, listening TCP socket whose ownership moves here.
        let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) };
        let admin = Rc::new(Admin {
            executors: mail.executors(),
            mail,
            auth,
            token,
            stop: Default::default(),
            open: Cell::new(0),
        });
        let me = admin.clone();
        glommio::spawn_local(async move { me.accept_loop(listener).await }).detach();
        admin
    }

    /// Stops accepting and closes idle connections (shutdown).
    pub fn stop(&self) {
        self.stop.stop();
    }

    async fn accept_loop(self: Rc<Self>, listener: glommio::net::TcpListener) {
        loop {
            match self.stop.or_stopped(listener.accept()).await {
                None => return,
                Some(Ok(stream)) if self.open.get() >= CONNECTIONS_MAX => {
                    tracing::warn!(
                        limit = CONNECTIONS_MAX,
                        "admin: connection refused: too many connections"
                    );
                    drop(stream);
                }
                Some(Ok(stream)) => {
                    let me = self.clone();
                    me.open.set(me.open.get() + 1);
                    glommio::spawn_local(async move {
                        me.connection(stream).await;
                        me.open.set(me.open.get() - 1);
                    })
                    .detach();
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "admin: accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn connection(&self, mut stream: glommio::net::TcpStream) {
        let mut buf = Vec::new();
        let mut first = true;
        loop {
            let read = self
                .stop
                .or_stopped(http::read_request(&mut stream, &mut buf, IDLE, first))
                .await;
            first = false;
            let req = match read {
                None | Some(Read::Closed) => return,
                Some(Read::Bad(status, why)) => {
                    Response::error(status, why)
                        .send(&mut stream, true, false)
                        .await;
                    return;
                }
                Some(Read::Request(r)) => r,
            };
            let answer = self.answer(&req).await;
            // Without the token a client keeps no connection open (nor a slot).
            let close = req.close || answer.status == 401;
            if !answer.send(&mut stream, close, req.head_only).await || close {
                return;
            }
        }
    }

    fn authorized(&self, req: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        // Compared without an early exit, so the time says nothing of the token.
        req.bearer.as_ref().is_some_and(|b| {
            b.len() == token.len()
                && b.bytes()
                    .zip(token.bytes())
                    .fold(0, |d, (x, y)| d | (x ^ y))
                    == 0
        })
    }

    async fn answer(&self, req: &Request) -> Response {
        // A browser's cross-site request carries an Origin: no page may steer the
        // queue through a browser on this host (API clients send none).
        if req.method != "GET" && req.origin {
            return Response::error(403, "requests from a web page (Origin) are refused");
        }
        // Without a token the listener is on the loopback, and only a loopback name
        // reaches it honestly: another Host is a web page's DNS rebinding.
        if self.token.is_none() && !req.host.as_deref().is_none_or(is_loopback_host) {
            return Response::error(403, "the Host must name the loopback");
        }
        if !self.authorized(req) {
            let mut r = Response::error(401, "a valid `Authorization: Bearer` token is required");
            r.challenge = true;
            return r;
        }
        let parts: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
        // HEAD is GET without the body (`send` leaves it out).
        let method = if req.head_only { "GET" } else { &req.method };
        const READ: &str = "GET, HEAD";
        let result = match (method, parts.as_slice()) {
            ("GET", ["metrics"]) => return self.metrics().await,
            ("GET", ["api", "v1", "queue"]) => self.list(req).await,
            ("GET", ["api", "v1", "queue", "summary"]) => self.summary(req).await,
            ("POST", ["api", "v1", "queue", "flush"]) => self.flush(req).await,
            (_, ["api", "v1", "queue", "flush"]) => Err(Response::not_allowed("POST")),
            (_, ["api", "v1", "queue", "summary"]) => Err(Response::not_allowed(READ)),
            ("GET", ["api", "v1", "queue", id]) => self.show(id).await,
            ("POST", ["api", "v1", "queue", id, op]) => self.control(req, id, op).await,
            (_, ["metrics"]) | (_, ["api", "v1", "queue"]) | (_, ["api", "v1", "queue", _]) => {
                Err(Response::not_allowed(READ))
            }
            (_, ["api", "v1", "queue", _, _]) => Err(Response::not_allowed("POST")),
            _ => Err(Response::error(404, "no such resource")),
        };
        result.unwrap_or_else(|r| r)
    }

    /// Runs `f` on every executor, in order, and collects what each gives.
    async fn on_all<R, F>(&self, f: F) -> Result<Vec<R>, Response>
    where
        R: Send + 'static,
        F: Fn(Rc<Delivery>, &MailService) -> R + Send + Sync + Clone + 'static,
    {
        let mut out = Vec::with_capacity(self.executors);
        for k in 0..self.executors {
            let f = f.clone();
            let r = self
                .mail
                .on_executor(k, move |svc| {
                    Box::pin(async move { node().map(|d| f(d, &svc)) })
                })
                .await;
            match r {
                Ok(Some(r)) => out.push(r),
                _ => return Err(Response::error(503, "an executor is not running")),
            }
        }
        Ok(out)
    }

    async fn metrics(&self) -> Response {
        let parts = match self
            .on_all(|d, svc| {
                let mut g = d.gauges();
                g.store = ringmail_store::stats::get();
                g.mailbox_subscriptions = svc.subscriptions() as u64;
                (metrics::snapshot(), g)
            })
            .await
        {
            Ok(p) => p,
            Err(r) => return r,
        };
        let mut counters = metrics::Counters::default();
        let mut gauges = metrics::Gauges::default();
        for (c, g) in parts {
            counters = counters.plus(&c);
            gauges.merge(g);
        }
        let scrape = expose::Scrape {
            counters,
            gauges,
            auth: self.auth.counters(),
            executors: self.executors,
        };
        match expose::render(&scrape) {
            Ok(text) => Response {
                status: 200,
                content_type: expose::CONTENT_TYPE,
                body: text.into_bytes(),
                challenge: false,
                allow: None,
            },
            Err(e) => Response::error(500, &e),
        }
    }

    async fn summary(&self, req: &Request) -> Result<Response, Response> {
        let filter = parse_filter(req)?;
        let top = number(req, "top", SUMMARY_TOP)?;
        let now = crate::delivery::scheduler::now_ms();
        let parts = self
            .on_all(move |d, _| {
                let mut shape = Shape::default();
                for spool in d.spools() {
                    spool.for_each(|m| shape.add(m, &filter, now));
                }
                shape
            })
            .await?;
        let mut shape = Shape::default();
        parts.into_iter().for_each(|p| shape.merge(p));
        Ok(Response::json(200, &shape.to_json(top)))
    }

    async fn list(&self, req: &Request) -> Result<Response, Response> {
        let filter = parse_filter(req)?;
        let limit = number(req, "limit", LIST_MAX)?;
        let now = crate::delivery::scheduler::now_ms();
        let parts = self
            .on_all(move |d, _| {
                // This executor's `limit` oldest (of every spool), then their JSON.
                let mut found: Vec<(u64, u64)> = Vec::new();
                for spool in d.spools() {
                    spool.for_each(|m| {
                        if filter.matches(m, now) {
                            found.push((m.received_at_ms, m.id));
                        }
                    });
                }
                let matched = found.len();
                found.sort_unstable();
                found.truncate(limit);
                let shown: Vec<(u64, u64, serde_json::Value)> = found
                    .into_iter()
                    .filter_map(|(at, id)| {
                        let m = d.spools().iter().find_map(|s| s.get(id))?;
                        Some((at, id, m.to_json()))
                    })
                    .collect();
                (matched, shown)
            })
            .await?;
        let matched: usize = parts.iter().map(|p| p.0).sum();
        let mut all: Vec<(u64, u64, serde_json::Value)> =
            parts.into_iter().flat_map(|p| p.1).collect();
        all.sort_by_key(|(at, id, _)| (*at, *id));
        all.truncate(limit);
        Ok(Response::json(
            200,
            &serde_json::json!({
                "matched": matched,
                "returned": all.len(),
                "messages": all.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
            }),
        ))
    }

    fn owner(&self, id: &str) -> Result<(u64, usize), Response> {
        let id = parse_id(id).ok_or_else(|| {
            Response::error(
                400,
                "a queue id is 16 hexadecimal digits (as `queue list` prints)",
            )
        })?;
        let shard = ringmail_store::Handle::of_id(id).shard as usize;
        Ok((id, shard % self.executors))
    }

    async fn show(&self, id: &str) -> Result<Response, Response> {
        let (id, owner) = self.owner(id)?;
        let shown = self
            .mail
            .on_executor(owner, move |_| {
                Box::pin(async move {
                    let d = node()?;
                    let spool = d.spools().iter().find(|s| s.get(id).is_some())?.clone();
                    let m = spool.get(id)?;
                    let mut v = m.to_json();
                    let text = spool.read_message(id).await;
                    v["helo"] = serde_json::json!(text.as_ref().ok().map(|t| t.env.helo.clone()));
                    v["client"] = serde_json::json!(text.as_ref().ok().map(|t| t.env.peer.clone()));
                    v["headers"] = match &text {
                        Ok(t) => {
                            serde_json::json!(header_section(&t.message.prefix, &t.message.body))
                        }
                        Err(e) => serde_json::json!({ "error": e.to_string() }),
                    };
                    Some(v)
                })
            })
            .await;
        match shown {
            Ok(Some(v)) => Ok(Response::json(200, &v)),
            Ok(None) => Err(Response::error(404, "no such message in the queue")),
            Err(_) => Err(Response::error(503, "the shard's executor is not running")),
        }
    }

    async fn control(&self, req: &Request, id: &str, op: &str) -> Result<Response, Response> {
        let Some(mut op) = Op::parse(op) else {
            return Err(Response::error(
                404,
                "no such operation (hold, release, delete, bounce)",
            ));
        };
        if op == Op::Delete && matches!(req.param("bounce"), Some("true" | "1" | "yes")) {
            op = Op::Bounce;
        }
        let (id, owner) = self.owner(id)?;
        let done = self
            .mail
            .on_executor(owner, move |_| {
                Box::pin(async move {
                    match node() {
                        Some(d) => d.control(id, op).await,
                        None => Err("the shard's executor is stopping".into()),
                    }
                })
            })
            .await;
        match done {
            Ok(Ok(Some(c))) => Ok(Response::json(
                200,
                &serde_json::json!({
                    "id": format_id(id),
                    "changed": c.changed,
                    "busy": c.busy,
                }),
            )),
            Ok(Ok(None)) => Err(Response::error(404, "no such message in the queue")),
            Ok(Err(e)) => Err(Response::error(500, &e)),
            Err(_) => Err(Response::error(503, "the shard's executor is not running")),
        }
    }

    async fn flush(&self, req: &Request) -> Result<Response, Response> {
        let id = match req.param("id") {
            Some(id) => Some(self.owner(id)?.0),
            None => None,
        };
        let domain = req.param("domain").map(crate::smtp::address::domain_key);
        let parts = self
            .on_all(move |d, _| {
                let mut n = 0;
                for spool in d.spools() {
                    n += spool.flush_where(|m, to| {
                        id.is_none_or(|id| m.id == id)
                            && domain
                                .as_ref()
                                .is_none_or(|dom| crate::queue::report::domain(to) == *dom)
                    });
                }
                n
            })
            .await?;
        let flushed: usize = parts.iter().sum();
        tracing::info!(flushed, "queue flush");
        Ok(Response::json(
            200,
            &serde_json::json!({ "flushed": flushed }),
        ))
    }
}

fn parse_filter(req: &Request) -> Result<Filter, Response> {
    Filter::parse(|k| req.param(k).map(str::to_string)).map_err(|e| Response::error(400, &e))
}

fn number(req: &Request, name: &str, max: usize) -> Result<usize, Response> {
    match req.param(name) {
        None => Ok(max),
        Some(v) => v
            .parse::<usize>()
            .map(|n| n.min(max))
            .map_err(|_| Response::error(400, &format!("`{name}` must be a number"))),
    }
}

/// The header section of a stored message (its trace prefix, which is header lines,
/// then the body's own), as text, at most `HEADERS_MAX` bytes.
fn header_section(prefix: &[u8], body: &[u8]) -> String {
    let head = &body[..body.len().min(HEADERS_MAX)];
    let end = memchr::memmem::find(head, b"\r\n\r\n").map_or(head.len(), |i| i + 2);
    let mut text = prefix.to_vec();
    text.extend_from_slice(&head[..end]);
    text.truncate(HEADERS_MAX);
    String::from_utf8_lossy(&text).into_owned()
}

/// A `Host` value that names the loopback: `localhost`, a 127/8 address or `[::1]`,
/// with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(h, _)| h),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
