//! The queue's index on the store: what replay and snapshots rebuild, at start and
//! offline for `queue list`.

use super::model::QueuedMessage;
use ringmail_store::message::RcptUpdate;
use ringmail_store::segment::Mode;
use ringmail_store::shard::{self, Index, Replayed};
use ringmail_store::{Kind, RecoveryReport};
use std::collections::BTreeMap;
use std::io;
use std::path::Path;

/// Messages still queued (some recipient not delivered or failed yet). Each holds
/// one reference to its message in the store.
#[derive(Default)]
pub struct QueueIndex {
    pub(super) messages: BTreeMap<u64, QueuedMessage>,
}

impl QueueIndex {
    fn apply(&mut self, u: &RcptUpdate) {
        if let Some(m) = self.messages.get_mut(&u.id) {
            m.apply(u);
            if m.is_done() {
                self.messages.remove(&u.id);
            }
        }
    }
}

impl Index for QueueIndex {
    fn replay(&mut self, rec: Replayed<'_>) -> Result<(), &'static str> {
        match rec {
            Replayed::Message { decoded, .. } => {
                let id = decoded.envelope.id;
                // Known already: a copy written by an older version's compaction, or
                // a record the snapshot holds. Only the place changed (the store's
                // business); the recipients keep the state replayed so far.
                self.messages
                    .entry(id)
                    .or_insert_with(|| QueuedMessage::of_decoded(decoded));
                // A bounce and the failures it reports are one durable step: the
                // bounce record carries them, and is written first in the batch
                // that also holds their own failure records. The log does not make a
                // batch atomic (a power loss may keep a prefix of it; recovery stops
                // at the first bad record), so replay may find the bounce without
                // the failure records after it. The rule: a bounce on disk means the
                // sender will be told, so the failures it reports are applied here,
                // to recipients not final yet, whether or not their own records
                // survived. Such a recipient is failed, not retried, and so cannot
                // be bounced a second time; applying a failure twice (the records
                // did survive, or a snapshot holds it) changes nothing.
                for u in &decoded.reports {
                    let open = self.messages.get(&u.id).is_some_and(|o| {
                        o.rcpt
                            .get(u.rcpt as usize)
                            .is_some_and(|r| !r.status.is_final())
                    });
                    if open {
                        self.apply(u);
                    }
                }
                Ok(())
            }
            // An update always follows its message in the same shard's log. One for a
            // message not in the index belongs to one that is done: nothing to apply.
            // Updates carry the whole state of their recipient, so replaying one
            // over a snapshot that holds it already changes nothing.
            Replayed::Record {
                kind: Kind::RcptUpdate,
                payload,
                ..
            } => {
                self.apply(&RcptUpdate::decode(payload)?);
                Ok(())
            }
            Replayed::Record { .. } => Ok(()),
        }
    }

    fn refs(&self, each: &mut dyn FnMut(u64)) {
        self.messages.keys().for_each(|id| each(*id));
    }

    fn snapshot_chunk(
        &self,
        cursor: Option<u64>,
        out: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Option<u64> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = cursor.map_or(Unbounded, Excluded);
        let mut b = Vec::with_capacity(256);
        for (id, m) in self.messages.range((from, Unbounded)) {
            b.clear();
            m.encode(&mut b);
            if !out(&b) {
                return Some(*id);
            }
        }
        None
    }

    fn load(&mut self, item: &[u8]) -> Result<(), &'static str> {
        let m = QueuedMessage::decode(item)?;
        self.messages.insert(m.id, m);
        Ok(())
    }

    fn clear(&mut self) {
        self.messages.clear();
    }
}

/// What replaying a shard's log gives the queue.
pub struct Recovered {
    pub index: BTreeMap<u64, QueuedMessage>,
    pub report: RecoveryReport,
}

/// Replays a shard's store into a queue index.
pub fn recover(data: &Path, shard: u32, mode: Mode) -> io::Result<Recovered> {
    let mut ix = QueueIndex::default();
    // The server's sections after the queue's (accounts, mailboxes: `runtime`),
    // read past: without them they would count as damage.
    let (mut accounts, mut mailboxes) = (shard::Ignore, shard::Ignore);
    let rec = shard::recover(
        data,
        shard,
        mode,
        &mut [&mut ix, &mut accounts, &mut mailboxes],
    )?;
    Ok(Recovered {
        index: ix.messages,
        report: rec.report,
    })
}

/// `ringmail queue list`: every queued message of every shard, read offline.
pub fn list(data: &Path) -> io::Result<Vec<QueuedMessage>> {
    let manifest = ringmail_store::manifest::read(data)?;
    let mut all = Vec::new();
    for shard in 0..manifest.shards {
        let Recovered { index, report } = recover(data, shard, Mode::ReadOnly)?;
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
    use crate::queue::model::{make_id, RcptStatus};
    use crate::queue::spool::Spool;
    use crate::queue::testutil::{env, update};
    use ringmail_store::LogConfig;

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
        let taken = glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data, 0, LogConfig::default()).await.unwrap();
            assert_eq!(spool.len(), 2);
            assert_eq!(
                st(&spool.get(a).unwrap()),
                [(RcptStatus::Delivered, 1), (RcptStatus::Deferred, 1)]
            );
            assert!(spool.get(b).is_none());
            // New ids continue after every id ever used, queued or not.
            let taken = spool.next_id().await.unwrap();
            assert!(taken > c);
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
            taken
        });
        glommio::LocalExecutor::default().run(async move {
            let spool = Spool::open(&data3, 0, LogConfig::default()).await.unwrap();
            assert_eq!(spool.len(), 0);
            assert!(
                spool.next_id().await.unwrap() > taken,
                "an empty queue does not reuse ids"
            );
            spool.close().await;
        });
    }
}
