//! How any executor reaches a user's home shard, and how change notifications reach
//! sessions on any executor.
//!
//! A user's mailbox index lives on one shard (`home_shard`), owned by one executor;
//! sessions and deliveries run wherever they were accepted. Nothing of the index is
//! shared or locked: work for a home shard is *sent* to its executor as a job (a
//! `Send` closure that builds the work's future there, on the executor that owns the
//! index) and the result comes back over a one-shot channel. A job to a shard of the
//! caller's own executor runs in place, without a channel.
//!
//! The channels are unbounded multi-producer queues (`futures-channel`): posting never
//! waits, so two executors sending each other work cannot deadlock, and a destructor
//! can post (an unsubscribe). Answers travel the same way, as jobs back to the asker,
//! which then wakes the waiting task locally. Why: a wake from another thread reaches
//! a *busy* glommio executor only when its preemption timer fires (100 ms and more,
//! measured in `auth::tests`), unless the woken task sits in a `Latency::Matters`
//! queue, for which glommio preempts the running tasks; so each executor's receive
//! loop runs in such a queue, and no task in a default queue is woken from afar.
//!
//! Change notifications: a session subscribes to (user, mailbox) on the home shard;
//! every committed change there is posted to each subscriber's executor and queued on
//! its [`Subscription`], in commit order (one FIFO channel per executor pair).

use super::home::Home;
use futures_channel::mpsc;
use std::future::Future;
use std::pin::Pin;

/// The future of a job, built on the executor that runs it.
pub type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T> + 'static>>;
use futures_lite::StreamExt;
use ringmail_store::mailbox::Notice;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// Work for another executor: runs there, given that executor's service.
type Job = Box<dyn FnOnce(&MailService) + Send>;

/// The channels between every pair of executors, built before they start.
pub struct Mesh {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    receivers: Mutex<Vec<Option<mpsc::UnboundedReceiver<Job>>>>,
}

pub fn mesh(executors: usize) -> Arc<Mesh> {
    let (senders, receivers) = (0..executors)
        .map(|_| {
            let (tx, rx) = mpsc::unbounded();
            (tx, Some(rx))
        })
        .unzip();
    Arc::new(Mesh {
        senders,
        receivers: Mutex::new(receivers),
    })
}

struct Inner {
    peer: usize,
    shards: u32,
    peers: Vec<mpsc::UnboundedSender<Job>>,
    /// The home shards this executor owns, once open.
    homes: RefCell<HashMap<u32, Rc<Home>>>,
    home_opened: event_listener::Event,
    /// This executor's subscriptions, by id.
    subs: RefCell<HashMap<u64, Rc<Queue>>>,
    next_sub: Cell<u64>,
    /// Answers awaited from other executors, by request id.
    pending: RefCell<HashMap<u64, Rc<Pending>>>,
    next_req: Cell<u64>,
    /// Stopping: no more work is taken, from here or from afar.
    closed: Cell<bool>,
    /// Ends the receive loop (closed, or the service dropped).
    stop: Rc<event_listener::Event>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.notify(usize::MAX);
    }
}

/// An answer on its way back; `None` in it: the answering executor went away.
#[derive(Default)]
struct Pending {
    answer: RefCell<Option<Option<Box<dyn Any + Send>>>>,
    event: event_listener::Event,
}

/// The longest a lost wake can hold a job up (see the receive loop).
const WAKE_BACKSTOP: std::time::Duration = std::time::Duration::from_millis(20);

/// How long a job from another executor may wait behind the running tasks.
const JOB_LATENCY: std::time::Duration = std::time::Duration::from_millis(1);

/// One executor's end. Executor-local; cheap to clone.
#[derive(Clone)]
pub struct MailService(Rc<Inner>);

impl MailService {
    /// This executor's end of `mesh`, as executor `peer` of `mesh`'s executors, over
    /// `shards` shards (shard `k` is owned by executor `k % executors`).
    pub fn join(mesh: &Mesh, peer: usize, shards: u32) -> MailService {
        let rx = mesh.receivers.lock().unwrap()[peer]
            .take()
            .expect("each executor joins once");
        let svc = MailService(Rc::new(Inner {
            peer,
            shards,
            peers: mesh.senders.clone(),
            homes: RefCell::new(HashMap::new()),
            home_opened: event_listener::Event::new(),
            subs: RefCell::new(HashMap::new()),
            next_sub: Cell::new(0),
            pending: RefCell::new(HashMap::new()),
            next_req: Cell::new(0),
            closed: Cell::new(false),
            stop: Rc::new(event_listener::Event::new()),
        }));
        // The receive loop holds a weak end: closing or dropping the service ends it,
        // and so drops the receiver (an idle task whose waker another executor holds
        // would outlive its executor, and jobs sent to it would wait for ever): jobs
        // queued or sent from then on fail, and their askers hear so (`Reply`). Its
        // queue (and so that of the tasks its jobs spawn) is one glommio preempts for.
        let weak = Rc::downgrade(&svc.0);
        let stop = svc.0.stop.clone();
        let queue = glommio::executor().create_task_queue(
            glommio::Shares::default(),
            glommio::Latency::Matters(JOB_LATENCY),
            "mail-jobs",
        );
        glommio::spawn_local_into(
            async move {
                let mut rx = rx;
                loop {
                    let stopped = stop.listen();
                    match weak.upgrade() {
                        Some(inner) if !inner.closed.get() => {}
                        _ => return,
                    }
                    // The timer is a backstop: glommio 0.9 can park an executor with
                    // a task just woken from another thread still queued, when its
                    // preemption timer fires first (see `auth::pool`); a pending
                    // timer bounds that wait.
                    let next = futures_lite::future::or(
                        async { Some(rx.next().await) },
                        futures_lite::future::or(
                            async {
                                stopped.await;
                                Some(None)
                            },
                            async {
                                glommio::timer::sleep(WAKE_BACKSTOP).await;
                                None
                            },
                        ),
                    )
                    .await;
                    let job = match next {
                        Some(Some(job)) => job,
                        Some(None) => return,
                        None => continue,
                    };
                    match weak.upgrade() {
                        Some(inner) if !inner.closed.get() => job(&MailService(inner)),
                        _ => return,
                    }
                }
            },
            queue,
        )
        .expect("the task queue was just created")
        .detach();
        svc
    }

    /// Fails every answer still awaited, and every call from now on, from here or
    /// from another executor (the executor is stopping).
    pub fn close(&self) {
        self.0.closed.set(true);
        self.0.stop.notify(usize::MAX);
        self.0.homes.borrow_mut().clear();
        // Jobs waiting for a home to open find it never will.
        self.0.home_opened.notify(usize::MAX);
        for (_, p) in self.0.pending.borrow_mut().drain() {
            *p.answer.borrow_mut() = Some(None);
            p.event.notify(usize::MAX);
        }
    }

    fn complete(&self, req: u64, answer: Box<dyn Any + Send>) {
        self.answer(req, Some(answer));
    }

    fn answer(&self, req: u64, answer: Option<Box<dyn Any + Send>>) {
        if let Some(p) = self.0.pending.borrow_mut().remove(&req) {
            *p.answer.borrow_mut() = Some(answer);
            p.event.notify(usize::MAX);
        }
    }

    pub fn shards(&self) -> u32 {
        self.0.shards
    }

    fn owner_of(&self, shard: u32) -> usize {
        shard as usize % self.0.peers.len()
    }

    /// Registers a home shard this executor owns; jobs waiting for it run now.
    pub fn add_home(&self, home: Rc<Home>) {
        self.0.homes.borrow_mut().insert(home.shard(), home);
        self.0.home_opened.notify(usize::MAX);
    }

    /// The home shards of this executor.
    pub fn homes(&self) -> Vec<Rc<Home>> {
        self.0.homes.borrow().values().cloned().collect()
    }

    /// The open home shard `shard` of this executor (waits while it is recovering);
    /// `None` once the service is closed.
    async fn home(&self, shard: u32) -> Option<Rc<Home>> {
        loop {
            let listener = self.0.home_opened.listen();
            if self.0.closed.get() {
                return None;
            }
            if let Some(h) = self.0.homes.borrow().get(&shard) {
                return Some(h.clone());
            }
            listener.await;
        }
    }

    /// Runs `f` on the home shard of `user`, on its executor, and returns what it
    /// returns. An error when that executor is gone (shutting down).
    pub async fn on_home<R, F>(&self, user: u64, f: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(Rc<Home>) -> LocalBoxFuture<R> + Send + 'static,
    {
        let shard = ringmail_store::accounts::home_shard(user, self.0.shards);
        let r = self
            .on_executor(self.owner_of(shard), move |svc| {
                Box::pin(async move {
                    match svc.home(shard).await {
                        Some(home) => Some(f(home).await),
                        None => None,
                    }
                })
            })
            .await?;
        r.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                format!("home shard {shard} is closed"),
            )
        })
    }

    /// Runs `f` on executor `peer` (in place when it is this one) and returns what
    /// its future gives: the one way work crosses cores here.
    pub async fn on_executor<R, F>(&self, peer: usize, f: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(MailService) -> LocalBoxFuture<R> + Send + 'static,
    {
        let gone = || {
            io::Error::new(
                io::ErrorKind::NotConnected,
                format!("executor {peer} is gone"),
            )
        };
        if self.0.closed.get() {
            return Err(gone());
        }
        if peer == self.0.peer {
            return Ok(f(self.clone()).await);
        }
        let req = self.0.next_req.get();
        self.0.next_req.set(req + 1);
        let pending = Rc::new(Pending::default());
        self.0.pending.borrow_mut().insert(req, pending.clone());
        let asker = self.0.peer;
        // Travels with the job: however the job ends without an answer (dropped
        // unrun by a closed service, or its task dropped with a stopping executor),
        // the asker hears that it failed instead of waiting for ever.
        let mut reply = Reply {
            to: Some(self.0.peers[asker].clone()),
            req,
        };
        let sent = self.0.peers[peer].unbounded_send(Box::new(move |svc: &MailService| {
            let svc = svc.clone();
            glommio::spawn_local(async move {
                let r: Box<dyn Any + Send> = Box::new(f(svc.clone()).await);
                reply.answered();
                svc.post(
                    asker,
                    Box::new(move |svc: &MailService| svc.complete(req, r)),
                );
            })
            .detach();
        }));
        if sent.is_err() {
            self.0.pending.borrow_mut().remove(&req);
            return Err(gone());
        }
        // Dropped before the answer came (the asker gave up): forget the request.
        let _forget = Forget(self, req);
        let answer = loop {
            let listener = pending.event.listen();
            let got = pending.answer.borrow_mut().take();
            if let Some(a) = got {
                break a;
            }
            listener.await;
        };
        match answer {
            Some(a) => Ok(*a.downcast::<R>().expect("the answer of the job asked")),
            None => Err(gone()),
        }
    }

    /// How many executors there are.
    pub fn executors(&self) -> usize {
        self.0.peers.len()
    }

    /// This executor's place among the executors.
    pub fn peer(&self) -> usize {
        self.0.peer
    }

    fn post(&self, peer: usize, job: Job) {
        // Fails only when that executor stopped: its work and notices go with it.
        let _ = self.0.peers[peer].unbounded_send(job);
    }

    /// Subscribes to the changes of `user`'s mailbox `mailbox` (an id of the index):
    /// every change committed after this returns is queued on the subscription.
    pub async fn subscribe(&self, user: u64, mailbox: u32) -> io::Result<Subscription> {
        let id = self.0.next_sub.get();
        self.0.next_sub.set(id + 1);
        let queue = Rc::new(Queue::default());
        self.0.subs.borrow_mut().insert(id, queue.clone());
        let peer = self.0.peer;
        let registered = self
            .on_home(user, move |home| {
                Box::pin(async move { home.subscribe(user, mailbox, peer, id) })
            })
            .await;
        if let Err(e) = registered {
            self.0.subs.borrow_mut().remove(&id);
            return Err(e);
        }
        Ok(Subscription {
            svc: self.clone(),
            id,
            user,
            mailbox,
            queue,
        })
    }

    /// Queues `notices` on subscription `sub` of executor `peer` (called by a home).
    pub(super) fn notify(&self, peer: usize, sub: u64, notices: Vec<Notice>) {
        if peer == self.0.peer {
            self.deliver_notices(sub, notices);
        } else {
            self.post(
                peer,
                Box::new(move |svc: &MailService| svc.deliver_notices(sub, notices)),
            );
        }
    }

    fn deliver_notices(&self, sub: u64, notices: Vec<Notice>) {
        let queue = self.0.subs.borrow().get(&sub).cloned();
        if let Some(q) = queue {
            q.notices.borrow_mut().extend(notices);
            q.event.notify(usize::MAX);
        }
    }

    /// Subscriptions live on this executor, for tests.
    pub fn subscriptions(&self) -> usize {
        self.0.subs.borrow().len()
    }
}

/// The answer a job owes its asker: "gone" unless the job answered.
struct Reply {
    /// The asker's channel, until the job answered.
    to: Option<mpsc::UnboundedSender<Job>>,
    req: u64,
}

impl Reply {
    fn answered(&mut self) {
        self.to = None;
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            let req = self.req;
            // Fails only when the asker is gone too.
            let _ = to.unbounded_send(Box::new(move |svc: &MailService| svc.answer(req, None)));
        }
    }
}

struct Forget<'a>(&'a MailService, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0 .0.pending.borrow_mut().remove(&self.1);
    }
}

#[derive(Default)]
struct Queue {
    notices: RefCell<VecDeque<Notice>>,
    event: event_listener::Event,
}

/// A session's subscription to one mailbox's changes (see [`MailService::subscribe`]).
/// Dropped, it unsubscribes.
pub struct Subscription {
    svc: MailService,
    id: u64,
    user: u64,
    mailbox: u32,
    queue: Rc<Queue>,
}

impl Subscription {
    /// The changes queued so far (empty if none).
    pub fn take(&self) -> Vec<Notice> {
        self.queue.notices.borrow_mut().drain(..).collect()
    }

    /// Waits for at least one change, then returns every one queued.
    pub async fn next(&self) -> Vec<Notice> {
        loop {
            let listener = self.queue.event.listen();
            let got = self.take();
            if !got.is_empty() {
                return got;
            }
            listener.await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.svc.0.subs.borrow_mut().remove(&self.id);
        let (user, mailbox, peer, id) = (self.user, self.mailbox, self.svc.0.peer, self.id);
        let shard = ringmail_store::accounts::home_shard(user, self.svc.0.shards);
        let owner = self.svc.owner_of(shard);
        let unsubscribe = move |svc: &MailService| {
            if let Some(h) = svc.0.homes.borrow().get(&shard) {
                h.unsubscribe(user, mailbox, peer, id);
            }
        };
        if owner == peer {
            unsubscribe(&self.svc);
        } else {
            self.svc.post(owner, Box::new(unsubscribe));
        }
    }
}
