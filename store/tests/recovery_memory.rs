//! Recovery's heap use, measured by the allocator itself: a shard of 32 MiB is
//! recovered in a few MiB, not in a buffer the size of a segment. (A binary of its
//! own: the counting allocator sees every allocation of the process.)

use ringmail_store::record::{self, Kind};
use ringmail_store::segment::{self, recover_shard, Mode, SegmentHeader};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn recovering_32_mib_of_small_records_keeps_the_heap_within_a_few_mib() {
    let d = tempfile::tempdir().unwrap();
    let mut b = SegmentHeader {
        shard: 0,
        seq: 1,
        prev_valid_len: None,
    }
    .encode()
    .to_vec();
    let mut n = 0u64;
    while b.len() < 32 << 20 {
        record::encode_into(&mut b, Kind::Message, &[n as u8; 300]);
        n += 1;
    }
    std::fs::write(segment::segment_path(d.path(), 1), &b).unwrap();
    drop(b);

    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut seen = 0u64;
    let (_, report) = recover_shard(d.path(), 0, Mode::ReadOnly, |_, r| {
        assert_eq!(r.payload.len(), 300);
        seen += 1;
    })
    .unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert_eq!(seen, n);
    assert_eq!(report.records, n);
    assert!(
        peak <= 4 << 20,
        "recovering 32 MiB took {peak} bytes of heap at its peak"
    );
}
