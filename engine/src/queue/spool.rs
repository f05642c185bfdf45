//! One shard's queue on its executor: the write path (messages and recipient
//! updates made durable before they enter the index) and the ready queue and timers
//! the scheduler takes due work from. The log, the handles, the id counter and
//! compaction are the store's ([`Shard`]); the queue is one index on it, holding one
//! reference per message while a recipient is not final.

use super::cache::{BodyBytes, Loaded, MessageText, CACHE_BYTES_MAX};
use super::model::{QueuedMessage, RcptStatus};
use super::replay::QueueIndex;
use ringmail_store::message::{self, Envelope, RcptUpdate};
use ringmail_store::{BodySource, Index, Kind, LogBytes, LogConfig, LogError, Shard, ShardLog};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::rc::Rc;

/// Called with (shard, segment) for each segment compaction deleted.
type SegmentDeleted = Box<dyn Fn(u32, u64)>;

/// One shard's queue, owned by the executor that serves the shard.
pub struct Spool {
    pub shard: u32,
    pub(super) store: Shard,
    pub(super) index: RefCell<QueueIndex>,
    /// Messages that may have a recipient due now, in arrival order (an id may be
    /// stale or repeated: `take_due` checks). The scheduler never scans the index.
    pub(super) ready: RefCell<std::collections::VecDeque<u64>>,
    /// Messages with deferred recipients, by the time they come due.
    pub(super) waiting: RefCell<BTreeMap<u64, Vec<u64>>>,
    /// Wakes the scheduler: new mail, or a flush.
    pub wake: event_listener::Event,
    /// Messages kept in memory from ingestion until they leave the queue or are
    /// deferred, so the first delivery attempt sends the bytes it received without
    /// reading them back (segments are written with direct I/O: no page cache).
    pub(super) cache: RefCell<HashMap<u64, Loaded>>,
    /// Memory the cache holds: each log buffer a cached message refers to, counted
    /// once at its allocated size however many cached messages share it (a lone
    /// message keeps its whole batch buffer alive), plus the trace prefixes.
    pub(super) cached_bytes: Cell<usize>,
    /// Log buffers cached messages refer to, by `LogBytes::buffer_id`: (messages,
    /// bytes charged for it).
    pub(super) cached_buffers: RefCell<HashMap<usize, (u32, usize)>>,
    pub(super) cache_bytes_max: Cell<usize>,
    /// Told of every segment compaction deleted (the cross-core read service, so
    /// other executors close their files of it).
    pub(super) on_segment_deleted: RefCell<Option<SegmentDeleted>>,
    /// The shard's other indexes (mailboxes, accounts): recovered and snapshotted
    /// with the queue, in this order after it.
    pub(super) others: Vec<Rc<RefCell<dyn Index>>>,
}

/// A bounce to queue with the outcomes it reports: its envelope and its text (the
/// delivery status notification, no trace prefix).
pub struct Bounce {
    pub env: Envelope,
    pub text: Vec<u8>,
}

impl Spool {
    /// Recovers the shard (repairing a torn tail) and opens its log for appending.
    pub async fn open(data: &Path, shard: u32, cfg: LogConfig) -> io::Result<Spool> {
        Self::open_with(data, shard, cfg, Vec::new()).await
    }

    /// [`Spool::open`], recovering `others` (the shard's other indexes) in the same
    /// pass; every snapshot holds them too.
    pub async fn open_with(
        data: &Path,
        shard: u32,
        cfg: LogConfig,
        others: Vec<Rc<RefCell<dyn Index>>>,
    ) -> io::Result<Spool> {
        let mut ix = QueueIndex::default();
        let store = {
            let mut borrowed: Vec<_> = others.iter().map(|o| o.borrow_mut()).collect();
            let mut indexes: Vec<&mut dyn Index> = vec![&mut ix];
            for b in borrowed.iter_mut() {
                let b: &mut dyn Index = &mut **b;
                indexes.push(b);
            }
            Shard::open(data, shard, cfg, &mut indexes).await?
        };
        tracing::info!(shard, queued = ix.messages.len(), "queue recovered");
        let mut ready = std::collections::VecDeque::new();
        let mut waiting: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for m in ix.messages.values() {
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
            store,
            index: RefCell::new(ix),
            ready: RefCell::new(ready),
            waiting: RefCell::new(waiting),
            wake: event_listener::Event::new(),
            cache: RefCell::new(HashMap::new()),
            cached_bytes: Cell::new(0),
            cached_buffers: RefCell::new(HashMap::new()),
            cache_bytes_max: Cell::new(CACHE_BYTES_MAX),
            on_segment_deleted: RefCell::new(None),
            others,
        })
    }

    /// Calls `f(shard, seq)` for every segment compaction deletes from now on.
    pub fn on_segment_deleted(&self, f: impl Fn(u32, u64) + 'static) {
        *self.on_segment_deleted.borrow_mut() = Some(Box::new(f));
    }

    /// Takes the next queue id of this shard (see `Shard::next_id`: never given
    /// twice; fails, and SMTP answers 451, once the shard's ids are used up).
    pub async fn next_id(&self) -> Result<u64, LogError> {
        self.store.next_id().await
    }

    /// Writes the message once (envelope, trace prefix, body) and returns when it is
    /// durable; only then is it in the queue. The body is copied once, from wherever
    /// its producer holds it (the SMTP session's receive chunks) into the log's write
    /// buffer, and dropped before the wait; the queue's fresh copy is that buffer.
    pub async fn enqueue(
        &self,
        env: Envelope,
        prefix: &[u8],
        body: impl BodySource,
    ) -> Result<(), LogError> {
        let body_len = body.len();
        let (ticket, crc) = self.store.append_message_with_body(
            env.id,
            |out| message::encode_head(out, &env, &[], prefix, body_len),
            &body,
        )?;
        drop(body);
        let (_, bytes) = self.store.durable_message_bytes(&ticket).await?;
        // The reference the store handed out is the queue's from here on.
        self.admit(env, prefix, bytes, crc);
        drop(ticket);
        Ok(())
    }

    /// Puts a durable message into the index and the ready queue. `body`: its bytes
    /// in the batch they were written from; `crc`: their CRC32C.
    fn admit(&self, env: Envelope, prefix: &[u8], body: LogBytes, crc: u32) {
        let m = QueuedMessage::with_crc(&env, body.len(), crc);
        self.uncache(m.id);
        let buffer = body.buffer_id();
        let new_buffer = !self.cached_buffers.borrow().contains_key(&buffer);
        let size = prefix.len() + if new_buffer { body.buffer_bytes() } else { 0 };
        if self.cached_bytes.get() + size <= self.cache_bytes_max.get() {
            self.cached_bytes.set(self.cached_bytes.get() + size);
            self.cached_buffers
                .borrow_mut()
                .entry(buffer)
                .or_insert((0, body.buffer_bytes()))
                .0 += 1;
            let loaded = Loaded {
                env,
                message: MessageText {
                    prefix: prefix.to_vec(),
                    body: BodyBytes::Log(body),
                },
            };
            self.cache.borrow_mut().insert(m.id, loaded);
        }
        let id = m.id;
        self.index.borrow_mut().messages.insert(id, m);
        self.ready.borrow_mut().push_back(id);
        self.wake.notify(usize::MAX);
    }

    /// Makes one recipient's outcome durable, then applies it.
    pub async fn record(&self, u: RcptUpdate) -> Result<(), LogError> {
        self.record_outcomes(vec![u], None).await
    }

    /// Makes the outcomes of one delivery attempt durable, then applies them; a
    /// message whose recipients are all done leaves the queue. Every record goes to
    /// the log before the first wait, so they share one batch: one fdatasync for all
    /// the recipients of the attempt.
    ///
    /// `bounce` reports the failures among `updates`. It goes first in the batch, as
    /// one record that also carries those failures, so the failures and their bounce
    /// are one durable step: replay applies a bounce's failures even if a crash tore
    /// off the failure records after it (see `replay::QueueIndex`). A failed batch is
    /// cut off whole: then neither is in the queue and the recipients stay as they
    /// were.
    pub async fn record_outcomes(
        &self,
        updates: Vec<RcptUpdate>,
        bounce: Option<Bounce>,
    ) -> Result<(), LogError> {
        let bounce_ticket = match &bounce {
            Some(b) => {
                let failures: Vec<RcptUpdate> = updates
                    .iter()
                    .filter(|u| u.status == RcptStatus::Failed)
                    .cloned()
                    .collect();
                Some(self.store.append_message_with_body(
                    b.env.id,
                    |out| message::encode_head(out, &b.env, &failures, b"", b.text.len()),
                    &b.text,
                )?)
            }
            None => None,
        };
        // Kept until applied: a snapshot taken meanwhile replays from before them.
        let mut tickets = Vec::with_capacity(updates.len());
        for u in &updates {
            tickets.push(self.store.append(Kind::RcptUpdate, |out| u.encode(out))?);
        }
        let bounce_stored = match &bounce_ticket {
            Some((t, _)) => Some(self.store.durable_message_bytes(t).await),
            None => None,
        };
        let mut durable = Ok(());
        for t in &tickets {
            if let Err(e) = self.store.durable(t).await {
                durable = Err(e);
            }
        }
        if let Err(e) = durable {
            if let (Some(Ok(_)), Some(b)) = (&bounce_stored, &bounce) {
                self.store.drop_ref(b.env.id);
            }
            return Err(e);
        }
        if let (Some(b), Some(stored), Some((_, crc))) = (bounce, bounce_stored, &bounce_ticket) {
            let (_, bytes) = stored?;
            self.admit(b.env, b"", bytes, *crc);
        }
        for u in &updates {
            self.apply(u);
        }
        drop(tickets);
        drop(bounce_ticket);
        Ok(())
    }

    /// Applies a durable recipient update to the index; a message that is done
    /// leaves it and lets its reference go.
    fn apply(&self, u: &RcptUpdate) {
        let mut index = self.index.borrow_mut();
        if let Some(m) = index.messages.get_mut(&u.id) {
            m.apply(u);
            if m.is_done() {
                index.messages.remove(&u.id);
                self.store.drop_ref(u.id);
                self.uncache(u.id);
            }
        }
        drop(index);
        if u.status == RcptStatus::Held {
            self.uncache(u.id);
        }
        if u.status == RcptStatus::Deferred {
            // Memory is for the mail flowing now: a retry reads the log.
            self.uncache(u.id);
            self.retry_at(u.id, u.next_attempt_ms);
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
        let index = &index.messages;
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
                .map(|(i, r)| (i as u32, r.to.to_string()))
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

    /// Makes every deferred recipient due now (`queue flush`).
    pub fn flush(&self) {
        for m in self.index.borrow_mut().messages.values_mut() {
            for r in m.rcpt.iter_mut() {
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

    /// Makes the deferred recipients that `pick` chooses due now (`queue flush
    /// --domain`, or one message); how many.
    pub fn flush_where(&self, mut pick: impl FnMut(&QueuedMessage, &str) -> bool) -> usize {
        let mut flushed = 0;
        let mut ready = self.ready.borrow_mut();
        for m in self.index.borrow_mut().messages.values_mut() {
            let mut any = false;
            for i in 0..m.rcpt.len() {
                if m.rcpt[i].status == RcptStatus::Deferred && pick(m, &m.rcpt[i].to) {
                    m.rcpt[i].next_attempt_ms = 0;
                    any = true;
                    flushed += 1;
                }
            }
            if any {
                // Its entry in `waiting` goes stale: `take_due` looks at the state.
                ready.push_back(m.id);
            }
        }
        drop(ready);
        self.wake.notify(usize::MAX);
        flushed
    }

    /// Calls `f` with every queued message, in id order.
    pub fn for_each(&self, mut f: impl FnMut(&QueuedMessage)) {
        self.index.borrow().messages.values().for_each(&mut f);
    }

    /// A copy of one queued message's state.
    pub fn get(&self, id: u64) -> Option<QueuedMessage> {
        self.index.borrow().messages.get(&id).cloned()
    }

    /// Where a queued message's record is now.
    pub fn resolve(&self, id: u64) -> Option<ringmail_store::Resolved> {
        self.store.resolve(id)
    }

    /// Messages kept in memory for their first delivery.
    pub fn cached_messages(&self) -> usize {
        self.cache.borrow().len()
    }

    /// Whether message `id` is kept in memory.
    pub fn is_cached(&self, id: u64) -> bool {
        self.cache.borrow().contains_key(&id)
    }

    /// Whether some recipient of queued message `id` that is not final yet satisfies
    /// `f(index, address)` (false when the message is not queued). Looks in place:
    /// no copy of the message.
    pub fn any_pending_rcpt(&self, id: u64, mut f: impl FnMut(u32, &str) -> bool) -> bool {
        self.index.borrow().messages.get(&id).is_some_and(|m| {
            m.rcpt
                .iter()
                .enumerate()
                .any(|(i, r)| !r.status.is_final() && f(i as u32, &r.to))
        })
    }

    pub fn len(&self) -> usize {
        self.index.borrow().messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.borrow().messages.is_empty()
    }

    pub fn log(&self) -> &ShardLog {
        self.store.log()
    }

    /// What the shard's indexes referred to on other shards at recovery (target
    /// shard -> ids), for the store service to hand to the owners; empty once taken.
    pub fn take_foreign(&self) -> HashMap<u32, Vec<u64>> {
        self.store.take_foreign()
    }

    /// The shard's store.
    pub fn store(&self) -> &Shard {
        &self.store
    }

    /// Syncs and closes the log, then writes a snapshot, so the next start replays
    /// nothing but what the snapshot does not hold (shutdown).
    pub async fn close(&self) {
        self.store.close().await;
        if let Err(e) = self.snapshot().await {
            tracing::warn!(shard = self.shard, error = %e, "cannot write the shutdown snapshot");
        }
    }
}

/// Other executors read this shard's messages through the queue's store.
impl ringmail_store::Owner for Spool {
    fn resolve(&self, id: u64) -> Option<ringmail_store::Resolved> {
        self.store.resolve(id)
    }

    fn pins(&self) -> &ringmail_store::Pins {
        self.store.pins()
    }

    fn add_ref(&self, id: u64) -> bool {
        self.store.add_ref(id)
    }

    fn drop_ref(&self, id: u64) -> u32 {
        self.store.drop_ref(id)
    }

    fn settle(&self) -> usize {
        self.store.settle_foreign()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::model::make_id;
    use crate::queue::replay::list;
    use crate::queue::testutil::{env, fresh_data, fresh_data_with, rcpt_states, update};
    use ringmail_store::message::Recipient;
    use ringmail_store::segment;
    use ringmail_store::shard::{COUNTER_BITS, COUNTER_LIMIT, ID_BLOCK};

    /// A cached message keeps its whole batch buffer alive, however small it is:
    /// when most messages of each batch leave at once and one stays, what the cache
    /// holds is a buffer per stayer, many times its bytes. The budget counts that.
    #[test]
    fn the_cache_budget_counts_the_batch_buffers_its_messages_keep_alive() {
        use std::rc::Rc;
        let (_d, data) = fresh_data();
        glommio::LocalExecutor::default().run(async move {
            const BUDGET: usize = 256 << 10;
            const PER_BATCH: usize = 16;
            let spool = Rc::new(Spool::open(&data, 0, LogConfig::default()).await.unwrap());
            spool.set_cache_bytes_max(BUDGET);
            let mut stayers = 0;
            for round in 0..48 {
                let mut ids = Vec::new();
                for _ in 0..PER_BATCH {
                    ids.push(spool.next_id().await.unwrap());
                }
                // Concurrent, as sessions are: they share a batch.
                let tasks: Vec<_> = ids
                    .iter()
                    .map(|&id| {
                        let spool = spool.clone();
                        glommio::spawn_local(async move {
                            let body = vec![b'a' + (round % 26) as u8; 1000];
                            spool.enqueue(env(id, 1), b"Received: x\r\n", body).await
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                for &id in &ids[1..] {
                    spool
                        .record(update(id, 0, RcptStatus::Delivered, 1))
                        .await
                        .unwrap();
                }
                stayers += 1;
                let held = spool.cache_held_bytes();
                assert!(
                    held <= BUDGET,
                    "round {round}: the cache holds {held} bytes, budget {BUDGET}"
                );
                assert_eq!(spool.cached_bytes.get(), held, "round {round}");
            }
            assert_eq!(spool.index.borrow().messages.len(), stayers);
            assert!(
                !spool.cache.borrow().is_empty(),
                "fresh messages are still cached"
            );
            // What is not cached is read from the log, byte for byte.
            let ids: Vec<u64> = spool.index.borrow().messages.keys().copied().collect();
            for id in ids {
                let l = spool.read_message(id).await.unwrap();
                assert_eq!(l.message.body.len(), 1000);
            }
        });
    }

    #[test]
    fn the_outcomes_of_one_attempt_cost_one_sync_and_all_replay() {
        let (_d, data) = fresh_data();
        let data2 = data.clone();
        let statuses = [
            RcptStatus::Delivered,
            RcptStatus::Deferred,
            RcptStatus::Failed,
            RcptStatus::Delivered,
            RcptStatus::Deferred,
        ];
        let id = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data2, 0, LogConfig::default()).await.unwrap();
            let (id, other) = (
                spool.next_id().await.unwrap(),
                spool.next_id().await.unwrap(),
            );
            for m in [id, other] {
                spool
                    .enqueue(env(m, 5), b"", b"x\r\n".to_vec())
                    .await
                    .unwrap();
            }
            let before = spool.log().batches_written();
            let updates = (0..5)
                .map(|i| update(id, i as u32, statuses[i], 1))
                .collect();
            spool.record_outcomes(updates, None).await.unwrap();
            assert_eq!(
                spool.log().batches_written() - before,
                1,
                "five recipients, one batch"
            );
            // What each attempt cost before: one batch (one fdatasync) per recipient.
            let before = spool.log().batches_written();
            for i in 0..5 {
                spool
                    .record(update(other, i, RcptStatus::Deferred, 1))
                    .await
                    .unwrap();
            }
            assert_eq!(spool.log().batches_written() - before, 5);
            spool.close().await;
            id
        });
        let listed = list(&data).unwrap();
        let m = listed.iter().find(|m| m.id == id).expect("still deferred");
        assert_eq!(
            rcpt_states(m),
            statuses.iter().map(|s| (*s, 1)).collect::<Vec<_>>()
        );
    }

    /// Copies a data directory (manifest and segments) to a fresh one.
    fn copy_data(from: &Path) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let to = d.path().to_path_buf();
        std::fs::copy(from.join("MANIFEST"), to.join("MANIFEST")).unwrap();
        let (src, dst) = (segment::shard_dir(from, 0), segment::shard_dir(&to, 0));
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
        (d, to)
    }

    #[test]
    fn a_crash_anywhere_in_a_bounce_batch_keeps_the_bounce_once_or_not_at_all() {
        let (_d, data) = fresh_data();
        let data2 = data.clone();
        // One attempt: recipient 0 failed (bounced), recipient 1 delivered.
        let (m, b, bounce_at) = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data2, 0, LogConfig::default()).await.unwrap();
            let m = spool.next_id().await.unwrap();
            spool
                .enqueue(env(m, 2), b"", b"x\r\n".to_vec())
                .await
                .unwrap();
            let b = spool.next_id().await.unwrap();
            let bounce = Bounce {
                env: Envelope {
                    id: b,
                    recipients: vec![Recipient {
                        address: "a@src.test".into(),
                        ..Recipient::default()
                    }],
                    ..Envelope::default()
                },
                text: b"report\r\n".to_vec(),
            };
            let updates = vec![
                update(m, 0, RcptStatus::Failed, 1),
                update(m, 1, RcptStatus::Delivered, 1),
            ];
            spool.record_outcomes(updates, Some(bounce)).await.unwrap();
            assert!(spool.get(m).is_none(), "done");
            assert!(spool.get(b).is_some(), "the bounce is queued");
            let r = spool.resolve(b).unwrap();
            let at = ringmail_store::Location {
                seq: r.seq,
                offset: r.offset,
                len: r.len,
            };
            // A crash, not a shutdown: no snapshot holds the batch.
            spool.log().close().await;
            (m, b, at)
        });
        let seg = segment::segment_path(&segment::shard_dir(&data, 0), bounce_at.seq);
        let bytes = std::fs::read(&seg).unwrap();
        let bounce_end = bounce_at.offset + bounce_at.len as u64;
        let first_update = ringmail_store::record::decode(&bytes[bounce_end as usize..])
            .unwrap()
            .total_len as u64;
        // Where a crash may end the batch: before it, inside the bounce, after the
        // bounce, after the failure record, nowhere (all of it reached the disk).
        let cuts = [
            Some(bounce_at.offset),
            Some(bounce_at.offset + bounce_at.len as u64 / 2),
            Some(bounce_end),
            Some(bounce_end + first_update),
            None,
        ];
        for cut in cuts {
            let (_keep, copy) = copy_data(&data);
            if let Some(len) = cut {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(segment::segment_path(
                        &segment::shard_dir(&copy, 0),
                        bounce_at.seq,
                    ))
                    .unwrap();
                f.set_len(len).unwrap();
            }
            let listed = list(&copy).unwrap();
            let bounces = listed
                .iter()
                .filter(|q| q.id == b && q.from.is_empty())
                .count();
            let original = listed.iter().find(|q| q.id == m);
            let failed = original.is_none_or(|q| q.rcpt[0].status == RcptStatus::Failed);
            match bounces {
                // The bounce is there: the failure it reports is applied, whatever
                // became of the failure record.
                1 => assert!(failed, "cut {cut:?}: bounced yet retryable: {original:?}"),
                // No bounce: the recipient is not lost, it is tried again.
                0 => assert_eq!(
                    original.map(|q| q.rcpt[0].status),
                    Some(RcptStatus::Queued),
                    "cut {cut:?}"
                ),
                n => panic!("cut {cut:?}: {n} bounces"),
            }
            // The server's own recovery agrees, and never hands the bounced
            // recipient to delivery again (so it cannot bounce twice).
            glommio::LocalExecutor::default().run(async move {
                let spool = Spool::open(&copy, 0, LogConfig::default()).await.unwrap();
                let due = spool.take_due(4_000_000_000_000, usize::MAX);
                let bounced_again = due
                    .iter()
                    .any(|(id, r)| *id == m && r.iter().any(|(i, _)| *i == 0));
                assert_eq!(bounced_again, bounces == 0, "cut {cut:?}: {due:?}");
                assert_eq!(due.iter().filter(|(id, _)| *id == b).count(), bounces);
                assert!(spool.next_id().await.unwrap() > b);
                spool.close().await;
            });
        }
    }

    #[test]
    fn ids_never_repeat_after_a_failed_batch_and_a_restart() {
        let (_d, data) = fresh_data();
        ids_never_repeat(data, 0);
    }

    /// Message ids carry the shard in their top bits and checkpoints do not: on a
    /// shard ≥ 1 the two must still compare as counters.
    #[test]
    fn ids_never_repeat_after_a_failed_batch_and_a_restart_on_shard_1() {
        let (_d, data) = fresh_data_with(2);
        ids_never_repeat(data, 1);
    }

    fn ids_never_repeat(data: std::path::PathBuf, shard: u32) {
        let data2 = data.clone();
        let given = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data2, shard, LogConfig::default())
                .await
                .unwrap();
            let mut given = Vec::new();
            let a = spool.next_id().await.unwrap();
            spool
                .enqueue(env(a, 1), b"", b"a\r\n".to_vec())
                .await
                .unwrap();
            given.push(a);
            // The next message's batch fails: answered 451, never in the log.
            let b = spool.next_id().await.unwrap();
            spool.log().faults().errno.set(libc::EIO);
            spool.log().faults().syncs.set(1);
            assert!(spool
                .enqueue(env(b, 1), b"", b"b\r\n".to_vec())
                .await
                .is_err());
            given.push(b);
            // Ids taken for sessions that never got as far as the log, past the end
            // of the first reserved block.
            for _ in 0..ID_BLOCK + 10 {
                given.push(spool.next_id().await.unwrap());
            }
            spool.close().await;
            given
        });
        assert!(given.iter().all(|id| id >> COUNTER_BITS == shard as u64));
        let highest = *given.iter().max().unwrap();
        let distinct: std::collections::HashSet<u64> = given.iter().copied().collect();
        assert_eq!(distinct.len(), given.len(), "ids repeat within a run");
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data, shard, LogConfig::default())
                .await
                .unwrap();
            for _ in 0..3 {
                let id = spool.next_id().await.unwrap();
                assert!(id > highest, "{id:X} was handed out before the restart");
            }
            spool.close().await;
        });
    }

    /// The half-way checkpoint rides along with a batch; if that batch fails, the
    /// block's end must not hand out the old error while the disk works again.
    #[test]
    fn a_failed_half_way_checkpoint_is_written_again_at_the_blocks_end() {
        let (_d, data) = fresh_data();
        let data2 = data.clone();
        let highest = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data2, 0, LogConfig::default()).await.unwrap();
            // Up to the id whose taking appends the next block's checkpoint.
            let mut last = 0;
            while !spool.store().reservation_pending() {
                last = spool.next_id().await.unwrap();
            }
            spool.log().faults().errno.set(libc::EIO);
            spool.log().faults().syncs.set(1);
            assert!(spool
                .enqueue(env(last, 1), b"", b"x\r\n".to_vec())
                .await
                .is_err());
            // The disk is healthy again; the rest of the block and well past its end.
            for _ in 0..ID_BLOCK {
                last = spool.next_id().await.expect("a stale error");
            }
            spool.close().await;
            last
        });
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data, 0, LogConfig::default()).await.unwrap();
            assert!(spool.next_id().await.unwrap() > highest);
            spool.close().await;
        });
    }

    #[test]
    fn next_id_fails_once_the_counters_are_used_up() {
        let (_d, data) = fresh_data_with(2);
        let data2 = data.clone();
        glommio::LocalExecutor::default().run(async move {
            // A shard that has reserved all but its last three counters.
            let spool = Spool::open(&data2, 1, LogConfig::default()).await.unwrap();
            spool.store().reserve(COUNTER_LIMIT - 3).await.unwrap();
            spool.close().await;
        });
        glommio::LocalExecutor::default().run(async move {
            for run in 0..2 {
                let spool = Spool::open(&data, 1, LogConfig::default()).await.unwrap();
                let mut got = Vec::new();
                while let Ok(id) = spool.next_id().await {
                    got.push(id);
                    assert!(got.len() <= 3, "{id:X} is past the last counter");
                }
                // Only the first run gets the last three; a restart gets none.
                let want: Vec<u64> = match run {
                    0 => (COUNTER_LIMIT - 3..COUNTER_LIMIT)
                        .map(|c| make_id(1, c))
                        .collect(),
                    _ => vec![],
                };
                assert_eq!(got, want, "run {run}");
                assert!(spool.next_id().await.is_err(), "stays exhausted");
                spool.close().await;
            }
        });
    }
}
