//! Delivery: the scheduler finds due recipients; an attempt takes one message to one
//! domain's MX, or (`local`) into local users' mailboxes; outcomes are logged durably,
//! failures bounce.

pub mod attempt;
pub mod control;
pub mod dsn;
pub mod local;
pub mod scheduler;
pub mod tls;
