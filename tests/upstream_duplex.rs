//! Full duplex to HTTP/1.1 upstreams: an upstream that answers while it still reads the
//! request body (an echo, a transcoder, an upload with progress events) gets its response to
//! the client at once, and the rest of the body beside it. Each upstream here reads and
//! writes in one sequential loop, so it stops reading while the gateway does not read its
//! answer: a half-duplex gateway deadlocks with it until the response timeout (30 s here,
//! past every test's own limit).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The request bodies sent: 8 MiB, far more than the socket buffers on the way hold.
const SIZE: usize = 8 << 20;
/// Each test's own limit, well under the route's response timeout.
const LIMIT: Duration = Duration::from_secs(20);

/// The request body: a pattern, so a byte lost, doubled or moved shows.
fn payload() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8).collect()
}

/// The gateway in front of `upstream`, with a response timeout of 30 s and a JSON access
/// log (`access.json`).
fn gateway(upstream: SocketAddr) -> Wraith {
    gateway_in(Setup::new(), &upstream.to_string(), "")
}

/// `gateway` on `setup`, for the endpoint `endpoint`, with `upstream_extra` (sub-tables of
/// the upstream, such as `[upstream.tls]`).
fn gateway_in(setup: Setup, endpoint: &str, upstream_extra: &str) -> Wraith {
    let cfg = format!(
        "{}\n[[upstream]]\nname = \"up\"\nendpoints = [\"{endpoint}\"]\nresponse_timeout = \"30s\"\n{upstream_extra}\n[[route]]\nname = \"all\"\nupstream = \"up\"\n\n[log.json]\npath = \"access.json\"\n",
        setup.listeners()
    );
    setup.start(&cfg)
}

/// Sends an 8 MiB body to `path` over HTTP/1.1 while reading the echo as it comes: the
/// whole echo must arrive, byte for byte and cleanly ended, within `LIMIT`.
async fn echo_through_http1(wraith: &Wraith, path: &str) {
    let body = payload();
    let s = TcpStream::connect(wraith.addr("http")).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let sent = body.clone();
    let head = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {SIZE}\r\n\r\n");
    let upload = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await.unwrap();
        for piece in sent.chunks(64 * 1024) {
            wr.write_all(piece).await.unwrap();
        }
        wr
    });
    let mut echoed = Vec::with_capacity(SIZE);
    let (head, ended) =
        tokio::time::timeout(LIMIT, read_chunked_response(&mut rd, &mut echoed, None))
            .await
            .unwrap_or_else(|_| panic!("deadlocked: {} of {SIZE} bytes echoed", echoed.len()));
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(ended, "the echo did not end cleanly");
    assert!(
        echoed == body,
        "{} bytes echoed, not the ones sent",
        echoed.len()
    );
    let _wr = upload.await.unwrap();
}

/// A chunked body decoder, fed as bytes arrive.
#[derive(Default)]
struct Dechunk {
    /// Bytes left of the current chunk's data (then its CRLF), once its size line is read.
    data: Option<usize>,
    /// The last chunk was read: only the final CRLF is left.
    last: bool,
}

impl Dechunk {
    /// Moves the data at the front of `buf` to `out`; true once the body has ended.
    fn feed(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
        loop {
            match self.data {
                Some(0) => {
                    if buf.len() < 2 {
                        return false;
                    }
                    assert_eq!(&buf[..2], b"\r\n", "chunk data not followed by CRLF");
                    buf.drain(..2);
                    self.data = None;
                }
                Some(n) => {
                    if buf.is_empty() {
                        return false;
                    }
                    let k = n.min(buf.len());
                    out.extend(buf.drain(..k));
                    self.data = Some(n - k);
                }
                None => {
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        return false;
                    };
                    if self.last {
                        assert_eq!(end, 0, "trailers after the last chunk");
                        buf.drain(..2);
                        return true;
                    }
                    let line = String::from_utf8_lossy(&buf[..end]).to_string();
                    let size = line.split(';').next().unwrap().trim();
                    let size = usize::from_str_radix(size, 16).expect("chunk size line");
                    buf.drain(..end + 2);
                    if size == 0 {
                        self.last = true;
                    } else {
                        self.data = Some(size);
                    }
                }
            }
        }
    }
}

/// Reads from `s` into `buf` until it holds a whole head; returns the head (without the
/// empty line), or `None` at EOF.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut tmp = [0u8; 16 * 1024];
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

fn content_length(head: &str) -> Option<usize> {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
}

/// Fixes the socket's buffers at 64 KiB each way: with the kernel's autotuning (up to 4 MiB
/// to send here, and more to receive), a gateway that does not read could take in most of an
/// 8 MiB echo before the upstream's writes block, and the deadlock these tests are about
/// would depend on the machine.
fn small_buffers(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 64 * 1024;
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: an int option set on a descriptor `s` keeps open.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
}

/// One connection of the echo upstream (`echo_as_it_reads`), over TCP or TLS.
async fn echo_conn<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut s, &mut buf).await {
        let mut left = content_length(&head);
        let mut chunked = left.is_none().then(Dechunk::default);
        let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        if s.write_all(reply).await.is_err() || s.flush().await.is_err() {
            return;
        }
        loop {
            let mut piece = Vec::new();
            let ended = match (&mut left, &mut chunked) {
                (Some(n), _) => {
                    let k = (*n).min(buf.len());
                    piece.extend(buf.drain(..k));
                    *n -= k;
                    *n == 0
                }
                (None, Some(d)) => d.feed(&mut buf, &mut piece),
                (None, None) => unreachable!(),
            };
            if !piece.is_empty() {
                let mut out = format!("{:x}\r\n", piece.len()).into_bytes();
                out.extend_from_slice(&piece);
                out.extend_from_slice(b"\r\n");
                // (Flushed: over TLS, `write_all` may leave the bytes in the session's
                // buffer, and this loop goes on to read; the echo's tail would wait there
                // for a write that never comes.)
                if s.write_all(&out).await.is_err() || s.flush().await.is_err() {
                    return;
                }
            }
            if ended {
                break;
            }
            let mut tmp = [0u8; 64 * 1024];
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        if s.write_all(b"0\r\n\r\n").await.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

/// An upstream that answers `200` with a chunked body as soon as it has a request head,
/// then echoes each piece of the request body as it reads it, in one sequential loop
/// (read, then write): while a write of its waits, it reads nothing. Keep-alive; counts the
/// connections it accepted.
async fn echo_as_it_reads() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            small_buffers(&s);
            tokio::spawn(echo_conn(s));
        }
    });
    (addr, accepted)
}

/// `echo_as_it_reads` over TLS (`server`): rustls takes bytes past a full socket, so the
/// upload path flushes; the deadlock a half-duplex gateway hits is the same.
async fn echo_as_it_reads_tls(server: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            small_buffers(&s);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    echo_conn(tls).await;
                }
            });
        }
    });
    addr
}

/// Reads a chunked (or `Content-Length`) response off `rd` into `out` until its end
/// (`true`) or EOF (`false`); `first_bytes` is told once the head and some of the body are
/// in.
async fn read_chunked_response(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    out: &mut Vec<u8>,
    mut first_bytes: Option<tokio::sync::oneshot::Sender<()>>,
) -> (String, bool) {
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 64 * 1024];
    let head = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            break head;
        }
        match rd.read(&mut tmp).await {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&buf).into(), false),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    if let Some(length) = content_length(&head) {
        // (An HTTP/2 upstream's echo carries the request's length.)
        out.append(&mut buf);
        loop {
            if out.len() >= length {
                return (head, true);
            }
            if !out.is_empty() {
                if let Some(tx) = first_bytes.take() {
                    let _ = tx.send(());
                }
            }
            match rd.read(&mut tmp).await {
                Ok(0) | Err(_) => return (head, false),
                Ok(n) => out.extend_from_slice(&tmp[..n]),
            }
        }
    }
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut dechunk = Dechunk::default();
    loop {
        if dechunk.feed(&mut buf, out) {
            return (head, true);
        }
        if !out.is_empty() {
            if let Some(tx) = first_bytes.take() {
                let _ = tx.send(());
            }
        }
        match rd.read(&mut tmp).await {
            Ok(0) | Err(_) => return (head, false),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_echoes_as_it_reads_streams_through_an_http1_client() {
    let (upstream, _) = echo_as_it_reads().await;
    let wraith = gateway(upstream);
    echo_through_http1(&wraith, "/duplex-h1").await;

    // The access record counts the whole upload, though most of it went after the head.
    let record = wraith
        .wait_json_line("access.json", Duration::from_secs(10), |v| {
            v["path"] == "/duplex-h1"
        })
        .await
        .expect("an access record");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["bytes_in"], SIZE, "{record}");
    assert_eq!(record["bytes_out"], SIZE, "{record}");
    assert!(record.get("error").is_none(), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_echoes_as_it_reads_streams_through_an_http2_client() {
    let (upstream, _) = echo_as_it_reads().await;
    let wraith = gateway(upstream);
    let body = payload();
    let mut h2 = h2_connect(&wraith).await;
    let req = http::Request::post("https://localhost/echo")
        .header("content-length", SIZE)
        .body(())
        .unwrap();
    let (response, mut stream) = h2.send_request(req, false).unwrap();
    let sent = body.clone();
    let upload = tokio::spawn(async move {
        let mut rest = bytes::Bytes::from(sent);
        while !rest.is_empty() {
            stream.reserve_capacity(rest.len().min(64 * 1024));
            let room = std::future::poll_fn(|cx| stream.poll_capacity(cx))
                .await
                .expect("stream open")
                .expect("capacity");
            if room == 0 {
                continue;
            }
            let piece = rest.split_to(room.min(rest.len()));
            stream.send_data(piece, rest.is_empty()).unwrap();
        }
    });
    let echo = async {
        let resp = response.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut recv = resp.into_body();
        let mut echoed = Vec::with_capacity(SIZE);
        while let Some(data) = recv.data().await {
            let data = data.expect("the echo ended in error");
            recv.flow_control().release_capacity(data.len()).unwrap();
            echoed.extend_from_slice(&data);
        }
        echoed
    };
    let echoed = tokio::time::timeout(LIMIT, echo)
        .await
        .expect("deadlocked: the echo did not complete");
    assert!(
        echoed == body,
        "{} bytes echoed, not the ones sent",
        echoed.len()
    );
    upload.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_early_answer_ends_the_upload_and_its_connection_is_not_reused() {
    // The upstream answers `200` with its whole body on the head and reads nothing more,
    // holding the connection open: the client gets the answer at once (not after the
    // response timeout), and the connection, on which the upstream still expects the rest
    // of the body, is closed rather than pooled.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_head(&mut s, &mut buf).await.is_some() {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    // Reads nothing more: a request reusing this connection never gets
                    // an answer.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    let wraith = gateway(upstream);

    let s = TcpStream::connect(wraith.addr("http")).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let upload = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {SIZE}\r\n\r\n");
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for piece in payload().chunks(64 * 1024) {
            if wr.write_all(piece).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let answered = tokio::time::timeout(LIMIT, async {
        let mut tmp = [0u8; 4096];
        while !got.windows(6).any(|w| w == b"\r\n\r\nok") {
            match rd.read(&mut tmp).await {
                Ok(n) if n > 0 => got.extend_from_slice(&tmp[..n]),
                _ => return false,
            }
        }
        true
    })
    .await;
    upload.abort();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(answered, Ok(true), "no answer: {text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // The next request goes on a new connection, and is answered.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        http_client().get(wraith.url("http", "/next")).send(),
    )
    .await
    .expect("the next request went to the connection that was not reading")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// POSTs an 8 MiB body to `path` over HTTP/1.1, sends 1 MiB of it and, once the echo is
/// coming back, gives up on the upload (closes its side with 7 MiB still owed). The
/// response must be a 200 that never ends cleanly; returns what was echoed.
async fn abandon_upload_once_echoed(wraith: &Wraith, path: &str) -> Vec<u8> {
    let s = TcpStream::connect(wraith.addr("http")).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let head = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {SIZE}\r\n\r\n");
    let upload = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await.unwrap();
        wr.write_all(&payload()[..1 << 20]).await.unwrap();
        let _ = started.await;
        wr.shutdown().await.unwrap();
        wr
    });
    let mut echoed = Vec::new();
    let (head, ended) = tokio::time::timeout(
        LIMIT,
        read_chunked_response(&mut rd, &mut echoed, Some(started_tx)),
    )
    .await
    .unwrap_or_else(|_| panic!("no end: {} bytes echoed", echoed.len()));
    let _wr = upload.await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !ended,
        "a response cut by its upload's failure must not end cleanly"
    );
    echoed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_aborts_its_upload_after_the_response_started_gets_a_cut_response() {
    let (upstream, _) = echo_as_it_reads().await;
    let wraith = gateway(upstream);
    let echoed = abandon_upload_once_echoed(&wraith, "/duplex-abort").await;
    assert!(!echoed.is_empty(), "the response had not started");
    assert!(echoed.len() <= 1 << 20);

    // Recorded as the client's abort, not as the upstream's failure; and the gateway and
    // the endpoint go on serving.
    let record = wraith
        .wait_json_line("access.json", Duration::from_secs(10), |v| {
            v["path"] == "/duplex-abort"
        })
        .await
        .expect("an access record");
    assert_eq!(record["error"], "client_closed", "{record}");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        http_client()
            .post(wraith.url("http", "/echo"))
            .body("again")
            .send(),
    )
    .await
    .expect("the gateway still answers")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "again");
}

/// The same over TLS to the upstream (`https://` endpoint): the 8 MiB echo completes
/// through an HTTP/1.1 client, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_over_tls_that_echoes_as_it_reads_streams_through() {
    let setup = Setup::new();
    let server = tls_server_config(&setup.pki.server_cert, &setup.pki.server_key, None);
    let upstream = echo_as_it_reads_tls(server).await;
    let tls = format!("[upstream.tls]\nca = \"{}\"\n", setup.pki.ca_pem.display());
    let wraith = gateway_in(setup, &format!("https://{upstream}"), &tls);
    echo_through_http1(&wraith, "/duplex-tls").await;
}

/// A client that gives up on its upload once an HTTP/2 upstream's answer has started (a
/// streaming call it abandons): the response is cut, and that is the client's doing, not the
/// endpoint's. The gateway resets the upstream stream because the request body failed; the
/// response that broke off with it used to count as the endpoint's broken response (one is
/// enough to eject it here) and be logged as the upstream breaking off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_client_abandons_is_no_failure_of_an_h2_upstream() {
    use http_body_util::BodyExt;
    // An h2c upstream that echoes the request body as it reads it.
    let upstream = Upstream::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        let echo = req.into_body().map_err(|e| e.into()).boxed();
        hyper::Response::new(echo)
    })
    .await;
    let endpoint = upstream.addr.to_string();
    let wraith = gateway_in(
        Setup::new(),
        &endpoint,
        "protocol = \"h2c\"\noutlier = { consecutive_failures = 1, base_ejection_time = \"1m\", max_ejected_percent = 100 }\n",
    );
    abandon_upload_once_echoed(&wraith, "/h2-duplex-abort").await;

    let record = wraith
        .wait_json_line("access.json", Duration::from_secs(10), |v| {
            v["path"] == "/h2-duplex-abort"
        })
        .await
        .expect("an access record");
    assert_eq!(record["error"], "client_closed", "{record}");
    let broke_off = wraith.wait_log(Duration::from_secs(1), |v| {
        v["message"] == UPSTREAM_BODY_BROKE_OFF
    });
    assert!(
        broke_off.is_none(),
        "logged as the upstream's: {broke_off:?}"
    );
    let status = wraith.endpoint_status("up", &endpoint).await;
    assert_ne!(status["health"], "ejected", "{status}");
}
