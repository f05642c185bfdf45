//! Users' mailboxes on their home shards (docs/mailboxes.md): the engine side of
//! the store's mailbox index. `home` makes changes durable and applies them on the
//! home shard's executor; `service` carries work and change notifications between
//! executors; `list` is `ringmail mailbox list`.

pub mod home;
pub mod list;
pub mod service;

pub use home::{ChangeError, DeliverError, Delivery, Home};
pub use service::{MailService, Mesh, Subscription};

use crate::accounts::DirectoryCell;
use crate::queue::Spool;
use crate::storeservice::StoreService;
use ringmail_store::mailbox::MailIndex;
use ringmail_store::mailcache::MailCache;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// How often a home shard looks whether the directory changed (a deleted account's
/// mailboxes are dropped then).
const ORPHAN_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens the home side of this executor's shards (their mailbox indexes were
/// recovered with the shards) and registers them with `mail`; starts the task that
/// drops the mailboxes of deleted accounts.
pub async fn open_homes(
    data: &Path,
    mail: &MailService,
    store: &StoreService,
    directory: &Arc<DirectoryCell>,
    indexes: Vec<(Rc<Spool>, Rc<RefCell<MailIndex>>)>,
    latency: Rc<RefCell<Latency>>,
) -> Result<Vec<Rc<Home>>, String> {
    let mut homes = Vec::new();
    for (spool, index) in indexes {
        let path = ringmail_store::segment::shard_dir(data, spool.shard).join("mailcache");
        let cache = MailCache::open(&path)
            .await
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let home = Rc::new(Home::new(
            spool,
            index,
            cache,
            store.clone(),
            mail.clone(),
            directory.clone(),
            latency.clone(),
        ));
        mail.add_home(home.clone());
        homes.push(home);
    }
    let (weak, directory) = (
        homes.iter().map(Rc::downgrade).collect::<Vec<_>>(),
        directory.clone(),
    );
    glommio::spawn_local(async move {
        let mut seen = None;
        loop {
            let version = directory.is_loaded().then(|| directory.load().version);
            if version.is_some() && version != seen {
                seen = version;
                for h in &weak {
                    match h.upgrade() {
                        Some(h) => h.drop_orphans().await,
                        None => return,
                    }
                }
            }
            glommio::timer::sleep(ORPHAN_CHECK).await;
            if weak.iter().all(|h| h.strong_count() == 0) {
                return;
            }
        }
    })
    .detach();
    Ok(homes)
}

/// Writes the home shards' caches out and lets them go (before the logs close).
pub async fn close_homes(mail: &MailService, homes: &[Rc<Home>]) {
    mail.close();
    for h in homes {
        if let Err(e) = h.cache().close().await {
            tracing::warn!(shard = h.shard(), error = %e, "cannot write the mailbox cache out");
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds from a message's arrival to its entry being durable in a mailbox,
/// per executor: one counter per millisecond up to 10 s (what the 50 ms p99
/// is measured with; logged when the executor stops).
pub struct Latency {
    buckets: Vec<u64>,
    count: u64,
}

const LATENCY_MS_MAX: usize = 10_000;

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: vec![0; LATENCY_MS_MAX + 1],
            count: 0,
        }
    }
}

impl Latency {
    pub fn record(&mut self, ms: u64) {
        self.buckets[(ms as usize).min(LATENCY_MS_MAX)] += 1;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Latency) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The smallest latency at or under which `q` (0..=1) of the deliveries were
    /// (10 000: "10 s or more").
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (ms, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return ms as u64;
            }
        }
        LATENCY_MS_MAX as u64
    }
}

#[cfg(test)]
mod tests;
