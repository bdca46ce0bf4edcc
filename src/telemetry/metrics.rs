//! Prometheus metrics: one explicit `Registry` owned by the runtime (no globals), exposed as
//! OpenMetrics text on the optional metrics listener and on the admin socket.
//!
//! The request path never looks a series up by label: routes and upstream endpoints get their
//! handles when a snapshot is built (`RouteMetrics`, `EndpointMetrics`), and a request only
//! does atomic adds. Histograms are fixed-bucket and lock-free (`AtomicHistogram`).
//! Label values come from the config (route, upstream, endpoint, listener names) or from small
//! closed sets (status class, protocol, effect, origin); never a path or an address.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the latency histograms; the last bucket is +Inf.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A fixed-bucket histogram of durations whose `observe` is a few relaxed atomic adds.
#[derive(Debug, Clone, Default)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug, Default)]
struct HistogramInner {
    /// One counter per bucket of `LATENCY_BUCKETS`, plus +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl AtomicHistogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (i, b) in self.0.buckets.iter().enumerate() {
            let upper = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX);
            buckets.push((upper, b.load(Ordering::Relaxed)));
        }
        // The count is the sum of the buckets, so the exposition is self-consistent even
        // while requests are being observed.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// `{route}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

/// `{route, status_class, protocol}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status_class: &'static str,
    pub protocol: &'static str,
}

/// `{route, code}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteErrorLabels {
    pub route: String,
    pub code: &'static str,
}

/// `{upstream, endpoint}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub upstream: String,
    pub endpoint: String,
}

/// `{upstream, endpoint, code}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointErrorLabels {
    pub upstream: String,
    pub endpoint: String,
    pub code: &'static str,
}

/// `{listener, protocol}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub listener: String,
    pub protocol: &'static str,
}

/// `{listener, reason}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: String,
    pub reason: &'static str,
}

/// Why a connection was refused at accept, or closed for what its client did
/// (`h2_rapid_reset`: HTTP/2 streams reset, `listener::conn`; `h3_rapid_reset`: HTTP/3
/// requests cancelled, `listener/quic/cancels.rs`) (`wraith_connections_refused_total`).
const REFUSALS: [&str; 5] = [
    "per_client_limit",
    "proxy_untrusted",
    "proxy_header",
    "h2_rapid_reset",
    "h3_rapid_reset",
];

/// `{listener, version, group, result}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub listener: String,
    pub version: &'static str,
    pub group: &'static str,
    pub result: &'static str,
}

/// `{listener}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

/// `{route, effect}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub route: String,
    pub effect: &'static str,
}

/// `{origin}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    pub origin: &'static str,
}

/// `{result}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// `{reason}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// `{sink}`
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: &'static str,
}

/// The route label of requests no route matched.
pub const NO_ROUTE: &str = "(none)";

/// Every value `origin_label` can return.
pub const ORIGINS: [&str; 10] = [
    "crowdsec", "cscli", "capi", "lists", "console", "wazuh", "admin", "local", "wraith", "other",
];

/// Ban origins get a label of their own; anything else is counted as `other`. A family
/// (`wazuh:wraith-ban`, one per Wazuh active response) counts as its head (`wazuh`), so the
/// label set stays fixed.
pub fn origin_label(origin: &str) -> &'static str {
    let head = origin.split_once(':').map_or(origin, |(head, _)| head);
    match head.to_ascii_lowercase().as_str() {
        "crowdsec" => "crowdsec",
        "cscli" => "cscli",
        "capi" => "capi",
        "lists" => "lists",
        "console" => "console",
        "wazuh" => "wazuh",
        "admin" => "admin",
        "local" => "local",
        "wraith" => "wraith",
        _ => "other",
    }
}

/// Every metric family Wraith exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabel, AtomicHistogram>,
    pub request_errors: Family<RouteErrorLabels, Counter>,
    pub upstream_duration: Family<EndpointLabels, AtomicHistogram>,
    pub upstream_errors: Family<EndpointErrorLabels, Counter>,
    pub upstream_healthy: Family<EndpointLabels, Gauge>,
    pub active_connections: Family<ConnectionLabels, Gauge>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub tls_handshake_duration: Family<ListenerLabel, AtomicHistogram>,
    pub policy_decisions: Family<PolicyLabels, Counter>,
    pub ratelimit_rejections: Family<RouteLabel, Counter>,
    pub bans: Family<OriginLabel, Counter>,
    /// Set by the decision store: active ban decisions per origin.
    pub decisions_active: Family<OriginLabel, Gauge>,
    pub reloads: Family<ResultLabel, Counter>,
    pub log_written: Family<SinkLabel, Counter>,
    pub log_dropped: Family<SinkLabel, Counter>,
    /// What removes the series of routes, endpoints and listeners that are gone.
    series: Arc<Series>,
}

/// The series of routes and upstream endpoints, and how many live handle sets
/// (`RouteMetrics`, `EndpointMetrics`) name each: when the last one goes (a reload removed
/// the route or endpoint, and the last snapshot that had it has ended), its series go too.
/// A config whose endpoints keep changing would otherwise grow `/metrics` without end.
#[derive(Debug)]
struct Series {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabel, AtomicHistogram>,
    request_errors: Family<RouteErrorLabels, Counter>,
    policy_decisions: Family<PolicyLabels, Counter>,
    ratelimit_rejections: Family<RouteLabel, Counter>,
    upstream_duration: Family<EndpointLabels, AtomicHistogram>,
    upstream_errors: Family<EndpointErrorLabels, Counter>,
    upstream_healthy: Family<EndpointLabels, Gauge>,
    active_connections: Family<ConnectionLabels, Gauge>,
    connections_refused: Family<RefusedLabels, Counter>,
    tls_handshakes: Family<HandshakeLabels, Counter>,
    tls_handshake_duration: Family<ListenerLabel, AtomicHistogram>,
    /// Live handle sets per route, and the error codes its requests have had.
    routes: Mutex<HashMap<String, (usize, Vec<&'static str>)>>,
    endpoints: Mutex<HashMap<EndpointLabels, usize>>,
    /// Live handle sets per listener, and the (version, group, result) of its handshakes.
    listeners: Mutex<HashMap<String, (usize, Vec<HandshakeKind>)>>,
}

/// A handshake's `{version, group, result}`.
type HandshakeKind = (&'static str, &'static str, &'static str);

/// The codes `wraith_upstream_errors` counts.
pub const UPSTREAM_ERROR_CODES: [&str; 3] = [
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_failed",
];

impl Series {
    fn route_born(&self, route: &str) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.entry(route.to_string()).or_default().0 += 1;
    }

    fn route_gone(&self, route: &str) {
        // The series go while the lock is held: a route born again meanwhile (a reload that
        // brings it back) must not have its new series removed after it made them.
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let codes = {
            let Some(entry) = routes.get_mut(route) else {
                return;
            };
            entry.0 -= 1;
            if entry.0 > 0 {
                return;
            }
            routes
                .remove(route)
                .map(|(_, codes)| codes)
                .unwrap_or_default()
        };
        let name = route.to_string();
        for protocol in PROTOCOLS {
            for status_class in CLASSES {
                self.requests.remove(&RequestLabels {
                    route: name.clone(),
                    status_class,
                    protocol,
                });
            }
        }
        for effect in ["allow", "deny", "shadow_deny"] {
            self.policy_decisions.remove(&PolicyLabels {
                route: name.clone(),
                effect,
            });
        }
        for code in codes {
            self.request_errors.remove(&RouteErrorLabels {
                route: name.clone(),
                code,
            });
        }
        let label = RouteLabel { route: name };
        self.request_duration.remove(&label);
        self.ratelimit_rejections.remove(&label);
        drop(routes);
    }

    fn endpoint_born(&self, labels: &EndpointLabels) {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        *endpoints.entry(labels.clone()).or_default() += 1;
    }

    fn endpoint_gone(&self, labels: &EndpointLabels) {
        // As `route_gone`: removed under the lock.
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = endpoints.get_mut(labels) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        endpoints.remove(labels);
        self.upstream_duration.remove(labels);
        self.upstream_healthy.remove(labels);
        for code in UPSTREAM_ERROR_CODES {
            self.upstream_errors.remove(&EndpointErrorLabels {
                upstream: labels.upstream.clone(),
                endpoint: labels.endpoint.clone(),
                code,
            });
        }
        drop(endpoints);
    }

    fn listener_born(&self, listener: &str) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.entry(listener.to_string()).or_default().0 += 1;
    }

    fn listener_gone(&self, listener: &str) {
        // As `route_gone`: removed under the lock.
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        let kinds = {
            let Some(entry) = listeners.get_mut(listener) else {
                return;
            };
            entry.0 -= 1;
            if entry.0 > 0 {
                return;
            }
            listeners
                .remove(listener)
                .map(|(_, kinds)| kinds)
                .unwrap_or_default()
        };
        let name = listener.to_string();
        for protocol in PROTOCOLS {
            self.active_connections.remove(&ConnectionLabels {
                listener: name.clone(),
                protocol,
            });
        }
        for reason in REFUSALS {
            self.connections_refused.remove(&RefusedLabels {
                listener: name.clone(),
                reason,
            });
        }
        for (version, group, result) in kinds {
            self.tls_handshakes.remove(&HandshakeLabels {
                listener: name.clone(),
                version,
                group,
                result,
            });
        }
        self.tls_handshake_duration
            .remove(&ListenerLabel { listener: name });
        drop(listeners);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every family registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::default(),
            request_errors: Family::default(),
            upstream_duration: Family::default(),
            upstream_errors: Family::default(),
            upstream_healthy: Family::default(),
            active_connections: Family::default(),
            connections_refused: Family::default(),
            tls_handshakes: Family::default(),
            tls_handshake_duration: Family::default(),
            policy_decisions: Family::default(),
            ratelimit_rejections: Family::default(),
            bans: Family::default(),
            decisions_active: Family::default(),
            reloads: Family::default(),
            log_written: Family::default(),
            log_dropped: Family::default(),
            registry: Registry::default(),
            series: Arc::new(Series {
                requests: Family::default(),
                request_duration: Family::default(),
                request_errors: Family::default(),
                policy_decisions: Family::default(),
                ratelimit_rejections: Family::default(),
                upstream_duration: Family::default(),
                upstream_errors: Family::default(),
                upstream_healthy: Family::default(),
                active_connections: Family::default(),
                connections_refused: Family::default(),
                tls_handshakes: Family::default(),
                tls_handshake_duration: Family::default(),
                routes: Mutex::default(),
                endpoints: Mutex::default(),
                listeners: Mutex::default(),
            }),
        };
        let m = Metrics {
            series: Arc::new(Series {
                requests: m.requests.clone(),
                request_duration: m.request_duration.clone(),
                request_errors: m.request_errors.clone(),
                policy_decisions: m.policy_decisions.clone(),
                ratelimit_rejections: m.ratelimit_rejections.clone(),
                upstream_duration: m.upstream_duration.clone(),
                upstream_errors: m.upstream_errors.clone(),
                upstream_healthy: m.upstream_healthy.clone(),
                active_connections: m.active_connections.clone(),
                connections_refused: m.connections_refused.clone(),
                tls_handshakes: m.tls_handshakes.clone(),
                tls_handshake_duration: m.tls_handshake_duration.clone(),
                routes: Mutex::default(),
                endpoints: Mutex::default(),
                listeners: Mutex::default(),
            }),
            ..m
        };
        let r = &mut registry;
        r.register(
            "wraith_requests",
            "Requests answered, by route, status class and protocol",
            m.requests.clone(),
        );
        r.register(
            "wraith_request_duration_seconds",
            "Time from request head to the last response byte, by route",
            m.request_duration.clone(),
        );
        r.register(
            "wraith_request_errors",
            "Requests Wraith answered with an error of its own, by route and error code",
            m.request_errors.clone(),
        );
        r.register(
            "wraith_upstream_request_duration_seconds",
            "Time from sending a request upstream to its response head, by upstream and endpoint",
            m.upstream_duration.clone(),
        );
        r.register(
            "wraith_upstream_errors",
            "Failed upstream requests, by upstream, endpoint and error code",
            m.upstream_errors.clone(),
        );
        r.register(
            "wraith_upstream_endpoint_healthy",
            "1 if the endpoint is up, 0 if health checks took it down or it is ejected",
            m.upstream_healthy.clone(),
        );
        r.register(
            "wraith_active_connections",
            "Open client connections, by listener and protocol",
            m.active_connections.clone(),
        );
        r.register(
            "wraith_connections_refused",
            "Client connections closed at accept, or later for what they did, by listener and reason (per_client_limit: the client had limits.max_connections_per_client open; h2_rapid_reset: an HTTP/2 client reset most of its streams before their response; h3_rapid_reset: an HTTP/3 client cancelled half or more of its requests before their response)",
            m.connections_refused.clone(),
        );
        r.register(
            "wraith_tls_handshakes",
            "TLS handshakes, by listener, version, key-exchange group and result",
            m.tls_handshakes.clone(),
        );
        r.register(
            "wraith_tls_handshake_duration_seconds",
            "TLS handshake duration, by listener",
            m.tls_handshake_duration.clone(),
        );
        r.register(
            "wraith_policy_decisions",
            "Policy decisions, by route and effect (allow, deny, shadow_deny)",
            m.policy_decisions.clone(),
        );
        r.register(
            "wraith_ratelimit_rejections",
            "Requests refused by a rate limit, by route",
            m.ratelimit_rejections.clone(),
        );
        r.register(
            "wraith_bans",
            "Requests refused because the client is banned, by decision origin",
            m.bans.clone(),
        );
        r.register(
            "wraith_decisions_active",
            "Active ban decisions, by origin",
            m.decisions_active.clone(),
        );
        r.register(
            "wraith_config_reloads",
            "Configuration reloads, by result (ok, failed)",
            m.reloads.clone(),
        );
        r.register(
            "wraith_log_records_written",
            "Access-log records written, by sink",
            m.log_written.clone(),
        );
        r.register(
            "wraith_log_records_dropped",
            "Access-log records dropped because the sink's queue was full, by sink",
            m.log_dropped.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The handles one route's requests update.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        self.series.route_born(route);
        Arc::new(RouteMetrics {
            series: self.series.clone(),
            name: route.to_string(),
            cells: Default::default(),
            decisions: Default::default(),
            duration: self.request_duration.get_or_create_owned(&RouteLabel {
                route: route.to_string(),
            }),
            total: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        })
    }

    /// The handles one upstream endpoint's requests update.
    pub fn endpoint(&self, upstream: &str, endpoint: &str) -> Arc<EndpointMetrics> {
        let labels = EndpointLabels {
            upstream: upstream.to_string(),
            endpoint: endpoint.to_string(),
        };
        self.series.endpoint_born(&labels);
        Arc::new(EndpointMetrics {
            series: self.series.clone(),
            duration: self.upstream_duration.get_or_create_owned(&labels),
            labels,
        })
    }

    /// The handles one listener's connections update.
    pub fn listener(&self, listener: &str) -> Arc<ListenerMetrics> {
        self.series.listener_born(listener);
        Arc::new(ListenerMetrics {
            series: self.series.clone(),
            name: listener.to_string(),
            connections: Default::default(),
            refused: Default::default(),
            handshakes: Mutex::default(),
            handshake_duration: OnceLock::new(),
        })
    }

    /// The text exposition (OpenMetrics), with `extra` appended before the EOF marker.
    pub fn encode(&self, extra: &Registry) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, extra);
        let _ = out.write_str("# EOF\n");
        out
    }
}

/// Status classes: 1xx..5xx, and `other` for anything outside 100..=599.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
/// Protocols as labelled.
const PROTOCOLS: [&str; 3] = ["h1", "h2", "h3"];

/// Pre-resolved metric handles of one route. Request counters are created on first use, so
/// a route/class/protocol combination that never happened exports no zero series.
#[derive(Debug)]
pub struct RouteMetrics {
    series: Arc<Series>,
    name: String,
    cells: [[OnceLock<Counter>; CLASSES.len()]; PROTOCOLS.len()],
    /// Policy decisions by effect (`allow`, `deny`, `shadow_deny`), created on first use.
    decisions: [OnceLock<Counter>; 3],
    duration: AtomicHistogram,
    /// Totals for `wraith status` / `wraith top` (cheaper to read than the families).
    pub total: AtomicU64,
    pub server_errors: AtomicU64,
    pub denied: AtomicU64,
}

/// Pre-resolved metric handles of one listener, held by the telemetry of every snapshot
/// that has the listener and by its connections: when the last goes (a reload removed or
/// renamed the listener, and its connections have ended), its series go too.
#[derive(Debug)]
pub struct ListenerMetrics {
    series: Arc<Series>,
    name: String,
    /// Open connections by protocol (`PROTOCOLS`), created on first use.
    connections: [OnceLock<Gauge>; PROTOCOLS.len()],
    /// Connections refused at accept (or closed later, `*_rapid_reset`) by reason (`REFUSALS`),
    /// created on first use.
    refused: [OnceLock<Counter>; REFUSALS.len()],
    /// The handshake counters used so far (a few: version, group and result come from small
    /// fixed sets), so a handshake neither formats labels nor takes the series lock.
    handshakes: Mutex<Vec<(HandshakeKind, Counter)>>,
    handshake_duration: OnceLock<AtomicHistogram>,
}

impl Drop for ListenerMetrics {
    fn drop(&mut self) {
        self.series.listener_gone(&self.name);
    }
}

impl ListenerMetrics {
    /// The gauge of open `protocol` (`h1`, `h2`, `h3`) connections.
    pub fn connections(&self, protocol: &'static str) -> &Gauge {
        let p = PROTOCOLS.iter().position(|p| *p == protocol).unwrap_or(0);
        self.connections[p].get_or_init(|| {
            self.series
                .active_connections
                .get_or_create_owned(&ConnectionLabels {
                    listener: self.name.clone(),
                    protocol: PROTOCOLS[p],
                })
        })
    }

    /// Counts a connection refused at accept, or closed later, for `reason` (one of `REFUSALS`).
    pub fn refused(&self, reason: &'static str) {
        let r = REFUSALS.iter().position(|r| *r == reason).unwrap_or(0);
        self.refused[r]
            .get_or_init(|| {
                self.series
                    .connections_refused
                    .get_or_create_owned(&RefusedLabels {
                        listener: self.name.clone(),
                        reason: REFUSALS[r],
                    })
            })
            .inc();
    }

    /// Counts one TLS handshake, and how long it took.
    pub fn handshake(
        &self,
        version: &'static str,
        group: &'static str,
        result: &'static str,
        took: Duration,
    ) {
        let kind = (version, group, result);
        let mut handshakes = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        match handshakes.iter().find(|(k, _)| *k == kind) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                // The first of its kind here: the series notes it, to remove it with the
                // listener.
                {
                    let mut listeners = self
                        .series
                        .listeners
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if let Some((_, kinds)) = listeners.get_mut(&self.name) {
                        if !kinds.contains(&kind) {
                            kinds.push(kind);
                        }
                    }
                }
                let counter = self
                    .series
                    .tls_handshakes
                    .get_or_create_owned(&HandshakeLabels {
                        listener: self.name.clone(),
                        version,
                        group,
                        result,
                    });
                counter.inc();
                handshakes.push((kind, counter));
            }
        }
        drop(handshakes);
        self.handshake_duration
            .get_or_init(|| {
                self.series
                    .tls_handshake_duration
                    .get_or_create_owned(&ListenerLabel {
                        listener: self.name.clone(),
                    })
            })
            .observe(took);
    }
}

impl Drop for RouteMetrics {
    fn drop(&mut self) {
        self.series.route_gone(&self.name);
    }
}

impl RouteMetrics {
    /// The route's name (`(none)` for unmatched requests).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts one request Wraith answered with an error of its own.
    pub fn error(&self, family: &Family<RouteErrorLabels, Counter>, code: &'static str) {
        {
            let mut routes = self.series.routes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, codes)) = routes.get_mut(&self.name) {
                if !codes.contains(&code) {
                    codes.push(code);
                }
            }
        }
        family
            .get_or_create(&RouteErrorLabels {
                route: self.name.clone(),
                code,
            })
            .inc();
    }

    /// Counts one policy decision: `allow`, `deny`, or `shadow_deny` (a deny in shadow mode).
    pub fn decision(
        &self,
        family: &Family<PolicyLabels, Counter>,
        effect: super::access_log::Effect,
        shadow: bool,
    ) {
        use super::access_log::Effect;
        let (i, effect) = match (effect, shadow) {
            (Effect::Allow, _) => (0, "allow"),
            (Effect::Deny, false) => (1, "deny"),
            (Effect::Deny, true) => (2, "shadow_deny"),
        };
        self.decisions[i]
            .get_or_init(|| {
                family.get_or_create_owned(&PolicyLabels {
                    route: self.name.clone(),
                    effect,
                })
            })
            .inc();
    }

    /// Counts one finished request.
    pub fn observe(
        &self,
        family: &Family<RequestLabels, Counter>,
        protocol: &str,
        status: u16,
        d: Duration,
    ) {
        let p = match protocol {
            "h2" => 1,
            "h3" => 2,
            _ => 0,
        };
        let c = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => 5,
        };
        self.cells[p][c]
            .get_or_init(|| {
                family.get_or_create_owned(&RequestLabels {
                    route: self.name.clone(),
                    status_class: CLASSES[c],
                    protocol: PROTOCOLS[p],
                })
            })
            .inc();
        self.duration.observe(d);
        self.total.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Pre-resolved metric handles of one upstream endpoint.
#[derive(Debug)]
pub struct EndpointMetrics {
    series: Arc<Series>,
    labels: EndpointLabels,
    duration: AtomicHistogram,
}

impl Drop for EndpointMetrics {
    fn drop(&mut self) {
        self.series.endpoint_gone(&self.labels);
    }
}

impl EndpointMetrics {
    /// Records one upstream exchange's time to response head.
    pub fn observe(&self, upstream_time: Option<Duration>) {
        if let Some(t) = upstream_time {
            self.duration.observe(t);
        }
    }

    /// Counts an upstream error by code.
    pub fn error(&self, family: &Family<EndpointErrorLabels, Counter>, code: &'static str) {
        family
            .get_or_create(&EndpointErrorLabels {
                upstream: self.labels.upstream.clone(),
                endpoint: self.labels.endpoint.clone(),
                code,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_routes_and_endpoints_go_with_their_last_handles() {
        let m = Metrics::new();
        let fill = |r: &RouteMetrics, e: &EndpointMetrics| {
            r.observe(&m.requests, "h1", 200, Duration::from_millis(1));
            r.error(&m.request_errors, "upstream_timeout");
            r.decision(
                &m.policy_decisions,
                crate::telemetry::access_log::Effect::Allow,
                false,
            );
            m.ratelimit_rejections
                .get_or_create(&RouteLabel {
                    route: r.name().to_string(),
                })
                .inc();
            e.observe(Some(Duration::from_millis(1)));
            e.error(&m.upstream_errors, "upstream_timeout");
            m.upstream_healthy.get_or_create(&e.labels).set(1);
        };
        let (old_route, old_endpoint) = (m.route("old"), m.endpoint("u", "10.0.0.1:80"));
        fill(&old_route, &old_endpoint);
        // Two snapshots share a route name (a reload that kept it): both must go first.
        let (kept, kept_endpoint) = (m.route("kept"), m.endpoint("u", "10.0.0.2:80"));
        let (kept_again, kept_endpoint_again) = (m.route("kept"), m.endpoint("u", "10.0.0.2:80"));
        fill(&kept, &kept_endpoint);
        let text = m.encode(&Registry::default());
        assert!(
            text.contains("route=\"old\"") && text.contains("10.0.0.1:80"),
            "{text}"
        );

        drop((old_route, old_endpoint, kept, kept_endpoint));
        let text = m.encode(&Registry::default());
        assert!(!text.contains("route=\"old\""), "{text}");
        assert!(!text.contains("10.0.0.1:80"), "{text}");
        assert!(text.contains("route=\"kept\""), "{text}");
        assert!(text.contains("10.0.0.2:80"), "{text}");

        drop((kept_again, kept_endpoint_again));
        let text = m.encode(&Registry::default());
        assert!(!text.contains("route=\"kept\""), "{text}");
        assert!(!text.contains("10.0.0.2:80"), "{text}");
    }

    #[test]
    fn histogram_buckets_and_exposition() {
        let m = Metrics::new();
        let r = m.route("api");
        r.observe(&m.requests, "h2", 200, Duration::from_millis(3));
        r.observe(&m.requests, "h2", 503, Duration::from_secs(100));
        r.observe(&m.requests, "h1", 404, Duration::from_micros(100));
        let text = m.encode(&Registry::default());
        assert!(text.contains(
            "wraith_requests_total{route=\"api\",status_class=\"2xx\",protocol=\"h2\"} 1"
        ));
        assert!(text.contains(
            "wraith_requests_total{route=\"api\",status_class=\"5xx\",protocol=\"h2\"} 1"
        ));
        assert!(text.contains("wraith_request_duration_seconds_count{route=\"api\"} 3"));
        assert!(
            text.contains("wraith_request_duration_seconds_bucket{le=\"0.0005\",route=\"api\"} 1")
                || text.contains(
                    "wraith_request_duration_seconds_bucket{route=\"api\",le=\"0.0005\"} 1"
                ),
            "{text}"
        );
        assert!(text.contains("le=\"+Inf\""));
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(r.total.load(Ordering::Relaxed), 3);
        assert_eq!(r.server_errors.load(Ordering::Relaxed), 1);
    }
}
