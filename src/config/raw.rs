//! The raw layer: a serde mirror of `wraith.toml`, with `deny_unknown_fields` everywhere and
//! `Spanned` on every value whose meaning is checked later, so `build` can point at the exact
//! line and column of a bad duration, regex or reference.
//!
//! Nothing here is interpreted; `build.rs` turns these into typed values.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A string value with its position in the file.
pub type Str = Spanned<String>;

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub worker_threads: Option<Spanned<i64>>,
    pub shutdown_timeout: Option<Str>,
    pub pid_file: Option<Str>,
    pub admin_socket: Option<Str>,
    pub trusted_proxies: Option<Vec<Str>>,
    pub dev_certs_dir: Option<Str>,
    pub log_level: Option<Str>,
    pub log_format: Option<Str>,
}

/// `[[listener]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Str,
    pub address: Str,
    pub protocol: Str,
    pub tls: Option<Spanned<RawTls>>,
    pub redirect_https: Option<Spanned<RawHttpsRedirect>>,
    pub limits: Option<RawLimits>,
    pub http3: Option<Spanned<bool>>,
    pub quic: Option<Spanned<RawQuic>>,
    pub proxy_protocol: Option<Spanned<bool>>,
}

/// `[listener.quic]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuic {
    pub zero_rtt: Option<Spanned<bool>>,
    pub congestion: Option<Str>,
    pub max_udp_payload: Option<Spanned<i64>>,
    pub retry: Option<Str>,
    pub retry_threshold: Option<Spanned<i64>>,
    pub alt_svc_max_age: Option<Str>,
}

/// `[listener.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Str,
    pub key: Str,
    pub ocsp_response: Option<Str>,
    pub versions: Option<Spanned<Vec<Str>>>,
    pub alpn: Option<Vec<Str>>,
    pub key_exchange: Option<Spanned<Vec<Str>>>,
    pub handshake_timeout: Option<Str>,
    pub client_auth: Option<Str>,
    pub client_ca: Option<Spanned<OneOrMany>>,
    pub client_crl: Option<Spanned<OneOrMany>>,
    pub client_max_chain_depth: Option<Spanned<i64>>,
    pub client_trust_domains: Option<Spanned<std::collections::BTreeMap<String, OneOrMany>>>,
}

/// A path or a list of paths: `"ca.pem"` or `["a.pem", "b.pem"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `[policy]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub dir: Option<Str>,
    pub default_set: Option<Str>,
    pub utc_offset: Option<Str>,
    pub set: Option<Vec<Spanned<RawPolicySet>>>,
}

/// `[[policy.set]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicySet {
    pub name: Str,
    pub files: Option<Vec<Str>>,
    pub mode: Option<Str>,
}

/// `[listener.redirect_https]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpsRedirect {
    pub port: Option<Spanned<i64>>,
    pub status: Option<Spanned<i64>>,
}

/// `[listener.limits]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_client: Option<Spanned<i64>>,
    pub header_read_timeout: Option<Str>,
    pub idle_timeout: Option<Str>,
    pub max_header_size: Option<Str>,
    pub max_headers: Option<Spanned<i64>>,
    pub max_concurrent_streams: Option<Spanned<i64>>,
    pub max_request_body: Option<Str>,
}

/// `[[upstream]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Str,
    pub endpoints: Spanned<Vec<Spanned<RawEndpoint>>>,
    pub protocol: Option<Str>,
    pub algorithm: Option<Str>,
    pub hash_key: Option<Str>,
    pub fail_open: Option<Spanned<bool>>,
    pub connect_timeout: Option<Str>,
    pub response_timeout: Option<Str>,
    pub idle_timeout: Option<Str>,
    pub max_idle_per_endpoint: Option<Spanned<i64>>,
    pub h2_max_streams: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_pending: Option<Spanned<i64>>,
    pub pending_timeout: Option<Str>,
    pub retries: Option<Spanned<i64>>,
    pub try_duration: Option<Str>,
    pub retry_buffer: Option<Str>,
    pub health_check: Option<Spanned<RawHealthCheck>>,
    pub outlier: Option<Spanned<RawOutlier>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
}

/// An endpoint: `"host:port"` or `{ address = "host:port", weight = 3, max_connections = 100 }`.
#[derive(Debug)]
pub enum RawEndpoint {
    Address(String),
    Table(RawEndpointTable),
}

impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // By hand rather than `untagged`, so a bad table reports its own error
        // (e.g. an unknown key) instead of "did not match any variant".
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawEndpoint;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "\"host:port\" or { address = \"host:port\", weight = N, max_connections = N }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawEndpoint, E> {
                Ok(RawEndpoint::Address(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawEndpoint, A::Error> {
                RawEndpointTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawEndpoint::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// The table form of an endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpointTable {
    pub address: String,
    pub weight: Option<i64>,
    pub max_connections: Option<i64>,
}

/// `[upstream.health_check]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Option<Str>,
    pub host: Option<Str>,
    pub interval: Option<Str>,
    pub timeout: Option<Str>,
    pub expect_status: Option<Str>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub jitter: Option<Str>,
}

/// `[upstream.outlier]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub base_ejection_time: Option<Str>,
    pub max_ejection_time: Option<Str>,
    pub max_ejected_percent: Option<Spanned<i64>>,
}

/// `[upstream.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: Option<Str>,
    pub cert: Option<Str>,
    pub key: Option<Str>,
    pub server_name: Option<Str>,
}

/// `[[route]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Str,
    pub host: Option<Str>,
    pub path: Option<Spanned<RawPath>>,
    pub methods: Option<Spanned<Vec<Str>>>,
    pub upstream: Option<Str>,
    pub respond: Option<Spanned<RawRespond>>,
    pub redirect: Option<Spanned<RawRedirect>>,
    pub strip_prefix: Option<Spanned<bool>>,
    pub request_headers: Option<RawHeaderOps>,
    pub response_headers: Option<RawHeaderOps>,
    pub response_timeout: Option<Str>,
    pub tags: Option<Vec<Str>>,
    pub policy: Option<Str>,
    pub policy_mode: Option<Str>,
    pub rate_limits: Option<Vec<Spanned<RawLimit>>>,
    pub compression: Option<Spanned<RawCompression>>,
    pub early_data: Option<Spanned<bool>>,
    pub max_request_body: Option<Str>,
}

/// `compression = true` or `compression = { algorithms = [...], min_size = "1KiB", types = [...] }`.
#[derive(Debug)]
pub enum RawCompression {
    Enabled(bool),
    Table(RawCompressionTable),
}

impl<'de> Deserialize<'de> for RawCompression {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawCompression;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "true, false or { algorithms = [...], min_size = \"1KiB\", types = [...] }",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawCompression, E> {
                Ok(RawCompression::Enabled(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawCompression, A::Error> {
                RawCompressionTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawCompression::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// The table form of `compression`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompressionTable {
    pub algorithms: Option<Vec<String>>,
    pub min_size: Option<String>,
    pub types: Option<Vec<String>>,
}

/// `path = { prefix = "/api/" }` (exactly one of the three).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPath {
    pub prefix: Option<Str>,
    pub exact: Option<Str>,
    pub regex: Option<Str>,
}

/// `respond = { status = 200, body = "ok", headers = { ... } }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRespond {
    pub status: Option<Spanned<i64>>,
    pub body: Option<String>,
    pub content_type: Option<Str>,
    pub headers: Option<BTreeMap<Str, Str>>,
}

/// `redirect = { to = "https://example.com{path}", status = 301 }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    pub to: Str,
    pub status: Option<Spanned<i64>>,
}

/// `request_headers = { set = {...}, add = {...}, remove = [...] }`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderOps {
    pub set: Option<BTreeMap<Str, Str>>,
    pub add: Option<BTreeMap<Str, Str>>,
    pub remove: Option<Vec<Str>>,
}

/// `[log]`: access-log sinks and what they record.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub query: Option<Str>,
    pub redact_params: Option<Vec<Str>>,
    pub json: Option<Spanned<RawFileSink>>,
    pub combined: Option<Spanned<RawCombinedSink>>,
    pub sqlite: Option<Spanned<RawSqliteSink>>,
    pub events: Option<Spanned<RawFileSink>>,
}

/// `[log.json]`, `[log.events]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileSink {
    pub path: Str,
    pub queue: Option<Spanned<i64>>,
}

/// `[log.combined]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCombinedSink {
    pub path: Str,
    pub queue: Option<Spanned<i64>>,
    pub vhost: Option<bool>,
}

/// `[log.sqlite]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSqliteSink {
    pub path: Str,
    pub queue: Option<Spanned<i64>>,
    pub batch: Option<Spanned<i64>>,
    pub max_age: Option<Str>,
    pub max_rows: Option<Spanned<i64>>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub address: Option<Str>,
    pub path: Option<Str>,
}

/// `[decisions]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDecisions {
    pub state_file: Option<Str>,
    pub fallback: Option<Str>,
    pub check_at_accept: Option<Spanned<bool>>,
    pub max_local: Option<Spanned<i64>>,
}

/// `[crowdsec]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCrowdsec {
    pub lapi_url: Str,
    pub api_key: Option<Str>,
    pub api_key_file: Option<Str>,
    pub api_key_env: Option<Str>,
    pub ca_cert: Option<Str>,
    pub client_cert: Option<Str>,
    pub client_key: Option<Str>,
    pub update_frequency: Option<Str>,
    pub resync_interval: Option<Str>,
    pub timeout: Option<Str>,
    pub scopes: Option<Vec<Str>>,
    pub origins: Option<Vec<Str>>,
    pub on_error: Option<Str>,
    pub max_staleness: Option<Str>,
    pub max_decisions: Option<Spanned<i64>>,
    pub appsec: Option<Spanned<RawAppsec>>,
}

/// `[crowdsec.appsec]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppsec {
    pub url: Str,
    pub timeout: Option<Str>,
    pub on_error: Option<Str>,
    pub max_body: Option<Str>,
}

/// `[rate_limit]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub max_keys: Option<Spanned<i64>>,
    pub cleanup_interval: Option<Str>,
    pub limits: Option<Vec<Spanned<RawLimit>>>,
    pub redis: Option<Spanned<RawRedis>>,
}

/// `[rate_limit.redis]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Str,
    pub password_file: Option<Str>,
    /// `rediss://` only: the CA bundle Redis's certificate must chain to.
    pub ca: Option<Str>,
    /// `rediss://` only: a client certificate chain and its key (mTLS to Redis).
    pub cert: Option<Str>,
    pub key: Option<Str>,
    /// `rediss://` only: the name sent as SNI and verified in Redis's certificate.
    pub server_name: Option<Str>,
    pub timeout: Option<Str>,
    pub on_error: Option<Str>,
    pub key_prefix: Option<Str>,
}

/// One limit: `{ name = "per-ip", key = "ip", rate = "100/s", burst = 200 }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub name: Option<Str>,
    pub key: Str,
    pub header: Option<Str>,
    pub rate: Str,
    pub burst: Option<Spanned<i64>>,
    pub mode: Option<Str>,
    pub shared: Option<Spanned<bool>>,
}
