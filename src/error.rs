//! Stage errors and the one function that turns them into HTTP responses.
//!
//! Every refusal in the pipeline is a `GatewayError`. It knows its status, a short public
//! reason, whose fault it was and whether retrying elsewhere is safe; `to_response` is the only
//! place that renders one, always as JSON with the request id and never with internal detail.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::Body;

/// Which side caused a failure (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something we refuse.
    Downstream,
    /// The upstream failed or was unreachable.
    Upstream,
    /// Wraith itself.
    Internal,
}

/// A request the gateway did not (successfully) forward.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches")]
    NoRoute,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("cannot connect to upstream {upstream} ({endpoint}): {reason}")]
    UpstreamConnect {
        upstream: std::sync::Arc<str>,
        endpoint: String,
        reason: String,
    },
    #[error("upstream {upstream} ({endpoint}) did not answer within {timeout:?}")]
    UpstreamTimeout {
        upstream: std::sync::Arc<str>,
        endpoint: String,
        timeout: std::time::Duration,
    },
    #[error("upstream {upstream} ({endpoint}) failed: {reason}")]
    UpstreamFailed {
        upstream: std::sync::Arc<str>,
        endpoint: String,
        reason: String,
    },
    #[error("upstream {upstream} has no available endpoint")]
    NoEndpoint { upstream: std::sync::Arc<str> },
    #[error("client is banned ({kind} decision from {origin})")]
    Banned {
        origin: std::sync::Arc<str>,
        kind: std::sync::Arc<str>,
        /// The decision's scenario or note (empty when it has none): logged, never sent.
        reason: std::sync::Arc<str>,
    },
    #[error("decision source unavailable and on_error = \"closed\"")]
    DecisionsUnavailable,
    #[error("rate limit {} exceeded; retry in {:?}", .0.name, .0.retry_after)]
    RateLimited(Box<RateLimited>),
    #[error("blocked by CrowdSec AppSec ({action})")]
    AppsecBlocked { action: String, status: StatusCode },
    #[error("CrowdSec AppSec failed and on_error = \"closed\": {reason}")]
    AppsecUnavailable { reason: String },
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// More header fields than the listener's `max_headers` (HTTP/2, HTTP/3; HTTP/1.1's
    /// codec refuses them before the pipeline).
    #[error("more than {limit} request header fields")]
    TooManyHeaders { limit: usize },
    /// The client sent its request body too slowly (nothing for the response timeout).
    #[error("the request body was not received in time")]
    RequestBodyTimeout,
    #[error("upstream {upstream} is at its connection limits and its queue is full")]
    Overloaded { upstream: std::sync::Arc<str> },
    /// The policy stage refused the request (the decision is in the access record).
    #[error("denied by policy: {}", .0.as_str())]
    Forbidden(crate::policy::Reason),
    /// Received as TLS early data (0-RTT) where that is not served (RFC 8470).
    #[error("early data refused: unsafe method, or the route does not allow early data")]
    TooEarly,
    /// The connection was admitted under client-certificate rules that a reload has since
    /// replaced; it serves nothing more (RFC 9110 §15.5.20: the client may retry the request,
    /// whatever its method, on a new connection).
    #[error("the connection's client authentication settings were replaced by a reload")]
    ClientAuthChanged,
    /// The client went away while sending its request body (its connection closed or broke,
    /// its stream was reset): a client abort, logged with nginx's 499. Nothing reaches the
    /// client: it is gone.
    #[error("the client abandoned its request body")]
    ClientClosed,
}

/// nginx's "client closed request" (`telemetry::access_log::CLIENT_CLOSED`).
fn client_closed() -> StatusCode {
    StatusCode::from_u16(crate::telemetry::access_log::CLIENT_CLOSED)
        .unwrap_or(StatusCode::BAD_REQUEST)
}

/// What a 429 says about the limit that refused the request.
#[derive(Debug)]
pub struct RateLimited {
    /// The limit's name.
    pub name: std::sync::Arc<str>,
    /// Until one more request would be allowed.
    pub retry_after: std::time::Duration,
    /// The limit's burst (the IETF `q`).
    pub quota: u32,
    /// Time to refill the whole burst (the IETF `w`), seconds.
    pub window_secs: u64,
}

impl GatewayError {
    /// The HTTP status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::UpstreamConnect { .. } | GatewayError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::NoEndpoint { .. } | GatewayError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Banned { .. } => StatusCode::FORBIDDEN,
            GatewayError::DecisionsUnavailable | GatewayError::AppsecUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::AppsecBlocked { status, .. } => *status,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::TooEarly => StatusCode::TOO_EARLY,
            GatewayError::ClientAuthChanged => StatusCode::MISDIRECTED_REQUEST,
            GatewayError::ClientClosed => client_closed(),
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no_route",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::UpstreamConnect { .. } => "upstream_unreachable",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::UpstreamFailed { .. } => "upstream_failed",
            GatewayError::NoEndpoint { .. } => "no_endpoint",
            GatewayError::Banned { .. } => "banned",
            GatewayError::DecisionsUnavailable => "decisions_unavailable",
            GatewayError::RateLimited(_) => "rate_limited",
            GatewayError::AppsecBlocked { .. } => "appsec_blocked",
            GatewayError::AppsecUnavailable { .. } => "appsec_unavailable",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::RequestBodyTimeout => "request_timeout",
            GatewayError::TooManyHeaders { .. } => "too_many_headers",
            GatewayError::Overloaded { .. } => "upstream_overloaded",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::TooEarly => "too_early",
            GatewayError::ClientAuthChanged => "client_auth_changed",
            GatewayError::ClientClosed => "client_closed",
        }
    }

    /// A short reason safe to show to the client.
    pub fn public_message(&self) -> String {
        match self {
            GatewayError::NoRoute => "no route matches this request".into(),
            GatewayError::BadRequest(why) => (*why).into(),
            GatewayError::UpstreamConnect { upstream, .. } => {
                format!("upstream {upstream:?} is unreachable (no connection could be made: nothing listening, refused, or a failed TLS handshake; the gateway's log says which)")
            }
            GatewayError::UpstreamTimeout { upstream, .. } => {
                format!("upstream {upstream:?} did not answer in time")
            }
            GatewayError::UpstreamFailed { upstream, .. } => {
                format!("upstream {upstream:?} sent an invalid response or closed the connection")
            }
            GatewayError::NoEndpoint { upstream } => {
                format!("upstream {upstream:?} has no healthy endpoint")
            }
            GatewayError::Overloaded { upstream } => {
                format!("upstream {upstream:?} is at capacity; retry later")
            }
            GatewayError::Banned { .. } => "your address is blocked".into(),
            GatewayError::DecisionsUnavailable => {
                "the gateway cannot verify its block list right now; try again later".into()
            }
            GatewayError::RateLimited(r) => {
                format!("rate limit {:?} exceeded; slow down", r.name)
            }
            GatewayError::AppsecBlocked { .. } => {
                "request blocked by the web application firewall".into()
            }
            GatewayError::AppsecUnavailable { .. } => {
                "the web application firewall is unavailable; try again later".into()
            }
            GatewayError::PayloadTooLarge { limit } => {
                format!("request body larger than {limit} bytes")
            }
            GatewayError::RequestBodyTimeout => "the request body was not received in time".into(),
            GatewayError::TooManyHeaders { limit } => {
                format!("more than {limit} request header fields")
            }
            // The reason class only: which policy and why stays in the server's log.
            GatewayError::Forbidden(reason) => match reason {
                crate::policy::Reason::NoPermit => {
                    "access denied: no policy permits this request".into()
                }
                crate::policy::Reason::Error => {
                    "access denied: the request could not be authorized".into()
                }
                _ => "access denied by policy".into(),
            },
            GatewayError::TooEarly => {
                "this request cannot be served as early data; retry after the handshake".into()
            }
            GatewayError::ClientAuthChanged => {
                "the listener's client authentication or TLS settings changed, or the client certificate expired; retry on a new connection".into()
            }
            GatewayError::ClientClosed => "the client closed the request".into(),
        }
    }

    /// Whose fault it was.
    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::NoRoute
            | GatewayError::BadRequest(_)
            | GatewayError::Banned { .. }
            | GatewayError::RateLimited(_)
            | GatewayError::AppsecBlocked { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::RequestBodyTimeout
            | GatewayError::TooManyHeaders { .. }
            | GatewayError::TooEarly
            | GatewayError::ClientClosed
            // Nobody's failure; counted with the client's side, logged at debug.
            | GatewayError::ClientAuthChanged => Fault::Downstream,
            GatewayError::Forbidden(crate::policy::Reason::Error) => Fault::Internal,
            GatewayError::Forbidden(_) => Fault::Downstream,
            GatewayError::DecisionsUnavailable | GatewayError::AppsecUnavailable { .. } => {
                Fault::Internal
            }
            GatewayError::UpstreamConnect { .. }
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::UpstreamFailed { .. }
            | GatewayError::NoEndpoint { .. }
            | GatewayError::Overloaded { .. } => Fault::Upstream,
        }
    }

    /// Whether the same request may safely be tried against another endpoint.
    /// A refused connection never reached an upstream; anything later might have.
    pub fn retryable(&self) -> bool {
        matches!(self, GatewayError::UpstreamConnect { .. })
    }

    /// Seconds the client should wait before retrying, when that is known.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::NoEndpoint { .. } | GatewayError::Overloaded { .. } => Some(1),
            GatewayError::DecisionsUnavailable | GatewayError::AppsecUnavailable { .. } => Some(5),
            GatewayError::RateLimited(r) => Some(ceil_secs(r.retry_after)),
            _ => None,
        }
    }

    /// Headers beyond Retry-After that this refusal carries: the IETF `RateLimit-Policy` and
    /// `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers) on a 429.
    pub fn add_headers(&self, headers: &mut http::HeaderMap) {
        if let GatewayError::RateLimited(r) = self {
            let policy = format!("\"{}\";q={};w={}", r.name, r.quota, r.window_secs);
            let state = format!("\"{}\";r=0;t={}", r.name, ceil_secs(r.retry_after));
            if let (Ok(p), Ok(s)) = (
                HeaderValue::from_str(&policy),
                HeaderValue::from_str(&state),
            ) {
                headers.insert(RATELIMIT_POLICY.clone(), p);
                headers.insert(RATELIMIT.clone(), s);
            }
        }
    }
}

/// `RateLimit-Policy` (IETF httpapi draft).
pub static RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (IETF httpapi draft).
pub static RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// Whole seconds, rounded up, at least 1 (a client told "0" would retry at once).
pub fn ceil_secs(d: std::time::Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

/// Renders an error as a JSON response carrying the request id.
pub fn to_response(err: &GatewayError, request_id: &HeaderValue) -> Response<Body> {
    let mut resp = json_response(
        err.status(),
        err.code(),
        &err.public_message(),
        request_id,
        err.retry_after(),
    );
    err.add_headers(resp.headers_mut());
    if matches!(err, GatewayError::ClientClosed) {
        resp.extensions_mut().insert(Abandoned);
    }
    resp
}

/// Marks the response to a request its client abandoned (`GatewayError::ClientClosed`): the
/// 499 is for the log only, never for the wire. Over HTTP/1.1 and HTTP/2 nothing can reach
/// the client anyway (its connection or stream is gone); an HTTP/3 client that reset only its
/// sending side could still read, and gets its stream cancelled instead.
#[derive(Debug, Clone, Copy)]
pub struct Abandoned;

/// A JSON error body: `{"error": code, "message": ..., "request_id": ...}`.
pub fn json_response(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &HeaderValue,
    retry_after: Option<u64>,
) -> Response<Body> {
    let body = serde_json::json!({
        "error": code,
        "message": message,
        "request_id": request_id.to_str().unwrap_or(""),
    });
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Body::full(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}
