//! Delivery to remote MX hosts: the scheduler finds due recipients, an attempt takes
//! one message to one domain's MX, outcomes are logged durably, failures bounce.

pub mod attempt;
pub mod dsn;
pub mod scheduler;
