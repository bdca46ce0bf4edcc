//! systemd's service notification protocol (`sd_notify(3)`), for units with `Type=notify`:
//! `READY=1` once every listener is bound and the server serves (systemd starts units ordered
//! after this one only then, and `systemctl start` returns only then), `RELOADING=1` ...
//! `READY=1` around a reload (so `systemctl reload` and `Type=notify-reload` see it end), and
//! `STOPPING=1` with the drain's length when a drain begins (`EXTEND_TIMEOUT_USEC`: systemd
//! does not kill a draining server before `shutdown_timeout` is over). `STATUS=` lines show in
//! `systemctl status`.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or `Type=` something else) nothing is
//! sent. The protocol is one datagram of `KEY=value` lines to the `AF_UNIX` socket that
//! variable names: a path, or an abstract name when it starts with `@`.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=value` assignments) to systemd, if it listens. A
/// failure is logged (at debug: a unit without `Type=notify` can still set the variable for a
/// child) and otherwise ignored: the server serves whether or not systemd hears.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::debug!(socket = ?path, error = %e, "cannot notify systemd");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?
        }
        None => socket.send_to(state.as_bytes(), path)?,
    };
    if sent != state.len() {
        return Err(std::io::Error::other("the notification was cut short"));
    }
    Ok(())
}

/// The server is up: listeners bound, admin socket open.
pub fn ready(generation: u64) {
    notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving (configuration generation {generation})",
        std::process::id()
    ));
}

/// A reload begins. `MONOTONIC_USEC` (CLOCK_MONOTONIC) is what `Type=notify-reload` expects
/// with it (systemd 253 and later; earlier ones ignore it).
pub fn reloading() {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
        monotonic_usec()
    ));
}

/// A reload ended, applied or refused (the old configuration then still serves).
pub fn reloaded(result: &Result<u64, Vec<String>>) {
    let status = match result {
        Ok(generation) => format!("serving (configuration generation {generation})"),
        Err(reasons) => format!(
            "serving; the last reload was refused: {}",
            reasons
                .first()
                .map(String::as_str)
                .unwrap_or("unknown reason")
        ),
    };
    // One line: a reason could hold a newline, which would start an assignment of its own.
    notify(&format!("READY=1\nSTATUS={}", status.replace('\n', " ")));
}

/// A drain begins; it lasts at most `timeout` (plus the log flush after it).
pub fn stopping(timeout: Duration) {
    // Room for the flush of the log queues and the state file after the drain.
    let extend = timeout + Duration::from_secs(10);
    notify(&format!(
        "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=draining connections (up to {})",
        extend.as_micros(),
        crate::config::units::format_duration(timeout)
    ));
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("wraith-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
