//! `wraith reload`: SIGHUP to the server holding the pid file, then (with an admin socket) wait for
//! the server's verdict and print it.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http::Method;

use crate::signals;

pub fn run(config_path: &Path) -> ExitCode {
    match reload(config_path) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wraith reload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `wraith reopen`: SIGUSR1 to the server holding the pid file, which reopens its log files
/// (what logrotate's `postrotate` runs, as `nginx -s reopen`).
pub fn reopen(config_path: &Path) -> ExitCode {
    let signalled = super::server_paths(config_path)
        .and_then(|server| super::find_server(&server))
        .and_then(|server| signals::send(server.pid, libc::SIGUSR1).map(|()| server.pid));
    match signalled {
        Ok(pid) => {
            println!("sent SIGUSR1 to {pid}: it reopens its log files");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wraith reopen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn reload(config_path: &Path) -> Result<String, String> {
    let server = super::server_paths(config_path)?;
    // Only a pid file locked by its server names a wraith; a stale one names nothing to signal.
    let pid = super::find_server(&server)?.pid;
    let Some(socket) = server.admin_socket else {
        signals::send(pid, libc::SIGHUP)?;
        return Ok(format!("sent SIGHUP to {pid} (no admin socket configured, so the outcome is in the server log)"));
    };
    super::block_on(async move {
        // No answer on the configured socket, though the server runs: `server.admin_socket`
        // changed in the file, and this reload moves the socket there if it succeeds.
        let before = status(&socket).await.ok();
        let shutting_down =
            || format!("the server (pid {pid}) is shutting down (draining): nothing to reload");
        if before.as_ref().is_some_and(|b| b["draining"] == true) {
            return Err(shutting_down());
        }
        let signalled_at = crate::telemetry::unix_now();
        // The outcome of a reload that started after this point, not of one already under
        // way (which may have read the file before it was edited): by the reload sequence
        // number. A server without it (an older wraith) is compared by its whole last
        // reload record, which two reloads within a second with the same outcome leave
        // unchanged. A socket that appears only now was moved there by a reload made after
        // the signal.
        let ours = |now: &serde_json::Value| match &before {
            Some(before) => match before["reloads_started"].as_u64() {
                Some(n) => now["last_reload"]["seq"]
                    .as_u64()
                    .is_some_and(|seq| seq > n),
                None => now["last_reload"] != before["last_reload"],
            },
            None => now["last_reload"]["at"]
                .as_u64()
                .is_some_and(|at| at >= signalled_at),
        };
        signals::send(pid, libc::SIGHUP)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = match status(&socket).await {
                Ok(now) => now,
                Err(_) if before.is_none() => continue,
                Err(e) => return Err(e),
            };
            if now["draining"] == true {
                return Err(shutting_down());
            }
            if ours(&now) {
                let lr = &now["last_reload"];
                // The generation this reload left in service (a later reload may have
                // replaced it already); an older server does not say, its current one does.
                let generation = match &lr["generation"] {
                    serde_json::Value::Null => &now["generation"],
                    g => g,
                };
                if lr["ok"].as_bool() == Some(true) {
                    return Ok(format!("reloaded: configuration generation {generation}"));
                }
                let errors: Vec<String> = lr["errors"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| e.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(format!(
                    "the server rejected the new configuration and keeps serving generation {generation}:\n{}",
                    errors.join("\n")
                ));
            }
        }
        match before {
            Some(_) => Err(format!("sent SIGHUP to {pid} but saw no reload outcome within 30s")),
            None => Err(format!(
                "sent SIGHUP to {pid}, but nothing answers on the admin socket {} (if server.admin_socket changed, a successful reload moves it there): see the server log for the outcome",
                socket.display()
            )),
        }
    })?
}

async fn status(socket: &Path) -> Result<serde_json::Value, String> {
    crate::admin::call(socket, Method::GET, "/v1/status", Duration::from_secs(5))
        .await
        .map(|(_, v)| v)
}
