//! Nothing is left behind: after clients and upstreams end their exchanges in every way they
//! can (kept alive, aborted mid-response, abandoned mid-upload, cut off as slowloris, broken
//! TLS handshakes, failed and timed-out upstreams, WebSocket tunnels dropped, an upstream
//! that dies mid-body, HTTP/2 and HTTP/3 streams and connections dropped, a reload in the
//! middle), the
//! gateway holds no client or upstream connection beyond its listening sockets once the
//! pooled ones idle out, and its gauges of open connections and requests in flight are back
//! to zero. A connection task stuck on a wait nothing will end, or a counter missed on one
//! exit path, shows here as a socket or a gauge that never goes back. (The listeners' short
//! timeouts end abandoned idle connections within seconds, as they would in production: what
//! must never happen is a connection or a count that nothing ends.)

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream: `.../stream` sends a long body slowly, `.../upload` reads the whole request
/// body, `.../hang` never answers, `.../cut` sends a piece of its body and then breaks the
/// connection; anything else is echoed.
async fn app(req: Request<Incoming>) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    if path.ends_with("/stream") {
        let pieces = futures_util::stream::unfold(0u32, |i| async move {
            if i == 2_000 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; 1024]))),
                i + 1,
            ))
        });
        Response::new(BodyExt::boxed(StreamBody::new(pieces)))
    } else if path.ends_with("/upload") {
        let n = match req.into_body().collect().await {
            Ok(b) => b.to_bytes().len(),
            Err(_) => 0,
        };
        Response::new(full(n.to_string()))
    } else if path.ends_with("/hang") {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Response::new(full("too late"))
    } else if path.ends_with("/cut") {
        // (The break comes later than the head and the first piece, so it is mid-body.)
        let pieces = futures_util::stream::unfold(0u32, |i| async move {
            match i {
                0 => Some((Ok(Frame::data(Bytes::from(vec![b'y'; 4096]))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((
                        Err::<Frame<Bytes>, BoxError>("the upstream breaks off".into()),
                        2,
                    ))
                }
                _ => None,
            }
        });
        Response::new(BodyExt::boxed(StreamBody::new(pieces)))
    } else {
        echo_response(req).await
    }
}

fn config(setup: &Setup, app: &str, ws: &str, dead: &str) -> String {
    // (idle_timeout ends the QUIC connection whose client vanished without a word.)
    let limits = r#"limits = { header_read_timeout = "500ms", idle_timeout = "3s" }"#;
    let listeners = setup
        .listeners_h3(r#"handshake_timeout = "1s""#, "", ALLOW_ALL_POLICY)
        .replace(
            "protocol = \"http\"\n",
            &format!("protocol = \"http\"\n{limits}\n"),
        )
        .replace(
            "protocol = \"https\"\n",
            &format!("protocol = \"https\"\n{limits}\n"),
        );
    format!(
        r#"{listeners}
[[upstream]]
name = "app"
endpoints = ["{app}"]
response_timeout = "500ms"
idle_timeout = "1s"

[[upstream]]
name = "h2"
endpoints = ["{app}"]
protocol = "h2c"
response_timeout = "500ms"
idle_timeout = "1s"

[[upstream]]
name = "ws"
endpoints = ["{ws}"]
idle_timeout = "1s"

[[upstream]]
name = "dead"
endpoints = ["{dead}"]
connect_timeout = "500ms"

[[route]]
name = "dead"
path = {{ prefix = "/dead/" }}
upstream = "dead"

[[route]]
name = "ws"
path = {{ prefix = "/ws" }}
upstream = "ws"

[[route]]
name = "h2"
path = {{ prefix = "/h2/" }}
upstream = "h2"

[[route]]
name = "app"
path = {{ prefix = "/" }}
upstream = "app"
"#
    )
}

/// The gateway's TCP sockets other than listening ones, as `local -> remote (state)`, read
/// from /proc: its descriptors' socket inodes looked up in its network namespace's tables.
fn connections(pid: i32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return vec!["(gateway gone)".into()];
    };
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || !inodes.contains(f[9]) || f[3] == "0A" {
                continue; // not the gateway's, or LISTEN
            }
            out.push(format!("{} -> {} (state {})", addr(f[1]), addr(f[2]), f[3]));
        }
    }
    out
}

/// `0100007F:1F90` (/proc/net/tcp's little-endian hex) as `127.0.0.1:8080`; IPv6 as is.
fn addr(hex: &str) -> String {
    let Some((ip, port)) = hex.split_once(':') else {
        return hex.to_string();
    };
    match (u32::from_str_radix(ip, 16), u16::from_str_radix(port, 16)) {
        (Ok(ip), Ok(port)) => {
            format!("{}:{port}", std::net::Ipv4Addr::from(ip.swap_bytes()))
        }
        _ => hex.to_string(),
    }
}

/// The sum of every sample of `name` in the exposition.
fn gauge_sum(text: &str, name: &str) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_way_an_exchange_ends_leaves_no_connection_behind() {
    let up = Upstream::start(app).await;
    let ws = websocket_echo().await;
    let dead = format!("127.0.0.1:{}", unused_port());
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, &up.endpoint(), &ws.to_string(), &dead);
    let wraith = setup.start(&cfg);
    let http = wraith.addr("http");
    let https = wraith.addr("https");

    // Kept alive, then the client goes: HTTP/1.1 and HTTP/2, both upstream protocols.
    {
        let h1 = http_client();
        let h2 = https_client_h2(&ca, None);
        for i in 0..20 {
            let r = h1.get(format!("http://{http}/k/{i}")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let r = h2
                .get(wraith.url("https", &format!("/h2/{i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.version(), reqwest::Version::HTTP_2);
        }
        // Failed upstreams: refused (502) and silent (504), on both protocols.
        for path in ["/dead/x", "/hang", "/h2/hang"] {
            let r = h1.get(format!("http://{http}{path}")).send().await.unwrap();
            assert!(
                r.status() == 502 || r.status() == 504,
                "{path}: {}",
                r.status()
            );
            let r = h2.get(wraith.url("https", path)).send().await.unwrap();
            assert!(
                r.status() == 502 || r.status() == 504,
                "{path}: {}",
                r.status()
            );
        }
        // The upstream breaks off mid-body: the client's body ends in error.
        for path in ["/cut", "/h2/cut"] {
            let r = h1.get(format!("http://{http}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            assert!(
                r.bytes().await.is_err(),
                "{path} over HTTP/1.1 ended cleanly"
            );
            let r = h2.get(wraith.url("https", path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            assert!(r.bytes().await.is_err(), "{path} over HTTP/2 ended cleanly");
        }
        // HTTP/2 streams dropped mid-response (RST_STREAM), the connection kept.
        for path in ["/stream", "/h2/stream"] {
            let mut r = h2.get(wraith.url("https", path)).send().await.unwrap();
            assert!(r.chunk().await.unwrap().is_some());
            drop(r);
        }
    }

    // HTTP/1.1 clients that leave mid-response and mid-upload.
    for path in ["/stream", "/h2/stream"] {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(s.read(&mut buf).await.unwrap() > 0);
    }
    for path in ["/upload", "/h2/upload"] {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        s.write_all(&[b'z'; 10_000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An HTTP/2 connection dropped with an upload and a download in flight.
    {
        let mut h2 = h2_connect(&wraith).await;
        let (_response, mut upload) = h2
            .send_request(
                Request::post("https://localhost/h2/upload")
                    .body(())
                    .unwrap(),
                false,
            )
            .unwrap();
        upload
            .send_data(Bytes::from(vec![b'u'; 8_000]), false)
            .unwrap();
        let (download, _) = h2
            .send_request(
                Request::get("https://localhost/stream").body(()).unwrap(),
                true,
            )
            .unwrap();
        let mut body = download.await.unwrap().into_body();
        assert!(body.data().await.is_some());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // HTTP/3: a stream dropped mid-response, a connection closed, one whose client vanished.
    {
        let client = common::quic::H3Client::new(&ca, None, common::quic::Groups::Default);
        let mut conn = client.connect(https).await.unwrap();
        assert_eq!(conn.get("/h3/ok").await.unwrap().status(), 200);
        assert_eq!(conn.get("/h2/h3").await.unwrap().status(), 200);
        let mut stream = conn
            .send
            .send_request(Request::get("https://localhost/stream").body(()).unwrap())
            .await
            .unwrap();
        stream.finish().await.unwrap();
        assert_eq!(stream.recv_response().await.unwrap().status(), 200);
        assert!(stream.recv_data().await.unwrap().is_some());
        drop(stream);
        assert_eq!(conn.get("/h3/after").await.unwrap().status(), 200);
        conn.conn.close(0u32.into(), b"bye");
        // Through a relay that then goes away: nothing more reaches the gateway, not even
        // the client's CONNECTION_CLOSE.
        let relay = common::quic::HoldingRelay::start(https, Duration::ZERO).await;
        let mut conn = client.connect(relay.addr).await.unwrap();
        assert_eq!(conn.get("/h3/ok").await.unwrap().status(), 200);
        drop(relay);
        drop(conn);
    }

    // A reload with requests in flight on the old configuration.
    let mut long = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        long.push(s);
    }
    wraith.reload().unwrap();
    drop(long);

    // WebSocket tunnels dropped without a close frame, over both listeners' HTTP/1.1.
    for _ in 0..3 {
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
            .await
            .unwrap();
        socket
            .send(tokio_tungstenite::tungstenite::Message::text("hello"))
            .await
            .unwrap();
        assert!(socket.next().await.unwrap().is_ok());
    }

    // Slowloris (cut by header_read_timeout), broken and silent TLS handshakes.
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        silent.push(s);
        let mut s = tokio::net::TcpStream::connect(https).await.unwrap();
        s.write_all(b"\x16\x03\x01\x00\x05garbage").await.unwrap();
        let mut s = tokio::net::TcpStream::connect(https).await.unwrap();
        s.write_all(b"\x16\x03\x01").await.unwrap();
        silent.push(s);
        silent.push(tokio::net::TcpStream::connect(https).await.unwrap());
    }
    // The gateway closes each of them itself (timeouts), while the clients keep theirs open.
    let pid = wraith.pid();
    let mut left = Vec::new();
    let closed = Wraith::eventually(Duration::from_secs(20), || {
        left = connections(pid)
            .into_iter()
            .filter(|c| c.contains("(state 01)"))
            .collect();
        let done = left.is_empty();
        async move { done }
    })
    .await;
    drop(silent);
    assert!(closed, "connections still established: {left:#?}");

    // Every client has gone; pooled upstream connections idle out after their 1 s.
    let mut left = Vec::new();
    let clean = Wraith::eventually(Duration::from_secs(20), || {
        left = connections(pid)
            .into_iter()
            .filter(|c| !c.contains("(state 06)")) // TIME_WAIT has no descriptor
            .collect();
        let done = left.is_empty();
        async move { done }
    })
    .await;
    assert!(
        clean,
        "the gateway still holds: {left:#?}\n{}",
        wraith.log()
    );

    // The gauges: QUIC has no socket per connection, so its vanished client shows here
    // (until the gateway's idle timeout ends that connection).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (zero, text) = loop {
        let (status, body) = wraith.admin_get("/v1/metrics").await;
        assert_eq!(status, 200);
        let text = String::from_utf8(body.to_vec()).unwrap();
        let zero = gauge_sum(&text, "wraith_active_connections") == 0.0
            && gauge_sum(&text, "wraith_upstream_in_flight") == 0.0;
        if zero || std::time::Instant::now() >= deadline {
            break (zero, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let gauges: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("wraith_active_connections") || l.starts_with("wraith_upstream_in_flight")
        })
        .collect();
    assert!(zero, "open connections or requests left: {gauges:#?}");
}
