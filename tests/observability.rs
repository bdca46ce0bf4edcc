//! Observability end to end: one access record per request in every sink whatever the exit,
//! the combined log read by Debian's CrowdSec, `wraith logs` presets and read-only SQL, metrics
//! that parse and match, back-pressure on a stalled SQLite writer, flush on SIGTERM, log files
//! reopened on SIGUSR1 and reload, `wraith status` and `wraith top`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream with a few behaviours, by path.
async fn upstream() -> Upstream {
    upstream_notifying(Arc::new(tokio::sync::Notify::new())).await
}

/// `upstream()`, notifying `hang` when a request for `/app/hang` arrives.
async fn upstream_notifying(hang: Arc<tokio::sync::Notify>) -> Upstream {
    Upstream::start(move |req: Request<Incoming>| {
        let hang = hang.clone();
        async move { app(req, &hang).await }
    })
    .await
}

async fn app(req: Request<Incoming>, hang: &tokio::sync::Notify) -> Response<TestBody> {
    match req.uri().path() {
        // Slower than the upstream's response timeout: 504.
        "/app/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full("late"))
        }
        // Never answers in time for the client that asks (it gives up first).
        "/app/hang" => {
            hang.notify_one();
            tokio::time::sleep(Duration::from_secs(20)).await;
            Response::new(full("too late"))
        }
        // A long body in small pieces, for a client that leaves half way.
        "/app/stream" => {
            let chunks = futures_util::stream::unfold(0u32, |i| async move {
                if i == 200 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let frame = Frame::data(Bytes::from(vec![b'x'; 1024]));
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(frame),
                    i + 1,
                ))
            });
            Response::new(StreamBody::new(chunks).boxed())
        }
        _ => echo_response(req).await,
    }
}

fn config(setup: &Setup, up: SocketAddr, log: &str) -> String {
    format!(
        r#"{listeners}
{log}

[[upstream]]
name = "app"
endpoints = ["{up}"]
response_timeout = "1s"

[[upstream]]
name = "dead"
endpoints = ["127.0.0.1:{dead}"]
connect_timeout = "2s"
# Ejected by its first failure, for longer than any test runs: the tests read "ejected"
# back long after that failure.
outlier = {{ consecutive_failures = 1, max_ejected_percent = 100, base_ejection_time = "10m", max_ejection_time = "10m" }}

[[route]]
name = "hello"
path = {{ exact = "/hello" }}
respond = {{ status = 200, body = "hi\n" }}

[[route]]
name = "forbidden"
path = {{ prefix = "/admin" }}
respond = {{ status = 403, body = "no\n" }}

[[route]]
name = "dead"
path = {{ prefix = "/dead" }}
upstream = "dead"

[[route]]
name = "hang"
path = {{ prefix = "/app/hang" }}
upstream = "app"
response_timeout = "60s"

[[route]]
name = "app"
path = {{ prefix = "/app/" }}
upstream = "app"
"#,
        listeners = setup.listeners().replace(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n"
        ),
        dead = unused_port(),
    )
}

const ALL_SINKS: &str = r#"
[log]
[log.json]
path = "logs/access.json"
[log.combined]
path = "logs/access.log"
vhost = true
[log.sqlite]
path = "logs/access.db"
[log.events]
path = "logs/events.json"

[metrics]
address = "127.0.0.1:0"
"#;

/// The client address the tests claim through X-Forwarded-For (a TEST-NET address, so
/// CrowdSec's whitelist parser does not drop it).
const CLIENT: &str = "198.51.100.7";

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn json_lines(path: &Path) -> Vec<Value> {
    lines(path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn db_rows(path: &Path, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |r| {
        (0..n)
            .map(|i| r.get::<_, rusqlite::types::Value>(i))
            .collect()
    })
    .unwrap()
    .map(|r| r.unwrap())
    .collect()
}

fn db_count(path: &Path) -> i64 {
    match db_rows(path, "SELECT count(*) FROM access_log")[0][0] {
        rusqlite::types::Value::Integer(n) => n,
        ref other => panic!("count: {other:?}"),
    }
}

/// Polls `f` until it is true (generous timeout; nothing is timed here).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of the samples of `name` whose labels include all of `labels`.
fn metric(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        })
        .sum()
}

fn parse_metrics(text: &str) -> Vec<prometheus_parse::Sample> {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap()
        .samples
}

/// Validates an exposition with the reference Python parser (strict OpenMetrics): it checks
/// names, label syntax, the `# EOF` marker and histogram bucket consistency. Needs the
/// `prometheus_client` package (`.ci/requirements.txt`).
fn validate_openmetrics(text: &str) {
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
families = list(text_string_to_metric_families(sys.stdin.read()))
print(len(families))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser rejected /metrics (is python3-prometheus_client installed? see .ci/requirements.txt):\n{}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A plain-HTTP client that claims to be `CLIENT` through a trusted proxy.
fn h1() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-forwarded-for", CLIENT.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .http1_only()
        .build()
        .unwrap()
}

/// An HTTP/2-over-TLS client that claims to be `CLIENT`.
fn h2(ca: &Path, timeout: Duration) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-forwarded-for", CLIENT.parse().unwrap());
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_client_config(ca, &[b"h2"], None))
        .default_headers(headers)
        .timeout(timeout)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_exit_path_gives_one_record_in_every_sink() {
    let hang_arrived = Arc::new(tokio::sync::Notify::new());
    let up = upstream_notifying(hang_arrived.clone()).await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, up.addr, ALL_SINKS);
    let wraith = setup.start(&cfg);
    let (c1, c2) = (h1(), h2(&ca, Duration::from_secs(30)));
    let http = |p: &str| wraith.url("http", p);
    let https = |p: &str| wraith.url("https", p);

    // Proxied, built-in, denied, 404, 502, 504, HEAD, and a request body.
    assert_eq!(c1.get(http("/hello")).send().await.unwrap().status(), 200);
    assert_eq!(c2.get(https("/hello")).send().await.unwrap().status(), 200);
    let post = c1
        .post(http("/app/echo"))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    let echo_len = post.bytes().await.unwrap().len() as u64;
    let q = c2
        .get(https("/app/q?token=s3cret&page=2"))
        .header("user-agent", "test \"agent\"")
        // The page before was an OAuth callback: its code must not reach the logs either.
        .header("referer", "https://example.org/cb?code=SplxlOBe&state=1")
        .send()
        .await
        .unwrap();
    assert_eq!(q.status(), 200);
    q.bytes().await.unwrap();
    assert_eq!(
        c1.get(http("/admin/users")).send().await.unwrap().status(),
        403
    );
    assert_eq!(c1.get(http("/nope")).send().await.unwrap().status(), 404);
    assert_eq!(c1.get(http("/dead/x")).send().await.unwrap().status(), 502);
    assert_eq!(
        c1.get(http("/app/slow")).send().await.unwrap().status(),
        504
    );
    assert_eq!(c1.head(http("/hello")).send().await.unwrap().status(), 200);

    // The client leaves half way through a streamed body.
    let mut stream = c1.get(http("/app/stream")).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some());
    drop(stream);
    // The client gives up once the request has reached the upstream, before it answers
    // (HTTP/2: the stream is reset).
    let impatient = h2(&ca, Duration::from_secs(30));
    let hanging = tokio::spawn(impatient.get(https("/app/hang")).send());
    tokio::time::timeout(Duration::from_secs(30), hang_arrived.notified())
        .await
        .expect("/app/hang reached the upstream");
    hanging.abort();
    assert!(
        hanging.await.is_err_and(|e| e.is_cancelled()),
        "no response before the client left"
    );

    // A TLS handshake that fails: plain text to the https listener.
    let mut junk = tokio::net::TcpStream::connect(wraith.addr("https"))
        .await
        .unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = junk.read_to_end(&mut sink).await;

    const N: usize = 11;
    let json_path = wraith.path("logs/access.json");
    let db = wraith.path("logs/access.db");
    eventually("11 records in every sink", || {
        lines(&json_path).len() >= N
            && lines(&wraith.path("logs/access.log")).len() >= N
            && db.exists()
            && db_count(&db) >= N as i64
    })
    .await;
    // Nothing is emitted twice, even a little later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = json_lines(&json_path);
    assert_eq!(records.len(), N, "{records:#?}");
    assert_eq!(lines(&wraith.path("logs/access.log")).len(), N);
    assert_eq!(db_count(&db), N as i64);
    let ids: std::collections::HashSet<_> =
        records.iter().map(|r| r["request_id"].clone()).collect();
    assert_eq!(ids.len(), N, "request ids are unique");
    let sql_ids: std::collections::HashSet<_> = db_rows(&db, "SELECT request_id FROM access_log")
        .into_iter()
        .map(|r| match &r[0] {
            rusqlite::types::Value::Text(t) => Value::from(t.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, sql_ids, "the same requests in JSON and SQLite");

    let find = |method: &str, path: &str, protocol: &str| -> &Value {
        let hits: Vec<&Value> = records
            .iter()
            .filter(|r| r["method"] == method && r["path"] == path && r["protocol"] == protocol)
            .collect();
        assert_eq!(hits.len(), 1, "{method} {path} {protocol}: {records:#?}");
        hits[0]
    };
    for r in &records {
        assert_eq!(
            r["client_ip"], CLIENT,
            "the address behind the trusted proxy"
        );
        assert!(r.get("client_port").is_none(), "no port for an XFF address");
        assert!(r["time"].as_str().unwrap().ends_with('Z'));
    }
    let hello = find("GET", "/hello", "h1");
    assert_eq!(hello["status"], 200);
    assert_eq!(hello["route"], "hello");
    assert_eq!(hello["bytes_out"], 3);
    assert_eq!(hello["aborted"], false);
    assert_eq!(hello["listener"], "http");
    assert!(hello.get("tls_version").is_none());
    let hello2 = find("GET", "/hello", "h2");
    assert_eq!(hello2["listener"], "https");
    assert_eq!(hello2["tls_version"], "TLSv1.3");
    assert!(hello2["tls_group"].as_str().is_some());
    let posted = find("POST", "/app/echo", "h1");
    assert_eq!(posted["bytes_in"], 1000);
    assert_eq!(posted["bytes_out"], echo_len);
    assert_eq!(posted["route"], "app");
    assert_eq!(posted["upstream"], "app");
    assert_eq!(posted["endpoint"], up.addr.to_string());
    assert_eq!(posted["attempts"], 1);
    assert!(posted["upstream_ms"].as_f64().is_some());
    let query = find("GET", "/app/q", "h2");
    assert_eq!(
        query["query"], "token=REDACTED&page=2",
        "secrets are redacted"
    );
    assert_eq!(query["user_agent"], "test \"agent\"");
    assert_eq!(
        query["referer"],
        "https://example.org/cb?code=REDACTED&state=1"
    );
    assert_eq!(find("GET", "/admin/users", "h1")["status"], 403);
    let nope = find("GET", "/nope", "h1");
    assert_eq!(nope["status"], 404);
    assert_eq!(nope["error"], "no_route");
    assert!(nope.get("route").is_none());
    let dead = find("GET", "/dead/x", "h1");
    assert_eq!(dead["status"], 502);
    assert_eq!(dead["error"], "upstream_unreachable");
    let slow = find("GET", "/app/slow", "h1");
    assert_eq!(slow["status"], 504);
    assert_eq!(slow["error"], "upstream_timeout");
    assert!(slow["duration_ms"].as_f64().unwrap() >= 1000.0);
    let head = find("HEAD", "/hello", "h1");
    assert_eq!(head["status"], 200);
    assert_eq!(head["aborted"], false);
    let stream = find("GET", "/app/stream", "h1");
    assert_eq!(stream["status"], 200);
    assert_eq!(stream["aborted"], true, "client left mid-body");
    let sent = stream["bytes_out"].as_u64().unwrap();
    assert!(sent > 0 && sent < 200 * 1024, "partial body: {sent}");
    let hang = find("GET", "/app/hang", "h2");
    assert_eq!(hang["status"], 499, "client closed before the response");
    assert_eq!(hang["aborted"], true);

    // The combined log: one line per request, vhost first, the real client, the status.
    let combined = lines(&wraith.path("logs/access.log"));
    let slow_line = combined.iter().find(|l| l.contains("/app/slow")).unwrap();
    assert!(
        slow_line.starts_with(&format!("127.0.0.1 {CLIENT} - - [")),
        "{slow_line}"
    );
    assert!(
        slow_line.contains("\"GET /app/slow HTTP/1.1\" 504 "),
        "{slow_line}"
    );
    let q_line = combined.iter().find(|l| l.contains("/app/q")).unwrap();
    assert!(
        q_line.contains("\"GET /app/q?token=REDACTED&page=2 HTTP/2.0\" 200 ")
            && q_line.ends_with(
                "\"https://example.org/cb?code=REDACTED&state=1\" \"test \\x22agent\\x22\""
            ),
        "{q_line}"
    );

    // The Referer's query is redacted in SQLite too.
    let referer = db_rows(&db, "SELECT referer FROM access_log WHERE path = '/app/q'");
    assert_eq!(
        format!("{:?}", referer[0]),
        "[Text(\"https://example.org/cb?code=REDACTED&state=1\")]"
    );
    assert!(
        !std::fs::read_to_string(&json_path)
            .unwrap()
            .contains("SplxlOBe")
            && !std::fs::read_to_string(wraith.path("logs/access.log"))
                .unwrap()
                .contains("SplxlOBe"),
        "the code is in no log"
    );

    // SQLite columns are typed.
    let typed = db_rows(
        &db,
        "SELECT typeof(status), typeof(duration_ms), typeof(bytes_out), typeof(aborted) FROM access_log WHERE path = '/app/stream'",
    );
    assert_eq!(
        format!("{:?}", typed[0]),
        "[Text(\"integer\"), Text(\"real\"), Text(\"integer\"), Text(\"integer\")]"
    );

    // The failed handshake is a security event, shaped for Wazuh.
    let events_path = wraith.path("logs/events.json");
    eventually("a tls_failure event", || {
        json_lines(&events_path)
            .iter()
            .any(|e| e["wraith"]["event"] == "tls_failure")
    })
    .await;
    let events = json_lines(&events_path);
    let tls = events
        .iter()
        .find(|e| e["wraith"]["event"] == "tls_failure")
        .unwrap();
    assert_eq!(tls["srcip"], "127.0.0.1");
    assert_eq!(tls["wraith"]["listener"], "https");
    assert!(
        events
            .iter()
            .all(|e| e["wraith"]["event"] != "policy_denied"),
        "no policy is configured, so nothing is a policy denial"
    );

    // Metrics: the listener and the admin socket say the same, it parses, counters match.
    let metrics_addr = wraith.addr("metrics");
    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    validate_openmetrics(&text);
    let (status, admin_text) = wraith.admin_get("/v1/metrics").await;
    assert_eq!(status, 200);
    validate_openmetrics(std::str::from_utf8(&admin_text).unwrap());
    let m = parse_metrics(&text);
    let req = |route: &str, class: &str, proto: &str| {
        metric(
            &m,
            "wraith_requests_total",
            &[
                ("route", route),
                ("status_class", class),
                ("protocol", proto),
            ],
        )
    };
    assert_eq!(req("hello", "2xx", "h1"), 2.0, "GET + HEAD");
    assert_eq!(req("hello", "2xx", "h2"), 1.0);
    assert_eq!(req("app", "2xx", "h1"), 2.0, "POST + stream");
    assert_eq!(req("app", "2xx", "h2"), 1.0);
    assert_eq!(req("app", "5xx", "h1"), 1.0, "504");
    assert_eq!(req("forbidden", "4xx", "h1"), 1.0);
    assert_eq!(req("(none)", "4xx", "h1"), 1.0);
    assert_eq!(req("dead", "5xx", "h1"), 1.0);
    assert_eq!(req("hang", "4xx", "h2"), 1.0, "499");
    assert_eq!(metric(&m, "wraith_requests_total", &[]), N as f64);
    assert_eq!(
        metric(
            &m,
            "wraith_request_duration_seconds_count",
            &[("route", "app")]
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            "wraith_request_errors_total",
            &[("route", "dead"), ("code", "upstream_unreachable")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wraith_upstream_errors_total",
            &[("upstream", "dead"), ("code", "upstream_unreachable")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wraith_upstream_endpoint_healthy",
            &[("upstream", "dead")]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "wraith_upstream_endpoint_healthy",
            &[("upstream", "app")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wraith_tls_handshakes_total",
            &[
                ("listener", "https"),
                ("result", "ok"),
                ("version", "TLSv1.3")
            ]
        ),
        2.0,
        "the two h2 clients"
    );
    assert_eq!(
        metric(&m, "wraith_tls_handshakes_total", &[("result", "failed")]),
        1.0
    );
    for sink in ["json", "combined", "sqlite"] {
        assert_eq!(
            metric(&m, "wraith_log_records_written_total", &[("sink", sink)]),
            N as f64,
            "{sink}"
        );
        assert_eq!(
            metric(&m, "wraith_log_records_dropped_total", &[("sink", sink)]),
            0.0
        );
    }
    // No label carries a path or an address.
    for s in &m {
        for (k, v) in s.labels.iter() {
            assert!(
                !v.contains(CLIENT) && !v.starts_with('/'),
                "unbounded label {k}={v} on {}",
                s.metric
            );
        }
    }

    // `wraith status` has the last minute, upstream health and the sinks.
    let (code, out, err) = wraith.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "TRAFFIC (last",
        "p50",
        "p99",
        "ejected",
        "LOG SINK",
        "sqlite",
    ] {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
    let most_denied = format!("denied IPs   {CLIENT} (1)");
    assert!(
        out.contains(&most_denied),
        "{most_denied} missing from:\n{out}"
    );
    let (_, json, _) = wraith.cli(&["status", "--json"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["traffic"]["requests"], N as u64);
    assert_eq!(v["traffic"]["server_errors"], 2);
    assert_eq!(v["traffic"]["denied"], 1);
    assert_eq!(v["traffic"]["top_denied_ips"][0]["name"], CLIENT);
    assert!(v["traffic"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(v["last_reload"], Value::Null);

    // `wraith logs` presets and SQL, against the same database.
    let (code, out, err) = wraith.cli(&["logs", "--denied", "--json"]);
    assert_eq!(code, 0, "{err}");
    let denied: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(denied.len(), 1, "{out}");
    assert_eq!(denied[0]["path"], "/admin/users");
    // A --limit past SQLite's signed 64-bit LIMIT means every row.
    let (code, out, err) = wraith.cli(&[
        "logs",
        "--denied",
        "--json",
        "--limit",
        "18446744073709551615",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let (_, out, _) = wraith.cli(&["logs", "--errors", "--json"]);
    let mut errors: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    errors.sort();
    assert_eq!(errors, ["/app/slow", "/dead/x"]);
    // --limit N shows the newest N; 0 shows every row (as `decisions list --limit 0`).
    let (_, out, _) = wraith.cli(&["logs", "--errors", "--json", "--limit", "1"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (_, out, _) = wraith.cli(&["logs", "--json", "--limit", "0"]);
    let (_, all, _) = wraith.cli(&["logs", "SELECT count(*) AS n FROM access_log", "--json"]);
    let n = serde_json::from_str::<Value>(all.lines().next().unwrap()).unwrap()["n"].clone();
    assert_eq!(Some(out.lines().count() as u64), n.as_u64(), "{all}");
    // /app/slow took over 1 s; the fast ones (most of the 11) are left out. (The client of
    // /app/hang leaves right away, but on a stalled machine that can take 900 ms too.)
    let (_, out, _) = wraith.cli(&["logs", "--slow", "900ms", "--json"]);
    let slow: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(slow.iter().any(|r| r["path"] == "/app/slow"), "{out}");
    assert!(
        slow.iter()
            .all(|r| r["duration_ms"].as_f64().is_some_and(|d| d >= 900.0)),
        "{out}"
    );
    let (code, out, err) = wraith.cli(&[
        "logs",
        "SELECT status, count(*) AS n FROM access_log GROUP BY status ORDER BY status",
    ]);
    assert_eq!(code, 0, "{err}");
    let table: Vec<&str> = out.lines().collect();
    assert_eq!(
        table[0].split_whitespace().collect::<Vec<_>>(),
        ["STATUS", "N"]
    );
    assert!(table.contains(&"   200  6"), "{out}");
    assert!(table.contains(&"   499  1"), "{out}");
    // Typos and writes are refused with SQLite's own words, and write nothing.
    let (code, _, err) = wraith.cli(&["logs", "SELEC 1"]);
    assert_eq!(code, 1);
    assert!(err.contains("syntax error"), "{err}");
    let (code, _, err) = wraith.cli(&["logs", "DELETE FROM access_log"]);
    assert_eq!(code, 1);
    assert!(err.contains("refused"), "{err}");
    assert_eq!(db_count(&db), N as i64);
    // Not even a copy: SQLite would lift read-only for the file VACUUM INTO makes.
    let copy = wraith.path("copy.db");
    let vacuum = format!("VACUUM INTO '{}'", copy.display());
    let (code, _, err) = wraith.cli(&["logs", &vacuum]);
    assert_eq!(code, 1);
    assert!(err.contains("refused"), "{err}");
    assert!(!copy.exists());
    // A query that would run for ever is stopped at its deadline (it would pin the WAL).
    let (code, _, err) = wraith.cli(&[
        "logs",
        "--timeout",
        "500ms",
        "SELECT count(*) FROM access_log a, access_log b, access_log c, access_log d, \
         access_log e, access_log f, access_log g, access_log h, access_log i, access_log j",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--timeout 500ms"), "{err}");

    // --tail follows new rows.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_wraith"))
        .args(["logs", "--tail", "--json", "--limit", "1", "-c"])
        .arg(&wraith.config_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The newest existing row first, then what arrives.
    let first = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(first.contains("\"id\""), "{first}");
    c1.get(http("/hello?tail=1")).send().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&line).unwrap();
            seen = v["path"] == "/hello";
        }
    }
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(seen, "--tail printed the new row");
}

/// `wraith logs --tail` follows the table when retention has emptied it: the ids of the rows
/// written afterwards start again at 1, below the last id it showed.
#[tokio::test]
async fn logs_tail_follows_rows_after_retention_emptied_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("access.db");
    let conn = wraith::telemetry::sqlite::open_for_writing(&db).unwrap();
    let insert = |path: &str| {
        conn.execute(
            "INSERT INTO access_log (time, request_id, client_ip, listener, protocol, method, \
             path, status, bytes_in, bytes_out, duration_ms, attempts, aborted) \
             VALUES ('2026-01-01 00:00:00.000', 'r', '192.0.2.1', 'http', 'h1', 'GET', ?1, \
             200, 0, 0, 1.0, 0, 0)",
            [path],
        )
        .unwrap();
    };
    for i in 0..5 {
        insert(&format!("/before/{i}"));
    }
    let mut tail = Command::new(env!("CARGO_BIN_EXE_wraith"))
        .args(["logs", "--tail", "--json", "--db"])
        .arg(&db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).unwrap();
            if tx
                .send(v["path"].as_str().unwrap_or_default().to_string())
                .is_err()
            {
                break;
            }
        }
    });
    let shown: Vec<String> = (0..5)
        .map(|_| rx.recv_timeout(Duration::from_secs(20)).unwrap())
        .collect();
    assert_eq!(shown.last().map(String::as_str), Some("/before/4"));
    // Retention deleted every row (nothing was served for max_age); new ones come.
    conn.execute("DELETE FROM access_log", []).unwrap();
    insert("/after/0");
    insert("/after/1");
    let id: i64 = conn
        .query_row("SELECT min(id) FROM access_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(id, 1, "the ids start again");
    let mut after = Vec::new();
    while after.len() < 2 {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(path) => after.push(path),
            Err(_) => break,
        }
    }
    let _ = tail.kill();
    let _ = tail.wait();
    assert_eq!(
        after,
        ["/after/0", "/after/1"],
        "--tail showed the new rows"
    );
}

/// Where Debian's crowdsec package is: `/` when installed, or the directory a `.deb` was
/// extracted into (`dpkg-deb -x`), named by `WRAITH_CROWDSEC_ROOT`.
fn crowdsec_root() -> PathBuf {
    PathBuf::from(std::env::var("WRAITH_CROWDSEC_ROOT").unwrap_or_else(|_| "/".into()))
}

/// Runs `cscli explain` (Debian's CrowdSec) on `log` as an nginx log; returns its report.
/// explain replays the file through a real crowdsec, which needs a local API to log in to,
/// so a LAPI-only crowdsec runs for the duration. One at a time: explain copies the log to a
/// fixed path (`/tmp/cscli_test_tmp.log`), so two at once read each other's lines.
fn cscli_explain(log: &Path) -> String {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = crowdsec_root();
    let hub = root.join("usr/share/crowdsec/hub");
    let bin = |name: &str| {
        let local = root.join("usr/bin").join(name);
        if local.exists() {
            local
        } else {
            PathBuf::from(name)
        }
    };
    for sub in [
        "parsers/s00-raw",
        "parsers/s01-parse",
        "parsers/s02-enrich",
        "scenarios",
    ] {
        std::fs::create_dir_all(d.join("etc").join(sub)).unwrap();
    }
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::create_dir_all(d.join("etc/notifications")).unwrap();
    for (stage, parser) in [
        ("s00-raw", "syslog-logs"),
        ("s01-parse", "nginx-logs"),
        ("s02-enrich", "dateparse-enrich"),
        ("s02-enrich", "http-logs"),
    ] {
        std::os::unix::fs::symlink(
            hub.join(format!("parsers/{stage}/crowdsecurity/{parser}.yaml")),
            d.join(format!("etc/parsers/{stage}/{parser}.yaml")),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink(root.join("etc/crowdsec/patterns"), d.join("etc/patterns")).unwrap();
    // The LAPI needs a profiles file; explain never reaches it with an alert.
    std::fs::write(
        d.join("etc/profiles.yaml"),
        "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\non_success: break\n",
    )
    .unwrap();
    for f in [
        "acquis.yaml",
        "simulation.yaml",
        "local_api_credentials.yaml",
    ] {
        std::fs::write(d.join("etc").join(f), "").unwrap();
    }
    let port = unused_port();
    let cfg = d.join("etc/config.yaml");
    let p = |s: &str| d.join(s).display().to_string();
    std::fs::write(
        &cfg,
        format!(
            r#"common: {{daemonize: false, log_media: stdout, log_level: warning}}
config_paths:
  config_dir: {etc}/
  data_dir: {data}/
  simulation_path: {etc}/simulation.yaml
  hub_dir: {hub}/
  index_path: {hub}/.index.json
  notification_dir: {etc}/notifications/
  plugin_dir: {plugins}/
crowdsec_service: {{acquisition_path: {etc}/acquis.yaml, parser_routines: 1}}
db_config: {{type: sqlite, db_path: {data}/crowdsec.db, use_wal: true}}
api:
  client: {{credentials_path: {etc}/local_api_credentials.yaml}}
  server: {{listen_uri: "127.0.0.1:{port}", profiles_path: {etc}/profiles.yaml}}
prometheus: {{enabled: false}}
"#,
            etc = p("etc"),
            data = p("data"),
            hub = hub.display(),
            plugins = root.join("usr/lib/crowdsec/plugins").display(),
        ),
    )
    .unwrap();
    let cscli = |args: &[&str]| {
        let out = Command::new(bin("cscli"))
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .output()
            .expect("cscli (Debian package crowdsec)");
        assert!(
            out.status.success(),
            "cscli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let creds = p("etc/local_api_credentials.yaml");
    cscli(&["machines", "add", "wraith-test", "--auto", "-f", &creds]);
    let mut lapi = Command::new(bin("crowdsec"))
        .arg("-c")
        .arg(&cfg)
        .arg("-no-cs")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "crowdsec LAPI did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = cscli(&[
        "explain",
        "--file",
        &log.display().to_string(),
        "--type",
        "nginx",
    ]);
    let _ = lapi.kill();
    let _ = lapi.wait();
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_log_passes_crowdsec_nginx_parser() {
    let up = upstream().await;
    let mut files = Vec::new();
    for vhost in [true, false] {
        let setup = Setup::new();
        let ca = setup.pki.ca_pem.clone();
        let log = format!("[log.combined]\npath = \"access.log\"\nvhost = {vhost}\n");
        let wraith = {
            let cfg = config(&setup, up.addr, &log);
            setup.start(&cfg)
        };
        let c1 = h1();
        let c2 = h2(&ca, Duration::from_secs(30));
        c1.get(wraith.url("http", "/app/a?x=1&token=t"))
            .header("user-agent", "Mozilla/5.0 \"quoted\"")
            .send()
            .await
            .unwrap();
        c2.get(wraith.url("https", "/hello")).send().await.unwrap();
        c1.get(wraith.url("http", "/.env")).send().await.unwrap();
        // An IPv6 client and a request with no user agent at all.
        reqwest::Client::builder()
            .user_agent("")
            .build()
            .unwrap()
            .post(wraith.url("http", "/admin"))
            .header("x-forwarded-for", "2001:db8::7")
            .send()
            .await
            .unwrap();
        let path = wraith.path("access.log");
        eventually("4 combined lines", || lines(&path).len() >= 4).await;
        files.push(lines(&path));
    }
    let all: Vec<String> = files.concat();
    assert_eq!(all.len(), 8);
    assert!(all[0].starts_with("127.0.0.1 "), "vhost first: {}", all[0]);
    assert!(all[4].starts_with(&format!("{CLIENT} - - [")), "{}", all[4]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("combined.log");
    std::fs::write(&file, all.join("\n") + "\n").unwrap();

    let report = tokio::task::spawn_blocking(move || cscli_explain(&file))
        .await
        .unwrap();
    let successes = report.matches("parser success").count();
    assert_eq!(successes, 8, "every line parses:\n{report}");
    assert!(!report.contains("parser failure"), "{report}");
    assert_eq!(
        report.matches("🟢 crowdsecurity/nginx-logs").count(),
        8,
        "parsed by the stock nginx parser:\n{report}"
    );
    assert_eq!(report.matches("🟢 crowdsecurity/http-logs").count(), 8);
}

/// A client cannot push a line past what Wazuh reads (64 KiB, `OS_MAXSTR`), where it would be
/// cut: its JSON unparsable, its combined status gone. A 30,000-byte path of `"` and a
/// 30,000-byte User-Agent of 0xff bytes (within the 64 KiB head limit; 120 KB each once
/// escaped) give lines far shorter, that parse, with the status in its place, and a
/// combined line CrowdSec's nginx parser still reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_values_cannot_push_a_line_past_what_wazuh_reads() {
    let up = upstream().await;
    let setup = Setup::new();
    let log = "[log.json]\npath = \"access.json\"\n[log.combined]\npath = \"access.log\"\n\
               [log.sqlite]\npath = \"access.db\"\n";
    let wraith = {
        let cfg = config(&setup, up.addr, log);
        setup.start(&cfg)
    };
    let path = format!("/{}", "\"".repeat(30_000));
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: example.org\r\nUser-Agent: ").into_bytes();
    head.extend_from_slice(&[0xff; 30_000]);
    head.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let mut conn = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    conn.write_all(&head).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 404 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let json_path = wraith.path("access.json");
    eventually("the JSON record", || lines(&json_path).len() == 1).await;
    let line = &lines(&json_path)[0];
    assert!(line.len() < 16 * 1024, "JSON line of {} bytes", line.len());
    let record: Value = serde_json::from_str(line).unwrap();
    assert_eq!(record["status"], 404);
    let logged = record["path"].as_str().unwrap();
    assert!(
        logged.starts_with("/\"\"\"") && logged.ends_with("...[truncated]"),
        "{logged}"
    );
    assert!(record["user_agent"]
        .as_str()
        .unwrap()
        .ends_with("...[truncated]"));

    let combined_path = wraith.path("access.log");
    eventually("the combined line", || lines(&combined_path).len() == 1).await;
    let line = lines(&combined_path).remove(0);
    assert!(
        line.len() < 16 * 1024,
        "combined line of {} bytes",
        line.len()
    );
    let (request, rest) = line
        .split_once(" HTTP/1.1\" ")
        .expect("the request field ends");
    assert!(request.ends_with("\\x22\\x22...[truncated]"), "{request}");
    assert!(rest.starts_with("404 "), "the status in its place: {rest}");
    assert!(rest.ends_with("\\xFF...[truncated]\""), "{rest}");

    // The database keeps the whole values (its writer flushes on its own timer: the row
    // may come after the text lines).
    let query = "SELECT path, length(user_agent) FROM access_log";
    eventually("the SQLite row", || {
        !db_rows(&wraith.path("access.db"), query).is_empty()
    })
    .await;
    let row = db_rows(&wraith.path("access.db"), query);
    assert_eq!(row[0][0], rusqlite::types::Value::Text(path));
    assert_eq!(
        row[0][1],
        rusqlite::types::Value::Integer(30_000),
        "30,000 U+FFFD"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("combined.log");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    let report = tokio::task::spawn_blocking(move || cscli_explain(&file))
        .await
        .unwrap();
    assert_eq!(
        report.matches("🟢 crowdsecurity/nginx-logs").count(),
        1,
        "the cut line is read by the stock nginx parser:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_sqlite_writer_drops_and_never_slows_requests() {
    let up = upstream().await;
    let setup = Setup::new();
    let log = r#"
[log.json]
path = "access.json"
[log.sqlite]
path = "access.db"
queue = 32
"#;
    let wraith = {
        let cfg = config(&setup, up.addr, log);
        setup.start(&cfg)
    };
    let db = wraith.path("access.db");
    eventually("the database", || db.exists()).await;

    // Another process holds the write lock: the writer's inserts fail with SQLITE_BUSY.
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let client = h1();
    const REQUESTS: usize = 300;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for i in 0..REQUESTS {
        let t = Instant::now();
        let resp = client
            .get(wraith.url("http", &format!("/hello?i={i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        slowest = slowest.max(t.elapsed());
    }
    let elapsed = started.elapsed();
    // Every request finished while the database was still locked; none waited for it (a
    // request that did would wait until the COMMIT below, and time out). The bound is
    // loose for a loaded machine.
    assert!(
        slowest < Duration::from_secs(10),
        "a request took {slowest:?} while the log writer was stalled"
    );
    let (_, text) = wraith.admin_get("/v1/metrics").await;
    let m = parse_metrics(std::str::from_utf8(&text).unwrap());
    let dropped = metric(
        &m,
        "wraith_log_records_dropped_total",
        &[("sink", "sqlite")],
    );
    assert!(dropped > 0.0, "the queue of 32 overflowed");
    assert_eq!(
        metric(&m, "wraith_log_records_dropped_total", &[("sink", "json")]),
        0.0,
        "a stuck sink does not hold the others back"
    );
    assert_eq!(db_count_while_locked(&blocker), 0);
    eprintln!("{REQUESTS} requests in {elapsed:?} with SQLite stalled; {dropped} records dropped");

    // Unstalled: everything that was accepted is written.
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    let (_, status) = wraith.admin_get("/v1/status").await;
    let v: Value = serde_json::from_slice(&status).unwrap();
    let sink = |v: &Value| {
        v["log_sinks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["sink"] == "sqlite")
            .cloned()
            .unwrap()
    };
    let s = sink(&v);
    let accepted = s["accepted"].as_u64().unwrap();
    assert_eq!(accepted + s["dropped"].as_u64().unwrap(), REQUESTS as u64);
    eventually("the accepted records in the database", || {
        db_count(&db) == accepted as i64
    })
    .await;
    let json = wraith.path("access.json");
    eventually("every record in the JSON log", || {
        lines(&json).len() >= REQUESTS
    })
    .await;
    assert_eq!(lines(&json).len(), REQUESTS);
    // A warning says so in the server log.
    assert!(wraith
        .wait_log(Duration::from_secs(5), |l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("records dropped")))
        .is_some());
}

/// Rows visible to the connection that holds the lock (it sees the committed state).
fn db_count_while_locked(conn: &rusqlite::Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM access_log", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_flushes_every_accepted_record() {
    let up = upstream().await;
    let setup = Setup::new();
    let log = "[log.sqlite]\npath = \"access.db\"\n";
    let mut wraith = {
        let cfg = config(&setup, up.addr, log);
        setup.start(&cfg)
    };
    let db = wraith.path("access.db");
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let url = wraith.url("http", "/app/load");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (ok, stop, url) = (ok.clone(), stop.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let client = h1();
            while !stop.load(Ordering::Relaxed) {
                let answered = match client.get(&url).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if !answered {
                    // The listener is gone: the server is draining.
                    break;
                }
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    while ok.load(Ordering::Relaxed) < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wraith.signal(libc::SIGTERM);
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(wraith.wait_exit(Duration::from_secs(30)), Some(0));
    let answered = ok.load(Ordering::Relaxed) as i64;
    assert_eq!(
        db_count(&db),
        answered,
        "every answered request is in the database after exit"
    );
    let closed = wraith
        .log_json()
        .into_iter()
        .find(|l| l["message"] == "access log sink flushed and closed" && l["sink"] == "sqlite")
        .expect("the sink reports its flush");
    assert_eq!(closed["accepted"], closed["written"]);
    assert_eq!(closed["dropped"], 0);
}

/// Requests still running when the shutdown timeout runs out are cut off, and each still
/// leaves its one record, aborted, in every sink: the records their dropped responses emit
/// reach the queues before the queues close (they used to land in closed queues, all lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_off_at_shutdown_are_logged_in_every_sink() {
    const N: usize = 60;
    let up = upstream().await;
    let setup = Setup::new();
    let log = "[log.json]\npath = \"access.json\"\n[log.combined]\npath = \"access.log\"\n\
               [log.sqlite]\npath = \"access.db\"\n";
    let cfg = config(&setup, up.addr, log)
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"1s\"");
    let mut wraith = setup.start(&cfg);
    // N responses streaming (10 s each), every one on its own connection, heads received.
    let client = h1();
    let mut streams = Vec::new();
    for i in 0..N {
        let resp = client
            .get(wraith.url("http", &format!("/app/stream?n={i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(resp);
    }
    wraith.signal(libc::SIGTERM);
    assert_eq!(wraith.wait_exit(Duration::from_secs(30)), Some(0));
    drop(streams);

    let json = json_lines(&wraith.path("access.json"));
    assert_eq!(json.len(), N, "one JSON record per request cut off");
    assert!(
        json.iter()
            .all(|r| r["path"] == "/app/stream" && r["aborted"] == true),
        "{json:?}"
    );
    let combined = lines(&wraith.path("access.log"));
    assert_eq!(combined.len(), N, "one combined line per request cut off");
    assert!(combined.iter().all(|l| l.contains("GET /app/stream?n=")));
    let db = wraith.path("access.db");
    let aborted = db_rows(
        &db,
        "SELECT count(*) FROM access_log WHERE path = '/app/stream' AND aborted = 1",
    );
    assert_eq!(aborted[0][0], rusqlite::types::Value::Integer(N as i64));
    assert_eq!(db_count(&db), N as i64);
    // Every sink reports what it wrote, and nothing came after it closed.
    let log = wraith.log_json();
    for sink in ["json", "combined", "sqlite"] {
        let closed = log
            .iter()
            .find(|l| l["message"] == "access log sink flushed and closed" && l["sink"] == sink)
            .unwrap_or_else(|| panic!("the {sink} sink reports its flush"));
        assert_eq!(closed["written"], N, "{closed}");
        assert_eq!(closed["dropped"], 0, "{closed}");
    }
    assert!(
        !log.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot keep up"))),
        "no queue was full"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sinks_reopen_on_sigusr1_and_on_reload() {
    let up = upstream().await;
    let setup = Setup::new();
    let log = r#"
[log.json]
path = "access.json"
[log.combined]
path = "access.log"
[log.events]
path = "events.json"
"#;
    let cfg = config(&setup, up.addr, log);
    let wraith = setup.start(&cfg);
    let client = h1();
    let json = wraith.path("access.json");
    let combined = wraith.path("access.log");
    client
        .get(wraith.url("http", "/hello?n=1"))
        .send()
        .await
        .unwrap();
    eventually("first line", || {
        lines(&json).len() == 1 && lines(&combined).len() == 1
    })
    .await;

    // logrotate: move the files away, then SIGUSR1.
    let rotated = |p: &PathBuf, n: u32| PathBuf::from(format!("{}.{n}", p.display()));
    std::fs::rename(&json, rotated(&json, 1)).unwrap();
    std::fs::rename(&combined, rotated(&combined, 1)).unwrap();
    wraith.signal(libc::SIGUSR1);
    assert!(wraith
        .wait_log(Duration::from_secs(10), |l| l["message"]
            == "SIGUSR1: reopening log files")
        .is_some());
    client
        .get(wraith.url("http", "/hello?n=2"))
        .send()
        .await
        .unwrap();
    eventually("the new files", || {
        lines(&json).len() == 1 && lines(&combined).len() == 1
    })
    .await;
    assert!(lines(&json)[0].contains("n=2"));
    assert_eq!(
        lines(&rotated(&json, 1)).len(),
        1,
        "the rotated file keeps its line"
    );
    assert!(lines(&combined)[0].contains("/hello?n=2"));

    // A reload reopens them too, and records the reload as an event.
    std::fs::rename(&json, rotated(&json, 2)).unwrap();
    wraith.reload().unwrap();
    client
        .get(wraith.url("http", "/hello?n=3"))
        .send()
        .await
        .unwrap();
    eventually("the file after reload", || lines(&json).len() == 1).await;
    assert!(lines(&json)[0].contains("n=3"));
    let events = wraith.path("events.json");
    eventually("the reload event", || !lines(&events).is_empty()).await;
    let e: Value = serde_json::from_str(&lines(&events)[0]).unwrap();
    assert_eq!(e["wraith"]["event"], "config_reload");
    assert_eq!(e["wraith"]["result"], "ok");
    assert_eq!(e["wraith"]["generation"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wraith_top_renders_in_80x24_and_quits_on_q() {
    let up = upstream().await;
    let setup = Setup::new();
    let wraith = {
        let cfg = config(&setup, up.addr, "");
        setup.start(&cfg)
    };
    let client = h1();
    for _ in 0..5 {
        client
            .get(wraith.url("http", "/hello"))
            .send()
            .await
            .unwrap();
    }
    client
        .get(wraith.url("http", "/admin/x"))
        .send()
        .await
        .unwrap();
    client
        .get(wraith.url("http", "/dead/x"))
        .send()
        .await
        .unwrap();

    let socket = format!("wraith-top-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .arg("-L")
            .arg(&socket)
            .args(args)
            .output()
            .expect("tmux")
    };
    let cmd = format!(
        "{} top -c {}",
        env!("CARGO_BIN_EXE_wraith"),
        wraith.config_path.display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "80",
        "-y",
        "24",
        &cmd,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut screen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Two refreshes: the second has route rates.
    while Instant::now() < deadline {
        screen = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "top"]).stdout)
            .into_owned();
        if screen.contains("req/s") && screen.contains("hello") && screen.contains("EJECTED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(path) = std::env::var_os("WRAITH_TOP_CAPTURE") {
        std::fs::write(path, &screen).unwrap();
    }
    for want in [
        "wraith",
        "req/s",
        "p99",
        "Top routes",
        "hello",
        "Upstreams",
        "EJECTED",
        "Top denied IPs",
        CLIENT,
    ] {
        assert!(screen.contains(want), "{want} not on screen:\n{screen}");
    }
    assert!(screen.lines().count() <= 24);
    assert!(screen.lines().all(|l| l.chars().count() <= 80));
    tmux(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux(&["has-session", "-t", "top"]).status.success() {
        assert!(Instant::now() < deadline, "q did not quit wraith top");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tmux(&["kill-server"]);
}

#[tokio::test]
async fn log_config_errors_point_at_the_key() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[log]\nquery = \"sometimes\"\n[log.json]\npath = \"a.log\"\n[log.combined]\npath = \"a.log\"\n[metrics]\naddress = \"nowhere\"\n",
        setup.listeners()
    );
    std::fs::write(setup.dir.path().join("bad.toml"), cfg).unwrap();
    let (code, out, err) = wraith_cmd(&["test", "-c", "bad.toml"], setup.dir.path());
    assert_eq!(code, 1);
    let err = format!("{out}{err}");
    assert!(
        err.contains("log.query: unknown query logging \"sometimes\""),
        "{err}"
    );
    assert!(err.contains("log.combined.path"), "{err}");
    assert!(
        err.contains("metrics.address: invalid socket address"),
        "{err}"
    );
}

#[tokio::test]
async fn sqlite_retention_by_age_and_rows() {
    let up = upstream().await;
    let setup = Setup::new();
    // A database with ten rows from 2000 and ten from now.
    let db = setup.dir.path().join("access.db");
    {
        let conn = wraith::telemetry::sqlite::open_for_writing(&db).unwrap();
        let now = wraith::telemetry::format::sqlite_time(std::time::SystemTime::now());
        for i in 0..20 {
            let time = if i < 10 {
                "2000-01-01 00:00:00.000"
            } else {
                now.as_str()
            };
            conn.execute(
                "INSERT INTO access_log (time, request_id, client_ip, listener, protocol, method, \
                 path, status, bytes_in, bytes_out, duration_ms, attempts, aborted) \
                 VALUES (?1, ?2, '192.0.2.1', 'http', 'h1', 'GET', '/', 200, 0, 0, 1.0, 0, 0)",
                rusqlite::params![time, format!("r{i}")],
            )
            .unwrap();
        }
    }
    let log = "[log.sqlite]\npath = \"access.db\"\nmax_age = \"1d\"\nmax_rows = 5\n";
    let wraith = {
        let cfg = config(&setup, up.addr, log);
        setup.start(&cfg)
    };
    eventually("retention", || db_count(&db) == 5).await;
    let kept = db_rows(&db, "SELECT request_id FROM access_log ORDER BY id");
    let kept: Vec<String> = kept
        .into_iter()
        .map(|r| match &r[0] {
            rusqlite::types::Value::Text(t) => t.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kept,
        ["r15", "r16", "r17", "r18", "r19"],
        "the newest rows stay"
    );
    drop(wraith);
}

/// A reload that fails after building its sinks (here: a new listener's port is taken) puts
/// none of them in service: the new `max_rows` deletes nothing, and the old sink keeps
/// writing. Once a reload with the same sink succeeds, its retention runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reload_runs_no_retention_of_its_sinks() {
    let up = upstream().await;
    let setup = Setup::new();
    let first = config(&setup, up.addr, "[log.sqlite]\npath = \"q.db\"\n");
    let trimmed = config(
        &setup,
        up.addr,
        "[log.sqlite]\npath = \"q.db\"\nmax_rows = 1\n",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = format!(
        "{trimmed}\n[[listener]]\nname = \"taken\"\naddress = \"{}\"\nprotocol = \"http\"\n",
        taken.local_addr().unwrap()
    );
    let wraith = setup.start(&first);
    let db = wraith.path("q.db");
    let client = h1();
    for _ in 0..20 {
        client
            .get(wraith.url("http", "/hello"))
            .send()
            .await
            .unwrap();
    }
    eventually("20 rows", || db_count(&db) == 20).await;

    wraith.write_config(&bad);
    let err = wraith.reload().unwrap_err();
    assert!(err.contains("cannot bind"), "{err}");
    // A writer starts its retention at once: give one that was wrongly started time to act.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(db_count(&db), 20, "a rejected reload deleted rows");
    client
        .get(wraith.url("http", "/hello"))
        .send()
        .await
        .unwrap();
    eventually("the old sink writing after the failed reload", || {
        db_count(&db) == 21
    })
    .await;

    wraith.write_config(&trimmed);
    wraith.reload().unwrap();
    eventually("the new retention", || db_count(&db) == 1).await;
}

/// The `wraith-log-sqlite` writer threads of process `pid` (thread names are cut at 15 bytes).
fn sqlite_writers(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "wraith-log-sqli")
        .count()
}

/// A reload that changes `[log.sqlite]` settings (not its path) keeps the one writer on the
/// database, and that writer follows the new retention from the commit on, while a request
/// of the old configuration is still running. A second writer, kept alive by that request,
/// went on deleting rows under the old `max_age`/`max_rows`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_of_sqlite_settings_keeps_one_writer_on_the_database() {
    let hang = Arc::new(tokio::sync::Notify::new());
    let up = upstream_notifying(hang.clone()).await;
    let setup = Setup::new();
    let first = config(
        &setup,
        up.addr,
        "[log.sqlite]\npath = \"access.db\"\nmax_age = \"1h\"\nmax_rows = 1000\n",
    );
    let second = config(
        &setup,
        up.addr,
        "[log.sqlite]\npath = \"access.db\"\nmax_age = \"30d\"\nmax_rows = 3\nbatch = 16\n",
    );
    let wraith = setup.start(&first);
    let db = wraith.path("access.db");
    // A request of the first configuration, in flight through the reload (20 s).
    let held = tokio::spawn({
        let url = wraith.url("http", "/app/hang");
        async move { h1().get(url).send().await }
    });
    hang.notified().await;
    let client = h1();
    for _ in 0..10 {
        client
            .get(wraith.url("http", "/hello"))
            .send()
            .await
            .unwrap();
    }
    eventually("10 rows", || db_count(&db) == 10).await;
    assert_eq!(sqlite_writers(wraith.pid()), 1);

    wraith.write_config(&second);
    wraith.reload().unwrap();
    assert_eq!(
        sqlite_writers(wraith.pid()),
        1,
        "one writer on the database while the old configuration is still held"
    );
    // The new max_rows applies from the commit.
    eventually("the new retention", || db_count(&db) == 3).await;
    client
        .get(wraith.url("http", "/hello"))
        .send()
        .await
        .unwrap();
    eventually("the row after the reload", || {
        db_rows(&db, "SELECT max(id) FROM access_log")[0][0] == rusqlite::types::Value::Integer(11)
    })
    .await;
    assert_eq!(sqlite_writers(wraith.pid()), 1);
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_a_sink_to_a_new_file() {
    let up = upstream().await;
    let setup = Setup::new();
    let first = config(&setup, up.addr, "[log.json]\npath = \"one.json\"\n");
    let second = config(&setup, up.addr, "[log.json]\npath = \"two.json\"\n");
    let bad = config(
        &setup,
        up.addr,
        "[log.json]\npath = \"/proc/wraith-cannot/a.json\"\n",
    );
    let wraith = setup.start(&first);
    let client = h1();
    let (one, two) = (wraith.path("one.json"), wraith.path("two.json"));
    client
        .get(wraith.url("http", "/hello?n=1"))
        .send()
        .await
        .unwrap();
    eventually("the first record", || lines(&one).len() == 1).await;

    wraith.write_config(&second);
    wraith.reload().unwrap();
    client
        .get(wraith.url("http", "/hello?n=2"))
        .send()
        .await
        .unwrap();
    eventually("the record in the new file", || lines(&two).len() == 1).await;
    assert!(lines(&two)[0].contains("n=2"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lines(&one).len(), 1, "the old file gets nothing more");

    // A sink that cannot be opened fails the reload, and the running one stays.
    wraith.write_config(&bad);
    let err = wraith.reload().unwrap_err();
    assert!(err.contains("log.json"), "{err}");
    client
        .get(wraith.url("http", "/hello?n=3"))
        .send()
        .await
        .unwrap();
    eventually("the record after the failed reload", || {
        lines(&two).len() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_and_rate_limits_fill_the_record_events_and_metrics() {
    let up = upstream().await;
    let setup = Setup::new();
    let log = "[log.json]\npath = \"access.json\"\n[log.events]\npath = \"events.json\"\n";
    let cfg = config(&setup, up.addr, log).replace(
        "[[route]]\nname = \"hello\"",
        "[[route]]\nname = \"limited\"\npath = { exact = \"/limited\" }\nrespond = { status = 200 }\n\
         rate_limits = [{ name = \"tight\", key = \"ip\", rate = \"1/m\", burst = 1 }]\n\n\
         [[route]]\nname = \"hello\"",
    );
    let wraith = setup.start(&cfg);
    let client = h1();
    assert_eq!(
        client
            .get(wraith.url("http", "/limited"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(wraith.url("http", "/limited"))
            .send()
            .await
            .unwrap()
            .status(),
        429
    );
    let banned_ip = "198.51.100.66";
    let (code, _, err) = wraith.cli(&[
        "decisions",
        "add",
        "--ip",
        banned_ip,
        "--duration",
        "1h",
        "--reason",
        "scanner seen at the edge",
    ]);
    assert_eq!(code, 0, "{err}");
    let resp = client
        .get(wraith.url("http", "/hello"))
        .header("x-forwarded-for", banned_ip)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    let json = wraith.path("access.json");
    eventually("three records", || lines(&json).len() >= 3).await;
    let records = json_lines(&json);
    let limited = &records[1];
    assert_eq!(limited["status"], 429);
    assert_eq!(limited["error"], "rate_limited");
    assert_eq!(limited["rate_limit"], "limited");
    assert_eq!(limited["rate_limiter"], "tight");
    let banned = &records[2];
    assert_eq!(banned["status"], 403);
    assert_eq!(banned["client_ip"], banned_ip);
    assert_eq!(banned["ban_origin"], "admin");
    assert_eq!(banned["ban_scenario"], "scanner seen at the edge");
    assert_eq!(banned["route"], "hello", "the route it asked for");
    assert_eq!(banned["error"], "banned");

    let events_path = wraith.path("events.json");
    eventually("two events", || lines(&events_path).len() >= 2).await;
    let events = json_lines(&events_path);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["wraith"]["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rate_limited", "banned"]);
    assert_eq!(events[0]["srcip"], CLIENT);
    assert_eq!(events[0]["wraith"]["rate_limiter"], "tight");
    assert_eq!(events[1]["srcip"], banned_ip);
    assert_eq!(events[1]["wraith"]["origin"], "admin");
    assert_eq!(events[1]["wraith"]["scenario"], "scanner seen at the edge");

    let (_, text) = wraith.admin_get("/v1/metrics").await;
    let m = parse_metrics(std::str::from_utf8(&text).unwrap());
    assert_eq!(
        metric(
            &m,
            "wraith_ratelimit_rejections_total",
            &[("route", "limited")]
        ),
        1.0
    );
    assert_eq!(metric(&m, "wraith_bans_total", &[("origin", "admin")]), 1.0);
    assert_eq!(
        metric(&m, "wraith_decisions_active", &[("origin", "local")]),
        1.0
    );
}

/// A request retried on another endpoint counts its failed attempt on the endpoint that
/// failed (its error and its time), and only its last attempt on the one that answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_metrics_put_each_attempt_on_its_own_endpoint() {
    let up = upstream().await;
    let dead = format!("127.0.0.1:{}", unused_port());
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[log.json]\npath = \"access.json\"\n\n[[upstream]]\nname = \"pair\"\nendpoints = [\"{dead}\", \"{}\"]\noutlier = {{ consecutive_failures = 100 }}\n\n[[route]]\nname = \"pair\"\nupstream = \"pair\"\n",
        setup.listeners(),
        up.addr
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    for _ in 0..6 {
        let r = client.get(wraith.url("http", "/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let path = wraith.path("access.json");
    eventually("six records", || json_lines(&path).len() >= 6).await;
    let retried = json_lines(&path)
        .iter()
        .filter(|r| r["attempts"] == 2)
        .count() as f64;
    assert!(
        retried >= 1.0,
        "round robin sends some requests to the dead endpoint first"
    );
    let (_, text) = wraith.admin_get("/v1/metrics").await;
    let m = parse_metrics(std::str::from_utf8(&text).unwrap());
    let errors = |endpoint: &str| {
        metric(
            &m,
            "wraith_upstream_errors_total",
            &[("endpoint", endpoint), ("code", "upstream_unreachable")],
        )
    };
    assert_eq!(errors(&dead), retried);
    assert_eq!(errors(&up.addr.to_string()), 0.0);
    let attempts = |endpoint: &str| {
        metric(
            &m,
            "wraith_upstream_request_duration_seconds_count",
            &[("endpoint", endpoint)],
        )
    };
    assert_eq!(attempts(&dead), retried);
    assert_eq!(
        attempts(&up.addr.to_string()),
        6.0,
        "{}",
        std::str::from_utf8(&text).unwrap()
    );
}

/// Requests the HTTP/1.1 server refuses reach the combined log: one with a readable request
/// line parses with CrowdSec's stock nginx parser like any other line (so its HTTP scenarios
/// count it); an unreadable one is logged as `"- - HTTP/1.1"`, which the parser skips, as it
/// skips nginx's own lines for such requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_in_the_combined_log_and_crowdsec() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let setup = Setup::new();
    let cfg = config(&setup, up.addr, "[log.combined]\npath = \"access.log\"\n");
    let wraith = setup.start(&cfg);
    for raw in [
        &b"POST /te-cl HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"[..],
        b"\x16\x03\x01\x00\x10garbage\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
            .await
            .unwrap();
        s.write_all(raw).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 400 "), "{answer:?}");
    }
    let path = wraith.path("access.log");
    eventually("2 combined lines", || lines(&path).len() >= 2).await;
    let all = lines(&path);
    assert!(
        all[0].contains("\"POST /te-cl HTTP/1.1\" 400 "),
        "{}",
        all[0]
    );
    assert!(all[1].contains("\"- - HTTP/1.1\" 400 "), "{}", all[1]);
    let report = tokio::task::spawn_blocking(move || cscli_explain(&path))
        .await
        .unwrap();
    let verdicts: Vec<bool> = report
        .lines()
        .filter_map(|l| {
            if l.contains("parser success") {
                Some(true)
            } else if l.contains("parser failure") {
                Some(false)
            } else {
                None
            }
        })
        .collect();
    // explain reports the lines in any order: one success (the readable line), one failure.
    assert_eq!(verdicts.len(), 2, "{report}");
    assert_eq!(verdicts.iter().filter(|v| **v).count(), 1, "{report}");
    let te_cl = report
        .split("line: ")
        .find(|b| b.contains("/te-cl"))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(te_cl.contains("parser success"), "{report}");
}

#[tokio::test]
async fn series_of_removed_routes_and_endpoints_leave_metrics_after_a_reload() {
    let (a, b) = (Upstream::echo().await, Upstream::echo().await);
    let setup = Setup::new();
    let config = |route: &str, endpoint: &Upstream| {
        format!(
            "{}\n[[upstream]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n\
             [[route]]\nname = \"{route}\"\nupstream = \"app\"\n",
            Setup::standard_listeners(),
            endpoint.addr
        )
    };
    let wraith = setup.start(&config("first", &a));
    let client = http_client();
    let get = |path: &str| client.get(wraith.url("http", path)).send();
    assert_eq!(get("/x").await.unwrap().status(), 200);
    let (_, text) = wraith.admin_get("/v1/metrics").await;
    let text = String::from_utf8_lossy(&text).to_string();
    assert!(text.contains("route=\"first\""), "{text}");
    assert!(text.contains(&a.addr.to_string()), "{text}");

    wraith.write_config(&config("second", &b));
    wraith.reload().unwrap();
    assert_eq!(get("/x").await.unwrap().status(), 200);
    let (_, text) = wraith.admin_get("/v1/metrics").await;
    let text = String::from_utf8_lossy(&text).to_string();
    assert!(text.contains("route=\"second\""), "{text}");
    assert!(text.contains(&b.addr.to_string()), "{text}");
    assert!(!text.contains("route=\"first\""), "{text}");
    assert!(!text.contains(&a.addr.to_string()), "{text}");
}

/// A listener a reload renames or removes takes its series (connections, TLS handshakes,
/// handshake duration) out of /metrics once its last connection has ended; they stayed for
/// the life of the process. The listener that stays keeps its series.
#[tokio::test]
async fn series_of_removed_listeners_leave_metrics_after_a_reload() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let config = |listeners: String| {
        format!(
            "{listeners}\n[[upstream]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n\
             [[route]]\nname = \"all\"\nupstream = \"app\"\n",
            upstream.addr
        )
    };
    let ca = setup.pki.ca_pem.clone();
    let wraith = setup.start(&config(Setup::standard_listeners()));
    let metrics = || async {
        let (_, text) = wraith.admin_get("/v1/metrics").await;
        String::from_utf8_lossy(&text).to_string()
    };
    let tls = https_client(&ca, None);
    let plain = http_client();
    let resp = tls.get(wraith.url("https", "/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = plain.get(wraith.url("http", "/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = metrics().await;
    for family in [
        "wraith_tls_handshakes_total{listener=\"https\"",
        "wraith_tls_handshake_duration_seconds_count{listener=\"https\"",
        "wraith_active_connections{listener=\"https\"",
        "wraith_active_connections{listener=\"http\"",
    ] {
        assert!(text.contains(family), "{family}:\n{text}");
    }

    wraith.write_config(&config(
        Setup::standard_listeners().replace("name = \"https\"", "name = \"https2\""),
    ));
    wraith.reload().unwrap();
    wraith
        .wait_listener("https2", Duration::from_secs(10))
        .expect("the renamed listener is bound");
    let resp = tls.get(wraith.url("https2", "/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // The old listener's keep-alive connection ends with its drain; then its series go.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = metrics().await;
    while text.contains("listener=\"https\"") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = metrics().await;
    }
    assert!(!text.contains("listener=\"https\""), "{text}");
    assert!(
        text.contains("wraith_tls_handshakes_total{listener=\"https2\""),
        "{text}"
    );
    assert!(
        text.contains("wraith_active_connections{listener=\"http\""),
        "{text}"
    );
}

/// A client that abandons its upload (the connection closed mid-body over HTTP/1.1, the
/// stream reset over HTTP/2) is a client abort: logged 499, as nginx logs a client that
/// closes before the response, never 400 (a bad request is the client's malformed body:
/// that stays 400). CrowdSec's HTTP scenarios count 400s: cancelled uploads must not feed
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_client_abandons_is_a_client_abort_not_a_bad_request() {
    let up = upstream().await;
    let setup = Setup::new();
    let cfg = config(
        &setup,
        up.addr,
        "[log]\n[log.json]\npath = \"logs/access.json\"\n",
    );
    let wraith = setup.start(&cfg);

    // HTTP/1.1: the connection closes a tenth of the way through the body.
    let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    tcp.write_all(b"POST /app/up-h1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&[b'a'; 1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tcp);

    // HTTP/1.1, malformed: a chunk size that is not hex. Still 400.
    let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    tcp.write_all(b"POST /app/bad-h1 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n")
        .await
        .unwrap();
    tcp.write_all(&[b'a'; 1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tcp.write_all(b"\r\nzz\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // HTTP/2: the stream is reset (CANCEL) after its first piece.
    let mut h2 = h2_connect(&wraith).await;
    let uri = format!(
        "https://localhost:{}/app/up-h2",
        wraith.addr("https").port()
    );
    let req = Request::post(uri)
        .header("content-length", "10000")
        .body(())
        .unwrap();
    let (_resp, mut upload) = h2.send_request(req, false).unwrap();
    upload
        .send_data(Bytes::from(vec![b'a'; 1000]), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    upload.send_reset(h2::Reason::CANCEL);

    let path = wraith.path("logs/access.json");
    let find = |p: &str| json_lines(&path).into_iter().find(|r| r["path"] == p);
    eventually("the three records", || {
        ["/app/up-h1", "/app/bad-h1", "/app/up-h2"]
            .iter()
            .all(|p| find(p).is_some())
    })
    .await;
    for p in ["/app/up-h1", "/app/up-h2"] {
        let r = find(p).unwrap();
        assert_eq!(r["status"], 499, "{r}");
        assert_eq!(r["aborted"], true, "{r}");
    }
    let bad = find("/app/bad-h1").unwrap();
    assert_eq!(bad["status"], 400, "{bad}");
    assert_eq!(bad["error"], "bad_request", "{bad}");
}

/// Whether the server closes `c` (or resets it) within `wait`.
async fn closed_within(c: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(wait, c.read(&mut buf)).await.is_ok()
}

/// The metrics listener bounds what a client reaching it can hold: a request head over 8 KiB
/// is refused (it buffered up to hyper's ~400 KiB default, for 60 s, per connection: 4,000
/// such connections took 2 GB), a connection that sends no head is closed after 10 s, one
/// client gets 4 connections at once, and a connection serves one request (kept alive, 32
/// clients asking every few seconds held every slot and kept every scrape out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_bounds_heads_idle_connections_and_their_number() {
    let up = upstream().await;
    let setup = Setup::new();
    let cfg = config(&setup, up.addr, "[metrics]\naddress = \"127.0.0.1:0\"\n");
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("metrics");

    // A head that never ends, 16 KiB of it.
    let mut big = tokio::net::TcpStream::connect(addr).await.unwrap();
    big.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let filler = format!("x-pad: {}\r\n", "a".repeat(1000));
    for _ in 0..16 {
        if big.write_all(filler.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), big.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "a 16 KiB head was still being read after 20 s"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    drop(big);

    // One client (127.0.0.2) opens 6 connections and sends nothing: 4 are taken (and closed
    // after the head timeout), the others closed at once.
    let from_2 = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socket.connect(addr).await
    };
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(from_2().await.unwrap());
    }
    // (Accepted before the 4 are counted, or not: give the server a moment.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..2 {
        // The reset may come before the connect completes.
        if let Ok(mut c) = from_2().await {
            assert!(
                closed_within(&mut c, Duration::from_secs(5)).await,
                "a fifth connection from one client was kept"
            );
        }
    }
    // Another client is served meanwhile, and its connection closes after the answer.
    let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), scrape.read_to_end(&mut answer))
        .await
        .expect("one request per connection: closed after the answer")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    for c in &mut idle[..4] {
        assert!(
            closed_within(c, Duration::from_secs(30)).await,
            "an idle metrics connection still open after 30 s"
        );
    }
}

/// The standard process metrics (`process_open_fds`, `process_resident_memory_bytes`, ...)
/// describe the gateway's own process: its open descriptors follow the client connections
/// it holds, and the figures match what /proc says about its pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_metrics_describe_the_gateway_process() {
    let before_start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"hello\"\nrespond = {{ status = 200, body = \"hi\" }}\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let scrape = || async {
        let (status, text) = wraith.admin_get("/v1/metrics").await;
        assert_eq!(status, 200);
        let text = String::from_utf8(text.to_vec()).unwrap();
        validate_openmetrics(&text);
        parse_metrics(&text)
    };
    let proc_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", wraith.pid()))
            .unwrap()
            .count() as f64
    };

    let m = scrape().await;
    let idle_fds = metric(&m, "process_open_fds", &[]);
    assert!(
        (idle_fds - proc_fds()).abs() <= 2.0,
        "{idle_fds} vs /proc's {}",
        proc_fds()
    );
    // Connections the gateway has accepted (a request answered on each) and holds open.
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let m = scrape().await;
    let busy_fds = metric(&m, "process_open_fds", &[]);
    assert!(busy_fds >= idle_fds + 20.0, "{idle_fds} -> {busy_fds}");
    assert!((busy_fds - proc_fds()).abs() <= 2.0);

    let max = metric(&m, "process_max_fds", &[]);
    assert!(max >= busy_fds, "{max}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", wraith.pid())).unwrap();
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix(" kB"))
        .unwrap()
        .parse::<f64>()
        .unwrap()
        * 1024.0;
    let rss = metric(&m, "process_resident_memory_bytes", &[]);
    assert!(
        rss > vm_rss * 0.5 && rss < vm_rss * 2.0,
        "{rss} vs VmRSS {vm_rss}"
    );
    assert!(metric(&m, "process_virtual_memory_bytes", &[]) >= rss);
    assert!(metric(&m, "process_cpu_seconds_total", &[]) > 0.0);
    let start = metric(&m, "process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start >= before_start - 1.0 && start <= now,
        "{before_start} <= {start} <= {now}"
    );
    drop(held);
}
