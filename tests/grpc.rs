//! gRPC through Wraith to an h2-based gRPC server (length-prefixed messages, trailers,
//! grpc-status): unary, server-streaming, client-streaming and bidirectional calls, over an
//! h2c upstream (client on cleartext HTTP/2) and an h2-over-TLS upstream (client on TLS).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One gRPC message: flag byte, big-endian length, payload.
fn frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// Splits one complete message off the front of `buf`.
fn message(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

/// Splits every complete message off the front of `buf`.
fn messages(buf: &mut BytesMut) -> Vec<Bytes> {
    std::iter::from_fn(|| message(buf)).collect()
}

fn trailers(status: u32, message: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", status.to_string().parse().unwrap());
    if !message.is_empty() {
        t.insert("grpc-message", message.parse().unwrap());
    }
    t
}

/// The test service `test.Echo`: every method answers each request message with
/// `echo:<message>` as soon as it arrives (so bidirectional calls really interleave).
async fn service(req: Request<Incoming>) -> Response<TestBody> {
    assert_eq!(
        req.version(),
        http::Version::HTTP_2,
        "gRPC needs HTTP/2 upstream"
    );
    if req.uri().path() == "/health" {
        return Response::new(full("serving"));
    }
    assert_eq!(req.headers()["te"], "trailers");
    let method = req.uri().path().to_string();
    if method == "/test.Echo/Missing" {
        // Trailers-only: the status in the head, no body.
        return Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "12")
            .header("grpc-message", "unknown method")
            .body(full(""))
            .unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut count = 0;
        let mut collected = Vec::new();
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(data) = f.into_data() {
                buf.extend_from_slice(&data);
                for m in messages(&mut buf) {
                    count += 1;
                    match method.as_str() {
                        "/test.Echo/Bidi" | "/test.Echo/Unary" => {
                            let reply = [b"echo:".as_slice(), &m].concat();
                            let _ = tx.send(Ok(Frame::data(frame(&reply)))).await;
                        }
                        _ => collected.push(m),
                    }
                }
            }
        }
        match method.as_str() {
            "/test.Echo/ClientStream" => {
                let joined = collected
                    .iter()
                    .map(|m| String::from_utf8_lossy(m).to_string())
                    .collect::<Vec<_>>()
                    .join("+");
                let _ = tx.send(Ok(Frame::data(frame(joined.as_bytes())))).await;
            }
            "/test.Echo/ServerStream" => {
                for i in 0..5 {
                    let _ = tx
                        .send(Ok(Frame::data(frame(format!("part {i}").as_bytes()))))
                        .await;
                }
            }
            "/test.Echo/Fail" => {
                let _ = tx
                    .send(Ok(Frame::trailers(trailers(5, "no such thing"))))
                    .await;
                return;
            }
            _ => {}
        }
        let _ = tx
            .send(Ok(Frame::trailers(trailers(
                0,
                &format!("{count} messages"),
            ))))
            .await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

/// An HTTP/2 connection to Wraith (cleartext prior knowledge, or TLS with ALPN h2).
async fn connect(
    addr: std::net::SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    match tls {
        None => {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send
        }
        Some(cfg) => {
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .unwrap();
            assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send
        }
    }
}

/// Starts a call; returns the sender for request messages and the response.
async fn call(
    send: &mut hyper::client::conn::http2::SendRequest<TestBody>,
    scheme: &str,
    method: &str,
) -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    Response<Incoming>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let req = Request::post(format!("{scheme}://localhost/test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(stream).boxed())
        .unwrap();
    // The service answers with its head at once; messages flow both ways after that.
    send.ready().await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("response head in time")
        .unwrap();
    (tx, resp)
}

/// Reads the next gRPC message, or the trailers at the end.
async fn next(body: &mut Incoming, buf: &mut BytesMut) -> Result<Bytes, http::HeaderMap> {
    loop {
        if let Some(m) = message(buf) {
            return Ok(m);
        }
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame in time")
            .expect("the stream does not end without trailers")
            .unwrap();
        match f.into_data() {
            Ok(d) => buf.extend_from_slice(&d),
            Err(f) => return Err(f.into_trailers().unwrap()),
        }
    }
}

async fn exercise(send: &mut hyper::client::conn::http2::SendRequest<TestBody>, scheme: &str) {
    // Unary.
    let (tx, resp) = call(send, scheme, "Unary").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    tx.send(Ok(Frame::data(frame(b"hello")))).await.unwrap();
    drop(tx);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    assert_eq!(next(&mut body, &mut buf).await.unwrap(), "echo:hello");
    let t = next(&mut body, &mut buf).await.unwrap_err();
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "1 messages");

    // Bidirectional: each reply arrives before the next request message is sent.
    let (tx, resp) = call(send, scheme, "Bidi").await;
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    for i in 0..10 {
        let msg = format!("msg {i}");
        tx.send(Ok(Frame::data(frame(msg.as_bytes()))))
            .await
            .unwrap();
        let reply = next(&mut body, &mut buf).await.unwrap();
        assert_eq!(reply, format!("echo:{msg}").into_bytes());
    }
    drop(tx);
    let t = next(&mut body, &mut buf).await.unwrap_err();
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "10 messages");

    // Client streaming.
    let (tx, resp) = call(send, scheme, "ClientStream").await;
    for p in ["a", "b", "c"] {
        tx.send(Ok(Frame::data(frame(p.as_bytes())))).await.unwrap();
    }
    drop(tx);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    assert_eq!(next(&mut body, &mut buf).await.unwrap(), "a+b+c");
    assert_eq!(
        next(&mut body, &mut buf).await.unwrap_err()["grpc-status"],
        "0"
    );

    // Server streaming.
    let (tx, resp) = call(send, scheme, "ServerStream").await;
    tx.send(Ok(Frame::data(frame(b"go")))).await.unwrap();
    drop(tx);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    for i in 0..5 {
        assert_eq!(
            next(&mut body, &mut buf).await.unwrap(),
            format!("part {i}").into_bytes()
        );
    }
    assert_eq!(
        next(&mut body, &mut buf).await.unwrap_err()["grpc-status"],
        "0"
    );

    // An error status from the server reaches the client unchanged.
    let (tx, resp) = call(send, scheme, "Fail").await;
    drop(tx);
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let t = next(&mut body, &mut BytesMut::new()).await.unwrap_err();
    assert_eq!(t["grpc-status"], "5");
    assert_eq!(t["grpc-message"], "no such thing");

    // Trailers-only: the status comes in the response head.
    let (tx, resp) = call(send, scheme, "Missing").await;
    drop(tx);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "12");
}

/// Each call's access record carries the gRPC status it ended with (HTTP status 200 for
/// all of them): from the trailers, or from the head of a trailers-only answer.
async fn assert_grpc_statuses_logged(wraith: &Wraith) {
    let expected = [
        ("/test.Echo/Unary", 0),
        ("/test.Echo/Bidi", 0),
        ("/test.Echo/ClientStream", 0),
        ("/test.Echo/ServerStream", 0),
        ("/test.Echo/Fail", 5),
        ("/test.Echo/Missing", 12),
    ];
    for (path, code) in expected {
        let record = wraith
            .wait_json_line("access.json", Duration::from_secs(10), |v| {
                v["path"] == path
            })
            .await
            .unwrap_or_else(|| panic!("no record of {path}"));
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["grpc_status"], code, "{record}");
    }
}

/// Active health checks, which for HTTP/2 upstreams speak HTTP/2 too.
const CHECK: &str = "[upstream.health_check]\npath = \"/health\"\ninterval = \"100ms\"";

async fn assert_checked_over_h2(wraith: &Wraith, endpoint: &str) {
    let ok = Wraith::eventually(Duration::from_secs(10), || async {
        let e = wraith.endpoint_status("grpc", endpoint).await;
        e["last_check"]["ok"] == true && e["last_check"]["status"] == 200 && e["health"] == "up"
    })
    .await;
    assert!(ok, "{}", wraith.endpoint_status("grpc", endpoint).await);
}

fn config(endpoint: &str, extra: &str) -> String {
    format!(
        r#"{}
[[upstream]]
name = "grpc"
endpoints = ["{endpoint}"]
{extra}

[[route]]
name = "grpc"
upstream = "grpc"

[log.json]
path = "access.json"
"#,
        Setup::standard_listeners()
    )
}

#[tokio::test]
async fn grpc_over_an_h2c_upstream() {
    let up = Upstream::start(service).await;
    let wraith = Setup::new().start(&config(
        &up.endpoint(),
        &format!("protocol = \"h2c\"\n{CHECK}"),
    ));
    let mut send = connect(wraith.addr("http"), None).await;
    exercise(&mut send, "http").await;
    assert_grpc_statuses_logged(&wraith).await;
    assert_checked_over_h2(&wraith, &up.endpoint()).await;
}

#[tokio::test]
async fn grpc_over_an_h2_tls_upstream_from_a_tls_client() {
    let setup = Setup::new();
    let server = tls_server_config(&setup.pki.server_cert, &setup.pki.server_key, None);
    let up = Upstream::start_tls(server, service).await;
    let ca = setup.pki.ca_pem.clone();
    let wraith = setup.start(&config(
        &format!("https://{}", up.addr),
        &format!(
            "protocol = \"h2\"\n[upstream.tls]\nca = \"{}\"\nserver_name = \"localhost\"\n{CHECK}",
            ca.display()
        ),
    ));
    let tls = Arc::new(tls_client_config(&ca, &[b"h2"], None));
    let mut send = connect(wraith.addr("https"), Some(tls)).await;
    exercise(&mut send, "https").await;
    assert_grpc_statuses_logged(&wraith).await;
    assert_checked_over_h2(&wraith, &up.addr.to_string()).await;
}
