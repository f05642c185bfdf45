use super::*;
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, Version};
use futures_lite::future::poll_once;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;

/// A real argon2id hash, with parameters small enough for unoptimised test builds.
fn hash(password: &[u8]) -> String {
    let params = Params::new(1024, 1, 1, None).unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password)
        .unwrap()
        .to_string()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn on_executor<T>(f: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(f)
}

/// A clock the test moves.
#[derive(Clone)]
struct TestClock {
    base: Instant,
    offset_ms: Arc<AtomicU64>,
}

impl TestClock {
    fn new() -> TestClock {
        TestClock {
            base: Instant::now(),
            offset_ms: Arc::default(),
        }
    }
    fn advance(&self, d: Duration) {
        self.offset_ms
            .fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
    fn clock(&self) -> Clock {
        let c = self.clone();
        Arc::new(move || c.base + Duration::from_millis(c.offset_ms.load(Ordering::SeqCst)))
    }
}

fn quick() -> AuthConfig {
    AuthConfig {
        workers: Some(1),
        failure_delay: Duration::ZERO,
        ..AuthConfig::default()
    }
}

fn start(cfg: &AuthConfig) -> Arc<Authenticator> {
    Authenticator::new(cfg).unwrap()
}

/// Waits (bounded) until `done` holds, yielding to the executor meanwhile.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

#[test]
fn verify_succeeds_and_fails() {
    let auth = start(&quick());
    let phc = hash(b"right");
    on_executor(async {
        let peer = ip("192.0.2.1");
        assert_eq!(auth.verify("ann", b"right", Some(&phc), peer).await, Ok(()));
        assert_eq!(
            auth.verify("ann", b"wrong", Some(&phc), peer).await,
            Err(AuthError::Failed)
        );
        // No such user: the dummy hash is verified all the same, and it fails even
        // for the dummy's own (unknown) password or an empty one.
        assert_eq!(
            auth.verify("nobody", b"", None, peer).await,
            Err(AuthError::Failed)
        );
        // A stored hash that is not a PHC string fails; it is not a panic.
        assert_eq!(
            auth.verify("bob", b"right", Some("not a hash"), peer).await,
            Err(AuthError::Failed)
        );
    });
    let c = auth.counters();
    assert_eq!(
        (c.verifications, c.failures, c.in_flight),
        (4, 3, 0),
        "{c:?}"
    );
}

/// The unknown user's check costs what a user's with a new hash costs.
#[test]
fn dummy_hash_has_the_default_parameters() {
    let h = PasswordHash::new(DUMMY_PHC).unwrap();
    assert_eq!(h.algorithm, argon2::ARGON2ID_IDENT);
    let p = Params::try_from(&h).unwrap();
    let d = Params::default();
    assert_eq!(
        (p.m_cost(), p.t_cost(), p.p_cost()),
        (d.m_cost(), d.t_cost(), d.p_cost())
    );
}

/// The check with kept memory agrees with the crate's own verifier, whatever the
/// variant and parameters, also when one thread checks hashes of different sizes in
/// turn (the kept memory grows and shrinks).
#[test]
fn argon2_check_agrees_with_the_crate_across_variants_and_sizes() {
    use argon2::PasswordVerifier;
    let cases = [
        (Algorithm::Argon2id, Version::V0x13, 1024, 1, 1),
        (Algorithm::Argon2id, Version::V0x13, 64, 3, 1),
        (Algorithm::Argon2i, Version::V0x13, 256, 2, 2),
        (Algorithm::Argon2d, Version::V0x10, 128, 1, 1),
        (Algorithm::Argon2id, Version::V0x13, 2048, 1, 4),
    ];
    for (alg, ver, m, t, p) in cases {
        let params = Params::new(m, t, p, None).unwrap();
        let phc = Argon2::new(alg, ver, params)
            .hash_password(b"right")
            .unwrap()
            .to_string();
        for pw in [&b"right"[..], b"wrong", b""] {
            let crate_says = Argon2::default()
                .verify_password(pw, &PasswordHash::new(&phc).unwrap())
                .is_ok();
            assert_eq!(argon2_check(pw, &phc), crate_says, "{phc} {pw:?}");
        }
        assert!(argon2_check(b"right", &phc), "{phc}");
    }
    assert!(
        argon2_check(b"password", DUMMY_PHC)
            == Argon2::default()
                .verify_password(b"password", &PasswordHash::new(DUMMY_PHC).unwrap())
                .is_ok()
    );
    for bad in [
        "",
        "plain",
        "$argon2id$v=19$m=19456,t=2,p=1$short",
        "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$aGFzaA",
    ] {
        assert!(!argon2_check(b"x", bad), "{bad}");
    }
}

#[test]
fn verification_runs_on_a_pool_thread() {
    type Seen = Vec<(std::thread::ThreadId, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let check: Check = {
        let seen = seen.clone();
        Arc::new(move |pw, phc| {
            let t = std::thread::current();
            lock(&seen).push((t.id(), t.name().map(str::to_string)));
            argon2_check(pw, phc)
        })
    };
    let cfg = AuthConfig {
        workers: Some(2),
        ..quick()
    };
    let auth = Authenticator::with_parts(&cfg, check, Arc::new(Instant::now)).unwrap();
    let phc = hash(b"pw");
    let executor_thread = on_executor(async {
        for _ in 0..4 {
            auth.verify("ann", b"pw", Some(&phc), ip("192.0.2.1"))
                .await
                .unwrap();
            auth.verify("ann", b"no", Some(&phc), ip("192.0.2.1"))
                .await
                .unwrap_err();
        }
        std::thread::current().id()
    });
    let seen = lock(&seen);
    // One success (then cache hits) and four failures.
    assert_eq!(seen.len(), 5);
    for (id, name) in seen.iter() {
        assert_ne!(*id, executor_thread);
        assert!(
            name.as_deref()
                .is_some_and(|n| n.starts_with("ringmail-auth-")),
            "{name:?}"
        );
    }
}

/// One worker, a queue of N: N+1 checks are taken (one running, N waiting), the
/// N+2-th is Busy at once. The worker is held on a gate so that nothing finishes
/// while the requests go in.
#[test]
fn pool_bound_answers_busy() {
    const N: usize = 3;
    let (open, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let check: Check = Arc::new(move |pw, phc| {
        lock(&gate).recv().unwrap();
        argon2_check(pw, phc)
    });
    let cfg = AuthConfig {
        queue: N,
        ..quick()
    };
    let auth = Authenticator::with_parts(&cfg, check, Arc::new(Instant::now)).unwrap();
    let phc = hash(b"pw");
    on_executor(async {
        // Distinct users, so that no check could be a cache hit.
        let users: Vec<String> = (0..N + 2).map(|i| format!("user{i}")).collect();
        let mut checks: Vec<_> = users
            .iter()
            .map(|u| Box::pin(auth.verify(u, b"pw", Some(&phc), ip("192.0.2.1"))))
            .collect();
        for c in &mut checks[..N + 1] {
            assert!(poll_once(c).await.is_none());
        }
        assert_eq!(auth.counters().in_flight, N as u64 + 1);
        let last = checks.pop().unwrap();
        assert_eq!(last.await, Err(AuthError::Busy));
        assert_eq!(auth.counters().busy, 1);
        // A session that goes away while its check waits: the worker skips it.
        drop(checks.pop().unwrap());
        for _ in 0..N {
            open.send(()).unwrap();
        }
        for c in checks {
            assert_eq!(c.await, Ok(()));
        }
        until("the abandoned check to leave the queue", || {
            auth.counters().in_flight == 0
        })
        .await;
    });
    let c = auth.counters();
    assert_eq!(
        (c.verifications, c.busy, c.in_flight),
        (N as u64, 1, 0),
        "{c:?}"
    );
}

#[test]
fn cache_hit_skips_argon2_and_a_new_hash_misses() {
    let auth = start(&quick());
    let old = hash(b"pw");
    on_executor(async {
        let peer = ip("192.0.2.1");
        auth.verify("ann", b"pw", Some(&old), peer).await.unwrap();
        assert_eq!(auth.counters().verifications, 1);
        auth.verify("ann", b"pw", Some(&old), peer).await.unwrap();
        let c = auth.counters();
        assert_eq!((c.verifications, c.cache_hits), (1, 1));
        // Another user with the same hash and password is not that entry.
        auth.verify("bob", b"pw", Some(&old), peer).await.unwrap();
        assert_eq!(auth.counters().verifications, 2);
        // The password changed (a new hash, here of the same password): a miss.
        let new = hash(b"pw");
        auth.verify("ann", b"pw", Some(&new), peer).await.unwrap();
        assert_eq!(auth.counters().verifications, 3);
        // A wrong password is never served from the cache, nor cached.
        for _ in 0..2 {
            assert_eq!(
                auth.verify("ann", b"other", Some(&new), peer).await,
                Err(AuthError::Failed)
            );
        }
        let c = auth.counters();
        assert_eq!((c.verifications, c.cache_hits), (5, 1));
    });
    assert_eq!(auth.counters().cache_entries, 3);
}

#[test]
fn cache_entries_expire_after_the_ttl() {
    let clock = TestClock::new();
    let cfg = AuthConfig {
        cache_ttl: Duration::from_secs(3600),
        ..quick()
    };
    let auth = Authenticator::with_parts(&cfg, Arc::new(argon2_check), clock.clock()).unwrap();
    let phc = hash(b"pw");
    on_executor(async {
        let peer = ip("192.0.2.1");
        auth.verify("ann", b"pw", Some(&phc), peer).await.unwrap();
        clock.advance(Duration::from_secs(3599));
        auth.verify("ann", b"pw", Some(&phc), peer).await.unwrap();
        assert_eq!(auth.counters().verifications, 1);
        clock.advance(Duration::from_secs(1));
        auth.verify("ann", b"pw", Some(&phc), peer).await.unwrap();
        assert_eq!(auth.counters().verifications, 2);
        // The new entry has a TTL of its own.
        clock.advance(Duration::from_secs(3599));
        auth.verify("ann", b"pw", Some(&phc), peer).await.unwrap();
        let c = auth.counters();
        assert_eq!((c.verifications, c.cache_hits), (2, 2));
    });
    assert_eq!(auth.counters().cache_entries, 1);
}

#[test]
fn cache_off_and_bounded() {
    let off = start(&AuthConfig {
        cache_ttl: Duration::ZERO,
        ..quick()
    });
    let small = start(&AuthConfig {
        cache_entries_max: 2,
        ..quick()
    });
    let phc = hash(b"pw");
    on_executor(async {
        let peer = ip("192.0.2.1");
        for _ in 0..2 {
            off.verify("ann", b"pw", Some(&phc), peer).await.unwrap();
        }
        for u in ["a", "b", "c"] {
            small.verify(u, b"pw", Some(&phc), peer).await.unwrap();
        }
        // The oldest entry went to make room.
        small.verify("a", b"pw", Some(&phc), peer).await.unwrap();
        small.verify("c", b"pw", Some(&phc), peer).await.unwrap();
    });
    assert_eq!(
        (off.counters().verifications, off.counters().cache_entries),
        (2, 0)
    );
    let c = small.counters();
    assert_eq!((c.verifications, c.cache_hits), (4, 1), "{c:?}");
    assert_eq!(small.counters().cache_entries, 2);
}

/// A failure is answered after the delay, on an executor timer: a success that
/// starts with it finishes first, which a sleep of the executor thread would prevent.
#[test]
fn failure_is_answered_after_the_delay_without_blocking_the_executor() {
    let delay = Duration::from_secs(1);
    let auth = start(&AuthConfig {
        failure_delay: delay,
        ..quick()
    });
    let phc = hash(b"pw");
    let order = Rc::new(RefCell::new(Vec::new()));
    on_executor(async {
        let peer = ip("192.0.2.1");
        let started = Instant::now();
        let bad = async {
            let r = auth.verify("ann", b"bad", Some(&phc), peer).await;
            order.borrow_mut().push(("bad", started.elapsed()));
            r
        };
        let good = async {
            let r = auth.verify("bob", b"pw", Some(&phc), peer).await;
            order.borrow_mut().push(("good", started.elapsed()));
            r
        };
        let (bad, good) = futures_lite::future::zip(bad, good).await;
        assert_eq!((bad, good), (Err(AuthError::Failed), Ok(())));
    });
    let order = order.borrow();
    assert_eq!(order[0].0, "good", "{order:?}");
    assert!(order[0].1 < delay, "{order:?}");
    assert!(order[1].1 >= delay, "{order:?}");
}

#[test]
fn failures_are_limited_per_source_and_per_64() {
    let clock = TestClock::new();
    let cfg = AuthConfig {
        failures_per_minute: 3,
        ..quick()
    };
    let auth = Authenticator::with_parts(&cfg, Arc::new(argon2_check), clock.clock()).unwrap();
    let phc = hash(b"pw");
    on_executor(async {
        let check = |pw: &'static [u8], peer: &str| {
            let (auth, phc, peer) = (auth.clone(), phc.clone(), ip(peer));
            async move { auth.verify("ann", pw, Some(&phc), peer).await }
        };
        // Cached from this source before it starts guessing.
        check(b"pw", "192.0.2.1").await.unwrap();
        for _ in 0..3 {
            assert_eq!(check(b"x", "192.0.2.1").await, Err(AuthError::Failed));
        }
        let before = auth.counters();
        // Over the limit: refused without a verification, the right password (and
        // its cache entry) included; the same address written as IPv4-mapped too.
        assert_eq!(check(b"x", "192.0.2.1").await, Err(AuthError::RateLimited));
        assert_eq!(check(b"pw", "192.0.2.1").await, Err(AuthError::RateLimited));
        assert_eq!(
            check(b"pw", "::ffff:192.0.2.1").await,
            Err(AuthError::RateLimited)
        );
        let after = auth.counters();
        assert_eq!(after.verifications, before.verifications);
        assert_eq!((after.rate_limited, after.cache_hits), (3, 0));
        // Other sources are not affected.
        check(b"pw", "192.0.2.2").await.unwrap();

        // IPv6 counts per /64.
        for a in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
            assert_eq!(check(b"x", a).await, Err(AuthError::Failed));
        }
        assert_eq!(
            check(b"pw", "2001:db8:1:2:abcd::9").await,
            Err(AuthError::RateLimited)
        );
        check(b"pw", "2001:db8:1:3::1").await.unwrap();

        // The bucket drains at the limit's rate: one more failure after a third of a
        // minute, all of them after a minute.
        clock.advance(Duration::from_secs(20));
        assert_eq!(check(b"x", "192.0.2.1").await, Err(AuthError::Failed));
        assert_eq!(check(b"pw", "192.0.2.1").await, Err(AuthError::RateLimited));
        clock.advance(Duration::from_secs(60));
        check(b"pw", "192.0.2.1").await.unwrap();
        check(b"pw", "2001:db8:1:2::1").await.unwrap();
        assert_eq!(auth.counters().tracked_sources, 2);
        // A minute on, a failure elsewhere sweeps the drained sources away.
        clock.advance(Duration::from_secs(61));
        assert_eq!(check(b"x", "192.0.2.9").await, Err(AuthError::Failed));
        assert_eq!(auth.counters().tracked_sources, 1);
    });
}

#[test]
fn failure_limit_memory_is_bounded() {
    let auth = start(&AuthConfig {
        sources_max: 4,
        ..quick()
    });
    let phc = hash(b"pw");
    on_executor(async {
        for i in 0..10 {
            let peer = ip(&format!("192.0.2.{i}"));
            let r = auth.verify("ann", b"x", Some(&phc), peer).await;
            assert_eq!(r, Err(AuthError::Failed));
            assert!(auth.counters().tracked_sources <= 4);
        }
    });
    assert_eq!(auth.counters().tracked_sources, 4);
}

/// Answers of `rounds` checks, each timed from the end of the check on the worker to
/// the awaiting task running again; `busy`: with a task on the same executor that
/// hogs the CPU and yields only when glommio asks it to.
fn wake_latencies(rounds: usize, busy: bool) -> Vec<Duration> {
    let done_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let check: Check = {
        let done_at = done_at.clone();
        Arc::new(move |pw, phc| {
            let ok = argon2_check(pw, phc);
            *lock(&done_at) = Some(Instant::now());
            ok
        })
    };
    let cfg = AuthConfig {
        cache_ttl: Duration::ZERO,
        ..quick()
    };
    let auth = Authenticator::with_parts(&cfg, check, Arc::new(Instant::now)).unwrap();
    let phc = hash(b"pw");
    let mut lat = on_executor(async {
        let stop = Rc::new(std::cell::Cell::new(false));
        let hog = busy.then(|| {
            let stop = stop.clone();
            glommio::spawn_local(async move {
                while !stop.get() {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(50) {}
                    glommio::yield_if_needed().await;
                }
            })
        });
        let mut lat = Vec::new();
        for _ in 0..rounds {
            auth.verify("ann", b"pw", Some(&phc), ip("192.0.2.1"))
                .await
                .unwrap();
            let woke = Instant::now();
            lat.push(woke - lock(&done_at).take().unwrap());
        }
        stop.set(true);
        if let Some(hog) = hog {
            hog.await;
        }
        lat
    });
    lat.sort();
    let pct = |p: usize| lat[(lat.len() - 1) * p / 100];
    println!(
        "wake latency worker -> {} executor: p50 {:?} p90 {:?} p99 {:?} max {:?}",
        if busy { "busy" } else { "idle" },
        pct(50),
        pct(90),
        pct(99),
        lat[lat.len() - 1]
    );
    lat
}

/// A parked executor: glommio writes its eventfd on a foreign wake.
#[test]
fn wake_latency_into_an_idle_executor() {
    let lat = wake_latencies(200, false);
    assert!(lat[lat.len() / 2] < Duration::from_millis(5), "{lat:?}");
}

/// A busy executor: a plain foreign wake waited for the preemption timer (p50 187 ms
/// measured before the relay task); through the relay it preempts the hog.
#[test]
fn wake_latency_into_a_busy_executor() {
    let lat = wake_latencies(30, true);
    assert!(lat[lat.len() / 2] < Duration::from_millis(50), "{lat:?}");
}

/// The `auth-*` settings reach `AuthConfig`, and out-of-range ones are refused.
#[test]
fn settings_set_the_auth_config() {
    use crate::config::Settings;
    let s = Settings::from_toml(
        "auth-workers = 3\nauth-queue = 7\nauth-cache-ttl = 0\nauth-failure-delay = 5\n\
         auth-failures-per-minute = 0\n",
    )
    .unwrap();
    let cfg = s.to_config().unwrap();
    assert_eq!(
        cfg.auth,
        AuthConfig {
            workers: Some(3),
            queue: 7,
            cache_ttl: Duration::ZERO,
            failure_delay: Duration::from_secs(5),
            failures_per_minute: 0,
            ..AuthConfig::default()
        }
    );
    assert_eq!(cfg.auth.worker_count(), 3);
    let d = Settings::from_toml("").unwrap().to_config().unwrap().auth;
    assert_eq!(d, AuthConfig::default());
    assert!(d.worker_count() >= 1);
    for bad in ["auth-workers = 0", "auth-failure-delay = 61"] {
        let e = Settings::from_toml(bad).unwrap().to_config().unwrap_err();
        assert!(e.contains(bad.split(' ').next().unwrap()), "{e}");
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: the set is initialised by zeroing and CPU_SET; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// The first CPU this thread may run on.
fn first_cpu() -> usize {
    // SAFETY: as in `pin_to`; the set is filled by the kernel.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .unwrap()
    }
}

/// glommio 0.9 parks an executor whose task queue was made runnable by a wake from
/// outside (the relay, woken by a worker) when the preemption timer (1 ms while the
/// relay's queue is active) fired before the first queue ran: `run_task_queues`
/// reports "nothing ran" and the executor sleeps until something else happens, which
/// with no timer or I/O pending is never. Only an executor thread that loses its CPU
/// at that point hits it; here it shares one CPU with threads that never yield, so it
/// loses it often. Bounded: a lost answer fails the test instead of hanging it (it
/// did, without the backstop timer of `pool::Reply`, within a few thousand checks).
#[test]
fn answers_reach_an_executor_that_loses_its_cpu() {
    const ROUNDS: usize = 20_000;
    let cpu = first_cpu();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to(cpu);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let cfg = AuthConfig {
        cache_ttl: Duration::ZERO,
        ..quick()
    };
    let check: Check = Arc::new(|_, _| true);
    let auth = Authenticator::with_parts(&cfg, check, Arc::new(Instant::now)).unwrap();
    let (done, finished) = mpsc::channel();
    let on_ex = auth.clone();
    std::thread::spawn(move || {
        pin_to(cpu);
        let n = on_executor(async {
            let mut n = 0;
            for _ in 0..ROUNDS {
                on_ex
                    .verify("ann", b"pw", Some("phc"), ip("192.0.2.1"))
                    .await
                    .unwrap();
                n += 1;
                let _ = done.send(n);
            }
            n
        });
        let _ = done.send(n);
    });
    let mut answered = 0;
    while answered < ROUNDS {
        match finished.recv_timeout(Duration::from_secs(10)) {
            Ok(n) => answered = n,
            Err(_) => break,
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    assert_eq!(answered, ROUNDS, "an answer never reached its executor");
}

/// An executor that ends while one of its checks waits for a worker: the worker still
/// finishes that job (the answer goes to a relay that no longer runs) and goes on, and
/// the next executors on the same thread, which get relays of their own, get their
/// answers. Bounded, so that anything stuck fails the test.
#[test]
fn an_executor_that_ends_mid_check_leaves_nothing_stuck() {
    const LATER: usize = 3;
    let (open, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let check: Check = Arc::new(move |_, _| {
        lock(&gate).recv().unwrap();
        true
    });
    let cfg = AuthConfig {
        cache_ttl: Duration::ZERO,
        ..quick()
    };
    let auth = Authenticator::with_parts(&cfg, check, Arc::new(Instant::now)).unwrap();
    let (ended, first_ended) = mpsc::channel();
    let (done, later_done) = mpsc::channel();
    let on_ex = auth.clone();
    std::thread::spawn(move || {
        on_executor(async {
            let a = on_ex.clone();
            glommio::spawn_local(async move {
                a.verify("ann", b"pw", Some("phc"), ip("192.0.2.1")).await
            })
            .detach();
            until("the check to be queued", || on_ex.counters().in_flight == 1).await;
        });
        ended.send(()).unwrap();
        for _ in 0..LATER {
            let r = on_executor(on_ex.verify("bob", b"pw", Some("phc"), ip("192.0.2.2")));
            done.send(r).unwrap();
        }
    });
    first_ended
        .recv_timeout(Duration::from_secs(20))
        .expect("the first executor ended");
    for _ in 0..=LATER {
        open.send(()).unwrap();
    }
    for _ in 0..LATER {
        let r = later_done.recv_timeout(Duration::from_secs(20));
        assert_eq!(r, Ok(Ok(())), "a later executor did not get its answer");
    }
    let c = auth.counters();
    assert_eq!(
        (c.verifications, c.in_flight),
        (LATER as u64 + 1, 0),
        "{c:?}"
    );
}
