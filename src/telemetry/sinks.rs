//! Sinks: a bounded queue per sink and a writer thread that empties it in batches.
//!
//! The request thread's whole cost is `Queue::push`: an uncontended mutex, a `Vec::push` and,
//! when the queue is full, a dropped-record count. No syscall: the writer wakes on its own every
//! `FLUSH_INTERVAL`, or when the queue passes half full. The writer formats, writes the whole
//! batch with one `write`, and goes back to sleep.
//!
//! A sink's handle (`Sink`) is shared by every snapshot that has the same settings (a SQLite
//! sink: the same database, see `sqlite::SqliteSettings`); when the last one goes (a reload
//! changed or removed it), the queue is closed and the writer drains it and exits. `Writers` keeps every writer thread so shutdown can wait for all of them.
//!
//! A writer starts paused: it does nothing (no write, no retention) until its queue is
//! activated, which the runtime does once the snapshot the sink was built for is certain to go
//! into service. A reload that fails after building its sinks drops them unactivated, and their
//! writers exit without having touched their output beyond opening it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// How long a record waits at most before its writer wakes up.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Drops are warned about at most this often (per sink).
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// A bounded multi-producer queue emptied in batches by one writer.
pub struct Queue<T> {
    state: Mutex<QueueState<T>>,
    wake: Condvar,
    /// Records it holds at most (a reload may change it: `set_capacity`).
    capacity: AtomicUsize,
    /// Records refused because the queue was full (the writer did not keep up).
    pub dropped: AtomicU64,
    /// Records refused because the queue was closed already (emitted after shutdown closed
    /// the sinks): not the writer's fault, so neither counted nor warned about as drops.
    pub lost: AtomicU64,
    /// Records accepted into the queue.
    pub accepted: AtomicU64,
    /// Records written by the writer.
    pub written: AtomicU64,
    dropped_metric: Counter,
    written_metric: Counter,
}

struct QueueState<T> {
    items: Vec<T>,
    closed: bool,
    reopen: bool,
    /// The writer may act (see the module comment); never unset once set.
    active: bool,
}

/// What the writer took from the queue.
pub struct Batch<T> {
    pub items: Vec<T>,
    pub closed: bool,
    pub reopen: bool,
}

impl<T> Queue<T> {
    pub fn new(capacity: usize, dropped_metric: Counter, written_metric: Counter) -> Queue<T> {
        Queue {
            state: Mutex::new(QueueState {
                items: Vec::with_capacity(capacity.min(4096)),
                closed: false,
                reopen: false,
                active: false,
            }),
            wake: Condvar::new(),
            capacity: AtomicUsize::new(capacity),
            dropped: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            written: AtomicU64::new(0),
            dropped_metric,
            written_metric,
        }
    }

    /// Offers a record; `false` (and counted) when the queue is full or closed.
    pub fn push(&self, item: T) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.closed {
            drop(s);
            self.lost.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let capacity = self.capacity.load(Ordering::Relaxed);
        if s.items.len() >= capacity {
            drop(s);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_metric.inc();
            return false;
        }
        s.items.push(item);
        let len = s.items.len();
        drop(s);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        // Half full: wake the writer early rather than risk drops.
        if len == capacity / 2 + 1 {
            self.wake.notify_one();
        }
        true
    }

    /// Changes how many records it holds at most (records beyond a lowered bound stay).
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.items.len())
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until there is something to do (or the flush interval passes) and takes it all.
    pub fn take(&self, spare: Vec<T>) -> Batch<T> {
        let Ok(mut s) = self.state.lock() else {
            return Batch {
                items: Vec::new(),
                closed: true,
                reopen: false,
            };
        };
        if s.items.is_empty() && !s.closed && !s.reopen {
            s = match self.wake.wait_timeout(s, FLUSH_INTERVAL) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
        let items = std::mem::replace(&mut s.items, spare);
        let reopen = std::mem::take(&mut s.reopen);
        Batch {
            items,
            closed: s.closed,
            reopen,
        }
    }

    /// The close and reopen flags, without taking any record.
    pub fn flags(&self) -> Batch<T> {
        let Ok(mut s) = self.state.lock() else {
            return Batch {
                items: Vec::new(),
                closed: true,
                reopen: false,
            };
        };
        Batch {
            items: Vec::new(),
            closed: s.closed,
            reopen: std::mem::take(&mut s.reopen),
        }
    }

    /// Lets the writer start (it waits in `wait_active` until then).
    pub fn activate(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.active = true;
        }
        self.wake.notify_all();
    }

    /// Whether `activate` was called.
    pub fn is_active(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.active)
    }

    /// The writer's first step: waits until the queue is activated (true) or closed before
    /// that (false: the sink was never put in service, the writer must not act).
    fn wait_active(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        while !s.active && !s.closed {
            s = match self.wake.wait(s) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
        s.active
    }

    /// Asks the writer to reopen its file.
    pub fn reopen(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.reopen = true;
        }
        self.wake.notify_one();
    }

    /// Stops accepting; the writer drains what is queued and exits.
    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.wake.notify_all();
    }

    /// Counts records the writer wrote.
    pub fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        self.written_metric.inc_by(n as u64);
    }
}

/// What shutdown and `wraith status` need to know about any sink.
pub trait SinkControl: Send + Sync {
    fn close(&self);
    fn reopen(&self);
    /// Whether the sink was put in service (`Queue::activate`).
    fn is_active(&self) -> bool;
    /// (queued now, accepted, written, dropped)
    fn counts(&self) -> (usize, u64, u64, u64);
    /// Records offered after the sink was closed.
    fn lost(&self) -> u64;
}

impl<T: Send> SinkControl for Queue<T> {
    fn close(&self) {
        Queue::close(self)
    }
    fn reopen(&self) {
        Queue::reopen(self)
    }
    fn is_active(&self) -> bool {
        Queue::is_active(self)
    }
    fn counts(&self) -> (usize, u64, u64, u64) {
        (
            self.len(),
            self.accepted.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
    fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// A handle on a running sink; dropping the last one closes it.
pub struct Sink<T: Send + 'static> {
    pub name: &'static str,
    pub queue: Arc<Queue<T>>,
    /// The settings it was started with (sinks are reused across reloads when equal).
    pub key: String,
}

impl<T: Send + 'static> Sink<T> {
    /// Offers a record to the sink.
    #[inline]
    pub fn push(&self, item: T) -> bool {
        self.queue.push(item)
    }
}

impl<T: Send + 'static> Drop for Sink<T> {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// One writer thread.
struct WriterEntry {
    name: &'static str,
    control: Arc<dyn SinkControl>,
    thread: JoinHandle<()>,
}

/// Every writer thread ever started, so shutdown can close and wait for all of them.
#[derive(Default)]
pub struct Writers {
    entries: Mutex<Vec<WriterEntry>>,
}

impl Writers {
    /// Starts a writer thread for `queue`, running `write` on each batch once the queue is
    /// activated (`Queue::activate`); closed before that, the thread exits without acting.
    pub fn spawn<T, W>(
        &self,
        name: &'static str,
        key: String,
        queue: Arc<Queue<T>>,
        mut writer: W,
    ) -> Result<Sink<T>, String>
    where
        T: Send + 'static,
        W: BatchWriter<T> + Send + 'static,
    {
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wraith-log-{name}"))
            .spawn(move || run_writer(name, &q, &mut writer))
            .map_err(|e| format!("cannot start the {name} log writer: {e}"))?;
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|e| !e.thread.is_finished());
            entries.push(WriterEntry {
                name,
                control: queue.clone(),
                thread,
            });
        }
        Ok(Sink { name, queue, key })
    }

    /// Closes every sink and waits (until `deadline`) for the writers to drain their queues.
    /// Returns the sinks that did not finish in time.
    pub fn shutdown(&self, deadline: Instant) -> Vec<&'static str> {
        let entries = match self.entries.lock() {
            Ok(mut e) => std::mem::take(&mut *e),
            Err(_) => return Vec::new(),
        };
        for e in &entries {
            e.control.close();
        }
        let mut late = Vec::new();
        for e in entries {
            while !e.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !e.control.is_active() {
                // Built for a reload that failed: it never held a record.
                continue;
            }
            let (queued, accepted, written, dropped) = e.control.counts();
            if e.thread.is_finished() {
                let _ = e.thread.join();
                tracing::info!(
                    sink = e.name,
                    accepted,
                    written,
                    dropped,
                    "access log sink flushed and closed"
                );
                let lost = e.control.lost();
                if lost > 0 {
                    // Requests whose tasks were still being dropped when the wait for them
                    // ran out (serve's TASK_DROP_WAIT).
                    tracing::error!(
                        sink = e.name,
                        lost,
                        "access records emitted after the sink closed were lost"
                    );
                }
            } else {
                tracing::error!(
                    sink = e.name,
                    queued,
                    "access log sink did not drain before the shutdown deadline; records lost"
                );
                late.push(e.name);
            }
        }
        late
    }

    /// Asks every running file sink to reopen its file (SIGUSR1).
    pub fn reopen_all(&self) {
        if let Ok(entries) = self.entries.lock() {
            for e in entries.iter().filter(|e| !e.thread.is_finished()) {
                e.control.reopen();
            }
        }
    }
}

/// Writes batches for one sink.
pub trait BatchWriter<T> {
    /// Writes every item; on error, returns the items still to write (they are retried).
    fn write(&mut self, items: &mut Vec<T>) -> Result<(), String>;
    /// Reopens the output (logrotate).
    fn reopen(&mut self) -> Result<(), String>;
    /// Periodic housekeeping (retention).
    fn tick(&mut self) {}
}

fn run_writer<T, W: BatchWriter<T>>(name: &'static str, queue: &Queue<T>, writer: &mut W) {
    if !queue.wait_active() {
        // Never put in service (the reload it was built for failed): no retention, no reopen.
        return;
    }
    let mut pending: Vec<T> = Vec::new();
    let mut spare: Vec<T> = Vec::new();
    let mut last_warn = Instant::now() - WARN_INTERVAL;
    let mut warned_drops = 0;
    let mut last_error: Option<String> = None;
    let mut failures_after_close = 0;
    loop {
        // While a failed batch waits for its retry, leave new records in the queue: its bound
        // is what keeps memory bounded (and what counts the drops) when the output is stuck.
        let batch = if pending.is_empty() {
            queue.take(std::mem::take(&mut spare))
        } else {
            queue.flags()
        };
        if batch.reopen {
            if let Err(e) = writer.reopen() {
                tracing::error!(sink = name, error = %e, "cannot reopen access log");
            }
        }
        let mut items = batch.items;
        if !pending.is_empty() {
            // Older records first.
            pending.append(&mut items);
            items = std::mem::take(&mut pending);
        }
        let n = items.len();
        if n > 0 {
            match writer.write(&mut items) {
                Ok(()) => {
                    queue.wrote(n);
                    if last_error.take().is_some() {
                        tracing::info!(sink = name, "access log writes work again");
                    }
                }
                Err(e) => {
                    // Keep what was not written and retry; the queue keeps bounding memory.
                    queue.wrote(n - items.len());
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::error!(sink = name, error = %e, "access log write failed; retrying");
                        last_error = Some(e);
                    }
                    pending = std::mem::take(&mut items);
                    std::thread::sleep(FLUSH_INTERVAL);
                }
            }
        }
        items.clear();
        spare = items;
        writer.tick();

        let dropped = queue.dropped.load(Ordering::Relaxed);
        if dropped > warned_drops && last_warn.elapsed() >= WARN_INTERVAL {
            tracing::warn!(
                sink = name,
                dropped = dropped - warned_drops,
                total_dropped = dropped,
                "access log queue full: records dropped (the writer cannot keep up)"
            );
            warned_drops = dropped;
            last_warn = Instant::now();
        }
        if batch.closed {
            if pending.is_empty() && queue.is_empty() {
                break;
            }
            if !pending.is_empty() {
                // Closed, and the output keeps failing: give up after a while rather than
                // retry forever in a thread nobody waits for.
                failures_after_close += 1;
                if failures_after_close >= GIVE_UP_AFTER {
                    tracing::error!(
                        sink = name,
                        lost = pending.len() + queue.len(),
                        "access log sink closed while its output kept failing; records lost"
                    );
                    break;
                }
            }
        }
    }
}

/// Failed write rounds (of `FLUSH_INTERVAL`) a closed sink tries before it gives up.
const GIVE_UP_AFTER: u32 = 100;

/// Opens `path` for appending, creating it (and its directory) if needed.
pub fn open_append(path: &Path) -> Result<File, String> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Without blocking: opening a FIFO for writing waits for a reader (a reload on an
        // async worker froze there). A FIFO with a reader, or a pipe behind /dev/stdout,
        // is fine; one without fails now, with ENXIO.
        opts.mode(0o640).custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| {
        use std::os::unix::fs::FileTypeExt;
        let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
        match e.raw_os_error() {
            Some(libc::ENXIO) if fifo => format!(
                "cannot open {}: a FIFO with no reader (start the reader first)",
                path.display()
            ),
            // /dev/stdout when stdout is a socket (systemd's journal), for one.
            Some(libc::ENXIO) => format!(
                "cannot open {}: {e} (a socket cannot be opened as a file)",
                path.display()
            ),
            _ => format!("cannot open {}: {e}", path.display()),
        }
    })?;
    // Writes block again (the writer thread waits on a full pipe rather than losing lines).
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Formats one item as one or more complete lines.
pub type FormatFn<T> = Box<dyn FnMut(&T, &mut Vec<u8>) + Send>;

/// A line-oriented file sink: formats each item with `format` and appends the batch.
pub struct FileWriter<T> {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    format: FormatFn<T>,
    /// A write failed: reopen before the next one (the file may have been removed).
    broken: bool,
}

impl<T> FileWriter<T> {
    pub fn new(path: PathBuf, format: FormatFn<T>) -> Result<FileWriter<T>, String> {
        let file = open_append(&path)?;
        Ok(FileWriter {
            path,
            file,
            buf: Vec::with_capacity(64 * 1024),
            format,
            broken: false,
        })
    }
}

impl<T> FileWriter<T> {
    /// Takes back the `written` bytes of a batch that failed part way (a full disk, EIO): the
    /// whole batch is retried, and the part left on disk would be a torn line fused with the
    /// next record, then the batch again (duplicates that CrowdSec and Wazuh misparse). Only
    /// when the file is still `start + written` long: bytes another appender added since
    /// (an old writer draining during a reload) are never cut.
    fn cut_back(&mut self, start: Option<u64>, written: usize) -> Result<(), String> {
        let start = start.ok_or("its length was unknown, a partial line is left")?;
        let now = self.file.metadata().map(|m| m.len());
        if now.as_ref().ok() != Some(&(start + written as u64)) {
            return Err("the file changed meanwhile, a partial line is left".into());
        }
        self.file
            .set_len(start)
            .map_err(|e| format!("cannot remove the partial batch ({e}), a partial line is left"))
    }
}

impl<T> BatchWriter<T> for FileWriter<T> {
    fn write(&mut self, items: &mut Vec<T>) -> Result<(), String> {
        if self.broken {
            self.reopen()?;
        }
        self.buf.clear();
        for item in items.iter() {
            (self.format)(item, &mut self.buf);
        }
        // Whole lines in one write: two writers appending to one file never split a line.
        let start = self.file.metadata().map(|m| m.len()).ok();
        let mut written = 0;
        let result = loop {
            match self.file.write(&self.buf[written..]) {
                Ok(0) => break Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Ok(n) => {
                    written += n;
                    if written == self.buf.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) => {
                items.clear();
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                let mut error = format!("cannot write {}: {e}", self.path.display());
                if written > 0 {
                    if let Err(cut) = self.cut_back(start, written) {
                        error.push_str(&format!("; {cut}"));
                    }
                }
                Err(error)
            }
        }
    }

    fn reopen(&mut self) -> Result<(), String> {
        self.file = open_append(&self.path)?;
        self.broken = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_file_size_limit(bytes: libc::rlim_t) {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write the struct we own.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
            lim.rlim_cur = bytes.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
    }

    /// A record offered to a full queue is a drop (the writer did not keep up: counted in
    /// the metric, warned about); one offered after the queue closed is not.
    #[test]
    fn closed_queue_refusals_are_not_counted_as_drops() {
        let metric = Counter::default();
        let q: Queue<u32> = Queue::new(1, metric.clone(), Counter::default());
        assert!(q.push(1));
        assert!(!q.push(2));
        q.close();
        assert!(!q.push(3));
        assert!(!q.push(4));
        assert_eq!(q.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(metric.get(), 1);
        assert_eq!(SinkControl::lost(&q), 2);
    }

    /// A write that fails part way (here: past RLIMIT_FSIZE, as on a full disk) leaves no torn
    /// line: the retried batch lands whole, once.
    #[test]
    fn partial_batch_write_is_taken_back() {
        // Process-wide state: the test runs alone in a child process.
        if !crate::telemetry::alone::in_child(
            "telemetry::sinks::tests::partial_batch_write_is_taken_back",
        ) {
            return;
        }
        // Past the limit a write gets EFBIG, not SIGXFSZ.
        // SAFETY: ignoring a signal in this single-test process.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let format: FormatFn<u32> = Box::new(|n, out| {
            out.extend_from_slice(format!("record {n:04} {}\n", "x".repeat(87)).as_bytes())
        });
        let mut w = FileWriter::new(path.clone(), format).unwrap();
        let mut first = vec![1, 2, 3];
        w.write(&mut first).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 300);

        // Room for one and a half more lines.
        set_file_size_limit(450);
        let mut second = vec![4, 5, 6];
        let err = w.write(&mut second).unwrap_err();
        assert!(err.contains("cannot write"), "{err}");
        assert_eq!(second, [4, 5, 6], "the batch is kept for the retry");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            300,
            "the partial batch is taken back"
        );
        set_file_size_limit(libc::RLIM_INFINITY);
        w.write(&mut second).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| &l[..11]).collect();
        assert_eq!(
            lines,
            [1, 2, 3, 4, 5, 6].map(|n| format!("record {n:04}")),
            "{text}"
        );
        assert!(text.lines().all(|l| l.len() == 99), "{text}");
    }
}
