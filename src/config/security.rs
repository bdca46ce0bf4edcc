//! The typed settings of the refusal stages: `[decisions]`, `[crowdsec]` (+ `.appsec`),
//! `[rate_limit]` and per-route `rate_limits`. Built from the
//! raw mirror with every problem reported at its position, like the rest of the config.

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use toml::Spanned;

use super::build::Builder;
use super::build::{build_client_tls, UpstreamTls};
use super::raw::{
    RawAppsec, RawCrowdsec, RawDecisions, RawLimit, RawRateLimit, RawRedis, RawUpstreamTls,
};
use crate::decisions::Scope;

/// `[decisions]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionsConfig {
    /// Where local decisions (admin API, Wazuh) are kept across restarts (default
    /// `decisions.json` beside the config file); `None` keeps them in memory only.
    pub state_file: Option<PathBuf>,
    /// What `captcha` and other non-`ban` decision types do (Wraith has no captcha page).
    pub fallback: Fallback,
    /// Close banned peers' connections at accept, before the TLS handshake.
    pub check_at_accept: bool,
    /// The most local decisions held (admin API, Wazuh): adding past it is refused.
    pub max_local: usize,
}

impl Default for DecisionsConfig {
    fn default() -> Self {
        DecisionsConfig {
            state_file: None,
            fallback: Fallback::Ban,
            check_at_accept: true,
            max_local: 100_000,
        }
    }
}

/// The remediation for decision types other than `ban`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Treat them as bans (the safe default, as lua-cs-bouncer does).
    Ban,
    /// Ignore them.
    Allow,
}

/// What a bridge does when its source cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Keep serving (with the decisions already known).
    Open,
    /// Refuse requests (503) until the source answers again.
    Closed,
}

/// A secret read from the config, a file or the environment; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// `[crowdsec]`: the LAPI bouncer bridge.
#[derive(Debug, Clone, PartialEq)]
pub struct CrowdsecConfig {
    /// Base URL of the LAPI, e.g. `http://127.0.0.1:8080` (no trailing slash).
    pub lapi_url: String,
    /// The bouncer API key (`X-Api-Key`); `None` when a client certificate authenticates.
    pub api_key: Option<Secret>,
    /// CA bundle to verify an `https` LAPI (default: the system roots).
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key for LAPI mTLS (OU in the LAPI's `bouncers_allowed_ou`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// How often to poll the stream for changes.
    pub update_frequency: Duration,
    /// How often to fetch a full snapshot (`startup=true`) and replace the cache.
    pub resync_interval: Duration,
    /// Timeout of one LAPI request.
    pub timeout: Duration,
    /// Decision scopes to ask for (Wraith enforces `ip` and `range`).
    pub scopes: Vec<Scope>,
    /// Only decisions from these origins (`crowdsec`, `cscli`, `CAPI`, `lists`, ...);
    /// `None`: all.
    pub origins: Option<Vec<String>>,
    /// What happens when the LAPI cannot be reached for longer than `max_staleness`.
    pub on_error: OnError,
    /// How old the last successful pull may get before `on_error` applies.
    pub max_staleness: Duration,
    /// The most decisions taken from the LAPI; an answer that would hold more is refused.
    pub max_decisions: usize,
    /// AppSec (WAF) forwarding, CrowdSec >= 1.6.
    pub appsec: Option<AppsecConfig>,
}

/// `[crowdsec.appsec]`
#[derive(Debug, Clone, PartialEq)]
pub struct AppsecConfig {
    /// The AppSec listener, e.g. `http://127.0.0.1:7422/`.
    pub url: String,
    /// Timeout of one inspection.
    pub timeout: Duration,
    /// What happens when the AppSec component fails or is unreachable.
    pub on_error: OnError,
    /// Request bodies up to this size are sent for inspection (larger ones are refused 413).
    pub max_body: usize,
}

/// `[rate_limit]`: defaults for routes without their own `rate_limits`, and limiter upkeep.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitSettings {
    /// Keys tracked per limit; past this, new keys share 64 overflow buckets and wake the
    /// cleanup.
    pub max_keys: NonZeroUsize,
    /// How often idle keys are dropped (`retain_recent`).
    pub cleanup_interval: Duration,
    /// The default limits.
    pub limits: Vec<RateLimitConfig>,
    /// Where `shared` limits keep their buckets.
    pub redis: Option<RedisSettings>,
}

/// `[rate_limit.redis]`: the Redis server in which limits with `shared = true` count, so that
/// every Wraith instance using it enforces one budget. (Its `Debug` leaves out the URL's
/// credentials, as `Secret` does the password file's.)
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS.
    pub url: String,
    /// For a `rediss://` URL: the CA bundle Redis's certificate must chain to (the system's
    /// by default), the client certificate Wraith presents, if any, and the name sent as
    /// SNI and verified (`server_name`; the URL's host by default). Compared by the
    /// files' contents, so a reload after a certificate was replaced connects anew.
    pub tls: Option<UpstreamTls>,
    /// From `password_file` (the URL's own password otherwise).
    pub password: Option<Secret>,
    /// The most a request waits for Redis (connecting included).
    pub timeout: Duration,
    /// What a shared limit does while Redis cannot answer.
    pub on_error: SharedOnError,
    /// Prepended to every key Wraith writes.
    pub key_prefix: String,
}

impl RedisSettings {
    /// The URL without its user name and password (`wraith status`, `Debug`); `None` if it
    /// does not parse.
    pub fn url_without_credentials(&self) -> Option<String> {
        redis::parse_redis_url(&self.url).map(|mut u| {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        })
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field(
                "url",
                &self
                    .url_without_credentials()
                    .unwrap_or_else(|| "(not a URL)".into()),
            )
            .field("tls", &self.tls)
            .field("password", &self.password)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// What a shared limit does while Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedOnError {
    /// Count in this instance alone, with the limit's own rate and burst (each instance
    /// then allows the whole budget).
    Local,
    /// Let requests through unlimited by the shared limits.
    Open,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            max_keys: NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN),
            cleanup_interval: Duration::from_secs(30),
            limits: Vec::new(),
            redis: None,
        }
    }
}

/// One rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimitConfig {
    /// Named in logs and in the `RateLimit-Policy` header.
    pub name: Arc<str>,
    /// What requests are counted by.
    pub key: LimitKey,
    /// `count` requests per `per` (the sustained rate).
    pub count: NonZeroU32,
    pub per: Duration,
    /// Requests allowed at once before the rate applies.
    pub burst: NonZeroU32,
    /// Enforce, or only log what would be refused.
    pub mode: LimitMode,
    /// Counted in Redis (`[rate_limit.redis]`), across every instance that shares it,
    /// instead of in this process.
    pub shared: bool,
}

/// The longest a limit may take to refill its whole burst (`period × burst`). governor keeps
/// time in u64 nanoseconds (584 years) since the limiter started and multiplies the period by
/// the burst unchecked (a panic in debug builds, a wrapped and wrong limit in release ones);
/// 100 years, like the longest duration, leaves the rest for the server's uptime.
pub const MAX_REFILL: Duration = super::units::MAX_DURATION;

impl RateLimitConfig {
    /// The interval in which one request's worth of quota comes back.
    pub fn period(&self) -> Duration {
        self.per / self.count.get()
    }

    /// How long the whole burst takes to come back (`period × burst`); `None` past
    /// `MAX_REFILL`, which the config refuses.
    pub fn refill(&self) -> Option<Duration> {
        self.period()
            .checked_mul(self.burst.get())
            .filter(|d| *d <= MAX_REFILL)
    }

    /// The largest burst this limit's rate can have within `MAX_REFILL` (at least 1).
    pub fn max_burst(&self) -> NonZeroU32 {
        let period = self.period().as_nanos().max(1);
        let n = (MAX_REFILL.as_nanos() / period).min(u128::from(u32::MAX));
        NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN)
    }
}

/// What a rate limit counts by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The client address (IPv6 by /64), after trusted-proxy resolution.
    Ip,
    /// The client certificate: SPIFFE ID, else fingerprint (anonymous clients: by address).
    Identity,
    /// One bucket for the whole route.
    Route,
    /// A header's value, believed only from trusted proxies (others: by address).
    Header(HeaderName),
}

impl LimitKey {
    /// As written in the config.
    pub fn describe(&self) -> String {
        match self {
            LimitKey::Ip => "ip".into(),
            LimitKey::Identity => "identity".into(),
            LimitKey::Route => "route".into(),
            LimitKey::Header(h) => format!("header {h}"),
        }
    }
}

/// Whether a limit refuses or only reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitMode {
    /// Over the limit -> 429.
    Enforce,
    /// Over the limit -> a log line ("would refuse"), the request goes on.
    Shadow,
}

pub(super) fn build_decisions(b: &mut Builder<'_>, raw: RawDecisions) -> DecisionsConfig {
    let d = DecisionsConfig::default();
    let fallback = match raw
        .fallback
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("ban", _)) => Fallback::Ban,
        Some(("allow", _)) => Fallback::Allow,
        Some((other, span)) => {
            b.err(
                Some(span),
                "decisions.fallback",
                format!("unknown fallback {other:?} (expected \"ban\" or \"allow\")"),
            );
            Fallback::Ban
        }
    };
    DecisionsConfig {
        // Default: next to the config file; "" keeps local decisions in memory only.
        state_file: match &raw.state_file {
            None => Some(b.path("decisions.json")),
            Some(p) if p.get_ref().is_empty() => None,
            Some(p) => {
                b.remember("decisions.state_file", p.span());
                Some(b.path(p.get_ref()))
            }
        },
        fallback,
        check_at_accept: raw
            .check_at_accept
            .map_or(d.check_at_accept, |v| *v.get_ref()),
        max_local: b
            .int(&raw.max_local, "decisions.max_local", 1, 10_000_000)
            .map_or(d.max_local, |n| n as usize),
    }
}

fn on_error(b: &mut Builder<'_>, v: &Option<toml::Spanned<String>>, key: &str) -> OnError {
    match v.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
        None | Some(("open", _)) => OnError::Open,
        Some(("closed", _)) => OnError::Closed,
        Some((other, span)) => {
            b.err(
                Some(span),
                key,
                format!("unknown value {other:?} (expected \"open\" or \"closed\")"),
            );
            OnError::Open
        }
    }
}

/// `http://host:port` or `https://...`, without a trailing slash.
fn base_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| format!("invalid URL {s:?} (expected e.g. \"http://127.0.0.1:8080\")"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("URL {s:?} must start with http:// or https://")),
    }
    if uri.host().is_none() {
        return Err(format!("URL {s:?} has no host"));
    }
    // `http::Uri` keeps any digits as the port; 99999 failed only at the first pull.
    if let Some(authority) = uri.authority() {
        // After any userinfo (which can hold a password: never in an error).
        let host_port = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, h)| h);
        let port = host_port.rsplit_once(':').map(|(_, p)| p);
        if let Some(p) = port.filter(|p| !p.contains(']')) {
            if p.parse::<u16>().map_or(true, |n| n == 0) {
                return Err(format!("URL {s:?} has an invalid port {p:?} (1..=65535)"));
            }
        }
    }
    Ok(s.trim_end_matches('/').to_string())
}

pub(super) fn build_crowdsec(
    b: &mut Builder<'_>,
    raw: Spanned<RawCrowdsec>,
) -> Option<CrowdsecConfig> {
    let span = raw.span();
    let raw = raw.into_inner();
    let lapi_url = match base_url(raw.lapi_url.get_ref()) {
        Ok(u) => u,
        Err(m) => {
            b.err(Some(raw.lapi_url.span()), "crowdsec.lapi_url", m);
            String::new()
        }
    };
    // The TLS files must be readable now, so an error names their place in the file (the
    // client built from them says what is wrong with their contents).
    let readable = |b: &mut Builder<'_>, v: &Spanned<String>, key: &str| {
        let path = b.path(v.get_ref());
        if let Err(e) = crate::files::open_regular(&path) {
            b.err(
                Some(v.span()),
                key,
                format!("cannot read {}: {e}", path.display()),
            );
        }
        path
    };
    let ca_cert = raw
        .ca_cert
        .as_ref()
        .map(|p| readable(b, p, "crowdsec.ca_cert"));
    let client_cert = match (&raw.client_cert, &raw.client_key) {
        (Some(c), Some(k)) => Some((
            readable(b, c, "crowdsec.client_cert"),
            readable(b, k, "crowdsec.client_key"),
        )),
        (None, None) => None,
        (Some(s), None) | (None, Some(s)) => {
            b.err(
                Some(s.span()),
                "crowdsec.client_cert",
                "client_cert and client_key go together",
            );
            None
        }
    };
    // The key: exactly one of api_key, api_key_file, api_key_env; else the default env var.
    let given = [
        raw.api_key.is_some(),
        raw.api_key_file.is_some(),
        raw.api_key_env.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given > 1 {
        b.err(
            Some(span.clone()),
            "crowdsec.api_key",
            "give only one of api_key, api_key_file and api_key_env",
        );
    }
    let api_key = if let Some(k) = &raw.api_key {
        Some(Secret(k.get_ref().trim().to_string()))
    } else if let Some(f) = &raw.api_key_file {
        let path = b.path(f.get_ref());
        match crate::files::read_to_string(&path, crate::files::SMALL) {
            Ok(s) => Some(Secret(s.trim().to_string())),
            Err(e) => {
                b.err(
                    Some(f.span()),
                    "crowdsec.api_key_file",
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    } else {
        let (var, span) = match &raw.api_key_env {
            Some(v) => (v.get_ref().clone(), Some(v.span())),
            None => ("WRAITH_CROWDSEC_API_KEY".to_string(), None),
        };
        match std::env::var(&var) {
            Ok(v) if !v.trim().is_empty() => Some(Secret(v.trim().to_string())),
            _ if span.is_some() => {
                b.err(
                    span,
                    "crowdsec.api_key_env",
                    format!("environment variable {var} is not set"),
                );
                None
            }
            _ => None,
        }
    };
    if api_key.as_ref().is_some_and(|k| k.0.is_empty()) {
        b.err(
            Some(span.clone()),
            "crowdsec.api_key",
            "the API key is empty",
        );
    }
    if api_key.is_none() && client_cert.is_none() && given == 0 {
        b.err(
            Some(span.clone()),
            "crowdsec",
            "no bouncer credentials: set api_key, api_key_file, api_key_env (or WRAITH_CROWDSEC_API_KEY), or client_cert/client_key for mTLS",
        );
    }
    let mut scopes = Vec::new();
    for (i, s) in raw.scopes.iter().flatten().enumerate() {
        match Scope::parse(s.get_ref()) {
            Some(sc) if !scopes.contains(&sc) => scopes.push(sc),
            Some(_) => {}
            None => b.err(
                Some(s.span()),
                format!("crowdsec.scopes[{i}]"),
                format!(
                    "unsupported scope {:?}: Wraith enforces \"ip\" and \"range\" (country and AS need GeoIP data it does not have)",
                    s.get_ref()
                ),
            ),
        }
    }
    if raw.scopes.is_none() {
        scopes = vec![Scope::Ip, Scope::Range];
    } else if scopes.is_empty() && raw.scopes.as_ref().is_some_and(|s| s.is_empty()) {
        b.err(
            Some(span.clone()),
            "crowdsec.scopes",
            "at least one scope is needed",
        );
    }
    let origins = raw.origins.as_ref().map(|list| {
        for (i, o) in list.iter().enumerate() {
            let name = o.get_ref();
            if name.is_empty()
                || name
                    .bytes()
                    .any(|c| c == b',' || c.is_ascii_control() || c == b' ')
            {
                b.err(
                    Some(o.span()),
                    format!("crowdsec.origins[{i}]"),
                    format!("{name:?} is not an origin name (e.g. \"crowdsec\", \"cscli\", \"CAPI\", \"lists\")"),
                );
            }
        }
        list.iter().map(|o| o.get_ref().clone()).collect()
    });
    let update_frequency = b.duration(
        &raw.update_frequency,
        "crowdsec.update_frequency",
        Duration::from_secs(10),
    );
    if update_frequency < Duration::from_millis(100) {
        b.err(
            raw.update_frequency.as_ref().map(|s| s.span()),
            "crowdsec.update_frequency",
            "must be at least 100ms",
        );
    }
    let max_staleness = b.duration(
        &raw.max_staleness,
        "crowdsec.max_staleness",
        Duration::from_secs(60),
    );
    if max_staleness < update_frequency {
        b.err(
            raw.max_staleness.as_ref().map(|s| s.span()),
            "crowdsec.max_staleness",
            "must be at least update_frequency",
        );
    }
    let appsec = raw.appsec.map(|a| build_appsec(b, a.into_inner()));
    Some(CrowdsecConfig {
        lapi_url,
        api_key,
        ca_cert,
        client_cert,
        update_frequency,
        resync_interval: b.duration(
            &raw.resync_interval,
            "crowdsec.resync_interval",
            Duration::from_secs(600),
        ),
        timeout: b.duration(&raw.timeout, "crowdsec.timeout", Duration::from_secs(10)),
        scopes,
        origins,
        on_error: on_error(b, &raw.on_error, "crowdsec.on_error"),
        max_staleness,
        max_decisions: b
            .int(&raw.max_decisions, "crowdsec.max_decisions", 1, 100_000_000)
            .unwrap_or(1_000_000) as usize,
        appsec,
    })
}

fn build_appsec(b: &mut Builder<'_>, raw: RawAppsec) -> AppsecConfig {
    let url = match base_url(raw.url.get_ref()) {
        Ok(_) => raw.url.get_ref().clone(),
        Err(m) => {
            b.err(Some(raw.url.span()), "crowdsec.appsec.url", m);
            String::new()
        }
    };
    AppsecConfig {
        url,
        timeout: b.duration(
            &raw.timeout,
            "crowdsec.appsec.timeout",
            Duration::from_millis(500),
        ),
        on_error: on_error(b, &raw.on_error, "crowdsec.appsec.on_error"),
        max_body: b.size(&raw.max_body, "crowdsec.appsec.max_body", 1 << 20) as usize,
    }
}

pub(super) fn build_rate_limit(b: &mut Builder<'_>, raw: RawRateLimit) -> RateLimitSettings {
    let d = RateLimitSettings::default();
    RateLimitSettings {
        max_keys: b
            .int(&raw.max_keys, "rate_limit.max_keys", 1, 100_000_000)
            .and_then(|n| NonZeroUsize::new(n as usize))
            .unwrap_or(d.max_keys),
        cleanup_interval: b.duration(
            &raw.cleanup_interval,
            "rate_limit.cleanup_interval",
            d.cleanup_interval,
        ),
        redis: raw.redis.map(|r| build_redis(b, r)),
        limits: Vec::new(),
    }
    .with_limits(b, raw.limits)
}

impl RateLimitSettings {
    /// The default limits, built once `redis` is known (a shared limit needs it).
    fn with_limits(mut self, b: &mut Builder<'_>, raw: Option<Vec<Spanned<RawLimit>>>) -> Self {
        let redis = self.redis.is_some();
        self.limits = raw
            .map(|l| build_limits(b, "rate_limit.limits", l, redis))
            .unwrap_or_default();
        self
    }
}

fn build_redis(b: &mut Builder<'_>, raw: Spanned<RawRedis>) -> RedisSettings {
    let raw = raw.into_inner();
    let url = raw.url.get_ref().trim().to_string();
    let mut tls = None;
    match redis::parse_redis_url(&url) {
        Some(u) if u.scheme() == "redis" => {
            // TLS settings with a cleartext URL would do nothing: a mistake to point out.
            let tls_keys = [
                ("ca", &raw.ca),
                ("cert", &raw.cert),
                ("key", &raw.key),
                ("server_name", &raw.server_name),
            ];
            for (name, file) in tls_keys {
                if let Some(f) = file {
                    b.err(
                        Some(f.span()),
                        format!("rate_limit.redis.{name}"),
                        "is only used over TLS, and the URL is redis:// (cleartext): use rediss://",
                    );
                }
            }
        }
        Some(u) if u.scheme() == "rediss" => {
            if let Some(problem) = redis_tls_host(u.host_str(), u.fragment()) {
                b.err(Some(raw.url.span()), "rate_limit.redis.url", problem);
            }
            tls = build_client_tls(
                b,
                "rate_limit.redis",
                raw.url.span(),
                RawUpstreamTls {
                    ca: raw.ca.clone(),
                    cert: raw.cert.clone(),
                    key: raw.key.clone(),
                    server_name: raw.server_name.clone(),
                },
            );
        }
        Some(u) => b.err(
            Some(raw.url.span()),
            "rate_limit.redis.url",
            format!(
                "scheme {:?} is not supported (expected redis://host:port/db, or rediss:// for TLS)",
                u.scheme()
            ),
        ),
        None => b.err(
            Some(raw.url.span()),
            "rate_limit.redis.url",
            format!("invalid Redis URL {url:?} (expected e.g. \"redis://127.0.0.1:6379/0\")"),
        ),
    }
    let password = raw.password_file.as_ref().and_then(|f| {
        let path = b.path(f.get_ref());
        match crate::files::read_to_string(&path, crate::files::SMALL) {
            Ok(s) if !s.trim().is_empty() => Some(Secret(s.trim().to_string())),
            Ok(_) => {
                b.err(
                    Some(f.span()),
                    "rate_limit.redis.password_file",
                    format!("{} is empty", path.display()),
                );
                None
            }
            Err(e) => {
                b.err(
                    Some(f.span()),
                    "rate_limit.redis.password_file",
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    });
    let timeout = b.duration(
        &raw.timeout,
        "rate_limit.redis.timeout",
        Duration::from_millis(50),
    );
    if timeout.is_zero() {
        b.err(
            raw.timeout.as_ref().map(|t| t.span()),
            "rate_limit.redis.timeout",
            "the timeout must be above 0",
        );
    }
    let on_error = match raw
        .on_error
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("local", _)) => SharedOnError::Local,
        Some(("open", _)) => SharedOnError::Open,
        Some((other, span)) => {
            b.err(
                Some(span),
                "rate_limit.redis.on_error",
                format!("unknown value {other:?} (expected \"local\" or \"open\")"),
            );
            SharedOnError::Local
        }
    };
    RedisSettings {
        url,
        tls,
        password,
        timeout,
        on_error,
        key_prefix: raw
            .key_prefix
            .map_or_else(|| "wraith:ratelimit:".to_string(), |p| p.into_inner()),
    }
}

/// What is wrong with a `rediss://` URL's host as the name its certificate is checked
/// against, if anything; and its fragment: `#insecure`, which Redis's client reads as "do
/// not verify the certificate", is refused (a private CA goes in `ca`).
fn redis_tls_host(host: Option<&str>, fragment: Option<&str>) -> Option<String> {
    if let Some(f) = fragment {
        return Some(format!(
            "the fragment #{f} is not supported (Wraith always verifies Redis's certificate; for a private CA, set rate_limit.redis.ca)"
        ));
    }
    let host = host?.trim_start_matches('[').trim_end_matches(']');
    match rustls_pki_types::ServerName::try_from(host) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "the host {host:?} cannot be checked against a certificate: {e}"
        )),
    }
}

/// A rate: `"100/s"`, `"600/m"`, `"5/10s"`, `"1000/h"`.
pub fn parse_rate(s: &str) -> Result<(NonZeroU32, Duration), String> {
    let bad = || format!("invalid rate {s:?} (expected e.g. \"100/s\", \"600/m\", \"5/10s\")");
    let (n, per) = s.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let n =
        NonZeroU32::new(n).ok_or_else(|| format!("rate {s:?}: the count must be at least 1"))?;
    let per = per.trim();
    let per = match per {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        other => super::units::parse_duration(other).map_err(|_| bad())?,
    };
    if per.is_zero() || per / n.get() < Duration::from_nanos(1) {
        return Err(format!("rate {s:?} is too fast"));
    }
    Ok((n, per))
}

pub(super) fn build_limits(
    b: &mut Builder<'_>,
    key: &str,
    raw: Vec<Spanned<RawLimit>>,
    redis: bool,
) -> Vec<RateLimitConfig> {
    let mut out: Vec<RateLimitConfig> = Vec::new();
    for (i, l) in raw.into_iter().enumerate() {
        let span = l.span();
        let l = l.into_inner();
        let k = format!("{key}[{i}]");
        let limit_key = match (l.key.get_ref().as_str(), &l.header) {
            ("ip", None) => LimitKey::Ip,
            ("identity", None) => LimitKey::Identity,
            ("route", None) => LimitKey::Route,
            ("header", Some(h)) => match HeaderName::from_bytes(h.get_ref().as_bytes()) {
                Ok(n) => LimitKey::Header(n),
                Err(_) => {
                    b.err(
                        Some(h.span()),
                        format!("{k}.header"),
                        format!("invalid header name {:?}", h.get_ref()),
                    );
                    LimitKey::Ip
                }
            },
            ("header", None) => {
                b.err(
                    Some(l.key.span()),
                    format!("{k}.header"),
                    "key = \"header\" needs header = \"<name>\"",
                );
                LimitKey::Ip
            }
            ("ip" | "identity" | "route", Some(h)) => {
                b.err(
                    Some(h.span()),
                    format!("{k}.header"),
                    "header only applies to key = \"header\"",
                );
                LimitKey::Ip
            }
            (other, _) => {
                b.err(
                    Some(l.key.span()),
                    format!("{k}.key"),
                    format!(
                        "unknown key {other:?} (expected \"ip\", \"identity\", \"route\" or \"header\")"
                    ),
                );
                LimitKey::Ip
            }
        };
        let (count, per) = match parse_rate(l.rate.get_ref()) {
            Ok(r) => r,
            Err(m) => {
                b.err(Some(l.rate.span()), format!("{k}.rate"), m);
                (NonZeroU32::MIN, Duration::from_secs(1))
            }
        };
        let burst = b
            .int(&l.burst, &format!("{k}.burst"), 1, i64::from(u32::MAX))
            .and_then(|n| NonZeroU32::new(n as u32))
            .unwrap_or(count);
        let mode = match l.mode.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("enforce", _)) => LimitMode::Enforce,
            Some(("shadow", _)) => LimitMode::Shadow,
            Some((other, span)) => {
                b.err(
                    Some(span),
                    format!("{k}.mode"),
                    format!("unknown mode {other:?} (expected \"enforce\" or \"shadow\")"),
                );
                LimitMode::Enforce
            }
        };
        let name: Arc<str> = match &l.name {
            Some(n) => {
                let s = n.get_ref();
                if s.is_empty()
                    || !s
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                {
                    b.err(
                        Some(n.span()),
                        format!("{k}.name"),
                        format!("invalid name {s:?}: use letters, digits, '-', '_' or '.'"),
                    );
                }
                Arc::from(s.as_str())
            }
            None => Arc::from(match &limit_key {
                LimitKey::Header(_) => "header".to_string(),
                other => other.describe(),
            }),
        };
        if out.iter().any(|o| o.name == name) {
            b.err(
                Some(span),
                format!("{k}.name"),
                format!("duplicate limit name {name:?} (give each limit a name)"),
            );
        }
        let shared = l.shared.as_ref().is_some_and(|s| *s.get_ref());
        if shared && !redis {
            b.err(
                l.shared.as_ref().map(|s| s.span()),
                format!("{k}.shared"),
                "shared = true needs [rate_limit.redis] (the Redis server the instances count in)",
            );
        }
        let limit = RateLimitConfig {
            name,
            key: limit_key,
            count,
            per,
            burst,
            mode,
            shared,
        };
        if limit.refill().is_none() {
            // The burst's span, or the rate's when the burst is the rate's count.
            let (at, what) = match &l.burst {
                Some(v) => (v.span(), format!("{k}.burst")),
                None => (l.rate.span(), format!("{k}.rate")),
            };
            b.err(
                Some(at),
                what,
                format!(
                    "burst {burst} at rate {:?} takes over 100 years to refill: at most {} at this rate",
                    l.rate.get_ref(),
                    limit.max_burst()
                ),
            );
        }
        out.push(limit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("100/s").unwrap(),
            (NonZeroU32::new(100).unwrap(), Duration::from_secs(1))
        );
        assert_eq!(parse_rate("5/10s").unwrap().1, Duration::from_secs(10));
        assert_eq!(parse_rate("600/m").unwrap().1, Duration::from_secs(60));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("10/fortnight").is_err());
    }

    #[test]
    fn lapi_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(base_url("https://lapi.internal").is_ok());
        assert!(base_url("http://[::1]:8080").is_ok());
        assert!(base_url("http://[::1]").is_ok());
        for bad in [
            "http://127.0.0.1:99999",
            "http://127.0.0.1:0",
            "http://[::1]:70000",
        ] {
            let e = base_url(bad).unwrap_err();
            assert!(e.contains("invalid port"), "{bad}: {e}");
        }
        assert!(base_url("ftp://x").is_err());
        assert!(base_url("http://bouncer:secret@127.0.0.1").is_ok());
        let e = base_url("http://bouncer:secret@127.0.0.1:99999").unwrap_err();
        assert!(e.contains("invalid port \"99999\""), "{e}");
    }
}
