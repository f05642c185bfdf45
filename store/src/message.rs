//! The payload of a `Message` record: the envelope, the trace prefix ringmail adds
//! (the `Received:` header), and the body exactly as the client sent it (after
//! dot-unstuffing). The body is stored once, whatever the number of recipients; every
//! later reader refers to it by `Location` rather than copying it.
//!
//! Encoding: a version byte, then fields in order; strings and byte strings carry a u32
//! length. All integers are little endian.
//!
//! Version 2 (written only for bounces) adds, after `peer`, the failures the bounce
//! reports: a u32 count, then each as the byte string of an encoded `RcptUpdate`.
//! The failures and their bounce are one record, so they reach the disk together or
//! not at all.

use crate::codec::{put_bytes, put_opt, Reader};

const VERSION: u8 = 1;
const VERSION_WITH_REPORTS: u8 = 2;

/// DSN `RET=` (RFC 3461 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ret {
    #[default]
    Unspecified = 0,
    Full = 1,
    Hdrs = 2,
}

/// The `BODY=` a message was announced with (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    Unspecified = 0,
    SevenBit = 1,
    EightBitMime = 2,
    BinaryMime = 3,
}

/// DSN `NOTIFY=` bits (RFC 3461 §4.1).
pub mod notify {
    pub const NEVER: u8 = 1;
    pub const SUCCESS: u8 = 2;
    pub const FAILURE: u8 = 4;
    pub const DELAY: u8 = 8;

    /// The keywords of set bits, in RFC 3461 order (empty: NOTIFY was not given).
    pub fn words(bits: u8) -> Vec<&'static str> {
        [
            (NEVER, "NEVER"),
            (SUCCESS, "SUCCESS"),
            (FAILURE, "FAILURE"),
            (DELAY, "DELAY"),
        ]
        .into_iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, w)| w)
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recipient {
    /// The forward path without angle brackets, as given.
    pub address: String,
    /// `NOTIFY=` bits; 0 when the parameter was absent.
    pub notify: u8,
    /// `ORCPT=` as given (`addr-type;xtext`), if any.
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// Queue id, unique per data directory: shard in the top byte.
    pub id: u64,
    /// When the message was accepted, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    /// The reverse path without angle brackets; empty for the null sender.
    pub from: String,
    pub recipients: Vec<Recipient>,
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub ret: Ret,
    pub envid: Option<String>,
    /// The name the client gave in EHLO/HELO and its address, for logs and bounces.
    pub helo: String,
    pub peer: String,
}

/// Formats a queue id the way replies, logs and `queue list` show it.
pub fn format_id(id: u64) -> String {
    format!("{id:016X}")
}

/// Parses an id as `format_id` prints it.
pub fn parse_id(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Appends the payload of a `Message` record.
pub fn encode(out: &mut Vec<u8>, env: &Envelope, prefix: &[u8], body: &[u8]) {
    encode_with_reports(out, env, &[], prefix, body)
}

/// Appends the payload of a bounce's `Message` record that carries `reports`, the
/// recipient failures (of other messages) it reports on.
pub fn encode_with_reports(
    out: &mut Vec<u8>,
    env: &Envelope,
    reports: &[RcptUpdate],
    prefix: &[u8],
    body: &[u8],
) {
    encode_head(out, env, reports, prefix, body.len());
    out.extend_from_slice(body);
}

/// Appends everything of a `Message` payload but the body's bytes (the body's length
/// field included): the log writes the body after it straight from where the session
/// received it (see `ShardLog::append_with_body`).
pub fn encode_head(
    out: &mut Vec<u8>,
    env: &Envelope,
    reports: &[RcptUpdate],
    prefix: &[u8],
    body_len: usize,
) {
    out.push(if reports.is_empty() {
        VERSION
    } else {
        VERSION_WITH_REPORTS
    });
    out.extend_from_slice(&env.id.to_le_bytes());
    out.extend_from_slice(&env.received_at_ms.to_le_bytes());
    put_bytes(out, env.from.as_bytes());
    out.extend_from_slice(&(env.recipients.len() as u32).to_le_bytes());
    for r in &env.recipients {
        put_bytes(out, r.address.as_bytes());
        out.push(r.notify);
        put_opt(out, r.orcpt.as_deref());
    }
    out.push(env.body_type as u8);
    out.push(env.smtputf8 as u8);
    out.push(env.ret as u8);
    put_opt(out, env.envid.as_deref());
    put_bytes(out, env.helo.as_bytes());
    put_bytes(out, env.peer.as_bytes());
    if !reports.is_empty() {
        out.extend_from_slice(&(reports.len() as u32).to_le_bytes());
        let mut u = Vec::new();
        for r in reports {
            u.clear();
            r.encode(&mut u);
            put_bytes(out, &u);
        }
    }
    put_bytes(out, prefix);
    // The body goes last so a reader can find it without parsing it.
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
}

/// A decoded `Message` payload; prefix and body borrow from the record.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub envelope: Envelope,
    pub prefix: &'a [u8],
    pub body: &'a [u8],
    /// Where the body starts inside the payload.
    pub body_offset: usize,
    /// For a bounce: the recipient failures it reports (see `encode_with_reports`).
    pub reports: Vec<RcptUpdate>,
}

pub fn decode(payload: &[u8]) -> Result<Decoded<'_>, &'static str> {
    let mut r = Reader::new(payload, "message record truncated");
    let (envelope, reports, prefix) = decode_front(&mut r, payload.len())?;
    let body = r.bytes()?;
    let body_offset = r.pos() - body.len();
    if !r.at_end() {
        return Err("trailing bytes in message record");
    }
    Ok(Decoded {
        envelope,
        prefix,
        body,
        body_offset,
        reports,
    })
}

/// The envelope and the trace prefix of a `Message` payload cut where its body
/// starts (the record's bytes before `Resolved::body_offset`, framing stripped): what
/// a mailbox frontend needs before it streams the body, without reading the body.
pub fn decode_head(head: &[u8]) -> Result<(Envelope, &[u8]), &'static str> {
    let mut r = Reader::new(head, "message record head truncated");
    let (envelope, _, prefix) = decode_front(&mut r, head.len())?;
    // What is left is the body's length, and the head ends where the body starts.
    r.u32()?;
    if !r.at_end() {
        return Err("the message record head does not end where its body starts");
    }
    Ok((envelope, prefix))
}

/// Everything of a `Message` payload before its body: the envelope, a bounce's
/// reports, the trace prefix. `payload_len` bounds the counts read.
fn decode_front<'a>(
    r: &mut Reader<'a>,
    payload_len: usize,
) -> Result<(Envelope, Vec<RcptUpdate>, &'a [u8]), &'static str> {
    let version = r.u8()?;
    if version != VERSION && version != VERSION_WITH_REPORTS {
        return Err("unknown message record version");
    }
    let id = r.u64()?;
    let received_at_ms = r.u64()?;
    let from = r.string()?;
    let count = r.u32()? as usize;
    if count > payload_len {
        return Err("recipient count out of range");
    }
    let mut recipients = Vec::with_capacity(count);
    for _ in 0..count {
        let address = r.string()?;
        let notify = r.u8()?;
        let orcpt = r.opt()?;
        recipients.push(Recipient {
            address,
            notify,
            orcpt,
        });
    }
    let body_type = match r.u8()? {
        0 => BodyType::Unspecified,
        1 => BodyType::SevenBit,
        2 => BodyType::EightBitMime,
        3 => BodyType::BinaryMime,
        _ => return Err("bad body type"),
    };
    let smtputf8 = r.u8()? != 0;
    let ret = match r.u8()? {
        0 => Ret::Unspecified,
        1 => Ret::Full,
        2 => Ret::Hdrs,
        _ => return Err("bad RET"),
    };
    let envid = r.opt()?;
    let helo = r.string()?;
    let peer = r.string()?;
    let mut reports = Vec::new();
    if version == VERSION_WITH_REPORTS {
        let n = r.u32()? as usize;
        if n > payload_len {
            return Err("report count out of range");
        }
        for _ in 0..n {
            reports.push(RcptUpdate::decode(r.bytes()?)?);
        }
    }
    let prefix = r.bytes()?;
    Ok((
        Envelope {
            id,
            received_at_ms,
            from,
            recipients,
            body_type,
            smtputf8,
            ret,
            envid,
            helo,
            peer,
        },
        reports,
        prefix,
    ))
}

/// Where a recipient stands after a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptStatus {
    Queued = 0,
    Deferred = 1,
    Delivered = 2,
    Failed = 3,
    /// Put on hold by the administrator (`queue hold`): not tried until released.
    /// Unknown to binaries from before the admin API (downgrade is unsupported).
    Held = 4,
}

impl RcptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RcptStatus::Queued => "queued",
            RcptStatus::Deferred => "deferred",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Failed => "failed",
            RcptStatus::Held => "held",
        }
    }

    /// Delivered or failed: nothing more will be tried.
    pub fn is_final(self) -> bool {
        matches!(self, RcptStatus::Delivered | RcptStatus::Failed)
    }
}

/// The payload of a `RcptUpdate` record: one recipient's state after an attempt. The
/// queue replays these over the messages, so a restart resumes the retry schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptUpdate {
    pub id: u64,
    /// Index of the recipient in the message's envelope.
    pub rcpt: u32,
    pub status: RcptStatus,
    pub attempts: u32,
    /// When to try again (deferred), milliseconds since the Unix epoch; 0 otherwise.
    pub next_attempt_ms: u64,
    /// The remote reply or local reason, for logs and bounces.
    pub reply: String,
}

impl RcptUpdate {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.rcpt.to_le_bytes());
        out.push(self.status as u8);
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&self.next_attempt_ms.to_le_bytes());
        put_bytes(out, self.reply.as_bytes());
    }

    pub fn decode(payload: &[u8]) -> Result<RcptUpdate, &'static str> {
        let mut r = Reader::new(payload, "recipient update truncated");
        if r.u8()? != VERSION {
            return Err("unknown recipient update version");
        }
        let u = RcptUpdate {
            id: r.u64()?,
            rcpt: r.u32()?,
            status: match r.u8()? {
                0 => RcptStatus::Queued,
                1 => RcptStatus::Deferred,
                2 => RcptStatus::Delivered,
                3 => RcptStatus::Failed,
                4 => RcptStatus::Held,
                _ => return Err("bad recipient status"),
            },
            attempts: r.u32()?,
            next_attempt_ms: r.u64()?,
            reply: r.string()?,
        };
        if !r.at_end() {
            return Err("trailing bytes in recipient update");
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let env = Envelope {
            id: 0x0100_0000_0000_002A,
            received_at_ms: 1_700_000_000_000,
            from: "a@b.example".into(),
            recipients: vec![
                Recipient {
                    address: "x@y".into(),
                    notify: notify::SUCCESS | notify::FAILURE,
                    orcpt: Some("rfc822;x@y".into()),
                },
                Recipient {
                    address: "ü@ÿ".into(),
                    notify: 0,
                    orcpt: None,
                },
            ],
            body_type: BodyType::EightBitMime,
            smtputf8: true,
            ret: Ret::Hdrs,
            envid: Some("QQ314159".into()),
            helo: "client.example".into(),
            peer: "127.0.0.1".into(),
        };
        let mut out = Vec::new();
        encode(&mut out, &env, b"Received: x\r\n", b"body\r\n");
        let d = decode(&out).unwrap();
        assert_eq!(d.envelope, env);
        assert_eq!(d.prefix, b"Received: x\r\n");
        assert_eq!(d.body, b"body\r\n");
        assert_eq!(&out[d.body_offset..], b"body\r\n");
        for cut in 0..out.len() {
            assert!(decode(&out[..cut]).is_err());
        }
        // The head alone (what a frontend reads before streaming the body).
        let (head_env, prefix) = decode_head(&out[..d.body_offset]).unwrap();
        assert_eq!(head_env, env);
        assert_eq!(prefix, b"Received: x\r\n");
        for cut in 0..d.body_offset {
            assert!(decode_head(&out[..cut]).is_err(), "head cut at {cut}");
        }
        assert!(decode_head(&out[..d.body_offset + 1]).is_err());
    }

    #[test]
    fn a_bounce_carries_the_failures_it_reports() {
        let env = Envelope {
            id: 7,
            recipients: vec![Recipient {
                address: "sender@x".into(),
                ..Recipient::default()
            }],
            ..Envelope::default()
        };
        let reports = vec![RcptUpdate {
            id: 3,
            rcpt: 1,
            status: RcptStatus::Failed,
            attempts: 2,
            next_attempt_ms: 0,
            reply: "550 5.1.1 no such user".into(),
        }];
        let mut out = Vec::new();
        encode_with_reports(&mut out, &env, &reports, b"", b"report\r\n");
        let d = decode(&out).unwrap();
        assert_eq!(d.envelope, env);
        assert_eq!(d.reports, reports);
        assert_eq!(d.body, b"report\r\n");
        assert_eq!(&out[d.body_offset..], b"report\r\n");
        for cut in 0..out.len() {
            assert!(decode(&out[..cut]).is_err());
        }
        // Without reports the record is the version 1 record, byte for byte.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(&mut a, &env, b"p", b"b");
        encode_with_reports(&mut b, &env, &[], b"p", b"b");
        assert_eq!(a, b);
        assert_eq!(a[0], 1);
        assert!(decode(&a).unwrap().reports.is_empty());
    }

    #[test]
    fn rcpt_update_round_trip() {
        let u = RcptUpdate {
            id: 42,
            rcpt: 3,
            status: RcptStatus::Deferred,
            attempts: 2,
            next_attempt_ms: 1_800_000_000_000,
            reply: "451 4.3.0 try later".into(),
        };
        let mut out = Vec::new();
        u.encode(&mut out);
        assert_eq!(RcptUpdate::decode(&out).unwrap(), u);
        for cut in 0..out.len() {
            assert!(RcptUpdate::decode(&out[..cut]).is_err());
        }
    }

    #[test]
    fn id_format_round_trip() {
        assert_eq!(format_id(0x01000000000000FF), "01000000000000FF");
        assert_eq!(parse_id("01000000000000FF"), Some(0x01000000000000FF));
        assert_eq!(parse_id("FF"), None);
    }
}
