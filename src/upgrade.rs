//! Connections handed over by a 101 (Switching Protocols) response, from the server that read
//! the request to the stage that serves the new protocol (the forwarder's WebSocket tunnel).
//! Only HTTP/1.1 has upgrades: Wraith's HTTP/1.1 server (`listener::h1`) offers the
//! connection of a request that asked for one, and the pipeline takes it with `on_upgrade`
//! once its 101 has been sent.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::body::Body;

/// Any stream an upgraded connection can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection handed over by a 101 response: the stream, and the bytes the client sent
/// after its request that were already read.
pub struct Upgraded {
    io: Box<dyn Io>,
    leftover: Bytes,
    /// Dropped with the connection: the server that handed it over waits for that, so the
    /// connection keeps its listener slot (`max_connections`) and stays one of the
    /// connections a shutdown drains for as long as the new protocol runs.
    _done: oneshot::Sender<()>,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.remaining());
            let chunk = self.leftover.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Upgraded {
    /// The connection, and what resolves when it is dropped.
    pub(crate) fn new(io: Box<dyn Io>, leftover: Bytes) -> (Upgraded, oneshot::Receiver<()>) {
        let (done, ended) = oneshot::channel();
        let upgraded = Upgraded {
            io,
            leftover,
            _done: done,
        };
        (upgraded, ended)
    }
}

/// The pending upgrade of a request that asked for one (`Connection: upgrade`), as a request
/// extension (which must be `Clone`: the first `on_upgrade` takes it).
#[derive(Clone)]
struct PendingUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

/// A server's offer to hand over the connection of a request that asked for an upgrade:
/// the server keeps the sender and sends the connection once its 101 is out.
pub(crate) fn offer() -> (oneshot::Sender<Upgraded>, Offer) {
    let (tx, rx) = oneshot::channel();
    (tx, Offer(rx))
}

/// The receiving end of `offer`, until it goes into its request.
pub(crate) struct Offer(oneshot::Receiver<Upgraded>);

impl Offer {
    /// Puts the offer into the request, for `on_upgrade`.
    pub(crate) fn attach(self, req: &mut Request<Body>) {
        req.extensions_mut()
            .insert(PendingUpgrade(Arc::new(Mutex::new(Some(self.0)))));
    }
}

/// The connection of `req` once its 101 response has been sent. Fails when the request
/// did not ask for an upgrade, did not come over HTTP/1.1, or the connection ended first.
pub fn on_upgrade(req: &mut Request<Body>) -> OnUpgrade {
    OnUpgrade(
        req.extensions_mut()
            .remove::<PendingUpgrade>()
            .and_then(|p| p.0.lock().ok()?.take()),
    )
}

/// Resolves to the upgraded connection (`on_upgrade`).
pub struct OnUpgrade(Option<oneshot::Receiver<Upgraded>>);

impl Future for OnUpgrade {
    type Output = Result<Upgraded, &'static str>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.as_mut() {
            Some(rx) => Pin::new(rx)
                .poll(cx)
                .map_err(|_| "the connection ended before the upgrade"),
            None => Poll::Ready(Err("the request cannot be upgraded")),
        }
    }
}
