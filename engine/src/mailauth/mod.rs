//! Mail authentication with `mail-auth`: DKIM signing of the mail ringmail sends
//! out for its own domains (`sign.rs`) and the keys it signs with (`keys.rs`:
//! loading the configured ones, `ringmail dkim generate`); verification of mail
//! from outside (`verify.rs`: SPF, DKIM, DMARC, ARC, `Authentication-Results:`) and
//! the removal of forged results (`forged.rs`).

pub mod forged;
pub mod keys;
pub mod sign;
pub mod verify;

pub use keys::{Algorithm, DkimKeyConfig};
pub use sign::Signers;
pub use verify::{MailAuthSettings, Verdict, Verifier};
