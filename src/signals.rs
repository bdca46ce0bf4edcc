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
                tokio::spawn(async move {
                    crate::sdnotify::reloading();
                    let result = rt.reload().await;
                    crate::sdnotify::reloaded(&result);
                });
            }
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
        }
    }
    let timeout = runtime.gateway.snapshot().config.server.shutdown_timeout;
    crate::sdnotify::stopping(timeout);
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

/// The running server's pid file, locked for the process's whole life: the lock, not the pid
/// written in the file, is what says a wraith is running, and the kernel's record of who holds
/// it is what says which process that is. A pid file left by a killed server (SIGKILL, OOM) is
/// unlocked, so it never blocks `serve` and its pid, perhaps reused by another process by now
/// (another wraith's, even), is never signalled by `stop` or `reload`.
///
/// Two locks on the one descriptor: a POSIX record lock (`fcntl(F_SETLK)`), whose holder
/// `F_GETLK` reports by pid, so `stop`/`reload` signal the pid in the file only when it is the
/// holder's own; and an exclusive `flock`, which wraith servers before the POSIX lock (and
/// their `serve`, on a downgrade) judge by. Nothing else in the server opens the file, so
/// nothing closes a second descriptor on it (which would release the POSIX lock).
///
/// The file is always created afresh (`O_EXCL`), never reused: a stale one is removed first. A
/// file someone else made (another user, a hard link, a group-writable mode) could be
/// rewritten by them while we hold the lock, to point `stop` at any process.
///
/// Dropping it removes the file (while still holding the locks) and then releases them.
pub struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    /// Creates and locks the pid file and writes our pid into it. Fails at once, naming the
    /// holder, if another process holds the one at `path`; a stale or empty one is replaced
    /// (logged).
    pub fn create(path: &Path) -> Result<PidFile, String> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
        }
        // A few rounds: another server starting at the same moment can create or replace the
        // file between our steps.
        for _ in 0..10 {
            // A file already there: in use (locked), or stale. A stale one stays open and
            // locked by us until its replacement is locked, so that a server racing us that
            // opened it too cannot take it over meanwhile.
            let mut stale = None;
            match open_existing(path) {
                Ok(old) => {
                    if !old.metadata().is_ok_and(|m| m.is_file()) {
                        return Err(format!(
                            "pid file {} is not a regular file; move it away",
                            path.display()
                        ));
                    }
                    lock_exclusive(&old, path)?;
                    if let Some(holder) = lock_holder(&old)
                        .map_err(|e| format!("cannot check pid file {}: {e}", path.display()))?
                    {
                        return Err(locked_by(path, Some(holder)));
                    }
                    if !same_file(&old, path) {
                        continue;
                    }
                    let previous = pid_in(&old);
                    std::fs::remove_file(path).map_err(|e| {
                        format!("cannot remove the stale pid file {}: {e}", path.display())
                    })?;
                    stale = Some((old, previous));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(format!("cannot open pid file {}: {e}", path.display()));
                }
            }
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
            {
                Ok(f) => f,
                // Another server created it first: the next round finds it locked.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(format!("cannot create pid file {}: {e}", path.display()));
                }
            };
            lock_exclusive(&file, path)?;
            match posix_lock(&file) {
                Ok(true) => {}
                Ok(false) => {
                    let holder = lock_holder(&file).ok().flatten();
                    return Err(locked_by(path, holder));
                }
                Err(e) => return Err(format!("cannot lock pid file {}: {e}", path.display())),
            }
            if !same_file(&file, path) {
                continue;
            }
            if let Some((old, previous)) = stale {
                drop(old);
                tracing::warn!(
                    pid_file = %path.display(),
                    previous = ?previous,
                    "taking over a stale pid file (no running wraith held its lock)"
                );
            }
            let pid = format!("{}\n", std::process::id());
            file.write_all_at(pid.as_bytes(), 0)
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

impl PidFile {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` (its directories' symlinks followed) names this very file: a config
    /// that spells the same pid file another way moves nothing.
    pub fn is_at(&self, path: &Path) -> bool {
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
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

/// Opens an existing pid file to look at it: read-only (a stale file of another user's need
/// not be writable to be replaced), not following a symlink, and non-blocking (a FIFO at the
/// path must not hang the caller in open(2)).
fn open_existing(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

/// "pid file ... is locked by process N: another wraith is running with this configuration".
fn locked_by(path: &Path, holder: Option<i32>) -> String {
    let holder = match holder.filter(|&p| p > 0) {
        Some(pid) => format!("process {pid}"),
        None => "another process".to_string(),
    };
    format!(
        "pid file {} is locked by {holder}: another wraith is running with this configuration",
        path.display()
    )
}

/// `flock(LOCK_EX | LOCK_NB)`, retried for ~100 ms: an older `wraith stop`/`reload` holds a
/// shared lock for an instant while it checks the file, and must not make a starting server
/// fail.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), String> {
    for attempt in 0..10 {
        match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(true) => return Ok(()),
            Ok(false) if attempt < 9 => std::thread::sleep(Duration::from_millis(10)),
            Ok(false) => break,
            Err(e) => return Err(format!("cannot lock pid file {}: {e}", path.display())),
        }
    }
    // The POSIX lock's holder, reported by the kernel; else (a server of an older wraith,
    // which takes only the flock) the pid the file names, which is all there is to go on.
    let holder = lock_holder(file).ok().flatten().or_else(|| pid_in(file));
    Err(locked_by(path, holder))
}

/// A wraith found through its pid file: the file is locked by a running process, and that
/// process is the one whose pid the file holds.
pub struct Running {
    /// The server's pid.
    pub pid: i32,
    /// Kept open to watch the lock (also across the server's removal of the file).
    file: File,
}

impl Running {
    /// Finds the server that holds `path`. Errors say why there is none to signal: no file, a
    /// stale one (unlocked: its pid may be anyone's by now), or one whose pid is not its lock
    /// holder's (rewritten by someone else, or locked in another pid namespace).
    pub fn find(path: &Path) -> Result<Running, String> {
        let file = match open_existing(path) {
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
        let holder =
            lock_holder(&file).map_err(|e| format!("cannot check the pid file lock: {e}"))?;
        let named = pid_in(&file);
        match (holder, named) {
            (Some(holder), Some(pid)) if holder == pid => Ok(Running { pid, file }),
            // Locked but still empty: the server has just taken the lock and not yet written.
            (Some(holder), None) => Err(format!(
                "pid file {} is locked by process {holder} but holds no pid yet: is wraith starting?",
                path.display()
            )),
            (Some(holder), Some(pid)) => Err(format!(
                "pid file {} names process {pid} but is locked by {}: its content is not the server's own, nothing was signalled",
                path.display(),
                match holder {
                    0 => "a process outside this pid namespace".to_string(),
                    h => format!("process {h}"),
                }
            )),
            (None, _) if !flock_free(&file)? => Err(format!(
                "pid file {} is locked by a server of an older wraith (flock only), which does not say which process holds it: nothing was signalled; signal that server yourself, and restart it to get the new lock",
                path.display()
            )),
            (None, pid) => {
                let names = match pid {
                    Some(pid) => format!("names process {pid}, which was not signalled"),
                    None => "holds no pid".to_string(),
                };
                Err(format!(
                    "pid file {} is stale: no wraith holds its lock (it {names}); is wraith running?",
                    path.display()
                ))
            }
        }
    }

    /// Whether the server has let go of its pid file (it is about to exit, or has).
    pub fn exited(&self) -> Result<bool, String> {
        let holder =
            lock_holder(&self.file).map_err(|e| format!("cannot check the pid file lock: {e}"))?;
        Ok(holder != Some(self.pid))
    }
}

/// Whether nobody holds a `flock` on `file`: a shared lock is granted only when no one holds
/// the exclusive one (given back at once).
fn flock_free(file: &File) -> Result<bool, String> {
    let free = flock(file, libc::LOCK_SH | libc::LOCK_NB)
        .map_err(|e| format!("cannot check the pid file lock: {e}"))?;
    if free {
        let _ = flock(file, libc::LOCK_UN);
    }
    Ok(free)
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

/// A lock of type `l_type` on the whole file, as `fcntl` describes it.
fn whole_file(l_type: i32) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all zeroes is a valid value of it.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = l_type as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = 0;
    l.l_len = 0;
    l
}

/// Takes a POSIX write lock on the whole file: `Ok(false)` when another process holds one.
fn posix_lock(file: &File) -> std::io::Result<bool> {
    let l = whole_file(libc::F_WRLCK);
    loop {
        // SAFETY: fcntl(F_SETLK) on a descriptor `file` keeps open, reading `l`.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &l) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EACCES | libc::EAGAIN) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// The pid of the process holding a POSIX lock on `file`, as the kernel reports it
/// (`F_GETLK`; 0 for a holder outside our pid namespace); `None` when nobody does. Our own
/// locks never count.
fn lock_holder(file: &File) -> std::io::Result<Option<i32>> {
    let mut l = whole_file(libc::F_WRLCK);
    // SAFETY: fcntl(F_GETLK) on a descriptor `file` keeps open, writing into `l`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((l.l_type != libc::F_UNLCK as libc::c_short).then_some(l.l_pid))
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

/// Sends `sig` to `pid`.
pub fn send(pid: i32, sig: i32) -> Result<(), String> {
    // SAFETY: plain kill(2) on the pid of the process that holds our pid file's lock.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        ))
    }
}
