//! `MailCache`: one per shard (`DATA/shard-K/mailcache`), the parsed metadata of the
//! mailbox entries whose home is the shard (docs/mailboxes.md: ENVELOPE,
//! BODYSTRUCTURE, part offsets, `mime::Meta::encode`). An entry holds the offset of
//! its blob.
//!
//! Everything here can be recomputed from the message, so nothing is synced: an
//! append is copied into memory and returns its offset at once; a background task on
//! the shard's executor writes what was appended through glommio (a buffered file:
//! the blobs are small and unsynced, and glommio's direct reads of blocks written
//! but not synced fail with EOPNOTSUPP on this kind of file system). A blob not
//! written yet is read from memory.
//!
//! Each blob is framed `len u32 | crc32c u32 | message_id u64 | blob`, the CRC over
//! the length, the id and the blob. A read checks all three, so a blob lost or torn
//! in a crash, an offset from before a cut of the file (a later blob may now sit
//! there), or one naming another message gives `None`, and the caller recomputes the
//! meta from the message (and may append it again). At `open` the file is scanned
//! frame by frame and cut at the first frame that does not check (the torn tail:
//! writes are not synced, so a crash can leave any recent block short or zero); that
//! scan reads the whole file once per start.
//!
//! Space: the blob of an expunged entry stays in the file, unreferenced. The file
//! only grows; compacting it (copying the live blobs, which the mailbox index names,
//! into a new file and swapping the entries' offsets) is not done yet and is left for
//! later. Deleting the file is always safe: every read then misses and recomputes.

use event_listener::Event;
use glommio::io::{BufferedFile, OpenOptions};
use std::cell::RefCell;
use std::io;
use std::path::Path;
use std::rc::Rc;

/// Bytes of a frame in front of the blob.
pub const FRAME_HEAD: usize = 16;
/// A blob larger than this is refused by `append` (returns `None`) and by `read`, so a
/// garbage length never makes a read allocate much.
pub const BLOB_MAX: usize = 16 << 20;

fn frame_crc(len: u32, message_id: u64, blob: &[u8]) -> u32 {
    let c = crc32c::crc32c(&len.to_le_bytes());
    let c = crc32c::crc32c_append(c, &message_id.to_le_bytes());
    crc32c::crc32c_append(c, blob)
}

/// Checks the frame at the start of `buf`: the blob if it is whole and valid.
fn check(buf: &[u8], message_id: Option<u64>) -> Option<&[u8]> {
    let head = buf.get(..FRAME_HEAD)?;
    let len = u32::from_le_bytes(head[0..4].try_into().unwrap());
    let crc = u32::from_le_bytes(head[4..8].try_into().unwrap());
    let id = u64::from_le_bytes(head[8..16].try_into().unwrap());
    if len as usize > BLOB_MAX || message_id.is_some_and(|m| m != id) {
        return None;
    }
    let blob = buf.get(FRAME_HEAD..FRAME_HEAD + len as usize)?;
    (frame_crc(len, id, blob) == crc).then_some(blob)
}

struct State {
    /// File offset of `mem[0]`: everything before it is in the file.
    base: u64,
    /// What was appended and not written yet (kept until its write returned).
    mem: Vec<u8>,
    closed: bool,
    flushing: bool,
}

struct Inner {
    file: BufferedFile,
    state: RefCell<State>,
    /// The writer waits on it for work; `flush` waits on it for the writer.
    wake: Event,
    done: Event,
}

/// The shard's cache file. Not `Send`: it lives on the shard's executor.
#[derive(Clone)]
pub struct MailCache {
    inner: Rc<Inner>,
}

impl MailCache {
    /// Opens (or creates) the cache file, cuts a torn tail, and starts the writer on
    /// the current executor.
    pub async fn open(path: &Path) -> io::Result<MailCache> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .buffered_open(path)
            .await?;
        let size = file.file_size().await?;
        // Scan: frame after frame until one does not check.
        let mut valid = 0u64;
        let chunk = 1usize << 20;
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_at = 0u64;
        loop {
            let rel = (valid - buf_at) as usize;
            match check(&buf[rel..], None) {
                Some(blob) => valid += (FRAME_HEAD + blob.len()) as u64,
                None => {
                    // Not whole in the buffer: read on, unless the file is at its end.
                    let have = buf_at + buf.len() as u64;
                    let want_len = buf
                        .get(rel..rel + 4)
                        .map(|l| u32::from_le_bytes(l.try_into().unwrap()) as usize);
                    let needed = valid + FRAME_HEAD as u64 + want_len.unwrap_or(0) as u64;
                    let short = want_len.is_none_or(|l| l <= BLOB_MAX) && needed > have;
                    if !short || have >= size {
                        break;
                    }
                    let from = valid;
                    let n = chunk.max((needed - from) as usize);
                    let read = file.read_at(from, n).await?;
                    if read.is_empty() {
                        break;
                    }
                    buf = read.to_vec();
                    buf_at = from;
                }
            }
        }
        if valid < size {
            file.truncate(valid).await?;
        }
        let cache = MailCache {
            inner: Rc::new(Inner {
                file,
                state: RefCell::new(State {
                    base: valid,
                    mem: Vec::new(),
                    closed: false,
                    flushing: false,
                }),
                wake: Event::new(),
                done: Event::new(),
            }),
        };
        glommio::spawn_local(cache.clone().writer()).detach();
        Ok(cache)
    }

    /// Keeps `blob` for `message_id` and returns its offset (the entry's `cache`).
    /// `None` when the blob is over [`BLOB_MAX`] or the cache is closed.
    pub fn append(&self, message_id: u64, blob: &[u8]) -> Option<u64> {
        if blob.len() > BLOB_MAX {
            return None;
        }
        let mut s = self.inner.state.borrow_mut();
        if s.closed {
            return None;
        }
        let offset = s.base + s.mem.len() as u64;
        let len = blob.len() as u32;
        s.mem.extend_from_slice(&len.to_le_bytes());
        s.mem
            .extend_from_slice(&frame_crc(len, message_id, blob).to_le_bytes());
        s.mem.extend_from_slice(&message_id.to_le_bytes());
        s.mem.extend_from_slice(blob);
        drop(s);
        self.inner.wake.notify(1);
        Some(offset)
    }

    /// The blob at `offset` if it is whole, checks and belongs to `message_id`.
    pub async fn read(&self, offset: u64, message_id: u64) -> Option<Vec<u8>> {
        {
            let s = self.inner.state.borrow();
            if offset >= s.base {
                let at = (offset - s.base) as usize;
                return check(s.mem.get(at..)?, Some(message_id)).map(<[u8]>::to_vec);
            }
        }
        // Before `base`, so whole in the file (every frame before base was written).
        let head = self.inner.file.read_at(offset, FRAME_HEAD).await.ok()?;
        let len = u32::from_le_bytes(head.get(0..4)?.try_into().unwrap()) as usize;
        if len > BLOB_MAX || u64::from_le_bytes(head.get(8..16)?.try_into().unwrap()) != message_id
        {
            return None;
        }
        let all = self
            .inner
            .file
            .read_at(offset, FRAME_HEAD + len)
            .await
            .ok()?;
        check(&all, Some(message_id)).map(<[u8]>::to_vec)
    }

    /// Bytes appended so far (the file's length once written).
    pub fn len(&self) -> u64 {
        let s = self.inner.state.borrow();
        s.base + s.mem.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until everything appended before the call is in the file (not synced):
    /// for shutdown and tests. An I/O error is returned once, the bytes stay in
    /// memory and the next write tries again.
    pub async fn flush(&self) -> io::Result<()> {
        let target = self.len();
        loop {
            let listener = self.inner.done.listen();
            {
                let s = self.inner.state.borrow();
                if s.base >= target {
                    return Ok(());
                }
                if s.closed && !s.flushing {
                    return Err(io::Error::other("mail cache closed"));
                }
            }
            self.inner.wake.notify(1);
            listener.await;
            if let Some(e) = self.take_error() {
                return Err(e);
            }
        }
    }

    fn take_error(&self) -> Option<io::Error> {
        LAST_ERROR.with(|e| e.borrow_mut().take())
    }

    /// Writes what is left and stops the writer; later appends are refused.
    pub async fn close(&self) -> io::Result<()> {
        let r = self.flush().await;
        self.inner.state.borrow_mut().closed = true;
        self.inner.wake.notify(1);
        r
    }

    async fn writer(self) {
        loop {
            let listener = self.inner.wake.listen();
            let job = {
                let mut s = self.inner.state.borrow_mut();
                if !s.mem.is_empty() {
                    s.flushing = true;
                    Some((s.base, s.mem.len()))
                } else if s.closed {
                    return;
                } else {
                    None
                }
            };
            let Some((base, n)) = job else {
                listener.await;
                continue;
            };
            let buf = self.inner.state.borrow().mem[..n].to_vec();
            let r = self.inner.file.write_at(buf, base).await;
            let ok = matches!(r, Ok(w) if w >= n);
            {
                let mut s = self.inner.state.borrow_mut();
                s.flushing = false;
                if ok {
                    s.mem.drain(..n);
                    s.base = base + n as u64;
                }
            }
            if !ok {
                let e = match r {
                    Err(e) => io::Error::other(e.to_string()),
                    Ok(_) => io::Error::new(io::ErrorKind::WriteZero, "short mail cache write"),
                };
                tracing::warn!("mail cache write failed: {e}");
                LAST_ERROR.with(|l| *l.borrow_mut() = Some(e));
                self.inner.done.notify(usize::MAX);
                // Wait for the next append (or flush) to try again.
                listener.await;
                continue;
            }
            self.inner.done.notify(usize::MAX);
        }
    }
}

thread_local! {
    /// The writer's last I/O error, for `flush` (one cache per shard, and a shard's
    /// caches live on one thread; an error seen by any flush there is reported once).
    static LAST_ERROR: RefCell<Option<io::Error>> = const { RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::LocalExecutorBuilder;

    fn run<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
        LocalExecutorBuilder::default()
            .spawn(move || async move { f().await })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn append_then_read_from_memory_then_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailcache");
        run(move || async move {
            let c = MailCache::open(&path).await.unwrap();
            let blobs: Vec<Vec<u8>> = (0..300u32)
                .map(|i| vec![i as u8; (i as usize * 37) % 5000])
                .collect();
            let offsets: Vec<u64> = blobs
                .iter()
                .enumerate()
                .map(|(i, b)| c.append(i as u64 + 7, b).unwrap())
                .collect();
            // Before the writer ran (it has not been polled yet): from memory.
            assert_eq!(c.inner.state.borrow().base, 0);
            for (i, o) in offsets.iter().enumerate() {
                assert_eq!(c.read(*o, i as u64 + 7).await.as_ref(), Some(&blobs[i]));
            }
            c.flush().await.unwrap();
            assert_eq!(c.inner.state.borrow().base, c.len(), "written out");
            for (i, o) in offsets.iter().enumerate() {
                assert_eq!(
                    c.read(*o, i as u64 + 7).await.as_ref(),
                    Some(&blobs[i]),
                    "{i}"
                );
                // Another message's id at the offset: a miss, not its blob.
                assert_eq!(c.read(*o, i as u64 + 8).await, None);
            }
            // An offset in the middle of a blob, or past the end.
            assert_eq!(c.read(offsets[10] + 3, 17).await, None);
            assert_eq!(c.read(offsets[1], 8).await.map(|b| b.len()), Some(37));
            assert_eq!(c.read(c.len() + 100, 7).await, None);
            c.close().await.unwrap();
            assert_eq!(c.append(1, b"x"), None);

            // Reopened: the same blobs, and appends go on behind them.
            let end = c.len();
            let c = MailCache::open(&path).await.unwrap();
            assert_eq!(c.len(), end);
            for (i, o) in offsets.iter().enumerate() {
                assert_eq!(c.read(*o, i as u64 + 7).await.as_ref(), Some(&blobs[i]));
            }
            let o = c.append(99, b"after reopen").unwrap();
            assert_eq!(o, end);
            c.flush().await.unwrap();
            assert_eq!(c.read(o, 99).await.as_deref(), Some(&b"after reopen"[..]));
            assert_eq!(c.read(offsets[299], 306).await.as_ref(), Some(&blobs[299]));
            c.close().await.unwrap();
        });
    }

    #[test]
    fn a_torn_tail_is_cut_at_reopen_and_its_offsets_miss() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailcache");
        let p = path.clone();
        let (a, b) = std::sync::mpsc::channel();
        run(move || async move {
            let c = MailCache::open(&p).await.unwrap();
            let first = c.append(1, &[1u8; 5000]).unwrap();
            let second = c.append(2, &[2u8; 3000]).unwrap();
            c.close().await.unwrap();
            a.send((first, second, c.len())).unwrap();
        });
        let (first, second, end) = b.recv().unwrap();
        // Tear the second blob: its last bytes never reached the disk.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(end - 10).unwrap();
        drop(f);
        run(move || async move {
            let c = MailCache::open(&path).await.unwrap();
            assert_eq!(c.len(), second, "cut at the torn frame");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), second);
            assert_eq!(c.read(first, 1).await.as_deref(), Some(&[1u8; 5000][..]));
            assert_eq!(c.read(second, 2).await, None);
            // The next blob takes the torn one's place; the old offset names message 3
            // now, which the id check tells apart.
            assert_eq!(c.append(3, b"new").unwrap(), second);
            assert_eq!(c.read(second, 2).await, None);
            assert_eq!(c.read(second, 3).await.as_deref(), Some(&b"new"[..]));
            c.close().await.unwrap();
        });
    }

    #[test]
    fn garbage_after_the_valid_frames_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailcache");
        let p = path.clone();
        let (a, b) = std::sync::mpsc::channel();
        run(move || async move {
            let c = MailCache::open(&p).await.unwrap();
            let o = c.append(5, b"kept").unwrap();
            c.close().await.unwrap();
            a.send((o, c.len())).unwrap();
        });
        let (o, end) = b.recv().unwrap();
        // Zero blocks behind it (a file extended whose data was lost), then junk.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.resize(end as usize + 8192, 0);
        bytes.extend_from_slice(&[0xff; 100]);
        std::fs::write(&path, &bytes).unwrap();
        run(move || async move {
            let c = MailCache::open(&path).await.unwrap();
            assert_eq!(c.len(), end);
            assert_eq!(c.read(o, 5).await.as_deref(), Some(&b"kept"[..]));
            c.close().await.unwrap();
        });
    }

    #[test]
    fn a_meta_round_trips_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailcache");
        run(move || async move {
            let c = MailCache::open(&path).await.unwrap();
            let meta =
                crate::mime::analyze(b"Subject: s\r\nContent-Type: text/plain\r\n\r\nbody\r\n");
            let mut blob = Vec::new();
            meta.encode(&mut blob);
            let o = c.append(42, &blob).unwrap();
            c.flush().await.unwrap();
            let got = crate::mime::Meta::decode(&c.read(o, 42).await.unwrap()).unwrap();
            assert_eq!(got, meta);
            c.close().await.unwrap();
        });
    }
}
