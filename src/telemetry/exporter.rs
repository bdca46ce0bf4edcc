//! Serving metrics: the OpenMetrics text (`render`) and the optional plain-HTTP metrics
//! listener (`[metrics] address`). The same text is on the admin socket at `GET /v1/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::metrics::{EndpointLabels, ReasonLabel, SinkLabel};
use crate::runtime::Runtime;

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition: the registry plus values read at scrape time (queue depths, in-flight
/// requests per endpoint, config generation).
pub fn render(rt: &Runtime) -> String {
    let snapshot = rt.gateway.snapshot();
    let mut extra = Registry::default();

    let depth: Family<SinkLabel, Gauge> = Family::default();
    for (sink, queued, ..) in snapshot.telemetry.sink_counts() {
        depth
            .get_or_create(&SinkLabel { sink })
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
    }
    extra.register(
        "wraith_log_queue_depth",
        "Access-log records waiting for their writer, by sink",
        depth,
    );

    let in_flight: Family<EndpointLabels, Gauge> = Family::default();
    for u in &snapshot.upstreams {
        for e in &u.endpoints {
            let labels = EndpointLabels {
                upstream: u.config.name.to_string(),
                endpoint: e.authority.to_string(),
            };
            rt.telemetry
                .metrics
                .upstream_healthy
                .get_or_create(&labels)
                .set(i64::from(
                    e.health.state() == crate::upstream::health::State::Up,
                ));
            in_flight
                .get_or_create(&EndpointLabels {
                    upstream: u.config.name.to_string(),
                    endpoint: e.authority.to_string(),
                })
                .set(i64::try_from(e.in_flight()).unwrap_or(i64::MAX));
        }
    }
    extra.register(
        "wraith_upstream_in_flight",
        "Requests being forwarded now, by upstream and endpoint",
        in_flight,
    );

    // Active decisions by origin, read from the decision store at scrape time.
    let (local, crowdsec) = rt.gateway.decisions.counts();
    for (origin, n) in [("local", local), ("crowdsec", crowdsec)] {
        rt.telemetry
            .metrics
            .decisions_active
            .get_or_create(&super::metrics::OriginLabel { origin })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    // The shared rate limits' Redis, when configured: its failures (every one sent a
    // request to `on_error`) and whether the limits rest on `on_error` now.
    if let Some(store) = &snapshot.rate_store {
        let errors: Family<ReasonLabel, Counter> = Family::default();
        for (why, n) in store.errors() {
            errors
                .get_or_create(&ReasonLabel {
                    reason: why.label(),
                })
                .inc_by(n);
        }
        extra.register(
            "wraith_rate_limit_store_errors",
            "Calls to the shared rate limits' Redis that failed, sending their request to on_error, by reason (timeout, connect, tls, error)",
            errors,
        );
        let fallback: Gauge = Gauge::default();
        fallback.set(i64::from(store.on_fallback()));
        extra.register(
            "wraith_rate_limit_store_fallback",
            "1 while the shared rate limits are on on_error after a Redis failure (for a second after each), else 0",
            fallback,
        );
    }

    let generation: Gauge = Gauge::default();
    generation.set(i64::try_from(snapshot.generation).unwrap_or(i64::MAX));
    extra.register(
        "wraith_config_generation",
        "Generation of the configuration in service",
        generation,
    );
    let uptime: Gauge = Gauge::default();
    uptime.set(i64::try_from(rt.started.elapsed().as_secs()).unwrap_or(i64::MAX));
    extra.register(
        "wraith_uptime_seconds",
        "Seconds since the process started",
        uptime,
    );
    super::process::register(&mut extra, rt.started_at);
    rt.telemetry.metrics.encode(&extra)
}

/// Metrics connections served at once; more wait in the kernel's backlog. Scrapers are few:
/// whoever else reaches the address must not be able to hold memory with connections.
const MAX_METRICS_CONNECTIONS: usize = 32;
/// Connections at once from one client address: a scraper needs one, and no single client
/// can take every slot.
const MAX_METRICS_CONNECTIONS_PER_CLIENT: usize = 4;
/// A request head must arrive within this.
const METRICS_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one metrics connection.
const METRICS_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The most a connection buffers of a request head (hyper's minimum; a scrape's head is a
/// few hundred bytes).
const METRICS_MAX_BUF: usize = 8192;

/// Binds the metrics listener and serves `GET <path>` until shutdown.
pub async fn start(rt: Arc<Runtime>) -> Result<(), String> {
    let config = rt.gateway.snapshot().config.metrics.clone();
    let Some(address) = config.address else {
        return Ok(());
    };
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| format!("metrics: cannot bind {address}: {e}"))?;
    let local = listener.local_addr().map_err(|e| format!("metrics: {e}"))?;
    tracing::info!(listener = "metrics", address = %local, path = %config.path, "listening");
    let path: Arc<str> = Arc::from(config.path);
    tokio::spawn(async move {
        let shutdown = rt.shutdown.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
        let mut failures = crate::listener::AcceptFailures::default();
        let per_client = Arc::new(crate::listener::limit::PerClient::default());
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
                _ = shutdown.cancelled() => break,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        failures.failed(&local, &e).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let Some(client) = per_client.take(peer.ip(), MAX_METRICS_CONNECTIONS_PER_CLIENT)
            else {
                let _ = stream.set_zero_linger();
                continue;
            };
            let rt = rt.clone();
            let path = path.clone();
            tokio::spawn(async move {
                let _slots = (slot, client);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = answer(&rt, &path, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                // One request per connection: an idle keep-alive connection would hold its
                // slot between requests (32 clients asking every few seconds kept every
                // scrape out).
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEAD_TIMEOUT)
                    .max_buf_size(METRICS_MAX_BUF)
                    .serve_connection(TokioIo::new(stream), svc);
                // A scraper that never finishes its request is not kept forever.
                let _ = tokio::time::timeout(METRICS_CONNECTION_TIMEOUT, conn).await;
            });
        }
    });
    Ok(())
}

fn answer(rt: &Runtime, path: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body, content_type) = if req.uri().path() != path {
        (StatusCode::NOT_FOUND, format!("try {path}\n"), "text/plain")
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".to_string(),
            "text/plain",
        )
    } else {
        (StatusCode::OK, render(rt), CONTENT_TYPE)
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}
