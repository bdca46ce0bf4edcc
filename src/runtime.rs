//! The running server's state. A `Snapshot` is one complete, validated generation of the
//! config with everything built from it (routes, upstream pools, TLS acceptors). Reload builds
//! a whole new snapshot and swaps it in; requests already running keep the one they started
//! with. If anything in the new config is wrong, nothing changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::{self, Config, ListenerConfig, ListenerKey, LoadOptions, RouteAction};
use crate::decisions::appsec::Appsec;
use crate::decisions::crowdsec::{self, Bridge};
use crate::decisions::DecisionStore;
use crate::listener::client_auth::{ClientAuthEpoch, Withdrawal};
use crate::listener::{self, tls, ListenerHandle};
use crate::policy::PolicyEngine;
use crate::proxy::Gateway;
use crate::ratelimit::{self, Limiter};
use crate::router::{Route, Router};
use crate::signals::PidFile;
use crate::telemetry::{SnapshotTelemetry, Telemetry};
use crate::upstream::Upstream;

/// One listener's settings in a snapshot, with its TLS acceptor and HTTP server builder.
pub struct ListenerRuntime {
    pub config: ListenerConfig,
    pub tls: Option<tls::ServerTls>,
    pub http: listener::HttpBuilders,
    /// The QUIC side's TLS and transport settings (`http3 = true`).
    pub quic: Option<listener::quic::QuicRuntime>,
    /// The client-certificate rules its connections are admitted under: carried over by
    /// reloads that keep them, revoked (the connections close) by one that changes them.
    pub client_auth: Arc<ClientAuthEpoch>,
    /// Its client-certificate verifier, for the check of resumed sessions.
    pub client_verifier: tls::ClientVerifier,
    /// Its metric handles (`Snapshot::attach`): a connection counts through the listener
    /// it was accepted on, even once a reload has removed it.
    pub metrics: std::sync::OnceLock<Arc<crate::telemetry::metrics::ListenerMetrics>>,
}

/// One generation of the configuration, fully built.
pub struct Snapshot {
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub config: Config,
    pub router: Router,
    /// The policy stage of this generation.
    pub policy: PolicyEngine,
    pub upstreams: Vec<Arc<Upstream>>,
    pub listeners: Vec<Arc<ListenerRuntime>>,
    /// The `[rate_limit]` default limits (shared by every route without its own).
    pub default_limits: Arc<[Arc<Limiter>]>,
    /// The Redis connection of `[rate_limit.redis]`, for `shared` limits.
    pub rate_store: Option<Arc<ratelimit::shared::SharedStore>>,
    /// The CrowdSec AppSec stage, when configured.
    pub appsec: Option<Arc<Appsec>>,
    /// The LAPI client for `[crowdsec]`, built (CA, client certificate) with the snapshot so
    /// that a file it cannot use fails `wraith test` and the reload, not the bridge later.
    pub crowdsec_client: Option<reqwest::Client>,
    /// `crowdsec::tls_fingerprint` of the files `crowdsec_client` was built from.
    pub crowdsec_tls: u64,
    /// Access-log sinks and metric handles (attached by the runtime after `build`).
    pub telemetry: SnapshotTelemetry,
}

impl Snapshot {
    /// Builds everything a config describes. Upstream pools whose settings did not change are
    /// carried over from `previous`, with their idle connections and health; changed ones
    /// are rebuilt but keep the health state of endpoints they still have.
    pub fn build(
        config: Config,
        generation: u64,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, Vec<String>> {
        let mut errors = Vec::new();
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            let same_name =
                previous.and_then(|p| p.upstreams.iter().find(|old| old.config.name == u.name));
            let reused = same_name.filter(|old| old.config == *u).cloned();
            // Changed settings: a new pool, but endpoints it still has keep their health.
            upstreams
                .push(reused.unwrap_or_else(|| Upstream::new(u.clone(), same_name.map(|a| &**a))));
        }
        let by_name: HashMap<&str, &Arc<Upstream>> =
            upstreams.iter().map(|u| (&*u.config.name, u)).collect();
        // Limiters whose settings did not change keep their state across the reload; changed
        // ones start with what each client had spent (`ratelimit::successor`).
        let max_keys = config.rate_limit.max_keys.get();
        let old_defaults: &[Arc<Limiter>] = previous.map_or(&[], |p| &p.default_limits);
        let default_limits: Arc<[Arc<Limiter>]> = config
            .rate_limit
            .limits
            .iter()
            .map(|c| ratelimit::reuse_or_new(old_defaults, c, max_keys))
            .collect();
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let limits: Arc<[Arc<Limiter>]> = match &r.rate_limits {
                    None => default_limits.clone(),
                    Some(own) => {
                        let before = previous.and_then(|p| {
                            p.router.routes().iter().find(|o| o.config.name == r.name)
                        });
                        let old = before.map_or(&[][..], |o| &o.limits[..]);
                        // A route that used the defaults until now gets limiters of its own
                        // (which start with what each client had spent of the defaults):
                        // the default ones go on counting for the routes that keep them.
                        let had_own = before.is_some_and(|o| o.config.rate_limits.is_some());
                        own.iter()
                            .map(|c| {
                                if had_own {
                                    ratelimit::reuse_or_new(old, c, max_keys)
                                } else {
                                    ratelimit::successor(old, c, max_keys)
                                }
                            })
                            .collect()
                    }
                };
                Route {
                    upstream: match &r.action {
                        RouteAction::Upstream(name) => by_name.get(&**name).map(|u| Arc::clone(u)),
                        _ => None,
                    },
                    limit_names: ratelimit::names(&limits),
                    shared_limits: limits.iter().any(|l| l.config.shared),
                    limits,
                    config: r.clone(),
                    index,
                }
            })
            .collect();
        let appsec = match config.crowdsec.as_ref().and_then(|c| {
            c.appsec
                .clone()
                .map(|a| Appsec::new(a, c.api_key.clone(), c.ca_cert.as_deref()))
        }) {
            None => None,
            Some(Ok(a)) => Some(Arc::new(a)),
            Some(Err(e)) => {
                errors.push(e);
                None
            }
        };
        // The Redis connection carries over a reload that keeps its settings.
        // (A changed CA or client certificate file is a change: the settings hold their
        // contents.) A new store counts its failures on from the one it replaces.
        let rate_store = match &config.rate_limit.redis {
            None => None,
            Some(settings) => match previous
                .and_then(|p| p.rate_store.as_ref())
                .filter(|s| s.settings == *settings)
            {
                Some(same) => Some(same.clone()),
                None => match ratelimit::shared::SharedStore::new(
                    settings.clone(),
                    previous.and_then(|p| p.rate_store.as_deref()),
                ) {
                    Ok(s) => Some(Arc::new(s)),
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                },
            },
        };
        let crowdsec_tls = config
            .crowdsec
            .as_ref()
            .map_or(0, crowdsec::tls_fingerprint);
        let crowdsec_client = match config.crowdsec.as_ref().map(crowdsec::http_client) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                errors.push(e);
                None
            }
        };
        // Policies: route entities and sets, built once per snapshot.
        let policy = match PolicyEngine::build(&config) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(format!("policy: {e}"));
                None
            }
        };

        let mut listeners = Vec::new();
        for l in &config.listeners {
            let verifier = match l.tls.as_ref().map(|t| tls::client_verifier(&t.client_auth)) {
                None | Some(Ok(None)) => None,
                Some(Ok(Some(v))) => Some(v),
                Some(Err(e)) => {
                    errors.push(format!("listener {:?}: {e}", l.name));
                    continue;
                }
            };
            let before = previous.and_then(|p| p.listener_by_key(&l.key()));
            let client_auth =
                ClientAuthEpoch::carry_over(l, before.map(|b| (&b.config, &b.client_auth)));
            // The TLS sessions clients resume with outlive a reload that admits the same
            // clients the same way (client-certificate rules, TLS versions and groups): a
            // reload is no reason for a full handshake. One that changes those empties them,
            // so nobody resumes past the new rules.
            let same_rules = before.filter(|b| {
                Arc::ptr_eq(&b.client_auth, &client_auth)
                    && Withdrawal::between(&b.config, l).is_none()
            });
            let sessions = same_rules
                .and_then(|b| b.tls.as_ref())
                .map(|t| t.sessions());
            let acceptor = match &l.tls {
                Some(t) => match tls::server_config(t, verifier.clone(), sessions) {
                    Ok(sc) => Some(sc),
                    Err(e) => {
                        errors.push(format!("listener {:?}: {e}", l.name));
                        continue;
                    }
                },
                None => None,
            };
            let quic = match listener::quic::build(
                l,
                verifier.clone(),
                same_rules.and_then(|b| b.quic.as_ref()),
            ) {
                Ok(q) => q,
                Err(e) => {
                    errors.push(format!("listener {:?}: HTTP/3: {e}", l.name));
                    continue;
                }
            };
            listeners.push(Arc::new(ListenerRuntime {
                http: listener::http_builder(&l.limits),
                config: l.clone(),
                tls: acceptor,
                quic,
                client_auth,
                client_verifier: verifier,
                metrics: std::sync::OnceLock::new(),
            }));
        }
        let Some(policy) = policy.filter(|_| errors.is_empty()) else {
            return Err(errors);
        };
        Ok(Snapshot {
            generation,
            loaded_at: SystemTime::now(),
            router: Router::new(routes),
            policy,
            upstreams,
            listeners,
            default_limits,
            rate_store,
            appsec,
            crowdsec_client,
            crowdsec_tls,
            config,
            telemetry: SnapshotTelemetry::default(),
        })
    }

    /// Gives the snapshot its sinks and metric handles, and each listener its own.
    pub fn attach(&mut self, telemetry: SnapshotTelemetry) {
        for l in &self.listeners {
            if let Some(m) = telemetry.listener(&l.config.name) {
                let _ = l.metrics.set(m.clone());
            }
        }
        self.telemetry = telemetry;
    }

    /// Every limiter of this snapshot (for cleanup and status).
    pub fn limiters(&self) -> Vec<Arc<Limiter>> {
        // Routes share the default limits (and may share others): each once. By address,
        // in one pass: the upkeep task asks for this list twice a second.
        let mut seen = std::collections::HashSet::new();
        let all = self
            .default_limits
            .iter()
            .chain(self.router.routes().iter().flat_map(|r| r.limits.iter()));
        all.filter(|l| seen.insert(Arc::as_ptr(l)))
            .cloned()
            .collect()
    }

    /// The listener with this name.
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerRuntime>> {
        self.listeners.iter().find(|l| &*l.config.name == name)
    }

    /// The listener with this key.
    pub fn listener_by_key(&self, key: &ListenerKey) -> Option<&Arc<ListenerRuntime>> {
        self.listeners.iter().find(|l| l.config.key() == *key)
    }
}

/// Closes the connections admitted under client-certificate rules that `new` changed: a
/// certificate just revoked by a CRL, or let in by a CA just removed, must not keep its access
/// for as long as it keeps a connection open. Of the listeners whose rules stay, the
/// connections that negotiated a TLS version or key-exchange group `new` no longer allows
/// close too (`client_auth::Withdrawal`); the others stay. Listeners `new` no longer has drain
/// anyway (`Runtime::retire_listeners`).
fn revoke_changed_client_auth(old: &Snapshot, new: &Snapshot) {
    for before in &old.listeners {
        let Some(after) = new.listener_by_key(&before.config.key()) else {
            continue;
        };
        if !Arc::ptr_eq(&before.client_auth, &after.client_auth) {
            let connections = before.client_auth.revoke();
            tracing::info!(
                listener = %after.config.name,
                connections,
                "client authentication settings changed; closing the connections admitted under the old ones"
            );
        } else if let Some(w) = Withdrawal::between(&before.config, &after.config) {
            tracing::info!(
                listener = %after.config.name,
                versions = ?w.versions,
                groups = ?w.groups,
                "TLS versions or key-exchange groups withdrawn; closing the connections that negotiated them"
            );
            after.client_auth.withdraw(new.generation, w);
        }
    }
}

/// The `[server]` keys read only at start whose value `new` changes (for the reload's
/// warning): the runtime and the logging are set up once. `pid_file` and `admin_socket` are
/// moved by the reload; `shutdown_timeout`, `trusted_proxies` and `dev_certs_dir` apply to
/// the new generation.
fn restart_only_changes(
    old: &config::ServerConfig,
    new: &config::ServerConfig,
) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.worker_threads != new.worker_threads {
        out.push("worker_threads");
    }
    if old.log_level != new.log_level {
        out.push("log_level");
    }
    if old.log_format != new.log_format {
        out.push("log_format");
    }
    out
}

/// A mutex's content, also after a panic elsewhere poisoned it (what it holds stays valid).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Outcome of the last reload, for `wraith status`.
#[derive(Debug, Clone)]
pub struct ReloadResult {
    /// Which reload this was: 1 for the first since the server started, counted when it
    /// starts (after any reload before it has finished). `wraith reload` waits for one
    /// numbered past those started before it sent its signal: `at` has only seconds, and two
    /// reloads within one second with the same outcome are otherwise the same record.
    pub seq: u64,
    pub at: SystemTime,
    pub ok: bool,
    pub errors: Vec<String>,
    /// The generation in service once it was done.
    pub generation: u64,
}

/// The running server: the gateway plus everything needed to reload and drain it.
pub struct Runtime {
    pub gateway: Arc<Gateway>,
    pub config_path: PathBuf,
    pub started_at: SystemTime,
    pub started: Instant,
    /// Metrics, the traffic window and the log writers; outlives every snapshot.
    pub telemetry: Arc<Telemetry>,
    generation: AtomicU64,
    /// Cancelled when the server starts draining.
    pub shutdown: CancellationToken,
    /// Every connection task, so draining can wait for them.
    pub connections: TaskTracker,
    /// TLS handshakes refused because of the client certificate, by reason.
    pub client_cert_rejections: tls::ClientCertRejections,
    listeners: Mutex<HashMap<ListenerKey, ListenerHandle>>,
    /// The QUIC (HTTP/3) sides of listeners with `http3 = true`.
    quic: Mutex<HashMap<ListenerKey, listener::quic::QuicHandle>>,
    /// QUIC endpoints a reload stopped, still bound while their connections drain.
    quic_draining: listener::quic::Draining,
    /// Connections open per client (`limits.max_connections_per_client`), per listener: one
    /// count for its TCP and QUIC sides, kept across reloads (and a QUIC endpoint taken back
    /// from draining).
    per_client: Mutex<HashMap<ListenerKey, Arc<listener::limit::PerClient>>>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Reloads started so far (each one's `ReloadResult::seq`).
    reloads_started: AtomicU64,
    last_reload: Mutex<Option<ReloadResult>>,
    /// The CrowdSec bridge, while `[crowdsec]` is configured.
    crowdsec: Mutex<Option<Bridge>>,
    /// The pid file the server holds (`server.pid_file`; a reload that changes it moves it).
    pid_file: Mutex<Option<PidFile>>,
    /// The admin socket being served (`server.admin_socket`; a reload moves it too).
    admin: Mutex<Option<admin::AdminHandle>>,
}

impl Runtime {
    /// The per-client connection counts of the listener `key`.
    pub fn per_client(&self, key: &ListenerKey) -> Arc<listener::limit::PerClient> {
        lock(&self.per_client)
            .entry(key.clone())
            .or_default()
            .clone()
    }
}

/// Applies a reloaded `limits.max_connections` to a running listener's limit. Open
/// connections stay; when the new limit is lower, new ones wait until enough have closed.
fn resize_limit(
    limit: &crate::listener::limit::ConnectionLimit,
    listener: &ListenerRuntime,
    address: SocketAddr,
    transport: &'static str,
) {
    let wanted = listener.config.limits.max_connections.get();
    if limit.max() != wanted {
        let old = limit.resize(wanted);
        tracing::info!(listener = %listener.config.name, address = %address, transport, old, new = wanted, open = limit.active(), "connection limit changed");
    }
}

impl Runtime {
    /// Builds the first snapshot from a loaded config and binds every listener.
    pub async fn start(config_path: PathBuf, config: Config) -> Result<Arc<Runtime>, String> {
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let telemetry = Arc::new(Telemetry::default());
        let mut snapshot = Snapshot::build(config, 1, None).map_err(|e| e.join("\n"))?;
        let built = SnapshotTelemetry::build(&telemetry, &snapshot.config, None)
            .map_err(|e| e.join("\n"))?;
        snapshot.attach(built);
        let decisions = Arc::new(DecisionStore::new());
        if let Some(path) = &snapshot.config.decisions.state_file {
            let n = decisions.load(path).map_err(|e| {
                format!(
                    "{}: {e}\n(fix or move the file away; it holds the local bans)",
                    snapshot.config.key("decisions.state_file")
                )
            })?;
            if n > 0 {
                tracing::info!(decisions = n, file = %path.display(), "local decisions restored");
            }
        }
        let runtime = Arc::new(Runtime {
            gateway: Arc::new(Gateway::new(Arc::new(snapshot), decisions)),
            config_path,
            started_at: SystemTime::now(),
            started: Instant::now(),
            telemetry,
            generation: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            client_cert_rejections: tls::ClientCertRejections::default(),
            listeners: Mutex::new(HashMap::new()),
            quic: Mutex::new(HashMap::new()),
            quic_draining: Default::default(),
            per_client: Mutex::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            reloads_started: AtomicU64::new(0),
            last_reload: Mutex::new(None),
            crowdsec: Mutex::new(None),
            pid_file: Mutex::new(None),
            admin: Mutex::new(None),
        });
        for u in &runtime.gateway.snapshot().upstreams {
            u.own_health();
        }
        runtime.reconcile_crowdsec().await;
        runtime.spawn_upkeep();
        let snapshot = runtime.gateway.snapshot();
        let mut bound = Vec::new();
        for l in &snapshot.listeners {
            bound.push(listener::bind(&l.config).await?);
        }
        let quic = runtime.bind_quic(&snapshot, &bound)?;
        snapshot.telemetry.activate();
        runtime.activate(bound);
        runtime.reconcile_quic(quic);
        Ok(runtime)
    }

    /// The current generation number.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Re-reads the config file and swaps in the new snapshot. On any error the running
    /// snapshot stays and the errors are returned (and remembered for `wraith status`).
    pub async fn reload(self: &Arc<Self>) -> Result<u64, Vec<String>> {
        let _guard = self.reload_lock.lock().await;
        // Numbered once it holds the lock: it reads the config file after every reload with
        // a lower number has finished.
        let seq = self.reloads_started.fetch_add(1, Ordering::Relaxed) + 1;
        // A panic while building (a bug) fails this reload, recorded like any other failure,
        // rather than ending the task with the status still showing the previous outcome.
        let result = match std::panic::AssertUnwindSafe(self.try_reload())
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                Err(vec![format!("reload failed on an internal error: {what}")])
            }
        };
        let record = ReloadResult {
            seq,
            at: SystemTime::now(),
            ok: result.is_ok(),
            errors: result.as_ref().err().cloned().unwrap_or_default(),
            generation: self.generation(),
        };
        self.gateway
            .snapshot()
            .telemetry
            .reload(record.ok, self.generation(), &record.errors);
        if let Ok(mut last) = self.last_reload.lock() {
            *last = Some(record);
        }
        match &result {
            Ok(generation) => tracing::info!(generation, "configuration reloaded"),
            Err(errors) => {
                for e in errors {
                    tracing::error!(error = %e, "reload rejected; the previous configuration stays in service");
                }
            }
        }
        result
    }

    async fn try_reload(self: &Arc<Self>) -> Result<u64, Vec<String>> {
        if self.shutdown.is_cancelled() {
            return Err(vec!["the server is shutting down".into()]);
        }
        let path = self.config_path.clone();
        // Loading reads files and parses certificates: keep it off the async workers.
        let loaded = tokio::task::spawn_blocking(move || {
            config::load(
                &path,
                LoadOptions {
                    generate_dev_certs: true,
                },
            )
        })
        .await
        .map_err(|e| vec![format!("config loader failed: {e}")])?;
        let config = loaded.map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let old = self.gateway.snapshot();
        let generation = self.generation() + 1;
        if config.metrics != old.config.metrics {
            tracing::warn!(
                "[metrics] changed: the metrics listener keeps its address and path until the next restart"
            );
        }
        for key in restart_only_changes(&old.config.server, &config.server) {
            tracing::warn!(
                key = %format!("server.{key}"),
                "[server] {key} changed: it takes effect at the next restart"
            );
        }
        let mut snapshot = Snapshot::build(config, generation, Some(&old))?;
        let built =
            SnapshotTelemetry::build(&self.telemetry, &snapshot.config, Some(&old.telemetry))?;
        snapshot.attach(built);

        // Bind new addresses before swapping, so a port in use fails the whole reload.
        let existing: Vec<ListenerKey> = self.listener_keys();
        let mut bound = Vec::new();
        for l in &snapshot.listeners {
            if !existing.contains(&l.config.key()) {
                bound.push(listener::bind(&l.config).await.map_err(|e| vec![e])?);
            }
        }
        let quic = self.bind_quic(&snapshot, &bound).map_err(|e| vec![e])?;
        // A pid file or admin socket moved elsewhere: taken there now (a pid file locked by
        // another server, a path in use, fail the reload), the old ones given up at the swap,
        // so `wraith stop` / `reload`, which read the paths from the file, find this server.
        let (new_pid, new_admin) =
            self.move_server_files(&old.config.server, &snapshot.config.server)?;
        // A state file moved elsewhere: the bans already in the new file join the ones in
        // hand (the later end wins for the same ban), and the whole set is written there
        // before the swap, the last step that can fail, so a reload that fails adds nothing
        // and one that cannot write the new file fails. The old file is left as it is.
        let moved_state = snapshot.config.decisions.state_file != old.config.decisions.state_file;
        if moved_state {
            if let Some(path) = &snapshot.config.decisions.state_file {
                let store = &self.gateway.decisions;
                let key = snapshot.config.key("decisions.state_file");
                let from_file =
                    DecisionStore::read(path).map_err(|e| vec![format!("{key}: {e}")])?;
                let n = from_file.len();
                // As `save_decisions`: nothing to keep and no file yet leaves no empty file.
                if store.counts().0 > 0 || path.exists() {
                    store
                        .save_merged(path, &from_file)
                        .map_err(|e| vec![format!("{key}: {e}")])?;
                }
                store.merge(from_file);
                tracing::info!(file = %path.display(), decisions = n, "decisions state file changed; the decisions read from it were merged with the ones in hand");
            }
        }
        // SIGTERM came while this reload was binding or reading: the server is draining, and
        // a reload must not put new listeners or sinks to work now.
        if self.shutdown.is_cancelled() {
            return Err(vec!["the server is shutting down".into()]);
        }
        // Nothing can fail from here on: the new sinks may act (retention included).
        snapshot.telemetry.activate();
        let snapshot = Arc::new(snapshot);
        self.gateway.swap(snapshot.clone());
        for u in &snapshot.upstreams {
            u.own_health();
            // Only now: a reload that failed before this point must have wired nothing.
            if let Some(before) = old
                .upstreams
                .iter()
                .find(|o| o.config.name == u.config.name)
            {
                u.hear_releases_of(before);
            }
        }
        if moved_state {
            // Again, for a ban added or lifted between the write above and the swap (it went
            // to the old file); the new file was writable a moment ago.
            if let Err(e) = self.save_decisions() {
                tracing::error!(error = %e, "local decisions not written to the new state file");
            }
        }
        self.generation.store(generation, Ordering::Relaxed);
        if let Some(moved) = new_pid {
            let old = std::mem::replace(&mut *lock(&self.pid_file), moved);
            // Removes the old file.
            drop(old);
            tracing::info!(pid_file = ?snapshot.config.server.pid_file, "pid file moved");
        }
        if let Some(moved) = new_admin {
            let old = std::mem::replace(&mut *lock(&self.admin), moved);
            // Stops serving the old socket and removes it.
            drop(old);
            tracing::info!(admin_socket = ?snapshot.config.server.admin_socket, "admin socket moved");
        }
        // After the swap: a connection accepted from now on gets the new rules.
        revoke_changed_client_auth(&old, &snapshot);
        self.activate(bound);
        self.retire_listeners();
        self.reconcile_quic(quic);
        self.reconcile_crowdsec().await;
        Ok(generation)
    }

    /// Hands the runtime the pid file `serve` took before starting it (a reload may move it).
    pub fn hold_pid_file(&self, pid_file: Option<PidFile>) {
        *lock(&self.pid_file) = pid_file;
    }

    /// Where the pid file the server holds is.
    pub fn pid_file_path(&self) -> Option<PathBuf> {
        lock(&self.pid_file)
            .as_ref()
            .map(|p| p.path().to_path_buf())
    }

    /// Where the admin socket being served is.
    pub fn admin_socket_path(&self) -> Option<PathBuf> {
        lock(&self.admin).as_ref().map(|a| a.path.clone())
    }

    /// Stops serving the admin socket and removes it (at exit).
    pub fn stop_admin(&self) {
        drop(lock(&self.admin).take());
    }

    /// Gives the pid file back, to be removed and unlocked last of all at exit.
    pub fn take_pid_file(&self) -> Option<PidFile> {
        lock(&self.pid_file).take()
    }

    /// Starts the admin socket of the current config, if it has one.
    pub fn start_admin(self: &Arc<Self>) -> Result<(), String> {
        let snapshot = self.gateway.snapshot();
        if let Some(path) = &snapshot.config.server.admin_socket {
            *lock(&self.admin) = Some(admin::start(self.clone(), path)?);
        }
        Ok(())
    }

    /// For a reload whose `[server]` names another pid file or admin socket: the new ones,
    /// taken and bound (`Some(None)`: that one is gone from the config); `None` where the path
    /// did not change. Dropped unused when the reload fails, they let go of what they took.
    #[allow(clippy::type_complexity)]
    fn move_server_files(
        self: &Arc<Self>,
        old: &config::ServerConfig,
        new: &config::ServerConfig,
    ) -> Result<(Option<Option<PidFile>>, Option<Option<admin::AdminHandle>>), Vec<String>> {
        // The file held now, named another way (`/var/run` -> `/run`): nothing to move.
        // Opening it again to take it would fail on our own lock, and closing that second
        // descriptor would drop the process's POSIX lock on it.
        let same_pid_file = match (&new.pid_file, lock(&self.pid_file).as_ref()) {
            (Some(path), Some(held)) => held.is_at(path),
            _ => false,
        };
        let pid = if new.pid_file != old.pid_file && !same_pid_file {
            Some(match &new.pid_file {
                Some(path) => {
                    Some(PidFile::create(path).map_err(|e| vec![format!("server.pid_file: {e}")])?)
                }
                None => None,
            })
        } else {
            None
        };
        let admin = if new.admin_socket != old.admin_socket {
            Some(match &new.admin_socket {
                Some(path) => Some(
                    admin::start(self.clone(), path)
                        .map_err(|e| vec![format!("server.admin_socket: {e}")])?,
                ),
                None => None,
            })
        } else {
            None
        };
        Ok((pid, admin))
    }

    /// Starts, restarts or stops the CrowdSec bridge to match the current snapshot (whose
    /// build made the LAPI client, so nothing here can fail). A bridge being replaced has
    /// ended before the new one starts: nothing it pulled lands after the change.
    async fn reconcile_crowdsec(&self) {
        let snapshot = self.gateway.snapshot();
        let wanted = snapshot.config.crowdsec.clone();
        let old = {
            let mut slot = self.crowdsec.lock().unwrap_or_else(|e| e.into_inner());
            // The same settings and the same certificate files: nothing to do. Files
            // rotated in place (same paths) restart the bridge with the new ones.
            if slot.as_ref().map(|b| (&b.config, b.tls))
                == wanted.as_ref().map(|w| (w, snapshot.crowdsec_tls))
            {
                return;
            }
            slot.take()
        };
        let mut fresh_since_ms = None;
        if let Some(old) = old {
            let ms = old.status.last_success_ms.load(Ordering::Relaxed);
            fresh_since_ms = (ms > 0).then_some(ms);
            old.stop().await;
        }
        let store = self.gateway.decisions.clone();
        // No stale closed-mode refusal from a bridge that is gone.
        store.set_refuse_all(false);
        let bridge = match (wanted, snapshot.crowdsec_client.clone()) {
            (Some(config), Some(client)) => {
                let mut bridge =
                    crowdsec::spawn(config, client, store, &self.shutdown, fresh_since_ms);
                bridge.tls = snapshot.crowdsec_tls;
                Some(bridge)
            }
            _ => {
                store.replace_crowdsec(Vec::new());
                None
            }
        };
        *self.crowdsec.lock().unwrap_or_else(|e| e.into_inner()) = bridge;
    }

    /// The CrowdSec bridge's state, when one runs: (lapi url, status).
    pub fn crowdsec_status(&self) -> Option<(String, Arc<crowdsec::BridgeStatus>)> {
        self.crowdsec
            .lock()
            .ok()?
            .as_ref()
            .map(|b| (b.config.lapi_url.clone(), b.status.clone()))
    }

    /// Background upkeep: expired decisions out of the lookup table (every second), idle
    /// rate-limit keys dropped (every `[rate_limit] cleanup_interval`, and at once from a
    /// limit whose key table is full when a new key asks: at most once a second each).
    fn spawn_upkeep(self: &Arc<Self>) {
        let rt = self.clone();
        tokio::spawn(async move {
            let second = std::time::Duration::from_secs(1);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_cleanup = Instant::now();
            loop {
                // The running snapshot's limits; one replaced meanwhile keeps its ask for
                // the next round.
                let limits = rt.gateway.snapshot().limiters();
                let ticked = tokio::select! {
                    _ = tick.tick() => true,
                    _ = ratelimit::table_full(&limits) => false,
                    _ = rt.shutdown.cancelled() => return,
                };
                drop(limits);
                if ticked {
                    // Rebuilds the lookup table when anything expired: off the async
                    // workers, as a large decision set makes that take a while.
                    let store = rt.gateway.decisions.clone();
                    let purged = tokio::task::spawn_blocking(move || store.purge_expired())
                        .await
                        .unwrap_or(0);
                    if purged > 0 {
                        tracing::debug!(purged, "expired decisions removed");
                    }
                }
                let snapshot = rt.gateway.snapshot();
                let due = last_cleanup.elapsed() >= snapshot.config.rate_limit.cleanup_interval;
                if due {
                    last_cleanup = Instant::now();
                }
                let limiters: Vec<_> = snapshot
                    .limiters()
                    .into_iter()
                    // Taken either way: this cleanup answers the ask.
                    .filter(|l| l.take_cleanup_ask() | due)
                    .collect();
                drop(snapshot);
                if limiters.is_empty() {
                    continue;
                }
                // retain_recent walks every key: keep it off the async workers.
                let _ = tokio::task::spawn_blocking(move || {
                    for l in limiters {
                        l.cleanup();
                    }
                })
                .await;
            }
        });
    }

    /// The save at exit: `save_decisions`, except that a state file another writer replaced
    /// since this server last read or wrote it is left alone (a newer server took over while
    /// this one drained); `Ok(false)` then.
    pub fn save_decisions_at_exit(&self) -> Result<bool, String> {
        let snapshot = self.gateway.snapshot();
        match &snapshot.config.decisions.state_file {
            Some(path) if self.gateway.decisions.counts().0 == 0 && !path.exists() => Ok(true),
            Some(path) => self
                .gateway
                .decisions
                .save_unless_replaced(path)
                .map(|saved| saved.is_some()),
            None => Ok(true),
        }
    }

    /// Writes the local decisions to the state file (if one is configured).
    pub fn save_decisions(&self) -> Result<(), String> {
        let snapshot = self.gateway.snapshot();
        match &snapshot.config.decisions.state_file {
            // Nothing to keep and nothing kept before: leave no empty file behind.
            Some(path) if self.gateway.decisions.counts().0 == 0 && !path.exists() => Ok(()),
            Some(path) => self.gateway.decisions.save(path).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Starts accept loops for freshly bound listeners.
    fn activate(self: &Arc<Self>, bound: Vec<listener::Bound>) {
        let Ok(mut map) = self.listeners.lock() else {
            return;
        };
        // Checked under the map's lock, which the shutdown takes to stop every listener: a
        // listener is either stopped by it or never started.
        if self.shutdown.is_cancelled() {
            return;
        }
        for b in bound {
            let handle = listener::spawn(self.clone(), b);
            map.insert(handle.key.clone(), handle);
        }
    }

    /// Binds the UDP side of every listener of `snapshot` that wants HTTP/3 and has none yet,
    /// on the port its TCP side has (`fresh`: TCP sockets bound for this snapshot). Where an
    /// endpoint of ours still drains the connections of an earlier listener, that one is
    /// taken back instead: its socket holds the port until they are gone.
    fn bind_quic(
        &self,
        snapshot: &Snapshot,
        fresh: &[listener::Bound],
    ) -> Result<Vec<listener::quic::Bound>, String> {
        let running: Vec<ListenerKey> = self
            .quic
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let tcp: HashMap<ListenerKey, SocketAddr> = self
            .listeners
            .lock()
            .map(|m| m.values().map(|h| (h.key.clone(), h.local_addr)).collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for l in &snapshot.listeners {
            let Some(quic) = &l.quic else { continue };
            let key = l.config.key();
            if running.contains(&key) {
                continue;
            }
            let address = fresh
                .iter()
                .find(|b| b.key == key)
                .map(|b| b.local_addr)
                .or_else(|| tcp.get(&key).copied())
                .unwrap_or(l.config.address);
            out.push(match self.quic_draining.rebind(&l.config, address, quic) {
                Some(b) => b,
                None => listener::quic::bind(&l.config, address, quic)?,
            });
        }
        Ok(out)
    }

    /// Starts freshly bound (or taken back) QUIC endpoints, gives running ones the current
    /// snapshot's settings for their new connections, and drains those whose listener no
    /// longer wants HTTP/3.
    fn reconcile_quic(self: &Arc<Self>, bound: Vec<listener::quic::Bound>) {
        let snapshot = self.gateway.snapshot();
        let Ok(mut map) = self.quic.lock() else {
            return;
        };
        // As in `activate`: the shutdown drains this map under its lock.
        if self.shutdown.is_cancelled() {
            return;
        }
        for (key, handle) in std::mem::take(&mut *map) {
            let listener = snapshot.listener_by_key(&key);
            match listener.and_then(|l| l.quic.as_ref().map(|q| (l, q))) {
                Some((l, quic)) => {
                    handle.update(quic);
                    resize_limit(&handle.limit, l, handle.local_addr, "quic");
                    map.insert(key, handle);
                }
                None => {
                    tracing::info!(address = %handle.local_addr, "HTTP/3 removed; draining its QUIC connections");
                    self.quic_draining.keep(handle);
                }
            }
        }
        for b in bound {
            self.quic_draining.revive(&b);
            let handle = listener::quic::spawn(self.clone(), b);
            map.insert(handle.key.clone(), handle);
        }
    }

    /// QUIC connections open per listener with HTTP/3.
    pub fn quic_states(&self) -> Vec<(ListenerKey, usize)> {
        self.quic
            .lock()
            .map(|m| m.values().map(|h| (h.key.clone(), h.active())).collect())
            .unwrap_or_default()
    }

    /// Stops listeners that the current snapshot no longer has; their connections drain.
    fn retire_listeners(&self) {
        let snapshot = self.gateway.snapshot();
        let Ok(mut map) = self.listeners.lock() else {
            return;
        };
        map.retain(|key, handle| match snapshot.listener_by_key(key) {
            Some(l) => {
                resize_limit(&handle.limit, l, handle.local_addr, "tcp");
                true
            }
            None => {
                tracing::info!(address = %handle.local_addr, "listener removed; draining its connections");
                handle.stop.cancel();
                false
            }
        });
    }

    fn listener_keys(&self) -> Vec<ListenerKey> {
        self.listeners
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Active listeners: (key, bound address, active connections).
    pub fn listener_states(&self) -> Vec<(ListenerKey, SocketAddr, usize)> {
        let mut out: Vec<_> = self
            .listeners
            .lock()
            .map(|m| {
                m.values()
                    .map(|h| (h.key.clone(), h.local_addr, h.active()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Reloads started since the server started (the `seq` of the latest).
    pub fn reloads_started(&self) -> u64 {
        self.reloads_started.load(Ordering::Relaxed)
    }

    /// The last reload, if any.
    pub fn last_reload(&self) -> Option<ReloadResult> {
        self.last_reload.lock().ok().and_then(|l| l.clone())
    }

    /// Stops accepting everywhere and asks every connection to finish. Returns when all
    /// connections are done; the caller bounds the wait with the shutdown timeout.
    pub async fn drain(&self) {
        self.shutdown.cancel();
        if let Ok(map) = self.listeners.lock() {
            for h in map.values() {
                h.stop.cancel();
            }
        }
        let endpoints: Vec<_> = match self.quic.lock() {
            Ok(mut map) => map.drain().map(|(_, h)| h).collect(),
            Err(_) => Vec::new(),
        };
        for h in &endpoints {
            h.stop();
        }
        self.connections.close();
        self.connections.wait().await;
        // QUIC: let the last close frames leave before the process exits.
        for h in &endpoints {
            h.wait_idle().await;
        }
        self.quic_draining.wait_idle().await;
    }
}
