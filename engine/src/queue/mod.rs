//! The queue: what each shard holds for delivery, rebuilt from its log at start.
//!
//! A [`Spool`] is one shard's queue on its executor: the log writer and an in-memory
//! index of queued messages (envelopes and body locations; bodies stay on disk).
//! [`list`] reads the same logs offline with the same recovery code, for
//! `ringmail queue list`.
//!
//! - `model`: queued messages and recipients, queue ids.
//! - `json`: the `queue list --json` form.
//! - `replay`: rebuilding the index from the log.
//! - `spool`: the write path, the ready queue and the retry timers.
//! - `cache`: message text for delivery, from memory or the log.
//! - `compaction`: deleting finished segments, copying live messages forward.
//! - `report`: the `qshape`-like summary and the listing filters (admin API, CLI).

mod cache;
mod compaction;
mod json;
mod model;
mod replay;
pub mod report;
pub mod retry;
mod spool;
#[cfg(test)]
mod testutil;

pub use cache::{BodyBytes, Loaded, MessageText};
pub use model::{make_id, QueuedMessage, QueuedRcpt, RcptStatus};
pub use replay::{list, recover, Recovered};
pub use spool::{Bounce, Spool};
