//! Reads of resolved records through an executor's segment-file cache, on segments
//! written by the real log writer: whole records, bodies, body ranges and pieces come
//! back byte-identical, from sealed segments and from the one still being written; the
//! cache stays bounded and lets go of deleted segments.

use glommio::LocalExecutor;
use ringmail_store::reader::{SegmentFiles, CACHED_RECORD_BYTES_MAX, PIECE_BYTES};
use ringmail_store::record::{self, Kind, RECORD_HEADER_BYTES};
use ringmail_store::segment::{self, recover_shard, Mode};
use ringmail_store::{Handle, LogConfig, Resolved, ShardLog};
use std::path::Path;

/// Bytes in front of the body in each test record, standing for the envelope.
const ENVELOPE: usize = 37;

fn body(i: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|k| (k.wrapping_mul(2654435761) ^ i) as u8)
        .collect()
}

/// Appends a record (an envelope stand-in, then `body`) and waits until it is durable;
/// returns what the owner would resolve its handle to.
async fn store(log: &ShardLog, shard: u32, id: u64, body: &[u8]) -> Resolved {
    let t = log
        .append(Kind::Message, |o| {
            o.extend_from_slice(&[0xEE; ENVELOPE]);
            o.extend_from_slice(body);
        })
        .unwrap();
    let loc = log.durable(t).await.unwrap();
    Resolved {
        handle: Handle { shard, id },
        seq: loc.seq,
        offset: loc.offset,
        len: loc.len,
        body_offset: (RECORD_HEADER_BYTES + ENVELOPE) as u32,
        body_len: body.len() as u32,
    }
}

async fn open_log(data: &Path, shard: u32, segment_bytes_max: u64) -> ShardLog {
    let dir = segment::shard_dir(data, shard);
    let (tail, _) = recover_shard(&dir, shard, Mode::Repair, |_, _| {}).unwrap();
    ShardLog::open(
        &dir,
        shard,
        tail,
        LogConfig {
            segment_bytes_max,
            ..LogConfig::default()
        },
    )
    .await
    .unwrap()
}

#[test]
fn reads_are_byte_identical_in_every_form() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_path_buf();
    LocalExecutor::default().run(async move {
        let log = open_log(&data, 3, 256 << 10).await;
        let files = SegmentFiles::new(&data, 8);
        let sizes = [
            0usize,
            1,
            4095,
            4096,
            70_000,
            1 << 20,
            3 * PIECE_BYTES + 17,
            5,
        ];
        let mut stored = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let b = body(i as u64, n);
            let r = store(&log, 3, i as u64, &b).await;
            stored.push((r, b));
        }
        let newest = stored.last().unwrap().0.seq;
        assert!(newest >= 3, "the records span several segments");
        for (r, b) in &stored {
            let rec = files.read_record(r).await.unwrap();
            let decoded = record::decode(&rec).unwrap();
            assert_eq!(decoded.total_len, r.len as usize);
            assert_eq!(&decoded.payload[ENVELOPE..], &b[..]);
            assert_eq!(&files.read_body(r).await.unwrap()[..], &b[..]);
            let n = b.len() as u64;
            for range in [0..n, n / 3..n / 2, n.saturating_sub(1)..n, n..n] {
                let got = files.read_body_range(r, range.clone()).await.unwrap();
                assert_eq!(&got[..], &b[range.start as usize..range.end as usize]);
            }
            for piece in [1000, PIECE_BYTES] {
                let mut pieces = files.pieces(r, 0..n, piece).unwrap();
                let mut all = Vec::new();
                while let Some(p) = pieces.next().await {
                    let p = p.unwrap();
                    assert!(!p.is_empty() && p.len() <= piece);
                    all.extend_from_slice(&p);
                }
                assert_eq!(all, *b);
            }
        }
        // The newest segment is still being written: what it holds below the synced
        // length reads back while later records land behind it.
        let (r, b) = stored.last().unwrap().clone();
        assert_eq!(r.seq, newest);
        for i in 0..20 {
            store(&log, 3, 100 + i, &body(100 + i, 3000)).await;
            assert_eq!(&files.read_body(&r).await.unwrap()[..], &b[..]);
        }
        // Past the body is an error, not a read of whatever follows.
        let n = r.body_len as u64;
        assert!(files.read_body_range(&r, 0..n + 1).await.is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 2..1;
        assert!(files.pieces(&r, backwards, 10).is_err());
        log.close().await;
    });
}

#[test]
fn the_cache_is_bounded_and_lets_deleted_segments_go() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_path_buf();
    LocalExecutor::default().run(async move {
        let log = open_log(&data, 0, 64 << 10).await;
        let mut stored = Vec::new();
        for i in 0..6 {
            // One record per segment: each is larger than the segment bound.
            let b = body(i, 80 << 10);
            stored.push((store(&log, 0, i, &b).await, b));
        }
        let seqs: Vec<u64> = stored.iter().map(|(r, _)| r.seq).collect();
        let mut distinct = seqs.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 6, "one segment each: {seqs:?}");

        let files = SegmentFiles::new(&data, 2);
        for (r, b) in &stored {
            assert_eq!(&files.read_body(r).await.unwrap()[..], &b[..]);
            assert!(files.open_files() <= 2);
        }
        assert_eq!(files.opens(), 6);
        // The two most recently used are open; reading them again opens nothing.
        for (r, _) in &stored[4..] {
            assert!(files.is_open(0, r.seq));
            files.read_body(r).await.unwrap();
        }
        assert_eq!(files.opens(), 6);

        // A segment deleted under the cache (its owner compacted it) is closed by the
        // sweep, and only that one.
        let gone = stored[4].0.seq;
        std::fs::remove_file(segment::segment_path(&segment::shard_dir(&data, 0), gone)).unwrap();
        assert_eq!(files.sweep(), 1);
        assert!(!files.is_open(0, gone));
        assert!(files.is_open(0, stored[5].0.seq));
        assert_eq!(files.sweep(), 0);
        // ... and reading it now fails rather than returning stale bytes.
        assert!(files.read_body(&stored[4].0).await.is_err());
        files.forget(0, stored[5].0.seq);
        assert_eq!(files.open_files(), 0);
        log.close().await;
    });
}

/// The record cache serves a record read before without the disk, byte-identical;
/// it stays within its bytes (least recently used out first), skips records larger
/// than CACHED_RECORD_BYTES_MAX, and drops a deleted segment's records.
#[test]
fn the_record_cache_is_bounded_exact_and_forgets_deleted_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_path_buf();
    LocalExecutor::default().run(async move {
        let log = open_log(&data, 0, 64 << 10).await;
        let mut stored = Vec::new();
        for i in 0..5 {
            // Over the segment bound: one record per segment.
            let b = body(i, 70 << 10);
            stored.push((store(&log, 0, i, &b).await, b));
        }
        let big = body(9, CACHED_RECORD_BYTES_MAX);
        let big = (store(&log, 0, 9, &big).await, big);
        let one = stored[0].0.len as usize;
        // Room for three records.
        let files = SegmentFiles::new(&data, 8).with_record_cache(3 * one + 100);
        let payload = |rec: &[u8]| record::decode(rec).unwrap().payload[ENVELOPE..].to_vec();
        for (r, b) in &stored[..3] {
            assert_eq!(payload(&files.read_record(r).await.unwrap()), *b);
        }
        assert_eq!(files.record_cache(), (3 * one, 0));
        // Hits, byte-identical.
        let seq0 = stored[0].0.seq;
        for (r, b) in &stored[..3] {
            assert_eq!(payload(&files.read_record(r).await.unwrap()), *b);
        }
        assert_eq!(files.record_cache().1, 3);
        // Record 1 is now the least recently used after 0 is read again; a fourth
        // record pushes 1 out, not 0.
        files.read_record(&stored[0].0).await.unwrap();
        files.read_record(&stored[3].0).await.unwrap();
        assert_eq!(files.record_cache(), (3 * one, 4));
        files.read_record(&stored[0].0).await.unwrap();
        assert_eq!(files.record_cache().1, 5, "0 stayed");
        files.read_record(&stored[1].0).await.unwrap();
        assert_eq!(files.record_cache().1, 5, "1 was pushed out and read again");
        // Too large to keep: read, but not cached.
        let before = files.record_cache();
        let rec = files.read_record(&big.0).await.unwrap();
        assert_eq!(payload(&rec), big.1);
        assert_eq!(files.record_cache(), before);
        // A deleted segment's records go with it.
        files.forget(0, seq0);
        assert_eq!(files.record_cache().0, 2 * one);
        std::fs::remove_file(segment::segment_path(&segment::shard_dir(&data, 0), seq0)).unwrap();
        assert!(files.read_record(&stored[0].0).await.is_err());
        log.close().await;
    });
}

/// A read that starts inside a block and runs past the end of the file is an error:
/// glommio pads such a read to the length asked, so a check of the length it reports
/// alone lets bytes that are not in the file through.
#[test]
fn a_read_past_the_end_of_the_file_fails_wherever_it_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_path_buf();
    let dir = segment::shard_dir(&data, 2);
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = body(1, 4990);
    std::fs::write(segment::segment_path(&dir, 1), &bytes).unwrap();
    LocalExecutor::default().run(async move {
        let files = SegmentFiles::new(&data, 4);
        let inside = files.read(2, 1, 4500, 490).await.unwrap();
        assert_eq!(&inside[..], &bytes[4500..]);
        let head = files.read(2, 1, 0, 4990).await.unwrap();
        assert_eq!(&head[..], &bytes[..]);
        for (pos, len) in [
            (4500, 500),
            (4500, 491),
            (100, 4891),
            (4096, 895),
            (0, 4991),
        ] {
            let e = files.read(2, 1, pos, len).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{pos}+{len}");
        }
    });
}
