//! The forwarder: rewrites a request for its upstream (hop-by-hop headers out, forwarding
//! headers in, prefix stripped), chooses an endpoint, sends the request with the response
//! timeout, retries what is safe to retry on another endpoint, and streams the response
//! back. WebSocket upgrades become a byte tunnel.
//!
//! Retry rules: a connection that could not be made never reached the upstream, so any
//! request is retried; a failure after sending (reset, timeout, invalid response) but before
//! any response byte is retried only for idempotent methods, and only if the body can be sent
//! again (none, or buffered because it was at most `retry_buffer` with a known length). Each
//! retry goes to an endpoint this request has not tried, at most `retries` times, and none
//! starts after `try_duration`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use super::balance::Tried;
use super::h1::{self, InFlight, SendError};
use super::{Endpoint, Selection, Upstream};
use crate::body::Body;
use crate::config::RouteConfig;
use crate::error::GatewayError;
use crate::listener::CloseSignal;
use crate::proxy::headers::{self, ForwardInfo};

/// What happened while forwarding (for the access log).
#[derive(Debug, Default, Clone)]
pub struct ForwardOutcome {
    /// The endpoint tried last (the one that answered, when one did).
    pub endpoint: Option<http::uri::Authority>,
    /// Time from sending the last attempt to receiving its response head.
    pub upstream_time: Option<Duration>,
    /// Attempts made (1 + retries).
    pub attempts: u32,
    /// The attempts before the last, each failed and retried (empty unless retried): the
    /// metrics put each on its own endpoint.
    pub retried: Vec<FailedAttempt>,
}

/// An attempt that failed and was retried on another endpoint.
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    pub endpoint: http::uri::Authority,
    /// `upstream_unreachable`, `upstream_timeout` or `upstream_failed`.
    pub error: &'static str,
    /// From sending the attempt to its failure.
    pub time: Duration,
}

/// Request bodies of at most this many bytes (by their declared length) are not watched for
/// bans while they are sent: they take no time to, and the request was checked before.
const BAN_WATCHED_BODY: u64 = 64 * 1024;

/// The error for a request whose body failed on the client's side: `watch` says whether it
/// was cut by a ban or went past `max_request_body`; otherwise it could not be read.
fn client_body_error(watch: Option<&crate::body::BodyWatch>) -> GatewayError {
    if let Some(ban) = watch.and_then(|w| w.banned()) {
        return GatewayError::Banned {
            origin: ban.origin.clone(),
            kind: ban.kind.clone(),
            reason: ban.reason.clone(),
        };
    }
    match watch.and_then(|w| w.exceeded()) {
        Some(limit) => GatewayError::PayloadTooLarge { limit },
        None if watch.is_some_and(|w| w.client_gone()) => GatewayError::ClientClosed,
        None => GatewayError::BadRequest("the request body could not be read"),
    }
}

/// How a request body can be sent again on a retry.
enum Replay {
    /// No body: always.
    Empty,
    /// Buffered in full before the first attempt.
    Buffered(Bytes),
    /// Streamed: only before any of it was sent (connection failures).
    Streamed,
}

impl Replay {
    fn body(&self) -> Option<Body> {
        match self {
            Replay::Empty => Some(Body::Empty),
            Replay::Buffered(b) => Some(Body::full(b.clone())),
            Replay::Streamed => None,
        }
    }
}

/// Why one attempt failed.
enum Failure {
    Connect(String),
    /// An HTTP/2 upstream refused the stream unprocessed (a graceful GOAWAY below it, or
    /// REFUSED_STREAM): it may go out again whatever its method, and it is no failure of
    /// the endpoint's.
    Unprocessed(String),
    Timeout,
    Failed(String),
}

/// Forwards `req` to `upstream` on behalf of `route`, retrying on other endpoints when safe.
///
/// (An `async move` block rather than an `async fn`: the future of an `async fn` keeps its
/// arguments twice, and the request is 264 bytes.)
#[allow(clippy::manual_async_fn)] // (on purpose: see above)
pub fn forward<'a>(
    upstream: &'a Upstream,
    route: &'a RouteConfig,
    mut req: Request<Body>,
    info: &'a ForwardInfo<'a>,
    request_id: &'a HeaderValue,
    outcome: &'a mut ForwardOutcome,
) -> impl std::future::Future<Output = Result<Response<Body>, GatewayError>> + 'a {
    async move {
        let config = &upstream.config;
        let h2 = config.protocol.is_h2();
        let upgrade = !h2 && headers::upgrade_requested(req.headers(), req.version());
        let client_upgrade = upgrade.then(|| crate::upgrade::on_upgrade(&mut req));
        let key = upstream.hash_key(info.client_ip, req.headers(), req.uri().path());
        let forwarding = prepare_request(&mut req, route, info, request_id, h2, upgrade)?;
        let timeout = route.response_timeout.unwrap_or(config.response_timeout);
        let idempotent = is_idempotent(req.method());
        if !upgrade
            && matches!(*req.method(), Method::GET | Method::HEAD)
            && !req.body().is_end_stream()
            && req.body().size_hint().exact().is_none()
        {
            req = body_start(req, timeout).await?;
        }

        // A streamed body that could go past the limit is counted on its way; so is any streamed
        // body to an HTTP/2 upstream, whose client cannot say whether the body or the upstream
        // failed (the HTTP/1.1 client says so itself). A failure of the client's body is no
        // failure of the endpoint's.
        // And a body that may take a while (of unknown or more than a small size) is cut if its
        // client is banned meanwhile.
        let body = req.body();
        let bans = info.bans.filter(|_| {
            body.size_hint()
                .exact()
                .is_none_or(|n| n > BAN_WATCHED_BODY)
        });
        let watch = if !upgrade
            && !body.is_end_stream()
            && (h2
                || bans.is_some()
                || info
                    .max_request_body
                    .is_some_and(|limit| body.size_hint().upper().is_none_or(|n| n > limit)))
        {
            let (parts, body) = req.into_parts();
            let (body, watch) =
                crate::body::Watched::new(body, info.max_request_body, bans.map(|b| b.watch()));
            req = Request::from_parts(parts, Body::boxed(body));
            Some(watch)
        } else {
            None
        };

        // (Over HTTP/2 with one endpoint too: a stream it turned away unprocessed can go to it
        // again, on another connection.)
        let retries_possible = config.retries > 0 && (upstream.endpoints.len() > 1 || h2);
        let replay = if req.body().is_end_stream() {
            Replay::Empty
        } else if (retries_possible || !h2)
            // (Over HTTP/1.1 also with no retry to another endpoint: a pooled connection that
            // the upstream closed as it was reused is tried again on a fresh one, body and all.)
            && idempotent
            && !upgrade
            && req
                .body()
                .size_hint()
                .exact()
                .is_some_and(|n| n <= config.retry_buffer as u64)
        {
            // Bounded like a streamed body: a client that stalls is not waited for forever.
            let (parts, body) = req.into_parts();
            let bytes = tokio::time::timeout(timeout, body.collect())
                .await
                .map_err(|_| GatewayError::RequestBodyTimeout)?
                .map_err(|e| match crate::body::client_gone(&*e) {
                    true => GatewayError::ClientClosed,
                    false => client_body_error(watch.as_deref()),
                })?
                .to_bytes();
            req = Request::from_parts(parts, Body::full(bytes.clone()));
            Replay::Buffered(bytes)
        } else {
            Replay::Streamed
        };
        // hyper's HTTP/2 client consumes the request even when it cannot connect: keep what is
        // needed to send it again (only when it could be).
        // (Boxed: inline, its 216 bytes would be in every request's pipeline future.)
        let template = (h2 && retries_possible && !matches!(replay, Replay::Streamed)).then(|| {
            Box::new((
                req.method().clone(),
                req.uri().clone(),
                req.version(),
                req.headers().clone(),
            ))
        });

        let started = Instant::now();
        let mut tried = Tried::default();
        let mut last_error: Option<GatewayError> = None;
        let mut next = Some(req);
        loop {
            let Some(req) = next.take() else {
                return Err(last_error.unwrap_or_else(|| no_endpoint(upstream)));
            };
            let (index, mut guard) = match upstream.select(key, &tried) {
                Selection::Endpoint(i, g) => (i, g),
                Selection::Unavailable => {
                    return Err(last_error.unwrap_or_else(|| no_endpoint(upstream)))
                }
                Selection::Full => match upstream.select_waiting(key, &tried).await {
                    Some(Selection::Endpoint(i, g)) => (i, g),
                    Some(_) => return Err(last_error.unwrap_or_else(|| no_endpoint(upstream))),
                    None => {
                        return Err(last_error.unwrap_or_else(|| GatewayError::Overloaded {
                            upstream: config.name.clone(),
                        }))
                    }
                },
            };
            let endpoint = &upstream.endpoints[index];
            tried.insert(index);
            // (The first attempt starts with the stage: no second clock read.)
            let attempt_started = if outcome.attempts == 0 {
                started
            } else {
                Instant::now()
            };
            outcome.attempts += 1;
            outcome.endpoint = Some(endpoint.authority.clone());
            endpoint.requests.fetch_add(1, Ordering::Relaxed);
            // Passive health hears how the response body ends.
            guard.arm();

            let result = if h2 {
                send_h2(endpoint, req, timeout, guard)
                    .await
                    .map_err(|f| (f, None))
            } else {
                h1::send(&endpoint.pool, req, forwarding.as_ref(), timeout, guard)
                    .await
                    .map_err(|e| match e {
                        SendError::Connect { error, request } => {
                            (Failure::Connect(error.to_string()), Some(*request))
                        }
                        SendError::Timeout { request } => (Failure::Timeout, request.map(|r| *r)),
                        SendError::Failed { reason, request } => {
                            (Failure::Failed(reason), request.map(|r| *r))
                        }
                    })
            };
            outcome.upstream_time = Some(attempt_started.elapsed());

            let (failure, returned) = match result {
                Ok(mut resp) => {
                    if let (Body::Tracked(t), Some(w)) = (resp.body_mut(), &watch) {
                        t.request = Some(w.clone());
                    }
                    // A 5xx, a response that ends with its head and a 101 are recorded now; any
                    // other response when its body ends (`InFlight::body_ended`): one cut off
                    // mid-body is a broken response.
                    let status = resp.status();
                    let now = status.is_server_error()
                        || status == http::StatusCode::SWITCHING_PROTOCOLS
                        || resp.body().is_end_stream();
                    if now {
                        match resp.body_mut() {
                            Body::Upstream(b) => {
                                if let Some(slot) = b.in_flight_mut() {
                                    slot.disarm();
                                }
                            }
                            Body::Tracked(t) => t.slot.disarm(),
                            _ => {}
                        }
                        // (A 101 is recorded below, once it is known to be one the client
                        // asked for.)
                        if status.is_server_error() {
                            endpoint.health.record_failure(upstream);
                        } else if status != StatusCode::SWITCHING_PROTOCOLS {
                            endpoint.health.record_success(&config.outlier);
                        }
                    }
                    let finished = finish_response(resp, client_upgrade, timeout, info);
                    // A switch nobody asked for, or to another protocol, is a broken response
                    // (the client gets a 502), not a success of the endpoint's.
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        match &finished {
                            Ok(_) => endpoint.health.record_success(&config.outlier),
                            Err(_) => endpoint.health.record_failure(upstream),
                        }
                    }
                    return finished.map_err(|reason| GatewayError::UpstreamFailed {
                        upstream: config.name.clone(),
                        endpoint: endpoint.authority.to_string(),
                        reason,
                    });
                }
                Err(f) => f,
            };

            if let Some(w) = watch
                .as_deref()
                .filter(|w| w.exceeded().is_some() || w.banned().is_some())
            {
                return Err(client_body_error(Some(w)));
            }
            // The client's body failing fails the attempt: the client's error, not the upstream's
            // (no retry, no mark against the endpoint).
            let stalled = match &failure {
                Failure::Failed(m) => m == h1::CLIENT_BODY_STALLED,
                // (Over HTTP/1.1 the upload says itself whose wait ran out: its last ask of
                // the client may still be pending while it waits for the upstream to read.)
                Failure::Timeout => h2 && watch.as_ref().is_some_and(|w| w.waiting_for_client()),
                Failure::Connect(_) | Failure::Unprocessed(_) => false,
            };
            if stalled {
                return Err(GatewayError::RequestBodyTimeout);
            }
            let client_fault = watch.as_ref().is_some_and(|w| w.client_failed())
                || matches!(&failure, Failure::Failed(m) if m.starts_with(h1::CLIENT_BODY_FAILED));
            if client_fault {
                tracing::debug!(upstream = %config.name, endpoint = %endpoint.authority, "the client's request body failed");
                let gone = watch.as_ref().is_some_and(|w| w.client_gone())
                    || matches!(&failure, Failure::Failed(m) if m.starts_with(h1::CLIENT_BODY_GONE));
                return Err(if gone {
                    GatewayError::ClientClosed
                } else {
                    GatewayError::BadRequest("the request body could not be read")
                });
            }
            let unprocessed = matches!(failure, Failure::Unprocessed(_));
            if !unprocessed {
                endpoint.health.record_failure(upstream);
            }
            let (error, connect) = match failure {
                Failure::Connect(reason) => {
                    endpoint.failures.fetch_add(1, Ordering::Relaxed);
                    (
                        GatewayError::UpstreamConnect {
                            upstream: config.name.clone(),
                            endpoint: endpoint.authority.to_string(),
                            reason,
                        },
                        true,
                    )
                }
                Failure::Unprocessed(reason) => (
                    GatewayError::UpstreamFailed {
                        upstream: config.name.clone(),
                        endpoint: endpoint.authority.to_string(),
                        reason,
                    },
                    true,
                ),
                Failure::Timeout => (
                    GatewayError::UpstreamTimeout {
                        upstream: config.name.clone(),
                        endpoint: endpoint.authority.to_string(),
                        timeout,
                    },
                    false,
                ),
                Failure::Failed(reason) => (
                    GatewayError::UpstreamFailed {
                        upstream: config.name.clone(),
                        endpoint: endpoint.authority.to_string(),
                        reason,
                    },
                    false,
                ),
            };
            // Which request could go out again, if the rules allow a retry at all.
            // A stream turned away unprocessed (REFUSED_STREAM, above a graceful GOAWAY) may go
            // to an endpoint tried already, the same one too, when no other is left: a server
            // rotating its connections (a maximum age, a maximum of requests) or refusing what
            // came before its SETTINGS did not process it (RFC 9113 §8.7).
            let may_retry = (connect || idempotent)
                && (outcome.attempts - 1) < config.retries
                && (tried.len() < upstream.endpoints.len() || unprocessed)
                && started.elapsed() < config.try_duration;
            if may_retry && unprocessed && tried.len() >= upstream.endpoints.len() {
                tried = Tried::default();
            }
            next = if !may_retry {
                None
            } else if let Some(mut r) = returned {
                // HTTP/1.1 hands the request back; its body is intact only if the connection
                // was never made.
                if !connect {
                    match replay.body() {
                        Some(b) => *r.body_mut() = b,
                        None => {
                            return Err(error);
                        }
                    }
                }
                Some(r)
            } else {
                template.as_deref().and_then(|(m, u, v, h)| {
                    let mut r = Request::new(replay.body()?);
                    *r.method_mut() = m.clone();
                    *r.uri_mut() = u.clone();
                    *r.version_mut() = *v;
                    *r.headers_mut() = h.clone();
                    Some(r)
                })
            };
            if next.is_some() {
                tracing::warn!(upstream = %config.name, endpoint = %endpoint.authority, error = %error, attempt = outcome.attempts, "attempt failed; retrying");
                outcome.retried.push(FailedAttempt {
                    endpoint: endpoint.authority.clone(),
                    error: error.code(),
                    time: attempt_started.elapsed(),
                });
            }
            last_error = Some(error);
            if next.is_none() {
                return Err(last_error.unwrap_or_else(|| no_endpoint(upstream)));
            }
        }
    }
}

fn no_endpoint(upstream: &Upstream) -> GatewayError {
    GatewayError::NoEndpoint {
        upstream: upstream.config.name.clone(),
    }
}

/// A GET or HEAD whose end did not come with its head (an HTTP/2 HEADERS frame without
/// END_STREAM, the stream then ended by an empty DATA frame; an HTTP/3 FIN in a later
/// packet) and without a Content-Length would go upstream with a chunked body, and could not
/// be retried. Its end, or its first content, is waited for (within `timeout`), so that an
/// upstream gets the bodyless GET the client meant, as nginx (which reads a request body
/// before it forwards) sends it: an upstream that does not read a GET's body (hyper's server
/// then closes the connection, and the reset can cut the response off on its way) or refuses
/// one (400) would otherwise fail requests that are not the client's fault. Empty DATA
/// frames carry nothing and are skipped. A GET that does carry content streams as before;
/// one whose connection ends meanwhile is a client abort (499), not forwarded.
async fn body_start(req: Request<Body>, timeout: Duration) -> Result<Request<Body>, GatewayError> {
    let (parts, mut body) = req.into_parts();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| GatewayError::RequestBodyTimeout)?;
        let body = match frame {
            None => Body::Empty,
            Some(Ok(f)) if f.data_ref().is_some_and(|d| d.is_empty()) => continue,
            Some(Ok(f)) => Body::boxed(crate::body::Prefixed::new(Ok(f), body)),
            Some(Err(e)) if crate::body::client_gone(&*e) || crate::body::connection_ended(&*e) => {
                return Err(GatewayError::ClientClosed)
            }
            Some(Err(_)) => {
                return Err(GatewayError::BadRequest(
                    "the request body could not be read",
                ))
            }
        };
        return Ok(Request::from_parts(parts, body));
    }
}

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Hop-by-hop headers out of the response; a 101 becomes a tunnel.
///
/// A 101 becomes a tunnel only when the client asked for a WebSocket upgrade and the upstream
/// switched to exactly that; any other switch (h2c, or a 101 nobody asked for) would carry
/// raw traffic past routing and policy, so it is a 502.
fn finish_response(
    mut resp: Response<Body>,
    client_upgrade: Option<crate::upgrade::OnUpgrade>,
    idle: Duration,
    info: &ForwardInfo<'_>,
) -> Result<Response<Body>, String> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            return Err("upstream switched protocols without being asked".into());
        };
        if !headers::is_websocket_upgrade(resp.headers()) {
            return Err("upstream switched to a protocol other than websocket".into());
        }
        let Body::Upstream(body) = resp.body_mut() else {
            return Err("upstream switched protocols on a connection that cannot".into());
        };
        let Some((io, leftover, slot)) = body.take_upgrade() else {
            return Err("upstream switched protocols on a connection that cannot".into());
        };
        let ends = Ends {
            idle,
            close: info.close.cloned(),
            bans: info.bans.map(|b| b.watch()),
        };
        tokio::spawn(tunnel(client, io, leftover, ends, slot));
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::Empty));
    }
    // The HTTP/1.1 client leaves them out as it parses the head (`h1::parse_head`).
    if !matches!(resp.body(), Body::Upstream(_)) {
        headers::strip_hop_by_hop(resp.headers_mut(), false, false);
    }
    // A 204 has no body and must not say it has (RFC 9110 §8.6): HTTP/2 clients refuse a
    // 204 with a Content-Length (PROTOCOL_ERROR), so an upstream's slip would fail there
    // only. Wraith's HTTP/1.1 server leaves it out when it writes the head.
    if resp.status() == StatusCode::NO_CONTENT {
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    Ok(resp)
}

/// HTTP/2 (h2c or h2 over TLS) through hyper's client (absolute URI names the endpoint), on
/// the endpoint's first connection with a stream to spare. The in-flight slot and the stream
/// stay with the response body until it ends.
async fn send_h2(
    endpoint: &Endpoint,
    mut req: Request<Body>,
    timeout: Duration,
    guard: InFlight,
) -> Result<Response<Body>, Failure> {
    let Some(conns) = &endpoint.h2 else {
        return Err(Failure::Failed("no HTTP/2 client for this upstream".into()));
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(endpoint.scheme.clone());
    parts.authority = Some(endpoint.authority.clone());
    parts.path_and_query = req.uri().path_and_query().cloned();
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| Failure::Failed(e.to_string()))?;
    let stream = conns.take();
    // A streamed body's small pieces go as few DATA frames (`Coalesced`); it keeps the
    // request's stream taken until it ends, also past the response (`Uploading`).
    if !req.body().is_end_stream() && !matches!(req.body(), Body::Full(_)) {
        let (parts, body) = req.into_parts();
        let body = super::h2::Uploading::new(crate::body::Coalesced::new(body), stream.clone());
        req = Request::from_parts(parts, Body::boxed(body));
    }
    match tokio::time::timeout(timeout, stream.client().request(req)).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Err(e)) if e.is_connect() => Err(Failure::Connect(error_chain(&e))),
        Ok(Err(e)) if unprocessed(&e) => Err(Failure::Unprocessed(format!(
            "the upstream did not process the request: {}",
            error_chain(&e)
        ))),
        Ok(Err(e)) => Err(Failure::Failed(error_chain(&e))),
        Ok(Ok(resp)) => Ok(resp.map(|body| {
            Body::Tracked(Box::new(crate::body::Tracked {
                body,
                slot: guard,
                stream,
                stall: crate::body::Stall::new(timeout),
                request: None,
            }))
        })),
    }
}

/// Rewrites the request in place for the upstream; returns the forwarding headers when they
/// are to be written into an HTTP/1.1 request head rather than the header map.
fn prepare_request(
    req: &mut Request<Body>,
    route: &RouteConfig,
    info: &ForwardInfo<'_>,
    request_id: &HeaderValue,
    h2: bool,
    upgrade: bool,
) -> Result<Option<headers::Forwarding>, GatewayError> {
    // Host: the client's. An authority in the URI (HTTP/2 and HTTP/3 `:authority`, or an
    // absolute-form HTTP/1.1 target) is what routing used, so it is what the upstream gets
    // (RFC 9112 §3.2.2: it replaces any Host header).
    if let Some(a) = req.uri().authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let headers = req.headers_mut();
    headers::strip_hop_by_hop(headers, upgrade, h2);
    // Identity comes from the TLS handshake only, never from the client's headers.
    headers::strip_identity_headers(headers);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let forwarding = headers::forwarding(headers, info, request_id);
    // HTTP/1.1 upstreams get the forwarding headers written into the request head; the map
    // gets them only where something reads it: hyper's HTTP/2 client, and the route's
    // edits (which may replace or remove them).
    let late = if h2 || !route.request_headers.is_empty() {
        // Room for them at once: hyper sizes the map for the headers it parsed, and each
        // growth rehashes every entry.
        headers.reserve(8);
        forwarding.apply(headers);
        route.request_headers.apply(headers);
        None
    } else {
        Some(forwarding)
    };
    // Last, so no route edit can replace the verified identity.
    if let Some(v) = info.identity.and_then(|i| i.xfcc.as_ref()) {
        headers.insert(headers::X_FORWARDED_CLIENT_CERT.clone(), v.clone());
    }
    if h2 {
        // :authority (the endpoint) replaces Host on HTTP/2.
        headers.remove(header::HOST);
    }

    // Origin form; the HTTP/2 path adds the endpoint as authority.
    let path_and_query = upstream_path(req.uri(), route)?;
    *req.uri_mut() = Uri::from(path_and_query);
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    Ok(late)
}

/// The path (and query) sent upstream, with the route's prefix stripped if asked.
fn upstream_path(uri: &Uri, route: &RouteConfig) -> Result<PathAndQuery, GatewayError> {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if !route.strip_prefix || original.path() == "*" {
        return Ok(original);
    }
    let crate::config::PathMatch::Prefix(prefix) = &route.path else {
        return Ok(original);
    };
    // Routed on the path without segment parameters: when the prefix itself carried some
    // (`/api;x/users` under `/api/`), the path as sent does not start with it, and what to
    // strip is a guess. Refused rather than forwarded unstripped.
    let Some(rest) = original.path().strip_prefix(prefix.as_str()) else {
        return Err(GatewayError::BadRequest(
            "path parameters inside the route prefix of a strip_prefix route",
        ));
    };
    let mut out =
        String::with_capacity(rest.len() + 1 + original.query().map_or(0, |q| q.len() + 1));
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    // What is left must be as normal as what was routed: `/api../x` under the prefix `/api`
    // would otherwise reach the upstream as `/../x`, a path no route or policy looked at.
    if crate::proxy::path::normalize(&out).is_some() {
        return Err(GatewayError::BadRequest(
            "the path left after strip_prefix is not a normal path",
        ));
    }
    if let Some(q) = original.query() {
        out.push('?');
        out.push_str(q);
    }
    PathAndQuery::try_from(out).map_err(|_| GatewayError::BadRequest("invalid request target"))
}

/// What ends a tunnel besides its two sides: silence for `idle`, the client connection's
/// close signal, a ban on the client.
struct Ends {
    idle: Duration,
    close: Option<CloseSignal>,
    bans: Option<crate::decisions::BanWatch>,
}

/// Copies bytes both ways between an upgraded client and the upstream connection.
///
/// The tunnel outlives the HTTP/1.1 connection it came from (hyper hands the socket over), so
/// it watches that connection's close signal itself: when its listener stops or a reload
/// changes the client-certificate rules it was admitted under, the tunnel is a request in
/// flight that never ends by itself, and gets the drain time before it is closed.
async fn tunnel(
    client: crate::upgrade::OnUpgrade,
    upstream: super::tls::Stream,
    leftover: bytes::Bytes,
    ends: Ends,
    _slot: InFlight,
) {
    let Ends { idle, close, bans } = ends;
    let client = match client.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "client upgrade failed");
            return;
        }
    };
    let mut client = client;
    if !leftover.is_empty() && client.write_all(&leftover).await.is_err() {
        return;
    }
    // Both directions, and a watchdog: a tunnel with no byte either way for `idle` (the
    // route's response timeout, like nginx's proxy_read_timeout) is closed, so silent
    // tunnels do not pile up.
    let epoch = std::time::Instant::now();
    let last = std::sync::atomic::AtomicU64::new(0);
    let (client_rd, client_wr) = tokio::io::split(client);
    let (upstream_rd, upstream_wr) = tokio::io::split(upstream);
    let both = async {
        tokio::try_join!(
            pump(client_rd, upstream_wr, &last, epoch),
            pump(upstream_rd, client_wr, &last, epoch)
        )
    };
    let watchdog = async {
        loop {
            let quiet = epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    let closed = async {
        match &close {
            Some(c) => {
                c.requested().await;
                tokio::time::sleep(c.drain()).await;
            }
            None => std::future::pending().await,
        }
    };
    let banned = async {
        match bans {
            Some(b) => b.banned().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = both => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        ban = banned => tracing::info!(origin = %ban.origin, value = %ban.value, "client banned while its WebSocket was open; tunnel closed"),
        _ = watchdog => tracing::debug!(idle = ?idle, "upgraded connection idle; closed"),
        _ = closed => tracing::debug!("upgraded connection still open when the drain time ran out; closed"),
    }
}

/// Copies one direction of a tunnel until EOF (then half-closes the other side), noting
/// activity in `last` (milliseconds since `epoch`).
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    last: &std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
    }
}

/// Whether an HTTP/2 upstream turned the request's stream away before processing it: a
/// graceful GOAWAY (NO_ERROR) whose last stream ID is below it, or RST_STREAM with
/// REFUSED_STREAM (RFC 9113 §6.8, §8.7). Streams the GOAWAY covers that the connection
/// later loses fail with another error (a broken pipe, or a GOAWAY with an error code).
fn unprocessed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            return h2e.is_remote()
                && ((h2e.is_go_away() && h2e.reason() == Some(h2::Reason::NO_ERROR))
                    || (h2e.is_reset() && h2e.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        cur = err.source();
    }
    false
}

/// An error and its causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
