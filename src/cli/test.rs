//! `wraith test`: load and build everything the server would (policies validated against the
//! schema included), print every problem, then run the policy test cases.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, LoadOptions};
use crate::runtime::Snapshot;

pub fn run(config_path: &Path) -> ExitCode {
    let config = match config::load(config_path, LoadOptions::default()) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                println!("error: {e}");
            }
            println!(
                "wraith: configuration {} is invalid ({} error{})",
                config_path.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            return ExitCode::FAILURE;
        }
    };
    for w in &config.warnings {
        println!("warning: {w}");
    }
    // Build what serve would build (TLS configs, pools), without binding anything; and
    // open what serve would open (log files, the decisions state file), as `nginx -t` does.
    // Development certificates serve has yet to create were read from a stand-in set.
    let mut errors = block_on_build(config.clone()).err().unwrap_or_default();
    errors.extend(files_serve_opens(&config));
    if !errors.is_empty() {
        for e in &errors {
            println!("error: {e}");
        }
        println!("wraith: configuration {} is invalid", config_path.display());
        return ExitCode::FAILURE;
    }
    println!(
        "wraith: configuration {} is valid: {} listener(s), {} upstream(s), {} route(s), {} policies",
        config_path.display(),
        config.listeners.len(),
        config.upstreams.len(),
        config.routes.len(),
        config.policy.as_ref().map_or(0, |p| p.compiled.policies.len())
    );
    if config.policy.is_none() {
        return ExitCode::SUCCESS;
    }
    policy_cases(&config)
}

/// Runs `<policy dir>/tests/*.toml`; ends with the `N passed, N failed` line.
fn policy_cases(config: &config::Config) -> ExitCode {
    let engine = match crate::policy::PolicyEngine::build(config) {
        Ok(e) => e,
        Err(e) => {
            println!("error: policy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let router = super::policy::router_of(config);
    let report = crate::policy::cases::run(config, &engine, &router);
    println!("\npolicy tests");
    print!("{}", report.output);
    println!("{} passed, {} failed", report.passed, report.failed);
    if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The files `serve` opens at start, opened (log files are created, as `nginx -t` creates
/// its logs) or read, each failure named by its key: a log path that is a directory or
/// cannot be written, a decisions state file that is not one.
fn files_serve_opens(config: &config::Config) -> Vec<String> {
    let mut errors = Vec::new();
    let log = &config.log;
    let files = [
        ("log.json", log.json.as_ref().map(|s| &s.path)),
        ("log.combined", log.combined.as_ref().map(|s| &s.file.path)),
        ("log.events", log.events.as_ref().map(|s| &s.path)),
    ];
    for (key, path) in files {
        if let Some(path) = path {
            if let Err(e) = crate::telemetry::sinks::open_append(path) {
                errors.push(format!("{}: {e}", config.key(&format!("{key}.path"))));
            }
        }
    }
    if let Some(sqlite) = &log.sqlite {
        let path = &sqlite.path;
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => errors.push(format!(
                "{}: {} is not a regular file",
                config.key("log.sqlite.path"),
                path.display()
            )),
            Ok(_) => {
                if let Err(e) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                {
                    errors.push(format!(
                        "{}: cannot open {}: {e}",
                        config.key("log.sqlite.path"),
                        path.display()
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if let Err(e) = std::fs::create_dir_all(dir) {
                        errors.push(format!(
                            "{}: cannot create {}: {e}",
                            config.key("log.sqlite.path"),
                            dir.display()
                        ));
                    }
                }
            }
            Err(e) => errors.push(format!(
                "{}: cannot read {}: {e}",
                config.key("log.sqlite.path"),
                path.display()
            )),
        }
    }
    if let Some(path) = &config.decisions.state_file {
        if path.exists() {
            if let Err(e) = crate::decisions::DecisionStore::read(path) {
                errors.push(format!("{}: {e}", config.key("decisions.state_file")));
            }
        }
    }
    errors
}

fn block_on_build(config: config::Config) -> Result<(), Vec<String>> {
    // Building upstream clients needs a runtime context.
    super::block_on(async move { Snapshot::build(config, 0, None).map(|_| ()) })
        .map_err(|e| vec![e])?
}
