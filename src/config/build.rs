//! The typed layer: `raw` values checked and converted once, at load. Every problem is
//! collected (never just the first) with its position and key path.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use ipnet::IpNet;
use regex::Regex;
use rustls::sign::CertifiedKey;
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::raw::*;
use super::security::*;
use super::units::{parse_duration, parse_size};
use super::{ConfigError, ConfigErrors, LoadOptions, Source};
use crate::listener::tls;

mod telemetry;
pub use telemetry::*;
mod upstream;
pub use upstream::*;
use upstream::{build_compression, build_upstreams};

/// The whole, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    pub server: ServerConfig,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, in file order: the first that matches a request wins.
    pub routes: Vec<RouteConfig>,
    /// Access-log sinks (`[log]`).
    pub log: LogConfig,
    /// The Prometheus metrics listener (`[metrics]`).
    pub metrics: MetricsConfig,
    /// `[decisions]`: how bans are enforced and where local ones are kept.
    pub decisions: DecisionsConfig,
    /// `[crowdsec]`: the LAPI bridge, when configured.
    pub crowdsec: Option<CrowdsecConfig>,
    /// `[rate_limit]`: the default limits and the limiter settings.
    pub rate_limit: RateLimitSettings,
    /// Things that are allowed but probably wrong (printed by `wraith test`, logged by serve).
    pub warnings: Vec<String>,
    /// Things loading did that the operator should hear about (e.g. dev certificates created).
    pub notices: Vec<String>,
}

/// `[server]`
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Tokio worker threads; `None` means one per CPU.
    pub worker_threads: Option<NonZeroUsize>,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    pub shutdown_timeout: Duration,
    /// Where `serve` writes its pid (used by `reload` and `stop`).
    pub pid_file: Option<PathBuf>,
    /// Unix socket of the admin API (`status`, and later decisions/metrics).
    pub admin_socket: Option<PathBuf>,
    /// Peers whose X-Forwarded-For / X-Request-Id are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Directory where `serve` creates development certificates if they are missing.
    pub dev_certs_dir: Option<PathBuf>,
    /// Default tracing filter (overridden by `WRAITH_LOG`).
    pub log_level: String,
    /// Server log format.
    pub log_format: LogFormat,
}

/// Server log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    Auto,
    Json,
    Text,
}

/// `[[listener]]`
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: Arc<str>,
    pub address: SocketAddr,
    /// Present for `protocol = "https"`.
    pub tls: Option<TlsConfig>,
    /// For plain-HTTP listeners: answer everything with a redirect to HTTPS.
    pub redirect_https: Option<HttpsRedirect>,
    pub limits: Limits,
}

/// What identifies a listener across reloads: its address, or — for port 0, where the
/// kernel picks the port — its name and address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub address: SocketAddr,
    pub name: Option<Arc<str>>,
}

impl ListenerConfig {
    pub fn key(&self) -> ListenerKey {
        ListenerKey {
            address: self.address,
            name: (self.address.port() == 0).then(|| self.name.clone()),
        }
    }
}

/// TLS settings of an `https` listener, with the certificate already loaded.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub versions: Vec<TlsVersion>,
    pub alpn: Vec<Vec<u8>>,
    /// Key-exchange groups in preference order.
    pub key_exchange: Vec<tls::KxGroup>,
    pub handshake_timeout: Duration,
    /// The loaded certificate chain and key; `None` only when `wraith test` runs before the
    /// development certificates were generated.
    pub certified_key: Option<Arc<CertifiedKey>>,
}

/// A TLS protocol version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// Redirect plain HTTP to HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsRedirect {
    /// Port in the Location header (omitted when 443).
    pub port: u16,
    pub status: StatusCode,
}

/// Per-listener protection limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: NonZeroUsize,
    /// Time allowed to receive a complete request head (slowloris protection).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: NonZeroUsize::new(10_000).expect("non-zero"),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_size: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 128,
        }
    }
}

/// `[[route]]`
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: Arc<str>,
    pub host: HostMatch,
    pub path: PathMatch,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    pub action: RouteAction,
    /// Remove the matched prefix before forwarding (prefix routes only).
    pub strip_prefix: bool,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Overrides the upstream's response timeout.
    pub response_timeout: Option<Duration>,
    /// This route's own rate limits; `None` uses the `[rate_limit]` defaults.
    pub rate_limits: Option<Vec<RateLimitConfig>>,
    /// Response compression (off unless configured).
    pub compression: Option<Arc<CompressionConfig>>,
}

/// Host part of a route match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// `api.example.com` (lowercase).
    Exact(String),
    /// `*.example.com`: stored as `.example.com`; matches one or more labels before it.
    Suffix(String),
}

/// Path part of a route match.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

/// What a route does with a request.
#[derive(Debug, Clone)]
pub enum RouteAction {
    /// Forward to the named upstream.
    Upstream(Arc<str>),
    /// Answer directly.
    Respond(Respond),
    /// Answer with a redirect; `{host}`, `{path}` and `{uri}` are replaced.
    Redirect { to: String, status: StatusCode },
}

/// A built-in response.
#[derive(Debug, Clone)]
pub struct Respond {
    pub status: StatusCode,
    pub body: Bytes,
    pub headers: HeaderMap,
}

/// Header edits applied to a request or a response.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    /// Replace (or create) these headers.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append these values.
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the edits: remove first, then set, then add.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Collects errors while building.
pub(super) struct Builder<'a> {
    src: Source<'a>,
    base_dir: PathBuf,
    errors: Vec<ConfigError>,
    pub(super) warnings: Vec<String>,
    notices: Vec<String>,
    options: LoadOptions,
}

pub(super) type Span = Range<usize>;

impl Builder<'_> {
    pub(super) fn err(
        &mut self,
        span: Option<Span>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let e = self.src.error(span, key, message);
        self.errors.push(e);
    }

    /// Deserializes one value of the document into its raw struct.
    pub(super) fn de<T: DeserializeOwned>(
        &mut self,
        value: &Spanned<DeValue<'_>>,
        key: &str,
    ) -> Option<T> {
        let mut value = value.clone();
        value.get_mut().make_owned();
        match T::deserialize(ValueDeserializer::from(value)) {
            Ok(v) => Some(v),
            Err(e) => {
                let span = e.span();
                let msg = e.message().trim().to_string();
                self.err(span, key, msg);
                None
            }
        }
    }

    pub(super) fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub(super) fn duration(&mut self, v: &Option<Str>, key: &str, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) => d,
                Err(m) => {
                    self.err(Some(s.span()), key, m);
                    default
                }
            },
        }
    }

    pub(super) fn size(&mut self, v: &Option<Str>, key: &str, default: u64) -> u64 {
        match v {
            None => default,
            Some(s) => match parse_size(s.get_ref()) {
                Ok(d) => d,
                Err(m) => {
                    self.err(Some(s.span()), key, m);
                    default
                }
            },
        }
    }

    /// An integer within `min..=max`.
    pub(super) fn int(
        &mut self,
        v: &Option<Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let v = v.as_ref()?;
        let n = *v.get_ref();
        if n < min || n > max {
            self.err(
                Some(v.span()),
                key,
                format!("{n} is out of range (expected {min}..={max})"),
            );
            return None;
        }
        Some(n)
    }
}

/// Builds a `Config` from the file's text.
pub(super) fn build(src: Source<'_>, options: LoadOptions) -> Result<Config, ConfigErrors> {
    let base_dir = src
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut b = Builder {
        src: Source {
            path: src.path,
            text: src.text,
        },
        base_dir,
        errors: Vec::new(),
        warnings: Vec::new(),
        notices: Vec::new(),
        options,
    };

    let (root, parse_errors) = DeTable::parse_recoverable(src.text);
    for e in parse_errors {
        b.err(e.span(), "", e.message().trim().to_string());
    }

    let mut raw_server = None;
    let mut raw_listeners = Vec::new();
    let mut raw_upstreams = Vec::new();
    let mut raw_routes = Vec::new();
    let mut raw_log = None;
    let mut raw_metrics = None;
    let mut raw_decisions = None;
    let mut raw_crowdsec = None;
    let mut raw_rate_limit = None;
    for (key, value) in root.get_ref().iter() {
        let name: &str = key.get_ref();
        match name {
            "server" => raw_server = b.de::<RawServer>(value, "server"),
            "log" => raw_log = b.de::<RawLog>(value, "log"),
            "metrics" => raw_metrics = b.de::<RawMetrics>(value, "metrics"),
            "decisions" => raw_decisions = b.de::<RawDecisions>(value, "decisions"),
            "crowdsec" => raw_crowdsec = b.de::<Spanned<RawCrowdsec>>(value, "crowdsec"),
            "rate_limit" => raw_rate_limit = b.de::<RawRateLimit>(value, "rate_limit"),
            "listener" | "upstream" | "route" => {
                let DeValue::Array(items) = value.get_ref() else {
                    b.err(
                        Some(value.span()),
                        name,
                        format!("expected an array of tables ([[{name}]])"),
                    );
                    continue;
                };
                for (i, item) in items.iter().enumerate() {
                    let key = format!("{name}[{i}]");
                    match name {
                        // Keep the file index: key paths must name the element in the file
                        // even when an earlier one failed to parse.
                        "listener" => {
                            raw_listeners.extend(b.de::<RawListener>(item, &key).map(|r| (i, r)))
                        }
                        "upstream" => {
                            raw_upstreams.extend(b.de::<RawUpstream>(item, &key).map(|r| (i, r)))
                        }
                        _ => raw_routes.extend(b.de::<RawRoute>(item, &key).map(|r| (i, r))),
                    }
                }
            }
            other => b.err(
                Some(key.span()),
                other,
                "unknown section (expected server, listener, upstream, route, decisions, crowdsec, rate_limit, log or metrics)",
            ),
        }
    }

    let server = build_server(&mut b, raw_server.unwrap_or_default());
    let listeners = build_listeners(&mut b, &server, raw_listeners);
    let upstreams = build_upstreams(&mut b, raw_upstreams);
    let routes = build_routes(&mut b, &upstreams, raw_routes);
    let log = build_log(&mut b, raw_log.unwrap_or_default());
    let metrics = build_metrics(&mut b, raw_metrics.unwrap_or_default());
    let decisions = super::security::build_decisions(&mut b, raw_decisions.unwrap_or_default());
    let crowdsec = raw_crowdsec.and_then(|c| super::security::build_crowdsec(&mut b, c));
    let rate_limit = super::security::build_rate_limit(&mut b, raw_rate_limit.unwrap_or_default());

    if listeners.is_empty() && b.errors.is_empty() {
        b.err(
            None,
            "listener",
            "no [[listener]] configured: nothing to serve",
        );
    }
    let used: HashSet<&str> = routes
        .iter()
        .filter_map(|r| match &r.action {
            RouteAction::Upstream(u) => Some(&**u),
            _ => None,
        })
        .collect();
    for u in &upstreams {
        if !used.contains(&*u.name) {
            b.warnings
                .push(format!("upstream {:?} is not used by any route", u.name));
        }
    }

    if !b.errors.is_empty() {
        let mut errors = b.errors;
        errors.sort_by_key(|e| e.location.as_ref().map(|l| (l.line, l.column)));
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        file: src.path.to_path_buf(),
        server,
        listeners,
        upstreams,
        routes,
        log,
        metrics,
        decisions,
        crowdsec,
        rate_limit,
        warnings: b.warnings,
        notices: b.notices,
    })
}

fn build_server(b: &mut Builder<'_>, raw: RawServer) -> ServerConfig {
    let worker_threads = b
        .int(&raw.worker_threads, "server.worker_threads", 1, 1024)
        .and_then(|n| NonZeroUsize::new(n as usize));
    let shutdown_timeout = b.duration(
        &raw.shutdown_timeout,
        "server.shutdown_timeout",
        Duration::from_secs(30),
    );
    let mut trusted_proxies = Vec::new();
    for (i, p) in raw.trusted_proxies.iter().flatten().enumerate() {
        match parse_net(p.get_ref()) {
            Ok(net) => trusted_proxies.push(net),
            Err(m) => b.err(Some(p.span()), format!("server.trusted_proxies[{i}]"), m),
        }
    }
    let log_format = match raw
        .log_format
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("auto", _)) => LogFormat::Auto,
        Some(("json", _)) => LogFormat::Json,
        Some(("text", _)) => LogFormat::Text,
        Some((other, span)) => {
            b.err(
                Some(span),
                "server.log_format",
                format!("unknown log format {other:?} (expected auto, json or text)"),
            );
            LogFormat::Auto
        }
    };
    let log_level = match raw.log_level {
        None => "info".to_string(),
        Some(s) => {
            if let Err(e) = s.get_ref().parse::<tracing_subscriber::EnvFilter>() {
                b.err(
                    Some(s.span()),
                    "server.log_level",
                    format!("invalid filter: {e}"),
                );
            }
            s.into_inner()
        }
    };
    ServerConfig {
        worker_threads,
        shutdown_timeout,
        pid_file: raw.pid_file.map(|p| b.path(p.get_ref())),
        admin_socket: raw.admin_socket.map(|p| b.path(p.get_ref())),
        trusted_proxies,
        dev_certs_dir: raw.dev_certs_dir.map(|p| b.path(p.get_ref())),
        log_level,
        log_format,
    }
}

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("invalid address or CIDR range {s:?}"))
}

fn check_name(b: &mut Builder<'_>, name: &Str, key: &str, seen: &mut HashMap<String, ()>) {
    let n = name.get_ref();
    if n.is_empty()
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        b.err(
            Some(name.span()),
            key,
            format!("invalid name {n:?}: use letters, digits, '-', '_' or '.'"),
        );
    }
    if seen.insert(n.clone(), ()).is_some() {
        b.err(Some(name.span()), key, format!("duplicate name {n:?}"));
    }
}

fn build_listeners(
    b: &mut Builder<'_>,
    server: &ServerConfig,
    raw: Vec<(usize, RawListener)>,
) -> Vec<ListenerConfig> {
    let mut out = Vec::new();
    let mut names = HashMap::new();
    let mut addresses: Vec<(SocketAddr, String)> = Vec::new();
    for (i, l) in raw {
        let key = format!("listener[{i}]");
        check_name(b, &l.name, &format!("{key}.name"), &mut names);
        let address = match l.address.get_ref().parse::<SocketAddr>() {
            Ok(a) => {
                let clash = addresses.iter().find(|(other, _)| {
                    a.port() != 0
                        && other.port() == a.port()
                        && (other.ip() == a.ip()
                            || other.ip().is_unspecified()
                            || a.ip().is_unspecified())
                });
                if let Some((other, name)) = clash {
                    b.err(
                        Some(l.address.span()),
                        format!("{key}.address"),
                        format!("address {a} clashes with listener {name:?} on {other}"),
                    );
                }
                addresses.push((a, l.name.get_ref().clone()));
                a
            }
            Err(_) => {
                b.err(
                    Some(l.address.span()),
                    format!("{key}.address"),
                    format!(
                        "invalid socket address {:?} (expected e.g. \"127.0.0.1:8443\" or \"[::1]:8443\")",
                        l.address.get_ref()
                    ),
                );
                continue;
            }
        };
        let limits = build_limits(b, &key, l.limits.unwrap_or_default());
        let tls = match (l.protocol.get_ref().as_str(), l.tls) {
            ("https", Some(t)) => build_tls(b, server, &format!("{key}.tls"), t),
            ("https", None) => {
                b.err(
                    Some(l.protocol.span()),
                    format!("{key}.tls"),
                    "an https listener needs a [listener.tls] section with cert and key",
                );
                None
            }
            ("http", Some(t)) => {
                b.err(
                    Some(t.span()),
                    format!("{key}.tls"),
                    "tls settings on an http listener (did you mean protocol = \"https\"?)",
                );
                None
            }
            ("http", None) => None,
            (other, _) => {
                b.err(
                    Some(l.protocol.span()),
                    format!("{key}.protocol"),
                    format!("unknown protocol {other:?} (expected \"http\" or \"https\")"),
                );
                None
            }
        };
        let redirect_https = match l.redirect_https {
            None => None,
            Some(r) if l.protocol.get_ref() != "http" => {
                b.err(
                    Some(r.span()),
                    format!("{key}.redirect_https"),
                    "redirect_https only makes sense on an http listener",
                );
                None
            }
            Some(r) => {
                let r = r.into_inner();
                let port = b
                    .int(&r.port, &format!("{key}.redirect_https.port"), 1, 65535)
                    .unwrap_or(443) as u16;
                let status =
                    redirect_status(b, &r.status, &format!("{key}.redirect_https.status"), 308);
                Some(HttpsRedirect { port, status })
            }
        };
        out.push(ListenerConfig {
            name: Arc::from(l.name.into_inner()),
            address,
            tls,
            redirect_https,
            limits,
        });
    }
    out
}

fn build_limits(b: &mut Builder<'_>, key: &str, raw: RawLimits) -> Limits {
    let d = Limits::default();
    let max_connections = b
        .int(
            &raw.max_connections,
            &format!("{key}.limits.max_connections"),
            1,
            10_000_000,
        )
        .and_then(|n| NonZeroUsize::new(n as usize))
        .unwrap_or(d.max_connections);
    let max_header_size = b.size(
        &raw.max_header_size,
        &format!("{key}.limits.max_header_size"),
        d.max_header_size as u64,
    );
    if !(8192..=16 << 20).contains(&max_header_size) {
        let span = raw.max_header_size.as_ref().map(|s| s.span());
        b.err(
            span,
            format!("{key}.limits.max_header_size"),
            "must be between 8KiB and 16MiB",
        );
    }
    Limits {
        max_connections,
        header_read_timeout: b.duration(
            &raw.header_read_timeout,
            &format!("{key}.limits.header_read_timeout"),
            d.header_read_timeout,
        ),
        idle_timeout: b.duration(
            &raw.idle_timeout,
            &format!("{key}.limits.idle_timeout"),
            d.idle_timeout,
        ),
        max_header_size: max_header_size as usize,
        max_headers: b
            .int(
                &raw.max_headers,
                &format!("{key}.limits.max_headers"),
                1,
                10_000,
            )
            .map_or(d.max_headers, |n| n as usize),
        max_concurrent_streams: b
            .int(
                &raw.max_concurrent_streams,
                &format!("{key}.limits.max_concurrent_streams"),
                1,
                1 << 20,
            )
            .map_or(d.max_concurrent_streams, |n| n as u32),
    }
}

fn build_tls(
    b: &mut Builder<'_>,
    server: &ServerConfig,
    key: &str,
    raw: Spanned<RawTls>,
) -> Option<TlsConfig> {
    let raw = raw.into_inner();
    let mut versions = Vec::new();
    for (i, v) in raw.versions.iter().flatten().enumerate() {
        match v.get_ref().as_str() {
            "1.2" => versions.push(TlsVersion::Tls12),
            "1.3" => versions.push(TlsVersion::Tls13),
            other => b.err(
                Some(v.span()),
                format!("{key}.versions[{i}]"),
                format!("unsupported TLS version {other:?} (expected \"1.2\" or \"1.3\")"),
            ),
        }
    }
    if raw.versions.is_none() {
        versions.push(TlsVersion::Tls13);
    } else if versions.is_empty() && raw.versions.as_ref().is_some_and(|v| v.is_empty()) {
        b.err(
            None,
            format!("{key}.versions"),
            "at least one TLS version is needed",
        );
    }
    let alpn = match &raw.alpn {
        None => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Some(list) => {
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                match p.get_ref().as_str() {
                    "h2" | "http/1.1" => out.push(p.get_ref().as_bytes().to_vec()),
                    other => b.err(
                        Some(p.span()),
                        format!("{key}.alpn[{i}]"),
                        format!(
                            "unsupported ALPN protocol {other:?} (expected \"h2\" or \"http/1.1\")"
                        ),
                    ),
                }
            }
            out
        }
    };
    let key_exchange = match &raw.key_exchange {
        None => tls::KxGroup::DEFAULT.to_vec(),
        Some(list) => {
            let mut out = Vec::new();
            for (i, g) in list.iter().enumerate() {
                match tls::KxGroup::parse(g.get_ref()) {
                    Some(k) => out.push(k),
                    None => b.err(
                        Some(g.span()),
                        format!("{key}.key_exchange[{i}]"),
                        format!(
                            "unknown key-exchange group {:?} (expected X25519MLKEM768, X25519, secp256r1 or secp384r1)",
                            g.get_ref()
                        ),
                    ),
                }
            }
            if out.is_empty() && list.is_empty() {
                b.err(
                    None,
                    format!("{key}.key_exchange"),
                    "at least one group is needed",
                );
            }
            out
        }
    };
    let handshake_timeout = b.duration(
        &raw.handshake_timeout,
        &format!("{key}.handshake_timeout"),
        Duration::from_secs(10),
    );
    let cert_path = b.path(raw.cert.get_ref());
    let key_path = b.path(raw.key.get_ref());

    // Development certificates: create them (serve) or note that they would be (test).
    let missing = !cert_path.exists() && !key_path.exists();
    let in_dev_dir = server
        .dev_certs_dir
        .as_ref()
        .is_some_and(|d| cert_path.starts_with(d) && key_path.starts_with(d));
    if missing && in_dev_dir {
        let dir = server.dev_certs_dir.clone().unwrap_or_default();
        if b.options.generate_dev_certs {
            match crate::certs::ensure_dev_certs(&dir) {
                Ok(true) => b.notices.push(format!(
                    "created development certificates in {} (dev CA, server and client certificate); do not use them in production",
                    dir.display()
                )),
                Ok(false) => {}
                Err(e) => {
                    b.err(Some(raw.cert.span()), format!("{key}.cert"), e);
                    return None;
                }
            }
        } else {
            b.warnings.push(format!(
                "{key}: {} does not exist yet; `wraith serve` will create development certificates in {}",
                cert_path.display(),
                dir.display()
            ));
            return Some(TlsConfig {
                cert_path,
                key_path,
                versions,
                alpn,
                key_exchange,
                handshake_timeout,
                certified_key: None,
            });
        }
    }

    let certified_key = match tls::load_certified_key(&cert_path, &key_path) {
        Ok((ck, warnings)) => {
            b.warnings
                .extend(warnings.into_iter().map(|w| format!("{key}: {w}")));
            Some(ck)
        }
        Err(tls::CertError::Cert(m)) => {
            b.err(Some(raw.cert.span()), format!("{key}.cert"), m);
            None
        }
        Err(tls::CertError::Key(m)) => {
            b.err(Some(raw.key.span()), format!("{key}.key"), m);
            None
        }
    };
    certified_key.map(|ck| TlsConfig {
        cert_path,
        key_path,
        versions,
        alpn,
        key_exchange,
        handshake_timeout,
        certified_key: Some(ck),
    })
}

fn redirect_status(
    b: &mut Builder<'_>,
    v: &Option<Spanned<i64>>,
    key: &str,
    default: u16,
) -> StatusCode {
    match v {
        None => StatusCode::from_u16(default).unwrap_or(StatusCode::PERMANENT_REDIRECT),
        Some(s) => match *s.get_ref() {
            n @ (301 | 302 | 303 | 307 | 308) => {
                StatusCode::from_u16(n as u16).unwrap_or(StatusCode::FOUND)
            }
            n => {
                b.err(
                    Some(s.span()),
                    key,
                    format!(
                        "redirect status {n} is not a redirect (use 301, 302, 303, 307 or 308)"
                    ),
                );
                StatusCode::FOUND
            }
        },
    }
}

fn build_routes(
    b: &mut Builder<'_>,
    upstreams: &[UpstreamConfig],
    raw: Vec<(usize, RawRoute)>,
) -> Vec<RouteConfig> {
    let mut out = Vec::new();
    let mut names = HashMap::new();
    for (i, r) in raw {
        let key = format!("route[{i}]");
        check_name(b, &r.name, &format!("{key}.name"), &mut names);
        let host = match &r.host {
            None => HostMatch::Any,
            Some(h) => match parse_host_match(h.get_ref()) {
                Ok(m) => m,
                Err(m) => {
                    b.err(Some(h.span()), format!("{key}.host"), m);
                    HostMatch::Any
                }
            },
        };
        let path = match r.path {
            None => PathMatch::Prefix("/".into()),
            Some(p) => {
                let span = p.span();
                let p = p.into_inner();
                let given = [&p.prefix, &p.exact, &p.regex]
                    .iter()
                    .filter(|x| x.is_some())
                    .count();
                if given != 1 {
                    b.err(
                        Some(span),
                        format!("{key}.path"),
                        "give exactly one of prefix, exact or regex",
                    );
                    PathMatch::Prefix("/".into())
                } else if let Some(s) = p.prefix {
                    check_path(b, &s, &format!("{key}.path.prefix"));
                    PathMatch::Prefix(s.into_inner())
                } else if let Some(s) = p.exact {
                    check_path(b, &s, &format!("{key}.path.exact"));
                    PathMatch::Exact(s.into_inner())
                } else if let Some(s) = p.regex {
                    match Regex::new(s.get_ref()) {
                        Ok(re) => PathMatch::Regex(re),
                        Err(e) => {
                            b.err(
                                Some(s.span()),
                                format!("{key}.path.regex"),
                                // regex draws a caret under the pattern; keep the last line.
                                format!("invalid regex: {}", last_line(&e.to_string())),
                            );
                            PathMatch::Prefix("/".into())
                        }
                    }
                } else {
                    PathMatch::Prefix("/".into())
                }
            }
        };
        let methods = r.methods.as_ref().map(|list| {
            let mut out = Vec::new();
            for (j, m) in list.iter().enumerate() {
                let upper = m.get_ref().to_ascii_uppercase();
                match Method::from_bytes(upper.as_bytes()) {
                    Ok(method) if !upper.is_empty() => out.push(method),
                    _ => b.err(
                        Some(m.span()),
                        format!("{key}.methods[{j}]"),
                        format!("invalid method {:?}", m.get_ref()),
                    ),
                }
            }
            out
        });

        let actions = [
            r.upstream.is_some(),
            r.respond.is_some(),
            r.redirect.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if actions != 1 {
            b.err(
                Some(r.name.span()),
                &key,
                "a route needs exactly one action: upstream = \"name\", respond = {...} or redirect = {...}",
            );
        }
        let action = if let Some(u) = &r.upstream {
            if !upstreams.iter().any(|x| *x.name == **u.get_ref()) {
                b.err(
                    Some(u.span()),
                    format!("{key}.upstream"),
                    format!("unknown upstream {:?}", u.get_ref()),
                );
            }
            RouteAction::Upstream(Arc::from(u.get_ref().as_str()))
        } else if let Some(resp) = r.respond {
            RouteAction::Respond(build_respond(
                b,
                &format!("{key}.respond"),
                resp.into_inner(),
            ))
        } else if let Some(red) = r.redirect {
            let red = red.into_inner();
            let status = redirect_status(b, &red.status, &format!("{key}.redirect.status"), 302);
            if red.to.get_ref().is_empty() || HeaderValue::from_str(red.to.get_ref()).is_err() {
                b.err(
                    Some(red.to.span()),
                    format!("{key}.redirect.to"),
                    "redirect target must be a non-empty, visible-ASCII URL",
                );
            }
            RouteAction::Redirect {
                to: red.to.into_inner(),
                status,
            }
        } else {
            RouteAction::Respond(Respond {
                status: StatusCode::NOT_FOUND,
                body: Bytes::new(),
                headers: HeaderMap::new(),
            })
        };

        let strip_prefix = match &r.strip_prefix {
            Some(s) if *s.get_ref() => {
                if !matches!(path, PathMatch::Prefix(_)) {
                    b.err(
                        Some(s.span()),
                        format!("{key}.strip_prefix"),
                        "strip_prefix needs a path prefix match",
                    );
                }
                if !matches!(action, RouteAction::Upstream(_)) {
                    b.err(
                        Some(s.span()),
                        format!("{key}.strip_prefix"),
                        "strip_prefix only applies to upstream routes",
                    );
                }
                true
            }
            _ => false,
        };
        let request_headers =
            build_header_ops(b, &format!("{key}.request_headers"), r.request_headers);
        let response_headers =
            build_header_ops(b, &format!("{key}.response_headers"), r.response_headers);
        let response_timeout = r.response_timeout.as_ref().map(|_| {
            b.duration(
                &r.response_timeout,
                &format!("{key}.response_timeout"),
                Duration::from_secs(60),
            )
        });
        let rate_limits = r
            .rate_limits
            .map(|list| super::security::build_limits(b, &format!("{key}.rate_limits"), list));
        let compression = match r.compression {
            None => None,
            Some(c) => {
                let span = c.span();
                let built =
                    build_compression(b, &format!("{key}.compression"), span, c.into_inner());
                if built.is_some() && !matches!(action, RouteAction::Upstream(_)) {
                    b.warnings.push(format!(
                        "{key}.compression only applies to upstream routes; it is ignored"
                    ));
                }
                built.map(Arc::new)
            }
        };
        out.push(RouteConfig {
            rate_limits,
            compression,
            name: Arc::from(r.name.into_inner()),
            host,
            path,
            methods,
            action,
            strip_prefix,
            request_headers,
            response_headers,
            response_timeout,
        });
    }
    out
}

fn check_path(b: &mut Builder<'_>, s: &Str, key: &str) {
    if !s.get_ref().starts_with('/') {
        b.err(
            Some(s.span()),
            key,
            format!("path {:?} must start with '/'", s.get_ref()),
        );
    }
}

/// `example.com`, `*.example.com` or `*` (any host).
fn parse_host_match(s: &str) -> Result<HostMatch, String> {
    let lower = s.trim().to_ascii_lowercase();
    if lower == "*" {
        return Ok(HostMatch::Any);
    }
    let valid = |h: &str| {
        !h.is_empty()
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
    };
    if let Some(rest) = lower.strip_prefix("*.") {
        if valid(rest) {
            return Ok(HostMatch::Suffix(format!(".{rest}")));
        }
    } else if valid(&lower) || lower.parse::<IpAddr>().is_ok() {
        return Ok(HostMatch::Exact(lower));
    }
    Err(format!(
        "invalid host {s:?} (expected \"api.example.com\" or \"*.example.com\")"
    ))
}

fn build_respond(b: &mut Builder<'_>, key: &str, raw: RawRespond) -> Respond {
    let status = match &raw.status {
        None => StatusCode::OK,
        Some(s) => match u16::try_from(*s.get_ref())
            .ok()
            .and_then(|n| StatusCode::from_u16(n).ok())
        {
            Some(st) if (200..=599).contains(&st.as_u16()) => st,
            _ => {
                b.err(
                    Some(s.span()),
                    format!("{key}.status"),
                    format!("invalid status {} (expected 200..=599)", s.get_ref()),
                );
                StatusCode::OK
            }
        },
    };
    let mut headers = HeaderMap::new();
    let content_type = raw
        .content_type
        .as_ref()
        .map_or("text/plain; charset=utf-8", |c| c.get_ref().as_str());
    match HeaderValue::from_str(content_type) {
        Ok(v) => {
            headers.insert(http::header::CONTENT_TYPE, v);
        }
        Err(_) => b.err(
            raw.content_type.as_ref().map(|c| c.span()),
            format!("{key}.content_type"),
            "invalid content type",
        ),
    }
    for (name, value) in raw.headers.iter().flatten() {
        if let Some((n, v)) = header_pair(b, &format!("{key}.headers"), name, value) {
            headers.append(n, v);
        }
    }
    Respond {
        status,
        body: Bytes::from(raw.body.unwrap_or_default()),
        headers,
    }
}

fn header_pair(
    b: &mut Builder<'_>,
    key: &str,
    name: &Str,
    value: &Str,
) -> Option<(HeaderName, HeaderValue)> {
    let n = match HeaderName::from_bytes(name.get_ref().as_bytes()) {
        Ok(n) => n,
        Err(_) => {
            b.err(
                Some(name.span()),
                key,
                format!("invalid header name {:?}", name.get_ref()),
            );
            return None;
        }
    };
    let v = match HeaderValue::from_str(value.get_ref()) {
        Ok(v) => v,
        Err(_) => {
            b.err(
                Some(value.span()),
                format!("{key}.{n}"),
                "invalid header value (visible ASCII only)",
            );
            return None;
        }
    };
    Some((n, v))
}

fn build_header_ops(b: &mut Builder<'_>, key: &str, raw: Option<RawHeaderOps>) -> HeaderOps {
    let Some(raw) = raw else {
        return HeaderOps::default();
    };
    let mut ops = HeaderOps::default();
    for (name, value) in raw.set.iter().flatten() {
        ops.set
            .extend(header_pair(b, &format!("{key}.set"), name, value));
    }
    for (name, value) in raw.add.iter().flatten() {
        ops.add
            .extend(header_pair(b, &format!("{key}.add"), name, value));
    }
    for (i, name) in raw.remove.iter().flatten().enumerate() {
        match HeaderName::from_bytes(name.get_ref().as_bytes()) {
            Ok(n) => ops.remove.push(n),
            Err(_) => b.err(
                Some(name.span()),
                format!("{key}.remove[{i}]"),
                format!("invalid header name {:?}", name.get_ref()),
            ),
        }
    }
    for (name, _) in ops.set.iter().chain(ops.add.iter()) {
        if crate::proxy::headers::is_hop_by_hop(name) || name.as_str() == "host" {
            b.warnings.push(format!(
                "{key}: header {name} is managed by the proxy; editing it has no effect"
            ));
        }
    }
    ops
}

/// The last non-empty line of a multi-line message, without an `error: ` prefix.
fn last_line(msg: &str) -> &str {
    msg.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(msg)
        .trim()
        .trim_start_matches("error: ")
}
