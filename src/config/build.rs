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
use crate::listener::{ocsp, tls};

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
    /// `[policy]`: Cedar policies. `None` means nothing permits (deny by default).
    pub policy: Option<PolicyConfig>,
    /// Things that are allowed but probably wrong (printed by `wraith test`, logged by serve).
    pub warnings: Vec<String>,
    /// Things loading did that the operator should hear about (e.g. dev certificates created).
    pub notices: Vec<String>,
    /// Where the keys whose values are checked only later (the files `wraith test` and
    /// `serve` open) are written, for those errors: see [`Config::key`].
    pub locations: std::collections::BTreeMap<&'static str, super::Location>,
}

impl Config {
    /// `key` for an error message, preceded by where the file sets it (`file:line:col: key`)
    /// when that is known.
    pub fn key(&self, key: &str) -> String {
        match self.locations.get(key) {
            Some(at) => format!("{at}: {key}"),
            None => key.to_string(),
        }
    }
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
    /// HTTP/3 on the same port over UDP (`http3 = true`, tuned by `[listener.quic]`).
    pub quic: Option<QuicConfig>,
    /// TCP connections begin with a PROXY protocol header (v1 or v2) from a peer in
    /// `server.trusted_proxies`, which names the client (`proxy_protocol = true`).
    pub proxy_protocol: bool,
}

/// `[listener.quic]`: the QUIC side of an `https` listener with `http3 = true`. Limits
/// (connections, streams, idle timeout, header size) come from `[listener.limits]`, TLS
/// (certificate, groups, client certificates) from `[listener.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    /// Accept TLS 0-RTT early data from resumed clients (only on routes with
    /// `early_data = true`, only safe methods; the rest gets 425 Too Early).
    pub zero_rtt: bool,
    /// Congestion controller of each connection.
    pub congestion: Congestion,
    /// Largest UDP payload Wraith accepts and sends (path MTU discovery stays below it).
    pub max_udp_payload: u16,
    /// When clients must prove their address with a Retry round trip.
    pub retry: RetryPolicy,
    /// `ma` of the `Alt-Svc` header the TCP side sends.
    pub alt_svc_max_age: Duration,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            zero_rtt: false,
            congestion: Congestion::Cubic,
            max_udp_payload: 1472,
            retry: RetryPolicy::UnderLoad(64),
            alt_svc_max_age: Duration::from_secs(86_400),
        }
    }
}

/// A QUIC congestion controller (quinn's implementations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default.
    Cubic,
    /// NewReno (RFC 9002).
    NewReno,
    /// BBR (quinn's implementation, which quinn calls experimental).
    Bbr,
}

impl Congestion {
    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "new_reno",
            Congestion::Bbr => "bbr",
        }
    }
}

/// When a QUIC listener answers a new connection with a Retry (address validation: one more
/// round trip, but a spoofed source address cannot complete it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Every new connection whose address is not yet validated.
    Always,
    /// Only while at least this many handshakes are in progress on the listener.
    UnderLoad(usize),
    /// Never.
    Never,
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
    /// `ocsp_response`: the DER OCSP response stapled to the certificate, re-read on every
    /// reload.
    pub ocsp_path: Option<PathBuf>,
    /// The response read from it, checked against the certificate. Kept even when it is not
    /// current (expired): the handshake staples it only while it is (`Staple::current`).
    pub ocsp: Option<ocsp::Staple>,
    pub versions: Vec<TlsVersion>,
    pub alpn: Vec<Vec<u8>>,
    /// Key-exchange groups in preference order.
    pub key_exchange: Vec<tls::KxGroup>,
    pub handshake_timeout: Duration,
    /// The loaded certificate chain and key; `None` only when `wraith test` runs before the
    /// development certificates were generated.
    pub certified_key: Option<Arc<CertifiedKey>>,
    /// Client certificates (mTLS).
    pub client_auth: ClientAuth,
}

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMode {
    /// No certificate is requested.
    None,
    /// A certificate is requested; without one the client is anonymous, with one it must verify.
    Optional,
    /// A handshake without a valid certificate fails.
    Require,
}

/// Client-certificate verification settings of a listener, with CAs and CRLs loaded.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    pub mode: ClientAuthMode,
    /// Trusted CA bundle files.
    pub ca_paths: Vec<PathBuf>,
    /// The CA certificates (trust anchors) from `ca_paths`.
    pub cas: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// CRL files, re-read on every reload.
    pub crl_paths: Vec<PathBuf>,
    pub crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    /// Most certificates the client may send (leaf plus intermediates, not counting copies of
    /// trusted CAs).
    pub max_chain_depth: usize,
    /// `client_trust_domains`: per SPIFFE trust domain, the bundle files its certificates
    /// must chain to.
    pub trust_domain_paths: Vec<(String, Vec<PathBuf>)>,
    /// The same, loaded (each bundle's certificates are among `cas`).
    pub trust_domains: Vec<(String, Vec<rustls_pki_types::CertificateDer<'static>>)>,
}

impl Default for ClientAuth {
    fn default() -> Self {
        ClientAuth {
            mode: ClientAuthMode::None,
            ca_paths: Vec::new(),
            cas: Vec::new(),
            crl_paths: Vec::new(),
            crls: Vec::new(),
            max_chain_depth: 4,
            trust_domain_paths: Vec::new(),
            trust_domains: Vec::new(),
        }
    }
}

/// `[policy]`: where the Cedar policies are and how routes use them.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// The policy directory (`*.cedar`, `wraith.cedarschema`, `tests/*.toml`).
    pub dir: PathBuf,
    /// The set used by routes that name none.
    pub default_set: String,
    /// Seconds east of UTC for `context.local` (office hours).
    pub utc_offset: i32,
    /// The sets as configured.
    pub sets: Vec<crate::policy::load::SetSpec>,
    /// Everything parsed and validated.
    pub compiled: Arc<crate::policy::Compiled>,
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
    /// Connections open at once from one client address (an IPv6 client: its /64); `None`:
    /// no limit. Trusted proxies are exempt.
    pub max_connections_per_client: Option<NonZeroUsize>,
    /// Time allowed to receive a complete request head (slowloris protection).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_concurrent_streams: u32,
    /// Request bodies larger than this get 413; `None`: no limit.
    pub max_request_body: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: NonZeroUsize::new(10_000).expect("non-zero"),
            max_connections_per_client: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_size: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 128,
            max_request_body: None,
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
    /// Free-form labels, given to policies as `resource.tags`.
    pub tags: Vec<String>,
    /// The policy set deciding this route; `None` means `[policy] default_set`.
    pub policy: Option<String>,
    /// Serve requests that arrived as TLS early data (0-RTT, replayable) on this route, for
    /// safe methods only. Off: such requests get 425 Too Early and the client retries them
    /// after the handshake.
    pub early_data: bool,
    /// Overrides the set's mode for this route.
    pub policy_mode: Option<crate::policy::PolicyMode>,
    /// Overrides the listener's `max_request_body`: `Some(None)` lifts it ("unlimited").
    pub max_request_body: Option<Option<u64>>,
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
    locations: std::collections::BTreeMap<&'static str, super::Location>,
    options: LoadOptions,
    /// `wraith test` with the development certificates still to be made: a stand-in set.
    stand_in: Option<StandIn>,
}

/// A development certificate set made in a private temporary directory for `wraith test`,
/// so that listeners whose dev certificates `serve` has yet to create are built and checked
/// like any other (TLS settings, client authentication, HTTP/3). Read while the config is
/// built, removed when the builder is done.
struct StandIn {
    /// The configured `dev_certs_dir`, whose missing files the stand-ins replace.
    dev_dir: PathBuf,
    dir: PathBuf,
}

impl StandIn {
    fn new(dev_dir: PathBuf) -> Result<StandIn, String> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "wraith-test-dev-certs-{}-{nanos}",
            std::process::id()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let stand_in = StandIn { dev_dir, dir };
        crate::certs::init(&stand_in.dir, true)?;
        Ok(stand_in)
    }

    /// Where to read `path` from: its stand-in when it is a missing file of the dev set.
    fn read_path(&self, path: &Path) -> Option<PathBuf> {
        let name = path.file_name()?.to_str()?;
        (path.parent() == Some(&*self.dev_dir)
            && crate::certs::FILES.contains(&name)
            && !path.exists())
        .then(|| self.dir.join(name))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) type Span = Range<usize>;

impl Builder<'_> {
    /// Where a certificate or key file is read from (see [`StandIn`]).
    fn read_path(&self, path: &Path) -> PathBuf {
        self.stand_in
            .as_ref()
            .and_then(|s| s.read_path(path))
            .unwrap_or_else(|| path.to_path_buf())
    }

    /// Remembers where `key` is written, for errors found after loading ([`Config::key`]).
    pub(super) fn remember(&mut self, key: &'static str, span: Span) {
        let at = self.src.locate(span.start);
        self.locations.insert(key, at);
    }

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
        let mut owned = value.clone();
        owned.get_mut().make_owned();
        match T::deserialize(ValueDeserializer::from(owned)) {
            Ok(v) => Some(v),
            Err(e) => {
                let span = e.span();
                let msg = e.message().trim().to_string();
                let key = match &span {
                    Some(at) => key_at(value, at.start, key),
                    None => key.to_string(),
                };
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

    /// `max_request_body`: a size, or `"unlimited"` (`Some(None)`); `None` when not set.
    pub(super) fn body_limit(&mut self, v: &Option<Str>, key: &str) -> Option<Option<u64>> {
        let s = v.as_ref()?;
        if s.get_ref() == "unlimited" {
            return Some(None);
        }
        match parse_size(s.get_ref()) {
            Ok(n) => Some(Some(n)),
            Err(m) => {
                self.err(Some(s.span()), key, format!("{m} (or \"unlimited\")"));
                None
            }
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
        locations: Default::default(),
        options,
        stand_in: None,
    };

    let (root, parse_errors) = DeTable::parse_recoverable(src.text);
    for e in parse_errors {
        let message = e.message().trim();
        // The parser gives this one no position.
        let message = if message == "recursion limit" {
            "arrays, inline tables or dotted keys nested deeper than the TOML parser allows \
             (its recursion limit): no Wraith setting nests like this"
                .to_string()
        } else {
            message.to_string()
        };
        b.err(e.span(), "", message);
    }

    let mut raw_server = None;
    let mut raw_policy = None;
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
            "policy" => raw_policy = b.de::<RawPolicy>(value, "policy"),
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
                "unknown section (expected server, listener, upstream, route, policy, decisions, crowdsec, rate_limit, log or metrics)",
            ),
        }
    }

    let server = build_server(&mut b, raw_server.unwrap_or_default());
    let listeners = build_listeners(&mut b, &server, raw_listeners);
    let upstreams = build_upstreams(&mut b, raw_upstreams);
    let policy = match raw_policy {
        Some(p) => build_policy(&mut b, p),
        None => {
            b.warnings.push(
                "no [policy] section: no policy permits anything, so every routed request is denied with 403 (deny by default); add [policy] (see docs/policy.md)".into(),
            );
            None
        }
    };
    let rate_limit = super::security::build_rate_limit(&mut b, raw_rate_limit.unwrap_or_default());
    let routes = build_routes(
        &mut b,
        &upstreams,
        policy.as_ref(),
        raw_routes,
        rate_limit.redis.is_some(),
    );
    let log = build_log(&mut b, raw_log.unwrap_or_default());
    let metrics = build_metrics(&mut b, raw_metrics.unwrap_or_default(), &listeners);
    let decisions = super::security::build_decisions(&mut b, raw_decisions.unwrap_or_default());
    let crowdsec = raw_crowdsec.and_then(|c| super::security::build_crowdsec(&mut b, c));

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
        policy,
        warnings: b.warnings,
        notices: b.notices,
        locations: b.locations,
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
            ("https", Some(t)) => build_tls(b, server, &format!("{key}.tls"), l.name.get_ref(), t),
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
        let quic = build_quic(b, &key, &l.protocol, l.http3, l.quic, tls.as_ref());
        let proxy_protocol = l.proxy_protocol.is_some_and(|p| {
            if *p.get_ref() && server.trusted_proxies.is_empty() {
                b.err(
                    Some(p.span()),
                    format!("{key}.proxy_protocol"),
                    "proxy_protocol needs server.trusted_proxies: the addresses of the load balancers allowed to send the header (connections from any other peer are refused)",
                );
            }
            p.into_inner()
        });
        out.push(ListenerConfig {
            name: Arc::from(l.name.into_inner()),
            address,
            tls,
            redirect_https,
            limits,
            quic,
            proxy_protocol,
        });
    }
    out
}

/// `http3` and `[listener.quic]`.
fn build_quic(
    b: &mut Builder<'_>,
    key: &str,
    protocol: &Str,
    http3: Option<Spanned<bool>>,
    raw: Option<Spanned<RawQuic>>,
    tls: Option<&TlsConfig>,
) -> Option<QuicConfig> {
    let enabled = http3.as_ref().is_some_and(|h| *h.get_ref());
    if !enabled {
        if let Some(q) = &raw {
            b.err(
                Some(q.span()),
                format!("{key}.quic"),
                "quic settings without http3 = true",
            );
        }
        return None;
    }
    let span = http3.as_ref().map(|h| h.span());
    if protocol.get_ref() != "https" {
        b.err(
            span,
            format!("{key}.http3"),
            "http3 needs protocol = \"https\" (QUIC is always encrypted)",
        );
        return None;
    }
    if let Some(t) = tls {
        if !t.versions.contains(&TlsVersion::Tls13) {
            b.err(
                span.clone(),
                format!("{key}.http3"),
                "http3 needs TLS 1.3 in tls.versions (QUIC has no other version)",
            );
        }
    }
    let raw = raw.map(Spanned::into_inner).unwrap_or_default();
    let d = QuicConfig::default();
    let congestion = match &raw.congestion {
        None => d.congestion,
        Some(c) => match c.get_ref().as_str() {
            "cubic" => Congestion::Cubic,
            "new_reno" | "newreno" => Congestion::NewReno,
            "bbr" => Congestion::Bbr,
            other => {
                b.err(
                    Some(c.span()),
                    format!("{key}.quic.congestion"),
                    format!("unknown congestion controller {other:?} (expected \"cubic\", \"new_reno\" or \"bbr\")"),
                );
                d.congestion
            }
        },
    };
    let threshold = b
        .int(
            &raw.retry_threshold,
            &format!("{key}.quic.retry_threshold"),
            1,
            1_000_000,
        )
        .map_or(64, |n| n as usize);
    let retry = match &raw.retry {
        None => RetryPolicy::UnderLoad(threshold),
        Some(r) => match r.get_ref().as_str() {
            "always" => RetryPolicy::Always,
            "under_load" => RetryPolicy::UnderLoad(threshold),
            "never" => RetryPolicy::Never,
            other => {
                b.err(
                    Some(r.span()),
                    format!("{key}.quic.retry"),
                    format!("unknown retry policy {other:?} (expected \"under_load\", \"always\" or \"never\")"),
                );
                d.retry
            }
        },
    };
    if raw.retry_threshold.is_some() && !matches!(retry, RetryPolicy::UnderLoad(_)) {
        b.warnings.push(format!(
            "{key}.quic.retry_threshold only applies with retry = \"under_load\"; it is ignored"
        ));
    }
    Some(QuicConfig {
        zero_rtt: raw.zero_rtt.as_ref().is_some_and(|z| *z.get_ref()),
        congestion,
        // 1200 is QUIC's minimum; 65527 the most a UDP datagram carries.
        max_udp_payload: b
            .int(
                &raw.max_udp_payload,
                &format!("{key}.quic.max_udp_payload"),
                1200,
                65527,
            )
            .map_or(d.max_udp_payload, |n| n as u16),
        retry,
        alt_svc_max_age: b.duration(
            &raw.alt_svc_max_age,
            &format!("{key}.quic.alt_svc_max_age"),
            d.alt_svc_max_age,
        ),
    })
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
    let max_connections_per_client = b
        .int(
            &raw.max_connections_per_client,
            &format!("{key}.limits.max_connections_per_client"),
            1,
            10_000_000,
        )
        .and_then(|n| NonZeroUsize::new(n as usize));
    Limits {
        max_connections,
        max_connections_per_client,
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
        max_request_body: b
            .body_limit(
                &raw.max_request_body,
                &format!("{key}.limits.max_request_body"),
            )
            .flatten(),
    }
}

fn build_tls(
    b: &mut Builder<'_>,
    server: &ServerConfig,
    key: &str,
    listener: &str,
    raw: Spanned<RawTls>,
) -> Option<TlsConfig> {
    let raw = raw.into_inner();
    let mut versions = Vec::new();
    for (i, v) in raw.versions.iter().flat_map(|l| l.get_ref()).enumerate() {
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
    match &raw.versions {
        None => versions.push(TlsVersion::Tls13),
        Some(list) if list.get_ref().is_empty() => b.err(
            Some(list.span()),
            format!("{key}.versions"),
            "at least one TLS version is needed",
        ),
        Some(_) => {}
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
        Some(spanned) => {
            let list = spanned.get_ref();
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
            if list.is_empty() {
                b.err(
                    Some(spanned.span()),
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
    let ocsp_path = raw.ocsp_response.as_ref().map(|p| b.path(p.get_ref()));
    let mut client_auth = client_auth_spec(b, key, &raw);

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
                "{key}: {} does not exist yet; `wraith serve` will create development certificates in {} (checked with a stand-in set)",
                cert_path.display(),
                dir.display()
            ));
            if b.stand_in.is_none() {
                match StandIn::new(dir) {
                    Ok(s) => b.stand_in = Some(s),
                    Err(e) => {
                        b.err(Some(raw.cert.span()), format!("{key}.cert"), e);
                        return None;
                    }
                }
            }
        }
    }

    let certified_key =
        match tls::load_certified_key(&b.read_path(&cert_path), &b.read_path(&key_path)) {
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
    // The staple is checked against the certificate just loaded: without one there is
    // nothing to check it against (the certificate's error is reported already).
    let mut staple = None;
    if let (Some(path), Some(ck), Some(raw_path)) = (&ocsp_path, &certified_key, &raw.ocsp_response)
    {
        match ocsp::load(path, &cert_path, &ck.cert) {
            Ok(loaded) => {
                let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
                // Named by listener too: the warnings are about time running out, and an
                // operator reading a log wants the listener, not its position in the file.
                for w in loaded.warnings(path, now) {
                    b.warnings
                        .push(format!("{key}.ocsp_response (listener {listener:?}): {w}"));
                }
                staple = Some(loaded);
            }
            Err(m) => b.err(Some(raw_path.span()), format!("{key}.ocsp_response"), m),
        }
    }
    load_client_auth(b, key, &raw, &mut client_auth);
    certified_key.map(|ck| TlsConfig {
        cert_path,
        key_path,
        ocsp_path,
        ocsp: staple,
        versions,
        alpn,
        key_exchange,
        handshake_timeout,
        certified_key: Some(ck),
        client_auth,
    })
}

/// `client_auth`, `client_ca`, `client_crl`, `client_max_chain_depth` (files not read yet).
fn client_auth_spec(b: &mut Builder<'_>, key: &str, raw: &RawTls) -> ClientAuth {
    let mode = match raw.client_auth.as_ref() {
        None => ClientAuthMode::None,
        Some(m) => match m.get_ref().as_str() {
            "none" => ClientAuthMode::None,
            "optional" => ClientAuthMode::Optional,
            "require" => ClientAuthMode::Require,
            other => {
                b.err(
                    Some(m.span()),
                    format!("{key}.client_auth"),
                    format!("unknown client_auth {other:?} (expected \"require\", \"optional\" or \"none\")"),
                );
                ClientAuthMode::None
            }
        },
    };
    let paths = |b: &Builder<'_>, v: &Option<Spanned<OneOrMany>>| -> Vec<PathBuf> {
        v.iter()
            .flat_map(|v| v.get_ref().items())
            .map(|p| b.path(p))
            .collect()
    };
    let ca_paths = paths(b, &raw.client_ca);
    let crl_paths = paths(b, &raw.client_crl);
    if mode != ClientAuthMode::None && ca_paths.is_empty() {
        b.err(
            raw.client_auth.as_ref().map(|m| m.span()),
            format!("{key}.client_ca"),
            "client_auth needs client_ca: the CA bundle(s) that client certificates must chain to",
        );
    }
    if mode == ClientAuthMode::None {
        for (name, v) in [
            ("client_ca", &raw.client_ca),
            ("client_crl", &raw.client_crl),
        ] {
            if let Some(v) = v {
                b.err(
                    Some(v.span()),
                    format!("{key}.{name}"),
                    format!(
                        "{name} has no effect without client_auth = \"require\" or \"optional\""
                    ),
                );
            }
        }
    }
    let max_chain_depth = b
        .int(
            &raw.client_max_chain_depth,
            &format!("{key}.client_max_chain_depth"),
            1,
            16,
        )
        .map_or(ClientAuth::default().max_chain_depth, |n| n as usize);
    let mut trust_domain_paths = Vec::new();
    if let Some(domains) = &raw.client_trust_domains {
        if mode == ClientAuthMode::None {
            b.err(
                Some(domains.span()),
                format!("{key}.client_trust_domains"),
                "client_trust_domains has no effect without client_auth = \"require\" or \"optional\"",
            );
        }
        for (domain, files) in domains.get_ref() {
            let valid = crate::identity::split_spiffe(&format!("spiffe://{domain}"))
                .is_ok_and(|(_, path)| path.is_empty());
            if !valid || domain.is_empty() {
                b.err(
                    Some(domains.span()),
                    format!("{key}.client_trust_domains.{domain}"),
                    format!("{domain:?} is not a SPIFFE trust domain (lowercase letters, digits, '.', '-', '_')"),
                );
                continue;
            }
            let paths: Vec<PathBuf> = files.items().into_iter().map(|p| b.path(p)).collect();
            trust_domain_paths.push((domain.clone(), paths));
        }
    }
    ClientAuth {
        mode,
        ca_paths,
        crl_paths,
        max_chain_depth,
        trust_domain_paths,
        ..ClientAuth::default()
    }
}

/// Reads the client CA bundles and CRLs of a listener.
fn load_client_auth(b: &mut Builder<'_>, key: &str, raw: &RawTls, auth: &mut ClientAuth) {
    if auth.mode == ClientAuthMode::None {
        return;
    }
    let ca_span = raw.client_ca.as_ref().map(|v| v.span());
    for path in auth.ca_paths.clone() {
        match tls::load_certs(&b.read_path(&path)) {
            Ok(certs) => auth.cas.extend(certs),
            Err(m) => b.err(ca_span.clone(), format!("{key}.client_ca"), m),
        }
    }
    let crl_span = raw.client_crl.as_ref().map(|v| v.span());
    for path in auth.crl_paths.clone() {
        match tls::load_crls(&path) {
            Ok((crls, warnings)) => {
                auth.crls.extend(crls);
                b.warnings.extend(
                    warnings
                        .into_iter()
                        .map(|w| format!("{key}.client_crl: {w}")),
                );
            }
            Err(m) => b.err(crl_span.clone(), format!("{key}.client_crl"), m),
        }
    }
    let td_span = raw.client_trust_domains.as_ref().map(|v| v.span());
    for (domain, paths) in auth.trust_domain_paths.clone() {
        let mut bundle = Vec::new();
        for path in &paths {
            match tls::load_certs(&b.read_path(path)) {
                Ok(certs) => bundle.extend(certs),
                Err(m) => b.err(
                    td_span.clone(),
                    format!("{key}.client_trust_domains.{domain}"),
                    m,
                ),
            }
        }
        // client_ca stays the one list of who may connect at all.
        if bundle.iter().any(|c| !auth.cas.contains(c)) {
            b.err(
                td_span.clone(),
                format!("{key}.client_trust_domains.{domain}"),
                "every CA named here must also be in client_ca",
            );
        }
        auth.trust_domains.push((domain, bundle));
    }
    if let Err(m) = tls::client_verifier(auth) {
        b.err(ca_span, format!("{key}.client_ca"), m);
    }
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
    policy: Option<&PolicyConfig>,
    raw: Vec<(usize, RawRoute)>,
    redis: bool,
) -> Vec<RouteConfig> {
    let mut out = Vec::new();
    let mut names = HashMap::new();
    for (i, r) in raw {
        let key = format!("route[{i}]");
        check_name(b, &r.name, &format!("{key}.name"), &mut names);
        let (policy_set, policy_mode) = route_policy(b, &key, &r, policy);
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
                    check_path(b, &s, &format!("{key}.path.prefix"), true);
                    PathMatch::Prefix(s.into_inner())
                } else if let Some(s) = p.exact {
                    check_path(b, &s, &format!("{key}.path.exact"), false);
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
        if let Some(list) = r.methods.as_ref().filter(|l| l.get_ref().is_empty()) {
            b.err(
                Some(list.span()),
                format!("{key}.methods"),
                "an empty list matches no request: leave methods out to match every method",
            );
        }
        let methods = r.methods.as_ref().map(|list| {
            let mut out = Vec::new();
            for (j, m) in list.get_ref().iter().enumerate() {
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
        let request_headers = build_header_ops(
            b,
            &format!("{key}.request_headers"),
            r.request_headers,
            false,
        );
        let response_headers = build_header_ops(
            b,
            &format!("{key}.response_headers"),
            r.response_headers,
            true,
        );
        let response_timeout = r.response_timeout.as_ref().map(|_| {
            b.duration(
                &r.response_timeout,
                &format!("{key}.response_timeout"),
                Duration::from_secs(60),
            )
        });
        let rate_limits = r.rate_limits.map(|list| {
            super::security::build_limits(b, &format!("{key}.rate_limits"), list, redis)
        });
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
        let mut tags = Vec::new();
        for (j, t) in r.tags.iter().flatten().enumerate() {
            if t.get_ref().is_empty() {
                b.err(Some(t.span()), format!("{key}.tags[{j}]"), "empty tag");
            }
            tags.push(t.get_ref().clone());
        }
        let early_data = r.early_data.as_ref().is_some_and(|e| *e.get_ref());
        let max_request_body =
            b.body_limit(&r.max_request_body, &format!("{key}.max_request_body"));
        out.push(RouteConfig {
            max_request_body,
            early_data,
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
            tags,
            policy: policy_set,
            policy_mode,
        });
    }
    out
}

/// A route's `policy` (set name, checked against `[policy]`) and `policy_mode`.
fn route_policy(
    b: &mut Builder<'_>,
    key: &str,
    r: &RawRoute,
    policy: Option<&PolicyConfig>,
) -> (Option<String>, Option<crate::policy::PolicyMode>) {
    let set = r.policy.as_ref().map(|p| p.get_ref().clone());
    match (&r.policy, policy) {
        (Some(p), None) => b.err(
            Some(p.span()),
            format!("{key}.policy"),
            format!(
                "policy set {:?} named but there is no [policy] section",
                p.get_ref()
            ),
        ),
        (Some(p), Some(pc)) if !pc.sets.iter().any(|s| s.name == *p.get_ref()) => b.err(
            Some(p.span()),
            format!("{key}.policy"),
            format!(
                "unknown policy set {:?} (defined: {})",
                p.get_ref(),
                pc.sets
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        _ => {}
    }
    let mode =
        r.policy_mode
            .as_ref()
            .and_then(|m| match crate::policy::PolicyMode::parse(m.get_ref()) {
                Some(mode) => {
                    if mode == crate::policy::PolicyMode::Shadow {
                        b.warnings.push(format!(
                        "{key} ({}): policy_mode = \"shadow\": denials are logged, not enforced",
                        r.name.get_ref()
                    ));
                    }
                    Some(mode)
                }
                None => {
                    b.err(
                        Some(m.span()),
                        format!("{key}.policy_mode"),
                        format!(
                            "unknown mode {:?} (expected \"enforce\" or \"shadow\")",
                            m.get_ref()
                        ),
                    );
                    None
                }
            });
    (set, mode)
}

/// `[policy]`: resolves the directory and sets, then loads and validates every policy file.
fn build_policy(b: &mut Builder<'_>, raw: RawPolicy) -> Option<PolicyConfig> {
    use crate::policy::load::{self, PolicyMode, SetSpec};
    let dir = b.path(
        raw.dir
            .as_ref()
            .map_or("policies", |d| d.get_ref().as_str()),
    );
    let utc_offset = match &raw.utc_offset {
        None => 0,
        Some(s) => match crate::policy::entities::parse_utc_offset(s.get_ref()) {
            Ok(o) => o,
            Err(m) => {
                b.err(Some(s.span()), "policy.utc_offset", m);
                0
            }
        },
    };
    let mut sets = Vec::new();
    match &raw.set {
        None => sets.push(SetSpec {
            name: "default".into(),
            files: None,
            mode: PolicyMode::Enforce,
        }),
        Some(list) => {
            for (i, s) in list.iter().enumerate() {
                let key = format!("policy.set[{i}]");
                let span = s.span();
                let s = s.get_ref();
                let name = s.name.get_ref().clone();
                if name.is_empty() || sets.iter().any(|x: &SetSpec| x.name == name) {
                    b.err(
                        Some(s.name.span()),
                        format!("{key}.name"),
                        format!("empty or duplicate policy set name {name:?}"),
                    );
                }
                let mode = match &s.mode {
                    None => PolicyMode::Enforce,
                    Some(m) => match PolicyMode::parse(m.get_ref()) {
                        Some(PolicyMode::Shadow) => {
                            b.warnings.push(format!(
                                "policy set {name:?} is in shadow mode: denials are logged, not enforced"
                            ));
                            PolicyMode::Shadow
                        }
                        Some(mode) => mode,
                        None => {
                            b.err(
                                Some(m.span()),
                                format!("{key}.mode"),
                                format!(
                                    "unknown mode {:?} (expected \"enforce\" or \"shadow\")",
                                    m.get_ref()
                                ),
                            );
                            PolicyMode::Enforce
                        }
                    },
                };
                let files = s.files.as_ref().map(|files| {
                    let mut out = Vec::new();
                    for (j, f) in files.iter().enumerate() {
                        let p = Path::new(f.get_ref());
                        let path = if p.is_absolute() {
                            p.to_path_buf()
                        } else {
                            dir.join(p)
                        };
                        if !path.is_file() {
                            b.err(
                                Some(f.span()),
                                format!("{key}.files[{j}]"),
                                format!("policy file {} does not exist", path.display()),
                            );
                            continue;
                        }
                        out.push(path);
                    }
                    out
                });
                if s.files.as_ref().is_some_and(|f| f.is_empty()) {
                    b.err(
                        Some(span.clone()),
                        format!("{key}.files"),
                        "a policy set needs at least one file",
                    );
                }
                sets.push(SetSpec { name, files, mode });
            }
        }
    }
    let default_set = raw
        .default_set
        .as_ref()
        .map_or("default".to_string(), |d| d.get_ref().clone());
    if !sets.iter().any(|s| s.name == default_set) {
        b.err(
            raw.default_set.as_ref().map(|d| d.span()),
            "policy.default_set",
            format!(
                "the default policy set {default_set:?} is not defined (defined: {})",
                sets.iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if !dir.is_dir() {
        b.err(
            raw.dir.as_ref().map(|d| d.span()),
            "policy.dir",
            format!("policy directory {} does not exist", dir.display()),
        );
        return None;
    }
    // The schema file beside the policies is for editors and the cedar CLI; Wraith uses its
    // built-in schema, so a stale copy would mislead whoever reads it.
    let schema_file = dir.join("wraith.cedarschema");
    if let Ok(text) = crate::files::read_to_string(&schema_file, crate::files::SMALL) {
        if text.trim() != load::SCHEMA.trim() {
            b.warnings.push(format!(
                "{} differs from the schema this Wraith uses; regenerate it with `wraith policy schema > {}`",
                schema_file.display(),
                schema_file.display()
            ));
        }
    }
    let compiled = match load::compile_on_own_stack(&dir, &sets) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                b.errors.push(ConfigError {
                    location: e.line.map(|line| super::Location {
                        file: e.file.clone(),
                        line,
                        column: e.column.unwrap_or(1),
                    }),
                    key: if e.line.is_some() {
                        "policy".into()
                    } else {
                        format!("policy ({})", e.file.display())
                    },
                    message: e.message,
                });
            }
            return None;
        }
    };
    if compiled.policies.is_empty() {
        b.warnings.push(format!(
            "no policies in {}: every routed request is denied",
            dir.display()
        ));
    }
    Some(PolicyConfig {
        dir,
        default_set,
        utc_offset,
        sets,
        compiled: Arc::new(compiled),
    })
}

/// A route's path must start with `/` and be a path requests can have once normalized. A
/// prefix may end inside a segment (`/.` matches `/.env`, `/.git/`): a trailing `.` or `..`
/// there is the start of a name, not a dot segment, so it is checked as if a name followed.
fn check_path(b: &mut Builder<'_>, s: &Str, key: &str, prefix: bool) {
    let p = s.get_ref();
    if !p.starts_with('/') {
        b.err(
            Some(s.span()),
            key,
            format!("path {p:?} must start with '/'"),
        );
    } else if let Some(why) = crate::proxy::path::refused(p) {
        b.err(
            Some(s.span()),
            key,
            format!("path {p:?} can never match: requests like it are refused ({why})"),
        );
    } else if let Some(normal) = if prefix {
        crate::proxy::path::normalize(&format!("{p}x"))
            .map(|n| n.strip_suffix('x').unwrap_or(&n).to_string())
    } else {
        crate::proxy::path::normalize(p)
    } {
        // Requests are routed by their normalized path: this one would never match.
        b.err(
            Some(s.span()),
            key,
            format!("path {p:?} can never match: requests are routed by their normalized path; write {normal:?}"),
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
        if refuse_framing(b, &format!("{key}.headers"), name) {
            continue;
        }
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

/// A framing header (`Content-Length`, `Transfer-Encoding`) given for a response: an error
/// at its name (Wraith frames every response from its body). True when refused.
fn refuse_framing(b: &mut Builder<'_>, key: &str, name: &Str) -> bool {
    let n = name.get_ref().to_ascii_lowercase();
    if n == "content-length" || n == "transfer-encoding" {
        b.err(
            Some(name.span()),
            format!("{key}.{n}"),
            format!("{n} cannot be set: Wraith frames every response from its body"),
        );
        return true;
    }
    false
}

/// A route's request edits cannot set the identity headers (`x-forwarded-client-cert`,
/// `x-wraith-*`): upstreams take them for a verified client certificate, so one set here
/// would name every anonymous client of the route as whoever it says.
fn refuse_identity(b: &mut Builder<'_>, key: &str, name: &Str) -> bool {
    if !crate::proxy::headers::is_identity_header(name.get_ref()) {
        return false;
    }
    let n = name.get_ref().to_ascii_lowercase();
    b.err(
        Some(name.span()),
        format!("{key}.{n}"),
        format!(
            "{n} cannot be set by a route: it carries the verified client certificate's identity, and only the TLS handshake sets it"
        ),
    );
    true
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

/// `response`: the operations apply to responses, whose framing they may not touch.
fn build_header_ops(
    b: &mut Builder<'_>,
    key: &str,
    raw: Option<RawHeaderOps>,
    response: bool,
) -> HeaderOps {
    let Some(raw) = raw else {
        return HeaderOps::default();
    };
    let mut ops = HeaderOps::default();
    // A response's framing is the body's own: a Content-Length set here would contradict
    // the body actually sent, and every client would get a broken response.
    for (name, value) in raw.set.iter().flatten() {
        if response && refuse_framing(b, &format!("{key}.set"), name) {
            continue;
        }
        if !response && refuse_identity(b, &format!("{key}.set"), name) {
            continue;
        }
        ops.set
            .extend(header_pair(b, &format!("{key}.set"), name, value));
    }
    for (name, value) in raw.add.iter().flatten() {
        if response && refuse_framing(b, &format!("{key}.add"), name) {
            continue;
        }
        if !response && refuse_identity(b, &format!("{key}.add"), name) {
            continue;
        }
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

/// The key path of the innermost value under `value` (itself at `key`) whose text holds
/// byte `at`, the place of a deserialization error: a type error in a route names
/// `route[3].strip_prefix`, not only `route[3]`.
fn key_at(value: &Spanned<DeValue<'_>>, at: usize, key: &str) -> String {
    use std::fmt::Write;
    let holds = |v: &Spanned<DeValue<'_>>| v.span().contains(&at);
    let mut path = key.to_string();
    let mut v = value;
    loop {
        match v.get_ref() {
            DeValue::Table(t) => match t.iter().find(|(_, x)| holds(x)) {
                Some((k, x)) => {
                    path.push('.');
                    path.push_str(k.get_ref());
                    v = x;
                }
                None => return path,
            },
            DeValue::Array(a) => match a.iter().position(holds) {
                Some(i) => {
                    let _ = write!(path, "[{i}]");
                    v = &a[i];
                }
                None => return path,
            },
            _ => return path,
        }
    }
}
