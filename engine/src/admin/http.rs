//! HTTP/1.1 for the admin listener: requests parsed with `httparse`, answers with a
//! length (no chunking), keep-alive unless the client asks to close. Small on
//! purpose: JSON requests and answers of bounded size, a few clients (operators,
//! Prometheus).

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::time::Duration;

/// A request head longer than this is refused (431).
pub const HEAD_BYTES_MAX: usize = 16 << 10;
/// A request body longer than this is refused (413); the API takes its parameters in
/// the query, so bodies are small.
pub const BODY_BYTES_MAX: usize = 64 << 10;
const HEADERS_MAX: usize = 32;
/// A request must be whole (head and body) this long after its first byte arrived,
/// else 408: a client trickling a byte at a time cannot hold a connection for long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The query's `name=value` pairs, decoded.
    pub query: Vec<(String, String)>,
    /// `Authorization: Bearer TOKEN`'s token.
    pub bearer: Option<String>,
    /// The client asked to close after this answer (or spoke HTTP/1.0).
    pub close: bool,
    /// An `Origin` header came with it (a browser's request).
    pub origin: bool,
    /// The `Host` header's value (an HTTP/1.1 request has exactly one).
    pub host: Option<String>,
    /// HEAD: answered as GET, without the body (RFC 9110 §9.3.2).
    pub head_only: bool,
}

impl Request {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What reading the next request gave.
pub enum Read {
    Request(Request),
    /// The client closed, or stayed silent past the idle timeout, between requests.
    Closed,
    /// A request that cannot be served: answer this status and close.
    Bad(u16, &'static str),
}

/// Reads one request from `stream`; `buf` carries bytes already received past the
/// last request (pipelining). `first`: the connection's first request, which must be
/// whole within `REQUEST_TIMEOUT` of the connection (a silent one holds no slot).
pub async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    idle: Duration,
    first: bool,
) -> Read {
    let mut chunk = [0u8; 4096];
    // When the request's first byte was there (pipelined bytes count from now).
    let mut began = (first || !buf.is_empty()).then(std::time::Instant::now);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = match req.parse(buf) {
            Ok(httparse::Status::Complete(head)) => Ok(Some((
                head,
                head_of(&req),
                content_length(&req),
                req.version == Some(0),
                req.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("host"))
                    .count(),
            ))),
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => Err(431),
            Err(_) => Err(400),
        };
        match parsed {
            Ok(Some((head, parsed, length, http10, hosts))) => {
                if head > HEAD_BYTES_MAX {
                    return Read::Bad(431, "request head too large");
                }
                // RFC 9112 §3.2: an HTTP/1.1 request without a Host header, or with
                // more than one, is answered 400.
                if hosts > 1 || (hosts == 0 && !http10) {
                    return Read::Bad(400, "a request needs exactly one Host header");
                }
                let length = match length {
                    Ok(n) => n,
                    Err(why) => return Read::Bad(400, why),
                };
                if length > BODY_BYTES_MAX {
                    return Read::Bad(413, "request body too large");
                }
                let Some(mut parsed) = parsed else {
                    return Read::Bad(400, "malformed request target");
                };
                // The body (unused by this API) is read and dropped, so the next
                // request starts where it should.
                while buf.len() < head + length {
                    match receive(stream, &mut chunk, wait(began, idle)).await {
                        Some(n) => buf.extend_from_slice(&chunk[..n]),
                        None if late(began) => return Read::Bad(408, "request not whole in time"),
                        None => return Read::Closed,
                    }
                }
                buf.drain(..head + length);
                parsed.close |= http10;
                return Read::Request(parsed);
            }
            Ok(None) if buf.len() > HEAD_BYTES_MAX => {
                return Read::Bad(431, "request head too large");
            }
            Ok(None) => {}
            Err(431) => return Read::Bad(431, "too many header fields"),
            Err(_) => return Read::Bad(400, "malformed request"),
        }
        match receive(stream, &mut chunk, wait(began, idle)).await {
            Some(n) => {
                began.get_or_insert_with(std::time::Instant::now);
                buf.extend_from_slice(&chunk[..n]);
            }
            None if late(began) => return Read::Bad(408, "request not whole in time"),
            None => return Read::Closed,
        }
    }
}

/// How long to wait for the next bytes: `idle` between requests, what is left of
/// `REQUEST_TIMEOUT` inside one.
fn wait(began: Option<std::time::Instant>, idle: Duration) -> Duration {
    match began {
        None => idle,
        Some(t) => REQUEST_TIMEOUT.saturating_sub(t.elapsed()).min(idle),
    }
}

/// Whether the request under way has run out of time.
fn late(began: Option<std::time::Instant>) -> bool {
    began.is_some_and(|t| t.elapsed() >= REQUEST_TIMEOUT)
}

async fn receive(stream: &mut TcpStream, chunk: &mut [u8], idle: Duration) -> Option<usize> {
    let read = futures_lite::future::or(async { Some(stream.read(chunk).await) }, async {
        glommio::timer::sleep(idle).await;
        None
    })
    .await;
    match read {
        Some(Ok(n)) if n > 0 => Some(n),
        _ => None,
    }
}

fn header<'a>(req: &'a httparse::Request, name: &str) -> Option<&'a [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn content_length(req: &httparse::Request) -> Result<usize, &'static str> {
    if header(req, "transfer-encoding").is_some() {
        return Err("chunked request bodies are not accepted");
    }
    let mut lengths = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    let h = match (lengths.next(), lengths.next()) {
        (None, _) => return Ok(0),
        (Some(h), None) => h,
        (Some(_), Some(_)) => return Err("more than one Content-Length"),
    };
    std::str::from_utf8(h.value)
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .ok_or("bad Content-Length")
}

fn head_of(req: &httparse::Request) -> Option<Request> {
    let target = req.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with('/') {
        return None;
    }
    let bearer = header(req, "authorization")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        });
    // RFC 9110 §7.6.1: a list of options, in one or more fields.
    let close = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .any(|o| o.trim_ascii().eq_ignore_ascii_case(b"close"));
    let method = req.method?;
    Some(Request {
        head_only: method == "HEAD",
        method: method.to_string(),
        host: header(req, "host")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.trim().to_string()),
        path: path.to_string(),
        query: form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
        bearer,
        close,
        origin: header(req, "origin").is_some(),
    })
}

/// An answer: status, content type, body.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// `WWW-Authenticate: Bearer` (401).
    pub challenge: bool,
    /// The methods a 405's resource takes (RFC 9110 §15.5.6: its `Allow`).
    pub allow: Option<&'static str>,
}

impl Response {
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
            challenge: false,
            allow: None,
        }
    }

    /// 405 for a resource that takes `allow`.
    pub fn not_allowed(allow: &'static str) -> Response {
        Response {
            allow: Some(allow),
            ..Response::error(405, "method not allowed here")
        }
    }

    /// `{"error": why}`.
    pub fn error(status: u16, why: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": why }))
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            409 => "Conflict",
            413 => "Content Too Large",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "",
        }
    }

    /// Writes the answer (`head_only`: without the body, its length still said);
    /// false when the client is gone.
    pub async fn send(&self, stream: &mut TcpStream, close: bool, head_only: bool) -> bool {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len()
        );
        if self.challenge {
            head.push_str("WWW-Authenticate: Bearer realm=\"ringmail\"\r\n");
        }
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        stream.write_all(&out).await.is_ok() && stream.flush().await.is_ok()
    }
}
