//! The load generator's I/O: one io_uring per thread drives all of its sessions'
//! sockets (connect, send, receive); the thread only wakes for completions.
//!
//! The driver knows nothing of the protocol: a [`Protocol`] makes a session per
//! connection, is fed what arrives, and says what to send, when to close and whether
//! the slot has more work. Each mode (SMTP, POP3) implements it once; the driver is
//! generic, so every mode gets the same loop, monomorphised.

use io_uring::{opcode, types, IoUring};
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// What a session asks of the driver after being fed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Close the connection (after what is queued has been sent).
    pub close: bool,
    /// This slot has nothing more to do: do not connect again (the session failed).
    pub finished: bool,
}

/// Why a connection ended badly, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnError {
    /// The connect failed (refused, reset).
    Connect,
    /// The server closed before the session was done.
    Closed,
}

/// A mode of the load generator, as the ring driver runs it. Shared by every thread
/// of a run (`Sync`); per-thread figures go to `Stats`.
pub trait Protocol: Sync {
    /// One connection's state.
    type Session;
    /// What one thread measured.
    type Stats: Send;

    fn stats(&self) -> Self::Stats;
    /// Adds one thread's figures to the run's.
    fn merge(into: &mut Self::Stats, from: Self::Stats);
    /// The session for connection number `nth` (0, 1, …) of slot `slot` (a run-wide
    /// index, 0 to sessions - 1), or None when the run has no work left for it.
    fn start(&self, slot: usize, nth: u64, now: Instant) -> Option<Self::Session>;
    /// Feeds received bytes; appends what to send to `send`.
    fn feed(
        &self,
        session: &mut Self::Session,
        data: &[u8],
        now: Instant,
        send: &mut Vec<u8>,
        stats: &mut Self::Stats,
    ) -> Step;
    /// The connection is up: what the client says first (a TLS ClientHello), if
    /// anything, goes into `send`.
    fn connected(&self, _session: &mut Self::Session, _send: &mut Vec<u8>) {}
    /// The session ended as planned: a close by the server is then no error.
    fn is_done(session: &Self::Session) -> bool;
    fn connection_error(&self, stats: &mut Self::Stats, e: ConnError);
    /// The kernel took `bytes` of a send.
    fn sent(&self, _stats: &mut Self::Stats, _bytes: usize) {}
    /// Bytes received from the server.
    fn received(&self, _stats: &mut Self::Stats, _bytes: usize) {}
    /// The receive buffer per connection.
    fn recv_bytes(&self) -> usize {
        16 << 10
    }
}

/// Live counters the progress line reads: `ok` is the mode's unit (messages sent,
/// logins), `items` a second one (messages retrieved).
#[derive(Default)]
pub struct Progress {
    pub ok: AtomicU64,
    pub items: AtomicU64,
    pub errors: AtomicU64,
}

/// Where and how a run's sessions go.
#[derive(Debug, Clone, Copy)]
pub struct Fleet {
    pub target: SocketAddr,
    /// Concurrent sessions (slots), over `threads` threads, each its own ring.
    pub sessions: usize,
    pub threads: usize,
    /// How long a thread polls for completions before it sleeps.
    pub spin: Duration,
    pub deadline: Instant,
}

/// Runs the fleet's sessions until every slot's work is done or the deadline; the
/// merged figures and the time taken. While stderr is a terminal, `line` renders a
/// progress line every 250 ms.
pub fn run<P: Protocol>(
    proto: &P,
    fleet: Fleet,
    progress: &Progress,
    line: impl Fn(&Progress, f64) -> String,
) -> io::Result<(P::Stats, Duration)> {
    use std::io::IsTerminal;
    let Fleet {
        target,
        sessions,
        threads,
        spin,
        deadline,
    } = fleet;
    let start = Instant::now();
    let threads = threads.clamp(1, sessions.max(1));
    let mut total = proto.stats();
    std::thread::scope(|scope| {
        let mut first = 0;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let n = sessions / threads + usize::from(t < sessions % threads);
                let slots = first..first + n;
                first += n;
                scope.spawn(move || run_thread(proto, target, slots, deadline, spin))
            })
            .collect();
        let live = std::io::stderr().is_terminal();
        while live && !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(250));
            eprint!("\r{}", line(progress, start.elapsed().as_secs_f64()));
        }
        if live {
            eprintln!();
        }
        for h in handles {
            let s = h
                .join()
                .map_err(|_| io::Error::other("a load thread panicked"))??;
            P::merge(&mut total, s);
        }
        Ok::<(), io::Error>(())
    })?;
    Ok((total, start.elapsed()))
}

/// user_data: connection index << 24 | generation (22 bits) << 2 | kind.
const GEN_MASK: u64 = (1 << 22) - 1;
/// user_data of requests whose completion nobody waits for (closes).
const IGNORED: u64 = u64::MAX;
const CONNECT: u64 = 0;
const RECV: u64 = 1;
const SEND: u64 = 2;

struct Conn<S> {
    fd: RawFd,
    /// Bumped per connection: completions of an earlier connection are ignored.
    gen: u64,
    /// Connections made on this slot so far.
    made: u64,
    session: Option<S>,
    recv: Vec<u8>,
    /// The bytes of the send in flight: never touched until it completes.
    send: Vec<u8>,
    /// Send buffers of earlier connections whose send was still in flight when the
    /// slot connected again: the kernel may still read them, so they are only freed
    /// once the ring is drained at the end of the run.
    retired: Vec<Vec<u8>>,
    /// Bytes waiting for the send in flight to finish.
    queued: Vec<u8>,
    /// Bytes of `send` the kernel has taken.
    sent: usize,
    sending: bool,
    close_after_send: bool,
    /// The session has nothing more to do (it failed).
    finished: bool,
    addr: Box<libc::sockaddr_in>,
}

/// Runs the sessions of `slots` against `target` until they have no work or `deadline`.
pub fn run_thread<P: Protocol>(
    proto: &P,
    target: SocketAddr,
    slots: std::ops::Range<usize>,
    deadline: Instant,
    spin: Duration,
) -> io::Result<P::Stats> {
    let SocketAddr::V4(v4) = target else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "ringmail-load targets IPv4 addresses",
        ));
    };
    let first = slots.start;
    let sessions = slots.len();
    // COOP_TASKRUN: completions wait for this thread's next kernel entry instead of
    // interrupting it; measured 12k vs 7.7k connections/s without it.
    let mut ring = Ring {
        ring: IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .build(4 * sessions as u32 + 64)?,
        inflight: 0,
    };
    let mut stats = proto.stats();
    let mut conns: Vec<Conn<P::Session>> = (0..sessions)
        .map(|_| Conn {
            fd: -1,
            gen: 0,
            made: 0,
            session: None,
            recv: vec![0; proto.recv_bytes()],
            send: Vec::new(),
            retired: Vec::new(),
            queued: Vec::new(),
            sent: 0,
            sending: false,
            close_after_send: false,
            finished: false,
            addr: Box::new(sockaddr(v4)),
        })
        .collect();
    let mut active = 0;
    let now = Instant::now();
    for (i, c) in conns.iter_mut().enumerate() {
        if let Some(s) = proto.start(first + i, 0, now) {
            connect(&mut ring, c, i, s)?;
            active += 1;
        }
    }
    // Connects the slot again when it has work left and there is time; else retires it.
    let again = |ring: &mut Ring, c: &mut Conn<P::Session>, i: usize, active: &mut usize| {
        let now = Instant::now();
        let next = (!c.finished && now < deadline)
            .then(|| proto.start(first + i, c.made, now))
            .flatten();
        match next {
            Some(s) => connect(ring, c, i, s),
            None => {
                *active -= 1;
                Ok(())
            }
        }
    };
    while active > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let cqes = ring.wait(deadline - now, spin)?;
        let now = Instant::now();
        for (ud, res) in cqes {
            if ud == IGNORED {
                continue;
            }
            let (i, gen, kind) = ((ud >> 24) as usize, (ud >> 2) & GEN_MASK, ud & 3);
            let c = &mut conns[i];
            if gen != c.gen & GEN_MASK {
                continue;
            }
            match kind {
                CONNECT if res < 0 => {
                    proto.connection_error(&mut stats, ConnError::Connect);
                    close_async(&mut ring, c);
                    // Refused or reset: try again while there is work, a little later.
                    std::thread::sleep(Duration::from_millis(1));
                    again(&mut ring, c, i, &mut active)?;
                }
                CONNECT => {
                    let session = c.session.as_mut().expect("a connected slot has a session");
                    proto.connected(session, &mut c.queued);
                    if !c.queued.is_empty() && !c.sending {
                        push_send(&mut ring, c, i);
                    }
                    push_recv(&mut ring, c, i)
                }
                RECV if res <= 0 => {
                    // The server closed: fine once the session is done, an error otherwise.
                    if !c.session.as_ref().is_some_and(P::is_done) {
                        proto.connection_error(&mut stats, ConnError::Closed);
                    }
                    close_async(&mut ring, c);
                    again(&mut ring, c, i, &mut active)?;
                }
                RECV => {
                    proto.received(&mut stats, res as usize);
                    let session = c.session.as_mut().expect("a connected slot has a session");
                    let step = proto.feed(
                        session,
                        &c.recv[..res as usize],
                        now,
                        &mut c.queued,
                        &mut stats,
                    );
                    if step.finished {
                        c.finished = true;
                    }
                    if !c.queued.is_empty() && !c.sending {
                        push_send(&mut ring, c, i);
                    }
                    if step.close {
                        c.close_after_send = true;
                        if !c.sending {
                            // Nothing left to send: close now and maybe start again.
                            close_async(&mut ring, c);
                            again(&mut ring, c, i, &mut active)?;
                        }
                    } else {
                        push_recv(&mut ring, c, i);
                    }
                }
                SEND if res < 0 => {
                    // The receive side sees the broken connection and accounts for it.
                    c.sending = false;
                }
                SEND => {
                    c.sent += res as usize;
                    if c.sent < c.send.len() {
                        resend(&mut ring, c, i);
                    } else if !c.queued.is_empty() {
                        proto.sent(&mut stats, c.sent);
                        push_send(&mut ring, c, i);
                    } else {
                        proto.sent(&mut stats, c.sent);
                        c.sending = false;
                        if c.close_after_send {
                            close_async(&mut ring, c);
                            again(&mut ring, c, i, &mut active)?;
                        }
                    }
                }
                _ => unreachable!("unknown op kind"),
            }
        }
    }
    drain(&mut ring, &mut conns);
    Ok(stats)
}

/// The ring and the number of its requests whose completion has not been taken yet.
struct Ring {
    ring: IoUring,
    inflight: usize,
}

impl Ring {
    /// Waits up to `timeout` for completions (polling for `spin` first) and returns them.
    fn wait(&mut self, timeout: Duration, spin: Duration) -> io::Result<Vec<(u64, i32)>> {
        let cqes = if spin.is_zero() {
            crate::ring::wait(&mut self.ring, timeout)?
        } else {
            crate::ring::wait_spinning(&mut self.ring, timeout, spin)?
        };
        self.inflight -= cqes.len();
        Ok(cqes)
    }
}

/// Ends a run: shuts every open connection down, which completes its receives and
/// sends, and waits for every request to complete before the buffers they point into
/// are freed. (Freeing them with a receive still in flight let a late reply land in
/// freed memory: the heap corruption that aborted runs at a phase deadline.) When the
/// ring will not drain, the buffers are leaked rather than freed under the kernel.
fn drain<S>(ring: &mut Ring, conns: &mut Vec<Conn<S>>) {
    for c in conns.iter_mut() {
        if c.fd >= 0 {
            // SAFETY: shutdown(2) of our own socket.
            unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
        }
        close(c);
    }
    let give_up = Instant::now() + Duration::from_secs(5);
    while ring.inflight > 0 && Instant::now() < give_up {
        if ring
            .wait(Duration::from_millis(100), Duration::ZERO)
            .is_err()
        {
            break;
        }
    }
    if ring.inflight > 0 {
        std::mem::forget(std::mem::take(conns));
    }
}

fn sockaddr(v4: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn close<S>(c: &mut Conn<S>) {
    if c.fd >= 0 {
        // SAFETY: the descriptor is ours; in-flight requests hold their own reference.
        unsafe { libc::close(c.fd) };
        c.fd = -1;
    }
}

/// Closes through the ring: one syscall fewer on the per-connection path, and the
/// close is submitted with the next connect in the same `io_uring_enter`.
fn close_async<S>(ring: &mut Ring, c: &mut Conn<S>) {
    if c.fd >= 0 {
        push(
            ring,
            opcode::Close::new(types::Fd(c.fd))
                .build()
                .user_data(IGNORED),
        );
        c.fd = -1;
    }
}

fn push(ring: &mut Ring, e: io_uring::squeue::Entry) {
    ring.inflight += 1;
    // SAFETY: every pointer in the entry points into a `Conn` buffer that stays put
    // until its completion is processed: `drain` waits for all of them at the end.
    unsafe { crate::ring::push(&mut ring.ring, &e) }
}

fn connect<S>(ring: &mut Ring, c: &mut Conn<S>, i: usize, session: S) -> io::Result<()> {
    // SAFETY: plain socket(2)/setsockopt(2) calls with valid arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // Like smtp-source: close with a reset. At 10k+ connections a second, TIME_WAIT
    // would use up the ephemeral ports within seconds.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a valid struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    c.fd = fd;
    c.gen += 1;
    c.made += 1;
    c.session = Some(session);
    // A send of the previous connection may still be in flight on `send`: leave that
    // buffer to it and start afresh.
    let old = std::mem::take(&mut c.send);
    if c.sending {
        c.retired.push(old);
    }
    c.queued.clear();
    c.sent = 0;
    c.sending = false;
    c.close_after_send = false;
    let addr: *const libc::sockaddr = (&*c.addr as *const libc::sockaddr_in).cast();
    push(
        ring,
        opcode::Connect::new(
            types::Fd(fd),
            addr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
        .build()
        .user_data(ud(i, c, CONNECT)),
    );
    Ok(())
}

fn ud<S>(i: usize, c: &Conn<S>, kind: u64) -> u64 {
    ((i as u64) << 24) | ((c.gen & GEN_MASK) << 2) | kind
}

fn push_recv<S>(ring: &mut Ring, c: &mut Conn<S>, i: usize) {
    push(
        ring,
        opcode::Recv::new(types::Fd(c.fd), c.recv.as_mut_ptr(), c.recv.len() as u32)
            .build()
            .user_data(ud(i, c, RECV)),
    );
}

/// Starts sending what is queued.
fn push_send<S>(ring: &mut Ring, c: &mut Conn<S>, i: usize) {
    std::mem::swap(&mut c.send, &mut c.queued);
    c.queued.clear();
    c.sent = 0;
    resend(ring, c, i);
}

/// Sends the rest of the buffer in flight.
fn resend<S>(ring: &mut Ring, c: &mut Conn<S>, i: usize) {
    c.sending = true;
    let rest = &c.send[c.sent..];
    push(
        ring,
        opcode::Send::new(types::Fd(c.fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(i, c, SEND)),
    );
}
