//! `ringmail-load verify`: checks messages that a mail client saved (one file each:
//! an MDA's output, a maildir's `new/` and `cur/`) against what `ringmail-load smtp`
//! sent: each must carry its `X-Load-Checksum` and match it, and the sequence
//! numbers in their `Subject: ringmail-load N` must be distinct. Clients store mail
//! with bare LF line ends; those are put back to CRLF before the check (the load
//! tool sends CRLF only), and headers a client adds in front change nothing.

use super::session::verify;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What the files held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verified {
    pub files: u64,
    /// Checksum present and matching.
    pub verified: u64,
    pub mismatched: u64,
    /// No checksum header.
    pub unverified: u64,
    /// Distinct sequence numbers seen, and files whose number was seen before.
    pub distinct: u64,
    pub duplicates: u64,
    /// Names of the files that failed (at most 20), for the report.
    pub bad: Vec<String>,
}

/// Bare LF line ends to CRLF (CRLF ones untouched).
pub fn to_crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 40);
    let mut prev = 0u8;
    for &b in text {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

/// The `N` of a `Subject: ringmail-load N` header.
fn sequence(message: &[u8]) -> Option<u64> {
    let end = memchr::memmem::find(message, b"\r\n\r\n").unwrap_or(message.len());
    let head = std::str::from_utf8(&message[..end]).ok()?;
    head.split("\r\n")
        .find_map(|h| h.strip_prefix("Subject: ringmail-load "))
        .and_then(|n| n.trim().parse().ok())
}

/// Checks one message's text.
pub fn check(v: &mut Verified, seen: &mut BTreeSet<u64>, name: &str, text: &[u8]) {
    let m = to_crlf(text);
    v.files += 1;
    match verify(&m) {
        Some(true) => v.verified += 1,
        Some(false) => {
            v.mismatched += 1;
            if v.bad.len() < 20 {
                v.bad.push(name.to_string());
            }
        }
        None => v.unverified += 1,
    }
    if let Some(seq) = sequence(&m) {
        if seen.insert(seq) {
            v.distinct += 1;
        } else {
            v.duplicates += 1;
        }
    }
}

/// The files under `paths`: files as given, directories walked (hidden entries and
/// a maildir's `tmp/` skipped).
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if !meta.is_dir() {
            out.push(p.to_path_buf());
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|e| {
                let name = e.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.') && name != "tmp"
            })
            .collect();
        entries.sort();
        for e in entries {
            walk(&e, out)?;
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    Ok(out)
}

pub fn verify_paths(paths: &[PathBuf]) -> Result<Verified, String> {
    let mut v = Verified::default();
    let mut seen = BTreeSet::new();
    for f in files(paths)? {
        let text = std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        check(&mut v, &mut seen, &f.display().to_string(), &text);
    }
    Ok(v)
}

impl Verified {
    pub fn json(&self) -> String {
        serde_json::json!({
            "files": self.files, "verified": self.verified, "mismatched": self.mismatched,
            "unverified": self.unverified, "distinct": self.distinct,
            "duplicates": self.duplicates, "bad": self.bad,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::session::message;

    #[test]
    fn saved_messages_verify_with_lf_and_added_headers() {
        let mut v = Verified::default();
        let mut seen = BTreeSet::new();
        let m = message(5, 3000, "a@b", "c@d");
        // As an MDA gets it from fetchmail: LF line ends, a Received line in front.
        let mut lf = b"Received: from pop3 by fetchmail\n".to_vec();
        lf.extend(
            String::from_utf8(m.clone())
                .unwrap()
                .replace("\r\n", "\n")
                .bytes(),
        );
        check(&mut v, &mut seen, "a", &lf);
        check(&mut v, &mut seen, "b", &m);
        let mut bad = m.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        check(&mut v, &mut seen, "c", &bad);
        check(&mut v, &mut seen, "d", b"Subject: other\n\nbody\n");
        check(&mut v, &mut seen, "e", &message(6, 100, "a@b", "c@d"));
        assert_eq!(
            (v.files, v.verified, v.mismatched, v.unverified),
            (5, 3, 1, 1)
        );
        assert_eq!((v.distinct, v.duplicates), (2, 2));
        assert_eq!(v.bad, vec!["c".to_string()]);
        assert_eq!(to_crlf(b"a\nb\r\nc"), b"a\r\nb\r\nc");
    }
}
