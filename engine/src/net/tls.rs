//! A connection's byte stream: plaintext, or TLS once a handshake ran (STARTTLS and
//! STLS mid-session, or at once on an implicit-TLS listener).
//!
//! TLS is rustls's buffered sans-IO connection driven over the ring's own receives and
//! sends: ciphertext comes in with one `IORING_OP_RECV`, rustls decrypts into the
//! caller's buffer (the SMTP session's receive chunk, so plaintext is copied once, as
//! on a kernel socket), and what it encrypts goes out with one `IORING_OP_SEND`.

use super::{Ring, SendBuf};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Ciphertext asked for per receive: a full TLS record (16 KiB) and its overhead.
const CIPHERTEXT_RECV_BYTES: usize = 17 << 10;

/// Plaintext encrypted per send: large messages stream through in pieces, never
/// held encrypted whole.
const PLAINTEXT_SEND_BYTES: usize = 64 << 10;

/// How long a closing session waits to hand its close_notify to a client that stopped
/// reading.
const CLOSE_NOTIFY_STALL: Duration = Duration::from_secs(5);

/// One connection's socket, with TLS once it is negotiated.
pub struct Stream {
    ring: Rc<Ring>,
    fd: RawFd,
    tls: Option<Box<Tls>>,
}

struct Tls {
    conn: Connection,
    /// Received ciphertext; `rx[rx_at..]` is not yet taken by rustls.
    rx: Vec<u8>,
    rx_at: usize,
}

impl Stream {
    pub fn plain(ring: Rc<Ring>, fd: RawFd) -> Stream {
        Stream {
            ring,
            fd,
            tls: None,
        }
    }

    /// Runs a server handshake; each wait for the client is bounded by `idle`. On
    /// error the stream is unusable (the client got rustls's alert, if any).
    pub async fn start_tls(&mut self, config: Arc<ServerConfig>, idle: Duration) -> io::Result<()> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        self.handshake(conn.into(), idle).await
    }

    /// Runs a client handshake with the server named `name` (whose certificate
    /// `config`'s verifier checks, or not).
    pub async fn start_tls_client(
        &mut self,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        idle: Duration,
    ) -> io::Result<()> {
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        self.handshake(conn.into(), idle).await
    }

    async fn handshake(&mut self, mut conn: Connection, idle: Duration) -> io::Result<()> {
        assert!(self.tls.is_none(), "TLS is already on");
        // Pieces are bounded here (PLAINTEXT_SEND_BYTES), and sent before the next.
        conn.set_buffer_limit(None);
        let mut tls = Box::new(Tls {
            conn,
            rx: Vec::with_capacity(CIPHERTEXT_RECV_BYTES),
            rx_at: 0,
        });
        while tls.conn.is_handshaking() {
            tls.flush(&self.ring, self.fd, idle).await?;
            if !tls.conn.is_handshaking() {
                break;
            }
            if !tls.fill(&self.ring, self.fd, idle).await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        // The handshake's last flight and any session tickets.
        tls.flush(&self.ring, self.fd, idle).await?;
        self.tls = Some(tls);
        Ok(())
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The negotiated protocol version and cipher suite, for log lines.
    pub fn tls_description(&self) -> Option<String> {
        let c = &self.tls.as_ref()?.conn;
        // `TLSv1.3:TLS13_AES_256_GCM_SHA384`, one word for log lines.
        let version = c
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."));
        let suite = c
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()));
        // An abbreviated handshake (a session ticket or ID from before).
        let resumed = match c.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => ":resumed",
            _ => "",
        };
        Some(format!(
            "{}:{}{resumed}",
            version.unwrap_or_default(),
            suite.unwrap_or_default()
        ))
    }

    /// Sends all of `data` (encrypted under TLS). `more`: see [`Ring::send`].
    pub async fn send(&mut self, data: SendBuf, more: bool, stall: Duration) -> io::Result<()> {
        match &mut self.tls {
            None => self.ring.send(self.fd, data, more, stall).await,
            Some(tls) => tls.write(&self.ring, self.fd, data.bytes(), stall).await,
        }
    }

    pub async fn send_all(&mut self, data: &[u8], stall: Duration) -> io::Result<()> {
        match &mut self.tls {
            None => self.ring.send_all(self.fd, data, stall).await,
            Some(tls) => tls.write(&self.ring, self.fd, data, stall).await,
        }
    }

    /// Receives into `buf[at..]` (see [`Ring::recv_at`]); 0: the client closed.
    pub async fn recv_at(
        &mut self,
        mut buf: Vec<u8>,
        at: usize,
        idle: Duration,
    ) -> (io::Result<usize>, Vec<u8>) {
        match &mut self.tls {
            None => self.ring.recv_at(self.fd, buf, at, idle).await,
            Some(tls) => {
                let r = tls.read(&self.ring, self.fd, &mut buf[at..], idle).await;
                (r, buf)
            }
        }
    }

    /// Receives up to `buf`'s capacity (see [`Ring::recv`]).
    pub async fn recv(&mut self, mut buf: Vec<u8>, idle: Duration) -> (io::Result<usize>, Vec<u8>) {
        match &mut self.tls {
            None => self.ring.recv(self.fd, buf, idle).await,
            Some(tls) => {
                let cap = buf.capacity().max(1);
                buf.clear();
                buf.resize(cap, 0);
                let r = tls.read(&self.ring, self.fd, &mut buf, idle).await;
                buf.truncate(*r.as_ref().unwrap_or(&0));
                (r, buf)
            }
        }
    }

    /// Says goodbye under TLS (close_notify) before the connection closes.
    pub async fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.conn.send_close_notify();
            let _ = tls.flush(&self.ring, self.fd, CLOSE_NOTIFY_STALL).await;
        }
    }
}

impl Tls {
    /// Decrypted bytes into `out` (not empty); Ok(0): the client closed.
    async fn read(
        &mut self,
        ring: &Rc<Ring>,
        fd: RawFd,
        out: &mut [u8],
        idle: Duration,
    ) -> io::Result<usize> {
        debug_assert!(!out.is_empty());
        loop {
            match self.conn.reader().read(out) {
                // Ok(0) only after the client's close_notify.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if !self.fill(ring, fd, idle).await? {
                return Ok(0);
            }
            // A key update, or an alert, to answer.
            if self.conn.wants_write() {
                self.flush(ring, fd, idle).await?;
            }
        }
    }

    async fn write(
        &mut self,
        ring: &Rc<Ring>,
        fd: RawFd,
        data: &[u8],
        stall: Duration,
    ) -> io::Result<()> {
        for piece in data.chunks(PLAINTEXT_SEND_BYTES) {
            self.conn.writer().write_all(piece)?;
            self.flush(ring, fd, stall).await?;
        }
        Ok(())
    }

    /// Hands rustls more ciphertext: what is left of the last receive, else a new
    /// receive's. Ok(false): the client closed the connection.
    async fn fill(&mut self, ring: &Rc<Ring>, fd: RawFd, idle: Duration) -> io::Result<bool> {
        if self.rx_at == self.rx.len() {
            let mut buf = std::mem::take(&mut self.rx);
            // A receive cancelled before took the buffer along.
            self.rx_at = 0;
            if buf.capacity() < CIPHERTEXT_RECV_BYTES {
                buf = Vec::with_capacity(CIPHERTEXT_RECV_BYTES);
            }
            let (res, buf) = ring.recv(fd, buf, idle).await;
            self.rx = buf;
            if res? == 0 {
                return Ok(false);
            }
        }
        let mut pending = &self.rx[self.rx_at..];
        let before = pending.len();
        let taken = self.conn.read_tls(&mut pending);
        self.rx_at += before - pending.len();
        taken?;
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert saying why: send it, then give up.
            let _ = self.flush(ring, fd, idle).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(true)
    }

    /// Sends everything rustls has encrypted.
    async fn flush(&mut self, ring: &Rc<Ring>, fd: RawFd, stall: Duration) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut out = Vec::with_capacity(PLAINTEXT_SEND_BYTES + (1 << 10));
            self.conn.write_tls(&mut out)?;
            ring.send(fd, SendBuf::Owned(out), false, stall).await?;
        }
        Ok(())
    }
}
