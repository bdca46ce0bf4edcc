//! The process metrics every Prometheus client library exports (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, ...), under the same names, so the
//! dashboards and alerts written for them (file descriptors near the limit, memory growth)
//! work on Wraith unchanged. Read from `/proc/self` at scrape time; where it cannot be read
//! (not Linux) the metrics are left out rather than reported as zero.

use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What `/proc/self/stat` says about the process.
#[derive(Debug, PartialEq)]
struct Stat {
    /// User and system CPU time, in clock ticks.
    cpu_ticks: u64,
    /// Virtual memory size, in bytes.
    virtual_bytes: u64,
    /// Resident set size, in pages.
    resident_pages: u64,
}

/// Reads the fields after the command name: the name is in parentheses and may itself hold
/// spaces and `)`, so the fields are counted from the last `)` (proc(5)).
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // After ")": state is field 3 of proc(5), so field n is at index n - 3.
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The number of open file descriptors (the entries of `/proc/self/fd`, less the one the
/// listing itself holds).
fn open_fds() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

/// The soft limit on open file descriptors (what `accept` runs into).
fn max_fds() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    Some(lim.rlim_cur)
}

/// A `sysconf` value, if the system has one.
fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf only reads the configuration value named.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|&v| v > 0)
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, g);
}

/// Adds the process metrics to `registry`; `started_at` is when the process started.
pub fn register(registry: &mut Registry, started_at: SystemTime) {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat(&t));
    if let (Some(stat), Some(ticks)) = (stat, sysconf(libc::_SC_CLK_TCK)) {
        let cpu: Counter<f64, AtomicU64> = Counter::default();
        cpu.inc_by(stat.cpu_ticks as f64 / ticks as f64);
        registry.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            cpu,
        );
        gauge(
            registry,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            stat.virtual_bytes,
        );
        if let Some(page) = sysconf(libc::_SC_PAGESIZE) {
            gauge(
                registry,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stat.resident_pages.saturating_mul(page),
            );
        }
    }
    if let Some(n) = open_fds() {
        gauge(
            registry,
            "process_open_fds",
            "Number of open file descriptors",
            n,
        );
    }
    if let Some(n) = max_fds() {
        gauge(
            registry,
            "process_max_fds",
            "Maximum number of open file descriptors",
            n,
        );
    }
    if let Ok(since) = started_at.duration_since(SystemTime::UNIX_EPOCH) {
        let start: Gauge<f64, AtomicU64> = Gauge::default();
        start.set(since.as_secs_f64());
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            start,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command name may hold spaces and parentheses: fields count from the last `)`.
    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let text = "4242 (wr) ai(t h) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    150 50 0 0 20 0 3 0 12345 104857600 2560 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                cpu_ticks: 200,
                virtual_bytes: 104_857_600,
                resident_pages: 2560,
            })
        );
        assert_eq!(parse_stat("4242 (wraith) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    /// This process's own figures are read and plausible.
    #[test]
    fn the_running_process_is_described() {
        let mut registry = Registry::default();
        register(&mut registry, SystemTime::now());
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &registry).unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing: {text}");
        }
        // (Other tests open files at the same time: only a floor is certain.)
        assert!(open_fds().unwrap() >= 3, "stdin, stdout, stderr at least");
    }
}
