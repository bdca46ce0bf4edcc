//! Upstream pools: one pooled hyper client per `[[upstream]]`, its endpoints, and the choice
//! of endpoint for each request (round robin until the load-balancing work replaces it).

pub mod forwarder;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::{UpstreamConfig, UpstreamProtocol};

/// One upstream server.
#[derive(Debug)]
pub struct Endpoint {
    pub authority: Authority,
    pub scheme: Scheme,
    /// Requests currently being forwarded to this endpoint.
    pub in_flight: AtomicUsize,
    /// Requests forwarded since the upstream was built.
    pub requests: AtomicU64,
    /// Connect failures since the upstream was built.
    pub failures: AtomicU64,
}

/// An upstream pool.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub endpoints: Vec<Endpoint>,
    client: Client<HttpConnector, Body>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.config.name)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Upstream {
    /// Builds the pool. No connection is made until the first request.
    pub fn new(config: UpstreamConfig) -> Arc<Upstream> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_idle_per_endpoint)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // Wraith sets Host itself (the client's Host is preserved).
            .set_host(false);
        if config.protocol == UpstreamProtocol::H2c {
            builder.http2_only(true);
        }
        let client = builder.build(connector);
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| Endpoint {
                authority: e.authority.clone(),
                scheme: Scheme::HTTP,
                in_flight: AtomicUsize::new(0),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Upstream {
            config,
            endpoints,
            client,
            next: AtomicUsize::new(0),
        })
    }

    /// The next endpoint, round robin.
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    pub(crate) fn client(&self) -> &Client<HttpConnector, Body> {
        &self.client
    }
}
