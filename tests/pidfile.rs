//! The pid file is trusted only while a server holds its lock: a file left by a killed server,
//! whose pid an unrelated process may have by now, is never signalled by `stop`/`reload` and
//! never keeps `serve` from starting; two servers on one config never both run; and a second
//! SIGTERM exits at once even with a log sink that cannot write.

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

#[test]
fn stop_and_reload_find_a_server_of_an_older_wraith_that_holds_no_lock() {
    let setup = Setup::new();
    let cfg = config(&setup, "");
    let mut wraith = setup.start(&cfg);
    // An older Wraith wrote its pid file without locking it: the same server seen through a
    // config whose pid file nobody locks.
    let legacy_cfg = wraith.path("legacy.toml");
    std::fs::write(
        &legacy_cfg,
        cfg.replace("pid_file = \"wraith.pid\"", "pid_file = \"legacy.pid\""),
    )
    .unwrap();
    std::fs::write(wraith.path("legacy.pid"), format!("{}\n", wraith.pid())).unwrap();
    let legacy = legacy_cfg.to_str().unwrap();
    let dir = wraith.path("");

    // A new server on that config does not start beside it (or take its pid file).
    let (code, out, err) = wraith_cmd(&["serve", "-c", legacy], &dir);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("holds no lock on it"), "{err}");
    assert_eq!(
        std::fs::read_to_string(wraith.path("legacy.pid")).unwrap(),
        format!("{}\n", wraith.pid())
    );

    let (code, out, err) = wraith_cmd(&["reload", "-c", legacy], &dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("holds no lock"), "{err}");
    let (code, out, err) = wraith_cmd(&["stop", "-c", legacy], &dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stopped"), "{out}");
    assert_eq!(wraith.wait_exit(Duration::from_secs(10)), Some(0));
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
