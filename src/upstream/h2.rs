//! HTTP/2 connections to one endpoint (`protocol = "h2c"` or `"h2"`): as many as the requests
//! in flight need, each carrying up to `h2_max_streams` of them.
//!
//! Each connection is a hyper client of its own (hyper's pool keeps one HTTP/2 connection per
//! origin, makes it on first use, makes it again when it closes and closes it when idle). A
//! request takes the first connection with a stream to spare, so traffic packs onto as few
//! connections as it needs and the ones past them go idle and close; when every connection is
//! full, another is added. Without this, requests past the upstream's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` waited inside the one connection, and their wait counted
//! toward their response timeout (Envoy's connection pool does the same: a new connection when
//! the ready ones have no stream left).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper_util::client::legacy::{Builder, Client};

use super::tls::Connector;
use crate::body::Body;

/// The HTTP/2 connections of one endpoint.
pub struct Conns {
    connections: Mutex<Vec<Arc<Connection>>>,
    builder: Builder,
    connector: Connector,
    /// Streams put on one connection before another is used.
    max_streams: usize,
}

struct Connection {
    client: Client<Connector, Body>,
    /// Requests on this connection until their response bodies end.
    streams: AtomicUsize,
}

/// A request's place on one connection, given back when its last clone is dropped: the
/// response body holds one (see `Body::Tracked`), and a request body still streaming when the
/// response ends holds another (`Uploading`), since its HTTP/2 stream is open until then.
#[derive(Clone)]
pub struct Stream(Arc<Place>);

struct Place {
    connection: Arc<Connection>,
    /// Pieces of the request body sent so far (`Uploading`): the response's stall timer
    /// does not cut a stream whose request is still moving (`Tracked`).
    sent: AtomicU64,
}

impl Stream {
    /// The client of the connection the request goes on.
    pub fn client(&self) -> &Client<Connector, Body> {
        &self.0.connection.client
    }

    /// How many pieces of the request body have gone so far.
    pub fn sent(&self) -> u64 {
        self.0.sent.load(Ordering::Relaxed)
    }

    /// Whether the request body is still being sent: its `Uploading` holds the other clone
    /// of the place until it ends.
    pub fn uploading(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.connection.streams.fetch_sub(1, Ordering::Release);
    }
}

/// A request body that holds its request's place on the connection until it ends: an
/// upstream may answer before it has read the whole body (an early error, a gRPC call that
/// ends first), and the stream stays open, counting against the upstream's
/// `SETTINGS_MAX_CONCURRENT_STREAMS`, while the body is still sent.
pub struct Uploading<B> {
    body: B,
    stream: Option<Stream>,
}

impl<B> Uploading<B> {
    pub fn new(body: B, stream: Stream) -> Uploading<B> {
        Uploading {
            body,
            stream: Some(stream),
        }
    }
}

impl<B> http_body::Body for Uploading<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(_))) => {
                if let Some(s) = &self.stream {
                    s.0.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            std::task::Poll::Ready(None | Some(Err(_))) => self.stream = None,
            std::task::Poll::Pending => {}
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

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h2::Stream").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h2::Conns")
            .field("connections", &self.connections())
            .field("max_streams", &self.max_streams)
            .finish()
    }
}

impl Conns {
    pub fn new(builder: Builder, connector: Connector, max_streams: usize) -> Conns {
        Conns {
            connections: Mutex::new(Vec::new()),
            builder,
            connector,
            max_streams: max_streams.max(1),
        }
    }

    /// A place for one request on the first connection with a stream to spare (a new
    /// connection when none has).
    pub fn take(&self) -> Stream {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let spare = connections
            .iter()
            .find(|c| c.streams.load(Ordering::Acquire) < self.max_streams);
        let connection = match spare {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(Connection {
                    client: self.builder.build(self.connector.clone()),
                    streams: AtomicUsize::new(0),
                });
                connections.push(c.clone());
                c
            }
        };
        connection.streams.fetch_add(1, Ordering::Relaxed);
        drop(connections);
        Stream(Arc::new(Place {
            connection,
            sent: AtomicU64::new(0),
        }))
    }

    /// Connections used so far (each reconnects when its connection closes and is used again).
    pub fn connections(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioExecutor;
    use std::time::Duration;

    fn conns(max_streams: usize) -> Conns {
        Conns::new(
            Client::builder(TokioExecutor::new()),
            Connector {
                tls: None,
                timeout: Duration::from_secs(1),
            },
            max_streams,
        )
    }

    #[test]
    fn requests_fill_one_connection_before_the_next_and_come_back_to_the_first() {
        let c = conns(2);
        let a = c.take();
        let b = c.take();
        assert_eq!(c.connections(), 1);
        let d = c.take();
        assert_eq!(c.connections(), 2);
        let on = |s: &Stream| Arc::as_ptr(&s.0.connection);
        assert!(on(&a) != on(&d) && on(&a) == on(&b));
        // A stream ends on the first connection: the next request goes there, not to a
        // third connection nor to the second.
        drop(b);
        let e = c.take();
        assert_eq!(on(&a), on(&e));
        assert_eq!(c.connections(), 2);
        drop((a, d, e));
        let f = c.take();
        assert_eq!(f.0.connection.streams.load(Ordering::Relaxed), 1);
        assert_eq!(c.connections(), 2);
    }

    struct Channel(tokio::sync::mpsc::Receiver<bytes::Bytes>);

    impl http_body::Body for Channel {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    /// The place stays taken while any clone of it (the response body's, the request
    /// body's) is alive, and is freed when the request body ends.
    #[tokio::test]
    async fn a_request_body_still_sending_keeps_the_place() {
        use http_body_util::BodyExt;
        let c = conns(1);
        let a = c.take();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut upload = Uploading::new(Channel(rx), a.clone());
        drop(a); // the response ended
        let b = c.take();
        assert_eq!(c.connections(), 2, "the upload's connection had no room");
        tx.send(bytes::Bytes::from_static(b"x")).await.unwrap();
        drop(tx);
        assert!(upload.frame().await.is_some());
        assert!(upload.frame().await.is_none());
        drop(b);
        let d = c.take();
        assert_eq!(c.connections(), 2);
        assert_eq!(d.0.connection.streams.load(Ordering::Relaxed), 1);
        // Both connections free: the first one is taken again.
        assert_eq!(
            Arc::as_ptr(&d.0.connection),
            Arc::as_ptr(&c.connections.lock().unwrap()[0])
        );
    }
}
