//! The shard log writer: appends records to the newest segment with group commit.
//!
//! Sessions call [`ShardLog::append`] (or [`ShardLog::append_with_body`], which copies a
//! message body once from its producer's pieces, CRC'd in the same pass), which
//! encodes the record in place in the open batch's aligned buffer (the very buffer
//! the disk write is made from) and returns at once, then await
//! [`ShardLog::durable`] (or [`ShardLog::durable_bytes`], which also hands back the
//! record's bytes in that buffer: glommio's `write_rc_at` lets the writer keep it). One flusher task per shard takes
//! the whole batch, writes it with one `write` and makes it durable with one
//! `fdatasync`, while the next batch fills. Every message of a batch is covered by that
//! one sync, so the sync rate, not the message rate, is what the disk must sustain.
//!
//! Runs on a glommio executor and never blocks it: reads, writes, syncs and opens of
//! segment files go through io_uring; the calls io_uring cannot do (the directory sync
//! of a segment roll, `statvfs`, creating and syncing the shard directory) go to
//! glommio's blocking thread, as does glommio's own `truncate`. That is one thread per
//! executor (glommio 0.9), shared by every shard log on the executor: a slow directory
//! sync stalls the other writers' rolls, cuts and free-space checks queued behind it,
//! but not the sessions of the core, nor the writes and syncs of batches.
//!
//! Segments are written with direct I/O (`O_DIRECT`, glommio's `DmaFile`): the batch
//! goes from one aligned buffer to the disk without a copy into the page cache, which
//! on this kind of machine costs several times the CPU of the write itself. Direct
//! writes must cover whole blocks, so the writer keeps the partial last block of the
//! segment in memory and writes it again, unchanged, in front of the next batch. A
//! torn write of that block leaves each sector either old or new, and both hold the
//! same bytes for what was already durable. While batches are small, the segment is
//! filled with synced zeros ahead of the writer (see `Flusher::zero_ahead`).
//!
//! Ordering guarantees:
//! - A batch's waiters learn its outcome only after its `fdatasync` returned (success)
//!   or after its bytes were made unreadable (failure): cut off the segment, or, if
//!   the cut fails, fenced off by a new segment whose durable header records the old
//!   one's valid length. A crash right after a 4xx therefore never replays the refused
//!   records. If even the fence cannot be written, the shard halts: every later
//!   append fails ([`LogError::Io`], "stopped taking mail") until a restart, and the
//!   failed batch may be replayed after it (as a message killed between its sync and
//!   its 250 may be). A fence whose header and name are durable fences even when
//!   opening it then fails: the shard goes on, and the next batch opens it.
//! - A roll (segment full, or a fence) creates the new segment, syncs its header, then
//!   syncs the directory, all before any batch is written into it: no record in a
//!   segment is acknowledged before the segment's name is durable.
//! - Once a roll out of a segment has begun, nothing more is written into that segment,
//!   even if the roll fails: the new header, which caps the old segment, may already be
//!   on disk. Every later batch retries the roll first (see `Flusher::roll`).

use crate::record::{self, Kind};
use crate::segment::{self, Location, SegmentHeader, Tail, SEGMENT_HEADER_BYTES};
use event_listener::Event;
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

/// Why a batch was not made durable. Every record of the batch gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogError {
    /// The file system is full (ENOSPC, EDQUOT): SMTP answers 452 4.3.1.
    NoSpace,
    /// Any other write or sync failure: SMTP answers 451 4.3.0.
    Io(String),
    /// The log was closed before the record could be written.
    Closed,
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::NoSpace => write!(f, "no space left on the spool's file system"),
            LogError::Io(e) => write!(f, "spool I/O error: {e}"),
            LogError::Closed => write!(f, "spool closed"),
        }
    }
}

impl std::error::Error for LogError {}

impl From<io::Error> for LogError {
    fn from(e: io::Error) -> LogError {
        // glommio passes errors on with the kind but without the errno.
        let full = matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            || matches!(
                e.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            );
        if full {
            LogError::NoSpace
        } else {
            LogError::Io(e.to_string())
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LogConfig {
    /// A segment is sealed once a batch would take it past this size.
    pub segment_bytes_max: u64,
    /// Fill the segment with synced zeros ahead of the writer while batches are small
    /// (see `Flusher::zero_ahead`): faster syncs, at the price of writing every byte
    /// of a segment twice.
    pub zero_ahead: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 64 << 20,
            zero_ahead: true,
        }
    }
}

/// Called with a new segment's sequence number once the directory holding it is
/// synced, on the thread that synced it.
pub type DirSyncHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Where an injected fault fired (see [`Faults::on_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    Write,
    Sync,
    Truncate,
    Create,
    Open,
}

/// Test hooks for the error and ordering paths, all failing with `errno`: the next
/// `writes` batch writes, the next `syncs` batch syncs and the next `truncates` cuts of
/// a failed batch fail; the next `creates` segment creations fail once the file exists,
/// before its header is written; the next `opens` segment creations fail after the
/// header and the directory entry are durable, where opening the file for direct I/O
/// (or its block-size check) can fail. `on_fault` runs on the executor each time one of
/// these fires. `after_dir_sync` observes each directory sync of a segment roll and
/// `after_parent_sync` the sync of the shard directory's own entry at open (pass the
/// hooks to [`ShardLog::open_with_faults`] to see that one). `free_bytes`, when set,
/// is what the free-space check reports; `space_checks` counts those checks.
#[derive(Default)]
pub struct Faults {
    pub writes: Cell<u32>,
    pub syncs: Cell<u32>,
    pub truncates: Cell<u32>,
    pub creates: Cell<u32>,
    pub opens: Cell<u32>,
    pub errno: Cell<i32>,
    #[allow(clippy::type_complexity)]
    pub on_fault: RefCell<Option<Rc<dyn Fn(FaultPoint)>>>,
    pub after_dir_sync: RefCell<Option<DirSyncHook>>,
    pub after_parent_sync: RefCell<Option<Arc<dyn Fn() + Send + Sync>>>,
    pub free_bytes: Cell<Option<u64>>,
    pub space_checks: Cell<u32>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("writes", &self.writes)
            .field("syncs", &self.syncs)
            .field("truncates", &self.truncates)
            .field("creates", &self.creates)
            .field("opens", &self.opens)
            .field("errno", &self.errno)
            .field("on_fault", &self.on_fault.borrow().is_some())
            .field("after_dir_sync", &self.after_dir_sync.borrow().is_some())
            .field(
                "after_parent_sync",
                &self.after_parent_sync.borrow().is_some(),
            )
            .field("free_bytes", &self.free_bytes)
            .field("space_checks", &self.space_checks)
            .finish()
    }
}

impl Faults {
    fn fire(&self, point: FaultPoint) -> io::Result<()> {
        let counter = match point {
            FaultPoint::Write => &self.writes,
            FaultPoint::Sync => &self.syncs,
            FaultPoint::Truncate => &self.truncates,
            FaultPoint::Create => &self.creates,
            FaultPoint::Open => &self.opens,
        };
        match counter.get() {
            0 => Ok(()),
            n => {
                counter.set(n - 1);
                // Cloned out first: the hook may append, or set further faults.
                let hook = self.on_fault.borrow().clone();
                if let Some(hook) = hook {
                    hook(point);
                }
                Err(io::Error::from_raw_os_error(self.errno.get()))
            }
        }
    }
}

/// The outcome of one batch, shared by every record in it.
struct Slot {
    /// Where the batch was written, once durable.
    done: RefCell<Option<Result<Rc<Written>, LogError>>>,
    event: Event,
    /// Tickets of this batch still held: their holders may not have applied the
    /// records' effects yet (see [`ShardLog::replay_start`]).
    tickets: Cell<u32>,
}

/// A durable batch: where it went, and the buffers it was written from (kept, so a
/// fresh message can be sent on from memory without a copy of its own).
struct Written {
    seq: u64,
    /// Segment offset of the batch's first record.
    start: u64,
    bufs: Vec<WrittenBuf>,
}

impl Written {
    /// Record bytes of the batch.
    fn len(&self) -> u64 {
        self.bufs.iter().map(|b| b.len).sum()
    }
}

struct WrittenBuf {
    buf: Rc<DmaBuffer>,
    /// `offset_in_batch` of the buffer's first record, and where that record starts
    /// in the buffer.
    first: u64,
    lead: usize,
    /// Record bytes in the buffer.
    len: u64,
    /// Bytes allocated for the buffer (trimming it to the write's size frees none).
    alloc: usize,
}

/// Bytes of a durable batch as written, shared (cheap to clone).
#[derive(Clone)]
pub struct LogBytes {
    buf: Rc<DmaBuffer>,
    range: std::ops::Range<usize>,
    alloc: usize,
}

impl LogBytes {
    /// The last `n` bytes (a record's body is its last field).
    pub fn suffix(&self, n: usize) -> LogBytes {
        assert!(n <= self.range.len());
        LogBytes {
            buf: self.buf.clone(),
            range: self.range.end - n..self.range.end,
            alloc: self.alloc,
        }
    }

    /// What keeping these bytes holds in memory: the whole buffer they are in, as
    /// allocated, shared with every other record of that buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.alloc
    }

    /// The same for every `LogBytes` of one buffer while any of them lives, so a
    /// holder can count a shared buffer once.
    pub fn buffer_id(&self) -> usize {
        Rc::as_ptr(&self.buf) as usize
    }
}

impl std::ops::Deref for LogBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf.as_bytes()[self.range.clone()]
    }
}

impl AsRef<[u8]> for LogBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for LogBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogBytes({} bytes)", self.range.len())
    }
}

/// A message body as its producer holds it, maybe in pieces (the SMTP session's
/// received chunks, dot-stuffing skipped): the log copies it into the batch once.
pub trait BodySource {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Calls `f` with the body's bytes, in order; together they are `len` bytes.
    fn pieces(&self, f: &mut dyn FnMut(&[u8]));
}

impl BodySource for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn pieces(&self, f: &mut dyn FnMut(&[u8])) {
        f(self)
    }
}

impl BodySource for Vec<u8> {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn pieces(&self, f: &mut dyn FnMut(&[u8])) {
        f(self)
    }
}

impl<T: BodySource + ?Sized> BodySource for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn pieces(&self, f: &mut dyn FnMut(&[u8])) {
        (**self).pieces(f)
    }
}

impl Slot {
    fn new() -> Rc<Slot> {
        Rc::new(Slot {
            done: RefCell::new(None),
            event: Event::new(),
            tickets: Cell::new(0),
        })
    }
}

/// A record appended but not yet known to be durable. Its holder keeps it until it
/// has applied the record's effect to its in-memory state: while it lives, a snapshot
/// does not move the replay start past the record's batch.
pub struct Ticket {
    slot: Rc<Slot>,
    offset_in_batch: u64,
    len: u32,
}

impl Ticket {
    /// Bytes of the record, framing included.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.slot.tickets.set(self.slot.tickets.get() - 1);
    }
}

/// Direct I/O block: offsets and lengths of segment writes are multiples of this.
/// (4 KiB covers every logical block size in use, 512 B included.)
const BLOCK: u64 = 4096;

fn align_down(v: u64) -> u64 {
    v & !(BLOCK - 1)
}

fn align_up(v: u64) -> u64 {
    align_down(v + BLOCK - 1)
}

/// Direct I/O on a device whose logical blocks are larger than `BLOCK` would fail
/// every write with EINVAL: refuse it at open with a clear error instead.
fn check_block_size(file: &DmaFile) -> io::Result<()> {
    if file.alignment() > BLOCK {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the spool's device has {}-byte logical blocks; ringmail writes {BLOCK}-byte blocks",
                file.alignment()
            ),
        ));
    }
    Ok(())
}

struct Segment {
    file: Rc<DmaFile>,
    seq: u64,
    /// Bytes durable in this segment: the next batch is written here.
    len: u64,
    /// The durable bytes of the block `len` falls in (`align_down(len)..len`): written
    /// again in front of the next batch.
    tail: Vec<u8>,
    /// The file holds synced zeros up to here (see `Flusher::zero_ahead`).
    zeroed: Rc<Cell<u64>>,
    /// Start of the region a zeroing task is writing; no batch may touch it until done.
    zeroing_from: Rc<Cell<Option<u64>>>,
    zeroing_done: Rc<Event>,
}

impl Segment {
    fn new(file: DmaFile, seq: u64, len: u64, tail: Vec<u8>) -> Segment {
        debug_assert_eq!(tail.len() as u64, len - align_down(len));
        Segment {
            file: Rc::new(file),
            seq,
            len,
            tail,
            zeroed: Rc::new(Cell::new(len)),
            zeroing_from: Rc::new(Cell::new(None)),
            zeroing_done: Rc::new(Event::new()),
        }
    }

    /// Waits until no zeroing task writes at or below `end`.
    async fn wait_zeroing(&self, end: u64) {
        loop {
            let listener = self.zeroing_done.listen();
            match self.zeroing_from.get() {
                Some(from) if from < end => listener.await,
                _ => return,
            }
        }
    }
}

/// How far ahead of the writer the segment is filled with synced zeros.
const ZERO_AHEAD_BYTES: u64 = 8 << 20;

/// Batches larger than this on average are appended without zeros ahead of them:
/// writing the zeros costs disk bandwidth in proportion to the bytes, while what they
/// save (the file system's metadata commit) is once per sync. Measured with
/// ringmail-load, 32 sessions: 4 KiB messages (batches of tens of KiB) +13% with
/// zeros; 100 KiB messages (batches of MiBs) +36% without.
const ZERO_AHEAD_BATCH_MAX: u64 = 256 << 10;

/// The recent batch sizes as the bytes see them: the mean batch size weighted by each
/// batch's bytes (Σ len² / Σ len, decaying). Zeros double every byte written, so what
/// decides is the batches most bytes travel in: a shard that takes large messages and
/// the small records of mailbox entries between them (many small batches, few bytes)
/// writes in large batches, where the plain mean of many small and a few large ones
/// turned zeros on and cost more bandwidth than the small syncs saved (bench/RESULTS.md,
/// "Local delivery: zeros by the bytes").
#[derive(Debug, Default, Clone, Copy)]
struct BatchSizes {
    squares: f64,
    bytes: f64,
}

impl BatchSizes {
    /// Each batch weighs 1/64 less per later batch: the last hundred or so decide.
    const DECAY: f64 = 63.0 / 64.0;

    fn add(&mut self, len: u64) {
        let len = len as f64;
        self.squares = self.squares * Self::DECAY + len * len;
        self.bytes = self.bytes * Self::DECAY + len;
    }

    fn byte_weighted_mean(&self) -> f64 {
        if self.bytes == 0.0 {
            0.0
        } else {
            self.squares / self.bytes
        }
    }
}

const NO_BODY: &[u8] = &[];

/// Batch buffers are at least this large: a buffer per record would mean a write per
/// record. Larger records get a buffer of their own size. Small, because the queue
/// keeps a fresh message's batch buffer while the message waits for delivery: a
/// lone 4 KiB message holds at most this much.
const BATCH_BUF_BYTES_MIN: usize = 16 << 10;
/// ... and, while batches are small, at most about twice the average batch: a buffer
/// lives as long as the freshest message in it is kept for delivery, so slack in it
/// is memory held.
const BATCH_BUF_BYTES_MAX: usize = 4 << 20;

/// One aligned buffer of the open batch. Its first byte goes to a block boundary of
/// the segment: `lead` bytes of the block the batch starts in (what the segment
/// already holds there), then records, then zeros up to the next block boundary.
/// Records are encoded in place: this buffer is what the write sends to the disk.
struct BatchBuf {
    buf: DmaBuffer,
    lead: usize,
    /// Bytes in use (lead included).
    used: usize,
    /// `offset_in_batch` of its first record.
    first: u64,
}

struct Inner {
    /// The open batch: records go into the last buffer; a record that does not fit
    /// starts another (each buffer is one write, the batch one fdatasync).
    bufs: Vec<BatchBuf>,
    /// Record bytes in the open batch.
    len: u64,
    /// The partial block the open batch starts in, as the segment will hold it once
    /// the batch being written is durable (a prediction: see `Flusher::write_batch`).
    next_tail: Vec<u8>,
    /// Payloads of records without a body are encoded here first (small).
    scratch: Vec<u8>,
    /// Moving average of batch sizes, for sizing buffers.
    batch_avg: u64,
    slot: Rc<Slot>,
    closing: bool,
}

impl Inner {
    /// Room for a record of `total` bytes at the end of the open batch.
    fn reserve(&mut self, total: usize) -> &mut BatchBuf {
        let fits = self
            .bufs
            .last()
            .is_some_and(|b| b.buf.len() - b.used >= total);
        if !fits {
            let (lead_bytes, first): (&[u8], u64) = match self.bufs.last() {
                None => (&self.next_tail, 0),
                Some(b) => (
                    &b.buf.as_bytes()[align_down(b.used as u64) as usize..b.used],
                    self.len,
                ),
            };
            let lead = lead_bytes.len();
            let want =
                (self.batch_avg as usize * 2).clamp(BATCH_BUF_BYTES_MIN, BATCH_BUF_BYTES_MAX);
            let size = align_up(want.max(lead + total) as u64) as usize;
            let mut buf = glommio::allocate_dma_buffer(size);
            buf.as_bytes_mut()[..lead].copy_from_slice(lead_bytes);
            crate::stats::add(|c| c.tail_bytes_copied += lead as u64);
            self.bufs.push(BatchBuf {
                buf,
                lead,
                used: lead,
                first,
            });
        }
        self.bufs.last_mut().unwrap()
    }
}

/// One shard's log writer. Cheap to clone (shared within the executor).
#[derive(Clone)]
pub struct ShardLog {
    inner: Rc<RefCell<Inner>>,
    /// Wakes the flusher when a batch has something in it, or on close.
    wake: Rc<Event>,
    faults: Rc<Faults>,
    /// Set when the bytes of a failed batch could be neither cut off nor fenced off:
    /// from then on every append fails with this reason (see `Flusher::fail_batch`).
    halted: Rc<RefCell<Option<String>>>,
    stopped: Rc<Event>,
    running: Rc<Cell<bool>>,
    /// Batches written (each one write and one fdatasync), failed ones included.
    batches: Rc<Cell<u64>>,
    /// Batches in order from the oldest one that may still have tickets held, the
    /// open batch last (see [`ShardLog::replay_start`]).
    inflight: Rc<RefCell<std::collections::VecDeque<Rc<Slot>>>>,
    /// (segment, offset) just past the last durable batch.
    durable_end: Rc<Cell<(u64, u64)>>,
}

impl ShardLog {
    /// Opens the shard's newest segment after recovery (or creates the first one) and
    /// starts the flusher task on the current executor.
    pub async fn open(dir: &Path, shard: u32, tail: Tail, cfg: LogConfig) -> io::Result<ShardLog> {
        Self::open_with_faults(dir, shard, tail, cfg, Faults::default()).await
    }

    /// [`ShardLog::open`] with failure injection and hooks set from the start.
    pub async fn open_with_faults(
        dir: &Path,
        shard: u32,
        tail: Tail,
        cfg: LogConfig,
        faults: Faults,
    ) -> io::Result<ShardLog> {
        // The shard directory's own name lives in its parent (DATA, whose manifest was
        // synced before the directory existed): sync it, or a crash could lose the
        // directory and every segment acknowledged in it. Cheap enough to do at every
        // open, which also covers a directory made by a run that crashed before this.
        let owned = dir.to_path_buf();
        let hook = faults.after_parent_sync.borrow().clone();
        off_executor(move || {
            std::fs::create_dir_all(&owned)?;
            if let Some(parent) = owned.parent() {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                segment::sync_dir(parent)?;
            }
            if let Some(hook) = hook {
                hook();
            }
            Ok::<(), io::Error>(())
        })
        .await?;
        let faults = Rc::new(faults);
        let seg = match tail.seq {
            Some(seq) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .dma_open(segment::segment_path(dir, seq))
                    .await?;
                check_block_size(&file)?;
                let base = align_down(tail.valid_len);
                let want = (tail.valid_len - base) as usize;
                let block = file.read_at_aligned(base, BLOCK as usize).await?;
                if block.len() < want {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "segment shorter than its recovered length",
                    ));
                }
                Segment::new(file, seq, tail.valid_len, block[..want].to_vec())
            }
            None => create_segment(dir, shard, 1, None, &faults)
                .await
                .map_err(|f| f.error)?,
        };
        let first = Slot::new();
        let log = ShardLog {
            inflight: Rc::new(RefCell::new([first.clone()].into())),
            durable_end: Rc::new(Cell::new((seg.seq, seg.len))),
            inner: Rc::new(RefCell::new(Inner {
                bufs: Vec::new(),
                len: 0,
                next_tail: seg.tail.clone(),
                scratch: Vec::new(),
                batch_avg: 0,
                slot: first,
                closing: false,
            })),
            wake: Rc::new(Event::new()),
            faults,
            halted: Rc::new(RefCell::new(None)),
            stopped: Rc::new(Event::new()),
            running: Rc::new(Cell::new(true)),
            batches: Rc::new(Cell::new(0)),
        };
        let flusher = Flusher {
            dir: dir.to_path_buf(),
            shard,
            cfg,
            seg,
            batches: BatchSizes::default(),
            sealed: false,
            zeros: Rc::new(RefCell::new(None)),
            log: log.clone(),
        };
        glommio::spawn_local(flusher.run()).detach();
        Ok(log)
    }

    /// Appends a record whose payload `write` produces; returns a ticket to await
    /// durability with. The record is in memory only until then.
    pub fn append(&self, kind: Kind, write: impl FnOnce(&mut Vec<u8>)) -> Result<Ticket, LogError> {
        let mut inner = self.open_batch()?;
        let mut head = std::mem::take(&mut inner.scratch);
        head.clear();
        write(&mut head);
        let t = self.place(&mut inner, kind, &head, &NO_BODY);
        inner.scratch = head;
        drop(inner);
        self.wake.notify(1);
        Ok(t)
    }

    /// Appends a record whose payload is what `head` writes followed by `body`'s
    /// bytes. The body is copied once, from its pieces straight into the batch's
    /// aligned buffer (the one the disk write is made from), and CRC'd in the same
    /// pass; the record's CRC is combined from the head's and the body's, so the body
    /// is read once. Returns the ticket and the body's CRC32C.
    pub fn append_with_body(
        &self,
        kind: Kind,
        head: impl FnOnce(&mut Vec<u8>),
        body: &dyn BodySource,
    ) -> Result<(Ticket, u32), LogError> {
        let mut inner = self.open_batch()?;
        let mut h = std::mem::take(&mut inner.scratch);
        h.clear();
        head(&mut h);
        let (t, crc) = self.place_with_crc(&mut inner, kind, &h, body);
        inner.scratch = h;
        drop(inner);
        self.wake.notify(1);
        Ok((t, crc))
    }

    fn open_batch(&self) -> Result<std::cell::RefMut<'_, Inner>, LogError> {
        let inner = self.inner.borrow_mut();
        if inner.closing {
            return Err(LogError::Closed);
        }
        if let Some(why) = self.halted.borrow().as_ref() {
            return Err(LogError::Io(why.clone()));
        }
        Ok(inner)
    }

    fn place(&self, inner: &mut Inner, kind: Kind, head: &[u8], body: &dyn BodySource) -> Ticket {
        self.place_with_crc(inner, kind, head, body).0
    }

    fn place_with_crc(
        &self,
        inner: &mut Inner,
        kind: Kind,
        head: &[u8],
        body: &dyn BodySource,
    ) -> (Ticket, u32) {
        let body_len = body.len();
        let payload = head.len() + body_len;
        assert!(
            payload <= record::RECORD_PAYLOAD_BYTES_MAX,
            "record too large"
        );
        let total = record::RECORD_HEADER_BYTES + payload;
        let offset_in_batch = inner.len;
        let b = inner.reserve(total);
        let at = b.used;
        let out = &mut b.buf.as_bytes_mut()[at..at + total];
        let (hdr, rest) = out.split_at_mut(record::RECORD_HEADER_BYTES);
        let (h, dst) = rest.split_at_mut(head.len());
        h.copy_from_slice(head);
        let body_crc = copy_body(body, dst);
        let head_crc = crc32c::crc32c_append(crc32c::crc32c(&[kind as u8]), head);
        let crc = crate::crc::combine(head_crc, body_crc, body_len as u64);
        hdr[0..4].copy_from_slice(&(payload as u32).to_le_bytes());
        hdr[4..8].copy_from_slice(&crc.to_le_bytes());
        hdr[8] = kind as u8;
        b.used += total;
        inner.len += total as u64;
        if body_len > 0 {
            crate::stats::add(|c| {
                c.bodies += 1;
                c.body_bytes += body_len as u64;
            });
        }
        inner.slot.tickets.set(inner.slot.tickets.get() + 1);
        let ticket = Ticket {
            slot: inner.slot.clone(),
            offset_in_batch,
            len: total as u32,
        };
        (ticket, body_crc)
    }

    /// Waits until the ticket's record is on stable storage; returns where it is.
    pub async fn durable(&self, t: Ticket) -> Result<Location, LogError> {
        self.durable_ref(&t).await
    }

    /// [`ShardLog::durable`] for a holder that keeps the ticket until it applied the
    /// record (see [`ShardLog::replay_start`]).
    pub async fn durable_ref(&self, t: &Ticket) -> Result<Location, LogError> {
        self.durable_bytes(t).await.map(|(loc, _)| loc)
    }

    /// [`ShardLog::durable_ref`], and the record's bytes as they were written (from
    /// the batch's own buffer: no copy, no read).
    pub async fn durable_bytes(&self, t: &Ticket) -> Result<(Location, LogBytes), LogError> {
        loop {
            let listener = t.slot.event.listen();
            if let Some(done) = t.slot.done.borrow().as_ref() {
                let w = done.clone()?;
                let b = w
                    .bufs
                    .iter()
                    .find(|b| (b.first..b.first + b.len).contains(&t.offset_in_batch))
                    .expect("a record lies in one buffer of its batch");
                let from = b.lead + (t.offset_in_batch - b.first) as usize;
                let loc = Location {
                    seq: w.seq,
                    offset: w.start + t.offset_in_batch,
                    len: t.len,
                };
                let bytes = LogBytes {
                    buf: b.buf.clone(),
                    range: from..from + t.len as usize,
                    alloc: b.alloc,
                };
                return Ok((loc, bytes));
            }
            listener.await;
        }
    }

    /// Where replay must start for a snapshot of the in-memory state taken now: the
    /// start of the oldest durable batch some of whose tickets are still held (their
    /// holders may not have applied them), else the end of what is durable (a batch
    /// not written yet lands after it). Failed batches do not count: their records
    /// are never replayed, and their holders apply nothing. Never moves backwards.
    pub fn replay_start(&self) -> (u64, u64) {
        self.prune_inflight();
        let q = self.inflight.borrow();
        for s in q.iter() {
            if s.tickets.get() == 0 {
                continue;
            }
            match &*s.done.borrow() {
                Some(Ok(w)) => return (w.seq, w.start),
                Some(Err(_)) => continue,
                None => break,
            }
        }
        self.durable_end.get()
    }

    /// Lets go of the batches at the front whose tickets are all dropped: nothing
    /// holds their effects back any more, and each keeps its written buffers alive
    /// (megabytes a batch under load) for as long as it is listed.
    fn prune_inflight(&self) {
        let open = self.inner.borrow().slot.clone();
        let mut q = self.inflight.borrow_mut();
        while let Some(s) = q.front() {
            if s.tickets.get() == 0 && !Rc::ptr_eq(s, &open) {
                q.pop_front();
            } else {
                break;
            }
        }
    }

    /// Batches listed for [`ShardLog::replay_start`] (for tests).
    pub fn batches_tracked(&self) -> usize {
        self.inflight.borrow().len()
    }

    /// (segment, offset) just past the last durable batch.
    pub fn durable_end(&self) -> (u64, u64) {
        self.durable_end.get()
    }

    /// Batches written so far (one fdatasync each), for tests and statistics.
    pub fn batches_written(&self) -> u64 {
        self.batches.get()
    }

    /// Failure injection for tests of the error paths.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Flushes what was appended, then stops the flusher. Appends after this fail.
    pub async fn close(&self) {
        self.inner.borrow_mut().closing = true;
        loop {
            let listener = self.stopped.listen();
            if !self.running.get() {
                return;
            }
            self.wake.notify(1);
            listener.await;
        }
    }
}

struct Flusher {
    dir: PathBuf,
    shard: u32,
    cfg: LogConfig,
    seg: Segment,
    /// The batch sizes, for `ZERO_AHEAD_BATCH_MAX`.
    batches: BatchSizes,
    /// A roll out of `seg` began and did not finish: nothing more is written into it
    /// (see `Flusher::roll`).
    sealed: bool,
    /// The zeros `zero_ahead` writes, `ZERO_AHEAD_BYTES` of them: made once and only
    /// ever read (the device reads them while writing), where a buffer made and
    /// zeroed per round cost a page fault per 4 KiB and a memset of 8 MiB (~5 % of
    /// the server's samples under `perf` during local delivery of 100 KiB messages).
    zeros: Rc<RefCell<Option<Rc<DmaBuffer>>>>,
    log: ShardLog,
}

impl Flusher {
    async fn run(mut self) {
        loop {
            let listener = self.log.wake.listen();
            let (batch, slot, closing) = {
                let mut inner = self.log.inner.borrow_mut();
                if inner.bufs.is_empty() {
                    (Vec::new(), None, inner.closing)
                } else {
                    let mut batch = std::mem::take(&mut inner.bufs);
                    let len = std::mem::take(&mut inner.len);
                    inner.batch_avg = (inner.batch_avg * 7 + len) / 8;
                    // The records were placed behind the bytes the segment was
                    // expected to hold in its last block. After a roll, or when the
                    // batch before failed, it will hold others: then (rarely) the batch
                    // is copied once more behind the right ones, now, so that the
                    // prediction below is made from the batch as it will be written
                    // and the batch filling meanwhile lands right. Deciding this only
                    // when writing would leave every later batch under load
                    // mispredicted, and copied again, until the log went idle.
                    let tail = self.tail_before(len);
                    if !starts_behind(&batch[0], &tail) {
                        batch = vec![relocate(&batch, &tail, len)];
                    }
                    // The next batch starts in the block this one ends in: its
                    // buffers begin with those bytes, as the segment will hold them
                    // once this batch is written.
                    let last = batch.last().unwrap();
                    let from = align_down(last.used as u64) as usize;
                    inner.next_tail.clear();
                    inner
                        .next_tail
                        .extend_from_slice(&last.buf.as_bytes()[from..last.used]);
                    crate::stats::add(|c| c.tail_bytes_copied += (last.used - from) as u64);
                    let next = Slot::new();
                    self.log.inflight.borrow_mut().push_back(next.clone());
                    let slot = std::mem::replace(&mut inner.slot, next);
                    (batch, Some(slot), inner.closing)
                }
            };
            match slot {
                Some(slot) => {
                    self.log.batches.set(self.log.batches.get() + 1);
                    let result = self.write_batch(batch).await.map(Rc::new);
                    if let Ok(w) = &result {
                        self.log.durable_end.set((w.seq, w.start + w.len()));
                    }
                    // Not only when a snapshot asks: every listed batch holds its
                    // buffers, and snapshots may be minutes apart.
                    self.log.prune_inflight();
                    // Nothing is open yet: the next batch can start from what the
                    // segment really holds (after a failure or a roll the prediction
                    // above was wrong).
                    {
                        let mut inner = self.log.inner.borrow_mut();
                        if inner.bufs.is_empty() && inner.next_tail != self.seg.tail {
                            inner.next_tail.clone_from(&self.seg.tail);
                        }
                    }
                    *slot.done.borrow_mut() = Some(result);
                    slot.event.notify(usize::MAX);
                }
                None if closing => break,
                None => listener.await,
            }
        }
        self.seg.wait_zeroing(u64::MAX).await;
        let _ = self.seg.file.fdatasync().await;
        self.log.running.set(false);
        self.log.stopped.notify(usize::MAX);
    }

    /// Whether a batch of `len` record bytes goes into a new segment (see `roll`).
    fn rolls_for(&self, len: u64) -> bool {
        self.sealed
            || (self.seg.len > SEGMENT_HEADER_BYTES
                && self.seg.len + len > self.cfg.segment_bytes_max)
    }

    /// The bytes the segment will hold in the block a batch of `len` record bytes
    /// starts in, when it is written next: after a roll, the new segment's header
    /// (the same bytes every attempt at the roll writes).
    fn tail_before(&self, len: u64) -> std::borrow::Cow<'_, [u8]> {
        if self.rolls_for(len) {
            let header = SegmentHeader {
                shard: self.shard,
                seq: self.seg.seq + 1,
                prev_valid_len: Some(self.seg.len),
            }
            .encode();
            std::borrow::Cow::Owned(header.to_vec())
        } else {
            std::borrow::Cow::Borrowed(&self.seg.tail)
        }
    }

    async fn write_batch(&mut self, mut batch: Vec<BatchBuf>) -> Result<Written, LogError> {
        let len: u64 = batch.iter().map(|b| (b.used - b.lead) as u64).sum();
        if let Some(why) = self.log.halted.borrow().as_ref() {
            return Err(LogError::Io(why.clone()));
        }
        if self.rolls_for(len) {
            // Nothing of this batch is written yet: if the roll fails, only this batch
            // fails, and the next one tries to roll again.
            self.roll().await.map_err(|f| LogError::from(f.error))?;
        }
        let start = self.seg.len;
        let end = start + len;
        // `run` placed the batch behind these bytes already (see `tail_before`); this
        // only guards against a roll that wrote another header than predicted.
        if !starts_behind(&batch[0], &self.seg.tail) {
            debug_assert!(false, "a batch was taken behind the wrong tail");
            batch = vec![relocate(&batch, &self.seg.tail, len)];
        }
        let mut bufs = Vec::with_capacity(batch.len());
        let mut at = start;
        for mut b in batch {
            let records = (b.used - b.lead) as u64;
            let base = at - b.lead as u64;
            debug_assert_eq!(base % BLOCK, 0);
            debug_assert_eq!(b.first, at - start);
            let size = align_up(b.used as u64) as usize;
            let alloc = b.buf.len();
            // Zeros up to the block boundary read as the clean end of the log.
            b.buf.as_bytes_mut()[b.used..size].fill(0);
            crate::stats::add(|c| {
                c.log_record_bytes += records;
                c.log_tail_bytes += b.lead as u64;
                c.log_pad_bytes += (size - b.used) as u64;
            });
            b.buf.trim_to_size(size);
            bufs.push((
                base,
                WrittenBuf {
                    buf: Rc::new(b.buf),
                    first: at - start,
                    lead: b.lead,
                    len: records,
                    alloc,
                },
            ));
            at += records;
        }
        debug_assert_eq!(at, end);
        self.batches.add(len);
        if self.batches.byte_weighted_mean() <= ZERO_AHEAD_BATCH_MAX as f64 && self.cfg.zero_ahead {
            self.zero_ahead(align_up(end));
        }
        self.seg.wait_zeroing(align_up(end)).await;
        let faults = self.log.faults.clone();
        let result = async {
            faults.fire(FaultPoint::Write)?;
            // In order: each buffer rewrites the block the one before ended in.
            for (base, b) in &bufs {
                write_all(&self.seg.file, b.buf.clone(), *base).await?;
            }
            faults.fire(FaultPoint::Sync)?;
            let began = std::time::Instant::now();
            let synced = self.seg.file.fdatasync().await;
            crate::stats::add(|c| {
                c.batches += 1;
                c.sync_latency.observe(began.elapsed());
            });
            synced?;
            Ok::<(), io::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                let (base, last) = bufs.last().unwrap();
                let bytes = last.buf.as_bytes();
                self.seg.tail.clear();
                self.seg.tail.extend_from_slice(
                    &bytes[(align_down(end) - base) as usize..(end - base) as usize],
                );
                self.seg.len = end;
                Ok(Written {
                    seq: self.seg.seq,
                    start,
                    bufs: bufs.into_iter().map(|(_, b)| b).collect(),
                })
            }
            Err(e) => {
                tracing::error!(shard = self.shard, seq = self.seg.seq, error = %e, "spool write failed");
                self.fail_batch(start).await;
                Err(LogError::from(e))
            }
        }
    }

    /// Makes sure the bytes of a batch that failed at `start` are never read back as
    /// records, before the batch's waiters are told it failed (they answer 4xx, and a
    /// crash right after must not replay what was refused).
    ///
    /// First the batch is cut off (truncate, then a sync, or a crash could bring the old
    /// size back). If that fails, the segment is sealed at `start`: a new segment whose
    /// durable header records `start` as the old one's valid length (the fence). If even
    /// the fence cannot be made durable, the shard halts: every later append fails, as
    /// acknowledging anything more would build on a log whose replay may bring the
    /// failed records back. The failed batch itself may then be replayed after a
    /// restart, like a message killed between its sync and its 250.
    async fn fail_batch(&mut self, start: u64) {
        // No zeroing may land after the cut.
        self.seg.wait_zeroing(u64::MAX).await;
        self.seg.zeroed.set(start);
        let faults = self.log.faults.clone();
        let cut = async {
            faults.fire(FaultPoint::Truncate)?;
            self.seg.file.truncate(start).await?;
            self.seg.file.fdatasync().await?;
            Ok::<(), io::Error>(())
        }
        .await;
        let Err(cut_err) = cut else {
            return;
        };
        tracing::error!(shard = self.shard, seq = self.seg.seq, error = %cut_err,
            "cannot cut a failed batch off its segment: fencing it off with a new segment");
        debug_assert_eq!(start, self.seg.len);
        match self.roll().await {
            Ok(()) => {}
            Err(f) if f.durable => {
                // The fence's header and name are on disk: the failed bytes are fenced
                // off, only the handle is missing. The next batch opens it (see
                // `roll`).
                tracing::error!(shard = self.shard, seq = self.seg.seq + 1, error = %f.error,
                    "fenced a failed batch off, but cannot open the fence yet");
            }
            Err(f) => {
                let why = format!(
                    "shard {} stopped taking mail: the bytes of a failed write could be \
                     neither cut off segment {} ({cut_err}) nor fenced off ({}); restart \
                     once the disk is fixed",
                    self.shard,
                    self.seg.seq,
                    LogError::from(f.error)
                );
                tracing::error!("{why}");
                *self.log.halted.borrow_mut() = Some(why);
            }
        }
    }

    /// Keeps the segment filled with synced zeros ahead of the writer, in the
    /// background. A sync of bytes written over already-allocated, already-synced
    /// blocks is a pure data flush; a sync of an append must also commit the file
    /// system's journal (new blocks, new size), which on this disk halves the sync rate.
    /// Recovery reads an all-zero record header as the clean end of the log.
    /// `end` is block-aligned: the batch covers everything below it.
    fn zero_ahead(&self, end: u64) {
        let seg = &self.seg;
        let limit = align_up(self.cfg.segment_bytes_max);
        if seg.zeroing_from.get().is_some()
            || seg.zeroed.get() >= (end + ZERO_AHEAD_BYTES / 2).min(limit)
        {
            return;
        }
        // Start past this batch: it is written while the zeros are, never under them.
        let from = align_up(seg.zeroed.get().max(end));
        let to = (from + ZERO_AHEAD_BYTES).min(limit);
        if to <= from {
            return;
        }
        seg.zeroing_from.set(Some(from));
        let (path, zeroed, zeroing_from, done, faults, shared) = (
            segment::segment_path(&self.dir, seg.seq),
            seg.zeroed.clone(),
            seg.zeroing_from.clone(),
            seg.zeroing_done.clone(),
            self.log.faults.clone(),
            self.zeros.clone(),
        );
        glommio::spawn_local(async move {
            // A file handle of its own: the kernel reports a write-back error once per
            // open file, and this sync must not be the one that swallows an error the
            // batch writer's sync has to see.
            let file = OpenOptions::new().write(true).dma_open(&path).await.ok();
            // Never compete with messages for the last of the space.
            let fd = file.as_ref().map(|f| f.as_raw_fd());
            let low = match fd {
                Some(fd) => {
                    faults.space_checks.set(faults.space_checks.get() + 1);
                    let free = match faults.free_bytes.get() {
                        Some(fake) => Some(fake),
                        None => off_executor(move || free_bytes(fd)).await,
                    };
                    free.is_some_and(|free| free < 4 * ZERO_AHEAD_BYTES)
                }
                None => false,
            };
            if low {
                // Not a failure, but the answer holds for the rest of this segment: the
                // check runs on the executor's one blocking thread and the next batch
                // may wait for it, so asking again per batch would add a wait per batch
                // on a nearly full disk. The next segment asks again.
                if let Some(f) = file {
                    let _ = f.close().await;
                }
                zeroed.set(u64::MAX);
                zeroing_from.set(None);
                done.notify(usize::MAX);
                return;
            }
            let ok = match &file {
                Some(f) => {
                    crate::stats::add(|c| c.zero_bytes += to - from);
                    let len = (to - from) as usize;
                    let kept = shared.borrow().clone().filter(|z| z.len() == len);
                    let buf = kept.unwrap_or_else(|| {
                        let mut z = f.alloc_dma_buffer(len);
                        z.as_bytes_mut().fill(0);
                        let z = Rc::new(z);
                        // The last round of a segment may be shorter: not kept.
                        if len as u64 == ZERO_AHEAD_BYTES {
                            *shared.borrow_mut() = Some(z.clone());
                        }
                        z
                    });
                    write_all(f, buf, from).await.is_ok() && f.fdatasync().await.is_ok()
                }
                None => false,
            };
            if ok {
                zeroed.set(to);
            } else {
                // Most likely a full disk: give the space back to the messages (no batch
                // is written at or past `from` while this runs) and stop zeroing this
                // segment; appends still work, only their syncs cost more.
                if let Some(f) = &file {
                    let _ = f.truncate(from).await;
                }
                zeroed.set(u64::MAX);
            }
            if let Some(f) = file {
                let _ = f.close().await;
            }
            zeroing_from.set(None);
            done.notify(usize::MAX);
        })
        .detach();
    }

    /// Seals the current segment at its length and continues in a new one, whose
    /// header and directory entry are durable when this returns.
    ///
    /// The rule after a roll that failed: the old segment stays sealed, and every later
    /// batch first retries the roll. The new segment's header, which caps the old one at
    /// `seg.len`, may be on disk from the first attempt on (written but its sync failed,
    /// or synced and only the open failed), so a batch written past `seg.len` could be
    /// cut off by recovery after it was acknowledged. Nothing changes `seg.len` while
    /// sealed, so every retry writes the same header bytes into the same file.
    async fn roll(&mut self) -> Result<(), CreateFailed> {
        self.sealed = true;
        let next = create_segment(
            &self.dir,
            self.shard,
            self.seg.seq + 1,
            Some(self.seg.len),
            &self.log.faults,
        )
        .await?;
        self.sealed = false;
        let old = std::mem::replace(&mut self.seg, next);
        // The old file closes when its last user (a zeroing task, maybe) lets go.
        drop(old);
        Ok(())
    }
}

/// Runs a blocking file-system call (directory sync, statvfs, mkdir) on the executor's
/// one blocking thread (shared with the other shard logs of this executor): on the
/// executor itself a slow disk would stall every session of the core.
async fn off_executor<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(f).await
}

/// Space left for unprivileged writers on the file system holding `fd`.
fn free_bytes(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open and st is a valid out pointer.
    (unsafe { libc::fstatvfs(fd, &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Copies `body` into `dst` (exactly its length) and returns its CRC32C, computed
/// piece by piece right behind the copy, while the bytes are still in cache.
fn copy_body(body: &dyn BodySource, dst: &mut [u8]) -> u32 {
    const STEP: usize = 64 << 10;
    let mut crc = 0u32;
    let mut at = 0;
    body.pieces(&mut |mut piece: &[u8]| {
        let len = piece.len();
        while !piece.is_empty() {
            let n = piece.len().min(STEP);
            let d = &mut dst[at..at + n];
            d.copy_from_slice(&piece[..n]);
            crc = crc32c::crc32c_append(crc, d);
            at += n;
            piece = &piece[n..];
        }
        // Counted as each piece is copied, so a test can tell that a piece went
        // straight from its producer into this buffer.
        crate::stats::add(|c| {
            c.body_bytes_copied += len as u64;
            c.body_bytes_crc += len as u64;
        });
    });
    assert_eq!(at, dst.len(), "a body source gave other than its length");
    crc
}

/// Whether a batch's first buffer was placed behind exactly `tail`.
fn starts_behind(first: &BatchBuf, tail: &[u8]) -> bool {
    first.lead == tail.len() && first.buf.as_bytes()[..first.lead] == *tail
}

/// The batch in one buffer, behind `tail` (the bytes the segment holds in the block
/// the batch starts in).
fn relocate(batch: &[BatchBuf], tail: &[u8], len: u64) -> BatchBuf {
    let used = tail.len() + len as usize;
    let mut buf = glommio::allocate_dma_buffer(align_up(used as u64) as usize);
    let bytes = buf.as_bytes_mut();
    bytes[..tail.len()].copy_from_slice(tail);
    let mut at = tail.len();
    for b in batch {
        let records = &b.buf.as_bytes()[b.lead..b.used];
        bytes[at..at + records.len()].copy_from_slice(records);
        at += records.len();
    }
    crate::stats::add(|c| c.relocated_bytes += len);
    BatchBuf {
        buf,
        lead: tail.len(),
        used,
        first: 0,
    }
}

/// Writes the whole buffer at `pos`. A regular file only writes short when the file
/// system ran out of space (io_uring writes are not interrupted by signals), so a short
/// write is reported as ENOSPC; the caller cuts the partial bytes off again.
async fn write_all(file: &DmaFile, buf: Rc<DmaBuffer>, pos: u64) -> io::Result<()> {
    let total = buf.len();
    let written = file.write_rc_at(buf, pos).await?;
    if written < total {
        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
    }
    Ok(())
}

/// A segment creation that failed. `durable`: its header and directory entry had been
/// synced before the failure, so the file fences off the previous segment's bytes past
/// the length it records even though it could not be opened.
struct CreateFailed {
    error: io::Error,
    durable: bool,
}

/// Creates segment `seq`, or makes it durable again: a failed earlier attempt leaves
/// its file in place, never deleted, as it may already be (or be about to become) the
/// fence of a failed batch. Deleting it durably would need a directory sync that can
/// fail too; keeping it is safe, because the writer never writes into the previous
/// segment again (see `Flusher::roll`) and every retry writes the same header.
/// Recovery drops the file if its header never reached the disk.
async fn create_segment(
    dir: &Path,
    shard: u32,
    seq: u64,
    prev_valid_len: Option<u64>,
    faults: &Faults,
) -> Result<Segment, CreateFailed> {
    let durable = Cell::new(false);
    try_create_segment(dir, shard, seq, prev_valid_len, faults, &durable)
        .await
        .map_err(|error| CreateFailed {
            error,
            durable: durable.get(),
        })
}

async fn try_create_segment(
    dir: &Path,
    shard: u32,
    seq: u64,
    prev_valid_len: Option<u64>,
    faults: &Faults,
    durable: &Cell<bool>,
) -> io::Result<Segment> {
    let path = segment::segment_path(dir, seq);
    // The first block (header, then zeros) is written through the page cache, and
    // only then is the file opened for direct I/O: glommio probes a device for polled
    // I/O by reading the start of the first file it opens there, and reading an empty
    // file "succeeds" even on devices that cannot poll, whose reads would then fail.
    let header = SegmentHeader {
        shard,
        seq,
        prev_valid_len,
    }
    .encode();
    let mut block = vec![0u8; BLOCK as usize];
    block[..header.len()].copy_from_slice(&header);
    // Not `create_new`: the file may be left from a failed attempt at this very roll;
    // the header written below is the same, byte for byte.
    let created = OpenOptions::new()
        .write(true)
        .create(true)
        .buffered_open(&path)
        .await?;
    faults.fire(FaultPoint::Create)?;
    crate::stats::add(|c| c.segment_header_bytes += BLOCK);
    if created.write_at(block, 0).await? < BLOCK as usize {
        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
    }
    created.fdatasync().await?;
    created.close().await?;
    // The new name must be durable too, or a crash could lose the whole segment (and
    // with it every record acknowledged in it): the caller writes no batch here before
    // this returns.
    let hook = faults.after_dir_sync.borrow().clone();
    let owned = dir.to_path_buf();
    off_executor(move || {
        segment::sync_dir(&owned)?;
        if let Some(hook) = hook {
            hook(seq);
        }
        Ok::<(), io::Error>(())
    })
    .await?;
    durable.set(true);
    faults.fire(FaultPoint::Open)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .dma_open(&path)
        .await?;
    check_block_size(&file)?;
    Ok(Segment::new(
        file,
        seq,
        SEGMENT_HEADER_BYTES,
        header.to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disk_is_recognised_with_or_without_the_errno() {
        let raw = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(LogError::from(raw), LogError::NoSpace);
        // What glommio hands on: the kind, a message, no errno.
        let kind_only = io::Error::new(io::ErrorKind::StorageFull, "Writing path ...");
        assert_eq!(LogError::from(kind_only), LogError::NoSpace);
        let quota = io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(LogError::from(quota), LogError::NoSpace);
        let eio = io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(LogError::from(eio), LogError::Io(_)));
    }

    #[test]
    fn zeros_go_by_the_batches_most_bytes_travel_in() {
        let limit = ZERO_AHEAD_BATCH_MAX as f64;
        let mut small = BatchSizes::default();
        assert!(small.byte_weighted_mean() <= limit, "a fresh log zeros");
        for _ in 0..500 {
            small.add(40 << 10);
        }
        assert!(small.byte_weighted_mean() <= limit);
        // Large message batches with ten small mailbox batches after each: the plain
        // mean is under the limit, the bytes travel in the large ones.
        let mut mixed = BatchSizes::default();
        let (mut sum, mut n) = (0u64, 0u64);
        for _ in 0..50 {
            for len in std::iter::once(2 << 20).chain([600; 10]) {
                mixed.add(len);
                sum += len;
                n += 1;
            }
        }
        assert!(((sum / n) as f64) < limit);
        assert!(mixed.byte_weighted_mean() > limit);
        // The small ones alone for a while: zeros again.
        for _ in 0..1000 {
            mixed.add(600);
        }
        assert!(mixed.byte_weighted_mean() <= limit);
    }
}
