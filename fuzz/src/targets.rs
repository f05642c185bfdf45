//! The fuzz targets' bodies: one function per parser that reads bytes from the network
//! or the disk. The fuzzer binaries (`fuzz_targets/`) call them with its inputs, and
//! `tests/tests/fuzz_corpus.rs` replays the corpora through them in `cargo test`, so the
//! corpus is a regression suite that CI runs without a fuzzer.
//!
//! Each function panics only on a broken invariant (a panic in the code under test, or
//! an oracle below that does not hold): exactly what the fuzzer reports as a crash.

use ringmail::smtp::{Config, Limits, Session, Step};
use std::rc::Rc;

/// A small xorshift generator seeded from the input, so the splits and driver choices
/// are part of what the fuzzer mutates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn seed(bytes: &[u8]) -> u64 {
    let mut s = [0u8; 8];
    let n = bytes.len().min(8);
    s[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(s) | 1
}

/// Splits `data` at points drawn from `rng` (sometimes byte by byte).
fn splits<'a>(data: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let bytewise = rng.next().is_multiple_of(8);
    while !rest.is_empty() {
        let n = if bytewise {
            1
        } else {
            1 + (rng.next() % 64) as usize
        };
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

struct SessionRun {
    replies: Vec<u8>,
    bodies: Vec<Vec<u8>>,
    closed: bool,
}

/// One session: `chunks` arrive in order; finished messages are stored or failed as
/// `stored` says (the same answers for every way of splitting the input).
fn session(cfg: &Rc<Config>, relay: bool, chunks: &[&[u8]], stored: u64, end: u8) -> SessionRun {
    let mut s = Session::new(cfg.clone(), relay);
    let mut run = SessionRun {
        replies: Vec::new(),
        bodies: Vec::new(),
        closed: false,
    };
    let mut messages = 0u32;
    'feed: for chunk in chunks {
        // Half the time through the zero-copy path the driver uses.
        let mut chunk = *chunk;
        while !chunk.is_empty() {
            if stored & 1 == 0 || s.read_buf().is_empty() {
                s.push(chunk);
                chunk = &[];
            } else {
                let buf = s.read_buf();
                let n = buf.len().min(chunk.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                s.filled(n);
                chunk = &chunk[n..];
            }
            loop {
                match s.process() {
                    Step::NeedInput => break,
                    Step::Message(tx) => {
                        run.bodies.push(tx.body.to_vec());
                        if stored >> (1 + messages % 32) & 1 == 0 {
                            s.message_stored("ID");
                        } else {
                            s.message_failed("451 4.3.0 fuzz: not stored\r\n");
                        }
                        messages += 1;
                    }
                    Step::Close => {
                        run.closed = true;
                        break 'feed;
                    }
                    // The handshake succeeds at once.
                    Step::StartTls => s.tls_started(),
                    // Every other check succeeds.
                    Step::Authenticate { user, .. } => s.auth_done(if messages.is_multiple_of(2) {
                        ringmail::smtp::AuthVerdict::Ok(user)
                    } else {
                        ringmail::smtp::AuthVerdict::Failed
                    }),
                }
            }
            run.replies.extend_from_slice(s.output());
            s.clear_output();
        }
    }
    if !run.closed {
        match end % 3 {
            0 => s.idle_timeout(),
            1 => s.shutdown(),
            _ => {}
        }
        while let Step::Message(_) = s.process() {
            s.message_stored("ID");
        }
    }
    run.replies.extend_from_slice(s.output());
    run
}

/// Every reply line is `DDD` + space or dash + text + CRLF, with no bare CR or LF.
fn check_replies(out: &[u8]) {
    for line in out.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {line:?}");
        let text = &line[..line.len() - 2];
        assert!(!text.contains(&b'\r'), "bare CR in a reply: {line:?}");
        assert!(
            text.len() >= 4
                && text[..3].iter().all(u8::is_ascii_digit)
                && (text[3] == b' ' || text[3] == b'-'),
            "malformed reply line: {line:?}"
        );
        assert!((b'2'..=b'5').contains(&text[0]), "reply code {line:?}");
    }
}

/// The SMTP server core, whole sessions. Input: 8 bytes of driver choices, then what
/// the client sends. Oracles: no panic; well-formed replies; the same replies, stored
/// messages and close whether the bytes come whole or split anywhere.
pub fn smtp_session(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let (head, input) = data.split_at(8);
    let mut rng = Rng(seed(head));
    // Small limits half the time, so that every limit is within the fuzzer's reach.
    let limits = if head[0] & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            line_bytes_max: 64,
            data_line_bytes_max: 80,
            message_bytes_max: 256,
            rcpt_count_max: 3,
            error_count_max: 4,
            hop_count_max: 3,
        }
    };
    let cfg = Rc::new(Config {
        hostname: "mx.fuzz.test".into(),
        local_domains: vec!["local.test".into()],
        own_addresses: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
        limits,
        starttls: head[0] & 4 != 0,
        auth: head[0] & 8 != 0,
        auth_without_tls: head[0] & 16 != 0,
        sender_login_match: true,
        submission: head[0] & 32 != 0,
    });
    let relay = head[0] & 2 == 0;
    let stored = rng.next();
    let end = head[1];
    let whole = session(&cfg, relay, &[input], stored, end);
    check_replies(&whole.replies);
    let parts = splits(input, &mut rng);
    let split = session(&cfg, relay, &parts, stored, end);
    assert_eq!(
        String::from_utf8_lossy(&whole.replies),
        String::from_utf8_lossy(&split.replies),
        "replies differ between whole and split input"
    );
    assert_eq!(whole.bodies, split.bodies, "stored messages differ");
    assert_eq!(whole.closed, split.closed);
}

/// The SMTP client core fed server replies, as a delivery would: greeting, EHLO, a
/// transaction whenever it is ready, the body whenever it asks. Input: 8 bytes of
/// choices (transaction shape, splits), then what the server sends.
pub fn smtp_client(data: &[u8]) {
    use ringmail::smtp::client::{Client, Event, TlsWish, Transaction, TxRcpt};
    if data.len() < 8 {
        return;
    }
    let (head, input) = data.split_at(8);
    let mut rng = Rng(seed(head));
    let tx = Transaction {
        from: "sender@fuzz.test".into(),
        rcpts: (0..1 + head[0] % 4)
            .map(|i| TxRcpt {
                to: format!("r{i}@dst.test"),
                notify: (head[1] & 1 == 1).then(|| "SUCCESS,FAILURE".into()),
                orcpt: None,
            })
            .collect(),
        size: u64::from(head[2]) * 1000,
        eight_bit: head[1] & 2 != 0,
        smtputf8: head[1] & 4 != 0,
        ret: (head[1] & 8 != 0).then_some("HDRS"),
        envid: (head[1] & 16 != 0).then(|| "ENV1".into()),
    };
    // Every TLS wish, from the header: the STARTTLS path is driven as if each
    // handshake succeeded.
    let wish = match head[3] % 3 {
        0 => TlsWish::Off,
        1 => TlsWish::Opportunistic,
        _ => TlsWish::Required,
    };
    let mut c = Client::with_tls("ringmail.fuzz.test", wish);
    let mut transactions = 0;
    let mut quit = false;
    // As the delivery driver does: on `Ready`, the next transaction (a requirement the
    // server does not meet refuses it at once, and the client stays ready), or QUIT.
    let begin = |c: &mut Client, transactions: &mut u32, quit: &mut bool| loop {
        if *transactions == 4 {
            c.quit();
            *quit = true;
            return;
        }
        *transactions += 1;
        match c.start(&tx) {
            Some(Event::Done(results)) => assert_eq!(results.len(), tx.rcpts.len()),
            Some(other) => panic!("start gave {other:?}"),
            None => return,
        }
    };
    for chunk in splits(input, &mut rng) {
        let mut events: std::collections::VecDeque<Event> = c.feed(chunk).into();
        while let Some(ev) = events.pop_front() {
            match ev {
                Event::Ready if !quit => begin(&mut c, &mut transactions, &mut quit),
                Event::Ready => {}
                Event::Done(results) => {
                    assert_eq!(results.len(), tx.rcpts.len(), "one result per recipient")
                }
                Event::SendBody { .. } => events.extend(c.body_sent()),
                Event::StartTls => {
                    assert_ne!(wish, TlsWish::Off, "STARTTLS only when wished");
                    c.tls_started();
                }
                Event::Failed(_) | Event::Closed => return,
            }
        }
        c.clear_output();
    }
    let _ = c.connection_lost();
}

/// The DNS answer parser and the MX rules on its result. Input: a DNS message (its id
/// is taken as the query's, so the fuzzer gets past the id check).
pub fn dns_answer(data: &[u8]) {
    use hickory_proto::rr::RecordType;
    if data.len() < 2 {
        return;
    }
    let id = u16::from_be_bytes([data[0], data[1]]);
    for rtype in [RecordType::MX, RecordType::A, RecordType::AAAA] {
        if let Ok((answer, _ttl)) = ringmail::dns::parse(id, "example.test", rtype, data) {
            // A fixed "random" source keeps a run reproducible from its input.
            let mut n = u64::from(id);
            // As this host, a name an answer may list (the backup-MX rule runs too).
            let _ = ringmail::dns::route(&answer, "mx.example.test", || {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1);
                n
            });
        }
    }
}

/// The record decoder and the payload decoders behind it. Input: one mode byte, then
/// bytes. Mode 0: the bytes as a segment (records one after another, as recovery reads
/// them). Otherwise the bytes are framed as a valid record of kind `mode % 5` first, so
/// the payload decoders get inputs whose CRC checks out.
pub fn record_decode(data: &[u8]) {
    use ringmail_store::message::{self, RcptUpdate};
    use ringmail_store::record::{self, DecodeError, Kind};
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let payloads = |kind: Kind, payload: &[u8]| match kind {
        Kind::Message | Kind::Copy => {
            if let Ok(d) = message::decode(payload) {
                let _ = format!("{d:?}");
            }
        }
        Kind::RcptUpdate => {
            let _ = RcptUpdate::decode(payload);
        }
        Kind::Checkpoint => {
            let _ = ringmail_store::shard::decode_id_checkpoint(payload);
        }
        Kind::Account => {
            use ringmail_store::accounts::AccountRecord;
            // What decodes encodes back to the same bytes (replay and snapshots
            // rely on one spelling per record).
            if let Ok(r) = AccountRecord::decode(payload) {
                let mut again = Vec::new();
                r.encode(&mut again);
                assert_eq!(again, payload, "account record re-encodes differently");
            }
        }
        Kind::Mail => mail_record(payload),
    };
    let framed;
    let segment: &[u8] = if mode == 0 {
        bytes
    } else {
        let kind = Kind::from_u8(mode % 7).unwrap_or(Kind::Message);
        let mut out = Vec::new();
        record::encode_into(&mut out, kind, bytes);
        let got = record::decode(&out).expect("a record just encoded decodes");
        assert_eq!(
            (got.kind, got.payload, got.total_len),
            (kind, bytes, out.len())
        );
        framed = out;
        &framed
    };
    let mut at = 0;
    while at < segment.len() {
        match record::decode(&segment[at..]) {
            Ok(r) => {
                assert!(r.total_len > 0 && at + r.total_len <= segment.len());
                payloads(r.kind, r.payload);
                at += r.total_len;
            }
            Err(DecodeError::Incomplete | DecodeError::Corrupt(_)) => break,
        }
    }
    // The payload decoders also see the raw bytes.
    let _ = message::decode(bytes);
    let _ = RcptUpdate::decode(bytes);
    mail_record(bytes);
}

/// A mailbox record: decoded, and if it decodes, applied to an empty index (applying
/// is total: whatever a record names), whose snapshot section then loads again.
fn mail_record(payload: &[u8]) {
    use ringmail_store::mailbox::{decode_record, MailIndex};
    use ringmail_store::{Index, Location, Replayed};
    if decode_record(payload).is_err() {
        return;
    }
    let mut ix = MailIndex::default();
    let at = Location {
        seq: 0,
        offset: 0,
        len: 0,
    };
    ix.replay(Replayed::Record {
        at,
        kind: ringmail_store::Kind::Mail,
        payload,
    })
    .expect("a record that decodes replays");
    let mut items = Vec::new();
    let mut cursor = None;
    loop {
        cursor = ix.snapshot_chunk(cursor, &mut |b| {
            items.push(b.to_vec());
            true
        });
        if cursor.is_none() {
            break;
        }
    }
    let mut again = MailIndex::default();
    for i in &items {
        again.load(i).expect("a snapshot item loads");
    }
}

/// Any bytes as a stored message into `mime::analyze`, and as a cache blob into
/// `Meta::decode`. Oracles: every span of the part table lies inside the message (the
/// IMAP server slices with them), the parts are in part-number order, and the meta
/// survives its encoding and a shift by a served prefix.
pub fn mime_analyze(data: &[u8]) {
    use ringmail_store::mime::{analyze, Meta};
    if let Ok(m) = Meta::decode(data) {
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(
            Meta::decode(&out).as_ref(),
            Ok(&m),
            "decode(encode) of a decoded meta"
        );
    }
    let m = analyze(data);
    let len = data.len() as u64;
    assert_eq!(m.size, len);
    assert_eq!(
        (m.header.start, m.header.end(), m.text.end()),
        (0, m.text.start, len)
    );
    assert!(!m.parts.is_empty(), "a message has part 1");
    for p in &m.parts {
        assert!(
            p.header.end() <= len && p.body.end() <= len,
            "{p:?} past {len}"
        );
        if let Some((h, t)) = p.message {
            assert!(h.end() <= len && t.end() <= len, "{p:?} past {len}");
        }
    }
    assert!(m.parts.windows(2).all(|w| w[0].number < w[1].number));
    let mut out = Vec::new();
    m.encode(&mut out);
    assert_eq!(Meta::decode(&out).as_ref(), Ok(&m), "decode(encode)");
    let shifted = m.shifted(40);
    assert_eq!(shifted.header.start, 0);
    assert_eq!(shifted.size, len + 40);
}
