//! The CrowdSec LAPI bridge, in stream mode: a background task pulls
//! `GET /v1/decisions/stream?startup=true` (a full snapshot that replaces the CrowdSec
//! partition of the store), then polls `GET /v1/decisions/stream` for deltas every
//! `update_frequency`, and takes a fresh full snapshot every `resync_interval` and after any
//! error. The request path only reads the store: it never waits on the LAPI.
//!
//! Tolerated on the wire (see the notes on LAPI versions): `null`, `[]` or a missing key for
//! empty lists; Go durations with `ns`/`µs` and negative values; the same deleted decision on
//! several polls; unknown fields; malformed entries (skipped one by one and logged, never the
//! whole answer: see `stream`). `on_error = "closed"` makes the store refuse every request
//! while the last successful pull is older than `max_staleness` (and before the first one).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::store::{now_ms, DecisionStore};
use super::stream::{self, parse_stream, Limits, ParseError, StreamResponse};
use super::{godur, parse_value, valid_kind, Decision, Key, Scope, Source};
use crate::config::{CrowdsecConfig, OnError};

/// `wraith/<version>`: LAPI splits it on `/` into the bouncer's type and version.
pub fn user_agent() -> String {
    format!("wraith/{}", env!("CARGO_PKG_VERSION"))
}

/// One decision as the LAPI sends it (fields Wraith does not use are ignored). Read by
/// `stream::parse_stream`, one entry at a time: an entry that is not one (a field missing
/// or of the wrong type) is skipped on its own, never the whole answer.
#[derive(Debug, Clone)]
pub struct LapiDecision {
    /// The LAPI's decision id (an integer; anything else is taken as no id).
    pub id: Option<i64>,
    pub duration: Option<String>,
    pub origin: Option<String>,
    pub scope: String,
    pub value: String,
    pub kind: String,
    pub scenario: Option<String>,
    pub simulated: Option<bool>,
}

/// Why a LAPI decision was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// A scope Wraith does not enforce (`Country`, `AS`, `Username`, ...).
    Scope,
    /// Filtered out by `origins`.
    Origin,
    /// Simulated decisions are never enforced.
    Simulated,
    /// Already expired (zero or negative duration).
    Expired,
    /// A value, type or duration that does not parse.
    Invalid(String),
}

/// Converts the `new` entries of a stream response; returns the decisions and the count
/// skipped by reason (for the log). A malformed entry is skipped as `Invalid`.
pub fn convert_new(
    list: Vec<stream::Entry>,
    origins: Option<&[String]>,
    now_ms: u64,
) -> (Vec<(Option<i64>, Decision)>, Vec<Skip>) {
    let mut out = Vec::with_capacity(list.len());
    let mut skipped = Vec::new();
    let mut names = Names::default();
    for entry in list {
        let d = match entry {
            Ok(d) => d,
            Err(why) => {
                skipped.push(Skip::Invalid(why));
                continue;
            }
        };
        match convert_one(&d, origins, now_ms, &mut names) {
            Ok(dec) => out.push((d.id, dec)),
            // Which one, so the LAPI's operator can find it (`cscli decisions list`).
            Err(Skip::Invalid(why)) => skipped.push(Skip::Invalid(format!(
                "{}: {why}",
                describe_entry("new", &d)
            ))),
            Err(s) => skipped.push(s),
        }
    }
    (out, skipped)
}

/// `<list> entry id <id> (<scope> <value>)`, for the log, the value cut to 64 bytes.
fn describe_entry(list: &str, d: &LapiDecision) -> String {
    let id =
        d.id.map_or_else(|| "without id".to_string(), |i| format!("id {i}"));
    format!(
        "{list} entry {id} ({:?} {:?})",
        capped_to(&d.scope, 64),
        capped_to(&d.value, 64)
    )
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn capped_to(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One shared copy of each origin, decision type and scenario an answer names (a handful
/// of origins and types: `crowdsec`, `CAPI`, `lists`; `ban`; a few hundred scenarios at
/// most): a million decisions carried three small allocations each, 100 MB.
#[derive(Default)]
struct Names {
    names: Vec<Arc<str>>,
    reasons: std::collections::HashSet<Arc<str>>,
}

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.iter().find(|n| &***n == name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        // Bounded: a hostile answer naming a new one per entry costs a scan of at most this
        // many, then plain allocations.
        if self.names.len() < 64 {
            self.names.push(n.clone());
        }
        n
    }

    fn reason(&mut self, reason: &str) -> Arc<str> {
        if let Some(r) = self.reasons.get(reason) {
            return r.clone();
        }
        let r: Arc<str> = Arc::from(reason);
        // Bounded like `get`: past this many, a scenario per entry costs its own copy.
        if self.reasons.len() < 4096 {
            self.reasons.insert(r.clone());
        }
        r
    }
}

fn origin_of(d: &LapiDecision) -> &str {
    d.origin
        .as_deref()
        .filter(|o| !o.is_empty())
        .unwrap_or("crowdsec")
}

fn convert_one(
    d: &LapiDecision,
    origins: Option<&[String]>,
    now_ms: u64,
    names: &mut Names,
) -> Result<Decision, Skip> {
    let scope = Scope::parse(&d.scope).ok_or(Skip::Scope)?;
    let origin = origin_of(d);
    // An `origins` filter takes what names one of them: an entry without an origin (which
    // the LAPI never sends) is not taken for CrowdSec's own.
    let named = d.origin.as_deref().filter(|o| !o.is_empty());
    // Origins are tokens (`crowdsec`, `cscli`, `CAPI`, `lists`), as the admin API's are: one
    // with other characters would reach logs and terminals as the LAPI wrote it.
    if named.is_some_and(|o| !crate::decisions::valid_kind(o)) {
        return Err(Skip::Invalid(format!(
            "origin {:?} is not valid (letters, digits, '-', '_', '.', ':')",
            capped_to(named.unwrap_or_default(), 64)
        )));
    }
    if origins.is_some_and(|o| !named.is_some_and(|n| o.iter().any(|x| x.eq_ignore_ascii_case(n))))
    {
        return Err(Skip::Origin);
    }
    if d.simulated == Some(true) {
        return Err(Skip::Simulated);
    }
    let value = parse_value(scope, &d.value).map_err(Skip::Invalid)?;
    if !valid_kind(&d.kind) {
        return Err(Skip::Invalid(format!("invalid decision type {:?}", d.kind)));
    }
    let ms = match &d.duration {
        Some(s) => godur::parse_millis(s).map_err(Skip::Invalid)?,
        None => return Err(Skip::Invalid("decision without a duration".into())),
    };
    if ms <= 0 {
        return Err(Skip::Expired);
    }
    Ok(Decision {
        source: Source::Crowdsec,
        origin: names.get(origin),
        scope,
        value,
        kind: names.get(&d.kind),
        until_ms: now_ms.saturating_add(ms as u64),
        reason: names.reason(capped(d.scenario.as_deref().unwrap_or_default())),
    })
}

/// A scenario name as kept: at most `MAX_REASON` bytes (cut on a character boundary).
fn capped(reason: &str) -> &str {
    capped_to(reason, MAX_REASON)
}

/// The longest scenario name kept with a decision (the LAPI's are far shorter).
const MAX_REASON: usize = 512;

/// The ids and keys of the `deleted` entries (their durations are negative and ignored),
/// and the entries skipped as `Invalid` (malformed, or a value that does not parse; other
/// scopes are not counted: nothing of theirs is held).
pub fn convert_deleted(list: Vec<stream::Entry>) -> (Vec<(Option<i64>, Key)>, Vec<Skip>) {
    let mut out = Vec::with_capacity(list.len());
    let mut skipped = Vec::new();
    for entry in list {
        let d = match entry {
            Ok(d) => d,
            Err(why) => {
                skipped.push(Skip::Invalid(format!("deleted entry: {why}")));
                continue;
            }
        };
        let Some(scope) = Scope::parse(&d.scope) else {
            continue;
        };
        match parse_value(scope, &d.value) {
            Ok(value) => out.push((
                d.id,
                Key {
                    origin: Arc::from(origin_of(&d)),
                    scope,
                    value,
                    kind: Arc::from(d.kind.as_str()),
                },
            )),
            Err(why) => skipped.push(Skip::Invalid(format!(
                "{}: {why}",
                describe_entry("deleted", &d)
            ))),
        }
    }
    (out, skipped)
}

/// The CrowdSec decisions the LAPI has sent, by store key and decision id.
///
/// Wraith asks for every decision (`dedup=false`): with the LAPI's default, only the longest
/// decision per (value, scope, type) is sent, chosen across origins an `origins` filter
/// leaves out (1.4.6), so a local ban behind a longer community one never arrives; and the
/// LAPI's notes warn that a shorter decision may never be sent once the longest is deleted.
/// Without it, several decisions can share a store key (two `cscli` bans of one address), and
/// deleting one must not lift the other: the store gets, per key, the one that lasts longest
/// of those still known.
#[derive(Debug, Default)]
pub struct Known {
    /// Per key, each decision's end and scenario by id (the key holds the rest; the store has
    /// the one decision per key it enforces).
    by_key: HashMap<Key, Entries>,
    /// Decisions held (all ids of all keys), kept as they change: counted on every pull,
    /// where summing a million keys cost ~10 ms.
    count: usize,
}

/// One LAPI decision of a key.
#[derive(Debug)]
struct Entry {
    until_ms: u64,
    reason: Arc<str>,
}

/// The decisions of one key, by id. Nearly always one, kept inline; a map when there are
/// more, so that a hostile answer with a million ids for one key costs a million map
/// inserts, not a million scans of the list (which took hours).
#[derive(Debug)]
enum Entries {
    One(Option<i64>, Entry),
    Many(HashMap<Option<i64>, Entry>),
}

impl Entries {
    /// Adds a decision: the same id again replaces it; one without an id stands for its
    /// whole key, replacing every other.
    fn insert(&mut self, id: Option<i64>, e: Entry) {
        match self {
            Entries::One(old, _) if id.is_none() || *old == id => *self = Entries::One(id, e),
            Entries::One(..) => {
                let Entries::One(old, first) =
                    std::mem::replace(self, Entries::Many(HashMap::new()))
                else {
                    unreachable!("matched One above")
                };
                if let Entries::Many(m) = self {
                    m.insert(old, first);
                    m.insert(id, e);
                }
            }
            Entries::Many(_) if id.is_none() => *self = Entries::One(id, e),
            Entries::Many(m) => {
                m.insert(id, e);
            }
        }
    }

    /// Removes the decision `id`; without an id (the LAPI naming the key only), all of them.
    /// Returns whether any is left.
    fn remove(&mut self, id: Option<i64>) -> bool {
        match (id, self) {
            (None, _) => false,
            (Some(_), Entries::One(old, _)) => *old != id,
            (Some(_), Entries::Many(m)) => {
                m.remove(&id);
                !m.is_empty()
            }
        }
    }

    /// Forgets the decisions that ended by `now_ms`; returns whether any is left.
    fn retain_live(&mut self, now_ms: u64) -> bool {
        match self {
            Entries::One(_, e) => e.until_ms > now_ms,
            Entries::Many(m) => {
                m.retain(|_, e| e.until_ms > now_ms);
                !m.is_empty()
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Entries::One(..) => 1,
            Entries::Many(m) => m.len(),
        }
    }

    /// The one that lasts longest.
    fn longest(&self) -> Option<&Entry> {
        match self {
            Entries::One(_, e) => Some(e),
            Entries::Many(m) => m.values().max_by_key(|e| e.until_ms),
        }
    }
}

impl Known {
    /// How many decisions are held (all ids of all keys).
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// A full snapshot: forgets everything else; returns what the store holds.
    pub fn replace(&mut self, new: Vec<(Option<i64>, Decision)>) -> Vec<Decision> {
        self.by_key.clear();
        self.count = 0;
        for (id, d) in new {
            self.insert(id, d);
        }
        self.by_key
            .iter()
            .filter_map(|(key, entries)| longest(key, entries))
            .collect()
    }

    /// A delta; returns the keys the store drops and the decisions it (re)sets.
    pub fn delta(
        &mut self,
        deleted: Vec<(Option<i64>, Key)>,
        new: Vec<(Option<i64>, Decision)>,
        now_ms: u64,
    ) -> (Vec<Key>, Vec<Decision>) {
        let mut touched: Vec<Key> = Vec::with_capacity(deleted.len() + new.len());
        for (id, key) in deleted {
            if let Some(entries) = self.by_key.get_mut(&key) {
                let before = entries.len();
                if entries.remove(id) {
                    self.count -= before - entries.len();
                } else {
                    self.count -= before;
                    self.by_key.remove(&key);
                }
            }
            touched.push(key);
        }
        for (id, d) in new {
            touched.push(d.key());
            self.insert(id, d);
        }
        touched.sort_unstable();
        touched.dedup();
        let mut drop = Vec::new();
        let mut set = Vec::new();
        for key in touched {
            let live = self.by_key.get_mut(&key).and_then(|e| {
                let before = e.len();
                let left = e.retain_live(now_ms);
                self.count -= before - if left { e.len() } else { 0 };
                left.then(|| longest(&key, e)).flatten()
            });
            match live {
                Some(d) => set.push(d),
                None => {
                    self.by_key.remove(&key);
                    drop.push(key);
                }
            }
        }
        (drop, set)
    }

    fn insert(&mut self, id: Option<i64>, d: Decision) {
        let key = d.key();
        let e = Entry {
            until_ms: d.until_ms,
            reason: d.reason,
        };
        match self.by_key.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let before = o.get().len();
                o.get_mut().insert(id, e);
                self.count = self.count - before + o.get().len();
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Entries::One(id, e));
                self.count += 1;
            }
        }
    }
}

/// The decision of `key` that lasts longest, as the store holds it.
fn longest(key: &Key, entries: &Entries) -> Option<Decision> {
    let e = entries.longest()?;
    Some(Decision {
        source: Source::Crowdsec,
        origin: key.origin.clone(),
        scope: key.scope,
        value: key.value,
        kind: key.kind.clone(),
        until_ms: e.until_ms,
        reason: e.reason.clone(),
    })
}

/// What the bridge reports about itself (for `wraith status` and the admin API).
#[derive(Debug, Default)]
pub struct BridgeStatus {
    /// Milliseconds since the epoch of the last successful pull (0: never).
    pub last_success_ms: AtomicU64,
    /// Successful pulls so far.
    pub pulls: AtomicU64,
    /// Failed pulls so far.
    pub failures: AtomicU64,
    /// The last error, cleared on success.
    pub last_error: Mutex<Option<String>>,
}

/// A running bridge.
pub struct Bridge {
    /// The settings it runs with (a reload with other settings restarts it).
    pub config: CrowdsecConfig,
    /// What the CA and client certificate files held when it started (`tls_fingerprint`):
    /// a reload that finds them rotated on disk restarts it with the new ones.
    pub tls: u64,
    pub status: Arc<BridgeStatus>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Bridge {
    /// Stops the polling task and waits until it has ended: nothing it pulled reaches the
    /// store after this returns.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Builds the LAPI HTTP client: rustls with aws-lc-rs, the configured CA (or the system
/// roots) and the optional client certificate for mTLS.
pub fn http_client(config: &CrowdsecConfig) -> Result<reqwest::Client, String> {
    let tls = tls_config(config.ca_cert.as_deref(), config.client_cert.as_ref())?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        // The API key is a header reqwest would carry to wherever a redirect points.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(user_agent())
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(5)))
        .build()
        .map_err(|e| format!("crowdsec: cannot build the HTTP client: {e}"))
}

/// A rustls client config for talking to CrowdSec.
pub fn tls_config(
    ca: Option<&std::path::Path>,
    client: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = crate::files::read(path, crate::files::SMALL)
                .map_err(|e| format!("crowdsec.ca_cert {}: {e}", path.display()))?;
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| format!("crowdsec.ca_cert {}: {e}", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("crowdsec.ca_cert {}: {e}", path.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("crowdsec TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let cert_pem = crate::files::read(cert, crate::files::SMALL)
                .map_err(|e| format!("crowdsec.client_cert {}: {e}", cert.display()))?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("crowdsec.client_cert {}: {e}", cert.display()))?;
            let key_pem = crate::files::read(key, crate::files::SMALL)
                .map_err(|e| format!("crowdsec.client_key {}: {e}", key.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("crowdsec.client_key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("crowdsec client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// Starts the bridge task for `config`, feeding `store` through `client` (`http_client`).
/// `fresh_since_ms` is when the decisions already in the store were last pulled (by the
/// bridge this one replaces), so a reload in closed mode does not refuse traffic while the
/// data is still fresh.
pub fn spawn(
    config: CrowdsecConfig,
    client: reqwest::Client,
    store: Arc<DecisionStore>,
    shutdown: &CancellationToken,
    fresh_since_ms: Option<u64>,
) -> Bridge {
    let stop = shutdown.child_token();
    let status = Arc::new(BridgeStatus::default());
    // When the data in the store was pulled, as an `Instant` (None: never, or unknown).
    let last_ok = fresh_since_ms.and_then(|ms| {
        let age = Duration::from_millis(now_ms().saturating_sub(ms));
        Instant::now().checked_sub(age)
    });
    if config.on_error == OnError::Closed {
        // Closed means closed until the LAPI has answered once (or while what the previous
        // bridge pulled is too old).
        store.set_refuse_all(last_ok.is_none_or(|t| t.elapsed() > config.max_staleness));
    }
    if let Some(ms) = fresh_since_ms {
        status.last_success_ms.store(ms, Ordering::Relaxed);
    }
    let task = tokio::spawn(run(
        config.clone(),
        client,
        store,
        status.clone(),
        stop.clone(),
        last_ok,
    ));
    Bridge {
        config,
        tls: 0,
        status,
        stop,
        task: Some(task),
    }
}

/// A hash of the files the LAPI client's TLS is built from (CA bundle, client certificate
/// and key): the paths stay the same in the config when the files are rotated in place.
pub fn tls_fingerprint(config: &CrowdsecConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let files = config
        .ca_cert
        .iter()
        .chain(config.client_cert.iter().flat_map(|(c, k)| [c, k]));
    for path in files {
        path.hash(&mut h);
        crate::files::read(path, crate::files::SMALL)
            .ok()
            .hash(&mut h);
    }
    h.finish()
}

async fn run(
    config: CrowdsecConfig,
    client: reqwest::Client,
    store: Arc<DecisionStore>,
    status: Arc<BridgeStatus>,
    stop: CancellationToken,
    mut last_ok: Option<Instant>,
) {
    let mut known = Known::default();
    let mut last_full: Option<Instant> = None;
    let mut failing = false;
    let mut stale_reported = false;
    tracing::info!(lapi = %config.lapi_url, every = ?config.update_frequency, "crowdsec bridge started");
    loop {
        let full = last_full.is_none_or(|t| t.elapsed() >= config.resync_interval);
        let result = tokio::select! {
            r = pull(&client, &config, full) => r,
            _ = stop.cancelled() => break,
        };
        if stop.is_cancelled() {
            // Replaced or shutting down: what this pull brought is not ours to apply.
            break;
        }
        // Parsing and applying a large answer (and rebuilding the lookup table) takes a
        // while: off the async workers.
        let result = match result {
            Ok(body) => {
                let (store, config) = (store.clone(), config.clone());
                let mut k = std::mem::take(&mut known);
                let done = tokio::task::spawn_blocking(move || {
                    let kept = if full { 0 } else { k.len() };
                    let applied = read_answer(&body, full, kept, config.max_decisions)
                        .map(|resp| apply(&store, &config, &mut k, resp, full));
                    (k, applied)
                })
                .await;
                match done {
                    Ok((k, applied)) => {
                        known = k;
                        applied
                    }
                    Err(e) => Err(format!("applying the LAPI answer failed: {e}")),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((added, removed, skipped)) => {
                last_ok = Some(Instant::now());
                if full {
                    last_full = last_ok;
                }
                status.last_success_ms.store(now_ms(), Ordering::Relaxed);
                status.pulls.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = status.last_error.lock() {
                    *e = None;
                }
                if failing || stale_reported {
                    tracing::info!(lapi = %config.lapi_url, "crowdsec LAPI reachable again");
                }
                failing = false;
                stale_reported = false;
                if full || added > 0 || removed > 0 {
                    tracing::info!(full, added, removed, skipped, "crowdsec decisions updated");
                }
            }
            Err(e) => {
                status.failures.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(lapi = %config.lapi_url, error = %e, "crowdsec LAPI pull failed; keeping the decisions already known");
                }
                if let Ok(mut le) = status.last_error.lock() {
                    *le = Some(e);
                }
                failing = true;
                // The LAPI may have lost its state (restart, new DB): start over with a
                // snapshot once it is back.
                last_full = None;
            }
        }
        let stale = last_ok.is_none_or(|t| t.elapsed() > config.max_staleness);
        match config.on_error {
            OnError::Closed => store.set_refuse_all(stale),
            OnError::Open => {}
        }
        if stale && !stale_reported && last_ok.is_some() {
            stale_reported = true;
            match config.on_error {
                OnError::Closed => {
                    tracing::error!(max_staleness = ?config.max_staleness, "crowdsec decisions are stale; on_error = \"closed\": refusing requests until the LAPI answers")
                }
                OnError::Open => {
                    tracing::warn!(max_staleness = ?config.max_staleness, "crowdsec decisions are stale; on_error = \"open\": serving with the decisions already known")
                }
            }
        }
        // The next pull (a snapshot again if this one failed).
        tokio::select! {
            _ = tokio::time::sleep(config.update_frequency) => {}
            _ = stop.cancelled() => break,
        }
    }
    tracing::info!("crowdsec bridge stopped");
}

/// One request to the stream endpoint.
async fn pull(
    client: &reqwest::Client,
    config: &CrowdsecConfig,
    full: bool,
) -> Result<Vec<u8>, String> {
    let scopes: Vec<&str> = config
        .scopes
        .iter()
        .map(|s| match s {
            Scope::Ip => "ip",
            Scope::Range => "range",
        })
        .collect();
    let url = format!("{}/v1/decisions/stream", config.lapi_url);
    let mut query = vec![
        ("startup", if full { "true" } else { "false" }.to_string()),
        ("scopes", scopes.join(",")),
    ];
    // Every decision, not only the longest per (value, scope, type): see `Known`. LAPIs
    // that no longer know `dedup` ignore it.
    query.push(("dedup", "false".to_string()));
    // Filtered by the LAPI too (`convert_one` checks again).
    if let Some(origins) = &config.origins {
        query.push(("origins", origins.join(",")));
    }
    let mut req = client.get(&url).query(&query);
    if let Some(key) = &config.api_key {
        req = req.header("X-Api-Key", &key.0);
    }
    let mut resp = req.send().await.map_err(|e| describe(&e))?;
    let status = resp.status();
    // Read in pieces up to a ceiling: a broken or hostile LAPI cannot make us buffer without
    // bound (a million decisions is ~250 MiB of JSON; the community blocklist is far less).
    // The pieces are kept as they came and joined once at the end, into a buffer of the
    // exact size: a buffer grown by doubling as they arrive held up to twice the answer, and
    // the freed steps stayed in the process (an endless answer, refused at the ceiling, left
    // it at over 800 MiB).
    let mut pieces = Vec::new();
    let mut len = 0;
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        if len + chunk.len() > MAX_STREAM_BODY {
            drop(pieces);
            release_freed_memory();
            return Err(format!(
                "LAPI answer larger than {} MiB: refused (the cache keeps its last good state)",
                MAX_STREAM_BODY >> 20
            ));
        }
        len += chunk.len();
        pieces.push(chunk);
    }
    let mut body = Vec::with_capacity(len);
    for piece in pieces {
        body.extend_from_slice(&piece);
    }
    if status == reqwest::StatusCode::FORBIDDEN || status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(format!(
            "LAPI refused our credentials ({status}): check the bouncer API key (cscli bouncers list)"
        ));
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(format!("LAPI answered {status}: {text}"));
    }
    Ok(body)
}

/// Reads one stream answer within `crowdsec.max_decisions` (`max`, with `kept` already
/// held between snapshots). An answer past it is refused while it is parsed, at the first
/// entry too many, and the cache keeps its last good state: a broken or hostile LAPI cannot
/// make the store, or the parse itself, grow without bound.
fn read_answer(body: &[u8], full: bool, kept: usize, max: usize) -> Result<StreamResponse, String> {
    let limits = Limits {
        new: max.saturating_sub(kept),
        // A snapshot replaces the cache: its deleted list has nothing to remove.
        deleted: (!full).then_some(max),
    };
    parse_stream(body, limits).map_err(|e| match e {
        ParseError::TooMany("new") => format!(
            "LAPI sent more than {} new decisions ({kept} already held), more than crowdsec.max_decisions ({max}): refused (the cache keeps its last good state)",
            limits.new
        ),
        ParseError::TooMany(list) => format!(
            "LAPI sent more than {max} {list} decisions, more than crowdsec.max_decisions ({max}) allows: refused (the cache keeps its last good state)"
        ),
        ParseError::Unreadable(e) => format!("LAPI sent an unreadable stream response: {e}"),
    })
}

/// The largest stream answer accepted from the LAPI.
const MAX_STREAM_BODY: usize = 256 << 20;

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Gives the memory freed after a large answer back to the system. The binary allocates
/// through mimalloc (src/main.rs), which keeps freed pages for later allocations and gives
/// them back only as its heaps are used again: an answer refused at the ceiling left an idle
/// process 300 MiB larger for good. `mi_collect(true)` frees them now (this thread's heap and
/// what other threads freed into it); `malloc_trim` does the same for glibc's heaps (C
/// allocations: SQLite's).
fn release_freed_memory() {
    // SAFETY: mi_collect only returns memory mimalloc holds unused; it is safe from any
    // thread, whichever allocator is the global one.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of glibc's heaps to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Applies a response to the store; returns (set, removed, skipped).
fn apply(
    store: &DecisionStore,
    config: &CrowdsecConfig,
    known: &mut Known,
    resp: StreamResponse,
    full: bool,
) -> (usize, usize, usize) {
    let now = now_ms();
    let (new, mut skipped) = convert_new(resp.new, config.origins.as_deref(), now);
    // (Empty for a snapshot: `read_answer` did not keep it.)
    let (deleted, unusable) = convert_deleted(resp.deleted);
    skipped.extend(unusable);
    let invalid = skipped.iter().filter_map(|s| match s {
        Skip::Invalid(why) => Some(why),
        _ => None,
    });
    let mut count = 0;
    for why in invalid {
        if count < 3 {
            tracing::warn!(reason = %crate::telemetry::format::printable(why), "crowdsec decision ignored");
        }
        count += 1;
    }
    if count > 3 {
        tracing::warn!(
            more = count - 3,
            "crowdsec decisions ignored: {} more unusable entries in this answer",
            count - 3
        );
    }
    if full {
        // A snapshot's `deleted` lists expired decisions still in the LAPI database:
        // nothing to remove from a cache being replaced (`read_answer` did not keep it).
        let all = known.replace(new);
        let added = all.len();
        store.replace_crowdsec(all);
        return (added, 0, skipped.len());
    }
    let (drop, set) = known.delta(deleted, new, now);
    let (removed, added) = store.apply_crowdsec_delta(&drop, set);
    (added, removed, skipped.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_fingerprint_follows_the_files_not_only_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("lapi-ca.pem");
        std::fs::write(&ca, "first").unwrap();
        let text = format!(
            "[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n\
             [crowdsec]\nlapi_url='https://127.0.0.1:8080'\napi_key='k'\nca_cert='{}'\n",
            ca.display()
        );
        let load = || {
            crate::config::load_str(
                std::path::Path::new("t.toml"),
                &text,
                crate::config::LoadOptions::default(),
            )
            .unwrap()
            .crowdsec
            .unwrap()
        };
        let before = tls_fingerprint(&load());
        assert_eq!(tls_fingerprint(&load()), before);
        std::fs::write(&ca, "rotated").unwrap();
        let after = load();
        assert_eq!(after.ca_cert.as_deref(), Some(ca.as_path()));
        assert_ne!(tls_fingerprint(&after), before);
    }

    #[test]
    fn parses_146_and_178_shapes() {
        let v146 = br#"{"deleted":null,"new":[
 {"duration":"59m59.16866418s","id":1,"origin":"cscli","scenario":"wraith-test","scope":"Ip","type":"ban","value":"1.2.3.4"},
 {"duration":"29m59.168665082s","id":2,"origin":"cscli","scenario":"wraith-range","scope":"Range","type":"captcha","value":"10.20.0.0/16"},
 {"duration":"1m29.168667657s","id":5,"origin":"cscli","scenario":"manual","scope":"Ip","type":"ban","value":"2001:db8::1"},
 {"duration":"2h","id":6,"origin":"cscli","scenario":"geo","scope":"Country","type":"ban","value":"FR"}]}"#;
        let r = parse(v146);
        let (new, skipped) = convert_new(r.new, None, 1_000);
        assert_eq!(new.len(), 3);
        assert_eq!(skipped, vec![Skip::Scope]);
        assert_eq!(new[0].0, Some(1));
        assert_eq!(new[0].1.until_ms, 1_000 + 3_599_168);
        assert_eq!(new[1].1.scope, Scope::Range);
        assert_eq!(&*new[1].1.kind, "captcha");
        assert!(r.deleted.is_empty());

        let empty_178 = br#"{"new": [], "deleted": []}"#;
        for body in [
            &empty_178[..],
            br#"{"deleted":null,"new":null}"#,
            b"{}",
            b"null",
        ] {
            let r = parse(body);
            assert!(r.new.is_empty() && r.deleted.is_empty());
        }
        for body in [
            &b"<html>"[..],
            b"[]",
            br#"{"new":{}}"#,
            br#"{"new":[],"new":[]}"#,
        ] {
            let e = parse_stream(body, UNLIMITED).unwrap_err();
            assert!(matches!(e, ParseError::Unreadable(_)), "{e:?}");
        }
    }

    #[test]
    fn deleted_entries_with_negative_durations_become_keys() {
        let body = br#"{"new":null,"deleted":[
 {"duration":"-143.605213ms","origin":"cscli","scope":"Ip","type":"ban","value":"1.2.3.4","uuid":"x"},
 {"duration":"-25422h25m44.086361839s","origin":"crowdsec","scope":"Range","type":"ban","value":"2001:db8::/32"}]}"#;
        let r = parse(body);
        let (keys, skipped) = convert_deleted(r.deleted);
        assert!(skipped.is_empty());
        assert_eq!(keys.len(), 2);
        assert_eq!(&*keys[0].1.origin, "cscli");
        assert_eq!(keys[0].0, None);
        assert_eq!(
            keys[1].1.value,
            "2001:db8::/32".parse::<ipnet::IpNet>().unwrap()
        );
    }

    #[test]
    fn origin_filter_simulated_and_expired() {
        let list = vec![
            LapiDecision {
                id: None,
                duration: Some("1h".into()),
                origin: Some("CAPI".into()),
                scope: "Ip".into(),
                value: "192.0.2.1".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: None,
            },
            LapiDecision {
                id: None,
                duration: Some("1h".into()),
                origin: Some("crowdsec".into()),
                scope: "ip".into(),
                value: "192.0.2.2".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: Some(true),
            },
            LapiDecision {
                id: None,
                duration: Some("-1s".into()),
                origin: Some("crowdsec".into()),
                scope: "ip".into(),
                value: "192.0.2.3".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: None,
            },
            LapiDecision {
                id: None,
                duration: Some("1h".into()),
                origin: Some("crowdsec".into()),
                scope: "ip".into(),
                value: "not-an-ip".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: None,
            },
            // No origin: not one the filter names.
            LapiDecision {
                id: Some(9),
                duration: Some("1h".into()),
                origin: Some(String::new()),
                scope: "ip".into(),
                value: "192.0.2.4".into(),
                kind: "ban".into(),
                scenario: None,
                simulated: None,
            },
        ];
        let origins = vec!["crowdsec".to_string(), "cscli".to_string()];
        let (new, skipped) = convert_new(
            list.clone().into_iter().map(Ok).collect(),
            Some(&origins),
            0,
        );
        assert!(new.is_empty());
        assert_eq!(skipped[0], Skip::Origin);
        assert_eq!(skipped[1], Skip::Simulated);
        assert_eq!(skipped[2], Skip::Expired);
        // The log says which entry.
        assert!(
            matches!(&skipped[3], Skip::Invalid(why) if why.starts_with("new entry without id (\"ip\" \"not-an-ip\"): ")),
            "{:?}",
            skipped[3]
        );
        assert_eq!(skipped[4], Skip::Origin);
        // Without a filter, an entry without an origin counts as CrowdSec's.
        let (new, _) = convert_new(vec![Ok(list[4].clone())], None, 0);
        assert_eq!(&*new[0].1.origin, "crowdsec");
        // An origin that is not a token never reaches the logs.
        let mut odd = list[4].clone();
        odd.origin = Some("cs\u{1b}[31m".into());
        let (new, skipped) = convert_new(vec![Ok(odd)], None, 0);
        assert!(new.is_empty());
        assert!(
            matches!(&skipped[0], Skip::Invalid(why) if why.contains("origin \"cs\\u{1b}[31m\" is not valid")),
            "{skipped:?}"
        );
    }

    /// What a million CrowdSec decisions cost: memory held (the bridge's `Known` and the
    /// store's table), and the time of a snapshot, of a delta that changes two, of an admin
    /// add and of a purge with nothing due. Run with
    /// `cargo test --release --lib million_decisions -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement; meaningful only in a release build"]
    fn cost_of_a_million_decisions() {
        fn resident() -> usize {
            release_freed_memory();
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: usize = statm.split(' ').nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        let scenarios: Vec<String> = (0..40)
            .map(|i| format!("crowdsecurity/scenario-{i}"))
            .collect();
        let entry = |i: u32| {
            let mut e = lapi(
                Some(i64::from(i)),
                &std::net::Ipv4Addr::from(0x0a00_0000 | i).to_string(),
                "168h",
            );
            if let Ok(d) = &mut e {
                d.scenario = Some(scenarios[i as usize % scenarios.len()].clone());
                d.origin = Some(if i % 3 == 0 { "CAPI" } else { "crowdsec" }.into());
            }
            e
        };
        let n = 1_000_000u32;
        let store = DecisionStore::new();
        let mut known = Known::default();
        let before = resident();
        let t = Instant::now();
        let (new, _) = convert_new((0..n).map(entry).collect(), None, now_ms());
        let all = known.replace(new);
        let converted = t.elapsed();
        store.replace_crowdsec(all);
        let snapshot = t.elapsed();
        let held = resident().saturating_sub(before);
        let t = Instant::now();
        let (new, _) = convert_new(vec![entry(n)], None, now_ms());
        let (deleted, _) = convert_deleted(vec![entry(7)]);
        let (drop, set) = known.delta(deleted, new, now_ms());
        assert_eq!(store.apply_crowdsec_delta(&drop, set), (1, 1));
        let delta = t.elapsed();
        let t = Instant::now();
        let ban = Decision {
            source: Source::Local,
            origin: Arc::from("admin"),
            scope: Scope::Ip,
            value: "192.0.2.1/32".parse().unwrap(),
            kind: Arc::from("ban"),
            until_ms: now_ms() + 60_000,
            reason: Arc::from(""),
        };
        store.insert_local(vec![ban], 10).unwrap();
        let admin = t.elapsed();
        let t = Instant::now();
        assert_eq!(store.purge_expired(), 0);
        let purge = t.elapsed();
        eprintln!(
            "{n} decisions: {} bytes each held; snapshot {snapshot:?} (converted in {converted:?}), delta of two {delta:?}, admin add {admin:?}, purge with nothing due {purge:?}",
            held / n as usize
        );
    }

    fn lapi(id: Option<i64>, value: &str, duration: &str) -> stream::Entry {
        Ok(LapiDecision {
            id,
            duration: Some(duration.into()),
            origin: Some("cscli".into()),
            scope: "Ip".into(),
            value: value.into(),
            kind: "ban".into(),
            scenario: None,
            simulated: None,
        })
    }

    /// The count `Known` keeps as it changes matches its contents through random deltas
    /// (ids added, replaced, deleted one by one or by key, expired).
    #[test]
    fn the_count_of_known_decisions_follows_every_change() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut known = Known::default();
        let now = now_ms();
        let entry = |rng: &mut fastrand::Rng| {
            let id = (rng.u8(..10) > 0).then(|| rng.i64(0..40));
            let duration = if rng.u8(..8) == 0 { "1ms" } else { "1h" };
            lapi(id, &format!("192.0.2.{}", rng.u8(..6)), duration)
        };
        for round in 0..400 {
            let (new, _) = convert_new(
                (0..rng.usize(..6)).map(|_| entry(&mut rng)).collect(),
                None,
                now,
            );
            let (deleted, _) =
                convert_deleted((0..rng.usize(..4)).map(|_| entry(&mut rng)).collect());
            if round % 50 == 0 {
                known.replace(new);
            } else {
                known.delta(deleted, new, now + 10 * round);
            }
            let sum: usize = known.by_key.values().map(Entries::len).sum();
            assert_eq!(known.len(), sum, "round {round}");
        }
    }

    #[test]
    fn a_range_ban_on_ipv6_space_that_covers_ipv4_refuses_ipv4_clients() {
        let body = br#"{"deleted":null,"new":[
 {"duration":"1h","id":1,"origin":"lists","scenario":"x","scope":"Range","type":"ban","value":"::ffff:0:0/80"},
 {"duration":"1h","id":2,"origin":"lists","scenario":"y","scope":"Range","type":"ban","value":"2001:db8::/32"}]}"#;
        let (new, skipped) = convert_new(parse(body).new, None, now_ms());
        assert!(skipped.is_empty(), "{skipped:?}");
        let store = DecisionStore::new();
        store.replace_crowdsec(Known::default().replace(new));
        let banned_by = |client: &str| {
            store
                .lookup(client.parse().unwrap(), crate::config::Fallback::Allow)
                .map(|v| v.value)
        };
        let net = |n: &str| Some(n.parse::<ipnet::IpNet>().unwrap());
        // Host bits cleared: ::ffff:0:0/80 is ::/80.
        assert_eq!(banned_by("192.0.2.1"), net("::/80"));
        assert_eq!(banned_by("::ffff:198.51.100.7"), net("::/80"));
        assert_eq!(banned_by("2001:db8::1"), net("2001:db8::/32"));
        assert_eq!(banned_by("2001:db9::1"), None);
    }

    #[test]
    fn an_id_that_is_not_an_integer_is_no_id_and_fails_nothing() {
        let r = parse(
            br#"{"new":[{"id":"x","duration":"1h","scope":"Ip","value":"192.0.2.1","type":"ban"},
                         {"id":-3,"duration":"1h","scope":"Ip","value":"192.0.2.2","type":"ban"},
                         {"id":1.5,"duration":"1h","scope":"Ip","value":"192.0.2.3","type":"ban"}]}"#,
        )
        ;
        let ids: Vec<_> = r.new.iter().map(|d| d.as_ref().unwrap().id).collect();
        assert_eq!(ids, vec![None, Some(-3), None]);
    }

    #[test]
    fn a_malformed_entry_is_skipped_and_the_others_taken() {
        let body = br#"{"new":[
 {"id":1,"duration":"1h","scope":"Ip","value":"192.0.2.1","type":"ban"},
 {"id":2,"duration":"1h","scope":"Ip","value":"192.0.2.2"},
 {"id":3,"duration":"1h","scope":"Ip","value":"192.0.2.3","type":"ban","simulated":"no"},
 42, "x", null, [1, 2],
 {"id":4,"duration":1,"scope":"Ip","value":"192.0.2.4","type":"ban"},
 {"id":5,"duration":"1h","scope":"Ip","value":["192.0.2.5"],"type":"ban"},
 {"id":6,"duration":"1h","scope":"Ip","value":"192.0.2.6","type":"ban","origin":null,
  "simulated":null,"scenario":{"nested":[1]},"uuid":"u"}],
 "deleted":[{"scope":"Ip","type":"ban"},
 {"id":7,"duration":"-1s","origin":"cscli","scope":"Ip","type":"ban","value":"192.0.2.7"}]}"#;
        let r = parse(body);
        let (new, skipped) = convert_new(r.new, None, 0);
        let taken: Vec<String> = new.iter().map(|(_, d)| d.value.to_string()).collect();
        assert_eq!(taken, ["192.0.2.1/32", "192.0.2.6/32"]);
        assert_eq!(&*new[1].1.origin, "crowdsec");
        assert!(new[1].1.reason.is_empty());
        let why: Vec<&str> = skipped
            .iter()
            .map(|s| match s {
                Skip::Invalid(why) => why.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(why.len(), 8, "{why:?}");
        assert!(why[0].contains("\"type\""), "{why:?}");
        assert!(why[1].contains("\"simulated\" is a string"), "{why:?}");
        assert!(
            why[2..6].iter().all(|w| w.contains("not an object")),
            "{why:?}"
        );
        assert!(why[6].contains("\"duration\" is a number"), "{why:?}");
        assert!(why[7].contains("\"value\" is a list"), "{why:?}");
        let (keys, skipped) = convert_deleted(r.deleted);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, Some(7));
        assert!(matches!(&skipped[..], [Skip::Invalid(w)] if w.starts_with("deleted entry")));
    }

    #[test]
    fn two_decisions_for_one_key_deleting_one_keeps_the_other() {
        let now = 1_000_000;
        let mut known = Known::default();
        let (new, _) = convert_new(
            vec![
                lapi(Some(1), "192.0.2.1", "1h"),
                lapi(Some(2), "192.0.2.1", "4h"),
                lapi(Some(3), "192.0.2.2", "1h"),
            ],
            None,
            now,
        );
        let all = known.replace(new);
        assert_eq!(all.len(), 2);
        let one = all.iter().find(|d| d.value.to_string() == "192.0.2.1/32");
        assert_eq!(one.unwrap().until_ms, now + 4 * 3_600_000, "the longest");

        // The longer one deleted: the shorter one is what the store keeps.
        let key = one.unwrap().key();
        let (drop, set) = known.delta(vec![(Some(2), key.clone())], Vec::new(), now);
        assert!(drop.is_empty());
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].until_ms, now + 3_600_000);
        // Deleted again (the LAPI repeats deletes): nothing changes.
        let (drop, set) = known.delta(vec![(Some(2), key.clone())], Vec::new(), now);
        assert!(drop.is_empty());
        assert_eq!(set[0].until_ms, now + 3_600_000);
        // The last one deleted: the key goes.
        let (drop, set) = known.delta(vec![(Some(1), key.clone())], Vec::new(), now);
        assert_eq!(drop, vec![key.clone()]);
        assert!(set.is_empty());

        // A delete without an id names the whole key.
        let (new, _) = convert_new(
            vec![
                lapi(Some(4), "192.0.2.2", "2h"),
                lapi(Some(5), "192.0.2.2", "3h"),
            ],
            None,
            now,
        );
        let key2 = new[0].1.key();
        let (_, set) = known.delta(Vec::new(), new, now);
        assert_eq!(set[0].until_ms, now + 3 * 3_600_000);
        let (drop, _) = known.delta(vec![(None, key2.clone())], Vec::new(), now);
        assert_eq!(drop, vec![key2]);

        // The same id sent again replaces its earlier version; expired ones are let go.
        let (new, _) = convert_new(vec![lapi(Some(6), "192.0.2.3", "1h")], None, now);
        known.delta(Vec::new(), new, now);
        let (new, _) = convert_new(vec![lapi(Some(6), "192.0.2.3", "10m")], None, now);
        let (_, set) = known.delta(Vec::new(), new, now);
        assert_eq!(set[0].until_ms, now + 600_000);
        let later = now + 700_000;
        let (new, _) = convert_new(vec![lapi(Some(7), "192.0.2.3", "1m")], None, later);
        let (drop, set) = known.delta(Vec::new(), new, later);
        assert!(drop.is_empty());
        assert_eq!(set[0].until_ms, later + 60_000, "id 6 expired, id 7 stays");
    }

    /// A hostile answer with a great many ids for one key: each insert was a scan of the
    /// key's list, and 200,000 of them stalled the bridge for minutes (no pulls, staleness
    /// never acted on). Now a map per key.
    #[test]
    fn many_ids_for_one_key_are_applied_and_deleted_one_by_one() {
        let now = 1_000_000;
        let mut known = Known::default();
        let n = 100_000;
        let (new, _) = convert_new(
            (0..n)
                .map(|i| lapi(Some(i), "192.0.2.9", &format!("{}s", 60 + i)))
                .collect(),
            None,
            now,
        );
        let key = new[0].1.key();
        // One shared copy of the origin and the type for all of them.
        assert!(Arc::ptr_eq(&new[0].1.origin, &new[n as usize - 1].1.origin));
        assert!(Arc::ptr_eq(&new[0].1.kind, &new[n as usize - 1].1.kind));
        let all = known.replace(new);
        assert_eq!((all.len(), known.len()), (1, n as usize));
        assert_eq!(all[0].until_ms, now + (60 + n as u64 - 1) * 1000);
        // All but the first deleted, in one delta: the first is what is left.
        let deleted = (1..n).map(|i| (Some(i), key.clone())).collect();
        let (drop, set) = known.delta(deleted, Vec::new(), now);
        assert!(drop.is_empty());
        assert_eq!(set[0].until_ms, now + 60_000);
        assert_eq!(known.len(), 1);
    }

    #[test]
    fn long_scenarios_are_cut_on_a_character_boundary() {
        let mut d = lapi(Some(1), "192.0.2.1", "1h").unwrap();
        d.scenario = Some("é".repeat(600));
        let (new, _) = convert_new(vec![Ok(d)], None, 0);
        let reason = &new[0].1.reason;
        assert!(reason.len() <= MAX_REASON && reason.len() >= MAX_REASON - 1);
        assert!(reason.chars().all(|c| c == 'é'));
    }

    /// Every entry of a body, read as `max_decisions` would let it, but without limit.
    const UNLIMITED: Limits = Limits {
        new: usize::MAX,
        deleted: Some(usize::MAX),
    };

    fn parse(body: &[u8]) -> StreamResponse {
        parse_stream(body, UNLIMITED).unwrap()
    }

    /// `n` well-formed entries, comma-separated.
    fn entries(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!(
                    r#"{{"id":{i},"duration":"1h","origin":"cscli","scope":"Ip","type":"ban","value":"10.{}.{}.{}"}}"#,
                    (i >> 16) & 255,
                    (i >> 8) & 255,
                    i & 255
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn answers_past_max_decisions_are_refused() {
        let two = format!(r#"{{"new":[{}],"deleted":null}}"#, entries(2));
        assert_eq!(
            read_answer(two.as_bytes(), true, 0, 2).unwrap().new.len(),
            2
        );
        let e = read_answer(two.as_bytes(), false, 1, 2).unwrap_err();
        assert!(e.contains("crowdsec.max_decisions (2)"), "{e}");
        assert!(read_answer(two.as_bytes(), true, 0, 1).is_err());
        // A delta's deleted list has the same ceiling.
        let deleted = format!(r#"{{"new":null,"deleted":[{}]}}"#, entries(3));
        let e = read_answer(deleted.as_bytes(), false, 0, 2).unwrap_err();
        assert!(e.contains("deleted") && e.contains("max_decisions"), "{e}");
    }

    #[test]
    fn an_oversized_answer_is_refused_while_it_is_parsed() {
        // Far more entries than the cap, and the body broken after them: refused at the
        // first entry past the cap, so the parse never held (or reached) the rest.
        let body = format!(r#"{{"new":[{}, BROKEN"#, entries(5_000));
        let e = read_answer(body.as_bytes(), true, 0, 100).unwrap_err();
        assert!(e.contains("crowdsec.max_decisions (100)"), "{e}");
        assert_eq!(
            parse_stream(
                body.as_bytes(),
                Limits {
                    new: 100,
                    deleted: None
                }
            )
            .unwrap_err(),
            ParseError::TooMany("new")
        );
    }

    #[test]
    fn a_snapshot_reads_past_its_deleted_list() {
        // However long, and whatever its entries hold: a snapshot does not keep it.
        let body = format!(
            r#"{{"new":[{}],"deleted":[{}, {{"scope": 5}}, "junk"]}}"#,
            entries(1),
            entries(500)
        );
        let r = read_answer(body.as_bytes(), true, 0, 10).unwrap();
        assert_eq!(r.new.len(), 1);
        assert!(r.deleted.is_empty());
        // A delta reads it (and this one is over the cap).
        assert!(read_answer(body.as_bytes(), false, 0, 10).is_err());
    }

    #[test]
    fn user_agent_has_exactly_one_slash() {
        assert_eq!(user_agent().matches('/').count(), 1);
        assert!(user_agent().starts_with("wraith/"));
    }
}
