//! One home shard's mailboxes on their executor: every change goes through
//! [`Home::change`] (check and reserve in the index, append the record, wait until it
//! is durable, apply, then references and notifications), so the index only ever
//! holds durable state and the log holds every change.

use super::service::MailService;
use super::Latency;
use crate::accounts::DirectoryCell;
use crate::queue::Spool;
use crate::storeservice::StoreService;
use ringmail_store::mailbox::{Change, Committed, MailError, MailIndex, NewEntry, Notice, Quota};
use ringmail_store::mailcache::MailCache;
use ringmail_store::{Handle, Kind, LogError};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A message to put into a user's INBOX: the entry refers to a message already
/// stored (on any shard), whose reference the deliverer took for the entry.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub user: u64,
    /// The stored message's handle id.
    pub message: u64,
    /// RFC822.SIZE as served (per-entry prefix included).
    pub size: u32,
    pub internal_date: i64,
    /// `mime::Meta`, encoded (goes to the cache file).
    pub meta: Vec<u8>,
    /// When the message was received, for the delivery latency figures.
    pub received_at_ms: u64,
    /// This delivery may have been made before without the deliverer learning it
    /// (a crash between the entry being durable and the recipient being recorded
    /// delivered, or an answer lost): an entry of the user that refers to the same
    /// message then stands for it, instead of a second one.
    pub maybe_done: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverError {
    /// The user is over quota (a temporary failure: 452 4.2.2).
    OverQuota,
    /// No such user any more (deleted since RCPT: 550 5.1.1).
    NoUser,
    /// The mailbox store failed (temporary).
    Store(String),
}

/// What a change did (read off it before it was applied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Done {
    /// UIDs of the new entries (APPENDUID, COPYUID).
    pub new_uids: Vec<u32>,
    /// The source UIDs of a copy or move; an expunge's; a STORE's changed ones.
    pub source_uids: Vec<u32>,
    /// UIDs an UNCHANGEDSINCE STORE left alone (MODIFIED).
    pub modified: Vec<u32>,
    pub uidvalidity: u32,
    pub mailbox: u32,
    pub modseq: Option<u64>,
}

impl Done {
    fn of(c: &Change) -> Done {
        Done {
            new_uids: c.new_uids().to_vec(),
            source_uids: c.source_uids().to_vec(),
            modified: c.modified().to_vec(),
            uidvalidity: c.uidvalidity(),
            mailbox: c.mailbox(),
            modseq: c.modseq(),
        }
    }
}

/// Why a change was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// The index refused it (the request was wrong, or a rule said no).
    Refused(MailError),
    /// The log failed; nothing changed.
    Store(String),
}

/// A subscription: (executor, its id there).
type Subscriber = (usize, u64);

pub struct Home {
    shard: u32,
    spool: Rc<Spool>,
    index: Rc<RefCell<MailIndex>>,
    cache: MailCache,
    store: StoreService,
    svc: MailService,
    directory: Arc<DirectoryCell>,
    /// Subscribers per (user, mailbox): (executor, subscription id).
    subs: RefCell<HashMap<(u64, u32), Vec<Subscriber>>>,
    latency: Rc<RefCell<Latency>>,
    /// Users whose maildrop a POP3 session holds (RFC 1939's exclusive lock; in
    /// memory: a restart ends every session anyway).
    maildrops: RefCell<std::collections::HashSet<u64>>,
}

impl Home {
    pub fn new(
        spool: Rc<Spool>,
        index: Rc<RefCell<MailIndex>>,
        cache: MailCache,
        store: StoreService,
        svc: MailService,
        directory: Arc<DirectoryCell>,
        latency: Rc<RefCell<Latency>>,
    ) -> Home {
        Home {
            shard: spool.shard,
            spool,
            index,
            cache,
            store,
            svc,
            directory,
            subs: RefCell::new(HashMap::new()),
            latency,
            maildrops: RefCell::default(),
        }
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// The index, to read (never hold the borrow across an await).
    pub fn index(&self) -> std::cell::Ref<'_, MailIndex> {
        self.index.borrow()
    }

    pub fn cache(&self) -> &MailCache {
        &self.cache
    }

    /// Makes one change: `begin` checks it against the index and reserves its UIDs
    /// and modseq; its record is appended (at once: records go to the log in the
    /// order changes begin) and made durable; then it is applied (the index applies a
    /// user's changes in the order they began, so a commit may apply others held
    /// back by this one, and this one may be applied by a later commit), the
    /// references given up are dropped and the subscribers told. On a failure
    /// nothing of it is applied and the references it took are given back.
    pub async fn change(
        self: &Rc<Self>,
        begin: impl FnOnce(&mut MailIndex) -> Result<Change, MailError>,
    ) -> Result<Done, ChangeError> {
        let change = begin(&mut self.index.borrow_mut()).map_err(ChangeError::Refused)?;
        let done = Done::of(&change);
        if change.is_noop() {
            let c = self.index.borrow_mut().commit(change);
            self.finish(c);
            return Ok(done);
        }
        // References for entries the change adds that refer to messages already
        // referenced (copies): taken now, before a concurrent expunge of the source
        // can drop the last one.
        let added: Vec<u64> = change.add_refs().to_vec();
        for id in &added {
            self.add_ref(*id);
        }
        let appended = self
            .spool
            .store()
            .append(Kind::Mail, |out| change.encode(out));
        let ticket = match appended {
            Ok(t) => t,
            Err(e) => return Err(self.undo(change, &added, e)),
        };
        // The rest in a task of its own: a caller that gives up (a session gone)
        // must not leave the change neither committed nor aborted, or the user's
        // later changes would wait for it forever.
        let me = self.clone();
        glommio::spawn_local(async move {
            if let Err(e) = me.spool.store().durable(&ticket).await {
                return Err(me.undo(change, &added, e));
            }
            let c = me.index.borrow_mut().commit(change);
            // Held until applied: a snapshot taken meanwhile replays from before it.
            drop(ticket);
            me.finish(c);
            Ok(done)
        })
        .detach()
        .await
        .unwrap_or_else(|| Err(ChangeError::Store("the executor is stopping".into())))
    }

    /// After changes were applied: their references go, usage figures and
    /// subscribers learn of them.
    fn finish(&self, c: Committed) {
        for id in &c.drop_refs {
            self.drop_ref(*id);
        }
        let mut users: Vec<u64> = c.notices.iter().map(|n| n.user).collect();
        users.dedup();
        for u in users {
            self.publish_usage(u);
        }
        self.notify(&c.notices);
    }

    fn undo(&self, change: Change, added: &[u64], e: LogError) -> ChangeError {
        let c = self.index.borrow_mut().abort(change);
        for id in added {
            self.drop_ref(*id);
        }
        self.finish(c);
        ChangeError::Store(e.to_string())
    }

    /// Takes `user`'s maildrop lock; false when another session holds it.
    pub fn lock_maildrop(&self, user: u64) -> bool {
        self.maildrops.borrow_mut().insert(user)
    }

    pub fn unlock_maildrop(&self, user: u64) {
        self.maildrops.borrow_mut().remove(&user);
    }

    /// Creates what a first login needs (INBOX and the special-use mailboxes,
    /// docs/mailboxes.md), if anything is missing.
    pub async fn ensure_defaults(self: &Rc<Self>, user: u64) -> Result<(), ChangeError> {
        let begun = self
            .index
            .borrow_mut()
            .begin_ensure_defaults(user)
            .map_err(ChangeError::Refused)?;
        match begun {
            None => Ok(()),
            // Appended at once by `change`: nothing awaits between begin and append.
            Some(c) => self.change(move |_| Ok(c)).await.map(|_| ()),
        }
    }

    /// Puts a delivered message into the user's INBOX; its UID.
    pub async fn deliver(self: &Rc<Self>, d: Delivery) -> Result<u32, DeliverError> {
        let quota = {
            let dir = self.directory.load();
            let Some(u) = dir.user_by_id(d.user) else {
                return Err(DeliverError::NoUser);
            };
            Quota {
                bytes: u.quota.bytes,
                messages: u.quota.messages,
            }
        };
        if d.maybe_done {
            if let Some(uid) = self.delivered(d.user, d.message) {
                tracing::info!(
                    shard = self.shard,
                    user = d.user,
                    uid,
                    "delivered before: not again"
                );
                // The reference the deliverer took for the entry is not needed: the
                // entry there holds its own. (Its add was applied before this drop:
                // one FIFO from the deliverer's executor, or this one.)
                self.drop_ref(d.message);
                return Ok(uid);
            }
        }
        // Derived data: without it the frontends parse the message again.
        let cache = self.cache.append(d.message, &d.meta).unwrap_or(u64::MAX);
        let entry = NewEntry {
            message: d.message,
            size: d.size,
            internal_date: d.internal_date,
            flags: 0,
            keywords: Vec::new(),
            cache,
        };
        let user = d.user;
        let done = self
            .change(|ix| ix.begin_append(user, "INBOX", entry, quota))
            .await
            .map_err(|e| match e {
                ChangeError::Refused(MailError::OverQuota) => DeliverError::OverQuota,
                ChangeError::Refused(e) => DeliverError::Store(format!("{e:?}")),
                ChangeError::Store(e) => DeliverError::Store(e),
            })?;
        self.latency
            .borrow_mut()
            .record(super::now_ms().saturating_sub(d.received_at_ms));
        Ok(done.new_uids.first().copied().unwrap_or(0))
    }

    /// The UID of an entry of `user` (in any mailbox: it may have been moved since)
    /// that refers to stored message `message`.
    fn delivered(&self, user: u64, message: u64) -> Option<u32> {
        let index = self.index.borrow();
        // Newest first, INBOX first: a delivery made before is almost always among
        // the last entries of INBOX.
        let find = |m: &ringmail_store::mailbox::Mailbox| {
            m.entries()
                .iter()
                .rev()
                .find(|e| e.message() == message)
                .map(|e| e.uid())
        };
        let inbox = index.mailbox(user, "INBOX");
        inbox.and_then(find).or_else(|| {
            index
                .mailboxes(user)
                .into_iter()
                .filter(|m| Some(m.id()) != inbox.map(|i| i.id()))
                .find_map(find)
        })
    }

    /// Drops the mailboxes of users the directory no longer has (deleted while
    /// their home was down, or just now).
    pub async fn drop_orphans(self: &Rc<Self>) {
        let orphans: Vec<u64> = {
            let dir = self.directory.load();
            self.index
                .borrow()
                .users()
                .filter(|u| dir.user_by_id(*u).is_none())
                .collect()
        };
        for user in orphans {
            match self.change(|ix| ix.begin_drop_account(user)).await {
                Ok(_) => tracing::info!(
                    shard = self.shard,
                    user,
                    "dropped the mailboxes of a deleted account"
                ),
                Err(e) => {
                    tracing::warn!(shard = self.shard, user, error = ?e, "cannot drop the mailboxes of a deleted account")
                }
            }
        }
    }

    /// Publishes every user's usage figures (at start: the RCPT quota check reads
    /// them).
    pub fn publish_all_usage(&self) {
        let users: Vec<u64> = self.index.borrow().users().collect();
        for u in users {
            self.publish_usage(u);
        }
    }

    fn publish_usage(&self, user: u64) {
        let usage = self.index.borrow().usage(user);
        if let Some(u) = self.directory.load().user_by_id(user) {
            u.usage.bytes.store(usage.bytes, Ordering::Relaxed);
            u.usage.messages.store(usage.messages, Ordering::Relaxed);
        }
    }

    /// One more reference to a stored message, wherever it is (the store service
    /// applies it here or sends it to the message's owner).
    fn add_ref(&self, id: u64) {
        self.store.add_ref(Handle::of_id(id));
    }

    fn drop_ref(&self, id: u64) {
        self.store.drop_ref(Handle::of_id(id));
    }

    pub(super) fn subscribe(&self, user: u64, mailbox: u32, peer: usize, sub: u64) {
        self.subs
            .borrow_mut()
            .entry((user, mailbox))
            .or_default()
            .push((peer, sub));
    }

    pub(super) fn unsubscribe(&self, user: u64, mailbox: u32, peer: usize, sub: u64) {
        let mut subs = self.subs.borrow_mut();
        if let Some(v) = subs.get_mut(&(user, mailbox)) {
            v.retain(|s| *s != (peer, sub));
            if v.is_empty() {
                subs.remove(&(user, mailbox));
            }
        }
    }

    /// The subscribers of (user, mailbox), for tests.
    #[cfg(test)]
    pub(super) fn subscribers(&self, user: u64, mailbox: u32) -> Vec<(usize, u64)> {
        self.subs
            .borrow()
            .get(&(user, mailbox))
            .cloned()
            .unwrap_or_default()
    }

    fn notify(&self, notices: &[Notice]) {
        let subs = self.subs.borrow();
        if subs.is_empty() {
            return;
        }
        let mut by_sub: HashMap<(usize, u64), Vec<Notice>> = HashMap::new();
        for n in notices {
            if let Some(v) = subs.get(&(n.user, n.mailbox)) {
                for s in v {
                    by_sub.entry(*s).or_default().push(n.clone());
                }
            }
        }
        drop(subs);
        for ((peer, sub), notices) in by_sub {
            self.svc.notify(peer, sub, notices);
        }
    }
}
