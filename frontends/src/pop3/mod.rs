//! POP3 (RFC 1939, RFC 2449 CAPA and response codes, RFC 5034 AUTH PLAIN) as a
//! sans-IO session: the driver pushes received bytes, calls `process`, writes
//! `output`, and answers the steps that need the world (a password check with the
//! maildrop, a message to stream, the UPDATE state's expunge).
//!
//! Architecture invariant: no sockets, files, clocks or executors here; no input
//! makes it panic or buffer without bound (a line is kept only up to the SASL line
//! limit); while a step is outstanding no further command is handled, so replies
//! stay in the order of the commands (RFC 2449 PIPELINING).
//! APOP is neither implemented nor advertised: it needs the plaintext password on
//! the server, and ringmail keeps only argon2id hashes.

mod session;
mod stuff;
#[cfg(test)]
mod tests;

pub use session::{Config, Login, Message, Session, State, Step};
pub use stuff::{Stuffer, Top};
