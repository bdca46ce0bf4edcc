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
    /// The policy stage refused the request (the decision is in the access record).
    #[error("denied by policy: {}", .0.as_str())]
    Forbidden(crate::policy::Reason),
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
            GatewayError::NoEndpoint { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
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
            GatewayError::Forbidden(_) => "forbidden",
        }
    }

    /// A short reason safe to show to the client.
    pub fn public_message(&self) -> String {
        match self {
            GatewayError::NoRoute => "no route matches this request".into(),
            GatewayError::BadRequest(why) => (*why).into(),
            GatewayError::UpstreamConnect { upstream, .. } => {
                format!("upstream {upstream:?} is unreachable (nothing is listening, or the connection was refused)")
            }
            GatewayError::UpstreamTimeout { upstream, .. } => {
                format!("upstream {upstream:?} did not answer in time")
            }
            GatewayError::UpstreamFailed { upstream, .. } => {
                format!("upstream {upstream:?} sent an invalid response or closed the connection")
            }
            GatewayError::NoEndpoint { upstream } => {
                format!("upstream {upstream:?} has no available endpoint")
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
        }
    }

    /// Whose fault it was.
    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::NoRoute | GatewayError::BadRequest(_) => Fault::Downstream,
            GatewayError::Forbidden(crate::policy::Reason::Error) => Fault::Internal,
            GatewayError::Forbidden(_) => Fault::Downstream,
            GatewayError::UpstreamConnect { .. }
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::UpstreamFailed { .. }
            | GatewayError::NoEndpoint { .. } => Fault::Upstream,
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
            GatewayError::NoEndpoint { .. } => Some(1),
            _ => None,
        }
    }
}

/// Renders an error as a JSON response carrying the request id.
pub fn to_response(err: &GatewayError, request_id: &HeaderValue) -> Response<Body> {
    json_response(
        err.status(),
        err.code(),
        &err.public_message(),
        request_id,
        err.retry_after(),
    )
}

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
