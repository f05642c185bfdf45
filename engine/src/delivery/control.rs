//! Queue control for the admin API, on the executor that owns the message's shard:
//! hold, release, delete (with or without a bounce), bounce now; and the queue's
//! levels for `/metrics`. Every change is a recipient update made durable through
//! the spool before the answer, as delivery's own outcomes are.

use super::scheduler::{now_ms, Delivery};
use crate::metrics::{Gauges, QUEUE_STATES};
use crate::queue::{RcptStatus, Spool};
use crate::smtp::client::Reply;
use ringmail_store::message::{format_id, RcptUpdate};
use std::rc::Rc;

/// What the administrator asked of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Its recipients are not tried until released.
    Hold,
    /// Held recipients are due now.
    Release,
    /// Its recipients are dropped: no delivery, no bounce.
    Delete,
    /// Its recipients fail now and the sender gets a bounce (RFC 3464).
    Bounce,
}

impl Op {
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "hold" => Op::Hold,
            "release" => Op::Release,
            "delete" => Op::Delete,
            "bounce" => Op::Bounce,
            _ => return None,
        })
    }

    fn word(self) -> &'static str {
        match self {
            Op::Hold => "held",
            Op::Release => "released",
            Op::Delete => "deleted",
            Op::Bounce => "bounced",
        }
    }
}

/// The outcome of one control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controlled {
    /// Recipients changed (durably).
    pub changed: usize,
    /// Recipients left alone because an attempt for them is running now (its
    /// outcome stands; ask again afterwards).
    pub busy: usize,
}

/// The reply a recipient bounced by the administrator is recorded and reported with.
fn returned() -> Reply {
    Reply {
        code: 550,
        text: "message returned by the administrator".into(),
        enhanced: Some((5, 0, 0)),
    }
}

/// Recipients taken into `in_flight` for a control request, let go however it ends.
struct Reserved<'a> {
    delivery: &'a Delivery,
    id: u64,
    rcpts: Vec<u32>,
}

impl<'a> Reserved<'a> {
    fn new(delivery: &'a Delivery, id: u64, rcpts: &[u32]) -> Reserved<'a> {
        let mut f = delivery.in_flight.borrow_mut();
        for &i in rcpts {
            f.insert((id, i));
        }
        Reserved {
            delivery,
            id,
            rcpts: rcpts.to_vec(),
        }
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut f = self.delivery.in_flight.borrow_mut();
        for &i in &self.rcpts {
            f.remove(&(self.id, i));
        }
    }
}

/// Where a message's state sorts in `QUEUE_STATES` (the first that applies).
const ACTIVE: usize = 0;
const READY: usize = 1;
const DEFERRED: usize = 2;
const HELD: usize = 3;

impl Delivery {
    fn spool_of(&self, id: u64) -> Option<&Rc<Spool>> {
        let shard = ringmail_store::Handle::of_id(id).shard;
        self.spools.iter().find(|s| s.shard == shard)
    }

    /// Applies `op` to queued message `id` (of a shard of this executor); `None` when
    /// no such message is queued here.
    pub async fn control(&self, id: u64, op: Op) -> Result<Option<Controlled>, String> {
        let Some(spool) = self.spool_of(id).cloned() else {
            return Ok(None);
        };
        let Some(queued) = spool.get(id) else {
            return Ok(None);
        };
        let mut picked = Vec::new();
        let mut busy = 0;
        for (i, r) in queued.rcpt.iter().enumerate() {
            let i = i as u32;
            let wanted = match op {
                Op::Release => r.status == RcptStatus::Held,
                // Holding a held recipient changes nothing.
                _ => !(r.status.is_final() || op == Op::Hold && r.status == RcptStatus::Held),
            };
            if !wanted {
                continue;
            }
            if op != Op::Release && self.in_flight.borrow().contains(&(id, i)) {
                busy += 1;
                continue;
            }
            picked.push(i);
        }
        if picked.is_empty() {
            return Ok(Some(Controlled { changed: 0, busy }));
        }
        // Reserved like an attempt's recipients until the change is on record: the
        // scheduler starts no attempt for them meanwhile, and a second control
        // request finds them busy.
        let _reserved = Reserved::new(self, id, &picked);
        let reply = match op {
            Op::Hold => "held by the administrator".to_string(),
            Op::Release => "released by the administrator".to_string(),
            Op::Delete => "deleted by the administrator".to_string(),
            Op::Bounce => returned().to_line(),
        };
        let (status, next) = match op {
            Op::Hold => (RcptStatus::Held, 0),
            Op::Release => (RcptStatus::Deferred, 0),
            Op::Delete | Op::Bounce => (RcptStatus::Failed, 0),
        };
        let updates: Vec<RcptUpdate> = picked
            .iter()
            .map(|&i| RcptUpdate {
                id,
                rcpt: i,
                status,
                attempts: queued.rcpt[i as usize].attempts,
                next_attempt_ms: next,
                reply: reply.clone(),
            })
            .collect();
        let bounce = match op {
            Op::Bounce => {
                let loaded = spool.read_message(id).await.map_err(|e| e.to_string())?;
                let failures = picked
                    .iter()
                    .map(|&i| {
                        let r = loaded.env.recipients[i as usize].clone();
                        (r, returned(), None, super::dsn::Action::Failed)
                    })
                    .collect();
                self.bounce(&spool, &loaded.env, &loaded.message.to_vec(), failures)
                    .await
                    .map_err(|e| e.to_string())?
            }
            _ => None,
        };
        let bounce_id = bounce.as_ref().map(|b| format_id(b.env.id));
        // The queue may have moved on while the message was read (an attempt ended):
        // a recipient final by now is left as it is.
        let updates: Vec<RcptUpdate> = updates
            .into_iter()
            .filter(|u| spool.any_pending_rcpt(id, |i, _| i == u.rcpt))
            .collect();
        let changed = updates.len();
        let idt = format_id(id);
        let recipients: Vec<u32> = updates.iter().map(|u| u.rcpt).collect();
        spool
            .record_outcomes(updates, bounce)
            .await
            .map_err(|e| format!("cannot record the change: {e}"))?;
        // Logged once durable: a line names a change that was made.
        for i in recipients {
            let to = &queued.rcpt[i as usize].to;
            tracing::info!(id = %idt, to = %format!("<{to}>"), status = op.word(), "queue control");
        }
        if let Some(bid) = bounce_id {
            tracing::info!(id = %idt, bounce = %bid, to = %queued.from, "bounce queued");
        }
        if op == Op::Bounce {
            crate::metrics::count(|c| c.recipients_bounced += changed as u64);
        }
        if op == Op::Release {
            spool.wake.notify(usize::MAX);
        }
        Ok(Some(Controlled { changed, busy }))
    }

    /// This executor's queue levels: messages, recipients and bytes by state, and per
    /// destination the attempts running and the recipients due now.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        let now = now_ms();
        let in_flight = self.in_flight.borrow();
        for spool in &self.spools {
            let (segments, live) = spool.store().live_figures();
            g.segments += segments;
            g.live_bytes += live;
            spool.for_each(|m| {
                let mut state = usize::MAX;
                let mut pending = 0;
                for (i, r) in m.rcpt.iter().enumerate() {
                    let s = if in_flight.contains(&(m.id, i as u32)) {
                        ACTIVE
                    } else {
                        match r.status {
                            RcptStatus::Queued => READY,
                            RcptStatus::Deferred if r.next_attempt_ms <= now => READY,
                            RcptStatus::Deferred => DEFERRED,
                            RcptStatus::Held => HELD,
                            RcptStatus::Delivered | RcptStatus::Failed => continue,
                        }
                    };
                    pending += 1;
                    state = state.min(s);
                    let domain = crate::queue::report::domain(&r.to);
                    let e = g.destinations.entry(domain).or_default();
                    if s == READY {
                        e.1 += 1;
                    }
                }
                if state < QUEUE_STATES.len() {
                    let q = &mut g.queue[state];
                    q.messages += 1;
                    q.recipients += pending;
                    q.bytes += m.size;
                }
            });
        }
        for (d, n) in self.per_destination.borrow().iter() {
            // Local deliveries (the key "") hold no connection.
            if !d.is_empty() {
                g.destinations.entry(d.clone()).or_default().0 += *n as u64;
            }
        }
        g
    }
}
