//! One client connection: optional TLS handshake (bounded by the handshake timeout), HTTP/1.1
//! (Wraith's own codec, `h1`) or HTTP/2 (hyper; by ALPN, or the h2 preface on plain
//! connections), and their timeouts:
//!
//! - header read (slowloris): from the first byte of a request head (or from accept, or the
//!   end of the TLS handshake) to the complete head; exceeded -> the connection is closed;
//! - idle: no request in flight for this long -> graceful close.
//!
//! The HTTP/1.1 codec keeps both itself (one timer per connection, moved lazily: no clock
//! read per byte), and also closes a connection whose client reads none of a response for
//! idle_timeout. HTTP/2 requests are counted here (`ConnState`): hyper's keep-alive PINGs
//! move bytes on an unused connection, so only requests count as use.
//!
//! Drain (SIGTERM, the listener removed by a reload, or a reload that changed the
//! client-certificate rules the connection was admitted under: `CloseSignal`) asks the
//! connection for a graceful shutdown: HTTP/1.1 finishes the request in flight with
//! `Connection: close`, HTTP/2 sends GOAWAY.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::h1;
use super::resets::PrematureResets;
use super::tls::{self, group_name};
use super::CloseSignal;
use crate::body::Body;
use crate::config::Limits;
use crate::identity::Identity;
use crate::proxy::{ConnInfo, TlsInfo};
use crate::runtime::{ListenerRuntime, Runtime};
use crate::telemetry::metrics::ListenerMetrics;
use crate::telemetry::PeerAddress;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Requests on one HTTP/2 connection, as the service sees them begin and end.
struct ConnState {
    epoch: Instant,
    in_flight: AtomicU32,
    /// Milliseconds since `epoch` of the last request's end.
    last_active: AtomicU64,
    /// Milliseconds since `epoch` (+1) when bytes of a new request head started to arrive;
    /// 0 when no head is pending.
    head_since: AtomicU64,
    /// The response bodies in flight, each saying since when it has waited for the client to
    /// take what it gave (HTTP/2 flow control): a client that reads none of a response for
    /// `idle_timeout` is stalled, as over HTTP/1.1.
    streams: std::sync::Mutex<Vec<std::sync::Weak<StreamClock>>>,
    /// Streams the client has opened that reached the service (h2 bounds those reset
    /// before hyper takes them: `max_pending_accept_reset_streams`), and those of them it
    /// reset before their response head (rapid reset, `super::resets`).
    resets: PrematureResets,
    /// Told once the premature resets are past the limit (`ConnState::premature_reset`).
    flooded: tokio::sync::Notify,
}

/// Since when (milliseconds since the connection's epoch, +1; 0: not waiting) a response
/// body has handed hyper a frame and not been asked for the next: hyper asks only when the
/// stream has flow-control window again.
#[derive(Default)]
struct StreamClock {
    blocked_since: AtomicU64,
}

impl ConnState {
    fn new(epoch: Instant, limits: &Limits) -> ConnState {
        ConnState {
            epoch,
            in_flight: AtomicU32::new(0),
            last_active: AtomicU64::new(0),
            // The first request head is due from the moment of accept.
            head_since: AtomicU64::new(1),
            streams: Default::default(),
            resets: PrematureResets::new(limits.max_concurrent_streams),
            flooded: tokio::sync::Notify::new(),
        }
    }

    /// Counts a stream the client reset before its response head, `age` after it opened;
    /// past the limit (`super::resets`), tells `drive` to close the connection.
    fn premature_reset(&self, age: Duration) {
        if self.resets.cancelled(age) {
            self.flooded.notify_one();
        }
    }

    /// A clock for one response body.
    fn stream_clock(&self) -> Arc<StreamClock> {
        let clock = Arc::new(StreamClock::default());
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.retain(|w| w.strong_count() > 0);
        streams.push(Arc::downgrade(&clock));
        clock
    }

    /// Whether a response body has waited for the client for `idle_ms` or more.
    fn stalled(&self, now: u64, idle_ms: u64) -> bool {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.iter().filter_map(|w| w.upgrade()).any(|c| {
            let since = c.blocked_since.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since - 1) >= idle_ms
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.resets.opened();
        self.head_since.store(0, Ordering::Relaxed);
    }

    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.last_active.store(self.now_ms(), Ordering::Relaxed);
    }

    /// What the timeouts say now, and when to look again.
    fn check(&self, limits: &Limits) -> (Verdict, Duration) {
        let now = self.now_ms();
        let header_ms = limits.header_read_timeout.as_millis() as u64;
        let idle_ms = limits.idle_timeout.as_millis() as u64;
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            if self.stalled(now, idle_ms) {
                return (Verdict::Stalled, Duration::ZERO);
            }
            return (
                Verdict::Busy,
                limits.idle_timeout.min(limits.header_read_timeout),
            );
        }
        // Only the first request is timed (from accept, or the end of the TLS handshake):
        // later heads arrive on streams.
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 {
            let waited = now.saturating_sub(head - 1);
            if waited >= header_ms {
                return (Verdict::HeaderTimeout, Duration::ZERO);
            }
            return (Verdict::Busy, Duration::from_millis(header_ms - waited));
        }
        let idle = now.saturating_sub(self.last_active.load(Ordering::Relaxed));
        if idle >= idle_ms {
            return (Verdict::Idle, limits.idle_timeout);
        }
        (Verdict::Busy, Duration::from_millis(idle_ms - idle))
    }
}

/// One request in flight on an HTTP/2 connection, from its head until its response body
/// has been sent (or the stream is gone), as HTTP/1.1 and HTTP/3 count theirs: a response
/// still streaming (a download, server-sent events, a gRPC server stream) keeps the
/// connection busy, out of reach of the idle timeout.
struct InFlight(Option<Arc<ConnState>>);

impl InFlight {
    fn begin(state: Option<&Arc<ConnState>>) -> InFlight {
        if let Some(s) = state {
            s.begin();
        }
        InFlight(state.cloned())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.end();
        }
    }
}

/// A request's service future until it has its response head: dropped before that, the
/// stream was reset by the client (hyper drops the future then) or the connection ended.
/// Young enough, it counts as a premature reset (`super::resets`).
struct PrematureReset {
    state: Option<Arc<ConnState>>,
    opened: Instant,
}

impl PrematureReset {
    fn begin(state: Option<&Arc<ConnState>>) -> PrematureReset {
        PrematureReset {
            state: state.cloned(),
            opened: Instant::now(),
        }
    }

    /// The response head is there: the stream was not thrown away.
    fn answered(mut self) {
        self.state = None;
    }
}

impl Drop for PrematureReset {
    fn drop(&mut self) {
        if let Some(s) = &self.state {
            s.premature_reset(self.opened.elapsed());
        }
    }
}

/// An HTTP/2 response body that holds its request's `InFlight` until hyper drops it (at
/// its end, or when the stream is reset), and keeps its stream's `StreamClock`.
struct H2Body {
    body: Body,
    _in_flight: InFlight,
    clock: Option<(Arc<ConnState>, Arc<StreamClock>)>,
}

impl http_body::Body for H2Body {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        if let Some((state, clock)) = &this.clock {
            // Handing over data starts the wait for the client (hyper asks again only once
            // the stream has window); being asked, or having nothing yet, ends it.
            let gave_data = matches!(&polled, std::task::Poll::Ready(Some(Ok(f))) if f.is_data());
            let since = if gave_data { state.now_ms() + 1 } else { 0 };
            clock.blocked_since.store(since, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

enum Verdict {
    Busy,
    Idle,
    HeaderTimeout,
    /// A response has waited for the client to read any of it for `idle_timeout`.
    Stalled,
}

/// Everything a request on this connection needs, shared by one `Arc`.
struct ConnCtx {
    runtime: Arc<Runtime>,
    info: ConnInfo,
    /// `Alt-Svc` advertising HTTP/3 on this port, when the listener has it.
    alt_svc: AltSvc,
}

/// A connection's `Alt-Svc`, as the current snapshot has it: a reload that turns `http3` on
/// or off (or changes `alt_svc_max_age`) reaches the connections already open at their next
/// response, not only new ones (a keep-alive connection advertised HTTP/3 for as long as it
/// lasted after it was turned off). Worked out again only when the generation changes.
struct AltSvc {
    /// The listener (by address: a reload may rename it).
    key: crate::config::ListenerKey,
    /// The port advertised: the QUIC side binds the TCP side's.
    port: u16,
    /// The snapshot generation `value` is for (0: none yet; generations start at 1).
    generation: AtomicU64,
    value: arc_swap::ArcSwapOption<http::HeaderValue>,
}

impl ConnCtx {
    /// Built by `serve` and handed to `serve_http` behind its `Arc`: passed by value, the
    /// connection info (264 bytes) was kept twice in every connection's task.
    fn new(runtime: Arc<Runtime>, listener: &ListenerRuntime, info: ConnInfo) -> Arc<ConnCtx> {
        // The same port over UDP (the QUIC side binds the TCP side's port).
        let alt_svc = AltSvc::new(listener, info.local.port());
        Arc::new(ConnCtx {
            runtime,
            info,
            alt_svc,
        })
    }
}

impl AltSvc {
    fn new(listener: &ListenerRuntime, port: u16) -> AltSvc {
        AltSvc {
            key: listener.config.key(),
            port,
            generation: AtomicU64::new(0),
            value: arc_swap::ArcSwapOption::empty(),
        }
    }

    fn of(listener: &ListenerRuntime, port: u16) -> Option<http::HeaderValue> {
        let q = listener.quic.as_ref()?;
        let v = format!("h3=\":{port}\"; ma={}", q.config.alt_svc_max_age.as_secs());
        http::HeaderValue::from_str(&v).ok()
    }

    /// The value for a response now.
    fn current(&self, runtime: &Runtime) -> Option<http::HeaderValue> {
        if runtime.gateway.generation() != self.generation.load(Ordering::Acquire) {
            let snapshot = runtime.gateway.snapshot();
            let value = snapshot
                .listener_by_key(&self.key)
                .and_then(|l| Self::of(l, self.port));
            self.value.store(value.map(Arc::new));
            self.generation
                .store(snapshot.generation, Ordering::Release);
        }
        self.value.load().as_deref().cloned()
    }
}

/// Serves one accepted TCP connection to the end.
pub(super) async fn serve(
    runtime: Arc<Runtime>,
    listener: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    unnamed_client: bool,
    close: CloseSignal,
) {
    let _ = stream.set_nodelay(true);
    // The address the client connected to: a balancer's front end when a PROXY protocol
    // header said so.
    let local = local.unwrap_or_else(|| stream.local_addr().unwrap_or(listener.config.address));
    let accepted = tokio::time::Instant::now();
    let io = stream;
    let mut info = ConnInfo {
        peer,
        local,
        listener: listener.config.name.clone(),
        tls: None,
        identity: None,
        policy_cache: Default::default(),
        limits: (&listener.config.limits).into(),
        close: Some(close.clone()),
        unnamed_client,
    };

    let Some(acceptor) = &listener.tls else {
        // Plain HTTP: HTTP/2 only with prior knowledge (the connection preface).
        let sniffed = tokio::select! {
            biased;
            sniffed = sniff_h2(&io, &listener.config.limits) => sniffed,
            () = close.stopped() => None,
        };
        let Some(h2) = sniffed else {
            return;
        };
        let ctx = ConnCtx::new(runtime, &listener, info);
        return serve_http(ctx, &listener, io, h2, close, accepted).await;
    };

    let timeout = listener
        .config
        .tls
        .as_ref()
        .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
    let handshake_started = Instant::now();
    // A handshake refused, timed out, or a resumed session whose client certificate no longer
    // passes: accounted for the same way.
    let refused = |failure| {
        super::handshake_refused(
            &runtime,
            &info.listener,
            peer,
            handshake_started,
            "tcp",
            PeerAddress::Proven,
            failure,
        )
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(acceptor.for_connection());
    // Boxed: the TLS session (~1.2 KiB) would otherwise sit inline in every connection's
    // task, plain TCP ones included, and be copied into the HTTP/1.1 codec.
    let handshake = tokio::select! {
        biased;
        handshake = tokio::time::timeout(timeout, acceptor.accept(io)) => handshake,
        // No request read yet: nothing to finish (`CloseSignal::stopped`).
        () = close.stopped() => return,
    };
    let tls = match handshake {
        Ok(Ok(s)) => Box::new(s),
        Ok(Err(e)) => return refused(Ok(tls::handshake_failure(&e))),
        Err(_) => return refused(Err(())),
    };
    // The request-head clock starts now (see `serve_http`).
    let handshaken = tokio::time::Instant::now();
    let (_, session) = tls.get_ref();
    let chain = session.peer_certificates();
    if let Err(e) = tls::recheck_resumed(&listener.client_verifier, session.handshake_kind(), chain)
    {
        return refused(Ok((tls::failure_label(&e), e.to_string())));
    }
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into());
    let h2 = session.alpn_protocol() == Some(b"h2");
    info.tls = Some(TlsInfo {
        version: super::client_auth::version_name(match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => crate::config::TlsVersion::Tls12,
            _ => crate::config::TlsVersion::Tls13,
        }),
        group: session
            .negotiated_key_exchange_group()
            .map(|g| group_name(g.name())),
        alpn,
        sni: session.server_name().map(Into::into),
    });
    if let Some(t) = &info.tls {
        close.negotiated(t.version, t.group);
        runtime.gateway.snapshot().telemetry.handshake(
            &info.listener,
            peer,
            handshake_started,
            Ok((t.version, t.group.unwrap_or("unknown"))),
            PeerAddress::Proven,
        );
    }
    // Identity: once per connection, from the leaf the verifier accepted.
    if let Some(chain) = session.peer_certificates() {
        if let Some(leaf) = chain.first() {
            info.identity = Some(Arc::new(identity_of(leaf, peer, &info.listener)));
        }
        close.admitted_until(chain);
    }
    let ctx = ConnCtx::new(runtime, &listener, info);
    serve_http(ctx, &listener, tls, h2, close, handshaken).await;
}

/// The identity of a verified leaf certificate; what cannot be read is logged and left empty.
pub(super) fn identity_of(leaf: &[u8], peer: SocketAddr, listener: &str) -> Identity {
    match Identity::from_der(leaf) {
        Ok((id, warnings)) => {
            for w in warnings {
                tracing::warn!(peer = %peer, listener, client = %crate::telemetry::format::printable(id.name()), "client certificate: {}", crate::telemetry::format::printable(&w.to_string()));
            }
            id
        }
        Err(e) => {
            tracing::warn!(peer = %peer, listener, error = %e, "client certificate verified but unreadable; identity is its fingerprint only");
            Identity::unparsed(leaf)
        }
    }
}

/// Waits for enough bytes to tell an HTTP/2 preface from HTTP/1.1 (peeking, nothing consumed).
/// `None` when the client went away or sent nothing before the header timeout.
async fn sniff_h2(stream: &TcpStream, limits: &Limits) -> Option<bool> {
    let mut buf = [0u8; 24];
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    let mut seen = 0usize;
    loop {
        let more = tokio::time::timeout_at(deadline, peek_more(stream, &mut buf, seen)).await;
        let n = match more {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => n,
        };
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        if n == seen {
            // Part of a preface, then the end of what the client sends: served as
            // HTTP/1.1, whose codec refuses or drops the fragment and closes.
            return Some(false);
        }
        seen = n;
    }
}

/// Peeks (nothing consumed) at what `stream` has received into `buf`, once more than the
/// `seen` bytes of the last peek are there: the count, which is `seen` again only when the
/// client has closed its side (no more will come), 0 when it sent nothing.
pub(super) async fn peek_more(
    stream: &TcpStream,
    buf: &mut [u8],
    seen: usize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    loop {
        // "Nothing new" is reported to tokio as WouldBlock, which clears the readiness: the
        // next wait is for new data, not a spin over the same partial bytes. Unless the
        // client has closed its side: then readiness stays set (read-closed) and no new data
        // will come, so the bytes there are all there is.
        let ready = stream.ready(tokio::io::Interest::READABLE).await?;
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: `fd` is this stream's open socket and `buf` is ours to fill.
            let n = unsafe {
                libc::recv(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            match n {
                n if n < 0 => Err(io::Error::last_os_error()),
                n if n as usize == seen && n != 0 && !ready.is_read_closed() => {
                    Err(io::ErrorKind::WouldBlock.into())
                }
                n => Ok(n as usize),
            }
        });
        match peeked {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn serve_http<I>(
    ctx: Arc<ConnCtx>,
    listener: &ListenerRuntime,
    io: I,
    h2: bool,
    close: CloseSignal,
    started: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = listener.config.limits.clone();
    // The request-head clock starts at `started`: after the TLS handshake, which had its own
    // timeout (a slow but legitimate one must not eat into header_read_timeout).
    // (HTTP/2 only: the HTTP/1.1 codec times itself.)
    let state = h2.then(|| Arc::new(ConnState::new(started.into_std(), &limits)));
    // Counted from here to the end of the connection (the guard decrements on every exit);
    // the handles keep the listener's series while it has connections.
    let _active = listener
        .metrics
        .get()
        .map(|m| GaugeGuard::count(m.clone(), if h2 { "h2" } else { "h1" }));
    let refusals = ctx.clone();
    let handle = move |req: Request<Body>| {
        let ctx = ctx.clone();
        async move {
            let mut resp = ctx.runtime.gateway.handle(req, &ctx.info).await;
            if let Some(v) = ctx.alt_svc.current(&ctx.runtime) {
                resp.headers_mut().insert(http::header::ALT_SVC, v);
            }
            resp
        }
    };
    if h2 {
        // Boxed: hyper's HTTP/2 connection and its driver (~4 KiB) are not held inline by
        // the task of every HTTP/1.1 connection.
        Box::pin(serve_h2(
            listener, io, handle, refusals, state, &limits, &close,
        ))
        .await;
    } else {
        let settings = h1::Settings {
            max_header_size: limits.max_header_size,
            max_headers: limits.max_headers,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
        };
        let on_refused = move |r: h1::Refused| {
            let version = r
                .request
                .as_ref()
                .map_or(http::Version::HTTP_11, |(_, _, v)| *v);
            refusals.runtime.gateway.refused_by_codec(
                &refusals.info,
                r.status,
                r.reason,
                r.request.map(|(method, uri, _)| (method, uri)),
                version,
                r.body_len,
            );
        };
        let conn = h1::Connection::new(io, settings, started, handle, on_refused);
        let _ = drive(
            conn,
            |c| c.graceful_shutdown(),
            |_| {},
            None,
            &limits,
            &close,
        )
        .await;
    }
}

/// The HTTP/2 side of `serve_http`: hyper's server over `io`, each request to `handle`.
async fn serve_h2<I, H, F>(
    listener: &ListenerRuntime,
    io: I,
    handle: H,
    refusals: Arc<ConnCtx>,
    state: Option<Arc<ConnState>>,
    limits: &Limits,
    close: &CloseSignal,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Body>) -> F + Send + 'static,
    F: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let requests = state.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        // Ends the request on every path, including hyper dropping this future or the
        // body (an RST_STREAM, a client gone): a leaked "in flight" would keep the
        // connection Busy, beyond the reach of the idle and header timeouts, for good.
        let in_flight = InFlight::begin(requests.as_ref());
        let premature = PrematureReset::begin(requests.as_ref());
        let clock = requests.as_ref().map(|s| (s.clone(), s.stream_clock()));
        let mut req = req.map(Body::Incoming);
        crate::proxy::headers::join_cookies(req.headers_mut());
        let resp = handle(req);
        async move {
            let resp = resp.await;
            premature.answered();
            let resp = resp.map(|body| H2Body {
                body,
                _in_flight: in_flight,
                clock,
            });
            Ok::<_, Infallible>(resp)
        }
    });
    // Requests h2 refuses before the service sees them (a malformed head, reset with
    // PROTOCOL_ERROR; a header list too large, answered 431) are accounted for as the
    // HTTP/1.1 codec's refusals are: an access record and a `malformed_request` event.
    let mut server = listener.http.h2.clone();
    let hook = refusals.clone();
    server.refused_request_hook(h2::server::RefusedRequestHook(Arc::new(
        move |r: h2::server::RefusedRequest| {
            let refusals = &hook;
            let (status, reason) = if let Some(error) = r.connection_error {
                // The whole connection, for the client's frames (a field value with CR
                // or LF, an upper-case name, an unknown pseudo-header, a bad HPACK block,
                // a flood): one record for it.
                match connection_error_reason(error) {
                    Some(reason) => (http::StatusCode::BAD_REQUEST, reason),
                    None => return,
                }
            } else if r.too_large {
                (
                    http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "header list too large",
                )
            } else {
                (
                    http::StatusCode::BAD_REQUEST,
                    "malformed HTTP/2 request head",
                )
            };
            refusals.runtime.gateway.refused_by_codec(
                &refusals.info,
                status,
                reason,
                None,
                http::Version::HTTP_2,
                0,
            );
        },
    )));
    let conn = server.serve_connection(TokioIo::new(io), svc);
    let calm = |c: Pin<&mut _>| {
        // Accounted for before the GOAWAY goes out (a client that sees the connection end
        // finds it counted), as h2's own floods are (`connection_error_reason`): one record
        // and one `malformed_request` event for the connection, and the refusal counted.
        if let Some(m) = listener.metrics.get() {
            m.refused("h2_rapid_reset");
        }
        refusals.runtime.gateway.refused_by_codec(
            &refusals.info,
            http::StatusCode::BAD_REQUEST,
            "HTTP/2 rapid reset: most streams reset before their response (connection closed)",
            None,
            http::Version::HTTP_2,
            0,
        );
        hyper::server::conn::http2::Connection::abrupt_shutdown(c, h2::Reason::ENHANCE_YOUR_CALM)
    };
    let _ = drive(
        conn,
        |c| c.graceful_shutdown(),
        calm,
        state.as_deref(),
        limits,
        close,
    )
    .await;
}

/// Runs a connection (Wraith's HTTP/1.1 or hyper's HTTP/2) to completion, applying drain,
/// idle and header timeouts.
/// Once `close` fires, the connection has its drain time to finish; then it is closed
/// whatever it was doing (a reload that removes a listener or changes its client-certificate
/// rules has no process exit to end it otherwise).
async fn drive<C, G, A, E>(
    conn: C,
    graceful: G,
    abrupt: A,
    state: Option<&ConnState>,
    limits: &Limits,
    close: &CloseSignal,
) -> Option<E>
where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
    G: Fn(Pin<&mut C>),
    A: Fn(Pin<&mut C>),
{
    tokio::pin!(conn);
    let drain_timer = tokio::time::sleep(Duration::from_secs(365 * 86_400));
    tokio::pin!(drain_timer);
    let mut draining = false;
    let mut closing = false;
    let mut idle_strikes = 0;
    let mut calmed = false;
    // The close signal's futures (stop, reload, withdrawal, certificate expiry) are polled
    // with a waker of their own, and only after one of them woke it: this task wakes on
    // every read and write of the connection, and polling them each time costs a lock each.
    // Unconstrained: a poll must reach every inner future even when the task's cooperative
    // budget is spent (a budget-starved poll returns Pending without registering anything,
    // and with the flag already taken it would never be polled again).
    let requested = tokio::task::unconstrained(close.requested());
    tokio::pin!(requested);
    // Woken to begin with: the first poll registers the futures.
    let signal = Arc::new(SignalWaker {
        woken: AtomicBool::new(true),
        task: futures_util::task::AtomicWaker::new(),
    });
    let signal_waker = std::task::Waker::from(signal.clone());
    loop {
        // HTTP/2's timeouts; the HTTP/1.1 codec keeps its own (`state` is `None`).
        let wait = state.map(|st| st.check(limits).1);
        let close_requested = std::future::poll_fn(|cx| {
            if close.is_requested() {
                return Poll::Ready(());
            }
            // Registered before the flag is taken: a wake-up in between wakes this task.
            signal.task.register(cx.waker());
            if !signal.woken.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            let mut cx = Context::from_waker(&signal_waker);
            std::future::Future::poll(requested.as_mut(), &mut cx)
        });
        tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(e) = &res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return res.err();
            }
            _ = close_requested, if !draining => {
                if close.expired() {
                    tracing::debug!("the client certificate (or a CRL) this connection was admitted with has expired; closing");
                }
                if !closing {
                    graceful(conn.as_mut());
                }
                closing = true;
                draining = true;
                drain_timer.as_mut().reset(tokio::time::Instant::now() + close.drain());
            }
            _ = flooded(state), if !calmed => {
                tracing::debug!("most streams reset by the client before their response; closing with ENHANCE_YOUR_CALM");
                abrupt(conn.as_mut());
                calmed = true;
                closing = true;
                // The GOAWAY goes out once the client reads; its drain time at most.
                if !draining {
                    draining = true;
                    drain_timer.as_mut().reset(tokio::time::Instant::now() + close.drain());
                }
            }
            _ = &mut drain_timer, if draining => {
                tracing::debug!(drain = ?close.drain(), "connection still busy when the drain time ran out; closing");
                return None;
            }
            _ = tokio::time::sleep(wait.unwrap_or_default().max(Duration::from_millis(10))), if wait.is_some() => {
                let Some(state) = state else { continue };
                match state.check(limits).0 {
                    Verdict::Busy => idle_strikes = 0,
                    Verdict::HeaderTimeout => {
                        tracing::debug!("request head not received within header_read_timeout; closing");
                        return None;
                    }
                    Verdict::Stalled => {
                        tracing::debug!("the client read none of a response for idle_timeout; closing");
                        return None;
                    }
                    Verdict::Idle => {
                        idle_strikes += 1;
                        if idle_strikes > 1 {
                            return None;
                        }
                        graceful(conn.as_mut());
                        closing = true;
                    }
                }
            }
        }
    }
}

/// Resolves once the connection's client has reset too many streams prematurely
/// (`ConnState::premature_reset`); never for HTTP/1.1 (`state` is `None`).
async fn flooded(state: Option<&ConnState>) {
    match state {
        Some(s) => s.flooded.notified().await,
        None => std::future::pending().await,
    }
}

/// What the client did wrong, when h2 ends the connection for its frames with a GOAWAY of
/// this reason (the reasons that are the client's doing).
fn connection_error_reason(reason: h2::Reason) -> Option<&'static str> {
    match reason {
        h2::Reason::PROTOCOL_ERROR => Some("HTTP/2 protocol error (connection closed)"),
        h2::Reason::COMPRESSION_ERROR => Some("HTTP/2 HPACK error (connection closed)"),
        h2::Reason::FRAME_SIZE_ERROR => Some("HTTP/2 frame size error (connection closed)"),
        h2::Reason::FLOW_CONTROL_ERROR => Some("HTTP/2 flow control error (connection closed)"),
        h2::Reason::ENHANCE_YOUR_CALM => {
            Some("HTTP/2 flood: too many refused or reset streams, or CONTINUATION frames (connection closed)")
        }
        _ => None,
    }
}

/// The waker the close signal's futures are polled with: it notes that one of them woke
/// before waking the connection's task.
struct SignalWaker {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for SignalWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Decrements a gauge when dropped.
/// One open connection in its listener's gauge, from `count` until dropped; it holds the
/// listener's metric handles, so their series outlive a reload that removes the listener
/// until its last connection ends.
pub(super) struct GaugeGuard(Arc<ListenerMetrics>, &'static str);

impl GaugeGuard {
    pub(super) fn count(metrics: Arc<ListenerMetrics>, protocol: &'static str) -> GaugeGuard {
        metrics.connections(protocol).inc();
        GaugeGuard(metrics, protocol)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.connections(self.1).dec();
    }
}
