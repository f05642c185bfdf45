//! What the queue holds per message and recipient, and its snapshot form.
//!
//! Kept lean (boxed strings, no slack capacity): a shard may hold a million queued
//! messages, and the budget is 400 bytes of memory per stored message with
//! the queue's data included.

use ringmail_store::codec::{put_bytes, put_opt, Reader};
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
        put_bytes(out, self.from.as_bytes());
        put_opt(out, self.envid.as_deref());
        out.extend_from_slice(&(self.rcpt.len() as u32).to_le_bytes());
        for r in self.rcpt.iter() {
            put_bytes(out, r.to.as_bytes());
            out.extend_from_slice(&r.next_attempt_ms.to_le_bytes());
            put_opt(out, r.orcpt.as_deref());
            put_opt(out, r.last_reply.as_deref());
            out.extend_from_slice(&r.attempts.to_le_bytes());
            out.push(r.status as u8);
            out.push(r.notify);
        }
    }

    pub(super) fn decode(b: &[u8]) -> Result<QueuedMessage, &'static str> {
        let mut r = Reader::new(b, "truncated queue snapshot item");
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
        let from = r.str()?.into();
        let envid = r.opt_str()?.map(Into::into);
        let n = r.u32()? as usize;
        if n > b.len() {
            return Err("recipient count out of range");
        }
        let mut rcpt = Vec::with_capacity(n);
        for _ in 0..n {
            rcpt.push(QueuedRcpt {
                to: r.str()?.into(),
                next_attempt_ms: r.u64()?,
                orcpt: r.opt_str()?.map(Into::into),
                last_reply: r.opt_str()?.map(Into::into),
                attempts: r.u32()?,
                status: match r.u8()? {
                    0 => RcptStatus::Queued,
                    1 => RcptStatus::Deferred,
                    2 => RcptStatus::Delivered,
                    3 => RcptStatus::Failed,
                    4 => RcptStatus::Held,
                    _ => return Err("bad recipient status"),
                },
                notify: r.u8()?,
            });
        }
        if !r.at_end() {
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
