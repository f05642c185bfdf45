//! Fixtures shared by the queue's tests.

use super::model::{QueuedMessage, RcptStatus};
use ringmail_store::message::{Envelope, RcptUpdate, Recipient};

pub(crate) fn env(id: u64, rcpts: usize) -> Envelope {
    Envelope {
        id,
        from: "a@src.test".into(),
        recipients: (0..rcpts)
            .map(|i| Recipient {
                address: format!("r{i}@dst.test"),
                ..Recipient::default()
            })
            .collect(),
        ..Envelope::default()
    }
}

/// A fresh data directory with a one-shard manifest.
pub(crate) fn fresh_data() -> (tempfile::TempDir, std::path::PathBuf) {
    fresh_data_with(1)
}

/// A fresh data directory with a manifest of `shards` shards.
pub(crate) fn fresh_data_with(shards: u32) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().to_path_buf();
    ringmail_store::manifest::open_or_create(&data, shards).unwrap();
    (d, data)
}

pub(crate) fn rcpt_states(m: &QueuedMessage) -> Vec<(RcptStatus, u32)> {
    m.rcpt.iter().map(|r| (r.status, r.attempts)).collect()
}

pub(crate) fn update(id: u64, rcpt: u32, status: RcptStatus, attempts: u32) -> RcptUpdate {
    RcptUpdate {
        id,
        rcpt,
        status,
        attempts,
        next_attempt_ms: if status == RcptStatus::Deferred {
            1_900_000_000_000
        } else {
            0
        },
        reply: format!("{} reply", status.as_str()),
    }
}
