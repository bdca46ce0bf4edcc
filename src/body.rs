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
    /// An HTTP/2 upstream's response body, holding its endpoint's in-flight slot until it ends.
    Tracked(hyper::body::Incoming, crate::upstream::h1::InFlight),
    /// Anything else (HTTP/3 streams, wrapped bodies).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
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
            Body::Upstream(b) => Pin::new(b).poll_frame(cx),
            Body::Tracked(b, _) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Body::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Incoming(b) => b.is_end_stream(),
            Body::H1(b) => b.is_end_stream(),
            Body::Upstream(b) => b.is_end_stream(),
            Body::Tracked(b, _) => b.is_end_stream(),
            Body::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(b) => b.size_hint(),
            Body::H1(b) => b.size_hint(),
            Body::Upstream(b) => b.size_hint(),
            Body::Tracked(b, _) => b.size_hint(),
            Body::Boxed(b) => b.size_hint(),
        }
    }
}
