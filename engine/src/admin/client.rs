//! The CLI's side of the admin API (`ringmail queue …` while the server runs): one
//! HTTP/1.1 request per connection, the answer parsed with `httparse`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// How long the CLI waits for the server's answer (a bounce reads the message and
/// syncs: well under this).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the running server's admin API listens (`DATA/admin.addr`, written at
/// start), if one runs on this data directory.
pub fn running(data: &Path) -> Option<SocketAddr> {
    // No server holds the data directory's lock: a left `admin.addr` names a port
    // someone else may listen on now, who must not get the token or the request.
    // (When the lock cannot be tried, for want of permission say, the file decides.)
    if let Ok(Some(_free)) = crate::accounts::try_lock(data) {
        return None;
    }
    let text = std::fs::read_to_string(crate::runtime::admin_addr_file(data)).ok()?;
    let addr: SocketAddr = text.trim().parse().ok()?;
    // A file left by a server that was killed: nobody answers there.
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    Some(addr)
}

/// `?name=value&…` of the pairs whose value is set (empty when none is).
pub fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v {
            q.append_pair(k, v);
        }
    }
    match q.finish() {
        s if s.is_empty() => s,
        s => format!("?{s}"),
    }
}

/// Sends `method path` and returns the status and the JSON answer; a non-2xx status
/// is an error carrying the server's `error` text.
pub fn call(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> Result<serde_json::Value, String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("cannot reach the admin API at {addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("admin API at {addr}: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("admin API at {addr}: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&answer) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(format!("admin API at {addr}: a malformed answer")),
    };
    let status = resp.code.unwrap_or(0);
    let body: serde_json::Value = serde_json::from_slice(&answer[head..])
        .map_err(|e| format!("admin API at {addr}: the answer is not JSON: {e}"))?;
    if !(200..300).contains(&status) {
        let why = body["error"].as_str().unwrap_or("no reason given");
        return Err(format!("{why} (HTTP {status})"));
    }
    Ok(body)
}
