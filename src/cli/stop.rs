//! `wraith stop`: SIGTERM to the server holding the pid file, then wait for it to let go (exit).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::config::units::parse_duration;
use crate::signals;

pub fn run(config_path: &Path, timeout: Option<&str>) -> ExitCode {
    match stop(config_path, timeout) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wraith stop: {e}");
            ExitCode::FAILURE
        }
    }
}

fn stop(config_path: &Path, timeout: Option<&str>) -> Result<String, String> {
    let server = super::server_paths(config_path)?;
    let timeout = match timeout {
        Some(t) => parse_duration(t)?,
        None => server.shutdown_timeout + Duration::from_secs(5),
    };
    // Only a pid file locked by its server names a wraith; a stale one names nothing to signal.
    let running = super::find_server(&server)?;
    let pid = running.pid;
    // A server already draining is waited for, not signalled again: a second signal is the
    // server's "exit at once", which would cut the requests it is letting finish.
    let draining = server.admin_socket.as_ref().is_some_and(|socket| {
        let status = super::block_on(crate::admin::call(
            socket,
            http::Method::GET,
            "/v1/status",
            Duration::from_secs(2),
        ));
        matches!(status, Ok(Ok((_, s))) if s["pid"].as_i64() == Some(i64::from(pid)) && s["draining"] == true)
    });
    if draining {
        eprintln!("process {pid} is already shutting down (draining); waiting for it to exit");
    } else {
        signals::send(pid, libc::SIGTERM)?;
    }
    let started = Instant::now();
    while started.elapsed() < timeout {
        // The server lets go of the lock last, after its logs are written out.
        if running.exited()? {
            return Ok(format!(
                "stopped: process {pid} exited after {:.1}s",
                started.elapsed().as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "process {pid} is still running {:.0}s after SIGTERM (connections still draining?); send SIGTERM again to exit at once",
        timeout.as_secs_f64()
    ))
}
