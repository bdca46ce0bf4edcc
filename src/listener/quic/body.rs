//! HTTP/3 bodies both ways, streamed: the request body is an `http_body::Body` over the h3
//! stream's receive half (handed to the pipeline as `Body::Boxed`), and the pipeline's response
//! body is written to the send half frame by frame as the upstream produces it.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use http::{HeaderMap, Response};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{Body, BoxError};

/// The receive half of a request stream.
pub(super) type RecvStream = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;
/// The send half of a request stream.
pub(super) type SendStream = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

/// A request body read from an HTTP/3 stream. With a `content-length`, the body must have
/// exactly that length (RFC 9114 §4.1.2): the upstream is told that length before the bytes
/// arrive, so a client sending more or less would desynchronise an HTTP/1.1 upstream.
pub(super) struct RequestBody {
    stream: RecvStream,
    /// Bytes still due by `content-length`.
    remaining: Option<u64>,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Trailers,
    Done,
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body longer than its content-length")]
    TooLong,
    #[error("request body shorter than its content-length")]
    TooShort,
}

impl RequestBody {
    /// The body of a request whose head declared `content_length` (if any). A stream that
    /// has already ended (the usual GET) becomes `Body::Empty`, so the upstream sees a request
    /// without a body rather than an empty chunked one.
    pub(super) fn into_body(stream: RecvStream, content_length: Option<u64>) -> Body {
        // `content-length: 0` too is read: DATA after it makes the body fail (too long),
        // rather than being dropped unseen.
        let mut body = RequestBody {
            stream,
            remaining: content_length,
            state: State::Data,
        };
        // Look once without waiting: most bodiless requests end with their HEADERS frame.
        match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).now_or_never() {
            Some(None) => Body::Empty,
            Some(Some(first)) => Body::boxed(crate::body::Prefixed::new(first, body)),
            None => Body::boxed(body),
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.state {
                State::Data => match ready!(this.stream.poll_recv_data(cx)) {
                    Ok(Some(mut buf)) => {
                        // The chunk is `Bytes` underneath: this takes it without copying.
                        let chunk = buf.copy_to_bytes(buf.remaining());
                        if let Some(left) = &mut this.remaining {
                            match left.checked_sub(chunk.len() as u64) {
                                Some(l) => *left = l,
                                None => {
                                    this.state = State::Done;
                                    return Poll::Ready(Some(Err(BodyError::TooLong.into())));
                                }
                            }
                        }
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    Ok(None) => {
                        if this.remaining.is_some_and(|l| l > 0) {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(BodyError::TooShort.into())));
                        }
                        this.state = State::Trailers;
                    }
                    Err(e) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                State::Trailers => {
                    let trailers = ready!(this.stream.poll_recv_trailers(cx));
                    this.state = State::Done;
                    return Poll::Ready(match trailers {
                        Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                        Ok(None) => None,
                        Err(e) => Some(Err(e.into())),
                    });
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Why a response could not be written completely (the client went away or reset the
/// stream, or the upstream body failed).
#[derive(Debug)]
pub(super) enum SendError {
    /// The client stream failed before the response head was written (the client stopped
    /// reading, or went): the request counts as cancelled (`listener::resets`).
    Head(h3::error::StreamError),
    Client(h3::error::StreamError),
    Body(BoxError),
    /// The client took none of the response for `idle_timeout` (its flow-control window
    /// stayed shut).
    Stalled,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Head(e) => write!(f, "client stream, before the response head: {e}"),
            SendError::Client(e) => write!(f, "client stream: {e}"),
            SendError::Body(e) => write!(f, "response body: {e}"),
            SendError::Stalled => {
                f.write_str("the client read none of the response for idle_timeout")
            }
        }
    }
}

/// Writes a response: the head, each body frame as it comes, trailers, end of stream.
/// Responses to HEAD, and 1xx, 204 and 304 responses, end after the head (RFC 9110 §6.4.1:
/// a body there would make the response malformed); their body is dropped unread.
///
/// A client that takes none of the response for `stall` (one write waiting that long on its
/// flow-control window) is given up on, as over HTTP/1.1 and HTTP/2 (nginx's
/// `send_timeout`): its stream, the upstream connection and the endpoint's slot are freed.
/// Every write is bounded, the head's too: in HTTP/3 a HEADERS frame is stream data like any
/// other, so a client that grants no stream credit (or never raises it) would otherwise hold
/// the request, its upstream connection and the endpoint's slot from the first write on.
pub(super) async fn send_response(
    stream: &mut SendStream,
    resp: Response<Body>,
    head_only: bool,
    stall: std::time::Duration,
) -> Result<(), SendError> {
    let status = resp.status();
    let no_body = head_only
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED;
    let (mut parts, mut body) = resp.into_parts();
    if no_body {
        body = Body::Empty;
    }
    // Connection-specific fields are malformed in HTTP/3 (RFC 9114 §4.2); the forwarder
    // already drops them from upstream responses, this catches configured ones.
    crate::proxy::headers::strip_hop_by_hop(&mut parts.headers, false, false);
    parts.version = http::Version::HTTP_3;
    bounded(stall, stream.send_response(Response::from_parts(parts, ())))
        .await
        .map_err(|e| match e {
            SendError::Client(e) => SendError::Head(e),
            other => other,
        })?;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(SendError::Body)?;
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    bounded(stall, stream.send_data(data)).await?;
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    if let Some(t) = trailers {
        bounded(stall, stream.send_trailers(t)).await?;
    }
    // (It may write a grease frame first, which waits for credit like any other.)
    bounded(stall, stream.finish()).await
}

/// One write to the client, given up on when it waits `stall` for flow-control credit.
async fn bounded(
    stall: std::time::Duration,
    write: impl std::future::Future<Output = Result<(), h3::error::StreamError>>,
) -> Result<(), SendError> {
    tokio::time::timeout(stall, write)
        .await
        .map_err(|_| SendError::Stalled)?
        .map_err(SendError::Client)
}
