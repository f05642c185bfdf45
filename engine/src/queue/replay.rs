//! Rebuilding a shard's queue from its log: at start, and offline for `queue list`.

use super::model::{QueuedMessage, COUNTER_MASK};
use ringmail_store::message::RcptUpdate;
use ringmail_store::segment::{self, recover_shard, Mode};
use ringmail_store::{Kind, RecoveryReport};
use std::collections::BTreeMap;
use std::io;
use std::path::Path;

/// What replaying a shard's log gives.
pub struct Recovered {
    /// Messages still queued (some recipient not delivered or failed yet).
    pub index: BTreeMap<u64, QueuedMessage>,
    pub tail: ringmail_store::Tail,
    pub report: RecoveryReport,
    /// The highest id *counter* (the low `COUNTER_BITS` of an id) ever used or
    /// reserved in the shard, queued or not: ids are never reused. A counter, not an
    /// id, because checkpoints hold bare counters: mixing the two in one maximum let
    /// any message id of a shard ≥ 1 outrank every checkpoint.
    pub max_counter: Option<u64>,
}

/// Replays a shard's log into a message index.
pub fn recover(data: &Path, shard: u32, mode: Mode) -> io::Result<Recovered> {
    let dir = segment::shard_dir(data, shard);
    let mut index: BTreeMap<u64, QueuedMessage> = BTreeMap::new();
    let mut max_counter: Option<u64> = None;
    let mut bad = 0u64;
    let (tail, mut report) = recover_shard(&dir, shard, mode, |loc, rec| match rec.kind {
        Kind::Message => match QueuedMessage::from_record(loc, rec.payload) {
            Ok((m, reports)) => {
                max_counter = max_counter.max(Some(m.id & COUNTER_MASK));
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
                // did survive, or compaction copied the bounce) changes nothing.
                for u in &reports {
                    if let Some(o) = index.get_mut(&u.id) {
                        if o.rcpt
                            .get(u.rcpt as usize)
                            .is_some_and(|r| !r.status.is_final())
                        {
                            o.apply(u);
                            if o.is_done() {
                                index.remove(&u.id);
                            }
                        }
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
                max_counter = max_counter.max(next.checked_sub(1));
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
        max_counter,
    })
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
