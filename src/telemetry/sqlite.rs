//! The SQLite sink: table `access_log` (typed columns, indexes on time, status, client ip,
//! identity and route) in a WAL database, written by one thread in batched transactions, with
//! retention by age and row count. `wraith logs` reads the same file read-only.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use std::ffi::{c_int, c_uint};

use rusqlite::{ffi, params, Connection};

use super::access_log::AccessRecord;
use super::format::{lossy, sqlite_time, text, write_ip, CachedTime, Formatting, TimeStyle};
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
    rate_limit   TEXT,               -- passed, limited, shadow_limited
    rate_limiter TEXT,
    ban_origin   TEXT,
    ban_scenario TEXT,
    user_agent   TEXT,
    referer      TEXT,
    error        TEXT,
    aborted      INTEGER NOT NULL,   -- 1 when the client went away early
    grpc_status  INTEGER             -- the gRPC status the response ended with
);
CREATE INDEX IF NOT EXISTS access_log_time      ON access_log(time);
CREATE INDEX IF NOT EXISTS access_log_status    ON access_log(status);
CREATE INDEX IF NOT EXISTS access_log_client_ip ON access_log(client_ip);
CREATE INDEX IF NOT EXISTS access_log_identity  ON access_log(identity) WHERE identity IS NOT NULL;
CREATE INDEX IF NOT EXISTS access_log_route     ON access_log(route);
"#;

/// The schema's version, in `PRAGMA user_version`. Version 1 had no `grpc_status` column:
/// `migrate` adds it to a database version 1 made.
const SCHEMA_VERSION: i64 = 2;

/// The columns `insert` binds, in order.
const COLUMNS: &str = "time, request_id, client_ip, client_port, listener, protocol, tls_version, \
    tls_group, identity, spiffe_id, cn, fingerprint, method, host, path, query, status, bytes_in, \
    bytes_out, duration_ms, upstream_ms, route, upstream, endpoint, attempts, decision, policies, \
    reason, shadow, rate_limit, rate_limiter, ban_origin, ban_scenario, user_agent, referer, \
    error, aborted, grpc_status";
const COLUMN_COUNT: usize = 38;
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
/// Most rows one retention step deletes (one transaction, some tens of milliseconds): the
/// writer inserts what is waiting between two steps. One DELETE of everything due held the
/// writer for seconds (360,000 rows: 1.8 s) and grew the WAL by all it deleted.
const RETENTION_STEP: i64 = 10_000;
/// What a checkpoint leaves of the WAL file (`PRAGMA journal_size_limit`): without it the
/// file keeps the largest size it ever reached.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Opens (creating if needed) the database for writing, in WAL mode with the schema.
pub fn open_for_writing(path: &Path) -> Result<Connection, String> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let what = |e: rusqlite::Error| format!("SQLite access log {}: {e}", path.display());
    // Client addresses and identities: not for every local user. The file is made 0640 (less
    // if the umask says so) before SQLite opens it: created by SQLite it would have the
    // umask's mode (0644 typically) until a chmod, and another local user could open it in
    // that window and keep the descriptor. SQLite creates the -wal and -shm files with the
    // database file's mode (its unix VFS takes the mode from the database and fchmods a new
    // file to exactly that), so they are 0640 too.
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
        // SQLite would wait on a FIFO for ever.
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                return Err(format!(
                    "{} is not a database file ({})",
                    path.display(),
                    crate::files::kind(&m)
                ))
            }
            _ => {}
        }
    }
    let conn = Connection::open(path).map_err(what)?;
    // Readers (`wraith logs`) never block the writer in WAL mode; NORMAL sync is durable
    // against process crashes, which is what a log needs.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(what)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(what)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
        .map_err(what)?;
    conn.busy_timeout(Duration::from_millis(200))
        .map_err(what)?;
    // The version first: the schema below is this version's, not for a newer database.
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(what)?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "SQLite access log {}: made by a newer Wraith (schema version {version}; this one \
             writes version {SCHEMA_VERSION}): give this one another file",
            path.display()
        ));
    }
    conn.execute_batch(SCHEMA).map_err(what)?;
    if version < SCHEMA_VERSION {
        migrate(&conn).map_err(what)?;
    }
    Ok(conn)
}

/// Brings a database an older Wraith made (or a new one) up to `SCHEMA_VERSION`. Columns
/// are only ever added, so the rows it holds stay as they are and `wraith logs` queries keep
/// working. (A database a newer Wraith made is refused before: this one would not know
/// what it writes into.)
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_column = |name: &str| -> rusqlite::Result<bool> {
        let mut stmt =
            conn.prepare("SELECT 1 FROM pragma_table_info('access_log') WHERE name = ?1")?;
        stmt.exists([name])
    };
    // IMMEDIATE: two servers starting on one file migrate it one after the other, the
    // second finding the column there.
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    if !has_column("grpc_status")? {
        tx.execute_batch("ALTER TABLE access_log ADD COLUMN grpc_status INTEGER")?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// Opens the database for reading only (`query_only`, no ATTACH): a typo in `wraith logs`
/// can never write. Statements SQLite does not call read-only are refused by the caller.
pub fn open_read_only(path: &Path) -> Result<Connection, String> {
    use rusqlite::OpenFlags;
    match std::fs::metadata(path) {
        Err(_) => {
            return Err(format!(
                "{} does not exist (is [log.sqlite] configured and has wraith served a request?)",
                path.display()
            ))
        }
        // SQLite would wait on a FIFO for ever, whatever --timeout says.
        Ok(m) if !m.is_file() => {
            return Err(format!(
                "{} is not a database file ({})",
                path.display(),
                crate::files::kind(&m)
            ))
        }
        Ok(_) => {}
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    conn.pragma_update(None, "query_only", "ON")
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // ATTACH is a "read-only" statement to SQLite (it changes only the connection): no other
    // file is opened through this connection.
    // SAFETY: `handle` is the live connection; sqlite3_limit only sets one of its limits.
    unsafe { ffi::sqlite3_limit(conn.handle(), ffi::SQLITE_LIMIT_ATTACHED, 0) };
    conn.busy_timeout(Duration::from_secs(2))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(conn)
}

/// The settings of a running SQLite sink, which a reload may change. One writer serves a
/// database for as long as any configuration in service names it: a reload that changes
/// `[log.sqlite]` but not its path puts the new settings here when it commits
/// (`SnapshotTelemetry::activate`), and the writer takes them before its next batch or
/// retention step. A second writer on the file would go on running the old retention for as
/// long as a request of the old configuration (an SSE stream, a long download) held it.
pub struct SqliteSettings {
    /// Counts the changes, so the writer sees one without taking the lock.
    version: AtomicU64,
    current: Mutex<(SqliteSinkConfig, Formatting)>,
}

impl SqliteSettings {
    pub fn new(config: SqliteSinkConfig, formatting: Formatting) -> Arc<SqliteSettings> {
        Arc::new(SqliteSettings {
            version: AtomicU64::new(0),
            current: Mutex::new((config, formatting)),
        })
    }

    /// Puts `config` and `formatting` in force (nothing changes if they are already).
    pub fn set(&self, config: &SqliteSinkConfig, formatting: &Formatting) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 != *config || current.1 != *formatting {
            *current = (config.clone(), formatting.clone());
            self.version.fetch_add(1, Ordering::Release);
        }
    }
}

/// The writer thread's side of the sink.
pub struct SqliteWriter {
    /// The INSERT statements, for `ROWS_PER_INSERT` rows and for one row. Declared before
    /// `conn`: they are finalized before the connection closes.
    many: Insert,
    one: Insert,
    conn: Connection,
    /// Where `config` and `formatting` come from, and the version of it they are.
    settings: Arc<SqliteSettings>,
    version: u64,
    config: SqliteSinkConfig,
    formatting: Formatting,
    last_retention: Option<Instant>,
    /// Rows deleted so far by the retention pass under way (`None`: none is).
    retention_pass: Option<usize>,
    clock: CachedTime,
    /// Text made for the rows of one statement (time, client address, policy ids), bound in
    /// place; `spans` holds each row's three ranges into it.
    derived: String,
    spans: Vec<[(usize, usize); 3]>,
}

/// Binds one record's values to parameters `base + 1 ..= base + COLUMN_COUNT`; only the values
/// that are present are bound (the statement starts each use with every parameter NULL).
/// `derived` holds the row's time, client address and policy ids.
fn bind_row<'v>(
    b: &mut Bind<'_, 'v>,
    base: usize,
    r: &'v AccessRecord,
    formatting: &Formatting,
    derived: [&'v str; 3],
) -> rusqlite::Result<()> {
    let [time, ip, policies] = derived;
    let id = r.identity.as_deref();
    b.text(base + 1, time)?;
    b.cow(base + 2, lossy(r.request_id.as_bytes()))?;
    b.text(base + 3, ip)?;
    if let Some(p) = r.client_port {
        b.int(base + 4, p.into())?;
    }
    b.text(base + 5, &r.listener)?;
    b.text(base + 6, r.protocol)?;
    b.opt(base + 7, r.tls_version)?;
    b.opt(base + 8, r.tls_group)?;
    b.opt(base + 9, r.identity_name())?;
    b.opt(base + 10, id.and_then(|i| i.spiffe_id.as_deref()))?;
    b.opt(base + 11, id.and_then(|i| i.common_name.as_deref()))?;
    b.opt(base + 12, id.map(|i| i.fingerprint.as_str()))?;
    b.text(base + 13, r.method.as_str())?;
    b.opt(base + 14, r.host())?;
    b.text(base + 15, r.path())?;
    if let Some(q) = formatting.query(r.uri.query()) {
        b.cow(base + 16, q)?;
    }
    b.int(base + 17, r.status.into())?;
    b.int(base + 18, r.bytes_in as i64)?;
    b.int(base + 19, r.bytes_out as i64)?;
    b.real(base + 20, r.duration.as_micros() as f64 / 1000.0)?;
    if let Some(t) = r.forward.upstream_time {
        b.real(base + 21, t.as_micros() as f64 / 1000.0)?;
    }
    b.opt(base + 22, r.route.as_deref())?;
    b.opt(base + 23, r.upstream.as_deref())?;
    b.opt(base + 24, r.forward.endpoint.as_ref().map(|a| a.as_str()))?;
    b.int(base + 25, r.forward.attempts.into())?;
    if let Some(p) = &r.policy {
        b.text(base + 26, p.effect.as_str())?;
        b.text(base + 27, policies)?;
        b.opt(base + 28, p.reason.as_deref())?;
        b.int(base + 29, p.shadow.into())?;
    }
    if let Some(l) = &r.rate_limit {
        b.text(base + 30, l.outcome())?;
        b.text(base + 31, &l.limiter)?;
    }
    if let Some(ban) = &r.ban {
        b.text(base + 32, &ban.origin)?;
        b.opt(base + 33, ban.scenario.as_deref())?;
    }
    if let Some(v) = &r.user_agent {
        b.cow(base + 34, lossy(v.as_bytes()))?;
    }
    if let Some(v) = &r.referer {
        // Its query string is logged like the request's (`[log] query`).
        b.cow(base + 35, text(formatting.referer(v.as_bytes())))?;
    }
    b.opt(base + 36, r.error)?;
    b.int(base + 37, r.aborted.into())?;
    if let Some(code) = r.grpc_status {
        b.int(base + 38, code.into())?;
    }
    Ok(())
}

impl SqliteWriter {
    /// A writer with settings of its own.
    pub fn new(config: SqliteSinkConfig, formatting: Formatting) -> Result<SqliteWriter, String> {
        SqliteWriter::following(SqliteSettings::new(config, formatting))
    }

    /// A writer that follows `settings` (its database is their `path`, which never changes).
    pub fn following(settings: Arc<SqliteSettings>) -> Result<SqliteWriter, String> {
        let version = settings.version.load(Ordering::Acquire);
        let (config, formatting) = settings
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let conn = open_for_writing(&config.path)?;
        let (many, one) = prepare_inserts(&conn, &config.path)?;
        Ok(SqliteWriter {
            many,
            one,
            conn,
            settings,
            version,
            config,
            formatting,
            last_retention: None,
            retention_pass: None,
            clock: CachedTime::new(TimeStyle::Sqlite),
            derived: String::new(),
            spans: Vec::with_capacity(ROWS_PER_INSERT),
        })
    }

    /// Takes the settings a committed reload put in force. Changed retention runs at once:
    /// its change applies from the commit on.
    fn follow_settings(&mut self) {
        if self.settings.version.load(Ordering::Acquire) == self.version {
            return;
        }
        let current = self
            .settings
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.version = self.settings.version.load(Ordering::Acquire);
        let (config, formatting) = &*current;
        if (config.max_age, config.max_rows) != (self.config.max_age, self.config.max_rows) {
            self.last_retention = None;
        }
        self.config = config.clone();
        self.formatting = formatting.clone();
    }

    fn insert(&mut self, items: &[Arc<AccessRecord>]) -> rusqlite::Result<()> {
        if !self.conn.is_autocommit() {
            // A COMMIT that failed (SQLITE_BUSY, a full disk) can leave its transaction open;
            // every later BEGIN would fail on it.
            self.conn.execute_batch("ROLLBACK")?;
        }
        self.conn.execute_batch("BEGIN")?;
        let mut chunks = items.chunks_exact(ROWS_PER_INSERT);
        let inserted = chunks
            .by_ref()
            .try_for_each(|chunk| self.insert_rows(chunk, true))
            .and_then(|()| {
                chunks
                    .remainder()
                    .iter()
                    .try_for_each(|r| self.insert_rows(std::slice::from_ref(r), false))
            });
        match inserted.and_then(|()| self.conn.execute_batch("COMMIT")) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// One INSERT of `rows` (`ROWS_PER_INSERT` of them when `many`, else one).
    fn insert_rows(&mut self, rows: &[Arc<AccessRecord>], many: bool) -> rusqlite::Result<()> {
        // The text a row needs made first, all of it, so it can be bound in place.
        self.derived.clear();
        self.spans.clear();
        for r in rows {
            let mut span = [(0, 0); 3];
            let start = self.derived.len();
            self.derived.push_str(self.clock.format(r.time));
            span[0] = (start, self.derived.len());
            let start = self.derived.len();
            // SAFETY: write_ip appends ASCII only.
            write_ip(unsafe { self.derived.as_mut_vec() }, r.client_ip);
            span[1] = (start, self.derived.len());
            let start = self.derived.len();
            if let Some(p) = &r.policy {
                for (i, id) in p.policies.iter().enumerate() {
                    if i > 0 {
                        self.derived.push(',');
                    }
                    self.derived.push_str(id);
                }
            }
            span[2] = (start, self.derived.len());
            self.spans.push(span);
        }
        let insert = if many { &mut self.many } else { &mut self.one };
        let mut b = insert.bind();
        let derived = self.derived.as_str();
        for (i, (r, span)) in rows.iter().zip(&self.spans).enumerate() {
            let text = span.map(|(a, z)| &derived[a..z]);
            bind_row(&mut b, i * COLUMN_COUNT, r, &self.formatting, text)?;
        }
        b.execute()
    }

    /// One step of retention: deletes up to `RETENTION_STEP` rows past the configured age
    /// (oldest first), then past the configured count. Returns the rows deleted and whether
    /// that was all (fewer than a step's worth were due).
    fn retention_step(&mut self) -> rusqlite::Result<(usize, bool)> {
        let mut left = RETENTION_STEP;
        if let Some(age) = self.config.max_age {
            let cutoff = SystemTime::now()
                .checked_sub(age)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            left -= self.conn.execute(
                "DELETE FROM access_log WHERE id IN \
                 (SELECT id FROM access_log WHERE time < ?1 LIMIT ?2)",
                params![sqlite_time(cutoff), left],
            )? as i64;
        }
        if let Some(max) = self.config.max_rows.filter(|_| left > 0) {
            left -= self.conn.execute(
                "DELETE FROM access_log WHERE id IN (SELECT id FROM access_log \
                 WHERE id <= (SELECT max(id) FROM access_log) - ?1 ORDER BY id LIMIT ?2)",
                params![max as i64, left],
            )? as i64;
        }
        Ok(((RETENTION_STEP - left) as usize, left > 0))
    }

    /// Gives the WAL's pages back to the database and truncates the file: after a pass that
    /// deleted rows it is as large as all it deleted. A reader (`wraith logs`) holding a
    /// snapshot makes it wait `busy_timeout` and give up; the next pass tries again.
    fn truncate_wal(&self) {
        let done = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
        if !matches!(done, Ok(0)) {
            tracing::debug!(result = ?done, "access log WAL not truncated (a reader holds it)");
        }
    }
}

impl BatchWriter<Arc<AccessRecord>> for SqliteWriter {
    fn write(&mut self, items: &mut Vec<Arc<AccessRecord>>) -> Result<(), String> {
        self.follow_settings();
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
        let conn = open_for_writing(&self.config.path)?;
        let (many, one) = prepare_inserts(&conn, &self.config.path)?;
        // The old statements go (finalized) before the old connection closes.
        self.many = many;
        self.one = one;
        self.conn = conn;
        Ok(())
    }

    /// Retention, one step per call: the writer calls this between batches, so a pass over
    /// many rows never holds up the inserts for more than one step.
    fn tick(&mut self) {
        self.follow_settings();
        if self.config.max_age.is_none() && self.config.max_rows.is_none() {
            self.retention_pass = None;
            return;
        }
        let deleted = match self.retention_pass {
            Some(n) => n,
            None if self
                .last_retention
                .is_some_and(|t| t.elapsed() < RETENTION_EVERY) =>
            {
                return
            }
            None => {
                self.last_retention = Some(Instant::now());
                0
            }
        };
        match self.retention_step() {
            Ok((n, false)) => self.retention_pass = Some(deleted + n),
            Ok((n, true)) => {
                self.retention_pass = None;
                if deleted + n > 0 {
                    tracing::debug!(deleted = deleted + n, "access log retention");
                    self.truncate_wal();
                }
            }
            Err(e) => {
                self.retention_pass = None;
                tracing::warn!(error = %e, "access log retention failed");
            }
        }
    }
}

/// The two INSERT statements for `conn`.
fn prepare_inserts(conn: &Connection, path: &Path) -> Result<(Insert, Insert), String> {
    let what = |e: rusqlite::Error| format!("SQLite access log {}: {e}", path.display());
    let many = Insert::prepare(conn, &insert_sql(ROWS_PER_INSERT)).map_err(what)?;
    let one = Insert::prepare(conn, &insert_sql(1)).map_err(what)?;
    Ok((many, one))
}

/// A prepared statement bound without copying its text.
///
/// rusqlite binds every text value with `SQLITE_TRANSIENT`: SQLite mallocs and copies it, and
/// frees it on the next bind. For the access log that was about a fifth of the writer's
/// instructions (~20 text values per row). Here text is bound with `SQLITE_STATIC`, which
/// points SQLite at the caller's bytes; `Bind` makes that sound (see there).
struct Insert {
    stmt: std::ptr::NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
    /// A `Bind` was leaked (`mem::forget`) with bindings in place: clear them before reuse.
    dirty: bool,
}

// SAFETY: the statement is used by one thread at a time (`&mut self`), and the connection it
// belongs to is opened in SQLite's multi-thread mode (rusqlite's default flags), where a
// connection and its statements may move between threads.
unsafe impl Send for Insert {}

impl Insert {
    fn prepare(conn: &Connection, sql: &str) -> rusqlite::Result<Insert> {
        let len = c_int::try_from(sql.len()).map_err(|_| rusqlite::Error::InvalidQuery)?;
        let mut stmt = std::ptr::null_mut();
        // SAFETY: `handle` is the live connection; SQLite reads `len` bytes of `sql` and
        // writes the new statement into `stmt`. The statement is finalized (Drop) before the
        // connection closes: `SqliteWriter` declares its statements before its connection.
        let (db, rc) = unsafe {
            let db = conn.handle();
            let rc = ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr().cast(),
                len,
                ffi::SQLITE_PREPARE_PERSISTENT as c_uint,
                &mut stmt,
                std::ptr::null_mut(),
            );
            (db, rc)
        };
        if rc != ffi::SQLITE_OK {
            return Err(sqlite_error(db, rc));
        }
        let stmt = std::ptr::NonNull::new(stmt).ok_or(rusqlite::Error::InvalidQuery)?;
        Ok(Insert {
            stmt,
            db,
            dirty: false,
        })
    }

    /// Starts one use of the statement; every parameter is NULL until bound.
    fn bind<'v>(&mut self) -> Bind<'_, 'v> {
        if self.dirty {
            // SAFETY: the statement is live; clearing drops SQLite's pointers into values
            // that may be gone.
            unsafe { ffi::sqlite3_clear_bindings(self.stmt.as_ptr()) };
        }
        self.dirty = true;
        Bind {
            insert: self,
            values: std::marker::PhantomData,
        }
    }
}

impl Drop for Insert {
    fn drop(&mut self) {
        // SAFETY: the statement is live and not used after this.
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

/// One use of an `Insert`. Text bound through it must live for `'v`, which outlives the
/// `Bind`; executing or dropping it resets the statement and clears every binding, so SQLite
/// never holds a pointer past the values' life.
struct Bind<'s, 'v> {
    insert: &'s mut Insert,
    values: std::marker::PhantomData<&'v str>,
}

impl<'v> Bind<'_, 'v> {
    fn check(&self, rc: c_int) -> rusqlite::Result<()> {
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(sqlite_error(self.insert.db, rc))
        }
    }

    /// Binds `v` in place (no copy).
    fn text(&mut self, i: usize, v: &'v str) -> rusqlite::Result<()> {
        self.text_with(i, v, ffi::SQLITE_STATIC())
    }

    fn opt(&mut self, i: usize, v: Option<&'v str>) -> rusqlite::Result<()> {
        match v {
            Some(v) => self.text(i, v),
            None => Ok(()),
        }
    }

    /// Binds borrowed text in place and owned text (rare: lossy or redacted) as a copy.
    fn cow(&mut self, i: usize, v: std::borrow::Cow<'v, str>) -> rusqlite::Result<()> {
        match v {
            std::borrow::Cow::Borrowed(v) => self.text(i, v),
            std::borrow::Cow::Owned(v) => self.text_with(i, &v, ffi::SQLITE_TRANSIENT()),
        }
    }

    fn text_with(
        &mut self,
        i: usize,
        v: &str,
        lifetime: ffi::sqlite3_destructor_type,
    ) -> rusqlite::Result<()> {
        let len = c_int::try_from(v.len()).map_err(|_| rusqlite::Error::InvalidQuery)?;
        let i = c_int::try_from(i).map_err(|_| rusqlite::Error::InvalidParameterCount(i, 0))?;
        // SAFETY: the statement is live; with SQLITE_STATIC, `v` lives for 'v, beyond every
        // use of the binding (this Bind clears them when it ends); with SQLITE_TRANSIENT SQLite
        // copies `v` before returning.
        let rc = unsafe {
            ffi::sqlite3_bind_text(
                self.insert.stmt.as_ptr(),
                i,
                v.as_ptr().cast(),
                len,
                lifetime,
            )
        };
        self.check(rc)
    }

    fn int(&mut self, i: usize, v: i64) -> rusqlite::Result<()> {
        let i = c_int::try_from(i).map_err(|_| rusqlite::Error::InvalidParameterCount(i, 0))?;
        // SAFETY: the statement is live.
        let rc = unsafe { ffi::sqlite3_bind_int64(self.insert.stmt.as_ptr(), i, v) };
        self.check(rc)
    }

    fn real(&mut self, i: usize, v: f64) -> rusqlite::Result<()> {
        let i = c_int::try_from(i).map_err(|_| rusqlite::Error::InvalidParameterCount(i, 0))?;
        // SAFETY: the statement is live.
        let rc = unsafe { ffi::sqlite3_bind_double(self.insert.stmt.as_ptr(), i, v) };
        self.check(rc)
    }

    /// Runs the statement (an INSERT: no rows come back).
    fn execute(self) -> rusqlite::Result<()> {
        // SAFETY: the statement is live and every text it points at lives for 'v.
        let rc = unsafe { ffi::sqlite3_step(self.insert.stmt.as_ptr()) };
        if rc == ffi::SQLITE_DONE {
            Ok(())
        } else {
            Err(sqlite_error(self.insert.db, rc))
        }
    }
}

impl Drop for Bind<'_, '_> {
    fn drop(&mut self) {
        let stmt = self.insert.stmt.as_ptr();
        // SAFETY: the statement is live; reset ends the step, clear_bindings drops every
        // pointer into the caller's values.
        unsafe {
            ffi::sqlite3_reset(stmt);
            ffi::sqlite3_clear_bindings(stmt);
        }
        self.insert.dirty = false;
    }
}

/// The error SQLite reports for `rc` on `db`, with its message.
fn sqlite_error(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    // SAFETY: `db` is a live connection; sqlite3_errmsg returns a NUL-terminated string owned
    // by SQLite, copied here before any other call on the connection.
    let message = unsafe { std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db)) }
        .to_string_lossy()
        .into_owned();
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), Some(message))
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
                endpoint: Some(http::uri::Authority::from_static("127.0.0.1:18080")),
                upstream_time: Some(Duration::from_micros(80)),
                attempts: 1,
                ..Default::default()
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
                r.grpc_status = (i % 4 == 0).then_some(i % 17);
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
                    r.grpc_status.map(i64::from),
                )
            })
            .collect();
        w.write(&mut records).unwrap();
        assert!(records.is_empty());
        let db = open_read_only(&config.path).unwrap();
        let mut stmt = db
            .prepare(
                "SELECT status, client_ip, client_port, route, grpc_status, method, path \
                 FROM access_log ORDER BY id",
            )
            .unwrap();
        let rows: Vec<_> = stmt
            .query_map([], |row| {
                assert_eq!(row.get::<_, String>(5)?, "GET");
                assert_eq!(row.get::<_, String>(6)?, "/small");
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, expected);
    }

    /// A database the first schema made (no `grpc_status`) gains the column, keeps its rows
    /// and takes new ones; one a newer Wraith made is refused with a message saying so.
    #[test]
    fn older_databases_are_migrated_and_newer_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = sink_config(dir.path());
        let v1 = SCHEMA.replace(
            "    aborted      INTEGER NOT NULL,   -- 1 when the client went away early\n    grpc_status  INTEGER             -- the gRPC status the response ended with\n",
            "    aborted      INTEGER NOT NULL\n",
        );
        assert!(
            !v1.contains("grpc_status"),
            "the version 1 schema is derived"
        );
        {
            let old = Connection::open(&config.path).unwrap();
            old.execute_batch(&v1).unwrap();
            old.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO access_log (time, request_id, client_ip, listener, protocol, method,
                     path, status, bytes_in, bytes_out, duration_ms, attempts, aborted)
                 VALUES ('2026-11-01 00:00:00.000', 'old', '10.0.0.1', 'l', 'h1', 'GET', '/old',
                     200, 0, 0, 1.0, 1, 0);",
            )
            .unwrap();
        }
        let f = Formatting::new(&LogConfig::default());
        let mut w = SqliteWriter::new(config.clone(), f.clone()).unwrap();
        let mut r = (*sample()).clone();
        r.grpc_status = Some(14);
        w.write(&mut vec![Arc::new(r)]).unwrap();
        drop(w);
        let db = open_read_only(&config.path).unwrap();
        let version: i64 = db
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let rows: Vec<(String, Option<i64>)> = db
            .prepare("SELECT path, grpc_status FROM access_log ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            [("/old".to_string(), None), ("/small".to_string(), Some(14))]
        );
        drop(db);
        // Opening it again changes nothing.
        drop(SqliteWriter::new(config.clone(), f.clone()).unwrap());

        Connection::open(&config.path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = SqliteWriter::new(config.clone(), f).err().unwrap();
        assert!(
            e.contains("made by a newer Wraith (schema version 3"),
            "{e}"
        );
        assert!(e.contains(&config.path.display().to_string()), "{e}");
    }

    /// Retention over many rows deletes one step (`RETENTION_STEP` rows, a transaction) per
    /// tick, so the writer's inserts go on between steps, and the WAL it grew is truncated
    /// once the pass is over.
    #[test]
    fn retention_deletes_in_steps_between_inserts_and_truncates_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let config = SqliteSinkConfig {
            max_rows: Some(1000),
            ..sink_config(dir.path())
        };
        let f = Formatting::new(&LogConfig::default());
        let mut w = SqliteWriter::new(config.clone(), f).unwrap();
        // 100,000 old rows, made by SQLite itself (fast); the WAL starts out empty.
        w.conn
            .execute_batch(
                "BEGIN;
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
                 INSERT INTO access_log (time, request_id, client_ip, listener, protocol, method,
                     path, status, bytes_in, bytes_out, duration_ms, attempts, aborted, user_agent)
                 SELECT '2020-01-01 00:00:00.000', 'r' || i, '192.0.2.1', 'http', 'h1', 'GET',
                     '/old/' || i, 200, 0, 0, 1.0, 0, 0, 'agent' FROM n;
                 COMMIT;
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        let count = |w: &SqliteWriter| -> i64 {
            w.conn
                .query_row("SELECT count(*) FROM access_log", [], |r| r.get(0))
                .unwrap()
        };
        let wal = config.path.with_extension("db-wal");
        w.tick();
        assert_eq!(count(&w), 100_000 - RETENTION_STEP, "one step per tick");
        // The writer's next batch goes in between two steps.
        w.write(&mut vec![sample()]).unwrap();
        assert_eq!(count(&w), 100_001 - RETENTION_STEP);
        let mut ticks = 1;
        while w.retention_pass.is_some() {
            w.tick();
            ticks += 1;
            assert!(ticks <= 11, "a pass of 99,001 rows takes ten steps");
        }
        assert_eq!(count(&w), 1000);
        let newest: String = w
            .conn
            .query_row("SELECT path FROM access_log ORDER BY id DESC", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(newest, "/small", "the newest rows stay");
        let wal_len = std::fs::metadata(&wal).map_or(0, |m| m.len());
        assert!(wal_len < 1 << 20, "WAL left at {wal_len} bytes");
    }

    /// A writer takes the settings a committed reload put in force before its next step:
    /// the old retention no longer applies, and a changed one runs at once.
    #[test]
    fn writer_follows_the_settings_put_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let old = SqliteSinkConfig {
            max_age: Some(hour),
            ..sink_config(dir.path())
        };
        let f = Formatting::new(&LogConfig::default());
        let settings = SqliteSettings::new(old.clone(), f.clone());
        let mut w = SqliteWriter::following(settings.clone()).unwrap();
        w.tick();
        let two_hours_ago = sqlite_time(SystemTime::now() - 2 * hour);
        for i in 0..5 {
            w.conn
                .execute(
                    "INSERT INTO access_log (time, request_id, client_ip, listener, protocol, \
                     method, path, status, bytes_in, bytes_out, duration_ms, attempts, aborted) \
                     VALUES (?1, ?2, '192.0.2.1', 'http', 'h1', 'GET', '/', 200, 0, 0, 1.0, 0, 0)",
                    params![two_hours_ago, format!("r{i}")],
                )
                .unwrap();
        }
        let count = |w: &SqliteWriter| -> i64 {
            w.conn
                .query_row("SELECT count(*) FROM access_log", [], |r| r.get(0))
                .unwrap()
        };
        let raised = SqliteSinkConfig {
            max_age: Some(30 * 24 * hour),
            ..old.clone()
        };
        settings.set(&raised, &f);
        w.tick();
        // And a minute later, at the next regular pass.
        w.last_retention = Some(Instant::now() - RETENTION_EVERY);
        w.tick();
        assert_eq!(count(&w), 5, "rows older than the old max_age stay");
        settings.set(
            &SqliteSinkConfig {
                max_rows: Some(2),
                ..raised
            },
            &f,
        );
        w.tick();
        assert_eq!(count(&w), 2, "the new max_rows applies at once");
    }

    /// With an umask that lets everything through, the database, its WAL and its shared
    /// memory are still 0640 from the start; an existing database keeps its mode.
    #[test]
    fn database_wal_and_shm_are_created_0640() {
        use std::os::unix::fs::PermissionsExt;
        // Process-wide state: the test runs alone in a child process.
        if !crate::telemetry::alone::in_child(
            "telemetry::sqlite::tests::database_wal_and_shm_are_created_0640",
        ) {
            return;
        }
        // SAFETY: umask only sets the process's file-creation mask.
        unsafe { libc::umask(0) };
        let dir = tempfile::tempdir().unwrap();
        let config = sink_config(dir.path());
        let mode = |suffix: &str| {
            let p = format!("{}{suffix}", config.path.display());
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        let f = Formatting::new(&LogConfig::default());
        let mut w = SqliteWriter::new(config.clone(), f.clone()).unwrap();
        w.write(&mut vec![sample()]).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            assert_eq!(mode(suffix), 0o640, "a.db{suffix}");
        }
        drop(w);
        // An operator's choice for an existing database stands.
        std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let _w = SqliteWriter::new(config.clone(), f).unwrap();
        assert_eq!(mode(""), 0o600);
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
