//! The mailbox index (`ringmail_store::mailbox`): appending into a 100k-entry mailbox
//! (begin, encode the record, commit), a flag change, a UID range lookup; and, before
//! the timings, the memory it takes per stored message for 1M entries over 10k users
//! (measured by a counting allocator: this binary's global allocator).

use criterion::{black_box, criterion_group, Criterion};
use ringmail_store::mailbox::{FlagOp, MailIndex, NewEntry, Quota, INBOX, INBOX_ID, SEEN};
use ringmail_store::Index;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn entry(message: u64) -> NewEntry {
    NewEntry {
        message,
        size: 4000,
        internal_date: 1_700_000_000,
        flags: 0,
        keywords: Vec::new(),
        cache: message * 512,
    }
}

/// Appends through the whole change path, the record encoded as the engine would.
fn append(ix: &mut MailIndex, user: u64, message: u64, rec: &mut Vec<u8>) {
    let c = ix
        .begin_append(user, INBOX, entry(message), Quota::default())
        .unwrap();
    rec.clear();
    c.encode(rec);
    let _ = ix.commit(c);
}

fn mailbox_of(n: u64) -> MailIndex {
    let mut ix = MailIndex::default();
    let mut rec = Vec::new();
    for m in 0..n {
        append(&mut ix, 1, m, &mut rec);
    }
    ix
}

/// Bytes of index per stored message: 1M entries over 10k users with the default
/// mailboxes, built by commits, then as a snapshot reloads it.
fn memory() {
    const USERS: u64 = 10_000;
    const PER_USER: u64 = 100;
    let base = LIVE.load(Ordering::Relaxed);
    let mut ix = MailIndex::default();
    let mut rec = Vec::with_capacity(256);
    for u in 0..USERS {
        let c = ix.begin_ensure_defaults(u).unwrap().unwrap();
        let _ = ix.commit(c);
    }
    for m in 0..USERS * PER_USER {
        append(&mut ix, m % USERS, m, &mut rec);
    }
    drop(rec);
    let n = (USERS * PER_USER) as f64;
    let built = LIVE.load(Ordering::Relaxed) - base;
    let mut items = Vec::new();
    let mut cursor = None;
    loop {
        cursor = ix.snapshot_chunk(cursor, &mut |b| {
            items.push(b.to_vec());
            true
        });
        if cursor.is_none() {
            break;
        }
    }
    drop(ix);
    let base = LIVE.load(Ordering::Relaxed);
    let mut loaded = MailIndex::default();
    for i in &items {
        loaded.load(i).unwrap();
    }
    let reloaded = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "mailbox index memory: 1M entries over 10k users: {:.1} B per message as built by \
         commits, {:.1} B after a snapshot reload ({} MiB, {} MiB)",
        built as f64 / n,
        reloaded as f64 / n,
        built >> 20,
        reloaded >> 20
    );
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mailbox_index");
    let mut ix = mailbox_of(100_000);
    // The mailbox grows past 100k as the append samples run (by a few million).
    let mut next = 100_000u64;
    let mut rec = Vec::new();
    g.bench_function("append_commit_100k", |b| {
        b.iter(|| {
            append(&mut ix, 1, next, &mut rec);
            next += 1;
        })
    });
    let mut uid = 1u32;
    g.bench_function("set_flags_commit_100k", |b| {
        b.iter(|| {
            uid = (uid + 7919) % 100_000 + 1;
            let c = ix
                .begin_set_flags(1, INBOX_ID, &[uid], FlagOp::Add, SEEN, &[], None)
                .unwrap();
            rec.clear();
            c.encode(&mut rec);
            let _ = ix.commit(c);
            // Clear it again so the next store changes something.
            let c = ix
                .begin_set_flags(1, INBOX_ID, &[uid], FlagOp::Remove, SEEN, &[], None)
                .unwrap();
            let _ = ix.commit(c);
        })
    });
    let mut lo = 1u32;
    g.bench_function("uid_range_100_of_100k", |b| {
        b.iter(|| {
            lo = (lo + 7919) % 99_000 + 1;
            let mb = ix.mailbox_by_id(1, INBOX_ID).unwrap();
            black_box(mb.uid_range(lo..=lo + 99).len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
