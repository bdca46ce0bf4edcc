//! Process lifecycle: SIGHUP reloads, SIGUSR1 reopens the log files (logrotate), SIGTERM/SIGINT
//! drain (a second one exits at once), and the pid file that `wraith reload` and `wraith stop`
//! use.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::runtime::Runtime;

/// How the server ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every connection finished before the deadline.
    Drained,
    /// The shutdown timeout passed with connections still open.
    TimedOut,
    /// A second signal arrived during the drain.
    Forced,
}

/// The process's signal handlers, installed before the server says it started: a SIGHUP
/// that arrives right after "wraith started" must reload, not kill the process (the default
/// action).
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the SIGHUP, SIGTERM, SIGINT and SIGUSR1 handlers (inside the tokio runtime).
    pub fn install() -> Result<Signals, String> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| format!("cannot install {name} handler: {e}"))
        };
        Ok(Signals {
            hup: install(SignalKind::hangup(), "SIGHUP")?,
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            usr1: install(SignalKind::user_defined1(), "SIGUSR1")?,
        })
    }
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP; then drains.
pub async fn run(runtime: Arc<Runtime>, signals: Signals) -> Result<Exit, String> {
    let Signals {
        mut hup,
        mut term,
        mut int,
        mut usr1,
    } = signals;
    loop {
        tokio::select! {
            _ = usr1.recv() => {
                runtime.telemetry.writers.reopen_all();
                tracing::info!("SIGUSR1: reopening log files");
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading configuration");
                let rt = runtime.clone();
                // Reload in its own task so a slow reload never delays signal handling.
                tokio::spawn(async move { let _ = rt.reload().await; });
            }
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
        }
    }
    let timeout = runtime.gateway.snapshot().config.server.shutdown_timeout;
    let drain = runtime.drain();
    tokio::select! {
        _ = drain => {
            tracing::info!("all connections finished; exiting");
            Ok(Exit::Drained)
        }
        _ = tokio::time::sleep(timeout) => {
            tracing::warn!(timeout = ?timeout, "shutdown timeout reached with connections still open; exiting");
            Ok(Exit::TimedOut)
        }
        _ = term.recv() => { tracing::warn!("second signal: exiting now"); Ok(Exit::Forced) }
        _ = int.recv() => { tracing::warn!("second signal: exiting now"); Ok(Exit::Forced) }
    }
}

/// A pid file that removes itself when dropped (if it still holds our pid).
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes our pid, refusing if the file names another live process.
    pub fn create(path: &Path) -> Result<PidFile, String> {
        if let Some(pid) = read_pid(path)? {
            if pid != std::process::id() as i32 && alive(pid) {
                return Err(format!(
                    "pid file {} names running process {pid}: is another wraith running?",
                    path.display()
                ));
            }
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
        }
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if matches!(read_pid(&self.0), Ok(Some(p)) if p == std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Reads a pid file; `None` if it does not exist.
pub fn read_pid(path: &Path) -> Result<Option<i32>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|p| *p > 0)
            .map(Some)
            .ok_or_else(|| format!("pid file {} does not contain a pid", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read pid file {}: {e}", path.display())),
    }
}

/// Whether a process with this pid exists (an exited process not yet reaped by its parent,
/// a zombie, does not count).
pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !zombie(pid)
}

/// Linux: the state field of /proc/PID/stat is `Z` for a zombie.
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Sends `sig` to `pid`.
pub fn send(pid: i32, sig: i32) -> Result<(), String> {
    // SAFETY: plain kill(2) on a pid read from our own pid file.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        ))
    }
}
