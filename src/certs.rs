//! Development certificates (`wraith certs init`, and `wraith serve` when they are missing):
//! a dev CA, a server certificate for localhost/127.0.0.1/::1 and a client certificate with a
//! SPIFFE ID. ECDSA P-256, private keys written 0600. Never for production.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};

/// The SPIFFE ID of the development client certificate.
pub const DEV_CLIENT_SPIFFE_ID: &str = "spiffe://wraith.dev/client/dev";

/// File names inside the dev certs directory.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
];

/// A certificate authority that can issue leaf certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA private key, PEM.
    pub key_pem: String,
}

/// An issued certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    dn
}

fn rc(e: rcgen::Error) -> String {
    format!("certificate generation failed: {e}")
}

impl Ca {
    /// A new self-signed CA valid for ten years.
    pub fn new(common_name: &str) -> Result<Ca, String> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, "Wraith development");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(rc)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from PEM files.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, String> {
        let key = KeyPair::from_pem(key_pem).map_err(rc)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(rc)?;
        let key_pem = issuer.key().serialize_pem();
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem,
        })
    }

    /// An intermediate CA signed by this one, valid for five years.
    pub fn intermediate(&self, common_name: &str) -> Result<Ca, String> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, "Wraith development");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(5 * 365);
        let cert = params.signed_by(&key, &self.issuer).map_err(rc)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate revocation list (PEM) signed by this CA, revoking the certificates with
    /// these serial numbers (big-endian bytes), valid for `days` from an hour ago.
    pub fn revocation_list(&self, revoked: &[&[u8]], days: i64) -> Result<String, String> {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(days),
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial.to_vec()),
                    revocation_time: now - time::Duration::minutes(5),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(rc)
    }

    /// A server certificate for the given DNS names and IP addresses, valid for a year.
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(
            names.first().copied().unwrap_or("localhost"),
            "Wraith development",
        );
        for n in names {
            let san = match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().map_err(rc)?),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, 365)
    }

    /// A client certificate carrying `spiffe_id` as URI SAN, valid for a year.
    pub fn issue_client(
        &self,
        common_name: &str,
        spiffe_id: Option<&str>,
    ) -> Result<Issued, String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, "Wraith development");
        if let Some(id) = spiffe_id {
            params
                .subject_alt_names
                .push(SanType::URI(id.try_into().map_err(rc)?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, 365)
    }

    /// Signs arbitrary parameters (tests use this for unusual certificates).
    pub fn issue(&self, mut params: CertificateParams, days: i64) -> Result<Issued, String> {
        let key = KeyPair::generate().map_err(rc)?;
        if params.not_after == CertificateParams::default().not_after {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(days);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(rc)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes a file, private (0600) when `secret`; refuses to overwrite unless `force`.
///
/// The contents go to a new file beside it (created exclusively, never through a symlink),
/// which then replaces `path` by a rename: a symlink at `path` is replaced, not written
/// through, and a descriptor someone holds open on an old, readable key never sees the new
/// one.
pub fn write_file(path: &Path, contents: &str, secret: bool, force: bool) -> Result<(), String> {
    if !force && path.symlink_metadata().is_ok() {
        return Err(format!(
            "refusing to overwrite {} (use --force)",
            path.display()
        ));
    }
    let name = path
        .file_name()
        .ok_or_else(|| format!("cannot write {}: no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    let written = f
        .write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| {
            if force {
                fs::rename(&tmp, path)
            } else {
                // Never replace what appeared meanwhile.
                fs::hard_link(&tmp, path).and_then(|()| fs::remove_file(&tmp))
            }
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}

/// Creates the full development set in `dir`. Refuses to overwrite existing files unless
/// `force`. Returns the paths written.
pub fn init(dir: &Path, force: bool) -> Result<Vec<PathBuf>, String> {
    fs::create_dir_all(dir).map_err(|e| match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => format!(
            "{} is {}, not a directory: give --dir a directory",
            dir.display(),
            if m.is_file() {
                "a file"
            } else {
                crate::files::kind(&m)
            }
        ),
        _ => format!("cannot create {}: {e}", dir.display()),
    })?;
    if !force {
        let existing: Vec<_> = FILES
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.exists())
            .collect();
        if !existing.is_empty() {
            return Err(format!(
                "refusing to overwrite {} (use --force)",
                existing
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let ca = Ca::new("Wraith development CA")?;
    let server = ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
    let client = ca.issue_client("dev-client", Some(DEV_CLIENT_SPIFFE_ID))?;
    let files = [
        ("ca.pem", &ca.cert_pem, false),
        ("ca-key.pem", &ca.key_pem, true),
        ("server.pem", &server.cert_pem, false),
        ("server-key.pem", &server.key_pem, true),
        ("client.pem", &client.cert_pem, false),
        ("client-key.pem", &client.key_pem, true),
    ];
    let mut written = Vec::new();
    for (name, contents, secret) in files {
        let path = dir.join(name);
        write_file(&path, contents, secret, force)?;
        written.push(path);
    }
    Ok(written)
}

/// Creates the development certificates in `dir` if the server certificate is missing.
/// Returns whether anything was created.
pub fn ensure_dev_certs(dir: &Path) -> Result<bool, String> {
    if dir.join("server.pem").exists() && dir.join("server-key.pem").exists() {
        return Ok(false);
    }
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");
    if ca_cert.exists() && ca_key.exists() {
        // Keep an existing CA (clients may already trust it); issue what is missing.
        let read = |p: &Path| {
            crate::files::read_to_string(p, crate::files::SMALL)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let ca = Ca::load(&read(&ca_cert)?, &read(&ca_key)?)?;
        let server = ca.issue_server(&["localhost", "127.0.0.1", "::1"])?;
        write_file(&dir.join("server.pem"), &server.cert_pem, false, true)?;
        write_file(&dir.join("server-key.pem"), &server.key_pem, true, true)?;
        if !dir.join("client.pem").exists() {
            let client = ca.issue_client("dev-client", Some(DEV_CLIENT_SPIFFE_ID))?;
            write_file(&dir.join("client.pem"), &client.cert_pem, false, true)?;
            write_file(&dir.join("client-key.pem"), &client.key_pem, true, true)?;
        }
        return Ok(true);
    }
    init(dir, true)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn force_replaces_a_symlink_instead_of_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        let certs = dir.path().join("certs");
        fs::create_dir(&certs).unwrap();
        std::os::unix::fs::symlink(&victim, certs.join("ca-key.pem")).unwrap();
        // Without --force even a dangling or foreign symlink is "existing".
        assert!(init(&certs, false)
            .unwrap_err()
            .contains("refusing to overwrite"));
        init(&certs, true).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let meta = fs::symlink_metadata(certs.join("ca-key.pem")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&certs)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn init_writes_private_keys_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let written = init(dir.path(), false).unwrap();
        assert_eq!(written.len(), 6);
        let mode = fs::metadata(dir.path().join("server-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = init(dir.path(), false).unwrap_err();
        assert!(err.contains("refusing to overwrite"), "{err}");
        init(dir.path(), true).unwrap();
    }

    #[test]
    fn ensure_keeps_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), false).unwrap();
        let ca_before = fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        fs::remove_file(dir.path().join("server.pem")).unwrap();
        fs::remove_file(dir.path().join("server-key.pem")).unwrap();
        assert!(ensure_dev_certs(dir.path()).unwrap());
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            ca_before
        );
        assert!(!ensure_dev_certs(dir.path()).unwrap());
    }
}
