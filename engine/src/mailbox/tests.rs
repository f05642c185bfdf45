//! Change notifications and the path to a user's home shard with the real pieces:
//! two glommio executors, a spool per shard on a temporary data directory, the store
//! service, the mail service and the homes, set up as `runtime::executor_main` does.
//! Executor 0 ("A") is where sessions are; the user's home shard is on executor 1
//! ("B").

use super::home::Done;
use super::service::{self, MailService, Subscription};
use super::{Delivery, Home};
use crate::accounts::DirectoryCell;
use crate::queue::{RcptStatus, Spool};
use crate::storeservice::{deadline, StoreService};
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender};
use glommio::{Latency, LocalExecutorBuilder, Shares, Task, TaskQueueHandle};
use ringmail_store::accounts::{home_shard, AccountIndex, AccountRecord};
use ringmail_store::mailbox::{FlagOp, MailIndex, Notice, NoticeKind, FLAGGED, INBOX_ID, SEEN};
use ringmail_store::message::{Envelope, RcptUpdate, Recipient};
use ringmail_store::{Handle, LogConfig};

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHARDS: u32 = 2;
/// The bound from a change's commit to a subscriber on any core hearing of it.
const NOTICE_BOUND: Duration = Duration::from_millis(100);
/// How long a busy executor's hog computes between two yields. A wake from another
/// core into a busy executor waits up to two stretches even in a `Latency::Matters`
/// queue: the hog's stretch runs out before the wake is seen, and glommio activates
/// the woken queue just behind the running queue's vruntime, so the hog gets one more
/// stretch first. So 30 ms (at most ~60 ms); in a plain queue the wake waits for the
/// preemption timer (100 ms) instead.
const HOG_STRETCH: Duration = Duration::from_millis(30);

/// A user whose home shard is 1, owned by executor B.
fn user() -> u64 {
    (1..).find(|u| home_shard(*u, SHARDS) == 1).unwrap()
}

fn notice(mailbox: u32, kind: NoticeKind) -> Notice {
    Notice {
        user: user(),
        mailbox,
        kind,
    }
}

/// What the two executors tell each other (beside the pieces under test).
enum Ctl {
    /// B committed a change at `at`; A's subscriptions should hear `expect`.
    Committed {
        at: Instant,
        expect: Vec<Notice>,
    },
    Id(u32),
    Go,
}

struct Link {
    tx: ConnectedSender<Ctl>,
    rx: ConnectedReceiver<Ctl>,
}

impl Link {
    async fn send(&self, c: Ctl) {
        assert!(self.tx.send(c).await.is_ok(), "the other executor hung up");
    }

    async fn recv(&self) -> Ctl {
        self.rx.recv().await.expect("the other executor hung up")
    }

    async fn go(&self) {
        assert!(matches!(self.recv().await, Ctl::Go), "expected Go");
    }
}

/// One executor with its shard open, as the server runs it.
struct Node {
    store: StoreService,
    mail: MailService,
    spool: Rc<Spool>,
    homes: Vec<Rc<Home>>,
    link: Link,
    down: Cell<bool>,
}

impl Node {
    fn home(&self) -> &Rc<Home> {
        &self.homes[0]
    }

    /// The executor's orderly stop (`runtime::executor_main`'s end); once.
    async fn shut_down(&self) {
        if self.down.replace(true) {
            return;
        }
        super::close_homes(&self.mail, &self.homes).await;
        self.spool.close().await;
        self.store.close().await;
    }

    /// Stores a message on this executor's shard and takes a reference for the
    /// mailbox entry, as local delivery does before it hands the message to the
    /// home; the queue's own reference goes (its recipient is delivered).
    async fn store_message(&self) -> Delivery {
        let id = self.spool.next_id().await.unwrap();
        let env = Envelope {
            id,
            from: "a@src.test".into(),
            recipients: vec![Recipient {
                address: "u@a.test".into(),
                ..Recipient::default()
            }],
            ..Envelope::default()
        };
        let body = format!("Subject: {id:X}\r\n\r\nhello\r\n").into_bytes();
        let mut meta = Vec::new();
        ringmail_store::mime::analyze(&body).encode(&mut meta);
        let size = body.len() as u32;
        self.spool.enqueue(env, b"", body).await.unwrap();
        assert!(self.spool.store().add_ref(id));
        self.spool
            .record(RcptUpdate {
                id,
                rcpt: 0,
                status: RcptStatus::Delivered,
                attempts: 1,
                next_attempt_ms: 0,
                reply: "250 ok".into(),
            })
            .await
            .unwrap();
        assert_eq!(self.spool.store().refs(id), 1, "the entry's only");
        Delivery {
            user: user(),
            message: id,
            size,
            internal_date: 0,
            meta,
            received_at_ms: super::now_ms(),
            maybe_done: false,
        }
    }

    /// Runs `f` on the user's home (on B) and returns what it gives.
    async fn on_home<R: Send + 'static>(
        &self,
        f: impl FnOnce(Rc<Home>) -> super::service::LocalBoxFuture<R> + Send + 'static,
    ) -> R {
        self.mail.on_home(user(), f).await.expect("B is up")
    }
}

/// Runs `a` on executor A (peer 0, shard 0) and `b` on executor B (peer 1, shard 1,
/// the user's home), each on a `Node` opened as the server opens its executors, on
/// a fresh data directory with the user in the directory; shuts both down after.
fn two_executors<A, AF, B, BF>(a: A, b: B)
where
    A: FnOnce(Rc<Node>) -> AF + Send + 'static,
    AF: Future<Output = ()> + 'static,
    B: FnOnce(Rc<Node>) -> BF + Send + 'static,
    BF: Future<Output = ()> + 'static,
{
    let tmp = tempfile::tempdir().unwrap();
    ringmail_store::manifest::open_or_create(tmp.path(), SHARDS).unwrap();
    let store_mesh = crate::storeservice::mesh(2);
    let mail_mesh = service::mesh(2);
    let directory = DirectoryCell::new();
    let mut accounts = AccountIndex::default();
    accounts.apply(&AccountRecord::AddUser {
        user_id: user(),
        address: "u@a.test".into(),
        phc_hash: "$argon2id$x".into(),
        quota_bytes: 0,
        quota_messages: 0,
    });
    directory.publish(accounts.directory(1));
    // The store mesh numbers the executors as they join; the roles follow it.
    let (a, b) = (Arc::new(Mutex::new(Some(a))), Arc::new(Mutex::new(Some(b))));
    let (a_tx, a_rx) = shared_channel::new_bounded(16);
    let (b_tx, b_rx) = shared_channel::new_bounded(16);
    let threads: Vec<_> = [(a_tx, b_rx), (b_tx, a_rx)]
        .into_iter()
        .map(|(tx, rx)| {
            let (store_mesh, mail_mesh, directory) =
                (store_mesh.clone(), mail_mesh.clone(), directory.clone());
            let (a, b, data) = (a.clone(), b.clone(), tmp.path().to_path_buf());
            LocalExecutorBuilder::default()
                .spawn(move || {
                    deadline(async move {
                        let store = StoreService::join(store_mesh, &data, 0).await.unwrap();
                        let peer = store.peer();
                        let mail = MailService::join(&mail_mesh, peer, SHARDS);
                        let shard = peer as u32;
                        let account_ix = Rc::new(RefCell::new(AccountIndex::default()));
                        let mail_ix = Rc::new(RefCell::new(MailIndex::default()));
                        let others: Vec<Rc<RefCell<dyn ringmail_store::Index>>> =
                            vec![account_ix, mail_ix.clone()];
                        let spool = Rc::new(
                            Spool::open_with(&data, shard, LogConfig::default(), others)
                                .await
                                .unwrap(),
                        );
                        store.add_owner(shard, spool.clone());
                        let svc = store.clone();
                        spool.on_segment_deleted(move |k, seq| svc.segment_deleted(k, seq));
                        store.exchange_refs(spool.take_foreign());
                        let homes = super::open_homes(
                            &data,
                            &mail,
                            &store,
                            &directory,
                            vec![(spool.clone(), mail_ix)],
                            Rc::default(),
                        )
                        .await
                        .unwrap();
                        // Until both shards settled a message at no reference stays.
                        store.settled().await;
                        let (tx, rx) = futures_lite::future::zip(tx.connect(), rx.connect()).await;
                        let node = Rc::new(Node {
                            store,
                            mail,
                            spool,
                            homes,
                            link: Link { tx, rx },
                            down: Cell::new(false),
                        });
                        if peer == 0 {
                            let a = a.lock().unwrap().take().unwrap();
                            a(node.clone()).await;
                        } else {
                            let b = b.lock().unwrap().take().unwrap();
                            b(node.clone()).await;
                        }
                        node.shut_down().await;
                    })
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A queue glommio preempts the running tasks for (as `MailService`'s own).
fn matters_queue() -> TaskQueueHandle {
    glommio::executor().create_task_queue(
        Shares::default(),
        Latency::Matters(Duration::from_millis(1)),
        "test-session",
    )
}

/// Keeps its executor busy in [`HOG_STRETCH`] stretches between yields, in the
/// default queue, until dropped.
struct Hog(#[allow(dead_code)] Task<()>);

fn hog() -> Hog {
    Hog(glommio::spawn_local(async {
        loop {
            let t = Instant::now();
            while t.elapsed() < HOG_STRETCH {
                std::hint::spin_loop();
            }
            futures_lite::future::yield_now().await;
        }
    }))
}

/// A subscription read by a task of its own in a latency-sensitive queue, as a
/// session waiting for changes: each notice stamped when that task got it.
struct Watch {
    got: Rc<RefCell<VecDeque<(Instant, Notice)>>>,
    event: Rc<event_listener::Event>,
    _task: Task<()>,
}

impl Watch {
    fn new(sub: Subscription, queue: TaskQueueHandle) -> Watch {
        let got: Rc<RefCell<VecDeque<(Instant, Notice)>>> = Rc::default();
        let event = Rc::new(event_listener::Event::new());
        let (g, e) = (got.clone(), event.clone());
        let task = glommio::spawn_local_into(
            async move {
                loop {
                    let notices = sub.next().await;
                    let at = Instant::now();
                    g.borrow_mut().extend(notices.into_iter().map(|n| (at, n)));
                    e.notify(usize::MAX);
                }
            },
            queue,
        )
        .unwrap();
        Watch {
            got,
            event,
            _task: task,
        }
    }

    async fn next(&self) -> (Instant, Notice) {
        loop {
            let l = self.event.listen();
            if let Some(n) = self.got.borrow_mut().pop_front() {
                return n;
            }
            l.await;
        }
    }
}

/// Each of `expect`, in order, reaches the watch of its mailbox within the bound
/// of `committed`.
async fn heard(watches: &[(u32, &Watch)], committed: Instant, expect: Vec<Notice>) {
    for n in expect {
        let w = watches.iter().find(|(m, _)| *m == n.mailbox).unwrap().1;
        let (at, got) = w.next().await;
        assert_eq!(got, n, "in commit order");
        let late = at.saturating_duration_since(committed);
        assert!(late < NOTICE_BOUND, "{n:?} heard {late:?} after its commit");
    }
}

fn appended(mailbox: u32, d: &Done) -> Notice {
    notice(mailbox, NoticeKind::Appended { uid: d.new_uids[0] })
}

fn flagged(d: &Done) -> Notice {
    notice(
        d.mailbox,
        NoticeKind::FlagsChanged {
            uid: d.source_uids[0],
            modseq: d.modseq.unwrap(),
        },
    )
}

fn expunged(d: &Done) -> Notice {
    notice(
        d.mailbox,
        NoticeKind::Expunged {
            uids: d.source_uids.clone(),
        },
    )
}

async fn set_flags(home: &Rc<Home>, uid: u32, op: FlagOp, flags: u8) -> Done {
    let u = user();
    home.change(|ix| ix.begin_set_flags(u, INBOX_ID, &[uid], op, flags, &[], None))
        .await
        .unwrap()
}

/// A (sessions) subscribes to INBOX and Archive, hears B's changes, then makes its
/// own through `on_home` and hears them too.
async fn subscriber(node: Rc<Node>, busy: bool) {
    let _hog = busy.then(hog);
    let queue = matters_queue();
    let inbox = Watch::new(node.mail.subscribe(user(), INBOX_ID).await.unwrap(), queue);
    node.link.send(Ctl::Go).await;
    let Ctl::Id(archive) = node.link.recv().await else {
        panic!("expected Archive's id")
    };
    let arch = Watch::new(node.mail.subscribe(user(), archive).await.unwrap(), queue);
    node.link.send(Ctl::Go).await;
    let watches = [(INBOX_ID, &inbox), (archive, &arch)];
    loop {
        match node.link.recv().await {
            Ctl::Committed { at, expect } => heard(&watches, at, expect).await,
            Ctl::Go => break,
            Ctl::Id(_) => panic!("unexpected"),
        }
    }
    // A's own changes, on the home through the mail service; the message is on A's
    // shard.
    let d = node.store_message().await;
    let (at, uid) = node
        .on_home(move |home| {
            Box::pin(async move {
                let uid = home.deliver(d).await.unwrap();
                (Instant::now(), uid)
            })
        })
        .await;
    let expect = vec![notice(INBOX_ID, NoticeKind::Appended { uid })];
    heard(&watches, at, expect).await;
    let (at, d) = node
        .on_home(move |home| {
            Box::pin(async move {
                let d = set_flags(&home, uid, FlagOp::Add, FLAGGED).await;
                (Instant::now(), d)
            })
        })
        .await;
    heard(&watches, at, vec![flagged(&d)]).await;
    let (at, d) = node
        .on_home(move |home| {
            Box::pin(async move {
                let u = user();
                let d = home
                    .change(|ix| ix.begin_copy(u, INBOX_ID, &[uid], archive))
                    .await
                    .unwrap();
                (Instant::now(), d)
            })
        })
        .await;
    heard(&watches, at, vec![appended(archive, &d)]).await;
    let (at, d) = node
        .on_home(move |home| {
            Box::pin(async move {
                let u = user();
                let d = home
                    .change(|ix| ix.begin_expunge(u, INBOX_ID, &[uid]))
                    .await
                    .unwrap();
                (Instant::now(), d)
            })
        })
        .await;
    heard(&watches, at, vec![expunged(&d)]).await;
    node.link.send(Ctl::Go).await;
}

/// B (the home) makes changes itself: a delivery, a flag change, a copy to
/// Archive, an expunge, then a burst of flag changes in flight together.
async fn home_side(node: Rc<Node>, busy: bool) {
    let _hog = busy.then(hog);
    let u = user();
    let home = node.home().clone();
    node.link.go().await;
    home.change(|ix| ix.begin_create(u, "Archive", None))
        .await
        .unwrap();
    let archive = home.index().mailbox(u, "Archive").unwrap().id();
    node.link.send(Ctl::Id(archive)).await;
    node.link.go().await;
    let committed = |expect: Vec<Notice>| Ctl::Committed {
        at: Instant::now(),
        expect,
    };

    let uid = home.deliver(node.store_message().await).await.unwrap();
    let c = committed(vec![notice(INBOX_ID, NoticeKind::Appended { uid })]);
    node.link.send(c).await;
    let d = set_flags(&home, uid, FlagOp::Add, SEEN).await;
    node.link.send(committed(vec![flagged(&d)])).await;
    let d = home
        .change(|ix| ix.begin_copy(u, INBOX_ID, &[uid], archive))
        .await
        .unwrap();
    node.link.send(committed(vec![appended(archive, &d)])).await;
    let d = home
        .change(|ix| ix.begin_expunge(u, INBOX_ID, &[uid]))
        .await
        .unwrap();
    node.link.send(committed(vec![expunged(&d)])).await;

    // Changes in flight together commit in the order they began, and are heard so.
    let uid = home.deliver(node.store_message().await).await.unwrap();
    let c = committed(vec![notice(INBOX_ID, NoticeKind::Appended { uid })]);
    node.link.send(c).await;
    let tasks: Vec<_> = (0..6)
        .map(|k| {
            let home = home.clone();
            let op = if k % 2 == 0 {
                FlagOp::Add
            } else {
                FlagOp::Remove
            };
            glommio::spawn_local(async move {
                let d = set_flags(&home, uid, op, SEEN).await;
                (Instant::now(), d)
            })
        })
        .collect();
    let mut expect = Vec::new();
    let mut last = None;
    for t in tasks {
        let (at, d) = t.await;
        expect.push(flagged(&d));
        last = Some(last.map_or(at, |l: Instant| l.max(at)));
    }
    let modseqs: Vec<u64> = expect
        .iter()
        .map(|n| match n.kind {
            NoticeKind::FlagsChanged { modseq, .. } => modseq,
            _ => unreachable!(),
        })
        .collect();
    assert!(modseqs.windows(2).all(|w| w[0] < w[1]), "{modseqs:?}");
    let at = last.unwrap();
    node.link.send(Ctl::Committed { at, expect }).await;
    node.link.send(Ctl::Go).await;
    // A's changes through on_home run here meanwhile.
    node.link.go().await;
}

/// The issue: a session is told of new messages, flag changes and expunges made by
/// any other session or by delivery, on any core, within 100 ms.
#[test]
fn a_subscriber_on_another_core_hears_every_change_in_order_within_the_bound() {
    two_executors(|a| subscriber(a, false), |b| home_side(b, false));
}

/// The same with both executors busy in long stretches between yields: the notices
/// reach the subscriber's executor through `MailService`'s receive loop, in a
/// `Latency::Matters` queue, which glommio preempts the hog for (in a plain queue a
/// wake from another core waits for the preemption timer, 100 ms and more).
#[test]
fn a_subscriber_hears_changes_within_the_bound_with_both_executors_busy() {
    two_executors(|a| subscriber(a, true), |b| home_side(b, true));
}

/// The subscribers of the user's INBOX on its home, asked from `node`.
async fn inbox_subscribers(node: &Node) -> Vec<(usize, u64)> {
    let u = user();
    node.on_home(move |h| Box::pin(async move { h.subscribers(u, INBOX_ID) }))
        .await
}

/// Dropping a subscription unsubscribes on the home: from another core (the
/// unsubscribe goes ahead of whatever that core sends the home after it) and on the
/// home's own.
#[test]
fn a_dropped_subscription_leaves_the_homes_list() {
    two_executors(
        |a| async move {
            let u = user();
            let first = a.mail.subscribe(u, INBOX_ID).await.unwrap();
            let second = a.mail.subscribe(u, INBOX_ID).await.unwrap();
            assert_eq!(inbox_subscribers(&a).await.len(), 2);
            drop(first);
            assert_eq!(a.mail.subscriptions(), 1);
            let left = inbox_subscribers(&a).await;
            assert_eq!(left.len(), 1, "{left:?}");
            assert_eq!(left[0].0, 0, "A's");
            a.link.send(Ctl::Go).await;
            let got = second.next().await;
            assert!(
                matches!(
                    got[..],
                    [Notice {
                        kind: NoticeKind::Appended { .. },
                        ..
                    }]
                ),
                "{got:?}"
            );
            drop(second);
            assert_eq!(a.mail.subscriptions(), 0);
            assert_eq!(inbox_subscribers(&a).await, vec![]);
            a.link.send(Ctl::Go).await;
            a.link.go().await;
        },
        |b| async move {
            let u = user();
            b.link.go().await;
            b.home().deliver(b.store_message().await).await.unwrap();
            b.link.go().await;
            let local = b.mail.subscribe(u, INBOX_ID).await.unwrap();
            assert_eq!(b.home().subscribers(u, INBOX_ID).len(), 1);
            drop(local);
            assert_eq!(b.home().subscribers(u, INBOX_ID), vec![]);
            assert_eq!(b.mail.subscriptions(), 0);
            b.link.send(Ctl::Go).await;
        },
    );
}

/// Waits until `f` holds, looking again whenever references arrive from a peer.
async fn until_refs(svc: &StoreService, f: impl Fn() -> bool) {
    loop {
        let l = svc.refs_changed();
        if f() {
            return;
        }
        l.await;
    }
}

/// An entry on the home (B) of a message stored on A's shard holds one of the
/// message's references on A: a copy adds one, an expunge gives one up, and the
/// last one's expunge drops the message.
#[test]
fn entries_on_the_home_count_references_on_the_messages_core() {
    two_executors(
        |a| async move {
            let u = user();
            let d = a.store_message().await;
            let id = d.message;
            assert_eq!(Handle::of_id(id).shard, 0);
            let uid = a
                .on_home(move |home| Box::pin(async move { home.deliver(d).await.unwrap() }))
                .await;
            let archive = a
                .on_home(move |home| {
                    Box::pin(async move {
                        home.change(|ix| ix.begin_create(u, "Archive", None))
                            .await
                            .unwrap();
                        home.index().mailbox(u, "Archive").unwrap().id()
                    })
                })
                .await;
            assert_eq!(a.spool.store().refs(id), 1, "the INBOX entry's");
            let received = a.store.refs_received();
            let copy = a
                .on_home(move |home| {
                    Box::pin(async move {
                        let d = home
                            .change(|ix| ix.begin_copy(u, INBOX_ID, &[uid], archive))
                            .await
                            .unwrap();
                        d.new_uids[0]
                    })
                })
                .await;
            until_refs(&a.store, || a.store.refs_received() > received).await;
            assert_eq!(a.spool.store().refs(id), 2, "and the copy's");
            let expunge = move |mailbox: u32, uid: u32| {
                move |home: Rc<Home>| -> super::service::LocalBoxFuture<()> {
                    Box::pin(async move {
                        let d = home
                            .change(|ix| ix.begin_expunge(u, mailbox, &[uid]))
                            .await
                            .unwrap();
                        assert_eq!(d.source_uids, vec![uid]);
                    })
                }
            };
            a.on_home(expunge(INBOX_ID, uid)).await;
            until_refs(&a.store, || a.store.refs_received() > received + 1).await;
            assert_eq!(a.spool.store().refs(id), 1, "the copy's");
            assert!(a.spool.resolve(id).is_some());
            a.on_home(expunge(archive, copy)).await;
            until_refs(&a.store, || a.store.refs_received() > received + 2).await;
            assert_eq!(a.spool.store().refs(id), 0);
            assert_eq!(a.spool.resolve(id), None, "the last reference went");
            a.link.send(Ctl::Go).await;
        },
        |b| async move { b.link.go().await },
    );
}

/// Fails the test if `f` does not end soon: for calls that must fail, not hang.
async fn soon<T>(what: &str, f: impl Future<Output = T>) -> T {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(Duration::from_secs(5)).await;
        panic!("{what}: hangs")
    })
    .await
}

/// Calls to the home's executor once it closed its mail service (shutting down),
/// and once it is gone, fail; so does a call it was running when it went.
#[test]
fn calls_to_an_executor_that_shut_down_fail_instead_of_hanging() {
    two_executors(
        |a| async move {
            let u = user();
            let (started, running) = futures_channel::oneshot::channel();
            let mail = a.mail.clone();
            let stuck = glommio::spawn_local(async move {
                mail.on_home(u, move |_| {
                    Box::pin(async move {
                        let _ = started.send(());
                        futures_lite::future::pending::<()>().await
                    })
                })
                .await
            });
            running.await.unwrap();
            a.link.send(Ctl::Go).await;
            a.link.go().await;
            // B closed its mail service and is still running.
            let r = soon("on_home", a.mail.on_home(u, |_| Box::pin(async {}))).await;
            assert!(r.is_err(), "on_home to a closed home");
            let r = soon("on_executor", a.mail.on_executor(1, |_| Box::pin(async {}))).await;
            assert!(r.is_err(), "on_executor to a closed executor");
            let r = soon("subscribe", a.mail.subscribe(u, INBOX_ID)).await;
            assert!(r.is_err(), "subscribe on a closed home");
            a.link.send(Ctl::Go).await;
            // B is gone.
            let r = soon("the call B was running", stuck).await;
            assert!(r.is_err());
            let r = soon("on_home, B gone", a.mail.on_home(u, |_| Box::pin(async {}))).await;
            assert!(r.is_err(), "on_home to a stopped executor");
            let r = soon(
                "on_executor, B gone",
                a.mail.on_executor(1, |_| Box::pin(async {})),
            )
            .await;
            assert!(r.is_err(), "on_executor to a stopped executor");
        },
        |b| async move {
            b.link.go().await;
            b.shut_down().await;
            b.link.send(Ctl::Go).await;
            b.link.go().await;
        },
    );
}

#[test]
fn quantiles_count_from_the_fastest() {
    let mut l = super::Latency::default();
    for ms in 1..=100 {
        l.record(ms);
    }
    l.record(50_000);
    assert_eq!(l.count(), 101);
    assert_eq!(l.quantile(0.5), 51);
    assert_eq!(l.quantile(0.99), 100);
    assert_eq!(l.quantile(1.0), 10_000);
}
