//! Wraith's HTTP/1.1 upstream client against a scripted upstream that misbehaves on purpose:
//! connection reuse, stale pooled connections, every response framing, malformed responses,
//! and failover to the next endpoint.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one request head (and a Content-Length body) off `s`; `None` at EOF.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut tmp = [0u8; 8192];
                let n = s.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        let mut tmp = [0u8; 8192];
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// An upstream whose replies are raw bytes chosen by `script(request head)`. After each
/// reply the connection stays open unless the script says to close it.
struct Scripted {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(script: fn(&str) -> (Vec<u8>, bool)) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some((head, _body)) = read_request(&mut s, &mut buf).await {
                        r.fetch_add(1, Ordering::SeqCst);
                        let (reply, close) = script(&head);
                        if s.write_all(&reply).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            connections,
            requests,
        }
    }
}

fn gateway(setup: Setup, endpoints: &[String]) -> Wraith {
    gateway_with_timeout(setup, endpoints, "3s")
}

fn gateway_with_timeout(setup: Setup, endpoints: &[String], response_timeout: &str) -> Wraith {
    gateway_with(
        setup,
        endpoints,
        &format!("response_timeout = \"{response_timeout}\""),
    )
}

/// The gateway in front of `endpoints`, with `settings` (TOML lines) on their upstream.
fn gateway_with(setup: Setup, endpoints: &[String], settings: &str) -> Wraith {
    let list = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        "{}\n[[upstream]]\nname = \"up\"\nendpoints = [{list}]\n{settings}\n\n[[route]]\nname = \"all\"\nupstream = \"up\"\n",
        setup.listeners()
    );
    setup.start(&cfg)
}

/// Passive health that ejects an endpoint after two failures in a row.
const EJECT_AFTER_TWO: &str = "outlier = { consecutive_failures = 2, base_ejection_time = \"1m\", max_ejected_percent = 100 }";

/// An upstream that reads a request head, writes `reply` without reading any of the body,
/// then keeps the connection open for `hold` (none: it closes).
async fn answers_on_the_head(reply: &'static [u8], hold: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut tmp = [0u8; 4096];
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let _ = s.write_all(reply).await;
                tokio::time::sleep(hold).await;
            });
        }
    });
    addr
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    let up = Scripted::start(|_| (ok("pong"), false)).await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let client = http_client();
    for _ in 0..50 {
        let r = client
            .get(wraith.url("http", "/ping"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "pong");
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 50);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "one pooled connection serves them all"
    );
}

#[tokio::test]
async fn a_connection_closed_by_the_upstream_while_pooled_is_retried_for_safe_requests() {
    // Answers as if keep-alive, then hangs up: the pooled connection is dead on next use.
    let up = Scripted::start(|_| (ok("once"), true)).await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let client = http_client();
    for i in 0..20 {
        let r = client
            .get(wraith.url("http", &format!("/n/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "once");
    }
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        20,
        "each request reached the upstream exactly once"
    );
}

#[tokio::test]
async fn a_non_idempotent_request_the_upstream_may_have_seen_is_never_sent_again() {
    // Keep-alive for GET; a POST is read whole and the connection closed without an answer
    // (an upstream that crashed while acting on it).
    let up = Scripted::start(|head| {
        if head.starts_with("POST") {
            (Vec::new(), true)
        } else {
            (ok("fine"), false)
        }
    })
    .await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let client = http_client();
    let r = client
        .get(wraith.url("http", "/warm"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "fine");
    // On the pooled connection: written whole, then EOF. Retrying could transfer twice.
    let r = client
        .post(wraith.url("http", "/transfer?amount=100"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        2,
        "the POST reached the upstream exactly once"
    );
}

#[tokio::test]
async fn every_response_framing_is_relayed() {
    let up = Scripted::start(|head| {
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        match path.as_str() {
            "/until-close" => (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nread until the end".to_vec(), true),
            "/http10" => (b"HTTP/1.0 200 OK\r\n\r\nold school".to_vec(), true),
            "/chunked" => (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\nx-checksum: 42\r\n\r\n".to_vec(),
                false,
            ),
            "/te-and-cl" => (
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
                false,
            ),
            "/no-content" => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
            "/continue" => (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(), false),
            _ if head.starts_with("HEAD") => (b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec(), false),
            _ => (ok("default"), false),
        }
    })
    .await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let client = http_client();
    let get = |p: &'static str| {
        let c = client.clone();
        let url = wraith.url("http", p);
        async move { c.get(url).send().await.unwrap() }
    };
    assert_eq!(
        get("/until-close").await.text().await.unwrap(),
        "read until the end"
    );
    assert_eq!(get("/http10").await.text().await.unwrap(), "old school");
    assert_eq!(get("/chunked").await.text().await.unwrap(), "wikipedia");
    let r = get("/te-and-cl").await;
    assert!(
        r.headers().get("content-length").is_none(),
        "Content-Length dropped when Transfer-Encoding is present"
    );
    assert_eq!(r.text().await.unwrap(), "abc");
    assert_eq!(get("/no-content").await.status(), 204);
    assert_eq!(get("/continue").await.text().await.unwrap(), "ok");
    let r = client
        .head(wraith.url("http", "/head"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-length"], "1000");
    // The connection survived all of that (HEAD had no body to wait for).
    assert_eq!(get("/after").await.text().await.unwrap(), "default");
}

#[tokio::test]
async fn malformed_upstream_responses_are_502_not_panics() {
    let up = Scripted::start(|head| {
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        match path.as_str() {
            "/garbage" => (b"SMTP ready\r\n\r\n".to_vec(), true),
            "/two-lengths" => (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec(),
                true,
            ),
            "/huge-head" => {
                let mut r = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
                r.extend(std::iter::repeat_n(b'a', 70_000));
                r.extend_from_slice(b"\r\n\r\n");
                (r, true)
            }
            "/bad-chunk" => (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                true,
            ),
            "/short" => (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345".to_vec(),
                true,
            ),
            "/silent" => (Vec::new(), true),
            // Gzip applied as a transfer coding: passed on, the client would get the coded
            // bytes as the content, nothing saying so.
            "/gzip-coded" => (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\n\x1f\x8b\x08\r\n0\r\n\r\n"
                    .to_vec(),
                true,
            ),
            _ => (ok("fine"), false),
        }
    })
    .await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let client = http_client();
    for path in [
        "/garbage",
        "/two-lengths",
        "/huge-head",
        "/silent",
        "/gzip-coded",
    ] {
        let r = client.get(wraith.url("http", path)).send().await.unwrap();
        assert_eq!(r.status(), 502, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "upstream_failed", "{path}");
    }
    // Failures inside the body end the client's response abruptly (before or after the
    // head went out): never a response that looks complete.
    for path in ["/bad-chunk", "/short"] {
        match client.get(wraith.url("http", path)).send().await {
            Err(_) => {}
            Ok(r) => assert!(
                r.bytes().await.is_err(),
                "{path}: a truncated body must not look complete"
            ),
        }
    }
    // And the gateway is fine.
    assert_eq!(
        client
            .get(wraith.url("http", "/ok"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "fine"
    );
}

#[tokio::test]
async fn a_refused_connection_fails_over_to_the_next_endpoint() {
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], unused_port()));
    let up = Scripted::start(|_| (ok("alive"), false)).await;
    let wraith = gateway(Setup::new(), &[dead.to_string(), up.addr.to_string()]);
    let client = http_client();
    for _ in 0..10 {
        let r = client
            .post(wraith.url("http", "/x"))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "alive");
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 10);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_failure_after_an_interim_response_is_never_retried() {
    // The upstream answered (100 Continue), then closed: it has acted on the request, so it
    // is not sent again, not even a GET to another endpoint.
    let script = |_: &str| (b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), true);
    let (a, b) = (Scripted::start(script).await, Scripted::start(script).await);
    let wraith = gateway(Setup::new(), &[a.addr.to_string(), b.addr.to_string()]);
    let r = http_client()
        .get(wraith.url("http", "/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let sent = a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst);
    assert_eq!(sent, 1, "the request was sent {sent} times");
}

#[tokio::test]
async fn options_asterisk_reaches_the_upstream_as_sent() {
    // The upstream echoes the request line it got.
    let up = Scripted::start(|head| (ok(head.lines().next().unwrap_or("")), false)).await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let text = raw_exchange(
        wraith.addr("http"),
        b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.ends_with("\r\n\r\nOPTIONS * HTTP/1.1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_the_client_while_its_upload_is_still_going() {
    // The upstream reads the head, answers 413 at once and reads nothing more; the client is
    // still uploading 64 MiB. The answer must not wait for the upload or the response
    // timeout (20 s here).
    let addr = answers_on_the_head(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large",
        Duration::from_secs(30),
    )
    .await;
    let wraith = gateway_with_timeout(Setup::new(), &[addr.to_string()], "20s");
    const SIZE: usize = 64 << 20;
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(wraith.addr("http")).await.unwrap();
    s.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {SIZE}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..SIZE / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Kept open: the client is still "uploading" as far as anyone can tell.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("too large") {
        match tokio::time::timeout(Duration::from_secs(25), rd.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&tmp[..n]),
            other => panic!("no answer: {other:?}, {}", String::from_utf8_lossy(&got)),
        }
    }
    let waited = started.elapsed();
    upload.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        waited < Duration::from_secs(10),
        "the 413 took {waited:?} (response_timeout is 20 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_success_from_an_upstream_that_closes_reaches_the_client() {
    // The upstream answers 200 on the head and closes without reading the body (as Go's
    // server does for a large unread body): the write then fails, and the answer already
    // read must still be the client's response, not a 502.
    let addr = answers_on_the_head(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
        Duration::ZERO,
    )
    .await;
    let wraith = gateway_with_timeout(Setup::new(), &[addr.to_string()], "20s");
    const SIZE: usize = 8 << 20;
    let s = TcpStream::connect(wraith.addr("http")).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let upload = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {SIZE}\r\n\r\n");
        if wr.write_all(head.as_bytes()).await.is_err()
            || wr.write_all(&[b'x'; 1000]).await.is_err()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..SIZE / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), rd.read_to_end(&mut got)).await;
    upload.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off_after_the_response_timeout() {
    // 10 of 100 promised bytes, then silence with the connection open.
    let up = Scripted::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789".to_vec(),
            false,
        )
    })
    .await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let r = http_client()
        .get(wraith.url("http", "/slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // response_timeout is 3s: the body ends in error well before the test's own limit.
    let body = tokio::time::timeout(Duration::from_secs(15), r.bytes())
        .await
        .expect("the gateway gave up on the stalled body");
    assert!(body.is_err(), "a cut-off body must not look complete");
}

#[tokio::test]
async fn bytes_an_upstream_sends_unasked_on_a_pooled_connection_never_become_a_response() {
    // Answers each request, then, a moment later, writes a second response nobody asked for.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_request(&mut s, &mut buf).await.is_some() {
                    if s.write_all(&ok("ok")).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nbogus!")
                        .await;
                }
            });
        }
    });
    let wraith = gateway(Setup::new(), &[addr.to_string()]);
    let client = http_client();
    for i in 0..5 {
        let r = client
            .get(wraith.url("http", &format!("/n/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "ok", "request {i}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_after_a_bodyless_response_never_becomes_another_clients_response() {
    // An application that writes a body to a HEAD, after a head announcing it (as the GET's
    // would): on a reused connection those bytes would be read as the next request's
    // response, which may be another client's. (After a head that announces no body, a 204
    // without framing headers, bytes that come later still cannot be told from the next
    // response by any HTTP/1.1 client; the gateway peeks before reusing such a connection,
    // which narrows that window but cannot close it.)
    const STRAY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, _)) = read_request(&mut s, &mut buf).await {
                    let target = head.split(' ').nth(1).unwrap_or("").to_string();
                    let first: &[u8] = if head.starts_with("HEAD ") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 38\r\n\r\n"
                    } else if target == "/nothing" {
                        b"HTTP/1.1 204 No Content\r\ncontent-length: 4\r\n\r\n"
                    } else {
                        if s.write_all(&ok(&target)).await.is_err() {
                            return;
                        }
                        continue;
                    };
                    // Head, then the body in a segment of its own.
                    if s.write_all(first).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    if s.write_all(STRAY).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let wraith = gateway(Setup::new(), &[addr.to_string()]);
    let mut tasks = Vec::new();
    for c in 0..10 {
        let url = |p: &str| wraith.url("http", p);
        let (bodyless, victim) = (url("/late"), url(&format!("/victim/{c}")));
        let nothing = url("/nothing");
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut wrong = Vec::new();
            for i in 0..16 {
                match c {
                    0 => {
                        let r = client.head(&bodyless).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                    }
                    1 => {
                        let r = client.get(&nothing).send().await.unwrap();
                        assert_eq!(r.status(), 204);
                    }
                    _ => {
                        let r = client.get(&victim).send().await.unwrap();
                        let body = r.text().await.unwrap_or_default();
                        if !body.starts_with("/victim/") {
                            wrong.push(format!("request {i}: {body:?}"));
                        }
                    }
                }
            }
            wrong
        }));
    }
    let mut wrong = Vec::new();
    for t in tasks {
        wrong.extend(t.await.unwrap());
    }
    assert!(
        wrong.is_empty(),
        "another response's bytes served: {wrong:?}"
    );
}

/// The response timeout of a request on a reused connection counts from that request, not
/// from the one before it (each pooled connection keeps one timer, moved lazily to the
/// newest deadline: it must never fire at an older one).
#[tokio::test]
async fn the_response_timeout_counts_from_each_request_on_a_reused_connection() {
    // `/hang` gets no answer at all; everything else a prompt one.
    let up = Scripted::start(|head| {
        if head.starts_with("GET /hang ") {
            (Vec::new(), false)
        } else {
            (ok("pong"), false)
        }
    })
    .await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let client = http_client();
    let r = client
        .get(wraith.url("http", "/fast"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "pong");
    // The first request's deadline (3 s after it) falls 2 s into the next one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = std::time::Instant::now();
    let r = client
        .get(wraith.url("http", "/hang"))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(r.status(), 504);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "the second request went over the pooled connection"
    );
    assert!(
        waited >= Duration::from_millis(2900),
        "timed out after {waited:?}: at the earlier request's deadline, not 3 s after this one"
    );
}

/// Damaged responses (from a fixed seed), one per path: what the upstream sends at `/case/N`.
fn damaged_responses() -> &'static [Vec<u8>] {
    static CASES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    CASES.get_or_init(|| {
        let seeds: [&[u8]; 7] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nuntil the close",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 302 Found\r\nlocation: /x\r\nconnection: close, x-hop\r\nx-hop: 1\r\ncontent-length: 0\r\n\r\n",
        ];
        damaged(&seeds, 300, 0x9e37_79b9_7f4a_7c15)
    })
}

/// A hostile upstream: 300 damaged responses (`damaged`: bytes flipped, inserted, cut; a line
/// doubled; the end cut off), each followed by the upstream's close. Every request gets an answer (relayed, or 502) or
/// a cut-off body within the response timeout; nothing panics; the gateway serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_upstream_responses_never_hang_or_panic_the_gateway() {
    let up = Scripted::start(|head| {
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        match path
            .strip_prefix("/case/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => (damaged_responses()[n].clone(), true),
            None => (ok("fine"), false),
        }
    })
    .await;
    let wraith = gateway(Setup::new(), &[up.addr.to_string()]);
    let client = http_client();
    let failures: Vec<String> = futures_util::stream::iter(0..damaged_responses().len())
        .map(|n| {
            let (client, url) = (client.clone(), wraith.url("http", &format!("/case/{n}")));
            async move {
                let exchange = async {
                    if let Ok(r) = client.get(url).send().await {
                        let _ = r.bytes().await;
                    }
                };
                // The response timeout (3 s) bounds every wait: longer is a hang. Errors
                // (502, a cut-off body) are what damaged responses should get.
                match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                    Ok(()) => None,
                    Err(_) => Some(format!(
                        "{:?}: no answer within 10 s",
                        String::from_utf8_lossy(&damaged_responses()[n])
                    )),
                }
            }
        })
        .buffer_unordered(32)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every case reached the upstream (some twice: a GET whose connection broke before any
    // response byte is retried).
    assert!(up.requests.load(Ordering::SeqCst) >= damaged_responses().len());
    assert!(!wraith.log().contains("panicked"), "{}", wraith.log());
    let r = client.get(wraith.url("http", "/ok")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "fine");
}

/// A pooled connection the upstream closes as it is reused (its keep-alive timeout running
/// out as the next request comes) is tried again on a fresh one for a PUT with a small body
/// too, also with a single endpoint: only bodyless requests were, and the PUT got 502.
#[tokio::test]
async fn a_put_with_a_body_on_a_connection_closed_as_it_is_reused_is_sent_again() {
    // Answers the first request of each connection (keep-alive), hangs up on the second.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some((_, body)) = read_request(&mut s, &mut buf).await else {
                    return;
                };
                seen.lock().unwrap().push(body);
                let _ = s.write_all(&ok("stored")).await;
                let _ = read_request(&mut s, &mut buf).await;
            });
        }
    });
    let wraith = gateway(Setup::new(), &[addr.to_string()]);
    let client = http_client();
    for i in 0..5 {
        let r = client
            .put(wraith.url("http", &format!("/doc/{i}")))
            .body(format!("document {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "PUT {i}");
    }
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 5, "each PUT stored once");
    for (i, b) in bodies.iter().enumerate() {
        assert_eq!(b, format!("document {i}").as_bytes());
    }
}

#[tokio::test]
async fn a_response_delimited_by_the_close_counts_as_a_success_for_passive_health() {
    // An endpoint that fails every other request (a 500) and answers the others whole, with
    // a body that ends at the close (no Content-Length: HTTP/1.0-style servers, CGI). Each
    // whole answer breaks the run of failures: two failures in a row eject the endpoint,
    // two failures apart never do.
    let up = Scripted::start(|head| {
        if head.starts_with("GET /fail") {
            (
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nfail".to_vec(),
                false,
            )
        } else {
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nwhole".to_vec(),
                true,
            )
        }
    })
    .await;
    let wraith = gateway_with(Setup::new(), &[up.addr.to_string()], EJECT_AFTER_TWO);
    let client = http_client();
    for round in 0..3 {
        let r = client
            .get(wraith.url("http", "/fail"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500, "round {round}");
        let r = client
            .get(wraith.url("http", "/whole"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "round {round}");
        assert_eq!(r.text().await.unwrap(), "whole", "round {round}");
    }
    let endpoint = wraith.endpoint_status("up", &up.addr.to_string()).await;
    assert_ne!(endpoint["health"], "ejected", "{endpoint}");
}

#[tokio::test]
async fn a_switch_of_protocols_nobody_asked_for_counts_as_a_failure_for_passive_health() {
    // An endpoint that answers plain GETs with `101` to h2c: each is a 502 for the client,
    // and a broken response of the endpoint's, so two in a row eject it.
    let up = Scripted::start(|_| {
        (
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
                .to_vec(),
            true,
        )
    })
    .await;
    let wraith = gateway_with(Setup::new(), &[up.addr.to_string()], EJECT_AFTER_TWO);
    let client = http_client();
    for i in 0..2 {
        let r = client.get(wraith.url("http", "/x")).send().await.unwrap();
        assert_eq!(r.status(), 502, "request {i}");
    }
    let endpoint = wraith.endpoint_status("up", &up.addr.to_string()).await;
    assert_eq!(endpoint["health"], "ejected", "{endpoint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_the_upload_and_never_answers_is_a_timeout() {
    // The upstream reads the head and then nothing, and never answers: past the response
    // timeout (1 s) the client gets 504 `upstream_timeout`, as for any upstream that does
    // not answer in time (nginx's `proxy_send_timeout` gives 504 too), not a 502 that says
    // the upstream answered wrongly.
    let addr = answers_on_the_head(b"", Duration::from_secs(30)).await;
    let wraith = gateway_with_timeout(Setup::new(), &[addr.to_string()], "1s");
    const SIZE: usize = 64 << 20;
    let s = TcpStream::connect(wraith.addr("http")).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let upload = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {SIZE}\r\n\r\n");
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..SIZE / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(15), rd.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&tmp[..n]),
            other => panic!("no answer: {other:?}, {}", String::from_utf8_lossy(&got)),
        }
    }
    upload.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_a_watched_upload_is_the_upstreams_timeout_not_the_clients()
{
    // The same with a body the gateway counts on its way (chunked, under a route's
    // `max_request_body`), sent in small pieces as they come: when the upstream stops
    // reading, the gateway's last ask for the client's next piece may still be pending, yet
    // the stall is the upstream's, which the HTTP/1.1 client says itself: 504, not 408.
    let addr = answers_on_the_head(b"", Duration::from_secs(30)).await;
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[upstream]]\nname = \"up\"\nendpoints = [\"{addr}\"]\nresponse_timeout = \"1s\"\n\n\
         [[route]]\nname = \"all\"\nupstream = \"up\"\nmax_request_body = \"1GiB\"\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let s = TcpStream::connect(wraith.addr("http")).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let upload = tokio::spawn(async move {
        let head = "POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n";
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let mut chunk = b"1000\r\n".to_vec();
        chunk.resize(chunk.len() + 0x1000, b'x');
        chunk.extend_from_slice(b"\r\n");
        loop {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    });
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(30), rd.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&tmp[..n]),
            other => panic!("no answer: {other:?}, {}", String::from_utf8_lossy(&got)),
        }
    }
    upload.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
}
