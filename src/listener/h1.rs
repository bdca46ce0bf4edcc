//! Wraith's HTTP/1.1 server: the client side of every TCP connection that did not negotiate
//! HTTP/2. It replaces hyper's HTTP/1 server on the hot path, the way Pingora has its own: the
//! request head is parsed straight into the `http` types from one reused read buffer, the
//! response head is encoded into one reused write buffer, and small bodies go out in the
//! same write as their head.
//!
//! Framing follows RFC 9112 and refuses what request smuggling relies on:
//! - a request head is parsed strictly (httparse's defaults: no obs-fold, no whitespace before
//!   the colon, one space between the parts of the request line); up to `max_header_size`
//!   bytes and `max_headers` fields, else 431;
//! - `Transfer-Encoding` beside `Content-Length`, on HTTP/1.0, with `chunked` missing, not
//!   last or twice is 400; another coding before `chunked` is 501 (§6.1);
//! - several `Content-Length` values must agree and be plain digits (RFC 9110 §8.6), else 400;
//! - chunked bodies are decoded with hard limits on chunk lines and trailers (`crate::http1`).
//!
//! Every refusal is answered with its status and `Connection: close`, and the connection is
//! then closed. So is a connection whose request body was not read to its end: after the
//! response it stops reading requests, and discards what the client still sends for a short
//! while before closing (a lingering close, like nginx's), so the client sees the response
//! rather than a reset.
//!
//! Responses carry `Content-Length` when the length is known (a declared one, or the body's
//! exact size), are chunked otherwise on HTTP/1.1 and delimited by the close on HTTP/1.0.
//! HEAD, 1xx, 204 and 304 responses have no body. `Expect: 100-continue` is answered when the
//! pipeline first reads the body, never when the request is answered without it. A 101
//! answering an upgrade request hands the connection, and the bytes already read from it, to
//! the pipeline (`crate::upgrade`).

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::body::{Body, BoxError};
use crate::http1::{
    decode_chunk, parse_length, tokens, write_field, ChunkState, Decoded, LazyDeadline, Peer,
};
use crate::upgrade::{self, Upgraded};

/// Header slots parsed on the stack; heads with more fields (when `max_headers` allows) are
/// parsed again into slots on the heap.
const INLINE_HEADERS: usize = 64;
/// Room made in the read buffer before a read of a request head.
const HEAD_READ: usize = 4 * 1024;
/// Room made in the read buffer before a read of a request body.
const BODY_READ: usize = 64 * 1024;
/// Response body data up to this size is copied into the write buffer (one write with the
/// head or the chunk framing); larger data is written from its own buffer.
const COPY_LIMIT: usize = 8 * 1024;
/// The write buffer is sent once it holds this much.
const WRITE_HIGH: usize = 16 * 1024;
/// A lingering close discards at most this much, for at most `LINGER_TIME`.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(5);

/// The limits of a listener's HTTP/1.1 side.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub max_header_size: usize,
    pub max_headers: usize,
    /// From the first byte of a request head (for the first request: from the start of the
    /// connection) to the complete head.
    pub header_read_timeout: Duration,
    /// Between requests (from the end of a response to the first byte of the next head),
    /// and the longest a response may wait for the client to read it.
    pub idle_timeout: Duration,
}

/// Why a connection ended other than cleanly.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error(e.to_string())
    }
}

/// A request the codec refuses before it reaches the pipeline.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    /// The request line, when it could be read (boxed: refusals are rare, and the
    /// `Result`s carrying them stay small).
    request: Option<Box<(Method, Uri, Version)>>,
}

fn refuse(status: StatusCode, reason: &'static str) -> Refusal {
    Refusal {
        status,
        reason,
        request: None,
    }
}

/// A request the codec refused, as the connection's `on_refused` hears of it (to account
/// for it like any other request: an access record, metrics, a security event).
pub struct Refused {
    pub status: StatusCode,
    /// Why, in a few words (a fixed text: no client bytes).
    pub reason: &'static str,
    /// Method, target and version, when the request line could be read.
    pub request: Option<(Method, Uri, Version)>,
    /// The length of the answer's body.
    pub body_len: u64,
}

// ---------------------------------------------------------------------------------------------
// The request body: a one-frame slot between the connection and the pipeline.

#[derive(Default)]
struct Slot {
    /// The next frame for the pipeline.
    frame: Option<Result<Frame<Bytes>, BoxError>>,
    /// No frame after `frame`.
    ended: bool,
    /// The pipeline has asked for the body (what `Expect: 100-continue` waits for).
    wanted: bool,
    /// The pipeline dropped the body.
    dropped: bool,
    /// Body bytes not yet delivered, when the length is declared.
    remaining: Option<u64>,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// A request body read from an HTTP/1.1 client connection.
pub struct RequestBody {
    slot: Arc<Mutex<Slot>>,
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    // A panic while holding this lock cannot leave the slot half-updated in a way that
    // matters (every field is written whole): carry on with it.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = lock(&self.slot);
        if let Some(frame) = s.frame.take() {
            if let (Ok(f), Some(r)) = (&frame, s.remaining.as_mut()) {
                if let Some(d) = f.data_ref() {
                    *r = r.saturating_sub(d.len() as u64);
                }
            }
            wake(&mut s.writer);
            return Poll::Ready(Some(frame));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        register(&mut s.reader, cx);
        // The connection reads on by itself while the slot is empty; the one thing it waits
        // for from here is the first ask (what `Expect: 100-continue` is answered on). Waking
        // it on every ask would spin the task for as long as the client sends nothing.
        if !s.wanted {
            s.wanted = true;
            wake(&mut s.writer);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.slot);
        s.ended && s.frame.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match lock(&self.slot).remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let mut s = lock(&self.slot);
        s.dropped = true;
        s.frame = None;
        wake(&mut s.writer);
    }
}

// ---------------------------------------------------------------------------------------------
// The connection.

/// How the request body in flight is framed, and how far it has been read.
enum Reading {
    /// No body, or all of it read.
    Done,
    /// The body's framing broke: nothing more is read, and the rest counts as unread.
    Failed,
    Length(u64),
    Chunked(ChunkState),
}

/// How the response being written is framed.
enum Writing {
    /// Nothing left to write of the body (or none to write at all).
    Done,
    Length(u64),
    Chunked,
    UntilClose,
}

/// What the connection is doing.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Phase {
    /// Waiting for (or reading) the next request head.
    Head,
    /// A request is in the pipeline, or its response is being written.
    Busy,
    /// The last response is written; the client's remaining bytes are discarded until it
    /// closes, for at most `LINGER_BYTES` and `LINGER_TIME`.
    Linger,
    /// Finished.
    Closed,
}

/// The request in flight, as far as the codec is concerned.
struct InFlight {
    reading: Reading,
    slot: Option<Arc<Mutex<Slot>>>,
    /// `Expect: 100-continue` not yet answered.
    expect_continue: bool,
    head_only: bool,
    /// The client accepts trailers (`TE: trailers`).
    trailers: bool,
    http10: bool,
    upgrade: Option<oneshot::Sender<Upgraded>>,
    /// The other end of `upgrade`, until it goes into the request.
    upgrade_rx: Option<upgrade::Offer>,
    /// The response head is written (or queued).
    responded: bool,
    /// The response is completely queued.
    response_done: bool,
    /// The response is a 101 to an upgrade request.
    upgrading: bool,
}

pin_project_lite::pin_project! {
    /// One client connection served over HTTP/1.1: a future that ends when the connection
    /// is closed (or handed over by an upgrade).
    pub(super) struct Connection<I, S, F, R> {
        conn: Conn<I>,
        service: S,
        on_refused: R,
        // The pipeline's future: ~20 KiB, so boxed, and only from the connection's first
        // request on (a connection that sends none costs that much less); the box is kept
        // for the next requests (one allocation per request cost 4 % of the instructions).
        handler: Option<Pin<Box<Option<F>>>>,
    }
}

/// Everything of a connection but the pipeline's future.
struct Conn<I> {
    io: Option<I>,
    settings: Settings,
    rbuf: BytesMut,
    /// Bytes to write: `wbuf[wpos..]`, then `wdata`, then `wpost[wpost_pos..]`. What is
    /// queued while `wdata` is waiting goes to `wpost` (`out`), so order is kept.
    wbuf: Vec<u8>,
    wpos: usize,
    wdata: Bytes,
    wpost: Vec<u8>,
    wpost_pos: usize,
    /// Bytes were written since the last flush.
    unflushed: bool,
    /// Header offsets of the head being parsed (kept for its capacity).
    spans: Vec<[usize; 4]>,
    /// How much of an incomplete head was already looked at (0: none).
    scanned: usize,
    phase: Phase,
    /// Resolves when the connection handed over by a 101 is dropped (`hand_over`): until
    /// then this connection still counts as open.
    upgraded: Option<tokio::sync::oneshot::Receiver<()>>,
    req: Option<InFlight>,
    resp: Option<Body>,
    writing: Writing,
    /// Another request may follow on this connection.
    keep_alive: bool,
    /// A graceful shutdown was asked for.
    closing: bool,
    /// The client will send nothing more.
    read_closed: bool,
    lingered: usize,
    /// The connection's one timer (`poll_deadline`).
    timer: LazyDeadline,
    /// When the wait for the next request began (the end of the last response, or the
    /// start of the connection), and whether it is the first request's.
    idle_since: Instant,
    first: bool,
    /// When the first bytes of the head being read were seen waiting for more.
    head_since: Option<Instant>,
    /// When a write of the response started waiting for the client.
    stall_since: Option<Instant>,
    /// The write side is shut down.
    shut: bool,
    linger_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I, S, F, R> Connection<I, S, F, R>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: FnMut(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
    R: FnMut(Refused),
{
    /// Serves `io`, open since `started` (accept, or the end of the TLS handshake: the
    /// first request head is due header_read_timeout after it): each request goes to
    /// `service`; each request refused by the codec itself is reported to `on_refused`.
    pub(super) fn new(
        io: I,
        settings: Settings,
        started: Instant,
        service: S,
        on_refused: R,
    ) -> Self {
        Connection {
            conn: Conn {
                io: Some(io),
                settings,
                upgraded: None,
                rbuf: BytesMut::new(),
                wbuf: Vec::new(),
                wpos: 0,
                wdata: Bytes::new(),
                wpost: Vec::new(),
                wpost_pos: 0,
                unflushed: false,
                spans: Vec::new(),
                scanned: 0,
                phase: Phase::Head,
                req: None,
                resp: None,
                writing: Writing::Done,
                keep_alive: true,
                closing: false,
                read_closed: false,
                lingered: 0,
                timer: LazyDeadline::default(),
                idle_since: started,
                first: true,
                head_since: None,
                stall_since: None,
                shut: false,
                linger_timer: None,
            },
            service,
            on_refused,
            handler: None,
        }
    }

    /// Finish the request in flight (its response says `Connection: close`), then close; an
    /// idle connection closes at once.
    pub(super) fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.project();
        this.conn.closing = true;
        this.conn.keep_alive = false;
        if this.conn.phase == Phase::Linger {
            this.conn.phase = Phase::Closed;
        }
    }
}

impl<I, S, F, R> Future for Connection<I, S, F, R>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: FnMut(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
    R: FnMut(Refused),
{
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Handed over: the connection lives on in its new protocol, this waits for its end.
        if let Some(ended) = self.as_mut().project().conn.upgraded.as_mut() {
            return Pin::new(ended).poll(cx).map(|_| Ok(()));
        }
        let res = self.as_mut().poll_exchanges(cx);
        if res.is_pending() {
            // Waiting: on the client (a head, the next request, a read of the response) or
            // on the pipeline. The first ones have deadlines.
            if let Poll::Ready(why) = self.project().conn.poll_deadline(cx) {
                tracing::debug!("{why}; closing the connection");
                return Poll::Ready(Ok(()));
            }
        }
        res
    }
}

impl<I, S, F, R> Connection<I, S, F, R>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: FnMut(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
    R: FnMut(Refused),
{
    /// Serves requests until the connection ends, or everything waits.
    fn poll_exchanges(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.project();
        let conn = this.conn;
        loop {
            let mut progress = false;
            // Whatever is queued goes out first.
            let written = match conn.poll_write_queue(cx) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => false,
            };
            match conn.phase {
                Phase::Closed => {
                    if !written {
                        return Poll::Pending;
                    }
                    if conn.shut {
                        return Poll::Ready(Ok(()));
                    }
                    return conn.poll_shutdown(cx).map(|_| Ok(()));
                }
                Phase::Linger => {
                    // The response goes out whole before the half-close.
                    if !written {
                        return Poll::Pending;
                    }
                    match conn.poll_linger(cx) {
                        Poll::Ready(()) => conn.phase = Phase::Closed,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Phase::Head => {
                    if !written {
                        return Poll::Pending;
                    }
                    if conn.closing && conn.rbuf.is_empty() {
                        conn.phase = Phase::Closed;
                        continue;
                    }
                    match conn.parse_head() {
                        Ok(Some(req)) => {
                            conn.phase = Phase::Busy;
                            let fut = (this.service)(req);
                            match this.handler.as_mut() {
                                Some(slot) => slot.as_mut().set(Some(fut)),
                                None => *this.handler = Some(Box::pin(Some(fut))),
                            }
                            progress = true;
                        }
                        Ok(None) => {
                            if conn.read_closed {
                                // The client closed between requests (or mid-head).
                                return Poll::Ready(Ok(()));
                            }
                            match conn.poll_read(cx, HEAD_READ) {
                                Poll::Ready(Ok(_)) => progress = true,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                                Poll::Pending => {}
                            }
                        }
                        Err(refusal) => {
                            let refused = conn.refuse(refusal);
                            (this.on_refused)(refused);
                            progress = true;
                        }
                    }
                }
                Phase::Busy => {
                    // The request side: its body, or a watch for the client going away.
                    match conn.poll_request_side(cx) {
                        Poll::Ready(Ok(p)) => progress |= p,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                    if let Some(slot) = this.handler.as_mut() {
                        let polled = slot.as_mut().as_pin_mut().map(|h| h.poll(cx));
                        if let Some(Poll::Ready(resp)) = polled {
                            slot.as_mut().set(None);
                            conn.start_response(resp);
                            progress = true;
                        }
                    }
                    if conn.resp.is_some() && conn.queued() < WRITE_HIGH && conn.wdata.is_empty() {
                        match conn.poll_response_body(cx) {
                            Poll::Ready(Ok(p)) => progress |= p,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => {}
                        }
                    }
                    if conn
                        .req
                        .as_ref()
                        .is_some_and(|r| r.response_done && !r.upgrading)
                        && written
                        && conn.queued() == 0
                    {
                        conn.finish_exchange();
                        progress = true;
                    } else if conn.req.as_ref().is_some_and(|r| r.upgrading)
                        && written
                        && conn.queued() == 0
                    {
                        conn.hand_over();
                        return match conn.upgraded.as_mut() {
                            Some(ended) => Pin::new(ended).poll(cx).map(|_| Ok(())),
                            None => Poll::Ready(Ok(())),
                        };
                    }
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

impl<I> Conn<I>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn io(&mut self) -> Pin<&mut I> {
        Pin::new(
            self.io
                .as_mut()
                .expect("the connection's stream until it is handed over"),
        )
    }

    /// Where bytes to write are queued: behind `wdata` when it is waiting.
    fn out(&mut self) -> &mut Vec<u8> {
        if self.wdata.is_empty() {
            &mut self.wbuf
        } else {
            &mut self.wpost
        }
    }

    /// Bytes queued and not yet written.
    fn queued(&self) -> usize {
        self.wbuf.len() - self.wpos + self.wdata.len() + self.wpost.len() - self.wpost_pos
    }

    /// Writes (and flushes) everything queued; `Ready(Ok)` once nothing is left.
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.queued() > 0 {
                let (head, data, tail) = (
                    &self.wbuf[self.wpos..],
                    &self.wdata[..],
                    &self.wpost[self.wpost_pos..],
                );
                let slices = [IoSlice::new(head), IoSlice::new(data), IoSlice::new(tail)];
                let io = Pin::new(
                    self.io
                        .as_mut()
                        .expect("the connection's stream until it is handed over"),
                );
                let n = match io.poll_write_vectored(cx, &slices) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                self.unflushed = true;
                self.stall_since = None;
                let mut n = n;
                let from_head = n.min(self.wbuf.len() - self.wpos);
                self.wpos += from_head;
                n -= from_head;
                let from_data = n.min(self.wdata.len());
                let _ = self.wdata.split_to(from_data);
                n -= from_data;
                self.wpost_pos += n.min(self.wpost.len() - self.wpost_pos);
                if self.wpos == self.wbuf.len() && self.wdata.is_empty() {
                    // What was queued behind the data is next.
                    self.wbuf.clear();
                    std::mem::swap(&mut self.wbuf, &mut self.wpost);
                    self.wpos = self.wpost_pos;
                    self.wpost_pos = 0;
                    if self.wpos == self.wbuf.len() {
                        self.wbuf.clear();
                        self.wpos = 0;
                    }
                }
            } else if self.unflushed {
                match self.io().poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        // Over TLS the last bytes leave here (rustls holds up to 64 KiB).
                        self.unflushed = false;
                        self.stall_since = None;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Reads more bytes into the read buffer; `Ok(0)` at the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < room / 2 {
            self.rbuf.reserve(room);
        }
        let dst = self.rbuf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(dst);
        let io = Pin::new(
            self.io
                .as_mut()
                .expect("the connection's stream until it is handed over"),
        );
        match io.poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                self.read_closed = true;
                return Poll::Ready(Err(e));
            }
            Poll::Pending => return Poll::Pending,
        }
        let n = rb.filled().len();
        // SAFETY: `poll_read` initialized `n` bytes of the spare capacity.
        unsafe { self.rbuf.set_len(self.rbuf.len() + n) };
        if n == 0 {
            self.read_closed = true;
        }
        Poll::Ready(Ok(n))
    }

    // -----------------------------------------------------------------------------------------
    // Request heads.

    /// Parses a complete request head off the front of the read buffer; `None` when more
    /// bytes are needed.
    fn parse_head(&mut self) -> Result<Option<Request<Body>>, Refusal> {
        // Empty lines before a request line are ignored (RFC 9112 §2.2). They are dropped
        // here rather than left to httparse, which would skip them again on every try: a
        // client sending one CRLF per packet must not cost a parse of all of them each time.
        if self.scanned == 0 {
            let mut blank = 0;
            loop {
                match &self.rbuf[blank..] {
                    [b'\r', b'\n', ..] => blank += 2,
                    [b'\n', ..] => blank += 1,
                    _ => break,
                }
            }
            if blank > 0 {
                bytes::Buf::advance(&mut self.rbuf, blank);
            }
        }
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        // A head that arrives in pieces is parsed again only once the bytes that came since
        // the last try could end it (an empty line): a head sent a byte at a time must not
        // cost its length squared.
        if self.scanned > 0 {
            let from = self.scanned.min(self.rbuf.len()).saturating_sub(3);
            let ends = self.rbuf[from..]
                .windows(2)
                .any(|w| w == b"\n\n" || w == b"\n\r");
            if !ends {
                self.scanned = self.rbuf.len();
                return self.too_large().map(|()| None);
            }
        }
        let mut parsed = self.parse_rbuf();
        // A later HTTP/1.x minor version is read as HTTP/1.1, the highest this server
        // implements (RFC 9110 §2.5); httparse reads only 1.0 and 1.1.
        if matches!(parsed, Err(httparse::Error::Version)) {
            if let Some(at) = later_minor_version(&self.rbuf) {
                self.rbuf[at] = b'1';
                parsed = self.parse_rbuf();
            }
        }
        let parsed = match parsed {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.scanned = self.rbuf.len();
                return self.too_large().map(|()| None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "the request has more header fields than max_headers",
                ))
            }
            Err(httparse::Error::Version) if request_line_says_http(&self.rbuf) => {
                return Err(refuse(
                    StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                    "only HTTP/1.0 and HTTP/1.1 are served here",
                ))
            }
            Err(_) => return Err(refuse(StatusCode::BAD_REQUEST, "malformed request head")),
        };
        if parsed.len > self.settings.max_header_size {
            return Err(self.oversized());
        }
        self.scanned = 0;
        self.head_since = None;
        self.first = false;
        let head = self.rbuf.split_to(parsed.len).freeze();
        self.build_request(head, &parsed).map(Some)
    }

    /// Parses the head at the front of the read buffer, on the stack for up to
    /// `INLINE_HEADERS` fields.
    fn parse_rbuf(&mut self) -> Result<Option<Parsed>, httparse::Error> {
        let max_headers = self.settings.max_headers;
        let mut inline = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; INLINE_HEADERS];
        let slots = &mut inline[..max_headers.min(INLINE_HEADERS)];
        match parse(&self.rbuf, slots, &mut self.spans) {
            Err(httparse::Error::TooManyHeaders) if max_headers > INLINE_HEADERS => {
                let mut heap: Vec<MaybeUninit<httparse::Header<'_>>> =
                    (0..max_headers).map(|_| MaybeUninit::uninit()).collect();
                parse(&self.rbuf, &mut heap, &mut self.spans)
            }
            other => other,
        }
    }

    /// An incomplete head already over `max_header_size` is refused.
    fn too_large(&self) -> Result<(), Refusal> {
        if self.rbuf.len() <= self.settings.max_header_size {
            return Ok(());
        }
        Err(self.oversized())
    }

    /// The refusal of a head over `max_header_size`: 414 when its request line alone is,
    /// 431 otherwise, however the bytes arrived (whether the line's end came with the first
    /// bytes over the limit or not).
    fn oversized(&self) -> Refusal {
        let max = self.settings.max_header_size;
        let line_end = self.rbuf[..self.rbuf.len().min(max + 1)].contains(&b'\n');
        if !line_end {
            return refuse(
                StatusCode::URI_TOO_LONG,
                "the request line is longer than max_header_size",
            );
        }
        refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request head is larger than max_header_size",
        )
    }

    fn build_request(&mut self, head: Bytes, parsed: &Parsed) -> Result<Request<Body>, Refusal> {
        let bad = |reason| refuse(StatusCode::BAD_REQUEST, reason);
        let method = Method::from_bytes(&head[parsed.method.0..parsed.method.1])
            .map_err(|_| bad("invalid method"))?;
        let uri = Uri::from_maybe_shared(head.slice(parsed.target.0..parsed.target.1))
            .map_err(|_| bad("invalid request target"))?;
        // From here on a refusal names the request it refuses (for its access record).
        let line = (method, uri, parsed.version);
        match self.build_rest(&head, parsed, &line) {
            Ok((body, map)) => {
                let (method, uri, version) = line;
                let mut req = Request::new(body);
                *req.method_mut() = method;
                *req.uri_mut() = uri;
                *req.version_mut() = version;
                *req.headers_mut() = map;
                let flight = self.req.as_mut().expect("build_rest sets it");
                if let Some(offer) = flight.upgrade_rx.take() {
                    offer.attach(&mut req);
                }
                Ok(req)
            }
            Err(mut r) => {
                r.request = Some(Box::new(line));
                Err(r)
            }
        }
    }

    /// The request's headers and body, and the codec's view of it (`self.req`).
    fn build_rest(
        &mut self,
        head: &Bytes,
        parsed: &Parsed,
        (method, uri, _): &(Method, Uri, Version),
    ) -> Result<(Body, HeaderMap), Refusal> {
        let bad = |reason| refuse(StatusCode::BAD_REQUEST, reason);
        // The four target forms (RFC 9112 §3.2): origin (`/p`) and absolute
        // (`http://h/p`) for every method, authority (`h:443`) only for CONNECT, `*` only
        // for OPTIONS.
        let target = &head[parsed.target.0..parsed.target.1];
        let form_ok = if target.first() == Some(&b'/') || uri.scheme().is_some() {
            true
        } else if target == b"*" {
            method == Method::OPTIONS
        } else {
            method == Method::CONNECT
        };
        if !form_ok {
            return Err(bad("request target form not allowed for this method"));
        }
        let http10 = parsed.version == Version::HTTP_10;

        let mut facts = Facts::default();
        let mut map = HeaderMap::with_capacity(self.spans.len());
        for &[ns, ne, vs, ve] in &self.spans {
            let raw = &head[ns..ne];
            let value = &head[vs..ve];
            facts.note(raw, value);
            let name = match common_name(raw) {
                Some(n) => n,
                None => HeaderName::from_bytes(raw).map_err(|_| bad("invalid header name"))?,
            };
            map.append(name, crate::http1::parsed_value(head.slice(vs..ve)));
        }

        // Framing (RFC 9112 §6).
        let transfer_coding = facts.te.as_ref().map(Codings::judge);
        let reading = match (&transfer_coding, &facts.content_length) {
            (Some(_), Some(_)) => {
                return Err(bad("Transfer-Encoding and Content-Length together"));
            }
            (Some(_), None) if http10 => {
                return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
            }
            (Some(te), None) => match te {
                TransferCoding::Chunked => Reading::Chunked(ChunkState::Size),
                TransferCoding::Other => {
                    return Err(refuse(
                        StatusCode::NOT_IMPLEMENTED,
                        "transfer codings other than chunked are not supported",
                    ))
                }
                TransferCoding::Invalid => {
                    return Err(bad("Transfer-Encoding must end with chunked, once"));
                }
            },
            (None, Some(Ok(0))) | (None, None) => Reading::Done,
            (None, Some(Ok(n))) => Reading::Length(*n),
            (None, Some(Err(()))) => return Err(bad("invalid Content-Length")),
        };
        self.keep_alive &= if http10 {
            facts.keep_alive && !facts.close
        } else {
            !facts.close
        };

        let mut flight = InFlight {
            reading,
            slot: None,
            expect_continue: false,
            head_only: method == Method::HEAD,
            trailers: facts.te_trailers,
            http10,
            upgrade: None,
            upgrade_rx: None,
            responded: false,
            response_done: false,
            upgrading: false,
        };
        let body = match flight.reading {
            Reading::Done | Reading::Failed => Body::Empty,
            Reading::Length(n) => flight.open_body(Some(n)),
            Reading::Chunked(_) => flight.open_body(None),
        };
        flight.expect_continue =
            facts.expect_continue && !http10 && !matches!(flight.reading, Reading::Done);

        if facts.upgrade && !http10 {
            let (tx, offer) = upgrade::offer();
            flight.upgrade = Some(tx);
            flight.upgrade_rx = Some(offer);
        }
        self.req = Some(flight);
        Ok((body, map))
    }

    fn refuse(&mut self, refusal: Refusal) -> Refused {
        let body = format!(
            "{{\"error\":\"{}\",\"status\":{}}}\n",
            refusal.reason,
            refusal.status.as_u16()
        );
        self.out().extend_from_slice(b"HTTP/1.1 ");
        self.out()
            .extend_from_slice(refusal.status.as_str().as_bytes());
        self.out().push(b' ');
        self.out()
            .extend_from_slice(refusal.status.canonical_reason().unwrap_or("").as_bytes());
        self.out().extend_from_slice(
            b"\r\ncontent-type: application/json\r\nconnection: close\r\ndate: ",
        );
        write_date(self.out());
        self.out().extend_from_slice(b"\r\ncontent-length: ");
        self.out()
            .extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        self.out().extend_from_slice(b"\r\n\r\n");
        self.out().extend_from_slice(body.as_bytes());
        self.keep_alive = false;
        self.rbuf.clear();
        self.scanned = 0;
        self.phase = Phase::Linger;
        Refused {
            status: refusal.status,
            reason: refusal.reason,
            request: refusal.request.map(|b| *b),
            body_len: body.len() as u64,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Request bodies.

    /// Moves request body bytes into the body's slot while it has room; with no body left to
    /// read, watches for the client going away. `Ok(true)` when something moved.
    fn poll_request_side(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        let Some(req) = self.req.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        match req.reading {
            Reading::Done => return self.poll_watch(cx),
            Reading::Failed => return Poll::Ready(Ok(false)),
            Reading::Length(_) | Reading::Chunked(_) => {}
        }
        let slot = req.slot.clone().expect("a body being read has its slot");
        let mut progress = false;
        loop {
            {
                let mut s = lock(&slot);
                if s.dropped {
                    // Nobody reads the rest: the connection cannot carry another request.
                    self.keep_alive = false;
                    return Poll::Ready(Ok(progress));
                }
                if s.frame.is_some() {
                    register(&mut s.writer, cx);
                    return if progress {
                        Poll::Ready(Ok(true))
                    } else {
                        Poll::Pending
                    };
                }
                let req = self.req.as_mut().expect("checked above");
                if s.wanted && req.expect_continue {
                    req.expect_continue = false;
                    if !req.responded {
                        self.wbuf
                            .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        progress = true;
                    }
                }
            }
            let req = self.req.as_mut().expect("checked above");
            let frame: Option<Result<Frame<Bytes>, BoxError>> = match &mut req.reading {
                Reading::Done | Reading::Failed => return Poll::Ready(Ok(progress)),
                Reading::Length(remaining) => {
                    if self.rbuf.is_empty() {
                        None
                    } else {
                        let n = (self.rbuf.len() as u64).min(*remaining) as usize;
                        *remaining -= n as u64;
                        let data = self.rbuf.split_to(n).freeze();
                        if *remaining == 0 {
                            req.reading = Reading::Done;
                        }
                        Some(Ok(Frame::data(data)))
                    }
                }
                Reading::Chunked(state) => match decode_chunk(*state, &mut self.rbuf, Peer::Client)
                {
                    Ok(Decoded::Data(data, next)) => {
                        *state = next;
                        let data = if data.len() < SMALL_CHUNK {
                            merge_chunks(data, state, &mut self.rbuf)
                        } else {
                            data
                        };
                        Some(Ok(Frame::data(data)))
                    }
                    Ok(Decoded::Continue(next)) => {
                        *state = next;
                        continue;
                    }
                    Ok(Decoded::NeedMore(next)) => {
                        *state = next;
                        None
                    }
                    Ok(Decoded::End(trailers)) => {
                        req.reading = Reading::Done;
                        let mut s = lock(&slot);
                        s.ended = true;
                        if let Some(t) = trailers {
                            s.frame = Some(Ok(Frame::trailers(t)));
                        }
                        wake(&mut s.reader);
                        return Poll::Ready(Ok(true));
                    }
                    Err(e) => {
                        req.reading = Reading::Failed;
                        self.keep_alive = false;
                        let mut s = lock(&slot);
                        s.frame = Some(Err(e.into()));
                        s.ended = true;
                        wake(&mut s.reader);
                        return Poll::Ready(Ok(true));
                    }
                },
            };
            if let Some(frame) = frame {
                let done = matches!(req.reading, Reading::Done);
                let mut s = lock(&slot);
                s.frame = Some(frame);
                s.ended = done;
                wake(&mut s.reader);
                progress = true;
                if done {
                    return Poll::Ready(Ok(true));
                }
                continue;
            }
            // More bytes are needed.
            if self.read_closed {
                return self.body_cut(&slot, "the client closed the connection mid-body".into());
            }
            match self.poll_read(cx, BODY_READ) {
                Poll::Ready(Ok(0)) => {
                    return self.body_cut(&slot, "the client closed the connection mid-body".into())
                }
                Poll::Ready(Ok(_)) => {
                    // A client still sending its body is not a stalled one, even if it
                    // reads none of an early response meanwhile.
                    self.stall_since = None;
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    return self.body_cut(&slot, format!("reading the request body: {e}"))
                }
                Poll::Pending => {
                    // The pipeline asking for the body (100-continue) wakes this task too.
                    register(&mut lock(&slot).writer, cx);
                    return if progress {
                        Poll::Ready(Ok(true))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
    }

    /// The client went away mid-body: the body ends in error (`ClientGone`). With no
    /// response begun, the request is abandoned as when the client leaves after a whole
    /// request (`poll_watch`): the connection ends, and the request is logged as a client
    /// abort (499), not answered 400 into a closed connection.
    fn body_cut(&mut self, slot: &Mutex<Slot>, why: String) -> Poll<Result<bool, Error>> {
        let responded = self.req.as_mut().is_some_and(|req| {
            req.reading = Reading::Failed;
            req.responded
        });
        self.keep_alive = false;
        let mut s = lock(slot);
        s.frame = Some(Err(crate::body::ClientGone(why.clone()).into()));
        s.ended = true;
        wake(&mut s.reader);
        drop(s);
        if !responded {
            return Poll::Ready(Err(Error(why)));
        }
        Poll::Ready(Ok(true))
    }

    /// With the request read, reads on: a client that closes its side has gone away (its
    /// request is abandoned, as hyper and nginx do), and bytes of a pipelined request are
    /// kept for later, up to a head's worth.
    fn poll_watch(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        if self.read_closed || self.rbuf.len() > self.settings.max_header_size {
            return Poll::Pending;
        }
        // Into a buffer on the stack: reading into `rbuf` would make it allocate anew while
        // the request's header values still share it; a pipelined request is rare.
        let mut probe = [MaybeUninit::<u8>::uninit(); 2048];
        let mut rb = ReadBuf::uninit(&mut probe);
        match self.io().poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                self.read_closed = true;
                Poll::Ready(Err(Error(
                    "the client closed the connection before the response was complete".into(),
                )))
            }
            Poll::Ready(Ok(())) => {
                self.rbuf.extend_from_slice(rb.filled());
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(e)) => {
                self.read_closed = true;
                Poll::Ready(Err(e.into()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Responses.

    fn start_response(&mut self, resp: Response<Body>) {
        let (mut parts, mut body) = resp.into_parts();
        let req = self.req.as_mut().expect("a response answers a request");
        // A final answer must be final: an interim status (or a 101 nobody asked for) would
        // make the client pair the next response with this request.
        if parts.status.is_informational()
            && !(parts.status == StatusCode::SWITCHING_PROTOCOLS && req.upgrade.is_some())
        {
            tracing::warn!(
                status = parts.status.as_u16(),
                "the pipeline answered with an interim status; sent as 502"
            );
            parts.status = StatusCode::BAD_GATEWAY;
            parts.headers.clear();
            body = Body::Empty;
            self.keep_alive = false;
        }
        req.responded = true;
        // No 100 after the final answer. A client that sent its body without waiting for
        // one (RFC 9110 §10.1.1 allows it) and whose body is all read leaves nothing
        // ambiguous: the connection carries on. Otherwise (below) the client may send the
        // rest or not, and the connection cannot be trusted with another request.
        req.expect_continue = false;
        if !matches!(req.reading, Reading::Done) {
            // The body is not read to its end yet: whether or not the pipeline goes on
            // reading it, this connection will not be trusted with another request, and the
            // response says so.
            self.keep_alive = false;
        }
        let status = parts.status;
        let upgrading = status == StatusCode::SWITCHING_PROTOCOLS && req.upgrade.is_some();
        let bodyless = status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let head_only = req.head_only;
        let http10 = req.http10;
        if self.closing {
            self.keep_alive = false;
        }

        // The declared length, if it is one.
        let mut declared: Option<Result<u64, ()>> = None;
        for v in parts.headers.get_all(header::CONTENT_LENGTH) {
            let n = parse_length(v.as_bytes().trim_ascii()).ok_or(());
            declared = Some(match (declared, n) {
                (None, n) => n,
                (Some(Ok(a)), Ok(b)) if a == b => Ok(a),
                _ => Err(()),
            });
        }
        let declared = declared.and_then(Result::ok);
        let mut length_line: Option<u64> = None;
        let mut chunked = false;
        self.writing = if upgrading || (bodyless && status != StatusCode::NOT_MODIFIED) {
            Writing::Done
        } else if head_only || status == StatusCode::NOT_MODIFIED {
            // The headers the GET would have, no body. A 304 without a declared length says
            // nothing about it; a HEAD answered from a body of known size gives that size.
            length_line =
                declared.or_else(|| body.size_hint().exact().filter(|&n| head_only && n > 0));
            Writing::Done
        } else if let Some(n) = declared {
            length_line = Some(n);
            if n == 0 {
                Writing::Done
            } else {
                Writing::Length(n)
            }
        } else if body.is_end_stream() {
            length_line = Some(0);
            Writing::Done
        } else if let Some(n) = body.size_hint().exact() {
            length_line = Some(n);
            if n == 0 {
                Writing::Done
            } else {
                Writing::Length(n)
            }
        } else if http10 {
            self.keep_alive = false;
            Writing::UntilClose
        } else {
            chunked = true;
            Writing::Chunked
        };
        if status == StatusCode::SWITCHING_PROTOCOLS && !upgrading {
            // A 101 to a request that did not ask for it: nothing sensible follows.
            self.keep_alive = false;
        }

        // The head.
        // Nothing of an earlier response is left queued behind data.
        debug_assert!(self.wdata.is_empty());
        let mut keep_alive = self.keep_alive;
        let w = &mut self.wbuf;
        w.extend_from_slice(b"HTTP/1.1 ");
        w.extend_from_slice(status.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        w.extend_from_slice(b"\r\n");
        let mut has_date = false;
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING || name == header::CONTENT_LENGTH {
                continue;
            }
            if !upgrading && (name == header::CONNECTION || name.as_str() == "keep-alive") {
                // Framing and the connection's fate are this codec's to say; a `close`
                // asked for by the pipeline is honoured.
                if name == header::CONNECTION
                    && tokens(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"))
                {
                    keep_alive = false;
                }
                continue;
            }
            if name == header::DATE {
                has_date = true;
            }
            write_field(w, name, value);
        }
        if !has_date {
            w.extend_from_slice(b"date: ");
            write_date(w);
            w.extend_from_slice(b"\r\n");
        }
        if let Some(n) = length_line {
            if !(bodyless && status != StatusCode::NOT_MODIFIED) {
                w.extend_from_slice(b"content-length: ");
                w.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                w.extend_from_slice(b"\r\n");
            }
        }
        if chunked {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if !upgrading {
            if !keep_alive {
                w.extend_from_slice(b"connection: close\r\n");
            } else if http10 {
                w.extend_from_slice(b"connection: keep-alive\r\n");
            }
        }
        w.extend_from_slice(b"\r\n");
        self.keep_alive = keep_alive;

        let req = self.req.as_mut().expect("checked above");
        if upgrading {
            req.upgrading = true;
            req.response_done = true;
            drop(body);
        } else if matches!(self.writing, Writing::Done) {
            req.response_done = true;
            drop(body);
        } else {
            self.resp = Some(body);
        }
        // Not upgrading: the pending upgrade fails.
        if !req.upgrading {
            req.upgrade = None;
        }
    }

    /// Moves response body frames into the write queue while it has room.
    fn poll_response_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        let mut progress = false;
        while self.queued() < WRITE_HIGH && self.wdata.is_empty() {
            let Some(body) = self.resp.as_mut() else {
                break;
            };
            let frame = match Pin::new(body).poll_frame(cx) {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    return if progress {
                        Poll::Ready(Ok(true))
                    } else {
                        Poll::Pending
                    }
                }
            };
            progress = true;
            match frame {
                None => self.end_body(None)?,
                Some(Err(e)) => {
                    return Poll::Ready(Err(Error(format!(
                        "response body failed: {}",
                        crate::upstream::forwarder::error_chain(&*e)
                    ))))
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.queue_data(data)?;
                        let ended = self.resp.as_ref().is_some_and(|b| b.is_end_stream());
                        if ended || matches!(self.writing, Writing::Done) {
                            if let Some(b) = self.resp.as_ref() {
                                if !b.is_end_stream() {
                                    // Length reached: anything more is an error, found
                                    // by polling once more.
                                    continue;
                                }
                            }
                            self.end_body(None)?;
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.end_body(Some(trailers))?;
                        }
                    }
                },
            }
        }
        Poll::Ready(Ok(progress))
    }

    fn queue_data(&mut self, data: Bytes) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.writing {
            Writing::Done => {
                return Err(Error(
                    "the response body is longer than its Content-Length".into(),
                ))
            }
            Writing::Length(remaining) => {
                let n = data.len() as u64;
                if n > *remaining {
                    return Err(Error(
                        "the response body is longer than its Content-Length".into(),
                    ));
                }
                *remaining -= n;
                if *remaining == 0 {
                    self.writing = Writing::Done;
                }
                self.push_data(data, b"");
            }
            Writing::Chunked => {
                let mut line = [0u8; 18];
                let len = hex_line(data.len(), &mut line);
                self.out().extend_from_slice(&line[..len]);
                self.push_data(data, b"\r\n");
            }
            Writing::UntilClose => self.push_data(data, b""),
        }
        Ok(())
    }

    fn push_data(&mut self, data: Bytes, tail: &'static [u8]) {
        if data.len() <= COPY_LIMIT {
            let out = self.out();
            out.extend_from_slice(&data);
            out.extend_from_slice(tail);
        } else {
            debug_assert!(self.wdata.is_empty());
            self.wdata = data;
            self.wpost.extend_from_slice(tail);
        }
    }

    /// The response body ended (with `trailers`, perhaps).
    fn end_body(&mut self, trailers: Option<HeaderMap>) -> Result<(), Error> {
        match self.writing {
            Writing::Length(n) if n > 0 => {
                return Err(Error(format!(
                    "the response body ended {n} bytes short of its Content-Length"
                )))
            }
            Writing::Chunked => {
                self.out().extend_from_slice(b"0\r\n");
                let send = self.req.as_ref().is_some_and(|r| r.trailers);
                if let (Some(t), true) = (trailers, send) {
                    for (name, value) in &t {
                        if !crate::proxy::headers::allowed_in_trailers(name) {
                            continue;
                        }
                        write_field(self.out(), name, value);
                    }
                }
                self.out().extend_from_slice(b"\r\n");
            }
            _ => {}
        }
        self.writing = Writing::Done;
        self.resp = None;
        if let Some(req) = self.req.as_mut() {
            req.response_done = true;
        }
        Ok(())
    }

    /// The response is written: the next request, or the end of the connection.
    fn finish_exchange(&mut self) {
        let Some(req) = self.req.take() else {
            return;
        };
        let body_read = matches!(req.reading, Reading::Done);
        if let Some(slot) = &req.slot {
            let mut s = lock(slot);
            if !s.ended {
                // The pipeline did not finish the body, and will get no more of it.
                s.frame = Some(Err(
                    "the response was sent before the request body was read".into(),
                ));
                s.ended = true;
                wake(&mut s.reader);
            }
        }
        if !body_read || self.read_closed {
            self.keep_alive = false;
        }
        if self.keep_alive && !self.closing {
            self.phase = Phase::Head;
            self.idle_since = Instant::now();
            // An idle connection keeps small buffers: one upload or one large head must
            // not pin 64 KiB or more for the rest of its life.
            if self.rbuf.is_empty() && self.rbuf.capacity() > 4 * HEAD_READ {
                self.rbuf = BytesMut::new();
            }
            if self.wbuf.capacity() > 4 * WRITE_HIGH {
                self.wbuf = Vec::new();
            }
            if self.wpost.capacity() > 4 * WRITE_HIGH {
                self.wpost = Vec::new();
            }
            return;
        }
        // Closing. Lingering only when the client may still be sending: a body left unread,
        // or bytes after the request.
        self.phase = if (!body_read || !self.rbuf.is_empty()) && !self.read_closed {
            Phase::Linger
        } else {
            Phase::Closed
        };
        self.rbuf.clear();
    }

    /// The deadline of what the connection waits for, if it has one, and what it is.
    fn deadline(&mut self) -> Option<(Instant, &'static str)> {
        let s = &self.settings;
        // Bytes the client does not take (a response, a refusal, the closing handshake of
        // TLS), in any phase: a client with a closed receive window must not hold the
        // connection for ever.
        if self.queued() > 0 || self.unflushed || self.phase == Phase::Closed {
            return Some((
                *self.stall_since.get_or_insert_with(Instant::now) + s.idle_timeout,
                "the client read none of the response within idle_timeout",
            ));
        }
        match self.phase {
            Phase::Head if self.first && self.rbuf.is_empty() => Some((
                self.idle_since + s.header_read_timeout,
                "no request head within header_read_timeout",
            )),
            Phase::Head if self.rbuf.is_empty() => Some((
                self.idle_since + s.idle_timeout,
                "no request within idle_timeout",
            )),
            Phase::Head => {
                let since = *self.head_since.get_or_insert_with(Instant::now);
                let since = if self.first {
                    since.min(self.idle_since)
                } else {
                    since
                };
                Some((
                    since + s.header_read_timeout,
                    "request head not complete within header_read_timeout",
                ))
            }
            // Waiting for the pipeline (its stages have their own timeouts), or lingering
            // (which has its own timer).
            Phase::Busy | Phase::Linger | Phase::Closed => None,
        }
    }

    /// Waits for the current deadline; `Ready` with what expired. (A keep-alive connection
    /// moves its idle deadline with every request; `LazyDeadline` moves the timer once per
    /// idle_timeout at most.)
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<&'static str> {
        let Some((due, why)) = self.deadline() else {
            return Poll::Pending;
        };
        self.timer.poll_until(due, cx).map(|()| why)
    }

    /// Discards what the client still sends after the last response, for a while, so that
    /// closing with unread bytes does not reset the connection before the client has read
    /// the response.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.read_closed || self.lingered >= LINGER_BYTES {
            return Poll::Ready(());
        }
        let timer = self
            .linger_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER_TIME)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // Half-close first: the client sees the end of the response now.
        if !self.shut {
            match self.poll_shutdown(cx) {
                Poll::Ready(Ok(())) => self.shut = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            self.rbuf.clear();
            match self.poll_read(cx, HEAD_READ) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => {
                    self.lingered += n;
                    if self.lingered >= LINGER_BYTES {
                        return Poll::Ready(());
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Hands the stream to the upgrade's receiver.
    fn hand_over(&mut self) {
        let Some(req) = self.req.take() else {
            return;
        };
        if !matches!(req.reading, Reading::Done) {
            return;
        }
        let (Some(tx), Some(io)) = (req.upgrade, self.io.take()) else {
            return;
        };
        let leftover = self.rbuf.split().freeze();
        let (upgraded, ended) = Upgraded::new(Box::new(io), leftover);
        if tx.send(upgraded).is_ok() {
            self.upgraded = Some(ended);
        }
        self.phase = Phase::Closed;
    }
}

impl<I> Drop for Conn<I> {
    fn drop(&mut self) {
        // A body still being read (perhaps by another task: hyper's HTTP/2 client) must end
        // now, with an error, not wait for bytes that will never come.
        if let Some(slot) = self.req.as_ref().and_then(|r| r.slot.as_ref()) {
            let mut s = lock(slot);
            if !s.ended {
                s.frame = Some(Err(crate::body::ClientGone(
                    "the client connection closed mid-body".into(),
                )
                .into()));
                s.ended = true;
                wake(&mut s.reader);
            }
        }
    }
}

impl InFlight {
    fn open_body(&mut self, length: Option<u64>) -> Body {
        let slot = Arc::new(Mutex::new(Slot {
            remaining: length,
            ..Slot::default()
        }));
        self.slot = Some(slot.clone());
        Body::H1(RequestBody { slot })
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing.

/// A parsed request head: offsets into the read buffer (header offsets go to `spans`).
struct Parsed {
    len: usize,
    method: (usize, usize),
    target: (usize, usize),
    version: Version,
}

fn parse<'b>(
    buf: &'b [u8],
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
    spans: &mut Vec<[usize; 4]>,
) -> Result<Option<Parsed>, httparse::Error> {
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    spans.clear();
    for h in req.headers.iter() {
        let (ns, ne) = span(h.name.as_bytes());
        let (vs, ve) = span(h.value);
        spans.push([ns, ne, vs, ve]);
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(httparse::Error::Token);
    };
    Ok(Some(Parsed {
        len,
        method: span(method.as_bytes()),
        target: span(path.as_bytes()),
        version: if version == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        },
    }))
}

/// Whether the request line ends in an `HTTP/` version (one httparse does not take is then
/// 505, anything else 400).
fn request_line_says_http(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(buf);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.rsplit(|&b| b == b' ')
        .next()
        .is_some_and(|v| v.starts_with(b"HTTP/"))
}

/// Where the minor digit of an `HTTP/1.2` to `HTTP/1.9` request line is.
fn later_minor_version(buf: &[u8]) -> Option<usize> {
    // The line may not have ended yet: httparse refuses the version as soon as it has it.
    let end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let version = line.get(line.len().checked_sub(9)?..)?;
    match version {
        [b' ', b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9'] => Some(line.len() - 1),
        _ => None,
    }
}

/// The Transfer-Encoding of a request, judged whole.
enum TransferCoding {
    /// Exactly `chunked`.
    Chunked,
    /// Other codings, then `chunked` once, last.
    Other,
    /// `chunked` missing, not last or repeated; an empty or non-ASCII value.
    Invalid,
}

/// The transfer codings of a request, across its Transfer-Encoding lines.
#[derive(Default)]
struct Codings {
    count: usize,
    chunked: usize,
    last_chunked: bool,
    /// An empty or non-ASCII line.
    invalid: bool,
}

impl Codings {
    fn judge(&self) -> TransferCoding {
        if self.invalid || self.chunked != 1 || !self.last_chunked {
            TransferCoding::Invalid
        } else if self.count == 1 {
            TransferCoding::Chunked
        } else {
            TransferCoding::Other
        }
    }
}

/// What a request head says about its framing and its connection, read from the raw lines.
#[derive(Default)]
struct Facts {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    expect_continue: bool,
    te_trailers: bool,
    /// The codings of every Transfer-Encoding line.
    te: Option<Codings>,
    content_length: Option<Result<u64, ()>>,
}

impl Facts {
    fn note(&mut self, name: &[u8], value: &[u8]) {
        // Cheap first filter: every name looked at here starts with c, e or t (any case).
        match name.first().map(u8::to_ascii_lowercase) {
            Some(b'c' | b'e' | b't') => {}
            _ => return,
        }
        if name.eq_ignore_ascii_case(b"connection") {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    self.upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let te = self.te.get_or_insert_with(Codings::default);
            let mut any = false;
            te.invalid |= !value.is_ascii();
            for token in tokens(value) {
                any = true;
                te.count += 1;
                te.last_chunked = token.eq_ignore_ascii_case(b"chunked");
                te.chunked += usize::from(te.last_chunked);
            }
            // A line with no coding at all.
            te.invalid |= !any;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            // Several values (in one line or many) must agree (RFC 9110 §8.6).
            for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let n = parse_length(part).ok_or(());
                self.content_length = Some(match (self.content_length.take(), n) {
                    (Some(Err(())), _) | (_, Err(())) => Err(()),
                    (Some(Ok(a)), Ok(b)) if a != b => Err(()),
                    (_, Ok(b)) => Ok(b),
                });
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            self.expect_continue |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"te") {
            self.te_trailers |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        }
    }
}

/// The request header names clients send most, as they send them, without
/// `HeaderName::from_bytes`'s lower-casing pass; `None` for anything else.
fn common_name(raw: &[u8]) -> Option<HeaderName> {
    Some(match raw {
        b"Host" | b"host" => header::HOST,
        b"User-Agent" | b"user-agent" => header::USER_AGENT,
        b"Accept" | b"accept" => header::ACCEPT,
        b"Accept-Encoding" | b"accept-encoding" => header::ACCEPT_ENCODING,
        b"Accept-Language" | b"accept-language" => header::ACCEPT_LANGUAGE,
        b"Connection" | b"connection" => header::CONNECTION,
        b"Content-Length" | b"content-length" => header::CONTENT_LENGTH,
        b"Content-Type" | b"content-type" => header::CONTENT_TYPE,
        b"Cookie" | b"cookie" => header::COOKIE,
        b"Authorization" | b"authorization" => header::AUTHORIZATION,
        b"Referer" | b"referer" => header::REFERER,
        b"Origin" | b"origin" => header::ORIGIN,
        b"Cache-Control" | b"cache-control" => header::CACHE_CONTROL,
        _ => return None,
    })
}

/// Chunks smaller than this are merged with the ones already read after them.
const SMALL_CHUNK: usize = 4 * 1024;
/// The most a merged frame collects.
const MERGED_MAX: usize = 16 * 1024;

/// `first`, followed by the data of the chunks already buffered after it (up to
/// `MERGED_MAX`, never past the last chunk). A body sent as many tiny chunks then costs one
/// frame, and one write to the upstream, per read rather than per chunk. Stops before
/// anything it cannot take whole: the trailer section, a chunk line not complete yet, or a
/// framing error (left in the buffer for the next step to report).
fn merge_chunks(first: Bytes, state: &mut ChunkState, buf: &mut BytesMut) -> Bytes {
    let mut merged: Option<BytesMut> = None;
    while !buf.is_empty() && !matches!(state, ChunkState::Trailers) {
        match decode_chunk(*state, buf, Peer::Client) {
            Ok(Decoded::Data(d, next)) => {
                *state = next;
                let m = merged.get_or_insert_with(|| BytesMut::from(&first[..]));
                m.extend_from_slice(&d);
                if m.len() >= MERGED_MAX {
                    break;
                }
            }
            Ok(Decoded::Continue(next)) => *state = next,
            Ok(Decoded::NeedMore(next)) => {
                *state = next;
                break;
            }
            // Only the trailer state ends a body, and the loop stops before it; errors are
            // found again (nothing was consumed) by the next step.
            Ok(Decoded::End(_)) | Err(_) => break,
        }
    }
    match merged {
        Some(m) => m.freeze(),
        None => first,
    }
}

/// `{len:x}\r\n` into `out`; the number of bytes written.
fn hex_line(mut len: usize, out: &mut [u8; 18]) -> usize {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[len & 0xf];
        len >>= 4;
        if len == 0 {
            break;
        }
    }
    let n = digits.len() - i;
    out[..n].copy_from_slice(&digits[i..]);
    out[n..n + 2].copy_from_slice(b"\r\n");
    n + 2
}

/// Appends the current time as an HTTP date (formatted once a second per thread).
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            use std::io::Write;
            let mut buf = [0u8; 29];
            let _ = write!(&mut buf[..], "{}", httpdate::HttpDate::from(now));
            *d = (secs, buf);
        }
        out.extend_from_slice(&d.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_chunks_are_merged_up_to_the_trailers() {
        let mut buf = BytesMut::from(&b"\r\n1\r\nb\r\n2;x=y\r\ncd\r\n0\r\nt: 1\r\n\r\nNEXT"[..]);
        let mut state = ChunkState::DataEnd;
        let merged = merge_chunks(Bytes::from_static(b"a"), &mut state, &mut buf);
        assert_eq!(&merged[..], b"abcd");
        assert!(matches!(state, ChunkState::Trailers));
        assert_eq!(
            &buf[..],
            b"t: 1\r\n\r\nNEXT",
            "the trailers are left for the next step"
        );
        // A framing error is left in the buffer, after the good chunks.
        let mut buf = BytesMut::from(&b"\r\n1\r\nb\r\nzz\r\n"[..]);
        let mut state = ChunkState::DataEnd;
        let merged = merge_chunks(Bytes::from_static(b"a"), &mut state, &mut buf);
        assert_eq!(&merged[..], b"ab");
        assert!(decode_chunk(state, &mut buf, Peer::Client).is_err());
        // An incomplete line stops the merge without losing anything.
        let mut buf = BytesMut::from(&b"\r\n1\r\nb\r\n3"[..]);
        let mut state = ChunkState::DataEnd;
        let merged = merge_chunks(Bytes::from_static(b"a"), &mut state, &mut buf);
        assert_eq!(&merged[..], b"ab");
        assert_eq!(&buf[..], b"3");
    }

    #[test]
    fn chunk_size_lines() {
        let mut out = [0u8; 18];
        let n = hex_line(0x1f, &mut out);
        assert_eq!(&out[..n], b"1f\r\n");
        let n = hex_line(0, &mut out);
        assert_eq!(&out[..n], b"0\r\n");
        let n = hex_line(usize::MAX, &mut out);
        assert_eq!(&out[..n], b"ffffffffffffffff\r\n");
    }

    fn facts(lines: &[(&str, &str)]) -> Facts {
        let mut f = Facts::default();
        for (n, v) in lines {
            f.note(n.as_bytes(), v.as_bytes());
        }
        f
    }

    #[test]
    fn transfer_codings_are_judged_whole() {
        let te = |lines: &[(&str, &str)]| match facts(lines).te.as_ref().map(Codings::judge) {
            Some(TransferCoding::Chunked) => "chunked",
            Some(TransferCoding::Other) => "other",
            Some(TransferCoding::Invalid) => "invalid",
            None => "none",
        };
        assert_eq!(te(&[("Transfer-Encoding", "chunked")]), "chunked");
        assert_eq!(te(&[("transfer-encoding", " Chunked ")]), "chunked");
        assert_eq!(te(&[("Transfer-Encoding", "gzip, chunked")]), "other");
        assert_eq!(
            te(&[
                ("Transfer-Encoding", "gzip"),
                ("Transfer-Encoding", "chunked")
            ]),
            "other"
        );
        assert_eq!(te(&[("Transfer-Encoding", "chunked, gzip")]), "invalid");
        assert_eq!(te(&[("Transfer-Encoding", "chunked, chunked")]), "invalid");
        assert_eq!(
            te(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked")
            ]),
            "invalid"
        );
        assert_eq!(te(&[("Transfer-Encoding", "")]), "invalid");
        assert_eq!(te(&[("Transfer-Encoding", "gzip")]), "invalid");
        assert_eq!(
            te(&[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "")]),
            "invalid"
        );
        assert_eq!(te(&[("Transfer-Encoding", "ch\u{fc}nked")]), "invalid");
        assert_eq!(te(&[("X-Transfer-Encoding", "chunked")]), "none");
    }

    #[test]
    fn content_lengths_must_agree() {
        let cl = |lines: &[(&str, &str)]| facts(lines).content_length;
        assert_eq!(cl(&[("Content-Length", "5")]), Some(Ok(5)));
        assert_eq!(
            cl(&[("Content-Length", "5"), ("content-length", "5")]),
            Some(Ok(5))
        );
        assert_eq!(cl(&[("Content-Length", "5, 5")]), Some(Ok(5)));
        assert_eq!(cl(&[("Content-Length", "5, 6")]), Some(Err(())));
        assert_eq!(
            cl(&[("Content-Length", "5"), ("Content-Length", "6")]),
            Some(Err(()))
        );
        assert_eq!(cl(&[("Content-Length", "+5")]), Some(Err(())));
        assert_eq!(cl(&[("Content-Length", "0x5")]), Some(Err(())));
        assert_eq!(cl(&[("Content-Length", "5 5")]), Some(Err(())));
        assert_eq!(cl(&[("Content-Length", "")]), Some(Err(())));
        assert_eq!(
            cl(&[("Content-Length", "99999999999999999999999")]),
            Some(Err(()))
        );
    }
}
