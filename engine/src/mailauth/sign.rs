//! DKIM signing (RFC 6376; Ed25519, RFC 8463) of mail ringmail takes from its own
//! users (authenticated sessions, relay networks): when the `From:` domain (or a
//! parent of it) has a key, the message is signed as it is queued, and the
//! `DKIM-Signature:` becomes part of its trace prefix, stored once, sent on every
//! attempt. Relaxed/relaxed canonicalisation.
//!
//! The body is hashed where the session received it, piece by piece (mail-auth's
//! streaming signer), without a copy; only the header section is gathered, to find
//! `From:` and for the signer, which buffers headers itself. The private-key
//! operation runs on the executor: Ed25519 costs tens of microseconds, RSA-2048
//! about a millisecond here (bench/RESULTS.md, "DKIM signing").

use super::keys::DkimKeyConfig;
use crate::smtp::Body;
use mail_auth::common::crypto::DkimKey;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use std::collections::HashMap;

/// Longest header section looked at for `From:`; a message whose headers run longer
/// is sent unsigned (its `From:` would be past what any client writes).
const HEADER_BYTES_MAX: usize = 256 << 10;

/// One domain's signer and its selector.
type Keyed = (DkimSigner<DkimKey, Done>, String);

/// The configured keys, by domain, ready to sign.
#[derive(Default)]
pub struct Signers {
    by_domain: HashMap<String, Keyed>,
}

/// A signature made.
#[derive(Debug)]
pub struct Signed {
    /// `DKIM-Signature: …\r\n`, folded.
    pub header: String,
    /// `d=` and `s=`, for the log.
    pub domain: String,
    pub selector: String,
}

impl Signers {
    /// Loads every key; a domain listed twice, or a key that does not load, is an
    /// error (the server does not start).
    pub fn load(keys: &[DkimKeyConfig]) -> Result<Signers, String> {
        let mut by_domain = HashMap::new();
        for k in keys {
            let key = k.load()?;
            let signer = DkimSigner::from_key(key)
                .domain(k.domain.clone())
                .selector(k.selector.clone())
                .headers(k.signed_headers())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            if by_domain
                .insert(k.domain.to_ascii_lowercase(), (signer, k.selector.clone()))
                .is_some()
            {
                return Err(format!("two DKIM keys for {}: one per domain", k.domain));
            }
        }
        Ok(Signers { by_domain })
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The key for `domain`: its own, else its nearest parent's.
    fn signer_for(&self, domain: &str) -> Option<(&str, &Keyed)> {
        own_then_parents(domain)
            .find_map(|d| self.by_domain.get_key_value(d))
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Signs `prefix` then `body` as one message when its `From:` domain has a key
    /// and `may_sign` allows its `From:` address; None otherwise (or no `From:`).
    pub fn sign(
        &self,
        prefix: &[u8],
        body: &Body,
        may_sign: &dyn Fn(&str) -> bool,
    ) -> Option<Result<Signed, String>> {
        if self.is_empty() {
            return None;
        }
        let from = from_address(prefix, body)?;
        if !may_sign(&from) {
            return None;
        }
        let domain = from.rsplit_once('@')?.1.to_string();
        let (d, (signer, selector)) = self.signer_for(&domain)?;
        let mut stream = signer.sign_streaming();
        stream.write(prefix);
        body.pieces(|p| {
            stream.write(p);
            true
        });
        Some(
            stream
                .finish()
                .map(|sig| Signed {
                    header: unfold_last_tag(sig.to_header()),
                    domain: d.to_string(),
                    selector: selector.clone(),
                })
                .map_err(|e| format!("DKIM signing for {d} failed: {e}")),
        )
    }
}

/// The configured key of `host`'s domain or its nearest parent (the ARC sealing key
/// of a server named `host`).
pub fn key_for<'a>(keys: &'a [DkimKeyConfig], host: &str) -> Option<&'a DkimKeyConfig> {
    own_then_parents(host).find_map(|d| keys.iter().find(|k| k.domain.eq_ignore_ascii_case(d)))
}

/// `domain`, then each parent of it: `a.b.c`, `b.c`, `c`.
fn own_then_parents(domain: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(domain), |d| d.split_once('.').map(|(_, p)| p))
}

/// mail-auth 0.13.3 folds the header after `b=`'s value when the value ends a line
/// (`…==\r\n\t;`), but signed the header with `b=;`: a verifier that empties `b=`'s
/// value keeps that folding white space (RFC 6376 §3.2: it is not part of the value)
/// and its relaxed form `b= ;` no longer matches. dkimpy rejected such RSA-2048
/// signatures; without the fold they verify. Nothing signed changes.
fn unfold_last_tag(header: String) -> String {
    match header.strip_suffix("\r\n\t;\r\n") {
        Some(head) => format!("{head};\r\n"),
        None => header,
    }
}

/// The header section of `prefix` then `body` (through the blank line), at most
/// `max` bytes: a copy of the headers only, the body itself stays where it is.
fn header_section(prefix: &[u8], body: &Body, max: usize) -> Vec<u8> {
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

/// The first address of the message's `From:` (lower case).
fn from_address(prefix: &[u8], body: &Body) -> Option<String> {
    let head = header_section(prefix, body, HEADER_BYTES_MAX);
    let parsed = mail_parser::MessageParser::new().parse_headers(&head[..])?;
    let address = parsed.from()?.first()?.address()?;
    address.contains('@').then(|| address.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailauth::keys::{generate, Algorithm};

    fn signers(tmp: &std::path::Path, alg: Algorithm) -> Signers {
        let (key, _) = generate(tmp, "example.test", "s1", alg).unwrap();
        Signers::load(&[DkimKeyConfig {
            domain: "example.test".into(),
            selector: "s1".into(),
            key,
            algorithm: alg,
            headers: vec![],
        }])
        .unwrap()
    }

    #[test]
    fn the_fold_before_the_last_semicolon_is_taken_out() {
        assert_eq!(
            unfold_last_tag("DKIM-Signature: v=1; b=abc\r\n\t;\r\n".into()),
            "DKIM-Signature: v=1; b=abc;\r\n"
        );
        let plain = "DKIM-Signature: v=1; b=abc;\r\n";
        assert_eq!(unfold_last_tag(plain.into()), plain);
    }

    #[test]
    fn signs_by_from_domain_and_its_subdomains_only() {
        let any = |_: &str| true;
        let tmp = tempfile::tempdir().unwrap();
        let s = signers(tmp.path(), Algorithm::Ed25519);
        let prefix = b"Received: from x by y; Thu, 3 Dec 2026 07:00:00 +0000\r\n";
        let body = |from: &str| {
            Body::from(
                format!("From: A <a@{from}>\r\nTo: b@c.test\r\nSubject: hi\r\n\r\nbody\r\n")
                    .into_bytes(),
            )
        };
        let signed = s
            .sign(prefix, &body("example.test"), &any)
            .unwrap()
            .unwrap();
        assert!(
            signed.header.starts_with("DKIM-Signature: "),
            "{}",
            signed.header
        );
        assert!(
            signed.header.contains("d=example.test"),
            "{}",
            signed.header
        );
        assert!(
            signed.header.contains("a=ed25519-sha256"),
            "{}",
            signed.header
        );
        assert!(signed.header.ends_with("\r\n"));
        let sub = s
            .sign(prefix, &body("news.Example.test"), &any)
            .unwrap()
            .unwrap();
        assert_eq!(sub.domain, "example.test");
        assert!(s.sign(prefix, &body("other.test"), &any).is_none());
        // A From: the sender may not use is not signed.
        assert!(s.sign(prefix, &body("example.test"), &|_| false).is_none());
        assert!(s
            .sign(
                prefix,
                &Body::from(b"Subject: no from\r\n\r\nx\r\n".to_vec()),
                &any
            )
            .is_none());
    }
}
