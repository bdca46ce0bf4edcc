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
//! (`open`). After a failure the instance rests on the fallback for a second (or `timeout`,
//! if longer) before it asks Redis again, so an outage costs at most one `timeout` per rest,
//! not one per request.
//!
//! An error Redis answers is not Redis failing: what the error is about decides what it costs
//! (`Reach`).
//! - About this request's buckets (`WRONGTYPE`: another program's value under one of
//!   Wraith's keys), or an error Wraith does not know: that request alone goes to
//!   `on_error`. The connection answered, so it is kept, and the other requests go on
//!   counting in Redis.
//! - About the server, for a while (`OOM` under `noeviction`, `LOADING`, `BUSY`, `MISCONF`,
//!   `NOPERM`, `TRYAGAIN`, `CLUSTERDOWN`): every request would get the same answer, so the
//!   instance rests (no round trip per request for nothing), but keeps the connection, whose
//!   socket is fine.
//! - About the connection (`NOAUTH`: the session lost its authentication; `READONLY`,
//!   `MASTERDOWN`: a replica now, and after a failover the URL's name may lead to the new
//!   primary): rest, and connect anew, as after a timeout, an I/O error or an answer Wraith
//!   cannot read.
//! - `NOSCRIPT` (scripts flushed) is no failure: Redis's client loads the script and asks
//!   again.
//!
//! A connect to a host name resolves it on a blocking thread, which a timeout cannot stop: at
//! most one such lookup per store is in flight, and a connect meanwhile waits for it (within
//! `timeout`) rather than starting another, so a slow resolver cannot pile up lookups.
//!
//! Wraith makes the connection itself (TCP, then TLS for `rediss://` with the rustls
//! configuration an upstream's `tls` gets: aws-lc-rs, the configured CA bundle, an optional
//! client certificate) and hands the stream to Redis's client, which speaks the protocol.
//! Redis's own TLS support would bring its certificate handling (the system store read at
//! every connect, rustls' process-wide provider) next to the one the rest of Wraith uses.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
  -- A bucket is '<tat> <interval> <burst>'. One counted under other settings (a reload
  -- changed the limit, or an instance not reloaded yet still counts under the old ones)
  -- is read in requests, as locally: what the client spent carries over, up to the new
  -- burst, never a TAT set an old interval ahead read against the new one.
  local tat = 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local t, iv, b = string.match(v, '^(%d+) (%d+) (%d+)$')
    t, iv, b = tonumber(t), tonumber(iv), tonumber(b)
    if t and iv == interval and b == burst then
      tat = t
    elseif t and iv and iv > 0 and t > now then
      tat = now + math.min(math.floor((t - now) * interval / iv), interval * burst)
    end
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

/// How long an instance stays on the fallback after Redis failed it, at least (`timeout`
/// when that is longer: see `SharedStore::rest`).
const BACK_OFF: Duration = Duration::from_secs(1);
/// How often a failing Redis is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How far a failure reaches beyond the request that saw it (the module doc has the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// This request alone: Redis answered an error about its buckets.
    Request,
    /// The server, for a while: rest, keep the connection.
    Server,
    /// The connection: rest and drop it.
    Connection,
}

impl Reach {
    /// How far an error Redis answered reaches, by its code.
    fn of_code(code: &str) -> Reach {
        match code {
            // The server is short of something, or busy, for every request alike.
            "OOM" | "LOADING" | "BUSY" | "MISCONF" | "NOPERM" | "TRYAGAIN" | "CLUSTERDOWN" => {
                Reach::Server
            }
            // The session or the server behind the name is no longer the right one.
            "NOAUTH" | "WRONGPASS" | "READONLY" | "MASTERDOWN" | "MOVED" | "ASK" => {
                Reach::Connection
            }
            // WRONGTYPE, and what Wraith does not know: about this request's keys, as far as
            // it can tell; the next request pays one round trip to find out.
            _ => Reach::Request,
        }
    }
}

/// A call to Redis that failed.
struct Failed {
    why: Failure,
    reach: Reach,
    error: String,
    /// The connect failed, or the request timed out waiting for it: one failure for every
    /// request that waited, counted once.
    in_connect: bool,
}

impl Failed {
    /// A failed connect (always `Reach::Connection`).
    fn connect((why, error): (Failure, String)) -> Failed {
        Failed {
            why,
            reach: Reach::Connection,
            error,
            in_connect: true,
        }
    }

    /// A failed script call on a connection made.
    fn call(e: &redis::RedisError) -> Failed {
        // Redis's client gives up on an answer after `timeout` too, often in the same timer
        // tick as the bound in `check`, which then sees its error first.
        let (why, reach) = match (e.is_timeout(), e.code()) {
            (true, _) => (Failure::Timeout, Reach::Connection),
            // Only an error Redis answered has a code.
            (false, Some(code)) => (Failure::Error, Reach::of_code(code)),
            (false, None) => (Failure::of(e, Failure::Error), Reach::Connection),
        };
        Failed {
            why,
            reach,
            error: e.to_string(),
            in_connect: false,
        }
    }
}

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
    /// (out of memory, a read-only replica, another program's value under a bucket's key,
    /// ...) or something unexpected.
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
    /// The lookup of `host` in flight, if any (`Server::resolve`).
    lookup: Mutex<Option<Lookup>>,
}

/// A lookup of the server's name on a blocking thread, awaited by every connect that needs
/// it while it runs.
struct Lookup {
    addrs: Shared<BoxFuture<'static, Result<Vec<SocketAddr>, String>>>,
    /// The blocking task: finished, the lookup is no longer in flight.
    task: tokio::task::AbortHandle,
}

impl Server {
    /// The server's addresses: an IP address as it is, a name through the system's resolver
    /// (getaddrinfo: /etc/hosts, DNS). The lookup runs on a blocking thread, which goes on
    /// after a timeout dropped the connect that wanted it; so a connect joins the lookup in
    /// flight, if any, rather than start another: however slow the resolver, a store has at
    /// most one lookup running, while the requests are decided within `timeout` by the
    /// caller's bound.
    async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let addrs = {
            let mut slot = self.lookup.lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some(l) if !l.task.is_finished() => l.addrs.clone(),
                _ => {
                    let (name, port) = (host.to_string(), self.port);
                    let task = tokio::task::spawn_blocking(move || {
                        (name.as_str(), port)
                            .to_socket_addrs()
                            .map(|addrs| addrs.collect::<Vec<_>>())
                    });
                    let abort = task.abort_handle();
                    let (name, port) = (host.to_string(), self.port);
                    let addrs = async move {
                        match task.await {
                            Ok(Ok(addrs)) => Ok(addrs),
                            Ok(Err(e)) => Err(format!("resolving {name}:{port}: {e}")),
                            Err(e) => Err(format!("resolving {name}:{port}: {e}")),
                        }
                    }
                    .boxed()
                    .shared();
                    *slot = Some(Lookup {
                        addrs: addrs.clone(),
                        task: abort,
                    });
                    addrs
                }
            }
        };
        addrs.await
    }
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
    /// The same for errors about one request's buckets (`Reach::Request`), warned apart: a
    /// client whose key holds another program's value must not hide an outage.
    bucket_errors: Mutex<(u64, Option<Instant>)>,
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
                lookup: Mutex::new(None),
            }),
            settings,
            connection: Mutex::new(None),
            script: redis::Script::new(SCRIPT),
            epoch: Instant::now(),
            resting_until: AtomicU64::new(0),
            failures: Mutex::new((0, None)),
            bucket_errors: Mutex::new((0, None)),
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

    /// How long the store rests after a failure: a second, or `timeout` if longer, so that
    /// an outage costs at most half the time waiting for Redis, whatever the `timeout`.
    fn rest(&self) -> Duration {
        BACK_OFF.max(self.settings.timeout)
    }

    /// Whether the shared limits are on `on_error` now (Redis failed less than a rest ago).
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
            return Err(format!("Redis failed less than {:?} ago", self.rest()));
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
        // Whether the connection was there: a request that times out before is one more
        // waiter of a failed connect, not a call that failed.
        let connected = AtomicBool::new(false);
        let asked = async {
            let mut connection = connecting.clone().await.map_err(Failed::connect)?;
            connected.store(true, Ordering::Relaxed);
            call.invoke_async::<(i64, i64)>(&mut connection.redis)
                .await
                .map_err(|e| Failed::call(&e))
        };
        let keys = || {
            let keys: Vec<String> = limits
                .iter()
                .map(|l| String::from_utf8_lossy(&self.key(l, req, own_route)).into_owned())
                .collect();
            keys.join(" ")
        };
        let answer = match tokio::time::timeout(self.settings.timeout, asked).await {
            Ok(Ok(a)) => a,
            Ok(Err(f)) => return Err(self.failed(f, &connecting, keys)),
            Err(_) => {
                let f = Failed {
                    why: Failure::Timeout,
                    reach: Reach::Connection,
                    error: format!("no answer within {:?}", self.settings.timeout),
                    in_connect: !connected.load(Ordering::Relaxed),
                };
                return Err(self.failed(f, &connecting, keys));
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
                    Failed {
                        why: Failure::Error,
                        reach: Reach::Connection,
                        error: format!("unexpected answer {answer:?}"),
                        in_connect: false,
                    },
                    &connecting,
                    keys,
                )),
            },
        }
    }

    /// Accounts for a failed call as far as it reaches (`Reach`): the request alone, or the
    /// store resting for `rest()`, its connection dropped (the next call makes a new one: at
    /// most one per rest while Redis fails) or kept; and logs it, at most every
    /// `WARN_EVERY`. A call that failed on a connection already replaced (one asked before
    /// the last rest, its answer later than the rest) is counted, but neither rests the store
    /// nor drops the new connection, which may well work. A failed connect is counted by the
    /// first of the requests waiting for it; the others are sent to `on_error` uncounted.
    /// `keys` names the request's buckets, for the warning about them.
    fn failed(&self, f: Failed, used: &Connecting, keys: impl FnOnce() -> String) -> String {
        {
            let mut slot = self.connection.lock().unwrap_or_else(|p| p.into_inner());
            let current = slot.as_ref().is_some_and(|now| now.ptr_eq(used));
            if f.in_connect && !current {
                return f.error;
            }
            let replaced = slot.is_some() && !current;
            if f.reach != Reach::Request && !replaced {
                self.resting_until.store(
                    self.now_ms() + self.rest().as_millis() as u64,
                    Ordering::Relaxed,
                );
                if f.reach == Reach::Connection {
                    *slot = None;
                }
            }
        }
        self.errors[f.why as usize].fetch_add(1, Ordering::Relaxed);
        self.failed_total.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.error.clone());
        let fallback = match self.settings.on_error {
            crate::config::SharedOnError::Local => "counted in this instance alone",
            crate::config::SharedOnError::Open => "not applied",
        };
        let warned = match f.reach {
            Reach::Request => &self.bucket_errors,
            Reach::Server | Reach::Connection => &self.failures,
        };
        let mut w = warned.lock().unwrap_or_else(|p| p.into_inner());
        w.0 += 1;
        if w.1.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            match f.reach {
                Reach::Request => tracing::warn!(
                    error = %f.error,
                    key = %keys(),
                    failures = w.0,
                    "shared rate limits: Redis answered an error about this request's buckets; for this request they are {fallback}, the others still count in Redis (logged once per 10 s)"
                ),
                Reach::Server | Reach::Connection => tracing::warn!(
                    error = %f.error,
                    failures = w.0,
                    "shared rate limits: Redis failed; for the next {:?} they are {fallback} (logged once per 10 s)",
                    self.rest()
                ),
            }
            *w = (0, Some(Instant::now()));
        }
        f.error
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
    let addrs = server.resolve().await.map_err(|e| (Failure::Connect, e))?;
    let tcp = TcpStream::connect(&addrs[..]).await.map_err(|e| {
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
    fn an_error_answer_reaches_as_far_as_its_code_says() {
        // Another program's value under one bucket's key: that request alone.
        assert_eq!(Reach::of_code("WRONGTYPE"), Reach::Request);
        assert_eq!(Reach::of_code("ERR"), Reach::Request);
        assert_eq!(Reach::of_code("SOMETHINGNEW"), Reach::Request);
        // The server, for a while: rest on the connection that works.
        for code in ["OOM", "LOADING", "BUSY", "MISCONF", "NOPERM"] {
            assert_eq!(Reach::of_code(code), Reach::Server, "{code}");
        }
        // The session, or a replica now: rest and connect anew.
        for code in ["NOAUTH", "READONLY", "MASTERDOWN"] {
            assert_eq!(Reach::of_code(code), Reach::Connection, "{code}");
        }
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
