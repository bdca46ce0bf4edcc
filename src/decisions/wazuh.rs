//! Wazuh active-response messages, as `wazuh-execd` writes them on a script's stdin, and the
//! `check_keys` handshake it expects back. Two shapes are accepted:
//!
//! - 4.x: `{"version":1,"origin":{...},"command":"add"|"delete","parameters":{"extra_args":
//!   [...],"alert":{..."data":{"srcip":...}},"program":...}}`
//! - 5.x: the alert at the root with `"command":"enable"|"disable"`, the address in
//!   `source.ip` and AR metadata in `wazuh.active_response`.
//!
//! Each AR bans under an origin of its own, `wazuh:<executable>` (see `origin`).
//!
//! The address is taken from `parameters.alert.data.win.eventdata.ipAddress`, then
//! `parameters.alert.data.srcip` (4.x), or `source.ip` (5.x). Wazuh's own helper also looks
//! at `destinationIp`; a gateway has no business banning a destination, so Wraith does not.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{json, Value};

/// Ban or lift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 4.x `add`, 5.x `enable`.
    Add,
    /// 4.x `delete`, 5.x `disable`.
    Delete,
}

/// Which Wazuh generation wrote the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    V4,
    V5,
}

/// A parsed active-response message.
#[derive(Debug, Clone)]
pub struct Message {
    pub generation: Generation,
    pub command: Command,
    /// The address to act on; `None` when the alert carries no valid one.
    pub ip: Option<IpAddr>,
    /// `parameters.extra_args` (from the manager's `<extra_args>`).
    pub extra_args: Vec<String>,
    /// 5.x stateful ARs: how long execd keeps the block before `disable`.
    pub stateful_timeout: Option<Duration>,
    /// A 5.x message that says its AR is stateless: execd answers no `check_keys` for it.
    pub stateless: bool,
    /// Rule id and description, for the ban's reason.
    pub rule: Option<(String, String)>,
    /// The AR's executable as execd names it (4.x `parameters.program`, 5.x
    /// `wazuh.active_response.executable`, else its `name`), without its directory: execd
    /// keeps one timer per executable and address, so each one holds a ban of its own.
    pub program: Option<String>,
}

fn ip_at(v: &Value, path: &[&str]) -> Option<IpAddr> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()?.trim().parse().ok()
}

/// Parses one line from execd.
pub fn parse(line: &str) -> Result<Message, String> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("active-response input is not JSON: {e}"))?;
    let command = v
        .get("command")
        .and_then(Value::as_str)
        .ok_or("active-response input has no \"command\" string")?;
    let (generation, command) = match command {
        "add" => (Generation::V4, Command::Add),
        "delete" => (Generation::V4, Command::Delete),
        "enable" => (Generation::V5, Command::Add),
        "disable" => (Generation::V5, Command::Delete),
        other => {
            return Err(format!(
            "unknown active-response command {other:?} (expected add, delete, enable or disable)"
        ))
        }
    };
    let extra_args = v
        .pointer("/parameters/extra_args")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .flat_map(str::split_whitespace)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let msg = match generation {
        Generation::V4 => {
            let alert = v
                .pointer("/parameters/alert")
                .ok_or("Wazuh 4.x message without parameters.alert")?;
            let ip = ip_at(alert, &["data", "win", "eventdata", "ipAddress"])
                .or_else(|| ip_at(alert, &["data", "srcip"]));
            Message {
                generation,
                command,
                ip,
                extra_args,
                stateful_timeout: None,
                stateless: false,
                rule: rule_of(alert),
                program: basename(v.pointer("/parameters/program")),
            }
        }
        Generation::V5 => {
            let wazuh = v
                .get("wazuh")
                .filter(|w| w.is_object())
                .ok_or("Wazuh 5.x message without a \"wazuh\" object")?;
            let ar = wazuh.get("active_response");
            let kind = ar.and_then(|a| a.get("type")).and_then(Value::as_str);
            let stateful = kind == Some("stateful");
            let stateful_timeout = ar
                .and_then(|a| a.get("stateful_timeout"))
                .and_then(|t| t.as_u64().or_else(|| t.as_str()?.parse().ok()))
                .filter(|_| stateful)
                .map(Duration::from_secs);
            Message {
                generation,
                command,
                ip: ip_at(&v, &["source", "ip"]),
                extra_args,
                stateful_timeout,
                stateless: kind == Some("stateless"),
                rule: rule_of(&v),
                program: basename(ar.and_then(|a| a.get("executable")))
                    .or_else(|| basename(ar.and_then(|a| a.get("name")))),
            }
        }
    };
    Ok(msg)
}

/// `active-response/bin/wraith-ban` -> `wraith-ban` (`None` for anything but a name).
fn basename(v: Option<&Value>) -> Option<String> {
    let path = v?.as_str()?.trim();
    let name = path.rsplit(['/', '\\']).next()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The origin of the bans one AR makes: `wazuh:<program>` (`fallback`, the script's
/// `--name`, when the message names none). Distinct per AR, as execd's timers are, so one
/// AR's delete never lifts the ban another still holds; `wazuh` and a `:` keep it in the
/// `wazuh` family for filters and metrics. Cut to a valid origin (at most 64 bytes of
/// letters, digits, `-_.:`; anything else becomes `_`).
pub fn origin(program: Option<&str>, fallback: &str) -> String {
    let name = program.filter(|p| !p.is_empty()).unwrap_or(fallback);
    let mut origin = String::from("wazuh:");
    for c in name.chars().take(64 - origin.len()) {
        let ok = c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
        origin.push(if ok { c } else { '_' });
    }
    origin
}

fn rule_of(alert: &Value) -> Option<(String, String)> {
    let rule = alert.get("rule")?;
    let id = match rule.get("id")? {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let desc = rule
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some((id, desc))
}

/// `--max-ttl 86400`, `--max-ttl=24h` in extra_args: the longest a Wazuh ban may live (a
/// safety net for deletes execd never sends, e.g. after a crash). Seconds or a duration.
pub fn max_ttl(extra_args: &[String]) -> Result<Option<Duration>, String> {
    let mut it = extra_args.iter();
    while let Some(a) = it.next() {
        let value = if let Some(v) = a.strip_prefix("--max-ttl=") {
            v.to_string()
        } else if a == "--max-ttl" {
            it.next()
                .cloned()
                .ok_or("--max-ttl in extra_args needs a value")?
        } else {
            continue;
        };
        return parse_ttl(&value).map(Some);
    }
    Ok(None)
}

/// Seconds (`86400`) or a duration (`24h`).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    crate::config::units::parse_duration(s).map_err(|e| format!("invalid --max-ttl {s:?}: {e}"))
}

/// The line a stateful script prints after reading the message: execd answers it with the
/// same message whose command is `continue` (act) or `abort` (already active).
pub fn check_keys_line(script: &str, ip: IpAddr) -> String {
    let v = json!({
        "version": 1,
        "origin": {"name": script, "module": "active-response"},
        "command": "check_keys",
        "parameters": {"keys": [ip.to_string()]},
    });
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// execd's answer to `check_keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Continue,
    Abort,
}

/// Parses execd's answer.
pub fn parse_reply(line: &str) -> Result<Reply, String> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("execd's answer is not JSON: {e}"))?;
    match v.get("command").and_then(Value::as_str) {
        Some("continue") => Ok(Reply::Continue),
        Some("abort") => Ok(Reply::Abort),
        other => Err(format!(
            "execd answered {other:?} (expected \"continue\" or \"abort\")"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4_ADD: &str = r#"{"version":1,"origin":{"name":"","module":"wazuh-execd"},"command":"add","parameters":{"extra_args":["--max-ttl","3600"],"alert":{"timestamp":"2024-05-01T10:00:00.000+0000","rule":{"level":10,"description":"Wraith: repeated auth failures from 198.51.100.7","id":"100202","firedtimes":1,"groups":["wraith"]},"agent":{"id":"000","name":"gw"},"manager":{"name":"gw"},"id":"1714557600.1","decoder":{"name":"json"},"data":{"srcip":"198.51.100.7"},"location":"/var/log/wraith/events.json"},"program":"active-response/bin/wraith-ban"}}"#;

    #[test]
    fn wazuh_4_messages() {
        let m = parse(V4_ADD).unwrap();
        assert_eq!(m.generation, Generation::V4);
        assert_eq!(m.command, Command::Add);
        assert_eq!(m.ip, Some("198.51.100.7".parse().unwrap()));
        assert_eq!(
            max_ttl(&m.extra_args).unwrap(),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(m.rule.as_ref().unwrap().0, "100202");
        assert_eq!(m.program.as_deref(), Some("wraith-ban"));
        let del = V4_ADD.replace("\"command\":\"add\"", "\"command\":\"delete\"");
        assert_eq!(parse(&del).unwrap().command, Command::Delete);
        // Windows events carry the address elsewhere.
        let win = r#"{"version":1,"command":"add","parameters":{"alert":{"data":{"win":{"eventdata":{"ipAddress":"2001:db8::7"}}}}}}"#;
        assert_eq!(parse(win).unwrap().ip, Some("2001:db8::7".parse().unwrap()));
        // No address (or a bad one): parsed, but nothing to act on.
        let none = r#"{"version":1,"command":"add","parameters":{"alert":{"data":{"srcip":"999.1.1.1"}}}}"#;
        assert_eq!(parse(none).unwrap().ip, None);
    }

    #[test]
    fn wazuh_5_messages() {
        let v5 = r#"{"command":"enable","@timestamp":"2025-01-01T00:00:00Z","source":{"ip":"203.0.113.5"},"user":{"name":"x"},"rule":{"id":"100202","description":"d"},"wazuh":{"active_response":{"name":"wraith-ban","executable":"wraith-ban","location":"local","type":"stateful","stateful_timeout":600}}}"#;
        let m = parse(v5).unwrap();
        assert_eq!(m.generation, Generation::V5);
        assert_eq!(m.command, Command::Add);
        assert_eq!(m.ip, Some("203.0.113.5".parse().unwrap()));
        assert_eq!(m.stateful_timeout, Some(Duration::from_secs(600)));
        assert_eq!(m.program.as_deref(), Some("wraith-ban"));
        let off = v5.replace("enable", "disable");
        assert_eq!(parse(&off).unwrap().command, Command::Delete);
        // 5.x requires the wazuh object.
        assert!(parse(r#"{"command":"enable","source":{"ip":"203.0.113.5"}}"#).is_err());
    }

    #[test]
    fn each_ar_bans_under_an_origin_of_its_own() {
        assert_eq!(origin(Some("wraith-ban"), "x"), "wazuh:wraith-ban");
        assert_eq!(origin(Some("wraith-ban-24h"), "x"), "wazuh:wraith-ban-24h");
        assert_eq!(origin(None, "wraith-ban"), "wazuh:wraith-ban");
        assert_eq!(origin(Some(""), "wraith-ban"), "wazuh:wraith-ban");
        assert_eq!(origin(Some("my ban!"), "x"), "wazuh:my_ban_");
        let long = origin(Some(&"é".repeat(100)), "x");
        assert_eq!(long.len(), 64);
        assert!(crate::decisions::valid_kind(&long));
        let win = r#"{"version":1,"command":"delete","parameters":{"alert":{},"program":"active-response\\bin\\wraith-ban.cmd"}}"#;
        assert_eq!(
            parse(win).unwrap().program.as_deref(),
            Some("wraith-ban.cmd")
        );
        let none = r#"{"version":1,"command":"delete","parameters":{"alert":{},"program":5}}"#;
        assert_eq!(parse(none).unwrap().program, None);
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(parse("not json").is_err());
        assert!(parse(r#"{"version":1}"#).is_err());
        assert!(parse(r#"{"command":"reboot"}"#).is_err());
    }

    #[test]
    fn handshake_lines() {
        let line = check_keys_line("wraith-ban", "2001:db8::1".parse().unwrap());
        assert!(line.ends_with('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["command"], "check_keys");
        assert_eq!(v["parameters"]["keys"][0], "2001:db8::1");
        assert_eq!(v["origin"]["module"], "active-response");
        let cont = line.replace("check_keys", "continue");
        assert_eq!(parse_reply(&cont).unwrap(), Reply::Continue);
        assert_eq!(
            parse_reply(&line.replace("check_keys", "abort")).unwrap(),
            Reply::Abort
        );
        assert!(parse_reply("").is_err());
    }

    #[test]
    fn ttl_forms() {
        let args = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            max_ttl(&args(&["--max-ttl=24h"])).unwrap(),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            max_ttl(&args(&["-x", "--max-ttl", "60"])).unwrap(),
            Some(Duration::from_secs(60))
        );
        assert_eq!(max_ttl(&args(&[])).unwrap(), None);
        assert!(max_ttl(&args(&["--max-ttl"])).is_err());
        assert!(max_ttl(&args(&["--max-ttl", "forever"])).is_err());
    }
}
