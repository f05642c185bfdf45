//! Message text for delivery: kept in memory from ingestion while it is fresh,
//! otherwise read back from its segment.

use super::spool::Spool;
use ringmail_store::message::{self, Envelope};
use ringmail_store::segment;
use ringmail_store::{LogBytes, PinGuard, Resolved};
use std::io;
use std::rc::Rc;

/// A queued message as delivery sends it: the envelope and the text.
#[derive(Clone)]
pub struct Loaded {
    pub env: Envelope,
    pub message: MessageText,
}

/// The text sent on: the trace prefix, then the body as the client sent it (shared by
/// every attempt that needs it at the same time).
#[derive(Clone, Debug)]
pub struct MessageText {
    pub prefix: Vec<u8>,
    pub body: BodyBytes,
}

/// A body's bytes, shared.
#[derive(Clone)]
pub enum BodyBytes {
    /// Read back from the log, or made here.
    Heap(Rc<Vec<u8>>),
    /// A fresh message: the very buffer its batch was written to the disk from (the
    /// one copy ingestion made), so the first delivery needs neither a read nor a
    /// copy of its own.
    Log(LogBytes),
}

impl std::ops::Deref for BodyBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BodyBytes::Heap(v) => v,
            BodyBytes::Log(b) => b,
        }
    }
}

impl AsRef<[u8]> for BodyBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for BodyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyBytes::Heap(v) => write!(f, "Heap({} bytes)", v.len()),
            BodyBytes::Log(b) => write!(f, "{b:?}"),
        }
    }
}

impl From<Vec<u8>> for BodyBytes {
    fn from(v: Vec<u8>) -> BodyBytes {
        BodyBytes::Heap(Rc::new(v))
    }
}

impl From<Rc<Vec<u8>>> for BodyBytes {
    fn from(v: Rc<Vec<u8>>) -> BodyBytes {
        BodyBytes::Heap(v)
    }
}

impl MessageText {
    pub fn len(&self) -> usize {
        self.prefix.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prefix and body in one buffer (bounces quote it).
    pub fn to_vec(&self) -> Vec<u8> {
        [&self.prefix[..], &self.body[..]].concat()
    }
}

/// Checks and frames the record of message `id` read back from its segment.
pub(super) fn decode_record(
    id: u64,
    bytes: &[u8],
) -> io::Result<ringmail_store::record::RecordRef<'_>> {
    ringmail_store::record::decode(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record of {id:016X}: {e:?}"),
        )
    })
}

/// Memory a shard's cache of fresh messages may hold (see `Spool::cached_bytes`);
/// past it, delivery reads them from the log.
pub(super) const CACHE_BYTES_MAX: usize = 128 << 20;

impl Spool {
    /// Drops the memory copy of a message (delivery then reads it from the log).
    pub fn uncache(&self, id: u64) {
        let Some(l) = self.cache.borrow_mut().remove(&id) else {
            return;
        };
        let mut freed = l.message.prefix.len();
        if let BodyBytes::Log(b) = &l.message.body {
            let mut buffers = self.cached_buffers.borrow_mut();
            let id = b.buffer_id();
            let e = buffers
                .get_mut(&id)
                .expect("a cached body's buffer is counted");
            e.0 -= 1;
            if e.0 == 0 {
                freed += e.1;
                buffers.remove(&id);
            }
        }
        self.cached_bytes.set(self.cached_bytes.get() - freed);
    }

    /// Sets the cache's budget (tests use a small one).
    #[cfg(test)]
    pub(crate) fn set_cache_bytes_max(&self, bytes: usize) {
        self.cache_bytes_max.set(bytes);
    }

    /// Memory the cache holds, counted from its entries: every distinct log buffer
    /// a cached body is in, at its allocated size, and the prefixes.
    #[cfg(test)]
    pub(crate) fn cache_held_bytes(&self) -> usize {
        let mut buffers = std::collections::HashMap::new();
        let mut prefixes = 0;
        for l in self.cache.borrow().values() {
            prefixes += l.message.prefix.len();
            match &l.message.body {
                BodyBytes::Log(b) => {
                    buffers.insert(b.buffer_id(), b.buffer_bytes());
                }
                BodyBytes::Heap(v) => prefixes += v.capacity(),
            }
        }
        prefixes + buffers.values().sum::<usize>()
    }
    /// The raw record `r` names; its segment is pinned while it is read, so
    /// compaction cannot delete it underneath.
    pub(super) async fn read_record(&self, r: Resolved) -> io::Result<glommio::io::ReadResult> {
        let _pin = PinGuard::new(self.store.pins(), r.seq);
        let path = segment::segment_path(self.store.dir(), r.seq);
        let file = glommio::io::DmaFile::open(path).await?;
        let bytes = file.read_at(r.offset, r.len as usize).await;
        let _ = file.close().await;
        Ok(bytes?)
    }

    /// A queued message as delivery sends it: from memory while it is fresh,
    /// otherwise read back from its segment.
    pub async fn read_message(&self, id: u64) -> io::Result<Loaded> {
        if let Some(l) = self.cache.borrow().get(&id) {
            return Ok(l.clone());
        }
        let r = self
            .store
            .resolve(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such queued message"))?;
        let bytes = self.read_record(r).await?;
        let rec = decode_record(id, &bytes)?;
        let d = message::decode(rec.payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Loaded {
            env: d.envelope,
            message: MessageText {
                prefix: d.prefix.to_vec(),
                body: d.body.to_vec().into(),
            },
        })
    }
}
