//! `wraith wazuh-ar`: a Wazuh active-response script (called through the sh wrapper
//! `integrations/wazuh/active-response/wraith-ban`). It follows execd's line protocol:
//!
//! 1. read one JSON line on stdin (4.x `add`/`delete` or 5.x `enable`/`disable`);
//! 2. for add/enable: print `check_keys` with the address, read execd's one-line answer;
//!    `continue` -> ban, `abort` (the same key is already active) -> renew the ban's TTL;
//! 3. for delete/disable: lift the ban (stdout is not read);
//!
//! The ban goes through the admin socket with origin `wazuh:<executable>` (the AR's, as
//! execd names it), so a Wazuh delete never lifts a CrowdSec or operator decision on the
//! same address, nor the ban of another AR: execd keeps one timer per executable and address,
//! and two ARs with different timeouts send their deletes at different times. Every wait is bounded: execd blocks
//! on its scripts, so a stuck Wraith must not stick Wazuh. Exit 0 when done (or when the
//! alert carries no address), 1 when the input or Wraith failed.

use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::decisions::wazuh::{self, Command, Reply};

/// Options of `wraith wazuh-ar` (Wazuh passes none; the wrapper may).
#[derive(Debug, clap::Args)]
pub struct WazuhArgs {
    /// Admin socket of the running Wraith (default: the config's server.admin_socket).
    #[arg(long, env = "WRAITH_ADMIN_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Configuration file, read only to find the admin socket.
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "wraith.toml",
        env = "WRAITH_CONFIG"
    )]
    pub config: PathBuf,
    /// Hard timeout of each call to Wraith.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub timeout: String,
    /// How long to wait for execd's message and for its check_keys answer.
    #[arg(
        long,
        default_value = "5s",
        value_name = "DURATION",
        env = "WRAITH_AR_HANDSHAKE_TIMEOUT"
    )]
    pub handshake_timeout: String,
    /// Longest ban when the manager's extra_args give no --max-ttl (a safety net for
    /// deletes that never come, e.g. after an execd crash).
    #[arg(
        long,
        default_value = "24h",
        value_name = "DURATION",
        env = "WRAITH_AR_MAX_TTL"
    )]
    pub max_ttl: String,
    /// Also append log lines here (e.g. /var/ossec/logs/active-responses.log).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// The script name used in check_keys and logs, and in the bans' origin
    /// (`wazuh:<name>`) when execd's message names no program.
    #[arg(long, default_value = "wraith-ban")]
    pub name: String,
}

struct Log<'a> {
    file: Option<&'a Path>,
    name: &'a str,
}

impl Log<'_> {
    fn line(&self, msg: &str) {
        let now = time::OffsetDateTime::now_utc();
        let stamp = format!(
            "{:04}/{:02}/{:02} {:02}:{:02}:{:02}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        // The message carries the alert's text (the ban reason): escaped, it cannot act on the
        // terminal of whoever reads the log with `tail -f`, nor forge a line.
        let line = format!(
            "{stamp} {}: {}\n",
            super::printable(self.name),
            super::printable(msg)
        );
        eprint!("{line}");
        if let Some(path) = self.file {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }
}

pub fn run(args: WazuhArgs) -> ExitCode {
    let log = Log {
        file: args.log.as_deref(),
        name: &args.name,
    };
    match execute(&args, &log) {
        Ok(msg) => {
            log.line(&msg);
            ExitCode::SUCCESS
        }
        Err(e) => {
            log.line(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn duration(s: &str, what: &str) -> Result<Duration, String> {
    crate::config::units::parse_duration(s).map_err(|e| format!("--{what}: {e}"))
}

/// The longest line taken from execd: its messages carry one alert (Wazuh cuts a log line
/// at 64 KiB), far below this.
const MAX_LINE: u64 = 1 << 20;

/// Stdin lines, read on a thread so every wait can time out. The end of input, a line
/// longer than `MAX_LINE` and a line that is not UTF-8 arrive as errors that say so.
fn stdin_lines() -> mpsc::Receiver<Result<String, String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        loop {
            let mut line = Vec::new();
            let next = match std::io::Read::take(&mut lock, MAX_LINE).read_until(b'\n', &mut line) {
                Ok(0) => Err("stdin closed by execd".to_string()),
                Ok(n) if n as u64 == MAX_LINE && !line.ends_with(b"\n") => Err(format!(
                    "execd sent a line longer than {} KiB",
                    MAX_LINE >> 10
                )),
                Ok(_) => String::from_utf8(line)
                    .map_err(|_| "execd sent a line that is not UTF-8".to_string()),
                Err(e) => Err(format!("cannot read stdin: {e}")),
            };
            let last = next.is_err();
            if tx.send(next).is_err() || last {
                break;
            }
        }
    });
    rx
}

/// The next line from execd within `wait`.
fn next_line(
    lines: &mpsc::Receiver<Result<String, String>>,
    wait: Duration,
    what: &str,
) -> Result<String, String> {
    match lines.recv_timeout(wait) {
        Ok(Ok(line)) => Ok(line),
        Ok(Err(e)) => Err(format!("{e} before {what}")),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("{what} did not come within {wait:?}")),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!("stdin ended before {what}")),
    }
}

fn execute(args: &WazuhArgs, log: &Log<'_>) -> Result<String, String> {
    let call_timeout = duration(&args.timeout, "timeout")?;
    let wait = duration(&args.handshake_timeout, "handshake-timeout")?;
    let default_ttl = duration(&args.max_ttl, "max-ttl")?;
    let lines = stdin_lines();
    let input = next_line(&lines, wait, "a message from execd on stdin")?;
    let msg = wazuh::parse(&input)?;
    let Some(ip) = msg.ip else {
        return Ok(format!(
            "{:?} without a valid source address in the alert; nothing to do",
            msg.command
        ));
    };
    let origin = wazuh::origin(msg.program.as_deref(), &args.name);
    let socket = match &args.socket {
        Some(s) => s.clone(),
        None => super::server_paths(&args.config)?.admin_socket.ok_or(
            "no admin socket: pass --socket, set WRAITH_ADMIN_SOCKET, or set server.admin_socket",
        )?,
    };
    match msg.command {
        Command::Add => {
            // A stateless AR gets no check_keys answer from execd: no reason to wait for one.
            let renew = if msg.stateless {
                false
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(wazuh::check_keys_line(&args.name, ip).as_bytes())
                    .and_then(|_| out.flush())
                    .map_err(|e| format!("cannot write check_keys to execd: {e}"))?;
                drop(out);
                match next_line(&lines, wait, "an answer from execd to check_keys") {
                    Ok(line) => match wazuh::parse_reply(&line)? {
                        Reply::Continue => false,
                        // execd already holds this key and reset its timer: renew ours too.
                        Reply::Abort => true,
                    },
                    Err(e) => {
                        log.line(&format!(
                            "{e} (stateless response?); banning {ip} with the max TTL"
                        ));
                        false
                    }
                }
            };
            let cap = wazuh::max_ttl(&msg.extra_args)?.unwrap_or(default_ttl);
            let ttl = msg.stateful_timeout.map_or(cap, |t| t.min(cap));
            // Within what the admin API accepts, so a long rule description or a generous
            // max TTL never costs the ban itself.
            let ttl = ttl.clamp(Duration::from_secs(1), MAX_BAN);
            let mut reason = match &msg.rule {
                Some((id, desc)) if !desc.is_empty() => format!("wazuh rule {id}: {desc}"),
                Some((id, _)) => format!("wazuh rule {id}"),
                None => "wazuh active response".into(),
            };
            truncate_at_char(&mut reason, MAX_REASON);
            ban(&socket, ip, ttl, &origin, &reason, call_timeout)?;
            Ok(format!(
                "{} {origin} ban on {ip} for {}s ({reason})",
                if renew { "renewed" } else { "added" },
                ttl.as_secs()
            ))
        }
        Command::Delete => unban(&socket, ip, &origin, call_timeout),
    }
}

/// The longest ban and reason the admin API accepts (src/admin_decisions.rs).
const MAX_BAN: Duration = Duration::from_secs(366 * 86_400);
const MAX_REASON: usize = 1024;

/// Cuts `s` to at most `max` bytes, on a character boundary, marking the cut with `…`.
fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    timeout: Duration,
) -> Result<(http::StatusCode, serde_json::Value), String> {
    super::block_on(crate::admin::call_with_body(
        socket,
        method,
        path,
        body.as_ref(),
        timeout,
    ))?
}

fn ban(
    socket: &Path,
    ip: IpAddr,
    ttl: Duration,
    origin: &str,
    reason: &str,
    timeout: Duration,
) -> Result<(), String> {
    let body = json!({
        "ip": ip.to_string(),
        "type": "ban",
        "duration": format!("{}s", ttl.as_secs()),
        "origin": origin,
        "reason": reason,
    });
    let (status, v) = call(socket, Method::POST, "/v1/decisions", Some(body), timeout)?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("wraith refused the ban ({status}): {}", v["error"]))
    }
}

/// Lifts this AR's ban only (`origin` has a `:`, so the filter is exact, not the family).
fn unban(socket: &Path, ip: IpAddr, origin: &str, timeout: Duration) -> Result<String, String> {
    let path = format!("/v1/decisions/{ip}?origin={origin}&type=ban");
    let (status, v) = call(socket, Method::DELETE, &path, None, timeout)?;
    match status.as_u16() {
        200 => Ok(format!("lifted the {origin} ban on {ip}")),
        404 => Ok(format!("no {origin} ban on {ip} to lift")),
        _ => Err(format!(
            "wraith refused the delete ({status}): {}",
            v["error"]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let mut short = "wazuh rule 5710: sshd".to_string();
        truncate_at_char(&mut short, MAX_REASON);
        assert_eq!(short, "wazuh rule 5710: sshd");
        let mut long = format!("wazuh rule 1: {}", "é".repeat(2000));
        truncate_at_char(&mut long, MAX_REASON);
        assert!(long.len() <= MAX_REASON);
        assert!(long.ends_with('…'));
    }
}
