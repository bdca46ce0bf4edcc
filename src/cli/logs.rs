//! `wraith logs`: read-only SQL over the SQLite access log, printed as an aligned table or as
//! JSON lines; presets for the usual questions (`--denied`, `--errors`, `--slow 500ms`,
//! `--since 1h`); `--tail` follows new rows.
//!
//! The database is opened read-only (and `query_only`), so a typo can never write.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
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
}

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
    let db = match &args.db {
        Some(p) => p.clone(),
        None => db_path(&args.config)?,
    };
    let conn = open_read_only(&db)?;
    let mut out = std::io::stdout().lock();
    if let Some(sql) = &args.sql {
        if args.tail || args.denied || args.errors || args.slow.is_some() || args.since.is_some() {
            return Err(
                "give either SQL or presets (--denied, --errors, --slow, --since, --tail), not both"
                    .into(),
            );
        }
        let (cols, rows) = query(&conn, sql, &[])?;
        return print(&mut out, &cols, &rows, args.json, true);
    }

    let (columns, filter) = preset(args)?;
    let limit = if args.limit == 0 { 50 } else { args.limit };
    // The newest `limit` matching rows, shown oldest first.
    let sql = format!(
        "SELECT * FROM (SELECT {columns} FROM access_log WHERE {filter} ORDER BY id DESC LIMIT {limit}) ORDER BY id"
    );
    let (cols, rows) = query(&conn, &sql, &[])?;
    print(&mut out, &cols, &rows, args.json, true)?;
    if !args.tail {
        return Ok(());
    }
    let mut last = rows
        .last()
        .and_then(|r| r.first())
        .and_then(Value::as_i64)
        .unwrap_or_else(|| max_id(&conn));
    let follow = format!(
        "SELECT {columns} FROM access_log WHERE id > ?1 AND ({filter}) ORDER BY id LIMIT 1000"
    );
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let (cols, rows) = query(&conn, &follow, &[&last])?;
        if let Some(id) = rows.last().and_then(|r| r.first()).and_then(Value::as_i64) {
            last = id;
            print(&mut out, &cols, &rows, args.json, false)?;
        }
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

fn max_id(conn: &Connection) -> i64 {
    conn.query_row("SELECT coalesce(max(id), 0) FROM access_log", [], |r| {
        r.get(0)
    })
    .unwrap_or(0)
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

type Rows = Vec<Vec<Value>>;

/// Runs one statement; SQLite's own message on error.
fn query(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<(Vec<String>, Rows), String> {
    let mut stmt = conn.prepare(sql).map_err(|e| format!("SQL error: {e}"))?;
    let cols: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    let mut rows = stmt.query(params).map_err(|e| format!("SQL error: {e}"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| format!("SQL error: {e}"))? {
        let mut values = Vec::with_capacity(cols.len());
        for i in 0..cols.len() {
            let v = match row.get_ref(i).map_err(|e| format!("SQL error: {e}"))? {
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
        out.push(values);
    }
    Ok((cols, out))
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

fn print(
    out: &mut impl Write,
    cols: &[String],
    rows: &Rows,
    json: bool,
    header: bool,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("cannot write output: {e}");
    if json {
        for r in rows {
            let obj: serde_json::Map<String, Value> =
                cols.iter().cloned().zip(r.iter().cloned()).collect();
            writeln!(out, "{}", Value::Object(obj)).map_err(io)?;
        }
        return out.flush().map_err(io);
    }
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(cell).collect()).collect();
    let mut widths: Vec<usize> = cols.iter().map(|c| c.chars().count()).collect();
    for r in &cells {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |values: &[String]| {
        let mut s = String::new();
        for (i, (v, w)) in values.iter().zip(&widths).enumerate() {
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
        s.trim_end().to_string()
    };
    if header {
        let head: Vec<String> = cols.iter().map(|c| c.to_uppercase()).collect();
        writeln!(out, "{}", line(&head)).map_err(io)?;
    }
    for r in &cells {
        writeln!(out, "{}", line(r)).map_err(io)?;
    }
    if header && rows.is_empty() {
        writeln!(out, "(no rows)").map_err(io)?;
    }
    out.flush().map_err(io)
}
