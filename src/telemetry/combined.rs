//! A minimal nginx "combined" access log, so CrowdSec's stock nginx parsers and scenarios
//! and Wazuh's web-accesslog rules read Wraith's traffic unchanged:
//!
//! ```text
//! 203.0.113.9 - - [25/Nov/2026:22:06:14 +0000] "GET /.env HTTP/1.1" 404 37 "-" "curl/8.5"
//! ```
//!
//! `remote_addr` is the client address after trusted-proxy resolution; the status is the one
//! Wraith sent (its own 403s and 429s included). Lines go through a bounded channel to a
//! writer thread: a slow disk drops lines (counted) rather than slowing requests.
//!
//! (Written for the decision bridges' end-to-end test; the observability work owns the full
//! access-log sinks and should absorb this.)

use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

/// One request as the combined format records it.
pub struct Entry<'a> {
    pub client: IpAddr,
    pub method: &'a str,
    /// Path and query as the client sent them.
    pub target: &'a str,
    pub version: http::Version,
    pub status: u16,
    /// Response body bytes (`0` when unknown, e.g. streamed without a length).
    pub bytes: u64,
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
}

/// An open combined log.
pub struct CombinedLog {
    /// The file it writes.
    pub path: PathBuf,
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
}

impl CombinedLog {
    /// Opens (appends to) `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<CombinedLog, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("access_log: cannot create {}: {e}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("access_log: cannot open {}: {e}", path.display()))?;
        let (tx, rx) = sync_channel::<String>(8192);
        std::thread::Builder::new()
            .name("wraith-combined-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                while let Ok(line) = rx.recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Flush whenever the queue is drained, so tailers see lines promptly.
                    while let Ok(more) = rx.try_recv() {
                        let _ = out.write_all(more.as_bytes());
                    }
                    let _ = out.flush();
                }
            })
            .map_err(|e| format!("access_log: cannot start the writer: {e}"))?;
        Ok(CombinedLog {
            path: path.to_path_buf(),
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queues one line; never blocks.
    pub fn write(&self, e: &Entry<'_>) {
        let line = format_line(e, time::OffsetDateTime::now_utc());
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The line for `e` at `now` (UTC), newline included.
pub fn format_line(e: &Entry<'_>, now: time::OffsetDateTime) -> String {
    let mut s = String::with_capacity(160);
    let version = match e.version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    };
    let _ = write!(
        s,
        "{} - - [{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000] \"{} ",
        e.client,
        now.day(),
        MONTHS[usize::from(u8::from(now.month())) - 1],
        now.year(),
        now.hour(),
        now.minute(),
        now.second(),
        e.method
    );
    escape_into(&mut s, e.target.as_bytes());
    let _ = write!(s, " {version}\" {} {} \"", e.status, e.bytes);
    escape_opt(&mut s, e.referer);
    s.push_str("\" \"");
    escape_opt(&mut s, e.user_agent);
    s.push_str("\"\n");
    s
}

fn escape_opt(s: &mut String, v: Option<&[u8]>) {
    match v {
        Some(b) if !b.is_empty() => escape_into(s, b),
        _ => s.push('-'),
    }
}

/// nginx's escaping: `"`, `\`, control and non-ASCII bytes as `\xHH`.
fn escape_into(s: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(s, "\\x{b:02X}");
        } else {
            s.push(b as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_look_like_nginx() {
        let now = time::macros::datetime!(2026-11-05 07:08:09 UTC);
        let line = format_line(
            &Entry {
                client: "2001:db8::9".parse().unwrap(),
                method: "GET",
                target: "/a?b=\"c\"",
                version: http::Version::HTTP_2,
                status: 404,
                bytes: 37,
                referer: None,
                user_agent: Some(b"Mozilla/5.0 \"x\""),
            },
            now,
        );
        assert_eq!(
            line,
            "2001:db8::9 - - [05/Nov/2026:07:08:09 +0000] \"GET /a?b=\\x22c\\x22 HTTP/2.0\" 404 37 \"-\" \"Mozilla/5.0 \\x22x\\x22\"\n"
        );
    }
}
