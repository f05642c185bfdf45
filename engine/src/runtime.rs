//! The thread-per-core runtime: one pinned glommio executor per core, each listening on
//! the SMTP address and owning its shards outright; signals and orderly shutdown.

use crate::accounts::{Accounts, DirectoryCell};
use crate::config::Config;
use crate::ingest::{Ingest, Service};
use crate::mailbox::MailService;
use crate::queue::Spool;
use crate::storeservice::StoreService;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use ringmail_store::accounts::AccountIndex;
use ringmail_store::mailbox::MailIndex;
use ringmail_store::{manifest, LogConfig};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bumped by SIGUSR1 (`ringmail queue flush`): executors make deferred mail due now.
static FLUSH_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Every executor's mailbox delivery latencies, added up as each stops.
static LATENCY: std::sync::LazyLock<std::sync::Mutex<crate::mailbox::Latency>> =
    std::sync::LazyLock::new(Default::default);

/// Every executor's body counters, added up as each stops (once: not the hot path).
static BODY_STATS: std::sync::Mutex<ringmail_store::stats::Counters> =
    std::sync::Mutex::new(ringmail_store::stats::Counters::ZERO);

/// The file `queue flush` finds the server by.
pub fn pid_file(data: &std::path::Path) -> std::path::PathBuf {
    data.join("ringmail.pid")
}

/// The file `ringmail queue` finds the admin API's address in.
pub fn admin_addr_file(data: &std::path::Path) -> std::path::PathBuf {
    data.join("admin.addr")
}

/// Shards a new data directory is created with: one per executor.
pub fn shard_count(cfg: &Config) -> u32 {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    cfg.cores
        .unwrap_or(available)
        .clamp(1, manifest::SHARDS_MAX as usize) as u32
}

/// Creates the data directory if needed and takes its lock (`DATA/lock`), or says
/// clearly that another server (or an offline account change) holds it.
pub fn lock_data(data: &std::path::Path) -> Result<std::fs::File, String> {
    std::fs::create_dir_all(data)
        .map_err(|e| format!("cannot create data directory {}: {e}", data.display()))?;
    match crate::accounts::try_lock(data) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(format!(
            "data directory {} is in use: another ringmail holds {}",
            data.display(),
            crate::accounts::lock_path(data).display()
        )),
        Err(e) => Err(format!(
            "cannot lock {}: {e}",
            crate::accounts::lock_path(data).display()
        )),
    }
}

/// How often an executor looks at the process-wide shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

/// Runs the server until SIGINT/SIGTERM, then shuts down in order: stop accepting, let
/// sessions finish the message they are in (bounded), sync every log, return.
/// `load` reads the settings again the way they were read for this start (the config
/// file, then the flags), for SIGHUP (`reload`); None: SIGHUP re-reads the
/// certificates only.
pub fn serve(cfg: Config, load: Option<crate::reload::Load>) -> Result<(), String> {
    cfg.validate()?;
    // Before any thread starts (every thread inherits the mask): only the signal
    // thread takes SIGINT/SIGTERM/SIGUSR1/SIGHUP, so none ends the process by its
    // default action, even during the start.
    block_signals();
    raise_open_files_limit();
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = cfg.cores.unwrap_or(available);
    // One writer per log: held until the process ends (the kernel drops it then,
    // however the process ends).
    let _lock = lock_data(&cfg.data)?;
    let m = manifest::open_or_create(&cfg.data, shard_count(&cfg))
        .map_err(|e| format!("data directory {}: {e}", cfg.data.display()))?;
    let executors = cores.min(m.shards as usize);
    if executors < cores {
        tracing::warn!(
            cores,
            shards = m.shards,
            "the data directory has fewer shards than cores; running one executor per shard"
        );
    }
    // Fail clearly when someone else holds the port. (glommio binds with SO_REUSEPORT,
    // which would otherwise share the port with another server silently.)
    // One certificate set for every TLS listener and STARTTLS.
    let tls = Arc::new(crate::net::certs::ServerTls::load(
        &cfg.cert_files(),
        &cfg.data,
        &cfg.hostname,
    )?);
    // Delivery's STARTTLS settings, shared by the executors (and so is the TLS
    // session cache inside, for resumption on the next connection to a host).
    // DKIM keys, loaded once: a key that does not load stops the start.
    let signers = Arc::new(crate::mailauth::Signers::load(&cfg.dkim)?);
    // Inbound verification's thread and resolver (off: none).
    let verifier = match cfg.mail_auth.verify {
        true => Some(Arc::new(crate::mailauth::Verifier::start(
            &cfg.dns,
            &cfg.hostname,
            crate::mailauth::sign::key_for(&cfg.dkim, &cfg.hostname),
        )?)),
        false => None,
    };
    let outbound = crate::delivery::tls::OutboundTls::new(
        cfg.tls_policies.clone(),
        cfg.tls_ca_file.as_deref(),
    )?;
    let mut cfg = cfg;
    // Bound here, once for all executors, so that port 0 means one port for all of them;
    // the address actually bound is logged, for whoever asked for port 0.
    let bind = |addr: &mut std::net::SocketAddr| -> Result<Vec<std::os::fd::OwnedFd>, String> {
        if addr.port() != 0 {
            wait_port_free(*addr)?;
        }
        let (bound, fds) = crate::ingest::listen_all(*addr, executors)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        *addr = bound;
        Ok(fds)
    };
    let smtp = bind(&mut cfg.smtp)?;
    let pop3 = bind(&mut cfg.pop3)?;
    let smtps = bind(&mut cfg.smtps)?;
    let pop3s = bind(&mut cfg.pop3s)?;
    let submission = bind(&mut cfg.submission)?;
    // The admin listener is executor 0's alone (no SO_REUSEPORT: one socket).
    if cfg.admin.port() != 0 {
        wait_port_free(cfg.admin)?;
    }
    let admin = std::net::TcpListener::bind(cfg.admin)
        .map_err(|e| format!("cannot listen on {} (`admin`): {e}", cfg.admin))?;
    cfg.admin = admin
        .local_addr()
        .map_err(|e| format!("admin listener: {e}"))?;
    let admin = Arc::new(std::sync::Mutex::new(Some(std::os::fd::OwnedFd::from(
        admin,
    ))));
    tracing::info!(smtp = %cfg.smtp, pop3 = %cfg.pop3, smtps = %cfg.smtps, pop3s = %cfg.pop3s, submission = %cfg.submission, admin = %cfg.admin, "listening");
    let listeners = Arc::new(std::sync::Mutex::new(
        smtp.into_iter()
            .zip(pop3)
            .zip(smtps.into_iter().zip(pop3s))
            .zip(submission)
            .map(|(((smtp, pop3), (smtps, pop3s)), submission)| {
                Some(Listeners {
                    smtp,
                    pop3,
                    smtps,
                    pop3s,
                    submission,
                })
            })
            .collect::<Vec<_>>(),
    ));

    // One password-check path for every login frontend (`auth`).
    let auth = crate::auth::Authenticator::new(&cfg.auth)
        .map_err(|e| format!("cannot start the password check threads: {e}"))?;

    // Signals are taken by their thread before the pid file tells anyone where to
    // send them (a SIGHUP before would end the process).
    let shutdown = Arc::new(AtomicBool::new(false));
    // What SIGHUP may change, starting from what runs (ports as bound).
    let reloader = crate::reload::Reloader::new(cfg.clone(), outbound.clone(), load);
    reloader.set_executors(executors);
    spawn_signal_thread(shutdown.clone(), tls.clone(), reloader.clone());
    // Everything that needs root is done: the listeners are bound.
    if let Some(user) = &cfg.user {
        crate::privileges::drop_to(user, &cfg.data)?;
    }
    let pid = pid_file(&cfg.data);
    std::fs::write(&pid, format!("{}\n", std::process::id()))
        .map_err(|e| format!("cannot write {}: {e}", pid.display()))?;
    // Where `ringmail queue` finds the admin API (its port may have been 0).
    let admin_addr = admin_addr_file(&cfg.data);
    std::fs::write(&admin_addr, format!("{}\n", cfg.admin))
        .map_err(|e| format!("cannot write {}: {e}", admin_addr.display()))?;

    let next_index = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicUsize::new(0));
    let placement = if cores <= available {
        PoolPlacement::MaxSpread(executors, None)
    } else {
        PoolPlacement::Unbound(executors)
    };
    let shards = m.shards;
    // Cross-core reads (see `storeservice`): every executor joins before it opens
    // its shards, and its place in the mesh is its index.
    let mesh = crate::storeservice::mesh(executors);
    // Loaded by executor 0 from shard 0, then swapped after every account change.
    let directory = DirectoryCell::new();
    // Mailbox work and change notifications between executors (see `mailbox`).
    let mail_mesh = crate::mailbox::service::mesh(executors);
    let handles = LocalExecutorPoolBuilder::new(placement)
        .name("ringmail")
        .on_all_shards(move || {
            let cfg = cfg.clone();
            let shutdown = shutdown.clone();
            let slot = next_index.fetch_add(1, Ordering::SeqCst);
            let ready = ready.clone();
            let listener = listeners.lock().unwrap()[slot].take();
            let directory = directory.clone();
            let mail_mesh = mail_mesh.clone();
            let auth = auth.clone();
            let tls = tls.clone();
            let outbound = outbound.clone();
            let signers = signers.clone();
            let verifier = verifier.clone();
            let admin = admin.clone();
            let reloader = reloader.clone();
            async move {
                let listener = listener.expect("one listener per executor");
                let store = StoreService::join(mesh, &cfg.data, cfg.read_cache_bytes).await?;
                // The mesh numbers executors in its own order: shard ownership follows
                // it, so that every executor routes a shard's requests to its owner.
                let index = store.peer();
                let admin = match index {
                    0 => admin.lock().unwrap().take(),
                    _ => None,
                };
                let result = executor_main(
                    index,
                    listener,
                    shards,
                    Rc::new(cfg),
                    shutdown.clone(),
                    ready,
                    store,
                    directory,
                    mail_mesh,
                    auth,
                    tls,
                    outbound,
                    signers,
                    verifier,
                    admin,
                    reloader,
                )
                .await;
                if let Err(e) = &result {
                    tracing::error!(executor = index, "{e}");
                    // One executor failing takes the server down, not half of it.
                    shutdown.store(true, Ordering::SeqCst);
                }
                result
            }
        })
        .map_err(|e| format!("cannot start executors: {e}"))?;
    let mut first_error = None;
    for r in handles.join_all() {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(format!("executor failed: {e}"));
            }
        }
    }
    let _ = std::fs::remove_file(&pid);
    let _ = std::fs::remove_file(&admin_addr);
    match first_error {
        None => {
            let c = *BODY_STATS.lock().unwrap_or_else(|e| e.into_inner());
            // The benchmarks read copies per message (`body_copies=`) and the bytes
            // written by cause (ringmail-wamp) from here.
            log_counters(None, &c);
            let l = LATENCY.lock().unwrap_or_else(|e| e.into_inner());
            if l.count() > 0 {
                // The benchmarks read the delivery-to-mailbox figures from here.
                tracing::info!(
                    local_deliveries = l.count(),
                    latency_p50_ms = l.quantile(0.5),
                    latency_p99_ms = l.quantile(0.99),
                    latency_max_ms = l.quantile(1.0),
                    "mailbox deliveries"
                );
            }
            Ok(())
        }
        Some(e) => Err(e),
    }
}

/// One executor's listening sockets (bound before the executors start).
struct Listeners {
    smtp: std::os::fd::OwnedFd,
    pop3: std::os::fd::OwnedFd,
    smtps: std::os::fd::OwnedFd,
    pop3s: std::os::fd::OwnedFd,
    submission: std::os::fd::OwnedFd,
}

// Each argument is a separate piece of the executor's start-up context, used once.
#[allow(clippy::too_many_arguments)]
async fn executor_main(
    index: usize,
    listener: Listeners,
    shards: u32,
    cfg: Rc<Config>,
    shutdown: Arc<AtomicBool>,
    ready: Arc<AtomicUsize>,
    store: StoreService,
    directory: Arc<DirectoryCell>,
    mail_mesh: Arc<crate::mailbox::Mesh>,
    auth: Arc<crate::auth::Authenticator>,
    tls: Arc<crate::net::certs::ServerTls>,
    outbound: crate::delivery::tls::OutboundTls,
    signers: Arc<crate::mailauth::Signers>,
    verifier: Option<Arc<crate::mailauth::Verifier>>,
    admin: Option<std::os::fd::OwnedFd>,
    reloader: Arc<crate::reload::Reloader>,
) -> Result<(), String> {
    let executors = store.executors();
    // Joined before the shards open, so that work for them queues meanwhile.
    let mail = MailService::join(&mail_mesh, index, shards);
    let latency = Rc::new(RefCell::new(crate::mailbox::Latency::default()));
    let mut spools = Vec::new();
    let mut accounts = None;
    let mut mail_indexes = Vec::new();
    for shard in (0..shards).filter(|k| *k as usize % executors == index) {
        // Every shard's indexes in one order, as snapshot sections are numbered by
        // place and the offline readers (`accounts::cli`, `mailbox::list`) count on
        // it: the queue, the accounts (records only on shard 0), the mailboxes.
        let account_ix = Rc::new(RefCell::new(AccountIndex::default()));
        let mail_ix = Rc::new(RefCell::new(MailIndex::default()));
        let others: Vec<Rc<RefCell<dyn ringmail_store::Index>>> =
            vec![account_ix.clone(), mail_ix.clone()];
        if shard == 0 {
            accounts = Some(Rc::new(Accounts::new(
                account_ix,
                &cfg.local_domains,
                Some(directory.clone()),
            )));
        }
        let spool = Spool::open_with(
            &cfg.data,
            shard,
            LogConfig {
                segment_bytes_max: cfg.segment_bytes_max,
                zero_ahead: cfg.log_zero_ahead,
            },
            others,
        )
        .await
        .map_err(|e| {
            format!(
                "shard {shard}: cannot open its log in {}: {e}",
                cfg.data.display()
            )
        })?;
        let spool = Rc::new(spool);
        store.add_owner(shard, spool.clone());
        let service = store.clone();
        spool.on_segment_deleted(move |shard, seq| service.segment_deleted(shard, seq));
        mail_indexes.push((spool.clone(), mail_ix));
        spools.push(spool);
    }
    // References across shards (docs/mailboxes.md): the owners count what this
    // executor's shards refer to. Mail is taken meanwhile; only the shards' snapshots
    // and compaction wait until every executor has sent its own.
    let mut foreign: std::collections::HashMap<u32, Vec<u64>> = Default::default();
    for spool in &spools {
        for (target, ids) in spool.take_foreign() {
            if target >= shards {
                tracing::warn!(
                    shard = spool.shard,
                    target,
                    refs = ids.len(),
                    "references to a shard that does not exist"
                );
                continue;
            }
            foreign.entry(target).or_default().extend(ids);
        }
    }
    store.exchange_refs(foreign);
    // The home shards take mailbox changes only now: a change may give up a
    // reference to another shard's message, which its owner must have counted.
    let homes = crate::mailbox::open_homes(
        &cfg.data,
        &mail,
        &store,
        &directory,
        mail_indexes,
        latency.clone(),
    )
    .await?;
    // Shard 0's accounts: published for every executor, and changed through the
    // control socket from now on.
    let control = match &accounts {
        Some(a) => {
            a.publish();
            let spool0 = spools
                .iter()
                .find(|s| s.shard == 0)
                .expect("shard 0 is here");
            Some(crate::accounts::control::Control::start(
                &cfg.data,
                a.clone(),
                spool0.clone(),
            )?)
        }
        None => None,
    };
    let ring = crate::net::Ring::start()
        .map_err(|e| format!("executor {index}: cannot set up its io_uring: {e}"))?;
    let ingest = Ingest::new(
        cfg.clone(),
        spools.clone(),
        ring.clone(),
        Some(directory.clone()),
        tls.clone(),
        auth.clone(),
        signers,
        verifier,
    );
    let local = crate::delivery::local::Local {
        directory: directory.clone(),
        mail: mail.clone(),
    };
    let admin = admin.map(|fd| {
        crate::admin::Admin::start(fd, mail.clone(), auth.clone(), cfg.admin_token.clone())
    });
    let pop3 = crate::pop3::Pop3::new(
        cfg.clone(),
        ring.clone(),
        mail.clone(),
        store.clone(),
        directory.clone(),
        auth,
        tls,
    );
    let delivery = crate::delivery::scheduler::Delivery::new(
        cfg.clone(),
        ring,
        spools.clone(),
        Some(local),
        outbound,
    );
    crate::admin::register(delivery.clone());
    // No RCPT for a local domain is answered before shard 0's accounts are known.
    let loaded = directory.wait_loaded(&shutdown).await;
    // Delivery starts once the directory is known: before, every local domain
    // looks as if it had no account, and its queued mail would be passed over.
    let delivery_task = glommio::spawn_local(delivery.clone().run());
    if loaded {
        // The recovered usage, for the RCPT quota check, before this executor
        // counts as ready.
        homes.iter().for_each(|h| h.publish_all_usage());
    }
    if loaded && ready.fetch_add(1, Ordering::SeqCst) + 1 == executors {
        tracing::info!(smtp = %cfg.smtp, pop3 = %cfg.pop3, smtps = %cfg.smtps, pop3s = %cfg.pop3s, submission = %cfg.submission, admin = %cfg.admin, executors, shards, data = %cfg.data.display(), "ringmail ready");
        // Under systemd (`Type=notify`): started. Nothing without NOTIFY_SOCKET.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }

    let watcher = {
        let ingest = ingest.clone();
        let pop3 = pop3.clone();
        let spools = spools.clone();
        let delivery = delivery.clone();
        glommio::spawn_local(async move {
            let mut flushes = FLUSH_REQUESTS.load(Ordering::SeqCst);
            // From the settings the executor started with (generation 0): a SIGHUP
            // taken while it was still recovering is applied at the first poll.
            let mut generation = crate::reload::STARTING_GENERATION;
            while !shutdown.load(Ordering::SeqCst) {
                glommio::timer::sleep(SHUTDOWN_POLL).await;
                let now = FLUSH_REQUESTS.load(Ordering::SeqCst);
                if now != flushes {
                    flushes = now;
                    spools.iter().for_each(|s| s.flush());
                }
                if reloader.generation() != generation {
                    // SIGHUP: new settings for new sessions and new attempts.
                    generation = reloader.generation();
                    let new = reloader.current();
                    let cfg = Rc::new(new.config.clone());
                    ingest.reload(cfg.clone());
                    pop3.reload(cfg.clone());
                    delivery.reload(cfg, new.outbound.clone());
                    reloader.taken();
                    tracing::debug!(executor = index, generation, "settings reloaded");
                }
            }
            ingest.begin_shutdown();
            pop3.begin_shutdown();
            if let Some(a) = &admin {
                a.stop();
            }
        })
    };
    if loaded {
        let loops = [
            glommio::spawn_local(pop3.clone().accept_loop(listener.pop3, false)),
            glommio::spawn_local(pop3.clone().accept_loop(listener.pop3s, true)),
            glommio::spawn_local(ingest.clone().accept_loop(listener.smtps, Service::Smtps)),
            glommio::spawn_local(
                ingest
                    .clone()
                    .accept_loop(listener.submission, Service::Submission),
            ),
        ];
        ingest
            .clone()
            .accept_loop(listener.smtp, Service::Smtp)
            .await;
        for l in loops {
            l.await;
        }
    }
    watcher.await;
    if let Some(c) = &control {
        c.close().await;
    }
    // One grace period for both listeners' sessions.
    futures_lite::future::zip(
        ingest.drained(cfg.shutdown_grace),
        pop3.drained(cfg.shutdown_grace),
    )
    .await;
    delivery.stop();
    delivery_task.await;
    delivery.drained(cfg.shutdown_grace).await;
    crate::mailbox::close_homes(&mail, &homes).await;
    for spool in &spools {
        spool.close().await;
    }
    store.close().await;
    crate::admin::unregister();
    let l = latency.borrow();
    if l.count() > 0 {
        tracing::info!(
            executor = index,
            local_deliveries = l.count(),
            latency_p50_ms = l.quantile(0.5),
            latency_p99_ms = l.quantile(0.99),
            latency_max_ms = l.quantile(1.0),
            "mailbox deliveries"
        );
    }
    LATENCY.lock().unwrap_or_else(|e| e.into_inner()).merge(&l);
    drop(l);
    // What ingestion did to bodies on this executor (ringmail_store::stats): one copy
    // and one CRC pass per body byte, and what the log wrote by cause.
    let c = ringmail_store::stats::get();
    log_counters(Some(index), &c);
    let mut all = BODY_STATS.lock().unwrap_or_else(|e| e.into_inner());
    *all = all.plus(&c);
    Ok(())
}

/// Logs the store's counters: an executor's when it stops, the whole process's at
/// the end (`executor` None: the `stopped` line the benchmarks read).
fn log_counters(executor: Option<usize>, c: &ringmail_store::stats::Counters) {
    let what = match executor {
        Some(_) => "executor stopped",
        None => "stopped",
    };
    tracing::info!(
        executor,
        bodies = c.bodies,
        body_bytes = c.body_bytes,
        body_bytes_copied = c.body_bytes_copied,
        body_bytes_crc = c.body_bytes_crc,
        relocated_bytes = c.relocated_bytes,
        tail_bytes_copied = c.tail_bytes_copied,
        body_copies = c.body_copies(),
        copies_per_body_byte = c.copies_per_body_byte(),
        log_record_bytes = c.log_record_bytes,
        copied_bytes = c.copied_bytes,
        snapshot_bytes = c.snapshot_bytes,
        log_tail_bytes = c.log_tail_bytes,
        log_pad_bytes = c.log_pad_bytes,
        zero_bytes = c.zero_bytes,
        segment_header_bytes = c.segment_header_bytes,
        store_bytes = c.store_bytes(),
        written_bytes = c.written_bytes(),
        "{what}"
    );
}

/// Waits (briefly) for the SMTP port to be free. After a crash the kernel tears the dead
/// process's io_uring down asynchronously, and until then an accept it had in flight
/// keeps the old listening socket alive.
fn wait_port_free(addr: std::net::SocketAddr) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match crate::ingest::check_port_free(addr) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGINT/SIGTERM/SIGUSR1/SIGHUP in this thread and so in every thread started after it: only
/// the signal thread receives them, synchronously.
fn block_signals() {
    let set = signal_set();
    // SAFETY: the set is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn spawn_signal_thread(
    shutdown: Arc<AtomicBool>,
    tls: Arc<crate::net::certs::ServerTls>,
    reloader: Arc<crate::reload::Reloader>,
) {
    std::thread::Builder::new()
        .name("ringmail-signals".into())
        .spawn(move || {
            let set = signal_set();
            loop {
                let mut sig = 0;
                // SAFETY: the set is initialised and `sig` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if sig == libc::SIGUSR1 {
                    FLUSH_REQUESTS.fetch_add(1, Ordering::SeqCst);
                    tracing::info!("flush: retrying deferred mail now");
                    continue;
                }
                if sig == libc::SIGHUP {
                    // New handshakes take the new certificates; open sessions keep
                    // theirs.
                    match tls.reload() {
                        Ok(()) => {
                            tracing::info!("reload: TLS certificates re-read ({})", tls.describe())
                        }
                        Err(e) => tracing::error!("reload: {e}; the certificates in use stay"),
                    }
                    reloader.reload();
                    continue;
                }
                if shutdown.swap(true, Ordering::SeqCst) {
                    // A second signal: the operator wants out now. Everything that was
                    // acknowledged is already durable, so exiting loses nothing.
                    tracing::warn!(signal = sig, "second signal, exiting at once");
                    std::process::exit(1);
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                tracing::info!(signal = sig, "shutting down");
            }
        })
        .expect("spawn the signal thread");
}

/// Every connection, segment and DNS query is a descriptor, and the usual soft limit
/// (1024) is far below what one shard serves: raise it to the hard limit, as other
/// servers do at start.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid out pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let soft = lim.rlim_cur;
        if soft < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::info!(
                    from = soft,
                    to = lim.rlim_max,
                    "raised the open files limit"
                );
                return;
            }
        }
        if soft < 4096 {
            tracing::warn!(
                limit = soft,
                "open files limit is low; connections past it are refused"
            );
        }
    }
}
