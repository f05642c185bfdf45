//! Reads of stored messages, from any executor.
//!
//! Every executor can read every shard's durable bytes on its own: sealed segments are
//! immutable and the newest one is read only below what was synced, which every
//! [`Resolved`] record is (the owner resolves only durable records). What a reader needs
//! from the owning shard is the record's location and a pin on its segment so that
//! compaction does not delete the file while the read is under way (see
//! [`crate::handle`]); getting those from another executor is the engine's business
//! (its store service, over glommio's channel mesh). This module is what comes after:
//! each executor's cache of open segment files ([`SegmentFiles`]), and reads of a
//! record, its body, or a byte range of the body, into [`SharedBuf`]s, which are
//! aligned, `Arc`-counted and `Send`, so a read can be handed to another core.
//!
//! Large bodies are read in pieces ([`Pieces`], [`PIECE_BYTES`] each): a reader that
//! sends a 50 MiB message on a socket never holds 50 MiB at once.

use crate::handle::{Pins, Resolved};
use crate::segment;
use glommio::io::DmaFile;
use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::{Deref, Range};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::Arc;

/// What a reader asks of the shard that owns a message. Implemented by the store's
/// shard, on its own executor: `resolve` and then `pins().pin(seq)` run with no await
/// in between, so compaction (on the same executor) cannot delete the segment between
/// the answer and the pin. The owner must move a handle's entry to a record's new copy
/// before it deletes the old segment, so a handle never resolves into a segment that
/// is being deleted.
///
/// The owner also keeps the counts of references other shards' indexes hold to its
/// messages (docs/mailboxes.md, "Message handles and references across shards"):
/// the engine's store service applies them here as they arrive.
pub trait Owner {
    /// Where message `id` is now, if it lives (and is durable).
    fn resolve(&self, id: u64) -> Option<Resolved>;
    fn pins(&self) -> &Pins;
    /// One more reference to message `id`; false if it is not stored (any more).
    fn add_ref(&self, id: u64) -> bool;
    /// One reference fewer; the references left.
    fn drop_ref(&self, id: u64) -> u32;
    /// Every shard's references to this one were applied: drop what nobody refers
    /// to (see `Shard::settle_foreign`). Returns the messages dropped.
    fn settle(&self) -> usize;
}

/// Bytes of a body read at a time by [`Pieces`]: large enough that a read costs far
/// more in transfer than in submission, small enough that many readers at once stay
/// cheap in memory.
pub const PIECE_BYTES: usize = 256 << 10;

/// Segment files an executor keeps open by default. A shard's segments are 64 MiB, so
/// this covers 4 GiB of recently read history per executor.
pub const OPEN_SEGMENTS_MAX: usize = 64;

/// Alignment of [`SharedBuf`] storage: the direct-I/O block, so a buffer can be handed
/// to an `O_DIRECT` write or a registered-buffer API as it is.
pub const BUF_ALIGN: usize = 4096;

/// Heap memory aligned to [`BUF_ALIGN`], owned outright (no executor-local allocator,
/// unlike glommio's `DmaBuffer`), so it may be freed on any thread.
struct Aligned {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: `Aligned` owns its allocation exclusively; nothing else holds the pointer,
// and the global allocator may free it from any thread. Shared access (through
// `SharedBuf`) is read-only.
unsafe impl Send for Aligned {}
// SAFETY: see above; `&Aligned` only hands out `&[u8]`.
unsafe impl Sync for Aligned {}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len.max(1), BUF_ALIGN).expect("buffer size");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Aligned { ptr, len, layout }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size() >= len` initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// An aligned buffer being filled; [`AlignedBuf::freeze`] makes it a [`SharedBuf`].
pub struct AlignedBuf(Aligned);

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf(Aligned::zeroed(len))
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }

    pub fn freeze(self) -> SharedBuf {
        let len = self.0.len;
        SharedBuf {
            data: Arc::new(self.0),
            range: 0..len,
        }
    }
}

/// Immutable bytes read from a segment: aligned storage, counted with an `Arc`, so a
/// clone or a [`SharedBuf::slice`] is a pointer copy and the buffer may cross cores
/// (it is `Send` and `Sync`). The storage starts on a [`BUF_ALIGN`] boundary; a slice
/// of it need not.
#[derive(Clone)]
pub struct SharedBuf {
    data: Arc<Aligned>,
    range: Range<usize>,
}

impl SharedBuf {
    /// An aligned copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> SharedBuf {
        let mut b = AlignedBuf::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b.freeze()
    }

    /// The bytes at `range` of this buffer, sharing its storage. Panics if the range is
    /// out of bounds, as slicing does.
    pub fn slice(&self, range: Range<usize>) -> SharedBuf {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "slice {range:?} of a {}-byte buffer",
            self.len()
        );
        SharedBuf {
            data: self.data.clone(),
            range: self.range.start + range.start..self.range.start + range.end,
        }
    }

    /// Whether the first byte sits on a [`BUF_ALIGN`] boundary.
    pub fn is_aligned(&self) -> bool {
        (self.as_ptr() as usize).is_multiple_of(BUF_ALIGN)
    }
}

impl Deref for SharedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data.as_slice()[self.range.clone()]
    }
}

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBuf({} bytes)", self.len())
    }
}

struct Open {
    file: Rc<DmaFile>,
    /// Tick of the last use, for eviction (least recently used goes first).
    used: u64,
}

/// One executor's open segment files, read-only, `O_DIRECT`: opening a file costs a
/// path lookup and an io_uring round trip, so readers of the same segments share one
/// descriptor. Bounded (the least recently used is closed past the bound), and a file
/// the owner deleted is closed by [`SegmentFiles::forget`] or found by
/// [`SegmentFiles::sweep`]: an open descriptor would keep a deleted segment's disk
/// space allocated.
///
/// Executor-local (`Rc`); every executor has its own.
pub struct SegmentFiles {
    data: PathBuf,
    max_open: usize,
    open: RefCell<HashMap<(u32, u64), Open>>,
    tick: Cell<u64>,
    opens: Cell<u64>,
    records: RefCell<RecordCache>,
}

/// Records up to this size are kept by the record cache; larger ones are read in
/// pieces anyway.
pub const CACHED_RECORD_BYTES_MAX: usize = PIECE_BYTES;

/// Recently read whole records of one executor, least recently used out first,
/// bounded in bytes.
///
/// Why: segment files are read with `O_DIRECT`, so the kernel's page cache, which a
/// Maildir server such as Dovecot gets for free, does not hold recently read mail;
/// each read goes to the device (in a virtual machine each submission is also a
/// virtio notification, measured with `perf` as the largest kernel cost of a
/// single-client POP3 RETR run). A durable record never changes where it is (a
/// compacted message moves to a new segment, under a new key), so an entry is never
/// stale; entries of a deleted segment go with [`SegmentFiles::forget`] and
/// [`SegmentFiles::sweep`], so the cache does not keep a deleted segment's bytes (a
/// read that was under way when its segment was forgotten may still add its record
/// back: nobody asks for that key again, and it ages out).
#[derive(Default)]
struct RecordCache {
    bytes_max: usize,
    bytes: usize,
    /// (shard, segment, offset) → the record and the tick of its last use.
    entries: BTreeMap<(u32, u64, u64), (SharedBuf, u64)>,
    /// Tick of last use → key: the oldest first.
    by_use: BTreeMap<u64, (u32, u64, u64)>,
    hits: u64,
}

impl RecordCache {
    fn get(&mut self, key: (u32, u64, u64), tick: u64) -> Option<SharedBuf> {
        let (buf, used) = self.entries.get_mut(&key)?;
        self.by_use.remove(used);
        *used = tick;
        self.by_use.insert(tick, key);
        self.hits += 1;
        Some(buf.clone())
    }

    fn insert(&mut self, key: (u32, u64, u64), buf: SharedBuf, tick: u64) {
        if buf.len() > self.bytes_max || self.entries.contains_key(&key) {
            return;
        }
        while self.bytes + buf.len() > self.bytes_max {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((b, _)) = self.entries.remove(&oldest) {
                self.bytes -= b.len();
            }
        }
        self.bytes += buf.len();
        self.by_use.insert(tick, key);
        self.entries.insert(key, (buf, tick));
    }

    /// Drops every record of segment `seq` of `shard`.
    fn forget(&mut self, shard: u32, seq: u64) {
        let keys: Vec<_> = self
            .entries
            .range((shard, seq, 0)..=(shard, seq, u64::MAX))
            .map(|(k, (_, used))| (*k, *used))
            .collect();
        for (k, used) in keys {
            if let Some((b, _)) = self.entries.remove(&k) {
                self.bytes -= b.len();
            }
            self.by_use.remove(&used);
        }
    }
}

impl SegmentFiles {
    /// A cache for the shards under data directory `data`, keeping at most `max_open`
    /// files open (at least one).
    pub fn new(data: &Path, max_open: usize) -> SegmentFiles {
        SegmentFiles {
            data: data.to_path_buf(),
            max_open: max_open.max(1),
            open: RefCell::new(HashMap::new()),
            tick: Cell::new(0),
            opens: Cell::new(0),
            records: RefCell::new(RecordCache::default()),
        }
    }

    /// Keeps up to `bytes` of recently read records of at most
    /// [`CACHED_RECORD_BYTES_MAX`] each in memory ([`SegmentFiles::read_record`]);
    /// 0, the default, keeps none.
    pub fn with_record_cache(self, bytes: usize) -> SegmentFiles {
        self.records.borrow_mut().bytes_max = bytes;
        self
    }

    /// Bytes of records the cache holds now, and its hits since the start.
    pub fn record_cache(&self) -> (usize, u64) {
        let r = self.records.borrow();
        (r.bytes, r.hits)
    }

    /// Files open now.
    pub fn open_files(&self) -> usize {
        self.open.borrow().len()
    }

    /// Files opened since the start (misses of the cache), for tests and statistics.
    pub fn opens(&self) -> u64 {
        self.opens.get()
    }

    pub fn is_open(&self, shard: u32, seq: u64) -> bool {
        self.open.borrow().contains_key(&(shard, seq))
    }

    fn next_tick(&self) -> u64 {
        let t = self.tick.get() + 1;
        self.tick.set(t);
        t
    }

    /// Segment `seq` of `shard`, opened if it is not open yet.
    pub async fn file(&self, shard: u32, seq: u64) -> io::Result<Rc<DmaFile>> {
        let tick = self.next_tick();
        if let Some(o) = self.open.borrow_mut().get_mut(&(shard, seq)) {
            o.used = tick;
            return Ok(o.file.clone());
        }
        let path = segment::segment_path(&segment::shard_dir(&self.data, shard), seq);
        let file = Rc::new(DmaFile::open(&path).await?);
        self.opens.set(self.opens.get() + 1);
        let mut open = self.open.borrow_mut();
        // Another reader of the same segment may have opened it meanwhile: keep one.
        if let Some(o) = open.get_mut(&(shard, seq)) {
            o.used = tick;
            let theirs = o.file.clone();
            drop(open);
            close_later(file);
            return Ok(theirs);
        }
        while open.len() >= self.max_open {
            let oldest = *open
                .iter()
                .min_by_key(|(_, o)| o.used)
                .map(|(k, _)| k)
                .expect("the map is not empty");
            let o = open.remove(&oldest).expect("present");
            close_later(o.file);
        }
        open.insert(
            (shard, seq),
            Open {
                file: file.clone(),
                used: tick,
            },
        );
        Ok(file)
    }

    /// Closes segment `seq` of `shard` if it is open (its owner deleted it). Reads in
    /// flight finish on their own reference.
    pub fn forget(&self, shard: u32, seq: u64) {
        if let Some(o) = self.open.borrow_mut().remove(&(shard, seq)) {
            close_later(o.file);
        }
        self.records.borrow_mut().forget(shard, seq);
    }

    /// Closes every open file that was deleted (no name left): a backstop for
    /// deletions nobody reported with [`SegmentFiles::forget`]. One `fstat` per open
    /// file, no disk access. Returns how many were closed.
    pub fn sweep(&self) -> usize {
        let mut open = self.open.borrow_mut();
        let gone: Vec<_> = open
            .iter()
            .filter(|(_, o)| unlinked(o.file.as_raw_fd()))
            .map(|(k, _)| *k)
            .collect();
        let mut records = self.records.borrow_mut();
        for k in &gone {
            let o = open.remove(k).expect("present");
            close_later(o.file);
            records.forget(k.0, k.1);
        }
        gone.len()
    }

    /// Exactly `len` bytes of segment `seq` of `shard` from file offset `pos`. The
    /// caller holds a pin of the segment, and the range is durable (part of a resolved
    /// record). Read [`PIECE_BYTES`] at a time, so glommio's own read buffer stays
    /// small whatever `len` is.
    ///
    /// Every read starts on a block boundary: glommio's `read_at` reports
    /// `min(bytes read from the aligned start, asked)`, so a read that starts inside
    /// a block and runs past the end of the file would come back at full length, its
    /// tail not from the file. From an aligned start the length it reports is exact,
    /// and a range past the end of the file is an error, never bytes made up.
    pub async fn read(&self, shard: u32, seq: u64, pos: u64, len: usize) -> io::Result<SharedBuf> {
        let file = self.file(shard, seq).await?;
        let mut out = AlignedBuf::zeroed(len);
        let mut done = 0;
        while done < len {
            let at = pos + done as u64;
            let block = at & !(BUF_ALIGN as u64 - 1);
            let skip = (at - block) as usize;
            // Piece ends on a block boundary, so no block is read twice.
            let n = (PIECE_BYTES - skip).min(len - done);
            let got = file.read_at(block, skip + n).await?;
            if got.len() < skip + n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "segment {seq} of shard {shard} ends before {} (a resolved record \
                         must be durable)",
                        at + n as u64
                    ),
                ));
            }
            // The one copy of a read: glommio's buffer belongs to the executor's
            // allocator and cannot leave it.
            out.as_mut_slice()[done..done + n].copy_from_slice(&got[skip..skip + n]);
            done += n;
        }
        Ok(out.freeze())
    }

    /// The whole record (framing included), from the record cache when it is there
    /// (see [`SegmentFiles::with_record_cache`]).
    pub async fn read_record(&self, r: &Resolved) -> io::Result<SharedBuf> {
        let key = (r.handle.shard, r.seq, r.offset);
        let cacheable = r.len as usize <= CACHED_RECORD_BYTES_MAX;
        if cacheable {
            if let Some(hit) = self.records.borrow_mut().get(key, self.next_tick()) {
                return Ok(hit);
            }
        }
        let record = self
            .read(r.handle.shard, r.seq, r.offset, r.len as usize)
            .await?;
        if cacheable {
            self.records
                .borrow_mut()
                .insert(key, record.clone(), self.next_tick());
        }
        Ok(record)
    }

    /// The whole body in one buffer. For large bodies prefer [`SegmentFiles::pieces`].
    pub async fn read_body(&self, r: &Resolved) -> io::Result<SharedBuf> {
        self.read_body_range(r, 0..r.body_len as u64).await
    }

    /// Bytes `range` of the body (counted from the body's first byte).
    pub async fn read_body_range(&self, r: &Resolved, range: Range<u64>) -> io::Result<SharedBuf> {
        check_range(r, &range)?;
        self.read(
            r.handle.shard,
            r.seq,
            r.body_start() + range.start,
            (range.end - range.start) as usize,
        )
        .await
    }

    /// Bytes `range` of the body, in pieces of at most `piece` bytes (see
    /// [`PIECE_BYTES`]).
    pub fn pieces(&self, r: &Resolved, range: Range<u64>, piece: usize) -> io::Result<Pieces<'_>> {
        check_range(r, &range)?;
        Ok(Pieces {
            files: self,
            r: *r,
            pos: range.start,
            end: range.end,
            piece: piece.max(1),
        })
    }
}

fn check_range(r: &Resolved, range: &Range<u64>) -> io::Result<()> {
    if range.start > range.end || range.end > r.body_len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {range:?} of a {}-byte body", r.body_len),
        ));
    }
    Ok(())
}

/// A body range being read piece by piece ([`SegmentFiles::pieces`]).
pub struct Pieces<'a> {
    files: &'a SegmentFiles,
    r: Resolved,
    pos: u64,
    end: u64,
    piece: usize,
}

impl Pieces<'_> {
    /// The next piece, or `None` at the end of the range.
    pub async fn next(&mut self) -> Option<io::Result<SharedBuf>> {
        if self.pos >= self.end {
            return None;
        }
        let n = (self.end - self.pos).min(self.piece as u64);
        let at = self.r.body_start() + self.pos;
        let result = self
            .files
            .read(self.r.handle.shard, self.r.seq, at, n as usize)
            .await;
        match &result {
            Ok(_) => self.pos += n,
            // A failed read ends the stream.
            Err(_) => self.pos = self.end,
        }
        Some(result)
    }

    /// Body bytes not read yet.
    pub fn remaining(&self) -> u64 {
        self.end - self.pos
    }
}

fn close_later(file: Rc<DmaFile>) {
    glommio::spawn_local(async move {
        // Closes now if this was the last reference; a read in flight holds another
        // and the file closes when that one lets go.
        let _ = file.close_rc().await;
    })
    .detach();
}

/// Whether the open file `fd` has no name left (its segment was deleted).
fn unlinked(fd: std::os::fd::RawFd) -> bool {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor and st a valid out pointer.
    unsafe { libc::fstat(fd, &mut st) == 0 && st.st_nlink == 0 }
}

/// A pin of a segment of a shard owned by this executor, kept by reference count: the
/// owned form of [`crate::PinGuard`], for readers that hold the owner by `Rc`.
pub struct LocalPin {
    owner: Rc<dyn Owner>,
    seq: u64,
}

impl LocalPin {
    /// Resolves `id` with its owner and pins the segment it names, in one step.
    pub fn resolve(owner: Rc<dyn Owner>, id: u64) -> Option<(Resolved, LocalPin)> {
        let r = owner.resolve(id)?;
        owner.pins().pin(r.seq);
        Some((r, LocalPin { owner, seq: r.seq }))
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for LocalPin {
    fn drop(&mut self) {
        self.owner.pins().unpin(self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn assert_send_sync<T: Send + Sync + 'static>() {}
    // A read buffer must be able to cross cores.
    const _: () = assert_send_sync::<SharedBuf>();

    #[test]
    fn shared_buffers_are_aligned_and_slice_without_copying() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let b = SharedBuf::copy_from(&bytes);
        assert!(b.is_aligned());
        assert_eq!(&b[..], &bytes[..]);
        let s = b.slice(100..5000);
        assert_eq!(&s[..], &bytes[100..5000]);
        assert_eq!(s.slice(10..20)[..], bytes[110..120]);
        assert_eq!(s.as_ptr() as usize, b.as_ptr() as usize + 100);
        let empty = SharedBuf::copy_from(&[]);
        assert!(empty.is_empty() && empty.is_aligned());
    }

    #[test]
    fn a_shared_buffer_is_freed_on_another_thread() {
        let b = SharedBuf::copy_from(&[7u8; 9000]);
        let c = b.slice(1..2);
        let t = std::thread::spawn(move || c[0]);
        assert_eq!(t.join().unwrap(), 7);
        drop(b);
    }
}
