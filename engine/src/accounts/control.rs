//! The control socket, `DATA/control.sock`, served by executor 0 (the owner of shard
//! 0): JSON lines, one request and one reply per line (docs/contracts.md,
//! "Accounts"). It changes accounts, so it is created mode 0600: only the server's
//! own user (and root) can connect.

use super::{socket_path, Accounts, Request};
use crate::queue::Spool;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{UnixListener, UnixStream};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A request line longer than this is refused and the connection closed.
pub const LINE_BYTES_MAX: usize = 1 << 20;

pub struct Control {
    path: PathBuf,
    stop: crate::net::stop::Stop,
    accept: RefCell<Option<glommio::task::JoinHandle<()>>>,
}

impl Control {
    /// Binds the socket and serves it until `close`. The socket is bound under a
    /// temporary name, made 0600, then renamed into place, so that no client ever
    /// finds it with wider permissions; a socket left by a server that died is
    /// replaced (the caller holds `DATA/lock`: no other server uses it).
    pub fn start(
        data: &Path,
        accounts: Rc<Accounts>,
        spool: Rc<Spool>,
    ) -> Result<Rc<Control>, String> {
        use std::os::unix::fs::PermissionsExt;
        let path = socket_path(data);
        let tmp = data.join(format!("control.sock.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(|e| {
            format!(
                "cannot bind {}: {e} (a Unix socket path holds at most 107 bytes)",
                tmp.display()
            )
        })?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("cannot create {}: {e}", path.display())
            })?;
        let control = Rc::new(Control {
            path,
            stop: Default::default(),
            accept: RefCell::new(None),
        });
        let me = control.clone();
        let task =
            glommio::spawn_local(async move { me.accept_loop(listener, accounts, spool).await })
                .detach();
        *control.accept.borrow_mut() = Some(task);
        Ok(control)
    }

    async fn accept_loop(
        self: Rc<Self>,
        listener: UnixListener,
        accounts: Rc<Accounts>,
        spool: Rc<Spool>,
    ) {
        loop {
            match self.stop.or_stopped(listener.accept()).await {
                None => return,
                Some(Ok(stream)) => {
                    let (me, accounts, spool) = (self.clone(), accounts.clone(), spool.clone());
                    glommio::spawn_local(
                        async move { me.connection(stream, &accounts, &spool).await },
                    )
                    .detach();
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Reads request lines and answers each in turn. A change under way is finished
    /// even at shutdown; a connection waiting for its next line is closed then.
    async fn connection(&self, mut stream: UnixStream, accounts: &Accounts, spool: &Spool) {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 16 << 10];
        loop {
            while let Some(nl) = memchr::memchr(b'\n', &buf) {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let reply = answer(&line[..nl], accounts, spool).await;
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
            if buf.len() > LINE_BYTES_MAX {
                let _ = stream
                    .write_all(
                        reply_err(&format!("request line longer than {LINE_BYTES_MAX} bytes"))
                            .as_bytes(),
                    )
                    .await;
                return;
            }
            match self.stop.or_stopped(stream.read(&mut chunk)).await {
                Some(Ok(0)) | Some(Err(_)) | None => return,
                Some(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Stops accepting, closes idle connections and removes the socket.
    pub async fn close(&self) {
        self.stop.stop();
        let task = self.accept.borrow_mut().take();
        if let Some(t) = task {
            t.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn reply_err(e: &str) -> String {
    format!("{}\n", serde_json::json!({ "ok": false, "error": e }))
}

/// The reply line to one request line.
async fn answer(line: &[u8], accounts: &Accounts, spool: &Spool) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return reply_err(&format!("bad request: {e}")),
    };
    match accounts.handle(spool, &req).await {
        Ok(mut v) => {
            v["ok"] = true.into();
            format!("{v}\n")
        }
        Err(e) => reply_err(&e),
    }
}
