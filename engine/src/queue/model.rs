//! What the queue holds per message and recipient, and how queue ids are made.

use ringmail_store::message::{self, Envelope, RcptUpdate};
use ringmail_store::Location;

pub use ringmail_store::message::RcptStatus;

#[derive(Debug, Clone)]
pub struct QueuedRcpt {
    pub to: String,
    pub status: RcptStatus,
    pub attempts: u32,
    /// DSN `NOTIFY=` bits and `ORCPT=`, as the client gave them.
    pub notify: u8,
    pub orcpt: Option<String>,
    /// When a deferred recipient is tried again (ms since the epoch; 0: now).
    pub next_attempt_ms: u64,
    /// The last attempt's reply or reason.
    pub last_reply: Option<String>,
}

impl QueuedRcpt {
    fn new(r: message::Recipient) -> QueuedRcpt {
        QueuedRcpt {
            to: r.address,
            status: RcptStatus::Queued,
            attempts: 0,
            notify: r.notify,
            orcpt: r.orcpt,
            next_attempt_ms: 0,
            last_reply: None,
        }
    }
}

/// What the queue keeps in memory per message.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub id: u64,
    pub from: String,
    pub rcpt: Vec<QueuedRcpt>,
    pub received_at_ms: u64,
    /// Body bytes as the client sent them (after dot-unstuffing).
    pub size: u64,
    /// CRC32C of the body, so tools can check content without reading it.
    pub body_crc32c: u32,
    pub location: Location,
    pub body_type: message::BodyType,
    pub smtputf8: bool,
    pub ret: message::Ret,
    pub envid: Option<String>,
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
        r.last_reply = Some(u.reply.clone());
        true
    }

    /// The message of a `Message` record, and the failures it reports if it is a
    /// bounce.
    pub(super) fn from_record(
        loc: Location,
        payload: &[u8],
    ) -> Result<(QueuedMessage, Vec<RcptUpdate>), &'static str> {
        let d = message::decode(payload)?;
        Ok((QueuedMessage::new(d.envelope, d.body, loc), d.reports))
    }

    pub(super) fn new(env: Envelope, body: &[u8], location: Location) -> QueuedMessage {
        QueuedMessage::with_crc(env, body.len(), crc32c::crc32c(body), location)
    }

    /// A message whose body's CRC the write path computed already (while copying it
    /// into the log: one pass over the body).
    pub(super) fn with_crc(
        env: Envelope,
        size: usize,
        crc: u32,
        location: Location,
    ) -> QueuedMessage {
        QueuedMessage {
            id: env.id,
            from: env.from,
            rcpt: env.recipients.into_iter().map(QueuedRcpt::new).collect(),
            received_at_ms: env.received_at_ms,
            size: size as u64,
            body_crc32c: crc,
            location,
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            ret: env.ret,
            envid: env.envid,
        }
    }
}

/// The id counter lives in the low 56 bits; the shard in the top 8 (shards ≤ 256).
pub(super) const COUNTER_BITS: u32 = 56;
pub(super) const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// One past the last counter: a checkpoint never reserves beyond it.
pub(super) const COUNTER_LIMIT: u64 = 1 << COUNTER_BITS;

pub fn make_id(shard: u32, counter: u64) -> u64 {
    debug_assert!(counter < 1 << COUNTER_BITS);
    ((shard as u64) << COUNTER_BITS) | counter
}

/// The payload of a `Checkpoint` record of the id counter: every counter below
/// `next` may have been handed out (replay continues at `next` or later).
pub(super) fn encode_id_checkpoint(out: &mut Vec<u8>, next: u64) {
    out.push(1);
    out.extend_from_slice(&next.to_le_bytes());
}
