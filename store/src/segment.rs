//! Segment files and recovery.
//!
//! A shard's log is a sequence of segment files `DATA/shard-K/seg-NNNNNNNNNNNN.log`,
//! each a 64-byte header followed by records. Only the newest segment is ever written;
//! older ones are sealed and immutable.
//!
//! The header of segment N+1 records how many bytes of segment N are valid. The writer
//! rolls to a new segment when the current one is full, and also when it could not cut a
//! failed write back off the current one (before that batch is answered with its
//! error): that is how bytes of a batch that was answered with an error are kept from
//! ever being read as records.

use crate::record::{self, DecodeError, RecordRef};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const SEGMENT_HEADER_BYTES: u64 = 64;
const MAGIC: &[u8; 8] = b"RMSEG001";
/// `prev_valid_len` of the first segment, which has no predecessor.
const NO_PREVIOUS: u64 = u64::MAX;

/// Where a record lives: which segment, at what offset, how long (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn shard_dir(data: &Path, shard: u32) -> PathBuf {
    data.join(format!("shard-{shard}"))
}

pub fn segment_path(shard_dir: &Path, seq: u64) -> PathBuf {
    shard_dir.join(format!("seg-{seq:012}.log"))
}

pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 12 {
        return None;
    }
    digits.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u32,
    pub seq: u64,
    pub prev_valid_len: Option<u64>,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES as usize] {
        let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.shard.to_le_bytes());
        h[12..20].copy_from_slice(&self.seq.to_le_bytes());
        h[20..28].copy_from_slice(&self.prev_valid_len.unwrap_or(NO_PREVIOUS).to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    pub fn decode(b: &[u8]) -> Option<SegmentHeader> {
        let h = b.get(..SEGMENT_HEADER_BYTES as usize)?;
        if &h[0..8] != MAGIC
            || crc32c::crc32c(&h[..60]) != u32::from_le_bytes(h[60..64].try_into().unwrap())
        {
            return None;
        }
        let prev = u64::from_le_bytes(h[20..28].try_into().unwrap());
        Some(SegmentHeader {
            shard: u32::from_le_bytes(h[8..12].try_into().unwrap()),
            seq: u64::from_le_bytes(h[12..20].try_into().unwrap()),
            prev_valid_len: (prev != NO_PREVIOUS).then_some(prev),
        })
    }
}

/// Whether recovery may repair the files (the server, at start) or must only read
/// (offline commands, which may run beside a live server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Repair,
    ReadOnly,
}

/// Where the writer continues after recovery (`Tail::default()`: an empty shard).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// The newest segment, or `None` when the shard has none yet.
    pub seq: Option<u64>,
    /// Valid bytes in that segment: the writer appends here.
    pub valid_len: u64,
}

/// What recovery found wrong and did about it, for the operator's log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    /// Bytes cut off the newest segment (a torn or corrupt tail).
    pub truncated_bytes: u64,
    /// Problems found in sealed segments, which are never modified.
    pub damaged: Vec<String>,
}

/// Replays every valid record of a shard in log order, calling `visit` for each.
///
/// A torn or corrupt tail of the newest segment ends the log: in `Repair` mode it is
/// truncated (and a newest segment with a torn header removed), so the writer appends
/// after the last good record. Everything acknowledged was synced before its reply, so
/// it lies before any such tail and is replayed.
pub fn recover_shard(
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
                if let Some(seq) = e.file_name().to_str().and_then(parse_segment_name) {
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
        let bytes = fs::read(segment_path(dir, seq))?;
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
            let path = segment_path(dir, seq);
            if torn {
                fs::remove_file(&path)?;
            } else {
                fs::rename(&path, path.with_extension("log.damaged"))?;
            }
            sync_dir(dir)?;
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
                        .open(segment_path(dir, seq))?;
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

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The valid length of sealed segment `seq`, as the header of the segment after it
/// records it (the file itself may be longer: zeros written ahead of the writer).
/// None while `seq` is the newest segment, or when that header is unreadable.
pub fn sealed_len(dir: &Path, seq: u64) -> Option<u64> {
    use std::io::Read;
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    fs::File::open(segment_path(dir, seq + 1))
        .and_then(|mut f| f.read_exact(&mut header))
        .ok()?;
    SegmentHeader::decode(&header)?.prev_valid_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let h = SegmentHeader {
            shard: 3,
            seq: 9,
            prev_valid_len: Some(1234),
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Some(h));
        let mut bad = b;
        bad[13] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), None);
        assert_eq!(SegmentHeader::decode(&b[..40]), None);
    }

    #[test]
    fn segment_names() {
        let p = segment_path(Path::new("/d"), 42);
        assert_eq!(p, Path::new("/d/seg-000000000042.log"));
        assert_eq!(parse_segment_name("seg-000000000042.log"), Some(42));
        assert_eq!(parse_segment_name("seg-42.log"), None);
    }
}
