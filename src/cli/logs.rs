//! `wraith logs`: read-only SQL over the SQLite access log, printed as an aligned table or as
//! JSON lines; presets for the usual questions (`--denied`, `--errors`, `--slow 500ms`,
//! `--since 1h`); `--tail` follows new rows.
//!
//! The database is opened read-only (and `query_only`), so a typo can never write; statements
//! SQLite does not call read-only (`VACUUM INTO` makes a file even on a read-only connection)
//! are refused, and so is ATTACH. Every statement has a deadline (`--timeout`): a reader that
//! runs on keeps the live server's WAL from being checkpointed, and it grows. Rows are printed
//! as they come, never all collected first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use rusqlite::types::ValueRef;
use rusqlite::Connection;
use serde_json::Value;

use crate::config::units::parse_duration;
use crate::telemetry::format::sqlite_time;
use crate::telemetry::sqlite::open_read_only;

/// What `wraith logs` was asked.
#[derive(Debug, Default)]
pub struct LogsArgs {
    pub config: PathBuf,
    pub db: Option<PathBuf>,
    pub sql: Option<String>,
    pub json: bool,
    pub tail: bool,
    pub denied: bool,
    pub errors: bool,
    pub slow: Option<String>,
    pub since: Option<String>,
    pub limit: usize,
    /// Longest a statement may run, writing its rows included (`--timeout`, default 30s;
    /// `0` for no limit).
    pub timeout: Option<String>,
}

/// The deadline of a statement when `--timeout` is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Columns every preset shows.
const BASE: &str = "id, time, client_ip, identity, method, host, path, status, duration_ms, route";

pub fn run(args: LogsArgs) -> ExitCode {
    match logs(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wraith logs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn logs(args: &LogsArgs) -> Result<(), String> {
    let timeout = match &args.timeout {
        Some(t) => parse_duration(t).map_err(|e| format!("--timeout: {e}"))?,
        None => DEFAULT_TIMEOUT,
    };
    let db = match &args.db {
        Some(p) => p.clone(),
        None => db_path(&args.config)?,
    };
    let conn = open_read_only(&db)?;
    let mut out = std::io::stdout().lock();
    let mode = if args.json { Mode::Json } else { Mode::Table };
    if let Some(sql) = &args.sql {
        if args.tail || args.denied || args.errors || args.slow.is_some() || args.since.is_some() {
            return Err(
                "give either SQL or presets (--denied, --errors, --slow, --since, --tail), not both"
                    .into(),
            );
        }
        run_query(
            &conn,
            sql,
            &[],
            timeout,
            &mut Printer::new(&mut out, mode, true),
        )?;
        return Ok(());
    }

    let (columns, filter) = preset(args)?;
    // 0 is every row, as for `wraith decisions list`. SQLite's LIMIT is a signed 64-bit
    // integer: more is all rows anyway.
    let limit = if args.limit == 0 {
        usize::MAX
    } else {
        args.limit
    }
    .min(i64::MAX as usize);
    // The newest `limit` matching rows, shown oldest first.
    let sql = format!(
        "SELECT * FROM (SELECT {columns} FROM access_log WHERE {filter} ORDER BY id DESC LIMIT {limit}) ORDER BY id"
    );
    // With --tail, the rows shown and the id to follow from are read in one transaction:
    // a row committed between two statements would be neither shown nor followed.
    let read = |conn: &Connection, sql: &str| {
        conn.execute_batch(sql)
            .map_err(|e| format!("SQL error: {e}"))
    };
    if args.tail {
        read(&conn, "BEGIN")?;
    }
    run_query(
        &conn,
        &sql,
        &[],
        timeout,
        &mut Printer::new(&mut out, mode, true),
    )?;
    if !args.tail {
        return Ok(());
    }
    let (mut first, mut last) = id_range(&conn);
    read(&conn, "COMMIT")?;
    let follow = format!(
        "SELECT {columns} FROM access_log WHERE id > ?1 AND ({filter}) ORDER BY id LIMIT 1000"
    );
    loop {
        std::thread::sleep(Duration::from_millis(250));
        // Each poll is one read transaction, its statement with its own deadline.
        read(&conn, "BEGIN")?;
        let (min, max) = id_range(&conn);
        // Ids are not AUTOINCREMENT: once retention has emptied the table (nothing served
        // for `max_age`), they start again at 1, and every row there now is new. Retention
        // deletes oldest first, so only that lowers the smallest id or the largest.
        if max < last || min < first {
            last = 0;
        }
        first = min;
        let mut printer = Printer::new(&mut out, mode, false);
        if let Some(id) = run_query(&conn, &follow, &[&last], timeout, &mut printer)? {
            last = id;
        }
        read(&conn, "COMMIT")?;
    }
}

/// The database of `[log.sqlite]` in the config.
fn db_path(config: &Path) -> Result<PathBuf, String> {
    let c = crate::config::load(config, crate::config::LoadOptions::default())
        .map_err(|e| format!("{e}\n(or name the database with --db FILE)"))?;
    c.log.sqlite.map(|s| s.path).ok_or_else(|| {
        format!(
            "{} has no [log.sqlite] section (or name the database with --db FILE)",
            config.display()
        )
    })
}

/// The smallest and the largest id in the table (0 when it is empty).
fn id_range(conn: &Connection) -> (i64, i64) {
    conn.query_row(
        "SELECT coalesce(min(id), 0), coalesce(max(id), 0) FROM access_log",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap_or((0, 0))
}

/// The columns and WHERE clause of the presets (combined with AND).
fn preset(args: &LogsArgs) -> Result<(String, String), String> {
    let mut columns = BASE.to_string();
    let mut filters = vec!["1".to_string()];
    if args.denied {
        columns.push_str(", decision, policies, reason, rate_limiter, ban_origin");
        filters.push(
            "(status IN (401, 403, 429) OR (decision = 'deny' AND coalesce(shadow, 0) = 0) \
             OR rate_limit = 'limited' OR ban_origin IS NOT NULL)"
                .into(),
        );
    }
    if args.errors {
        columns.push_str(", error, upstream, endpoint");
        filters.push("status >= 500".into());
    }
    if let Some(slow) = &args.slow {
        let d = parse_duration(slow).map_err(|e| format!("--slow: {e}"))?;
        columns.push_str(", upstream_ms");
        filters.push(format!("duration_ms >= {}", d.as_secs_f64() * 1000.0));
    }
    if let Some(since) = &args.since {
        let d = parse_duration(since).map_err(|e| format!("--since: {e}"))?;
        let from = SystemTime::now()
            .checked_sub(d)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        // A value we formatted ourselves: digits, dashes, colons, a dot and a space.
        filters.push(format!("time >= '{}'", sqlite_time(from)));
    }
    if !args.denied && !args.errors {
        columns.push_str(", error");
    }
    Ok((columns, filters.join(" AND ")))
}

/// Runs one statement and prints its rows as they come; SQLite's own message on error.
/// Returns the first column of the last row as an integer (the id, for `--tail`).
fn run_query(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
    timeout: Duration,
    printer: &mut Printer<'_, impl Write>,
) -> Result<Option<i64>, String> {
    let sql_error = |e: rusqlite::Error| format!("SQL error: {e}");
    let mut stmt = conn.prepare(sql).map_err(sql_error)?;
    // The connection is read-only, but SQLite lifts that for the file `VACUUM INTO` makes:
    // only statements SQLite itself calls read-only run.
    if !stmt.readonly() {
        return Err(
            "refused: this statement writes (wraith logs only reads the access log)".into(),
        );
    }
    let cols: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    printer.columns(&cols);
    let deadline = Deadline::start(conn, timeout)?;
    let timed_out = |e: rusqlite::Error| {
        if deadline.passed() {
            format!(
                "the query ran longer than --timeout {} and was stopped (narrow it with a WHERE on \
                 time or a LIMIT, or give a longer --timeout; 0 for none)",
                crate::config::units::format_duration(timeout)
            )
        } else {
            sql_error(e)
        }
    };
    let mut rows = stmt.query(params).map_err(timed_out)?;
    let mut last = None;
    loop {
        let row = match rows.next() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => {
                // The rows already fetched (a table holds up to its sample back) come out
                // before the error does.
                let err = timed_out(e);
                let _ = printer.flush_held();
                return Err(err);
            }
        };
        let mut values = Vec::with_capacity(cols.len());
        for i in 0..cols.len() {
            let v = match row.get_ref(i).map_err(sql_error)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(n) => Value::from(n),
                ValueRef::Real(f) => serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .unwrap_or(Value::Null),
                ValueRef::Text(t) => Value::from(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Value::from(format!("<{} bytes>", b.len())),
            };
            values.push(v);
        }
        last = values.first().and_then(Value::as_i64);
        printer.row(values)?;
    }
    printer.finish()?;
    Ok(last)
}

/// Interrupts the connection's statement when `timeout` passes (SQLite then fails it with
/// "interrupted"). rusqlite's progress handler needs its `hooks` feature; the interrupt
/// handle does the same from a watchdog thread, in safe code.
struct Deadline {
    stop: Option<mpsc::Sender<()>>,
    passed: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl Deadline {
    /// No deadline when `timeout` is zero.
    fn start(conn: &Connection, timeout: Duration) -> Result<Deadline, String> {
        let passed = Arc::new(AtomicBool::new(false));
        if timeout.is_zero() {
            return Ok(Deadline {
                stop: None,
                passed,
                watchdog: None,
            });
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = conn.get_interrupt_handle();
        let flag = passed.clone();
        let watchdog = std::thread::Builder::new()
            .name("wraith-logs-deadline".into())
            .spawn(move || {
                // Disconnected: the statement ended in time.
                if stopped.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout) {
                    flag.store(true, Ordering::SeqCst);
                    handle.interrupt();
                }
            })
            .map_err(|e| format!("cannot start the query deadline: {e}"))?;
        Ok(Deadline {
            stop: Some(stop),
            passed,
            watchdog: Some(watchdog),
        })
    }

    fn passed(&self) -> bool {
        self.passed.load(Ordering::SeqCst)
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

/// Widest a table cell gets before it is cut (the JSON output is never cut).
const MAX_CELL: usize = 60;

fn cell(v: &Value) -> String {
    let s = match v {
        Value::Null => "-".to_string(),
        Value::String(s) => super::printable(s).into_owned(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    };
    if s.chars().count() > MAX_CELL {
        let cut: String = s.chars().take(MAX_CELL - 1).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// Rows the table layout measures before it prints: the column widths come from these (and
/// the header); later rows are printed as they come, in the same widths (a wider cell just
/// pushes its line out).
const TABLE_SAMPLE: usize = 1000;

/// How rows are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// An aligned table (numbers right, text left).
    Table,
    /// One JSON object per line.
    Json,
}

/// Prints rows as they come: JSON lines at once, a table once its widths are known.
struct Printer<'w, W: Write> {
    out: &'w mut W,
    mode: Mode,
    header: bool,
    cols: Vec<String>,
    /// The table's rows held back to measure, until `TABLE_SAMPLE` of them or the end.
    sample: Vec<Vec<String>>,
    /// Known once the sample is printed.
    widths: Option<Vec<usize>>,
    rows: usize,
}

fn io(e: std::io::Error) -> String {
    format!("cannot write output: {e}")
}

impl<'w, W: Write> Printer<'w, W> {
    fn new(out: &'w mut W, mode: Mode, header: bool) -> Printer<'w, W> {
        Printer {
            out,
            mode,
            header,
            cols: Vec::new(),
            sample: Vec::new(),
            widths: None,
            rows: 0,
        }
    }

    fn columns(&mut self, cols: &[String]) {
        self.cols = cols.to_vec();
    }

    fn row(&mut self, values: Vec<Value>) -> Result<(), String> {
        self.rows += 1;
        if self.mode == Mode::Json {
            let obj: serde_json::Map<String, Value> =
                self.cols.iter().cloned().zip(values).collect();
            let line = Value::Object(obj).to_string();
            return writeln!(self.out, "{}", super::json_printable(&line)).map_err(io);
        }
        let cells: Vec<String> = values.iter().map(cell).collect();
        if self.widths.is_some() {
            return self.line(&cells);
        }
        self.sample.push(cells);
        if self.sample.len() >= TABLE_SAMPLE {
            self.print_sample()?;
            self.out.flush().map_err(io)?;
        }
        Ok(())
    }

    /// Measures the sample, prints the header and the sample.
    fn print_sample(&mut self) -> Result<(), String> {
        let mut widths: Vec<usize> = self.cols.iter().map(|c| c.chars().count()).collect();
        for r in &self.sample {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        self.widths = Some(widths);
        if self.header {
            let head: Vec<String> = self.cols.iter().map(|c| c.to_uppercase()).collect();
            self.line(&head)?;
        }
        for r in std::mem::take(&mut self.sample) {
            self.line(&r)?;
        }
        Ok(())
    }

    fn line(&mut self, values: &[String]) -> Result<(), String> {
        let widths = self.widths.as_deref().unwrap_or_default();
        let mut s = String::new();
        for (i, (v, w)) in values.iter().zip(widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            // Numbers right-aligned, text left-aligned.
            let numeric = v.parse::<f64>().is_ok();
            if i + 1 == values.len() && !numeric {
                s.push_str(v);
            } else if numeric {
                s.push_str(&format!("{v:>w$}"));
            } else {
                s.push_str(&format!("{v:<w$}"));
            }
        }
        writeln!(self.out, "{}", s.trim_end()).map_err(io)
    }

    /// The statement failed: prints the rows held back, if any, so none fetched is lost.
    fn flush_held(&mut self) -> Result<(), String> {
        if self.mode == Mode::Table && self.widths.is_none() && self.rows > 0 {
            self.print_sample()?;
        }
        self.out.flush().map_err(io)
    }

    /// The statement ended: prints what is held back.
    fn finish(&mut self) -> Result<(), String> {
        if self.mode == Mode::Table && self.widths.is_none() && (self.rows > 0 || self.header) {
            self.print_sample()?;
        }
        if self.mode == Mode::Table && self.header && self.rows == 0 {
            writeln!(self.out, "(no rows)").map_err(io)?;
        }
        self.out.flush().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::sqlite::open_for_writing;

    /// A database with the schema (and no rows), opened as `wraith logs` opens it.
    fn db(dir: &Path) -> Connection {
        let path = dir.join("access.db");
        drop(open_for_writing(&path).unwrap());
        open_read_only(&path).unwrap()
    }

    /// Runs `sql` as `wraith logs "SQL"` does, into a buffer.
    fn run(
        conn: &Connection,
        sql: &str,
        mode: Mode,
        timeout: Duration,
    ) -> (Result<(), String>, String) {
        let mut out = Vec::new();
        let r = run_query(
            conn,
            sql,
            &[],
            timeout,
            &mut Printer::new(&mut out, mode, true),
        );
        (r.map(drop), String::from_utf8(out).unwrap())
    }

    /// Counts from 1 without end.
    const ENDLESS: &str =
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT i FROM n";

    #[test]
    fn statements_that_write_or_attach_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db(dir.path());
        let copy = dir.path().join("copy.db");
        let (r, _) = run(
            &conn,
            &format!("VACUUM INTO '{}'", copy.display()),
            Mode::Table,
            DEFAULT_TIMEOUT,
        );
        assert!(r.unwrap_err().contains("refused"));
        assert!(!copy.exists(), "VACUUM INTO made no file");
        let (r, _) = run(
            &conn,
            "DELETE FROM access_log",
            Mode::Table,
            DEFAULT_TIMEOUT,
        );
        assert!(r.unwrap_err().contains("refused"));
        let other = dir.path().join("other.db");
        drop(open_for_writing(&other).unwrap());
        let (r, _) = run(
            &conn,
            &format!("ATTACH '{}' AS o", other.display()),
            Mode::Table,
            DEFAULT_TIMEOUT,
        );
        assert!(r.unwrap_err().contains("too many attached"));
        // Reading still works.
        let (r, out) = run(
            &conn,
            "SELECT count(*) AS n FROM access_log",
            Mode::Table,
            DEFAULT_TIMEOUT,
        );
        r.unwrap();
        assert_eq!(out, "N\n0\n");
    }

    #[test]
    fn a_query_past_its_deadline_is_stopped_and_rows_stream_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db(dir.path());
        for mode in [Mode::Json, Mode::Table] {
            let started = std::time::Instant::now();
            let (r, out) = run(&conn, ENDLESS, mode, Duration::from_millis(300));
            let err = r.unwrap_err();
            assert!(err.contains("--timeout 300ms"), "{err}");
            assert!(started.elapsed() < Duration::from_secs(10));
            // Printed while the query ran, not collected first.
            let lines: Vec<&str> = out.lines().collect();
            assert!(
                lines.len() > TABLE_SAMPLE,
                "{mode:?}: {} lines",
                lines.len()
            );
            let first = if mode == Mode::Json { "{\"i\":1}" } else { "I" };
            assert_eq!(lines[0], first, "{mode:?}");
        }
        // The connection serves the next statement.
        let (r, out) = run(&conn, "SELECT 7 AS x", Mode::Json, DEFAULT_TIMEOUT);
        r.unwrap();
        assert_eq!(out, "{\"x\":7}\n");
    }

    #[test]
    fn a_table_stopped_by_its_deadline_still_prints_the_rows_it_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db(dir.path());
        // Two rows at once, then a third that never comes.
        let sql =
            format!("SELECT 1 AS x UNION ALL SELECT 2 UNION ALL SELECT max(i) FROM ({ENDLESS})");
        let (r, out) = run(&conn, &sql, Mode::Table, Duration::from_millis(300));
        assert!(r.unwrap_err().contains("--timeout 300ms"));
        assert_eq!(out, "X\n1\n2\n");
    }

    #[test]
    fn tables_align_over_the_sample_and_stream_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db(dir.path());
        let sql = |n: usize| {
            format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT {n}) \
                 SELECT i, 'row' || i AS name FROM n"
            )
        };
        let (r, out) = run(&conn, &sql(3), Mode::Table, DEFAULT_TIMEOUT);
        r.unwrap();
        assert_eq!(out, "I  NAME\n1  row1\n2  row2\n3  row3\n");
        let n = TABLE_SAMPLE + 500;
        let (r, out) = run(&conn, &sql(n), Mode::Table, DEFAULT_TIMEOUT);
        r.unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), n + 1);
        // Widths from the sample (up to 1000: four digits), kept for the rows after it.
        assert_eq!(lines[1], "   1  row1");
        assert_eq!(lines[1001], "1001  row1001");
        assert_eq!(lines[n], format!("{n}  row{n}"));
        let (r, out) = run(&conn, "SELECT 1 AS x WHERE 0", Mode::Table, DEFAULT_TIMEOUT);
        r.unwrap();
        assert_eq!(out, "X\n(no rows)\n");
    }
}
