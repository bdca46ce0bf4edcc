//! The files in `integrations/` that run Wraith as an operator would: the systemd unit
//! (checked by systemd's own `systemd-analyze`) and the logrotate configuration (run by the
//! real `logrotate` against a running server, which must reopen its logs and lose no line).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn integration(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("integrations")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tool(name: &str) -> String {
    ["/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/"]
        .iter()
        .map(|dir| format!("{dir}{name}"))
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("{name} is not installed (.ci/install-deps.sh installs it)"))
}

/// The unit parses without a warning (`systemd-analyze verify`: unknown keys, bad values,
/// missing executables) and its sandbox rates "OK" or better in `systemd-analyze security`.
#[test]
fn the_systemd_unit_verifies_and_its_sandbox_rates_ok() {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("wraith.service");
    let text = integration("systemd/wraith.service")
        .replace("/usr/local/bin/wraith", env!("CARGO_BIN_EXE_wraith"));
    assert!(text.contains("Type=notify"), "READY=1 is what Wraith sends");
    std::fs::write(&unit, text).unwrap();
    let out = Command::new(tool("systemd-analyze"))
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("wraith.service"),
        "systemd-analyze had something to say about the unit:\n{said}"
    );

    let out = Command::new(tool("systemd-analyze"))
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for wraith.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(
        level <= 2.0,
        "exposure {level} (systemd rates up to 2.0 as OK or better):\n{report}"
    );
}

/// logrotate, with the shipped `integrations/logrotate/wraith`, rotates the access logs of a
/// running server: its `postrotate` (`wraith reopen`) makes the server reopen them, the lines
/// from before are in the rotated files and the ones after in the new files, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_rotates_the_logs_of_a_running_server_and_loses_no_line() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[log.json]\npath = \"logs/access.json\"\n[log.combined]\npath = \"logs/access.log\"\n\n\
         [[route]]\nname = \"hello\"\nrespond = {{ status = 200, body = \"hi\" }}\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let logs = wraith.path("logs");
    let client = http_client();
    let send = |n: usize, tag: &'static str| {
        let (client, url) = (client.clone(), wraith.url("http", "/"));
        async move {
            for i in 0..n {
                let r = client.get(format!("{url}{tag}-{i}")).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        }
    };
    let lines_in = |name: &str| {
        std::fs::read_to_string(logs.join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let wait_for = |name: &'static str, n: usize| {
        let lines_in = &lines_in;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while lines_in(name) < n {
                assert!(
                    Instant::now() < deadline,
                    "{name}: {} lines, not {n}",
                    lines_in(name)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    send(5, "before").await;
    wait_for("access.json", 5).await;
    wait_for("access.log", 5).await;

    let conf = wraith.path("logrotate.conf");
    std::fs::write(
        &conf,
        integration("logrotate/wraith")
            .replace("/var/log/wraith", logs.to_str().unwrap())
            .replace("/usr/local/bin/wraith", env!("CARGO_BIN_EXE_wraith"))
            .replace(
                "/etc/wraith/wraith.toml",
                wraith.config_path.to_str().unwrap(),
            ),
    )
    .unwrap();
    let out = Command::new(tool("logrotate"))
        .arg("--force")
        .arg("--state")
        .arg(wraith.path("logrotate.state"))
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // delaycompress: the newest rotation stays plain.
    assert_eq!(lines_in("access.json.1"), 5);
    assert_eq!(lines_in("access.log.1"), 5);
    assert!(
        wraith
            .wait_log(Duration::from_secs(10), |l| l["message"]
                .as_str()
                .is_some_and(|m| m.contains("reopening log files")))
            .is_some(),
        "postrotate did not reach the server:\n{}",
        wraith.log()
    );

    send(3, "after").await;
    wait_for("access.json", 3).await;
    wait_for("access.log", 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        lines_in("access.json"),
        3,
        "only the requests after the rotation"
    );
    assert_eq!(
        lines_in("access.json.1"),
        5,
        "nothing after the rotation went to the old file"
    );
    assert!(std::fs::read_to_string(logs.join("access.log"))
        .unwrap()
        .contains("/after-0"));
}
