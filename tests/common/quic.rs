//! HTTP/3 test clients: quinn + h3 over rustls (aws-lc-rs), with a choice of key-exchange
//! groups, an optional client certificate and 0-RTT; and a UDP relay that holds back the
//! server's handshake flight, so a 0-RTT request reaches the server while its handshake is
//! still in progress (on loopback it would otherwise complete in microseconds).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};

/// Which key-exchange groups the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Groups {
    /// rustls' default with post-quantum preferred: X25519MLKEM768 first, then classical.
    Default,
    /// Classical only: X25519, then P-256.
    Classical,
}

/// An HTTP/3 client endpoint (one UDP socket, any number of connections).
pub struct H3Client {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl H3Client {
    /// A client trusting `ca_pem`, offering `groups`, with an optional client certificate.
    /// Session tickets are kept, so a second connection can resume (and send 0-RTT).
    pub fn new(ca_pem: &Path, client: Option<(&Path, &Path)>, groups: Groups) -> H3Client {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        if groups == Groups::Classical {
            use rustls::crypto::aws_lc_rs::kx_group;
            provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1];
        }
        let mut tls = tls_client_with(ca_pem, client, Arc::new(provider));
        tls.alpn_protocols = vec![b"h3".to_vec()];
        tls.enable_early_data = true;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let config = quinn::ClientConfig::new(Arc::new(crypto));
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        H3Client { endpoint, config }
    }

    /// Sends QUIC PINGs whenever nothing else was sent for `interval` (quinn's keep-alive).
    pub fn keep_alive(mut self, interval: Duration) -> H3Client {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(interval));
        self.config.transport_config(Arc::new(transport));
        self
    }

    /// Connects with a full handshake (or a resumption without early data).
    pub async fn connect(&self, addr: SocketAddr) -> Result<H3Conn, String> {
        let conn = self
            .endpoint
            .connect_with(self.config.clone(), addr, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        H3Conn::new(conn).await
    }

    /// Connects sending 0-RTT: `None` when the client holds no session ticket for the server
    /// yet. The returned future resolves to whether the server accepted the early data.
    pub async fn connect_0rtt(&self, addr: SocketAddr) -> Option<(H3Conn, quinn::ZeroRttAccepted)> {
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, "localhost")
            .ok()?;
        let (conn, accepted) = connecting.into_0rtt().ok()?;
        Some((H3Conn::new(conn).await.ok()?, accepted))
    }
}

/// One HTTP/3 connection (clones share it: requests on clones run concurrently).
#[derive(Clone)]
pub struct H3Conn {
    pub conn: quinn::Connection,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    _driver: Arc<DriverTask>,
}

struct DriverTask(tokio::task::JoinHandle<()>);

impl Drop for DriverTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response with its whole body.
pub struct H3Response {
    pub head: Response<()>,
    pub body: Bytes,
}

impl H3Response {
    pub fn status(&self) -> u16 {
        self.head.status().as_u16()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.headers().get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

impl H3Conn {
    async fn new(conn: quinn::Connection) -> Result<H3Conn, String> {
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3Conn {
            conn,
            send,
            _driver: Arc::new(DriverTask(driver)),
        })
    }

    /// `GET https://localhost<path>`.
    pub async fn get(&mut self, path: &str) -> Result<H3Response, String> {
        self.request(
            Request::get(format!("https://localhost{path}"))
                .body(())
                .unwrap(),
            None,
        )
        .await
    }

    /// Sends `req` with `body` (if any) in one piece.
    pub async fn request(
        &mut self,
        req: Request<()>,
        body: Option<Bytes>,
    ) -> Result<H3Response, String> {
        let mut chunks = body.into_iter();
        self.request_streamed(req, move || chunks.next()).await
    }

    /// Sends `req` with a body produced chunk by chunk by `next` (nothing buffered ahead).
    pub async fn request_streamed(
        &mut self,
        req: Request<()>,
        mut next: impl FnMut() -> Option<Bytes>,
    ) -> Result<H3Response, String> {
        let mut stream = self
            .send
            .send_request(req)
            .await
            .map_err(|e| format!("send request: {e}"))?;
        // A server may answer before it has read the whole request and stop our sending
        // (RFC 9114 §4.1: a client MUST NOT discard a complete response because of that). So a
        // failure to send is reported only when no response follows.
        let mut send_failed = None;
        while let Some(chunk) = next() {
            if let Err(e) = stream.send_data(chunk).await {
                send_failed = Some(format!("send body: {e}"));
                break;
            }
        }
        if send_failed.is_none() {
            if let Err(e) = stream.finish().await {
                send_failed = Some(format!("finish: {e}"));
            }
        }
        let head = match stream.recv_response().await {
            Ok(head) => head,
            Err(e) => {
                return Err(match send_failed {
                    Some(first) => format!("{first}; then response: {e}"),
                    None => format!("response: {e}"),
                })
            }
        };
        let mut body = Vec::new();
        while let Some(mut chunk) = stream
            .recv_data()
            .await
            .map_err(|e| format!("response body: {e}"))?
        {
            while chunk.has_remaining() {
                let c = chunk.chunk();
                body.extend_from_slice(c);
                let n = c.len();
                chunk.advance(n);
            }
        }
        Ok(H3Response {
            head,
            body: body.into(),
        })
    }
}

/// A rustls client config with an explicit provider (the test CA, optional client cert).
pub fn tls_client_with(
    ca_pem: &Path,
    client: Option<(&Path, &Path)>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    match client {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}

// ---------------------------------------------------------------------------------------------
// Relay

/// A UDP relay between one client and `target` that holds every server datagram from the
/// first one carrying a QUIC Handshake packet on, for `hold`, keeping their order. The
/// client cannot finish the handshake before that, so whatever it sent as 0-RTT reaches the
/// server while the server's handshake is still incomplete.
pub struct HoldingRelay {
    pub addr: SocketAddr,
    /// Client connections the server sent a Retry to. A client that retransmits its first
    /// Initial before the Retry arrives gets a second Retry for the same connection; both carry
    /// the client's source connection ID as their destination, so they count once.
    pub retries: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingRelay {
    pub async fn start(target: SocketAddr, hold: Duration) -> HoldingRelay {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(target).await.unwrap();
        let addr = front.local_addr().unwrap();
        let retries: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let seen_retries = retries.clone();
        let task = tokio::spawn(async move {
            let (to_client, mut queue) =
                tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
            // Delivers server datagrams in order, each at its time.
            let f = front.clone();
            let c = client.clone();
            let sender = tokio::spawn(async move {
                while let Some((at, d)) = queue.recv().await {
                    tokio::time::sleep_until(at).await;
                    let dest = *c.lock().unwrap();
                    if let Some(dest) = dest {
                        let _ = f.send_to(&d, dest).await;
                    }
                }
            });
            let mut retried = std::collections::HashSet::<Vec<u8>>::new();
            let mut held_until = tokio::time::Instant::now();
            let mut buf = vec![0u8; 65536];
            let mut buf2 = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { break };
                        *client.lock().unwrap() = Some(from);
                        let _ = back.send(&buf[..n]).await;
                    }
                    r = back.recv(&mut buf2) => {
                        let Ok(n) = r else { break };
                        // Long header, type 3: a Retry; its DCID follows the version.
                        if n > 6 && buf2[0] & 0x80 != 0 && (buf2[0] >> 4) & 0x03 == 3 {
                            let len = buf2[5] as usize;
                            let dcid = buf2[6..(6 + len).min(n)].to_vec();
                            if retried.insert(dcid) {
                                seen_retries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                        let now = tokio::time::Instant::now();
                        if held_until <= now && has_handshake_packet(&buf2[..n]) {
                            held_until = now + hold;
                        }
                        let _ = to_client.send((held_until.max(now), buf2[..n].to_vec()));
                    }
                }
            }
            sender.abort();
        });
        HoldingRelay {
            addr,
            retries,
            task,
        }
    }
}

impl Drop for HoldingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A QUIC variable-length integer at the start of `d` (RFC 9000 §16): its value and length;
/// `None` when `d` is too short.
pub fn varint(d: &[u8]) -> Option<(u64, usize)> {
    let first = *d.first()?;
    let len = 1usize << (first >> 6);
    let bytes = d.get(..len)?;
    let v = bytes[1..]
        .iter()
        .fold(u64::from(first & 0x3f), |acc, b| (acc << 8) | u64::from(*b));
    Some((v, len))
}

/// Whether a datagram holds a QUIC v1 Handshake packet (long header type 2). Packet types
/// are not header-protected; coalesced packets are walked by their length fields.
pub fn has_handshake_packet(mut d: &[u8]) -> bool {
    while let Some(&first) = d.first() {
        if first & 0x80 == 0 {
            return false; // a short header: the rest is 1-RTT
        }
        let ty = (first >> 4) & 0x03;
        if ty == 2 {
            return true;
        }
        if ty == 3 {
            return false; // Retry
        }
        // type, version, DCID, SCID
        let mut i = 5;
        let Some(&dl) = d.get(i) else { return false };
        i += 1 + dl as usize;
        let Some(&sl) = d.get(i) else { return false };
        i += 1 + sl as usize;
        if ty == 0 {
            let Some((tl, n)) = d.get(i..).and_then(varint) else {
                return false;
            };
            i += n + tl as usize;
        }
        let Some((len, n)) = d.get(i..).and_then(varint) else {
            return false;
        };
        i += n + len as usize;
        if i > d.len() {
            return false;
        }
        d = &d[i..];
    }
    false
}
