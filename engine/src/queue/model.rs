//! What the queue holds per message and recipient, and its snapshot form.
//!
//! Kept lean (boxed strings, no slack capacity): a shard may hold a million queued
//! messages, and the budget is 400 bytes of memory per stored message with
//! the queue's data included.

use ringmail_store::message::{self, RcptUpdate};

pub use ringmail_store::message::RcptStatus;
pub use ringmail_store::shard::make_id;

#[derive(Debug, Clone)]
pub struct QueuedRcpt {
    pub to: Box<str>,
    /// When a deferred recipient is tried again (ms since the epoch; 0: now).
    pub next_attempt_ms: u64,
    /// DSN `ORCPT=`, as the client gave it.
    pub orcpt: Option<Box<str>>,
    /// The last attempt's reply or reason.
    pub last_reply: Option<Box<str>>,
    pub attempts: u32,
    pub status: RcptStatus,
    /// DSN `NOTIFY=` bits, as the client gave them.
    pub notify: u8,
}

impl QueuedRcpt {
    fn new(r: &message::Recipient) -> QueuedRcpt {
        QueuedRcpt {
            to: r.address.as_str().into(),
            status: RcptStatus::Queued,
            attempts: 0,
            notify: r.notify,
            orcpt: r.orcpt.as_deref().map(Into::into),
            next_attempt_ms: 0,
            last_reply: None,
        }
    }
}

/// What the queue keeps in memory per message (its record's place is the store's:
/// `Shard::resolve`).
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub id: u64,
    pub from: Box<str>,
    pub rcpt: Box<[QueuedRcpt]>,
    pub received_at_ms: u64,
    /// Body bytes as the client sent them (after dot-unstuffing).
    pub size: u64,
    pub envid: Option<Box<str>>,
    /// CRC32C of the body, so tools can check content without reading it.
    pub body_crc32c: u32,
    pub body_type: message::BodyType,
    pub smtputf8: bool,
    pub ret: message::Ret,
}

impl QueuedMessage {
    /// Every recipient delivered or failed: the message leaves the queue.
    pub fn is_done(&self) -> bool {
        self.rcpt.iter().all(|r| r.status.is_final())
    }

    /// Applies a recipient update; false when it names no recipient of this message.
    pub fn apply(&mut self, u: &RcptUpdate) -> bool {
        let Some(r) = self.rcpt.get_mut(u.rcpt as usize) else {
            return false;
        };
        r.status = u.status;
        r.attempts = u.attempts;
        r.next_attempt_ms = u.next_attempt_ms;
        r.last_reply = Some(u.reply.as_str().into());
        true
    }

    /// The queued message of a decoded `Message` record.
    pub(super) fn of_decoded(d: &message::Decoded<'_>) -> QueuedMessage {
        QueuedMessage::with_crc(
            &d.envelope,
            d.body.len(),
            ringmail_store::stats::body_crc32c(d.body),
        )
    }

    /// A message whose body's CRC the write path computed already (while copying it
    /// into the log: one pass over the body).
    pub(super) fn with_crc(env: &message::Envelope, size: usize, crc: u32) -> QueuedMessage {
        QueuedMessage {
            id: env.id,
            from: env.from.as_str().into(),
            rcpt: env.recipients.iter().map(QueuedRcpt::new).collect(),
            received_at_ms: env.received_at_ms,
            size: size as u64,
            body_crc32c: crc,
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            ret: env.ret,
            envid: env.envid.as_deref().map(Into::into),
        }
    }

    /// The message's item in the queue's snapshot section.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(1);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.received_at_ms.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.body_crc32c.to_le_bytes());
        out.push(self.body_type as u8);
        out.push(self.smtputf8 as u8);
        out.push(self.ret as u8);
        put_str(out, &self.from);
        put_opt(out, self.envid.as_deref());
        out.extend_from_slice(&(self.rcpt.len() as u32).to_le_bytes());
        for r in self.rcpt.iter() {
            put_str(out, &r.to);
            out.extend_from_slice(&r.next_attempt_ms.to_le_bytes());
            put_opt(out, r.orcpt.as_deref());
            put_opt(out, r.last_reply.as_deref());
            out.extend_from_slice(&r.attempts.to_le_bytes());
            out.push(r.status as u8);
            out.push(r.notify);
        }
    }

    pub(super) fn decode(b: &[u8]) -> Result<QueuedMessage, &'static str> {
        let mut r = Reader { b, pos: 0 };
        if r.u8()? != 1 {
            return Err("unknown queue snapshot item version");
        }
        let id = r.u64()?;
        let received_at_ms = r.u64()?;
        let size = r.u64()?;
        let body_crc32c = r.u32()?;
        let body_type = match r.u8()? {
            0 => message::BodyType::Unspecified,
            1 => message::BodyType::SevenBit,
            2 => message::BodyType::EightBitMime,
            3 => message::BodyType::BinaryMime,
            _ => return Err("bad body type"),
        };
        let smtputf8 = r.u8()? != 0;
        let ret = match r.u8()? {
            0 => message::Ret::Unspecified,
            1 => message::Ret::Full,
            2 => message::Ret::Hdrs,
            _ => return Err("bad RET"),
        };
        let from = r.str()?;
        let envid = r.opt()?;
        let n = r.u32()? as usize;
        if n > b.len() {
            return Err("recipient count out of range");
        }
        let mut rcpt = Vec::with_capacity(n);
        for _ in 0..n {
            rcpt.push(QueuedRcpt {
                to: r.str()?,
                next_attempt_ms: r.u64()?,
                orcpt: r.opt()?,
                last_reply: r.opt()?,
                attempts: r.u32()?,
                status: match r.u8()? {
                    0 => RcptStatus::Queued,
                    1 => RcptStatus::Deferred,
                    2 => RcptStatus::Delivered,
                    3 => RcptStatus::Failed,
                    _ => return Err("bad recipient status"),
                },
                notify: r.u8()?,
            });
        }
        if r.pos != b.len() {
            return Err("trailing bytes in queue snapshot item");
        }
        Ok(QueuedMessage {
            id,
            from,
            rcpt: rcpt.into_boxed_slice(),
            received_at_ms,
            size,
            envid,
            body_crc32c,
            body_type,
            smtputf8,
            ret,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], &'static str> {
        let end = self.pos.checked_add(n).ok_or("length out of range")?;
        let s = self
            .b
            .get(self.pos..end)
            .ok_or("truncated queue snapshot item")?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str(&mut self) -> Result<Box<str>, &'static str> {
        let n = self.u32()? as usize;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| "string not UTF-8")?;
        Ok(s.into())
    }
    fn opt(&mut self) -> Result<Option<Box<str>>, &'static str> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            _ => Err("bad option tag"),
        }
    }
}
