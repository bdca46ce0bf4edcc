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

use std::sync::atomic::{AtomicUsize, Ordering};
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

/// A request's place on one connection, given back when it is dropped (with the response
/// body: see `Body::Tracked`).
pub struct Stream(Arc<Connection>);

impl Stream {
    /// The client of the connection the request goes on.
    pub fn client(&self) -> &Client<Connector, Body> {
        &self.0.client
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Release);
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
        Stream(connection)
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
        assert!(!Arc::ptr_eq(&a.0, &d.0) && Arc::ptr_eq(&a.0, &b.0));
        // A stream ends on the first connection: the next request goes there, not to a
        // third connection nor to the second.
        drop(b);
        let e = c.take();
        assert!(Arc::ptr_eq(&a.0, &e.0));
        assert_eq!(c.connections(), 2);
        drop((a, d, e));
        let f = c.take();
        assert_eq!(f.0.streams.load(Ordering::Relaxed), 1);
        assert_eq!(c.connections(), 2);
    }
}
