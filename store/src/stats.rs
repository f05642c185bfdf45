//! What the write path did on this thread (each executor is one thread): how many
//! body bytes were copied in user space and how many were CRC'd, so a test can assert
//! "one copy, one CRC pass" and the benchmark can report copies per message; and what
//! the store wrote to disk, by cause, so write amplification can be split into the
//! store's own (records, copies forward, snapshots) and the log's constant factors
//! (rewritten tail blocks, block padding, zeros ahead, segment headers). Counters are
//! per thread, not shared atomics, so counting costs the
//! hot path no cache-line traffic between cores; the engine logs each executor's
//! totals when it stops (the `executor stopped` line).

use std::cell::Cell;

/// Totals since the thread started (or since [`reset`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Message bodies appended to a log.
    pub bodies: u64,
    /// Their bytes.
    pub body_bytes: u64,
    /// Body bytes copied in user space, by the SMTP session (see
    /// [`add_session_copy`]) and by the log's write path together. One copy per
    /// body: equal to `body_bytes`.
    pub body_bytes_copied: u64,
    /// Body bytes run through CRC32C on the way in. One pass: equal to `body_bytes`.
    pub body_bytes_crc: u64,
    /// Record bytes copied again because a batch had to move (its segment rolled, or
    /// the batch before it failed): rare, and counted apart from the above.
    pub relocated_bytes: u64,
    /// Bytes of a partial last block copied in front of the next write (at most one
    /// block per batch buffer; they may belong to a body).
    pub tail_bytes_copied: u64,
    /// Record bytes in the batches the log wrote (compaction's copies included),
    /// failed writes included: what the store asked to make durable.
    pub log_record_bytes: u64,
    /// Bytes of the partial last block written again in front of a batch buffer (the
    /// `lead` of each buffer written): already durable, written again because direct
    /// writes cover whole blocks.
    pub log_tail_bytes: u64,
    /// Zeros after a buffer's last record up to its block boundary (overwritten by the
    /// next batch, which then counts them again as tail bytes).
    pub log_pad_bytes: u64,
    /// Zeros written ahead of the writer (`log-zero-ahead`), whole segments' worth
    /// while it is on: every byte of a segment is then written twice.
    pub zero_bytes: u64,
    /// The first block of each new segment (header and zeros).
    pub segment_header_bytes: u64,
    /// Record bytes compaction copied forward (a part of `log_record_bytes`).
    pub copied_bytes: u64,
    /// Bytes of snapshot files written.
    pub snapshot_bytes: u64,
    /// Group-commit batches written (one write and one fdatasync each), failed ones
    /// included.
    pub batches: u64,
    /// How long each batch's fdatasync took.
    pub sync_latency: Histogram,
}

/// Upper bounds of the latency histograms' buckets, in microseconds (the `+Inf`
/// bucket is the count): from a page-cache flush to a stalled disk.
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    10_000_000, 60_000_000,
];

/// A latency histogram with fixed buckets ([`LATENCY_BOUNDS_US`]), a plain value so a
/// thread can keep its own and a reader can add them up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations at or under each bound (not cumulative).
    pub buckets: [u64; LATENCY_BOUNDS_US.len()],
    pub count: u64,
    pub sum_us: u64,
}

impl Histogram {
    pub const ZERO: Histogram = Histogram {
        buckets: [0; LATENCY_BOUNDS_US.len()],
        count: 0,
        sum_us: 0,
    };

    pub fn observe(&mut self, d: std::time::Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        if let Some(i) = LATENCY_BOUNDS_US.iter().position(|b| us <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn plus(&self, o: &Histogram) -> Histogram {
        let mut h = *self;
        for (a, b) in h.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        h.count += o.count;
        h.sum_us = h.sum_us.saturating_add(o.sum_us);
        h
    }
}

impl Counters {
    /// All zero (a `const` for statics).
    pub const ZERO: Counters = Counters {
        bodies: 0,
        body_bytes: 0,
        body_bytes_copied: 0,
        body_bytes_crc: 0,
        relocated_bytes: 0,
        tail_bytes_copied: 0,
        log_record_bytes: 0,
        log_tail_bytes: 0,
        log_pad_bytes: 0,
        zero_bytes: 0,
        segment_header_bytes: 0,
        copied_bytes: 0,
        snapshot_bytes: 0,
        batches: 0,
        sync_latency: Histogram::ZERO,
    };

    /// What the store itself chose to write: records (copies forward included) and
    /// snapshots. Over the bytes ingested, the store's write amplification.
    pub fn store_bytes(&self) -> u64 {
        self.log_record_bytes + self.snapshot_bytes
    }

    /// Everything the store submitted to the disk: the above plus the log's constant
    /// factors (tail blocks written again, block padding, zeros ahead, segment
    /// headers). Should come close to the process's block-layer write count.
    pub fn written_bytes(&self) -> u64 {
        self.store_bytes()
            + self.log_tail_bytes
            + self.log_pad_bytes
            + self.zero_bytes
            + self.segment_header_bytes
    }

    /// Whole-body copies these counters come to: bytes copied (relocations included)
    /// over the bytes of one body on average, times the bodies. One per body when the
    /// write path does what it should.
    pub fn body_copies(&self) -> u64 {
        let copied = (self.body_bytes_copied + self.relocated_bytes) as u128;
        (copied * self.bodies as u128)
            .checked_div(self.body_bytes as u128)
            .unwrap_or(0) as u64
    }

    /// The sum of two threads' counters.
    pub fn plus(&self, o: &Counters) -> Counters {
        Counters {
            bodies: self.bodies + o.bodies,
            body_bytes: self.body_bytes + o.body_bytes,
            body_bytes_copied: self.body_bytes_copied + o.body_bytes_copied,
            body_bytes_crc: self.body_bytes_crc + o.body_bytes_crc,
            relocated_bytes: self.relocated_bytes + o.relocated_bytes,
            tail_bytes_copied: self.tail_bytes_copied + o.tail_bytes_copied,
            log_record_bytes: self.log_record_bytes + o.log_record_bytes,
            log_tail_bytes: self.log_tail_bytes + o.log_tail_bytes,
            log_pad_bytes: self.log_pad_bytes + o.log_pad_bytes,
            zero_bytes: self.zero_bytes + o.zero_bytes,
            segment_header_bytes: self.segment_header_bytes + o.segment_header_bytes,
            copied_bytes: self.copied_bytes + o.copied_bytes,
            snapshot_bytes: self.snapshot_bytes + o.snapshot_bytes,
            batches: self.batches + o.batches,
            sync_latency: self.sync_latency.plus(&o.sync_latency),
        }
    }

    /// Body copies per body byte appended (1.0: exactly one copy).
    pub fn copies_per_body_byte(&self) -> f64 {
        self.body_bytes_copied as f64 / self.body_bytes.max(1) as f64
    }
}

thread_local! {
    static COUNTERS: Cell<Counters> = Cell::new(Counters::default());
}

/// This thread's counters.
pub fn get() -> Counters {
    COUNTERS.with(|c| c.get())
}

/// Sets this thread's counters back to zero.
pub fn reset() {
    COUNTERS.with(|c| c.set(Counters::default()));
}

pub(crate) fn add(f: impl FnOnce(&mut Counters)) {
    COUNTERS.with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    });
}

/// CRC32C of a message body, counted in `body_bytes_crc`: every CRC of a body, on the
/// write path or beside it, goes through here (or through the log's copy), so a test
/// that expects one pass sees a second one.
pub fn body_crc32c(body: &[u8]) -> u32 {
    add(|c| c.body_bytes_crc += body.len() as u64);
    crc32c::crc32c(body)
}

/// Body bytes a caller copied before handing the body to the log (the SMTP session
/// gathering tiny BDAT chunks, say): they count against the one copy too.
pub fn add_session_copy(bytes: usize) {
    add(|c| c.body_bytes_copied += bytes as u64);
}
