//! The queue: what each shard holds for delivery, rebuilt from its log at start.
//!
//! A [`Spool`] is one shard's queue on its executor: the log writer and an in-memory
//! index of queued messages (envelopes and body locations; bodies stay on disk).
//! [`list`] reads the same logs offline with the same recovery code, for
//! `ringmail queue list`.

use ringmail_store::message::{self, Envelope};
use ringmail_store::segment::{self, recover_shard, Mode};
use ringmail_store::{Kind, Location, LogConfig, LogError, RecoveryReport, ShardLog};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::path::Path;

/// Per-recipient delivery state. Delivery does not exist yet, so all are `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptStatus {
    Queued,
}

impl RcptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RcptStatus::Queued => "queued",
        }
    }
}

#[derive(Debug, Clone)]
pub struct QueuedRcpt {
    pub to: String,
    pub status: RcptStatus,
    pub attempts: u32,
    /// DSN `NOTIFY=` bits and `ORCPT=`, as the client gave them.
    pub notify: u8,
    pub orcpt: Option<String>,
}

impl QueuedRcpt {
    fn new(r: message::Recipient) -> QueuedRcpt {
        QueuedRcpt {
            to: r.address,
            status: RcptStatus::Queued,
            attempts: 0,
            notify: r.notify,
            orcpt: r.orcpt,
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
    fn from_record(loc: Location, payload: &[u8]) -> Result<QueuedMessage, &'static str> {
        let d = message::decode(payload)?;
        Ok(QueuedMessage::new(d.envelope, d.body, loc))
    }

    fn new(env: Envelope, body: &[u8], location: Location) -> QueuedMessage {
        QueuedMessage {
            id: env.id,
            from: env.from,
            rcpt: env.recipients.into_iter().map(QueuedRcpt::new).collect(),
            received_at_ms: env.received_at_ms,
            size: body.len() as u64,
            body_crc32c: crc32c::crc32c(body),
            location,
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            ret: env.ret,
            envid: env.envid,
        }
    }

    /// One line of `queue list --json` (JSON Lines, DESIGN.md's contract).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": message::format_id(self.id),
            "from": self.from,
            "rcpt": self.rcpt.iter().map(|r| serde_json::json!({
                "to": r.to,
                "status": r.status.as_str(),
                "attempts": r.attempts,
                "notify": notify_words(r.notify),
                "orcpt": r.orcpt,
            })).collect::<Vec<_>>(),
            "size": self.size,
            "received_at_ms": self.received_at_ms,
            "crc32c": format!("{:08x}", self.body_crc32c),
            "body": match self.body_type {
                message::BodyType::Unspecified => None,
                message::BodyType::SevenBit => Some("7BIT"),
                message::BodyType::EightBitMime => Some("8BITMIME"),
                message::BodyType::BinaryMime => Some("BINARYMIME"),
            },
            "smtputf8": self.smtputf8,
            "ret": match self.ret {
                message::Ret::Unspecified => None,
                message::Ret::Full => Some("FULL"),
                message::Ret::Hdrs => Some("HDRS"),
            },
            "envid": self.envid,
        })
    }
}

/// DSN `NOTIFY=` bits as the keywords of RFC 3461 (empty: not given).
fn notify_words(bits: u8) -> Vec<&'static str> {
    use message::notify::*;
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

/// The id counter lives in the low 56 bits; the shard in the top 8 (shards ≤ 256).
const COUNTER_BITS: u32 = 56;

pub fn make_id(shard: u32, counter: u64) -> u64 {
    debug_assert!(counter < 1 << COUNTER_BITS);
    ((shard as u64) << COUNTER_BITS) | counter
}

/// Replays a shard's log into a message index.
pub fn recover(
    data: &Path,
    shard: u32,
    mode: Mode,
) -> io::Result<(
    BTreeMap<u64, QueuedMessage>,
    ringmail_store::Tail,
    RecoveryReport,
)> {
    let dir = segment::shard_dir(data, shard);
    let mut index = BTreeMap::new();
    let mut bad = 0u64;
    let (tail, mut report) = recover_shard(&dir, shard, mode, |loc, rec| match rec.kind {
        Kind::Message => match QueuedMessage::from_record(loc, rec.payload) {
            Ok(m) => {
                index.insert(m.id, m);
            }
            Err(_) => bad += 1,
        },
    })?;
    if bad > 0 {
        report
            .damaged
            .push(format!("{bad} message records did not decode"));
    }
    Ok((index, tail, report))
}

/// One shard's queue, owned by the executor that serves the shard.
pub struct Spool {
    pub shard: u32,
    log: ShardLog,
    next_counter: Cell<u64>,
    index: RefCell<BTreeMap<u64, QueuedMessage>>,
}

impl Spool {
    /// Recovers the shard (repairing a torn tail) and opens its log for appending.
    pub async fn open(data: &Path, shard: u32, cfg: LogConfig) -> io::Result<Spool> {
        let (index, tail, report) = recover(data, shard, Mode::Repair)?;
        if report.truncated_bytes > 0 || !report.damaged.is_empty() {
            tracing::warn!(shard, truncated_bytes = report.truncated_bytes, damaged = ?report.damaged, "recovery repaired the log");
        }
        tracing::info!(
            shard,
            segments = report.segments,
            records = report.records,
            queued = index.len(),
            "shard recovered"
        );
        let counter = index
            .keys()
            .next_back()
            .map_or(1, |id| (id & ((1 << COUNTER_BITS) - 1)) + 1);
        let log = ShardLog::open(&segment::shard_dir(data, shard), shard, tail, cfg).await?;
        Ok(Spool {
            shard,
            log,
            next_counter: Cell::new(counter),
            index: RefCell::new(index),
        })
    }

    /// Takes the next queue id of this shard.
    pub fn next_id(&self) -> u64 {
        let c = self.next_counter.get();
        self.next_counter.set(c + 1);
        make_id(self.shard, c)
    }

    /// Writes the message once (envelope, trace prefix, body) and returns when it is
    /// durable; only then is it in the queue.
    pub async fn enqueue(&self, env: Envelope, prefix: &[u8], body: &[u8]) -> Result<(), LogError> {
        let ticket = self.log.append(Kind::Message, |out| {
            message::encode(out, &env, prefix, body)
        })?;
        let location = self.log.durable(ticket).await?;
        let m = QueuedMessage::new(env, body, location);
        self.index.borrow_mut().insert(m.id, m);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.index.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.borrow().is_empty()
    }

    pub fn log(&self) -> &ShardLog {
        &self.log
    }

    /// Syncs and closes the log (shutdown).
    pub async fn close(&self) {
        self.log.close().await;
    }
}

/// `ringmail queue list`: every queued message of every shard, read offline.
pub fn list(data: &Path) -> io::Result<Vec<QueuedMessage>> {
    let manifest = ringmail_store::manifest::read(data)?;
    let mut all = Vec::new();
    for shard in 0..manifest.shards {
        let (index, _, report) = recover(data, shard, Mode::ReadOnly)?;
        for d in &report.damaged {
            eprintln!("ringmail: shard {shard}: {d}");
        }
        all.extend(index.into_values());
    }
    all.sort_by_key(|m| (m.received_at_ms, m.id));
    Ok(all)
}
