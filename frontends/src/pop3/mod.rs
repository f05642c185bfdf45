//! The POP3 server core, sans-IO (RFC 1939, with RFC 2449 CAPA, response codes and
//! pipelining, RFC 5034 AUTH with RFC 4616 PLAIN, RFC 3206 codes). No sockets, files,
//! clocks or executors in here: the glommio driver in the engine feeds it bytes, answers
//! its [`Step`]s (check a password, stream a message, expunge) and writes its output.
//!
//! - [`Session`] (`session.rs`) is the state machine: AUTHORIZATION (USER/PASS, AUTH
//!   PLAIN, CAPA, QUIT), TRANSACTION (STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, RSET,
//!   CAPA, QUIT), UPDATE (the expunge after QUIT). The maildrop is the list of
//!   [`Message`]s handed over at login, fixed for the session; deletions are only
//!   marks until QUIT.
//! - [`Stuffer`] and [`Top`] (`stuff.rs`) turn a message's bytes into the body of a
//!   multi-line response, chunk by chunk, so a large message is never held whole.
//!
//! **Invariants.**
//! - Replies come in the order of the commands, and the output depends only on the
//!   bytes received, never on how they were split into `push()` calls (pipelining,
//!   RFC 2449: any number of commands may arrive in one read).
//! - While a step is outstanding (a login, a retrieval, the expunge), no further
//!   command is handled: input waits in the buffer and `process()` returns NeedInput.
//! - Input held is bounded per line: a line over its limit (255 octets with its CRLF
//!   for a command, more for a SASL response) is answered "-ERR line too long" and its
//!   bytes are dropped as they arrive, never buffered whole.
//! - No input panics; every -ERR counts, and `error_count_max` of them close the
//!   session.
//! - No plaintext password is ever needed: APOP is neither implemented nor advertised.

pub mod session;
pub mod stuff;

pub use session::{Config, Login, Message, Session, State, Step, Waiting};
pub use stuff::{Stuffer, Top};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod stuff_tests;
