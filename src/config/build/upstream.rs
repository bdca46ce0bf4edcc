//! The typed `[[upstream]]` section (endpoints, balancing, health, retries, limits, TLS)
//! and route `compression`, and their building from the raw layer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};

use super::{check_name, Builder, Span};
use crate::config::raw::*;
use crate::config::units::parse_size;

/// `[[upstream]]`
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: Arc<str>,
    pub endpoints: Vec<EndpointConfig>,
    pub protocol: UpstreamProtocol,
    /// How an endpoint is chosen for each request.
    pub algorithm: Algorithm,
    /// What `ip_hash` hashes.
    pub hash_key: HashKey,
    /// When every endpoint is unhealthy: try them anyway (true) or answer 503 (false).
    pub fail_open: bool,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    /// HTTP/2 upstreams: requests put on one connection before another is opened.
    pub h2_max_streams: usize,
    /// Requests waiting for a free endpoint (all at `max_connections`); beyond it -> 503.
    pub max_pending: usize,
    /// How long a request waits for a free endpoint before 503.
    pub pending_timeout: Duration,
    /// Further attempts on other endpoints after a failure that is safe to retry.
    pub retries: u32,
    /// No retry starts once this much time has passed since the first attempt.
    pub try_duration: Duration,
    /// Request bodies up to this size (with a known length) are kept so an idempotent
    /// request can be retried after its body was sent; 0 disables.
    pub retry_buffer: usize,
    /// Active health checks; `None`: off.
    pub health_check: Option<HealthCheckConfig>,
    /// Passive health checks (outlier ejection).
    pub outlier: OutlierConfig,
    /// TLS to `https://` endpoints.
    pub tls: Option<UpstreamTls>,
}

impl UpstreamConfig {
    /// Whether any endpoint limits its concurrent requests.
    pub fn has_connection_limits(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.max_connections != usize::MAX)
    }
}

/// One upstream server address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointConfig {
    /// `host:port` as written (a name is resolved when connecting).
    pub authority: http::uri::Authority,
    /// `https://` endpoint: TLS with the upstream's `[upstream.tls]` settings.
    pub tls: bool,
    /// Relative share of requests (`weighted`, `least_connections`, `random`, `ip_hash`).
    pub weight: u32,
    /// Concurrent requests allowed to this endpoint (`usize::MAX`: no limit).
    pub max_connections: usize,
}

/// How Wraith talks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive (over TLS for `https://` endpoints).
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (gRPC backends).
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`); endpoints are `https://`.
    H2,
}

impl UpstreamProtocol {
    /// Whether requests go through the HTTP/2 client.
    pub fn is_h2(self) -> bool {
        matches!(self, UpstreamProtocol::H2c | UpstreamProtocol::H2)
    }

    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
        }
    }
}

/// Load-balancing algorithm of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    /// Smooth weighted round robin (nginx's).
    Weighted,
    /// Fewest requests in flight relative to weight.
    LeastConnections,
    /// Consistent hashing (Maglev) on the client address or `hash_key`.
    IpHash,
    /// Power of two random choices on in-flight load.
    Random,
}

impl Algorithm {
    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::Weighted => "weighted",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::IpHash => "ip_hash",
            Algorithm::Random => "random",
        }
    }
}

/// What `ip_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client address (behind trusted proxies, the address they forwarded).
    ClientIp,
    /// A request header's value (client address when absent).
    Header(HeaderName),
    /// A cookie's value (client address when absent).
    Cookie(String),
    /// The request path (without the query).
    Path,
}

/// `[upstream.health_check]`: active HTTP(S) checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Path (and query) requested with GET.
    pub path: String,
    /// Host header sent; the endpoint's address when `None`.
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Statuses counted as healthy, inclusive.
    pub expect_status: (u16, u16),
    /// Consecutive passes that bring a down endpoint back.
    pub rise: u32,
    /// Consecutive failures that take an endpoint down.
    pub fall: u32,
    /// Each interval is randomly lengthened or shortened by up to this much.
    pub jitter: Duration,
}

/// `[upstream.outlier]`: passive ejection of failing endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive connect failures, timeouts or 5xx responses that eject an endpoint (0: off).
    pub consecutive_failures: u32,
    /// Cool-down of the first ejection; doubled on each repeat.
    pub base_ejection_time: Duration,
    /// Upper bound of the cool-down.
    pub max_ejection_time: Duration,
    /// Never eject more than this share of the endpoints.
    pub max_ejected_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// A PEM file and its contents (compared by content, so a replaced file rebuilds the pool).
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: PathBuf,
    pub pem: Arc<[u8]>,
}

impl std::fmt::Debug for PemFile {
    /// The path and size only: the file may be a private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemFile")
            .field("path", &self.path)
            .field("bytes", &self.pem.len())
            .finish()
    }
}

/// `[upstream.tls]`: how `https://` endpoints are verified and what Wraith presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// CA bundle that upstream certificates must chain to (the system bundle by default).
    pub ca: PemFile,
    /// Client certificate chain and key (mTLS to the upstream).
    pub client_cert: Option<(PemFile, PemFile)>,
    /// Name sent as SNI and verified in the certificate; the endpoint's host by default.
    pub server_name: Option<String>,
}

/// A content coding Wraith can compress with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Zstd,
    Brotli,
    Gzip,
}

impl Encoding {
    /// The token in Accept-Encoding / Content-Encoding.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
        }
    }
}

/// `[route] compression`: which responses are compressed, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionConfig {
    /// Codings in the server's order of preference.
    pub algorithms: Vec<Encoding>,
    /// Responses with a known length below this are sent as they are.
    pub min_size: u64,
    /// Compressible media types (lowercase): exact `type/subtype`, or `type/*`.
    pub types: Vec<String>,
}

/// The media types compressed by default.
pub const DEFAULT_COMPRESSIBLE: &[&str] = &[
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/ld+json",
    "application/manifest+json",
    "application/problem+json",
    "application/graphql-response+json",
    "application/wasm",
    "image/svg+xml",
    "font/ttf",
    "font/otf",
];

pub(super) fn build_upstreams(
    b: &mut Builder<'_>,
    raw: Vec<(usize, RawUpstream)>,
) -> Vec<UpstreamConfig> {
    let mut out = Vec::new();
    let mut names = HashMap::new();
    for (i, u) in raw {
        let key = format!("upstream[{i}]");
        check_name(b, &u.name, &format!("{key}.name"), &mut names);
        let default_max = b
            .int(
                &u.max_connections,
                &format!("{key}.max_connections"),
                0,
                10_000_000,
            )
            .map_or(usize::MAX, |n| if n == 0 { usize::MAX } else { n as usize });
        let mut endpoints: Vec<EndpointConfig> = Vec::new();
        if u.endpoints.get_ref().is_empty() {
            b.err(
                Some(u.endpoints.span()),
                format!("{key}.endpoints"),
                "an upstream needs at least one endpoint",
            );
        }
        if u.endpoints.get_ref().len() > MAX_ENDPOINTS {
            b.err(
                Some(u.endpoints.span()),
                format!("{key}.endpoints"),
                format!("at most {MAX_ENDPOINTS} endpoints per upstream"),
            );
        }
        for (j, e) in u.endpoints.get_ref().iter().enumerate() {
            let ekey = format!("{key}.endpoints[{j}]");
            match build_endpoint(e.get_ref(), default_max) {
                Ok(ep) => {
                    if endpoints.iter().any(|x| x.authority == ep.authority) {
                        b.err(Some(e.span()), ekey, "duplicate endpoint");
                    }
                    endpoints.push(ep);
                }
                Err(m) => b.err(Some(e.span()), ekey, m),
            }
        }
        let protocol = match u
            .protocol
            .as_ref()
            .map(|p| (p.get_ref().as_str(), p.span()))
        {
            None | Some(("http1", _)) => UpstreamProtocol::Http1,
            Some(("h2c", _)) => UpstreamProtocol::H2c,
            Some(("h2", _)) => UpstreamProtocol::H2,
            Some((other, span)) => {
                b.err(
                    Some(span),
                    format!("{key}.protocol"),
                    format!(
                        "unknown upstream protocol {other:?} (expected \"http1\", \"h2c\" or \"h2\")"
                    ),
                );
                UpstreamProtocol::Http1
            }
        };
        let any_tls = endpoints.iter().any(|e| e.tls);
        let all_tls = endpoints.iter().all(|e| e.tls);
        let pspan = u.protocol.as_ref().map(|p| p.span());
        match protocol {
            UpstreamProtocol::H2c if any_tls => b.err(
                pspan,
                format!("{key}.protocol"),
                "h2c is cleartext HTTP/2; for https:// endpoints use protocol = \"h2\"",
            ),
            UpstreamProtocol::H2 if !all_tls => b.err(
                pspan,
                format!("{key}.protocol"),
                "h2 is HTTP/2 over TLS: every endpoint must be https:// (use \"h2c\" for cleartext)",
            ),
            _ => {}
        }
        let algorithm = match u.algorithm.as_ref() {
            None => Algorithm::RoundRobin,
            Some(a) => match a.get_ref().as_str() {
                "round_robin" => Algorithm::RoundRobin,
                "weighted" => Algorithm::Weighted,
                "least_connections" => Algorithm::LeastConnections,
                "ip_hash" => Algorithm::IpHash,
                "random" => Algorithm::Random,
                other => {
                    b.err(
                        Some(a.span()),
                        format!("{key}.algorithm"),
                        format!("unknown algorithm {other:?} (expected round_robin, weighted, least_connections, ip_hash or random)"),
                    );
                    Algorithm::RoundRobin
                }
            },
        };
        let hash_key = match u.hash_key.as_ref() {
            None => HashKey::ClientIp,
            Some(k) => {
                if algorithm != Algorithm::IpHash {
                    b.warnings.push(format!(
                        "{key}.hash_key only applies to algorithm = \"ip_hash\"; it is ignored"
                    ));
                }
                match parse_hash_key(k.get_ref()) {
                    Ok(h) => h,
                    Err(m) => {
                        b.err(Some(k.span()), format!("{key}.hash_key"), m);
                        HashKey::ClientIp
                    }
                }
            }
        };
        if algorithm == Algorithm::RoundRobin && endpoints.iter().any(|e| e.weight != 1) {
            b.warnings.push(format!(
                "{key}: endpoint weights are ignored by round_robin; use algorithm = \"weighted\""
            ));
        }
        let connect_timeout = b.duration(
            &u.connect_timeout,
            &format!("{key}.connect_timeout"),
            Duration::from_secs(5),
        );
        let health_check = u
            .health_check
            .map(|h| build_health_check(b, &format!("{key}.health_check"), h.into_inner()));
        let outlier = match u.outlier {
            None => OutlierConfig::default(),
            Some(o) => build_outlier(b, &format!("{key}.outlier"), o.into_inner()),
        };
        let tls = match u.tls {
            Some(t) => {
                let span = t.span();
                if !any_tls {
                    b.warnings.push(format!(
                        "{key}.tls is set but no endpoint is https://; it is not used"
                    ));
                }
                build_client_tls(b, &format!("{key}.tls"), span, t.into_inner())
            }
            None if any_tls => build_client_tls(
                b,
                &format!("{key}.tls"),
                u.endpoints.span(),
                RawUpstreamTls {
                    ca: None,
                    cert: None,
                    key: None,
                    server_name: None,
                },
            ),
            None => None,
        };
        out.push(UpstreamConfig {
            name: Arc::from(u.name.into_inner()),
            endpoints,
            protocol,
            algorithm,
            hash_key,
            fail_open: u.fail_open.is_some_and(|f| *f.get_ref()),
            connect_timeout,
            response_timeout: b.duration(
                &u.response_timeout,
                &format!("{key}.response_timeout"),
                Duration::from_secs(60),
            ),
            idle_timeout: b.duration(
                &u.idle_timeout,
                &format!("{key}.idle_timeout"),
                Duration::from_secs(90),
            ),
            max_idle_per_endpoint: b
                .int(
                    &u.max_idle_per_endpoint,
                    &format!("{key}.max_idle_per_endpoint"),
                    0,
                    100_000,
                )
                .map_or(256, |n| n as usize),
            h2_max_streams: {
                if u.h2_max_streams.is_some() && !protocol.is_h2() {
                    b.warnings.push(format!(
                        "{key}.h2_max_streams only applies to protocol = \"h2c\" or \"h2\"; it is ignored"
                    ));
                }
                b.int(
                    &u.h2_max_streams,
                    &format!("{key}.h2_max_streams"),
                    1,
                    i64::from(u32::MAX >> 1),
                )
                .map_or(100, |n| n as usize)
            },
            max_pending: b
                .int(&u.max_pending, &format!("{key}.max_pending"), 0, 10_000_000)
                .map_or(1024, |n| n as usize),
            pending_timeout: b.duration(
                &u.pending_timeout,
                &format!("{key}.pending_timeout"),
                Duration::from_secs(5),
            ),
            retries: b
                .int(&u.retries, &format!("{key}.retries"), 0, 16)
                .map_or(2, |n| n as u32),
            try_duration: b.duration(
                &u.try_duration,
                &format!("{key}.try_duration"),
                Duration::from_secs(10),
            ),
            retry_buffer: b.size(&u.retry_buffer, &format!("{key}.retry_buffer"), 64 * 1024)
                as usize,
            health_check,
            outlier,
            tls,
        });
    }
    out
}

/// Most endpoints in one upstream (balancer tables index them with `u16`).
const MAX_ENDPOINTS: usize = 1000;

fn build_endpoint(raw: &RawEndpoint, default_max: usize) -> Result<EndpointConfig, String> {
    let (address, weight, max) = match raw {
        RawEndpoint::Address(a) => (a.as_str(), None, None),
        RawEndpoint::Table(t) => (t.address.as_str(), t.weight, t.max_connections),
    };
    let mut ep = parse_endpoint(address)?;
    if let Some(w) = weight {
        if !(1..=1000).contains(&w) {
            return Err(format!("weight {w} is out of range (expected 1..=1000)"));
        }
        ep.weight = w as u32;
    }
    ep.max_connections = match max {
        None => default_max,
        Some(0) => usize::MAX,
        Some(n) if (1..=10_000_000).contains(&n) => n as usize,
        Some(n) => {
            return Err(format!(
                "max_connections {n} is out of range (expected 0..=10000000)"
            ))
        }
    };
    Ok(ep)
}

/// `127.0.0.1:9000`, `[::1]:9000`, `backend.internal:8080`, `http://host:port` or
/// `https://host:port` (443 when no port is given).
fn parse_endpoint(s: &str) -> Result<EndpointConfig, String> {
    let (rest, tls) = if let Some(rest) = s.strip_prefix("http://") {
        (rest, false)
    } else if let Some(rest) = s.strip_prefix("https://") {
        (rest, true)
    } else if s.contains("://") {
        return Err(format!(
            "endpoint {s:?}: unsupported scheme (expected host:port, http:// or https://)"
        ));
    } else {
        (s, false)
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') {
        return Err(format!("endpoint {s:?}: a path is not allowed here"));
    }
    let mut authority: http::uri::Authority = rest
        .parse()
        .map_err(|_| format!("invalid endpoint {s:?} (expected host:port)"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "endpoint {s:?}: credentials in endpoints are not allowed"
        ));
    }
    if authority.port_u16().is_none() {
        if !tls {
            return Err(format!("endpoint {s:?} needs a port (e.g. \"{rest}:80\")"));
        }
        authority = format!("{rest}:443")
            .parse()
            .map_err(|_| format!("invalid endpoint {s:?} (expected host:port)"))?;
    }
    Ok(EndpointConfig {
        authority,
        tls,
        weight: 1,
        max_connections: usize::MAX,
    })
}

/// `client_ip`, `header:NAME`, `cookie:NAME` or `path`.
fn parse_hash_key(s: &str) -> Result<HashKey, String> {
    let bad = || {
        format!(
            "invalid hash_key {s:?} (expected \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"path\")"
        )
    };
    match s.split_once(':') {
        None if s == "client_ip" => Ok(HashKey::ClientIp),
        None if s == "path" => Ok(HashKey::Path),
        Some(("header", name)) => HeaderName::from_bytes(name.trim().as_bytes())
            .map(HashKey::Header)
            .map_err(|_| bad()),
        Some(("cookie", name)) if !name.trim().is_empty() => {
            Ok(HashKey::Cookie(name.trim().to_string()))
        }
        _ => Err(bad()),
    }
}

fn build_health_check(b: &mut Builder<'_>, key: &str, raw: RawHealthCheck) -> HealthCheckConfig {
    let path = match &raw.path {
        None => "/".to_string(),
        Some(p) => {
            // Sent to the endpoint as written (no routing normalizes it).
            if !p.get_ref().starts_with('/') {
                b.err(
                    Some(p.span()),
                    format!("{key}.path"),
                    format!("path {:?} must start with '/'", p.get_ref()),
                );
            }
            if http::uri::PathAndQuery::try_from(p.get_ref().as_str()).is_err() {
                b.err(
                    Some(p.span()),
                    format!("{key}.path"),
                    "invalid request path",
                );
            }
            p.get_ref().clone()
        }
    };
    let host = raw.host.as_ref().map(|h| {
        if HeaderValue::from_str(h.get_ref()).is_err() || h.get_ref().is_empty() {
            b.err(Some(h.span()), format!("{key}.host"), "invalid Host value");
        }
        h.get_ref().clone()
    });
    let interval = b.duration(
        &raw.interval,
        &format!("{key}.interval"),
        Duration::from_secs(5),
    );
    if interval < Duration::from_millis(100) {
        b.err(
            raw.interval.as_ref().map(|i| i.span()),
            format!("{key}.interval"),
            "interval must be at least 100ms",
        );
    }
    let timeout = b.duration(
        &raw.timeout,
        &format!("{key}.timeout"),
        Duration::from_secs(2),
    );
    let expect_status = match &raw.expect_status {
        None => (200, 399),
        Some(e) => match parse_status_range(e.get_ref()) {
            Ok(r) => r,
            Err(m) => {
                b.err(Some(e.span()), format!("{key}.expect_status"), m);
                (200, 399)
            }
        },
    };
    let rise = b
        .int(&raw.rise, &format!("{key}.rise"), 1, 100)
        .unwrap_or(2) as u32;
    let fall = b
        .int(&raw.fall, &format!("{key}.fall"), 1, 100)
        .unwrap_or(3) as u32;
    let jitter = b.duration(&raw.jitter, &format!("{key}.jitter"), interval / 10);
    if jitter >= interval {
        b.err(
            raw.jitter.as_ref().map(|j| j.span()),
            format!("{key}.jitter"),
            "jitter must be shorter than the interval",
        );
    }
    HealthCheckConfig {
        path,
        host,
        interval,
        timeout,
        expect_status,
        rise,
        fall,
        jitter,
    }
}

/// `"200"`, `"200-399"`.
fn parse_status_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("invalid status range {s:?} (expected e.g. \"200\" or \"200-399\")");
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    };
    let lo: u16 = lo.parse().map_err(|_| bad())?;
    let hi: u16 = hi.parse().map_err(|_| bad())?;
    if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

fn build_outlier(b: &mut Builder<'_>, key: &str, raw: RawOutlier) -> OutlierConfig {
    let d = OutlierConfig::default();
    let base = b.duration(
        &raw.base_ejection_time,
        &format!("{key}.base_ejection_time"),
        d.base_ejection_time,
    );
    let max = b.duration(
        &raw.max_ejection_time,
        &format!("{key}.max_ejection_time"),
        d.max_ejection_time.max(base),
    );
    if max < base {
        b.err(
            raw.max_ejection_time.as_ref().map(|m| m.span()),
            format!("{key}.max_ejection_time"),
            "max_ejection_time must not be shorter than base_ejection_time",
        );
    }
    OutlierConfig {
        consecutive_failures: b
            .int(
                &raw.consecutive_failures,
                &format!("{key}.consecutive_failures"),
                0,
                1000,
            )
            .map_or(d.consecutive_failures, |n| n as u32),
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejected_percent: b
            .int(
                &raw.max_ejected_percent,
                &format!("{key}.max_ejected_percent"),
                0,
                100,
            )
            .map_or(d.max_ejected_percent, |n| n as u8),
    }
}

/// Where Debian, Alpine, Fedora and friends keep the system CA bundle.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The TLS client settings at `key` (an upstream's `tls`, `[rate_limit.redis]`): the CA
/// bundle (the system's by default), an optional client certificate and key, and a server
/// name. Built once here, so that a file that cannot be read or used is a config error with
/// its key path, not a failure at the first connection.
pub(in crate::config) fn build_client_tls(
    b: &mut Builder<'_>,
    key: &str,
    span: Span,
    raw: RawUpstreamTls,
) -> Option<UpstreamTls> {
    let read = |b: &mut Builder<'_>, s: &Str, what: &str| -> Option<PemFile> {
        let path = b.path(s.get_ref());
        match crate::files::read(&path, crate::files::SMALL) {
            Ok(pem) => Some(PemFile {
                path,
                pem: Arc::from(pem),
            }),
            Err(e) => {
                b.err(
                    Some(s.span()),
                    format!("{key}.{what}"),
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    };
    // Every file is read before giving up, so that each one missing is reported at once.
    let ca = match &raw.ca {
        Some(c) => read(b, c, "ca"),
        None => {
            let found = SYSTEM_CA_BUNDLES.iter().find_map(|p| {
                crate::files::read(std::path::Path::new(p), crate::files::SMALL)
                    .ok()
                    .map(|pem| (p, pem))
            });
            match found {
                Some((p, pem)) => Some(PemFile {
                    path: PathBuf::from(p),
                    pem: Arc::from(pem),
                }),
                None => {
                    b.err(
                        Some(span.clone()),
                        format!("{key}.ca"),
                        format!(
                            "no system CA bundle was found ({}): set {key}.ca",
                            SYSTEM_CA_BUNDLES.join(", ")
                        ),
                    );
                    None
                }
            }
        }
    };
    let client_cert = match (&raw.cert, &raw.key) {
        (Some(c), Some(k)) => {
            let (cert, key) = (read(b, c, "cert"), read(b, k, "key"));
            Some(Some((cert?, key?)))
        }
        (None, None) => Some(None),
        (Some(c), None) | (None, Some(c)) => {
            b.err(
                Some(c.span()),
                key,
                "a client certificate needs both cert and key",
            );
            None
        }
    };
    let (ca, client_cert) = (ca?, client_cert?);
    let server_name = raw.server_name.as_ref().map(|n| {
        if rustls_pki_types::ServerName::try_from(n.get_ref().as_str()).is_err() {
            b.err(
                Some(n.span()),
                format!("{key}.server_name"),
                format!("invalid server name {:?}", n.get_ref()),
            );
        }
        n.get_ref().clone()
    });
    let tls = UpstreamTls {
        ca,
        client_cert,
        server_name,
    };
    // Build it once now, so a bad CA bundle or key is a config error, not a runtime one.
    if let Err(m) = crate::upstream::tls::client_config(&tls, &[]) {
        b.err(Some(span), key.to_string(), m);
        return None;
    }
    Some(tls)
}

pub(super) fn build_compression(
    b: &mut Builder<'_>,
    key: &str,
    span: Span,
    raw: RawCompression,
) -> Option<CompressionConfig> {
    let defaults = || CompressionConfig {
        algorithms: vec![Encoding::Zstd, Encoding::Brotli, Encoding::Gzip],
        min_size: 1024,
        types: DEFAULT_COMPRESSIBLE.iter().map(|t| t.to_string()).collect(),
    };
    let t = match raw {
        RawCompression::Enabled(false) => return None,
        RawCompression::Enabled(true) => return Some(defaults()),
        RawCompression::Table(t) => t,
    };
    let mut c = defaults();
    if let Some(list) = t.algorithms {
        c.algorithms.clear();
        for a in list {
            let e = match a.as_str() {
                "zstd" => Encoding::Zstd,
                "br" => Encoding::Brotli,
                "gzip" => Encoding::Gzip,
                other => {
                    b.err(
                        Some(span.clone()),
                        format!("{key}.algorithms"),
                        format!(
                            "unknown algorithm {other:?} (expected \"zstd\", \"br\" or \"gzip\")"
                        ),
                    );
                    continue;
                }
            };
            if !c.algorithms.contains(&e) {
                c.algorithms.push(e);
            }
        }
        if c.algorithms.is_empty() {
            b.err(
                Some(span.clone()),
                format!("{key}.algorithms"),
                "at least one algorithm is needed (or compression = false)",
            );
        }
    }
    if let Some(m) = t.min_size {
        match parse_size(&m) {
            Ok(n) => c.min_size = n,
            Err(e) => b.err(Some(span.clone()), format!("{key}.min_size"), e),
        }
    }
    if let Some(types) = t.types {
        c.types.clear();
        for ty in types {
            let lower = ty.trim().to_ascii_lowercase();
            match lower.split_once('/') {
                Some((a, b2)) if !a.is_empty() && !b2.is_empty() && !lower.contains(';') => {
                    c.types.push(lower)
                }
                _ => b.err(
                    Some(span.clone()),
                    format!("{key}.types"),
                    format!("invalid media type {ty:?} (expected e.g. \"text/*\" or \"application/json\")"),
                ),
            }
        }
    }
    Some(c)
}

#[cfg(test)]
#[path = "upstream_tests.rs"]
mod tests;
