//! TLS for listeners: rustls with the aws-lc-rs provider, TLS 1.3 unless a listener opts into
//! 1.2, X25519MLKEM768 preferred. Certificates and keys are loaded here with errors that say
//! what is wrong with which file.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{NamedGroup, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{TlsConfig, TlsVersion};

/// A key-exchange group Wraith can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KxGroup {
    /// Post-quantum hybrid (ML-KEM-768 + X25519), the default first choice.
    X25519MlKem768,
    X25519,
    Secp256r1,
    Secp384r1,
}

impl KxGroup {
    /// The default preference order.
    pub const DEFAULT: &'static [KxGroup] = &[
        KxGroup::X25519MlKem768,
        KxGroup::X25519,
        KxGroup::Secp256r1,
        KxGroup::Secp384r1,
    ];

    /// Parses the IANA name used in the config.
    pub fn parse(s: &str) -> Option<KxGroup> {
        match s {
            "X25519MLKEM768" => Some(KxGroup::X25519MlKem768),
            "X25519" | "x25519" => Some(KxGroup::X25519),
            "secp256r1" | "P-256" => Some(KxGroup::Secp256r1),
            "secp384r1" | "P-384" => Some(KxGroup::Secp384r1),
            _ => None,
        }
    }

    fn rustls(self) -> &'static dyn rustls::crypto::SupportedKxGroup {
        use aws_lc_rs::kx_group;
        match self {
            KxGroup::X25519MlKem768 => kx_group::X25519MLKEM768,
            KxGroup::X25519 => kx_group::X25519,
            KxGroup::Secp256r1 => kx_group::SECP256R1,
            KxGroup::Secp384r1 => kx_group::SECP384R1,
        }
    }
}

/// The IANA name of a negotiated group, as logged and given to policies.
pub fn group_name(group: NamedGroup) -> &'static str {
    match group {
        NamedGroup::X25519MLKEM768 => "X25519MLKEM768",
        NamedGroup::X25519 => "X25519",
        NamedGroup::secp256r1 => "secp256r1",
        NamedGroup::secp384r1 => "secp384r1",
        NamedGroup::secp521r1 => "secp521r1",
        NamedGroup::MLKEM768 => "MLKEM768",
        NamedGroup::secp256r1MLKEM768 => "SecP256r1MLKEM768",
        _ => "other",
    }
}

/// The aws-lc-rs provider restricted to `groups`, in that order.
pub fn provider(groups: &[KxGroup]) -> Arc<CryptoProvider> {
    let mut p = aws_lc_rs::default_provider();
    p.kx_groups = groups.iter().map(|g| g.rustls()).collect();
    Arc::new(p)
}

/// Why a certificate or key could not be used.
#[derive(Debug)]
pub enum CertError {
    /// The certificate file is the problem.
    Cert(String),
    /// The key file (or its match with the certificate) is the problem.
    Key(String),
}

/// Loads a PEM certificate chain and private key, checks that they belong together, and returns
/// warnings for a certificate that is expired or about to expire.
pub fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Arc<CertifiedKey>, Vec<String>), CertError> {
    let chain = load_certs(cert_path).map_err(CertError::Cert)?;
    let key_pem = fs::read(key_path)
        .map_err(|e| CertError::Key(format!("cannot read key file {}: {e}", key_path.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        CertError::Key(format!(
            "{}: no usable private key (expected PEM PKCS#8, PKCS#1 or SEC1): {e}",
            key_path.display()
        ))
    })?;
    let provider = aws_lc_rs::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        CertError::Key(match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            other => format!("{}: unusable private key: {other}", key_path.display()),
        })
    })?;
    let mut warnings = Vec::new();
    if let Some(leaf) = ck.cert.first() {
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) {
            let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
            let not_after = cert.validity().not_after.timestamp();
            let not_before = cert.validity().not_before.timestamp();
            if not_after < now {
                warnings.push(format!(
                    "certificate {} expired on {}",
                    cert_path.display(),
                    cert.validity().not_after
                ));
            } else if not_after - now < 14 * 86_400 {
                warnings.push(format!(
                    "certificate {} expires soon ({})",
                    cert_path.display(),
                    cert.validity().not_after
                ));
            }
            if not_before > now {
                warnings.push(format!(
                    "certificate {} is not valid before {}",
                    cert_path.display(),
                    cert.validity().not_before
                ));
            }
        }
    }
    Ok((Arc::new(ck), warnings))
}

/// Loads every certificate from a PEM file; fails if there is none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = fs::read(path)
        .map_err(|e| format!("cannot read certificate file {}: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: malformed PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c) {
            return Err(format!(
                "{}: certificate #{} is not valid X.509: {e}",
                path.display(),
                i + 1
            ));
        }
    }
    Ok(certs)
}

/// Always presents the same certificate.
#[derive(Debug)]
struct SingleCert(Arc<CertifiedKey>);

impl ResolvesServerCert for SingleCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Builds the rustls server config of an `https` listener.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let ck = tls
        .certified_key
        .clone()
        .ok_or_else(|| format!("certificate {} is not loaded", tls.cert_path.display()))?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = tls
        .versions
        .iter()
        .map(|v| match v {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        })
        .collect();
    let mut config = ServerConfig::builder_with_provider(provider(&tls.key_exchange))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS settings rejected: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCert(ck)));
    config.alpn_protocols = tls.alpn.clone();
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}
