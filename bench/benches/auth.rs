//! Password checks: what one argon2id verification costs with the parameters new
//! hashes get (`Argon2::default()`), and what a login through the `Authenticator`
//! costs on top of it (the hop to a verification thread and back to the executor),
//! or instead of it (a cache hit).

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use criterion::{criterion_group, criterion_main, Criterion};
use glommio::LocalExecutor;
use ringmail::auth::{AuthConfig, Authenticator};
use std::net::IpAddr;
use std::time::{Duration, Instant};

fn bench(c: &mut Criterion) {
    let phc = Argon2::default()
        .hash_password(b"correct horse")
        .unwrap()
        .to_string();
    let peer: IpAddr = "192.0.2.1".parse().unwrap();
    let mut g = c.benchmark_group("auth");
    g.sample_size(20).measurement_time(Duration::from_secs(5));

    g.bench_function("argon2id_verify_default_params", |b| {
        b.iter(|| {
            Argon2::default()
                .verify_password(b"correct horse", phc.as_str())
                .unwrap()
        })
    });

    let ex = LocalExecutor::default();
    let uncached = Authenticator::new(&AuthConfig {
        workers: Some(1),
        cache_ttl: Duration::ZERO,
        ..AuthConfig::default()
    })
    .unwrap();
    g.bench_function("authenticator_verify_uncached", |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let start = Instant::now();
                for _ in 0..iters {
                    uncached
                        .verify("ann", b"correct horse", Some(&phc), peer)
                        .await
                        .unwrap();
                }
                start.elapsed()
            })
        })
    });

    let cached = Authenticator::new(&AuthConfig::default()).unwrap();
    ex.run(async {
        cached
            .verify("ann", b"correct horse", Some(&phc), peer)
            .await
            .unwrap()
    });
    g.sample_size(100);
    g.bench_function("authenticator_verify_cache_hit", |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let start = Instant::now();
                for _ in 0..iters {
                    cached
                        .verify("ann", b"correct horse", Some(&phc), peer)
                        .await
                        .unwrap();
                }
                start.elapsed()
            })
        })
    });
    assert_eq!(cached.counters().verifications, 1);
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
