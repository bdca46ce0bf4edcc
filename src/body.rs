//! The one body type of the pipeline. Every protocol's request body and every response body is
//! a `Body`, so no stage knows which protocol carried the request. The common cases (hyper's
//! incoming stream, a small fixed body, nothing) are enum variants, not boxes: no allocation
//! per request for them.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

/// Boxed error carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming HTTP body.
#[derive(Default)]
pub enum Body {
    /// No body.
    #[default]
    Empty,
    /// A complete body in memory (built-in responses, errors).
    Full(Option<Bytes>),
    /// A body streamed by hyper (HTTP/1.1 or HTTP/2, client side or upstream side).
    Incoming(hyper::body::Incoming),
    /// A request body read by Wraith's own HTTP/1.1 server (`listener::h1`).
    H1(crate::listener::h1::RequestBody),
    /// A response body read straight from a pooled HTTP/1.1 upstream connection.
    Upstream(Box<crate::upstream::h1::ResponseBody>),
    /// An HTTP/2 upstream's response body, holding its endpoint's in-flight slot and its
    /// connection's stream until it ends (boxed: `Body` stays the size of `Incoming`).
    Tracked(Box<Tracked>),
    /// A response body that emits its access record when it ends (a variant rather than a
    /// box: it wraps nearly every proxied response).
    Logged(Box<crate::telemetry::access_log::LoggedBody>),
    /// Anything else (HTTP/3 streams, wrapped bodies).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

/// See `Body::Tracked`.
pub struct Tracked {
    pub body: hyper::body::Incoming,
    // Dropped before `slot` (fields drop in order): freeing the slot wakes a waiting request,
    // which must find this stream's place on its connection free already, or it opens
    // another connection.
    pub stream: crate::upstream::h2::Stream,
    pub slot: crate::upstream::h1::InFlight,
    /// Cuts a stream on which neither side moves for the response timeout (`poll_stall`).
    pub stall: Stall,
    /// The request body's watch, when it streamed (`forward`): a response the stream's reset
    /// cut off because the client's body failed (it broke off, went past
    /// `max_request_body`, or its client was banned) is not the upstream's failure.
    pub request: Option<std::sync::Arc<BodyWatch>>,
}

/// The stall timer of an HTTP/2 upstream's response body: the longest wait for more of it
/// (the route's or upstream's `response_timeout`, as `proxy_read_timeout` bounds each wait
/// of an HTTP/1.1 body), except while the request body is still being sent (a streaming
/// call whose answer waits for the client's messages is not stalled: Envoy's stream idle
/// timeout counts both directions).
pub struct Stall {
    timeout: std::time::Duration,
    /// Made the first time a read has to wait, then re-armed (never re-allocated).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `timer` counts down for the current wait.
    armed: bool,
    /// The request body's pieces sent when the timer was armed.
    sent: u64,
}

impl Stall {
    pub fn new(timeout: std::time::Duration) -> Stall {
        Stall {
            timeout,
            timer: None,
            armed: false,
            sent: 0,
        }
    }
}

/// The error of an HTTP/2 upstream's response body cut by its stall timer.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {timeout:?} (response_timeout) while the request body did not move either")]
pub struct Stalled {
    pub timeout: std::time::Duration,
    /// The request body was still open: the upstream may have been waiting for the client
    /// (a streaming call, an upload that stopped), so the silence is no mark against the
    /// endpoint, and the record says `request_timeout`.
    pub client: bool,
}

impl Stalled {
    /// Whether `e` is a stall the client may have caused.
    pub fn by_client(e: &BoxError) -> bool {
        e.downcast_ref::<Stalled>().is_some_and(|s| s.client)
    }
}

impl Tracked {
    /// Called when the body has nothing yet: `Ready` with the error once the stream stalled.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<BoxError> {
        use std::future::Future;
        let stall = &mut self.stall;
        loop {
            let sent = self.stream.sent();
            if stall.armed && sent == stall.sent {
                let timer = stall.timer.as_mut().expect("an armed timer exists");
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                return Poll::Ready(
                    Stalled {
                        timeout: stall.timeout,
                        client: self.stream.uploading(),
                    }
                    .into(),
                );
            }
            // A new wait, or the request moved since the timer was armed: the whole timeout
            // again from now.
            let deadline = tokio::time::Instant::now() + stall.timeout;
            match stall.timer.as_mut() {
                Some(t) => t.as_mut().reset(deadline),
                None => stall.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            stall.armed = true;
            stall.sent = sent;
        }
    }
}

impl Body {
    /// A body holding `bytes`.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let b = bytes.into();
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }

    /// Wraps any body.
    pub fn boxed<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Body::Boxed(body.map_err(Into::into).boxed_unsync())
    }
}

impl From<hyper::body::Incoming> for Body {
    fn from(b: hyper::body::Incoming) -> Self {
        Body::Incoming(b)
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Body::Empty => "Body::Empty",
            Body::Full(_) => "Body::Full",
            Body::Incoming(_) => "Body::Incoming",
            Body::H1(_) => "Body::H1",
            Body::Upstream(_) => "Body::Upstream",
            Body::Tracked(..) => "Body::Tracked",
            Body::Logged(_) => "Body::Logged",
            Body::Boxed(_) => "Body::Boxed",
        })
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Body::H1(b) => Pin::new(b).poll_frame(cx),
            Body::Upstream(b) => clean_trailers(Pin::new(b).poll_frame(cx)),
            Body::Tracked(t) => {
                let polled = match Pin::new(&mut t.body).poll_frame(cx) {
                    Poll::Pending => t.poll_stall(cx).map(|e| Some(Err(e))),
                    other => {
                        // Progress: the next wait gets the whole timeout again.
                        t.stall.armed = false;
                        other.map_err(Into::into)
                    }
                };
                match &polled {
                    Poll::Ready(None) => t.slot.body_ended(true),
                    // The upstream may have been waiting for the client: not its failure.
                    Poll::Ready(Some(Err(e))) if Stalled::by_client(e) => t.slot.disarm(),
                    Poll::Ready(Some(Err(_)))
                        if t.request.as_ref().is_some_and(|w| w.client_failed()) =>
                    {
                        // The stream was reset for the request body's failure: the client's
                        // doing, said as such (the access record's code, no failure of the
                        // endpoint's).
                        t.slot.disarm();
                        if let Some(w) = &t.request {
                            let failed = crate::upstream::h1::UploadFailed::seen_by(w);
                            return Poll::Ready(Some(Err(failed.into())));
                        }
                    }
                    Poll::Ready(Some(Err(e))) => t
                        .slot
                        .body_failed(&crate::upstream::forwarder::error_chain(&**e)),
                    _ => {}
                }
                clean_trailers(polled)
            }
            Body::Logged(b) => Pin::new(&mut **b).poll_frame(cx),
            Body::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Incoming(b) => b.is_end_stream(),
            Body::H1(b) => b.is_end_stream(),
            Body::Upstream(b) => b.is_end_stream(),
            Body::Tracked(t) => t.body.is_end_stream(),
            Body::Logged(b) => b.is_end_stream(),
            Body::Boxed(b) => b.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(b) => b.size_hint(),
            Body::H1(b) => b.size_hint(),
            Body::Upstream(b) => b.size_hint(),
            Body::Tracked(t) => t.body.size_hint(),
            Body::Logged(b) => b.size_hint(),
            Body::Boxed(b) => b.size_hint(),
        }
    }
}

/// An upstream response's frame, its trailer section cleaned
/// (`proxy::headers::strip_response_trailers`) for whichever protocol the client speaks.
fn clean_trailers(
    polled: Poll<Option<Result<Frame<Bytes>, BoxError>>>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    match polled {
        Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
            let mut trailers = frame.into_trailers().unwrap_or_default();
            crate::proxy::headers::strip_response_trailers(&mut trailers);
            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
        }
        other => other,
    }
}

/// What became of a client's request body on its way upstream, shared between the body
/// (`Watched`) and the forwarder that sent it: a failed attempt is the client's fault, not the
/// upstream's, when the body failed, and a `413` when it went past `max_request_body`.
#[derive(Debug)]
pub struct BodyWatch {
    /// `max_request_body`; `u64::MAX` when there is none.
    limit: u64,
    /// 0: fine so far; `FAILED`: the client's body failed; `TOO_LARGE`: it went past `limit`.
    state: std::sync::atomic::AtomicU8,
    /// The body was last asked for more and had none: the sender waits for the client.
    waiting: std::sync::atomic::AtomicBool,
    /// The ban on the client that cut the body, published while it was being sent.
    banned: std::sync::OnceLock<crate::decisions::Verdict>,
}

const FAILED: u8 = 1;
const TOO_LARGE: u8 = 2;
/// The client went away mid-body (`client_gone`).
const GONE: u8 = 3;

impl BodyWatch {
    /// The body failed on the client's side (it broke off, or went past the limit).
    pub fn client_failed(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// The body failed because its client went away (`client_gone`), not because of what it
    /// sent.
    pub fn client_gone(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Relaxed) == GONE
    }

    /// The sender's last ask for more of the body is still unanswered: a timeout now is the
    /// client's (it stopped sending), not the upstream's.
    pub fn waiting_for_client(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `max_request_body` (`u64::MAX` when there is none).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The body went past the limit: the limit it went past.
    pub fn exceeded(&self) -> Option<u64> {
        (self.state.load(std::sync::atomic::Ordering::Relaxed) == TOO_LARGE).then_some(self.limit)
    }

    /// The ban that cut the body, if one did.
    pub fn banned(&self) -> Option<&crate::decisions::Verdict> {
        self.banned.get()
    }
}

/// The error of a request body whose client went away before sending all of it: its
/// connection closed or broke (Wraith's HTTP/1.1 server).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientGone(pub String);

/// Whether a request body's error is the end of its whole connection, whoever ended it (an
/// HTTP/2 GOAWAY or broken connection, an HTTP/3 connection error, a protocol violation
/// found on another frame of it included): the request lost its connection rather than sent
/// a malformed body of its own. For a request that has sent nothing but its head
/// (`forward`'s wait for the end of a GET), that is a client abort, as a request whose
/// connection closed before it was served is.
pub fn connection_ended(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            return e.is_io() || e.is_go_away();
        }
        if let Some(e) = e.downcast_ref::<h3::error::StreamError>() {
            return e.is_connection_error();
        }
        if e.is::<quinn::ConnectionError>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether a request body's error means its client went away (a client abort, logged 499)
/// rather than sent something malformed (400): the connection closed or broke, or the client
/// reset the stream or ended the connection (HTTP/2 RST_STREAM or GOAWAY, HTTP/3 stream
/// reset or connection close), whatever the code it gave.
pub fn client_gone(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<ClientGone>() {
            return true;
        }
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            return e.is_io() || (e.is_remote() && (e.is_reset() || e.is_go_away()));
        }
        if let Some(e) = e.downcast_ref::<h3::error::StreamError>() {
            // Of the QUIC ends h3 leaves to us, only the peer's reset or close is the client
            // leaving: a protocol violation found here, or our own close, is not.
            let quic_end = e
                .undefined_cause()
                .and_then(|c| c.downcast_ref::<quinn::ConnectionError>());
            return e.is_peer_gone()
                || matches!(
                    quic_end,
                    Some(
                        quinn::ConnectionError::Reset | quinn::ConnectionError::ConnectionClosed(_)
                    )
                );
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                e.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            );
        }
        next = e.source();
    }
    false
}

/// The error of a request body cut because its client was banned while sending it.
#[derive(Debug, thiserror::Error)]
#[error("the client was banned while sending the request body")]
pub struct Banned;

/// A request body that fails once more than `limit` bytes have come, or once a ban on its
/// client is published (whether a piece is passing or the client is idle); reports any
/// failure of its own to its `BodyWatch`, and passes on a trailer section only cleaned
/// (`strip_request_trailers`).
pub struct Watched {
    inner: Body,
    left: u64,
    watch: std::sync::Arc<BodyWatch>,
    bans: Option<crate::decisions::BodyBans>,
}

impl Watched {
    /// Wraps `inner`; `limit` is `max_request_body`, if any; `bans` watches the client.
    pub fn new(
        inner: Body,
        limit: Option<u64>,
        bans: Option<crate::decisions::BanWatch>,
    ) -> (Watched, std::sync::Arc<BodyWatch>) {
        let limit = limit.unwrap_or(u64::MAX);
        let watch = std::sync::Arc::new(BodyWatch {
            limit,
            state: std::sync::atomic::AtomicU8::new(0),
            waiting: std::sync::atomic::AtomicBool::new(false),
            banned: std::sync::OnceLock::new(),
        });
        let body = Watched {
            inner,
            left: limit,
            watch: watch.clone(),
            bans: bans.map(crate::decisions::BodyBans::new),
        };
        (body, watch)
    }

    /// Keeps the ban that cut the body in the watch; the body fails from now on.
    fn cut(&mut self, ban: crate::decisions::Verdict) {
        tracing::info!(origin = %ban.origin, value = %ban.value, "client banned while it sent a request body; request cut");
        let _ = self.watch.banned.set(ban);
        self.fail(FAILED);
        self.bans = None;
    }

    fn fail(&self, state: u8) {
        self.watch
            .state
            .store(state, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The error of a request body that went past `max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes (max_request_body)")]
pub struct TooLarge(pub u64);

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(limit) = this.watch.exceeded() {
            return Poll::Ready(Some(Err(TooLarge(limit).into())));
        }
        if this.watch.banned().is_some() {
            return Poll::Ready(Some(Err(Banned.into())));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(ban) = this.bans.as_mut().and_then(|b| b.poll(&polled, cx)) {
            this.cut(ban);
            return Poll::Ready(Some(Err(Banned.into())));
        }
        this.watch
            .waiting
            .store(polled.is_pending(), std::sync::atomic::Ordering::Relaxed);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.fail(TOO_LARGE);
                        return Poll::Ready(Some(Err(TooLarge(this.watch.limit).into())));
                    }
                    this.left -= n;
                    return Poll::Ready(Some(Ok(frame)));
                }
                match frame.into_trailers() {
                    Ok(mut trailers) => {
                        crate::proxy::headers::strip_request_trailers(&mut trailers);
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                }
            }
            Poll::Ready(Some(Err(e))) => {
                this.fail(if client_gone(&*e) { GONE } else { FAILED });
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose first frame (or error) has been read already: `forward` reads it to learn
/// whether a GET that did not say so is empty, HTTP/3 to learn whether a request's stream
/// ended with its head.
pub struct Prefixed<B> {
    first: Option<Result<Frame<Bytes>, BoxError>>,
    rest: B,
}

impl<B> Prefixed<B> {
    pub fn new(first: Result<Frame<Bytes>, BoxError>, rest: B) -> Prefixed<B> {
        Prefixed {
            first: Some(first),
            rest,
        }
    }
}

impl<B> http_body::Body for Prefixed<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let first = match &self.first {
            Some(Ok(f)) => f.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(first));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(first));
        }
        hint
    }
}

/// A request body whose small pieces that are there together are passed on as one: a
/// client's DATA frames of a few bytes each (HTTP/2, HTTP/3) would otherwise reach an HTTP/2
/// upstream as as many tiny frames, which costs the upstream a frame each and trips the
/// small-frame flood limits of HTTP/2 servers (h2's `ENHANCE_YOUR_CALM`, which closes the
/// whole upstream connection, the other clients' streams on it with it). Nothing is ever
/// waited for: what is not there yet goes in a later piece, so a streaming call is not
/// delayed. A piece of `COALESCED` bytes or more passes as it came, without a copy.
pub struct Coalesced {
    inner: Body,
    /// A frame taken from `inner` that did not fit (trailers, an error, the end, a large
    /// piece), passed on next.
    held: Option<Option<Result<Frame<Bytes>, BoxError>>>,
}

/// Pieces smaller than this are joined with what follows them.
const COALESCED: usize = 16 * 1024;

impl Coalesced {
    pub fn new(inner: Body) -> Coalesced {
        Coalesced { inner, held: None }
    }
}

impl http_body::Body for Coalesced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(held) = this.held.take() {
            return Poll::Ready(held);
        }
        let first = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if data.len() < COALESCED => data,
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            },
            other => return other,
        };
        let mut joined: Option<bytes::BytesMut> = None;
        loop {
            let len = joined.as_ref().map_or(first.len(), |j| j.len());
            if len >= COALESCED {
                break;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if len + data.len() <= COALESCED => {
                        let j = joined.get_or_insert_with(|| {
                            let mut j = bytes::BytesMut::with_capacity(COALESCED);
                            j.extend_from_slice(&first);
                            j
                        });
                        j.extend_from_slice(&data);
                    }
                    Ok(data) => {
                        this.held = Some(Some(Ok(Frame::data(data))));
                        break;
                    }
                    Err(frame) => {
                        this.held = Some(Some(Ok(frame)));
                        break;
                    }
                },
                // The end, or an error: after what was joined.
                Poll::Ready(end) => {
                    this.held = Some(end);
                    break;
                }
                Poll::Pending => break,
            }
        }
        let data = joined.map_or(first, bytes::BytesMut::freeze);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.held, Some(None)) || (self.held.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(Some(Ok(frame))) = &self.held {
            if let Some(data) = frame.data_ref() {
                let n = data.len() as u64;
                hint.set_lower(hint.lower() + n);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + n);
                }
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body made of `frames`, all there at once.
    fn frames(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> Body {
        Body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    async fn all(mut body: Coalesced) -> Vec<Result<Frame<Bytes>, String>> {
        let mut out = Vec::new();
        while let Some(f) = body.frame().await {
            out.push(f.map_err(|e| e.to_string()));
        }
        out
    }

    #[tokio::test]
    async fn small_pieces_are_joined_and_what_follows_them_kept_in_order() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let mut input: Vec<Result<Frame<Bytes>, BoxError>> = (0..100)
            .map(|_| Ok(Frame::data(Bytes::from_static(b"ab"))))
            .collect();
        input.push(Ok(Frame::data(Bytes::new())));
        input.push(Ok(Frame::data(Bytes::from(vec![7u8; 20_000]))));
        input.push(Ok(Frame::data(Bytes::from_static(b"z"))));
        input.push(Ok(Frame::trailers(trailers.clone())));
        let out = all(Coalesced::new(frames(input))).await;
        let data: Vec<usize> = out
            .iter()
            .filter_map(|f| f.as_ref().ok()?.data_ref().map(|d| d.len()))
            .collect();
        // The 100 small pieces as one, the large one as it came, then the last small one.
        assert_eq!(data, [200, 20_000, 1]);
        let last = out.last().unwrap().as_ref().unwrap();
        assert_eq!(last.trailers_ref(), Some(&trailers));
    }

    #[tokio::test]
    async fn an_error_comes_after_the_pieces_before_it() {
        let input: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
            Err("broken".into()),
        ];
        let out = all(Coalesced::new(frames(input))).await;
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].as_ref().unwrap().data_ref().unwrap(), "ab");
        assert_eq!(out[1].as_ref().unwrap_err(), "broken");
    }
}
