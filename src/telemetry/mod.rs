//! Telemetry: server logs (tracing), the access log and its sinks, security events, metrics
//! and the last-minute window behind `wraith status` and `wraith top`.
//!
//! - `Telemetry` lives as long as the process: the metric registry, the traffic window and
//!   every sink writer thread (so shutdown can flush them all).
//! - `SnapshotTelemetry` belongs to one config snapshot: its sinks (shared with the previous
//!   snapshot when their settings did not change; the SQLite sink whenever the database is the
//!   same, taking the new settings at `activate`) and the pre-resolved metric handles of its
//!   routes and endpoints. `emit` is the one place a finished request is accounted for.
//!
//! Server logs are JSON when stderr is not a terminal (or when configured), human text
//! otherwise. `WRAITH_LOG` overrides the configured filter.

pub mod access_log;
pub mod exporter;
pub mod format;
pub mod metrics;
pub mod process;
pub mod sinks;
pub mod sqlite;
pub mod window;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat, SqliteSinkConfig};
use access_log::AccessRecord;
use format::{CachedTime, CombinedOptions, Event, Formatting, TimeStyle};
use metrics::{
    origin_label, EndpointMetrics, ListenerMetrics, Metrics, OriginLabel, RouteLabel, RouteMetrics,
    SinkLabel,
};
use sinks::{FileWriter, Queue, Sink, Writers};
use sqlite::SqliteSettings;
use window::Window;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = std::env::var("WRAITH_LOG")
        .ok()
        .and_then(|f| log_filter(&f))
        .or_else(|| log_filter(level))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// The server log filter for `spec`. rustls logs what clients make it do (a warning for every
/// TLS 1.2 renegotiation attempt, before any authentication), so unless `spec` names it, it
/// logs errors only: an unauthenticated client must not be able to fill the server log.
/// Wraith logs refused handshakes itself, at debug (client certificates at info).
fn log_filter(spec: &str) -> Option<EnvFilter> {
    let filter = EnvFilter::try_new(spec).ok()?;
    let directives = || spec.split(',').map(str::trim);
    // A directive for rustls itself (`rustls=debug`, `rustls::server=trace`; not
    // `tokio_rustls`), or nothing logged by default (`off`): left as written.
    let names_rustls = directives().any(|d| {
        let target = d.split(['=', '[']).next().unwrap_or("");
        target == "rustls" || target.starts_with("rustls::")
    });
    if names_rustls || directives().any(|d| d.eq_ignore_ascii_case("off")) {
        return Some(filter);
    }
    Some(filter.add_directive("rustls=error".parse().ok()?))
}

/// Process-wide telemetry state.
#[derive(Default)]
pub struct Telemetry {
    pub metrics: Metrics,
    pub window: Window,
    pub writers: Writers,
    /// The SQLite sinks alive, whichever configurations hold them: one writer per database.
    sqlite: Mutex<Vec<LiveSqlite>>,
}

/// A SQLite sink some configuration (in service, or still held by a request) holds.
struct LiveSqlite {
    path: PathBuf,
    sink: Weak<AccessSink>,
    settings: Arc<SqliteSettings>,
}

/// The access sinks of one snapshot.
type AccessSink = Sink<Arc<AccessRecord>>;

/// A snapshot's sinks and metric handles.
#[derive(Default)]
pub struct SnapshotTelemetry {
    shared: Option<Arc<Telemetry>>,
    pub json: Option<Arc<AccessSink>>,
    pub combined: Option<Arc<AccessSink>>,
    pub sqlite: Option<Arc<AccessSink>>,
    pub events: Option<Arc<Sink<Event>>>,
    /// The settings the SQLite sink's writer follows, and what this snapshot puts in force
    /// there when it goes into service (`activate`).
    sqlite_settings: Option<(Arc<SqliteSettings>, SqliteSinkConfig, Formatting)>,
    // Fx hashing: the keys are names from the config, looked up on every request; SipHash's
    // flooding resistance buys nothing here and costs more than the rest of the lookup.
    routes: FxHashMap<Arc<str>, Arc<RouteMetrics>>,
    no_route: Option<Arc<RouteMetrics>>,
    /// upstream name -> (endpoint, handles)
    endpoints: FxHashMap<Arc<str>, Vec<(String, Arc<EndpointMetrics>)>>,
    listeners: FxHashMap<Arc<str>, Arc<ListenerMetrics>>,
}

impl SnapshotTelemetry {
    /// Builds the sinks and metric handles for `config`, reusing the previous snapshot's sinks
    /// and handles where nothing changed (reused file sinks reopen their files).
    pub fn build(
        shared: &Arc<Telemetry>,
        config: &Config,
        previous: Option<&SnapshotTelemetry>,
    ) -> Result<SnapshotTelemetry, Vec<String>> {
        let m = &shared.metrics;
        let mut out = SnapshotTelemetry {
            shared: Some(shared.clone()),
            ..SnapshotTelemetry::default()
        };
        for r in &config.routes {
            let reused = previous.and_then(|p| p.routes.get(&r.name)).cloned();
            out.routes
                .insert(r.name.clone(), reused.unwrap_or_else(|| m.route(&r.name)));
        }
        out.no_route = Some(
            previous
                .and_then(|p| p.no_route.clone())
                .unwrap_or_else(|| m.route(metrics::NO_ROUTE)),
        );
        for u in &config.upstreams {
            let old = previous.and_then(|p| p.endpoints.get(&u.name));
            let list = u
                .endpoints
                .iter()
                .map(|e| {
                    let name = e.authority.to_string();
                    let reused = old
                        .and_then(|l| l.iter().find(|(n, _)| *n == name))
                        .map(|(_, h)| h.clone());
                    let handles = reused.unwrap_or_else(|| m.endpoint(&u.name, &name));
                    (name, handles)
                })
                .collect();
            out.endpoints.insert(u.name.clone(), list);
        }
        for l in &config.listeners {
            let reused = previous.and_then(|p| p.listeners.get(&l.name)).cloned();
            out.listeners.insert(
                l.name.clone(),
                reused.unwrap_or_else(|| m.listener(&l.name)),
            );
        }

        let mut errors = Vec::new();
        let formatting = Formatting::new(&config.log);
        let log = &config.log;
        if let Some(c) = &log.json {
            let key = format!("{}|{}|{formatting:?}", c.path.display(), c.queue);
            let f = formatting.clone();
            out.json = sink(
                shared,
                previous.and_then(|p| p.json.as_ref()),
                "json",
                key,
                c.queue,
                || {
                    let mut clock = CachedTime::new(TimeStyle::Rfc3339);
                    FileWriter::new(
                        c.path.clone(),
                        Box::new(move |r: &Arc<AccessRecord>, buf: &mut Vec<u8>| {
                            format::json_line(r, &f, &mut clock, buf)
                        }),
                    )
                },
            )
            .map_err(|e| errors.push(format!("{}: {e}", config.key("log.json.path"))))
            .ok();
        }
        if let Some(c) = &log.combined {
            let opts = CombinedOptions { vhost: c.vhost };
            let key = format!(
                "{}|{}|{opts:?}|{formatting:?}",
                c.file.path.display(),
                c.file.queue
            );
            let f = formatting.clone();
            out.combined = sink(
                shared,
                previous.and_then(|p| p.combined.as_ref()),
                "combined",
                key,
                c.file.queue,
                || {
                    let mut clock = CachedTime::new(TimeStyle::Http);
                    FileWriter::new(
                        c.file.path.clone(),
                        Box::new(move |r: &Arc<AccessRecord>, buf: &mut Vec<u8>| {
                            format::combined_line(r, &f, opts, &mut clock, buf)
                        }),
                    )
                },
            )
            .map_err(|e| errors.push(format!("{}: {e}", config.key("log.combined.path"))))
            .ok();
        }
        if let Some(c) = &log.sqlite {
            match sqlite_sink(shared, c, &formatting) {
                Ok((sink, settings)) => {
                    out.sqlite = Some(sink);
                    out.sqlite_settings = Some((settings, c.clone(), formatting.clone()));
                }
                Err(e) => errors.push(format!("{}: {e}", config.key("log.sqlite.path"))),
            }
        }
        if let Some(c) = &log.events {
            let key = format!("{}|{}", c.path.display(), c.queue);
            out.events = sink(
                shared,
                previous.and_then(|p| p.events.as_ref()),
                "events",
                key,
                c.queue,
                || {
                    let mut clock = CachedTime::new(TimeStyle::Rfc3339);
                    FileWriter::new(
                        c.path.clone(),
                        Box::new(move |e: &Event, buf: &mut Vec<u8>| {
                            format::event_line(e, &mut clock, buf)
                        }),
                    )
                },
            )
            .map_err(|e| errors.push(format!("{}: {e}", config.key("log.events.path"))))
            .ok();
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// Puts the sinks in service: their writers start writing and running retention. Called
    /// once the snapshot is certain to serve (at start, and by a reload once nothing can fail
    /// any more): a sink built by a reload that then fails must leave its output as it was,
    /// e.g. not delete rows under a new `max_rows`. Sinks carried over are active already.
    pub fn activate(&self) {
        // A SQLite writer this snapshot shares with the one before takes its settings now.
        if let (Some(s), Some((settings, config, formatting))) =
            (&self.sqlite, &self.sqlite_settings)
        {
            settings.set(config, formatting);
            s.queue.set_capacity(config.queue);
        }
        for s in [&self.json, &self.combined, &self.sqlite]
            .into_iter()
            .flatten()
        {
            s.queue.activate();
        }
        if let Some(s) = &self.events {
            s.queue.activate();
        }
    }

    /// The process-wide telemetry (absent only in snapshots built by `wraith test`).
    pub fn shared(&self) -> Option<&Arc<Telemetry>> {
        self.shared.as_ref()
    }

    /// Accounts for one finished request: metrics, the status window, every sink.
    pub fn emit(&self, record: Box<AccessRecord>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let m = &shared.metrics;
        let route = record
            .route
            .as_ref()
            .and_then(|r| self.routes.get(r))
            .or(self.no_route.as_ref());
        if let Some(rm) = route {
            rm.observe(&m.requests, record.protocol, record.status, record.duration);
            if let Some(code) = record.error {
                rm.error(&m.request_errors, code);
            }
            if let Some(p) = &record.policy {
                rm.decision(&m.policy_decisions, p.effect, p.shadow);
            }
            if record.rate_limit.as_ref().is_some_and(|r| r.limited) {
                m.ratelimit_rejections
                    .get_or_create(&RouteLabel {
                        route: rm.name().to_string(),
                    })
                    .inc();
            }
        }
        if let Some(b) = &record.ban {
            m.bans
                .get_or_create(&OriginLabel {
                    origin: origin_label(&b.origin),
                })
                .inc();
        }
        if let Some(up) = &record.upstream {
            let handles = |ep: &http::uri::Authority| {
                self.endpoints
                    .get(up)
                    .and_then(|l| l.iter().find(|(n, _)| n == ep.as_str()))
                    .map(|(_, h)| h)
            };
            // Attempts retried elsewhere count on their own endpoints.
            for failed in &record.forward.retried {
                if let Some(h) = handles(&failed.endpoint) {
                    h.observe(Some(failed.time));
                    h.error(&m.upstream_errors, failed.error);
                }
            }
            if let Some(h) = record.forward.endpoint.as_ref().and_then(handles) {
                h.observe(record.forward.upstream_time);
                if let Some(
                    code @ ("upstream_unreachable" | "upstream_timeout" | "upstream_failed"),
                ) = record.error
                {
                    h.error(&m.upstream_errors, code);
                }
            }
        }

        let end = record.time + record.duration;
        let second = end.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let denied = record.denied();
        shared
            .window
            .record(second, record.status, record.duration, denied);
        if let Some(rm) = route.filter(|_| denied) {
            rm.denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if denied {
            let id = record.identity_name().map(Arc::from);
            shared.window.record_denial(second, record.client_ip, id);
        }

        let any = self.json.is_some() || self.combined.is_some() || self.sqlite.is_some();
        let event = self.events.as_ref().zip(record.security_event());
        if !any && event.is_none() {
            return;
        }
        let mut record = record;
        record.detach();
        let record: Arc<AccessRecord> = Arc::from(record);
        for s in [&self.json, &self.combined, &self.sqlite]
            .into_iter()
            .flatten()
        {
            s.push(record.clone());
        }
        if let Some((events, event)) = event {
            events.push(Event::Request { event, record });
        }
    }

    /// The metric handles of the listener with this name (none once a reload removed it).
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerMetrics>> {
        self.listeners.get(name)
    }

    /// Accounts for a TLS handshake: metrics always, a security event when it failed and the
    /// event can name the client. A QUIC peer whose address was not validated may be anyone:
    /// an off-path sender can put any source address on an Initial packet, with a ClientHello
    /// that fails, a CONNECTION_CLOSE, or nothing more (a timeout). Such failures are only
    /// counted, so nobody can fill the SIEM's feed with another's address. A client
    /// certificate refused is reported whatever the address: sending one takes the keys of
    /// the server's handshake flight, which only the address it went to receives.
    pub fn handshake(
        &self,
        listener: &Arc<str>,
        peer: SocketAddr,
        started: Instant,
        outcome: Result<(&'static str, &'static str), HandshakeFailure>,
        address: PeerAddress,
    ) {
        if self.shared.is_none() {
            return;
        }
        let (version, group, result) = match &outcome {
            Ok((v, g)) => (*v, *g, "ok"),
            Err(f) => ("unknown", "unknown", f.result()),
        };
        // A listener this snapshot no longer has (a reload removed it during the
        // handshake) has no series to count into.
        if let Some(l) = self.listeners.get(listener) {
            l.handshake(version, group, result, started.elapsed());
        }
        if let (Err(f), Some(events)) = (outcome, &self.events) {
            if address == PeerAddress::Unvalidated
                && !matches!(f, HandshakeFailure::ClientCertificate(_))
            {
                return;
            }
            let (auth, reason) = match f {
                HandshakeFailure::ClientCertificate(r) => (true, r),
                HandshakeFailure::Other(r) => (false, r),
                HandshakeFailure::Timeout => (false, "handshake timed out".into()),
            };
            events.push(Event::Handshake {
                time: SystemTime::now(),
                peer,
                listener: listener.clone(),
                auth,
                reason,
            });
        }
    }

    /// Accounts for a connection refused before any request because its address is banned
    /// (the accept-time check): the `wraith_bans_total{origin}` metric and a `banned` event
    /// without request fields. Requests refused by a ban are accounted for by their access
    /// record instead (`AccessRecord::ban`).
    pub fn banned_connection(
        &self,
        listener: &Arc<str>,
        peer: SocketAddr,
        origin: &str,
        scenario: Option<&str>,
    ) {
        if let Some(shared) = &self.shared {
            shared
                .metrics
                .bans
                .get_or_create(&OriginLabel {
                    origin: origin_label(origin),
                })
                .inc();
        }
        if let Some(events) = &self.events {
            events.push(Event::BannedConnection {
                time: SystemTime::now(),
                peer,
                listener: listener.clone(),
                origin: Arc::from(origin),
                scenario: scenario.map(Arc::from),
            });
        }
    }

    /// Records a reload attempt (metrics and a `config_reload` event).
    pub fn reload(&self, ok: bool, generation: u64, errors: &[String]) {
        if let Some(shared) = &self.shared {
            shared
                .metrics
                .reloads
                .get_or_create(&metrics::ResultLabel {
                    result: if ok { "ok" } else { "failed" },
                })
                .inc();
        }
        if let Some(events) = &self.events {
            events.push(Event::Reload {
                time: SystemTime::now(),
                ok,
                generation,
                errors: errors.to_vec(),
            });
        }
    }

    /// Per-route totals for `wraith status` / `wraith top`: (name, requests, 5xx, denied).
    pub fn route_totals(&self) -> Vec<(String, u64, u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out: Vec<_> = self
            .routes
            .values()
            .chain(self.no_route.iter())
            .map(|r| {
                (
                    r.name().to_string(),
                    r.total.load(Relaxed),
                    r.server_errors.load(Relaxed),
                    r.denied.load(Relaxed),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Every sink of this snapshot: (name, queued, accepted, written, dropped).
    pub fn sink_counts(&self) -> Vec<(&'static str, usize, u64, u64, u64)> {
        use sinks::SinkControl;
        let mut out = Vec::new();
        for s in [&self.json, &self.combined, &self.sqlite]
            .into_iter()
            .flatten()
        {
            let (q, a, w, d) = s.queue.counts();
            out.push((s.name, q, a, w, d));
        }
        if let Some(s) = &self.events {
            let (q, a, w, d) = s.queue.counts();
            out.push((s.name, q, a, w, d));
        }
        out
    }
}

/// What is known of a connection's source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerAddress {
    /// The client's: TCP's handshake, or QUIC's address validation (a Retry token coming
    /// back), proved that it receives what is sent there.
    Proven,
    /// A QUIC connection's, not validated: whoever sent the Initial packet may have put any
    /// source address on it.
    Unvalidated,
}

/// Why a TLS handshake failed.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// The client certificate was missing, untrusted, expired, revoked or malformed.
    ClientCertificate(String),
    /// Anything else.
    Other(String),
    Timeout,
}

impl HandshakeFailure {
    /// The `result` label.
    fn result(&self) -> &'static str {
        match self {
            HandshakeFailure::ClientCertificate(_) => "client_cert_rejected",
            HandshakeFailure::Other(_) => "failed",
            HandshakeFailure::Timeout => "timeout",
        }
    }
}

/// Reuses `previous` when its settings equal `key` (asking it to reopen its file), else starts
/// a new sink with the writer `make` builds, paused until `SnapshotTelemetry::activate`.
fn sink<T, W>(
    shared: &Telemetry,
    previous: Option<&Arc<Sink<T>>>,
    name: &'static str,
    key: String,
    capacity: usize,
    make: impl FnOnce() -> Result<W, String>,
) -> Result<Arc<Sink<T>>, String>
where
    T: Send + 'static,
    W: sinks::BatchWriter<T> + Send + 'static,
{
    if let Some(p) = previous.filter(|p| p.key == key) {
        p.queue.reopen();
        return Ok(p.clone());
    }
    let writer = make()?;
    spawn_sink(shared, name, key, capacity, writer)
}

/// Starts a sink with `writer`, paused until `SnapshotTelemetry::activate`.
fn spawn_sink<T, W>(
    shared: &Telemetry,
    name: &'static str,
    key: String,
    capacity: usize,
    writer: W,
) -> Result<Arc<Sink<T>>, String>
where
    T: Send + 'static,
    W: sinks::BatchWriter<T> + Send + 'static,
{
    let labels = SinkLabel { sink: name };
    let queue = Arc::new(Queue::new(
        capacity,
        shared.metrics.log_dropped.get_or_create_owned(&labels),
        shared.metrics.log_written.get_or_create_owned(&labels),
    ));
    shared.writers.spawn(name, key, queue, writer).map(Arc::new)
}

/// The SQLite sink for `config`: the one already writing its database if any configuration
/// still holds one (asked to reopen the file, its settings changed only by `activate`), else
/// a new one. Two writers on one database would each run their own retention.
fn sqlite_sink(
    shared: &Telemetry,
    config: &SqliteSinkConfig,
    formatting: &Formatting,
) -> Result<(Arc<AccessSink>, Arc<SqliteSettings>), String> {
    let mut live = shared.sqlite.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|l| l.sink.strong_count() > 0);
    let running = live
        .iter()
        .filter(|l| l.path == config.path)
        .find_map(|l| Some((l.sink.upgrade()?, l.settings.clone())));
    if let Some((sink, settings)) = running {
        sink.queue.reopen();
        return Ok((sink, settings));
    }
    let settings = SqliteSettings::new(config.clone(), formatting.clone());
    let writer = sqlite::SqliteWriter::following(settings.clone())?;
    let key = config.path.display().to_string();
    let sink = spawn_sink(shared, "sqlite", key, config.queue, writer)?;
    live.push(LiveSqlite {
        path: config.path.clone(),
        sink: Arc::downgrade(&sink),
        settings: settings.clone(),
    });
    Ok((sink, settings))
}

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// For tests that change process-wide state (the umask, a resource limit).
#[cfg(test)]
pub(crate) mod alone {
    /// Marks the child process a test runs itself in.
    const CHILD: &str = "WRAITH_TEST_ALONE_CHILD";

    /// In the test process: runs test `name` (its full path) alone in a child process,
    /// asserts that it passed, and returns false. In that child: returns true (run the body).
    pub fn in_child(name: &str) -> bool {
        if std::env::var_os(CHILD).is_some() {
            return true;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::access_log::{BanRecord, Effect, PolicyRecord, RateLimitRecord};
    use super::*;
    use crate::config::{load_str, LoadOptions};
    use crate::telemetry::metrics::PolicyLabels;

    /// rustls logs at error unless the filter names it: a client's renegotiation attempts
    /// (a rustls warning each) cannot fill the server log.
    #[test]
    fn rustls_logs_errors_only_unless_the_filter_names_it() {
        let quiet = log_filter("info").unwrap().to_string();
        assert!(quiet.contains("rustls=error"), "{quiet}");
        let chosen = log_filter("info,rustls=debug").unwrap().to_string();
        assert!(
            chosen.contains("rustls=debug") && !chosen.contains("rustls=error"),
            "{chosen}"
        );
        assert!(log_filter("info,[").is_none());
        // Another crate's name containing "rustls" is not rustls.
        let other = log_filter("info,tokio_rustls=debug").unwrap().to_string();
        assert!(other.contains("rustls=error"), "{other}");
        let module = log_filter("info,rustls::server=trace").unwrap().to_string();
        assert!(!module.contains("rustls=error"), "{module}");
        // Nothing asked for: nothing added.
        let off = log_filter("off").unwrap().to_string();
        assert!(!off.contains("rustls"), "{off}");
    }

    /// What the policy, rate-limit and ban stages write into the record reaches the metrics
    /// and the security-events stream without anything else to wire.
    #[test]
    fn stage_fields_reach_metrics_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
                    [[route]]\nname = \"api\"\nrespond = { status = 200 }\n\
                    [log.events]\npath = \"events.json\"\n[log.json]\npath = \"access.json\"\n";
        let config = load_str(
            &dir.path().join("wraith.toml"),
            text,
            LoadOptions::default(),
        )
        .unwrap();
        let shared = Arc::new(Telemetry::default());
        let t = SnapshotTelemetry::build(&shared, &config, None).unwrap();
        t.activate();
        let base = || AccessRecord {
            time: SystemTime::now(),
            client_ip: "198.51.100.7".parse().unwrap(),
            route: Some("api".into()),
            status: 403,
            ..AccessRecord::default()
        };
        let policy = |effect, shadow| PolicyRecord {
            effect,
            policies: vec!["p".into()],
            reason: Some("because".into()),
            shadow,
        };
        t.emit(Box::new(AccessRecord {
            policy: Some(policy(Effect::Deny, false)),
            ..base()
        }));
        t.emit(Box::new(AccessRecord {
            policy: Some(policy(Effect::Deny, true)),
            status: 200,
            ..base()
        }));
        t.emit(Box::new(AccessRecord {
            rate_limit: Some(RateLimitRecord {
                limited: true,
                shadow: false,
                limiter: "per-ip".into(),
            }),
            status: 429,
            ..base()
        }));
        t.emit(Box::new(AccessRecord {
            ban: Some(BanRecord {
                origin: "crowdsec".into(),
                scenario: Some("crowdsecurity/http-probing".into()),
            }),
            ..base()
        }));
        t.emit(Box::new(AccessRecord {
            policy: Some(policy(Effect::Allow, false)),
            status: 200,
            ..base()
        }));
        t.banned_connection(
            &Arc::from("http"),
            "203.0.113.9:4000".parse().unwrap(),
            "wazuh:wraith-ban",
            None,
        );
        shared
            .writers
            .shutdown(Instant::now() + std::time::Duration::from_secs(10));

        let events: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join("events.json"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        let names: Vec<&str> = events
            .iter()
            .map(|e| e["wraith"]["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "policy_denied",
                "policy_shadow_denied",
                "rate_limited",
                "banned",
                "banned"
            ]
        );
        assert_eq!(events[0]["wraith"]["reason"], "because");
        assert_eq!(events[2]["wraith"]["rate_limiter"], "per-ip");
        assert_eq!(
            events[3]["wraith"]["scenario"],
            "crowdsecurity/http-probing"
        );
        assert_eq!(events[4]["srcip"], "203.0.113.9");
        assert_eq!(events[4]["wraith"]["origin"], "wazuh:wraith-ban");

        let m = &shared.metrics;
        let policy = |effect| {
            m.policy_decisions
                .get(&PolicyLabels {
                    route: "api".into(),
                    effect,
                })
                .map_or(0, |c| c.get())
        };
        assert_eq!(
            (policy("allow"), policy("deny"), policy("shadow_deny")),
            (1, 1, 1)
        );
        let route = RouteLabel {
            route: "api".into(),
        };
        assert_eq!(m.ratelimit_rejections.get(&route).map(|c| c.get()), Some(1));
        let bans = |origin| m.bans.get(&OriginLabel { origin }).map_or(0, |c| c.get());
        // One Wazuh active response's origin counts as "wazuh" (a bounded label set).
        assert_eq!((bans("crowdsec"), bans("wazuh")), (1, 1));
        // Denials (not the shadow one, not the allowed one) feed the "top denied" list.
        let s = shared
            .window
            .summary(unix_now(), std::time::Duration::from_secs(60));
        assert_eq!(s.denied, 3);
        assert_eq!(s.top_denied_ips, vec![("198.51.100.7".to_string(), 3)]);
        // Every record is in the access log too.
        let lines = std::fs::read_to_string(dir.path().join("access.json")).unwrap();
        assert_eq!(lines.lines().count(), 5);
    }
}
