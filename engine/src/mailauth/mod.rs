//! Mail authentication with `mail-auth`: DKIM signing of the mail ringmail sends
//! out for its own domains (`sign.rs`) and the keys it signs with (`keys.rs`:
//! loading the configured ones, `ringmail dkim generate`).
//!
//! Inbound verification (SPF, DKIM, DMARC, ARC) is not built yet.

pub mod keys;
pub mod sign;

pub use keys::{Algorithm, DkimKeyConfig};
pub use sign::Signers;
