//! See `targets.rs`; it is a file of its own so that ringmail-tests can include it.
pub mod targets;
