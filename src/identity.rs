//! Who is calling: the verified client certificate turned into an `Identity`, and the
//! identity header (`x-forwarded-client-cert`, Envoy's format) the upstream receives.
//!
//! The listener builds one per connection, once, right after the TLS handshake verified the
//! chain; every request on the connection shares it (`ConnInfo::identity`). Later stages
//! (policy, rate limits, logs) read it and never look at client-supplied headers for identity.
//!
//! Parsing never panics and never fails the connection on a malformed extension: the field it
//! would have filled stays empty and a warning says why (the chain was already verified by
//! rustls/webpki; this is only about what we can read out of it).

use std::fmt::Write as _;

use http::HeaderValue;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_ORGANIZATIONAL_UNIT, OID_X509_ORGANIZATION_NAME,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// The identity carried by a verified client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// `spiffe://trust-domain/path`, from the URI SAN.
    pub spiffe_id: Option<String>,
    /// The trust domain of the SPIFFE ID (`trust-domain`).
    pub trust_domain: Option<String>,
    /// The path of the SPIFFE ID (`/path`; empty for a bare trust domain).
    pub spiffe_path: Option<String>,
    /// Why the `spiffe://` URI SANs make no SPIFFE ID (there are several, or the one there is
    /// breaks the SPIFFE ID rules), why the certificate is no X.509-SVID (other URI SANs
    /// beside the ID), or why they cannot be checked (the subjectAltName, or a URI in it,
    /// cannot be read); in the last two cases a readable ID is still in `spiffe_id`. `None`
    /// when they make one or there are none. A listener with `client_trust_domains` refuses
    /// such a certificate at the handshake.
    pub spiffe_invalid: Option<String>,
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
    /// The whole subject in RFC 4514 form (`CN=client,O=Example`).
    pub subject: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint: String,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// The `x-forwarded-client-cert` value sent upstream, built once per connection.
    pub xfcc: Option<HeaderValue>,
}

impl Identity {
    /// The name this identity is known by in logs and policies: the SPIFFE ID, else the CN,
    /// else the fingerprint. A CN that could be taken for one of the other two (it starts
    /// with `spiffe:`, or is 64 hex digits) is not used: the three share the principal's id,
    /// and `CN=spiffe://prod/orders` must not pass for the SPIFFE ID a policy names.
    pub fn name(&self) -> &str {
        self.spiffe_id
            .as_deref()
            .or(self
                .common_name
                .as_deref()
                .filter(|cn| !mimics_other_name(cn)))
            .unwrap_or(&self.fingerprint)
    }

    /// Reads the identity out of a DER certificate. Fails only when the certificate cannot be
    /// parsed at all; problems with single fields are returned as warnings, the field empty.
    pub fn from_der(der: &[u8]) -> Result<(Identity, Vec<String>), String> {
        let fingerprint = sha256_hex(der);
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("client certificate {fingerprint} is not parseable: {e}"))?;
        let mut warnings = Vec::new();
        let mut id = Identity {
            fingerprint,
            serial: hex(trim_leading_zeros(cert.raw_serial())),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            ..Identity::default()
        };
        read_subject(cert.subject(), &mut id, &mut warnings);
        read_sans(&cert, &mut id, &mut warnings);
        id.xfcc = build_xfcc(&id);
        if id.xfcc.is_none() {
            warnings.push(
                "identity cannot be expressed as an x-forwarded-client-cert header; none is sent"
                    .into(),
            );
        }
        Ok((id, warnings))
    }

    /// Identity from a certificate that could not be parsed: only the fingerprint is known.
    pub fn unparsed(der: &[u8]) -> Identity {
        let mut id = Identity {
            fingerprint: sha256_hex(der),
            ..Identity::default()
        };
        id.xfcc = build_xfcc(&id);
        id
    }
}

/// Whether a CN could be read as a SPIFFE ID or a certificate fingerprint.
fn mimics_other_name(cn: &str) -> bool {
    cn.get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("spiffe:"))
        || (cn.len() == 64 && cn.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn read_subject(name: &X509Name<'_>, id: &mut Identity, warnings: &mut Vec<String>) {
    // Exactly one readable CN, or none: with several (or one that is not text), which one
    // names the client depends on who reads the certificate.
    let cns: Vec<Option<String>> = name
        .iter_common_name()
        .map(|attr| attr_str(attr, "subject CN", warnings))
        .collect();
    match cns.as_slice() {
        [Some(cn)] => id.common_name = Some(cn.clone()),
        [] | [None] => {}
        more => warnings.push(format!(
            "{} subject CNs: ambiguous, none is used",
            more.len()
        )),
    }
    for attr in name.iter_by_oid(&OID_X509_ORGANIZATION_NAME) {
        id.organizations
            .extend(attr_str(attr, "subject O", warnings));
    }
    for attr in name.iter_by_oid(&OID_X509_ORGANIZATIONAL_UNIT) {
        id.organizational_units
            .extend(attr_str(attr, "subject OU", warnings));
    }
    id.subject = rfc4514(name);
}

/// A subject attribute as text, or a warning.
fn attr_str(
    attr: &AttributeTypeAndValue<'_>,
    what: &str,
    warnings: &mut Vec<String>,
) -> Option<String> {
    match attr.as_str() {
        Ok(s) => Some(s.to_string()),
        Err(e) => {
            warnings.push(format!("{what} is not a readable string ({e}); ignored"));
            None
        }
    }
}

fn read_sans(cert: &X509Certificate<'_>, id: &mut Identity, warnings: &mut Vec<String>) {
    let mut spiffe = Vec::new();
    let mut san_seen = false;
    // A subjectAltName, or a URI in it, that cannot be read may hold a SPIFFE ID no one can
    // see.
    let mut unreadable = false;
    // URI SANs that are not SPIFFE IDs (an X.509-SVID has exactly one URI SAN).
    let mut other_uris = 0;
    for ext in cert.extensions() {
        if ext.oid != OID_X509_EXT_SUBJECT_ALT_NAME {
            continue;
        }
        if san_seen {
            warnings.push(
                "certificate has two subjectAltName extensions; the second is ignored".into(),
            );
            continue;
        }
        san_seen = true;
        let san = match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => san,
            ParsedExtension::ParseError { error } => {
                warnings.push(format!(
                    "subjectAltName is malformed ({error}); SPIFFE ID, DNS and email left empty"
                ));
                unreadable = true;
                continue;
            }
            _ => {
                warnings.push(
                    "subjectAltName could not be read; SPIFFE ID, DNS and email left empty".into(),
                );
                unreadable = true;
                continue;
            }
        };
        for name in &san.general_names {
            match name {
                GeneralName::DNSName(d) => id.dns.push((*d).to_string()),
                GeneralName::RFC822Name(e) => id.emails.push((*e).to_string()),
                // `get`: x509-parser lets UTF-8 into URIs, and byte 9 need not end a character.
                GeneralName::URI(u)
                    if u.get(..9)
                        .is_some_and(|p| p.eq_ignore_ascii_case("spiffe://")) =>
                {
                    spiffe.push(*u)
                }
                GeneralName::URI(_) => other_uris += 1,
                GeneralName::Invalid(tag, _) => {
                    // A URI (tag 6) that cannot be read may be a SPIFFE ID.
                    unreadable |= tag.0 == 6;
                    warnings.push(format!(
                        "subjectAltName entry with tag [{}] is invalid; ignored",
                        tag.0
                    ))
                }
                _ => {}
            }
        }
    }
    id.spiffe_invalid = match spiffe.as_slice() {
        [] => None,
        [one] => match split_spiffe(one) {
            Ok((domain, path)) => {
                id.spiffe_id = Some((*one).to_string());
                id.trust_domain = Some(domain.to_string());
                id.spiffe_path = Some(path.to_string());
                None
            }
            Err(why) => Some(format!("URI SAN {one:?} is not a valid SPIFFE ID: {why}")),
        },
        // The SPIFFE X.509-SVID spec allows exactly one URI SAN: more is ambiguous.
        many => Some(format!(
            "certificate carries {} SPIFFE IDs; an X.509-SVID has exactly one",
            many.len()
        )),
    };
    // The same text refuses the certificate where trust domains are bound (listener::tls);
    // elsewhere it only warns that the certificate has no SPIFFE identity.
    warnings.extend(
        id.spiffe_invalid
            .as_ref()
            .map(|why| format!("{why}; no SPIFFE ID is used")),
    );
    if other_uris > 0 && !spiffe.is_empty() && id.spiffe_invalid.is_none() {
        // The SPIFFE X.509-SVID spec (and go-spiffe) allow exactly one URI SAN. Only a
        // listener with trust domains refuses it; elsewhere the SPIFFE ID is still used.
        id.spiffe_invalid = Some(format!(
            "certificate carries {other_uris} URI SAN(s) besides its SPIFFE ID; an X.509-SVID \
             has exactly one URI SAN"
        ));
    }
    if unreadable && id.spiffe_invalid.is_none() {
        // Warned about above. A listener with trust domains refuses it, even beside a
        // readable SPIFFE ID (an unreadable one would make two); elsewhere a readable one is
        // still used.
        id.spiffe_invalid = Some(
            "subjectAltName (or a URI in it) cannot be read, so a SPIFFE ID in it cannot be \
             checked"
                .into(),
        );
    }
}

/// Splits `spiffe://trust-domain/path` after checking it against the SPIFFE ID rules:
/// lowercase trust domain of `[a-z0-9.-_]`, path segments of `[A-Za-z0-9.-_]` with no empty,
/// `.` or `..` segment, no query or fragment.
pub fn split_spiffe(id: &str) -> Result<(&str, &str), &'static str> {
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or("scheme must be lowercase \"spiffe\"")?;
    let (domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if domain.is_empty() {
        return Err("trust domain is empty");
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("trust domain may hold only lowercase letters, digits, '.', '-' and '_'");
    }
    if !path.is_empty() {
        for seg in path[1..].split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err("path has an empty, '.' or '..' segment");
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err("path may hold only letters, digits, '.', '-' and '_'");
            }
        }
    }
    Ok((domain, path))
}

/// RFC 4514 string of a name: RDNs in reverse order, `,` between them, `+` inside one.
fn rfc4514(name: &X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<_> = name.iter_rdn().collect();
    let mut out = String::new();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = attr.attr_type();
            match x509_parser::objects::oid2abbrev(oid, registry) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&oid.to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(s) => escape_rfc4514(s, &mut out),
                // Not a string type: the hex form RFC 4514 prescribes.
                Err(_) => {
                    out.push('#');
                    out.push_str(&hex(attr.attr_value().data));
                }
            }
        }
    }
    out
}

fn escape_rfc4514(s: &str, out: &mut String) {
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c.is_control() {
            let _ = write!(out, "\\{:02x}", c as u32);
        } else {
            out.push(c);
        }
    }
}

/// `Hash=<sha256>;Subject="...";URI=<spiffe id>;DNS=a;DNS=b` (Envoy's element format).
fn build_xfcc(id: &Identity) -> Option<HeaderValue> {
    let mut v = String::with_capacity(128);
    v.push_str("Hash=");
    v.push_str(&id.fingerprint);
    if !id.subject.is_empty() {
        v.push_str(";Subject=");
        xfcc_value(&id.subject, true, &mut v);
    }
    if let Some(uri) = &id.spiffe_id {
        v.push_str(";URI=");
        xfcc_value(uri, false, &mut v);
    }
    for d in &id.dns {
        v.push_str(";DNS=");
        xfcc_value(d, false, &mut v);
    }
    HeaderValue::from_bytes(v.as_bytes()).ok()
}

/// Appends one XFCC value: quoted when asked or when it holds `,`, `;`, `=` or `"`; control
/// characters (which a header cannot carry) become `?`.
fn xfcc_value(s: &str, always_quote: bool, out: &mut String) {
    let quote = always_quote || s.contains([',', ';', '=', '"']);
    if quote {
        out.push('"');
    }
    for c in s.chars() {
        match c {
            '"' | '\\' if quote => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    if quote {
        out.push('"');
    }
}

fn trim_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    &b[start.min(b.len())..]
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, SanType};

    fn issue(params: CertificateParams) -> Vec<u8> {
        let ca = crate::certs::Ca::new("test CA").unwrap();
        let issued = ca.issue(params, 30).unwrap();
        rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap()
    }

    #[test]
    fn reads_every_field() {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "orders, \"east\"");
        p.distinguished_name
            .push(DnType::OrganizationName, "Example Corp");
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, "platform-admins");
        p.subject_alt_names = vec![
            SanType::URI(
                "spiffe://corp.example/ns/prod/sa/orders"
                    .try_into()
                    .unwrap(),
            ),
            SanType::DnsName("orders.internal".try_into().unwrap()),
            SanType::DnsName("orders.prod.internal".try_into().unwrap()),
            SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
        ];
        let der = issue(p);
        let (id, warnings) = Identity::from_der(&der).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            id.spiffe_id.as_deref(),
            Some("spiffe://corp.example/ns/prod/sa/orders")
        );
        assert_eq!(id.trust_domain.as_deref(), Some("corp.example"));
        assert_eq!(id.spiffe_path.as_deref(), Some("/ns/prod/sa/orders"));
        assert_eq!(id.spiffe_invalid, None);
        assert_eq!(id.dns, ["orders.internal", "orders.prod.internal"]);
        assert_eq!(id.emails, ["ops@example.com"]);
        assert_eq!(id.common_name.as_deref(), Some("orders, \"east\""));
        assert_eq!(id.organizations, ["Example Corp"]);
        assert_eq!(id.organizational_units, ["platform-admins"]);
        assert_eq!(id.fingerprint, sha256_hex(&der));
        assert_eq!(id.fingerprint.len(), 64);
        assert!(!id.serial.is_empty());
        assert!(id.not_after > id.not_before);
        assert_eq!(
            id.subject,
            r#"OU=platform-admins,O=Example Corp,CN=orders\, \"east\""#
        );
        let xfcc = id.xfcc.as_ref().unwrap().to_str().unwrap();
        assert_eq!(
            xfcc,
            format!(
                r#"Hash={};Subject="OU=platform-admins,O=Example Corp,CN=orders\\, \\\"east\\\"";URI=spiffe://corp.example/ns/prod/sa/orders;DNS=orders.internal;DNS=orders.prod.internal"#,
                id.fingerprint
            )
        );
        assert_eq!(id.name(), "spiffe://corp.example/ns/prod/sa/orders");
    }

    #[test]
    fn spiffe_rules() {
        assert_eq!(split_spiffe("spiffe://td/a/b"), Ok(("td", "/a/b")));
        assert_eq!(split_spiffe("spiffe://td"), Ok(("td", "")));
        assert!(split_spiffe("spiffe://TD/a").is_err());
        assert!(split_spiffe("spiffe:///a").is_err());
        assert!(split_spiffe("spiffe://td/a//b").is_err());
        assert!(split_spiffe("spiffe://td/a/../b").is_err());
        assert!(split_spiffe("spiffe://td/a?x=1").is_err());
        assert!(split_spiffe("SPIFFE://td/a").is_err());
    }

    #[test]
    fn two_spiffe_ids_are_ambiguous() {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "twice");
        p.subject_alt_names = vec![
            SanType::URI("spiffe://a/x".try_into().unwrap()),
            SanType::URI("spiffe://b/y".try_into().unwrap()),
        ];
        let (id, warnings) = Identity::from_der(&issue(p)).unwrap();
        assert_eq!(id.spiffe_id, None);
        assert_eq!(id.name(), "twice");
        assert!(warnings[0].contains("2 SPIFFE IDs"), "{warnings:?}");
        // Kept apart from the other warnings: a listener with client_trust_domains refuses it.
        assert!(id.spiffe_invalid.unwrap().contains("2 SPIFFE IDs"));
    }

    #[test]
    fn a_malformed_spiffe_id_is_not_used_and_says_why() {
        for uri in [
            "spiffe://TEST.local/x",
            "SPIFFE://test.local/x",
            "spiffe://test.local/a/../b",
            "spiffe://",
        ] {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, "bent");
            p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            let (id, warnings) = Identity::from_der(&issue(p)).unwrap();
            assert_eq!((id.spiffe_id, id.trust_domain), (None, None), "{uri}");
            let why = id.spiffe_invalid.expect(uri);
            assert!(why.contains("not a valid SPIFFE ID"), "{why}");
            assert_eq!(warnings, [format!("{why}; no SPIFFE ID is used")]);
        }
        // Other URIs are no SPIFFE claim at all.
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI("https://example.com/x".try_into().unwrap())];
        let (id, warnings) = Identity::from_der(&issue(p)).unwrap();
        assert_eq!((id.spiffe_id, id.spiffe_invalid), (None, None));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_uri_with_a_character_across_byte_nine_is_no_panic() {
        // SEQUENCE { [6] "spiffe:/é" }, by hand: rcgen writes URIs as IA5 (ASCII) only,
        // x509-parser reads them as UTF-8. 'é' takes bytes 8 and 9.
        let uri = "spiffe:/\u{e9}".as_bytes();
        let mut san = vec![0x30, uri.len() as u8 + 2, 0x86, uri.len() as u8];
        san.extend_from_slice(uri);
        let mut p = CertificateParams::default();
        p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 17],
            san,
        )];
        let (id, _) = Identity::from_der(&issue(p)).unwrap();
        assert_eq!((id.spiffe_id, id.spiffe_invalid), (None, None));
    }

    #[test]
    fn an_unreadable_uri_beside_a_spiffe_id_keeps_the_id_but_marks_it_uncheckable() {
        // SEQUENCE { [6] "spiffe://test.local/a", [6] "x\xff" }: the second is not UTF-8.
        let (good, bad): (&[u8], &[u8]) = (b"spiffe://test.local/a", b"x\xff");
        let mut san = Vec::new();
        for uri in [good, bad] {
            san.extend_from_slice(&[0x86, uri.len() as u8]);
            san.extend_from_slice(uri);
        }
        san.splice(0..0, [0x30, san.len() as u8]);
        let mut p = CertificateParams::default();
        p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 17],
            san,
        )];
        let (id, warnings) = Identity::from_der(&issue(p)).unwrap();
        // Where trust domains are not bound, the readable ID is used...
        assert_eq!(id.spiffe_id.as_deref(), Some("spiffe://test.local/a"));
        // ...and where they are, the certificate is refused (listener::tls).
        assert!(id.spiffe_invalid.unwrap().contains("cannot be read"));
        assert!(
            warnings.iter().any(|w| w.contains("tag [6]")),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_cn_that_looks_like_a_spiffe_id_or_a_fingerprint_is_not_the_name() {
        let fingerprint = "ab".repeat(32);
        for cn in [
            "spiffe://wraith.dev/ns/prod/sa/orders",
            "SPIFFE://x/y",
            &fingerprint,
        ] {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            let (id, _) = Identity::from_der(&issue(p)).unwrap();
            assert_eq!(
                id.common_name.as_deref(),
                Some(cn),
                "still the cn attribute"
            );
            assert_eq!(id.name(), id.fingerprint, "{cn}");
            assert_ne!(id.name(), cn);
        }
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "orders");
        assert_eq!(Identity::from_der(&issue(p)).unwrap().0.name(), "orders");
    }

    #[test]
    fn two_cns_are_ambiguous() {
        // SEQUENCE { SET { SEQ { 2.5.4.3, UTF8 "alice" } }, SET { SEQ { 2.5.4.3, UTF8 "admin" } } }
        // (rcgen writes one value per attribute type, so the subject is built by hand).
        let two: &[u8] = &[
            0x30, 0x20, 0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b'a',
            b'l', b'i', b'c', b'e', 0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c,
            0x05, b'a', b'd', b'm', b'i', b'n',
        ];
        let (_, name) = X509Name::from_der(two).unwrap();
        assert_eq!(name.iter_common_name().count(), 2);
        let mut id = Identity::default();
        let mut warnings = Vec::new();
        read_subject(&name, &mut id, &mut warnings);
        assert_eq!(id.common_name, None);
        assert!(warnings[0].contains("2 subject CNs"), "{warnings:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Identity::from_der(b"").is_err());
        assert!(Identity::from_der(&[0x30, 0x03, 0x02, 0x01]).is_err());
        let id = Identity::unparsed(b"junk");
        assert_eq!(id.name(), id.fingerprint);
        assert!(id.xfcc.is_some());
    }
}
