//! The verification threads: a fixed set of plain threads fed by one bounded queue,
//! each answer handed back through a one-shot slot.
//!
//! Why plain threads: glommio's own blocking thread is one per executor and carries
//! the directory syncs of the shard logs; argon2 there would stall segment rolls
//! behind logins.
//!
//! Why the answer goes through a relay task: a worker waking the session's task
//! directly is a glommio foreign wake, which reaches a parked executor at once (its
//! eventfd is written) but a busy one only when its task queues run dry or the
//! preemption timer fires: 100 ms and more (measured in `auth::tests`). glommio writes
//! the eventfd for a busy executor too when the woken task is in a `Latency::Matters`
//! queue, which preempts the running tasks; the session's own task is in whatever
//! queue its frontend chose, so each executor gets one small relay task in such a
//! queue, which the workers wake and which wakes the sessions, locally.

use glommio::timer::Timer;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// What a worker runs: true when the password matched.
pub(crate) type Job = Box<dyn FnOnce() -> bool + Send>;

struct Queued {
    job: Job,
    slot: Arc<Slot>,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Queued>,
    closed: bool,
}

pub(crate) struct Pool {
    queue: Mutex<QueueState>,
    ready: Condvar,
    /// Requests accepted and not finished (running or waiting): the bound is on this,
    /// not on the queue alone, so that "busy" does not depend on whether a worker has
    /// dequeued its job yet.
    in_flight: AtomicUsize,
    capacity: usize,
}

impl Pool {
    /// `workers` threads named `ringmail-auth-N`; `queue` requests may wait beyond
    /// the ones running.
    pub(crate) fn start(workers: usize, queue: usize) -> std::io::Result<Arc<Pool>> {
        let workers = workers.max(1);
        let pool = Arc::new(Pool {
            queue: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            in_flight: AtomicUsize::new(0),
            capacity: workers + queue,
        });
        for n in 0..workers {
            let worker = pool.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ringmail-auth-{n}"))
                .spawn(move || worker.work());
            if let Err(e) = spawned {
                // The threads already started exit once the queue is closed.
                pool.close();
                return Err(e);
            }
        }
        Ok(pool)
    }

    /// Queues `job`; None when `capacity` requests are already in flight.
    pub(crate) fn submit(&self, job: Job) -> Option<Reply> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .ok()?;
        let slot = Arc::new(Slot::default());
        let mut q = lock(&self.queue);
        if q.closed {
            drop(q);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        q.jobs.push_back(Queued {
            job,
            slot: slot.clone(),
        });
        drop(q);
        self.ready.notify_one();
        Some(Reply {
            slot,
            backstop: None,
        })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Workers finish the job in hand and exit; later submissions are refused.
    pub(crate) fn close(&self) {
        lock(&self.queue).closed = true;
        self.ready.notify_all();
    }

    fn work(&self) {
        block_all_signals();
        lower_priority();
        loop {
            let next = {
                let mut q = lock(&self.queue);
                loop {
                    if q.closed {
                        return;
                    }
                    if let Some(next) = q.jobs.pop_front() {
                        break next;
                    }
                    q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            // A session that went away (its future dropped) no longer wants the
            // answer: skipping its argon2 run keeps a burst of hang-ups from eating
            // the pool.
            if next.slot.abandoned() {
                drop(next.job);
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            } else {
                let ok = (next.job)();
                // Before the answer: whoever got it may submit again at once and
                // must find the room this job held.
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                next.slot.fill(ok);
            }
        }
    }
}

/// The signal thread takes SIGINT/SIGTERM/SIGUSR1/SIGHUP with `sigwait`; a worker created
/// before the runtime blocks them must not take them instead.
fn block_all_signals() {
    // SAFETY: sigfillset initialises the set; a null old-set pointer is allowed.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Nice 10 for the calling thread (on Linux, `setpriority` on a thread id touches
/// that thread alone): a thread per core soaks up the CPU a burst of cold logins
/// needs while the executors idle, and yields to them when they have work (the
/// scheduler then gives a nice-10 thread about a tenth of a contended core), so a
/// login storm cannot starve SMTP ingest. Failing to lower it is harmless.
fn lower_priority() {
    // SAFETY: gettid has no arguments; setpriority with a valid `which` and id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct SlotState {
    answer: Option<bool>,
    /// The waiting task, and the relay of its executor.
    waiter: Option<(Waker, Arc<Relay>)>,
    abandoned: bool,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

impl Slot {
    fn abandoned(&self) -> bool {
        lock(&self.state).abandoned
    }

    fn fill(&self, ok: bool) {
        let waiter = {
            let mut s = lock(&self.state);
            s.answer = Some(ok);
            s.waiter.take()
        };
        // Outside the lock: the woken task may poll at once on its executor.
        if let Some((waker, relay)) = waiter {
            relay.pass(waker);
        }
    }
}

/// The answer of one submitted job. Dropping it before the answer came tells the
/// worker to skip the job if it has not started.
pub(crate) struct Reply {
    slot: Arc<Slot>,
    /// Looks at the slot again every `BACKSTOP` while the answer is awaited, in case
    /// the relay's wake was lost (see `BACKSTOP`).
    backstop: Option<glommio::timer::Timer>,
}

/// glommio 0.9 can put an executor to sleep with a runnable task queue: when a wake
/// from outside (the relay's, by a worker) is taken in and the preemption timer (1 ms
/// while the relay's queue is active, `RELAY_LATENCY`) fires before the first queue
/// runs, because the executor thread lost its CPU in between, `run_task_queues`
/// returns "nothing ran" and the executor parks until the next timer, I/O completion
/// or foreign wake; with none pending (a lone login) that is never. A pending timer
/// bounds that sleep: the check then finds its answer in the slot itself.
const BACKSTOP: Duration = Duration::from_millis(20);

impl Future for Reply {
    type Output = bool;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        {
            let mut s = lock(&self.slot.state);
            if let Some(ok) = s.answer {
                return Poll::Ready(ok);
            }
            match &s.waiter {
                Some((w, _)) if w.will_wake(cx.waker()) => {}
                _ => s.waiter = Some((cx.waker().clone(), Relay::current())),
            }
        }
        // A timer that fired is spent: the next one is armed by its first poll.
        let mut backstop = self.backstop.take().unwrap_or_else(|| Timer::new(BACKSTOP));
        if Pin::new(&mut backstop).poll(cx).is_ready() {
            backstop = Timer::new(BACKSTOP);
            let _ = Pin::new(&mut backstop).poll(cx);
        }
        self.backstop = Some(backstop);
        Poll::Pending
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        let mut s = lock(&self.slot.state);
        s.abandoned = true;
        // A waker of a task on an executor must not be dropped later on a worker
        // thread for nothing: release it here.
        s.waiter = None;
    }
}

/// One per executor: wakes, on the executor, the tasks whose answers came.
pub(crate) struct Relay {
    state: Mutex<RelayState>,
}

#[derive(Default)]
struct RelayState {
    /// Tasks to wake.
    ready: Vec<Waker>,
    /// The relay task, while it waits.
    waker: Option<Waker>,
}

/// The preemption a pending answer asks of the executor's running tasks.
const RELAY_LATENCY: Duration = Duration::from_millis(1);

thread_local! {
    /// The relay of the executor running on this thread, with the executor's id (a
    /// thread may run one executor after another, as tests do).
    static RELAY: RefCell<Option<(usize, Arc<Relay>)>> = const { RefCell::new(None) };
}

impl Relay {
    /// The relay of the current executor, started on first use.
    fn current() -> Arc<Relay> {
        let ex = glommio::executor();
        let id = ex.id();
        RELAY.with(|r| {
            let mut r = r.borrow_mut();
            if let Some((of, relay)) = &*r {
                if *of == id {
                    return relay.clone();
                }
            }
            let relay = Arc::new(Relay {
                state: Mutex::new(RelayState::default()),
            });
            let queue = ex.create_task_queue(
                glommio::Shares::default(),
                glommio::Latency::Matters(RELAY_LATENCY),
                "auth-relay",
            );
            let task = relay.clone();
            glommio::spawn_local_into(std::future::poll_fn(move |cx| task.run(cx)), queue)
                .expect("the task queue was just created")
                .detach();
            *r = Some((id, relay.clone()));
            relay
        })
    }

    /// On a worker: `waker`'s answer is in.
    fn pass(&self, waker: Waker) {
        let relay_task = {
            let mut s = lock(&self.state);
            s.ready.push(waker);
            s.waker.take()
        };
        if let Some(w) = relay_task {
            w.wake();
        }
    }

    /// The relay task: never finishes (it lives as long as its executor).
    fn run(&self, cx: &mut Context<'_>) -> Poll<()> {
        let ready = {
            let mut s = lock(&self.state);
            s.waker = Some(cx.waker().clone());
            std::mem::take(&mut s.ready)
        };
        ready.into_iter().for_each(Waker::wake);
        Poll::Pending
    }
}
