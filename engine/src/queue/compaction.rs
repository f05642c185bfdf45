//! Reclaiming log space: the queue's side of it. The store decides what to delete
//! and what to copy (by liveness, see `ringmail_store::shard`); the queue snapshots
//! its index first, as the store can only reclaim what lies before the older of
//! the two snapshots it keeps.

use super::spool::Spool;
use ringmail_store::Index;
use std::cell::RefCell;
use std::io;

impl Spool {
    /// Writes a snapshot when the log grew enough since the last one, then lets the
    /// store reclaim segments. Returns the number of segments deleted.
    pub async fn compact(&self) -> io::Result<usize> {
        // Twice when only one snapshot is kept (the shard's first, or after a damaged
        // one): the store reclaims only what lies before the older of the two.
        for _ in 0..2 {
            if !self.store.snapshot_due() {
                break;
            }
            self.snapshot().await?;
        }
        let done = self.store.compact().await?;
        if done.deleted > 0 || done.copied > 0 {
            tracing::info!(
                shard = self.shard,
                deleted = done.deleted,
                copied = done.copied,
                copied_bytes = done.copied_bytes,
                "compacted"
            );
        }
        if let Some(f) = &*self.on_segment_deleted.borrow() {
            for seq in &done.deleted_seqs {
                f(self.shard, *seq);
            }
        }
        Ok(done.deleted)
    }

    /// Writes a snapshot of the store and the queue (streamed: sessions go on).
    pub async fn snapshot(&self) -> io::Result<()> {
        let mut all: Vec<&RefCell<dyn Index>> = vec![&self.index];
        all.extend(self.others.iter().map(|o| &**o));
        self.store.snapshot(&all).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::model::RcptStatus;
    use crate::queue::replay::list;
    use crate::queue::testutil::{env, fresh_data, fresh_data_with, rcpt_states, update};
    use ringmail_store::{segment, LogConfig};
    use std::path::Path;

    fn small() -> LogConfig {
        LogConfig {
            segment_bytes_max: 8 << 10,
            ..LogConfig::default()
        }
    }

    /// A spool as the runtime has it once the executors exchanged their references
    /// (these tests have no other shard's index, so none come).
    async fn open_settled(data: &Path, shard: u32) -> Spool {
        let spool = Spool::open(data, shard, small()).await.unwrap();
        spool.store().settle_foreign();
        spool
    }

    fn seg_count(data: &Path) -> usize {
        std::fs::read_dir(segment::shard_dir(data, 0))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .and_then(segment::parse_segment_name)
                    .is_some()
            })
            .count()
    }

    /// Segments go by what is live in them, not as a prefix: a message that stays
    /// queued keeps its own segment, not every segment after it.
    #[test]
    fn compaction_deletes_segments_without_live_mail_and_ids_are_never_reused() {
        let (_d, data) = fresh_data();
        let body = vec![b'x'; 2000];
        let data2 = data.clone();
        let ids = glommio::LocalExecutor::default().run(async move {
            let spool = open_settled(&data2, 0).await;
            let mut ids = Vec::new();
            for _ in 0..20 {
                let id = spool.next_id().await.unwrap();
                spool.enqueue(env(id, 1), b"", body.clone()).await.unwrap();
                ids.push(id);
            }
            let before = seg_count(&data2);
            assert!(before >= 5, "small segments roll: {before}");
            // Nothing is finished yet: nothing to delete, and segments full of live
            // mail are not copied either.
            assert_eq!(spool.compact().await.unwrap(), 0);
            assert_eq!(seg_count(&data2), before);
            // All but the first one are delivered: it keeps its own segment only.
            for &id in &ids[1..] {
                spool
                    .record(update(id, 0, RcptStatus::Delivered, 1))
                    .await
                    .unwrap();
            }
            let deleted = spool.compact().await.unwrap();
            assert!(deleted >= before - 3, "{deleted} of {before} deleted");
            assert_eq!(seg_count(&data2), before - deleted);
            assert_eq!(spool.len(), 1);
            let l = spool.read_message(ids[0]).await.unwrap();
            assert_eq!(&l.message.body[..], &body[..]);
            spool
                .record(update(ids[0], 0, RcptStatus::Delivered, 1))
                .await
                .unwrap();
            spool.compact().await.unwrap();
            assert!(seg_count(&data2) <= 2, "{}", seg_count(&data2));
            spool.close().await;
            ids
        });
        // A restart finds an empty queue and still does not reuse an id.
        assert!(list(&data).unwrap().is_empty());
        glommio::LocalExecutor::default().run(async move {
            let spool = open_settled(&data, 0).await;
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
        let body = vec![b'x'; 2000];
        let data2 = data.clone();
        let given = glommio::LocalExecutor::default().run(async move {
            let spool = open_settled(&data2, 1).await;
            let slow = spool.next_id().await.unwrap();
            let mut given = vec![slow];
            let mut fast = Vec::new();
            for _ in 0..10 {
                let id = spool.next_id().await.unwrap();
                spool.enqueue(env(id, 1), b"", body.clone()).await.unwrap();
                fast.push(id);
            }
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
            // A crash: no shutdown snapshot, only the one compaction wrote.
            spool.log().close().await;
            given
        });
        let highest = *given.iter().max().unwrap();
        glommio::LocalExecutor::default().run(async move {
            let spool = open_settled(&data, 1).await;
            assert_eq!(spool.len(), 1, "the slow one is still queued");
            let id = spool.next_id().await.unwrap();
            assert!(id > highest, "{id:X} was handed out before the restart");
            spool.close().await;
        });
    }

    #[test]
    fn a_long_deferred_message_is_copied_forward_and_its_segment_freed() {
        let (_d, data) = fresh_data();
        let pinned_body: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
        let data2 = data.clone();
        let body2 = pinned_body.clone();
        let pinned = glommio::LocalExecutor::default().run(async move {
            let spool = open_settled(&data2, 0).await;
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
            let first = spool.resolve(pinned).unwrap();
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
            let now = spool.resolve(pinned).unwrap();
            assert!(now.seq > first.seq, "copied forward: {first:?} -> {now:?}");
            assert!(
                !segment::segment_path(&segment::shard_dir(&data2, 0), first.seq).exists(),
                "its old segment is gone"
            );
            assert_eq!(now.body_len, first.body_len);
            // Delivery reads the copy.
            let l = spool.read_message(pinned).await.unwrap();
            assert_eq!(l.message.to_vec(), [&b"P: x\r\n"[..], &body2].concat());
            // A crash: no shutdown snapshot.
            spool.log().close().await;
            pinned
        });
        // Replay from the snapshot and the copy gives the same state.
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
            let spool = open_settled(&data, 0).await;
            let l = spool.read_message(pinned).await.unwrap();
            assert_eq!(&l.message.body[..], &pinned_body[..]);
            assert!(
                spool.next_id().await.unwrap() > pinned + 60,
                "ids are not reused"
            );
            spool.close().await;
        });
    }

    /// A reader's pin keeps a segment whose live records were copied away: the copy
    /// is durable, the old segment stays (as after a crash between the two), and
    /// replay takes the copy while updates after it still apply.
    #[test]
    fn a_pinned_segment_is_kept_and_a_crash_between_copy_and_delete_replays_the_same() {
        let (_d, data) = fresh_data();
        let data2 = data.clone();
        let (id, old) = glommio::LocalExecutor::default().run(async move {
            let spool = open_settled(&data2, 0).await;
            let id = spool.next_id().await.unwrap();
            spool
                .enqueue(env(id, 2), b"", vec![b'k'; 500])
                .await
                .unwrap();
            spool
                .record(update(id, 1, RcptStatus::Deferred, 2))
                .await
                .unwrap();
            for _ in 0..20 {
                let n = spool.next_id().await.unwrap();
                spool
                    .enqueue(env(n, 1), b"", vec![b'y'; 1800])
                    .await
                    .unwrap();
                spool
                    .record(update(n, 0, RcptStatus::Delivered, 1))
                    .await
                    .unwrap();
            }
            let old = spool.resolve(id).unwrap();
            spool.store().pins().pin(old.seq);
            spool.compact().await.unwrap();
            let dir = segment::shard_dir(&data2, 0);
            assert!(segment::segment_path(&dir, old.seq).exists(), "pinned");
            assert_ne!(spool.resolve(id).unwrap().seq, old.seq, "copied");
            // An update after the copy applies on top of it.
            spool
                .record(update(id, 0, RcptStatus::Delivered, 1))
                .await
                .unwrap();
            spool.store().pins().unpin(old.seq);
            spool.log().close().await;
            (id, old)
        });
        assert!(segment::segment_path(&segment::shard_dir(&data, 0), old.seq).exists());
        let listed = list(&data).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);
        assert_eq!(
            rcpt_states(&listed[0]),
            [(RcptStatus::Delivered, 1), (RcptStatus::Deferred, 2)]
        );
        glommio::LocalExecutor::default().run(async move {
            let spool = open_settled(&data, 0).await;
            assert_ne!(spool.resolve(id).unwrap().seq, old.seq, "the copy is read");
            let l = spool.read_message(id).await.unwrap();
            assert_eq!(&l.message.body[..], &vec![b'k'; 500][..]);
            // Unpinned now: the next round deletes the old segment.
            spool.compact().await.unwrap();
            assert!(!segment::segment_path(&segment::shard_dir(&data, 0), old.seq).exists());
            spool.close().await;
        });
    }
}
