//! `wraith test`: load and build everything the server would, print every problem.

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
        "wraith: configuration {} is valid: {} listener(s), {} upstream(s), {} route(s)",
        config_path.display(),
        config.listeners.len(),
        config.upstreams.len(),
        config.routes.len()
    );
    ExitCode::SUCCESS
}

fn block_on_build(config: config::Config) -> Result<(), Vec<String>> {
    // Building upstream clients needs a runtime context.
    super::block_on(async move { Snapshot::build(config, 0, None).map(|_| ()) })
        .map_err(|e| vec![e])?
}
