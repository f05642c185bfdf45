//! A DNS server for tests, in the test process, on 127.0.0.1: serves MX, A and TXT records
//! from a table over UDP and TCP (same port), and can answer SERVFAIL, stay silent,
//! or send a truncated UDP answer (TC bit: the client must ask over TCP) for chosen
//! names.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, MX, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default, Clone)]
pub struct Zone {
    pub mx: HashMap<String, Vec<(u16, String)>>,
    pub a: HashMap<String, Vec<Ipv4Addr>>,
    /// TXT records, each one string (split into 255-octet pieces on the wire).
    pub txt: HashMap<String, Vec<String>>,
    pub servfail: HashSet<String>,
    /// Names whose queries get no answer at all.
    pub silent: HashSet<String>,
    /// Names answered over UDP with the TC bit and no records (whole over TCP).
    pub truncate: HashSet<String>,
    pub ttl: u32,
}

impl Zone {
    pub fn mx(mut self, domain: &str, pref: u16, host: &str) -> Zone {
        self.mx
            .entry(domain.into())
            .or_default()
            .push((pref, host.into()));
        self
    }
    pub fn txt(mut self, name: &str, text: &str) -> Zone {
        self.txt
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(text.into());
        self
    }
    /// Queries for `name` get no answer at all.
    pub fn silent_name(mut self, name: &str) -> Zone {
        self.silent.insert(name.into());
        self
    }
    pub fn servfail(mut self, name: &str) -> Zone {
        self.servfail.insert(name.into());
        self
    }
    pub fn a(mut self, host: &str, ip: &str) -> Zone {
        self.a
            .entry(host.into())
            .or_default()
            .push(ip.parse().unwrap());
        self
    }
}

pub struct DnsServer {
    pub addr: SocketAddr,
    /// Queries received (UDP and TCP), for cache tests.
    pub queries: Arc<AtomicUsize>,
    /// Of those, over TCP.
    pub tcp_queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(zone: Zone) -> DnsServer {
        // The UDP port the kernel picks may be taken for TCP (another test's
        // listener): pick again, a bounded number of times.
        let (sock, addr, listener) = (0..50)
            .find_map(|_| {
                let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
                let addr = sock.local_addr().ok()?;
                let listener = TcpListener::bind(addr).ok()?;
                Some((sock, addr, listener))
            })
            .expect("a port free for both UDP and TCP");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, s, z) = (queries.clone(), stop.clone(), zone.clone());
        let udp = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = answer(&z, &buf[..n], false) {
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        let (q, tq, s) = (queries.clone(), tcp_queries.clone(), stop.clone());
        let tcp = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let mut len = [0u8; 2];
                if conn.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                if conn.read_exact(&mut query).is_err() {
                    continue;
                }
                q.fetch_add(1, Ordering::SeqCst);
                tq.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = answer(&zone, &query, true) {
                    let _ = conn.write_all(&(reply.len() as u16).to_be_bytes());
                    let _ = conn.write_all(&reply);
                }
            }
        });
        DnsServer {
            addr,
            queries,
            tcp_queries,
            stop,
            threads: vec![udp, tcp],
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn answer(zone: &Zone, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if zone.silent.contains(&name) {
        return None;
    }
    let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    r.metadata.recursion_available = true;
    r.add_query(question.clone());
    let ttl = if zone.ttl == 0 { 300 } else { zone.ttl };
    let known =
        zone.mx.contains_key(&name) || zone.a.contains_key(&name) || zone.txt.contains_key(&name);
    r.metadata.response_code = if zone.servfail.contains(&name) {
        ResponseCode::ServFail
    } else if !known {
        ResponseCode::NXDomain
    } else {
        ResponseCode::NoError
    };
    if r.metadata.response_code == ResponseCode::NoError && zone.truncate.contains(&name) && !tcp {
        r.metadata.truncation = true;
    } else if r.metadata.response_code == ResponseCode::NoError {
        let owner = question.name().clone();
        match question.query_type() {
            RecordType::MX => {
                for (pref, host) in zone.mx.get(&name).into_iter().flatten() {
                    let exchange = if host == "." {
                        Name::root()
                    } else {
                        Name::from_ascii(host).ok()?
                    };
                    r.add_answer(Record::from_rdata(
                        owner.clone(),
                        ttl,
                        RData::MX(MX::new(*pref, exchange)),
                    ));
                }
            }
            RecordType::A => {
                for ip in zone.a.get(&name).into_iter().flatten() {
                    r.add_answer(Record::from_rdata(owner.clone(), ttl, RData::A(A(*ip))));
                }
            }
            RecordType::TXT => {
                for text in zone.txt.get(&name).into_iter().flatten() {
                    let pieces: Vec<String> = text
                        .as_bytes()
                        .chunks(255)
                        .map(|c| String::from_utf8_lossy(c).into_owned())
                        .collect();
                    r.add_answer(Record::from_rdata(
                        owner.clone(),
                        ttl,
                        RData::TXT(TXT::new(pieces)),
                    ));
                }
            }
            _ => {}
        }
    }
    r.to_vec().ok()
}
