//! Message handles, what they resolve to, and reader pins.
//!
//! A stored message is named by its [`Handle`] for as long as it lives: the shard that
//! holds it and its id. The handle never changes; where the bytes are does (compaction
//! copies live records forward), and only the owning shard knows that, through its map
//! from handle to [`Resolved`]. A reader, on the owning executor or another one, asks
//! the owner to resolve a handle and pin the segment it names ([`Pins`]), reads the
//! bytes itself (sealed segments are immutable; the newest is read only below what was
//! synced, which every resolved record is), and lets the pin go. The owner never deletes
//! a pinned segment.

use std::cell::RefCell;
use std::collections::HashMap;

/// Names a stored message for its whole life. `id` carries the shard in its top 8 bits
/// (see `message::Envelope::id`); `shard` is kept apart so that routing a request to
/// the owner needs no bit twiddling by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle {
    pub shard: u32,
    pub id: u64,
}

impl Handle {
    /// Bits of an id that hold the shard.
    pub const SHARD_SHIFT: u32 = 56;

    /// The handle of message `id` (its shard is in the id's top byte).
    pub fn of_id(id: u64) -> Handle {
        Handle {
            shard: (id >> Self::SHARD_SHIFT) as u32,
            id,
        }
    }
}

/// Where a handle's message is now: its record in a segment of the owner's shard, and
/// the body's byte range inside that record, so a reader can send the body alone or a
/// part of it without decoding the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub handle: Handle,
    /// Segment sequence number (file `seg-NNNNNNNNNNNN.log` of the shard).
    pub seq: u64,
    /// Offset of the record in the segment file.
    pub offset: u64,
    /// Bytes of the record, framing included.
    pub len: u32,
    /// Where the body starts, counted from the start of the record.
    pub body_offset: u32,
    pub body_len: u32,
}

impl Resolved {
    /// File offset of the body's first byte.
    pub fn body_start(&self) -> u64 {
        self.offset + self.body_offset as u64
    }
}

/// Reader pins of one shard's segments, kept by the owning executor (never shared
/// between threads: a reader on another executor pins and unpins by message). While a
/// segment has a pin, compaction does not delete it.
#[derive(Debug, Default)]
pub struct Pins {
    counts: RefCell<HashMap<u64, u32>>,
}

impl Pins {
    pub fn pin(&self, seq: u64) {
        *self.counts.borrow_mut().entry(seq).or_default() += 1;
    }

    /// Drops one pin of `seq`. Unpinning what is not pinned is a bug in the caller:
    /// it panics in debug builds and is ignored in release ones.
    pub fn unpin(&self, seq: u64) {
        let mut counts = self.counts.borrow_mut();
        match counts.get_mut(&seq) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                counts.remove(&seq);
            }
            None => debug_assert!(false, "unpin of segment {seq} that is not pinned"),
        }
    }

    pub fn is_pinned(&self, seq: u64) -> bool {
        self.counts.borrow().contains_key(&seq)
    }

    /// Segments pinned now (for tests and statistics).
    pub fn pinned(&self) -> usize {
        self.counts.borrow().len()
    }
}

/// A pin that lets go when dropped, for readers on the owning executor.
pub struct PinGuard<'a> {
    pins: &'a Pins,
    seq: u64,
}

impl<'a> PinGuard<'a> {
    pub fn new(pins: &'a Pins, seq: u64) -> PinGuard<'a> {
        pins.pin(seq);
        PinGuard { pins, seq }
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        self.pins.unpin(self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_count_per_segment() {
        let p = Pins::default();
        p.pin(3);
        {
            let _g = PinGuard::new(&p, 3);
            assert!(p.is_pinned(3));
        }
        assert!(p.is_pinned(3));
        p.unpin(3);
        assert!(!p.is_pinned(3));
        assert_eq!(p.pinned(), 0);
    }

    #[test]
    fn a_handle_names_its_shard() {
        let h = Handle::of_id((5u64 << 56) | 42);
        assert_eq!(h.shard, 5);
        assert_eq!(h.id & ((1 << 56) - 1), 42);
    }
}
