//! The forwarder: rewrites a request for its upstream (hop-by-hop headers out, forwarding
//! headers in, prefix stripped), sends it on the pooled client with the response timeout, and
//! streams the response back. WebSocket upgrades become a byte tunnel.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::h1::{self, SendError};
use super::{Endpoint, Upstream};
use crate::body::Body;
use crate::config::{RouteConfig, UpstreamProtocol};
use crate::error::GatewayError;
use crate::proxy::headers::{self, ForwardInfo, X_REQUEST_ID};

/// What happened while forwarding (for the access log).
#[derive(Debug, Default, Clone)]
pub struct ForwardOutcome {
    /// The endpoint tried last.
    pub endpoint: Option<String>,
    /// Time from sending the request to receiving the response head.
    pub upstream_time: Option<Duration>,
    pub attempts: u32,
}

/// Forwards `req` to `upstream` on behalf of `route`. A connection that cannot be made is
/// tried on the next endpoint (nothing was sent, so that is always safe).
pub async fn forward(
    upstream: &Upstream,
    route: &RouteConfig,
    mut req: Request<Body>,
    info: &ForwardInfo<'_>,
    request_id: &HeaderValue,
    outcome: &mut ForwardOutcome,
) -> Result<Response<Body>, GatewayError> {
    let h2 = upstream.config.protocol == UpstreamProtocol::H2c;
    let upgrade = !h2 && headers::upgrade_requested(req.headers(), req.version());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    prepare_request(&mut req, route, info, request_id, h2, upgrade)?;
    let timeout = route
        .response_timeout
        .unwrap_or(upstream.config.response_timeout);

    loop {
        let endpoint = upstream.pick().ok_or_else(|| GatewayError::NoEndpoint {
            upstream: upstream.config.name.clone(),
        })?;
        outcome.attempts += 1;
        outcome.endpoint = Some(endpoint.authority.to_string());
        endpoint.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = if h2 {
            send_h2(upstream, endpoint, req, timeout).await
        } else {
            h1::send(&endpoint.pool, req, timeout).await
        };
        outcome.upstream_time = Some(started.elapsed());
        let resp = match result {
            Ok(resp) => resp,
            Err(SendError::Connect { error, request }) => {
                endpoint.failures.fetch_add(1, Ordering::Relaxed);
                if (outcome.attempts as usize) < upstream.endpoints.len() {
                    tracing::warn!(upstream = %upstream.config.name, endpoint = %endpoint.authority, error = %error, "connect failed; trying the next endpoint");
                    req = *request;
                    continue;
                }
                return Err(GatewayError::UpstreamConnect {
                    upstream: upstream.config.name.clone(),
                    endpoint: endpoint.authority.to_string(),
                    reason: error.to_string(),
                });
            }
            Err(SendError::Timeout) => {
                return Err(GatewayError::UpstreamTimeout {
                    upstream: upstream.config.name.clone(),
                    endpoint: endpoint.authority.to_string(),
                    timeout,
                })
            }
            Err(SendError::Failed(reason)) => {
                return Err(GatewayError::UpstreamFailed {
                    upstream: upstream.config.name.clone(),
                    endpoint: endpoint.authority.to_string(),
                    reason,
                })
            }
        };
        return Ok(finish_response(resp, client_upgrade));
    }
}

/// Hop-by-hop headers out of the response; a 101 becomes a tunnel.
fn finish_response(
    mut resp: Response<Body>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let (Some(client), Body::Upstream(body)) = (client_upgrade, resp.body_mut()) {
            if let Some((io, leftover)) = body.take_upgrade() {
                tokio::spawn(tunnel(client, io, leftover));
            }
        }
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::Empty);
    }
    headers::strip_hop_by_hop(resp.headers_mut(), false, false);
    resp
}

/// HTTP/2 with prior knowledge through hyper's client (absolute URI names the endpoint).
async fn send_h2(
    upstream: &Upstream,
    endpoint: &Endpoint,
    mut req: Request<Body>,
    timeout: Duration,
) -> Result<Response<Body>, SendError> {
    let Some(client) = upstream.h2_client() else {
        return Err(SendError::Failed(
            "no HTTP/2 client for this upstream".into(),
        ));
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(endpoint.scheme.clone());
    parts.authority = Some(endpoint.authority.clone());
    parts.path_and_query = req.uri().path_and_query().cloned();
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| SendError::Failed(e.to_string()))?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(SendError::Timeout),
        Ok(Err(e)) if e.is_connect() => Err(SendError::Failed(error_chain(&e))),
        Ok(Err(e)) => Err(SendError::Failed(error_chain(&e))),
        Ok(Ok(resp)) => Ok(resp.map(Body::Incoming)),
    }
}

/// Rewrites the request in place for the upstream.
fn prepare_request(
    req: &mut Request<Body>,
    route: &RouteConfig,
    info: &ForwardInfo<'_>,
    request_id: &HeaderValue,
    h2: bool,
    upgrade: bool,
) -> Result<(), GatewayError> {
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
    headers::set_forwarding(headers, info);
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    route.request_headers.apply(headers);
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
    Ok(())
}

/// The path (and query) sent upstream, with the route's prefix stripped if asked.
fn upstream_path(uri: &Uri, route: &RouteConfig) -> Result<PathAndQuery, GatewayError> {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if !route.strip_prefix {
        return Ok(original);
    }
    let crate::config::PathMatch::Prefix(prefix) = &route.path else {
        return Ok(original);
    };
    let rest = original
        .path()
        .strip_prefix(prefix.as_str())
        .unwrap_or(original.path());
    let mut out =
        String::with_capacity(rest.len() + 1 + original.query().map_or(0, |q| q.len() + 1));
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    if let Some(q) = original.query() {
        out.push('?');
        out.push_str(q);
    }
    PathAndQuery::try_from(out).map_err(|_| GatewayError::BadRequest("invalid request target"))
}

/// Copies bytes both ways between an upgraded client and the upstream connection.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut upstream: tokio::net::TcpStream,
    leftover: bytes::Bytes,
) {
    let client = match client.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "client upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    if !leftover.is_empty() && client.write_all(&leftover).await.is_err() {
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
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
