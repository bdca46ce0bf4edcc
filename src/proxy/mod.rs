//! The request pipeline, top to bottom. Every protocol (HTTP/1.1, HTTP/2, HTTP/3)
//! hands `Gateway::handle` the same `http::Request<Body>` plus a `ConnInfo`; no stage below
//! knows which protocol carried the request.
//!
//! ```text
//! handle
//!   ├─ snapshot      the config generation this request runs on, to its end
//!   ├─ request id    generated (or kept from a trusted proxy)
//!   ├─ client ip     the peer, or the address behind trusted proxies
//!   ├─ client auth   connection admitted under client-certificate rules a reload replaced
//!   │                -> 421 (the client retries on a new connection, verified anew)
//!   ├─ normalize     dot segments out, so routing sees what the upstream will
//!   ├─ route         first match in file order, else 404
//!   ├─ decisions     banned client ip -> 403 (CrowdSec, Wazuh, local bans)
//!   ├─ early data    0-RTT: served on routes that allow it (safe methods), else 425
//!   ├─ policy        Cedar: identity x method x route -> permit, or 403 (deny by default)
//!   ├─ rate limit    per ip / identity / route / trusted header -> 429
//!   ├─ appsec        optional CrowdSec WAF inspection
//!   └─ action        respond | redirect | forward (streamed both ways)
//! ```
//! Every exit, success or error, goes through the same tail: `x-request-id` on the response,
//! one access record.

pub mod compress;
pub mod early;
pub mod headers;
pub mod path;

pub use early::EarlyData;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{HeaderValue, LOCATION};
use http::{Method, Request, Response, StatusCode, Uri};

use crate::body::Body;
use crate::config::RouteAction;
use crate::decisions::{self, BanWatch, DecisionStore};
use crate::error::{self, GatewayError};
use crate::ratelimit::{self, RequestFacts};
use crate::runtime::Snapshot;
use crate::telemetry::access_log::{AccessRecord, Pending};
use crate::upstream::forwarder;
use headers::{ForwardInfo, X_REQUEST_ID};

/// What the pipeline knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Name of the listener that accepted the connection.
    pub listener: Arc<str>,
    /// Present on TLS (and QUIC) connections.
    pub tls: Option<TlsInfo>,
    /// The verified client certificate's identity, when the client presented one.
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// The policy stage's per-connection state (the principal entity, built once).
    pub policy_cache: crate::policy::ConnCache,
    /// What asks the connection to finish (listener stopping, client-certificate rules
    /// changed by a reload); `None` for connections no listener accepted (tests, benches).
    pub close: Option<crate::listener::CloseSignal>,
    /// The listener's request limits when the connection was accepted.
    pub limits: RequestLimits,
    /// A PROXY protocol balancer's connection whose header named no client (v1 `UNKNOWN`,
    /// v2 `LOCAL` or a family other than IPv4/IPv6): `peer` is the balancer, but what it
    /// relays is a client's, so the peer is no trusted proxy whatever `trusted_proxies`
    /// says (its `X-Forwarded-For` and the like are not believed).
    pub unnamed_client: bool,
}

/// The limits of a listener that the pipeline enforces the same way for every protocol.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// `max_headers`: more header fields get 431. (HTTP/1.1's codec counts them as it reads
    /// the head; HTTP/2 and HTTP/3 are bounded by size only until here, their cookie crumbs
    /// joined into one field as they entered.)
    pub max_headers: usize,
    /// `max_request_body`.
    pub max_request_body: Option<u64>,
}

impl Default for RequestLimits {
    /// No limit.
    fn default() -> RequestLimits {
        RequestLimits {
            max_headers: usize::MAX,
            max_request_body: None,
        }
    }
}

impl From<&crate::config::Limits> for RequestLimits {
    fn from(l: &crate::config::Limits) -> RequestLimits {
        RequestLimits {
            max_headers: l.max_headers,
            max_request_body: l.max_request_body,
        }
    }
}

/// The negotiated TLS parameters of a connection.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: &'static str,
    /// Key-exchange group, e.g. `X25519MLKEM768`.
    pub group: Option<&'static str>,
    /// ALPN protocol chosen, e.g. `h2`.
    pub alpn: Option<Box<str>>,
    /// Server name the client asked for.
    pub sni: Option<Box<str>>,
}

/// The protocol of one request, as logged.
pub fn protocol_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "h2",
        http::Version::HTTP_3 => "h3",
        http::Version::HTTP_10 => "h1.0",
        _ => "h1",
    }
}

/// The pipeline and the config snapshot it runs on.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// Bans and other remediations; outlives snapshots (reloads keep every decision).
    pub decisions: Arc<DecisionStore>,
}

impl Gateway {
    pub fn new(snapshot: Arc<Snapshot>, decisions: Arc<DecisionStore>) -> Gateway {
        Gateway {
            snapshot: ArcSwap::new(snapshot),
            decisions,
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The generation of the current snapshot (read without taking a reference).
    pub fn generation(&self) -> u64 {
        self.snapshot.load().generation
    }

    /// Makes `next` the snapshot for every request that starts from now on.
    pub fn swap(&self, next: Arc<Snapshot>) -> Arc<Snapshot> {
        self.snapshot.swap(next)
    }

    /// Accounts for a request the HTTP/1.1 codec or the HTTP/3 listener refused before the
    /// pipeline saw it (bad framing, a head too large, conflicting lengths, ...), like any
    /// other answered request: an access record with the status and the error
    /// `malformed_request` (so every log sink, the metrics and a `malformed_request` security
    /// event see it). Unreadable request lines and heads are logged as `- -`.
    pub fn refused_by_codec(
        &self,
        conn: &ConnInfo,
        status: http::StatusCode,
        reason: &'static str,
        request: Option<(Method, http::Uri)>,
        version: http::Version,
        body_len: u64,
    ) {
        let snapshot = self.snapshot.load();
        // An unreadable request line: logged with method and path `-`, no host.
        let unreadable = request.is_none();
        let (method, uri) = request.unwrap_or_else(|| {
            (
                Method::from_bytes(b"-").unwrap_or(Method::GET),
                http::Uri::default(),
            )
        });
        tracing::debug!(peer = %conn.peer, listener = %conn.listener, status = status.as_u16(), reason, protocol = protocol_name(version), "request refused before the pipeline");
        let record = Box::new(AccessRecord {
            time: std::time::SystemTime::now(),
            request_id: headers::new_request_id(),
            // As every other record names it (an IPv4 client on a dual-stack listener is
            // its IPv4 address). No X-Forwarded-For here: the head it would come from was
            // refused, so behind a trusted proxy the proxy is named.
            client_ip: headers::canonical(conn.peer.ip()),
            client_port: Some(conn.peer.port()),
            local: conn.local,
            listener: conn.listener.clone(),
            protocol: protocol_name(version),
            tls_version: conn.tls.as_ref().map(|t| t.version),
            tls_group: conn.tls.as_ref().and_then(|t| t.group),
            identity: conn.identity.clone(),
            method,
            uri,
            status: status.as_u16(),
            bytes_out: body_len,
            error: Some("malformed_request"),
            unreadable,
            ..AccessRecord::default()
        });
        snapshot.telemetry.emit(record);
    }

    /// A request whose client left before it could run (its connection closed as the head
    /// came in): one record, as a client abort (499), and nothing forwarded.
    pub fn abandoned(&self, req: &Request<Body>, conn: &ConnInfo) {
        let snapshot = self.snapshot.load_full();
        let opened = Opened::of(&snapshot, req, conn);
        // Dropped unfinished: emitted as a client abort.
        drop(Pending::new(opened.record, Instant::now(), snapshot));
    }

    /// Handles one request from any protocol.
    ///
    /// (An `async move` block rather than an `async fn`: the future of an `async fn` keeps
    /// its arguments twice, and the request is 264 bytes.)
    #[allow(clippy::manual_async_fn)] // (on purpose: see above)
    pub fn handle<'a>(
        &'a self,
        mut req: Request<Body>,
        conn: &'a ConnInfo,
    ) -> impl std::future::Future<Output = Response<Body>> + 'a {
        async move {
            // Why first: a reload mid-request must not change the rules under it.
            let snapshot = self.snapshot.load_full();
            let started = Instant::now();
            let head_only = req.method() == Method::HEAD;
            // Bans published from here on end what this request leaves open (`BanWatch`).
            let bans_since = self.decisions.generation();
            // The access record exists from here on; if this future is dropped early it is
            // emitted as a client abort (499).
            let Opened {
                peer_trusted,
                request_id,
                client_ip,
                mut record,
            } = Opened::of(&snapshot, &req, conn);
            record.count_request_body(&mut req);
            let mut pending = Pending::new(record, started, snapshot.clone());

            let result = self
                .run(
                    &snapshot,
                    req,
                    conn,
                    peer_trusted,
                    client_ip,
                    &request_id,
                    bans_since,
                    pending.record(),
                )
                .await;
            // Wraith's own answers (a refusal, an error) are not an upstream's stream to cut: a
            // 403 for a ban published while the request ran would be cut by that very ban.
            let answered = result.is_ok();
            let mut resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    pending.record().refused(&e);
                    match e.fault() {
                        error::Fault::Upstream | error::Fault::Internal => {
                            tracing::warn!(request_id = request_id.to_str().unwrap_or("-"), error = %e, "request failed")
                        }
                        error::Fault::Downstream => {
                            tracing::debug!(request_id = request_id.to_str().unwrap_or("-"), error = %e, "request refused")
                        }
                    }
                    error::to_response(&e, &request_id)
                }
            };
            resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
            // An upstream's response still streaming ends if the client is banned meanwhile.
            if answered
                && pending.record().upstream.is_some()
                && !http_body::Body::is_end_stream(resp.body())
            {
                pending.watch_bans(BanWatch::since(
                    &self.decisions,
                    &snapshot.config.decisions,
                    client_ip,
                    bans_since,
                ));
            }
            // One access record, emitted when the response body ends (or the client leaves).
            pending.finish(resp, head_only)
        }
    }

    /// The stages, each one able to end the request with a typed error.
    #[allow(clippy::too_many_arguments)]
    // (An `async move` block rather than an `async fn`, as `handle`: one copy of the request
    // in its future, not two.)
    #[allow(clippy::manual_async_fn)] // (on purpose: see above)
    fn run<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        mut req: Request<Body>,
        conn: &'a ConnInfo,
        peer_trusted: bool,
        client_ip: IpAddr,
        request_id: &'a HeaderValue,
        bans_since: u64,
        record: &'a mut AccessRecord,
    ) -> impl std::future::Future<Output = Result<Response<Body>, GatewayError>> + 'a {
        async move {
            // First: the certificate that opened this connection may have just been revoked (or
            // the TLS version or group it negotiated withdrawn). The connection is closing
            // already; this covers requests it read before it could stop.
            if conn.close.as_ref().is_some_and(|c| c.admission_revoked()) {
                return Err(GatewayError::ClientAuthChanged);
            }
            if req.method() == Method::CONNECT {
                return Err(GatewayError::BadRequest("CONNECT is not supported"));
            }
            // Methods are case-sensitive, so `delete` is not DELETE to HTTP or to a policy, but
            // some applications upper-case what they get (Werkzeug, Django) and would run their
            // DELETE for it. Refused, as nginx refuses any method that is not upper case.
            if req
                .method()
                .as_str()
                .bytes()
                .any(|b| b.is_ascii_lowercase())
            {
                return Err(GatewayError::BadRequest("method not in upper case"));
            }
            // The asterisk form names no resource and is for OPTIONS only (RFC 9110 §7.1): over
            // HTTP/2 and HTTP/3 `:path *` reached a catch-all route with any method.
            if req.uri().path() == "*" && req.method() != Method::OPTIONS {
                return Err(GatewayError::BadRequest(
                    "the asterisk target (*) is for OPTIONS only",
                ));
            }
            // HTTP/2 and HTTP/3 carry the path in `:path`, which every request but CONNECT
            // must have, not empty (RFC 9113 §8.3.1, RFC 9114 §4.3.1). h2 lets a request
            // without it through when the host comes in a `host` field rather than
            // `:authority`; it would be served as `/`. (Every HTTP/1.1 request-target has a
            // path, `*` or `/` at least.)
            if req.uri().path().is_empty() {
                return Err(GatewayError::BadRequest("missing :path"));
            }
            if req.headers().len() > conn.limits.max_headers {
                return Err(GatewayError::TooManyHeaders {
                    limit: conn.limits.max_headers,
                });
            }
            // Two Host headers: the upstream might believe the other one (RFC 9112 §3.2: 400).
            {
                let mut hosts = req.headers().get_all(http::header::HOST).iter();
                if hosts.next().is_some() && hosts.next().is_some() {
                    return Err(GatewayError::BadRequest("more than one Host header"));
                }
            }
            // HTTP/2 and HTTP/3 carry the authority in `:authority`; a `host` field naming
            // another is malformed (RFC 9113 §8.3.1, RFC 9114 §4.3.1). Refused rather than one
            // of the two chosen, so that no stage and no upstream behind it reads the other.
            if matches!(req.version(), http::Version::HTTP_2 | http::Version::HTTP_3) {
                // Nor may a field value begin or end with whitespace (RFC 9113 §8.2.1, RFC
                // 9114 §4.2). An HTTP/1.1 upstream trims it, so a policy, a route or a limit
                // keyed by " admin" would judge another value than the upstream acts on.
                // (HTTP/1.1 heads never carry it: httparse drops the whitespace around a value.)
                if req.headers().values().any(|v| padded(v.as_bytes())) {
                    return Err(GatewayError::BadRequest(
                        "a field value begins or ends with whitespace",
                    ));
                }
                if let (Some(authority), Some(host)) =
                    (req.uri().authority(), req.headers().get(http::header::HOST))
                {
                    if !host
                        .as_bytes()
                        .eq_ignore_ascii_case(authority.as_str().as_bytes())
                    {
                        return Err(GatewayError::BadRequest(
                            "the host field differs from :authority",
                        ));
                    }
                }
            }
            // Normalize before routing: what matched is what the upstream gets. Forms that
            // upstreams read differently (`\`, `..;`) are refused rather than guessed at.
            // (A plain path, nearly every one, needs none of it: one scan decides.)
            let plain_path = path::is_plain(req.uri().path());
            if !plain_path {
                if let Some(why) = path::refused(req.uri().path()) {
                    return Err(GatewayError::BadRequest(why));
                }
                // (`OPTIONS *`, the asterisk form, is no path: it goes on as it came, not as
                // `/*`.)
                if req.uri().path() != "*" {
                    if let Some(normal) = path::normalize(req.uri().path()) {
                        *req.uri_mut() = with_path(req.uri(), &normal)?;
                    }
                }
            }
            let host = headers::Host::of(req.uri(), record.host_header.as_ref());
            // One host for routing, policy and the upstream: anything but a name or an IP
            // literal with an optional port (userinfo, paths, lists) is refused.
            let Ok(host_name) = host.checked_name() else {
                return Err(GatewayError::BadRequest("invalid Host"));
            };
            // Every HTTP version since 1.0 requires the target host (RFC 9112 §3.2, RFC 9113
            // §8.3.1, RFC 9114 §4.3.1): only an HTTP/1.0 request may come without one.
            if matches!(host, headers::Host::Missing)
                && !matches!(
                    req.version(),
                    http::Version::HTTP_10 | http::Version::HTTP_09
                )
            {
                return Err(GatewayError::BadRequest("missing Host"));
            }
            // Routing and policy judge the path without segment parameters (`path::without_params`);
            // the upstream gets it as sent.
            let params_free = match plain_path {
                true => None,
                false => match path::without_params(req.uri().path()) {
                    std::borrow::Cow::Owned(p) => Some(p),
                    std::borrow::Cow::Borrowed(_) => None,
                },
            };
            let route = snapshot.router.find(
                host_name,
                params_free.as_deref().unwrap_or(req.uri().path()),
                req.method(),
            );
            // Decisions before anything that costs (a banned client spends no quota), and before
            // the redirect and the 404: a banned client gets 403 whatever it asks for. Its record
            // names the route it asked for.
            if let Err(banned) =
                decisions::check(&self.decisions, &snapshot.config.decisions, client_ip)
            {
                if let Some(route) = route {
                    record.set_route(route);
                }
                return Err(banned);
            }
            // Plain-HTTP listener told to send everyone to HTTPS: after the Host and path checks,
            // since the Location is built from them.
            if let Some(redirect) = snapshot
                .listener(&conn.listener)
                .and_then(|l| l.config.redirect_https.as_ref())
            {
                return Ok(https_redirect(&req, redirect));
            }
            if let Some(route) = route {
                record.set_route(route);
            }
            let route = route.ok_or(GatewayError::NoRoute)?;
            // Early data (0-RTT, replayable) after routing, since the route decides whether it is
            // served; before policy, which must see the verified identity of a request that
            // waited for the handshake. Other requests pass at the cost of one lookup.
            // Marked before the gate, so a 425 is logged as the early request it refused.
            record.early_data = req.extensions().get::<EarlyData>().is_some();
            let confirmed;
            let conn = match early::admit(&mut req, route, || {
                snapshot
                    .listener(&conn.listener)
                    .and_then(|l| l.config.tls.as_ref())
                    .is_some_and(|t| t.client_auth.mode != crate::config::ClientAuthMode::None)
            })
            .await?
            {
                early::Admit::Proceed => conn,
                early::Admit::Confirmed(info) => {
                    record.identity = info.identity.clone();
                    confirmed = info;
                    &*confirmed
                }
            };
            let early_data = req.extensions().get::<EarlyData>().is_some();
            record.early_data = early_data;
            // Policy: after routing (the route is Cedar's resource), before anything is spent on
            // the request. Deny by default; a shadow-mode deny is logged and let through.
            // (In a block: its locals are not kept across the awaits below.)
            {
                let access = crate::policy::Access {
                    route,
                    method: req.method(),
                    host: host_name,
                    path: params_free.as_deref().unwrap_or(req.uri().path()),
                    query: req.uri().query(),
                    version: req.version(),
                    early_data,
                    client_ip,
                    conn,
                };
                let verdict = snapshot.policy.authorize(&access);
                let decision = match &verdict {
                    Ok(permit) => &permit.decision,
                    Err(deny) => &deny.decision,
                };
                tracing::debug!(
                    target: "wraith::policy",
                    request_id = request_id.to_str().unwrap_or("-"),
                    route = %route.config.name,
                    protocol = protocol_name(req.version()),
                    principal = conn.identity.as_ref().map_or("-", |i| i.name()),
                    policy = %decision,
                    "policy decision"
                );
                record.policy = Some(decision.into());
                if let Err(deny) = verdict {
                    return Err(GatewayError::from(&deny));
                }
            }
            // Rate limits after policy: only requests that could be served count.
            let facts = RequestFacts {
                client: client_ip,
                peer_trusted,
                identity: conn.identity.as_ref(),
                headers: req.headers(),
                route: &route.config.name,
            };
            record.rate_limit = if route.shared_limits {
                // Boxed: the Redis round trip's state stays out of this future unless used.
                Box::pin(ratelimit::check_with_shared(
                    &route.limits,
                    &route.limit_names,
                    &facts,
                    route
                        .config
                        .rate_limits
                        .is_some()
                        .then_some(&*route.config.name),
                    snapshot.rate_store.as_deref(),
                ))
                .await?
            } else {
                ratelimit::check(&route.limits, &route.limit_names, &facts)?
            };
            // A body declared larger than the limit is refused before any of it is read (and
            // before `Expect: 100-continue` is answered); one that turns out larger on the way
            // is cut off by the forwarder (`body::Watched`).
            let max_request_body = route
                .config
                .max_request_body
                .unwrap_or(conn.limits.max_request_body);
            if let Some(limit) = max_request_body {
                if http_body::Body::size_hint(req.body()).lower() > limit {
                    return Err(GatewayError::PayloadTooLarge { limit });
                }
            }
            // The WAF last among the refusals: it is the only one that costs a round trip.
            if let Some(appsec) = &snapshot.appsec {
                req = appsec.inspect(req, client_ip).await?;
            }

            let mut resp = match &route.config.action {
                RouteAction::Respond(r) => {
                    let mut resp = Response::new(Body::full(r.body.clone()));
                    *resp.status_mut() = r.status;
                    *resp.headers_mut() = r.headers.clone();
                    resp
                }
                RouteAction::Redirect { to, status } => redirect(&req, host_name, to, *status),
                RouteAction::Upstream(_) => {
                    let info = ForwardInfo {
                        peer: conn.peer.ip(),
                        client_ip,
                        peer_trusted,
                        https: conn.tls.is_some(),
                        host: host_name,
                        version: req.version(),
                        identity: conn.identity.as_deref(),
                        early_data,
                        close: conn.close.as_ref(),
                        max_request_body,
                        bans: Some(decisions::BanSource {
                            store: &self.decisions,
                            config: &snapshot.config.decisions,
                            client: client_ip,
                            since: bans_since,
                        }),
                    };
                    // (Not in an async fn of its own: each level of nesting keeps another copy
                    // of the request in the pipeline's future.)
                    let upstream = route.upstream.as_ref().ok_or(GatewayError::NoRoute)?;
                    // Compression (opt-in per route) needs what the request asked for; read it
                    // now.
                    let compression = route.config.compression.as_deref();
                    let wanted =
                        compression.map(|c| compress::Wanted::of(c, req.method(), req.headers()));
                    let resp = forwarder::forward(
                        upstream,
                        &route.config,
                        req,
                        &info,
                        request_id,
                        &mut record.forward,
                    )
                    .await?;
                    match (compression, wanted) {
                        (Some(c), Some(w)) => compress::apply(c, w, resp),
                        _ => resp,
                    }
                }
            };
            route.config.response_headers.apply(resp.headers_mut());
            Ok(resp)
        }
    }
}

/// Who a request comes from, and its access record, as every request is opened (run, or
/// recorded as abandoned).
struct Opened {
    peer_trusted: bool,
    request_id: HeaderValue,
    client_ip: std::net::IpAddr,
    record: Box<AccessRecord>,
}

impl Opened {
    fn of(snapshot: &Snapshot, req: &Request<Body>, conn: &ConnInfo) -> Opened {
        let trusted = &snapshot.config.server.trusted_proxies;
        let peer_trusted = !conn.unnamed_client && headers::is_trusted(trusted, conn.peer.ip());
        let request_id = headers::request_id(req.headers(), peer_trusted);
        let client_ip = headers::client_ip(req.headers(), conn.peer.ip(), trusted, peer_trusted);
        let record = Box::new(AccessRecord::start(req, conn, client_ip, &request_id));
        Opened {
            peer_trusted,
            request_id,
            client_ip,
            record,
        }
    }
}

/// Whether a field value begins or ends with whitespace (SP or HTAB, the only whitespace a
/// `HeaderValue` holds).
fn padded(value: &[u8]) -> bool {
    matches!(value.first(), Some(b' ' | b'\t')) || matches!(value.last(), Some(b' ' | b'\t'))
}

/// The same URI with another path (query kept).
fn with_path(uri: &Uri, path: &str) -> Result<Uri, GatewayError> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| GatewayError::BadRequest("invalid request target"))?,
    );
    Uri::from_parts(parts).map_err(|_| GatewayError::BadRequest("invalid request target"))
}

fn https_redirect(req: &Request<Body>, r: &crate::config::HttpsRedirect) -> Response<Body> {
    // An empty Host is none (an HTTP/1.0 client's, or a hostile one's): never `https://:443`.
    let host = headers::request_host(req.uri(), req.headers())
        .filter(|h| !h.is_empty())
        .unwrap_or("localhost");
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let port = if r.port == 443 {
        String::new()
    } else {
        format!(":{}", r.port)
    };
    // (`OPTIONS *` names no resource: its redirect goes to the root.)
    let pq = match req.uri().path_and_query().map_or("/", |p| p.as_str()) {
        "*" => "/",
        pq => pq,
    };
    redirect_response(r.status, &format!("https://{host}{port}{pq}"))
}

/// A route's redirect: `{host}`, `{path}` and `{uri}` (path and query) are substituted.
fn redirect(
    req: &Request<Body>,
    host: Option<&str>,
    to: &str,
    status: StatusCode,
) -> Response<Body> {
    // (`OPTIONS *` names no resource: `{path}` and `{uri}` are the root for it.)
    let path = match req.uri().path() {
        "*" => "/",
        p => p,
    };
    let uri = match req.uri().path_and_query().map_or("/", |p| p.as_str()) {
        "*" => "/",
        u => u,
    };
    let target = to
        .replace("{host}", host.unwrap_or(""))
        .replace("{path}", path)
        .replace("{uri}", uri);
    redirect_response(status, &target)
}

fn redirect_response(status: StatusCode, location: &str) -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = status;
    match HeaderValue::from_str(location) {
        Ok(v) => {
            resp.headers_mut().insert(LOCATION, v);
        }
        Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
    }
    resp
}
