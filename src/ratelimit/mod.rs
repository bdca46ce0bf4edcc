//! Rate limits: GCRA (governor) per key, keyed by client address, client identity, route or
//! a trusted proxy's header (by a keyed 128-bit hash of its value, never the value itself).
//!
//! A route's limits are its own `rate_limits`, or the `[rate_limit]` defaults (one shared set
//! of buckets for every route that uses them). Each limit is a `Limiter`, generic over the
//! clock so tests drive a fake one. Key state is bounded two ways: the runtime's upkeep task
//! drops keys whose bucket is full again (`Limiter::cleanup`, governor's `retain_recent`),
//! and past `max_keys` new keys go to one of `OVERFLOW_BUCKETS` shared buckets instead of
//! growing the map (a flood of fresh addresses degrades to shared limits rather than
//! unbounded memory). The task runs every `cleanup_interval`, and sooner for a limit whose
//! table is full: a new key that finds no room asks for a cleanup (at most once a second)
//! and wakes the task (`table_full`), since a flood's keys often refill well before the
//! timer's next run and legitimate newcomers should not wait for it. The cleanup visits
//! every key, so it never runs on a request's worker; the request that asked is counted in
//! its overflow bucket. Limiters whose settings did not change are carried into the next
//! snapshot on reload, with their state; a limit whose settings changed gets a new limiter
//! that starts each key with what it had spent of the old one (`Limiter::succeed`).

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::HeaderMap;
use tokio::sync::Notify;

pub mod shared;

use crate::config::{LimitKey, LimitMode, RateLimitConfig, SharedOnError};
use crate::error::{GatewayError, RateLimited};
use crate::identity::Identity;
use crate::telemetry::access_log::RateLimitRecord;

/// What a request is counted by in one limit.
#[derive(Debug, Clone)]
pub enum Key {
    /// An IPv4 address, or an IPv6 address cut to its /64.
    Ip(IpAddr),
    /// A client certificate (by SPIFFE ID, else fingerprint).
    Identity(IdentityKey),
    /// The whole route, by a keyed hash of its name (`Limiter::route_key`).
    Route(u64),
    /// A header value from a trusted proxy, as a keyed 128-bit hash (`Limiter::header_key`):
    /// a fixed 16 bytes whatever the value's length, and no reference to the request's
    /// buffers (hyper's `HeaderValue` is a slice of the connection's read buffer).
    Header(u128),
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        match (self, other) {
            (Key::Ip(a), Key::Ip(b)) => a == b,
            (Key::Identity(a), Key::Identity(b)) => a == b,
            (Key::Route(a), Key::Route(b)) => a == b,
            (Key::Header(a), Key::Header(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Key::Ip(ip) => ip.hash(state),
            Key::Identity(id) => id.hash(state),
            Key::Route(r) => r.hash(state),
            Key::Header(v) => v.hash(state),
        }
    }
}

/// A shared identity compared by the name it is limited under: no copy per request.
#[derive(Debug, Clone)]
pub struct IdentityKey(pub Arc<Identity>);

impl IdentityKey {
    /// The SPIFFE ID, else the certificate fingerprint (never a client-supplied header).
    pub fn as_str(&self) -> &str {
        self.0.spiffe_id.as_deref().unwrap_or(&self.0.fingerprint)
    }
}

impl PartialEq for IdentityKey {
    fn eq(&self, other: &IdentityKey) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for IdentityKey {}

impl Hash for IdentityKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

/// An address as a limit key: IPv6 clients usually own a whole /64, so they count as one.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match crate::proxy::headers::canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// What the limit stage knows about a request.
pub struct RequestFacts<'a> {
    /// The client address after trusted-proxy resolution.
    pub client: IpAddr,
    /// Whether the TCP peer is a trusted proxy (header keys are believed only then).
    pub peer_trusted: bool,
    /// The verified client certificate, if any.
    pub identity: Option<&'a Arc<Identity>>,
    pub headers: &'a HeaderMap,
    /// The route the request matched (`key = "route"`: one bucket per route, also for the
    /// `[rate_limit]` defaults every route without limits of its own shares).
    pub route: &'a str,
}

/// How many shared buckets new keys spread over while the key table is full: a flood's keys
/// share each bucket with 1/64 of the new clients, not all of them.
const OVERFLOW_BUCKETS: usize = 64;

/// The least time between two cleanups a full table asks for (each one visits every key).
const ASK_EVERY: Duration = Duration::from_secs(1);

/// The key state of one limit: a concurrent map with a cap, plus the overflow buckets.
pub struct CappedStore<C: Clock> {
    keys: Arc<Keys>,
    cap: usize,
    /// Shared with the `Limiter`, which governor gives no way back to its store.
    full: Arc<FullTable<C>>,
}

/// The buckets of one limit. Shared with the `Limiter` (governor gives no way back to its
/// store), which reads them when a reload changes the limit (`Limiter::take_over`).
struct Keys {
    map: DashMap<Key, InMemoryState>,
    /// Approximate number of keys (exact after each cleanup).
    count: AtomicUsize,
    /// Where keys not in a full table are counted, picked by a keyed hash of the key (so a
    /// client cannot choose whose bucket it shares).
    overflow: Box<[InMemoryState]>,
    overflow_hasher: RandomState,
}

/// How a full table asks the upkeep task for room.
struct FullTable<C: Clock> {
    clock: C,
    /// The instant `next` counts from.
    start: C::Instant,
    /// Nanoseconds after `start` before which no new ask is made.
    next: AtomicU64,
    /// Set by an ask, taken by the cleanup that answers it.
    asked: AtomicBool,
    /// Wakes the task waiting in `table_full`; keeps the wake-up when nobody waits yet.
    wake: Notify,
}

impl<C: Clock> FullTable<C> {
    fn new(clock: C) -> FullTable<C> {
        FullTable {
            start: clock.now(),
            clock,
            next: AtomicU64::new(0),
            asked: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// Asks for a cleanup, unless one was asked for less than `ASK_EVERY` ago. Reads the
    /// clock, so only a full table calls it.
    fn ask(&self) {
        let now = self.clock.now().duration_since(self.start).as_u64();
        let next = self.next.load(Ordering::Relaxed);
        if now < next {
            return;
        }
        let after = now.saturating_add(ASK_EVERY.as_nanos() as u64);
        // One caller per second wins; the others' keys go to overflow like its own.
        if self
            .next
            .compare_exchange(next, after, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.asked.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }
}

impl Keys {
    fn new(overflow_hasher: RandomState) -> Keys {
        Keys {
            map: DashMap::new(),
            count: AtomicUsize::new(0),
            overflow: (0..OVERFLOW_BUCKETS)
                .map(|_| InMemoryState::default())
                .collect(),
            overflow_hasher,
        }
    }

    /// The overflow bucket of `key`.
    fn overflow_of(&self, key: &Key) -> &InMemoryState {
        &self.overflow[self.overflow_hasher.hash_one(key) as usize % OVERFLOW_BUCKETS]
    }
}

impl<C: Clock> StateStore for CappedStore<C> {
    type Key = Key;

    fn measure_and_replace<T, F, E>(&self, key: &Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let keys = &*self.keys;
        if PEEK.get() {
            // What the request would get, with nothing stored (`Limiter::peek_key`).
            let state = keys.map.get(key);
            let tat = match &state {
                Some(s) => tat(s),
                None if keys.count.load(Ordering::Relaxed) >= self.cap => {
                    tat(keys.overflow_of(key))
                }
                None => None,
            };
            return f(tat).map(|(t, _)| t);
        }
        if let Some(state) = keys.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        if keys.count.load(Ordering::Relaxed) >= self.cap {
            // Full: the upkeep task is asked to drop the keys that are back to a full bucket
            // (it visits every key, so not here), and this key counts in its overflow bucket.
            self.full.ask();
            return keys
                .overflow_of(key)
                .measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = match keys.map.entry(key.clone()) {
            dashmap::Entry::Occupied(o) => o.into_ref(),
            dashmap::Entry::Vacant(v) => {
                keys.count.fetch_add(1, Ordering::Relaxed);
                v.insert(InMemoryState::default())
            }
        };
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

thread_local! {
    /// Set while `Limiter::peek_key` runs: the store answers without storing.
    static PEEK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The theoretical arrival time a state holds, read without changing it.
fn tat(state: &InMemoryState) -> Option<Nanos> {
    state
        .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
        .err()
        .flatten()
}

impl<C: Clock> ShrinkableKeyedStateStore<Key> for CappedStore<C> {
    fn retain_recent(&self, drop_below: Nanos) {
        let keys = &self.keys;
        keys.map
            .retain(|_, state| tat(state).is_some_and(|t| t > drop_below));
        keys.count.store(keys.map.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.keys.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.keys.map.len()
    }

    fn is_empty(&self) -> bool {
        self.keys.map.is_empty()
    }
}

/// One configured limit with its key state.
pub struct Limiter<C: Clock = DefaultClock> {
    /// The settings it was built from (compared on reload).
    pub config: RateLimitConfig,
    /// The key cap it was built with.
    pub max_keys: usize,
    limiter: RateLimiter<Key, CappedStore<C>, C, NoOpMiddleware<C::Instant>>,
    /// Its buckets, as its store counts in them.
    keys: Arc<Keys>,
    /// How its key table asks for a cleanup when full.
    full: Arc<FullTable<C>>,
    /// The time one request's worth of quota takes to come back (governor's GCRA `t`).
    period: Duration,
    window_secs: u64,
    /// The secret SipHash key for header values: random per limiter, so which values
    /// collide cannot be known, let alone chosen, by a client.
    header_hasher: RandomState,
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("config", &self.config)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

/// The outcome of one limit for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Under the limit.
    Allowed,
    /// Over the limit; wait this long.
    Refused(Duration),
}

impl Limiter<DefaultClock> {
    /// A limiter on the real (monotonic, quanta) clock.
    pub fn new(config: RateLimitConfig, max_keys: usize) -> Limiter<DefaultClock> {
        Limiter::with_clock(config, max_keys, DefaultClock::default())
    }
}

impl<C: Clock> Limiter<C> {
    /// A limiter on `clock` (tests pass `governor::clock::FakeRelativeClock`).
    pub fn with_clock(config: RateLimitConfig, max_keys: usize, clock: C) -> Limiter<C>
    where
        C: Clone,
    {
        Limiter::with_secrets(
            config,
            max_keys,
            clock,
            RandomState::new(),
            RandomState::new(),
        )
    }

    /// A limiter with the given secret hash keys (for header and route keys, and for the
    /// choice of overflow bucket): a reload's successor takes its predecessor's, so that the
    /// same request lands on the same bucket.
    fn with_secrets(
        config: RateLimitConfig,
        max_keys: usize,
        clock: C,
        header_hasher: RandomState,
        overflow_hasher: RandomState,
    ) -> Limiter<C>
    where
        C: Clone,
    {
        // The config refuses a limit whose burst takes over `MAX_REFILL` to refill; held to
        // it here too, as governor's arithmetic on it is unchecked (and panics in debug).
        let period = config
            .period()
            .clamp(Duration::from_nanos(1), crate::config::MAX_REFILL);
        let burst = config.burst.min(config.max_burst());
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(config.count))
            .allow_burst(burst);
        let refill = period.saturating_mul(burst.get());
        let full = Arc::new(FullTable::new(clock.clone()));
        let keys = Arc::new(Keys::new(overflow_hasher));
        let store = CappedStore {
            keys: keys.clone(),
            cap: max_keys,
            full: full.clone(),
        };
        let limiter = RateLimiter::new(quota, store, clock);
        Limiter {
            full,
            keys,
            period,
            window_secs: crate::error::ceil_secs(refill),
            limiter,
            max_keys,
            config,
            header_hasher,
        }
    }

    /// The limiter a reload builds for `config` in place of `old` (the limit of the same
    /// name and key kind, whose settings changed): each key starts with what it had spent of
    /// `old`'s burst, counted in requests, as nginx's `limit_req` zones keep their `excess`
    /// across a reload that changes the rate. A client that had spent all of a burst the
    /// reload enlarges gets the difference, not a whole new burst; one whose spending exceeds a
    /// reduced burst is at its new limit. At most `max_keys` keys are carried (the rest start
    /// afresh, as keys past the cap would have): the cap bounds memory.
    fn succeed(config: RateLimitConfig, max_keys: usize, old: &Limiter<C>) -> Limiter<C>
    where
        C: Clone,
    {
        let new = Limiter::with_secrets(
            config,
            max_keys,
            old.limiter.clock().clone(),
            old.header_hasher.clone(),
            old.keys.overflow_hasher.clone(),
        );
        new.take_over(old);
        new
    }

    /// Nanoseconds since this limiter's start, the time its buckets' TATs count in. (The
    /// start is `FullTable::start`, taken just before governor takes its own: they differ by
    /// the few nanoseconds between the two clock reads.)
    fn now_nanos(&self) -> u64 {
        let clock = self.limiter.clock();
        clock.now().duration_since(self.full.start).as_u64()
    }

    /// Copies what each key of `old` has spent into this (new, empty) limiter's buckets.
    fn take_over(&self, old: &Limiter<C>) {
        let (old_now, now) = (old.now_nanos(), self.now_nanos());
        let old_period = old.period.as_nanos().max(1);
        let period = self.period.as_nanos().max(1);
        // An empty bucket: every request of the burst spent.
        let empty = period.saturating_mul(u128::from(self.config.burst.get()));
        // The bucket's TAT here for `state`'s TAT there; `None` for a full bucket.
        let carried = |state: &InMemoryState| -> Option<Nanos> {
            let ahead = tat(state)?.as_u64().checked_sub(old_now)?;
            let spent = (u128::from(ahead) * period / old_period).min(empty);
            let spent = u64::try_from(spent).unwrap_or(u64::MAX);
            (spent > 0).then(|| Nanos::from(now.saturating_add(spent)))
        };
        let set = |state: &InMemoryState, to: Nanos| {
            let _ = state.measure_and_replace(&NotKeyed::NonKey, |_| {
                Ok::<_, std::convert::Infallible>(((), to))
            });
        };
        for entry in old.keys.map.iter() {
            if self.keys.map.len() >= self.max_keys {
                break;
            }
            if let Some(to) = carried(entry.value()) {
                let state = InMemoryState::default();
                set(&state, to);
                self.keys.map.insert(entry.key().clone(), state);
            }
        }
        self.keys
            .count
            .store(self.keys.map.len(), Ordering::Relaxed);
        for (from, to) in old.keys.overflow.iter().zip(self.keys.overflow.iter()) {
            if let Some(t) = carried(from) {
                set(to, t);
            }
        }
    }

    /// The key for header value `value`: two SipHash-1-3 outputs under this limiter's secret
    /// key, domain-separated by a leading byte. 128 bits make a collision among even
    /// billions of values negligible; only the hash is kept, never the bytes.
    fn header_key(&self, value: &[u8]) -> Key {
        let half = |domain: u8| {
            let mut h = self.header_hasher.build_hasher();
            h.write_u8(domain);
            h.write(value);
            h.finish()
        };
        Key::Header(u128::from(half(0)) << 64 | u128::from(half(1)))
    }

    /// The key of route `name`: its name hashed under this limiter's secret key.
    fn route_key(&self, name: &str) -> u64 {
        self.header_hasher.hash_one(name)
    }

    /// The key this limit counts `req` by.
    pub fn key_for(&self, req: &RequestFacts<'_>) -> Key {
        match &self.config.key {
            LimitKey::Ip => Key::Ip(ip_key(req.client)),
            LimitKey::Identity => match req.identity {
                Some(id) => Key::Identity(IdentityKey(id.clone())),
                // Anonymous clients are still limited, by address.
                None => Key::Ip(ip_key(req.client)),
            },
            LimitKey::Route => Key::Route(self.route_key(req.route)),
            LimitKey::Header(name) => match req.headers.get(name) {
                Some(v) if req.peer_trusted => self.header_key(v.as_bytes()),
                _ => Key::Ip(ip_key(req.client)),
            },
        }
    }

    /// Counts one request under `key`.
    pub fn check_key(&self, key: &Key) -> Outcome {
        match self.limiter.check_key(key) {
            Ok(()) => Outcome::Allowed,
            Err(not_until) => {
                Outcome::Refused(not_until.wait_time_from(self.limiter.clock().now()))
            }
        }
    }

    /// What counting one request under `key` would give, counting nothing.
    pub fn peek_key(&self, key: &Key) -> Outcome {
        /// Clears the flag however the check ends: a flag left set (by a panic the runtime
        /// caught) would turn every later count on this worker thread into a question.
        struct Clear;
        impl Drop for Clear {
            fn drop(&mut self) {
                PEEK.set(false);
            }
        }
        PEEK.set(true);
        let _clear = Clear;
        self.check_key(key)
    }

    /// Drops keys whose bucket is full again, and returns memory to the allocator. Visits
    /// every key: the upkeep task runs it, off the async workers.
    pub fn cleanup(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Whether a new key found the table full since the last call (which takes the ask):
    /// the limit wants a `cleanup` now rather than at the next `cleanup_interval`.
    pub fn take_cleanup_ask(&self) -> bool {
        self.full.asked.swap(false, Ordering::Acquire)
    }

    /// Keys currently tracked.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }

    /// The refusal for a request this limit turned away.
    pub fn refusal(&self, wait: Duration) -> GatewayError {
        GatewayError::RateLimited(Box::new(RateLimited {
            name: self.config.name.clone(),
            retry_after: wait,
            quota: self.config.burst.get(),
            window_secs: self.window_secs,
        }))
    }
}

/// Resolves once one of `limits` has found its table full and asked for a cleanup (at most
/// once a second each; an ask made while nobody waited is kept for the next wait). Never,
/// without limits.
pub async fn table_full<C: Clock>(limits: &[Arc<Limiter<C>>]) {
    if limits.is_empty() {
        return std::future::pending().await;
    }
    let asks = limits.iter().map(|l| Box::pin(l.full.wake.notified()));
    futures_util::future::select_all(asks).await;
}

/// The rate-limit stage: a request refused by one enforced limit of the route is counted by
/// none of them; one they all let through is counted by every one. (Counted as it went, a
/// client refused by its per-address limit would still spend the route's shared budget.) As
/// nginx's `limit_req` with several zones does: every limit but the last is only asked, the
/// last counts the request, then the others do. Shadow limits never refuse: a request one of
/// them would have refused is logged, and recorded as `shadow_limited`.
///
/// Runs after decisions and policy, so refused or banned clients never spend quota.
///
/// `names` is `names(limits)`, made once per route: what the record of a request every limit
/// let through says.
pub fn check<C: Clock>(
    limits: &[Arc<Limiter<C>>],
    names: &Arc<str>,
    req: &RequestFacts<'_>,
) -> Result<Option<RateLimitRecord>, GatewayError> {
    let Some((last, rest)) = limits.split_last() else {
        return Ok(None);
    };
    let enforced = |l: &Limiter<C>| l.config.mode == LimitMode::Enforce;
    for limit in rest.iter().filter(|l| enforced(l)) {
        if let Outcome::Refused(wait) = limit.peek_key(&limit.key_for(req)) {
            return Err(limit.refusal(wait));
        }
    }
    let mut shadow: Option<&Limiter<C>> = None;
    // The last one counts first, so that its refusal leaves the others untouched. (Between
    // the asking and the counting another request may take an earlier limit's last token:
    // that limit then counts this one over its rate, as nginx's would.)
    for (i, limit) in std::iter::once(last).chain(rest).enumerate() {
        let Outcome::Refused(wait) = limit.check_key(&limit.key_for(req)) else {
            continue;
        };
        if !enforced(limit) {
            log_shadow(&limit.config.name, req, wait);
            shadow.get_or_insert(limit);
        } else if i == 0 {
            return Err(limit.refusal(wait));
        }
    }
    Ok(Some(match shadow {
        Some(limit) => RateLimitRecord {
            limited: false,
            shadow: true,
            limiter: limit.config.name.clone(),
        },
        None => RateLimitRecord {
            limited: false,
            shadow: false,
            limiter: names.clone(),
        },
    }))
}

fn log_shadow(limit: &str, req: &RequestFacts<'_>, wait: Duration) {
    tracing::info!(
        limit,
        route = req.route,
        client = %req.client,
        retry_after_ms = wait.as_millis() as u64,
        "rate limit would refuse this request (shadow mode)"
    );
}

/// `check` for a route with `shared` limits (`Route::shared_limits`): its local enforced
/// limits are asked first, then Redis checks and counts the shared ones in one call
/// (`shared::SharedStore::check`), then the local ones count the request: a request one
/// enforced limit refuses is counted by none, but for a race between the asking and the
/// counting, as in `check`. When Redis does not answer, the shared limits fall back to
/// `on_error`: counted here like the local ones, or left out. `own_route` names the route
/// when the limits are its own (not the `[rate_limit]` defaults): their buckets are its own.
pub async fn check_with_shared(
    limits: &[Arc<Limiter>],
    names: &Arc<str>,
    req: &RequestFacts<'_>,
    own_route: Option<&str>,
    store: Option<&shared::SharedStore>,
) -> Result<Option<RateLimitRecord>, GatewayError> {
    let Some(store) = store else {
        // The config refuses shared limits without [rate_limit.redis].
        return check(limits, names, req);
    };
    let enforced = |l: &Limiter| l.config.mode == LimitMode::Enforce;
    let (shared, local): (Vec<&Arc<Limiter>>, Vec<&Arc<Limiter>>) =
        limits.iter().partition(|l| l.config.shared);
    for limit in local.iter().filter(|l| enforced(l)) {
        if let Outcome::Refused(wait) = limit.peek_key(&limit.key_for(req)) {
            return Err(limit.refusal(wait));
        }
    }
    let shadow = match store.check(&shared, req, own_route).await {
        Ok(shared::Verdict::Refused(i, wait)) => return Err(shared[i].refusal(wait)),
        Ok(shared::Verdict::Allowed { shadow }) => shadow.map(|(i, wait)| {
            log_shadow(&shared[i].config.name, req, wait);
            shared[i]
        }),
        Err(_) => match store.settings.on_error {
            SharedOnError::Local => return check(limits, names, req),
            SharedOnError::Open => None,
        },
    };
    let local: Vec<Arc<Limiter>> = local.into_iter().cloned().collect();
    let counted = check(&local, names, req)?;
    Ok(Some(match (counted, shadow) {
        (Some(r), _) if r.shadow => r,
        (_, Some(limit)) => RateLimitRecord {
            limited: false,
            shadow: true,
            limiter: limit.config.name.clone(),
        },
        _ => RateLimitRecord {
            limited: false,
            shadow: false,
            limiter: names.clone(),
        },
    }))
}

/// The names of `limits`, comma-separated.
pub fn names<C: Clock>(limits: &[Arc<Limiter<C>>]) -> Arc<str> {
    match limits {
        [one] => one.config.name.clone(),
        all => all
            .iter()
            .map(|l| &*l.config.name)
            .collect::<Vec<_>>()
            .join(",")
            .into(),
    }
}

/// A limiter for `config`: the one from `previous` with the same settings (keeping its
/// state), else `successor`.
pub fn reuse_or_new<C: Clock + Clone + Default>(
    previous: &[Arc<Limiter<C>>],
    config: &RateLimitConfig,
    max_keys: usize,
) -> Arc<Limiter<C>> {
    previous
        .iter()
        .find(|l| l.config == *config && l.max_keys == max_keys)
        .cloned()
        .unwrap_or_else(|| successor(previous, config, max_keys))
}

/// A new limiter for `config` that carries over what each client has spent of the limit of
/// `previous` with the same name and key kind (`Limiter::succeed`), if there is one: a
/// changed rate, burst, mode or `max_keys` must not hand every client a fresh burst.
pub fn successor<C: Clock + Clone + Default>(
    previous: &[Arc<Limiter<C>>],
    config: &RateLimitConfig,
    max_keys: usize,
) -> Arc<Limiter<C>> {
    let before = previous
        .iter()
        .find(|l| l.config.name == config.name && l.config.key == config.key);
    Arc::new(match before {
        Some(old) => Limiter::succeed(config.clone(), max_keys, old),
        None => Limiter::with_clock(config.clone(), max_keys, C::default()),
    })
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;
    use http::HeaderValue;

    use super::*;

    fn config(key: LimitKey, count: u32, per: Duration, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            name: "test".into(),
            key,
            count: NonZeroU32::new(count).unwrap(),
            per,
            burst: NonZeroU32::new(burst).unwrap(),
            mode: LimitMode::Enforce,
            shared: false,
        }
    }

    fn facts<'a>(
        ip: &str,
        identity: Option<&'a Arc<Identity>>,
        headers: &'a HeaderMap,
        trusted: bool,
    ) -> RequestFacts<'a> {
        RequestFacts {
            client: ip.parse().unwrap(),
            peer_trusted: trusted,
            identity,
            headers,
            route: "r",
        }
    }

    fn identity(spiffe: Option<&str>, fingerprint: &str) -> Arc<Identity> {
        Arc::new(Identity {
            spiffe_id: spiffe.map(String::from),
            fingerprint: fingerprint.into(),
            ..Identity::default()
        })
    }

    /// A limit the config would refuse (its burst takes over `MAX_REFILL` to refill) still
    /// makes a limiter that works, its burst cut to what fits, rather than a panic in
    /// governor's unchecked arithmetic.
    #[test]
    fn a_burst_past_the_longest_refill_is_cut_not_a_panic() {
        let clock = FakeRelativeClock::default();
        for (count, per, burst) in [
            (1, Duration::from_secs(3600), u32::MAX),
            (1, crate::config::MAX_REFILL, 10),
        ] {
            let c = config(LimitKey::Ip, count, per, burst);
            assert!(c.refill().is_none());
            let l = Limiter::with_clock(c.clone(), 100, clock.clone());
            let h = HeaderMap::new();
            let key = l.key_for(&facts("192.0.2.1", None, &h, false));
            for _ in 0..c.max_burst().get().min(1000) {
                assert_eq!(l.check_key(&key), Outcome::Allowed);
            }
            if c.max_burst().get() <= 1000 {
                assert!(matches!(l.check_key(&key), Outcome::Refused(_)));
            }
        }
    }

    #[test]
    fn exactly_burst_then_one_per_period() {
        let clock = FakeRelativeClock::default();
        // 2 per second, burst 5.
        let l = Limiter::with_clock(
            config(LimitKey::Ip, 2, Duration::from_secs(1), 5),
            100,
            clock.clone(),
        );
        let h = HeaderMap::new();
        let key = l.key_for(&facts("192.0.2.1", None, &h, false));
        for i in 0..5 {
            assert_eq!(
                l.check_key(&key),
                Outcome::Allowed,
                "request {i} of the burst"
            );
        }
        assert_eq!(
            l.check_key(&key),
            Outcome::Refused(Duration::from_millis(500))
        );
        clock.advance(Duration::from_millis(499));
        assert_eq!(
            l.check_key(&key),
            Outcome::Refused(Duration::from_millis(1))
        );
        clock.advance(Duration::from_millis(1));
        assert_eq!(l.check_key(&key), Outcome::Allowed);
        assert!(matches!(l.check_key(&key), Outcome::Refused(_)));
        // A whole refill later, the full burst is back.
        clock.advance(Duration::from_millis(2500));
        for _ in 0..5 {
            assert_eq!(l.check_key(&key), Outcome::Allowed);
        }
        assert!(matches!(l.check_key(&key), Outcome::Refused(_)));
    }

    #[test]
    fn the_refusal_carries_ietf_fields() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(
            config(LimitKey::Route, 10, Duration::from_secs(60), 3),
            100,
            clock,
        );
        let h = HeaderMap::new();
        let req = facts("192.0.2.1", None, &h, false);
        let limits = [Arc::new(l)];
        for _ in 0..3 {
            check(&limits, &names(&limits), &req).unwrap();
        }
        let err = check(&limits, &names(&limits), &req).unwrap_err();
        assert_eq!(err.status(), http::StatusCode::TOO_MANY_REQUESTS);
        // One request per 6s; a full burst of 3 refills in 18s.
        assert_eq!(err.retry_after(), Some(6));
        let mut hm = HeaderMap::new();
        err.add_headers(&mut hm);
        assert_eq!(hm["ratelimit-policy"], "\"test\";q=3;w=18");
        assert_eq!(hm["ratelimit"], "\"test\";r=0;t=6");
    }

    #[test]
    fn identity_keys_are_independent_per_certificate() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(
            config(LimitKey::Identity, 1, Duration::from_secs(1), 2),
            100,
            clock,
        );
        let h = HeaderMap::new();
        let alice = identity(Some("spiffe://example.org/alice"), "aa");
        // Same SPIFFE ID on a second connection (another Arc): same bucket.
        let alice2 = identity(Some("spiffe://example.org/alice"), "a2");
        let bob = identity(None, "bb");
        let k = |id| l.key_for(&facts("192.0.2.1", Some(id), &h, false));
        assert_eq!(l.check_key(&k(&alice)), Outcome::Allowed);
        assert_eq!(l.check_key(&k(&alice2)), Outcome::Allowed);
        assert!(matches!(l.check_key(&k(&alice)), Outcome::Refused(_)));
        // Bob, from the same address, has his own bucket (keyed by fingerprint).
        assert_eq!(l.check_key(&k(&bob)), Outcome::Allowed);
        assert_eq!(l.check_key(&k(&bob)), Outcome::Allowed);
        assert!(matches!(l.check_key(&k(&bob)), Outcome::Refused(_)));
        // Anonymous clients fall back to their address.
        assert!(matches!(
            l.key_for(&facts("192.0.2.1", None, &h, false)),
            Key::Ip(_)
        ));
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let h = HeaderMap::new();
        let l = Limiter::with_clock(
            config(LimitKey::Ip, 1, Duration::from_secs(1), 1),
            100,
            FakeRelativeClock::default(),
        );
        let a = l.key_for(&facts("2001:db8:1:2:aaaa::1", None, &h, false));
        let b = l.key_for(&facts("2001:db8:1:2:bbbb::9", None, &h, false));
        let c = l.key_for(&facts("2001:db8:1:3::1", None, &h, false));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(l.check_key(&a), Outcome::Allowed);
        assert!(matches!(l.check_key(&b), Outcome::Refused(_)));
        assert_eq!(l.check_key(&c), Outcome::Allowed);
    }

    #[test]
    fn header_keys_only_from_trusted_proxies() {
        let l = Limiter::with_clock(
            config(
                LimitKey::Header(http::HeaderName::from_static("x-client-id")),
                1,
                Duration::from_secs(1),
                1,
            ),
            100,
            FakeRelativeClock::default(),
        );
        let mut h = HeaderMap::new();
        h.insert("x-client-id", HeaderValue::from_static("tenant-7"));
        assert!(matches!(
            l.key_for(&facts("10.0.0.1", None, &h, true)),
            Key::Header(_)
        ));
        assert_eq!(
            l.key_for(&facts("10.0.0.1", None, &h, false)),
            Key::Ip("10.0.0.1".parse().unwrap())
        );
    }

    fn header_limit() -> Limiter<FakeRelativeClock> {
        Limiter::with_clock(
            config(
                LimitKey::Header(http::HeaderName::from_static("x-client-id")),
                1,
                Duration::from_secs(1),
                1,
            ),
            100,
            FakeRelativeClock::default(),
        )
    }

    #[test]
    fn header_keys_do_not_keep_the_value() {
        let l = header_limit();
        // A 60 KiB value in a buffer whose owner we can watch, as hyper hands out slices of
        // its read buffer.
        let buffer: Arc<[u8]> = vec![b'a'; 60 * 1024].into();
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buffer.clone()));
        h.insert("x-client-id", value.unwrap());
        let key = l.key_for(&facts("10.0.0.1", None, &h, true));
        assert_eq!(l.check_key(&key), Outcome::Allowed);
        assert_eq!(l.keys(), 1);
        // The request is gone; the limiter still tracks its key, but not its bytes.
        drop((h, key));
        assert_eq!(
            Arc::strong_count(&buffer),
            1,
            "a stored key holds the buffer"
        );
        assert_eq!(l.keys(), 1);
    }

    #[test]
    fn header_keys_tell_values_apart() {
        let l = header_limit();
        let key = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert("x-client-id", HeaderValue::from_bytes(v).unwrap());
            l.key_for(&facts("10.0.0.1", None, &h, true))
        };
        let long = vec![b'x'; 64 * 1024];
        assert_eq!(key(b"tenant-7"), key(b"tenant-7"));
        assert_eq!(key(&long), key(&long));
        assert_ne!(key(b"tenant-7"), key(b"tenant-8"));
        // A value and its prefix, and values of other lengths, are different keys.
        assert_ne!(key(b"tenant-7"), key(b"tenant-"));
        assert_ne!(key(&long), key(&long[1..]));
        // Same value, same bucket; another value, its own.
        assert_eq!(l.check_key(&key(b"tenant-7")), Outcome::Allowed);
        assert!(matches!(
            l.check_key(&key(b"tenant-7")),
            Outcome::Refused(_)
        ));
        assert_eq!(l.check_key(&key(b"tenant-8")), Outcome::Allowed);
        // Another limiter has another secret: its keys are unrelated to this one's.
        let other = header_limit();
        let mut h = HeaderMap::new();
        h.insert("x-client-id", HeaderValue::from_static("tenant-7"));
        assert_ne!(
            other.key_for(&facts("10.0.0.1", None, &h, true)),
            key(b"tenant-7")
        );
    }

    #[test]
    fn key_state_stays_bounded() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(
            config(LimitKey::Ip, 10, Duration::from_secs(1), 10),
            1000,
            clock.clone(),
        );
        let h = HeaderMap::new();
        // 100k distinct addresses: the map stops at the cap; the rest share the overflow.
        for i in 0..100_000u32 {
            let ip = std::net::Ipv4Addr::from(0xC000_0000 + i).to_string();
            let _ = l.check_key(&l.key_for(&facts(&ip, None, &h, false)));
        }
        assert_eq!(l.keys(), 1000);
        // Keys whose bucket refilled are dropped by cleanup.
        clock.advance(Duration::from_secs(2));
        l.cleanup();
        assert_eq!(l.keys(), 0);
        // ...and new keys are tracked again.
        let k = l.key_for(&facts("192.0.2.1", None, &h, false));
        assert_eq!(l.check_key(&k), Outcome::Allowed);
        assert_eq!(l.keys(), 1);
    }

    /// A limit of one request per second (burst 1) with room for 10 keys, filled by 10
    /// addresses at the fake clock's start.
    fn full_table(clock: &FakeRelativeClock) -> Limiter<FakeRelativeClock> {
        let l = Limiter::with_clock(
            config(LimitKey::Ip, 1, Duration::from_secs(1), 1),
            10,
            clock.clone(),
        );
        let h = HeaderMap::new();
        for i in 0..10 {
            let k = l.key_for(&facts(&format!("198.51.100.{i}"), None, &h, false));
            assert_eq!(l.check_key(&k), Outcome::Allowed);
        }
        assert_eq!(l.keys(), 10);
        l
    }

    fn ip(l: &Limiter<FakeRelativeClock>, ip: &str) -> Key {
        l.key_for(&facts(ip, None, &HeaderMap::new(), false))
    }

    #[test]
    fn a_full_table_asks_for_a_cleanup_and_sweeps_nothing_itself() {
        let clock = FakeRelativeClock::default();
        let l = full_table(&clock);
        assert!(!l.take_cleanup_ask(), "a table with room asks nothing");
        // Every bucket is full again (governor's bound: one interval past its arrival time);
        // the cleanup timer has not run.
        clock.advance(Duration::from_secs(2));
        // A new client is counted in an overflow bucket; its request's worker drops no key.
        assert_eq!(l.check_key(&ip(&l, "192.0.2.1")), Outcome::Allowed);
        assert_eq!(l.keys(), 10);
        assert!(l.take_cleanup_ask());
        assert!(
            !l.take_cleanup_ask(),
            "taken by the cleanup that answers it"
        );
        // What the woken upkeep task does.
        l.cleanup();
        // New clients get their own buckets, not one shared overflow bucket of 1.
        for a in ["192.0.2.2", "192.0.2.3"] {
            assert_eq!(l.check_key(&ip(&l, a)), Outcome::Allowed, "{a}");
            assert!(matches!(l.check_key(&ip(&l, a)), Outcome::Refused(_)));
        }
        assert_eq!(
            l.keys(),
            2,
            "the refilled keys were dropped, the new ones tracked"
        );
    }

    #[test]
    fn a_full_table_keeps_keys_still_limited_and_asks_at_most_once_a_second() {
        let clock = FakeRelativeClock::default();
        let l = full_table(&clock);
        // At 1.5 s the buckets (arrival time 1 s) are not yet back to their starting state
        // by governor's bound (2 s): the cleanup this new key asks for keeps them all.
        clock.advance(Duration::from_millis(1500));
        let _ = l.check_key(&ip(&l, "192.0.2.1"));
        assert!(l.take_cleanup_ask());
        l.cleanup();
        assert_eq!(l.keys(), 10);
        // At 2.2 s they are, but the last ask was under a second ago: none yet.
        clock.advance(Duration::from_millis(700));
        let _ = l.check_key(&ip(&l, "192.0.2.2"));
        assert!(!l.take_cleanup_ask());
        assert_eq!(l.keys(), 10);
        // At 2.5 s the table asks again, the cleanup makes room, and new keys get slots.
        clock.advance(Duration::from_millis(300));
        let _ = l.check_key(&ip(&l, "192.0.2.3"));
        assert!(l.take_cleanup_ask());
        l.cleanup();
        assert_eq!(l.keys(), 0);
        assert_eq!(l.check_key(&ip(&l, "192.0.2.4")), Outcome::Allowed);
        assert_eq!(l.keys(), 1);
    }

    #[tokio::test]
    async fn a_full_table_wakes_the_task_waiting_for_one() {
        let clock = FakeRelativeClock::default();
        let full = Arc::new(full_table(&clock));
        let roomy = Arc::new(Limiter::with_clock(
            config(LimitKey::Ip, 1, Duration::from_secs(1), 1),
            10,
            clock.clone(),
        ));
        let limits = vec![roomy.clone(), full.clone()];
        let waiter = tokio::spawn(async move { table_full(&limits).await });
        tokio::task::yield_now().await;
        // A new key in a table with room wakes no one.
        let _ = roomy.check_key(&ip(&roomy, "192.0.2.1"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        let _ = full.check_key(&ip(&full, "192.0.2.1"));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the full table")
            .unwrap();
        // An ask made while nobody waits is kept for the next wait.
        clock.advance(Duration::from_secs(1));
        let _ = full.check_key(&ip(&full, "192.0.2.2"));
        tokio::time::timeout(
            Duration::from_secs(5),
            table_full(std::slice::from_ref(&full)),
        )
        .await
        .expect("the ask was kept");
    }

    #[test]
    fn overflow_keys_spread_over_several_buckets() {
        let clock = FakeRelativeClock::default();
        let l = full_table(&clock);
        // The table is full of keys still limited; 1000 new addresses each send one request.
        let allowed = (0..1000u32)
            .map(|i| std::net::Ipv4Addr::from(0xC000_0200 + i).to_string())
            .filter(|a| l.check_key(&ip(&l, a)) == Outcome::Allowed)
            .count();
        assert_eq!(l.keys(), 10);
        // One request per overflow bucket (burst 1): more than one bucket, at most all 64.
        // (1000 keys miss even one of 64 buckets with odds of about 1e-5; half, never.)
        assert!(
            (32..=OVERFLOW_BUCKETS).contains(&allowed),
            "{allowed} of 1000 new keys allowed"
        );
    }

    #[test]
    fn cleanup_keeps_keys_that_are_still_limited() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(
            config(LimitKey::Ip, 1, Duration::from_secs(10), 1),
            100,
            clock.clone(),
        );
        let h = HeaderMap::new();
        let k = l.key_for(&facts("192.0.2.1", None, &h, false));
        assert_eq!(l.check_key(&k), Outcome::Allowed);
        clock.advance(Duration::from_secs(1));
        l.cleanup();
        assert_eq!(l.keys(), 1);
        assert!(matches!(l.check_key(&k), Outcome::Refused(_)));
    }

    #[test]
    fn shadow_mode_lets_requests_through() {
        let mut c = config(LimitKey::Route, 1, Duration::from_secs(1), 1);
        c.mode = LimitMode::Shadow;
        let limits = [Arc::new(Limiter::with_clock(
            c,
            10,
            FakeRelativeClock::default(),
        ))];
        let h = HeaderMap::new();
        let req = facts("192.0.2.1", None, &h, false);
        assert_eq!(
            check(&limits, &names(&limits), &req)
                .unwrap()
                .unwrap()
                .outcome(),
            "passed"
        );
        for _ in 0..4 {
            let record = check(&limits, &names(&limits), &req).unwrap().unwrap();
            assert_eq!(record.outcome(), "shadow_limited");
            assert_eq!(&*record.limiter, "test");
        }
    }

    #[test]
    fn a_request_one_limit_refuses_is_counted_by_none() {
        // A shared per-route budget of 5 a minute and 1 a minute per address: a client
        // refused by its own limit must not spend the route's budget for everyone else.
        let clock = FakeRelativeClock::default();
        let limit = |key, count, name: &str| {
            let mut c = config(key, count, Duration::from_secs(60), count);
            c.name = name.into();
            Arc::new(Limiter::with_clock(c, 100, clock.clone()))
        };
        for order in [[0, 1], [1, 0]] {
            let both = [
                limit(LimitKey::Route, 5, "route"),
                limit(LimitKey::Ip, 1, "per-ip"),
            ];
            let limits = [both[order[0]].clone(), both[order[1]].clone()];
            let h = HeaderMap::new();
            let greedy = facts("192.0.2.1", None, &h, false);
            assert_eq!(
                &*check(&limits, &names(&limits), &greedy)
                    .unwrap()
                    .unwrap()
                    .limiter,
                if order[0] == 0 {
                    "route,per-ip"
                } else {
                    "per-ip,route"
                }
            );
            for _ in 0..10 {
                let refused = check(&limits, &names(&limits), &greedy).unwrap_err();
                assert_eq!(refused.status(), http::StatusCode::TOO_MANY_REQUESTS);
            }
            // Four more clients get the rest of the route's budget; the sixth is refused.
            for i in 2..6 {
                let other = facts(&format!("192.0.2.{i}"), None, &h, false);
                assert!(
                    check(&limits, &names(&limits), &other).is_ok(),
                    "order {order:?}, client {i}"
                );
            }
            let sixth = facts("192.0.2.6", None, &h, false);
            assert!(check(&limits, &names(&limits), &sixth).is_err());
        }
    }

    #[test]
    fn a_route_key_is_one_bucket_per_route() {
        // The `[rate_limit]` defaults are one limiter shared by every route without limits
        // of its own: `key = "route"` must still count each route apart.
        let limits = [Arc::new(Limiter::with_clock(
            config(LimitKey::Route, 2, Duration::from_secs(60), 2),
            100,
            FakeRelativeClock::default(),
        ))];
        let h = HeaderMap::new();
        let on = |route| RequestFacts {
            route,
            ..facts("192.0.2.1", None, &h, false)
        };
        assert!(check(&limits, &names(&limits), &on("a")).is_ok());
        assert!(check(&limits, &names(&limits), &on("a")).is_ok());
        assert!(check(&limits, &names(&limits), &on("a")).is_err());
        assert!(check(&limits, &names(&limits), &on("b")).is_ok());
        assert!(check(&limits, &names(&limits), &on("b")).is_ok());
        assert!(check(&limits, &names(&limits), &on("b")).is_err());
    }

    #[test]
    fn a_changed_limit_starts_each_key_with_what_it_spent() {
        let clock = FakeRelativeClock::default();
        let header = LimitKey::Header(http::HeaderName::from_static("x-client-id"));
        // 1 per second, burst 4.
        let old = [
            Arc::new(Limiter::with_clock(
                config(LimitKey::Ip, 1, Duration::from_secs(1), 4),
                100,
                clock.clone(),
            )),
            Arc::new(Limiter::with_clock(
                RateLimitConfig {
                    name: "tenant".into(),
                    ..config(header.clone(), 1, Duration::from_secs(1), 4)
                },
                100,
                clock.clone(),
            )),
        ];
        let h = HeaderMap::new();
        let mut tenant = HeaderMap::new();
        tenant.insert("x-client-id", HeaderValue::from_static("t-1"));
        let ip = |l: &Limiter<FakeRelativeClock>, addr| l.key_for(&facts(addr, None, &h, false));
        for _ in 0..3 {
            assert_eq!(
                old[0].check_key(&ip(&old[0], "192.0.2.1")),
                Outcome::Allowed
            );
        }
        for _ in 0..4 {
            assert_eq!(
                old[0].check_key(&ip(&old[0], "192.0.2.2")),
                Outcome::Allowed
            );
        }
        let t = old[1].key_for(&facts("192.0.2.9", None, &tenant, true));
        assert_eq!(old[1].check_key(&t), Outcome::Allowed);
        clock.advance(Duration::from_millis(500));

        // Half the rate (one per 2 s), same burst: 192.0.2.1 has spent 2.5 requests.
        let halved = successor(
            &old,
            &config(LimitKey::Ip, 1, Duration::from_secs(2), 4),
            100,
        );
        let one = ip(&halved, "192.0.2.1");
        assert_eq!(halved.check_key(&one), Outcome::Allowed);
        assert_eq!(
            halved.check_key(&one),
            Outcome::Refused(Duration::from_secs(1))
        );
        let two = ip(&halved, "192.0.2.2");
        assert_eq!(
            halved.check_key(&two),
            Outcome::Refused(Duration::from_secs(1))
        );
        for _ in 0..4 {
            assert_eq!(
                halved.check_key(&ip(&halved, "192.0.2.3")),
                Outcome::Allowed
            );
        }

        // A smaller burst: 192.0.2.2, over it, is at its limit, one period from the next.
        let small = successor(
            &old,
            &config(LimitKey::Ip, 1, Duration::from_secs(1), 2),
            100,
        );
        assert_eq!(
            small.check_key(&ip(&small, "192.0.2.2")),
            Outcome::Refused(Duration::from_secs(1))
        );

        // Header keys hash under the predecessor's secret: the same value, the same bucket.
        let tenants = successor(
            &old,
            &RateLimitConfig {
                name: "tenant".into(),
                mode: LimitMode::Shadow,
                ..config(header, 1, Duration::from_secs(1), 2)
            },
            100,
        );
        let t = tenants.key_for(&facts("192.0.2.9", None, &tenant, true));
        assert_eq!(tenants.check_key(&t), Outcome::Allowed);
        assert!(matches!(tenants.check_key(&t), Outcome::Refused(_)));

        // Another key kind (or name) is another limit: nothing carried.
        let by_identity = successor(
            &old,
            &config(LimitKey::Identity, 1, Duration::from_secs(1), 4),
            100,
        );
        assert_eq!(by_identity.keys(), 0);
        // At most the new cap of keys is carried.
        let capped = successor(&old, &config(LimitKey::Ip, 1, Duration::from_secs(1), 4), 1);
        assert_eq!(capped.keys(), 1);
    }

    #[test]
    fn unchanged_limits_are_reused() {
        let c = config(LimitKey::Ip, 1, Duration::from_secs(1), 1);
        let old = vec![Arc::new(Limiter::new(c.clone(), 10))];
        assert!(Arc::ptr_eq(&reuse_or_new(&old, &c, 10), &old[0]));
        assert!(!Arc::ptr_eq(&reuse_or_new(&old, &c, 11), &old[0]));
        let mut d = c.clone();
        d.burst = NonZeroU32::new(2).unwrap();
        assert!(!Arc::ptr_eq(&reuse_or_new(&old, &d, 10), &old[0]));
    }
}
