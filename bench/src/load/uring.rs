//! The load generator's I/O: one io_uring per thread drives all of its sessions'
//! sockets (connect, send, receive); the thread only wakes for completions.

use super::session::{Budget, Plan, Session};
use hdrhistogram::Histogram;
use io_uring::{opcode, types, IoUring};
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The run's message budget, shared by every thread.
pub struct SharedBudget {
    next: AtomicU64,
    total: u64,
    size_min: usize,
    size_max: usize,
}

impl SharedBudget {
    pub fn new(total: u64, size_min: usize, size_max: usize) -> SharedBudget {
        assert!(size_min <= size_max);
        SharedBudget {
            next: AtomicU64::new(0),
            total,
            size_min,
            size_max,
        }
    }

    /// The size of message `seq`: a fixed hash of it mapped onto the size range.
    pub fn size_of(&self, seq: u64) -> usize {
        let span = (self.size_max - self.size_min + 1) as u64;
        let h = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        self.size_min + (h % span) as usize
    }

    fn remaining(&self) -> bool {
        self.next.load(Ordering::Relaxed) < self.total
    }
}

impl Budget for &SharedBudget {
    fn next(&mut self) -> Option<(u64, usize)> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        (seq < self.total).then(|| (seq, self.size_of(seq)))
    }
}

/// Live counters the progress line reads.
#[derive(Default)]
pub struct Progress {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
}

/// What one thread measured.
pub struct Stats {
    pub ok: u64,
    pub errors: u64,
    pub bytes: u64,
    pub codes: BTreeMap<u16, u64>,
    /// Transaction latency, microseconds.
    pub latency_us: Histogram<u64>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            ok: 0,
            errors: 0,
            bytes: 0,
            codes: BTreeMap::new(),
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        }
    }

    pub fn merge(&mut self, o: &Stats) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.bytes += o.bytes;
        for (c, n) in &o.codes {
            *self.codes.entry(*c).or_default() += n;
        }
        self.latency_us
            .add(&o.latency_us)
            .expect("same histogram bounds");
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

const RECV_BYTES: usize = 16 << 10;
/// user_data: connection index << 24 | generation (22 bits) << 2 | kind.
const GEN_MASK: u64 = (1 << 22) - 1;
/// user_data of requests whose completion nobody waits for (closes).
const IGNORED: u64 = u64::MAX;
const CONNECT: u64 = 0;
const RECV: u64 = 1;
const SEND: u64 = 2;

struct Conn {
    fd: RawFd,
    /// Bumped per connection: completions of an earlier connection are ignored.
    gen: u64,
    session: Session,
    recv: Vec<u8>,
    /// The bytes of the send in flight: never touched until it completes.
    send: Vec<u8>,
    /// Bytes waiting for the send in flight to finish.
    queued: Vec<u8>,
    /// Bytes of `send` the kernel has taken.
    sent: usize,
    sending: bool,
    close_after_send: bool,
    /// The session has nothing more to do (budget used, or it failed).
    finished: bool,
    addr: Box<libc::sockaddr_in>,
}

/// Runs `sessions` sessions against `target` until the budget is used or `deadline`.
pub fn run_thread(
    target: SocketAddr,
    sessions: usize,
    plan: &Plan,
    budget: &SharedBudget,
    progress: &Progress,
    deadline: Instant,
    spin: Duration,
) -> io::Result<Stats> {
    let SocketAddr::V4(v4) = target else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "ringmail-load targets IPv4 addresses",
        ));
    };
    // COOP_TASKRUN: completions wait for this thread's next kernel entry instead of
    // interrupting it; measured 12k vs 7.7k connections/s without it.
    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_single_issuer()
        .build(4 * sessions as u32 + 64)?;
    let mut stats = Stats::new();
    let mut conns: Vec<Conn> = (0..sessions)
        .map(|_| Conn {
            fd: -1,
            gen: 0,
            session: Session::new(),
            recv: vec![0; RECV_BYTES],
            send: Vec::new(),
            queued: Vec::new(),
            sent: 0,
            sending: false,
            close_after_send: false,
            finished: false,
            addr: Box::new(sockaddr(v4)),
        })
        .collect();
    let mut active = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        if budget.remaining() {
            connect(&mut ring, c, i)?;
            active += 1;
        }
    }
    while active > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let cqes = if spin.is_zero() {
            crate::ring::wait(&mut ring, deadline - now)?
        } else {
            crate::ring::wait_spinning(&mut ring, deadline - now, spin)?
        };
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
                    stats.errors += 1;
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    close_async(&mut ring, c);
                    // Refused or reset: try again while there is budget, a little later.
                    std::thread::sleep(Duration::from_millis(1));
                    if budget.remaining() && Instant::now() < deadline {
                        connect(&mut ring, c, i)?;
                    } else {
                        active -= 1;
                    }
                }
                CONNECT => push_recv(&mut ring, c, i),
                RECV if res <= 0 => {
                    // The server closed: fine after QUIT, an error otherwise.
                    if !c.session.is_done() {
                        stats.errors += 1;
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    close_async(&mut ring, c);
                    if budget.remaining() && !c.finished && Instant::now() < deadline {
                        connect(&mut ring, c, i)?;
                    } else {
                        active -= 1;
                    }
                }
                RECV => {
                    let mut b = budget;
                    let out = c.session.feed(plan, &mut b, &c.recv[..res as usize], now);
                    for code in &out.codes {
                        *stats.codes.entry(*code).or_default() += 1;
                    }
                    if let Some((code, latency)) = out.finished {
                        if code / 100 == 2 {
                            stats.ok += 1;
                            progress.ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.errors += 1;
                            progress.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = stats.latency_us.record((latency.as_micros() as u64).max(1));
                    }
                    if out.failed {
                        stats.errors += 1;
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        c.finished = true;
                    }
                    if !out.send.is_empty() {
                        c.queued.extend_from_slice(&out.send);
                        if !c.sending {
                            push_send(&mut ring, c, i);
                        }
                    }
                    if out.close {
                        c.close_after_send = true;
                        if !c.sending {
                            // Nothing left to send: close now and maybe start again.
                            close_async(&mut ring, c);
                            if budget.remaining() && !c.finished && Instant::now() < deadline {
                                connect(&mut ring, c, i)?;
                            } else {
                                active -= 1;
                            }
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
                        stats.bytes += c.sent as u64;
                        push_send(&mut ring, c, i);
                    } else {
                        stats.bytes += c.sent as u64;
                        c.sending = false;
                        if c.close_after_send {
                            close_async(&mut ring, c);
                            if budget.remaining() && !c.finished && Instant::now() < deadline {
                                connect(&mut ring, c, i)?;
                            } else {
                                active -= 1;
                            }
                        }
                    }
                }
                _ => unreachable!("unknown op kind"),
            }
        }
    }
    for c in &mut conns {
        close(c);
    }
    Ok(stats)
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

fn close(c: &mut Conn) {
    if c.fd >= 0 {
        // SAFETY: the descriptor is ours; in-flight requests hold their own reference.
        unsafe { libc::close(c.fd) };
        c.fd = -1;
    }
}

/// Closes through the ring: one syscall fewer on the per-connection path, and the
/// close is submitted with the next connect in the same `io_uring_enter`.
fn close_async(ring: &mut IoUring, c: &mut Conn) {
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

fn push(ring: &mut IoUring, e: io_uring::squeue::Entry) {
    // SAFETY: every pointer in the entry points into a `Conn` buffer that stays put until its completion is processed.
    unsafe { crate::ring::push(ring, &e) }
}

fn connect(ring: &mut IoUring, c: &mut Conn, i: usize) -> io::Result<()> {
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
    c.session = Session::new();
    // A send of the previous connection may still be in flight on `send`: leave that
    // buffer to it and start afresh.
    c.send = Vec::new();
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

fn ud(i: usize, c: &Conn, kind: u64) -> u64 {
    ((i as u64) << 24) | ((c.gen & GEN_MASK) << 2) | kind
}

fn push_recv(ring: &mut IoUring, c: &mut Conn, i: usize) {
    push(
        ring,
        opcode::Recv::new(types::Fd(c.fd), c.recv.as_mut_ptr(), c.recv.len() as u32)
            .build()
            .user_data(ud(i, c, RECV)),
    );
}

/// Starts sending what is queued.
fn push_send(ring: &mut IoUring, c: &mut Conn, i: usize) {
    std::mem::swap(&mut c.send, &mut c.queued);
    c.queued.clear();
    c.sent = 0;
    resend(ring, c, i);
}

/// Sends the rest of the buffer in flight.
fn resend(ring: &mut IoUring, c: &mut Conn, i: usize) {
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
