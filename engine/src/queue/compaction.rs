//! Reclaiming log space: deleting finished segments and copying long-lived messages
//! forward so they do not pin old segments.

use super::cache::decode_record;
use super::model::{encode_id_checkpoint, RcptStatus};
use super::spool::Spool;
use ringmail_store::message::RcptUpdate;
use ringmail_store::segment;
use ringmail_store::{Kind, Location, LogError};
use std::io;
use std::path::Path;

/// At most this many bytes of live messages are copied forward per compaction.
const COPY_BYTES_PER_ROUND: u64 = 64 << 20;

/// Runs blocking file-system calls (directory reads, unlinks, directory fsyncs) on
/// glommio's blocking thread pool: on the executor thread a slow disk would stall
/// every session of the core for as long as the call takes.
async fn off_executor<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(f).await
}

/// The shard's segments in sequence order, and the valid bytes of those older than
/// the newest two (the ones compaction may copy live messages out of).
fn list_segments(dir: &Path) -> io::Result<(Vec<u64>, u64)> {
    #[cfg(test)]
    tests::note_thread(dir);
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()
                .and_then(segment::parse_segment_name)
        })
        .collect();
    seqs.sort_unstable();
    let old_below = seqs.last().map_or(0, |n| n.saturating_sub(1));
    let old_bytes = seqs
        .iter()
        .filter(|s| **s < old_below)
        .filter_map(|s| segment::sealed_len(dir, *s))
        .sum();
    Ok((seqs, old_bytes))
}

/// Deletes finished segments, then makes the deletions durable.
fn delete_segments(dir: &Path, seqs: &[u64]) -> io::Result<()> {
    #[cfg(test)]
    tests::note_thread(dir);
    for seq in seqs {
        std::fs::remove_file(segment::segment_path(dir, *seq))?;
    }
    segment::sync_dir(dir)
}

impl Spool {
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
        let dir = self.dir.clone();
        let (seqs, old_bytes) = off_executor(move || list_segments(&dir)).await?;
        let Some(&newest) = seqs.last() else {
            return Ok(0);
        };
        // The two newest segments hold the mail flowing now: never copied.
        let old_below = newest.saturating_sub(1);
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
        // The reserved high-water, not the counter: the checkpoint that reserved the
        // current block may be in a segment about to be deleted.
        let next = self.reserved.get();
        let ticket = self
            .log
            .append(Kind::Checkpoint, |out| encode_id_checkpoint(out, next));
        self.log
            .durable(ticket.map_err(|e| io::Error::other(e.to_string()))?)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        // Only now, with the checkpoint durable, may the segments go.
        let dir = self.dir.clone();
        let n = dead.len();
        off_executor(move || delete_segments(&dir, &dead)).await?;
        tracing::info!(shard = self.shard, segments = n, below = limit, "compacted");
        Ok(n)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::replay::list;
    use crate::queue::testutil::{
        env, fresh_data, fresh_data_with, one_deferred, rcpt_states, update,
    };
    use ringmail_store::LogConfig;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::thread::ThreadId;

    /// The threads compaction's file-system calls ran on, per shard directory.
    static FS_THREADS: Mutex<Option<HashMap<std::path::PathBuf, Vec<ThreadId>>>> = Mutex::new(None);

    pub(super) fn note_thread(dir: &Path) {
        FS_THREADS
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .entry(dir.to_path_buf())
            .or_default()
            .push(std::thread::current().id());
    }

    fn fs_threads(dir: &Path) -> Vec<ThreadId> {
        FS_THREADS
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|m| m.get(dir).cloned())
            .unwrap_or_default()
    }

    #[test]
    fn compaction_does_its_file_system_calls_off_the_executor_thread() {
        let (_d, data) = fresh_data();
        let small = LogConfig {
            segment_bytes_max: 8 << 10,
        };
        let dir = segment::shard_dir(&data, 0);
        let dir2 = dir.clone();
        let (executor, deleted) = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data, 0, small).await.unwrap();
            for _ in 0..10 {
                let id = spool.next_id().await.unwrap();
                spool
                    .enqueue(env(id, 1), b"", vec![b'x'; 2000])
                    .await
                    .unwrap();
                spool
                    .record(update(id, 0, RcptStatus::Delivered, 1))
                    .await
                    .unwrap();
            }
            let deleted = spool.compact().await.unwrap();
            spool.close().await;
            (std::thread::current().id(), deleted)
        });
        assert!(deleted >= 2, "segments were deleted: {deleted}");
        let threads = fs_threads(&dir2);
        // One listing, one deletion.
        assert_eq!(threads.len(), 2, "{threads:?}");
        assert!(
            threads.iter().all(|t| *t != executor),
            "a file-system call ran on the executor thread"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "all but the newest segment are gone"
        );
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
                let id = spool.next_id().await.unwrap();
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
            assert!(spool.next_id().await.unwrap() > *ids.last().unwrap());
            spool.close().await;
        });
    }

    /// A long DATA session takes an id early and commits late, after later ids whose
    /// segments compaction then deletes: the restart must continue after those too,
    /// on a shard ≥ 1 as well (its message ids carry the shard, checkpoints do not).
    #[test]
    fn ids_never_repeat_after_an_out_of_order_commit_and_compaction() {
        let (_d, data) = fresh_data_with(2);
        let small = LogConfig {
            segment_bytes_max: 8 << 10,
        };
        let body = vec![b'x'; 2000];
        let data2 = data.clone();
        let given = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data2, 1, small).await.unwrap();
            let slow = spool.next_id().await.unwrap();
            let mut given = vec![slow];
            let mut fast = Vec::new();
            for _ in 0..10 {
                let id = spool.next_id().await.unwrap();
                spool.enqueue(env(id, 1), b"", body.clone()).await.unwrap();
                fast.push(id);
            }
            // Too big to share a segment: it opens one of its own, so no record of a
            // later id survives the compaction below.
            let big = vec![b'x'; 7000];
            spool.enqueue(env(slow, 1), b"", big).await.unwrap();
            for &id in &fast {
                spool
                    .record(update(id, 0, RcptStatus::Delivered, 1))
                    .await
                    .unwrap();
            }
            assert!(
                spool.compact().await.unwrap() >= 2,
                "the fast ones' segments go"
            );
            given.extend(fast);
            spool.close().await;
            given
        });
        let highest = *given.iter().max().unwrap();
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data, 1, small).await.unwrap();
            assert_eq!(spool.len(), 1, "the slow one is still queued");
            let id = spool.next_id().await.unwrap();
            assert!(id > highest, "{id:X} was handed out before the restart");
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
            let pinned = spool.next_id().await.unwrap();
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
                let id = spool.next_id().await.unwrap();
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
            assert!(
                spool.next_id().await.unwrap() > pinned + 60,
                "ids are not reused"
            );
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
