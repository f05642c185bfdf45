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

/// The header section of `prefix` then `body` (through the blank line), at most
/// `max` bytes: a copy of the headers only, the body itself stays where it is.
pub fn header_section(prefix: &[u8], body: &crate::smtp::Body, max: usize) -> Vec<u8> {
    let mut head = prefix.to_vec();
    let mut end = None;
    body.pieces(|p| {
        let scan_from = head.len().saturating_sub(3);
        head.extend_from_slice(p);
        end = memchr::memmem::find(&head[scan_from..], b"\r\n\r\n").map(|at| scan_from + at + 4);
        end.is_none() && head.len() < max
    });
    head.truncate(end.unwrap_or(head.len()).min(max));
    head
}
