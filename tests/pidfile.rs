//! The pid file is trusted only while a server holds its lock, and only for the pid of the
//! lock's holder: a file left by a killed server, whose pid another process (a wraith, even)
//! may have by now, is never signalled by `stop`/`reload` and never keeps `serve` from
//! starting; nor is a pid someone else wrote into a locked file; `serve` makes its pid file
//! anew; two servers on one config never both run; and a second SIGTERM exits at once even
//! with a log sink that cannot write.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyper::Response;

/// The standard listeners (port 0) and one route answered by the gateway itself.
fn config(setup: &Setup, extra: &str) -> String {
    format!(
        "{}\n[[route]]\nname = 'hello'\npath = {{ exact = '/' }}\nrespond = {{ status = 200, body = 'hello' }}\n{extra}",
        setup.listeners()
    )
}

/// An unrelated process, standing in for whatever got a dead server's pid.
struct Bystander(Child);

impl Bystander {
    fn start() -> Bystander {
        Bystander(
            Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn sleep"),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Still running (not killed by a stray SIGTERM or SIGHUP).
    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stop_and_reload_never_signal_the_pid_in_a_stale_pid_file() {
    let setup = Setup::new();
    let cfg_path = setup.dir.path().join("wraith.toml");
    std::fs::write(&cfg_path, config(&setup, "")).unwrap();
    let cfg = cfg_path.to_str().unwrap();
    let pid_file = setup.dir.path().join("wraith.pid");

    // A server that was SIGKILLed left its pid file; the pid now belongs to `sleep`.
    let mut bystander = Bystander::start();
    std::fs::write(&pid_file, format!("{}\n", bystander.pid())).unwrap();
    for cmd in ["stop", "reload"] {
        let (code, out, err) = wraith_cmd(&[cmd, "-c", cfg], setup.dir.path());
        assert_ne!(code, 0, "{cmd}: {out}{err}");
        assert!(err.contains("is stale"), "{cmd}: {err}");
        assert!(err.contains(&bystander.pid().to_string()), "{cmd}: {err}");
    }
    // A signal would have been sent before the commands returned; give its delivery a moment
    // (there is nothing to await for a signal that must not arrive).
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        bystander.alive(),
        "stop or reload signalled an unrelated process"
    );

    // An empty pid file (a crash between truncate and write) is stale too.
    std::fs::write(&pid_file, "").unwrap();
    for cmd in ["stop", "reload"] {
        let (code, out, err) = wraith_cmd(&[cmd, "-c", cfg], setup.dir.path());
        assert_ne!(code, 0, "{cmd}: {out}{err}");
        assert!(err.contains("is stale"), "{cmd}: {err}");
    }
}

/// Another instance's pid file, left unlocked by a server that was killed, whose pid now
/// belongs to a running wraith (pid reuse): stale like any other. `stop` and `reload` signal
/// nothing, and `serve` on that config starts (replacing the file) instead of telling the
/// operator to stop the wraith it names.
#[test]
fn an_unlocked_pid_file_naming_a_running_wraith_is_stale() {
    let setup = Setup::new();
    let cfg = config(&setup, "");
    let mut wraith = setup.start(&cfg);
    let other_cfg = wraith.path("other.toml");
    std::fs::write(
        &other_cfg,
        cfg.replace("pid_file = \"wraith.pid\"", "pid_file = \"other.pid\"")
            .replace(
                "admin_socket = \"admin.sock\"",
                "admin_socket = \"other.sock\"",
            ),
    )
    .unwrap();
    let other_pid = wraith.path("other.pid");
    std::fs::write(&other_pid, format!("{}\n", wraith.pid())).unwrap();
    let other = other_cfg.to_str().unwrap();
    let dir = wraith.path("");

    for cmd in ["stop", "reload"] {
        let (code, out, err) = wraith_cmd(&[cmd, "-c", other], &dir);
        assert_ne!(code, 0, "{cmd}: {out}{err}");
        assert!(err.contains("is stale"), "{cmd}: {err}");
        assert!(err.contains(&wraith.pid().to_string()), "{cmd}: {err}");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        wraith.wait_exit(Duration::from_millis(100)),
        None,
        "stop signalled the wraith a stale pid file named"
    );
    assert!(
        !wraith.log().contains("SIGHUP"),
        "reload signalled the wraith a stale pid file named:\n{}",
        wraith.log()
    );

    // A server on the other config takes the stale file over; `stop` on that config then
    // stops it, and only it.
    let mut second = Command::new(env!("CARGO_BIN_EXE_wraith"))
        .args(["serve", "-c", other])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mine = format!("{}\n", second.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&other_pid).ok().as_deref() != Some(mine.as_str()) {
        if Instant::now() >= deadline || second.try_wait().unwrap().is_some() {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second server did not take over the stale pid file");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = wraith_cmd(&["stop", "-c", other], &dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("process {} exited", second.id())),
        "{out}"
    );
    assert!(second.wait().unwrap().success());
    let (code, out, err) = wraith.cli(&["status"]);
    assert_eq!(code, 0, "the first server stopped too: {out}{err}");
    assert_eq!(wraith.wait_exit(Duration::from_millis(100)), None);
}

/// A locked pid file is signalled only when the pid it names is its lock holder's: a file
/// whose content someone rewrote, or one locked in a way that does not tell by whom, gets
/// no signal sent to the pid it names.
#[test]
fn stop_and_reload_signal_only_the_lock_holder() {
    let setup = Setup::new();
    let cfg_path = setup.dir.path().join("wraith.toml");
    std::fs::write(&cfg_path, config(&setup, "")).unwrap();
    let cfg = cfg_path.to_str().unwrap();
    let pid_file = setup.dir.path().join("wraith.pid");
    let mut bystander = Bystander::start();

    // This test process holds the POSIX lock; the file names the bystander.
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&pid_file)
            .unwrap();
        std::io::Write::write_all(&mut &file, format!("{}\n", bystander.pid()).as_bytes()).unwrap();
        // SAFETY: a plain C struct, all zeroes valid; fcntl on a descriptor we own.
        let mut l: libc::flock = unsafe { std::mem::zeroed() };
        l.l_type = libc::F_WRLCK as libc::c_short;
        l.l_whence = libc::SEEK_SET as libc::c_short;
        assert_eq!(
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_SETLK, &l) },
            0
        );
        for cmd in ["stop", "reload"] {
            let (code, out, err) = wraith_cmd(&[cmd, "-c", cfg], setup.dir.path());
            assert_ne!(code, 0, "{cmd}: {out}{err}");
            assert!(
                err.contains(&format!(
                    "names process {} but is locked by process {}",
                    bystander.pid(),
                    std::process::id()
                )),
                "{cmd}: {err}"
            );
        }
    }

    // A flock only (what a server of an older wraith holds) says nothing about who holds it.
    {
        let file = std::fs::File::open(&pid_file).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(
            unsafe {
                libc::flock(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    libc::LOCK_EX | libc::LOCK_NB,
                )
            },
            0
        );
        for cmd in ["stop", "reload"] {
            let (code, out, err) = wraith_cmd(&[cmd, "-c", cfg], setup.dir.path());
            assert_ne!(code, 0, "{cmd}: {out}{err}");
            assert!(err.contains("nothing was signalled"), "{cmd}: {err}");
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        bystander.alive(),
        "stop or reload signalled a pid its lock holder did not write"
    );
}

/// `serve` makes its pid file anew rather than writing into one that is already there: whoever
/// made that one (another user, say) and kept it open cannot rewrite the running server's pid
/// file to point `stop` at another process.
#[tokio::test]
async fn serve_creates_its_pid_file_afresh() {
    use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
    let mut bystander = Bystander::start();
    let setup = Setup::new();
    let cfg = config(&setup, "");
    let path = setup.dir.path().join("wraith.pid");
    let planted = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    planted
        .set_permissions(std::fs::Permissions::from_mode(0o666))
        .unwrap();
    let planted_ino = planted.metadata().unwrap().ino();
    let mut wraith = setup.start(&cfg);
    assert_ne!(
        std::fs::metadata(wraith.path("wraith.pid")).unwrap().ino(),
        planted_ino,
        "the server wrote into the file that was there"
    );
    assert_eq!(
        std::fs::metadata(wraith.path("wraith.pid"))
            .unwrap()
            .permissions()
            .mode()
            & 0o022,
        0
    );

    // Through the descriptor kept open: the server's pid file is not that file any more.
    planted.set_len(0).unwrap();
    planted
        .write_all_at(format!("{}\n", bystander.pid()).as_bytes(), 0)
        .unwrap();
    let (code, out, err) = wraith.cli(&["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("process {} exited", wraith.pid())),
        "{out}"
    );
    assert_eq!(wraith.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(bystander.alive());
}

#[tokio::test]
async fn serve_takes_over_a_stale_or_empty_pid_file() {
    let mut bystander = Bystander::start();
    for stale in [format!("{}\n", bystander.pid()), String::new()] {
        let setup = Setup::new();
        let cfg = config(&setup, "");
        std::fs::write(setup.dir.path().join("wraith.pid"), &stale).unwrap();
        let mut wraith = setup.start(&cfg);

        let resp = http_client()
            .get(wraith.url("http", "/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            wraith.log_json().iter().any(|l| l["message"]
                == "taking over a stale pid file (no running wraith held its lock)"),
            "{}",
            wraith.log()
        );
        assert_eq!(
            std::fs::read_to_string(wraith.path("wraith.pid")).unwrap(),
            format!("{}\n", wraith.pid())
        );

        // And it is the server `stop` finds now.
        let (code, out, err) = wraith.cli(&["stop"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(wraith.wait_exit(Duration::from_secs(10)), Some(0));
        assert!(!wraith.path("wraith.pid").exists());
    }
    assert!(bystander.alive());
}

#[tokio::test]
async fn a_second_server_on_the_same_config_fails_fast_and_the_first_keeps_serving() {
    let setup = Setup::new();
    let cfg = config(&setup, "");
    let wraith = setup.start(&cfg);

    // Its listeners are on port 0 too, so only the pid file's lock can stop it.
    let mut second = Command::new(env!("CARGO_BIN_EXE_wraith"))
        .args(["serve", "-c"])
        .arg(&wraith.config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second wraith serve on the same config kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("is locked by process {}", wraith.pid())),
        "{err}"
    );
    assert!(err.contains("another wraith is running"), "{err}");

    // The first still serves, still owns its pid file, and still answers on its admin socket.
    let resp = http_client()
        .get(wraith.url("http", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        std::fs::read_to_string(wraith.path("wraith.pid")).unwrap(),
        format!("{}\n", wraith.pid())
    );
    let (code, out, err) = wraith.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_even_with_a_log_sink_that_cannot_write() {
    // An upstream that does not answer within the test, so the drain cannot finish on its own.
    let (entered_tx, mut entered_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let upstream = Upstream::start(move |_req| {
        let entered = entered_tx.clone();
        async move {
            let _ = entered.send(());
            tokio::time::sleep(Duration::from_secs(60)).await;
            Response::new(full("late"))
        }
    })
    .await;
    let setup = Setup::new();
    // /dev/full fails every write with ENOSPC: the sink retries, and at a normal exit it would
    // get the whole shutdown_timeout (120 s here, far past the wait for the exit below) to
    // drain, as would the request in flight.
    let cfg = config(
        &setup,
        &format!(
            "\n[[upstream]]\nname = 'slow'\nendpoints = ['{}']\n\n[[route]]\nname = 'slow'\npath = {{ prefix = '/slow' }}\nupstream = 'slow'\n\n[log.json]\npath = '/dev/full'\n",
            upstream.addr
        ),
    )
    .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"120s\"");
    assert!(cfg.contains("shutdown_timeout = \"120s\""));
    let mut wraith = setup.start(&cfg);

    // One record the sink cannot write, and one request the drain waits for.
    let resp = http_client()
        .get(wraith.url("http", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(wraith
        .wait_log(Duration::from_secs(10), |l| l["message"]
            == "access log write failed; retrying")
        .is_some());
    let slow = tokio::spawn({
        let url = wraith.url("http", "/slow");
        async move { http_client().get(url).send().await }
    });
    entered_rx.recv().await.unwrap();

    wraith.signal(libc::SIGTERM);
    assert!(wraith
        .wait_log(Duration::from_secs(10), |l| l["message"]
            == "SIGTERM: draining")
        .is_some());
    wraith.signal(libc::SIGTERM);
    assert_eq!(
        wraith.wait_exit(Duration::from_secs(10)),
        Some(130),
        "{}",
        wraith.log()
    );
    assert!(!wraith.path("wraith.pid").exists());
    slow.abort();
}

#[tokio::test]
async fn a_reload_naming_the_same_pid_file_another_way_keeps_it() {
    let setup = Setup::new();
    let run = setup.dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::symlink(&run, setup.dir.path().join("alias")).unwrap();
    let cfg =
        config(&setup, "").replace("pid_file = \"wraith.pid\"", "pid_file = \"run/wraith.pid\"");
    assert!(cfg.contains("run/wraith.pid"), "{cfg}");
    let mut wraith = setup.start(&cfg);
    // `alias/wraith.pid` is `run/wraith.pid` through a symlink (as /var/run is /run).
    wraith.write_config(&cfg.replace("run/wraith.pid", "alias/wraith.pid"));
    wraith.reload().unwrap();
    let (code, out, err) = wraith.cli(&["reload"]);
    assert_eq!(
        code, 0,
        "the server still holds its pid file's lock: {out}{err}"
    );
    let (code, out, err) = wraith.cli(&["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(wraith.wait_exit(Duration::from_secs(10)), Some(0));
}
