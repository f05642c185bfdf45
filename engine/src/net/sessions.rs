//! One listener's sessions on one executor: the accept loop, the connection cap, and
//! an orderly shutdown (stop accepting, ask sessions to leave, wait for them within a
//! grace period). SMTP ingest and POP3 share it; each brings its own session task.

use super::Ring;
use event_listener::{Event, EventListener};
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Sessions {
    active: Cell<usize>,
    /// Set once shutdown began; `stop` wakes everything that waits.
    stopping: Cell<bool>,
    stop: Event,
    idle: Event,
}

/// What the accept loop does with a connection over the cap: this line, then close.
pub struct Cap {
    /// Asked at each connection (a reload may change it).
    pub sessions_max: Box<dyn Fn() -> usize>,
    pub refusal: &'static [u8],
    /// How long the refusal may take to send.
    pub send_timeout: Duration,
    /// The listener, for the metrics and the log.
    pub service: crate::metrics::Service,
}

impl Sessions {
    pub fn new() -> Rc<Sessions> {
        Rc::default()
    }

    /// Begins shutdown: stop accepting, ask idle sessions to leave.
    pub fn begin_shutdown(&self) {
        self.stopping.set(true);
        self.stop.notify(usize::MAX);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Fires at shutdown. Take it before checking [`Sessions::stopping`], so a
    /// shutdown between the two is not missed.
    pub fn stop_listener(&self) -> EventListener {
        self.stop.listen()
    }

    pub fn active(&self) -> usize {
        self.active.get()
    }

    /// Waits until every session ended, or the grace period passed.
    pub async fn drained(&self, grace: Duration, what: &str) {
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
                    protocol = what,
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

    /// Accepts connections on `listener` until shutdown; each runs `serve` as a
    /// task of its own on this executor.
    pub async fn accept_loop<F, Fut>(
        self: Rc<Self>,
        ring: Rc<Ring>,
        listener: OwnedFd,
        cap: Cap,
        serve: F,
    ) where
        F: Fn(Rc<OwnedFd>, SocketAddr) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let serve = Rc::new(serve);
        let cap = Rc::new(cap);
        loop {
            let stop = self.stop.listen();
            if self.stopping.get() {
                return;
            }
            let accepted = futures_lite::future::or(
                async { Some(ring.accept(listener.as_raw_fd()).await) },
                async {
                    stop.await;
                    None
                },
            )
            .await;
            let (fd, peer) = match accepted {
                None => return,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let (me, ring, serve, cap) = (self.clone(), ring.clone(), serve.clone(), cap.clone());
            glommio::spawn_local(async move {
                let fd = Rc::new(fd);
                me.active.set(me.active.get() + 1);
                let limit = (cap.sessions_max)();
                if me.active.get() > limit {
                    crate::metrics::connection_refused(cap.service);
                    tracing::warn!(service = crate::metrics::SERVICES[cap.service as usize], %peer, limit, "connection refused: too many connections");
                    let _ = ring
                        .send_all(fd.as_raw_fd(), cap.refusal, cap.send_timeout)
                        .await;
                } else {
                    crate::metrics::connection_opened(cap.service);
                    serve(fd, peer).await;
                    crate::metrics::connection_closed(cap.service);
                }
                me.active.set(me.active.get() - 1);
                if me.active.get() == 0 {
                    me.idle.notify(usize::MAX);
                }
            })
            .detach();
        }
    }
}
