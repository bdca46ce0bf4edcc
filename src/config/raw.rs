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
}

/// `[listener.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Str,
    pub key: Str,
    pub versions: Option<Vec<Str>>,
    pub alpn: Option<Vec<Str>>,
    pub key_exchange: Option<Vec<Str>>,
    pub handshake_timeout: Option<Str>,
    pub client_auth: Option<Str>,
    pub client_ca: Option<Spanned<OneOrMany>>,
    pub client_crl: Option<Spanned<OneOrMany>>,
    pub client_max_chain_depth: Option<Spanned<i64>>,
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
    pub header_read_timeout: Option<Str>,
    pub idle_timeout: Option<Str>,
    pub max_header_size: Option<Str>,
    pub max_headers: Option<Spanned<i64>>,
    pub max_concurrent_streams: Option<Spanned<i64>>,
}

/// `[[upstream]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Str,
    pub endpoints: Spanned<Vec<Str>>,
    pub protocol: Option<Str>,
    pub connect_timeout: Option<Str>,
    pub response_timeout: Option<Str>,
    pub idle_timeout: Option<Str>,
    pub max_idle_per_endpoint: Option<Spanned<i64>>,
}

/// `[[route]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Str,
    pub host: Option<Str>,
    pub path: Option<Spanned<RawPath>>,
    pub methods: Option<Vec<Str>>,
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
