//! `ringmail-homecall [--calls N]`: what a session pays to reach a user's home shard
//! on another core (`MailService::on_executor`, the path every POP3/IMAP command takes
//! there) against a call on its own core, with the home core idle and with it busy
//! (a task working in 50 ms stretches that offers to yield every 10 µs, as glommio
//! tasks do: a wake from another thread reaches it late unless the woken task is in
//! a latency-sensitive queue). Prints JSON lines.
//! The figures decide ARCHITECTURE.md's "Sessions and the home shard".

use clap::Parser;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use ringmail::mailbox::{service, MailService};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Round trips per case.
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn main() {
    let args = Args::parse();
    let calls = args.calls;
    let mesh = service::mesh(2);
    let busy = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r2, b2, d2) = (results.clone(), busy.clone(), done.clone());
    LocalExecutorPoolBuilder::new(PoolPlacement::MaxSpread(2, None))
        .on_all_shards(move || {
            let (mesh, results, busy, done) = (mesh.clone(), r2.clone(), b2.clone(), d2.clone());
            let me = next.fetch_add(1, Ordering::SeqCst);
            async move {
                let svc = MailService::join(&mesh, me, 2);
                if me == 1 {
                    // The home core: busy in 50 ms stretches while asked to be.
                    while !done.load(Ordering::SeqCst) {
                        if busy.load(Ordering::SeqCst) {
                            // Busy as a glommio task is: working in 50 ms stretches,
                            // offering to yield every few microseconds.
                            let t = Instant::now();
                            while t.elapsed() < Duration::from_millis(50) {
                                let slice = Instant::now();
                                while slice.elapsed() < Duration::from_micros(10) {
                                    std::hint::spin_loop();
                                }
                                glommio::yield_if_needed().await;
                            }
                        }
                        glommio::yield_if_needed().await;
                        glommio::timer::sleep(Duration::from_micros(100)).await;
                    }
                    return;
                }
                let mut out = Vec::new();
                for (case, peer, spin) in [
                    ("local", 0, false),
                    ("remote, idle home", 1, false),
                    ("remote, busy home", 1, true),
                ] {
                    busy.store(spin, Ordering::SeqCst);
                    let n = if spin { calls / 20 } else { calls };
                    let mut us = Vec::with_capacity(n);
                    for i in 0..n {
                        let t = Instant::now();
                        let r = svc
                            .on_executor(peer, move |_| Box::pin(async move { i + 1 }))
                            .await
                            .unwrap();
                        us.push(t.elapsed().as_secs_f64() * 1e6);
                        assert_eq!(r, i + 1);
                    }
                    let mean = us.iter().sum::<f64>() / us.len() as f64;
                    out.push(serde_json::json!({
                        "case": case,
                        "calls": n,
                        "mean_us": (mean * 100.0).round() / 100.0,
                        "p50_us": (quantile(&mut us, 0.5) * 100.0).round() / 100.0,
                        "p99_us": (quantile(&mut us, 0.99) * 100.0).round() / 100.0,
                        "max_us": (quantile(&mut us, 1.0) * 100.0).round() / 100.0,
                    }));
                }
                done.store(true, Ordering::SeqCst);
                *results.lock().unwrap() = out;
            }
        })
        .expect("start two executors")
        .join_all();
    for r in results.lock().unwrap().iter() {
        println!("{r}");
    }
}
