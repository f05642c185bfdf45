//! ringmail's log-structured store.
//!
//! Each shard owns an append-only log of segment files made of CRC-checked records.
//! Message bodies are written once, together with their envelope; everything that refers
//! to a body later holds a [`Location`]. The writer ([`log::ShardLog`]) runs on the
//! shard's glommio executor and makes batches durable with one `fdatasync` each (group
//! commit). Recovery ([`segment::recover_shard`]) is plain synchronous code shared by the
//! server at start and by the offline commands; it streams each segment through a
//! bounded buffer, so its memory is bounded by the largest record, not by a segment.
//!
//! Architecture invariant: a record is reported durable only after the `fdatasync` that
//! covers it returned; bytes of a batch that failed are cut off (or fenced off by the
//! next segment's header) before the batch is answered, so they are never replayed. A
//! shard that can do neither stops taking records until a restart.

pub mod accounts;
pub mod codec;
pub mod crc;
pub mod handle;
pub mod log;
pub mod mailbox;
pub mod mailcache;
pub mod manifest;
pub mod message;
pub mod mime;
pub mod reader;
pub mod record;
pub mod segment;
pub mod shard;
pub mod stats;

pub use handle::{Handle, PinGuard, Pins, Resolved};
pub use log::{BodySource, FaultPoint, Faults, LogBytes, LogConfig, LogError, ShardLog, Ticket};
pub use reader::{LocalPin, Owner, SegmentFiles, SharedBuf};
pub use record::Kind;
pub use segment::{Location, Mode, RecoveryOptions, RecoveryReport, Tail};
pub use shard::{Index, Replayed, Shard};
