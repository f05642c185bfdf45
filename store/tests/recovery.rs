//! Streaming recovery against the whole-file reader it replaced: records across
//! buffer refills, torn and corrupt records there, sealed-segment damage, and a
//! property test that both give exactly the same records, tail, report and files.

use proptest::prelude::*;
use ringmail_store::record::{self, DecodeError, Kind, RecordRef};
use ringmail_store::segment::{
    self, recover_shard, recover_shard_with, Location, Mode, RecoveryOptions, RecoveryReport,
    SegmentHeader, Tail, SEGMENT_HEADER_BYTES,
};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// The recovery of before streaming, verbatim but for its name: it reads every
/// segment whole. The model the streaming reader must agree with, decision for
/// decision.
fn model_recover(
    dir: &Path,
    shard: u32,
    mode: Mode,
    mut visit: impl FnMut(Location, RecordRef<'_>),
) -> io::Result<(Tail, RecoveryReport)> {
    let mut report = RecoveryReport::default();
    let mut seqs = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                if let Some(seq) = e.file_name().to_str().and_then(segment::parse_segment_name) {
                    seqs.push(seq);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    seqs.sort_unstable();

    // Read each header first: segment N+1 says how much of segment N is valid.
    let mut files: Vec<(u64, Vec<u8>, Option<SegmentHeader>)> = Vec::with_capacity(seqs.len());
    for &seq in &seqs {
        let bytes = fs::read(segment::segment_path(dir, seq))?;
        let header = SegmentHeader::decode(&bytes).filter(|h| h.seq == seq && h.shard == shard);
        files.push((seq, bytes, header));
    }
    // A newest segment whose header never made it to disk (short, or zeros where the
    // header goes) holds nothing acknowledged: its first batch was synced only after
    // the header was. One whose header is there but wrong is damage, not a torn
    // creation: it is set aside, never deleted.
    while let Some((seq, bytes, None)) = files.last() {
        let seq = *seq;
        let torn = bytes.len() < SEGMENT_HEADER_BYTES as usize
            || bytes[..SEGMENT_HEADER_BYTES as usize]
                .iter()
                .all(|&b| b == 0);
        if mode == Mode::Repair {
            let path = segment::segment_path(dir, seq);
            if torn {
                fs::remove_file(&path)?;
            } else {
                fs::rename(&path, path.with_extension("log.damaged"))?;
            }
            segment::sync_dir(dir)?;
        }
        report.damaged.push(if torn {
            format!("segment {seq}: header torn, empty segment dropped")
        } else {
            format!("segment {seq}: bad header, segment set aside as .damaged")
        });
        files.pop();
    }

    let mut tail = Tail {
        seq: None,
        valid_len: 0,
    };
    let count = files.len();
    for i in 0..count {
        let (seq, ref bytes, header) = files[i];
        let newest = i + 1 == count;
        let Some(_) = header else {
            report
                .damaged
                .push(format!("segment {seq}: bad header, skipped"));
            continue;
        };
        let cap = files
            .get(i + 1)
            .and_then(|(_, _, h)| h.and_then(|h| h.prev_valid_len))
            .unwrap_or(bytes.len() as u64)
            .min(bytes.len() as u64) as usize;
        let mut pos = SEGMENT_HEADER_BYTES as usize;
        let mut clean_end = false;
        while pos < cap {
            // The writer fills segments with zeros ahead of itself: an all-zero record
            // header is where the log ends, not damage.
            if bytes[pos..cap.min(pos + record::RECORD_HEADER_BYTES)]
                .iter()
                .all(|&b| b == 0)
            {
                clean_end = bytes[pos..].iter().all(|&b| b == 0);
                if clean_end {
                    break;
                }
            }
            match record::decode(&bytes[pos..cap]) {
                Ok(r) => {
                    let len = r.total_len;
                    visit(
                        Location {
                            seq,
                            offset: pos as u64,
                            len: len as u32,
                        },
                        r,
                    );
                    report.records += 1;
                    pos += len;
                }
                Err(e) => {
                    if newest {
                        report.truncated_bytes = (bytes.len() - pos) as u64;
                    } else {
                        let what = match e {
                            DecodeError::Incomplete => "torn record",
                            DecodeError::Corrupt(w) => w,
                        };
                        report.damaged.push(format!(
                            "segment {seq}: {what} at offset {pos}, rest skipped"
                        ));
                    }
                    break;
                }
            }
        }
        if newest {
            if pos < bytes.len() {
                if !clean_end {
                    report.truncated_bytes = (bytes.len() - pos) as u64;
                }
                if mode == Mode::Repair {
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(segment::segment_path(dir, seq))?;
                    f.set_len(pos as u64)?;
                    f.sync_all()?;
                }
            }
            tail = Tail {
                seq: Some(seq),
                valid_len: pos as u64,
            };
        }
    }
    report.segments = files.len();
    Ok((tail, report))
}

type Replayed = Vec<(Location, Kind, Vec<u8>)>;

fn run_model(dir: &Path, mode: Mode) -> (Replayed, Tail, RecoveryReport) {
    let mut out = Vec::new();
    let (tail, report) = model_recover(dir, 0, mode, |l, r| {
        out.push((l, r.kind, r.payload.to_vec()))
    })
    .unwrap();
    (out, tail, report)
}

/// Streaming recovery, with the report's buffer size split off (the model has none).
fn run_streaming(
    dir: &Path,
    mode: Mode,
    opts: RecoveryOptions,
) -> (Replayed, Tail, RecoveryReport, usize) {
    let mut out = Vec::new();
    let (tail, mut report) = recover_shard_with(dir, 0, mode, opts, |l, r| {
        out.push((l, r.kind, r.payload.to_vec()))
    })
    .unwrap();
    let buf = std::mem::take(&mut report.buffer_bytes_max);
    (out, tail, report, buf)
}

fn small_buffer(bytes: usize) -> RecoveryOptions {
    RecoveryOptions {
        buffer_bytes: bytes,
        drop_cache_behind: true,
        ..RecoveryOptions::default()
    }
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i * 131 + k * 7 + 1) as u8).collect()
}

fn kind_of(i: usize) -> Kind {
    [Kind::Message, Kind::RcptUpdate, Kind::Checkpoint][i % 3]
}

/// Writes segment `seq` of shard 0: header, records, then `zeros` zero bytes (as the
/// writer leaves ahead of itself). Returns the end of the last record.
fn write_segment(
    dir: &Path,
    seq: u64,
    prev_valid_len: Option<u64>,
    records: &[(Kind, Vec<u8>)],
    zeros: usize,
) -> u64 {
    let mut b = SegmentHeader {
        shard: 0,
        seq,
        prev_valid_len,
    }
    .encode()
    .to_vec();
    for (k, p) in records {
        record::encode_into(&mut b, *k, p);
    }
    let end = b.len() as u64;
    b.resize(b.len() + zeros, 0);
    fs::write(segment::segment_path(dir, seq), b).unwrap();
    end
}

/// Every file of the directory and its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    for (name, bytes) in files(from) {
        fs::write(to.join(name), bytes).unwrap();
    }
}

/// Streaming and whole-file recovery agree on `dir` read-only, and on copies of it
/// repaired (same records, tail, report, and the same files left afterwards).
/// Returns the streaming result read-only.
fn assert_agrees(dir: &Path, opts: RecoveryOptions) -> (Replayed, Tail, RecoveryReport, usize) {
    let before = files(dir);
    let (m_out, m_tail, m_report) = run_model(dir, Mode::ReadOnly);
    let streamed = run_streaming(dir, Mode::ReadOnly, opts);
    assert_eq!(streamed.0, m_out, "records");
    assert_eq!(streamed.1, m_tail, "tail");
    assert_eq!(streamed.2, m_report, "report");
    assert_eq!(files(dir), before, "read-only recovery changed a file");

    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    copy_dir(dir, a.path());
    copy_dir(dir, b.path());
    let m = run_model(a.path(), Mode::Repair);
    let s = run_streaming(b.path(), Mode::Repair, opts);
    assert_eq!((&s.0, &s.1, &s.2), (&m.0, &m.1, &m.2), "repair");
    assert_eq!(files(b.path()), files(a.path()), "files after repair");
    streamed
}

/// Payload sizes around the buffer size and its multiples, so that records start,
/// end and have their 9-byte header split at every offset of a refill.
fn sizes_around(buffer: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 8, 9, 10];
    for m in 1..=3 {
        let b = buffer * m;
        for d in 0..24 {
            v.push((b + d).saturating_sub(12));
        }
    }
    v.push(buffer * 5 + 3);
    v
}

#[test]
fn records_straddling_buffer_refills_replay_exactly() {
    for buffer in [9usize, 64, 1000, 4096] {
        let d = tempfile::tempdir().unwrap();
        let records: Vec<(Kind, Vec<u8>)> = sizes_around(buffer)
            .into_iter()
            .enumerate()
            .map(|(i, len)| (kind_of(i), payload(i, len)))
            .collect();
        let end1 = write_segment(d.path(), 1, None, &records, 3 * buffer);
        write_segment(d.path(), 2, Some(end1), &records[..7], 5000);
        let (out, tail, report, buf) = assert_agrees(d.path(), small_buffer(buffer));
        let want: Vec<_> = records
            .iter()
            .chain(&records[..7])
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        let got: Vec<_> = out.iter().map(|(_, k, p)| (*k, p.clone())).collect();
        assert_eq!(got, want, "buffer {buffer}");
        assert_eq!(report.truncated_bytes, 0);
        assert!(report.damaged.is_empty(), "{:?}", report.damaged);
        assert_eq!(tail.seq, Some(2));
        // The largest record got a buffer of its own size, and nothing larger did.
        let largest = records.iter().map(|(_, p)| p.len()).max().unwrap() + 9;
        assert_eq!(buf, largest.max(buffer), "buffer {buffer}");
    }
}

#[test]
fn a_torn_tail_inside_a_record_that_crosses_a_refill_is_cut_there() {
    const BUF: usize = 4096;
    let d = tempfile::tempdir().unwrap();
    // The third record starts 100 bytes before the end of the first buffer (which
    // starts after the segment header) and ends well into the next one.
    let first = BUF - 100 - 2 * 9 - 1000;
    let records = vec![
        (Kind::Message, payload(1, 1000)),
        (Kind::Message, payload(2, first)),
        (Kind::Message, payload(3, 3000)),
    ];
    let end = write_segment(d.path(), 1, None, &records, 0);
    let start = end - 3009;
    assert_eq!(start, SEGMENT_HEADER_BYTES + (BUF - 100) as u64);
    let path = segment::segment_path(d.path(), 1);
    let whole = fs::read(&path).unwrap();
    for cut in [start + 1, start + 9, start + 101, start + 2000, end - 1] {
        fs::write(&path, &whole[..cut as usize]).unwrap();
        let (out, tail, report, _) = assert_agrees(d.path(), small_buffer(BUF));
        assert_eq!(out.len(), 2, "cut {cut}");
        assert_eq!(tail.valid_len, start, "cut {cut}");
        assert_eq!(report.truncated_bytes, cut - start, "cut {cut}");
        let (_, tail, _, _) = run_streaming(d.path(), Mode::Repair, small_buffer(BUF));
        assert_eq!(tail.valid_len, start);
        assert_eq!(fs::metadata(&path).unwrap().len(), start, "cut {cut}");
    }
}

#[test]
fn a_corrupt_record_in_a_sealed_segment_is_reported_and_the_rest_of_it_skipped() {
    const BUF: usize = 4096;
    let d = tempfile::tempdir().unwrap();
    let sealed: Vec<_> = (0..12)
        .map(|i| (Kind::Message, payload(i, 700 + 50 * i)))
        .collect();
    let end1 = write_segment(d.path(), 1, None, &sealed, 8192);
    let newest: Vec<_> = (20..23)
        .map(|i| (Kind::RcptUpdate, payload(i, 40)))
        .collect();
    write_segment(d.path(), 2, Some(end1), &newest, 0);
    // Damage the payload of the sixth record, which crosses the end of the first
    // buffer (which starts after the segment header), past that end.
    let offsets: Vec<u64> = sealed
        .iter()
        .scan(SEGMENT_HEADER_BYTES, |at, (_, p)| {
            let o = *at;
            *at += 9 + p.len() as u64;
            Some(o)
        })
        .collect();
    let victim = offsets[5];
    let first_buffer_end = SEGMENT_HEADER_BYTES + BUF as u64;
    assert!(victim < first_buffer_end && victim + 9 + 959 > first_buffer_end);
    let flip = (victim + 9 + 500) as usize;
    assert!(flip as u64 > first_buffer_end);
    let path = segment::segment_path(d.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[flip] ^= 0x10;
    fs::write(&path, &bytes).unwrap();

    let (out, tail, report, _) = assert_agrees(d.path(), small_buffer(BUF));
    let got: Vec<_> = out.iter().map(|(_, _, p)| p.clone()).collect();
    let want: Vec<_> = sealed[..5]
        .iter()
        .chain(&newest)
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        report.damaged,
        vec![format!(
            "segment 1: record checksum mismatch at offset {victim}, rest skipped"
        )]
    );
    assert_eq!(tail.seq, Some(2));
    // A sealed segment is never modified, not even by repair.
    run_streaming(d.path(), Mode::Repair, small_buffer(BUF));
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[test]
fn a_record_larger_than_the_buffer_gets_a_buffer_of_its_size_then_the_usual_one() {
    let d = tempfile::tempdir().unwrap();
    let big = 5 << 20;
    let records = vec![
        (Kind::Message, payload(1, 100)),
        (Kind::Message, payload(2, big)),
        (Kind::Message, payload(3, 100)),
    ];
    write_segment(d.path(), 1, None, &records, 1 << 20);
    let (out, _, report, buf) = assert_agrees(d.path(), RecoveryOptions::default());
    assert_eq!(out.len(), 3);
    assert_eq!(out[1].2, records[1].1);
    assert!(report.damaged.is_empty());
    assert_eq!(buf, big + record::RECORD_HEADER_BYTES);
}

#[test]
fn a_corrupt_length_field_allocates_no_more_than_the_segment_holds() {
    let d = tempfile::tempdir().unwrap();
    let records = vec![
        (Kind::Message, payload(1, 100)),
        (Kind::Message, payload(2, 50)),
    ];
    let end = write_segment(d.path(), 1, None, &records, 0);
    let path = segment::segment_path(d.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    // The second record now claims 200 MiB, under the record limit.
    let at = (end - 59) as usize;
    bytes[at..at + 4].copy_from_slice(&(200u32 << 20).to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    let (out, tail, report, buf) = assert_agrees(d.path(), RecoveryOptions::default());
    assert_eq!(out.len(), 1);
    assert_eq!(tail.valid_len, end - 59);
    assert_eq!(report.truncated_bytes, 59);
    assert_eq!(buf, segment::RECOVERY_BUFFER_BYTES);
}

#[test]
fn thirty_two_mib_of_small_records_are_recovered_through_a_buffer_of_a_few_mib() {
    let d = tempfile::tempdir().unwrap();
    let records: Vec<_> = (0..121_000)
        .map(|i| (Kind::Message, payload(i, 270)))
        .collect();
    let end = write_segment(d.path(), 1, None, &records, 0);
    assert!(end >= 32 << 20, "{end}");
    let mut n = 0u64;
    let (tail, report) = recover_shard(d.path(), 0, Mode::ReadOnly, |_, r| {
        assert_eq!(r.payload.len(), 270);
        n += 1
    })
    .unwrap();
    assert_eq!(n, 121_000);
    assert_eq!(tail.valid_len, end);
    assert!(
        report.buffer_bytes_max <= 4 << 20,
        "recovery read through {} bytes",
        report.buffer_bytes_max
    );
}

/// What to do to a freshly written shard before recovering it.
#[derive(Debug, Clone)]
enum Damage {
    None,
    /// Flip bit `bit` of the byte at `at` (a fraction of the segment) of segment `seg`.
    Flip {
        seg: usize,
        at: f64,
        bit: u8,
    },
    /// Cut segment `seg` at `at`.
    Cut {
        seg: usize,
        at: f64,
    },
    /// Zero `len` bytes of segment `seg` from `at`.
    Zero {
        seg: usize,
        at: f64,
        len: usize,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        Just(Damage::None),
        (0usize..3, 0.0f64..1.0, 0u8..8).prop_map(|(seg, at, bit)| Damage::Flip { seg, at, bit }),
        (0usize..3, 0.0f64..1.0).prop_map(|(seg, at)| Damage::Cut { seg, at }),
        (0usize..3, 0.0f64..1.0, 1usize..3000).prop_map(|(seg, at, len)| Damage::Zero {
            seg,
            at,
            len
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// For random record sizes around a random small buffer, random zero tails, a
    /// random valid length recorded for the sealed segments and random damage,
    /// streaming recovery gives exactly what the whole-file reader gives.
    #[test]
    fn streaming_recovery_gives_exactly_what_the_whole_file_reader_gives(
        segments in prop::collection::vec(
            (prop::collection::vec(0usize..6000, 0..12), 0usize..5000, 0u64..3, 0u64..200),
            1..4,
        ),
        buffer in 9usize..3000,
        damage in damage(),
    ) {
        let d = tempfile::tempdir().unwrap();
        let mut prev = None;
        let mut i = 0;
        for (seq, (sizes, zeros, cap_kind, short)) in segments.iter().enumerate() {
            let records: Vec<_> = sizes
                .iter()
                .map(|&len| { i += 1; (kind_of(i), payload(i, len)) })
                .collect();
            let end = write_segment(d.path(), seq as u64 + 1, prev, &records, *zeros);
            // The next header records the valid length: exact (the usual case), a
            // little short (a fence inside a record), or past the file's end.
            prev = Some(match cap_kind {
                0 => end,
                1 => end.saturating_sub(*short).max(SEGMENT_HEADER_BYTES),
                _ => end + *zeros as u64 + short,
            });
        }
        let n = segments.len();
        let target = |seg: usize| segment::segment_path(d.path(), (seg % n) as u64 + 1);
        let at = |p: &Path, f: f64| ((fs::metadata(p).unwrap().len() as f64) * f) as usize;
        match damage {
            Damage::None => {}
            Damage::Flip { seg, at: f, bit } => {
                let p = target(seg);
                let mut b = fs::read(&p).unwrap();
                let k = at(&p, f).min(b.len() - 1);
                b[k] ^= 1 << bit;
                fs::write(&p, b).unwrap();
            }
            Damage::Cut { seg, at: f } => {
                let p = target(seg);
                let b = fs::read(&p).unwrap();
                fs::write(&p, &b[..at(&p, f)]).unwrap();
            }
            Damage::Zero { seg, at: f, len } => {
                let p = target(seg);
                let mut b = fs::read(&p).unwrap();
                let k = at(&p, f);
                let e = (k + len).min(b.len());
                b[k..e].fill(0);
                fs::write(&p, b).unwrap();
            }
        }
        let largest_file = files(d.path()).values().map(|b| b.len()).max().unwrap_or(0);
        let (_, _, _, buf) = assert_agrees(d.path(), small_buffer(buffer));
        // A record, or a corrupt length field, never costs more than the file holds.
        prop_assert!(buf <= buffer.max(largest_file), "buffer {}", buf);
    }
}
