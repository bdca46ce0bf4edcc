//! A request body on its way to an HTTP/1.1 upstream, as a state machine that whoever owns
//! the connection polls: the exchange until the response head arrives, and after an early
//! 2xx or 3xx head the response body, between its own reads (full duplex). One owner of the
//! one socket, so neither a task nor a lock sits between the two directions.
//!
//! Small bodies go in the same write as the request head; the pieces a body has ready
//! together go as one write (one chunk when chunked); large pieces are written from their
//! own buffer. Each wait (for the client's next piece, for the upstream to take bytes) is
//! bounded by the response timeout, counted from the last progress.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::Body as _;
use tokio::io::AsyncWrite;

use super::{chunk_line, Conn, Ready, Stream};
use super::{CLIENT_BODY_FAILED, CLIENT_BODY_GONE, CLIENT_BODY_STALLED, COALESCE};
use crate::body::{Body, BoxError};

/// The request body still to send, and what of it is queued for the socket.
pub(super) struct Upload {
    body: Body,
    chunked: bool,
    /// The longest wait for progress either way (the response timeout).
    timeout: Duration,
    /// Bytes to write: `out[pos..]`, then `big`.
    out: Vec<u8>,
    pos: usize,
    /// A large piece, written from its own buffer after `out`.
    big: Bytes,
    /// `big` is a chunk whose closing CRLF is still to be queued.
    big_chunk: bool,
    /// Pieces taken from the body together, not yet in `out`.
    ready: Ready,
    /// What is queued must go before more of the body is taken.
    flushing: bool,
    /// A write completed: a failure now is no stale pooled connection.
    sent_any: bool,
    /// The body ended: what is queued is the last of the request.
    ended: bool,
    /// What the upload waits for, and since when (`None` right after progress).
    wait: Option<(Wait, tokio::time::Instant)>,
}

/// What an upload can be waiting for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The client's next piece of body.
    Client,
    /// The upstream taking the bytes queued (its receive window is full).
    Upstream,
}

/// Why an upload failed.
pub(super) enum UploadError {
    /// The client's body broke off (`what` is `CLIENT_BODY_GONE` or `CLIENT_BODY_FAILED`).
    Client { what: &'static str, error: BoxError },
    /// The client sent nothing for the response timeout.
    ClientStalled,
    /// Writing to the upstream failed; `first` when no write had completed yet (on a pooled
    /// connection, the upstream closed it before it was used).
    Write { error: io::Error, first: bool },
    /// The upstream took no byte for the response timeout.
    UpstreamStalled,
}

impl Upload {
    /// An upload that starts with the request `head`, so a small body goes in its write.
    pub(super) fn new(head: &[u8], body: Body, chunked: bool, timeout: Duration) -> Upload {
        let mut out = Vec::with_capacity(head.len() + 256);
        out.extend_from_slice(head);
        Upload {
            body,
            chunked,
            timeout,
            out,
            pos: 0,
            big: Bytes::new(),
            big_chunk: false,
            ready: Ready::default(),
            flushing: false,
            sent_any: false,
            ended: false,
            wait: None,
        }
    }

    /// The client's body, what is left of it (for a request handed back after a failure).
    pub(super) fn into_body(self) -> Body {
        self.body
    }

    /// Sends on until the whole body is written (`Ready(Ok)`), it fails, or it has to wait.
    pub(super) fn poll_send(
        &mut self,
        conn: &mut Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), UploadError>> {
        loop {
            if self.flushing {
                std::task::ready!(self.poll_write(conn, cx))?;
                self.flushing = false;
                self.sent_any = true;
                if self.ended {
                    return Poll::Ready(Ok(()));
                }
            }
            // Whatever the body has ready now is taken before anything is written, so a
            // small body goes with the head and a client's small frames go as one piece.
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    self.ready.seal(&mut self.out, self.chunked);
                    if !self.out.is_empty() {
                        self.flushing = true;
                        continue;
                    }
                    std::task::ready!(self.poll_wait(Wait::Client, conn, cx));
                    return Poll::Ready(Err(UploadError::ClientStalled));
                }
            };
            self.wait = None;
            match frame {
                None => {
                    self.ready.seal(&mut self.out, self.chunked);
                    if self.chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    self.ended = true;
                    self.flushing = true;
                }
                Some(Err(error)) => {
                    let what = if crate::body::client_gone(&*error) {
                        CLIENT_BODY_GONE
                    } else {
                        CLIENT_BODY_FAILED
                    };
                    return Poll::Ready(Err(UploadError::Client { what, error }));
                }
                // Trailers from the client are dropped (rarely used over HTTP/1.1 upstreams).
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if self.out.len() + self.ready.len + data.len() <= COALESCE {
                        self.ready.push(data);
                        continue;
                    }
                    self.ready.seal(&mut self.out, self.chunked);
                    if data.len() <= COALESCE {
                        // What was queued goes now; this piece waits for company.
                        self.ready.push(data);
                        self.flushing = !self.out.is_empty();
                        continue;
                    }
                    // A large piece goes from its own buffer, after its chunk line.
                    if self.chunked {
                        chunk_line(&mut self.out, data.len());
                    }
                    self.big = data;
                    self.big_chunk = self.chunked;
                    self.flushing = true;
                }
            }
        }
    }

    /// Writes `out[pos..]` and then `big`; on TLS also flushes, since tokio-rustls may report
    /// bytes written that it still holds when the socket is full, and nothing else would
    /// push them out while the upload waits for the client or the response.
    fn poll_write(
        &mut self,
        conn: &mut Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), UploadError>> {
        loop {
            let data: &[u8] = if self.pos < self.out.len() {
                &self.out[self.pos..]
            } else if !self.big.is_empty() {
                &self.big
            } else {
                break;
            };
            match Pin::new(&mut conn.io).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.write_error(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    self.wait = None;
                    if self.pos < self.out.len() {
                        self.pos += n;
                        if self.pos == self.out.len() {
                            self.out.clear();
                            self.pos = 0;
                        }
                    } else {
                        self.big.advance(n);
                        if self.big.is_empty() && std::mem::take(&mut self.big_chunk) {
                            // The chunk's end goes with what follows it.
                            self.out.extend_from_slice(b"\r\n");
                            break;
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.write_error(e))),
                Poll::Pending => return self.upstream_wait(conn, cx),
            }
        }
        if matches!(conn.io, Stream::Tls(_)) {
            // (rustls takes up to 64 KiB past a full socket: the wait is here then.)
            match Pin::new(&mut conn.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.write_error(e))),
                Poll::Pending => return self.upstream_wait(conn, cx),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn write_error(&self, error: io::Error) -> UploadError {
        UploadError::Write {
            error,
            first: !self.sent_any,
        }
    }

    /// The socket took nothing: `Pending` until the upstream has not read for the timeout.
    fn upstream_wait(
        &mut self,
        conn: &mut Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), UploadError>> {
        std::task::ready!(self.poll_wait(Wait::Upstream, conn, cx));
        Poll::Ready(Err(UploadError::UpstreamStalled))
    }

    /// `Ready` once the upload has waited for `what` for the timeout without progress, on
    /// the connection's own timer (`LazyDeadline`: no timer entry per wait).
    fn poll_wait(&mut self, what: Wait, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<()> {
        let since = match self.wait {
            Some((w, since)) if w == what => since,
            _ => {
                let now = tokio::time::Instant::now();
                self.wait = Some((what, now));
                now
            }
        };
        conn.deadline.poll_until(since + self.timeout, cx)
    }
}

impl std::fmt::Display for UploadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadError::Client { what, error } => write!(f, "{what}: {error}"),
            UploadError::ClientStalled => f.write_str(CLIENT_BODY_STALLED),
            UploadError::Write { error, .. } => write!(f, "writing to upstream: {error}"),
            UploadError::UpstreamStalled => f.write_str("upstream stopped reading the request"),
        }
    }
}
