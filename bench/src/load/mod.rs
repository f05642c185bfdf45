//! `ringmail-load`: a load generator driven directly by io_uring (one ring per thread).
//!
//! Modes are subcommands. A mode is a sans-IO session plus a [`uring::Protocol`] impl
//! that puts it on the shared ring driver (`uring.rs`): `smtp` (`session.rs`,
//! `smtp.rs`) and `pop3` (`pop3.rs` the session, `pop3run.rs` the run and report);
//! `verify.rs` checks messages a mail client saved.

pub mod pop3;
pub mod pop3run;
pub mod session;
pub mod smtp;
pub mod uring;
pub mod verify;

pub use session::{Plan, TlsMode};
pub use smtp::{Report, SharedBudget, SmtpRun, Stats};
pub use uring::Progress;
