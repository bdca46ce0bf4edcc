//! `wraith status`: what the running server says about itself.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use http::Method;
use serde_json::Value;

pub fn run(config_path: &Path, json: bool) -> ExitCode {
    let result = super::server_paths(config_path).and_then(|server| {
        let socket = server
            .admin_socket
            .ok_or("the configuration has no server.admin_socket")?;
        super::block_on(crate::admin::call(
            &socket,
            Method::GET,
            "/v1/status",
            Duration::from_secs(5),
        ))?
    });
    match result {
        Ok((_, v)) if json => {
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            println!("{}", super::json_printable(&text));
            ExitCode::SUCCESS
        }
        Ok((_, v)) => {
            print!("{}", render(&v));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wraith status: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The status document as an operator reads it.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| {
        v.as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string())
    };
    out.push_str(&format!(
        "wraith {} ({}), pid {}, up {}\n",
        s(&v["version"]),
        s(&v["git_revision"]),
        v["pid"],
        human(v["uptime_secs"].as_u64().unwrap_or(0))
    ));
    out.push_str(&format!(
        "config       {} (generation {})\n",
        s(&v["config_file"]),
        v["generation"]
    ));
    let age = v["loaded_at"].as_u64().map(|t| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        human(now.saturating_sub(t))
    });
    out.push_str(&format!("loaded       {} ago\n", age.unwrap_or_default()));
    match &v["last_reload"] {
        Value::Null => out.push_str("last reload  none\n"),
        lr if lr["ok"].as_bool() == Some(true) => out.push_str("last reload  ok\n"),
        lr => {
            out.push_str("last reload  FAILED (still serving the previous configuration):\n");
            for e in lr["errors"].as_array().into_iter().flatten() {
                out.push_str(&format!("               {}\n", s(e)));
            }
        }
    }
    if v["draining"].as_bool() == Some(true) {
        out.push_str("state        draining\n");
    }
    let d = &v["decisions"];
    if d.is_object() {
        out.push_str(&format!(
            "decisions    {} local, {} from CrowdSec{}\n",
            d["local"],
            d["crowdsec"],
            if d["refusing_all"].as_bool() == Some(true) {
                " (REFUSING ALL REQUESTS: CrowdSec data is stale and on_error = \"closed\")"
            } else {
                ""
            }
        ));
        let b = &d["crowdsec_bridge"];
        if b.is_object() {
            let last = match b["last_success"].as_u64() {
                Some(t) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    format!("last pull {} ago", human(now.saturating_sub(t)))
                }
                None => "no successful pull yet".into(),
            };
            out.push_str(&format!("crowdsec     {} ({last})\n", s(&b["lapi_url"])));
            if let Some(e) = b["last_error"].as_str() {
                out.push_str(&format!("             last error: {e}\n"));
            }
        }
    }
    if let Some(r) = v["rate_limit_redis"].as_object() {
        let state = match (r["on_fallback"].as_bool(), &r["last_error"]) {
            (Some(true), e) => format!("failing, shared limits on on_error for now ({})", s(e)),
            (_, serde_json::Value::String(e)) => format!("in use (last error: {e})"),
            _ => "in use".to_string(),
        };
        out.push_str(&format!(
            "redis        {} {state}, {} failures\n",
            s(&r["url"]),
            r["failures"]
        ));
    }
    for l in v["rate_limits"].as_array().into_iter().flatten() {
        if l["shared"] == true {
            out.push_str(&format!(
                "rate limit   {} (by {}): shared in Redis\n",
                s(&l["name"]),
                s(&l["key"]),
            ));
            continue;
        }
        out.push_str(&format!(
            "rate limit   {} (by {}): {} keys\n",
            s(&l["name"]),
            s(&l["key"]),
            l["keys"]
        ));
    }
    out.push_str("\nLISTENER         PROTOCOL  ADDRESS                  CONNECTIONS\n");
    for l in v["listeners"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:<9} {:<24} {}\n",
            s(&l["name"]),
            s(&l["protocol"]),
            l["bound"]
                .as_str()
                .unwrap_or_else(|| l["address"].as_str().unwrap_or("-")),
            l["active_connections"]
        ));
        let o = &l["ocsp"];
        if o.is_object() {
            let until = o["valid_until"].as_i64().unwrap_or_default();
            let next = match o["next_update"].as_i64() {
                Some(t) if t <= until => {
                    format!("next update {}", crate::listener::ocsp::rfc3339(t))
                }
                Some(t) => format!(
                    "next update {} (stapled until {}: ten days after its this update)",
                    crate::listener::ocsp::rfc3339(t),
                    crate::listener::ocsp::rfc3339(until)
                ),
                None => format!(
                    "no next update (stapled until {})",
                    crate::listener::ocsp::rfc3339(until)
                ),
            };
            let state = if o["stapled"] == true {
                "stapled"
            } else {
                "NOT stapled (not current)"
            };
            out.push_str(&format!(
                "  ocsp staple {} {state}, {next}\n",
                s(&o["file"])
            ));
        }
    }
    for u in v["upstreams"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\nUPSTREAM {} ({}, {}, health checks {}, {} waiting)\n",
            s(&u["name"]),
            s(&u["protocol"]),
            s(&u["algorithm"]),
            if u["active_checks"].as_bool() == Some(true) {
                "on"
            } else {
                "off"
            },
            u["pending"]
        ));
        out.push_str(
            "  ENDPOINT                       HEALTH       WEIGHT  IN-FLIGHT  REQUESTS  CONNECT-FAILURES  LAST CHECK\n",
        );
        for e in u["endpoints"].as_array().into_iter().flatten() {
            let mut health = s(&e["health"]);
            if let Some(ms) = e["ejected_for_ms"].as_u64().filter(|ms| *ms > 0) {
                health = format!("{health} {}s", ms.div_ceil(1000));
            }
            let check = match &e["last_check"] {
                Value::Null => "-".to_string(),
                c if c["ok"].as_bool() == Some(true) => format!("ok {}", c["status"]),
                c => format!("FAILED: {}", s(&c["error"])),
            };
            out.push_str(&format!(
                "  {:<30} {:<12} {:<7} {:<10} {:<9} {:<17} {}\n",
                s(&e["address"]),
                health,
                e["weight"].to_string(),
                e["in_flight"].to_string(),
                e["requests"].to_string(),
                e["connect_failures"].to_string(),
                check
            ));
        }
    }
    let t = &v["traffic"];
    if t.is_object() {
        out.push_str(&format!(
            "\nTRAFFIC (last {}s)\n  requests     {} ({}/s)\n  errors       {} 5xx ({}/s, {:.2}%), {} 4xx, {} denied\n  latency      p50 {}  p99 {}\n",
            t["window_secs"],
            t["requests"],
            t["requests_per_sec"],
            t["server_errors"],
            t["errors_per_sec"],
            t["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            t["client_errors"],
            t["denied"],
            millis(&t["p50_ms"]),
            millis(&t["p99_ms"]),
        ));
        // The most denied clients, five of each (`wraith top` shows ten).
        let most = |list: &Value| {
            listing(
                list.as_array()
                    .into_iter()
                    .flatten()
                    .take(5)
                    // Each name escaped on its own: a line break in a certificate's name would
                    // survive `printable_lines` below and forge a line.
                    .map(|e| {
                        let name = super::printable(e["name"].as_str().unwrap_or("?"));
                        format!("{name} ({})", e["count"])
                    }),
            )
        };
        out.push_str(&format!(
            "  denied IPs   {}\n  denied ids   {}\n",
            most(&t["top_denied_ips"]),
            most(&t["top_denied_identities"]),
        ));
    }
    let d = &v["bans"];
    if d.is_object() {
        let by = |m: &Value| {
            listing(
                m.as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, n)| format!("{k} {n}")),
            )
        };
        out.push_str(&format!(
            "\nBANS BY ORIGIN\n  active       {}\n  refused      {}\n",
            by(&d["active_by_origin"]),
            by(&d["refused_by_origin"])
        ));
    }
    let sinks = v["log_sinks"]
        .as_array()
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    if !sinks.is_empty() {
        out.push_str("\nLOG SINK   QUEUED   WRITTEN   DROPPED\n");
        for k in sinks {
            out.push_str(&format!(
                "{:<10} {:<8} {:<9} {}\n",
                s(&k["sink"]),
                k["queued"].to_string(),
                k["written"].to_string(),
                k["dropped"]
            ));
        }
    }
    super::printable_lines(&out).into_owned()
}

/// A latency in milliseconds, with more digits below 1 ms.
pub(crate) fn millis(v: &Value) -> String {
    match v.as_f64() {
        None => "-".to_string(),
        Some(x) if x < 1.0 => format!("{x:.2}ms"),
        Some(x) => format!("{x:.1}ms"),
    }
}

fn human(secs: u64) -> String {
    crate::config::units::format_duration(Duration::from_secs(secs))
}

/// Items joined with commas, or `none`.
fn listing(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names of denied clients are certificate text: a line break in one cannot forge a line,
    /// and escape sequences reach the terminal escaped.
    #[test]
    fn denied_names_cannot_forge_lines_or_reach_the_terminal() {
        let v = serde_json::json!({
            "traffic": {
                "window_secs": 60,
                "top_denied_identities": [{"name": "CN\u{1b}[31mX\nFAKE line\u{9b}\u{202e}", "count": 2}],
                "top_denied_ips": [],
            }
        });
        let text = render(&v);
        let line = text
            .lines()
            .find(|l| l.contains("denied ids"))
            .expect("a denied ids line");
        assert!(
            line.contains(r"CN\u{1b}[31mX\u{a}FAKE line\u{9b}\u{202e} (2)"),
            "{line}"
        );
        assert!(!text.lines().any(|l| l.starts_with("FAKE")), "{text}");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{9b}'),
            "{text}"
        );
    }
}
