//! `wraith certs init`

use std::path::Path;
use std::process::ExitCode;

pub fn init(dir: &Path, force: bool) -> ExitCode {
    match crate::certs::init(dir, force) {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            println!(
                "development certificates only: the client certificate carries {}",
                crate::certs::DEV_CLIENT_SPIFFE_ID
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wraith certs init: {e}");
            ExitCode::FAILURE
        }
    }
}
