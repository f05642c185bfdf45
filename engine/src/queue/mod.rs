//! The queue: what each shard holds for delivery, rebuilt from its log at start.
//!
//! A [`Spool`] is one shard's queue on its executor: the log writer and an in-memory
//! index of queued messages (envelopes and body locations; bodies stay on disk).
//! [`list`] reads the same logs offline with the same recovery code, for
//! `ringmail queue list`.

pub mod retry;

use ringmail_store::message::{self, Envelope, RcptUpdate};
use ringmail_store::segment::{self, recover_shard, Mode};
use ringmail_store::{Kind, Location, LogConfig, LogError, RecoveryReport, ShardLog};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::rc::Rc;

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
                "notify": message::notify::words(r.notify),
                "orcpt": r.orcpt,
                "next_attempt_ms": (r.status == RcptStatus::Deferred).then_some(r.next_attempt_ms),
                "reply": r.last_reply,
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

/// The id counter lives in the low 56 bits; the shard in the top 8 (shards ≤ 256).
const COUNTER_BITS: u32 = 56;

pub fn make_id(shard: u32, counter: u64) -> u64 {
    debug_assert!(counter < 1 << COUNTER_BITS);
    ((shard as u64) << COUNTER_BITS) | counter
}

/// What replaying a shard's log gives.
pub struct Recovered {
    /// Messages still queued (some recipient not delivered or failed yet).
    pub index: BTreeMap<u64, QueuedMessage>,
    pub tail: ringmail_store::Tail,
    pub report: RecoveryReport,
    /// The highest id ever used in the shard, queued or not: ids are never reused.
    pub max_id: Option<u64>,
}

/// Replays a shard's log into a message index.
pub fn recover(data: &Path, shard: u32, mode: Mode) -> io::Result<Recovered> {
    let dir = segment::shard_dir(data, shard);
    let mut index: BTreeMap<u64, QueuedMessage> = BTreeMap::new();
    let mut max_id: Option<u64> = None;
    let mut bad = 0u64;
    let (tail, mut report) = recover_shard(&dir, shard, mode, |loc, rec| match rec.kind {
        Kind::Message => match QueuedMessage::from_record(loc, rec.payload) {
            Ok(m) => {
                max_id = max_id.max(Some(m.id));
                match index.get_mut(&m.id) {
                    // Ids are never reused: this is a copy written by compaction.
                    // Only the place changes; the recipients keep the state replayed
                    // so far (the copy's own updates follow it, but a crash may have
                    // torn them off while the old segment still holds the state).
                    Some(queued) => queued.location = m.location,
                    None => {
                        index.insert(m.id, m);
                    }
                }
            }
            Err(_) => bad += 1,
        },
        // An update always follows its message in the same shard's log.
        Kind::RcptUpdate => match RcptUpdate::decode(rec.payload) {
            Ok(u) => {
                // An update for a message not in the index belongs to one that is
                // done, or whose segment compaction removed: nothing to apply.
                if let Some(m) = index.get_mut(&u.id) {
                    m.apply(&u);
                    if m.is_done() {
                        index.remove(&u.id);
                    }
                }
            }
            Err(_) => bad += 1,
        },
        Kind::Checkpoint => match rec.payload {
            [1, rest @ ..] if rest.len() == 8 => {
                let next = u64::from_le_bytes(rest.try_into().unwrap());
                max_id = max_id.max(next.checked_sub(1));
            }
            _ => bad += 1,
        },
    })?;
    if bad > 0 {
        report.damaged.push(format!(
            "{bad} records did not decode or named no queued message"
        ));
    }
    Ok(Recovered {
        index,
        tail,
        report,
        max_id,
    })
}

/// One shard's queue, owned by the executor that serves the shard.
pub struct Spool {
    pub shard: u32,
    dir: std::path::PathBuf,
    log: ShardLog,
    next_counter: Cell<u64>,
    index: RefCell<BTreeMap<u64, QueuedMessage>>,
    /// Messages that may have a recipient due now, in arrival order (an id may be
    /// stale or repeated: `take_due` checks). The scheduler never scans the index.
    ready: RefCell<std::collections::VecDeque<u64>>,
    /// Messages with deferred recipients, by the time they come due.
    waiting: RefCell<BTreeMap<u64, Vec<u64>>>,
    /// Wakes the scheduler: new mail, or a flush.
    pub wake: event_listener::Event,
    /// Messages kept in memory from ingestion until they leave the queue or are
    /// deferred, so the first delivery attempt sends the bytes it received without
    /// reading them back (segments are written with direct I/O: no page cache).
    cache: RefCell<HashMap<u64, Loaded>>,
    cached_bytes: Cell<usize>,
    /// Messages with a recipient update written but not applied yet: compaction does
    /// not copy them (its snapshot of their state would miss the update).
    updating: RefCell<HashMap<u64, usize>>,
}

/// A queued message as delivery sends it: the envelope and the text.
#[derive(Clone)]
pub struct Loaded {
    pub env: Envelope,
    pub message: MessageText,
}

/// The text sent on: the trace prefix, then the body as the client sent it (shared by
/// every attempt that needs it at the same time; for a fresh message, the very buffer
/// the SMTP session received it into).
#[derive(Clone, Debug)]
pub struct MessageText {
    pub prefix: Vec<u8>,
    pub body: Rc<Vec<u8>>,
}

impl MessageText {
    pub fn len(&self) -> usize {
        self.prefix.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prefix and body in one buffer (bounces quote it).
    pub fn to_vec(&self) -> Vec<u8> {
        [&self.prefix[..], &self.body[..]].concat()
    }
}

/// Checks and frames the record of message `id` read back from its segment.
fn decode_record(id: u64, bytes: &[u8]) -> io::Result<ringmail_store::record::RecordRef<'_>> {
    ringmail_store::record::decode(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record of {id:016X}: {e:?}"),
        )
    })
}

/// Counts a recipient update of a message as in flight while it lives: also when
/// the future writing it is dropped half-way (shutdown), so the count cannot stick.
struct Updating<'a> {
    map: &'a RefCell<HashMap<u64, usize>>,
    id: u64,
}

impl<'a> Updating<'a> {
    fn new(map: &'a RefCell<HashMap<u64, usize>>, id: u64) -> Updating<'a> {
        *map.borrow_mut().entry(id).or_default() += 1;
        Updating { map, id }
    }
}

impl Drop for Updating<'_> {
    fn drop(&mut self) {
        let mut map = self.map.borrow_mut();
        if let Some(n) = map.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}

/// Bytes of messages a shard keeps in memory for delivery; past it, delivery reads
/// them from the log.
const CACHE_BYTES_MAX: usize = 128 << 20;

/// At most this many bytes of live messages are copied forward per compaction.
const COPY_BYTES_PER_ROUND: u64 = 64 << 20;

impl Spool {
    /// Recovers the shard (repairing a torn tail) and opens its log for appending.
    pub async fn open(data: &Path, shard: u32, cfg: LogConfig) -> io::Result<Spool> {
        let Recovered {
            index,
            tail,
            report,
            max_id,
        } = recover(data, shard, Mode::Repair)?;
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
        let counter = max_id.map_or(1, |id| (id & ((1 << COUNTER_BITS) - 1)) + 1);
        let log = ShardLog::open(&segment::shard_dir(data, shard), shard, tail, cfg).await?;
        let mut ready = std::collections::VecDeque::new();
        let mut waiting: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for m in index.values() {
            // Ready if any recipient is queued; otherwise due at the earliest deferral.
            if m.rcpt.iter().any(|r| r.status == RcptStatus::Queued) {
                ready.push_back(m.id);
            } else if let Some(t) = m
                .rcpt
                .iter()
                .filter(|r| r.status == RcptStatus::Deferred)
                .map(|r| r.next_attempt_ms)
                .min()
            {
                waiting.entry(t).or_default().push(m.id);
            }
        }
        Ok(Spool {
            shard,
            dir: segment::shard_dir(data, shard),
            log,
            next_counter: Cell::new(counter),
            index: RefCell::new(index),
            ready: RefCell::new(ready),
            waiting: RefCell::new(waiting),
            wake: event_listener::Event::new(),
            cache: RefCell::new(HashMap::new()),
            cached_bytes: Cell::new(0),
            updating: RefCell::new(HashMap::new()),
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
    pub async fn enqueue(
        &self,
        env: Envelope,
        prefix: &[u8],
        body: Vec<u8>,
    ) -> Result<(), LogError> {
        let ticket = self.log.append(Kind::Message, |out| {
            message::encode(out, &env, prefix, &body)
        })?;
        let location = self.log.durable(ticket).await?;
        let size = prefix.len() + body.len();
        let m = if self.cached_bytes.get() + size <= CACHE_BYTES_MAX {
            self.cached_bytes.set(self.cached_bytes.get() + size);
            let m = QueuedMessage::new(env.clone(), &body, location);
            let loaded = Loaded {
                env,
                message: MessageText {
                    prefix: prefix.to_vec(),
                    body: Rc::new(body),
                },
            };
            self.cache.borrow_mut().insert(m.id, loaded);
            m
        } else {
            QueuedMessage::new(env, &body, location)
        };
        let id = m.id;
        self.index.borrow_mut().insert(id, m);
        self.ready.borrow_mut().push_back(id);
        self.wake.notify(usize::MAX);
        Ok(())
    }

    /// Makes a delivery attempt's outcome durable, then applies it; a message whose
    /// recipients are all done leaves the queue.
    pub async fn record(&self, u: RcptUpdate) -> Result<(), LogError> {
        let ticket = self.log.append(Kind::RcptUpdate, |out| u.encode(out))?;
        let in_flight = Updating::new(&self.updating, u.id);
        let durable = self.log.durable(ticket).await;
        drop(in_flight);
        durable?;
        let mut index = self.index.borrow_mut();
        if let Some(m) = index.get_mut(&u.id) {
            m.apply(&u);
            if m.is_done() {
                index.remove(&u.id);
                self.uncache(u.id);
            }
        }
        if u.status == RcptStatus::Deferred {
            // Memory is for the mail flowing now: a retry reads the log.
            self.uncache(u.id);
            self.retry_at(u.id, u.next_attempt_ms);
        }
        Ok(())
    }

    fn uncache(&self, id: u64) {
        if let Some(l) = self.cache.borrow_mut().remove(&id) {
            self.cached_bytes
                .set(self.cached_bytes.get() - l.message.len());
        }
    }

    /// Up to `max` messages with recipients due at `now_ms`: (id, [(recipient index,
    /// address)]). Deferred messages whose time came are moved to the ready queue first.
    pub fn take_due(&self, now_ms: u64, max: usize) -> Vec<(u64, Vec<(u32, String)>)> {
        {
            let mut waiting = self.waiting.borrow_mut();
            let later = waiting.split_off(&(now_ms + 1));
            let due = std::mem::replace(&mut *waiting, later);
            let mut ready = self.ready.borrow_mut();
            for ids in due.into_values() {
                ready.extend(ids);
            }
        }
        let index = self.index.borrow();
        let mut ready = self.ready.borrow_mut();
        let mut out = Vec::new();
        while out.len() < max {
            let Some(id) = ready.pop_front() else { break };
            let Some(m) = index.get(&id) else { continue };
            let due: Vec<(u32, String)> = m
                .rcpt
                .iter()
                .enumerate()
                .filter(|(_, r)| match r.status {
                    RcptStatus::Queued => true,
                    RcptStatus::Deferred => r.next_attempt_ms <= now_ms,
                    _ => false,
                })
                .map(|(i, r)| (i as u32, r.to.clone()))
                .collect();
            if !due.is_empty() {
                out.push((id, due));
            }
        }
        out
    }

    /// Looks at a message again at `at_ms` (after a local error).
    pub fn retry_at(&self, id: u64, at_ms: u64) {
        let mut waiting = self.waiting.borrow_mut();
        let ids = waiting.entry(at_ms).or_default();
        // The recipients of one attempt share their retry time: one entry will do.
        if !ids.contains(&id) {
            ids.push(id);
        }
    }

    /// Puts a message back at the end of the ready queue (its destination was busy).
    pub fn requeue(&self, id: u64) {
        self.ready.borrow_mut().push_back(id);
    }

    /// When the next deferred message comes due, if any.
    pub fn next_wakeup_ms(&self) -> Option<u64> {
        self.waiting.borrow().keys().next().copied()
    }

    /// Reclaims space: deletes the oldest segments once nothing queued lives in them.
    /// Updates always follow their message in the log, so every record before the
    /// oldest live message's segment concerns finished messages only. A checkpoint of
    /// the id counter goes to the log first, so ids are not reused after their
    /// messages' segments are gone. Returns the number of segments deleted.
    ///
    /// A message that stays queued for long (deferred) would pin every segment after
    /// it, so live messages in old segments are first copied forward (see
    /// `copy_forward`) when that frees at least as many bytes as it writes.
    pub async fn compact(&self) -> io::Result<usize> {
        let mut seqs: Vec<u64> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()
                    .and_then(segment::parse_segment_name)
            })
            .collect();
        seqs.sort_unstable();
        let Some(&newest) = seqs.last() else {
            return Ok(0);
        };
        // The two newest segments hold the mail flowing now: never copied.
        let old_below = newest.saturating_sub(1);
        let old_bytes: u64 = seqs
            .iter()
            .filter(|s| **s < old_below)
            .filter_map(|s| segment::sealed_len(&self.dir, *s))
            .sum();
        let mut old_live: Vec<(Location, u64)> = self
            .index
            .borrow()
            .values()
            .filter(|m| m.location.seq < old_below)
            .map(|m| (m.location, m.id))
            .collect();
        let live_bytes: u64 = old_live.iter().map(|(l, _)| l.len as u64).sum();
        if !old_live.is_empty() && live_bytes * 2 <= old_bytes {
            old_live.sort_unstable_by_key(|(l, _)| (l.seq, l.offset));
            let mut budget = COPY_BYTES_PER_ROUND;
            let mut copied = 0usize;
            for (loc, id) in old_live {
                if budget < loc.len as u64 {
                    break;
                }
                budget -= loc.len as u64;
                if self.copy_forward(id, loc).await? {
                    copied += 1;
                }
            }
            tracing::info!(
                shard = self.shard,
                messages = copied,
                "copied live messages forward"
            );
        }
        let oldest_live = self.index.borrow().values().map(|m| m.location.seq).min();
        let limit = oldest_live.unwrap_or(newest).min(newest);
        let dead: Vec<u64> = seqs.into_iter().filter(|s| *s < limit).collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let next = self.next_counter.get();
        let ticket = self.log.append(Kind::Checkpoint, |out| {
            out.push(1);
            out.extend_from_slice(&next.to_le_bytes());
        });
        self.log
            .durable(ticket.map_err(|e| io::Error::other(e.to_string()))?)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        for seq in &dead {
            std::fs::remove_file(segment::segment_path(&self.dir, *seq))?;
        }
        segment::sync_dir(&self.dir)?;
        tracing::info!(
            shard = self.shard,
            segments = dead.len(),
            below = limit,
            "compacted"
        );
        Ok(dead.len())
    }

    /// Writes a queued message again at the head of the log: its record as it is,
    /// then one update per recipient that has a state of its own. Replay takes the
    /// copy's location and keeps the recipients' state while the old record is still
    /// there (even if a crash tore the copied updates off), and rebuilds the state
    /// from the copied updates once the old segment is gone (deleted only after they
    /// are durable). Skipped (false) for a message with an update in flight, or that
    /// left the queue meanwhile.
    async fn copy_forward(&self, id: u64, loc: Location) -> io::Result<bool> {
        let record = self.read_record(loc).await?;
        let payload = decode_record(id, &record)?.payload;
        // From the snapshot to the appends nothing awaits: no update can slip between.
        if self.updating.borrow().contains_key(&id) {
            return Ok(false);
        }
        let Some(m) = self.get(id) else {
            return Ok(false);
        };
        if m.location != loc {
            return Ok(false);
        }
        let log_err = |e: LogError| io::Error::other(e.to_string());
        let ticket = self
            .log
            .append(Kind::Message, |out| out.extend_from_slice(payload))
            .map_err(log_err)?;
        let mut last = None;
        for (i, r) in m.rcpt.iter().enumerate() {
            if r.status == RcptStatus::Queued && r.attempts == 0 {
                continue;
            }
            let u = RcptUpdate {
                id,
                rcpt: i as u32,
                status: r.status,
                attempts: r.attempts,
                next_attempt_ms: r.next_attempt_ms,
                reply: r.last_reply.clone().unwrap_or_default(),
            };
            last = Some(
                self.log
                    .append(Kind::RcptUpdate, |out| u.encode(out))
                    .map_err(log_err)?,
            );
        }
        let new_loc = self.log.durable(ticket).await.map_err(log_err)?;
        if let Some(t) = last {
            self.log.durable(t).await.map_err(log_err)?;
        }
        if let Some(m) = self.index.borrow_mut().get_mut(&id) {
            m.location = new_loc;
        }
        Ok(true)
    }

    /// The raw record at `loc`.
    async fn read_record(&self, loc: Location) -> io::Result<glommio::io::ReadResult> {
        let file = glommio::io::DmaFile::open(segment::segment_path(&self.dir, loc.seq)).await?;
        let bytes = file.read_at(loc.offset, loc.len as usize).await;
        let _ = file.close().await;
        Ok(bytes?)
    }

    /// A queued message as delivery sends it: from memory while it is fresh,
    /// otherwise read back from its segment.
    pub async fn read_message(&self, id: u64) -> io::Result<Loaded> {
        if let Some(l) = self.cache.borrow().get(&id) {
            return Ok(l.clone());
        }
        let location = || {
            self.get(id)
                .map(|m| m.location)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such queued message"))
        };
        let loc = location()?;
        let bytes = match self.read_record(loc).await {
            Ok(b) => b,
            // Compaction copied the message forward and deleted its old segment
            // while this read was on its way: read the new copy.
            Err(_) if location()? != loc => self.read_record(location()?).await?,
            Err(e) => return Err(e),
        };
        let rec = decode_record(id, &bytes)?;
        let d = message::decode(rec.payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Loaded {
            env: d.envelope,
            message: MessageText {
                prefix: d.prefix.to_vec(),
                body: Rc::new(d.body.to_vec()),
            },
        })
    }

    /// Makes every deferred recipient due now (`queue flush`).
    pub fn flush(&self) {
        for m in self.index.borrow_mut().values_mut() {
            for r in &mut m.rcpt {
                if r.status == RcptStatus::Deferred {
                    r.next_attempt_ms = 0;
                }
            }
        }
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        self.ready
            .borrow_mut()
            .extend(waiting.into_values().flatten());
        self.wake.notify(usize::MAX);
    }

    /// A copy of one queued message's state.
    pub fn get(&self, id: u64) -> Option<QueuedMessage> {
        self.index.borrow().get(&id).cloned()
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
        let Recovered { index, report, .. } = recover(data, shard, Mode::ReadOnly)?;
        for d in &report.damaged {
            eprintln!("ringmail: shard {shard}: {d}");
        }
        all.extend(index.into_values());
    }
    all.sort_by_key(|m| (m.received_at_ms, m.id));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmail_store::message::Recipient;

    fn env(id: u64, rcpts: usize) -> Envelope {
        Envelope {
            id,
            from: "a@src.test".into(),
            recipients: (0..rcpts)
                .map(|i| Recipient {
                    address: format!("r{i}@dst.test"),
                    ..Recipient::default()
                })
                .collect(),
            ..Envelope::default()
        }
    }

    /// A fresh data directory with a one-shard manifest.
    fn fresh_data() -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().to_path_buf();
        ringmail_store::manifest::open_or_create(&data, 1).unwrap();
        (d, data)
    }

    fn rcpt_states(m: &QueuedMessage) -> Vec<(RcptStatus, u32)> {
        m.rcpt.iter().map(|r| (r.status, r.attempts)).collect()
    }

    /// A spool with one message to two recipients, the first delivered (if
    /// `delivered`) and the second deferred after two attempts.
    async fn one_deferred(data: &Path, delivered: bool) -> (Spool, u64) {
        let spool = Spool::open(data, 0, LogConfig::default()).await.unwrap();
        let id = spool.next_id();
        spool
            .enqueue(env(id, 2), b"", b"body\r\n".to_vec())
            .await
            .unwrap();
        if delivered {
            spool
                .record(update(id, 0, RcptStatus::Delivered, 1))
                .await
                .unwrap();
        }
        spool
            .record(update(id, 1, RcptStatus::Deferred, 2))
            .await
            .unwrap();
        (spool, id)
    }

    fn update(id: u64, rcpt: u32, status: RcptStatus, attempts: u32) -> RcptUpdate {
        RcptUpdate {
            id,
            rcpt,
            status,
            attempts,
            next_attempt_ms: if status == RcptStatus::Deferred {
                1_900_000_000_000
            } else {
                0
            },
            reply: format!("{} reply", status.as_str()),
        }
    }

    #[test]
    fn recipient_updates_survive_a_restart_and_finished_messages_leave_the_queue() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().to_path_buf();
        ringmail_store::manifest::open_or_create(&data, 1).unwrap();
        let (a, b, c) = (make_id(0, 1), make_id(0, 2), make_id(0, 3));
        let data2 = data.clone();
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data2, 0, LogConfig::default()).await.unwrap();
            for id in [a, b, c] {
                spool
                    .enqueue(env(id, 2), b"", b"body\r\n".to_vec())
                    .await
                    .unwrap();
            }
            spool
                .record(update(a, 0, RcptStatus::Delivered, 1))
                .await
                .unwrap();
            spool
                .record(update(a, 1, RcptStatus::Deferred, 1))
                .await
                .unwrap();
            spool
                .record(update(b, 0, RcptStatus::Delivered, 1))
                .await
                .unwrap();
            spool
                .record(update(b, 1, RcptStatus::Delivered, 2))
                .await
                .unwrap();
            spool
                .record(update(c, 0, RcptStatus::Failed, 1))
                .await
                .unwrap();
            assert_eq!(spool.len(), 2, "b is done");
            spool.close().await;
        });
        let listed = list(&data).unwrap();
        let ids: Vec<u64> = listed.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![a, c]);
        let st = |m: &QueuedMessage| {
            m.rcpt
                .iter()
                .map(|r| (r.status, r.attempts))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            st(&listed[0]),
            [(RcptStatus::Delivered, 1), (RcptStatus::Deferred, 1)]
        );
        assert_eq!(
            st(&listed[1]),
            [(RcptStatus::Failed, 1), (RcptStatus::Queued, 0)]
        );
        let json = listed[0].to_json();
        assert_eq!(json["rcpt"][1]["status"], "deferred");
        assert_eq!(json["rcpt"][1]["next_attempt_ms"], 1_900_000_000_000u64);
        assert_eq!(json["rcpt"][1]["reply"], "deferred reply");
        // The server's own recovery sees the same.
        let data3 = data.clone();
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data, 0, LogConfig::default()).await.unwrap();
            assert_eq!(spool.len(), 2);
            assert_eq!(
                st(&spool.get(a).unwrap()),
                [(RcptStatus::Delivered, 1), (RcptStatus::Deferred, 1)]
            );
            assert!(spool.get(b).is_none());
            // New ids continue after every id ever used, queued or not.
            assert_eq!(spool.next_id(), make_id(0, 4));
            spool
                .record(update(c, 1, RcptStatus::Delivered, 1))
                .await
                .unwrap();
            spool
                .record(update(a, 1, RcptStatus::Delivered, 2))
                .await
                .unwrap();
            assert_eq!(spool.len(), 0);
            spool.close().await;
        });
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data3, 0, LogConfig::default()).await.unwrap();
            assert_eq!(spool.len(), 0);
            assert_eq!(
                spool.next_id(),
                make_id(0, 4),
                "an empty queue does not reuse ids"
            );
            spool.close().await;
        });
    }

    #[test]
    fn compaction_deletes_finished_segments_and_ids_are_never_reused() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().to_path_buf();
        ringmail_store::manifest::open_or_create(&data, 1).unwrap();
        let small = LogConfig {
            segment_bytes_max: 8 << 10,
        };
        let body = vec![b'x'; 2000];
        let seg_count = |data: &Path| {
            std::fs::read_dir(segment::shard_dir(data, 0))
                .unwrap()
                .count()
        };
        let data2 = data.clone();
        let ids = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data2, 0, small).await.unwrap();
            let mut ids = Vec::new();
            for _ in 0..20 {
                let id = spool.next_id();
                spool.enqueue(env(id, 1), b"", body.clone()).await.unwrap();
                ids.push(id);
            }
            let before = seg_count(&data2);
            assert!(before >= 5, "small segments roll: {before}");
            // Nothing is finished yet: nothing to delete.
            assert_eq!(spool.compact().await.unwrap(), 0);
            // The first 15 are delivered; the 16th still pins its segment and all later ones.
            for &id in &ids[..15] {
                spool
                    .record(update(id, 0, RcptStatus::Delivered, 1))
                    .await
                    .unwrap();
            }
            let deleted = spool.compact().await.unwrap();
            assert!(deleted >= 2, "old segments go: {deleted}");
            assert_eq!(seg_count(&data2), before - deleted);
            assert_eq!(spool.len(), 5);
            // Then everything is delivered: all but the newest segment go.
            for &id in &ids[15..] {
                spool
                    .record(update(id, 0, RcptStatus::Delivered, 1))
                    .await
                    .unwrap();
            }
            spool.compact().await.unwrap();
            assert_eq!(seg_count(&data2), 1);
            spool.close().await;
            ids
        });
        // A restart finds an empty queue and still does not reuse an id.
        assert!(list(&data).unwrap().is_empty());
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data, 0, small).await.unwrap();
            assert_eq!(spool.len(), 0);
            assert!(spool.next_id() > *ids.last().unwrap());
            spool.close().await;
        });
    }

    #[test]
    fn a_long_deferred_message_is_copied_forward_and_stops_pinning_segments() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().to_path_buf();
        ringmail_store::manifest::open_or_create(&data, 1).unwrap();
        let small = LogConfig {
            segment_bytes_max: 8 << 10,
        };
        let seg_count = |data: &Path| {
            std::fs::read_dir(segment::shard_dir(data, 0))
                .unwrap()
                .count()
        };
        let pinned_body: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
        let data2 = data.clone();
        let body2 = pinned_body.clone();
        let pinned = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data2, 0, small).await.unwrap();
            // The first message: one recipient delivered, one deferred for long.
            let pinned = spool.next_id();
            spool
                .enqueue(env(pinned, 2), b"P: x\r\n", body2.clone())
                .await
                .unwrap();
            spool
                .record(update(pinned, 0, RcptStatus::Delivered, 1))
                .await
                .unwrap();
            spool
                .record(update(pinned, 1, RcptStatus::Deferred, 3))
                .await
                .unwrap();
            // Steady relaying behind it: 60 messages come and go.
            for _ in 0..60 {
                let id = spool.next_id();
                spool
                    .enqueue(env(id, 1), b"", vec![b'y'; 1800])
                    .await
                    .unwrap();
                spool
                    .record(update(id, 0, RcptStatus::Delivered, 1))
                    .await
                    .unwrap();
            }
            let before = seg_count(&data2);
            assert!(before >= 12, "small segments roll: {before}");
            let deleted = spool.compact().await.unwrap();
            assert!(deleted >= before - 3, "{deleted} of {before} deleted");
            let m = spool.get(pinned).unwrap();
            assert!(m.location.seq >= before as u64 - 1, "copied to the head");
            // Delivery reads the copy.
            let l = spool.read_message(pinned).await.unwrap();
            assert_eq!(l.message.to_vec(), [&b"P: x\r\n"[..], &body2].concat());
            spool.close().await;
            pinned
        });
        // Replay from the copy alone gives the same state.
        let listed = list(&data).unwrap();
        assert_eq!(listed.len(), 1);
        let m = &listed[0];
        assert_eq!(m.id, pinned);
        assert_eq!(m.body_crc32c, crc32c::crc32c(&pinned_body));
        assert_eq!(
            m.rcpt
                .iter()
                .map(|r| (r.status, r.attempts, r.next_attempt_ms))
                .collect::<Vec<_>>(),
            [
                (RcptStatus::Delivered, 1, 0),
                (RcptStatus::Deferred, 3, 1_900_000_000_000)
            ]
        );
        assert_eq!(m.rcpt[1].last_reply.as_deref(), Some("deferred reply"));
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data, 0, small).await.unwrap();
            assert!(spool.next_id() > pinned + 60, "ids are not reused");
            spool.close().await;
        });
    }

    #[test]
    fn a_crash_between_copy_and_delete_replays_to_the_same_state() {
        let (_d, data) = fresh_data();
        let data2 = data.clone();
        let id = glommio::LocalExecutor::default().run(async move {
            let (spool, id) = one_deferred(&data2, false).await;
            let loc = spool.get(id).unwrap().location;
            // Copied, but the old record is still in the log (no deletion).
            assert!(spool.copy_forward(id, loc).await.unwrap());
            assert_ne!(spool.get(id).unwrap().location, loc);
            // An update after the copy applies on top of it.
            spool
                .record(update(id, 0, RcptStatus::Delivered, 1))
                .await
                .unwrap();
            spool.close().await;
            id
        });
        let listed = list(&data).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);
        assert_eq!(
            rcpt_states(&listed[0]),
            [(RcptStatus::Delivered, 1), (RcptStatus::Deferred, 2)]
        );
    }

    #[test]
    fn a_copy_whose_updates_were_torn_off_keeps_the_old_state() {
        let (_d, data) = fresh_data();
        let data2 = data.clone();
        let (id, copy) = glommio::LocalExecutor::default().run(async move {
            let (spool, id) = one_deferred(&data2, true).await;
            let loc = spool.get(id).unwrap().location;
            assert!(spool.copy_forward(id, loc).await.unwrap());
            let copy = spool.get(id).unwrap().location;
            spool.close().await;
            (id, copy)
        });
        // A crash tore the batch right after the copied message record: its updates
        // never reached the disk.
        let seg = segment::segment_path(&segment::shard_dir(&data, 0), copy.seq);
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(copy.offset + copy.len as u64).unwrap();
        drop(f);
        let listed = list(&data).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);
        assert_eq!(
            listed[0].location, copy,
            "the copy is where it is read from"
        );
        assert_eq!(
            rcpt_states(&listed[0]),
            [(RcptStatus::Delivered, 1), (RcptStatus::Deferred, 2)],
            "not reset to queued"
        );
    }
}
