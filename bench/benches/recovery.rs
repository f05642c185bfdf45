//! Rebuilding the queue index from the log at start (and for `queue list`): records
//! replayed per second, for 20 000 queued 4 KiB messages, against the limit of just
//! reading the same segment files (from the page cache), and the streaming record walk
//! alone (CRC checks, no index), with the page cache kept and, as recovery does by
//! default, dropped behind the reader (then every pass reads from the disk).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::LocalExecutor;
use ringmail::queue;
use ringmail_store::message::{self, Envelope, Recipient};
use ringmail_store::segment::{self, Mode, RecoveryOptions};
use ringmail_store::{Kind, LogConfig, ShardLog, Tail};
use std::time::Duration;

const MESSAGES: u64 = 20_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("ringmail-recovery-")
        .tempdir()
        .unwrap();
    let data = dir.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, 1).unwrap();
    let shard_dir = segment::shard_dir(&data, 0);
    let body = vec![b'x'; 4096];
    LocalExecutor::default().run(async {
        let log = ShardLog::open(&shard_dir, 0, Tail::default(), LogConfig::default())
            .await
            .unwrap();
        let mut tickets = Vec::new();
        for i in 0..MESSAGES {
            let env = Envelope {
                id: queue::make_id(0, i + 1),
                from: "sender@example.test".into(),
                recipients: vec![Recipient {
                    address: format!("user{}@example.test", i % 100),
                    notify: 0,
                    orcpt: None,
                }],
                ..Envelope::default()
            };
            tickets.push(
                log.append(Kind::Message, |o| {
                    message::encode(o, &env, b"Received: x\r\n", &body)
                })
                .unwrap(),
            );
        }
        for t in tickets {
            log.durable(t).await.unwrap();
        }
        log.close().await;
    });
    let mut g = c.benchmark_group("recovery_20k_messages");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(MESSAGES));
    g.bench_function("read_segments_only", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for e in std::fs::read_dir(&shard_dir).unwrap() {
                n += std::fs::read(e.unwrap().path()).unwrap().len();
            }
            n
        })
    });
    for (name, drop_cache_behind) in [
        ("walk_records_cache_kept", false),
        ("walk_records_cache_dropped_behind", true),
    ] {
        let opts = RecoveryOptions {
            drop_cache_behind,
            ..RecoveryOptions::default()
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut n = 0u64;
                segment::recover_shard_with(&shard_dir, 0, Mode::ReadOnly, opts, |_, _| n += 1)
                    .unwrap();
                assert_eq!(n, MESSAGES);
                n
            })
        });
    }
    g.bench_function("replay_into_queue_index", |b| {
        b.iter(|| {
            let r = queue::recover(&data, 0, Mode::ReadOnly).unwrap();
            assert_eq!(r.index.len() as u64, MESSAGES);
            r.index.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
