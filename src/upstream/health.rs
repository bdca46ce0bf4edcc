//! Endpoint health: active checks (a GET every interval, with rise/fall thresholds and
//! jitter) and passive outlier detection (consecutive failures eject an endpoint for a
//! cool-down that doubles on each repeat, never more than a share of the pool at once).
//!
//! The request path only reads two atomics per candidate (`is_available`) and, after each
//! response, touches one more (`record_success` is a load when nothing failed before).
//! State lives in an `Arc<EndpointHealth>` that a reload hands to the new upstream when the
//! endpoint is unchanged, so an endpoint that was down stays down across a reload.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;

use super::{Endpoint, Upstream};
use crate::config::{HealthCheckConfig, OutlierConfig, UpstreamProtocol};

/// Milliseconds since the first call in this process (a cheap monotonic clock for deadlines
/// kept in atomics; never 0 after the first millisecond, so 0 can mean "not set").
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(|| Instant::now() - Duration::from_millis(1));
    epoch.elapsed().as_millis() as u64
}

/// The health of one endpoint.
#[derive(Debug)]
pub struct EndpointHealth {
    /// `upstream/endpoint`, for logs.
    label: Box<str>,
    /// Set by active checks after `fall` failures, cleared after `rise` passes.
    active_down: AtomicBool,
    /// Passive ejection: end of the cool-down (`now_ms`), 0 when not ejected.
    ejected_until: AtomicU64,
    /// Consecutive failed requests (connect failures, timeouts, 5xx).
    consecutive: AtomicU32,
    /// Ejections in a row without a clean period since; the cool-down doubles with each.
    ejections: AtomicU32,
    /// Ejections since the endpoint was first built.
    total_ejections: AtomicU64,
    /// When the last cool-down ends (or ended), `now_ms`.
    last_end: AtomicU64,
    /// What the last active check saw, for `wraith status`.
    last_check: Mutex<Option<CheckRecord>>,
    /// The upstream (`Upstream::id`) whose checks run and write here; 0 before one is live.
    /// Health outlives a reload that keeps the endpoint, and so does an old upstream for as
    /// long as a request still holds it: only the live one's checks (its path, `rise`,
    /// `fall`) may decide.
    pub(super) checker: AtomicU64,
}

/// The last active check of an endpoint.
#[derive(Debug, Clone)]
pub struct CheckRecord {
    pub at: SystemTime,
    /// `None` when it passed; why it failed otherwise.
    pub failure: Option<String>,
    pub status: Option<u16>,
    pub duration: Duration,
}

/// How an endpoint looks to the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    /// Active checks failed `fall` times in a row.
    Down,
    /// Passively ejected until the cool-down ends.
    Ejected,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Ejected => "ejected",
        }
    }
}

impl EndpointHealth {
    pub fn new(upstream: &str, endpoint: &str) -> Arc<EndpointHealth> {
        Arc::new(EndpointHealth {
            label: format!("{upstream}/{endpoint}").into(),
            active_down: AtomicBool::new(false),
            ejected_until: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            total_ejections: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
            last_check: Mutex::new(None),
            checker: AtomicU64::new(0),
        })
    }

    /// Forgets what active checks concluded (no checks run any more).
    pub(super) fn clear_active_down(&self) {
        if self.active_down.swap(false, Relaxed) {
            tracing::info!(endpoint = %self.label, "endpoint is up (health checks removed)");
        }
    }

    /// Whether the balancer may choose this endpoint.
    #[inline]
    pub fn is_available(&self) -> bool {
        if self.active_down.load(Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Relaxed);
        until == 0 || self.ejection_over(until)
    }

    #[cold]
    fn ejection_over(&self, until: u64) -> bool {
        if now_ms() < until {
            return false;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, Relaxed, Relaxed)
            .is_ok()
        {
            self.consecutive.store(0, Relaxed);
            tracing::info!(endpoint = %self.label, "endpoint ejection ended; it takes traffic again");
        }
        true
    }

    /// Ends a passive ejection early because an active check passed; whether it ended one.
    fn end_ejection_by_check(&self) -> bool {
        let until = self.ejected_until.load(Relaxed);
        if until != 0
            && self
                .ejected_until
                .compare_exchange(until, 0, Relaxed, Relaxed)
                .is_ok()
        {
            self.consecutive.store(0, Relaxed);
            if until > now_ms() {
                tracing::info!(endpoint = %self.label, "endpoint ejection ended early: its health check passes");
                return true;
            }
        }
        false
    }

    /// The state shown in `wraith status`.
    pub fn state(&self) -> State {
        if self.active_down.load(Relaxed) {
            State::Down
        } else if self.ejected_until.load(Relaxed) > now_ms() {
            State::Ejected
        } else {
            State::Up
        }
    }

    /// The passive ejection's time left, if the endpoint is ejected (and not down).
    pub(super) fn ejection_left(&self) -> Option<Duration> {
        let until = self.ejected_until.load(Relaxed);
        if until == 0 || self.active_down.load(Relaxed) {
            return None;
        }
        Some(Duration::from_millis(until.saturating_sub(now_ms())))
    }

    /// Milliseconds of ejection left (0 when not ejected).
    pub fn ejected_for_ms(&self) -> u64 {
        self.ejected_until.load(Relaxed).saturating_sub(now_ms())
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Relaxed)
    }

    pub fn total_ejections(&self) -> u64 {
        self.total_ejections.load(Relaxed)
    }

    pub fn last_check(&self) -> Option<CheckRecord> {
        self.last_check.lock().ok().and_then(|c| c.clone())
    }

    /// A request got a non-5xx response.
    #[inline]
    pub fn record_success(&self, outlier: &OutlierConfig) {
        if self.consecutive.load(Relaxed) != 0 {
            self.consecutive.store(0, Relaxed);
        }
        if self.ejections.load(Relaxed) != 0 {
            self.maybe_forgive(outlier);
        }
    }

    /// After a clean run as long as the longest cool-down, repeat ejections start over.
    #[cold]
    fn maybe_forgive(&self, outlier: &OutlierConfig) {
        if self.ejected_until.load(Relaxed) != 0 {
            return;
        }
        let last_end = self.last_end.load(Relaxed);
        if now_ms().saturating_sub(last_end) >= outlier.max_ejection_time.as_millis() as u64 {
            self.ejections.store(0, Relaxed);
        }
    }

    /// A request failed in a way that counts against the endpoint (connect failure, timeout,
    /// broken response, 5xx). Ejects it when the threshold is reached and the pool allows.
    pub fn record_failure(&self, upstream: &Upstream) {
        let outlier = &upstream.config.outlier;
        let n = self
            .consecutive
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_add(1)))
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        if outlier.consecutive_failures == 0 || n < outlier.consecutive_failures {
            return;
        }
        if self.ejected_until.load(Relaxed) != 0 {
            return;
        }
        // Never take more than the allowed share of the pool out of service: endpoints that
        // active checks hold down count too (ejecting beside them could empty the pool).
        let endpoints = upstream.endpoints.len();
        let allowed = endpoints * outlier.max_ejected_percent as usize / 100;
        let _counting = upstream
            .ejecting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = now_ms();
        let out = upstream
            .endpoints
            .iter()
            .filter(|e| {
                !std::ptr::eq(&*e.health, self)
                    && (e.health.active_down.load(Relaxed)
                        || e.health.ejected_until.load(Relaxed) > now)
            })
            .count();
        if out >= allowed {
            return;
        }
        let repeats = self.ejections.load(Relaxed).min(20);
        let cool_down = outlier
            .base_ejection_time
            .saturating_mul(1u32 << repeats)
            .min(outlier.max_ejection_time);
        let until = now + cool_down.as_millis() as u64;
        if self
            .ejected_until
            .compare_exchange(0, until, Relaxed, Relaxed)
            .is_ok()
        {
            self.ejections.fetch_add(1, Relaxed);
            self.total_ejections.fetch_add(1, Relaxed);
            self.last_end.store(until, Relaxed);
            tracing::warn!(
                endpoint = %self.label,
                consecutive_failures = n,
                cool_down_ms = cool_down.as_millis() as u64,
                "endpoint ejected after consecutive failures"
            );
        }
    }
}

/// Starts one checker task per endpoint; each stops when the upstream is dropped.
pub fn spawn_checks(upstream: &Arc<Upstream>) {
    let Some(check) = upstream.config.health_check.clone() else {
        return;
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for index in 0..upstream.endpoints.len() {
        let weak = Arc::downgrade(upstream);
        let check = check.clone();
        rt.spawn(async move { run_checks(weak, index, check).await });
    }
}

async fn run_checks(weak: Weak<Upstream>, index: usize, check: HealthCheckConfig) {
    // A random first delay spreads checks of many endpoints (and Wraiths) over the interval.
    let first = Duration::from_millis(fastrand::u64(0..=check.jitter.as_millis() as u64));
    tokio::time::sleep(first).await;
    let mut passes = 0u32;
    let mut failures = 0u32;
    loop {
        let Some((pool, head, protocol, health, id)) = weak.upgrade().and_then(|u| {
            let e: &Endpoint = u.endpoints.get(index)?;
            Some((
                e.pool.clone(),
                e.check_head.clone(),
                u.config.protocol,
                e.health.clone(),
                u.id,
            ))
        }) else {
            return;
        };
        // Not (or no longer) the live upstream's checks: wait, without probing.
        if health.checker.load(Relaxed) != id {
            drop((pool, health));
            tokio::time::sleep(jittered(check.interval, check.jitter)).await;
            continue;
        }
        let started = Instant::now();
        let result = probe(&pool, &head, protocol, &check).await;
        if health.checker.load(Relaxed) != id {
            continue;
        }
        let record = CheckRecord {
            at: SystemTime::now(),
            failure: result.as_ref().err().cloned(),
            status: result.as_ref().ok().copied().flatten(),
            duration: started.elapsed(),
        };
        if let Ok(mut last) = health.last_check.lock() {
            *last = Some(record);
        }
        let down = health.active_down.load(Relaxed);
        match result {
            Ok(_) => {
                failures = 0;
                passes = passes.saturating_add(1);
                // A passing check overrides a passive ejection (the endpoint answers again).
                let mut back = health.end_ejection_by_check();
                if down && passes >= check.rise {
                    health.active_down.store(false, Relaxed);
                    tracing::info!(endpoint = %health.label, passes, "endpoint is up (health check)");
                    back = true;
                }
                // Requests waiting for a free endpoint may take this one now.
                if back {
                    if let Some(u) = weak.upgrade() {
                        u.wake_waiters();
                    }
                }
            }
            Err(why) => {
                passes = 0;
                failures = failures.saturating_add(1);
                if !down && failures >= check.fall {
                    health.active_down.store(true, Relaxed);
                    tracing::warn!(endpoint = %health.label, failures, reason = %why, "endpoint is down (health check)");
                }
            }
        }
        drop((pool, health));
        tokio::time::sleep(jittered(check.interval, check.jitter)).await;
    }
}

/// `interval` moved randomly by up to `jitter` either way.
fn jittered(interval: Duration, jitter: Duration) -> Duration {
    let j = jitter.as_millis() as i64;
    if j == 0 {
        return interval;
    }
    let delta = fastrand::i64(-j..=j);
    let ms = interval.as_millis() as i64 + delta;
    Duration::from_millis(ms.max(1) as u64)
}

/// One check: `Ok(status)` when the status is in the expected range.
async fn probe(
    pool: &super::h1::Pool,
    head: &[u8],
    protocol: UpstreamProtocol,
    check: &HealthCheckConfig,
) -> Result<Option<u16>, String> {
    let status = if protocol.is_h2() {
        probe_h2(pool, check).await?
    } else {
        super::h1::probe(pool, head, check.timeout).await?
    };
    let code = status.as_u16();
    if (check.expect_status.0..=check.expect_status.1).contains(&code) {
        Ok(Some(code))
    } else {
        Err(format!(
            "status {code} (expected {}-{})",
            check.expect_status.0, check.expect_status.1
        ))
    }
}

/// The same GET over HTTP/2 (h2c or h2), on a fresh connection.
async fn probe_h2(pool: &super::h1::Pool, check: &HealthCheckConfig) -> Result<StatusCode, String> {
    let fut = async {
        let conn = pool.connect().await.map_err(|e| e.to_string())?;
        let io = hyper_util::rt::TokioIo::new(conn.into_stream());
        let (mut sender, driver) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(driver);
        let host = check.host.as_deref().unwrap_or(pool.authority().as_str());
        let scheme = if pool.is_tls() { "https" } else { "http" };
        let req = http::Request::get(format!("{scheme}://{host}{}", check.path))
            .header("user-agent", "wraith-health-check")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP/2 request: {e}"))?;
        Ok(resp.status())
    };
    match tokio::time::timeout(check.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no response within {:?}", check.timeout)),
    }
}

/// The HTTP/1.1 request head a health check sends.
pub fn check_head(check: &HealthCheckConfig, authority: &str) -> Arc<[u8]> {
    let host = check.host.as_deref().unwrap_or(authority);
    Arc::from(
        format!(
            "GET {} HTTP/1.1\r\nhost: {host}\r\nuser-agent: wraith-health-check\r\nconnection: close\r\n\r\n",
            check.path
        )
        .into_bytes(),
    )
}
