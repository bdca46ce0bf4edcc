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
    let pending_dev_certs = config
        .listeners
        .iter()
        .any(|l| l.tls.as_ref().is_some_and(|t| t.certified_key.is_none()));
    if !pending_dev_certs {
        // Build what serve would build (TLS configs, pools), without binding anything.
        let built = block_on_build(config.clone());
        if let Err(errors) = built {
            for e in &errors {
                println!("error: {e}");
            }
            println!("wraith: configuration {} is invalid", config_path.display());
            return ExitCode::FAILURE;
        }
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

fn block_on_build(config: config::Config) -> Result<(), Vec<String>> {
    // Building upstream clients needs a runtime context.
    super::block_on(async move { Snapshot::build(config, 0, None).map(|_| ()) })
        .map_err(|e| vec![e])?
}
