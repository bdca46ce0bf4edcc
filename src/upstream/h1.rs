//! HTTP/1.1 to upstreams, driven directly by the request's own task.
//!
//! hyper's pooled client runs every upstream connection in a task of its own and passes each
//! request and response through channels; on a proxy that is two task hand-offs per request on
//! the hottest path. Here the downstream connection's task writes the request to the pooled
//! socket itself and the response body reads straight from it, the way Pingora's proxy does.
//! The connection goes back to the pool the moment the response body ends.
//!
//! Full duplex: while a request body goes out, the exchange watches the socket
//! (`poll_answer`). An early error answer stops the upload (RFC 9112 §9.5); a complete final
//! 2xx or 3xx head is returned to the pipeline at once, and the rest of the upload
//! (`upload::Upload`) moves into the response body, which sends it between its own reads.
//! The one socket keeps one owner, and an upstream that answers as it reads (an echo, a
//! transcoder) cannot deadlock with Wraith. Such a connection is pooled only if both the
//! request and the response ended whole. An upload that fails after the head on the
//! client's side ends the response body in error; one the upstream stops taking (a reset,
//! no byte taken for the timeout) just ends, and the response is read on to its own end.
//!
//! Framing follows RFC 9112: requests are sent with Content-Length when the size is known and
//! chunked otherwise (never both); responses are read by Transfer-Encoding, then
//! Content-Length, then until close, with no body for HEAD, 1xx, 204 and 304. Anything
//! malformed from the upstream is an error, never a panic.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use super::tls::{self, Stream};
use crate::body::{Body, BoxError};
use crate::http1::{
    decode_chunk, parse_length, tokens, write_field, ChunkState, Decoded, LazyDeadline, Peer,
};
use crate::proxy::headers::Forwarding;

mod upload;
use upload::{Upload, UploadError};

/// Largest response head accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
// `parse_head` keeps header offsets in u16.
const _: () = assert!(MAX_HEAD <= 1 << 16);
/// Most response headers accepted from an upstream.
const MAX_HEADERS: usize = 128;
/// How failures caused by the client's request body begin (they say nothing about the
/// upstream's health and are never retried).
pub const CLIENT_BODY_FAILED: &str = "client request body";
/// How a response body ends when the request body going out beside it (full duplex) failed
/// on the client's side: the client's doing, not the upstream's (the endpoint counts no
/// failure, and the access record says which, `code`).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct UploadFailed {
    /// `CLIENT_BODY_FAILED`, `CLIENT_BODY_GONE` or `CLIENT_BODY_STALLED`.
    what: &'static str,
    #[source]
    source: Option<BoxError>,
}

impl UploadFailed {
    /// The failure `watch` saw of a request body that went to an HTTP/2 upstream (which
    /// only says that its stream was reset): the upstream's response breaks off with it.
    pub fn seen_by(watch: &crate::body::BodyWatch) -> UploadFailed {
        let source: Option<BoxError> = if watch.exceeded().is_some() {
            Some(Box::new(crate::body::TooLarge(watch.limit())))
        } else if watch.banned().is_some() {
            Some(Box::new(crate::body::Banned))
        } else {
            None
        };
        UploadFailed {
            what: if watch.client_gone() {
                CLIENT_BODY_GONE
            } else {
                CLIENT_BODY_FAILED
            },
            source,
        }
    }

    /// The error code of the access record: what the same failure before the response
    /// would have been answered with.
    pub fn code(&self) -> &'static str {
        if self.what == CLIENT_BODY_STALLED {
            return "request_timeout";
        }
        if self.what == CLIENT_BODY_GONE {
            return "client_closed";
        }
        let mut cause = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = cause {
            if e.is::<crate::body::TooLarge>() {
                return "payload_too_large";
            }
            if e.is::<crate::body::Banned>() {
                return "banned";
            }
            cause = e.source();
        }
        "bad_request"
    }
}

/// How failures begin whose client went away mid-body (`body::client_gone`): a client
/// abort, not a bad request.
pub const CLIENT_BODY_GONE: &str = "client request body abandoned";
/// The failure of a client's request body that sent nothing for the response timeout.
pub const CLIENT_BODY_STALLED: &str = "client request body stalled";
/// Request bodies up to this size are sent in the same write as the head.
const COALESCE: usize = 16 * 1024;

/// One upstream connection (TCP or TLS).
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    /// The response-head timer, kept with the connection (`head_within`).
    deadline: LazyDeadline,
    /// The last response ended with its head (no body): the connection went back to the
    /// pool at once, so bytes the upstream sent after the head may be in the socket before
    /// the reactor reports them. The next checkout asks the socket itself.
    ended_at_head: bool,
    /// The current exchange got an interim (1xx) response: the upstream has answered, so a
    /// failure after it is never retried.
    interim: bool,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle connections of one endpoint, and how many requests it is serving.
pub struct Pool {
    addr: http::uri::Authority,
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// TLS connector and SNI override, for `https://` endpoints.
    tls: Option<Arc<(TlsConnector, Option<Arc<str>>)>>,
    /// Woken each time a request ends, when the upstream limits connections.
    /// Set at most once: at build, or by a reload that gives the endpoint connection limits
    /// while this pool's requests still run (the new pool's waiters must hear of their ends).
    release: std::sync::OnceLock<Arc<Notify>>,
    /// Requests in flight to this endpoint (until their response body ends). Shared with
    /// every pool of the same endpoint that earlier snapshots built and whose requests still
    /// run: all count against `max_connections` and `least_connections` as one.
    pub in_flight: Arc<AtomicUsize>,
    /// Where response bodies report how they end (passive health), when it is on. Set once,
    /// when the upstream that owns the pool is built.
    report: std::sync::OnceLock<Report>,
}

/// The endpoint a pool's response bodies report to: its health, the upstream's outlier
/// settings, and the upstream itself (held weakly: only a failure needs it, to count the
/// share of the pool already out).
pub(crate) struct Report {
    pub health: Arc<super::health::EndpointHealth>,
    pub outlier: crate::config::OutlierConfig,
    pub upstream: std::sync::Weak<super::Upstream>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

/// Why a request could not be completed.
pub enum SendError {
    /// No connection could be made: nothing was sent, so the request is handed back intact
    /// and may be tried elsewhere.
    Connect {
        error: io::Error,
        request: Box<Request<Body>>,
    },
    /// The response head did not arrive in time (the upstream may have acted on the request).
    /// `request` is handed back (its body possibly consumed) when no response byte arrived.
    Timeout { request: Option<Box<Request<Body>>> },
    /// The connection failed mid-request, or the upstream sent something invalid. `request`
    /// is handed back (its body possibly consumed) when no response byte arrived.
    Failed {
        reason: String,
        request: Option<Box<Request<Body>>>,
    },
}

impl SendError {
    /// A failure with nothing to hand back.
    pub fn failed(reason: impl Into<String>) -> SendError {
        SendError::Failed {
            reason: reason.into(),
            request: None,
        }
    }
}

/// How a pool reaches its endpoint.
pub struct PoolOptions {
    pub max_idle: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// TLS connector and SNI override, for `https://` endpoints.
    pub tls: Option<Arc<(TlsConnector, Option<Arc<str>>)>>,
    /// Woken each time a request ends (only when someone waits for a free endpoint).
    pub release: Option<Arc<Notify>>,
    /// The in-flight count of this endpoint's earlier pools, to go on with (`Pool::in_flight`).
    pub in_flight: Option<Arc<AtomicUsize>>,
}

impl Pool {
    pub fn new(addr: http::uri::Authority, o: PoolOptions) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            idle: Mutex::new(VecDeque::new()),
            max_idle: o.max_idle,
            idle_timeout: o.idle_timeout,
            connect_timeout: o.connect_timeout,
            tls: o.tls,
            release: o.release.map(std::sync::OnceLock::from).unwrap_or_default(),
            in_flight: o.in_flight.unwrap_or_default(),
            report: std::sync::OnceLock::new(),
        })
    }

    /// Has this pool's response bodies report to passive health (`InFlight::arm`).
    pub(crate) fn report_to(&self, report: Report) {
        let _ = self.report.set(report);
    }

    /// Counts one more request in flight unless `max` are already: the slot is held until
    /// the returned guard (moved into the response body) is dropped.
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<InFlight> {
        if max == usize::MAX {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            return Some(InFlight(self.clone(), false));
        }
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(self.clone(), false))
    }

    /// Has this pool's request ends notify `release` too, unless it already notifies one
    /// (a reload's new pool for the same endpoint, whose waiters count this pool's requests).
    pub fn notify_on_release(&self, release: &Arc<Notify>) {
        let _ = self.release.set(release.clone());
    }

    /// Idle connections currently pooled.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// A pooled connection that is still usable, most recently used first.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(Idle { mut conn, since }) = idle.pop_back() {
            let age = since.elapsed();
            if age >= self.idle_timeout {
                // Everything older is expired too.
                idle.clear();
                return None;
            }
            // Closed by the upstream while pooled, or carrying bytes nobody asked for (which
            // the next request would read as its response): not usable.
            if conn.usable() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            // Oldest at the front: drop expired ones and any beyond the limit.
            let now = Instant::now();
            while idle
                .front()
                .is_some_and(|i| now.saturating_duration_since(i.since) >= self.idle_timeout)
                || idle.len() >= self.max_idle
            {
                idle.pop_front();
            }
            idle.push_back(Idle { conn, since: now });
        }
    }

    /// Closes idle connections past the idle timeout (called periodically).
    pub fn sweep(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|i| i.since.elapsed() < self.idle_timeout);
        }
    }

    /// The endpoint this pool connects to.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.addr
    }

    /// Whether connections to this endpoint use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection to the endpoint (TCP, plus TLS for `https://` endpoints).
    pub async fn connect(&self) -> io::Result<Conn> {
        let io = tls::connect(&self.addr, self.tls.as_deref(), self.connect_timeout).await?;
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            deadline: LazyDeadline::default(),
            ended_at_head: false,
            interim: false,
        })
    }
}

impl Conn {
    /// The connection itself (for protocols other than HTTP/1.1).
    pub fn into_stream(self) -> Stream {
        self.io
    }

    /// Whether a pooled connection can carry the next request: the upstream has neither
    /// closed it nor written anything since the last response ended. On plain TCP the
    /// reactor's readiness answers without a system call in the common case (nothing
    /// arrived), and a socket that became readable is peeked. TLS is always read: rustls may
    /// hold decrypted bytes the socket no longer shows (a response longer than it said, read
    /// along with its end), and a late session ticket is consumed there and harmless, while
    /// application data or close_notify is not.
    ///
    /// After a response that ended with its head, the socket is asked with a real
    /// non-blocking peek: the connection went back to the pool as the head was parsed, and a
    /// body the upstream should not have sent (to a HEAD, after a 204) may have arrived since
    /// without the reactor having seen it yet.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        if std::mem::take(&mut self.ended_at_head) {
            // (Over TLS, bytes here may be a late session ticket: not reusing then only
            // costs a handshake.)
            if !nothing_to_read(self.io.tcp()) {
                return false;
            }
            if matches!(self.io, Stream::Tcp(_)) {
                return true;
            }
        }
        if let Stream::Tcp(tcp) = &self.io {
            match tcp.poll_read_ready(&mut cx) {
                Poll::Pending => return true,
                Poll::Ready(Err(_)) => return false,
                Poll::Ready(Ok(())) => {}
            }
        }
        let mut probe = [0u8; 64];
        let mut rb = ReadBuf::new(&mut probe);
        let polled = match &mut self.io {
            Stream::Tcp(tcp) => tcp.poll_peek(&mut cx, &mut rb).map_ok(|_| ()),
            tls => Pin::new(tls).poll_read(&mut cx, &mut rb),
        };
        // Pending: nothing for the application (the readiness was stale, or a TLS handshake
        // message was consumed). Ready: EOF, an error, or unsolicited bytes.
        polled.is_pending()
    }
}

/// Whether a socket has nothing to read and is not closed: one `recv(MSG_PEEK |
/// MSG_DONTWAIT)`, whatever the reactor last saw.
fn nothing_to_read(tcp: &tokio::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut probe = [0u8; 1];
    // SAFETY: a one-byte peek into a buffer we own, on a descriptor `tcp` keeps open.
    let n = unsafe {
        libc::recv(
            tcp.as_raw_fd(),
            probe.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

/// Sends `req` (origin-form URI, headers already prepared) to the pool's endpoint and returns
/// the response with a body that streams from the connection. `guard` is the request's
/// in-flight slot on this pool (see `Pool::try_acquire`); the body keeps it until it ends.
pub async fn send(
    pool: &Arc<Pool>,
    req: Request<Body>,
    forwarding: Option<&Forwarding>,
    timeout: Duration,
    guard: InFlight,
) -> Result<Response<Body>, SendError> {
    let (parts, mut body) = req.into_parts();
    let (head, chunked) = encode_head(&parts, &pool.addr, forwarding, &body);
    // A body in memory (buffered by the forwarder for retries) can be sent again as it is.
    let in_memory = match &body {
        Body::Full(Some(b)) => Some(b.clone()),
        _ => None,
    };
    let replayable = body.is_end_stream() || in_memory.is_some();
    // Sent again after the upstream may have acted on it only if repeating it is harmless.
    let idempotent = parts.method.is_idempotent();
    let head_only = parts.method == Method::HEAD;

    // A new connection's future (TCP connect, TLS handshake: ~1.3 KiB) is boxed: inline, it
    // made this future, and every request's pipeline future around it, that much larger,
    // for the few requests that do not find a pooled connection.
    let (mut conn, mut reused) = match pool.checkout() {
        Some(c) => (c, true),
        None => match Box::pin(pool.connect()).await {
            Ok(c) => (c, false),
            Err(error) => {
                return Err(SendError::Connect {
                    error,
                    request: Box::new(Request::from_parts(parts, body)),
                })
            }
        },
    };

    loop {
        match exchange(&mut conn, &head, chunked, &mut body, head_only, timeout).await {
            Ok((resp, framing, upload)) => {
                return Ok(resp.map(|_| {
                    // Boxed: every move of a request or response carries a `Body`, which
                    // the inline `ResponseBody` made 168 bytes.
                    Body::Upstream(Box::new(ResponseBody::new(
                        conn,
                        framing,
                        upload,
                        pool.clone(),
                        guard,
                        timeout,
                    )))
                }));
            }
            // A pooled connection the upstream closed just before we used it: try once more
            // on a fresh one, which is only safe if no body bytes were consumed, and, when
            // the request was written whole before the close, if the method is idempotent
            // (RFC 9110 §9.2.2: the upstream may have acted on it).
            Err(Exchange::Stale { written })
                if reused && replayable && (!written || idempotent) =>
            {
                reused = false;
                if let Some(b) = &in_memory {
                    body = Body::Full(Some(b.clone()));
                }
                conn = match Box::pin(pool.connect()).await {
                    Ok(c) => c,
                    Err(error) => {
                        drop(guard);
                        // (A request the upstream may have seen is idempotent here, so
                        // handing it back for another endpoint is safe.)
                        return Err(SendError::Connect {
                            error,
                            request: Box::new(Request::from_parts(parts, body)),
                        });
                    }
                };
            }
            Err(e) => {
                drop(guard);
                // Nothing of a response arrived: hand the request back for a possible retry.
                let request = (conn.buf.is_empty() && !conn.interim)
                    .then(|| Box::new(Request::from_parts(parts, body)));
                return Err(match e {
                    Exchange::Stale { .. } => SendError::Failed {
                        reason: "upstream closed the connection before responding".into(),
                        request,
                    },
                    Exchange::Timeout => SendError::Timeout { request },
                    Exchange::Failed(reason) => SendError::Failed { reason, request },
                });
            }
        }
    }
}

/// One health-check request on a fresh connection: writes `head` and returns the status.
pub async fn probe(pool: &Pool, head: &[u8], timeout: Duration) -> Result<StatusCode, String> {
    let fut = async {
        let mut conn = pool.connect().await.map_err(|e| e.to_string())?;
        conn.io
            .write_all(head)
            .await
            .map_err(|e| format!("writing the check: {e}"))?;
        conn.io
            .flush()
            .await
            .map_err(|e| format!("writing the check: {e}"))?;
        match read_head(&mut conn, true).await {
            Ok((resp, _)) => Ok(resp.status()),
            Err(Exchange::Stale { .. }) => Err("connection closed without a response".to_string()),
            Err(Exchange::Timeout) => Err("timed out".to_string()),
            Err(Exchange::Failed(m)) => Err(m),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no response within {timeout:?}")),
    }
}

enum Exchange {
    /// EOF or reset before any response byte; `written` when the whole request had been
    /// written (the upstream may have acted on it), not when the write itself failed.
    Stale {
        written: bool,
    },
    Timeout,
    Failed(String),
}

/// Writes the request and reads the response head. With a body, the exchange sends it
/// while it watches for an answer (`poll_answer`): an error answer ends the upload, and a
/// final 2xx or 3xx head is returned at once with the rest of the upload, which the
/// response body then drives beside its own reads (full duplex).
async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    chunked: bool,
    body: &mut Body,
    head_only: bool,
    timeout: Duration,
) -> Result<(Response<()>, Framing, Option<Box<Upload>>), Exchange> {
    conn.interim = false;
    if body.is_end_stream() && !chunked {
        // No body (most requests): the head goes as it is, without a copy.
        write_all(conn, head, timeout, false).await?;
        let (resp, framing) = head_within(conn, head_only, timeout).await?;
        return Ok((resp, framing, None));
    }
    // Boxed: inline, the upload's state would make this future, and every request's
    // pipeline future around it, larger for bodyless requests too (+180 instructions per
    // request in copies).
    Box::pin(exchange_body(conn, head, chunked, body, head_only, timeout)).await
}

/// `exchange` for a request with a body.
async fn exchange_body(
    conn: &mut Conn,
    head: &[u8],
    chunked: bool,
    body: &mut Body,
    head_only: bool,
    timeout: Duration,
) -> Result<(Response<()>, Framing, Option<Box<Upload>>), Exchange> {
    let mut upload = Upload::new(head, std::mem::take(body), chunked, timeout);
    let sent = std::future::poll_fn(|cx| {
        // The answer first: once the upstream has answered, it either wants no more of the
        // body or gets it beside the response.
        if let Poll::Ready(answer) = poll_answer(conn, cx) {
            return Poll::Ready(Err(answer));
        }
        upload.poll_send(conn, cx).map(Ok)
    })
    .await;
    let failure = match sent {
        Ok(Ok(())) => {
            *body = upload.into_body();
            let (resp, framing) = head_within(conn, head_only, timeout).await?;
            return Ok((resp, framing, None));
        }
        // A final 2xx or 3xx head while the body is still going out (an echo, a
        // transcoder, an upload with progress events): the client gets the response now,
        // and the body goes on from the response body. Waiting for the whole upload first
        // would deadlock with an upstream that stops reading while its answer is unread.
        Err(Answer::Final) => {
            let (resp, framing) = head_within(conn, head_only, timeout).await?;
            return Ok((resp, framing, Some(Box::new(upload))));
        }
        // An early error answer (a 413, a 401 on the head): the client gets it now, not
        // after its whole upload or the response timeout (an upstream that stopped reading
        // held the write until then). The request went out incomplete, so the connection
        // ends with this response.
        Err(Answer::Error) => {
            *body = upload.into_body();
            let (resp, framing) = head_within(conn, head_only, timeout).await?;
            return Ok((resp, framing.final_on_connection(), None));
        }
        Ok(Err(e)) => {
            *body = upload.into_body();
            e
        }
    };
    let failure = match failure {
        UploadError::Write { error, first: true } if is_stale(&error) => {
            return Err(Exchange::Stale { written: false })
        }
        // An upstream that took no byte of the request for the response timeout did not
        // answer in time (a 504, as nginx's `proxy_send_timeout` gives), rather than answer
        // wrongly.
        UploadError::UpstreamStalled => Exchange::Timeout,
        other => Exchange::Failed(other.to_string()),
    };
    // The upstream may have answered early (e.g. 413, or a 200 without reading the body)
    // and closed: read what it said, starting with what the watch already read.
    match tokio::time::timeout(Duration::from_millis(100), read_head(conn, head_only)).await {
        // The request went out incomplete: the upstream may still be waiting for the rest
        // of its body, and would read the next request as that body. This connection ends
        // with this response.
        Ok(Ok((resp, framing))) => Ok((resp, framing.final_on_connection(), None)),
        _ => Err(failure),
    }
}

/// `read_head`, given `timeout` to complete, on the connection's own timer (`LazyDeadline`:
/// a connection answering promptly touches the timer wheel about once per `timeout`, not
/// once per request).
async fn head_within(
    conn: &mut Conn,
    head_only: bool,
    timeout: Duration,
) -> Result<(Response<()>, Framing), Exchange> {
    let due = tokio::time::Instant::now() + timeout;
    let mut deadline = std::mem::take(&mut conn.deadline);
    let res = {
        let read = read_head(conn, head_only);
        tokio::pin!(read);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = std::future::Future::poll(read.as_mut(), cx) {
                return Poll::Ready(r);
            }
            deadline
                .poll_until(due, cx)
                .map(|()| Err(Exchange::Timeout))
        })
        .await
    };
    conn.deadline = deadline;
    res
}

/// Body pieces taken from the client together, waiting to go upstream as one.
#[derive(Default)]
struct Ready {
    pieces: Vec<Bytes>,
    len: usize,
}

impl Ready {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        self.pieces.push(data);
    }

    /// Appends the pieces to `out`, as one chunk when `chunked`.
    fn seal(&mut self, out: &mut Vec<u8>, chunked: bool) {
        if self.len == 0 {
            return;
        }
        if chunked {
            chunk_line(out, self.len);
        }
        for piece in self.pieces.drain(..) {
            out.extend_from_slice(&piece);
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        self.len = 0;
    }
}

/// A chunk's size line, written into the buffer (not through a `String` per chunk).
fn chunk_line(out: &mut Vec<u8>, len: usize) {
    let _ = std::io::Write::write_fmt(out, format_args!("{len:x}\r\n"));
}

/// How the upstream answered while the request body is still being sent.
enum Answer {
    /// An error response, or the start of one, or bytes that are no response (the reader
    /// reports those): the upload stops (RFC 9112 §9.5).
    Error,
    /// A complete final 2xx or 3xx head: the response starts now, and the upload goes on
    /// beside it.
    Final,
}

/// Whether the upstream has answered while the request is still being sent: `Ready` once
/// `conn.buf` holds the start of a 4xx or 5xx response or a complete 2xx or 3xx head (an
/// interim `100 Continue` is taken off the buffer and noted in `conn.interim`). Reads only
/// what the socket reports readable. An EOF or error is left for the write to run into (it
/// fails there, as it always did), so this stays `Pending`.
fn poll_answer(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<Answer> {
    loop {
        if !conn.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut headers);
            let status = parsed.parse(&conn.buf);
            let interim = parsed
                .code
                .is_some_and(|c| (100..200).contains(&c) && c != 101);
            let small = conn.buf.len() <= MAX_HEAD;
            match (status, parsed.code) {
                // Interim responses do not end the request (a `100 Continue` is what the
                // body waits for).
                (Ok(httparse::Status::Complete(len)), _) if interim => {
                    let _ = conn.buf.split_to(len);
                    conn.interim = true;
                    continue;
                }
                // Until the status code is in, or while an interim head is incomplete, it
                // is too early to tell: read on (within the head's size limit).
                (Ok(httparse::Status::Partial), None) if small => {}
                (Ok(httparse::Status::Partial), Some(_)) if interim && small => {}
                // An early 2xx or 3xx does not say the upstream wants no more of the body
                // (RFC 9112 §9.5 has the client stop for an error response only): once its
                // head is whole, the response starts and the body goes on beside it.
                (Ok(httparse::Status::Complete(_)), Some(c)) if (200..400).contains(&c) => {
                    return Poll::Ready(Answer::Final)
                }
                (Ok(httparse::Status::Partial), Some(c)) if (200..400).contains(&c) && small => {}
                // An error response, or the start of one, or bytes that are no response (the
                // reader reports those).
                _ => return Poll::Ready(Answer::Error),
            }
        }
        if let Stream::Tcp(tcp) = &conn.io {
            if tcp.poll_read_ready(cx).is_pending() {
                return Poll::Pending;
            }
        }
        conn.buf.reserve(8 * 1024);
        let mut rb = ReadBuf::uninit(conn.buf.spare_capacity_mut());
        match Pin::new(&mut conn.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                let n = rb.filled().len();
                // SAFETY: `poll_read` initialized `n` bytes of the spare capacity.
                unsafe { conn.buf.set_len(conn.buf.len() + n) };
            }
            // EOF or an error: the write will fail on it. Nothing arrived: wait.
            _ => return Poll::Pending,
        }
    }
}

/// Writes `data`; on TLS also flushes, since tokio-rustls may report bytes written that it
/// still holds when the socket is full, and nothing else would push them out while we wait
/// for the response.
async fn write_all(
    conn: &mut Conn,
    data: &[u8],
    timeout: Duration,
    sent_any: bool,
) -> Result<(), Exchange> {
    let write = async {
        conn.io.write_all(data).await?;
        if matches!(conn.io, Stream::Tls(_)) {
            conn.io.flush().await?;
        }
        Ok::<(), io::Error>(())
    };
    let mut write = std::pin::pin!(write);
    // A request head nearly always fits the socket at once: tried first without a timer
    // (a timer costs a clock read and a wheel entry, added and removed). Polled again
    // below with the task's waker if it could not finish.
    let result = match write.as_mut().now_or_never() {
        Some(done) => Ok(done),
        None => tokio::time::timeout(timeout, write).await,
    };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if !sent_any && is_stale(&e) => Err(Exchange::Stale { written: false }),
        Ok(Err(e)) => Err(Exchange::Failed(format!("writing to upstream: {e}"))),
        // (No answer in time, as in `exchange_body`.)
        Err(_) => Err(Exchange::Timeout),
    }
}

fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// The request line and headers, with Wraith's own framing header last, and whether that
/// framing is chunked (decided here, never read back from the bytes: a client's header value
/// could end the same way).
fn encode_head(
    parts: &http::request::Parts,
    upstream: &http::uri::Authority,
    forwarding: Option<&Forwarding>,
    body: &Body,
) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(
        256 + parts.headers.len() * 32 + forwarding.map_or(0, Forwarding::encoded_len),
    );
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // An absolute-form target with an empty path (`http://h?x=1`) keeps its path-and-query
    // as `?x=1`; routing saw the path `/`, and origin form needs it written.
    if pq.starts_with('?') {
        out.push(b'/');
    }
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    for (name, value) in &parts.headers {
        has_host |= name == header::HOST;
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || forwarding.is_some_and(|f| f.replaces(name))
        {
            continue;
        }
        write_field(&mut out, name, value);
    }
    if !has_host {
        // HTTP/1.0 clients may leave Host out; HTTP/1.1 requires it (RFC 9112 §3.2). Like
        // nginx's default `$proxy_host`: the endpoint.
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(upstream.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(f) = forwarding {
        f.write(&mut out);
    }
    let had_length = parts.headers.contains_key(header::CONTENT_LENGTH);
    let mut chunked = false;
    if body.is_end_stream() {
        if had_length || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        chunked = true;
    }
    out.extend_from_slice(b"\r\n");
    (out, chunked)
}

/// How the response body is delimited.
#[derive(Debug)]
enum Framing {
    Empty { reusable: bool },
    Length { remaining: u64, reusable: bool },
    Chunked { reusable: bool },
    UntilClose,
    Upgrade,
}

impl Framing {
    /// The same framing on a connection that must not carry another request.
    fn final_on_connection(self) -> Framing {
        match self {
            Framing::Empty { .. } => Framing::Empty { reusable: false },
            Framing::Length { remaining, .. } => Framing::Length {
                remaining,
                reusable: false,
            },
            Framing::Chunked { .. } => Framing::Chunked { reusable: false },
            other => other,
        }
    }
}

/// Reads and parses the response head, skipping interim (1xx) responses other than 101.
async fn read_head(conn: &mut Conn, head_only: bool) -> Result<(Response<()>, Framing), Exchange> {
    let mut first = !conn.interim;
    loop {
        if !conn.buf.is_empty() {
            if let Some((resp, framing)) =
                parse_head(&mut conn.buf, head_only).map_err(Exchange::Failed)?
            {
                if resp.status().is_informational()
                    && resp.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    first = false;
                    conn.interim = true;
                    continue;
                }
                return Ok((resp, framing));
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(Exchange::Failed(format!(
                    "upstream response head larger than {MAX_HEAD} bytes"
                )));
            }
        }
        conn.buf.reserve(8 * 1024);
        match conn.io.read_buf(&mut conn.buf).await {
            Ok(0) if first && conn.buf.is_empty() => return Err(Exchange::Stale { written: true }),
            Ok(0) => {
                return Err(Exchange::Failed(
                    "upstream closed the connection mid-response".into(),
                ))
            }
            Ok(_) => {}
            Err(e) if first && conn.buf.is_empty() && is_stale(&e) => {
                return Err(Exchange::Stale { written: true })
            }
            Err(e) => return Err(Exchange::Failed(format!("reading from upstream: {e}"))),
        }
    }
}

/// Parses a complete head off the front of `buf`; `None` if more bytes are needed.
fn parse_head(
    buf: &mut BytesMut,
    head_only: bool,
) -> Result<Option<(Response<()>, Framing)>, String> {
    // Uninitialised: an initialised array of MAX_HEADERS headers is a 4 KiB memset per
    // response, more than the whole parse.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!(
                "upstream sent more than {MAX_HEADERS} response headers"
            ))
        }
        Err(e) => return Err(format!("invalid response from upstream: {e}")),
    };
    if len > MAX_HEAD {
        return Err(format!(
            "upstream response head larger than {MAX_HEAD} bytes"
        ));
    }
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
        .map_err(|_| "invalid status code from upstream".to_string())?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Remember where each header sits, then take the head out of the buffer as one `Bytes`
    // and slice names and values out of it without copying (and without a heap list).
    // Offsets fit in u16: the head is at most MAX_HEAD (64 KiB) long.
    let base = buf.as_ptr() as usize;
    let count = parsed.headers.len();
    let offset = |p: *const u8, l: usize| (((p as usize) - base) as u16, l as u16);
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
        let (ns, nl) = offset(h.name.as_ptr(), h.name.len());
        let (vs, vl) = offset(h.value.as_ptr(), h.value.len());
        *span = (ns, nl, vs, vl);
    }
    // Framing facts straight from the raw headers (no map lookups afterwards).
    let mut facts = Facts::default();
    for h in parsed.headers.iter() {
        facts.note(h.name.as_bytes(), h.value);
    }
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    // Hop-by-hop headers stay out of the response map (RFC 9110 §7.6.1), except on a 101,
    // whose `Upgrade` the client needs. When `Connection` names other headers (rare), the
    // map takes everything and `strip_hop_by_hop` sorts it out below.
    let skip_hop_by_hop = !upgrade && !facts.connection_names;
    let head = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(count);
    for &(ns, nl, vs, vl) in &spans[..count] {
        let (ns, nl, vs, vl) = (
            usize::from(ns),
            usize::from(nl),
            usize::from(vs),
            usize::from(vl),
        );
        let raw = &head[ns..ns + nl];
        let (name, hop_by_hop) = match common_name(raw) {
            Some(known) => known,
            None => {
                let name = HeaderName::from_bytes(raw).map_err(|_| {
                    format!(
                        "invalid header name {:?} from upstream",
                        String::from_utf8_lossy(raw)
                    )
                })?;
                let hop_by_hop = crate::proxy::headers::is_hop_by_hop(&name);
                (name, hop_by_hop)
            }
        };
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), which must not pass on.
        if (skip_hop_by_hop && hop_by_hop)
            || (facts.transfer_coding.is_some() && name == header::CONTENT_LENGTH)
        {
            continue;
        }
        map.append(name, crate::http1::parsed_value(head.slice(vs..vs + vl)));
    }
    if !skip_hop_by_hop && !upgrade {
        crate::proxy::headers::strip_hop_by_hop(&mut map, false, false);
    }

    // Transfer-Encoding beside Content-Length, or on HTTP/1.0 (which has no chunked coding),
    // is faulty framing: the body is read as Transfer-Encoding says, and the connection is
    // not trusted with another request (RFC 9112 §6.1, §6.3).
    let faulty = facts.transfer_coding.is_some()
        && (facts.content_length.is_some() || version == Version::HTTP_10);
    let keep_alive = !faulty
        && if version == Version::HTTP_10 {
            facts.keep_alive && !facts.close
        } else {
            !facts.close
        };
    let framing = if upgrade {
        Framing::Upgrade
    } else if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        // No body follows, whatever the head says; but an upstream whose head announces one
        // (a HEAD answered with the GET's Content-Length, a 304 with the representation's)
        // may be an application that writes it anyway, after the head. Those bytes would be
        // the next request's response on a reused connection (a response desync across
        // clients), so such a connection is not reused. HEAD is rare; most 304s and 204s
        // carry no framing header at all.
        let announces_body = facts.transfer_coding.is_some()
            || facts
                .content_length
                .as_ref()
                .is_some_and(|n| n.as_ref().map_or(true, |&n| n > 0));
        Framing::Empty {
            reusable: keep_alive && !announces_body,
        }
    } else if let Some(coding) = facts.transfer_coding {
        // Another coding (`gzip, chunked`; `gzip`, whose body RFC 9112 §6.3 runs to the
        // close) would reach the client still coded with nothing left to say so
        // (Transfer-Encoding is hop-by-hop, and HTTP/2 has none): corrupted content, and
        // cached as such downstream. Refused, as nginx does.
        coding?;
        Framing::Chunked {
            reusable: keep_alive,
        }
    } else if let Some(n) = facts.content_length {
        Framing::Length {
            remaining: n?,
            reusable: keep_alive,
        }
    } else {
        Framing::UntilClose
    };
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = map;
    Ok(Some((resp, framing)))
}

/// The response header names upstreams send most, as they send them (nginx, Apache, Go and
/// Node capitalize; others send lowercase), without `HeaderName::from_bytes`'s lower-casing
/// pass, and whether each is hop-by-hop (what `is_hop_by_hop` would say); `None` for
/// anything else.
fn common_name(raw: &[u8]) -> Option<(HeaderName, bool)> {
    let end_to_end = match raw {
        b"Connection" | b"connection" => return Some((header::CONNECTION, true)),
        b"Transfer-Encoding" | b"transfer-encoding" => {
            return Some((header::TRANSFER_ENCODING, true))
        }
        b"Date" | b"date" => header::DATE,
        b"Server" | b"server" => header::SERVER,
        b"Content-Type" | b"content-type" => header::CONTENT_TYPE,
        b"Content-Length" | b"content-length" => header::CONTENT_LENGTH,
        b"Last-Modified" | b"last-modified" => header::LAST_MODIFIED,
        b"ETag" | b"Etag" | b"etag" => header::ETAG,
        b"Accept-Ranges" | b"accept-ranges" => header::ACCEPT_RANGES,
        b"Cache-Control" | b"cache-control" => header::CACHE_CONTROL,
        b"Content-Encoding" | b"content-encoding" => header::CONTENT_ENCODING,
        b"Vary" | b"vary" => header::VARY,
        b"Expires" | b"expires" => header::EXPIRES,
        b"Location" | b"location" => header::LOCATION,
        b"Set-Cookie" | b"set-cookie" => header::SET_COOKIE,
        _ => return None,
    };
    Some((end_to_end, false))
}

/// What a response head says about its framing and its connection, read from the raw
/// header lines.
#[derive(Default)]
struct Facts {
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive` (what an HTTP/1.0 response needs to be reusable).
    keep_alive: bool,
    /// `Connection` names other headers (hop-by-hop for this message).
    connection_names: bool,
    /// Transfer-Encoding present: `Ok` if it is `chunked` alone, or why it cannot be read
    /// (only an error if the response has a body).
    transfer_coding: Option<Result<(), String>>,
    /// Content-Length present: its value, or why it cannot be used (only an error if the
    /// framing comes down to it).
    content_length: Option<Result<u64, String>>,
}

impl Facts {
    fn note(&mut self, name: &[u8], value: &[u8]) {
        if is(name, b"Connection", b"connection") {
            for token in tokens(value) {
                if is(token, b"close", b"close") {
                    self.close = true;
                } else if is(token, b"keep-alive", b"keep-alive") {
                    self.keep_alive = true;
                } else {
                    self.connection_names = true;
                }
            }
        } else if is(name, b"Transfer-Encoding", b"transfer-encoding") {
            // Only `chunked` alone, in one header, is decodable: any other coding (`gzip,
            // chunked`), `chunked` twice, an empty or non-ASCII value, or a second header
            // makes it `Some(false)`.
            let mut codings = tokens(value);
            let chunked_alone = value.is_ascii()
                && codings
                    .next()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
                && codings.next().is_none();
            self.transfer_coding = Some(match self.transfer_coding.take() {
                None if chunked_alone => Ok(()),
                Some(Err(e)) => Err(e),
                _ => Err(format!(
                    "upstream sent a Transfer-Encoding other than chunked alone ({:?})",
                    String::from_utf8_lossy(value)
                )),
            });
        } else if is(name, b"Content-Length", b"content-length") {
            // Several values (in one header or many) must agree (RFC 9110 §8.6).
            // (An empty value is one empty part: invalid.)
            for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let n = parse_length(part).ok_or_else(|| {
                    format!(
                        "invalid Content-Length {:?} from upstream",
                        String::from_utf8_lossy(part)
                    )
                });
                self.content_length = Some(match (self.content_length.take(), n) {
                    (Some(Err(e)), _) | (_, Err(e)) => Err(e),
                    (Some(Ok(a)), Ok(b)) if a != b => {
                        Err("conflicting Content-Length values from upstream".into())
                    }
                    (_, Ok(b)) => Ok(b),
                });
            }
        }
    }
}

/// Whether `word` is `lower` in any ASCII case: first as `usual` or `lower`, the spellings
/// upstreams send (a comparison of a word or two each, where the case-blind one goes byte by
/// byte: ~200 instructions per response head over its `Connection` and `Content-Length`).
#[inline]
fn is(word: &[u8], usual: &[u8], lower: &[u8]) -> bool {
    word.len() == lower.len()
        && (word == usual || word == lower || word.eq_ignore_ascii_case(lower))
}

/// Counts a request in flight on its endpoint until dropped. Armed (`arm`), it also tells
/// the endpoint's passive health how the response body ended (`Pool::report_to`): a
/// response cut off mid-body is a broken response, as one without a head is.
pub struct InFlight(Arc<Pool>, bool);

impl InFlight {
    /// The response body reports how it ends.
    pub(crate) fn arm(&mut self) {
        self.1 = true;
    }

    /// Nothing to report (the outcome was recorded from the response head).
    pub(crate) fn disarm(&mut self) {
        self.1 = false;
    }

    /// The response body ended, whole (`ok`) or broken; reported once. (A body dropped
    /// before its end, the client gone, reports nothing.)
    pub(crate) fn body_ended(&mut self, ok: bool) {
        if !std::mem::take(&mut self.1) {
            return;
        }
        let Some(report) = self.0.report.get() else {
            return;
        };
        if ok {
            report.health.record_success(&report.outlier);
        } else if let Some(upstream) = report.upstream.upgrade() {
            report.health.record_failure(&upstream);
        }
    }

    /// The response body broke off on the upstream's side (a reset, a close before its end,
    /// a bad chunk, a stall): the client gets a truncated response. Said in the server log
    /// with the endpoint and why, whatever the access-log sinks (nginx's "upstream
    /// prematurely closed connection while reading upstream"), and reported to passive
    /// health.
    pub(crate) fn body_failed(&mut self, error: &dyn std::fmt::Display) {
        let upstream = self.0.report.get().and_then(|r| r.upstream.upgrade());
        tracing::warn!(
            upstream = upstream.as_ref().map_or("-", |u| &*u.config.name),
            endpoint = %self.0.addr,
            error = %error,
            "upstream response body broke off; the client got a truncated response"
        );
        self.body_ended(false);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
        if let Some(n) = self.0.release.get() {
            // Every waiter: the one `notify_one` would pick may have no use for this
            // endpoint (it tried it already), and would swallow the wake-up of one that has.
            // Waiters register before they look (`Upstream::select_waiting`), so none
            // misses it.
            n.notify_waiters();
        }
    }
}

/// A response body read straight from the upstream connection. When it ends cleanly the
/// connection returns to the pool; when it is dropped early the connection is closed.
///
/// After an early 2xx or 3xx head it also carries the rest of the request body (`upload`),
/// sent as it is polled, between its reads: the connection goes back to the pool only if
/// both ended whole. A response that ends first stops the upload and closes the connection;
/// an upload that fails on the client's side ends the response in error (`upload_failed`).
pub struct ResponseBody {
    conn: Option<Conn>,
    /// What is left of the request body, still going to the upstream (full duplex).
    upload: Option<Box<Upload>>,
    /// Stands in for the connection's buffer after the connection is gone.
    spare: BytesMut,
    state: State,
    reusable: bool,
    pool: Arc<Pool>,
    /// The endpoint's in-flight slot, held until the body ends (or, for a 101, by the tunnel).
    in_flight: Option<InFlight>,
    /// Longest wait for the next body byte (the upstream's response timeout, between two
    /// reads, as nginx's `proxy_read_timeout`): a stalled upstream cannot hold the client,
    /// the task and the endpoint's in-flight slot forever. Not counted while an upload goes
    /// on (each of its waits has this timeout): a silence while the request body still
    /// moves is no stall, as on HTTP/2 upstreams (`body::Stall`).
    read_timeout: Duration,
    /// The stall timer: made the first time a read has to wait, then re-armed (never
    /// re-allocated) at each wait that follows progress.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `stall` is counting down for the current wait.
    stall_armed: bool,
    /// Writing the upload failed (a reset, as a rule): the error a read would have reported
    /// went to the write, and the reads see only what was queued and then an end of file,
    /// so a body delimited by the close can no longer be told whole.
    upload_reset: bool,
}

/// What `poll_frame` returns.
type PolledFrame = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

enum State {
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
    Done,
    Upgrade,
}

impl ResponseBody {
    fn new(
        conn: Conn,
        framing: Framing,
        upload: Option<Box<Upload>>,
        pool: Arc<Pool>,
        in_flight: InFlight,
        read_timeout: Duration,
    ) -> ResponseBody {
        let (state, reusable) = match framing {
            Framing::Empty { reusable } => (State::Done, reusable),
            Framing::Length {
                remaining: 0,
                reusable,
            } => (State::Done, reusable),
            Framing::Length {
                remaining,
                reusable,
            } => (State::Length(remaining), reusable),
            Framing::Chunked { reusable } => (State::Chunked(ChunkState::Size), reusable),
            Framing::UntilClose => (State::UntilClose, false),
            Framing::Upgrade => (State::Upgrade, false),
        };
        let mut body = ResponseBody {
            conn: Some(conn),
            upload,
            spare: BytesMut::new(),
            state,
            reusable,
            pool,
            in_flight: Some(in_flight),
            read_timeout,
            stall: None,
            stall_armed: false,
            upload_reset: false,
        };
        if matches!(body.state, State::Done) {
            if let Some(conn) = body.conn.as_mut() {
                conn.ended_at_head = true;
            }
            // (The forwarder records a response that ends with its head.)
            if let Some(slot) = body.in_flight.as_mut() {
                slot.disarm();
            }
            body.finish();
        }
        body
    }

    /// The in-flight slot, for the forwarder to disarm its report.
    pub(crate) fn in_flight_mut(&mut self) -> Option<&mut InFlight> {
        self.in_flight.as_mut()
    }

    /// For a 101 response: the raw upstream connection and any bytes already read from it.
    /// The endpoint's in-flight slot comes along: a tunnel is a connection to the endpoint
    /// for as long as it lasts (`max_connections`, `least_connections`).
    pub fn take_upgrade(&mut self) -> Option<(Stream, Bytes, InFlight)> {
        if !matches!(self.state, State::Upgrade) {
            return None;
        }
        self.state = State::Done;
        let conn = self.conn.take()?;
        let slot = self.in_flight.take()?;
        Some((conn.io, conn.buf.freeze(), slot))
    }

    /// The body ended: hand the connection back if it can carry another request (not if
    /// the request body is still unsent: the upstream would read the next request as its
    /// rest).
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(slot) = self.in_flight.as_mut() {
            slot.body_ended(true);
        }
        let unsent = self.upload.take().is_some();
        if let Some(conn) = self.conn.take() {
            if self.reusable && conn.buf.is_empty() && !unsent {
                self.pool.checkin(conn);
            }
        }
    }

    /// `finish`, after a last turn of the upload: its end may be ready now (the client's
    /// end of stream, the chunked terminator), and only a whole request lets the connection
    /// be reused.
    fn finish_polled(&mut self, cx: &mut Context<'_>) {
        if self.upload.is_some() {
            // (A failure now changes nothing for the response: it is whole.)
            let _ = self.poll_upload(cx);
        }
        self.finish();
    }

    /// Sends more of the request body, if any is left; `Err` if the upload failed.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), UploadError> {
        let (Some(upload), Some(conn)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return Ok(());
        };
        match upload.poll_send(conn, cx) {
            Poll::Ready(Ok(())) => {
                self.upload = None;
                Ok(())
            }
            Poll::Ready(Err(e)) => {
                self.upload = None;
                // The request went out incomplete: the upstream may still wait for the rest
                // of its body and would read the next request on this connection as that
                // rest (a failure on the response's last turn, `finish_polled`, must not
                // let it go back to the pool).
                self.reusable = false;
                Err(e)
            }
            Poll::Pending => Ok(()),
        }
    }

    /// The upload failed after the response started; `Some` with the response's end when
    /// that cuts it off.
    ///
    /// A failure of the client's body cuts the response off (the client sees it end in
    /// error, never a clean end): the upstream, left waiting for the rest of the request,
    /// may never finish its answer. It is the client's doing (`UploadFailed`: no mark
    /// against the endpoint). A failure on the upstream's side (it reset the connection, or
    /// took no byte for the timeout) only ends the upload: an upstream that answered early
    /// and closed without reading the rest, as RFC 9112 §9.5 lets it, may have sent its
    /// whole answer, already in the socket. The response is read on to its own end or
    /// failure (each wait bounded by the read timeout again), and the connection is not
    /// reused (`poll_upload`).
    fn upload_failed(&mut self, e: UploadError) -> Option<PolledFrame> {
        let client = match e {
            UploadError::Client { what, error } => UploadFailed {
                what,
                source: Some(error),
            },
            UploadError::ClientStalled => UploadFailed {
                what: CLIENT_BODY_STALLED,
                source: None,
            },
            upstream => {
                tracing::debug!(error = %upstream, "the upstream stopped taking the request body while its response streamed; the response is read on");
                self.upload_reset = matches!(upstream, UploadError::Write { .. });
                return None;
            }
        };
        tracing::debug!(error = %crate::upstream::forwarder::error_chain(&client), "the client's request body failed while the response streamed");
        if let Some(slot) = self.in_flight.as_mut() {
            slot.disarm();
        }
        self.state = State::Done;
        self.conn = None;
        Some(Poll::Ready(Some(Err(client.into()))))
    }

    fn fail(&mut self, msg: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let msg = msg.into();
        self.state = State::Done;
        self.conn = None;
        if let Some(slot) = self.in_flight.as_mut() {
            slot.body_failed(&msg);
        }
        Poll::Ready(Some(Err(msg.into())))
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if conn.buf.capacity() - conn.buf.len() < 4096 {
            conn.buf.reserve(64 * 1024);
        }
        let dst = conn.buf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(dst);
        match Pin::new(&mut conn.io).poll_read(cx, &mut rb) {
            Poll::Ready(r) => r?,
            Poll::Pending if self.upload.is_some() => {
                // The upload's own waits bound this one.
                self.stall_armed = false;
                return Poll::Pending;
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + self.read_timeout;
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !self.stall_armed {
                    stall.as_mut().reset(deadline);
                    self.stall_armed = true;
                }
                ready!(stall.poll_unpin(cx));
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("upstream sent no body bytes for {:?}", self.read_timeout),
                )));
            }
        }
        let n = rb.filled().len();
        // SAFETY: `poll_read` initialized `n` bytes of the spare capacity.
        unsafe { conn.buf.set_len(conn.buf.len() + n) };
        // Progress: the next wait gets the whole timeout again.
        self.stall_armed = false;
        Poll::Ready(Ok(n))
    }

    /// Bytes buffered from the connection (empty once the connection is gone).
    fn buf(&mut self) -> &mut BytesMut {
        match self.conn.as_mut() {
            Some(c) => &mut c.buf,
            None => &mut self.spare,
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before the end: the connection is mid-message and cannot be reused.
        self.conn = None;
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.upload.is_some() && !matches!(this.state, State::Done) {
            if let Err(e) = this.poll_upload(cx) {
                if let Some(cut) = this.upload_failed(e) {
                    return cut;
                }
            }
        }
        loop {
            match this.state {
                State::Done | State::Upgrade => return Poll::Ready(None),
                State::Length(remaining) => {
                    if this.conn.as_ref().is_some_and(|c| !c.buf.is_empty()) {
                        let buf = this.buf();
                        let n = (buf.len() as u64).min(remaining) as usize;
                        let data = buf.split_to(n).freeze();
                        let left = remaining - n as u64;
                        if left == 0 {
                            this.finish_polled(cx);
                        } else {
                            this.state = State::Length(left);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_fill(cx)) {
                        Ok(0) => {
                            return this
                                .fail("upstream closed the connection before the end of the body")
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(format!("reading upstream body: {e}")),
                    }
                }
                State::UntilClose => {
                    if this.conn.as_ref().is_some_and(|c| !c.buf.is_empty()) {
                        let data = this.buf().split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_fill(cx)) {
                        // The close is this body's end: a whole response, which passive
                        // health hears of like any other (a success resets the endpoint's
                        // count of failures in a row). The connection is never reused.
                        Ok(0) if this.upload_reset => return this.fail(
                            "upstream reset the connection during a body delimited by its close",
                        ),
                        Ok(0) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(format!("reading upstream body: {e}")),
                    }
                }
                State::Chunked(cs) => {
                    match decode_chunk(cs, this.buf(), Peer::Upstream) {
                        Ok(Decoded::Data(data, next)) => {
                            this.state = State::Chunked(next);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(Decoded::Continue(next)) => {
                            this.state = State::Chunked(next);
                            continue;
                        }
                        Ok(Decoded::End(trailers)) => {
                            this.finish_polled(cx);
                            return match trailers {
                                Some(t) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                                None => Poll::Ready(None),
                            };
                        }
                        Ok(Decoded::NeedMore(next)) => this.state = State::Chunked(next),
                        Err(m) => return this.fail(m),
                    }
                    match ready!(this.poll_fill(cx)) {
                        Ok(0) => {
                            return this
                                .fail("upstream closed the connection inside a chunked body")
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(format!("reading upstream body: {e}")),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done | State::Upgrade => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_in_any_case() {
        for yes in ["Connection", "connection", "CONNECTION", "cOnNeCtIoN"] {
            assert!(is(yes.as_bytes(), b"Connection", b"connection"), "{yes}");
        }
        for no in ["Connectio", "connections", "", "Konnection", "connection "] {
            assert!(!is(no.as_bytes(), b"Connection", b"connection"), "{no}");
        }
    }

    #[test]
    fn response_framing() {
        let parse = |raw: &[u8], head_only| {
            let mut b = BytesMut::from(raw);
            parse_head(&mut b, head_only)
                .map(|r| r.map(|(resp, f)| (resp.status().as_u16(), format!("{f:?}"))))
        };
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false)
                .unwrap()
                .unwrap()
                .1,
            "Length { remaining: 5, reusable: true }"
        );
        // A HEAD's head announcing the GET's body: no body follows, and the connection is
        // not reused (an application that writes the body anyway would desync it).
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true)
                .unwrap()
                .unwrap()
                .1,
            "Empty { reusable: false }"
        );
        for bodyless in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
        ] {
            assert_eq!(
                parse(bodyless, true).unwrap().unwrap().1,
                "Empty { reusable: true }"
            );
        }
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
                false
            )
            .unwrap()
            .unwrap()
            .1,
            // Both framing headers: faulty, the connection is not used again.
            "Chunked { reusable: false }"
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", false)
                .unwrap()
                .unwrap()
                .1,
            "UntilClose"
        );
        // A Transfer-Encoding with no coding cannot be read (nor can the Content-Length
        // beside it be trusted).
        assert!(parse(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: \r\ncontent-length: 3\r\n\r\n",
            false
        )
        .is_err());
        assert_eq!(
            parse(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false)
                .unwrap()
                .unwrap()
                .1,
            "Length { remaining: 1, reusable: false }"
        );
        assert_eq!(
            parse(b"HTTP/1.1 204 No Content\r\n\r\n", false)
                .unwrap()
                .unwrap()
                .1,
            "Empty { reusable: true }"
        );
        assert_eq!(
            parse(
                b"HTTP/1.1 101 Switching\r\nupgrade: websocket\r\n\r\n",
                false
            )
            .unwrap()
            .unwrap()
            .1,
            "Upgrade"
        );
        assert!(parse(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 2000 OK\r\n\r\n", false).is_err());
        assert!(parse(b"garbage\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-le", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn response_heads_leave_hop_by_hop_headers_out() {
        let names = |raw: &[u8]| {
            let mut b = BytesMut::from(raw);
            let (resp, _) = parse_head(&mut b, false).unwrap().unwrap();
            let mut names: Vec<String> = resp.headers().keys().map(|k| k.to_string()).collect();
            names.sort();
            names
        };
        assert_eq!(
            names(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
                  Transfer-Encoding: chunked\r\nContent-Length: 9\r\nProxy-Authenticate: Basic\r\n\
                  Upgrade: h2c\r\nProxy-Connection: close\r\nTE: trailers\r\nX-Kept: 1\r\n\
                  Trailer: grpc-status\r\n\r\n"
            ),
            ["trailer", "x-kept"]
        );
        // Named by Connection: gone too, but never the framing.
        assert_eq!(
            names(
                b"HTTP/1.1 200 OK\r\nConnection: close, X-Secret, Content-Length\r\n\
                  X-Secret: 1\r\nContent-Length: 0\r\nUpgrade: h2c\r\nX-Kept: 1\r\n\r\n"
            ),
            ["content-length", "x-kept"]
        );
        // A 101 keeps what the client's side of the upgrade needs.
        assert_eq!(
            names(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            ["connection", "upgrade"]
        );
        let length = |raw: &[u8]| {
            let mut b = BytesMut::from(raw);
            parse_head(&mut b, false).map(|r| format!("{:?}", r.unwrap().1))
        };
        assert_eq!(
            length(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n")
                .unwrap(),
            "Length { remaining: 5, reusable: true }"
        );
        for bad in ["+5", "", "5 5", "0x5", "99999999999999999999", "5, 6"] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(length(raw.as_bytes()).is_err(), "{bad:?}");
        }
        // Transfer-Encoding decides (an unusable Content-Length beside it does not matter).
        assert_eq!(
            length(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap(),
            "Chunked { reusable: false }"
        );
        assert_eq!(
            length(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\n\r\n").unwrap(),
            "Chunked { reusable: true }"
        );
        // Any coding but `chunked` alone would reach the client still applied: refused.
        for coding in [
            "gzip, chunked",
            "gzip",
            "identity",
            "chunked, chunked",
            "chunked;q=1",
            "",
            "chunked\r\nTransfer-Encoding: chunked",
            "chunked\r\nTransfer-Encoding: gzip",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n");
            assert!(length(raw.as_bytes()).is_err(), "{coding:?}");
        }
        // Unless no body follows (a HEAD's, a 304's head may say what the body would have).
        let mut b = BytesMut::from(
            &b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
        );
        assert_eq!(
            format!("{:?}", parse_head(&mut b, false).unwrap().unwrap().1),
            "Empty { reusable: false }"
        );
        assert_eq!(
            length(
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .unwrap(),
            "Chunked { reusable: false }"
        );
        assert_eq!(
            length(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")
                .unwrap(),
            "Length { remaining: 0, reusable: true }"
        );
    }

    #[test]
    fn common_response_header_names_are_the_parsed_ones() {
        for raw in [
            "Date",
            "date",
            "Server",
            "server",
            "Content-Type",
            "content-type",
            "Content-Length",
            "content-length",
            "Connection",
            "connection",
            "Last-Modified",
            "last-modified",
            "ETag",
            "Etag",
            "etag",
            "Accept-Ranges",
            "accept-ranges",
            "Cache-Control",
            "cache-control",
            "Transfer-Encoding",
            "transfer-encoding",
            "Content-Encoding",
            "content-encoding",
            "Vary",
            "vary",
            "Expires",
            "expires",
            "Location",
            "location",
            "Set-Cookie",
            "set-cookie",
        ] {
            let parsed = HeaderName::from_bytes(raw.as_bytes()).unwrap();
            let hop_by_hop = crate::proxy::headers::is_hop_by_hop(&parsed);
            assert_eq!(
                common_name(raw.as_bytes()),
                Some((parsed, hop_by_hop)),
                "{raw}"
            );
        }
        for other in ["DATE", "X-Date", "Dat", "content_type", ""] {
            assert_eq!(common_name(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn request_heads() {
        let up: http::uri::Authority = "10.0.0.7:8080".parse().unwrap();
        let req = Request::post("http://up/x?y=1")
            .header("host", "example.com")
            .header("content-length", "3")
            .header("expect", "100-continue")
            .body(Body::full("abc"))
            .unwrap();
        let (parts, body) = req.into_parts();
        let head = String::from_utf8(encode_head(&parts, &up, None, &body).0).unwrap();
        assert_eq!(
            head,
            "POST /x?y=1 HTTP/1.1\r\nhost: example.com\r\ncontent-length: 3\r\n\r\n"
        );
        // No Host (an HTTP/1.0 client): the endpoint's, as HTTP/1.1 requires one.
        let req = Request::get("/").body(Body::Empty).unwrap();
        let (parts, body) = req.into_parts();
        assert_eq!(
            String::from_utf8(encode_head(&parts, &up, None, &body).0).unwrap(),
            "GET / HTTP/1.1\r\nhost: 10.0.0.7:8080\r\n\r\n"
        );
        // An empty path before a query is written as `/`.
        let req = Request::get("http://h?x=1")
            .header("host", "h")
            .body(Body::Empty)
            .unwrap();
        let (parts, body) = req.into_parts();
        assert_eq!(
            String::from_utf8(encode_head(&parts, &up, None, &body).0).unwrap(),
            "GET /?x=1 HTTP/1.1\r\nhost: h\r\n\r\n"
        );
        // A client header that ends like the chunked framing header does not make the
        // request chunked (no `0\r\n\r\n` smuggled after a bodyless request).
        let req = Request::get("/")
            .header("host", "h")
            .header("x-a", "transfer-encoding: chunked")
            .body(Body::Empty)
            .unwrap();
        let (parts, body) = req.into_parts();
        let (head, chunked) = encode_head(&parts, &up, None, &body);
        assert!(head.ends_with(b"x-a: transfer-encoding: chunked\r\n\r\n"));
        assert!(!chunked);
    }

    #[test]
    fn forwarding_headers_in_the_head_are_the_ones_the_map_would_carry() {
        use crate::proxy::headers::{forwarding, ForwardInfo};
        let spoofed: &[(&str, &str)] = &[
            ("x-forwarded-for", "6.6.6.6"),
            ("X-Forwarded-For", "7.7.7.7"),
            ("x-real-ip", "1.1.1.1"),
            ("forwarded", "for=6.6.6.6"),
            ("via", "1.0 other"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "evil.example"),
            ("early-data", "0"),
            ("x-request-id", "spoof"),
            ("x-original-url", "/admin"),
            ("X-Forwarded-Port", "1"),
            ("accept", "*/*"),
        ];
        let plain: &[(&str, &str)] = &[("host", "api.example.com")];
        let request = |pairs: &[(&str, &str)]| {
            let mut b = Request::get("/x");
            for (k, v) in pairs {
                b = b.header(*k, *v);
            }
            b.body(Body::Empty).unwrap().into_parts()
        };
        // Header lines, ordered by name only (a stable sort: values of one name keep
        // their order, which matters for Via and X-Forwarded-For).
        let lines = |head: Vec<u8>| {
            let text = String::from_utf8(head).unwrap();
            let mut lines: Vec<String> = text.lines().skip(1).map(String::from).collect();
            lines.sort_by_key(|l| l.split(':').next().unwrap_or("").to_string());
            lines
        };
        let cases = [spoofed, plain].into_iter().flat_map(|pairs| {
            ["10.0.0.2", "2001:db8::2"]
                .into_iter()
                .flat_map(move |peer| {
                    [false, true].into_iter().flat_map(move |trusted| {
                        [false, true].into_iter().flat_map(move |early| {
                            [Some("api.example.com"), Some("[::1]:8443"), None]
                                .into_iter()
                                .map(move |host| (pairs, peer, trusted, early, host))
                        })
                    })
                })
        });
        for (pairs, peer, trusted, early_data, host) in cases {
            let info = ForwardInfo {
                peer: peer.parse().unwrap(),
                client_ip: "203.0.113.7".parse().unwrap(),
                peer_trusted: trusted,
                https: true,
                host,
                version: Version::HTTP_11,
                identity: None,
                early_data,
                close: None,
                max_request_body: None,
                bans: None,
            };
            let (parts, body) = request(pairs);
            let f = forwarding(
                &parts.headers,
                &info,
                &http::HeaderValue::from_static("id-1"),
            );
            let mut alone = Vec::new();
            f.write(&mut alone);
            assert_eq!(alone.len(), f.encoded_len());
            let up: http::uri::Authority = "10.0.0.7:8080".parse().unwrap();
            let written = lines(encode_head(&parts, &up, Some(&f), &body).0);
            let (mut parts, body) = request(pairs);
            f.apply(&mut parts.headers);
            let mapped = lines(encode_head(&parts, &up, None, &body).0);
            assert_eq!(
                written, mapped,
                "{pairs:?} trusted={trusted} early={early_data} {host:?}"
            );
            let has = |l: &str| written.iter().any(|w| w == l);
            assert!(has("x-request-id: id-1"));
            assert!(has("x-real-ip: 203.0.113.7"));
            assert_eq!(has("early-data: 1"), early_data);
            assert!(!has("x-forwarded-proto: gopher") || trusted);
            assert!(!has("x-real-ip: 1.1.1.1"));
            // One line for each header Wraith sets, whatever the client sent.
            let all = |name: &str| -> Vec<&str> {
                written
                    .iter()
                    .filter_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                    .collect()
            };
            let spoofing = pairs == spoofed;
            let chain = if trusted && spoofing {
                format!("6.6.6.6, 7.7.7.7, {peer}")
            } else {
                peer.to_string()
            };
            assert_eq!(all("x-forwarded-for"), [chain.as_str()]);
            assert_eq!(all("x-real-ip"), ["203.0.113.7"]);
            assert_eq!(all("x-request-id"), ["id-1"]);
            let forwarded = all("forwarded");
            assert_eq!(forwarded.len(), 1, "{forwarded:?}");
            assert_eq!(forwarded[0].contains("6.6.6.6"), trusted && spoofing);
            assert!(forwarded[0].contains(peer));
            let xfh = all("x-forwarded-host");
            match (trusted && spoofing, host) {
                (true, _) => assert_eq!(xfh, ["evil.example"]),
                (false, Some(h)) => assert_eq!(xfh, [h]),
                (false, None) => assert!(xfh.is_empty(), "{xfh:?}"),
            }
            // Claims about the original request: only from a trusted proxy.
            for claim in ["x-original-url", "x-forwarded-port"] {
                assert_eq!(
                    all(claim).len(),
                    usize::from(trusted && spoofing),
                    "{claim}"
                );
            }
            let via = all("via");
            assert_eq!(via.last(), Some(&"1.1 wraith"));
            assert_eq!(via.len(), if spoofing { 2 } else { 1 });
            if early_data {
                assert_eq!(all("early-data"), ["1"]);
            }
        }
    }

    /// A pool for the test upstream at `addr`.
    fn pool_to(addr: std::net::SocketAddr) -> Arc<Pool> {
        Pool::new(
            addr.to_string().parse().unwrap(),
            PoolOptions {
                max_idle: 4,
                idle_timeout: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(5),
                tls: None,
                release: None,
                in_flight: None,
            },
        )
    }

    /// Reads off `s` until the end of a request head (and perhaps some body after it).
    async fn read_past_head(s: &mut tokio::net::TcpStream) {
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut tmp = [0u8; 1024];
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0, "closed before the head");
            got.extend_from_slice(&tmp[..n]);
        }
    }

    /// A client's upload of 1 GiB that always has its next 64 KiB ready.
    struct Endless;

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                &[b'x'; 64 * 1024],
            )))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(1 << 30)
        }
    }

    /// Sends an `Endless` upload to `pool` and returns the response, whose head the
    /// upstream sends while the upload goes on.
    async fn upload_to(pool: &Arc<Pool>, timeout: Duration) -> Response<Body> {
        let req = Request::post("/upload")
            .header("host", "up")
            .body(Body::boxed(Endless))
            .unwrap();
        let slot = pool.try_acquire(usize::MAX).unwrap();
        match send(pool, req, None, timeout, slot).await {
            Ok(resp) => resp,
            Err(_) => panic!("no response"),
        }
    }

    /// The next frame of `body`: its data, or its error as text.
    async fn next_data(body: &mut Body) -> Option<Result<Bytes, String>> {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
        Some(match frame {
            Ok(f) => Ok(f.into_data().unwrap_or_default()),
            Err(e) => Err(e.to_string()),
        })
    }

    /// Waits until the peer has acknowledged everything written on `s` (`SIOCOUTQ` is 0):
    /// what was sent is in the peer's socket, and a reset now cannot take it back.
    async fn all_acknowledged(s: &tokio::net::TcpStream) {
        use std::os::fd::AsRawFd;
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: an int-sized query on a descriptor `s` keeps open.
            let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
            assert_eq!(rc, 0, "SIOCOUTQ: {}", io::Error::last_os_error());
            if queued == 0 {
                return;
            }
            // (Nothing to await: acknowledgements are reported to no one.)
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_whole_early_answer_is_read_to_its_end_after_the_upstream_resets_the_upload() {
        // The upstream answers `200` with a page on the head and reads none of the body;
        // once the page is all in the gateway's socket it closes, which with the body unread
        // is a reset (Go's server does this, a moment after answering, when it did not read
        // a large body). The gateway still holds the page's second half when its upload
        // runs into the reset: the page is whole all the same, and must end cleanly.
        const HALF: usize = 16 * 1024;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        let (reset_tx, reset) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_past_head(&mut s).await;
            let mut page = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                2 * HALF
            )
            .into_bytes();
            page.resize(page.len() + HALF, b'a');
            s.write_all(&page).await.unwrap();
            go.await.unwrap();
            s.write_all(&[b'b'; HALF]).await.unwrap();
            all_acknowledged(&s).await;
            drop(s);
            reset_tx.send(()).unwrap();
        });
        let pool = pool_to(addr);
        let resp = upload_to(&pool, Duration::from_secs(10)).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut page = Vec::new();
        while page.len() < HALF {
            let data = next_data(&mut body).await.expect("more of the page");
            page.extend_from_slice(&data.expect("the first half"));
        }
        go_tx.send(()).unwrap();
        reset.await.unwrap();
        // (The reset reaches the gateway's socket at once over loopback; this lets the
        // reactor report it before the next poll, so the upload's write runs into it.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Some(data) = next_data(&mut body).await {
            match data {
                Ok(data) => page.extend_from_slice(&data),
                Err(e) => panic!("the page was cut after {} bytes: {e}", page.len()),
            }
        }
        assert_eq!(page.len(), 2 * HALF);
        assert!(page[..HALF].iter().all(|&b| b == b'a'));
        assert!(page[HALF..].iter().all(|&b| b == b'b'));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_delimited_by_the_close_never_looks_whole_after_the_upload_ran_into_a_reset() {
        // As above, but the page has no length: it ends at the close, and the reset the
        // upload ran into is all that tells a cut page from a whole one. (The write took
        // the reset's error; the reads then see the queued bytes and an end of file.)
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        let (reset_tx, reset) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_past_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nfirst ")
                .await
                .unwrap();
            go.await.unwrap();
            s.write_all(b"second").await.unwrap();
            all_acknowledged(&s).await;
            drop(s);
            reset_tx.send(()).unwrap();
        });
        let pool = pool_to(addr);
        let resp = upload_to(&pool, Duration::from_secs(10)).await;
        let mut body = resp.into_body();
        let first = next_data(&mut body).await.expect("the first part");
        assert_eq!(first.as_deref(), Ok(&b"first "[..]));
        go_tx.send(()).unwrap();
        reset.await.unwrap();
        // (As above: the reactor reports the reset before the next poll.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut last = None;
        while let Some(data) = next_data(&mut body).await {
            last = Some(data);
        }
        assert!(
            matches!(last, Some(Err(_))),
            "a page cut by a reset must not end cleanly: {last:?}"
        );
    }

    #[tokio::test]
    async fn an_upstream_that_stops_taking_the_upload_while_its_answer_streams_is_not_cut() {
        // The upstream answers `200` on the head and streams its answer, a piece every
        // 150 ms, while it reads none of the body: the upload stalls for longer than the
        // response timeout (400 ms), but the answer moves, and reaches its end.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_past_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                s.write_all(b"5\r\ntick\n\r\n").await.unwrap();
            }
            s.write_all(b"0\r\n\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let pool = pool_to(addr);
        let resp = upload_to(&pool, Duration::from_millis(400)).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut answer = Vec::new();
        while let Some(data) = next_data(&mut body).await {
            match data {
                Ok(data) => answer.extend_from_slice(&data),
                Err(e) => panic!("the answer was cut after {answer:?}: {e}"),
            }
        }
        assert_eq!(answer, b"tick\n".repeat(6));
        // The upstream still waits for the body: the connection is closed, not pooled.
        assert_eq!(pool.idle_count(), 0);
    }

    /// A client's request body of 10 declared bytes: hands over `abc`, then waits; once
    /// `leaving` is set it waits once more and breaks off on the poll after (a client that
    /// goes away just as the response's last bytes are read).
    struct LeavesAtTheEnd {
        first: Option<Bytes>,
        leaving: Arc<std::sync::atomic::AtomicBool>,
        polls_since: u8,
    }

    impl http_body::Body for LeavesAtTheEnd {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if let Some(b) = self.first.take() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if self.leaving.load(Ordering::SeqCst) {
                self.polls_since += 1;
                if self.polls_since >= 2 {
                    return Poll::Ready(Some(Err("the client went away".into())));
                }
            }
            // (Nothing wakes the task for this body: the socket's events drive the test.)
            Poll::Pending
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(10)
        }
    }

    #[tokio::test]
    async fn a_request_body_that_breaks_off_as_the_response_ends_never_leaves_its_connection_pooled(
    ) {
        // The upstream answers `200` on the head and 3 of the 10 body bytes, and sends the
        // response body when told: it still waits for 7 bytes of the request, so whatever
        // comes next on this connection would be read as them.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        let (sent_tx, sent) = tokio::sync::oneshot::channel::<()>();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\nabc") {
                let mut tmp = [0u8; 1024];
                let n = s.read(&mut tmp).await.unwrap();
                assert!(n > 0, "closed before the body");
                got.extend_from_slice(&tmp[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
                .await
                .unwrap();
            go.await.unwrap();
            s.write_all(b"hello").await.unwrap();
            sent_tx.send(()).unwrap();
            // Held open: a pooled connection stays usable as far as a peek can tell.
            let _ = s.read(&mut [0u8; 1]).await;
        });
        let pool = pool_to(addr);
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let req = Request::post("/upload")
            .header("host", "up")
            .body(Body::boxed(LeavesAtTheEnd {
                first: Some(Bytes::from_static(b"abc")),
                leaving: leaving.clone(),
                polls_since: 0,
            }))
            .unwrap();
        let slot = pool.try_acquire(usize::MAX).unwrap();
        let resp = match send(&pool, req, None, Duration::from_secs(10), slot).await {
            Ok(resp) => resp,
            Err(_) => panic!("no response"),
        };
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        // The response body waits, the upload with it (the client sends nothing more).
        let first =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        assert!(first.is_pending());
        // The response's last bytes arrive as the client goes away: the one poll reads
        // them and then finds the client's body broken.
        leaving.store(true, Ordering::SeqCst);
        go_tx.send(()).unwrap();
        sent.await.unwrap();
        let data = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let data = data.and_then(|f| f.ok()).and_then(|f| f.into_data().ok());
        assert_eq!(data.as_deref(), Some(&b"hello"[..]));
        assert!(body.is_end_stream());
        assert_eq!(
            pool.idle_count(),
            0,
            "a connection whose request went out incomplete was pooled"
        );
        drop(body);
        upstream.abort();
    }
}
