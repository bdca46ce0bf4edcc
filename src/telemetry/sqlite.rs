//! The SQLite sink: table `access_log` (typed columns, indexes on time, status, client ip,
//! identity and route) in a WAL database, written by one thread in batched transactions, with
//! retention by age and row count. `wraith logs` reads the same file read-only.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rusqlite::{params, Connection};

use super::access_log::AccessRecord;
use super::format::{lossy, sqlite_time, write_ip, CachedTime, Formatting, TimeStyle};
use super::sinks::BatchWriter;
use crate::config::SqliteSinkConfig;

/// The schema (created if missing; the version is in `PRAGMA user_version`).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS access_log (
    id           INTEGER PRIMARY KEY,
    time         TEXT    NOT NULL,   -- request start, UTC, 'YYYY-MM-DD HH:MM:SS.sss'
    request_id   TEXT    NOT NULL,
    client_ip    TEXT    NOT NULL,
    client_port  INTEGER,
    listener     TEXT    NOT NULL,
    protocol     TEXT    NOT NULL,   -- h1, h1.0, h2, h3
    tls_version  TEXT,
    tls_group    TEXT,
    identity     TEXT,               -- SPIFFE ID, else CN, else fingerprint
    spiffe_id    TEXT,
    cn           TEXT,
    fingerprint  TEXT,
    method       TEXT    NOT NULL,
    host         TEXT,
    path         TEXT    NOT NULL,
    query        TEXT,
    status       INTEGER NOT NULL,
    bytes_in     INTEGER NOT NULL,
    bytes_out    INTEGER NOT NULL,
    duration_ms  REAL    NOT NULL,
    upstream_ms  REAL,
    route        TEXT,
    upstream     TEXT,
    endpoint     TEXT,
    attempts     INTEGER NOT NULL,
    decision     TEXT,               -- allow, deny
    policies     TEXT,               -- comma-separated policy ids
    reason       TEXT,
    shadow       INTEGER,            -- 1 when the policy runs in shadow mode
    rate_limit   TEXT,               -- passed, limited
    rate_limiter TEXT,
    ban_origin   TEXT,
    ban_scenario TEXT,
    user_agent   TEXT,
    referer      TEXT,
    error        TEXT,
    aborted      INTEGER NOT NULL    -- 1 when the client went away early
);
CREATE INDEX IF NOT EXISTS access_log_time      ON access_log(time);
CREATE INDEX IF NOT EXISTS access_log_status    ON access_log(status);
CREATE INDEX IF NOT EXISTS access_log_client_ip ON access_log(client_ip);
CREATE INDEX IF NOT EXISTS access_log_identity  ON access_log(identity) WHERE identity IS NOT NULL;
CREATE INDEX IF NOT EXISTS access_log_route     ON access_log(route);
PRAGMA user_version = 1;
"#;

/// The columns `insert` binds, in order.
const COLUMNS: &str = "time, request_id, client_ip, client_port, listener, protocol, tls_version, \
    tls_group, identity, spiffe_id, cn, fingerprint, method, host, path, query, status, bytes_in, \
    bytes_out, duration_ms, upstream_ms, route, upstream, endpoint, attempts, decision, policies, \
    reason, shadow, rate_limit, rate_limiter, ban_origin, ban_scenario, user_agent, referer, \
    error, aborted";
const COLUMN_COUNT: usize = 37;
/// Rows per INSERT statement. One statement per row spends most of its time starting and
/// finishing the statement (`sqlite3VdbeHalt`, cursor set-up); 32 rows per statement
/// amortize that, and stay far below SQLite's limit of 32766 parameters.
const ROWS_PER_INSERT: usize = 32;

/// `INSERT INTO access_log (...) VALUES (?, ...), ...` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    // OR FAIL: a failing row does not undo the rows before it, so SQLite needs no statement
    // journal for a multi-row INSERT (with the default ABORT, every such statement copies the
    // pages it changes into a temporary file first). No row can fail a constraint anyway: the
    // NOT NULL columns are always bound.
    let mut sql = format!("INSERT OR FAIL INTO access_log ({COLUMNS}) VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..COLUMN_COUNT {
            if c > 0 {
                sql.push(',');
            }
            sql.push('?');
        }
        sql.push(')');
    }
    sql
}

/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Opens (creating if needed) the database for writing, in WAL mode with the schema.
pub fn open_for_writing(path: &Path) -> Result<Connection, String> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let what = |e: rusqlite::Error| format!("SQLite access log {}: {e}", path.display());
    let created = !path.exists();
    let conn = Connection::open(path).map_err(what)?;
    if created {
        // Client addresses and identities: not for every local user (SQLite gives the WAL
        // and shared-memory files the database's mode).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    }
    // Readers (`wraith logs`) never block the writer in WAL mode; NORMAL sync is durable
    // against process crashes, which is what a log needs.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(what)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(what)?;
    conn.busy_timeout(Duration::from_millis(200))
        .map_err(what)?;
    conn.execute_batch(SCHEMA).map_err(what)?;
    Ok(conn)
}

/// Opens the database for reading only: a typo in `wraith logs` can never write.
pub fn open_read_only(path: &Path) -> Result<Connection, String> {
    use rusqlite::OpenFlags;
    if !path.exists() {
        return Err(format!(
            "{} does not exist (is [log.sqlite] configured and has wraith served a request?)",
            path.display()
        ));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    conn.pragma_update(None, "query_only", "ON")
        .map_err(|e| format!("{}: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(2))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(conn)
}

/// The writer thread's side of the sink.
pub struct SqliteWriter {
    conn: Connection,
    config: SqliteSinkConfig,
    formatting: Formatting,
    last_retention: Option<Instant>,
    clock: CachedTime,
    /// The INSERT statements for `ROWS_PER_INSERT` rows and for one row.
    insert_many: String,
    insert_one: String,
}

/// What binding a row needs besides the statement.
struct Row<'a> {
    formatting: &'a Formatting,
    clock: &'a mut CachedTime,
    scratch: Scratch,
}

impl Row<'_> {
    /// Binds one record's values to parameters `base + 1 ..= base + COLUMN_COUNT`; only the
    /// values that are present are bound.
    fn bind(
        &mut self,
        stmt: &mut rusqlite::Statement<'_>,
        base: usize,
        r: &AccessRecord,
    ) -> rusqlite::Result<()> {
        let scratch = &mut self.scratch;
        macro_rules! bind {
            ($i:expr, $v:expr) => {
                stmt.raw_bind_parameter(base + $i, $v)?
            };
        }
        macro_rules! opt {
            ($i:expr, $v:expr) => {
                if let Some(v) = $v {
                    stmt.raw_bind_parameter(base + $i, v)?;
                }
            };
        }
        scratch.ip.clear();
        write_ip(&mut scratch.ip, r.client_ip);
        let id = r.identity.as_deref();
        bind!(1, self.clock.format(r.time));
        bind!(2, lossy(r.request_id.as_bytes()));
        bind!(3, std::str::from_utf8(&scratch.ip).unwrap_or_default());
        opt!(4, r.client_port);
        bind!(5, &*r.listener);
        bind!(6, r.protocol);
        opt!(7, r.tls_version);
        opt!(8, r.tls_group);
        opt!(9, r.identity_name());
        opt!(10, id.and_then(|i| i.spiffe_id.as_deref()));
        opt!(11, id.and_then(|i| i.common_name.as_deref()));
        opt!(12, id.map(|i| i.fingerprint.as_str()));
        bind!(13, r.method.as_str());
        opt!(14, r.host());
        bind!(15, r.uri.path());
        opt!(16, self.formatting.query(r.uri.query()));
        bind!(17, r.status);
        bind!(18, r.bytes_in as i64);
        bind!(19, r.bytes_out as i64);
        bind!(20, r.duration.as_micros() as f64 / 1000.0);
        opt!(
            21,
            r.forward
                .upstream_time
                .map(|t| t.as_micros() as f64 / 1000.0)
        );
        opt!(22, r.route.as_deref());
        opt!(23, r.upstream.as_deref());
        opt!(24, r.forward.endpoint.as_deref());
        bind!(25, r.forward.attempts);
        if let Some(p) = &r.policy {
            scratch.policies.clear();
            for (i, id) in p.policies.iter().enumerate() {
                if i > 0 {
                    scratch.policies.push(',');
                }
                scratch.policies.push_str(id);
            }
            bind!(26, p.effect.as_str());
            bind!(27, scratch.policies.as_str());
            opt!(28, p.reason.as_deref());
            bind!(29, p.shadow);
        }
        if let Some(l) = &r.rate_limit {
            bind!(30, if l.limited { "limited" } else { "passed" });
            bind!(31, &*l.limiter);
        }
        if let Some(b) = &r.ban {
            bind!(32, &*b.origin);
            opt!(33, b.scenario.as_deref());
        }
        opt!(34, r.user_agent.as_ref().map(|v| lossy(v.as_bytes())));
        opt!(35, r.referer.as_ref().map(|v| lossy(v.as_bytes())));
        opt!(36, r.error);
        bind!(37, r.aborted);
        Ok(())
    }
}

/// Buffers reused for every row.
#[derive(Default)]
struct Scratch {
    ip: Vec<u8>,
    policies: String,
}

impl SqliteWriter {
    pub fn new(config: SqliteSinkConfig, formatting: Formatting) -> Result<SqliteWriter, String> {
        let conn = open_for_writing(&config.path)?;
        Ok(SqliteWriter {
            conn,
            config,
            formatting,
            last_retention: None,
            clock: CachedTime::new(TimeStyle::Sqlite),
            insert_many: insert_sql(ROWS_PER_INSERT),
            insert_one: insert_sql(1),
        })
    }

    fn insert(&mut self, items: &[Arc<AccessRecord>]) -> rusqlite::Result<()> {
        let SqliteWriter {
            conn,
            formatting,
            clock,
            insert_many,
            insert_one,
            ..
        } = self;
        let mut row = Row {
            formatting,
            clock,
            scratch: Scratch::default(),
        };
        let tx = conn.transaction()?;
        {
            let mut chunks = items.chunks_exact(ROWS_PER_INSERT);
            if chunks.len() > 0 {
                let mut stmt = tx.prepare_cached(insert_many)?;
                for chunk in chunks.by_ref() {
                    // Columns left unbound stay NULL only after `clear_bindings`: a typical
                    // row leaves half of them empty, and each bind is a call into SQLite.
                    stmt.clear_bindings();
                    for (i, r) in chunk.iter().enumerate() {
                        row.bind(&mut stmt, i * COLUMN_COUNT, r)?;
                    }
                    stmt.raw_execute()?;
                }
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let mut stmt = tx.prepare_cached(insert_one)?;
                for r in rest {
                    stmt.clear_bindings();
                    row.bind(&mut stmt, 0, r)?;
                    stmt.raw_execute()?;
                }
            }
        }
        tx.commit()
    }

    /// Deletes rows past the configured age and count.
    fn retention(&mut self) -> rusqlite::Result<usize> {
        let mut deleted = 0;
        if let Some(age) = self.config.max_age {
            let cutoff = SystemTime::now()
                .checked_sub(age)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            deleted += self.conn.execute(
                "DELETE FROM access_log WHERE time < ?1",
                params![sqlite_time(cutoff)],
            )?;
        }
        if let Some(max) = self.config.max_rows {
            deleted += self.conn.execute(
                "DELETE FROM access_log WHERE id <= (SELECT max(id) FROM access_log) - ?1",
                params![max as i64],
            )?;
        }
        Ok(deleted)
    }
}

impl BatchWriter<Arc<AccessRecord>> for SqliteWriter {
    fn write(&mut self, items: &mut Vec<Arc<AccessRecord>>) -> Result<(), String> {
        let batch = self.config.batch.max(1);
        while !items.is_empty() {
            let n = items.len().min(batch);
            self.insert(&items[..n])
                .map_err(|e| format!("cannot insert into {}: {e}", self.config.path.display()))?;
            items.drain(..n);
        }
        Ok(())
    }

    fn reopen(&mut self) -> Result<(), String> {
        // A database is not rotated by renaming; reopening picks up a replaced file.
        self.conn = open_for_writing(&self.config.path)?;
        Ok(())
    }

    fn tick(&mut self) {
        if self.config.max_age.is_none() && self.config.max_rows.is_none() {
            return;
        }
        if self
            .last_retention
            .is_some_and(|t| t.elapsed() < RETENTION_EVERY)
        {
            return;
        }
        self.last_retention = Some(Instant::now());
        match self.retention() {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "access log retention"),
            Err(e) => tracing::warn!(error = %e, "access log retention failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogConfig;
    use crate::telemetry::format::{combined_line, json_line, CombinedOptions};

    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn sample() -> Arc<AccessRecord> {
        Arc::new(AccessRecord {
            time: SystemTime::now(),
            request_id: http::HeaderValue::from_static("0123456789abcdef0123456789abcdef"),
            client_ip: "198.51.100.7".parse().unwrap(),
            client_port: Some(51234),
            listener: "https".into(),
            protocol: "h1",
            method: http::Method::GET,
            uri: "/small".parse().unwrap(),
            host_header: Some(http::HeaderValue::from_static("127.0.0.1:8085")),
            user_agent: Some(http::HeaderValue::from_static("wrk")),
            status: 200,
            bytes_out: 13,
            duration: Duration::from_micros(120),
            route: Some("all".into()),
            upstream: Some("up".into()),
            forward: crate::upstream::forwarder::ForwardOutcome {
                endpoint: Some("127.0.0.1:18080".into()),
                upstream_time: Some(Duration::from_micros(80)),
                attempts: 1,
            },
            ..AccessRecord::default()
        })
    }

    /// A sink writing `a.db` in `dir`, in batches of up to 1024 rows, with no retention.
    fn sink_config(dir: &Path) -> SqliteSinkConfig {
        SqliteSinkConfig {
            path: dir.join("a.db"),
            queue: 1,
            batch: 1024,
            max_age: None,
            max_rows: None,
        }
    }

    #[test]
    fn batches_of_any_size_are_written_row_for_row() {
        // 70 = two 32-row statements and 6 single-row ones; every row different.
        let dir = tempfile::tempdir().unwrap();
        let config = sink_config(dir.path());
        let f = Formatting::new(&LogConfig::default());
        let mut w = SqliteWriter::new(config.clone(), f).unwrap();
        let mut records: Vec<_> = (0..70u16)
            .map(|i| {
                let mut r = (*sample()).clone();
                r.status = 200 + i;
                r.client_ip = if i % 2 == 0 {
                    std::net::IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8])
                } else {
                    format!("2001:db8::{i:x}").parse().unwrap()
                };
                r.client_port = (i % 3 != 0).then_some(i);
                r.route = (i % 5 != 0).then(|| format!("route-{i}").into());
                Arc::new(r)
            })
            .collect();
        let expected: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    i64::from(r.status),
                    r.client_ip.to_string(),
                    r.client_port.map(i64::from),
                    r.route.as_deref().map(str::to_string),
                )
            })
            .collect();
        w.write(&mut records).unwrap();
        assert!(records.is_empty());
        let db = open_read_only(&config.path).unwrap();
        let mut stmt = db
            .prepare("SELECT status, client_ip, client_port, route, method, path FROM access_log ORDER BY id")
            .unwrap();
        let rows: Vec<_> = stmt
            .query_map([], |row| {
                assert_eq!(row.get::<_, String>(4)?, "GET");
                assert_eq!(row.get::<_, String>(5)?, "/small");
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, expected);
    }

    /// Writer-side CPU per record of each sink. A measurement, not a check: run it with
    /// `cargo test --release --lib writer_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement; meaningful only in a release build"]
    fn writer_cost() {
        let dir = tempfile::tempdir().unwrap();
        let config = sink_config(dir.path());
        let f = Formatting::new(&LogConfig::default());
        let mut w = SqliteWriter::new(config, f.clone()).unwrap();
        let n = 100_000;
        let records: Vec<_> = (0..n).map(|_| sample()).collect();
        let t = thread_cpu();
        for chunk in records.chunks(3000) {
            let mut v = chunk.to_vec();
            w.write(&mut v).unwrap();
        }
        let sqlite = (thread_cpu() - t).as_nanos() as f64 / n as f64 / 1000.0;
        let mut buf = Vec::with_capacity(1 << 20);
        let mut rfc = CachedTime::new(TimeStyle::Rfc3339);
        let mut http = CachedTime::new(TimeStyle::Http);
        let t = thread_cpu();
        for r in &records {
            json_line(r, &f, &mut rfc, &mut buf);
            if buf.len() > 1 << 19 {
                buf.clear();
            }
        }
        let json = (thread_cpu() - t).as_nanos() as f64 / n as f64 / 1000.0;
        let t = thread_cpu();
        for r in &records {
            combined_line(r, &f, CombinedOptions { vhost: true }, &mut http, &mut buf);
            if buf.len() > 1 << 19 {
                buf.clear();
            }
        }
        let combined = (thread_cpu() - t).as_nanos() as f64 / n as f64 / 1000.0;
        eprintln!("writer CPU per record: sqlite {sqlite:.2} µs, json {json:.2} µs, combined {combined:.2} µs");
    }
}
