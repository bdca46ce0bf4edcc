//! Listeners: bind a TCP socket, accept under a connection limit, refuse nothing silently.
//! Each accepted connection is served by `conn::serve` on the snapshot current at accept time
//! for its TLS and HTTP settings; each request uses the snapshot current when it starts.
//! Listeners with `http3 = true` also have a QUIC side on the same port (`quic`).
//! A connection is asked to finish when its listener stops, when a reload changes the
//! client-certificate rules it was admitted under, or when a reload withdraws the TLS version
//! or key-exchange group it negotiated (`CloseSignal`, `client_auth`).

pub mod client_auth;
mod conn;
pub mod h1;
pub mod limit;
pub mod ocsp;
pub mod proxy_protocol;
pub mod quic;
mod resets;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::config::{Limits, ListenerConfig, ListenerKey};
use crate::runtime::{ListenerRuntime, Runtime};
use limit::ConnectionLimit;

/// The HTTP/2 server settings of a listener (HTTP/1.1 is Wraith's own codec, `h1`, which
/// takes its limits from the listener's config directly).
#[derive(Clone)]
pub struct HttpBuilders {
    pub h2: http2::Builder<TokioExecutor>,
}

/// Builds the HTTP server settings from a listener's limits.
pub fn http_builder(limits: &Limits) -> HttpBuilders {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(100))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(4 << 20))
        // What each stream may hold of a response the client is not reading (hyper's
        // default is 400 KiB): with 128 streams a client that opens its windows wide and
        // then never reads would pin ~50 MiB per connection. Past this the upstream's body
        // is simply not read further, as over HTTP/1.1.
        .max_send_buf_size(64 << 10);
    HttpBuilders { h2 }
}

/// What asks one connection to finish early: its listener stopping (SIGTERM, or the listener
/// removed by a reload), a reload changing the client-certificate rules it was admitted
/// under, a reload withdrawing the TLS version or key-exchange group it negotiated, or its
/// client certificate (or a CRL of the listener) expiring. Either way the connection
/// finishes what is in flight, and is closed whatever it is doing once `drain` has passed.
#[derive(Debug, Clone)]
pub struct CloseSignal {
    stop: CancellationToken,
    client_auth: Arc<client_auth::ClientAuthEpoch>,
    /// `[server] shutdown_timeout` when the connection was accepted.
    drain: Duration,
    /// What a TLS or QUIC connection negotiated; `None` on plain listeners.
    tls: Option<Arc<client_auth::Negotiated>>,
}

impl CloseSignal {
    /// The signal of a connection accepted on `listener`, from the snapshot of
    /// `generation`, under `runtime`'s current settings.
    pub(crate) fn new(
        runtime: &Runtime,
        listener: &ListenerRuntime,
        generation: u64,
        stop: CancellationToken,
    ) -> CloseSignal {
        CloseSignal {
            stop,
            tls: listener
                .config
                .tls
                .is_some()
                .then(|| Arc::new(listener.client_auth.negotiating(generation))),
            client_auth: listener.client_auth.clone(),
            drain: runtime.gateway.snapshot().config.server.shutdown_timeout,
        }
    }

    /// Records the TLS version and key-exchange group the handshake chose.
    pub(crate) fn negotiated(&self, version: &'static str, group: Option<&'static str>) {
        if let Some(n) = &self.tls {
            n.set(version, group);
        }
    }

    /// Records when what admitted the client certificate of `chain` stops holding (its
    /// certificates' notAfter, the listener's CRLs' nextUpdate): then the connection finishes
    /// as if a reload had revoked it. Call before `requested` is first polled.
    pub(crate) fn admitted_until(&self, chain: &[rustls_pki_types::CertificateDer<'_>]) {
        if let Some(n) = &self.tls {
            self.client_auth.admit_until(n, chain);
        }
    }

    /// Resolves when the listener stops (SIGTERM, or a reload removing it). A connection
    /// that has read no request yet (a PROXY header, a TLS handshake or the first bytes
    /// still to come) has nothing to finish and closes then: a slow or silent client must
    /// not hold a graceful stop for its whole `header_read_timeout` or `handshake_timeout`.
    pub(crate) async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// Whether the client certificate (or a CRL) the connection was admitted with has
    /// expired since.
    pub fn expired(&self) -> bool {
        self.tls.as_ref().is_some_and(|n| n.expired())
    }

    /// Resolves once the connection should finish.
    pub async fn requested(&self) {
        let withdrawn = async {
            match &self.tls {
                Some(n) => self.client_auth.withdrawn(n).await,
                None => std::future::pending().await,
            }
        };
        let expired = async {
            match &self.tls {
                Some(n) => n.expiry().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.client_auth.revoked() => {}
            _ = withdrawn => {}
            _ = expired => {}
        }
    }

    /// Whether `requested` has resolved (or would resolve at its next poll).
    pub fn is_requested(&self) -> bool {
        self.stop.is_cancelled() || self.admission_revoked()
    }

    /// Whether what the connection was admitted under no longer holds (the client-certificate
    /// rules or the TLS version or group it negotiated, taken away by a reload; its client
    /// certificate or a CRL, expired): its requests are no longer served.
    pub fn admission_revoked(&self) -> bool {
        self.client_auth.is_revoked()
            || self
                .tls
                .as_ref()
                .is_some_and(|n| self.client_auth.withdrew(n) || n.expired())
    }

    /// How long what is in flight may take after `requested`.
    pub fn drain(&self) -> Duration {
        self.drain
    }

    /// Counts the connection as open under its client-certificate rules (for the reload's
    /// log line) until the guard drops.
    pub(crate) fn admit(&self) -> client_auth::Admitted {
        self.client_auth.admit()
    }
}

/// A socket bound for a listener, not yet accepting.
pub struct Bound {
    /// The listener it is for.
    pub key: ListenerKey,
    pub listener: TcpListener,
    pub local_addr: SocketAddr,
    pub max_connections: usize,
}

/// Binds the listener's address (SO_REUSEADDR, backlog 4096).
pub async fn bind(config: &ListenerConfig) -> Result<Bound, String> {
    let address = config.address;
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("listener {:?}: cannot create socket: {e}", config.name))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| format!("listener {:?}: {e}", config.name))?;
    socket
        .bind(address)
        .map_err(|e| format!("listener {:?}: cannot bind {address}: {e}", config.name))?;
    let listener = socket.listen(4096).map_err(|e| {
        format!(
            "listener {:?}: cannot listen on {address}: {e}",
            config.name
        )
    })?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| format!("listener {:?}: {e}", config.name))?;
    Ok(Bound {
        key: config.key(),
        listener,
        local_addr,
        max_connections: config.limits.max_connections.get(),
    })
}

/// A running listener.
pub struct ListenerHandle {
    /// What identifies the listener across reloads.
    pub key: ListenerKey,
    /// The address actually bound (differs when the configured port is 0).
    pub local_addr: SocketAddr,
    /// Cancelled to stop accepting and drain this listener's connections.
    pub stop: CancellationToken,
    /// The connection limit; a reload resizes it.
    pub limit: Arc<ConnectionLimit>,
}

impl ListenerHandle {
    /// Connections currently open on this listener.
    pub fn active(&self) -> usize {
        self.limit.active()
    }
}

/// Starts accepting on a bound socket.
pub fn spawn(runtime: Arc<Runtime>, bound: Bound) -> ListenerHandle {
    let stop = runtime.shutdown.child_token();
    let limit = ConnectionLimit::new(bound.max_connections);
    let handle = ListenerHandle {
        key: bound.key.clone(),
        local_addr: bound.local_addr,
        stop: stop.clone(),
        limit: limit.clone(),
    };
    let name = runtime
        .gateway
        .snapshot()
        .listener_by_key(&bound.key)
        .map(|l| l.config.name.to_string())
        .unwrap_or_default();
    tracing::info!(listener = %name, address = %bound.local_addr, "listening");
    tokio::spawn(accept_loop(runtime, bound, limit, stop));
    handle
}

/// Accounts for a refused TLS handshake the same way over TCP and QUIC: client-certificate
/// refusals are logged at info and counted by reason (`wraith status`), everything else at
/// debug; the handshake metric and, for the SIEM, a security event either way (unless the
/// event could not name the client: `Telemetry::handshake`).
pub(crate) fn handshake_refused(
    runtime: &Runtime,
    listener: &Arc<str>,
    peer: SocketAddr,
    started: std::time::Instant,
    transport: &'static str,
    address: crate::telemetry::PeerAddress,
    failure: Result<(&'static str, String), ()>,
) {
    let failure = match failure {
        Err(()) => {
            tracing::debug!(peer = %peer, listener = %listener, transport, "TLS handshake timed out");
            crate::telemetry::HandshakeFailure::Timeout
        }
        Ok((reason, detail)) if tls::is_client_cert_failure(reason) => {
            // The operator needs to see why a client was turned away.
            runtime.client_cert_rejections.count(reason);
            tracing::info!(peer = %peer, listener = %listener, transport, reason, error = %detail, "TLS handshake failed: client certificate refused");
            crate::telemetry::HandshakeFailure::ClientCertificate(format!("{reason}: {detail}"))
        }
        Ok((reason, detail)) => {
            tracing::debug!(peer = %peer, listener = %listener, transport, reason, error = %detail, "TLS handshake failed");
            crate::telemetry::HandshakeFailure::Other(format!("{reason}: {detail}"))
        }
    };
    runtime
        .gateway
        .snapshot()
        .telemetry
        .handshake(listener, peer, started, Err(failure), address);
}

/// Whether the accept loop should close this connection at once; if so, the ban is counted
/// and reported.
pub(crate) fn banned_at_accept(
    runtime: &Runtime,
    snapshot: &crate::runtime::Snapshot,
    listener: &Arc<str>,
    peer: SocketAddr,
) -> bool {
    match ban_at_accept(runtime, snapshot, peer) {
        Some(ban) => {
            report_ban_at_accept(snapshot, listener, peer, &ban);
            true
        }
        None => false,
    }
}

/// The ban that refuses a connection from `peer` at accept, if any (`decisions.check_at_accept`;
/// trusted proxies are checked per request instead, on the client address they forward).
pub(crate) fn ban_at_accept(
    runtime: &Runtime,
    snapshot: &crate::runtime::Snapshot,
    peer: SocketAddr,
) -> Option<crate::decisions::Verdict> {
    let config = &snapshot.config;
    if !config.decisions.check_at_accept
        || runtime.gateway.decisions.is_empty()
        || crate::proxy::headers::is_trusted(&config.server.trusted_proxies, peer.ip())
    {
        return None;
    }
    runtime
        .gateway
        .decisions
        .lookup(peer.ip(), config.decisions.fallback)
        .filter(|v| v.action == crate::decisions::Action::Ban)
}

/// Counts a connection refused at accept by `ban`, with a `banned` event for the SIEM (no
/// request was read).
pub(crate) fn report_ban_at_accept(
    snapshot: &crate::runtime::Snapshot,
    listener: &Arc<str>,
    peer: SocketAddr,
    ban: &crate::decisions::Verdict,
) {
    tracing::debug!(peer = %peer, origin = %ban.origin, kind = %ban.kind, value = %ban.value, "banned peer refused at accept");
    snapshot.telemetry.banned_connection(
        listener,
        peer,
        &ban.origin,
        Some(&*ban.reason).filter(|r| !r.is_empty()),
    );
}

/// A connection's place in its client's count (`limits.max_connections_per_client`); `Err`
/// when the client has its limit open already: the connection is refused (counted, logged at
/// debug). Trusted proxies carry many clients: they are not limited.
pub(crate) fn client_slot(
    counts: &Arc<limit::PerClient>,
    snapshot: &crate::runtime::Snapshot,
    listener: &ListenerRuntime,
    peer: SocketAddr,
) -> Result<Option<limit::ClientSlot>, ()> {
    let Some(max) = listener.config.limits.max_connections_per_client else {
        return Ok(None);
    };
    if crate::proxy::headers::is_trusted(&snapshot.config.server.trusted_proxies, peer.ip()) {
        return Ok(None);
    }
    match counts.take(peer.ip(), max.get()) {
        Some(slot) => Ok(Some(slot)),
        None => {
            tracing::debug!(peer = %peer, listener = %listener.config.name, max = max.get(), "connection refused: the client has max_connections_per_client open");
            if let Some(m) = listener.metrics.get() {
                m.refused("per_client_limit");
            }
            Err(())
        }
    }
}

/// How often failing accepts are logged at most.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// A listening socket's failing accepts (EMFILE and friends, which keep failing while they
/// last): each is retried after 50 ms rather than spun on, and they are logged once per
/// `ACCEPT_WARN_EVERY` with their count, not once per retry.
#[derive(Default)]
pub(crate) struct AcceptFailures {
    /// Failures since the last warning.
    failed: u64,
    warned: Option<std::time::Instant>,
}

impl AcceptFailures {
    /// Logs (at most once per interval) the failed accept on `address`, then waits 50 ms.
    pub(crate) async fn failed(
        &mut self,
        address: &(dyn std::fmt::Display + Sync),
        e: &std::io::Error,
    ) {
        self.failed += 1;
        if self.warned.is_none_or(|t| t.elapsed() >= ACCEPT_WARN_EVERY) {
            tracing::warn!(address = %address, error = %e, failed = self.failed, "accept failed; retrying every 50 ms (logged once per 10 s)");
            self.warned = Some(std::time::Instant::now());
            self.failed = 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A PROXY protocol listener's refused headers (none, malformed, too slow, or from a peer not
/// trusted to send one): logged at most once per `ACCEPT_WARN_EVERY` with their count, so
/// that a balancer that does not send the header, or is not trusted to, shows in the log
/// without flooding it.
#[derive(Default)]
struct HeaderFailures(std::sync::Mutex<(Option<std::time::Instant>, u64)>);

impl HeaderFailures {
    fn failed(&self, listener: &str, peer: SocketAddr, e: &proxy_protocol::Error) {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.1 += 1;
        if last.0.is_none_or(|t| t.elapsed() >= ACCEPT_WARN_EVERY) {
            tracing::warn!(listener, peer = %peer, error = %e, refused = last.1, "PROXY protocol header refused, connection closed (logged once per 10 s)");
            *last = (Some(std::time::Instant::now()), 0);
        } else {
            tracing::debug!(listener, peer = %peer, error = %e, "PROXY protocol header refused, connection closed");
        }
    }
}

/// Reads the PROXY protocol header of a connection from a balancer (`proxy_protocol = true`)
/// and admits the client it names as the accept loop admits a direct one (bans checked at
/// accept, `max_connections_per_client`): the client's address, the address it connected to,
/// and its per-client place. `None` when the connection is refused (counted and logged).
/// A header that names no client (the balancer's own health checks: v2 `LOCAL`, v1
/// `UNKNOWN`) leaves the connection the balancer's.
async fn behind_proxy(
    runtime: &Runtime,
    listener: &ListenerRuntime,
    per_client: &Arc<limit::PerClient>,
    failures: &HeaderFailures,
    stream: &mut tokio::net::TcpStream,
    peer: SocketAddr,
) -> Option<(SocketAddr, Option<SocketAddr>, Option<limit::ClientSlot>)> {
    let name = &listener.config.name;
    let addresses =
        match proxy_protocol::read(stream, listener.config.limits.header_read_timeout).await {
            Ok(a) => a,
            // A balancer's TCP health check connects and closes: nothing refused.
            Err(proxy_protocol::Error::Empty) => return None,
            Err(e) => {
                failures.failed(name, peer, &e);
                if let Some(m) = listener.metrics.get() {
                    m.refused("proxy_header");
                }
                return None;
            }
        };
    let Some(addresses) = addresses else {
        return Some((peer, None, None));
    };
    let client = addresses.source;
    let snapshot = runtime.gateway.snapshot();
    let refuse = |stream: &mut tokio::net::TcpStream| {
        let _ = stream.set_zero_linger();
    };
    if banned_at_accept(runtime, &snapshot, name, client) {
        refuse(stream);
        return None;
    }
    let Ok(slot) = client_slot(per_client, &snapshot, listener, client) else {
        refuse(stream);
        return None;
    };
    Some((client, Some(addresses.destination), slot))
}

async fn accept_loop(
    runtime: Arc<Runtime>,
    bound: Bound,
    limit: Arc<ConnectionLimit>,
    stop: CancellationToken,
) {
    let mut warned_full = false;
    let mut failures = AcceptFailures::default();
    let per_client = runtime.per_client(&bound.key);
    let header_failures = Arc::new(HeaderFailures::default());
    // Apart: a scanner's connections must not hide a balancer's bad headers, nor these them.
    let untrusted_peers = HeaderFailures::default();
    loop {
        // Take a connection slot first: at the limit, new connections wait in the backlog.
        let permit = match limit.try_acquire() {
            Some(p) => p,
            None => {
                if !warned_full {
                    tracing::warn!(address = %bound.local_addr, max = limit.max(), "connection limit reached; new connections wait");
                    warned_full = true;
                }
                tokio::select! {
                    p = limit.acquire() => p,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            r = bound.listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    failures.failed(&bound.local_addr, &e).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        warned_full = false;
        // The slot was taken before a reload lowered the limit below the connections open
        // (a shrink cannot take back a slot an accept loop holds): it goes to pay for that,
        // and this connection waits for a slot under the new limit, as the next ones do.
        let permit = if limit.in_debt() {
            drop(permit);
            tokio::select! {
                p = limit.acquire() => p,
                _ = stop.cancelled() => return,
            }
        } else {
            permit
        };
        let snapshot = runtime.gateway.snapshot();
        let Some(listener) = snapshot.listener_by_key(&bound.key).cloned() else {
            return;
        };
        let proxied = listener.config.proxy_protocol;
        if proxied
            && !crate::proxy::headers::is_trusted(
                &snapshot.config.server.trusted_proxies,
                peer.ip(),
            )
        {
            // Only the balancers may say who the client is. A warning, as for a bad header: a
            // balancer left out of trusted_proxies (or seen from another address) shows.
            untrusted_peers.failed(
                &listener.config.name,
                peer,
                &proxy_protocol::Error::Untrusted,
            );
            if let Some(m) = listener.metrics.get() {
                m.refused("proxy_untrusted");
            }
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        // Banned peers go before the TLS handshake costs anything. Trusted proxies are
        // checked per request instead, on the client address they forward (behind a PROXY
        // protocol header: once it is read, on the address it gives).
        if banned_at_accept(&runtime, &snapshot, &listener.config.name, peer) {
            // RST rather than FIN: no TIME_WAIT kept for a client we refuse.
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        let Ok(client) = client_slot(&per_client, &snapshot, &listener, peer) else {
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        };
        let permit = permit.admit();
        let close = CloseSignal::new(&runtime, &listener, snapshot.generation, stop.clone());
        let admitted = close.admit();
        let runtime2 = runtime.clone();
        let per_client = per_client.clone();
        let header_failures = header_failures.clone();
        runtime.connections.spawn(async move {
            let mut stream = stream;
            let (peer, local, client) = if proxied {
                let header = behind_proxy(
                    &runtime2,
                    &listener,
                    &per_client,
                    &header_failures,
                    &mut stream,
                    peer,
                );
                let behind = tokio::select! {
                    biased;
                    behind = header => behind,
                    () = close.stopped() => None,
                };
                let Some(behind) = behind else {
                    return;
                };
                behind
            } else {
                (peer, None, client)
            };
            // Behind a balancer, no address from its header: the bytes are still a client's
            // (one on a Unix socket, say), not a trusted proxy's.
            let unnamed_client = proxied && local.is_none();
            conn::serve(
                runtime2,
                listener,
                stream,
                peer,
                local,
                unnamed_client,
                close,
            )
            .await;
            drop((admitted, permit, client));
        });
    }
}
