//! Socket I/O on a raw io_uring of our own, with glommio as the executor.
//!
//! Why: glommio's sockets try a syscall, then arm a poll, sleep, and try again; a
//! profile of one-message-per-connection ingest showed ~30 syscalls and 8 `io_uring_enter`
//! per message, with connection setup adding fcntl/getpeername/setsockopt calls. Here a
//! receive is one `IORING_OP_RECV` (the kernel waits for the data itself), accept
//! returns the peer address, and every request made while the executor runs its tasks
//! goes to the kernel in one `io_uring_enter`.
//!
//! How it joins glommio: the ring signals an eventfd on every completion; a reaper task
//! reads that eventfd through glommio's own ring (so the executor sleeps on both) and
//! hands results to the waiting futures. A submitter task, scheduled by the first
//! request of a round, submits the whole round after the other ready tasks ran.
//!
//! Buffers are owned by the operation until the kernel is done with them: a future that
//! is dropped early cancels its request and leaves the buffer with the ring until the
//! completion arrives.

pub mod certs;
pub mod sessions;
pub mod stop;
pub mod tls;

use io_uring::{opcode, squeue, types, IoUring};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// user_data of requests whose completions nobody waits for (cancels, linked timeouts).
const UNWATCHED: u64 = u64::MAX;
const RING_ENTRIES: u32 = 4096;

/// Bytes handed to a send, owned by the operation until the kernel is done with them.
pub enum SendBuf {
    Owned(Vec<u8>),
    /// A message shared with other attempts (the spool's bytes): sent without a copy.
    Shared(Box<dyn AsRef<[u8]>>),
    Static(&'static [u8]),
}

impl SendBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            SendBuf::Owned(v) => v,
            SendBuf::Shared(v) => (**v).as_ref(),
            SendBuf::Static(s) => s,
        }
    }
}

#[derive(Default)]
struct Op {
    result: Option<i32>,
    waker: Option<Waker>,
    buf: Option<Vec<u8>>,
    /// What a send reads from, kept alive until its completion.
    send: Option<SendBuf>,
    addr: Option<Box<(libc::sockaddr_storage, libc::socklen_t)>>,
    timeout: Option<Box<types::Timespec>>,
    /// The future is gone: free the slot when the completion comes.
    orphaned: bool,
    /// A successful result is a new descriptor (accept): close it if orphaned.
    yields_fd: bool,
}

/// One executor's network ring.
pub struct Ring {
    ring: RefCell<IoUring>,
    ops: RefCell<Vec<Option<Op>>>,
    free: RefCell<Vec<usize>>,
    submit_pending: Cell<bool>,
    submitter: RefCell<Option<Waker>>,
    eventfd: OwnedFd,
}

impl Ring {
    /// Creates the ring and starts its submitter and reaper tasks on the current
    /// glommio executor.
    pub fn start() -> io::Result<Rc<Ring>> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let ring = Rc::new(Ring {
            ring: RefCell::new(ring),
            ops: RefCell::new(Vec::with_capacity(1024)),
            free: RefCell::new(Vec::new()),
            submit_pending: Cell::new(false),
            submitter: RefCell::new(None),
            eventfd,
        });
        // The reaper reads the eventfd through glommio (a duplicate: the file closes it).
        // SAFETY: dup returns a new descriptor or -1.
        let dup = unsafe { libc::dup(ring.eventfd.as_raw_fd()) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: dup is a fresh descriptor we own; BufferedFile takes it over.
        let efd_file = unsafe { glommio::io::BufferedFile::from_raw_fd(dup) };
        let weak = Rc::downgrade(&ring);
        glommio::spawn_local(async move {
            loop {
                if efd_file.read_at(0, 8).await.is_err() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                match weak.upgrade() {
                    Some(r) => r.reap(),
                    None => return,
                }
            }
        })
        .detach();
        let weak = Rc::downgrade(&ring);
        glommio::spawn_local(async move {
            loop {
                let Some(r) = weak.upgrade() else { return };
                SubmitWanted(&r).await;
                r.submit_pending.set(false);
                r.submit_now();
                r.reap();
            }
        })
        .detach();
        Ok(ring)
    }

    fn submit_now(&self) {
        loop {
            let submitted = self.ring.borrow().submit();
            match submitted {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: the completion queue is backed up, or the kernel is
                // short of memory for a moment: drain completions, then retry.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    self.reap()
                }
                // Anything else (EFAULT, EINVAL, EBADF) means the ring itself is broken:
                // a programming error, and nothing on this executor could do I/O.
                Err(e) => panic!("io_uring submit failed: {e}"),
            }
        }
    }

    /// Hands every completion to its operation.
    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut ops = self.ops.borrow_mut();
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            if ud == UNWATCHED {
                continue;
            }
            let idx = ud as usize;
            let Some(op) = ops.get_mut(idx).and_then(|o| o.as_mut()) else {
                continue;
            };
            if op.orphaned {
                if op.yields_fd && cqe.result() >= 0 {
                    // SAFETY: an accept completed for a future that is gone; nobody
                    // else knows this descriptor.
                    unsafe { libc::close(cqe.result()) };
                }
                ops[idx] = None;
                self.free.borrow_mut().push(idx);
                continue;
            }
            op.result = Some(cqe.result());
            if let Some(w) = op.waker.take() {
                w.wake();
            }
        }
    }

    fn push(&self, entries: &[squeue::Entry]) {
        loop {
            // SAFETY: every pointer in the entries points into memory owned by an `Op`
            // in `ops` (heap allocations that do not move), kept until completion.
            let pushed = unsafe { self.ring.borrow_mut().submission().push_multiple(entries) };
            if pushed.is_ok() {
                break;
            }
            self.submit_now();
        }
        if !self.submit_pending.replace(true) {
            if let Some(w) = self.submitter.borrow_mut().take() {
                w.wake();
            }
        }
    }

    fn alloc(&self, op: Op) -> usize {
        let mut ops = self.ops.borrow_mut();
        match self.free.borrow_mut().pop() {
            Some(i) => {
                ops[i] = Some(op);
                i
            }
            None => {
                ops.push(Some(op));
                ops.len() - 1
            }
        }
    }

    fn start_op(
        self: &Rc<Self>,
        op: Op,
        build: impl FnOnce(&mut Op, u64) -> Vec<squeue::Entry>,
    ) -> OpFuture {
        let idx = self.alloc(op);
        let entries = {
            let mut ops = self.ops.borrow_mut();
            build(ops[idx].as_mut().unwrap(), idx as u64)
        };
        self.push(&entries);
        OpFuture {
            ring: self.clone(),
            idx,
            done: false,
        }
    }

    /// Connects a new TCP socket to `addr`, giving up after `timeout`.
    pub async fn connect(
        self: &Rc<Self>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<OwnedFd> {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sa = socket2::SockAddr::from(addr);
        let raw = fd.as_raw_fd();
        let op = Op {
            addr: Some(Box::new((
                // SAFETY: sockaddr_storage is plain data; copied from a valid SockAddr.
                unsafe { std::ptr::read(sa.as_ptr().cast::<libc::sockaddr_storage>()) },
                sa.len(),
            ))),
            timeout: Some(Box::new(
                types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos()),
            )),
            ..Op::default()
        };
        let (res, _) = self
            .start_op(op, |op, ud| {
                let a = op.addr.as_ref().unwrap();
                let ts: *const types::Timespec = &**op.timeout.as_ref().unwrap();
                vec![
                    opcode::Connect::new(
                        types::Fd(raw),
                        (&a.0 as *const libc::sockaddr_storage).cast(),
                        a.1,
                    )
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(ud),
                    opcode::LinkTimeout::new(ts).build().user_data(UNWATCHED),
                ]
            })
            .await;
        match res {
            r if r >= 0 => Ok(fd),
            r if r == -libc::ECANCELED => Err(io::ErrorKind::TimedOut.into()),
            r => Err(io::Error::from_raw_os_error(-r)),
        }
    }

    /// Accepts one connection on a listening socket.
    pub async fn accept(self: &Rc<Self>, listener: RawFd) -> io::Result<(OwnedFd, SocketAddr)> {
        let op = Op {
            addr: Some(Box::new((
                unsafe { std::mem::zeroed() },
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
            ))),
            yields_fd: true,
            ..Op::default()
        };
        let (res, op) = self
            .start_op(op, |op, ud| {
                let a = op.addr.as_mut().unwrap();
                vec![opcode::Accept::new(
                    types::Fd(listener),
                    (&mut a.0 as *mut libc::sockaddr_storage).cast(),
                    &mut a.1,
                )
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(ud)]
            })
            .await;
        let fd = check(res)?;
        // SAFETY: a successful accept returns a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let a = op.addr.unwrap();
        let peer = sockaddr_to_std(&a.0).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP socket")
        })?;
        Ok((fd, peer))
    }

    /// Receives into `buf` (its capacity is the limit); `idle` bounds the wait and
    /// yields `TimedOut`. Returns the buffer with its length set to what arrived.
    pub async fn recv(
        self: &Rc<Self>,
        fd: RawFd,
        mut buf: Vec<u8>,
        idle: Duration,
    ) -> (io::Result<usize>, Vec<u8>) {
        buf.clear();
        let cap = buf.capacity();
        let (res, mut buf) = self.recv_into(fd, buf, 0, cap, idle).await;
        if let Ok(n) = res {
            // SAFETY: the kernel wrote `n` bytes into the buffer's spare capacity.
            unsafe { buf.set_len(n) };
        }
        (res, buf)
    }

    /// Receives into `buf[at..]` (initialized bytes the kernel overwrites: the
    /// SMTP session's own receive buffer, so what arrives is not copied again);
    /// `idle` bounds the wait and yields `TimedOut`. Returns the buffer, its length
    /// unchanged.
    pub async fn recv_at(
        self: &Rc<Self>,
        fd: RawFd,
        buf: Vec<u8>,
        at: usize,
        idle: Duration,
    ) -> (io::Result<usize>, Vec<u8>) {
        assert!(at <= buf.len());
        let len = buf.len() - at;
        self.recv_into(fd, buf, at, len, idle).await
    }

    /// One `IORING_OP_RECV` of at most `len` bytes into the allocation of `buf` from
    /// offset `at`, with a linked idle timeout. The caller guarantees
    /// `at + len <= buf.capacity()`; the buffer's length is left as it is.
    async fn recv_into(
        self: &Rc<Self>,
        fd: RawFd,
        buf: Vec<u8>,
        at: usize,
        len: usize,
        idle: Duration,
    ) -> (io::Result<usize>, Vec<u8>) {
        assert!(at + len <= buf.capacity());
        let op = Op {
            buf: Some(buf),
            timeout: Some(Box::new(
                types::Timespec::new()
                    .sec(idle.as_secs())
                    .nsec(idle.subsec_nanos()),
            )),
            ..Op::default()
        };
        let (res, mut op) = self
            .start_op(op, |op, ud| {
                let b = op.buf.as_mut().unwrap();
                let len = len.min(u32::MAX as usize) as u32;
                let ts: *const types::Timespec = &**op.timeout.as_ref().unwrap();
                vec![
                    // SAFETY: at + len is within the allocation; the buffer lives in
                    // the op until the completion.
                    opcode::Recv::new(types::Fd(fd), unsafe { b.as_mut_ptr().add(at) }, len)
                        .build()
                        .flags(squeue::Flags::IO_LINK)
                        .user_data(ud),
                    opcode::LinkTimeout::new(ts).build().user_data(UNWATCHED),
                ]
            })
            .await;
        let buf = op.buf.take().unwrap();
        let res = match res {
            r if r >= 0 => Ok(r as usize),
            r if r == -libc::ECANCELED => Err(io::ErrorKind::TimedOut.into()),
            r => Err(io::Error::from_raw_os_error(-r)),
        };
        (res, buf)
    }

    /// Sends all of `data`; a peer that takes none of it for `stall` (it stopped
    /// reading) gets `TimedOut`.
    pub async fn send_all(
        self: &Rc<Self>,
        fd: RawFd,
        data: &[u8],
        stall: Duration,
    ) -> io::Result<()> {
        self.send(fd, SendBuf::Owned(data.to_vec()), false, stall)
            .await
    }

    /// Sends all of `data` without copying it. `more`: further data follows at once
    /// (MSG_MORE), so the kernel may hold a short piece back to fill a segment.
    pub async fn send(
        self: &Rc<Self>,
        fd: RawFd,
        data: SendBuf,
        more: bool,
        stall: Duration,
    ) -> io::Result<()> {
        let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
        let total = data.bytes().len();
        let mut data = Some(data);
        let mut off = 0;
        while off < total {
            let op = Op {
                send: data.take(),
                timeout: Some(Box::new(
                    types::Timespec::new()
                        .sec(stall.as_secs())
                        .nsec(stall.subsec_nanos()),
                )),
                ..Op::default()
            };
            let (res, mut op) = self
                .start_op(op, |op, ud| {
                    let b = op.send.as_ref().unwrap().bytes();
                    let len = (b.len() - off).min(u32::MAX as usize) as u32;
                    let ts: *const types::Timespec = &**op.timeout.as_ref().unwrap();
                    // SAFETY: off < b.len(); the buffer lives in the op until completion.
                    vec![
                        opcode::Send::new(types::Fd(fd), unsafe { b.as_ptr().add(off) }, len)
                            .flags(flags)
                            .build()
                            .flags(squeue::Flags::IO_LINK)
                            .user_data(ud),
                        opcode::LinkTimeout::new(ts).build().user_data(UNWATCHED),
                    ]
                })
                .await;
            data = op.send.take();
            if res == -libc::ECANCELED {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let n = check(res)? as usize;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += n;
        }
        Ok(())
    }
}

fn check(res: i32) -> io::Result<i32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res)
    }
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

/// Resolves when a submission round is wanted.
struct SubmitWanted<'a>(&'a Ring);

impl Future for SubmitWanted<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.submit_pending.get() {
            Poll::Ready(())
        } else {
            *self.0.submitter.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A request in flight; yields its result and the op (with its buffers) back.
struct OpFuture {
    ring: Rc<Ring>,
    idx: usize,
    done: bool,
}

impl Future for OpFuture {
    type Output = (i32, Op);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, Op)> {
        let idx = self.idx;
        let mut ops = self.ring.ops.borrow_mut();
        let op = ops[idx].as_mut().expect("op slot in use");
        match op.result {
            Some(res) => {
                let op = ops[idx].take().unwrap();
                drop(ops);
                self.ring.free.borrow_mut().push(idx);
                self.done = true;
                Poll::Ready((res, op))
            }
            None => {
                op.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut ops = self.ring.ops.borrow_mut();
        let op = ops[self.idx].as_mut().expect("op slot in use");
        if op.result.is_some() {
            ops[self.idx] = None;
            drop(ops);
            self.ring.free.borrow_mut().push(self.idx);
            return;
        }
        // The kernel may still use the buffers: keep them until the completion.
        op.orphaned = true;
        op.waker = None;
        drop(ops);
        self.ring.push(&[opcode::AsyncCancel::new(self.idx as u64)
            .build()
            .user_data(UNWATCHED)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn listener() -> (std::net::TcpListener, RawFd) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        (l, fd)
    }

    #[test]
    fn a_peer_that_stops_reading_times_the_send_out() {
        glommio::LocalExecutor::default().run(async {
            let ring = Ring::start().unwrap();
            let (l, lfd) = listener();
            let addr = l.local_addr().unwrap();
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (fd, _) = ring.accept(lfd).await.unwrap();
            // Far more than the socket buffers hold; the client never reads.
            let big = vec![b'x'; 64 << 20];
            let err = ring
                .send_all(fd.as_raw_fd(), &big, Duration::from_millis(200))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
            drop(client);
        });
    }

    #[test]
    fn accept_recv_send_timeout_and_cancel() {
        glommio::LocalExecutor::default().run(async {
            let ring = Ring::start().unwrap();
            let (l, lfd) = listener();
            let addr = l.local_addr().unwrap();
            // The client stays silent until the server has seen its receive time out and
            // its other receive cancelled, and says so: no data can race them.
            let (go, wait_go) = std::sync::mpsc::channel::<()>();
            let client = std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                let local = c.local_addr().unwrap();
                let mut got = [0u8; 5];
                c.read_exact(&mut got).unwrap();
                assert_eq!(&got, b"hello");
                wait_go.recv().unwrap();
                c.write_all(b"after").unwrap();
                local
            });
            let (fd, peer) = ring.accept(lfd).await.unwrap();
            ring.send_all(fd.as_raw_fd(), b"hello", Duration::from_secs(10))
                .await
                .unwrap();
            // A receive that times out reports TimedOut.
            let (res, buf) = ring
                .recv(
                    fd.as_raw_fd(),
                    Vec::with_capacity(64),
                    Duration::from_millis(50),
                )
                .await;
            assert_eq!(res.unwrap_err().kind(), io::ErrorKind::TimedOut);
            // A receive whose future is dropped is cancelled; its buffer stays with the
            // ring until the kernel lets go, and no data is lost to it.
            let dropped = futures_lite::future::or(
                async {
                    let _ = ring
                        .recv(
                            fd.as_raw_fd(),
                            Vec::with_capacity(64),
                            Duration::from_secs(10),
                        )
                        .await;
                    false
                },
                async {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                    true
                },
            )
            .await;
            assert!(dropped);
            // The cancel is itself a request: until its completion freed the orphaned
            // receive, that receive could still take the client's bytes.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while ring.ops.borrow().iter().any(|op| op.is_some()) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cancel never completed"
                );
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            go.send(()).unwrap();
            let (res, buf) = ring
                .recv(fd.as_raw_fd(), buf, Duration::from_secs(10))
                .await;
            assert_eq!(res.unwrap(), 5);
            assert_eq!(&buf[..], b"after");
            let local = client.join().unwrap();
            assert_eq!(peer, local);
            // The peer closed: a receive returns 0.
            let (res, _) = ring
                .recv(fd.as_raw_fd(), buf, Duration::from_secs(10))
                .await;
            assert_eq!(res.unwrap(), 0);
        });
    }
}
