//! Upstream pools: the endpoints of each `[[upstream]]`, their connection pools and health,
//! and the choice of endpoint for each request.
//!
//! - `balance`: the five algorithms, over precomputed tables.
//! - `health`: active checks and passive outlier ejection.
//! - `h1`: Wraith's own HTTP/1.1 client; the request's task drives the pooled socket.
//! - `tls`: TLS to `https://` endpoints (HTTP/1.1 and HTTP/2).
//! - `h2`: HTTP/2 upstreams, through hyper's client: as many connections per endpoint as the
//!   requests in flight need, `h2_max_streams` each.
//! - `forwarder`: request rewrite, retries, and the HTTP/2 path.

pub mod balance;
pub mod forwarder;
pub mod h1;
pub mod h2;
pub mod health;
pub mod tls;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderMap;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use crate::config::{HashKey, UpstreamConfig};
use balance::{Balancer, Tried};
use health::EndpointHealth;

/// One upstream server.
#[derive(Debug)]
pub struct Endpoint {
    pub authority: Authority,
    pub scheme: Scheme,
    /// Relative share of requests.
    pub weight: u32,
    /// Concurrent requests allowed (`usize::MAX`: no limit).
    pub max_connections: usize,
    /// Idle HTTP/1.1 connections and the in-flight count.
    pub pool: Arc<h1::Pool>,
    /// The HTTP/2 connections (`h2c` and `h2` upstreams only).
    pub h2: Option<h2::Conns>,
    /// Active and passive health; shared with the next generation when unchanged.
    pub health: Arc<EndpointHealth>,
    /// The request line and headers of an active health check.
    check_head: Arc<[u8]>,
    /// Requests forwarded since the upstream was built.
    pub requests: AtomicU64,
    /// Connect failures since the upstream was built.
    pub failures: AtomicU64,
}

impl Endpoint {
    /// Requests in flight to this endpoint (until their response bodies end).
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.pool.in_flight.load(Ordering::Relaxed)
    }

    #[inline]
    fn has_capacity(&self) -> bool {
        self.max_connections == usize::MAX || self.in_flight() < self.max_connections
    }
}

/// An upstream pool.
pub struct Upstream {
    /// Unique per upstream built (see `own_health`).
    pub id: u64,
    pub config: UpstreamConfig,
    pub endpoints: Vec<Endpoint>,
    balancer: Balancer,
    /// Requests waiting for an endpoint under its `max_connections`.
    pending: AtomicUsize,
    /// Woken when a request ends (only wired up when endpoints have connection limits).
    released: Option<Arc<Notify>>,
    /// Set while every endpoint is unhealthy (so that is logged once, not per request).
    all_down: AtomicBool,
    /// Held while an endpoint is ejected: the share of the pool out of service is counted
    /// and changed as one step (two endpoints reaching their threshold at once must not
    /// both pass the count).
    pub(crate) ejecting: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.config.name)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// The outcome of choosing an endpoint.
pub enum Selection {
    /// This endpoint, with its in-flight slot already taken.
    Endpoint(usize, h1::InFlight),
    /// Healthy endpoints exist but all are at `max_connections`.
    Full,
    /// No endpoint is healthy (or every healthy one was tried already).
    Unavailable,
}

impl Upstream {
    /// Makes this upstream's active checks the ones that decide its endpoints' health (call
    /// once its snapshot is live). An older upstream sharing an endpoint's health (the one a
    /// reload replaced, still held by a long request) stops checking it; if this one has no
    /// checks, what the old ones concluded no longer holds.
    pub fn own_health(&self) {
        for e in &self.endpoints {
            let before = e.health.checker.swap(self.id, Ordering::Relaxed);
            if before != self.id && self.config.health_check.is_none() {
                e.health.clear_active_down();
            }
        }
    }

    /// Has the pools of `previous` (the upstream of the same name in the snapshot a reload
    /// replaced with this one's) wake this upstream's waiters when their requests end: those
    /// still count against the endpoints' `max_connections`. Call once this upstream's
    /// snapshot is live, not while building it: a pool tells only the first upstream that
    /// asks, and one of a reload that then failed would take its place for good.
    pub fn hear_releases_of(&self, previous: &Upstream) {
        let Some(release) = &self.released else {
            return;
        };
        for e in &self.endpoints {
            if let Some(old) = previous.endpoint_like(&e.authority, e.scheme == Scheme::HTTPS) {
                old.pool.notify_on_release(release);
            }
        }
    }

    /// The endpoint at `authority`, over TLS or not.
    fn endpoint_like(&self, authority: &Authority, tls: bool) -> Option<&Endpoint> {
        self.endpoints
            .iter()
            .find(|e| e.authority == *authority && e.scheme == scheme_of(tls))
    }

    /// Builds the pools and starts health checks. No request connection is made until the
    /// first request. The health of endpoints that `previous` (the upstream of the same
    /// name in the running snapshot) also has is carried over.
    pub fn new(config: UpstreamConfig, previous: Option<&Upstream>) -> Arc<Upstream> {
        // The previous snapshot's requests still end on its pools: waiters here must hear
        // of them too.
        let released = config.has_connection_limits().then(|| {
            previous
                .and_then(|p| p.released.clone())
                .unwrap_or_else(|| Arc::new(Notify::new()))
        });
        // Config building already checked the TLS settings; a failure here means the files
        // changed in between. Those endpoints then fail their handshakes (a configuration
        // that trusts nothing), never fall back to cleartext.
        let tls_for = |alpn: &[&[u8]]| {
            config.tls.as_ref().and_then(|t| {
                let built = tls::client_config(t, alpn).or_else(|e| {
                    tracing::error!(upstream = %config.name, error = %e, "upstream TLS setup failed; its https endpoints will refuse to connect");
                    tls::refusing_config()
                });
                match built {
                    Ok(c) => Some(Arc::new((
                        TlsConnector::from(c),
                        t.server_name.as_deref().map(Arc::from),
                    ))),
                    Err(e) => {
                        tracing::error!(upstream = %config.name, error = %e, "upstream TLS setup failed");
                        None
                    }
                }
            })
        };
        let h1_tls = tls_for(&[b"http/1.1"]);
        let h2_tls = tls_for(&[b"h2"]);
        let h2 = config.protocol.is_h2().then(|| {
            let connector = tls::Connector {
                tls: if config.endpoints.iter().any(|e| e.tls) {
                    h2_tls.clone()
                } else {
                    None
                },
                timeout: config.connect_timeout,
            };
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_idle_timeout(config.idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(true)
                .set_host(false)
                // A connection the network dropped silently (NAT, a load balancer) is found
                // and closed, rather than taking every request's response timeout until TCP
                // gives up.
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_timeout(Duration::from_secs(10))
                .http2_keep_alive_while_idle(true);
            (builder, connector)
        });
        let mut in_flight = InFlightRegistry::lock();
        let endpoints: Vec<Endpoint> = config
            .endpoints
            .iter()
            .map(|e| {
                let same = previous.and_then(|p| p.endpoint_like(&e.authority, e.tls));
                let health = same
                    .map(|old| old.health.clone())
                    .unwrap_or_else(|| EndpointHealth::new(&config.name, e.authority.as_str()));
                let pool_tls = if !e.tls {
                    None
                } else if config.protocol.is_h2() {
                    h2_tls.clone()
                } else {
                    h1_tls.clone()
                };
                Endpoint {
                    authority: e.authority.clone(),
                    scheme: scheme_of(e.tls),
                    weight: e.weight,
                    max_connections: e.max_connections,
                    pool: h1::Pool::new(
                        e.authority.clone(),
                        h1::PoolOptions {
                            max_idle: config.max_idle_per_endpoint,
                            idle_timeout: config.idle_timeout,
                            connect_timeout: config.connect_timeout,
                            tls: pool_tls,
                            release: released.clone(),
                            in_flight: Some(in_flight.of(
                                &config.name,
                                e.authority.as_str(),
                                e.tls,
                            )),
                        },
                    ),
                    h2: h2.as_ref().map(|(builder, connector)| {
                        h2::Conns::new(builder.clone(), connector.clone(), config.h2_max_streams)
                    }),
                    health,
                    check_head: config
                        .health_check
                        .as_ref()
                        .map(|c| health::check_head(c, e.authority.as_str()))
                        .unwrap_or_else(|| Arc::from(&b""[..])),
                    requests: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                }
            })
            .collect();
        drop(in_flight);
        let names: Vec<&str> = endpoints.iter().map(|e| e.authority.as_str()).collect();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let balancer = Balancer::new(config.algorithm, &names, &weights);
        static IDS: AtomicU64 = AtomicU64::new(1);
        let upstream = Arc::new(Upstream {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            config,
            endpoints,
            balancer,
            pending: AtomicUsize::new(0),
            released,
            all_down: AtomicBool::new(false),
            ejecting: std::sync::Mutex::new(()),
        });
        if upstream.config.outlier.consecutive_failures != 0 {
            for e in &upstream.endpoints {
                e.pool.report_to(h1::Report {
                    health: e.health.clone(),
                    outlier: upstream.config.outlier.clone(),
                    upstream: Arc::downgrade(&upstream),
                });
            }
        }
        spawn_sweeper(&upstream);
        health::spawn_checks(&upstream);
        upstream
    }

    /// The hash key of a request, for `ip_hash` (0 for the other algorithms).
    #[inline]
    pub fn hash_key(&self, client_ip: IpAddr, headers: &HeaderMap, path: &str) -> u64 {
        if self.config.algorithm != crate::config::Algorithm::IpHash {
            return 0;
        }
        let fallback = || balance::hash_ip(client_ip);
        match &self.config.hash_key {
            HashKey::ClientIp => fallback(),
            HashKey::Path => balance::hash_bytes(path.as_bytes(), 0),
            HashKey::Header(name) => headers
                .get(name)
                .map_or_else(fallback, |v| balance::hash_bytes(v.as_bytes(), 0)),
            HashKey::Cookie(name) => cookie(headers, name)
                .map_or_else(fallback, |v| balance::hash_bytes(v.as_bytes(), 0)),
        }
    }

    /// Chooses an endpoint not in `tried` and takes an in-flight slot on it.
    pub fn select(&self, key: u64, tried: &Tried) -> Selection {
        let eps = &self.endpoints;
        for _ in 0..4 {
            let healthy = |i: usize| {
                !tried.contains(i) && eps[i].health.is_available() && eps[i].has_capacity()
            };
            let pick = match self.balancer.pick(eps, key, healthy) {
                Some(i) => Some(i),
                None => {
                    let any_healthy =
                        (0..eps.len()).any(|i| !tried.contains(i) && eps[i].health.is_available());
                    if any_healthy {
                        return Selection::Full;
                    }
                    let all_down = (0..eps.len()).all(|i| !eps[i].health.is_available());
                    if all_down {
                        self.note_all_down();
                    }
                    // fail_open is for a pool with no healthy endpoint at all: a request that
                    // has tried the healthy ones is not sent to the unhealthy ones.
                    if !self.config.fail_open || !all_down {
                        return Selection::Unavailable;
                    }
                    let untried = |i: usize| !tried.contains(i) && eps[i].has_capacity();
                    match self.balancer.pick(eps, key, untried) {
                        Some(i) => Some(i),
                        None if (0..eps.len()).any(|i| !tried.contains(i)) => {
                            return Selection::Full
                        }
                        None => return Selection::Unavailable,
                    }
                }
            };
            if let Some(i) = pick {
                if self.all_down.load(Ordering::Relaxed) && eps[i].health.is_available() {
                    self.all_down.store(false, Ordering::Relaxed);
                }
                // The slot is taken atomically; another request may have beaten us to it.
                if let Some(guard) = eps[i].pool.try_acquire(eps[i].max_connections) {
                    return Selection::Endpoint(i, guard);
                }
            }
        }
        Selection::Full
    }

    /// Logs (once per episode) that no endpoint is healthy.
    #[cold]
    fn note_all_down(&self) {
        if !self.all_down.swap(true, Ordering::Relaxed) {
            if self.config.fail_open {
                tracing::warn!(upstream = %self.config.name, "every endpoint is unhealthy; fail_open = true, so requests are sent to them anyway");
            } else {
                tracing::error!(upstream = %self.config.name, "every endpoint is unhealthy; requests get 503 until one recovers");
            }
        }
    }

    /// Requests waiting for a free endpoint right now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Waits (up to `pending_timeout`, at most `max_pending` waiters) for an endpoint with a
    /// free slot. `None` when the queue is full or the wait timed out.
    pub(crate) async fn select_waiting(&self, key: u64, tried: &Tried) -> Option<Selection> {
        let released = self.released.as_ref()?;
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.config.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let _waiting = PendingGuard(&self.pending);
        let deadline = tokio::time::Instant::now() + self.config.pending_timeout;
        loop {
            let notified = released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.select(key, tried) {
                Selection::Full => {}
                other => return Some(other),
            }
            // Woken when a request of the upstream ends or an endpoint's health check passes;
            // a passive ejection ends with time only, so its end is a wake-up too.
            let wake = match self.next_ejection_end() {
                Some(end) => deadline.min(tokio::time::Instant::now() + end),
                None => deadline,
            };
            if tokio::time::timeout_at(wake, notified).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return None;
            }
        }
    }

    /// How long until the first passive ejection of an endpoint ends, if one is ejected.
    fn next_ejection_end(&self) -> Option<Duration> {
        self.endpoints
            .iter()
            .filter_map(|e| e.health.ejection_left())
            .min()
    }

    /// Wakes the requests waiting for a free endpoint (an endpoint came back).
    pub(crate) fn wake_waiters(&self) {
        if let Some(n) = &self.released {
            n.notify_waiters();
        }
    }
}

/// An endpoint's in-flight count, by upstream name, authority and scheme.
type InFlightCounts =
    std::collections::HashMap<(Arc<str>, Box<str>, bool), std::sync::Weak<AtomicUsize>>;

/// The in-flight counts of every endpoint some pool still has, whatever snapshot built the
/// pool: a reload's new pool for an endpoint goes on with the count of the requests still
/// running on the old ones, also when an earlier reload had removed the endpoint
/// (`max_connections`, `least_connections`).
static IN_FLIGHT: std::sync::Mutex<Option<InFlightCounts>> = std::sync::Mutex::new(None);

/// The counts, locked while an upstream is built.
struct InFlightRegistry(std::sync::MutexGuard<'static, Option<InFlightCounts>>);

impl InFlightRegistry {
    fn lock() -> InFlightRegistry {
        let mut map = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        // The counts no pool holds any more go.
        map.get_or_insert_default()
            .retain(|_, w| w.strong_count() > 0);
        InFlightRegistry(map)
    }

    /// The in-flight count of an endpoint: the one its running requests use, or a new one.
    fn of(&mut self, upstream: &Arc<str>, authority: &str, tls: bool) -> Arc<AtomicUsize> {
        let map = self.0.get_or_insert_default();
        let key = (upstream.clone(), Box::<str>::from(authority), tls);
        if let Some(count) = map.get(&key).and_then(std::sync::Weak::upgrade) {
            return count;
        }
        let count = Arc::new(AtomicUsize::new(0));
        map.insert(key, Arc::downgrade(&count));
        count
    }
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn scheme_of(tls: bool) -> Scheme {
    if tls {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    }
}

/// The value of cookie `name` in the request's Cookie headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k.trim() == name).then(|| v.trim())
        })
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
