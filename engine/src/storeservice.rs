//! Reads of any shard's messages from any executor.
//!
//! A shard's handle map and pins live on the executor that owns the shard, and no lock
//! is shared between cores: an executor that wants a message of a shard it does not
//! own asks the owner over glommio's channel mesh (one bounded single-producer,
//! single-consumer channel per ordered pair of executors). The protocol:
//!
//! 1. reader -> owner `Resolve(req, handle)`; the owner resolves the handle and pins the
//!    segment it names in one step (no await between, so its compaction cannot slip in)
//!    and answers `Answer(req, Option<Resolved>)`;
//! 2. the reader reads the bytes itself, through its own executor's
//!    [`SegmentFiles`] (sealed segments are immutable; a resolved record is durable);
//! 3. reader -> owner `Unpin(shard, seq)` when the [`Reading`] is dropped, however it
//!    is dropped (a task cancelled mid-read included). A reader that gives up while
//!    its `Resolve` is in flight sends the `Unpin` when the answer arrives.
//!
//! An owner that deletes a segment tells every executor (`Deleted(shard, seq)`), so
//! their caches close the file and its disk space is freed. Reads of a shard owned by
//! the reader's own executor skip the channels (a [`LocalPin`]).
//!
//! References across shards (docs/mailboxes.md, "Message handles and references
//! across shards") go over the same channels: a shard's count of references to its
//! messages includes those other shards' indexes hold, which are never logged.
//!
//! - At start every executor opens its shards, then hands the references they
//!   recovered to other shards' messages to [`StoreService::exchange_refs`]: those
//!   for shards owned here are applied at once, the others posted to their owners
//!   (`Refs`), then `RefsDone` to every peer. An owner settles its shards
//!   ([`Owner::settle`]: what nobody refers to becomes garbage, compaction may run)
//!   once it exchanged its own and every peer said done ([`StoreService::settled`]).
//!   Peers open their shards at different speeds: references for a shard not open
//!   yet are held and applied when it is ([`StoreService::add_owner`]).
//! - At run time [`StoreService::add_ref`] and [`StoreService::drop_ref`] apply to a
//!   shard of this executor directly and go to another owner through the per-peer
//!   outbox, which is FIFO: an add sent before a drop of the same handle is applied
//!   first. Consecutive references of one kind to one peer share a `Refs` message
//!   (up to [`REFS_PER_MSG`]), so a million foreign references at start are
//!   150 000 channel sends, not a million.
//!
//! Nothing here waits on a send while handling a received message: answers and unpins
//! go to a per-peer outbox drained by a task of their own, so two executors answering
//! each other with full channels cannot deadlock, and a pin can be released from a
//! destructor (which cannot await).

use event_listener::{Event, EventListener};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::channels::shared_channel::ConnectedReceiver;
use ringmail_store::reader::{Pieces, SegmentFiles, OPEN_SEGMENTS_MAX};
use ringmail_store::{Handle, LocalPin, Owner, Resolved, SharedBuf};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::ops::Range;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

/// What executors send each other.
#[derive(Debug, Clone, Copy)]
pub enum Msg {
    /// Resolve `handle` and pin its segment; answer with `Answer { req, .. }`.
    Resolve { req: u64, handle: Handle },
    /// The answer to `Resolve { req, .. }`: the segment is pinned when `found` is some.
    Answer { req: u64, found: Option<Resolved> },
    /// The answer to `Resolve { req, .. }` when the shard is not open on its owner
    /// (still recovering, or closed): an error for the reader, not "no such message".
    NotOpen { req: u64, shard: u32 },
    /// Lets go of one pin taken by a `Resolve`.
    Unpin { shard: u32, seq: u64 },
    /// The owner deleted the segment: close it if it is open.
    Deleted { shard: u32, seq: u64 },
    /// References taken (`add`) or given up on the first `n` of `ids`, messages of
    /// shards the receiver owns, to be applied in this order.
    Refs {
        add: bool,
        n: u8,
        ids: [u64; REFS_PER_MSG],
    },
    /// The sender has sent every reference its shards recovered to the receiver's
    /// messages.
    RefsDone,
}

/// References one `Refs` message carries: as many as fit in the room the largest
/// message (`Answer`) takes anyway.
pub const REFS_PER_MSG: usize = 7;

/// The mesh every executor joins (one per server, built before the executors start).
pub type Mesh = MeshBuilder<Msg, Full>;

/// Slots per channel: requests of one executor to another in flight before a sender
/// waits. Senders wait in their own task, never a reader or a handler, and the
/// outboxes absorb bursts, so a few slots do: glommio allocates every slot of the
/// N·(N−1) channels up front, which at 1024 slots would cost hundreds of MiB on a
/// machine with tens of cores.
const CHANNEL_SLOTS: usize = 32;

/// How often an executor looks for deleted segments its cache still holds open (a
/// backstop for deletions not announced with [`StoreService::segment_deleted`]).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub fn mesh(executors: usize) -> Mesh {
    MeshBuilder::full(executors, CHANNEL_SLOTS)
}

/// A `Resolve` sent and not answered yet.
struct Waiting {
    answer: RefCell<Option<io::Result<Option<Resolved>>>>,
    /// The reader gave up: unpin whatever the answer pins.
    abandoned: Cell<bool>,
    event: Event,
}

struct Peer {
    outbox: RefCell<VecDeque<Msg>>,
    wake: Event,
    /// Its channels are closed (it shut down): nothing sent to it arrives.
    gone: Cell<bool>,
    /// Our sender to it has stopped (we closed, or it is gone): nothing posted to it
    /// would leave the outbox.
    stopped: Cell<bool>,
}

struct Inner {
    peer: usize,
    peers: Vec<Peer>,
    owners: RefCell<HashMap<u32, Rc<dyn Owner>>>,
    /// Pins of shards owned here that each peer holds: (peer, shard, seq) -> count.
    /// A peer that goes away with pins still held (its readers outlived its channels)
    /// gets them released here, else the segments could never be deleted.
    remote_pins: RefCell<HashMap<(usize, u32, u64), u32>>,
    pending: RefCell<HashMap<u64, (usize, Rc<Waiting>)>>,
    next_req: Cell<u64>,
    files: SegmentFiles,
    unpinned: Event,
    forgotten: Event,
    closed: Cell<bool>,
    stopped: Event,
    senders_running: Cell<usize>,
    served: Cell<u64>,
    sent: Cell<u64>,
    /// References for shards owned here that are not open yet: (add, id), in the
    /// order they came, applied by `add_owner`.
    held_refs: RefCell<HashMap<u32, Vec<(bool, u64)>>>,
    /// Peers that sent `RefsDone`.
    refs_done: RefCell<Vec<bool>>,
    /// This executor's own shards' foreign references are exchanged.
    exchanged: Cell<bool>,
    settled: Cell<bool>,
    /// Fires when references from a peer were applied or held, at `RefsDone`, and
    /// when this executor settles.
    refs_event: Event,
    /// References applied or held that came from peers, for tests and statistics.
    refs_received: Cell<u64>,
    /// Added references whose message is not stored: a damaged shard, reported
    /// when it settles.
    refs_to_nothing: Cell<u64>,
}

/// One executor's end of the cross-core read protocol (see the module comment).
/// Executor-local; cheap to clone.
#[derive(Clone)]
pub struct StoreService(Rc<Inner>);

impl StoreService {
    /// Joins the mesh (waits until every executor has) and starts this executor's
    /// tasks. `data` is the data directory whose shards are read; up to
    /// `record_cache_bytes` of recently read records are kept in memory
    /// (`SegmentFiles::with_record_cache`).
    pub async fn join(
        mesh: Mesh,
        data: &Path,
        record_cache_bytes: usize,
    ) -> Result<StoreService, String> {
        let (senders, mut receivers) = mesh
            .join()
            .await
            .map_err(|e| format!("cannot join the executors' channel mesh: {e}"))?;
        let peers = senders.nr_consumers();
        let inner = Rc::new(Inner {
            peer: senders.peer_id(),
            peers: (0..peers)
                .map(|_| Peer {
                    outbox: RefCell::new(VecDeque::new()),
                    wake: Event::new(),
                    gone: Cell::new(false),
                    stopped: Cell::new(false),
                })
                .collect(),
            owners: RefCell::new(HashMap::new()),
            remote_pins: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            next_req: Cell::new(0),
            files: SegmentFiles::new(data, OPEN_SEGMENTS_MAX).with_record_cache(record_cache_bytes),
            unpinned: Event::new(),
            forgotten: Event::new(),
            closed: Cell::new(false),
            stopped: Event::new(),
            senders_running: Cell::new(peers.saturating_sub(1)),
            served: Cell::new(0),
            sent: Cell::new(0),
            held_refs: RefCell::new(HashMap::new()),
            refs_done: RefCell::new(vec![false; peers]),
            exchanged: Cell::new(false),
            settled: Cell::new(false),
            refs_event: Event::new(),
            refs_received: Cell::new(0),
            refs_to_nothing: Cell::new(0),
        });
        let senders = Rc::new(senders);
        for p in (0..peers).filter(|p| *p != inner.peer) {
            glommio::spawn_local(send_loop(inner.clone(), senders.clone(), p)).detach();
        }
        for (p, rx) in receivers.streams() {
            glommio::spawn_local(receive_loop(inner.clone(), p, rx)).detach();
        }
        let weak = Rc::downgrade(&inner);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(SWEEP_EVERY).await;
                match weak.upgrade() {
                    Some(inner) if !inner.closed.get() => {
                        inner.files.sweep();
                    }
                    _ => return,
                }
            }
        })
        .detach();
        Ok(StoreService(inner))
    }

    /// This executor's place in the mesh. Shard `k` is owned by executor
    /// `k % executors` (see [`StoreService::owner_of`]); the runtime assigns shards by
    /// this index.
    pub fn peer(&self) -> usize {
        self.0.peer
    }

    pub fn executors(&self) -> usize {
        self.0.peers.len()
    }

    /// The executor that owns `shard`.
    pub fn owner_of(&self, shard: u32) -> usize {
        shard as usize % self.0.peers.len()
    }

    /// Registers a shard this executor owns: other executors' requests for it are
    /// answered by `owner`, and the references that came for it before it was open
    /// are applied now.
    pub fn add_owner(&self, shard: u32, owner: Rc<dyn Owner>) {
        debug_assert_eq!(
            self.owner_of(shard),
            self.0.peer,
            "shard {shard} is not ours"
        );
        self.0.owners.borrow_mut().insert(shard, owner.clone());
        let held = self.0.held_refs.borrow_mut().remove(&shard);
        for (add, id) in held.into_iter().flatten() {
            self.0.apply_ref(add, id);
        }
        if self.0.settled.get() {
            // Every reference to it is here already: every peer said done, and ours
            // were exchanged (held, had it not been open).
            owner.settle();
        }
    }

    /// One more reference to `handle`'s message, held by an index of this
    /// executor's. Applied now when this executor owns the shard, else sent to its
    /// owner ahead of anything posted to it later. Only after
    /// [`StoreService::exchange_refs`]: a drop before it could reach an owner that
    /// has not counted the reference it gives up.
    pub fn add_ref(&self, handle: Handle) {
        self.0.route_ref(true, handle);
    }

    /// Gives up a reference to `handle`'s message (see [`StoreService::add_ref`]).
    pub fn drop_ref(&self, handle: Handle) {
        self.0.route_ref(false, handle);
    }

    /// Hands the owners the references this executor's shards recovered to other
    /// shards' messages (target shard -> ids, see `Shard::take_foreign`), then tells
    /// every peer it is done. Called once, after every shard of this executor is
    /// open (`add_owner`).
    pub fn exchange_refs(&self, foreign: HashMap<u32, Vec<u64>>) {
        let inner = &self.0;
        assert!(!inner.exchanged.get(), "foreign references exchanged twice");
        for (shard, ids) in foreign {
            for id in ids {
                debug_assert_eq!(Handle::of_id(id).shard, shard);
                inner.route_ref(true, Handle::of_id(id));
            }
        }
        for p in (0..inner.peers.len()).filter(|p| *p != inner.peer) {
            inner.post(p, Msg::RefsDone);
        }
        inner.exchanged.set(true);
        inner.maybe_settle();
    }

    /// Whether this executor's shards are settled (see the module comment).
    pub fn is_settled(&self) -> bool {
        self.0.settled.get()
    }

    /// Resolves once this executor's shards are settled: it exchanged its foreign
    /// references and every peer said done. Never, if a peer goes away before.
    pub async fn settled(&self) {
        loop {
            let listener = self.0.refs_event.listen();
            if self.0.settled.get() {
                return;
            }
            listener.await;
        }
    }

    /// References that came from peers (applied, or held for a shard not open yet).
    pub fn refs_received(&self) -> u64 {
        self.0.refs_received.get()
    }

    /// Fires when references from a peer arrived, a peer said done, or this
    /// executor settled.
    pub fn refs_changed(&self) -> EventListener {
        self.0.refs_event.listen()
    }

    /// References held for shards of this executor that are not open yet, for tests.
    #[cfg(test)]
    fn held_refs(&self) -> usize {
        self.0.held_refs.borrow().values().map(Vec::len).sum()
    }

    /// Peers that said done, for tests.
    #[cfg(test)]
    fn peers_done(&self) -> usize {
        self.0.refs_done.borrow().iter().filter(|d| **d).count()
    }

    /// This executor's open segment files.
    pub fn files(&self) -> &SegmentFiles {
        &self.0.files
    }

    /// Resolves `handle` and pins its segment until the returned [`Reading`] is
    /// dropped; `None` when the message does not exist (any more). An error when the
    /// owning executor is gone (shutting down).
    pub async fn open(&self, handle: Handle) -> io::Result<Option<Reading>> {
        let owner = self.owner_of(handle.shard);
        if owner == self.0.peer {
            let local = self.0.owners.borrow().get(&handle.shard).cloned();
            let Some(local) = local else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("shard {} is not open on its executor", handle.shard),
                ));
            };
            return Ok(
                LocalPin::resolve(local, handle.id).map(|(resolved, pin)| Reading {
                    resolved,
                    pin: Hold::Local(Some(pin)),
                    service: self.clone(),
                }),
            );
        }
        let inner = &self.0;
        if inner.closed.get() || inner.peers[owner].gone.get() {
            return Err(owner_gone(owner));
        }
        let req = inner.next_req.get();
        inner.next_req.set(req + 1);
        let waiting = Rc::new(Waiting {
            answer: RefCell::new(None),
            abandoned: Cell::new(false),
            event: Event::new(),
        });
        inner
            .pending
            .borrow_mut()
            .insert(req, (owner, waiting.clone()));
        inner.post(owner, Msg::Resolve { req, handle });
        // From here on a drop of this future must not leak the pin the answer brings.
        let mut guard = AbandonOnDrop {
            inner: &self.0,
            owner,
            waiting: &waiting,
            armed: true,
        };
        let answer = loop {
            let listener = waiting.event.listen();
            let answer = waiting.answer.borrow_mut().take();
            if let Some(a) = answer {
                break a;
            }
            listener.await;
        };
        guard.armed = false;
        Ok(answer?.map(|resolved| Reading {
            resolved,
            pin: Hold::Remote {
                owner,
                shard: resolved.handle.shard,
                seq: resolved.seq,
            },
            service: self.clone(),
        }))
    }

    /// Tells every executor that `shard`'s segment `seq` was deleted, so that none
    /// keeps it open (an open file keeps its disk space). The owner calls it after the
    /// unlink.
    pub fn segment_deleted(&self, shard: u32, seq: u64) {
        self.0.files.forget(shard, seq);
        for p in (0..self.0.peers.len()).filter(|p| *p != self.0.peer) {
            self.0.post(p, Msg::Deleted { shard, seq });
        }
    }

    /// Fires whenever a pin of a shard owned here is released (compaction waiting to
    /// delete a pinned segment listens, then checks [`ringmail_store::Pins`] again).
    pub fn unpinned(&self) -> EventListener {
        self.0.unpinned.listen()
    }

    /// Requests answered for other executors, for tests and statistics.
    pub fn served(&self) -> u64 {
        self.0.served.get()
    }

    /// Messages sent to other executors, for tests and statistics.
    pub fn sent(&self) -> u64 {
        self.0.sent.get()
    }

    /// Messages waiting in this executor's outboxes, for tests.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.0.peers.iter().map(|p| p.outbox.borrow().len()).sum()
    }

    /// Fires when a `Deleted` from another executor was applied to the cache.
    pub fn forgotten(&self) -> EventListener {
        self.0.forgotten.listen()
    }

    /// Sends what is still queued (unpins above all), then closes this executor's
    /// channels; the peers' readers waiting on it get an error. Reads of local shards
    /// keep working; remote ones fail.
    pub async fn close(&self) {
        self.0.closed.set(true);
        for p in &self.0.peers {
            p.wake.notify(usize::MAX);
        }
        loop {
            let listener = self.0.stopped.listen();
            if self.0.senders_running.get() == 0 {
                return;
            }
            listener.await;
        }
    }
}

impl Inner {
    /// A reference taken or given up by this executor: applied here if it owns the
    /// shard, else queued for the owner.
    fn route_ref(&self, add: bool, handle: Handle) {
        debug_assert_eq!(Handle::of_id(handle.id), handle);
        let owner = handle.shard as usize % self.peers.len();
        if owner == self.peer {
            self.apply_ref(add, handle.id);
        } else {
            self.post_ref(owner, add, handle.id);
        }
    }

    /// Queues a reference for `peer`, in the last `Refs` of its outbox if that is of
    /// the same kind and has room: nothing was queued after it, so order holds.
    fn post_ref(&self, peer: usize, add: bool, id: u64) {
        let p = &self.peers[peer];
        if p.gone.get() || p.stopped.get() {
            return;
        }
        if let Some(Msg::Refs { add: a, n, ids }) = p.outbox.borrow_mut().back_mut() {
            if *a == add && (*n as usize) < REFS_PER_MSG {
                ids[*n as usize] = id;
                *n += 1;
                return;
            }
        }
        let mut ids = [0; REFS_PER_MSG];
        ids[0] = id;
        self.post(peer, Msg::Refs { add, n: 1, ids });
    }

    /// Applies a reference to a message of a shard owned here, or holds it until
    /// the shard is open.
    fn apply_ref(&self, add: bool, id: u64) {
        let shard = Handle::of_id(id).shard;
        let owner = self.owners.borrow().get(&shard).cloned();
        match owner {
            Some(o) if add => {
                if !o.add_ref(id) {
                    self.refs_to_nothing.set(self.refs_to_nothing.get() + 1);
                }
            }
            Some(o) => {
                o.drop_ref(id);
            }
            None => self
                .held_refs
                .borrow_mut()
                .entry(shard)
                .or_default()
                .push((add, id)),
        }
    }

    /// Settles every shard owned here once this executor exchanged its references
    /// and every peer said done.
    fn maybe_settle(&self) {
        if self.settled.get() || !self.exchanged.get() {
            return;
        }
        let all_done = self
            .refs_done
            .borrow()
            .iter()
            .enumerate()
            .all(|(p, done)| *done || p == self.peer);
        if !all_done {
            return;
        }
        self.settled.set(true);
        let owners: Vec<(u32, Rc<dyn Owner>)> = self
            .owners
            .borrow()
            .iter()
            .map(|(k, o)| (*k, o.clone()))
            .collect();
        for (_, o) in &owners {
            o.settle();
        }
        let lost = self.refs_to_nothing.get();
        if lost > 0 {
            tracing::warn!(
                executor = self.peer,
                references = lost,
                "references from other shards to messages whose records are gone"
            );
        }
        let unopened: Vec<u32> = self.held_refs.borrow().keys().copied().collect();
        if !unopened.is_empty() {
            tracing::warn!(executor = self.peer, shards = ?unopened, "references held for shards that are not open");
        }
        tracing::info!(
            executor = self.peer,
            shards = owners.len(),
            "references across shards settled"
        );
        self.refs_event.notify(usize::MAX);
    }

    fn post(&self, peer: usize, msg: Msg) {
        let p = &self.peers[peer];
        if p.gone.get() || p.stopped.get() {
            // Nothing would carry it. An unpin is not lost: the owner releases the
            // pins of a peer whose channels closed (`Inner::peer_gone`).
            return;
        }
        p.outbox.borrow_mut().push_back(msg);
        p.wake.notify(1);
    }

    /// Handles one message from executor `from`. Never waits.
    fn handle(&self, from: usize, msg: Msg) {
        match msg {
            Msg::Resolve { req, handle } => {
                let owner = self.owners.borrow().get(&handle.shard).cloned();
                let Some(owner) = owner else {
                    self.served.set(self.served.get() + 1);
                    let shard = handle.shard;
                    self.post(from, Msg::NotOpen { req, shard });
                    return;
                };
                self.served.set(self.served.get() + 1);
                let peer = &self.peers[from];
                if peer.gone.get() || peer.stopped.get() {
                    // No answer can reach it, so no pin: its request fails when it
                    // sees our channels close.
                    return;
                }
                let found = owner.resolve(handle.id).inspect(|r| {
                    owner.pins().pin(r.seq);
                    *self
                        .remote_pins
                        .borrow_mut()
                        .entry((from, r.handle.shard, r.seq))
                        .or_default() += 1;
                });
                self.post(from, Msg::Answer { req, found });
            }
            Msg::Answer { req, found } => {
                let entry = self.pending.borrow_mut().remove(&req);
                match entry {
                    Some((_, w)) if !w.abandoned.get() => {
                        *w.answer.borrow_mut() = Some(Ok(found));
                        w.event.notify(usize::MAX);
                    }
                    _ => {
                        if let Some(r) = found {
                            self.post(
                                from,
                                Msg::Unpin {
                                    shard: r.handle.shard,
                                    seq: r.seq,
                                },
                            );
                        }
                    }
                }
            }
            Msg::NotOpen { req, shard } => {
                let entry = self.pending.borrow_mut().remove(&req);
                if let Some((_, w)) = entry {
                    *w.answer.borrow_mut() = Some(Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("shard {shard} is not open on its executor"),
                    )));
                    w.event.notify(usize::MAX);
                }
            }
            Msg::Unpin { shard, seq } => self.unpin_for(from, shard, seq),
            Msg::Deleted { shard, seq } => {
                self.files.forget(shard, seq);
                self.forgotten.notify(usize::MAX);
            }
            Msg::Refs { add, n, ids } => {
                let ids = &ids[..(n as usize).min(REFS_PER_MSG)];
                for &id in ids {
                    if Handle::of_id(id).shard as usize % self.peers.len() == self.peer {
                        self.apply_ref(add, id);
                    } else {
                        debug_assert!(false, "a reference to {id:X} sent to the wrong owner");
                    }
                }
                self.refs_received
                    .set(self.refs_received.get() + ids.len() as u64);
                self.refs_event.notify(usize::MAX);
            }
            Msg::RefsDone => {
                self.refs_done.borrow_mut()[from] = true;
                self.refs_event.notify(usize::MAX);
                self.maybe_settle();
            }
        }
    }

    /// Releases one pin that `peer` holds, if it still holds it (a peer's pins are
    /// released wholesale when it goes away, and an unpin may arrive after that).
    fn unpin_for(&self, peer: usize, shard: u32, seq: u64) {
        {
            let mut held = self.remote_pins.borrow_mut();
            let key = (peer, shard, seq);
            match held.get_mut(&key) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    held.remove(&key);
                }
                None => return,
            }
        }
        self.unpin(shard, seq, 1);
    }

    fn unpin(&self, shard: u32, seq: u64, n: u32) {
        if let Some(o) = self.owners.borrow().get(&shard) {
            for _ in 0..n {
                o.pins().unpin(seq);
            }
        }
        self.unpinned.notify(usize::MAX);
    }

    /// Executor `peer` closed its channels: whatever was sent to it is lost, and
    /// nothing it was asked will be answered.
    fn peer_gone(&self, peer: usize) {
        let p = &self.peers[peer];
        p.gone.set(true);
        // Answers still queued for it are lost with it; so are the readers holding
        // the pins it was sent: release them all.
        p.outbox.borrow_mut().clear();
        let held: Vec<((usize, u32, u64), u32)> = {
            let mut held = self.remote_pins.borrow_mut();
            let keys: Vec<_> = held.keys().filter(|k| k.0 == peer).copied().collect();
            keys.into_iter()
                .map(|k| (k, held.remove(&k).expect("present")))
                .collect()
        };
        for ((_, shard, seq), n) in held {
            self.unpin(shard, seq, n);
        }
        let failed: Vec<Rc<Waiting>> = {
            let mut pending = self.pending.borrow_mut();
            let reqs: Vec<u64> = pending
                .iter()
                .filter(|(_, (p, _))| *p == peer)
                .map(|(r, _)| *r)
                .collect();
            reqs.iter()
                .filter_map(|r| pending.remove(r))
                .map(|(_, w)| w)
                .collect()
        };
        for w in failed {
            *w.answer.borrow_mut() = Some(Err(owner_gone(peer)));
            w.event.notify(usize::MAX);
        }
    }

    /// An answer that never reached its reader holds a pin here: release it.
    fn release_lost(&self, peer: usize, lost: Msg) {
        if let Msg::Answer { found: Some(r), .. } = lost {
            self.unpin_for(peer, r.handle.shard, r.seq);
        }
    }
}

fn owner_gone(peer: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        format!("executor {peer}, which owns the shard, is shutting down"),
    )
}

async fn send_loop(inner: Rc<Inner>, senders: Rc<Senders<Msg>>, peer: usize) {
    loop {
        let listener = inner.peers[peer].wake.listen();
        loop {
            let next = inner.peers[peer].outbox.borrow_mut().pop_front();
            let Some(msg) = next else { break };
            if send(&senders, peer, msg).await.is_err() {
                inner.release_lost(peer, msg);
                inner.peer_gone(peer);
                break;
            }
            inner.sent.set(inner.sent.get() + 1);
        }
        if inner.closed.get() || inner.peers[peer].gone.get() {
            break;
        }
        listener.await;
    }
    inner.peers[peer].stopped.set(true);
    inner.peers[peer].outbox.borrow_mut().clear();
    inner.senders_running.set(inner.senders_running.get() - 1);
    if inner.senders_running.get() == 0 {
        // Every outbox is drained: the peers' receivers may end now.
        senders.close();
    }
    inner.stopped.notify(usize::MAX);
}

/// How long a send waits for room before it looks again whether the receiver is
/// still there.
const SEND_RECHECK: Duration = Duration::from_millis(50);

/// Sends `msg` to `peer`, waiting for room; an error when the peer's receiver is
/// gone. glommio's own `send` waits for room only, and a receiver that went away
/// with the channel full never makes room: that send would never end (and `close`
/// with it). So: try, and while the channel is full wait for room, looking again at
/// least every [`SEND_RECHECK`] whether the receiver went away.
async fn send(senders: &Senders<Msg>, peer: usize, msg: Msg) -> Result<(), ()> {
    loop {
        match senders.try_send_to(peer, msg) {
            Ok(()) => return Ok(()),
            Err(glommio::GlommioError::WouldBlock(_)) => {}
            Err(_) => return Err(()),
        }
        // `send_to` either sends in the poll that finds room, or sends nothing, so
        // giving up on it loses nothing (and `msg` is `Copy`).
        let room = futures_lite::future::or(
            async { Some(senders.send_to(peer, msg).await.is_ok()) },
            async {
                glommio::timer::sleep(SEND_RECHECK).await;
                None
            },
        )
        .await;
        match room {
            Some(true) => return Ok(()),
            Some(false) => return Err(()),
            None => {}
        }
    }
}

async fn receive_loop(inner: Rc<Inner>, peer: usize, rx: ConnectedReceiver<Msg>) {
    while let Some(msg) = rx.recv().await {
        inner.handle(peer, msg);
    }
    inner.peer_gone(peer);
}

/// Drop guard of a pending `Resolve`: marks it abandoned so that its answer's pin is
/// given back when it arrives (or gives it back now if the answer is already here).
struct AbandonOnDrop<'a> {
    inner: &'a Inner,
    owner: usize,
    waiting: &'a Waiting,
    /// Cleared once the answer is taken: the pin then belongs to the `Reading`.
    armed: bool,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.waiting.abandoned.set(true);
        let answered = self.waiting.answer.borrow_mut().take();
        if let Some(Ok(Some(r))) = answered {
            self.inner.post(
                self.owner,
                Msg::Unpin {
                    shard: r.handle.shard,
                    seq: r.seq,
                },
            );
        }
    }
}

enum Hold {
    Local(Option<LocalPin>),
    Remote { owner: usize, shard: u32, seq: u64 },
}

/// A resolved message whose segment is pinned until this is dropped: read its record,
/// its body, or parts of it, through the executor's segment files. The pin is released
/// on drop, wherever the owner is.
pub struct Reading {
    resolved: Resolved,
    pin: Hold,
    service: StoreService,
}

impl Reading {
    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// Whether the message's shard is owned by another executor (the pin went over
    /// the channels).
    pub fn is_remote(&self) -> bool {
        matches!(self.pin, Hold::Remote { .. })
    }

    pub async fn record(&self) -> io::Result<SharedBuf> {
        self.service.files().read_record(&self.resolved).await
    }

    /// The record's bytes before its body (framing, envelope, trace prefix): decode
    /// with [`ringmail_store::message::decode_head`] after the framing.
    pub async fn head(&self) -> io::Result<SharedBuf> {
        let r = &self.resolved;
        self.service
            .files()
            .read(r.handle.shard, r.seq, r.offset, r.body_offset as usize)
            .await
    }

    pub async fn body(&self) -> io::Result<SharedBuf> {
        self.service.files().read_body(&self.resolved).await
    }

    pub async fn body_range(&self, range: Range<u64>) -> io::Result<SharedBuf> {
        self.service
            .files()
            .read_body_range(&self.resolved, range)
            .await
    }

    /// The body's bytes `range` in pieces of at most `piece` bytes
    /// ([`ringmail_store::reader::PIECE_BYTES`] suits sockets).
    pub fn pieces(&self, range: Range<u64>, piece: usize) -> io::Result<Pieces<'_>> {
        self.service.files().pieces(&self.resolved, range, piece)
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        match &mut self.pin {
            Hold::Local(pin) => {
                drop(pin.take());
                self.service.0.unpinned.notify(usize::MAX);
            }
            Hold::Remote { owner, shard, seq } => {
                self.service.0.post(
                    *owner,
                    Msg::Unpin {
                        shard: *shard,
                        seq: *seq,
                    },
                );
            }
        }
    }
}

/// Fails a test instead of hanging it when an event from another executor never
/// comes (the store and the mailbox tests run two executors).
#[cfg(test)]
pub(crate) async fn deadline<T>(f: impl std::future::Future<Output = T>) -> T {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(std::time::Duration::from_secs(30)).await;
        panic!("timed out waiting for the other executor")
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver, SharedSender};
    use glommio::LocalExecutorBuilder;
    use ringmail_store::reader::PIECE_BYTES;
    use ringmail_store::record::{Kind, RECORD_HEADER_BYTES};
    use ringmail_store::segment::{self, recover_shard, Mode};
    use ringmail_store::{LogConfig, Pins, ShardLog};
    use std::future::Future;
    use std::path::PathBuf;

    /// The shard both tests read; with two executors it belongs to executor 1.
    const SHARD: u32 = 1;
    const ENVELOPE: usize = 40;

    fn body(id: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|k| (k.wrapping_mul(0x9E37_79B9) >> 7 ^ id) as u8)
            .collect()
    }

    /// A shard as far as readers see it, on real segment files written by the log
    /// writer: what `ringmail_store::shard::Shard` is to the server.
    struct TestShard {
        dir: PathBuf,
        log: ShardLog,
        map: RefCell<HashMap<u64, Resolved>>,
        pins: Pins,
        /// References from other executors (the read tests take none).
        refs: RefCell<HashMap<u64, u32>>,
    }

    impl Owner for TestShard {
        fn resolve(&self, id: u64) -> Option<Resolved> {
            self.map.borrow().get(&id).copied()
        }
        fn pins(&self) -> &Pins {
            &self.pins
        }
        fn add_ref(&self, id: u64) -> bool {
            let stored = self.map.borrow().contains_key(&id);
            if stored {
                *self.refs.borrow_mut().entry(id).or_default() += 1;
            }
            stored
        }
        fn drop_ref(&self, id: u64) -> u32 {
            let mut refs = self.refs.borrow_mut();
            let n = refs.entry(id).or_default();
            *n = n.saturating_sub(1);
            *n
        }
        fn settle(&self) -> usize {
            0
        }
    }

    impl TestShard {
        async fn open(data: &Path, segment_bytes_max: u64) -> Rc<TestShard> {
            let dir = segment::shard_dir(data, SHARD);
            let (tail, _) = recover_shard(&dir, SHARD, Mode::Repair, |_, _| {}).unwrap();
            let log = ShardLog::open(
                &dir,
                SHARD,
                tail,
                LogConfig {
                    segment_bytes_max,
                    ..LogConfig::default()
                },
            )
            .await
            .unwrap();
            Rc::new(TestShard {
                dir,
                log,
                map: RefCell::new(HashMap::new()),
                pins: Pins::default(),
                refs: RefCell::new(HashMap::new()),
            })
        }

        /// Stores a message durably; `live` ones are in the handle map.
        async fn store(&self, id: u64, len: usize, live: bool) -> Resolved {
            let b = body(id, len);
            let t = self
                .log
                .append(Kind::Message, |o| {
                    o.extend_from_slice(&[0xAB; ENVELOPE]);
                    o.extend_from_slice(&b);
                })
                .unwrap();
            let loc = self.log.durable(t).await.unwrap();
            let r = Resolved {
                handle: Handle { shard: SHARD, id },
                seq: loc.seq,
                offset: loc.offset,
                len: loc.len,
                body_offset: (RECORD_HEADER_BYTES + ENVELOPE) as u32,
                body_len: len as u32,
            };
            if live {
                self.map.borrow_mut().insert(id, r);
            }
            r
        }

        fn path(&self, seq: u64) -> PathBuf {
            segment::segment_path(&self.dir, seq)
        }

        fn segments(&self) -> Vec<u64> {
            let mut v: Vec<u64> = std::fs::read_dir(&self.dir)
                .unwrap()
                .filter_map(|e| segment::parse_segment_name(e.unwrap().file_name().to_str()?))
                .collect();
            v.sort_unstable();
            v
        }

        /// What compaction does with a segment it wants gone: nothing while a reader
        /// pins it.
        fn try_delete(&self, svc: &StoreService, seq: u64) -> bool {
            if self.pins.is_pinned(seq) {
                return false;
            }
            std::fs::remove_file(self.path(seq)).unwrap();
            svc.segment_deleted(SHARD, seq);
            true
        }
    }

    #[derive(Debug)]
    enum Ctl {
        Ready { id: u64, len: usize },
        Closed,
        MidRead,
        Deleted(Vec<u64>),
        Dropped,
        Gone,
        Done,
        Ids(Vec<u64>),
        Exchanged,
    }

    struct Link {
        tx: ConnectedSender<Ctl>,
        rx: ConnectedReceiver<Ctl>,
    }

    impl Link {
        async fn send(&self, c: Ctl) {
            self.tx.send(c).await.unwrap();
        }
        async fn recv(&self) -> Ctl {
            self.rx.recv().await.expect("the other executor hung up")
        }
    }

    /// Runs `owner` on the executor that owns `SHARD` and `reader` on the other one,
    /// each with its store service and a control link to the other.
    fn two_executors<O, OF, R, RF>(owner: O, reader: R)
    where
        O: FnOnce(PathBuf, StoreService, Link) -> OF + Send + Clone + 'static,
        OF: Future<Output = ()> + 'static,
        R: FnOnce(PathBuf, StoreService, Link) -> RF + Send + Clone + 'static,
        RF: Future<Output = ()> + 'static,
    {
        let tmp = tempfile::tempdir().unwrap();
        two_executors_in(tmp.path(), owner, reader);
    }

    /// [`two_executors`] on the data directory `data` (a restart: run it again).
    fn two_executors_in<O, OF, R, RF>(data: &Path, owner: O, reader: R)
    where
        O: FnOnce(PathBuf, StoreService, Link) -> OF + Send + Clone + 'static,
        OF: Future<Output = ()> + 'static,
        R: FnOnce(PathBuf, StoreService, Link) -> RF + Send + Clone + 'static,
        RF: Future<Output = ()> + 'static,
    {
        let mesh = mesh(2);
        let (a_tx, a_rx) = shared_channel::new_bounded(4);
        let (b_tx, b_rx) = shared_channel::new_bounded(4);
        let ends: [(SharedSender<Ctl>, SharedReceiver<Ctl>); 2] = [(a_tx, b_rx), (b_tx, a_rx)];
        let threads: Vec<_> = ends
            .into_iter()
            .map(|(tx, rx)| {
                let (mesh, data) = (mesh.clone(), data.to_path_buf());
                let (owner, reader) = (owner.clone(), reader.clone());
                LocalExecutorBuilder::default()
                    .spawn(move || {
                        deadline(async move {
                            let svc = StoreService::join(mesh, &data, 0).await.unwrap();
                            // Together: each end waits for its peer to connect.
                            let (tx, rx) =
                                futures_lite::future::zip(tx.connect(), rx.connect()).await;
                            let link = Link { tx, rx };
                            if svc.owner_of(SHARD) == svc.peer() {
                                owner(data, svc.clone(), link).await;
                            } else {
                                reader(data, svc.clone(), link).await;
                            }
                            svc.close().await;
                        })
                    })
                    .unwrap()
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    const BIG: u64 = 7;
    const BIG_LEN: usize = 6 << 20;

    #[test]
    fn a_reader_on_another_core_streams_a_large_message_while_the_owner_deletes_around_it() {
        two_executors(
            |data, svc, link| async move {
                let shard = TestShard::open(&data, 1 << 20).await;
                for i in 0..12 {
                    shard.store(100 + i, 200 << 10, false).await;
                }
                let big = shard.store(BIG, BIG_LEN, true).await;
                for i in 0..12 {
                    shard.store(200 + i, 200 << 10, false).await;
                }
                svc.add_owner(SHARD, shard.clone());
                let newest = *shard.segments().last().unwrap();
                assert!(big.seq > 1 && big.seq < newest, "segments around it");

                // On the owner's own executor a read pins directly, without the mesh.
                let sent = svc.sent();
                {
                    let r = svc.open(big.handle).await.unwrap().unwrap();
                    assert!(!r.is_remote());
                    assert!(shard.pins.is_pinned(big.seq));
                    let head = r.body_range(0..5000).await.unwrap();
                    assert_eq!(&head[..], &body(BIG, 5000)[..]);
                }
                assert!(!shard.pins.is_pinned(big.seq));
                assert_eq!(svc.sent(), sent);

                link.send(Ctl::Ready {
                    id: BIG,
                    len: BIG_LEN,
                })
                .await;
                assert!(matches!(link.recv().await, Ctl::MidRead));
                // The reader is half-way: delete every sealed segment that can go.
                assert!(shard.pins.is_pinned(big.seq));
                let (mut deleted, mut refused) = (Vec::new(), Vec::new());
                for seq in shard.segments().into_iter().filter(|s| *s != newest) {
                    if shard.try_delete(&svc, seq) {
                        deleted.push(seq);
                    } else {
                        refused.push(seq);
                    }
                }
                assert_eq!(refused, vec![big.seq]);
                assert!(shard.path(big.seq).exists());
                link.send(Ctl::Deleted(deleted)).await;

                // Once the reader lets go, the segment can go too.
                loop {
                    let unpinned = svc.unpinned();
                    if !shard.pins.is_pinned(big.seq) {
                        break;
                    }
                    unpinned.await;
                }
                shard.map.borrow_mut().remove(&BIG);
                assert!(shard.try_delete(&svc, big.seq));
                assert_eq!(shard.segments(), vec![newest]);
                link.send(Ctl::Gone).await;
                assert!(matches!(link.recv().await, Ctl::Done));
                shard.log.close().await;
            },
            |_data, svc, link| async move {
                let Ctl::Ready { id, len } = link.recv().await else {
                    panic!("expected Ready")
                };
                let reading = svc
                    .open(Handle { shard: SHARD, id })
                    .await
                    .unwrap()
                    .expect("the message lives");
                assert!(reading.is_remote());
                let seq = reading.resolved().seq;
                let mut pieces = reading.pieces(0..len as u64, PIECE_BYTES).unwrap();
                let mut got = Vec::with_capacity(len);
                got.extend_from_slice(&pieces.next().await.unwrap().unwrap());
                link.send(Ctl::MidRead).await;
                let Ctl::Deleted(deleted) = link.recv().await else {
                    panic!("expected Deleted")
                };
                assert!(deleted.len() >= 2, "segments around it were deleted");
                let mut n = 1;
                while let Some(piece) = pieces.next().await {
                    let piece = piece.unwrap();
                    assert!(piece.len() <= PIECE_BYTES);
                    got.extend_from_slice(&piece);
                    n += 1;
                }
                assert!(n >= len / PIECE_BYTES, "streamed in pieces");
                assert!(
                    got == body(id, len),
                    "the bytes read differ from those stored"
                );
                assert!(svc.files().is_open(SHARD, seq));
                drop(reading);

                // The owner deleted it: this executor's cache lets go of the file.
                assert!(matches!(link.recv().await, Ctl::Gone));
                loop {
                    let forgotten = svc.forgotten();
                    if !svc.files().is_open(SHARD, seq) {
                        break;
                    }
                    forgotten.await;
                }
                link.send(Ctl::Done).await;
            },
        );
    }

    #[test]
    fn a_reader_dropped_at_any_point_releases_its_pin() {
        const ID: u64 = 9;
        const LEN: usize = 3 * PIECE_BYTES;
        two_executors(
            |data, svc, link| async move {
                let shard = TestShard::open(&data, 1 << 20).await;
                let r = shard.store(ID, LEN, true).await;
                svc.add_owner(SHARD, shard.clone());
                link.send(Ctl::Ready { id: ID, len: LEN }).await;
                assert!(matches!(link.recv().await, Ctl::Dropped));
                // Three requests answered (each pinned the segment), and every pin
                // given back, even the one whose reader left before the answer came.
                loop {
                    let unpinned = svc.unpinned();
                    if svc.served() == 3 && shard.pins.pinned() == 0 {
                        break;
                    }
                    unpinned.await;
                }
                assert!(!shard.pins.is_pinned(r.seq));
                link.send(Ctl::Done).await;
                shard.log.close().await;
            },
            |_data, svc, link| async move {
                let Ctl::Ready { id, len } = link.recv().await else {
                    panic!("expected Ready")
                };
                let h = Handle { shard: SHARD, id };
                // 1. The future is dropped while its Resolve is on its way.
                let mut open = Box::pin(svc.open(h));
                assert!(futures_lite::future::poll_once(&mut open).await.is_none());
                drop(open);
                // 2. The reading is dropped half-way through the body.
                let reading = svc.open(h).await.unwrap().unwrap();
                let mut pieces = reading.pieces(0..len as u64, PIECE_BYTES).unwrap();
                let first = pieces.next().await.unwrap().unwrap();
                assert_eq!(&first[..], &body(id, PIECE_BYTES)[..]);
                drop(reading);
                // 3. The task reading it is cancelled while it holds the pin.
                let pinned = Rc::new(Event::new());
                let has_pin = Rc::new(Cell::new(false));
                let task = glommio::spawn_local({
                    let (svc, pinned, has_pin) = (svc.clone(), pinned.clone(), has_pin.clone());
                    async move {
                        let reading = svc.open(h).await.unwrap().unwrap();
                        reading.body_range(0..10).await.unwrap();
                        has_pin.set(true);
                        pinned.notify(usize::MAX);
                        futures_lite::future::pending::<()>().await;
                    }
                });
                loop {
                    let l = pinned.listen();
                    if has_pin.get() {
                        break;
                    }
                    l.await;
                }
                task.cancel().await;
                link.send(Ctl::Dropped).await;
                assert!(matches!(link.recv().await, Ctl::Done));
            },
        );
    }

    /// A reader whose executor closes its store service while it still holds a
    /// reading: the unpin it posts on drop has no way out any more, so the owner
    /// releases what that executor held when its channels close.
    #[test]
    fn pins_of_readers_on_an_executor_that_closed_are_released_by_the_owner() {
        const ID: u64 = 11;
        const LEN: usize = 70_000;
        two_executors(
            |data, svc, link| async move {
                let shard = TestShard::open(&data, 1 << 20).await;
                let r = shard.store(ID, LEN, true).await;
                svc.add_owner(SHARD, shard.clone());
                link.send(Ctl::Ready { id: ID, len: LEN }).await;
                assert!(matches!(link.recv().await, Ctl::Closed));
                loop {
                    let unpinned = svc.unpinned();
                    if !shard.pins.is_pinned(r.seq) {
                        break;
                    }
                    unpinned.await;
                }
                assert_eq!(shard.pins.pinned(), 0);
                link.send(Ctl::Done).await;
                shard.log.close().await;
            },
            |_data, svc, link| async move {
                let Ctl::Ready { id, len } = link.recv().await else {
                    panic!("expected Ready")
                };
                let h = Handle { shard: SHARD, id };
                let kept = svc.open(h).await.unwrap().unwrap();
                let other = svc.open(h).await.unwrap().unwrap();
                assert_eq!(&kept.body().await.unwrap()[..], &body(id, len)[..]);
                drop(other);
                svc.close().await;
                assert_eq!(svc.queued(), 0);
                // Its unpin would sit in an outbox nobody drains.
                drop(kept);
                assert_eq!(svc.queued(), 0, "nothing posted after close");
                assert!(svc.open(h).await.is_err(), "closed: remote reads fail");
                link.send(Ctl::Closed).await;
                assert!(matches!(link.recv().await, Ctl::Done));
            },
        );
    }

    /// glommio's `send` waits for room forever when the receiver went away with the
    /// channel full; ours ends with an error, so `close` cannot hang on a dead peer.
    #[test]
    fn a_send_to_a_peer_that_left_with_its_channel_full_fails() {
        let mesh = mesh(2);
        let (full_tx, full_rx) = std::sync::mpsc::channel::<()>();
        let leaver = LocalExecutorBuilder::default()
            .spawn({
                let mesh = mesh.clone();
                move || async move {
                    let (senders, receivers) = mesh.join().await.unwrap();
                    // Receives nothing; leaves once the other filled the channel.
                    full_rx.recv().unwrap();
                    drop((senders, receivers));
                }
            })
            .unwrap();
        let sender = LocalExecutorBuilder::default()
            .spawn(move || {
                deadline(async move {
                    let (senders, _receivers) = mesh.join().await.unwrap();
                    let peer = 1 - senders.peer_id();
                    let msg = Msg::Unpin { shard: 0, seq: 1 };
                    let mut n = 0;
                    while senders.try_send_to(peer, msg).is_ok() {
                        n += 1;
                    }
                    assert_eq!(n, CHANNEL_SLOTS);
                    full_tx.send(()).unwrap();
                    assert!(send(&senders, peer, msg).await.is_err());
                })
            })
            .unwrap();
        sender.join().unwrap();
        leaver.join().unwrap();
    }

    /// The test on the real store: a reader on one executor streams a
    /// multi-MiB message from a queue (`Spool`) owned by the other, while the owner
    /// snapshots and compacts around it. The message's segment is mostly garbage, so
    /// compaction copies it forward: the handle then resolves to the new place, and
    /// the old segment, still pinned by the reader, survives until the reader lets go
    /// and a later compaction deletes it.
    #[test]
    fn a_reader_streams_a_message_from_a_real_spool_while_its_owner_compacts() {
        use crate::queue::{RcptStatus, Spool};
        use ringmail_store::message::{Envelope, RcptUpdate, Recipient};

        const BIG_LEN: usize = 2 << 20;
        const SMALL: usize = 100 << 10;
        two_executors(
            |data, svc, link| async move {
                ringmail_store::manifest::open_or_create(&data, 2).unwrap();
                let cfg = LogConfig {
                    segment_bytes_max: 8 << 20,
                    ..LogConfig::default()
                };
                let spool = Rc::new(Spool::open(&data, SHARD, cfg).await.unwrap());
                // The reader's executor has no shard, so no references to send.
                spool.store().settle_foreign();
                let deleted = Rc::new(RefCell::new(Vec::new()));
                {
                    let (svc, deleted) = (svc.clone(), deleted.clone());
                    spool.on_segment_deleted(move |shard, seq| {
                        deleted.borrow_mut().push(seq);
                        svc.segment_deleted(shard, seq);
                    });
                }
                svc.add_owner(SHARD, spool.clone());
                let enqueue = |n: usize| {
                    let spool = spool.clone();
                    async move {
                        let id = spool.next_id().await.unwrap();
                        let env = Envelope {
                            id,
                            from: "a@src.test".into(),
                            recipients: vec![Recipient {
                                address: "b@dst.test".into(),
                                ..Recipient::default()
                            }],
                            ..Envelope::default()
                        };
                        spool.enqueue(env, b"", body(id, n)).await.unwrap();
                        id
                    }
                };
                // A segment of garbage, garbage before and after the big one in its
                // segment, then another segment of garbage and the newest.
                let mut small = Vec::new();
                for _ in 0..110 {
                    small.push(enqueue(SMALL).await);
                }
                let big = enqueue(BIG_LEN).await;
                for _ in 0..120 {
                    small.push(enqueue(SMALL).await);
                }
                let old = spool.resolve(big).unwrap();
                let delivered = small
                    .iter()
                    .map(|id| RcptUpdate {
                        id: *id,
                        rcpt: 0,
                        status: RcptStatus::Delivered,
                        attempts: 1,
                        next_attempt_ms: 0,
                        reply: "250 ok".into(),
                    })
                    .collect();
                spool.record_outcomes(delivered, None).await.unwrap();
                assert_eq!(spool.len(), 1, "only the big one is still queued");
                let path = segment::segment_path(spool.store().dir(), old.seq);
                assert!(
                    spool.log().durable_end().0 >= old.seq + 2,
                    "segments after it"
                );

                link.send(Ctl::Ready {
                    id: big,
                    len: BIG_LEN,
                })
                .await;
                assert!(matches!(link.recv().await, Ctl::MidRead));
                assert!(spool.store().pins().is_pinned(old.seq));
                spool.snapshot().await.unwrap();
                spool.compact().await.unwrap();
                let now = spool.resolve(big).unwrap();
                assert_ne!(now.seq, old.seq, "copied forward: its segment was sparse");
                assert_eq!(now.handle, old.handle, "handles never change");
                assert_eq!(now.body_len, old.body_len);
                let first = deleted.borrow().clone();
                assert!(
                    first.iter().any(|s| *s < old.seq) && first.iter().any(|s| *s > old.seq),
                    "garbage segments deleted around it: {first:?}"
                );
                assert!(!first.contains(&old.seq), "a pinned segment stays");
                assert!(path.exists());
                link.send(Ctl::Deleted(first)).await;

                assert!(matches!(link.recv().await, Ctl::Dropped));
                loop {
                    let unpinned = svc.unpinned();
                    if spool.store().pins().pinned() == 0 {
                        break;
                    }
                    unpinned.await;
                }
                spool.snapshot().await.unwrap();
                spool.compact().await.unwrap();
                assert!(deleted.borrow().contains(&old.seq), "deleted once unpinned");
                assert!(!path.exists());
                assert_eq!(spool.resolve(big), Some(now));
                link.send(Ctl::Gone).await;
                assert!(matches!(link.recv().await, Ctl::Done));
                spool.close().await;
            },
            |_data, svc, link| async move {
                let Ctl::Ready { id, len } = link.recv().await else {
                    panic!("expected Ready")
                };
                let h = Handle::of_id(id);
                assert_eq!(h.shard, SHARD);
                let reading = svc.open(h).await.unwrap().expect("queued");
                assert!(reading.is_remote());
                let old = *reading.resolved();
                let want = body(id, len);
                let mut pieces = reading.pieces(0..len as u64, PIECE_BYTES).unwrap();
                let mut got = Vec::with_capacity(len);
                got.extend_from_slice(&pieces.next().await.unwrap().unwrap());
                link.send(Ctl::MidRead).await;
                let Ctl::Deleted(deleted) = link.recv().await else {
                    panic!("expected Deleted")
                };
                while let Some(piece) = pieces.next().await {
                    got.extend_from_slice(&piece.unwrap());
                }
                assert!(got == want, "the bytes streamed differ from those stored");
                for seq in deleted {
                    assert!(!svc.files().is_open(SHARD, seq) || seq == old.seq);
                }
                // Opened again, the handle resolves to the copy.
                let again = svc.open(h).await.unwrap().expect("still queued");
                assert_ne!(again.resolved().seq, old.seq);
                assert!(again.body().await.unwrap()[..] == want[..]);
                drop(reading);
                drop(again);
                link.send(Ctl::Dropped).await;
                assert!(matches!(link.recv().await, Ctl::Gone));
                loop {
                    let forgotten = svc.forgotten();
                    if !svc.files().is_open(SHARD, old.seq) {
                        break;
                    }
                    forgotten.await;
                }
                link.send(Ctl::Done).await;
            },
        );
    }

    /// Every slot of every channel is allocated up front: batching references must
    /// not make the message larger than an `Answer` made it already.
    #[test]
    fn a_refs_message_is_no_larger_than_an_answer() {
        assert_eq!(
            std::mem::size_of::<Msg>(),
            std::mem::size_of::<(u64, Option<Resolved>)>() + 8,
            "the answer and a tag"
        );
    }

    /// A mailbox index as far as references go: per message (of any shard) the
    /// references it holds. Its records (`Kind::Mail`, the test's own payload) carry
    /// the absolute count, so replaying one twice changes nothing.
    #[derive(Default)]
    struct RefIndex(std::collections::BTreeMap<u64, u32>);

    fn ref_record(id: u64, n: u32) -> Vec<u8> {
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&n.to_le_bytes());
        b
    }

    fn decode_ref(p: &[u8]) -> Result<(u64, u32), &'static str> {
        if p.len() != 12 {
            return Err("bad reference record");
        }
        Ok((
            u64::from_le_bytes(p[..8].try_into().unwrap()),
            u32::from_le_bytes(p[8..].try_into().unwrap()),
        ))
    }

    impl RefIndex {
        fn set(&mut self, id: u64, n: u32) {
            if n == 0 {
                self.0.remove(&id);
            } else {
                self.0.insert(id, n);
            }
        }
    }

    impl ringmail_store::Index for RefIndex {
        fn replay(&mut self, rec: ringmail_store::Replayed<'_>) -> Result<(), &'static str> {
            if let ringmail_store::Replayed::Record {
                kind: Kind::Mail,
                payload,
                ..
            } = rec
            {
                let (id, n) = decode_ref(payload)?;
                self.set(id, n);
            }
            Ok(())
        }
        fn refs(&self, each: &mut dyn FnMut(u64)) {
            for (id, n) in &self.0 {
                (0..*n).for_each(|_| each(*id));
            }
        }
        fn snapshot_chunk(
            &self,
            cursor: Option<u64>,
            out: &mut dyn FnMut(&[u8]) -> bool,
        ) -> Option<u64> {
            use std::ops::Bound::{Excluded, Unbounded};
            for (id, n) in self
                .0
                .range((cursor.map_or(Unbounded, Excluded), Unbounded))
            {
                if !out(&ref_record(*id, *n)) {
                    return Some(*id);
                }
            }
            None
        }
        fn load(&mut self, item: &[u8]) -> Result<(), &'static str> {
            let (id, n) = decode_ref(item)?;
            self.0.insert(id, n);
            Ok(())
        }
        fn clear(&mut self) {
            self.0.clear();
        }
    }

    /// This executor's shard (shard k is executor k's with two) as a spool with a
    /// [`RefIndex`].
    async fn open_refs_spool(
        data: &Path,
        svc: &StoreService,
    ) -> (Rc<crate::queue::Spool>, Rc<RefCell<RefIndex>>) {
        let ix = Rc::new(RefCell::new(RefIndex::default()));
        let others: Vec<Rc<RefCell<dyn ringmail_store::Index>>> = vec![ix.clone()];
        let spool =
            crate::queue::Spool::open_with(data, svc.peer() as u32, LogConfig::default(), others)
                .await
                .unwrap();
        (Rc::new(spool), ix)
    }

    /// Logs the index's count of `id` and applies it once durable.
    async fn log_ref(spool: &crate::queue::Spool, ix: &RefCell<RefIndex>, id: u64, n: u32) {
        let t = spool
            .store()
            .append(Kind::Mail, |out| out.extend_from_slice(&ref_record(id, n)))
            .unwrap();
        spool.store().durable(&t).await.unwrap();
        ix.borrow_mut().set(id, n);
    }

    async fn enqueue_one(spool: &crate::queue::Spool) -> u64 {
        use ringmail_store::message::{Envelope, Recipient};
        let id = spool.next_id().await.unwrap();
        let env = Envelope {
            id,
            from: "a@src.test".into(),
            recipients: vec![Recipient {
                address: "b@localhost".into(),
                ..Recipient::default()
            }],
            ..Envelope::default()
        };
        spool.enqueue(env, b"", body(id, 500)).await.unwrap();
        id
    }

    async fn deliver(spool: &crate::queue::Spool, id: u64) {
        spool
            .record(ringmail_store::message::RcptUpdate {
                id,
                rcpt: 0,
                status: crate::queue::RcptStatus::Delivered,
                attempts: 1,
                next_attempt_ms: 0,
                reply: "250 ok".into(),
            })
            .await
            .unwrap();
    }

    /// Waits until `f` holds, looking again whenever references change.
    async fn until_refs(svc: &StoreService, f: impl Fn() -> bool) {
        loop {
            let l = svc.refs_changed();
            if f() {
                return;
            }
            l.await;
        }
    }

    /// First run, on both executors alike: each stores two messages, hands one to
    /// the other executor's index (adding the reference first, as the owner does
    /// before it hands a delivery on) and delivers both from its queue, so only the
    /// other shard refers to the kept one. Then the logs close without a snapshot
    /// (a kill): the next start replays the queue's and the index's records.
    async fn first_run(data: PathBuf, svc: StoreService, link: Link) {
        let (spool, ix) = open_refs_spool(&data, &svc).await;
        svc.add_owner(spool.shard, spool.clone());
        svc.exchange_refs(spool.take_foreign());
        svc.settled().await;
        let keep = enqueue_one(&spool).await;
        let gone = enqueue_one(&spool).await;
        assert!(spool.store().add_ref(keep));
        link.send(Ctl::Ids(vec![keep, gone])).await;
        let Ctl::Ids(theirs) = link.recv().await else {
            panic!("expected Ids")
        };
        log_ref(&spool, &ix, theirs[0], 1).await;
        link.send(Ctl::Done).await;
        assert!(matches!(link.recv().await, Ctl::Done));
        deliver(&spool, keep).await;
        deliver(&spool, gone).await;
        assert_eq!(spool.store().refs(keep), 1, "the other shard's");
        assert_eq!(spool.resolve(gone), None);
        spool.store().close().await;
    }

    #[test]
    fn foreign_references_are_exchanged_at_start_and_applied_in_order_across_executors() {
        let tmp = tempfile::tempdir().unwrap();
        ringmail_store::manifest::open_or_create(tmp.path(), 2).unwrap();
        two_executors_in(tmp.path(), first_run, first_run);
        two_executors_in(
            tmp.path(),
            // Executor 1 opens its shard only after executor 0's references to it
            // arrived: they are held, and applied when it opens.
            |data, svc, link| async move {
                assert!(matches!(link.recv().await, Ctl::Exchanged));
                until_refs(&svc, || svc.peers_done() == 1).await;
                assert_eq!(svc.held_refs(), 1, "executor 0's reference, held");
                assert!(!svc.is_settled());
                let (spool, ix) = open_refs_spool(&data, &svc).await;
                assert_eq!(ix.borrow().0.len(), 1, "shard 0's kept message");
                let (&theirs, _) = ix.borrow().0.iter().next().map(|(a, b)| (a, *b)).unwrap();
                assert_eq!(Handle::of_id(theirs).shard, 0);
                // Unsettled: both of its messages are still there, at no reference.
                let unreferenced: Vec<u64> = {
                    let m = spool.store();
                    let mut v: Vec<u64> = (0..4)
                        .map(|k| ringmail_store::shard::make_id(1, k))
                        .filter(|id| m.resolve(*id).is_some())
                        .collect();
                    v.sort_unstable();
                    v
                };
                assert_eq!(unreferenced.len(), 2, "{unreferenced:X?}");
                svc.add_owner(1, spool.clone());
                assert_eq!(svc.held_refs(), 0);
                let kept: Vec<u64> = unreferenced
                    .iter()
                    .copied()
                    .filter(|id| spool.store().refs(*id) == 1)
                    .collect();
                assert_eq!(kept.len(), 1, "executor 0's reference applied to one");
                let kept = kept[0];
                let gone = *unreferenced.iter().find(|id| **id != kept).unwrap();
                let foreign = spool.take_foreign();
                assert_eq!(foreign.get(&0), Some(&vec![theirs]));
                svc.exchange_refs(foreign);
                // Its own references exchanged and executor 0 done: settled.
                assert!(svc.is_settled());
                svc.settled().await;
                assert_eq!(spool.resolve(gone), None, "nobody refers to it");
                assert!(spool.resolve(kept).is_some());
                link.send(Ctl::Ids(vec![kept])).await;
                // Executor 0 copies the entry 50 times over and expunges the old
                // one each time (add, then drop), then expunges the last: the count
                // never reaches zero early, and at the end it does. (Received so
                // far: the one from the start, then those 100, then the last.)
                assert!(matches!(link.recv().await, Ctl::Done));
                until_refs(&svc, || svc.refs_received() > 100).await;
                assert_eq!(spool.store().refs(kept), 1, "added before dropped");
                link.send(Ctl::Done).await;
                until_refs(&svc, || svc.refs_received() > 101).await;
                assert_eq!(spool.resolve(kept), None, "the last reference went");
                link.send(Ctl::Done).await;
                spool.close().await;
            },
            |data, svc, link| async move {
                let (spool, ix) = open_refs_spool(&data, &svc).await;
                svc.add_owner(0, spool.clone());
                let foreign = spool.take_foreign();
                assert_eq!(foreign.get(&1).map(Vec::len), Some(1));
                svc.exchange_refs(foreign);
                assert!(!svc.is_settled(), "executor 1 has not said done");
                link.send(Ctl::Exchanged).await;
                svc.settled().await;
                let mine: Vec<u64> = (0..4)
                    .map(|k| ringmail_store::shard::make_id(0, k))
                    .filter(|id| spool.resolve(*id).is_some())
                    .collect();
                assert_eq!(mine.len(), 1, "the message shard 1 refers to, only");
                assert_eq!(spool.store().refs(mine[0]), 1);
                let Ctl::Ids(kept) = link.recv().await else {
                    panic!("expected Ids")
                };
                let h = Handle::of_id(kept[0]);
                assert_eq!(ix.borrow().0.get(&h.id), Some(&1));
                for _ in 0..50 {
                    svc.add_ref(h);
                    svc.drop_ref(h);
                }
                link.send(Ctl::Done).await;
                assert!(matches!(link.recv().await, Ctl::Done));
                log_ref(&spool, &ix, h.id, 0).await;
                svc.drop_ref(h);
                assert!(matches!(link.recv().await, Ctl::Done));
                spool.close().await;
            },
        );
    }

    /// Start-up with a million references from one shard to the other's messages:
    /// they travel [`REFS_PER_MSG`] to a message.
    #[test]
    fn a_million_foreign_references_settle_quickly() {
        const N: u32 = 1_000_000;
        let tmp = tempfile::tempdir().unwrap();
        ringmail_store::manifest::open_or_create(tmp.path(), 2).unwrap();
        two_executors_in(
            tmp.path(),
            |data, svc, link| async move {
                let (spool, _ix) = open_refs_spool(&data, &svc).await;
                svc.add_owner(1, spool.clone());
                svc.exchange_refs(spool.take_foreign());
                let id = enqueue_one(&spool).await;
                link.send(Ctl::Ids(vec![id])).await;
                assert!(matches!(link.recv().await, Ctl::Done));
                spool.store().close().await;
            },
            |data, svc, link| async move {
                let (spool, ix) = open_refs_spool(&data, &svc).await;
                svc.add_owner(0, spool.clone());
                svc.exchange_refs(spool.take_foreign());
                let Ctl::Ids(id) = link.recv().await else {
                    panic!("expected Ids")
                };
                log_ref(&spool, &ix, id[0], N).await;
                link.send(Ctl::Done).await;
                spool.store().close().await;
            },
        );
        two_executors_in(
            tmp.path(),
            |data, svc, link| async move {
                let (spool, _ix) = open_refs_spool(&data, &svc).await;
                svc.add_owner(1, spool.clone());
                svc.exchange_refs(spool.take_foreign());
                svc.settled().await;
                assert_eq!(svc.refs_received(), N as u64);
                let id = ringmail_store::shard::make_id(1, 1);
                assert_eq!(spool.store().refs(id), N + 1, "the queue's and shard 0's");
                link.send(Ctl::Done).await;
                spool.close().await;
            },
            |data, svc, link| async move {
                let (spool, _ix) = open_refs_spool(&data, &svc).await;
                svc.add_owner(0, spool.clone());
                let foreign = spool.take_foreign();
                let start = std::time::Instant::now();
                svc.exchange_refs(foreign);
                assert!(matches!(link.recv().await, Ctl::Done));
                let took = start.elapsed();
                eprintln!("{N} foreign references exchanged and settled in {took:?}");
                let messages = svc.sent();
                assert!(
                    messages <= (N as u64).div_ceil(REFS_PER_MSG as u64) + 2,
                    "{messages} messages for {N} references"
                );
                svc.settled().await;
                spool.close().await;
            },
        );
    }
}
