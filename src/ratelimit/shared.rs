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

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

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

/// The Redis connection of the `[rate_limit.redis]` settings, kept across reloads that do
/// not change them.
pub struct SharedStore {
    pub settings: RedisSettings,
    client: redis::Client,
    /// Made at the first request (it needs the runtime), and again after a failure: the
    /// manager reconnects by itself only after an I/O error, so it would keep a connect that
    /// Redis refused (AUTH, SELECT) and a connection the network dropped silently.
    connection: Mutex<Option<ConnectionManager>>,
    script: redis::Script,
    epoch: Instant,
    /// Milliseconds since `epoch` until which Redis is not asked (after a failure).
    resting_until: AtomicU64,
    /// Failures since the last warning, and when that was.
    failures: Mutex<(u64, Option<Instant>)>,
    /// Failures in all, and the last one's error (`wraith status`).
    failed_total: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl SharedStore {
    /// The store for `settings`; `Err` for a URL Redis's client refuses (the config
    /// checked it already).
    pub fn new(settings: RedisSettings) -> Result<SharedStore, String> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
            .map_err(|e| format!("rate_limit.redis.url: {e}"))?;
        if let Some(p) = &settings.password {
            let redis_settings = info.redis_settings().clone().set_password(&p.0);
            info = info.set_redis_settings(redis_settings);
        }
        let client = redis::Client::open(info).map_err(|e| format!("rate_limit.redis: {e}"))?;
        Ok(SharedStore {
            settings,
            client,
            connection: Mutex::new(None),
            script: redis::Script::new(SCRIPT),
            epoch: Instant::now(),
            resting_until: AtomicU64::new(0),
            failures: Mutex::new((0, None)),
            failed_total: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout))
            .set_number_of_retries(2)
            .set_max_delay(BACK_OFF);
        let made = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| e.to_string())?;
        *slot = Some(made.clone());
        Ok(made)
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
        let asked = async {
            let mut connection = self.connection()?;
            call.invoke_async::<(i64, i64)>(&mut connection)
                .await
                .map_err(|e| e.to_string())
        };
        let answer = match tokio::time::timeout(self.settings.timeout, asked).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(self.failed(e)),
            Err(_) => {
                return Err(self.failed(format!("no answer within {:?}", self.settings.timeout)))
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
                None => Err(self.failed(format!("unexpected answer {answer:?}"))),
            },
        }
    }

    /// Rests the store for `BACK_OFF`, drops its connection (the next call makes a new one:
    /// at most one a second while Redis fails) and logs the failure (at most every
    /// `WARN_EVERY`).
    fn failed(&self, error: String) -> String {
        self.resting_until.store(
            self.now_ms() + BACK_OFF.as_millis() as u64,
            Ordering::Relaxed,
        );
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
        let server = redis::parse_redis_url(&self.settings.url).map(|mut u| {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        });
        serde_json::json!({
            "url": server,
            "failures": self.failed_total.load(Ordering::Relaxed),
            "last_error": *self.last_error.lock().unwrap_or_else(|p| p.into_inner()),
            "on_fallback": self.now_ms() < self.resting_until.load(Ordering::Relaxed),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SharedOnError;

    #[test]
    fn status_names_the_server_without_its_credentials() {
        let store = SharedStore::new(RedisSettings {
            url: "redis://wraith:hunter2@10.0.3.5:6379/2".into(),
            password: None,
            timeout: Duration::from_millis(50),
            on_error: SharedOnError::Local,
            key_prefix: "wraith:ratelimit:".into(),
        })
        .unwrap();
        let st = store.status();
        assert_eq!(st["url"], "redis://10.0.3.5:6379/2");
        assert_eq!(st["failures"], 0);
        assert_eq!(st["on_fallback"], false);
        assert!(!st.to_string().contains("hunter2"));
    }
}
