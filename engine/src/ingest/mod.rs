//! SMTP ingest: the glommio driver around the sans-IO server core (`crate::smtp`).
//!
//! One accept loop per executor on the shared SMTP address (SO_REUSEPORT spreads
//! connections across cores); each connection runs as a task on the executor that
//! accepted it: read, feed the core, write its replies, and make finished messages
//! durable in one of this executor's spools before the core may answer 250.

use crate::accounts::DirectoryCell;
use crate::config::Config;
use crate::net::sessions::{Cap, Sessions};
use crate::net::tls::Stream;
use crate::net::Ring;
use crate::queue::Spool;
use crate::smtp::address::{ascii_address, is_local_domain};
use crate::smtp::received::{received_header, Trace};
use crate::smtp::{self, AuthVerdict, Session, Step, Transaction};
use ringmail_store::message::{self, format_id, Envelope};
use ringmail_store::{BodySource, LogError};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Which SMTP listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Plain SMTP, with STARTTLS.
    Smtp,
    /// SMTP over TLS from the first byte (RFC 8314).
    Smtps,
    /// Message submission (RFC 6409): AUTH before MAIL.
    Submission,
}

/// What the sessions of one executor share.
pub struct Ingest {
    /// Replaced whole by a reload (`reload`): a session keeps what it started with.
    cfg: RefCell<Rc<Config>>,
    smtp: RefCell<Rc<smtp::Config>>,
    /// The same on the submission listener.
    submission: RefCell<Rc<smtp::Config>>,
    pub spools: Vec<Rc<Spool>>,
    ring: Rc<Ring>,
    next_spool: Cell<usize>,
    sessions: Rc<Sessions>,
    /// The account directory's RCPT check for local domains (none: all accepted).
    recipients: Option<Rc<dyn smtp::LocalRecipients>>,
    /// The account directory, to expand aliases as a message is queued.
    directory: Option<Arc<DirectoryCell>>,
    /// Certificates for STARTTLS and the implicit-TLS listener.
    tls: Arc<crate::net::certs::ServerTls>,
    /// The one password check (SMTP AUTH).
    auth: Arc<crate::auth::Authenticator>,
    /// DKIM keys for mail from authenticated sessions and relay networks.
    signers: Arc<crate::mailauth::Signers>,
    /// SPF/DKIM/DMARC/ARC for mail from elsewhere (none: `verify = false`).
    verifier: Option<Arc<crate::mailauth::Verifier>>,
}

impl Ingest {
    /// The settings now (a reload replaces them).
    pub fn cfg(&self) -> Rc<Config> {
        self.cfg.borrow().clone()
    }

    /// New settings (SIGHUP, `reload`): sessions that start from now on use them.
    pub fn reload(&self, cfg: Rc<Config>) {
        *self.smtp.borrow_mut() = Rc::new(cfg.smtp_config());
        *self.submission.borrow_mut() = Rc::new(cfg.submission_config());
        *self.cfg.borrow_mut() = cfg;
    }

    /// Local recipients are checked against the account directory at RCPT and
    /// queued as the users they lead to (aliases expanded); without a directory
    /// every recipient of a local domain is accepted as it is.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Rc<Config>,
        spools: Vec<Rc<Spool>>,
        ring: Rc<Ring>,
        directory: Option<Arc<DirectoryCell>>,
        tls: Arc<crate::net::certs::ServerTls>,
        auth: Arc<crate::auth::Authenticator>,
        signers: Arc<crate::mailauth::Signers>,
        verifier: Option<Arc<crate::mailauth::Verifier>>,
    ) -> Rc<Ingest> {
        let recipients = directory.clone().map(|cell| {
            Rc::new(crate::accounts::RcptCheck { cell }) as Rc<dyn smtp::LocalRecipients>
        });
        assert!(!spools.is_empty(), "an executor serves at least one shard");
        Rc::new(Ingest {
            ring,
            smtp: RefCell::new(Rc::new(cfg.smtp_config())),
            submission: RefCell::new(Rc::new(cfg.submission_config())),
            cfg: RefCell::new(cfg),
            spools,
            next_spool: Cell::new(0),
            sessions: Sessions::new(),
            recipients,
            directory,
            tls,
            auth,
            signers,
            verifier,
        })
    }

    /// Begins shutdown: stop accepting, ask idle sessions to leave.
    pub fn begin_shutdown(&self) {
        self.sessions.begin_shutdown();
    }

    /// Waits until every session ended, or the grace period passed.
    pub async fn drained(&self, grace: Duration) {
        self.sessions.drained(grace, "smtp").await;
    }

    /// Accepts connections until shutdown.
    /// On `Service::Smtps` the TLS handshake comes before the greeting.
    pub async fn accept_loop(self: Rc<Self>, listener: OwnedFd, service: Service) {
        let cap = Cap {
            sessions_max: {
                let me = self.clone();
                Box::new(move || me.cfg().connections_per_shard_max)
            },
            refusal: b"421 4.7.0 Error: too many connections, try again later\r\n",
            send_timeout: self.cfg().idle_timeout,
            service: match service {
                Service::Smtp => crate::metrics::Service::Smtp,
                Service::Smtps => crate::metrics::Service::Smtps,
                Service::Submission => crate::metrics::Service::Submission,
            },
        };
        let me = self.clone();
        self.sessions
            .clone()
            .accept_loop(self.ring.clone(), listener, cap, move |fd, peer| {
                let me = me.clone();
                async move { me.session(&fd, peer, service).await }
            })
            .await;
    }

    async fn session(self: &Rc<Self>, fd: &OwnedFd, peer: SocketAddr, service: Service) {
        let mut stream = Stream::plain(self.ring.clone(), fd.as_raw_fd());
        if service == Service::Smtps && !self.start_tls(&mut stream, peer).await {
            return;
        }
        let cfg = match service {
            Service::Submission => self.submission.borrow().clone(),
            Service::Smtp | Service::Smtps => self.smtp.borrow().clone(),
        };
        self.converse(&mut stream, peer, cfg).await;
        stream.close().await;
    }

    /// Runs the TLS handshake; false: it failed (logged), the connection is done.
    async fn start_tls(&self, stream: &mut Stream, peer: SocketAddr) -> bool {
        match stream
            .start_tls(self.tls.config(), self.cfg().idle_timeout)
            .await
        {
            Ok(()) => {
                tracing::debug!(client = %peer, tls = stream.tls_description().unwrap_or_default(), "smtp: TLS started");
                true
            }
            Err(e) => {
                tracing::info!(client = %peer, error = %e, "smtp: TLS handshake failed");
                false
            }
        }
    }

    async fn converse(
        self: &Rc<Self>,
        stream: &mut Stream,
        peer: SocketAddr,
        cfg: Rc<smtp::Config>,
    ) {
        let mut s = Session::new(cfg, self.cfg().relay_allowed(peer.ip()));
        if stream.is_tls() {
            s.set_tls();
        }
        if let Some(r) = &self.recipients {
            s.set_local_recipients(r.clone());
        }
        let mut copied = 0;
        loop {
            // Run the core over what was received; store finished messages in order.
            loop {
                match s.process() {
                    Step::NeedInput => break,
                    Step::Close => {
                        note_refused(&mut s, peer);
                        let _ = stream.send_all(s.output(), self.cfg().idle_timeout).await;
                        return;
                    }
                    Step::Authenticate { user, password } => {
                        let verdict = self.authenticate(&user, &password, peer).await;
                        s.auth_done(verdict);
                    }
                    Step::StartTls => {
                        // The 220 goes out in plaintext, then the handshake.
                        if stream
                            .send_all(s.output(), self.cfg().idle_timeout)
                            .await
                            .is_err()
                        {
                            return;
                        }
                        s.clear_output();
                        if !self.start_tls(stream, peer).await {
                            return;
                        }
                        s.tls_started();
                    }
                    // `store` drops the body once it is in the log's buffer: the session
                    // then receives on into the chunk the body ended in.
                    Step::Message(tx) => match self.verify_and_store(*tx, peer).await {
                        Ok(Ok(id)) => s.message_stored(&id),
                        Ok(Err(refusal)) => {
                            // Refused by the verification's policy (logged there).
                            let why = match refusal.starts_with("451 4.7.5") {
                                true => crate::metrics::Reject::DnsTempfail,
                                false => crate::metrics::Reject::Dmarc,
                            };
                            crate::metrics::message_rejected(why);
                            s.message_failed(&refusal)
                        }
                        Err(e) => {
                            // Logged by `store` (`not queued`).
                            crate::metrics::message_rejected(crate::metrics::Reject::Storage);
                            s.message_failed(match e {
                                LogError::NoSpace => {
                                    "452 4.3.1 Error: insufficient system storage\r\n"
                                }
                                LogError::Io(_) | LogError::Closed => {
                                    "451 4.3.0 Error: queue file write error\r\n"
                                }
                            })
                        }
                    },
                }
            }
            note_refused(&mut s, peer);
            if s.copied_bytes() > copied {
                ringmail_store::stats::add_session_copy(s.copied_bytes() - copied);
                copied = s.copied_bytes();
            }
            if !s.output().is_empty() {
                if stream
                    .send_all(s.output(), self.cfg().idle_timeout)
                    .await
                    .is_err()
                {
                    return;
                }
                s.clear_output();
            }
            // A session in the middle of a message may finish it during shutdown
            // (bounded by the grace period); one between commands leaves at once.
            let stoppable = !s.in_message();
            if stoppable && self.sessions.stopping() {
                s.shutdown();
                continue;
            }
            let stop = self.sessions.stop_listener();
            // The kernel receives straight into the session's buffer: the one copy
            // of a body in user space is the store's, later.
            let (buf, at) = s.lend_read_buf();
            let woke = futures_lite::future::or(
                async { Some(stream.recv_at(buf, at, self.cfg().idle_timeout).await) },
                async {
                    if !stoppable {
                        std::future::pending::<()>().await;
                    }
                    stop.await;
                    None
                },
            )
            .await;
            match woke {
                Some((Ok(0), _)) => return,
                Some((Ok(n), b)) => s.received(b, n),
                Some((Err(e), b)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    s.received(b, 0);
                    s.idle_timeout();
                }
                Some((Err(_), _)) => return,
                // The buffer went with the cancelled receive; the session closes.
                None => s.shutdown(),
            }
        }
    }

    /// SMTP AUTH through the one password check.
    async fn authenticate(&self, name: &str, password: &str, peer: SocketAddr) -> AuthVerdict {
        use crate::auth::AuthError;
        let Some(directory) = &self.directory else {
            return AuthVerdict::Failed;
        };
        let checked = crate::accounts::login::login(
            &self.auth,
            directory,
            &self.cfg().local_domains,
            name,
            password,
            peer.ip(),
        )
        .await;
        match checked.result {
            Ok(u) => {
                crate::metrics::count(|c| c.smtp_auth_logins += 1);
                tracing::info!(user = %u.address, client = %peer, "smtp auth");
                AuthVerdict::Ok(u.address.clone())
            }
            Err(AuthError::Failed) => {
                crate::metrics::count(|c| c.smtp_auth_failures += 1);
                tracing::info!(user = %checked.address, client = %peer, "smtp auth failed");
                AuthVerdict::Failed
            }
            Err(AuthError::Busy | AuthError::RateLimited) => {
                crate::metrics::count(|c| c.smtp_auth_failures += 1);
                tracing::warn!(user = %checked.address, client = %peer, "smtp auth refused for now");
                AuthVerdict::TempFail
            }
        }
    }

    /// Verifies mail from outside (SPF, DKIM, DMARC, ARC), refuses it where the
    /// policy says so (`Ok(Err(reply))`), else stores it with its results.
    async fn verify_and_store(
        &self,
        mut tx: Transaction,
        peer: SocketAddr,
    ) -> Result<Result<String, String>, LogError> {
        use crate::mailauth::verify::{DmarcPolicy, DnsTempError};
        let ours = tx.auth.is_some() || self.cfg().relay_allowed(peer.ip());
        let verifier = self.verifier.as_ref().filter(|_| !ours);
        let mut verdict = None;
        if let Some(v) = verifier {
            // The verifiers' copy of the text; with a forged result renamed, it is also
            // what is stored.
            let mut text = tx.body.to_vec();
            if let Some(renamed) = crate::mailauth::forged::rename(&text, &self.cfg().hostname) {
                tracing::info!(client = %peer, "renamed a forged Authentication-Results field");
                tx.body = crate::smtp::Body::from(renamed.clone());
                text = renamed;
            }
            // Forwarded on (an alias to a remote address): sealed for the next hop.
            let forwarding = self.forwards(&tx);
            let found = v
                .verify(text, peer.ip(), &tx.helo, &tx.from, forwarding)
                .await;
            let policy = self.cfg().mail_auth;
            let refuse = |reply: String| {
                tracing::info!(client = %peer, from = %tx.from, spf = %found.spf, dkim = %found.dkim, dmarc = %found.dmarc, arc = %found.arc, reply = %reply.trim_end(), "refused");
                Ok(Err(reply))
            };
            if policy.dmarc_policy == DmarcPolicy::Enforce && found.dmarc_reject {
                return refuse(format!(
                    "550 5.7.1 Email rejected per DMARC policy for {}\r\n",
                    found.dmarc_domain
                ));
            }
            if policy.dns_temperror == DnsTempError::Tempfail && found.temperror {
                return refuse(
                    "451 4.7.5 Temporary DNS failure verifying the message; try again later\r\n"
                        .into(),
                );
            }
            verdict = Some(found);
        }
        self.store(tx, peer, verdict).await.map(Ok)
    }

    /// Whether a local recipient of `tx` leads to a remote address (an alias).
    fn forwards(&self, tx: &Transaction) -> bool {
        let Some(cell) = &self.directory else {
            return false;
        };
        let local = &self.cfg().local_domains;
        let rcpts: Vec<message::Recipient> = tx
            .recipients
            .iter()
            .map(|r| message::Recipient {
                address: r.address.clone(),
                notify: 0,
                orcpt: None,
            })
            .collect();
        crate::delivery::local::expand_recipients(rcpts, &cell.load(), |d| {
            is_local_domain(local, d)
        })
        .iter()
        .any(|r| {
            let domain = r.address.rsplit_once('@').map_or("", |(_, d)| d);
            !is_local_domain(local, domain)
        })
    }

    /// Makes a finished message durable in one of this executor's spools; returns its id.
    async fn store(
        &self,
        tx: Transaction,
        peer: SocketAddr,
        verdict: Option<crate::mailauth::Verdict>,
    ) -> Result<String, LogError> {
        let i = self.next_spool.get();
        self.next_spool.set((i + 1) % self.spools.len());
        let spool = &self.spools[i];
        let id = spool.next_id().await?;
        let id_text = format_id(id);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let date = chrono::Utc::now().to_rfc2822();
        let single = match tx.recipients.as_slice() {
            // The A-label form: an SMTPUTF8 message whose only UTF-8 is in domains
            // may go on as ASCII, and this header with it.
            [one] => Some(ascii_address(&one.address).unwrap_or_else(|| one.address.clone())),
            _ => None,
        };
        let prefix = received_header(&Trace {
            helo: &tx.helo,
            peer: peer.ip(),
            hostname: &self.cfg().hostname,
            protocol: tx.protocol,
            id: &id_text,
            single_rcpt: single.as_deref(),
            authenticated: tx.auth.as_deref(),
            date: &date,
        });
        let auth = tx.auth.clone().unwrap_or_default();
        // RFC 6409 §8.2, §8.3: submitted mail gets the fields it lacks, as prefixes
        // (the body is not rewritten).
        let mut prefix = prefix;
        // The verification results go above our Received: (RFC 8601 §5).
        let skipped = crate::mailauth::Verdict::SKIPPED;
        let (mut spf, mut dkim_found, mut dmarc, mut arc) = (skipped, skipped, skipped, skipped);
        if let Some(v) = &verdict {
            // The ARC set above the results it carries (RFC 8617 §4.1).
            let mut head = v.arc_set.clone() + &v.header;
            if v.dmarc_quarantine
                && self.cfg().mail_auth.dmarc_policy
                    == crate::mailauth::verify::DmarcPolicy::Enforce
            {
                head.push_str(&format!(
                    "X-Ringmail-Quarantine: DMARC policy quarantine of {}\r\n",
                    v.dmarc_domain
                ));
            }
            prefix.insert_str(0, &head);
            (spf, dkim_found, dmarc, arc) = (v.spf, v.dkim, v.dmarc, v.arc);
        }
        if tx.submission && !tx.headers.date {
            prefix.push_str(&format!("Date: {date}\r\n"));
        }
        if tx.submission && !tx.headers.message_id {
            let ms = now.as_millis();
            prefix.push_str(&format!(
                "Message-ID: <{id_text}.{ms}@{}>\r\n",
                self.cfg().hostname
            ));
        }
        // Our own users' mail is signed for its From: domain (the signature a
        // prefix too, over the prefixes above and the body as received).
        let mut dkim_sign = String::from("none");
        if tx.auth.is_some() || self.cfg().relay_allowed(peer.ip()) {
            // An authenticated user signs only as itself or its aliases (as its MAIL
            // FROM is held to them): a key must not vouch for another user's From:.
            let may_sign = |from: &str| match (&tx.auth, &self.recipients) {
                (Some(user), Some(r)) if self.cfg().sender_login_match => r.may_send_as(user, from),
                _ => true,
            };
            match self.signers.sign(prefix.as_bytes(), &tx.body, &may_sign) {
                Some(Ok(signed)) => {
                    prefix.insert_str(0, &signed.header);
                    dkim_sign = format!("{}/{}", signed.domain, signed.selector);
                }
                // Sent unsigned rather than refused: the key loaded at start, so
                // this is a message mail-auth cannot sign (none seen so far).
                Some(Err(e)) => tracing::warn!(id = %id_text, "{e}"),
                None => {}
            }
        }
        let size = tx.body.len();
        let nrcpt = tx.recipients.len();
        ringmail_store::stats::add_session_copy(tx.body.copied_bytes());
        let (mut env, body) = envelope(tx, id, now.as_millis() as u64, peer);
        if let Some(cell) = &self.directory {
            let local = &self.cfg().local_domains;
            // `<Postmaster>` has no domain: it is postmaster of the first local one.
            for r in &mut env.recipients {
                if !r.address.contains('@') {
                    r.address = crate::accounts::delivery_address(&r.address, local);
                }
            }
            env.recipients = crate::delivery::local::expand_recipients(
                std::mem::take(&mut env.recipients),
                &cell.load(),
                |d| is_local_domain(local, d),
            );
        }
        let from = env.from.clone();
        match spool.enqueue(env, prefix.as_bytes(), body).await {
            Ok(()) => {
                crate::metrics::count(|c| {
                    c.messages_received += 1;
                    c.bytes_in += size as u64;
                });
                tracing::info!(id = %id_text, from = %from, size, nrcpt, client = %peer, sasl_username = %auth, dkim_sign = %dkim_sign, spf = %spf, dkim = %dkim_found, dmarc = %dmarc, arc = %arc, "queued");
                Ok(id_text)
            }
            Err(e) => {
                tracing::error!(id = %id_text, from = %from, size, client = %peer, error = %e, "not queued");
                Err(e)
            }
        }
    }
}

/// Logs and counts what the session refused since the last look: one line per
/// refused message or recipient, with the reason and the reply.
fn note_refused(s: &mut Session, peer: SocketAddr) {
    for r in s.take_refused() {
        match &r.rcpt {
            Some(to) => {
                crate::metrics::recipient_rejected(r.why);
                tracing::info!(client = %peer, to = %format!("<{to}>"), reason = r.why.as_str(), reply = %r.reply, "recipient refused");
            }
            None => {
                crate::metrics::message_rejected(r.why);
                tracing::info!(client = %peer, reason = r.why.as_str(), reply = %r.reply, "message refused");
            }
        }
    }
}

/// The store's envelope of a finished transaction (the SMTP core has types of its
/// own), and its body.
pub fn envelope(
    tx: Transaction,
    id: u64,
    received_at_ms: u64,
    peer: SocketAddr,
) -> (Envelope, smtp::Body) {
    let env = Envelope {
        id,
        received_at_ms,
        from: tx.from,
        recipients: tx
            .recipients
            .into_iter()
            .map(|r| message::Recipient {
                address: r.address,
                notify: notify_bits(r.notify),
                orcpt: r.orcpt,
            })
            .collect(),
        body_type: match tx.body_type {
            smtp::BodyType::Unspecified => message::BodyType::Unspecified,
            smtp::BodyType::SevenBit => message::BodyType::SevenBit,
            smtp::BodyType::EightBitMime => message::BodyType::EightBitMime,
            smtp::BodyType::BinaryMime => message::BodyType::BinaryMime,
        },
        smtputf8: tx.smtputf8,
        ret: match tx.ret {
            smtp::Ret::Unspecified => message::Ret::Unspecified,
            smtp::Ret::Full => message::Ret::Full,
            smtp::Ret::Hdrs => message::Ret::Hdrs,
        },
        envid: tx.envid,
        helo: tx.helo,
        peer: peer.ip().to_string(),
    };
    (env, tx.body)
}

fn notify_bits(core: u8) -> u8 {
    use message::notify as store;
    use smtp::notify as smtp;
    [
        (smtp::NEVER, store::NEVER),
        (smtp::SUCCESS, store::SUCCESS),
        (smtp::FAILURE, store::FAILURE),
        (smtp::DELAY, store::DELAY),
    ]
    .into_iter()
    .filter(|(bit, _)| core & bit != 0)
    .fold(0, |bits, (_, b)| bits | b)
}

/// The store copies a body from where the session received it.
impl BodySource for smtp::Body {
    fn len(&self) -> usize {
        smtp::Body::len(self)
    }
    fn pieces(&self, f: &mut dyn FnMut(&[u8])) {
        smtp::Body::pieces(self, |p| {
            f(p);
            true
        })
    }
}

/// Binds the SMTP listener of one executor. Every executor binds the same address with
/// SO_REUSEPORT so the kernel spreads connections across cores; SO_REUSEADDR lets a
/// restarted server bind while old connections linger in TIME_WAIT.
pub fn listen(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it: replies go out at once, without a syscall each.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    // A deep backlog absorbs connection bursts of one-message-per-connection senders.
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Binds `n` listeners on `addr` (SO_REUSEPORT: the kernel spreads connections over
/// them) and returns the address they share. Port 0 is resolved once, by the first
/// listener, and the others bind to the port it got: binding each to port 0 would give
/// every executor a port of its own, and clients would reach only one of them.
pub fn listen_all(addr: SocketAddr, n: usize) -> std::io::Result<(SocketAddr, Vec<OwnedFd>)> {
    let first = listen(addr)?;
    let bound = socket2::SockRef::from(&first)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("listener without an IP address"))?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(listen(bound)?);
    }
    Ok((bound, all))
}

/// Fails when another socket listens on `addr`. Our own listeners use SO_REUSEPORT, which
/// would silently share the port with another server that set it too; this probe does
/// not set it, so any listener makes it fail, while TIME_WAIT leftovers do not.
pub fn check_port_free(addr: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

#[cfg(test)]
mod copies;
