//! OCSP stapling from a file (`ocsp_response`): real OCSP responses made at test time by the
//! `openssl ocsp` responder (Debian's openssl) from a CA database index the test writes, for a
//! certificate made with rcgen; the staple read by `openssl s_client -status` and by a rustls
//! client that records the bytes it receives. Also what `wraith test` says about responses
//! that cannot be stapled (another certificate's, revoked, not an OCSP response at all, past
//! their nextUpdate), a staple expiring while the server runs (its clock moved by
//! libfaketime), and a refreshed file taken by a reload.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the test CA's responder says about a certificate.
#[derive(Clone, Copy)]
enum Status {
    Good,
    Revoked,
}

/// The serial number of the certificate in `cert` as the CA database writes it (hex).
fn serial(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .expect("openssl (Debian's openssl package) must be installed");
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim()
        .strip_prefix("serial=")
        .unwrap_or_else(|| panic!("no serial from openssl x509: {text}"))
        .to_string()
}

/// Has the test CA's OCSP responder (`openssl ocsp -index`) answer for `cert` and writes the
/// DER response to `out`. `digest` is the CertID's hash (`-sha1`, `-sha256`), `days` how long
/// it is valid, `clock` a libfaketime offset for openssl (e.g. `-2d`: made two days ago).
fn respond(
    pki: &Pki,
    cert: &Path,
    status: Status,
    out: &Path,
    digest: &str,
    days: u32,
    clock: Option<&str>,
) {
    respond_for(
        &pki.ca_pem,
        &pki.ca.key_pem,
        &[(cert, status)],
        out,
        &[digest, "-ndays", &days.to_string()],
        clock,
    );
}

/// Has the OCSP responder of the CA whose certificate is in `ca_pem` (its key `ca_key`, PEM)
/// answer one request for all of `certs` (each with its status in the CA database, in that
/// order in the request and the response) and writes the DER response to `out`. `args` go to
/// `openssl ocsp` as well: the CertID's hash (`-sha1`) and the validity (`-ndays 7`; without
/// `-ndays` or `-nmin` the response has no nextUpdate). `clock` as in [`respond`].
fn respond_for(
    ca_pem: &Path,
    ca_key: &str,
    certs: &[(&Path, Status)],
    out: &Path,
    args: &[&str],
    clock: Option<&str>,
) {
    let dir = out.parent().unwrap();
    let key = dir.join("responder-key.pem");
    std::fs::write(&key, ca_key).unwrap();
    // The CA database: V(alid) or R(evoked), expiry, revocation time, serial, file, subject.
    let mut index = String::new();
    for (cert, status) in certs {
        index.push_str(&match status {
            Status::Good => format!(
                "V\t301231000000Z\t\t{}\tunknown\t/CN=localhost\n",
                serial(cert)
            ),
            Status::Revoked => format!(
                "R\t301231000000Z\t260101000000Z\t{}\tunknown\t/CN=localhost\n",
                serial(cert)
            ),
        });
    }
    let index_file = dir.join("index.txt");
    std::fs::write(&index_file, index).unwrap();
    let mut cmd = match clock {
        Some(offset) => {
            let mut c = Command::new("faketime");
            c.args(["-f", offset, "openssl"]);
            c
        }
        None => Command::new("openssl"),
    };
    cmd.arg("ocsp")
        .arg("-index")
        .arg(&index_file)
        .arg("-rsigner")
        .arg(ca_pem)
        .arg("-rkey")
        .arg(&key)
        .arg("-CA")
        .arg(ca_pem)
        .arg("-issuer")
        .arg(ca_pem)
        .args(args);
    for (cert, _) in certs {
        cmd.arg("-cert").arg(cert);
    }
    cmd.args(["-no_nonce", "-respout"]).arg(out);
    let done = cmd.output().expect("run openssl ocsp");
    assert!(
        done.status.success() && out.exists(),
        "openssl ocsp failed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// The response in `file` as `openssl ocsp -resp_text` shows it.
fn response_text(file: &Path) -> String {
    let out = Command::new("openssl")
        .args(["ocsp", "-noverify", "-resp_text", "-respin"])
        .arg(file)
        .output()
        .expect("run openssl ocsp");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The https listener answers `/` itself; `tls_extra` goes into its `tls = { ... }`.
fn config(setup: &Setup, tls_extra: &str) -> String {
    home_route(&setup.listeners_with(tls_extra, ALLOW_ALL_POLICY))
}

/// `listeners` (the standard blocks) with a route answering `/`.
fn home_route(listeners: &str) -> String {
    format!(
        r#"{listeners}
[[route]]
name = "home"
respond = {{ status = 200, body = "ok\n" }}
"#
    )
}

/// Verifies the server as usual and keeps the OCSP response it stapled (empty: none).
#[derive(Debug)]
struct RecordsStaple {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    staple: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for RecordsStaple {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.staple.lock().unwrap() = Some(ocsp_response.to_vec());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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

/// A TLS connection to the https listener, with the staple the handshake carried (empty:
/// none).
struct Client {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    staple: Vec<u8>,
}

/// A client config trusting the test CA, offering `versions` and `alpn`, whose verifier
/// records the staple (rustls clients always ask for one).
fn client_config(
    wraith: &Wraith,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[u8],
) -> (rustls::ClientConfig, Arc<RecordsStaple>) {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&wraith.pki().ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .unwrap();
    let verifier = Arc::new(RecordsStaple {
        inner,
        staple: Mutex::new(None),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    (config, verifier)
}

impl Client {
    /// Connects over TCP offering only `versions`.
    async fn connect(
        wraith: &Wraith,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Client {
        let (config, verifier) = client_config(wraith, versions, b"http/1.1");
        let tcp = tokio::net::TcpStream::connect(wraith.addr("https"))
            .await
            .unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let staple = verifier.staple.lock().unwrap().take().unwrap();
        Client { stream, staple }
    }

    /// One request on this connection (kept alive); the response's status line.
    async fn get(&mut self) -> String {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        // The response is small and fixed: read until its body ("ok\n").
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while !out.ends_with(b"ok\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf))
                .await
                .expect("response within 10 s")
                .unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

/// The staple a QUIC handshake with the https listener carries (empty: none).
async fn quic_staple(wraith: &Wraith) -> Vec<u8> {
    let (config, verifier) = client_config(wraith, &[&rustls::version::TLS13], b"h3");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(wraith.addr("https"), "localhost")
        .unwrap()
        .await
        .unwrap();
    conn.close(0u32.into(), b"done");
    let staple = verifier.staple.lock().unwrap().take().unwrap();
    staple
}

/// `openssl s_client -status` against the https listener; its output.
fn s_client(wraith: &Wraith) -> String {
    let addr = wraith.addr("https");
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-status", "-servername", "localhost", "-CAfile"])
        .arg(&wraith.pki().ca_pem)
        .arg("-connect")
        .arg(addr.to_string())
        .stdin(std::process::Stdio::null());
    let out = cmd.output().expect("run openssl s_client");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `wraith test` on the config in `dir`; (exit code, output).
fn wraith_test(dir: &Path, config: &str) -> (i32, String) {
    let path = dir.join("wraith.toml");
    std::fs::write(&path, config).unwrap();
    let (code, out, err) = wraith_cmd(&["test", "-c", path.to_str().unwrap()], dir);
    (code, format!("{out}{err}"))
}

/// `wraith test` as [`wraith_test`], its clock moved by libfaketime to `offset` (`+36h`).
fn wraith_test_at(dir: &Path, config: &str, offset: &str) -> (i32, String) {
    let path = dir.join("wraith.toml");
    std::fs::write(&path, config).unwrap();
    let clock = dir.join("test-clock");
    std::fs::write(&clock, format!("{offset}\n")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wraith"));
    cmd.args(["test", "-c", path.to_str().unwrap()])
        .current_dir(dir)
        .envs(faketime_env(&clock));
    let (code, out, err) = command_within(cmd, Duration::from_secs(60)).unwrap();
    (code, format!("{out}{err}"))
}

fn ocsp_file(setup: &Setup) -> PathBuf {
    setup.dir.path().join("server.ocsp")
}

/// The response the CA's responder made is what clients get: `openssl s_client -status`
/// reads it as successful and good, a rustls client receives the file's bytes over TLS 1.3,
/// TLS 1.2 and QUIC; `wraith status` shows it. (The CertID hashes with SHA-1, openssl's default.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_staple_reaches_openssl_and_rustls_clients() {
    let setup = Setup::new();
    let file = ocsp_file(&setup);
    respond(
        &setup.pki,
        &setup.pki.server_cert,
        Status::Good,
        &file,
        "-sha1",
        7,
        None,
    );
    let cfg = home_route(&setup.listeners_h3(
        r#"ocsp_response = "server.ocsp", versions = ["1.2", "1.3"]"#,
        "",
        ALLOW_ALL_POLICY,
    ));
    let (code, out) = wraith_test(setup.dir.path(), &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    let wraith = setup.start(&cfg);
    let der = std::fs::read(&file).unwrap();

    let text = s_client(&wraith);
    assert!(text.contains("OCSP Response Status: successful"), "{text}");
    assert!(text.contains("Cert Status: good"), "{text}");

    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut client = Client::connect(&wraith, &[version]).await;
        assert!(client.staple == der, "{version:?}: not the file's response");
        assert_eq!(client.get().await, "HTTP/1.1 200 OK");
    }

    // HTTP/3: the QUIC handshake carries it too.
    assert!(
        quic_staple(&wraith).await == der,
        "QUIC: not the file's response"
    );

    let (code, status, err) = wraith.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        status.contains("ocsp staple") && status.contains("server.ocsp stapled, next update"),
        "{status}"
    );
    let (_, json, _) = wraith.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let https = v["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "https")
        .unwrap();
    assert_eq!(https["ocsp"]["stapled"], true, "{json}");
    assert!(https["ocsp"]["next_update"].as_i64().is_some(), "{json}");
}

/// Responses that cannot be stapled are refused by `wraith test`, naming the key, the file and
/// what is wrong: another certificate's, a revoked certificate's, PEM instead of DER, not an
/// OCSP response at all, a missing file. A response whose CertID hashes with SHA-256 and a
/// certificate file that holds the issuer too (whose key hash is then checked) are accepted.
#[test]
fn responses_that_cannot_be_stapled_are_refused_naming_the_file() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    let file = ocsp_file(&setup);
    let cfg = config(&setup, r#"ocsp_response = "server.ocsp""#);
    let refused = |what: &str, expected: &str| {
        let (code, out) = wraith_test(dir, &cfg);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(
            out.contains("listener[1].tls.ocsp_response")
                && out.contains(&file.display().to_string())
                && out.contains(expected),
            "{what}: expected {expected:?} in:\n{out}"
        );
    };

    // Another certificate of the same CA.
    let other = setup.pki.ca.issue_server(&["localhost"]).unwrap();
    let other_pem = dir.join("other.pem");
    std::fs::write(&other_pem, &other.cert_pem).unwrap();
    respond(
        &setup.pki,
        &other_pem,
        Status::Good,
        &file,
        "-sha1",
        7,
        None,
    );
    refused("another certificate", "not about the certificate in");

    // This certificate, revoked.
    respond(
        &setup.pki,
        &setup.pki.server_cert,
        Status::Revoked,
        &file,
        "-sha1",
        7,
        None,
    );
    refused("revoked", "was revoked on 2026-01-01T00:00:00Z");

    // Not a response.
    std::fs::write(&file, b"not an OCSP response\n").unwrap();
    refused(
        "garbage",
        "not a DER OCSP response (as `openssl ocsp -respout` writes it): OCSPResponse:",
    );
    std::fs::write(
        &file,
        "-----BEGIN OCSP RESPONSE-----\nMAA=\n-----END OCSP RESPONSE-----\n",
    )
    .unwrap();
    refused("PEM", "PEM text, but an OCSP response file is DER");
    std::fs::remove_file(&file).unwrap();
    refused("missing", "cannot read OCSP response file");

    // SHA-256 CertID, and a chain file holding the issuer: accepted.
    respond(
        &setup.pki,
        &setup.pki.server_cert,
        Status::Good,
        &file,
        "-sha256",
        7,
        None,
    );
    let leaf = std::fs::read_to_string(&setup.pki.server_cert).unwrap();
    std::fs::write(
        &setup.pki.server_cert,
        format!("{leaf}{}", setup.pki.ca.cert_pem),
    )
    .unwrap();
    let (code, out) = wraith_test(dir, &cfg);
    assert_eq!(code, 0, "{out}");

    // With the issuer in the chain its key hash counts: a CA of the same name but another
    // key is not the issuer.
    let impostor = wraith::certs::Ca::new("Wraith test CA").unwrap();
    std::fs::write(
        &setup.pki.server_cert,
        format!("{leaf}{}", impostor.cert_pem),
    )
    .unwrap();
    refused(
        "issuer key",
        "of another issuer (its name or key hash differs)",
    );
}

/// A response past its nextUpdate is not stapled (a strict client would refuse the
/// connection over it, where it accepts none): `wraith test` warns and passes, `serve` warns
/// and serves the certificate without a staple.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_response_is_warned_about_and_not_stapled() {
    let setup = Setup::new();
    let file = ocsp_file(&setup);
    // Made two days ago, valid for one.
    respond(
        &setup.pki,
        &setup.pki.server_cert,
        Status::Good,
        &file,
        "-sha1",
        1,
        Some("-2d"),
    );
    let cfg = config(&setup, r#"ocsp_response = "server.ocsp""#);
    let (code, out) = wraith_test(setup.dir.path(), &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(r#"warning: listener[1].tls.ocsp_response (listener "https"): OCSP response"#)
            && out.contains("(its nextUpdate): it is not stapled"),
        "{out}"
    );
    let wraith = setup.start(&cfg);
    assert!(
        wraith.log().contains("it is not stapled"),
        "{}",
        wraith.log()
    );
    let mut client = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(client.staple.is_empty(), "an expired staple was sent");
    assert_eq!(client.get().await, "HTTP/1.1 200 OK");
    let text = s_client(&wraith);
    assert!(text.contains("OCSP response: no response sent"), "{text}");
    let (_, status, _) = wraith.cli(&["status"]);
    assert!(status.contains("NOT stapled"), "{status}");
}

/// A staple that expires while the server runs is no longer sent from its nextUpdate on, over
/// TCP and QUIC, and that is logged once. The server's clock is moved by libfaketime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staple_expiring_while_serving_is_no_longer_sent() {
    let setup = Setup::new();
    let file = ocsp_file(&setup);
    respond(
        &setup.pki,
        &setup.pki.server_cert,
        Status::Good,
        &file,
        "-sha1",
        1,
        None,
    );
    let clock = setup.dir.path().join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let cfg =
        home_route(&setup.listeners_h3(r#"ocsp_response = "server.ocsp""#, "", ALLOW_ALL_POLICY));
    let wraith = setup.start_with_env(&cfg, &faketime_env(&clock));
    let der = std::fs::read(&file).unwrap();
    let client = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(client.staple == der);
    assert!(quic_staple(&wraith).await == der, "QUIC");

    // Two days on: past the nextUpdate (the client's clock is not moved).
    std::fs::write(&clock, "+172800\n").unwrap();
    for _ in 0..2 {
        let mut client = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
        assert!(client.staple.is_empty(), "an expired staple was sent");
        assert_eq!(client.get().await, "HTTP/1.1 200 OK");
        assert!(
            quic_staple(&wraith).await.is_empty(),
            "QUIC: an expired staple was sent"
        );
    }
    let warned: Vec<_> = wraith
        .log_json()
        .into_iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("OCSP response expired"))
        })
        .collect();
    assert_eq!(warned.len(), 1, "{}", wraith.log());
    assert_eq!(warned[0]["level"], "WARN", "{:?}", warned[0]);
    assert!(
        warned[0]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("server.ocsp")),
        "{:?}",
        warned[0]
    );
}

/// A refreshed file is read by a reload: new connections get the new response, a connection
/// opened before keeps being served. A reload with a broken file is refused and the old
/// staple stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_response_is_stapled_after_a_reload_without_dropping_connections() {
    let setup = Setup::new();
    let file = ocsp_file(&setup);
    respond(
        &setup.pki,
        &setup.pki.server_cert,
        Status::Good,
        &file,
        "-sha1",
        1,
        None,
    );
    let cfg = config(&setup, r#"ocsp_response = "server.ocsp""#);
    let wraith = setup.start(&cfg);
    let first = std::fs::read(&file).unwrap();
    let mut old = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(old.staple == first);
    assert_eq!(old.get().await, "HTTP/1.1 200 OK");

    // The cron job's refresh: a new response (here valid for a week), then a reload.
    respond(
        wraith.pki(),
        &wraith.pki().server_cert,
        Status::Good,
        &file,
        "-sha1",
        7,
        None,
    );
    let second = std::fs::read(&file).unwrap();
    assert!(second != first);
    wraith.reload().unwrap();
    let fresh = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(
        fresh.staple == second,
        "the reload did not take the new file"
    );
    assert_eq!(old.get().await, "HTTP/1.1 200 OK");

    // A broken refresh: the reload is refused, the running staple stays.
    std::fs::write(&file, b"").unwrap();
    let e = wraith.reload().unwrap_err();
    assert!(e.contains("server.ocsp"), "{e}");
    let after = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(after.staple == second);
    assert_eq!(old.get().await, "HTTP/1.1 200 OK");
}

/// One response about several certificates (openssl answers a request for two `-cert`s in
/// one BasicOCSPResponse), the served certificate's entry second: that entry is found and
/// its status decides, not the first entry's. Another certificate revoked beside a good one
/// is stapled; the served certificate revoked beside a good one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_about_several_certificates_is_judged_by_the_served_ones_entry() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    let file = ocsp_file(&setup);
    let other = setup.pki.ca.issue_server(&["other.example"]).unwrap();
    let other_pem = dir.join("other.pem");
    std::fs::write(&other_pem, &other.cert_pem).unwrap();
    let server = setup.pki.server_cert.as_path();
    let both = |first: Status, second: Status| {
        respond_for(
            &setup.pki.ca_pem,
            &setup.pki.ca.key_pem,
            &[(&other_pem, first), (server, second)],
            &file,
            &["-sha1", "-ndays", "7"],
            None,
        );
        // The premise: two entries, the served certificate's second.
        let text = response_text(&file);
        let at = |cert: &Path| {
            text.find(&format!("Serial Number: {}", serial(cert)))
                .unwrap_or_else(|| panic!("{} not in the response:\n{text}", serial(cert)))
        };
        assert!(at(&other_pem) < at(server), "{text}");
    };
    let cfg = config(&setup, r#"ocsp_response = "server.ocsp""#);

    both(Status::Good, Status::Revoked);
    let (code, out) = wraith_test(dir, &cfg);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("listener[1].tls.ocsp_response") && out.contains("was revoked on"),
        "{out}"
    );

    both(Status::Revoked, Status::Good);
    let (code, out) = wraith_test(dir, &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    let wraith = setup.start(&cfg);
    let der = std::fs::read(&file).unwrap();
    let mut client = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(client.staple == der, "not the file's response");
    assert_eq!(client.get().await, "HTTP/1.1 200 OK");
}

/// A CA key rollover: the chain file holds two CAs of the issuer's name with different keys,
/// the one that did not issue the certificate first. The certificate's Authority Key
/// Identifier picks its issuer among them: the real issuer's response is stapled, a response
/// naming the other CA's key (for the same serial number) is not about this certificate, and
/// with only the other CA in the file the error says the issuer is missing from it.
#[test]
fn a_ca_key_rollover_leaves_the_issuer_found_by_its_key() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    let file = ocsp_file(&setup);
    let cfg = config(&setup, r#"ocsp_response = "server.ocsp""#);
    let old = wraith::certs::Ca::new("Wraith test CA").unwrap();
    let old_pem = dir.join("old-ca.pem");
    std::fs::write(&old_pem, &old.cert_pem).unwrap();
    let subject = |pem: &Path| {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(pem)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(subject(&old_pem), subject(&setup.pki.ca_pem));
    let leaf = std::fs::read_to_string(&setup.pki.server_cert).unwrap();
    let chain = |cas: &[&str]| {
        std::fs::write(&setup.pki.server_cert, format!("{leaf}{}", cas.concat())).unwrap();
    };
    chain(&[&old.cert_pem, &setup.pki.ca.cert_pem]);

    // The issuer's response.
    let server = setup.pki.server_cert.clone();
    respond_for(
        &setup.pki.ca_pem,
        &setup.pki.ca.key_pem,
        &[(&server, Status::Good)],
        &file,
        &["-sha1", "-ndays", "7"],
        None,
    );
    let (code, out) = wraith_test(dir, &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");

    // The other CA's response for the same serial number: its name hash is the same, its key
    // hash is that of a CA in the file, but not of the certificate's issuer.
    respond_for(
        &old_pem,
        &old.key_pem,
        &[(&server, Status::Good)],
        &file,
        &["-sha1", "-ndays", "7"],
        None,
    );
    let (code, out) = wraith_test(dir, &cfg);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not about the certificate in")
            && out.contains("of another issuer (its name or key hash differs)"),
        "{out}"
    );

    // Only the other CA in the file: the issuer is not there.
    chain(&[&old.cert_pem]);
    respond(&setup.pki, &server, Status::Good, &file, "-sha1", 7, None);
    let (code, out) = wraith_test(dir, &cfg);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("holds no certificate of its issuer"), "{out}");
}

/// A response without a nextUpdate (`openssl ocsp` without `-ndays`) is stapled for a day
/// after its thisUpdate, as Firefox (mozilla::pkix) accepts it, then no longer; `wraith test`
/// and `serve` warn that it has no nextUpdate, and `wraith test` a day on that it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_without_next_update_is_stapled_for_a_day() {
    let setup = Setup::new();
    let dir = setup.dir.path().to_path_buf();
    let file = ocsp_file(&setup);
    respond_for(
        &setup.pki.ca_pem,
        &setup.pki.ca.key_pem,
        &[(&setup.pki.server_cert, Status::Good)],
        &file,
        &["-sha1"],
        None,
    );
    let text = response_text(&file);
    assert!(
        text.contains("This Update") && !text.contains("Next Update"),
        "{text}"
    );
    let cfg = config(&setup, r#"ocsp_response = "server.ocsp""#);
    let (code, out) = wraith_test(&dir, &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(r#"warning: listener[1].tls.ocsp_response (listener "https"): OCSP response"#)
            && out.contains("server.ocsp has no nextUpdate")
            && out.contains("stapled only until"),
        "{out}"
    );
    let (code, out) = wraith_test_at(&dir, &cfg, "+90000");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("(a day after its thisUpdate): it is not stapled"),
        "{out}"
    );

    let clock = dir.join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let wraith = setup.start_with_env(&cfg, &faketime_env(&clock));
    assert!(
        wraith.log().contains("has no nextUpdate"),
        "{}",
        wraith.log()
    );
    let der = std::fs::read(&file).unwrap();
    let client = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(client.staple == der);
    let (_, status, _) = wraith.cli(&["status"]);
    assert!(
        status.contains("server.ocsp stapled, no next update (stapled until "),
        "{status}"
    );

    // A day and an hour on (the client's clock is not moved).
    std::fs::write(&clock, "+90000\n").unwrap();
    let mut client = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(client.staple.is_empty(), "stapled more than a day");
    assert_eq!(client.get().await, "HTTP/1.1 200 OK");
    // (The line is written by the gateway as the handshake goes; the test reads its log
    // through a pipe, so it may not be here yet.)
    let expired = |v: &serde_json::Value| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("OCSP response expired"))
    };
    assert!(
        wraith.wait_log(Duration::from_secs(10), expired).is_some(),
        "{}",
        wraith.log()
    );
    let warned = wraith
        .log_json()
        .into_iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("OCSP response expired"))
        })
        .count();
    assert_eq!(warned, 1, "{}", wraith.log());
}

/// A response valid for 30 days by its nextUpdate (a private responder's choice) is stapled
/// for ten days after its thisUpdate only: Firefox (mozilla::pkix) holds an end-entity
/// certificate's response expired from then on. `wraith test` and `serve` say so, `wraith
/// status` shows both times, and eleven days on the certificate goes without a staple.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_is_stapled_for_ten_days_at_most() {
    let setup = Setup::new();
    let dir = setup.dir.path().to_path_buf();
    let file = ocsp_file(&setup);
    respond(
        &setup.pki,
        &setup.pki.server_cert,
        Status::Good,
        &file,
        "-sha1",
        30,
        None,
    );
    let cfg = config(&setup, r#"ocsp_response = "server.ocsp""#);
    let (code, out) = wraith_test(&dir, &cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(r#"warning: listener[1].tls.ocsp_response (listener "https"): OCSP response"#)
            && out.contains("by its nextUpdate, but clients (Firefox) hold a response expired ten days after its thisUpdate, so it is stapled only until"),
        "{out}"
    );
    let (code, out) = wraith_test_at(&dir, &cfg, "+950400");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("(ten days after its thisUpdate): it is not stapled"),
        "{out}"
    );

    let clock = dir.join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let wraith = setup.start_with_env(&cfg, &faketime_env(&clock));
    assert!(
        wraith.log().contains("stapled only until"),
        "{}",
        wraith.log()
    );
    let der = std::fs::read(&file).unwrap();
    let client = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(client.staple == der);
    let (_, status, _) = wraith.cli(&["status"]);
    assert!(
        status.contains("server.ocsp stapled, next update ")
            && status.contains(": ten days after its this update)"),
        "{status}"
    );

    // Eleven days on (the client's clock is not moved).
    std::fs::write(&clock, "+950400\n").unwrap();
    let mut client = Client::connect(&wraith, &[&rustls::version::TLS13]).await;
    assert!(client.staple.is_empty(), "stapled more than ten days");
    assert_eq!(client.get().await, "HTTP/1.1 200 OK");
}

/// `wraith test` warns when the response's nextUpdate is less than a day away, naming the
/// listener, the file and the time left: the sign of a refresh job that stopped running.
#[test]
fn wraith_test_warns_of_a_response_expiring_within_a_day() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    let file = ocsp_file(&setup);
    respond(
        &setup.pki,
        &setup.pki.server_cert,
        Status::Good,
        &file,
        "-sha1",
        2,
        None,
    );
    let cfg = config(&setup, r#"ocsp_response = "server.ocsp""#);
    // 47 hours before its nextUpdate, then a little under 12.
    for (offset, warned) in [("+3600", false), ("+130000", true)] {
        let (code, out) = wraith_test_at(dir, &cfg, offset);
        assert_eq!(code, 0, "{out}");
        assert_eq!(out.contains("warning"), warned, "{offset}: {out}");
    }
    let (_, out) = wraith_test_at(dir, &cfg, "+130000");
    assert!(
        out.contains(&format!(
            r#"warning: listener[1].tls.ocsp_response (listener "https"): OCSP response {} expires in 11h5"#,
            file.display()
        )) && out.contains("(its nextUpdate, "),
        "{out}"
    );
}
