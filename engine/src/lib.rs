//! ringmail's engine: the thread-per-core runtime, SMTP ingest, the queue, and the
//! `ringmail` command line. See ARCHITECTURE.md for the code map.

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod ingest;
pub mod mailauth;
pub mod mailbox;
pub mod metrics;
pub mod net;
pub mod pop3;
pub mod privileges;
pub mod queue;
pub mod reload;
pub mod runtime;
pub mod smtp;
pub mod storeservice;
