//! SMTP protocol cores, sans-IO: no sockets, files, clocks or executors in here (the
//! glommio driver is `crate::ingest`). See ARCHITECTURE.md, "Bird's eye".

pub mod address;
pub mod body;
pub mod client;
pub mod headers;
pub mod received;
pub mod server;
pub mod types;

pub use body::Body;
pub use server::{
    AuthVerdict, Config, Limits, LocalRecipients, LocalVerdict, Session, Step, Transaction,
};
pub use types::{notify, BodyType, Recipient, Ret};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod client_tests;
