//! `wraith serve`: load, bind, serve until SIGTERM, drain, exit 0.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, LoadOptions};
use crate::runtime::Runtime;
use crate::signals::{self, Exit, PidFile};
use crate::telemetry;

/// Descriptors beyond the connections' own: listeners, log files, the admin socket, health
/// checks, the decision sources.
const SPARE_FILES: u64 = 256;

/// Raises the soft open-file limit to the hard one (as Go programs do, and as nginx's
/// `worker_rlimit_nofile` asks): a shell's or systemd's default soft limit of 1024 is reached
/// long before the default `max_connections`, and past it `accept` fails and new clients
/// hang. Warns when even the hard limit is below what the listeners' connection limits allow
/// (each proxied connection holds an upstream connection too).
fn raise_open_file_limit(config: &config::Config) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let soft = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
            tracing::debug!(
                from = soft,
                to = lim.rlim_cur,
                "open-file limit raised to the hard limit"
            );
        }
    }
    let connections: u64 = config
        .listeners
        .iter()
        .map(|l| l.limits.max_connections.get() as u64)
        .sum();
    let wanted = connections.saturating_mul(2).saturating_add(SPARE_FILES);
    if lim.rlim_cur < wanted {
        tracing::warn!(
            limit = lim.rlim_cur,
            wanted,
            "the open-file limit ({}) is below what the listeners' max_connections allow ({connections} connections, each with an upstream connection, and {SPARE_FILES} spare): past it new connections are refused; raise the hard limit (systemd LimitNOFILE=, ulimit -Hn) or lower max_connections",
            lim.rlim_cur
        );
    }
}

/// How often, at most, a worker thread that goes idle gives its heap's freed memory back.
const COLLECT_EVERY: Duration = Duration::from_secs(10);

/// Called when a worker thread runs out of work: at most once per `COLLECT_EVERY` per
/// thread, gives the memory its mimalloc heap holds freed back to the system. mimalloc keeps
/// freed pages for the thread's next allocations and purges them only as that heap is used
/// again, so after a spike (thousands of connections, then quiet) the process kept its peak
/// RSS for good (each worker thread has its own heap; this runs on each).
fn collect_when_idle() {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    LAST.with(|last| {
        let now = std::time::Instant::now();
        if last
            .get()
            .is_some_and(|t| now.duration_since(t) < COLLECT_EVERY)
        {
            return;
        }
        last.set(Some(now));
        // SAFETY: mi_collect only returns memory mimalloc holds unused, from any thread.
        unsafe { libmimalloc_sys::mi_collect(false) };
    });
}

/// How long the log writers get to flush after a second signal forced the exit.
const FORCED_FLUSH: Duration = Duration::from_secs(1);
/// Longest the exit waits for the worker threads to drop the tasks still running at the
/// shutdown deadline (each dropped request emits its record as it goes).
const TASK_DROP_WAIT: Duration = Duration::from_secs(5);

pub fn run(config_path: &Path) -> ExitCode {
    // Absolute before the first load: relative paths in the file are taken relative to the
    // file's directory, and a reload (which loads from this path) must resolve them the same
    // way, or every one of them looks changed and what it names is rebuilt.
    let config_path =
        std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    // A first, quick load decides the runtime and logging settings.
    let config = match config::load(
        &config_path,
        LoadOptions {
            generate_dev_certs: true,
        },
    ) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!(
                "wraith: configuration {} is invalid:",
                config_path.display()
            );
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init_logging(&config.server.log_level, config.server.log_format);
    raise_open_file_limit(&config);
    for n in &config.notices {
        tracing::warn!("{n}");
        eprintln!("wraith: {n}");
    }
    // One worker: a current-thread runtime, which skips the work-stealing machinery (cheaper
    // wake-ups on every socket event). More: the multi-threaded scheduler.
    let mut builder = match config.server.worker_threads.map(|n| n.get()) {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .thread_name("wraith-worker")
        .on_thread_park(collect_when_idle);
    let rt = match build_runtime(&mut builder, config.server.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            eprintln!("wraith: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut server: Option<Arc<Runtime>> = None;
    // Held (locked) until the very end, after the log queues are written out: while it is
    // locked, `wraith stop` still sees this server as running. Here until the runtime starts,
    // then in the runtime (a reload may move it), and taken back for the exit.
    let mut pid_file = None;
    let result = rt.block_on(async {
        // Before anything can announce the server (pid file, log): see `Signals`.
        let signals = signals::Signals::install()?;
        // Before binding: a second server on this config fails here, not on (or worse, next
        // to) the first one's listeners.
        if let Some(p) = &config.server.pid_file {
            pid_file = Some(PidFile::create(p)?);
        }
        let runtime = Runtime::start(config_path, config).await?;
        runtime.hold_pid_file(pid_file.take());
        server = Some(runtime.clone());
        runtime.start_admin()?;
        telemetry::exporter::start(runtime.clone()).await?;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            pid = std::process::id(),
            config = %runtime.config_path.display(),
            "wraith started"
        );
        crate::sdnotify::ready(runtime.generation());
        let exit = signals::run(runtime.clone(), signals).await;
        // The admin socket, served through the drain, goes before the last save: a ban
        // added after it would be lost.
        runtime.stop_admin();
        // Local bans outlive the process ("saves state" on SIGTERM as well as on change).
        match runtime.save_decisions_at_exit() {
            Ok(true) => tracing::info!("local decisions saved"),
            Ok(false) => tracing::warn!("the decisions state file was replaced by another writer (a newer wraith?) since this server last read or wrote it; left as it is"),
            Err(e) => tracing::error!(error = %e, "cannot save local decisions"),
        }
        exit
    });
    // Cut off the tasks still running (connections past the deadline), and wait until the
    // worker threads have dropped them: a request's record is emitted (aborted) when its
    // response is dropped, and it must reach the log queues before they close below.
    // `shutdown_background` returned while the workers were still dropping, and every such
    // record was lost. Bounded: a blocking task (a reload reading certificates) is not
    // waited out.
    let (wait_tasks, flush) = match result {
        Ok(Exit::Forced) => (FORCED_FLUSH, Some(FORCED_FLUSH)),
        _ => (TASK_DROP_WAIT, None),
    };
    rt.shutdown_timeout(wait_tasks);
    // Every request has been accounted for by now: write out what the log queues hold (for
    // as long as the configuration in service allows). After a second signal, only briefly:
    // "exits at once" must not wait out a failing sink.
    if let Some(runtime) = &server {
        let timeout = runtime.gateway.snapshot().config.server.shutdown_timeout;
        let timeout = flush.map_or(timeout, |f| f.min(timeout));
        runtime
            .telemetry
            .writers
            .shutdown(std::time::Instant::now() + timeout);
    }
    if let Some(runtime) = &server {
        runtime.stop_admin();
    }
    // Removes the file, then releases the lock.
    drop(pid_file.or_else(|| server.as_ref().and_then(|r| r.take_pid_file())));
    match result {
        Ok(Exit::Drained) | Ok(Exit::TimedOut) => ExitCode::SUCCESS,
        Ok(Exit::Forced) => ExitCode::from(130),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("wraith: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the runtime. tokio panics when the OS refuses one of its worker threads (too many
/// for `ulimit -u` or kernel.threads-max, or no address space left for their stacks under
/// `ulimit -v`), and the runtime it had half built then hung the process as the panic
/// unwound, not listening, until a SIGTERM. While the runtime is built, a panic is reported as
/// the reason the server cannot start, and the process exits at once, before anything unwinds.
fn build_runtime(
    builder: &mut tokio::runtime::Builder,
    workers: Option<std::num::NonZeroUsize>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = workers.map_or_else(
        || "one per core".to_string(),
        |n| format!("server.worker_threads = {n}"),
    );
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = super::panic_message(info).unwrap_or("a panic");
        tracing::error!(error = msg, workers = %workers, "cannot start the async runtime");
        eprintln!(
            "wraith: cannot start the async runtime ({workers}): {msg}. Fewer worker threads, \
             or a higher thread or address-space limit (ulimit -u, ulimit -v), would let it start."
        );
        std::process::exit(1);
    }));
    let built = builder.build();
    std::panic::set_hook(previous);
    built
}
