//! SMTP ingest: the glommio driver around the sans-IO server core (`crate::smtp`).
//!
//! One accept loop per executor on the shared SMTP address (SO_REUSEPORT spreads
//! connections across cores); each connection runs as a task on the executor that
//! accepted it: read, feed the core, write its replies, and make finished messages
//! durable in one of this executor's spools before the core may answer 250.

use crate::config::Config;
use crate::queue::Spool;
use crate::smtp::{self, received::received_header, Session, Step, Transaction};
use event_listener::Event;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use ringmail_store::message::{format_id, Envelope};
use ringmail_store::LogError;
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the sessions of one executor share.
pub struct Ingest {
    pub cfg: Rc<Config>,
    pub smtp: Rc<smtp::Config>,
    pub spools: Vec<Rc<Spool>>,
    next_spool: Cell<usize>,
    active: Cell<usize>,
    /// Set once shutdown began; `stop` wakes everything that waits.
    stopping: Cell<bool>,
    stop: Event,
    idle: Event,
}

impl Ingest {
    pub fn new(cfg: Rc<Config>, spools: Vec<Rc<Spool>>) -> Rc<Ingest> {
        assert!(!spools.is_empty(), "an executor serves at least one shard");
        Rc::new(Ingest {
            smtp: Rc::new(cfg.smtp_config()),
            cfg,
            spools,
            next_spool: Cell::new(0),
            active: Cell::new(0),
            stopping: Cell::new(false),
            stop: Event::new(),
            idle: Event::new(),
        })
    }

    /// Begins shutdown: stop accepting, ask idle sessions to leave.
    pub fn begin_shutdown(&self) {
        self.stopping.set(true);
        self.stop.notify(usize::MAX);
    }

    /// Waits until every session ended, or the grace period passed.
    pub async fn drained(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.active.get() > 0 {
            let listener = self.idle.listen();
            if self.active.get() == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    sessions = self.active.get(),
                    "shutdown grace over, closing open sessions"
                );
                break;
            }
            futures_lite::future::or(listener, async {
                glommio::timer::sleep(left).await;
            })
            .await;
        }
    }

    /// Accepts connections until shutdown.
    pub async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        loop {
            let stop = self.stop.listen();
            if self.stopping.get() {
                return;
            }
            let accepted =
                futures_lite::future::or(async { Some(listener.accept().await) }, async {
                    stop.await;
                    None
                })
                .await;
            let stream = match accepted {
                None => return,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let me = self.clone();
            glommio::spawn_local(async move {
                me.active.set(me.active.get() + 1);
                if me.active.get() > me.cfg.connections_per_shard_max {
                    let mut stream = stream;
                    let _ = stream
                        .write_all(b"421 4.7.0 Error: too many connections, try again later\r\n")
                        .await;
                    let _ = stream.close().await;
                } else {
                    me.session(stream).await;
                }
                me.active.set(me.active.get() - 1);
                if me.active.get() == 0 {
                    me.idle.notify(usize::MAX);
                }
            })
            .detach();
        }
    }

    async fn session(self: &Rc<Self>, mut stream: TcpStream) {
        let Ok(peer) = stream.peer_addr() else { return };
        let _ = stream.set_nodelay(true);
        let mut s = Session::new(self.smtp.clone(), self.cfg.relay_allowed(peer.ip()));
        loop {
            // Run the core over what was received; store finished messages in order.
            loop {
                match s.process() {
                    Step::NeedInput => break,
                    Step::Close => {
                        let _ = stream.write_all(s.output()).await;
                        let _ = stream.close().await;
                        return;
                    }
                    Step::Message(tx) => match self.store(*tx, peer).await {
                        Ok(id) => s.message_stored(&id),
                        Err(e) => s.message_failed(match e {
                            LogError::NoSpace => "452 4.3.1 Error: insufficient system storage\r\n",
                            LogError::Io(_) | LogError::Closed => {
                                "451 4.3.0 Error: queue file write error\r\n"
                            }
                        }),
                    },
                }
            }
            if !s.output().is_empty() {
                if stream.write_all(s.output()).await.is_err() {
                    return;
                }
                s.clear_output();
            }
            match self.read(&mut stream, &mut s).await {
                Read::Data => {}
                Read::Closed => return,
                Read::Timeout => s.idle_timeout(),
                Read::Shutdown => s.shutdown(),
            }
        }
    }

    async fn read(&self, stream: &mut TcpStream, s: &mut Session) -> Read {
        // A session in the middle of a message may finish it during shutdown (bounded
        // by the grace period); one between commands is asked to leave at once.
        let stoppable = !s.in_message();
        if stoppable && self.stopping.get() {
            return Read::Shutdown;
        }
        let stop = self.stop.listen();
        let idle = self.cfg.idle_timeout;
        let buf = s.read_buf();
        let woke = futures_lite::future::or(
            async { Wake::Read(stream.read(buf).await) },
            futures_lite::future::or(
                async {
                    glommio::timer::sleep(idle).await;
                    Wake::Timeout
                },
                async {
                    if !stoppable {
                        std::future::pending::<()>().await;
                    }
                    stop.await;
                    Wake::Stop
                },
            ),
        )
        .await;
        match woke {
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => Read::Closed,
            Wake::Read(Ok(n)) => {
                s.filled(n);
                Read::Data
            }
            Wake::Timeout => Read::Timeout,
            Wake::Stop => Read::Shutdown,
        }
    }

    /// Makes a finished message durable in one of this executor's spools; returns its id.
    async fn store(&self, tx: Transaction, peer: SocketAddr) -> Result<String, LogError> {
        let i = self.next_spool.get();
        self.next_spool.set((i + 1) % self.spools.len());
        let spool = &self.spools[i];
        let id = spool.next_id();
        let id_text = format_id(id);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let date = chrono::Utc::now().to_rfc2822();
        let single = match tx.recipients.as_slice() {
            [one] => Some(one.address.as_str()),
            _ => None,
        };
        let prefix = received_header(
            &tx.helo,
            peer.ip(),
            &self.cfg.hostname,
            tx.protocol,
            &id_text,
            single,
            &date,
        );
        let size = tx.body.len();
        let nrcpt = tx.recipients.len();
        let env = Envelope {
            id,
            received_at_ms: now.as_millis() as u64,
            from: tx.from,
            recipients: tx.recipients,
            body_type: tx.body_type,
            smtputf8: tx.smtputf8,
            ret: tx.ret,
            envid: tx.envid,
            helo: tx.helo,
            peer: peer.ip().to_string(),
        };
        let from = env.from.clone();
        match spool.enqueue(env, prefix.as_bytes(), &tx.body).await {
            Ok(()) => {
                tracing::info!(id = %id_text, from = %from, size, nrcpt, client = %peer, "queued");
                Ok(id_text)
            }
            Err(e) => {
                tracing::error!(id = %id_text, from = %from, size, client = %peer, error = %e, "not queued");
                Err(e)
            }
        }
    }
}

/// Binds the SMTP listener of one executor. Every executor binds the same address with
/// SO_REUSEPORT so the kernel spreads connections across cores; SO_REUSEADDR lets a
/// restarted server bind while old connections linger in TIME_WAIT.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    // A deep backlog absorbs connection bursts of one-message-per-connection senders.
    socket.listen(4096)?;
    // SAFETY: the descriptor is a bound, listening TCP socket that we own.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
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

enum Wake {
    Read(std::io::Result<usize>),
    Timeout,
    Stop,
}

enum Read {
    Data,
    Closed,
    Timeout,
    Shutdown,
}
