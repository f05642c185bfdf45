//! SMTP protocol cores, sans-IO: no sockets, files, clocks or executors in here (the
//! glommio driver is `crate::ingest`). See ARCHITECTURE.md, "Bird's eye".

pub mod address;
pub mod client;
pub mod headers;
pub mod received;
pub mod server;

pub use server::{Config, Limits, Session, Step, Transaction};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod client_tests;
