//! HTTP/3: the QUIC side of an `https` listener with `http3 = true`, on the same port over
//! UDP (quinn + h3). Every request becomes the same `http::Request<Body>` plus `ConnInfo` as
//! over TCP and goes through the same `Gateway::handle`.
//!
//! ```text
//! accept (UDP)      banned peer refused; connection limit; Retry (address validation)
//!   └─ handshake    crypto.rs: rustls, same certificate, groups and client verification as
//!                   TCP; group and refusal reason recorded per connection
//!       └─ h3       first request within header_read_timeout of the setup, then closed
//!                   after idle_timeout with no request in flight (`Activity`); one task
//!                   per request stream: head within header_read_timeout, body.rs
//!                   streams both ways, Gateway::handle in between
//! ```
//!
//! 0-RTT (listener `quic.zero_rtt`): the connection serves requests before the handshake
//! completes; those carry the `EarlyData` extension and the pipeline decides (proxy/early.rs).
//! Drain (SIGTERM, listener removed): new connections are refused, each connection sends an
//! HTTP/3 GOAWAY and ends when its requests are done. Reload: new connections take the new
//! snapshot's TLS and transport settings (`QuicHandle::update`); live ones keep theirs, unless
//! the reload changed the client-certificate rules they were admitted under: then they get
//! the same GOAWAY (`CloseSignal`). An endpoint whose listener a reload removed, or turned
//! `http3` off on, keeps its UDP socket until its connections are gone (`Draining`); a reload
//! that wants HTTP/3 on that address again meanwhile takes it back.

mod body;
pub mod crypto;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use quinn::{Connection, ConnectionError, Endpoint, EndpointConfig, Incoming, VarInt};
use quinn_proto::crypto::HandshakeTokenKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::body::RequestBody;
use self::crypto::{Handshake, HandshakeData, QuicTls};
use crate::config::{Congestion, Limits, ListenerConfig, ListenerKey, QuicConfig, RetryPolicy};
use crate::listener::limit::ConnectionLimit;
use crate::listener::resets::PrematureResets;
use crate::proxy::{ConnInfo, EarlyData, TlsInfo};
use crate::runtime::{ListenerRuntime, Runtime};
use crate::telemetry::PeerAddress;

/// HTTP/3's "no error" (RFC 9114 §8.1), for closing a connection that is done.
const H3_NO_ERROR: u32 = 0x100;

/// Uni-directional streams a client may open: control, QPACK encoder and decoder, and room
/// for the grease streams clients send.
const MAX_UNI_STREAMS: u32 = 8;

/// Receive window of one request stream (what HTTP/2 allows per stream).
const STREAM_WINDOW: u32 = 1 << 20;
/// Receive window of a whole connection, and the most response data buffered unacknowledged.
const CONNECTION_WINDOW: u32 = 4 << 20;

/// One listener's QUIC settings in a snapshot, built from its config.
pub struct QuicRuntime {
    /// The endpoint-wide server config (transport settings, Retry token key); each connection
    /// gets a copy with its own `ConnTls`.
    server: Arc<quinn::ServerConfig>,
    tls: Arc<QuicTls>,
    /// The listener's `[listener.quic]`.
    pub config: QuicConfig,
}

/// Builds the QUIC side of a listener, when it has one. `previous`: the running snapshot's
/// QUIC side of the listener, when its TLS sessions may be kept (`Snapshot::build`); they
/// are, when it was made for the same `zero_rtt` (which decides the kind of cache).
pub fn build(
    listener: &ListenerConfig,
    verifier: super::tls::ClientVerifier,
    previous: Option<&QuicRuntime>,
) -> Result<Option<QuicRuntime>, String> {
    let (Some(quic), Some(tls)) = (&listener.quic, &listener.tls) else {
        return Ok(None);
    };
    let sessions = previous
        .filter(|p| p.config.zero_rtt == quic.zero_rtt)
        .map(|p| p.tls.sessions());
    let rustls = super::tls::quic_server_config(tls, quic.zero_rtt, verifier, sessions)?;
    let tls = Arc::new(QuicTls::new(rustls)?);
    let limits = &listener.limits;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        // Flow-control windows as on HTTP/2 (listener/mod.rs): what a peer can make us
        // buffer is bounded per stream and per connection, whatever it sends out of order.
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        // HTTP/3 here uses no DATAGRAM frames: refuse them rather than buffer them.
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(limits.idle_timeout)
                .map_err(|_| "limits.idle_timeout is too long for QUIC".to_string())?,
        ))
        // QUIC's idle timeout knows nothing of requests: a client that sends nothing while
        // it waits for a slow upstream (or between the events of a stream) would lose its
        // connection, and the request with it. Our PINGs keep it open while the client is
        // there to acknowledge them; idle connections are closed by the request-based check
        // in `serve_h3` (as on TCP), and a client that has gone answers no PING.
        .keep_alive_interval(keep_alive(limits.idle_timeout));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(quic.max_udp_payload);
    transport.mtu_discovery_config(Some(mtu));
    match quic.congestion {
        Congestion::Cubic => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        Congestion::NewReno => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default())),
        Congestion::Bbr => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
    };
    let mut server = quinn::ServerConfig::new(tls.clone(), token_key());
    server.transport_config(Arc::new(transport));
    // A connection keeps the address it was accepted from: the ban check, rate limits,
    // policies and the access log all use `ConnInfo.peer`, which is fixed at accept. With
    // migration a client could move to another address (one banned meanwhile, or to spread
    // a rate limit) under the old one's name. Packets from another address are dropped; a
    // client whose NAT rebinds reconnects.
    server.migration(false);
    Ok(Some(QuicRuntime {
        server: Arc::new(server),
        tls,
        config: quic.clone(),
    }))
}

/// How often a quiet connection is PINGed: three times per idle timeout (so one lost PING
/// or ACK does not end it), at least every 15 s.
fn keep_alive(idle_timeout: Duration) -> Option<Duration> {
    let every = (idle_timeout / 3).min(Duration::from_secs(15));
    (!every.is_zero()).then_some(every)
}

/// The key of Retry and NEW_TOKEN tokens: one per process, so tokens stay valid across
/// reloads.
fn token_key() -> Arc<dyn HandshakeTokenKey> {
    static KEY: OnceLock<Arc<aws_lc_rs::hkdf::Prk>> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut secret = [0u8; 64];
        // The system RNG failing leaves nothing safe to do; aws-lc aborts in that case anyway.
        let _ = aws_lc_rs::rand::fill(&mut secret);
        Arc::new(aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &[]).extract(&secret))
    })
    .clone()
}

/// A QUIC endpoint bound for a listener, not yet accepting.
pub struct Bound {
    key: ListenerKey,
    endpoint: Endpoint,
    local_addr: SocketAddr,
    max_connections: usize,
    /// The `quic.max_udp_payload` the endpoint was made with (fixed for its life).
    max_udp_payload: u16,
    /// For an endpoint taken back from `Draining`: the server config it accepts with once
    /// `spawn` starts it. Until then it refuses new connections as it did while draining.
    revived: Option<quinn::ServerConfig>,
}

/// Binds the UDP side of a listener at `address` (the TCP side's bound address, so a port 0
/// listener gets the same port on both).
pub fn bind(
    config: &ListenerConfig,
    address: SocketAddr,
    quic: &QuicRuntime,
) -> Result<Bound, String> {
    let name = &config.name;
    let socket = UdpSocket::bind(address)
        .map_err(|e| format!("listener {name:?}: cannot bind UDP {address} for HTTP/3: {e}"))?;
    grow_buffers(&socket);
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(quic.config.max_udp_payload)
        .map_err(|e| format!("listener {name:?}: quic.max_udp_payload: {e}"))?;
    let endpoint = Endpoint::new(
        endpoint_config,
        Some((*quic.server).clone()),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("listener {name:?}: cannot start QUIC on {address}: {e}"))?;
    let local_addr = endpoint
        .local_addr()
        .map_err(|e| format!("listener {name:?}: {e}"))?;
    Ok(Bound {
        key: config.key(),
        endpoint,
        local_addr,
        max_connections: config.limits.max_connections.get(),
        max_udp_payload: quic.config.max_udp_payload,
        revived: None,
    })
}

/// Asks for 4 MiB socket buffers (the kernel caps them at net.core.[rw]mem_max): bulk
/// transfers arrive as bursts of datagrams that a default 208 KiB buffer drops.
fn grow_buffers(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on a socket we own with a pointer to a c_int of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// A running QUIC listener.
pub struct QuicHandle {
    /// The listener it belongs to.
    pub key: ListenerKey,
    /// The UDP address bound.
    pub local_addr: SocketAddr,
    endpoint: Endpoint,
    /// Cancelled to stop accepting and drain this listener's QUIC connections (`stop`).
    stop: CancellationToken,
    /// The connection limit; a reload resizes it.
    pub limit: Arc<ConnectionLimit>,
    max_udp_payload: u16,
}

impl QuicHandle {
    /// QUIC connections currently open.
    pub fn active(&self) -> usize {
        self.limit.active()
    }

    /// Stops accepting: new connections are refused from now on, live ones are asked to
    /// finish. The endpoint refuses them here, not in the accept loop when it sees `stop`:
    /// a reload may take the endpoint back (`Draining`) before that loop has run again, and
    /// its late refusal would undo the new server config.
    pub fn stop(&self) {
        self.endpoint.set_server_config(None);
        self.stop.cancel();
    }

    /// New connections use this snapshot's settings (certificate, groups, client
    /// verification, transport); live connections keep theirs.
    pub fn update(&self, quic: &QuicRuntime) {
        self.endpoint
            .set_server_config(Some((*quic.server).clone()));
        warn_fixed_payload(self.local_addr, self.max_udp_payload, quic);
    }

    /// Waits (bounded) until close frames of finished connections are sent.
    pub async fn wait_idle(&self) {
        wait_idle(&self.endpoint).await;
    }
}

/// quinn fixes the largest UDP payload an endpoint accepts (the `max_udp_payload_size` it
/// advertises) when the endpoint is made: a reload that changes `quic.max_udp_payload` for a
/// socket kept open changes only the ceiling of path-MTU discovery (the transport settings)
/// at once, so the operator is told.
fn warn_fixed_payload(address: SocketAddr, bound_with: u16, quic: &QuicRuntime) {
    if bound_with != quic.config.max_udp_payload {
        tracing::warn!(
            address = %address,
            "quic.max_udp_payload changed from {bound_with} to {}: new connections probe path MTU up to the new value, but the largest datagram accepted stays {bound_with} until the next restart",
            quic.config.max_udp_payload
        );
    }
}

/// Waits (at most 1 s) until the close frames of `endpoint`'s finished connections are sent.
async fn wait_idle(endpoint: &Endpoint) {
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// The QUIC endpoints stopped by a reload (the listener removed, or `http3` turned off), by
/// UDP address, while their connections drain. Those connections send and receive on the
/// endpoint's socket, so the port stays bound until the last of them is gone; a reload that
/// wants HTTP/3 on that address again meanwhile takes the endpoint back (`rebind`) rather
/// than bind a second socket, which would fail (EADDRINUSE) on Wraith's own. (A stopped TCP
/// listener closes its socket at once: its connections have sockets of their own.)
#[derive(Default)]
pub struct Draining(Arc<Mutex<HashMap<SocketAddr, DrainingEndpoint>>>);

struct DrainingEndpoint {
    endpoint: Endpoint,
    max_udp_payload: u16,
    /// Cancelled when a reload takes the endpoint back: its watcher then leaves it alone.
    revived: CancellationToken,
}

/// A mutex's content, also after a panic elsewhere poisoned it (what it holds stays valid).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Draining {
    /// Stops `handle` and keeps its endpoint until every connection on it has closed; then
    /// the endpoint is let go, its socket closes and the port is free for anyone.
    pub fn keep(&self, handle: QuicHandle) {
        handle.stop();
        let address = handle.local_addr;
        let endpoint = handle.endpoint.clone();
        let revived = CancellationToken::new();
        lock(&self.0).insert(
            address,
            DrainingEndpoint {
                endpoint: handle.endpoint,
                max_udp_payload: handle.max_udp_payload,
                revived: revived.clone(),
            },
        );
        let draining = self.0.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = endpoint.wait_idle() => {}
                _ = revived.cancelled() => return,
            }
            // Checked under the lock `revive` cancels under: an endpoint taken back in the
            // meantime serves a listener again and is not this watcher's any more.
            let mut draining = lock(&draining);
            if !revived.is_cancelled() {
                draining.remove(&address);
                tracing::debug!(address = %address, "QUIC connections drained; UDP port released");
            }
        });
    }

    /// The endpoint draining at `address`, if any, as bound for `config`'s HTTP/3. It stays
    /// among the draining ones, refusing new connections, until `revive` (after the swap):
    /// a reload that fails after this leaves it as it was. It keeps its `quic.max_udp_payload`
    /// (set when its socket was bound), as a running endpoint does across reloads.
    pub fn rebind(
        &self,
        config: &ListenerConfig,
        address: SocketAddr,
        quic: &QuicRuntime,
    ) -> Option<Bound> {
        let (endpoint, max_udp_payload) = lock(&self.0)
            .get(&address)
            .map(|d| (d.endpoint.clone(), d.max_udp_payload))?;
        warn_fixed_payload(address, max_udp_payload, quic);
        Some(Bound {
            key: config.key(),
            endpoint,
            local_addr: address,
            max_connections: config.limits.max_connections.get(),
            max_udp_payload,
            revived: Some((*quic.server).clone()),
        })
    }

    /// Takes the endpoint of `bound` (from `rebind`) out of the draining ones: it accepts for
    /// its new listener once spawned. Its old connections go on draining as before, on the
    /// stop signal and connection limit of the listener that accepted them.
    pub fn revive(&self, bound: &Bound) {
        if bound.revived.is_none() {
            return;
        }
        let mut draining = lock(&self.0);
        if let Some(d) = draining.remove(&bound.local_addr) {
            d.revived.cancel();
            tracing::debug!(address = %bound.local_addr, draining = d.endpoint.open_connections(), "HTTP/3 back on an endpoint still draining connections; it takes new ones again");
        }
    }

    /// Waits (bounded, per endpoint) until the close frames of the draining endpoints'
    /// finished connections are sent (at exit).
    pub async fn wait_idle(&self) {
        let endpoints: Vec<Endpoint> = lock(&self.0).values().map(|d| d.endpoint.clone()).collect();
        for endpoint in &endpoints {
            wait_idle(endpoint).await;
        }
    }
}

/// Starts accepting on a bound endpoint.
pub fn spawn(runtime: Arc<Runtime>, mut bound: Bound) -> QuicHandle {
    if let Some(server) = bound.revived.take() {
        bound.endpoint.set_server_config(Some(server));
    }
    let stop = runtime.shutdown.child_token();
    let limit = ConnectionLimit::new(bound.max_connections);
    let handle = QuicHandle {
        key: bound.key.clone(),
        local_addr: bound.local_addr,
        endpoint: bound.endpoint.clone(),
        stop: stop.clone(),
        limit: limit.clone(),
        max_udp_payload: bound.max_udp_payload,
    };
    let name = runtime
        .gateway
        .snapshot()
        .listener_by_key(&bound.key)
        .map(|l| l.config.name.to_string())
        .unwrap_or_default();
    tracing::info!(listener = %name, address = %bound.local_addr, transport = "quic", "listening (HTTP/3)");
    tokio::spawn(accept_loop(runtime, bound, limit, stop));
    handle
}

/// Handshakes in progress on one listener (for `retry = "under_load"`).
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn start(counter: &Arc<AtomicUsize>) -> InProgress {
        counter.fetch_add(1, Ordering::Relaxed);
        InProgress(counter.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(
    runtime: Arc<Runtime>,
    bound: Bound,
    limit: Arc<ConnectionLimit>,
    stop: CancellationToken,
) {
    let endpoint = bound.endpoint;
    let handshaking = Arc::new(AtomicUsize::new(0));
    let mut warned_full = false;
    let per_client = runtime.per_client(&bound.key);
    loop {
        let incoming = tokio::select! {
            // Stopped, this loop accepts nothing more, even with connections waiting: a reload
            // may have handed the endpoint to a new loop (`Draining`), and they are its.
            biased;
            _ = stop.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let snapshot = runtime.gateway.snapshot();
        let Some(listener) = snapshot.listener_by_key(&bound.key).cloned() else {
            incoming.refuse();
            continue;
        };
        let Some(quic) = listener.quic.as_ref() else {
            // http3 was switched off by a reload; this handle is being retired.
            incoming.refuse();
            continue;
        };
        let peer = incoming.remote_address();
        // Banned peers go before the handshake costs anything. An address not validated yet
        // may be anyone's (see `PeerAddress`): it gets a Retry, and only a client that comes
        // back from it with the token is refused and reported as banned. A Retry costs a
        // packet no larger than the one that asked, and no state.
        if let Some(ban) = super::ban_at_accept(&runtime, &snapshot, peer) {
            if incoming.remote_address_validated() || !incoming.may_retry() {
                super::report_ban_at_accept(&snapshot, &listener.config.name, peer, &ban);
                incoming.refuse();
            } else if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        let incoming = match validate_address(incoming, quic.config.retry, &handshaking) {
            Some(i) => i,
            None => continue,
        };
        let address = if incoming.remote_address_validated() {
            PeerAddress::Proven
        } else {
            PeerAddress::Unvalidated
        };
        let Some(permit) = limit.try_acquire() else {
            if !warned_full {
                tracing::warn!(address = %bound.local_addr, max = limit.max(), "connection limit reached; new QUIC connections are refused");
                warned_full = true;
            }
            incoming.refuse();
            continue;
        };
        let permit = permit.admit();
        warned_full = false;
        let handshake = Arc::new(Handshake::default());
        let mut server = (*quic.server).clone();
        server.crypto = Arc::new(quic.tls.for_connection(handshake.clone()));
        let in_progress = InProgress::start(&handshaking);
        let started = Instant::now();
        let connecting = match incoming.accept_with(Arc::new(server)) {
            Ok(c) => c,
            // The first flight was unusable (e.g. a ClientHello rustls refused): a failed
            // handshake like any other, in the log and the handshake metrics.
            Err(e) => {
                refused(
                    &runtime,
                    &listener.config.name,
                    (peer, address),
                    started,
                    &handshake,
                    &e,
                );
                continue;
            }
        };
        let local = connecting.local_ip().map_or(bound.local_addr, |ip| {
            SocketAddr::new(ip, bound.local_addr.port())
        });
        let close = super::CloseSignal::new(&runtime, &listener, snapshot.generation, stop.clone());
        let admitted = close.admit();
        let start = Start {
            listener,
            handshake,
            peer,
            address,
            local,
            close,
            in_progress,
            per_client: per_client.clone(),
        };
        let rt = runtime.clone();
        runtime.connections.spawn(async move {
            serve(rt, connecting, start).await;
            drop((admitted, permit));
        });
    }
}

/// Answers with a Retry when the policy asks for address validation; `None` when the
/// connection attempt was answered that way.
fn validate_address(
    incoming: Incoming,
    policy: RetryPolicy,
    handshaking: &AtomicUsize,
) -> Option<Incoming> {
    if incoming.remote_address_validated() {
        return Some(incoming);
    }
    let retry = match policy {
        RetryPolicy::Always => true,
        RetryPolicy::UnderLoad(n) => handshaking.load(Ordering::Relaxed) >= n,
        RetryPolicy::Never => false,
    };
    if !retry || !incoming.may_retry() {
        return Some(incoming);
    }
    match incoming.retry() {
        Ok(()) => None,
        Err(e) => Some(e.into_incoming()),
    }
}

/// H3_EXCESSIVE_LOAD (RFC 9114 §8.1): the close of a connection past its client's
/// `max_connections_per_client`.
const H3_EXCESSIVE_LOAD: u32 = 0x107;

/// What the accept loop hands to a connection's task.
struct Start {
    listener: Arc<ListenerRuntime>,
    handshake: Arc<Handshake>,
    peer: SocketAddr,
    /// Whether `peer` was validated at accept.
    address: PeerAddress,
    local: SocketAddr,
    /// The listener stopping, or its client-certificate rules changing.
    close: super::CloseSignal,
    in_progress: InProgress,
    /// Connections open per client on this listener (`max_connections_per_client`).
    per_client: Arc<super::limit::PerClient>,
}

/// Everything a request on one QUIC connection needs, shared by one `Arc`.
struct QuicConn {
    runtime: Arc<Runtime>,
    listener: Arc<ListenerRuntime>,
    handshake: Arc<Handshake>,
    /// Before the handshake completes (0-RTT listeners): the connection without identity.
    early: Option<ConnInfo>,
    /// The complete connection info, once the handshake completed; closed if it failed.
    confirmed: watch::Receiver<Option<Arc<ConnInfo>>>,
    /// The connection itself: its requests end when it closes.
    conn: Connection,
    /// Its request streams so far, and those the client cancelled before their response
    /// (rapid reset, `super::resets`).
    resets: PrematureResets,
}

/// Serves one QUIC connection: handshake (or 0-RTT with the handshake completing alongside),
/// then HTTP/3 until the client leaves, the idle timeout passes or the listener drains.
async fn serve(runtime: Arc<Runtime>, mut connecting: quinn::Connecting, start: Start) {
    let started = Instant::now();
    let name = start.listener.config.name.clone();
    let Some(quic) = start.listener.quic.as_ref() else {
        return;
    };
    let timeout = start
        .listener
        .config
        .tls
        .as_ref()
        .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
    let info = ConnInfo {
        peer: start.peer,
        local: start.local,
        listener: name.clone(),
        tls: None,
        identity: None,
        policy_cache: Default::default(),
        limits: (&start.listener.config.limits).into(),
        close: Some(start.close.clone()),
        unnamed_client: false,
    };
    let (tx, rx) = watch::channel(None);
    // Early data only from a validated address (a token from an earlier connection, which
    // quinn gives every client it has served, or a Retry): from any other, whoever sent the
    // Initial may have put a victim's address on it, and its early requests would run, spend
    // the victim's rate-limit quota and name the victim in the security events. Such a
    // connection's requests wait for the handshake, which an off-path sender cannot finish.
    let (conn, early) = if quic.config.zero_rtt && start.address == PeerAddress::Proven {
        // 0.5-RTT: serve as soon as the ClientHello is read; requests that arrive before the
        // handshake completes are early data and the pipeline decides about them. (quinn has
        // read the ClientHello inside `accept_with` unless it spans more packets than came.)
        let Ok(sni) = tokio::time::timeout(timeout, handshake_data(&mut connecting)).await else {
            timed_out(&runtime, &name, (start.peer, start.address), started);
            return;
        };
        let Ok((conn, accepted)) = connecting.into_0rtt() else {
            return;
        };
        let mut early = info.clone();
        let tls = tls_info(&start.handshake, sni.clone());
        start.close.negotiated(tls.version, tls.group);
        early.tls = Some(tls);
        let confirm = Confirm {
            runtime: runtime.clone(),
            conn: conn.clone(),
            handshake: start.handshake.clone(),
            verifier: start.listener.client_verifier.clone(),
            info,
            address: start.address,
            sni,
            started,
            in_progress: start.in_progress,
            tx,
        };
        tokio::spawn(confirm.run(accepted, timeout));
        (conn, Some(early))
    } else {
        let handshake = async {
            let sni = handshake_data(&mut connecting).await;
            connecting.await.map(|c| (c, sni))
        };
        let (conn, sni) = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                let peer = (start.peer, start.address);
                refused(&runtime, &name, peer, started, &start.handshake, &e);
                return;
            }
            Err(_) => {
                timed_out(&runtime, &name, (start.peer, start.address), started);
                return;
            }
        };
        drop(start.in_progress);
        let mut info = info;
        info.tls = Some(tls_info(&start.handshake, sni));
        let verifier = &start.listener.client_verifier;
        if !complete(
            &runtime,
            &conn,
            &mut info,
            started,
            &start.handshake,
            verifier,
        ) {
            return;
        }
        let _ = tx.send(Some(Arc::new(info)));
        (conn, None)
    };

    // Counted once the handshake has proven the client's address (an Initial's source
    // address can be anyone's: spoofed ones must not use up a client's connections).
    let snapshot = runtime.gateway.snapshot();
    let Ok(_client) = super::client_slot(&start.per_client, &snapshot, &start.listener, start.peer)
    else {
        conn.close(
            quinn::VarInt::from_u32(H3_EXCESSIVE_LOAD),
            b"too many connections from this client",
        );
        return;
    };
    drop(snapshot);
    let _active = start
        .listener
        .metrics
        .get()
        .map(|m| super::conn::GaugeGuard::count(m.clone(), "h3"));
    let ctx = Arc::new(QuicConn {
        runtime,
        listener: start.listener.clone(),
        handshake: start.handshake,
        early,
        confirmed: rx,
        conn: conn.clone(),
        resets: PrematureResets::new(start.listener.config.limits.max_concurrent_streams),
    });
    serve_h3(ctx, conn, &start.close, timeout).await;
}

/// The server name from the ClientHello (waits until rustls has read it).
async fn handshake_data(connecting: &mut quinn::Connecting) -> Option<Box<str>> {
    let data = connecting.handshake_data().await.ok()?;
    let data = data.downcast::<HandshakeData>().ok()?;
    data.server_name.map(String::into_boxed_str)
}

/// The TLS parameters of a QUIC connection (TLS 1.3, ALPN h3 by construction).
fn tls_info(handshake: &Handshake, sni: Option<Box<str>>) -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3",
        group: handshake.group(),
        alpn: Some("h3".into()),
        sni,
    }
}

/// Accounts for a completed handshake and reads the verified client identity; false (the
/// connection closed, the refusal accounted for) when a resumed session's client certificate
/// no longer passes (`tls::recheck_resumed`).
fn complete(
    runtime: &Runtime,
    conn: &Connection,
    info: &mut ConnInfo,
    started: Instant,
    handshake: &Handshake,
    verifier: &super::tls::ClientVerifier,
) -> bool {
    let chain = conn.peer_identity().and_then(|a| {
        a.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let chain_ref = chain.as_deref().map(Vec::as_slice);
    let checked = super::tls::recheck_resumed(verifier, handshake.kind(), chain_ref);
    if let Err(e) = checked {
        super::handshake_refused(
            runtime,
            &info.listener,
            info.peer,
            started,
            "quic",
            PeerAddress::Proven,
            Ok((super::tls::failure_label(&e), e.to_string())),
        );
        conn.close(
            VarInt::from_u32(H3_NO_ERROR),
            b"client certificate no longer valid",
        );
        return false;
    }
    if let Some(t) = &info.tls {
        if let Some(close) = &info.close {
            close.negotiated(t.version, t.group);
        }
        runtime.gateway.snapshot().telemetry.handshake(
            &info.listener,
            info.peer,
            started,
            Ok((t.version, t.group.unwrap_or("unknown"))),
            // A completed handshake proves the address; the value matters only for failures.
            PeerAddress::Proven,
        );
    }
    // Identity: once per connection, from the leaf the verifier accepted.
    if let Some(leaf) = chain.as_ref().and_then(|c| c.first()) {
        info.identity = Some(Arc::new(super::conn::identity_of(
            leaf,
            info.peer,
            &info.listener,
        )));
    }
    if let (Some(chain), Some(close)) = (&chain, &info.close) {
        close.admitted_until(chain);
    }
    true
}

/// Accounts for a refused QUIC handshake with the same labels as TCP.
/// Accounts for a handshake that did not complete in time.
fn timed_out(
    runtime: &Runtime,
    listener: &Arc<str>,
    (peer, address): (SocketAddr, PeerAddress),
    started: Instant,
) {
    super::handshake_refused(runtime, listener, peer, started, "quic", address, Err(()));
}

fn refused(
    runtime: &Runtime,
    listener: &Arc<str>,
    (peer, address): (SocketAddr, PeerAddress),
    started: Instant,
    handshake: &Handshake,
    error: &ConnectionError,
) {
    let failure = match handshake.error() {
        Some(tls) => (super::tls::failure_label(&tls), tls.to_string()),
        None => match error {
            ConnectionError::TimedOut => {
                timed_out(runtime, listener, (peer, address), started);
                return;
            }
            // The client gave up on the handshake (often: it did not trust our certificate).
            ConnectionError::ConnectionClosed(c)
                if (0x100..0x200).contains(&u64::from(c.error_code)) =>
            {
                ("client_alert", error.to_string())
            }
            _ => ("quic_error", error.to_string()),
        },
    };
    super::handshake_refused(
        runtime,
        listener,
        peer,
        started,
        "quic",
        address,
        Ok(failure),
    );
}

/// Completes a 0-RTT connection's handshake alongside its first requests.
struct Confirm {
    runtime: Arc<Runtime>,
    conn: Connection,
    handshake: Arc<Handshake>,
    verifier: super::tls::ClientVerifier,
    info: ConnInfo,
    address: PeerAddress,
    sni: Option<Box<str>>,
    started: Instant,
    in_progress: InProgress,
    tx: watch::Sender<Option<Arc<ConnInfo>>>,
}

impl Confirm {
    async fn run(self, accepted: quinn::ZeroRttAccepted, timeout: Duration) {
        let Confirm {
            runtime,
            conn,
            handshake,
            verifier,
            mut info,
            address,
            sni,
            started,
            in_progress,
            tx,
        } = self;
        // quinn resolves this when the handshake is over either way (on the server its value
        // says nothing); our own session knows whether it completed.
        let done = tokio::time::timeout(timeout, accepted).await;
        drop(in_progress);
        if handshake.is_complete() {
            info.tls = Some(tls_info(&handshake, sni));
            if complete(&runtime, &conn, &mut info, started, &handshake, &verifier) {
                let _ = tx.send(Some(Arc::new(info)));
            }
        } else if done.is_ok() {
            let error = conn
                .close_reason()
                .unwrap_or(ConnectionError::LocallyClosed);
            refused(
                &runtime,
                &info.listener,
                (info.peer, address),
                started,
                &handshake,
                &error,
            );
        } else {
            timed_out(&runtime, &info.listener, (info.peer, address), started);
            conn.close(VarInt::from_u32(H3_NO_ERROR), b"handshake timeout");
        }
        // Dropping `tx` here tells requests still waiting that no identity is coming.
    }
}

impl QuicConn {
    /// Accounts for a request refused before the pipeline, as HTTP/1.1's codec refusals are:
    /// an access record (status, error `malformed_request`; method and path `-` when the head
    /// could not be read) and a `malformed_request` security event.
    fn refused(
        &self,
        status: http::StatusCode,
        reason: &'static str,
        request: Option<(http::Method, http::Uri)>,
    ) {
        let confirmed = self.confirmed.borrow().clone();
        // Before the handshake completes (0-RTT), the connection as known so far.
        let Some(info) = confirmed.as_deref().or(self.early.as_ref()) else {
            return;
        };
        self.runtime.gateway.refused_by_codec(
            info,
            status,
            reason,
            request,
            http::Version::HTTP_3,
            0,
        );
    }
}

/// The HTTP/3 session of one connection: one task per request, GOAWAY on drain (the listener
/// stopping, or its client-certificate rules replaced by a reload).
///
/// Nothing here waits on the peer without a bound: the setup (which needs stream credit from
/// the client) and the GOAWAY (which needs write credit) each get `timeout`, and a drain ends
/// with the connection closed even if the client never finishes.
async fn serve_h3(
    ctx: Arc<QuicConn>,
    conn: Connection,
    close: &super::CloseSignal,
    timeout: Duration,
) {
    let limits = &ctx.listener.config.limits;
    let mut builder = h3::server::builder();
    builder.max_field_section_size(limits.max_header_size as u64);
    let setup = tokio::select! {
        r = tokio::time::timeout(timeout, builder.build(h3_quinn::Connection::new(conn.clone()))) => r,
        _ = close.requested() => {
            conn.close(VarInt::from_u32(H3_NO_ERROR), b"shutting down");
            return;
        }
    };
    let mut h3 = match setup {
        Ok(Ok(h3)) => h3,
        Ok(Err(e)) => {
            tracing::debug!(peer = %conn.remote_address(), error = %e, "HTTP/3 connection setup failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %conn.remote_address(), "HTTP/3 connection setup timed out (no stream credit from the client?)");
            conn.close(VarInt::from_u32(H3_NO_ERROR), b"setup timeout");
            return;
        }
    };
    // This connection's requests, so a drain knows when they are done (h3 itself waits for
    // the client's GOAWAY too, which a client with nothing to say never sends).
    let requests = tokio_util::task::TaskTracker::new();
    let mut draining = false;
    // From the GOAWAY on, what is in flight has the drain time (`[server] shutdown_timeout`),
    // as over TCP: a reload has no process exit to end a request that never finishes.
    let drain_timer = tokio::time::sleep(Duration::from_secs(365 * 86_400));
    tokio::pin!(drain_timer);
    // The first request within header_read_timeout, then idle_timeout from the end of the
    // last one: quinn's idle timeout alone lets a client that only PINGs hold a connection
    // slot (and its QPACK streams' state) for ever. The timer is reset when it fires and
    // when the first request arrives, never per packet.
    let activity = Activity::new();
    let idle_timer = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(idle_timer);
    loop {
        let accepted = tokio::select! {
            r = h3.accept() => r,
            _ = &mut idle_timer, if !draining => {
                let why = match activity.check(limits) {
                    Due::At(at) => {
                        idle_timer.as_mut().reset(at);
                        continue;
                    }
                    Due::FirstRequest => "no request within header_read_timeout",
                    Due::Idle => "no request within idle_timeout",
                };
                tracing::debug!(peer = %conn.remote_address(), "HTTP/3 connection: {why}; closing");
                // GOAWAY past the last request accepted (all of them are done), so the
                // client knows that none of those needs a retry and nothing later was seen.
                match tokio::time::timeout(timeout, h3.shutdown(1)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "HTTP/3 GOAWAY not sent"),
                    Err(_) => tracing::debug!(peer = %conn.remote_address(), "HTTP/3 GOAWAY not sent within the handshake timeout"),
                }
                // Closed below with H3_NO_ERROR, unless the client closes first.
                break;
            }
            _ = close.requested(), if !draining => {
                draining = true;
                // GOAWAY: requests already accepted finish; the client opens no new ones here.
                match tokio::time::timeout(timeout, h3.shutdown(1)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "HTTP/3 GOAWAY not sent");
                        break;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %conn.remote_address(), "HTTP/3 GOAWAY not sent within the handshake timeout; closing");
                        break;
                    }
                }
                requests.close();
                drain_timer.as_mut().reset(tokio::time::Instant::now() + close.drain());
                continue;
            }
            _ = requests.wait(), if draining => break,
            _ = &mut drain_timer, if draining => {
                tracing::debug!(peer = %conn.remote_address(), drain = ?close.drain(), "HTTP/3 requests still running when the drain time ran out; closing");
                conn.close(VarInt::from_u32(H3_NO_ERROR), b"shutting down");
                return;
            }
        };
        match accepted {
            Ok(Some(resolver)) => {
                let in_flight = activity.begin();
                // The timer may still wait for the first request's deadline; from now on
                // it looks at least once per idle_timeout (usually a single reset).
                let next = tokio::time::Instant::now() + limits.idle_timeout;
                if idle_timer.deadline() > next {
                    idle_timer.as_mut().reset(next);
                }
                let request = requests.track_future(serve_request(ctx.clone(), resolver));
                ctx.runtime.connections.spawn(async move {
                    request.await;
                    drop(in_flight);
                });
            }
            // GOAWAY exchanged and every request finished.
            Ok(None) => break,
            Err(e) => {
                if !e.is_h3_no_error() {
                    tracing::debug!(peer = %conn.remote_address(), error = %e, "HTTP/3 connection ended");
                }
                return;
            }
        }
    }
    // The last responses may still be in flight: give the client a moment to close first.
    tokio::select! {
        _ = conn.closed() => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {
            conn.close(VarInt::from_u32(H3_NO_ERROR), b"");
        }
    }
}

/// Requests in flight on one HTTP/3 connection and when the last one ended: what its idle
/// timer goes by. Only requests count, as on HTTP/2 (conn.rs): PINGs, ACKs and QPACK stream
/// data keep quinn's idle timeout from firing, not this one.
struct Activity {
    /// The end of the HTTP/3 setup: the first request is due within header_read_timeout.
    epoch: tokio::time::Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` (+1) when a request last ended; 0 before the first.
    last_end: AtomicU64,
}

/// What the connection's timer says when it fires.
enum Due {
    /// Nothing to do yet (or a request is in flight): look again then.
    At(tokio::time::Instant),
    /// No request arrived within header_read_timeout of the setup.
    FirstRequest,
    /// No request in flight for idle_timeout.
    Idle,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
        })
    }

    /// A request accepted: in flight until the guard drops (also when its task is aborted).
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn check(&self, limits: &Limits) -> Due {
        let now = tokio::time::Instant::now();
        // Acquire: pairs with `InFlight::drop`, so `last_end` is that of the last to end.
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // Its end starts the idle time; looking again after one is soon enough.
            return Due::At(now + limits.idle_timeout);
        }
        let (since, timeout, expired) = match self.last_end.load(Ordering::Relaxed) {
            0 => (self.epoch, limits.header_read_timeout, Due::FirstRequest),
            ms => (
                self.epoch + Duration::from_millis(ms - 1),
                limits.idle_timeout,
                Due::Idle,
            ),
        };
        if since + timeout > now {
            return Due::At(since + timeout);
        }
        expired
    }
}

/// One request in flight on a connection's `Activity`.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let now = a.epoch.elapsed().as_millis() as u64 + 1;
        a.last_end.fetch_max(now, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// The send half of a request stream, reset when dropped unless its response was completed.
/// quinn ends a send stream that is dropped unfinished with a clean FIN: a request task that
/// panics, or leaves on a path that forgot to reset, would hand the client what looks like a
/// complete response (a body without content-length ends wherever it was cut).
struct Responder {
    stream: body::SendStream,
    /// The code the stream is reset with when dropped; `None` once the response is complete.
    on_drop: Option<h3::error::Code>,
}

impl Responder {
    /// Nothing processed yet: a stream dropped now was rejected (the client may retry).
    fn new(stream: body::SendStream) -> Responder {
        Responder {
            stream,
            on_drop: Some(h3::error::Code::H3_REQUEST_REJECTED),
        }
    }

    /// Resets the stream with `code` now.
    fn reset(mut self, code: h3::error::Code) {
        self.on_drop = Some(code);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(code) = self.on_drop.take() {
            self.stream.stop_stream(code);
        }
    }
}

/// What a request head h3 refused is logged as: 431 for one over max_header_size (h3 has
/// answered it so), 400 for a malformed one (reset with H3_MESSAGE_ERROR) or one that broke
/// the protocol (the connection is closed for it). `None` when the client gave up (a stream
/// reset, or ended with no head) or the connection went: nothing was refused.
fn head_refusal(e: &h3::error::StreamError) -> Option<(http::StatusCode, &'static str)> {
    use h3::error::{Code, ConnectionError, LocalError, StreamError};
    match e {
        StreamError::HeaderTooBig { .. } => Some((
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header fields too large",
        )),
        StreamError::StreamError { code, .. } if *code == Code::H3_MESSAGE_ERROR => Some((
            http::StatusCode::BAD_REQUEST,
            "malformed HTTP/3 request head",
        )),
        StreamError::ConnectionError {
            0:
                ConnectionError::Local {
                    error: LocalError::Application { code, .. },
                    ..
                },
            ..
        } if *code != Code::H3_NO_ERROR => Some((
            http::StatusCode::BAD_REQUEST,
            "HTTP/3 protocol error on a request stream",
        )),
        _ => None,
    }
}

/// The length a request's head declares: every `content-length` value (and every element
/// of a list in one) digits only and all the same (RFC 9110 §8.6); `Err` otherwise (`+5`,
/// `abc`, `5` beside `500`).
fn declared_length(headers: &http::HeaderMap) -> Result<Option<u64>, ()> {
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|p| p.parse().ok())
                .ok_or(())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// One request, then the connection's account of cancelled requests: a client that cancels
/// most of its requests before their response (rapid reset, `super::resets`) has its
/// connection closed with H3_EXCESSIVE_LOAD, recorded and reported as HTTP/2's are (a
/// `malformed_request` record and event) and counted as `h3_rapid_reset` among the
/// listener's refused connections.
async fn serve_request(
    ctx: Arc<QuicConn>,
    resolver: h3::server::RequestResolver<h3_quinn::Connection, bytes::Bytes>,
) {
    let opened = Instant::now();
    ctx.resets.opened();
    // A request cut off by its connection closing is no cancellation: the connection is gone.
    let cancelled =
        respond(&ctx, resolver).await == Ended::Cancelled && ctx.conn.close_reason().is_none();
    if cancelled && ctx.resets.cancelled(opened.elapsed()) {
        tracing::debug!(peer = %ctx.conn.remote_address(), listener = %ctx.listener.config.name, "HTTP/3 connection closed: the client cancelled most of its requests before their response (rapid reset)");
        if let Some(m) = ctx.listener.metrics.get() {
            m.refused("h3_rapid_reset");
        }
        ctx.refused(
            http::StatusCode::BAD_REQUEST,
            "HTTP/3 rapid reset: most streams cancelled before their response (connection closed)",
            None,
        );
        ctx.conn.close(
            VarInt::from_u32(H3_EXCESSIVE_LOAD),
            b"too many requests cancelled",
        );
    }
}

/// How a request stream ended, for `PrematureResets`.
#[derive(PartialEq, Eq)]
enum Ended {
    /// The client reset the stream or stopped reading it before the response head was sent
    /// (whether or not its request had gone upstream).
    Cancelled,
    /// Anything else: answered, refused, timed out, or the connection gone.
    Otherwise,
}

/// One request: head, the pipeline, the response streamed back.
async fn respond(
    ctx: &QuicConn,
    resolver: h3::server::RequestResolver<h3_quinn::Connection, bytes::Bytes>,
) -> Ended {
    let limits = &ctx.listener.config.limits;
    // Slowloris on streams: the head within header_read_timeout. Past it the stream is
    // reset with H3_REQUEST_INCOMPLETE, so the client learns that no response is coming
    // (dropped, the stream would end as if answered with nothing). Only the sending side:
    // dropping the receiving side stops the client's sending.
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    let mut resolver = resolver;
    let first = tokio::time::timeout_at(
        deadline,
        std::future::poll_fn(|cx| resolver.frame_stream.poll_next(cx)),
    )
    .await;
    let Ok(first) = first else {
        use h3::quic::SendStream as _;
        tracing::debug!("HTTP/3 request head not received within header_read_timeout");
        resolver
            .frame_stream
            .reset(h3::error::Code::H3_REQUEST_INCOMPLETE.value());
        return Ended::Otherwise;
    };
    let resolved = match resolver.accept_with_frame(first) {
        Ok(r) => tokio::time::timeout_at(deadline, r.resolve()).await,
        Err(e) => Ok(Err(e)),
    };
    let (req, stream) = match resolved {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "HTTP/3 request head refused");
            if let Some((status, reason)) = head_refusal(&e) {
                ctx.refused(status, reason, None);
                return Ended::Otherwise;
            }
            // Reset before its head was read: cancelled.
            return if e.is_peer_gone() {
                Ended::Cancelled
            } else {
                Ended::Otherwise
            };
        }
        Err(_) => {
            tracing::debug!("HTTP/3 request head not received within header_read_timeout");
            return Ended::Otherwise;
        }
    };
    let (send, recv) = stream.split();
    let mut send = Responder::new(send);
    let Ok(content_length) = declared_length(req.headers()) else {
        // Malformed (RFC 9114 §4.1.2): a stream error, no response.
        tracing::debug!("HTTP/3 request with an invalid or conflicting content-length refused");
        send.reset(h3::error::Code::H3_MESSAGE_ERROR);
        ctx.refused(
            http::StatusCode::BAD_REQUEST,
            "invalid or conflicting content-length",
            Some((req.method().clone(), req.uri().clone())),
        );
        return Ended::Otherwise;
    };
    let mut req = req.map(|()| RequestBody::into_body(recv, content_length));
    crate::proxy::headers::join_cookies(req.headers_mut());

    // Which connection info this request runs with: complete, or (0-RTT) early.
    let confirmed = ctx.confirmed.borrow().clone();
    let waited;
    let info: &ConnInfo = match (&confirmed, &ctx.early) {
        (Some(info), _) => info,
        // Not complete when the head was read: the request came as 0-RTT early data.
        (None, Some(e)) if !ctx.handshake.is_complete() => {
            req.extensions_mut()
                .insert(EarlyData::new(ctx.confirmed.clone()));
            e
        }
        // Complete, but its info is a moment away (being built by `Confirm`).
        _ => {
            let mut rx = ctx.confirmed.clone();
            let done = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.clone());
            let Some(info) = done else {
                return Ended::Otherwise;
            };
            waited = info;
            &waited
        }
    };
    let head_only = req.method() == http::Method::HEAD;
    // From here on the request may be processed: an unfinished response is an internal error.
    send.on_drop = Some(h3::error::Code::H3_INTERNAL_ERROR);
    let exchange = async {
        // A connection that closed as the head came in (the client sent a frame the
        // connection dies of right after it): the request is recorded as abandoned, not
        // run, so nothing goes upstream for a client that is gone.
        if ctx.conn.close_reason().is_some() {
            ctx.runtime.gateway.abandoned(&req, info);
            return Ended::Otherwise;
        }
        let resp = ctx.runtime.gateway.handle(req, info).await;
        if resp.extensions().get::<crate::error::Abandoned>().is_some() {
            // Logged 499 (as the response drops unsent); the client gets a cancelled stream.
            send.on_drop = Some(h3::error::Code::H3_REQUEST_CANCELLED);
            return Ended::Cancelled;
        }
        let stall = ctx.listener.config.limits.idle_timeout;
        match body::send_response(&mut send.stream, resp, head_only, stall).await {
            Ok(()) => send.on_drop = None,
            // The client stopped reading before the head: the upstream's work was for nothing.
            Err(body::SendError::Head(e)) if e.is_peer_gone() => {
                tracing::debug!(error = %e, "HTTP/3 response not sent: the client cancelled");
                return Ended::Cancelled;
            }
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/3 response not completed");
                // The client must not take a cut-off body for a complete one. A client that
                // took nothing for idle_timeout has its response cancelled (processed, so
                // not "rejected": no retry is implied); a failure on our side is internal.
                if let body::SendError::Stalled = e {
                    send.on_drop = Some(h3::error::Code::H3_REQUEST_CANCELLED);
                }
            }
        }
        Ended::Otherwise
    };
    // h3 reports no stream resets to a request waiting on its upstream: bind the request to
    // its connection, so a client that leaves takes its requests (and their upstream
    // connections) with it. Dropping the pipeline's future logs the request as aborted (499).
    // The exchange first: polled at least once, it records the request whatever happens
    // (with the connection already closed, `closed()` would win a random pick, and the
    // request would leave no record).
    tokio::select! {
        biased;
        ended = exchange => ended,
        _ = ctx.conn.closed() => Ended::Otherwise,
    }
}
