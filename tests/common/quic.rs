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
    tickets: Arc<CountingSessions>,
}

/// rustls' client session cache, counting the TLS 1.3 tickets it is given: a test that
/// resumes again must not close a connection before that connection's ticket has come (with
/// 0-RTT the early response can arrive first: the server sends the ticket once it has the
/// client's Finished).
#[derive(Debug)]
struct CountingSessions {
    cache: rustls::client::ClientSessionMemoryCache,
    tickets: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingSessions {
    fn set_kx_hint(&self, name: rustls_pki_types::ServerName<'static>, group: rustls::NamedGroup) {
        self.cache.set_kx_hint(name, group)
    }

    fn kx_hint(&self, name: &rustls_pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.cache.kx_hint(name)
    }

    fn set_tls12_session(
        &self,
        name: rustls_pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.cache.set_tls12_session(name, value)
    }

    fn tls12_session(
        &self,
        name: &rustls_pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.cache.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &rustls_pki_types::ServerName<'static>) {
        self.cache.remove_tls12_session(name)
    }

    fn insert_tls13_ticket(
        &self,
        name: rustls_pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.cache.insert_tls13_ticket(name, value);
        self.tickets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn take_tls13_ticket(
        &self,
        name: &rustls_pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.cache.take_tls13_ticket(name)
    }
}

impl H3Client {
    /// A client trusting `ca_pem`, offering `groups`, with an optional client certificate.
    /// Session tickets are kept, so a second connection can resume (and send 0-RTT).
    pub fn new(ca_pem: &Path, client: Option<(&Path, &Path)>, groups: Groups) -> H3Client {
        H3Client::offering(ca_pem, client, groups, b"h3")
    }

    /// A client offering `alpn` instead of `h3` (a handshake the server refuses).
    pub fn offering(
        ca_pem: &Path,
        client: Option<(&Path, &Path)>,
        groups: Groups,
        alpn: &[u8],
    ) -> H3Client {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        if groups == Groups::Classical {
            use rustls::crypto::aws_lc_rs::kx_group;
            provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1];
        }
        let mut tls = tls_client_with(ca_pem, client, Arc::new(provider));
        tls.alpn_protocols = vec![alpn.to_vec()];
        tls.enable_early_data = true;
        let tickets = Arc::new(CountingSessions {
            cache: rustls::client::ClientSessionMemoryCache::new(256),
            tickets: Default::default(),
        });
        tls.resumption = rustls::client::Resumption::store(tickets.clone());
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let config = quinn::ClientConfig::new(Arc::new(crypto));
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        H3Client {
            endpoint,
            config,
            tickets,
        }
    }

    /// How many session tickets the client has been given so far.
    pub fn tickets(&self) -> usize {
        self.tickets
            .tickets
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (up to 10 s) until the client has been given more than `seen` tickets.
    pub async fn ticket_after(&self, seen: usize) {
        for _ in 0..1000 {
            if self.tickets() > seen {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no session ticket came within 10 s (had {seen})");
    }

    /// Sends QUIC PINGs whenever nothing else was sent for `interval` (quinn's keep-alive).
    pub fn keep_alive(mut self, interval: Duration) -> H3Client {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(interval));
        self.config.transport_config(Arc::new(transport));
        self
    }

    /// The client's current UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap()
    }

    /// Moves the client to a new UDP socket (another port): its connections go on from
    /// there, as after a NAT rebinding or a change of network.
    pub fn rebind(&self) {
        self.rebind_to("127.0.0.1".parse().unwrap());
    }

    /// Moves the client to a new UDP socket on `ip` (another loopback address: another
    /// client as far as bans and logs can tell).
    pub fn rebind_to(&self, ip: std::net::IpAddr) {
        let socket = std::net::UdpSocket::bind((ip, 0)).unwrap();
        self.endpoint.rebind(socket).unwrap();
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

    /// `connect_0rtt`, tried again (every 20 ms, for 2 s) until the client has a session it
    /// can send 0-RTT with (the ticket arrives just after a connection's handshake).
    pub async fn connect_0rtt_soon(&self, addr: SocketAddr) -> (H3Conn, quinn::ZeroRttAccepted) {
        for _ in 0..100 {
            if let Some(c) = self.connect_0rtt(addr).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the client never got a session ticket it could send 0-RTT with");
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
    pub send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
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
        HoldingRelay::relay(target, Some(hold), "127.0.0.1".parse().unwrap()).await
    }

    /// `start`, the client's datagrams passed on from an address on `from`.
    pub async fn start_from(
        target: SocketAddr,
        hold: Duration,
        from: std::net::IpAddr,
    ) -> HoldingRelay {
        HoldingRelay::relay(target, Some(hold), from).await
    }

    /// A relay that passes the client's datagrams on to `target` from an address on `from`,
    /// and drops every answer (counting Retries): to the server, a client that never receives
    /// what is sent to it, as one that forged its source address would.
    pub async fn one_way(target: SocketAddr, from: std::net::IpAddr) -> HoldingRelay {
        HoldingRelay::relay(target, None, from).await
    }

    async fn relay(
        target: SocketAddr,
        hold: Option<Duration>,
        from: std::net::IpAddr,
    ) -> HoldingRelay {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind((from, 0)).await.unwrap());
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
                        let Some(hold) = hold else { continue };
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

// ---------------------------------------------------------------------------------------------
// HTTP/3 written by hand

/// HTTP/3 frame types (RFC 9114 §7.2) the tests write or look for.
pub const DATA: u64 = 0x00;
pub const HEADERS: u64 = 0x01;
pub const SETTINGS: u64 = 0x04;
pub const GOAWAY: u64 = 0x07;
/// HTTP/3 error codes (RFC 9114 §8.1) the tests expect.
pub const H3_NO_ERROR: u64 = 0x100;
pub const H3_INTERNAL_ERROR: u64 = 0x102;
pub const H3_REQUEST_REJECTED: u64 = 0x10b;
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;
pub const H3_REQUEST_INCOMPLETE: u64 = 0x10d;
pub const H3_MESSAGE_ERROR: u64 = 0x10e;

/// Appends a QUIC variable-length integer (RFC 9000 §16).
pub fn put_varint(v: u64, out: &mut Vec<u8>) {
    match v {
        0..=0x3f => out.push(v as u8),
        0x40..=0x3fff => out.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// A frame's type and declared length; the payload follows separately (or never).
pub fn frame_head(ty: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(ty, &mut out);
    put_varint(len, &mut out);
    out
}

/// A whole frame.
pub fn frame(ty: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_head(ty, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

/// A QPACK/HPACK prefixed integer (RFC 7541 §5.1): `flags` in the bits above the `bits`-bit
/// prefix of the first byte.
fn put_prefixed(flags: u8, bits: u32, mut v: u64, out: &mut Vec<u8>) {
    let max = (1u64 << bits) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 0x80 {
        out.push(0x80 | (v & 0x7f) as u8);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A QPACK string literal, not Huffman-coded.
fn put_string(s: &str, out: &mut Vec<u8>) {
    put_prefixed(0x00, 7, s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

/// A request head as a QPACK field section without the dynamic table (RFC 9204 §4.5):
/// `:method`, `:scheme https`, `:path` and `:authority localhost` from static names, then
/// `headers` as literals, in order (repeats and all: nothing is checked).
pub fn request_section(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    // Required Insert Count 0, Base 0.
    let mut out = vec![0x00, 0x00];
    // Literal with a static name reference (01NT, 4-bit index): :method is 15, :path 1,
    // :authority 0; ':scheme https' is the static entry 23 (11T, 6-bit index).
    put_prefixed(0x50, 4, 15, &mut out);
    put_string(method, &mut out);
    put_prefixed(0xc0, 6, 23, &mut out);
    put_prefixed(0x50, 4, 1, &mut out);
    put_string(path, &mut out);
    put_prefixed(0x50, 4, 0, &mut out);
    put_string("localhost", &mut out);
    for (name, value) in headers {
        // Literal with a literal name (001NH, 3-bit length).
        put_prefixed(0x20, 3, name.len() as u64, &mut out);
        out.extend_from_slice(name.as_bytes());
        put_string(value, &mut out);
    }
    out
}

/// The `:status` of a response field section, as h3 encodes it: a static entry (RFC 9204
/// Appendix A) or the static name `:status` (24) with a Huffman-coded value.
pub fn status(section: &[u8]) -> Option<u16> {
    let rest = section.get(2..)?; // no dynamic table: both prefix integers are 0
    match *rest.first()? {
        b if b & 0xc0 == 0xc0 => {
            // An indexed field line, 6-bit prefix (an index from 63 on continues).
            let index = match b & 0x3f {
                0x3f => 0x3f + u64::from(*rest.get(1)? & 0x7f),
                i => u64::from(i),
            };
            let statuses = [
                (24, 103),
                (25, 200),
                (26, 304),
                (27, 404),
                (28, 503),
                (63, 100),
                (64, 204),
                (65, 206),
                (66, 302),
                (67, 400),
                (68, 403),
                (69, 421),
                (70, 425),
                (71, 500),
            ];
            statuses.iter().find(|(i, _)| *i == index).map(|(_, s)| *s)
        }
        0x5f if rest.get(1) == Some(&9) => {
            let len = usize::from(*rest.get(2)? & 0x7f);
            huffman_digits(rest.get(3..3 + len)?)?.parse().ok()
        }
        _ => None,
    }
}

/// Decodes a Huffman-coded string of digits (RFC 7541 Appendix B: '0'..'2' have 5-bit codes
/// 0..2, '3'..'9' 6-bit codes 0x19..0x1f; the end is padded with 1 bits).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let code = |at: usize, n: usize| {
        bits.get(at..at + n)
            .map(|b| b.iter().fold(0u8, |acc, bit| acc << 1 | bit))
    };
    let mut at = 0;
    let mut out = String::new();
    while at < bits.len() {
        if bits.len() - at < 8 && bits[at..].iter().all(|&b| b == 1) {
            break;
        }
        match code(at, 5)? {
            c @ 0..=2 => {
                out.push(char::from(b'0' + c));
                at += 5;
            }
            _ => match code(at, 6)? {
                c @ 0x19..=0x1f => {
                    out.push(char::from(b'0' + c - 0x16));
                    at += 6;
                }
                _ => return None,
            },
        }
    }
    Some(out)
}

/// Reads frames from `recv` until one of type `ty` is whole (skipping the others); its
/// payload. `None` if the stream ends or fails first.
pub async fn read_frame(recv: &mut quinn::RecvStream, ty: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        // Whole frames at the front of `buf`.
        while let Some((t, a)) = varint(&buf) {
            let Some((len, b)) = varint(&buf[a..]) else {
                break;
            };
            let end = a + b + len as usize;
            if buf.len() < end {
                break;
            }
            if t == ty {
                return Some(buf[a + b..end].to_vec());
            }
            buf.drain(..end);
        }
        let chunk = recv.read_chunk(64 << 10, true).await.ok()??;
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// Reads a response up to its first HEADERS frame (skipping unknown frames) and returns its
/// status. `None` if the stream ends or fails first.
pub async fn read_status(recv: &mut quinn::RecvStream) -> Option<u16> {
    status(&read_frame(recv, HEADERS).await?)
}

/// How a response stream ended, read to its end (whatever came on it is dropped).
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// A clean end (FIN).
    Finished,
    /// RESET_STREAM with this code.
    Reset(u64),
    /// Something else (the connection closed, ...).
    Other(String),
}

/// Reads `recv` to its end: how it ended.
pub async fn stream_end(recv: &mut quinn::RecvStream) -> StreamEnd {
    loop {
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(_)) => {}
            Ok(None) => return StreamEnd::Finished,
            Err(quinn::ReadError::Reset(code)) => return StreamEnd::Reset(code.into_inner()),
            Err(e) => return StreamEnd::Other(e.to_string()),
        }
    }
}

/// One QUIC connection with ALPN h3 whose frames are written as bytes. Its control stream
/// (type 0x00, then SETTINGS) is open once `open_control` was called.
pub struct RawH3 {
    pub conn: quinn::Connection,
    pub control: Option<quinn::SendStream>,
    /// The server's unidirectional streams, kept open once read (`goaway`).
    server_streams: Vec<quinn::RecvStream>,
    _endpoint: quinn::Endpoint,
}

impl RawH3 {
    /// Connects with quinn's default transport settings.
    pub async fn connect(ca_pem: &Path, addr: SocketAddr) -> RawH3 {
        Self::connect_with(ca_pem, addr, quinn::TransportConfig::default()).await
    }

    /// Connects with `transport` (flow-control windows, keep-alive, ...).
    pub async fn connect_with(
        ca_pem: &Path,
        addr: SocketAddr,
        transport: quinn::TransportConfig,
    ) -> RawH3 {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = tls_client_with(ca_pem, None, provider);
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = endpoint
            .connect_with(config, addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        RawH3 {
            conn,
            control: None,
            server_streams: Vec::new(),
            _endpoint: endpoint,
        }
    }

    /// Opens the control stream and sends an empty SETTINGS frame; the stream stays open
    /// (closing it is a connection error) and is returned for more frames.
    pub async fn open_control(&mut self) -> &mut quinn::SendStream {
        let mut control = self.conn.open_uni().await.unwrap();
        let mut head = vec![0x00]; // stream type: control
        head.extend(frame_head(SETTINGS, 0));
        control.write_all(&head).await.unwrap();
        self.control.insert(control)
    }

    /// Opens a request stream and sends `section` as its HEADERS frame, then `body` as one
    /// DATA frame if there is one, and ends it when `finish`. A failure to send (the server
    /// stopped the stream) shows in what the response stream says.
    pub async fn send(
        &self,
        section: &[u8],
        body: Option<&[u8]>,
        finish: bool,
    ) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        let mut bytes = frame(HEADERS, section);
        if let Some(b) = body {
            bytes.extend(frame(DATA, b));
        }
        if send.write_all(&bytes).await.is_ok() && finish {
            let _ = send.finish();
        }
        (send, recv)
    }

    /// `GET /` on a new request stream: the response status.
    pub async fn get(&self) -> Option<u16> {
        let (_send, mut recv) = self
            .send(&request_section("GET", "/", &[]), None, true)
            .await;
        tokio::time::timeout(Duration::from_secs(30), read_status(&mut recv))
            .await
            .ok()?
    }

    /// Waits for the server's GOAWAY on its control stream: the stream ID it carries.
    pub async fn goaway(&mut self) -> Option<u64> {
        loop {
            let mut stream = self.conn.accept_uni().await.ok()?;
            let mut ty = [0u8; 1];
            stream.read_exact(&mut ty).await.ok()?;
            if ty[0] != 0x00 {
                // QPACK or grease: kept open (a closed QPACK stream is a connection error).
                self.server_streams.push(stream);
                continue;
            }
            let payload = read_frame(&mut stream, GOAWAY).await?;
            self.server_streams.push(stream);
            return varint(&payload).map(|(id, _)| id);
        }
    }
}
