//! Upstream pools: the endpoints of each `[[upstream]]`, their connection pools, and the
//! choice of endpoint for each request (round robin until the load-balancing work replaces it).
//!
//! HTTP/1.1 upstreams use Wraith's own client (`h1`): the request's task drives the pooled
//! socket directly. `h2c` upstreams (gRPC) use hyper's HTTP/2 client, whose multiplexing a
//! single connection per endpoint serves well.

pub mod forwarder;
pub mod h1;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
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
    /// Idle HTTP/1.1 connections and the in-flight count.
    pub pool: Arc<h1::Pool>,
    /// Requests forwarded since the upstream was built.
    pub requests: AtomicU64,
    /// Connect failures since the upstream was built.
    pub failures: AtomicU64,
}

impl Endpoint {
    /// Requests in flight to this endpoint (until their response bodies end).
    pub fn in_flight(&self) -> usize {
        self.pool.in_flight.load(Ordering::Relaxed)
    }
}

/// An upstream pool.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub endpoints: Vec<Endpoint>,
    /// hyper's client, for `h2c` upstreams only.
    h2: Option<Client<HttpConnector, Body>>,
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
    /// Builds the pools. No connection is made until the first request.
    pub fn new(config: UpstreamConfig) -> Arc<Upstream> {
        let h2 = (config.protocol == UpstreamProtocol::H2c).then(|| {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(config.connect_timeout));
            connector.enforce_http(true);
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(config.idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(true)
                .set_host(false)
                .build(connector)
        });
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| Endpoint {
                authority: e.authority.clone(),
                scheme: Scheme::HTTP,
                pool: h1::Pool::new(
                    e.authority.clone(),
                    config.max_idle_per_endpoint,
                    config.idle_timeout,
                    config.connect_timeout,
                ),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            })
            .collect();
        let upstream = Arc::new(Upstream {
            config,
            endpoints,
            h2,
            next: AtomicUsize::new(0),
        });
        spawn_sweeper(&upstream);
        upstream
    }

    /// The next endpoint, round robin.
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    pub(crate) fn h2_client(&self) -> Option<&Client<HttpConnector, Body>> {
        self.h2.as_ref()
    }
}

/// Closes idle connections past their idle timeout, until the upstream is dropped.
fn spawn_sweeper(upstream: &Arc<Upstream>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak: Weak<Upstream> = Arc::downgrade(upstream);
    let every = (upstream.config.idle_timeout / 2).max(Duration::from_secs(1));
    rt.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(u) = weak.upgrade() else { return };
            for e in &u.endpoints {
                e.pool.sweep();
            }
        }
    });
}
