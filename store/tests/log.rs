//! The log writer and recovery together, on real files: a model-based property test,
//! torn and corrupt tails, injected write/sync failures, and segment fencing.

use glommio::LocalExecutor;
use proptest::prelude::*;
use ringmail_store::record::{self, Kind};
use ringmail_store::segment::{self, recover_shard, Mode, SegmentHeader, SEGMENT_HEADER_BYTES};
use ringmail_store::{FaultPoint, Faults, LogConfig, LogError, ShardLog};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

fn replay(dir: &Path, mode: Mode) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    recover_shard(dir, 0, mode, |_, r| out.push(r.payload.to_vec())).unwrap();
    out
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i * 31 + k) as u8).collect()
}

/// Appends `payloads` through a fresh writer (after recovery), waiting for each group.
fn write(dir: &Path, cfg: LogConfig, groups: &[Vec<Vec<u8>>]) -> Vec<Result<(), LogError>> {
    let dir = dir.to_path_buf();
    let groups = groups.to_vec();
    LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let log = ShardLog::open(&dir, 0, tail, cfg).await.unwrap();
        let mut results = Vec::new();
        for group in groups {
            // Appends of one group share a batch, as concurrent sessions would.
            let tickets: Vec<_> = group
                .iter()
                .map(|p| {
                    log.append(Kind::Message, |o| o.extend_from_slice(p))
                        .unwrap()
                })
                .collect();
            for t in tickets {
                results.push(log.durable(t).await.map(|_| ()));
            }
        }
        log.close().await;
        results
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Whatever the grouping, sizes and restarts, replay returns exactly what was
    /// appended, in order, including across segment rolls.
    #[test]
    fn replay_matches_the_model(
        runs in prop::collection::vec(
            prop::collection::vec(prop::collection::vec(0usize..3000, 1..6), 1..6),
            1..4,
        ),
        segment_kib in 1u64..16,
    ) {
        let d = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
        segment_bytes_max: segment_kib << 10,
        ..LogConfig::default()
    };
        let mut model: Vec<Vec<u8>> = Vec::new();
        for run in &runs {
            let groups: Vec<Vec<Vec<u8>>> = run
                .iter()
                .map(|g| g.iter().map(|&len| { let p = payload(model.len() + len, len); model.push(p.clone()); p }).collect())
                .collect();
            let results = write(d.path(), cfg, &groups);
            prop_assert!(results.iter().all(|r| r.is_ok()));
            prop_assert_eq!(&replay(d.path(), Mode::ReadOnly), &model);
        }
    }
}

/// Large batches are appended without zeros ahead, small ones with; a log that
/// switches between the two (and rolls segments, and restarts) replays exactly.
#[test]
fn large_and_small_batches_mixed_replay_exactly() {
    let d = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        segment_bytes_max: 3 << 20,
        ..LogConfig::default()
    };
    let mut model: Vec<Vec<u8>> = Vec::new();
    let mut group = |sizes: &[usize]| -> Vec<Vec<u8>> {
        sizes
            .iter()
            .map(|&len| {
                let p = payload(model.len() * 7 + len, len);
                model.push(p.clone());
                p
            })
            .collect()
    };
    let mut groups = Vec::new();
    for round in 0..3 {
        for _ in 0..6 {
            groups.push(group(&[300_000, 250_000, 1 + round]));
        }
        for _ in 0..20 {
            groups.push(group(&[100, 4000 + round]));
        }
    }
    for half in groups.chunks(groups.len() / 2 + 1) {
        let results = write(d.path(), cfg, half);
        assert!(results.iter().all(|r| r.is_ok()));
    }
    assert_eq!(replay(d.path(), Mode::ReadOnly), model);
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names.pop().unwrap()
}

/// Where the last record of the shard ends (the writer zero-fills ahead of it).
fn log_end(dir: &Path) -> usize {
    let mut end = 0;
    recover_shard(dir, 0, Mode::ReadOnly, |loc, _| {
        end = (loc.offset + loc.len as u64) as usize
    })
    .unwrap();
    end
}

#[test]
fn a_torn_tail_is_cut_at_every_possible_point() {
    let d = tempfile::tempdir().unwrap();
    let groups = vec![vec![payload(1, 100), payload(2, 200), payload(3, 300)]];
    write(d.path(), LogConfig::default(), &groups);
    let seg = last_segment(d.path());
    let end = log_end(d.path());
    let whole = std::fs::read(&seg).unwrap();
    assert!(
        whole[end..].iter().all(|&b| b == 0),
        "only zeros follow the log"
    );
    let last_record_len = record::RECORD_HEADER_BYTES + 300;
    for cut in 1..last_record_len {
        // A torn write: part of the last record, and no zeros after it.
        std::fs::write(&seg, &whole[..end - cut]).unwrap();
        // Read-only recovery reports but does not touch the file.
        assert_eq!(replay(d.path(), Mode::ReadOnly).len(), 2, "cut {cut}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len() as usize, end - cut);
        assert_eq!(replay(d.path(), Mode::Repair).len(), 2, "cut {cut}");
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len() as usize,
            end - last_record_len
        );
    }
    // The writer continues after the last good record.
    write(d.path(), LogConfig::default(), &[vec![payload(4, 10)]]);
    assert_eq!(
        replay(d.path(), Mode::ReadOnly),
        vec![payload(1, 100), payload(2, 200), payload(4, 10)]
    );
}

#[test]
fn a_corrupt_tail_is_detected_by_crc_and_cut() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        LogConfig::default(),
        &[vec![payload(1, 100), payload(2, 50)]],
    );
    let seg = last_segment(d.path());
    let end = log_end(d.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[end - 10] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let (_, report) = recover_shard(d.path(), 0, Mode::Repair, |_, _| {}).unwrap();
    assert_eq!(
        report.truncated_bytes as usize,
        bytes.len() - (end - record::RECORD_HEADER_BYTES - 50)
    );
    assert_eq!(replay(d.path(), Mode::ReadOnly), vec![payload(1, 100)]);
}

#[test]
fn zeros_after_the_log_are_its_clean_end() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), LogConfig::default(), &[vec![payload(1, 100)]]);
    let seg = last_segment(d.path());
    let end = log_end(d.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.truncate(end);
    bytes.resize(end + 100_000, 0);
    std::fs::write(&seg, &bytes).unwrap();
    let (tail, report) = recover_shard(d.path(), 0, Mode::Repair, |_, _| {}).unwrap();
    assert_eq!(report.truncated_bytes, 0, "zeros are not damage");
    assert!(report.damaged.is_empty());
    assert_eq!(tail.valid_len as usize, end);
    // But a zero header with data after it is a torn write, reported as such.
    write(d.path(), LogConfig::default(), &[vec![payload(2, 10)]]);
    let end = log_end(d.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.truncate(end);
    bytes.extend_from_slice(&[0u8; 20]);
    bytes.extend_from_slice(b"garbage");
    std::fs::write(&seg, &bytes).unwrap();
    let (_, report) = recover_shard(d.path(), 0, Mode::ReadOnly, |_, _| {}).unwrap();
    assert_eq!(report.truncated_bytes, 27);
    assert_eq!(
        replay(d.path(), Mode::ReadOnly),
        vec![payload(1, 100), payload(2, 10)]
    );
}

#[test]
fn failed_syncs_and_writes_are_reported_and_never_replayed() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let results = LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let log = ShardLog::open(&dir, 0, tail, LogConfig::default())
            .await
            .unwrap();
        let mut results = Vec::new();
        let one = |p: Vec<u8>| {
            let t = log
                .append(Kind::Message, |o| o.extend_from_slice(&p))
                .unwrap();
            let log = log.clone();
            async move { log.durable(t).await.map(|_| ()) }
        };
        results.push(one(payload(1, 10)).await);
        log.faults().errno.set(libc::EIO);
        log.faults().syncs.set(1);
        results.push(one(payload(2, 20)).await);
        log.faults().errno.set(libc::ENOSPC);
        log.faults().writes.set(1);
        results.push(one(payload(3, 30)).await);
        results.push(one(payload(4, 40)).await);
        log.close().await;
        results
    });
    assert_eq!(results[0], Ok(()));
    assert!(matches!(results[1], Err(LogError::Io(_))));
    assert_eq!(results[2], Err(LogError::NoSpace));
    assert_eq!(results[3], Ok(()));
    assert_eq!(
        replay(d.path(), Mode::ReadOnly),
        vec![payload(1, 10), payload(4, 40)]
    );
}

/// Records appended while a batch is in flight, with injected sync failures:
/// whatever was answered Ok replays, whatever was answered with an error never does.
#[test]
fn appends_behind_a_failing_batch_replay_exactly_what_was_answered_ok() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let (answered, failures) = LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let log = ShardLog::open(&dir, 0, tail, LogConfig::default())
            .await
            .unwrap();
        let mut answered = Vec::new();
        let mut failures = 0;
        for round in 0..20usize {
            let a = payload(round * 3, 500 + round);
            let b = payload(round * 3 + 1, 700 + round);
            if round % 2 == 0 {
                log.faults().errno.set(libc::EIO);
                log.faults().syncs.set(1);
            }
            let ta = log
                .append(Kind::Message, |o| o.extend_from_slice(&a))
                .unwrap();
            // Let the flusher take `a` and start on it, then queue `b` behind it.
            glommio::yield_if_needed().await;
            glommio::executor().yield_task_queue_now().await;
            let tb = log
                .append(Kind::Message, |o| o.extend_from_slice(&b))
                .unwrap();
            for (t, p) in [(ta, a), (tb, b)] {
                match log.durable(t).await {
                    Ok(_) => answered.push(p),
                    Err(_) => failures += 1,
                }
            }
        }
        log.close().await;
        (answered, failures)
    });
    assert!(
        failures >= 10,
        "every injected sync failure fails its batch"
    );
    assert_eq!(replay(d.path(), Mode::ReadOnly), answered);
}

#[test]
fn the_next_segment_header_fences_off_bytes_of_a_failed_batch() {
    // Segment 1 holds three records, but segment 2's header says only the first two
    // were valid (the writer could not cut the third off after its write failed).
    let d = tempfile::tempdir().unwrap();
    let mut seg1 = SegmentHeader {
        shard: 0,
        seq: 1,
        prev_valid_len: None,
    }
    .encode()
    .to_vec();
    for i in 1..=2 {
        record::encode_into(&mut seg1, Kind::Message, &payload(i, 10));
    }
    let fence = seg1.len() as u64;
    record::encode_into(&mut seg1, Kind::Message, &payload(3, 10));
    let mut seg2 = SegmentHeader {
        shard: 0,
        seq: 2,
        prev_valid_len: Some(fence),
    }
    .encode()
    .to_vec();
    record::encode_into(&mut seg2, Kind::Message, &payload(4, 10));
    std::fs::write(segment::segment_path(d.path(), 1), seg1).unwrap();
    std::fs::write(segment::segment_path(d.path(), 2), seg2).unwrap();
    assert_eq!(
        replay(d.path(), Mode::ReadOnly),
        vec![payload(1, 10), payload(2, 10), payload(4, 10)]
    );
}

#[test]
fn a_new_segment_with_a_torn_header_is_dropped() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), LogConfig::default(), &[vec![payload(1, 10)]]);
    let torn = SegmentHeader {
        shard: 0,
        seq: 2,
        prev_valid_len: Some(99),
    }
    .encode();
    std::fs::write(
        segment::segment_path(d.path(), 2),
        &torn[..(SEGMENT_HEADER_BYTES as usize) / 2],
    )
    .unwrap();
    assert_eq!(replay(d.path(), Mode::Repair), vec![payload(1, 10)]);
    assert!(!segment::segment_path(d.path(), 2).exists());
    write(d.path(), LogConfig::default(), &[vec![payload(2, 10)]]);
    assert_eq!(
        replay(d.path(), Mode::ReadOnly),
        vec![payload(1, 10), payload(2, 10)]
    );
}

#[test]
fn a_newest_segment_with_a_damaged_header_is_set_aside_not_deleted() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), LogConfig::default(), &[vec![payload(1, 10)]]);
    let mut seg2 = SegmentHeader {
        shard: 0,
        seq: 2,
        prev_valid_len: Some(log_end(d.path()) as u64),
    }
    .encode()
    .to_vec();
    record::encode_into(&mut seg2, Kind::Message, &payload(2, 10));
    seg2[13] ^= 0x10; // a flipped bit in the header
    let path = segment::segment_path(d.path(), 2);
    std::fs::write(&path, &seg2).unwrap();
    let (_, report) = recover_shard(d.path(), 0, Mode::Repair, |_, _| {}).unwrap();
    assert!(
        report.damaged.iter().any(|m| m.contains("set aside")),
        "{report:?}"
    );
    assert!(!path.exists());
    assert_eq!(
        std::fs::read(path.with_extension("log.damaged")).unwrap(),
        seg2,
        "kept byte for byte"
    );
    assert_eq!(replay(d.path(), Mode::ReadOnly), vec![payload(1, 10)]);
}

/// A batch whose sync fails and whose bytes cannot be cut off again: the fence (the
/// next segment, whose header caps the old one) must be durable before the batch's
/// waiters hear of the failure. The "crash" comes right after the error: the writer is
/// dropped with no later batch, and recovery must not bring the failed records back.
#[test]
fn a_failed_batch_that_cannot_be_cut_off_is_fenced_before_its_error_is_answered() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let results = LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let log = ShardLog::open(&dir, 0, tail, LogConfig::default())
            .await
            .unwrap();
        let mut results = Vec::new();
        let t = log
            .append(Kind::Message, |o| o.extend_from_slice(&payload(1, 10)))
            .unwrap();
        results.push(log.durable(t).await.map(|_| ()));
        let valid_len = log_end(&dir) as u64;
        // What the fence's header says, read back when its directory entry is synced.
        let events: Arc<Mutex<Vec<Fenced>>> = Arc::default();
        let (hook_events, hook_dir) = (events.clone(), dir.clone());
        *log.faults().after_dir_sync.borrow_mut() = Some(Arc::new(move |seq| {
            let bytes = std::fs::read(segment::segment_path(&hook_dir, seq)).unwrap();
            let header = SegmentHeader::decode(&bytes);
            hook_events
                .lock()
                .unwrap()
                .push(Fenced::DirSynced { seq, header });
        }));
        log.faults().errno.set(libc::EIO);
        log.faults().syncs.set(1);
        log.faults().truncates.set(1);
        let failed: Vec<_> = [payload(2, 20), payload(3, 30)]
            .iter()
            .map(|p| {
                log.append(Kind::Message, |o| o.extend_from_slice(p))
                    .unwrap()
            })
            .collect();
        for t in failed {
            let r = log.durable(t).await.map(|_| ());
            events.lock().unwrap().push(Fenced::Answered(r.clone()));
            results.push(r);
        }
        // The crash: no close, no later batch; the executor and the writer are gone.
        let events = events.lock().unwrap().clone();
        (results, valid_len, events)
    });
    let (results, valid_len, events) = results;
    assert_eq!(results[0], Ok(()));
    assert!(matches!(results[1], Err(LogError::Io(_))), "{results:?}");
    assert!(matches!(results[2], Err(LogError::Io(_))), "{results:?}");
    // The fence's header (capping segment 1 where the failed batch began) and its
    // directory entry were synced before the first waiter heard of the failure.
    let fence = SegmentHeader {
        shard: 0,
        seq: 2,
        prev_valid_len: Some(valid_len),
    };
    assert_eq!(
        events.first(),
        Some(&Fenced::DirSynced {
            seq: 2,
            header: Some(fence)
        }),
        "{events:?}"
    );
    assert!(
        matches!(events.get(1), Some(Fenced::Answered(Err(_)))),
        "{events:?}"
    );
    assert_eq!(replay(d.path(), Mode::Repair), vec![payload(1, 10)]);
    // And the writer continues after the fence.
    write(d.path(), LogConfig::default(), &[vec![payload(4, 40)]]);
    assert_eq!(
        replay(d.path(), Mode::ReadOnly),
        vec![payload(1, 10), payload(4, 40)]
    );
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fenced {
    DirSynced {
        seq: u64,
        header: Option<SegmentHeader>,
    },
    Answered(Result<(), LogError>),
}

/// When even the fence cannot be made durable, the shard stops acknowledging: the
/// failed batch and everything after it fail, with an error that says why, and
/// nothing appended after the failure reaches the log. The record behind the failing
/// batch is appended from the fault path itself, so it is queued while the flusher is
/// inside the failing batch whatever the scheduling.
#[test]
fn a_fence_that_cannot_be_written_stops_the_shard() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let (failed, queued, later) = LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let log = ShardLog::open(&dir, 0, tail, LogConfig::default())
            .await
            .unwrap();
        let t = log
            .append(Kind::Message, |o| o.extend_from_slice(&payload(1, 10)))
            .unwrap();
        log.durable(t).await.unwrap();
        log.faults().errno.set(libc::EIO);
        log.faults().syncs.set(1);
        log.faults().truncates.set(1);
        log.faults().creates.set(1);
        let behind = Rc::new(RefCell::new(None));
        let (hook_log, hook_behind) = (log.clone(), behind.clone());
        *log.faults().on_fault.borrow_mut() = Some(Rc::new(move |point| {
            if point == FaultPoint::Sync {
                let t = hook_log
                    .append(Kind::Message, |o| o.extend_from_slice(&payload(3, 30)))
                    .unwrap();
                *hook_behind.borrow_mut() = Some(t);
            }
        }));
        let t = log
            .append(Kind::Message, |o| o.extend_from_slice(&payload(2, 20)))
            .unwrap();
        let failed = log.durable(t).await.map(|_| ());
        let behind = behind.borrow_mut().take().expect("the sync fault fired");
        let queued = log.durable(behind).await.map(|_| ());
        let later = log
            .append(Kind::Message, |o| o.extend_from_slice(&payload(4, 40)))
            .map(|_| ());
        log.close().await;
        (failed, queued, later)
    });
    assert!(matches!(failed, Err(LogError::Io(_))), "{failed:?}");
    for r in [&queued, &later] {
        match r {
            Err(LogError::Io(why)) => assert!(why.contains("stopped taking mail"), "{why}"),
            other => panic!("expected the shard to have stopped, got {other:?}"),
        }
    }
    let replayed = replay(d.path(), Mode::ReadOnly);
    assert!(!replayed.contains(&payload(3, 30)) && !replayed.contains(&payload(4, 40)));
    // The fence failed once its file existed: after a restart recovery drops the torn
    // fence and the writer goes on where the log ends.
    let (_, report) = recover_shard(d.path(), 0, Mode::Repair, |_, _| {}).unwrap();
    assert!(
        report
            .damaged
            .iter()
            .any(|m| m.starts_with("segment 2: header torn")),
        "{report:?}"
    );
    write(d.path(), LogConfig::default(), &[vec![payload(5, 50)]]);
    let after = replay(d.path(), Mode::ReadOnly);
    assert_eq!(after[..replayed.len()], replayed[..]);
    assert_eq!(after[replayed.len()..], [payload(5, 50)]);
}

/// A batch that does not fit rolls the segment; the new segment's header (capping the
/// old one where it ends) and its name are durable, and then opening it fails (EMFILE,
/// say). The old segment is sealed from then on: a later, smaller batch that would fit
/// in it goes into the new segment instead, or a power loss that kept the new
/// segment's header would cut that acknowledged batch off.
#[test]
fn no_batch_is_written_into_a_segment_after_a_roll_out_of_it_failed() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let cfg = LogConfig {
        segment_bytes_max: 8 << 10,
        ..LogConfig::default()
    };
    let durable_fence: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let (results, small_seq) = LocalExecutor::default().run({
        let durable_fence = durable_fence.clone();
        async move {
            let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
            let log = ShardLog::open(&dir, 0, tail, cfg).await.unwrap();
            let hook_dir = dir.clone();
            // What segment 2 holds once its header and name are synced: what a power
            // loss from then on brings back, whatever later unsynced changes did.
            *log.faults().after_dir_sync.borrow_mut() = Some(Arc::new(move |seq| {
                if seq == 2 {
                    let bytes = std::fs::read(segment::segment_path(&hook_dir, 2)).unwrap();
                    durable_fence.lock().unwrap().get_or_insert(bytes);
                }
            }));
            let one = |p: Vec<u8>| {
                let t = log
                    .append(Kind::Message, |o| o.extend_from_slice(&p))
                    .unwrap();
                let log = log.clone();
                async move { log.durable(t).await }
            };
            let mut results = Vec::new();
            results.push(one(payload(1, 3000)).await.map(|_| ()));
            log.faults().errno.set(libc::EMFILE);
            log.faults().opens.set(1);
            results.push(one(payload(2, 6000)).await.map(|_| ()));
            let small = one(payload(3, 100)).await;
            results.push(small.clone().map(|_| ()));
            // The crash: no close.
            (results, small.map(|loc| loc.seq))
        }
    });
    assert_eq!(results[0], Ok(()));
    assert!(matches!(results[1], Err(LogError::Io(_))), "{results:?}");
    assert_eq!(results[2], Ok(()));
    assert_eq!(
        small_seq,
        Ok(2),
        "acknowledged into the segment rolled out of"
    );
    // The power loss: segment 2 as it was made durable comes back unless it was made
    // durable again since.
    let fence = segment::segment_path(d.path(), 2);
    if !fence.exists() {
        let bytes = durable_fence
            .lock()
            .unwrap()
            .clone()
            .expect("segment 2 was synced");
        std::fs::write(&fence, bytes).unwrap();
    }
    assert_eq!(
        replay(d.path(), Mode::Repair),
        vec![payload(1, 3000), payload(3, 100)]
    );
}

/// A fence whose header and directory entry are durable fences the failed batch off
/// even if opening it then fails: it must not be deleted (the failed batch would
/// come back after a crash) and the shard need not stop; the next batch opens it.
#[test]
fn a_durable_fence_stands_when_only_opening_it_fails() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let (failed, at_crash, next) = LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let log = ShardLog::open(&dir, 0, tail, LogConfig::default())
            .await
            .unwrap();
        let one = |p: Vec<u8>| {
            let t = log
                .append(Kind::Message, |o| o.extend_from_slice(&p))
                .unwrap();
            let log = log.clone();
            async move { log.durable(t).await }
        };
        one(payload(1, 10)).await.unwrap();
        log.faults().errno.set(libc::EMFILE);
        log.faults().syncs.set(1);
        log.faults().truncates.set(1);
        log.faults().opens.set(1);
        let failed = one(payload(2, 20)).await.map(|_| ());
        // A crash right after the 4xx: what recovery would replay.
        let at_crash = replay(&dir, Mode::ReadOnly);
        let next = match log.append(Kind::Message, |o| o.extend_from_slice(&payload(3, 30))) {
            Ok(t) => log.durable(t).await.map(|loc| loc.seq),
            Err(e) => Err(e),
        };
        (failed, at_crash, next)
    });
    assert!(matches!(failed, Err(LogError::Io(_))), "{failed:?}");
    assert_eq!(
        at_crash,
        vec![payload(1, 10)],
        "the refused batch came back"
    );
    assert_eq!(next, Ok(2));
    assert_eq!(
        replay(d.path(), Mode::Repair),
        vec![payload(1, 10), payload(3, 30)]
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opened {
    ParentSynced { thread: ThreadId },
    DirSynced { seq: u64 },
}

/// The manifest syncs DATA, but a new shard directory's own name lives in DATA too:
/// it must be synced (off the executor) before anything is acknowledged in it.
#[test]
fn a_new_shard_directory_is_synced_in_its_parent_before_its_first_segment() {
    let d = tempfile::tempdir().unwrap();
    let dir = segment::shard_dir(d.path(), 0);
    let events: Arc<Mutex<Vec<Opened>>> = Arc::default();
    let faults = Faults::default();
    let hook_events = events.clone();
    *faults.after_parent_sync.borrow_mut() = Some(Arc::new(move || {
        let thread = std::thread::current().id();
        hook_events
            .lock()
            .unwrap()
            .push(Opened::ParentSynced { thread });
    }));
    let hook_events = events.clone();
    *faults.after_dir_sync.borrow_mut() = Some(Arc::new(move |seq| {
        hook_events.lock().unwrap().push(Opened::DirSynced { seq });
    }));
    let executor_thread = LocalExecutor::default().run(async move {
        let log =
            ShardLog::open_with_faults(&dir, 0, Default::default(), LogConfig::default(), faults)
                .await
                .unwrap();
        log.close().await;
        std::thread::current().id()
    });
    let events = events.lock().unwrap().clone();
    match events[..] {
        [Opened::ParentSynced { thread }, Opened::DirSynced { seq: 1 }] => {
            assert_ne!(thread, executor_thread, "parent synced on the executor")
        }
        _ => panic!("expected the parent synced, then segment 1: {events:?}"),
    }
}

/// On a nearly full disk the writer stops zeroing ahead; the free-space check that
/// decides so runs on the executor's one blocking thread, and the next batch may wait
/// for it, so it must not run again for every batch.
#[test]
fn low_free_space_is_checked_once_per_segment_not_per_batch() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let faults = Faults::default();
    faults.free_bytes.set(Some(1 << 20));
    let checks = LocalExecutor::default().run(async move {
        let log =
            ShardLog::open_with_faults(&dir, 0, Default::default(), LogConfig::default(), faults)
                .await
                .unwrap();
        for i in 0..20 {
            let t = log
                .append(Kind::Message, |o| o.extend_from_slice(&payload(i, 100)))
                .unwrap();
            log.durable(t).await.unwrap();
        }
        log.close().await;
        log.faults().space_checks.get()
    });
    assert_eq!(checks, 1);
    assert_eq!(replay(d.path(), Mode::ReadOnly).len(), 20);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    DirSynced { seq: u64, thread: ThreadId },
    Acked { seq: u64 },
}

/// Many sessions appending into small segments: every roll syncs the directory on a
/// thread other than the executor's (a slow disk must not stall the core's sessions),
/// and before any record in the new segment is acknowledged. Then a crash (no close)
/// and recovery: the segment chain replays every acknowledged record.
///
/// The first roll's directory sync is held back until a record in segment 2 is
/// acknowledged, or for at most `HOLD`: a writer that acknowledged before the sync
/// returned would release it and show up in the order of events, however fast the
/// disk. A correct writer acknowledges nothing there meanwhile, so the hold runs out;
/// it bounds how long the test looks for the wrong order, it synchronises nothing.
#[test]
fn segment_rolls_sync_the_directory_off_the_executor_before_acknowledging_into_them() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen2 = seen.clone();
    let (executor_thread, mut acked) = LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let cfg = LogConfig {
            segment_bytes_max: 24 << 10,
            ..LogConfig::default()
        };
        let log = ShardLog::open(&dir, 0, tail, cfg).await.unwrap();
        const HOLD: Duration = Duration::from_millis(300);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        let hook_seen = seen2.clone();
        *log.faults().after_dir_sync.borrow_mut() = Some(Arc::new(move |seq| {
            let thread = std::thread::current().id();
            if seq == 2 {
                let _ = held.lock().unwrap().recv_timeout(HOLD);
            }
            hook_seen
                .lock()
                .unwrap()
                .push(Seen::DirSynced { seq, thread });
        }));
        let sessions: Vec<_> = (0..16usize)
            .map(|s| {
                let log = log.clone();
                let seen = seen2.clone();
                let release = release.clone();
                glommio::spawn_local(async move {
                    let mut acked = Vec::new();
                    for m in 0..25usize {
                        let p = payload(s * 1000 + m, 200 + (s * 37 + m * 101) % 1800);
                        let t = log
                            .append(Kind::Message, |o| o.extend_from_slice(&p))
                            .unwrap();
                        let loc = log.durable(t).await.unwrap();
                        seen.lock().unwrap().push(Seen::Acked { seq: loc.seq });
                        if loc.seq >= 2 {
                            let _ = release.send(());
                        }
                        acked.push((loc, p));
                    }
                    acked
                })
            })
            .collect();
        let mut acked = Vec::new();
        for s in sessions {
            acked.extend(s.await);
        }
        (std::thread::current().id(), acked)
    });
    let seen = seen.lock().unwrap().clone();
    let rolls: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            Seen::DirSynced { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert!(rolls.len() >= 10, "the load rolls segments: {rolls:?}");
    for e in &seen {
        if let Seen::DirSynced { thread, .. } = e {
            assert_ne!(*thread, executor_thread, "directory synced on the executor");
        }
    }
    for seq in 2..=*rolls.last().unwrap() {
        let synced = seen
            .iter()
            .position(|e| matches!(e, Seen::DirSynced { seq: s, .. } if *s == seq));
        let first_ack = seen.iter().position(|e| *e == Seen::Acked { seq });
        let synced = synced.unwrap_or_else(|| panic!("segment {seq}: no directory sync"));
        if let Some(ack) = first_ack {
            assert!(
                synced < ack,
                "segment {seq} acknowledged into before its directory sync"
            );
        }
    }
    acked.sort_by_key(|(loc, _)| *loc);
    let acked: Vec<Vec<u8>> = acked.into_iter().map(|(_, p)| p).collect();
    assert_eq!(replay(d.path(), Mode::Repair), acked);
}

/// A written batch keeps its buffers alive while it is listed for the snapshot's
/// replay start: once its tickets are gone it must be let go without waiting for a
/// snapshot to ask, or every batch since the last snapshot stays in memory.
#[test]
fn finished_batches_are_let_go_without_a_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let log = ShardLog::open(&dir, 0, tail, LogConfig::default())
            .await
            .unwrap();
        for i in 0..200 {
            let t = log
                .append(Kind::Message, |o| o.extend_from_slice(&payload(i, 5000)))
                .unwrap();
            log.durable(t).await.unwrap();
        }
        // The open batch, and at most the last written one (let go by the next).
        assert!(
            log.batches_tracked() <= 2,
            "{} batches held",
            log.batches_tracked()
        );
        log.close().await;
    });
}

/// Gives the other tasks of the executor (the flusher) a turn.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// A batch that rolls into a new segment, or follows a failed one, was placed behind
/// other bytes than the segment will hold: it is copied once more (relocated). Under
/// a load that keeps the next batch filling while one is written, only that batch may
/// be: the one filling meanwhile must be predicted from the batch as written, or it
/// is relocated too, and so is every later one until the log goes idle.
#[test]
fn under_load_only_the_batch_at_a_roll_or_after_a_failure_is_relocated() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    const RECORDS: usize = 4000;
    const PAYLOAD: usize = 1000;
    // Appends in flight: a batch holds at most this many records.
    const WINDOW: usize = 8;
    const FAIL_AT: [usize; 3] = [1000, 2200, 3100];
    let (relocated, written, rolls, ok) = LocalExecutor::default().run(async move {
        let (tail, _) = recover_shard(&dir, 0, Mode::Repair, |_, _| {}).unwrap();
        let cfg = LogConfig {
            segment_bytes_max: 256 << 10,
            ..LogConfig::default()
        };
        let log = ShardLog::open(&dir, 0, tail, cfg).await.unwrap();
        log.faults().errno.set(libc::EIO);
        ringmail_store::stats::reset();
        let mut inflight = std::collections::VecDeque::new();
        let mut ok = Vec::new();
        let mut segs = std::collections::BTreeSet::new();
        let mut settle = |r: Result<ringmail_store::segment::Location, LogError>, p: Vec<u8>| {
            if let Ok(loc) = r {
                segs.insert(loc.seq);
                ok.push(p);
            }
        };
        for i in 0..RECORDS {
            if FAIL_AT.contains(&i) {
                log.faults().writes.set(1);
            }
            let p = payload(i, PAYLOAD);
            let t = log
                .append(Kind::Message, |o| o.extend_from_slice(&p))
                .unwrap();
            inflight.push_back((t, p));
            if inflight.len() >= WINDOW {
                let (t, p) = inflight.pop_front().unwrap();
                settle(log.durable(t).await, p);
            }
            yield_now().await;
        }
        for (t, p) in inflight {
            settle(log.durable(t).await, p);
        }
        log.close().await;
        let c = ringmail_store::stats::get();
        (
            c.relocated_bytes,
            (RECORDS * PAYLOAD) as u64,
            segs.len() as u64,
            ok,
        )
    });
    assert!(rolls >= 10, "the load rolls segments: {rolls}");
    assert!(ok.len() < RECORDS, "the injected failures failed batches");
    assert_eq!(replay(d.path(), Mode::ReadOnly), ok);
    // A batch or two per roll and per failure, nothing proportional to the bytes
    // written after them.
    let batch_max = (WINDOW * (record::RECORD_HEADER_BYTES + PAYLOAD)) as u64 + 4096;
    let bound = 2 * batch_max * (rolls + FAIL_AT.len() as u64);
    assert!(
        relocated <= bound,
        "relocated {relocated} bytes of {written} written ({rolls} segments): bound {bound}"
    );
}
