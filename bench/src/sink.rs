//! `ringmail-sink`: a fast SMTP sink for delivery benchmarks.
//!
//! It speaks SMTP with ringmail's own server core (so every limit and reply is the
//! real one), stores nothing, counts messages, optionally checksums each body, and can
//! answer a share of messages with 4xx, 5xx or a dropped connection (backpressure and
//! fault injection, in the spirit of KumoMTA's smart sink). One thread, one io_uring,
//! driven directly.

use io_uring::{opcode, types, IoUring};
use ringmail::smtp::{Config, Limits, Session, Step};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Shares of messages answered otherwise than 250, in per mille.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub tempfail_permille: u32,
    pub permfail_permille: u32,
    pub disconnect_permille: u32,
    /// Check each message against its `X-Load-Checksum` header (see `load::session`).
    pub verify: bool,
    /// Answer the first this many messages 451 whatever the shares (a retry test).
    pub tempfail_first: u64,
}

/// What the sink saw; shared with whoever reports it.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub tempfailed: AtomicU64,
    pub permfailed: AtomicU64,
    pub disconnected: AtomicU64,
    pub bytes: AtomicU64,
    /// XOR of the CRC32C of every accepted body (order-free, so concurrent senders
    /// can be checked against what they sent).
    pub crc_xor: AtomicU64,
    pub connections: AtomicU64,
    /// Sessions the client ended (QUIT; or too many errors).
    pub quits: AtomicU64,
    /// With verification on: messages whose checksum header matched / did not / was missing.
    pub verified: AtomicU64,
    pub corrupt: AtomicU64,
    pub unverifiable: AtomicU64,
}

impl Counters {
    pub fn json(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "accepted": g(&self.accepted),
            "tempfailed": g(&self.tempfailed),
            "permfailed": g(&self.permfailed),
            "disconnected": g(&self.disconnected),
            "bytes": g(&self.bytes),
            "crc32c_xor": format!("{:08x}", g(&self.crc_xor)),
            "connections": g(&self.connections),
            "quits": g(&self.quits),
            "verified": g(&self.verified),
            "corrupt": g(&self.corrupt),
            "unverifiable": g(&self.unverifiable),
        })
        .to_string()
    }
}

const RECV_BYTES: usize = 16 << 10;
const ACCEPT: u64 = 0;
const RECV: u64 = 1;
const SEND: u64 = 2;

struct Conn {
    fd: RawFd,
    session: Session,
    recv: Vec<u8>,
    send: Vec<u8>,
    sent: usize,
    sending: bool,
    close_after_send: bool,
    recv_pending: bool,
    /// Being torn down: no new requests, removed once none is in flight.
    closing: bool,
}

/// Serves on `listener` until `stop` is set.
pub fn serve(
    listener: std::net::TcpListener,
    faults: Faults,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(4096)?;
    let cfg = Rc::new(Config {
        hostname: "ringmail-sink.test".into(),
        local_domains: vec![],
        own_addresses: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
        starttls: false,
        auth: false,
        auth_without_tls: false,
        sender_login_match: true,
        submission: false,
        limits: Limits {
            message_bytes_max: 1 << 30,
            rcpt_count_max: 100_000,
            ..Limits::default()
        },
    });
    let lfd = listener.as_raw_fd();
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_id: u64 = 1;
    let mut seq: u64 = 0;
    // One accept in flight at all times, renewed as each completes.
    let accept = opcode::Accept::new(types::Fd(lfd), std::ptr::null_mut(), std::ptr::null_mut())
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ACCEPT);
    push(&mut ring, accept.clone());
    while !stop.load(Ordering::Relaxed) {
        let cqes = crate::ring::wait(&mut ring, std::time::Duration::from_millis(100))?;
        for (ud, res) in cqes {
            if ud == ACCEPT {
                push(&mut ring, accept.clone());
                if res < 0 {
                    continue;
                }
                counters.connections.fetch_add(1, Ordering::Relaxed);
                let id = next_id;
                next_id += 1;
                // The sink relays for everyone: it is the far end of a relay benchmark.
                let mut c = Conn {
                    fd: res,
                    session: Session::new(cfg.clone(), true),
                    recv: vec![0; RECV_BYTES],
                    send: Vec::new(),
                    sent: 0,
                    sending: false,
                    close_after_send: false,
                    recv_pending: false,
                    closing: false,
                };
                flush(&mut ring, id, &mut c);
                conns.insert(id, c);
                continue;
            }
            let (id, kind) = (ud >> 2, ud & 3);
            let Some(c) = conns.get_mut(&id) else {
                continue;
            };
            if c.closing {
                match kind {
                    RECV => c.recv_pending = false,
                    _ => c.sending = false,
                }
                drop_conn(&mut conns, id);
                continue;
            }
            match kind {
                RECV => {
                    c.recv_pending = false;
                    if res <= 0 {
                        drop_conn(&mut conns, id);
                        continue;
                    }
                    c.session.push(&c.recv[..res as usize]);
                    let mut dropped = false;
                    loop {
                        match c.session.process() {
                            Step::NeedInput => break,
                            // STARTTLS and AUTH are not offered.
                            Step::Close => {
                                counters.quits.fetch_add(1, Ordering::Relaxed);
                                c.close_after_send = true;
                                break;
                            }
                            Step::StartTls | Step::Authenticate { .. } => {
                                c.close_after_send = true;
                                break;
                            }
                            Step::Message(tx) => {
                                let body = tx.body;
                                seq += 1;
                                let roll = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 1000;
                                let roll = roll as u32;
                                if seq <= faults.tempfail_first {
                                    counters.tempfailed.fetch_add(1, Ordering::Relaxed);
                                    c.session.message_failed(
                                        "451 4.3.0 ringmail-sink: injected temporary failure\r\n",
                                    );
                                } else if roll < faults.disconnect_permille {
                                    counters.disconnected.fetch_add(1, Ordering::Relaxed);
                                    dropped = true;
                                    break;
                                } else if roll
                                    < faults.disconnect_permille + faults.tempfail_permille
                                {
                                    counters.tempfailed.fetch_add(1, Ordering::Relaxed);
                                    c.session.message_failed(
                                        "451 4.3.0 ringmail-sink: injected temporary failure\r\n",
                                    );
                                } else if roll
                                    < faults.disconnect_permille
                                        + faults.tempfail_permille
                                        + faults.permfail_permille
                                {
                                    counters.permfailed.fetch_add(1, Ordering::Relaxed);
                                    c.session.message_failed(
                                        "554 5.3.0 ringmail-sink: injected permanent failure\r\n",
                                    );
                                } else {
                                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                                    counters
                                        .bytes
                                        .fetch_add(body.len() as u64, Ordering::Relaxed);
                                    let mut crc = 0;
                                    body.pieces(|p| {
                                        crc = crc32c::crc32c_append(crc, p);
                                        true
                                    });
                                    counters.crc_xor.fetch_xor(crc as u64, Ordering::Relaxed);
                                    if faults.verify {
                                        let text = body.to_vec();
                                        let counter = match crate::load::session::verify(&text) {
                                            Some(true) => &counters.verified,
                                            Some(false) => &counters.corrupt,
                                            None => &counters.unverifiable,
                                        };
                                        counter.fetch_add(1, Ordering::Relaxed);
                                    }
                                    // The session receives on into the body's last chunk
                                    // once the body is dropped.
                                    drop(body);
                                    c.session.message_stored(&format!("{seq:016X}"));
                                }
                            }
                        }
                    }
                    if dropped {
                        drop_conn(&mut conns, id);
                        continue;
                    }
                    flush(&mut ring, id, c);
                }
                SEND => {
                    c.sending = false;
                    if res < 0 {
                        drop_conn(&mut conns, id);
                        continue;
                    }
                    c.sent += res as usize;
                    flush(&mut ring, id, c);
                }
                _ => unreachable!(),
            }
            if conns
                .get(&id)
                .is_some_and(|c| c.close_after_send && !c.sending && c.sent >= c.send.len())
            {
                drop_conn(&mut conns, id);
            }
        }
    }
    Ok(())
}

/// Sends what the session has to say, or receives more when it has nothing.
fn flush(ring: &mut IoUring, id: u64, c: &mut Conn) {
    if c.sending || c.closing {
        return;
    }
    if c.sent >= c.send.len() {
        c.send.clear();
        c.sent = 0;
        if !c.session.output().is_empty() {
            c.send.extend_from_slice(c.session.output());
            c.session.clear_output();
        }
    }
    if c.sent < c.send.len() {
        c.sending = true;
        let rest = &c.send[c.sent..];
        push(
            ring,
            opcode::Send::new(types::Fd(c.fd), rest.as_ptr(), rest.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data((id << 2) | SEND),
        );
    } else if !c.close_after_send && !c.recv_pending {
        c.recv_pending = true;
        push(
            ring,
            opcode::Recv::new(types::Fd(c.fd), c.recv.as_mut_ptr(), c.recv.len() as u32)
                .build()
                .user_data((id << 2) | RECV),
        );
    }
}

/// Closes a connection. Its buffers are kept until no request can use them: a
/// connection is only dropped when neither a send nor a receive is in flight, or its
/// socket is shut down first so the kernel completes them.
fn drop_conn(conns: &mut HashMap<u64, Conn>, id: u64) {
    if let Some(c) = conns.get_mut(&id) {
        if c.sending || c.recv_pending {
            if c.closing {
                return;
            }
            c.closing = true;
            // SAFETY: shutting down our own socket makes pending requests complete.
            unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
            return;
        }
    }
    if let Some(c) = conns.remove(&id) {
        // SAFETY: our descriptor, with nothing in flight on it.
        unsafe { libc::close(c.fd) };
    }
}

fn push(ring: &mut IoUring, e: io_uring::squeue::Entry) {
    // SAFETY: the entry's buffers belong to a connection kept in the map until its requests have completed (see `drop_conn`).
    unsafe { crate::ring::push(ring, &e) }
}

/// Binds the sink's listener. Accepted sockets inherit TCP_NODELAY: a reply written
/// while an earlier one is unacknowledged must not wait for the peer's delayed ACK.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on our own socket with a valid int option.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l)
}
