//! The forwarding path end to end: a real upstream, the gateway in front, real clients.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(setup: &Setup, upstream: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"{listeners}
[[upstream]]
name = "app"
endpoints = ["{upstream}"]
connect_timeout = "2s"
response_timeout = "2s"

[[route]]
name = "hello"
path = {{ exact = "/hello" }}
respond = {{ status = 201, body = "hi\n", headers = {{ "x-built-in" = "yes" }} }}

[[route]]
name = "moved"
path = {{ prefix = "/old/" }}
redirect = {{ to = "https://{{host}}/new{{path}}", status = 301 }}

[[route]]
name = "stripped"
path = {{ prefix = "/strip/" }}
upstream = "app"
strip_prefix = true
request_headers = {{ set = {{ "x-route" = "stripped" }}, remove = ["x-remove-me"] }}
response_headers = {{ add = {{ "x-resp" = "added" }} }}

{extra}

[[route]]
name = "app"
path = {{ prefix = "/" }}
upstream = "app"
"#,
        listeners = setup.listeners()
    )
}

async fn json(resp: reqwest::Response) -> serde_json::Value {
    resp.json().await.unwrap()
}

#[tokio::test]
async fn forwards_with_forwarding_headers_and_strips_hop_by_hop() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);
    let client = http_client();

    let resp = client
        .get(wraith.url("http", "/strip/a/b?q=1"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "gzip")
        .header("x-remove-me", "1")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("x_real_ip", "6.6.6.6")
        .header("x_forwarded_for", "6.6.6.6")
        .header("Content_Length", "40")
        .header("transfer_encoding", "chunked")
        .header("x-request-id", "spoofed-id")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-resp"], "added");
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(rid.len(), 32, "a fresh id, not the client's");
    let echo = json(resp).await;
    let h = &echo["headers"];
    assert_eq!(echo["uri"], "/a/b?q=1", "prefix stripped, query kept");
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "x-remove-me",
    ] {
        assert!(h.get(hop).is_none(), "{hop} reached the upstream: {h}");
    }
    assert_eq!(
        h["x-forwarded-for"][0], "127.0.0.1",
        "spoofed XFF replaced by the real peer"
    );
    assert_eq!(
        h["x-real-ip"],
        serde_json::json!(["127.0.0.1"]),
        "spoofed X-Real-IP replaced by the real peer"
    );
    for underscored in [
        "x_real_ip",
        "x_forwarded_for",
        "content_length",
        "transfer_encoding",
    ] {
        assert!(
            h.get(underscored).is_none(),
            "{underscored} (the same CGI variable as the real header) reached the upstream: {h}"
        );
    }
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(
        h["forwarded"][0],
        format!("for=127.0.0.1;proto=http;host=127.0.0.1")
    );
    assert_eq!(h["via"][0], "1.1 wraith");
    assert_eq!(h["x-route"][0], "stripped");
    assert_eq!(h["x-request-id"][0], rid.as_str());
    assert_eq!(
        h["host"][0],
        wraith.addr("http").to_string(),
        "client Host preserved"
    );

    // Claims about the client or the original URL are believed only from trusted proxies,
    // on both ways forwarding headers are sent: into the header map (the route above edits
    // request headers) and written into the head (a route without edits).
    for path in ["/strip/c", "/plain"] {
        let echo = json(
            client
                .get(wraith.url("http", path))
                .header("x-original-url", "/admin")
                .header("X-Rewrite-URL", "/admin")
                .header("x_original_url", "/admin")
                .header("x-forwarded-port", "1")
                .header("x-forwarded-prefix", "/evil")
                .header("true-client-ip", "6.6.6.6")
                .header("x-http-method-override", "DELETE")
                .header("x-forwarded-for", "6.6.6.6")
                .header("x-forwarded-for", "7.7.7.7")
                .send()
                .await
                .unwrap(),
        )
        .await;
        let h = &echo["headers"];
        for claim in [
            "x-original-url",
            "x-rewrite-url",
            "x_original_url",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "true-client-ip",
            "x-http-method-override",
        ] {
            assert!(
                h.get(claim).is_none(),
                "{path}: {claim} reached the upstream: {h}"
            );
        }
        assert_eq!(
            h["x-forwarded-for"],
            serde_json::json!(["127.0.0.1"]),
            "{path}"
        );
    }
}

#[tokio::test]
async fn trusted_proxy_chain_is_appended() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "").replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let wraith = setup.start(&cfg);
    let resp = http_client()
        .get(wraith.url("http", "/x"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-request-id", "from-the-edge-42")
        .header("x-forwarded-port", "8443")
        .header("x-original-url", "/kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "from-the-edge-42");
    let echo = json(resp).await;
    assert_eq!(
        echo["headers"]["x-forwarded-for"][0],
        "203.0.113.7, 127.0.0.1"
    );
    assert_eq!(
        echo["headers"]["x-real-ip"],
        serde_json::json!(["203.0.113.7"]),
        "X-Real-IP is the client the trusted proxy forwarded"
    );
    // What a trusted proxy says about the original request passes.
    assert_eq!(echo["headers"]["x-forwarded-port"][0], "8443");
    assert_eq!(echo["headers"]["x-original-url"][0], "/kept");
}

#[tokio::test]
async fn built_in_responses_redirects_and_404() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "").replace(
        "[[route]]\nname = \"app\"\npath = { prefix = \"/\" }",
        "[[route]]\nname = \"app\"\npath = { prefix = \"/app/\" }",
    );
    let wraith = setup.start(&cfg);
    let client = http_client();

    let resp = client
        .get(wraith.url("http", "/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-built-in"], "yes");
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(resp.text().await.unwrap(), "hi\n");

    let resp = client
        .get(wraith.url("http", "/old/page?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "https://127.0.0.1/new/old/page");

    let resp = client
        .get(wraith.url("http", "/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = json(resp).await;
    assert_eq!(body["error"], "no_route");
    assert_eq!(body["request_id"], rid.as_str());

    // Dot segments cannot smuggle a request past the route that matched.
    let resp = client
        .get(wraith.url("http", "/app/%2e%2e/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "normalized to /hello before routing");
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    // Nothing listens on this port.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], unused_port()));
    let slow = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Response::new(full("late"))
    })
    .await;
    let setup = Setup::new();
    let extra = format!(
        r#"
[[upstream]]
name = "slow"
endpoints = ["{}"]
response_timeout = "300ms"

[[route]]
name = "slow"
path = {{ prefix = "/slow" }}
upstream = "slow"
"#,
        slow.addr
    );
    let cfg = config(&setup, dead, &extra);
    let wraith = setup.start(&cfg);
    let client = http_client();

    let resp = client.get(wraith.url("http", "/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = json(resp).await;
    assert_eq!(body["error"], "upstream_unreachable");
    assert_eq!(body["request_id"], rid.as_str());
    assert!(
        !body["message"].as_str().unwrap().contains("os error"),
        "no internal detail leaked"
    );

    let started = Instant::now();
    let resp = client
        .get(wraith.url("http", "/slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(json(resp).await["error"], "upstream_timeout");
}

#[tokio::test]
async fn chunked_request_bodies_stream_through() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);

    // A chunked body from a stream of unknown length.
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..100)
        .map(|i| Ok(Bytes::from(vec![b'a' + (i % 26) as u8; 1000])))
        .collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = http_client()
        .post(wraith.url("http", "/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = json(resp).await;
    assert_eq!(echo["body_len"], 100_000);
    assert!(
        echo["headers"].get("transfer-encoding").is_some(),
        "forwarded as chunked: {}",
        echo["headers"]
    );

    // Raw HTTP/1.1 chunked framing, written by hand.
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    s.write_all(b"POST /raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"body_len\":11"), "{out}");
}

#[tokio::test]
async fn http2_multiplexes_100_concurrent_streams_on_one_connection() {
    let upstream = Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        // Hold every request a little so they really overlap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        echo_response(req).await
    })
    .await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);

    // One TLS connection, h2 by ALPN, 100 streams at once.
    let tcp = tokio::net::TcpStream::connect(wraith.addr("https"))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_client_config(
        &ca,
        &[b"h2"],
        None,
    )))
    .connect("localhost".try_into().unwrap(), tcp)
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(format!("https://localhost/stream/{i}"))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["uri"], format!("/stream/{i}"));
            assert_eq!(v["headers"]["via"][0], "2 wraith");
            assert_eq!(
                v["headers"]["host"][0], "localhost",
                "Host set from :authority"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 100 requests of 200 ms each, done concurrently rather than one after another.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "streams were not concurrent: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    // A WebSocket echo upstream (tokio-tungstenite server side).
    let ws_addr = websocket_echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, ws_addr, "");
    let wraith = setup.start(&cfg);
    let url = format!("ws://{}/ws", wraith.addr("http"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..10 {
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
            "ping {i}"
        )))
        .await
        .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    // Silent for longer than the route's response timeout (2s here): the tunnel is closed.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert!(
        matches!(ended, Ok(None) | Ok(Some(Err(_)))),
        "the idle tunnel was not closed: {ended:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", wraith.addr("http")))
        .await
        .unwrap();
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn slow_request_head_is_cut_off() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "").replace(
        "protocol = \"http\"\n",
        "protocol = \"http\"\nlimits = { header_read_timeout = \"500ms\", idle_timeout = \"5s\" }\n",
    );
    let wraith = setup.start(&cfg);

    // Slowloris: start a request head and dribble bytes without ever finishing it.
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    let started = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "the connection was not closed");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}"
    );

    // A normal keep-alive client that pauses longer than the header timeout between
    // requests is not cut off: idle time is governed by idle_timeout.
    let client = http_client();
    assert_eq!(
        client
            .get(wraith.url("http", "/a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        client
            .get(wraith.url("http", "/b"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn https_serves_h1_and_h2_and_redirects_plain_http() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, upstream.addr, "").replacen(
        "protocol = \"http\"\n",
        "protocol = \"http\"\nredirect_https = { port = 8443 }\n",
        1,
    );
    let wraith = setup.start(&cfg);

    let resp = http_client()
        .get(wraith.url("http", "/some/path?a=b"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        "https://127.0.0.1:8443/some/path?a=b"
    );
    // `OPTIONS *` names no resource: sent to the root, not to `https://host*`.
    let text = raw_exchange(
        wraith.addr("http"),
        b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(
        text.contains("\r\nlocation: https://localhost:8443/\r\n"),
        "{text}"
    );
    // An empty Host is no host: not `https://:8443/`.
    let text = raw_exchange(
        wraith.addr("http"),
        b"GET /p?q HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(
        text.contains("\r\nlocation: https://localhost:8443/p?q\r\n"),
        "{text}"
    );

    let h2 = https_client(&ca, None)
        .get(wraith.url("https", "/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    let echo = json(h2).await;
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(echo["version"], "HTTP/1.1", "HTTP/1.1 to the upstream");

    let h1 = https_client_h1(&ca, None)
        .get(wraith.url("https", "/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    assert_eq!(h1.status(), 200);
}

#[tokio::test]
async fn h2c_upstreams_get_http2_with_te_trailers() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "").replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\nprotocol = \"h2c\"",
    );
    let wraith = setup.start(&cfg);
    let resp = http_client()
        .get(wraith.url("http", "/grpc-ish"))
        .header("te", "trailers")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = json(resp).await;
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["headers"]["te"][0], "trailers");
    assert!(
        echo["headers"].get("host").is_none(),
        "HTTP/2 carries :authority, not Host"
    );
}

#[tokio::test]
async fn ambiguous_hosts_are_refused_or_resolved_like_the_router() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);

    // Two Host headers: 400, never forwarded.
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    s.write_all(
        b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("more than one Host header"), "{out}");

    // Absolute-form target: the authority is the host (routing and upstream agree).
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    s.write_all(
        b"GET http://routed.example/x HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"host\":[\"routed.example\"]"), "{out}");
}

#[tokio::test]
async fn http2_connections_without_requests_and_partial_prefaces_are_closed() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "").replace(
        "protocol = \"http\"\n",
        "protocol = \"http\"\nlimits = { header_read_timeout = \"500ms\", idle_timeout = \"5s\" }\n",
    );
    let wraith = setup.start(&cfg);
    // Until EOF (or the test's own limit): how long the gateway kept the connection.
    async fn open_for(mut s: tokio::net::TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(8), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return started.elapsed(),
                Ok(Ok(_)) => {} // SETTINGS, PINGs: keep reading
            }
        }
    }
    // The preface and an empty SETTINGS frame, then nothing: no request ever comes.
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let kept = open_for(s).await;
    assert!(kept < Duration::from_secs(3), "kept {kept:?}");
    // Half a preface, then silence.
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    s.write_all(b"PRI * HT").await.unwrap();
    let kept = open_for(s).await;
    assert!(kept < Duration::from_secs(3), "kept {kept:?}");
}

#[tokio::test]
async fn paths_and_hosts_that_upstreams_read_differently_are_refused() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("http");
    // One raw request (closing the connection); the whole answer, lowercased.
    let exchange = |head: String| async move {
        raw_exchange(addr, head.as_bytes())
            .await
            .to_ascii_lowercase()
    };
    let get = |target: &str, host: &str| {
        exchange(format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))
    };
    let status = |text: String| text.lines().next().unwrap_or("").to_string();
    for target in [
        "/strip/..;/admin",
        "/strip/..\\admin",
        "/strip/%5Cadmin",
        "/strip/a%00",
        "/strip/..%2Fadmin",
    ] {
        let line = status(get(target, "localhost").await);
        assert!(line.contains(" 400 "), "{target}: {line}");
    }
    // No Host at all: 400 on HTTP/1.1, served on HTTP/1.0 (which may omit it).
    for (version, expect) in [("1.1", " 400 "), ("1.0", " 201 ")] {
        let text = exchange(format!(
            "GET /hello HTTP/{version}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(
            status(text.clone()).contains(expect),
            "HTTP/{version}: {text}"
        );
    }
    for host in ["internal@localhost", "localhost/x", "a, b"] {
        let line = status(get("/hello", host).await);
        assert!(line.contains(" 400 "), "{host}: {line}");
    }
    // Merged slashes: `//evil.example` is the path `/evil.example`, never a redirect elsewhere.
    let text = get("/old//evil.example", "localhost").await;
    assert!(
        text.contains("location: https://localhost/new/old/evil.example"),
        "{text}"
    );
    // Ordinary requests still pass: a matrix parameter (proxied), a trailing-dot host.
    let line = status(get("/app;v=1", "localhost").await);
    assert!(line.contains(" 200 "), "{line}");
    let line = status(get("/hello", "localhost.").await);
    assert!(line.contains(" 201 "), "{line}");
}

#[tokio::test]
async fn path_parameters_do_not_walk_around_a_route() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(
        &setup,
        upstream.addr,
        "[[route]]\nname = \"admin\"\npath = { prefix = \"/api/admin/\" }\nrespond = { status = 403, body = \"admins only\" }\n",
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    // A Java upstream reads `/api/admin;x/users` as `/api/admin/users`: so does routing.
    let resp = client
        .get(wraith.url("http", "/api/admin;x/users"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.text().await.unwrap(), "admins only");
    // An exact route matches with a session id appended.
    let resp = client
        .get(wraith.url("http", "/hello;jsessionid=ABC"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    // The upstream still gets the path as sent.
    let resp = client
        .get(wraith.url("http", "/api/other;v=2/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["uri"], "/api/other;v=2/x");
    // A segment that is only parameters does not hide the route either.
    let resp = client
        .get(wraith.url("http", "/api/;x/admin/users"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // Parameters inside the prefix of a strip_prefix route: what to strip is a guess, 400.
    let resp = client
        .get(wraith.url("http", "/strip;x/abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

/// A stream of `n` chunks of 1,000 bytes, sent chunked (no length known up front).
fn chunked(n: usize) -> reqwest::Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        (0..n).map(|_| Ok(Bytes::from(vec![b'x'; 1000]))).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn request_bodies_over_max_request_body_get_413() {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = seen.clone();
    let upstream = Upstream::start(move |req| {
        s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        echo_response(req)
    })
    .await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let extra = format!(
        r#"
[[upstream]]
name = "h2c"
endpoints = ["{}"]
protocol = "h2c"

[[route]]
name = "big"
path = {{ prefix = "/big/" }}
upstream = "app"
max_request_body = "unlimited"

[[route]]
name = "bodiless"
path = {{ prefix = "/bodiless/" }}
upstream = "app"
max_request_body = "0"

[[route]]
name = "h2c"
path = {{ prefix = "/h2c/" }}
upstream = "h2c"
max_request_body = "10KiB"

[[route]]
name = "tls"
path = {{ prefix = "/tls/" }}
upstream = "app"
max_request_body = "10KiB"
"#,
        upstream.addr
    );
    let cfg = config(&setup, upstream.addr, &extra).replace(
        "protocol = \"http\"\n",
        "protocol = \"http\"\nlimits = { max_request_body = \"10KiB\" }\n",
    );
    assert!(cfg.contains("max_request_body = \"10KiB\" }"), "{cfg}");
    let wraith = setup.start(&cfg);
    let client = http_client();
    let count = || seen.load(std::sync::atomic::Ordering::SeqCst);

    // Declared too large: refused before the upstream hears of it.
    let resp = client
        .post(wraith.url("http", "/upload"))
        .body(vec![b'x'; 20_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body = json(resp).await;
    assert_eq!(body["error"], "payload_too_large", "{body}");
    assert_eq!(count(), 0, "the upstream saw a refused request");

    // At the limit: forwarded.
    let resp = client
        .post(wraith.url("http", "/upload"))
        .body(vec![b'x'; 10 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["body_len"], 10 * 1024);

    // Streamed without a length: under the limit it passes, over it the body is cut off
    // and the client gets 413, on HTTP/1.1 and HTTP/2 upstreams alike.
    for path in ["/upload", "/h2c/upload"] {
        let resp = client
            .post(wraith.url("http", path))
            .body(chunked(5))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(json(resp).await["body_len"], 5000, "{path}");
        let resp = client
            .post(wraith.url("http", path))
            .body(chunked(50))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 413, "{path}");
        assert_eq!(json(resp).await["error"], "payload_too_large", "{path}");
    }

    // Over HTTP/2 from the client (TLS), declared and streamed.
    let h2 = https_client_h2(&ca, None);
    let resp = h2
        .post(wraith.url("https", "/tls/upload"))
        .body(vec![b'x'; 20_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 413);
    let resp = h2
        .post(wraith.url("https", "/tls/upload"))
        .body(chunked(50))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // The listener's limit is the http listener's only; the https one has none.
    let resp = h2
        .post(wraith.url("https", "/upload"))
        .body(chunked(50))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["body_len"], 50_000);

    // A route may lift the listener's limit, or allow no body at all.
    let resp = client
        .post(wraith.url("http", "/big/upload"))
        .body(vec![b'x'; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["body_len"], 100_000);
    let resp = client
        .post(wraith.url("http", "/bodiless/x"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let resp = client
        .get(wraith.url("http", "/bodiless/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // `Expect: 100-continue` with a length over the limit: 413 at once, no 100, and the
    // connection closes (the body never comes).
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    s.write_all(
        b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("the connection closes")
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(!out.contains("100 Continue"), "{out}");

    // Bodies cut off were the client's doing: the endpoints are still healthy.
    let resp = client
        .get(wraith.url("http", "/h2c/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_request_body_that_stalls_is_408_not_the_upstreams_fault() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let extra = format!(
        "[[upstream]]\nname = \"h2c\"\nendpoints = [\"{}\"]\nprotocol = \"h2c\"\n\
         response_timeout = \"2s\"\n\n\
         [[route]]\nname = \"h2c\"\npath = {{ prefix = \"/h2c/\" }}\nupstream = \"h2c\"\n",
        upstream.addr
    );
    let cfg = config(&setup, upstream.addr, &extra);
    let wraith = setup.start(&cfg);
    for path in ["/upload", "/h2c/upload"] {
        let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
            .await
            .unwrap();
        // 5 of 100 bytes, then nothing with the connection open: after the response timeout
        // (2 s) the attempt ends, as the client's error.
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhello");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("answered and closed")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408 "), "{path}: {out}");
        assert!(out.contains("\"request_timeout\""), "{path}: {out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{path}: {out}"
        );
    }
    // Nothing was held against the upstream.
    let status = wraith.status().await;
    for u in status["upstreams"].as_array().unwrap() {
        for e in u["endpoints"].as_array().unwrap() {
            assert_eq!(e["consecutive_failures"], 0, "{status}");
        }
    }
}

#[tokio::test]
async fn a_websocket_tunnel_holds_its_endpoints_connection_slot() {
    let ws_addr = websocket_echo().await;
    let setup = Setup::new();
    let extra = format!(
        "[[upstream]]\nname = \"ws\"\nendpoints = [\"{ws_addr}\"]\nmax_connections = 1\n\
         max_pending = 0\nresponse_timeout = \"30s\"\n\n\
         [[route]]\nname = \"ws\"\npath = {{ prefix = \"/ws\" }}\nupstream = \"ws\"\n"
    );
    let cfg = config(&setup, ws_addr, &extra);
    let wraith = setup.start(&cfg);
    let in_flight = |status: serde_json::Value| {
        status["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == "ws")
            .unwrap()["endpoints"][0]["in_flight"]
            .as_u64()
            .unwrap()
    };
    let (mut ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws", wraith.addr("http")))
            .await
            .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap(), "hi");
    // The open tunnel is the endpoint's one connection: another request finds it full.
    assert_eq!(in_flight(wraith.status().await), 1);
    let resp = http_client()
        .get(wraith.url("http", "/ws/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(json(resp).await["error"], "upstream_overloaded");
    // Closed, the tunnel gives the slot back.
    ws.close(None).await.unwrap();
    drop(ws);
    let freed = Wraith::eventually(Duration::from_secs(5), || async {
        in_flight(wraith.status().await) == 0
    })
    .await;
    assert!(freed, "{}", wraith.status().await);
}

#[tokio::test]
async fn websocket_tunnels_count_against_the_listeners_connections_and_are_drained() {
    let ws_addr = websocket_echo().await;
    let setup = Setup::new();
    let extra = format!(
        "[[upstream]]\nname = \"ws\"\nendpoints = [\"{ws_addr}\"]\nresponse_timeout = \"30s\"\n\n\
         [[route]]\nname = \"ws\"\npath = {{ prefix = \"/ws\" }}\nupstream = \"ws\"\n"
    );
    let cfg = config(&setup, ws_addr, &extra)
        .replacen(
            "protocol = \"http\"\n",
            "protocol = \"http\"\nlimits = { max_connections = 2 }\n",
            1,
        )
        .replacen("shutdown_timeout = \"10s\"", "shutdown_timeout = \"2s\"", 1);
    assert!(cfg.contains("max_connections = 2"), "{cfg}");
    let mut wraith = setup.start(&cfg);
    let url = format!("ws://{}/ws", wraith.addr("http"));
    let open = || async {
        let (mut ws, resp) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        assert_eq!(resp.status(), 101);
        ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
            .await
            .unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap(), "hi");
        ws
    };
    let mut first = open().await;
    let mut second = open().await;
    let active = |status: serde_json::Value| {
        status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "http")
            .unwrap()["active_connections"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(active(wraith.status().await), 2, "two open tunnels");

    // The listener is full: a third connection waits in the backlog, unanswered...
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut third = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    third
        .write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(700), third.read_to_end(&mut answer)).await;
    assert!(waited.is_err(), "answered at the limit: {answer:?}");
    // ...until a tunnel ends.
    first.close(None).await.unwrap();
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer))
        .await
        .expect("served once a tunnel closed")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 201"), "{answer:?}");

    // SIGTERM: the open tunnel is one of the connections the shutdown drains; it keeps
    // working within shutdown_timeout, then is closed and the process exits.
    wraith.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    second
        .send(tokio_tungstenite::tungstenite::Message::text("still"))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(2), second.next())
        .await
        .expect("the tunnel answers while draining");
    assert_eq!(echoed.unwrap().unwrap().into_text().unwrap(), "still");
    assert_eq!(wraith.wait_exit(Duration::from_secs(15)), Some(0));
}

#[tokio::test]
async fn a_response_streaming_longer_than_the_idle_timeout_is_not_cut_off() {
    // One line every 250 ms for 3 s, through listeners whose idle and header timeouts are
    // 1 s: the response is in flight all along, on every protocol.
    let upstream = Upstream::start(|_req| async {
        let lines = futures_util::stream::unfold(0u32, |i| async move {
            if i == 12 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let frame = hyper::body::Frame::data(Bytes::from(format!("tick {i}\n")));
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(frame),
                i + 1,
            ))
        });
        Response::new(BodyExt::boxed(http_body_util::StreamBody::new(lines)))
    })
    .await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, upstream.addr, "").replace(
        "protocol = \"https\"\n",
        "protocol = \"https\"\nlimits = { idle_timeout = \"1s\", header_read_timeout = \"1s\" }\n",
    );
    assert!(cfg.contains("idle_timeout = \"1s\""), "{cfg}");
    let wraith = setup.start(&cfg);
    for (client, version) in [
        (https_client_h2(&ca, None), reqwest::Version::HTTP_2),
        (https_client_h1(&ca, None), reqwest::Version::HTTP_11),
    ] {
        let resp = client
            .get(wraith.url("https", "/stream"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), version);
        let body = tokio::time::timeout(Duration::from_secs(15), resp.text())
            .await
            .expect("the stream ends")
            .unwrap_or_else(|e| panic!("{version:?}: the stream was cut off: {e}"));
        assert_eq!(body.lines().count(), 12, "{version:?}: {body}");
        assert!(body.ends_with("tick 11\n"), "{version:?}: {body}");
    }
}

#[tokio::test]
async fn request_trailers_reach_http2_upstreams_cleaned() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr, "").replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\nprotocol = \"h2c\"",
    );
    let wraith = setup.start(&cfg);
    let mut s = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    // Trailers that pose as the client's identity or address, connection-specific ones
    // (hyper's HTTP/2 client refuses to send those at all), and one ordinary field.
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\n\
          x-forwarded-client-cert: URI=spiffe://evil/admin\r\nx-wraith-identity: admin\r\n\
          x-real-ip: 6.6.6.6\r\nx-original-url: /admin\r\nx_forwarded_for: 6.6.6.6\r\n\
          te: gzip\r\nconnection: x\r\nkeep-alive: 5\r\nx-checksum: abc\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("answered (not left hanging)")
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let echo: serde_json::Value =
        serde_json::from_str(&out[out.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["body_len"], 5);
    let trailers = echo["trailers"].as_object().unwrap();
    assert_eq!(
        trailers.keys().collect::<Vec<_>>(),
        vec!["x-checksum"],
        "{echo}"
    );
}

#[tokio::test]
async fn head_over_http2_gets_no_body_from_built_in_responses() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], unused_port()));
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, dead, "");
    let wraith = setup.start(&cfg);
    let h2 = https_client_h2(&ca, None);
    // A `respond` route, and an error built by Wraith (502: nothing listens upstream).
    for (path, status) in [("/hello", 201), ("/app", 502)] {
        let resp = h2.head(wraith.url("https", path)).send().await.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), status, "{path}");
        let body = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        assert!(body.is_empty(), "{path}");
    }
}

#[tokio::test]
async fn http2_requests_keep_to_max_headers_and_their_cookies_reach_http1_as_one() {
    let upstream = Upstream::echo().await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, upstream.addr, "");
    let wraith = setup.start(&cfg);
    let h2 = https_client_h2(&ca, None);
    // More fields than max_headers (100 by default): 431, as over HTTP/1.1.
    let mut req = h2.get(wraith.url("https", "/many"));
    for i in 0..150 {
        req = req.header(format!("x-field-{i}"), "v");
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 431);
    assert_eq!(json(resp).await["error"], "too_many_headers");
    // 120 cookies, each its own field as browsers send them over HTTP/2: one Cookie header
    // to the HTTP/1.1 upstream, and not counted 120 times.
    let mut req = h2.get(wraith.url("https", "/cookies"));
    for i in 0..120 {
        req = req.header("cookie", format!("c{i}={i}"));
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let echo = json(resp).await;
    let cookies = echo["headers"]["cookie"].as_array().unwrap();
    assert_eq!(cookies.len(), 1, "{echo}");
    let expected: Vec<String> = (0..120).map(|i| format!("c{i}={i}")).collect();
    assert_eq!(cookies[0], expected.join("; ").as_str());
}

#[tokio::test]
async fn an_http2_client_that_reads_none_of_a_response_is_cut_off_after_idle_timeout() {
    let upstream = Upstream::start(|_req| async { Response::new(full(vec![b'x'; 4 << 20])) }).await;
    let setup = Setup::new();
    let ca = setup.pki.ca_pem.clone();
    let cfg = config(&setup, upstream.addr, "").replace(
        "protocol = \"https\"\n",
        "protocol = \"https\"\nlimits = { idle_timeout = \"1s\", header_read_timeout = \"1s\" }\n",
    );
    let wraith = setup.start(&cfg);
    let h2 = https_client_h2(&ca, None);
    // The head arrives; the body is never read, so the client's flow-control window stays
    // shut (the client only opens it as its application reads).
    let resp = h2.get(wraith.url("https", "/big")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let body = tokio::time::timeout(Duration::from_secs(10), resp.bytes())
        .await
        .expect("the connection was closed, not left hanging");
    assert!(
        body.is_err(),
        "a response nobody read for idle_timeout was kept going"
    );
}
