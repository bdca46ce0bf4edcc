//! OCSP stapling from a file the operator prepares, as nginx's `ssl_stapling_file` and
//! HAProxy's `.ocsp` file beside the certificate: `ocsp_response` names a DER OCSPResponse
//! (what `openssl ocsp ... -respout` writes), read at load and on every reload, checked
//! against the listener's certificate, and sent to the clients that ask for it
//! (`status_request`) while it is current. Wraith does not fetch responses from the responder
//! itself (nginx's `ssl_stapling on`): a cron job refreshes the file and runs `wraith reload`.
//!
//! The structures (RFC 6960 §4.2.1) are few and small: they are walked by hand with asn1-rs,
//! which x509-parser brings already. The response's signature is not checked here: the client
//! checks it against the certificate's issuer, as it would a response it fetched itself. What
//! is checked is what makes a staple useless or harmful if wrong: that the file is an OCSP
//! response the responder answered successfully, that it is about this certificate, that the
//! certificate is good, and when it is current.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aws_lc_rs::digest;
use rustls_pki_types::CertificateDer;
use x509_parser::asn1_rs::{ASN1TimeZone, Any, Class, FromDer, GeneralizedTime, Tag};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;

/// A checked OCSP response for a listener's certificate.
#[derive(Clone)]
pub struct Staple {
    /// The OCSPResponse as read from the file: what the handshake sends.
    pub der: Vec<u8>,
    /// The certificate's `thisUpdate` (seconds since the epoch): when the responder vouched
    /// for its status.
    pub this_update: i64,
    /// Its `nextUpdate`, after which clients refuse the response; `None` when the responder
    /// gives none (RFC 6960: newer status is always available), which clients only accept
    /// for a while ([`NO_NEXT_UPDATE_LIFETIME`]).
    pub next_update: Option<i64>,
    /// Whether its expiry has been told (a warning at load, or a log line when it expires
    /// while serving): shared by the listener's TCP and QUIC sides, so it is told once.
    pub expiry_told: Arc<AtomicBool>,
}

/// How far ahead of `thisUpdate` a response is stapled: the responder's clock and this
/// server's may differ a little, and clients allow as much.
const CLOCK_SKEW: i64 = 5 * 60;

/// How long after its `thisUpdate` a response without a `nextUpdate` is stapled. Clients do
/// not take "newer status is always available" as "valid forever": mozilla::pkix (Firefox)
/// holds such a response valid for a day after its `thisUpdate` ("NSS requires all OCSP
/// responses without a nextUpdate to be recent"), GnuTLS for 15 days (3 in older versions).
/// The strictest client's limit is the one that keeps a staple from being refused.
const NO_NEXT_UPDATE_LIFETIME: i64 = 24 * 60 * 60;

/// How long after its `thisUpdate` a response with a `nextUpdate` is stapled at most:
/// mozilla::pkix holds a certificate's response expired ten days after its `thisUpdate`
/// whatever its `nextUpdate` says (`maxOCSPLifetimeInDays`), and the CA/Browser Forum's
/// Baseline Requirements cap a response's validity at ten days. A response a private
/// responder made for 30 days would be refused by Firefox from day 11 on.
const MAX_LIFETIME: i64 = 10 * 24 * 60 * 60;

/// How close to its expiry a current response is warned about at load: a refresh job that
/// runs twice a day, as the docs suggest, keeps a response of several days' validity further
/// away than that, so a warning means it has stopped running (or the responder's responses
/// have become short-lived).
const EXPIRES_SOON: i64 = 24 * 60 * 60;

impl Staple {
    /// When it stops being stapled (seconds since the epoch): its `nextUpdate`, but no later
    /// than [`MAX_LIFETIME`] after its `thisUpdate`; [`NO_NEXT_UPDATE_LIFETIME`] after its
    /// `thisUpdate` when it has none.
    pub fn valid_until(&self) -> i64 {
        match self.next_update {
            Some(next) => next.min(self.this_update.saturating_add(MAX_LIFETIME)),
            None => self.this_update.saturating_add(NO_NEXT_UPDATE_LIFETIME),
        }
    }

    /// What [`Staple::valid_until`] was taken from, for messages.
    fn limit(&self) -> &'static str {
        match self.next_update {
            Some(next) if next <= self.this_update.saturating_add(MAX_LIFETIME) => "its nextUpdate",
            Some(_) => "ten days after its thisUpdate",
            None => "a day after its thisUpdate",
        }
    }

    /// Whether it may be stapled at `now` (seconds since the epoch): from `thisUpdate` (less
    /// the clock skew) until [`Staple::valid_until`]. A response outside that time is never
    /// sent: a strict client refuses the connection over an expired staple, where it would
    /// accept none.
    pub fn current(&self, now: i64) -> bool {
        self.this_update - CLOCK_SKEW <= now && now < self.valid_until()
    }

    /// Whether it has expired at `now` (past [`Staple::valid_until`]).
    pub fn expired(&self, now: i64) -> bool {
        now >= self.valid_until()
    }

    /// What `wraith test`, `serve` and a reload say about the response at `now`: that it
    /// has no `nextUpdate` (so it is stapled for a day only), that it is not current, or
    /// that it expires within [`EXPIRES_SOON`].
    pub fn warnings(&self, path: &Path, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        let until = self.valid_until();
        match self.next_update {
            None => out.push(format!(
                "OCSP response {} has no nextUpdate: clients (Firefox) take it as valid for a day after its thisUpdate, so it is stapled only until {}; refresh it at least daily, or ask the responder for responses with a nextUpdate",
                path.display(),
                rfc3339(until)
            )),
            Some(next) if next > until => out.push(format!(
                "OCSP response {} is valid until {} by its nextUpdate, but clients (Firefox) hold a response expired ten days after its thisUpdate, so it is stapled only until {}; refresh it well before then",
                path.display(),
                rfc3339(next),
                rfc3339(until)
            )),
            Some(_) => {}
        }
        if self.expired(now) {
            self.expiry_told.store(true, Ordering::Relaxed);
            out.push(format!(
                "OCSP response {} expired on {} ({}): it is not stapled; refresh it (openssl ocsp ... -respout) and reload",
                path.display(),
                rfc3339(until),
                self.limit()
            ));
        } else if !self.current(now) {
            out.push(format!(
                "OCSP response {} is not valid before {} (its thisUpdate; is this server's clock behind?): it is not stapled before then",
                path.display(),
                rfc3339(self.this_update)
            ));
        } else if self.next_update.is_some() && until - now < EXPIRES_SOON {
            // (One without a nextUpdate always is, and is warned about above.)
            out.push(format!(
                "OCSP response {} expires in {} ({}, {}): from then on it is not stapled; is the job that refreshes it still running?",
                path.display(),
                duration(until - now),
                self.limit(),
                rfc3339(until)
            ));
        }
        out
    }
}

/// A time left, in hours and minutes, for messages.
fn duration(seconds: i64) -> String {
    let minutes = seconds.max(0) / 60;
    format!("{}h{:02}m", minutes / 60, minutes % 60)
}

impl fmt::Debug for Staple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staple")
            .field("bytes", &self.der.len())
            .field("this_update", &self.this_update)
            .field("next_update", &self.next_update)
            .finish()
    }
}

/// A time for messages and `wraith status`.
pub fn rfc3339(unix: i64) -> String {
    ::time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&::time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// The largest response stapled. Real ones are a few hundred bytes, a few KiB with the
/// responder's certificate; this one goes out in every handshake that asks, in the same
/// handshake message as the certificate chain in TLS 1.3, and clients drop larger messages
/// (rustls at 64 KiB, OpenSSL's `max_cert_list` at 100 KiB).
const MAX_RESPONSE: u64 = 32 << 10;

/// Reads the OCSP response in `path` and checks it against `chain` (the listener's
/// certificate chain from `cert_path`, leaf first): a successful response, about the leaf, which
/// is good. Its times are not judged here ([`Staple::current`]).
pub fn load(path: &Path, cert_path: &Path, chain: &[CertificateDer<'_>]) -> Result<Staple, String> {
    let der = crate::files::read(path, MAX_RESPONSE).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::InvalidData {
            ": too large for an OCSP response sent in every handshake (clients refuse it)"
        } else {
            ""
        };
        format!(
            "cannot read OCSP response file {}: {e}{hint}",
            path.display()
        )
    })?;
    if der.starts_with(b"-----BEGIN") {
        return Err(format!(
            "{}: PEM text, but an OCSP response file is DER (as `openssl ocsp -respout` writes it)",
            path.display()
        ));
    }
    let response = parse(&der).map_err(|e| {
        format!(
            "{}: not a DER OCSP response (as `openssl ocsp -respout` writes it): {e}",
            path.display()
        )
    })?;
    let Some(leaf) = chain
        .first()
        .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c)
    else {
        return Err(format!("{}: no usable certificate", cert_path.display()));
    };
    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, c)| c))
        .collect();
    // The issuer's key, when the chain file holds the issuer (a full chain does); without it
    // the serial number and the issuer's name identify the certificate.
    let issuer_keys = issuer_keys(&leaf, &parsed);

    let mut unknown_hashes = Vec::new();
    let mut single = None;
    for s in &response.responses {
        match s.id.matches(&leaf, issuer_keys.as_deref()) {
            Some(true) => {
                single = Some(s);
                break;
            }
            Some(false) => {}
            None => unknown_hashes.push(oid_text(s.id.hash_algorithm)),
        }
    }
    let Some(single) = single else {
        let serial = leaf.raw_serial();
        let others: Vec<String> = response
            .responses
            .iter()
            .map(|s| {
                let other = strip_zeros(s.id.serial);
                if minimal(s.id.serial) == minimal(serial) {
                    format!(
                        "{} of another issuer (its name or key hash differs)",
                        hex(other)
                    )
                } else {
                    hex(other)
                }
            })
            .collect();
        let mut message = format!(
            "{}: the response is not about the certificate in {} (serial {}, issuer {}); it is about serial {}",
            path.display(),
            cert_path.display(),
            hex(strip_zeros(serial)),
            leaf.issuer(),
            if others.is_empty() {
                "none".to_string()
            } else {
                others.join(", ")
            }
        );
        if issuer_keys.as_ref().is_some_and(|keys| keys.is_empty()) {
            message.push_str(&format!(
                " (and {} holds no certificate of its issuer: the CAs named {} in it have other key identifiers than the certificate's Authority Key Identifier)",
                cert_path.display(),
                leaf.issuer()
            ));
        }
        if !unknown_hashes.is_empty() {
            message.push_str(&format!(
                " (some identified with hash algorithms Wraith does not know: {}; use SHA-1 or SHA-256)",
                unknown_hashes.join(", ")
            ));
        }
        return Err(message);
    };
    match single.status {
        CertStatus::Good => {}
        CertStatus::Revoked(at) => {
            return Err(format!(
                "{}: the responder says the certificate in {} was revoked on {}: a staple would only make clients refuse it; replace the certificate",
                path.display(),
                cert_path.display(),
                rfc3339(at)
            ))
        }
        CertStatus::Unknown => {
            return Err(format!(
                "{}: the responder does not know the certificate in {} (status unknown): ask the responder of the CA that issued it",
                path.display(),
                cert_path.display()
            ))
        }
    }
    Ok(Staple {
        this_update: single.this_update,
        next_update: single.next_update,
        der,
        expiry_told: Arc::default(),
    })
}

/// The keys (subjectPublicKey bits) of the certificates in `chain` that may have issued
/// `leaf`, for the CertID's issuerKeyHash; `None` when none bears the issuer's name (the
/// chain file holds the leaf alone). A CA that rolls its key over keeps its name, so the
/// chain file may hold two CAs of that name: a name picks the first, maybe the wrong one.
/// The leaf's Authority Key Identifier tells which is its issuer when it and the CA's Subject
/// Key Identifier are there; a CA without one stays a candidate, whose key the CertID then
/// decides. An empty list (CAs of the name, none with the leaf's key identifier) matches
/// no CertID: the chain file does not hold the certificate's issuer.
fn issuer_keys<'a>(
    leaf: &X509Certificate<'_>,
    chain: &'a [X509Certificate<'a>],
) -> Option<Vec<&'a [u8]>> {
    let authority = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        });
    let named: Vec<&X509Certificate<'a>> = chain
        .iter()
        .filter(|c| c.subject().as_raw() == leaf.issuer().as_raw())
        .collect();
    if named.is_empty() {
        return None;
    }
    Some(
        named
            .into_iter()
            .filter(|c| {
                let subject = c
                    .extensions()
                    .iter()
                    .find_map(|e| match e.parsed_extension() {
                        ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0),
                        _ => None,
                    });
                match (authority, subject) {
                    (Some(a), Some(s)) => a == s,
                    _ => true,
                }
            })
            .map(|c| c.public_key().subject_public_key.data.as_ref())
            .collect(),
    )
}

/// An OCSPResponse, as much of it as stapling needs.
#[derive(Debug)]
struct Response<'a> {
    responses: Vec<SingleResponse<'a>>,
}

/// One certificate's status in a response.
#[derive(Debug)]
struct SingleResponse<'a> {
    id: CertId<'a>,
    status: CertStatus,
    this_update: i64,
    next_update: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CertStatus {
    Good,
    /// Revoked at this time (seconds since the epoch).
    Revoked(i64),
    Unknown,
}

/// Which certificate a SingleResponse is about: its issuer's name and key, hashed with
/// `hash_algorithm`, and its serial number.
#[derive(Debug)]
struct CertId<'a> {
    /// The algorithm's OID, as encoded (the content octets).
    hash_algorithm: &'a [u8],
    issuer_name_hash: &'a [u8],
    issuer_key_hash: &'a [u8],
    /// The serial number's INTEGER content octets.
    serial: &'a [u8],
}

/// Encoded OIDs of the hash algorithms a CertID may use (RFC 6960 allows any; responders use
/// SHA-1, some SHA-256).
const SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a]; // 1.3.14.3.2.26
const SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01]; // 2.16.840.1.101.3.4.2.1
const SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
const SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];
/// id-pkix-ocsp-basic, 1.3.6.1.5.5.7.48.1.1: the only response type there is.
const OCSP_BASIC: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];

impl CertId<'_> {
    /// Whether it names `leaf`, issued by the holder of one of `issuer_keys` when the chain
    /// file holds its issuer ([`issuer_keys`]); `None` when its hash algorithm is not one
    /// Wraith knows.
    fn matches(&self, leaf: &X509Certificate<'_>, issuer_keys: Option<&[&[u8]]>) -> Option<bool> {
        let algorithm = match self.hash_algorithm {
            SHA1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            SHA256 => &digest::SHA256,
            SHA384 => &digest::SHA384,
            SHA512 => &digest::SHA512,
            _ => return None,
        };
        let hash = |data: &[u8]| digest::digest(algorithm, data);
        Some(
            minimal(self.serial) == minimal(leaf.raw_serial())
                && self.issuer_name_hash == hash(leaf.issuer().as_raw()).as_ref()
                && issuer_keys.is_none_or(|keys| {
                    keys.iter()
                        .any(|key| self.issuer_key_hash == hash(key).as_ref())
                }),
        )
    }
}

/// Parses an OCSPResponse (RFC 6960 §4.2.1). An unsuccessful one is an error naming the
/// responder's status.
fn parse(der: &[u8]) -> Result<Response<'_>, String> {
    let (rest, outer) = Any::from_der(der).map_err(|e| format!("OCSPResponse: {e}"))?;
    let mut outer = Seq::new(&outer, "OCSPResponse")?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the OCSPResponse", rest.len()));
    }
    // responseStatus ENUMERATED
    let status = outer.next(Tag::Enumerated, "responseStatus")?;
    let status = match status.data {
        [n] => *n,
        _ => return Err("responseStatus: not a small ENUMERATED".into()),
    };
    if status != 0 {
        let name = match status {
            1 => "malformedRequest",
            2 => "internalError",
            3 => "tryLater",
            5 => "sigRequired",
            6 => "unauthorized",
            _ => "an unknown status",
        };
        return Err(format!(
            "the responder answered {name} (responseStatus {status}), not a certificate's status"
        ));
    }
    // responseBytes [0] EXPLICIT ResponseBytes
    let bytes = outer
        .next_context(0, "responseBytes")?
        .ok_or("responseBytes missing from a successful response")?;
    outer.end()?;
    let mut bytes = Seq::new(&inner(&bytes, "responseBytes")?, "ResponseBytes")?;
    let kind = bytes.next(Tag::Oid, "responseType")?;
    if kind.data != OCSP_BASIC {
        return Err(format!(
            "responseType {} is not id-pkix-ocsp-basic (1.3.6.1.5.5.7.48.1.1)",
            oid_text(kind.data)
        ));
    }
    let basic = bytes.next(Tag::OctetString, "response")?;
    bytes.end()?;
    let basic = inner(&basic, "BasicOCSPResponse")?;
    let mut basic = Seq::new(&basic, "BasicOCSPResponse")?;
    let tbs = basic.next(Tag::Sequence, "tbsResponseData")?;
    // The signature is the client's to check, but it must be there.
    basic.next(Tag::Sequence, "signatureAlgorithm")?;
    basic.next(Tag::BitString, "signature")?;
    // certs [0] EXPLICIT SEQUENCE OF Certificate OPTIONAL
    basic.next_context(0, "certs")?;
    basic.end()?;
    let mut tbs = Seq::new(&tbs, "ResponseData")?;
    // version [0] EXPLICIT DEFAULT v1
    tbs.next_context(0, "version")?;
    // responderID: byName [1] or byKey [2]
    let responder = tbs.any("responderID")?;
    if responder.class() != Class::ContextSpecific || !matches!(responder.tag().0, 1 | 2) {
        return Err("responderID: neither byName [1] nor byKey [2]".into());
    }
    tbs.next(Tag::GeneralizedTime, "producedAt")?;
    let list = tbs.next(Tag::Sequence, "responses")?;
    let mut list = Seq::new(&list, "responses")?;
    let mut responses = Vec::new();
    while !list.is_empty() {
        let single = list.next(Tag::Sequence, "SingleResponse")?;
        responses.push(single_response(&single)?);
    }
    // responseExtensions [1] EXPLICIT Extensions OPTIONAL
    extensions(&mut tbs, "responseExtensions")?;
    tbs.end()?;
    Ok(Response { responses })
}

/// One SingleResponse: CertID, CertStatus, thisUpdate, nextUpdate.
fn single_response<'a>(single: &Any<'a>) -> Result<SingleResponse<'a>, String> {
    let mut s = Seq::new(single, "SingleResponse")?;
    let id = s.next(Tag::Sequence, "certID")?;
    let mut fields = Seq::new(&id, "CertID")?;
    let algorithm = fields.next(Tag::Sequence, "hashAlgorithm")?;
    let hash_algorithm = Seq::new(&algorithm, "hashAlgorithm")?
        .next(Tag::Oid, "hashAlgorithm.algorithm")?
        .data;
    let id = CertId {
        hash_algorithm,
        issuer_name_hash: fields.next(Tag::OctetString, "issuerNameHash")?.data,
        issuer_key_hash: fields.next(Tag::OctetString, "issuerKeyHash")?.data,
        serial: fields.next(Tag::Integer, "serialNumber")?.data,
    };
    fields.end()?;
    // certStatus: good [0] IMPLICIT NULL, revoked [1] IMPLICIT RevokedInfo, unknown [2]
    let status = s.any("certStatus")?;
    if status.class() != Class::ContextSpecific {
        return Err("certStatus: not good [0], revoked [1] or unknown [2]".into());
    }
    let status = match status.tag().0 {
        0 => CertStatus::Good,
        1 => {
            // RevokedInfo ::= SEQUENCE { revocationTime GeneralizedTime, ... }, its tag
            // replaced by [1]: the content starts with the time.
            let (_, at) = Any::from_der(status.data)
                .map_err(|e| format!("certStatus revoked: revocationTime: {e}"))?;
            CertStatus::Revoked(time(&at, "revocationTime")?)
        }
        2 => CertStatus::Unknown,
        n => return Err(format!("certStatus: unknown choice [{n}]")),
    };
    let this_update = time(&s.next(Tag::GeneralizedTime, "thisUpdate")?, "thisUpdate")?;
    let next_update = match s.next_context(0, "nextUpdate")? {
        Some(next) => Some(time(&inner(&next, "nextUpdate")?, "nextUpdate")?),
        None => None,
    };
    // singleExtensions [1] EXPLICIT Extensions OPTIONAL
    extensions(&mut s, "singleExtensions")?;
    s.end()?;
    Ok(SingleResponse {
        id,
        status,
        this_update,
        next_update,
    })
}

/// The elements of a SEQUENCE, read in order.
struct Seq<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Seq<'a> {
    /// The content of `any`, which must be a SEQUENCE.
    fn new(any: &Any<'a>, what: &'static str) -> Result<Seq<'a>, String> {
        if any.class() != Class::Universal || any.tag() != Tag::Sequence {
            return Err(format!("{what}: not a SEQUENCE"));
        }
        Ok(Seq {
            rest: any.data,
            what,
        })
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next element, whatever it is.
    fn any(&mut self, field: &str) -> Result<Any<'a>, String> {
        if self.rest.is_empty() {
            return Err(format!("{}: {field} missing", self.what));
        }
        let (rest, any) =
            Any::from_der(self.rest).map_err(|e| format!("{}: {field}: {e}", self.what))?;
        self.rest = rest;
        Ok(any)
    }

    /// The next element, which must be a universal `tag`.
    fn next(&mut self, tag: Tag, field: &str) -> Result<Any<'a>, String> {
        let any = self.any(field)?;
        if any.class() != Class::Universal || any.tag() != tag {
            return Err(format!(
                "{}: {field}: expected {tag}, found {} {}",
                self.what,
                any.class(),
                any.tag()
            ));
        }
        Ok(any)
    }

    /// The next element if it is the context-specific `[n]` (an optional field). An element
    /// that is not DER is an error, not an absent field: a broken `nextUpdate` must not read
    /// as none (a response that never expires).
    fn next_context(&mut self, n: u32, field: &str) -> Result<Option<Any<'a>>, String> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (rest, any) =
            Any::from_der(self.rest).map_err(|e| format!("{}: {field}: {e}", self.what))?;
        if any.class() != Class::ContextSpecific || any.tag().0 != n {
            return Ok(None);
        }
        self.rest = rest;
        Ok(Some(any))
    }

    /// Checks that no element is left after the last field read.
    fn end(&self) -> Result<(), String> {
        if self.rest.is_empty() {
            return Ok(());
        }
        Err(match Any::from_der(self.rest) {
            Ok((_, any)) => format!(
                "{}: unexpected {} {} after its last field",
                self.what,
                any.class(),
                any.tag()
            ),
            Err(e) => format!(
                "{}: {} bytes after its last field: {e}",
                self.what,
                self.rest.len()
            ),
        })
    }
}

/// The element inside an EXPLICIT tag (or an OCTET STRING): exactly one.
fn inner<'a>(tagged: &Any<'a>, what: &str) -> Result<Any<'a>, String> {
    let (rest, any) = Any::from_der(tagged.data).map_err(|e| format!("{what}: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{what}: {} bytes after its content", rest.len()));
    }
    Ok(any)
}

/// Optional `[1] EXPLICIT Extensions`, which must hold a SEQUENCE (their content is not
/// read: no extension changes what is stapled).
fn extensions(seq: &mut Seq<'_>, field: &'static str) -> Result<(), String> {
    if let Some(ext) = seq.next_context(1, field)? {
        Seq::new(&inner(&ext, field)?, field)?;
    }
    Ok(())
}

/// A GeneralizedTime, in seconds since the epoch. DER (X.690 §11.7) and RFC 5280 require UTC,
/// `YYYYMMDDHHMMSS[.fff]Z`: a time without a zone is local time (at an unknown offset, which
/// asn1-rs would take for UTC), and clients refuse a time with an offset.
fn time(any: &Any<'_>, what: &str) -> Result<i64, String> {
    let t = GeneralizedTime::try_from(any)
        .map_err(|e| format!("{what}: not a valid GeneralizedTime: {e}"))?;
    if t.0.tz != ASN1TimeZone::Z {
        return Err(format!(
            "{what}: {}: not a UTC time ending in Z, as DER requires",
            String::from_utf8_lossy(any.data)
        ));
    }
    t.utc_datetime()
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("{what}: not a valid GeneralizedTime: {e}"))
}

/// An encoded OID in dotted form, for messages.
fn oid_text(encoded: &[u8]) -> String {
    x509_parser::asn1_rs::Oid::new(encoded.into()).to_id_string()
}

/// An INTEGER's content in its minimal two's-complement form (which DER requires), for
/// comparing values: without a redundant leading 0x00 (before a clear high bit) or 0xFF
/// (before a set one). The 0x00 DER puts before a set high bit stays: `00 80` is 128, `80`
/// is -128, another certificate's serial number.
fn minimal(mut n: &[u8]) -> &[u8] {
    while let [first, second, ..] = n {
        let redundant =
            (*first == 0 && second & 0x80 == 0) || (*first == 0xff && second & 0x80 != 0);
        if !redundant {
            break;
        }
        n = &n[1..];
    }
    n
}

/// An INTEGER's content without its leading zero octets, for showing a (positive) serial
/// number as `openssl x509 -serial` does.
fn strip_zeros(mut n: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = n {
        n = rest;
    }
    n
}

/// Colon-separated hex, as `openssl x509 -serial` and browsers show serial numbers.
fn hex(bytes: &[u8]) -> String {
    let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
    if parts.is_empty() {
        "00".into()
    } else {
        parts.join(":")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER TLV.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 128);
        let mut out = vec![tag, content.len() as u8];
        out.extend_from_slice(content);
        out
    }

    #[test]
    fn an_unsuccessful_response_names_the_responders_status() {
        // OCSPResponse { responseStatus tryLater } with no responseBytes.
        let der = tlv(0x30, &tlv(0x0a, &[3]));
        let e = parse(&der).unwrap_err();
        assert!(e.contains("tryLater"), "{e}");
        let der = tlv(0x30, &tlv(0x0a, &[6]));
        assert!(parse(&der).unwrap_err().contains("unauthorized"));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for der in [
            &b""[..],
            b"garbage",
            &[0x30, 0x80, 0x00, 0x00],
            &[0x30, 0x05, 0x0a, 0x01],
            &[0x30, 0x03, 0x0a, 0x01, 0x00],
            &[0x30, 0x03, 0x0a, 0x01, 0x00, 0x00],
            &[0xa0, 0x03, 0x0a, 0x01, 0x00],
        ] {
            assert!(parse(der).is_err(), "{der:?}");
        }
        // A successful status whose responseBytes has another type.
        let other_type = tlv(
            0x30,
            &[tlv(0x06, &[0x2a, 0x03]), tlv(0x04, &[0x30, 0x00])].concat(),
        );
        let der = tlv(0x30, &[tlv(0x0a, &[0]), tlv(0xa0, &other_type)].concat());
        let e = parse(&der).unwrap_err();
        assert!(e.contains("1.2.3"), "{e}");
    }

    /// A real response (`openssl ocsp -index ... -ndays 1 -resp_no_certs`) for [`LEAF`]
    /// (serial 0x80A1B2, encoded `00 80 A1 B2`), issued and signed by [`CA`] (P-256): good,
    /// thisUpdate 2026-11-27T23:25:25Z, nextUpdate a day later, CertID with SHA-1.
    const GOOD: &str = "308201030a0100a081fd3081fa06092b06010505073001010481ec3081e9308190a11430123110300e06035504030c07\
        54657374204341180f32303236313132373233323532355a30673065303d300906052b0e03021a05000414bf7052c8b9\
        c0f760c89123e099815eb2c03942260414ed1437f452c2034eaf4d9ae06a13150c75ac154902040080a1b28000180f32\
        303236313132373233323532355aa011180f32303236313132383233323532355a300a06082a8648ce3d040302034800\
        3045022100b6578322637133d85aee81a7d09dbdef10dc50c1171ca60c53a8d3ddc948359a022056d8f9e8c32a96562d\
        d26f9828a512b8b9f336b36750d6da243cb8c5808cc038";

    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBejCCAR+gAwIBAgIUKIo1ZWd/bETM5xzb2R5ReauTVy0wCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHVGVzdCBDQTAeFw0yNjExMjcyMzI1MDlaFw0zNjExMjQyMzI1
MDlaMBIxEDAOBgNVBAMMB1Rlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AASqe77o8qrX35Q5rglJo21TkCl8gklj2DmlDoW4x+JrCg0KM0hmi1E7wHKXUZw+
qe01q490qCz6+MHuAG73S2jdo1MwUTAdBgNVHQ4EFgQU7RQ39FLCA06vTZrgahMV
DHWsFUkwHwYDVR0jBBgwFoAU7RQ39FLCA06vTZrgahMVDHWsFUkwDwYDVR0TAQH/
BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEA0S79x+rbYZ+mq0gmdYdHL0qcgHP0
+OInnR+PicN6JuECIQD5Un4eovKFtEGrjE0mtOiqE34prAJbMtL3V/tEctB0/g==
-----END CERTIFICATE-----
";

    const LEAF: &str = "-----BEGIN CERTIFICATE-----
MIIBETCBtwIEAIChsjAKBggqhkjOPQQDAjASMRAwDgYDVQQDDAdUZXN0IENBMB4X
DTI2MTEyNzIzMjUwOVoXDTM2MTEyNDIzMjUwOVowFDESMBAGA1UEAwwJbG9jYWxo
b3N0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE+pFECsHiecrRtHF3FmPKHDQW
yOlkHuUnhe2m6tDlo+Q8jYWvCVNMb+WvkgzlxhafvcWoq+9Y3Ivvahf8GNHIijAK
BggqhkjOPQQDAgNJADBGAiEAqyc0LvlgIrNygPWHXfzbFo73uhqwMWVAS1LKVpq6
6O4CIQCiUljXkxLz/m/irVcEIhT4qnCRs3ztOUVywmOYZ8yHnA==
-----END CERTIFICATE-----
";

    fn good() -> Vec<u8> {
        let hex: String = GOOD.split_whitespace().collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pem(text: &str) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(text.as_bytes()).unwrap()
    }

    /// Where `needle` starts in `hay`.
    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).position(|w| w == needle).unwrap()
    }

    #[test]
    fn a_real_response_is_read_whole() {
        let der = good();
        let r = parse(&der).unwrap();
        let [single] = &r.responses[..] else {
            panic!("{r:?}")
        };
        assert_eq!(single.status, CertStatus::Good);
        assert_eq!(single.this_update, 1_795_821_925); // 2026-11-27T23:25:25Z
        assert_eq!(single.next_update, Some(1_795_821_925 + 86_400));
        assert_eq!(single.id.serial, &[0x00, 0x80, 0xa1, 0xb2]);
        let (ca, leaf) = (pem(CA), pem(LEAF));
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
        let key = &ca.public_key().subject_public_key.data;
        assert_eq!(single.id.matches(&leaf, Some(&[key])), Some(true));
        assert_eq!(single.id.matches(&leaf, None), Some(true));
        let other: &[u8] = b"another key";
        assert_eq!(single.id.matches(&leaf, Some(&[other])), Some(false));
        assert_eq!(single.id.matches(&leaf, Some(&[other, key])), Some(true));
        assert_eq!(single.id.matches(&leaf, Some(&[])), Some(false));
        assert_eq!(single.id.matches(&ca, Some(&[key])), Some(false));
    }

    /// Every truncation and every single-byte change of a real response: an error or a
    /// response, never a panic or a hang; a truncated one is always an error.
    #[test]
    fn a_mangled_response_is_an_error_not_a_panic() {
        let der = good();
        for len in 0..der.len() {
            assert!(parse(&der[..len]).is_err(), "truncated to {len}");
        }
        let mut longer = der.clone();
        longer.push(0);
        assert!(parse(&longer).is_err());
        for i in 0..der.len() {
            for b in [
                0x00,
                0xff,
                0x80,
                0x7f,
                der[i] ^ 0x01,
                der[i] ^ 0x20,
                der[i] ^ 0x80,
            ] {
                let mut m = der.clone();
                m[i] = b;
                let _ = parse(&m);
            }
        }
    }

    /// A broken `nextUpdate` is not read as "no nextUpdate", which would staple the response
    /// forever; nor is anything unexpected after it.
    #[test]
    fn a_broken_next_update_is_an_error_not_a_response_that_never_expires() {
        let der = good();
        // nextUpdate [0] (17 bytes): its length made one longer than what is left.
        let at = find(&der, &[0xa0, 0x11, 0x18, 0x0f]);
        let mut m = der.clone();
        m[at + 1] = 0x12;
        let e = parse(&m).unwrap_err();
        assert!(e.contains("nextUpdate"), "{e}");
        // Its tag changed to [1] (singleExtensions), which holds no Extensions.
        let mut m = der.clone();
        m[at] = 0xa1;
        let e = parse(&m).unwrap_err();
        assert!(e.contains("singleExtensions"), "{e}");
        // Its tag changed to [2], which a SingleResponse does not have.
        let mut m = der.clone();
        m[at] = 0xa2;
        let e = parse(&m).unwrap_err();
        assert!(e.contains("after its last field"), "{e}");
    }

    /// A DER TLV of any length.
    fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let n = content.len().to_be_bytes();
        let skip = n.iter().take_while(|b| **b == 0).count();
        let mut out = vec![tag];
        if content.len() < 128 {
            out.push(content.len() as u8);
        } else {
            out.push(0x80 | (n.len() - skip) as u8);
            out.extend_from_slice(&n[skip..]);
        }
        out.extend_from_slice(content);
        out
    }

    /// A response that would be stapled to every handshake is refused when larger than
    /// clients accept, even when it is well formed and about the certificate.
    #[test]
    fn a_huge_response_is_refused() {
        let der = good();
        // The real response with 40 KB of `certs` [0] added to its BasicOCSPResponse.
        let oid_at = find(&der, &[0x06, 0x09, 0x2b, 0x06]);
        let basic_at = oid_at + 11 + 3;
        assert_eq!(&der[basic_at..basic_at + 3], &[0x30, 0x81, 0xe9]);
        let certs = der_tlv(0xa0, &der_tlv(0x30, &[0x05, 0x00].repeat(20_000)));
        let basic = der_tlv(0x30, &[&der[basic_at + 3..], &certs[..]].concat());
        let bytes = der_tlv(
            0x30,
            &[&der[oid_at..oid_at + 11], &der_tlv(0x04, &basic)[..]].concat(),
        );
        let huge = der_tlv(
            0x30,
            &[&[0x0a, 0x01, 0x00][..], &der_tlv(0xa0, &bytes)].concat(),
        );
        assert!(parse(&huge).is_ok());

        let dir = tempfile::tempdir().unwrap();
        let (file, cert) = (
            dir.path().join("server.ocsp"),
            dir.path().join("server.pem"),
        );
        let chain = [pem(LEAF), pem(CA)];
        std::fs::write(&file, &der).unwrap();
        let staple = load(&file, &cert, &chain).unwrap();
        assert_eq!(staple.der, der);
        std::fs::write(&file, &huge).unwrap();
        let e = load(&file, &cert, &chain).unwrap_err();
        assert!(e.contains("too large for an OCSP response"), "{e}");
    }

    #[test]
    fn stapled_from_this_update_until_next_update() {
        let s = Staple {
            der: Vec::new(),
            this_update: 1_000_000,
            next_update: Some(1_000_000 + 3 * 86_400),
            expiry_told: Arc::default(),
        };
        let path = Path::new("server.ocsp");
        let end = 1_000_000 + 3 * 86_400;
        assert!(s.current(1_000_000));
        assert!(s.current(1_000_000 - CLOCK_SKEW));
        assert!(!s.current(1_000_000 - CLOCK_SKEW - 1));
        let w = s.warnings(path, 999_000);
        assert!(w.len() == 1 && w[0].contains("not valid before"), "{w:?}");
        assert!(s.current(end - 1));
        assert!(!s.current(end));
        assert!(s.expired(end));
        let w = s.warnings(path, end);
        assert!(w.len() == 1 && w[0].contains("expired on"), "{w:?}");
        assert!(w[0].contains("(its nextUpdate)"), "{w:?}");
    }

    /// A current response is warned about from a day before its nextUpdate, with the time
    /// left: a refresh job that stopped shows in `wraith test` before clients lose the staple.
    #[test]
    fn a_response_expiring_within_a_day_is_warned_about() {
        let end = 1_000_000 + 3 * 86_400;
        let s = Staple {
            der: Vec::new(),
            this_update: 1_000_000,
            next_update: Some(end),
            expiry_told: Arc::default(),
        };
        let path = Path::new("server.ocsp");
        assert!(s.warnings(path, 1_000_000).is_empty());
        assert!(s.warnings(path, end - EXPIRES_SOON).is_empty());
        let w = s.warnings(path, end - EXPIRES_SOON + 1);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("server.ocsp expires in 23h59m (its nextUpdate, 1970-01-15T13:46:40Z)"),
            "{w:?}"
        );
        let w = s.warnings(path, end - 90);
        assert!(w[0].contains("expires in 0h01m"), "{w:?}");
        assert!(s.current(end - 90));
    }

    /// A response valid for longer than ten days by its nextUpdate is stapled for ten days
    /// after its thisUpdate, as mozilla::pkix holds it expired from then on, and warned
    /// about; one valid for ten days exactly is stapled until its nextUpdate.
    #[test]
    fn a_response_is_stapled_for_ten_days_at_most() {
        let ten_days = 10 * 86_400;
        let s = Staple {
            der: Vec::new(),
            this_update: 1_000_000,
            next_update: Some(1_000_000 + 30 * 86_400),
            expiry_told: Arc::default(),
        };
        let path = Path::new("server.ocsp");
        assert_eq!(s.valid_until(), 1_000_000 + ten_days);
        assert!(s.current(1_000_000 + ten_days - 1));
        assert!(!s.current(1_000_000 + ten_days));
        assert!(s.expired(1_000_000 + ten_days));
        let w = s.warnings(path, 1_000_000);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("valid until 1970-02-11T13:46:40Z by its nextUpdate")
                && w[0].contains("stapled only until 1970-01-22T13:46:40Z"),
            "{w:?}"
        );
        let w = s.warnings(path, 1_000_000 + ten_days - 3600);
        assert!(
            w[1].contains("expires in 1h00m (ten days after its thisUpdate, "),
            "{w:?}"
        );
        let w = s.warnings(path, 1_000_000 + ten_days);
        assert!(
            w[1].contains("expired on 1970-01-22T13:46:40Z (ten days after its thisUpdate)"),
            "{w:?}"
        );

        let s = Staple {
            next_update: Some(1_000_000 + ten_days),
            ..s
        };
        assert_eq!(s.valid_until(), 1_000_000 + ten_days);
        assert!(s.warnings(path, 1_000_000).is_empty());
        let w = s.warnings(path, 1_000_000 + ten_days);
        assert!(w[0].contains("(its nextUpdate)"), "{w:?}");
    }

    /// A response without a nextUpdate is stapled for a day after its thisUpdate, as
    /// mozilla::pkix accepts it, and always warned about.
    #[test]
    fn a_response_without_next_update_is_stapled_for_a_day() {
        let s = Staple {
            der: Vec::new(),
            this_update: 1_000_000,
            next_update: None,
            expiry_told: Arc::default(),
        };
        let path = Path::new("server.ocsp");
        assert_eq!(s.valid_until(), 1_086_400);
        assert!(s.current(1_086_399));
        assert!(!s.expired(1_086_399));
        assert!(!s.current(1_086_400));
        assert!(s.expired(1_086_400));
        let w = s.warnings(path, 1_000_000);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("has no nextUpdate") && w[0].contains("until 1970-01-13T13:46:40Z"),
            "{w:?}"
        );
        let w = s.warnings(path, 1_086_400);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[1].contains("expired on 1970-01-13T13:46:40Z (a day after its thisUpdate)"),
            "{w:?}"
        );
    }

    /// A CA of the issuer's name, with another key (a CA key rollover's other half).
    fn same_name_ca() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        let (ca, other) = (pem(CA), der.clone());
        let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
        let (_, other) = x509_parser::parse_x509_certificate(&other).unwrap();
        assert_eq!(ca.subject().as_raw(), other.subject().as_raw());
        der
    }

    /// With two CAs of the issuer's name in the chain file, the wrong one first, the CertID's
    /// key hash is compared with each (the leaf has no Authority Key Identifier to tell them
    /// apart): the response is about the leaf when it names either; with only the other CA in
    /// the file it is not.
    #[test]
    fn any_ca_of_the_issuers_name_may_be_the_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let (file, cert) = (
            dir.path().join("server.ocsp"),
            dir.path().join("server.pem"),
        );
        std::fs::write(&file, good()).unwrap();
        let other = same_name_ca();
        load(&file, &cert, &[pem(LEAF), other.clone(), pem(CA)]).unwrap();
        let e = load(&file, &cert, &[pem(LEAF), other]).unwrap_err();
        assert!(e.contains("of another issuer"), "{e}");
    }

    /// A serial number is an INTEGER: the same value however many redundant leading octets
    /// encode it, but `00 80 A1 B2` (positive) is not `80 A1 B2` (negative).
    #[test]
    fn serial_numbers_compare_as_signed_integers() {
        let der = good();
        let r = parse(&der).unwrap();
        let leaf = pem(LEAF);
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let id = |serial| CertId {
            serial,
            ..r.responses[0].id
        };
        assert_eq!(
            id(&[0x00, 0x80, 0xa1, 0xb2]).matches(&leaf, None),
            Some(true)
        );
        assert_eq!(
            id(&[0x00, 0x00, 0x80, 0xa1, 0xb2]).matches(&leaf, None),
            Some(true)
        );
        assert_eq!(id(&[0x80, 0xa1, 0xb2]).matches(&leaf, None), Some(false));
        assert_eq!(
            id(&[0xff, 0x80, 0xa1, 0xb2]).matches(&leaf, None),
            Some(false)
        );
        assert_eq!(minimal(&[0xff, 0xff, 0x80]), &[0x80]);
        assert_eq!(minimal(&[0x00]), &[0x00]);
    }

    /// Times are UTC, as DER has them; fractions of a second are allowed (and dropped).
    #[test]
    fn times_must_be_utc() {
        let t = |text: &str| {
            let der = tlv(0x18, text.as_bytes());
            time(&Any::from_der(&der).unwrap().1, "thisUpdate")
        };
        assert_eq!(t("20261127232525Z"), Ok(1_795_821_925));
        assert_eq!(t("20261127232525.5Z"), Ok(1_795_821_925));
        for local in [
            "20261127232525",
            "20261127232525+0100",
            "20261127232525-0000",
        ] {
            let e = t(local).unwrap_err();
            assert!(e.contains("not a UTC time ending in Z"), "{local}: {e}");
        }
        assert!(t("20261327232525Z").is_err());
    }

    #[test]
    fn serial_numbers_show_without_leading_zeros() {
        assert_eq!(strip_zeros(&[0, 0x80, 1]), &[0x80, 1]);
        assert_eq!(hex(strip_zeros(&[0, 0x0a, 0xff])), "0A:FF");
        assert_eq!(hex(&[]), "00");
    }
}
