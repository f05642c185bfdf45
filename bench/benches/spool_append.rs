//! Durable appends to a shard log: how many 4 KiB messages per second reach stable
//! storage with group commit (N concurrent writers share each fdatasync), against the
//! limit of one fdatasync per message measured in the same run on the same disk.
//!
//! Each iteration makes `writers` messages durable concurrently, as that many SMTP
//! sessions finishing at once would.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::LocalExecutor;
use ringmail_store::{Kind, LogConfig, ShardLog, Tail};
use std::time::{Duration, Instant};

const MESSAGE_BYTES: usize = 4 << 10;

fn bench(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("ringmail-bench-")
        .tempdir()
        .unwrap();
    let shard_dir = dir.path().join("shard-0");
    let ex = LocalExecutor::default();
    // The log (and its flusher task) live in this executor; each measured batch runs
    // in it too, so the flusher gets to run while the writers wait.
    let log = ex.run(async {
        ShardLog::open(&shard_dir, 0, Tail::default(), LogConfig::default())
            .await
            .unwrap()
    });
    let body = vec![b'x'; MESSAGE_BYTES];
    let mut g = c.benchmark_group("spool_append_4k");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for writers in [1usize, 8, 32, 128] {
        g.throughput(Throughput::Elements(writers as u64));
        g.bench_with_input(
            BenchmarkId::new("writers", writers),
            &writers,
            |b, &writers| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    ex.run(async {
                        for _ in 0..iters {
                            let tickets: Vec<_> = (0..writers)
                                .map(|_| {
                                    log.append(Kind::Message, |o| o.extend_from_slice(&body))
                                        .unwrap()
                                })
                                .collect();
                            for t in tickets {
                                log.durable(t).await.unwrap();
                            }
                        }
                    });
                    start.elapsed()
                })
            },
        );
    }
    g.finish();
    ex.run(log.close());
}

criterion_group!(benches, bench);
criterion_main!(benches);
