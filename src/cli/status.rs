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
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
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
    }
    out.push_str(
        "\nUPSTREAM         ENDPOINT                 IN-FLIGHT  REQUESTS  CONNECT-FAILURES\n",
    );
    for u in v["upstreams"].as_array().into_iter().flatten() {
        for e in u["endpoints"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{:<16} {:<24} {:<10} {:<9} {}\n",
                s(&u["name"]),
                s(&e["address"]),
                e["in_flight"].to_string(),
                e["requests"].to_string(),
                e["connect_failures"]
            ));
        }
    }
    out
}

fn human(secs: u64) -> String {
    crate::config::units::format_duration(Duration::from_secs(secs))
}
