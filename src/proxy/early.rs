//! TLS early data (0-RTT, RFC 8470). A resumed QUIC client may send requests before the
//! handshake completes; an attacker who recorded them can replay them. The rules:
//!
//! - only routes with `early_data = true` serve such requests, and only for safe methods
//!   (GET, HEAD, OPTIONS); anything else gets 425 Too Early, which clients retry once the
//!   handshake is done;
//! - on listeners that verify client certificates, the identity is not known (not proven for
//!   this connection) before the handshake completes: the request waits for it, and is then
//!   no longer replayable — it continues as an ordinary request with the verified identity;
//! - a request served early carries `Early-Data: 1` to the upstream (added by the forwarder)
//!   and is marked `early_data` in the access record and the policy context.

use std::sync::Arc;

use http::{Method, Request};
use tokio::sync::watch;

use super::ConnInfo;
use crate::body::Body;
use crate::error::GatewayError;
use crate::router::Route;

/// Request extension: the request arrived as TLS 0-RTT early data, before the handshake
/// completed. The QUIC listener inserts it; it carries the way to wait for the handshake.
#[derive(Debug, Clone)]
pub struct EarlyData {
    confirmed: watch::Receiver<Option<Arc<ConnInfo>>>,
}

impl EarlyData {
    /// `confirmed` receives the connection's complete `ConnInfo` (with the verified identity)
    /// when the handshake completes; it closes if the handshake fails.
    pub fn new(confirmed: watch::Receiver<Option<Arc<ConnInfo>>>) -> EarlyData {
        EarlyData { confirmed }
    }
}

/// What the early-data check decided.
pub enum Admit {
    /// Not early data, or early data this route serves as it is.
    Proceed,
    /// The handshake completed while the request waited: continue with this connection info
    /// (it has the verified identity) as an ordinary request.
    Confirmed(Arc<ConnInfo>),
}

/// Applies the early-data rules to a request on `route`. `verifies_clients`: whether the
/// listener asks for client certificates (only looked up for early requests).
pub async fn admit(
    req: &mut Request<Body>,
    route: &Route,
    verifies_clients: impl FnOnce() -> bool,
) -> Result<Admit, GatewayError> {
    let Some(early) = req.extensions().get::<EarlyData>() else {
        return Ok(Admit::Proceed);
    };
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe || !route.config.early_data {
        return Err(GatewayError::TooEarly);
    }
    if !verifies_clients() {
        return Ok(Admit::Proceed);
    }
    let mut confirmed = early.confirmed.clone();
    let info = confirmed
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|v| v.clone())
        // The handshake failed: the connection is closing; nothing was served early.
        .ok_or(GatewayError::TooEarly)?;
    req.extensions_mut().remove::<EarlyData>();
    Ok(Admit::Confirmed(info))
}
