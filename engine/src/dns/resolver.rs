//! The DNS resolver of a shard: UDP through glommio (no tokio on shard threads:
//! ARCHITECTURE.md, "Bird's eye"), one query in flight per question and shard
//! (concurrent lookups of it share the answer), name servers tried in order,
//! answers cached by TTL. A truncated UDP answer (TC bit) is asked again over TCP
//! (RFC 7766), within the same deadline.

use super::{parse, query, route, Answer, Cache, DnsError, Route};
use glommio::net::UdpSocket;
use hickory_proto::rr::RecordType;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub struct Resolver {
    servers: Vec<SocketAddr>,
    /// Per attempt and server.
    timeout: Duration,
    attempts: u32,
    cache: RefCell<Cache>,
    /// Lookups on the wire now, by (lower-case name, type): a second caller for the
    /// same question waits for the first one's answer instead of asking again.
    in_flight: RefCell<HashMap<(String, RecordType), Rc<Flight>>>,
}

#[derive(Default)]
struct Flight {
    done: event_listener::Event,
    /// Set by the asking lookup before it wakes the others; None after `done` means
    /// it was dropped unfinished (its attempt cancelled), so a waiter asks itself.
    result: RefCell<Option<Result<Answer, DnsError>>>,
}

/// Ends a flight however the asking lookup ends, so no waiter is left behind.
struct FlightGuard<'a> {
    in_flight: &'a RefCell<HashMap<(String, RecordType), Rc<Flight>>>,
    key: (String, RecordType),
    flight: Rc<Flight>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.in_flight.borrow_mut();
        if map
            .get(&self.key)
            .is_some_and(|f| Rc::ptr_eq(f, &self.flight))
        {
            map.remove(&self.key);
        }
        drop(map);
        self.flight.done.notify(usize::MAX);
    }
}

/// The name servers of `/etc/resolv.conf` (port 53), in order.
pub fn servers_from_resolv_conf(path: &Path) -> Vec<SocketAddr> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A fresh random value (query ids must not be guessable; MX order among equals).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

fn random_u16() -> u16 {
    random_u64() as u16
}

impl Resolver {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration, attempts: u32) -> Resolver {
        Resolver {
            servers,
            timeout,
            attempts: attempts.max(1),
            cache: RefCell::new(Cache::new(100_000)),
            in_flight: RefCell::new(HashMap::new()),
        }
    }

    /// Looks `name` up, from the cache when it can; concurrent lookups of the same
    /// question share one query.
    pub async fn lookup(&self, name: &str, rtype: RecordType) -> Result<Answer, DnsError> {
        let name = name.trim_end_matches('.');
        // Names go on the wire as A-labels (an internationalised domain has no other
        // DNS form); the same spelling keys the cache and the flights.
        let name = match name.is_ascii() {
            true => name.to_ascii_lowercase(),
            false => idna::domain_to_ascii(name)
                .map_err(|_| DnsError::Config(format!("{name:?} has no IDNA A-label")))?,
        };
        let key = (name, rtype);
        loop {
            if let Some(a) = self.cache.borrow().get(&key.0, rtype, Instant::now()) {
                return Ok(a.clone());
            }
            let waiting = self.in_flight.borrow().get(&key).cloned();
            if let Some(flight) = waiting {
                let listener = flight.done.listen();
                if flight.result.borrow().is_none() {
                    listener.await;
                }
                if let Some(r) = flight.result.borrow().clone() {
                    return r;
                }
                continue;
            }
            let flight = Rc::new(Flight::default());
            self.in_flight
                .borrow_mut()
                .insert(key.clone(), flight.clone());
            let guard = FlightGuard {
                in_flight: &self.in_flight,
                key: key.clone(),
                flight,
            };
            let r = self.lookup_uncached(&key.0, rtype).await;
            *guard.flight.result.borrow_mut() = Some(r.clone());
            return r;
        }
    }

    async fn lookup_uncached(&self, name: &str, rtype: RecordType) -> Result<Answer, DnsError> {
        if self.servers.is_empty() {
            return Err(DnsError::Config("no name server configured".into()));
        }
        let mut last = DnsError::Timeout;
        for _ in 0..self.attempts {
            for server in &self.servers {
                let asked = self.ask(*server, name, rtype).await;
                crate::metrics::count(|c| {
                    c.dns_queries += 1;
                    // A name that does not exist is an answer, not a failure.
                    if asked.is_err() {
                        c.dns_failures += 1;
                    }
                });
                match asked {
                    Ok((answer, ttl)) => {
                        self.cache.borrow_mut().put(
                            name,
                            rtype,
                            answer.clone(),
                            ttl,
                            Instant::now(),
                        );
                        return Ok(answer);
                    }
                    Err(e @ DnsError::Config(_)) => return Err(e),
                    Err(e) => last = e,
                }
            }
        }
        Err(last)
    }

    async fn ask(
        &self,
        server: SocketAddr,
        name: &str,
        rtype: RecordType,
    ) -> Result<(Answer, u32), DnsError> {
        let id = random_u16();
        let q = query(id, name, rtype)?;
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        // A fresh socket (and so a fresh random port) per query, connected to the
        // server so that datagrams from anyone else are not even delivered.
        let sock = UdpSocket::bind(local)
            .map_err(|e| DnsError::Config(format!("cannot open a UDP socket: {e}")))?;
        sock.connect(server)
            .await
            .map_err(|e| DnsError::ServerFailure(format!("{server}: {e}")))?;
        sock.send(&q)
            .await
            .map_err(|e| DnsError::ServerFailure(format!("{server}: {e}")))?;
        let deadline = Instant::now() + self.timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DnsError::Timeout);
            }
            let n = match glommio::timer::timeout(left, async { sock.recv(&mut buf).await }).await {
                Ok(n) => n,
                Err(glommio::GlommioError::TimedOut(_)) => return Err(DnsError::Timeout),
                Err(e) => return Err(DnsError::ServerFailure(format!("{server}: {e}"))),
            };
            let ours = n >= 3 && buf[..2] == id.to_be_bytes();
            if ours && buf[2] & 0x02 != 0 {
                return self.ask_tcp(server, id, name, rtype, &q, deadline).await;
            }
            match parse(id, name, rtype, &buf[..n]) {
                // Not ours (a late answer to an earlier query): keep waiting.
                Err(DnsError::Malformed(_)) => continue,
                other => return other,
            }
        }
    }

    /// The same query over TCP: two-octet length, then the message, both ways.
    async fn ask_tcp(
        &self,
        server: SocketAddr,
        id: u16,
        name: &str,
        rtype: RecordType,
        q: &[u8],
        deadline: Instant,
    ) -> Result<(Answer, u32), DnsError> {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        let failed = |e: std::io::Error| DnsError::ServerFailure(format!("{server} (TCP): {e}"));
        let exchange = async {
            let mut s = glommio::net::TcpStream::connect(server)
                .await
                .map_err(|e| failed(e.into()))?;
            let mut out = Vec::with_capacity(q.len() + 2);
            out.extend_from_slice(&(q.len() as u16).to_be_bytes());
            out.extend_from_slice(q);
            s.write_all(&out).await.map_err(failed)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.map_err(failed)?;
            let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut reply).await.map_err(failed)?;
            let _ = s.close().await;
            parse(id, name, rtype, &reply)
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match glommio::timer::timeout(left, async { Ok(exchange.await) }).await {
            Ok(r) => r,
            Err(_) => Err(DnsError::Timeout),
        }
    }

    /// Where `domain`'s mail goes (MX rules applied; equal preferences in a fresh
    /// random order on every call, cached answer or not). `me`: this host's name,
    /// whose MX record and the worse ones are left out (`dns::route`).
    pub async fn mx_route(&self, domain: &str, me: &str) -> Result<Route, DnsError> {
        let answer = self.lookup(domain, RecordType::MX).await?;
        Ok(route(&answer, me, random_u64))
    }

    /// The addresses of a host: IPv4 first, then IPv6. NXDOMAIN or no address at all
    /// is an empty list.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let mut out = Vec::new();
        let mut first_err = None;
        for rtype in [RecordType::A, RecordType::AAAA] {
            match self.lookup(host, rtype).await {
                Ok(Answer::Addrs(a)) => out.extend(a),
                Ok(_) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (out.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }
}
