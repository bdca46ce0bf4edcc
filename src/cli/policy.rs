//! `wraith policy schema` and `wraith policy explain`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, LoadOptions};
use crate::policy::cases::{identity_from_pem, parse_ip, parse_method, parse_url};
use crate::policy::entities::parse_time;
use crate::policy::{PolicyEngine, Probe, SCHEMA};
use crate::router::Router;

/// Prints Wraith's Cedar schema.
pub fn schema() -> ExitCode {
    print!("{SCHEMA}");
    ExitCode::SUCCESS
}

/// What `explain` was asked.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Client certificate (PEM); without it the client is anonymous.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<std::path::PathBuf>,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// The request URL, e.g. https://api.internal/orders/17
    #[arg(long)]
    pub url: String,
    /// Client IP address.
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// Request time, RFC 3339 (default: now).
    #[arg(long)]
    pub time: Option<String>,
    /// Protocol: h1, h2 or h3 (default: h2 for https, h1 for http).
    #[arg(long)]
    pub protocol: Option<String>,
    /// The request arrived as TLS 0-RTT early data.
    #[arg(long)]
    pub early_data: bool,
}

/// Decides a described request with the configured policies and shows why.
pub fn explain(config_path: &Path, args: &ExplainArgs) -> ExitCode {
    match run_explain(config_path, args) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wraith: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_explain(config_path: &Path, args: &ExplainArgs) -> Result<String, String> {
    let config = config::load(config_path, LoadOptions::default())
        .map_err(|e| format!("configuration {} is invalid:\n{e}", config_path.display()))?;
    let engine = PolicyEngine::build(&config)?;
    let router = router_of(&config);
    let method = parse_method(&args.method)?;
    let (https, host, path, query) = parse_url(&args.url)?;
    let identity = args.cert.as_deref().map(identity_from_pem).transpose()?;
    let source_ip = parse_ip(&args.ip)?;
    let time = match &args.time {
        Some(t) => parse_time(t)?,
        None => std::time::SystemTime::now(),
    };
    let protocol = match args.protocol.as_deref() {
        None if https => "h2",
        None | Some("h1") => "h1",
        Some("h2") => "h2",
        Some("h3") => "h3",
        Some(other) => return Err(format!("--protocol {other:?}: use h1, h2 or h3")),
    };
    let route = router
        .find(Some(&host), &path, &method)
        .ok_or_else(|| format!("no route matches {method} {}", args.url))?;
    let listener = config
        .listeners
        .iter()
        .find(|l| l.tls.is_some() == https)
        .map_or_else(String::new, |l| l.name.to_string());
    let x = engine.probe(&Probe {
        route: route.index,
        identity: identity.as_ref(),
        method: method.clone(),
        host: &host,
        path: &path,
        query: &query,
        source_ip,
        listener: &listener,
        protocol,
        tls_version: if https { "TLSv1.3" } else { "" },
        tls_group: if https { "X25519MLKEM768" } else { "" },
        early_data: args.early_data,
        time,
    })?;

    let d = &x.decision;
    let mut out = String::new();
    let effect = match d.effect {
        crate::policy::Effect::Allow => "ALLOW",
        crate::policy::Effect::Deny => "DENY",
    };
    out.push_str(&format!("decision:  {effect} ({})\n", d.reason.as_str()));
    if d.shadow {
        out.push_str("mode:      shadow (a deny is logged, not enforced)\n");
    }
    out.push_str(&format!(
        "route:     {} (policy set {})\n",
        route.config.name, d.set
    ));
    let total = engine
        .compiled()
        .and_then(|c| c.sets.iter().find(|s| *s.name == *d.set))
        .map_or(0, |s| s.policies.policies().count());
    out.push_str(&format!(
        "evaluated: {} of the set's {total} policies (the others cannot apply to this route and method; 0 when the answer is known without evaluation)\n",
        x.evaluated
    ));
    if d.policies.is_empty() {
        out.push_str("policies:  none determined the decision\n");
    } else {
        out.push_str("policies:\n");
        let compiled = engine.compiled();
        for id in &d.policies {
            let at = compiled
                .and_then(|c| c.info(id))
                .map(|i| format!(" ({}:{})", i.file.display(), i.line))
                .unwrap_or_default();
            out.push_str(&format!("  {id}{at}\n"));
        }
    }
    for e in &d.errors {
        out.push_str(&format!("error:     {e}\n"));
    }
    out.push_str(&format!("principal: {}\n", x.principal));
    out.push_str(&format!("action:    {}\n", x.action));
    out.push_str(&format!("resource:  {}\n", x.resource));
    // Certificate names are the client's text: escaped for the terminal, still JSON.
    let pretty = |v: &serde_json::Value| {
        super::json_printable(&serde_json::to_string_pretty(v).unwrap_or_default()).into_owned()
    };
    out.push_str(&format!("context:\n{}\n", pretty(&x.context)));
    out.push_str(&format!("entities:\n{}\n", pretty(&x.entities)));
    Ok(out)
}

/// The routes of a config, without upstream pools (nothing is forwarded here).
pub(crate) fn router_of(config: &config::Config) -> Router {
    Router::bare(config)
}
