//! The server's TLS certificates: PEM files from the config (several, chosen by the
//! name the client asks for with SNI), or, when none are configured, a self-signed
//! certificate for the hostname made on first start and kept in the data directory.

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the self-signed certificate of the embedded default lives.
pub const SELF_SIGNED_DIR: &str = "tls";

/// A certificate chain and its key, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// The server's TLS settings as every listener and STARTTLS takes them: replaced
/// whole when the certificates are re-read (SIGHUP), never changed in place, so a
/// session goes on with the settings its handshake used.
pub struct ServerTls {
    current: arc_swap::ArcSwap<ServerConfig>,
    files: Vec<CertFiles>,
    data: PathBuf,
    hostname: String,
}

impl ServerTls {
    pub fn load(files: &[CertFiles], data: &Path, hostname: &str) -> Result<ServerTls, String> {
        Ok(ServerTls {
            current: arc_swap::ArcSwap::new(server_config(files, data, hostname)?),
            files: files.to_vec(),
            data: data.to_path_buf(),
            hostname: hostname.to_string(),
        })
    }

    /// The settings for a handshake starting now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Reads the certificate and key files again. On any error the settings in use
    /// stay, whole. The session cache carries over, so clients resume as before.
    pub fn reload(&self) -> Result<(), String> {
        let mut fresh = server_config(&self.files, &self.data, &self.hostname)?;
        let storage = self.current.load().session_storage.clone();
        Arc::get_mut(&mut fresh)
            .expect("a config nobody else holds yet")
            .session_storage = storage;
        self.current.store(fresh);
        Ok(())
    }

    /// What `reload` reads, for the log.
    pub fn describe(&self) -> String {
        if self.files.is_empty() {
            return format!("the self-signed certificate for {}", self.hostname);
        }
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.certificate.display().to_string())
            .collect();
        names.join(", ")
    }
}

/// The rustls server settings for every TLS listener and STARTTLS: `files` in order
/// (the first is the default when no SNI name matches), or the self-signed
/// certificate for `hostname` under `data` when `files` is empty.
pub fn server_config(
    files: &[CertFiles],
    data: &Path,
    hostname: &str,
) -> Result<Arc<ServerConfig>, String> {
    let files = if files.is_empty() {
        vec![self_signed(data, hostname)?]
    } else {
        files.to_vec()
    };
    let mut keys = Vec::with_capacity(files.len());
    for f in &files {
        keys.push(Arc::new(load(f)?));
    }
    let config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { keys }));
    Ok(Arc::new(config))
}

fn load(f: &CertFiles) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.certificate)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            format!(
                "cannot read certificates from {}: {e}",
                f.certificate.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!("no certificate in {}", f.certificate.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&f.key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", f.key.display()))?;
    let signer = provider::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: unusable key: {e}", f.key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            f.key.display(),
            f.certificate.display()
        )
    })?;
    Ok(ck)
}

/// The self-signed certificate for `hostname` (and `localhost`), made once: its
/// files are named after the hostname, so a new hostname gets a new certificate.
fn self_signed(data: &Path, hostname: &str) -> Result<CertFiles, String> {
    let dir = data.join(SELF_SIGNED_DIR);
    let files = CertFiles {
        certificate: dir.join(format!("{hostname}.pem")),
        key: dir.join(format!("{hostname}.key")),
    };
    if files.certificate.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut names = vec![hostname.to_string()];
    if hostname != "localhost" {
        names.push("localhost".into());
    }
    let fail = |e: rcgen::Error| format!("cannot make a self-signed certificate: {e}");
    let mut params = rcgen::CertificateParams::new(names).map_err(fail)?;
    // The subject names the host too (clients show it), not rcgen's placeholder.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    write_new(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&files.certificate, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(certificate = %files.certificate.display(), "made a self-signed TLS certificate");
    Ok(files)
}

/// Writes a file whole and durably under a temporary name, then renames it in place.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// Picks the first certificate valid for the SNI name, else the first of all.
#[derive(Debug)]
struct BySni {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if self.keys.len() > 1 {
            if let Some(name) = hello
                .server_name()
                .and_then(|n| ServerName::try_from(n).ok())
            {
                let fits = |ck: &&Arc<CertifiedKey>| {
                    ck.end_entity_cert().ok().is_some_and(|der| {
                        webpki::EndEntityCert::try_from(der)
                            .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
                    })
                };
                if let Some(ck) = self.keys.iter().find(fits) {
                    return Some(ck.clone());
                }
            }
        }
        self.keys.first().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_signed_certificate_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        server_config(&[], dir.path(), "mx.example.test").unwrap();
        let pem = dir.path().join("tls/mx.example.test.pem");
        let first = std::fs::read(&pem).unwrap();
        server_config(&[], dir.path(), "mx.example.test").unwrap();
        assert_eq!(std::fs::read(&pem).unwrap(), first, "made again");
        use std::os::unix::fs::PermissionsExt;
        let key = std::fs::metadata(dir.path().join("tls/mx.example.test.key")).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn sni_picks_the_certificate_for_the_name_and_falls_back_to_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = self_signed(dir.path(), "a.example.test").unwrap();
        let b = self_signed(dir.path(), "b.example.test").unwrap();
        let r = BySni {
            keys: vec![Arc::new(load(&a).unwrap()), Arc::new(load(&b).unwrap())],
        };
        let name = |s: &'static str| ServerName::try_from(s).unwrap();
        let fits = |ck: &CertifiedKey, n: &ServerName| {
            webpki::EndEntityCert::try_from(ck.end_entity_cert().unwrap())
                .unwrap()
                .verify_is_valid_for_subject_name(n)
                .is_ok()
        };
        // The resolver's own choice is checked end to end (tests/tests/tls.rs); here the
        // name check it relies on.
        assert!(fits(&r.keys[1], &name("b.example.test")));
        assert!(!fits(&r.keys[0], &name("b.example.test")));
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = self_signed(dir.path(), "a.example.test").unwrap();
        let b = self_signed(dir.path(), "b.example.test").unwrap();
        let mixed = CertFiles {
            certificate: a.certificate,
            key: b.key,
        };
        let e = load(&mixed).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
    }
}
