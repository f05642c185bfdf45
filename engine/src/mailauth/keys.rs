//! DKIM keys: the `[[dkim]]` entries of the config, loading their PEM files into
//! `mail-auth`'s ring-backed keys, and `ringmail dkim generate`.
//!
//! RSA keys are generated with the `rsa` crate (ring cannot generate RSA keys), but
//! never used by it: signing is ring's, whose RSA is constant-time (the `rsa`
//! crate's signing has a timing advisory, RUSTSEC-2023-0071).

use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where `dkim generate` writes keys, under the data directory.
pub const KEY_DIR: &str = "dkim";

/// The signing algorithm of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Algorithm {
    #[default]
    #[serde(rename = "ed25519")]
    Ed25519,
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::RsaSha256 => "rsa-sha256",
        }
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Algorithm, String> {
        match s.to_ascii_lowercase().as_str() {
            "ed25519" | "ed25519-sha256" => Ok(Algorithm::Ed25519),
            "rsa-sha256" | "rsa" => Ok(Algorithm::RsaSha256),
            _ => Err(format!(
                "`{s}` is not a DKIM algorithm: ed25519 or rsa-sha256"
            )),
        }
    }
}

/// Headers signed by default (RFC 6376 §5.4.1's list, in its spirit); From, To and
/// Subject appear twice: the second, absent instance is oversigned, so that a copy of
/// them added later breaks the signature.
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "From",
    "To",
    "To",
    "Subject",
    "Subject",
    "Date",
    "Message-ID",
    "Cc",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// One `[[dkim]]` entry: mail whose `From:` is in `domain` is signed with this key.
/// As a flag: `--dkim domain=D,selector=S,key=PATH[,algorithm=A][,headers=H1:H2:…]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DkimKeyConfig {
    pub domain: String,
    pub selector: String,
    /// PEM, PKCS#8 (PKCS#1 is taken for RSA too).
    pub key: PathBuf,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Header fields to sign; empty: `DEFAULT_HEADERS`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

impl DkimKeyConfig {
    /// The headers to sign: the configured ones (or the default), From, To and
    /// Subject always oversigned.
    pub fn signed_headers(&self) -> Vec<String> {
        if self.headers.is_empty() {
            return DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect();
        }
        let mut h = self.headers.clone();
        for must in ["From", "To", "Subject"] {
            let n = h.iter().filter(|x| x.eq_ignore_ascii_case(must)).count();
            h.extend(std::iter::repeat_n(
                must.to_string(),
                2usize.saturating_sub(n),
            ));
        }
        h
    }

    /// Reads the key file.
    pub fn load(&self) -> Result<DkimKey, String> {
        let pem = std::fs::read(&self.key)
            .map_err(|e| format!("cannot read the DKIM key {}: {e}", self.key.display()))?;
        let bad = |e: &dyn fmt::Display| {
            format!(
                "the DKIM key {} is not a {} private key in PEM: {e}",
                self.key.display(),
                self.algorithm.name()
            )
        };
        let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(&e))?;
        match self.algorithm {
            Algorithm::RsaSha256 => RsaKey::<Sha256>::from_key_der(der)
                .map(DkimKey::Rsa)
                .map_err(|e| bad(&e)),
            Algorithm::Ed25519 => {
                let PrivateKeyDer::Pkcs8(der) = der else {
                    return Err(bad(&"an Ed25519 key must be PKCS#8"));
                };
                // PKCS#8 v1 (OpenSSL's, without the public key) as well as v2.
                Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der())
                    .map(DkimKey::Ed25519)
                    .map_err(|e| bad(&e))
            }
        }
    }
}

impl FromStr for DkimKeyConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<DkimKeyConfig, String> {
        let (mut domain, mut selector, mut key) = (None, None, None);
        let (mut algorithm, mut headers) = (Algorithm::default(), Vec::new());
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` in `{s}` is not NAME=VALUE"))?;
            let v = v.trim();
            match k.trim() {
                "domain" => domain = Some(v.to_ascii_lowercase()),
                "selector" => selector = Some(v.to_string()),
                "key" => key = Some(PathBuf::from(v)),
                "algorithm" => algorithm = v.parse()?,
                "headers" => headers = v.split(':').map(|h| h.trim().to_string()).collect(),
                other => {
                    return Err(format!(
                        "`{other}` is not a DKIM key setting: domain, selector, key, algorithm or headers"
                    ))
                }
            }
        }
        let need = |what: &str| format!("`{s}` lacks {what}=");
        let c = DkimKeyConfig {
            domain: domain.ok_or_else(|| need("domain"))?,
            selector: selector.ok_or_else(|| need("selector"))?,
            key: key.ok_or_else(|| need("key"))?,
            algorithm,
            headers,
        };
        c.check()?;
        Ok(c)
    }
}

impl DkimKeyConfig {
    /// The names are usable in DNS (`SELECTOR._domainkey.DOMAIN`).
    pub fn check(&self) -> Result<(), String> {
        if !crate::config::is_host_name(&self.domain) {
            return Err(format!(
                "DKIM domain `{}` is not a domain name",
                self.domain
            ));
        }
        let label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !self.selector.split('.').all(label) {
            return Err(format!(
                "DKIM selector `{}` is not a DNS label (letters, digits, `-`, `_`)",
                self.selector
            ));
        }
        if self
            .headers
            .iter()
            .any(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
        {
            return Err(format!(
                "DKIM headers {:?}: not all are field names",
                self.headers
            ));
        }
        Ok(())
    }
}

impl fmt::Display for DkimKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "domain={},selector={},key={},algorithm={}",
            self.domain,
            self.selector,
            self.key.display(),
            self.algorithm.name()
        )?;
        if !self.headers.is_empty() {
            write!(f, ",headers={}", self.headers.join(":"))?;
        }
        Ok(())
    }
}

/// A new key for `domain` and `selector` in `DATA/dkim/DOMAIN.SELECTOR.key` (PKCS#8
/// PEM, mode 0600; an existing file is never replaced), and the DNS record to publish
/// for it: `SELECTOR._domainkey.DOMAIN. IN TXT "v=DKIM1; k=…; p=…"`, the value in
/// quoted pieces of at most 255 octets (RFC 1035 §3.3.14).
pub fn generate(
    data: &Path,
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
) -> Result<(PathBuf, String), String> {
    let config = DkimKeyConfig {
        domain: domain.to_ascii_lowercase(),
        selector: selector.to_string(),
        key: PathBuf::new(),
        algorithm,
        headers: vec![],
    };
    config.check()?;
    let (pem, k, public) = match algorithm {
        Algorithm::Ed25519 => {
            let der = Ed25519Key::generate_pkcs8().map_err(|e| format!("key generation: {e}"))?;
            let key = Ed25519Key::from_pkcs8_der(&der).map_err(|e| format!("key: {e}"))?;
            let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der));
            (pem, "ed25519", key.public_key())
        }
        Algorithm::RsaSha256 => {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| format!("RSA key generation: {e}"))?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| format!("RSA key: {e}"))?
                .to_string();
            // SubjectPublicKeyInfo, as RFC 6376 §3.6.1 has p= carry.
            let public = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| format!("RSA public key: {e}"))?
                .into_vec();
            (pem, "rsa", public)
        }
    };
    let dir = data.join(KEY_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(format!("{}.{selector}.key", config.domain));
    write_new_key(&path, pem.as_bytes())?;
    use base64::Engine;
    let value = format!(
        "v=DKIM1; k={k}; p={}",
        base64::engine::general_purpose::STANDARD.encode(public)
    );
    let quoted: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    let record = format!(
        "{selector}._domainkey.{}. IN TXT {}",
        config.domain,
        quoted.join(" ")
    );
    Ok((path, record))
}

/// Creates `path` (failing if it exists), mode 0600, synced.
fn write_new_key(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "{} exists: a key is never replaced (remove it, or use another selector)",
                path.display()
            ),
            _ => fail(e),
        })?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(fail)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_form_reads_back_and_bad_entries_say_why() {
        let c: DkimKeyConfig = "domain=Example.COM,selector=s1,key=/k.pem,algorithm=rsa-sha256"
            .parse()
            .unwrap();
        assert_eq!(c.domain, "example.com");
        assert_eq!(c.algorithm, Algorithm::RsaSha256);
        assert_eq!(c.to_string().parse::<DkimKeyConfig>().unwrap(), c);
        let h: DkimKeyConfig = "domain=a.test,selector=s,key=k,headers=From:Date"
            .parse()
            .unwrap();
        // From, To and Subject always oversigned.
        let signed = h.signed_headers();
        assert_eq!(signed.iter().filter(|x| *x == "From").count(), 2);
        assert_eq!(signed.iter().filter(|x| *x == "Subject").count(), 2);
        assert!(signed.contains(&"Date".to_string()));
        for bad in [
            "domain=a.test,selector=s",
            "domain=a.test,selector=bad sel,key=k",
            "domain=not a domain,selector=s,key=k",
            "domain=a.test,selector=s,key=k,algorithm=dsa",
            "domain=a.test,selector=s,key=k,colour=red",
        ] {
            assert!(bad.parse::<DkimKeyConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_keys_load_and_are_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        for (alg, k) in [
            (Algorithm::Ed25519, "ed25519"),
            (Algorithm::RsaSha256, "rsa"),
        ] {
            let (path, record) = generate(tmp.path(), "Example.test", "s1", alg).unwrap();
            assert!(record.starts_with(&format!(
                "s1._domainkey.example.test. IN TXT \"v=DKIM1; k={k}; p="
            )));
            // Every quoted piece fits a DNS character-string.
            let value = record.split_once(" IN TXT ").unwrap().1;
            for piece in value.split("\" \"") {
                assert!(piece.trim_matches('"').len() <= 255, "{piece}");
            }
            let config = DkimKeyConfig {
                domain: "example.test".into(),
                selector: "s1".into(),
                key: path.clone(),
                algorithm: alg,
                headers: vec![],
            };
            config.load().unwrap();
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let again = generate(tmp.path(), "example.test", "s1", alg).unwrap_err();
            assert!(again.contains("never replaced"), "{again}");
            std::fs::remove_file(&path).unwrap();
        }
        // A key of the other algorithm is refused with the reason.
        let (path, _) = generate(tmp.path(), "example.test", "s2", Algorithm::Ed25519).unwrap();
        let wrong = DkimKeyConfig {
            domain: "example.test".into(),
            selector: "s2".into(),
            key: path,
            algorithm: Algorithm::RsaSha256,
            headers: vec![],
        };
        match wrong.load() {
            Err(e) => assert!(e.contains("rsa-sha256"), "{e}"),
            Ok(_) => panic!("an Ed25519 key loaded as RSA"),
        }
    }
}
