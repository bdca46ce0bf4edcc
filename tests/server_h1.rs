//! The client-facing HTTP/1.1 server, byte by byte: raw requests written to a TCP socket,
//! raw responses parsed off it. Keep-alive and pipelining, `Connection: close` and HTTP/1.0,
//! HEAD, request-smuggling defences (ambiguous framing is answered 400 and the connection
//! closed, and nothing smuggled ever reaches the upstream), head limits, `Expect:
//! 100-continue`, chunked bodies both ways, and bodies the gateway never reads.
//!
//! Every read has a deadline (`READ_TIMEOUT`): a server that hangs fails the test, it never
//! hangs it.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// How long any single read waits for bytes before the test fails.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection the server is done with may take to end (FIN or reset) once the
/// last response is read. A lingering close half-closes first, so the end is seen at once;
/// this bound is generous, and well under the idle and header timeouts (`LIMITS`), so a
/// close seen within it is never a timeout's.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// What `/static` answers (with a Content-Length).
const STATIC_BODY: &[u8] = b"static body\n";

/// What `/fixed` (a built-in `respond` route) answers.
const FIXED_BODY: &[u8] = b"0123456789";

/// What `/stream` answers, one chunk at a time, with no Content-Length.
const STREAM_CHUNKS: [&str; 6] = [
    "first chunk;",
    "second, a bit longer chunk;",
    "3;",
    "fourth\r\nwith a CRLF inside;",
    "0\r\n\r\n (not the end);",
    "last.",
];

type R<T> = Result<T, String>;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// The upstream: records every request that reaches it

/// Every request the upstream saw: counted on arrival of the head, bodies after they end.
#[derive(Default)]
struct Recorder {
    requests: AtomicUsize,
    /// `METHOD uri`, in arrival order.
    heads: Mutex<Vec<String>>,
    /// `(uri, body)` of every request whose body ended cleanly.
    bodies: Mutex<Vec<(String, Vec<u8>)>>,
    body_errors: AtomicUsize,
}

impl Recorder {
    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn heads_since(&self, n: usize) -> Vec<String> {
        self.heads().into_iter().skip(n).collect()
    }

    /// Whether any request target the upstream saw contains `needle`.
    fn saw(&self, needle: &str) -> bool {
        self.heads().iter().any(|h| h.contains(needle))
    }

    fn bodies_len(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    /// The `(uri, body)` pairs recorded after the first `n`.
    fn bodies_since(&self, n: usize) -> Vec<(String, Vec<u8>)> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .skip(n)
            .cloned()
            .collect()
    }

    fn body_of(&self, uri: &str) -> Option<Vec<u8>> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .find(|(u, _)| u == uri)
            .map(|(_, b)| b.clone())
    }
}

/// The upstream: `/stream*` answers `STREAM_CHUNKS` of unknown length, `/static*` answers
/// `STATIC_BODY`, anything else a JSON echo (method, uri, version, body_len, body).
async fn recording_upstream() -> (Upstream, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let r = rec.clone();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let rec = r.clone();
        async move { answer(req, &rec).await }
    })
    .await;
    (upstream, rec)
}

async fn answer(req: Request<Incoming>, rec: &Recorder) -> Response<TestBody> {
    rec.requests.fetch_add(1, Ordering::SeqCst);
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let path = req.uri().path().to_string();
    let version = format!("{:?}", req.version());
    rec.heads.lock().unwrap().push(format!("{method} {uri}"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => {
            rec.body_errors.fetch_add(1, Ordering::SeqCst);
            return Response::builder()
                .status(500)
                .body(full("request body failed at the upstream"))
                .unwrap();
        }
    };
    rec.bodies.lock().unwrap().push((uri.clone(), body.clone()));
    if path.starts_with("/stream") {
        let frames = futures_util::stream::iter(STREAM_CHUNKS).then(|c| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(c)))
        });
        return Response::builder()
            .header("content-type", "text/plain")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .unwrap();
    }
    if path.starts_with("/slow") {
        // Four chunks half a second apart: longer than the timeouts test's limits.
        let frames = futures_util::stream::iter(0..4).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(format!(
                "slow {i};"
            ))))
        });
        return Response::builder()
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .unwrap();
    }
    if path.starts_with("/big") {
        // 64 MiB: more than the sockets on the way can hold.
        let frames = futures_util::stream::iter(0..64).map(|_| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(vec![
                b'x';
                1 << 20
            ])))
        });
        return Response::builder()
            .header("content-length", (64u64 << 20).to_string())
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .unwrap();
    }
    if path.starts_with("/static") {
        return Response::builder()
            .header("content-type", "text/plain")
            .body(full(STATIC_BODY))
            .unwrap();
    }
    let json = serde_json::json!({
        "method": method,
        "uri": uri,
        "version": version,
        "body_len": body.len(),
        "body": lossy(&body),
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(full(serde_json::to_vec(&json).unwrap()))
        .unwrap()
}

fn stream_body() -> Vec<u8> {
    STREAM_CHUNKS.concat().into_bytes()
}

// ---------------------------------------------------------------------------------------------
// The gateway

/// Limits on the plain listener: default timeouts (spelled out: a close seen within
/// `READ_TIMEOUT` is never a timeout's), a head of at most 8 KiB and 20 header lines.
const LIMITS: &str = r#"limits = { header_read_timeout = "10s", idle_timeout = "60s", max_header_size = "8KiB", max_headers = 20 }"#;

fn config(setup: &Setup, upstream: SocketAddr) -> String {
    let listeners = setup.listeners().replacen(
        "protocol = \"http\"\n",
        &format!("protocol = \"http\"\n{LIMITS}\n"),
        1,
    );
    format!(
        r#"{listeners}
[[upstream]]
name = "app"
endpoints = ["{upstream}"]
connect_timeout = "2s"
response_timeout = "3s"

[[route]]
name = "deny"
path = {{ prefix = "/deny" }}
respond = {{ status = 403, body = "denied\n" }}

[[route]]
name = "fixed"
path = {{ exact = "/fixed" }}
respond = {{ status = 200, body = "0123456789" }}

[[route]]
name = "app"
path = {{ prefix = "/" }}
upstream = "app"
"#
    )
}

/// The gateway in front of a recording upstream; the address of its plain listener.
async fn gateway() -> (Wraith, SocketAddr, Arc<Recorder>, Upstream) {
    let (upstream, rec) = recording_upstream().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr);
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("http");
    (wraith, addr, rec, upstream)
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client

/// One parsed response.
#[derive(Debug)]
struct Resp {
    /// `HTTP/1.1` or `HTTP/1.0`.
    version: String,
    status: u16,
    /// Lowercased names, values trimmed, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body ran to the end of the connection (no Content-Length, not chunked).
    close_delimited: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether the comma-separated header `name` holds `token` (case-insensitive).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.summary()))
    }

    /// Status line, headers and (the start of) the body, for failure messages.
    fn summary(&self) -> String {
        let mut s = format!("{} {}", self.version, self.status);
        for (n, v) in &self.headers {
            s.push_str(&format!("\n  {n}: {v}"));
        }
        let body = lossy(&self.body[..self.body.len().min(300)]);
        s.push_str(&format!("\n  body ({} bytes): {body:?}", self.body.len()));
        s
    }
}

/// A raw connection to the gateway.
struct Conn {
    r: OwnedReadHalf,
    w: Option<OwnedWriteHalf>,
    /// Read but not yet parsed.
    buf: Vec<u8>,
    /// The read side ended with a reset rather than a FIN.
    reset: bool,
    /// How long `fill` waits for bytes.
    read_timeout: Duration,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let s = tokio::time::timeout(READ_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Conn {
            r,
            w: Some(w),
            buf: Vec::new(),
            reset: false,
            read_timeout: READ_TIMEOUT,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let w = self.w.as_mut().expect("write side handed off");
        tokio::time::timeout(READ_TIMEOUT, w.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// Writes `bytes` from another task, ignoring errors: for bodies the server may stop
    /// reading (and close on) before they are all written.
    fn send_in_background(&mut self, bytes: Vec<u8>) -> tokio::task::JoinHandle<()> {
        let mut w = self.w.take().expect("write side handed off");
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), w.write_all(&bytes)).await;
            // Keep the write side open (no FIN) until the test is done with the connection.
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(w);
        })
    }

    /// Reads more bytes into `buf`: `Ok(0)` when the connection ended (FIN or reset), an
    /// error when nothing came within `read_timeout`.
    async fn fill(&mut self) -> R<usize> {
        let mut tmp = [0u8; 16 * 1024];
        match tokio::time::timeout(self.read_timeout, self.r.read(&mut tmp)).await {
            Err(_) => Err(format!(
                "nothing more within {:?} (unparsed: {:?})",
                self.read_timeout,
                lossy(&self.buf)
            )),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                self.reset = true;
                Ok(0)
            }
            Ok(Err(e)) => Err(format!("read: {e}")),
        }
    }

    async fn line(&mut self) -> R<String> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let line = lossy(&self.buf[..p]);
                self.buf.drain(..p + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(format!(
                    "connection ended inside a line: {:?}",
                    lossy(&self.buf)
                ));
            }
        }
    }

    async fn exactly(&mut self, n: usize) -> R<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(format!(
                    "connection ended after {} of {n} body bytes",
                    self.buf.len()
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The next response; `None` when the connection ended before its first byte.
    /// `head_only`: the response to a HEAD (no body, whatever the headers say).
    async fn next(&mut self, head_only: bool) -> R<Option<Resp>> {
        let end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p;
            }
            if self.buf.len() > 1 << 20 {
                return Err("a response head over 1 MiB".into());
            }
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(format!(
                    "connection ended inside a response head: {:?}",
                    lossy(&self.buf)
                ));
            }
        };
        let head = lossy(&self.buf[..end]);
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        // Anything before the status line (a leaked body, say) fails here.
        if !status_line.starts_with("HTTP/1.") {
            return Err(format!(
                "not a status line: {status_line:?} (head {head:?})"
            ));
        }
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status = parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut headers = Vec::new();
        for l in lines {
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| format!("bad header line {l:?}"))?;
            headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut resp = Resp {
            version,
            status,
            headers,
            body: Vec::new(),
            close_delimited: false,
        };
        if head_only || (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(Some(resp));
        }
        if resp.header("transfer-encoding").is_some() {
            if !resp.has_token("transfer-encoding", "chunked") {
                return Err(format!("unreadable framing: {}", resp.summary()));
            }
            loop {
                let size_line = self.line().await?;
                let hex = size_line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(hex, 16)
                    .map_err(|_| format!("bad chunk size line {size_line:?}"))?;
                if size == 0 {
                    // Trailer section, up to the empty line.
                    while !self.line().await?.is_empty() {}
                    break;
                }
                let data = self.exactly(size + 2).await?;
                if &data[size..] != b"\r\n" {
                    return Err(format!(
                        "chunk data not followed by CRLF: {:?}",
                        lossy(&data)
                    ));
                }
                resp.body.extend_from_slice(&data[..size]);
            }
        } else if let Some(cl) = resp.header("content-length") {
            let n = cl
                .parse::<usize>()
                .map_err(|_| format!("bad content-length {cl:?}"))?;
            resp.body = self.exactly(n).await?;
        } else {
            while self.fill().await? != 0 {}
            resp.body = std::mem::take(&mut self.buf);
            resp.close_delimited = true;
        }
        Ok(Some(resp))
    }

    /// The next response, which must be there.
    async fn response(&mut self) -> Resp {
        match self.next(false).await {
            Ok(Some(r)) => r,
            Ok(None) => panic!("the connection ended without a response"),
            Err(e) => panic!("no response: {e}"),
        }
    }

    async fn head_response(&mut self) -> Resp {
        match self.next(true).await {
            Ok(Some(r)) => r,
            Ok(None) => panic!("the connection ended without a response"),
            Err(e) => panic!("no response: {e}"),
        }
    }

    /// `Ok` when the server ends the connection (FIN or reset) within `CLOSE_TIMEOUT` and
    /// sends nothing more before that.
    async fn closed(&mut self) -> R<()> {
        if !self.buf.is_empty() {
            return Err(format!(
                "bytes after the last response: {:?}",
                lossy(&self.buf)
            ));
        }
        let normal = std::mem::replace(&mut self.read_timeout, CLOSE_TIMEOUT);
        let filled = self.fill().await;
        self.read_timeout = normal;
        match filled {
            Ok(0) => {
                if self.reset {
                    eprintln!("(the connection ended with a reset, not a FIN)");
                }
                Ok(())
            }
            Ok(_) => Err(format!(
                "more bytes instead of a close: {:?}",
                lossy(&self.buf)
            )),
            Err(e) => Err(format!("the connection stayed open: {e}")),
        }
    }

    async fn assert_closed(&mut self, what: &str) {
        if let Err(e) = self.closed().await {
            panic!("{what}: {e}");
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
}

/// Fails with every case that failed, each with what was seen.
fn all_passed(results: Vec<(&str, R<()>)>) {
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|e| format!("- {name}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Sends `raw` on a new connection: it must be answered 400, then the connection closed,
/// and the upstream must see no request at all.
async fn refused_400(addr: SocketAddr, rec: &Recorder, raw: &[u8]) -> R<()> {
    let before = rec.count();
    let mut c = Conn::open(addr).await;
    c.send(raw).await;
    let resp = c
        .next(false)
        .await?
        .ok_or("the connection was closed without a response")?;
    let mut problems = Vec::new();
    if resp.status != 400 {
        problems.push(format!("answered {} (not 400)", resp.summary()));
    }
    if let Err(e) = c.closed().await {
        problems.push(format!("after the {}: {e}", resp.status));
    }
    // A request the gateway forwarded has reached the upstream before its answer came back;
    // one smuggled behind it would have come by now too.
    tokio::time::sleep(Duration::from_millis(100)).await;
    if rec.count() != before {
        problems.push(format!("the upstream saw {:?}", rec.heads_since(before)));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// 1. Keep-alive

/// Two requests on one connection get two responses, each with a Date and, as the length is
/// known, a Content-Length.
#[tokio::test]
async fn keep_alive_serves_two_requests_on_one_connection() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    for path in ["/one", "/two"] {
        c.send(get(path).as_bytes()).await;
        let resp = c.response().await;
        assert_eq!(resp.status, 200, "{}", resp.summary());
        assert_eq!(resp.version, "HTTP/1.1", "{}", resp.summary());
        assert_eq!(resp.json()["uri"], path, "{}", resp.summary());
        let date = resp
            .header("date")
            .unwrap_or_else(|| panic!("no date: {}", resp.summary()));
        assert!(date.ends_with(" GMT"), "date {date:?}");
        assert_eq!(
            resp.header("content-length"),
            Some(resp.body.len().to_string().as_str()),
            "{}",
            resp.summary()
        );
        assert!(!resp.has_token("connection", "close"), "{}", resp.summary());
    }
    // A built-in response too: Date, Content-Length, and the connection still usable.
    c.send(get("/fixed").as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.body, FIXED_BODY);
    assert!(resp.header("date").is_some(), "{}", resp.summary());
    assert_eq!(
        resp.header("content-length"),
        Some("10"),
        "{}",
        resp.summary()
    );
    c.send(get("/three").as_bytes()).await;
    assert_eq!(c.response().await.json()["uri"], "/three");
    assert_eq!(rec.heads(), ["GET /one", "GET /two", "GET /three"]);
}

// ---------------------------------------------------------------------------------------------
// 2. Pipelining

/// Three requests written in one write (one with a body) get three responses, in order.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    let pipeline = format!(
        "{}POST /p2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello{}",
        get("/p1"),
        get("/p3")
    );
    c.send(pipeline.as_bytes()).await;
    for (path, body) in [("/p1", ""), ("/p2", "hello"), ("/p3", "")] {
        let resp = c.response().await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.summary());
        let echo = resp.json();
        assert_eq!(echo["uri"], path, "{}", resp.summary());
        assert_eq!(echo["body"], body, "{}", resp.summary());
    }
    assert_eq!(rec.heads(), ["GET /p1", "POST /p2", "GET /p3"]);
}

// ---------------------------------------------------------------------------------------------
// 3. Connection: close

/// `Connection: close` on HTTP/1.1: the response says so and the socket is closed after it.
#[tokio::test]
async fn connection_close_is_honoured() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"GET /bye HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["uri"], "/bye");
    assert!(
        resp.has_token("connection", "close"),
        "no connection: close: {}",
        resp.summary()
    );
    c.assert_closed("after a Connection: close exchange").await;
    // The same for a built-in response.
    let mut c = Conn::open(addr).await;
    c.send(b"GET /fixed HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.body, FIXED_BODY, "{}", resp.summary());
    assert!(resp.has_token("connection", "close"), "{}", resp.summary());
    c.assert_closed("after a built-in response to Connection: close")
        .await;
    assert_eq!(rec.count(), 1);
}

// ---------------------------------------------------------------------------------------------
// 4. HTTP/1.0

/// HTTP/1.0 without keep-alive: closed after the response. With `Connection: keep-alive`:
/// the response says keep-alive and the connection serves another request. No HTTP/1.0
/// response carries Transfer-Encoding (RFC 9112 §6.1), even when its length is unknown.
#[tokio::test]
async fn http10_closes_unless_keep_alive_and_is_never_chunked() {
    let (_w, addr, rec, _up) = gateway().await;
    let no_te = |r: &Resp| {
        assert!(
            r.header("transfer-encoding").is_none(),
            "Transfer-Encoding in a response to HTTP/1.0: {}",
            r.summary()
        );
    };

    // Plain HTTP/1.0: one exchange, then close.
    let mut c = Conn::open(addr).await;
    c.send(b"GET /ten HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["uri"], "/ten");
    no_te(&resp);
    assert!(
        !resp.has_token("connection", "keep-alive"),
        "{}",
        resp.summary()
    );
    c.assert_closed("HTTP/1.0 without keep-alive").await;

    // HTTP/1.0 keep-alive: two exchanges on one connection, then one without: closed.
    let mut c = Conn::open(addr).await;
    for path in ["/ka1", "/ka2"] {
        c.send(
            format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let resp = c.response().await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.summary());
        assert_eq!(resp.json()["uri"], path);
        no_te(&resp);
        assert!(
            resp.has_token("connection", "keep-alive"),
            "{path}: no connection: keep-alive: {}",
            resp.summary()
        );
        assert!(
            resp.header("content-length").is_some(),
            "{path}: {}",
            resp.summary()
        );
    }
    c.send(b"GET /ka3 HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.json()["uri"], "/ka3");
    c.assert_closed("the third (non keep-alive) HTTP/1.0 request")
        .await;

    // A body of unknown length to HTTP/1.0, with and without keep-alive: never chunked;
    // delimited by the close (or, if the gateway buffered it, by a Content-Length).
    for ka in ["", "Connection: keep-alive\r\n"] {
        let mut c = Conn::open(addr).await;
        c.send(format!("GET /stream HTTP/1.0\r\nHost: localhost\r\n{ka}\r\n").as_bytes())
            .await;
        let resp = c.response().await;
        assert_eq!(resp.status, 200, "{ka:?}: {}", resp.summary());
        no_te(&resp);
        assert_eq!(lossy(&resp.body), lossy(&stream_body()), "{ka:?}");
        if resp.close_delimited {
            assert!(
                !resp.has_token("connection", "keep-alive"),
                "{ka:?}: a close-delimited body announced as keep-alive (RFC 9112 §9.3: the \
                 connection would persist after this response): {}",
                resp.summary()
            );
        }
    }
    assert_eq!(rec.count(), 6);
}

// ---------------------------------------------------------------------------------------------
// 5. HEAD

/// HEAD: the headers of the GET (its Content-Length), no body bytes; the next request on
/// the connection parses (a leaked body would sit in front of its status line).
#[tokio::test]
async fn head_gets_headers_without_a_body() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;

    // Proxied: GET for the reference, then HEAD, then GET again.
    c.send(get("/static").as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.body, STATIC_BODY, "{}", resp.summary());
    let get_len = resp.header("content-length").map(str::to_string);
    assert_eq!(get_len.as_deref(), Some("12"), "{}", resp.summary());
    c.send(b"HEAD /static HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let resp = c.head_response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(
        resp.header("content-length").map(str::to_string),
        get_len,
        "HEAD: {}",
        resp.summary()
    );
    c.send(get("/static").as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.body, STATIC_BODY, "{}", resp.summary());

    // Built-in, pipelined: HEAD and GET in one write.
    c.send(
        format!(
            "HEAD /fixed HTTP/1.1\r\nHost: localhost\r\n\r\n{}",
            get("/fixed")
        )
        .as_bytes(),
    )
    .await;
    let resp = c.head_response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(
        resp.header("content-length"),
        Some("10"),
        "{}",
        resp.summary()
    );
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.body, FIXED_BODY, "{}", resp.summary());

    // And the connection is still in step.
    c.send(get("/after-head").as_bytes()).await;
    assert_eq!(c.response().await.json()["uri"], "/after-head");
    assert_eq!(
        rec.heads(),
        [
            "GET /static",
            "HEAD /static",
            "GET /static",
            "GET /after-head"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Request smuggling

/// Transfer-Encoding and Content-Length together (either order): 400, close, nothing
/// forwarded.
#[tokio::test]
async fn transfer_encoding_with_content_length_is_400() {
    let (_w, addr, rec, _up) = gateway().await;
    let te_then_cl = format!(
        "POST /s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    let cl_then_te = format!(
        "POST /s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    all_passed(vec![
        (
            "TE then CL",
            refused_400(addr, &rec, te_then_cl.as_bytes()).await,
        ),
        (
            "CL then TE",
            refused_400(addr, &rec, cl_then_te.as_bytes()).await,
        ),
    ]);
    assert!(!rec.saw("/smuggled"), "{:?}", rec.heads());
}

/// Two different Content-Length values (two fields, or a list in one): 400.
#[tokio::test]
async fn conflicting_content_lengths_are_400() {
    let (_w, addr, rec, _up) = gateway().await;
    let two = format!(
        "POST /s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello{SMUGGLED}"
    );
    let list = format!(
        "POST /s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 6\r\n\r\nhello{SMUGGLED}"
    );
    all_passed(vec![
        (
            "Content-Length 5 and 6",
            refused_400(addr, &rec, two.as_bytes()).await,
        ),
        (
            "Content-Length: 5, 6",
            refused_400(addr, &rec, list.as_bytes()).await,
        ),
    ]);
    assert!(!rec.saw("/smuggled"), "{:?}", rec.heads());
}

/// Content-Length that is not plain decimal digits: 400.
#[tokio::test]
async fn malformed_content_length_is_400() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut results = Vec::new();
    for (name, value) in [("+5", "+5"), ("0x5", "0x5"), ("'5 5'", " 5 5")] {
        let raw = format!(
            "POST /s HTTP/1.1\r\nHost: localhost\r\nContent-Length: {value}\r\n\r\nhello{SMUGGLED}"
        );
        results.push((name, refused_400(addr, &rec, raw.as_bytes()).await));
    }
    all_passed(results);
    assert!(!rec.saw("/smuggled"), "{:?}", rec.heads());
}

/// A request Transfer-Encoding whose final coding is not chunked (RFC 9112 §6.3: 400 and
/// close), and any Transfer-Encoding on HTTP/1.0 (§6.1: faulty framing): 400.
#[tokio::test]
async fn transfer_encoding_not_ending_in_chunked_or_on_http10_is_400() {
    let (_w, addr, rec, _up) = gateway().await;
    let gzip = format!(
        "POST /s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
    );
    let chunked_gzip = format!(
        "POST /s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
    );
    let http10 = format!(
        "POST /s HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
    );
    all_passed(vec![
        (
            "Transfer-Encoding: gzip",
            refused_400(addr, &rec, gzip.as_bytes()).await,
        ),
        (
            "Transfer-Encoding: chunked, gzip",
            refused_400(addr, &rec, chunked_gzip.as_bytes()).await,
        ),
        (
            "Transfer-Encoding: chunked on HTTP/1.0",
            refused_400(addr, &rec, http10.as_bytes()).await,
        ),
    ]);
    assert!(!rec.saw("/smuggled"), "{:?}", rec.heads());
}

/// obs-fold (a line starting with whitespace continues the previous field): 400.
#[tokio::test]
async fn obs_fold_is_400() {
    let (_w, addr, rec, _up) = gateway().await;
    let plain = "GET /fold HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\n\r\n".to_string();
    let tab = "GET /fold HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n\tb\r\n\r\n".to_string();
    let folded_te = format!(
        "POST /fold HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    all_passed(vec![
        (
            "space fold",
            refused_400(addr, &rec, plain.as_bytes()).await,
        ),
        ("tab fold", refused_400(addr, &rec, tab.as_bytes()).await),
        (
            "folded Transfer-Encoding",
            refused_400(addr, &rec, folded_te.as_bytes()).await,
        ),
    ]);
    assert!(!rec.saw("/smuggled"), "{:?}", rec.heads());
}

/// Whitespace between a field name and its colon (RFC 9112 §5.1: MUST be 400).
#[tokio::test]
async fn whitespace_before_the_colon_is_400() {
    let (_w, addr, rec, _up) = gateway().await;
    let host = "GET /sp HTTP/1.1\r\nHost : localhost\r\n\r\n".to_string();
    let te = format!(
        "POST /sp HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    all_passed(vec![
        ("Host : x", refused_400(addr, &rec, host.as_bytes()).await),
        (
            "Transfer-Encoding : chunked",
            refused_400(addr, &rec, te.as_bytes()).await,
        ),
    ]);
    assert!(!rec.saw("/smuggled"), "{:?}", rec.heads());
}

/// Broken chunk framing: the request may have been forwarded by then (its head), but the
/// client gets an error status or a close, the connection is closed, and what follows the
/// broken body never reaches the upstream as a request.
#[tokio::test]
async fn bad_chunk_framing_ends_the_connection() {
    let (_w, addr, rec, _up) = gateway().await;
    let head = "POST /chunks HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n";
    let cases = [
        (
            "chunk size zz",
            format!("{head}zz\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "data not followed by CRLF",
            format!("{head}5\r\nhello0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "data followed by junk, then CRLF",
            format!("{head}5\r\nhelloXX\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "chunk size overflowing 64 bits",
            format!("{head}10000000000000005\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        // Bare LFs: a hop in front of Wraith may read these lines differently.
        (
            "chunk-size line ended by a bare LF",
            format!("{head}5\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "chunk extension ended by a bare LF",
            format!("{head}2;ext\nxx\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "chunk data followed by a bare LF",
            format!("{head}5\r\nhello\n0\r\n\r\n{SMUGGLED}"),
        ),
    ];
    let mut results = Vec::new();
    for (name, raw) in &cases {
        let before = rec.count();
        let bodies_before = rec.bodies_len();
        let mut c = Conn::open(addr).await;
        c.send(raw.as_bytes()).await;
        let outcome: R<()> = async {
            match c.next(false).await? {
                None => {} // closed without an answer: acceptable
                Some(resp) if resp.status >= 400 => {}
                Some(resp) => return Err(format!("answered {}", resp.summary())),
            }
            c.closed().await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let seen = rec.heads_since(before);
            if seen.len() > 1 || seen.iter().any(|h| h.contains("/smuggled")) {
                return Err(format!("the upstream saw {seen:?}"));
            }
            if rec
                .bodies_since(bodies_before)
                .iter()
                .any(|(u, b)| u == "/chunks" && b == b"hello")
            {
                // A lenient decoder that re-synchronised: the body passed as if well framed.
                return Err(format!(
                    "the broken body reached the upstream as a whole (\"hello\"): {seen:?}"
                ));
            }
            Ok(())
        }
        .await;
        results.push((*name, outcome));
    }
    all_passed(results);
    assert!(!rec.saw("/smuggled"), "{:?}", rec.heads());
}

/// The same Content-Length twice is one length (RFC 9110 §8.6): accepted, the body whole.
#[tokio::test]
async fn identical_repeated_content_length_is_accepted() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"POST /dup HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["body"], "hello", "{}", resp.summary());
    assert_eq!(rec.body_of("/dup").as_deref(), Some(&b"hello"[..]));
    // And the connection is in step for the next one.
    c.send(get("/dup-next").as_bytes()).await;
    assert_eq!(c.response().await.json()["uri"], "/dup-next");
}

// ---------------------------------------------------------------------------------------------
// 7. Limits and malformed request lines

/// A head over `max_header_size` (8 KiB): 431; one under it passes.
#[tokio::test]
async fn a_head_over_max_header_size_is_431() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    let small = format!(
        "GET /small HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(6000)
    );
    c.send(small.as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "6 KB head: {}", resp.summary());

    let mut c = Conn::open(addr).await;
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    c.send(big.as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 431, "10 KB head: {}", resp.summary());
    assert_eq!(rec.heads(), ["GET /small"]);
}

/// A request line alone over `max_header_size` (8 KiB) is 414, whether its end comes with the
/// bytes that pass the limit (one write, line and headers) or after them (the line first, in
/// pieces); a long line under the limit with headers that take the head over it is 431.
#[tokio::test]
async fn a_request_line_over_max_header_size_is_414_however_it_arrives() {
    let (_w, addr, rec, _up) = gateway().await;
    let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(10_000));
    let rest = "Host: localhost\r\n\r\n";

    let mut c = Conn::open(addr).await;
    c.send(format!("{long_line}{rest}").as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 414, "in one write: {}", resp.summary());

    let mut c = Conn::open(addr).await;
    c.send(&long_line.as_bytes()[..9_000]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send(format!("{}{rest}", &long_line[9_000..]).as_bytes())
        .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 414, "in two writes: {}", resp.summary());

    let mut c = Conn::open(addr).await;
    let head = format!(
        "GET /{} HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(6_000),
        "b".repeat(4_000)
    );
    c.send(head.as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(
        resp.status,
        431,
        "long line, headers over: {}",
        resp.summary()
    );
    assert!(rec.heads().is_empty());
}

/// More header lines than `max_headers` (20): 431; 10 pass.
#[tokio::test]
async fn more_headers_than_max_headers_is_431() {
    let (_w, addr, rec, _up) = gateway().await;
    let with = |n: usize, path: &str| {
        let mut s = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n");
        for i in 0..n {
            s.push_str(&format!("X-H-{i}: {i}\r\n"));
        }
        s.push_str("\r\n");
        s
    };
    let mut c = Conn::open(addr).await;
    c.send(with(10, "/ten").as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "11 headers: {}", resp.summary());

    let mut c = Conn::open(addr).await;
    c.send(with(30, "/thirty").as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 431, "31 headers: {}", resp.summary());
    assert_eq!(rec.heads(), ["GET /ten"]);
}

/// A later HTTP/1.x minor version is served as HTTP/1.1 (RFC 9110 §2.5), on a connection
/// that stays open.
#[tokio::test]
async fn a_later_http_1_minor_version_is_served_as_http_1_1() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    // The head in pieces: the version is read before the line (and the head) is complete.
    for piece in ["GET /minor HTTP/1.9", "\r\nHost: local", "host\r\n\r\n"] {
        c.send(piece.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    c.send(b"GET /again HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(rec.heads(), ["GET /minor", "GET /again"]);
}

/// A request line with a version this server does not speak: 505 (or 400), then close.
#[tokio::test]
async fn unsupported_versions_are_refused_and_closed() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut results = Vec::new();
    for version in ["HTTP/1.10", "HTTP/2.0", "HTTP/3.0", "HTTP/0.9"] {
        let raw = format!("GET /v HTTP/{}\r\nHost: localhost\r\n\r\n", &version[5..]);
        let outcome: R<()> = async {
            let mut c = Conn::open(addr).await;
            c.send(raw.as_bytes()).await;
            let resp = c.next(false).await?.ok_or("closed without a response")?;
            if resp.status != 505 && resp.status != 400 {
                return Err(format!("answered {}", resp.summary()));
            }
            c.closed()
                .await
                .map_err(|e| format!("after {}: {e}", resp.status))
        }
        .await;
        results.push((version, outcome));
    }
    all_passed(results);
    assert_eq!(rec.count(), 0, "{:?}", rec.heads());
}

/// Request lines that are not HTTP: 400, then close.
#[tokio::test]
async fn garbage_request_lines_are_400() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut results = Vec::new();
    for (name, raw) in [
        ("one word", "HELLO\r\n\r\n"),
        (
            "bad method token",
            "G(T /x HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ),
        ("not HTTP", "GET /x FOO/1.1\r\nHost: localhost\r\n\r\n"),
        ("no target", "GET HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        ("binary", "\x16\x03\x01\x00\x10garbage\r\n\r\n"),
    ] {
        results.push((name, refused_400(addr, &rec, raw.as_bytes()).await));
    }
    all_passed(results);
}

// ---------------------------------------------------------------------------------------------
// 8. Expect: 100-continue

/// A proxied POST with `Expect: 100-continue` gets `100 Continue` before it sends its body,
/// then the final response once the body is sent.
#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let interim = match c.next(false).await {
        Ok(Some(r)) => r,
        Ok(None) => panic!("closed instead of 100 Continue"),
        Err(e) => panic!("no 100 Continue before the body was sent: {e}"),
    };
    assert_eq!(interim.status, 100, "{}", interim.summary());
    assert_eq!(interim.version, "HTTP/1.1");
    c.send(b"hello").await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["body"], "hello");
    assert_eq!(rec.body_of("/upload").as_deref(), Some(&b"hello"[..]));
    // The connection carries on.
    c.send(get("/after-upload").as_bytes()).await;
    assert_eq!(c.response().await.json()["uri"], "/after-upload");
}

/// A request refused before its body is read gets its final response without a 100 first;
/// the connection is then either closed or skips the body the client sends anyway.
#[tokio::test]
async fn expect_100_continue_refused_gets_no_100() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"POST /deny HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let resp = match c.next(false).await {
        Ok(Some(r)) => r,
        Ok(None) => panic!("closed without a response"),
        Err(e) => panic!("no response before the body: {e}"),
    };
    assert_eq!(
        resp.status,
        403,
        "a 100 or other before the 403: {}",
        resp.summary()
    );
    assert_eq!(resp.body, b"denied\n");
    // The client sends its body anyway (RFC 9110 §10.1.1 allows it), then another request.
    if !resp.has_token("connection", "close") {
        let mut next = b"hello".to_vec();
        next.extend_from_slice(get("/after-deny").as_bytes());
        let _ = tokio::time::timeout(READ_TIMEOUT, c.w.as_mut().unwrap().write_all(&next)).await;
        c.read_timeout = CLOSE_TIMEOUT;
        match c.next(false).await {
            Ok(None) => eprintln!("closed after the 403"),
            Ok(Some(r)) => {
                eprintln!("the body was skipped, the next request served");
                assert_eq!(r.status, 200, "after the skipped body: {}", r.summary());
                assert_eq!(r.json()["uri"], "/after-deny");
            }
            Err(e) => panic!("after the refused body: {e}"),
        }
    } else {
        eprintln!("403 with connection: close");
        c.assert_closed("after a 403 with connection: close").await;
    }
    assert!(
        rec.heads().iter().all(|h| h == "GET /after-deny"),
        "{:?}",
        rec.heads()
    );
}

/// A client that sends its body right behind an `Expect: 100-continue` head (RFC 9110 §10.1.1
/// allows it; curl does after a second) has sent a whole request: the connection carries on
/// (it was closed, as if the body might still come).
#[tokio::test]
async fn expect_100_continue_with_the_body_already_sent_keeps_the_connection() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(
        b"POST /eager HTTP/1.1
Host: localhost
Expect: 100-continue
Content-Length: 5

hello",
    )
    .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["body"], "hello");
    assert!(!resp.has_token("connection", "close"), "{}", resp.summary());
    c.send(get("/after-eager").as_bytes()).await;
    assert_eq!(c.response().await.json()["uri"], "/after-eager");
    assert_eq!(rec.body_of("/eager").as_deref(), Some(&b"hello"[..]));
}

/// RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored.
#[tokio::test]
async fn expect_100_continue_on_http10_is_ignored() {
    let (_w, addr, _rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"POST /ten HTTP/1.0\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["body"], "hello");
}

// ---------------------------------------------------------------------------------------------
// 9. Chunked request bodies

/// Chunk extensions and trailers are consumed; the body arrives whole; the connection stays
/// in step.
#[tokio::test]
async fn chunked_request_with_extensions_and_trailers_arrives_whole() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"POST /chunked HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6;a=b;c=\"d\"\r\n world\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["body"], "hello world", "{}", resp.summary());
    assert_eq!(
        rec.body_of("/chunked").as_deref(),
        Some(&b"hello world"[..])
    );
    // Written in pieces, splitting the size line (0x10 = 16), the data and the CRLFs.
    c.send(b"POST /chunked2 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    for piece in [
        &b"1"[..],
        b"0\r",
        b"\n0123456789",
        b"abcdef\r",
        b"\n0\r\n",
        b"\r\n",
    ] {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = c.response().await;
    assert_eq!(
        resp.json()["body"],
        "0123456789abcdef",
        "{}",
        resp.summary()
    );
    c.send(get("/after-trailers").as_bytes()).await;
    assert_eq!(c.response().await.json()["uri"], "/after-trailers");
}

// ---------------------------------------------------------------------------------------------
// 10. Response bodies of unknown length

/// An upstream body of unknown length reaches an HTTP/1.1 client chunked, decodes to the
/// original bytes, and the connection carries on.
#[tokio::test]
async fn unknown_length_response_is_chunked_to_http11() {
    let (_w, addr, _rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(get("/stream").as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert!(
        resp.has_token("transfer-encoding", "chunked"),
        "not chunked: {}",
        resp.summary()
    );
    assert!(
        resp.header("content-length").is_none(),
        "{}",
        resp.summary()
    );
    assert_eq!(lossy(&resp.body), lossy(&stream_body()));
    c.send(get("/after-stream").as_bytes()).await;
    assert_eq!(c.response().await.json()["uri"], "/after-stream");
}

// ---------------------------------------------------------------------------------------------
// 11. Leading empty lines

/// An empty line before the request line is ignored (RFC 9112 §2.2), on a new connection and
/// after a request with a body (clients that add a CRLF after a POST body).
#[tokio::test]
async fn a_leading_empty_line_is_ignored() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(format!("\r\n{}", get("/lead")).as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["uri"], "/lead");
    c.send(b"POST /post HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello\r\n")
        .await;
    let resp = c.response().await;
    assert_eq!(resp.json()["body"], "hello", "{}", resp.summary());
    c.send(get("/after-crlf").as_bytes()).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.json()["uri"], "/after-crlf");
    assert_eq!(rec.heads(), ["GET /lead", "POST /post", "GET /after-crlf"]);
}

// ---------------------------------------------------------------------------------------------
// 12. Bodies the gateway does not read

/// A built-in response to a POST with a 100 KB body it never reads: after the answer, the
/// connection is either closed or the body skipped exactly; requests hidden in the body
/// are never parsed.
#[tokio::test]
async fn an_unread_body_is_never_parsed_as_requests() {
    let (_w, addr, rec, _up) = gateway().await;
    // Content-Length framing: 102 400 bytes of requests.
    let mut body = Vec::new();
    while body.len() + SMUGGLED.len() <= 102_400 {
        body.extend_from_slice(SMUGGLED.as_bytes());
    }
    body.resize(102_400, b'a');
    let mut cl = format!(
        "POST /deny HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    cl.extend_from_slice(&body);
    cl.extend_from_slice(get("/after-cl").as_bytes());

    // Chunked framing: requests inside the chunk data, chunk-size lines included.
    let mut chunked =
        b"POST /deny HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..40 {
        let chunk = SMUGGLED.repeat(40);
        chunked.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    chunked.extend_from_slice(get("/after-chunked").as_bytes());

    let mut results = Vec::new();
    for (name, raw, after) in [
        ("content-length", cl, "/after-cl"),
        ("chunked", chunked, "/after-chunked"),
    ] {
        let mut c = Conn::open(addr).await;
        let writer = c.send_in_background(raw);
        let outcome: R<()> = async {
            let resp = c.next(false).await?.ok_or("closed without a response")?;
            if resp.status != 403 {
                return Err(format!("answered {}", resp.summary()));
            }
            // Next: the close, or the answer to the request after the body, and soon.
            c.read_timeout = CLOSE_TIMEOUT;
            match c.next(false).await? {
                None => {
                    // Closed: the body was never parsed.
                    eprintln!("{name}: the connection was closed after the 403");
                    Ok(())
                }
                Some(r) if r.status == 200 && r.json()["uri"] == after => {
                    eprintln!("{name}: the body was skipped, {after} served");
                    Ok(())
                }
                Some(r) => Err(format!(
                    "the response after the body is not {after}'s: {}",
                    r.summary()
                )),
            }
        }
        .await;
        writer.abort();
        results.push((name, outcome));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    results.push((
        "upstream",
        if rec.saw("/smuggled") {
            Err(format!("the upstream saw {:?}", rec.heads()))
        } else {
            Ok(())
        },
    ));
    all_passed(results);
}

// ---------------------------------------------------------------------------------------------
// 13. Absolute-form targets

/// `GET http://localhost/x`: answered (2xx/4xx, no hang, no crash); the connection then
/// either serves another request or is closed cleanly.
#[tokio::test]
async fn absolute_form_target_is_answered() {
    let (_w, addr, _rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"GET http://localhost/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let resp = c.response().await;
    assert!(
        (200..300).contains(&resp.status) || (400..500).contains(&resp.status),
        "{}",
        resp.summary()
    );
    eprintln!("absolute form: {}", resp.summary());
    if resp.has_token("connection", "close") {
        c.assert_closed("after connection: close").await;
    } else {
        c.send(get("/after-absolute").as_bytes()).await;
        let resp = c.response().await;
        assert_eq!(resp.status, 200, "{}", resp.summary());
        assert_eq!(resp.json()["uri"], "/after-absolute");
    }
    // The gateway is still alive and serving.
    let mut c = Conn::open(addr).await;
    c.send(get("/alive").as_bytes()).await;
    assert_eq!(c.response().await.status, 200);
}

// ---------------------------------------------------------------------------------------------
// Review follow-ups.

/// The CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// An upload that stalls (the client sends part of its body, then nothing) leaves the
/// gateway idle while it waits: the connection's task is not woken over and over.
#[tokio::test]
async fn a_stalled_upload_does_not_spin() {
    let (w, addr, _rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\nhello")
        .await;
    // Let the pipeline reach the upstream and wait for the rest of the body.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(w.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(w.pid()) - before;
    // A task woken without end burns the whole 2 s (200 ticks); waiting costs ~nothing.
    assert!(
        used < 50,
        "the gateway used {used} ticks during a 2 s stall"
    );
}

/// Authority-form targets are for CONNECT only and `*` for OPTIONS only (RFC 9112 §3.2).
#[tokio::test]
async fn target_forms_are_checked_against_the_method() {
    let (_w, addr, rec, _up) = gateway().await;
    let mut results = Vec::new();
    for (name, raw) in [
        (
            "authority form on GET",
            "GET localhost:80 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ),
        (
            "asterisk on GET",
            "GET * HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ),
    ] {
        results.push((name, refused_400(addr, &rec, raw.as_bytes()).await));
    }
    all_passed(results);
    // `OPTIONS *` is a valid request: whatever the routes say, not a 400 from the codec.
    let mut c = Conn::open(addr).await;
    c.send(b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let resp = c.response().await;
    assert_ne!(resp.status, 400, "{}", resp.summary());
}

/// A HEAD answered by an upstream that gives no length (its GET is chunked) gets no
/// invented `content-length: 0`.
#[tokio::test]
async fn head_of_an_unknown_length_gets_no_invented_length() {
    let (_w, addr, _rec, _up) = gateway().await;
    let mut c = Conn::open(addr).await;
    c.send(b"HEAD /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let resp = c.head_response().await;
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert_eq!(resp.header("content-length"), None, "{}", resp.summary());
    // The connection is still in step.
    c.send(get("/static").as_bytes()).await;
    assert_eq!(c.response().await.body, STATIC_BODY);
}

/// Requests the codec refuses are accounted like any other: one access record each (status,
/// error `malformed_request`, the request line when it could be read) in the JSON and
/// combined logs, and a `malformed_request` security event for the SIEM.
#[tokio::test]
async fn refused_requests_are_logged_and_reported() {
    let (upstream, _rec) = recording_upstream().await;
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[log.json]\npath = \"access.json\"\n[log.combined]\npath = \"access.log\"\n[log.events]\npath = \"events.json\"\n",
        config(&setup, upstream.addr)
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("http");
    for raw in [
        &b"POST /te-cl HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"[..],
        b"\x16\x03\x01\x00\x10garbage\r\n\r\n",
    ] {
        let mut c = Conn::open(addr).await;
        c.send(raw).await;
        let resp = c.response().await;
        assert_eq!(resp.status, 400, "{}", resp.summary());
    }
    let read = |name: &str| -> Vec<String> {
        std::fs::read_to_string(wraith.path(name))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while read("access.json").len() < 2
        || read("access.log").len() < 2
        || read("events.json").len() < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "records: {:?} {:?} {:?}",
            read("access.json"),
            read("access.log"),
            read("events.json")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let json: Vec<serde_json::Value> = read("access.json")
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 2, "{json:?}");
    assert_eq!(json[0]["status"], 400);
    assert_eq!(json[0]["error"], "malformed_request");
    assert_eq!(json[0]["method"], "POST");
    assert_eq!(json[0]["client_ip"], "127.0.0.1");
    assert_eq!(json[1]["status"], 400);
    assert_eq!(json[1]["method"], "-");
    assert_eq!(json[1]["path"], "-");
    assert!(json[1].get("host").is_none(), "{}", json[1]);
    let combined = read("access.log");
    assert!(
        combined[0].contains("\"POST /te-cl HTTP/1.1\" 400"),
        "{}",
        combined[0]
    );
    assert!(
        combined[1].contains("\"- - HTTP/1.1\" 400"),
        "{}",
        combined[1]
    );
    let events: Vec<serde_json::Value> = read("events.json")
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .all(|e| e["wraith"]["event"] == "malformed_request" && e["srcip"] == "127.0.0.1"),
        "{events:?}"
    );
}

/// The connection's own timers: idle_timeout between requests; idle_timeout for a response
/// the client does not read; and no header_read_timeout while a response is being sent,
/// even when the next request's head has already arrived.
#[tokio::test]
async fn idle_and_unread_response_timeouts() {
    let (upstream, _rec) = recording_upstream().await;
    let setup = Setup::new();
    let cfg = config(&setup, upstream.addr).replace(
        LIMITS,
        r#"limits = { header_read_timeout = "1s", idle_timeout = "1s" }"#,
    );
    let wraith = setup.start(&cfg);
    let addr = wraith.addr("http");

    // Idle after a request: closed once idle_timeout has passed (CLOSE_TIMEOUT is 3 s).
    let mut c = Conn::open(addr).await;
    c.send(get("/static").as_bytes()).await;
    assert_eq!(c.response().await.body, STATIC_BODY);
    c.assert_closed("idle keep-alive connection").await;

    // A pipelined head that arrives while a 2 s response is still being sent is not timed
    // by header_read_timeout (1 s): both responses arrive.
    let mut c = Conn::open(addr).await;
    c.send(get("/slow").as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(get("/static").as_bytes()).await;
    let slow = c.response().await;
    assert_eq!(
        slow.body,
        b"slow 0;slow 1;slow 2;slow 3;",
        "{}",
        slow.summary()
    );
    assert_eq!(c.response().await.body, STATIC_BODY);

    // A client that reads none of a 64 MiB response: the connection is closed after
    // idle_timeout without progress, not held open for ever.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(get("/big").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stalled connection stayed open ({total} bytes read)"
    );
    assert!(
        total < 64 << 20,
        "the whole response arrived: {total} bytes"
    );
}

/// Damaged requests, 400 of them from a fixed seed (bytes flipped, inserted or cut, a line
/// doubled, the end cut off): every connection gets well-formed responses and then ends,
/// within the time limit, whatever it sent; nothing panics; the gateway serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_requests_get_answers_or_a_close_never_a_hang_or_a_panic() {
    let (w, addr, _rec, _up) = gateway().await;
    let seeds: [&[u8]; 8] = [
        b"GET /a?x=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nt: 1\r\n\r\n",
        b"GET /1 HTTP/1.1\r\nHost: localhost\r\n\r\nGET /2 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /fixed HTTP/1.0\r\n\r\n",
        b"PUT /e HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /deny HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ];
    let cases = damaged(&seeds, 400, 0x2545_f491_4f6c_dd1d);
    let failures: Vec<String> = futures_util::stream::iter(cases)
        .map(|case| async move {
            let mut c = Conn::open(addr).await;
            // The server may answer and close before it has everything: write errors are
            // expected, and the half-close tells it nothing more is coming.
            let mut wr = c.w.take().expect("write side");
            let _ = wr.write_all(&case).await;
            let _ = wr.shutdown().await;
            let mut answered = 0;
            loop {
                match c.next(false).await {
                    Ok(Some(_)) => answered += 1,
                    Ok(None) => return None,
                    Err(e) => {
                        return Some(format!(
                            "{:?} (after {answered} response(s)): {e}",
                            lossy(&case)
                        ))
                    }
                }
            }
        })
        .buffer_unordered(32)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!w.log().contains("panicked"), "{}", w.log());
    let mut c = Conn::open(addr).await;
    c.send(get("/static").as_bytes()).await;
    assert_eq!(c.response().await.status, 200);
}

/// Part of the HTTP/2 preface, then the client's FIN: the connection ends at once. (Plain
/// listeners peek for the preface; with the client's side closed the socket stays readable
/// and the peek loop spun on the same bytes for all of header_read_timeout, a core per
/// such connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_of_an_h2_preface_then_a_close_ends_the_connection_at_once() {
    let (_w, addr, rec, _up) = gateway().await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut results = Vec::new();
    for len in [1, 3, 16, 23] {
        let mut c = Conn::open(addr).await;
        c.send(&preface[..len]).await;
        let _ = c.w.take().expect("write side").shutdown().await;
        let what = format!("{len} byte(s)");
        // CLOSE_TIMEOUT is well under the listener's header_read_timeout.
        c.read_timeout = CLOSE_TIMEOUT;
        let outcome = async {
            while let Some(resp) = c.next(false).await? {
                // The fragment is refused as the HTTP/1.1 head it is not, or just closed.
                if resp.status != 400 && resp.status != 505 {
                    return Err(format!("answered {}", resp.summary()));
                }
            }
            Ok(())
        }
        .await;
        results.push((what, outcome));
    }
    let results: Vec<(&str, R<()>)> = results
        .iter()
        .map(|(w, r)| (w.as_str(), r.clone()))
        .collect();
    all_passed(results);
    // And the listener still serves.
    let mut c = Conn::open(addr).await;
    c.send(get("/static").as_bytes()).await;
    assert_eq!(c.response().await.status, 200);
    assert_eq!(rec.heads(), ["GET /static"]);
}
