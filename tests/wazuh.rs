//! The Wazuh bridge through the shipped script `integrations/wazuh/active-response/wraith-ban`,
//! driven by a fake execd that replays wazuh-execd's line protocol (src/os_execd/execd.c):
//! spawn with no argv, one JSON line on stdin, read one `check_keys` line back, answer
//! `continue` or `abort`, wait; for `delete`, write the message and do not read stdout.
//! No Wazuh is installable here; the rule files are linted structurally.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::{json, Value};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integrations/wazuh/active-response/wraith-ban")
}

/// A 4.x message as execd writes it (trimmed from the docs' example alert).
fn v4(command: &str, srcip: Option<&str>, extra_args: &[&str]) -> Value {
    let mut data = json!({});
    if let Some(ip) = srcip {
        data["srcip"] = json!(ip);
    }
    json!({
        "version": 1,
        "origin": {"name": "", "module": "wazuh-execd"},
        "command": command,
        "parameters": {
            "extra_args": extra_args,
            "alert": {
                "timestamp": "2026-01-01T00:00:00.000+0000",
                "rule": {"level": 10, "description": "Wraith: repeated policy denials", "id": "100202", "firedtimes": 1, "groups": ["wraith"]},
                "agent": {"id": "000", "name": "gw-01"},
                "manager": {"name": "gw-01"},
                "id": "1767225600.1",
                "decoder": {"name": "json"},
                "data": data,
                "location": "/var/log/wraith/events.json"
            },
            "program": "active-response/bin/wraith-ban"
        }
    })
}

/// A 5.x message: the alert at the root.
fn v5(command: &str, ip: &str, timeout: u64) -> Value {
    json!({
        "command": command,
        "@timestamp": "2026-01-01T00:00:00Z",
        "source": {"ip": ip},
        "rule": {"id": "100204", "description": "Wraith: repeated client certificate failures"},
        "wazuh": {"active_response": {"name": "wraith-ban", "executable": "wraith-ban",
            "location": "local", "type": "stateful", "stateful_timeout": timeout}}
    })
}

/// The fake execd: runs the shipped script the way execd does.
struct Execd {
    socket: PathBuf,
    log: PathBuf,
    handshake_timeout: &'static str,
}

/// What one run of the script did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    /// The line the script printed (check_keys), if any.
    printed: Option<String>,
    elapsed: Duration,
}

impl Execd {
    fn new(wraith: &Wraith) -> Execd {
        Execd {
            socket: wraith.dir.path().join("admin.sock"),
            log: wraith.dir.path().join("active-responses.log"),
            handshake_timeout: "5s",
        }
    }

    fn spawn(&self) -> Child {
        Command::new("/bin/sh")
            .arg(script())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("WRAITH_BIN", env!("CARGO_BIN_EXE_wraith"))
            .env("WRAITH_ADMIN_SOCKET", &self.socket)
            .env("WRAITH_AR_LOG", &self.log)
            .env("WRAITH_AR_HANDSHAKE_TIMEOUT", self.handshake_timeout)
            // A ban is two fsyncs in Wraith: more than the production 2 s on a loaded CI
            // machine. (No test here needs the call timeout to fire.)
            .env("WRAITH_AR_TIMEOUT", "10s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// add/enable: message, read check_keys, answer (`continue`/`abort`, or nothing).
    fn add(&self, msg: &Value, answer: Option<&str>) -> Run {
        let start = Instant::now();
        let mut child = self.spawn();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{msg}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let n = BufReader::new(stdout).read_line(&mut line).unwrap_or(0);
            let _ = tx.send((n > 0).then_some(line));
        });
        let printed = rx.recv_timeout(Duration::from_secs(15)).ok().flatten();
        if let (Some(_), Some(answer)) = (&printed, answer) {
            // execd answers with the same message, command replaced.
            let mut reply = msg.clone();
            reply["command"] = json!(answer);
            stdin.write_all(format!("{reply}\n").as_bytes()).unwrap();
            stdin.flush().unwrap();
        }
        let code = wait(&mut child, Duration::from_secs(15));
        drop(stdin);
        Run {
            code,
            printed,
            elapsed: start.elapsed(),
        }
    }

    /// delete/disable: the message on stdin; stdout is not read.
    fn delete(&self, msg: &Value) -> Run {
        let start = Instant::now();
        let mut child = self.spawn();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{msg}\n").as_bytes()).unwrap();
        drop(stdin);
        let code = wait(&mut child, Duration::from_secs(15));
        Run {
            code,
            printed: None,
            elapsed: start.elapsed(),
        }
    }

    /// Raw bytes on stdin (malformed input), stdin then closed.
    fn raw(&self, input: &str) -> Run {
        let start = Instant::now();
        let mut child = self.spawn();
        let mut stdin = child.stdin.take().unwrap();
        // (The script may stop reading before the end: an oversized line.)
        let _ = stdin.write_all(input.as_bytes());
        drop(stdin);
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out);
        let code = wait(&mut child, Duration::from_secs(15));
        Run {
            code,
            printed: (!out.is_empty()).then_some(out),
            elapsed: start.elapsed(),
        }
    }
}

fn wait(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn gateway() -> Wraith {
    let setup = Setup::new();
    let listeners = setup.listeners().replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let cfg = format!(
        "{listeners}\n[[route]]\nname = \"home\"\npath = {{ prefix = \"/\" }}\nrespond = {{ status = 200, body = \"ok\\n\" }}\n"
    );
    setup.start(&cfg)
}

async fn decisions(wraith: &Wraith, query: &str) -> Vec<Value> {
    let (st, v) = wraith
        .admin(Method::GET, &format!("/v1/decisions{query}"), None)
        .await;
    assert_eq!(st, 200);
    v["decisions"].as_array().unwrap().clone()
}

async fn status_for(wraith: &Wraith, ip: &str) -> u16 {
    http_client()
        .get(wraith.url("http", "/"))
        .header("x-forwarded-for", ip)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap()
}

#[tokio::test]
async fn wazuh_4_add_abort_delete_through_the_shipped_script() {
    let wraith = gateway();
    let execd = Execd::new(&wraith);
    let ip = "198.51.100.7";

    let msg = v4("add", Some(ip), &["--max-ttl", "3600"]);
    let run = blocking({
        let (e, m) = (execd.clone_paths(), msg.clone());
        move || e.add(&m, Some("continue"))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    let keys: Value = serde_json::from_str(run.printed.as_deref().unwrap()).unwrap();
    assert_eq!(keys["command"], "check_keys");
    assert_eq!(keys["parameters"]["keys"], json!([ip]));
    assert_eq!(keys["origin"]["module"], "active-response");
    let list = decisions(&wraith, "?origin=wazuh").await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["value"], format!("{ip}/32"));
    assert!(list[0]["reason"].as_str().unwrap().contains("100202"));
    let ttl = list[0]["expires_in_secs"].as_u64().unwrap();
    assert!(ttl <= 3600 && ttl > 3500, "max TTL from extra_args: {ttl}");
    assert_eq!(status_for(&wraith, ip).await, 403);

    // The same key again: execd says abort (and resets its timer); no duplicate.
    let run = blocking({
        let (e, m) = (execd.clone_paths(), msg.clone());
        move || e.add(&m, Some("abort"))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(decisions(&wraith, "?origin=wazuh").await.len(), 1);

    // The timed delete.
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&v4("delete", Some(ip), &["--max-ttl", "3600"]))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(decisions(&wraith, "?origin=wazuh").await.is_empty());
    assert_eq!(status_for(&wraith, ip).await, 200);
    // A repeated delete is harmless.
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&v4("delete", Some(ip), &[]))
    });
    assert_eq!(run.code, Some(0));
    let log = std::fs::read_to_string(&execd.log).unwrap();
    assert!(
        log.contains("wraith-ban: added wazuh:wraith-ban ban on 198.51.100.7"),
        "{log}"
    );
}

#[tokio::test]
async fn wazuh_5_enable_disable_ipv6_and_windows_addresses() {
    let wraith = gateway();
    let execd = Execd::new(&wraith);
    let ip = "2001:db8:5::7";
    let run = blocking({
        let e = execd.clone_paths();
        move || e.add(&v5("enable", ip, 600), Some("continue"))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    let list = decisions(&wraith, "?origin=wazuh").await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["value"], "2001:db8:5::7/128");
    let ttl = list[0]["expires_in_secs"].as_u64().unwrap();
    assert!(ttl <= 600 && ttl > 500, "5.x stateful_timeout: {ttl}");
    assert_eq!(status_for(&wraith, ip).await, 403);
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&v5("disable", ip, 600))
    });
    assert_eq!(run.code, Some(0));
    assert_eq!(status_for(&wraith, ip).await, 200);

    // A Windows alert carries the address in win.eventdata.ipAddress.
    let mut msg = v4("add", None, &[]);
    msg["parameters"]["alert"]["data"] = json!({"win": {"eventdata": {"ipAddress": "192.0.2.77"}}});
    let run = blocking({
        let e = execd.clone_paths();
        move || e.add(&msg, Some("continue"))
    });
    assert_eq!(run.code, Some(0));
    assert_eq!(status_for(&wraith, "192.0.2.77").await, 403);
    // No --max-ttl anywhere: the default (24h) caps it.
    let list = decisions(&wraith, "?ip=192.0.2.77").await;
    assert!(list[0]["expires_in_secs"].as_u64().unwrap() <= 86_400);
}

#[tokio::test]
async fn bad_input_and_a_missing_wraith_end_promptly() {
    let wraith = gateway();
    let execd = Execd::new(&wraith);

    // No address in the alert: nothing printed (so execd schedules no delete), exit 0.
    let run = blocking({
        let e = execd.clone_paths();
        move || e.raw(&format!("{}\n", v4("add", None, &[])))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.printed.is_none(), "{run:?}");
    // An invalid address is no address.
    let run = blocking({
        let e = execd.clone_paths();
        move || e.raw(&format!("{}\n", v4("add", Some("999.1.2.3"), &[])))
    });
    assert_eq!(run.code, Some(0));
    assert!(run.printed.is_none());
    // Malformed JSON and unknown commands: exit 1, nothing done.
    for input in ["{not json\n", "{\"command\":\"reboot\"}\n", "\n"] {
        let run = blocking({
            let e = execd.clone_paths();
            let input = input.to_string();
            move || e.raw(&input)
        });
        assert_eq!(run.code, Some(1), "{input:?}: {run:?}");
        assert!(run.printed.is_none());
    }
    // A line without end: read up to 1 MiB, then refused.
    let run = blocking({
        let e = execd.clone_paths();
        move || e.raw(&"x".repeat(3 << 20))
    });
    assert_eq!(run.code, Some(1), "{run:?}");
    let log = std::fs::read_to_string(&execd.log).unwrap_or_default();
    assert!(
        log.contains("execd sent a line longer than 1024 KiB"),
        "{log}"
    );
    assert!(decisions(&wraith, "").await.is_empty());

    // A rule description is the alert's text: its log line reaches a terminal escaped.
    let mut msg = v4("add", Some("192.0.2.8"), &[]);
    msg["parameters"]["alert"]["rule"]["description"] =
        json!("x\u{1b}]0;T\u{7}\rOVER\nFAKE\u{9b}\u{202e}");
    let run = blocking({
        let e = execd.clone_paths();
        move || e.add(&msg, Some("continue"))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    let log = std::fs::read_to_string(&execd.log).unwrap_or_default();
    assert!(
        log.contains(r"x\u{1b}]0;T\u{7}\u{d}OVER\u{a}FAKE\u{9b}\u{202e}"),
        "{log}"
    );
    assert!(
        !log.contains(['\u{1b}', '\u{7}', '\r', '\u{9b}', '\u{202e}']),
        "{log:?}"
    );
    assert!(!log.lines().any(|l| l.starts_with("FAKE")), "{log}");

    // Wraith not running: the script must not hang execd.
    let gone = Execd {
        socket: wraith.dir.path().join("nobody-listens.sock"),
        ..execd.clone_paths()
    };
    let run = blocking(move || gone.add(&v4("add", Some("192.0.2.5"), &[]), Some("continue")));
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.elapsed < Duration::from_secs(10), "{run:?}");

    // execd never answers check_keys (a stateless response): ban after the wait, with the TTL.
    let mut quiet = execd.clone_paths();
    quiet.handshake_timeout = "1s";
    let run = blocking(move || quiet.add(&v4("add", Some("192.0.2.6"), &["--max-ttl=120"]), None));
    assert_eq!(run.code, Some(0), "{run:?}");
    let list = decisions(&wraith, "?ip=192.0.2.6").await;
    assert_eq!(list.len(), 1);
    assert!(list[0]["expires_in_secs"].as_u64().unwrap() <= 120);

    // A 5.x stateless AR: execd answers no check_keys, so none is sent (and none awaited).
    let stateless = execd.clone_paths();
    let mut msg = v5("enable", "192.0.2.7", 0);
    msg["wazuh"]["active_response"]["type"] = json!("stateless");
    msg["wazuh"]["active_response"]
        .as_object_mut()
        .unwrap()
        .remove("stateful_timeout");
    let log = execd.log.clone();
    let run = blocking(move || stateless.raw(&format!("{msg}\n")));
    assert_eq!(
        run.code,
        Some(0),
        "{run:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(run.printed.is_none(), "check_keys sent: {run:?}");
    assert_eq!(decisions(&wraith, "?ip=192.0.2.7").await.len(), 1);
}

#[tokio::test]
async fn a_wazuh_delete_never_lifts_another_origins_ban() {
    let wraith = gateway();
    let execd = Execd::new(&wraith);
    let ip = "203.0.113.70";
    let (st, _) = wraith
        .admin(
            Method::POST,
            "/v1/decisions",
            Some(json!({"ip": ip, "origin": "admin", "duration": "1h"})),
        )
        .await;
    assert_eq!(st, 201);
    let run = blocking({
        let e = execd.clone_paths();
        move || e.add(&v4("add", Some(ip), &[]), Some("continue"))
    });
    assert_eq!(run.code, Some(0));
    assert_eq!(decisions(&wraith, &format!("?ip={ip}")).await.len(), 2);
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&v4("delete", Some(ip), &[]))
    });
    assert_eq!(run.code, Some(0));
    let left = decisions(&wraith, &format!("?ip={ip}")).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["origin"], "admin");
    assert_eq!(status_for(&wraith, ip).await, 403);
}

/// The same 4.x message from another AR: execd runs `program` instead (a copy of the script
/// under another name, for a `<command>` with another `<timeout>`).
fn from_program(mut msg: Value, program: &str) -> Value {
    msg["parameters"]["program"] = json!(format!("active-response/bin/{program}"));
    msg
}

#[tokio::test]
async fn two_active_responses_hold_their_own_bans() {
    let wraith = gateway();
    let execd = Execd::new(&wraith);
    let ip = "203.0.113.72";
    // A 600 s AR and a one-day AR fire for the same address: execd keeps two timers.
    for program in ["wraith-ban", "wraith-ban-24h"] {
        let run = blocking({
            let (e, m) = (
                execd.clone_paths(),
                from_program(v4("add", Some(ip), &[]), program),
            );
            move || e.add(&m, Some("continue"))
        });
        assert_eq!(run.code, Some(0), "{run:?}");
    }
    let origins = |list: Vec<Value>| -> Vec<String> {
        list.iter()
            .map(|d| d["origin"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        origins(decisions(&wraith, "?origin=wazuh").await),
        ["wazuh:wraith-ban", "wazuh:wraith-ban-24h"]
    );
    // The short one's delete: the long one still bans.
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&from_program(v4("delete", Some(ip), &[]), "wraith-ban"))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(status_for(&wraith, ip).await, 403);
    assert_eq!(
        origins(decisions(&wraith, &format!("?ip={ip}")).await),
        ["wazuh:wraith-ban-24h"]
    );
    // The long one's delete lifts it.
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&from_program(v4("delete", Some(ip), &[]), "wraith-ban-24h"))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(status_for(&wraith, ip).await, 200);
    assert!(decisions(&wraith, &format!("?ip={ip}")).await.is_empty());

    // 5.x names the AR's executable in wazuh.active_response: the same holds.
    let mut long = v5("enable", ip, 86_400);
    long["wazuh"]["active_response"]["executable"] = json!("wraith-ban-24h");
    for msg in [v5("enable", ip, 600), long.clone()] {
        let run = blocking({
            let e = execd.clone_paths();
            move || e.add(&msg, Some("continue"))
        });
        assert_eq!(run.code, Some(0), "{run:?}");
    }
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&v5("disable", ip, 600))
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(status_for(&wraith, ip).await, 403);
    long["command"] = json!("disable");
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&long)
    });
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(status_for(&wraith, ip).await, 200);
    let log = std::fs::read_to_string(&execd.log).unwrap();
    assert!(
        log.contains("lifted the wazuh:wraith-ban-24h ban on 203.0.113.72"),
        "{log}"
    );
}

#[tokio::test]
async fn a_wazuh_delete_never_lifts_a_crowdsec_ban() {
    if !common::crowdsec::available("a_wazuh_delete_never_lifts_a_crowdsec_ban") {
        return;
    }
    let cs = common::crowdsec::Crowdsec::lapi();
    let setup = Setup::new();
    let listeners = setup.listeners().replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let cfg = format!(
        "{listeners}\n[crowdsec]\nlapi_url = \"{}\"\napi_key = \"{}\"\nupdate_frequency = \"300ms\"\n\n[[route]]\nname = \"home\"\npath = {{ prefix = \"/\" }}\nrespond = {{ status = 200, body = \"ok\\n\" }}\n",
        cs.url(),
        common::crowdsec::BOUNCER_KEY
    );
    let wraith = setup.start(&cfg);
    let ip = "203.0.113.71";
    cs.cscli_ok(&["decisions", "add", "--ip", ip, "--duration", "1h"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while decisions(&wraith, &format!("?ip={ip}&source=crowdsec"))
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "{}", wraith.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let execd = Execd::new(&wraith);
    let run = blocking({
        let e = execd.clone_paths();
        move || e.add(&v4("add", Some(ip), &[]), Some("continue"))
    });
    assert_eq!(run.code, Some(0));
    let run = blocking({
        let e = execd.clone_paths();
        move || e.delete(&v4("delete", Some(ip), &[]))
    });
    assert_eq!(run.code, Some(0));
    let left = decisions(&wraith, &format!("?ip={ip}")).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["source"], "crowdsec");
    assert_eq!(status_for(&wraith, ip).await, 403);
}

impl Execd {
    fn clone_paths(&self) -> Execd {
        Execd {
            socket: self.socket.clone(),
            log: self.log.clone(),
            handshake_timeout: self.handshake_timeout,
        }
    }
}

/// The shipped rules and their test file, checked the way Wazuh would read them (as far as
/// that is possible without a manager): ids in 100200-100299 and unique, every reference to
/// a defined rule, tags balanced, and every test stanza naming a defined rule and its level.
#[test]
fn the_shipped_rules_are_consistent() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("integrations/wazuh");
    let xml = std::fs::read_to_string(root.join("rules/wraith_rules.xml")).unwrap();
    let rule_re = regex::Regex::new(r#"<rule id="(\d+)" level="(\d+)""#).unwrap();
    let mut levels = std::collections::HashMap::new();
    for c in rule_re.captures_iter(&xml) {
        let id: u32 = c[1].parse().unwrap();
        assert!((100200..=100299).contains(&id), "rule id {id} out of range");
        assert!(
            levels.insert(id, c[2].parse::<u32>().unwrap()).is_none(),
            "duplicate {id}"
        );
    }
    assert!(levels.len() >= 8);
    let ref_re = regex::Regex::new(r"<if_(?:matched_)?sid>(\d+)</if_").unwrap();
    for c in ref_re.captures_iter(&xml) {
        let id: u32 = c[1].parse().unwrap();
        assert!(levels.contains_key(&id), "reference to undefined rule {id}");
    }
    // Balanced tags once comments are removed (Wazuh files have several roots, so this is
    // a tag-stack check rather than a document parse).
    let no_comments = regex::Regex::new(r"(?s)<!--.*?-->")
        .unwrap()
        .replace_all(&xml, "");
    let tag_re = regex::Regex::new(r"<(/?)([a-z_]+)[^>]*?(/?)>").unwrap();
    let mut stack: Vec<String> = Vec::new();
    for c in tag_re.captures_iter(&no_comments) {
        let (close, name, selfclose) = (&c[1] == "/", c[2].to_string(), &c[3] == "/");
        if selfclose {
            continue;
        }
        if close {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.as_str()),
                "unbalanced </{name}>"
            );
        } else {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    // Every test stanza names an existing rule with its level, and its logs are JSON with a
    // top-level srcip.
    let ini = std::fs::read_to_string(root.join("tests/wraith.ini")).unwrap();
    let mut stanzas = 0;
    for block in ini.split("\n[").skip(1) {
        stanzas += 1;
        let field = |k: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = ")))
                .unwrap_or_else(|| panic!("stanza without {k}: {block}"))
                .trim()
                .to_string()
        };
        let rule: u32 = field("rule").parse().unwrap();
        let alert: u32 = field("alert").parse().unwrap();
        assert_eq!(levels.get(&rule), Some(&alert), "stanza {block}");
        assert_eq!(field("decoder"), "json");
        for l in block.lines().filter(|l| l.starts_with("log ")) {
            let json = l.split_once(" pass = ").unwrap().1;
            let v: Value = serde_json::from_str(json).unwrap();
            assert!(
                v["srcip"].is_string() && v["wraith"]["event"].is_string(),
                "{l}"
            );
        }
    }
    assert!(stanzas >= 7);
    // The ossec.conf snippets name the script and level-10 rules that exist.
    let conf = std::fs::read_to_string(root.join("ossec.conf")).unwrap();
    assert!(conf.contains("<executable>wraith-ban</executable>"));
    let ids = regex::Regex::new(r"<rules_id>([\d,]+)</rules_id>").unwrap();
    for id in ids.captures(&conf).unwrap()[1].split(',') {
        let id: u32 = id.parse().unwrap();
        if (100200..=100299).contains(&id) {
            assert_eq!(levels.get(&id), Some(&10), "active response on rule {id}");
        }
    }
}
