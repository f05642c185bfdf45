//! Outbound TLS: the policy per destination domain (`tls-policy DOMAIN=LEVEL`, `*` for
//! every other) and the rustls client settings each level uses.
//!
//! - `none`: never STARTTLS.
//! - `may` (the default): STARTTLS when the server offers it, without checking its
//!   certificate (opportunistic, RFC 7435); a failed handshake is retried once in
//!   plaintext on a new connection.
//! - `encrypt`: TLS required, certificate unchecked; no plaintext fallback.
//! - `verify`: TLS required, with a certificate valid for the MX host's name that
//!   chains to the webpki roots or to `tls-ca-file`.

use crate::smtp::client::TlsWish;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsLevel {
    None,
    May,
    Encrypt,
    Verify,
}

impl TlsLevel {
    pub fn wish(self) -> TlsWish {
        match self {
            TlsLevel::None => TlsWish::Off,
            TlsLevel::May => TlsWish::Opportunistic,
            TlsLevel::Encrypt | TlsLevel::Verify => TlsWish::Required,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
        }
    }
}

impl std::str::FromStr for TlsLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsLevel, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(TlsLevel::None),
            "may" => Ok(TlsLevel::May),
            "encrypt" => Ok(TlsLevel::Encrypt),
            "verify" => Ok(TlsLevel::Verify),
            _ => Err(format!(
                "`{s}` is not a TLS level: none, may, encrypt or verify"
            )),
        }
    }
}

/// What delivery needs for TLS: the policy and the two client settings.
#[derive(Debug, Clone)]
pub struct OutboundTls {
    /// (lower-case domain, level); `*` is every domain not listed.
    pub policies: Vec<(String, TlsLevel)>,
    /// Checks the server's certificate and name (`verify`).
    pub verifying: Arc<ClientConfig>,
    /// Takes any certificate (`may`, `encrypt`): encryption against passive
    /// eavesdroppers, as opportunistic TLS is.
    pub unverified: Arc<ClientConfig>,
}

impl OutboundTls {
    /// `ca_file`: PEM certificates trusted besides the webpki roots.
    pub fn new(policies: Vec<(String, TlsLevel)>, ca_file: Option<&Path>) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            use rustls::pki_types::pem::PemObject;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| format!("cannot read `tls-ca-file` {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "no certificate in `tls-ca-file` {}",
                    path.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("`tls-ca-file` {}: {e}", path.display()))?;
            }
        }
        let builder = || {
            ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))
        };
        let verifying = builder()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let unverified = builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                provider::default_provider().signature_verification_algorithms,
            )))
            .with_no_client_auth();
        Ok(OutboundTls {
            policies,
            verifying: Arc::new(verifying),
            unverified: Arc::new(unverified),
        })
    }

    /// The level for mail to `domain`: its own entry, else `*`'s, else `may`.
    pub fn level(&self, domain: &str) -> TlsLevel {
        let find = |d: &str| {
            self.policies
                .iter()
                .find(|(p, _)| p.eq_ignore_ascii_case(d))
                .map(|(_, l)| *l)
        };
        find(domain).or_else(|| find("*")).unwrap_or(TlsLevel::May)
    }

    pub fn client_config(&self, level: TlsLevel) -> Arc<ClientConfig> {
        match level {
            TlsLevel::Verify => self.verifying.clone(),
            _ => self.unverified.clone(),
        }
    }
}

/// Accepts whatever certificate the server shows (its signatures on the handshake
/// are still checked, so the session is encrypted to whoever holds that key).
#[derive(Debug)]
struct AnyCertificate(rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domains_own_level_then_the_default_then_may() {
        let t = OutboundTls::new(
            vec![
                ("bank.test".into(), TlsLevel::Verify),
                ("*".into(), TlsLevel::Encrypt),
            ],
            None,
        )
        .unwrap();
        assert_eq!(t.level("BANK.test"), TlsLevel::Verify);
        assert_eq!(t.level("other.test"), TlsLevel::Encrypt);
        let t = OutboundTls::new(vec![], None).unwrap();
        assert_eq!(t.level("other.test"), TlsLevel::May);
        assert_eq!("VERIFY".parse::<TlsLevel>(), Ok(TlsLevel::Verify));
        assert!("strict".parse::<TlsLevel>().is_err());
    }
}
