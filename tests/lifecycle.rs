//! Lifecycle under load: reloads that change routes, certificates and listeners (and one that
//! is invalid) while clients keep connections busy; SIGTERM drain; bodies that stream.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::{Request, Response};

fn config(setup: &Setup, upstream: std::net::SocketAddr, version: &str, extra: &str) -> String {
    format!(
        r#"{listeners}
[[upstream]]
name = "app"
endpoints = ["{upstream}"]

[[route]]
name = "version"
path = {{ exact = "/version" }}
respond = {{ status = 200, body = "{version}" }}

[[route]]
name = "app"
upstream = "app"
{extra}
"#,
        listeners = setup.listeners()
    )
}

/// A client that has sent no request yet (no byte on a plain listener, no ClientHello on a
/// TLS one, no PROXY protocol header) has nothing to finish: SIGTERM closes its connection
/// at once instead of waiting out its `header_read_timeout` or `handshake_timeout` (here a
/// minute, as long as `shutdown_timeout`), so a few silent connections cannot hold a
/// graceful stop or restart.
#[tokio::test]
async fn sigterm_does_not_wait_for_connections_that_sent_no_request() {
    let setup = Setup::new();
    let listeners = setup
        .listeners()
        .replace(
            "shutdown_timeout = \"10s\"",
            "shutdown_timeout = \"60s\"\ntrusted_proxies = [\"127.0.0.1/32\"]",
        )
        .replace(
            "protocol = \"http\"\n",
            "protocol = \"http\"\nlimits = { header_read_timeout = \"60s\" }\n",
        )
        .replace(
            "key = \"server-key.pem\"",
            "key = \"server-key.pem\", handshake_timeout = \"60s\"",
        );
    let cfg = format!(
        r#"{listeners}
[[listener]]
name = "balanced"
address = "127.0.0.1:0"
protocol = "http"
proxy_protocol = true
limits = {{ header_read_timeout = "60s" }}

[[route]]
name = "all"
respond = {{ status = 200, body = "ok" }}
"#
    );
    let mut wraith = setup.start(&cfg);
    let mut silent = Vec::new();
    for listener in ["http", "https", "balanced"] {
        silent.push(
            tokio::net::TcpStream::connect(wraith.addr(listener))
                .await
                .unwrap(),
        );
    }
    // Each connection is in its task (accepted) before the signal.
    assert_eq!(
        http_client()
            .get(wraith.url("http", "/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    wraith.signal(libc::SIGTERM);
    let code = tokio::task::spawn_blocking(move || wraith.wait_exit(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(
        code,
        Some(0),
        "SIGTERM waited for connections with no request"
    );
    drop(silent);
}

/// The DER of the certificate a fresh TLS connection is shown./// The DER of the certificate a fresh TLS connection is shown.
async fn served_cert(addr: std::net::SocketAddr, ca: &std::path::Path) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(ca, &[b"http/1.1"], None)))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_fails_no_request() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let base = |v: &str, extra: &str| config(&setup, upstream.addr, v, extra);
    let v1 = base("v1", "");
    let v2 = base("v2", "");
    let with_listener = base(
        "v2",
        "\n[[listener]]\nname = \"extra\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n",
    );
    let invalid = base(
        "v2",
        "\n[[route]]\nname = \"broken\"\npath = { regex = \"(\" }\nupstream = \"app\"\n",
    );
    let wraith = setup.start(&v1);

    // Eight clients, each on its own keep-alive connection, four over HTTPS (h2) and four
    // over plain HTTP/1.1, hammering until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (client, url) = if i % 2 == 0 {
            (https_client(&ca, None), wraith.url("https", "/app/item"))
        } else {
            (http_client(), wraith.url("http", "/app/item"))
        };
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().unwrap().push(format!("body: {e:?}")),
                    },
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    let wait_for_traffic = |n: u64| {
        let ok = ok.clone();
        async move {
            let target = ok.load(Ordering::Relaxed) + n;
            while ok.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for_traffic(200).await;
    let plain = http_client();

    // 1. A route change takes effect.
    assert_eq!(
        plain
            .get(wraith.url("http", "/version"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "v1"
    );
    wraith.write_config(&v2);
    wraith.reload().unwrap();
    assert_eq!(
        plain
            .get(wraith.url("http", "/version"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "v2"
    );
    wait_for_traffic(200).await;

    // 2. A certificate replaced on disk is served to new connections.
    let old = served_cert(wraith.addr("https"), &ca).await;
    let new_pem = wraith.pki().rotate_server_cert();
    wraith.reload().unwrap();
    let new = served_cert(wraith.addr("https"), &ca).await;
    assert_ne!(old, new);
    assert_eq!(new, pem_to_der(&new_pem));
    wait_for_traffic(200).await;

    // 3. An invalid config is rejected and changes nothing.
    wraith.write_config(&invalid);
    let err = wraith.reload().unwrap_err();
    assert!(err.contains("invalid regex"), "{err}");
    assert_eq!(
        plain
            .get(wraith.url("http", "/version"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "v2"
    );
    wait_for_traffic(200).await;

    // 4. A new listener is bound.
    wraith.write_config(&with_listener);
    wraith.reload().unwrap();
    let extra = wraith
        .wait_listener("extra", Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        plain
            .get(format!("http://{extra}/version"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "v2"
    );
    wait_for_traffic(200).await;

    // 5. ...and removed again: new connections to it are refused.
    wraith.write_config(&v2);
    wraith.reload().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(extra).await.is_ok() {
        assert!(Instant::now() < deadline, "removed listener still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_traffic(200).await;

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests (of {}): {:?}",
        failures.len(),
        ok.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) >= 1000);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_refuses_new_ones() {
    let (entered_tx, entered_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // The upstream holds each request until the test has seen the listener refuse (or 15 s
    // pass), so "refused" is seen while both requests are still in flight.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let upstream = Upstream::start(move |_req| {
        let entered = entered_tx.clone();
        let mut release = release_rx.clone();
        async move {
            let _ = entered.send(());
            let _ = tokio::time::timeout(Duration::from_secs(15), release.wait_for(|r| *r)).await;
            Response::new(full("finished"))
        }
    })
    .await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, upstream.addr, "v1", "");
    let mut wraith = setup.start(&cfg);
    let http_addr = wraith.addr("http");
    let https_url = wraith.url("https", "/slow-h2");
    let mut entered_rx = entered_rx;

    // One request in flight over HTTP/1.1, one over HTTP/2.
    let h1 = tokio::spawn({
        let url = wraith.url("http", "/slow");
        async move { http_client().get(url).send().await }
    });
    let h2 = tokio::spawn(async move { https_client(&ca, None).get(https_url).send().await });
    entered_rx.recv().await.unwrap();
    entered_rx.recv().await.unwrap();

    let started = Instant::now();
    wraith.signal(libc::SIGTERM);

    // New connections are refused once the listener is closed, while the requests are
    // still in flight. (Generous for a loaded machine: it is not a bound on the drain.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = false;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(http_addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    assert!(!h1.is_finished() && !h2.is_finished());
    // The admin socket still answers while the server drains: the status says it is
    // draining, and a ban can still be added (it applies to what is still running).
    assert_eq!(wraith.status().await["draining"], true);
    let (code, body) = wraith
        .admin(
            http::Method::POST,
            "/v1/decisions",
            Some(serde_json::json!({"ip": "192.0.2.77", "duration": "1h"})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    // A reload asked for now is refused at once, saying why (not a 30 s wait for an
    // outcome that never comes).
    let (code, _, err) = wraith.cli(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("shutting down"), "{err}");
    // `wraith stop` now waits for the drain instead of signalling again (which would be the
    // server's "exit at once", cutting the requests in flight).
    // The requests are released only once it has said so (a sleep could let the drain
    // end before a slow `stop` even looked, and then it would find no server).
    let mut stop = std::process::Command::new(env!("CARGO_BIN_EXE_wraith"))
        .args(["stop", "-c"])
        .arg(&wraith.config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stop_err = stop.stderr.take().unwrap();
    let (said_tx, said_rx) = tokio::sync::oneshot::channel();
    let stop_err = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stop_err).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = said_tx.send(first.clone());
        std::iter::once(first)
            .chain(lines.map_while(Result::ok))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let said = tokio::time::timeout(Duration::from_secs(10), said_rx)
        .await
        .expect("wraith stop said nothing")
        .unwrap();
    assert!(said.contains("already shutting down"), "{said}");
    release_tx.send_replace(true);

    // The requests in flight complete normally.
    let r1 = h1.await.unwrap().unwrap();
    assert_eq!(r1.status(), 200);
    assert_eq!(
        r1.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    assert_eq!(r1.text().await.unwrap(), "finished");
    let r2 = h2.await.unwrap().unwrap();
    assert_eq!(r2.status(), 200);
    assert_eq!(r2.text().await.unwrap(), "finished");

    // And the process exits 0, well within shutdown_timeout (10s).
    assert_eq!(
        wraith.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        wraith.log()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(wraith.log().contains("all connections finished"));
    let stop = stop.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&stop.stdout),
        stop_err.join().unwrap(),
    );
    assert!(stop.status.success(), "{out}{err}");
    assert!(out.contains("stopped"), "{out}");
}

const MIB: usize = 1 << 20;

/// Peak RSS (VmHWM) and current RSS of a process, KiB.
fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_bodies_stream_both_ways_in_bounded_memory() {
    const SIZE: usize = 100 * MIB;
    // Upstream: GET streams SIZE bytes in 64 KiB chunks; POST counts what it receives.
    let upstream = Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        if req.method() == hyper::Method::POST {
            let mut body = req.into_body();
            let mut n = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    n += data.len();
                }
            }
            return Response::new(full(n.to_string()));
        }
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let stream = futures_util::stream::iter(
            (0..SIZE / chunk.len())
                .map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
        );
        let body = http_body_util::StreamBody::new(stream);
        Response::new(
            http_body_util::BodyExt::map_err(body, |e| {
                Box::new(e) as Box<dyn std::error::Error + Send + Sync>
            })
            .boxed(),
        )
    })
    .await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "v1", "");
    let wraith = setup.start(&cfg);
    let pid = wraith.pid();
    let client = http_client();
    // Warm up pools and allocator, then take the baseline.
    client
        .get(wraith.url("http", "/version"))
        .send()
        .await
        .unwrap();
    let (_, rss_before) = memory_kib(pid);

    // Download: read and discard as it arrives.
    let resp = client.get(wraith.url("http", "/big")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = 0usize;
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().len();
    }
    assert_eq!(got, SIZE);

    // Upload: generated on the fly, never whole in memory on either side.
    let chunk = Bytes::from(vec![9u8; 64 * 1024]);
    let body = futures_util::stream::iter(
        (0..SIZE / chunk.len()).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let resp = client
        .post(wraith.url("http", "/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), SIZE.to_string());

    let (peak, _) = memory_kib(pid);
    let growth_mib = peak.saturating_sub(rss_before) as f64 / 1024.0;
    assert!(
        growth_mib < 32.0,
        "gateway RSS grew by {growth_mib:.1} MiB while streaming 2 x 100 MiB"
    );
}

#[tokio::test]
async fn a_listener_removed_by_reload_closes_its_busy_connections_after_shutdown_timeout() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let base = format!(
        "{}\n[[upstream]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n[[route]]\nname = \"all\"\nupstream = \"app\"\n",
        setup.listeners(),
        upstream.addr
    )
    .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"1s\"");
    let wraith = setup.start(&base);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A request whose body never completes, on the plain listener.
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    s.write_all(
        b"POST /slow HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Reload without that listener: the connection gets shutdown_timeout, then is closed.
    let without = base.replace(
        "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\nprotocol = \"http\"\n",
        "",
    );
    assert_ne!(
        without, base,
        "the plain listener was not removed from the config"
    );
    wraith.write_config(&without);
    wraith.reload().unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut buf)).await;
    assert!(ended.is_ok(), "the drained connection was never closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Sends a keep-alive GET /version on `s`; whether the answer came within `wait`.
async fn answered(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncWriteExt;
    s.write_all(b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_answer(s, wait).await
}

/// Whether a whole `/version` answer ("v1") arrives on `s` within `wait`.
async fn read_answer(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nv1") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    tokio::time::timeout(wait, read).await.unwrap_or(false)
}

/// The test config with `limits.max_connections = n` on the plain listener.
fn with_connection_limit(setup: &Setup, upstream: std::net::SocketAddr, n: usize) -> String {
    config(setup, upstream, "v1", "").replacen(
        "protocol = \"http\"\n",
        &format!("protocol = \"http\"\nlimits = {{ max_connections = {n} }}\n"),
        1,
    )
}

#[tokio::test]
async fn a_reload_resizes_the_connection_limit_without_cutting_connections() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let with_limit = |n: usize| with_connection_limit(&setup, upstream.addr, n);
    let [two, three, one] = [2, 3, 1].map(with_limit);
    assert!(two.contains("max_connections = 2"));
    let wraith = setup.start(&two);
    let addr = wraith.addr("http");
    let connect = || tokio::net::TcpStream::connect(addr);
    let mut a = connect().await.unwrap();
    let mut b = connect().await.unwrap();
    assert!(answered(&mut a, Duration::from_secs(10)).await);
    assert!(answered(&mut b, Duration::from_secs(10)).await);
    // The third waits in the backlog: limit 2.
    let mut c = connect().await.unwrap();
    assert!(!answered(&mut c, Duration::from_millis(700)).await);

    // Raised to 3: the waiting connection is taken and answered.
    wraith.write_config(&three);
    wraith.reload().unwrap();
    assert!(
        read_answer(&mut c, Duration::from_secs(10)).await,
        "the waiting connection was not served after the limit grew"
    );

    // Lowered to 1 with 3 open: none is cut; a new one waits until all three have closed.
    wraith.write_config(&one);
    wraith.reload().unwrap();
    for s in [&mut a, &mut b, &mut c] {
        assert!(
            answered(s, Duration::from_secs(10)).await,
            "an open connection was cut"
        );
    }
    let mut d = connect().await.unwrap();
    assert!(!answered(&mut d, Duration::from_millis(700)).await);
    drop(a);
    drop(b);
    // One still open = the new limit: d keeps waiting.
    assert!(!read_answer(&mut d, Duration::from_millis(700)).await);
    drop(c);
    assert!(
        read_answer(&mut d, Duration::from_secs(10)).await,
        "the waiting connection was not served once the count fell under the limit"
    );
    assert!(wraith.log().contains("connection limit changed"));
}

/// A limit lowered below the connections open while the accept loop already holds a free
/// slot (it takes one before it accepts): the next connection waits like the ones after it
/// (that slot went to it at once).
#[tokio::test]
async fn a_lowered_limit_holds_back_the_next_connection_too() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let with_limit = |n: usize| with_connection_limit(&setup, upstream.addr, n);
    let (four, one) = (with_limit(4), with_limit(1));
    let wraith = setup.start(&four);
    let addr = wraith.addr("http");
    let connect = || tokio::net::TcpStream::connect(addr);
    let mut a = connect().await.unwrap();
    let mut b = connect().await.unwrap();
    assert!(answered(&mut a, Duration::from_secs(10)).await);
    assert!(answered(&mut b, Duration::from_secs(10)).await);
    // Two open under a limit of 4: the accept loop holds a third slot. Lowered to 1.
    wraith.write_config(&one);
    wraith.reload().unwrap();
    let mut d = connect().await.unwrap();
    assert!(
        !answered(&mut d, Duration::from_millis(700)).await,
        "a new connection was served with two open under a limit of 1"
    );
    drop(a);
    assert!(!read_answer(&mut d, Duration::from_millis(700)).await);
    drop(b);
    assert!(
        read_answer(&mut d, Duration::from_secs(10)).await,
        "the waiting connection was not served once the count fell under the limit"
    );
}

/// `serve -c wraith.toml` (a relative path): the first load resolves the file's relative paths
/// as every reload does, so a reload that changes nothing rebuilds nothing (the access-log
/// sink keeps its counts, the decisions state file is not "moved").
#[tokio::test]
async fn a_relative_config_path_reloads_without_every_path_looking_changed() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(
        &setup,
        upstream.addr,
        "v1",
        "[log.json]\npath = \"access.json\"\n[decisions]\nstate_file = \"bans.json\"\n",
    );
    let wraith = setup.start_relative(&cfg);
    let client = http_client();
    let resp = client
        .get(wraith.url("http", "/version"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let accepted = |v: &serde_json::Value| {
        v["log_sinks"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["sink"] == "json"))
            .map(|s| s["accepted"].clone())
    };
    // The record is accounted for just after the response is sent.
    assert!(
        Wraith::eventually(Duration::from_secs(10), || async {
            accepted(&wraith.status().await) == Some(1.into())
        })
        .await
    );

    wraith.reload().unwrap();
    let status = wraith.status().await;
    assert_eq!(
        accepted(&status),
        Some(1.into()),
        "the reload rebuilt the sink: {status}"
    );
    assert!(
        !wraith.log().contains("decisions state file changed"),
        "{}",
        wraith.log()
    );
    assert!(
        status["config_file"]
            .as_str()
            .is_some_and(|p| p.starts_with('/')),
        "{status}"
    );
}

/// Under systemd (`Type=notify`, `$NOTIFY_SOCKET`): READY=1 with the server's pid once it
/// serves, RELOADING=1 (with the monotonic time `Type=notify-reload` wants) and READY=1
/// around each reload, applied or refused, and STOPPING=1 with the drain's length when
/// SIGTERM begins a drain (systemd waits that long before it kills).
#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let upstream_port = unused_port();
    let setup = Setup::new();
    let cfg = config(
        &setup,
        format!("127.0.0.1:{upstream_port}").parse().unwrap(),
        "v1",
        "",
    );
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("notify");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let next = || {
        let mut buf = vec![0u8; 4096];
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let mut wraith = setup.start_with_env(&cfg, &[("NOTIFY_SOCKET", path.as_os_str())]);

    let ready = next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", wraith.pid())),
        "{ready}"
    );
    assert!(
        ready.contains("STATUS=serving (configuration generation 1)"),
        "{ready}"
    );
    // Ready means serving: the listener answers.
    let answer = std::process::Command::new("curl")
        .args(["-s", &wraith.url("http", "/version")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer.stdout), "v1");

    wraith.write_config(&cfg.replace("v1", "v2"));
    wraith.reload().unwrap();
    let reloading = next();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let done = next();
    assert!(done.lines().any(|l| l == "READY=1"), "{done}");
    assert!(done.contains("configuration generation 2"), "{done}");

    wraith.write_config("this is not toml [");
    let _ = wraith.reload();
    assert!(next().contains("RELOADING=1"));
    let refused = next();
    assert!(refused.lines().any(|l| l == "READY=1"), "{refused}");
    assert!(refused.contains("the last reload was refused"), "{refused}");
    assert_eq!(
        refused.lines().count(),
        2,
        "one line per assignment: {refused}"
    );

    wraith.signal(libc::SIGTERM);
    let stopping = next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    // shutdown_timeout (10 s in the test config) and 10 s for the flush.
    assert!(
        stopping.contains("EXTEND_TIMEOUT_USEC=20000000"),
        "{stopping}"
    );
    assert_eq!(wraith.wait_exit(Duration::from_secs(20)), Some(0));
}

/// A connection from `ip` (127.0.0.2 is another client than the tests' 127.0.0.1) that asks
/// for `/version`: the connection when it is answered, `None` when it is refused (reset
/// before or after the connect completes, or closed unanswered).
async fn served_from(
    ip: &str,
    to: std::net::SocketAddr,
    wait: Duration,
) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    let mut s = socket.connect(to).await.ok()?;
    s.write_all(b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    read_answer(&mut s, wait).await.then_some(s)
}

/// `limits.max_connections_per_client`: a client with its limit open has its next connection
/// refused at accept (and counted), other clients are served, a closed connection gives its
/// place back, and a trusted proxy (which carries many clients) is not limited.
#[tokio::test]
async fn one_client_cannot_hold_more_than_max_connections_per_client() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let limited = config(&setup, upstream.addr, "v1", "").replacen(
        "protocol = \"http\"\n",
        "protocol = \"http\"\nlimits = { max_connections_per_client = 2 }\n",
        1,
    );
    let trusted = limited.replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        1,
    );
    assert_ne!(limited, trusted);
    let wraith = setup.start(&limited);
    let addr = wraith.addr("http");
    let wait = Duration::from_secs(5);

    let a = served_from("127.0.0.1", addr, wait).await.expect("first");
    let mut b = served_from("127.0.0.1", addr, wait).await.expect("second");
    assert!(
        served_from("127.0.0.1", addr, wait).await.is_none(),
        "a third connection was served"
    );
    assert!(
        served_from("127.0.0.2", addr, wait).await.is_some(),
        "another client was refused"
    );

    // The place comes back once the server has seen the close.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    let _again = loop {
        if let Some(s) = served_from("127.0.0.1", addr, Duration::from_secs(2)).await {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection's place did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(answered(&mut b, wait).await, "the open connection stays");

    let (status, metrics) = wraith.admin_get("/v1/metrics").await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "wraith_connections_refused_total{listener=\"http\",reason=\"per_client_limit\"} "
        ) && !l.ends_with(" 0")),
        "{metrics}"
    );

    // Behind a trusted proxy every client is the proxy's address: not limited.
    wraith.write_config(&trusted);
    wraith.reload().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let s = served_from("127.0.0.1", addr, wait).await;
        held.push(s.expect("a trusted proxy was limited"));
    }
}

/// Per-client connection counts carry over a reload (of the routes here): a client holding
/// its `max_connections_per_client` before the reload is still at its limit after it, rather
/// than handed a fresh allowance next to the connections it keeps open.
#[tokio::test]
async fn per_client_connection_counts_survive_a_reload() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let limited = |extra: &str| {
        config(&setup, upstream.addr, "v1", extra).replacen(
            "protocol = \"http\"\n",
            "protocol = \"http\"\nlimits = { max_connections_per_client = 2 }\n",
            1,
        )
    };
    let extra =
        "[[route]]\nname = \"extra\"\npath = { exact = \"/extra\" }\nrespond = { status = 204 }\n";
    let (before, after) = (limited(""), limited(extra));
    let wraith = setup.start(&before);
    let addr = wraith.addr("http");
    let wait = Duration::from_secs(5);
    let mut a = served_from("127.0.0.1", addr, wait).await.expect("first");
    let mut b = served_from("127.0.0.1", addr, wait).await.expect("second");

    wraith.write_config(&after);
    wraith.reload().unwrap();
    assert!(
        served_from("127.0.0.1", addr, wait).await.is_none(),
        "a third connection was served after the reload"
    );
    assert!(
        served_from("127.0.0.2", addr, wait).await.is_some(),
        "another client was refused"
    );
    assert!(answered(&mut a, wait).await && answered(&mut b, wait).await);
}
