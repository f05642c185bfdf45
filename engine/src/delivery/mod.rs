//! Delivery to remote MX hosts. Built so far: the bounce (DSN) builder. The driver that
//! takes queued recipients to their MX (with `crate::dns`, `crate::smtp::client` and
//! `crate::queue::retry`) is the open part of the delivery issue.

pub mod attempt;
pub mod dsn;
