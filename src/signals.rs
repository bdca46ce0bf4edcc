//! Process lifecycle: SIGHUP reloads, SIGUSR1 reopens the log files (logrotate), SIGTERM/SIGINT
//! drain (a second one exits at once), and the pid file that `wraith reload` and `wraith stop`
//! use.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// The running server's pid file, held with an exclusive `flock` for the process's whole life:
/// the lock, not the pid written in the file, is what says a wraith is running. A pid file
/// left by a killed server (SIGKILL, OOM) is unlocked, so it never blocks `serve` and its pid,
/// perhaps reused by an unrelated process by now, is never signalled by `stop` or `reload`.
/// Dropping it removes the file (while still holding the lock) and then releases the lock.
pub struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    /// Locks the pid file and writes our pid into it. Fails at once, naming the holder, if
    /// another process holds it; a stale or empty one is taken over (logged).
    pub fn create(path: &Path) -> Result<PidFile, String> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
        }
        // A few rounds: the file can be removed between our open and our lock (the server
        // that held it exiting), leaving us the lock on a file no longer at `path`.
        for _ in 0..10 {
            // A pid file already there is stale: a server that exits removes its own.
            let existed = std::fs::symlink_metadata(path).is_ok();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| format!("cannot open pid file {}: {e}", path.display()))?;
            lock_exclusive(&file, path)?;
            if !same_file(&file, path) {
                continue;
            }
            let previous = pid_in(&file);
            // Unlocked, but naming a live wraith: a server of an older version, which held no
            // lock. Starting beside it would take its pid file (and, on a busy port, fail to
            // bind and then remove that file on the way out).
            if let Some(pid) = previous {
                if pid as u32 != std::process::id() && is_wraith(pid) {
                    return Err(format!(
                        "pid file {} names process {pid}, a running wraith that holds no lock on it (started by an older version?): stop it first (`wraith stop` finds it)",
                        path.display()
                    ));
                }
            }
            if existed {
                tracing::warn!(
                    pid_file = %path.display(),
                    previous = ?previous,
                    "taking over a stale pid file (no running wraith held its lock)"
                );
            }
            // Readers judge by the lock, not the content, so truncating and rewriting in
            // place while holding it is safe; a crash in between leaves an unlocked file.
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
            return Ok(PidFile {
                path: path.to_path_buf(),
                file,
            });
        }
        Err(format!(
            "pid file {} keeps being replaced while we lock it: is another wraith starting?",
            path.display()
        ))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Still ours (not replaced by someone else's file at the path): remove it, then
        // release the lock as `file` closes.
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `flock(LOCK_EX | LOCK_NB)`, retried for ~100 ms: `wraith stop`/`reload` hold a shared
/// lock for an instant while they check the file, and must not make a starting server fail.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), String> {
    for attempt in 0..10 {
        match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(true) => return Ok(()),
            Ok(false) if attempt < 9 => std::thread::sleep(Duration::from_millis(10)),
            Ok(false) => break,
            Err(e) => return Err(format!("cannot lock pid file {}: {e}", path.display())),
        }
    }
    let holder = match pid_in(file) {
        Some(pid) => format!("process {pid}"),
        None => "another process".to_string(),
    };
    Err(format!(
        "pid file {} is locked by {holder}: another wraith is running with this configuration",
        path.display()
    ))
}

/// A wraith found through its pid file: the file is locked by the server, and `pid` is the
/// pid it wrote there; or (`legacy`) a server of an older Wraith, which never locked it.
pub struct Running {
    /// The server's pid.
    pub pid: i32,
    /// Kept open to watch the lock (also across the server's removal of the file).
    file: File,
    /// The server holds no lock: it is watched through /proc instead.
    legacy: bool,
}

impl Running {
    /// Finds the server that holds `path`. Errors say why there is none: no file, or a stale
    /// one (unlocked: its pid is not a running wraith's and must not be signalled).
    pub fn find(path: &Path) -> Result<Running, String> {
        // Non-blocking: a FIFO at the path must not hang `stop` or `reload` in open(2).
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
            Ok(_) => return Err(format!("{} is not a regular file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "{} does not exist: is wraith running?",
                    path.display()
                ))
            }
            Err(e) => return Err(format!("cannot open pid file {}: {e}", path.display())),
        };
        let running = Running {
            pid: 0,
            file,
            legacy: false,
        };
        if running.exited()? {
            let pid = pid_in(&running.file);
            // A server started before Wraith locked its pid file (an upgrade without a
            // restart) holds none: accepted only if that pid is a live wraith process.
            if let Some(pid) = pid.filter(|&pid| is_wraith(pid)) {
                eprintln!(
                    "note: process {pid} holds no lock on {} (started by an older wraith); restart it to get the lock",
                    path.display()
                );
                return Ok(Running {
                    pid,
                    legacy: true,
                    ..running
                });
            }
            let names = match pid {
                Some(pid) => format!("names process {pid}, which was not signalled"),
                None => "holds no pid".to_string(),
            };
            return Err(format!(
                "pid file {} is stale: no wraith holds its lock (it {names}); is wraith running?",
                path.display()
            ));
        }
        // Locked but still empty: the server has just taken the lock and not yet written.
        let pid = pid_in(&running.file).ok_or_else(|| {
            format!(
                "pid file {} is locked but holds no pid yet: is wraith starting?",
                path.display()
            )
        })?;
        Ok(Running { pid, ..running })
    }

    /// Whether the server has let go of its pid file (it is about to exit, or has); for a
    /// legacy server, whether its process is gone.
    pub fn exited(&self) -> Result<bool, String> {
        if self.legacy {
            return Ok(!is_wraith(self.pid));
        }
        // A shared lock is granted only when no one holds the exclusive one; give it back.
        let free = flock(&self.file, libc::LOCK_SH | libc::LOCK_NB)
            .map_err(|e| format!("cannot check the pid file lock: {e}"))?;
        if free {
            let _ = flock(&self.file, libc::LOCK_UN);
        }
        Ok(free)
    }
}

/// flock(2): `Ok(false)` when another holder makes a non-blocking request wait.
fn flock(file: &File, op: i32) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Whether `path` (not followed if a symlink) is the file `file` has open.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The pid written in an open pid file, if it holds one. Its content alone proves nothing:
/// see `Running::find`.
fn pid_in(file: &File) -> Option<i32> {
    let mut buf = [0u8; 32];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
}

/// Whether `pid` is a live (not zombie) wraith process: its executable is ours (a binary
/// replaced by an upgrade shows as "<path> (deleted)"), or, where its exe link cannot be read
/// (another user's process) or differs (another install), its command name is `wraith`.
fn is_wraith(pid: i32) -> bool {
    let proc = Path::new("/proc").join(pid.to_string());
    // The state follows the command name, which may hold spaces and parentheses.
    let Ok(stat) = std::fs::read_to_string(proc.join("stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, None | Some('Z' | 'X' | 'x')) {
        return false;
    }
    let exe = |p: &Path| {
        std::fs::read_link(p).ok().map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_suffix(" (deleted)").map(str::to_owned).unwrap_or(l)
        })
    };
    if let (Some(theirs), Some(ours)) = (exe(&proc.join("exe")), exe(Path::new("/proc/self/exe"))) {
        if theirs == ours {
            return true;
        }
    }
    std::fs::read_to_string(proc.join("comm")).is_ok_and(|c| c.trim_end() == "wraith")
}

/// Sends `sig` to `pid`.
pub fn send(pid: i32, sig: i32) -> Result<(), String> {
    // SAFETY: plain kill(2) on the pid of a process that holds our pid file's lock.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        ))
    }
}
