//! DNS for delivery, sans-IO: queries and answers in wire format (hickory-proto), the
//! MX rules of RFC 5321 §5.1 and RFC 7505, and a TTL cache. The UDP driver that runs
//! on the shard's executor is `resolver.rs`.
//!
//! Architecture invariant: no sockets or clocks in this file; `now` is passed in.

pub mod resolver;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// What a name server said, reduced to what delivery needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// MX records: (preference, exchange host), in answer order.
    Mx(Vec<(u16, String)>),
    /// A/AAAA addresses.
    Addrs(Vec<IpAddr>),
    /// The name exists but has no record of that type.
    NoData,
    /// The name does not exist (permanent).
    NxDomain,
}

/// Why a lookup did not produce an answer (all temporary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// SERVFAIL, REFUSED and the like.
    ServerFailure(String),
    Timeout,
    /// An answer that does not parse or does not match the query.
    Malformed(String),
    /// No name server configured, or the name is not a domain name.
    Config(String),
}

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsError::ServerFailure(s) => write!(f, "DNS server failure: {s}"),
            DnsError::Timeout => write!(f, "DNS timeout"),
            DnsError::Malformed(s) => write!(f, "malformed DNS answer: {s}"),
            DnsError::Config(s) => write!(f, "DNS: {s}"),
        }
    }
}

/// A query for `name`/`rtype` with message id `id`, recursion desired.
pub fn query(id: u16, name: &str, rtype: RecordType) -> Result<Vec<u8>, DnsError> {
    let name = Name::from_ascii(name)
        .map_err(|e| DnsError::Config(format!("{name:?} is not a domain name: {e}")))?;
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, rtype));
    m.to_vec().map_err(|e| DnsError::Config(e.to_string()))
}

/// Parses the answer to `query(id, name, rtype)`; returns it with its TTL (the
/// smallest of the records used, or of the SOA minimum for negative answers, else 60s).
pub fn parse(
    id: u16,
    name: &str,
    rtype: RecordType,
    bytes: &[u8],
) -> Result<(Answer, u32), DnsError> {
    let m = Message::from_vec(bytes).map_err(|e| DnsError::Malformed(e.to_string()))?;
    if m.metadata.id != id || m.metadata.message_type != MessageType::Response {
        return Err(DnsError::Malformed(
            "answer does not match the query".into(),
        ));
    }
    let asked = m.queries.first().map(|q| {
        (
            q.name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            q.query_type(),
        )
    });
    if asked != Some((name.trim_end_matches('.').to_ascii_lowercase(), rtype)) {
        return Err(DnsError::Malformed("answer is for another question".into()));
    }
    let negative_ttl = m.authorities.iter().map(|r| r.ttl).min().unwrap_or(60);
    match m.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Ok((Answer::NxDomain, negative_ttl)),
        other => return Err(DnsError::ServerFailure(format!("{other}"))),
    }
    let mut ttl = u32::MAX;
    // Only records owned by the name asked, or by the end of its CNAME chain within
    // this answer, are taken: anything else in the section (a mistake or a poisoning
    // attempt) is ignored.
    let owner = match cname_target(name, &m.answers, &mut ttl) {
        Some(owner) => owner,
        None => {
            return Err(DnsError::Malformed(
                "CNAME chain too long or looping".into(),
            ))
        }
    };
    let owned = |r: &&hickory_proto::rr::Record| same_name(&r.name.to_ascii(), &owner);
    let answer = match rtype {
        RecordType::MX => {
            let mx: Vec<(u16, String)> = m
                .answers
                .iter()
                .filter(owned)
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => {
                        ttl = ttl.min(r.ttl);
                        Some((
                            mx.preference,
                            mx.exchange.to_ascii().trim_end_matches('.').to_string(),
                        ))
                    }
                    _ => None,
                })
                .collect();
            if mx.is_empty() {
                Answer::NoData
            } else {
                Answer::Mx(mx)
            }
        }
        RecordType::A | RecordType::AAAA => {
            let addrs: Vec<IpAddr> = m
                .answers
                .iter()
                .filter(owned)
                .filter_map(|r| {
                    let ip = match (&r.data, rtype) {
                        (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
                        (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
                        _ => return None,
                    };
                    ttl = ttl.min(r.ttl);
                    Some(ip)
                })
                .collect();
            if addrs.is_empty() {
                Answer::NoData
            } else {
                Answer::Addrs(addrs)
            }
        }
        other => {
            return Err(DnsError::Config(format!(
                "record type {other} is not used for delivery"
            )))
        }
    };
    // No record taken is a negative answer, cached no longer than the zone says
    // (RFC 2308 §5), even when a CNAME chain with a longer TTL led to it.
    let ttl = match answer {
        Answer::NoData => ttl.min(negative_ttl),
        _ => ttl,
    };
    Ok((answer, ttl))
}

/// CNAMEs followed within one answer before it is refused as a loop.
const CNAME_CHAIN_MAX: usize = 8;

fn same_name(a: &str, b: &str) -> bool {
    a.trim_end_matches('.')
        .eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// The name whose records answer the question: `name`, or where its CNAME chain in
/// `answers` ends (RFC 1034 §3.6.2; a recursive server puts the whole chain in the
/// answer). The chain's TTLs bound the answer's. None: longer than
/// `CNAME_CHAIN_MAX`, which a loop also is.
fn cname_target(
    name: &str,
    answers: &[hickory_proto::rr::Record],
    ttl: &mut u32,
) -> Option<String> {
    let mut owner = name.trim_end_matches('.').to_string();
    for _ in 0..=CNAME_CHAIN_MAX {
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(c) if same_name(&r.name.to_ascii(), &owner) => Some((r.ttl, c)),
            _ => None,
        });
        let Some((t, target)) = next else {
            return Some(owner);
        };
        *ttl = (*ttl).min(t);
        owner = target.0.to_ascii().trim_end_matches('.').to_string();
    }
    None
}

/// Where a domain's mail goes, by RFC 5321 §5.1 and RFC 7505.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Exchanges to try in this order (lowest preference first; equal preferences in
    /// random order).
    Hosts(Vec<String>),
    /// `MX 0 .`: the domain accepts no mail (bounce with 556 5.1.10).
    NullMx,
    /// No MX records: the domain itself is the exchange (implicit MX).
    Implicit,
    /// The domain does not exist (bounce).
    NoSuchDomain,
    /// This host is the domain's best MX (see [`route`]): sending on would lead
    /// back here.
    BestMxIsSelf,
}

/// The preference of this host's own MX record (`me`, its host name), if it is
/// among them.
fn own_preference(mx: &[(u16, String)], me: &str) -> Option<u16> {
    let me = me.trim_end_matches('.');
    mx.iter()
        .filter(|(_, h)| h.trim_end_matches('.').eq_ignore_ascii_case(me))
        .map(|(p, _)| *p)
        .min()
}

/// Applies the MX rules to an MX answer. `rand` orders equal preferences: RFC 5321
/// §5.1 asks for a random order among them, so that equal hosts share the load
/// (answer order would send every message to whichever host the server lists first).
///
/// RFC 5321 §5.1: "If it determines that it should relay the message ... the SMTP
/// client MUST ... discard any MX records with preference equal or greater than its
/// own" when it finds itself (`me`, its host name) among them: a backup MX sends to
/// the better ones only, and with none better it is the best MX (`BestMxIsSelf`).
pub fn route(answer: &Answer, me: &str, rand: impl FnMut() -> u64) -> Route {
    match answer {
        Answer::NxDomain => Route::NoSuchDomain,
        Answer::NoData | Answer::Addrs(_) => Route::Implicit,
        Answer::Mx(mx) => {
            if mx.len() == 1 && (mx[0].1.is_empty() || mx[0].1 == ".") {
                return Route::NullMx;
            }
            match own_preference(mx, me) {
                Some(own) => {
                    let better: Vec<(u16, String)> =
                        mx.iter().filter(|(p, _)| *p < own).cloned().collect();
                    if better.is_empty() {
                        return Route::BestMxIsSelf;
                    }
                    Route::Hosts(shuffle_equal_preferences(&better, rand))
                }
                None => Route::Hosts(shuffle_equal_preferences(mx, rand)),
            }
        }
    }
}

/// Orders exchanges by preference, those of equal preference randomly (RFC 5321 §5.1).
pub fn shuffle_equal_preferences(
    mx: &[(u16, String)],
    mut rand: impl FnMut() -> u64,
) -> Vec<String> {
    let mut sorted: Vec<(u16, String)> = mx
        .iter()
        .filter(|(_, h)| !h.is_empty() && h != ".")
        .cloned()
        .collect();
    sorted.sort_by_key(|(p, _)| *p);
    let mut i = 0;
    while i < sorted.len() {
        let j = sorted[i..]
            .iter()
            .position(|(p, _)| *p != sorted[i].0)
            .map_or(sorted.len(), |k| i + k);
        // Fisher–Yates within the run of equal preference.
        for k in (i + 1..j).rev() {
            let r = i + (rand() as usize) % (k - i + 1);
            sorted.swap(k, r);
        }
        i = j;
    }
    sorted.into_iter().map(|(_, h)| h).collect()
}

/// Answers kept until their TTL runs out (bounded, so a flood of domains cannot grow
/// it without limit).
pub struct Cache {
    entries: HashMap<(String, RecordType), (Instant, Answer)>,
    entries_max: usize,
}

impl Cache {
    pub fn new(entries_max: usize) -> Cache {
        Cache {
            entries: HashMap::new(),
            entries_max,
        }
    }

    pub fn get(&self, name: &str, rtype: RecordType, now: Instant) -> Option<&Answer> {
        let (expires, answer) = self.entries.get(&(name.to_ascii_lowercase(), rtype))?;
        (now < *expires).then_some(answer)
    }

    pub fn put(&mut self, name: &str, rtype: RecordType, answer: Answer, ttl: u32, now: Instant) {
        if self.entries.len() >= self.entries_max {
            self.entries.retain(|_, (expires, _)| now < *expires);
            if self.entries.len() >= self.entries_max {
                return;
            }
        }
        // Keep answers at least a second (a TTL of 0 would mean a query per message)
        // and at most a day.
        let ttl = Duration::from_secs(ttl.clamp(1, 86_400) as u64);
        self.entries
            .insert((name.to_ascii_lowercase(), rtype), (now + ttl, answer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME, MX};
    use hickory_proto::rr::Record;

    fn response(
        id: u16,
        name: &str,
        rtype: RecordType,
        code: ResponseCode,
        records: Vec<Record>,
    ) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        for r in records {
            m.add_answer(r);
        }
        m.to_vec().unwrap()
    }

    fn mx(pref: u16, host: &str, ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_ascii("example.test.").unwrap(),
            ttl,
            RData::MX(MX::new(pref, Name::from_ascii(host).unwrap())),
        )
    }

    #[test]
    fn a_backup_mx_sends_to_the_better_ones_only() {
        let mx =
            |v: &[(u16, &str)]| Answer::Mx(v.iter().map(|(p, h)| (*p, h.to_string())).collect());
        let answer = mx(&[
            (30, "c.test"),
            (10, "a.test"),
            (20, "Me.Test."),
            (20, "b.test"),
        ]);
        // Ours at 20: 20 and worse go, whatever the case or the final dot.
        assert_eq!(
            route(&answer, "me.test", || 0),
            Route::Hosts(vec!["a.test".into()])
        );
        // The best MX: nothing better to send to.
        let best = mx(&[(5, "me.test"), (10, "a.test")]);
        assert_eq!(route(&best, "me.test", || 0), Route::BestMxIsSelf);
        // Not among them, or no MX answer: nothing to leave out.
        let Route::Hosts(all) = route(&answer, "other.test", || 0) else {
            panic!("hosts wanted")
        };
        assert_eq!(all.len(), 4);
        assert_eq!(route(&Answer::NoData, "me.test", || 0), Route::Implicit);
    }

    #[test]
    fn query_and_answer_round_trip() {
        let q = query(7, "example.test", RecordType::MX).unwrap();
        let m = Message::from_vec(&q).unwrap();
        assert!(m.metadata.recursion_desired);
        let r = response(
            7,
            "example.test.",
            RecordType::MX,
            ResponseCode::NoError,
            vec![
                mx(20, "b.example.test.", 300),
                mx(10, "a.example.test.", 60),
            ],
        );
        let (a, ttl) = parse(7, "example.test", RecordType::MX, &r).unwrap();
        assert_eq!(
            a,
            Answer::Mx(vec![
                (20, "b.example.test".into()),
                (10, "a.example.test".into())
            ])
        );
        assert_eq!(ttl, 60);
        assert_eq!(
            route(&a, "me.test", || 0),
            Route::Hosts(vec!["a.example.test".into(), "b.example.test".into()])
        );
        let a_rec = Record::from_rdata(
            Name::from_ascii("a.example.test.").unwrap(),
            30,
            RData::A(A::new(127, 0, 0, 2)),
        );
        let r = response(
            8,
            "a.example.test",
            RecordType::A,
            ResponseCode::NoError,
            vec![a_rec],
        );
        assert_eq!(
            parse(8, "a.example.test", RecordType::A, &r).unwrap(),
            (Answer::Addrs(vec!["127.0.0.2".parse().unwrap()]), 30)
        );
    }

    #[test]
    fn null_mx_nxdomain_nodata_and_failures() {
        let r = response(
            1,
            "n.test",
            RecordType::MX,
            ResponseCode::NoError,
            vec![rec("n.test.", 60, RData::MX(MX::new(0, Name::root())))],
        );
        assert_eq!(
            route(
                &parse(1, "n.test", RecordType::MX, &r).unwrap().0,
                "me.test",
                || 0
            ),
            Route::NullMx
        );
        let r = response(
            2,
            "gone.test",
            RecordType::MX,
            ResponseCode::NXDomain,
            vec![],
        );
        assert_eq!(
            route(
                &parse(2, "gone.test", RecordType::MX, &r).unwrap().0,
                "me.test",
                || 0
            ),
            Route::NoSuchDomain
        );
        let r = response(
            3,
            "plain.test",
            RecordType::MX,
            ResponseCode::NoError,
            vec![],
        );
        assert_eq!(
            route(
                &parse(3, "plain.test", RecordType::MX, &r).unwrap().0,
                "me.test",
                || 0
            ),
            Route::Implicit
        );
        let r = response(4, "x.test", RecordType::MX, ResponseCode::ServFail, vec![]);
        assert!(matches!(
            parse(4, "x.test", RecordType::MX, &r),
            Err(DnsError::ServerFailure(_))
        ));
        // An answer to another id or question is not taken.
        let r = response(5, "x.test", RecordType::MX, ResponseCode::NoError, vec![]);
        assert!(matches!(
            parse(6, "x.test", RecordType::MX, &r),
            Err(DnsError::Malformed(_))
        ));
        assert!(matches!(
            parse(5, "y.test", RecordType::MX, &r),
            Err(DnsError::Malformed(_))
        ));
        assert!(matches!(
            parse(5, "x.test", RecordType::MX, b"garbage"),
            Err(DnsError::Malformed(_))
        ));
    }

    #[test]
    fn equal_preferences_are_shuffled_only_among_themselves() {
        let mx = vec![
            (20, "c".to_string()),
            (10, "a".to_string()),
            (10, "b".to_string()),
            (30, "d".to_string()),
        ];
        let mut seen_b_first = false;
        let mut seed = 1u64;
        for _ in 0..50 {
            let rand = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                seed >> 33
            };
            let Route::Hosts(order) = route(&Answer::Mx(mx.clone()), "me.test", rand) else {
                panic!("hosts")
            };
            assert_eq!(&order[2..], ["c", "d"]);
            assert!(order[..2].contains(&"a".to_string()) && order[..2].contains(&"b".to_string()));
            seen_b_first |= order[0] == "b";
        }
        assert!(seen_b_first, "both orders occur");
    }

    fn rec(owner: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_ascii(owner).unwrap(), ttl, data)
    }

    fn cname(owner: &str, target: &str) -> Record {
        rec(
            owner,
            300,
            RData::CNAME(CNAME(Name::from_ascii(target).unwrap())),
        )
    }

    #[test]
    fn records_of_another_owner_are_ignored() {
        let a = |owner: &str, last: u8| rec(owner, 30, RData::A(A::new(127, 0, 0, last)));
        // Only a record for someone else: as if the name had none.
        let r = response(
            1,
            "mx.test.",
            RecordType::A,
            ResponseCode::NoError,
            vec![a("evil.test.", 9)],
        );
        assert_eq!(
            parse(1, "mx.test", RecordType::A, &r).unwrap().0,
            Answer::NoData
        );
        // Mixed in with the real one: the real one alone, matched without regard to case.
        let r = response(
            2,
            "mx.test.",
            RecordType::A,
            ResponseCode::NoError,
            vec![a("evil.test.", 9), a("MX.Test.", 2)],
        );
        assert_eq!(
            parse(2, "mx.test", RecordType::A, &r).unwrap().0,
            Answer::Addrs(vec!["127.0.0.2".parse().unwrap()])
        );
        let r = response(
            3,
            "example.test.",
            RecordType::MX,
            ResponseCode::NoError,
            vec![
                rec(
                    "other.test.",
                    60,
                    RData::MX(MX::new(1, Name::from_ascii("evil.test.").unwrap())),
                ),
                mx(10, "a.example.test.", 60),
            ],
        );
        assert_eq!(
            parse(3, "example.test", RecordType::MX, &r).unwrap().0,
            Answer::Mx(vec![(10, "a.example.test".into())])
        );
    }

    #[test]
    fn cname_chains_are_followed_within_the_answer() {
        let a = |owner: &str, ttl: u32| rec(owner, ttl, RData::A(A::new(127, 0, 0, 3)));
        let mut chain = cname("www.test.", "b.test.");
        chain.ttl = 20;
        let r = response(
            1,
            "www.test.",
            RecordType::A,
            ResponseCode::NoError,
            vec![
                chain,
                cname("b.test.", "c.test."),
                // Owned by a name in the chain but not its end: not the answer.
                rec("b.test.", 300, RData::A(A::new(127, 0, 0, 9))),
                a("c.test.", 300),
            ],
        );
        assert_eq!(
            parse(1, "www.test", RecordType::A, &r).unwrap(),
            (Answer::Addrs(vec!["127.0.0.3".parse().unwrap()]), 20),
            "the end of the chain; the TTL is the chain's smallest"
        );
        // A chain that loops, or is too long, is refused (temporary, as malformed).
        let r = response(
            2,
            "l.test.",
            RecordType::A,
            ResponseCode::NoError,
            vec![cname("l.test.", "m.test."), cname("m.test.", "l.test.")],
        );
        assert!(matches!(
            parse(2, "l.test", RecordType::A, &r),
            Err(DnsError::Malformed(_))
        ));
        let long: Vec<Record> = (0..=CNAME_CHAIN_MAX)
            .map(|i| cname(&format!("n{i}.test."), &format!("n{}.test.", i + 1)))
            .chain([a(&format!("n{}.test.", CNAME_CHAIN_MAX + 1), 60)])
            .collect();
        let r = response(3, "n0.test.", RecordType::A, ResponseCode::NoError, long);
        assert!(matches!(
            parse(3, "n0.test", RecordType::A, &r),
            Err(DnsError::Malformed(_))
        ));
    }

    /// NODATA at the end of a CNAME chain is a negative answer: cached for the SOA's
    /// negative TTL, not for the (longer) TTL of the chain that led there.
    #[test]
    fn nodata_through_a_cname_keeps_the_negative_ttl() {
        use hickory_proto::rr::rdata::SOA;
        let mut m = Message::new(4, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("www.test.").unwrap(),
            RecordType::MX,
        ));
        m.add_answer(cname("www.test.", "c.test."));
        let soa = SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("root.test.").unwrap(),
            1,
            3600,
            600,
            86400,
            30,
        );
        m.add_authority(rec("test.", 30, RData::SOA(soa)));
        let r = m.to_vec().unwrap();
        assert_eq!(
            parse(4, "www.test", RecordType::MX, &r).unwrap(),
            (Answer::NoData, 30)
        );
        // A chain shorter-lived than the negative TTL bounds it still.
        let mut short = cname("www.test.", "c.test.");
        short.ttl = 10;
        m.answers = vec![short];
        let r = m.to_vec().unwrap();
        assert_eq!(
            parse(4, "www.test", RecordType::MX, &r).unwrap(),
            (Answer::NoData, 10)
        );
    }

    #[test]
    fn cache_expires_and_stays_bounded() {
        let t0 = Instant::now();
        let mut c = Cache::new(2);
        c.put("A.test", RecordType::MX, Answer::NoData, 10, t0);
        assert_eq!(c.get("a.TEST", RecordType::MX, t0), Some(&Answer::NoData));
        assert_eq!(
            c.get("a.test", RecordType::MX, t0 + Duration::from_secs(11)),
            None
        );
        c.put("b.test", RecordType::MX, Answer::NoData, 10, t0);
        c.put("c.test", RecordType::MX, Answer::NoData, 10, t0);
        assert_eq!(c.get("c.test", RecordType::MX, t0), None, "full: not added");
        c.put(
            "c.test",
            RecordType::MX,
            Answer::NoData,
            10,
            t0 + Duration::from_secs(20),
        );
        assert!(
            c.get("c.test", RecordType::MX, t0 + Duration::from_secs(20))
                .is_some(),
            "expired entries make room"
        );
    }
}
