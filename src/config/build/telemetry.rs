//! `[log]` and `[metrics]`: where access records go and where metrics are served.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::Builder;
use crate::config::raw::{RawCombinedSink, RawFileSink, RawLog, RawMetrics, RawSqliteSink};

/// Query parameters redacted by default (`log.redact_params`).
pub const DEFAULT_REDACT_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "key",
    "code",
    "signature",
    "sig",
    "auth",
];

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// What the query string looks like in every sink.
    pub query: QueryLogging,
    /// Parameter names (case-insensitive) whose values `query = "redact"` replaces.
    pub redact_params: Vec<String>,
    /// JSON lines access log.
    pub json: Option<FileSinkConfig>,
    /// nginx `combined` access log.
    pub combined: Option<CombinedSinkConfig>,
    /// SQLite access log.
    pub sqlite: Option<SqliteSinkConfig>,
    /// JSON lines security events (Wazuh).
    pub events: Option<FileSinkConfig>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            query: QueryLogging::Redact,
            redact_params: DEFAULT_REDACT_PARAMS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            json: None,
            combined: None,
            sqlite: None,
            events: None,
        }
    }
}

/// How query strings are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryLogging {
    /// As sent.
    Full,
    /// Values of `redact_params` replaced by `REDACTED`.
    Redact,
    /// Not logged at all.
    Omit,
}

/// A sink that writes lines to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSinkConfig {
    /// The file, appended to (created 0640 if missing).
    pub path: PathBuf,
    /// Records waiting for the writer before new ones are dropped.
    pub queue: usize,
}

/// `[log.combined]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CombinedSinkConfig {
    /// The file and queue.
    pub file: FileSinkConfig,
    /// Prefix each line with the virtual host (nginx `$host`), as CrowdSec's parser accepts.
    pub vhost: bool,
}

/// `[log.sqlite]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteSinkConfig {
    /// The database file (WAL mode).
    pub path: PathBuf,
    /// Records waiting for the writer before new ones are dropped.
    pub queue: usize,
    /// Most rows inserted per transaction.
    pub batch: usize,
    /// Rows older than this are deleted.
    pub max_age: Option<Duration>,
    /// At most this many rows are kept (oldest deleted first).
    pub max_rows: Option<u64>,
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address of the plain-HTTP metrics listener; `None`: metrics only via the admin socket.
    pub address: Option<SocketAddr>,
    /// Path the metrics listener answers on.
    pub path: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: None,
            path: "/metrics".into(),
        }
    }
}

const DEFAULT_QUEUE: usize = 16_384;

pub(super) fn build_log(b: &mut Builder<'_>, raw: RawLog) -> LogConfig {
    let mut out = LogConfig::default();
    if let Some(q) = &raw.query {
        out.query = match q.get_ref().as_str() {
            "full" => QueryLogging::Full,
            "redact" => QueryLogging::Redact,
            "omit" => QueryLogging::Omit,
            other => {
                b.err(
                    Some(q.span()),
                    "log.query",
                    format!("unknown query logging {other:?} (expected \"full\", \"redact\" or \"omit\")"),
                );
                QueryLogging::Redact
            }
        };
    }
    if let Some(params) = &raw.redact_params {
        out.redact_params = params
            .iter()
            .map(|p| p.get_ref().to_ascii_lowercase())
            .collect();
    }
    // Where each sink's path is written, for the error below.
    let span = |p: &crate::config::raw::Str| p.span();
    let path_spans = [
        raw.json.as_ref().map(|s| span(&s.get_ref().path)),
        raw.combined.as_ref().map(|s| span(&s.get_ref().path)),
        raw.sqlite.as_ref().map(|s| span(&s.get_ref().path)),
        raw.events.as_ref().map(|s| span(&s.get_ref().path)),
    ];
    out.json = raw.json.map(|s| file_sink(b, "log.json", s.into_inner()));
    out.events = raw
        .events
        .map(|s| file_sink(b, "log.events", s.into_inner()));
    out.combined = raw.combined.map(|s| {
        let RawCombinedSink { path, queue, vhost } = s.into_inner();
        CombinedSinkConfig {
            file: file_sink(b, "log.combined", RawFileSink { path, queue }),
            vhost: vhost.unwrap_or(false),
        }
    });
    out.sqlite = raw.sqlite.map(|s| sqlite_sink(b, s.into_inner()));

    // Two sinks writing the same file would interleave two formats.
    let [json_at, combined_at, sqlite_at, events_at] = path_spans;
    let keys = [
        "log.json.path",
        "log.combined.path",
        "log.sqlite.path",
        "log.events.path",
    ];
    for (key, at) in keys
        .into_iter()
        .zip([&json_at, &combined_at, &sqlite_at, &events_at])
    {
        if let Some(at) = at {
            b.remember(key, at.clone());
        }
    }
    let mut paths: Vec<(&str, &PathBuf, Option<std::ops::Range<usize>>)> = Vec::new();
    if let Some(s) = &out.json {
        paths.push(("log.json", &s.path, json_at));
    }
    if let Some(s) = &out.combined {
        paths.push(("log.combined", &s.file.path, combined_at));
    }
    if let Some(s) = &out.sqlite {
        paths.push(("log.sqlite", &s.path, sqlite_at));
    }
    if let Some(s) = &out.events {
        paths.push(("log.events", &s.path, events_at));
    }
    // Compared as the files they name: `a.log`, `./a.log` and `logs/../a.log` are one.
    let files: Vec<PathBuf> = paths.iter().map(|(_, p, _)| same_file_key(p)).collect();
    for (i, (key, path, at)) in paths.iter().enumerate() {
        if let Some(j) = files[..i].iter().position(|f| *f == files[i]) {
            let msg = format!("{} is also the path of {}", path.display(), paths[j].0);
            b.err(at.clone(), format!("{key}.path"), msg);
        }
    }
    out
}

/// What a path names, for comparing two of them: its directory resolved (symlinks too) when
/// it exists, else the path with `.` and `..` worked out as written.
fn same_file_key(path: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut lexical = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !lexical.pop() {
                    lexical.push("..");
                }
            }
            other => lexical.push(other),
        }
    }
    match (lexical.parent(), lexical.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            };
            match std::fs::canonicalize(dir) {
                Ok(real) => real.join(name),
                Err(_) => lexical,
            }
        }
        _ => lexical,
    }
}

fn queue(b: &mut Builder<'_>, v: &Option<Spanned<i64>>, key: &str) -> usize {
    b.int(v, key, 1, 10_000_000)
        .map_or(DEFAULT_QUEUE, |n| n as usize)
}

fn file_sink(b: &mut Builder<'_>, key: &str, raw: RawFileSink) -> FileSinkConfig {
    FileSinkConfig {
        path: sink_path(b, &raw.path, key),
        queue: queue(b, &raw.queue, &format!("{key}.queue")),
    }
}

fn sink_path(b: &mut Builder<'_>, path: &Spanned<String>, key: &str) -> PathBuf {
    if path.get_ref().is_empty() {
        b.err(Some(path.span()), format!("{key}.path"), "empty path");
    }
    b.path(path.get_ref())
}

fn sqlite_sink(b: &mut Builder<'_>, raw: RawSqliteSink) -> SqliteSinkConfig {
    let max_age = raw
        .max_age
        .as_ref()
        .map(|_| b.duration(&raw.max_age, "log.sqlite.max_age", Duration::ZERO))
        .filter(|d| !d.is_zero());
    SqliteSinkConfig {
        path: sink_path(b, &raw.path, "log.sqlite"),
        queue: queue(b, &raw.queue, "log.sqlite.queue"),
        batch: b
            .int(&raw.batch, "log.sqlite.batch", 1, 100_000)
            .map_or(1024, |n| n as usize),
        max_age,
        max_rows: b
            .int(&raw.max_rows, "log.sqlite.max_rows", 1, i64::MAX)
            .map(|n| n as u64),
    }
}

pub(super) fn build_metrics(
    b: &mut Builder<'_>,
    raw: RawMetrics,
    listeners: &[crate::config::ListenerConfig],
) -> MetricsConfig {
    let mut out = MetricsConfig::default();
    if let Some(a) = &raw.address {
        match a.get_ref().parse::<SocketAddr>() {
            Ok(addr) => {
                // The same check as between listeners: one TCP port, one server.
                let clash = listeners.iter().find(|l| {
                    let other = l.address;
                    addr.port() != 0
                        && other.port() == addr.port()
                        && (other.ip() == addr.ip()
                            || other.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                });
                if let Some(l) = clash {
                    b.err(
                        Some(a.span()),
                        "metrics.address",
                        format!(
                            "address {addr} clashes with listener {:?} on {}",
                            l.name, l.address
                        ),
                    );
                }
                out.address = Some(addr);
            }
            Err(_) => b.err(
                Some(a.span()),
                "metrics.address",
                format!(
                    "invalid socket address {:?} (expected e.g. \"127.0.0.1:9090\")",
                    a.get_ref()
                ),
            ),
        }
    }
    if let Some(p) = &raw.path {
        if !p.get_ref().starts_with('/') {
            b.err(
                Some(p.span()),
                "metrics.path",
                format!("path {:?} must start with '/'", p.get_ref()),
            );
        } else {
            out.path = p.get_ref().clone();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::{load_str, LoadOptions};
    use std::path::Path;

    const BASE: &str = "[[listener]]\nname='l'\naddress='127.0.0.1:0'\nprotocol='http'\n";

    #[test]
    fn two_sinks_on_one_file_are_refused_however_the_path_is_spelt() {
        for (a, b) in [
            ("a.log", "a.log"),
            ("a.log", "./a.log"),
            ("a.log", "logs/../a.log"),
        ] {
            let text = format!("{BASE}[log.json]\npath = '{a}'\n[log.combined]\npath = '{b}'\n");
            let err = load_str(Path::new("t.toml"), &text, LoadOptions::default())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("is also the path of log.json"),
                "{a} {b}: {err}"
            );
        }
        let text = format!("{BASE}[log.json]\npath = 'a.log'\n[log.combined]\npath = 'b.log'\n");
        assert!(load_str(Path::new("t.toml"), &text, LoadOptions::default()).is_ok());
    }

    #[test]
    fn the_metrics_listener_may_not_take_a_listeners_port() {
        let base = BASE.replace("127.0.0.1:0", "127.0.0.1:8080");
        for address in ["127.0.0.1:8080", "0.0.0.0:8080"] {
            let text = format!("{base}[metrics]\naddress = '{address}'\n");
            let err = load_str(Path::new("t.toml"), &text, LoadOptions::default())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains("clashes with listener \"l\""), "{err}");
            assert!(err.contains("t.toml:6:"), "{err}");
        }
        let text = format!("{base}[metrics]\naddress = '127.0.0.1:9090'\n");
        assert!(load_str(Path::new("t.toml"), &text, LoadOptions::default()).is_ok());
    }
}
