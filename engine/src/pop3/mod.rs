//! POP3 (RFC 1939, 2449, 5034): the glommio driver around the sans-IO core
//! (`ringmail_frontends::pop3`).
//!
//! One accept loop per executor on the shared POP3 address; a session stays on the
//! core that accepted it. A login is checked by the one password path
//! (`auth::Authenticator`: pool, cache, delay, limit), then the maildrop is locked and
//! read on the user's home shard (`maildrop`, over `MailService`); RETR and TOP
//! stream the message from whichever shard stores it (`StoreService::open`: the record
//! head for the envelope, then the body in pieces), dot-stuffed on the way out, so a
//! large message is never held whole in memory.
//!
//! Invariants: a session that ends without QUIT (dropped, timed out, server
//! stopping) expunges nothing; the lock is released however the session ends; the
//! octets RETR sends are the octets LIST announced (the per-entry prefix, the trace
//! prefix and the body as stored).

pub mod maildrop;

use crate::accounts::DirectoryCell;
use crate::auth::{AuthError, Authenticator};
use crate::config::Config;
use crate::delivery::local::entry_prefix;
use crate::mailbox::MailService;
use crate::net::sessions::{Cap, Sessions};
use crate::net::tls::Stream;
use crate::net::{Ring, SendBuf};
use crate::storeservice::{Reading, StoreService};
use maildrop::{Item, OpenError, Opened};
use ringmail_frontends::pop3::{self as core, Login, Session, Step, Stuffer, Top, Waiting};
use ringmail_store::reader::CACHED_RECORD_BYTES_MAX;
use ringmail_store::record::RECORD_HEADER_BYTES;
use ringmail_store::Handle;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Bytes of a message gathered before a send: a read piece of the store, stuffed.
const SEND_BYTES: usize = ringmail_store::reader::PIECE_BYTES;
/// Replies held before they are sent, while pipelined commands are handled.
const OUTPUT_BYTES_MAX: usize = 64 << 10;
/// A receive: POP3 commands are short (255 octets), many pipelined ones fit.
const RECV_BYTES: usize = 16 << 10;

/// What the POP3 sessions of one executor share.
pub struct Pop3 {
    /// Replaced whole by a reload: a session keeps what it started with.
    cfg: RefCell<Rc<Config>>,
    core: core::Config,
    ring: Rc<Ring>,
    mail: MailService,
    store: StoreService,
    directory: Arc<DirectoryCell>,
    auth: Arc<Authenticator>,
    sessions: Rc<Sessions>,
    /// Certificates for STLS and the implicit-TLS listener.
    tls: Arc<crate::net::certs::ServerTls>,
}

/// A logged-in session's maildrop.
struct Held {
    user: u64,
    /// The account's address as the per-entry prefix names it.
    address: String,
    opened: Opened,
    /// UIDs RETR sent (marked `\Seen` when the session ends).
    seen: Vec<u32>,
    /// Messages opened (their segments pinned) ahead of their RETR, by index.
    ahead: std::collections::HashMap<usize, Reading>,
}

/// Messages opened at once, from the one a RETR or TOP asks for on: a message on a
/// shard of another executor costs a round trip to it (a wake-up of that core,
/// ~0.1 ms when it is idle), so a client fetching its mail in order pays one per this
/// many messages instead of one per message (bench/RESULTS.md, "POP3 … prefetch").
/// Each holds a pin on its segment until sent or the session ends.
const PREFETCH: usize = 32;

impl Pop3 {
    /// The settings now (a reload replaces them).
    fn cfg(&self) -> Rc<Config> {
        self.cfg.borrow().clone()
    }

    /// New settings (SIGHUP): sessions that start from now on use them.
    pub fn reload(&self, cfg: Rc<Config>) {
        *self.cfg.borrow_mut() = cfg;
    }

    pub fn new(
        cfg: Rc<Config>,
        ring: Rc<Ring>,
        mail: MailService,
        store: StoreService,
        directory: Arc<DirectoryCell>,
        auth: Arc<Authenticator>,
        tls: Arc<crate::net::certs::ServerTls>,
    ) -> Rc<Pop3> {
        let core = core::Config {
            hostname: cfg.hostname.clone(),
            stls: true,
            output_bytes_max: OUTPUT_BYTES_MAX,
            ..core::Config::default()
        };
        Rc::new(Pop3 {
            cfg: RefCell::new(cfg),
            core,
            ring,
            mail,
            store,
            directory,
            auth,
            sessions: Sessions::new(),
            tls,
        })
    }

    /// Begins shutdown: stop accepting; sessions leave after the command they are in.
    pub fn begin_shutdown(&self) {
        self.sessions.begin_shutdown();
    }

    pub async fn drained(&self, grace: Duration) {
        self.sessions.drained(grace, "pop3").await;
    }

    /// Accepts connections until shutdown. `implicit_tls`: POP3 over TLS (RFC 8314),
    /// the handshake before the greeting.
    pub async fn accept_loop(self: Rc<Self>, listener: OwnedFd, implicit_tls: bool) {
        let cap = Cap {
            sessions_max: {
                let me = self.clone();
                Box::new(move || me.cfg().connections_per_shard_max)
            },
            refusal: b"-ERR [SYS/TEMP] too many connections, try again later\r\n",
            send_timeout: self.cfg().idle_timeout,
            service: match implicit_tls {
                true => crate::metrics::Service::Pop3s,
                false => crate::metrics::Service::Pop3,
            },
        };
        let me = self.clone();
        self.sessions
            .clone()
            .accept_loop(self.ring.clone(), listener, cap, move |fd, peer| {
                let me = me.clone();
                async move { me.session(&fd, peer, implicit_tls).await }
            })
            .await;
    }

    async fn session(self: &Rc<Self>, fd: &OwnedFd, peer: SocketAddr, implicit_tls: bool) {
        let mut stream = Stream::plain(self.ring.clone(), fd.as_raw_fd());
        if implicit_tls && !self.start_tls(&mut stream, peer).await {
            return;
        }
        let mut held = None;
        self.converse(&mut stream, peer, &mut held).await;
        stream.close().await;
        // Ended without QUIT: the lock goes, RETR's `\Seen` stays, nothing is expunged.
        if let Some(h) = held {
            if let Err(e) =
                maildrop::close(&self.mail, h.user, h.opened.mailbox, h.seen, Vec::new()).await
            {
                tracing::warn!(user = h.user, error = %e, "pop3: cannot mark retrieved messages seen");
            }
        }
    }

    /// Runs the TLS handshake; false: it failed (logged), the connection is done.
    async fn start_tls(&self, stream: &mut Stream, peer: SocketAddr) -> bool {
        match stream
            .start_tls(self.tls.config(), self.cfg().idle_timeout)
            .await
        {
            Ok(()) => {
                tracing::debug!(client = %peer, tls = stream.tls_description().unwrap_or_default(), "pop3: TLS started");
                true
            }
            Err(e) => {
                tracing::info!(client = %peer, error = %e, "pop3: TLS handshake failed");
                false
            }
        }
    }

    async fn converse(&self, stream: &mut Stream, peer: SocketAddr, held: &mut Option<Held>) {
        let mut s = Session::new(core::Config {
            cleartext_auth: self.cfg().pop3_auth_without_tls || is_loopback(peer.ip()),
            ..self.core.clone()
        });
        if stream.is_tls() {
            s.set_tls();
        }
        let mut buf = Vec::with_capacity(RECV_BYTES);
        loop {
            loop {
                match s.process() {
                    Step::NeedInput => break,
                    // Replies to a long pipeline (UIDL after UIDL…) go out as they
                    // grow, so the socket's backpressure bounds them.
                    Step::Flush => {
                        if self.send(stream, s.output().to_vec()).await.is_err() {
                            return;
                        }
                        s.clear_output();
                    }
                    Step::Close => {
                        let _ = self.send(stream, s.output().to_vec()).await;
                        return;
                    }
                    Step::Authenticate { user, password } => {
                        let r = self.login(&user, &password, peer, held).await;
                        s.login(r);
                    }
                    Step::Retrieve { index, lines } => {
                        let Some(h) = held.as_mut() else { return };
                        let Some(item) = h.opened.items.get(index).copied() else {
                            return;
                        };
                        // The replies before it and its +OK line go out with the text;
                        // they stay in `output()` until some of it went.
                        let head = s.output().to_vec();
                        let reading = self.reading(h, index).await;
                        let sent = match reading {
                            Ok(reading) => {
                                self.retrieve(stream, head, &h.address, item, reading, lines)
                                    .await
                            }
                            Err(e) => Err(e),
                        };
                        match sent {
                            Ok(()) => s.clear_output(),
                            // Nothing went: the +OK becomes -ERR [SYS/TEMP].
                            Err(Failed::Unsent(e)) => {
                                tracing::warn!(uid = item.uid, error = %e, client = %peer, "pop3: cannot read a message, refused it");
                                s.retrieve_failed();
                                continue;
                            }
                            // The client hung up or stopped reading.
                            Err(Failed::Client(e)) => {
                                tracing::debug!(uid = item.uid, error = %e, client = %peer, "pop3: client gone during retrieve");
                                return;
                            }
                            // After +OK there is no way to say it failed but to close.
                            Err(Failed::Store(e)) => {
                                tracing::warn!(uid = item.uid, error = %e, client = %peer, "pop3: retrieve failed");
                                return;
                            }
                        }
                        if lines.is_none() {
                            crate::metrics::count(|c| {
                                c.pop3_messages_retrieved += 1;
                                c.pop3_bytes_retrieved += item.size as u64;
                            });
                        }
                        if lines.is_none() && !h.seen.contains(&item.uid) {
                            h.seen.push(item.uid);
                        }
                        s.retrieved();
                    }
                    Step::Quit { deleted } => {
                        let Some(mut h) = held.take() else { return };
                        // Their pins go before the expunge.
                        h.ahead.clear();
                        let expunge: Vec<u32> = deleted
                            .iter()
                            .filter_map(|i| h.opened.items.get(*i).map(|m| m.uid))
                            .collect();
                        let n = expunge.len();
                        let r =
                            maildrop::close(&self.mail, h.user, h.opened.mailbox, h.seen, expunge)
                                .await;
                        match &r {
                            Ok(()) => {
                                tracing::info!(user = h.user, expunged = n, client = %peer, "pop3 quit")
                            }
                            Err(e) => {
                                tracing::warn!(user = h.user, error = %e, client = %peer, "pop3: update failed")
                            }
                        }
                        s.quit_done(r.is_ok());
                    }
                }
            }
            if !s.output().is_empty() {
                if self.send(stream, s.output().to_vec()).await.is_err() {
                    return;
                }
                s.clear_output();
            }
            // STLS was accepted and its +OK sent: the handshake, before any more input
            // (the core dropped what was pipelined after STLS).
            if s.waiting() == Some(Waiting::StartTls) {
                if !self.start_tls(stream, peer).await {
                    return;
                }
                s.tls_started();
                continue;
            }
            let stop = self.sessions.stop_listener();
            if self.sessions.stopping() {
                return;
            }
            let woke = futures_lite::future::or(
                async {
                    Some(
                        stream
                            .recv(std::mem::take(&mut buf), self.cfg().pop3_idle_timeout)
                            .await,
                    )
                },
                async {
                    stop.await;
                    None
                },
            )
            .await;
            match woke {
                Some((Ok(n), b)) if n > 0 => {
                    s.push(&b[..n]);
                    buf = b;
                }
                // Closed, timed out (RFC 1939's autologout: no UPDATE), failed, or the
                // server is stopping.
                _ => return,
            }
        }
    }

    async fn send(&self, stream: &mut Stream, bytes: Vec<u8>) -> std::io::Result<()> {
        stream
            .send(SendBuf::Owned(bytes), false, self.cfg().idle_timeout)
            .await
    }

    /// Checks the password and locks the maildrop.
    async fn login(
        &self,
        name: &str,
        password: &str,
        peer: SocketAddr,
        held: &mut Option<Held>,
    ) -> Login {
        let checked = crate::accounts::login::login(
            &self.auth,
            &self.directory,
            &self.cfg().local_domains,
            name,
            password,
            peer.ip(),
        )
        .await;
        let address = checked.address;
        let user = match checked.result {
            Ok(u) => u,
            Err(AuthError::Busy | AuthError::RateLimited) => {
                crate::metrics::count(|c| c.pop3_login_failures += 1);
                tracing::warn!(user = %address, client = %peer, "pop3 login refused for now");
                return Login::TempFail;
            }
            Err(AuthError::Failed) => {
                crate::metrics::count(|c| c.pop3_login_failures += 1);
                tracing::info!(user = %address, client = %peer, "pop3 login failed");
                return Login::Failed;
            }
        };
        match maildrop::open(&self.mail, user.id).await {
            Ok(opened) => {
                let list = opened
                    .items
                    .iter()
                    .map(|m| core::Message {
                        size: m.size as u64,
                        uidl: maildrop::uidl(m.uid, opened.uidvalidity),
                    })
                    .collect();
                crate::metrics::count(|c| c.pop3_logins += 1);
                tracing::info!(user = %user.address, messages = opened.items.len(), client = %peer, "pop3 login");
                *held = Some(Held {
                    user: user.id,
                    address: user.address.clone(),
                    opened,
                    seen: Vec::new(),
                    ahead: Default::default(),
                });
                Login::Ok(list)
            }
            Err(OpenError::InUse) => Login::InUse,
            Err(OpenError::Store(e)) => {
                tracing::warn!(user = %user.address, error = %e, "pop3: cannot open the maildrop");
                Login::TempFail
            }
        }
    }

    /// Sends `head` (the replies queued before, with this command's +OK), then the
    /// message (all of it, or its header and `lines` body lines) stuffed and ended.
    /// Message `index` of the maildrop, opened: prefetched, or opened now together
    /// with the next `PREFETCH - 1` not opened yet (concurrently: one round trip to
    /// each owning executor for all of them).
    async fn reading(&self, h: &mut Held, index: usize) -> Result<Reading, Failed> {
        if let Some(r) = h.ahead.remove(&index) {
            return Ok(r);
        }
        let end = (index + PREFETCH).min(h.opened.items.len());
        let opening: Vec<(usize, glommio::task::JoinHandle<_>)> = (index..end)
            .filter(|i| *i == index || !h.ahead.contains_key(i))
            .map(|i| {
                let store = self.store.clone();
                let handle = Handle::of_id(h.opened.items[i].message);
                let task = glommio::spawn_local(async move { store.open(handle).await }).detach();
                (i, task)
            })
            .collect();
        let mut asked = None;
        for (i, task) in opening {
            let opened = task.await;
            if i == index {
                asked = Some(opened);
            } else if let Some(Ok(Some(r))) = opened {
                h.ahead.insert(i, r);
            }
        }
        match asked.flatten() {
            Some(Ok(Some(r))) => Ok(r),
            Some(Ok(None)) => Err(Failed::Store("the message is no longer stored".into())),
            Some(Err(e)) => Err(Failed::store(e)),
            None => Err(Failed::Store("the executor is stopping".into())),
        }
    }

    async fn retrieve(
        &self,
        stream: &mut Stream,
        head: Vec<u8>,
        address: &str,
        item: Item,
        reading: Reading,
        lines: Option<u64>,
    ) -> Result<(), Failed> {
        // A record of up to CACHED_RECORD_BYTES_MAX is read whole, in one read (or
        // none: the record cache), framing, envelope and body together; a larger
        // one's head first and then its body in pieces.
        let r = *reading.resolved();
        let whole = r.len as usize <= CACHED_RECORD_BYTES_MAX;
        let record = if whole {
            reading.record().await
        } else {
            reading.head().await
        }
        .map_err(Failed::unsent)?;
        let (envelope, trace) = record
            .get(RECORD_HEADER_BYTES..r.body_offset as usize)
            .ok_or("short record")
            .and_then(ringmail_store::message::decode_head)
            .map_err(Failed::unsent)?;
        let mut filter = match lines {
            None => Filter::All(Stuffer::new()),
            Some(n) => Filter::Top(Top::new(n)),
        };
        let mut out = head;
        out.reserve(SEND_BYTES.min(item.size as usize + 64));
        let mut more = filter.push(entry_prefix(&envelope.from, address).as_bytes(), &mut out);
        more = more && filter.push(trace, &mut out);
        if whole {
            let body = record
                .get(r.body_offset as usize..(r.body_offset + r.body_len) as usize)
                .ok_or_else(|| Failed::unsent("short record"))?;
            if more {
                filter.push(body, &mut out);
            }
        } else {
            let mut pieces = reading
                .pieces(0..r.body_len as u64, SEND_BYTES)
                .map_err(Failed::unsent)?;
            let mut sent_any = false;
            while more {
                let Some(piece) = pieces.next().await else {
                    break;
                };
                let piece = piece.map_err(|e| match sent_any {
                    false => Failed::unsent(e),
                    true => Failed::store(e),
                })?;
                more = filter.push(&piece, &mut out);
                if out.len() >= SEND_BYTES {
                    let full = std::mem::replace(&mut out, Vec::with_capacity(SEND_BYTES + 64));
                    sent_any = true;
                    stream
                        .send(SendBuf::Owned(full), true, self.cfg().idle_timeout)
                        .await
                        .map_err(Failed::Client)?;
                }
            }
        }
        filter.finish(&mut out);
        self.send(stream, out).await.map_err(Failed::Client)
    }
}

/// A loopback peer, IPv4-mapped ones included: its passwords never cross a network.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

/// Why a RETR or TOP failed.
enum Failed {
    /// The message could not be read and nothing of the reply was sent: the client
    /// gets -ERR [SYS/TEMP] and the session goes on.
    Unsent(String),
    /// The message could not be read after part of it was sent: the server's
    /// trouble, logged as a warning; the connection closes (nothing else tells the
    /// client the text is not whole).
    Store(String),
    /// The send failed: the client went away or stopped reading.
    Client(std::io::Error),
}

impl Failed {
    fn store(e: impl std::fmt::Display) -> Failed {
        Failed::Store(e.to_string())
    }

    fn unsent(e: impl std::fmt::Display) -> Failed {
        Failed::Unsent(e.to_string())
    }
}

/// RETR's whole message or TOP's part of it.
enum Filter {
    All(Stuffer),
    Top(Top),
}

impl Filter {
    /// Whether more input is wanted.
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> bool {
        match self {
            Filter::All(s) => {
                s.push(chunk, out);
                true
            }
            Filter::Top(t) => t.push(chunk, out),
        }
    }

    fn finish(self, out: &mut Vec<u8>) {
        match self {
            Filter::All(s) => s.finish(out),
            Filter::Top(t) => t.finish(out),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_peers_in_either_family() {
        for ip in ["127.0.0.1", "127.0.0.3", "::1", "::ffff:127.0.0.1"] {
            assert!(super::is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1"] {
            assert!(!super::is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }
}
