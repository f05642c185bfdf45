//! The counters of bytes written by cause (ringmail_store::stats) against what the
//! log must have written, and `LogConfig::zero_ahead` on and off.

use glommio::LocalExecutor;
use ringmail_store::record::Kind;
use ringmail_store::segment::{self, recover_shard, Mode, SEGMENT_HEADER_BYTES};
use ringmail_store::{stats, LogConfig, ShardLog};

const BLOCK: u64 = 4096;
const SEGMENT: u64 = 1 << 20;

fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

/// Writes `groups` (one batch each) into a fresh shard; returns the counters of the
/// run, each batch's record bytes, and the segment file's size at the end.
fn run(zero_ahead: bool, groups: &[Vec<usize>]) -> (stats::Counters, Vec<u64>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let groups = groups.to_vec();
    let (c, lens) = LocalExecutor::default().run(async move {
        stats::reset();
        let (tail, _) = recover_shard(&path, 0, Mode::Repair, |_, _| {}).unwrap();
        let cfg = LogConfig {
            segment_bytes_max: SEGMENT,
            zero_ahead,
        };
        let log = ShardLog::open(&path, 0, tail, cfg).await.unwrap();
        let mut lens = Vec::new();
        for (g, sizes) in groups.iter().enumerate() {
            // Appended without an await between them: one batch.
            let tickets: Vec<_> = sizes
                .iter()
                .map(|n| {
                    log.append(Kind::Message, |o| o.resize(*n, g as u8))
                        .unwrap()
                })
                .collect();
            let mut len = 0;
            for t in tickets {
                len += u64::from(log.durable(t).await.unwrap().len);
            }
            lens.push(len);
        }
        log.close().await;
        (stats::get(), lens)
    });
    let size = std::fs::metadata(segment::segment_path(dir.path(), 1))
        .or_else(|_| std::fs::metadata(segment::segment_path(dir.path(), 0)))
        .unwrap()
        .len();
    (c, lens, size)
}

fn groups() -> Vec<Vec<usize>> {
    vec![
        vec![100],
        vec![5000, 30],
        vec![40],
        vec![4096 * 3 + 7],
        vec![1, 2, 3],
    ]
}

/// Each batch writes its records, the durable part of the block it starts in again
/// (the tail) and zeros up to its last block boundary (padding): the counters say
/// exactly that, batch by batch, and a segment header block per segment.
#[test]
fn counts_records_tail_blocks_and_padding_per_batch() {
    let (c, lens, size) = run(false, &groups());
    let (mut at, mut tail, mut pad) = (SEGMENT_HEADER_BYTES, 0, 0);
    for len in &lens {
        tail += at % BLOCK;
        at += len;
        pad += align_up(at) - at;
    }
    assert_eq!(c.log_record_bytes, lens.iter().sum::<u64>());
    assert_eq!(c.log_tail_bytes, tail);
    assert_eq!(c.log_pad_bytes, pad);
    assert_eq!(c.segment_header_bytes, BLOCK);
    assert_eq!((c.copied_bytes, c.snapshot_bytes), (0, 0));
    assert_eq!(c.store_bytes(), c.log_record_bytes);
    // Without zeros ahead the file ends at the last block written, and nothing else
    // was written.
    assert_eq!(c.zero_bytes, 0);
    assert_eq!(size, align_up(at));
    assert_eq!(
        c.written_bytes(),
        c.log_record_bytes + tail + pad + BLOCK,
        "{c:?}"
    );
}

/// With zeros ahead the segment is filled up to its size limit (here less than one
/// zeroing step) and the zeros are counted; the records, tails and padding are the
/// same bytes as without.
#[test]
fn zero_ahead_fills_the_segment_and_counts_the_zeros() {
    let (off, lens_off, _) = run(false, &groups());
    let (on, lens_on, size) = run(true, &groups());
    assert_eq!(lens_on, lens_off);
    assert_eq!(size, SEGMENT);
    assert!(on.zero_bytes > 0 && on.zero_bytes <= SEGMENT, "{on:?}");
    assert_eq!(
        (on.log_record_bytes, on.log_tail_bytes, on.log_pad_bytes),
        (off.log_record_bytes, off.log_tail_bytes, off.log_pad_bytes)
    );
    assert_eq!(on.written_bytes(), off.written_bytes() + on.zero_bytes);
}
