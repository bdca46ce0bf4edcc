//! Shared integration-test harness: a real `wraith` process on a temp config, real upstream
//! servers on 127.0.0.1:0, certificates made with rcgen at test time, and real HTTP clients.
//! Every test reads like a story: start an upstream, put the gateway in front, make a client.

#![allow(dead_code)]

pub mod crowdsec;
pub mod h2frames;
pub mod quic;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A test PKI in a temp directory: CA, server cert for localhost/127.0.0.1, client certs.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: wraith::certs::Ca,
    pub ca_pem: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca = wraith::certs::Ca::new("Wraith test CA").unwrap();
        let server = ca.issue_server(&["localhost", "127.0.0.1", "::1"]).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, &ca.cert_pem).unwrap();
        let server_cert = dir.join("server.pem");
        let server_key = dir.join("server-key.pem");
        std::fs::write(&server_cert, &server.cert_pem).unwrap();
        std::fs::write(&server_key, &server.key_pem).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_pem,
            server_cert,
            server_key,
        }
    }

    /// Issues a new server certificate into the same files (for reload tests).
    pub fn rotate_server_cert(&self) -> String {
        let server = self
            .ca
            .issue_server(&["localhost", "127.0.0.1", "::1"])
            .unwrap();
        std::fs::write(&self.server_cert, &server.cert_pem).unwrap();
        std::fs::write(&self.server_key, &server.key_pem).unwrap();
        server.cert_pem
    }

    /// Issues a client certificate and writes `<name>.pem` / `<name>-key.pem`.
    pub fn client(&self, name: &str, spiffe_id: Option<&str>) -> (PathBuf, PathBuf) {
        let c = self.ca.issue_client(name, spiffe_id).unwrap();
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, &c.cert_pem).unwrap();
        std::fs::write(&key, &c.key_pem).unwrap();
        (cert, key)
    }

    /// Issues a client certificate from `params` (subject, SANs, validity) with this CA.
    pub fn client_with(&self, name: &str, params: rcgen::CertificateParams) -> ClientCert {
        ClientCert::write(&self.dir, name, &self.ca, params, None)
    }

    /// A client certificate issued by another CA (`ca`), written beside this PKI's files.
    pub fn client_from(
        &self,
        ca: &wraith::certs::Ca,
        name: &str,
        params: rcgen::CertificateParams,
    ) -> ClientCert {
        ClientCert::write(&self.dir, name, ca, params, None)
    }

    /// A client certificate that expired yesterday.
    pub fn expired_client(&self, name: &str) -> ClientCert {
        let mut p = client_params(name, Some(&format!("spiffe://test.local/{name}")));
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(30);
        p.not_after = now - time::Duration::days(1);
        self.client_with(name, p)
    }

    /// A client certificate from a CA nobody trusts.
    pub fn untrusted_client(&self, name: &str) -> ClientCert {
        let other = wraith::certs::Ca::new("Some other CA").unwrap();
        ClientCert::write(
            &self.dir,
            name,
            &other,
            client_params(name, Some(&format!("spiffe://test.local/{name}"))),
            None,
        )
    }

    /// A client certificate issued by an intermediate CA of this CA; the file holds the
    /// leaf and the intermediate (a chain of depth 2).
    pub fn intermediate_client(&self, name: &str) -> ClientCert {
        let intermediate = self.ca.intermediate("Wraith test intermediate").unwrap();
        ClientCert::write(
            &self.dir,
            name,
            &intermediate,
            client_params(name, Some(&format!("spiffe://test.local/{name}"))),
            Some(&intermediate.cert_pem),
        )
    }

    /// Writes a CRL of this CA revoking `revoked` into `file`; returns its path.
    pub fn write_crl(&self, file: &str, revoked: &[&ClientCert]) -> PathBuf {
        let serials: Vec<&[u8]> = revoked.iter().map(|c| c.serial.as_slice()).collect();
        let pem = self.ca.revocation_list(&serials, 7).unwrap();
        let path = self.dir.join(file);
        std::fs::write(&path, pem).unwrap();
        path
    }
}

/// Parameters of a client certificate: CN (and O "Wraith test"), optional SPIFFE ID.
pub fn client_params(cn: &str, spiffe_id: Option<&str>) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "Wraith test");
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    if let Some(id) = spiffe_id {
        p.subject_alt_names
            .push(rcgen::SanType::URI(id.try_into().unwrap()));
    }
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p
}

/// A client certificate written to `<name>.pem` / `<name>-key.pem`.
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The leaf, DER.
    pub der: Vec<u8>,
    /// Serial number bytes (for CRLs).
    pub serial: Vec<u8>,
}

impl ClientCert {
    fn write(
        dir: &Path,
        name: &str,
        ca: &wraith::certs::Ca,
        mut params: rcgen::CertificateParams,
        chain_pem: Option<&str>,
    ) -> ClientCert {
        // A random serial we know, so a CRL can name it.
        let serial: Vec<u8> = std::iter::once(0x01)
            .chain((0..15).map(|_| fastrand::u8(..)))
            .collect();
        params.serial_number = Some(rcgen::SerialNumber::from(serial.clone()));
        let issued = ca.issue(params, 30).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        let mut pem = issued.cert_pem.clone();
        if let Some(chain) = chain_pem {
            pem.push_str(chain);
        }
        std::fs::write(&cert, pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
            .unwrap()
            .to_vec();
        ClientCert {
            cert,
            key,
            der,
            serial,
        }
    }

    /// `(cert, key)` for the client helpers.
    pub fn pair(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }

    /// SHA-256 of the certificate, lowercase hex (XFCC `Hash=`).
    pub fn fingerprint(&self) -> String {
        wraith::identity::sha256_hex(&self.der)
    }
}

/// A rustls server config for a test upstream: `cert`/`key` PEM files, ALPN h2 + http/1.1,
/// optionally requiring client certificates issued by `client_ca`.
pub fn tls_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A rustls client config trusting `ca_pem`, offering `alpn`, optionally with a client cert.
pub fn tls_client_config(
    ca_pem: &Path,
    alpn: &[&[u8]],
    client: Option<(&Path, &Path)>,
) -> rustls::ClientConfig {
    tls_client_config_with(
        ca_pem,
        alpn,
        client,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

/// `tls_client_config` offering only `versions`.
pub fn tls_client_config_with(
    ca_pem: &Path,
    alpn: &[&[u8]],
    client: Option<(&Path, &Path)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A reqwest client over HTTPS trusting the test CA (HTTP/1.1 and HTTP/2 by ALPN).
pub fn https_client(ca_pem: &Path, client: Option<(&Path, &Path)>) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_client_config(ca_pem, &[b"h2", b"http/1.1"], client))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A reqwest client over HTTPS that only speaks HTTP/2 (ALPN h2).
pub fn https_client_h2(ca_pem: &Path, client: Option<(&Path, &Path)>) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_client_config(ca_pem, &[b"h2"], client))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A reqwest client over HTTPS that only speaks HTTP/1.1.
pub fn https_client_h1(ca_pem: &Path, client: Option<(&Path, &Path)>) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_client_config(ca_pem, &[b"http/1.1"], client))
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A plain-HTTP reqwest client.
pub fn http_client() -> reqwest::Client {
    // reqwest needs a process-wide rustls provider even for plain HTTP.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Ports

/// A loopback TCP port that nothing listens on now and that nothing else in this run is
/// handed: picked at random outside the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), so no `bind(127.0.0.1:0)` of another test
/// (nor a local end of an outgoing connection) gets it, and never twice in this process.
/// For a port that must stay closed, or one a child process binds later.
/// Sends `request` as raw bytes on a new connection to `addr` and returns what the server
/// sends until it closes the connection (at most 5 s of it), lossily as text.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn unused_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // Up to 12 000 ports below the ephemeral range (20000..32768 by default), or above it
    // when the range starts too low to leave room.
    let range = if low >= 11_024 {
        low.saturating_sub(12_000).max(10_000)..low
    } else if high <= 64_535 {
        high + 1..u16::MAX
    } else {
        // The whole port space is ephemeral: the best left is a port free right now.
        1024..u16::MAX
    };
    let mut taken = HANDED_OUT.lock().unwrap();
    for _ in 0..10_000 {
        let port = fastrand::u16(range.clone());
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
    panic!("no free port in {range:?}");
}

// ---------------------------------------------------------------------------------------------
// Upstream servers

/// A real HTTP/1.1 (and h2c) server on 127.0.0.1:0 running `handler` for each request.
pub struct Upstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    /// TCP connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, handler)
    }

    /// Serves on an already-bound listener (to restart on the same port).
    pub fn serve<F, Fut>(listener: tokio::net::TcpListener, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::serve_with(listener, None, handler)
    }

    /// An HTTPS server (HTTP/1.1 and HTTP/2 by ALPN) with `tls`.
    pub async fn start_tls<F, Fut>(tls: Arc<rustls::ServerConfig>, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve_with(
            listener,
            Some(tokio_rustls::TlsAcceptor::from(tls)),
            handler,
        )
    }

    fn serve_with<F, Fut>(
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handler: F,
    ) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let c = conns.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let handler = handler.clone();
                let tls = tls.clone();
                let conn = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(s) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                                .await;
                        }
                    }
                });
                let mut list = c.lock().unwrap();
                list.retain(|h| !h.is_finished());
                list.push(conn.abort_handle());
            }
        });
        Upstream {
            addr,
            task,
            conns,
            accepted,
        }
    }

    /// TCP connections accepted so far (a pooled connection reused is not one more).
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Kills the server: stops accepting and drops every open connection (the port then
    /// refuses connections, like a crashed process).
    pub fn kill(self) {
        self.task.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// An upstream that answers every request with a JSON echo of what it received:
    /// method, path (with query), headers, and the body length.
    pub async fn echo() -> Upstream {
        Upstream::start(|req: Request<Incoming>| async move { echo_response(req).await }).await
    }

    /// Stops accepting (existing connections are aborted with the runtime).
    pub fn stop(self) {
        self.task.abort();
    }

    /// `127.0.0.1:port`, as written in an `endpoints` list.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

/// A WebSocket echo server on 127.0.0.1:0 (tokio-tungstenite): every text or binary message
/// comes back; a connection that is no WebSocket, or breaks, is dropped.
pub async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The echo handler (usable inside custom handlers).
pub async fn echo_response(req: Request<Incoming>) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.to_string())
            .or_default()
            .push(v.to_str().unwrap_or("").to_string());
    }
    // Read frame by frame: how many data frames hyper made of the body says how it came
    // (one per chunk of a chunked body, at least).
    let mut body = body;
    let mut data = Vec::new();
    let mut data_frames = 0usize;
    let mut trailers: HashMap<String, Vec<String>> = HashMap::new();
    while let Some(Ok(frame)) = body.frame().await {
        match frame.into_data() {
            Ok(d) => {
                data_frames += 1;
                data.extend_from_slice(&d);
            }
            Err(frame) => {
                for (k, v) in frame.trailers_ref().into_iter().flatten() {
                    trailers
                        .entry(k.to_string())
                        .or_default()
                        .push(v.to_str().unwrap_or("").to_string());
                }
            }
        }
    }
    let body = data;
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "trailers": trailers,
        "body_len": body.len(),
        "data_frames": data_frames,
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream", "echo")
        .body(full(serde_json::to_vec(&json).unwrap()))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The gateway process

/// A `wraith serve` child process on a config written into a temp directory.
pub struct Wraith {
    pub dir: TempDir,
    /// The test PKI, when started from a `Setup`.
    pub pki: Option<Pki>,
    pub config_path: PathBuf,
    child: Option<Child>,
    state: Arc<(Mutex<LogState>, Condvar)>,
    /// Dropped with the instance: tells its watchdog the test is over (`watchdog`).
    _watchdog: std::sync::mpsc::Sender<()>,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    listening: HashMap<String, SocketAddr>,
    started: bool,
    closed: bool,
}

/// The server log's message for an upstream response body that broke off.
pub const UPSTREAM_BODY_BROKE_OFF: &str =
    "upstream response body broke off; the client got a truncated response";

/// libfaketime's preload, from Debian's `faketime` package (`.ci/install-deps.sh`).
pub const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// The environment (`Setup::start_with_env`) that runs the gateway under libfaketime, its
/// wall clock offset by what `clock` holds (`+0`, `+2d`, ...), read again on every call; the
/// monotonic clock is left alone, as an NTP step leaves it.
pub fn faketime_env(clock: &Path) -> [(&'static str, &std::ffi::OsStr); 4] {
    [
        ("LD_PRELOAD", FAKETIME.as_ref()),
        ("FAKETIME_TIMESTAMP_FILE", clock.as_os_str()),
        ("FAKETIME_NO_CACHE", "1".as_ref()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".as_ref()),
    ]
}

/// A config directory prepared before the process starts (certs, policies, ...).
pub struct Setup {
    pub dir: TempDir,
    pub pki: Pki,
}

/// A `[policy]` section whose only policy permits everything (written by `Setup::new` into
/// `policies/`): tests of other stages are not about policy.
pub const ALLOW_ALL_POLICY: &str = "[policy]\ndir = \"policies\"\n";

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let setup = Setup { dir, pki };
        setup.write_policies(
            "policies",
            &[(
                "allow-all.cedar",
                "@id(\"test-allow-all\")\npermit(principal, action, resource);\n",
            )],
        );
        setup
    }

    /// Writes policy files into `<dir>/<name>/`; returns that directory.
    pub fn write_policies(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(dir.join("tests")).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    /// The standard `[[listener]]` blocks: `http` and `https` on port 0, `[server]` with pid
    /// file and admin socket, and `ALLOW_ALL_POLICY`.
    pub fn listeners(&self) -> String {
        Self::standard_listeners()
    }

    /// The text of `listeners()`, without a `Setup` (the config must still live in a
    /// `Setup`'s directory, which holds the allow-all policies).
    pub fn standard_listeners() -> String {
        Self::listeners_text("", ALLOW_ALL_POLICY)
    }

    /// The standard blocks with `tls_extra` added to the https listener's `tls = { ... }`
    /// (e.g. `client_auth = "require", client_ca = "ca.pem"`) and `policy` instead of the
    /// allow-all `[policy]` section.
    pub fn listeners_with(&self, tls_extra: &str, policy: &str) -> String {
        Self::listeners_text(tls_extra, policy)
    }

    /// The standard blocks with HTTP/3 on the https listener (`http3 = true`, and
    /// `quic = { <quic> }` when `quic` is not empty), `tls_extra` and `policy` as in
    /// `listeners_with`.
    pub fn listeners_h3(&self, tls_extra: &str, quic: &str, policy: &str) -> String {
        let quic = if quic.is_empty() {
            String::new()
        } else {
            format!("\nquic = {{ {quic} }}")
        };
        Self::listeners_text_full(tls_extra, &format!("http3 = true{quic}"), policy)
    }

    fn listeners_text(tls_extra: &str, policy: &str) -> String {
        Self::listeners_text_full(tls_extra, "", policy)
    }

    fn listeners_text_full(tls_extra: &str, https_extra: &str, policy: &str) -> String {
        let tls_extra = if tls_extra.is_empty() {
            String::new()
        } else {
            format!(", {tls_extra}")
        };
        format!(
            r#"
[server]
shutdown_timeout = "10s"
pid_file = "wraith.pid"
admin_socket = "admin.sock"

[[listener]]
name = "http"
address = "127.0.0.1:0"
protocol = "http"

[[listener]]
name = "https"
address = "127.0.0.1:0"
protocol = "https"
tls = {{ cert = "server.pem", key = "server-key.pem"{tls_extra} }}
{https_extra}

{policy}
"#
        )
    }

    /// Writes `config` and starts `wraith serve` on it.
    pub fn start(self, config: &str) -> Wraith {
        let mut w = Wraith::start_in(self.dir, config);
        w.pki = Some(self.pki);
        w
    }

    /// `start`, with these variables added to the gateway's environment.
    pub fn start_with_env(self, config: &str, env: &[(&str, &std::ffi::OsStr)]) -> Wraith {
        let mut w = Wraith::spawn(self.dir, config, false, env);
        w.pki = Some(self.pki);
        w
    }

    /// `start`, with the config path given to `serve` relative to its working directory.
    pub fn start_relative(self, config: &str) -> Wraith {
        let mut w = Wraith::start_in_relative(self.dir, config);
        w.pki = Some(self.pki);
        w
    }
}

impl Wraith {
    /// Writes `wraith.toml` into `dir` and starts the gateway; returns once every listener
    /// is bound (read from the JSON log), or panics with the log if it does not start.
    pub fn start_in(dir: TempDir, config: &str) -> Wraith {
        Wraith::spawn(dir, config, false, &[])
    }

    /// `start_in`, but `serve -c wraith.toml` run in `dir`: the config path as given is
    /// relative.
    pub fn start_in_relative(dir: TempDir, config: &str) -> Wraith {
        Wraith::spawn(dir, config, true, &[])
    }

    fn spawn(
        dir: TempDir,
        config: &str,
        relative: bool,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Wraith {
        let config_path = dir.path().join("wraith.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_wraith"));
        command.arg("serve").arg("-c");
        if relative {
            command.arg("wraith.toml").current_dir(dir.path());
        } else {
            command.arg(&config_path);
        }
        command.envs(env.iter().copied());
        let mut child = command
            .env(
                "WRAITH_LOG",
                std::env::var("WRAITH_TEST_LOG")
                    .unwrap_or_else(|_| "info,wraith::policy=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wraith");
        let stderr = child.stderr.take().unwrap();
        let state = Arc::new((Mutex::new(LogState::default()), Condvar::new()));
        let st = state.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("WRAITH_TEST_ECHO").is_some() {
                    eprintln!("wraith| {line}");
                }
                let (lock, cv) = &*st;
                let mut s = lock.lock().unwrap();
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        if let (Some(name), Some(addr)) =
                            (v["listener"].as_str(), v["address"].as_str())
                        {
                            s.listening.insert(name.to_string(), addr.parse().unwrap());
                        }
                    }
                    if v["message"] == "wraith started" {
                        s.started = true;
                    }
                }
                s.lines.push(line);
                cv.notify_all();
            }
            let (lock, cv) = &*st;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        let pid = child.id();
        let w = Wraith {
            dir,
            pki: None,
            config_path,
            child: Some(child),
            _watchdog: watchdog(pid, state.clone()),
            state,
        };
        w.wait_for(Duration::from_secs(30), |s| s.started || s.closed);
        if !w.state.0.lock().unwrap().started {
            panic!("wraith did not start:\n{}", w.log());
        }
        w
    }

    /// The test PKI (panics if not started from a `Setup`).
    pub fn pki(&self) -> &Pki {
        self.pki.as_ref().expect("started from a Setup")
    }

    fn wait_for(&self, timeout: Duration, mut f: impl FnMut(&LogState) -> bool) -> bool {
        let (lock, cv) = &*self.state;
        let deadline = Instant::now() + timeout;
        let mut s = lock.lock().unwrap();
        loop {
            if f(&s) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = cv.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    /// Waits until a log line satisfies `pred` (JSON-parsed); returns it.
    pub fn wait_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let mut found = None;
        self.wait_for(timeout, |s| {
            for l in &s.lines {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                    if pred(&v) {
                        found = Some(v);
                        return true;
                    }
                }
            }
            false
        });
        found
    }

    /// Every JSON log line so far.
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.state
            .0
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The whole log so far, as text.
    pub fn log(&self) -> String {
        self.state.0.lock().unwrap().lines.join("\n")
    }

    /// The bound address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .state
            .0
            .lock()
            .unwrap()
            .listening
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name}:\n{}", self.log()))
    }

    /// Waits for a listener named `name` to be bound (after a reload adds one).
    pub fn wait_listener(&self, name: &str, timeout: Duration) -> Option<SocketAddr> {
        self.wait_for(timeout, |s| s.listening.contains_key(name));
        self.state.0.lock().unwrap().listening.get(name).copied()
    }

    pub fn url(&self, listener: &str, path: &str) -> String {
        let a = self.addr(listener);
        let scheme = if listener.contains("https") {
            "https"
        } else {
            "http"
        };
        if scheme == "https" {
            format!("https://localhost:{}{path}", a.port())
        } else {
            format!("http://{a}{path}")
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Rewrites the config file (for reload tests).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }

    /// SIGHUP, then waits for the outcome in the log: Ok(()) reloaded, Err(log line) rejected.
    pub fn reload(&self) -> Result<(), String> {
        let before = self.state.0.lock().unwrap().lines.len();
        self.signal(libc::SIGHUP);
        let mut outcome = None;
        self.wait_for(Duration::from_secs(30), |s| {
            for l in &s.lines[before..] {
                if l.contains("configuration reloaded") {
                    outcome = Some(Ok(()));
                    return true;
                }
                if l.contains("reload rejected") {
                    outcome = Some(Err(l.clone()));
                    return true;
                }
            }
            false
        });
        outcome.unwrap_or_else(|| Err(format!("no reload outcome in the log:\n{}", self.log())))
    }

    /// Waits for the process to exit (and its log to be read to the end); returns its exit
    /// code (None on timeout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                // Its last log lines (the flush report at exit) may still be in the pipe:
                // read to the end before a test looks for them.
                self.wait_for(Duration::from_secs(5), |s| s.closed);
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a `wraith` subcommand against this instance's config; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_wraith"))
            .args(args)
            .arg("-c")
            .arg(&self.config_path)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Waits (up to 10 s) for the JSON access-log sink at `rel` to hold the record of
    /// `request_id`; returns it.
    pub fn access_record(&self, rel: &str, request_id: &str) -> serde_json::Value {
        let path = self.path(rel);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    if v["request_id"] == request_id {
                        return v;
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "no access record for {request_id} in {}:\n{text}",
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON lines written so far to the log file at `rel` (an access or events log).
    pub fn json_lines(&self, rel: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path(rel))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Asserts that a connection the gateway closed for abuse (a flood, a rapid reset) left
    /// one access record in `access.json` (400, `malformed_request`, over `protocol`) and a
    /// `malformed_request` event in `events.json`.
    pub async fn assert_closed_connection_recorded(&self, protocol: &str, within: Duration) {
        let record = self
            .wait_json_line("access.json", within, |r| r["error"] == "malformed_request")
            .await
            .expect("a record of the closed connection");
        assert_eq!(record["protocol"], protocol, "{record}");
        assert_eq!(record["status"], 400, "{record}");
        let event = self
            .wait_json_line("events.json", within, |e| {
                e["wraith"]["event"] == "malformed_request"
            })
            .await;
        assert!(event.is_some(), "no malformed_request event");
    }

    /// Waits (at most `within`) for a JSON line at `rel` that `matches`; returns it.
    pub async fn wait_json_line(
        &self,
        rel: &str,
        within: Duration,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.json_lines(rel).into_iter().find(|v| matches(v)) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A path inside the instance's directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `GET path` on the admin socket (`admin.sock` in the instance's directory): status and
    /// body.
    pub async fn admin_get(&self, path: &str) -> (u16, Bytes) {
        let (status, body) = wraith::admin::request(
            &self.path("admin.sock"),
            http::Method::GET,
            path,
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        (status.as_u16(), body)
    }

    /// Calls the admin API over the unix socket (`admin.sock` in the temp dir).
    pub async fn admin(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (http::StatusCode, serde_json::Value) {
        wraith::admin::call_with_body(
            &self.dir.path().join("admin.sock"),
            method,
            path,
            body.as_ref(),
            Duration::from_secs(10),
        )
        .await
        .unwrap()
    }

    /// The admin API's status document (`GET /v1/status` on the admin socket).
    pub async fn status(&self) -> serde_json::Value {
        let socket = self.dir.path().join("admin.sock");
        let (code, v) = wraith::admin::call(
            &socket,
            http::Method::GET,
            "/v1/status",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(code, 200);
        v
    }

    /// The status entry of endpoint `addr` (e.g. `127.0.0.1:9000`) of upstream `name`.
    pub async fn endpoint_status(&self, name: &str, addr: &str) -> serde_json::Value {
        let v = self.status().await;
        v["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("no upstream {name} in {v}"))["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"].as_str().unwrap_or("").ends_with(addr))
            .unwrap_or_else(|| panic!("no endpoint {addr} in {v}"))
            .clone()
    }

    /// Polls `f` every 20 ms until it returns true or `timeout` passes.
    pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if f().await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// How long one gateway instance may live before its watchdog steps in
/// (`WRAITH_TEST_DEADLINE_SECS`; the longest test binary takes well under a minute).
fn test_deadline() -> Duration {
    let secs = std::env::var("WRAITH_TEST_DEADLINE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// A test that hangs (an await with nothing to end it) would otherwise hold the whole suite
/// until CI's own time limit, with nothing said about where. Past `test_deadline` this
/// names the test, prints the gateway's log and kills the gateway, which ends most waits on
/// it in an error the test reports; a test still running a minute later ends the process.
fn watchdog(pid: u32, state: Arc<(Mutex<LogState>, Condvar)>) -> std::sync::mpsc::Sender<()> {
    use std::sync::mpsc::RecvTimeoutError::Timeout;
    let (done, over) = std::sync::mpsc::channel::<()>();
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed test thread)")
        .to_string();
    let deadline = test_deadline();
    // Straight to the process's stderr: libtest captures `eprintln!` in the threads a test
    // spawns, and shows it only for a test that ends, which this one may never do.
    macro_rules! say {
        ($($arg:tt)*) => {{
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), $($arg)*);
        }};
    }
    std::thread::spawn(move || {
        if over.recv_timeout(deadline) != Err(Timeout) {
            return;
        }
        let (log, exited) = {
            let s = state.0.lock().unwrap_or_else(|e| e.into_inner());
            (s.lines.join("\n"), s.closed)
        };
        say!(
            "watchdog: {test} still running after {deadline:?}; killing its gateway (pid {pid}). \
             The gateway's log:\n{log}"
        );
        if !exited {
            say!("watchdog: the gateway's threads:\n{}", stacks(pid));
        }
        say!(
            "watchdog: the test process's threads:\n{}",
            stacks(std::process::id())
        );
        if !exited {
            // SAFETY: kill(2) has no memory effects; the pid is the gateway's, not yet reaped
            // (its stderr is still open, so it has not exited).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if over.recv_timeout(Duration::from_secs(60)) == Err(Timeout) {
            say!("watchdog: {test} still running a minute after its gateway was killed; ending the test process");
            std::process::exit(101);
        }
    });
    done
}

/// The stack of every thread of process `pid`, by gdb when it is installed (where a hung
/// test waits, and whether the gateway is stuck or idle).
fn stacks(pid: u32) -> String {
    let out = Command::new("timeout")
        .args(["60", "gdb", "-p", &pid.to_string(), "-batch", "-nx", "-ex"])
        .arg("thread apply all bt")
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(no stacks: {e})"),
    }
}

impl Drop for Wraith {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the gateway said, beside the assertion that failed (many assertions carry
            // it already; the ones that time out in a client do not).
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            eprintln!(
                "the gateway's log (last {} of {} lines):\n{}",
                tail.len(),
                lines.len(),
                tail.join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `wraith <args>` outside any instance.
pub fn wraith_cmd(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wraith"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `wraith_cmd` for a command that might hang: killed after `limit`, which is then an
/// error carrying what it printed to stderr.
pub fn wraith_cmd_within(
    args: &[&str],
    cwd: &Path,
    limit: Duration,
) -> Result<(i32, String, String), String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wraith"));
    cmd.args(args).current_dir(cwd);
    command_within(cmd, limit)
}

/// `wraith_cmd_within` for a command set up by the caller (its environment, its limits).
pub fn command_within(mut cmd: Command, limit: Duration) -> Result<(i32, String, String), String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let args: Vec<_> = cmd.get_args().collect();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            return Err(format!(
                "wraith {args:?} still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// An upstream that answers as soon as it has a request head (413 for a body, 200 without),
/// then reads and discards the declared body before the next request, the way nginx does
/// with `client_max_body_size`. It records every request line it parsed.
pub async fn answers_before_the_body() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end;
                        }
                        let mut tmp = [0u8; 4096];
                        match tokio::io::AsyncReadExt::read(&mut s, &mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    log.lock()
                        .unwrap()
                        .push(head.lines().next().unwrap_or("").to_string());
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .and_then(|v| v.trim().parse::<usize>().ok())
                        })
                        .unwrap_or(0);
                    let reply: &[u8] = if len > 0 {
                        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    if tokio::io::AsyncWriteExt::write_all(&mut s, reply)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // Discard the body it declared, whatever arrives as that body.
                    while buf.len() < len {
                        let mut tmp = [0u8; 4096];
                        match tokio::io::AsyncReadExt::read(&mut s, &mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    buf.drain(..len);
                }
            });
        }
    });
    (addr, seen)
}

// ---------------------------------------------------------------------------------------------
// Damaged input

/// `count` damaged copies of `seeds`, the same on every run (xorshift64* from `seed`): one
/// to four changes each, among a byte replaced by or inserted from a set of framing-relevant
/// bytes (CR, LF, colon, space, tab, NUL, DEL, 0xff, ...), a byte removed, the line a byte is
/// in doubled, and the end cut off.
pub fn damaged(seeds: &[&[u8]], count: usize, seed: u64) -> Vec<Vec<u8>> {
    let noise = b"\r\n: \t;,0\x00\x7f\xffaZ/%";
    let mut state = seed;
    let mut below = move |n: usize| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    };
    (0..count)
        .map(|_| {
            let mut c = seeds[below(seeds.len())].to_vec();
            for _ in 0..1 + below(4) {
                if c.is_empty() {
                    break;
                }
                let at = below(c.len());
                match below(5) {
                    0 => c[at] = noise[below(noise.len())],
                    1 => c.insert(at, noise[below(noise.len())]),
                    2 => {
                        c.remove(at);
                    }
                    3 => {
                        let start = c[..at]
                            .iter()
                            .rposition(|&b| b == b'\n')
                            .map_or(0, |i| i + 1);
                        let end = c[at..]
                            .iter()
                            .position(|&b| b == b'\n')
                            .map_or(c.len(), |i| at + i + 1);
                        let line = c[start..end].to_vec();
                        c.splice(start..start, line);
                    }
                    _ => c.truncate(at.max(1)),
                }
            }
            c
        })
        .collect()
}

/// An HTTP/2 connection to the gateway's https listener.
pub async fn h2_connect(wraith: &Wraith) -> h2::client::SendRequest<bytes::Bytes> {
    let config = tls_client_config(&wraith.pki().ca_pem, &[b"h2"], None);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(wraith.addr("https"))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}
