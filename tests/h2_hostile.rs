//! HTTP/2 clients and requests that a well-behaved client never sends, against the real
//! gateway, a real TLS handshake and a raw upstream that records every byte it gets: a request
//! body the client resets with `NO_ERROR` (vendor/hyper/VENDORED.md), methods in lower case,
//! the asterisk target on methods other than OPTIONS, and response trailers no trailer may
//! carry.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::h2frames::*;
use common::*;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(10);

/// A raw HTTP/1.1 upstream that records what each connection sends until that connection
/// closes; it never answers (`start`), or answers each request head with the same bytes
/// (`answering`).
struct Recorder {
    addr: SocketAddr,
    /// Bytes received, and how many connections have closed.
    seen: Arc<Mutex<(Vec<u8>, usize)>>,
}

impl Recorder {
    async fn start() -> Recorder {
        Recorder::with(None).await
    }

    async fn answering(answer: &'static [u8]) -> Recorder {
        Recorder::with(Some(answer)).await
    }

    async fn with(answer: Option<&'static [u8]>) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new((Vec::new(), 0)));
        let shared = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let seen = shared.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                seen.lock().unwrap().0.extend_from_slice(&buf[..n]);
                                let Some(answer) = answer else { continue };
                                let heads = buf[..n].windows(4).filter(|w| w == b"\r\n\r\n");
                                for _ in 0..heads.count() {
                                    let _ = s.write_all(answer).await;
                                }
                            }
                        }
                    }
                    seen.lock().unwrap().1 += 1;
                });
            }
        });
        Recorder { addr, seen }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap().0).into_owned()
    }

    /// Waits until `f` holds for (bytes, closed connections).
    async fn wait(&self, what: &str, f: impl Fn(&str, usize) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let closed = self.seen.lock().unwrap().1;
            if f(&self.text(), closed) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}; the upstream got:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn config(setup: &Setup, endpoints: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "{}\n[[upstream]]\nname = \"app\"\nendpoints = [{}]\nresponse_timeout = \"30s\"\n\n\
         [[route]]\nname = \"all\"\nupstream = \"app\"\n",
        setup.listeners(),
        endpoints.join(", ")
    )
}

/// An empty 200, for `Recorder::answering`.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// Sends a bodyless request and waits (at most `WAIT`) for its response head; the
/// connection is ready for the next request afterwards.
async fn h2_send(
    h2: &mut h2::client::SendRequest<Bytes>,
    req: Request<()>,
) -> http::Response<h2::RecvStream> {
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    *h2 = h2.clone().ready().await.unwrap();
    resp
}

fn https_uri(wraith: &Wraith, path: &str) -> http::Uri {
    http::Uri::builder()
        .scheme("https")
        .authority(format!("localhost:{}", wraith.addr("https").port()))
        .path_and_query(path)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_request_body_the_client_resets_is_cut_off_never_completed() {
    let upstream = Recorder::start().await;
    let setup = Setup::new();
    let cfg = config(&setup, &[upstream.addr]);
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;

    // No length: the body goes upstream chunked, as it arrives.
    let req = Request::post(https_uri(&wraith, "/upload"))
        .body(())
        .unwrap();
    let (_resp, mut body) = h2.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"{\"amount\": 1000"), false)
        .unwrap();
    upstream
        .wait("the first chunk reaches the upstream", |t, _| {
            t.contains("{\"amount\": 1000")
        })
        .await;
    // NO_ERROR is what a server sends after a complete response; from a client it still
    // abandons the request.
    body.send_reset(h2::Reason::NO_ERROR);
    upstream
        .wait("the upstream connection is closed", |_, closed| closed >= 1)
        .await;
    let got = upstream.text();
    assert!(
        !got.contains("\r\n0\r\n\r\n"),
        "the truncated body was ended as if complete:\n{got}"
    );
}

#[tokio::test]
async fn a_buffered_body_the_client_resets_never_goes_upstream() {
    // Two endpoints: an idempotent request with a small declared length is read in full
    // before the first attempt (so a retry can send it again). Pooled connections to both
    // (two GETs first) take the request head at once, with no connect to wait for.
    let (a, b) = (Recorder::answering(OK).await, Recorder::answering(OK).await);
    let setup = Setup::new();
    let cfg = config(&setup, &[a.addr, b.addr]);
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;
    for _ in 0..2 {
        let req = Request::get(https_uri(&wraith, "/warm")).body(()).unwrap();
        assert_eq!(h2_send(&mut h2, req).await.status(), 200);
    }

    let req = Request::put(https_uri(&wraith, "/item"))
        .header("content-length", "20")
        .body(())
        .unwrap();
    let (resp, mut body) = h2.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"hello"), false).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    body.send_reset(h2::Reason::NO_ERROR);
    let _ = tokio::time::timeout(WAIT, resp).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for up in [&a, &b] {
        let got = up.text();
        assert!(
            !got.contains("hello"),
            "a body cut short reached the upstream:\n{got}"
        );
    }
}

#[tokio::test]
async fn methods_not_in_upper_case_are_refused_on_every_protocol() {
    let upstream = Recorder::start().await;
    let setup = Setup::new();
    let cfg = config(&setup, &[upstream.addr]);
    let wraith = setup.start(&cfg);

    // HTTP/1.1.
    for method in ["delete", "Delete", "gEt"] {
        let answer = raw_exchange(
            wraith.addr("http"),
            format!("{method} /item/1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{method}: {answer}");
    }
    // HTTP/2.
    let mut h2 = h2_connect(&wraith).await;
    let req = Request::builder()
        .method(http::Method::from_bytes(b"delete").unwrap())
        .uri(https_uri(&wraith, "/item/1"))
        .body(())
        .unwrap();
    let resp = h2_send(&mut h2, req).await;
    assert_eq!(resp.status(), 400);
    // Upper-case extension methods pass.
    let answer = raw_exchange(
        wraith.addr("http"),
        b"PROPFIND /item/1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
    upstream
        .wait("PROPFIND reaches the upstream", |t, _| {
            t.starts_with("PROPFIND /item/1 HTTP/1.1")
        })
        .await;
    assert!(!upstream.text().to_lowercase().contains("delete"));
}

#[tokio::test]
async fn the_asterisk_target_is_for_options_only_over_http2() {
    let upstream = Recorder::start().await;
    let setup = Setup::new();
    let cfg = config(&setup, &[upstream.addr]);
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;
    for method in [http::Method::GET, http::Method::POST, http::Method::DELETE] {
        let req = Request::builder()
            .method(method.clone())
            .uri(https_uri(&wraith, "*"))
            .body(())
            .unwrap();
        let resp = h2_send(&mut h2, req).await;
        assert_eq!(resp.status(), 400, "{method} *");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream.text(), "", "nothing went upstream");
}

/// A field value beginning or ending with whitespace makes an HTTP/2 request malformed (RFC
/// 9113 §8.2.1). An HTTP/1.1 upstream trims it, so a policy or a limit reading " admin"
/// would judge another value than the upstream acts on: refused, never forwarded.
#[tokio::test]
async fn field_values_padded_with_whitespace_are_refused_over_http2() {
    let upstream = Recorder::answering(OK).await;
    let setup = Setup::new();
    let cfg = config(&setup, &[upstream.addr]);
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;
    for value in [" admin", "admin ", "\tadmin", "admin\t", " "] {
        let req = Request::get(https_uri(&wraith, "/padded"))
            .header("x-role", http::HeaderValue::from_str(value).unwrap())
            .body(())
            .unwrap();
        let resp = h2_send(&mut h2, req).await;
        assert_eq!(resp.status(), 400, "{value:?}");
    }
    // Whitespace inside a value is fine, and so is an empty value.
    for value in ["site admin", ""] {
        let req = Request::get(https_uri(&wraith, "/inner"))
            .header("x-role", value)
            .body(())
            .unwrap();
        let resp = h2_send(&mut h2, req).await;
        assert_eq!(resp.status(), 200, "{value:?}");
    }
    upstream
        .wait("both good requests reach the upstream", |t, _| {
            t.matches("GET /inner").count() == 2
        })
        .await;
    assert!(!upstream.text().contains("/padded"), "{}", upstream.text());
}

#[tokio::test]
async fn response_trailers_are_cleaned_for_http2_clients() {
    // A chunked response whose trailer section holds fields no trailer may carry.
    let upstream = Recorder::answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n\
          3\r\nabc\r\n0\r\nContent-Length: 9\r\nSet-Cookie: x=1\r\nHost: evil\r\n\
          Connection: close\r\nProxy-Connection: close\r\n\
          WWW-Authenticate: Basic\r\nX-T: 1\r\n\r\n",
    )
    .await;
    let setup = Setup::new();
    let cfg = config(&setup, &[upstream.addr]);
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;
    let req = Request::get(https_uri(&wraith, "/t"))
        .header("te", "trailers")
        .body(())
        .unwrap();
    let resp = h2_send(&mut h2, req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
        data.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(data, b"abc", "the body arrives whole");
    let trailers = tokio::time::timeout(WAIT, body.trailers())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert_eq!(
        trailers.get("x-t").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "{trailers:?}"
    );
    for refused in [
        "content-length",
        "set-cookie",
        "host",
        "connection",
        "proxy-connection",
        "www-authenticate",
    ] {
        assert!(!trailers.contains_key(refused), "{refused} in {trailers:?}");
    }
}

/// An h2c upstream that answers every request with 200, `content-length` as given (or none)
/// and `hello, truncated` (16 bytes), then resets the stream with NO_ERROR instead of ending
/// it.
async fn truncating_h2c_upstream(content_length: Option<u64>) -> SocketAddr {
    h2c_upstream(move |_req, mut respond| {
        let mut resp = http::Response::builder().status(200);
        if let Some(n) = content_length {
            resp = resp.header("content-length", n);
        }
        let Ok(mut send) = respond.send_response(resp.body(()).unwrap(), false) else {
            return;
        };
        let _ = send.send_data(Bytes::from_static(b"hello, truncated"), false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send.send_reset(h2::Reason::NO_ERROR);
        });
    })
    .await
}

/// A raw h2c upstream (the `h2` crate's server, on 127.0.0.1:0) that hands every request
/// stream to `handle`.
async fn h2c_upstream<F>(handle: F) -> SocketAddr
where
    F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>)
        + Clone
        + Send
        + Sync
        + 'static,
{
    h2c_upstream_with(h2::server::Builder::new(), handle).await
}

/// `h2c_upstream` with the server's settings from `builder`.
async fn h2c_upstream_with<F>(builder: h2::server::Builder, handle: F) -> SocketAddr
where
    F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>)
        + Clone
        + Send
        + Sync
        + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (handle, builder) = (handle.clone(), builder.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = builder.handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    handle(req, respond);
                }
            });
        }
    });
    addr
}

fn h2c_config(setup: &Setup, upstream: SocketAddr) -> String {
    format!(
        "{}\n[[upstream]]\nname = \"app\"\nprotocol = \"h2c\"\nendpoints = [\"{upstream}\"]\n\n\
         [[route]]\nname = \"all\"\nupstream = \"app\"\n",
        setup.listeners()
    )
}

/// An upstream that answers before it has read the request body (and neither reads nor
/// resets it) leaves the stream open while the client goes on sending: the stream still
/// counts against its connection's `h2_max_streams`. Before, it was given back with the
/// response, and the next request went onto that connection, where the upstream's
/// one-stream limit held it until its response timeout (504).
#[tokio::test]
async fn a_request_body_still_sent_after_its_response_keeps_its_h2_stream() {
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let held = kept.clone();
    let mut builder = h2::server::Builder::new();
    builder.max_concurrent_streams(1);
    let upstream = h2c_upstream_with(builder, move |req, mut respond| {
        // Held, neither read nor dropped (a drop would reset the stream).
        held.lock().unwrap().push(req.into_body());
        let _ = respond.send_response(http::Response::new(()), true);
    })
    .await;
    let setup = Setup::new();
    let cfg = h2c_config(&setup, upstream).replace(
        "protocol = \"h2c\"",
        "protocol = \"h2c\"\nh2_max_streams = 1\nresponse_timeout = \"3s\"",
    );
    let wraith = setup.start(&cfg);
    let mut client = h2_connect(&wraith).await;

    let req = Request::post(https_uri(&wraith, "/upload"))
        .body(())
        .unwrap();
    let (resp, mut upload) = client.send_request(req, false).unwrap();
    upload
        .send_data(Bytes::from_static(b"first piece"), false)
        .unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    client = client.ready().await.unwrap();

    // The upload goes on; another request must not wait behind it.
    upload
        .send_data(Bytes::from_static(b"more"), false)
        .unwrap();
    let resp = h2_send(
        &mut client,
        Request::get(https_uri(&wraith, "/next")).body(()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(kept.lock().unwrap().len(), 2);
    upload.send_data(Bytes::new(), true).unwrap();
}

/// An h2c upstream that answers every request with a head at once, then: for `/stall`
/// nothing, ever; for `/quiet` nothing once the request body has ended; for anything else
/// `N pieces` once the request body has ended (its N DATA frames counted).
async fn stalling_h2c_upstream() -> SocketAddr {
    h2c_upstream(|req, mut respond| {
        let path = req.uri().path().to_string();
        let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
            return;
        };
        tokio::spawn(async move {
            let mut body = req.into_body();
            if path == "/stall" {
                // The stream is kept open.
                std::future::pending::<()>().await;
            }
            let mut pieces = 0;
            while let Some(Ok(piece)) = body.data().await {
                let _ = body.flow_control().release_capacity(piece.len());
                // (The end of the body may come as an empty DATA frame of its own.)
                pieces += usize::from(!piece.is_empty());
            }
            if path == "/quiet" {
                std::future::pending::<()>().await;
            }
            let _ = send.send_data(Bytes::from(format!("{pieces} pieces")), true);
        });
    })
    .await
}

/// An HTTP/2 upstream that sends a response head and then nothing is cut after
/// `response_timeout` without progress, as an HTTP/1.1 one is (the body ends in error, the
/// endpoint's slot is freed); it held the client, its task and the slot forever. A call whose
/// answer waits for the client's messages is not cut while those keep coming (a slow
/// client-streaming upload past several timeouts completes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_response_body_stalled_past_response_timeout_is_cut_unless_the_request_moves() {
    let upstream = stalling_h2c_upstream().await;
    let setup = Setup::new();
    let cfg = h2c_config(&setup, upstream).replace(
        "protocol = \"h2c\"",
        "protocol = \"h2c\"\nresponse_timeout = \"1s\"",
    );
    let wraith = setup.start(&cfg);
    let mut client = h2_connect(&wraith).await;

    let resp = h2_send(
        &mut client,
        Request::get(https_uri(&wraith, "/stall")).body(()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let end = tokio::time::timeout(WAIT, body.data())
        .await
        .expect("the stalled body was cut");
    assert!(matches!(end, Some(Err(_))), "{end:?}");

    // Pieces every 400 ms for 3 s: longer than the timeout in all, never silent that long.
    let req = Request::post(https_uri(&wraith, "/upload"))
        .body(())
        .unwrap();
    let (resp, mut upload) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let reading = tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(piece) = body.data().await {
            got.extend_from_slice(&piece?);
        }
        Ok::<_, h2::Error>(got)
    });
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        upload
            .send_data(Bytes::from_static(b"piece"), false)
            .unwrap();
    }
    upload.send_data(Bytes::new(), true).unwrap();
    let got = tokio::time::timeout(WAIT, reading).await.unwrap().unwrap();
    assert_eq!(got.expect("the streaming call completed"), b"8 pieces");
}

/// POSTs one piece to `path` (the request's end with it when `end`), expects the response
/// body to be cut off, and returns the request's access record (`access.json`).
async fn post_cut_off(
    client: &mut h2::client::SendRequest<Bytes>,
    wraith: &Wraith,
    path: &str,
    end: bool,
) -> serde_json::Value {
    *client = client.clone().ready().await.unwrap();
    let req = Request::post(https_uri(wraith, path)).body(()).unwrap();
    let (resp, mut upload) = client.send_request(req, false).unwrap();
    upload.send_data(Bytes::from_static(b"piece"), end).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let end = tokio::time::timeout(WAIT, resp.into_body().data())
        .await
        .expect("the stream was cut");
    assert!(matches!(end, Some(Err(_))), "{path}: {end:?}");
    wraith
        .wait_json_line("access.json", WAIT, |r| r["path"] == path)
        .await
        .expect("a record")
}

/// The stall timer cuts a stream on which both sides went quiet while the client still owed
/// its request body (the upstream waits for it): the client's silence, logged
/// `request_timeout`, and no mark against the endpoint. Counted as the endpoint's failure, a
/// client could get healthy endpoints ejected at will (found by a review). An upstream that
/// goes quiet after the request has ended is the endpoint's failure, and ejects it here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stall_while_the_client_owes_its_body_is_not_held_against_the_endpoint() {
    let upstream = stalling_h2c_upstream().await;
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[log.json]\npath = \"access.json\"\n",
        h2c_config(&setup, upstream).replace(
            "protocol = \"h2c\"",
            "protocol = \"h2c\"\nresponse_timeout = \"1s\"\n\
             outlier = { consecutive_failures = 1, max_ejected_percent = 100, base_ejection_time = \"1m\" }",
        )
    );
    let wraith = setup.start(&cfg);
    let mut client = h2_connect(&wraith).await;
    let endpoint = upstream.to_string();

    // One piece, then the client says nothing more.
    let record = post_cut_off(&mut client, &wraith, "/upload", false).await;
    assert_eq!(record["error"], "request_timeout", "{record}");
    assert_eq!(
        wraith.endpoint_status("app", &endpoint).await["health"],
        "up"
    );

    // The request whole, then silence from the upstream: its failure.
    let record = post_cut_off(&mut client, &wraith, "/quiet", true).await;
    assert_eq!(record["error"], "upstream_body_error", "{record}");
    assert_eq!(
        wraith.endpoint_status("app", &endpoint).await["health"],
        "ejected"
    );
}

#[tokio::test]
async fn a_response_an_h2_upstream_resets_with_no_error_is_not_passed_on_as_complete() {
    for content_length in [None, Some(100)] {
        let upstream = truncating_h2c_upstream(content_length).await;
        let setup = Setup::new();
        let cfg = h2c_config(&setup, upstream);
        let wraith = setup.start(&cfg);

        // HTTP/1.1: never the chunked terminator (nor, with a length, the missing bytes).
        let answer = raw_exchange(
            wraith.addr("http"),
            b"GET /file HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("hello, truncated"), "{answer}");
        assert!(
            !answer.ends_with("\r\n0\r\n\r\n"),
            "{content_length:?}: a cut body ended as complete:\n{answer}"
        );

        // HTTP/2: the stream ends with an error, and not NO_ERROR.
        let mut h2 = h2_connect(&wraith).await;
        let req = Request::get(https_uri(&wraith, "/file")).body(()).unwrap();
        let resp = h2_send(&mut h2, req).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut outcome = None;
        while let Some(chunk) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
            if let Err(e) = chunk {
                outcome = Some(e.reason());
                break;
            }
        }
        let reason = outcome.unwrap_or_else(|| panic!("{content_length:?}: clean end"));
        assert!(
            reason.is_some_and(|r| r != h2::Reason::NO_ERROR),
            "{content_length:?}: reset with {reason:?}"
        );

        // The server log says so, with the upstream, the endpoint and why.
        let line = wraith
            .wait_log(WAIT, |v| v["message"] == UPSTREAM_BODY_BROKE_OFF)
            .unwrap_or_else(|| panic!("no log line for the broken body:\n{}", wraith.log()));
        assert_eq!(line["upstream"], "app", "{line}");
        assert_eq!(line["endpoint"], upstream.to_string(), "{line}");
        assert_eq!(line["level"], "WARN", "{line}");
        assert!(
            line["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{line}"
        );
    }
}

#[tokio::test]
async fn a_204_never_carries_a_content_length_to_http2_clients() {
    // An HTTP/1.1 upstream that answers 204 with a Content-Length (which HTTP/2 clients
    // refuse with PROTOCOL_ERROR).
    let upstream =
        Recorder::answering(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").await;
    let setup = Setup::new();
    let cfg = config(&setup, &[upstream.addr]);
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;
    let req = Request::get(https_uri(&wraith, "/nothing"))
        .body(())
        .unwrap();
    // (A 204 the client refused would be an error here.)
    let resp = h2_send(&mut h2, req).await;
    assert_eq!(resp.status(), 204);
    assert!(resp.headers().get("content-length").is_none(), "{resp:?}");
}

// ---------------------------------------------------------------------------------------------
// Requests h2 refuses before the gateway sees them.

/// What a stream got first from the server.
#[derive(Debug)]
enum Answer {
    /// A HEADERS frame, with its header block.
    Headers(Vec<u8>),
    /// RST_STREAM, with its error code.
    Reset(u32),
}

/// The first answer of each stream, until `n` streams have one (at most `WAIT`); the
/// server's SETTINGS are acknowledged on the way.
async fn answers(
    tcp: &mut tokio::net::TcpStream,
    n: usize,
) -> std::collections::BTreeMap<u32, Answer> {
    let mut answers = std::collections::BTreeMap::new();
    let read = async {
        while answers.len() < n {
            let (ty, flags, stream, payload) = read_frame(tcp)
                .await
                .expect("the connection ended before every stream was answered");
            match ty {
                1 => {
                    answers.entry(stream).or_insert(Answer::Headers(payload));
                }
                3 => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    answers.entry(stream).or_insert(Answer::Reset(code));
                }
                4 if flags & 1 == 0 => {
                    tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap();
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .unwrap_or_else(|_| panic!("no answer for every stream"));
    answers
}

/// Requests h2 refuses itself (a connection-specific field, a missing `:path`, a header
/// list past `max_header_size`) never reach the pipeline; they get an access record and a
/// `malformed_request` event all the same, as HTTP/1.1's and HTTP/3's do. The client gets
/// a stream reset (PROTOCOL_ERROR) or a 431, and the connection goes on.
#[tokio::test]
async fn requests_h2_refuses_itself_are_logged_and_reported() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"ok\"\nrespond = {{ status = 200 }}\n\n\
         [log.json]\npath = \"access.json\"\n[log.events]\npath = \"events.json\"\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    let request = |extra: &[(&'static str, &'static str)], path: bool| {
        let mut fields = vec![(":method", "GET"), (":scheme", "http")];
        if path {
            fields.push((":path", "/refused"));
        }
        fields.push((":authority", "localhost"));
        fields.extend_from_slice(extra);
        fields
    };
    let big = "x".repeat(80 << 10);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let streams: [(u32, Vec<(&str, &str)>); 5] = [
        (1, request(&[("te", "gzip")], true)),
        (3, request(&[("connection", "keep-alive")], true)),
        (5, request(&[], false)),
        (7, {
            let mut f = request(&[], true);
            f.push(("x-big", &big));
            f
        }),
        // And the connection still serves.
        (9, request(&[], true)),
    ];
    for (id, fields) in &streams {
        out.extend_from_slice(&headers_frames(*id, &header_block(fields)));
    }
    tcp.write_all(&out).await.unwrap();

    // What each stream got: RST_STREAM's code, or HEADERS.
    let answers = answers(&mut tcp, 5).await;
    for id in [1, 3, 5] {
        assert!(matches!(answers[&id], Answer::Reset(1)), "{answers:?}");
    }
    assert!(
        matches!(answers[&7], Answer::Headers(_)),
        "431: {answers:?}"
    );
    assert!(matches!(answers[&9], Answer::Headers(_)), "{answers:?}");

    // A malformed head on the stream already served is no request of its own (h2 answers
    // it on a stream that is closed); a new request after it is served and logged.
    let mut more = headers_frames(9, &header_block(&request(&[("te", "gzip")], true)));
    more.extend_from_slice(&headers_frames(11, &header_block(&request(&[], true))));
    tcp.write_all(&more).await.unwrap();

    // One record each for the refused four, and the two served.
    let records = Wraith::eventually(WAIT, || async {
        wraith.json_lines("access.json").len() >= 6
    })
    .await;
    assert!(records, "{:?}", wraith.json_lines("access.json"));
    let records = wraith.json_lines("access.json");
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["error"] == "malformed_request")
        .collect();
    assert_eq!(refused.len(), 4, "{records:?}");
    assert!(
        refused
            .iter()
            .all(|r| r["protocol"] == "h2" && r["method"] == "-" && r["client_ip"] == "127.0.0.1"),
        "{refused:?}"
    );
    let mut statuses: Vec<_> = refused.iter().map(|r| r["status"].clone()).collect();
    statuses.sort_by_key(|s| s.as_u64());
    assert_eq!(statuses, [400, 400, 400, 431], "{refused:?}");
    assert_eq!(
        records
            .iter()
            .filter(|r| r["status"] == 200 && r["path"] == "/refused")
            .count(),
        2,
        "{records:?}"
    );
    assert_eq!(records.len(), 6, "{records:?}");
    let reported = |events: &[serde_json::Value]| {
        events
            .iter()
            .filter(|e| e["wraith"]["event"] == "malformed_request")
            .count()
    };
    Wraith::eventually(WAIT, || async {
        reported(&wraith.json_lines("events.json")) >= 4
    })
    .await;
    let events = wraith.json_lines("events.json");
    assert_eq!(reported(&events), 4, "{events:?}");
}

/// An h2c upstream that, as grpc-go does when a handler returns before the client has
/// finished streaming, answers the first request message with a complete response (head,
/// data, `grpc-status` trailers) and then resets the stream with NO_ERROR to stop the rest of
/// the request body (RFC 9113 §8.1).
async fn early_answering_h2c_upstream() -> SocketAddr {
    h2c_upstream(|req, mut respond| {
        tokio::spawn(async move {
            let mut body = req.into_body();
            // The first message, then the answer.
            let _ = body.data().await;
            let resp = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let Ok(mut send) = respond.send_response(resp, false) else {
                return;
            };
            let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\x02ok"), false);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let _ = send.send_trailers(trailers);
            // (h2 drops what is still queued on a reset: the answer goes first.)
            tokio::time::sleep(Duration::from_millis(300)).await;
            send.send_reset(h2::Reason::NO_ERROR);
        });
    })
    .await
}

/// A complete response followed by the upstream's RST_STREAM(NO_ERROR) (it needs no more of
/// the request body) reaches the client complete, trailers included, and is logged as the
/// success it is; the client's stream is ended, not reset with an error.
#[tokio::test]
async fn a_complete_response_then_no_error_reset_is_a_success() {
    let upstream = early_answering_h2c_upstream().await;
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[log.json]\npath = \"access.json\"\n",
        h2c_config(&setup, upstream)
    );
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;
    let req = Request::post(https_uri(&wraith, "/svc/Bidi"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    // The first message; the client means to send more.
    send.send_data(Bytes::from_static(b"\0\0\0\0\x02hi"), false)
        .unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "{}", wraith.log());
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
        data.extend_from_slice(&chunk.expect("the response body ends cleanly"));
    }
    assert_eq!(data, b"\0\0\0\0\x02ok");
    let trailers = tokio::time::timeout(WAIT, body.trailers())
        .await
        .unwrap()
        .expect("trailers arrive")
        .expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    let record = wraith
        .wait_json_line("access.json", WAIT, |v| v["path"] == "/svc/Bidi")
        .await
        .expect("a record");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["grpc_status"], 0, "{record}");
    assert!(record.get("error").is_none(), "{record}");
    assert_eq!(record["aborted"], false, "{record}");
}

/// A client that makes h2 answer 431 over and over (a large field stored in the HPACK table
/// once, then referenced many times for a few bytes a request) is cut off like one sending
/// malformed heads: GOAWAY ENHANCE_YOUR_CALM after h2's budget of refused streams, so the
/// records and events it can cause on one connection are bounded.
#[tokio::test]
async fn a_flood_of_oversized_heads_is_cut_off() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"ok\"\nrespond = {{ status = 200 }}\n\n\
         [log.json]\npath = \"access.json\"\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    let pseudo = header_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "localhost"),
    ]);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // Stream 1 stores a 4000-byte field (literal with incremental indexing: dynamic index 62).
    let mut first = pseudo.clone();
    first.push(0x40);
    hpack_string(b"x-pad", &mut first);
    hpack_string("p".repeat(4000).as_bytes(), &mut first);
    out.extend_from_slice(&headers_frames(1, &first));
    // Then 3,000 heads of 20 references each: 80 KB decoded, past max_header_size. The
    // answers are read as they come, so no stream waits on a full socket.
    let (mut rd, mut wr) = tcp.into_split();
    let reader = tokio::spawn(async move {
        loop {
            let (ty, _, _, payload) = read_frame(&mut rd).await?;
            if ty == 7 {
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
        }
    });
    wr.write_all(&out).await.unwrap();
    let mut block = pseudo;
    block.extend(std::iter::repeat_n(0xbe, 20));
    for batch in 0..60u32 {
        let mut out = Vec::new();
        for i in 1..=50u32 {
            out.extend_from_slice(&headers_frames(1 + 2 * (batch * 50 + i), &block));
        }
        if wr.write_all(&out).await.is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let code = tokio::time::timeout(WAIT, reader)
        .await
        .expect("no GOAWAY")
        .unwrap();
    assert_eq!(code, Some(0xb), "GOAWAY ENHANCE_YOUR_CALM");
    // (1,024 refusals at most, and the request that stored the field.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = wraith.json_lines("access.json");
    assert!(
        records.len() <= 1026,
        "{} records from one connection",
        records.len()
    );
    assert!(records.len() > 100, "{} records", records.len());
}

/// Heads h2 ends the whole connection for (a field value with CR LF, the usual smuggling
/// probe; an upper-case field name; an unknown pseudo-header) leave one record and one
/// `malformed_request` event for the connection; a connection the client merely closes
/// leaves none.
#[tokio::test]
async fn connections_h2_closes_for_malformed_frames_are_logged_and_reported() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"ok\"\nrespond = {{ status = 200 }}\n\n\
         [log.json]\npath = \"access.json\"\n[log.events]\npath = \"events.json\"\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let probes: [(&str, &str); 3] = [
        ("x-smuggle", "a\r\ntransfer-encoding: chunked"),
        ("X-Upper", "1"),
        (":foo", "1"),
    ];
    for (name, value) in probes {
        let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
            .await
            .unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let block = header_block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "localhost"),
            (name, value),
        ]);
        out.extend_from_slice(&headers_frames(1, &block));
        tcp.write_all(&out).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await;
        // (The server's SETTINGS, then its GOAWAY.)
        assert!(!rest.is_empty(), "{name}: closed without an answer");
    }
    // The same probe from a client that resets the connection at once, reading nothing (the
    // GOAWAY cannot be sent then): still one record.
    let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let block = header_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "localhost"),
        ("x-a", "a\rb"),
    ]);
    out.extend_from_slice(&headers_frames(1, &block));
    tcp.write_all(&out).await.unwrap();
    tcp.set_zero_linger().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(tcp);

    // A connection the client just closes.
    let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    drop(tcp);

    let reported = |events: &[serde_json::Value]| {
        events
            .iter()
            .filter(|e| e["wraith"]["event"] == "malformed_request")
            .count()
    };
    Wraith::eventually(WAIT, || async {
        reported(&wraith.json_lines("events.json")) >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = wraith.json_lines("access.json");
    assert_eq!(records.len(), 4, "{records:?}");
    assert!(
        records.iter().all(|r| r["status"] == 400
            && r["error"] == "malformed_request"
            && r["protocol"] == "h2"),
        "{records:?}"
    );
    assert_eq!(reported(&wraith.json_lines("events.json")), 4);
}

/// A CONNECT with a body length, which hyper does not serve, costs its stream only (hyper
/// ended the whole connection, every other stream on it too) and is logged as refused.
#[tokio::test]
async fn an_http2_connect_with_a_body_costs_its_stream_only() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"ok\"\nrespond = {{ status = 200 }}\n\n\
         [log.json]\npath = \"access.json\"\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let connect = header_block(&[
        (":method", "CONNECT"),
        (":authority", "127.0.0.1:9"),
        ("content-length", "5"),
    ]);
    // HEADERS without END_STREAM (a body is announced).
    let mut frames = headers_frames(1, &connect);
    frames[4] &= !0x1;
    out.extend_from_slice(&frames);
    let get = header_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/after"),
        (":authority", "localhost"),
    ]);
    out.extend_from_slice(&headers_frames(3, &get));
    tcp.write_all(&out).await.unwrap();
    let answers = answers(&mut tcp, 2).await;
    assert!(matches!(answers[&1], Answer::Reset(1)), "{answers:?}");
    assert!(matches!(answers[&3], Answer::Headers(_)), "{answers:?}");
    let records = Wraith::eventually(WAIT, || async {
        wraith.json_lines("access.json").len() >= 2
    })
    .await;
    assert!(records);
    let records = wraith.json_lines("access.json");
    assert!(
        records
            .iter()
            .any(|r| r["error"] == "malformed_request" && r["status"] == 400),
        "{records:?}"
    );
}

/// A `host` field naming another authority than `:authority` is malformed (RFC 9113
/// §8.3.1): 400, rather than one of the two picked. The same authority in another case is
/// the same authority.
#[tokio::test]
async fn a_host_field_other_than_the_authority_is_refused() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"ok\"\nrespond = {{ status = 200 }}\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    for (id, host) in [(1u32, "admin.internal"), (3, "LocalHost")] {
        let block = header_block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "localhost"),
            ("host", host),
        ]);
        out.extend_from_slice(&headers_frames(id, &block));
    }
    tcp.write_all(&out).await.unwrap();
    // The status of each answer: HPACK static index 8 is 200, 12 is 400 (h2 encodes them
    // indexed).
    let statuses: std::collections::BTreeMap<u32, u8> = answers(&mut tcp, 2)
        .await
        .into_iter()
        .map(|(id, a)| match a {
            Answer::Headers(block) => (id, block[0]),
            Answer::Reset(code) => panic!("stream {id} reset ({code})"),
        })
        .collect();
    assert_eq!(
        statuses[&1],
        0x80 | 12,
        "400 for another host: {statuses:?}"
    );
    assert_eq!(
        statuses[&3],
        0x80 | 8,
        "200 for the same host: {statuses:?}"
    );
}

/// A request without `:path` is malformed (RFC 9113 §8.3.1): 400. h2 refuses it itself only
/// beside `:authority`; with the host in a `host` field it came through, and was served as
/// `GET /`.
#[tokio::test]
async fn a_request_without_a_path_is_refused() {
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[route]]\nname = \"ok\"\nrespond = {{ status = 200 }}\n",
        setup.listeners()
    );
    let wraith = setup.start(&cfg);
    let mut tcp = tokio::net::TcpStream::connect(wraith.addr("http"))
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    for (id, path) in [(1u32, None), (3, Some("/"))] {
        let mut fields = vec![(":method", "GET"), (":scheme", "http")];
        fields.extend(path.map(|p| (":path", p)));
        fields.push(("host", "localhost"));
        out.extend_from_slice(&headers_frames(id, &header_block(&fields)));
    }
    tcp.write_all(&out).await.unwrap();
    // HPACK static index 8 is 200, 12 is 400.
    let statuses: std::collections::BTreeMap<u32, u8> = answers(&mut tcp, 2)
        .await
        .into_iter()
        .map(|(id, a)| match a {
            Answer::Headers(block) => (id, block[0]),
            Answer::Reset(code) => panic!("stream {id} reset ({code})"),
        })
        .collect();
    assert_eq!(statuses[&1], 0x80 | 12, "400 without :path: {statuses:?}");
    assert_eq!(statuses[&3], 0x80 | 8, "200 with it: {statuses:?}");
}

/// An h2c upstream that refuses every stream unprocessed: RST_STREAM(REFUSED_STREAM).
async fn refusing_h2c_upstream() -> SocketAddr {
    h2c_upstream(|_req, mut respond| respond.send_reset(h2::Reason::REFUSED_STREAM)).await
}

/// A stream an HTTP/2 upstream refuses unprocessed (REFUSED_STREAM, or above a graceful
/// GOAWAY's last stream ID) goes to another endpoint whatever its method, and is no failure
/// of the endpoint's (RFC 9113 §8.7): a POST got 502 and counted against the endpoint.
#[tokio::test]
async fn a_stream_an_h2_upstream_refuses_unprocessed_is_sent_to_another_endpoint() {
    posts_turned_away_unprocessed_go_to_another_endpoint(refusing_h2c_upstream().await).await;
}

/// POSTs through an h2c upstream of two endpoints, `turning_away` first and an echo: every
/// POST that `turning_away` does not process is answered by the other, and counts nothing
/// against `turning_away`.
async fn posts_turned_away_unprocessed_go_to_another_endpoint(turning_away: SocketAddr) {
    let good = Upstream::echo().await;
    let setup = Setup::new();
    let cfg = format!(
        "{}\n[[upstream]]\nname = \"app\"\nprotocol = \"h2c\"\nendpoints = [\"{turning_away}\", \"{}\"]\nretries = 1\n\n\
         [[route]]\nname = \"all\"\nupstream = \"app\"\n",
        setup.listeners(),
        good.addr
    );
    let wraith = setup.start(&cfg);
    let client = http_client();
    for i in 0..8 {
        let r = client
            .post(wraith.url("http", &format!("/orders/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "POST {i}");
    }
    let e = wraith
        .endpoint_status("app", &turning_away.to_string())
        .await;
    assert_eq!(e["health"], "up", "{e}");
    assert_eq!(e["consecutive_failures"], 0, "{e}");
}

/// A raw h2c upstream that answers the first request of each connection (stream 1: 200, no
/// body) and meets the next one with GOAWAY(NO_ERROR, last stream 1): a server closing
/// connections gracefully, whose later stream was never processed.
async fn goaway_after_one_h2c_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).await.is_err() {
                    return;
                }
                // Our SETTINGS (none).
                if s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.is_err() {
                    return;
                }
                loop {
                    let mut head = [0u8; 9];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let (kind, flags) = (head[3], head[4]);
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let mut payload = vec![0u8; len];
                    if s.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let reply: Vec<u8> = match (kind, stream) {
                        // SETTINGS (not an ACK): acknowledge.
                        (4, 0) if flags & 1 == 0 => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                        // HEADERS on stream 1: 200 (HPACK static index 8), END_STREAM |
                        // END_HEADERS.
                        (1, 1) => vec![0, 0, 1, 1, 5, 0, 0, 0, 1, 0x88],
                        // HEADERS on a later stream: GOAWAY(last stream 1, NO_ERROR), then
                        // the connection closes.
                        (1, _) => {
                            let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
                            let _ = s.write_all(&goaway).await;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            return;
                        }
                        _ => Vec::new(),
                    };
                    if !reply.is_empty() && s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The stream above a graceful GOAWAY's last stream ID was never processed: a POST on it
/// goes to another endpoint (it got 502 at every graceful GOAWAY).
#[tokio::test]
async fn a_post_above_a_graceful_goaway_is_sent_to_another_endpoint() {
    posts_turned_away_unprocessed_go_to_another_endpoint(goaway_after_one_h2c_upstream().await)
        .await;
}

/// With one endpoint, a stream turned away unprocessed goes to it again, on another
/// connection: an upstream rotating its connections with graceful GOAWAYs (a maximum age or
/// number of requests, as gRPC servers and nginx do) cost a 502 at every rotation (a
/// helper's chaos run: 15 to 79 of 4,000 GETs). Within `retries`: an upstream refusing every
/// stream still gets 502, after three attempts.
#[tokio::test]
async fn a_stream_above_a_graceful_goaway_goes_to_the_same_endpoint_when_it_is_the_only_one() {
    for (turning_away, expected) in [
        (goaway_after_one_h2c_upstream().await, 200),
        (refusing_h2c_upstream().await, 502),
    ] {
        let setup = Setup::new();
        let cfg = format!(
            "{}\n[[upstream]]\nname = \"app\"\nprotocol = \"h2c\"\nendpoints = [\"{turning_away}\"]\n\n\
             [[route]]\nname = \"all\"\nupstream = \"app\"\n",
            setup.listeners(),
        );
        let wraith = setup.start(&cfg);
        let client = http_client();
        for i in 0..6 {
            let r = client
                .post(wraith.url("http", &format!("/orders/{i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), expected, "POST {i}: {}", wraith.log());
        }
        let e = wraith
            .endpoint_status("app", &turning_away.to_string())
            .await;
        assert_eq!(e["consecutive_failures"], 0, "{e}");
        if expected == 502 {
            // (The gateway's log reaches the test through a pipe: the last lines may still be
            // on their way when the last response is in.)
            let retries = || {
                wraith
                    .log_json()
                    .iter()
                    .filter(|v| v["message"] == "attempt failed; retrying")
                    .count()
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while retries() < 6 * 2 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(retries(), 6 * 2, "{}", wraith.log());
        }
    }
}

/// A GET whose end comes after its head (HEADERS without END_STREAM, then an empty DATA frame
/// that ends the stream, as some clients send it) goes upstream as the bodyless GET it is,
/// once its end is there: no chunked body for an upstream that does not read a GET's body,
/// or refuses one. A GET that does carry content streams it as before.
#[tokio::test]
async fn a_get_whose_end_comes_after_its_head_goes_upstream_without_a_body() {
    let upstream = Recorder::answering(OK).await;
    let setup = Setup::new();
    let cfg = config(&setup, &[upstream.addr]);
    let wraith = setup.start(&cfg);
    let mut h2 = h2_connect(&wraith).await;
    for (path, content) in [("/ended-later", ""), ("/with-content", "abc")] {
        let req = Request::get(https_uri(&wraith, path)).body(()).unwrap();
        let (resp, mut body) = h2.send_request(req, false).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        body.send_data(Bytes::from_static(content.as_bytes()), true)
            .unwrap();
        let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        h2 = h2.ready().await.unwrap();
    }
    upstream
        .wait("both requests upstream", |t, _| t.contains("/with-content"))
        .await;
    let text = upstream.text();
    let (first, second) = text.split_at(text.find("GET /with-content").unwrap());
    assert!(first.starts_with("GET /ended-later HTTP/1.1\r\n"), "{text}");
    assert!(
        !first.to_ascii_lowercase().contains("transfer-encoding")
            && !first.to_ascii_lowercase().contains("content-length"),
        "a bodyless GET went upstream with a body:\n{text}"
    );
    assert!(first.ends_with("\r\n\r\n"), "{text}");
    upstream
        .wait("the content of the second", |t, _| t.ends_with("0\r\n\r\n"))
        .await;
    let second = second.to_ascii_lowercase();
    assert!(
        second.contains("transfer-encoding: chunked") && second.contains("\r\n3\r\nabc\r\n"),
        "{text}"
    );
}
