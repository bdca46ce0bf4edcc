//! Shared limits (`shared = true`): the buckets live in Redis, so every Wraith instance that
//! uses the same Redis (and `key_prefix`) enforces one budget, as behind a TCP load balancer
//! a client's requests land on any instance.
//!
//! One script call per request checks every shared limit of the route at once: GCRA (the
//! algorithm governor runs locally) on the Redis server's clock, so the instances' clocks do
//! not matter. As with local limits, a request one enforced limit refuses is counted by none,
//! and shadow limits only report. Each bucket is a key holding its theoretical arrival time,
//! expiring when the bucket is full again: Redis keeps only the clients seen lately.
//!
//! While Redis does not answer within `timeout` (down, unreachable, slow), the limits fall
//! back to `on_error`: counted in this instance alone (`local`, the default) or not at all
//! (`open`). After a failure the instance stays on the fallback for a second before it asks
//! Redis again, so an outage costs one `timeout` per second, not one per request.
//!
//! Wraith makes the connection itself (TCP, then TLS for `rediss://` with the rustls
//! configuration an upstream's `tls` gets: aws-lc-rs, the configured CA bundle, an optional
//! client certificate) and hands the stream to Redis's client, which speaks the protocol.
//! Redis's own TLS support would bring its certificate handling (the system store read at
//! every connect, rustls' process-wide provider) next to the one the rest of Wraith uses.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisConnectionInfo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{ip_key, Limiter, RequestFacts};
use crate::config::{LimitKey, LimitMode, RedisSettings};

/// GCRA over several buckets. KEYS: the buckets. ARGV: per bucket, its emission interval
/// (µs per request), its burst, and 1 when enforced (0: shadow). Returns `{i, wait_µs}`:
/// `i > 0`: the enforced limit `i` refuses (nothing counted); `i < 0`: the shadow limit `-i`
/// would have refused (the others counted); `i = 0`: every limit counted the request.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  -- A bucket is '<tat> <interval> <burst>': one a limit with other settings left is
  -- not this limit's (a changed limit starts fresh, as locally).
  local tat = 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local t, iv, b = string.match(v, '^(%d+) (%d+) (%d+)$')
    if t and tonumber(iv) == interval and tonumber(b) == burst then tat = tonumber(t) end
  end
  if tat < now then tat = now end
  tats[i] = tat
  local wait = tat + interval - interval * burst - now
  if wait > 0 and ARGV[3 * i] == '1' then
    return {i, wait}
  end
end
local shadow, shadow_wait = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local new = tats[i] + interval
  local wait = new - interval * burst - now
  if wait > 0 then
    if shadow == 0 then shadow, shadow_wait = -i, wait end
  else
    redis.call('SET', KEYS[i], string.format('%.0f %.0f %.0f', new, interval, burst),
      'PX', math.ceil((new - now) / 1000) + 1)
  end
end
return {shadow, shadow_wait}
";

const HEX: &[u8; 16] = b"0123456789abcdef";

/// How long an instance stays on the fallback after Redis failed it.
const BACK_OFF: Duration = Duration::from_secs(1);
/// How often a failing Redis is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What Redis said about one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every shared limit counted it; `shadow` names the first shadow limit (an index into
    /// the limits asked) that would have refused it, with its wait.
    Allowed { shadow: Option<(usize, Duration)> },
    /// The enforced limit at this index refuses it; wait this long.
    Refused(usize, Duration),
}

/// Why a call to Redis failed (`wraith_rate_limit_store_errors_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer within `timeout` (connecting included): Redis down behind a silent path,
    /// overloaded, or too far for the timeout.
    Timeout,
    /// No connection: refused, unreachable, a name that does not resolve, or Redis refused
    /// the session (AUTH, SELECT).
    Connect,
    /// The TLS handshake failed: a certificate not trusted or not for the host, or a client
    /// certificate Redis wanted and did not get, or refused.
    Tls,
    /// Connected, but the call failed: the connection dropped, Redis answered an error
    /// (out of memory, a read-only replica, ...) or something unexpected.
    Error,
}

impl Failure {
    /// Every reason, in the order of `SharedStore::errors`.
    pub const ALL: [Failure; 4] = [
        Failure::Timeout,
        Failure::Connect,
        Failure::Tls,
        Failure::Error,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Connect => "connect",
            Failure::Tls => "tls",
            Failure::Error => "error",
        }
    }

    /// `Tls` when a TLS error is among the causes of `e` (a handshake Redis ended with an
    /// alert surfaces as a read error of its first command), else `otherwise`.
    fn of(e: &(dyn std::error::Error + 'static), otherwise: Failure) -> Failure {
        type Shared = Arc<dyn std::error::Error + Send + Sync>;
        let mut cause = Some(e);
        while let Some(mut e) = cause {
            // Redis's client keeps an I/O error behind an `Arc`: look through it.
            if let Some(inner) = e.downcast_ref::<Shared>() {
                e = &**inner;
            }
            let tls = e.is::<rustls::Error>()
                || e.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .is_some_and(|inner| inner.is::<rustls::Error>());
            if tls {
                return Failure::Tls;
            }
            cause = e.source();
        }
        otherwise
    }
}

/// Where Redis is, and what a new connection says first (AUTH, SELECT).
struct Server {
    host: String,
    port: u16,
    /// `rediss://`: the rustls client, and the name sent as SNI that Redis's certificate
    /// must carry (`server_name`, else the URL's host).
    tls: Option<(TlsConnector, ServerName<'static>)>,
    redis: RedisConnectionInfo,
    config: AsyncConnectionConfig,
}

/// A connection and the task that drives it, shared by the requests using it: the task
/// ends (closing the socket) when the last of them drops it, even with calls unanswered,
/// as on a path gone silent.
#[derive(Clone)]
struct Connection {
    redis: MultiplexedConnection,
    driver: Arc<Driver>,
}

impl Connection {
    /// Whether the socket is gone (the driver ends with it): Redis closed the connection.
    fn closed(&self) -> bool {
        self.driver.0.is_finished()
    }
}

struct Driver(tokio::task::AbortHandle);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection being made, awaited by every request that arrives meanwhile.
type Connecting = Shared<BoxFuture<'static, Result<Connection, (Failure, String)>>>;

/// The Redis connection of the `[rate_limit.redis]` settings, kept across reloads that do
/// not change them.
pub struct SharedStore {
    pub settings: RedisSettings,
    server: Arc<Server>,
    /// Made at the first request (it needs the runtime), and again after any failure, so
    /// that neither a connect that Redis refused (AUTH, SELECT) nor a connection the network
    /// dropped silently is kept.
    connection: Mutex<Option<Connecting>>,
    script: redis::Script,
    epoch: Instant,
    /// Milliseconds since `epoch` until which Redis is not asked (after a failure).
    resting_until: AtomicU64,
    /// Failures since the last warning, and when that was.
    failures: Mutex<(u64, Option<Instant>)>,
    /// Failures in all, and the last one's error (`wraith status`).
    failed_total: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Failures by reason (`Failure::ALL`), for the metrics: carried over from the store
    /// this one replaces, so that the counters do not restart at a reload.
    errors: Arc<[AtomicU64; 4]>,
}

impl SharedStore {
    /// The store for `settings`, counting its failures on from `previous`'s; `Err` for a
    /// URL or TLS file Wraith cannot use (the config checked them already).
    pub fn new(
        settings: RedisSettings,
        previous: Option<&SharedStore>,
    ) -> Result<SharedStore, String> {
        // Redis's client parses the URL (database, user, password, protocol); the scheme
        // only says whether Wraith puts TLS under it.
        // (A scheme is case-insensitive: the config reads `REDISS://` as `rediss://` too.)
        let url = settings.url.as_str();
        let over_tls = url
            .get(..9)
            .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"));
        let cleartext = match over_tls {
            true => format!("redis://{}", &url[9..]),
            false => url.to_string(),
        };
        let info = redis::IntoConnectionInfo::into_connection_info(cleartext.as_str())
            .map_err(|e| format!("rate_limit.redis.url: {e}"))?;
        let redis::ConnectionAddr::Tcp(host, port) = info.addr().clone() else {
            return Err("rate_limit.redis.url: expected a host and port".into());
        };
        let mut redis = info.redis_settings().clone();
        if let Some(p) = &settings.password {
            redis = redis.set_password(&p.0);
        }
        let tls = match (&settings.tls, over_tls) {
            (Some(tls), true) => {
                let config = crate::upstream::tls::client_config(tls, &[])
                    .map_err(|e| format!("rate_limit.redis: {e}"))?;
                // `server_name` when set (Redis reached by address, or by a name its
                // certificate does not carry), else the URL's host.
                let name = match &tls.server_name {
                    Some(n) => ServerName::try_from(n.clone())
                        .map_err(|e| format!("rate_limit.redis.server_name: {n:?}: {e}"))?,
                    None => ServerName::try_from(host.clone())
                        .map_err(|e| format!("rate_limit.redis.url: host {host:?}: {e}"))?,
                };
                Some((TlsConnector::from(config), name))
            }
            (None, false) => None,
            // (The config pairs them.)
            _ => {
                return Err(
                    "rate_limit.redis: the URL's scheme and the TLS settings disagree".into(),
                )
            }
        };
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(settings.timeout));
        Ok(SharedStore {
            server: Arc::new(Server {
                host,
                port,
                tls,
                redis,
                config,
            }),
            settings,
            connection: Mutex::new(None),
            script: redis::Script::new(SCRIPT),
            epoch: Instant::now(),
            resting_until: AtomicU64::new(0),
            failures: Mutex::new((0, None)),
            failed_total: AtomicU64::new(0),
            last_error: Mutex::new(None),
            errors: previous.map_or_else(Default::default, |p| p.errors.clone()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The connection, or the one being made (the first request after a failure starts it;
    /// the requests meanwhile wait for the same one).
    fn connection(&self) -> Connecting {
        let mut slot = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &*slot {
            // One Redis closed (a restart, its idle `timeout`) is not handed out: its driver
            // ended with the socket, and a call on it could only fail and rest the store.
            let closed = c
                .peek()
                .is_some_and(|made| made.as_ref().is_ok_and(Connection::closed));
            if !closed {
                return c.clone();
            }
        }
        let made = connect(self.server.clone()).boxed().shared();
        *slot = Some(made.clone());
        made
    }

    /// Failures so far by reason, over this store and those it replaced.
    pub fn errors(&self) -> impl Iterator<Item = (Failure, u64)> + '_ {
        Failure::ALL
            .into_iter()
            .zip(self.errors.iter())
            .map(|(f, n)| (f, n.load(Ordering::Relaxed)))
    }

    /// Whether the shared limits are on `on_error` now (Redis failed less than a second
    /// ago).
    pub fn on_fallback(&self) -> bool {
        self.now_ms() < self.resting_until.load(Ordering::Relaxed)
    }

    /// Checks and counts `req` in every one of `limits` (all shared), or says why Redis
    /// could not (the caller falls back to `on_error`).
    pub async fn check(
        &self,
        limits: &[&Arc<Limiter>],
        req: &RequestFacts<'_>,
        own_route: Option<&str>,
    ) -> Result<Verdict, String> {
        if self.now_ms() < self.resting_until.load(Ordering::Relaxed) {
            return Err("Redis failed less than a second ago".into());
        }
        let mut call = self.script.prepare_invoke();
        for l in limits {
            call.key(self.key(l, req, own_route));
            // GCRA in microseconds: at least one per request (rates up to 1,000,000/s).
            let interval = l.config.period().as_micros().clamp(1, u128::from(u64::MAX)) as u64;
            call.arg(interval)
                .arg(l.config.burst.get())
                .arg(u8::from(l.config.mode == LimitMode::Enforce));
        }
        let connecting = self.connection();
        let asked = async {
            let mut connection = connecting.clone().await?;
            call.invoke_async::<(i64, i64)>(&mut connection.redis)
                .await
                .map_err(|e| {
                    // Redis's client gives up on an answer after `timeout` too, often in the
                    // same timer tick as the bound below, which then sees its error first.
                    let why = match e.is_timeout() {
                        true => Failure::Timeout,
                        false => Failure::of(&e, Failure::Error),
                    };
                    (why, e.to_string())
                })
        };
        let answer = match tokio::time::timeout(self.settings.timeout, asked).await {
            Ok(Ok(a)) => a,
            Ok(Err((why, e))) => return Err(self.failed(why, e, &connecting)),
            Err(_) => {
                return Err(self.failed(
                    Failure::Timeout,
                    format!("no answer within {:?}", self.settings.timeout),
                    &connecting,
                ))
            }
        };
        let wait = Duration::from_micros(answer.1.max(0) as u64);
        let index = |i: i64| {
            let i = i.unsigned_abs() as usize;
            (1..=limits.len()).contains(&i).then_some(i - 1)
        };
        match answer.0 {
            0 => Ok(Verdict::Allowed { shadow: None }),
            i => match index(i) {
                Some(at) if i > 0 => Ok(Verdict::Refused(at, wait)),
                Some(at) => Ok(Verdict::Allowed {
                    shadow: Some((at, wait)),
                }),
                None => Err(self.failed(
                    Failure::Error,
                    format!("unexpected answer {answer:?}"),
                    &connecting,
                )),
            },
        }
    }

    /// Rests the store for `BACK_OFF`, drops its connection (the next call makes a new one:
    /// at most one a second while Redis fails) and logs the failure (at most every
    /// `WARN_EVERY`). A call that failed on a connection already replaced (one asked before
    /// the last rest, with a `timeout` longer than the rest) is counted, but neither rests
    /// the store nor drops the new connection, which may well work.
    fn failed(&self, why: Failure, error: String, used: &Connecting) -> String {
        self.errors[why as usize].fetch_add(1, Ordering::Relaxed);
        {
            let mut slot = self.connection.lock().unwrap_or_else(|p| p.into_inner());
            let replaced = slot.as_ref().is_some_and(|now| !now.ptr_eq(used));
            if !replaced {
                self.resting_until.store(
                    self.now_ms() + BACK_OFF.as_millis() as u64,
                    Ordering::Relaxed,
                );
                *slot = None;
            }
        }
        self.failed_total.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.0 += 1;
        if f.1.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            let fallback = match self.settings.on_error {
                crate::config::SharedOnError::Local => "counted in this instance alone",
                crate::config::SharedOnError::Open => "not applied",
            };
            tracing::warn!(error = %error, failures = f.0, "shared rate limits: Redis failed; for the next second they are {fallback} (logged once per 10 s)");
            *f = (0, Some(Instant::now()));
        }
        error
    }

    /// What `wraith status` shows: the server (without its credentials), the failures so
    /// far and the last one's error, and whether the limits are on `on_error` now.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "url": self.settings.url_without_credentials(),
            "failures": self.failed_total.load(Ordering::Relaxed),
            "last_error": *self.last_error.lock().unwrap_or_else(|p| p.into_inner()),
            "on_fallback": self.on_fallback(),
        })
    }

    /// The bucket of `req` in shared limit `limit`: the same on every instance. A route's
    /// own limits are kept apart from the `[rate_limit]` defaults (and from other routes'
    /// limits of the same name); header values go in as SHA-256 digests.
    fn key(&self, limit: &Limiter, req: &RequestFacts<'_>, own_route: Option<&str>) -> Vec<u8> {
        let mut key = Vec::with_capacity(96);
        key.extend_from_slice(self.settings.key_prefix.as_bytes());
        if let Some(route) = own_route {
            key.extend_from_slice(b"route/");
            key.extend_from_slice(route.as_bytes());
            key.push(b'/');
        }
        key.extend_from_slice(limit.config.name.as_bytes());
        let ip = |key: &mut Vec<u8>| {
            key.extend_from_slice(b":ip:");
            // (Formatted straight into the key: no String per request.)
            let _ = write!(key, "{}", ip_key(req.client));
        };
        match &limit.config.key {
            LimitKey::Ip => ip(&mut key),
            LimitKey::Identity => match req.identity {
                Some(id) => {
                    key.extend_from_slice(b":id:");
                    key.extend_from_slice(super::IdentityKey(id.clone()).as_str().as_bytes());
                }
                None => ip(&mut key),
            },
            LimitKey::Route => {
                key.extend_from_slice(b":route:");
                key.extend_from_slice(req.route.as_bytes());
            }
            LimitKey::Header(name) => match req.headers.get(name) {
                Some(v) if req.peer_trusted => {
                    let digest =
                        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, v.as_bytes());
                    key.extend_from_slice(b":header:");
                    for b in digest.as_ref() {
                        key.extend_from_slice(&[
                            HEX[usize::from(b >> 4)],
                            HEX[usize::from(b & 15)],
                        ]);
                    }
                }
                _ => ip(&mut key),
            },
        }
        key
    }
}

/// Connects to `server`: TCP, TLS for `rediss://`, then Redis's own greeting (AUTH, SELECT),
/// with the task that drives the connection spawned. (The caller bounds it by `timeout`.)
async fn connect(server: Arc<Server>) -> Result<Connection, (Failure, String)> {
    let (host, port) = (server.host.as_str(), server.port);
    let tcp = TcpStream::connect((host, port)).await.map_err(|e| {
        (
            Failure::Connect,
            format!("connecting to {host}:{port}: {e}"),
        )
    })?;
    let _ = tcp.set_nodelay(true);
    match &server.tls {
        None => greet(&server, tcp).await,
        Some((connector, name)) => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| (Failure::Tls, format!("TLS with {host}:{port}: {e}")))?;
            greet(&server, tls).await
        }
    }
}

/// Redis's client on `stream`: it authenticates and selects the database.
async fn greet<S>(server: &Server, stream: S) -> Result<Connection, (Failure, String)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (redis, driver) =
        MultiplexedConnection::new_with_config(&server.redis, stream, server.config.clone())
            .await
            .map_err(|e| {
                let why = Failure::of(&e, Failure::Connect);
                (why, format!("{}:{}: {e}", server.host, server.port))
            })?;
    let driver = tokio::spawn(driver).abort_handle();
    Ok(Connection {
        redis,
        driver: Arc::new(Driver(driver)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SharedOnError;

    #[test]
    fn status_names_the_server_without_its_credentials() {
        let store = SharedStore::new(
            RedisSettings {
                url: "redis://wraith:hunter2@10.0.3.5:6379/2".into(),
                tls: None,
                password: None,
                timeout: Duration::from_millis(50),
                on_error: SharedOnError::Local,
                key_prefix: "wraith:ratelimit:".into(),
            },
            None,
        )
        .unwrap();
        let st = store.status();
        assert_eq!(st["url"], "redis://10.0.3.5:6379/2");
        assert_eq!(st["failures"], 0);
        assert_eq!(st["on_fallback"], false);
        assert!(!st.to_string().contains("hunter2"));
    }

    #[test]
    fn a_tls_error_behind_redis_errors_is_a_tls_failure() {
        // As Redis's client reports a handshake Redis ended (a client certificate it wanted):
        // the read error of its first command, behind its `Arc`.
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        );
        let e = redis::RedisError::from(alert);
        assert_eq!(Failure::of(&e, Failure::Connect), Failure::Tls);
        let reset =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(Failure::of(&reset, Failure::Error), Failure::Error);
    }
}
