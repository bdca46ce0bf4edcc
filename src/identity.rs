//! Who is calling: the verified client certificate turned into an `Identity`.
//!
//! The listener builds one per connection, once, right after the TLS handshake verified the
//! chain; every request on the connection shares it (`ConnInfo::identity`). Later stages
//! (policy, rate limits, logs) read it and never look at client-supplied headers for identity.

/// The identity carried by a verified client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// `spiffe://trust-domain/path`, from the URI SAN.
    pub spiffe_id: Option<String>,
    /// The trust domain of the SPIFFE ID (`trust-domain`).
    pub trust_domain: Option<String>,
    /// The path of the SPIFFE ID (`/path`).
    pub spiffe_path: Option<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// Email SANs.
    pub emails: Vec<String>,
    /// Subject common name.
    pub common_name: Option<String>,
    /// Subject organizations.
    pub organizations: Vec<String>,
    /// Subject organizational units.
    pub organizational_units: Vec<String>,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint: String,
    /// Validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl Identity {
    /// The name this identity is known by in logs and policies: the SPIFFE ID, else the CN,
    /// else the fingerprint.
    pub fn name(&self) -> &str {
        self.spiffe_id
            .as_deref()
            .or(self.common_name.as_deref())
            .unwrap_or(&self.fingerprint)
    }
}
