//! Password checks for every frontend that logs users in (POP3, IMAP, SMTP AUTH), off
//! the executors.
//!
//! One argon2id verification costs milliseconds of CPU (see bench/benches/auth.rs);
//! on an executor thread it would stall every session of that core. The process has
//! one `Authenticator`, created before the executors start and shared by them
//! (`Arc`): a bounded pool of verification threads (`pool`), a cache of recent
//! successful logins (`cache`), and a limit on failures per source (`limit`).
//!
//! A check, in order: a source over its failure limit is refused at once
//! (`RateLimited`, no verification); a cache hit succeeds at once; otherwise the
//! verification is queued (`Busy` when the pool and its queue are full) and awaited;
//! a failure counts against the source and is answered only after
//! `failure_delay`, on an executor timer.

mod cache;
mod limit;
mod pool;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Wrong password, or no such user (the two are not told apart).
    Failed,
    /// The source failed too often lately; nothing was verified. Temporary.
    RateLimited,
    /// Every verification thread is busy and the queue is full; nothing was verified.
    /// Temporary: the frontend answers 4xx / `[UNAVAILABLE]`.
    Busy,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthError::Failed => "authentication failed",
            AuthError::RateLimited => "too many failed logins from this address",
            AuthError::Busy => "authentication temporarily unavailable",
        })
    }
}

impl std::error::Error for AuthError {}

/// The `auth-*` settings (see `config.rs`), and the bounds that are not settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    /// Verification threads; `None`: one per available core (they run at a lower
    /// priority than the executors, see `pool`).
    pub workers: Option<usize>,
    /// Verifications that may wait for a thread beyond the ones running.
    pub queue: usize,
    /// How long a successful login is remembered; zero: no cache.
    pub cache_ttl: Duration,
    /// Entries of the cache at most (the oldest go first).
    pub cache_entries_max: usize,
    /// How long a failed check waits before it is answered.
    pub failure_delay: Duration,
    /// Failures a source may have per minute; 0: no limit.
    pub failures_per_minute: u32,
    /// Sources the failure limit tracks at most.
    pub sources_max: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            workers: None,
            queue: 64,
            // Dovecot's auth_cache_ttl and auth_failure_delay.
            cache_ttl: Duration::from_secs(3600),
            cache_entries_max: 100_000,
            failure_delay: Duration::from_secs(2),
            failures_per_minute: 10,
            sources_max: 100_000,
        }
    }
}

impl AuthConfig {
    /// The verification threads these settings start.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}

/// What the authenticator did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthCounters {
    /// argon2 runs (the dummy hash of unknown users included).
    pub verifications: u64,
    /// Checks answered from the cache, without a verification.
    pub cache_hits: u64,
    /// Checks refused as `RateLimited`.
    pub rate_limited: u64,
    /// Checks refused as `Busy`.
    pub busy: u64,
    /// Checks answered `Failed`.
    pub failures: u64,
    /// Verifications queued or running now.
    pub in_flight: u64,
    /// Successful logins the cache holds now.
    pub cache_entries: u64,
    /// Sources the failure limit tracks now.
    pub tracked_sources: u64,
}

#[derive(Default)]
struct Counts {
    verifications: AtomicU64,
    cache_hits: AtomicU64,
    rate_limited: AtomicU64,
    busy: AtomicU64,
    failures: AtomicU64,
}

/// Checks a password against a PHC string; true when it matches.
pub(crate) type Check = Arc<dyn Fn(&[u8], &str) -> bool + Send + Sync>;
/// The time the cache's TTL and the failure limit are measured on.
pub(crate) type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Stands in for the stored hash of a user who does not exist, so that an unknown
/// user costs the same argon2 run as a known one (no user enumeration by timing):
/// argon2id with the crate's default parameters (those `Argon2::default()` hashes new
/// passwords with). The password it hashes is random and thrown away.
const DUMMY_PHC: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$Fb/qC4pzaBN58XBn0NkFiw$OHIBPGB3WgVopPrYOfoxTtl7Z3AliDT+dVgHD0ZLG70";

pub struct Authenticator {
    pool: Arc<pool::Pool>,
    cache: Mutex<cache::Cache>,
    limiter: Mutex<limit::Limiter>,
    failure_delay: Duration,
    counts: Arc<Counts>,
    check: Check,
    clock: Clock,
}

impl Authenticator {
    /// Starts the verification threads.
    pub fn new(cfg: &AuthConfig) -> std::io::Result<Arc<Authenticator>> {
        Authenticator::with_parts(cfg, Arc::new(argon2_check), Arc::new(Instant::now))
    }

    /// With the password check and the clock given (tests: a check that records
    /// where it runs or waits on a gate, a clock that jumps).
    pub(crate) fn with_parts(
        cfg: &AuthConfig,
        check: Check,
        clock: Clock,
    ) -> std::io::Result<Arc<Authenticator>> {
        Ok(Arc::new(Authenticator {
            pool: pool::Pool::start(cfg.worker_count(), cfg.queue)?,
            cache: Mutex::new(cache::Cache::new(cfg.cache_ttl, cfg.cache_entries_max)?),
            limiter: Mutex::new(limit::Limiter::new(
                cfg.failures_per_minute,
                cfg.sources_max,
            )),
            failure_delay: cfg.failure_delay,
            counts: Arc::default(),
            check,
            clock,
        }))
    }

    /// Checks `password` for `user`, whose stored hash is `phc` (`None`: no such
    /// user), for a client at `peer`. Runs on a glommio executor: the argon2 run is on
    /// a verification thread, and a failure is answered after the failure delay.
    pub async fn verify(
        &self,
        user: &str,
        password: &[u8],
        phc: Option<&str>,
        peer: IpAddr,
    ) -> Result<(), AuthError> {
        let source = limit::Source::of(peer);
        // Before the cache: a hit means the password is right, so answering hits
        // to a limited source would let it go on guessing at full speed.
        if lock(&self.limiter).limited(source, (self.clock)()) {
            self.counts.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::RateLimited);
        }
        let mut digest = None;
        if let Some(phc) = phc {
            let mut cache = lock(&self.cache);
            if cache.enabled() {
                let d = cache.digest(user, password, phc);
                if cache.hit(&d, (self.clock)()) {
                    drop(cache);
                    self.counts.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                digest = Some(d);
            }
        }
        let known = phc.is_some();
        let job = {
            let check = self.check.clone();
            let counts = self.counts.clone();
            let password = Secret(password.to_vec());
            let phc = phc.unwrap_or(DUMMY_PHC).to_string();
            Box::new(move || {
                counts.verifications.fetch_add(1, Ordering::Relaxed);
                check(&password.0, &phc) && known
            })
        };
        let Some(reply) = self.pool.submit(job) else {
            self.counts.busy.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::Busy);
        };
        if reply.await {
            if let Some(d) = digest {
                lock(&self.cache).insert(d, (self.clock)());
            }
            return Ok(());
        }
        lock(&self.limiter).record_failure(source, (self.clock)());
        self.counts.failures.fetch_add(1, Ordering::Relaxed);
        if !self.failure_delay.is_zero() {
            glommio::timer::sleep(self.failure_delay).await;
        }
        Err(AuthError::Failed)
    }

    pub fn counters(&self) -> AuthCounters {
        let c = &self.counts;
        AuthCounters {
            verifications: c.verifications.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            rate_limited: c.rate_limited.load(Ordering::Relaxed),
            busy: c.busy.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            in_flight: self.pool.in_flight() as u64,
            cache_entries: lock(&self.cache).len() as u64,
            tracked_sources: lock(&self.limiter).sources() as u64,
        }
    }
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        self.pool.close();
    }
}

/// argon2 (any variant the PHC string names) with the string's own parameters: the
/// check the verification threads run (public for the benchmarks, which measure
/// its rate as the limit of cold logins).
pub fn argon2_check(password: &[u8], phc: &str) -> bool {
    match argon2_verify(password, phc) {
        Ok(matched) => matched,
        Err(e) => {
            // Not a wrong password: a stored hash the crate cannot use. The login
            // fails as any other, but the operator should hear of it.
            tracing::warn!(error = %e, "a stored password hash cannot be verified");
            false
        }
    }
}

thread_local! {
    /// argon2's working memory (m KiB: 19 MiB with the default parameters), kept by
    /// each verification thread from one check to the next. The crate's own
    /// `verify_password` allocates it afresh every time, and the kernel then maps
    /// and zeroes ~4 800 new pages per check: measured with `perf` during a cold
    /// login run, a third of the verification threads' time was in the kernel. The
    /// blocks need no clearing between checks: argon2 writes every block before it
    /// reads it.
    static ARGON2_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// What `PasswordVerifier::verify_password` does, in this thread's kept memory.
fn argon2_verify(password: &[u8], phc: &str) -> Result<bool, String> {
    use argon2::password_hash::phc::{Output, PasswordHash};
    use argon2::{Algorithm, Argon2, Params, Version};
    let hash = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return Err("the hash has no salt or no output".into());
    };
    let algorithm = Algorithm::try_from(hash.algorithm.as_str()).map_err(|e| e.to_string())?;
    let version = match hash.version {
        Some(v) => Version::try_from(v).map_err(|e| e.to_string())?,
        None => Version::default(),
    };
    let params = Params::try_from(&hash).map_err(|e| e.to_string())?;
    let blocks = params.block_count();
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    ARGON2_MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        if memory.len() != blocks {
            memory.resize(blocks, argon2::Block::default());
            memory.shrink_to_fit();
        }
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(password, salt.as_ref(), out, &mut memory[..])
            .map_err(|e| e.to_string())
    })?;
    // Output's comparison is constant-time.
    Ok(Output::new(out).map_err(|e| e.to_string())? == *expected)
}

/// The worker's copy of a password, overwritten before it is freed (also when the
/// job is skipped).
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, exclusive reference; a volatile write is not
            // elided as a store to memory about to be freed.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
