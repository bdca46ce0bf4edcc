//! The access record: one per request, on every exit path, emitted exactly once.
//!
//! `Gateway::handle` opens a `Pending` record as soon as the request arrives; the stages write
//! what they decided into it (`pending.record()`: route, forward outcome, and the policy,
//! rate-limit and ban fields). At the end, `Pending::finish` hands the record to the response
//! body (`LoggedBody`), which emits it when the last byte has been sent, or when hyper drops
//! the body early because the client went away (`aborted`). If the whole request future is
//! dropped before a response exists (the client reset the stream while we waited for the
//! upstream), `Pending`'s `Drop` emits it with status 499, as nginx does.
//!
//! Nothing here formats anything: the record holds cheap clones (shared `Bytes`, `Arc`s,
//! `&'static str`) and the sinks' writer threads turn it into text.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, HOST, REFERER, USER_AGENT};
use http::{Method, Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{Body, BoxError};
use crate::error::GatewayError;
use crate::identity::Identity;
use crate::proxy::{protocol_name, ConnInfo};
use crate::router::Route;
use crate::runtime::Snapshot;
use crate::upstream::forwarder::ForwardOutcome;

/// Status logged when the client went away before a response existed (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// Everything logged about one request.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When the request head arrived.
    pub time: SystemTime,
    pub request_id: HeaderValue,
    /// The client: the TCP peer, or the address behind trusted proxies.
    pub client_ip: IpAddr,
    /// The TCP peer's port, when `client_ip` is the TCP peer.
    pub client_port: Option<u16>,
    /// The local address the connection arrived on (the vhost of last resort).
    pub local: SocketAddr,
    pub listener: Arc<str>,
    /// `h1`, `h1.0`, `h2`, `h3`.
    pub protocol: &'static str,
    pub tls_version: Option<&'static str>,
    pub tls_group: Option<&'static str>,
    /// The verified client certificate.
    pub identity: Option<Arc<Identity>>,
    pub method: Method,
    /// The request target as the client sent it (before normalization).
    pub uri: Uri,
    pub host_header: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub referer: Option<HeaderValue>,
    /// Status sent to the client.
    pub status: u16,
    /// The `grpc-status` the response ended with: from its trailers, or from its head when
    /// the upstream answered trailers-only. gRPC failures travel with HTTP status 200.
    pub grpc_status: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Request head to last response byte (or abort).
    pub duration: Duration,
    pub route: Option<Arc<str>>,
    /// What the route says of the host (the combined log's vhost).
    pub route_host: RouteHost,
    pub upstream: Option<Arc<str>>,
    /// Endpoint, upstream time and attempts, filled by the forwarder.
    pub forward: ForwardOutcome,
    /// Filled by the policy stage.
    pub policy: Option<PolicyRecord>,
    /// Filled by the rate-limit stage.
    pub rate_limit: Option<RateLimitRecord>,
    /// Filled by the decision (ban) stage when a ban refused the request.
    pub ban: Option<BanRecord>,
    /// Wraith's error code when it answered with an error.
    pub error: Option<&'static str>,
    /// The client went away before the response was complete.
    pub aborted: bool,
    /// Served as TLS early data (0-RTT), before the client's handshake completed.
    pub early_data: bool,
    /// The request line could not be read (a request the HTTP/1.1 server refused): the
    /// record has no target, and logs `-` for method and path.
    pub unreadable: bool,
    /// Request body bytes, counted while the upstream reads the body.
    pub(crate) bytes_in_counter: Option<Arc<AtomicU64>>,
}

impl Default for AccessRecord {
    fn default() -> Self {
        AccessRecord {
            time: SystemTime::UNIX_EPOCH,
            request_id: HeaderValue::from_static("-"),
            client_ip: IpAddr::from([0, 0, 0, 0]),
            client_port: None,
            local: SocketAddr::from(([0, 0, 0, 0], 0)),
            listener: Arc::from(""),
            protocol: "h1",
            tls_version: None,
            tls_group: None,
            identity: None,
            method: Method::GET,
            uri: Uri::from_static("/"),
            host_header: None,
            user_agent: None,
            referer: None,
            status: 0,
            grpc_status: None,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            route: None,
            route_host: RouteHost::Any,
            upstream: None,
            forward: ForwardOutcome::default(),
            policy: None,
            rate_limit: None,
            ban: None,
            error: None,
            aborted: false,
            early_data: false,
            unreadable: false,
            bytes_in_counter: None,
        }
    }
}

/// A policy decision as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    pub effect: Effect,
    /// Ids of the policies that determined the decision.
    pub policies: Vec<Arc<str>>,
    /// The reason given for a denial.
    pub reason: Option<Arc<str>>,
    /// Shadow mode: `effect` is what the policy would have done; the request was let through.
    pub shadow: bool,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    /// `allow` / `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}

/// What the matched route says of the request's host. A host no route names is the client's
/// word only: logged as the combined log's vhost, a scanner sending a new Host with every
/// request would spread itself over as many CrowdSec buckets (`http-probing` groups by
/// address and vhost) and fill none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RouteHost {
    /// No route, or one for any host.
    #[default]
    Any,
    /// A route for exactly this host.
    Exact,
    /// A wildcard route (`*.example.com`): the domain it names is the last `n` bytes of the
    /// host.
    Domain(u16),
}

/// A rate-limit check as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitRecord {
    /// The request was refused (429).
    pub limited: bool,
    /// Served, but a shadow-mode limit would have refused it.
    pub shadow: bool,
    /// Name of the limit that refused it (or would have); for a request every limit let
    /// through, the route's limits, comma-separated.
    pub limiter: Arc<str>,
}

impl RateLimitRecord {
    /// As logged: `passed`, `limited` or `shadow_limited`.
    pub fn outcome(&self) -> &'static str {
        if self.limited {
            "limited"
        } else if self.shadow {
            "shadow_limited"
        } else {
            "passed"
        }
    }
}

/// The ban decision that refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanRecord {
    /// `crowdsec`, `cscli`, `wazuh`, `local`, ...
    pub origin: Arc<str>,
    /// Scenario or reason of the decision.
    pub scenario: Option<Arc<str>>,
}

impl AccessRecord {
    /// Opens a record for a request that just arrived.
    pub fn start(
        req: &Request<Body>,
        conn: &ConnInfo,
        client_ip: IpAddr,
        request_id: &HeaderValue,
    ) -> AccessRecord {
        // One pass over the (few) headers rather than a lookup for each of three names.
        let (mut host_header, mut user_agent, mut referer) = (None, None, None);
        for (name, value) in req.headers() {
            let slot = if name == HOST {
                &mut host_header
            } else if name == USER_AGENT {
                &mut user_agent
            } else if name == REFERER {
                &mut referer
            } else {
                continue;
            };
            if slot.is_none() {
                *slot = Some(value.clone());
            }
        }
        AccessRecord {
            time: SystemTime::now(),
            request_id: request_id.clone(),
            client_ip,
            // (The client address is canonical: an IPv4 client of a dual-stack listener is
            // its IPv4 address, the peer its `::ffff:` form.)
            client_port: (client_ip == crate::proxy::headers::canonical(conn.peer.ip()))
                .then_some(conn.peer.port()),
            local: conn.local,
            listener: conn.listener.clone(),
            protocol: protocol_name(req.version()),
            tls_version: conn.tls.as_ref().map(|t| t.version),
            tls_group: conn.tls.as_ref().and_then(|t| t.group),
            identity: conn.identity.clone(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            host_header,
            user_agent,
            referer,
            ..AccessRecord::default()
        }
    }

    /// Copies the values that still point into the connection's read buffer (the request
    /// target and the header values hyper parsed in place) into allocations of their own.
    ///
    /// Why: a record queued for the log writers lives on for up to `FLUSH_INTERVAL`. While
    /// any slice of hyper's read buffer is alive, the buffer is shared, and hyper cannot
    /// reuse it for the next request on the connection: it allocates a fresh one (8 KiB or
    /// more) per request instead, and the old one is freed later on the writer's thread.
    /// A few short copies cost far less.
    pub fn detach(&mut self) {
        fn own(v: &mut HeaderValue) {
            let mut copy = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(v.as_bytes()))
                .unwrap_or_else(|_| v.clone());
            copy.set_sensitive(v.is_sensitive());
            *v = copy;
        }
        for v in [
            Some(&mut self.request_id),
            self.host_header.as_mut(),
            self.user_agent.as_mut(),
            self.referer.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            own(v);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = self.uri.scheme_str().and_then(|s| s.parse().ok());
        parts.authority = self.uri.authority().and_then(|a| {
            http::uri::Authority::from_maybe_shared(Bytes::copy_from_slice(a.as_str().as_bytes()))
                .ok()
        });
        parts.path_and_query = self.uri.path_and_query().and_then(|pq| {
            http::uri::PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(
                pq.as_str().as_bytes(),
            ))
            .ok()
        });
        if let Ok(uri) = Uri::from_parts(parts) {
            self.uri = uri;
        }
    }

    /// Notes the route that matched.
    pub fn set_route(&mut self, route: &Route) {
        self.route = Some(route.config.name.clone());
        self.route_host = match &route.config.host {
            crate::config::HostMatch::Any => RouteHost::Any,
            crate::config::HostMatch::Exact(_) => RouteHost::Exact,
            crate::config::HostMatch::Suffix(s) => {
                RouteHost::Domain(u16::try_from(s.len() - 1).unwrap_or(u16::MAX))
            }
        };
        if let crate::config::RouteAction::Upstream(u) = &route.config.action {
            self.upstream = Some(u.clone());
        }
    }

    /// The client certificate's name: SPIFFE ID, else CN, else fingerprint.
    pub fn identity_name(&self) -> Option<&str> {
        self.identity.as_deref().map(Identity::name)
    }

    /// The host the client asked for (`Host`, else the URI's authority), without checking it.
    pub fn host(&self) -> Option<&str> {
        if self.unreadable {
            return None;
        }
        self.host_header
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| self.uri.authority().map(|a| a.as_str()))
    }

    /// The host routing judged: the request target's authority (absolute form, HTTP/2 and
    /// HTTP/3 `:authority`) before the Host header, as `headers::Host::of` takes it.
    pub fn routed_host(&self) -> Option<&str> {
        if self.unreadable {
            return None;
        }
        self.uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| self.host_header.as_ref().and_then(|h| h.to_str().ok()))
    }

    /// The request's path as logged (`-` when the request line was unreadable).
    pub fn path(&self) -> &str {
        if self.unreadable {
            "-"
        } else {
            self.uri.path()
        }
    }

    /// Whether the request was refused by policy, rate limit or ban (or with 401/403).
    pub fn denied(&self) -> bool {
        matches!(&self.policy, Some(p) if p.effect == Effect::Deny && !p.shadow)
            || matches!(&self.rate_limit, Some(r) if r.limited)
            || self.ban.is_some()
            || matches!(self.status, 401 | 403)
    }

    /// The security event this request is, if any (see docs/logging.md).
    pub fn security_event(&self) -> Option<&'static str> {
        if self.ban.is_some() {
            return Some("banned");
        }
        if matches!(&self.rate_limit, Some(r) if r.limited) {
            return Some("rate_limited");
        }
        match &self.policy {
            Some(p) if p.effect == Effect::Deny && p.shadow => Some("policy_shadow_denied"),
            Some(p) if p.effect == Effect::Deny => Some("policy_denied"),
            _ if self.error == Some("appsec_blocked") => Some("appsec_blocked"),
            _ if self.error == Some("malformed_request") => Some("malformed_request"),
            _ => None,
        }
    }

    /// Notes why Wraith answered with an error of its own: the error code, and what the
    /// refusing stage decided (the ban's origin, the rate limit's name).
    pub fn refused(&mut self, e: &GatewayError) {
        self.error = Some(e.code());
        match e {
            GatewayError::Banned { origin, reason, .. } => {
                self.ban = Some(BanRecord {
                    origin: origin.clone(),
                    scenario: (!reason.is_empty()).then(|| reason.clone()),
                });
            }
            GatewayError::RateLimited(r) => {
                self.rate_limit = Some(RateLimitRecord {
                    limited: true,
                    shadow: false,
                    limiter: r.name.clone(),
                });
            }
            _ => {}
        }
    }

    /// Wraps the request body so the bytes the upstream reads are counted.
    pub fn count_request_body(&mut self, req: &mut Request<Body>) {
        if req.body().is_end_stream() {
            return;
        }
        let counter = Arc::new(AtomicU64::new(0));
        let inner = std::mem::take(req.body_mut());
        *req.body_mut() = Body::boxed(CountingBody {
            inner,
            count: counter.clone(),
        });
        self.bytes_in_counter = Some(counter);
    }
}

/// A request body that counts the bytes read from it.
struct CountingBody {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &res {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A record not emitted yet, and what emitting it needs.
pub struct Pending {
    /// Boxed: the record is large, and a `Pending` moves several times (into the response
    /// body, into its box) before the record is emitted.
    record: Option<Box<AccessRecord>>,
    started: Instant,
    snapshot: Arc<Snapshot>,
    /// Ends the response body if the client is banned while it streams.
    bans: Option<crate::decisions::BanWatch>,
}

impl Pending {
    /// Opens the record of a request that runs on `snapshot`.
    pub fn new(record: Box<AccessRecord>, started: Instant, snapshot: Arc<Snapshot>) -> Pending {
        Pending {
            record: Some(record),
            started,
            snapshot,
            bans: None,
        }
    }

    /// Has the response body end, cut, if a ban on the client is published while it streams.
    pub fn watch_bans(&mut self, bans: crate::decisions::BanWatch) {
        self.bans = Some(bans);
    }

    /// The record, for the stages to fill.
    pub fn record(&mut self) -> &mut AccessRecord {
        // Only `emit` takes it, and nothing touches a `Pending` after that.
        self.record.get_or_insert_with(Box::default)
    }

    /// Attaches the record to the response: emitted now if no body will be sent, else when
    /// the body ends or is dropped.
    pub fn finish(mut self, resp: Response<Body>, head_only: bool) -> Response<Body> {
        let status = resp.status();
        self.record().status = status.as_u16();
        // (gRPC runs over HTTP/2 upstreams only: no header lookup for the others.)
        if resp.version() == http::Version::HTTP_2 {
            if let Some(code) = grpc_status(resp.headers()) {
                self.record().grpc_status = Some(code);
            }
        }
        // HEAD, 1xx, 204 and 304 responses never carry a body. A built-in one (a `respond`
        // route, an error's JSON) is dropped here: HTTP/1.1's codec would leave it unsent,
        // but hyper's HTTP/2 server sends DATA for any body it is given.
        let must_not = head_only
            || status.is_informational()
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED;
        if must_not || resp.body().is_end_stream() {
            self.emit(0, false);
            if must_not && !resp.body().is_end_stream() {
                let length = resp.body().size_hint().exact();
                let (mut parts, _) = resp.into_parts();
                // A HEAD response still tells the length the GET's body would have.
                let bodied = !(status.is_informational()
                    || status == http::StatusCode::NO_CONTENT
                    || status == http::StatusCode::NOT_MODIFIED);
                // (Not when a coding was applied: the hint is the identity body's length.)
                let coded = parts.headers.contains_key(http::header::CONTENT_ENCODING);
                if let (true, Some(n)) = (head_only && bodied && !coded, length) {
                    parts
                        .headers
                        .entry(http::header::CONTENT_LENGTH)
                        .or_insert_with(|| http::HeaderValue::from(n));
                }
                return Response::from_parts(parts, Body::Empty);
            }
            return resp;
        }
        let bans = self.bans.take();
        resp.map(|inner| {
            Body::Logged(Box::new(LoggedBody {
                inner,
                bytes: 0,
                bans: bans.map(crate::decisions::BodyBans::new),
                pending: Some(self),
            }))
        })
    }

    /// Completes and hands the record to the telemetry (metrics, window, sinks).
    fn emit(&mut self, bytes_out: u64, aborted: bool) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        record.bytes_out = bytes_out;
        record.aborted = aborted;
        record.duration = self.started.elapsed();
        if let Some(c) = &record.bytes_in_counter {
            record.bytes_in = c.load(Ordering::Relaxed);
        }
        self.snapshot.telemetry.emit(record);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Only reached with a record when the request future was dropped mid-pipeline.
        if let Some(r) = self.record.as_mut() {
            if r.status == 0 {
                r.status = CLIENT_CLOSED;
            }
            self.emit(0, true);
        }
    }
}

/// The `grpc-status` field of a response head or trailers: a decimal code (0 to 16 are
/// defined; any other number an upstream sends is logged as it is). Anything else is not one.
fn grpc_status(fields: &http::HeaderMap) -> Option<u16> {
    let v = fields.get("grpc-status")?.as_bytes();
    if v.is_empty() || v.len() > 5 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A response body that emits the access record when it ends or is dropped.
pub struct LoggedBody {
    inner: Body,
    bytes: u64,
    /// A ban on the client published while the body streams cuts it, a piece passing or
    /// not (an idle event stream).
    bans: Option<crate::decisions::BodyBans>,
    pending: Option<Pending>,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(ban) = this.bans.as_mut().and_then(|b| b.poll(&res, cx)) {
            return this.cut(ban);
        }
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                } else if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    if let Some(p) = this.pending.as_mut() {
                        p.record().grpc_status = Some(code);
                    }
                }
                if this.inner.is_end_stream() {
                    this.done(false);
                }
            }
            Poll::Ready(None) => this.done(false),
            Poll::Ready(Some(Err(e))) => {
                // The upstream broke off mid-body: the client gets a truncated response.
                // (Or both sides went quiet while the client still owed its body, or the
                // request body going out beside the response failed on the client's side.)
                if let Some(p) = this.pending.as_mut() {
                    p.record().error = Some(if crate::body::Stalled::by_client(e) {
                        "request_timeout"
                    } else if let Some(u) = e.downcast_ref::<crate::upstream::h1::UploadFailed>() {
                        u.code()
                    } else {
                        "upstream_body_error"
                    });
                }
                this.done(true);
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl LoggedBody {
    /// Ends the body for a ban on the client. Zero trust for what is under way too: the
    /// client gets no more of it.
    fn cut(
        &mut self,
        ban: crate::decisions::Verdict,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::info!(origin = %ban.origin, value = %ban.value, "client banned while its response streamed; response cut");
        if let Some(p) = self.pending.as_mut() {
            let record = p.record();
            record.error = Some("banned");
            record.ban = Some(BanRecord {
                origin: ban.origin.clone(),
                scenario: (!ban.reason.is_empty()).then(|| ban.reason.clone()),
            });
        }
        self.bans = None;
        self.done(true);
        // Nothing more of it, if asked again.
        self.inner = Body::Empty;
        Poll::Ready(Some(Err("the client was banned".into())))
    }

    fn done(&mut self, aborted: bool) {
        if let Some(mut p) = self.pending.take() {
            p.emit(self.bytes, aborted);
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the connection broke).
        let aborted = !self.inner.is_end_stream();
        self.done(aborted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadOptions};
    use crate::telemetry::{SnapshotTelemetry, Telemetry};
    use http_body_util::BodyExt;

    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn snapshot(dir: &std::path::Path, log: &str) -> Arc<Snapshot> {
        let text = format!(
            "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
             [[route]]\nname = \"all\"\nrespond = {{ status = 200, body = \"hello, world\\n\" }}\n{log}"
        );
        let config = load_str(&dir.join("wraith.toml"), &text, LoadOptions::default()).unwrap();
        let telemetry = Arc::new(Telemetry::default());
        let mut s = Snapshot::build(config, 1, None).unwrap();
        s.telemetry = SnapshotTelemetry::build(&telemetry, &s.config, None).unwrap();
        s.telemetry.activate();
        Arc::new(s)
    }

    #[test]
    fn a_detached_record_keeps_no_slice_of_the_read_buffer() {
        // What hyper does: one buffer for the whole head, every value a slice of it.
        let head = Bytes::from_static(b"/a/b?c=d example.org curl/8 https://ref.example/ rid");
        let slice =
            |from: usize, to: usize| HeaderValue::from_maybe_shared(head.slice(from..to)).unwrap();
        let mut r = AccessRecord {
            uri: Uri::from_maybe_shared(head.slice(0..8)).unwrap(),
            host_header: Some(slice(9, 20)),
            user_agent: Some(slice(21, 27)),
            referer: Some(slice(28, 48)),
            request_id: slice(49, 52),
            ..AccessRecord::default()
        };
        let before = r.clone();
        r.detach();
        let range = head.as_ptr_range();
        let inside = |b: &[u8]| range.contains(&b.as_ptr());
        assert!(!inside(r.uri.path_and_query().unwrap().as_str().as_bytes()));
        for v in [
            &r.request_id,
            r.host_header.as_ref().unwrap(),
            r.user_agent.as_ref().unwrap(),
            r.referer.as_ref().unwrap(),
        ] {
            assert!(!inside(v.as_bytes()), "{v:?} still points into the buffer");
        }
        assert_eq!(r.uri, before.uri);
        assert_eq!(r.host_header, before.host_header);
        assert_eq!(r.user_agent, before.user_agent);
        assert_eq!(r.referer, before.referer);
        assert_eq!(r.request_id, before.request_id);

        // Absolute-form and authority-form targets survive too.
        for target in ["https://example.org:8443/x?y=1", "example.org:443", "*"] {
            let mut r = AccessRecord {
                uri: target.parse().unwrap(),
                ..AccessRecord::default()
            };
            r.detach();
            assert_eq!(r.uri.to_string(), target);
        }
    }

    /// Request-thread CPU of the access record per request: open, finish, stream the body,
    /// emit (metrics, window, queues). A measurement, not a check: run it with
    /// `cargo test --release --lib request_path_cost -- --ignored --nocapture`.
    /// A plain-HTTP connection on the listener `http`.
    fn plain_conn(peer: &str, local: &str) -> ConnInfo {
        ConnInfo {
            peer: peer.parse().unwrap(),
            local: local.parse().unwrap(),
            listener: "http".into(),
            tls: None,
            identity: None,
            policy_cache: Default::default(),
            limits: Default::default(),
            close: None,
            unnamed_client: false,
        }
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_has_its_port() {
        let conn = plain_conn("[::ffff:198.51.100.7]:51234", "[::ffff:127.0.0.1]:8085");
        let req = Request::builder().uri("/").body(Body::Empty).unwrap();
        let client = crate::proxy::headers::canonical(conn.peer.ip());
        let rid = HeaderValue::from_static("rid");
        let r = AccessRecord::start(&req, &conn, client, &rid);
        assert_eq!(r.client_ip.to_string(), "198.51.100.7");
        assert_eq!(r.client_port, Some(51234));
    }

    #[test]
    #[ignore = "measurement; meaningful only in a release build"]
    fn request_path_cost() {
        let dir = tempfile::tempdir().unwrap();
        let off = snapshot(dir.path(), "");
        let on = snapshot(
            dir.path(),
            "[log.json]\npath = \"a.json\"\nqueue = 1000000\n[log.combined]\npath = \"a.log\"\nqueue = 1000000\n\
             [log.sqlite]\npath = \"a.db\"\nqueue = 1000000\n",
        );
        let conn = plain_conn("198.51.100.7:51234", "127.0.0.1:8085");
        let rid = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let route = &off
            .router
            .find(None, "/small", &Method::GET)
            .unwrap()
            .config;
        let run = |snap: &Arc<Snapshot>, n: u32| -> f64 {
            let t = thread_cpu();
            for _ in 0..n {
                let req = Request::builder()
                    .uri("/small")
                    .header("host", "127.0.0.1:8085")
                    .header("user-agent", "wrk")
                    .body(Body::Empty)
                    .unwrap();
                let started = Instant::now();
                let mut record = Box::new(AccessRecord::start(&req, &conn, conn.peer.ip(), &rid));
                record.route = Some(route.name.clone());
                let pending = Pending::new(record, started, snap.clone());
                let resp = Response::new(Body::full(Bytes::from_static(b"hello, world\n")));
                let resp = pending.finish(resp, false);
                rt.block_on(async { resp.into_body().collect().await.unwrap() });
            }
            (thread_cpu() - t).as_nanos() as f64 / f64::from(n) / 1000.0
        };
        let n = 200_000;
        run(&off, n / 10);
        run(&on, n / 10);
        let mut offs = Vec::new();
        let mut ons = Vec::new();
        for _ in 0..3 {
            offs.push(run(&off, n));
            ons.push(run(&on, n));
        }
        eprintln!(
            "request-thread CPU per request: sinks off {offs:.3?} µs, three sinks on {ons:.3?} µs"
        );
    }
}
