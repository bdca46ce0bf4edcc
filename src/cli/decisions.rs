//! `wraith decisions list|add|delete`: the admin API's decisions endpoints from a shell.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use http::Method;
use serde_json::{json, Value};

#[derive(Debug, Subcommand)]
pub enum DecisionsCommand {
    /// Show live decisions (local and CrowdSec).
    List {
        /// Only decisions that cover this address.
        #[arg(long)]
        ip: Option<String>,
        /// Only this origin (admin, wazuh, crowdsec, cscli, CAPI, ...); one without a ':'
        /// also selects its family (wazuh: every wazuh:<active response>).
        #[arg(long)]
        origin: Option<String>,
        /// Only local or only CrowdSec decisions.
        #[arg(long, value_parser = ["local", "crowdsec"])]
        source: Option<String>,
        /// Show at most this many (0: all; default 1000 in the table, all with --json).
        /// The total is always given.
        #[arg(long)]
        limit: Option<usize>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add (or renew) a local decision.
    Add {
        /// An address, e.g. 192.0.2.7 or 2001:db8::7.
        #[arg(long, conflicts_with = "range", required_unless_present = "range")]
        ip: Option<String>,
        /// A CIDR range, e.g. 192.0.2.0/24.
        #[arg(long)]
        range: Option<String>,
        /// Decision type.
        #[arg(long = "type", default_value = "ban")]
        kind: String,
        /// How long it lasts (90s, 30m, 4h, 7d).
        #[arg(long, default_value = "4h")]
        duration: String,
        /// Why (shown by list and in logs).
        #[arg(long, default_value = "")]
        reason: String,
        /// Who decided.
        #[arg(long, default_value = "admin")]
        origin: String,
    },
    /// Lift local decisions on an address or range.
    Delete {
        /// The address.
        #[arg(long, conflicts_with = "range", required_unless_present = "range")]
        ip: Option<String>,
        /// The range.
        #[arg(long)]
        range: Option<String>,
        /// Only decisions of this origin.
        #[arg(long)]
        origin: Option<String>,
        /// Only decisions of this type.
        #[arg(long = "type")]
        kind: Option<String>,
    },
}

pub fn run(config_path: &Path, command: DecisionsCommand) -> ExitCode {
    let socket = match super::server_paths(config_path).and_then(|s| {
        s.admin_socket
            .ok_or_else(|| "the configuration has no server.admin_socket".to_string())
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wraith decisions: {e}");
            return ExitCode::FAILURE;
        }
    };
    match execute(&socket, command) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wraith decisions: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How many decisions the table shows when `--limit` is not given.
const TABLE_LIMIT: usize = 1000;

/// The `limit` query value for `list`: a script reading `--json` gets everything unless it
/// asks for less; a person reading the table, the first `TABLE_LIMIT`. 0 means all.
fn limit_param(limit: Option<usize>, json: bool) -> Option<String> {
    limit
        .or((!json).then_some(TABLE_LIMIT))
        .filter(|&n| n > 0)
        .map(|n| n.to_string())
}

/// `a=b&c=d` with percent-encoding of what needs it.
fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.:".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn call(socket: &Path, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
    let (status, v) = super::block_on(crate::admin::call_with_body(
        socket,
        method,
        path,
        body.as_ref(),
        Duration::from_secs(10),
    ))??;
    if !status.is_success() {
        return Err(v["error"]
            .as_str()
            .map_or_else(|| format!("{status}: {v}"), String::from));
    }
    Ok(v)
}

fn execute(socket: &Path, command: DecisionsCommand) -> Result<String, String> {
    match command {
        DecisionsCommand::List {
            ip,
            origin,
            source,
            limit,
            json,
        } => {
            let limit = limit_param(limit, json);
            let path = format!(
                "/v1/decisions{}",
                query(&[
                    ("ip", &ip),
                    ("origin", &origin),
                    ("source", &source),
                    ("limit", &limit)
                ])
            );
            let v = call(socket, Method::GET, &path, None)?;
            if json {
                let text = serde_json::to_string_pretty(&v).unwrap_or_default();
                return Ok(format!("{}\n", super::json_printable(&text)));
            }
            Ok(render(&v))
        }
        DecisionsCommand::Add {
            ip,
            range,
            kind,
            duration,
            reason,
            origin,
        } => {
            let mut body = json!({"type": kind, "duration": duration, "origin": origin});
            if !reason.is_empty() {
                body["reason"] = json!(reason);
            }
            match (ip, range) {
                (Some(ip), _) => body["ip"] = json!(ip),
                (None, Some(r)) => body["cidr"] = json!(r),
                (None, None) => return Err("give --ip or --range".into()),
            }
            let v = call(socket, Method::POST, "/v1/decisions", Some(body))?;
            let d = &v["decision"];
            let mut out = format!(
                "added {} {} on {} for {}s (until {})\n",
                s(&d["origin"]),
                s(&d["type"]),
                s(&d["value"]),
                d["expires_in_secs"],
                s(&d["until"])
            );
            if let Some(w) = v["warning"].as_str() {
                out.push_str(&format!("warning: {w}\n"));
            }
            Ok(out)
        }
        DecisionsCommand::Delete {
            ip,
            range,
            origin,
            kind,
        } => {
            let value = ip.or(range).ok_or("give --ip or --range")?;
            let path = format!(
                "/v1/decisions{}",
                query(&[
                    ("value", &Some(value)),
                    ("origin", &origin),
                    ("type", &kind)
                ])
            );
            let v = call(socket, Method::DELETE, &path, None)?;
            Ok(format!("deleted {} decision(s)\n", v["deleted"]))
        }
    }
}

fn s(v: &Value) -> String {
    v.as_str()
        .map_or_else(|| v.to_string(), |t| super::printable(t).into_owned())
}

/// The list as a table.
fn render(v: &Value) -> String {
    let mut out = String::from(
        "SOURCE    ORIGIN        TYPE      VALUE                        EXPIRES IN  REASON\n",
    );
    for d in v["decisions"].as_array().into_iter().flatten() {
        let secs = d["expires_in_secs"].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "{:<9} {:<13} {:<9} {:<28} {:<11} {}\n",
            s(&d["source"]),
            s(&d["origin"]),
            s(&d["type"]),
            s(&d["value"]),
            crate::config::units::format_duration(Duration::from_secs(secs)),
            s(&d["reason"]),
        ));
    }
    let shown = v["decisions"].as_array().map_or(0, Vec::len);
    if v["truncated"] == true {
        out.push_str(&format!(
            "{shown} of {} decision(s) shown (--limit, or narrow with --ip, --origin, --source)\n",
            v["count"]
        ));
    } else {
        out.push_str(&format!("{} decision(s)\n", v["count"]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lists_everything_unless_a_limit_is_given() {
        assert_eq!(limit_param(None, true), None);
        assert_eq!(limit_param(None, false), Some("1000".into()));
        assert_eq!(limit_param(Some(5), true), Some("5".into()));
        assert_eq!(limit_param(Some(0), false), None);
    }
}
