//! The record CRC from the header's and the body's (`ringmail_store::crc::combine`)
//! against the crc32c crate's combine, for a 4 KiB and a 100 KiB body.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c combine");
    for len in [4096u64, 102_400] {
        g.bench_function(format!("store {len} B"), |b| {
            b.iter(|| {
                ringmail_store::crc::combine(
                    black_box(0x1234_5678),
                    black_box(0x9abc_def0),
                    black_box(len),
                )
            })
        });
        g.bench_function(format!("crate {len} B"), |b| {
            b.iter(|| {
                crc32c::crc32c_combine(
                    black_box(0x1234_5678),
                    black_box(0x9abc_def0),
                    black_box(len as usize),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
