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
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
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
    /// The largest read buffer recovery allocated, in bytes: its memory is bounded by
    /// this, which is [`RecoveryOptions::buffer_bytes`] unless a record was larger.
    pub buffer_bytes_max: usize,
}

/// Read buffer of recovery: segments are streamed through it, refilled as records are
/// consumed. Large enough that a read costs far more in transfer than in system calls.
pub const RECOVERY_BUFFER_BYTES: usize = 1 << 20;

/// How recovery reads segments (tests shrink the buffer to put records across refills).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryOptions {
    /// Bytes read at a time; a record larger than this gets a buffer of its own size.
    pub buffer_bytes: usize,
    /// Drop the pages already read from the page cache: a cold start reads the whole
    /// history once and must not push the rest of the machine's cache out with it.
    /// (The server reads segments with direct I/O afterwards, never through the cache.)
    pub drop_cache_behind: bool,
    /// (segment, offset) replay starts at: a snapshot holds the effect of everything
    /// before it. Segments before it are not read (their headers still are: each caps
    /// the segment before it).
    pub start: (u64, u64),
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions {
            buffer_bytes: RECOVERY_BUFFER_BYTES,
            drop_cache_behind: true,
            start: (0, 0),
        }
    }
}

/// Replays every valid record of a shard in log order, calling `visit` for each.
///
/// A torn or corrupt tail of the newest segment ends the log: in `Repair` mode it is
/// truncated (and a newest segment with a torn header removed), so the writer appends
/// after the last good record. Everything acknowledged was synced before its reply, so
/// it lies before any such tail and is replayed.
///
/// Segments are streamed, never read whole: memory is bounded by the read buffer or
/// the largest record, whichever is larger.
pub fn recover_shard(
    dir: &Path,
    shard: u32,
    mode: Mode,
    visit: impl FnMut(Location, RecordRef<'_>),
) -> io::Result<(Tail, RecoveryReport)> {
    recover_shard_with(dir, shard, mode, RecoveryOptions::default(), visit)
}

/// [`recover_shard`] with explicit read options.
pub fn recover_shard_with(
    dir: &Path,
    shard: u32,
    mode: Mode,
    opts: RecoveryOptions,
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
    // `torn`: the file is too short for a header, or holds zeros where it goes.
    let mut files: Vec<(u64, Option<SegmentHeader>, bool)> = Vec::with_capacity(seqs.len());
    for &seq in &seqs {
        let head = read_head(&segment_path(dir, seq))?;
        let header = SegmentHeader::decode(&head).filter(|h| h.seq == seq && h.shard == shard);
        let torn = head.len() < SEGMENT_HEADER_BYTES as usize || head.iter().all(|&b| b == 0);
        files.push((seq, header, torn));
    }
    // A newest segment whose header never made it to disk (short, or zeros where the
    // header goes) holds nothing acknowledged: its first batch was synced only after
    // the header was. One whose header is there but wrong is damage, not a torn
    // creation: it is set aside, never deleted.
    while let Some(&(seq, None, torn)) = files.last() {
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
    let mut buf = Vec::new();
    for i in 0..count {
        let (seq, header, _) = files[i];
        let newest = i + 1 == count;
        let Some(_) = header else {
            report
                .damaged
                .push(format!("segment {seq}: bad header, skipped"));
            continue;
        };
        if seq < opts.start.0 && !newest {
            continue;
        }
        let path = segment_path(dir, seq);
        let mut r = SegmentReader::open(&path, opts, std::mem::take(&mut buf))?;
        let file_len = r.len;
        // Only the very next segment knows this one's valid length (compaction may
        // have deleted it; then this segment lies before the replay start anyway).
        let cap = files
            .get(i + 1)
            .filter(|(next, _, _)| *next == seq + 1)
            .and_then(|(_, h, _)| h.and_then(|h| h.prev_valid_len))
            .unwrap_or(file_len)
            .min(file_len);
        let mut pos = SEGMENT_HEADER_BYTES;
        if seq == opts.start.0 {
            pos = pos.max(opts.start.1.min(cap));
        }
        let mut clean_end = false;
        while pos < cap {
            let head_len = (cap - pos).min(record::RECORD_HEADER_BYTES as u64) as usize;
            let head = r.get(pos, head_len)?;
            // The writer fills segments with zeros ahead of itself: an all-zero record
            // header is where the log ends, not damage.
            if head.iter().all(|&b| b == 0) {
                clean_end = r.zeros_from(pos)?;
                if clean_end {
                    break;
                }
            }
            // Exactly the bytes `record::decode` looks at, never past `cap`: a corrupt
            // length field cannot make recovery allocate more than the segment holds.
            let head = r.get(pos, head_len)?;
            let need = match head.get(..4) {
                Some(l) if head.len() == record::RECORD_HEADER_BYTES => {
                    let l = u32::from_le_bytes(l.try_into().unwrap()) as usize;
                    if l > record::RECORD_PAYLOAD_BYTES_MAX {
                        head.len()
                    } else {
                        (record::RECORD_HEADER_BYTES as u64 + l as u64).min(cap - pos) as usize
                    }
                }
                _ => head.len(),
            };
            match record::decode(r.get(pos, need)?) {
                Ok(rec) => {
                    let len = rec.total_len;
                    visit(
                        Location {
                            seq,
                            offset: pos,
                            len: len as u32,
                        },
                        rec,
                    );
                    report.records += 1;
                    pos += len as u64;
                }
                Err(e) => {
                    if newest {
                        report.truncated_bytes = r.len - pos;
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
        let file_len = r.len;
        report.buffer_bytes_max = report.buffer_bytes_max.max(r.peak);
        buf = r.finish();
        if newest {
            if pos < file_len {
                if !clean_end {
                    report.truncated_bytes = file_len - pos;
                }
                if mode == Mode::Repair {
                    let f = fs::OpenOptions::new().write(true).open(&path)?;
                    f.set_len(pos)?;
                    f.sync_all()?;
                }
            }
            tail = Tail {
                seq: Some(seq),
                valid_len: pos,
            };
        }
    }
    report.segments = files.len();
    Ok((tail, report))
}

/// Segment `seq`'s header, `None` when it does not decode.
pub fn read_header(dir: &Path, seq: u64) -> io::Result<Option<SegmentHeader>> {
    Ok(SegmentHeader::decode(&read_head(&segment_path(dir, seq))?))
}

/// Up to the first `SEGMENT_HEADER_BYTES` of a file (fewer when it is shorter).
fn read_head(path: &Path) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    fs::File::open(path)?
        .take(SEGMENT_HEADER_BYTES)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// A segment read front to back through one buffer, refilled as the reader moves on.
///
/// `get(pos, n)` hands out `file[pos..pos + n]` (shorter at the end of the file) from
/// the buffer, reading more when the range is not in it. Positions only move forward,
/// but for the rare look back after a zero run that turned out not to be the end.
struct SegmentReader {
    file: fs::File,
    /// The file's length when opened: the view recovery reads, even if a live server
    /// appends meanwhile (offline commands), as a whole-file read would have had.
    len: u64,
    /// Allocated (and zeroed) once per size; `buf[..filled]` is `file[at..]`.
    buf: Vec<u8>,
    filled: usize,
    at: u64,
    chunk: usize,
    /// The page cache is dropped below this offset.
    dropped: u64,
    drop_behind: bool,
    /// The largest buffer this reader allocated.
    peak: usize,
}

impl SegmentReader {
    fn open(path: &Path, opts: RecoveryOptions, buf: Vec<u8>) -> io::Result<SegmentReader> {
        let file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        // Doubles the kernel's readahead: the file is read once, front to back.
        // Advice only: an error changes nothing about what is read.
        fadvise(&file, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        Ok(SegmentReader {
            file,
            len,
            peak: buf.len(),
            buf,
            filled: 0,
            at: 0,
            chunk: opts.buffer_bytes.max(record::RECORD_HEADER_BYTES),
            dropped: 0,
            drop_behind: opts.drop_cache_behind,
        })
    }

    fn get(&mut self, pos: u64, n: usize) -> io::Result<&[u8]> {
        let pos = pos.min(self.len);
        let mut end = (pos + n as u64).min(self.len);
        if pos < self.at || end > self.at + self.filled as u64 {
            self.refill(pos, (end - pos) as usize)?;
            // A file that shrank under a read-only reader ends where the read did.
            end = end.min(self.at + self.filled as u64);
        }
        let s = (pos - self.at) as usize;
        Ok(&self.buf[s..s + (end - pos) as usize])
    }

    /// Makes `buf` start at `pos` and hold at least `want` bytes (less only at EOF),
    /// reading as far as the buffer allows so reads stay large.
    fn refill(&mut self, pos: u64, want: usize) -> io::Result<()> {
        let kept = if pos >= self.at && pos < self.at + self.filled as u64 {
            let s = (pos - self.at) as usize;
            self.buf.copy_within(s..self.filled, 0);
            self.filled - s
        } else {
            0
        };
        let size = want.max(self.chunk);
        // Bytes past a smaller new buffer are simply read again.
        let kept = kept.min(size);
        // The usual buffer, or one sized for a record larger than it; after such a
        // record the usual size comes back, so one large record does not keep its
        // memory for the rest of recovery.
        if self.buf.len() != size && (self.buf.len() < size || self.buf.len() > self.chunk) {
            let mut b = vec![0u8; size];
            b[..kept].copy_from_slice(&self.buf[..kept]);
            self.buf = b;
            self.peak = self.peak.max(size);
        }
        self.at = pos;
        self.filled = kept;
        let target = ((self.len - pos) as usize).min(self.buf.len());
        while self.filled < target {
            let n = self
                .file
                .read_at(&mut self.buf[self.filled..target], pos + self.filled as u64);
            match n {
                Ok(0) => {
                    self.len = pos + self.filled as u64;
                    break;
                }
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.drop_behind && pos >= self.dropped + self.chunk as u64 {
            fadvise(
                &self.file,
                self.dropped,
                pos - self.dropped,
                libc::POSIX_FADV_DONTNEED,
            );
            self.dropped = pos;
        }
        Ok(())
    }

    /// Whether everything from `pos` to the end of the file is zero.
    fn zeros_from(&mut self, mut pos: u64) -> io::Result<bool> {
        while pos < self.len {
            let chunk = self.chunk;
            let bytes = self.get(pos, chunk)?;
            if bytes.is_empty() {
                break;
            }
            // Or-folding vectorises; an early exit per byte would not.
            if bytes.iter().fold(0u8, |a, &b| a | b) != 0 {
                return Ok(false);
            }
            pos += bytes.len() as u64;
        }
        Ok(true)
    }

    /// Drops what is left of the file from the page cache and hands the buffer back
    /// for the next segment.
    fn finish(self) -> Vec<u8> {
        if self.drop_behind {
            fadvise(&self.file, 0, 0, libc::POSIX_FADV_DONTNEED);
        }
        let mut buf = self.buf;
        if buf.len() > self.chunk {
            buf = Vec::new();
        }
        buf
    }
}

fn fadvise(file: &fs::File, offset: u64, len: u64, advice: libc::c_int) {
    // SAFETY: the descriptor is open for the duration of the call; advice has no
    // memory effects.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, advice);
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The valid length of sealed segment `seq`, as the header of the segment after it
/// records it (the file itself may be longer: zeros written ahead of the writer).
/// None while `seq` is the newest segment, or when that header is unreadable.
pub fn sealed_len(dir: &Path, seq: u64) -> Option<u64> {
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
