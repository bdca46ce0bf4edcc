//! The last minute of traffic, for `wraith status` and `wraith top`: request and error rates,
//! latency percentiles, and who was denied. Sixty one-second slots of atomics; a request adds
//! to the slot of its second, a reader sums the slots of the last sixty seconds.
//!
//! A slot is reset by the first request of a new second (compare-and-swap on its stamp). A
//! request racing that reset can be lost from the figures; they are a dashboard, not an audit
//! (the access log is the audit).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Seconds in the window.
pub const WINDOW_SECS: u64 = 60;
/// Latency buckets: bucket `i` holds durations up to `BASE_MICROS * GROWTH^i`.
const BUCKETS: usize = 64;
const BASE_MICROS: f64 = 50.0;
const GROWTH: f64 = 1.25;
/// Denials remembered for the "top denied" lists.
const DENIALS_KEPT: usize = 4096;

struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    server_errors: AtomicU64,
    client_errors: AtomicU64,
    denied: AtomicU64,
    latency: [AtomicU32; BUCKETS],
}

impl Slot {
    fn new() -> Slot {
        Slot {
            second: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            client_errors: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    fn reset(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.server_errors.store(0, Ordering::Relaxed);
        self.client_errors.store(0, Ordering::Relaxed);
        self.denied.store(0, Ordering::Relaxed);
        for b in &self.latency {
            b.store(0, Ordering::Relaxed);
        }
    }
}

/// One denial, for the "top denied" lists.
#[derive(Debug, Clone)]
struct Denial {
    second: u64,
    ip: IpAddr,
    identity: Option<Arc<str>>,
}

/// The last minute of traffic.
pub struct Window {
    slots: Box<[Slot]>,
    denials: Mutex<VecDeque<Denial>>,
}

impl Default for Window {
    fn default() -> Self {
        Window::new()
    }
}

/// What the window says, for the status document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Seconds the figures cover (less than 60 just after start).
    pub seconds: u64,
    pub requests: u64,
    pub server_errors: u64,
    pub client_errors: u64,
    pub denied: u64,
    /// Latency percentiles in milliseconds (`None` without requests).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Most denied client addresses and identities: (name, count), most first.
    pub top_denied_ips: Vec<(String, u64)>,
    pub top_denied_identities: Vec<(String, u64)>,
}

/// Bucket `i`'s upper bound in microseconds, `BASE_MICROS * GROWTH^i`.
const UPPER_MICROS: [f64; BUCKETS] = {
    let mut upper = [0.0; BUCKETS];
    let mut bound = BASE_MICROS;
    let mut i = 0;
    while i < BUCKETS {
        upper[i] = bound;
        bound *= GROWTH;
        i += 1;
    }
    upper
};

/// The bucket of a request's duration: a binary search over the bounds (six comparisons),
/// where two logarithms per request cost ~130 instructions.
fn bucket_of(d: Duration) -> usize {
    let micros = d.as_micros() as f64;
    UPPER_MICROS
        .partition_point(|&upper| upper < micros)
        .min(BUCKETS - 1)
}

/// A representative value of bucket `i` in milliseconds (geometric middle of its range).
fn bucket_ms(i: usize) -> f64 {
    let upper = BASE_MICROS * GROWTH.powi(i as i32);
    let lower = if i == 0 { 0.0 } else { upper / GROWTH };
    if i == 0 {
        upper / 2.0 / 1000.0
    } else {
        (lower * upper).sqrt() / 1000.0
    }
}

impl Window {
    pub fn new() -> Window {
        Window {
            slots: (0..WINDOW_SECS).map(|_| Slot::new()).collect(),
            denials: Mutex::new(VecDeque::with_capacity(64)),
        }
    }

    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % WINDOW_SECS) as usize];
        let stamp = slot.second.load(Ordering::Acquire);
        if stamp != second
            && slot
                .second
                .compare_exchange(stamp, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.reset();
        }
        slot
    }

    /// Adds one finished request at unix second `now`.
    pub fn record(&self, now: u64, status: u16, duration: Duration, denied: bool) {
        let slot = self.slot(now);
        slot.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            slot.server_errors.fetch_add(1, Ordering::Relaxed);
        } else if status >= 400 {
            slot.client_errors.fetch_add(1, Ordering::Relaxed);
        }
        if denied {
            slot.denied.fetch_add(1, Ordering::Relaxed);
        }
        slot.latency[bucket_of(duration)].fetch_add(1, Ordering::Relaxed);
    }

    /// Remembers who was denied (only called for denials, so the lock is off the common path).
    pub fn record_denial(&self, now: u64, ip: IpAddr, identity: Option<Arc<str>>) {
        if let Ok(mut d) = self.denials.lock() {
            if d.len() >= DENIALS_KEPT {
                d.pop_front();
            }
            d.push_back(Denial {
                second: now,
                ip,
                identity,
            });
        }
    }

    /// The last minute as of unix second `now`; `uptime` caps the seconds covered.
    pub fn summary(&self, now: u64, uptime: Duration) -> Summary {
        let mut s = Summary {
            seconds: uptime.as_secs().clamp(1, WINDOW_SECS),
            ..Summary::default()
        };
        let mut latency = [0u64; BUCKETS];
        for slot in self.slots.iter() {
            let second = slot.second.load(Ordering::Acquire);
            if second + WINDOW_SECS <= now || second > now {
                continue;
            }
            s.requests += slot.requests.load(Ordering::Relaxed);
            s.server_errors += slot.server_errors.load(Ordering::Relaxed);
            s.client_errors += slot.client_errors.load(Ordering::Relaxed);
            s.denied += slot.denied.load(Ordering::Relaxed);
            for (acc, b) in latency.iter_mut().zip(slot.latency.iter()) {
                *acc += u64::from(b.load(Ordering::Relaxed));
            }
        }
        let total: u64 = latency.iter().sum();
        let percentile = |q: f64| -> Option<f64> {
            if total == 0 {
                return None;
            }
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in latency.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return Some(bucket_ms(i));
                }
            }
            Some(bucket_ms(BUCKETS - 1))
        };
        s.p50_ms = percentile(0.50);
        s.p99_ms = percentile(0.99);

        let mut ips: HashMap<IpAddr, u64> = HashMap::new();
        let mut ids: HashMap<Arc<str>, u64> = HashMap::new();
        if let Ok(d) = self.denials.lock() {
            for denial in d.iter().filter(|d| d.second + WINDOW_SECS > now) {
                *ips.entry(denial.ip).or_default() += 1;
                if let Some(id) = &denial.identity {
                    *ids.entry(id.clone()).or_default() += 1;
                }
            }
        }
        s.top_denied_ips = top(ips.into_iter().map(|(k, v)| (k.to_string(), v)));
        s.top_denied_identities = top(ids.into_iter().map(|(k, v)| (k.to_string(), v)));
        s
    }
}

/// The ten largest counts, largest first (ties by name).
fn top(items: impl Iterator<Item = (String, u64)>) -> Vec<(String, u64)> {
    let mut v: Vec<_> = items.collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(10);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_bucket_the_formula_gives() {
        let formula = |micros: f64| {
            if micros <= BASE_MICROS {
                return 0;
            }
            let i = ((micros / BASE_MICROS).ln() / GROWTH.ln()).ceil() as usize;
            i.min(BUCKETS - 1)
        };
        for micros in [
            0,
            1,
            49,
            50,
            51,
            62,
            63,
            100,
            1_000,
            12_345,
            1_000_000,
            u64::MAX / 2,
        ] {
            let d = Duration::from_micros(micros);
            assert_eq!(bucket_of(d), formula(micros as f64), "{micros} µs");
        }
        // Every bucket is reachable, in order.
        for (i, &upper) in UPPER_MICROS.iter().enumerate() {
            let d = Duration::from_micros(upper.floor() as u64);
            assert_eq!(bucket_of(d), i, "bucket {i}");
        }
    }

    #[test]
    fn rates_percentiles_and_expiry() {
        let w = Window::new();
        for _ in 0..99 {
            w.record(1000, 200, Duration::from_millis(2), false);
        }
        w.record(1001, 503, Duration::from_secs(2), false);
        w.record(1001, 403, Duration::from_millis(1), true);
        w.record_denial(
            1001,
            "198.51.100.7".parse().unwrap(),
            Some("spiffe://a/b".into()),
        );
        w.record_denial(1001, "198.51.100.7".parse().unwrap(), None);
        let s = w.summary(1001, Duration::from_secs(3600));
        assert_eq!(s.requests, 101);
        assert_eq!(s.server_errors, 1);
        assert_eq!(s.client_errors, 1);
        assert_eq!(s.denied, 1);
        let p50 = s.p50_ms.unwrap();
        assert!((1.6..2.5).contains(&p50), "p50 {p50}");
        let p99 = s.p99_ms.unwrap();
        assert!((1.6..2.5).contains(&p99), "p99 {p99}");
        assert_eq!(s.top_denied_ips, vec![("198.51.100.7".to_string(), 2)]);
        assert_eq!(
            s.top_denied_identities,
            vec![("spiffe://a/b".to_string(), 1)]
        );
        // A minute later everything has aged out, and the slot is reused cleanly.
        let later = w.summary(1061, Duration::from_secs(3600));
        assert_eq!(later.requests, 0);
        assert!(later.top_denied_ips.is_empty());
        w.record(1062, 200, Duration::from_millis(1), false);
        assert_eq!(w.summary(1062, Duration::from_secs(3600)).requests, 1);
    }
}
