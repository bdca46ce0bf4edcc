//! TLS for listeners: rustls with the aws-lc-rs provider, TLS 1.3 unless a listener opts into
//! 1.2, X25519MLKEM768 preferred. Certificates and keys are loaded here with errors that say
//! what is wrong with which file; the certificate's OCSP staple, when configured, is read by
//! `ocsp` and sent while it is current (`ListenerCert`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, NamedGroup, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use super::ocsp::Staple;
use crate::config::{ClientAuth, ClientAuthMode, TlsConfig, TlsVersion};

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

    /// The name it is negotiated (and logged) under.
    pub fn name(self) -> &'static str {
        group_name(self.rustls().name())
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
    let key_pem = crate::files::read(key_path, crate::files::SMALL)
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
    let pem = crate::files::read(path, crate::files::SMALL)
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

/// Presents the listener's certificate, with its OCSP staple (`ocsp_response`) while that
/// is current: a response past its nextUpdate makes strict clients refuse the connection,
/// where no staple at all would not, so from then on the certificate goes without it (logged
/// once) until a reload brings a fresh one.
#[derive(Debug)]
struct ListenerCert {
    plain: Arc<CertifiedKey>,
    /// The same certificate with the staple, and the staple (for its times).
    stapled: Option<(Arc<CertifiedKey>, Staple)>,
    /// The file the staple came from, for the log.
    ocsp_path: Option<std::path::PathBuf>,
}

impl ListenerCert {
    fn new(plain: Arc<CertifiedKey>, tls: &TlsConfig) -> ListenerCert {
        let stapled = tls.ocsp.clone().map(|staple| {
            let mut ck = (*plain).clone();
            ck.ocsp = Some(staple.der.clone());
            (Arc::new(ck), staple)
        });
        ListenerCert {
            plain,
            stapled,
            ocsp_path: tls.ocsp_path.clone(),
        }
    }
}

impl ResolvesServerCert for ListenerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some((stapled, staple)) = &self.stapled {
            let now = unix_now() as i64;
            if staple.current(now) {
                return Some(stapled.clone());
            }
            if staple.expired(now) && !staple.expiry_told.swap(true, Ordering::Relaxed) {
                let file = self
                    .ocsp_path
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                tracing::warn!(
                    file = %file,
                    valid_until = %super::ocsp::rfc3339(staple.valid_until()),
                    "OCSP response expired (its nextUpdate passed, or ten days after its thisUpdate if sooner, or a day after it when it has no nextUpdate): the certificate is sent without a staple; refresh the file and reload"
                );
            }
        }
        Some(self.plain.clone())
    }
}

/// A listener's client-certificate verifier (`client_verifier`), shared by its TCP and QUIC
/// configs and by the check of resumed sessions (`recheck_resumed`).
pub type ClientVerifier = Option<Arc<dyn ClientCertVerifier>>;

/// A listener's cache of resumable TLS sessions (rustls keeps them here: no ticket key is
/// set, so TLS 1.3 tickets are stateful too). A reload that keeps the listener's
/// client-certificate rules and its TLS versions and groups hands it to the new TLS settings,
/// so that clients resume across the reload (`Snapshot::build`).
pub type SessionCache = Arc<dyn StoresServerSessions>;

/// A listener's rustls config (TCP or QUIC side) and its session cache. Each connection
/// handshakes with a config of its own (`for_connection`), whose view of the cache carries
/// the time the client last authenticated into the tickets its handshake issues.
pub struct ServerTls {
    config: Arc<ServerConfig>,
    sessions: Arc<AgedSessions>,
}

impl ServerTls {
    fn new(mut config: ServerConfig, cache: Arc<dyn StoresServerSessions>) -> ServerTls {
        let sessions = Arc::new(AgedSessions(cache));
        config.session_storage = sessions.clone();
        ServerTls {
            config: Arc::new(config),
            sessions,
        }
    }

    /// The config one connection handshakes with (a copy: a few reference counts and the
    /// ALPN list, next to a handshake's key exchange and signatures).
    pub fn for_connection(&self) -> Arc<ServerConfig> {
        let mut config = (*self.config).clone();
        config.session_storage = Arc::new(ConnSessions {
            shared: self.sessions.clone(),
            authenticated: AtomicU64::new(NOW),
        });
        Arc::new(config)
    }

    /// The listener-wide config (what `for_connection` copies).
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// Its session cache, for the next snapshot's TLS settings of the same listener.
    pub fn sessions(&self) -> SessionCache {
        self.sessions.0.clone()
    }
}

/// Builds the rustls server config of an `https` listener (TCP: HTTP/1.1 and HTTP/2), with
/// `sessions` (the running snapshot's cache of the listener, when a reload may keep it) or a
/// new, empty cache.
pub fn server_config(
    tls: &TlsConfig,
    verifier: ClientVerifier,
    sessions: Option<SessionCache>,
) -> Result<ServerTls, String> {
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = tls
        .versions
        .iter()
        .map(|v| match v {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        })
        .collect();
    let mut config = base_config(tls, &versions, verifier)?;
    config.alpn_protocols = tls.alpn.clone();
    let cache = sessions.unwrap_or_else(|| config.session_storage.clone());
    Ok(ServerTls::new(config, cache))
}

/// Builds the rustls server config of the same listener's QUIC side: the same certificate,
/// key-exchange groups and client verification as TCP, TLS 1.3 only (QUIC has no other), ALPN
/// `h3`. With `zero_rtt`, resumed clients may send early data: QUIC allows only 0 or
/// `u32::MAX` as the limit, and rustls accepts early data only with stateful resumption,
/// whose single-use session ids refuse a replayed ClientHello within this process.
/// `sessions` as for `server_config` (a cache made for the same `zero_rtt`).
pub fn quic_server_config(
    tls: &TlsConfig,
    zero_rtt: bool,
    verifier: ClientVerifier,
    sessions: Option<SessionCache>,
) -> Result<ServerTls, String> {
    let mut config = base_config(tls, &[&rustls::version::TLS13], verifier)?;
    config.alpn_protocols = vec![b"h3".to_vec()];
    let mut cache = config.session_storage.clone();
    if zero_rtt {
        config.max_early_data_size = u32::MAX;
        cache = rustls::server::ServerSessionMemoryCache::new(QUIC_SESSIONS);
    }
    Ok(ServerTls::new(config, sessions.unwrap_or(cache)))
}

/// Resumable QUIC sessions kept per listener when 0-RTT is on (about 1 KiB each, more with a
/// client certificate chain).
const QUIC_SESSIONS: usize = 4096;

/// What TCP and QUIC share: provider with the listener's groups, protocol versions, client
/// verifier, certificate.
fn base_config(
    tls: &TlsConfig,
    versions: &[&'static rustls::SupportedProtocolVersion],
    verifier: ClientVerifier,
) -> Result<ServerConfig, String> {
    let ck = tls
        .certified_key
        .clone()
        .ok_or_else(|| format!("certificate {} is not loaded", tls.cert_path.display()))?;
    let builder = ServerConfig::builder_with_provider(provider(&tls.key_exchange))
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS settings rejected: {e}"))?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(ListenerCert::new(ck, tls)));
    // Cipher suites in our order. The key-exchange group is the client's first choice among
    // the listener's groups (rustls): browsers and rustls clients list X25519MLKEM768 first;
    // a classical-only client gets X25519.
    config.ignore_client_order = true;
    Ok(config)
}

/// How long after a client authenticated (a full handshake: its certificate checked, its key
/// proven) its sessions can be resumed: the ticket lifetime rustls announces to TLS 1.3
/// clients (a hint it does not enforce), also for TLS 1.2 session IDs. Like BoringSSL's
/// `auth_timeout`: the tickets a resumed handshake issues keep the time of the full handshake
/// the session came from, so resuming every day does not stretch it.
const SESSION_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// `ConnSessions::authenticated` while the connection has resumed nothing: it authenticates
/// now.
const NOW: u64 = u64::MAX;

/// Seconds since the Unix epoch (the clock rustls ages tickets with).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A listener's session cache, each value stored behind the time its client authenticated
/// (`SESSION_MAX_AGE`). rustls itself resumes a session for as long as its cache keeps it.
#[derive(Debug)]
struct AgedSessions(Arc<dyn StoresServerSessions>);

impl AgedSessions {
    /// The session stored in `value` and when its client authenticated, if that is recent
    /// enough at `now`.
    fn fresh(value: Vec<u8>, now: u64) -> Option<(u64, Vec<u8>)> {
        let authenticated = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
        (now.saturating_sub(authenticated) <= SESSION_MAX_AGE.as_secs())
            .then(|| (authenticated, value[8..].to_vec()))
    }

    fn put_at(&self, key: Vec<u8>, value: Vec<u8>, authenticated: u64) -> bool {
        let mut stamped = Vec::with_capacity(8 + value.len());
        stamped.extend_from_slice(&authenticated.to_be_bytes());
        stamped.extend_from_slice(&value);
        self.0.put(key, stamped)
    }
}

/// The listener-wide use (rustls calls it only through a connection's `ConnSessions`; this
/// serves a config used without one).
impl StoresServerSessions for AgedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.put_at(key, value, unix_now())
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        Self::fresh(self.0.get(key)?, unix_now()).map(|(_, v)| v)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        Self::fresh(self.0.take(key)?, unix_now()).map(|(_, v)| v)
    }

    fn can_cache(&self) -> bool {
        self.0.can_cache()
    }
}

/// One connection's view of its listener's session cache: a session it resumes passes on the
/// time its client authenticated to the tickets this handshake issues (rustls issues new
/// ones on every TLS 1.3 resumption, which would otherwise each start a new 24 hours).
#[derive(Debug)]
struct ConnSessions {
    shared: Arc<AgedSessions>,
    /// When the client of the session this connection resumed authenticated (`NOW`: none).
    authenticated: AtomicU64,
}

impl ConnSessions {
    fn resume(&self, stored: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let (authenticated, value) = AgedSessions::fresh(stored?, unix_now())?;
        self.authenticated.store(authenticated, Ordering::Relaxed);
        Some(value)
    }
}

impl StoresServerSessions for ConnSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let authenticated = match self.authenticated.load(Ordering::Relaxed) {
            NOW => unix_now(),
            t => t,
        };
        self.shared.put_at(key, value, authenticated)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.resume(self.shared.0.get(key))
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.resume(self.shared.0.take(key))
    }

    fn can_cache(&self) -> bool {
        self.shared.can_cache()
    }
}

/// Checks the client certificate chain of a resumed session as a full handshake would now.
///
/// A resumed session (a TLS 1.3 ticket, a TLS 1.2 session ID) skips certificate verification:
/// rustls, like OpenSSL, keeps the verdict of the handshake that made the session, and never
/// limits a session's age on the server. Without this check a client could go on resuming,
/// ticket after ticket, with a certificate that had expired since, until a reload emptied the
/// session cache.
pub fn recheck_resumed(
    verifier: &ClientVerifier,
    kind: Option<rustls::HandshakeKind>,
    chain: Option<&[CertificateDer<'_>]>,
) -> Result<(), rustls::Error> {
    // Only a full handshake ran the verifier: anything else is checked (fails closed).
    use rustls::HandshakeKind::{Full, FullWithHelloRetryRequest};
    if matches!(kind, Some(Full | FullWithHelloRetryRequest)) {
        return Ok(());
    }
    let (Some(verifier), Some((leaf, intermediates))) =
        (verifier, chain.and_then(|c| c.split_first()))
    else {
        return Ok(());
    };
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
}

/// Loads every CRL from a file (PEM `X509 CRL` blocks, or one DER CRL). Warns about CRLs past
/// their nextUpdate: with those, every certificate they cover is refused (fail closed).
pub fn load_crls(
    path: &Path,
) -> Result<(Vec<CertificateRevocationListDer<'static>>, Vec<String>), String> {
    let data = crate::files::read(path, crate::files::LARGE)
        .map_err(|e| format!("cannot read CRL file {}: {e}", path.display()))?;
    let mut crls: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_slice_iter(&data)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: malformed PEM: {e}", path.display()))?;
    if crls.is_empty() && data.first() == Some(&0x30) {
        crls.push(CertificateRevocationListDer::from(data));
    }
    if crls.is_empty() {
        return Err(format!(
            "{}: no CRL found (expected PEM \"BEGIN X509 CRL\" blocks or a DER CRL)",
            path.display()
        ));
    }
    let mut warnings = Vec::new();
    let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
    for (i, crl) in crls.iter().enumerate() {
        match x509_parser::parse_x509_crl(crl) {
            Ok((_, parsed)) => {
                if let Some(next) = parsed.next_update() {
                    if next.timestamp() < now {
                        warnings.push(format!(
                            "CRL #{} in {} expired on {} (its nextUpdate); certificates of its issuer are refused until it is renewed",
                            i + 1,
                            path.display(),
                            next
                        ));
                    }
                }
            }
            Err(e) => {
                return Err(format!(
                    "{}: CRL #{} is not valid: {e}",
                    path.display(),
                    i + 1
                ))
            }
        }
    }
    Ok((crls, warnings))
}

/// The client-certificate verifier of a listener, `None` when it does not ask for one.
///
/// webpki does the work (chain to the CA bundle, validity, key usage, CRLs for every
/// certificate of the chain, expired CRLs refused - as nginx does with `ssl_crl`); the wrapper
/// adds the chain-length limit.
pub fn client_verifier(auth: &ClientAuth) -> Result<Option<Arc<dyn ClientCertVerifier>>, String> {
    if auth.mode == ClientAuthMode::None {
        return Ok(None);
    }
    let webpki = |cas: &[CertificateDer<'static>]| {
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots
                .add(ca.clone())
                .map_err(|e| format!("CA certificate not usable as a trust anchor: {e}"))?;
        }
        let mut builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(aws_lc_rs::default_provider()),
        );
        if !auth.crls.is_empty() {
            builder = builder
                .with_crls(auth.crls.iter().cloned())
                .enforce_revocation_expiration();
        }
        if auth.mode == ClientAuthMode::Optional {
            builder = builder.allow_unauthenticated();
        }
        builder
            .build()
            .map_err(|e| format!("client certificate verifier: {e}"))
    };
    let inner = webpki(&auth.cas)?;
    let mut domains = HashMap::new();
    for (domain, cas) in &auth.trust_domains {
        domains.insert(domain.clone(), webpki(cas)?);
    }
    Ok(Some(Arc::new(DepthLimited {
        inner,
        max: auth.max_chain_depth,
        cas: auth.cas.clone(),
        domains,
    })))
}

/// Refuses chains longer than `client_max_chain_depth` before webpki builds a path, and
/// (with `client_trust_domains`) a certificate whose SPIFFE ID names a trust domain its chain
/// does not lead to, or whose `spiffe://` URI SANs make no valid SPIFFE ID.
#[derive(Debug)]
struct DepthLimited {
    inner: Arc<dyn ClientCertVerifier>,
    max: usize,
    /// Copies of trusted CAs that clients send along do not count.
    cas: Vec<CertificateDer<'static>>,
    /// Per trust domain, a verifier that trusts only that domain's bundle.
    domains: HashMap<String, Arc<dyn ClientCertVerifier>>,
}

/// The message of the trust-domain refusal (matched by the handshake log).
pub const WRONG_TRUST_DOMAIN: &str = "client certificate's SPIFFE trust domain";

#[derive(Debug)]
struct WrongTrustDomain(String, &'static str);

impl std::fmt::Display for WrongTrustDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{WRONG_TRUST_DOMAIN} {:?} {}", self.0, self.1)
    }
}

impl std::error::Error for WrongTrustDomain {}

/// The message of the refusal of a certificate that claims a SPIFFE ID it does not make
/// (matched by the handshake log).
pub const INVALID_SPIFFE_ID: &str = "client certificate's URI SANs make no valid SPIFFE ID";

#[derive(Debug)]
struct InvalidSpiffeId(String);

impl std::fmt::Display for InvalidSpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{INVALID_SPIFFE_ID}: {}", self.0)
    }
}

impl std::error::Error for InvalidSpiffeId {}

/// The message of the chain-length refusal (matched by the handshake log).
pub const CHAIN_TOO_LONG: &str = "client certificate chain is longer than client_max_chain_depth";

impl ClientCertVerifier for DepthLimited {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let depth = 1 + intermediates
            .iter()
            .filter(|c| !self.cas.iter().any(|ca| ca.as_ref() == c.as_ref()))
            .count();
        if depth > self.max {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(ChainTooLong(depth, self.max))),
            )));
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.domains.is_empty() {
            return Ok(verified);
        }
        // Bound to its trust domain: the SPIFFE ID's domain must have a bundle, and the chain
        // must lead to it (not merely to some client_ca).
        // A leaf that cannot be read cannot show that it claims no SPIFFE ID.
        let Ok((id, _)) = crate::identity::Identity::from_der(end_entity) else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(InvalidSpiffeId(
                    "the certificate cannot be read for its SPIFFE ID".into(),
                ))),
            )));
        };
        // `spiffe://` URI SANs that make no ID (two of them, a malformed one) still claim a
        // SPIFFE identity, one no domain's bundle vouched for, and an unreadable
        // subjectAltName may hide one: only a certificate that visibly claims none may pass
        // on client_ca alone.
        if let Some(why) = id.spiffe_invalid {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(InvalidSpiffeId(why))),
            )));
        }
        let Some(domain) = id.trust_domain else {
            return Ok(verified);
        };
        let refuse = |why| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(WrongTrustDomain(domain.clone(), why)),
            )))
        };
        match self.domains.get(&domain) {
            None => Err(refuse("has no bundle in client_trust_domains")),
            Some(bound) => bound
                .verify_client_cert(end_entity, intermediates, now)
                .map_err(|_| refuse("is not what the chain leads to")),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct ChainTooLong(usize, usize);

impl std::fmt::Display for ChainTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{CHAIN_TOO_LONG} ({} > {})", self.0, self.1)
    }
}

impl std::error::Error for ChainTooLong {}

/// Why a TCP handshake failed, as logged and counted: a short stable label and the detail.
pub fn handshake_failure(e: &std::io::Error) -> (&'static str, String) {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => (failure_label(tls), tls.to_string()),
        None => ("io", e.to_string()),
    }
}

/// The stable label of a rustls error (the same over TCP and QUIC).
pub fn failure_label(tls: &rustls::Error) -> &'static str {
    use CertificateError as C;
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "untrusted_issuer",
            C::Expired | C::ExpiredContext { .. } => "certificate_expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "certificate_not_yet_valid",
            C::Revoked => "certificate_revoked",
            C::UnknownRevocationStatus => "revocation_status_unknown",
            C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => "crl_expired",
            C::BadSignature => "bad_signature",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "wrong_key_usage",
            C::Other(o) if o.to_string().starts_with(CHAIN_TOO_LONG) => "chain_too_long",
            C::Other(o) if o.to_string().starts_with(WRONG_TRUST_DOMAIN) => "wrong_trust_domain",
            C::Other(o) if o.to_string().starts_with(INVALID_SPIFFE_ID) => "invalid_spiffe_id",
            _ => "invalid_certificate",
        },
        rustls::Error::PeerIncompatible(_) => "incompatible_client",
        rustls::Error::PeerMisbehaved(_) => "client_misbehaved",
        rustls::Error::AlertReceived(_) => "client_alert",
        _ => "tls_error",
    }
}

/// Whether a failure label is about the client certificate (logged at info, counted).
pub fn is_client_cert_failure(label: &str) -> bool {
    CLIENT_CERT_FAILURES.contains(&label)
}

/// The client-certificate failure labels, in the order `ClientCertRejections` counts them.
pub const CLIENT_CERT_FAILURES: [&str; 13] = [
    "no_client_certificate",
    "untrusted_issuer",
    "certificate_expired",
    "certificate_not_yet_valid",
    "certificate_revoked",
    "revocation_status_unknown",
    "crl_expired",
    "bad_signature",
    "wrong_key_usage",
    "chain_too_long",
    "wrong_trust_domain",
    "invalid_spiffe_id",
    "invalid_certificate",
];

/// Handshakes refused because of the client certificate, by reason (kept across reloads;
/// `wraith status` shows them, the metrics exporter reads them).
#[derive(Debug, Default)]
pub struct ClientCertRejections([std::sync::atomic::AtomicU64; CLIENT_CERT_FAILURES.len()]);

impl ClientCertRejections {
    /// Counts one refusal with a label from `handshake_failure`.
    pub fn count(&self, label: &str) {
        if let Some(i) = CLIENT_CERT_FAILURES.iter().position(|l| *l == label) {
            self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Every reason with its count.
    pub fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CLIENT_CERT_FAILURES
            .iter()
            .zip(&self.0)
            .map(|(l, c)| (*l, c.load(std::sync::atomic::Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::StoresServerSessions;

    /// A session is resumable for `SESSION_MAX_AGE` after its client authenticated, not
    /// after that (rustls itself would resume it for as long as its cache kept it).
    #[test]
    fn sessions_are_resumable_for_their_max_age_after_authentication() {
        let made = 1_000u64;
        let mut stored = made.to_be_bytes().to_vec();
        stored.extend_from_slice(b"session");
        let max = SESSION_MAX_AGE.as_secs();
        assert_eq!(
            AgedSessions::fresh(stored.clone(), made + max),
            Some((made, b"session".to_vec()))
        );
        assert_eq!(AgedSessions::fresh(stored, made + max + 1), None);
        assert_eq!(AgedSessions::fresh(b"short".to_vec(), made), None);
    }

    /// The tickets a resumed handshake issues keep the time of the full handshake the session
    /// came from (rustls issues new ones on every TLS 1.3 resumption: stamped anew, a client
    /// resuming once a day would never authenticate again). A full handshake's are stamped
    /// with its own time.
    #[test]
    fn tickets_of_a_resumed_handshake_keep_the_original_authentication_time() {
        let shared = Arc::new(AgedSessions(rustls::server::ServerSessionMemoryCache::new(
            8,
        )));
        let conn = || ConnSessions {
            shared: shared.clone(),
            authenticated: AtomicU64::new(NOW),
        };
        let stamp = |key: &[u8]| {
            let raw = shared.0.get(key).unwrap();
            u64::from_be_bytes(raw[..8].try_into().unwrap())
        };
        // A full handshake 23 hours ago left a ticket.
        let authenticated = unix_now() - 23 * 3600;
        assert!(shared.put_at(b"t1".to_vec(), b"s1".to_vec(), authenticated));
        // A connection resumes it and issues two new tickets: they keep that time.
        let resumed = conn();
        assert_eq!(resumed.take(b"t1").as_deref(), Some(&b"s1"[..]));
        assert!(resumed.put(b"t2".to_vec(), b"s2".to_vec()));
        assert!(resumed.put(b"t3".to_vec(), b"s3".to_vec()));
        assert_eq!((stamp(b"t2"), stamp(b"t3")), (authenticated, authenticated));
        // A full handshake's ticket: now.
        let full = conn();
        assert!(full.put(b"t4".to_vec(), b"s4".to_vec()));
        assert!(unix_now() - stamp(b"t4") <= 1);
        // Past the max age since the authentication, nothing resumes.
        assert!(shared.put_at(b"old".to_vec(), b"s".to_vec(), unix_now() - 25 * 3600));
        assert_eq!(conn().take(b"old"), None);
        assert_eq!(conn().get(b"t2").as_deref(), Some(&b"s2"[..]));
    }
}
